//! Compiled dispatch tables and the per-pCPU runtime state machine.
//!
//! `DispatchTables::compile` resolves, once, every slot of a `Plan` into what runs (partition,
//! vCPU) through the partition's nested policy, and the `reservations::Account` to charge.
//! `PcpuDispatcher` is the pure state machine the bare-metal dispatcher calls: at a boundary it steps a cursor to
//! the next precomputed entry (O(1): no tree, no partition list is looked at), on a halt it
//! lends the rest of the slot to a soft partition of this pCPU from a precomputed weighted ring.

use alloc::vec;
use alloc::vec::Vec;

use reservations::Account;

use crate::nested::{default_policy, NestedPolicy, PerPcpuRoundRobin, SubSlice};
use crate::plan::{Owner, Plan};
use crate::spec::{EffectiveReservation, FlatPartition, PartitionId, PlanError, Tick};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcpuRef {
    pub partition: PartitionId,
    pub vcpu: u32,
}

/// `[offset, end)` within the frame: run `run` (or nothing) and charge `account`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchEntry {
    pub offset: Tick,
    pub end: Tick,
    pub run: Option<VcpuRef>,
    pub account: Account,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PcpuTable {
    /// Sorted, tiling `[0, frame)`.
    pub entries: Vec<DispatchEntry>,
    /// Weighted ring of soft-partition vCPUs homed on this pCPU that may receive slack, with
    /// the account lent time is charged to (the vCPU's partition's guest account).
    pub slack_ring: Vec<(VcpuRef, Account)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchTables {
    pub frame: Tick,
    pub pcpus: Vec<PcpuTable>,
}

/// Length of a slack ring when a pCPU has few soft vCPUs (resolution of the proportions).
const SLACK_RING_LEN: usize = 64;

impl DispatchTables {
    /// Compiles with the default nested policy of each partition.
    pub fn compile(plan: &Plan, parts: &[FlatPartition]) -> Result<Self, PlanError> {
        Self::compile_with(plan, parts, &default_policy)
    }

    pub fn compile_with(
        plan: &Plan,
        parts: &[FlatPartition],
        choose: &dyn Fn(&FlatPartition) -> &'static dyn NestedPolicy,
    ) -> Result<Self, PlanError> {
        let mut by_id: Vec<(PartitionId, usize)> = parts.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
        by_id.sort_unstable();
        let find = |pid: PartitionId| by_id.binary_search_by_key(&pid, |e| e.0).ok().map(|i| by_id[i].1);
        let policies: Vec<&'static dyn NestedPolicy> = parts.iter().map(choose).collect();
        for (p, pol) in parts.iter().zip(&policies) {
            pol.check(p).map_err(|reason| PlanError::PolicyMismatch {
                partition: p.name.clone(),
                policy: pol.name(),
                reason,
            })?;
        }
        let mut occurrences = vec![0u64; parts.len()];
        let mut slack_occurrences = vec![0u64; parts.len()];
        let mut touched: Vec<usize> = Vec::new();
        let mut subs: Vec<SubSlice> = Vec::new();
        let mut pcpus = Vec::with_capacity(plan.pcpus.len());
        for (c, slots) in plan.pcpus.iter().enumerate() {
            for &i in &touched {
                occurrences[i] = 0;
                slack_occurrences[i] = 0;
            }
            touched.clear();
            let mut entries: Vec<DispatchEntry> = Vec::with_capacity(slots.len());
            for slot in slots {
                subs.clear();
                let idx = slot.owner.partition().map(|pid| {
                    find(pid).ok_or(PlanError::BadSetting {
                        setting: "plan names a partition that is not in the input (id)",
                        value: pid as Tick,
                    })
                });
                let idx = match idx {
                    Some(r) => Some(r?),
                    None => None,
                };
                match slot.owner {
                    Owner::Idle => subs.push(SubSlice { start: 0, length: slot.length, vcpu: None }),
                    Owner::Vcpu { vcpu, .. } => subs.push(SubSlice { start: 0, length: slot.length, vcpu: Some(vcpu) }),
                    Owner::Partition(_) | Owner::Slack(_) => {
                        let i = idx.unwrap();
                        let part = &parts[i];
                        let pos = part.position_of(c as u32).ok_or(PlanError::BadSetting {
                            setting: "plan puts a partition on a pCPU it was not granted (pcpu)",
                            value: c as Tick,
                        })?;
                        touched.push(i);
                        if let Owner::Partition(_) = slot.owner {
                            policies[i].subdivide(part, pos, slot.length, occurrences[i], &mut subs);
                            occurrences[i] += 1;
                        } else {
                            PerPcpuRoundRobin.subdivide(part, pos, slot.length, slack_occurrences[i], &mut subs);
                            slack_occurrences[i] += 1;
                        }
                    }
                }
                for s in &subs {
                    let run = match (s.vcpu, slot.owner.partition()) {
                        (Some(vcpu), Some(partition)) => Some(VcpuRef { partition, vcpu }),
                        _ => None,
                    };
                    let account = match run {
                        Some(r) => Account::Guest(r.partition),
                        None => Account::Idle,
                    };
                    let (offset, end) = (slot.offset + s.start, slot.offset + s.start + s.length);
                    if s.length == 0 {
                        continue;
                    }
                    match entries.last_mut() {
                        Some(last) if last.run == run && last.account == account && last.end == offset => {
                            last.end = end
                        }
                        _ => entries.push(DispatchEntry { offset, end, run, account }),
                    }
                }
            }
            let slack_ring = build_slack_ring(c as u32, parts);
            pcpus.push(PcpuTable { entries, slack_ring });
        }
        Ok(DispatchTables { frame: plan.frame, pcpus })
    }

    /// The same tables with every time multiplied by `ticks_per_unit` (planned in
    /// microseconds, run in TSC cycles): exact, so a plan checked in one unit is the plan run
    /// in the other.
    pub fn scaled(&self, ticks_per_unit: Tick) -> DispatchTables {
        let pcpus = self
            .pcpus
            .iter()
            .map(|t| PcpuTable {
                entries: t
                    .entries
                    .iter()
                    .map(|e| DispatchEntry { offset: e.offset * ticks_per_unit, end: e.end * ticks_per_unit, ..*e })
                    .collect(),
                slack_ring: t.slack_ring.clone(),
            })
            .collect();
        DispatchTables { frame: self.frame * ticks_per_unit, pcpus }
    }

    /// A state machine for `pcpu`, phase-locked to the shared release time `t0`.
    pub fn dispatcher(&self, pcpu: usize, t0: Tick) -> PcpuDispatcher<'_> {
        PcpuDispatcher::new(&self.pcpus[pcpu], self.frame, t0)
    }

    /// Every slot boundary of any pCPU from `t0` on: the times at which one timing pCPU must
    /// tell the others that a slot has ended (`ipi-gang`).
    pub fn boundary_clock(&self, t0: Tick) -> BoundaryClock {
        let mut offsets: Vec<Tick> = self.pcpus.iter().flat_map(|t| t.entries.iter().map(|e| e.end)).collect();
        offsets.push(self.frame);
        offsets.sort_unstable();
        offsets.dedup();
        BoundaryClock { offsets, frame: self.frame, t0 }
    }
}

