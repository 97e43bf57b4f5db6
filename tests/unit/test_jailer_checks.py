"""Settings the jailer cannot work with, and finding the cgroup hierarchy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metald.config import ConfigError, Settings
from metald.jailer import Jailer, JailerConfigError
from metald.jailer.cgroup import CgroupFs, create, detect

FS = CgroupFs(2, tuple((c, Path("/sys/fs/cgroup")) for c in ("memory", "cpu", "pids")))


@pytest.fixture(autouse=True)
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


def check(tmp_path: Path, **kw: object) -> None:
    kw.setdefault("jailer_chroot_dir", tmp_path / "jails")
    Jailer(Settings(**kw), cgroup_fs=FS).check_settings()  # type: ignore[arg-type]


def test_good_settings_pass(tmp_path: Path) -> None:
    check(tmp_path)
    (tmp_path / "jails").mkdir()
    check(tmp_path)


def test_disabled_jailer_checks_nothing(tmp_path: Path) -> None:
    check(tmp_path, jailer_enabled=False, jailer_uid=0, jailer_fd_limit=64)


@pytest.mark.parametrize("var", ["uid", "gid"])
def test_root_ids_are_rejected(tmp_path: Path, var: str) -> None:
    with pytest.raises(JailerConfigError, match=f"UNKEY_METALD_JAILER_{var.upper()}"):
        check(tmp_path, **{f"jailer_{var}": 0})


def test_error_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        check(tmp_path, jailer_uid=0)


def test_chroot_dir_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(JailerConfigError, match="UNKEY_METALD_JAILER_CHROOT_DIR.*not a directory"):
        check(tmp_path, jailer_chroot_dir=tmp_path / "file")
    with pytest.raises(JailerConfigError, match="absolute"):
        check(tmp_path, jailer_chroot_dir=Path("relative/jails"))


def test_fd_limit_floor(tmp_path: Path) -> None:
    with pytest.raises(JailerConfigError, match="UNKEY_METALD_JAILER_FD_LIMIT"):
        check(tmp_path, jailer_fd_limit=71)
    check(tmp_path, jailer_fd_limit=72)


def test_memory_allowance_floor(tmp_path: Path) -> None:
    with pytest.raises(JailerConfigError, match="UNKEY_METALD_JAILER_MEMORY_LIMIT"):
        check(tmp_path, jailer_memory_limit=0)


def test_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(JailerConfigError, match="root"):
        check(tmp_path)


def _mountinfo(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text("".join(f"{i} 1 0:{i} / {line}\n" for i, line in enumerate(lines, 30)))
    return path


def test_detect_hybrid_uses_v1(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    info = _mountinfo(
        tmp_path,
        [
            f"{unified} rw - cgroup2 cgroup2 rw",
            "/sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct",
            "/sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
            "/sys/fs/cgroup/pids rw - cgroup cgroup rw,pids",
            "/sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd",
        ],
    )
    fs = detect(info)
    assert fs.version == 1
    assert dict(fs.bases) == {
        "memory": Path("/sys/fs/cgroup/memory"),
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "pids": Path("/sys/fs/cgroup/pids"),
    }
    assert fs.parents() == tuple(p / "metald" for p in dict(fs.bases).values())


def test_detect_pure_v2(tmp_path: Path) -> None:
    root = tmp_path / "cg root"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    escaped = str(root).replace(" ", "\\040")
    fs = detect(_mountinfo(tmp_path, [f"{escaped} rw - cgroup2 cgroup2 rw,nsdelegate"]))
    assert fs.version == 2 and set(dict(fs.bases).values()) == {root}
    assert fs.paths_for("vm1").dirs == (root / "metald" / "vm1",)


def test_detect_nothing_usable(tmp_path: Path) -> None:
    info = _mountinfo(tmp_path, ["/sys/fs/cgroup/memory rw - cgroup cgroup rw,memory"])
    with pytest.raises(JailerConfigError, match="cpu"):
        detect(info)


def test_detect_this_host() -> None:
    fs = detect()
    assert fs.version in (1, 2)
    assert {name for name, _ in fs.bases} == {"memory", "cpu", "pids"}


def test_create_writes_v2_limits(tmp_path: Path) -> None:
    """Against a fake v2 tree: subtree controllers enabled, limits written."""
    from metald.jailer.resource_limits import Limits

    (tmp_path / "cgroup.subtree_control").write_text("")
    fs = CgroupFs(2, tuple((c, tmp_path) for c in ("memory", "cpu", "pids")))
    paths = fs.paths_for("vm1")
    (tmp_path / "metald").mkdir()
    (tmp_path / "metald" / "cgroup.subtree_control").write_text("")
    create(paths, Limits(memory_max=1 << 28, cpu_percent=150, cpu_period_us=100_000, pids_max=300, nofile=99))
    d = tmp_path / "metald" / "vm1"
    assert (d / "memory.max").read_text() == str(1 << 28)
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "pids.max").read_text() == "300"
    assert (tmp_path / "metald" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
