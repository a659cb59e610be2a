//! Spin-wait sampling from the hypervisor's side, at any privilege level and on any CPU: at
//! sampling points (the VMX-preemption timer, every `spin_sample_us` of guest time) the
//! guest's code around RIP is fetched through its own page tables and classified. A vCPU is
//! spinning when it sits in a short loop that executes PAUSE: RIP on a PAUSE, or inside the
//! body of a backward branch (at most `MAX_LOOP_BYTES`) that holds one. PAUSE-loop exiting
//! sees only CPL 0 spinning and does not exist under nested KVM; this sees a user-space
//! barrier too.

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl};

use crate::mmio;
use crate::vcpu_access::VcpuAccess;

/// Bytes fetched before RIP (where a loop that RIP is in may start).
pub const BEFORE: usize = 96;
/// Bytes fetched from RIP on.
pub const AFTER: usize = 96;
/// The longest loop body counted as a spin loop (a PAUSE loop with a TSC read and a counter,
/// as the Linux BARRIER workload's, is under 100 bytes).
pub const MAX_LOOP_BYTES: u64 = 96;
/// How many instructions from RIP are looked at for the loop's backward branch.
const MAX_FORWARD_INSTRUCTIONS: usize = 24;

/// When a vCPU's next sample is due: one point drawn uniformly at random in each `period`
/// of TSC time from the run's start (stratified sampling). A point that passes while the vCPU
/// is off its pCPU is skipped, so samples fall uniformly over its running time, anywhere in
/// its slots (a fixed interval locks in phase with the slots and the guest's own loops and
/// sees only some points of them: under `independent`, where a slot begins with compute and
/// ends spinning, a fixed 1 ms read 57% spinning against the guest's own 45%).
///
/// The points depend only on the seed, the start and the period, so the vCPUs of one
/// partition (one seed) are sampled at the same moments on every pCPU. Sampled at moments of
/// their own, a sibling spun in the barrier while the sampler held a vCPU up, at moments no
/// sample of its own could see: under `independent` the Linux BARRIER workload read 45.3%
/// itself and 41.2% from the samples; sampled together, 40.8% and 40.3%.
#[derive(Debug, Clone)]
pub struct SampleClock {
    /// The point of the current period (`u64::MAX`: sampling off).
    due: u64,
    /// The index of the current period, counted from `start`.
    index: u64,
    start: u64,
    period: u64,
    seed: u64,
}

impl SampleClock {
    /// Samples once in every `period` TSC cycles from `start` (0: never), at points drawn from
    /// `seed`.
    pub fn new(period: u64, seed: u64, start: u64) -> SampleClock {
        let mut clock = SampleClock { due: u64::MAX, index: 0, start, period, seed };
        if period > 0 {
            clock.due = clock.point(0);
        }
        clock
    }

    /// The sample point of period `index`.
    fn point(&self, index: u64) -> u64 {
        let mut rng = sched::rng::SplitMix64::new(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.start.saturating_add(index.saturating_mul(self.period)).saturating_add(rng.below(self.period))
    }

    /// Moves to the first point after `now`, in constant time however long the vCPU was off.
    fn pass(&mut self, now: u64) {
        if self.period > 0 && self.due <= now {
            let current = now.saturating_sub(self.start) / self.period;
            self.index = current.max(self.index + 1);
            self.due = self.point(self.index);
            if self.due <= now {
                self.index += 1;
                self.due = self.point(self.index);
            }
        }
    }

    /// TSC cycles from `now` until the next sample (`u64::MAX` when sampling is off), when
    /// the vCPU is about to run: points that passed while it was not running are skipped.
    pub fn until_due(&mut self, now: u64) -> u64 {
        if self.period == 0 {
            return u64::MAX;
        }
        self.pass(now);
        self.due - now
    }

    /// Whether a sample is due at `now`, the vCPU having run up to now; when it is, the next
    /// point is drawn.
    pub fn take_due(&mut self, now: u64) -> bool {
        let due = self.period > 0 && now >= self.due;
        self.pass(now);
        due
    }
}

/// What one sample found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// In a PAUSE loop.
    Spinning,
    /// Anywhere else.
    Working,
    /// The code could not be read (not in 64-bit paging, or RIP not mapped): not counted.
    Unreadable,
}

