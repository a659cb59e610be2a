//! The machine a config describes, built once on the BSP before any pCPU enters a guest:
//! every partition loaded, mapped by its own EPT, given its I/O and MSR bitmaps and devices;
//! the dispatch tables every pCPU executes and each vCPU's home pCPU.

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Once;

use config::{DispatchPolicy, LiveConfig, Placement, Validated};
use ept::{Access, Ept, FrameAllocator, MemoryType, PageSizes, PhysMemory};
use sched::Epoch;
use vmx::devices::LAPIC_PAGE;
use vmx::pci::PassedFunction;
use vmx::vmcs_image::PartitionContext;
use vmx::ControlSet;

use crate::memory::BootInfo;
use crate::partition::{Fault, Partition, Payload, PayloadImages};
use crate::phases::{EpochPlan, Phases};

/// Table pages come from the hypervisor heap (identity-mapped: address = physical).
pub struct HeapFrames;

impl FrameAllocator for HeapFrames {
    fn allocate_zeroed_frame(&mut self) -> Option<u64> {
        Some(crate::memory::alloc_zeroed_pages(1).as_ptr() as u64)
    }
}

pub struct IdentityPhys;

impl PhysMemory for IdentityPhys {
    fn read_u64(&self, phys: u64) -> u64 {
        // SAFETY: EPT table pages handed out by `HeapFrames`, 8-aligned entries.
        unsafe { core::ptr::read_volatile(phys as *const u64) }
    }

    fn write_u64(&mut self, phys: u64, value: u64) {
        // SAFETY: as in `read_u64`; no CPU uses the tables before they are complete.
        unsafe { core::ptr::write_volatile(phys as *mut u64, value) }
    }
}

/// I/O bitmaps: every port exits (emulated or refused) except those the partition owns.
fn io_bitmaps(owned: &[core::ops::RangeInclusive<u16>]) -> (u64, u64) {
    let pages = crate::memory::alloc_zeroed_pages(2);
    pages.fill(0xFF);
    for range in owned {
        for port in range.clone() {
            pages[port as usize / 8] &= !(1 << (port % 8));
        }
    }
    (pages.as_ptr() as u64, pages.as_ptr() as u64 + 4096)
}

/// The PCI functions partition `id` owns, as the machine has them (`host_pci::probe`), or why
/// the partition cannot have them: a function that is not there or needs more than I/O ports,
/// ports the hypervisor or another partition owns, or an interrupt line the partition does
/// not own.
fn pass_through_functions(config: &config::Config, id: usize) -> Result<Vec<PassedFunction>, String> {
    let p = &config.partitions[id];
    let mut functions = Vec::new();
    for &function in &p.devices.pci {
        let passed = crate::host_pci::probe(function)?;
        for ports in passed.io_ports() {
            if let Some((lo, hi, what)) = config::hypervisor_ports_in(&ports) {
                return Err(format!(
                    "devices.pci: {function} decodes ports {:#x}-{:#x}, which overlap the hypervisor's {lo:#x}-{hi:#x} ({what})",
                    ports.start(),
                    ports.end()
                ));
            }
            let taken = |other: &config::PartitionConfig| {
                other.devices.ioports.iter().any(|o| o.start() <= ports.end() && ports.start() <= o.end())
            };
            if let Some(other) = config.partitions.iter().find(|other| taken(other)) {
                return Err(format!(
                    "devices.pci: {function} decodes ports {:#x}-{:#x}, which partition \"{}\" owns",
                    ports.start(),
                    ports.end(),
                    other.name
                ));
            }
        }
        if let Some(line) = passed.interrupt_line() {
            if !p.devices.irqs.contains(&(line as u32)) {
                return Err(format!(
                    "devices.pci: {function} interrupts on IRQ {line} (its interrupt line, as the firmware routed it): add {line} to devices.irqs"
                ));
            }
        }
        functions.push(passed);
    }
    Ok(functions)
}

/// MSR bitmap: every MSR exits (emulated or #GP) except the ones switched through the
/// VM-entry/exit MSR areas, which the guest uses directly.
fn msr_bitmap() -> u64 {
    let page = crate::memory::alloc_zeroed_pages(1);
    page.fill(0xFF);
    for msr in vmx::msr::SWITCHED {
        let (byte, bit) = vmx::msr::bitmap_position(msr).expect("switched MSRs are in the bitmap's ranges");
        page[byte] &= !(1 << bit);
        page[byte + 2048] &= !(1 << bit);
    }
    page.as_ptr() as u64
}

