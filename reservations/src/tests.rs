//! Host tests: admission (accepts, rejects naming the node), flattening, currencies, and
//! exact accounting.

use crate::*;

const FRAME: u64 = 10_000;

fn hard(budget_us: u64, period_us: u64) -> Reservation {
    Reservation::Hard { budget_us, period_us }
}

fn part(name: &str, group: Option<usize>, vcpus: u32, pcpus: &[u32], reservation: Reservation) -> PartitionSpec {
    PartitionSpec { name: name.into(), group, vcpus, pcpus: pcpus.to_vec(), reservation, nested: NestedPolicy::Gang }
}

fn group(name: &str, parent: Option<usize>, reservation: Reservation) -> GroupSpec {
    GroupSpec { name: name.into(), parent, reservation, pcpus: None, children: ChildPolicy::Any }
}

fn spec(groups: Vec<GroupSpec>, partitions: Vec<PartitionSpec>) -> TreeSpec {
    TreeSpec { major_frame_us: FRAME, pcpu_count: Some(4), gang: true, groups, partitions }
}

fn reject(spec: &TreeSpec) -> AdmissionError {
    match Tree::build(spec) {
        Ok(tree) => panic!("expected a rejection, got {tree:?}"),
        Err(e) => e,
    }
}

#[test]
fn two_hard_halves_on_two_pcpus_are_admitted_and_flattened() {
    let tree = Tree::build(&spec(
        vec![],
        vec![part("a", None, 2, &[1, 0], hard(5_000, 10_000)), part("b", None, 2, &[0, 1], hard(2_500, 5_000))],
    ))
    .unwrap();
    assert_eq!(tree.pcpu_load_us(0), FRAME);
    assert_eq!(tree.pcpu_load_us(1), FRAME);
    assert_eq!(tree.pcpu_load_us(2), 0);
    let flat = tree.flatten();
    assert_eq!(flat.len(), 2);
    assert_eq!(flat[0].id, 0);
    assert_eq!(flat[0].pcpus, vec![0, 1], "pCPUs come out sorted");
    assert_eq!(flat[0].reservation, EffectiveReservation::Hard { budget: 5_000, period: 10_000 });
    assert_eq!(flat[1].reservation, EffectiveReservation::Hard { budget: 2_500, period: 5_000 });
    assert!(flat.iter().all(|p| p.gang && p.depth == 1));
}

#[test]
fn over_admitted_pcpu_names_the_partition_that_tips_it() {
    let e = reject(&spec(
        vec![],
        vec![part("a", None, 2, &[0, 1], hard(6_000, 10_000)), part("b", None, 1, &[1], hard(5_000, 10_000))],
    ));
    assert_eq!(e.node, NodeRef::Partition(1));
    assert_eq!(e.name, "b");
    assert_eq!(e.field, Field::Reservation);
    assert_eq!(
        e.problem,
        Problem::OverAdmitted { pcpu: 1, parent: None, needed_us: 11_000, capacity_us: FRAME, frame_us: FRAME }
    );
    let text = e.to_string();
    assert!(text.starts_with("partition \"b\": field `reservation`: pCPU 1 is over-admitted"), "{text}");
    assert!(text.contains("110.0%"), "{text}");
}

#[test]
fn a_gang_uses_its_utilisation_on_every_pcpu_it_holds() {
    // 60% on pCPUs 0-3 leaves 40% on each; 50% fits on none of them, but fits elsewhere.
    let base = part("wide", None, 4, &[0, 1, 2, 3], hard(6_000, 10_000));
    let e = reject(&spec(vec![], vec![base.clone(), part("late", None, 1, &[3], hard(5_000, 10_000))]));
    assert_eq!(e.name, "late");
    let mut ok = spec(vec![], vec![base, part("late", None, 1, &[3], hard(4_000, 10_000))]);
    Tree::build(&ok).unwrap();
    ok.pcpu_count = Some(5);
    ok.partitions[1].pcpus = vec![4];
    ok.partitions[1].reservation = hard(10_000, 10_000);
    Tree::build(&ok).unwrap();
}

