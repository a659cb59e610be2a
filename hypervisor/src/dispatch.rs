//! Phase-locked gang dispatch: every pCPU executes its own table from the planner against
//! the common release time `t0`. At each boundary its LAPIC timer (armed for the absolute
//! TSC deadline) makes the running guest exit; the pCPU enters whatever its table says next.
//! No IPI and no lock is on this path: pCPUs agree only through `t0` and the tables.

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

use config::DispatchPolicy;
use reservations::{Account, Ledger, Work};
use sched::VcpuRef;
use vmx::{ExitReason, Handler, IoAccess};

use crate::apic::{self, TimerMode};
use crate::cpu::MAX_CPUS;
use crate::runtime::{machine, Fault, Partition};
use crate::vcpu::Vcpu;
use crate::vmcs::{self, guest, ro};

/// Vector of the dispatch timer (the phase-lock test uses its own).
pub const DISPATCH_VECTOR: u8 = 0x41;
/// Sent to a pCPU to make its guest exit (or its idle loop wake) at once: a sibling vCPU
/// posted it an IPI or started it.
pub const KICK_VECTOR: u8 = 0x42;
/// The VMX-preemption timer fires this long after a boundary whose timer interrupt did not
/// stop the guest: the guard that a guest cannot overrun its slot.
const PREEMPTION_GUARD_CYCLES: u64 = 2_000;
/// An idle pCPU wakes this long before the next boundary and spins to it.
const IDLE_WAKE_MARGIN_CYCLES: u64 = 2_000;
/// Most slot entries each pCPU remembers for the skew statistics.
const MAX_SLOT_ENTRIES: usize = 8192;
/// Basic exit reasons tracked one by one (every one the SDM defines fits).
pub const EXIT_REASONS: usize = 80;

/// Set for a pCPU when one of its vCPUs was sent an IPI or a start-up: the next boundary
/// looks at its vCPUs' pending work (otherwise the slot path skips that).
static ATTENTION: [core::sync::atomic::AtomicBool; MAX_CPUS] =
    [const { core::sync::atomic::AtomicBool::new(false) }; MAX_CPUS];
static T0: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);
static NEXT_PROGRESS: AtomicU64 = AtomicU64::new(u64::MAX);
static PROGRESS_INTERVAL: AtomicU64 = AtomicU64::new(0);

/// Why a vCPU's turn on the pCPU ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TurnEnd {
    Deadline,
    Halted,
    Stopped,
    /// PAUSE-loop exit under the `independent-yield` policy: the rest of the slot is given away.
    Yielded,
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

/// What a pCPU hands to the BSP at the end of the run.
pub struct PcpuResult {
    pub ledger: Ledger,
    pub exits: [ExitStat; EXIT_REASONS],
    pub slot_entries: Vec<SlotEntry>,
    pub guard_exits: u64,
    pub yields: u64,
}

pub static RESULTS: [Mutex<Option<PcpuResult>>; MAX_CPUS] = [const { Mutex::new(None) }; MAX_CPUS];

pub fn set_schedule(t0: u64, end: u64, progress_interval: u64) {
    T0.store(t0, Ordering::Release);
    END.store(end, Ordering::Release);
    PROGRESS_INTERVAL.store(progress_interval, Ordering::Release);
    NEXT_PROGRESS.store(t0 + progress_interval, Ordering::Release);
}

pub fn t0() -> u64 {
    T0.load(Ordering::Acquire)
}

pub fn end() -> u64 {
    END.load(Ordering::Acquire)
}

fn timer_mode() -> TimerMode {
    if apic::has_tsc_deadline() {
        TimerMode::TscDeadline
    } else {
        TimerMode::OneShot
    }
}

struct Pcpu {
    cpu: usize,
    vcpus: Vec<Vcpu>,
    loaded: Option<usize>,
    ledger: Ledger,
    /// The ledger is charged up to here.
    cursor: u64,
    exits: [ExitStat; EXIT_REASONS],
    slot_entries: Vec<SlotEntry>,
    guard_exits: u64,
    yields: u64,
    preemption_shift: u8,
}

impl Pcpu {
    fn charge(&mut self, account: Account, to: u64) {
        self.ledger.charge(account, self.cursor, to);
        self.cursor = to;
    }

    fn find(&self, v: VcpuRef) -> Option<usize> {
        self.vcpus.iter().position(|x| x.partition == v.partition as usize && x.index == v.vcpu)
    }

