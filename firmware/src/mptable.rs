//! An Intel MultiProcessor Specification 1.4 table listing a partition's vCPUs, its IO-APIC and
//! the ISA interrupt wiring, for guests booted without ACPI (`acpi=off`): Linux finds the
//! floating pointer in the BIOS ROM area and starts one processor per entry. Byte layouts
//! follow the MP spec, chapter 4.

use crate::longmode::{GuestMemory, GuestMemoryError};
use alloc::vec::Vec;

/// Where the floating pointer goes (the e820 map reports 0xF0000-0xFFFFF reserved), and the
/// configuration table right after it.
pub const MP_FLOATING_GPA: u64 = 0xF_0000;
pub const MP_TABLE_GPA: u64 = 0xF_0010;
const LAPIC_ADDRESS: u32 = 0xFEE0_0000;
const LAPIC_VERSION: u8 = 0x14;
const SPEC_REVISION: u8 = 4;
/// Processor signature and feature flags in processor entries (family 6; FPU, APIC).
const CPU_SIGNATURE: u32 = 0x0005_0654;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_ADDRESS: u32 = 0xFEC0_0000;
const IOAPIC_VERSION: u8 = 0x11;
/// ISA IRQs wired to IO-APIC pins: identity, except the timer (IRQ 0 -> pin 2) and the
/// cascade (IRQ 2), as on PC chipsets.
const ISA_IRQS: [(u8, u8); 15] = [
    (0, 2),
    (1, 1),
    (3, 3),
    (4, 4),
    (5, 5),
    (6, 6),
    (7, 7),
    (8, 8),
    (9, 9),
    (10, 10),
    (11, 11),
    (12, 12),
    (13, 13),
    (14, 14),
    (15, 15),
];

/// The IO-APIC's ID in the table (after the vCPUs' APIC IDs).
pub fn ioapic_id(vcpus: u32) -> u8 {
    vcpus as u8
}

fn checksum_fix(bytes: &mut [u8], at: usize) {
    let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    bytes[at] = bytes[at].wrapping_sub(sum);
}

/// The configuration table: header, one processor entry per vCPU (APIC ID = vCPU index,
/// vCPU 0 the boot processor), one ISA bus, one IO-APIC, the ISA interrupt assignments.
pub fn config_table(vcpus: u32) -> Vec<u8> {
    let mut t = Vec::with_capacity(44 + 20 * vcpus as usize + 8);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&0u16.to_le_bytes()); // length, patched below
    t.push(SPEC_REVISION);
    t.push(0); // checksum
    t.extend_from_slice(b"PHALANX ");
    t.extend_from_slice(b"PARTITION   ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&((vcpus + 2 + ISA_IRQS.len() as u32) as u16).to_le_bytes()); // entry count
    t.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0);
    for vcpu in 0..vcpus {
        let flags = 1 | if vcpu == 0 { 2 } else { 0 };
        t.extend_from_slice(&[0, vcpu as u8, LAPIC_VERSION, flags]);
        t.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        t.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
    }
    t.extend_from_slice(&[1, 0]);
    t.extend_from_slice(b"ISA   ");
    t.extend_from_slice(&[2, ioapic_id(vcpus), IOAPIC_VERSION, 1]);
    t.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    for (irq, pin) in ISA_IRQS {
        // Vectored interrupt, conforming polarity/trigger, from ISA bus 0.
        t.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id(vcpus), pin]);
    }
    let len = t.len() as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    checksum_fix(&mut t, 7);
    t
}

/// The 16-byte floating pointer structure pointing at `table_gpa`.
pub fn floating_pointer(table_gpa: u32) -> [u8; 16] {
    let mut f = [0u8; 16];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&table_gpa.to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = SPEC_REVISION;
    checksum_fix(&mut f, 10);
    f
}

/// Writes both into the partition's BIOS area.
pub fn write_mp_table(mem: &mut impl GuestMemory, vcpus: u32) -> Result<(), GuestMemoryError> {
    mem.write(MP_FLOATING_GPA, &floating_pointer(MP_TABLE_GPA as u32))?;
    mem.write(MP_TABLE_GPA, &config_table(vcpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn floating_pointer_is_valid_and_points_at_the_table() {
        let f = floating_pointer(0xF_0010);
        assert_eq!(&f[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(f[4..8].try_into().unwrap()), 0xF_0010);
        assert!(sums_to_zero(&f));
        assert_eq!(f[11], 0, "feature byte 1 = 0: a configuration table is present");
    }

    #[test]
    fn config_table_lists_each_vcpu_with_vcpu0_as_bsp() {
        let t = config_table(4);
        assert_eq!(&t[0..4], b"PCMP");
        assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
        assert!(sums_to_zero(&t));
        assert_eq!(u16::from_le_bytes([t[34], t[35]]), 4 + 1 + 1 + 15, "processors, bus, IO-APIC, ISA IRQs");
        assert_eq!(u32::from_le_bytes(t[36..40].try_into().unwrap()), 0xFEE0_0000);
        let cpus: Vec<(u8, u8)> = (0..4).map(|i| (t[44 + i * 20 + 1], t[44 + i * 20 + 3])).collect();
        assert_eq!(cpus, [(0, 3), (1, 1), (2, 1), (3, 1)], "APIC ID and flags (enabled, BSP)");
        assert_eq!(&t[44 + 80..44 + 88], &[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
        assert_eq!(&t[132..140], &[2, 4, 0x11, 1, 0x00, 0x00, 0xC0, 0xFE], "IO-APIC 4 at 0xFEC00000");
        let com1 = &t[140 + 3 * 8..140 + 4 * 8];
        assert_eq!(com1, &[3, 0, 0, 0, 0, 4, 4, 4], "IRQ 4 (COM1) to pin 4");
    }
}