#[test]
fn children_must_fit_within_their_group() {
    let e = reject(&spec(
        vec![group("g", None, hard(5_000, 10_000))],
        vec![part("c1", Some(0), 2, &[0, 1], hard(3_000, 10_000)), part("c2", Some(0), 1, &[1], hard(3_000, 10_000))],
    ));
    assert_eq!((e.node, e.name.as_str(), e.field), (NodeRef::Partition(1), "c2", Field::Reservation));
    assert_eq!(
        e.problem,
        Problem::OverAdmitted {
            pcpu: 1,
            parent: Some("g".into()),
            needed_us: 6_000,
            capacity_us: 5_000,
            frame_us: FRAME
        }
    );
    assert!(e.to_string().contains("exceeds group \"g\" on pCPU 1: the group holds 50.0%"), "{e}");
}

#[test]
fn groups_themselves_are_admitted_against_the_machine() {
    let e = reject(&spec(
        vec![
            group("g1", None, Reservation::FixedShare { percent: 70 }),
            group("g2", None, Reservation::FixedShare { percent: 40 }),
        ],
        vec![part("a", Some(0), 1, &[0], Reservation::Weight(1)), part("b", Some(1), 1, &[0], Reservation::Weight(1))],
    ));
    assert_eq!((e.node, e.name.as_str()), (NodeRef::Group(1), "g2"));
    assert!(matches!(e.problem, Problem::OverAdmitted { pcpu: 0, parent: None, needed_us: 11_000, .. }));
}

#[test]
fn fixed_share_of_a_fixed_share_is_a_guaranteed_budget_over_the_frame() {
    let tree = Tree::build(&spec(
        vec![group("g", None, Reservation::FixedShare { percent: 50 })],
        vec![part("a", Some(0), 2, &[0, 1], Reservation::FixedShare { percent: 50 })],
    ))
    .unwrap();
    assert_eq!(tree.groups()[0].pcpus, vec![0, 1], "implicit group pCPUs: union of children");
    assert_eq!(tree.groups()[0].capacity_us, vec![5_000, 5_000]);
    let flat = tree.flatten();
    assert_eq!(flat[0].reservation, EffectiveReservation::Hard { budget: 2_500, period: FRAME });
    assert_eq!(flat[0].depth, 2);
    assert_eq!(tree.share_ppm(0), Some(250_000));
    assert_eq!(tree.pcpu_load_us(0), 2_500, "load counts what leaves take, not what groups hold");
}

#[test]
fn reservation_values_are_checked() {
    let cases: Vec<(Reservation, Problem)> = vec![
        (hard(3_000, 3_000), Problem::PeriodDoesNotDivideFrame { period_us: 3_000, frame_us: FRAME }),
        (hard(6_000, 5_000), Problem::BudgetExceedsPeriod { budget_us: 6_000, period_us: 5_000 }),
        (hard(0, 5_000), Problem::ZeroBudget),
        (hard(1, 0), Problem::ZeroPeriod),
        (Reservation::FixedShare { percent: 0 }, Problem::ShareOutOfRange { percent: 0 }),
        (Reservation::FixedShare { percent: 101 }, Problem::ShareOutOfRange { percent: 101 }),
        (Reservation::Weight(0), Problem::ZeroWeight),
    ];
    for (reservation, problem) in cases {
        let e = reject(&spec(vec![], vec![part("p", None, 1, &[0], reservation)]));
        assert_eq!((e.name.as_str(), e.field, &e.problem), ("p", Field::Reservation, &problem), "{reservation:?}");
    }
    let mut bad_frame = spec(vec![], vec![part("p", None, 1, &[0], hard(1, 1))]);
    bad_frame.major_frame_us = 0;
    let e = reject(&bad_frame);
    assert_eq!((e.node, e.field, e.problem), (NodeRef::Machine, Field::MajorFrame, Problem::ZeroMajorFrame));
}

#[test]
fn hard_reservations_need_a_guaranteed_parent() {
    let e = reject(&spec(
        vec![group("soft", None, Reservation::Weight(2))],
        vec![part("rt", Some(0), 1, &[0], hard(1_000, 10_000))],
    ));
    assert_eq!((e.name.as_str(), e.field), ("rt", Field::Reservation));
    assert_eq!(e.problem, Problem::HardUnderSoftParent { parent: "soft".into() });
    // A fixed share below a soft group is admitted but is itself soft.
    let tree = Tree::build(&spec(
        vec![group("soft", None, Reservation::Weight(2))],
        vec![part("fs", Some(0), 1, &[0], Reservation::FixedShare { percent: 50 })],
    ))
    .unwrap();
    assert_eq!(tree.flatten()[0].reservation, EffectiveReservation::Soft { share_ppm: 500_000 });
}

