//! The dispatch plan of a validated config: the planner, the table compiler and each vCPU's
//! home pCPU, exactly as the image runs them at start, in microseconds (the image scales the
//! tables to TSC cycles with `DispatchTables::scaled`). Because the check runs this, a config
//! the check accepts can be planned at boot; one that cannot is rejected with the partition.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use reservations::Tree;
use sched::{
    DispatchTables, FlatPartition, Gang, IndependentConfig, NestedPolicy, PerPcpuRoundRobin, PlanConfig, PlanError,
    RoundRobinGang, VcpuRef,
};

use crate::schema::Config;

/// Tables (in microseconds) and, per partition and vCPU, the one pCPU it runs on (its VMCS
/// stays loaded there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    pub tables: DispatchTables,
    pub homes: Vec<Vec<usize>>,
}

/// Why a config cannot be planned: the partition (index in `config.partitions`; `None` for
/// a problem of the whole config), the field to point at, and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanFailure {
    pub partition: Option<usize>,
    pub field: &'static str,
    pub message: String,
}

/// Plans `config` (admitted as `tree`) on `pcpus` pCPUs.
pub fn plan(config: &Config, tree: &Tree, pcpus: u32) -> Result<DispatchPlan, PlanFailure> {
    let index_of = |name: &str| config.partitions.iter().position(|p| p.name == name);
    let planner_failure = |e: PlanError| {
        let (name, field) = match &e {
            PlanError::PolicyMismatch { partition, .. } => (partition.as_str(), "policy"),
            PlanError::Infeasible { partition, .. }
            | PlanError::PeriodDoesNotDivideFrame { partition, .. }
            | PlanError::FrameTooLong { partition, .. }
            | PlanError::BadHardReservation { partition, .. }
            | PlanError::BadSoftShare { partition, .. } => (partition.as_str(), "reservation"),
            PlanError::NoPcpusGranted { partition }
            | PlanError::PcpusNotSortedUnique { partition }
            | PlanError::PcpuOutOfRange { partition, .. } => (partition.as_str(), "pcpus"),
            PlanError::NoVcpus { partition } | PlanError::DuplicateId { name: partition, .. } => {
                (partition.as_str(), "vcpus")
            }
            PlanError::NoPcpus | PlanError::BadSetting { .. } => ("", "major_frame_us"),
        };
        PlanFailure { partition: index_of(name), field, message: format!("the planner cannot place it: {e}") }
    };
    let specs: Vec<FlatPartition> = tree.flatten().iter().map(FlatPartition::clone).collect();
    let frame = config.hypervisor.major_frame_us;
    let plan_config = PlanConfig { frame: Some(frame), ..PlanConfig::new(pcpus, frame) };
    let plan = if config.hypervisor.policy.aligned() {
        sched::plan_gang(&specs, &plan_config)
    } else {
        // The baseline: each pCPU round-robins its vCPUs over one frame, pCPUs staggered.
        sched::plan_independent(&specs, &plan_config, &IndependentConfig { cycle: frame, seed: 1, shuffle: false })
    }
    .map_err(planner_failure)?;
    // Each partition's vCPUs share its slots by its own `policy` (gang partitions only: the
    // check refuses a policy elsewhere).
    let configured = |p: &FlatPartition| -> &'static dyn NestedPolicy {
        static ROUND_ROBIN_GANG: RoundRobinGang = RoundRobinGang { min_subslice: 1 };
        match (p.gang, config.partitions[p.id as usize].policy) {
            (false, _) => &PerPcpuRoundRobin,
            (true, reservations::NestedPolicy::Gang) => &Gang,
            (true, reservations::NestedPolicy::RoundRobinGang) => &ROUND_ROBIN_GANG,
        }
    };
    let tables = DispatchTables::compile_with(&plan, &specs, &configured).map_err(planner_failure)?;
    let homes = homes(config, &tables)?;
    Ok(DispatchPlan { tables, homes })
}

/// Each vCPU's one home pCPU: where the tables (owned slots and slack) run it.
fn homes(config: &Config, tables: &DispatchTables) -> Result<Vec<Vec<usize>>, PlanFailure> {
    let mut homes: Vec<Vec<Option<usize>>> = config.partitions.iter().map(|p| vec![None; p.vcpus as usize]).collect();
    for (pcpu, table) in tables.pcpus.iter().enumerate() {
        let scheduled = table.entries.iter().filter_map(|e| e.run).chain(table.slack_ring.iter().map(|s| s.0));
        for VcpuRef { partition, vcpu } in scheduled {
            let home = &mut homes[partition as usize][vcpu as usize];
            match *home {
                Some(h) if h != pcpu => {
                    return Err(PlanFailure {
                        partition: Some(partition as usize),
                        field: "vcpus",
                        message: format!(
                            "vCPU {vcpu} would run on pCPUs {h} and {pcpu}; vCPUs do not migrate between pCPUs: \
                             give it as many vCPUs as pCPUs, or a multiple of them"
                        ),
                    })
                }
                _ => *home = Some(pcpu),
            }
        }
    }
    homes
        .into_iter()
        .enumerate()
        .map(|(p, vcpus)| {
            vcpus
                .into_iter()
                .enumerate()
                .map(|(v, home)| {
                    home.ok_or_else(|| PlanFailure {
                        partition: Some(p),
                        field: "vcpus",
                        message: format!("vCPU {v} is never scheduled"),
                    })
                })
                .collect()
        })
        .collect()
}
