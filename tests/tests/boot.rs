//! Boot foundation end to end: Bochs (VT-x) brings every pCPU into VMX root with
//! phase-locked timers; QEMU TCG (no VT-x) gets one clear error and a clean end.

use e2e::{Boot, Run};

fn boot_bochs(name: &str, cpus: u32) -> Run {
    Boot::new(name, "bochs", cpus, "guests/configs/default.toml").run()
}

fn assert_vmx_root_with_phase_lock(run: &Run, cpus: u64) {
    run.assert_clean_end();
    assert_eq!(run.one("boot")["cpus"], cpus, "MADT pCPU count");
    let online = run.all("cpu_online");
    assert_eq!(online.len() as u64, cpus - 1);
    assert!(online.iter().all(|r| r["online"] == true), "an AP did not start:\n{}", run.log);

    let vmx = run.all("vmx");
    assert_eq!(vmx.len() as u64, cpus, "one vmx record per pCPU");
    assert!(vmx.iter().all(|r| r["root"] == true), "a pCPU is not in VMX root:\n{}", run.log);
    let caps = run.one("vmx_caps");
    assert_eq!(caps["ept"], true);
    assert_eq!(caps["pause_loop_exiting"], true);

    let sync = run.one("tsc_sync");
    assert_eq!(sync["in_sync"], true);

    let phase = run.one("phase_lock");
    assert_eq!(phase["cpus"], cpus);
    assert_eq!(phase["ticks"], 300);
    let period = phase["period_cycles"].as_u64().unwrap();
    let median = phase["skew_median_cycles"].as_u64().unwrap();
    assert!(period > 0);
    assert!(median * 100 < period, "median tick skew {median} cycles is not below 1% of the {period}-cycle period");
    // Every pCPU took every tick, none more than a tenth of a period late.
    assert!(phase["latency_max_cycles"].as_u64().unwrap() < period / 10, "{phase}");

    let summary = run.one("summary");
    assert_eq!(summary["cpus_in_vmx_root"], cpus);
}

#[test]
fn bochs_two_pcpus_reach_vmx_root_with_phase_locked_timers() {
    let run = boot_bochs("bochs-2cpu", 2);
    assert_vmx_root_with_phase_lock(&run, 2);
}

#[test]
fn bochs_four_pcpus_reach_vmx_root_with_phase_locked_timers() {
    let run = boot_bochs("bochs-4cpu", 4);
    assert_vmx_root_with_phase_lock(&run, 4);
}

fn assert_clear_no_vtx_error(run: &Run) {
    run.assert_clean_end();
    assert_eq!(run.exit_status, Some(3), "QEMU should end through isa-debug-exit with the failure code:\n{}", run.log);
    let error = run.one("error");
    assert_eq!(error["stage"], "vmx");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("does not offer VT-x"), "{message}");
    assert!(message.contains("-cpu host,+vmx") && message.contains("Bochs"), "the error says how to run it: {message}");
    assert!(run.all("summary").is_empty(), "no success summary after the error");
}

#[test]
fn qemu_tcg_without_vtx_gets_one_clear_error_and_a_clean_end() {
    let run = Boot::new("qemu-iso", "qemu", 2, "guests/configs/default.toml").run();
    assert_eq!(run.one("boot")["loader"], "multiboot2");
    assert_eq!(run.one("boot")["cpus"], 2);
    assert_clear_no_vtx_error(&run);
}

#[test]
fn qemu_kernel_multiboot1_boot_reaches_the_same_clear_error() {
    let run = Boot::new("qemu-kernel", "qemu-kernel", 2, "guests/configs/default.toml").run();
    assert_eq!(run.one("boot")["loader"], "multiboot1");
    assert_clear_no_vtx_error(&run);
}