/// The one APIC-access page every partition's EPT maps at its xAPIC address (allocated at
/// the first call). The CPU only compares addresses with it; nothing reads or writes it.
fn apic_access_page() -> u64 {
    static PAGE: Once<u64> = Once::new();
    *PAGE.call_once(|| crate::memory::alloc_zeroed_pages(1).as_ptr() as u64)
}

pub struct Machine {
    pub partitions: Vec<Partition>,
    /// The dispatch tables in force, and a change of them once published (`phases`).
    pub phases: Phases,
    /// The config as it runs, which run-time changes are checked against (pCPU 0's, through
    /// the control channel).
    pub live: spin::Mutex<LiveConfig>,
    /// Tables are planned in microseconds and run in TSC cycles: this many per microsecond.
    pub tsc_per_us: u64,
    pub policy: DispatchPolicy,
    pub controls: ControlSet,
    /// Enter vCPUs with RFLAGS.IF set: the Bochs workaround (`phalanx.bochs=1`, which
    /// scripts/phalanx passes to Bochs runs only); see `vmx::vmcs_image::InitialVmcs::new`.
    pub force_interrupts_on: bool,
    /// Per partition, per vCPU: the one pCPU it runs on.
    pub homes: Vec<Vec<usize>>,
    pub frame_cycles: u64,
    /// `relaxed-co`: a vCPU this many guest cycles ahead of its slowest sibling is co-stopped.
    pub skew_bound: Option<u64>,
    /// Guest time between two spin-wait samples of a vCPU (TSC cycles; 0: no sampling).
    pub spin_sample_cycles: u64,
    pub schedule: Schedule,
    /// What the config check estimated the heap would hold (`Config::heap_estimate`).
    pub heap_estimate: u64,
    /// The partition whose COM1 receives what is typed at the hypervisor's console
    /// (`phalanx.console=NAME`).
    pub console_input: Option<usize>,
    /// The device IRQs partitions own, and their delivery (`device_irq`).
    pub device_irqs: crate::device_irq::DeviceIrqs,
    /// The shared memory regions and each partition's EPT, which revoking one changes.
    pub shared: crate::shared_memory::SharedMemory,
    /// An end earlier than `schedule.end` (a partition with `on_poweroff = "end-run"` powered
    /// off, or the control channel's `end`); `u64::MAX`: none.
    early_end: AtomicU64,
    /// What ended the run early (`EndCause` as a number).
    end_cause: core::sync::atomic::AtomicU8,
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EndCause {
    /// `run_ms` passed.
    RunMs = 0,
    /// A partition with `on_poweroff = "end-run"` powered off.
    Poweroff = 1,
    /// The control channel's `end`.
    Control = 2,
}

impl EndCause {
    pub fn as_str(self) -> &'static str {
        match self {
            EndCause::RunMs => "run_ms",
            EndCause::Poweroff => "poweroff",
            EndCause::Control => "control",
        }
    }
}

impl Machine {
    /// When the run ends (TSC): `run_ms` after `t0`, or earlier once `end_early` was called.
    pub fn run_end(&self) -> u64 {
        self.schedule.end.min(self.early_end.load(Ordering::Acquire))
    }

    /// Ends the run at the second major-frame boundary after `now`: every pCPU sees the new
    /// end before the frame it ends in begins, so all stop at that same boundary. Returns it.
    pub fn end_early(&self, now: u64, cause: EndCause) -> u64 {
        let frames_done = now.saturating_sub(self.schedule.t0) / self.frame_cycles.max(1);
        let end = self.schedule.t0 + (frames_done + 2) * self.frame_cycles;
        if end < self.early_end.fetch_min(end, Ordering::AcqRel) {
            self.end_cause.store(cause as u8, Ordering::Release);
        }
        self.run_end()
    }

    /// What ended the run (`run_ms` unless something ended it earlier).
    pub fn end_cause(&self) -> EndCause {
        match self.end_cause.load(Ordering::Acquire) {
            1 => EndCause::Poweroff,
            2 => EndCause::Control,
            _ => EndCause::RunMs,
        }
    }

    /// How many distinct pCPUs partition `id`'s vCPUs are homed on.
    pub fn pcpus_held(&self, id: usize) -> usize {
        self.homes[id].iter().collect::<alloc::collections::BTreeSet<_>>().len()
    }
}

