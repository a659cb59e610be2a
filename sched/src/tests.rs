//! Planner invariants over generated partition sets, nested policies, the runtime state
//! machine and the ledger.

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use std::format;

use crate::dispatch::{DispatchTables, VcpuRef};
use crate::nested::{Gang, NestedPolicy, PerPcpuRoundRobin, RoundRobinGang, SubSlice};
use crate::plan::{plan_gang, plan_independent, IndependentConfig, Owner, Plan, PlanConfig};
use crate::rng::SplitMix64;
use crate::spec::{EffectiveReservation, FlatPartition, PlanError, Tick};
use reservations::{Account, Ledger, MachineStats, Tiling, Work};

fn part(id: u32, name: &str, pcpus: &[u32], vcpus: u32, gang: bool, r: EffectiveReservation) -> FlatPartition {
    FlatPartition { id, name: name.to_string(), pcpus: pcpus.to_vec(), vcpus, gang, reservation: r, depth: 1 }
}

fn hard(budget: Tick, period: Tick) -> EffectiveReservation {
    EffectiveReservation::Hard { budget, period }
}

/// A random admissible set: harmonic periods, per-pCPU utilisation kept <= 85%.
fn generate(seed: u64) -> (Vec<FlatPartition>, PlanConfig) {
    let mut rng = SplitMix64::new(seed);
    let p_count = 1 + rng.below(16) as u32;
    let base: Tick = 1000;
    let mut util = vec![0u64; p_count as usize];
    let mut parts = Vec::new();
    for i in 0..(1 + rng.below(14)) as u32 {
        let width = 1 + rng.below(p_count.min(5) as u64) as u32;
        let start = rng.below((p_count - width + 1) as u64) as u32;
        let pcpus: Vec<u32> = if rng.below(2) == 0 {
            (start..start + width).collect()
        } else {
            let mut v: Vec<u32> = (0..p_count).collect();
            for k in (1..v.len()).rev() {
                v.swap(k, rng.below(k as u64 + 1) as usize);
            }
            let mut v = v[..width as usize].to_vec();
            v.sort_unstable();
            v
        };
        let reservation = if rng.below(10) < 6 {
            let period = base << rng.below(4);
            EffectiveReservation::Hard { budget: period * (2 + rng.below(24)) / 100, period }
        } else {
            EffectiveReservation::Soft { share_ppm: 10_000 + rng.below(290_000) as u32 }
        };
        let ppm = reservation.ppm();
        if pcpus.iter().any(|&c| util[c as usize] + ppm > 850_000) {
            continue;
        }
        for &c in &pcpus {
            util[c as usize] += ppm;
        }
        let vcpus = 1 + rng.below(6) as u32;
        parts.push(FlatPartition {
            id: 100 + i,
            name: format!("p{i}"),
            pcpus,
            vcpus,
            gang: rng.below(4) != 0,
            reservation,
            depth: 1 + rng.below(8) as u32,
        });
    }
    (parts, PlanConfig::new(p_count, base * 2))
}

fn check_tiles(plan: &Plan, parts: &[FlatPartition]) {
    for (c, slots) in plan.pcpus.iter().enumerate() {
        let mut at = 0;
        for s in slots {
            assert_eq!(s.offset, at, "pCPU {c}: gap or overlap at {at}");
            assert!(s.length > 0, "pCPU {c}: empty slot");
            if let Some(pid) = s.owner.partition() {
                let p = parts.iter().find(|p| p.id == pid).expect("unknown owner");
                assert!(p.pcpus.contains(&(c as u32)), "{} placed on pCPU {c} it was not granted", p.name);
            }
            at = s.end();
        }
        assert_eq!(at, plan.frame, "pCPU {c}: slots do not reach the frame end");
    }
}

fn owned_intervals(plan: &Plan, c: u32, owner: Owner) -> Vec<(Tick, Tick)> {
    plan.pcpus[c as usize].iter().filter(|s| s.owner == owner).map(|s| (s.offset, s.end())).collect()
}

