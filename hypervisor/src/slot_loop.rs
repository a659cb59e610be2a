//! Phase-locked gang dispatch, the per-pCPU slot loop: every pCPU executes its own table from
//! the planner against the common release time `t0`. At each boundary its LAPIC timer (armed
//! for the absolute TSC deadline) makes the running guest exit; the pCPU charges the interval,
//! asks its dispatcher what runs next, and enters that vCPU. Exits are handled in `exits`; the
//! loop does the accounting. No IPI and no lock is on this path: pCPUs agree only through
//! `t0` and the tables.
//!
//! Accounting: each stretch of work is charged from a TSC stamp read where it begins to one
//! read where it ends (the next stretch starts at that stamp only when nothing runs between
//! them), and the ledger is closed with the pCPU's own end stamp, so work that no stretch
//! covers shows up as unaccounted (`phalanx.debug.uncharged_cycles` injects some to prove it).

extern crate alloc;

use core::sync::atomic::Ordering;

use reservations::trace::{Event, EventKind};
use reservations::{Account, Work};
use sched::{SlotTurns, TurnEnd, VcpuRef};

use crate::apic::{self, TimerMode};
use crate::exits::{handle_exit, ExitOutcome};
use crate::machine::machine;
use crate::pacing::Pacing;
use crate::partition::Fault;
use crate::pcpu::{take_attention, Pcpu};
use crate::percpu::{PcpuResult, SlotEntry, EXIT_REASONS};
use crate::vectors::DISPATCH_VECTOR;
use crate::vmcs::{self, guest, ro};
use vmx::spin_sample::Sample;
use vmx::ExitReason;

/// An idle pCPU wakes this long before the next boundary and spins to it.
const IDLE_WAKE_MARGIN_CYCLES: u64 = 2_000;
fn timer_mode() -> TimerMode {
    if apic::has_tsc_deadline() {
        TimerMode::TscDeadline
    } else {
        TimerMode::OneShot
    }
}

