"""Facts about the host that need no TensorFlow."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# A cgroup v1 limit at or above this is "no limit" (the kernel writes the largest page
# multiple of a signed 64-bit integer).
_NO_V1_LIMIT = 1 << 60


def cgroup_memory_limit(cgroups: str = "/proc/self/cgroup",
                        root: str = "/sys/fs/cgroup") -> int | None:
    """The least memory limit, in bytes, of this process's cgroup and its ancestors (a
    container's, a Kubernetes pod's, a Slurm job's), or None where there is none or it
    cannot be read. cgroup v2: `memory.max` under `root`; v1: `memory.limit_in_bytes`
    under `root`/memory. `cgroups`: the process's list (/proc/self/cgroup), whose paths
    are relative to the mounted hierarchy (inside a container, its own root)."""
    try:
        with open(cgroups) as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":  # v2
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):  # v1
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        directory = os.path.join(base, path.strip("/"))
        while True:  # the cgroup and its ancestors, to the hierarchy's root
            try:
                with open(os.path.join(directory, name)) as file:
                    text = file.read().strip()
                if text != "max" and int(text) < _NO_V1_LIMIT:
                    limits.append(int(text))
            except (OSError, ValueError):
                pass
            if os.path.normpath(directory) == os.path.normpath(base):
                break
            directory = os.path.dirname(directory)
    return min(limits) if limits else None
