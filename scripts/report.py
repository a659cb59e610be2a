#!/usr/bin/env python3
"""A run's report, to look at rather than read: Markdown tables, plots and a Perfetto trace
made from a Phalanx serial log (its JSON records: docs/records.md).

  report.py DIR
      DIR/serial.log -> DIR/report.md, DIR/progress.png, DIR/spin.png, DIR/exits.png, and
      DIR/trace.json (Chrome trace-event JSON for ui.perfetto.dev) when the log holds a trace.
  report.py --compare OUT.png --partition NAME [--baseline LABEL] [--title TEXT] LABEL=DIR ...
      One partition's progress and spin-wait waste across runs, one bar per LABEL (a label
      given several runs shows their mean and range), with 0.5 x the baseline's progress.
"""
import argparse
import base64
import json
import os
import re
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import pct_cell, records  # noqa: E402


def pyplot():
    """matplotlib's pyplot on the file-only backend, or the run ends with one line saying
    what to install."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("report.py: matplotlib is missing: install python3-matplotlib "
                 "(scripts/phalanx deps does), or run scripts/phalanx report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# --- the log --------------------------------------------------------------------------------

def guest_records(log):
    """The JSON records the guests printed on their own consoles, by partition name: the
    hypervisor prefixes each guest line with its partition ("[cpu0 INFO ] [linux] {...}")."""
    by_partition = {}
    with open(log, errors="replace") as f:
        for line in f:
            _, sep, rest = line.partition("] [")
            name, sep2, text = rest.partition("] ")
            if not (sep and sep2 and text.startswith("{")):
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                by_partition.setdefault(name, []).append(record)
    return by_partition


def percent(figure):
    """A percentage record field ("12.34", or "not measured") as a number, or None."""
    try:
        return float(figure)
    except (TypeError, ValueError):
        return None


class Run:
    """What one run folder's serial log says."""

    def __init__(self, run_dir):
        self.dir = run_dir
        self.log = os.path.join(run_dir, "serial.log")
        self.records = records(self.log)
        self.by_type = {}
        for r in self.records:
            self.by_type.setdefault(r["type"], []).append(r)
        self.guest = guest_records(self.log)

    def all(self, record_type):
        return self.by_type.get(record_type, [])

    def last(self, record_type):
        found = self.all(record_type)
        return found[-1] if found else None

    @property
    def tsc_hz(self):
        boot = self.last("boot")
        return boot["tsc_hz"] if boot else None

    @property
    def policy(self):
        end = self.last("run_end")
        if end:
            return end["policy"]
        config = self.last("config")
        return config.get("policy") if config else None

    def partition_names(self):
        """In partition-id order (the order of the plan)."""
        names = [p["name"] for p in self.all("partition_plan")]
        return names or [s["partition"] for s in self.all("partition_stats")]

    def plan(self, name):
        return next((p for p in self.all("partition_plan") if p["name"] == name), None)

    def stats(self, name):
        return next((s for s in self.all("partition_stats") if s["partition"] == name), None)

    def workloads(self, name):
        """The partition's guest workload summaries (the Linux guest prints them)."""
        return [r for r in self.guest.get(name, []) if r.get("type") == "workload"]

    def workload_spin_pct(self, name):
        """The guest workload's own spin measure (share of its threads' time spent in the
        barrier spin), from its `workload` record or else the mean of its `thread` records."""
        for w in self.workloads(name):
            if isinstance(w.get("spin_fraction"), (int, float)):
                return 100.0 * w["spin_fraction"]
        threads = [t["spin_fraction"] for t in self.guest.get(name, [])
                   if t.get("type") == "thread" and isinstance(t.get("spin_fraction"), (int, float))]
        return 100.0 * sum(threads) / len(threads) if threads else None

    def guest_spin_pct(self, name):
        """The guest's own spin-wait measure, whichever guest it is: a workload's where the
        guest prints one (the Linux guest), else the test guest's (partition_stats)."""
        workload = self.workload_spin_pct(name)
        if workload is not None:
            return workload
        stats = self.stats(name)
        return percent(stats["spin_waste_guest_pct"]) if stats else None

    def progress_rate(self, name):
        """Iterations per second: the guest workload's own figure where it prints one (a Linux
        partition's hypervisor counter stays 0), else the test guest's counter."""
        for w in self.workloads(name):
            if isinstance(w.get("iterations_per_sec"), (int, float)):
                return float(w["iterations_per_sec"])
        stats = self.stats(name)
        return float(stats["iterations_per_s"]) if stats else None

    def wall_seconds(self):
        try:
            with open(os.path.join(self.dir, "wall_seconds")) as f:
                return float(f.read().strip())
        except (OSError, ValueError):
            return None


# --- the trace ------------------------------------------------------------------------------

# Event kinds of the `trace` records' wire format (docs/records.md).
TURN_START, TURN_END, VM_ENTRY, VM_EXIT, IDLE_START, IDLE_END = 1, 2, 3, 4, 5, 6
INJECT, HOST_INTERRUPT, KICK, FAULT, RESET, BOUNDARY_IPI, PHASE_CHANGE = 7, 8, 9, 10, 11, 12, 13
KIND_NAMES = {TURN_START: "turn_start", TURN_END: "turn_end", VM_ENTRY: "vm_entry", VM_EXIT: "vm_exit",
              IDLE_START: "idle_start", IDLE_END: "idle_end", INJECT: "inject",
              HOST_INTERRUPT: "host_interrupt", KICK: "kick", FAULT: "fault", RESET: "reset",
              BOUNDARY_IPI: "boundary_ipi", PHASE_CHANGE: "phase_change"}
