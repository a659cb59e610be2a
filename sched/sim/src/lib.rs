//! The scheduler's discrete-event simulator (host, std; the `sched` library itself is
//! `no_std`): P pCPUs running partitions whose vCPUs execute a BARRIER workload
//! (compute, then a PAUSE spin barrier, optionally spin-then-block) or a CPU-bound one. It
//! drives the real planner, compiled tables, `reservations::Ledger` and, per pCPU, the same
//! `sched::SlotTurns` rules (lend a halted owner's slot, reclaim it on wake-up, boundaries)
//! as the hypervisor's slot loop; the four policies differ only in which plan is used and
//! what the host does on top of those rules:
//!
//! - `Gang`: the phase-locked plan, nothing else (Phalanx).
//! - `Independent`: the independent plan, nothing else (a KVM host without PLE).
//! - `IndependentYield`: plus pause-loop exiting as Phalanx's `independent-yield` does it: after
//!   `window` of spinning the vCPU exits (`exit_cost`) and gives the rest of its slot away by
//!   the shared rules (`TurnEnd::Yielded`: to slack, else to another vCPU homed on that pCPU).
//! - `IndependentPle`: plus pause-loop exiting: after `window` of spinning the vCPU exits
//!   (`exit_cost`) and directs a boost to a descheduled sibling that has not reached the
//!   barrier: the sibling preempts whatever runs on its own pCPU until it arrives (or that
//!   pCPU's next boundary), and the spinner's pCPU runs the preempted partition meanwhile, so
//!   shares stay fair (KVM's `kvm_vcpu_on_spin` + `yield_to` under CFS).
//! - `RelaxedCosched`: plus VMware-style relaxed co-scheduling: every `check_every`, a vCPU whose
//!   run time leads its slowest runnable sibling by more than `skew_bound` is co-stopped and the
//!   most lagging descheduled sibling is co-started in its place (it migrates onto the leader's
//!   pCPU; while the leader stays stopped its slots go to the most lagging sibling, so the
//!   partition keeps its entitlement) until its lead falls below half the bound.
//!
//! Time is in ticks; results treat one tick as one nanosecond.

use reservations::{Account, Ledger, MachineStats, Tiling, Work};

use sched::rng::SplitMix64;
use sched::{
    plan_gang, plan_independent, Decision, DispatchTables, FlatPartition, IndependentConfig, PlanConfig, PlanError,
    SlotTurns, Tick, TurnEnd, VcpuRef,
};

const NS_PER_S: f64 = 1e9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Each iteration: compute `compute` (± `jitter_ppm`), then spin at a barrier of all the
    /// partition's vCPUs; with `block_after_spin`, a vCPU that has spun that long halts until
    /// the barrier opens.
    Barrier { compute: Tick, jitter_ppm: u32, block_after_spin: Option<Tick> },
    /// Always computing.
    CpuBound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Gang,
    Independent,
    IndependentYield { window: Tick, exit_cost: Tick },
    IndependentPle { window: Tick, exit_cost: Tick },
    RelaxedCosched { skew_bound: Tick, check_every: Tick },
}

