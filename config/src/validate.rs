//! From the parsed file to a validated config: names, references, values, devices, memory
//! placement and admission of the reservation tree. The first problem found is reported.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::{Range, RangeInclusive};

use reservations::{AdmissionError, Field, GroupSpec, NodeRef, PartitionSpec, Problem, Tree, TreeSpec};
use toml::Spanned;

use crate::error::{ConfigError, ErrorKind, Reporter};
use crate::schema::*;
use crate::{dispatch_plan, irq_plan};

/// What is known about the machine the config will run on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Machine {
    /// Number of pCPUs; `None` skips the existence check.
    pub pcpus: Option<u32>,
    /// Host-physical ranges the hypervisor can give to partitions; `None` skips placement.
    pub usable_memory: Option<Vec<Range<u64>>>,
    /// Boot module names available as guest payloads; `None` skips the check.
    pub modules: Option<Vec<String>>,
    /// The contents of the payload modules known here (all of them at boot; on the host, the
    /// ones `phalanx-check --module` was given): each partition's payload must load into it
    /// (`firmware::payload::fits`: size, load address, vCPUs, command line).
    pub module_images: Vec<(String, &'static [u8])>,
}

/// A config that passed every check: nothing in it can fail at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub config: Config,
    /// Per partition (same order as `config.partitions`).
    pub memory: Vec<Placement>,
    pub tree: Tree,
    /// The dispatch tables (in microseconds) and vCPU homes the image runs.
    pub dispatch: dispatch_plan::DispatchPlan,
    /// The device IRQs the partitions own: host vector and pCPU of each.
    pub irqs: irq_plan::IrqPlan,
    /// Per shared region (same order as `config.shared`): its host-physical memory.
    pub shared_memory: Vec<Placement>,
}

pub const MIB: u64 = 1 << 20;
/// Partition memory is placed on 2 MiB boundaries so EPT can map it with large pages.
pub const MEMORY_ALIGN: u64 = 2 * MIB;
const MAX_MEMORY_MB: u64 = 1 << 20; // 1 TiB
const MAX_VCPUS: u32 = 255; // xAPIC IDs
/// A partition's virtual IO-APIC (`vmx::vioapic::PINS`): an owned IRQ arrives on its own pin.
const PARTITION_IOAPIC_PINS: usize = 24;
const MAX_PCPU_INDEX: u32 = 254; // pCPU numbers index xAPIC IDs (0xFF is broadcast)
/// The longest command line the payload loaders take (Linux's boot protocol: 4095 bytes).
const MAX_CMDLINE_BYTES: usize = 4095;
const MAX_NAME_LEN: usize = 32;
/// Largest shared region.
const MAX_SHARED_MB: u64 = 1024;
/// Shared regions end below the IO-APIC's page (0xfec00000), where the device pages begin.
const SHARED_GPA_END: u64 = 0xFEC0_0000;
/// Longest `run_ms` and `stats_interval_ms`: the image turns them into TSC cycles (x 1000 x the
/// TSC's MHz), which must not wrap on any TSC below 100 GHz.
const MAX_DURATION_MS: u64 = 30 * 24 * 3600 * 1000;

/// I/O ports the hypervisor keeps for itself; passing them through would break it.
const HYPERVISOR_PORTS: &[(u16, u16, &str)] = &[
    (0x20, 0x21, "the master PIC"),
    (0x40, 0x43, "the PIT (TSC calibration)"),
    (0x61, 0x61, "the PIT gate / speaker port (TSC calibration)"),
    (0x70, 0x71, "the RTC/CMOS"),
    (0xa0, 0xa1, "the slave PIC"),
    (0xe9, 0xe9, "the Bochs debug port"),
    (0xf4, 0xf4, "the QEMU isa-debug-exit port"),
    (0x3f8, 0x3ff, "COM1, the hypervisor's console"),
    (0xcf8, 0xcff, "PCI configuration space"),
    (0x8900, 0x8900, "the Bochs shutdown port"),
    (0xb000, 0xb03f, "the ACPI PM block (power-off)"),
    // Emulated in every partition (vmx::platform): its own PIC, clock and power control.
    (0x64, 0x64, "the keyboard controller's reset line (emulated per partition)"),
    (0x4d0, 0x4d1, "the PICs' edge/level control (emulated per partition)"),
    (firmware::acpi::PM_BASE, firmware::acpi::PM_END - 1, "each partition's ACPI PM block (emulated)"),
];

/// The hypervisor's own ports that `range` overlaps, if any: (first, last, what they are).
pub fn hypervisor_ports_in(range: &RangeInclusive<u16>) -> Option<(u16, u16, &'static str)> {
    HYPERVISOR_PORTS.iter().copied().find(|(lo, hi, _)| *range.start() <= *hi && *lo <= *range.end())
}

pub(crate) fn validate(r: &Reporter<'_>, raw: &RawConfig, machine: &Machine) -> Result<Validated, ConfigError> {
    Checker { r, raw, machine }.run()
}

/// `previous` with one node's reservation changed to `reservation`, checked as [`validate`]
/// checks the changed file, with its result and its first error, but only where a
/// reservation can make a difference: admission of the node's parent and of the groups below
/// it whose capacity changes (`Tree::with_reservation`, not the node's ancestors: HiRes'
/// depth-independent admission), the plan, and the IRQ routes if a vCPU's home moved. Names,
/// devices, memory, payloads, shared regions, heap and trace do not depend on reservations
/// and stay as checked. `raw` gives the file as it would read with the change, needed only to
/// point a refusal at it. A host test holds it to `validate`'s answers.
pub(crate) fn validate_reservation_change(
    r: &Reporter<'_>,
    raw: impl FnOnce() -> RawConfig,
    machine: &Machine,
    previous: &Validated,
    node: NodeRef,
    reservation: Reservation,
) -> Result<Validated, ConfigError> {
    let raw = core::cell::LazyCell::new(raw);
    let checker = || Checker { r, raw: &raw, machine };
    let tree = previous.tree.with_reservation(node, reservation).map_err(|e| checker().admission_error(e))?;
    let mut config = previous.config.clone();
    match node {
        NodeRef::Group(g) => alloc::sync::Arc::make_mut(&mut config.groups)[g].reservation = reservation,
        NodeRef::Partition(p) => config.partitions[p].reservation = reservation,
        NodeRef::Machine => {}
    }
    let pcpus = pcpus_to_plan(machine, &config);
    let dispatch = dispatch_plan::plan(&config, &tree, pcpus).map_err(|f| checker().plan_error(f))?;
    let irqs = if dispatch.homes == previous.dispatch.homes {
        previous.irqs.clone()
    } else {
        irq_plan::IrqPlan::new(&config, &dispatch.homes).map_err(|f| checker().plan_error(f))?
    };
    Ok(Validated {
        config,
        memory: previous.memory.clone(),
        tree,
        dispatch,
        irqs,
        shared_memory: previous.shared_memory.clone(),
    })
}