NO_PARTITION = 0xFFFF
TURN_END_REASONS = {0: "deadline", 1: "halted", 2: "yielded", 3: "stopped"}

# Intel SDM vol. 3, appendix C: basic exit reasons, for reasons no `exit_stats` record names.
SDM_EXIT_REASONS = [
    "exception-or-nmi", "external-interrupt", "triple-fault", "init", "sipi", "io-smi",
    "other-smi", "interrupt-window", "nmi-window", "task-switch", "cpuid", "getsec", "hlt",
    "invd", "invlpg", "rdpmc", "rdtsc", "rsm", "vmcall", "vmclear", "vmlaunch", "vmptrld",
    "vmptrst", "vmread", "vmresume", "vmwrite", "vmxoff", "vmxon", "cr-access", "mov-dr", "io",
    "rdmsr", "wrmsr", "invalid-guest-state", "msr-loading", "exit 35", "mwait",
    "monitor-trap-flag", "exit 38", "monitor", "pause", "machine-check", "exit 42",
    "tpr-below-threshold", "apic-access", "virtualized-eoi", "gdtr-idtr-access",
    "ldtr-tr-access", "ept-violation", "ept-misconfiguration", "invept", "rdtscp",
    "preemption-timer", "invvpid", "wbinvd", "xsetbv", "apic-write", "rdrand", "invpcid",
    "vmfunc", "encls", "rdseed", "pml-full", "xsaves", "xrstors", "pconfig", "spp-event",
    "umwait", "tpause", "loadiwkey",
]


def exit_reason_names(run):
    """Basic exit reason -> name: the hypervisor's own names where it printed them."""
    names = {n: name for n, name in enumerate(SDM_EXIT_REASONS)}
    names.update({e["reason"]: e["name"] for e in run.all("exit_stats")})
    return names


@dataclass(frozen=True)
class TraceEvent:
    tsc: int
    kind: int
    partition: int
    vcpu: int
    arg: int


class TraceFormatError(ValueError):
    pass


def read_varint(data, at):
    """An unsigned LEB128 varint at data[at]: (value, offset after it)."""
    value = shift = 0
    while True:
        if at >= len(data):
            raise TraceFormatError(f"varint cut off at byte {at}")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise TraceFormatError(f"varint longer than 64 bits at byte {at}")


def decode_chunk(data, base_tsc, count):
    """The events of one `trace` record: per event a kind byte, then varints for the stamp's
    delta from the previous event (the first's from base_tsc), partition, vCPU and argument.
    Stamps are summed modulo 2^64, as the encoder's wrapping deltas are."""
    events, at, tsc = [], 0, base_tsc
    while at < len(data):
        kind = data[at]
        if kind not in KIND_NAMES:
            raise TraceFormatError(f"unknown event kind {kind} at byte {at}")
        delta, at = read_varint(data, at + 1)
        partition, at = read_varint(data, at)
        vcpu, at = read_varint(data, at)
        arg, at = read_varint(data, at)
        tsc = (tsc + delta) & 0xFFFF_FFFF_FFFF_FFFF
        events.append(TraceEvent(tsc, kind, partition, vcpu, arg))
    if len(events) != count:
        raise TraceFormatError(f"{len(events)} events decoded, the record says {count}")
    return events


@dataclass
class DecodedTrace:
    info: dict
    events: dict                                   # pCPU -> [TraceEvent], in order
    ends: dict                                     # pCPU -> its trace_end record
    chunks: dict                                   # pCPU -> chunks decoded
    problems: list = field(default_factory=list)   # what could not be decoded, in words


def decode_trace(run):
    """Every pCPU's events from the log's `trace` records, or None without a trace."""
    info = run.last("trace_info")
    if not info and not run.all("trace"):
        return None
    trace = DecodedTrace(info or {}, {}, {e["pcpu"]: e for e in run.all("trace_end")}, {})
    if not info:
        trace.problems.append("no trace_info record: times are counted from the first event")
    by_pcpu = {}
    for r in run.all("trace"):
        by_pcpu.setdefault(r["pcpu"], []).append(r)
    for pcpu, chunks in sorted(by_pcpu.items()):
        chunks.sort(key=lambda r: r["chunk"])
        events = trace.events.setdefault(pcpu, [])
        expected = 0
        for r in chunks:
            if r["chunk"] != expected:
                trace.problems.append(f"pCPU {pcpu}: chunk {r['chunk']} follows chunk {expected - 1}")
            expected = r["chunk"] + 1
            try:
                data = base64.b64decode(r["data"], validate=True)
                events.extend(decode_chunk(data, r["base_tsc"], r["events"]))
                trace.chunks[pcpu] = trace.chunks.get(pcpu, 0) + 1
            except (ValueError, KeyError) as e:  # binascii.Error is a ValueError
                trace.problems.append(f"pCPU {pcpu} chunk {r.get('chunk')}: left out ({e})")
        end = trace.ends.get(pcpu)
        if end and end["events"] != len(events):
            trace.problems.append(f"pCPU {pcpu}: {len(events)} events decoded, trace_end says {end['events']}")
    return trace


@dataclass
class TraceStats:
    """What building the Perfetto trace counted, per pCPU and per partition."""
    span_ns: dict = field(default_factory=dict)          # pCPU -> first to last event
    end_ns: dict = field(default_factory=dict)           # pCPU -> its last event, after t0
    idle_ns: dict = field(default_factory=dict)          # pCPU -> time in idle slices
    exits: dict = field(default_factory=dict)            # pCPU -> VM exits
    turns: dict = field(default_factory=dict)            # partition -> turns
    guest_cycles: dict = field(default_factory=dict)     # partition -> TSC cycles in guest slices
    kinds: dict = field(default_factory=dict)            # event kind name -> count
    unmatched_ends: int = 0    # an end with no begin open (its begin was never recorded)
    cut_slices: int = 0        # slices still open at the pCPU's last event, closed there
    stamps_back: int = 0       # stamps earlier than the one before, held at that one