#[test]
fn structural_errors_name_the_node() {
    let mut g = vec![group("g0", Some(1), hard(1_000, 10_000)), group("g1", Some(0), hard(1_000, 10_000))];
    let e = reject(&spec(g.clone(), vec![part("p", Some(0), 1, &[0], hard(1_000, 10_000))]));
    assert_eq!((e.node, e.field, e.problem), (NodeRef::Group(0), Field::Parent, Problem::ParentCycle));

    g[0].parent = None;
    g[1].parent = Some(0);
    g[0].pcpus = Some(vec![0, 1]);
    let e = reject(&spec(g.clone(), vec![part("p", Some(1), 1, &[2], hard(1_000, 10_000))]));
    assert_eq!((e.node, e.field), (NodeRef::Group(1), Field::Pcpus), "g1's implicit pCPUs {{2}} escape g0");
    assert_eq!(e.problem, Problem::PcpuOutsideParent { pcpu: 2, parent: "g0".into() });

    let e =
        reject(&spec(vec![group("lonely", None, hard(1_000, 10_000))], vec![part("p", None, 1, &[0], hard(1, 10))]));
    assert_eq!((e.name.as_str(), e.problem), ("lonely", Problem::EmptyGroup));

    let e = reject(&spec(vec![], vec![part("p", None, 1, &[4], hard(1, 10))]));
    assert_eq!((e.field, e.problem), (Field::Pcpus, Problem::PcpuDoesNotExist { pcpu: 4, count: 4 }));
    let e = reject(&spec(vec![], vec![part("p", None, 2, &[1, 1], hard(1, 10))]));
    assert_eq!(e.problem, Problem::DuplicatePcpu { pcpu: 1 });
    let e = reject(&spec(vec![], vec![part("p", None, 0, &[1], hard(1, 10))]));
    assert_eq!((e.field, e.problem), (Field::Vcpus, Problem::ZeroVcpus));
    let e = reject(&spec(vec![], vec![part("p", None, 1, &[0, 1], hard(1, 10))]));
    assert_eq!((e.field, e.problem), (Field::Pcpus, Problem::MorePcpusThanVcpus { vcpus: 1, pcpus: 2 }));
    let e = reject(&spec(vec![], vec![part("p", Some(3), 1, &[0], hard(1, 10))]));
    assert_eq!((e.field, e.problem), (Field::Parent, Problem::UnknownGroup { index: 3 }));
}

#[test]
fn gang_needs_a_pcpu_per_vcpu_and_round_robin_gang_does_not() {
    let mut p = part("p", None, 4, &[0, 1], hard(5_000, 10_000));
    let e = reject(&spec(vec![], vec![p.clone()]));
    assert_eq!((e.field, e.problem), (Field::Policy, Problem::GangNeedsOnePcpuPerVcpu { vcpus: 4, pcpus: 2 }));
    p.nested = NestedPolicy::RoundRobinGang;
    let tree = Tree::build(&spec(vec![], vec![p])).unwrap();
    assert_eq!(tree.partitions()[0].spec.nested, NestedPolicy::RoundRobinGang);
    assert_eq!(tree.flatten()[0].vcpus, 4);
}

#[test]
fn group_child_policy_restricts_reservation_kinds() {
    let mut g = group("w", None, Reservation::FixedShare { percent: 100 });
    g.children = ChildPolicy::Weighted;
    let e = reject(&spec(
        vec![g.clone()],
        vec![part("ok", Some(0), 1, &[0], Reservation::Weight(1)), part("bad", Some(0), 1, &[0], hard(1_000, 10_000))],
    ));
    assert_eq!((e.name.as_str(), e.field), ("bad", Field::Reservation));
    assert_eq!(e.problem, Problem::PolicyForbids { parent: "w".into(), policy: ChildPolicy::Weighted });
    g.children = ChildPolicy::BudgetPeriod;
    Tree::build(&spec(vec![g], vec![part("ok", Some(0), 1, &[0], hard(1_000, 10_000))])).unwrap();
}