impl Policy {
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Gang => "gang",
            Policy::Independent => "independent",
            Policy::IndependentYield { .. } => "independent-yield",
            Policy::IndependentPle { .. } => "independent+ple",
            Policy::RelaxedCosched { .. } => "relaxed-cosched",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimPartition {
    pub spec: FlatPartition,
    pub workload: Workload,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub pcpu_count: u32,
    pub duration: Tick,
    /// Cost of switching a pCPU to another vCPU (charged to the incoming partition as
    /// `Account::OnBehalf(p, Work::SlotSwitch)`; the vCPU makes no progress meanwhile).
    pub switch_cost: Tick,
    pub soft_period: Tick,
    pub frame: Option<Tick>,
    pub independent_cycle: Tick,
    /// Independent plans: random thread order per pCPU instead of evenly staggered phases.
    pub independent_shuffle: bool,
    pub seed: u64,
    /// Record the schedule of `[0, trace_until)`.
    pub trace_until: Tick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceKind {
    Compute,
    Spin,
    /// Switch or exit overhead.
    Overhead,
    Idle,
}

/// One piece of a pCPU's schedule, for the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceSlice {
    pub pcpu: u32,
    pub start: Tick,
    pub end: Tick,
    pub run: Option<VcpuRef>,
    pub kind: SliceKind,
}

#[derive(Debug, Clone, Default)]
pub struct PartitionResult {
    pub id: u32,
    pub name: String,
    pub iterations: u64,
    /// Barrier iterations per simulated second.
    pub progress_per_s: f64,
    /// Time its vCPUs were on a pCPU (excluding switch/exit overhead), summed over vCPUs.
    pub cpu_time: Tick,
    pub compute_time: Tick,
    pub spin_time: Tick,
    /// Spinning while a sibling that has not reached the barrier was descheduled.
    pub waste_time: Tick,
    /// `waste_time / cpu_time`, percent.
    pub waste_pct: f64,
    /// Run-time skew between sibling vCPUs (max - min of their cumulative time on a pCPU),
    /// sampled at each barrier release: mean and max, in ticks.
    pub mean_skew: f64,
    pub max_skew: Tick,
    /// Mean wall-clock time from the first to the last arrival at a barrier, in ticks.
    pub mean_arrival_spread: f64,
    /// Times one of its vCPUs was switched onto a pCPU.
    pub switches: u64,
    pub ple_exits: u64,
    pub overhead_time: Tick,
}

#[derive(Debug, Clone)]
pub struct SimResult {
    pub policy: &'static str,
    pub duration: Tick,
    pub partitions: Vec<PartitionResult>,
    pub trace: Vec<TraceSlice>,
    /// Ledger check: ticks charged to some account and the elapsed time, summed over all pCPUs'
    /// ledgers (`MachineStats::charged` / `elapsed_cycles`); equal when every tick was charged.
    pub charged: Tick,
    pub elapsed: Tick,
    /// All pCPUs' `reservations::Ledger`s summed (per-partition guest / on-behalf ticks, idle,
    /// overhead, unaccounted, tiling faults), indexed by partition id.
    pub stats: MachineStats,
    /// Owner changes per frame forced by the table.
    pub table_switches: usize,
    pub frame: Tick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VState {
    Compute { left: Tick },
    Spin,
    Blocked,
}

#[derive(Debug, Clone)]
struct Vcpu {
    state: VState,
    running_on: Option<usize>,
    sched_time: Tick,
    spin_run: Tick,
    ple_spin: Tick,
    stopped: bool,
}

struct Part {
    spec: FlatPartition,
    workload: Workload,
    vcpus: Vec<Vcpu>,
    arrived: u32,
    first_arrival: Tick,
    skew_sum: u128,
    spread_sum: u128,
    yield_cursor: usize,
    res: PartitionResult,
}

struct Cpu {
    running: Option<VcpuRef>,
    busy_until: Tick,
    deadline: Tick,
    account: Account,
    /// What the overhead until `busy_until` is charged as (to the running partition).
    overhead: Work,
    /// A sibling boosted here by a directed yield / co-start (runs until it reaches the barrier
    /// or this pCPU's next boundary).
    boost: Option<VcpuRef>,
    /// The pCPU that gave its slot away in exchange for this boost.
    boost_partner: Option<usize>,
    /// This pCPU lent its owner's slot while the owner's sibling is boosted on that pCPU.
    swapped_to: Option<usize>,
}

struct Sim<'t> {
    cfg: SimConfig,
    policy: Policy,
    /// Each pCPU's dispatcher and between-turn rules, as in the hypervisor's slot loop.
    turns: Vec<SlotTurns<'t>>,
    /// Per pCPU: the vCPUs its table runs (owned slots and slack), for directed yields.
    homed: Vec<Vec<VcpuRef>>,
    cpus: Vec<Cpu>,
    parts: Vec<Part>,
    ids: Vec<(u32, usize)>,
    /// One per pCPU, sized for partition ids `0..=max id`.
    ledgers: Vec<Ledger>,
    rng: SplitMix64,
    trace: Vec<TraceSlice>,
}

/// Runs one simulation. Errors are the planner's (infeasible or invalid partitions).
pub fn simulate(parts: &[SimPartition], policy: Policy, cfg: &SimConfig) -> Result<SimResult, PlanError> {
    let specs: Vec<FlatPartition> = parts.iter().map(|p| p.spec.clone()).collect();
    let mut pc = PlanConfig::new(cfg.pcpu_count, cfg.soft_period);
    pc.frame = cfg.frame;
    let plan = match policy {
        Policy::Gang => plan_gang(&specs, &pc)?,
        _ => plan_independent(
            &specs,
            &pc,
            &IndependentConfig { cycle: cfg.independent_cycle, seed: cfg.seed, shuffle: cfg.independent_shuffle },
        )?,
    };
    let tables = DispatchTables::compile(&plan, &specs)?;
    let mut sim = Sim::new(&tables, parts, policy, cfg);
    sim.run();
    let mut result = sim.finish();
    result.table_switches = plan.switches();
    result.frame = plan.frame;
    Ok(result)
}

impl<'t> Sim<'t> {
    fn new(tables: &'t DispatchTables, parts: &[SimPartition], policy: Policy, cfg: &SimConfig) -> Self {
        let mut rng = SplitMix64::new(cfg.seed ^ 0x5EED);
        let mut sim_parts = Vec::new();
        for p in parts {
            let vcpus = (0..p.spec.vcpus)
                .map(|_| Vcpu {
                    state: VState::Compute { left: first_work(&p.workload, &mut rng) },
                    running_on: None,
                    sched_time: 0,
                    spin_run: 0,
                    ple_spin: 0,
                    stopped: false,
                })
                .collect();
            sim_parts.push(Part {
                spec: p.spec.clone(),
                workload: p.workload,
                vcpus,
                arrived: 0,
                first_arrival: 0,
                skew_sum: 0,
                spread_sum: 0,
                yield_cursor: 0,
                res: PartitionResult { id: p.spec.id, name: p.spec.name.clone(), ..Default::default() },
            });
        }
        let mut ids: Vec<(u32, usize)> = sim_parts.iter().enumerate().map(|(i, p)| (p.spec.id, i)).collect();
        ids.sort_unstable();
        let p = cfg.pcpu_count as usize;
        let accounts = parts.iter().map(|x| x.spec.id as usize + 1).max().unwrap_or(0);
        Sim {
            cfg: cfg.clone(),
            policy,
            turns: (0..p).map(|c| SlotTurns::start(tables.dispatcher(c, 0), 0, 0)).collect(),
            homed: tables
                .pcpus
                .iter()
                .map(|t| {
                    let mut homed: Vec<VcpuRef> =
                        t.entries.iter().filter_map(|e| e.run).chain(t.slack_ring.iter().map(|s| s.0)).collect();
                    homed.sort_unstable_by_key(|v| (v.partition, v.vcpu));
                    homed.dedup();
                    homed
                })
                .collect(),
            cpus: (0..p)
                .map(|_| Cpu {
                    running: None,
                    busy_until: 0,
                    deadline: 0,
                    account: Account::Idle,
                    overhead: Work::SlotSwitch,
                    boost: None,
                    boost_partner: None,
                    swapped_to: None,
                })
                .collect(),
            parts: sim_parts,
            ids,
            ledgers: (0..p).map(|c| Ledger::new(c as u32, accounts, 0)).collect(),
            rng,
            trace: Vec::new(),
        }
    }

