//! Scheduler simulator and benchmark CLI (host, std).
//!
//!   sched-sim consolidate [--out DIR] [--duration-ms N] [--seed N]
//!       BARRIER (4 vCPUs, 50% hard) + CPU-bound (4 vCPUs, 50% soft) on 4 pCPUs under the four
//!       policies, plus BARRIER alone on 4 dedicated pCPUs. Prints the table, writes
//!       DIR/results.json and DIR/trace.json (Perfetto / chrome://tracing).
//!   sched-sim scale
//!       Planning time at 256 pCPUs / 1,000 partitions / 4,096 vCPUs, and dispatch decision cost.

use std::hint::black_box;
use std::time::Instant;

use sched::sim::{simulate, Policy, SimConfig, SimPartition, SimResult, SliceKind, Workload};
use sched::{plan_gang, DispatchTables, PartitionSpec, PlanConfig, Reservation, Tick};
use serde_json::{json, Value};

const US: Tick = 1_000;
const MS: Tick = 1_000_000;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("consolidate") => consolidate(&args[2..]),
        Some("scale") => scale(),
        _ => Err("usage: sched-sim consolidate [--out DIR] [--duration-ms N] [--seed N] | sched-sim scale".into()),
    };
    if let Err(e) = result {
        eprintln!("sched-sim: {e}");
        std::process::exit(1);
    }
}

fn spec(id: u32, name: &str, vcpus: u32, pcpus: &[u32], reservation: Reservation) -> PartitionSpec {
    PartitionSpec { id, name: name.into(), pcpus: pcpus.to_vec(), vcpus, gang: true, reservation, depth: 1 }
}

struct Row {
    label: String,
    result: SimResult,
}

