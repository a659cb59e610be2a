//! What the tree is built from: a description of groups and partitions with indices instead
//! of names. The config crate converts a parsed file into this; the simulator and tests build
//! it directly. Nothing here is trusted: [`crate::Tree::build`] checks all of it.

use alloc::string::String;
use alloc::vec::Vec;

/// Microseconds. Every time in the tree (budgets, periods, the major frame) uses this unit.
pub type Micros = u64;

/// How much of its parent a node asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// `budget_us` in every `period_us` on each pCPU the node holds. Never exceeded, never
    /// revoked: only admitted where the whole chain up to the machine is guaranteed.
    Hard { budget_us: Micros, period_us: Micros },
    /// A fixed percentage of the parent's capacity on each pCPU (guaranteed if the parent is).
    FixedShare { percent: u32 },
    /// A weight in the parent's currency: the capacity the parent has left after its hard and
    /// fixed children is divided among the weighted siblings in proportion to their weights.
    Weight(u32),
}

/// Which kinds of reservation a group accepts from its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChildPolicy {
    /// Any mix of hard, fixed-share and weighted children.
    #[default]
    Any,
    /// Only `FixedShare` children.
    FixedShare,
    /// Only `Weight` children (proportional share).
    Weighted,
    /// Only `Hard` children (budget/period, EDF-style).
    BudgetPeriod,
}

impl ChildPolicy {
    pub fn accepts(self, reservation: &Reservation) -> bool {
        match self {
            ChildPolicy::Any => true,
            ChildPolicy::FixedShare => matches!(reservation, Reservation::FixedShare { .. }),
            ChildPolicy::Weighted => matches!(reservation, Reservation::Weight(_)),
            ChildPolicy::BudgetPeriod => matches!(reservation, Reservation::Hard { .. }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChildPolicy::Any => "any",
            ChildPolicy::FixedShare => "fixed-share",
            ChildPolicy::Weighted => "weighted",
            ChildPolicy::BudgetPeriod => "budget-period",
        }
    }
}

/// How a partition maps its vCPUs onto the pCPUs it holds, inside its own slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NestedPolicy {
    /// One vCPU per pCPU, all running at once (needs vCPUs == pCPUs).
    #[default]
    Gang,
    /// More vCPUs than pCPUs: the slot is cut into sub-slices and a rotating subset of the
    /// vCPUs runs as a gang in each.
    RoundRobinGang,
}

impl NestedPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NestedPolicy::Gang => "gang",
            NestedPolicy::RoundRobinGang => "round-robin-gang",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub name: String,
    /// Index into [`TreeSpec::groups`]; `None`: a child of the machine.
    pub parent: Option<usize>,
    pub reservation: Reservation,
    /// The pCPUs the group may hand to its children; `None`: the union of its children's.
    pub pcpus: Option<Vec<u32>>,
    pub children: ChildPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpec {
    pub name: String,
    /// Index into [`TreeSpec::groups`]; `None`: a child of the machine.
    pub group: Option<usize>,
    pub vcpus: u32,
    pub pcpus: Vec<u32>,
    pub reservation: Reservation,
    pub nested: NestedPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSpec {
    /// The cyclic schedule's length; every period must divide it.
    pub major_frame_us: Micros,
    /// Number of pCPUs of the machine when known (at boot); `None` on a host check without a
    /// machine description, which skips the existence check.
    pub pcpu_count: Option<u32>,
    /// Whether leaves are gang-dispatched (same interval on all their pCPUs) or each pCPU
    /// time-slices independently (the baseline).
    pub gang: bool,
    pub groups: Vec<GroupSpec>,
    pub partitions: Vec<PartitionSpec>,
}
