//! The host platform as the MADT describes it: pCPUs (local APIC IDs), IO-APICs and ISA
//! interrupt source overrides. The `acpi` crate finds and validates the tables; this module
//! turns its MADT entries into Phalanx's view, and is what the host tests exercise.

use acpi::madt::{Madt, MadtEntry};
use alloc::vec::Vec;
use core::pin::Pin;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    pub apic_id: u32,
    pub acpi_uid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApic {
    pub id: u8,
    pub address: u32,
    pub gsi_base: u32,
}

/// An ISA IRQ that is wired to a different global system interrupt, or with a non-default
/// polarity/trigger (MPS INTI flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqOverride {
    pub isa_irq: u8,
    pub gsi: u32,
    pub flags: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Enabled CPUs; after [`Platform::boot_cpu_first`], index 0 is the BSP and the index is
    /// the pCPU number used in partition configs.
    pub cpus: Vec<Cpu>,
    pub io_apics: Vec<IoApic>,
    pub overrides: Vec<IrqOverride>,
    pub local_apic_address: u64,
    pub has_8259: bool,
}

impl Platform {
    pub fn from_madt(madt: Pin<&Madt>) -> Self {
        let local_apic_address = madt.local_apic_address as u64;
        let has_8259 = madt.supports_8259();
        Self::from_entries(madt.entries(), local_apic_address, has_8259)
    }

    pub fn from_entries<'a>(
        entries: impl Iterator<Item = MadtEntry<'a>>,
        local_apic_address: u64,
        has_8259: bool,
    ) -> Self {
        let mut platform =
            Platform { cpus: Vec::new(), io_apics: Vec::new(), overrides: Vec::new(), local_apic_address, has_8259 };
        for entry in entries {
            match entry {
                MadtEntry::LocalApic(e) if e.flags & 1 != 0 => {
                    platform.push_cpu(Cpu { apic_id: e.apic_id as u32, acpi_uid: e.processor_id as u32 })
                }
                MadtEntry::LocalX2Apic(e) if e.flags & 1 != 0 => {
                    platform.push_cpu(Cpu { apic_id: e.x2apic_id, acpi_uid: e.processor_uid })
                }
                MadtEntry::IoApic(e) => platform.io_apics.push(IoApic {
                    id: e.io_apic_id,
                    address: e.io_apic_address,
                    gsi_base: e.global_system_interrupt_base,
                }),
                MadtEntry::InterruptSourceOverride(e) if e.bus == 0 => platform.overrides.push(IrqOverride {
                    isa_irq: e.irq,
                    gsi: e.global_system_interrupt,
                    flags: e.flags,
                }),
                MadtEntry::LocalApicAddressOverride(e) => platform.local_apic_address = e.local_apic_address,
                _ => {}
            }
        }
        platform
    }

    /// Some firmware lists a CPU both as a local APIC and a local x2APIC.
    fn push_cpu(&mut self, cpu: Cpu) {
        if !self.cpus.iter().any(|c| c.apic_id == cpu.apic_id) {
            self.cpus.push(cpu);
        }
    }

    /// Moves the boot CPU to index 0, keeping the firmware's order for the rest. Returns
    /// false when the boot CPU is not in the table (the MADT does not describe this machine).
    pub fn boot_cpu_first(&mut self, boot_apic_id: u32) -> bool {
        match self.cpus.iter().position(|c| c.apic_id == boot_apic_id) {
            Some(i) => {
                let bsp = self.cpus.remove(i);
                self.cpus.insert(0, bsp);
                true
            }
            None => false,
        }
    }

    /// The global system interrupt an ISA IRQ arrives on (identity unless overridden).
    pub fn isa_irq_to_gsi(&self, irq: u8) -> u32 {
        self.overrides.iter().find(|o| o.isa_irq == irq).map_or(irq as u32, |o| o.gsi)
    }

    /// The entry for `irq` as a partition's `devices.irqs` names it: an ISA IRQ (0-15) as
    /// [`Platform::isa_irq_route`] gives it, or a GSI above 15 (a PCI interrupt line), which
    /// is level-triggered and active low as PCI's INTx lines are.
    pub fn irq_route(&self, irq: u32, vector: u8, apic_id: u8) -> Option<IrqRoute> {
        if irq < 16 {
            return self.isa_irq_route(irq as u8, vector, apic_id);
        }
        let io_apic = *self.io_apics.iter().filter(|a| a.gsi_base <= irq).max_by_key(|a| a.gsi_base)?;
        let entry = vector as u64 | 1 << 13 | 1 << 15 | (apic_id as u64) << 56;
        Some(IrqRoute { io_apic, pin: irq - io_apic.gsi_base, entry })
    }

    /// Where ISA IRQ `irq` arrives and the IO-APIC redirection entry that delivers it as
    /// `vector` to the CPU with APIC ID `apic_id`: fixed, physical destination, unmasked, with
    /// the polarity and trigger mode the MADT's override gives (ISA's own, active high and
    /// edge, where it gives none or says "conforms"). `None`: no IO-APIC has that GSI.
    pub fn isa_irq_route(&self, irq: u8, vector: u8, apic_id: u8) -> Option<IrqRoute> {
        let gsi = self.isa_irq_to_gsi(irq);
        let flags = self.overrides.iter().find(|o| o.isa_irq == irq).map_or(0, |o| o.flags);
        let io_apic = *self.io_apics.iter().filter(|a| a.gsi_base <= gsi).max_by_key(|a| a.gsi_base)?;
        // MPS INTI flags: polarity in bits 0-1 and trigger mode in bits 2-3, 0b11 = active
        // low / level (0b00 conforms to the bus: ISA is active high, edge).
        let active_low = flags & 0b11 == 0b11;
        let level = (flags >> 2) & 0b11 == 0b11;
        let entry = vector as u64 | (active_low as u64) << 13 | (level as u64) << 15 | (apic_id as u64) << 56;
        Some(IrqRoute { io_apic, pin: gsi - io_apic.gsi_base, entry })
    }
}

