//! COM1 16550 UART, polled both ways.

use x86_64::instructions::port::Port;

pub const COM1: u16 = 0x3F8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u8 = 4;

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
