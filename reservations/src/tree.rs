//! The partition tree: admission control and the effective reservation of every leaf.
//!
//! Capacities are kept as microseconds per major frame on each pCPU. Because every period
//! divides the major frame, a hard reservation's demand `budget * (frame / period)` is an
//! exact integer, so admission sums never round.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::flat::{EffectiveReservation, FlatPartition, PartitionId};
use crate::spec::{ChildPolicy, GroupSpec, Micros, NestedPolicy, PartitionSpec, Reservation, TreeSpec};

/// The node an admission error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRef {
    /// The machine itself (the major frame).
    Machine,
    /// Index into [`TreeSpec::groups`].
    Group(usize),
    /// Index into [`TreeSpec::partitions`] (also its [`PartitionId`]).
    Partition(usize),
}

/// Which of the node's settings is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    MajorFrame,
    Reservation,
    Pcpus,
    Vcpus,
    /// A group's `parent` or a partition's `group`.
    Parent,
    /// A partition's nested policy.
    Policy,
}

impl Field {
    pub fn as_str(self) -> &'static str {
        match self {
            Field::MajorFrame => "major_frame_us",
            Field::Reservation => "reservation",
            Field::Pcpus => "pcpus",
            Field::Vcpus => "vcpus",
            Field::Parent => "parent",
            Field::Policy => "policy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    ZeroMajorFrame,
    ZeroBudget,
    BudgetExceedsPeriod {
        budget_us: Micros,
        period_us: Micros,
    },
    ZeroPeriod,
    PeriodDoesNotDivideFrame {
        period_us: Micros,
        frame_us: Micros,
    },
    ShareOutOfRange {
        percent: u32,
    },
    ZeroWeight,
    NoPcpus,
    DuplicatePcpu {
        pcpu: u32,
    },
    PcpuDoesNotExist {
        pcpu: u32,
        count: u32,
    },
    ZeroVcpus,
    /// Policy `gang` with more vCPUs than pCPUs.
    GangNeedsOnePcpuPerVcpu {
        vcpus: u32,
        pcpus: u32,
    },
    MorePcpusThanVcpus {
        vcpus: u32,
        pcpus: u32,
    },
    UnknownGroup {
        index: usize,
    },
    ParentCycle,
    EmptyGroup,
    /// The child uses a pCPU its parent group does not hold.
    PcpuOutsideParent {
        pcpu: u32,
        parent: String,
    },
    /// The parent group's child policy does not allow this kind of reservation.
    PolicyForbids {
        parent: String,
        policy: ChildPolicy,
    },
    /// A hard reservation below a parent whose own capacity is not guaranteed.
    HardUnderSoftParent {
        parent: String,
    },
    /// Admitting this node would need more of `pcpu` than its parent holds there.
    OverAdmitted {
        pcpu: u32,
        /// `None`: the parent is the machine (the per-pCPU utilisation <= 1 rule).
        parent: Option<String>,
        needed_us: Micros,
        capacity_us: Micros,
        frame_us: Micros,
    },
    /// A share that resolves to nothing on `pcpu`: the node could never run.
    ZeroShare {
        pcpu: u32,
    },
    /// A change names a node the tree does not have (or the machine, which has no reservation).
    NotInTree,
}

/// `us` of every `frame_us` as a percentage with up to three decimals, trailing zeros dropped
/// (`62.5%`, `33.334%`, `100.02%` for 10,002 us of 10,000). Rounded up to the thousandth, so an
/// amount over the whole frame always prints above 100%.
struct Percent {
    us: Micros,
    frame_us: Micros,
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let frame = self.frame_us.max(1) as u128;
        let thousandths = (self.us as u128 * 100_000).div_ceil(frame);
        let (whole, fraction) = (thousandths / 1000, thousandths % 1000);
        match fraction {
            0 => write!(f, "{whole}.0%"),
            _ if fraction % 100 == 0 => write!(f, "{whole}.{}%", fraction / 100),
            _ if fraction % 10 == 0 => write!(f, "{whole}.{:02}%", fraction / 10),
            _ => write!(f, "{whole}.{fraction:03}%"),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::ZeroMajorFrame => write!(f, "the major frame must be longer than 0 us"),
            Problem::ZeroBudget => write!(f, "a hard reservation needs a budget above 0 us"),
            Problem::BudgetExceedsPeriod { budget_us, period_us } => {
                write!(f, "budget {budget_us} us exceeds its period {period_us} us")
            }
            Problem::ZeroPeriod => write!(f, "a hard reservation needs a period above 0 us"),
            Problem::PeriodDoesNotDivideFrame { period_us, frame_us } => write!(
                f,
                "period {period_us} us does not divide the major frame ({frame_us} us); \
                 use a divisor of it"
            ),
            Problem::ShareOutOfRange { percent } => {
                write!(f, "share {percent}% is outside 1..=100")
            }
            Problem::ZeroWeight => write!(f, "a weight must be at least 1"),
            Problem::NoPcpus => write!(f, "at least one pCPU is needed"),
            Problem::DuplicatePcpu { pcpu } => write!(f, "pCPU {pcpu} is listed twice"),
            Problem::PcpuDoesNotExist { pcpu, count } => {
                write!(f, "pCPU {pcpu} does not exist (the machine has {count} pCPUs)")
            }
            Problem::ZeroVcpus => write!(f, "a partition needs at least 1 vCPU"),
            Problem::GangNeedsOnePcpuPerVcpu { vcpus, pcpus } => write!(
                f,
                "policy \"gang\" runs every vCPU at once and needs one pCPU per vCPU \
                 ({vcpus} vCPUs, {pcpus} pCPUs); use \"round-robin-gang\" or add pCPUs"
            ),
            Problem::MorePcpusThanVcpus { vcpus, pcpus } => {
                write!(f, "{pcpus} pCPUs for {vcpus} vCPUs: the extra pCPUs would sit reserved and idle")
            }
            Problem::UnknownGroup { index } => write!(f, "group index {index} does not exist"),
            Problem::ParentCycle => write!(f, "the group's parents form a cycle"),
            Problem::EmptyGroup => write!(f, "the group has no partitions or groups in it"),
            Problem::PcpuOutsideParent { pcpu, parent } => {
                write!(f, "pCPU {pcpu} is not among the pCPUs of its group \"{parent}\"")
            }
            Problem::PolicyForbids { parent, policy } => write!(
                f,
                "group \"{parent}\" has policy \"{}\" and does not accept this kind of reservation",
                policy.as_str()
            ),
            Problem::HardUnderSoftParent { parent } => write!(
                f,
                "a hard reservation cannot be backed by group \"{parent}\", whose own capacity \
                 is a weighted (soft) share"
            ),
            Problem::OverAdmitted { pcpu, parent: None, needed_us, capacity_us: _, frame_us } => {
                write!(
                    f,
                    "pCPU {pcpu} is over-admitted: with this reservation the reservations on it \
                     would take {} of the pCPU ({needed_us} us of every {frame_us} us frame)",
                    Percent { us: *needed_us, frame_us: *frame_us }
                )
            }
            Problem::OverAdmitted { pcpu, parent: Some(parent), needed_us, capacity_us, frame_us } => {
                write!(
                    f,
                    "exceeds group \"{parent}\" on pCPU {pcpu}: the group holds {} of it but \
                     with this reservation its children need {}",
                    Percent { us: *capacity_us, frame_us: *frame_us },
                    Percent { us: *needed_us, frame_us: *frame_us }
                )
            }
            Problem::NotInTree => write!(f, "the tree has no such node to change"),
            Problem::ZeroShare { pcpu } => write!(
                f,
                "the share resolves to 0 us per frame on pCPU {pcpu}: the parent has no \
                 capacity left there"
            ),
        }
    }
}

