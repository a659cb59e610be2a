//! A partition at run time: its memory and payload, its devices, its console, and its fault
//! and reset state machine (stopped alone, reported in its own slot, reloaded when every
//! vCPU has parked).

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use reservations::trace::EventKind;
use spin::Mutex;

use config::{OnFault, OnPoweroff, OnReboot};
use firmware::longmode::{BootParams, GuestMemory, GuestMemoryError, GuestStats, VcpuState, STATS_RECORD_SIZE};
use vmx::platform::PowerRequest;
use vmx::vmcs_image::PartitionContext;

/// Longest guest console line held before it is printed anyway (JSON records fit).
const GUEST_LINE_MAX: usize = 4096;

/// The reasons of stops the guest asked for itself, reported as such rather than as faults.
const REASON_POWEROFF: &str = "poweroff";
const REASON_REBOOT: &str = "reboot";
/// Stopped, started or reset through the control channel.
const REASON_CONTROL: &str = "control";

/// Why a partition was stopped.
#[derive(Debug, Clone)]
pub struct Fault {
    pub vcpu: u32,
    pub reason: &'static str,
    pub detail: String,
    pub rip: u64,
}

pub struct Partition {
    pub id: usize,
    pub name: String,
    /// Host-physical memory; guest-physical 0 maps to its start.
    pub memory: Range<u64>,
    pub vcpus: u32,
    pub on_fault: OnFault,
    pub on_reboot: OnReboot,
    pub on_poweroff: OnPoweroff,
    pub context: PartitionContext,
    pub stopped: AtomicBool,
    pub fault: Mutex<Option<Fault>>,
    /// A fault is recorded but its report not yet written.
    fault_unreported: AtomicBool,
    console: Mutex<String>,
    /// Its COM1, IO-APIC, and the IPI and start-up routing between its vCPUs.
    pub devices: vmx::devices::PartitionDevices,
    pub done_vcpus: AtomicU64,
    pub hypercalls: AtomicU64,
    /// Hypercalls with a number Phalanx does not know (the first few are logged).
    pub unknown_hypercalls: AtomicU64,
    /// The payload and its boot parameters, kept to reload the partition on a reset.
    images: PayloadImages,
    pub payload: Payload,
    /// Each vCPU's power-on register state.
    pub initial_states: Vec<VcpuState>,
    cmdline: String,
    /// Its ACPI SCI's IRQ (one it does not own) and its PCI functions' interrupts, for its
    /// firmware tables.
    sci_irq: u8,
    pci_interrupts: Vec<firmware::acpi::PciInterrupt>,
    /// Stopped for good (`refuse`, or a fault with `on_fault = "stop"`): never reset.
    refused: AtomicBool,
    /// Bumped by each reset: a vCPU whose VMCS was set up for an older generation is set up
    /// again before it runs.
    pub generation: AtomicU64,
    /// A reset waits until every vCPU is parked (out of the guest, on its own pCPU).
    reset_pending: AtomicBool,
    parked: AtomicU32,
    pub resets: AtomicU64,
    /// PAUSE-loop exits so far (the control channel's live spin-wait figure).
    pub pause_loop_exits: AtomicU64,
    /// Guest cycles per vCPU (relaxed co-scheduling compares siblings' progress).
    pub vcpu_run_cycles: Vec<AtomicU64>,
}