/// The dispatch loop of one pCPU, from `t0` to the end of the run, through every epoch of
/// dispatch tables (`phases`): it starts each at the boundary it is released at.
pub fn run_pcpu(cpu: usize) {
    let m = machine();
    let t0 = m.schedule.t0;
    // pCPU 0 prints progress records between turns at this interval.
    let mut next_progress = t0 + m.schedule.progress_interval;
    let mode = timer_mode();
    apic::setup_timer(mode, DISPATCH_VECTOR);
    let mut pcpu = Pcpu::new(cpu, t0);
    let mut epoch = m.phases.current();
    let mut pacing = Pacing::of(cpu, &epoch);
    let cpus = crate::smp::online_count();
    // pCPU 0 takes the control channel's commands between its turns.
    let mut control = crate::control::Control::new();
    if cpu == 0 {
        crate::control::announce();
    }
    crate::tsc::spin_until(t0);
    // The end of the last charged stretch.
    let mut mark = t0;
    let mut next_injection = t0;
    let mut injected = 0;
    let mut started_at = crate::tsc::now();
    loop {
        let mut turns = SlotTurns::start(epoch.dispatcher(cpu), epoch.release, started_at);
        let next = loop {
            let mut now = crate::tsc::now();
            pacing.signal_due(cpu, cpus, now);
            // Read each turn: a partition's power-off or the control channel may end the run
            // early (`end_early`).
            let end = m.run_end();
            if now >= end {
                pcpu.charge(Account::Overhead, mark, now);
                break None;
            }
            if m.schedule.debug_uncharged_cycles > 0 && now >= next_injection {
                // Debug: spend cycles no stretch covers, once per major frame.
                pcpu.charge(Account::Overhead, mark, now);
                crate::tsc::spin_until(now + m.schedule.debug_uncharged_cycles);
                mark = crate::tsc::now();
                injected += mark - now;
                next_injection = (next_injection + m.frame_cycles).max(mark);
                now = mark;
            }
            // Device interrupts that arrived in root mode (idle, between turns), raised at their
            // owners, each charged for its own.
            crate::device_irq::deliver(|owner, from, to| {
                pcpu.charge(Account::Overhead, mark, from);
                pcpu.charge(Account::OnBehalf(owner as reservations::PartitionId, Work::IrqDemux), from, to);
                pcpu.ledger.note_irq(owner as reservations::PartitionId);
                mark = to;
            });
            // Between turns the pCPU works for nobody in particular: statistics, the console,
            // the control channel, starts and wake-ups of the vCPUs homed here. The
            // hypervisor's own time.
            if cpu == 0 && now >= next_progress {
                next_progress += m.schedule.progress_interval;
                report_progress(now - t0);
            }
            let _ = crate::console::pump();
            crate::shared_memory::follow(cpu);
            if cpu == 0 {
                let _ = crate::control::pump();
                forward_console_input(m);
                control.poll(m, cpus);
            }
            if take_attention(cpu) || pcpu.vcpus.iter().any(|v| v.halted) {
                pcpu.follow_starts();
                pcpu.wake_halted(now);
            }
            let mut switch_start = crate::tsc::now();
            pcpu.charge(Account::Overhead, mark, switch_start);
            let decision = turns.reclaim_if_owner_woke(|v| pcpu.runnable(v));
            if let Some(owner) = decision.run.filter(|_| !decision.lent) {
                switch_start = pcpu.follow_resets(owner.partition as usize, switch_start);
            }
            let decision = turns.lend_if_owner_cannot_run(now, |v| pcpu.runnable(v));
            let deadline = pacing.turn_deadline(decision.next_deadline).min(end);
            pacing.arm(mode, deadline);
            let turn = decision.run.filter(|&v| pcpu.runnable(v)).and_then(|v| pcpu.find(v));
            let ended = match turn {
                // From `switch_start` to the vCPU's first entry (the decision, loading its VMCS) is
                // the switch into its slot: run_turn charges it to the partition, whose slot it
                // comes out of. Only the owner's entry at the start of its slot counts for gang
                // skew (lent slack, or an owner that woke up mid-slot, is not a gang start).
                Some(index) => {
                    let (ended, at) =
                        run_turn(&mut pcpu, &pacing, index, deadline, turns.owned_slot_start(), switch_start);
                    mark = at;
                    Some(ended)
                }
                None => {
                    // A halted vCPU here whose timer comes due first ends the idle early.
                    let wake = pcpu.vcpus.iter().filter(|v| v.halted).filter_map(|v| v.lapic.timer_deadline()).min();
                    mark = idle_until(&mut pcpu, &pacing, switch_start, deadline, wake);
                    None
                }
            };
            // A signalled boundary counts from the boundary itself, whatever this pCPU's clock.
            let now = if pacing.boundary_reached(deadline, mark) { mark.max(deadline) } else { mark };
            if ended == Some(TurnEnd::Yielded) && now < decision.next_deadline {
                pcpu.yields += 1;
            }
            if now >= decision.next_deadline {
                pcpu.passed_boundary(decision.next_deadline);
                // A change released at this boundary starts here (one atomic load otherwise);
                // a pCPU held up past the release (a long exit) starts it as soon as it is back.
                if let Some(next) = m.phases.due(epoch.number, now) {
                    break Some((next, now));
                }
            }
            let homed = pcpu
                .vcpus
                .iter()
                .map(|v| VcpuRef { partition: v.partition as reservations::PartitionId, vcpu: v.index });
            turns.turn_ended(now, ended, |v| pcpu.runnable(v), homed);
        };
        let Some((next, now)) = next else { break };
        // The switch: this pCPU's accounts at the boundary (the epoch's share), its timing
        // (ipi-gang's clock), and its first frame watched for the gang skew after the switch.
        let switch_start = crate::tsc::now();
        if cpu == cpus - 1 && m.schedule.debug_phase_switch_cycles > 0 {
            // Debug: a slow switch on one pCPU, which the phase-change figures must show.
            crate::tsc::spin_until(switch_start + m.schedule.debug_phase_switch_cycles);
        }
        pcpu.mark_epoch(next.number, next.release, m.frame_cycles);
        pacing = Pacing::of(cpu, &next);
        // `turns` (which borrows the old tables) is not used past here.
        epoch = next;
        started_at = now;
        m.phases.note_switched();
        // On time: noticed within its first slot of the new tables (a pCPU held up longer
        // missed part of the new epoch's first slot).
        let first_slot_end = epoch.release + epoch.tables.pcpus[cpu].entries.first().map_or(0, |e| e.end);
        let report = crate::phases::SwitchReport::switched(epoch.number, now - epoch.release, now < first_slot_end);
        *crate::percpu::of(cpu).phase_switch.lock() =
            crate::phases::SwitchReport { cycles: crate::tsc::now() - switch_start, ..report };
        crate::trace::record(cpu, Event::machine(EventKind::PhaseChange, now, epoch.number));
    }
    if cpu == 0 {
        control.finish_run(m);
    }
    apic::mask_timer();
    pcpu.ledger.close(crate::tsc::now());
    // After the ledger closed: the run's accounting covers `t0` to the end only.
    for v in &pcpu.vcpus {
        let partition = &m.partitions[v.partition];
        crate::console::Record::new("vcpu_end")
            .str("partition", &partition.name)
            .u64("vcpu", v.index as u64)
            .u64("pcpu", cpu as u64)
            .bool("started", partition.devices.is_started(v.index))
            .bool("halted", v.halted)
            .u64("exits", v.exits)
            .fmt("last_exit_rip", format_args!("{:#x}", v.last_exit_rip))
            .fmt("pending_vector", format_args!("{:?}", v.lapic.deliverable()))
            .fmt("irr", format_args!("{:x?}", v.lapic.vectors().0))
            .fmt("isr", format_args!("{:x?}", v.lapic.vectors().1))
            .u64("tpr", v.lapic.read(vmx::vlapic::reg::TPR, 0) as u64)
            .fmt("lvt_timer", format_args!("{:#x}", v.lapic.read(vmx::vlapic::reg::LVT_TIMER, 0)))
            .fmt("timer_deadline", format_args!("{:?}", v.lapic.timer_deadline()))
            .emit();
    }
    *crate::percpu::of(cpu).dispatch_result.lock() = Some(PcpuResult {
        injected_uncharged: injected,
        ledger: pcpu.ledger,
        exits: pcpu.exits,
        window_exits: pcpu.window_exits,
        spin_sample: pcpu.spin_sample,
        slot_entries: pcpu.slot_entries,
        epoch_marks: pcpu.epoch_marks,
        guard_exits: pcpu.guard_exits,
        yields: pcpu.yields,
    });
}

