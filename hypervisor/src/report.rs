//! End-of-run records: per-partition progress, spin-wait waste (hypervisor- and
//! guest-measured), CPU share against the reservation, gang skew, exit costs per reason, and
//! the accounting of every cycle.

extern crate alloc;

use alloc::vec::Vec;
use reservations::{Ledger, MachineStats};

use crate::console::Record;
use crate::machine::machine;
use crate::percpu::PcpuResult;
use vmx::control_set::PLE_WINDOW;

/// A percentage with two decimals, or "not measured" (never a 0 that nobody measured).
fn pct_or_not_measured(pct: Option<f64>) -> alloc::string::String {
    pct.map_or("not measured".into(), |pct| alloc::format!("{pct:.2}"))
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// What is left of a partition's exits inside its measurement windows, by reason: how often
/// per second of the window's guest time, and what each costs (the window's exit figures
/// in `partition_stats`, broken down).
fn window_exit_records(name: &str, id: usize, results: &[PcpuResult], window_guest: u64) {
    let mut exits = [crate::percpu::ExitStat::default(); crate::percpu::EXIT_REASONS];
    for by_partition in results.iter().filter_map(|r| r.window_exits.get(id)) {
        for (total, e) in exits.iter_mut().zip(by_partition.iter()) {
            total.count += e.count;
            total.cycles += e.cycles;
        }
    }
    for (reason, e) in exits.iter().enumerate().filter(|(_, e)| e.count > 0) {
        Record::new("window_exit_stats")
            .str("partition", name)
            .u64("reason", reason as u64)
            .str("name", vmx::ExitReason::from_raw(reason as u32).name())
            .u64("count", e.count)
            .u64("per_guest_s", e.count * crate::tsc::hz() / window_guest.max(1))
            .u64("mean_cycles", e.cycles / e.count)
            .emit();
    }
}

/// Prints the final records; `cpus` pCPUs took part.
pub fn final_records(cpus: usize, run_cycles: u64) {
    let m = machine();
    let results: Vec<PcpuResult> =
        (0..cpus).filter_map(|c| crate::percpu::of(c).dispatch_result.lock().take()).collect();
    let ledgers: Vec<Ledger> = results.iter().map(|r| r.ledger.clone()).collect();
    let stats = MachineStats::from_ledgers(&ledgers);
    let hz = crate::tsc::hz().max(1);
    let seconds_x1000 = run_cycles * 1000 / hz;

    for p in &m.partitions {
        p.report_fault();
    }
    if let Some(id) = m.console_input {
        let (received, dropped) = crate::console::input_counts();
        Record::new("console_input")
            .str("partition", &m.partitions[id].name)
            .u64("bytes", received)
            .u64("dropped", dropped)
            .emit();
    }
    for p in &m.partitions {
        let totals = stats.partitions.get(p.id).copied().unwrap_or_default();
        let guest_stats: Vec<_> = (0..p.vcpus).map(|v| p.guest_stats(v)).collect();
        let iterations = guest_stats.iter().map(|s| s.iterations).max().unwrap_or(0);
        let guest_spin: u64 = guest_stats.iter().map(|s| s.spin_cycles).sum();
        let guest_busy: u64 = guest_stats.iter().map(|s| s.busy_cycles).sum();
        // Only PAUSE-loop exits measure spinning; without them the figure is "not measured",
        // never 0.
        let hv_spin_pct = m
            .controls
            .pause_loop_exiting()
            .then(|| (totals.pause_loop_exits * PLE_WINDOW) as f64 * 100.0 / totals.guest_cycles.max(1) as f64);
        // Sampled at any CPL on any CPU: the guest's code looked at every `spin_sample_us`.
        let sampled = vmx::spin_sample::spinning_pct(totals.spin_samples_spinning, totals.spin_samples);
        // The same, over the stretch the guest measured itself (its measurement window).
        let windowed = vmx::spin_sample::spinning_pct(totals.window_spin_samples_spinning, totals.window_spin_samples);
        // What exits cost the stretch the guest measured (its window): how often it left
        // guest mode per second of its own time, and the share of its time spent handling them.
        let window_guest = totals.window_guest_cycles;
        let window_exit_rate =
            (window_guest > 0).then(|| alloc::format!("{}", totals.window_exits * crate::tsc::hz() / window_guest));
        let window_handling = totals.window_exit_handling_cycles;
        let window_handling_pct =
            (window_guest > 0).then(|| window_handling as f64 * 100.0 / (window_guest + window_handling) as f64);
        // Only the test guest keeps its own spin figure where the hypervisor can read it.
        let guest_spin_pct = (p.payload == crate::partition::Payload::TestGuest)
            .then(|| guest_spin as f64 * 100.0 / (guest_spin + guest_busy).max(1) as f64);
        let pcpus_held = m.pcpus_held(p.id) as u64;
        let capacity = run_cycles * pcpus_held;
        let used = totals.charged_cycles();
        // Gang skew: per slot, the spread of the first VM entry across the pCPUs.
        let mut by_slot: alloc::collections::BTreeMap<u64, (u64, u64, u32)> = alloc::collections::BTreeMap::new();
        // Entry latency: from the slot boundary to its owner's first VM entry on a pCPU.
        let mut latencies = Vec::new();
        for e in results.iter().flat_map(|r| r.slot_entries.iter()).filter(|e| e.partition == p.id as u32) {
            latencies.push(e.entry_tsc.saturating_sub(e.slot_start));
            let s = by_slot.entry(e.slot_start).or_insert((u64::MAX, 0, 0));
            s.0 = s.0.min(e.entry_tsc);
            s.1 = s.1.max(e.entry_tsc);
            s.2 += 1;
        }
        // Only aligned policies start a partition's slots together; elsewhere there is no gang.
        let mut skews: Vec<u64> = if m.policy.aligned() {
            by_slot.values().filter(|s| s.2 as u64 == pcpus_held && pcpus_held > 1).map(|s| s.1 - s.0).collect()
        } else {
            Vec::new()
        };
        let skew_max = skews.iter().copied().max().unwrap_or(0);
        // When the worst slot started (ms after t0), to find what delayed it.
        let skew_max_at_ms = by_slot
            .iter()
            .filter(|(_, s)| s.2 as u64 == pcpus_held && s.1 - s.0 == skew_max && skew_max > 0)
            .map(|(start, _)| crate::tsc::cycles_to_us(start.saturating_sub(m.schedule.t0)) / 1000)
            .next()
            .unwrap_or(0);
        let skew_median = median(&mut skews);
        let fault = p.fault.lock().clone();
        Record::new("partition_stats")
            .str("partition", &p.name)
            .u64("vcpus", p.vcpus as u64)
            .u64("iterations", iterations)
            .u64("iterations_per_s", iterations * 1000 / seconds_x1000.max(1))
            .u64("guest_cycles", totals.guest_cycles)
            .u64("on_behalf_cycles", totals.on_behalf_cycles())
            .fmt("cpu_share_pct", format_args!("{:.2}", used as f64 * 100.0 / capacity.max(1) as f64))
            .u64("exits", totals.exits)
            .u64("pause_loop_exits", totals.pause_loop_exits)
            .str("spin_waste_hv_pct", &pct_or_not_measured(hv_spin_pct))
            .str("spin_waste_guest_pct", &pct_or_not_measured(guest_spin_pct))
            .u64("spin_samples", totals.spin_samples)
            .str("spin_sampled_pct", &pct_or_not_measured(sampled.map(|s| s.0)))
            .str("spin_sampled_ci95_pp", &pct_or_not_measured(sampled.map(|s| s.1)))
            .u64("spin_window_samples", totals.window_spin_samples)
            .str("spin_window_pct", &pct_or_not_measured(windowed.map(|s| s.0)))
            .str("spin_window_ci95_pp", &pct_or_not_measured(windowed.map(|s| s.1)))
            .u64("irqs", totals.irqs)
            .u64("irq_demux_cycles", totals.irq_demux_cycles)
            .u64("window_exits", totals.window_exits)
            .str("window_exits_per_guest_s", window_exit_rate.as_deref().unwrap_or("not measured"))
            .str("window_exit_handling_pct", &pct_or_not_measured(window_handling_pct))
            .u64("slots", totals.slots)
            .u64("gang_slots_measured", skews.len() as u64)
            .u64("skew_median_cycles", skew_median)
            .u64("skew_max_cycles", skew_max)
            .u64("skew_max_at_ms", skew_max_at_ms)
            .u64("entry_latency_median_cycles", median(&mut latencies))
            .u64("hypercalls", p.hypercalls.load(core::sync::atomic::Ordering::Relaxed))
            .u64("resets", p.resets.load(core::sync::atomic::Ordering::Relaxed))
            .str("state", if fault.is_some() { "stopped" } else { "running" })
            .emit();
        window_exit_records(&p.name, p.id, &results, window_guest);
    }

    let mut exits = [crate::percpu::ExitStat::default(); crate::percpu::EXIT_REASONS];
    for r in &results {
        for (total, e) in exits.iter_mut().zip(r.exits.iter()) {
            total.count += e.count;
            total.cycles += e.cycles;
        }
    }
    for (reason, e) in exits.iter().enumerate().filter(|(_, e)| e.count > 0) {
        Record::new("exit_stats")
            .u64("reason", reason as u64)
            .str("name", vmx::ExitReason::from_raw(reason as u32).name())
            .u64("count", e.count)
            .u64("mean_cycles", e.cycles / e.count)
            .emit();
    }

    epoch_records(&results, &ledgers, m.run_end());

    let elapsed: u64 = ledgers.iter().map(|l| l.elapsed()).sum();
    let guest: u64 = stats.partitions.iter().map(|p| p.guest_cycles).sum();
    let on_behalf: u64 = stats.partitions.iter().map(|p| p.on_behalf_cycles()).sum();
    let idle: u64 = ledgers.iter().map(|l| l.idle_cycles()).sum();
    let overhead: u64 = ledgers.iter().map(|l| l.overhead_cycles()).sum();
    let percent = |cycles: u64| cycles as f64 * 100.0 / elapsed.max(1) as f64;
    let sample_exits: u64 = results.iter().map(|r| r.spin_sample.count).sum();
    let sample_cycles: u64 = results.iter().map(|r| r.spin_sample.cycles).sum();
    m.device_irqs.report(&m.partitions);
    Record::new("accounting")
        .u64("pcpus", cpus as u64)
        .u64("elapsed_cycles", elapsed)
        .u64("guest_cycles", guest)
        .u64("on_behalf_cycles", on_behalf)
        .u64("idle_cycles", idle)
        .u64("overhead_cycles", overhead)
        .u64("unaccounted_cycles", ledgers.iter().map(|l| l.unaccounted()).sum())
        .u64("debug_uncharged_cycles", results.iter().map(|r| r.injected_uncharged).sum())
        .u64("unaccounted_ppb", stats.unaccounted_ppb())
        // Hypervisor time: work on partitions' behalf plus its own overhead (not idle time).
        .fmt("hypervisor_pct", format_args!("{:.3}", percent(on_behalf + overhead)))
        .fmt("idle_pct", format_args!("{:.3}", percent(idle)))
        .u64("guard_exits", results.iter().map(|r| r.guard_exits).sum())
        .u64("heap_used_bytes", crate::memory::heap_used())
        .u64("heap_estimate_bytes", m.heap_estimate)
        // What spin-wait sampling cost (charged to the sampled partitions as exit handling).
        .u64("spin_sample_exits", sample_exits)
        .u64("spin_sample_mean_cycles", sample_cycles / sample_exits.max(1))
        .u64("yields", results.iter().map(|r| r.yields).sum())
        .emit();
}

/// After phase changes: per epoch of dispatch tables and partition, the share of its pCPUs
/// it was promised and what it was charged, from each pCPU's accounts at the boundary where
/// it switched (`epoch_share` records). Nothing for a run without changes.
fn epoch_records(results: &[PcpuResult], ledgers: &[Ledger], run_end: u64) {
    let m = machine();
    let plans = m.phases.plans();
    if plans.len() < 2 {
        return;
    }
    let partitions = m.partitions.len();
    // Per epoch that started on every pCPU: where, and the charges up to there (summed).
    let charged_at = |epoch: u32| -> Option<Vec<u64>> {
        let mut total = alloc::vec![0u64; partitions];
        for r in results {
            let mark = r.epoch_marks.iter().find(|mark| mark.epoch == epoch)?;
            for (t, c) in total.iter_mut().zip(&mark.charged) {
                *t += c;
            }
        }
        Some(total)
    };
    let at_end: Vec<u64> = (0..partitions)
        .map(|p| ledgers.iter().filter_map(|l| l.partition(p as u32)).map(|s| s.charged_cycles()).sum())
        .collect();
    let mut starts: Vec<(u64, Vec<u64>)> = alloc::vec![(m.schedule.t0, alloc::vec![0; partitions])];
    starts.extend(plans.iter().skip(1).map_while(|plan| charged_at(plan.number).map(|c| (plan.release, c))));
    for (k, (start, before)) in starts.iter().enumerate() {
        let (end, after) = starts.get(k + 1).map_or((run_end, &at_end), |(at, c)| (*at, c));
        let plan = &plans[k];
        for p in &m.partitions {
            let capacity = end.saturating_sub(*start) * m.pcpus_held(p.id) as u64;
            let share = (after[p.id] - before[p.id]) as f64 * 100.0 / capacity.max(1) as f64;
            let requested = plan.requested_ppm[p.id] as f64 / 10_000.0;
            Record::new("epoch_share")
                .u64("epoch", plan.number as u64)
                .u64("from_ms", crate::tsc::cycles_to_us(start - m.schedule.t0) / 1000)
                .u64("to_ms", crate::tsc::cycles_to_us(end - m.schedule.t0) / 1000)
                .str("partition", &p.name)
                .str("reservation", &plan.reservations[p.id])
                .fmt("requested_pct", format_args!("{requested:.2}"))
                .fmt("cpu_share_pct", format_args!("{share:.2}"))
                .fmt("error_pp", format_args!("{:.2}", share - requested))
                .emit();
        }
    }
}