/// The run in TSC cycles: its release time (`t0`, every pCPU's first slot boundary), its end
/// (`u64::MAX`: until the control channel's `end`), and how often pCPU 0 prints progress
/// records.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub t0: u64,
    pub end: u64,
    pub progress_interval: u64,
    /// Debug (`phalanx.debug.uncharged_cycles`): cycles every pCPU spends once per major frame
    /// outside any charge, to show that the accounting sees them.
    pub debug_uncharged_cycles: u64,
    /// Debug (`phalanx.debug.switch_in_cycles`): cycles added to every switch into a
    /// partition's own slot, to show that the entry latency and skew figures see them.
    pub debug_switch_in_cycles: u64,
    /// Debug (`phalanx.debug.phase_switch_cycles`): cycles the last pCPU adds to each switch of
    /// dispatch tables, to show that the phase-change figures see a slow switch.
    pub debug_phase_switch_cycles: u64,
}

/// How far ahead of the end of the build the run is released, how long it lasts and how
/// often progress is printed (TSC cycles).
#[derive(Debug, Clone, Copy)]
pub struct RunLength {
    pub lead: u64,
    /// `None`: until it is ended (the control channel's `end`, a partition's power-off).
    pub run: Option<u64>,
    pub progress_interval: u64,
    pub debug_uncharged_cycles: u64,
    pub debug_switch_in_cycles: u64,
    pub debug_phase_switch_cycles: u64,
    /// Debug (`phalanx.debug.irq_raise_delay_cycles`): cycles between a device interrupt's
    /// arrival and its raise at the owner, to show that the `irq_stats` latency sees them.
    pub debug_irq_raise_delay_cycles: u64,
}

static MACHINE: Once<Machine> = Once::new();

pub fn machine() -> &'static Machine {
    MACHINE.get().expect("machine built before dispatch")
}