class PcpuTrack:
    """One pCPU's slices for the Chrome trace. Open slices form a stack (a turn, with a guest
    or exit-handling or idle slice inside it), and a slice closes only after everything
    opened inside it, at stamps that never go back: so slices always nest, which Perfetto
    requires of "X" events on one track (it drops the ones that do not). Slices begin and
    end at the track's clock, which advance() moves."""

    def __init__(self, pcpu, t0_tsc, tsc_hz, out, stats):
        self.pcpu, self.t0_tsc, self.tsc_hz, self.out, self.stats = pcpu, t0_tsc, tsc_hz, out, stats
        self.tsc = self.ns = None
        self.open = []          # [role, name, start_tsc, start_ns, args]

    def advance(self, tsc):
        """Moves the clock to TSC (held where it is if TSC is earlier)."""
        if self.tsc is not None and tsc < self.tsc:
            self.stats.stamps_back += 1
            tsc = self.tsc
        self.tsc = tsc
        self.ns = (tsc - self.t0_tsc) * 1_000_000_000 // self.tsc_hz

    def begin(self, role, name, args):
        self.open.append([role, name, self.tsc, self.ns, args])

    def close_top(self, end_args=None):
        role, name, start_tsc, start_ns, args = self.open.pop()
        if end_args:
            args = {**args, **end_args}
        self.out.append(slice_event(self.pcpu, name, start_ns, self.ns, args))
        if role == "guest":
            who = args.get("partition")
            self.stats.guest_cycles[who] = self.stats.guest_cycles.get(who, 0) + self.tsc - start_tsc
        elif role == "idle":
            self.stats.idle_ns[self.pcpu] = self.stats.idle_ns.get(self.pcpu, 0) + self.ns - start_ns

    def close_inside_turn(self):
        """Closes every open slice but a turn at the bottom of the stack."""
        while self.open and self.open[-1][0] != "turn":
            self.close_top()

    def close_all(self, turn_args=None):
        """Closes every open slice; TURN_ARGS (how the turn ended) go to the one at the bottom."""
        while self.open:
            self.close_top(turn_args if len(self.open) == 1 else None)

    def cut(self, why):
        """Closes every open slice where its end is missing from the trace; returns how many."""
        count = len(self.open)
        while self.open:
            self.close_top({"cut": why})
        return count

    def top_role(self):
        return self.open[-1][0] if self.open else None

    def holds_turn(self):
        return bool(self.open) and self.open[0][0] == "turn"


def slice_event(pcpu, name, start_ns, end_ns, args):
    # Times go out as whole nanoseconds written in microseconds: Perfetto rounds ts and dur
    # to nanoseconds separately, so a child's end is exactly start + dur, never past its parent.
    return {"ph": "X", "pid": 1, "tid": pcpu, "name": name, "ts": start_ns / 1000,
            "dur": (end_ns - start_ns) / 1000, "args": args}


def chrome_trace(trace, partition_names, exit_names):
    """The decoded trace as Chrome trace-event JSON (ui.perfetto.dev, chrome://tracing): one
    thread per pCPU, turns with guest and exit-handling slices nested in them, idle slices,
    and instants for injections, host interrupts, kicks, faults, resets and boundary IPIs.
    Returns (the JSON document, TraceStats)."""
    stats = TraceStats()
    t0 = trace.info.get("t0_tsc")
    hz = trace.info.get("tsc_hz") or 1
    if t0 is None:
        t0 = min((e[0].tsc for e in trace.events.values() if e), default=0)

    def partition_name(number):
        if number == NO_PARTITION:
            return None
        return partition_names[number] if number < len(partition_names) else f"partition {number}"

    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "Phalanx"}}]
    slices = []
    for pcpu, events in sorted(trace.events.items()):
        if not events:
            continue
        meta.append({"ph": "M", "pid": 1, "tid": pcpu, "name": "thread_name", "args": {"name": f"pCPU {pcpu}"}})
        meta.append({"ph": "M", "pid": 1, "tid": pcpu, "name": "thread_sort_index", "args": {"sort_index": pcpu}})
        track = PcpuTrack(pcpu, t0, hz, slices, stats)
        for e in events:
            track.advance(e.tsc)
            kind = KIND_NAMES[e.kind]
            stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
            who = partition_name(e.partition)
            if e.kind == TURN_START:
                if track.holds_turn():  # its turn_end is missing: it ends where this one begins
                    stats.cut_slices += track.cut("the next turn began")
                track.close_all()
                slack = e.arg == 0
                stats.turns[who] = stats.turns.get(who, 0) + 1
                track.begin("turn", f"{who} vCPU {e.vcpu}" + (" (slack)" if slack else ""),
                            {"partition": who, "vcpu": e.vcpu, "slot": "lent slack" if slack else "own slot"})
            elif e.kind == TURN_END:
                if track.holds_turn():
                    track.close_all({"ended": TURN_END_REASONS.get(e.arg, f"reason {e.arg}")})
                else:
                    stats.unmatched_ends += 1
                    track.close_all()
            elif e.kind == VM_ENTRY:
                track.close_inside_turn()
                track.begin("guest", "guest", {"partition": who, "vcpu": e.vcpu})
            elif e.kind == VM_EXIT:
                reason = exit_names.get(e.arg, f"exit {e.arg}")
                stats.exits[pcpu] = stats.exits.get(pcpu, 0) + 1
                if track.top_role() == "guest":
                    track.close_top({"exit": reason})
                else:
                    stats.unmatched_ends += 1
                track.close_inside_turn()
                track.begin("exit", reason, {"partition": who, "vcpu": e.vcpu, "reason": e.arg})
            elif e.kind == IDLE_START:
                track.close_inside_turn()
                track.begin("idle", "idle", {})
            elif e.kind == IDLE_END:
                if track.top_role() == "idle":
                    track.close_top()
                else:
                    stats.unmatched_ends += 1
            else:
                slices.append(instant_event(pcpu, e, track.ns, who))
        stats.cut_slices += track.cut("the trace ends here")
        stats.span_ns[pcpu] = track.ns - (events[0].tsc - t0) * 1_000_000_000 // hz
        stats.end_ns[pcpu] = track.ns
    # Parents first where slices start together (Perfetto sorts so too).
    slices.sort(key=lambda s: (s["tid"], s["ts"], -s.get("dur", 0)))
    return {"traceEvents": meta + slices, "displayTimeUnit": "ns"}, stats


