//! The ACPI tables a partition's firmware provides (ACPI 6.x, chapter 5): an RSDP where a
//! kernel's BIOS-area scan finds it (and in the boot protocol's `acpi_rsdp_addr`), RSDT and
//! XSDT, a FADT with a FACS, a DSDT holding only the `_S5` sleep package (so poweroff works),
//! and the MADT listing the partition's vCPUs and IO-APIC.
//!
//! The fixed hardware the FADT describes is what the hypervisor emulates for every partition
//! (`vmx::platform`): a PM1a event and control block and a 32-bit PM timer in the I/O ports
//! from [`PM_BASE`], the SCI on IRQ 9 (never raised: there are no fixed events), and the
//! reset register at port 0xCF9. The FADT says there is no 8042 and no MSI, so a kernel
//! neither probes a keyboard controller nor expects message-signalled interrupts.
//!
//! Written by hand: the `acpi` crate parses tables but does not build them; the host tests
//! parse everything built here back with it.

use alloc::vec;
use alloc::vec::Vec;

use crate::aml;
use crate::longmode::{GuestMemory, GuestMemoryError};
use crate::madt::{MadtBuilder, LAPIC_ENABLED, PCAT_COMPAT};

/// The tables' place: 16-byte aligned inside 0xE0000-0xFFFFF (where Linux looks for the
/// RSDP when the boot protocol does not say), reported reserved by the e820 map. The MP
/// table lives at 0xF0000.
pub const ACPI_AREA_GPA: u64 = 0xE_0000;
pub const ACPI_AREA_END: u64 = 0xF_0000;
pub const RSDP_GPA: u64 = ACPI_AREA_GPA;

/// First I/O port of the emulated ACPI fixed hardware: PM1a status (2 bytes) and enable (2),
/// PM1a control (2), then the PM timer (4). The same base QEMU's ICH9 uses.
pub const PM_BASE: u16 = 0x600;
pub const PM1A_EVENT_PORT: u16 = PM_BASE;
pub const PM1A_CONTROL_PORT: u16 = PM_BASE + 4;
pub const PM_TIMER_PORT: u16 = PM_BASE + 8;
/// Ports `PM_BASE..PM_END` are the emulated block.
pub const PM_END: u16 = PM_BASE + 12;
/// The PM timer's fixed rate (ACPI 4.8.3.3).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The reset register (the chipset's reset control port) and the value that resets.
pub const RESET_PORT: u16 = 0xCF9;
pub const RESET_VALUE: u8 = 0x06;
/// The ISA IRQ of the system control interrupt.
pub const SCI_IRQ: u8 = 9;
/// Where the SCI goes when the partition owns IRQ 9 (a device's level line must not share a
/// pin with an SCI of another polarity), in this order.
const SCI_IRQ_CHOICES: [u8; 10] = [SCI_IRQ, 10, 11, 5, 7, 12, 14, 15, 6, 1];

/// The SCI's IRQ for a partition that owns `owned` (its `devices.irqs`): the first ISA IRQ of
/// the usual ones it does not own. Never raised (there are no fixed events), but Linux claims it.
pub fn sci_irq_for(owned: &[u32]) -> u8 {
    SCI_IRQ_CHOICES.into_iter().find(|irq| !owned.contains(&(*irq as u32))).unwrap_or(SCI_IRQ)
}
/// The `_S5` sleep type written to PM1a control's SLP_TYP field to power off.
pub const S5_SLEEP_TYPE: u16 = 5;
/// PM1 control bits (ACPI 4.8.3.2.1).
pub const PM1_SCI_EN: u16 = 1 << 0;
pub const PM1_SLP_TYP_SHIFT: u16 = 10;
pub const PM1_SLP_EN: u16 = 1 << 13;

const LOCAL_APIC_ADDRESS: u32 = 0xFEE0_0000;
const IOAPIC_ADDRESS: u32 = 0xFEC0_0000;
const OEM_ID: &[u8; 6] = b"PHALNX";
const OEM_TABLE_ID: &[u8; 8] = b"PHALANX ";

const RSDP_LEN: usize = 36;
const HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276;
const FACS_LEN: usize = 64;

// Where each table goes inside the area (the MADT last: it grows with the vCPUs).
const RSDT_OFFSET: u64 = 0x40;
const XSDT_OFFSET: u64 = 0x80;
const FACS_OFFSET: u64 = 0x100; // 64-byte aligned, as the FACS must be
const FADT_OFFSET: u64 = 0x200;
const DSDT_OFFSET: u64 = 0x400;
const MADT_OFFSET: u64 = 0x800;

