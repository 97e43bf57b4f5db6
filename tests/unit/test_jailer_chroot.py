"""Removing a jail never follows symlinks out of it."""

from __future__ import annotations

import os
from pathlib import Path

from metald.jailer.chroot import mounts_under, remove_tree


def test_remove_tree_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "precious").write_text("keep")
    (outside / "sub" / "also").write_text("keep")
    jail = tmp_path / "jail"
    (jail / "root" / "dev" / "net").mkdir(parents=True)
    (jail / "root" / "file").write_text("x")
    os.symlink(outside, jail / "root" / "dirlink")
    os.symlink(outside / "precious", jail / "root" / "filelink")
    os.symlink("../../outside", jail / "root" / "dev" / "rel")
    os.link(outside / "precious", jail / "root" / "hardlink")
    remove_tree(jail)
    assert not jail.exists()
    assert (outside / "precious").read_text() == "keep"
    assert (outside / "sub" / "also").read_text() == "keep"
    assert os.stat(outside / "precious").st_nlink == 1


def test_remove_tree_is_idempotent(tmp_path: Path) -> None:
    remove_tree(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    remove_tree(tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_remove_tree_on_a_symlink_removes_only_the_link(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "x").write_text("keep")
    os.symlink(tmp_path / "target", tmp_path / "link")
    remove_tree(tmp_path / "link")
    assert (tmp_path / "target" / "x").read_text() == "keep"
    assert not os.path.lexists(tmp_path / "link")


def test_mounts_under(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "1 0 8:1 / / rw - ext4 /dev/vda rw\n"
        "2 1 0:5 / /srv/jailer/qemu/vm1/root/x rw - tmpfs t rw\n"
        "3 1 0:6 / /srv/jailer/qemu/vm1/root/x/y\\040z rw - tmpfs t rw\n"
        "4 1 0:7 / /srv/jailer/qemu/vm10 rw - tmpfs t rw\n"
    )
    assert mounts_under(Path("/srv/jailer/qemu/vm1"), info) == [
        Path("/srv/jailer/qemu/vm1/root/x/y z"),
        Path("/srv/jailer/qemu/vm1/root/x"),
    ]