    fn runnable(&self, v: VcpuRef) -> bool {
        let m = machine();
        let partition = &m.partitions[v.partition as usize];
        self.find(v).is_some_and(|i| !self.vcpus[i].halted && !partition.is_stopped())
            && partition.started[v.vcpu as usize].load(Ordering::Acquire)
            && !m.skew_bound.is_some_and(|bound| partition.co_stopped(v.vcpu, bound))
    }

    /// Starts vCPUs a sibling sent a start-up IPI: their VMCS is set up again, on this pCPU,
    /// in real mode at the vector's page.
    fn follow_starts(&mut self) {
        let m = machine();
        for index in 0..self.vcpus.len() {
            let v = &mut self.vcpus[index];
            let partition = &m.partitions[v.partition];
            if let Some(vector) = partition.take_startup(v.index) {
                if set_up(v, partition, &firmware::linux::startup_ipi_state(vector)) {
                    self.loaded = Some(index);
                }
            }
        }
    }

    /// A halted vCPU becomes runnable again when its virtual LAPIC has something to deliver
    /// (its timer came due, or a sibling sent an IPI).
    fn wake_halted(&mut self, now: u64) {
        let m = machine();
        for v in self.vcpus.iter_mut().filter(|v| v.halted) {
            if interrupt_due(&m.partitions[v.partition], v, now) {
                v.halted = false;
            }
        }
    }

    /// In a slot of `partition`: parks this pCPU's vCPUs of it if it waits for a reset, and
    /// sets them up again (on this pCPU) once it was reset. Done only in the partition's own
    /// slots and charged to it, so a reset takes no time from anyone else.
    fn follow_resets(&mut self, partition_id: usize) {
        let m = machine();
        let partition = &m.partitions[partition_id];
        let generation = partition.generation.load(Ordering::Acquire);
        let current = self.vcpus.iter().all(|v| v.partition != partition_id || v.generation == generation);
        if current && !partition.reset_pending() && !partition.fault_unreported() {
            return;
        }
        let start = crate::tsc::now();
        partition.report_fault();
        for index in 0..self.vcpus.len() {
            let v = &mut self.vcpus[index];
            if v.partition != partition_id {
                continue;
            }
            let partition = &m.partitions[v.partition];
            partition.park_for_reset(&mut v.parked_generation);
            let generation = partition.generation.load(Ordering::Acquire);
            if v.generation != generation && !partition.is_stopped() {
                v.generation = generation;
                if set_up(v, partition, &partition.initial_states[v.index as usize]) {
                    self.loaded = Some(index);
                }
            }
        }
        self.charge(Account::OnBehalf(partition_id as reservations::PartitionId, Work::SlotSwitch), start);
        self.charge(
            Account::OnBehalf(partition_id as reservations::PartitionId, Work::ExitHandling),
            crate::tsc::now(),
        );
    }
}

/// Sets `v` up to enter in `state`; a VMCS that fails the VM-entry checks stops the partition
/// with a fault naming the field. `true` when the vCPU's VMCS is now current.
fn set_up(v: &mut Vcpu, partition: &Partition, state: &firmware::longmode::VcpuState) -> bool {
    let m = machine();
    match v.setup(&m.controls, &partition.context, state, m.force_interrupts_on) {
        Ok(()) => true,
        Err(failure) => {
            let fault =
                Fault { vcpu: v.index, reason: "vm-entry-check", detail: alloc::format!("{failure}"), rip: state.rip };
            partition.refuse(fault);
            false
        }
    }
}