/// The pCPUs the machine has, or (on the host without --pcpus) the ones the config names.
fn pcpus_to_plan(machine: &Machine, config: &Config) -> u32 {
    let named_pcpus = config.partitions.iter().flat_map(|p| p.pcpus.iter()).max().map_or(1, |&c| c + 1);
    machine.pcpus.unwrap_or(named_pcpus)
}

struct Checker<'a> {
    r: &'a Reporter<'a>,
    raw: &'a RawConfig,
    machine: &'a Machine,
}

fn partition_subject(p: &RawPartition) -> Option<String> {
    Some(format!("partition \"{}\"", p.name.get_ref()))
}

fn group_subject(g: &RawGroup) -> Option<String> {
    Some(format!("group \"{}\"", g.name.get_ref()))
}

fn hv_subject() -> Option<String> {
    Some("[hypervisor]".to_string())
}

fn mib(bytes: u64) -> u64 {
    bytes / MIB
}

impl Checker<'_> {
    fn run(&self) -> Result<Validated, ConfigError> {
        let hypervisor = self.hypervisor()?;
        if self.raw.partition.is_empty() {
            return Err(self.r.at(
                0..0,
                None,
                Some("partition"),
                ErrorKind::InvalidValue,
                "no [[partition]] is defined",
            ));
        }
        self.names()?;
        let group_index = self.group_index();
        let groups =
            self.raw.group.iter().map(|g| self.group(g.get_ref(), &group_index)).collect::<Result<Vec<_>, _>>()?;
        let partitions = self
            .raw
            .partition
            .iter()
            .map(|p| self.partition(p.get_ref(), p.span(), &group_index))
            .collect::<Result<Vec<_>, _>>()?;
        self.device_conflicts(&partitions)?;
        let hypervisor = self.control_channel(hypervisor, &partitions)?;
        self.enforced(&hypervisor)?;
        let memory = self.place_memory(&partitions)?;
        self.payloads_fit(&partitions, &memory)?;
        let shared = self.shared_regions(&partitions)?;
        let shared_memory = self.place_shared(&shared, &memory)?;
        let config = Config { hypervisor, groups: alloc::sync::Arc::new(groups), partitions, shared };
        let tree = self.admit(&config, &group_index)?;
        let pcpus = pcpus_to_plan(self.machine, &config);
        let dispatch = dispatch_plan::plan(&config, &tree, pcpus).map_err(|f| self.plan_error(f))?;
        self.trace_fits(&config.hypervisor, pcpus)?;
        self.heap_fits(&config, pcpus)?;
        let irqs = irq_plan::IrqPlan::new(&config, &dispatch.homes).map_err(|f| self.plan_error(f))?;
        Ok(Validated { config, memory, tree, dispatch, irqs, shared_memory })
    }

    /// Every pCPU gets a trace buffer of `trace_events`, all of them from the heap.
    /// The image's heap holds what the partitions need (`Config::heap_estimate`, an
    /// over-estimate): refused at the partition with which it would not.
    fn heap_fits(&self, config: &Config, pcpus: u32) -> Result<(), ConfigError> {
        let mut total = HEAP_FIXED_BYTES + pcpus as u64 * HEAP_PER_PCPU_BYTES;
        let kib = |bytes: u64| bytes >> 10;
        if total > HEAP_BYTES {
            let span = self.raw.hypervisor.as_ref().map_or(0..0, Spanned::span);
            let message = format!(
                "the hypervisor's {} MiB heap cannot hold the state of {pcpus} pCPUs ({} KiB each)",
                HEAP_BYTES / MIB,
                kib(HEAP_PER_PCPU_BYTES)
            );
            return Err(self.r.at(span, hv_subject(), None, ErrorKind::Memory, message));
        }
        for (p, raw) in config.partitions.iter().zip(&self.raw.partition) {
            total += heap_of_partition(p.vcpus, p.memory.size(), p.devices.irqs.len());
            if total > HEAP_BYTES {
                let raw = raw.get_ref();
                let message = format!(
                    "the hypervisor's {} MiB heap cannot hold this partition too: {} KiB per vCPU, {} KiB per \
                     partition, {} KiB per device IRQ and {} KiB of EPT per GiB come to {} KiB with it",
                    HEAP_BYTES / MIB,
                    kib(HEAP_PER_VCPU_BYTES),
                    kib(HEAP_PER_PARTITION_BYTES),
                    kib(HEAP_PER_IRQ_BYTES),
                    kib(HEAP_EPT_PER_GIB_BYTES),
                    kib(total)
                );
                return Err(self.r.at(
                    raw.vcpus.span(),
                    partition_subject(raw),
                    Some("vcpus"),
                    ErrorKind::Memory,
                    message,
                ));
            }
        }
        Ok(())
    }

    fn trace_fits(&self, hypervisor: &HypervisorConfig, pcpus: u32) -> Result<(), ConfigError> {
        let bytes = hypervisor.trace_events.saturating_mul(TRACE_EVENT_BYTES).saturating_mul(pcpus as u64);
        let Some(v) = self.raw.hypervisor.as_ref().and_then(|h| h.get_ref().trace_events.as_ref()) else {
            return Ok(());
        };
        if bytes <= MAX_TRACE_BYTES {
            return Ok(());
        }
        let most = MAX_TRACE_BYTES / TRACE_EVENT_BYTES / pcpus as u64;
        Err(self.r.at(
            v.span(),
            hv_subject(),
            Some("trace_events"),
            ErrorKind::InvalidValue,
            format!(
                "{pcpus} pCPUs x {} events x {TRACE_EVENT_BYTES} bytes exceeds the {} MiB the trace may take; at most {most} events per pCPU",
                hypervisor.trace_events,
                MAX_TRACE_BYTES / MIB
            ),
        ))
    }

    fn hypervisor(&self) -> Result<HypervisorConfig, ConfigError> {
        let raw = self.raw.hypervisor.as_ref().map(Spanned::get_ref);
        let invalid = |span: Range<usize>, field: &str, message: String| {
            self.r.at(span, hv_subject(), Some(field), ErrorKind::InvalidValue, message)
        };
        let major_frame_us = match raw.and_then(|h| h.major_frame_us.as_ref()) {
            Some(v) if !(MIN_MAJOR_FRAME_US..=MAX_MAJOR_FRAME_US).contains(v.get_ref()) => {
                return Err(invalid(
                    v.span(),
                    "major_frame_us",
                    format!("{} us is outside {MIN_MAJOR_FRAME_US} us ..= 10 s", v.get_ref()),
                ));
            }
            Some(v) => *v.get_ref(),
            None => DEFAULT_MAJOR_FRAME_US,
        };
        let policy = raw.and_then(|h| h.policy.as_ref()).map_or(DispatchPolicy::Gang, |p| *p.get_ref());
        let stats_interval_ms = match raw.and_then(|h| h.stats_interval_ms.as_ref()) {
            Some(v) if *v.get_ref() == 0 => {
                return Err(invalid(v.span(), "stats_interval_ms", "must be at least 1 ms".into()))
            }
            Some(v) if *v.get_ref() > MAX_DURATION_MS => {
                return Err(invalid(v.span(), "stats_interval_ms", format!("at most {MAX_DURATION_MS} ms (30 days)")))
            }
            Some(v) => *v.get_ref(),
            None => DEFAULT_STATS_INTERVAL_MS,
        };
        let run_ms = match raw.and_then(|h| h.run_ms.as_ref()) {
            Some(v) if *v.get_ref() == 0 => {
                return Err(invalid(
                    v.span(),
                    "run_ms",
                    "must be at least 1 ms (leave it out to run until `scripts/phalanx ctl end`)".into(),
                ))
            }
            Some(v) if *v.get_ref() > MAX_DURATION_MS => {
                return Err(invalid(v.span(), "run_ms", format!("at most {MAX_DURATION_MS} ms (30 days)")))
            }
            v => v.map(|v| *v.get_ref()),
        };
        let skew_bound_us = match (raw.and_then(|h| h.skew_bound_us.as_ref()), policy) {
            (Some(v), DispatchPolicy::RelaxedCo) => {
                if *v.get_ref() == 0 || *v.get_ref() >= major_frame_us {
                    return Err(invalid(
                        v.span(),
                        "skew_bound_us",
                        format!("must be above 0 and below the major frame ({major_frame_us} us)"),
                    ));
                }
                Some(*v.get_ref())
            }
            (Some(v), other) => {
                return Err(invalid(
                    v.span(),
                    "skew_bound_us",
                    format!("only policy \"relaxed-co\" uses a skew bound; the policy is \"{}\"", other.as_str()),
                ))
            }
            (None, DispatchPolicy::RelaxedCo) => Some(major_frame_us / 10),
            (None, _) => None,
        };
        let spin_sample_us = match raw.and_then(|h| h.spin_sample_us.as_ref()) {
            Some(v) if *v.get_ref() != 0 && !(MIN_SPIN_SAMPLE_US..=MAX_SPIN_SAMPLE_US).contains(v.get_ref()) => {
                return Err(invalid(
                    v.span(),
                    "spin_sample_us",
                    format!("must be 0 (no sampling) or {MIN_SPIN_SAMPLE_US} ..= {MAX_SPIN_SAMPLE_US} us"),
                ))
            }
            Some(v) => *v.get_ref(),
            None => DEFAULT_SPIN_SAMPLE_US,
        };
        let trace_events = match raw.and_then(|h| h.trace_events.as_ref()) {
            Some(v) if *v.get_ref() != 0 && *v.get_ref() < MIN_TRACE_EVENTS => {
                return Err(invalid(
                    v.span(),
                    "trace_events",
                    format!("must be 0 (no trace) or at least {MIN_TRACE_EVENTS} events per pCPU"),
                ))
            }
            Some(v) => *v.get_ref(),
            None => DEFAULT_TRACE_EVENTS,
        };
        Ok(HypervisorConfig {
            major_frame_us,
            policy,
            stats_interval_ms,
            run_ms,
            // Settled once the partitions' devices are known (`control_channel`).
            control: raw.and_then(|h| h.control.as_ref()).map_or(ControlChannel::Com2, |c| *c.get_ref()),
            skew_bound_us,
            spin_sample_us,
            trace_events,
        })
    }

    /// Names are printed in logs and JSON records and are the tree's node names: one
    /// namespace for groups and partitions.
    fn names(&self) -> Result<(), ConfigError> {
        let mut seen: BTreeMap<&str, (&str, Range<usize>)> = BTreeMap::new();
        // In file order, so a clash is reported at the later of the two nodes.
        let mut all: Vec<(&str, &Spanned<String>)> = self
            .raw
            .group
            .iter()
            .map(|g| ("group", &g.get_ref().name))
            .chain(self.raw.partition.iter().map(|p| ("partition", &p.get_ref().name)))
            .collect();
        all.sort_by_key(|(_, name)| name.span().start);
        for (kind, name) in all {
            let subject = Some(format!("{kind} \"{}\"", name.get_ref()));
            let text = name.get_ref().as_str();
            let valid = !text.is_empty()
                && text.len() <= MAX_NAME_LEN
                && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                return Err(self.r.at(
                    name.span(),
                    subject,
                    Some("name"),
                    ErrorKind::InvalidValue,
                    format!("names are 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '-' and '_'"),
                ));
            }
            if let Some((first_kind, first_span)) = seen.get(text) {
                let (line, _) = crate::error::line_column(self.r.text, first_span.start);
                return Err(self.r.at(
                    name.span(),
                    subject,
                    Some("name"),
                    ErrorKind::DuplicateName,
                    format!("the name is already used by the {first_kind} on line {line}"),
                ));
            }
            seen.insert(text, (kind, name.span()));
        }
        Ok(())
    }

    fn group_index(&self) -> BTreeMap<&str, usize> {
        self.raw.group.iter().enumerate().map(|(i, g)| (g.get_ref().name.get_ref().as_str(), i)).collect()
    }

    fn resolve_group(
        &self,
        reference: &Spanned<String>,
        subject: Option<String>,
        field: &str,
        index: &BTreeMap<&str, usize>,
    ) -> Result<usize, ConfigError> {
        let name = reference.get_ref();
        index.get(name.as_str()).copied().ok_or_else(|| {
            let is_partition = self.raw.partition.iter().any(|p| p.get_ref().name.get_ref() == name);
            let message = if is_partition {
                format!("\"{name}\" is a partition; only a [[group]] can hold children")
            } else {
                format!("no [[group]] is named \"{name}\"")
            };
            self.r.at(reference.span(), subject, Some(field), ErrorKind::UnknownName, message)
        })
    }

    fn reservation(&self, raw: &Spanned<RawReservation>, subject: Option<String>) -> Result<Reservation, ConfigError> {
        let r = raw.get_ref();
        let invalid = |span: Range<usize>, message: &str| {
            self.r.at(span, subject.clone(), Some("reservation"), ErrorKind::InvalidValue, message.to_string())
        };
        let kinds = [r.budget_us.is_some() || r.period_us.is_some(), r.share_percent.is_some(), r.weight.is_some()];
        if kinds.iter().filter(|&&k| k).count() != 1 {
            return Err(invalid(
                raw.span(),
                "give exactly one of { budget_us, period_us } (hard), { share_percent } (fixed share) or { weight } (soft)",
            ));
        }
        Ok(match (&r.budget_us, &r.period_us, &r.share_percent, &r.weight) {
            (Some(b), Some(p), _, _) => Reservation::Hard { budget_us: *b.get_ref(), period_us: *p.get_ref() },
            (Some(_), None, _, _) => return Err(invalid(raw.span(), "`budget_us` needs a `period_us`")),
            (None, Some(_), _, _) => return Err(invalid(raw.span(), "`period_us` needs a `budget_us`")),
            (_, _, Some(s), _) => Reservation::FixedShare { percent: *s.get_ref() },
            (_, _, _, Some(w)) => Reservation::Weight(*w.get_ref()),
            (None, None, None, None) => unreachable!("exactly one kind is present"),
        })
    }

    fn group(&self, g: &RawGroup, index: &BTreeMap<&str, usize>) -> Result<GroupConfig, ConfigError> {
        let subject = group_subject(g);
        if let Some(parent) = &g.parent {
            self.resolve_group(parent, subject.clone(), "parent", index)?;
        }
        if let Some(c) = g.pcpus.iter().flat_map(|list| list.get_ref()).find(|c| *c.get_ref() > MAX_PCPU_INDEX) {
            let message = format!("pCPU {} is above {MAX_PCPU_INDEX} (xAPIC IDs)", c.get_ref());
            return Err(self.r.at(c.span(), subject, Some("pcpus"), ErrorKind::InvalidValue, message));
        }
        if let Some(manager) = g.manager.as_ref() {
            let name = manager.get_ref();
            if !self.raw.partition.iter().any(|p| p.get_ref().name.get_ref() == name) {
                let message = if index.contains_key(name.as_str()) {
                    format!("\"{name}\" is a group; a group's manager is a partition")
                } else {
                    format!("no [[partition]] is named \"{name}\"")
                };
                return Err(self.r.at(manager.span(), subject, Some("manager"), ErrorKind::UnknownName, message));
            }
        }
        Ok(GroupConfig {
            name: g.name.get_ref().clone(),
            parent: g.parent.as_ref().map(|p| p.get_ref().clone()),
            reservation: self.reservation(&g.reservation, subject)?,
            pcpus: g.pcpus.as_ref().map(|list| list.get_ref().iter().map(|p| *p.get_ref()).collect()),
            policy: g.policy.as_ref().map_or(ChildPolicy::Any, |p| (*p.get_ref()).into()),
            manager: g.manager.as_ref().map(|m| m.get_ref().clone()),
        })
    }

    /// `table`: where the partition's table is (a missing key points there, like serde's).
    fn partition(
        &self,
        p: &RawPartition,
        table: Range<usize>,
        index: &BTreeMap<&str, usize>,
    ) -> Result<PartitionConfig, ConfigError> {
        let subject = partition_subject(p);
        let invalid = |span: Range<usize>, field: &str, message: String| {
            self.r.at(span, subject.clone(), Some(field), ErrorKind::InvalidValue, message)
        };
        if let Some(group) = &p.group {
            self.resolve_group(group, subject.clone(), "group", index)?;
        }
        if *p.vcpus.get_ref() > MAX_VCPUS {
            return Err(invalid(p.vcpus.span(), "vcpus", format!("at most {MAX_VCPUS} vCPUs (xAPIC IDs)")));
        }
        let memory = match (&p.memory_mb, &p.memory) {
            (Some(_), Some(explicit)) => {
                return Err(invalid(explicit.span(), "memory", "give either `memory_mb` or `memory`, not both".into()))
            }
            (None, None) => {
                return Err(invalid(
                    table,
                    "memory_mb",
                    "missing: give `memory_mb = N` or `memory = { base = 0x..., size_mb = N }`".into(),
                ))
            }
            (Some(mb), None) => MemoryRequest::Allocate { size: self.memory_size(mb, &subject, "memory_mb")? },
            (None, Some(explicit)) => {
                let m = explicit.get_ref();
                let size = self.memory_size(&m.size_mb, &subject, "memory.size_mb")?;
                let base = *m.base.get_ref();
                if base % MEMORY_ALIGN != 0 {
                    return Err(invalid(m.base.span(), "memory.base", format!("base {base:#x} is not 2 MiB aligned")));
                }
                if base.checked_add(size).is_none() {
                    return Err(invalid(
                        m.base.span(),
                        "memory.base",
                        format!("base {base:#x} + size runs past the address space"),
                    ));
                }
                MemoryRequest::Fixed { base, size }
            }
        };
        let guest = p.guest.get_ref();
        if guest.module.get_ref().is_empty() {
            return Err(invalid(guest.module.span(), "guest.module", "the module name is empty".into()));
        }
        if let Some(initrd) = guest.initrd.as_ref().filter(|i| i.get_ref().is_empty()) {
            return Err(invalid(initrd.span(), "guest.initrd", "the module name is empty".into()));
        }
        if let Some(modules) = &self.machine.modules {
            let named = core::iter::once((&guest.module, "guest.module"))
                .chain(guest.initrd.iter().map(|i| (i, "guest.initrd")));
            for (module, field) in named {
                if !modules.iter().any(|m| m == module.get_ref()) {
                    let present = if modules.is_empty() { String::from("none") } else { modules.join(", ") };
                    return Err(invalid(
                        module.span(),
                        field,
                        format!("no boot module named \"{}\" (modules present: {present})", module.get_ref()),
                    ));
                }
            }
        }
        if let Some(cmdline) = &guest.cmdline {
            // What both payload loaders (Linux's boot protocol, the test guest) take.
            let text = cmdline.get_ref();
            if text.len() > MAX_CMDLINE_BYTES {
                let message = format!("{} bytes; the loaders take at most {MAX_CMDLINE_BYTES}", text.len());
                return Err(invalid(cmdline.span(), "guest.cmdline", message));
            }
            if let Some(c) = text.chars().find(|c| c.is_control()) {
                let message = format!("contains the control character {:?}; a command line is one line of text", c);
                return Err(invalid(cmdline.span(), "guest.cmdline", message));
            }
        }
        if let Some(c) = p.pcpus.get_ref().iter().find(|c| *c.get_ref() > MAX_PCPU_INDEX) {
            return Err(invalid(
                c.span(),
                "pcpus",
                format!("pCPU {} is above {MAX_PCPU_INDEX} (xAPIC IDs)", c.get_ref()),
            ));
        }
        Ok(PartitionConfig {
            name: p.name.get_ref().clone(),
            group: p.group.as_ref().map(|g| g.get_ref().clone()),
            vcpus: *p.vcpus.get_ref(),
            pcpus: p.pcpus.get_ref().iter().map(|c| *c.get_ref()).collect(),
            memory,
            reservation: self.reservation(&p.reservation, subject.clone())?,
            policy: p.policy.as_ref().map_or(NestedPolicy::Gang, |n| (*n.get_ref()).into()),
            guest: Guest {
                module: guest.module.get_ref().clone(),
                cmdline: guest.cmdline.as_ref().map_or_else(String::new, |c| c.get_ref().clone()),
                initrd: guest.initrd.as_ref().map(|i| i.get_ref().clone()),
            },
            devices: self.devices(p, &subject)?,
            on_fault: p.on_fault.as_ref().map_or(OnFault::Stop, |o| *o.get_ref()),
            on_reboot: p.on_reboot.as_ref().map_or(OnReboot::Reset, |o| *o.get_ref()),
            on_poweroff: p.on_poweroff.as_ref().map_or(OnPoweroff::Stop, |o| *o.get_ref()),
        })
    }

    fn memory_size(&self, mb: &Spanned<u64>, subject: &Option<String>, field: &str) -> Result<u64, ConfigError> {
        match *mb.get_ref() {
            0 => Err(self.r.at(
                mb.span(),
                subject.clone(),
                Some(field),
                ErrorKind::InvalidValue,
                "a partition needs at least 1 MiB",
            )),
            n if n > MAX_MEMORY_MB => Err(self.r.at(
                mb.span(),
                subject.clone(),
                Some(field),
                ErrorKind::InvalidValue,
                format!("{n} MiB is more than the {MAX_MEMORY_MB} MiB a partition may have"),
            )),
            n => Ok(n * MIB),
        }
    }

    fn devices(&self, p: &RawPartition, subject: &Option<String>) -> Result<Devices, ConfigError> {
        let Some(raw) = p.devices.as_ref().map(Spanned::get_ref) else {
            return Ok(Devices::default());
        };
        let conflict = |span: Range<usize>, field: &str, message: String| {
            self.r.at(span, subject.clone(), Some(field), ErrorKind::DeviceConflict, message)
        };
        let mut devices = Devices::default();
        for entry in &raw.ioports {
            let range = parse_port_range(entry.get_ref()).map_err(|message| {
                self.r.at(entry.span(), subject.clone(), Some("devices.ioports"), ErrorKind::InvalidValue, message)
            })?;
            if let Some((lo, hi, what)) = hypervisor_ports_in(&range) {
                return Err(conflict(
                    entry.span(),
                    "devices.ioports",
                    format!("ports {lo:#x}-{hi:#x} belong to the hypervisor ({what})"),
                ));
            }
            devices.ioports.push(range);
        }
        for irq in &raw.irqs {
            let message = match *irq.get_ref() {
                0 => Some("IRQ 0 is the PIT, which the hypervisor keeps"),
                2 => Some("IRQ 2 is the PIC cascade, never a device"),
                4 => Some("IRQ 4 is COM1's, the hypervisor's console (its input interrupt)"),
                n if n as usize >= PARTITION_IOAPIC_PINS => {
                    Some("a partition's IO-APIC has 24 pins: an IRQ (GSI) is delivered on its own pin, 1-23")
                }
                _ => None,
            };
            if let Some(message) = message {
                return Err(conflict(irq.span(), "devices.irqs", message.into()));
            }
            devices.irqs.push(*irq.get_ref());
        }
        if let Some(serial) = &raw.serial {
            let port = *serial.get_ref();
            if port == SerialPort::Com1 {
                return Err(conflict(serial.span(), "devices.serial", "com1 is the hypervisor's console".into()));
            }
            if port.irq() == SerialPort::Com1.irq() {
                let message = format!(
                    "{} shares IRQ {} with com1, the hypervisor's console (an ISA edge cannot be shared)",
                    port.as_str(),
                    port.irq()
                );
                return Err(conflict(serial.span(), "devices.serial", message));
            }
            devices.serial = Some(port);
            devices.ioports.push(port.ports());
            devices.irqs.push(port.irq());
        }
        for entry in &raw.pci {
            let function = PciFunction::parse(entry.get_ref()).map_err(|message| {
                self.r.at(entry.span(), subject.clone(), Some("devices.pci"), ErrorKind::InvalidValue, message)
            })?;
            if devices.pci.contains(&function) {
                return Err(self.r.at(
                    entry.span(),
                    subject.clone(),
                    Some("devices.pci"),
                    ErrorKind::InvalidValue,
                    format!("{function} is named twice"),
                ));
            }
            devices.pci.push(function);
        }
        devices.pci.sort_unstable();
        devices.ioports.sort_by_key(|r| *r.start());
        devices.irqs.sort_unstable();
        devices.irqs.dedup();
        Ok(devices)
    }

    /// COM2 is the control channel unless a partition owns its ports or IRQ: asked for
    /// (`control = "com2"`), such a partition is refused; left out, the machine has none.
    fn control_channel(
        &self,
        mut hypervisor: HypervisorConfig,
        partitions: &[PartitionConfig],
    ) -> Result<HypervisorConfig, ConfigError> {
        let com2 = SerialPort::Com2;
        let owner = partitions.iter().enumerate().find(|(_, p)| {
            p.devices.irqs.contains(&com2.irq())
                || p.devices
                    .ioports
                    .iter()
                    .any(|r| *r.start() <= *com2.ports().end() && *com2.ports().start() <= *r.end())
        });
        let asked = self.raw.hypervisor.as_ref().and_then(|h| h.get_ref().control.as_ref());
        match (owner, asked) {
            (Some(_), None) => hypervisor.control = ControlChannel::None,
            (Some((i, p)), Some(c)) if *c.get_ref() == ControlChannel::Com2 => {
                let raw = self.raw.partition[i].get_ref();
                let span = raw.devices.as_ref().map_or(raw.name.span(), Spanned::span);
                let message = format!(
                    "COM2 (ports {:#x}-{:#x}, IRQ {}) is the hypervisor's control channel ([hypervisor] control = \"com2\" \
                     on line {}): set control = \"none\" to pass it to partition \"{}\"",
                    com2.ports().start(),
                    com2.ports().end(),
                    com2.irq(),
                    crate::error::line_column(self.r.text, c.span().start).0,
                    p.name
                );
                return Err(self.r.at(
                    span,
                    partition_subject(raw),
                    Some("devices"),
                    ErrorKind::DeviceConflict,
                    message,
                ));
            }
            _ => {}
        }
        Ok(hypervisor)
    }

    /// Settings the schema knows that the image would not act on are refused rather than
    /// accepted and ignored (checked after conflicts, which stay reported as such).
    fn enforced(&self, hypervisor: &HypervisorConfig) -> Result<(), ConfigError> {
        for raw in self.raw.partition.iter().map(Spanned::get_ref) {
            let refuse = |span: Range<usize>, field: &str, message: &str| {
                Err(self.r.at(span, partition_subject(raw), Some(field), ErrorKind::InvalidValue, message))
            };
            if let Some(policy) = raw.policy.as_ref().filter(|_| !hypervisor.policy.aligned()) {
                let message = format!(
                    "a partition's policy (how its vCPUs share its gang slots) applies only to gang dispatch; \
                     under the hypervisor's \"{}\" each vCPU runs on its own",
                    hypervisor.policy.as_str()
                );
                return refuse(policy.span(), "policy", &message);
            }
        }
        Ok(())
    }

    /// Each partition's payload, where its contents are known, loads into the partition: the
    /// loader's own checks, made before anything is started.
    fn payloads_fit(&self, partitions: &[PartitionConfig], memory: &[Placement]) -> Result<(), ConfigError> {
        for ((p, placement), raw) in partitions.iter().zip(memory).zip(&self.raw.partition) {
            let module = &p.guest.module;
            let image_of = |wanted: &str| self.machine.module_images.iter().find(|(name, _)| name == wanted);
            let Some((_, image)) = image_of(module) else {
                continue;
            };
            // An initrd named but not among the images (the host check without it) is assumed
            // to fit; the loader's own check at boot has every module.
            let initrd_len = p.guest.initrd.as_ref().map(|initrd| image_of(initrd).map_or(0, |(_, bytes)| bytes.len()));
            if let Err(why) = firmware::payload::fits(image, initrd_len, placement.size(), p.vcpus, &p.guest.cmdline) {
                let raw = raw.get_ref();
                return Err(self.r.at(
                    raw.guest.get_ref().module.span(),
                    partition_subject(raw),
                    Some("guest.module"),
                    ErrorKind::InvalidValue,
                    format!("\"{module}\" does not load into this partition: {why}"),
                ));
            }
        }
        Ok(())
    }

    /// Every port and IRQ has at most one owner partition.
    fn device_conflicts(&self, partitions: &[PartitionConfig]) -> Result<(), ConfigError> {
        for (later, p) in partitions.iter().enumerate() {
            let raw = self.raw.partition[later].get_ref();
            let subject = partition_subject(raw);
            let Some(raw_devices) = raw.devices.as_ref() else { continue };
            for earlier in &partitions[..later] {
                let owner = &earlier.name;
                for range in &p.devices.ioports {
                    if let Some(theirs) =
                        earlier.devices.ioports.iter().find(|t| t.start() <= range.end() && range.start() <= t.end())
                    {
                        // Point at the entry that claims the range: a listed one or the serial port.
                        let (span, field) = raw_devices
                            .get_ref()
                            .ioports
                            .iter()
                            .find(|e| parse_port_range(e.get_ref()).ok().as_ref() == Some(range))
                            .map(|e| (e.span(), "devices.ioports"))
                            .or_else(|| raw_devices.get_ref().serial.as_ref().map(|s| (s.span(), "devices.serial")))
                            .unwrap_or((raw_devices.span(), "devices"));
                        return Err(self.r.at(
                            span,
                            subject,
                            Some(field),
                            ErrorKind::DeviceConflict,
                            format!(
                                "ports {:#x}-{:#x} are already owned by partition \"{owner}\" ({:#x}-{:#x})",
                                range.start(),
                                range.end(),
                                theirs.start(),
                                theirs.end()
                            ),
                        ));
                    }
                }
                for function in &p.devices.pci {
                    if earlier.devices.pci.contains(function) {
                        let entry = raw_devices
                            .get_ref()
                            .pci
                            .iter()
                            .find(|e| PciFunction::parse(e.get_ref()).ok() == Some(*function));
                        return Err(self.r.at(
                            entry.map_or(raw_devices.span(), Spanned::span),
                            subject,
                            Some("devices.pci"),
                            ErrorKind::DeviceConflict,
                            format!("PCI function {function} is already owned by partition \"{owner}\""),
                        ));
                    }
                }
                for irq in &p.devices.irqs {
                    if earlier.devices.irqs.contains(irq) {
                        let (span, field) = raw_devices
                            .get_ref()
                            .irqs
                            .iter()
                            .find(|i| i.get_ref() == irq)
                            .map(|i| (i.span(), "devices.irqs"))
                            .or_else(|| raw_devices.get_ref().serial.as_ref().map(|s| (s.span(), "devices.serial")))
                            .unwrap_or((raw_devices.span(), "devices"));
                        return Err(self.r.at(
                            span,
                            subject,
                            Some(field),
                            ErrorKind::DeviceConflict,
                            format!("IRQ {irq} is already owned by partition \"{owner}\""),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Explicit regions where they are asked for, the rest first-fit, 2 MiB aligned.
    fn place_memory(&self, partitions: &[PartitionConfig]) -> Result<Vec<Placement>, ConfigError> {
        let usable = self.machine.usable_memory.as_ref().map(|u| normalise(u));
        let mut placements: Vec<Option<Placement>> = alloc::vec![None; partitions.len()];
        let mut taken: Vec<(Range<u64>, usize)> = Vec::new();
        for (i, p) in partitions.iter().enumerate() {
            let MemoryRequest::Fixed { base, size } = p.memory else { continue };
            let region = base..base + size;
            let raw = self.raw.partition[i].get_ref();
            let span = raw.memory.as_ref().map_or(raw.name.span(), Spanned::span);
            let err = |message: String| {
                self.r.at(span.clone(), partition_subject(raw), Some("memory"), ErrorKind::Memory, message)
            };
            if let Some(usable) = &usable {
                if !usable.iter().any(|u| u.start <= region.start && region.end <= u.end) {
                    return Err(err(format!(
                        "{:#x}-{:#x} is not inside usable memory ({})",
                        region.start,
                        region.end,
                        describe_ranges(usable)
                    )));
                }
            }
            if let Some((other, owner)) = taken.iter().find(|(t, _)| t.start < region.end && region.start < t.end) {
                return Err(err(format!(
                    "{:#x}-{:#x} overlaps partition \"{}\" ({:#x}-{:#x})",
                    region.start, region.end, partitions[*owner].name, other.start, other.end
                )));
            }
            taken.push((region.clone(), i));
            placements[i] = Some(Placement::At(region));
        }
        let mut free: Option<Vec<Range<u64>>> = usable.map(|u| subtract(&u, taken.iter().map(|(r, _)| r)));
        for (i, p) in partitions.iter().enumerate() {
            let MemoryRequest::Allocate { size } = p.memory else { continue };
            let Some(free) = free.as_mut() else {
                placements[i] = Some(Placement::Deferred { size });
                continue;
            };
            let Some(start) = take_first_fit(free, size) else {
                let raw = self.raw.partition[i].get_ref();
                let span = raw.memory_mb.as_ref().map_or(raw.name.span(), Spanned::span);
                let largest = free
                    .iter()
                    .map(|f| f.start.checked_next_multiple_of(MEMORY_ALIGN).map_or(0, |s| f.end.saturating_sub(s)))
                    .max()
                    .unwrap_or(0);
                let total: u64 = self.machine.usable_memory.iter().flatten().map(|u| u.end - u.start).sum();
                return Err(self.r.at(
                    span,
                    partition_subject(raw),
                    Some("memory_mb"),
                    ErrorKind::Memory,
                    format!(
                        "{} MiB does not fit: the largest free 2 MiB-aligned block left is {} MiB (the machine has {} MiB usable)",
                        mib(size),
                        mib(largest),
                        mib(total)
                    ),
                ));
            };
            placements[i] = Some(Placement::At(start..start + size));
        }
        Ok(placements.into_iter().map(|p| p.expect("every partition was placed")).collect())
    }

    /// `[[shared]]` regions: named like nodes, owned by a partition, mapped by others at a
    /// guest-physical address clear of each one's own memory and of the device pages.
    fn shared_regions(&self, partitions: &[PartitionConfig]) -> Result<Vec<SharedRegion>, ConfigError> {
        let mut regions: Vec<SharedRegion> = Vec::new();
        for raw in self.raw.shared.iter().map(Spanned::get_ref) {
            let subject = Some(format!("shared \"{}\"", raw.name.get_ref()));
            let invalid = |span: Range<usize>, field: &str, kind: ErrorKind, message: String| {
                self.r.at(span, subject.clone(), Some(field), kind, message)
            };
            let name = raw.name.get_ref();
            let valid = !name.is_empty()
                && name.len() <= MAX_NAME_LEN
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                let message = format!("names are 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '-' and '_'");
                return Err(invalid(raw.name.span(), "name", ErrorKind::InvalidValue, message));
            }
            if regions.iter().any(|r| &r.name == name) {
                let message = "another [[shared]] region has this name".into();
                return Err(invalid(raw.name.span(), "name", ErrorKind::DuplicateName, message));
            }
            let size = match *raw.size_mb.get_ref() {
                n @ 1..=MAX_SHARED_MB => n * MIB,
                n => {
                    let message = format!("{n} MiB: a shared region has 1 to {MAX_SHARED_MB} MiB");
                    return Err(invalid(raw.size_mb.span(), "size_mb", ErrorKind::InvalidValue, message));
                }
            };
            let gpa = *raw.gpa.get_ref();
            if gpa % MEMORY_ALIGN != 0 || gpa.checked_add(size).is_none_or(|end| end > SHARED_GPA_END) {
                let message = format!(
                    "{gpa:#x}: the region must start on a 2 MiB boundary and end below {SHARED_GPA_END:#x} (the \
                     IO-APIC and local APIC pages)"
                );
                return Err(invalid(raw.gpa.span(), "gpa", ErrorKind::InvalidValue, message));
            }
            let index = |who: &Spanned<String>, field: &str| -> Result<usize, ConfigError> {
                partitions.iter().position(|p| &p.name == who.get_ref()).ok_or_else(|| {
                    let message = format!("no [[partition]] is named \"{}\"", who.get_ref());
                    invalid(who.span(), field, ErrorKind::UnknownName, message)
                })
            };
            let owner = index(&raw.owner, "owner")?;
            let mut seen = alloc::vec![owner];
            let mut list = |names: &[Spanned<String>], field: &str| -> Result<Vec<usize>, ConfigError> {
                let mut out = Vec::new();
                for who in names {
                    let i = index(who, field)?;
                    if seen.contains(&i) {
                        let message =
                            format!("\"{}\" is named twice (owner, readers and writers are distinct)", who.get_ref());
                        return Err(invalid(who.span(), field, ErrorKind::InvalidValue, message));
                    }
                    seen.push(i);
                    out.push(i);
                }
                Ok(out)
            };
            let readers = list(&raw.readers, "readers")?;
            let writers = list(&raw.writers, "writers")?;
            // Above each mapper's own memory: guest-physical addresses below it are its RAM.
            if let Some(&p) = seen.iter().find(|&&p| gpa < partitions[p].memory.size()) {
                let message = format!(
                    "{gpa:#x} is inside partition \"{}\"'s own memory ({} MiB from 0): put the region above it",
                    partitions[p].name,
                    mib(partitions[p].memory.size())
                );
                return Err(invalid(raw.gpa.span(), "gpa", ErrorKind::Memory, message));
            }
            regions.push(SharedRegion { name: name.clone(), size, gpa, owner, readers, writers });
        }
        Ok(regions)
    }

    /// Host memory for the shared regions: first fit, 2 MiB aligned, after the partitions.
    fn place_shared(&self, regions: &[SharedRegion], partitions: &[Placement]) -> Result<Vec<Placement>, ConfigError> {
        let Some(usable) = self.machine.usable_memory.as_ref().map(|u| normalise(u)) else {
            return Ok(regions.iter().map(|r| Placement::Deferred { size: r.size }).collect());
        };
        let mut free = subtract(
            &usable,
            partitions.iter().filter_map(|p| match p {
                Placement::At(range) => Some(range),
                Placement::Deferred { .. } => None,
            }),
        );
        let mut placed = Vec::new();
        for (region, raw) in regions.iter().zip(&self.raw.shared) {
            let Some(start) = take_first_fit(&mut free, region.size) else {
                let raw = raw.get_ref();
                let message = format!("{} MiB does not fit in the memory the partitions left", mib(region.size));
                return Err(self.r.at(
                    raw.size_mb.span(),
                    Some(format!("shared \"{}\"", region.name)),
                    Some("size_mb"),
                    ErrorKind::Memory,
                    message,
                ));
            };
            placed.push(Placement::At(start..start + region.size));
        }
        Ok(placed)
    }

    fn admit(&self, config: &Config, group_index: &BTreeMap<&str, usize>) -> Result<Tree, ConfigError> {
        let spec = TreeSpec {
            major_frame_us: config.hypervisor.major_frame_us,
            pcpu_count: self.machine.pcpus,
            gang: config.hypervisor.policy.aligned(),
            groups: config
                .groups
                .iter()
                .map(|g| GroupSpec {
                    name: g.name.clone(),
                    parent: g.parent.as_ref().map(|p| group_index[p.as_str()]),
                    reservation: g.reservation,
                    pcpus: g.pcpus.clone(),
                    children: g.policy,
                })
                .collect(),
            partitions: config
                .partitions
                .iter()
                .map(|p| PartitionSpec {
                    name: p.name.clone(),
                    group: p.group.as_ref().map(|g| group_index[g.as_str()]),
                    vcpus: p.vcpus,
                    pcpus: p.pcpus.clone(),
                    reservation: p.reservation,
                    nested: p.policy,
                })
                .collect(),
        };
        Tree::build(&spec).map_err(|e| self.admission_error(e))
    }

    /// Points a planning failure at its partition's key.
    fn plan_error(&self, f: dispatch_plan::PlanFailure) -> ConfigError {
        let Some(partition) = f.partition else {
            let span = self.raw.hypervisor.as_ref().map_or(0..0, Spanned::span);
            return self.r.at(span, hv_subject(), Some(f.field), ErrorKind::Admission, f.message);
        };
        let raw = self.raw.partition[partition].get_ref();
        let span = match f.field {
            "policy" => raw.policy.as_ref().map_or(raw.vcpus.span(), Spanned::span),
            "pcpus" => raw.pcpus.span(),
            "vcpus" => raw.vcpus.span(),
            "devices.irqs" => raw.devices.as_ref().map_or(raw.vcpus.span(), Spanned::span),
            _ => raw.reservation.span(),
        };
        let field = if f.field == "policy" && raw.policy.is_none() { "vcpus" } else { f.field };
        self.r.at(span, partition_subject(raw), Some(field), ErrorKind::Admission, f.message)
    }

    /// Points an admission error at the key (or list element) it is about.
    fn admission_error(&self, e: AdmissionError) -> ConfigError {
        let kind = match e.problem {
            Problem::UnknownGroup { .. } => ErrorKind::UnknownName,
            Problem::ZeroBudget
            | Problem::ZeroPeriod
            | Problem::BudgetExceedsPeriod { .. }
            | Problem::ShareOutOfRange { .. }
            | Problem::ZeroWeight
            | Problem::NoPcpus
            | Problem::DuplicatePcpu { .. }
            | Problem::PcpuDoesNotExist { .. }
            | Problem::ZeroVcpus
            | Problem::MorePcpusThanVcpus { .. }
            | Problem::GangNeedsOnePcpuPerVcpu { .. }
            | Problem::ZeroMajorFrame => ErrorKind::InvalidValue,
            _ => ErrorKind::Admission,
        };
        let message = e.problem.to_string();
        let named_pcpu = match e.problem {
            Problem::DuplicatePcpu { pcpu }
            | Problem::PcpuDoesNotExist { pcpu, .. }
            | Problem::PcpuOutsideParent { pcpu, .. } => Some(pcpu),
            _ => None,
        };
        let pick_pcpu = |list: &Spanned<Vec<Spanned<u32>>>| -> Range<usize> {
            let mut matches = list.get_ref().iter().filter(|p| Some(*p.get_ref()) == named_pcpu);
            let first = matches.next();
            // For a duplicate, the second mention is the wrong one.
            let chosen =
                if matches!(e.problem, Problem::DuplicatePcpu { .. }) { matches.next().or(first) } else { first };
            chosen.map_or(list.span(), Spanned::span)
        };
        let reservation_span = |r: &Spanned<RawReservation>| -> (Range<usize>, &'static str) {
            let raw = r.get_ref();
            match e.problem {
                Problem::PeriodDoesNotDivideFrame { .. } | Problem::ZeroPeriod => {
                    raw.period_us.as_ref().map_or((r.span(), "reservation"), |s| (s.span(), "reservation.period_us"))
                }
                Problem::ZeroBudget | Problem::BudgetExceedsPeriod { .. } => {
                    raw.budget_us.as_ref().map_or((r.span(), "reservation"), |s| (s.span(), "reservation.budget_us"))
                }
                Problem::ShareOutOfRange { .. } => raw
                    .share_percent
                    .as_ref()
                    .map_or((r.span(), "reservation"), |s| (s.span(), "reservation.share_percent")),
                Problem::ZeroWeight => {
                    raw.weight.as_ref().map_or((r.span(), "reservation"), |s| (s.span(), "reservation.weight"))
                }
                _ => (r.span(), "reservation"),
            }
        };
        let (subject, span, field): (Option<String>, Range<usize>, &str) = match e.node {
            NodeRef::Machine => {
                let span = self
                    .raw
                    .hypervisor
                    .as_ref()
                    .and_then(|h| h.get_ref().major_frame_us.as_ref().map(Spanned::span))
                    .unwrap_or(0..0);
                (hv_subject(), span, e.field.as_str())
            }
            NodeRef::Group(i) => {
                let g = self.raw.group[i].get_ref();
                let (span, field) = match e.field {
                    Field::Reservation => reservation_span(&g.reservation),
                    Field::Pcpus => (g.pcpus.as_ref().map_or(g.name.span(), pick_pcpu), "pcpus"),
                    Field::Parent if e.problem == Problem::EmptyGroup => (g.name.span(), "name"),
                    Field::Parent => (g.parent.as_ref().map_or(g.name.span(), Spanned::span), "parent"),
                    other => (g.name.span(), other.as_str()),
                };
                (group_subject(g), span, field)
            }
            NodeRef::Partition(i) => {
                let p = self.raw.partition[i].get_ref();
                let (span, field) = match e.field {
                    Field::Reservation => reservation_span(&p.reservation),
                    Field::Pcpus => (pick_pcpu(&p.pcpus), "pcpus"),
                    Field::Vcpus => (p.vcpus.span(), "vcpus"),
                    Field::Parent => (p.group.as_ref().map_or(p.name.span(), Spanned::span), "group"),
                    Field::Policy => (p.policy.as_ref().map_or(p.vcpus.span(), Spanned::span), "policy"),
                    Field::MajorFrame => (p.name.span(), "major_frame_us"),
                };
                (partition_subject(p), span, field)
            }
        };
        self.r.at(span, subject, Some(field), kind, message)
    }
}

/// Takes `size` bytes, 2 MiB aligned, from the first block of `free` (sorted) they fit in;
/// the rest of that block stays free. Returns where.
fn take_first_fit(free: &mut Vec<Range<u64>>, size: u64) -> Option<u64> {
    let (k, start) = free.iter().enumerate().find_map(|(k, f)| {
        let start = f.start.checked_next_multiple_of(MEMORY_ALIGN)?;
        (start.checked_add(size)? <= f.end).then_some((k, start))
    })?;
    let block = free.remove(k);
    if block.start < start {
        free.insert(k, block.start..start);
    }
    if start + size < block.end {
        free.push(start + size..block.end);
        free.sort_by_key(|r| r.start);
    }
    Some(start)
}

/// `"0x2f8-0x2ff"`, `"0x60"` or decimal, inclusive.
pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let number = |s: &str| -> Result<u16, String> {
        let s = s.trim();
        let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u16::from_str_radix(hex, 16),
            None => s.parse::<u16>(),
        };
        parsed.map_err(|_| format!("\"{s}\" is not a port number 0..=0xffff (use \"0x2f8\" or \"0x2f8-0x2ff\")"))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (number(lo)?, number(hi)?),
        None => {
            let n = number(text)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(format!("the range \"{text}\" ends before it starts"));
    }
    Ok(lo..=hi)
}

/// Sorted, merged.
fn normalise(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    sorted.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// `from` minus every range in `holes`; `from` sorted and disjoint.
fn subtract<'a>(from: &[Range<u64>], holes: impl Iterator<Item = &'a Range<u64>> + Clone) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for r in from {
        let mut pieces = alloc::vec![r.clone()];
        for hole in holes.clone() {
            pieces = pieces
                .into_iter()
                .flat_map(|p| {
                    let mut kept = Vec::new();
                    if p.start < hole.start.min(p.end) {
                        kept.push(p.start..hole.start.min(p.end));
                    }
                    if hole.end.max(p.start) < p.end {
                        kept.push(hole.end.max(p.start)..p.end);
                    }
                    kept
                })
                .collect();
        }
        out.extend(pieces);
    }
    out
}

fn describe_ranges(ranges: &[Range<u64>]) -> String {
    let parts: Vec<String> = ranges.iter().map(|r| format!("{:#x}-{:#x}", r.start, r.end)).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}
