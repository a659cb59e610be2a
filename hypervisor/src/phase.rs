//! Phase-locked timers: the foundation of gang dispatch. The BSP publishes a release time
//! `t0` in the future; from then on every pCPU arms its own LAPIC timer for `t0 + k*P` and
//! records when each tick arrives, with no inter-CPU message. The spread of the arrival
//! times of the same tick across pCPUs is the skew every gang slot will inherit.

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::apic::{self, TimerMode};
use crate::vectors::PHASE_TEST_VECTOR;

pub use crate::percpu::PHASE_TICKS as TICKS;

static T0: AtomicU64 = AtomicU64::new(0);
static PERIOD: AtomicU64 = AtomicU64::new(0);
static MODE_IS_DEADLINE: AtomicUsize = AtomicUsize::new(1);

fn mode() -> TimerMode {
    if MODE_IS_DEADLINE.load(Ordering::Relaxed) == 1 {
        TimerMode::TscDeadline
    } else {
        TimerMode::OneShot
    }
}

/// Timer interrupt (registered with `interrupts`): record the arrival, arm the next boundary
/// from the common schedule.
pub fn on_timer_interrupt() {
    let now = crate::tsc::now();
    let cpu = crate::cpu::current_index();
    let k = crate::percpu::of(cpu).phase_ticks.load(Ordering::Relaxed);
    if k < TICKS {
        crate::percpu::of(cpu).phase_arrivals[k].store(now, Ordering::Relaxed);
        crate::percpu::of(cpu).phase_ticks.store(k + 1, Ordering::Release);
        if k + 1 < TICKS {
            let next = T0.load(Ordering::Relaxed) + (k as u64 + 1) * PERIOD.load(Ordering::Relaxed);
            apic::arm_deadline(mode(), next);
        }
    }
}

fn run_ticks(cpu: usize) {
    crate::percpu::of(cpu).phase_ticks.store(0, Ordering::Release);
    apic::setup_timer(mode(), PHASE_TEST_VECTOR);
    apic::arm_deadline(mode(), T0.load(Ordering::Relaxed));
    while crate::percpu::of(cpu).phase_ticks.load(Ordering::Acquire) < TICKS {
        // Wait with interrupts on; `sti; hlt` cannot lose the wake-up.
        x86_64::instructions::interrupts::enable_and_hlt();
        x86_64::instructions::interrupts::disable();
    }
    apic::mask_timer();
}

pub struct PhaseLockReport {
    pub cpus: usize,
    pub mode: TimerMode,
    pub period: u64,
    pub skew_min: u64,
    pub skew_median: u64,
    pub skew_max: u64,
    /// Median of (arrival - scheduled boundary) over all ticks and CPUs.
    pub latency_median: u64,
    pub latency_max: u64,
}

/// Runs the phase-locked tick test on the first `cpus` pCPUs (all online).
/// `force_one_shot` exercises the fallback on CPUs that do have TSC-deadline mode.
pub fn measure(cpus: usize, period: u64, lead: u64, force_one_shot: bool) -> PhaseLockReport {
    let mode = if apic::has_tsc_deadline() && !force_one_shot { TimerMode::TscDeadline } else { TimerMode::OneShot };
    if mode == TimerMode::OneShot {
        let _ = crate::smp::run_on_all(cpus, |_| apic::calibrate_timer());
    }
    MODE_IS_DEADLINE.store((mode == TimerMode::TscDeadline) as usize, Ordering::Relaxed);
    PERIOD.store(period, Ordering::Relaxed);
    T0.store(crate::tsc::now() + lead, Ordering::Release);
    let _ = crate::smp::run_on_all(cpus, run_ticks);

    let t0 = T0.load(Ordering::Relaxed);
    let mut skews = Vec::with_capacity(TICKS);
    let mut latencies = Vec::with_capacity(TICKS * cpus);
    for k in 0..TICKS {
        let arrivals = (0..cpus).map(|c| crate::percpu::of(c).phase_arrivals[k].load(Ordering::Relaxed));
        let (lo, hi) = arrivals.clone().fold((u64::MAX, 0), |(lo, hi), a| (lo.min(a), hi.max(a)));
        skews.push(hi - lo);
        let boundary = t0 + k as u64 * period;
        latencies.extend(arrivals.map(|a| a.saturating_sub(boundary)));
    }
    skews.sort_unstable();
    latencies.sort_unstable();
    PhaseLockReport {
        cpus,
        mode,
        period,
        skew_min: skews[0],
        skew_median: skews[skews.len() / 2],
        skew_max: skews[skews.len() - 1],
        latency_median: latencies[latencies.len() / 2],
        latency_max: latencies[latencies.len() - 1],
    }
}
