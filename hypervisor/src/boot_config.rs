//! The partition config at boot: found as the `partitions.toml` boot module, validated
//! against this machine (pCPUs from the MADT, memory left after the hypervisor) with the
//! same code `phalanx-check` runs on the host. A rejected config starts nothing.

extern crate alloc;

use alloc::format;
use alloc::string::String;
use config::{LiveConfig, Placement, Reservation, Validated};

use crate::console::Record;
use crate::memory::BootInfo;

pub const CONFIG_MODULE: &str = "partitions.toml";

/// Loads and validates the config; `Err` carries the one-line reason (file:line:col: ...).
pub fn load(boot: &BootInfo, pcpus: u32) -> Result<LiveConfig, String> {
    let module = boot.modules.iter().find(|m| m.name == CONFIG_MODULE).ok_or_else(|| {
        format!(
            "no `{CONFIG_MODULE}` boot module: add `module2 /boot/{CONFIG_MODULE} {CONFIG_MODULE}` to the GRUB entry"
        )
    })?;
    let text = config::text_of(CONFIG_MODULE, module.bytes()).map_err(|e| format!("{e}"))?;
    let platform = config::Platform {
        pcpus,
        usable_memory: boot.partition_memory.as_slice().to_vec(),
        modules: boot.modules.iter().map(|m| m.name.clone()).filter(|n| n != CONFIG_MODULE).collect(),
        // Every payload is checked against its partition here, before anything starts.
        module_images: boot
            .modules
            .iter()
            .filter(|m| m.name != CONFIG_MODULE)
            .map(|m| (m.name.clone(), m.bytes()))
            .collect(),
    };
    config::load_live(CONFIG_MODULE, text, &platform).map_err(|e| format!("{e}"))
}

/// A reservation in words, as records and replies show it.
pub fn describe(reservation: &Reservation) -> String {
    match reservation {
        Reservation::Hard { budget_us, period_us } => {
            format!("hard {budget_us} us / {period_us} us ({}%)", budget_us * 100 / (*period_us).max(1))
        }
        Reservation::FixedShare { percent } => format!("fixed share {percent}% of the parent"),
        Reservation::Weight(w) => format!("soft weight {w}"),
    }
}

/// One `config` record plus one `partition_plan` record per partition.
/// `check_cycles`: what the check took (parse, validation, planning, payload checks).
pub fn report_accepted(validated: &Validated, check_cycles: u64) {
    let c = &validated.config;
    Record::new("config")
        .str("status", "accepted")
        .str("file", CONFIG_MODULE)
        .u64("partitions", c.partitions.len() as u64)
        .u64("groups", c.groups.len() as u64)
        .str("policy", c.hypervisor.policy.as_str())
        .u64("major_frame_us", c.hypervisor.major_frame_us)
        .str("control", c.hypervisor.control.as_str())
        .u64("check_cycles", check_cycles)
        .emit();
    for (partition, placement) in c.partitions.iter().zip(&validated.memory) {
        let base = match placement {
            Placement::At(range) => range.start,
            Placement::Deferred { .. } => 0,
        };
        Record::new("partition_plan")
            .str("name", &partition.name)
            .u64("vcpus", partition.vcpus as u64)
            .u64_list("pcpus", partition.pcpus.iter().map(|&p| p as u64))
            .fmt("memory_base", format_args!("{base:#x}"))
            .u64("memory_mib", placement.size() >> 20)
            .str("reservation", &describe(&partition.reservation))
            .str("guest_module", &partition.guest.module)
            .emit();
    }
}

pub fn report_rejected(error: &str) {
    log::error!("partition config rejected, no partition started: {error}");
    Record::new("config").str("status", "rejected").str("file", CONFIG_MODULE).str("error", error).emit();
}
