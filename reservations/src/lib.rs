//! Partition/reservation tree, admission control, budgets, accounting and statistics.
//!
//! - [`spec`]: what a tree is built from (the config crate converts into it).
//! - [`tree`]: admission control and each leaf's effective reservation; [`Tree::flatten`]
//!   produces the planner's input ([`flat`]).
//! - [`ledger`]: per-pCPU cycle accounting where every cycle has exactly one owner.
//! - [`trace`]: per-pCPU event trace with TSC stamps, and its console encoding.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod flat;
pub mod ledger;
pub mod spec;
pub mod trace;
pub mod tree;

pub use flat::{EffectiveReservation, FlatPartition, PartitionId};
pub use ledger::{Account, Ledger, MachineStats, PartitionStats, Tiling, Work};
pub use spec::{ChildPolicy, GroupSpec, Micros, NestedPolicy, PartitionSpec, Reservation, TreeSpec};
pub use tree::{AdmissionError, Field, Group, Leaf, NodeRef, Problem, Tree};

#[cfg(test)]
mod tests;
