//! A partition's 16550A UART (COM1), transmit side: what Linux's 8250 driver probes (scratch,
//! IER, FIFO, modem-control loopback) and the transmit-holding-register-empty interrupt its
//! transmit path waits for. The transmitter is infinitely fast: every byte leaves at once.

const IER_THRE: u8 = 1 << 1;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_FIFO_ENABLED: u8 = 0xC0;
const LCR_DLAB: u8 = 0x80;
const LSR_IDLE: u8 = 0x60;
const MCR_LOOPBACK: u8 = 0x10;
/// DCD, DSR, CTS: a terminal is attached and ready.
const MSR_READY: u8 = 0xB0;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirtualUart {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    /// The THRE interrupt condition (set when the THR empties, cleared by reading IIR or
    /// writing THR).
    thre_pending: bool,
}

impl VirtualUart {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the UART's interrupt line is asserted.
    pub fn interrupt(&self) -> bool {
        self.thre_pending && self.ier & IER_THRE != 0
    }

    /// A read of register `offset` (0-7).
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => 0, // no received data
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => {
                let fifo = if self.fifo_enabled { IIR_FIFO_ENABLED } else { 0 };
                if self.interrupt() {
                    self.thre_pending = false;
                    IIR_THRE | fifo
                } else {
                    IIR_NONE | fifo
                }
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_IDLE,
            6 if self.mcr & MCR_LOOPBACK != 0 => {
                // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                let m = self.mcr;
                ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            }
            6 => MSR_READY,
            _ => self.scr,
        }
    }

    /// A write of register `offset`; returns the byte transmitted, if any.
    pub fn write(&mut self, offset: u16, value: u8) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = value,
            0 => {
                // Sent at once: the holding register is empty again right away.
                self.thre_pending = true;
                return (self.mcr & MCR_LOOPBACK == 0).then_some(value);
            }
            1 if dlab => self.dlm = value,
            1 => {
                let enabling = value & IER_THRE != 0 && self.ier & IER_THRE == 0;
                self.ier = value & 0x0F;
                if enabling {
                    // The THR is empty: enabling its interrupt raises it.
                    self.thre_pending = true;
                }
            }
            2 => self.fifo_enabled = value & 1 != 0,
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1F,
            7 => self.scr = value,
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_8250_probe_sees_a_16550a() {
        let mut u = VirtualUart::new();
        u.write(7, 0xA5);
        assert_eq!(u.read(7), 0xA5, "scratch register");
        u.write(1, 0);
        assert_eq!(u.read(1), 0);
        u.write(1, 0x0F);
        assert_eq!(u.read(1), 0x0F, "IER holds its bits");
        u.write(1, 0);
        u.write(2, 0x01);
        assert_eq!(u.read(2) & 0xC0, 0xC0, "FIFO enabled: a 16550A");
        u.write(4, MCR_LOOPBACK | 0x0A);
        assert_eq!(u.read(6) & 0xF0, 0x90, "loopback maps OUT2->DCD, RTS->CTS");
        u.write(3, LCR_DLAB);
        u.write(0, 0x01);
        u.write(1, 0x00);
        assert_eq!((u.read(0), u.read(1)), (1, 0), "divisor latch");
    }

    #[test]
    fn thre_interrupt_follows_ier_writes_and_iir_reads() {
        let mut u = VirtualUart::new();
        assert!(!u.interrupt());
        u.write(1, IER_THRE);
        assert!(u.interrupt(), "enabling THRE with an empty THR raises it");
        assert_eq!(u.read(2) & 0x0F, IIR_THRE);
        assert!(!u.interrupt(), "reading IIR clears it");
        assert_eq!(u.write(0, b'x'), Some(b'x'));
        assert!(u.interrupt(), "the byte left: THR empty again");
        u.write(1, 0);
        assert!(!u.interrupt(), "masked by IER");
    }
}
