//! A partition's IO-APIC (82093AA register interface): the redirection table through the
//! IOREGSEL/IOWIN window, and edge-triggered pin assertion turned into (vector, destination).

use crate::vlapic::Destination;

pub const IOAPIC_BASE_ADDRESS: u64 = 0xFEC0_0000;
pub const PINS: usize = 24;
const IOREGSEL: u32 = 0x00;
const IOWIN: u32 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION: u32 = 0x10;
/// Version 0x11, maximum redirection entry 23.
const VERSION_VALUE: u32 = ((PINS as u32 - 1) << 16) | 0x11;
const MASKED: u64 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualIoApic {
    id: u8,
    select: u32,
    redirection: [u64; PINS],
}

impl VirtualIoApic {
    pub fn new(id: u8) -> Self {
        VirtualIoApic { id, select: 0, redirection: [MASKED; PINS] }
    }

    /// A 32-bit read at `offset` in the IO-APIC page.
    pub fn read(&self, offset: u32) -> u32 {
        match offset {
            IOREGSEL => self.select,
            IOWIN => match self.select {
                REG_ID => (self.id as u32) << 24,
                REG_VERSION => VERSION_VALUE,
                REG_ARBITRATION => (self.id as u32) << 24,
                r @ REG_REDIRECTION..=0x3F => {
                    let entry = self.redirection[((r - REG_REDIRECTION) / 2) as usize];
                    if r % 2 == 0 {
                        entry as u32
                    } else {
                        (entry >> 32) as u32
                    }
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: u32, value: u32) {
        match offset {
            IOREGSEL => self.select = value & 0xFF,
            IOWIN => match self.select {
                REG_ID => self.id = (value >> 24) as u8 & 0xF,
                r @ REG_REDIRECTION..=0x3F => {
                    let entry = &mut self.redirection[((r - REG_REDIRECTION) / 2) as usize];
                    *entry = if r % 2 == 0 {
                        (*entry & !0xFFFF_FFFF) | value as u64
                    } else {
                        (*entry & 0xFFFF_FFFF) | ((value as u64) << 32)
                    };
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// An edge on `pin`: the vector and destination it is delivered to, unless masked.
    /// (Level-triggered entries are delivered as edges: no device here holds a line.)
    pub fn assert_pin(&self, pin: usize) -> Option<(u8, Destination)> {
        let entry = *self.redirection.get(pin)?;
        if entry & MASKED != 0 {
            return None;
        }
        let target = (entry >> 56) as u8;
        let destination =
            if entry & (1 << 11) != 0 { Destination::Logical(target) } else { Destination::Physical(target) };
        Some((entry as u8, destination))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_and_id_read_through_the_window() {
        let mut io = VirtualIoApic::new(2);
        io.write(IOREGSEL, REG_VERSION);
        assert_eq!(io.read(IOWIN), 0x0017_0011);
        io.write(IOREGSEL, REG_ID);
        assert_eq!(io.read(IOWIN), 2 << 24);
    }

    #[test]
    fn a_programmed_unmasked_pin_delivers_its_vector() {
        let mut io = VirtualIoApic::new(2);
        assert_eq!(io.assert_pin(4), None, "masked at reset");
        // COM1 (pin 4) -> vector 0x24, logical destination 0x01
        io.write(IOREGSEL, REG_REDIRECTION + 8 + 1);
        io.write(IOWIN, 0x0100_0000);
        io.write(IOREGSEL, REG_REDIRECTION + 8);
        io.write(IOWIN, 0x0000_0824);
        assert_eq!(io.read(IOWIN), 0x0000_0824);
        assert_eq!(io.assert_pin(4), Some((0x24, Destination::Logical(1))));
        io.write(IOWIN, 0x0001_0824);
        assert_eq!(io.assert_pin(4), None, "masked again");
        assert_eq!(io.assert_pin(40), None, "no such pin");
    }
}
