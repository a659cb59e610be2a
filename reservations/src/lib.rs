//! Partition/reservation tree, admission control, budgets, accounting and statistics.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod flat;
pub use flat::{EffectiveReservation, FlatPartition, PartitionId};
