//! Time: the TSC, calibrated against the PIT (CPUID leaf 0x15 is a fixed model value in
//! Bochs and absent elsewhere, so the PIT is the one clock every platform has).

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::instructions::port::Port;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
const PIT_HZ: u64 = 1_193_182;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

pub fn us_to_cycles(us: u64) -> u64 {
    (hz() as u128 * us as u128 / 1_000_000) as u64
}

pub fn cycles_to_us(cycles: u64) -> u64 {
    match hz() {
        0 => 0,
        hz => (cycles as u128 * 1_000_000 / hz as u128) as u64,
    }
}

pub fn spin_until(deadline: u64) {
    while now() < deadline {
        core::hint::spin_loop();
    }
}

pub fn delay_us(us: u64) {
    spin_until(now() + us_to_cycles(us));
}

/// Measures the TSC rate over `ms` milliseconds of PIT channel 2 (speaker gate, no IRQ).
pub fn calibrate(ms: u64) -> u64 {
    let ticks = (PIT_HZ * ms / 1000) as u16;
    // SAFETY: ports of the PIT and the speaker gate (0x61), owned by the hypervisor at boot.
    unsafe {
        let mut gate = Port::<u8>::new(0x61);
        let mut command = Port::<u8>::new(0x43);
        let mut channel2 = Port::<u8>::new(0x42);
        let g = gate.read();
        gate.write((g & !0x02) | 0x01); // gate on, speaker off
        command.write(0xB0); // channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count)
        channel2.write(ticks as u8);
        channel2.write((ticks >> 8) as u8);
        let start = now();
        while gate.read() & 0x20 == 0 {
            core::hint::spin_loop();
        }
        let end = now();
        let hz = (end - start) * 1000 / ms;
        TSC_HZ.store(hz, Ordering::Relaxed);
        hz
    }
}
