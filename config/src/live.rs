//! The config of a running machine, changed while it runs: a new reservation for a partition
//! or group goes through the very checks the config got at boot (names, devices, memory,
//! admission of the reservation tree, the planner, IRQ plan), run on the file as parsed then
//! with only that reservation replaced. A refused change prints the error the check would
//! have printed for a file that said so, at the reservation's line in that file.

use alloc::string::{String, ToString};
use alloc::sync::Arc;
use core::fmt;
use core::ops::Range;

use toml::Spanned;

use crate::error::{ConfigError, Reporter};
use crate::schema::{RawConfig, RawReservation, Reservation};
use crate::validate::{validate, validate_reservation_change, Machine, Validated};
use reservations::NodeRef;

/// A validated config and what it was validated from, to validate changes of it the same way.
#[derive(Clone)]
pub struct LiveConfig {
    /// Shared by every version of the running config: a change copies none of it.
    file: Arc<File>,
    pub validated: Validated,
}

/// The file as read at boot.
struct File {
    name: String,
    text: String,
    /// As parsed at boot; the reservations in force are `Validated::config`'s.
    raw: RawConfig,
    /// The machine it was checked against. Payload images are left out: whether a payload
    /// loads does not depend on reservations, and every payload was checked at boot.
    machine: Machine,
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    /// No partition or group has this name.
    UnknownNode(String),
    /// The check refused the config with the change in it.
    Refused(ConfigError),
    /// The config with the change is valid, but running it would need what a run cannot do
    /// (move a vCPU to another pCPU, re-route a device IRQ): it needs a restart.
    NeedsRestart { node: String, what: &'static str },
    /// A delegated change from a partition that manages no group.
    NotAManager(String),
    /// A delegated change for a child the managed group does not have.
    NoSuchChild { group: String, index: usize, children: usize },
    /// A revoke of a shared region the one it names (the caller, or its group's child) does
    /// not own at that address.
    NotOwner { partition: String, gpa: u64 },
}

impl fmt::Display for ChangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeError::UnknownNode(name) => write!(f, "no partition or group is named \"{name}\""),
            ChangeError::Refused(e) => write!(f, "{e}"),
            ChangeError::NotAManager(name) => write!(f, "partition \"{name}\" manages no group"),
            ChangeError::NoSuchChild { group, index, children } => {
                write!(f, "group \"{group}\" has {children} children; there is no child {index}")
            }
            ChangeError::NotOwner { partition, gpa } => {
                write!(f, "\"{partition}\" owns no shared region at {gpa:#x}")
            }
            ChangeError::NeedsRestart { node, what } => write!(
                f,
                "\"{node}\": with this reservation {what}, which a running machine cannot do; change the file and restart"
            ),
        }
    }
}

impl LiveConfig {
    /// Parses and validates `text` (named `file` in errors) against `machine`, as [`crate::load_for`].
    pub fn load(file: &str, text: &str, machine: &Machine) -> Result<LiveConfig, ConfigError> {
        let reporter = Reporter { file, text };
        let document = toml::de::DeTable::parse(text).map_err(|e| reporter.syntax(&e))?;
        let raw: RawConfig = toml::from_str(text).map_err(|e| reporter.schema(&e, &document))?;
        let validated = validate(&reporter, &raw, machine)?;
        let machine = Machine { module_images: alloc::vec::Vec::new(), ..machine.clone() };
        let file = Arc::new(File { name: file.to_string(), text: text.to_string(), raw, machine });
        Ok(LiveConfig { file, validated })
    }