/// A rejected tree, naming the offending node and setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionError {
    pub node: NodeRef,
    /// The node's name (`"hypervisor"` for the machine).
    pub name: String,
    pub field: Field,
    pub problem: Problem,
}

impl fmt::Display for AdmissionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.node {
            NodeRef::Machine => "hypervisor",
            NodeRef::Group(_) => "group",
            NodeRef::Partition(_) => "partition",
        };
        if self.node == NodeRef::Machine {
            write!(f, "{kind}: field `{}`: {}", self.field.as_str(), self.problem)
        } else {
            write!(f, "{kind} \"{}\": field `{}`: {}", self.name, self.field.as_str(), self.problem)
        }
    }
}

/// A group after admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub parent: Option<usize>,
    pub reservation: Reservation,
    pub children_policy: ChildPolicy,
    /// Sorted; explicit or the union of its children's.
    pub pcpus: Vec<u32>,
    /// Microseconds per major frame the group holds on each pCPU (parallel to `pcpus`).
    pub capacity_us: Vec<Micros>,
    /// True when every reservation from here to the machine is hard or fixed-share.
    pub guaranteed: bool,
    pub depth: u32,
}

/// A partition (leaf) after admission: its spec (pCPUs sorted) and what admission gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub id: PartitionId,
    pub spec: PartitionSpec,
    /// Microseconds per major frame the partition gets on each of its pCPUs.
    pub per_pcpu_us: Micros,
    pub guaranteed: bool,
    pub depth: u32,
}

