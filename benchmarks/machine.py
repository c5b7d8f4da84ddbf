"""What the benchmarks print about the machine they ran on, and how they time a call."""

from __future__ import annotations

import os
import platform
import sys
import time


def load_average() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        name = names[0] if names else name
    except OSError:
        pass
    return name


def positive_integers(flag: str, text: str, example: str):
    """The comma-separated positive integers of `--flag=text`, or None after one line on
    stderr saying what to pass (e.g. `example`)."""
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        print(f"--{flag}={text!r}: pass comma-separated positive integers, e.g. {example}.",
              file=sys.stderr)
        return None
    return values


def best_of(function, repeats: int) -> float:
    """The least wall time of `repeats` calls of `function`, in seconds."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def median_seconds(function, repeats: int) -> float:
    """The median wall time of `repeats` calls of `function` after one warm-up call."""
    function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    middle = len(seconds) // 2
    return seconds[middle] if len(seconds) % 2 else (seconds[middle - 1] + seconds[middle]) / 2


def measure_rows(header, cases, measure) -> list:
    """`measure(*case)` for each case (a row of strings), each row printed as it comes
    between the load averages at the start and the end, then all as a Markdown table
    under `header`; returns the rows. TensorFlow's CPU threads are set first as
    hessian-spectrum sets them, and printed."""
    from hessian_tf.distribute import automatic_cpu_threads, cpu_threads

    automatic_cpu_threads("default")
    print(f"TensorFlow threads {cpu_threads()}")
    print(f"Start: {load_average()}", flush=True)
    rows = []
    for case in cases:
        rows.append(measure(*case))
        print("  ".join(rows[-1]), flush=True)
    print()
    print("| " + " | ".join(header) + " |")
    print("|---|" + "--:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"End: {load_average()}")
    return rows
