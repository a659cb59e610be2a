//! Device interrupts, straight to the partition that owns the device. The physical IO-APIC
//! delivers each owned IRQ as its own vector (`config::irq_plan`) to the owner's home pCPU.
//! Wherever it arrives (a guest's external-interrupt exit, or a pCPU idle or between turns) it
//! is latched here, then raised on the owner's virtual IO-APIC pin of the same number, which
//! routes it to a vCPU as the guest programmed the pin; that vCPU's pCPU injects it before its
//! next entry, in the owner's own slot. An interrupt is never delivered to another partition,
//! and one that arrives while its owner is descheduled waits for the owner's next slot.
//!
//! A level-triggered line (a PCI interrupt, or an ISA IRQ the MADT makes level) is masked at
//! the physical IO-APIC when it arrives and unmasked when the owner's guest EOIs the vector
//! its virtual IO-APIC delivered it as (or unmasks a pin it had masked): a line the guest never
//! EOIs stays masked and costs nothing more, and one still asserted at the unmask interrupts
//! again. Latency is measured from arrival to the first entry of a vCPU of the owner holding
//! the vector (requested or in service), split by whether the owner was running on the pCPU
//! the interrupt arrived on.

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use config::irq_plan::{IrqPlan, IrqRoute};
use spin::Mutex;
use vmx::vioapic::Assertion;

/// Latency samples kept per IRQ and case (owner running or not); later ones are counted only.
const SAMPLES: usize = 1024;

/// One owned IRQ's state.
struct IrqState {
    /// Arrivals (physical interrupts taken).
    count: AtomicU64,
    /// TSC of the oldest arrival not yet raised at the owner (0: none).
    arrived: AtomicU64,
    /// Whether the owner was running on the pCPU when that arrival came.
    arrived_owner_running: AtomicBool,
    /// Raised, until a vCPU of the owner enters holding the vector.
    awaiting: Mutex<Option<Awaiting>>,
    /// Arrivals whose pin the guest had masked (lost, as on hardware).
    masked: AtomicU64,
    latencies: Mutex<Latencies>,
    /// The physical IO-APIC entry, once routed at boot; masked from each arrival to the
    /// owner's EOI when level-triggered.
    physical: spin::Once<firmware::platform::IrqRoute>,
    level: AtomicBool,
}

#[derive(Clone, Copy)]
struct Awaiting {
    vector: u8,
    arrived: u64,
    owner_running: bool,
}

/// Latencies of one case: the first `SAMPLES`, how many there were, the largest.
struct Case {
    samples: Vec<u64>,
    count: u64,
    max: u64,
}

impl Case {
    fn new() -> Case {
        Case { samples: Vec::with_capacity(SAMPLES), count: 0, max: 0 }
    }

    fn add(&mut self, cycles: u64) {
        if self.samples.len() < SAMPLES {
            self.samples.push(cycles);
        }
        self.count += 1;
        self.max = self.max.max(cycles);
    }

    /// The sample at `fraction` of the samples, sorted (0 without any).
    fn quantile(&mut self, fraction: f64) -> u64 {
        if !self.samples.is_sorted() {
            self.samples.sort_unstable();
        }
        let index = ((self.samples.len() as f64 * fraction) as usize).min(self.samples.len().saturating_sub(1));
        self.samples.get(index).copied().unwrap_or(0)
    }
}

/// By whether the owner was running on the pCPU the interrupt arrived on.
struct Latencies {
    running: Case,
    descheduled: Case,
}

pub struct DeviceIrqs {
    plan: IrqPlan,
    irqs: Vec<IrqState>,
    /// Per partition: raised IRQs no vCPU has entered with yet (a quick test before entry).
    awaiting_by_partition: Vec<AtomicU64>,
    /// Any route latched and not yet raised (a quick test for the slot loop).
    pending: AtomicBool,
    /// Debug: cycles from an arrival to its raise at the owner (`phalanx.debug.irq_raise_delay_cycles`).
    debug_raise_delay_cycles: u64,
}