fn check_gang_plan(plan: &Plan, parts: &[FlatPartition], cfg: &PlanConfig) {
    check_tiles(plan, parts);
    for p in parts {
        let (budget, period) = match p.reservation {
            EffectiveReservation::Hard { budget, period } => (budget, period),
            EffectiveReservation::Soft { share_ppm } => {
                (cfg.soft_period * share_ppm as u64 / 1_000_000, cfg.soft_period)
            }
        };
        for &c in &p.pcpus {
            for k in 0..plan.frame / period {
                let got = plan.time_in(c as usize, k * period, (k + 1) * period, |o| *o == Owner::Partition(p.id));
                assert_eq!(got, budget, "{}: pCPU {c} window {k} got {got}, reserved {budget}", p.name);
            }
            if matches!(p.reservation, EffectiveReservation::Hard { .. }) {
                assert!(plan.pcpus[c as usize].iter().all(|s| s.owner != Owner::Slack(p.id)));
            }
        }
        if p.gang {
            let first = owned_intervals(plan, p.pcpus[0], Owner::Partition(p.id));
            for &c in &p.pcpus[1..] {
                assert_eq!(
                    owned_intervals(plan, c, Owner::Partition(p.id)),
                    first,
                    "{}: gang not aligned on pCPU {c}",
                    p.name
                );
            }
        }
    }
    // Unreserved time is lent to the pCPU's soft partitions in proportion to their shares.
    for c in 0..cfg.pcpu_count {
        let soft: Vec<&FlatPartition> = parts
            .iter()
            .filter(|p| p.pcpus.contains(&c) && matches!(p.reservation, EffectiveReservation::Soft { .. }))
            .collect();
        let slack_total = plan.time_in(c as usize, 0, plan.frame, |o| matches!(o, Owner::Slack(_)));
        let idle = plan.time_in(c as usize, 0, plan.frame, |o| *o == Owner::Idle);
        if soft.is_empty() {
            assert_eq!(slack_total, 0);
        } else {
            assert_eq!(idle, 0, "pCPU {c} idles while soft partitions could use it");
            let w: u64 = soft.iter().map(|p| p.reservation.ppm()).sum();
            for p in &soft[..soft.len() - 1] {
                let got = plan.time_in(c as usize, 0, plan.frame, |o| *o == Owner::Slack(p.id));
                let want = slack_total * p.reservation.ppm() / w;
                assert!(got.abs_diff(want) <= 1, "{} slack on pCPU {c}: {got} vs {want}", p.name);
            }
        }
    }
}

#[test]
fn gang_plan_invariants_hold_over_generated_sets() {
    let (mut ok, mut infeasible) = (0, 0);
    for seed in 0..400 {
        let (parts, cfg) = generate(seed);
        match plan_gang(&parts, &cfg) {
            Ok(plan) => {
                check_gang_plan(&plan, &parts, &cfg);
                DispatchTables::compile(&plan, &parts).expect("compiles");
                ok += 1;
            }
            Err(PlanError::Infeasible { partition, .. }) => {
                assert!(parts.iter().any(|p| p.name == partition));
                infeasible += 1;
            }
            Err(e) => panic!("seed {seed}: {e}"),
        }
    }
    // Utilisation is capped at 85%: gang fragmentation may defeat a few sets, not many.
    assert!(ok >= 380, "only {ok} of 400 feasible ({infeasible} infeasible)");
}

#[test]
fn independent_plan_tiles_and_weights_threads_without_alignment() {
    for seed in 0..200 {
        let (parts, cfg) = generate(seed);
        let ind = IndependentConfig { cycle: 4000, seed, shuffle: seed % 2 == 0 };
        let plan = plan_independent(&parts, &cfg, &ind).unwrap();
        check_tiles(&plan, &parts);
        for p in &parts {
            let n = p.pcpus.len() as u32;
            for v in 0..p.vcpus {
                let home = p.pcpus[(v % n) as usize] as usize;
                let owner = Owner::Vcpu { partition: p.id, vcpu: v };
                assert!(plan.pcpus[home].iter().any(|s| s.owner == owner), "{} vCPU {v} never runs", p.name);
                for (c, slots) in plan.pcpus.iter().enumerate() {
                    if c != home {
                        assert!(slots.iter().all(|s| s.owner != owner), "{} vCPU {v} off its home pCPU", p.name);
                    }
                }
            }
        }
    }
    // Two partitions sharing 4 pCPUs: each pCPU gets its own phase.
    let parts = vec![
        part(1, "a", &[0, 1, 2, 3], 4, true, hard(500, 1000)),
        part(2, "b", &[0, 1, 2, 3], 4, true, EffectiveReservation::Soft { share_ppm: 500_000 }),
    ];
    let plan = plan_independent(
        &parts,
        &PlanConfig::new(4, 1000),
        &IndependentConfig { cycle: 8000, seed: 7, shuffle: false },
    )
    .unwrap();
    let starts: Vec<Tick> = (0..4u32)
        .map(|c| {
            plan.pcpus[c as usize]
                .iter()
                .find(|s| s.offset > 0 && s.owner == Owner::Vcpu { partition: 1, vcpu: c })
                .unwrap()
                .offset
                % 8000
        })
        .collect();
    let mut distinct = starts.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "phases not staggered: {starts:?}");
    for c in 0..4 {
        assert_eq!(plan.time_in(c, 0, plan.frame, |o| o.partition() == Some(1)), plan.frame / 2);
    }
}

