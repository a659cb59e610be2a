//! The hypervisor's own trace, end to end under Bochs: what the pCPUs recorded decodes, and
//! agrees with what the ledgers and exit counters measured on their own.

use base64::Engine;
use e2e::{Boot, Run};
use reservations::trace::{decode, Event, EventKind};
use std::collections::BTreeMap;
use std::process::Command;

/// Every pCPU's events, decoded from its `trace` records in chunk order.
fn events_by_pcpu(run: &Run) -> BTreeMap<u64, Vec<Event>> {
    let mut by_pcpu: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
    for r in run.all("trace") {
        let pcpu = r["pcpu"].as_u64().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        let events = decode(&bytes, r["base_tsc"].as_u64().unwrap()).unwrap_or_else(|e| panic!("{e:?} in {r}"));
        assert_eq!(events.len() as u64, r["events"].as_u64().unwrap(), "{r}");
        by_pcpu.entry(pcpu).or_default().extend(events);
    }
    by_pcpu
}

#[test]
fn the_trace_of_a_gang_run_agrees_with_the_ledgers_and_exit_counts() {
    let run = Boot::new("trace-gang", "bochs", 2, "tests/configs/gang-traced.toml").run();
    run.assert_clean_end();
    let by_pcpu = events_by_pcpu(&run);
    assert_eq!(by_pcpu.len(), 2, "one trace per pCPU");
    for end in run.all("trace_end") {
        assert_eq!(end["dropped"], 0, "the buffer holds a 2 s run: {end}");
        assert_eq!(end["events"].as_u64().unwrap() as usize, by_pcpu[&end["pcpu"].as_u64().unwrap()].len());
    }
    let names: Vec<&str> = run.all("partition_plan").iter().map(|p| p["name"].as_str().unwrap()).collect();
    let mut guest_cycles = vec![0u64; names.len()];
    let (mut turns, mut exits) = (vec![0u64; names.len()], BTreeMap::<u32, u64>::new());
    for (pcpu, events) in &by_pcpu {
        assert!(events.windows(2).all(|w| w[0].tsc <= w[1].tsc), "pCPU {pcpu}: stamps in order");
        // Turns alternate start/end; inside a turn entries and exits alternate.
        let mut in_turn: Option<u16> = None;
        let mut entered: Option<u64> = None;
        for e in events {
            match e.kind {
                EventKind::TurnStart => {
                    assert!(in_turn.is_none(), "pCPU {pcpu}: a turn inside a turn at {}", e.tsc);
                    in_turn = Some(e.partition);
                    turns[e.partition as usize] += 1;
                }
                EventKind::TurnEnd => {
                    assert_eq!(in_turn.take(), Some(e.partition), "pCPU {pcpu}: turn end at {}", e.tsc);
                    assert!(entered.is_none(), "pCPU {pcpu}: a turn ended with its guest running");
                }
                EventKind::VmEntry => {
                    assert_eq!(in_turn, Some(e.partition), "pCPU {pcpu}: entry outside its turn");
                    assert!(entered.replace(e.tsc).is_none());
                }
                EventKind::VmExit => {
                    let entry = entered.take().expect("an exit follows an entry");
                    guest_cycles[e.partition as usize] += e.tsc - entry;
                    *exits.entry(e.arg).or_default() += 1;
                }
                EventKind::IdleStart | EventKind::IdleEnd => assert!(in_turn.is_none()),
                _ => {}
            }
        }
    }
    // The ledgers charge exactly the entry-to-exit stretches the trace stamps: guest cycles
    // and slots agree to the cycle, and every exit the counters saw is in the trace.
    for (id, name) in names.iter().enumerate() {
        let stats = run.all("partition_stats").into_iter().find(|s| s["partition"] == *name).unwrap();
        assert_eq!(guest_cycles[id], stats["guest_cycles"].as_u64().unwrap(), "{name}: {stats}");
        assert_eq!(turns[id], stats["slots"].as_u64().unwrap(), "{name}: {stats}");
    }
    for stat in run.all("exit_stats") {
        let reason = stat["reason"].as_u64().unwrap() as u32;
        assert_eq!(exits.get(&reason).copied().unwrap_or(0), stat["count"].as_u64().unwrap(), "{stat}");
    }
    // The slot timer's interrupts that stopped a guest are in it as host interrupts.
    let host_interrupts = by_pcpu.values().flatten().filter(|e| e.kind == EventKind::HostInterrupt).count() as u64;
    assert_eq!(host_interrupts, *exits.get(&1).unwrap_or(&0), "one per external-interrupt exit");

    // The report tool turns it into a Perfetto trace: one track per pCPU, a slice per turn.
    let status = Command::new(e2e::repo_root().join("scripts/phalanx")).arg("report").arg(&run.dir).status().unwrap();
    assert!(status.success(), "scripts/phalanx report {}", run.dir.display());
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.dir.join("trace.json")).unwrap()).unwrap();
    let slices: Vec<&serde_json::Value> =
        trace["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X").collect();
    let tracks: std::collections::BTreeSet<u64> = slices.iter().map(|s| s["tid"].as_u64().unwrap()).collect();
    assert_eq!(tracks.len(), 2, "one track per pCPU");
    let turn_slices = slices.iter().filter(|s| s["name"].as_str().unwrap().contains(" vCPU ")).count() as u64;
    assert_eq!(turn_slices, turns.iter().sum::<u64>(), "a slice per turn");
    for file in ["report.md", "progress.png", "spin.png", "exits.png"] {
        assert!(run.dir.join(file).exists(), "report wrote {file}");
    }
}

#[test]
fn ipi_gang_switches_at_the_timing_pcpus_signal() {
    let run = Boot::new("trace-ipi-gang", "bochs", 2, "tests/configs/ipi-gang-traced.toml").run();
    run.assert_clean_end();
    let by_pcpu = events_by_pcpu(&run);
    const BOUNDARY_VECTOR: u32 = 0x43;
    let signals: Vec<&Event> = by_pcpu[&0].iter().filter(|e| e.kind == EventKind::BoundaryIpi).collect();
    // Two slots a frame for 2 s of 10 ms frames: a signal at every boundary after t0.
    assert!((395..=400).contains(&signals.len()), "{} boundary IPIs", signals.len());
    assert!(by_pcpu[&1].iter().all(|e| e.kind != EventKind::BoundaryIpi), "only pCPU 0 times the slots");
    let arrived = by_pcpu[&1].iter().filter(|e| e.kind == EventKind::HostInterrupt && e.arg == BOUNDARY_VECTOR);
    assert!(arrived.count() > 100, "pCPU 1's guests are stopped by the signal");
    // pCPU 1 starts each slot after the signal: every gang slot has a skew (the IPI, one exit's
    // handling and the switch: about 500 Bochs cycles), still far below the slot. A pCPU that
    // missed the signal would start a whole frame late, at its guard. The barrier keeps its
    // progress.
    let barrier = run.all("partition_stats").into_iter().find(|s| s["partition"] == "barrier").unwrap();
    let slot_cycles = run.one("boot")["tsc_hz"].as_u64().unwrap() / 200;
    let skew = barrier["skew_median_cycles"].as_u64().unwrap();
    assert!(skew > 0 && skew * 50 < slot_cycles, "median skew {skew} cycles: {barrier}");
    assert!(barrier["spin_waste_guest_pct"].as_str().unwrap().parse::<f64>().unwrap() < 2.0, "{barrier}");
}
