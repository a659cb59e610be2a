//! Host device interrupts: the console's receive interrupt, which the hypervisor takes itself
//! (a 16-byte FIFO polled once per slot would overrun), and the IRQs partitions own, which
//! `device_irq` hands on. The redirection entries come from the pure
//! `firmware::platform::Platform::isa_irq_route`; this module only writes them.

extern crate alloc;

use alloc::string::String;
use firmware::platform::{IrqRoute, Platform};

/// IO-APIC register window: the index register, and the data window 0x10 above it.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REDIRECTION_TABLE: u32 = 0x10;

/// The redirection entry's trigger mode bit: level.
const LEVEL: u64 = 1 << 15;
const ACTIVE_LOW: u64 = 1 << 13;
const MASKED: u32 = 1 << 16;

/// The IO-APICs' index/data windows: once dispatch runs, any pCPU masks and unmasks
/// level-triggered lines, and an index written by one must not be used by another.
static WINDOW: spin::Mutex<()> = spin::Mutex::new(());

/// Routes ISA IRQ `irq` to `vector` on the CPU with APIC ID `apic_id`.
pub fn route_isa_irq(platform: &Platform, irq: u8, vector: u8, apic_id: u8) -> Result<(), String> {
    let route = platform
        .isa_irq_route(irq, vector, apic_id)
        .ok_or_else(|| alloc::format!("no IO-APIC receives ISA IRQ {irq}"))?;
    program(route)
}

/// Routes IRQ `irq` (an ISA IRQ, or a GSI above 15), which a partition owns, to `vector` on
/// the CPU with APIC ID `apic_id`, with the polarity and trigger mode the MADT gives it, or,
/// for a passed-through PCI function's interrupt line (`pci_line`), level-triggered and
/// active low as PCI's INTx is whatever ISA IRQ the firmware routed it to; returns the entry,
/// whose `LEVEL` bit says whether `device_irq` must mask it from each arrival to the owner's
/// EOI.
pub fn route_owned_irq(
    platform: &Platform,
    irq: u32,
    vector: u8,
    apic_id: u8,
    pci_line: bool,
) -> Result<IrqRoute, String> {
    let mut route =
        platform.irq_route(irq, vector, apic_id).ok_or_else(|| alloc::format!("no IO-APIC receives IRQ {irq}"))?;
    if pci_line {
        route.entry |= LEVEL | ACTIVE_LOW;
    }
    program(route)?;
    Ok(route)
}

/// Whether the entry is level-triggered.
pub fn is_level(route: &IrqRoute) -> bool {
    route.entry & LEVEL != 0
}

/// Masks or unmasks a routed line (a level-triggered one, from its arrival to the owner's EOI).
pub fn set_masked(route: &IrqRoute, masked: bool) {
    let low = route.entry as u32 & !MASKED;
    write(route.io_apic.address as u64, REDIRECTION_TABLE + 2 * route.pin, if masked { low | MASKED } else { low });
}

fn program(route: IrqRoute) -> Result<(), String> {
    let base = route.io_apic.address as u64;
    let register = REDIRECTION_TABLE + 2 * route.pin;
    // The high half (destination) first, so the entry is never live with a stale one.
    write(base, register + 1, (route.entry >> 32) as u32);
    write(base, register, route.entry as u32);
    Ok(())
}

fn write(base: u64, register: u32, value: u32) {
    // Interrupts off while the lock is held: a device interrupt taken in root mode masks its
    // line through here too, and must not wait for the lock its own pCPU holds.
    x86_64::instructions::interrupts::without_interrupts(|| {
        let _window = WINDOW.lock();
        // SAFETY: the IO-APIC's register window from the MADT, identity-mapped uncached (the
        // top GiB, `boot`); the lock keeps the index/data pair from interleaving with another
        // CPU's.
        unsafe {
            core::ptr::write_volatile((base + IOREGSEL) as *mut u32, register);
            core::ptr::write_volatile((base + IOWIN) as *mut u32, value);
        }
    })
}