/// The union of all pCPUs' slot boundaries, repeating every frame from `t0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundaryClock {
    /// Offsets in `(0, frame]`, sorted; the frame's end is always one.
    offsets: Vec<Tick>,
    frame: Tick,
    t0: Tick,
}

impl BoundaryClock {
    /// The first boundary after `now` (`t0` itself before the release).
    pub fn next_after(&self, now: Tick) -> Tick {
        if now < self.t0 {
            return self.t0;
        }
        let into_frame = (now - self.t0) % self.frame;
        let frame_start = now - into_frame;
        let next = self.offsets.partition_point(|&o| o <= into_frame);
        frame_start + self.offsets[next]
    }
}

/// Smooth weighted round-robin over the soft vCPUs homed on `pcpu` (vCPU i lives on its
/// partition's (i mod n)-th pCPU), weighted by the partition's share split among them.
fn build_slack_ring(pcpu: u32, parts: &[FlatPartition]) -> Vec<(VcpuRef, Account)> {
    let mut cands: Vec<(VcpuRef, Account, i64)> = Vec::new();
    for p in parts {
        let EffectiveReservation::Soft { share_ppm } = p.reservation else { continue };
        let Some(pos) = p.position_of(pcpu) else { continue };
        let n = p.pcpus.len() as u32;
        let homed: Vec<u32> = (0..p.vcpus).filter(|i| i % n == pos as u32).collect();
        let acct = Account::Guest(p.id);
        for &v in &homed {
            let w = (share_ppm as i64 / homed.len() as i64).max(1);
            cands.push((VcpuRef { partition: p.id, vcpu: v }, acct, w));
        }
    }
    if cands.len() >= SLACK_RING_LEN {
        return cands.into_iter().map(|(r, a, _)| (r, a)).collect();
    }
    let total: i64 = cands.iter().map(|c| c.2).sum();
    let mut current = vec![0i64; cands.len()];
    let mut ring = Vec::with_capacity(SLACK_RING_LEN);
    if cands.is_empty() {
        return ring;
    }
    for _ in 0..SLACK_RING_LEN {
        for (cur, c) in current.iter_mut().zip(&cands) {
            *cur += c.2;
        }
        let best = (0..cands.len()).max_by_key(|&i| (current[i], core::cmp::Reverse(i))).unwrap();
        current[best] -= total;
        ring.push((cands[best].0, cands[best].1));
    }
    ring
}

