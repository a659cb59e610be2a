//! The hypervisor's 16550 UARTs: COM1 (its console) and COM2 (its control channel), written
//! polled, read by their receive interrupts into an [`InputQueue`].

extern crate alloc;

use alloc::collections::VecDeque;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;
use x86_64::instructions::port::Port;

pub const COM1: u16 = 0x3F8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u8 = 4;
pub const COM2: u16 = 0x2F8;
/// COM2's ISA IRQ.
pub const COM2_IRQ: u8 = 3;

pub struct Uart {
    base: u16,
}

const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_TRANSMITTER_EMPTY: u8 = 1 << 6;

impl Uart {
    pub const fn new(base: u16) -> Self {
        Self { base }
    }

    fn out(&self, offset: u16, value: u8) {
        // SAFETY: the UART's own register block; nothing else owns COM1 in root mode.
        unsafe { Port::new(self.base + offset).write(value) }
    }

    fn inb(&self, offset: u16) -> u8 {
        // SAFETY: as above.
        unsafe { Port::new(self.base + offset).read() }
    }

    /// Whether a UART answers at this address: its scratch register keeps what is written
    /// (an absent one reads all ones).
    pub fn is_present(&self) -> bool {
        [0x5A, 0xA5].iter().all(|&probe| {
            self.out(7, probe);
            self.inb(7) == probe
        })
    }

    /// 115200 8N1, FIFOs on, interrupts off.
    pub fn init(&self) {
        self.out(1, 0x00);
        self.out(3, 0x80);
        self.out(0, 0x01);
        self.out(1, 0x00);
        self.out(3, 0x03);
        self.out(2, 0xC7);
        self.out(4, 0x03);
    }

    pub fn write_byte(&self, byte: u8) {
        while self.inb(5) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        self.out(0, byte);
    }

    /// The transmit FIFO is empty (it takes 16 bytes now without waiting).
    pub fn transmitter_ready(&self) -> bool {
        self.inb(5) & LSR_THR_EMPTY != 0
    }

    /// Writes a byte without checking for room (after `transmitter_ready`).
    pub fn write_byte_now(&self, byte: u8) {
        self.out(0, byte);
    }

    /// Raises the interrupt line as soon as a byte arrives (IER receive-data; the FIFO's
    /// trigger level at 1 byte, so 15 more fit before an overrun however late the interrupt
    /// is taken; MCR OUT2 connects the line on PCs). DTR and RTS stay on.
    pub fn enable_receive_interrupt(&self) {
        self.out(2, 0x01);
        self.out(1, 0x01);
        self.out(4, 0x0B);
    }

    /// A received byte, if one is waiting.
    pub fn read_byte(&self) -> Option<u8> {
        (self.inb(5) & LSR_DATA_READY != 0).then(|| self.inb(0))
    }

    /// Waits until the last byte has left the shift register (before ending the machine,
    /// or the tail of the log is lost).
    pub fn flush(&self) {
        while self.inb(5) & LSR_TRANSMITTER_EMPTY == 0 {
            core::hint::spin_loop();
        }
    }
}

impl core::fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(b);
        }
        Ok(())
    }
}

/// Bytes a UART received, taken from it by its receive interrupt (`on_interrupt`) until
/// `read` hands them on. Both run on the one CPU its interrupt is routed to (the reader with
/// interrupts off), so the lock is never contended.
pub struct InputQueue {
    uart: Uart,
    bytes: Mutex<VecDeque<u8>>,
    received: AtomicU64,
    dropped: AtomicU64,
}

/// What arrives on COM2, the control channel (`control` reads it; the receive interrupt
/// fills it, in `interrupts` or as an exit).
pub static COM2_INPUT: InputQueue = InputQueue::new(COM2);

/// Received bytes held at most; beyond it they are dropped and counted (as a UART overruns).
const INPUT_LIMIT: usize = 64 * 1024;

impl InputQueue {
    pub const fn new(base: u16) -> Self {
        InputQueue {
            uart: Uart::new(base),
            bytes: Mutex::new(VecDeque::new()),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// The receive interrupt: everything the UART holds, into the queue. The UART is read
    /// without the transmitting side's lock (receiving and transmitting use different
    /// registers), so an interrupt that comes while this CPU prints cannot deadlock.
    pub fn on_interrupt(&self) {
        let Some(mut bytes) = self.bytes.try_lock() else { return };
        while let Some(byte) = self.uart.read_byte() {
            self.received.fetch_add(1, Ordering::Relaxed);
            if bytes.len() < INPUT_LIMIT {
                bytes.push_back(byte);
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Bytes received since the last call, into `out` (from the queue, or the UART itself
    /// when its interrupt is not on); never blocks.
    pub fn read(&self, out: &mut [u8]) -> usize {
        self.on_interrupt();
        let Some(mut bytes) = self.bytes.try_lock() else { return 0 };
        let n = out.len().min(bytes.len());
        for (slot, byte) in out.iter_mut().zip(bytes.drain(..n)) {
            *slot = byte;
        }
        n
    }

    /// Received bytes the reader could not take.
    pub fn count_dropped(&self, bytes: u64) {
        self.dropped.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes received so far, and how many of them were dropped.
    pub fn counts(&self) -> (u64, u64) {
        (self.received.load(Ordering::Relaxed), self.dropped.load(Ordering::Relaxed))
    }
}
