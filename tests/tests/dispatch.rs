//! Partitions under VMX with phase-locked gang dispatch, end to end under Bochs.

use e2e::{pct, stats, Boot, Run};

/// Within 2% of its reservation (less the switch into its slots).
fn assert_share(run: &Run, partition: &str, reserved_pct: f64) {
    e2e::assert_share(run, partition, reserved_pct, 2.0);
}

#[test]
fn gang_runs_two_partitions_with_low_waste_aligned_slots_and_exact_accounting() {
    let run = Boot::new("dispatch-gang", "bochs", 2, "guests/configs/default.toml").run();
    run.assert_clean_end();
    assert!(run.all("partition_fault").is_empty(), "{}", run.log);
    let barrier = stats(&run, "barrier");
    let hog = stats(&run, "hog");
    assert!(barrier["iterations"].as_u64().unwrap() > 100, "{barrier}");
    assert!(hog["iterations"].as_u64().unwrap() > 100, "{hog}");
    // Both vCPUs of the barrier run together: spinning on a sibling is rare.
    assert!(pct(&barrier["spin_waste_hv_pct"]) <= 2.0, "{barrier}");
    assert!(pct(&barrier["spin_waste_guest_pct"]) <= 2.0, "{barrier}");
    // Slots start together on both pCPUs: median skew far below 1% of a 5 ms slot.
    let slot_cycles = run.one("boot")["tsc_hz"].as_u64().unwrap() / 200;
    assert!(barrier["gang_slots_measured"].as_u64().unwrap() > 100, "{barrier}");
    assert!(barrier["skew_median_cycles"].as_u64().unwrap() * 100 < slot_cycles, "{barrier}");
    // From the boundary to the owner's first VM entry: the switch (~950 cycles under Bochs).
    assert!(barrier["entry_latency_median_cycles"].as_u64().unwrap() < 1_500, "{barrier}");
    // Never-halting guests are preempted at every boundary and get their reservation.
    assert_share(&run, "barrier", 50.0);
    assert_share(&run, "hog", 50.0);
    // Every cycle is charged to exactly one account (checked against each pCPU's own start
    // and end; see the next test for what it finds when some are not).
    let accounting = run.one("accounting");
    // What is left is the few instructions between a pCPU's last charge and its end stamp.
    assert_eq!(accounting["debug_uncharged_cycles"], 0, "{accounting}");
    assert_eq!(accounting["spin_sample_exits"], 0, "no sampling configured: {accounting}");
    e2e::assert_heap_within_estimate(&run);
    assert!(accounting["unaccounted_ppb"].as_u64().unwrap() <= 10_000, "{accounting}");
    assert!(run.all("progress").len() >= 2, "periodic progress records");
    assert!(run.log.contains("[barrier] testguest: vcpu0 mode=barrier"), "the guest's console reaches the log");
}

/// Accounting is checked against each pCPU's own clock, not built to add up: cycles that no
/// charge covers are unaccounted. The debug knob makes every pCPU spend 2,000 cycles (2% of a
/// 10 ms frame at Bochs' 10 MHz TSC) once per major frame outside any charge; the accounting
/// must find them. A second knob makes every switch into a slot 3,000 cycles slower: the
/// entry latency must grow by that much, and the gang skew (all pCPUs equally late) must not.
#[test]
fn cycles_nobody_charged_show_up_as_unaccounted() {
    let run = Boot::new("dispatch-uncharged", "bochs", 2, "guests/configs/default.toml")
        .cmdline("phalanx.debug.uncharged_cycles=2000 phalanx.debug.switch_in_cycles=3000")
        .run();
    run.assert_clean_end();
    let accounting = run.one("accounting");
    let injected = accounting["debug_uncharged_cycles"].as_u64().unwrap();
    let measured = accounting["unaccounted_cycles"].as_u64().unwrap();
    let frames = 2 * 200; // 2 pCPUs x 2 s / 10 ms
    assert!(injected >= frames * 2_000 * 9 / 10, "once per frame on each pCPU: {accounting}");
    assert!(measured.abs_diff(injected) * 100 <= injected, "measured {measured} vs injected {injected}: {accounting}");
    // The two partitions still get their slots (the spin comes out of whoever's slot it hit).
    assert!(stats(&run, "hog")["iterations"].as_u64().unwrap() > 100);
    // Without the knobs the switch takes under 1,500 cycles (the gang test above). Every slot
    // starts 3,000 cycles later; the slot the once-per-frame 2,000 uncharged cycles fall into
    // (the first loop pass at or after the frame's start: the barrier's or, when the previous
    // turn ended a hair before the boundary, the hog's) starts 5,000 cycles later.
    let slot_cycles = run.one("boot")["tsc_hz"].as_u64().unwrap() / 200;
    let mut latencies = Vec::new();
    for partition in ["hog", "barrier"] {
        let s = stats(&run, partition);
        latencies.push(s["entry_latency_median_cycles"].as_u64().unwrap());
        assert!(s["skew_median_cycles"].as_u64().unwrap() * 100 < slot_cycles, "{s}");
    }
    latencies.sort_unstable();
    assert!((3_000..4_500).contains(&latencies[0]), "3,000 cycles later into the slot: {latencies:?}");
    assert!((5_000..6_500).contains(&latencies[1]), "5,000 cycles later into the slot: {latencies:?}");
}

