//! The PC platform devices every partition has besides its UART, IO-APIC and LAPICs: what a
//! distribution's kernel probes at boot, each emulated well enough that the kernel neither
//! hangs nor faults on it, or absent in a way it accepts.
//!
//! - the 8259 pair (ports 0x20/0x21, 0xA0/0xA1, ELCR 0x4D0/0x4D1): present and masked. It
//!   takes its initialisation words and keeps its mask; it never raises an interrupt (the
//!   partition's interrupts go through its IO-APIC).
//! - the RTC/CMOS (0x70/0x71): the time of day from the host's RTC read at boot plus the TSC
//!   since, in the format register B asks for; the other bytes are plain CMOS RAM. No
//!   periodic or alarm interrupt; time writes are not kept (the guest's clock is the host's).
//! - PCI configuration mechanism #1 (0xCF8 address, 0xCFC-0xCFF data): a host bridge at
//!   00:00.0, and the functions passed through to the partition (`crate::pci`) at their own
//!   addresses; nothing else.
//! - the ACPI fixed hardware the partition's FADT describes (`firmware::acpi`): PM1a status,
//!   enable and control, the PM timer, and the reset register (0xCF9).
//! - the keyboard controller's reset line (0xFE to port 0x64); the controller itself is absent
//!   (the FADT says so), as are the PIT and port 0x61: Linux calibrates from CPUID 0x15/0x16
//!   and, with ARAT, runs its clock events on the LAPIC timer.
//!
//! Reset requests (0xCF9, the FADT reset register, 0x64) and S5 (SLP_EN with `_S5`'s type)
//! come back as a [`PowerRequest`] for the hypervisor to act on.

extern crate alloc;

use crate::pci::PassedFunction;
use firmware::acpi::{
    PM1A_CONTROL_PORT, PM1A_EVENT_PORT, PM1_SCI_EN, PM1_SLP_EN, PM1_SLP_TYP_SHIFT, PM_BASE, PM_END, PM_TIMER_HZ,
    PM_TIMER_PORT, RESET_PORT, RTC_CENTURY_INDEX, S5_SLEEP_TYPE,
};

/// What the guest asked of the platform's power and reset hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    /// A system reset, through the named mechanism.
    Reset { via: &'static str },
    /// ACPI S5 (soft off).
    PowerOff,
}

/// The partition's time of day: Unix seconds at TSC 0, and the TSC rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    pub unix_seconds_at_tsc_zero: u64,
    pub tsc_hz: u64,
}

impl WallClock {
    fn unix_seconds(&self, tsc: u64) -> u64 {
        self.unix_seconds_at_tsc_zero + tsc / self.tsc_hz.max(1)
    }
}

const KBD_COMMAND_PORT: u16 = 0x64;
const KBD_PULSE_RESET: u8 = 0xFE;
const RESET_CPU: u8 = 1 << 2;
const PCI_ADDRESS_PORT: u16 = 0xCF8;
const PCI_DATA_PORT: u16 = 0xCFC;
const PCI_ENABLE: u32 = 1 << 31;
/// The host bridge's configuration header: an i440FX (vendor 8086, device 1237), class 06/00.
const HOST_BRIDGE_ID: u32 = 0x1237_8086;
const HOST_BRIDGE_CLASS_REV: u32 = 0x0600_0002;

// RTC register B bits and status values.
const RTC_B_24H: u8 = 1 << 1;
const RTC_B_BINARY: u8 = 1 << 2;
const RTC_A_DEFAULT: u8 = 0x26; // 32.768 kHz time base, 1024 Hz rate, update not in progress
const RTC_D_VALID: u8 = 0x80; // battery good

/// One 8259: its mask, and where it is in an initialisation sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pic {
    mask: u8,
    /// Initialisation words still expected after ICW1 (ICW2, ICW3, ICW4 if asked for).
    init_words_left: u8,
    icw4_needed: bool,
    read_isr: bool,
}