// FADT flags (ACPI 5.2.9, table 5.10).
const FADT_WBINVD: u32 = 1 << 0;
const FADT_PROC_C1: u32 = 1 << 2;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
const FADT_TMR_VAL_EXT: u32 = 1 << 8;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
// IA-PC boot architecture flags: legacy ISA devices (the UART, RTC), no 8042, no VGA, no MSI.
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// CMOS index of the century byte (the emulated RTC keeps it).
pub const RTC_CENTURY_INDEX: u8 = 0x32;

// MADT interrupt source override flags (MPS INTI): polarity bits 0-1, trigger mode bits 2-3.
const INTI_ACTIVE_HIGH: u16 = 0b01;
const INTI_ACTIVE_LOW: u16 = 0b11;
const INTI_LEVEL: u16 = 0b11 << 2;
const ENTRY_LOCAL_APIC_NMI: u8 = 4;

/// A passed-through PCI function's interrupt, as the partition's tables describe it: its
/// device number on bus 0, its interrupt pin (1 = INTA) and the IRQ (GSI) it arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciInterrupt {
    pub device: u8,
    pub pin: u8,
    pub line: u8,
}

/// The DSDT's AML: `Name (_S5, Package (4) { 5, 5, 0, 0 })` (SLP_TYPa, SLP_TYPb, reserved),
/// and, for a partition with PCI functions, its PCI root bridge (below).
fn dsdt_aml(pci: &[PciInterrupt]) -> Vec<u8> {
    let s5 = S5_SLEEP_TYPE as u64;
    let mut aml =
        aml::name(b"_S5_", aml::package(&[aml::integer(s5), aml::integer(s5), aml::integer(0), aml::integer(0)]));
    if !pci.is_empty() {
        aml.extend(pci_root_bridge(pci));
    }
    aml
}

/// `\_SB.PCI0`, the PCI root bridge (PNP0A03, bus 0), for a partition with passed-through
/// functions: Linux scans a bus under ACPI only below one. `_CRS` gives it the I/O space but
/// the configuration ports (the functions' BARs lie in it; memory BARs are not passed
/// through), and `_PRT` routes each function's pin to its IRQ as a GSI (level-triggered,
/// active low, as PCI lines are).
fn pci_root_bridge(pci: &[PciInterrupt]) -> Vec<u8> {
    // Word address space descriptors (ACPI 6.4, 6.4.3.5.3): a producer with fixed bounds.
    let word_space = |kind: u8, flags: u8, min: u16, max: u16| {
        let mut d = alloc::vec![0x88, 13, 0, kind, 0x0C, flags];
        for field in [0, min, max, 0, max.wrapping_sub(min).wrapping_add(1)] {
            d.extend_from_slice(&field.to_le_bytes());
        }
        d
    };
    let mut resources = word_space(2, 0, 0, 0); // bus 0 only
    resources.extend(word_space(1, 3, 0x0000, 0x0CF7)); // I/O below the configuration ports
    resources.extend(word_space(1, 3, 0x0D00, 0xFFFF)); // and above them
    resources.extend([0x79, 0]); // end tag (no checksum)
    let routes: Vec<Vec<u8>> = pci
        .iter()
        .map(|p| {
            let address = (p.device as u64) << 16 | 0xFFFF; // any function of the device
            let pin = p.pin.saturating_sub(1) as u64; // 0 = INTA
            aml::package(&[aml::integer(address), aml::integer(pin), aml::integer(0), aml::integer(p.line as u64)])
        })
        .collect();
    let body = [
        aml::name(b"_HID", aml::eisa_id(b"PNP0A03")),
        aml::name(b"_UID", aml::integer(0)),
        aml::name(b"_BBN", aml::integer(0)),
        aml::name(b"_CRS", aml::buffer(&resources)),
        aml::name(b"_PRT", aml::package(&routes)),
    ]
    .concat();
    aml::root_scope(b"_SB_", aml::device(b"PCI0", body))
}