#[test]
fn weights_split_what_hard_children_leave() {
    let tree = Tree::build(&spec(
        vec![],
        vec![
            part("rt", None, 1, &[0], hard(4_000, 10_000)),
            part("w1", None, 1, &[0], Reservation::Weight(1)),
            part("w2", None, 1, &[0], Reservation::Weight(2)),
        ],
    ))
    .unwrap();
    let flat = tree.flatten();
    assert_eq!(flat[1].reservation, EffectiveReservation::Soft { share_ppm: 200_000 });
    assert_eq!(flat[2].reservation, EffectiveReservation::Soft { share_ppm: 400_000 });
    assert_eq!(tree.pcpu_load_us(0), FRAME);
}

#[test]
fn a_soft_gang_gets_the_smallest_of_its_per_pcpu_shares() {
    // On pCPU 0 the gang competes with a weight-1 sibling, on pCPU 1 it is alone.
    let tree = Tree::build(&spec(
        vec![],
        vec![
            part("gang", None, 2, &[0, 1], Reservation::Weight(1)),
            part("solo", None, 1, &[0], Reservation::Weight(1)),
        ],
    ))
    .unwrap();
    assert_eq!(tree.share_ppm(0), Some(500_000));
    assert_eq!(tree.share_ppm(1), Some(500_000));
    assert_eq!(tree.pcpu_load_us(1), 5_000, "the rest of pCPU 1 is slack, not planned");
}

#[test]
fn a_share_that_resolves_to_nothing_is_rejected() {
    let e = reject(&spec(
        vec![],
        vec![part("all", None, 1, &[0], hard(10_000, 10_000)), part("starved", None, 1, &[0], Reservation::Weight(5))],
    ));
    assert_eq!((e.name.as_str(), e.problem), ("starved", Problem::ZeroShare { pcpu: 0 }));
}

/// Lottery-scheduling currencies: weights inside a group are in the group's currency, so
/// inflating them (or adding children there) cannot dilute a sibling of the group.
#[test]
fn weight_inflation_inside_a_subtree_cannot_dilute_a_sibling() {
    let build = |inner: &[u32]| {
        let partitions = inner
            .iter()
            .enumerate()
            .map(|(i, &w)| part(&format!("a{i}"), Some(0), 1, &[0], Reservation::Weight(w)))
            .chain([part("b", None, 1, &[0], Reservation::Weight(1))])
            .collect();
        let tree = Tree::build(&spec(vec![group("a", None, Reservation::Weight(1))], partitions)).unwrap();
        let b = tree.partitions().iter().find(|p| p.spec.name == "b").unwrap().id;
        (tree.share_ppm(b).unwrap(), tree.share_ppm(0).unwrap())
    };
    let (b_before, a0_before) = build(&[1, 1]);
    assert_eq!((b_before, a0_before), (500_000, 250_000));
    let (b_inflated, a0_inflated) = build(&[1_000, 1]);
    assert_eq!(b_inflated, 500_000, "inflation inside group a must not move b");
    assert!(a0_inflated > a0_before, "inside the group the inflated child gains");
    let (b_crowded, _) = build(&[1, 1, 1, 1, 1, 1]);
    assert_eq!(b_crowded, 500_000, "more children inside a must not move b");
    // Without the currency boundary the same inflation does dilute b.
    let flat = Tree::build(&spec(
        vec![],
        vec![part("a0", None, 1, &[0], Reservation::Weight(1_000)), part("b", None, 1, &[0], Reservation::Weight(1))],
    ))
    .unwrap();
    assert!(flat.share_ppm(1).unwrap() < 1_000);
}

#[test]
fn deep_hierarchies_flatten_with_their_depth() {
    let groups: Vec<GroupSpec> = (0..8)
        .map(|d| {
            group(&format!("g{d}"), if d == 0 { None } else { Some(d - 1) }, Reservation::FixedShare { percent: 50 })
        })
        .collect();
    let tree =
        Tree::build(&spec(groups, vec![part("deep", Some(7), 1, &[2], Reservation::FixedShare { percent: 100 })]))
            .unwrap();
    let flat = tree.flatten();
    assert_eq!(flat[0].depth, 9);
    // 10 ms halved eight times, rounded down at each step: 5000, 2500, ..., 39 us.
    assert_eq!(flat[0].reservation, EffectiveReservation::Hard { budget: 39, period: FRAME });
}

