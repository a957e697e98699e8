"""Thread counts (issue 7 item 3.5): physical cores by default, never more than the CPUs this process may use."""
import pytest

from uclip_cli import threads as T


def fake_sysfs(root, siblings: dict[int, str]):
    for cpu, group in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "core_cpus_list").write_text(group + "\n")
    return root


def test_hyperthread_siblings_count_as_one_core(tmp_path):
    sysfs = fake_sysfs(tmp_path, {0: "0,4", 1: "1,5", 2: "2,6", 3: "3,7", 4: "0,4", 5: "1,5", 6: "2,6", 7: "3,7"})
    assert T.physical_cores(set(range(8)), sysfs) == 4
    assert T.physical_cores({0, 4}, sysfs) == 1              # an affinity of two siblings is one core
    assert T.physical_cores({0, 1}, tmp_path / "missing") is None


def test_cgroup_quota_caps_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert T.cgroup_cpu_limit(tmp_path / "cpu.max") == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert T.cgroup_cpu_limit(tmp_path / "cpu.max") is None


def test_default_is_physical_cores_within_what_the_process_may_use(monkeypatch):
    monkeypatch.setattr(T, "allowed_cpus", lambda: set(range(8)))
    monkeypatch.setattr(T, "physical_cores", lambda cpus: 4)
    monkeypatch.setattr(T, "cgroup_cpu_limit", lambda: None)
    assert T.default_threads() == 4
    monkeypatch.setattr(T, "cgroup_cpu_limit", lambda: 2)      # a container allowed 2 CPUs
    assert T.default_threads() == 2 and T.available_threads() == 2


def test_resolve_threads(monkeypatch):
    monkeypatch.setattr(T, "available_threads", lambda: 2)
    monkeypatch.setattr(T, "default_threads", lambda: 2)
    monkeypatch.delenv(T.THREADS_ENV, raising=False)
    assert T.resolve_threads(None) == (2, None)
    assert T.resolve_threads(1) == (1, None)
    assert T.resolve_threads(64) == (2, "note: --threads 64 is more than the 2 CPUs this process may use: using 2")
    with pytest.raises(T.ThreadsError, match="--threads 0: use at least 1 thread"):
        T.resolve_threads(0)
    monkeypatch.setenv(T.THREADS_ENV, "1")
    assert T.resolve_threads(None) == (1, None)
    monkeypatch.setenv(T.THREADS_ENV, "lots")
    with pytest.raises(T.ThreadsError, match="UCLIP_THREADS='lots' is not a whole number"):
        T.resolve_threads(None)
