//! Nested per-partition policies: inside one slot of a partition, which of its vCPUs runs on
//! each of its pCPUs. Each pCPU asks independently (same slot length and occurrence number), so
//! a deterministic policy yields sub-slices that stay aligned across the partition's pCPUs.

use alloc::vec::Vec;

use crate::spec::{FlatPartition, Tick};

/// One piece of a slot: `[start, start + length)` relative to the slot's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubSlice {
    pub start: Tick,
    pub length: Tick,
    /// `None`: this pCPU has no vCPU of the partition to run here (time can be lent as slack).
    pub vcpu: Option<u32>,
}

/// Maps a partition's vCPUs onto the pCPUs of one of its slots.
pub trait NestedPolicy {
    fn name(&self) -> &'static str;
    /// Whether this policy can map `part` (checked once when compiling tables).
    fn check(&self, part: &FlatPartition) -> Result<(), &'static str>;
    /// Sub-slices covering `[0, slot_length)` for the pCPU at `position` in `part.pcpus`;
    /// `occurrence` counts this partition's slots on that pCPU since the frame start.
    fn subdivide(
        &self,
        part: &FlatPartition,
        position: usize,
        slot_length: Tick,
        occurrence: u64,
        out: &mut Vec<SubSlice>,
    );
}

/// Gang: vCPU i runs on the partition's i-th pCPU for the whole slot (needs vCPUs <= pCPUs).
pub struct Gang;

impl NestedPolicy for Gang {
    fn name(&self) -> &'static str {
        "gang"
    }
    fn check(&self, part: &FlatPartition) -> Result<(), &'static str> {
        if part.vcpus as usize > part.pcpus.len() {
            return Err("more vCPUs than pCPUs; use round-robin gang");
        }
        Ok(())
    }
    fn subdivide(&self, part: &FlatPartition, position: usize, slot_length: Tick, _occ: u64, out: &mut Vec<SubSlice>) {
        let vcpu = if (position as u32) < part.vcpus { Some(position as u32) } else { None };
        out.push(SubSlice { start: 0, length: slot_length, vcpu });
    }
}

/// Round-robin gang: with v vCPUs on n < v pCPUs, the slot is cut into ceil(v/n) equal
/// sub-slices; in each, a group of n consecutive vCPUs (mod v) runs at once, one per pCPU. The
/// first group rotates with the slot occurrence so every vCPU gets the same time in the long
/// run. If sub-slices would be shorter than `min_subslice`, one group runs per whole slot.
pub struct RoundRobinGang {
    pub min_subslice: Tick,
}

impl NestedPolicy for RoundRobinGang {
    fn name(&self) -> &'static str {
        "round-robin gang"
    }
    fn check(&self, _part: &FlatPartition) -> Result<(), &'static str> {
        Ok(())
    }
    fn subdivide(
        &self,
        part: &FlatPartition,
        position: usize,
        slot_length: Tick,
        occurrence: u64,
        out: &mut Vec<SubSlice>,
    ) {
        let (v, n) = (part.vcpus as u64, part.pcpus.len() as u64);
        if v <= n {
            return Gang.subdivide(part, position, slot_length, occurrence, out);
        }
        let groups = v.div_ceil(n);
        let per_slot = if slot_length / groups >= self.min_subslice.max(1) { groups } else { 1 };
        let piece = slot_length / per_slot;
        for j in 0..per_slot {
            let group = occurrence * per_slot + j;
            let vcpu = ((group * n + position as u64) % v) as u32;
            let start = j * piece;
            let length = if j + 1 == per_slot { slot_length - start } else { piece };
            out.push(SubSlice { start, length, vcpu: Some(vcpu) });
        }
    }
}

/// Non-gang partitions: the pCPU at `position` runs the vCPUs homed there (i mod n ==
/// position), one per slot, in turn.
pub struct PerPcpuRoundRobin;

impl NestedPolicy for PerPcpuRoundRobin {
    fn name(&self) -> &'static str {
        "per-pCPU round-robin"
    }
    fn check(&self, _part: &FlatPartition) -> Result<(), &'static str> {
        Ok(())
    }
    fn subdivide(
        &self,
        part: &FlatPartition,
        position: usize,
        slot_length: Tick,
        occurrence: u64,
        out: &mut Vec<SubSlice>,
    ) {
        let n = part.pcpus.len() as u32;
        let homed = (part.vcpus + n - 1 - position as u32) / n; // count of i < vcpus with i % n == position
        let vcpu = if homed == 0 { None } else { Some(position as u32 + n * (occurrence % homed as u64) as u32) };
        out.push(SubSlice { start: 0, length: slot_length, vcpu });
    }
}

/// The default choice: gang when every vCPU has its own pCPU, round-robin gang when not,
/// per-pCPU round-robin for non-gang partitions.
pub fn default_policy(part: &FlatPartition) -> &'static dyn NestedPolicy {
    static RR_GANG: RoundRobinGang = RoundRobinGang { min_subslice: 1 };
    if !part.gang {
        &PerPcpuRoundRobin
    } else if part.vcpus as usize <= part.pcpus.len() {
        &Gang
    } else {
        &RR_GANG
    }
}
