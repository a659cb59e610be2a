//! How a pCPU learns that a slot boundary has come. Under every policy but `ipi-gang` each
//! pCPU's own LAPIC timer is armed for the absolute boundary (phase-locked: no messages).
//! Under `ipi-gang` one timing pCPU arms its timer for every boundary of any pCPU and sends
//! the others an IPI at each; they arm no slot timer and switch when it comes. The two exist
//! side by side to measure what phase locking saves (`scripts/bench-slots`).

use core::sync::atomic::{AtomicU64, Ordering};

use reservations::trace::{Event, EventKind};
use sched::BoundaryClock;

use crate::apic::{self, TimerMode};
use crate::machine::machine;
use crate::vectors::BOUNDARY_VECTOR;

/// `ipi-gang`: the pCPU that times the boundaries.
const TIMING_PCPU: usize = 0;
/// The VMX-preemption timer fires this long after a boundary whose timer interrupt did not
/// stop the guest: the guard that a guest cannot overrun its slot. Just long enough for the
/// interrupt to win when it comes (at least 300 cycles, at least 2 us of a real CPU's
/// interrupt latency): a guest that disables interrupts under Bochs (where they then no
/// longer exit) overran every slot by the guard, and 2,000 cycles took 2% of its neighbour's
/// share.
const PREEMPTION_GUARD_CYCLES: u64 = 300;
const PREEMPTION_GUARD_US: u64 = 2;

/// The latest boundary the timing pCPU has signalled (TSC).
static SIGNALLED_BOUNDARY: AtomicU64 = AtomicU64::new(0);

pub enum Pacing {
    /// The pCPU's own timer, armed for its next boundary.
    OwnTimer,
    /// `ipi-gang`'s timing pCPU: its timer also fires at `next_signal`, the next boundary of
    /// any pCPU, where it sends the others an IPI.
    Timing { clock: BoundaryClock, next_signal: u64 },
    /// `ipi-gang`'s other pCPUs: a boundary has come when the timing pCPU says so; the end
    /// of the run (`Machine::run_end`, not always a boundary) by their own timer.
    Signalled,
}

impl Pacing {
    /// How `cpu` learns of the boundaries of `epoch`'s tables.
    pub fn of(cpu: usize, epoch: &sched::Epoch) -> Pacing {
        let m = machine();
        match (m.policy, cpu) {
            (config::DispatchPolicy::IpiGang, TIMING_PCPU) => {
                let clock = epoch.tables.boundary_clock(epoch.release);
                let next_signal = clock.next_after(crate::tsc::now().max(epoch.release));
                Pacing::Timing { clock, next_signal }
            }
            (config::DispatchPolicy::IpiGang, _) => Pacing::Signalled,
            _ => Pacing::OwnTimer,
        }
    }

    /// Whether the slot that ends at `deadline` is over.
    #[inline]
    pub fn boundary_reached(&self, deadline: u64, now: u64) -> bool {
        match self {
            Pacing::Signalled if deadline < machine().run_end() => {
                SIGNALLED_BOUNDARY.load(Ordering::Acquire) >= deadline
            }
            _ => now >= deadline,
        }
    }

    /// Whether this pCPU's own timer ends the slot that ends at `deadline`.
    pub fn own_timer_ends(&self, deadline: u64) -> bool {
        match self {
            Pacing::Signalled => deadline >= machine().run_end(),
            _ => true,
        }
    }

    /// When this pCPU's turn that ends at `deadline` must stop the guest: the timing pCPU
    /// also stops at the next boundary it signals.
    pub fn turn_deadline(&self, deadline: u64) -> u64 {
        match self {
            Pacing::Timing { next_signal, .. } => deadline.min(*next_signal),
            _ => deadline,
        }
    }

    /// Arms the slot timer for `deadline` (a signalled pCPU has none: the IPI is its timer).
    pub fn arm(&self, mode: TimerMode, deadline: u64) {
        if self.own_timer_ends(deadline) {
            apic::arm_deadline(mode, deadline);
        }
    }

    /// When the VMX-preemption timer must stop a guest whose slot ends at `deadline` (the
    /// guard): just after the boundary, where the pCPU's own timer should have stopped it; a
    /// signalled pCPU waits up to a whole frame for the IPI before the guard steps in.
    pub fn guard_deadline(&self, deadline: u64) -> u64 {
        if self.own_timer_ends(deadline) {
            deadline + PREEMPTION_GUARD_CYCLES.max(crate::tsc::us_to_cycles(PREEMPTION_GUARD_US))
        } else {
            deadline + machine().frame_cycles
        }
    }

    /// The timing pCPU: signals the boundary that has come (if one has) to every other pCPU.
    #[inline]
    pub fn signal_due(&mut self, cpu: usize, cpus: usize, now: u64) {
        if let Pacing::Timing { clock, next_signal } = self {
            if now >= *next_signal {
                SIGNALLED_BOUNDARY.store(*next_signal, Ordering::Release);
                apic::send_all_but_self(BOUNDARY_VECTOR);
                crate::trace::record(cpu, Event::machine(EventKind::BoundaryIpi, now, cpus as u32 - 1));
                *next_signal = clock.next_after(now);
            }
        }
    }
}
