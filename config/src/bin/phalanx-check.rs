//! `phalanx-check FILE [--pcpus N] [--memory-mb M] [--module NAME=PATH ...]`: the boot-time
//! validation, on the host.
//!
//! Prints `FILE: ok (...)` and a per-partition summary and exits 0, or prints the error
//! (`FILE:LINE:COL: partition "x": field `y`: ...`) and exits 1. Usage errors exit 2.

use std::io::Write;
use std::process::ExitCode;

use config::{load_for, Machine, Placement, Validated, MIB};
use reservations::{EffectiveReservation, Reservation};

/// What the host check assumes the hypervisor keeps below partitions' memory when only
/// `--memory-mb` is given: BIOS areas, the hypervisor image, boot modules and heap.
const HOST_CHECK_RESERVED_LOW_MB: u64 = 16;

const USAGE: &str = concat!(
    "usage: phalanx-check FILE [--pcpus N] [--memory-mb M] [--module NAME=PATH ...]\n",
    "  FILE           partition config (TOML, see docs/config.md)\n",
    "  --pcpus N      check pCPU indices against a machine with N pCPUs\n",
    "  --memory-mb M  place memory in a machine with M MiB (the first 16 MiB kept for the hypervisor)\n",
    "  --module NAME=PATH  the boot module NAME is the file PATH: partitions whose guest.module it\n",
    "                 is must be able to load it (size, load address, vCPUs, command line)",
);

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(code) => code,
        Err(usage) => {
            eprintln!("phalanx-check: {usage}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Vec<String>) -> Result<ExitCode, String> {
    let mut file = None;
    let mut machine = Machine::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| -> Result<u64, String> {
            let v = it.next().ok_or_else(|| format!("{flag} needs a number"))?;
            v.parse().map_err(|_| format!("{flag}: \"{v}\" is not a number"))
        };
        match arg.as_str() {
            "--pcpus" => {
                let n = value("--pcpus")?;
                machine.pcpus =
                    Some(u32::try_from(n).ok().filter(|&n| (1..=4096).contains(&n)).ok_or("--pcpus: 1..=4096")?);
            }
            "--memory-mb" => {
                let mb = value("--memory-mb")?;
                if mb <= HOST_CHECK_RESERVED_LOW_MB {
                    return Err(format!("--memory-mb: more than {HOST_CHECK_RESERVED_LOW_MB} MiB"));
                }
                let end = mb.checked_mul(MIB).ok_or("--memory-mb: too large for a 64-bit address space")?;
                machine.usable_memory = Some(core::iter::once(HOST_CHECK_RESERVED_LOW_MB * MIB..end).collect());
            }
            "--module" => {
                let spec = it.next().ok_or("--module needs NAME=PATH")?;
                let (name, path) = spec.split_once('=').ok_or_else(|| format!("--module {spec}: not NAME=PATH"))?;
                let bytes = std::fs::read(path).map_err(|e| format!("--module {spec}: cannot read {path}: {e}"))?;
                // The check runs once per process: the image lives until it exits.
                machine.module_images.push((name.to_string(), Vec::leak(bytes)));
            }
            "-h" | "--help" => {
                let _ = writeln!(std::io::stdout(), "{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s if file.is_none() => file = Some(s.to_string()),
            s => return Err(format!("one FILE only (got a second: {s})")),
        }
    }
    let file = file.ok_or("no FILE given")?;
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("{file}: cannot read: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // Written with errors ignored: a reader that goes away (`| head`) is not a failure.
    let mut stdout = std::io::stdout().lock();
    match config::text_of(&file, &bytes).and_then(|text| load_for(&file, text, &machine)) {
        Ok(validated) => {
            let _ = write!(stdout, "{}", summary(&file, &validated, &machine));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let _ = writeln!(stdout, "{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn percent(us: u64, frame_us: u64) -> String {
    let tenths = (us * 1000 + frame_us / 2) / frame_us;
    format!("{}.{}%", tenths / 10, tenths % 10)
}

fn summary(file: &str, v: &Validated, machine: &Machine) -> String {
    let hv = &v.config.hypervisor;
    let frame = hv.major_frame_us;
    let used: Vec<u32> = v.tree.used_pcpus().collect();
    let mut out = format!(
        "{file}: ok ({} partitions, {} groups, pCPUs {:?}, major frame {frame} us, policy {}{})\n",
        v.config.partitions.len(),
        v.config.groups.len(),
        used,
        hv.policy.as_str(),
        match machine.pcpus {
            Some(n) => format!(", checked against {n} pCPUs"),
            None => String::new(),
        }
    );
    let flat = v.tree.flatten();
    for ((p, leaf), (flat, placement)) in
        v.config.partitions.iter().zip(v.tree.partitions()).zip(flat.iter().zip(&v.memory))
    {
        let reservation = match (p.reservation, &flat.reservation) {
            (Reservation::Hard { budget_us, period_us }, _) => format!("hard {budget_us}/{period_us} us"),
            (Reservation::FixedShare { percent }, EffectiveReservation::Hard { .. }) => {
                format!("fixed {percent}% (guaranteed)")
            }
            (Reservation::FixedShare { percent }, _) => format!("fixed {percent}% of a soft parent"),
            (Reservation::Weight(w), _) => format!("soft weight {w}"),
        };
        let memory = match placement {
            Placement::At(r) => format!("{} MiB at {:#x}-{:#x}", (r.end - r.start) / MIB, r.start, r.end),
            Placement::Deferred { size } => format!("{} MiB (placed at boot)", size / MIB),
        };
        out += &format!(
            "  {:<12} {} vCPU{} on pCPUs {:?} ({}{}), {reservation} = {} per pCPU, {memory}\n",
            p.name,
            p.vcpus,
            if p.vcpus == 1 { "" } else { "s" },
            leaf.spec.pcpus,
            p.policy.as_str(),
            p.group.as_ref().map(|g| format!(", group {g}")).unwrap_or_default(),
            percent(leaf.per_pcpu_us, frame),
        );
    }
    let loads: Vec<String> = used.iter().map(|&c| format!("{c}: {}", percent(v.tree.pcpu_load_us(c), frame))).collect();
    out += &format!("  planned load per pCPU: {}\n", loads.join(", "));
    for region in &v.config.shared {
        let names = |list: &[usize]| list.iter().map(|&p| v.config.partitions[p].name.as_str()).collect::<Vec<_>>();
        out += &format!(
            "  shared {:<5} {} MiB at guest {:#x}: owner {}, readers {:?}, writers {:?}\n",
            region.name,
            region.size / MIB,
            region.gpa,
            v.config.partitions[region.owner].name,
            names(&region.readers),
            names(&region.writers),
        );
    }
    out
}
