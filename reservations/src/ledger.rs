//! Cycle accounting: every TSC cycle a pCPU spends belongs to exactly one account.
//!
//! The hypervisor calls [`Ledger::charge`] with each stretch of work as it measured it
//! (`[from, to)` in TSC cycles, stamped where the work began and ended) and
//! [`Ledger::close`] with its own reading of the end of the run. A hole between two charges
//! (work nobody stamped: an interrupt handler, console output between stretches), an interval
//! claimed twice or a charge to an account that does not exist is never silently absorbed; it
//! is counted as unaccounted (or overlapping) time, so "unaccounted time is a bug with a
//! number". Invariant, checked by the tests: `charged() + unaccounted() == elapsed()`.

use alloc::vec::Vec;

use crate::flat::PartitionId;

/// Hypervisor work done on a partition's behalf and charged to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// From VM exit to VM entry, handling the partition's exit.
    ExitHandling,
    /// Taking a device interrupt the partition owns and routing it to its virtual APIC.
    IrqDemux,
    /// Switching the pCPU to the partition at the start of its slot (loading its vCPU):
    /// taken out of the partition's own slot, so charged to it.
    SlotSwitch,
}

/// Who a stretch of cycles belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    /// The partition's guest code ran (VMX non-root).
    Guest(PartitionId),
    /// The hypervisor worked for the partition.
    OnBehalf(PartitionId, Work),
    /// No partition had the pCPU (empty slot, all vCPUs halted, before the first slot).
    Idle,
    /// The hypervisor's own work: slot switches, timer handling, statistics.
    Overhead,
}

/// How a charge fitted onto the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiling {
    /// It started exactly where the previous charge ended.
    Exact,
    /// It started `cycles` after the previous charge ended; the hole is unaccounted.
    Gap { cycles: u64 },
    /// It started `cycles` before the previous charge ended; those cycles were already
    /// charged and are not charged again.
    Overlap { cycles: u64 },
    /// `to < from`: nothing charged.
    Backwards,
    /// The partition id is not in this ledger; the cycles are unaccounted.
    UnknownAccount,
}

/// One partition's accounts and event counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionStats {
    pub guest_cycles: u64,
    pub exit_handling_cycles: u64,
    pub irq_demux_cycles: u64,
    pub slot_switch_cycles: u64,
    pub exits: u64,
    pub irqs: u64,
    pub pause_loop_exits: u64,
    /// Spin-wait samples of its vCPUs (the guest's code looked at, at regular guest-time
    /// intervals) and how many found a vCPU in a PAUSE loop.
    pub spin_samples: u64,
    pub spin_samples_spinning: u64,
    /// The samples taken while the sampled vCPU's measurement window was open (the guest
    /// opens it around the stretch it measures itself: `HYPERCALL_SPIN_WINDOW`).
    pub window_spin_samples: u64,
    pub window_spin_samples_spinning: u64,
    /// Inside the vCPUs' measurement windows: guest cycles, the exits that ended them and the
    /// cycles spent handling those exits (what the guest's measured stretch cost in exits).
    pub window_guest_cycles: u64,
    pub window_exits: u64,
    pub window_exit_handling_cycles: u64,
    pub slots: u64,
}

impl PartitionStats {
    /// Hypervisor cycles spent on the partition's behalf.
    pub fn on_behalf_cycles(&self) -> u64 {
        self.exit_handling_cycles + self.irq_demux_cycles + self.slot_switch_cycles
    }

    /// Everything charged to the partition: its guest time plus work done for it.
    pub fn charged_cycles(&self) -> u64 {
        self.guest_cycles + self.on_behalf_cycles()
    }

    fn add(&mut self, other: &PartitionStats) {
        self.guest_cycles += other.guest_cycles;
        self.exit_handling_cycles += other.exit_handling_cycles;
        self.irq_demux_cycles += other.irq_demux_cycles;
        self.slot_switch_cycles += other.slot_switch_cycles;
        self.exits += other.exits;
        self.irqs += other.irqs;
        self.pause_loop_exits += other.pause_loop_exits;
        self.spin_samples += other.spin_samples;
        self.spin_samples_spinning += other.spin_samples_spinning;
        self.window_spin_samples += other.window_spin_samples;
        self.window_spin_samples_spinning += other.window_spin_samples_spinning;
        self.window_guest_cycles += other.window_guest_cycles;
        self.window_exits += other.window_exits;
        self.window_exit_handling_cycles += other.window_exit_handling_cycles;
        self.slots += other.slots;
    }
}

