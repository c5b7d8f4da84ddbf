"""The memory this process may use: the host's, or its cgroup's limit."""

from hessian_tf import spectrum
from hessian_tf.host import cgroup_memory_limit


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_is_the_least_of_the_cgroup_and_its_ancestors(tmp_path):
    cgroups = tmp_path / "cgroup"
    write(cgroups, "0::/job/step\n")
    root = tmp_path / "fs"
    write(root / "job" / "step" / "memory.max", "max\n")  # none of its own
    write(root / "job" / "memory.max", f"{3 << 30}\n")  # the job's
    write(root / "memory.max", f"{5 << 30}\n")
    assert cgroup_memory_limit(str(cgroups), str(root)) == 3 << 30
    write(root / "job" / "step" / "memory.max", f"{1 << 30}\n")
    assert cgroup_memory_limit(str(cgroups), str(root)) == 1 << 30
    # A container sees its own cgroup as the root.
    write(cgroups, "0::/\n")
    assert cgroup_memory_limit(str(cgroups), str(root)) == 5 << 30


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    cgroups = tmp_path / "cgroup"
    write(cgroups, "12:pids:/x\n4:memory:/slurm/uid_0/job_7\n0::/\n")
    root = tmp_path / "fs"
    unlimited = "9223372036854771712\n"  # what the kernel writes for no limit
    write(root / "memory" / "memory.limit_in_bytes", unlimited)
    write(root / "memory" / "slurm" / "memory.limit_in_bytes", unlimited)
    assert cgroup_memory_limit(str(cgroups), str(root)) is None
    write(root / "memory" / "slurm" / "uid_0" / "job_7" / "memory.limit_in_bytes", f"{2 << 30}\n")
    assert cgroup_memory_limit(str(cgroups), str(root)) == 2 << 30
    # Another controller list holding memory (cpu,memory on some systems).
    write(cgroups, "4:cpu,memory:/slurm/uid_0/job_7\n")
    assert cgroup_memory_limit(str(cgroups), str(root)) == 2 << 30


def test_cgroup_v1_ancestors_count_only_where_they_account_their_descendants(tmp_path):
    cgroups = tmp_path / "cgroup"
    write(cgroups, "4:memory:/a/b/c\n")
    memory = tmp_path / "fs" / "memory"
    write(memory / "a" / "memory.limit_in_bytes", f"{1 << 30}\n")
    write(memory / "a" / "b" / "memory.limit_in_bytes", f"{4 << 30}\n")
    write(memory / "a" / "b" / "c" / "memory.limit_in_bytes", f"{8 << 30}\n")
    assert cgroup_memory_limit(str(cgroups), str(tmp_path / "fs")) == 1 << 30
    # b does not account c (nor, then, does a): c's own limit only.
    write(memory / "a" / "b" / "memory.use_hierarchy", "0\n")
    assert cgroup_memory_limit(str(cgroups), str(tmp_path / "fs")) == 8 << 30
    # use_hierarchy is an ancestor's setting: c's own 0 leaves b's (1) and a's in force.
    write(memory / "a" / "b" / "memory.use_hierarchy", "1\n")
    write(memory / "a" / "b" / "c" / "memory.use_hierarchy", "0\n")
    assert cgroup_memory_limit(str(cgroups), str(tmp_path / "fs")) == 1 << 30


def test_a_cgroup_outside_the_namespace_root_is_not_read(tmp_path):
    # /proc/self/cgroup names a cgroup outside this cgroup namespace's root as
    # /../sibling: neither it nor an ancestor of it is under the mounted root, whose
    # own limit is another cgroup's.
    cgroups = tmp_path / "cgroup"
    root = tmp_path / "fs" / "ns"
    write(root / "memory.max", f"{1 << 30}\n")
    write(tmp_path / "fs" / "sibling" / "memory.max", f"{2 << 30}\n")
    write(cgroups, "0::/../sibling\n")
    assert cgroup_memory_limit(str(cgroups), str(root)) is None
    write(cgroups, "0::/\n")
    assert cgroup_memory_limit(str(cgroups), str(root)) == 1 << 30


def test_no_cgroup_is_no_limit(tmp_path):
    assert cgroup_memory_limit(str(tmp_path / "absent"), str(tmp_path)) is None
    write(tmp_path / "cgroup", "0::/\n")
    assert cgroup_memory_limit(str(tmp_path / "cgroup"), str(tmp_path / "fs")) is None


def test_host_memory_is_the_lower_of_the_physical_memory_and_the_limit(monkeypatch):
    import hessian_tf.host as host

    monkeypatch.setattr(host, "cgroup_memory_limit", lambda: None)
    physical = spectrum.host_memory_bytes()
    monkeypatch.setattr(host, "cgroup_memory_limit", lambda: physical // 3)
    assert spectrum.host_memory_bytes() == physical // 3
    monkeypatch.setattr(host, "cgroup_memory_limit", lambda: physical * 2)
    assert spectrum.host_memory_bytes() == physical
