//! The planner: builds, once, per-pCPU cyclic dispatch tables over a major frame.
//!
//! `plan_gang` is Phalanx's phase-locked plan: a gang partition holds the *same* interval on
//! every pCPU it has, every hard partition gets its budget inside every one of its periods, soft
//! shares get their share of every soft window, and what is left is lent to the soft partitions
//! of that pCPU in proportion to their shares. `plan_independent` is the baseline a KVM host
//! produces: every pCPU time-slices the vCPU threads it hosts, weighted by share, with its own
//! arbitrary phase and order, and no alignment between pCPUs.

use alloc::vec;
use alloc::vec::Vec;

use crate::rng::SplitMix64;
use crate::spec::{EffectiveReservation, FlatPartition, PartitionId, PlanError, Tick};

/// Planner settings.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    pub pcpu_count: u32,
    /// Major frame; `None` means the LCM of all hard periods and `soft_period`.
    pub frame: Option<Tick>,
    /// Window in which each soft partition receives its share (its "period").
    pub soft_period: Tick,
    /// Upper bound on the major frame (guards against non-harmonic periods exploding the LCM).
    pub max_frame: Tick,
}

impl PlanConfig {
    pub fn new(pcpu_count: u32, soft_period: Tick) -> Self {
        PlanConfig { pcpu_count, frame: None, soft_period, max_frame: 1 << 40 }
    }
}

/// Settings of the independent (KVM-like) baseline.
#[derive(Debug, Clone)]
pub struct IndependentConfig {
    /// Length of one round-robin cycle on a pCPU (CFS's scheduling latency).
    pub cycle: Tick,
    /// Seed for each pCPU's phase (and thread order when shuffled).
    pub seed: u64,
    /// Shuffle the thread order per pCPU (fully random relative phases of a partition's
    /// vCPUs); otherwise threads keep the same order and pCPU c starts its cycle at
    /// `c * cycle / P` plus a random part below `cycle / P` (evenly staggered phases).
    pub shuffle: bool,
}

/// Who a slot belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// Reserved time of a partition; its nested policy decides which vCPU runs here.
    Partition(PartitionId),
    /// One vCPU thread (independent baseline: the host scheduler picks threads, not partitions).
    Vcpu {
        partition: PartitionId,
        vcpu: u32,
    },
    /// Unreserved time lent to a soft partition in proportion to its share.
    Slack(PartitionId),
    Idle,
}

impl Owner {
    pub fn partition(&self) -> Option<PartitionId> {
        match *self {
            Owner::Partition(p) | Owner::Slack(p) => Some(p),
            Owner::Vcpu { partition, .. } => Some(partition),
            Owner::Idle => None,
        }
    }
}

/// One entry of a pCPU's cyclic table: `[offset, offset + length)` within the major frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub offset: Tick,
    pub length: Tick,
    pub owner: Owner,
}

impl Slot {
    pub fn end(&self) -> Tick {
        self.offset + self.length
    }
}

/// Per-pCPU tables over one major frame. Each pCPU's slots are sorted and tile `[0, frame)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub frame: Tick,
    pub pcpus: Vec<Vec<Slot>>,
}

impl Plan {
    /// Owner changes per frame summed over pCPUs (counting the wrap from the last slot to the
    /// first): the number of context switches the table itself forces.
    pub fn switches(&self) -> usize {
        self.pcpus
            .iter()
            .map(|slots| {
                let n = slots.len();
                (0..n).filter(|&i| n > 1 && slots[i].owner != slots[(i + 1) % n].owner).count()
            })
            .sum()
    }

    /// Ticks of `[start, end)` on `pcpu` whose slot owner satisfies `pred`.
    pub fn time_in(&self, pcpu: usize, start: Tick, end: Tick, pred: impl Fn(&Owner) -> bool) -> Tick {
        self.pcpus[pcpu]
            .iter()
            .filter(|s| pred(&s.owner))
            .map(|s| s.end().min(end).saturating_sub(s.offset.max(start)))
            .sum()
    }
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn validate(parts: &[FlatPartition], cfg: &PlanConfig) -> Result<(), PlanError> {
    if cfg.pcpu_count == 0 {
        return Err(PlanError::NoPcpus);
    }
    if cfg.soft_period == 0 {
        return Err(PlanError::BadSetting { setting: "soft_period", value: 0 });
    }
    let mut ids: Vec<(PartitionId, usize)> = parts.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
    ids.sort_unstable();
    for w in ids.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(PlanError::DuplicateId { id: w[1].0, name: parts[w[1].1].name.clone() });
        }
    }
    for p in parts {
        let name = || p.name.clone();
        if p.pcpus.is_empty() {
            return Err(PlanError::NoPcpusGranted { partition: name() });
        }
        if p.pcpus.windows(2).any(|w| w[0] >= w[1]) {
            return Err(PlanError::PcpusNotSortedUnique { partition: name() });
        }
        if let Some(&bad) = p.pcpus.iter().find(|&&c| c >= cfg.pcpu_count) {
            return Err(PlanError::PcpuOutOfRange { partition: name(), pcpu: bad, pcpu_count: cfg.pcpu_count });
        }
        if p.vcpus == 0 {
            return Err(PlanError::NoVcpus { partition: name() });
        }
        match p.reservation {
            EffectiveReservation::Hard { budget, period } if budget == 0 || budget > period => {
                return Err(PlanError::BadHardReservation { partition: name(), budget, period })
            }
            EffectiveReservation::Soft { share_ppm } if share_ppm == 0 || share_ppm > 1_000_000 => {
                return Err(PlanError::BadSoftShare { partition: name(), share_ppm })
            }
            _ => {}
        }
    }
    Ok(())
}

