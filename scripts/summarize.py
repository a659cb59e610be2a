#!/usr/bin/env python3
"""Summarise a Phalanx serial log: parse its JSON records (one per line, each with a
"type"; docs/records.md) and print what a user looks for first."""
import argparse
import json
import sys


def records(path):
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("{") and '"type"' in line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def pct_cell(figure):
    """A percentage record field ("12.34", or "not measured") for a table cell."""
    return figure + "%" if figure.replace(".", "", 1).isdigit() else figure


def emulator_tail(run_dir, lines=20):
    """The end of what the emulator itself printed in RUN_DIR (bochs.out or qemu.out)."""
    import os
    for name in ("bochs.out", "qemu.out"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                return f"--- {path}\n" + "".join(f.readlines()[-lines:])
    return f"(no bochs.out or qemu.out in {run_dir})"


def no_result(run_dir):
    """Why RUN_DIR has no result, for a table cell: a missing serial log names the emulator's
    last words (printed whole to stderr), a present one is the place to look."""
    import os
    log = os.path.join(run_dir, "serial.log")
    if os.path.exists(log) and os.path.getsize(log) > 0:
        return f"(no result: see {log})"
    tail = emulator_tail(run_dir)
    print(f"{run_dir}: the emulator produced no serial log\n{tail}", file=sys.stderr)
    last = [l for l in tail.splitlines() if l.strip() and not l.startswith("---")]
    return f"(no serial log; the emulator said: {last[-1].strip() if last else 'nothing'})"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("log")
    ap.add_argument("--wall", type=float, help="wall-clock seconds of the emulator run")
    args = ap.parse_args()
    recs = records(args.log)
    by = {}
    for r in recs:
        by.setdefault(r["type"], []).append(r)
    one = lambda t: by.get(t, [None])[-1]

    rows = []
    boot = one("boot")
    if boot:
        rows.append(("pCPUs (MADT)", f'{boot["cpus"]} (APIC IDs {boot["apic_ids"]})'))
        rows.append(("memory", f'{boot["usable_mib"]} MiB usable, {boot["partition_mib"]} MiB for partitions'))
        rows.append(("TSC", f'{boot["tsc_hz"] / 1e6:.3f} MHz (PIT-calibrated)'))
        rows.append(("modules", ", ".join(boot["modules"]) or "-"))
    sync = one("tsc_sync")
    if sync:
        rows.append(("TSC sync", f'{"in sync" if sync["in_sync"] else "NOT in sync"}, worst skew {sync["worst_skew_cycles"]} cycles'))
    ph = one("phase_lock")
    if ph:
        pct = 100.0 * ph["skew_median_cycles"] / max(ph["period_cycles"], 1)
        rows.append(("phase-locked ticks", f'{ph["ticks"]} x {ph["period_cycles"]} cycles, {ph["timer_mode"]}'))
        rows.append(("tick skew min/med/max", f'{ph["skew_min_cycles"]}/{ph["skew_median_cycles"]}/{ph["skew_max_cycles"]} cycles ({pct:.4f}% of period)'))
        rows.append(("tick latency med/max", f'{ph["latency_median_cycles"]}/{ph["latency_max_cycles"]} cycles after the boundary'))
    vmx = by.get("vmx", [])
    if vmx:
        rows.append(("VMX root", f'{sum(1 for v in vmx if v["root"])}/{len(vmx)} pCPUs'))
    paths = one("vmx_paths")
    if paths:
        rows.append(("VMX paths", ", ".join(f"{k}: {v}" for k, v in paths.items() if v and k not in ("type", "policy"))))
    for c in by.get("config", []):
        if c.get("status") == "accepted":
            rows.append(("config", f'accepted: {c.get("file")} ({c.get("partitions")} partitions)'))
        else:
            rows.append(("config", f'REJECTED: {c.get("error")}'))
    for p in by.get("partition_plan", []):
        rows.append((f'  partition {p["name"]}', f'{p["vcpus"]} vCPUs on pCPUs {p["pcpus"]}, {p["memory_mib"]} MiB at {p["memory_base"]}, {p["reservation"]}'))
    for f in by.get("partition_fault", []):
        rows.append((f'FAULT {f["partition"]}', f'vCPU {f["vcpu"]} {f["reason"]}: {f["detail"]} at RIP {f["rip"]} ({f["action"]})'))
    acct = one("accounting")
    if acct:
        unacc = 100.0 * acct["unaccounted_cycles"] / max(acct["elapsed_cycles"], 1)
        rows.append(("accounting", f'{acct["elapsed_cycles"]} cycles on {acct["pcpus"]} pCPUs: hypervisor {acct["hypervisor_pct"]}%, unaccounted {unacc:.4f}%'))
    summ = one("summary")
    if summ:
        rows.append(("boot time (guest clock)", f'{summ["boot_us"] / 1000:.1f} ms from entry to the end of bring-up'))
    if args.wall is not None:
        rows.append(("emulator wall time", f"{args.wall:.0f} s"))
    for e in by.get("error", []):
        rows.append(("ERROR", f'{e["stage"]}: {e["message"]}'))
    for e in by.get("exception", []):
        rows.append(("EXCEPTION", f'cpu{e["cpu"]} vector {e["vector"]} ({e["name"]}) at {e["rip"]}'))
    for e in by.get("panic", []):
        rows.append(("PANIC", f'cpu{e["cpu"]}: {e["message"]}'))
    if not recs:
        rows.append(("ERROR", "no records in the log: the image did not start (see the emulator log)"))

    width = max(len(k) for k, _ in rows)
    print("Phalanx run summary")
    print("-" * (width + 50))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    stats = by.get("partition_stats", [])
    if stats:
        end = one("run_end") or {}
        print(f'\nPartitions after {end.get("run_ms", "?")} ms of {end.get("policy", "?")} dispatch')
        head = ("partition", "state", "iterations/s", "CPU share", "spin waste (hv)", "spin waste (guest)", "gang skew med/max", "exits", "PLE exits")
        table = [head] + [(s["partition"], s["state"], str(s["iterations_per_s"]), s["cpu_share_pct"] + "%",
                           pct_cell(s["spin_waste_hv_pct"]), pct_cell(s["spin_waste_guest_pct"]),
                           f'{s["skew_median_cycles"]}/{s["skew_max_cycles"]} cycles' if s["gang_slots_measured"] else "-",
                           str(s["exits"]), str(s["pause_loop_exits"])) for s in stats]
        w = [max(len(r[i]) for r in table) for i in range(len(head))]
        for r in table:
            print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
        # Records the guests printed on their own consoles ("[cpuN INFO ] [partition] {...}").
        guest = []
        with open(args.log, errors="replace") as f:
            for line in f:
                head, sep, rest = line.partition("] [")
                name, sep2, record = rest.partition("] ")
                if sep and sep2 and record.startswith("{"):
                    try:
                        r = json.loads(record)
                    except json.JSONDecodeError:
                        continue
                    if r.get("type") == "workload":
                        guest.append((name, r))
        for name, r in guest:
            print(f'\n[{name}] workload {r.get("name")}: {r.get("threads")} threads, {r.get("iterations_per_sec")} iterations/s over {r.get("seconds")} s of guest time')
        exits = by.get("exit_stats", [])
        if exits:
            print("\nVM exits: " + ", ".join(f'{e["name"]} {e["count"]} x {e["mean_cycles"]} cycles' for e in exits))
    return 1 if by.get("error") or by.get("exception") or by.get("panic") or not recs else 0


if __name__ == "__main__":
    sys.exit(main())