#[test]
fn merges_adjacent_slots_and_counts_switches() {
    // One partition at 100% on one pCPU over a frame of several periods: a single slot.
    let parts = vec![part(1, "solo", &[0], 1, true, hard(1000, 1000))];
    let mut cfg = PlanConfig::new(1, 1000);
    cfg.frame = Some(4000);
    let plan = plan_gang(&parts, &cfg).unwrap();
    assert_eq!(plan.pcpus[0].len(), 1);
    assert_eq!(plan.switches(), 0);
    // 50/50 gang pair on 2 pCPUs, period 1000: one switch each way per period per pCPU.
    cfg.pcpu_count = 2;
    let parts = vec![part(1, "a", &[0, 1], 2, true, hard(500, 1000)), part(2, "b", &[0, 1], 2, true, hard(500, 1000))];
    let plan = plan_gang(&parts, &cfg).unwrap();
    assert_eq!(plan.switches(), 2 * 8);
}

#[test]
fn planner_errors_name_the_partition() {
    let cfg = PlanConfig::new(2, 1000);
    let over = vec![part(1, "big", &[0, 1], 2, true, hard(700, 1000)), part(2, "late", &[1], 1, true, hard(400, 1000))];
    let e = plan_gang(&over, &cfg).unwrap_err();
    assert!(
        matches!(&e, PlanError::Infeasible { partition, needed: 400, free: 300, .. } if partition == "late"),
        "{e:?}"
    );
    assert!(e.to_string().contains("'late'"));

    let cases: Vec<(FlatPartition, &str)> = vec![
        (part(1, "nocpu", &[], 1, true, hard(1, 10)), "no pCPUs"),
        (part(1, "range", &[0, 5], 1, true, hard(1, 10)), "out of range"),
        (part(1, "unsorted", &[1, 0], 1, true, hard(1, 10)), "sorted"),
        (part(1, "novcpu", &[0], 0, true, hard(1, 10)), "0 vCPUs"),
        (part(1, "overbudget", &[0], 1, true, hard(11, 10)), "budget"),
        (part(1, "zero", &[0], 1, true, EffectiveReservation::Soft { share_ppm: 0 }), "soft share"),
    ];
    for (p, needle) in cases {
        let msg = plan_gang(std::slice::from_ref(&p), &cfg).unwrap_err().to_string();
        assert!(msg.contains(&format!("'{}'", p.name)) && msg.contains(needle), "{msg}");
    }
    let dup = vec![part(3, "x", &[0], 1, true, hard(1, 10)), part(3, "y", &[1], 1, true, hard(1, 10))];
    assert!(plan_gang(&dup, &cfg).unwrap_err().to_string().contains("'y'"));
    let mut fixed = cfg.clone();
    fixed.frame = Some(1500);
    let e = plan_gang(&[part(1, "odd", &[0], 1, true, hard(1, 1000))], &fixed).unwrap_err();
    assert!(matches!(e, PlanError::PeriodDoesNotDivideFrame { ref partition, .. } if partition == "odd"));
    let mut small = cfg.clone();
    small.max_frame = 10_000;
    let coprime = vec![part(1, "p7", &[0], 1, true, hard(1, 7000)), part(2, "p11", &[1], 1, true, hard(1, 11000))];
    assert!(
        matches!(plan_gang(&coprime, &small).unwrap_err(), PlanError::FrameTooLong { ref partition, .. } if partition == "p11")
    );
}

