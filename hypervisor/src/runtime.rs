//! Partitions at run time: each partition's memory loaded with its guest, its EPT, I/O and
//! MSR bitmaps, its console, its fault state; and the dispatch tables every pCPU executes.
//! Built once on the BSP from the validated config, before any pCPU enters a guest.

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use spin::{Mutex, Once};

use config::{DispatchPolicy, OnFault, Placement, Validated};
use ept::{Access, Ept, FrameAllocator, MemoryType, PageSizes, PhysMemory};
use firmware::longmode::{BootParams, GuestMemory, GuestMemoryError, GuestStats, VcpuState, STATS_RECORD_SIZE};
use sched::{DispatchTables, PartitionSpec, PlanConfig, VcpuRef};

use crate::memory::BootInfo;
use vmx::vmcs_image::PartitionContext;
use vmx::ControlSet;

/// Longest guest console line held before it is printed anyway (JSON records fit).
const GUEST_LINE_MAX: usize = 4096;

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
    pub context: PartitionContext,
    pub stopped: AtomicBool,
    pub fault: Mutex<Option<Fault>>,
    /// A fault is recorded but its report not yet written.
    fault_unreported: AtomicBool,
    console: Mutex<String>,
    /// The partition's COM1 and IO-APIC, and the UART's interrupt line (for edges).
    pub uart: Mutex<vmx::vuart::VirtualUart>,
    pub ioapic: Mutex<vmx::vioapic::VirtualIoApic>,
    uart_line: AtomicBool,
    pub done_vcpus: AtomicU64,
    pub hypercalls: AtomicU64,
    /// The payload and its boot parameters, kept to reload the partition on a reset.
    image: &'static [u8],
    pub payload: Payload,
    /// Each vCPU's power-on register state.
    pub initial_states: Vec<VcpuState>,
    /// Whether each vCPU was started (a Linux partition's application processors wait for
    /// their start-up IPI; the test guest starts on every vCPU at once).
    pub started: Vec<AtomicBool>,
    cmdline: String,
    /// Bumped by each reset: a vCPU whose VMCS was set up for an older generation is set up
    /// again before it runs.
    pub generation: AtomicU64,
    /// A reset waits until every vCPU is parked (out of the guest, on its own pCPU).
    reset_pending: AtomicBool,
    parked: AtomicU32,
    pub resets: AtomicU64,
    /// Guest cycles per vCPU (relaxed co-scheduling compares siblings' progress).
    pub vcpu_run_cycles: Vec<AtomicU64>,
    /// IPIs sent to each vCPU by its siblings (256-bit vector sets), taken into the target's
    /// virtual LAPIC by its own pCPU before it next enters the guest.
    pending_ipis: Vec<[AtomicU64; 4]>,
    /// Each vCPU's logical APIC ID (its LDR), for logical-destination IPIs.
    logical_ids: Vec<core::sync::atomic::AtomicU8>,
    /// A start-up IPI's vector for each vCPU (0x100 | vector), until its pCPU takes it.
    startup_vectors: Vec<AtomicU32>,
}

impl Partition {
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Sets the UART's interrupt line; true on a rising edge.
    pub fn set_uart_line(&self, asserted: bool) -> bool {
        !self.uart_line.swap(asserted, Ordering::AcqRel) && asserted
    }

    pub fn set_logical_id(&self, vcpu: u32, id: u8) {
        self.logical_ids[vcpu as usize].store(id, Ordering::Release);
    }

    /// Whether vCPU `target` is a destination of `command` sent by vCPU `sender` (APIC ID =
    /// vCPU index; logical IDs as each vCPU last wrote its LDR, flat model).
    pub fn is_ipi_target(&self, target: u32, sender: u32, command: vmx::vlapic::IcrCommand) -> bool {
        use vmx::vlapic::{Destination, IcrCommand};
        let destination = match command {
            IcrCommand::Fixed { destination, .. }
            | IcrCommand::Nmi { destination }
            | IcrCommand::Init { destination }
            | IcrCommand::Startup { destination, .. } => destination,
            IcrCommand::Unsupported { .. } => return false,
        };
        match destination {
            Destination::Physical(id) => id == 0xFF || id as u32 == target,
            Destination::Logical(mask) => self.logical_ids[target as usize].load(Ordering::Acquire) & mask != 0,
            Destination::SelfOnly => target == sender,
            Destination::AllIncludingSelf => true,
            Destination::AllExcludingSelf => target != sender,
        }
    }

