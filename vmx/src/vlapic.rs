//! A partition vCPU's local APIC in xAPIC (MMIO) mode: the register file, the timer (counting
//! at the TSC rate CPUID 0x15 reports as the crystal, divided; or, in TSC-deadline mode, armed
//! through IA32_TSC_DEADLINE, a WRMSR exit instead of a decoded MMIO write), interrupt
//! acceptance by priority, EOI, and the interrupt-command register turned into commands for the
//! hypervisor. Pure: time is a TSC value the caller passes in (the guest's TSC is the host's).

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;

/// Register offsets in the 4 KiB xAPIC page.
pub mod reg {
    pub const ID: u32 = 0x020;
    pub const VERSION: u32 = 0x030;
    pub const TPR: u32 = 0x080;
    pub const APR: u32 = 0x090;
    pub const PPR: u32 = 0x0A0;
    pub const EOI: u32 = 0x0B0;
    pub const RRD: u32 = 0x0C0;
    pub const LDR: u32 = 0x0D0;
    pub const DFR: u32 = 0x0E0;
    pub const SVR: u32 = 0x0F0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const LVT_CMCI: u32 = 0x2F0;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
}

const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// The LVT timer's mode field (bits 17-18) and its TSC-deadline value.
const LVT_TIMER_MODE: u32 = 0b11 << 17;
const LVT_TIMER_TSC_DEADLINE: u32 = 0b10 << 17;
const SVR_ENABLED: u32 = 1 << 8;
/// Version 0x14 (integrated APIC), 6 LVT entries (max LVT index 5).
const VERSION_VALUE: u32 = 0x0005_0014;
const LVT_REGISTERS: [u32; 7] =
    [reg::LVT_CMCI, reg::LVT_TIMER, reg::LVT_THERMAL, reg::LVT_PERF, reg::LVT_LINT0, reg::LVT_LINT1, reg::LVT_ERROR];

/// Where an IPI goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Physical destination mode: one APIC ID (0xFF: broadcast).
    Physical(u8),
    /// Logical destination mode, flat model: a bitmask of logical IDs.
    Logical(u8),
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// What a write to ICR asks the hypervisor to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcrCommand {
    Fixed {
        vector: u8,
        destination: Destination,
    },
    Nmi {
        destination: Destination,
    },
    Init {
        destination: Destination,
    },
    Startup {
        vector: u8,
        destination: Destination,
    },
    /// A delivery mode Phalanx does not support (SMI, lowest-priority with no target, ...).
    Unsupported {
        icr: u64,
    },
}

/// The register file laid out as the xAPIC page is (each register a 32-bit word at its
/// offset), page-aligned so that the same page is the VMCS's virtual-APIC page when the CPU
/// virtualizes the APIC: the processor then reads and writes TPR, ISR, IRR and EOI here itself,
/// and this model and the hardware see one state. Boxed, so its address stays put when the
/// vCPU that holds it moves.
#[repr(C, align(4096))]
#[derive(Clone, PartialEq, Eq)]
pub struct ApicPage([u32; 1024]);

impl core::fmt::Debug for ApicPage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ApicPage { .. }")
    }
}

/// Register offsets whose word groups hold one bit per vector (8 registers, 16 bytes apart).
const VECTOR_BITMAPS: [u32; 3] = [reg::ISR, reg::TMR, reg::IRR];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualLapic {
    id: u8,
    regs: Box<ApicPage>,
    /// The LVT timer's mode as last written through [`VirtualLapic::write`]: a write the CPU
    /// already put in the page (an APIC-write exit) still sees the mode it leaves.
    timer_mode: u32,
    /// TSC at which the current count started, and when it reaches zero.
    timer_start: u64,
    timer_deadline: Option<u64>,
    /// A level-triggered vector the last EOI ended (its TMR bit was set), until the caller
    /// takes it to broadcast the EOI to the IO-APIC.
    level_eoi: Option<u8>,
    /// Which of the IRR's and the ISR's eight words are non-zero (bit i: word i), kept with
    /// every change to them: finding the highest vector, asked several times before every VM
    /// entry, then reads one word instead of scanning eight. Only this model writes IRR and
    /// ISR (the CPU would, under virtual-interrupt delivery, which Phalanx does not use).
    irr_words: u8,
    isr_words: u8,
}

fn lvt_index(offset: u32) -> Option<usize> {
    LVT_REGISTERS.iter().position(|&r| r == offset)
}