fn subdivide(pol: &dyn NestedPolicy, p: &FlatPartition, pos: usize, len: Tick, occ: u64) -> Vec<SubSlice> {
    let mut v = Vec::new();
    pol.subdivide(p, pos, len, occ, &mut v);
    let mut at = 0;
    for s in &v {
        assert_eq!(s.start, at);
        at += s.length;
    }
    assert_eq!(at, len, "sub-slices must cover the slot");
    v
}

#[test]
fn gang_policy_maps_vcpu_i_to_ith_pcpu() {
    let p = part(1, "g", &[3, 5, 8], 2, true, hard(1, 2));
    assert_eq!(subdivide(&Gang, &p, 0, 100, 0)[0].vcpu, Some(0));
    assert_eq!(subdivide(&Gang, &p, 1, 100, 7)[0].vcpu, Some(1));
    assert_eq!(subdivide(&Gang, &p, 2, 100, 0)[0].vcpu, None);
    assert!(Gang.check(&part(1, "wide", &[0], 2, true, hard(1, 2))).is_err());
}

#[test]
fn round_robin_gang_runs_groups_together_and_evens_out() {
    let p = part(1, "rr", &[0, 1, 2, 3], 6, true, hard(1, 2));
    let pol = RoundRobinGang { min_subslice: 10 };
    let mut per_vcpu = [0u64; 6];
    for occ in 0..6 {
        let per_pos: Vec<Vec<SubSlice>> = (0..4).map(|pos| subdivide(&pol, &p, pos, 1000, occ)).collect();
        for j in 0..per_pos[0].len() {
            let mut ids: Vec<u32> = per_pos.iter().map(|s| s[j].vcpu.unwrap()).collect();
            for s in &per_pos {
                assert_eq!(
                    (s[j].start, s[j].length),
                    (per_pos[0][j].start, per_pos[0][j].length),
                    "sub-slices not aligned"
                );
                per_vcpu[s[j].vcpu.unwrap() as usize] += s[j].length;
            }
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), 4, "a vCPU on two pCPUs at once");
        }
    }
    assert!(per_vcpu.iter().all(|&t| t == per_vcpu[0]), "unequal time: {per_vcpu:?}");
    // Slot too short to cut: one group per slot.
    assert_eq!(subdivide(&pol, &p, 0, 15, 0).len(), 1);
}

#[test]
fn per_pcpu_round_robin_rotates_homed_vcpus() {
    let p = part(1, "ng", &[0, 1], 5, false, hard(1, 2));
    let seen: Vec<Option<u32>> = (0..4).map(|o| subdivide(&PerPcpuRoundRobin, &p, 0, 10, o)[0].vcpu).collect();
    assert_eq!(seen, vec![Some(0), Some(2), Some(4), Some(0)]);
    let seen: Vec<Option<u32>> = (0..3).map(|o| subdivide(&PerPcpuRoundRobin, &p, 1, 10, o)[0].vcpu).collect();
    assert_eq!(seen, vec![Some(1), Some(3), Some(1)]);
}

/// Brute force: the entry containing absolute time `t`.
fn entry_at(tables: &DispatchTables, c: usize, t0: Tick, t: Tick) -> (Option<VcpuRef>, Tick) {
    let rel = (t - t0) % tables.frame;
    let e = tables.pcpus[c].entries.iter().find(|e| e.offset <= rel && rel < e.end).unwrap();
    (e.run, t - rel + e.end)
}

#[test]
fn dispatcher_is_right_at_every_boundary_and_after_stalls() {
    for seed in 0..60 {
        let (parts, cfg) = generate(seed);
        let Ok(plan) = plan_gang(&parts, &cfg) else { continue };
        let tables = DispatchTables::compile(&plan, &parts).unwrap();
        let t0 = 12_345;
        for c in 0..cfg.pcpu_count as usize {
            let mut d = tables.dispatcher(c, t0);
            let early = d.on_boundary(5);
            assert_eq!((early.run, early.next_deadline), (None, t0));
            let mut now = t0;
            let mut rng = SplitMix64::new(seed);
            while now < t0 + 3 * tables.frame {
                let dec = d.on_boundary(now);
                assert_eq!((dec.run, dec.next_deadline), entry_at(&tables, c, t0, now), "pCPU {c} at {now}");
                assert!(dec.next_deadline > now);
                // Mostly on time, sometimes late by a little or by several slots.
                now = match rng.below(10) {
                    0 => dec.next_deadline + rng.below(tables.frame),
                    1 => dec.next_deadline + rng.below(3),
                    _ => dec.next_deadline,
                };
            }
        }
    }
}