/// The dispatch loop of one pCPU, from `t0` to the end of the run.
pub fn run_pcpu(cpu: usize) {
    let m = machine();
    let mut vcpus = Vec::new();
    let mut vpid = 1u16;
    for (p, homes) in m.homes.iter().enumerate() {
        for (i, &home) in homes.iter().enumerate() {
            if home == cpu {
                let mut v = Vcpu::new(p, i as u32, vpid, &m.controls.caps);
                set_up(&mut v, &m.partitions[p], &m.partitions[p].initial_states[i]);
                vcpus.push(v);
            }
            vpid += 1;
        }
    }
    let t0 = t0();
    let end = end();
    let mode = timer_mode();
    apic::setup_timer(mode, DISPATCH_VECTOR);
    let mut pcpu = Pcpu {
        cpu,
        loaded: None,
        vcpus,
        ledger: Ledger::new(cpu as u32, m.partitions.len(), t0),
        cursor: t0,
        exits: [ExitStat::default(); EXIT_REASONS],
        slot_entries: Vec::with_capacity(MAX_SLOT_ENTRIES),
        guard_exits: 0,
        yields: 0,
        preemption_shift: m.controls.caps.features().preemption_timer_shift,
    };
    let mut dispatcher = m.tables.dispatcher(cpu, t0);
    crate::tsc::spin_until(t0);
    let mut decision = dispatcher.on_boundary(crate::tsc::now());
    let mut slot_start = t0;
    // The current decision is the first of its slot (gang skew is measured there only).
    let mut slot_fresh = true;
    // The owner gave the rest of this slot away (directed yield): it does not take it back.
    let mut yielded_slot = false;
    loop {
        let now = crate::tsc::now();
        if now >= end {
            pcpu.charge(Account::Overhead, now);
            break;
        }
        // Statistics are the hypervisor's own work; everything else from here to the next
        // vCPU's first entry (the decision, pending starts and wake-ups, loading its VMCS) is
        // the switch into that vCPU's slot, and run_turn charges it to its partition.
        if cpu == 0 && maybe_report_progress(now) {
            pcpu.charge(Account::Overhead, crate::tsc::now());
        }
        let _ = crate::console::pump();
        if ATTENTION[cpu].swap(false, Ordering::AcqRel) || pcpu.vcpus.iter().any(|v| v.halted) {
            pcpu.follow_starts();
            pcpu.wake_halted(now);
        }
        // A slot owner that woke up (its timer, an IPI) takes its slot back from slack.
        let owner = dispatcher.owner_decision();
        if !yielded_slot && decision.run != owner.run && owner.run.is_some_and(|v| pcpu.runnable(v)) {
            decision = dispatcher.reclaim();
        }
        if let Some(owner) = decision.run.filter(|_| !decision.lent) {
            pcpu.follow_resets(owner.partition as usize);
        }
        if !decision.run.is_some_and(|v| pcpu.runnable(v)) && !decision.lent {
            // The slot's owner is halted or stopped, or the slot is empty: lend it.
            decision = dispatcher.on_halt(now, |v| pcpu.runnable(v));
        }
        let deadline = decision.next_deadline.min(end);
        apic::arm_deadline(mode, deadline);
        let turn = decision.run.filter(|&v| pcpu.runnable(v)).and_then(|v| pcpu.find(v));
        let ended = match turn {
            // From here to the vCPU's first entry (loading its VMCS) is the switch into its
            // slot: run_turn charges it to the partition, whose slot it comes out of.
            // Only the owner's entry at the start of its slot counts for gang skew (lent slack,
            // or an owner that woke up mid-slot, is not a gang start).
            Some(index) => {
                Some(run_turn(&mut pcpu, index, deadline, (slot_fresh && !decision.lent).then_some(slot_start)))
            }
            None => {
                // A halted vCPU here whose timer comes due first ends the idle early.
                let wake = pcpu.vcpus.iter().filter(|v| v.halted).filter_map(|v| v.lapic.timer_deadline()).min();
                idle_until(&mut pcpu, wake.map_or(deadline, |w| w.min(deadline)));
                None
            }
        };
        let now = crate::tsc::now();
        slot_fresh = false;
        if now >= decision.next_deadline {
            slot_start = decision.next_deadline;
            decision = dispatcher.on_boundary(now);
            slot_fresh = true;
            yielded_slot = false;
        } else {
            // The vCPU halted, stopped or yielded (or nothing could run): lend the rest of
            // the slot, decided locally.
            if ended == Some(TurnEnd::Yielded) {
                pcpu.yields += 1;
                yielded_slot = true;
            }
            let yielder = decision.run;
            decision = dispatcher.on_halt(now, |v| Some(v) != yielder && pcpu.runnable(v));
            if decision.run.is_none() && ended == Some(TurnEnd::Yielded) {
                // Directed yield as a KVM host does it: the spinning vCPU gives its pCPU to
                // another runnable vCPU there for the rest of the slot.
                decision.run = pcpu
                    .vcpus
                    .iter()
                    .map(|v| VcpuRef { partition: v.partition as reservations::PartitionId, vcpu: v.index })
                    .find(|&v| Some(v) != yielder && pcpu.runnable(v));
            }
        }
    }
    apic::mask_timer();
    *RESULTS[cpu].lock() = Some(PcpuResult {
        ledger: pcpu.ledger,
        exits: pcpu.exits,
        slot_entries: pcpu.slot_entries,
        guard_exits: pcpu.guard_exits,
        yields: pcpu.yields,
    });
}