    /// The config with `node`'s reservation replaced by `reservation`, validated as at boot
    /// (with the check's answer and error, by `validate_reservation_change`, which looks only
    /// at what a reservation can change: its cost does not grow with the node's depth).
    /// The running machine can switch to it: memory, vCPU homes and IRQ routes are unchanged.
    pub fn with_reservation(&self, node: &str, reservation: Reservation) -> Result<LiveConfig, ChangeError> {
        let config = &self.validated.config;
        let node_ref = if let Some(p) = config.partitions.iter().position(|p| p.name == node) {
            NodeRef::Partition(p)
        } else if let Some(g) = config.groups.iter().position(|g| g.name == node) {
            NodeRef::Group(g)
        } else {
            return Err(ChangeError::UnknownNode(node.to_string()));
        };
        let file = &self.file;
        let reporter = Reporter { file: &file.name, text: &file.text };
        // Only a refusal needs the file as it would read with the change (to point at it).
        let validated = validate_reservation_change(
            &reporter,
            || self.raw_with(node_ref, reservation),
            &file.machine,
            &self.validated,
            node_ref,
            reservation,
        )
        .map_err(ChangeError::Refused)?;
        let restart = |what| ChangeError::NeedsRestart { node: node.to_string(), what };
        if validated.dispatch.homes != self.validated.dispatch.homes {
            return Err(restart("a vCPU would move to another pCPU"));
        }
        if validated.memory != self.validated.memory {
            return Err(restart("a partition's memory would move"));
        }
        if validated.irqs != self.validated.irqs {
            return Err(restart("a device IRQ would be routed elsewhere"));
        }
        Ok(LiveConfig { file: self.file.clone(), validated })
    }

    /// The file as it would read with the reservations in force and `node`'s replaced by
    /// `reservation`: each reservation that differs from the file's is written at the place
    /// of the one it replaces, so that an error about it points there.
    fn raw_with(&self, node: NodeRef, reservation: Reservation) -> RawConfig {
        let mut raw = self.file.raw.clone();
        let config = &self.validated.config;
        let in_force = |slot: &mut Spanned<RawReservation>, reservation: Reservation| {
            if raw_value(slot.get_ref()) != Some(reservation) {
                *slot = raw_reservation(reservation, slot.span());
            }
        };
        for (p, partition) in raw.partition.iter_mut().enumerate() {
            let wanted = if node == NodeRef::Partition(p) { reservation } else { config.partitions[p].reservation };
            in_force(&mut partition.get_mut().reservation, wanted);
        }
        for (g, group) in raw.group.iter_mut().enumerate() {
            let wanted = if node == NodeRef::Group(g) { reservation } else { config.groups[g].reservation };
            in_force(&mut group.get_mut().reservation, wanted);
        }
        raw
    }

    /// What the whole check makes of the changed file: what `with_reservation` must agree with.
    #[cfg(test)]
    pub(crate) fn whole_check_with(&self, node: &str, reservation: Reservation) -> Result<Validated, ConfigError> {
        let config = &self.validated.config;
        let node = match config.partitions.iter().position(|p| p.name == node) {
            Some(p) => NodeRef::Partition(p),
            None => NodeRef::Group(config.groups.iter().position(|g| g.name == node).expect("a node of the config")),
        };
        let file = &self.file;
        validate(&Reporter { file: &file.name, text: &file.text }, &self.raw_with(node, reservation), &file.machine)
    }
}

impl LiveConfig {
    /// The group `manager` manages (the first in the file, if it manages several): its index
    /// in `config.groups` and its children's names, partitions first, each in file order (a
    /// manager names a child by its place in this list).
    pub fn managed_by(&self, manager: &str) -> Option<(usize, alloc::vec::Vec<&str>)> {
        let config = &self.validated.config;
        let group = config.groups.iter().position(|g| g.manager.as_deref() == Some(manager))?;
        let name = config.groups[group].name.as_str();
        let partitions = config.partitions.iter().filter(|p| p.group.as_deref() == Some(name)).map(|p| p.name.as_str());
        let groups = config.groups.iter().filter(|g| g.parent.as_deref() == Some(name)).map(|g| g.name.as_str());
        Some((group, partitions.chain(groups).collect()))
    }

