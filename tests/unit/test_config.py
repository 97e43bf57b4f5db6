from __future__ import annotations

from pathlib import Path

import pytest

from metald.cli.main import main
from metald.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def no_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METALD_ENV_FILE", str(tmp_path / "absent.env"))


def test_defaults() -> None:
    s = load_settings()
    assert s.port == 8080 and s.network_bridge == "br-vms"
    assert str(s.data_dir) == "/opt/metald/data" and s.otel_prometheus_port == 9464


@pytest.mark.parametrize(
    "var,value",
    [
        ("UNKEY_METALD_PORT", "70000"),
        ("UNKEY_METALD_PORT", "eighty"),
        ("UNKEY_METALD_BACKEND", "xen"),
        ("UNKEY_METALD_JAILER_ENABLED", "maybe"),
        ("UNKEY_METALD_NETWORK_BRIDGE_IPV4", "10.200.0.1/16"),
        ("UNKEY_METALD_NETWORK_VM_SUBNET_IPV4", "10.100.0.1/16"),
        ("UNKEY_METALD_OTEL_SAMPLING_RATE", "2"),
        ("UNKEY_METALD_NETWORK_VMS_PER_BRIDGE", "1023"),
        ("UNKEY_METALD_NETWORK_VMS_PER_BRIDGE", "16"),  # 4096 blocks of a /16: too many bridges
        ("UNKEY_METALD_NETWORK_BRIDGE", "br-vms-main-01"),  # no room for "-255"
    ],
)
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "UNKEY_METALD_" in str(info.value)
    if "BRIDGE_IPV4" not in var:
        assert var in str(info.value)


def test_env_file_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = tmp_path / "metald.env"
    env.write_text("# comment\nUNKEY_METALD_PORT=9090\nUNKEY_METALD_BACKEND=qemu\nOTHER=1\n")
    monkeypatch.setenv("METALD_ENV_FILE", str(env))
    monkeypatch.delenv("UNKEY_METALD_PORT", raising=False)
    monkeypatch.delenv("UNKEY_METALD_BACKEND", raising=False)
    monkeypatch.setenv("UNKEY_METALD_BACKEND", "firecracker")
    s = load_settings()
    assert s.port == 9090 and s.backend == "firecracker"


def test_config_command(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNKEY_METALD_PORT", "8181")
    assert main(["config"]) == 0
    assert "UNKEY_METALD_PORT=8181" in capsys.readouterr().out


def test_config_command_rejects_bad_value(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNKEY_METALD_ADDRESS", "0.0.0.0")
    monkeypatch.setenv("UNKEY_METALD_JAILER_FD_LIMIT", "3")
    with pytest.raises(SystemExit) as info:
        main(["config"])
    assert info.value.code == 2
    assert "UNKEY_METALD_JAILER_FD_LIMIT" in capsys.readouterr().err


def test_env_template_and_docs_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    main(["config", "--template"])
    assert capsys.readouterr().out == (root / "deploy" / "metald.env").read_text()
    main(["config", "--markdown"])
    assert capsys.readouterr().out == (root / "docs" / "config.md").read_text()