/// Nothing to run: halt the pCPU until the deadline's timer interrupt.
fn idle_until(pcpu: &mut Pcpu, deadline: u64) {
    pcpu.charge(Account::Overhead, crate::tsc::now());
    // Wake a little early and spin the rest: taking the timer interrupt out of `hlt` costs
    // about a thousand cycles, which would otherwise come out of the next slot.
    let wake = deadline.saturating_sub(IDLE_WAKE_MARGIN_CYCLES);
    if crate::tsc::now() < wake {
        apic::arm_deadline(timer_mode(), wake);
    }
    while crate::tsc::now() < wake {
        // Idle time drains the console; with nothing to print, halt until the timer.
        if crate::console::pump() {
            core::hint::spin_loop();
            continue;
        }
        // `sti; hlt` cannot lose the wake-up; the interrupt handler only acknowledges it.
        x86_64::instructions::interrupts::enable_and_hlt();
        x86_64::instructions::interrupts::disable();
    }
    crate::tsc::spin_until(deadline);
    pcpu.charge(Account::Idle, crate::tsc::now());
}

fn run_turn(pcpu: &mut Pcpu, index: usize, deadline: u64, owned_slot_start: Option<u64>) -> TurnEnd {
    let m = machine();
    let partition_id = pcpu.vcpus[index].partition;
    let partition = &m.partitions[partition_id];
    let account_id = partition_id as reservations::PartitionId;
    if pcpu.loaded != Some(index) {
        pcpu.vcpus[index].load();
        pcpu.loaded = Some(index);
    }
    pcpu.ledger.note_slot(account_id);
    let mut first_entry = true;
    let mut last_reason: Option<usize> = None;
    let end = loop {
        if partition.is_stopped() {
            break TurnEnd::Stopped;
        }
        let now = crate::tsc::now();
        if now >= deadline {
            break TurnEnd::Deadline;
        }
        // The vCPU's virtual LAPIC: take siblings' IPIs, run its timer, inject what is due.
        let vcpu = &mut pcpu.vcpus[index];
        interrupt_due(partition, vcpu, now);
        vcpu.deliver_interrupts(&m.controls);
        // Exit by the slot boundary (guard) or when the guest's own timer is due.
        let wake = vcpu.lapic.timer_deadline().map_or(u64::MAX, |d| d.saturating_sub(now));
        let guard = ((deadline - now + PREEMPTION_GUARD_CYCLES).min(wake.max(1))) >> pcpu.preemption_shift;
        vmcs::write(guest::VMX_PREEMPTION_TIMER_VALUE, guard.min(u32::MAX as u64));
        let entry = crate::tsc::now();
        let handling = entry - pcpu.cursor;
        if let Some(reason) = last_reason.take() {
            pcpu.exits[reason].cycles += handling;
        }
        let work = if first_entry { Work::SlotSwitch } else { Work::ExitHandling };
        pcpu.charge(Account::OnBehalf(account_id, work), entry);
        if first_entry {
            first_entry = false;
            // The first entry into the slot only (a vCPU that halted and was woken re-enters).
            let already = |s: u64| {
                pcpu.slot_entries.last().is_some_and(|e| e.slot_start == s && e.partition == partition_id as u32)
            };
            if let Some(slot_start) =
                owned_slot_start.filter(|&s| !already(s) && pcpu.slot_entries.len() < MAX_SLOT_ENTRIES)
            {
                pcpu.slot_entries.push(SlotEntry { slot_start, partition: partition_id as u32, entry_tsc: entry });
            }
        }
        let result = pcpu.vcpus[index].enter();
        let exit = crate::tsc::now();
        partition.vcpu_run_cycles[pcpu.vcpus[index].index as usize].fetch_add(exit - entry, Ordering::Relaxed);
        pcpu.charge(Account::Guest(account_id), exit);
        if let Err(error) = result {
            partition.stop(Fault {
                vcpu: pcpu.vcpus[index].index,
                reason: "vm-entry-failed",
                detail: alloc::format!("VM-instruction error {error}"),
                rip: vmcs::read(guest::RIP),
            });
            break TurnEnd::Stopped;
        }
        pcpu.ledger.note_exit(account_id);
        let raw = vmcs::read(ro::EXIT_REASON) as u32;
        let reason = ExitReason::from_raw(raw);
        let slot = (reason.number() as usize).min(EXIT_REASONS - 1);
        pcpu.exits[slot].count += 1;
        last_reason = Some(slot);
        match handle_exit(pcpu, index, partition, reason, raw, deadline) {
            None => continue,
            Some(end) => break end,
        }
    };
    let now = crate::tsc::now();
    if let Some(reason) = last_reason {
        pcpu.exits[reason].cycles += now - pcpu.cursor;
    }
    // Leaving the slot at its boundary is the scheduler's own switch-out, done in the next
    // slot's time: the hypervisor's overhead (each partition pays only its switch-in, inside
    // its own slot). Handling that ends a turn early is work on the partition's behalf.
    let account = match end {
        TurnEnd::Deadline => Account::Overhead,
        _ => Account::OnBehalf(account_id, Work::ExitHandling),
    };
    pcpu.charge(account, now);
    end
}

