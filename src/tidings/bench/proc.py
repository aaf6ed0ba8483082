"""What /proc says about a process and the machine: CPU seconds (every thread, user and
kernel), resident memory, and the machine's description for the results.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far, all its threads (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far, all its threads."""
    return sum(cpu_times(pid))


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (/proc/<pid>/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (/proc/stat), 0 if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first[1:9])
        return (user + nice + system + irq + softirq + steal) / CLK_TCK
    return 0.0


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def find_process(comm: str) -> int | None:
    """The first process whose name is ``comm`` (a broker, to read its CPU; never touched)."""
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "comm").read_text().strip() == comm:
                        return int(entry.name)
    return None


def raise_nofile() -> None:
    """As many open files as allowed: every subscriber is a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def cores() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def placement() -> tuple[list[int], list[int]]:
    """(server cores, generator cores): the server pinned to the first core and the generator
    to the others when there are two or more and ``taskset`` exists; else both unpinned."""
    mine = cores()
    if len(mine) >= 2 and shutil.which("taskset") and hasattr(os, "sched_setaffinity"):
        return mine[:1], mine[1:]
    return [], []


def source() -> dict[str, Any]:
    """The git commit of the tidings being measured, and its files changed since (if any)."""
    here = Path(__file__).resolve().parent.parent  # src/tidings
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        status = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return {"path": str(here)}
    if commit.returncode:
        return {"path": str(here)}
    changed = [line[3:] for line in status.stdout.splitlines() if line[:2] != "??"]
    return {"path": str(here), "commit": commit.stdout.strip(), "modified": changed}


def machine() -> dict[str, Any]:
    """The machine's description for the results: CPU, cores, kernel, Python, tidings."""
    from .. import __version__

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
    return {
        "source": source(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(cores()),
        "memory_mb": mem_kb // 1024,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "tidings": __version__,
    }
