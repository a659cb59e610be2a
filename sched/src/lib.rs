//! Phalanx scheduling: the planner that builds phase-locked per-pCPU dispatch tables, the nested
//! per-partition policies, the pure per-pCPU runtime state machine the bare-metal dispatcher
//! calls, and the rules its slot loop follows between turns (`turns`). The discrete-event
//! simulator is its own crate (`sched/sim`, std): it drives the planner, tables and the same
//! `turns` rules, with models of what other hosts do on top (KVM, VMware). Accounting is
//! `reservations::Ledger` / `reservations::Account` (the one ledger the hypervisor also uses):
//! dispatch decisions name the `Account` to charge, the simulator keeps one `Ledger` per pCPU.
//!
//! Time is an abstract `Tick` (u64): plans are made in microseconds (the config check), the
//! hypervisor runs them scaled to TSC cycles, the simulator uses nanoseconds.
//! See `docs/scheduling.md`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod dispatch;
pub mod epoch;
pub mod nested;
pub mod plan;
pub mod rng;
pub mod spec;
pub mod turns;

pub use dispatch::{BoundaryClock, Decision, DispatchEntry, DispatchTables, PcpuDispatcher, PcpuTable, VcpuRef};
pub use epoch::Epoch;
pub use nested::{Gang, NestedPolicy, PerPcpuRoundRobin, RoundRobinGang, SubSlice};
pub use plan::{plan_gang, plan_independent, IndependentConfig, Owner, Plan, PlanConfig, Slot};
pub use spec::{EffectiveReservation, FlatPartition, PartitionId, PlanError, Tick};
pub use turns::{SlotTurns, TurnEnd};

#[cfg(test)]
mod tests;