impl Partition {
    /// Partition `id` as `config` describes it, in host-physical `memory` (cleared, then
    /// loaded with `images`), entered through `context`.
    pub fn load(
        id: usize,
        config: &config::PartitionConfig,
        memory: Range<u64>,
        images: PayloadImages,
        context: PartitionContext,
        clock: vmx::platform::WallClock,
        functions: Vec<vmx::pci::PassedFunction>,
    ) -> Result<Partition, String> {
        let size = memory.end - memory.start;
        // SAFETY: the partition's memory range, placed by validation inside usable RAM that
        // nothing else owns; cleared so no data of an earlier occupant leaks into the guest.
        unsafe { core::ptr::write_bytes(memory.start as *mut u8, 0, size as usize) };
        let mut window = HostWindow { base: memory.start, size };
        let vcpus = config.vcpus;
        let sci_irq = firmware::acpi::sci_irq_for(&config.devices.irqs);
        let pci_interrupts: Vec<firmware::acpi::PciInterrupt> = functions
            .iter()
            .filter_map(|f| {
                let line = f.interrupt_line()?;
                Some(firmware::acpi::PciInterrupt { device: f.device, pin: f.interrupt_pin(), line })
            })
            .collect();
        let tables = FirmwareTables { sci_irq, pci: &pci_interrupts };
        let (payload, initial_states) = load_payload(&mut window, images, &config.guest.cmdline, vcpus, tables)
            .map_err(|e| format!("partition {} ({}): {e}", config.name, config.guest.module))?;
        let ioapic_id = firmware::mptable::ioapic_id(vcpus);
        let devices = vmx::devices::PartitionDevices::new(vcpus, ioapic_id, payload == Payload::TestGuest, clock);
        functions.into_iter().for_each(|f| devices.pass_through(f));
        Ok(Partition {
            id,
            name: config.name.clone(),
            memory,
            vcpus,
            on_fault: config.on_fault,
            on_reboot: config.on_reboot,
            on_poweroff: config.on_poweroff,
            context,
            stopped: AtomicBool::new(false),
            fault: Mutex::new(None),
            fault_unreported: AtomicBool::new(false),
            console: Mutex::new(String::new()),
            devices,
            done_vcpus: AtomicU64::new(0),
            hypercalls: AtomicU64::new(0),
            unknown_hypercalls: AtomicU64::new(0),
            images,
            payload,
            initial_states,
            cmdline: config.guest.cmdline.clone(),
            sci_irq,
            pci_interrupts,
            generation: AtomicU64::new(0),
            refused: AtomicBool::new(false),
            reset_pending: AtomicBool::new(false),
            parked: AtomicU32::new(0),
            resets: AtomicU64::new(0),
            pause_loop_exits: AtomicU64::new(0),
            vcpu_run_cycles: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Whether `irq` is the interrupt line of one of its passed-through PCI functions.
    pub fn is_pci_line(&self, irq: u32) -> bool {
        self.pci_interrupts.iter().any(|p| p.line as u32 == irq)
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Reads guest-physical memory into `out`, `None` (nothing read) outside the partition.
    pub fn read_guest_bytes(&self, gpa: u64, out: &mut [u8]) -> Option<()> {
        let size = self.memory.end - self.memory.start;
        if gpa.checked_add(out.len() as u64)? > size {
            return None;
        }
        // SAFETY: bounds-checked inside the partition's own identity-mapped memory.
        unsafe { core::ptr::copy_nonoverlapping((self.memory.start + gpa) as *const u8, out.as_mut_ptr(), out.len()) };
        Some(())
    }

    /// Writes `bytes` into guest-physical memory, `None` (nothing written) outside the partition.
    pub fn write_guest_bytes(&self, gpa: u64, bytes: &[u8]) -> Option<()> {
        let size = self.memory.end - self.memory.start;
        if gpa.checked_add(bytes.len() as u64)? > size {
            return None;
        }
        // SAFETY: bounds-checked inside the partition's own identity-mapped memory, which the
        // guest owns (a string input it asked for).
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.memory.start + gpa) as *mut u8, bytes.len()) };
        Some(())
    }

    /// Relaxed co-scheduling: whether `vcpu` ran more than `bound` guest cycles ahead of its
    /// slowest sibling, and must wait for it (shared counters, read without locks or IPIs).
    pub fn co_stopped(&self, vcpu: u32, bound: u64) -> bool {
        let mine = self.vcpu_run_cycles[vcpu as usize].load(Ordering::Relaxed);
        let slowest = self.vcpu_run_cycles.iter().map(|c| c.load(Ordering::Relaxed)).min().unwrap_or(mine);
        mine > slowest + bound
    }

    /// Stops every vCPU of this partition (each leaves the guest at its next exit or slot);
    /// the first fault is the one reported. Cheap: the report is written later, in one of the
    /// partition's own slots (`report_fault`), so a fault near the end of its slot does not run
    /// into the next partition's.
    pub fn stop(&self, fault: Fault) {
        self.stop_and_maybe_reset(fault, self.on_fault == OnFault::Reset);
    }

    /// Stops the partition for good, whatever its `on_fault`: for what a reset cannot mend
    /// (the CPU lacks a feature it needs, its VMCS fails the VM-entry checks).
    pub fn refuse(&self, fault: Fault) {
        self.stop_and_maybe_reset(fault, false);
    }

    /// What the guest asked of its platform: a reboot resets it (or stops it, as its
    /// `on_reboot` says); S5 stops it for good. Reported in its own slot, as a fault is.
    pub fn power_request(&self, vcpu: u32, request: PowerRequest, rip: u64) {
        match request {
            PowerRequest::PowerOff => {
                let detail = "ACPI S5 (SLP_EN with the _S5 sleep type)".into();
                self.stop_and_maybe_reset(Fault { vcpu, reason: REASON_POWEROFF, detail, rip }, false);
                if self.on_poweroff == OnPoweroff::EndRun {
                    let m = crate::machine::machine();
                    m.end_early(crate::tsc::now(), crate::machine::EndCause::Poweroff);
                }
            }
            PowerRequest::Reset { via } => {
                let fault = Fault { vcpu, reason: REASON_REBOOT, detail: via.into(), rip };
                self.stop_and_maybe_reset(fault, self.on_reboot == OnReboot::Reset)
            }
        }
    }

    /// The control channel's `stop`: the partition stops (its slots idle or are lent) until
    /// `start`. `Err` says why not.
    pub fn control_stop(&self) -> Result<(), &'static str> {
        if self.is_stopped() {
            return Err("it is already stopped");
        }
        let detail = "stopped through the control channel".into();
        self.stop_and_maybe_reset(Fault { vcpu: 0, reason: REASON_CONTROL, detail, rip: 0 }, false);
        Ok(())
    }

