//! A PCI function passed through to a partition, as its configuration space shows it. The
//! header is read from the machine at boot (`PassedFunction::new`); the guest reads it back
//! as the machine has it, with three registers of its own: the command register (kept here,
//! not forwarded: the machine's firmware enabled decoding and the function stays where it
//! put it), BAR sizing (an all-ones write reads back the BAR's size mask, as on hardware; any
//! other write leaves the BAR where the machine placed it, since its ports pass through at
//! that address) and the interrupt line (a label the guest may rewrite). Everything else
//! reads as the machine has it and ignores writes.

extern crate alloc;

use alloc::vec::Vec;
use core::ops::RangeInclusive;

/// Configuration header registers (dword offsets x 4).
const COMMAND: usize = 0x04;
const HEADER_TYPE: usize = 0x0C;
const BAR0: usize = 0x10;
const BARS: usize = 6;
const INTERRUPT: usize = 0x3C;
/// A BAR's bit 0: I/O space.
const BAR_IO: u32 = 1;
/// Command register bits the guest may set: I/O and memory decoding, bus mastering.
const COMMAND_WRITABLE: u16 = 0b111;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedFunction {
    pub device: u8,
    pub function: u8,
    /// The first 64 bytes of its configuration space as the machine has it (the header).
    header: [u32; 16],
    /// Per BAR, what an all-ones write reads back on the machine (0: no BAR there).
    bar_masks: [u32; BARS],
    /// BARs the guest wrote all ones to (bit N: BAR N): they read back their mask.
    sizing: u8,
    command: u16,
    interrupt_line: u8,
}

/// What the machine's function needs that Phalanx does not pass through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// Not a type-0 (endpoint) header: a bridge.
    NotAnEndpoint { header_type: u8 },
    /// A memory BAR (its MMIO is not mapped into partitions).
    MemoryBar { bar: usize },
}

impl PassedFunction {
    /// Function `device`.`function` on bus 0, from its header and BAR masks as read from the
    /// machine; refused if it needs what is not passed through.
    pub fn new(device: u8, function: u8, header: [u32; 16], bar_masks: [u32; BARS]) -> Result<Self, Unsupported> {
        let header_type = (header[HEADER_TYPE / 4] >> 16) as u8 & 0x7F;
        if header_type != 0 {
            return Err(Unsupported::NotAnEndpoint { header_type });
        }
        if let Some(bar) = (0..BARS).find(|&b| bar_masks[b] != 0 && bar_masks[b] & BAR_IO == 0) {
            return Err(Unsupported::MemoryBar { bar });
        }
        Ok(PassedFunction {
            device,
            function,
            header,
            bar_masks,
            sizing: 0,
            command: header[COMMAND / 4] as u16,
            interrupt_line: header[INTERRUPT / 4] as u8,
        })
    }

    /// As after a reset: the registers that are the guest's hold the machine's values again.
    pub fn at_reset(&self) -> PassedFunction {
        PassedFunction {
            sizing: 0,
            command: self.header[COMMAND / 4] as u16,
            interrupt_line: self.header[INTERRUPT / 4] as u8,
            ..self.clone()
        }
    }

    /// The vendor and device ID.
    pub fn id(&self) -> (u16, u16) {
        (self.header[0] as u16, (self.header[0] >> 16) as u16)
    }

    /// The I/O port ranges its BARs decode (passed through at these addresses).
    pub fn io_ports(&self) -> Vec<RangeInclusive<u16>> {
        (0..BARS)
            .filter(|&b| self.bar_masks[b] & BAR_IO != 0)
            .map(|b| {
                let base = self.header[BAR0 / 4 + b] & !0b11;
                let size = (!(self.bar_masks[b] & !0b11)).wrapping_add(1) & 0xFFFF;
                base as u16..=(base + size.max(1) - 1) as u16
            })
            .collect()
    }

    /// The IRQ its interrupt pin arrives on as the machine's firmware routed it (its interrupt
    /// line register), `None` if it has no interrupt pin.
    pub fn interrupt_line(&self) -> Option<u8> {
        let pin = (self.header[INTERRUPT / 4] >> 8) as u8;
        (pin != 0).then_some(self.header[INTERRUPT / 4] as u8)
    }

    /// Its interrupt pin (1 = INTA ... 4 = INTD; 0: none).
    pub fn interrupt_pin(&self) -> u8 {
        (self.header[INTERRUPT / 4] >> 8) as u8
    }

