//! Local APIC (xAPIC MMIO mode): identity, EOI, IPIs for AP start-up, and the timer in
//! TSC-deadline mode (one-shot with a TSC->bus ratio where TSC-deadline is absent).

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::registers::model_specific::Msr;

const IA32_APIC_BASE: u32 = 0x1B;
const IA32_TSC_DEADLINE: u32 = 0x6E0;

const REG_ID: u64 = 0x20;
const REG_EOI: u64 = 0xB0;
const REG_SVR: u64 = 0xF0;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3E0;

const LVT_MASKED: u32 = 1 << 16;
const LVT_TSC_DEADLINE: u32 = 0b10 << 17;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;

static BASE: AtomicU64 = AtomicU64::new(0xFEE0_0000);
/// LAPIC timer ticks (divide-by-1) per 2^32 TSC cycles, for the one-shot fallback.
static TIMER_PER_TSC_Q32: AtomicU64 = AtomicU64::new(0);

fn read(reg: u64) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped uncached; aligned 32-bit register access.
    unsafe { core::ptr::read_volatile((BASE.load(Ordering::Relaxed) + reg) as *const u32) }
}

fn write(reg: u64, value: u32) {
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile((BASE.load(Ordering::Relaxed) + reg) as *mut u32, value) }
}

/// Whether the CPU offers the TSC-deadline timer mode (CPUID.1:ECX[24]).
pub fn has_tsc_deadline() -> bool {
    raw_cpuid::CpuId::new().get_feature_info().is_some_and(|f| f.has_tsc_deadline())
}

/// Remaps the legacy 8259 PICs away from the exception vectors (the BIOS leaves IRQ0 on
/// vector 8, the double-fault vector) and masks every line: device interrupts go through the
/// IO-APIC, and a spurious 8259 interrupt then arrives on a harmless vector.
pub fn disable_legacy_pic() {
    use x86_64::instructions::port::Port;
    const PIC1: u16 = 0x20;
    const PIC2: u16 = 0xA0;
    // SAFETY: the PICs' command/data ports; the standard ICW1-ICW4 init sequence.
    unsafe {
        for (base, offset, cascade) in [(PIC1, 0x20u8, 4u8), (PIC2, 0x28, 2)] {
            Port::<u8>::new(base).write(0x11);
            Port::<u8>::new(base + 1).write(offset);
            Port::<u8>::new(base + 1).write(cascade);
            Port::<u8>::new(base + 1).write(0x01);
            Port::<u8>::new(base + 1).write(0xFF);
        }
    }
}

/// Software-enables this CPU's LAPIC with the spurious vector; masks the timer.
pub fn init_this_cpu() {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU with an APIC.
    let base = unsafe { Msr::new(IA32_APIC_BASE).read() };
    BASE.store(base & 0xF_FFFF_F000, Ordering::Relaxed);
    write(REG_SVR, 0x100 | crate::vectors::SPURIOUS_VECTOR as u32);
    write(REG_LVT_TIMER, LVT_MASKED);
}

pub fn id() -> u32 {
    read(REG_ID) >> 24
}

pub fn eoi() {
    write(REG_EOI, 0);
}

fn send_ipi(apic_id: u32, command: u32) {
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, command);
    while read(REG_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// A fixed interrupt with `vector` to one CPU.
pub fn send_fixed(apic_id: u32, vector: u8) {
    send_ipi(apic_id, 0x0000_4000 | vector as u32);
}

/// A fixed interrupt with `vector` to every CPU but this one (the ICR's destination shorthand).
pub fn send_all_but_self(vector: u8) {
    const ALL_EXCLUDING_SELF: u32 = 0b11 << 18;
    send_ipi(0, ALL_EXCLUDING_SELF | 0x0000_4000 | vector as u32);
}

/// INIT (assert, level) to one CPU.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, 0x0000_4500);
}

/// Start-up IPI: the AP begins in real mode at `vector << 12`.
pub fn send_startup(apic_id: u32, vector: u8) {
    send_ipi(apic_id, 0x0000_4600 | vector as u32);
}

/// Measures the LAPIC timer rate against the TSC (needed only without TSC-deadline mode).
pub fn calibrate_timer() {
    write(REG_TIMER_DIVIDE, 0b1011);
    write(REG_LVT_TIMER, LVT_MASKED);
    let start = crate::tsc::now();
    write(REG_TIMER_INITIAL, u32::MAX);
    crate::tsc::delay_us(2_000);
    let elapsed_ticks = u32::MAX - read(REG_TIMER_CURRENT);
    let elapsed_tsc = crate::tsc::now() - start;
    write(REG_TIMER_INITIAL, 0);
    TIMER_PER_TSC_Q32.store(((elapsed_ticks as u64) << 32) / elapsed_tsc.max(1), Ordering::Relaxed);
}

/// How this CPU's timer is armed for an absolute TSC deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    TscDeadline,
    OneShot,
}

impl TimerMode {
    pub fn name(self) -> &'static str {
        match self {
            TimerMode::TscDeadline => "tsc-deadline",
            TimerMode::OneShot => "one-shot",
        }
    }
}

pub fn setup_timer(mode: TimerMode, vector: u8) {
    match mode {
        TimerMode::TscDeadline => {
            write(REG_LVT_TIMER, LVT_TSC_DEADLINE | vector as u32);
            // The LVT write must be visible before the first deadline write (SDM 10.5.4.1).
            core::sync::atomic::fence(Ordering::SeqCst);
        }
        TimerMode::OneShot => {
            write(REG_TIMER_DIVIDE, 0b1011);
            write(REG_LVT_TIMER, vector as u32);
        }
    }
}

/// Arms the timer to fire at TSC value `deadline`.
pub fn arm_deadline(mode: TimerMode, deadline: u64) {
    match mode {
        // SAFETY: IA32_TSC_DEADLINE exists when CPUID says TSC-deadline mode does.
        TimerMode::TscDeadline => unsafe { Msr::new(IA32_TSC_DEADLINE).write(deadline) },
        TimerMode::OneShot => {
            let delta = deadline.saturating_sub(crate::tsc::now());
            let ticks = ((delta as u128 * TIMER_PER_TSC_Q32.load(Ordering::Relaxed) as u128) >> 32) as u64;
            write(REG_TIMER_INITIAL, ticks.clamp(1, u32::MAX as u64) as u32);
        }
    }
}

pub fn mask_timer() {
    write(REG_LVT_TIMER, LVT_MASKED);
}