impl Pic {
    const fn new() -> Self {
        Pic { mask: 0xFF, init_words_left: 0, icw4_needed: false, read_isr: false }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1: the mask clears and ICW2-3 (and ICW4) follow on the data port.
            *self = Pic { mask: 0, init_words_left: 2, icw4_needed: value & 1 != 0, read_isr: false };
        } else if value & 0x18 == 0x08 {
            // OCW3: which of IRR/ISR a command-port read returns.
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
        }
        // OCW2 (EOIs, priorities): nothing is ever in service.
    }

    fn write_data(&mut self, value: u8) {
        if self.init_words_left > 0 {
            self.init_words_left -= 1;
            if self.init_words_left == 0 && self.icw4_needed {
                self.icw4_needed = false;
                self.init_words_left = 1;
            }
        } else {
            self.mask = value;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformDevices {
    clock: WallClock,
    pics: [Pic; 2],
    elcr: [u8; 2],
    cmos_index: u8,
    cmos: [u8; 128],
    pci_address: u32,
    reset_control: u8,
    pm1_status: u16,
    pm1_enable: u16,
    pm1_control: u16,
    /// PCI functions passed through, at their own bus-0 addresses.
    functions: alloc::vec::Vec<PassedFunction>,
}

impl PlatformDevices {
    pub fn new(clock: WallClock) -> Self {
        let mut cmos = [0u8; 128];
        cmos[0x0A] = RTC_A_DEFAULT;
        cmos[0x0B] = RTC_B_24H; // BCD, 24-hour: what a PC BIOS leaves
        cmos[0x0D] = RTC_D_VALID;
        PlatformDevices {
            clock,
            pics: [Pic::new(); 2],
            elcr: [0; 2],
            cmos_index: 0,
            cmos,
            pci_address: 0,
            reset_control: 0,
            pm1_status: 0,
            pm1_enable: 0,
            pm1_control: PM1_SCI_EN,
            functions: alloc::vec::Vec::new(),
        }
    }

    /// Shows `function` in the partition's PCI configuration space.
    pub fn pass_through(&mut self, function: PassedFunction) {
        self.functions.retain(|f| (f.device, f.function) != (function.device, function.function));
        self.functions.push(function);
    }

    /// The platform after a reset: power-on state, the same clock and passed-through
    /// functions (their registers as the machine has them again).
    pub fn after_reset(&self) -> Self {
        let functions = self.functions.iter().map(PassedFunction::at_reset).collect();
        PlatformDevices { functions, ..PlatformDevices::new(self.clock) }
    }

    pub fn clock(&self) -> WallClock {
        self.clock
    }

    /// Whether `port` is one of the platform's (for an access of any size starting there).
    pub fn claims(port: u16) -> bool {
        matches!(port, 0x20 | 0x21 | 0xA0 | 0xA1 | 0x4D0 | 0x4D1 | KBD_COMMAND_PORT | 0x70 | 0x71)
            || (PCI_ADDRESS_PORT..PCI_DATA_PORT + 4).contains(&port)
            || (PM_BASE..PM_END).contains(&port)
    }

    /// An IN of `size` bytes from `port` at TSC `now`; `None` for a port that is not the
    /// platform's.
    pub fn read(&mut self, port: u16, size: u8, now: u64) -> Option<u32> {
        if !Self::claims(port) {
            return None;
        }
        let size = size.clamp(1, 4); // an exit never reports more; a decoding error might
        Some(match port {
            0x20 | 0xA0 => 0, // IRR or ISR: nothing pending, nothing in service
            0x21 => self.pics[0].mask as u32,
            0xA1 => self.pics[1].mask as u32,
            0x4D0 | 0x4D1 => self.elcr[(port - 0x4D0) as usize] as u32,
            KBD_COMMAND_PORT => 0xFF, // no 8042: reads float
            0x70 => 0xFF,             // the index register is write-only
            0x71 => self.cmos_read(now) as u32,
            PCI_ADDRESS_PORT if size == 4 => self.pci_address,
            RESET_PORT if size == 1 => self.reset_control as u32,
            PCI_DATA_PORT..=0xCFF => self.pci_config_read(port - PCI_DATA_PORT, size),
            PCI_ADDRESS_PORT..=0xCFB => 0xFFFF_FFFF,
            _ => self.pm_read(port, size, now),
        })
    }

    /// An OUT of `size` bytes of `value` to `port`: `None` for a port that is not the
    /// platform's, else the power request it makes, if any.
    pub fn write(&mut self, port: u16, size: u8, value: u32) -> Option<Option<PowerRequest>> {
        if !Self::claims(port) {
            return None;
        }
        let size = size.clamp(1, 4);
        let byte = value as u8;
        let mut request = None;
        match port {
            0x20 | 0xA0 => self.pics[(port == 0xA0) as usize].write_command(byte),
            0x21 | 0xA1 => self.pics[(port == 0xA1) as usize].write_data(byte),
            0x4D0 | 0x4D1 => self.elcr[(port - 0x4D0) as usize] = byte,
            KBD_COMMAND_PORT if byte == KBD_PULSE_RESET => {
                request = Some(PowerRequest::Reset { via: "keyboard controller" })
            }
            KBD_COMMAND_PORT => {}
            0x70 => self.cmos_index = byte & 0x7F, // bit 7 masks NMIs: there are none
            0x71 => self.cmos_write(byte),
            PCI_ADDRESS_PORT if size == 4 => self.pci_address = value,
            RESET_PORT if size == 1 => {
                // The reset happens on a write with RST_CPU set (the FADT's value, 0x06).
                if byte & RESET_CPU != 0 {
                    request = Some(PowerRequest::Reset { via: "reset control (0xcf9)" });
                }
                self.reset_control = byte & !RESET_CPU;
            }
            PCI_DATA_PORT..=0xCFF => {
                let offset = port - PCI_DATA_PORT;
                if let Some((function, register)) = self.addressed_function() {
                    self.functions[function].write(register + offset, size, value);
                }
                // Otherwise the host bridge (which keeps its header) or no function.
            }
            PCI_ADDRESS_PORT..=0xCFB => {}
            _ => request = self.pm_write(port, size, value),
        }
        Some(request)
    }

    fn cmos_read(&self, now: u64) -> u8 {
        let index = self.cmos_index;
        let b = self.cmos[0x0B];
        let encode = |v: u8| if b & RTC_B_BINARY != 0 { v } else { ((v / 10) << 4) | (v % 10) };
        let seconds = self.clock.unix_seconds(now);
        let (year, month, day) = civil_from_days(seconds / 86_400);
        let in_day = seconds % 86_400;
        let (hour, minute, second) = ((in_day / 3600) as u8, (in_day / 60 % 60) as u8, (in_day % 60) as u8);
        match index {
            0x00 => encode(second),
            0x02 => encode(minute),
            0x04 if b & RTC_B_24H != 0 => encode(hour),
            // 12-hour mode: 1-12, bit 7 for PM.
            0x04 => encode(((hour + 11) % 12) + 1) | if hour >= 12 { 0x80 } else { 0 },
            0x06 => encode(((seconds / 86_400 + 4) % 7 + 1) as u8), // 1970-01-01 was a Thursday (5)
            0x07 => encode(day),
            0x08 => encode(month),
            0x09 => encode((year % 100) as u8),
            RTC_CENTURY_INDEX => encode((year / 100) as u8),
            0x0C => 0, // no interrupt flags
            _ => self.cmos[index as usize],
        }
    }

    fn cmos_write(&mut self, value: u8) {
        match self.cmos_index {
            // The time is the host's; status C and D are read-only.
            0x00..=0x09 | 0x0C | 0x0D | RTC_CENTURY_INDEX => {}
            // Register A: the update-in-progress bit is read-only (never set).
            0x0A => self.cmos[0x0A] = value & 0x7F,
            index => self.cmos[index as usize] = value,
        }
    }

    /// The passed-through function the address register selects (its index) and the
    /// register's byte offset, if it selects one.
    fn addressed_function(&self) -> Option<(usize, u16)> {
        let address = self.pci_address;
        let (bus, device, function) = ((address >> 16) as u8, (address >> 11) as u8 & 0x1F, (address >> 8) as u8 & 7);
        if address & PCI_ENABLE == 0 || bus != 0 {
            return None;
        }
        let index = self.functions.iter().position(|f| (f.device, f.function) == (device, function))?;
        Some((index, (address & 0xFC) as u16))
    }

    /// Reads `size` bytes at `offset` (0-3) of the data window.
    fn pci_config_read(&self, offset: u16, size: u8) -> u32 {
        if let Some((function, register)) = self.addressed_function() {
            return self.functions[function].read(register + offset, size);
        }
        let address = self.pci_address;
        let bdf = (address >> 8) & 0xFFFF;
        if address & PCI_ENABLE == 0 || bdf != 0 {
            return 0xFFFF_FFFF; // no such function
        }
        let register = (address & 0xFC) as u16 + offset;
        let dword = match register & !3 {
            0x00 => HOST_BRIDGE_ID,
            0x04 => 0x0000_0006, // memory and I/O decoding on (as firmware leaves a host bridge)
            0x08 => HOST_BRIDGE_CLASS_REV,
            _ => 0, // header type 0, single function, no BARs or capabilities
        };
        let shifted = dword >> ((register & 3) * 8);
        match size {
            1 => shifted & 0xFF,
            2 => shifted & 0xFFFF,
            _ => shifted,
        }
    }

    /// The PM registers as one little-endian block, so accesses of any size at any offset see
    /// the bytes they cover.
    fn pm_block(&self, now: u64) -> [u8; (PM_END - PM_BASE) as usize] {
        let mut block = [0u8; (PM_END - PM_BASE) as usize];
        let at = |port: u16| (port - PM_BASE) as usize;
        block[at(PM1A_EVENT_PORT)..][..2].copy_from_slice(&self.pm1_status.to_le_bytes());
        block[at(PM1A_EVENT_PORT) + 2..][..2].copy_from_slice(&self.pm1_enable.to_le_bytes());
        block[at(PM1A_CONTROL_PORT)..][..2].copy_from_slice(&self.pm1_control.to_le_bytes());
        block[at(PM_TIMER_PORT)..][..4].copy_from_slice(&pm_timer(now, self.clock.tsc_hz).to_le_bytes());
        block
    }

    fn pm_read(&self, port: u16, size: u8, now: u64) -> u32 {
        let block = self.pm_block(now);
        let start = (port - PM_BASE) as usize;
        (0..size as usize).rev().fold(0u32, |acc, i| acc << 8 | block.get(start + i).copied().unwrap_or(0xFF) as u32)
    }

    fn pm_write(&mut self, port: u16, size: u8, value: u32) -> Option<PowerRequest> {
        let mut request = None;
        for i in 0..size as u16 {
            let (reg_port, byte) = (port + i, (value >> (8 * i)) as u8);
            let shift = 8 * ((reg_port - PM_BASE) % 2);
            match reg_port {
                // Status bits clear where 1 is written (none is ever set: no fixed events).
                p if p < PM1A_EVENT_PORT + 2 => self.pm1_status &= !((byte as u16) << shift),
                p if p < PM1A_CONTROL_PORT => {
                    self.pm1_enable = (self.pm1_enable & !(0xFF << shift)) | (byte as u16) << shift
                }
                p if p < PM1A_CONTROL_PORT + 2 => {
                    let control = (self.pm1_control & !(0xFF << shift)) | (byte as u16) << shift;
                    let sleep_type = (control >> PM1_SLP_TYP_SHIFT) & 0b111;
                    if control & PM1_SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                        request = Some(PowerRequest::PowerOff);
                    }
                    // SLP_EN is write-only; SCI_EN stays set (there is no legacy mode).
                    self.pm1_control = (control & !PM1_SLP_EN) | PM1_SCI_EN;
                }
                _ => {} // the PM timer is read-only
            }
        }
        request
    }
}

/// The 32-bit PM timer at TSC `now`: 3.579545 MHz from TSC 0.
fn pm_timer(now: u64, tsc_hz: u64) -> u32 {
    (now as u128 * PM_TIMER_HZ as u128 / tsc_hz.max(1) as u128) as u32
}

/// The proleptic Gregorian date of day `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
pub fn civil_from_days(days: u64) -> (u64, u8, u8) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = year_of_era + era * 400 + (month <= 2) as u64;
    (year, month, day)
}