/// The major frame: `cfg.frame`, or the LCM of every hard period, `soft_period` and `extra`.
fn major_frame(parts: &[FlatPartition], cfg: &PlanConfig, extra: Option<Tick>) -> Result<Tick, PlanError> {
    let period_of = |p: &FlatPartition| match p.reservation {
        EffectiveReservation::Hard { period, .. } => period,
        EffectiveReservation::Soft { .. } => cfg.soft_period,
    };
    if let Some(frame) = cfg.frame {
        if frame == 0 {
            return Err(PlanError::BadSetting { setting: "frame", value: 0 });
        }
        for p in parts {
            let period = period_of(p);
            if frame % period != 0 {
                return Err(PlanError::PeriodDoesNotDivideFrame { partition: p.name.clone(), period, frame });
            }
        }
        if let Some(e) = extra {
            if e == 0 || frame % e != 0 {
                return Err(PlanError::BadSetting { setting: "independent cycle (must divide frame)", value: e });
            }
        }
        return Ok(frame);
    }
    let mut frame: u128 = extra.unwrap_or(1) as u128;
    if extra == Some(0) {
        return Err(PlanError::BadSetting { setting: "independent cycle", value: 0 });
    }
    for p in parts {
        let period = period_of(p) as u128;
        frame = frame / gcd(frame, period) * period;
        if frame > cfg.max_frame as u128 {
            return Err(PlanError::FrameTooLong { partition: p.name.clone(), frame, max_frame: cfg.max_frame });
        }
    }
    if parts.is_empty() {
        frame = frame.max(cfg.soft_period as u128);
    }
    Ok(frame as Tick)
}

/// Allocated slots per pCPU while planning (sorted, disjoint; gaps are free).
struct Timeline {
    busy: Vec<Vec<Slot>>,
}

impl Timeline {
    /// Free intervals of `pcpu` inside `[ws, we)`, appended to `out`.
    fn free_in(&self, pcpu: usize, ws: Tick, we: Tick, out: &mut Vec<(Tick, Tick)>) {
        let slots = &self.busy[pcpu];
        let mut i = slots.partition_point(|s| s.end() <= ws);
        let mut cursor = ws;
        while cursor < we {
            match slots.get(i) {
                Some(s) if s.offset < we => {
                    if s.offset > cursor {
                        out.push((cursor, s.offset));
                    }
                    cursor = cursor.max(s.end());
                    i += 1;
                }
                _ => {
                    out.push((cursor, we));
                    cursor = we;
                }
            }
        }
    }

    /// Free intervals common to all of `pcpus` inside `[ws, we)`.
    fn common_free(&self, pcpus: &[u32], ws: Tick, we: Tick) -> Vec<(Tick, Tick)> {
        let mut acc = Vec::new();
        self.free_in(pcpus[0] as usize, ws, we, &mut acc);
        let mut other = Vec::new();
        for &c in &pcpus[1..] {
            if acc.is_empty() {
                break;
            }
            other.clear();
            self.free_in(c as usize, ws, we, &mut other);
            let (mut i, mut j, mut merged) = (0, 0, Vec::with_capacity(acc.len()));
            while i < acc.len() && j < other.len() {
                let (a0, a1) = acc[i];
                let (b0, b1) = other[j];
                let (s, e) = (a0.max(b0), a1.min(b1));
                if s < e {
                    merged.push((s, e));
                }
                if a1 < b1 {
                    i += 1;
                } else {
                    j += 1;
                }
            }
            acc = merged;
        }
        acc
    }

    fn occupy(&mut self, pcpu: usize, slot: Slot) {
        let slots = &mut self.busy[pcpu];
        let at = slots.partition_point(|s| s.offset < slot.offset);
        slots.insert(at, slot);
    }
}

