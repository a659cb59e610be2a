//! A partition's 16550A UART (COM1): what Linux's 8250 driver probes (scratch, IER, FIFO,
//! modem-control loopback), the transmit-holding-register-empty interrupt its transmit path
//! waits for, and a receiver fed from the host's console. The transmitter is infinitely fast:
//! every byte leaves at once. Received bytes wait in a queue deeper than the 16550's FIFO
//! (what the host typed is not dropped while the partition is off its pCPUs); the guest reads
//! them one by one from RBR, with the received-data interrupt while any is waiting.

extern crate alloc;

use alloc::collections::VecDeque;

const IER_RDA: u8 = 1 << 0;
const IER_THRE: u8 = 1 << 1;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const LSR_DATA_READY: u8 = 0x01;
const LSR_OVERRUN: u8 = 0x02;
/// Bytes the receive queue holds; beyond that the oldest are kept and an overrun is flagged.
pub const RECEIVE_QUEUE: usize = 4096;
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
    received: VecDeque<u8>,
    overrun: bool,
}

impl VirtualUart {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the UART's interrupt line is asserted.
    pub fn interrupt(&self) -> bool {
        self.data_ready_interrupt() || (self.thre_pending && self.ier & IER_THRE != 0)
    }

    fn data_ready_interrupt(&self) -> bool {
        !self.received.is_empty() && self.ier & IER_RDA != 0
    }

    /// A byte from the host's console for the guest to read; false if the queue was full (the
    /// byte is dropped and the guest sees an overrun).
    pub fn receive(&mut self, byte: u8) -> bool {
        if self.received.len() >= RECEIVE_QUEUE {
            self.overrun = true;
            return false;
        }
        // In loopback the receiver hears only the transmitter.
        if self.mcr & MCR_LOOPBACK == 0 {
            self.received.push_back(byte);
        }
        true
    }

    /// A read of register `offset` (0-7).
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => self.received.pop_front().unwrap_or(0),
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => {
                let fifo = if self.fifo_enabled { IIR_FIFO_ENABLED } else { 0 };
                // Received data outranks THRE; reading RBR, not IIR, clears it.
                if self.data_ready_interrupt() {
                    IIR_RDA | fifo
                } else if self.interrupt() {
                    self.thre_pending = false;
                    IIR_THRE | fifo
                } else {
                    IIR_NONE | fifo
                }
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                let overrun = if core::mem::take(&mut self.overrun) { LSR_OVERRUN } else { 0 };
                LSR_IDLE | overrun | if self.received.is_empty() { 0 } else { LSR_DATA_READY }
            }
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
                if self.mcr & MCR_LOOPBACK != 0 {
                    // Loopback: the byte comes back to the receiver, not out.
                    if self.received.len() < RECEIVE_QUEUE {
                        self.received.push_back(value);
                    }
                    return None;
                }
                return Some(value);
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
    fn received_bytes_are_read_in_order_with_data_ready_and_their_interrupt() {
        let mut u = VirtualUart::new();
        assert_eq!(u.read(5) & LSR_DATA_READY, 0);
        assert!(u.receive(b'l') && u.receive(b's'));
        assert_eq!(u.read(5) & LSR_DATA_READY, LSR_DATA_READY);
        assert!(!u.interrupt(), "not enabled");
        u.write(1, IER_RDA | IER_THRE);
        assert!(u.interrupt());
        assert_eq!(u.read(2) & 0x0F, IIR_RDA, "received data outranks THRE");
        assert_eq!(u.read(2) & 0x0F, IIR_RDA, "reading IIR does not clear it");
        assert_eq!((u.read(0), u.read(0)), (b'l', b's'));
        assert_eq!(u.read(5) & LSR_DATA_READY, 0);
        assert_eq!(u.read(2) & 0x0F, IIR_THRE, "then the THRE interrupt");
        assert_eq!(u.read(2) & 0x0F, IIR_NONE);
        // A full queue drops and flags an overrun, once.
        for _ in 0..RECEIVE_QUEUE {
            u.receive(b'x');
        }
        assert!(!u.receive(b'y'));
        assert_eq!(u.read(5) & LSR_OVERRUN, LSR_OVERRUN);
        assert_eq!(u.read(5) & LSR_OVERRUN, 0);
    }

    #[test]
    fn loopback_turns_transmitted_bytes_into_received_ones() {
        let mut u = VirtualUart::new();
        u.write(4, MCR_LOOPBACK);
        assert_eq!(u.write(0, 0x5A), None, "nothing leaves in loopback");
        assert!(u.receive(b'h'), "the host's input is not heard in loopback");
        assert_eq!((u.read(0), u.read(5) & LSR_DATA_READY), (0x5A, 0));
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
