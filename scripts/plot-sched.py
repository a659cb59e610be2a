#!/usr/bin/env python3
"""Plots BARRIER progress and spin-wait waste per policy from sched-sim's results.json."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src) as f:
        doc = json.load(f)
    runs = doc["runs"]
    labels = [r["policy"] for r in runs]
    barrier = [next(p for p in r["partitions"] if p["name"] == "barrier") for r in runs]
    progress = [p["progress_per_s"] for p in barrier]
    waste = [p["waste_pct"] for p in barrier]
    half = 0.5 * doc["dedicated_progress_per_s"]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = ["#777777"] + ["#2b7bba" if lbl == "gang" else "#d95f02" for lbl in labels[1:]]
    ax1.bar(labels, progress, color=colors)
    ax1.axhline(half, linestyle="--", color="black", linewidth=1, label="0.5 x dedicated")
    ax1.axhline(0.9 * half, linestyle=":", color="green", linewidth=1, label="90% target")
    ax1.set_ylabel("barrier iterations / simulated s")
    ax1.set_title("BARRIER progress")
    ax1.legend()
    ax2.bar(labels, waste, color=colors)
    ax2.axhline(2.0, linestyle=":", color="green", linewidth=1, label="2% target")
    ax2.set_ylabel("waste, % of BARRIER CPU time")
    ax2.set_title("Spin-wait waste")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
        for lbl in ax.get_xticklabels():
            lbl.set_horizontalalignment("right")
    fig.suptitle(doc["scenario"])
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot-sched.py results.json out.png")
    main(sys.argv[1], sys.argv[2])
