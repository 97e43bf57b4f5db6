from __future__ import annotations

import json
from pathlib import Path

import pytest

from metald.cli import doctor
from metald.cli.main import main


@pytest.fixture
def proc_sys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proc_sys"
    (root / "net/ipv4").mkdir(parents=True)
    monkeypatch.setattr(doctor, "PROC_SYS", root)
    monkeypatch.setenv("METALD_ENV_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv("UNKEY_METALD_DATA_DIR", str(tmp_path / "data"))
    return root


def test_reports_ip_forward_off_with_fix(proc_sys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (proc_sys / "net/ipv4/ip_forward").write_text("0\n")
    assert main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    finding = next(c for c in report["checks"] if c["name"] == "ip_forward")
    assert finding["status"] == "fail"
    assert "sysctl -w net.ipv4.ip_forward=1" in finding["fix"]
    assert report["ok"] is False


def test_ip_forward_on(proc_sys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (proc_sys / "net/ipv4/ip_forward").write_text("1\n")
    main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    finding = next(c for c in report["checks"] if c["name"] == "ip_forward")
    assert finding["status"] == "ok"


def test_chroot_dir_that_is_a_file(proc_sys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    (proc_sys / "net/ipv4/ip_forward").write_text("1\n")
    bogus = tmp_path / "jail-file"
    bogus.write_text("")
    monkeypatch.setenv("UNKEY_METALD_JAILER_CHROOT_DIR", str(bogus))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "is not a directory" in out and "fix:" in out