/// An ACPI Generic Address Structure for `bits` wide I/O at `port`.
fn io_address(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = bits;
    g[3] = bits.div_ceil(8).trailing_zeros() as u8 + 1; // access size: 1 byte, 2 words, 3 dwords
    g[4..12].copy_from_slice(&(port as u64).to_le_bytes());
    g
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// A table with the standard header (ACPI 5.2.6), its body appended to `.0`; `finish`
/// patches length and checksum. Every table built here and the MADT (`madt`) use it.
pub(crate) struct Sdt(pub(crate) Vec<u8>);

impl Sdt {
    pub(crate) fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(signature);
        b.extend_from_slice(&[0; 4]); // length
        b.push(revision);
        b.push(0); // checksum
        b.extend_from_slice(OEM_ID);
        b.extend_from_slice(OEM_TABLE_ID);
        b.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        b.extend_from_slice(b"PHLX");
        b.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        debug_assert_eq!(b.len(), HEADER_LEN);
        Sdt(b)
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// Every table of a partition with `vcpus` vCPUs (APIC ID = vCPU index, the IO-APIC's ID
/// after them), its SCI on `sci_irq` and its passed-through PCI functions' interrupts `pci`
/// (a PCI root bridge in the DSDT routes them; the MADT overrides their ISA IRQs as
/// level-triggered, active low), each with the guest-physical address it goes to.
pub fn tables(vcpus: u32, ioapic_id: u8, sci_irq: u8, pci: &[PciInterrupt]) -> Vec<(u64, Vec<u8>)> {
    let at = |offset: u64| ACPI_AREA_GPA + offset;
    let mut rsdt = Sdt::new(b"RSDT", 1);
    let mut xsdt = Sdt::new(b"XSDT", 1);
    for table in [FADT_OFFSET, MADT_OFFSET] {
        rsdt.0.extend_from_slice(&(at(table) as u32).to_le_bytes());
        xsdt.0.extend_from_slice(&at(table).to_le_bytes());
    }

    let mut dsdt = Sdt::new(b"DSDT", 2);
    dsdt.0.extend_from_slice(&dsdt_aml(pci));

    let mut facs = [0u8; FACS_LEN];
    facs[0..4].copy_from_slice(b"FACS");
    facs[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    facs[32] = 2; // version

    vec![
        (RSDP_GPA, rsdp(at(RSDT_OFFSET) as u32, at(XSDT_OFFSET)).to_vec()),
        (at(RSDT_OFFSET), rsdt.finish()),
        (at(XSDT_OFFSET), xsdt.finish()),
        (at(FACS_OFFSET), facs.to_vec()),
        (at(FADT_OFFSET), fadt(at(FACS_OFFSET), at(DSDT_OFFSET), sci_irq)),
        (at(DSDT_OFFSET), dsdt.finish()),
        (at(MADT_OFFSET), madt(vcpus, ioapic_id, sci_irq, pci)),
    ]
}

/// Writes the tables into the partition's memory and returns the RSDP's address.
pub fn write_acpi_tables(
    mem: &mut impl GuestMemory,
    vcpus: u32,
    ioapic_id: u8,
    sci_irq: u8,
    pci: &[PciInterrupt],
) -> Result<u64, GuestMemoryError> {
    for (gpa, bytes) in tables(vcpus, ioapic_id, sci_irq, pci) {
        mem.write(gpa, &bytes)?;
    }
    Ok(RSDP_GPA)
}

fn rsdp(rsdt: u32, xsdt: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2; // revision: ACPI 2.0+, with the XSDT
    r[16..20].copy_from_slice(&rsdt.to_le_bytes());
    r[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// The FADT, revision 6 (ACPI 6.4 layout, 276 bytes), legacy (not hardware-reduced) PC.
fn fadt(facs: u64, dsdt: u64, sci_irq: u8) -> Vec<u8> {
    let mut f = Sdt::new(b"FACP", 6);
    f.0.resize(FADT_LEN, 0);
    let b = &mut f.0;
    let put = |b: &mut Vec<u8>, at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
    put(b, 36, &(facs as u32).to_le_bytes());
    put(b, 40, &(dsdt as u32).to_le_bytes());
    put(b, 46, &(sci_irq as u16).to_le_bytes());
    // SMI_CMD (48) = 0: there is no SMM; the hardware is in ACPI mode from power-on.
    put(b, 56, &(PM1A_EVENT_PORT as u32).to_le_bytes());
    put(b, 64, &(PM1A_CONTROL_PORT as u32).to_le_bytes());
    put(b, 76, &(PM_TIMER_PORT as u32).to_le_bytes());
    b[88] = 4; // PM1 event block length
    b[89] = 2; // PM1 control block length
    b[91] = 4; // PM timer length
    put(b, 96, &101u16.to_le_bytes()); // P_LVL2_LAT > 100: no C2
    put(b, 98, &1001u16.to_le_bytes()); // P_LVL3_LAT > 1000: no C3
    b[108] = RTC_CENTURY_INDEX;
    put(b, 109, &(BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_MSI_NOT_SUPPORTED).to_le_bytes());
    let flags = FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP;
    put(b, 112, &flags.to_le_bytes());
    put(b, 116, &io_address(RESET_PORT, 8));
    b[128] = RESET_VALUE;
    b[131] = 4; // FADT minor version (6.4)
    put(b, 132, &facs.to_le_bytes());
    put(b, 140, &dsdt.to_le_bytes());
    put(b, 148, &io_address(PM1A_EVENT_PORT, 32));
    put(b, 172, &io_address(PM1A_CONTROL_PORT, 16));
    put(b, 208, &io_address(PM_TIMER_PORT, 32));
    put(b, 268, b"PHALANX\0"); // hypervisor vendor identity
    f.finish()
}

/// The MADT: one enabled local APIC per vCPU, the IO-APIC with GSIs from 0, the PC overrides
/// (ISA IRQ 0 on pin 2; the SCI level-triggered, active high; PCI lines level-triggered,
/// active low) and LINT1 as NMI on every CPU.
fn madt(vcpus: u32, ioapic_id: u8, sci_irq: u8, pci: &[PciInterrupt]) -> Vec<u8> {
    let mut m = MadtBuilder::new(LOCAL_APIC_ADDRESS, PCAT_COMPAT);
    for vcpu in 0..vcpus {
        m = m.local_apic(vcpu as u8, vcpu as u8, LAPIC_ENABLED);
    }
    m = m.io_apic(ioapic_id, IOAPIC_ADDRESS, 0).interrupt_source_override(0, 2, 0).interrupt_source_override(
        sci_irq,
        sci_irq as u32,
        INTI_ACTIVE_HIGH | INTI_LEVEL,
    );
    for line in pci.iter().map(|p| p.line).filter(|&l| l < 16) {
        m = m.interrupt_source_override(line, line as u32, INTI_ACTIVE_LOW | INTI_LEVEL);
    }
    m.raw_entry(&[ENTRY_LOCAL_APIC_NMI, 6, 0xFF, 0, 0, 1]) // all processors, LINT1
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use acpi::fadt::Fadt;
    use acpi::madt::{Madt, MadtEntry};
    use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
    use core::ptr::NonNull;
    use std::sync::Arc;

    /// Guest memory from 0xE0000 with the tables written, seen by the `acpi` crate as
    /// physical memory.
    #[derive(Clone)]
    struct Area(Arc<Vec<u8>>);

    impl Area {
        fn with_tables(vcpus: u32) -> Self {
            let mut bytes = vec![0u8; (ACPI_AREA_END - ACPI_AREA_GPA) as usize];
            for (gpa, table) in tables(vcpus, vcpus as u8, SCI_IRQ, &[]) {
                let at = (gpa - ACPI_AREA_GPA) as usize;
                bytes[at..at + table.len()].copy_from_slice(&table);
            }
            Area(Arc::new(bytes))
        }
    }

    impl AcpiHandler for Area {
        unsafe fn map_physical_region<T>(&self, physical_address: usize, size: usize) -> PhysicalMapping<Self, T> {
            let offset = physical_address - ACPI_AREA_GPA as usize;
            assert!(offset + size <= self.0.len(), "mapping {physical_address:#x}+{size} outside the area");
            let virtual_start = NonNull::new(self.0.as_ptr().add(offset) as *mut T).unwrap();
            // SAFETY: the region lies inside the area's bytes, which outlive the mapping
            // (the handler holds them); the crate only reads through it.
            unsafe { PhysicalMapping::new(physical_address, virtual_start, size, size, self.clone()) }
        }

        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    fn parse(vcpus: u32) -> AcpiTables<Area> {
        // SAFETY: the RSDP address is inside the handler's area.
        unsafe { AcpiTables::from_rsdp(Area::with_tables(vcpus), RSDP_GPA as usize) }.expect("tables parse")
    }

    #[test]
    fn every_table_checksums_and_the_acpi_crate_finds_them_from_the_rsdp() {
        for (gpa, bytes) in tables(2, 2, SCI_IRQ, &[]) {
            if &bytes[0..4] == b"FACS" {
                continue; // the FACS has no checksum
            }
            let len = if gpa == RSDP_GPA { 20 } else { bytes.len() };
            assert_eq!(checksum(&bytes[..len]), 0, "table at {gpa:#x}");
            assert_eq!(checksum(&bytes), 0, "table at {gpa:#x} (whole)");
            assert!(gpa % 16 == 0 && gpa + bytes.len() as u64 <= ACPI_AREA_END);
        }
        let t = parse(2);
        let signatures: Vec<String> = t.headers().map(|h| h.signature.as_str().to_string()).collect();
        assert_eq!(signatures, ["FACP", "APIC"]);
        let dsdt = t.dsdt().expect("DSDT");
        assert_eq!(dsdt.address as u64, ACPI_AREA_GPA + DSDT_OFFSET + HEADER_LEN as u64);
        assert_eq!(dsdt.length as usize, dsdt_aml(&[]).len());
    }

    #[test]
    fn the_fadt_describes_the_emulated_fixed_hardware() {
        let t = parse(2);
        let fadt = t.find_table::<Fadt>().expect("FADT");
        assert_eq!(fadt.pm1a_event_block().unwrap().address, PM1A_EVENT_PORT as u64);
        assert_eq!(fadt.pm1a_control_block().unwrap().address, PM1A_CONTROL_PORT as u64);
        let timer = fadt.pm_timer_block().unwrap().expect("PM timer");
        assert_eq!((timer.address, timer.bit_width), (PM_TIMER_PORT as u64, 32));
        assert!({ fadt.flags }.pm_timer_is_32_bit());
        assert!({ fadt.flags }.supports_system_reset_via_fadt());
        let reset = fadt.reset_register().unwrap();
        assert_eq!((reset.address, reset.bit_width, fadt.reset_value), (RESET_PORT as u64, 8, RESET_VALUE));
        assert_eq!({ fadt.sci_interrupt }, SCI_IRQ as u16);
        assert_eq!({ fadt.smi_cmd_port }, 0, "no SMM: ACPI mode from power-on");
        assert_eq!(fadt.dsdt_address().unwrap() as u64, ACPI_AREA_GPA + DSDT_OFFSET);
        assert_eq!(fadt.facs_address().unwrap() as u64, ACPI_AREA_GPA + FACS_OFFSET);
        assert!(!{ fadt.iapc_boot_arch }.motherboard_implements_8042());
        assert!({ fadt.iapc_boot_arch }.legacy_devices_are_accessible());
        assert!(!{ fadt.flags }.system_is_hw_reduced_acpi());
    }

    #[test]
    fn the_sci_moves_off_an_irq_the_partition_owns_and_pci_lines_are_level_active_low() {
        assert_eq!(sci_irq_for(&[]), 9);
        assert_eq!(sci_irq_for(&[3, 9]), 10);
        assert_eq!(sci_irq_for(&[9, 10, 11]), 5);
        let nic = PciInterrupt { device: 2, pin: 1, line: 9 };
        let bytes: Vec<(u64, Vec<u8>)> = tables(2, 2, 10, &[nic]);
        let fadt = &bytes.iter().find(|(_, t)| &t[0..4] == b"FACP").unwrap().1;
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 10);
        let madt = &bytes.iter().find(|(_, t)| &t[0..4] == b"APIC").unwrap().1;
        // The SCI's override: type 2, length 10, bus 0, source 10, GSI 10, level / active high.
        assert!(madt.windows(10).any(|e| e == [2, 10, 0, 10, 10, 0, 0, 0, 0b1101, 0]), "{madt:x?}");
        // The PCI line on IRQ 9: level, active low.
        assert!(madt.windows(10).any(|e| e == [2, 10, 0, 9, 9, 0, 0, 0, 0b1111, 0]), "{madt:x?}");
    }

    #[test]
    fn a_partition_with_pci_functions_gets_a_root_bridge_routing_their_pins() {
        assert_eq!(dsdt_aml(&[]).len(), 14, "without functions: _S5 alone");
        let nic = PciInterrupt { device: 2, pin: 1, line: 9 };
        let aml = dsdt_aml(&[nic]);
        let bridge = &aml[14..];
        // Scope (\_SB) whose PkgLength covers the rest of the DSDT.
        assert_eq!(bridge[0], 0x10);
        let length = crate::aml::pkg_length(bridge.len() - 1 - crate::aml::pkg_length(bridge.len()).len());
        assert_eq!(&bridge[1..1 + length.len()], &length[..]);
        assert_eq!(&bridge[1 + length.len()..][..5], b"\\_SB_");
        let find = |needle: &[u8]| aml.windows(needle.len()).position(|w| w == needle);
        assert!(find(&[0x5B, 0x82]).is_some() && find(b"PCI0").is_some(), "Device (PCI0)");
        assert!(find(&[0x08, b'_', b'H', b'I', b'D', 0x0C, 0x41, 0xD0, 0x0A, 0x03]).is_some(), "PNP0A03");
        // _PRT: Package { Package (4) { 0x0002FFFF, Zero (INTA), Zero, 9 } }.
        let route = [0x12, 11, 4, 0x0C, 0xFF, 0xFF, 0x02, 0x00, 0x00, 0x00, 0x0A, 9];
        let prt = find(b"_PRT").expect("_PRT");
        assert_eq!(&aml[prt + 4..prt + 7], &[0x12, 14, 1], "one route");
        assert_eq!(&aml[prt + 7..prt + 7 + route.len()], &route);
        // _CRS: I/O 0x0000-0x0cf7 and 0x0d00-0xffff, produced by the bridge.
        let io_low = [0x88, 13, 0, 1, 0x0C, 3, 0, 0, 0x00, 0x00, 0xF7, 0x0C, 0, 0, 0xF8, 0x0C];
        assert!(find(&io_low).is_some(), "the I/O window below 0xcf8");
        let io_high = [0x88, 13, 0, 1, 0x0C, 3, 0, 0, 0x00, 0x0D, 0xFF, 0xFF, 0, 0, 0x00, 0xF3];
        assert!(find(&io_high).is_some(), "the I/O window above 0xcff");
        // The DSDT with it still checksums (the acpi crate validates every table it maps).
        for (_, table) in tables(2, 2, 10, &[nic]) {
            if &table[0..4] == b"DSDT" {
                assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            }
        }
    }

    #[test]
    fn the_madt_lists_exactly_the_partitions_vcpus_and_its_ioapic() {
        for vcpus in [1u32, 2, 7, 254] {
            let t = parse(vcpus);
            let madt = t.find_table::<Madt>().expect("MADT");
            // SAFETY: the mapping stays alive for the iteration.
            let madt = unsafe { core::pin::Pin::new_unchecked(&*madt.virtual_start().as_ptr()) };
            assert!(madt.supports_8259());
            let mut cpus = Vec::new();
            let mut ioapics = Vec::new();
            let mut overrides = Vec::new();
            let mut nmis = 0;
            for entry in madt.entries() {
                match entry {
                    MadtEntry::LocalApic(e) => cpus.push((e.processor_id, e.apic_id, { e.flags })),
                    MadtEntry::IoApic(e) => {
                        ioapics.push((e.io_apic_id, { e.io_apic_address }, { e.global_system_interrupt_base }))
                    }
                    MadtEntry::InterruptSourceOverride(e) => {
                        overrides.push((e.irq, { e.global_system_interrupt }, { e.flags }))
                    }
                    MadtEntry::LocalApicNmi(e) => {
                        assert_eq!((e.processor_id, { e.nmi_line }), (0xFF, 1));
                        nmis += 1;
                    }
                    other => panic!("unexpected MADT entry {other:?}"),
                }
            }
            let expected: Vec<(u8, u8, u32)> = (0..vcpus).map(|v| (v as u8, v as u8, LAPIC_ENABLED)).collect();
            assert_eq!(cpus, expected, "{vcpus} vCPUs");
            assert_eq!(ioapics, [(vcpus as u8, IOAPIC_ADDRESS, 0)]);
            assert_eq!(overrides, [(0, 2, 0), (SCI_IRQ, SCI_IRQ as u32, 0b1101)]);
            assert_eq!(nmis, 1);
        }
    }

    #[test]
    fn the_dsdt_holds_the_s5_package_linux_reads_for_poweroff() {
        let t = parse(1);
        let dsdt = t.dsdt().unwrap();
        let area = Area::with_tables(1);
        let at = dsdt.address - ACPI_AREA_GPA as usize;
        let aml = &area.0[at..at + dsdt.length as usize];
        assert_eq!(&aml[..5], b"\x08_S5_");
        // Package elements: SLP_TYPa then SLP_TYPb, each a byte constant.
        assert_eq!((aml[8], aml[9], aml[10], aml[11]), (0x0A, 5, 0x0A, 5));
    }

    #[test]
    fn the_tables_fit_their_area_below_the_mp_table_for_the_largest_partition() {
        let last = tables(254, 254, SCI_IRQ, &[]).into_iter().map(|(gpa, b)| gpa + b.len() as u64).max().unwrap();
        assert!(last <= ACPI_AREA_END, "{last:#x}");
    }
}