impl DeviceIrqs {
    pub fn new(plan: IrqPlan, partitions: usize, debug_raise_delay_cycles: u64) -> DeviceIrqs {
        let irqs = plan
            .routes()
            .iter()
            .map(|_| IrqState {
                count: AtomicU64::new(0),
                arrived: AtomicU64::new(0),
                arrived_owner_running: AtomicBool::new(false),
                awaiting: Mutex::new(None),
                masked: AtomicU64::new(0),
                latencies: Mutex::new(Latencies { running: Case::new(), descheduled: Case::new() }),
                physical: spin::Once::new(),
                level: AtomicBool::new(false),
            })
            .collect();
        DeviceIrqs {
            plan,
            irqs,
            awaiting_by_partition: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            pending: AtomicBool::new(false),
            debug_raise_delay_cycles,
        }
    }

    pub fn routes(&self) -> &[IrqRoute] {
        self.plan.routes()
    }

    /// A physical interrupt arrived as host `vector` at TSC `now` on a pCPU running
    /// `running` (the partition whose guest it stopped, if any): latched for its owner.
    /// Returns the owner, or `None` for a vector that is no device's.
    pub fn arrive(&self, vector: u8, now: u64, running: Option<usize>) -> Option<usize> {
        let index = self.plan.index_of_vector(vector)?;
        let route = self.plan.routes()[index];
        let irq = &self.irqs[index];
        irq.count.fetch_add(1, Ordering::Relaxed);
        // A level line stays masked until its owner is done with it.
        if irq.level.load(Ordering::Relaxed) {
            if let Some(physical) = irq.physical.get() {
                crate::host_irq::set_masked(physical, true);
            }
        }
        // An edge while one is still latched merges with it, as the IO-APIC's IRR would.
        if irq.arrived.compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Acquire).is_ok() {
            irq.arrived_owner_running.store(running == Some(route.partition), Ordering::Release);
        }
        self.pending.store(true, Ordering::Release);
        Some(route.partition)
    }

    /// Raises every latched IRQ at its owner's virtual IO-APIC; `raised(owner, kicks)` for
    /// each (the caller kicks the vCPUs and charges the owner).
    pub fn raise_pending(
        &self,
        partitions: &[crate::partition::Partition],
        mut raised: impl FnMut(usize, vmx::devices::Kicks),
    ) {
        // Read before writing: every pCPU asks on every pass of its slot loop, and a write
        // each time would bounce the line between them.
        if !self.pending.load(Ordering::Acquire) || !self.pending.swap(false, Ordering::AcqRel) {
            return;
        }
        for (index, route) in self.plan.routes().iter().enumerate() {
            let irq = &self.irqs[index];
            let arrived = irq.arrived.swap(0, Ordering::AcqRel);
            if arrived == 0 {
                continue;
            }
            let owner_running = irq.arrived_owner_running.load(Ordering::Acquire);
            if self.debug_raise_delay_cycles > 0 {
                crate::tsc::spin_until(arrived + self.debug_raise_delay_cycles);
            }
            let owner = &partitions[route.partition];
            let result = owner.devices.raise_irq(route.irq as usize);
            match result.assertion {
                Assertion::Masked => {
                    irq.masked.fetch_add(1, Ordering::Relaxed);
                }
                // A level line the guest is still handling: its EOI unmasks the physical line,
                // which interrupts again if the device still holds it.
                Assertion::InService => {}
                Assertion::Delivered { vector, .. } => {
                    let mut awaiting = irq.awaiting.lock();
                    // One still awaited keeps its (earlier) arrival: the two merged in the guest.
                    if awaiting.is_none() {
                        *awaiting = Some(Awaiting { vector, arrived, owner_running });
                        self.awaiting_by_partition[route.partition].fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
            raised(route.partition, result.kicks);
        }
    }

    /// `partition`'s guest is done with the level-triggered lines on its virtual IO-APIC pins
    /// `pins` (bit N: pin N; it EOIed them, or unmasked them): the physical lines behind the
    /// ones it owns are unmasked.
    pub fn level_pins_free(&self, partition: usize, pins: u32) {
        for (index, route) in self.plan.routes().iter().enumerate() {
            let irq = &self.irqs[index];
            if route.partition != partition || route.irq >= 32 || pins & (1 << route.irq) == 0 {
                continue;
            }
            if let (true, Some(physical)) = (irq.level.load(Ordering::Relaxed), irq.physical.get()) {
                crate::host_irq::set_masked(physical, false);
            }
        }
    }

    /// Before vCPU `vcpu` of `partition` enters at TSC `now`: the raised IRQs its virtual
    /// LAPIC now holds (requested, or already in service) have reached the owner.
    pub fn entering(&self, partition: usize, lapic: &vmx::vlapic::VirtualLapic, now: u64) {
        if self.awaiting_by_partition[partition].load(Ordering::Acquire) == 0 {
            return;
        }
        for (index, route) in self.plan.routes().iter().enumerate().filter(|(_, r)| r.partition == partition) {
            let irq = &self.irqs[index];
            let mut awaiting = irq.awaiting.lock();
            let Some(a) = *awaiting else { continue };
            if !lapic.holds(a.vector) {
                continue;
            }
            *awaiting = None;
            self.awaiting_by_partition[route.partition].fetch_sub(1, Ordering::AcqRel);
            let cycles = now.saturating_sub(a.arrived);
            let mut l = irq.latencies.lock();
            if a.owner_running {
                l.running.add(cycles)
            } else {
                l.descheduled.add(cycles)
            }
        }
    }

    /// The `irq_stats` records: per IRQ and case (owner running on the pCPU it arrived on,
    /// or not), how many reached the owner and their latency from arrival to entry.
    pub fn report(&self, partitions: &[crate::partition::Partition]) {
        for (index, route) in self.plan.routes().iter().enumerate() {
            let irq = &self.irqs[index];
            let mut l = irq.latencies.lock();
            let l = &mut *l;
            for (owner_running, case) in [(true, &mut l.running), (false, &mut l.descheduled)] {
                crate::console::Record::new("irq_stats")
                    .str("partition", &partitions[route.partition].name)
                    .u64("irq", route.irq as u64)
                    .u64("vector", route.vector as u64)
                    .u64("pcpu", route.pcpu as u64)
                    .bool("owner_running", owner_running)
                    .u64("count", case.count)
                    .u64("arrivals", irq.count.load(Ordering::Relaxed))
                    .u64("masked", irq.masked.load(Ordering::Relaxed))
                    .u64("latency_median_cycles", case.quantile(0.5))
                    .u64("latency_p99_cycles", case.quantile(0.99))
                    .u64("latency_max_cycles", case.max)
                    .emit();
            }
        }
    }
}

/// At boot, before dispatch: programs the physical IO-APIC for every owned IRQ (its vector,
/// to its pCPU's APIC, edge or level as the MADT gives it) and takes their vectors in root
/// mode too. An IRQ that cannot be routed (no IO-APIC has it) refuses its owner alone, with a
/// fault saying why; its pin stays masked.
pub fn route(platform: &firmware::platform::Platform, machine: &crate::machine::Machine) {
    crate::interrupts::on_device_interrupt(arrived_in_root_mode);
    let irqs = &machine.device_irqs;
    for (index, route) in irqs.routes().iter().enumerate() {
        let apic_id = crate::cpu::apic_id_of(route.pcpu) as u8;
        let pci_line = machine.partitions[route.partition].is_pci_line(route.irq);
        match crate::host_irq::route_owned_irq(platform, route.irq, route.vector, apic_id, pci_line) {
            Ok(physical) => {
                irqs.irqs[index].level.store(crate::host_irq::is_level(&physical), Ordering::Relaxed);
                irqs.irqs[index].physical.call_once(|| physical);
            }
            Err(detail) => {
                let partition = &machine.partitions[route.partition];
                partition.refuse(crate::partition::Fault { vcpu: 0, reason: "unsupported", detail, rip: 0 });
            }
        }
    }
}

/// A device vector taken in root mode (the pCPU idle, or between turns with interrupts on):
/// latched, and this pCPU's slot loop asked to look (it raises it before its next decision).
fn arrived_in_root_mode(vector: u8) {
    let m = crate::machine::machine();
    if m.device_irqs.arrive(vector, crate::tsc::now(), None).is_some() {
        crate::percpu::of(crate::cpu::current_index()).attention.store(true, Ordering::Release);
    } else {
        log::warn!("unexpected interrupt vector {vector:#x}");
    }
}

/// Raises what arrived at the owners' virtual IO-APICs and kicks the vCPUs it is routed to;
/// `charge(owner, from, to)` is told the cycles each owner's share took.
pub fn deliver(mut charge: impl FnMut(usize, u64, u64)) {
    let m = crate::machine::machine();
    let mut from = crate::tsc::now();
    m.device_irqs.raise_pending(&m.partitions, |owner, kicks| {
        for target in kicks.iter() {
            crate::pcpu::kick(owner, target);
        }
        let to = crate::tsc::now();
        charge(owner, from, to);
        from = to;
    });
}
