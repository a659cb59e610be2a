//! Hostile guests: a test-guest partition whose vCPU 0 attacks the machine (`mode=hostile
//! attack=NAME`, guests/testguest/hostile.c) beside a well-behaved CPU-bound partition with a
//! hard 30% of both pCPUs. Whatever the attack, the run ends normally, the attacker is either
//! contained (its attack emulated or ignored, and it keeps running) or stopped (or reset)
//! alone with a `partition_fault` naming it, and the well-behaved partition keeps running and
//! keeps its share: within 1% of what it gets beside a well-behaved neighbour (the baseline
//! run, `none`), and of its reservation less the measured switch into its slots.

use e2e::{assert_share, pct, stats, Boot, Run};

/// What a hostile partition's attack must come to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// It keeps running and prints "survived NAME".
    Contained,
    /// It keeps running but never finishes the attack (a vCPU that halts or spins forever).
    Stuck,
    /// Stopped with a fault of this reason.
    Stopped(&'static str),
    /// Faults with this reason and is reset, again and again (`on_fault = "reset"`).
    Reset(&'static str),
    /// Asks its platform to reboot through this mechanism and is reset, again and again (the
    /// default `on_reboot = "reset"`), with no fault.
    Rebooted(&'static str),
    /// Powers itself off (ACPI S5): stopped, with no fault.
    PoweredOff,
}

const STEADY_PCT: f64 = 30.0;

/// The attacks on a device the hostile partition owns: the machine's COM2.
const DEVICE_ATTACKS: [&str; 1] = ["irq-storm"];

fn config(attack: &str, on_fault: &str) -> String {
    let devices = if DEVICE_ATTACKS.contains(&attack) { "\ndevices = { serial = \"com2\" }" } else { "" };
    let hostile = if attack == "none" {
        "mode=cpubound work=500".to_string()
    } else {
        format!("mode=hostile attack={attack} oob_after={} work=500", if on_fault == "reset" { 0 } else { 50 })
    };
    format!(
        r#"[hypervisor]
major_frame_us = 20000
policy = "gang"
stats_interval_ms = 250
run_ms = 1000

[[partition]]
name = "hostile"
vcpus = 2
pcpus = [0, 1]
memory_mb = 16
reservation = {{ budget_us = 10000, period_us = 20000 }}
guest = {{ module = "testguest", cmdline = "{hostile}" }}
on_fault = "{on_fault}"{devices}

[[partition]]
name = "steady"
vcpus = 2
pcpus = [0, 1]
memory_mb = 16
reservation = {{ budget_us = 6000, period_us = 20000 }}
guest = {{ module = "testguest", cmdline = "mode=cpubound work=500" }}
"#
    )
}

/// The CPU's APIC virtualization taken away: the xAPIC emulated, every access decoded.
const EMULATED_APIC: &str = "phalanx.debug.vmx_without=apic_register_virtualization";

fn boot(attack: &str, on_fault: &str, cmdline: &str) -> Run {
    let root = e2e::repo_root();
    let name = format!("hostile-{attack}{}", if cmdline.is_empty() { "" } else { "-emulated-apic" });
    let path = root.join("target/e2e").join(format!("{name}.toml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, config(attack, on_fault)).unwrap();
    let boot = Boot::new(&name, "bochs", 2, path.to_str().unwrap()).cmdline(cmdline);
    if DEVICE_ATTACKS.contains(&attack) {
        boot.run_with_com2(|_| {})
    } else {
        boot.run()
    }
}

/// The steady partition's share in the baseline run (a well-behaved neighbour), measured once
/// per test binary.
fn baseline_share() -> f64 {
    static BASELINE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *BASELINE.get_or_init(|| {
        let run = boot("none", "stop", "");
        run.assert_clean_end();
        assert!(run.all("partition_fault").is_empty(), "{}", run.log);
        pct(&stats(&run, "steady")["cpu_share_pct"])
    })
}

fn attack(name: &str, expected: Outcome, cmdline: &str) -> Run {
    let on_fault = if matches!(expected, Outcome::Reset(_)) { "reset" } else { "stop" };
    let run = boot(name, on_fault, cmdline);
    // The machine survives: no hypervisor exception or panic, the run ends on time.
    run.assert_clean_end();
    assert!(!run.all("run_end").is_empty(), "the run ends normally:\n{}", run.log);
    assert!(run.log.contains(&format!("attack={name}")), "the attacker started:\n{}", run.log);
    let faults = run.all("partition_fault");
    assert!(faults.iter().all(|f| f["partition"] == "hostile"), "only the attacker faults: {faults:?}");
    let hostile = stats(&run, "hostile");
    let survived = run.log.contains(&format!("survived {name}"));
    match expected {
        Outcome::Contained | Outcome::Stuck => {
            assert!(faults.is_empty(), "{name}: contained, not stopped: {faults:?}");
            assert_eq!(hostile["state"], "running", "{hostile}");
            assert_eq!(survived, expected == Outcome::Contained, "{name}: 'survived' line:\n{}", run.log);
        }
        Outcome::Stopped(reason) => {
            assert_eq!(faults.len(), 1, "{faults:?}");
            assert_eq!((faults[0]["reason"].as_str(), faults[0]["action"].as_str()), (Some(reason), Some("stopped")));
            assert_eq!(hostile["state"], "stopped", "{hostile}");
            assert!(!survived, "{name} was stopped before it finished");
        }
        Outcome::Reset(reason) => {
            assert!(faults.len() >= 3, "a tight fault-and-reset loop: {faults:?}");
            assert!(faults.iter().all(|f| f["reason"] == reason && f["action"] == "reset"), "{faults:?}");
            assert_eq!(hostile["resets"].as_u64().unwrap(), run.all("partition_reset").len() as u64);
        }
        Outcome::Rebooted(via) => {
            assert!(faults.is_empty(), "{name}: a reboot is not a fault: {faults:?}");
            let reboots = run.all("partition_reboot");
            assert!(reboots.len() >= 3, "a tight reboot loop: {reboots:?}");
            assert!(reboots.iter().all(|r| r["via"] == via && r["action"] == "reset"), "{reboots:?}");
            assert_eq!(hostile["resets"].as_u64().unwrap(), run.all("partition_reset").len() as u64);
            assert!(!survived, "{name} does not come back from a reboot");
        }
        Outcome::PoweredOff => {
            assert!(faults.is_empty(), "{name}: a power-off is not a fault: {faults:?}");
            assert_eq!(run.one("partition_poweroff")["partition"], "hostile");
            assert_eq!(hostile["state"], "stopped", "{hostile}");
            assert_eq!(run.one("run_end")["ended_early"], false, "on_poweroff defaults to \"stop\"");
        }
    }
    // The well-behaved partition keeps running and keeps its share.
    e2e::assert_keeps_running(&run, "steady");
    let steady = stats(&run, "steady");
    let got = pct(&steady["cpu_share_pct"]);
    let baseline = baseline_share();
    println!(
        "hostile {name}: {} ({} faults), steady {got:.2}% (baseline {baseline:.2}%, deviation {:+.2}%)",
        match expected {
            Outcome::Contained | Outcome::Stuck => "contained",
            Outcome::Stopped(_) | Outcome::PoweredOff => "stopped",
            Outcome::Rebooted(_) => "reset",
            Outcome::Reset(_) => "reset",
        },
        faults.len(),
        (got - baseline) * 100.0 / baseline
    );
    assert!(
        (got - baseline).abs() <= baseline * 0.01,
        "{name}: steady {got}% against {baseline}% beside a good neighbour"
    );
    // And of its reservation, less the switch into each slot.
    assert_share(&run, "steady", STEADY_PCT, 1.0);
    run
}

/// An interrupt storm on a device the attacker owns (COM2's transmit interrupt toggled as fast
/// as it can: an edge on IRQ 3 each time) costs only the attacker: besides the checks every
/// attack gets (the steady partition within 1% of its share), the interrupts are counted and
/// charged to the attacker, and none reaches the steady partition. The attacker never
/// programs its IO-APIC: each one is taken, latched and found masked at its virtual pin.
#[test]
fn an_interrupt_storm_on_its_own_device_costs_only_its_owner() {
    let run = attack("irq-storm", Outcome::Stuck, "");
    let storm = run.all("irq_stats").into_iter().find(|s| s["partition"] == "hostile").expect("IRQ 3's stats").clone();
    let arrivals = storm["arrivals"].as_u64().unwrap();
    assert!(arrivals > 1_000, "a storm: {storm}");
    let masked = storm["masked"].as_u64().unwrap();
    assert!(masked > 0 && masked <= arrivals, "its pin stays masked in its IO-APIC: {storm}");
    let hostile = stats(&run, "hostile");
    assert!(hostile["irq_demux_cycles"].as_u64().unwrap() > 0, "charged to the owner: {hostile}");
    assert_eq!(stats(&run, "steady")["irq_demux_cycles"], 0, "{}", run.log);
    println!("irq-storm: {arrivals} interrupts, {} cycles charged to the attacker", hostile["irq_demux_cycles"]);
}

/// `test: "attack" => outcome;` runs the attack on the default CPU (Bochs skylake_x, whose
/// APIC the CPU virtualizes); `... => outcome, emulated APIC;` with the xAPIC emulated.
macro_rules! attacks {
    ($($test:ident: $name:literal => $outcome:expr $(, emulated $emulated:ident)?;)*) => {
        $(
            #[test]
            fn $test() {
                attack($name, $outcome, attacks!(@cmdline $($emulated)?));
            }
        )*
    };
    (@cmdline) => { "" };
    (@cmdline apic) => { EMULATED_APIC };
}

attacks! {
    legacy_ports_read_as_absent_and_writes_vanish: "ports" => Outcome::Contained;
    string_io_is_emulated_one_element_per_exit: "string-io" => Outcome::Contained;
    apic_base_relocation_is_ignored: "msr-apic-base" => Outcome::Contained;
    efer_abuse_faults: "msr-efer" => Outcome::Stopped("triple-fault");
    a_reserved_pat_type_faults: "msr-pat" => Outcome::Stopped("triple-fault");
    vmx_msrs_fault: "msr-vmx" => Outcome::Stopped("triple-fault");
    unknown_msrs_fault: "msr-unknown" => Outcome::Stopped("triple-fault");
    vmxon_faults: "vmxon" => Outcome::Stopped("triple-fault");
    vmread_faults: "vmread" => Outcome::Stopped("triple-fault");
    invept_faults: "invept" => Outcome::Stopped("triple-fault");
    a_bad_xsetbv_faults: "xsetbv" => Outcome::Stopped("triple-fault");
    cli_hlt_forever_only_idles_its_own_slots: "cli-hlt" => Outcome::Stuck;
    cli_spin_is_preempted_at_every_boundary: "cli-spin" => Outcome::Stuck;
    a_triple_fault_reset_loop_stays_in_its_partition: "triple-fault" => Outcome::Reset("triple-fault");
    every_hypercall_number_is_answered: "hypercalls" => Outcome::Contained;
    an_ipi_flood_stays_in_its_partition: "ipi-flood" => Outcome::Contained;
    // The attacker never enables its APIC: its self-IPIs (APIC-write exits, or decoded ICR
    // writes) are accepted and never delivered.
    a_self_ipi_storm_stays_in_its_vcpu: "self-ipi" => Outcome::Contained;
    a_self_ipi_storm_on_an_emulated_apic_stays_in_its_vcpu: "self-ipi" => Outcome::Contained, emulated apic;
    init_and_sipi_reach_only_its_own_vcpus: "init-sipi" => Outcome::Contained;
    ioapic_entries_aim_only_at_its_own_vcpus: "ioapic" => Outcome::Contained;
    odd_lapic_accesses_are_emulated_or_ignored: "lapic-odd" => Outcome::Contained;
    string_instructions_on_the_lapic_are_refused: "string-mmio" => Outcome::Stopped("refused");
    // A locked add to the TPR: the CPU virtualizes it like any TPR write; emulation refuses
    // locked accesses to device memory.
    locked_lapic_accesses_are_virtualized_by_the_cpu: "locked-mmio" => Outcome::Contained;
    locked_lapic_accesses_are_refused_when_emulated: "locked-mmio" => Outcome::Stopped("refused"), emulated apic;
    memory_beyond_its_own_faults: "gpa-hole" => Outcome::Stopped("ept-violation");
    a_reboot_through_0xcf9_resets_only_its_partition: "reboot-cf9" => Outcome::Rebooted("reset control (0xcf9)");
    a_reboot_through_the_keyboard_controller_resets_only_its_partition: "reboot-kbd" => Outcome::Rebooted("keyboard controller");
    a_power_off_stops_only_its_partition: "poweroff" => Outcome::PoweredOff;
}