#[test]
fn host_check_without_a_machine_skips_pcpu_existence() {
    let mut s = spec(vec![], vec![part("p", None, 1, &[63], hard(1_000, 10_000))]);
    s.pcpu_count = None;
    let tree = Tree::build(&s).unwrap();
    assert_eq!(tree.used_pcpus().collect::<Vec<_>>(), vec![63]);
    s.gang = false;
    assert!(!Tree::build(&s).unwrap().flatten()[0].gang);
}

#[test]
fn flattened_reservations_convert_to_planner_ticks() {
    let hard = EffectiveReservation::Hard { budget: 5_000, period: 10_000 };
    assert_eq!(hard.in_ticks(2_400), EffectiveReservation::Hard { budget: 12_000_000, period: 24_000_000 });
    let soft = EffectiveReservation::Soft { share_ppm: 250_000 };
    assert_eq!(soft.in_ticks(1_000), soft);
}

// ---- accounting ----

#[test]
fn back_to_back_charges_sum_to_elapsed_exactly() {
    let mut l = Ledger::new(0, 2, 1_000);
    let steps = [
        (Account::Idle, 1_000, 1_500),
        (Account::Overhead, 1_500, 1_520),
        (Account::Guest(0), 1_520, 9_000),
        (Account::OnBehalf(0, Work::ExitHandling), 9_000, 9_400),
        (Account::Guest(0), 9_400, 12_000),
        (Account::OnBehalf(1, Work::IrqDemux), 12_000, 12_050),
        (Account::Overhead, 12_050, 12_100),
        (Account::Guest(1), 12_100, 20_000),
    ];
    for (account, from, to) in steps {
        assert_eq!(l.charge(account, from, to), Tiling::Exact);
    }
    assert_eq!(l.elapsed(), 19_000);
    assert_eq!(l.charged(), 19_000);
    assert_eq!(l.unaccounted(), 0);
    assert_eq!(l.tiling_faults(), 0);
    let p0 = l.partition(0).unwrap();
    assert_eq!((p0.guest_cycles, p0.exit_handling_cycles, p0.charged_cycles()), (10_080, 400, 10_480));
    let p1 = l.partition(1).unwrap();
    assert_eq!((p1.guest_cycles, p1.irq_demux_cycles), (7_900, 50));
    assert_eq!((l.idle_cycles(), l.overhead_cycles()), (500, 70));
}

#[test]
fn gaps_overlaps_and_bad_accounts_are_reported_not_absorbed() {
    let mut l = Ledger::new(3, 1, 0);
    assert_eq!(l.charge(Account::Guest(0), 0, 100), Tiling::Exact);
    assert_eq!(l.charge(Account::Overhead, 130, 200), Tiling::Gap { cycles: 30 });
    assert_eq!(l.charge(Account::Guest(0), 150, 260), Tiling::Overlap { cycles: 50 });
    assert_eq!(l.charge(Account::Guest(0), 10, 20), Tiling::Overlap { cycles: 10 });
    assert_eq!(l.charge(Account::Guest(7), 260, 300), Tiling::UnknownAccount);
    assert_eq!(l.charge(Account::Idle, 400, 350), Tiling::Backwards);
    assert_eq!(l.partition(0).unwrap().guest_cycles, 160, "overlapping cycles are charged once");
    assert_eq!(l.overhead_cycles(), 70);
    assert_eq!(l.unaccounted(), 30 + 40);
    assert_eq!(l.overlap_cycles(), 60);
    assert_eq!(l.tiling_faults(), 5);
    assert_eq!(l.charged() + l.unaccounted(), l.elapsed());
    // The pCPU's own end reading: time after the last charge is unaccounted too.
    l.close(1_000);
    assert_eq!((l.elapsed(), l.unaccounted()), (1_000, 30 + 40 + 700));
    assert_eq!(l.charged() + l.unaccounted(), l.elapsed());
    l.close(900);
    assert_eq!(l.elapsed(), 1_000, "an earlier end changes nothing");
}

/// A repeatable pseudo-random source (xorshift64): `next(bound)` is below `bound`.
fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    }
}