/// Handles one VM exit; `None` resumes the guest.
fn handle_exit(
    pcpu: &mut Pcpu,
    index: usize,
    partition: &Partition,
    reason: ExitReason,
    raw: u32,
    deadline: u64,
) -> Option<TurnEnd> {
    let account_id = partition.id as reservations::PartitionId;
    let vcpu = &mut pcpu.vcpus[index];
    let rip = vmcs::read(guest::RIP);
    let vcpu_index = vcpu.index;
    let stop = |reason: &'static str, detail: alloc::string::String| {
        partition.stop(Fault { vcpu: vcpu_index, reason, detail, rip });
        Some(TurnEnd::Stopped)
    };
    match reason.handler() {
        Handler::HostInterrupt => {
            let info = vmcs::read(ro::VMEXIT_INTERRUPTION_INFO) as u32;
            if let Some(vector) = vmx::exit::interrupt_vector(info) {
                if vector != DISPATCH_VECTOR && vector != KICK_VECTOR {
                    log::warn!("cpu{}: unexpected interrupt vector {vector:#x} while a guest ran", pcpu.cpu);
                }
                apic::eoi();
            }
            None
        }
        Handler::SlotGuard => {
            // Either the boundary passed without the timer interrupt stopping the guest (the
            // guard), or the guest's own LAPIC timer came due (handled before the next entry).
            if crate::tsc::now() >= deadline {
                pcpu.guard_exits += 1;
            }
            None
        }
        Handler::InterruptWindow => None,
        Handler::Halt => {
            vcpu.skip_instruction();
            if interrupt_due(partition, vcpu, crate::tsc::now()) {
                return None;
            }
            // Halted until its timer (within this slot: the pCPU waits for it) or an IPI.
            match vcpu.lapic.timer_deadline() {
                Some(wake) if wake < deadline => {
                    crate::tsc::spin_until(wake);
                    None
                }
                _ => {
                    vcpu.halted = true;
                    Some(TurnEnd::Halted)
                }
            }
        }
        Handler::PauseLoop => {
            pcpu.ledger.note_pause_loop_exit(account_id);
            vcpu.skip_instruction();
            (machine().policy == DispatchPolicy::IndependentYield).then_some(TurnEnd::Yielded)
        }
        Handler::Hypercall => {
            partition.hypercalls.fetch_add(1, Ordering::Relaxed);
            let call = vcpu.regs.rax;
            vcpu.skip_instruction();
            vcpu.regs.rax = 0;
            match call {
                firmware::longmode::HYPERCALL_REPORT => None,
                firmware::longmode::HYPERCALL_DONE => {
                    partition.done_vcpus.fetch_add(1, Ordering::Relaxed);
                    None
                }
                firmware::longmode::HYPERCALL_ERROR => {
                    stop("guest-error", "the guest reported an error on its console".into())
                }
                other => {
                    vcpu.regs.rax = u64::MAX;
                    log::warn!("[{}] unknown hypercall {other}", partition.name);
                    None
                }
            }
        }
        Handler::PortIo => {
            let access = IoAccess::decode(vmcs::read(ro::EXIT_QUALIFICATION));
            if access.string || access.rep {
                return stop("refused", alloc::format!("string I/O on port {:#x} is not emulated", access.port));
            }
            emulate_port(partition, vcpu, access);
            vcpu.skip_instruction();
            None
        }
        Handler::Cpuid => {
            let (leaf, subleaf) = (vcpu.regs.rax as u32, vcpu.regs.rcx as u32);
            let native = core::arch::x86_64::__cpuid_count(leaf, subleaf);
            let host = vmx::cpuid::CpuidResult { eax: native.eax, ebx: native.ebx, ecx: native.ecx, edx: native.edx };
            let cpu = vmx::cpuid::GuestCpu { apic_id: vcpu.index as u8, tsc_hz: crate::tsc::hz() };
            let r = vmx::cpuid::filter(leaf, subleaf, host, &cpu);
            vcpu.regs.rax = r.eax as u64;
            vcpu.regs.rbx = r.ebx as u64;
            vcpu.regs.rcx = r.ecx as u64;
            vcpu.regs.rdx = r.edx as u64;
            vcpu.skip_instruction();
            None
        }
        Handler::Msr => {
            emulate_msr(vcpu, reason == ExitReason::Wrmsr);
            None
        }
        Handler::SkipInstruction => {
            vcpu.skip_instruction();
            None
        }
        Handler::InjectUndefined => {
            vcpu.inject_exception(6, None);
            None
        }
        Handler::MemoryFault => {
            let gpa = vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL);
            if reason == ExitReason::EptViolation && (LAPIC_PAGE..LAPIC_PAGE + 0x1000).contains(&gpa) {
                return match emulate_lapic_access(partition, vcpu, gpa) {
                    Ok(()) => None,
                    Err(detail) => stop("refused", detail),
                };
            }
            if reason == ExitReason::EptViolation && (IOAPIC_PAGE..IOAPIC_PAGE + 0x1000).contains(&gpa) {
                return match emulate_ioapic_access(partition, vcpu, gpa) {
                    Ok(()) => None,
                    Err(detail) => stop("refused", detail),
                };
            }
            let violation =
                ept::EptViolation::decode(vmcs::read(ro::EXIT_QUALIFICATION), gpa, vmcs::read(ro::GUEST_LINEAR_ADDR));
            stop(reason.name(), alloc::format!("{}", violation.describe()))
        }
        Handler::GuestFault => stop(reason.name(), "the guest shut itself down (triple fault)".into()),
        Handler::EntryFailure => stop(reason.name(), alloc::format!("VM entry failed (exit reason {raw:#x})")),
        Handler::Refused => stop(
            "refused",
            alloc::format!("exit reason {} ({}) is not allowed to partitions", reason.number(), reason.name()),
        ),
    }
}