    fn pidx(&self, id: u32) -> usize {
        self.ids[self.ids.binary_search_by_key(&id, |e| e.0).unwrap()].1
    }

    fn vcpu(&self, v: VcpuRef) -> &Vcpu {
        &self.parts[self.pidx(v.partition)].vcpus[v.vcpu as usize]
    }

    fn vcpu_mut(&mut self, v: VcpuRef) -> &mut Vcpu {
        let i = self.pidx(v.partition);
        &mut self.parts[i].vcpus[v.vcpu as usize]
    }

    /// Ends the turn on `c` (`ended`) through the shared rules, with the vCPUs that may run on
    /// `c` narrowed by `also` (the KVM model keeps a spinner's partition off the pCPU it gives
    /// away), and puts the result into effect, lending the slot if its owner cannot run.
    fn end_turn(&mut self, c: usize, now: Tick, ended: TurnEnd, also: impl Fn(VcpuRef) -> bool) {
        let Sim { turns, parts, ids, homed, .. } = self;
        turns[c].turn_ended(now, Some(ended), |v| also(v) && runnable_on(parts, ids, c, v), homed[c].iter().copied());
        self.settle(c, now);
    }

    /// Puts the decision in force on `c` into effect: a slot whose owner cannot run is lent
    /// (`SlotTurns::lend_if_owner_cannot_run`), except that relaxed co-scheduling gives a
    /// co-stopped leader's slot to its most lagging sibling (the partition keeps its
    /// entitlement).
    fn settle(&mut self, c: usize, now: Tick) {
        let d = self.turns[c].decision();
        let d = match d.run {
            // An owner boosted or co-started on another pCPU comes back to its own slot.
            Some(v)
                if self.cpus[c].running == Some(v)
                    || self.vcpu(v).state != VState::Blocked && !self.vcpu(v).stopped =>
            {
                d
            }
            Some(v) if self.vcpu(v).stopped => match self.lagger(self.pidx(v.partition)) {
                Some(y) => {
                    let d = Decision { run: Some(y), lent: true, ..d };
                    self.turns[c].run_instead(d);
                    d
                }
                None => {
                    let Sim { turns, parts, ids, .. } = self;
                    turns[c].turn_ended(now, Some(TurnEnd::Stopped), |w| runnable_on(parts, ids, c, w), [])
                }
            },
            _ => {
                let Sim { turns, parts, ids, .. } = self;
                turns[c].lend_if_owner_cannot_run(now, |w| runnable_on(parts, ids, c, w))
            }
        };
        self.apply(c, d, now);
    }

    fn run(&mut self) {
        for c in 0..self.cpus.len() {
            self.settle(c, 0);
        }
        let mut now = 0;
        let mut next_check = match self.policy {
            Policy::RelaxedCosched { check_every, .. } => check_every,
            _ => Tick::MAX,
        };
        while now < self.cfg.duration {
            let mut next = self.cfg.duration.min(next_check);
            for c in 0..self.cpus.len() {
                next = next.min(self.cpus[c].deadline);
                if let Some(t) = self.vcpu_event(c, now) {
                    next = next.min(t);
                }
            }
            let next = next.max(now + 1).min(self.cfg.duration.max(now + 1));
            self.advance(now, next);
            now = next;
            self.events(now);
            if now >= next_check {
                self.relaxed_check(now);
                if let Policy::RelaxedCosched { check_every, .. } = self.policy {
                    next_check = now + check_every;
                }
            }
        }
    }

    /// When the vCPU running on `c` next changes state by itself.
    fn vcpu_event(&self, c: usize, now: Tick) -> Option<Tick> {
        let v = self.cpus[c].running?;
        let x = self.vcpu(v);
        let start = now.max(self.cpus[c].busy_until);
        match x.state {
            VState::Compute { left } => Some(start.saturating_add(left)),
            VState::Spin => {
                let p = &self.parts[self.pidx(v.partition)];
                let mut t = Tick::MAX;
                if let Workload::Barrier { block_after_spin: Some(b), .. } = p.workload {
                    t = t.min(start + b.saturating_sub(x.spin_run));
                }
                if let Policy::IndependentPle { window, .. } | Policy::IndependentYield { window, .. } = self.policy {
                    t = t.min(start + window.saturating_sub(x.ple_spin));
                }
                Some(t)
            }
            VState::Blocked => None,
        }
    }

