//! Host device interrupts: the console's receive interrupt, which the hypervisor takes itself
//! (a 16-byte FIFO polled once per slot would overrun), and the IRQs partitions own, which
//! `device_irq` hands on. The redirection entries come from the pure
//! `firmware::platform::Platform::isa_irq_route`; this module only writes them.

extern crate alloc;

use alloc::string::String;
use firmware::platform::Platform;

/// IO-APIC register window: the index register, and the data window 0x10 above it.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REDIRECTION_TABLE: u32 = 0x10;

/// The redirection entry's trigger mode bit: level.
const LEVEL: u64 = 1 << 15;

/// Routes ISA IRQ `irq` to `vector` on the CPU with APIC ID `apic_id`.
pub fn route_isa_irq(platform: &Platform, irq: u8, vector: u8, apic_id: u8) -> Result<(), String> {
    let route = platform
        .isa_irq_route(irq, vector, apic_id)
        .ok_or_else(|| alloc::format!("no IO-APIC receives ISA IRQ {irq}"))?;
    program(route)
}

/// Routes ISA IRQ `irq`, which a partition owns, like [`route_isa_irq`] if it is an edge: a
/// level-triggered line (as the MADT's override may make it) is refused and left masked, as
/// `device_irq` delivers edges only.
pub fn route_owned_irq(platform: &Platform, irq: u8, vector: u8, apic_id: u8) -> Result<(), String> {
    let route =
        platform.isa_irq_route(irq, vector, apic_id).ok_or_else(|| alloc::format!("no IO-APIC receives IRQ {irq}"))?;
    if route.entry & LEVEL != 0 {
        return Err(alloc::format!(
            "IRQ {irq} is level-triggered on this machine (its MADT override), and Phalanx routes only edge-triggered \
             device interrupts to partitions"
        ));
    }
    program(route)
}

fn program(route: firmware::platform::IrqRoute) -> Result<(), String> {
    let base = route.io_apic.address as u64;
    let register = REDIRECTION_TABLE + 2 * route.pin;
    // The high half (destination) first, so the entry is never live with a stale one.
    write(base, register + 1, (route.entry >> 32) as u32);
    write(base, register, route.entry as u32);
    Ok(())
}

fn write(base: u64, register: u32, value: u32) {
    // SAFETY: the IO-APIC's register window from the MADT, identity-mapped uncached (the top
    // GiB, `boot`); only the BSP programs it, before dispatch, so the index/data pair is not
    // interleaved with another CPU's.
    unsafe {
        core::ptr::write_volatile((base + IOREGSEL) as *mut u32, register);
        core::ptr::write_volatile((base + IOWIN) as *mut u32, value);
    }
}
