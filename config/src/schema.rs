//! The file's shape (serde, with spans kept for error messages) and the clean model the rest
//! of Phalanx uses.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ops::{Range, RangeInclusive};

use serde::Deserialize;
use toml::Spanned;

pub use reservations::{ChildPolicy, NestedPolicy, Reservation};

// ---------------------------------------------------------------- the file, as written

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields, expecting = "a config with [hypervisor], [[group]] and [[partition]] tables")]
pub(crate) struct RawConfig {
    pub hypervisor: Option<Spanned<RawHypervisor>>,
    #[serde(default)]
    pub group: Vec<Spanned<RawGroup>>,
    #[serde(default)]
    pub partition: Vec<Spanned<RawPartition>>,
    #[serde(default)]
    pub shared: Vec<Spanned<RawShared>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields, expecting = "a [[shared]] table")]
pub(crate) struct RawShared {
    pub name: Spanned<String>,
    pub size_mb: Spanned<u64>,
    pub owner: Spanned<String>,
    pub gpa: Spanned<u64>,
    #[serde(default)]
    pub readers: Vec<Spanned<String>>,
    #[serde(default)]
    pub writers: Vec<Spanned<String>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields, expecting = "a [hypervisor] table")]
pub(crate) struct RawHypervisor {
    pub major_frame_us: Option<Spanned<u64>>,
    pub policy: Option<Spanned<DispatchPolicy>>,
    pub stats_interval_ms: Option<Spanned<u64>>,
    pub run_ms: Option<Spanned<u64>>,
    pub skew_bound_us: Option<Spanned<u64>>,
    pub spin_sample_us: Option<Spanned<u64>>,
    pub trace_events: Option<Spanned<u64>>,
    pub control: Option<Spanned<ControlChannel>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields, expecting = "a [[group]] table")]
pub(crate) struct RawGroup {
    pub name: Spanned<String>,
    pub parent: Option<Spanned<String>>,
    pub reservation: Spanned<RawReservation>,
    pub pcpus: Option<Spanned<Vec<Spanned<u32>>>>,
    pub policy: Option<Spanned<RawChildPolicy>>,
    pub manager: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields, expecting = "a [[partition]] table")]
pub(crate) struct RawPartition {
    pub name: Spanned<String>,
    pub group: Option<Spanned<String>>,
    pub vcpus: Spanned<u32>,
    pub pcpus: Spanned<Vec<Spanned<u32>>>,
    pub memory_mb: Option<Spanned<u64>>,
    pub memory: Option<Spanned<RawMemory>>,
    pub reservation: Spanned<RawReservation>,
    pub policy: Option<Spanned<RawNestedPolicy>>,
    pub guest: Spanned<RawGuest>,
    pub devices: Option<Spanned<RawDevices>>,
    pub on_fault: Option<Spanned<OnFault>>,
    pub on_reboot: Option<Spanned<OnReboot>>,
    pub on_poweroff: Option<Spanned<OnPoweroff>>,
}

/// Exactly one of: `budget_us` + `period_us`, `share_percent`, `weight` (checked after
/// parsing, with a message that says so, rather than by an untagged enum whose serde error
/// would only say "did not match any variant").
#[derive(Deserialize, Clone)]
#[serde(
    deny_unknown_fields,
    expecting = "a table: { budget_us = B, period_us = P }, { share_percent = S } or { weight = W }"
)]
pub(crate) struct RawReservation {
    pub budget_us: Option<Spanned<u64>>,
    pub period_us: Option<Spanned<u64>>,
    pub share_percent: Option<Spanned<u32>>,
    pub weight: Option<Spanned<u32>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields, expecting = "a table: { base = 0x..., size_mb = N }")]
