//! The serial console: human-readable `log` lines and machine-readable JSON records.
//!
//! Every record is one line, a JSON object whose `"type"` names it (docs/records.md lists
//! them). A line is written under one lock, so lines from different CPUs never interleave.
//!
//! While partitions run, output goes to a memory buffer that pCPUs drain into the UART only
//! when its FIFO has room (`pump`): a UART at 115200 baud takes ~87 us per byte, and waiting
//! for it would steal that time from whichever partition's slot it fell into.

extern crate alloc;

use crate::json::JsonObject;
use crate::serial::{InputQueue, Uart, COM1};
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

/// Bytes typed at the console (COM1), while a partition takes them (`phalanx.console`).
static INPUT: InputQueue = InputQueue::new(COM1);

/// Turns the UART's receive interrupt on (its IO-APIC entry is `host_irq`'s).
pub fn enable_input_interrupt() {
    lock().uart.enable_receive_interrupt();
}

/// The console's receive interrupt.
pub fn on_input() {
    INPUT.on_interrupt();
}

/// Bytes typed at the console since the last call, into `out`; never blocks.
pub fn read_input(out: &mut [u8]) -> usize {
    INPUT.read(out)
}

/// Typed bytes the console partition's UART could not take (its receive queue was full).
pub fn count_input_dropped(bytes: u64) {
    INPUT.count_dropped(bytes);
}

/// Bytes typed at the console so far, and how many of them were dropped.
pub fn input_counts() -> (u64, u64) {
    INPUT.counts()
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

/// The console, locked for one line.
pub struct ConsoleLine(MutexGuard<'static, Console>);

impl Write for ConsoleLine {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0.write_str(s)
    }
}

/// One JSON record line under construction, written under the console's lock (lines from
/// different CPUs never interleave); `emit` ends it.
pub type Record = JsonObject<ConsoleLine>;

impl JsonObject<ConsoleLine> {
    pub fn new(kind: &str) -> Self {
        let mut console = lock();
        console.begin_line();
        JsonObject::begin(ConsoleLine(console)).str("type", kind)
    }

    pub fn emit(self) {
        let mut line = self.end();
        let _ = line.write_str("\n");
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