/// An admitted partition tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    major_frame_us: Micros,
    pcpu_count: Option<u32>,
    gang: bool,
    /// Shared between a tree and the trees changed from it until a change touches a group.
    groups: Arc<Vec<Group>>,
    leaves: Vec<Leaf>,
    /// pCPU -> microseconds per frame the leaves' effective reservations (hard, fixed and
    /// soft) take; capacity a group holds but no leaf uses is not counted (it is slack).
    load_us: BTreeMap<u32, Micros>,
    /// What was admitted (`TreeSpec`'s groups and partitions), to admit one change of it
    /// without walking the whole tree again.
    spec_groups: Arc<Vec<GroupSpec>>,
    spec_partitions: Vec<PartitionSpec>,
}

/// A spec as the builder reads it: borrowed, so that a changed tree's spec need not be copied.
#[derive(Clone, Copy)]
struct SpecView<'a> {
    major_frame_us: Micros,
    pcpu_count: Option<u32>,
    gang: bool,
    groups: &'a [GroupSpec],
    partitions: &'a [PartitionSpec],
}

/// What a parent hands one child: per pCPU for a group (its capacity), one amount on each of
/// its pCPUs for a leaf; and whether that is guaranteed.
enum Allotment {
    Group(usize, BTreeMap<u32, Micros>, bool),
    Leaf(usize, Micros, bool),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Child {
    Group(usize),
    Leaf(usize),
}

impl Tree {
    /// Checks the spec and admits it, or names the first node that cannot be admitted.
    pub fn build(spec: &TreeSpec) -> Result<Tree, AdmissionError> {
        let view = SpecView {
            major_frame_us: spec.major_frame_us,
            pcpu_count: spec.pcpu_count,
            gang: spec.gang,
            groups: &spec.groups,
            partitions: &spec.partitions,
        };
        Builder { spec: view }.build()
    }