/// Spin-wait sampling sees the test guest's barrier spinning from the hypervisor's side
/// (guest code read at RIP through its page tables), without PAUSE-loop exits.
#[test]
fn spin_wait_sampling_sees_the_independent_barrier_spin() {
    let run = Boot::new("dispatch-sampled", "bochs", 2, "tests/configs/independent-sampled.toml").run();
    run.assert_clean_end();
    let barrier = stats(&run, "barrier");
    let hog = stats(&run, "hog");
    assert!(barrier["spin_samples"].as_u64().unwrap() >= 200, "{barrier}");
    let (sampled, guest) = (pct(&barrier["spin_sampled_pct"]), pct(&barrier["spin_waste_guest_pct"]));
    assert!(sampled > 20.0, "the spinning on descheduled siblings is seen: {barrier}");
    // The guest's own TSC-timed figure of its running time agrees (48.4% +- 2.6 vs 48.6% when
    // this was written; the target is 5 points).
    assert!((sampled - guest).abs() < 5.0, "sampled {sampled}% vs guest {guest}%: {barrier}");
    // A CPU-bound guest spins only while vCPU 0 waits for its UART to print a progress line.
    assert!(pct(&hog["spin_sampled_pct"]) < 1.0, "{hog}");
    // What the sampling cost: every sample is an exit of its own, counted apart.
    let accounting = run.one("accounting");
    let taken = barrier["spin_samples"].as_u64().unwrap() + hog["spin_samples"].as_u64().unwrap();
    assert!(accounting["spin_sample_exits"].as_u64().unwrap() >= taken, "{accounting}");
    let cost = accounting["spin_sample_mean_cycles"].as_u64().unwrap();
    assert!((100..5_000).contains(&cost), "{accounting}");
}

#[test]
fn independent_baseline_shows_the_spin_wait_collapse() {
    let gang = Boot::new("dispatch-collapse-gang", "bochs", 2, "guests/configs/default.toml").run();
    let independent = Boot::new("dispatch-collapse-independent", "bochs", 2, "tests/configs/independent.toml").run();
    independent.assert_clean_end();
    let g = stats(&gang, "barrier");
    let i = stats(&independent, "barrier");
    let (g_rate, i_rate) = (g["iterations_per_s"].as_u64().unwrap(), i["iterations_per_s"].as_u64().unwrap());
    assert!(
        i_rate * 3 < g_rate * 2,
        "independent ({i_rate}/s) should lose at least a third of gang's progress ({g_rate}/s)"
    );
    assert!(pct(&i["spin_waste_hv_pct"]) > 20.0, "independent wastes time spinning on descheduled siblings: {i}");
    // The CPU-bound partition does not care how it is scheduled.
    assert_share(&independent, "hog", 50.0);
}