#[test]
fn gang_tables_run_vcpu_i_on_ith_pcpu_at_the_same_time() {
    let parts = vec![
        part(1, "barrier", &[0, 1, 2, 3], 4, true, hard(500, 1000)),
        part(2, "batch", &[0, 1, 2, 3], 4, true, EffectiveReservation::Soft { share_ppm: 500_000 }),
    ];
    let plan = plan_gang(&parts, &PlanConfig::new(4, 1000)).unwrap();
    let tables = DispatchTables::compile(&plan, &parts).unwrap();
    for t in (0..plan.frame).step_by(50) {
        let runs: Vec<Option<VcpuRef>> = (0..4).map(|c| entry_at(&tables, c, 0, t).0).collect();
        let owner = runs[0].unwrap().partition;
        for (c, r) in runs.iter().enumerate() {
            assert_eq!(*r, Some(VcpuRef { partition: owner, vcpu: c as u32 }), "t={t}");
        }
    }
}

#[test]
fn halt_lends_slack_to_soft_partitions_in_proportion() {
    let parts = vec![
        part(1, "rt", &[0], 1, true, hard(600, 1000)),
        part(2, "soft-a", &[0], 1, true, EffectiveReservation::Soft { share_ppm: 200_000 }),
        part(3, "soft-b", &[0, 1], 2, true, EffectiveReservation::Soft { share_ppm: 100_000 }),
    ];
    let plan = plan_gang(&parts, &PlanConfig::new(2, 1000)).unwrap();
    let tables = DispatchTables::compile(&plan, &parts).unwrap();
    let mut d = tables.dispatcher(0, 0);
    let dec = d.on_boundary(0);
    assert_eq!(dec.run, Some(VcpuRef { partition: 1, vcpu: 0 }), "hard partition first");
    let mut lent = [0u32; 4];
    for _ in 0..300 {
        d.reclaim();
        let h = d.on_halt(10, |_| true);
        assert!(h.lent && h.next_deadline == dec.next_deadline);
        let v = h.run.unwrap();
        assert_ne!(v.partition, 1, "slack never goes back to the halted hard owner");
        assert_eq!(h.account, Account::Guest(v.partition));
        lent[v.partition as usize] += 1;
    }
    assert!((190..=210).contains(&lent[2]) && (90..=110).contains(&lent[3]), "{lent:?}");
    // Nobody runnable: idle.
    let h = d.on_halt(20, |_| false);
    assert_eq!((h.run, h.account), (None, Account::Idle));
    // The owner wakes: it takes its slot back.
    d.on_halt(30, |_| true);
    let w = d.reclaim();
    assert_eq!(w.run, Some(VcpuRef { partition: 1, vcpu: 0 }));
    assert!(!w.lent);
}