/// One pCPU's accounts. Allocates once at creation; charging never allocates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    pcpu: u32,
    start_tsc: u64,
    cursor_tsc: u64,
    partitions: Vec<PartitionStats>,
    idle_cycles: u64,
    overhead_cycles: u64,
    gap_cycles: u64,
    misdirected_cycles: u64,
    overlap_cycles: u64,
    tiling_faults: u64,
}

impl Ledger {
    /// A ledger for `pcpu` with accounts for partitions `0..partitions`, starting at `start_tsc`.
    pub fn new(pcpu: u32, partitions: usize, start_tsc: u64) -> Ledger {
        Ledger {
            pcpu,
            start_tsc,
            cursor_tsc: start_tsc,
            partitions: alloc::vec![PartitionStats::default(); partitions],
            idle_cycles: 0,
            overhead_cycles: 0,
            gap_cycles: 0,
            misdirected_cycles: 0,
            overlap_cycles: 0,
            tiling_faults: 0,
        }
    }

    pub fn pcpu(&self) -> u32 {
        self.pcpu
    }

    /// Where the next charge is expected to start.
    pub fn cursor_tsc(&self) -> u64 {
        self.cursor_tsc
    }

    /// Charges `[from_tsc, to_tsc)` to `account` and says how it fitted.
    pub fn charge(&mut self, account: Account, from_tsc: u64, to_tsc: u64) -> Tiling {
        if to_tsc < from_tsc {
            self.tiling_faults += 1;
            return Tiling::Backwards;
        }
        let mut tiling = Tiling::Exact;
        let mut from = from_tsc;
        if from > self.cursor_tsc {
            let cycles = from - self.cursor_tsc;
            self.gap_cycles += cycles;
            tiling = Tiling::Gap { cycles };
        } else if from < self.cursor_tsc {
            let cycles = to_tsc.min(self.cursor_tsc) - from;
            self.overlap_cycles += cycles;
            tiling = Tiling::Overlap { cycles };
            from = self.cursor_tsc.min(to_tsc);
        }
        if tiling != Tiling::Exact {
            self.tiling_faults += 1;
        }
        let cycles = to_tsc - from;
        self.cursor_tsc = self.cursor_tsc.max(to_tsc);
        let slot = match account {
            Account::Idle => &mut self.idle_cycles,
            Account::Overhead => &mut self.overhead_cycles,
            Account::Guest(id) | Account::OnBehalf(id, _) => match self.partitions.get_mut(id as usize) {
                None => {
                    self.misdirected_cycles += cycles;
                    self.tiling_faults += 1;
                    return Tiling::UnknownAccount;
                }
                Some(stats) => match account {
                    Account::OnBehalf(_, Work::ExitHandling) => &mut stats.exit_handling_cycles,
                    Account::OnBehalf(_, Work::IrqDemux) => &mut stats.irq_demux_cycles,
                    Account::OnBehalf(_, Work::SlotSwitch) => &mut stats.slot_switch_cycles,
                    _ => &mut stats.guest_cycles,
                },
            },
        };
        *slot += cycles;
        tiling
    }

    /// The pCPU's own reading of the end of its run: elapsed time runs to here, and whatever
    /// followed the last charge is unaccounted. Charges after it are overlaps.
    pub fn close(&mut self, end_tsc: u64) {
        if end_tsc > self.cursor_tsc {
            self.gap_cycles += end_tsc - self.cursor_tsc;
            self.tiling_faults += 1;
            self.cursor_tsc = end_tsc;
        }
    }

    /// Counts one VM exit of `id` (its handling time is charged separately).
    pub fn note_exit(&mut self, id: PartitionId) {
        if let Some(s) = self.partitions.get_mut(id as usize) {
            s.exits += 1;
        }
    }

    /// A stretch of `id`'s guest time that ended in an exit, and the handling of the exit
    /// before it, both inside the vCPU's measurement window (already charged by `charge`;
    /// counted again here by window).
    pub fn note_window_stretch(&mut self, id: PartitionId, guest_cycles: u64, previous_exit_handling_cycles: u64) {
        if let Some(s) = self.partitions.get_mut(id as usize) {
            s.window_guest_cycles += guest_cycles;
            s.window_exits += 1;
            s.window_exit_handling_cycles += previous_exit_handling_cycles;
        }
    }

    /// Counts one device interrupt delivered to `id`.
    pub fn note_irq(&mut self, id: PartitionId) {
        if let Some(s) = self.partitions.get_mut(id as usize) {
            s.irqs += 1;
        }
    }