    /// Admits one changed reservation the way HiRes does: only the node's parent divides
    /// what it holds again (its capacity, and everything above it, stays as admitted), then
    /// the node's own subtree if it is a group. The outcome is the one [`Tree::build`] gives
    /// for the spec with that reservation, a refusal included (the same first error), but the
    /// node's ancestors are never looked at: the cost does not grow with its depth.
    pub fn with_reservation(&self, node: NodeRef, reservation: Reservation) -> Result<Tree, AdmissionError> {
        // Only what the change touches is copied: the partitions' list for a partition's
        // change, the groups' for a group's.
        let mut spec_groups = self.spec_groups.clone();
        let mut spec_partitions: Option<Vec<PartitionSpec>> = None;
        let parent = match node {
            NodeRef::Group(g) if g < spec_groups.len() => {
                Arc::make_mut(&mut spec_groups)[g].reservation = reservation;
                spec_groups[g].parent
            }
            NodeRef::Partition(p) if p < self.spec_partitions.len() => {
                let mut partitions = self.spec_partitions.clone();
                partitions[p].reservation = reservation;
                let group = partitions[p].group;
                spec_partitions = Some(partitions);
                group
            }
            _ => {
                let name = String::from(if node == NodeRef::Machine { "hypervisor" } else { "" });
                return Err(AdmissionError { node, name, field: Field::Reservation, problem: Problem::NotInTree });
            }
        };
        let builder = Builder {
            spec: SpecView {
                major_frame_us: self.major_frame_us,
                pcpu_count: self.pcpu_count,
                gang: self.gang,
                groups: &spec_groups,
                partitions: spec_partitions.as_deref().unwrap_or(&self.spec_partitions),
            },
        };
        // In the order `build` finds them: the reservation alone, the parent's policy, then
        // the divisions.
        builder.check_reservation(node, &reservation)?;
        if let Some(g) = parent {
            let group = &spec_groups[g];
            if !group.children.accepts(&reservation) {
                let problem = Problem::PolicyForbids { parent: group.name.clone(), policy: group.children };
                return Err(builder.error(node, Field::Reservation, problem));
            }
        }
        let group_pcpus: Vec<&[u32]> = self.groups.iter().map(|g| g.pcpus.as_slice()).collect();
        let admitted_capacity = |g: usize| -> BTreeMap<u32, Micros> {
            let group = &self.groups[g];
            group.pcpus.iter().copied().zip(group.capacity_us.iter().copied()).collect()
        };
        // What the divisions change: per group its new capacity and guarantee, per leaf its
        // new amount and guarantee.
        let mut groups_now: BTreeMap<usize, (BTreeMap<u32, Micros>, bool)> = BTreeMap::new();
        let mut leaves_now: BTreeMap<usize, (Micros, bool)> = BTreeMap::new();
        let mut apply = |allotments: Vec<Allotment>,
                         groups_now: &mut BTreeMap<usize, (BTreeMap<u32, Micros>, bool)>| {
            for allotment in allotments {
                match allotment {
                    Allotment::Group(g, capacity, guaranteed) => {
                        groups_now.insert(g, (capacity, guaranteed));
                    }
                    Allotment::Leaf(l, us, guaranteed) => {
                        leaves_now.insert(l, (us, guaranteed));
                    }
                }
            }
        };
        let (capacity, guaranteed) = match parent {
            Some(g) => (admitted_capacity(g), self.groups[g].guaranteed),
            None => (builder.machine_capacity(&group_pcpus), true),
        };
        apply(
            builder.allocate(parent, &capacity, guaranteed, &builder.children_of(parent), &group_pcpus)?,
            &mut groups_now,
        );
        // Groups whose capacity (or guarantee) came out changed divide it again among their
        // children, in `build`'s order so that a refusal is the one it finds first: shallowest
        // first, then by index, last first. Weighted siblings of the node are among them (they
        // share what the node leaves), and so may be the node itself if it is a group.
        let order = |c: usize| (self.groups[c].depth, core::cmp::Reverse(c));
        let child_groups = |parent: Option<usize>| {
            let groups = &spec_groups;
            (0..groups.len()).filter(move |&c| groups[c].parent == parent)
        };
        let mut pending: alloc::collections::BTreeSet<_> = child_groups(parent).map(order).collect();
        while let Some((_, core::cmp::Reverse(g))) = pending.pop_first() {
            let admitted = &self.groups[g];
            let Some((capacity, guaranteed)) = groups_now.get(&g).cloned() else { continue };
            let same = guaranteed == admitted.guaranteed
                && admitted.pcpus.iter().zip(&admitted.capacity_us).all(|(p, us)| capacity.get(p) == Some(us));
            if same {
                groups_now.remove(&g);
                continue;
            }
            let children = builder.children_of(Some(g));
            apply(builder.allocate(Some(g), &capacity, guaranteed, &children, &group_pcpus)?, &mut groups_now);
            pending.extend(child_groups(Some(g)).map(order));
        }
        let groups = if groups_now.is_empty() && !matches!(node, NodeRef::Group(_)) {
            self.groups.clone()
        } else {
            let mut groups = self.groups.clone();
            for (g, group) in Arc::make_mut(&mut groups).iter_mut().enumerate() {
                group.reservation = spec_groups[g].reservation;
                if let Some((capacity, guaranteed)) = groups_now.get(&g) {
                    group.capacity_us = group.pcpus.iter().map(|p| capacity[p]).collect();
                    group.guaranteed = *guaranteed;
                }
            }
            groups
        };
        let mut leaves = self.leaves.clone();
        if let NodeRef::Partition(p) = node {
            leaves[p].spec.reservation = reservation;
        }
        for (l, (us, guaranteed)) in leaves_now {
            leaves[l].per_pcpu_us = us;
            leaves[l].guaranteed = guaranteed;
        }
        let spec_partitions = spec_partitions.unwrap_or_else(|| self.spec_partitions.clone());
        Ok(Tree::assemble(
            self.major_frame_us,
            self.pcpu_count,
            self.gang,
            groups,
            leaves,
            spec_groups,
            spec_partitions,
        ))
    }

    fn assemble(
        major_frame_us: Micros,
        pcpu_count: Option<u32>,
        gang: bool,
        groups: Arc<Vec<Group>>,
        leaves: Vec<Leaf>,
        spec_groups: Arc<Vec<GroupSpec>>,
        spec_partitions: Vec<PartitionSpec>,
    ) -> Tree {
        let mut load_us: BTreeMap<u32, Micros> = BTreeMap::new();
        for leaf in &leaves {
            for &pcpu in &leaf.spec.pcpus {
                *load_us.entry(pcpu).or_insert(0) += leaf.per_pcpu_us;
            }
        }
        Tree { major_frame_us, pcpu_count, gang, groups, leaves, load_us, spec_groups, spec_partitions }
    }

    pub fn major_frame_us(&self) -> Micros {
        self.major_frame_us
    }