#[test]
fn ledger_charges_sum_to_elapsed_exactly() {
    // Every pCPU's dispatcher runs two frames of a generated plan; each decision's account is
    // charged to that pCPU's `reservations::Ledger`, with a random stretch of switch overhead
    // (on the partition's behalf) first and, at random, the rest of a slot lent through
    // `on_halt`. Every tick must be charged exactly once, to the partition the table says.
    let mut checked = 0;
    for seed in 0..60 {
        let (parts, cfg) = generate(seed);
        let Ok(plan) = plan_gang(&parts, &cfg) else { continue };
        let tables = DispatchTables::compile(&plan, &parts).unwrap();
        let ids = parts.iter().map(|p| p.id as usize + 1).max().unwrap();
        let mut rng = SplitMix64::new(seed ^ 0xACC0);
        let (t0, span) = (777, 2 * plan.frame);
        let mut expected = vec![0u64; ids];
        let mut expected_idle = 0;
        let mut ledgers = Vec::new();
        for c in 0..cfg.pcpu_count as usize {
            let mut ledger = Ledger::new(c as u32, ids, t0);
            let mut d = tables.dispatcher(c, t0);
            let mut now = t0;
            let mut dec = d.on_boundary(now);
            while now < t0 + span {
                let until = dec.next_deadline.min(t0 + span);
                let cut = now + rng.below(until - now + 1);
                match dec.run {
                    Some(v) => {
                        assert_eq!(dec.account, Account::Guest(v.partition));
                        let switch = now + rng.below((cut - now).min(5) + 1);
                        assert_eq!(
                            ledger.charge(Account::OnBehalf(v.partition, Work::SlotSwitch), now, switch),
                            Tiling::Exact
                        );
                        assert_eq!(ledger.charge(dec.account, switch, cut), Tiling::Exact);
                        expected[v.partition as usize] += cut - now;
                    }
                    None => {
                        assert_eq!(dec.account, Account::Idle);
                        assert_eq!(ledger.charge(dec.account, now, cut), Tiling::Exact);
                        expected_idle += cut - now;
                    }
                }
                now = cut;
                dec = if now == until {
                    d.on_boundary(now)
                } else if rng.below(2) == 0 {
                    d.on_halt(now, |_| true)
                } else {
                    d.current()
                };
            }
            assert_eq!(ledger.charged(), span, "pCPU {c}");
            assert_eq!((ledger.elapsed(), ledger.unaccounted(), ledger.tiling_faults()), (span, 0, 0), "pCPU {c}");
            ledgers.push(ledger);
        }
        let stats = MachineStats::from_ledgers(&ledgers);
        assert_eq!(stats.elapsed_cycles, cfg.pcpu_count as u64 * span);
        let charged: u64 = stats.partitions.iter().map(|p| p.charged_cycles()).sum::<u64>()
            + stats.idle_cycles
            + stats.overhead_cycles;
        assert_eq!(charged, stats.elapsed_cycles, "charges sum to elapsed exactly");
        assert_eq!(stats.partitions.iter().map(|p| p.charged_cycles()).collect::<Vec<_>>(), expected);
        assert_eq!(stats.idle_cycles, expected_idle);
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} plans checked");

    // Holes, double claims and unknown partitions are never absorbed: they are counted.
    let mut l = Ledger::new(0, 2, 100);
    assert_eq!(l.charge(Account::Guest(1), 100, 150), Tiling::Exact);
    assert_eq!(l.charge(Account::Guest(0), 151, 160), Tiling::Gap { cycles: 1 });
    assert_eq!(l.charge(Account::Guest(0), 155, 170), Tiling::Overlap { cycles: 5 });
    assert_eq!(l.charge(Account::Guest(99), 170, 175), Tiling::UnknownAccount);
    assert_eq!((l.unaccounted(), l.overlap_cycles(), l.tiling_faults()), (1 + 5, 5, 3));
    assert_eq!(l.charged() + l.unaccounted(), l.elapsed());
}

#[test]
fn round_robin_gang_tables_never_run_a_vcpu_twice_at_once() {
    let parts = vec![
        part(1, "wide", &[0, 1, 2, 3], 6, true, hard(600, 1000)),
        part(2, "other", &[0, 1, 2, 3], 4, true, EffectiveReservation::Soft { share_ppm: 400_000 }),
    ];
    let mut cfg = PlanConfig::new(4, 1000);
    cfg.frame = Some(6000);
    let plan = plan_gang(&parts, &cfg).unwrap();
    let tables = DispatchTables::compile(&plan, &parts).unwrap();
    let mut per_vcpu = [0u64; 6];
    for t in 0..plan.frame {
        let runs: Vec<Option<VcpuRef>> = (0..4).map(|c| entry_at(&tables, c, 0, t).0).collect();
        let wide: Vec<u32> = runs.iter().flatten().filter(|v| v.partition == 1).map(|v| v.vcpu).collect();
        if !wide.is_empty() {
            assert_eq!(wide.len(), 4, "t={t}: the group must run on all 4 pCPUs together");
            let mut d = wide.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 4, "t={t}: a vCPU on two pCPUs at once: {wide:?}");
            for v in wide {
                per_vcpu[v as usize] += 1;
            }
        }
    }
    assert!(per_vcpu.iter().all(|&t| t == per_vcpu[0]), "unequal vCPU time over the frame: {per_vcpu:?}");
}

