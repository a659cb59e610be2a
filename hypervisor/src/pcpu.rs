//! One pCPU's dispatch state: its vCPUs (each homed here for the whole run), the ledger it
//! charges, its exit and slot statistics; and the kick with which a sibling raises another
//! pCPU's attention flag (`percpu`) when it posts one of that pCPU's vCPUs an IPI or a start-up.

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use reservations::trace::{Event, EventKind};
use reservations::{Account, Ledger, Work};
use sched::VcpuRef;
use vmx::spin_sample::SampleClock;

use crate::machine::machine;
use crate::partition::{Fault, Partition};
use crate::percpu::{EpochMark, ExitStat, SlotEntry, EXIT_REASONS};
use crate::vcpu::Vcpu;
use crate::vectors::KICK_VECTOR;

/// Most slot entries each pCPU remembers for the skew statistics.
pub const MAX_SLOT_ENTRIES: usize = 8192;

/// One pCPU's state while it dispatches (owned by its slot loop).
pub struct Pcpu {
    /// Its pCPU number.
    pub cpu: usize,
    pub vcpus: Vec<Vcpu>,
    /// The vCPU whose VMCS is current on this pCPU.
    pub loaded: Option<usize>,
    pub ledger: Ledger,
    pub exits: [ExitStat; EXIT_REASONS],
    /// Per partition, by reason: the exits inside its vCPUs' measurement windows (what is
    /// left of a workload's exits, and what each kind costs it).
    pub window_exits: Vec<[ExitStat; EXIT_REASONS]>,
    /// The preemption-timer exits that took a spin-wait sample, and their cost.
    pub spin_sample: ExitStat,
    pub slot_entries: Vec<SlotEntry>,
    pub guard_exits: u64,
    pub yields: u64,
    pub preemption_shift: u8,
    /// Its accounts at each switch of dispatch tables (the share of each epoch).
    pub epoch_marks: Vec<EpochMark>,
    /// After a switch: the slot entries of the first frame, until the frame's end.
    first_frame: Option<(u64, Vec<SlotEntry>)>,
}

impl Pcpu {
    /// pCPU `cpu` with the vCPUs homed on it, each set up to enter (charging starts at `t0`).
    pub fn new(cpu: usize, t0: u64) -> Pcpu {
        let m = machine();
        let mut vcpus = Vec::new();
        // VPIDs are unique across the machine: 1 + the vCPU's position in the whole config.
        let mut vpid = 1u16;
        for (p, homes) in m.homes.iter().enumerate() {
            for (i, &home) in homes.iter().enumerate() {
                if home == cpu {
                    let mut v = Vcpu::new(p, i as u32, vpid, &m.controls.caps);
                    // One seed per partition: its vCPUs are sampled at the same moments.
                    v.sample_clock = SampleClock::new(m.spin_sample_cycles, p as u64, m.schedule.t0);
                    set_up(&mut v, &m.partitions[p], &m.partitions[p].initial_states[i]);
                    vcpus.push(v);
                }
                vpid += 1;
            }
        }
        Pcpu {
            cpu,
            loaded: None,
            vcpus,
            ledger: Ledger::new(cpu as u32, m.partitions.len(), t0),
            exits: [ExitStat::default(); EXIT_REASONS],
            window_exits: alloc::vec![[ExitStat::default(); EXIT_REASONS]; m.partitions.len()],
            spin_sample: ExitStat::default(),
            slot_entries: Vec::with_capacity(MAX_SLOT_ENTRIES),
            guard_exits: 0,
            yields: 0,
            preemption_shift: m.controls.caps.features().preemption_timer_shift,
            epoch_marks: Vec::new(),
            first_frame: None,
        }
    }

    /// The first VM entry of a partition's vCPU in its own slot (gang skew, entry latency).
    pub fn note_slot_entry(&mut self, entry: SlotEntry) {
        if self.slot_entries.len() < MAX_SLOT_ENTRIES {
            self.slot_entries.push(entry);
        }
        if let Some((until, entries)) = &mut self.first_frame {
            if entry.slot_start < *until {
                entries.push(entry);
            }
        }
    }

    /// Starting epoch `epoch` at `boundary`: its accounts there, and its first frame watched.
    pub fn mark_epoch(&mut self, epoch: u32, boundary: u64, frame: u64) {
        let charged = self.ledger.partitions().iter().map(|p| p.charged_cycles()).collect();
        self.epoch_marks.push(EpochMark { epoch, charged });
        self.first_frame = Some((boundary + frame, Vec::new()));
    }

    /// A slot boundary passed: the first frame after a switch may be over (reported then).
    #[inline]
    pub fn passed_boundary(&mut self, boundary: u64) {
        if self.first_frame.as_ref().is_some_and(|(until, _)| boundary >= *until) {
            let (_, entries) = self.first_frame.take().expect("checked");
            crate::percpu::of(self.cpu).phase_switch.lock().first_frame_over(entries);
        }
    }

    /// Charges one stretch of work, stamped where it began and ended (`[from, to)`). Time
    /// between stretches that no stamp covers stays unaccounted in the ledger.
    pub fn charge(&mut self, account: Account, from: u64, to: u64) {
        self.ledger.charge(account, from, to);
    }

    /// An exit for `reason` of a vCPU of `partition`: counted per pCPU, and per partition as
    /// well when it came inside the vCPU's measurement window (`in_window`, read once per exit
    /// by the caller, which reads it anyway: this sits on every exit's path).
    #[inline]
    pub fn note_exit_reason(&mut self, partition: usize, reason: usize, in_window: bool) {
        self.exits[reason].count += 1;
        if in_window {
            self.window_exits[partition][reason].count += 1;
        }
    }