    pub fn gang(&self) -> bool {
        self.gang
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn partitions(&self) -> &[Leaf] {
        &self.leaves
    }

    pub fn partition(&self, id: PartitionId) -> Option<&Leaf> {
        self.leaves.get(id as usize)
    }

    /// Microseconds per major frame that partitions' effective reservations take on `pcpu`
    /// (0 if none uses it). The rest of the frame is slack.
    pub fn pcpu_load_us(&self, pcpu: u32) -> Micros {
        self.load_us.get(&pcpu).copied().unwrap_or(0)
    }

    /// The pCPUs any partition uses, sorted.
    pub fn used_pcpus(&self) -> impl Iterator<Item = u32> + '_ {
        self.load_us.keys().copied()
    }

    /// A leaf's share of each of its pCPUs in parts per million.
    pub fn share_ppm(&self, id: PartitionId) -> Option<u32> {
        self.partition(id).map(|leaf| ppm(leaf.per_pcpu_us, self.major_frame_us))
    }

    /// The planner's view: each leaf's effective reservation, resolved once so that nothing
    /// downstream walks the tree.
    pub fn flatten(&self) -> Vec<FlatPartition> {
        self.leaves
            .iter()
            .map(|leaf| FlatPartition {
                id: leaf.id,
                name: leaf.spec.name.clone(),
                pcpus: leaf.spec.pcpus.clone(),
                vcpus: leaf.spec.vcpus,
                gang: self.gang,
                reservation: match (leaf.guaranteed, leaf.spec.reservation) {
                    (true, Reservation::Hard { budget_us, period_us }) => {
                        EffectiveReservation::Hard { budget: budget_us, period: period_us }
                    }
                    // A guaranteed fixed share is a hard budget over the whole frame.
                    (true, _) => EffectiveReservation::Hard { budget: leaf.per_pcpu_us, period: self.major_frame_us },
                    (false, _) => EffectiveReservation::Soft { share_ppm: ppm(leaf.per_pcpu_us, self.major_frame_us) },
                },
                depth: leaf.depth,
            })
            .collect()
    }
}

fn ppm(us: Micros, frame_us: Micros) -> u32 {
    (us as u128 * 1_000_000 / frame_us.max(1) as u128) as u32
}

struct Builder<'a> {
    spec: SpecView<'a>,
}