pub(crate) struct RawMemory {
    pub base: Spanned<u64>,
    pub size_mb: Spanned<u64>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields, expecting = r#"a table: { module = "name", cmdline = "..." }"#)]
pub(crate) struct RawGuest {
    pub module: Spanned<String>,
    pub cmdline: Option<Spanned<String>>,
    pub initrd: Option<Spanned<String>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, expecting = r#"a table: { ioports = [...], irqs = [...], serial = "comN", pci = [...] }"#)]
pub(crate) struct RawDevices {
    #[serde(default)]
    pub ioports: Vec<Spanned<String>>,
    #[serde(default)]
    pub irqs: Vec<Spanned<u32>>,
    pub serial: Option<Spanned<SerialPort>>,
    #[serde(default)]
    pub pci: Vec<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RawChildPolicy {
    Any,
    FixedShare,
    Weighted,
    BudgetPeriod,
}

impl From<RawChildPolicy> for ChildPolicy {
    fn from(raw: RawChildPolicy) -> ChildPolicy {
        match raw {
            RawChildPolicy::Any => ChildPolicy::Any,
            RawChildPolicy::FixedShare => ChildPolicy::FixedShare,
            RawChildPolicy::Weighted => ChildPolicy::Weighted,
            RawChildPolicy::BudgetPeriod => ChildPolicy::BudgetPeriod,
        }
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RawNestedPolicy {
    Gang,
    RoundRobinGang,
}

impl From<RawNestedPolicy> for NestedPolicy {
    fn from(raw: RawNestedPolicy) -> NestedPolicy {
        match raw {
            RawNestedPolicy::Gang => NestedPolicy::Gang,
            RawNestedPolicy::RoundRobinGang => NestedPolicy::RoundRobinGang,
        }
    }
}

// ---------------------------------------------------------------- the model

/// How pCPUs dispatch partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DispatchPolicy {
    /// Phase-locked gang dispatch: a partition's vCPUs start and stop together.
    #[default]
    Gang,
    /// Gang dispatch on the same tables, paced by IPIs instead of phase-locked timers: pCPU 0
    /// times every slot boundary and sends the others an IPI at each (the comparison
    /// Barrelfish drew; `scripts/bench-slots`).
    IpiGang,
    /// Baseline: each pCPU time-slices its vCPUs round-robin without cross-CPU alignment.
    Independent,
    /// Independent plus PAUSE-loop-exit directed yield (the KVM approach).
    IndependentYield,
    /// Relaxed co-scheduling (the VMware approach): leading vCPUs are stopped when the skew
    /// between a partition's vCPUs exceeds `skew_bound_us`.
    RelaxedCo,
}

impl DispatchPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DispatchPolicy::Gang => "gang",
            DispatchPolicy::IpiGang => "ipi-gang",
            DispatchPolicy::Independent => "independent",
            DispatchPolicy::IndependentYield => "independent-yield",
            DispatchPolicy::RelaxedCo => "relaxed-co",
        }
    }

    /// Whether the planner aligns each partition's slots across its pCPUs. Relaxed
    /// co-scheduling runs on the independent tables and only stops leading vCPUs at run time.
    pub fn aligned(self) -> bool {
        matches!(self, DispatchPolicy::Gang | DispatchPolicy::IpiGang)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnFault {
    /// Stop the partition's vCPUs and keep its slots idle; others run on.
    #[default]
    Stop,
    /// Reload the guest payload and start it again from power-on.
    Reset,
}

/// What a guest's own reboot request (the ACPI reset register, port 0xCF9, the keyboard
/// controller's reset line) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnReboot {
    /// Reload the payload and start it again from power-on, as a PC reboots.
    #[default]
    Reset,
    /// Stop the partition (its slots idle), as `on_fault = "stop"`.
    Stop,
}

/// What a guest's own power-off (ACPI S5) does beyond stopping the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnPoweroff {
    /// The partition stops (its slots idle); the run goes on.
    #[default]
    Stop,
    /// The run ends at the next major-frame boundary, as if `run_ms` had come: for a
    /// partition whose work is the experiment (a benchmark, a boot to measure).
    EndRun,
}

/// Where the hypervisor takes commands while it runs (`scripts/phalanx ctl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlChannel {
    /// The machine's second UART (ports 0x2f8-0x2ff, IRQ 3), kept by the hypervisor.
    Com2,
    /// No control channel: the run ends after `run_ms` (or runs until a partition ends it).
    None,
}

impl ControlChannel {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlChannel::Com2 => "com2",
            ControlChannel::None => "none",
        }
    }
}

/// A physical 16550 UART handed to a partition: its eight I/O ports and its IRQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialPort {
    Com1,
    Com2,
    Com3,
    Com4,
}

impl SerialPort {
    pub fn base_port(self) -> u16 {
        match self {
            SerialPort::Com1 => 0x3f8,
            SerialPort::Com2 => 0x2f8,
            SerialPort::Com3 => 0x3e8,
            SerialPort::Com4 => 0x2e8,
        }
    }

    pub fn ports(self) -> RangeInclusive<u16> {
        self.base_port()..=self.base_port() + 7
    }