    fn advance(&mut self, now: Tick, next: Tick) {
        // Which partitions have a sibling that has not arrived and is off-CPU right now.
        let lagging_off: Vec<bool> = self
            .parts
            .iter()
            .map(|p| p.vcpus.iter().any(|x| matches!(x.state, VState::Compute { .. }) && x.running_on.is_none()))
            .collect();
        for c in 0..self.cpus.len() {
            let cpu = &self.cpus[c];
            let ovh_end = cpu.busy_until.clamp(now, next);
            let run = cpu.running;
            let (account, overhead) = (cpu.account, cpu.overhead);
            let mut kind = SliceKind::Idle;
            if ovh_end > now {
                let hyp = run.map_or(Account::Overhead, |v| Account::OnBehalf(v.partition, overhead));
                let tiling = self.ledgers[c].charge(hyp, now, ovh_end);
                assert_eq!(tiling, Tiling::Exact, "pCPU {c}: overhead charge [{now}, {ovh_end})");
                if let Some(v) = run {
                    let i = self.pidx(v.partition);
                    self.parts[i].res.overhead_time += ovh_end - now;
                }
                self.record(c, now, ovh_end, run, SliceKind::Overhead);
            }
            let tiling = self.ledgers[c].charge(account, ovh_end, next);
            assert_eq!(tiling, Tiling::Exact, "pCPU {c}: charge [{ovh_end}, {next}) to {account:?}");
            let dt = next - ovh_end;
            if let Some(v) = run {
                let i = self.pidx(v.partition);
                let p = &mut self.parts[i];
                let x = &mut p.vcpus[v.vcpu as usize];
                x.sched_time += next - now;
                p.res.cpu_time += dt;
                match &mut x.state {
                    VState::Compute { left } => {
                        *left -= dt.min(*left);
                        p.res.compute_time += dt;
                        kind = SliceKind::Compute;
                    }
                    VState::Spin => {
                        x.spin_run += dt;
                        x.ple_spin += dt;
                        p.res.spin_time += dt;
                        if lagging_off[i] {
                            p.res.waste_time += dt;
                        }
                        kind = SliceKind::Spin;
                    }
                    VState::Blocked => {}
                }
            }
            if dt > 0 {
                self.record(c, ovh_end, next, run, kind);
            }
        }
    }

    fn record(&mut self, c: usize, start: Tick, end: Tick, run: Option<VcpuRef>, kind: SliceKind) {
        if start >= self.cfg.trace_until {
            return;
        }
        let end = end.min(self.cfg.trace_until);
        if let Some(last) = self.trace.iter_mut().rev().find(|s| s.pcpu == c as u32) {
            if last.end == start && last.run == run && last.kind == kind {
                last.end = end;
                return;
            }
        }
        self.trace.push(TraceSlice { pcpu: c as u32, start, end, run, kind });
    }

