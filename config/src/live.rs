//! The config of a running machine, changed while it runs: a new reservation for a partition
//! or group goes through the very checks the config got at boot (names, devices, memory,
//! admission of the reservation tree, the planner, IRQ plan), run on the file as parsed then
//! with only that reservation replaced. A refused change prints the error the check would
//! have printed for a file that said so, at the reservation's line in that file.

use alloc::string::{String, ToString};
use core::fmt;
use core::ops::Range;

use toml::Spanned;

use crate::error::{ConfigError, Reporter};
use crate::schema::{RawConfig, RawReservation, Reservation};
use crate::validate::{validate, Machine, Validated};

/// A validated config and what it was validated from, to validate changes of it the same way.
#[derive(Clone)]
pub struct LiveConfig {
    file: String,
    text: String,
    raw: RawConfig,
    /// The machine it was checked against. Payload images are left out: whether a payload
    /// loads does not depend on reservations, and every payload was checked at boot.
    machine: Machine,
    pub validated: Validated,
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
        Ok(LiveConfig { file: file.to_string(), text: text.to_string(), raw, machine, validated })
    }

    /// The config with `node`'s reservation replaced by `reservation`, validated as at boot.
    /// The running machine can switch to it: memory, vCPU homes and IRQ routes are unchanged.
    pub fn with_reservation(&self, node: &str, reservation: Reservation) -> Result<LiveConfig, ChangeError> {
        let mut raw = self.raw.clone();
        let named = |name: &Spanned<String>| name.get_ref() == node;
        let slot = if let Some(p) = raw.partition.iter_mut().find(|p| named(&p.get_ref().name)) {
            &mut p.get_mut().reservation
        } else if let Some(g) = raw.group.iter_mut().find(|g| named(&g.get_ref().name)) {
            &mut g.get_mut().reservation
        } else {
            return Err(ChangeError::UnknownNode(node.to_string()));
        };
        *slot = raw_reservation(reservation, slot.span());
        let reporter = Reporter { file: &self.file, text: &self.text };
        let validated = validate(&reporter, &raw, &self.machine).map_err(ChangeError::Refused)?;
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
        Ok(LiveConfig {
            file: self.file.clone(),
            text: self.text.clone(),
            raw,
            machine: self.machine.clone(),
            validated,
        })
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