/// Word `index` (0..8) of the vector bitmap at `base`.
fn word(base: u32, index: usize) -> usize {
    (base / 4) as usize + index * 4
}

impl VirtualLapic {
    /// The power-on state (SDM 11.4.7.1): everything masked, software-disabled.
    pub fn new(apic_id: u8) -> Self {
        let mut lapic = VirtualLapic {
            id: apic_id,
            regs: Box::new(ApicPage([0; 1024])),
            timer_mode: 0,
            timer_start: 0,
            timer_deadline: None,
            level_eoi: None,
            irr_words: 0,
            isr_words: 0,
        };
        lapic.reset();
        lapic
    }

    /// Back to the power-on state in place (the page keeps its address).
    pub fn reset(&mut self) {
        self.regs.0.fill(0);
        self.irr_words = 0;
        self.isr_words = 0;
        self.set_reg(reg::ID, (self.id as u32) << 24);
        self.set_reg(reg::VERSION, VERSION_VALUE);
        self.set_reg(reg::DFR, 0xFFFF_FFFF);
        self.set_reg(reg::SVR, 0xFF);
        for lvt in LVT_REGISTERS {
            self.set_reg(lvt, LVT_MASKED);
        }
        self.timer_mode = 0;
        self.timer_start = 0;
        self.timer_deadline = None;
        self.level_eoi = None;
    }

    /// The register page, for the VMCS's virtual-APIC address (the hypervisor's memory is
    /// identity-mapped: this is also its physical address).
    pub fn page_address(&self) -> u64 {
        &*self.regs as *const ApicPage as u64
    }

    fn reg(&self, offset: u32) -> u32 {
        self.regs.0[(offset / 4) as usize]
    }

    fn set_reg(&mut self, offset: u32, value: u32) {
        self.regs.0[(offset / 4) as usize] = value;
        for base in [reg::IRR, reg::ISR] {
            if (base..base + 0x80).contains(&offset) {
                self.note_word(base, ((offset - base) / 0x10) as usize);
            }
        }
    }

    /// The non-zero words of the IRR or the ISR (`None` for the other bitmaps).
    fn words_mut(&mut self, base: u32) -> Option<&mut u8> {
        match base {
            reg::IRR => Some(&mut self.irr_words),
            reg::ISR => Some(&mut self.isr_words),
            _ => None,
        }
    }

    /// Word `i` of the bitmap at `base` changed: its bit in the summary follows.
    fn note_word(&mut self, base: u32, i: usize) {
        let nonzero = self.regs.0[word(base, i)] != 0;
        if let Some(words) = self.words_mut(base) {
            *words = (*words & !(1 << i)) | (u8::from(nonzero) << i);
        }
    }

    fn highest(&self, base: u32) -> Option<u8> {
        let words = match base {
            reg::IRR => self.irr_words,
            reg::ISR => self.isr_words,
            _ => (0..8).fold(0u8, |w, i| w | (u8::from(self.regs.0[word(base, i)] != 0) << i)),
        };
        let i = 7usize.checked_sub(words.leading_zeros() as usize)?;
        let bits = self.regs.0[word(base, i)];
        Some((i as u32 * 32 + 31 - bits.leading_zeros()) as u8)
    }

    fn set_bit(&mut self, base: u32, vector: u8) {
        self.regs.0[word(base, vector as usize / 32)] |= 1 << (vector % 32);
        self.note_word(base, vector as usize / 32);
    }

    fn clear_bit(&mut self, base: u32, vector: u8) {
        self.regs.0[word(base, vector as usize / 32)] &= !(1 << (vector % 32));
        self.note_word(base, vector as usize / 32);
    }