#[test]
fn the_tiling_invariant_holds_for_arbitrary_charge_sequences() {
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..200 {
        let mut l = Ledger::new(0, 3, 5_000);
        let mut at = 5_000u64;
        for _ in 0..500 {
            // Mostly exact, sometimes a hole or a step back.
            let from = match next(10) {
                0 => at + next(50),
                1 => at.saturating_sub(next(50)),
                _ => at,
            };
            let to = from + next(1_000);
            let account = match next(6) {
                0 => Account::Idle,
                1 => Account::Overhead,
                2 => Account::OnBehalf(next(3) as u32, Work::ExitHandling),
                3 => Account::Guest(next(4) as u32), // id 3 does not exist
                _ => Account::Guest(next(3) as u32),
            };
            l.charge(account, from, to);
            at = at.max(to);
        }
        assert_eq!(l.charged() + l.unaccounted(), l.elapsed());
        assert_eq!(l.cursor_tsc(), at);
    }
}

#[test]
fn machine_stats_merge_pcpus_and_count_events() {
    let mut a = Ledger::new(0, 2, 0);
    let mut b = Ledger::new(1, 2, 0);
    a.charge(Account::Guest(0), 0, 900);
    a.charge(Account::OnBehalf(0, Work::ExitHandling), 900, 1_000);
    a.note_exit(0);
    a.note_slot(0);
    b.charge(Account::Guest(0), 0, 500);
    b.note_pause_loop_exit(0);
    b.charge(Account::Guest(1), 500, 999);
    b.note_irq(1);
    b.charge(Account::Idle, 1_000, 1_000); // leaves a 1-cycle hole
    let stats = MachineStats::from_ledgers(&[a, b]);
    assert_eq!(stats.elapsed_cycles, 2_000);
    assert_eq!(stats.partitions[0].charged_cycles(), 1_500);
    assert_eq!((stats.partitions[0].exits, stats.partitions[0].slots, stats.partitions[0].pause_loop_exits), (1, 1, 1));
    assert_eq!(stats.partitions[1].irqs, 1);
    assert_eq!(stats.unaccounted_cycles, 1);
    assert_eq!(stats.unaccounted_ppb(), 500_000);
    assert_eq!(stats.share_ppm(0), 750_000);
}

#[test]
fn spin_samples_inside_a_window_are_counted_apart_and_merged() {
    let mut a = Ledger::new(0, 1, 0);
    let mut b = Ledger::new(1, 1, 0);
    a.note_spin_sample(0, true, false); // before the guest opened its window
    a.note_spin_sample(0, true, true);
    a.note_spin_sample(0, false, true);
    b.note_spin_sample(0, true, true);
    b.note_spin_sample(0, false, false);
    let s = MachineStats::from_ledgers(&[a, b]).partitions[0];
    assert_eq!((s.spin_samples, s.spin_samples_spinning), (5, 3));
    assert_eq!((s.window_spin_samples, s.window_spin_samples_spinning), (3, 2));
}

#[test]
fn window_stretches_count_exits_and_their_cost_apart_and_merge() {
    let mut a = Ledger::new(0, 2, 0);
    let mut b = Ledger::new(1, 2, 0);
    a.note_window_stretch(0, 9_000, 0);
    a.note_window_stretch(0, 8_000, 1_000);
    b.note_window_stretch(0, 5_000, 500);
    let s = MachineStats::from_ledgers(&[a, b]).partitions;
    assert_eq!((s[0].window_guest_cycles, s[0].window_exits, s[0].window_exit_handling_cycles), (22_000, 3, 1_500));
    assert_eq!(s[1], PartitionStats::default(), "only the partition whose window it was");
    assert_eq!(s[0].exits, 0, "counted by window, not as exits again");
}

#[test]
fn slot_switch_is_work_on_the_partitions_behalf() {
    let mut ledger = Ledger::new(0, 1, 1_000);
    assert_eq!(ledger.charge(Account::OnBehalf(0, Work::SlotSwitch), 1_000, 1_300), Tiling::Exact);
    assert_eq!(ledger.charge(Account::Guest(0), 1_300, 6_000), Tiling::Exact);
    let stats = *ledger.partition(0).unwrap();
    assert_eq!(stats.slot_switch_cycles, 300);
    assert_eq!(stats.on_behalf_cycles(), 300);
    assert_eq!(stats.charged_cycles(), ledger.elapsed());
}

