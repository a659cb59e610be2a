"""Tests of scripts/report.py on a serial log made by hand, trace records included.
Run: python3 -m unittest discover -s scripts -p 'test_*.py'   (from the repository root)"""
import base64
import importlib.util
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
NEEDS_MATPLOTLIB = "matplotlib is not installed (apt-get install python3-matplotlib)"

T0 = 1_000_000
HZ = 10_000_000          # 10 MHz, as under Bochs: one cycle = 100 ns
NONE = report.NO_PARTITION
(TURN_START, TURN_END, VM_ENTRY, VM_EXIT, IDLE_START, IDLE_END, INJECT, HOST_INTERRUPT, KICK, FAULT,
 RESET, BOUNDARY_IPI) = range(1, 13)
BARRIER, LINUX = 0, 1


def leb128(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(events, base_tsc):
    """The hypervisor's encoding (reservations::trace::encode): events are (tsc, kind,
    partition, vcpu, arg); stamps as deltas from the previous event, the first from base_tsc."""
    out, previous = bytearray(), base_tsc
    for tsc, kind, partition, vcpu, arg in events:
        out.append(kind)
        for n in (tsc - previous, partition, vcpu, arg):
            out += leb128(n)
        previous = tsc
    return bytes(out)


def trace_records(pcpu, chunks, dropped=0):
    """`trace` records of one pCPU, one per chunk (each based on the last stamp before it),
    then its `trace_end`."""
    records, base = [], T0
    for number, events in enumerate(chunks):
        records.append({"type": "trace", "pcpu": pcpu, "chunk": number, "base_tsc": base, "events": len(events),
                        "data": base64.b64encode(encode(events, base)).decode()})
        base = events[-1][0]
    records.append({"type": "trace_end", "pcpu": pcpu, "events": sum(map(len, chunks)), "dropped": dropped})
    return records


PCPU0_CHUNKS = [
    [(T0 + 100, TURN_START, BARRIER, 0, 1),
     (T0 + 150, VM_ENTRY, BARRIER, 0, 0),
     (T0 + 400, VM_EXIT, BARRIER, 0, 40),              # pause: 40 us after t0
     (T0 + 420, INJECT, BARRIER, 0, 32),
     (T0 + 450, VM_ENTRY, BARRIER, 0, 0),
     (T0 + 50_100, VM_EXIT, BARRIER, 0, 1),
     (T0 + 50_100, HOST_INTERRUPT, BARRIER, 0, 236),
     (T0 + 50_200, TURN_END, BARRIER, 0, 0)],
    [(T0 + 50_300, TURN_START, LINUX, 0, 0),           # lent slack
     (T0 + 50_350, VM_ENTRY, LINUX, 0, 0),
     (T0 + 60_000, VM_EXIT, LINUX, 0, 48),             # ept-violation: no exit_stats record names it
     (T0 + 60_100, TURN_END, LINUX, 0, 1),             # halted: closes the exit handling too
     (T0 + 60_200, IDLE_START, NONE, 0, 0),
     (T0 + 99_000, IDLE_END, NONE, 0, 0),
     (T0 + 100_000, BOUNDARY_IPI, NONE, 0, 2),
     (T0 + 100_000, TURN_START, BARRIER, 0, 1),
     (T0 + 100_050, VM_ENTRY, BARRIER, 0, 0)],         # the buffer was full: cut here
]
PCPU1_CHUNKS = [
    [(T0 + 90, VM_EXIT, BARRIER, 1, 52),               # an exit whose entry came before the trace
     (T0 + 100, TURN_START, BARRIER, 1, 1),
     (T0 + 160, VM_ENTRY, BARRIER, 1, 0),
     (T0 + 170, KICK, BARRIER, 0, 0),
     (T0 + 12_345_678, VM_EXIT, BARRIER, 1, 52),       # a delta of four LEB128 bytes
     (T0 + 12_345_700, TURN_END, BARRIER, 1, 3),
     (T0 + 12_345_800, FAULT, LINUX, 1, 0),
     (T0 + 12_345_900, RESET, LINUX, 0, 0)],
]
TURN_STARTS = sum(e[1] == TURN_START for chunk in PCPU0_CHUNKS + PCPU1_CHUNKS for e in chunk)


def stats(name, **fields):
    base = {"type": "partition_stats", "partition": name, "vcpus": 2, "iterations": 900, "iterations_per_s": 450,
            "guest_cycles": 9_000_000, "on_behalf_cycles": 200_000, "cpu_share_pct": "49.50", "exits": 600,
            "pause_loop_exits": 12, "spin_waste_hv_pct": "0.40", "spin_waste_guest_pct": "0.55",
            "spin_samples": 900, "spin_sampled_pct": "0.67", "spin_sampled_ci95_pp": "0.53", "slots": 400,
            "gang_slots_measured": 200, "skew_median_cycles": 5, "skew_max_cycles": 305, "skew_max_at_ms": 10,
            "hypercalls": 0, "resets": 0, "state": "running"}
    base.update(fields)
    return base


def serial_log(with_trace=True, with_progress=True, progress_guest_cycles=True):
    host = [
        {"type": "boot", "cpus": 2, "apic_ids": [0, 1], "tsc_hz": HZ, "modules": ["partitions.toml"]},
        {"type": "config", "status": "accepted", "file": "partitions.toml", "partitions": 2, "groups": 0,
         "policy": "gang", "major_frame_us": 10000},
        {"type": "partition_plan", "name": "barrier", "vcpus": 2, "pcpus": [0, 1], "memory_base": "0x1a00000",
         "memory_mib": 16, "reservation": "hard 5000 us / 10000 us (50%)", "guest_module": "testguest"},
        {"type": "partition_plan", "name": "linux", "vcpus": 2, "pcpus": [0, 1], "memory_base": "0x2a00000",
         "memory_mib": 64, "reservation": "hard 5000 us / 10000 us (50%)", "guest_module": "bzImage"},
    ]
    if with_progress:
        for t_ms in (500, 1000, 1500, 2000):
            cycles = t_ms * HZ // 1000                # half of 2 pCPUs' cycles
            for name, iterations, guest_cycles in (("barrier", t_ms * 45 // 100, cycles), ("linux", 0, cycles * 9 // 10)):
                record = {"type": "progress", "t_ms": t_ms, "partition": name, "iterations": iterations,
                          "stopped": False}
                if progress_guest_cycles:
                    record.update(guest_cycles=guest_cycles, pcpus=2)
                host.append(record)
    host += [
        stats("barrier"),
        stats("linux", iterations=0, iterations_per_s=0, spin_waste_guest_pct="not measured",
              spin_waste_hv_pct="not measured", spin_samples=3000, spin_sampled_pct="1.50",
              spin_sampled_ci95_pp="0.43", spin_window_samples=1000, spin_window_pct="4.80",
              spin_window_ci95_pp="1.32"),
        {"type": "exit_stats", "reason": 1, "name": "external-interrupt", "count": 400, "mean_cycles": 115},
        {"type": "exit_stats", "reason": 40, "name": "pause", "count": 12, "mean_cycles": 155},
        {"type": "exit_stats", "reason": 52, "name": "preemption-timer", "count": 30, "mean_cycles": 900},
        {"type": "accounting", "pcpus": 2, "elapsed_cycles": 40_000_000, "guest_cycles": 39_000_000,
         "on_behalf_cycles": 800_000, "idle_cycles": 0, "overhead_cycles": 100_000, "unaccounted_cycles": 0,
         "unaccounted_ppb": 0, "debug_uncharged_cycles": 0, "hypervisor_pct": "2.250", "idle_pct": "0.000",
         "guard_exits": 0, "yields": 0},
    ]
    if with_trace:
        host.append({"type": "trace_info", "t0_tsc": T0, "tsc_hz": HZ, "capacity": 17})
        host += trace_records(0, PCPU0_CHUNKS)
        host += trace_records(1, PCPU1_CHUNKS, dropped=5)
    host.append({"type": "run_end", "run_ms": 2000, "policy": "gang"})
    guest = [
        {"type": "thread", "workload": "barrier", "thread": 0, "spin_fraction": 0.04},
        {"type": "thread", "workload": "barrier", "thread": 1, "spin_fraction": 0.06},
        {"type": "workload", "name": "barrier", "threads": 2, "seconds": 5.0, "iterations_per_sec": 3240.5,
         "spin_fraction": 0.05},
    ]
    lines = ["[cpu0 INFO ] phalanx: a human-readable line"]
    lines += [json.dumps(r) for r in host[:4]]
    lines += ["[cpu0 INFO ] [linux] " + json.dumps(r) for r in guest]
    lines += [json.dumps(r) for r in host[4:]]
    return "\n".join(lines) + "\n"


def write_run(directory, **kwargs):
    with open(os.path.join(directory, "serial.log"), "w") as f:
        f.write(serial_log(**kwargs))
    with open(os.path.join(directory, "wall_seconds"), "w") as f:
        f.write("7\n")


class DecoderTest(unittest.TestCase):
    def test_bytes_written_by_hand(self):
        # kind 3 (vm_entry), delta 624485 = E5 8E 26, partition 0, vCPU 1, arg 0; then kind 4,
        # delta 2, partition 0x7fff = FF FF 01, vCPU 0, arg 300 = AC 02.
        data = bytes([3, 0xE5, 0x8E, 0x26, 0, 1, 0, 4, 2, 0xFF, 0xFF, 0x01, 0, 0xAC, 0x02])
        events = report.decode_chunk(data, 1000, 2)
        self.assertEqual(events[0], report.TraceEvent(625485, 3, 0, 1, 0))
        self.assertEqual(events[1], report.TraceEvent(625487, 4, 0x7FFF, 0, 300))

    def test_stamps_are_running_sums_from_the_base(self):
        chunk = PCPU1_CHUNKS[0]
        events = report.decode_chunk(encode(chunk, T0), T0, len(chunk))
        self.assertEqual([e.tsc for e in events], [e[0] for e in chunk])
        self.assertEqual(events[4].tsc, T0 + 12_345_678)
        self.assertEqual([(e.kind, e.partition, e.vcpu, e.arg) for e in events], [e[1:] for e in chunk])

    def test_a_backward_stamp_wraps_as_the_encoder_wrote_it(self):
        # The encoder's deltas are wrapping u64 subtractions: 10 after 20 is 2^64 - 10.
        data = bytes([5]) + leb128((10 - 20) % 2**64) + bytes([0xFF, 0xFF, 0x03, 0, 0])
        self.assertEqual(report.decode_chunk(data, 20, 1)[0], report.TraceEvent(10, 5, NONE, 0, 0))

    def test_bad_chunks(self):
        with self.assertRaises(report.TraceFormatError):
            report.decode_chunk(bytes([99, 0, 0, 0, 0]), 0, 1)       # unknown kind
        with self.assertRaises(report.TraceFormatError):
            report.decode_chunk(bytes([3, 0x80]), 0, 1)              # varint cut off
        with self.assertRaises(report.TraceFormatError):
            report.decode_chunk(encode(PCPU1_CHUNKS[0], T0), T0, 3)  # count disagrees


class ChromeTraceTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        write_run(self.dir.name)
        run = report.Run(self.dir.name)
        self.trace = report.decode_trace(run)
        self.document, self.stats = report.chrome_trace(self.trace, run.partition_names(),
                                                        report.exit_reason_names(run))
        self.slices = [e for e in self.document["traceEvents"] if e["ph"] == "X"]

    def tearDown(self):
        self.dir.cleanup()

    def test_decodes_every_chunk(self):
        self.assertEqual(self.trace.problems, [])
        self.assertEqual(len(self.trace.events[0]), sum(map(len, PCPU0_CHUNKS)))
        self.assertEqual(self.trace.events[0][-1].tsc, T0 + 100_050)   # chunk 2 counts from chunk 1's end

    def test_one_named_thread_per_pcpu(self):
        threads = {e["tid"]: e["args"]["name"] for e in self.document["traceEvents"]
                   if e["ph"] == "M" and e["name"] == "thread_name"}
        self.assertEqual(threads, {0: "pCPU 0", 1: "pCPU 1"})
        self.assertEqual({e["tid"] for e in self.document["traceEvents"] if e["ph"] != "M"}, {0, 1})

    def test_one_turn_slice_per_turn_start(self):
        turns = [s for s in self.slices if " vCPU " in s["name"]]
        self.assertEqual(len(turns), TURN_STARTS)
        self.assertIn("linux vCPU 0 (slack)", [s["name"] for s in turns])
        self.assertEqual(sorted(s["args"].get("ended", "cut") for s in turns), ["cut", "deadline", "halted", "stopped"])

    def test_times_are_microseconds_since_t0(self):
        pause = next(s for s in self.slices if s["name"] == "pause")
        self.assertEqual((pause["tid"], pause["ts"], pause["dur"]), (0, 40.0, 5.0))
        ept = next(s for s in self.slices if s["name"] == "ept-violation")
        self.assertEqual((ept["ts"], ept["dur"]), (6000.0, 10.0))     # ended by the turn's end
        long_guest = next(s for s in self.slices if s["tid"] == 1 and s["name"] == "guest")
        self.assertAlmostEqual(long_guest["ts"] + long_guest["dur"], 1_234_567.8)

    def test_slices_nest_and_never_run_backwards(self):
        for tid in (0, 1):
            open_ends = []
            track = sorted((s for s in self.slices if s["tid"] == tid), key=lambda s: (s["ts"], -s["dur"]))
            for s in track:
                self.assertGreaterEqual(s["dur"], 0, s)
                start, end = round(s["ts"] * 1000), round(s["ts"] * 1000) + round(s["dur"] * 1000)
                while open_ends and open_ends[-1] <= start:
                    open_ends.pop()
                if open_ends:
                    self.assertLessEqual(end, open_ends[-1], f"{s} sticks out of its parent")
                open_ends.append(end)

    def test_cut_and_unmatched_events_are_counted(self):
        self.assertEqual(self.stats.cut_slices, 2)        # pCPU 0's last turn and its guest slice
        self.assertEqual(self.stats.unmatched_ends, 1)    # pCPU 1's first exit
        self.assertEqual(self.stats.turns, {"barrier": 3, "linux": 1})

    def test_guest_cycles_add_up_from_the_stamps(self):
        # barrier: 250 + 49,650 on pCPU 0 (the cut guest slice at its end is 0), 12,345,518 on
        # pCPU 1; linux: 9,650 on pCPU 0.
        self.assertEqual(self.stats.guest_cycles, {"barrier": 12_395_418, "linux": 9_650})

    def test_instants(self):
        instants = {e["name"]: e for e in self.document["traceEvents"] if e["ph"] == "i"}
        self.assertEqual(set(instants), {"inject", "host interrupt", "kick", "fault", "reset", "boundary IPI"})
        self.assertEqual(instants["inject"]["args"], {"partition": "barrier", "vcpu": 0, "vector": 32})
        self.assertEqual(instants["boundary IPI"]["args"], {"pCPUs signalled": 2})
        self.assertTrue(all(e["s"] == "t" for e in instants.values()))


@unittest.skipUnless(HAVE_MATPLOTLIB, NEEDS_MATPLOTLIB)
class ReportTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.dir.cleanup()

    def path(self, name):
        return os.path.join(self.dir.name, name)

    def assert_png(self, name):
        with open(self.path(name), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", name)

    def test_full_log(self):
        write_run(self.dir.name)
        written = report.write_report(self.dir.name)
        self.assertEqual(written, ["report.md", "progress.png", "spin.png", "exits.png", "trace.json"])
        for png in ("progress.png", "spin.png", "exits.png"):
            self.assert_png(png)
        with open(self.path("report.md")) as f:
            md = f.read()
        for name in ("barrier", "linux"):
            self.assertIn(f"| {name} |", md)
        self.assertIn("0.67% ± 0.53 pp", md)           # sampled with its CI
        self.assertIn("4.80% ± 1.32 pp (window)", md)  # over the Linux workload's window
        self.assertNotIn("1.50%", md)                   # not the whole run's, boot included
        self.assertIn("| 5.00% |", md)                  # the Linux workload's own spin
        self.assertIn("3,240 (workload)", md)
        self.assertIn("](trace.json)", md)
        self.assertIn("![Progress and CPU share over time](progress.png)", md)
        with open(self.path("trace.json")) as f:
            self.assertEqual(json.load(f)["displayTimeUnit"], "ns")

    def test_log_without_trace_or_progress(self):
        write_run(self.dir.name, with_trace=False, with_progress=False)
        written = report.write_report(self.dir.name)
        self.assertNotIn("trace.json", written)
        self.assertNotIn("progress.png", written)
        self.assertFalse(os.path.exists(self.path("trace.json")))
        with open(self.path("report.md")) as f:
            md = f.read()
        self.assertIn("not drawn: no `progress` records", md)
        self.assertNotIn("## Trace", md)

    def test_progress_records_without_guest_cycles(self):
        write_run(self.dir.name, with_trace=False, progress_guest_cycles=False)
        self.assertIn("progress.png", report.write_report(self.dir.name))
        with open(self.path("report.md")) as f:
            self.assertIn("CPU share over time: not in this log", f.read())

    def test_log_without_records(self):
        with open(self.path("serial.log"), "w") as f:
            f.write("SeaBIOS\nBooting from DVD/CD...\n")
        self.assertEqual(report.write_report(self.dir.name), ["report.md"])

    def test_compare(self):
        runs = []
        for label in ("dedicated", "gang", "gang", "independent"):
            run_dir = tempfile.mkdtemp(dir=self.dir.name)
            write_run(run_dir, with_trace=False)
            runs.append((label, run_dir))
        runs.append(("relaxed-co", self.path("missing")))
        out = self.path("compare.png")
        self.assertEqual(report.main(["--compare", out, "--partition", "barrier", "--baseline", "dedicated"]
                                     + [f"{label}={run_dir}" for label, run_dir in runs]), 0)
        self.assert_png("compare.png")


if __name__ == "__main__":
    unittest.main()
