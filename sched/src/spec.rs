//! The planner's time unit and errors. Its input is `reservations::FlatPartition` (one leaf
//! partition with its effective reservation, in ticks after `EffectiveReservation::in_ticks`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

pub use reservations::{EffectiveReservation, FlatPartition, PartitionId};

/// Abstract time unit: TSC cycles in the hypervisor, nanoseconds in the simulator.
pub type Tick = u64;

/// Why a plan could not be built. Every variant names the partition (or setting) at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    NoPcpus,
    DuplicateId {
        id: PartitionId,
        name: String,
    },
    NoPcpusGranted {
        partition: String,
    },
    PcpusNotSortedUnique {
        partition: String,
    },
    PcpuOutOfRange {
        partition: String,
        pcpu: u32,
        pcpu_count: u32,
    },
    NoVcpus {
        partition: String,
    },
    BadHardReservation {
        partition: String,
        budget: Tick,
        period: Tick,
    },
    BadSoftShare {
        partition: String,
        share_ppm: u32,
    },
    /// The major frame is not a whole number of this period.
    PeriodDoesNotDivideFrame {
        partition: String,
        period: Tick,
        frame: Tick,
    },
    /// LCM of the periods overflowed or exceeds `max_frame`.
    FrameTooLong {
        partition: String,
        frame: u128,
        max_frame: Tick,
    },
    BadSetting {
        setting: &'static str,
        value: Tick,
    },
    /// The partition's budget does not fit in one of its periods on the given pCPUs.
    Infeasible {
        partition: String,
        window_start: Tick,
        window_end: Tick,
        needed: Tick,
        free: Tick,
        pcpus: Vec<u32>,
    },
    /// The nested policy cannot map this partition (e.g. `Gang` with more vCPUs than pCPUs).
    PolicyMismatch {
        partition: String,
        policy: &'static str,
        reason: &'static str,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use PlanError::*;
        match self {
            NoPcpus => write!(f, "plan: pcpu_count is 0"),
            DuplicateId { id, name } => write!(f, "partition '{name}': id {id} is used twice"),
            NoPcpusGranted { partition } => write!(f, "partition '{partition}': no pCPUs granted"),
            PcpusNotSortedUnique { partition } => {
                write!(f, "partition '{partition}': pCPU list must be sorted and unique")
            }
            PcpuOutOfRange { partition, pcpu, pcpu_count } => {
                write!(f, "partition '{partition}': pCPU {pcpu} out of range (machine has {pcpu_count})")
            }
            NoVcpus { partition } => write!(f, "partition '{partition}': 0 vCPUs"),
            BadHardReservation { partition, budget, period } => write!(
                f,
                "partition '{partition}': hard reservation budget {budget} / period {period} \
                 needs 0 < budget <= period"
            ),
            BadSoftShare { partition, share_ppm } => {
                write!(f, "partition '{partition}': soft share {share_ppm} ppm must be in 1..=1000000")
            }
            PeriodDoesNotDivideFrame { partition, period, frame } => {
                write!(f, "partition '{partition}': period {period} does not divide the major frame {frame}")
            }
            FrameTooLong { partition, frame, max_frame } => write!(
                f,
                "partition '{partition}': its period makes the major frame {frame} \
                 (> max {max_frame}); use harmonic periods"
            ),
            BadSetting { setting, value } => write!(f, "planner setting {setting} = {value} is invalid"),
            Infeasible { partition, window_start, window_end, needed, free, pcpus } => write!(
                f,
                "partition '{partition}': infeasible: needs {needed} in [{window_start}, \
                 {window_end}) on pCPUs {pcpus:?} but only {free} is free on all of them"
            ),
            PolicyMismatch { partition, policy, reason } => {
                write!(f, "partition '{partition}': nested policy {policy}: {reason}")
            }
        }
    }
}
