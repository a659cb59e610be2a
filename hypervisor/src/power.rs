//! Ending a run: every way the supported machines power off, tried in turn.

use core::sync::atomic::{AtomicU16, Ordering};
use x86_64::instructions::port::Port;

static PM1A_CONTROL: AtomicU16 = AtomicU16::new(0);
/// QEMU's isa-debug-exit device (when the run script adds it): exit status (v << 1) | 1.
const QEMU_DEBUG_EXIT: u16 = 0xF4;
/// Bochs: writing "Shutdown" to this port ends the simulation.
const BOCHS_SHUTDOWN: u16 = 0x8900;
/// ACPI S5 with SLP_TYP 0 (what Bochs' and QEMU's PIIX4 DSDTs declare for \_S5) and SLP_EN.
const SLEEP_S5: u16 = 0x2000;

pub fn set_pm1a_control_port(port: u16) {
    PM1A_CONTROL.store(port, Ordering::Relaxed);
}

/// Flushes the console and powers the machine off; `failed` selects QEMU's exit status.
pub fn end_run(failed: bool) -> ! {
    crate::console::flush();
    // SAFETY: power-off ports of the emulators and ACPI; nothing runs after this.
    unsafe {
        for b in b"Shutdown" {
            Port::<u8>::new(BOCHS_SHUTDOWN).write(*b);
        }
        Port::<u32>::new(QEMU_DEBUG_EXIT).write(if failed { 1 } else { 0 });
        match PM1A_CONTROL.load(Ordering::Relaxed) {
            0 => {}
            port => Port::<u16>::new(port).write(SLEEP_S5),
        }
    }
    crate::cpu::halt_forever()
}
