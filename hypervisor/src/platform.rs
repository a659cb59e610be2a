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

/// The host's time of day, read once from its RTC: what every partition's emulated RTC starts
/// from (`vmx::platform`). A host RTC that reads as no date gives the Unix epoch.
pub fn host_wall_clock() -> vmx::platform::WallClock {
    const UPDATE_IN_PROGRESS: u8 = 0x80;
    const REGISTERS: [u8; 8] = [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, firmware::acpi::RTC_CENTURY_INDEX, 0x0B];
    // Read twice until both agree, outside an update (the registers change mid-read otherwise).
    let mut previous = None;
    let registers = loop {
        while read_cmos(0x0A) & UPDATE_IN_PROGRESS != 0 {
            core::hint::spin_loop();
        }
        let now = REGISTERS.map(read_cmos);
        if previous == Some(now) {
            break now;
        }
        previous = Some(now);
    };
    let tsc = crate::tsc::now();
    let tsc_hz = crate::tsc::hz();
    let seconds = vmx::platform::rtc_to_unix_seconds(registers).unwrap_or(0);
    vmx::platform::WallClock { unix_seconds_at_tsc_zero: seconds.saturating_sub(tsc / tsc_hz.max(1)), tsc_hz }
}

fn read_cmos(index: u8) -> u8 {
    use x86_64::instructions::port::Port;
    // SAFETY: the RTC's index and data ports; the hypervisor is their only user (partitions
    // get an emulated RTC, and the config refuses to pass these ports through). NMIs stay
    // enabled (bit 7 clear).
    unsafe {
        Port::<u8>::new(0x70).write(index & 0x7F);
        Port::<u8>::new(0x71).read()
    }
}