/// Brings the vCPU's virtual LAPIC up to `now` (siblings' IPIs taken, its timer run) and says
/// whether it has an interrupt to deliver.
fn interrupt_due(partition: &Partition, vcpu: &mut Vcpu, now: u64) -> bool {
    partition.take_ipis(vcpu.index, &mut vcpu.lapic);
    vcpu.lapic.advance(now);
    vcpu.lapic.deliverable().is_some()
}

/// Makes the pCPU that runs `vcpu` of `partition` look at it now (a host IPI: its guest exits
/// or its idle loop wakes).
fn kick(partition: usize, vcpu: u32) {
    let home = machine().homes[partition][vcpu as usize];
    ATTENTION[home].store(true, Ordering::Release);
    if home != crate::cpu::current_index() {
        apic::send_fixed(crate::cpu::apic_id_of(home), KICK_VECTOR);
    }
}

/// Guest-physical page of every vCPU's xAPIC (not mapped in the EPT: accesses exit).
const LAPIC_PAGE: u64 = vmx::msr::APIC_BASE_ADDRESS;

/// Guest-physical page of the partition's IO-APIC (not mapped: accesses exit).
const IOAPIC_PAGE: u64 = vmx::vioapic::IOAPIC_BASE_ADDRESS;

/// The instruction at the guest's RIP that accessed device memory, decoded.
fn decode_device_access(
    partition: &Partition,
    gpa: u64,
) -> Result<(u64, vmx::mmio::MmioAccess), alloc::string::String> {
    let rip = vmcs::read(guest::RIP);
    let cr3 = vmcs::read(guest::CR3);
    let read = |a: u64| partition.read_guest_u64(a);
    // Up to 16 instruction bytes, which may continue on the next guest page.
    let mut bytes = [0u8; 16];
    let in_first_page = ((0x1000 - (rip & 0xFFF)) as usize).min(bytes.len());
    let unreadable = || alloc::format!("cannot read the instruction at {rip:#x}");
    let first = vmx::mmio::translate(cr3, rip, read).ok_or_else(unreadable)?;
    partition.read_guest_bytes(first, &mut bytes[..in_first_page]).ok_or_else(unreadable)?;
    if in_first_page < bytes.len() {
        if let Some(next) = vmx::mmio::translate(cr3, rip + in_first_page as u64, read) {
            // A missing next page just leaves zeros: the decoder then fails if it needed them.
            let _ = partition.read_guest_bytes(next, &mut bytes[in_first_page..]);
        }
    }
    let access = vmx::mmio::decode(&bytes, rip)
        .map_err(|e| alloc::format!("device access at {gpa:#x} by an instruction Phalanx does not emulate ({e:?})"))?;
    Ok((rip, access))
}