/// Days since 1970-01-01 of a Gregorian date (the inverse of [`civil_from_days`]).
pub fn days_from_civil(year: u64, month: u8, day: u8) -> u64 {
    let year = year - (month <= 2) as u64;
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month = month as u64;
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day as u64 - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The host RTC's registers as read at boot (seconds, minutes, hours, day, month, year,
/// century, status B) as Unix seconds: `None` when they do not make a date.
pub fn rtc_to_unix_seconds(registers: [u8; 8]) -> Option<u64> {
    let [s, m, h, d, mo, y, c, b] = registers;
    let decode =
        |v: u8| if b & RTC_B_BINARY != 0 { Some(v) } else { (v & 0xF < 10).then_some((v >> 4) * 10 + (v & 0xF)) };
    let pm = b & RTC_B_24H == 0 && h & 0x80 != 0;
    let hour = decode(h & 0x7F)? % if b & RTC_B_24H == 0 { 12 } else { 24 } + if pm { 12 } else { 0 };
    let (second, minute, day, month) = (decode(s)?, decode(m)?, decode(d)?, decode(mo)?);
    let century = match decode(c) {
        Some(c @ 19..=29) => c as u64,
        _ => 20,
    };
    let year = century * 100 + decode(y)? as u64;
    if second > 59 || minute > 59 || hour > 23 || !(1..=31).contains(&day) || !(1..=12).contains(&month) || year < 1970
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour as u64 * 3600 + minute as u64 * 60 + second as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HZ: u64 = 10_000_000;
    /// 2026-12-02 03:25:27 UTC.
    const WHEN: u64 = 1_796_181_927;

    fn platform() -> PlatformDevices {
        PlatformDevices::new(WallClock { unix_seconds_at_tsc_zero: WHEN, tsc_hz: HZ })
    }

    fn cmos(p: &mut PlatformDevices, index: u8, now: u64) -> u8 {
        p.write(0x70, 1, index as u32);
        p.read(0x71, 1, now).unwrap() as u8
    }

    #[test]
    fn dates_convert_both_ways() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(WHEN / 86_400), (2026, 12, 2));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        for days in (0..80_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn the_rtc_tells_the_hosts_time_plus_the_tsc_in_bcd_or_binary() {
        let mut p = platform();
        let now = 65 * HZ; // 65 s after boot: 03:26:32
        assert_eq!(
            [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, RTC_CENTURY_INDEX].map(|i| cmos(&mut p, i, now)),
            [0x32, 0x26, 0x03, 0x02, 0x12, 0x26, 0x20]
        );
        assert_eq!(cmos(&mut p, 0x06, now), 4, "a Wednesday");
        assert_eq!(cmos(&mut p, 0x0A, now) & 0x80, 0, "never update-in-progress");
        assert_eq!(cmos(&mut p, 0x0D, now), RTC_D_VALID);
        p.write(0x70, 1, 0x0B);
        p.write(0x71, 1, (RTC_B_24H | RTC_B_BINARY) as u32);
        assert_eq!(cmos(&mut p, 0x00, now), 32);
        assert_eq!(cmos(&mut p, 0x02, now), 26);
        // Time writes are not kept; plain CMOS RAM is.
        p.write(0x70, 1, 0x00);
        p.write(0x71, 1, 0);
        assert_eq!(cmos(&mut p, 0x00, now), 32);
        p.write(0x70, 1, 0x40);
        p.write(0x71, 1, 0x5A);
        assert_eq!(cmos(&mut p, 0x40, now), 0x5A);
        // And the host's registers read at boot give back the same instant.
        let registers = [0x27, 0x25, 0x03, 0x02, 0x12, 0x26, 0x20, RTC_B_24H];
        assert_eq!(rtc_to_unix_seconds(registers), Some(WHEN));
        let pm_12h = [0x27, 0x25, 0x83, 0x02, 0x12, 0x26, 0x20, 0];
        assert_eq!(rtc_to_unix_seconds(pm_12h), Some(WHEN + 12 * 3600));
        assert_eq!(rtc_to_unix_seconds([0x99, 0, 0, 1, 1, 0x70, 0x19, 0]), None);
    }

    #[test]
    fn a_passed_through_function_shows_at_its_own_address_and_nowhere_else() {
        let mut p = platform();
        let mut header = [0u32; 16];
        header[0] = 0x8029_10EC;
        header[4] = 0xC041;
        header[15] = 0x0109;
        let nic = PassedFunction::new(2, 0, header, [0xFFFF_FFE1, 0, 0, 0, 0, 0]).unwrap();
        p.pass_through(nic);
        p.write(0xCF8, 4, 0x8000_1000); // 00:02.0, register 0
        assert_eq!(p.read(0xCFC, 4, 0), Some(0x8029_10EC));
        p.write(0xCF8, 4, 0x8000_1010); // its BAR0: sized through the data window
        p.write(0xCFC, 4, 0xFFFF_FFFF);
        assert_eq!(p.read(0xCFC, 4, 0), Some(0xFFFF_FFE1));
        p.write(0xCF8, 4, 0x8000_103C);
        p.write(0xCFC, 1, 0x0B);
        assert_eq!(p.read(0xCFD, 1, 0), Some(1), "INTA, read at its byte");
        p.write(0xCF8, 4, 0x8000_1100); // 00:02.1: no such function
        assert_eq!(p.read(0xCFC, 4, 0), Some(0xFFFF_FFFF));
        p.write(0xCF8, 4, 0x8001_1000); // bus 1
        assert_eq!(p.read(0xCFC, 4, 0), Some(0xFFFF_FFFF));
        p.write(0xCF8, 4, 0x8000_0000);
        assert_eq!(p.read(0xCFC, 4, 0), Some(HOST_BRIDGE_ID), "the host bridge is still there");
        // A reset shows the machine's registers again.
        let mut p = p.after_reset();
        p.write(0xCF8, 4, 0x8000_1010);
        assert_eq!(p.read(0xCFC, 4, 0), Some(0xC041));
        p.write(0xCF8, 4, 0x8000_103C);
        assert_eq!(p.read(0xCFC, 1, 0), Some(9));
    }

    #[test]
    fn the_pics_are_present_masked_and_take_their_initialisation() {
        let mut p = platform();
        // Linux's probe: write a mask, read it back.
        p.write(0xA1, 1, 0xFF);
        p.write(0x21, 1, 0xFB);
        assert_eq!(p.read(0x21, 1, 0), Some(0xFB));
        // init_8259A: ICW1 (with ICW4), vector base, cascade, ICW4, then the mask.
        for (port, value) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFF)] {
            p.write(port, 1, value);
        }
        assert_eq!(p.read(0x21, 1, 0), Some(0xFF), "the last write is the mask, not an ICW");
        p.write(0xA0, 1, 0x0B); // OCW3: read ISR
        assert_eq!(p.read(0xA0, 1, 0), Some(0));
        p.write(0x4D1, 1, 0x0E);
        assert_eq!(p.read(0x4D1, 1, 0), Some(0x0E), "ELCR");
    }

    #[test]
    fn pci_mechanism_1_shows_a_host_bridge_and_nothing_else() {
        let mut p = platform();
        p.write(0xCFB, 1, 0x01); // Linux's type-1 probe pokes the byte at 0xCFB
        p.write(0xCF8, 4, 0x8000_0000);
        assert_eq!(p.read(0xCF8, 4, 0), Some(0x8000_0000), "the address register holds");
        assert_eq!(p.read(0xCFC, 4, 0), Some(HOST_BRIDGE_ID));
        assert_eq!(p.read(0xCFE, 2, 0), Some(0x1237), "device ID, 16-bit access at offset 2");
        p.write(0xCF8, 4, 0x8000_0008);
        assert_eq!(p.read(0xCFF, 1, 0), Some(0x06), "base class: bridge");
        assert_eq!(p.read(0xCFE, 1, 0), Some(0x00), "subclass: host bridge");
        p.write(0xCF8, 4, 0x8000_0800); // 00:01.0
        assert_eq!(p.read(0xCFC, 4, 0), Some(0xFFFF_FFFF), "nothing else on the bus");
        p.write(0xCF8, 4, 0x0000_0000);
        assert_eq!(p.read(0xCFC, 4, 0), Some(0xFFFF_FFFF), "disabled window");
    }

    #[test]
    fn the_three_reset_paths_and_s5_are_power_requests() {
        let mut p = platform();
        assert_eq!(p.write(0xCF9, 1, 0x02), Some(None), "SYS_RST alone only arms it");
        assert_eq!(p.read(0xCF9, 1, 0), Some(0x02));
        assert!(matches!(p.write(0xCF9, 1, 0x06), Some(Some(PowerRequest::Reset { .. }))));
        assert!(matches!(p.write(0x64, 1, 0xFE), Some(Some(PowerRequest::Reset { .. }))));
        assert_eq!(p.write(0x64, 1, 0xD1), Some(None));
        assert_eq!(p.read(0x64, 1, 0), Some(0xFF), "no 8042");
        // ACPI: SCI_EN reads set (ACPI mode from power-on); SLP_EN with _S5's type powers off.
        assert_eq!(p.read(PM1A_CONTROL_PORT, 2, 0).unwrap() as u16 & PM1_SCI_EN, PM1_SCI_EN);
        let s1 = (1 << PM1_SLP_TYP_SHIFT) | PM1_SLP_EN;
        assert_eq!(p.write(PM1A_CONTROL_PORT, 2, s1 as u32), Some(None), "no other sleep state");
        let s5 = (S5_SLEEP_TYPE << PM1_SLP_TYP_SHIFT) | PM1_SLP_EN;
        assert_eq!(p.write(PM1A_CONTROL_PORT, 2, s5 as u32), Some(Some(PowerRequest::PowerOff)));
        assert_eq!(p.read(PM1A_CONTROL_PORT, 2, 0).unwrap() as u16 & PM1_SLP_EN, 0, "SLP_EN reads 0");
        // Enable bits hold, status bits clear on a 1.
        p.write(PM1A_EVENT_PORT + 2, 2, 0x0120);
        assert_eq!(p.read(PM1A_EVENT_PORT + 2, 2, 0), Some(0x0120));
        assert_eq!(p.read(PM1A_EVENT_PORT, 4, 0), Some(0x0120_0000), "status and enable as one dword");
    }

    #[test]
    fn the_pm_timer_runs_at_its_fixed_rate_from_the_tsc() {
        let mut p = platform();
        assert_eq!(p.read(PM_TIMER_PORT, 4, HZ), Some(PM_TIMER_HZ as u32), "one second");
        assert_eq!(p.read(PM_TIMER_PORT, 4, HZ / 1000), Some(3579), "one millisecond");
        // It wraps at 32 bits, as the FADT's TMR_VAL_EXT says.
        let wrap = (1u64 << 32) * HZ / PM_TIMER_HZ + HZ;
        let read = p.read(PM_TIMER_PORT, 4, wrap).unwrap() as u64;
        assert!(read < 2 * PM_TIMER_HZ, "{read}");
        assert_eq!(p.read(PM_TIMER_PORT + 2, 2, HZ), Some((PM_TIMER_HZ >> 16) as u32), "upper half");
    }

    #[test]
    fn only_the_platforms_ports_are_claimed() {
        let mut p = platform();
        for port in [0x40u16, 0x43, 0x61, 0x60, 0x80, 0x3F8, 0x2F8, 0x5FF, PM_END] {
            assert_eq!(p.read(port, 1, 0), None, "{port:#x}");
            assert_eq!(p.write(port, 1, 0), None, "{port:#x}");
        }
        for port in
            [0x20u16, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0x64, 0x70, 0x71, 0xCF8, 0xCF9, 0xCFC, 0xCFF, PM_BASE, PM_END - 1]
        {
            assert!(PlatformDevices::claims(port), "{port:#x}");
        }
    }
}