#[test]
fn the_boundary_clock_ticks_at_every_boundary_of_any_pcpu() {
    use crate::dispatch::{DispatchEntry, PcpuTable};
    let entry = |offset, end| DispatchEntry { offset, end, run: None, account: Account::Idle };
    // pCPU 0 switches at 40 and 100, pCPU 1 at 25, 40 and 100 (the frame's end).
    let tables = DispatchTables {
        frame: 100,
        pcpus: vec![
            PcpuTable { entries: vec![entry(0, 40), entry(40, 100)], slack_ring: vec![] },
            PcpuTable { entries: vec![entry(0, 25), entry(25, 40), entry(40, 100)], slack_ring: vec![] },
        ],
    };
    let clock = tables.boundary_clock(1_000);
    assert_eq!(clock.next_after(0), 1_000, "before the release: the release");
    let ticks: Vec<Tick> = core::iter::successors(Some(1_000), |&t| Some(clock.next_after(t))).take(7).collect();
    assert_eq!(ticks, [1_000, 1_025, 1_040, 1_100, 1_125, 1_140, 1_200]);
    // Between boundaries (and late by several frames): the next one after now.
    assert_eq!(clock.next_after(1_030), 1_040);
    assert_eq!(clock.next_after(1_539), 1_540);
    assert_eq!(clock.next_after(1_540), 1_600);
}

/// Three gang partitions on four pCPUs, A's budget 1 ms then 4 ms of 10 ms.
fn epoch_tables(a_budget: Tick) -> DispatchTables {
    let parts = vec![
        part(0, "a", &[0, 1, 2, 3], 4, true, hard(a_budget, 10_000)),
        part(1, "b", &[0, 1, 2, 3], 4, true, hard(2_000, 5_000)),
        part(2, "c", &[2, 3], 2, true, hard(1_000, 10_000)),
    ];
    let plan = plan_gang(&parts, &PlanConfig::new(4, 10_000)).unwrap();
    DispatchTables::compile(&plan, &parts).unwrap()
}

#[test]
fn every_pcpu_switches_tables_at_the_one_release_boundary() {
    use crate::epoch::Epoch;
    use crate::turns::{SlotTurns, TurnEnd};
    let t0 = 1_000;
    let first = Epoch::first(epoch_tables(1_000), t0);
    // Published 23.5 ms into the run with 2 frames of lead: released at the 5th frame boundary.
    let second = first.successor(epoch_tables(4_000), t0 + 23_500, 20_000);
    assert_eq!(second.release, t0 + 50_000);
    assert_eq!(second.number, 1);
    assert_ne!(first.tables, second.tables);
    let mut rng = SplitMix64::new(7);
    for pcpu in 0..4 {
        // Each pCPU notices its boundaries a little late, by its own amounts.
        let mut turns = SlotTurns::start(first.dispatcher(pcpu), t0, t0);
        let mut epoch = &first;
        let mut switched_at = None;
        let mut boundaries = Vec::new();
        while boundaries.last().is_none_or(|&b| b < t0 + 80_000) {
            let deadline = turns.decision().next_deadline;
            let now = deadline + rng.below(40);
            turns.turn_ended(now, Some(TurnEnd::Deadline), |_| true, []);
            boundaries.push(deadline);
            if epoch.number == 0 && second.starts_at(deadline) {
                switched_at = Some(deadline);
                epoch = &second;
                turns = SlotTurns::start(second.dispatcher(pcpu), second.release, now);
            }
            // What runs now is what the epoch in force says for this moment.
            let offset = (now - epoch.release) % epoch.tables.frame;
            let entry = epoch.tables.pcpus[pcpu].entries.iter().find(|e| e.offset <= offset && offset < e.end).unwrap();
            assert_eq!(turns.decision().run, entry.run, "pCPU {pcpu} at {now}");
        }
        assert_eq!(switched_at, Some(second.release), "pCPU {pcpu} switched at the release, not before or after");
        assert!(boundaries.contains(&second.release), "pCPU {pcpu}'s old slots end exactly at the release");
        // After the switch, its boundaries are the new tables' offsets from the release.
        let new_offsets: Vec<Tick> = second.tables.pcpus[pcpu].entries.iter().map(|e| e.end).collect();
        for b in boundaries.iter().filter(|&&b| b > second.release) {
            assert!(new_offsets.contains(&((b - second.release - 1) % 10_000 + 1)), "pCPU {pcpu}: {b}");
        }
    }
    // A pCPU that was stalled past the release still starts the new tables, in step.
    let stalled = second.release + 12_345;
    assert!(second.starts_at(stalled));
    let turns = SlotTurns::start(second.dispatcher(0), second.release, stalled);
    let offset = 2_345;
    let entry = second.tables.pcpus[0].entries.iter().find(|e| e.offset <= offset && offset < e.end).unwrap();
    assert_eq!(turns.decision().next_deadline, second.release + 10_000 + entry.end);
}