/// What was typed at the hypervisor's console goes to the COM1 of the partition named by
/// `phalanx.console` (its interrupt kicks the vCPU it is routed to). Bytes beyond its receive
/// queue are dropped, as a UART overruns.
fn forward_console_input(m: &crate::machine::Machine) {
    let Some(id) = m.console_input else { return };
    let mut typed = [0u8; 64];
    let n = crate::console::read_input(&mut typed);
    if n == 0 {
        return;
    }
    let partition = &m.partitions[id];
    let (taken, kicks) = partition.devices.receive_console(&typed[..n]);
    crate::console::count_input_dropped((n - taken) as u64);
    for target in kicks.iter() {
        crate::pcpu::kick(id, target);
    }
}

/// Nothing to run: halt the pCPU until the slot that ends at `deadline` is over, until
/// `vcpu_wake` when a halted vCPU's own timer comes due first, or until a kick asks this pCPU
/// to look at its vCPUs (an interrupt for a halted one: a device's, or a sibling's IPI), so
/// that a vCPU halted in its own slot takes it now rather than in its next slot. The decision
/// since `from` was the hypervisor's own. Returns the end of the idle stretch.
fn idle_until(pcpu: &mut Pcpu, pacing: &Pacing, from: u64, deadline: u64, vcpu_wake: Option<u64>) -> u64 {
    let idle_start = crate::tsc::now();
    pcpu.charge(Account::Overhead, from, idle_start);
    crate::trace::record(pcpu.cpu, Event::machine(EventKind::IdleStart, idle_start, 0));
    let until = vcpu_wake.map_or(deadline, |w| w.min(deadline));
    // Wake a little early and spin the rest: taking the timer interrupt out of `hlt` costs
    // about a thousand cycles, which would otherwise come out of the next slot. (A signalled
    // pCPU's boundary comes by IPI, whenever the timing pCPU sends it.)
    let wake = until.saturating_sub(IDLE_WAKE_MARGIN_CYCLES);
    let signalled = !pacing.own_timer_ends(deadline);
    let timer = if signalled { vcpu_wake } else { Some(wake) };
    if let Some(at) = timer.filter(|&at| crate::tsc::now() < at) {
        apic::arm_deadline(timer_mode(), at);
    }
    let cpu = pcpu.cpu;
    let kicked = || crate::percpu::of(cpu).attention.load(Ordering::Acquire);
    let over = |now: u64| {
        kicked()
            || if signalled {
                pacing.boundary_reached(deadline, now) || vcpu_wake.is_some_and(|w| now >= w)
            } else {
                now >= wake
            }
    };
    // Interrupts are off while `over` looks, so a wake-up that comes before `hlt` stays
    // pending and ends it.
    while !over(crate::tsc::now()) {
        crate::shared_memory::follow(pcpu.cpu);
        // Idle time drains the console; with nothing to print, halt until the timer.
        if crate::console::pump() | crate::control::pump() {
            core::hint::spin_loop();
            continue;
        }
        // `sti; hlt` cannot lose the wake-up; the interrupt handler only acknowledges it.
        x86_64::instructions::interrupts::enable_and_hlt();
        x86_64::instructions::interrupts::disable();
    }
    if !signalled && !kicked() {
        crate::tsc::spin_until(until);
    }
    let idle_end = crate::tsc::now();
    pcpu.charge(Account::Idle, idle_start, idle_end);
    crate::trace::record(pcpu.cpu, Event::machine(EventKind::IdleEnd, idle_end, 0));
    idle_end
}