#[test]
fn over_admission_by_a_hair_is_visibly_over_100_percent() {
    let p = Problem::OverAdmitted { pcpu: 0, parent: None, needed_us: 10_002, capacity_us: 10_000, frame_us: 10_000 };
    let text = p.to_string();
    assert!(text.contains("100.02% of the pCPU"), "{text}");
    let p = Problem::OverAdmitted { pcpu: 0, parent: None, needed_us: 6_250, capacity_us: 10_000, frame_us: 10_000 };
    assert!(p.to_string().contains("62.5% of the pCPU"), "{p}");
    let p =
        Problem::OverAdmitted { pcpu: 0, parent: None, needed_us: 10_000_001, capacity_us: 1, frame_us: 10_000_000 };
    assert!(p.to_string().contains("100.001% of the pCPU"), "{p}");
}

/// A change admitted incrementally (`Tree::with_reservation`: the parent and the node's own
/// subtree) comes out as admitting the whole changed spec does, refusals included, over
/// random trees and random (also invalid) reservations.
#[test]
fn one_change_admitted_alone_matches_admitting_the_whole_tree() {
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let reservation = |next: &mut dyn FnMut(u64) -> u64| match next(8) {
        0 | 1 => hard(next(3_000), [1_000, 2_000, 2_500, 5_000, 10_000, 3_000, 0][next(7) as usize]),
        2..=4 => Reservation::FixedShare { percent: next(70) as u32 },
        _ => Reservation::Weight(next(5) as u32),
    };
    let (mut compared, mut accepted, mut refused) = (0, 0, 0);
    while compared < 3_000 {
        let groups: Vec<GroupSpec> = (0..next(6) as usize)
            .map(|g| GroupSpec {
                name: format!("g{g}"),
                parent: if g > 0 && next(3) > 0 { Some(next(g as u64) as usize) } else { None },
                reservation: reservation(&mut next),
                pcpus: None,
                children: [ChildPolicy::Any, ChildPolicy::Any, ChildPolicy::FixedShare, ChildPolicy::Weighted]
                    [next(4) as usize],
            })
            .collect();
        let partitions: Vec<PartitionSpec> = (0..1 + next(6) as usize)
            .map(|p| {
                let first = next(4) as u32;
                let pcpus: Vec<u32> = (first..=(first + next(2) as u32).min(3)).collect();
                let group =
                    if groups.is_empty() || next(4) == 0 { None } else { Some(next(groups.len() as u64) as usize) };
                part(&format!("p{p}"), group, pcpus.len() as u32, &pcpus, reservation(&mut next))
            })
            .collect();
        let mut spec = spec(groups, partitions);
        if next(4) == 0 {
            spec.pcpu_count = None;
        }
        let Ok(tree) = Tree::build(&spec) else { continue };
        let node = match next(spec.groups.len() as u64 + spec.partitions.len() as u64) as usize {
            g if g < spec.groups.len() => NodeRef::Group(g),
            p => NodeRef::Partition(p - spec.groups.len()),
        };
        let changed = reservation(&mut next);
        let mut whole = spec.clone();
        match node {
            NodeRef::Group(g) => whole.groups[g].reservation = changed,
            NodeRef::Partition(p) => whole.partitions[p].reservation = changed,
            NodeRef::Machine => unreachable!(),
        }
        let alone = tree.with_reservation(node, changed);
        assert_eq!(alone, Tree::build(&whole), "{node:?} -> {changed:?} in {spec:?}");
        compared += 1;
        if alone.is_ok() {
            accepted += 1
        } else {
            refused += 1
        }
    }
    assert!(accepted > 500 && refused > 500, "both outcomes are exercised: {accepted} accepted, {refused} refused");
    let tree = Tree::build(&spec(vec![], vec![part("a", None, 1, &[0], hard(1_000, 10_000))])).unwrap();
    assert_eq!(tree.with_reservation(NodeRef::Partition(1), hard(1, 10)).unwrap_err().problem, Problem::NotInTree);
    assert_eq!(tree.with_reservation(NodeRef::Machine, hard(1, 10)).unwrap_err().problem, Problem::NotInTree);
}
