//! Phase changes at run time: the dispatch tables in force, the next ones once published,
//! and what each pCPU reports of its switch. The control channel (`control`, on pCPU 0)
//! builds new tables off the slot path and publishes them with a release time on a frame
//! boundary (`sched::Epoch::successor`); every pCPU's slot loop, when it passes a slot
//! boundary, compares it with the published release (one atomic load, no lock, no message)
//! and starts the new tables there from its own timer (`slot_loop`).

extern crate alloc;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use sched::Epoch;
use spin::Mutex;

use crate::percpu::SlotEntry;

/// What one epoch asked of each partition, for the per-epoch share records.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    pub number: u32,
    pub release: u64,
    /// Per partition: its reservation in words, and the share of each of its pCPUs it was
    /// promised (ppm; soft partitions: what the planner set aside for them).
    pub reservations: Vec<alloc::string::String>,
    pub requested_ppm: Vec<u64>,
}

/// Who asked for a change and what it was, kept with it until it is reported.
#[derive(Debug, Clone)]
pub struct ChangeOrigin {
    /// A control-channel request (its tag and text: the reply goes there); `None` for a
    /// manager partition's hypercall.
    pub reply_to: Option<(Option<u64>, alloc::string::String)>,
    /// `control`, or the manager partition's name.
    pub requester: alloc::string::String,
    pub node: alloc::string::String,
    /// The new reservation, in words.
    pub reservation: alloc::string::String,
    pub epoch: u32,
    pub release: u64,
    /// When the request arrived, and what checking and planning it took.
    pub request: u64,
    pub build_cycles: u64,
}

pub struct Phases {
    current: Mutex<Arc<Epoch>>,
    pending: Mutex<Option<Arc<Epoch>>>,
    /// The pending epoch's release and number (`u64::MAX`, 0: none pending).
    pending_release: AtomicU64,
    pending_number: AtomicU32,
    /// pCPUs that have started the pending epoch.
    switched: AtomicUsize,
    plans: Mutex<Vec<EpochPlan>>,
    /// The last change published, until pCPU 0 has reported it.
    unreported: Mutex<Option<ChangeOrigin>>,
}

/// One pCPU's switch into an epoch: how late after the release it noticed it, what the
/// switch cost, and its first frame's slot entries (gang skew right after the switch).
#[derive(Debug, Clone)]
pub struct SwitchReport {
    pub epoch: u32,
    /// From the release to this pCPU passing it (the boundary's timer latency, or longer when
    /// the pCPU was held up).
    pub late: u64,
    /// It started the new tables within their first slot on it.
    pub on_time: bool,
    /// From passing the release to the new tables in force.
    pub cycles: u64,
    pub first_frame: Vec<SlotEntry>,
    /// Its first frame in the new epoch is over (`first_frame` is complete).
    pub first_frame_done: bool,
}

impl SwitchReport {
    pub const EMPTY: SwitchReport =
        SwitchReport { epoch: 0, late: 0, on_time: false, cycles: 0, first_frame: Vec::new(), first_frame_done: false };

    /// The pCPU started `epoch` `late` cycles after its release.
    pub fn switched(epoch: u32, late: u64, on_time: bool) -> SwitchReport {
        SwitchReport { epoch, late, on_time, ..SwitchReport::EMPTY }
    }

    /// Its first frame in the epoch is over: the slot entries it made in it.
    pub fn first_frame_over(&mut self, entries: Vec<SlotEntry>) {
        self.first_frame = entries;
        self.first_frame_done = true;
    }
}

impl Phases {
    pub fn new(first: Epoch, plan: EpochPlan) -> Phases {
        Phases {
            current: Mutex::new(Arc::new(first)),
            pending: Mutex::new(None),
            pending_release: AtomicU64::new(u64::MAX),
            pending_number: AtomicU32::new(0),
            switched: AtomicUsize::new(0),
            plans: Mutex::new(alloc::vec![plan]),
            unreported: Mutex::new(None),
        }
    }

    /// The epoch in force (once every pCPU has switched to the last one published).
    pub fn current(&self) -> Arc<Epoch> {
        self.current.lock().clone()
    }

    /// Slot path: a pCPU running epoch `running` has passed the boundary `boundary`; the
    /// epoch it starts there, if one is released by then. One atomic load unless one is.
    #[inline]
    pub fn due(&self, running: u32, boundary: u64) -> Option<Arc<Epoch>> {
        if boundary < self.pending_release.load(Ordering::Acquire)
            || self.pending_number.load(Ordering::Acquire) <= running
        {
            return None;
        }
        let next = self.pending.lock().clone()?;
        next.starts_at(boundary).then_some(next)
    }

    /// A pCPU has started the pending epoch.
    pub fn note_switched(&self) {
        self.switched.fetch_add(1, Ordering::AcqRel);
    }

    /// Publishes `tables` as the next epoch, released at the first frame boundary at least
    /// `lead` from now (taken here, right before the stores: whatever the caller spent
    /// building them cannot eat into the lead). Returns the epoch's number and release;
    /// `None` while another change is pending (changes go in one at a time).
    pub fn publish(
        &self,
        tables: sched::DispatchTables,
        lead: u64,
        mut plan: EpochPlan,
        mut origin: ChangeOrigin,
    ) -> Option<(u32, u64)> {
        let mut pending = self.pending.lock();
        let mut unreported = self.unreported.lock();
        if pending.is_some() || unreported.is_some() {
            return None;
        }
        let next = self.current().successor(tables, crate::tsc::now(), lead);
        let (number, release) = (next.number, next.release);
        self.switched.store(0, Ordering::Release);
        *pending = Some(Arc::new(next));
        // The number before the release: a pCPU that sees the release sees the number.
        self.pending_number.store(number, Ordering::Release);
        self.pending_release.store(release, Ordering::Release);
        drop(pending);
        (origin.epoch, origin.release) = (number, release);
        *unreported = Some(origin);
        (plan.number, plan.release) = (number, release);
        self.plans.lock().push(plan);
        Some((number, release))
    }

    /// Once all `cpus` pCPUs have switched, the pending epoch is the current one; `true` then.
    pub fn settle(&self, cpus: usize) -> bool {
        if self.switched.load(Ordering::Acquire) < cpus {
            return false;
        }
        let mut pending = self.pending.lock();
        let Some(next) = pending.take() else { return false };
        self.pending_release.store(u64::MAX, Ordering::Release);
        *self.current.lock() = next;
        true
    }

    /// The change published and not yet reported.
    pub fn unreported(&self) -> Option<ChangeOrigin> {
        self.unreported.lock().clone()
    }

    /// Its report is written: the next change may be published.
    pub fn mark_reported(&self) {
        *self.unreported.lock() = None;
    }

    /// What every epoch so far asked of the partitions, in order.
    pub fn plans(&self) -> Vec<EpochPlan> {
        self.plans.lock().clone()
    }
}