    /// Handling that exit took `cycles` (VM exit to the next entry, or to the end of the
    /// turn), counted where the exit itself was.
    #[inline]
    pub fn note_exit_handled(&mut self, partition: usize, reason: usize, in_window: bool, cycles: u64) {
        self.exits[reason].cycles += cycles;
        if in_window {
            self.window_exits[partition][reason].cycles += cycles;
        }
    }

    /// Records an event of this pCPU's vCPU `index` in its trace.
    #[inline]
    pub fn trace(&self, kind: EventKind, tsc: u64, index: usize, arg: u32) {
        if !crate::trace::enabled() {
            return;
        }
        let v = &self.vcpus[index];
        crate::trace::record(self.cpu, Event::new(kind, tsc, v.partition as u16, v.index as u8, arg));
    }

    pub fn find(&self, v: VcpuRef) -> Option<usize> {
        self.vcpus.iter().position(|x| x.partition == v.partition as usize && x.index == v.vcpu)
    }

    pub fn runnable(&self, v: VcpuRef) -> bool {
        let m = machine();
        let partition = &m.partitions[v.partition as usize];
        self.find(v).is_some_and(|i| !self.vcpus[i].halted && !partition.is_stopped())
            && partition.devices.is_started(v.vcpu)
            && !m.skew_bound.is_some_and(|bound| partition.co_stopped(v.vcpu, bound))
    }

    /// Starts vCPUs a sibling sent a start-up IPI: their VMCS is set up again, on this pCPU,
    /// in real mode at the vector's page.
    pub fn follow_starts(&mut self) {
        let m = machine();
        for index in 0..self.vcpus.len() {
            let v = &mut self.vcpus[index];
            let partition = &m.partitions[v.partition];
            if let Some(vector) = partition.devices.take_startup(v.index) {
                if set_up(v, partition, &firmware::linux::startup_ipi_state(vector)) {
                    self.loaded = Some(index);
                }
            }
        }
    }

    /// A halted vCPU becomes runnable again when its virtual LAPIC has something to deliver
    /// (its timer came due, or a sibling sent an IPI).
    pub fn wake_halted(&mut self, now: u64) {
        let m = machine();
        for v in self.vcpus.iter_mut().filter(|v| v.halted) {
            if v.interrupt_due(&m.partitions[v.partition].devices, now) {
                v.halted = false;
            }
        }
    }

    /// In a slot of `partition`: parks this pCPU's vCPUs of it if it waits for a reset, and
    /// sets them up again (on this pCPU) once it was reset. Done only in the partition's own
    /// slots and charged to it, so a reset takes no time from anyone else: the switch into
    /// its slot since `switch_start`, then the reset work. Returns where the switch goes on.
    pub fn follow_resets(&mut self, partition_id: usize, switch_start: u64) -> u64 {
        let m = machine();
        let partition = &m.partitions[partition_id];
        let generation = partition.generation.load(Ordering::Acquire);
        let current = self.vcpus.iter().all(|v| v.partition != partition_id || v.generation == generation);
        if current && !partition.reset_pending() && !partition.fault_unreported() {
            return switch_start;
        }
        let start = crate::tsc::now();
        partition.report_fault();
        for index in 0..self.vcpus.len() {
            let v = &mut self.vcpus[index];
            if v.partition != partition_id {
                continue;
            }
            let partition = &m.partitions[v.partition];
            partition.park_for_reset(&mut v.parked_generation);
            let generation = partition.generation.load(Ordering::Acquire);
            if v.generation != generation && !partition.is_stopped() {
                v.generation = generation;
                crate::trace::record(
                    self.cpu,
                    Event::new(EventKind::Reset, start, partition_id as u16, v.index as u8, 0),
                );
                if set_up(v, partition, &partition.initial_states[v.index as usize]) {
                    self.loaded = Some(index);
                }
            }
        }
        let id = partition_id as reservations::PartitionId;
        self.charge(Account::OnBehalf(id, Work::SlotSwitch), switch_start, start);
        let end = crate::tsc::now();
        self.charge(Account::OnBehalf(id, Work::ExitHandling), start, end);
        end
    }
}

/// Sets `v` up to enter in `state`; a VMCS that fails the VM-entry checks stops the partition
/// with a fault naming the field. `true` when the vCPU's VMCS is now current.
fn set_up(v: &mut Vcpu, partition: &Partition, state: &firmware::longmode::VcpuState) -> bool {
    let m = machine();
    match v.setup(&m.controls, &partition.context, state, m.force_interrupts_on) {
        Ok(()) => true,
        Err(failure) => {
            let fault =
                Fault { vcpu: v.index, reason: "vm-entry-check", detail: alloc::format!("{failure}"), rip: state.rip };
            partition.refuse(fault);
            false
        }
    }
}

/// Makes the pCPU that runs `vcpu` of `partition` look at it now (a host IPI: its guest exits
/// or its idle loop wakes).
pub fn kick(partition: usize, vcpu: u32) {
    let home = machine().homes[partition][vcpu as usize];
    crate::trace::record_here(EventKind::Kick, partition, vcpu, home as u32);
    crate::percpu::of(home).attention.store(true, Ordering::Release);
    if home != crate::cpu::current_index() {
        crate::apic::send_fixed(crate::cpu::apic_id_of(home), KICK_VECTOR);
    }
}

/// Whether a sibling asked this pCPU to look at its vCPUs since the last time (cleared).
pub fn take_attention(cpu: usize) -> bool {
    crate::percpu::of(cpu).attention.swap(false, Ordering::AcqRel)
}