    /// The dword at `register` (a multiple of 4 below 256) as the guest sees it.
    fn dword(&self, register: usize) -> u32 {
        match register {
            COMMAND => (self.header[COMMAND / 4] & 0xFFFF_0000) | self.command as u32,
            r @ BAR0..0x28 => {
                let bar = (r - BAR0) / 4;
                if self.sizing & (1 << bar) != 0 {
                    self.bar_masks[bar]
                } else {
                    self.header[r / 4]
                }
            }
            INTERRUPT => (self.header[INTERRUPT / 4] & 0xFFFF_FF00) | self.interrupt_line as u32,
            r if r < 64 => self.header[r / 4],
            // No capabilities (the header's list pointer says where they would be): zeros.
            _ => 0,
        }
    }

    /// A read of `size` bytes at byte `register`.
    pub fn read(&self, register: u16, size: u8) -> u32 {
        let shifted = self.dword(register as usize & 0xFC) >> ((register & 3) * 8);
        match size {
            1 => shifted & 0xFF,
            2 => shifted & 0xFFFF,
            _ => shifted,
        }
    }

    /// A write of `size` bytes of `value` at byte `register`.
    pub fn write(&mut self, register: u16, size: u8, value: u32) {
        let register = register as usize;
        match register {
            COMMAND if size >= 2 => self.command = value as u16 & COMMAND_WRITABLE,
            r @ BAR0..0x28 if r % 4 == 0 && size == 4 => {
                let bit = 1 << ((r - BAR0) / 4);
                if value == u32::MAX {
                    self.sizing |= bit;
                } else {
                    self.sizing &= !bit;
                }
            }
            INTERRUPT => self.interrupt_line = value as u8,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bochs' RTL8029 at 00:02.0 as its BIOS leaves it: BAR0 I/O 0xc040 (32 bytes), INTA on
    /// IRQ 9, I/O decoding on.
    fn rtl8029() -> PassedFunction {
        let mut header = [0u32; 16];
        header[0] = 0x8029_10EC;
        header[1] = 0x0200_0001;
        header[2] = 0x0200_0000;
        header[4] = 0xC041;
        header[15] = 0x0000_0109;
        PassedFunction::new(2, 0, header, [0xFFFF_FFE1, 0, 0, 0, 0, 0]).unwrap()
    }

    #[test]
    fn the_guest_sees_the_machines_header_its_ports_and_its_interrupt() {
        let f = rtl8029();
        assert_eq!(f.id(), (0x10EC, 0x8029));
        assert_eq!(f.read(0x00, 4), 0x8029_10EC);
        assert_eq!(f.read(0x0A, 2), 0x0200, "class: ethernet");
        assert_eq!(f.io_ports(), [0xC040..=0xC05F]);
        assert_eq!(f.interrupt_line(), Some(9));
        assert_eq!(f.read(0x3D, 1), 1, "INTA");
        assert_eq!(f.read(0x40, 4), 0, "no capabilities");
    }

    #[test]
    fn bar_sizing_reads_the_mask_and_the_bar_stays_where_the_machine_put_it() {
        let mut f = rtl8029();
        f.write(0x10, 4, u32::MAX);
        assert_eq!(f.read(0x10, 4), 0xFFFF_FFE1, "32 bytes of I/O");
        f.write(0x10, 4, 0xC041);
        assert_eq!(f.read(0x10, 4), 0xC041);
        f.write(0x10, 4, 0xD001);
        assert_eq!(f.read(0x10, 4), 0xC041, "not moved: its ports pass through at 0xc040");
        f.write(0x14, 4, u32::MAX);
        assert_eq!(f.read(0x14, 4), 0, "no BAR 1");
    }

    #[test]
    fn command_and_interrupt_line_are_the_guests_the_rest_is_read_only() {
        let mut f = rtl8029();
        f.write(0x04, 2, 0xFFFF);
        assert_eq!(f.read(0x04, 4), 0x0200_0007, "decoding and bus mastering; status kept");
        f.write(0x3C, 1, 0x0B);
        assert_eq!(f.read(0x3C, 2), 0x010B);
        assert_eq!(f.interrupt_line(), Some(9), "the machine's routing is what counts");
        f.write(0x00, 4, 0);
        f.write(0x08, 4, 0);
        assert_eq!((f.read(0x00, 4), f.read(0x08, 4)), (0x8029_10EC, 0x0200_0000));
    }

    #[test]
    fn bridges_and_memory_bars_are_refused() {
        let mut bridge = [0u32; 16];
        bridge[3] = 0x0001_0000;
        assert_eq!(PassedFunction::new(1, 0, bridge, [0; 6]), Err(Unsupported::NotAnEndpoint { header_type: 1 }));
        assert_eq!(
            PassedFunction::new(3, 0, [0; 16], [0xFFFF_FFE1, 0xFFFF_F000, 0, 0, 0, 0]),
            Err(Unsupported::MemoryBar { bar: 1 })
        );
    }
}