impl Builder<'_> {
    fn error(&self, node: NodeRef, field: Field, problem: Problem) -> AdmissionError {
        let name = match node {
            NodeRef::Machine => String::from("hypervisor"),
            NodeRef::Group(i) => self.spec.groups[i].name.clone(),
            NodeRef::Partition(i) => self.spec.partitions[i].name.clone(),
        };
        AdmissionError { node, name, field, problem }
    }

    fn node_ref(child: Child) -> NodeRef {
        match child {
            Child::Group(i) => NodeRef::Group(i),
            Child::Leaf(i) => NodeRef::Partition(i),
        }
    }

    fn reservation_of(&self, child: Child) -> Reservation {
        match child {
            Child::Group(i) => self.spec.groups[i].reservation,
            Child::Leaf(i) => self.spec.partitions[i].reservation,
        }
    }

    fn check_reservation(&self, node: NodeRef, reservation: &Reservation) -> Result<(), AdmissionError> {
        let frame = self.spec.major_frame_us;
        let problem = match *reservation {
            Reservation::Hard { period_us: 0, .. } => Some(Problem::ZeroPeriod),
            Reservation::Hard { budget_us: 0, .. } => Some(Problem::ZeroBudget),
            Reservation::Hard { budget_us, period_us } if budget_us > period_us => {
                Some(Problem::BudgetExceedsPeriod { budget_us, period_us })
            }
            Reservation::Hard { period_us, .. } if !frame.is_multiple_of(period_us) => {
                Some(Problem::PeriodDoesNotDivideFrame { period_us, frame_us: frame })
            }
            Reservation::FixedShare { percent } if !(1..=100).contains(&percent) => {
                Some(Problem::ShareOutOfRange { percent })
            }
            Reservation::Weight(0) => Some(Problem::ZeroWeight),
            _ => None,
        };
        match problem {
            Some(problem) => Err(self.error(node, Field::Reservation, problem)),
            None => Ok(()),
        }
    }

    fn check_pcpu_list(&self, node: NodeRef, pcpus: &[u32]) -> Result<(), AdmissionError> {
        if pcpus.is_empty() {
            return Err(self.error(node, Field::Pcpus, Problem::NoPcpus));
        }
        for (i, &pcpu) in pcpus.iter().enumerate() {
            if let Some(count) = self.spec.pcpu_count {
                if pcpu >= count {
                    return Err(self.error(node, Field::Pcpus, Problem::PcpuDoesNotExist { pcpu, count }));
                }
            }
            if pcpus[..i].contains(&pcpu) {
                return Err(self.error(node, Field::Pcpus, Problem::DuplicatePcpu { pcpu }));
            }
        }
        Ok(())
    }

    /// Depth of every group below the machine (1 = child of the machine); rejects cycles.
    fn group_depths(&self) -> Result<Vec<u32>, AdmissionError> {
        let groups = &self.spec.groups;
        let mut depths = Vec::with_capacity(groups.len());
        for start in 0..groups.len() {
            let mut depth = 1u32;
            let mut at = start;
            while let Some(parent) = groups[at].parent {
                if parent >= groups.len() {
                    return Err(self.error(NodeRef::Group(at), Field::Parent, Problem::UnknownGroup { index: parent }));
                }
                depth += 1;
                at = parent;
                if depth as usize > groups.len() {
                    return Err(self.error(NodeRef::Group(start), Field::Parent, Problem::ParentCycle));
                }
            }
            depths.push(depth);
        }
        Ok(depths)
    }

    fn build(&self) -> Result<Tree, AdmissionError> {
        let spec = self.spec;
        let frame = spec.major_frame_us;
        if frame == 0 {
            return Err(self.error(NodeRef::Machine, Field::MajorFrame, Problem::ZeroMajorFrame));
        }

        // Each node on its own.
        for (i, group) in spec.groups.iter().enumerate() {
            self.check_reservation(NodeRef::Group(i), &group.reservation)?;
            if let Some(pcpus) = &group.pcpus {
                self.check_pcpu_list(NodeRef::Group(i), pcpus)?;
            }
        }
        let depths = self.group_depths()?;
        for (i, part) in spec.partitions.iter().enumerate() {
            let node = NodeRef::Partition(i);
            if let Some(g) = part.group {
                if g >= spec.groups.len() {
                    return Err(self.error(node, Field::Parent, Problem::UnknownGroup { index: g }));
                }
            }
            if part.vcpus == 0 {
                return Err(self.error(node, Field::Vcpus, Problem::ZeroVcpus));
            }
            self.check_pcpu_list(node, &part.pcpus)?;
            let pcpus = part.pcpus.len() as u32;
            if part.nested == NestedPolicy::Gang && part.vcpus > pcpus {
                return Err(self.error(
                    node,
                    Field::Policy,
                    Problem::GangNeedsOnePcpuPerVcpu { vcpus: part.vcpus, pcpus },
                ));
            }
            if part.vcpus < pcpus {
                return Err(self.error(node, Field::Pcpus, Problem::MorePcpusThanVcpus { vcpus: part.vcpus, pcpus }));
            }
            self.check_reservation(node, &part.reservation)?;
        }

        // Children of the machine (index 0) and of each group (index g + 1).
        let children: Vec<Vec<Child>> =
            core::iter::once(None).chain((0..spec.groups.len()).map(Some)).map(|g| self.children_of(g)).collect();
        for g in 0..spec.groups.len() {
            if children[g + 1].is_empty() {
                return Err(self.error(NodeRef::Group(g), Field::Parent, Problem::EmptyGroup));
            }
        }

        // Group pCPU sets, deepest groups first so children are known before their parent.
        let mut order: Vec<usize> = (0..spec.groups.len()).collect();
        order.sort_by_key(|&g| core::cmp::Reverse(depths[g]));
        let mut group_pcpus: Vec<Vec<u32>> = alloc::vec![Vec::new(); spec.groups.len()];
        for &g in &order {
            let mut union: Vec<u32> = Vec::new();
            for &child in &children[g + 1] {
                let child_pcpus: &[u32] = match child {
                    Child::Group(c) => &group_pcpus[c],
                    Child::Leaf(c) => &spec.partitions[c].pcpus,
                };
                if let Some(explicit) = &spec.groups[g].pcpus {
                    if let Some(&pcpu) = child_pcpus.iter().find(|p| !explicit.contains(p)) {
                        let parent = spec.groups[g].name.clone();
                        return Err(self.error(
                            Self::node_ref(child),
                            Field::Pcpus,
                            Problem::PcpuOutsideParent { pcpu, parent },
                        ));
                    }
                }
                union.extend_from_slice(child_pcpus);
            }
            let mut pcpus = spec.groups[g].pcpus.clone().unwrap_or(union);
            pcpus.sort_unstable();
            pcpus.dedup();
            group_pcpus[g] = pcpus;
        }

        // Child policies.
        for (g, group) in spec.groups.iter().enumerate() {
            for &child in &children[g + 1] {
                if !group.children.accepts(&self.reservation_of(child)) {
                    let problem = Problem::PolicyForbids { parent: group.name.clone(), policy: group.children };
                    return Err(self.error(Self::node_ref(child), Field::Reservation, problem));
                }
            }
        }

        // Capacities, top-down: the machine first, then groups by increasing depth.
        let group_pcpus: Vec<&[u32]> = group_pcpus.iter().map(Vec::as_slice).collect();
        let mut group_capacity: Vec<BTreeMap<u32, Micros>> = alloc::vec![BTreeMap::new(); spec.groups.len()];
        let mut guaranteed_groups = alloc::vec![false; spec.groups.len()];
        let mut leaf_us = alloc::vec![0 as Micros; spec.partitions.len()];
        let mut guaranteed_leaves = alloc::vec![false; spec.partitions.len()];
        let mut apply = |allotments: Vec<Allotment>,
                         group_capacity: &mut Vec<BTreeMap<u32, Micros>>,
                         guaranteed_groups: &mut Vec<bool>| {
            for allotment in allotments {
                match allotment {
                    Allotment::Group(g, capacity, guaranteed) => {
                        group_capacity[g] = capacity;
                        guaranteed_groups[g] = guaranteed;
                    }
                    Allotment::Leaf(l, us, guaranteed) => {
                        leaf_us[l] = us;
                        guaranteed_leaves[l] = guaranteed;
                    }
                }
            }
        };
        let machine = self.machine_capacity(&group_pcpus);
        apply(
            self.allocate(None, &machine, true, &children[0], &group_pcpus)?,
            &mut group_capacity,
            &mut guaranteed_groups,
        );
        order.reverse(); // shallowest first
        for &g in &order {
            let capacity = group_capacity[g].clone();
            let allotments = self.allocate(Some(g), &capacity, guaranteed_groups[g], &children[g + 1], &group_pcpus)?;
            apply(allotments, &mut group_capacity, &mut guaranteed_groups);
        }

        let groups = spec
            .groups
            .iter()
            .enumerate()
            .map(|(g, group)| Group {
                name: group.name.clone(),
                parent: group.parent,
                reservation: group.reservation,
                children_policy: group.children,
                capacity_us: group_pcpus[g].iter().map(|p| group_capacity[g][p]).collect(),
                pcpus: group_pcpus[g].to_vec(),
                guaranteed: guaranteed_groups[g],
                depth: depths[g],
            })
            .collect();
        let leaves: Vec<Leaf> = spec
            .partitions
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let mut spec = part.clone();
                spec.pcpus.sort_unstable();
                Leaf {
                    id: i as PartitionId,
                    spec,
                    per_pcpu_us: leaf_us[i],
                    guaranteed: guaranteed_leaves[i],
                    depth: part.group.map_or(1, |g| depths[g] + 1),
                }
            })
            .collect();
        Ok(Tree::assemble(
            frame,
            spec.pcpu_count,
            spec.gang,
            Arc::new(groups),
            leaves,
            Arc::new(spec.groups.to_vec()),
            spec.partitions.to_vec(),
        ))
    }

    /// The children of a group (`None`: of the machine) in declaration order, groups first.
    fn children_of(&self, parent: Option<usize>) -> Vec<Child> {
        let groups = self.spec.groups.iter().enumerate().filter(|(_, g)| g.parent == parent);
        let leaves = self.spec.partitions.iter().enumerate().filter(|(_, p)| p.group == parent);
        groups.map(|(i, _)| Child::Group(i)).chain(leaves.map(|(i, _)| Child::Leaf(i))).collect()
    }

    /// What the machine holds: the whole frame on each of its pCPUs (on a host check without
    /// a pCPU count, on each pCPU its children use).
    fn machine_capacity(&self, group_pcpus: &[&[u32]]) -> BTreeMap<u32, Micros> {
        let frame = self.spec.major_frame_us;
        match self.spec.pcpu_count {
            Some(count) => (0..count).map(|p| (p, frame)).collect(),
            None => self
                .children_of(None)
                .into_iter()
                .flat_map(|child| match child {
                    Child::Group(c) => group_pcpus[c].iter(),
                    Child::Leaf(c) => self.spec.partitions[c].pcpus.iter(),
                })
                .map(|&p| (p, frame))
                .collect(),
        }
    }

    /// Hands `capacity` (pCPU -> us per frame) of one parent to its children: hard and fixed
    /// shares first, then what is left to the weighted children by weight.
    fn allocate(
        &self,
        parent: Option<usize>,
        capacity: &BTreeMap<u32, Micros>,
        parent_guaranteed: bool,
        children: &[Child],
        group_pcpus: &[&[u32]],
    ) -> Result<Vec<Allotment>, AdmissionError> {
        let frame = self.spec.major_frame_us;
        let parent_name = parent.map(|g| self.spec.groups[g].name.clone());
        let pcpus_of = |child: Child| -> &[u32] {
            match child {
                Child::Group(c) => group_pcpus[c],
                Child::Leaf(c) => &self.spec.partitions[c].pcpus,
            }
        };
        let mut allotments = Vec::with_capacity(children.len());
        let cap = |pcpu: u32| capacity.get(&pcpu).copied().unwrap_or(0);
        let mut used: BTreeMap<u32, Micros> = BTreeMap::new();

        // Demand of one child on each of its pCPUs, given what it resolves to there.
        let mut record = |used: &mut BTreeMap<u32, Micros>,
                          child: Child,
                          per_pcpu: &BTreeMap<u32, Micros>,
                          guaranteed: bool|
         -> Result<(), AdmissionError> {
            let node = Self::node_ref(child);
            // A leaf is gang-dispatched: it gets the same amount on each of its pCPUs.
            let uniform = match child {
                Child::Leaf(_) => per_pcpu.values().copied().min(),
                Child::Group(_) => None,
            };
            for (&pcpu, &resolved) in per_pcpu {
                let amount = uniform.unwrap_or(resolved);
                if amount == 0 {
                    return Err(self.error(node, Field::Reservation, Problem::ZeroShare { pcpu }));
                }
                let needed = used.get(&pcpu).copied().unwrap_or(0) + amount;
                if needed > cap(pcpu) {
                    let problem = Problem::OverAdmitted {
                        pcpu,
                        parent: parent_name.clone(),
                        needed_us: needed,
                        capacity_us: cap(pcpu),
                        frame_us: frame,
                    };
                    return Err(self.error(node, Field::Reservation, problem));
                }
                used.insert(pcpu, needed);
            }
            allotments.push(match child {
                Child::Group(c) => Allotment::Group(c, per_pcpu.clone(), guaranteed),
                Child::Leaf(c) => Allotment::Leaf(c, uniform.unwrap_or(0), guaranteed),
            });
            Ok(())
        };

        for &child in children {
            let per_pcpu: BTreeMap<u32, Micros> = match self.reservation_of(child) {
                Reservation::Hard { budget_us, period_us } => {
                    if !parent_guaranteed {
                        let parent = parent_name.clone().unwrap_or_default();
                        return Err(self.error(
                            Self::node_ref(child),
                            Field::Reservation,
                            Problem::HardUnderSoftParent { parent },
                        ));
                    }
                    let demand = budget_us * (frame / period_us);
                    pcpus_of(child).iter().map(|&p| (p, demand)).collect()
                }
                Reservation::FixedShare { percent } => {
                    pcpus_of(child).iter().map(|&p| (p, cap(p) * percent as Micros / 100)).collect()
                }
                Reservation::Weight(_) => continue,
            };
            record(&mut used, child, &per_pcpu, parent_guaranteed)?;
        }

        // Weighted children split what is left on each pCPU; weights are only ever compared
        // with siblings', so inflation inside another subtree cannot change the outcome here.
        let mut weight_sum: BTreeMap<u32, u64> = BTreeMap::new();
        for &child in children {
            if let Reservation::Weight(w) = self.reservation_of(child) {
                for &p in pcpus_of(child) {
                    *weight_sum.entry(p).or_insert(0) += w as u64;
                }
            }
        }
        let remaining: BTreeMap<u32, Micros> =
            weight_sum.keys().map(|&p| (p, cap(p) - used.get(&p).copied().unwrap_or(0))).collect();
        for &child in children {
            if let Reservation::Weight(w) = self.reservation_of(child) {
                let per_pcpu: BTreeMap<u32, Micros> = pcpus_of(child)
                    .iter()
                    .map(|&p| (p, (remaining[&p] as u128 * w as u128 / weight_sum[&p] as u128) as Micros))
                    .collect();
                record(&mut used, child, &per_pcpu, false)?;
            }
        }
        Ok(allotments)
    }
}