    fn bit(&self, base: u32, vector: u8) -> bool {
        self.regs.0[word(base, vector as usize / 32)] & (1 << (vector % 32)) != 0
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Logical ID (flat model) for logical-destination IPIs.
    pub fn logical_id(&self) -> u8 {
        (self.reg(reg::LDR) >> 24) as u8
    }

    pub fn software_enabled(&self) -> bool {
        self.reg(reg::SVR) & SVR_ENABLED != 0
    }

    /// TSC cycles per timer tick: the divide configuration (bits 0,1,3) selects 1..128.
    fn divisor(&self) -> u64 {
        let config = self.reg(reg::TIMER_DIVIDE);
        let code = (config & 0b11) | ((config >> 1) & 0b100);
        if code == 0b111 {
            1
        } else {
            2u64 << code
        }
    }

    fn ppr(&self) -> u32 {
        let tpr = self.reg(reg::TPR);
        let isrv = self.highest(reg::ISR).map_or(0, |v| v as u32);
        if (tpr & 0xF0) >= (isrv & 0xF0) {
            tpr & 0xFF
        } else {
            isrv & 0xF0
        }
    }

    pub fn read(&self, offset: u32, now: u64) -> u32 {
        match offset {
            reg::APR | reg::RRD | reg::EOI => 0,
            reg::PPR => self.ppr(),
            reg::TIMER_CURRENT if self.tsc_deadline_mode() => 0,
            reg::TIMER_CURRENT => match self.timer_deadline {
                Some(deadline) if deadline > now => ((deadline - now) / self.divisor()).min(u32::MAX as u64) as u32,
                _ => 0,
            },
            reg::ID | reg::VERSION | reg::TPR | reg::LDR | reg::DFR | reg::SVR | reg::ESR | reg::ICR_HIGH => {
                self.reg(offset)
            }
            reg::ICR_LOW => self.reg(offset) & !(1 << 12), // delivery status: always idle
            reg::TIMER_INITIAL | reg::TIMER_DIVIDE => self.reg(offset),
            o if VECTOR_BITMAPS.iter().any(|&base| (base..base + 0x80).contains(&o)) => self.reg(o),
            o if lvt_index(o).is_some() => self.reg(o),
            _ => 0,
        }
    }

    /// A guest write; returns what an ICR write asks for.
    pub fn write(&mut self, offset: u32, value: u32, now: u64) -> Option<IcrCommand> {
        match offset {
            reg::TPR => self.set_reg(reg::TPR, value & 0xFF),
            reg::EOI => {
                if let Some(v) = self.highest(reg::ISR) {
                    self.clear_bit(reg::ISR, v);
                    // A level-triggered interrupt's EOI goes on to the IO-APIC (SDM 11.8.5).
                    if self.bit(reg::TMR, v) {
                        self.clear_bit(reg::TMR, v);
                        self.level_eoi = Some(v);
                    }
                }
            }
            reg::LDR => self.set_reg(reg::LDR, value & 0xFF00_0000),
            reg::DFR => self.set_reg(reg::DFR, value | 0x0FFF_FFFF),
            reg::SVR => {
                self.set_reg(reg::SVR, value & 0x13FF);
                if !self.software_enabled() {
                    // Disabling masks every LVT entry (SDM 11.4.7.2).
                    for lvt in LVT_REGISTERS {
                        self.set_reg(lvt, self.reg(lvt) | LVT_MASKED);
                    }
                }
            }
            reg::ESR => self.set_reg(reg::ESR, 0),
            reg::ICR_HIGH => self.set_reg(reg::ICR_HIGH, value & 0xFF00_0000),
            reg::ICR_LOW => {
                self.set_reg(reg::ICR_LOW, value);
                return Some(self.icr_command());
            }
            // In TSC-deadline mode the initial count is not used (SDM 10.5.4.1).
            reg::TIMER_INITIAL if self.tsc_deadline_mode() => self.set_reg(reg::TIMER_INITIAL, 0),
            reg::TIMER_INITIAL => {
                self.set_reg(reg::TIMER_INITIAL, value);
                self.timer_start = now;
                self.timer_deadline = (value != 0).then(|| now + value as u64 * self.divisor());
            }
            reg::TIMER_DIVIDE => self.set_reg(reg::TIMER_DIVIDE, value & 0b1011),
            o if lvt_index(o).is_some() => {
                let masked = if self.software_enabled() { 0 } else { LVT_MASKED };
                let entry = (value & 0x0007_17FF) | masked;
                self.set_reg(o, entry);
                if o == reg::LVT_TIMER {
                    // Entering or leaving TSC-deadline mode disarms the timer.
                    let (old_mode, new_mode) = (self.timer_mode, entry & LVT_TIMER_MODE);
                    if old_mode != new_mode
                        && (old_mode == LVT_TIMER_TSC_DEADLINE || new_mode == LVT_TIMER_TSC_DEADLINE)
                    {
                        self.timer_deadline = None;
                    }
                    self.timer_mode = new_mode;
                }
            }
            // Read-only or reserved: the write is dropped (the page keeps the register's value).
            _ => {}
        }
        None
    }

    /// A write the CPU has already made to the register page (an APIC-write VM exit, trap-like,
    /// under APIC-register virtualization): its effects, as [`VirtualLapic::write`] of the value
    /// the page holds. Registers the CPU does not virtualize never get here.
    pub fn trapped_write(&mut self, offset: u32, now: u64) -> Option<IcrCommand> {
        match offset {
            // Virtualized without an exit (TPR shadow).
            reg::TPR => None,
            reg::ID | reg::VERSION => {
                // Read-only: put back what the CPU overwrote.
                self.set_reg(reg::ID, (self.id as u32) << 24);
                self.set_reg(reg::VERSION, VERSION_VALUE);
                None
            }
            o => self.write(o, self.reg(o), now),
        }
    }

    fn icr_command(&self) -> IcrCommand {
        let (low, high) = (self.reg(reg::ICR_LOW), self.reg(reg::ICR_HIGH));
        let vector = low as u8;
        let destination = match (low >> 18) & 0b11 {
            1 => Destination::SelfOnly,
            2 => Destination::AllIncludingSelf,
            3 => Destination::AllExcludingSelf,
            _ if low & (1 << 11) != 0 => Destination::Logical((high >> 24) as u8),
            _ => Destination::Physical((high >> 24) as u8),
        };
        match (low >> 8) & 0b111 {
            0 | 1 => IcrCommand::Fixed { vector, destination },
            4 => IcrCommand::Nmi { destination },
            // INIT level de-assert (level=0, trigger=level) is a no-op on modern CPUs.
            5 if low & (1 << 14) == 0 && low & (1 << 15) != 0 => IcrCommand::Unsupported { icr: 0 },
            5 => IcrCommand::Init { destination },
            6 => IcrCommand::Startup { vector, destination },
            _ => IcrCommand::Unsupported { icr: ((high as u64) << 32) | low as u64 },
        }
    }

    /// Whether an IPI with `destination` (sent by `sender`) is for this APIC.
    pub fn is_destination(&self, destination: Destination, sender: u8) -> bool {
        match destination {
            Destination::Physical(id) => id == 0xFF || id == self.id,
            Destination::Logical(mask) => self.logical_id() & mask != 0,
            Destination::SelfOnly => self.id == sender,
            Destination::AllIncludingSelf => true,
            Destination::AllExcludingSelf => self.id != sender,
        }
    }

    fn tsc_deadline_mode(&self) -> bool {
        self.timer_mode == LVT_TIMER_TSC_DEADLINE
    }

    /// IA32_TSC_DEADLINE as the guest reads it: the armed deadline, 0 when disarmed or fired
    /// (or outside TSC-deadline mode).
    pub fn tsc_deadline(&self) -> u64 {
        if self.tsc_deadline_mode() {
            self.timer_deadline.unwrap_or(0)
        } else {
            0
        }
    }

    /// A write of IA32_TSC_DEADLINE: arms the timer for that TSC (one already past fires at
    /// once), 0 disarms it; ignored outside TSC-deadline mode (SDM 10.5.4.1).
    pub fn set_tsc_deadline(&mut self, deadline: u64) {
        if self.tsc_deadline_mode() {
            self.timer_deadline = (deadline != 0).then_some(deadline);
        }
    }

    /// When the timer next fires (absolute TSC), if it runs.
    pub fn timer_deadline(&self) -> Option<u64> {
        self.timer_deadline
    }

    /// Advances the timer to `now`: an expired count raises its vector (unless masked) and a
    /// periodic timer starts again.
    pub fn advance(&mut self, now: u64) {
        let Some(deadline) = self.timer_deadline else { return };
        if now < deadline {
            return;
        }
        let lvt = self.reg(reg::LVT_TIMER);
        if lvt & LVT_MASKED == 0 {
            self.accept(lvt as u8);
        }
        let initial = self.reg(reg::TIMER_INITIAL);
        self.timer_deadline = if lvt & LVT_TIMER_PERIODIC != 0 && initial != 0 {
            let period = initial as u64 * self.divisor();
            let missed = (now - deadline) / period;
            Some(deadline + (missed + 1) * period)
        } else {
            None
        };
    }

    /// An edge-triggered interrupt arrives (IPI or routed device interrupt).
    pub fn accept(&mut self, vector: u8) {
        if vector >= 16 {
            self.set_bit(reg::IRR, vector);
            self.clear_bit(reg::TMR, vector);
        }
    }

    /// A level-triggered interrupt arrives from the IO-APIC: noted in the TMR, so that its
    /// EOI is broadcast back ([`VirtualLapic::take_level_eoi`]).
    pub fn accept_level(&mut self, vector: u8) {
        if vector >= 16 {
            self.set_bit(reg::IRR, vector);
            self.set_bit(reg::TMR, vector);
        }
    }

    /// The level-triggered vector the guest's last EOI ended, once: the IO-APIC must hear of it.
    pub fn take_level_eoi(&mut self) -> Option<u8> {
        self.level_eoi.take()
    }

    /// The vectors requested (IRR) and in service (ISR), lowest first: where a guest that hangs
    /// left its interrupts (the `vcpu_end` record).
    pub fn vectors(&self) -> (Vec<u8>, Vec<u8>) {
        let set = |base: u32| {
            (16..=255u8).filter(|&v| self.regs.0[word(base, v as usize / 32)] & 1 << (v % 32) != 0).collect()
        };
        (set(reg::IRR), set(reg::ISR))
    }

    /// Whether `vector` is requested or in service here (it has reached this APIC).
    pub fn holds(&self, vector: u8) -> bool {
        let bit = 1 << (vector % 32);
        [reg::IRR, reg::ISR].iter().any(|&base| self.regs.0[word(base, vector as usize / 32)] & bit != 0)
    }

    /// The vector that would be delivered now, if any (its priority class above the PPR).
    pub fn deliverable(&self) -> Option<u8> {
        let v = self.highest(reg::IRR)?;
        (self.software_enabled() && (v as u32 & 0xF0) > (self.ppr() & 0xF0)).then_some(v)
    }

    /// What the CPU does to the register page under APIC virtualization, for tests: a guest
    /// write it virtualizes (the value lands in the page as written).
    #[cfg(test)]
    pub(crate) fn cpu_writes(&mut self, offset: u32, value: u32) {
        self.set_reg(offset, value);
    }

    /// The guest takes the deliverable interrupt: IRR -> ISR.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.deliverable()?;
        self.clear_bit(reg::IRR, v);
        self.set_bit(reg::ISR, v);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(id: u8) -> VirtualLapic {
        let mut l = VirtualLapic::new(id);
        l.write(reg::SVR, 0x1FF, 0);
        l
    }

    #[test]
    fn power_on_state_is_disabled_and_masked() {
        let l = VirtualLapic::new(2);
        assert_eq!(l.read(reg::ID, 0), 2 << 24);
        assert_eq!(l.read(reg::VERSION, 0) & 0xFF, 0x14);
        assert_eq!(l.read(reg::LVT_TIMER, 0), LVT_MASKED);
        assert_eq!(l.read(reg::DFR, 0), 0xFFFF_FFFF);
        assert!(!l.software_enabled());
    }

    #[test]
    fn tsc_deadline_mode_arms_by_msr_fires_once_and_ignores_the_count() {
        let mut l = enabled(0);
        l.set_tsc_deadline(5_000);
        assert_eq!(l.timer_deadline(), None, "ignored outside TSC-deadline mode");
        l.write(reg::LVT_TIMER, LVT_TIMER_TSC_DEADLINE | 0xEC, 0);
        l.write(reg::TIMER_INITIAL, 1000, 100);
        assert_eq!(l.timer_deadline(), None, "the initial count is not used");
        l.set_tsc_deadline(5_000);
        assert_eq!((l.tsc_deadline(), l.read(reg::TIMER_CURRENT, 100)), (5_000, 0));
        l.advance(4_999);
        assert_eq!(l.deliverable(), None);
        l.advance(5_000);
        assert_eq!(l.deliverable(), Some(0xEC));
        assert_eq!((l.tsc_deadline(), l.timer_deadline()), (0, None), "fired: reads 0, not re-armed");
        l.set_tsc_deadline(9_000);
        l.set_tsc_deadline(0);
        assert_eq!(l.timer_deadline(), None, "0 disarms");
        l.set_tsc_deadline(9_000);
        l.write(reg::LVT_TIMER, 0xEC, 0);
        assert_eq!(l.timer_deadline(), None, "leaving TSC-deadline mode disarms");
    }

    #[test]
    fn one_shot_timer_counts_down_at_the_divided_tsc_rate_and_fires_once() {
        let mut l = enabled(0);
        l.write(reg::TIMER_DIVIDE, 0b0011, 0); // divide by 16
        l.write(reg::LVT_TIMER, 0xEC, 0);
        l.write(reg::TIMER_INITIAL, 1000, 100);
        assert_eq!(l.timer_deadline(), Some(100 + 16_000));
        assert_eq!(l.read(reg::TIMER_CURRENT, 100 + 1600), 900);
        l.advance(16_099);
        assert_eq!(l.deliverable(), None, "not yet");
        l.advance(16_100);
        assert_eq!(l.deliverable(), Some(0xEC));
        assert_eq!(l.timer_deadline(), None, "one-shot");
        assert_eq!(l.read(reg::TIMER_CURRENT, 20_000), 0);
    }

    #[test]
    fn periodic_timer_rearms_and_masked_timer_raises_nothing() {
        let mut l = enabled(0);
        l.write(reg::TIMER_DIVIDE, 0b1011, 0); // divide by 1
        l.write(reg::LVT_TIMER, LVT_TIMER_PERIODIC | 0x30, 0);
        l.write(reg::TIMER_INITIAL, 500, 0);
        l.advance(1_250);
        assert_eq!(l.timer_deadline(), Some(1_500), "skips missed periods");
        assert_eq!(l.acknowledge(), Some(0x30));
        let mut m = enabled(0);
        m.write(reg::LVT_TIMER, LVT_MASKED | 0x30, 0);
        m.write(reg::TIMER_INITIAL, 10, 0);
        m.advance(1_000);
        assert_eq!(m.deliverable(), None);
    }

    #[test]
    fn priority_tpr_isr_and_eoi_order_delivery() {
        let mut l = enabled(0);
        l.accept(0x41);
        l.accept(0x61);
        assert_eq!(l.acknowledge(), Some(0x61), "highest first");
        assert_eq!(l.deliverable(), None, "0x41 is below the in-service class 0x60");
        l.write(reg::EOI, 0, 0);
        assert_eq!(l.deliverable(), Some(0x41));
        l.write(reg::TPR, 0x50, 0);
        assert_eq!(l.deliverable(), None, "masked by TPR");
        assert_eq!(l.read(reg::PPR, 0), 0x50);
        l.write(reg::TPR, 0, 0);
        assert_eq!(l.read(reg::IRR + 0x20, 0), 1 << 1, "IRR word 2 holds vector 0x41");
    }

    #[test]
    fn the_eoi_of_a_level_triggered_vector_is_handed_on_once() {
        let mut l = enabled(0);
        l.accept_level(0x3B);
        l.accept(0x41);
        assert_eq!(l.read(reg::TMR + 0x10, 0), 1 << (0x3B - 32), "the TMR notes the level vector");
        assert_eq!(l.acknowledge(), Some(0x41));
        l.write(reg::EOI, 0, 0);
        assert_eq!(l.take_level_eoi(), None, "an edge's EOI stays in the LAPIC");
        assert_eq!(l.acknowledge(), Some(0x3B));
        l.write(reg::EOI, 0, 0);
        assert_eq!(l.take_level_eoi(), Some(0x3B));
        assert_eq!(l.take_level_eoi(), None, "once");
        assert_eq!(l.read(reg::TMR + 0x10, 0), 0);
        // The same vector later as an edge: no broadcast.
        l.accept(0x3B);
        assert_eq!(l.acknowledge(), Some(0x3B));
        l.write(reg::EOI, 0, 0);
        assert_eq!(l.take_level_eoi(), None);
    }

    #[test]
    fn the_register_page_is_laid_out_as_the_xapic_page() {
        let mut l = enabled(3);
        l.accept(0x41);
        l.write(reg::TPR, 0x20, 0);
        let page = &l.regs.0;
        assert_eq!(page[0x20 / 4], 3 << 24, "ID");
        assert_eq!(page[0x80 / 4], 0x20, "TPR, where the CPU's TPR shadow is");
        assert_eq!(page[0x220 / 4], 1 << 1, "IRR bit 0x41: word 2 at 0x220");
        assert_eq!(l.page_address() % 4096, 0, "page-aligned: usable as the virtual-APIC page");
        let address = l.page_address();
        l.reset();
        assert_eq!((l.page_address(), l.read(reg::IRR + 0x20, 0)), (address, 0), "reset in place");
    }

    #[test]
    fn trapped_writes_take_effect_from_what_the_cpu_put_in_the_page() {
        let mut l = enabled(1);
        l.cpu_writes(reg::LVT_TIMER, LVT_TIMER_TSC_DEADLINE | 0xEC);
        assert_eq!(l.trapped_write(reg::LVT_TIMER, 0), None);
        l.set_tsc_deadline(7_000);
        assert_eq!(l.timer_deadline(), Some(7_000), "TSC-deadline mode, entered through the page");
        l.cpu_writes(reg::LVT_TIMER, 0xEC);
        l.trapped_write(reg::LVT_TIMER, 0);
        assert_eq!(l.timer_deadline(), None, "leaving it disarms, though the page already held the new mode");
        l.cpu_writes(reg::ICR_HIGH, 0 << 24);
        assert_eq!(l.trapped_write(reg::ICR_HIGH, 0), None);
        l.cpu_writes(reg::ICR_LOW, 0x0000_00FD);
        assert_eq!(
            l.trapped_write(reg::ICR_LOW, 0),
            Some(IcrCommand::Fixed { vector: 0xFD, destination: Destination::Physical(0) })
        );
        l.cpu_writes(reg::ID, 7 << 24);
        l.trapped_write(reg::ID, 0);
        assert_eq!(l.read(reg::ID, 0), 1 << 24, "read-only: put back");
        l.accept(0x41);
        assert_eq!(l.acknowledge(), Some(0x41));
        l.cpu_writes(reg::EOI, 0);
        l.trapped_write(reg::EOI, 0);
        assert_eq!(l.vectors(), (vec![], vec![]), "an EOI trap retires the vector in service");
        l.cpu_writes(reg::SVR, 0xFF);
        l.trapped_write(reg::SVR, 0);
        assert_eq!(l.read(reg::LVT_TIMER, 0) & LVT_MASKED, LVT_MASKED, "disabling masks the LVTs");
    }

    /// The highest vector by a scan of all eight words, as the summary must find it.
    fn scanned_highest(l: &VirtualLapic, base: u32) -> Option<u8> {
        (16..=255u8).rev().find(|&v| l.bit(base, v))
    }

    #[test]
    fn the_word_summary_finds_what_a_full_scan_finds() {
        let mut rng = fuzz::Rng::new(0x1a91c);
        for round in 0..2_000 {
            let mut l = enabled(0);
            for _ in 0..rng.below(40) {
                match rng.below(6) {
                    0 | 1 => l.accept(rng.below(256) as u8),
                    2 => l.accept_level(rng.below(256) as u8),
                    3 => drop(l.acknowledge()),
                    4 => drop(l.write(reg::EOI, 0, 0)),
                    // The register itself (what a test writing the page directly does).
                    _ => {
                        let base = if rng.chance(50) { reg::IRR } else { reg::ISR };
                        l.set_reg(base + 0x10 * rng.below(8) as u32, rng.u64() as u32 & !0xFFFF);
                    }
                }
                for base in [reg::IRR, reg::ISR] {
                    assert_eq!(l.highest(base), scanned_highest(&l, base), "round {round}, bitmap {base:#x}");
                }
            }
            l.reset();
            assert_eq!((l.highest(reg::IRR), l.highest(reg::ISR)), (None, None), "reset clears the summary");
        }
    }

    #[test]
    fn a_software_disabled_apic_delivers_nothing() {
        let mut l = VirtualLapic::new(0);
        l.accept(0x80);
        assert_eq!(l.deliverable(), None);
    }

    #[test]
    fn icr_writes_become_commands() {
        let mut l = enabled(0);
        l.write(reg::ICR_HIGH, 1 << 24, 0);
        assert_eq!(
            l.write(reg::ICR_LOW, 0x0000_4500, 0),
            Some(IcrCommand::Init { destination: Destination::Physical(1) })
        );
        assert_eq!(
            l.write(reg::ICR_LOW, 0x0000_4608, 0),
            Some(IcrCommand::Startup { vector: 8, destination: Destination::Physical(1) })
        );
        assert_eq!(
            l.write(reg::ICR_LOW, 0x000C_00FD, 0),
            Some(IcrCommand::Fixed { vector: 0xFD, destination: Destination::AllExcludingSelf })
        );
        assert_eq!(l.write(reg::ICR_LOW, 0x0000_8500, 0), Some(IcrCommand::Unsupported { icr: 0 }), "INIT de-assert");
        let b = VirtualLapic::new(1);
        assert!(b.is_destination(Destination::Physical(1), 0));
        assert!(!b.is_destination(Destination::AllExcludingSelf, 1));
    }
}
