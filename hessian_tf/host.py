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


def _read(directory: str, name: str) -> str | None:
    """The stripped text of the file `name` in `directory`, or None if it cannot be read."""
    try:
        with open(os.path.join(directory, name)) as file:
            return file.read().strip()
    except OSError:
        return None


def cgroup_memory_limit(cgroups: str = "/proc/self/cgroup",
                        root: str = "/sys/fs/cgroup") -> int | None:
    """The least memory limit, in bytes, of this process's cgroup and its ancestors (a
    container's, a Kubernetes pod's, a Slurm job's), or None where there is none or it
    cannot be read. cgroup v2: `memory.max` under `root`; v1: `memory.limit_in_bytes`
    under `root`/memory, of the ancestors only those that account their descendants
    (`memory.use_hierarchy` 1, the default). `cgroups`: the process's list
    (/proc/self/cgroup), whose paths are relative to the mounted hierarchy (inside a
    container, its own root); a path that leaves it (`/../...`, a cgroup outside this
    namespace's root) names no cgroup that can be read there."""
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
        segments = [segment for segment in path.split("/") if segment]
        if ".." in segments:
            continue
        v1 = name != "memory.max"
        for depth in range(len(segments), -1, -1):  # the cgroup, then its ancestors
            directory = os.path.join(base, *segments[:depth])
            if v1 and depth < len(segments) and _read(directory, "memory.use_hierarchy") == "0":
                break  # its limit (and its ancestors') does not count its descendants
            text = _read(directory, name)
            if text is not None and text != "max" and text.isdigit() \
                    and int(text) < _NO_V1_LIMIT:
                limits.append(int(text))
    return min(limits) if limits else None


def memory_bytes() -> int:
    """The memory this process may use: the host's physical memory (8 GiB when the
    system does not say), or its cgroup's limit where lower (a container's, a
    Kubernetes pod's, a Slurm job's: `cgroup_memory_limit`)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 * 2**30
    limit = cgroup_memory_limit()
    return physical if limit is None else min(physical, limit)
