//! The rules a pCPU's slot loop follows between turns, around its `PcpuDispatcher`: a slot
//! owner that wakes up takes its slot back from slack (unless it gave the slot away itself);
//! a slot whose owner cannot run is lent; a turn that ends before the boundary (halt, stop,
//! yield) lends the rest of the slot; a yield that finds no slack gives the pCPU to another
//! runnable vCPU homed there (directed yield, as a KVM host's `yield_to` does). Pure and
//! host-tested: the bare-metal slot loop calls it with the TSC, tests with plain numbers.

use crate::dispatch::{Decision, PcpuDispatcher, VcpuRef};
use crate::spec::Tick;

/// How a vCPU's turn on the pCPU ended (what the loop tells the rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEnd {
    /// The slot boundary came.
    Deadline,
    /// The vCPU halted until its next interrupt.
    Halted,
    /// Its partition was stopped.
    Stopped,
    /// It spun and gives the rest of the slot away (`independent-yield`).
    Yielded,
}

/// A pCPU's dispatcher with the decision in force and what the rules remember of the slot.
#[derive(Debug, Clone)]
pub struct SlotTurns<'t> {
    dispatcher: PcpuDispatcher<'t>,
    decision: Decision,
    slot_start: Tick,
    /// No turn has run in this slot yet (gang skew is measured at a slot's first entry).
    slot_fresh: bool,
    /// The owner gave the rest of this slot away: it does not take it back.
    yielded_slot: bool,
}

impl<'t> SlotTurns<'t> {
    /// The dispatcher released at `release` (its `t0`, the first slot's start), asked first
    /// at `now` (at or just after it).
    pub fn start(mut dispatcher: PcpuDispatcher<'t>, release: Tick, now: Tick) -> Self {
        let decision = dispatcher.on_boundary(now);
        SlotTurns { dispatcher, decision, slot_start: release, slot_fresh: true, yielded_slot: false }
    }

    /// The decision in force.
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// The current slot's owner (`None` in a slot nobody owns).
    pub fn owner(&self) -> Option<VcpuRef> {
        self.dispatcher.owner_decision().run
    }

    /// A host policy layered over these rules puts `d` in force until the boundary or the next
    /// rule (the simulator's models of other hosts: KVM's directed yield, VMware's co-start).
    /// Phalanx's own slot loop never calls it.
    pub fn run_instead(&mut self, d: Decision) {
        self.decision = d;
    }

    /// Ends whatever was lent or put in force: the slot's owner decision is back.
    pub fn return_to_owner(&mut self) -> Decision {
        self.decision = self.dispatcher.reclaim();
        self.decision
    }

    /// Before a turn: a slot owner that became runnable again (its timer, an IPI) takes its
    /// slot back from whatever was lent, unless it yielded this slot.
    pub fn reclaim_if_owner_woke(&mut self, runnable: impl Fn(VcpuRef) -> bool) -> Decision {
        let owner = self.dispatcher.owner_decision();
        if !self.yielded_slot && self.decision.run != owner.run && owner.run.is_some_and(&runnable) {
            self.decision = self.dispatcher.reclaim();
        }
        self.decision
    }

    /// Before a turn (after the owner's pending work was looked at): a slot whose owner is
    /// halted or stopped, or that has no owner, is lent.
    pub fn lend_if_owner_cannot_run(&mut self, now: Tick, runnable: impl Fn(VcpuRef) -> bool) -> Decision {
        if !self.decision.run.is_some_and(&runnable) && !self.decision.lent {
            self.decision = self.dispatcher.on_halt(now, runnable);
        }
        self.decision
    }

    /// The start of the current slot when the coming turn is its owner's first (the entry that
    /// gang skew measures), else `None`.
    pub fn owned_slot_start(&self) -> Option<Tick> {
        (self.slot_fresh && !self.decision.lent).then_some(self.slot_start)
    }