/// A guest access to its IO-APIC window (IOREGSEL/IOWIN, 32-bit).
fn emulate_ioapic_access(partition: &Partition, vcpu: &mut Vcpu, gpa: u64) -> Result<(), alloc::string::String> {
    use vmx::mmio::MmioOperation;
    let (rip, access) = decode_device_access(partition, gpa)?;
    let offset = (gpa & 0xFFF) as u32;
    let mut ioapic = partition.ioapic.lock();
    match access.operation {
        MmioOperation::Read { register } => vcpu.set_gpr(register, ioapic.read(offset) as u64),
        MmioOperation::Write { register } => ioapic.write(offset, vcpu.gpr(register) as u32),
        MmioOperation::WriteImmediate { value } => ioapic.write(offset, value as u32),
    }
    vmcs::write(guest::RIP, rip + access.length as u64);
    Ok(())
}

/// A guest instruction touched its xAPIC page: decode it and apply it to the vCPU's virtual
/// LAPIC; IPIs go to the siblings' pending sets.
fn emulate_lapic_access(partition: &Partition, vcpu: &mut Vcpu, gpa: u64) -> Result<(), alloc::string::String> {
    use vmx::mmio::MmioOperation;
    use vmx::vlapic::IcrCommand;
    let (rip, access) = decode_device_access(partition, gpa)?;
    let offset = (gpa & 0xFFF) as u32 & !0xF;
    let now = crate::tsc::now();
    let mask = if access.size >= 8 { u64::MAX } else { (1u64 << (access.size * 8)) - 1 };
    match access.operation {
        MmioOperation::Read { register } => {
            let value = vcpu.lapic.read(offset, now) as u64 & mask;
            // 32-bit loads zero-extend; narrower ones keep the upper bits (mov r8/r16).
            let merged = if access.size >= 4 { value } else { (vcpu.gpr(register) & !mask) | value };
            vcpu.set_gpr(register, merged);
        }
        MmioOperation::Write { .. } | MmioOperation::WriteImmediate { .. } => {
            let value = match access.operation {
                MmioOperation::Write { register } => vcpu.gpr(register) & mask,
                MmioOperation::WriteImmediate { value } => value & mask,
                MmioOperation::Read { .. } => 0,
            };
            let command = vcpu.lapic.write(offset, value as u32, now);
            if offset == vmx::vlapic::reg::LDR {
                partition.set_logical_id(vcpu.index, vcpu.lapic.logical_id());
            }
            if let Some(command) = command {
                let sender = vcpu.index;
                let targets = (0..partition.vcpus).filter(move |&t| partition.is_ipi_target(t, sender, command));
                match command {
                    IcrCommand::Fixed { vector, .. } => deliver_interrupt(partition, vcpu, vector, command),
                    // The vCPUs wait for their start-up IPI from power-on: INIT changes nothing.
                    IcrCommand::Init { .. } | IcrCommand::Unsupported { icr: 0 } => {}
                    IcrCommand::Startup { vector, .. } => {
                        for target in targets.filter(|&t| t != sender) {
                            if partition.start(target, vector) {
                                kick(partition.id, target);
                            }
                        }
                    }
                    other => log::warn!("[{}] vCPU {}: IPI {other:?} is not supported yet", partition.name, vcpu.index),
                }
            }
        }
    }
    vmcs::write(guest::RIP, rip + access.length as u64);
    Ok(())
}