/// An IO-APIC redirection entry to program: which IO-APIC, which pin, the 64-bit entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqRoute {
    pub io_apic: IoApic,
    pub pin: u32,
    pub entry: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::madt::{MadtBuilder, LAPIC_ENABLED, PCAT_COMPAT};
    use acpi::sdt::Signature;

    /// Views MADT bytes as the `acpi` crate's table, validating it as the crate does for
    /// tables found in memory.
    fn parse(bytes: &[u8]) -> Platform {
        // The crate reads entries in place: copy into 8-aligned storage that outlives the view.
        let mut storage = vec![0u64; bytes.len().div_ceil(8)];
        let raw = storage.as_mut_ptr() as *mut u8;
        // SAFETY: `storage` holds at least bytes.len() bytes; regions do not overlap.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), raw, bytes.len()) };
        // SAFETY: the bytes are a complete MADT (header length covers the entries), the
        // storage is aligned and lives until the end of this function, and is never moved.
        let madt = unsafe { Pin::new_unchecked(&*(raw as *const Madt)) };
        madt.header.validate(Signature::MADT).expect("valid MADT header and checksum");
        Platform::from_madt(madt)
    }

    #[test]
    fn isa_irqs_route_through_their_override_with_its_polarity_and_trigger() {
        let platform = Platform {
            cpus: Vec::new(),
            io_apics: vec![
                IoApic { id: 2, address: 0xFEC0_0000, gsi_base: 0 },
                IoApic { id: 3, address: 0xFEC1_0000, gsi_base: 24 },
            ],
            overrides: vec![
                IrqOverride { isa_irq: 0, gsi: 2, flags: 0 },
                IrqOverride { isa_irq: 9, gsi: 9, flags: 0b1111 }, // level, active low
                IrqOverride { isa_irq: 4, gsi: 26, flags: 0b0101 }, // edge, active high, moved
            ],
            local_apic_address: 0xFEE0_0000,
            has_8259: true,
        };
        let com2 = platform.isa_irq_route(3, 0x51, 1).unwrap();
        assert_eq!((com2.io_apic.id, com2.pin, com2.entry), (2, 3, 0x51 | 1 << 56), "identity, edge, high");
        let timer = platform.isa_irq_route(0, 0x50, 0).unwrap();
        assert_eq!(timer.pin, 2);
        let sci = platform.isa_irq_route(9, 0x52, 0).unwrap();
        assert_eq!(sci.entry, 0x52 | 1 << 13 | 1 << 15, "active low, level");
        let moved = platform.isa_irq_route(4, 0x53, 7).unwrap();
        assert_eq!((moved.io_apic.id, moved.pin, moved.entry), (3, 2, 0x53 | 7 << 56), "on the second IO-APIC");
        assert_eq!(platform.irq_route(9, 0x52, 0), Some(sci), "an ISA IRQ as ISA's route gives it");
        let pci = platform.irq_route(19, 0x54, 1).unwrap();
        assert_eq!((pci.io_apic.id, pci.pin, pci.entry), (2, 19, 0x54 | 1 << 13 | 1 << 15 | 1 << 56), "level, low");
        let second = platform.irq_route(30, 0x55, 0).unwrap();
        assert_eq!((second.io_apic.id, second.pin), (3, 6));
        let none = Platform { io_apics: Vec::new(), ..platform };
        assert_eq!(none.isa_irq_route(4, 0x53, 0), None);
        assert_eq!(none.irq_route(19, 0x53, 0), None);
    }

    #[test]
    fn bochs_style_madt_gives_cpus_ioapic_and_overrides() {
        let bytes = MadtBuilder::new(0xFEE0_0000, PCAT_COMPAT)
            .local_apic(0, 0, LAPIC_ENABLED)
            .local_apic(1, 1, LAPIC_ENABLED)
            .local_apic(2, 2, LAPIC_ENABLED)
            .local_apic(3, 3, LAPIC_ENABLED)
            .io_apic(4, 0xFEC0_0000, 0)
            .interrupt_source_override(0, 2, 0)
            .interrupt_source_override(9, 9, 0x000D)
            .finish();
        let p = parse(&bytes);
        assert_eq!(p.cpus.iter().map(|c| c.apic_id).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(p.io_apics, [IoApic { id: 4, address: 0xFEC0_0000, gsi_base: 0 }]);
        assert_eq!(p.isa_irq_to_gsi(0), 2, "PIT is rerouted to GSI 2");
        assert_eq!(p.isa_irq_to_gsi(4), 4, "COM1 keeps its identity mapping");
        assert_eq!(p.local_apic_address, 0xFEE0_0000);
        assert!(p.has_8259);
    }

    #[test]
    fn disabled_cpus_are_not_pcpus() {
        let bytes = MadtBuilder::new(0xFEE0_0000, 0)
            .local_apic(0, 0, LAPIC_ENABLED)
            .local_apic(1, 1, 0)
            .local_apic(2, 6, LAPIC_ENABLED)
            .finish();
        let p = parse(&bytes);
        assert_eq!(p.cpus.iter().map(|c| c.apic_id).collect::<Vec<_>>(), [0, 6]);
        assert!(!p.has_8259);
    }

    #[test]
    fn boot_cpu_becomes_pcpu_zero() {
        let bytes = MadtBuilder::new(0xFEE0_0000, 0)
            .local_apic(0, 3, LAPIC_ENABLED)
            .local_apic(1, 5, LAPIC_ENABLED)
            .local_apic(2, 7, LAPIC_ENABLED)
            .finish();
        let mut p = parse(&bytes);
        assert!(p.boot_cpu_first(5));
        assert_eq!(p.cpus.iter().map(|c| c.apic_id).collect::<Vec<_>>(), [5, 3, 7]);
        assert!(!p.boot_cpu_first(9), "a boot CPU missing from the MADT is reported");
    }

    #[test]
    fn corrupted_checksum_is_rejected() {
        let mut bytes = MadtBuilder::new(0xFEE0_0000, 0).local_apic(0, 0, LAPIC_ENABLED).finish();
        bytes[20] ^= 0xFF;
        let mut storage = vec![0u64; bytes.len().div_ceil(8)];
        let raw = storage.as_mut_ptr() as *mut u8;
        // SAFETY: as in `parse`.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), raw, bytes.len()) };
        // SAFETY: as in `parse`.
        let madt = unsafe { &*(raw as *const Madt) };
        assert!(madt.header.validate(Signature::MADT).is_err());
    }
}