/// Runs one vCPU's turn until the slot ends or the vCPU cannot go on; the switch into it
/// began at `switch_start`. Returns how the turn ended and the end of its last stretch.
fn run_turn(
    pcpu: &mut Pcpu,
    pacing: &Pacing,
    index: usize,
    deadline: u64,
    owned_slot_start: Option<u64>,
    switch_start: u64,
) -> (TurnEnd, u64) {
    let m = machine();
    let partition_id = pcpu.vcpus[index].partition;
    let partition = &m.partitions[partition_id];
    let account_id = partition_id as reservations::PartitionId;
    if pcpu.loaded != Some(index) {
        pcpu.vcpus[index].load();
        pcpu.loaded = Some(index);
    }
    pcpu.ledger.note_slot(account_id);
    pcpu.trace(EventKind::TurnStart, switch_start, index, owned_slot_start.is_some() as u32);
    if owned_slot_start.is_some() && m.schedule.debug_switch_in_cycles > 0 {
        // Debug: a slower switch into the slot, charged to it like the rest of the switch.
        crate::tsc::spin_until(crate::tsc::now() + m.schedule.debug_switch_in_cycles);
    }
    let guard_at = pacing.guard_deadline(deadline);
    let mut first_entry = true;
    // The last exit's reason, and whether it came inside the vCPU's measurement window.
    let mut last_reason: Option<(usize, bool)> = None;
    // The last exit took a spin-wait sample: its cost is the sampler's too.
    let mut sampled = false;
    // The stretch since the last entry (or the switch) and whose it is.
    let mut stretch_start = switch_start;
    let mut stretch_account = Account::OnBehalf(account_id, Work::SlotSwitch);
    let end = loop {
        if partition.is_stopped() {
            break TurnEnd::Stopped;
        }
        let now = crate::tsc::now();
        if pacing.boundary_reached(deadline, now) {
            break TurnEnd::Deadline;
        }
        // The vCPU's virtual LAPIC: take siblings' IPIs, run its timer, inject what is due.
        let vcpu = &mut pcpu.vcpus[index];
        vcpu.interrupt_due(&partition.devices, now);
        vcpu.deliver_interrupts(&m.controls);
        m.device_irqs.entering(partition_id, &vcpu.lapic, now);
        // Exit by the slot boundary (guard), when the guest's own timer is due, or for the next
        // spin-wait sample.
        let wake = vcpu.lapic.timer_deadline().map_or(u64::MAX, |d| d.saturating_sub(now));
        let sample = vcpu.sample_clock.until_due(now);
        let guard = (guard_at.saturating_sub(now).min(wake.max(1)).min(sample)) >> pcpu.preemption_shift;
        vmcs::write(guest::VMX_PREEMPTION_TIMER_VALUE, guard.min(u32::MAX as u64));
        let entry = crate::tsc::now();
        if let Some((reason, in_window)) = last_reason.take() {
            pcpu.note_exit_handled(partition_id, reason, in_window, entry - stretch_start);
        }
        if core::mem::take(&mut sampled) {
            pcpu.spin_sample.cycles += entry - stretch_start;
        }
        pcpu.charge(stretch_account, stretch_start, entry);
        // The handling of the previous exit, if it was one, for the window figures below.
        let handled = match stretch_account {
            Account::OnBehalf(_, Work::ExitHandling) => entry - stretch_start,
            _ => 0,
        };
        if first_entry {
            first_entry = false;
            // The first entry into the slot only (a vCPU that halted and was woken re-enters).
            let already = |s: u64| {
                pcpu.slot_entries.last().is_some_and(|e| e.slot_start == s && e.partition == partition_id as u32)
            };
            if let Some(slot_start) = owned_slot_start.filter(|&s| !already(s)) {
                pcpu.note_slot_entry(SlotEntry { slot_start, partition: partition_id as u32, entry_tsc: entry });
            }
        }
        pcpu.trace(EventKind::VmEntry, entry, index, 0);
        let result = pcpu.vcpus[index].enter();
        let exit = crate::tsc::now();
        partition.vcpu_run_cycles[pcpu.vcpus[index].index as usize].fetch_add(exit - entry, Ordering::Relaxed);
        pcpu.charge(Account::Guest(account_id), entry, exit);
        stretch_start = exit;
        stretch_account = Account::OnBehalf(account_id, Work::ExitHandling);
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
        let in_window = pcpu.vcpus[index].in_spin_window;
        if in_window {
            pcpu.ledger.note_window_stretch(account_id, exit - entry, handled);
        }
        let raw = vmcs::read(ro::EXIT_REASON) as u32;
        let reason = ExitReason::from_raw(raw);
        let slot = (reason.number() as usize).min(EXIT_REASONS - 1);
        pcpu.trace(EventKind::VmExit, exit, index, reason.number());
        pcpu.note_exit_reason(partition_id, slot, in_window);
        last_reason = Some((slot, in_window));
        match handle_exit(&mut pcpu.vcpus[index], partition, reason, raw, deadline, guard_at) {
            ExitOutcome::Resume => continue,
            // A sibling pCPU's kick or the slot timer: the hypervisor's own, not the
            // interrupted partition's.
            ExitOutcome::HostInterrupt => {
                // A revoked shared region's shootdown comes with a kick: this pCPU's cached
                // translations go before the next entry.
                crate::shared_memory::follow(pcpu.cpu);
                stretch_account = Account::Overhead;
                continue;
            }
            // Raised at its owner now (and whatever else arrived meanwhile), charged to the
            // owner: the partition it happened to stop does not pay for it.
            ExitOutcome::DeviceInterrupt { owner } => {
                crate::device_irq::deliver(|raised, _, _| pcpu.ledger.note_irq(raised as reservations::PartitionId));
                stretch_account = Account::OnBehalf(owner as reservations::PartitionId, Work::IrqDemux);
                continue;
            }
            ExitOutcome::Sampled(sample) => {
                pcpu.spin_sample.count += 1;
                sampled = true;
                if sample != Sample::Unreadable {
                    pcpu.ledger.note_spin_sample(account_id, sample == Sample::Spinning, in_window);
                }
                continue;
            }
            ExitOutcome::Guard => {
                pcpu.guard_exits += 1;
                // The boundary's interrupt, which the guest kept out (interrupts off: under
                // Bochs they then do not exit), is pending: taken here, not as an exit out of
                // the next vCPU's slot.
                crate::interrupts::take_pending();
            }
            ExitOutcome::Spin { yielded } => {
                pcpu.ledger.note_pause_loop_exit(account_id);
                partition.pause_loop_exits.fetch_add(1, Ordering::Relaxed);
                if yielded {
                    break TurnEnd::Yielded;
                }
            }
            ExitOutcome::Halted => break TurnEnd::Halted,
            ExitOutcome::Stopped => break TurnEnd::Stopped,
        }
    };
    let now = crate::tsc::now();
    if let Some((reason, in_window)) = last_reason {
        pcpu.note_exit_handled(partition_id, reason, in_window, now - stretch_start);
    }
    if sampled {
        pcpu.spin_sample.cycles += now - stretch_start;
    }
    // Leaving the slot at its boundary is the scheduler's own switch-out, done in the next
    // slot's time: the hypervisor's overhead (each partition pays only its switch-in, inside
    // its own slot). Handling that ends a turn early is work on the partition's behalf.
    let account = match end {
        TurnEnd::Deadline => Account::Overhead,
        _ => stretch_account,
    };
    pcpu.charge(account, stretch_start, now);
    pcpu.trace(EventKind::TurnEnd, now, index, turn_end_code(end));
    (end, now)
}

/// How a turn ended, as the trace numbers it (docs/records.md).
fn turn_end_code(end: TurnEnd) -> u32 {
    match end {
        TurnEnd::Deadline => 0,
        TurnEnd::Halted => 1,
        TurnEnd::Yielded => 2,
        TurnEnd::Stopped => 3,
    }
}

/// One progress record per partition, `since_t0` cycles into the run.
fn report_progress(since_t0: u64) {
    let ms = crate::tsc::cycles_to_us(since_t0) / 1000;
    let m = machine();
    for p in &m.partitions {
        let iterations: u64 = (0..p.vcpus).map(|v| p.guest_stats(v).iterations).max().unwrap_or(0);
        // Guest time so far and the pCPUs it comes from: CPU share over time (scripts/report.py).
        let guest_cycles: u64 = p.vcpu_run_cycles.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let pcpus = m.pcpus_held(p.id);
        crate::console::Record::new("progress")
            .u64("t_ms", ms)
            .str("partition", &p.name)
            .u64("iterations", iterations)
            .u64("guest_cycles", guest_cycles)
            .u64("pcpus", pcpus as u64)
            .bool("stopped", p.is_stopped())
            .emit();
    }
}