/// Puts `budget` of `part` in every `[k*period, (k+1)*period)` window, on the same interval of
/// all pCPUs in `set`. Earliest fit, one contiguous piece when possible (fewer switches).
fn place_windows(
    tl: &mut Timeline,
    part: &FlatPartition,
    set: &[u32],
    budget: Tick,
    period: Tick,
    frame: Tick,
) -> Result<(), PlanError> {
    for k in 0..frame / period {
        let (ws, we) = (k * period, (k + 1) * period);
        let free = tl.common_free(set, ws, we);
        let pieces: Vec<(Tick, Tick)> = match free.iter().find(|&&(s, e)| e - s >= budget) {
            Some(&(s, _)) => vec![(s, s + budget)],
            None => {
                let total: Tick = free.iter().map(|(s, e)| e - s).sum();
                if total < budget {
                    return Err(PlanError::Infeasible {
                        partition: part.name.clone(),
                        window_start: ws,
                        window_end: we,
                        needed: budget,
                        free: total,
                        pcpus: set.to_vec(),
                    });
                }
                let mut left = budget;
                let mut v = Vec::new();
                for &(s, e) in &free {
                    if left == 0 {
                        break;
                    }
                    let take = (e - s).min(left);
                    v.push((s, s + take));
                    left -= take;
                }
                v
            }
        };
        for (s, e) in pieces {
            for &c in set {
                tl.occupy(c as usize, Slot { offset: s, length: e - s, owner: Owner::Partition(part.id) });
            }
        }
    }
    Ok(())
}

/// Merges adjacent slots with the same owner.
fn merge(slots: &mut Vec<Slot>) {
    let mut out: Vec<Slot> = Vec::with_capacity(slots.len());
    for s in slots.drain(..) {
        if s.length == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.owner == s.owner && last.end() == s.offset => last.length += s.length,
            _ => out.push(s),
        }
    }
    *slots = out;
}

/// Builds Phalanx's phase-locked plan. See the module documentation.
pub fn plan_gang(parts: &[FlatPartition], cfg: &PlanConfig) -> Result<Plan, PlanError> {
    validate(parts, cfg)?;
    let frame = major_frame(parts, cfg, None)?;
    let p_count = cfg.pcpu_count as usize;
    let mut tl = Timeline { busy: vec![Vec::new(); p_count] };

    // Shortest period first (rate-monotonic order: with harmonic periods every window of a
    // longer period then sees the same free pattern, so a single pCPU is feasible up to 100%);
    // hard before soft at equal periods; wider gangs first, since they are the hardest to align.
    let mut order: Vec<&FlatPartition> = parts.iter().collect();
    let key = |p: &FlatPartition| match p.reservation {
        EffectiveReservation::Hard { budget, period } => {
            (period, 0u8, core::cmp::Reverse(p.pcpus.len()), core::cmp::Reverse(budget), p.id)
        }
        EffectiveReservation::Soft { share_ppm } => {
            (cfg.soft_period, 1u8, core::cmp::Reverse(p.pcpus.len()), core::cmp::Reverse(share_ppm as u64), p.id)
        }
    };
    order.sort_by_key(|p| key(p));

    for p in &order {
        let (budget, period) = match p.reservation {
            EffectiveReservation::Hard { budget, period } => (budget, period),
            EffectiveReservation::Soft { share_ppm } => {
                ((cfg.soft_period as u128 * share_ppm as u128 / 1_000_000) as Tick, cfg.soft_period)
            }
        };
        if budget == 0 {
            continue; // a share smaller than one tick per window: slack only
        }
        if p.gang {
            place_windows(&mut tl, p, &p.pcpus, budget, period, frame)?;
        } else {
            for &c in &p.pcpus {
                place_windows(&mut tl, p, &[c], budget, period, frame)?;
            }
        }
    }

    // Soft partitions per pCPU, for lending the unreserved rest in proportion to their shares.
    let mut soft_on: Vec<Vec<(PartitionId, u64)>> = vec![Vec::new(); p_count];
    for p in parts {
        if let EffectiveReservation::Soft { share_ppm } = p.reservation {
            for &c in &p.pcpus {
                soft_on[c as usize].push((p.id, share_ppm as u64));
            }
        }
    }

    let mut pcpus = Vec::with_capacity(p_count);
    let mut gaps = Vec::new();
    for (c, busy) in tl.busy.iter().enumerate() {
        gaps.clear();
        tl.free_in(c, 0, frame, &mut gaps);
        let total_gap: Tick = gaps.iter().map(|(s, e)| e - s).sum();
        let mut slots: Vec<Slot> = Vec::with_capacity(busy.len() + gaps.len() + soft_on[c].len());
        slots.extend_from_slice(busy);
        let cands = &soft_on[c];
        if cands.is_empty() {
            slots.extend(gaps.iter().map(|&(s, e)| Slot { offset: s, length: e - s, owner: Owner::Idle }));
        } else {
            // Water-filling: candidate i receives exactly total_gap * w_i / W (the last takes the
            // rounding remainder), walking the gaps in order so pieces stay contiguous.
            let w_sum: u64 = cands.iter().map(|c| c.1).sum();
            let targets: Vec<Tick> = {
                let mut t: Vec<Tick> =
                    cands.iter().map(|&(_, w)| (total_gap as u128 * w as u128 / w_sum as u128) as Tick).collect();
                let given: Tick = t.iter().sum();
                *t.last_mut().unwrap() += total_gap - given;
                t
            };
            let (mut ci, mut got) = (0usize, 0 as Tick);
            for &(mut s, e) in gaps.iter() {
                while s < e {
                    while got >= targets[ci] && ci + 1 < cands.len() {
                        ci += 1;
                        got = 0;
                    }
                    let take = (e - s).min(targets[ci] - got).max(if ci + 1 == cands.len() { e - s } else { 0 });
                    let take = take.min(e - s);
                    slots.push(Slot { offset: s, length: take, owner: Owner::Slack(cands[ci].0) });
                    got += take;
                    s += take;
                }
            }
        }
        slots.sort_unstable_by_key(|s| s.offset);
        merge(&mut slots);
        pcpus.push(slots);
    }
    Ok(Plan { frame, pcpus })
}