fn consolidate(args: &[String]) -> Result<(), String> {
    let out = arg(args, "--out").unwrap_or_else(|| "build/bench-sched".into());
    let duration_ms: u64 = arg(args, "--duration-ms").map(|s| s.parse().map_err(|e| format!("--duration-ms: {e}"))).transpose()?.unwrap_or(2000);
    let seed: u64 = arg(args, "--seed").map(|s| s.parse().map_err(|e| format!("--seed: {e}"))).transpose()?.unwrap_or(1);
    std::fs::create_dir_all(&out).map_err(|e| format!("{out}: {e}"))?;

    let pcpus = [0, 1, 2, 3];
    let workload = Workload::Barrier { compute: 100 * US, jitter_ppm: 50_000, block_after_spin: None };
    let barrier = |r| SimPartition { spec: spec(1, "barrier", 4, &pcpus, r), workload };
    let batch = SimPartition { spec: spec(2, "cpu-bound", 4, &pcpus, Reservation::Soft { share_ppm: 500_000 }), workload: Workload::CpuBound };
    let half = Reservation::Hard { budget: 5 * MS, period: 10 * MS };
    let whole = Reservation::Hard { budget: 10 * MS, period: 10 * MS };
    let cfg = SimConfig {
        pcpu_count: 4,
        duration: duration_ms * MS,
        switch_cost: 2 * US,
        soft_period: 10 * MS,
        frame: None,
        // CFS: sched_latency 6 ms x (1 + log2 4 CPUs) = 18 ms, shared by the 2 threads per pCPU.
        independent_cycle: 18 * MS,
        independent_shuffle: false,
        seed,
        trace_until: 60 * MS,
    };
    let policies = [
        ("gang", Policy::Gang),
        ("independent", Policy::Independent),
        ("independent+ple", Policy::IndependentPle { window: 10 * US, exit_cost: 2 * US }),
        ("relaxed-cosched", Policy::RelaxedCosched { skew_bound: 3 * MS, check_every: MS }),
    ];
    let mut rows = Vec::new();
    let dedicated = simulate(&[barrier(whole)], Policy::Gang, &cfg).map_err(|e| e.to_string())?;
    rows.push(Row { label: "dedicated (4 pCPUs)".into(), result: dedicated });
    for (label, policy) in policies {
        let r = simulate(&[barrier(half), batch.clone()], policy, &cfg).map_err(|e| e.to_string())?;
        rows.push(Row { label: label.into(), result: r });
    }
    let mut shuffled = cfg.clone();
    shuffled.independent_shuffle = true;
    let r = simulate(&[barrier(half), batch.clone()], Policy::Independent, &shuffled).map_err(|e| e.to_string())?;
    rows.push(Row { label: "independent (random phases)".into(), result: r });

    for row in &rows {
        if row.result.charged != row.result.elapsed {
            return Err(format!("{}: ledger charged {} of {} ticks", row.label, row.result.charged, row.result.elapsed));
        }
    }

    println!("BARRIER (4 vCPUs, 50% hard, compute 100 us +-5%) + CPU-bound (4 vCPUs, 50% soft) on 4 pCPUs, {duration_ms} ms simulated");
    println!(
        "{:<28} {:<10} {:>8} {:>7} {:>8} {:>11} {:>11} {:>11} {:>9} {:>9}",
        "policy", "partition", "iter/s", "cpu %", "waste %", "skew mean", "skew max", "arr.spread", "switches", "PLE exits"
    );
    for row in &rows {
        for p in &row.result.partitions {
            let cpu_pct = 100.0 * p.cpu_time as f64 / (row.result.duration as f64 * 4.0);
            println!(
                "{:<28} {:<10} {:>8.0} {:>7.1} {:>8.2} {:>8.1} us {:>8.1} us {:>8.1} us {:>9} {:>9}",
                row.label,
                p.name,
                p.progress_per_s,
                cpu_pct,
                p.waste_pct,
                p.mean_skew / 1e3,
                p.max_skew as f64 / 1e3,
                p.mean_arrival_spread / 1e3,
                p.switches,
                p.ple_exits
            );
        }
    }
    let progress = |label: &str| rows.iter().find(|r| r.label == label).unwrap().result.partitions[0].progress_per_s;
    let waste = |label: &str| rows.iter().find(|r| r.label == label).unwrap().result.partitions[0].waste_pct;
    let ded = progress("dedicated (4 pCPUs)");
    let gang_ratio = progress("gang") / (0.5 * ded);
    let ind_ratio = progress("independent") / (0.5 * ded);
    let gang_ok = gang_ratio >= 0.9 && waste("gang") <= 2.0;
    println!();
    println!(
        "gang: BARRIER progress = {:.1}% of (0.5 x dedicated {:.0} iter/s), waste {:.2}%  -> target >= 90% and <= 2%: {}",
        100.0 * gang_ratio,
        ded,
        waste("gang"),
        if gang_ok { "PASS" } else { "FAIL" }
    );
    println!(
        "independent: {:.1}% of (0.5 x dedicated), waste {:.1}%  -> collapse {}",
        100.0 * ind_ratio,
        waste("independent"),
        if ind_ratio < 0.5 { "shown" } else { "NOT shown" }
    );

    let results: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "policy": row.label,
                "duration_ns": row.result.duration,
                "frame_ns": row.result.frame,
                "table_switches_per_frame": row.result.table_switches,
                "partitions": row.result.partitions.iter().map(|p| json!({
                    "id": p.id, "name": p.name, "iterations": p.iterations,
                    "progress_per_s": p.progress_per_s, "cpu_time_ns": p.cpu_time,
                    "compute_time_ns": p.compute_time, "spin_time_ns": p.spin_time,
                    "waste_time_ns": p.waste_time, "waste_pct": p.waste_pct,
                    "mean_skew_ns": p.mean_skew, "max_skew_ns": p.max_skew, "mean_arrival_spread_ns": p.mean_arrival_spread,
                    "switches": p.switches, "ple_exits": p.ple_exits, "overhead_ns": p.overhead_time,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = json!({
        "scenario": "barrier 4 vCPU 50% hard + cpu-bound 4 vCPU 50% soft on 4 pCPUs",
        "dedicated_progress_per_s": ded,
        "gang_ratio_of_half_dedicated": gang_ratio,
        "gang_target_met": gang_ok,
        "independent_ratio_of_half_dedicated": ind_ratio,
        "runs": results,
    });
    let path = format!("{out}/results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).map_err(|e| format!("{path}: {e}"))?;
    let path = format!("{out}/trace.json");
    std::fs::write(&path, trace_json(&rows[1..5]).to_string()).map_err(|e| format!("{path}: {e}"))?;
    println!("wrote {out}/results.json and {out}/trace.json (open in ui.perfetto.dev)");
    if !gang_ok {
        return Err("gang target not met".into());
    }
    Ok(())
}

/// Chrome trace-event JSON: one process per policy, one thread (row) per pCPU, one "X" event per
/// schedule slice named after the partition.
fn trace_json(rows: &[Row]) -> Value {
    let mut events = Vec::new();
    for (k, row) in rows.iter().enumerate() {
        let pid = k + 1;
        events.push(json!({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": row.label}}));
        events.push(json!({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}}));
        for c in 0..4 {
            events.push(json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": c, "args": {"name": format!("pCPU {c}")}}));
        }
        for s in &row.result.trace {
            let name = match (s.run, s.kind) {
                (_, SliceKind::Idle) | (None, _) => "idle".to_string(),
                (Some(v), _) => row.result.partitions.iter().find(|p| p.id == v.partition).map(|p| p.name.clone()).unwrap_or_default(),
            };
            let state = match s.kind {
                SliceKind::Compute => "compute",
                SliceKind::Spin => "spin",
                SliceKind::Overhead => "switch/exit",
                SliceKind::Idle => "idle",
            };
            events.push(json!({
                "name": name, "cat": state, "ph": "X", "pid": pid, "tid": s.pcpu,
                "ts": s.start as f64 / 1e3, "dur": (s.end - s.start) as f64 / 1e3,
                "args": {"vcpu": s.run.map(|v| v.vcpu), "state": state},
            }));
        }
    }
    json!({"traceEvents": events, "displayTimeUnit": "ns"})
}

/// 1,000 partitions, 4,096 vCPUs on 256 pCPUs: 64 groups of 4 pCPUs, ~16 partitions each, half
/// hard (periods 1, 2 or 4 ms), half soft, about 80% reserved per pCPU; 96 partitions have 5
/// vCPUs (round-robin gang on 4 pCPUs), the rest 4.
fn scale_set(partitions: u32, pcpus: u32, depth: u32) -> Vec<PartitionSpec> {
    let groups = pcpus / 4;
    let per_group = partitions.div_ceil(groups);
    let share_ppm = 800_000 / per_group;
    let extra_vcpus = 4096u32.saturating_sub(4 * partitions).min(partitions);
    (0..partitions)
        .map(|i| {
            let g = i % groups;
            let period = MS << (i % 3);
            let reservation = if i % 2 == 0 {
                Reservation::Hard { budget: period * share_ppm as u64 / 1_000_000, period }
            } else {
                Reservation::Soft { share_ppm }
            };
            PartitionSpec {
                id: i,
                name: format!("p{i}"),
                pcpus: (4 * g..4 * g + 4).collect(),
                vcpus: if i < extra_vcpus { 5 } else { 4 },
                gang: true,
                reservation,
                depth,
            }
        })
        .collect()
}

/// Best of 5 runs (the machine is shared; the minimum is the least disturbed).
fn time_decisions(tables: &DispatchTables, iters: u64) -> f64 {
    (0..5).map(|_| time_decisions_once(tables, iters / 5)).fold(f64::INFINITY, f64::min)
}

fn time_decisions_once(tables: &DispatchTables, iters: u64) -> f64 {
    let mut disps: Vec<_> = (0..tables.pcpus.len()).map(|c| tables.dispatcher(c, 0)).collect();
    let mut nows = vec![0u64; disps.len()];
    let start = Instant::now();
    for k in 0..iters {
        let c = (k as usize) % disps.len();
        let d = disps[c].on_boundary(black_box(nows[c]));
        nows[c] = black_box(d).next_deadline;
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

fn scale() -> Result<(), String> {
    let mut cfg = PlanConfig::new(256, MS);
    let set = scale_set(1000, 256, 1);
    let vcpus: u32 = set.iter().map(|p| p.vcpus).sum();
    let t = Instant::now();
    let plan = plan_gang(&set, &cfg).map_err(|e| e.to_string())?;
    let tables = DispatchTables::compile(&plan, &set).map_err(|e| e.to_string())?;
    let plan_s = t.elapsed().as_secs_f64();
    let entries: usize = tables.pcpus.iter().map(|p| p.entries.len()).sum();
    println!(
        "plan: 256 pCPUs, {} partitions, {vcpus} vCPUs, frame {} ms: planned + compiled in {:.1} ms ({} table entries) -> target < 1 s: {}",
        set.len(),
        plan.frame / MS,
        plan_s * 1e3,
        entries,
        if plan_s < 1.0 { "PASS" } else { "FAIL" }
    );
    if vcpus != 4096 {
        return Err(format!("scale set has {vcpus} vCPUs, expected 4096"));
    }

    const ITERS: u64 = 20_000_000;
    let deep = scale_set(1000, 256, 8);
    let deep_tables = DispatchTables::compile(&plan_gang(&deep, &cfg).map_err(|e| e.to_string())?, &deep).map_err(|e| e.to_string())?;
    cfg.pcpu_count = 4;
    let small = scale_set(10, 4, 1);
    let small_tables = DispatchTables::compile(&plan_gang(&small, &cfg).map_err(|e| e.to_string())?, &small).map_err(|e| e.to_string())?;
    let _warm = time_decisions(&tables, ITERS / 4);
    let d1 = time_decisions(&tables, ITERS);
    let d8 = time_decisions(&deep_tables, ITERS);
    let p10 = time_decisions(&small_tables, ITERS);
    let p1000 = time_decisions(&tables, ITERS);
    println!("dispatch decision (on_boundary, cycling over all pCPUs' dispatchers; best of 5 x 4M):");
    println!("  depth 1, 1,000 partitions / 256 pCPUs: {d1:.2} ns/decision");
    println!("  depth 8, 1,000 partitions / 256 pCPUs: {d8:.2} ns/decision");
    println!("  10 partitions / 4 pCPUs:               {p10:.2} ns/decision");
    println!("  1,000 partitions / 256 pCPUs:          {p1000:.2} ns/decision");
    Ok(())
}
