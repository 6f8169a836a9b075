"""CPU time and peak memory of process trees, read from /proc (Linux; no psutil needed).

Triton runs one python-backend stub process per model instance, so a server's cost is the sum over
its process tree, found again at every reading (stubs start after the server).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_stat(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return text[text.rindex(")") + 2 :].split()


def parse_stat_cpu_seconds(fields: list[str]) -> float:
    """utime + stime (fields 14 and 15 of /proc/PID/stat; index 11 and 12 after the name)."""
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def parse_status_kib(text: str, key: str) -> int:
    """A `Key:   1234 kB` line of /proc/PID/status, in KiB; 0 when absent (kernel threads)."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _read_stat(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children = children_map()
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


@dataclass(frozen=True)
class Reading:
    cpu_seconds: float  # user + system, summed over the tree
    rss_mib: float  # resident now, summed over the tree
    peak_rss_mib: float  # sum of each process's own peak (VmHWM): an upper bound of the tree's peak
    processes: int


def read_tree(root: int) -> Reading:
    return read_pids(process_tree(root))


def read_pids(pids: Iterable[int]) -> Reading:
    cpu = 0.0
    rss = peak = 0
    count = 0
    for pid in pids:
        fields = _read_stat(pid)
        if fields is None:
            continue
        try:
            status = (PROC / str(pid) / "status").read_text()
        except OSError:
            continue
        cpu += parse_stat_cpu_seconds(fields)
        rss += parse_status_kib(status, "VmRSS")
        peak += parse_status_kib(status, "VmHWM")
        count += 1
    return Reading(cpu, rss / 1024, peak / 1024, count)


class CpuMeter:
    """CPU seconds a process tree spends between `start()` and `stop()`, and its peak memory."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._start = 0.0
        self.cpu_seconds = 0.0
        self.peak_rss_mib = 0.0

    def start(self) -> None:
        self._start = read_tree(self.root).cpu_seconds

    def stop(self) -> Reading:
        reading = read_tree(self.root)
        self.cpu_seconds = reading.cpu_seconds - self._start
        self.peak_rss_mib = reading.peak_rss_mib
        return reading


def prometheus_sums(text: str, metric: str) -> dict[str, float]:
    """`<metric>_sum{labels} value` lines of a Prometheus text page, keyed by their label text.

    `{stage="triton"}` -> 'stage="triton"'; labels sorted by name (`code="OK",method="M"`
    whatever order the exporter wrote them in); a metric without labels is keyed ''.
    """
    sums: dict[str, float] = {}
    prefix = metric + "_sum"
    for line in text.splitlines():
        if not line.startswith(prefix) or line[len(prefix) : len(prefix) + 1] not in ("{", " "):
            continue
        name, _, value = line.rpartition(" ")
        labels = name[len(prefix) :].strip("{}")
        key = ",".join(sorted(re.findall(r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"', labels)))
        sums[key] = float(value)
    return sums
