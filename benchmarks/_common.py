"""Shared by the benchmark scripts: argument parsing, alternating timing, medians, reporting."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable


def parse_args(description: str, reps: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reps", type=int, default=reps, help=f"repetitions of each side (default {reps})")
    parser.add_argument("--smoke", action="store_true", help="one repetition, small sizes: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.reps = 1
    if args.reps < 1:
        parser.error(f"--reps: must be >= 1, got {args.reps}")
    return args


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def alternate(sides: dict[str, Callable[[], float | None]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each side ``reps`` times, alternating (A B B A ...), after ``warmup`` untimed rounds.

    A side returns None to be timed with ``perf_counter`` around the call, or its own measured
    seconds (to time only part of what it does).
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for round_index in range(warmup + reps):
        # A B, then B A: a side never always runs right after the other (caches, clocks, threads)
        for name in order if round_index % 2 == 0 else order[::-1]:
            fn = sides[name]
            start = time.perf_counter()
            measured = fn()
            elapsed = time.perf_counter() - start if measured is None else measured
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def report(title: str, times: dict[str, list[float]], baseline: str, unit: str = "ms", scale: float = 1e3) -> float:
    """Print medians and the ratio of the other side to ``baseline``; return that ratio."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{title}")
    for name, value in medians.items():
        spread = f"(min {min(times[name]) * scale:.3f}, max {max(times[name]) * scale:.3f}, n={len(times[name])})"
        print(f"  {name:<40} median {value * scale:10.3f} {unit} {spread}")
    other = next(name for name in medians if name != baseline)
    ratio = medians[other] / medians[baseline]
    print(f"  ratio {other} / {baseline}: {ratio:.3f}")
    return ratio


def verdict(label: str, ratio: float, target: float, smoke: bool) -> None:
    if smoke:
        print(f"{label}: ratio {ratio:.3f} (smoke run: one repetition, not a measurement)")
    else:
        print(f"{label}: ratio {ratio:.3f}, target <= {target:.2f}: {'MET' if ratio <= target else 'NOT MET'}")


def median(values: list[float]) -> float:
    return statistics.median(values)


class Clock:
    """Wall time and process CPU time (all threads: writer threads included) of a side's timed span.

    On a shared machine other processes stretch the wall time of whatever runs while they do; the
    CPU time of the process is what the side itself spent. ``stop`` returns the wall seconds, as
    ``alternate`` expects; ``cpu`` holds the CPU seconds per side, warm-up rounds first.
    """

    def __init__(self) -> None:
        self.cpu: dict[str, list[float]] = {}

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def stop(self, name: str, started: tuple[float, float]) -> float:
        self.cpu.setdefault(name, []).append(time.process_time() - started[1])
        return time.perf_counter() - started[0]

    def cpu_times(self, warmup: int = 1) -> dict[str, list[float]]:
        return {name: values[warmup:] for name, values in self.cpu.items()}


def paired_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """For each side, the median over rounds of its time over the baseline's in the same round.

    Sides of one round run back to back, so a slow spell of a shared machine (other processes,
    the host's neighbours) slows both sides of a pair; the median of these ratios is steadier
    than the ratio of two medians taken over different moments.
    """
    return {
        name: statistics.median(value / base for value, base in zip(values, times[baseline]))
        for name, values in times.items()
    }


def met(ratio: float, target: float, smoke: bool) -> str:
    """The README's "met" cell."""
    return "smoke run" if smoke else ("yes" if ratio <= target else "no")


def readme_table(header: list[str], rows: list[list[str]]) -> None:
    """Print rows in the exact markdown form benchmarks/README.md uses, ready to paste."""
    print("\nREADME table (benchmarks/README.md):\n")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


SUMMARY_HEADER = ["benchmark", "baseline", "measured", "target", "met"]