#[test]
fn an_out_of_bounds_access_stops_only_that_partition() {
    let run = Boot::new("dispatch-oob", "bochs", 2, "tests/configs/oob-beside-cpubound.toml").run();
    run.assert_clean_end();
    let fault = run.one("partition_fault");
    assert_eq!(fault["partition"], "rogue");
    assert_eq!(fault["reason"], "ept-violation");
    assert_eq!(fault["vcpu"], 0, "the testguest's vCPU 0 does the bad write");
    let detail = fault["detail"].as_str().unwrap();
    assert!(
        detail.contains("write") && detail.contains("0x1010000"),
        "names the access and the GPA (16 MiB + 0x10000): {detail}"
    );
    assert!(fault["rip"].as_str().unwrap().starts_with("0x10"), "guest RIP inside the image: {fault}");
    assert_eq!(stats(&run, "rogue")["state"], "stopped");
    // The other partition keeps progressing after the fault and keeps its 30%.
    e2e::assert_keeps_running(&run, "steady");
    assert_share(&run, "steady", 30.0);
}

#[test]
fn a_halted_partitions_slots_go_to_the_soft_share() {
    let run = Boot::new("dispatch-slack", "bochs", 2, "tests/configs/halt-gives-slack.toml").run();
    run.assert_clean_end();
    assert_eq!(stats(&run, "sleeper")["iterations"], 0);
    // The soft partition gets its half plus the halted partition's half.
    let soaker = pct(&stats(&run, "soaker")["cpu_share_pct"]);
    assert!(soaker > 97.0, "soaker got {soaker}% of the pCPUs");
    assert!(pct(&run.one("accounting")["idle_pct"]) < 1.0, "{}", run.one("accounting"));
}

#[test]
fn a_partition_configured_to_reset_is_reloaded_after_each_fault() {
    let run = Boot::new("dispatch-reset", "bochs", 2, "tests/configs/oob-reset.toml").run();
    run.assert_clean_end();
    let resets = run.all("partition_reset");
    assert!(resets.len() >= 2, "the rogue faults again after every reset:\n{}", run.log);
    assert!(resets.iter().all(|r| r["partition"] == "rogue"));
    assert!(run.all("partition_fault").iter().all(|f| f["action"] == "reset" && f["partition"] == "rogue"));
    let rogue = stats(&run, "rogue");
    assert_eq!(rogue["resets"].as_u64().unwrap(), resets.len() as u64, "{rogue}");
    // After a reset the guest starts from scratch (its iteration count restarts) and runs again.
    assert!(rogue["guest_cycles"].as_u64().unwrap() > 0);
    assert_eq!(stats(&run, "steady")["state"], "running");
    assert_share(&run, "steady", 30.0);
}

#[test]
fn the_four_pcpu_example_runs_its_hierarchy_of_hard_and_weighted_partitions() {
    // 512 MiB: the example places "control" at a fixed 256 MiB.
    let run = Boot::new("dispatch-four", "bochs", 4, "guests/configs/four-pcpus.toml").megs(512).run();
    run.assert_clean_end();
    assert!(run.all("partition_fault").is_empty(), "{}", run.log);
    assert_eq!(run.all("partition_stats").len(), 4);
    e2e::assert_heap_within_estimate(&run);
    // Hard reservations hold exactly; the weighted batch group shares what is left.
    assert_share(&run, "barrier", 50.0);
    assert_share(&run, "control", 20.0);
    for soft in ["crunch", "logger"] {
        let s = stats(&run, soft);
        assert!(s["iterations"].as_u64().unwrap() > 0, "{s}");
        assert!(pct(&s["cpu_share_pct"]) > 5.0, "{s}");
    }
    let barrier = stats(&run, "barrier");
    assert!(pct(&barrier["spin_waste_hv_pct"]) <= 2.0, "gang on 4 pCPUs: {barrier}");
    assert!(run.one("accounting")["unaccounted_ppb"].as_u64().unwrap() <= 10_000);
}

#[test]
fn directed_yield_gives_the_spinning_vcpus_slot_away() {
    let run = Boot::new("dispatch-yield", "bochs", 2, "tests/configs/independent-yield.toml").run();
    run.assert_clean_end();
    let accounting = run.one("accounting");
    assert!(accounting["yields"].as_u64().unwrap() > 10, "PAUSE-loop exits yield: {accounting}");
    // The spinning BARRIER partition hands its time to the CPU-bound one, which gains.
    let hog = pct(&stats(&run, "hog")["cpu_share_pct"]);
    assert!(hog > 55.0, "hog got {hog}%");
    assert!(pct(&stats(&run, "barrier")["cpu_share_pct"]) < 45.0);
}

