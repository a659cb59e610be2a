//! A distribution's own kernel in a Phalanx partition under Bochs: Debian 12's unmodified
//! cloud and generic kernels (downloaded by scripts/build-distro-guest, never committed), a
//! busybox initrd loaded through the boot protocol, and nothing on the command line but the
//! console. Each must find both vCPUs through the partition's ACPI tables, run an SMP program
//! on both, and power off (ACPI S5), while the CPU-bound partition beside it keeps its share.

use std::process::Command;
use std::sync::OnceLock;

use e2e::{assert_share, repo_root, stats, Boot, Run};

/// Fetches the kernels and builds the initrd once per test binary (cached by the script).
fn ensure_distro_guest() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(repo_root().join("scripts/build-distro-guest"))
            .status()
            .expect("run scripts/build-distro-guest");
        assert!(status.success(), "scripts/build-distro-guest failed");
    });
}

/// The partition's console lines (without the hypervisor's prefix).
fn console(run: &Run) -> Vec<&str> {
    run.log.lines().filter_map(|l| l.split_once("[debian] ").map(|(_, rest)| rest)).collect()
}

/// The kernel's own timestamp (seconds of guest time since it started) on the line holding
/// `text`.
fn kernel_seconds(console: &[&str], text: &str) -> Option<f64> {
    let line = console.iter().find(|l| l.contains(text))?;
    line.strip_prefix('[')?.split(']').next()?.trim().parse().ok()
}

fn boots_smp_and_powers_off(flavour: &str, timeout_s: u32) {
    ensure_distro_guest();
    let name = format!("debian-{flavour}");
    let config = format!("tests/configs/debian-{flavour}.toml");
    let run = Boot::new(&name, "bochs", 2, &config).megs(512).timeout_s(timeout_s).run();
    run.assert_clean_end();
    let console = console(&run);
    let has = |needle: &str| console.iter().any(|l| l.contains(needle));
    let release = console.iter().find_map(|l| l.strip_prefix("distro-guest: kernel ")).expect("uname -r");
    assert_eq!(release.contains("-cloud-"), flavour == "cloud", "the {flavour} kernel ran: {release}");
    assert!(has("Command line: console=ttyS0,115200"), "nothing but the console on its command line");
    assert!(has("ACPI: Using ACPI (MADT) for SMP configuration information"), "{}", run.log);
    assert!(!has("unchecked MSR access"), "every MSR the kernel touches works:\n{}", run.log);
    assert!(!has("Marking clocksource 'tsc-early' as unstable"), "the TSC is trusted");
    assert!(has("distro-guest: online cpus 2"), "both vCPUs online in /proc/cpuinfo:\n{}", run.log);
    assert!(has("smp-check: threads=2 rounds=2000 ok"), "the SMP program ran on both:\n{}", run.log);
    assert!(has("smp-check: cpus_seen=0,1"), "{}", run.log);
    assert_eq!(run.one("partition_poweroff")["partition"], "debian", "it powered itself off");
    assert!(run.all("partition_fault").is_empty(), "{}", run.log);
    assert_eq!(run.one("run_end")["ended_early"], true, "on_poweroff = \"end-run\" ended the run");
    // The CPU-bound partition beside it keeps its 20% within 2 points.
    assert_share(&run, "cpubound", 20.0, 2.0);
    let to_init = kernel_seconds(&console, "Run /init as init process").expect("the kernel reached user space");
    let debian = stats(&run, "debian");
    let guest_s = debian["guest_cycles"].as_f64().unwrap() / run.one("boot")["tsc_hz"].as_f64().unwrap();
    println!(
        "{flavour}: /init after {to_init:.1} s of kernel time; {} exits in {guest_s:.1} s of guest time ({:.0}/s)",
        debian["exits"],
        debian["exits"].as_f64().unwrap() / guest_s
    );
}

#[test]
fn debian_cloud_kernel_boots_smp_from_acpi_beside_a_cpu_bound_partition() {
    boots_smp_and_powers_off("cloud", 900);
}

#[test]
fn debian_generic_kernel_boots_smp_beside_a_cpu_bound_partition() {
    boots_smp_and_powers_off("generic", 1800);
}
