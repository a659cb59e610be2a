//! A partition's IO-APIC (82093AA register interface): the redirection table through the
//! IOREGSEL/IOWIN window, and pin assertion turned into (vector, destination). A
//! level-triggered entry keeps its Remote IRR set from delivery until the guest's EOI of its
//! vector (broadcast by the LAPIC), and delivers nothing in between: the hypervisor keeps the
//! physical line masked over that time, so a line the guest never EOIs cannot storm.

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
const TRIGGER_LEVEL: u64 = 1 << 15;
/// Read-only: a level-triggered interrupt was delivered and not yet EOIed.
const REMOTE_IRR: u64 = 1 << 14;

/// What asserting a pin did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assertion {
    /// The guest masked the pin (or there is no such pin): nothing is delivered, as on hardware.
    Masked,
    /// A level-triggered pin whose last interrupt the guest has not EOIed yet: nothing new is
    /// delivered (the line is held, not lost: it is asserted again after the EOI).
    InService,
    /// Delivered to `destination` as `vector`; `level`: the LAPIC must note it in its TMR and
    /// broadcast its EOI back here.
    Delivered { vector: u8, destination: Destination, level: bool },
}
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

    /// The power-on state: every pin masked, edge, nothing in service; the ID stays.
    pub fn reset(&mut self) {
        *self = VirtualIoApic::new(self.id);
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

    /// A 32-bit write at `offset`; returns the level-triggered pins it unmasked that have no
    /// interrupt in service (bit N: pin N): their lines may interrupt again.
    pub fn write(&mut self, offset: u32, value: u32) -> u32 {
        let free = |entry: u64| entry & (MASKED | TRIGGER_LEVEL | REMOTE_IRR) == TRIGGER_LEVEL;
        match offset {
            IOREGSEL => self.select = value & 0xFF,
            IOWIN => match self.select {
                REG_ID => self.id = (value >> 24) as u8 & 0xF,
                r @ REG_REDIRECTION..=0x3F => {
                    let pin = ((r - REG_REDIRECTION) / 2) as usize;
                    let entry = &mut self.redirection[pin];
                    let was_free = free(*entry);
                    *entry = if r % 2 == 0 {
                        // Remote IRR is the IO-APIC's own: a write leaves it as it is.
                        (*entry & !0xFFFF_FFFF) | (*entry & REMOTE_IRR) | (value as u64 & !REMOTE_IRR)
                    } else {
                        (*entry & 0xFFFF_FFFF) | ((value as u64) << 32)
                    };
                    if free(*entry) && !was_free {
                        return 1 << pin;
                    }
                }
                _ => {}
            },
            _ => {}
        }
        0
    }

    /// An interrupt on `pin` (an edge, or a level line asserted): where it is delivered.
    pub fn assert_pin(&mut self, pin: usize) -> Assertion {
        let Some(entry) = self.redirection.get_mut(pin) else { return Assertion::Masked };
        if *entry & MASKED != 0 {
            return Assertion::Masked;
        }
        let level = *entry & TRIGGER_LEVEL != 0;
        if level {
            if *entry & REMOTE_IRR != 0 {
                return Assertion::InService;
            }
            *entry |= REMOTE_IRR;
        }
        let target = (*entry >> 56) as u8;
        let destination =
            if *entry & (1 << 11) != 0 { Destination::Logical(target) } else { Destination::Physical(target) };
        Assertion::Delivered { vector: *entry as u8, destination, level }
    }

    /// The guest EOIed level-triggered `vector` at a LAPIC (its EOI broadcast): every
    /// level-triggered pin in service with that vector is free again. Returns those pins (bit
    /// N: pin N), whose lines the hypervisor unmasks.
    pub fn eoi(&mut self, vector: u8) -> u32 {
        let mut pins = 0;
        for (pin, entry) in self.redirection.iter_mut().enumerate() {
            if *entry & (TRIGGER_LEVEL | REMOTE_IRR) == TRIGGER_LEVEL | REMOTE_IRR && *entry as u8 == vector {
                *entry &= !REMOTE_IRR;
                pins |= 1 << pin;
            }
        }
        pins
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
        assert_eq!(io.assert_pin(4), Assertion::Masked, "masked at reset");
        // COM1 (pin 4) -> vector 0x24, logical destination 0x01
        io.write(IOREGSEL, REG_REDIRECTION + 8 + 1);
        io.write(IOWIN, 0x0100_0000);
        io.write(IOREGSEL, REG_REDIRECTION + 8);
        io.write(IOWIN, 0x0000_0824);
        assert_eq!(io.read(IOWIN), 0x0000_0824);
        let delivered = Assertion::Delivered { vector: 0x24, destination: Destination::Logical(1), level: false };
        assert_eq!(io.assert_pin(4), delivered);
        assert_eq!(io.assert_pin(4), delivered, "an edge pin delivers every edge");
        assert_eq!(io.eoi(0x24), 0, "an EOI frees no edge pin");
        io.write(IOWIN, 0x0001_0824);
        assert_eq!(io.assert_pin(4), Assertion::Masked, "masked again");
        assert_eq!(io.assert_pin(40), Assertion::Masked, "no such pin");
    }

    #[test]
    fn a_level_pin_delivers_once_until_the_guests_eoi_of_its_vector() {
        let mut io = VirtualIoApic::new(2);
        // Pin 11: vector 0x3B, level-triggered, active low, physical destination 0.
        io.write(IOREGSEL, REG_REDIRECTION + 22);
        assert_eq!(io.write(IOWIN, 0x0001_A03B), 0, "still masked");
        assert_eq!(io.write(IOWIN, 0x0000_A03B), 1 << 11, "unmasked: its line may interrupt");
        let delivered = Assertion::Delivered { vector: 0x3B, destination: Destination::Physical(0), level: true };
        assert_eq!(io.assert_pin(11), delivered);
        assert_eq!(io.read(IOWIN) & (1 << 14), 1 << 14, "Remote IRR shows");
        assert_eq!(io.assert_pin(11), Assertion::InService, "held until the EOI");
        // The guest reprograms the entry meanwhile: Remote IRR is not the guest's to clear.
        assert_eq!(io.write(IOWIN, 0x0000_A03B), 0);
        assert_eq!(io.assert_pin(11), Assertion::InService);
        assert_eq!(io.eoi(0x3C), 0, "another vector's EOI");
        assert_eq!(io.eoi(0x3B), 1 << 11);
        assert_eq!(io.read(IOWIN) & (1 << 14), 0);
        assert_eq!(io.eoi(0x3B), 0, "once");
        assert_eq!(io.assert_pin(11), delivered, "the line, still asserted, delivers again");
    }
}