    fn events(&mut self, now: Tick) {
        // Work and spin events of running vCPUs.
        for c in 0..self.cpus.len() {
            let Some(v) = self.cpus[c].running else { continue };
            if self.cpus[c].busy_until > now {
                continue;
            }
            let i = self.pidx(v.partition);
            let x = self.parts[i].vcpus[v.vcpu as usize].clone();
            match x.state {
                VState::Compute { left: 0 } => self.arrive(i, v, now),
                VState::Spin => {
                    if let Workload::Barrier { block_after_spin: Some(b), .. } = self.parts[i].workload {
                        if x.spin_run >= b {
                            self.vcpu_mut(v).state = VState::Blocked;
                            self.halt(c, now);
                            continue;
                        }
                    }
                    match self.policy {
                        Policy::IndependentPle { window, exit_cost } if x.ple_spin >= window => {
                            self.ple_exit(c, i, v, now, exit_cost);
                        }
                        Policy::IndependentYield { window, exit_cost } if x.ple_spin >= window => {
                            self.yield_exit(c, i, v, now, exit_cost);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        for c in 0..self.cpus.len() {
            if self.cpus[c].deadline <= now {
                if self.cpus[c].boost.is_some() {
                    self.end_boost(c, now, false);
                }
                self.cpus[c].swapped_to = None;
                self.end_turn(c, now, TurnEnd::Deadline, |_| true);
            }
        }
    }

    /// The vCPU running on `c` blocked.
    fn halt(&mut self, c: usize, now: Tick) {
        self.end_turn(c, now, TurnEnd::Halted, |_| true);
    }

    /// Switches `c` to `d.run`, preempting it elsewhere if it runs on another pCPU.
    fn apply(&mut self, c: usize, d: Decision, now: Tick) {
        self.cpus[c].deadline = d.next_deadline;
        self.cpus[c].account = d.account;
        if self.cpus[c].running == d.run {
            return;
        }
        if let Some(old) = self.cpus[c].running.take() {
            self.vcpu_mut(old).running_on = None;
        }
        let Some(v) = d.run else {
            self.cpus[c].busy_until = now;
            return;
        };
        let elsewhere = self.vcpu(v).running_on;
        {
            let x = self.vcpu_mut(v);
            x.running_on = Some(c);
            x.ple_spin = 0;
        }
        self.cpus[c].running = Some(v);
        self.cpus[c].busy_until = now + self.cfg.switch_cost;
        self.cpus[c].overhead = Work::SlotSwitch;
        let i = self.pidx(v.partition);
        self.parts[i].res.switches += 1;
        if let Some(e) = elsewhere {
            self.cpus[e].running = None;
            self.cpus[e].boost = None;
            self.cpus[e].boost_partner = None;
            // `e` falls back to its slot's owner (or whoever `settle` lends to).
            self.turns[e].return_to_owner();
            self.settle(e, now);
        }
    }

    fn arrive(&mut self, i: usize, v: VcpuRef, now: Tick) {
        {
            let x = &mut self.parts[i].vcpus[v.vcpu as usize];
            x.state = VState::Spin;
            x.spin_run = 0;
            x.ple_spin = 0;
        }
        let p = &mut self.parts[i];
        if p.arrived == 0 {
            p.first_arrival = now;
        }
        p.arrived += 1;
        if let Some(c) = p.vcpus[v.vcpu as usize].running_on {
            if self.cpus[c].boost == Some(v) {
                // The boost ends once the sibling reaches the barrier.
                self.end_boost(c, now, true);
            }
        }
        let p = &mut self.parts[i];
        if p.arrived as usize == p.vcpus.len() {
            self.release(i, now);
        }
    }

    fn release(&mut self, i: usize, now: Tick) {
        let p = &mut self.parts[i];
        p.res.iterations += 1;
        p.spread_sum += (now - p.first_arrival) as u128;
        let most = p.vcpus.iter().map(|x| x.sched_time).max().unwrap_or(0);
        let least = p.vcpus.iter().map(|x| x.sched_time).min().unwrap_or(0);
        let skew = most - least;
        p.skew_sum += skew as u128;
        p.res.max_skew = p.res.max_skew.max(skew);
        p.arrived = 0;
        let mut woken = Vec::new();
        for k in 0..p.vcpus.len() {
            let left = next_work(&p.workload, &mut self.rng);
            let x = &mut p.vcpus[k];
            if x.state == VState::Blocked {
                woken.push(VcpuRef { partition: p.spec.id, vcpu: k as u32 });
            }
            x.state = VState::Compute { left };
        }
        for v in woken {
            self.wake(i, v, now);
        }
    }

    /// `v` became runnable: if it owns a current slot somewhere, it takes it back.
    fn wake(&mut self, i: usize, v: VcpuRef, now: Tick) {
        let pcpus = self.parts[i].spec.pcpus.clone();
        for c in pcpus {
            let c = c as usize;
            if self.cpus[c].boost.is_some() {
                continue;
            }
            if self.turns[c].owner() == Some(v) {
                let Sim { turns, parts, ids, .. } = self;
                turns[c].reclaim_if_owner_woke(|w| runnable_on(parts, ids, c, w));
                self.settle(c, now);
                return;
            }
        }
    }

    /// The runnable, off-CPU, not stopped sibling of partition `i` with the least run time
    /// (like ESX, this looks at run time only, not at what the guest is doing).
    fn lagger(&self, i: usize) -> Option<VcpuRef> {
        let p = &self.parts[i];
        (0..p.vcpus.len())
            .filter(|&k| {
                let y = &p.vcpus[k];
                y.state != VState::Blocked && y.running_on.is_none() && !y.stopped
            })
            .min_by_key(|&k| p.vcpus[k].sched_time)
            .map(|k| VcpuRef { partition: p.spec.id, vcpu: k as u32 })
    }

    /// A pause-loop exit of `v` on `c`: counted, and `exit_cost` of exit handling. Charged as
    /// exit handling unless what follows switches `c` to another vCPU (then the exit and the
    /// switch are one stretch charged as a switch to the incoming one).
    fn pause_loop_exit(&mut self, c: usize, i: usize, v: VcpuRef, now: Tick, exit_cost: Tick) {
        self.parts[i].res.ple_exits += 1;
        self.ledgers[c].note_exit(v.partition);
        self.ledgers[c].note_pause_loop_exit(v.partition);
        self.vcpu_mut(v).ple_spin = 0;
        self.cpus[c].busy_until = now + exit_cost;
        self.cpus[c].overhead = Work::ExitHandling;
    }

    /// Phalanx's `independent-yield`: the spinner gives the rest of its slot away.
    fn yield_exit(&mut self, c: usize, i: usize, v: VcpuRef, now: Tick, exit_cost: Tick) {
        self.pause_loop_exit(c, i, v, now, exit_cost);
        self.end_turn(c, now, TurnEnd::Yielded, |_| true);
        self.cpus[c].busy_until = self.cpus[c].busy_until.max(now + exit_cost);
    }

    /// KVM's directed yield: boost a lagging sibling (see `swap_boost`).
    fn ple_exit(&mut self, c: usize, i: usize, v: VcpuRef, now: Tick, exit_cost: Tick) {
        self.pause_loop_exit(c, i, v, now, exit_cost);
        let p = &self.parts[i];
        let n = p.vcpus.len();
        let target = (0..n).map(|k| (p.yield_cursor + k) % n).find(|&k| {
            matches!(p.vcpus[k].state, VState::Compute { .. }) && p.vcpus[k].running_on.is_none() && !p.vcpus[k].stopped
        });
        let Some(k) = target else { return };
        self.parts[i].yield_cursor = (k + 1) % n;
        let y = VcpuRef { partition: v.partition, vcpu: k as u32 };
        self.swap_boost(c, i, y, now);
        self.cpus[c].busy_until = self.cpus[c].busy_until.max(now + exit_cost);
    }

    /// Directed co-start: run the lagging sibling `y` on its home pCPU now (preempting whoever
    /// runs there) and lend `from`'s slot to the other partitions for as long as the boost
    /// lasts, so they lose on one pCPU what they gain on the other (the host keeps shares fair).
    fn swap_boost(&mut self, from: usize, i: usize, y: VcpuRef, now: Tick) {
        let n = self.parts[i].spec.pcpus.len();
        let home = self.parts[i].spec.pcpus[y.vcpu as usize % n] as usize;
        let guest = Account::Guest(y.partition);
        let mut partner = None;
        if home != from {
            let before = self.turns[from].clone();
            let Sim { turns, parts, ids, .. } = self;
            let d = turns[from].turn_ended(
                now,
                Some(TurnEnd::Yielded),
                |w| w.partition != y.partition && runnable_on(parts, ids, from, w),
                [],
            );
            if d.run.is_some() {
                self.apply(from, d, now);
                self.cpus[from].swapped_to = Some(home);
                partner = Some(from);
            } else {
                // Nobody to swap with: the spinner stays (as if it had not yielded).
                self.turns[from] = before;
            }
        }
        if self.cpus[home].boost.is_some() {
            self.end_boost(home, now, false);
        }
        let boost = Decision { run: Some(y), account: guest, next_deadline: self.cpus[home].deadline, lent: true };
        self.turns[home].run_instead(boost);
        self.apply(home, boost, now);
        self.cpus[home].boost = Some(y);
        self.cpus[home].boost_partner = partner;
    }

    /// Ends the boost on `b`; the partner pCPU returns to its table owner, and so does `b` if
    /// `restore`.
    fn end_boost(&mut self, b: usize, now: Tick, restore: bool) {
        self.cpus[b].boost = None;
        if let Some(a) = self.cpus[b].boost_partner.take() {
            if self.cpus[a].swapped_to == Some(b) {
                self.cpus[a].swapped_to = None;
                self.turns[a].return_to_owner();
                self.settle(a, now);
            }
        }
        if restore {
            self.turns[b].return_to_owner();
            self.settle(b, now);
        }
    }

    fn relaxed_check(&mut self, now: Tick) {
        let Policy::RelaxedCosched { skew_bound, .. } = self.policy else { return };
        for i in 0..self.parts.len() {
            if self.parts[i].vcpus.len() < 2 || self.parts[i].workload == Workload::CpuBound {
                continue;
            }
            let min = self.parts[i]
                .vcpus
                .iter()
                .filter(|x| x.state != VState::Blocked)
                .map(|x| x.sched_time)
                .min()
                .unwrap_or(0);
            for k in 0..self.parts[i].vcpus.len() {
                let v = VcpuRef { partition: self.parts[i].spec.id, vcpu: k as u32 };
                let x = &self.parts[i].vcpus[k];
                let lead = x.sched_time.saturating_sub(min);
                if !x.stopped && lead > skew_bound && x.state != VState::Blocked {
                    self.vcpu_mut(v).stopped = true;
                    if let Some(c) = self.vcpu(v).running_on {
                        // Co-stop the leader; `settle` co-starts the most lagging descheduled
                        // sibling on this pCPU for the rest of the slot.
                        let d = self.turns[c].decision();
                        self.turns[c].run_instead(Decision { run: Some(v), ..d });
                        self.cpus[c].running = None;
                        self.vcpu_mut(v).running_on = None;
                        self.settle(c, now);
                    }
                } else if x.stopped && lead <= skew_bound / 2 {
                    self.vcpu_mut(v).stopped = false;
                    self.wake(i, v, now);
                }
            }
        }
    }

    fn finish(mut self) -> SimResult {
        let stats = MachineStats::from_ledgers(&self.ledgers);
        let charged = self.ledgers.iter().map(Ledger::charged).sum();
        let secs = self.cfg.duration as f64 / NS_PER_S;
        for p in &mut self.parts {
            let r = &mut p.res;
            r.progress_per_s = r.iterations as f64 / secs;
            r.waste_pct = if r.cpu_time == 0 { 0.0 } else { 100.0 * r.waste_time as f64 / r.cpu_time as f64 };
            r.mean_skew = if r.iterations == 0 { 0.0 } else { p.skew_sum as f64 / r.iterations as f64 };
            r.mean_arrival_spread = if r.iterations == 0 { 0.0 } else { p.spread_sum as f64 / r.iterations as f64 };
        }
        SimResult {
            policy: self.policy.name(),
            duration: self.cfg.duration,
            partitions: self.parts.into_iter().map(|p| p.res).collect(),
            trace: self.trace,
            charged,
            elapsed: stats.elapsed_cycles,
            stats,
            table_switches: 0,
            frame: 0,
        }
    }
}

/// Whether `v` can run on pCPU `c` now: not blocked, not co-stopped, not running elsewhere.
fn runnable_on(parts: &[Part], ids: &[(u32, usize)], c: usize, v: VcpuRef) -> bool {
    let j = ids[ids.binary_search_by_key(&v.partition, |e| e.0).unwrap()].1;
    let x = &parts[j].vcpus[v.vcpu as usize];
    x.state != VState::Blocked && !x.stopped && (x.running_on.is_none() || x.running_on == Some(c))
}

fn first_work(w: &Workload, rng: &mut SplitMix64) -> Tick {
    next_work(w, rng)
}

fn next_work(w: &Workload, rng: &mut SplitMix64) -> Tick {
    match *w {
        Workload::CpuBound => Tick::MAX / 4,
        Workload::Barrier { compute, jitter_ppm, .. } => {
            let j = compute * jitter_ppm as u64 / 1_000_000;
            if j == 0 {
                compute
            } else {
                compute - j + rng.below(2 * j + 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sched::EffectiveReservation;

    const MS: Tick = 1_000_000;
    const US: Tick = 1_000;

    fn barrier(
        id: u32,
        pcpus: &[u32],
        vcpus: u32,
        r: EffectiveReservation,
        compute: Tick,
        block: Option<Tick>,
    ) -> SimPartition {
        SimPartition {
            spec: FlatPartition {
                id,
                name: "barrier".to_string(),
                pcpus: pcpus.to_vec(),
                vcpus,
                gang: true,
                reservation: r,
                depth: 1,
            },
            workload: Workload::Barrier { compute, jitter_ppm: 0, block_after_spin: block },
        }
    }

    fn cpu_bound(id: u32, pcpus: &[u32], vcpus: u32, share_ppm: u32) -> SimPartition {
        SimPartition {
            spec: FlatPartition {
                id,
                name: "batch".to_string(),
                pcpus: pcpus.to_vec(),
                vcpus,
                gang: true,
                reservation: EffectiveReservation::Soft { share_ppm },
                depth: 1,
            },
            workload: Workload::CpuBound,
        }
    }

    fn cfg(p: u32, duration: Tick) -> SimConfig {
        SimConfig {
            pcpu_count: p,
            duration,
            switch_cost: 0,
            soft_period: 10 * MS,
            frame: None,
            independent_cycle: 8 * MS,
            independent_shuffle: false,
            seed: 1,
            trace_until: 20 * MS,
        }
    }

    fn whole() -> EffectiveReservation {
        EffectiveReservation::Hard { budget: 10 * MS, period: 10 * MS }
    }
    fn half() -> EffectiveReservation {
        EffectiveReservation::Hard { budget: 5 * MS, period: 10 * MS }
    }

    #[test]
    fn dedicated_barrier_has_no_waste_and_exact_progress() {
        // 2 vCPUs on 2 dedicated pCPUs, 100 us per iteration, no jitter: 10,000 iterations/s.
        let r =
            simulate(&[barrier(1, &[0, 1], 2, whole(), 100 * US, None)], Policy::Gang, &cfg(2, 1_000 * MS)).unwrap();
        let b = &r.partitions[0];
        assert_eq!(b.iterations, 10_000);
        assert_eq!(b.waste_time, 0);
        assert_eq!(b.spin_time, 0, "equal compute: both arrive together");
        assert_eq!(r.charged, r.elapsed);
        assert_eq!(r.elapsed, 2 * 1_000 * MS);
    }

    #[test]
    fn gang_half_share_gives_half_progress_without_waste() {
        let parts = [barrier(1, &[0, 1], 2, half(), 100 * US, None), cpu_bound(2, &[0, 1], 2, 500_000)];
        let r = simulate(&parts, Policy::Gang, &cfg(2, 1_000 * MS)).unwrap();
        let (b, c) = (&r.partitions[0], &r.partitions[1]);
        assert_eq!(b.iterations, 5_000);
        assert_eq!(b.waste_time, 0);
        assert_eq!(c.compute_time, 1_000 * MS, "the batch partition gets the other half of 2 pCPUs");
        assert_eq!(r.charged, r.elapsed);
    }

    #[test]
    fn independent_round_robin_collapses_barrier_progress() {
        let parts = [barrier(1, &[0, 1, 2, 3], 4, half(), 100 * US, None), cpu_bound(2, &[0, 1, 2, 3], 4, 500_000)];
        let g = simulate(&parts, Policy::Gang, &cfg(4, 500 * MS)).unwrap();
        let i = simulate(&parts, Policy::Independent, &cfg(4, 500 * MS)).unwrap();
        let (gb, ib) = (&g.partitions[0], &i.partitions[0]);
        assert!(
            ib.progress_per_s < 0.2 * gb.progress_per_s,
            "gang {} vs independent {}",
            gb.progress_per_s,
            ib.progress_per_s
        );
        assert!(ib.waste_pct > 50.0, "independent waste {}", ib.waste_pct);
        assert!(ib.mean_skew > 100.0 * gb.mean_skew.max(1.0));
        // The batch partition still gets its half either way.
        assert!(i.partitions[1].cpu_time.abs_diff(g.partitions[1].cpu_time) < g.partitions[1].cpu_time / 50);
        assert_eq!(i.charged, i.elapsed);
    }

    #[test]
    fn spin_then_block_lends_the_slot_to_the_soft_partition() {
        let spin = [barrier(1, &[0, 1, 2, 3], 4, half(), 100 * US, None), cpu_bound(2, &[0, 1, 2, 3], 4, 500_000)];
        let block =
            [barrier(1, &[0, 1, 2, 3], 4, half(), 100 * US, Some(20 * US)), cpu_bound(2, &[0, 1, 2, 3], 4, 500_000)];
        let s = simulate(&spin, Policy::Independent, &cfg(4, 300 * MS)).unwrap();
        let b = simulate(&block, Policy::Independent, &cfg(4, 300 * MS)).unwrap();
        assert!(b.partitions[0].spin_time < s.partitions[0].spin_time / 4);
        assert!(
            b.partitions[1].compute_time > s.partitions[1].compute_time * 5 / 4,
            "batch gets the blocked vCPUs' slots: {} vs {}",
            b.partitions[1].compute_time,
            s.partitions[1].compute_time
        );
        assert_eq!(b.charged, b.elapsed);
        check_ledger(&b);
    }

    #[test]
    fn ple_and_relaxed_cosched_run_and_account_exactly() {
        let parts = [barrier(1, &[0, 1, 2, 3], 4, half(), 100 * US, None), cpu_bound(2, &[0, 1, 2, 3], 4, 500_000)];
        let i = simulate(&parts, Policy::Independent, &cfg(4, 300 * MS)).unwrap();
        let ple =
            simulate(&parts, Policy::IndependentPle { window: 10 * US, exit_cost: 2 * US }, &cfg(4, 300 * MS)).unwrap();
        let rc = simulate(&parts, Policy::RelaxedCosched { skew_bound: 3 * MS, check_every: MS }, &cfg(4, 300 * MS))
            .unwrap();
        assert!(ple.partitions[0].ple_exits > 0);
        assert!(ple.partitions[0].overhead_time > 0);
        assert!(ple.partitions[0].spin_time < i.partitions[0].spin_time, "PLE cuts spinning");
        assert!(
            ple.partitions[0].progress_per_s > 5.0 * i.partitions[0].progress_per_s,
            "directed yield restores progress"
        );
        // The directed-yield swap keeps the two partitions' CPU shares close to 50/50.
        let (a, b) = (ple.partitions[0].cpu_time as f64, ple.partitions[1].cpu_time as f64);
        assert!((a / b - 1.0).abs() < 0.1, "PLE shares {a} vs {b}");
        for r in [&i, &ple, &rc] {
            assert_eq!(r.charged, r.elapsed, "{}", r.policy);
            check_ledger(r);
        }
        assert_eq!(ple.stats.partitions[1].pause_loop_exits, ple.partitions[0].ple_exits);
        assert!(ple.stats.partitions[1].exit_handling_cycles > 0, "PLE exits are charged as exit handling");
    }

    #[test]
    fn independent_yield_gives_the_spinners_slots_away_by_the_shared_rules() {
        // Phalanx's `independent-yield`: a spinner that exits yields the rest of its slot, which
        // the shared `SlotTurns` rules lend to the CPU-bound partition's slack, and does not
        // take it back: the barrier partition gives most of its reservation away.
        let parts = [barrier(1, &[0, 1, 2, 3], 4, half(), 100 * US, None), cpu_bound(2, &[0, 1, 2, 3], 4, 500_000)];
        let i = simulate(&parts, Policy::Independent, &cfg(4, 300 * MS)).unwrap();
        let y = simulate(&parts, Policy::IndependentYield { window: 10 * US, exit_cost: 2 * US }, &cfg(4, 300 * MS))
            .unwrap();
        assert!(y.partitions[0].ple_exits > 0);
        assert!(y.partitions[0].spin_time < i.partitions[0].spin_time / 10, "yielding cuts spinning");
        assert!(y.partitions[1].cpu_time > i.partitions[1].cpu_time * 3 / 2, "the yielded slots are lent");
        assert_eq!(y.charged, y.elapsed);
        check_ledger(&y);
    }

    /// The pCPUs' `reservations::Ledger`s agree with the simulator's own per-partition counts.
    fn check_ledger(r: &SimResult) {
        let s = &r.stats;
        assert_eq!((s.unaccounted_cycles, s.overlap_cycles, s.tiling_faults), (0, 0, 0), "{}", r.policy);
        let charged: Tick =
            s.partitions.iter().map(|p| p.charged_cycles()).sum::<Tick>() + s.idle_cycles + s.overhead_cycles;
        assert_eq!((charged, s.elapsed_cycles), (r.charged, r.elapsed), "{}", r.policy);
        for p in &r.partitions {
            let st = &s.partitions[p.id as usize];
            assert_eq!(st.guest_cycles, p.cpu_time, "{} {}: guest ticks", r.policy, p.name);
            assert_eq!(st.on_behalf_cycles(), p.overhead_time, "{} {}: switch/exit ticks", r.policy, p.name);
            assert_eq!(st.pause_loop_exits, p.ple_exits, "{} {}", r.policy, p.name);
        }
    }

    #[test]
    fn gang_spin_then_block_keeps_progress_and_lends_blocked_time() {
        // Jittered compute makes vCPUs wait; blocking after 5 us lends the rest of the slot.
        let jittered = |block| SimPartition {
            workload: Workload::Barrier { compute: 100 * US, jitter_ppm: 200_000, block_after_spin: block },
            ..barrier(1, &[0, 1, 2, 3], 4, half(), 0, None)
        };
        let batch = cpu_bound(2, &[0, 1, 2, 3], 4, 500_000);
        let spin = simulate(&[jittered(None), batch.clone()], Policy::Gang, &cfg(4, 300 * MS)).unwrap();
        let block = simulate(&[jittered(Some(5 * US)), batch], Policy::Gang, &cfg(4, 300 * MS)).unwrap();
        assert_eq!(spin.partitions[0].waste_time, 0, "under gang no sibling is ever descheduled mid-barrier");
        assert!(spin.partitions[0].spin_time > 0, "jitter makes early arrivals spin");
        let (s, b) = (spin.partitions[0].progress_per_s, block.partitions[0].progress_per_s);
        assert!(b > 0.9 * s, "blocking costs little progress: {b} vs {s}");
        assert!(block.partitions[1].compute_time > spin.partitions[1].compute_time, "batch gets the lent time");
        assert_eq!(block.charged, block.elapsed);
        check_ledger(&block);
    }

    #[test]
    fn trace_slices_tile_each_pcpu() {
        let parts = [barrier(1, &[0, 1], 2, half(), 100 * US, None), cpu_bound(2, &[0, 1], 2, 500_000)];
        let mut c = cfg(2, 50 * MS);
        c.switch_cost = 2 * US;
        let r = simulate(&parts, Policy::Gang, &c).unwrap();
        for p in 0..2 {
            let mut at = 0;
            for s in r.trace.iter().filter(|s| s.pcpu == p) {
                assert_eq!(s.start, at);
                at = s.end;
            }
            assert_eq!(at, 20 * MS);
        }
        assert!(r.trace.iter().any(|s| s.kind == SliceKind::Overhead));
        // Switch cost: 2 switches per 10 ms per pCPU, each costing 2 us of the incoming partition.
        assert_eq!(r.partitions[0].overhead_time + r.partitions[1].overhead_time, 2 * 2 * 5 * 2 * US);
        check_ledger(&r);
        assert_eq!(
            r.stats.partitions[1].slot_switch_cycles + r.stats.partitions[2].slot_switch_cycles,
            2 * 2 * 5 * 2 * US
        );
        assert_eq!(r.stats.partitions[1].exit_handling_cycles, 0, "no PLE: no exit handling");
    }
}