/// What a pCPU does until `next_deadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The vCPU to run, or `None` (idle: halt the pCPU until the deadline).
    pub run: Option<VcpuRef>,
    /// Account to charge for the time until the next decision: `Guest(p)` when a vCPU of `p`
    /// runs (own slot or lent slack), `Idle` when nothing does.
    pub account: Account,
    /// Absolute time of the next slot boundary (arm the timer for it).
    pub next_deadline: Tick,
    /// The time is slack lent from the slot's owner.
    pub lent: bool,
}

/// The per-pCPU runtime state machine. Pure: it reads its table and a clock value given to it.
#[derive(Debug, Clone)]
pub struct PcpuDispatcher<'t> {
    table: &'t PcpuTable,
    frame: Tick,
    t0: Tick,
    index: usize,
    frame_start: Tick,
    started: bool,
    slack_cursor: usize,
    lent: Option<VcpuRef>,
}

impl<'t> PcpuDispatcher<'t> {
    pub fn new(table: &'t PcpuTable, frame: Tick, t0: Tick) -> Self {
        PcpuDispatcher { table, frame, t0, index: 0, frame_start: t0, started: false, slack_cursor: 0, lent: None }
    }

    fn entry(&self) -> &DispatchEntry {
        &self.table.entries[self.index]
    }

    fn deadline(&self) -> Tick {
        self.frame_start + self.entry().end
    }

    /// Positions the cursor on the entry containing `now` (used at start and after a long stall).
    fn locate(&mut self, now: Tick) {
        let rel = (now - self.t0) % self.frame;
        self.frame_start = now - rel;
        self.index = self.table.entries.partition_point(|e| e.end <= rel);
    }

    /// The slot owner's decision for the current entry (ignores any lending).
    pub fn owner_decision(&self) -> Decision {
        let e = self.entry();
        Decision { run: e.run, account: e.account, next_deadline: self.deadline(), lent: false }
    }

    /// At a timer boundary: what runs now and the next deadline. Before `t0` the pCPU idles.
    /// The normal case is one cursor step; if `now` is more than one slot late (a stall), the
    /// cursor is re-located by a binary search over this pCPU's entries. A call before the
    /// current deadline returns the current decision unchanged. If `run` is `None` or names a
    /// halted vCPU, the caller follows up with `on_halt` to lend the slot.
    pub fn on_boundary(&mut self, now: Tick) -> Decision {
        if now < self.t0 || self.table.entries.is_empty() {
            return Decision { run: None, account: Account::Idle, next_deadline: self.t0, lent: false };
        }
        if !self.started {
            self.started = true;
            self.locate(now);
            self.lent = None;
            return self.owner_decision();
        }
        if now < self.deadline() {
            return self.current();
        }
        self.index += 1;
        if self.index == self.table.entries.len() {
            self.index = 0;
            self.frame_start += self.frame;
        }
        if now >= self.deadline() {
            self.locate(now);
        }
        self.lent = None;
        self.owner_decision()
    }

    /// Ends any lending: the slot's owner decision is back in force.
    pub fn reclaim(&mut self) -> Decision {
        self.lent = None;
        self.owner_decision()
    }

    /// The decision in force (the lent vCPU if slack is lent).
    pub fn current(&self) -> Decision {
        match self.lent {
            Some(v) => Decision {
                run: Some(v),
                account: Account::Guest(v.partition),
                next_deadline: self.deadline(),
                lent: true,
            },
            None => self.owner_decision(),
        }
    }

    /// The running vCPU halted (or the slot has nobody to run): lend the rest of the slot to the
    /// next runnable soft vCPU of this pCPU's weighted ring, else idle. Decided locally; the
    /// ring scan is bounded by the ring length, not by the number of partitions.
    pub fn on_halt(&mut self, now: Tick, runnable: impl Fn(VcpuRef) -> bool) -> Decision {
        if now >= self.deadline() && self.started {
            self.on_boundary(now);
        }
        let halted = self.lent.or(self.entry().run);
        let ring = &self.table.slack_ring;
        for k in 0..ring.len() {
            let (v, account) = ring[(self.slack_cursor + k) % ring.len()];
            if Some(v) != halted && runnable(v) {
                self.slack_cursor = (self.slack_cursor + k + 1) % ring.len();
                self.lent = Some(v);
                return Decision { run: Some(v), account, next_deadline: self.deadline(), lent: true };
            }
        }
        self.lent = None;
        Decision { run: None, account: Account::Idle, next_deadline: self.deadline(), lent: false }
    }
}