/// Loads every partition and takes the dispatch plan the config check made (in TSC cycles).
/// `Err` names the partition.
pub fn build(
    live: LiveConfig,
    boot: &BootInfo,
    controls: ControlSet,
    force_interrupts_on: bool,
    length: RunLength,
    console_input: Option<&str>,
) -> Result<&'static Machine, String> {
    let validated = &live.validated;
    let config = &validated.config;
    let console_input = match console_input {
        None => None,
        Some(name) => Some(config.partitions.iter().position(|p| p.name == name).ok_or_else(|| {
            let names: Vec<&str> = config.partitions.iter().map(|p| p.name.as_str()).collect();
            alloc::format!("phalanx.console={name}: no such partition (the config has: {})", names.join(", "))
        })?),
    };
    let features = controls.caps.features();
    let sizes = PageSizes { huge_1g: features.ept_1g_pages, large_2m: features.ept_2m_pages };
    // Tables are scaled by a whole number of cycles per microsecond (exact, so the plan the
    // check made is the plan that runs): rounded, not truncated, or a TSC calibrated a hair
    // under 10 MHz (Bochs: 9,999,500 Hz) would run every slot 10% short.
    let tsc_per_us = ((crate::tsc::hz() + 500_000) / 1_000_000).max(1);
    let clock = crate::platform::host_wall_clock();
    let mut partitions = Vec::new();
    let mut epts: Vec<&'static mut Ept> = Vec::new();
    for (id, (p, placement)) in config.partitions.iter().zip(&validated.memory).enumerate() {
        // Validated against this boot's memory map and modules (`boot_config::load`): memory is
        // placed and the module is there.
        let Placement::At(memory) = placement.clone() else { unreachable!("validated with the boot's memory map") };
        let module_bytes = |name: &str| {
            boot.modules.iter().find(|m| m.name == name).expect("validated against the boot's modules").bytes()
        };
        let payload =
            PayloadImages { image: module_bytes(&p.guest.module), initrd: p.guest.initrd.as_deref().map(module_bytes) };
        let size = memory.end - memory.start;
        let mut ept = Ept::new(&mut HeapFrames).map_err(|e| format!("partition {}: {e}", p.name))?;
        ept.map(&mut IdentityPhys, &mut HeapFrames, 0, memory.start, size, Access::all(), MemoryType::WriteBack, sizes)
            .map_err(|e| format!("partition {}: EPT: {e}", p.name))?;
        // Under APIC virtualization the xAPIC's guest-physical page maps to the APIC-access
        // page: the CPU recognizes accesses by that host-physical address after EPT.
        let apic_access_page = if controls.paths.apic_virtualization {
            let page = apic_access_page();
            let read_write = Access::READ | Access::WRITE;
            ept.map(
                &mut IdentityPhys,
                &mut HeapFrames,
                LAPIC_PAGE,
                page,
                4096,
                read_write,
                MemoryType::WriteBack,
                sizes,
            )
            .map_err(|e| format!("partition {}: EPT (xAPIC page): {e}", p.name))?;
            page
        } else {
            0
        };
        // Its PCI functions: what it will see of them, and their ports, passed through.
        let passed = pass_through_functions(config, id);
        let mut ports = p.devices.ioports.clone();
        if let Ok(functions) = &passed {
            ports.extend(functions.iter().flat_map(PassedFunction::io_ports));
        }
        let (io_bitmap_a, io_bitmap_b) = io_bitmaps(&ports);
        let context = PartitionContext {
            eptp: ept.eptp(false),
            io_bitmap_a,
            io_bitmap_b,
            msr_bitmap: msr_bitmap(),
            apic_access_page,
        };
        epts.push(Box::leak(Box::new(ept)));
        let (functions, refusal) = match passed {
            Ok(functions) => (functions, None),
            Err(detail) => (Vec::new(), Some(detail)),
        };
        let partition = Partition::load(id, p, memory, payload, context, clock, functions)?;
        if let Some(detail) = refusal {
            partition.refuse(Fault { vcpu: 0, reason: "unsupported", detail, rip: 0 });
        }
        partitions.push(partition);
    }
    let shared = crate::shared_memory::SharedMemory::map(validated, &mut epts, sizes)
        .map_err(|e| format!("shared memory: {e}"))?;

    // Application processors of SMP Linux start in real mode, which needs unrestricted guest:
    // without it such a partition is refused (stopped before it runs); the others run.
    if !controls.paths.unrestricted_guest {
        for p in partitions.iter().filter(|p| p.payload == Payload::Linux && p.vcpus > 1) {
            p.refuse(Fault {
                vcpu: 1,
                reason: "unsupported",
                detail: format!(
                    "SMP Linux needs the VMX feature \"unrestricted guest\" (its application processors start in real mode), which this CPU lacks: give partition {} 1 vCPU, or run on a CPU that has it",
                    p.name
                ),
                rip: 0,
            });
        }
    }

    // The instruction decoder builds its tables on first use (millions of cycles): do that
    // now, at boot, rather than in the middle of the first device access or spin-wait sample
    // that needs it. Any partition can map the xAPIC page and touch it (a test guest did, and
    // the 4.9M cycles its first access took came out of its neighbour's slots: -25% share).
    let _ = vmx::mmio::decode(&[0x8B, 0x00], 0);

    // The plan the config check made (in microseconds), run in TSC cycles.
    let tables = validated.dispatch.tables.scaled(tsc_per_us);
    let homes = validated.dispatch.homes.clone();
    let heap_estimate = config.heap_estimate(tables.pcpus.len() as u32);
    let frame_cycles = tables.frame;
    let skew_bound = (config.hypervisor.policy == DispatchPolicy::RelaxedCo)
        .then(|| config.hypervisor.skew_bound_us.unwrap_or(config.hypervisor.major_frame_us / 10) * tsc_per_us);
    // Released `lead` after the build, so every pCPU has set its vCPUs up by then.
    let t0 = crate::tsc::now() + length.lead;
    let schedule = Schedule {
        t0,
        end: length.run.map_or(u64::MAX, |run| t0 + run),
        progress_interval: length.progress_interval,
        debug_uncharged_cycles: length.debug_uncharged_cycles,
        debug_switch_in_cycles: length.debug_switch_in_cycles,
        debug_phase_switch_cycles: length.debug_phase_switch_cycles,
    };
    let device_irqs = crate::device_irq::DeviceIrqs::new(
        validated.irqs.clone(),
        partitions.len(),
        length.debug_irq_raise_delay_cycles,
    );
    let phases = Phases::new(Epoch::first(tables, t0), epoch_plan(validated, 0, t0));
    let policy = config.hypervisor.policy;
    let spin_sample_cycles = config.hypervisor.spin_sample_us * tsc_per_us;
    Ok(MACHINE.call_once(|| Machine {
        partitions,
        phases,
        live: spin::Mutex::new(live),
        tsc_per_us,
        policy,
        controls,
        force_interrupts_on,
        homes,
        frame_cycles,
        skew_bound,
        spin_sample_cycles,
        heap_estimate,
        console_input,
        device_irqs,
        shared,
        early_end: AtomicU64::new(u64::MAX),
        end_cause: core::sync::atomic::AtomicU8::new(EndCause::RunMs as u8),
        schedule,
    }))
}

/// What `validated` asks of each partition, as epoch `number` released at `release`.
pub fn epoch_plan(validated: &Validated, number: u32, release: u64) -> EpochPlan {
    let flat = validated.tree.flatten();
    let requested_ppm = (0..validated.config.partitions.len())
        .map(|id| flat.iter().find(|f| f.id as usize == id).map_or(0, |f| f.reservation.ppm()))
        .collect();
    let reservations =
        validated.config.partitions.iter().map(|p| crate::boot_config::describe(&p.reservation)).collect();
    EpochPlan { number, release, reservations, requested_ppm }
}
