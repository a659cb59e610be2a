//! Host platform discovery through ACPI: the `acpi` crate finds and validates the tables
//! (RSDP from the boot loader, BIOS-area scan as fallback); `firmware::platform` turns the
//! MADT into pCPUs, IO-APICs and interrupt source overrides.

extern crate alloc;

use acpi::{fadt::Fadt, madt::Madt, AcpiHandler, AcpiTables, PhysicalMapping};
use alloc::string::{String, ToString};
use core::ptr::NonNull;
use firmware::platform::Platform;

/// All physical memory below 4 GiB is identity-mapped, so mapping a table is a cast.
#[derive(Clone, Copy)]
struct IdentityMapped;

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(&self, physical_address: usize, size: usize) -> PhysicalMapping<Self, T> {
        let virt = NonNull::new(physical_address as *mut T).expect("ACPI table at physical address 0");
        // SAFETY: identity mapping; the caller (the acpi crate) guarantees a valid T there.
        unsafe { PhysicalMapping::new(physical_address, virt, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

pub struct Discovered {
    pub platform: Platform,
    /// Where the ACPI tables were found (for the boot record).
    pub source: &'static str,
    /// The PM1a control port, for an ACPI S5 power-off at the end of a run.
    pub pm1a_control_port: Option<u16>,
}

pub fn discover(acpi_root: Option<(u8, u64)>) -> Result<Discovered, String> {
    let (tables, source) = match acpi_root {
        // SAFETY: the boot loader copied the RSDP, whose RSDT/XSDT address points at ACPI
        // tables in identity-mapped, reserved memory.
        Some((revision, address)) => {
            (unsafe { AcpiTables::from_rsdt(IdentityMapped, revision, address as usize) }, "multiboot")
        }
        // SAFETY: the BIOS areas (EBDA, 0xE0000-0xFFFFF) are identity-mapped.
        None => (unsafe { AcpiTables::search_for_rsdp_bios(IdentityMapped) }, "bios-scan"),
    };
    let tables = tables.map_err(|e| alloc::format!("ACPI tables not usable: {e:?}"))?;
    let madt =
        tables.find_table::<Madt>().map_err(|e| alloc::format!("no usable MADT (needed to find the pCPUs): {e:?}"))?;
    let platform = Platform::from_madt(madt.get());
    if platform.cpus.is_empty() {
        return Err("the MADT lists no enabled CPU".to_string());
    }
    let pm1a_control_port = tables
        .find_table::<Fadt>()
        .ok()
        .and_then(|fadt| fadt.pm1a_control_block().ok())
        .filter(|gas| gas.address_space == acpi::address::AddressSpace::SystemIo)
        .map(|gas| gas.address as u16);
    Ok(Discovered { platform, source, pm1a_control_port })
}
