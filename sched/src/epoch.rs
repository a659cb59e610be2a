//! Phase changes: dispatch tables replaced while the machine runs, every pCPU switching at one
//! major-frame boundary without a message between them. A change is an [`Epoch`]: new tables
//! and the release time from which they run, chosen on a frame boundary of the tables in
//! force far enough ahead that every pCPU has seen it published before it gets there. Each
//! pCPU, when it passes a slot boundary, compares that boundary with the pending release
//! ([`Epoch::starts_at`]) and starts the new tables' dispatcher there, phase-locked to the
//! release as the first tables were to `t0`: the boot-time phase lock, repeated.

use crate::dispatch::{DispatchTables, PcpuDispatcher};
use crate::spec::Tick;

/// Tables in force from `release` (a boundary where every pCPU's slot ends) on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    /// 0 for the tables the machine started with, then one more per change.
    pub number: u32,
    pub tables: DispatchTables,
    pub release: Tick,
}

impl Epoch {
    pub fn first(tables: DispatchTables, t0: Tick) -> Epoch {
        Epoch { number: 0, tables, release: t0 }
    }

    /// The first major-frame boundary of this epoch at or after `at` (the release before it).
    pub fn frame_boundary_at_or_after(&self, at: Tick) -> Tick {
        if at <= self.release {
            return self.release;
        }
        let frame = self.tables.frame.max(1);
        self.release + (at - self.release).div_ceil(frame) * frame
    }

    /// The epoch that follows this one with `tables`, published at `now`: released at the
    /// first frame boundary at least `lead` later (`lead` covers the longest a pCPU can go
    /// without looking: a slot, and the time a store takes to be seen).
    pub fn successor(&self, tables: DispatchTables, now: Tick, lead: Tick) -> Epoch {
        Epoch { number: self.number + 1, tables, release: self.frame_boundary_at_or_after(now + lead) }
    }

    /// Whether a pCPU that has just passed the slot boundary `boundary` (the deadline of its
    /// slot) starts this epoch there. Every pCPU's slots end at each frame boundary, so each
    /// passes `release` itself: none skips it, none starts early.
    pub fn starts_at(&self, boundary: Tick) -> bool {
        boundary >= self.release
    }

    /// `pcpu`'s dispatcher for this epoch, phase-locked to its release.
    pub fn dispatcher(&self, pcpu: usize) -> PcpuDispatcher<'_> {
        self.tables.dispatcher(pcpu, self.release)
    }
}