    /// A start-up IPI for `vcpu`: true if it was waiting for one (it then starts in real mode
    /// at `vector * 4096`, set up by its own pCPU).
    pub fn start(&self, vcpu: u32, vector: u8) -> bool {
        let started = &self.started[vcpu as usize];
        if started.load(Ordering::Acquire) {
            return false;
        }
        self.startup_vectors[vcpu as usize].store(0x100 | vector as u32, Ordering::Release);
        started.store(true, Ordering::Release);
        true
    }

    /// The start-up vector posted for `vcpu`, once.
    pub fn take_startup(&self, vcpu: u32) -> Option<u8> {
        let slot = &self.startup_vectors[vcpu as usize];
        if slot.load(Ordering::Acquire) == 0 {
            return None;
        }
        match slot.swap(0, Ordering::AcqRel) {
            0 => None,
            v => Some(v as u8),
        }
    }

    /// Posts `vector` to vCPU `vcpu` (from a sibling's ICR write).
    pub fn post_ipi(&self, vcpu: u32, vector: u8) {
        if let Some(bits) = self.pending_ipis.get(vcpu as usize) {
            bits[vector as usize / 64].fetch_or(1 << (vector % 64), Ordering::AcqRel);
        }
    }

    /// Takes the IPIs posted to `vcpu` into its virtual LAPIC.
    pub fn take_ipis(&self, vcpu: u32, lapic: &mut vmx::vlapic::VirtualLapic) {
        for (word, bits) in self.pending_ipis[vcpu as usize].iter().enumerate() {
            if bits.load(Ordering::Acquire) == 0 {
                continue;
            }
            let mut set = bits.swap(0, Ordering::AcqRel);
            while set != 0 {
                let bit = set.trailing_zeros();
                lapic.accept((word as u32 * 64 + bit) as u8);
                set &= set - 1;
            }
        }
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

    /// Reads guest-physical memory (8 bytes), `None` outside the partition.
    pub fn read_guest_u64(&self, gpa: u64) -> Option<u64> {
        let size = self.memory.end - self.memory.start;
        if gpa.checked_add(8)? > size {
            return None;
        }
        // SAFETY: bounds-checked inside the partition's own identity-mapped memory; a value
        // the guest changes concurrently is just the guest's current value.
        Some(unsafe { core::ptr::read_unaligned((self.memory.start + gpa) as *const u64) })
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

    fn stop_and_maybe_reset(&self, fault: Fault, reset: bool) {
        let mut slot = self.fault.lock();
        if slot.is_none() {
            *slot = Some(fault);
            self.fault_unreported.store(true, Ordering::Release);
        }
        drop(slot);
        if reset {
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
            .str(
                "action",
                match self.on_fault {
                    OnFault::Stop => "stopped",
                    OnFault::Reset => "reset",
                },
            )
            .emit();
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
        if let Err(e) = load_payload(&mut window, self.image, &self.cmdline, self.vcpus) {
            log::error!("partition {}: reset failed, it stays stopped: {e}", self.name);
            return true;
        }
        for (v, started) in self.started.iter().enumerate() {
            started.store(self.payload == Payload::TestGuest || v == 0, Ordering::Release);
        }
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

    /// A byte the guest wrote to its virtual UART; whole lines go to the console.
    pub fn console_byte(&self, byte: u8) {
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

/// Loads `image` into the partition's memory as the kind of payload it is (a bzImage goes
/// through the Linux boot protocol, anything else is the flat test guest) and returns each
/// vCPU's initial state.
fn load_payload(
    window: &mut HostWindow,
    image: &[u8],
    cmdline: &str,
    vcpus: u32,
) -> Result<(Payload, Vec<VcpuState>), String> {
    match firmware::linux::BzImage::parse(image) {
        Ok(kernel) => {
            let params = firmware::linux::LinuxParams { kernel: &kernel, cmdline, initrd: None, acpi_rsdp: None };
            let layout = firmware::linux::load_linux(window, &params).map_err(|e| format!("{e}"))?;
            firmware::mptable::write_mp_table(window, vcpus).map_err(|e| format!("{e}"))?;
            let boot = firmware::linux::boot_vcpu_state(&layout);
            // Application processors wait for a start-up IPI; this state is replaced then.
            let waiting = firmware::linux::startup_ipi_state(0);
            Ok((Payload::Linux, (0..vcpus).map(|v| if v == 0 { boot } else { waiting }).collect()))
        }
        // A bzImage this loader cannot boot is an error; anything without the header is
        // taken as the flat test guest.
        Err(e @ (firmware::linux::LinuxError::ProtocolTooOld { .. } | firmware::linux::LinuxError::No64BitEntry)) => {
            Err(format!("{e}"))
        }
        Err(_) => {
            let params = BootParams { image, cmdline, vcpus, tsc_hz: crate::tsc::hz() };
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

/// Table pages come from the hypervisor heap (identity-mapped: address = physical).
struct HeapFrames;

impl FrameAllocator for HeapFrames {
    fn allocate_zeroed_frame(&mut self) -> Option<u64> {
        Some(crate::memory::alloc_zeroed_pages(1).as_ptr() as u64)
    }
}

struct IdentityPhys;

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

pub struct Machine {
    pub partitions: Vec<Partition>,
    pub tables: DispatchTables,
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
}

static MACHINE: Once<Machine> = Once::new();

pub fn machine() -> &'static Machine {
    MACHINE.get().expect("machine built before dispatch")
}

/// Loads every partition and plans the dispatch tables. `Err` names the partition.
pub fn build(
    validated: &Validated,
    boot: &BootInfo,
    controls: ControlSet,
    pcpus: usize,
    force_interrupts_on: bool,
) -> Result<&'static Machine, String> {
    let config = &validated.config;
    let features = controls.caps.features();
    let sizes = PageSizes { huge_1g: features.ept_1g_pages, large_2m: features.ept_2m_pages };
    let tsc_per_us = crate::tsc::hz() / 1_000_000;
    let mut partitions = Vec::new();
    for (id, (p, placement)) in config.partitions.iter().zip(&validated.memory).enumerate() {
        let memory = match placement {
            Placement::At(range) => range.clone(),
            Placement::Deferred { .. } => return Err(format!("partition {}: memory was not placed", p.name)),
        };
        let module = boot
            .modules
            .iter()
            .find(|m| m.name == p.guest.module)
            .ok_or_else(|| format!("partition {}: no boot module {}", p.name, p.guest.module))?;
        let image = module.bytes();
        let size = memory.end - memory.start;
        // SAFETY: the partition's memory range, placed by validation inside usable RAM that
        // nothing else owns; cleared so no data of an earlier occupant leaks into the guest.
        unsafe { core::ptr::write_bytes(memory.start as *mut u8, 0, size as usize) };
        let mut window = HostWindow { base: memory.start, size };
        let (payload, initial_states) = load_payload(&mut window, image, &p.guest.cmdline, p.vcpus)
            .map_err(|e| format!("partition {} ({}): {e}", p.name, p.guest.module))?;
        let mut ept = Ept::new(&mut HeapFrames).map_err(|e| format!("partition {}: {e}", p.name))?;
        ept.map(&mut IdentityPhys, &mut HeapFrames, 0, memory.start, size, Access::all(), MemoryType::WriteBack, sizes)
            .map_err(|e| format!("partition {}: EPT: {e}", p.name))?;
        let (io_bitmap_a, io_bitmap_b) = io_bitmaps(&p.devices.ioports);
        let context = PartitionContext { eptp: ept.eptp(false), io_bitmap_a, io_bitmap_b, msr_bitmap: msr_bitmap() };
        Box::leak(Box::new(ept));
        partitions.push(Partition {
            id,
            name: p.name.clone(),
            memory,
            vcpus: p.vcpus,
            on_fault: p.on_fault,
            context,
            stopped: AtomicBool::new(false),
            fault: Mutex::new(None),
            fault_unreported: AtomicBool::new(false),
            console: Mutex::new(String::new()),
            uart: Mutex::new(vmx::vuart::VirtualUart::new()),
            ioapic: Mutex::new(vmx::vioapic::VirtualIoApic::new(firmware::mptable::ioapic_id(p.vcpus))),
            uart_line: AtomicBool::new(false),
            done_vcpus: AtomicU64::new(0),
            hypercalls: AtomicU64::new(0),
            image,
            payload,
            initial_states,
            started: (0..p.vcpus).map(|v| AtomicBool::new(payload == Payload::TestGuest || v == 0)).collect(),
            cmdline: p.guest.cmdline.clone(),
            generation: AtomicU64::new(0),
            reset_pending: AtomicBool::new(false),
            parked: AtomicU32::new(0),
            resets: AtomicU64::new(0),
            vcpu_run_cycles: (0..p.vcpus).map(|_| AtomicU64::new(0)).collect(),
            pending_ipis: (0..p.vcpus).map(|_| [const { AtomicU64::new(0) }; 4]).collect(),
            logical_ids: (0..p.vcpus).map(|_| core::sync::atomic::AtomicU8::new(0)).collect(),
            startup_vectors: (0..p.vcpus).map(|_| AtomicU32::new(0)).collect(),
        });
    }

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
    // now, at boot, rather than in the middle of a Linux partition's first device access.
    if partitions.iter().any(|p| p.payload == Payload::Linux) {
        let _ = vmx::mmio::decode(&[0x8B, 0x00], 0);
    }

    // Reservations in microseconds -> TSC cycles, then the planner.
    let specs: Vec<PartitionSpec> = validated
        .tree
        .flatten()
        .iter()
        .map(|flat| {
            let mut spec = PartitionSpec::from(flat);
            spec.gang = config.hypervisor.policy.aligned();
            if let sched::Reservation::Hard { budget, period } = spec.reservation {
                spec.reservation =
                    sched::Reservation::Hard { budget: budget * tsc_per_us, period: period * tsc_per_us };
            }
            spec
        })
        .collect();
    let frame_cycles = config.hypervisor.major_frame_us * tsc_per_us;
    let plan_config = PlanConfig { frame: Some(frame_cycles), ..PlanConfig::new(pcpus as u32, frame_cycles) };
    let plan = if config.hypervisor.policy.aligned() {
        sched::plan_gang(&specs, &plan_config)
    } else {
        // The baseline: each pCPU round-robins its vCPUs over one frame, pCPUs staggered.
        sched::plan_independent(
            &specs,
            &plan_config,
            &sched::IndependentConfig { cycle: frame_cycles, seed: 1, shuffle: false },
        )
    }
    .map_err(|e| format!("planner: {e}"))?;
    let tables = DispatchTables::compile(&plan, &specs).map_err(|e| format!("planner: {e}"))?;

    // Each vCPU must have one home pCPU (its VMCS stays loaded there).
    let mut homes: Vec<Vec<Option<usize>>> = partitions.iter().map(|p| alloc::vec![None; p.vcpus as usize]).collect();
    for (pcpu, table) in tables.pcpus.iter().enumerate() {
        for VcpuRef { partition, vcpu } in
            table.entries.iter().filter_map(|e| e.run).chain(table.slack_ring.iter().map(|s| s.0))
        {
            let home = &mut homes[partition as usize][vcpu as usize];
            match *home {
                None => *home = Some(pcpu),
                Some(h) if h == pcpu => {}
                Some(h) => {
                    return Err(format!(
                        "partition {}: vCPU {vcpu} would run on pCPUs {h} and {pcpu}; vCPU migration between pCPUs is not supported yet (give it as many pCPUs as vCPUs)",
                        partitions[partition as usize].name
                    ))
                }
            }
        }
    }
    let homes = homes
        .into_iter()
        .enumerate()
        .map(|(p, v)| {
            v.into_iter()
                .enumerate()
                .map(|(i, h)| h.ok_or_else(|| format!("partition {}: vCPU {i} is never scheduled", partitions[p].name)))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let skew_bound = (config.hypervisor.policy == DispatchPolicy::RelaxedCo)
        .then(|| config.hypervisor.skew_bound_us.unwrap_or(config.hypervisor.major_frame_us / 10) * tsc_per_us);
    Ok(MACHINE.call_once(|| Machine {
        partitions,
        tables,
        policy: config.hypervisor.policy,
        controls,
        force_interrupts_on,
        homes,
        frame_cycles,
        skew_bound,
    }))
}