/// RDMSR/WRMSR of an MSR the bitmap does not pass through (`vmx::msr` decides which).
fn emulate_msr(vcpu: &mut Vcpu, write: bool) {
    use vmx::msr::{access, MsrAccess, IA32_EFER};
    const EFER_LMA: u64 = 1 << 10;
    let msr = vcpu.regs.rcx as u32;
    let value = (vcpu.regs.rdx << 32) | (vcpu.regs.rax & 0xFFFF_FFFF);
    let read = match (access(msr, vcpu.index), write) {
        (MsrAccess::Refused, _) | (MsrAccess::TimeStampCounter, true) => {
            vcpu.inject_exception(13, Some(0));
            return;
        }
        (MsrAccess::Constant(v), false) => v,
        (MsrAccess::Constant(_), true) => 0,
        (MsrAccess::TimeStampCounter, false) => crate::tsc::now(),
        (MsrAccess::VmcsField(field), false) => vmcs::read(field),
        (MsrAccess::VmcsField(field), true) => {
            // EFER.LMA is the CPU's to set (it must match the "IA-32e mode guest" control).
            let value = if msr == IA32_EFER { (value & !EFER_LMA) | (vmcs::read(field) & EFER_LMA) } else { value };
            vmcs::write(field, value);
            0
        }
    };
    if !write {
        vcpu.regs.rax = read & 0xFFFF_FFFF;
        vcpu.regs.rdx = read >> 32;
    }
    vcpu.skip_instruction();
}

/// The partition's virtual COM1 (transmit only); any other port reads as absent hardware.
fn emulate_port(partition: &Partition, vcpu: &mut Vcpu, access: IoAccess) {
    const COM1: u16 = 0x3F8;
    const COM1_IRQ: usize = 4;
    let mask = match access.size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    if !(COM1..COM1 + 8).contains(&access.port) {
        // Absent hardware: reads float high, writes vanish.
        if access.input {
            vcpu.regs.rax = (vcpu.regs.rax & !mask) | mask;
        }
        return;
    }
    let offset = access.port - COM1;
    let (byte, interrupt) = {
        let mut uart = partition.uart.lock();
        let byte = if access.input {
            vcpu.regs.rax = (vcpu.regs.rax & !mask) | uart.read(offset) as u64;
            None
        } else {
            uart.write(offset, vcpu.regs.rax as u8)
        };
        (byte, uart.interrupt())
    };
    if let Some(byte) = byte {
        partition.console_byte(byte);
    }
    // The UART's line into IO-APIC pin 4: a rising edge is an interrupt.
    if partition.set_uart_line(interrupt) {
        let routed = partition.ioapic.lock().assert_pin(COM1_IRQ);
        if let Some((vector, destination)) = routed {
            deliver_interrupt(partition, vcpu, vector, vmx::vlapic::IcrCommand::Fixed { vector, destination });
        }
    }
}

/// Delivers a fixed interrupt to every vCPU of `partition` that `command` addresses: this
/// vCPU's own LAPIC directly, siblings through their pending sets and a kick.
fn deliver_interrupt(partition: &Partition, vcpu: &mut Vcpu, vector: u8, command: vmx::vlapic::IcrCommand) {
    let sender = vcpu.index;
    for target in (0..partition.vcpus).filter(|&t| partition.is_ipi_target(t, sender, command)) {
        if target == sender {
            vcpu.lapic.accept(vector);
        } else {
            partition.post_ipi(target, vector);
            kick(partition.id, target);
        }
    }
}

/// Periodic progress records (pCPU 0 only, between turns); true when it printed.
fn maybe_report_progress(now: u64) -> bool {
    let next = NEXT_PROGRESS.load(Ordering::Relaxed);
    if now < next {
        return false;
    }
    NEXT_PROGRESS.store(next + PROGRESS_INTERVAL.load(Ordering::Relaxed), Ordering::Relaxed);
    let ms = crate::tsc::cycles_to_us(now - t0()) / 1000;
    for p in &machine().partitions {
        let iterations: u64 = (0..p.vcpus).map(|v| p.guest_stats(v).iterations).max().unwrap_or(0);
        crate::console::Record::new("progress")
            .u64("t_ms", ms)
            .str("partition", &p.name)
            .u64("iterations", iterations)
            .bool("stopped", p.is_stopped())
            .emit();
    }
    true
}
