//! The flattened view of the partition tree that the planner (`sched`) consumes.
//!
//! The tree may be arbitrarily deep; the planner and the runtime never walk it.
//! Flattening resolves every leaf partition's effective reservation once, at plan time,
//! so that dispatch costs the same at any depth (HiRes: flatten, never walk).

extern crate alloc;
use alloc::string::String;
use alloc::vec::Vec;

/// Index of a leaf partition in the flattened list (also its account id).
pub type PartitionId = u32;

/// A leaf partition's effective reservation after flattening the hierarchy.
///
/// From [`crate::Tree::flatten`] the time unit is the microsecond (the config's unit); use
/// [`EffectiveReservation::in_ticks`] to convert to the planner's tick (TSC cycles, ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectiveReservation {
    /// Hard: `budget` time units in every `period`, on each pCPU it holds. Never exceeded,
    /// never revoked.
    Hard { budget: u64, period: u64 },
    /// Soft: a share of each of its pCPUs, in parts per million of the pCPU, already
    /// converted from the parent's currency (weights) into absolute terms.
    Soft { share_ppm: u32 },
}

/// One leaf partition as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatPartition {
    pub id: PartitionId,
    pub name: String,
    /// pCPU indices granted to the partition: sorted, unique.
    pub pcpus: Vec<u32>,
    pub vcpus: u32,
    /// Gang-scheduled: occupies the same interval on every pCPU in `pcpus`.
    pub gang: bool,
    pub reservation: EffectiveReservation,
    /// Depth in the tree (1 = child of the root); informative only.
    pub depth: u32,
}

impl EffectiveReservation {
    /// The same reservation with time measured in ticks of which there are `ticks_per_unit`
    /// per current unit (e.g. TSC cycles per microsecond). Shares are unit-free and unchanged.
    pub fn in_ticks(&self, ticks_per_unit: u64) -> EffectiveReservation {
        match *self {
            EffectiveReservation::Hard { budget, period } => EffectiveReservation::Hard {
                budget: budget.saturating_mul(ticks_per_unit),
                period: period.saturating_mul(ticks_per_unit),
            },
            EffectiveReservation::Soft { share_ppm } => EffectiveReservation::Soft { share_ppm },
        }
    }

    /// Fraction of one pCPU in parts per million.
    pub fn ppm(&self) -> u64 {
        match *self {
            EffectiveReservation::Hard { budget, period } => {
                if period == 0 {
                    0
                } else {
                    (budget as u128 * 1_000_000 / period as u128) as u64
                }
            }
            EffectiveReservation::Soft { share_ppm } => share_ppm as u64,
        }
    }
}

impl FlatPartition {
    /// Position of `pcpu` in this partition's pCPU list.
    pub fn position_of(&self, pcpu: u32) -> Option<usize> {
        self.pcpus.binary_search(&pcpu).ok()
    }
}