    /// After a turn that ended at `now` (`ended` is `None` when nothing ran and the pCPU
    /// idled): a passed boundary starts the next slot; otherwise the rest of the slot is lent,
    /// and a yield with nothing to lend to goes to another of `homed` (this pCPU's vCPUs).
    pub fn turn_ended(
        &mut self,
        now: Tick,
        ended: Option<TurnEnd>,
        runnable: impl Fn(VcpuRef) -> bool,
        homed: impl IntoIterator<Item = VcpuRef>,
    ) -> Decision {
        self.slot_fresh = false;
        if now >= self.decision.next_deadline {
            self.slot_start = self.decision.next_deadline;
            self.decision = self.dispatcher.on_boundary(now);
            self.slot_fresh = true;
            self.yielded_slot = false;
            return self.decision;
        }
        let yielded = ended == Some(TurnEnd::Yielded);
        self.yielded_slot |= yielded;
        let yielder = self.decision.run;
        self.decision = self.dispatcher.on_halt(now, |v| Some(v) != yielder && runnable(v));
        if self.decision.run.is_none() && yielded {
            self.decision.run = homed.into_iter().find(|&v| Some(v) != yielder && runnable(v));
        }
        self.decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{DispatchEntry, PcpuTable};
    use reservations::Account;

    const A0: VcpuRef = VcpuRef { partition: 0, vcpu: 0 };
    const B0: VcpuRef = VcpuRef { partition: 1, vcpu: 0 };
    const SOFT: VcpuRef = VcpuRef { partition: 2, vcpu: 0 };

    /// Frame 100: A owns [0, 50), B owns [50, 100); SOFT takes slack.
    fn table() -> PcpuTable {
        let entry = |offset, end, run: VcpuRef| DispatchEntry {
            offset,
            end,
            run: Some(run),
            account: Account::Guest(run.partition),
        };
        PcpuTable { entries: vec![entry(0, 50, A0), entry(50, 100, B0)], slack_ring: vec![(SOFT, Account::Guest(2))] }
    }

    fn all_but(out: &'static [VcpuRef]) -> impl Fn(VcpuRef) -> bool {
        move |v| !out.contains(&v)
    }

    #[test]
    fn a_halted_owner_lends_its_slot_and_takes_it_back_when_it_wakes() {
        let t = table();
        let mut turns = SlotTurns::start(PcpuDispatcher::new(&t, 100, 0), 0, 0);
        assert_eq!(turns.owned_slot_start(), Some(0));
        let d = turns.turn_ended(10, Some(TurnEnd::Halted), all_but(&[A0]), [A0, B0]);
        assert_eq!((d.run, d.lent), (Some(SOFT), true), "the rest of A's slot is lent");
        assert_eq!(turns.owned_slot_start(), None, "a lent turn is no gang start");
        // A woke up: it takes the slot back.
        let d = turns.reclaim_if_owner_woke(all_but(&[]));
        assert_eq!((d.run, d.lent), (Some(A0), false));
        // The boundary starts B's slot, fresh.
        let d = turns.turn_ended(50, Some(TurnEnd::Deadline), all_but(&[]), [A0, B0]);
        assert_eq!(d.run, Some(B0));
        assert_eq!(turns.owned_slot_start(), Some(50));
    }

    #[test]
    fn an_owner_that_cannot_run_at_its_slot_start_is_lent_at_once() {
        let t = table();
        let mut turns = SlotTurns::start(PcpuDispatcher::new(&t, 100, 0), 0, 0);
        turns.reclaim_if_owner_woke(all_but(&[A0]));
        let d = turns.lend_if_owner_cannot_run(0, all_but(&[A0]));
        assert_eq!((d.run, d.lent), (Some(SOFT), true));
        // Nobody at all: the pCPU idles until the boundary.
        let mut turns = SlotTurns::start(PcpuDispatcher::new(&t, 100, 0), 0, 0);
        let d = turns.lend_if_owner_cannot_run(0, all_but(&[A0, SOFT]));
        assert_eq!((d.run, d.next_deadline), (None, 50));
    }

    #[test]
    fn an_owner_that_yielded_does_not_take_back_the_slot_it_gave_away() {
        // The regression fixed in 5354a5e: with slot reclaim, the yielder got its slot back at
        // once and spun on.
        let t = table();
        let mut turns = SlotTurns::start(PcpuDispatcher::new(&t, 100, 0), 0, 0);
        let d = turns.turn_ended(10, Some(TurnEnd::Yielded), all_but(&[]), [A0, B0]);
        assert_eq!(d.run, Some(SOFT));
        let d = turns.reclaim_if_owner_woke(all_but(&[]));
        assert_eq!(d.run, Some(SOFT), "the yielder stays off for the rest of its slot");
        // The next slot forgets the yield.
        turns.turn_ended(50, Some(TurnEnd::Deadline), all_but(&[]), [A0, B0]);
        turns.turn_ended(60, Some(TurnEnd::Halted), all_but(&[B0]), [A0, B0]);
        let d = turns.reclaim_if_owner_woke(all_but(&[]));
        assert_eq!(d.run, Some(B0), "B halted (not yielded) and reclaims");
    }

    #[test]
    fn a_yield_with_no_slack_goes_to_another_vcpu_homed_here() {
        let t = table();
        let mut turns = SlotTurns::start(PcpuDispatcher::new(&t, 100, 0), 0, 0);
        let d = turns.turn_ended(10, Some(TurnEnd::Yielded), all_but(&[SOFT]), [A0, B0]);
        assert_eq!(d.run, Some(B0), "directed yield: B runs in A's slot");
        // A halt (not a yield) with no slack idles instead.
        let mut turns = SlotTurns::start(PcpuDispatcher::new(&t, 100, 0), 0, 0);
        let d = turns.turn_ended(10, Some(TurnEnd::Halted), all_but(&[SOFT, A0]), [A0, B0]);
        assert_eq!(d.run, None);
    }
}
