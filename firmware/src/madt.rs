//! Building a Multiple APIC Description Table (ACPI 6.x, "APIC"): the CPUs, IO-APICs and
//! interrupt source overrides a partition sees. Byte layouts follow the ACPI spec 5.2.12.

use alloc::vec::Vec;

use crate::acpi::Sdt;

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

/// Builds MADT bytes with a valid checksum (the header and checksum: `acpi::Sdt`).
pub struct MadtBuilder {
    table: Sdt,
}

impl MadtBuilder {
    pub fn new(local_apic_address: u32, flags: u32) -> Self {
        let mut table = Sdt::new(&MADT_SIGNATURE, 5);
        table.0.extend_from_slice(&local_apic_address.to_le_bytes());
        table.0.extend_from_slice(&flags.to_le_bytes());
        debug_assert_eq!(table.0.len(), MADT_FIXED_LEN);
        Self { table }
    }

    pub fn local_apic(self, processor_uid: u8, apic_id: u8, flags: u32) -> Self {
        let f = flags.to_le_bytes();
        self.raw_entry(&[ENTRY_LOCAL_APIC, 8, processor_uid, apic_id, f[0], f[1], f[2], f[3]])
    }

    pub fn io_apic(self, id: u8, address: u32, gsi_base: u32) -> Self {
        let (a, g) = (address.to_le_bytes(), gsi_base.to_le_bytes());
        self.raw_entry(&[ENTRY_IO_APIC, 12, id, 0, a[0], a[1], a[2], a[3], g[0], g[1], g[2], g[3]])
    }

    pub fn interrupt_source_override(self, isa_irq: u8, gsi: u32, flags: u16) -> Self {
        let (g, f) = (gsi.to_le_bytes(), flags.to_le_bytes());
        self.raw_entry(&[ENTRY_INTERRUPT_SOURCE_OVERRIDE, 10, 0, isa_irq, g[0], g[1], g[2], g[3], f[0], f[1]])
    }

    /// An entry given as its bytes (type, length, body): for entry types without a method.
    pub fn raw_entry(mut self, entry: &[u8]) -> Self {
        debug_assert_eq!(entry.get(1).copied(), Some(entry.len() as u8));
        self.table.0.extend_from_slice(entry);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.table.finish()
    }
}
