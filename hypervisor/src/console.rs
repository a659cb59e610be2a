//! The serial console: human-readable `log` lines and machine-readable JSON records.
//!
//! Every record is one line, a JSON object whose `"type"` names it (docs/records.md lists
//! them). A line is written under one lock, so lines from different CPUs never interleave.

use crate::serial::{Uart, COM1};
use core::fmt::Write;
use spin::{Mutex, MutexGuard};

static CONSOLE: Mutex<Uart> = Mutex::new(Uart::new(COM1));

pub fn init() {
    CONSOLE.lock().init();
    log::set_logger(&LOGGER).ok();
    log::set_max_level(log::LevelFilter::Info);
}

/// Takes the console; a CPU that faulted while holding it must still be able to report, so
/// after a bounded wait the lock is broken.
fn lock() -> MutexGuard<'static, Uart> {
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
    lock().flush();
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
    uart: MutexGuard<'static, Uart>,
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
        let _ = write!(self.uart, "}}\r\n");
    }
}

fn write_json_str(out: &mut Uart, s: &str) {
    let _ = out.write_str("\"");
    let _ = JsonEscaper(out).write_str(s);
    let _ = out.write_str("\"");
}

struct JsonEscaper<'a>(&'a mut Uart);

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
