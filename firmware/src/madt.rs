//! Building a Multiple APIC Description Table (ACPI 6.x, "APIC"): the CPUs, IO-APICs and
//! interrupt source overrides a partition sees. Byte layouts follow the ACPI spec 5.2.12.

use alloc::vec::Vec;

pub const MADT_SIGNATURE: [u8; 4] = *b"APIC";
/// Size of the standard SDT header plus the MADT's local-APIC address and flags.
pub const MADT_FIXED_LEN: usize = 44;
/// MADT flag: the platform also has dual 8259 PICs.
pub const PCAT_COMPAT: u32 = 1;
/// Local APIC entry flag: the processor is enabled.
pub const LAPIC_ENABLED: u32 = 1;

const ENTRY_LOCAL_APIC: u8 = 0;
const ENTRY_IO_APIC: u8 = 1;
const ENTRY_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;

/// Builds MADT bytes with a valid checksum.
#[derive(Debug, Clone)]
pub struct MadtBuilder {
    bytes: Vec<u8>,
}

impl MadtBuilder {
    pub fn new(local_apic_address: u32, flags: u32) -> Self {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(&MADT_SIGNATURE);
        bytes.extend_from_slice(&0u32.to_le_bytes()); // length, patched in `finish`
        bytes.push(5); // revision
        bytes.push(0); // checksum, patched in `finish`
        bytes.extend_from_slice(b"PHALNX");
        bytes.extend_from_slice(b"PHALANX ");
        bytes.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        bytes.extend_from_slice(b"PHLX");
        bytes.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        bytes.extend_from_slice(&local_apic_address.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        debug_assert_eq!(bytes.len(), MADT_FIXED_LEN);
        Self { bytes }
    }

    pub fn local_apic(mut self, processor_uid: u8, apic_id: u8, flags: u32) -> Self {
        self.bytes.extend_from_slice(&[ENTRY_LOCAL_APIC, 8, processor_uid, apic_id]);
        self.bytes.extend_from_slice(&flags.to_le_bytes());
        self
    }

    pub fn io_apic(mut self, id: u8, address: u32, gsi_base: u32) -> Self {
        self.bytes.extend_from_slice(&[ENTRY_IO_APIC, 12, id, 0]);
        self.bytes.extend_from_slice(&address.to_le_bytes());
        self.bytes.extend_from_slice(&gsi_base.to_le_bytes());
        self
    }

    pub fn interrupt_source_override(mut self, isa_irq: u8, gsi: u32, flags: u16) -> Self {
        self.bytes.extend_from_slice(&[ENTRY_INTERRUPT_SOURCE_OVERRIDE, 10, 0, isa_irq]);
        self.bytes.extend_from_slice(&gsi.to_le_bytes());
        self.bytes.extend_from_slice(&flags.to_le_bytes());
        self
    }

    /// An entry given as its bytes (type, length, body): for entry types without a method.
    pub fn raw_entry(mut self, entry: &[u8]) -> Self {
        debug_assert_eq!(entry.get(1).copied(), Some(entry.len() as u8));
        self.bytes.extend_from_slice(entry);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.bytes[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = self.bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
        self.bytes[9] = 0u8.wrapping_sub(sum);
        self.bytes
    }
}