    /// What group `group` holds: microseconds of every major frame on each of its pCPUs (the
    /// least of them), as admission gave it.
    pub fn group_capacity_us(&self, group: usize) -> u64 {
        let name = &self.validated.config.groups[group].name;
        let admitted = self.validated.tree.groups().iter().find(|g| &g.name == name);
        admitted.and_then(|g| g.capacity_us.iter().copied().min()).unwrap_or(0)
    }

    /// The shared region (its index in `config.shared`) at guest-physical `gpa` that `caller`
    /// may revoke: the one it owns there (`child` None) or, if it manages a group, the one its
    /// `child`-th child owns there (numbered as [`LiveConfig::managed_by`] lists them).
    pub fn revocable_region(&self, caller: &str, gpa: u64, child: Option<usize>) -> Result<usize, ChangeError> {
        let owner = match child {
            None => caller,
            Some(index) => {
                let (group, children) =
                    self.managed_by(caller).ok_or_else(|| ChangeError::NotAManager(caller.to_string()))?;
                children.get(index).copied().ok_or_else(|| ChangeError::NoSuchChild {
                    group: self.validated.config.groups[group].name.clone(),
                    index,
                    children: children.len(),
                })?
            }
        };
        let config = &self.validated.config;
        let owner_index = config.partitions.iter().position(|p| p.name == owner);
        config
            .shared
            .iter()
            .position(|r| Some(r.owner) == owner_index && r.gpa == gpa)
            .ok_or_else(|| ChangeError::NotOwner { partition: owner.to_string(), gpa })
    }

    /// A delegated change: `manager` gives the `child`-th child of the group it manages a new
    /// reservation, checked as [`LiveConfig::with_reservation`] checks any change (the group
    /// cannot give out more than it holds: admission refuses it). Nothing outside that group
    /// can be named.
    pub fn with_child_reservation(
        &self,
        manager: &str,
        child: usize,
        reservation: Reservation,
    ) -> Result<LiveConfig, ChangeError> {
        let (group, children) =
            self.managed_by(manager).ok_or_else(|| ChangeError::NotAManager(manager.to_string()))?;
        let node = children.get(child).ok_or_else(|| ChangeError::NoSuchChild {
            group: self.validated.config.groups[group].name.clone(),
            index: child,
            children: children.len(),
        })?;
        self.with_reservation(node, reservation)
    }
}

/// The reservation a file's entry gives (`None` for an entry the check refuses).
fn raw_value(raw: &RawReservation) -> Option<Reservation> {
    match (&raw.budget_us, &raw.period_us, &raw.share_percent, &raw.weight) {
        (Some(b), Some(p), None, None) => Some(Reservation::Hard { budget_us: *b.get_ref(), period_us: *p.get_ref() }),
        (None, None, Some(s), None) => Some(Reservation::FixedShare { percent: *s.get_ref() }),
        (None, None, None, Some(w)) => Some(Reservation::Weight(*w.get_ref())),
        _ => None,
    }
}

/// `reservation` as the file would say it, every value placed at `span` (the reservation it
/// replaces): an error about it points at that line.
fn raw_reservation(reservation: Reservation, span: Range<usize>) -> Spanned<RawReservation> {
    fn at<T>(span: &Range<usize>, value: T) -> Option<Spanned<T>> {
        Some(Spanned::new(span.clone(), value))
    }
    let none = RawReservation { budget_us: None, period_us: None, share_percent: None, weight: None };
    let raw = match reservation {
        Reservation::Hard { budget_us, period_us } => {
            RawReservation { budget_us: at(&span, budget_us), period_us: at(&span, period_us), ..none }
        }
        Reservation::FixedShare { percent } => RawReservation { share_percent: at(&span, percent), ..none },
        Reservation::Weight(weight) => RawReservation { weight: at(&span, weight), ..none },
    };
    Spanned::new(span, raw)
}