/// Builds the independent baseline. See the module documentation.
pub fn plan_independent(parts: &[FlatPartition], cfg: &PlanConfig, ind: &IndependentConfig) -> Result<Plan, PlanError> {
    validate(parts, cfg)?;
    let frame = major_frame(parts, cfg, Some(ind.cycle))?;
    let p_count = cfg.pcpu_count as usize;
    let cycle = ind.cycle;
    // Threads per pCPU: vCPU i of a partition lives on its (i mod n)-th pCPU, like a pinned
    // vCPU thread; weight = the partition's per-pCPU share split among its threads there.
    let mut threads: Vec<Vec<(PartitionId, u32, u64)>> = vec![Vec::new(); p_count];
    for p in parts {
        let n = p.pcpus.len() as u32;
        for (pos, &c) in p.pcpus.iter().enumerate() {
            let here: Vec<u32> = (0..p.vcpus).filter(|i| i % n == pos as u32).collect();
            if here.is_empty() {
                continue;
            }
            let w = (p.reservation.ppm() / here.len() as u64).max(1);
            for v in here {
                threads[c as usize].push((p.id, v, w));
            }
        }
    }
    let mut pcpus = Vec::with_capacity(p_count);
    for (c, th) in threads.iter_mut().enumerate() {
        let mut rng = SplitMix64::new(ind.seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if th.is_empty() {
            pcpus.push(vec![Slot { offset: 0, length: frame, owner: Owner::Idle }]);
            continue;
        }
        // Arbitrary thread order and phase per pCPU: nothing aligns them across pCPUs.
        if ind.shuffle {
            for i in (1..th.len()).rev() {
                th.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let stagger = (cycle / p_count as Tick).max(1);
        let phase = (c as Tick * stagger + rng.below(stagger)) % cycle;
        let w_sum: u64 = th.iter().map(|t| t.2).sum();
        // Work-conserving like CFS: weights are normalised to the whole cycle.
        let mut pieces: Vec<(Tick, Tick, Owner)> = Vec::with_capacity(th.len());
        let mut at = 0;
        for (i, &(partition, vcpu, w)) in th.iter().enumerate() {
            let len = if i + 1 == th.len() { cycle - at } else { (cycle as u128 * w as u128 / w_sum as u128) as Tick };
            pieces.push((at, len, Owner::Vcpu { partition, vcpu }));
            at += len;
        }
        let mut slots = Vec::with_capacity(pieces.len() * (frame / cycle) as usize + 1);
        for k in 0..frame / cycle {
            for &(local, len, owner) in &pieces {
                if len == 0 {
                    continue;
                }
                let start = (k * cycle + phase + local) % frame;
                if start + len <= frame {
                    slots.push(Slot { offset: start, length: len, owner });
                } else {
                    slots.push(Slot { offset: start, length: frame - start, owner });
                    slots.push(Slot { offset: 0, length: start + len - frame, owner });
                }
            }
        }
        slots.sort_unstable_by_key(|s| s.offset);
        merge(&mut slots);
        pcpus.push(slots);
    }
    Ok(Plan { frame, pcpus })
}