    /// The control channel's `start`: a stopped partition boots again from its payload, as
    /// after a reset, in its own slots.
    pub fn control_start(&self) -> Result<(), String> {
        if !self.is_stopped() {
            return Err("it is running (`reset` restarts it)".into());
        }
        self.restart()
    }

    /// The control channel's `reset`: the partition, running or stopped, boots again.
    pub fn control_reset(&self) -> Result<(), String> {
        if !self.is_stopped() {
            let detail = "reset through the control channel".into();
            self.stop_and_maybe_reset(Fault { vcpu: 0, reason: REASON_CONTROL, detail, rip: 0 }, true);
            return Ok(());
        }
        self.restart()
    }

    /// A stopped partition's reset, unless it was stopped for what a reset cannot mend.
    fn restart(&self) -> Result<(), String> {
        if let Some(fault) =
            self.fault.lock().as_ref().filter(|f| ["unsupported", "vm-entry-check"].contains(&f.reason))
        {
            return Err(format!("it cannot run on this machine: {}", fault.detail));
        }
        self.refused.store(false, Ordering::Release);
        self.reset_pending.store(true, Ordering::Release);
        Ok(())
    }

    /// `running`, `stopped`, or `starting` (a reset pending, done in its next slot).
    pub fn state(&self) -> &'static str {
        match (self.is_stopped(), self.reset_pending()) {
            (false, _) => "running",
            (true, true) => "starting",
            (true, false) => "stopped",
        }
    }

    fn stop_and_maybe_reset(&self, fault: Fault, reset: bool) {
        let mut slot = self.fault.lock();
        if slot.is_none() {
            crate::trace::record_here(EventKind::Fault, self.id, fault.vcpu, 0);
            *slot = Some(fault);
            self.fault_unreported.store(true, Ordering::Release);
        }
        drop(slot);
        if !reset {
            // For good: a reset an earlier fault asked for is called off too.
            self.refused.store(true, Ordering::Release);
            self.reset_pending.store(false, Ordering::Release);
        } else if !self.refused.load(Ordering::Acquire) {
            self.reset_pending.store(true, Ordering::Release);
        }
        self.stopped.store(true, Ordering::Release);
    }

    pub fn reset_pending(&self) -> bool {
        self.reset_pending.load(Ordering::Acquire)
    }

    pub fn fault_unreported(&self) -> bool {
        self.fault_unreported.load(Ordering::Acquire)
    }

    /// Prints the pending fault's line and record, once.
    pub fn report_fault(&self) {
        let fault = self.fault.lock().clone();
        if !self.fault_unreported.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(fault) = fault else { return };
        // Every stop that is not for good is followed by a reset.
        let action = if self.refused.load(Ordering::Acquire) { "stopped" } else { "reset" };
        match fault.reason {
            REASON_POWEROFF => {
                log::info!("partition {} powered off ({}); its slots stay idle", self.name, fault.detail);
                crate::console::Record::new("partition_poweroff")
                    .str("partition", &self.name)
                    .u64("vcpu", fault.vcpu as u64)
                    .emit();
            }
            REASON_CONTROL => {
                log::info!("partition {}: {} ({action})", self.name, fault.detail);
                crate::console::Record::new("partition_control")
                    .str("partition", &self.name)
                    .str("detail", &fault.detail)
                    .str("action", action)
                    .emit();
            }
            REASON_REBOOT => {
                log::info!("partition {} asked to reboot (through the {}): {action}", self.name, fault.detail);
                crate::console::Record::new("partition_reboot")
                    .str("partition", &self.name)
                    .u64("vcpu", fault.vcpu as u64)
                    .str("via", &fault.detail)
                    .str("action", action)
                    .emit();
            }
            _ => {
                log::error!(
                    "partition {} stopped: vCPU {} {} ({}) at RIP {:#x}; other partitions keep their reservations",
                    self.name,
                    fault.vcpu,
                    fault.reason,
                    fault.detail,
                    fault.rip
                );
                crate::console::Record::new("partition_fault")
                    .str("partition", &self.name)
                    .u64("vcpu", fault.vcpu as u64)
                    .str("reason", fault.reason)
                    .str("detail", &fault.detail)
                    .fmt("rip", format_args!("{:#x}", fault.rip))
                    .str("action", action)
                    .emit();
            }
        }
    }

    /// Called by the home pCPU of vCPU `vcpu` (outside the guest) once per generation while a
    /// reset is pending. The last vCPU to park reloads the partition's memory and releases it
    /// under a new generation; returns true on that pCPU.
    pub fn park_for_reset(&self, parked_generation: &mut u64) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        if !self.reset_pending.load(Ordering::Acquire) || *parked_generation == generation + 1 {
            return false;
        }
        *parked_generation = generation + 1;
        if self.parked.fetch_add(1, Ordering::AcqRel) + 1 < self.vcpus {
            return false;
        }
        // Every vCPU is out of the guest: reload what the guest starts from (image, boot
        // information, page tables, statistics). The rest of its memory is its own and is
        // left as it was.
        let mut window = HostWindow { base: self.memory.start, size: self.memory.end - self.memory.start };
        let tables = FirmwareTables { sci_irq: self.sci_irq, pci: &self.pci_interrupts };
        if let Err(e) = load_payload(&mut window, self.images, &self.cmdline, self.vcpus, tables) {
            log::error!("partition {}: reset failed, it stays stopped: {e}", self.name);
            return true;
        }
        self.devices.power_on(self.payload == Payload::TestGuest);
        self.parked.store(0, Ordering::Release);
        *self.fault.lock() = None;
        self.done_vcpus.store(0, Ordering::Relaxed);
        let resets = self.resets.fetch_add(1, Ordering::AcqRel) + 1;
        self.reset_pending.store(false, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.stopped.store(false, Ordering::Release);
        crate::console::Record::new("partition_reset").str("partition", &self.name).u64("resets", resets).emit();
        true
    }

    /// A byte the guest wrote to its virtual UART: whole lines go to the console, prefixed
    /// with the partition's name; the console partition's (`phalanx.console`) go as they are.
    pub fn console_byte(&self, byte: u8) {
        if crate::machine::machine().console_input == Some(self.id) {
            crate::console::write_raw(&[byte]);
            return;
        }
        let mut line = self.console.lock();
        match byte {
            b'\n' => {
                log::info!("[{}] {}", self.name, line.as_str());
                line.clear();
            }
            b'\r' => {}
            b => {
                line.push(if b.is_ascii_graphic() || b == b' ' { b as char } else { '?' });
                // A line longer than this is printed in pieces rather than held or cut.
                if line.len() >= GUEST_LINE_MAX {
                    log::info!("[{}] {}", self.name, line.as_str());
                    line.clear();
                }
            }
        }
    }

    /// The test guest's own statistics record for one vCPU (read from its memory); zeros for
    /// other payloads, which report through their own console.
    pub fn guest_stats(&self, vcpu: u32) -> GuestStats {
        if self.payload != Payload::TestGuest {
            return GuestStats::default();
        }
        let mut bytes = [0u8; STATS_RECORD_SIZE as usize];
        let at = self.memory.start + GuestStats::gpa(vcpu);
        // SAFETY: the stats record lies inside the partition's own memory (checked when the
        // guest was loaded), identity-mapped; the guest may be writing it concurrently, and a
        // torn value only makes one sample stale.
        unsafe { core::ptr::copy_nonoverlapping(at as *const u8, bytes.as_mut_ptr(), bytes.len()) };
        GuestStats::from_bytes(&bytes)
    }
}