/// Takes one sample of the vCPU behind `cpu` (64-bit mode only: `long_mode` is EFER.LMA).
pub fn sample(cpu: &impl VcpuAccess, long_mode: bool) -> Sample {
    if !long_mode {
        return Sample::Unreadable;
    }
    let rip = cpu.rip();
    let start = rip.saturating_sub(BEFORE as u64);
    let mut code = [0u8; BEFORE + AFTER];
    let at = (rip - start) as usize;
    let cr3 = cpu.read_field(x86::vmx::vmcs::guest::CR3);
    let read = |a: u64| cpu.read_physical_u64(a);
    // Page by page; bytes of an unmapped page stay zero, which decodes as no PAUSE.
    let mut offset = 0usize;
    let mut rip_readable = false;
    while offset < at + AFTER {
        let linear = start + offset as u64;
        let in_page = ((0x1000 - (linear & 0xFFF)) as usize).min(at + AFTER - offset);
        if let Some(gpa) = mmio::translate(cr3, linear, read) {
            if cpu.read_physical(gpa, &mut code[offset..offset + in_page]).is_some() {
                rip_readable |= (offset..offset + in_page).contains(&at);
            }
        }
        offset += in_page;
    }
    if !rip_readable {
        return Sample::Unreadable;
    }
    if in_pause_loop(&code[..at + AFTER], at, rip) {
        Sample::Spinning
    } else {
        Sample::Working
    }
}

/// Entries in a vCPU's `SampleCache` (a power of two).
const CACHE_ENTRIES: usize = 64;

/// The classifications of code a vCPU was last sampled in, by address space and RIP. Samples
/// keep landing on the same few instructions (a spin loop, a compute loop), and fetching and
/// scanning 192 bytes of code is most of a sample's cost: under Bochs a sample exit of the
/// test guest took 2,291 cycles without the cache and 645 with it, time the sampled vCPU
/// loses. A hit costs the page walk and one 8-byte read. Each entry keeps the 8 bytes at RIP
/// and is used only while they are unchanged, so code loaded anew at the same address
/// (another process, the same page tables reused) is classified afresh.
#[derive(Debug, Clone)]
pub struct SampleCache {
    entries: [CacheEntry; CACHE_ENTRIES],
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct CacheEntry {
    cr3: u64,
    rip: u64,
    bytes_at_rip: u64,
    sample: Option<Sample>,
}

impl Default for SampleCache {
    fn default() -> Self {
        SampleCache { entries: [CacheEntry::default(); CACHE_ENTRIES], hits: 0, misses: 0 }
    }
}

impl SampleCache {
    /// `sample`, answered from the cache when this code was classified before.
    pub fn sample(&mut self, cpu: &impl VcpuAccess, long_mode: bool) -> Sample {
        if !long_mode {
            return Sample::Unreadable;
        }
        let (rip, cr3) = (cpu.rip(), cpu.read_field(x86::vmx::vmcs::guest::CR3));
        let Some(gpa) = mmio::translate(cr3, rip, |a| cpu.read_physical_u64(a)) else {
            return Sample::Unreadable;
        };
        let mut bytes = [0u8; 8];
        let in_page = (0x1000 - (rip & 0xFFF) as usize).min(bytes.len());
        if cpu.read_physical(gpa, &mut bytes[..in_page]).is_none() {
            return Sample::Unreadable;
        }
        let bytes_at_rip = u64::from_le_bytes(bytes);
        let slot = &mut self.entries[((rip ^ (rip >> 7) ^ (cr3 >> 12)) as usize) & (CACHE_ENTRIES - 1)];
        if let Some(known) = slot.sample.filter(|_| (slot.cr3, slot.rip, slot.bytes_at_rip) == (cr3, rip, bytes_at_rip))
        {
            self.hits += 1;
            return known;
        }
        self.misses += 1;
        let found = sample(cpu, long_mode);
        if found != Sample::Unreadable {
            *slot = CacheEntry { cr3, rip, bytes_at_rip, sample: Some(found) };
        }
        found
    }
}

/// Whether the instruction at `code[at]` (guest address `rip`) is in a short loop that
/// executes PAUSE. `code[0]` is at `rip - at`.
pub fn in_pause_loop(code: &[u8], at: usize, rip: u64) -> bool {
    // Most samples land in code with no PAUSE anywhere near: skip decoding those (the decoder
    // costs far more than a byte scan).
    if !code.windows(2).any(|w| w == [0xF3, 0x90]) {
        return false;
    }
    let base = rip - at as u64;
    let mut decoder = Decoder::with_ip(64, &code[at..], rip, DecoderOptions::NONE);
    for _ in 0..MAX_FORWARD_INSTRUCTIONS {
        if !decoder.can_decode() {
            return false;
        }
        let instruction = decoder.decode();
        if instruction.is_invalid() {
            return false;
        }
        // A PAUSE ahead on the straight path counts only if a backward branch closes the loop
        // around it: keep looking for that branch.
        match instruction.flow_control() {
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                let target = instruction.near_branch_target();
                let end = instruction.next_ip();
                if target <= rip && end - target <= MAX_LOOP_BYTES && target >= base {
                    return body_has_pause(code, (target - base) as usize, (end - base) as usize, target);
                }
                if instruction.flow_control() == FlowControl::UnconditionalBranch {
                    // A forward jump leaves the straight path: not followed, not a tight loop.
                    return false;
                }
            }
            FlowControl::Next => {}
            // Calls, returns, indirect branches, interrupts: not a tight loop.
            _ => return false,
        }
    }
    false
}

