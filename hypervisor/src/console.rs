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
use core::sync::atomic::{AtomicU64, Ordering};
use spin::{Mutex, MutexGuard};

/// Most bytes held while buffered; beyond it bytes are dropped and counted.
const BUFFER_LIMIT: usize = 256 * 1024;
/// Bytes the 16550's transmit FIFO takes when it reports empty.
const UART_FIFO: usize = 16;

pub struct Console {
    uart: Uart,
    buffer: Option<VecDeque<u8>>,
    dropped: u64,
    /// A partition's raw output (`write_raw`) left a line unfinished: the next line of the
    /// hypervisor's own starts on a fresh one, so records are never spliced into guest text.
    mid_line: bool,
}

impl Console {
    /// Bytes out (buffered while partitions run), each LF preceded by a CR.
    fn push_bytes(&mut self, bytes: &[u8]) {
        match &mut self.buffer {
            None => {
                for &b in bytes {
                    if b == b'\n' {
                        self.uart.write_byte(b'\r');
                    }
                    self.uart.write_byte(b);
                }
            }
            Some(buffer) => {
                for &b in bytes {
                    if buffer.len() >= BUFFER_LIMIT {
                        self.dropped += 1;
                    } else {
                        if b == b'\n' {
                            buffer.push_back(b'\r');
                        }
                        buffer.push_back(b);
                    }
                }
            }
        }
    }

    fn begin_line(&mut self) {
        if core::mem::take(&mut self.mid_line) {
            self.push_bytes(b"\n");
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push_bytes(s.as_bytes());
        Ok(())
    }
}

static CONSOLE: Mutex<Console> =
    Mutex::new(Console { uart: Uart::new(COM1), buffer: None, dropped: 0, mid_line: false });

/// A partition's output as it wrote it, unprefixed and not held to whole lines: the console
/// partition (`phalanx.console`) shows on the terminal as it would on its own serial port,
/// prompts included.
pub fn write_raw(bytes: &[u8]) {
    let Some(&last) = bytes.last() else { return };
    let mut console = lock();
    // A lone CR would only make the log hard to read; LF gets its CR back on the way out.
    for run in bytes.split(|&b| b == b'\r') {
        console.push_bytes(run);
    }
    console.mid_line = last != b'\n';
}

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

/// Bytes typed at the console, taken from the UART by its receive interrupt (`on_input`)
/// until `read_input` hands them on. Both run on the BSP: the interrupt comes there, and the
/// reader runs with interrupts off, so the lock is never contended.
static INPUT: Mutex<VecDeque<u8>> = Mutex::new(VecDeque::new());
/// Typed bytes held at most; beyond it they are dropped and counted (as a UART overruns).
const INPUT_LIMIT: usize = 64 * 1024;
static INPUT_DROPPED: AtomicU64 = AtomicU64::new(0);
static INPUT_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Turns the UART's receive interrupt on (its IO-APIC entry is `host_irq`'s).
pub fn enable_input_interrupt() {
    lock().uart.enable_receive_interrupt();
}

/// The receive interrupt: everything the UART holds, into the input queue. The UART is read
/// without the console's lock (receiving and transmitting use different registers), so an
/// interrupt that comes while this CPU prints cannot deadlock.
pub fn on_input() {
    let uart = Uart::new(COM1);
    let Some(mut input) = INPUT.try_lock() else { return };
    while let Some(byte) = uart.read_byte() {
        INPUT_RECEIVED.fetch_add(1, Ordering::Relaxed);
        if input.len() < INPUT_LIMIT {
            input.push_back(byte);
        } else {
            INPUT_DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Bytes typed at the console since the last call, into `out` (from the input queue, or the
/// UART itself when its interrupt is not on); never blocks.
pub fn read_input(out: &mut [u8]) -> usize {
    on_input();
    let Some(mut input) = INPUT.try_lock() else { return 0 };
    let n = out.len().min(input.len());
    for (slot, byte) in out.iter_mut().zip(input.drain(..n)) {
        *slot = byte;
    }
    n
}

/// Typed bytes the console partition's UART could not take (its receive queue was full).
pub fn count_input_dropped(bytes: u64) {
    INPUT_DROPPED.fetch_add(bytes, Ordering::Relaxed);
}

/// Bytes typed at the console so far, and how many of them were dropped.
pub fn input_counts() -> (u64, u64) {
    (INPUT_RECEIVED.load(Ordering::Relaxed), INPUT_DROPPED.load(Ordering::Relaxed))
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
        uart.begin_line();
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
        uart.begin_line();
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