/// What a partition runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// The Phalanx test guest (guests/testguest): every vCPU enters it at once.
    TestGuest,
    /// A Linux bzImage, entered at `startup_64` on vCPU 0 through the boot protocol.
    Linux,
}

impl Payload {
    pub fn name(self) -> &'static str {
        match self {
            Payload::TestGuest => "testguest",
            Payload::Linux => "linux",
        }
    }
}

/// A partition's boot modules: its payload and, for a Linux kernel, an initrd.
#[derive(Clone, Copy)]
pub struct PayloadImages {
    pub image: &'static [u8],
    pub initrd: Option<&'static [u8]>,
}

/// What a Linux partition's ACPI tables say of its interrupts (`firmware::acpi::tables`).
#[derive(Clone, Copy)]
struct FirmwareTables<'a> {
    sci_irq: u8,
    pci: &'a [firmware::acpi::PciInterrupt],
}

/// Loads the payload into the partition's memory as the kind of payload it is (a bzImage goes
/// through the Linux boot protocol, with its initrd and the firmware tables, MP and ACPI;
/// anything else is the flat test guest) and returns each vCPU's initial state.
fn load_payload(
    window: &mut HostWindow,
    images: PayloadImages,
    cmdline: &str,
    vcpus: u32,
    tables: FirmwareTables,
) -> Result<(Payload, Vec<VcpuState>), String> {
    match firmware::payload::classify(images.image).map_err(|e| format!("{e}"))? {
        firmware::payload::Payload::Linux(kernel) => {
            let ioapic_id = firmware::mptable::ioapic_id(vcpus);
            let rsdp = firmware::acpi::write_acpi_tables(window, vcpus, ioapic_id, tables.sci_irq, tables.pci)
                .map_err(|e| format!("{e}"))?;
            firmware::mptable::write_mp_table(window, vcpus).map_err(|e| format!("{e}"))?;
            let params =
                firmware::linux::LinuxParams { kernel: &kernel, cmdline, initrd: images.initrd, acpi_rsdp: Some(rsdp) };
            let layout = firmware::linux::load_linux(window, &params).map_err(|e| format!("{e}"))?;
            let boot = firmware::linux::boot_vcpu_state(&layout);
            // Application processors wait for a start-up IPI; this state is replaced then.
            let waiting = firmware::linux::startup_ipi_state(0);
            Ok((Payload::Linux, (0..vcpus).map(|v| if v == 0 { boot } else { waiting }).collect()))
        }
        firmware::payload::Payload::TestGuest => {
            let params = BootParams { image: images.image, cmdline, vcpus, tsc_hz: crate::tsc::hz() };
            firmware::longmode::load_test_guest(window, &params).map_err(|e| format!("{e}"))?;
            Ok((Payload::TestGuest, (0..vcpus).map(firmware::longmode::initial_vcpu_state).collect()))
        }
    }
}

/// The guest's memory seen from the hypervisor: guest-physical `gpa` is host `base + gpa`.
struct HostWindow {
    base: u64,
    size: u64,
}

impl GuestMemory for HostWindow {
    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), GuestMemoryError> {
        let len = bytes.len() as u64;
        if gpa.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(GuestMemoryError { gpa, len, size: self.size });
        }
        // SAFETY: bounds checked against the partition's own memory, identity-mapped and
        // owned by no one else; no vCPU of the partition runs yet.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.base + gpa) as *mut u8, bytes.len()) };
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }
}
