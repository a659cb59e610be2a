//! The serial console: human-readable `log` lines and machine-readable JSON records.
//!
//! Every record is one line, a JSON object whose `"type"` names it (docs/records.md lists
//! them). A line is written under one lock, so lines from different CPUs never interleave.
//!
//! While partitions run, output goes to a memory buffer that pCPUs drain into the UART only
//! when its FIFO has room (`pump`): a UART at 115200 baud takes ~87 us per byte, and waiting
//! for it would steal that time from whichever partition's slot it fell into.

extern crate alloc;

use crate::serial::{Uart, COM1};
use alloc::collections::VecDeque;
use core::fmt::Write;
use spin::{Mutex, MutexGuard};

/// Most bytes held while buffered; beyond it bytes are dropped and counted.
const BUFFER_LIMIT: usize = 256 * 1024;
/// Bytes the 16550's transmit FIFO takes when it reports empty.
const UART_FIFO: usize = 16;

pub struct Console {
    uart: Uart,
    buffer: Option<VecDeque<u8>>,
    dropped: u64,
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        match &mut self.buffer {
            None => self.uart.write_str(s),
            Some(buffer) => {
                for b in s.bytes() {
                    if buffer.len() >= BUFFER_LIMIT {
                        self.dropped += 1;
                    } else {
                        if b == b'\n' {
                            buffer.push_back(b'\r');
                        }
                        buffer.push_back(b);
                    }
                }
                Ok(())
            }
        }
    }
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { uart: Uart::new(COM1), buffer: None, dropped: 0 });

pub fn init() {
    CONSOLE.lock().uart.init();
    log::set_logger(&LOGGER).ok();
    log::set_max_level(log::LevelFilter::Info);
}

/// From now on output is buffered and drained by `pump` (needs the heap).
pub fn start_buffering() {
    lock().buffer = Some(VecDeque::with_capacity(16 * 1024));
}

/// Writes what the UART can take without waiting; never blocks (another CPU pumping or
/// printing just means this call does nothing). True while buffered bytes remain.
pub fn pump() -> bool {
    let Some(mut console) = CONSOLE.try_lock() else { return true };
    let Console { uart, buffer, .. } = &mut *console;
    let Some(buffer) = buffer else { return false };
    if !buffer.is_empty() && uart.transmitter_ready() {
        for _ in 0..UART_FIFO.min(buffer.len()) {
            uart.write_byte_now(buffer.pop_front().unwrap_or(b'?'));
        }
    }
    !buffer.is_empty()
}

/// Drains the buffer synchronously and returns to direct output (end of a run).
pub fn stop_buffering() {
    let mut console = lock();
    if let Some(buffer) = console.buffer.take() {
        for b in buffer {
            console.uart.write_byte(b);
        }
    }
    let dropped = console.dropped;
    drop(console);
    if dropped > 0 {
        log::warn!("{dropped} console bytes were dropped while the output buffer was full");
    }
}

/// Takes the console; a CPU that faulted while holding it must still be able to report, so
/// after a bounded wait the lock is broken.
fn lock() -> MutexGuard<'static, Console> {
    for _ in 0..10_000_000 {
        if let Some(guard) = CONSOLE.try_lock() {
            return guard;
        }
        core::hint::spin_loop();
    }
    // SAFETY: only reached when the holder is stuck (e.g. faulted mid-line); a garbled line
    // beats a silent hang.
    unsafe { CONSOLE.force_unlock() };
    CONSOLE.lock()
}

pub fn flush() {
    stop_buffering();
    lock().uart.flush();
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        let mut uart = lock();
        let _ = writeln!(uart, "[cpu{} {:5}] {}", crate::cpu::current_index(), record.level(), record.args());
    }

    fn flush(&self) {}
}

/// One JSON record line under construction; emitted by [`Record::emit`].
pub struct Record {
    uart: MutexGuard<'static, Console>,
}

impl Record {
    pub fn new(kind: &str) -> Self {
        let mut uart = lock();
        let _ = write!(uart, "{{\"type\":");
        write_json_str(&mut *uart, kind);
        Self { uart }
    }

    fn key(&mut self, key: &str) {
        let _ = write!(self.uart, ",");
        write_json_str(&mut *self.uart, key);
        let _ = write!(self.uart, ":");
    }

    pub fn u64(mut self, key: &str, value: u64) -> Self {
        self.key(key);
        let _ = write!(self.uart, "{value}");
        self
    }

    pub fn bool(mut self, key: &str, value: bool) -> Self {
        self.key(key);
        let _ = write!(self.uart, "{value}");
        self
    }

    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        write_json_str(&mut *self.uart, value);
        self
    }

    /// A string value produced by formatting (escaped like any string).
    pub fn fmt(mut self, key: &str, value: core::fmt::Arguments) -> Self {
        self.key(key);
        let _ = write!(self.uart, "\"");
        let _ = JsonEscaper(&mut *self.uart).write_fmt(value);
        let _ = write!(self.uart, "\"");
        self
    }

    /// `"key":[v0,v1,...]`
    pub fn u64_list(mut self, key: &str, values: impl IntoIterator<Item = u64>) -> Self {
        self.key(key);
        let _ = write!(self.uart, "[");
        for (i, v) in values.into_iter().enumerate() {
            let _ = write!(self.uart, "{}{v}", if i == 0 { "" } else { "," });
        }
        let _ = write!(self.uart, "]");
        self
    }

    /// `"key":["a","b",...]`
    pub fn str_list<'a>(mut self, key: &str, values: impl IntoIterator<Item = &'a str>) -> Self {
        self.key(key);
        let _ = write!(self.uart, "[");
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                let _ = write!(self.uart, ",");
            }
            write_json_str(&mut *self.uart, v);
        }
        let _ = write!(self.uart, "]");
        self
    }

    pub fn emit(mut self) {
        let _ = write!(self.uart, "}}\n");
    }
}

fn write_json_str(out: &mut Console, s: &str) {
    let _ = out.write_str("\"");
    let _ = JsonEscaper(out).write_str(s);
    let _ = out.write_str("\"");
}

struct JsonEscaper<'a>(&'a mut Console);

impl Write for JsonEscaper<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if (c as u32) < 0x20 => write!(self.0, "\\u{:04x}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

pub fn panic_report(info: &core::panic::PanicInfo) {
    let cpu = crate::cpu::current_index();
    {
        let mut uart = lock();
        let _ = writeln!(uart, "[cpu{cpu} PANIC] {info}");
    }
    let record = Record::new("panic").u64("cpu", cpu as u64).fmt("message", format_args!("{}", info.message()));
    match info.location() {
        Some(l) => record.str("file", l.file()).u64("line", l.line() as u64).emit(),
        None => record.emit(),
    }
    flush();
}