#[test]
fn bochs_accepts_the_default_config_and_places_partition_memory() {
    let run = boot_bochs("bochs-config-ok", 2);
    run.assert_clean_end();
    let config = run.one("config");
    assert_eq!(config["status"], "accepted", "{config}");
    let plans = run.all("partition_plan");
    assert_eq!(plans.len() as u64, config["partitions"].as_u64().unwrap());
    let mut ranges: Vec<(u64, u64)> = plans
        .iter()
        .map(|p| {
            let base = u64::from_str_radix(p["memory_base"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
            (base, base + (p["memory_mib"].as_u64().unwrap() << 20))
        })
        .collect();
    ranges.sort();
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "partition memory overlaps: {ranges:?}");
    assert!(
        ranges.iter().all(|r| r.0 >= 0x10_0000 && r.0 % (2 << 20) == 0),
        "placed above 1 MiB, 2 MiB aligned: {ranges:?}"
    );
    // Never the hypervisor's image, heap or the boot modules.
    let boot = run.one("boot");
    let pairs = |key: &str| -> Vec<(u64, u64)> {
        let flat: Vec<u64> = boot[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        flat.chunks(2).map(|c| (c[0], c[1])).collect()
    };
    let reserved: Vec<(u64, u64)> = ["image", "heap", "module_ranges"].iter().flat_map(|k| pairs(k)).collect();
    assert!(reserved.len() >= 4, "image, heap and at least two modules: {reserved:?}");
    for (start, end) in &ranges {
        for (r_start, r_end) in &reserved {
            assert!(
                end <= r_start || start >= r_end,
                "partition memory {start:#x}..{end:#x} overlaps reserved {r_start:#x}..{r_end:#x}"
            );
        }
    }
}

fn assert_rejected_before_anything_started(run: &Run, expected: &[&str]) {
    run.assert_clean_end();
    let config = run.one("config");
    assert_eq!(config["status"], "rejected", "{config}");
    let error = config["error"].as_str().unwrap();
    for part in expected {
        assert!(error.contains(part), "rejection {error:?} should contain {part:?}");
    }
    for kind in ["partition_plan", "cpu_online", "vmx", "summary"] {
        assert!(
            run.all(kind).is_empty(),
            "a rejected config must start nothing, but found {kind} records:\n{}",
            run.log
        );
    }
}

#[test]
fn bochs_rejects_an_over_admitted_config_with_its_line_and_field() {
    let run = Boot::new("bochs-config-overcommit", "bochs", 2, "guests/configs/invalid-overcommit.toml").run();
    assert_rejected_before_anything_started(
        &run,
        &["partitions.toml:21:", "partition \"second\"", "`reservation`", "over-admitted"],
    );
}

#[test]
fn bochs_rejects_a_config_naming_pcpus_the_madt_does_not_list() {
    // Valid on a 4-pCPU machine (phalanx-check accepts it without --pcpus): only the boot-time
    // check against the MADT can reject it.
    let run = Boot::new("bochs-config-pcpus", "bochs", 2, "tests/configs/needs-4-pcpus.toml").run();
    assert_rejected_before_anything_started(&run, &["partitions.toml:", "`pcpus`", "does not exist"]);
}

#[test]
fn bochs_rejects_a_payload_that_cannot_load_into_its_partition() {
    // Valid without the module (the host check cannot see the kernel): the boot-time check
    // runs the loader's own checks on the bzImage and refuses the partition by name.
    let run = Boot::new("bochs-config-payload", "bochs", 2, "tests/configs/linux-too-small.toml").run();
    assert_rejected_before_anything_started(
        &run,
        &["partitions.toml:14:", "partition \"linux\"", "`guest.module`", "needs", "MiB of guest memory"],
    );
}

#[test]
fn bochs_one_shot_timer_fallback_stays_phase_locked() {
    let run =
        Boot::new("bochs-one-shot", "bochs", 2, "guests/configs/default.toml").cmdline("phalanx.timer=one-shot").run();
    assert_eq!(run.one("phase_lock")["timer_mode"], "one-shot");
    assert_vmx_root_with_phase_lock(&run, 2);
}

#[test]
fn an_exception_on_one_pcpu_is_reported_and_the_run_ends_instead_of_hanging() {
    let run =
        Boot::new("bochs-fault", "bochs", 2, "guests/configs/default.toml").cmdline("phalanx.fault_on_cpu=1").run();
    assert!(!run.timed_out, "the run hung:\n{}", run.log);
    let exception = run.one("exception");
    assert_eq!(exception["cpu"], 1);
    assert_eq!(exception["vector"], 6);
    assert_eq!(exception["name"], "invalid opcode");
    // RIP inside the image, as the boot record gives its range.
    let image: Vec<u64> = run.one("boot")["image"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let rip = u64::from_str_radix(exception["rip"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    assert!((image[0]..image[1]).contains(&rip), "RIP inside the image {image:x?}: {exception}");
    for field in ["error_code", "cr2"] {
        assert!(exception.get(field).is_some(), "the report names {field}: {exception}");
    }
    let error = run.one("error");
    assert!(error["message"].as_str().unwrap().contains("pCPUs [1] stopped"), "{error}");
    assert!(run.all("summary").is_empty());
}
