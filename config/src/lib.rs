//! phalanx-config: the partition config file, parsed and validated the same way at boot
//! (bare metal, `no_std` + `alloc`) and on the host (`phalanx-check`).
//!
//! ```text
//! TOML text --toml+serde--> schema (spans kept) --validate--> Config + memory placement
//!                                                          + reservations::Tree (admitted)
//!                                                          + dispatch plan (sched: tables, homes)
//! ```
//! Every rejection is a [`ConfigError`] that prints as
//! `FILE:LINE:COLUMN: partition "web": field `pcpus`: pCPU 7 does not exist (the machine has 4 pCPUs)`.
//! The schema is documented in `docs/config.md`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod control;
pub mod dispatch_plan;
mod error;
pub mod irq_plan;
mod live;
mod schema;
mod validate;

use alloc::vec::Vec;

pub use error::{line_column, ConfigError, ErrorKind};
pub use live::{ChangeError, LiveConfig};
pub use schema::*;
pub use validate::{hypervisor_ports_in, parse_port_range, Machine, Validated, MEMORY_ALIGN, MIB};

/// What the hypervisor knows about the machine at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// pCPUs found in the MADT; valid indices are `0..pcpus`.
    pub pcpus: u32,
    /// Host-physical memory the hypervisor can hand to partitions (already without the
    /// hypervisor image, boot modules and firmware areas).
    pub usable_memory: Vec<core::ops::Range<u64>>,
    /// Names of the boot modules the guests' payloads can come from.
    pub modules: Vec<alloc::string::String>,
    /// Their contents (payloads must load into their partitions).
    pub module_images: Vec<(alloc::string::String, &'static [u8])>,
}

/// Parses and validates `text` (named `file_name` in errors). With `platform = None` (a host
/// check without a machine description) pCPU existence and memory fit against the machine are
/// skipped; everything else is checked.
pub fn load(file_name: &str, text: &str, platform: Option<&Platform>) -> Result<Validated, ConfigError> {
    load_for(file_name, text, &machine_of(platform))
}

/// Like [`load`] on the machine that runs it, keeping what run-time changes are checked with.
pub fn load_live(file_name: &str, text: &str, platform: &Platform) -> Result<LiveConfig, ConfigError> {
    LiveConfig::load(file_name, text, &machine_of(Some(platform)))
}

fn machine_of(platform: Option<&Platform>) -> Machine {
    match platform {
        Some(p) => Machine {
            pcpus: Some(p.pcpus),
            usable_memory: Some(p.usable_memory.clone()),
            modules: Some(p.modules.clone()),
            module_images: p.module_images.clone(),
        },
        None => Machine::default(),
    }
}

/// The config file's bytes as text; invalid UTF-8 is an error at the line and column of the
/// first bad byte.
pub fn text_of<'a>(file_name: &str, bytes: &'a [u8]) -> Result<&'a str, ConfigError> {
    core::str::from_utf8(bytes).map_err(|e| {
        let good = e.valid_up_to();
        let before = core::str::from_utf8(&bytes[..good]).unwrap_or_default();
        let reporter = error::Reporter { file: file_name, text: before };
        reporter.at(
            good..good,
            None,
            None,
            ErrorKind::Syntax,
            alloc::format!("invalid UTF-8 (byte {:#04x}): a config is UTF-8 text", bytes[good]),
        )
    })
}

/// Like [`load`], for a machine that is only partly known (e.g. `phalanx-check --pcpus 4`).
pub fn load_for(file_name: &str, text: &str, machine: &Machine) -> Result<Validated, ConfigError> {
    let reporter = error::Reporter { file: file_name, text };
    let document = toml::de::DeTable::parse(text).map_err(|e| reporter.syntax(&e))?;
    let raw: schema::RawConfig = toml::from_str(text).map_err(|e| reporter.schema(&e, &document))?;
    validate::validate(&reporter, &raw, machine)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz_tests;