def instant_event(pcpu, e, ns, who):
    if e.kind == INJECT:
        name, args = "inject", {"partition": who, "vcpu": e.vcpu, "vector": e.arg}
    elif e.kind == HOST_INTERRUPT:
        name, args = "host interrupt", {"partition": who, "vcpu": e.vcpu, "vector": e.arg}
    elif e.kind == KICK:
        name, args = "kick", {"partition": who, "vcpu": e.vcpu, "target pCPU": e.arg}
    elif e.kind == FAULT:
        name, args = "fault", {"partition": who, "vcpu": e.vcpu}
    elif e.kind == RESET:
        name, args = "reset", {"partition": who}
    else:
        name, args = "boundary IPI", {"pCPUs signalled": e.arg}
    return {"ph": "i", "s": "t", "pid": 1, "tid": pcpu, "name": name, "ts": ns / 1000, "args": args}


# --- Markdown -------------------------------------------------------------------------------

def markdown_table(head, rows, right=()):
    """A Markdown table; columns whose index is in RIGHT are right-aligned (figures)."""
    cell = lambda v: str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in head) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def run_facts(run):
    rows = []
    boot = run.last("boot")
    if boot:
        rows.append(("pCPUs", f'{boot["cpus"]} (APIC IDs {boot["apic_ids"]})'))
        rows.append(("TSC", f'{boot["tsc_hz"] / 1e6:.3f} MHz'))
    if run.policy:
        rows.append(("policy", run.policy))
    end = run.last("run_end")
    if end:
        rows.append(("dispatch ran", f'{end["run_ms"]} ms'))
    for c in run.all("config"):
        if c.get("status") == "accepted":
            rows.append(("config", f'{c.get("file")}: {c.get("partitions")} partitions, '
                                   f'{c.get("groups", 0)} groups, major frame {c.get("major_frame_us")} us'))
        else:
            rows.append(("config", f'REJECTED: {c.get("error")}'))
    paths = run.last("vmx_paths")
    if paths:
        rows.append(("spin exits / hv spin waste", f'{paths.get("spin_exits")} / {paths.get("spin_waste_hv")}'))
        if paths.get("debug_without"):
            rows.append(("VMX features taken away", paths["debug_without"]))
    wall = run.wall_seconds()
    if wall is not None:
        rows.append(("emulator wall time", f"{wall:.0f} s"))
    for f in run.all("partition_fault"):
        rows.append((f'FAULT {f["partition"]}', f'vCPU {f["vcpu"]} {f["reason"]}: {f["detail"]} ({f["action"]})'))
    for e in run.all("error"):
        rows.append(("ERROR", f'{e["stage"]}: {e["message"]}'))
    for e in run.all("exception"):
        rows.append(("EXCEPTION", f'cpu{e["cpu"]} vector {e["vector"]} ({e["name"]}) at {e["rip"]}'))
    for e in run.all("panic"):
        rows.append(("PANIC", f'cpu{e["cpu"]}: {e["message"]}'))
    return rows


def sampled_figure(stats):
    """The hypervisor's sampled spin figure to set beside the guest's own: over the guest's
    measurement window where it opened one (a Linux workload measures only its run, not the
    boot), else over the whole run. (percent, CI half-width, over_window); None where not
    sampled."""
    if (stats.get("spin_window_samples") or 0) > 0:
        return percent(stats.get("spin_window_pct")), percent(stats.get("spin_window_ci95_pp")), True
    return percent(stats.get("spin_sampled_pct")), percent(stats.get("spin_sampled_ci95_pp")), False


def sampled_cell(stats):
    sampled, ci, over_window = sampled_figure(stats)
    if sampled is None:
        return stats.get("spin_sampled_pct", "-")
    cell = f"{sampled:.2f}% ± {ci:.2f} pp" if ci is not None else f"{sampled:.2f}%"
    return cell + " (window)" if over_window else cell