/// Sandy Bridge has neither PAUSE-loop exiting nor EPT A/D bits, like the VT-x nested KVM
/// offers: partitions run all the same, and the hypervisor's spin waste says "not measured".
#[test]
fn partitions_run_on_a_cpu_without_pause_loop_exiting() {
    let run = Boot::new("dispatch-sandy-bridge", "bochs", 2, "guests/configs/default.toml")
        .cpu_model("corei7_sandy_bridge_2600k")
        .run();
    run.assert_clean_end();
    assert!(run.all("partition_fault").is_empty(), "{}", run.log);
    let paths = run.one("vmx_paths");
    assert_eq!(paths["spin_exits"], "none", "{paths}");
    assert_eq!(paths["spin_waste_hv"], "not measured", "{paths}");
    for name in ["barrier", "hog"] {
        let p = stats(&run, name);
        assert!(p["iterations"].as_u64().unwrap() > 100, "{name} makes progress: {p}");
        assert_eq!(p["spin_waste_hv_pct"], "not measured", "never 0 without a measure: {p}");
        assert_eq!(p["pause_loop_exits"], 0, "{p}");
        assert_share(&run, name, 50.0);
    }
    // The guest's own spin accounting still works.
    pct(&stats(&run, "barrier")["spin_waste_guest_pct"]);
    // The summary `scripts/phalanx run` prints says so too.
    let summary = std::process::Command::new("python3")
        .arg(e2e::repo_root().join("scripts/summarize.py"))
        .arg(run.dir.join("serial.log"))
        .output()
        .expect("run scripts/summarize.py");
    let text = String::from_utf8_lossy(&summary.stdout);
    assert!(summary.status.success(), "{text}{}", String::from_utf8_lossy(&summary.stderr));
    assert!(text.contains("spin_exits: none") && text.contains("not measured"), "{text}");
}

/// Without PAUSE-loop exiting, independent-yield yields on every PAUSE (PAUSE exiting).
#[test]
fn directed_yield_falls_back_to_pause_exiting() {
    let run = Boot::new("dispatch-yield-sandy-bridge", "bochs", 2, "tests/configs/independent-yield.toml")
        .cpu_model("corei7_sandy_bridge_2600k")
        .run();
    run.assert_clean_end();
    assert_eq!(run.one("vmx_paths")["spin_exits"], "pause-exiting");
    let accounting = run.one("accounting");
    assert!(accounting["yields"].as_u64().unwrap() > 10, "PAUSE exits yield: {accounting}");
    let hog = pct(&stats(&run, "hog")["cpu_share_pct"]);
    assert!(hog > 55.0, "hog got {hog}%");
}

/// The other fallbacks, run on Bochs with the features taken away: no VPID (TLBs flushed on
/// every transition), all-context INVEPT, no PAUSE-loop exiting. Partitions run as before.
#[test]
fn partitions_run_without_vpid_single_context_invept_or_pause_loop_exiting() {
    let run = Boot::new("dispatch-fallbacks", "bochs", 2, "guests/configs/default.toml")
        .cmdline("phalanx.debug.vmx_without=vpid,invept_single_context,pause_loop_exiting")
        .run();
    run.assert_clean_end();
    assert!(run.all("partition_fault").is_empty(), "{}", run.log);
    let paths = run.one("vmx_paths");
    assert_eq!(paths["vpid"], "flush on every entry and exit", "{paths}");
    assert_eq!(paths["invept"], "all-context", "{paths}");
    assert_eq!(paths["spin_exits"], "none", "{paths}");
    for name in ["barrier", "hog"] {
        assert!(stats(&run, name)["iterations"].as_u64().unwrap() > 100, "{name}");
        assert_share(&run, name, 50.0);
    }
}

/// A hard requirement the CPU lacks ends the run with one error naming it and how to run
/// instead; no partition starts.
#[test]
fn a_missing_hard_requirement_is_one_clear_error() {
    let run = Boot::new("dispatch-no-preemption-timer", "bochs", 2, "guests/configs/default.toml")
        .cmdline("phalanx.debug.vmx_without=preemption_timer")
        .run();
    assert!(!run.timed_out, "{}", run.log);
    let error = run.one("error");
    let message = error["message"].as_str().unwrap();
    assert_eq!(error["stage"], "vmx");
    assert!(message.contains("preemption timer") && message.contains("Bochs"), "{message}");
    assert!(run.all("partition_start").is_empty() && run.all("partition_stats").is_empty(), "{}", run.log);
}