    pub fn irq(self) -> u32 {
        match self {
            SerialPort::Com1 | SerialPort::Com3 => 4,
            SerialPort::Com2 | SerialPort::Com4 => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SerialPort::Com1 => "com1",
            SerialPort::Com2 => "com2",
            SerialPort::Com3 => "com3",
            SerialPort::Com4 => "com4",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HypervisorConfig {
    pub major_frame_us: u64,
    pub policy: DispatchPolicy,
    pub stats_interval_ms: u64,
    /// End the run and print final statistics after this long; `None`: run until the control
    /// channel's `end` (or a partition with `on_poweroff = "end-run"` powers off).
    pub run_ms: Option<u64>,
    /// Where commands come from while the machine runs. Left out: COM2 when no partition owns
    /// its ports or IRQ, else none.
    pub control: ControlChannel,
    /// Only for `relaxed-co`: the skew between a partition's vCPUs that triggers co-stop.
    pub skew_bound_us: Option<u64>,
    /// Guest time between two spin-wait samples of a vCPU; 0: no sampling.
    pub spin_sample_us: u64,
    /// Events each pCPU's trace buffer holds; 0: no trace.
    pub trace_events: u64,
}

pub const DEFAULT_MAJOR_FRAME_US: u64 = 10_000;
/// Shortest major frame: Barrelfish's shortest slice (scripts/bench-slots sweeps down to
/// here; a slot shorter than a VM exit leaves its guest little time, but runs).
pub const MIN_MAJOR_FRAME_US: u64 = 20;
pub const MAX_MAJOR_FRAME_US: u64 = 10_000_000;
pub const DEFAULT_STATS_INTERVAL_MS: u64 = 1_000;
/// Off unless asked for: each sample is a VM exit, a page walk and a look at the code (about
/// 2.5k cycles under Bochs, 4% of the machine at a 10 ms interval there).
pub const DEFAULT_SPIN_SAMPLE_US: u64 = 0;
/// Shortest sampling interval: each sample is a VM exit and a page walk.
pub const MIN_SPIN_SAMPLE_US: u64 = 10;
/// Longest sampling interval.
pub const MAX_SPIN_SAMPLE_US: u64 = 1_000_000;
/// Off unless asked for (docs/benchmarks.md has its cost per event).
pub const DEFAULT_TRACE_EVENTS: u64 = 0;
/// Smallest trace buffer worth its console records.
pub const MIN_TRACE_EVENTS: u64 = 1024;
/// Bytes one buffered trace event takes (`reservations::trace::Event`).
pub const TRACE_EVENT_BYTES: u64 = 16;
/// What all pCPUs' trace buffers together may take of the hypervisor's heap.
pub const MAX_TRACE_BYTES: u64 = 8 << 20;

/// The hypervisor's heap, besides the trace buffers: per-pCPU state, partitions, vCPUs,
/// EPT tables (the image's heap is this plus [`MAX_TRACE_BYTES`]).
pub const HEAP_BYTES: u64 = 20 << 20;

/// What the image's heap holds, over-estimated from measurements (docs/config.md): the
/// instruction decoder's tables, the console and boot structures; per pCPU its slot-entry
/// log and dispatch tables; per partition its bitmaps and devices; per vCPU its VMCS, FXSAVE,
/// and MSR pages and its state; EPT tables per GiB of partition memory (2 MiB pages).
pub const HEAP_FIXED_BYTES: u64 = 1 << 20;
pub const HEAP_PER_PCPU_BYTES: u64 = 256 << 10;
pub const HEAP_PER_PARTITION_BYTES: u64 = 64 << 10;
pub const HEAP_PER_VCPU_BYTES: u64 = 24 << 10;
pub const HEAP_EPT_PER_GIB_BYTES: u64 = 8 << 10;
/// Per owned device IRQ: its state and latency samples (`hypervisor/src/device_irq.rs`).
pub const HEAP_PER_IRQ_BYTES: u64 = 20 << 10;

/// The heap a partition of `vcpus` vCPUs and `memory` bytes owning `irqs` device IRQs takes.
pub fn heap_of_partition(vcpus: u32, memory: u64, irqs: usize) -> u64 {
    HEAP_PER_PARTITION_BYTES
        + vcpus as u64 * HEAP_PER_VCPU_BYTES
        + memory.div_ceil(1 << 30) * HEAP_EPT_PER_GIB_BYTES
        + irqs as u64 * HEAP_PER_IRQ_BYTES
}

impl Config {
    /// The heap the image needs for this config on `pcpus` pCPUs, trace buffers included.
    pub fn heap_estimate(&self, pcpus: u32) -> u64 {
        let partitions: u64 =
            self.partitions.iter().map(|p| heap_of_partition(p.vcpus, p.memory.size(), p.devices.irqs.len())).sum();
        HEAP_FIXED_BYTES
            + pcpus as u64 * (HEAP_PER_PCPU_BYTES + self.hypervisor.trace_events * TRACE_EVENT_BYTES)
            + partitions
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub name: String,
    pub parent: Option<String>,
    pub reservation: Reservation,
    pub pcpus: Option<Vec<u32>>,
    pub policy: ChildPolicy,
    /// The partition that may re-divide this group's capacity among its children at run
    /// time, by hypercall (docs/control.md, "Delegation").
    pub manager: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryRequest {
    /// The hypervisor picks the place (first fit, 2 MiB aligned).
    Allocate { size: u64 },
    /// Exactly here (host-physical, 2 MiB aligned).
    Fixed { base: u64, size: u64 },
}

impl MemoryRequest {
    pub fn size(&self) -> u64 {
        match *self {
            MemoryRequest::Allocate { size } | MemoryRequest::Fixed { size, .. } => size,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    /// Multiboot2 module name of the payload (e.g. a bzImage).
    pub module: String,
    pub cmdline: String,
    /// Module name of an initrd, if any.
    pub initrd: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Devices {
    /// Passed-through I/O port ranges, including the serial port's if any.
    pub ioports: Vec<RangeInclusive<u16>>,
    /// Device IRQs (GSIs) the partition owns, including the serial port's if any.
    pub irqs: Vec<u32>,
    pub serial: Option<SerialPort>,
    /// PCI functions passed through (bus 0 only), sorted.
    pub pci: Vec<PciFunction>,
}

/// A PCI function on bus 0: device and function number (`"00:02.0"` in a config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PciFunction {
    pub device: u8,
    pub function: u8,
}

impl PciFunction {
    /// `"BB:DD.F"` (hexadecimal, as lspci writes it); bus 0 only.
    pub fn parse(text: &str) -> Result<PciFunction, String> {
        let form = || {
            format!("\"{text}\" is not a PCI function: write it as lspci does, \"00:DD.F\" (bus 0, device 00-1f, function 0-7)")
        };
        let (bus, rest) = text.split_once(':').ok_or_else(form)?;
        let (device, function) = rest.split_once('.').ok_or_else(form)?;
        let hex = |s: &str, digits: usize| {
            (s.len() == digits).then(|| u8::from_str_radix(s, 16).ok()).flatten().ok_or_else(form)
        };
        let (bus, device, function) = (hex(bus, 2)?, hex(device, 2)?, hex(function, 1)?);
        if device > 0x1f || function > 7 {
            return Err(form());
        }
        if bus != 0 {
            return Err(format!("\"{text}\": only functions on bus 0 are passed through"));
        }
        if device == 0 && function == 0 {
            return Err(format!("\"{text}\" is the host bridge, which the hypervisor keeps"));
        }
        Ok(PciFunction { device, function })
    }
}

impl core::fmt::Display for PciFunction {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "00:{:02x}.{:x}", self.device, self.function)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionConfig {
    pub name: String,
    pub group: Option<String>,
    pub vcpus: u32,
    /// As written (validated: unique, existing).
    pub pcpus: Vec<u32>,
    pub memory: MemoryRequest,
    pub reservation: Reservation,
    pub policy: NestedPolicy,
    pub guest: Guest,
    pub devices: Devices,
    pub on_fault: OnFault,
    pub on_reboot: OnReboot,
    pub on_poweroff: OnPoweroff,
}

/// A memory region its owner partition shares with others: mapped at `gpa` in the owner
/// (read-write), the writers (read-write) and the readers (read-only), until it is revoked
/// (docs/control.md, "Shared memory").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRegion {
    pub name: String,
    pub size: u64,
    /// Guest-physical address, the same in every partition that maps it.
    pub gpa: u64,
    /// Indices in `Config::partitions`.
    pub owner: usize,
    pub readers: Vec<usize>,
    pub writers: Vec<usize>,
}

impl SharedRegion {
    /// The partitions that map it besides its owner, each with whether it may write.
    pub fn aliases(&self) -> impl Iterator<Item = (usize, bool)> + '_ {
        self.readers.iter().map(|&r| (r, false)).chain(self.writers.iter().map(|&w| (w, true)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    /// Shared between a running config and its changed versions until a change touches a group.
    pub groups: alloc::sync::Arc<Vec<GroupConfig>>,
    pub partitions: Vec<PartitionConfig>,
    pub shared: Vec<SharedRegion>,
}

/// Where a partition's memory lies in host-physical space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    At(Range<u64>),
    /// Host check without a machine description: the size is known, the place is not.
    Deferred {
        size: u64,
    },
}

impl Placement {
    pub fn size(&self) -> u64 {
        match self {
            Placement::At(range) => range.end - range.start,
            Placement::Deferred { size } => *size,
        }
    }

    pub fn range(&self) -> Option<Range<u64>> {
        match self {
            Placement::At(range) => Some(range.clone()),
            Placement::Deferred { .. } => None,
        }
    }
}