def partitions_table(run):
    """The partition_stats table; a "workload spin" column when a guest printed workload
    records (a Linux partition's hypervisor counters read 0: its workload keeps its own)."""
    names = run.partition_names()
    with_workloads = any(run.workloads(n) for n in names)
    head = ["partition", "state", "iterations/s", "CPU share", "spin waste: PLE", "sampled (95% CI)", "guest"]
    head += ["workload spin"] * with_workloads + ["exits", "PLE exits", "gang skew med/max", "resets"]
    rows = []
    for name in names:
        s = run.stats(name)
        if not s:
            rows.append([name, "no result"] + [""] * (len(head) - 2))
            continue
        rate = f'{run.progress_rate(name):,.0f} (workload)' if run.workloads(name) else str(s["iterations_per_s"])
        row = [name, s["state"], rate, pct_cell(s["cpu_share_pct"]), pct_cell(s["spin_waste_hv_pct"]),
               sampled_cell(s), pct_cell(s["spin_waste_guest_pct"])]
        if with_workloads:
            spin = run.workload_spin_pct(name)
            row.append(f"{spin:.2f}%" if spin is not None else "-")
        row += [s["exits"], s["pause_loop_exits"],
                f'{s["skew_median_cycles"]}/{s["skew_max_cycles"]} cycles' if s.get("gang_slots_measured") else "-",
                s.get("resets", 0)]
        rows.append(row)
    return markdown_table(head, rows, right=range(2, len(head)))


def workloads_table(run):
    rows = []
    for name in run.partition_names():
        for w in run.workloads(name):
            spin = w.get("spin_fraction")
            rows.append((name, w.get("name"), w.get("threads"), f'{w.get("iterations_per_sec", 0):,.1f}',
                         f"{100 * spin:.2f}%" if isinstance(spin, (int, float)) else "-", w.get("seconds")))
    if not rows:
        return None
    return markdown_table(("partition", "workload", "threads", "iterations/s (guest clock)",
                           "spin (of thread time)", "seconds"), rows, right=(2, 3, 4, 5))


def accounting_table(run):
    a = run.last("accounting")
    if not a:
        return None
    rows = [("elapsed", f'{a["elapsed_cycles"]:,} cycles on {a["pcpus"]} pCPUs'),
            ("guest", f'{a["guest_cycles"]:,} cycles'),
            ("hypervisor (on behalf + overhead)", f'{a["hypervisor_pct"]}%'),
            ("idle", f'{a["idle_pct"]}%'),
            ("unaccounted", f'{a["unaccounted_cycles"]:,} cycles ({a.get("unaccounted_ppb", "?")} ppb)'),
            ("debug uncharged (injected)", f'{a.get("debug_uncharged_cycles", 0):,} cycles'),
            ("guard exits", a.get("guard_exits", 0)),
            ("directed yields", a.get("yields", 0))]
    return markdown_table(("", ""), rows)


def exits_table(run):
    exits = sorted(run.all("exit_stats"), key=lambda e: -e["count"] * e["mean_cycles"])
    if not exits:
        return None
    total = sum(e["count"] * e["mean_cycles"] for e in exits) or 1
    rows = [(e["reason"], e["name"], f'{e["count"]:,}', f'{e["mean_cycles"]:,}',
             f'{e["count"] * e["mean_cycles"]:,}', f'{100 * e["count"] * e["mean_cycles"] / total:.1f}%')
            for e in exits]
    return markdown_table(("reason", "name", "count", "mean cycles", "total cycles", "of exit time"),
                          rows, right=(0, 2, 3, 4, 5))


def trace_section(run, trace, stats, wrote_json):
    lines = []
    info = trace.info
    if info:
        lines.append(f'Buffer: {info.get("capacity")} events per pCPU; stamps from t0 = TSC '
                     f'{info.get("t0_tsc")} at {info.get("tsc_hz", 0) / 1e6:.3f} MHz.')
    if wrote_json:
        lines.append("Open [trace.json](trace.json) at https://ui.perfetto.dev (\"Open trace file\"): "
                     "one track per pCPU, turns with their guest and exit-handling slices inside.")
    rows = []
    for pcpu in sorted(trace.events):
        end = trace.ends.get(pcpu, {})
        span = stats.span_ns.get(pcpu, 0)
        idle = stats.idle_ns.get(pcpu, 0)
        rows.append((pcpu, f"{len(trace.events[pcpu]):,}", end.get("dropped", "?"), trace.chunks.get(pcpu, 0),
                     f"{span / 1e6:.3f}", f"{stats.exits.get(pcpu, 0):,}",
                     f"{100 * idle / span:.1f}%" if span else "-"))
    lines.append("")
    lines.append(markdown_table(("pCPU", "events", "dropped (buffer full)", "chunks", "span (ms)", "VM exits", "idle"),
                                rows, right=range(0, 7)))
    if stats.turns:
        # The trace's entry and exit stamps are the ones the ledger charges, so a trace that
        # holds the whole run matches partition_stats to the cycle.
        rows = []
        names = [n for n in run.partition_names() if n in stats.turns] + \
                [n for n in stats.turns if n not in run.partition_names()]
        for name, turns in ((n, stats.turns[n]) for n in names):
            charged = (run.stats(name) or {}).get("guest_cycles")
            rows.append((name or "(none)", f"{turns:,}", f"{stats.guest_cycles.get(name, 0):,}",
                         f"{charged:,}" if charged is not None else "-"))
        lines.append("")
        lines.append(markdown_table(("partition", "turns", "guest cycles in the trace",
                                     "guest cycles charged (partition_stats)"), rows, right=(1, 2, 3)))
    lines.append("")
    lines.append("Events: " + ", ".join(f"{k} {n:,}" for k, n in sorted(stats.kinds.items())) + ".")
    notes = []
    if stats.cut_slices:
        notes.append(f"{stats.cut_slices} slices still open where a pCPU's trace ends (closed there)")
    if stats.unmatched_ends:
        notes.append(f"{stats.unmatched_ends} end events whose begin is not in the trace")
    if stats.stamps_back:
        notes.append(f"{stats.stamps_back} stamps earlier than the event before them (held at that one)")
    for pcpu, end in sorted(trace.ends.items()):
        if end.get("dropped"):
            notes.append(f"pCPU {pcpu}'s buffer was full {stats.end_ns.get(pcpu, 0) / 1e6:.3f} ms after t0: "
                         f"its {end['dropped']:,} later events are missing")
    notes += trace.problems
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------