/// Whether the instructions in `code[from..to]` (guest address `ip` at `from`) include PAUSE.
fn body_has_pause(code: &[u8], from: usize, to: usize, ip: u64) -> bool {
    let mut decoder = Decoder::with_ip(64, &code[from..to], ip, DecoderOptions::NONE);
    while decoder.can_decode() {
        let instruction = decoder.decode();
        if instruction.is_invalid() {
            return false;
        }
        if instruction.code() == Code::Pause {
            return true;
        }
    }
    false
}

/// Spinning samples of all samples, in percent, with the half-width of its 95% confidence
/// interval (normal approximation of a binomial proportion), in percentage points.
pub fn spinning_pct(spinning: u64, samples: u64) -> Option<(f64, f64)> {
    if samples == 0 {
        return None;
    }
    let p = spinning as f64 / samples as f64;
    let half_width = 1.96 * newton_sqrt(p * (1.0 - p) / samples as f64);
    Some((100.0 * p, 100.0 * half_width))
}

/// `no_std` has no `f64::sqrt`; Newton's method is exact enough for a confidence interval.
fn newton_sqrt(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let mut r = if x < 1.0 { 1.0 } else { x };
    for _ in 0..40 {
        r = 0.5 * (r + x / r);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu_access::MockVcpu;

    #[test]
    fn samples_come_once_a_period_at_no_fixed_phase_and_together_for_one_seed() {
        let mut clock = SampleClock::new(1_000, 7, 50_000);
        let points: std::vec::Vec<u64> = (50_000..250_000).filter(|&now| clock.take_due(now)).collect();
        assert_eq!(points.len(), 200, "one sample in every period of a vCPU that always runs");
        let intervals: std::vec::Vec<u64> = points.windows(2).map(|w| w[1] - w[0]).collect();
        let mean = intervals.iter().sum::<u64>() / intervals.len() as u64;
        assert!((950..=1_050).contains(&mean), "mean interval {mean}");
        assert!(intervals.iter().all(|&i| i < 2_000));
        // Not one fixed interval: the phase against a 5,000-cycle slot varies.
        let phases: std::collections::BTreeSet<u64> = points.iter().map(|t| (t - 50_000) % 5_000 / 500).collect();
        assert_eq!(phases.len(), 10, "samples land in every tenth of a slot");
        // Another vCPU of the partition (same seed) is sampled at the same moments.
        let mut sibling = SampleClock::new(1_000, 7, 50_000);
        let sibling_points: std::vec::Vec<u64> = (50_000..250_000).filter(|&now| sibling.take_due(now)).collect();
        assert_eq!(points, sibling_points);
        let mut other = SampleClock::new(1_000, 8, 50_000);
        assert_ne!(points, (50_000..250_000).filter(|&now| other.take_due(now)).collect::<std::vec::Vec<_>>());
        // Points that pass while the vCPU is off its pCPU are skipped, in constant time.
        let mut off = SampleClock::new(1_000, 7, 50_000);
        let wait = off.until_due(10_000_000_000);
        assert!((1..2_000).contains(&wait), "{wait}");
        assert!(!off.take_due(10_000_000_000) && off.take_due(10_000_000_000 + wait));
        // Off: never due.
        let mut never = SampleClock::new(0, 7, 0);
        assert!(!never.take_due(u64::MAX - 1) && never.until_due(5) == u64::MAX);
    }

    /// The test guest's barrier wait: `1: mov eax, [rip+x]; cmp eax, edx; je 2f; pause; jmp 1b; 2:`
    const TESTGUEST_LOOP: [u8; 15] = [
        0x8B, 0x05, 0x00, 0x10, 0x00, 0x00, // mov eax, [rip+0x1000]
        0x39, 0xD0, // cmp eax, edx
        0x74, 0x04, // je +4 (out)
        0xF3, 0x90, // pause
        0xEB, 0xF2, // jmp -14 (to the mov)
        0xC3, // ret
    ];

    fn at(code: &[u8], offset: usize) -> bool {
        in_pause_loop(code, offset, 0x40_0000 + offset as u64)
    }

    #[test]
    fn every_instruction_of_a_pause_loop_is_spinning() {
        for offset in [0, 6, 8, 10, 12] {
            assert!(at(&TESTGUEST_LOOP, offset), "offset {offset}");
        }
        assert!(!at(&TESTGUEST_LOOP, 14), "the ret after the loop is not");
    }

    #[test]
    fn loops_without_pause_and_straight_code_are_working() {
        // The same loop with the PAUSE replaced by two NOPs: a busy loop, not a spin-wait.
        let mut busy = TESTGUEST_LOOP;
        busy[10] = 0x90;
        busy[11] = 0x90;
        assert!(!at(&busy, 0));
        // Straight code that reaches a PAUSE but no backward branch: not a loop.
        let straight = [0x48, 0x01, 0xC8, 0xF3, 0x90, 0xC3]; // add rax, rcx; pause; ret
        assert!(!at(&straight, 0));
        // A long loop (body over MAX_LOOP_BYTES) with a PAUSE is computation with a pause.
        let mut long = vec![0x90u8; 200];
        long[0] = 0xF3;
        long[1] = 0x90;
        long.extend_from_slice(&[0xE9, 0x33, 0xFF, 0xFF, 0xFF]); // jmp -205 (to the start)
        assert!(!at(&long, 100));
    }

    #[test]
    fn samples_fetch_user_code_through_the_guest_page_tables() {
        let mut cpu = MockVcpu::with_memory(0x40_0000);
        cpu.identity_paging(0x1000);
        let code_gpa = 0x20_0000 - 4; // the loop straddles a page boundary
        cpu.poke(code_gpa, &TESTGUEST_LOOP);
        cpu.set_rip(code_gpa + 12); // on the jmp
        assert_eq!(sample(&cpu, true), Sample::Spinning);
        cpu.set_rip(code_gpa + 14);
        assert_eq!(sample(&cpu, true), Sample::Working);
        assert_eq!(sample(&cpu, false), Sample::Unreadable, "real and protected mode are not sampled");
        cpu.set_rip(0x7F_0000_0000); // not mapped
        assert_eq!(sample(&cpu, true), Sample::Unreadable);
    }

    #[test]
    fn the_cache_answers_what_a_fresh_sample_would() {
        let mut cpu = MockVcpu::with_memory(0x40_0000);
        cpu.identity_paging(0x1000);
        let code_gpa = 0x20_0000 - 4;
        cpu.poke(code_gpa, &TESTGUEST_LOOP);
        let mut cache = SampleCache::default();
        cpu.set_rip(code_gpa + 12);
        assert_eq!(cache.sample(&cpu, true), Sample::Spinning);
        assert_eq!(cache.sample(&cpu, true), Sample::Spinning);
        assert_eq!((cache.hits, cache.misses), (1, 1));
        // New code at the same address (the PAUSE made a NOP pair): classified again.
        cpu.poke(code_gpa + 10, &[0x90, 0x90, 0xEB, 0xF2]);
        cpu.set_rip(code_gpa + 10);
        assert_eq!(cache.sample(&cpu, true), Sample::Working);
        cpu.poke(code_gpa + 10, &[0xF3, 0x90]);
        assert_eq!(cache.sample(&cpu, true), Sample::Spinning, "the bytes at RIP changed back");
        // Another address space, same RIP, other code: its own entry.
        cpu.fields.insert(x86::vmx::vmcs::guest::CR3, 0x30_0000);
        assert_eq!(cache.sample(&cpu, true), Sample::Unreadable, "no page tables there");
        assert_eq!(cache.sample(&cpu, false), Sample::Unreadable);
        // Unreadable results are never cached.
        cpu.fields.insert(x86::vmx::vmcs::guest::CR3, 0x1000);
        assert_eq!(cache.sample(&cpu, true), Sample::Spinning);
        assert_eq!(cache.hits, 2, "{cache:?}");
    }

    #[test]
    fn the_confidence_interval_narrows_with_samples() {
        assert_eq!(spinning_pct(0, 0), None);
        let (p, w) = spinning_pct(50, 100).unwrap();
        assert!((p - 50.0).abs() < 1e-9 && (w - 9.8).abs() < 0.01, "{w}");
        let (_, w) = spinning_pct(5_000, 10_000).unwrap();
        assert!((w - 0.98).abs() < 0.01, "{w}");
        assert_eq!(spinning_pct(0, 400).unwrap(), (0.0, 0.0));
    }
}
