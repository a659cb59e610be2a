//! Every pCPU's state, one `PerCpu` each, indexed by pCPU number (0 = BSP, then MADT order):
//! what the BSP and the other pCPUs read or write of it (its APIC ID, its bring-up mailbox,
//! its phase-test ticks, its VMX status and capabilities, the attention flag its siblings
//! raise, its dispatch results). State only its own loop touches stays in that loop.

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use spin::Mutex;
use vmx::VmxCapabilities;

/// Most pCPUs Phalanx manages (xAPIC IDs fit in a byte).
pub const MAX_CPUS: usize = 64;
/// Ticks of the boot-time phase-lock test.
pub const PHASE_TICKS: usize = 300;
/// Basic exit reasons tracked one by one (every one the SDM defines fits).
pub const EXIT_REASONS: usize = 80;

pub struct PerCpu {
    pub apic_id: AtomicU8,
    /// Bring-up work the BSP hands this AP (`smp`).
    pub mailbox: Mailbox,
    /// The phase-lock test: ticks taken and when each arrived (`phase`).
    pub phase_ticks: AtomicUsize,
    pub phase_arrivals: [AtomicU64; PHASE_TICKS],
    /// `vmx_root::VmxStatus` as a number, and the capability MSRs read at VMXON.
    pub vmx_status: AtomicU8,
    pub vmx_caps: Mutex<Option<VmxCapabilities>>,
    /// A sibling posted one of this pCPU's vCPUs an IPI or a start-up (with a kick).
    pub attention: AtomicBool,
    /// What this pCPU's slot loop hands to the BSP at the end of the run.
    pub dispatch_result: Mutex<Option<PcpuResult>>,
    /// Its trace buffer when the config asks for one (`trace`).
    pub trace: Mutex<Option<reservations::trace::TraceBuffer>>,
    /// The last EPT invalidation it did on request (`shared_memory`: a generation number).
    pub invept_done: AtomicU64,
    /// Its last switch of dispatch tables (`phases`), for the control channel's report.
    pub phase_switch: Mutex<crate::phases::SwitchReport>,
}

pub struct Mailbox {
    pub online: AtomicBool,
    /// A `fn(usize)` to run, as an address; 0 = none.
    pub work: AtomicUsize,
    pub posted: AtomicU64,
    pub done: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ExitStat {
    pub count: u64,
    /// Cycles from VM exit to the next VM entry (or the end of the turn).
    pub cycles: u64,
}

/// The first VM entry of a partition's vCPU in one slot on one pCPU.
#[derive(Debug, Clone, Copy)]
pub struct SlotEntry {
    pub slot_start: u64,
    pub partition: u32,
    pub entry_tsc: u64,
}

/// A pCPU's accounts where it started an epoch of dispatch tables.
#[derive(Debug, Clone)]
pub struct EpochMark {
    pub epoch: u32,
    /// Per partition, the cycles charged to it on this pCPU until then.
    pub charged: Vec<u64>,
}

/// What a pCPU's slot loop hands to the BSP at the end of the run.
pub struct PcpuResult {
    pub ledger: reservations::Ledger,
    pub exits: [ExitStat; EXIT_REASONS],
    /// Per partition, the exits (and their handling) inside its vCPUs' measurement windows.
    pub window_exits: Vec<[ExitStat; EXIT_REASONS]>,
    /// The preemption-timer exits that took a spin-wait sample, and their cost.
    pub spin_sample: ExitStat,
    pub slot_entries: Vec<SlotEntry>,
    pub epoch_marks: Vec<EpochMark>,
    pub guard_exits: u64,
    pub yields: u64,
    /// Cycles spent outside any charge by `phalanx.debug.uncharged_cycles`.
    pub injected_uncharged: u64,
}

static CPUS: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        apic_id: AtomicU8::new(0),
        mailbox: Mailbox {
            online: AtomicBool::new(false),
            work: AtomicUsize::new(0),
            posted: AtomicU64::new(0),
            done: AtomicU64::new(0),
        },
        phase_ticks: AtomicUsize::new(0),
        phase_arrivals: [const { AtomicU64::new(0) }; PHASE_TICKS],
        vmx_status: AtomicU8::new(0),
        vmx_caps: Mutex::new(None),
        attention: AtomicBool::new(false),
        dispatch_result: Mutex::new(None),
        trace: Mutex::new(None),
        invept_done: AtomicU64::new(0),
        phase_switch: Mutex::new(crate::phases::SwitchReport::EMPTY),
    }
}; MAX_CPUS];

/// pCPU `cpu`'s state.
pub fn of(cpu: usize) -> &'static PerCpu {
    &CPUS[cpu]
}