PALETTE = ["#2b7bba", "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]


def reservation_pct(run, name):
    """The share the plan's reservation text gives ("hard 5000 us / 10000 us (50%)"), or None."""
    plan = run.plan(name)
    found = re.search(r"\((\d+(?:\.\d+)?)%\)", plan["reservation"]) if plan else None
    return float(found.group(1)) if found else None


def plot_progress(plt, run, path):
    """Iterations over time per partition and, where the progress records carry the
    partition's cumulative guest cycles, its CPU share per interval. Returns what report.md
    should say about it: (drawn, notes)."""
    progress = run.all("progress")
    if not progress:
        return False, ["no `progress` records in the log (stats_interval_ms longer than the run?)"]
    by_partition = {}
    for r in progress:
        by_partition.setdefault(r["partition"], []).append(r)
    names = [n for n in run.partition_names() if n in by_partition] + \
            [n for n in by_partition if n not in run.partition_names()]
    hz = run.tsc_hz
    with_cycles = hz and all("guest_cycles" in r for r in progress)
    notes = []
    if not with_cycles:
        notes.append("CPU share over time: not in this log (its `progress` records carry no `guest_cycles`"
                     + ("" if hz else ", and no `boot` record gives the TSC rate") + ")")
    fig, axes = plt.subplots(2 if with_cycles else 1, 1, figsize=(10, 7.5 if with_cycles else 4.5), sharex=True,
                             squeeze=False)
    ax_iter = axes[0][0]
    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        rs = by_partition[name]
        if any(r["iterations"] for r in rs):
            ax_iter.plot([0.0] + [r["t_ms"] / 1000 for r in rs], [0] + [r["iterations"] for r in rs],
                         marker="o", markersize=3, color=color, label=name)
            stopped = [(r["t_ms"] / 1000, r["iterations"]) for r in rs if r.get("stopped")]
            if stopped:
                ax_iter.plot(*zip(*stopped), "x", color="red", markersize=8)
        else:
            notes.append(f"{name}: no iterations read from its stats page, so not drawn (the Linux guest "
                         "counts in its own workload records)")
        if with_cycles:
            plan = run.plan(name)
            edges, shares, previous = [0.0], [], (0, 0)
            for r in rs:
                pcpus = r.get("pcpus", plan["pcpus"] if plan else 1)
                pcpus = len(pcpus) if isinstance(pcpus, list) else pcpus
                window_cycles = (r["t_ms"] - previous[0]) * hz / 1000 * max(pcpus, 1)
                if window_cycles > 0:
                    shares.append(100 * (r["guest_cycles"] - previous[1]) / window_cycles)
                    edges.append(r["t_ms"] / 1000)
                previous = (r["t_ms"], r["guest_cycles"])
            ax_share = axes[1][0]
            ax_share.stairs(shares, edges, baseline=None, color=color, linewidth=2, label=name)
            reserved = reservation_pct(run, name)
            if reserved is not None:
                ax_share.axhline(reserved, color=color, linestyle=":", linewidth=1)
    ax_iter.set_ylabel("iterations (guest's counter)")
    ax_iter.set_title(f"Progress under {run.policy or '?'} dispatch")
    if ax_iter.get_legend_handles_labels()[1]:
        ax_iter.legend(loc="upper left")
    ax_iter.grid(alpha=0.3)
    if with_cycles:
        ax_share = axes[1][0]
        ax_share.set_ylabel("CPU share, % of the pCPUs it holds")
        ax_share.set_title("Guest CPU share per interval (dotted: reservation)")
        ax_share.set_ylim(bottom=0)
        ax_share.legend(loc="lower left")
        ax_share.grid(alpha=0.3)
    axes[-1][0].set_xlabel("time since dispatch began (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True, notes


SPIN_SERIES = ("hypervisor: PAUSE-loop exits", "hypervisor: sampled RIP", "guest's own measure")


def spin_figures(run, name):
    """(PLE %, sampled %, sampled CI half-width, guest's own %) of a partition, None where not
    measured."""
    s = run.stats(name) or {}
    sampled, ci, _ = sampled_figure(s)
    return (percent(s.get("spin_waste_hv_pct")), sampled, ci, run.guest_spin_pct(name))


def grouped_spin_bars(ax, labels, figures, errors=None):
    """A bar per label for each of the SPIN_SERIES measured for any label; a figure that is
    None reads "n/m" (not measured) where its bar would be. ERRORS: per label, per series,
    a (low, high) error bar or None. Returns (the series measured for no label, which are left
    out; whether any "n/m" was drawn)."""
    measured = [k for k in range(len(SPIN_SERIES)) if any(f[k] is not None for f in figures)]
    width = 0.8 / max(len(measured), 1)
    colors = ("#7570b3", "#bcbddc", "#1b9e77")  # apart from the policies' blue and orange
    top = max([v for f in figures for v in f if v is not None]
              + [e[1] for per_label in errors or [] for e in per_label if e] + [1.0])
    not_measured_drawn = False
    for slot, k in enumerate(measured):
        ax.bar(0, 0, 0, color=colors[k], label=SPIN_SERIES[k])  # its legend entry
        for i, f in enumerate(figures):
            x = i + (slot - (len(measured) - 1) / 2) * width
            value = f[k]
            if value is None:
                ax.text(x, top * 0.01, "n/m", ha="center", va="bottom", fontsize=8, color="gray", rotation=90)
                not_measured_drawn = True
                continue
            err = errors[i][k] if errors else None
            ax.bar(x, value, width, color=colors[k])
            if err:
                ax.errorbar(x, value, yerr=[[value - err[0]], [err[1] - value]], color="black", capsize=3, linewidth=1)
            ax.text(x, max(value, err[1]) if err else value, f"{value:.2f}" if value < 10 else f"{value:.1f}",
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("spin-wait waste, % of the partition's time")
    ax.set_ylim(0, top * 1.45)  # headroom for the legend above the tallest bar
    if measured:
        ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return [SPIN_SERIES[k] for k in range(len(SPIN_SERIES)) if k not in measured], not_measured_drawn


def plot_spin(plt, run, path):
    names = run.partition_names()
    if not run.all("partition_stats"):
        return False, ["no `partition_stats` records in the log (the run did not reach its end)"]
    figures = [spin_figures(run, n) for n in names]
    plotted = [(ple, sampled, guest) for ple, sampled, _, guest in figures]
    if all(v is None for f in plotted for v in f):
        return False, ["every spin-wait figure reads \"not measured\""]
    errors = [[None, (sampled - ci, sampled + ci) if sampled is not None and ci is not None else None, None]
              for _, sampled, ci, _ in figures]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(names) + 3), 4.5))
    left_out, _ = grouped_spin_bars(ax, names, plotted, errors)
    ax.set_title(f"Spin-wait waste per partition ({run.policy or '?'} dispatch)")
    if SPIN_SERIES[1] not in left_out:
        ax.set_xlabel("error bars: 95% confidence interval of the sampled figure", fontsize=8, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True, [f"{', '.join(left_out)}: not measured for any partition, so not drawn"] if left_out else []


def plot_exits(plt, run, path):
    exits = sorted(run.all("exit_stats"), key=lambda e: e["count"])
    if not exits:
        return False, ["no `exit_stats` records in the log"]
    names = [f'{e["name"]} ({e["reason"]})' for e in exits]
    fig, (ax_count, ax_cost) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * len(exits)), sharey=True)
    ax_count.barh(names, [e["count"] for e in exits], color="#2b7bba")
    ax_cost.barh(names, [e["mean_cycles"] for e in exits], color="#d95f02")
    for ax, key in ((ax_count, "count"), (ax_cost, "mean_cycles")):
        for y, e in enumerate(exits):
            ax.text(e[key], y, f' {e[key]:,}', va="center", fontsize=8)
        ax.set_xlim(0, max(e[key] for e in exits) * 1.25)
        ax.grid(axis="x", alpha=0.3)
    ax_count.set_xlabel("VM exits in the run")
    ax_cost.set_xlabel("mean cycles, VM exit to the next VM entry")
    fig.suptitle(f'VM exits by reason: {sum(e["count"] for e in exits):,} in all')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True, []