    /// Counts one PAUSE-loop exit of `id` (a vCPU spinning, likely on a descheduled sibling).
    pub fn note_pause_loop_exit(&mut self, id: PartitionId) {
        if let Some(s) = self.partitions.get_mut(id as usize) {
            s.pause_loop_exits += 1;
        }
    }

    /// Counts one spin-wait sample of a vCPU of `id`, taken inside that vCPU's measurement
    /// window or not.
    pub fn note_spin_sample(&mut self, id: PartitionId, spinning: bool, in_window: bool) {
        if let Some(s) = self.partitions.get_mut(id as usize) {
            s.spin_samples += 1;
            s.spin_samples_spinning += spinning as u64;
            s.window_spin_samples += in_window as u64;
            s.window_spin_samples_spinning += (in_window && spinning) as u64;
        }
    }

    /// Counts one slot given to `id` on this pCPU.
    pub fn note_slot(&mut self, id: PartitionId) {
        if let Some(s) = self.partitions.get_mut(id as usize) {
            s.slots += 1;
        }
    }

    pub fn partition(&self, id: PartitionId) -> Option<&PartitionStats> {
        self.partitions.get(id as usize)
    }

    pub fn partitions(&self) -> &[PartitionStats] {
        &self.partitions
    }

    pub fn idle_cycles(&self) -> u64 {
        self.idle_cycles
    }

    pub fn overhead_cycles(&self) -> u64 {
        self.overhead_cycles
    }

    /// Cycles from the start to the end of the last charge, or to `close`.
    pub fn elapsed(&self) -> u64 {
        self.cursor_tsc - self.start_tsc
    }

    /// Cycles charged to some account (each at most once).
    pub fn charged(&self) -> u64 {
        self.partitions.iter().map(PartitionStats::charged_cycles).sum::<u64>()
            + self.idle_cycles
            + self.overhead_cycles
    }

    /// Cycles nobody was charged for: holes between charges and charges to unknown accounts.
    pub fn unaccounted(&self) -> u64 {
        self.gap_cycles + self.misdirected_cycles
    }

    /// Cycles that were claimed a second time (and not charged again).
    pub fn overlap_cycles(&self) -> u64 {
        self.overlap_cycles
    }

    /// Number of charges that did not tile exactly.
    pub fn tiling_faults(&self) -> u64 {
        self.tiling_faults
    }
}

/// All pCPUs' ledgers summed: the per-partition statistics the hypervisor reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineStats {
    pub partitions: Vec<PartitionStats>,
    pub idle_cycles: u64,
    pub overhead_cycles: u64,
    pub unaccounted_cycles: u64,
    pub overlap_cycles: u64,
    pub tiling_faults: u64,
    /// Sum over pCPUs of their elapsed cycles.
    pub elapsed_cycles: u64,
}

impl MachineStats {
    pub fn from_ledgers(ledgers: &[Ledger]) -> MachineStats {
        let count = ledgers.iter().map(|l| l.partitions.len()).max().unwrap_or(0);
        let mut stats =
            MachineStats { partitions: alloc::vec![PartitionStats::default(); count], ..MachineStats::default() };
        for ledger in ledgers {
            for (total, part) in stats.partitions.iter_mut().zip(&ledger.partitions) {
                total.add(part);
            }
            stats.idle_cycles += ledger.idle_cycles;
            stats.overhead_cycles += ledger.overhead_cycles;
            stats.unaccounted_cycles += ledger.unaccounted();
            stats.overlap_cycles += ledger.overlap_cycles;
            stats.tiling_faults += ledger.tiling_faults;
            stats.elapsed_cycles += ledger.elapsed();
        }
        stats
    }

    /// Unaccounted cycles in parts per billion of all elapsed cycles (Vortex reports 40 ppb).
    pub fn unaccounted_ppb(&self) -> u64 {
        if self.elapsed_cycles == 0 {
            return 0;
        }
        (self.unaccounted_cycles as u128 * 1_000_000_000 / self.elapsed_cycles as u128) as u64
    }

    /// A partition's charged cycles in parts per million of all elapsed cycles.
    pub fn share_ppm(&self, id: PartitionId) -> u64 {
        match (self.partitions.get(id as usize), self.elapsed_cycles) {
            (Some(p), e) if e > 0 => (p.charged_cycles() as u128 * 1_000_000 / e as u128) as u64,
            _ => 0,
        }
    }
}