# --- the report -----------------------------------------------------------------------------

def write_report(run_dir):
    """Writes DIR/report.md and whatever plots and trace the log has data for; returns the
    names written."""
    plt = pyplot()
    run = Run(run_dir)
    # What an earlier report left would pass for this run's where this log lacks the data.
    for name in ("progress.png", "spin.png", "exits.png", "trace.json"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    written = []
    md = [f"# Phalanx run report: {os.path.basename(os.path.normpath(run_dir))}", ""]
    if not run.records:
        md.append("The log holds no records: the image did not start (see the emulator's output).")
    facts = run_facts(run)
    if facts:
        md += ["## The run", "", markdown_table(("", ""), facts), ""]
    plans = run.all("partition_plan")
    if plans:
        md += ["Partitions as configured:", "",
               markdown_table(("partition", "vCPUs", "pCPUs", "memory", "reservation", "guest"),
                              [(p["name"], p["vcpus"], p["pcpus"], f'{p["memory_mib"]} MiB at {p["memory_base"]}',
                                p["reservation"], p.get("guest_module", "-")) for p in plans]), ""]

    plots = (("progress.png", "Progress and CPU share over time", plot_progress),
             ("spin.png", "Spin-wait waste", plot_spin),
             ("exits.png", "VM exits", plot_exits))
    drawn = {}
    for name, title, draw in plots:
        ok, notes = draw(plt, run, os.path.join(run_dir, name))
        drawn[name] = (title, ok, notes)
        if ok:
            written.append(name)

    def figure(name):
        """The plot's Markdown: the image, or why it is missing, then its notes."""
        title, ok, notes = drawn[name]
        lines = [f"![{title}]({name})"] if ok else [f"_{title}: not drawn: {notes.pop(0)}._"]
        lines += [f"_{n}._" for n in notes]
        return [part for line in lines for part in (line, "")]

    if run.all("partition_stats"):
        end = run.last("run_end") or {}
        md += [f'## Partitions after {end.get("run_ms", "?")} ms of {run.policy or "?"} dispatch', "",
               partitions_table(run), "",
               "Spin waste: *PLE* = PAUSE-loop exits x PLE window / guest cycles (the hypervisor's count); "
               "*sampled* = share of RIP samples that found the vCPU in a PAUSE loop; *guest* = the test "
               "guest's own TSC-timed barrier spin"
               + ("; *workload spin* = the guest workload's own measure (share of its threads' time)"
                  if any(run.workloads(n) for n in run.partition_names()) else "") + ".", ""]
        workloads = workloads_table(run)
        if workloads:
            md += ["Guest workloads (their own records):", "", workloads, ""]
    elif run.records:
        md += ["## Partitions", "", "No `partition_stats` records: the run did not reach the end of dispatch.", ""]
    md += figure("progress.png") + figure("spin.png")
    accounting = accounting_table(run)
    if accounting:
        md += ["## Accounting", "", accounting, ""]
    exits = exits_table(run)
    md += ["## VM exits", ""] + ([exits, ""] if exits else []) + figure("exits.png")

    trace = decode_trace(run)
    if trace is not None:
        document, stats = chrome_trace(trace, run.partition_names(), exit_reason_names(run))
        wrote_json = any(trace.events.values())
        if wrote_json:
            with open(os.path.join(run_dir, "trace.json"), "w") as f:
                json.dump(document, f, separators=(",", ":"))
            written.append("trace.json")
        md += ["## Trace", "", trace_section(run, trace, stats, wrote_json), ""]

    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write("\n".join(md).rstrip() + "\n")
    return ["report.md"] + written


# --- comparing runs -------------------------------------------------------------------------

def compare(out_png, partition, runs, baseline=None, title=None):
    """RUNS: [(label, run dir)] in the order to draw; a label may repeat (its runs are
    averaged). Draws the partition's iterations/s per label with 0.5 x the baseline's, and
    its spin-wait waste."""
    plt = pyplot()
    labels, by_label = [], {}
    for label, run_dir in runs:
        if label not in by_label:
            labels.append(label)
            by_label[label] = []
        run = Run(run_dir) if os.path.exists(os.path.join(run_dir, "serial.log")) else None
        if run and (run.stats(partition) or run.workloads(partition)):
            by_label[label].append(run)

    def mean(values):
        values = [v for v in values if v is not None]
        return (sum(values) / len(values), min(values), max(values)) if values else None

    rates = {label: mean([r.progress_rate(partition) for r in by_label[label]]) for label in labels}
    base = rates.get(baseline) if baseline else None
    fig, (ax_rate, ax_spin) = plt.subplots(1, 2, figsize=(max(12, 2.2 * len(labels) + 4), 5))
    colors = ["#777777" if label == baseline else "#2b7bba" if label.startswith("gang") else "#d95f02"
              for label in labels]
    heights = [rates[label][0] if rates[label] else 0 for label in labels]
    ax_rate.bar(labels, heights, color=colors)
    for i, label in enumerate(labels):
        figure = rates[label]
        if not figure:
            ax_rate.text(i, 0, "no result", ha="center", va="bottom", color="red", rotation=90)
            continue
        avg, low, high = figure
        if high > low:
            ax_rate.errorbar(i, avg, yerr=[[avg - low], [high - avg]], color="black", capsize=4, linewidth=1)
        share = f"\n{100 * avg / (base[0] / 2):.0f}% of 0.5x" if base and label != baseline else ""
        ax_rate.text(i, high, f"{avg:,.0f}{share}", ha="center", va="bottom", fontsize=8,
                     bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    if base:
        ax_rate.axhline(base[0] / 2, linestyle="--", color="black", linewidth=1, label=f"0.5 x {baseline}")
        ax_rate.legend(loc="upper right")
    ax_rate.set_ylim(0, max(heights + [1]) * 1.2)
    ax_rate.set_ylabel(f"{partition} iterations/s")
    ax_rate.set_title(f"{partition} progress")
    ax_rate.grid(axis="y", alpha=0.3)

    figures, errors = [], []
    for label in labels:
        per_run = [spin_figures(r, partition) for r in by_label[label]]
        series = [mean([f[k] for f in per_run]) for k in (0, 1, 3)]
        figures.append(tuple(s[0] if s else None for s in series))
        if len(per_run) == 1 and per_run[0][1] is not None and per_run[0][2] is not None:
            sampled, ci = per_run[0][1], per_run[0][2]
            errors.append([None, (sampled - ci, sampled + ci), None])
        else:
            errors.append([(s[1], s[2]) if s and s[2] > s[1] else None for s in series])
    left_out, not_measured_drawn = grouped_spin_bars(ax_spin, labels, figures, errors)
    ax_spin.set_title(f"{partition} spin-wait waste")
    for ax in (ax_rate, ax_spin):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title or f"{partition} across policies")
    footnote = []
    if any(len(by_label[label]) > 1 for label in labels):
        footnote.append("bars: mean of a label's runs, error bars: their range")
    if SPIN_SERIES[1] not in left_out:
        footnote.append("sampled RIP of a single run: error bar = 95% CI")
    if not_measured_drawn:
        footnote.append("n/m = not measured")
    if left_out:
        footnote.append("not measured in any run: " + ", ".join(left_out))
    fig.text(0.5, 0.005, "; ".join(footnote), ha="center", fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", metavar="DIR | LABEL=DIR",
                    help="a run folder (holding serial.log), or with --compare the runs to compare")
    ap.add_argument("--compare", metavar="OUT.png", help="draw one partition across runs into OUT.png")
    ap.add_argument("--partition", help="(--compare) the partition to compare")
    ap.add_argument("--baseline", metavar="LABEL", help="(--compare) the run whose half is the fair share")
    ap.add_argument("--title", help="(--compare) the figure's title")
    args = ap.parse_args(argv)
    if args.compare:
        if not args.partition:
            ap.error("--compare needs --partition")
        runs = []
        for target in args.targets:
            label, sep, run_dir = target.partition("=")
            if not sep or not label or not run_dir:
                ap.error(f"{target}: want LABEL=DIR")
            runs.append((label, run_dir))
        compare(args.compare, args.partition, runs, args.baseline, args.title)
        print(f"wrote {args.compare}")
        return 0
    if len(args.targets) != 1:
        ap.error("one run folder at a time (or --compare)")
    run_dir = args.targets[0]
    if not os.path.isfile(os.path.join(run_dir, "serial.log")):
        print(f"report.py: no serial.log in {run_dir}", file=sys.stderr)
        return 2
    written = write_report(run_dir)
    print(f"{run_dir}: wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
