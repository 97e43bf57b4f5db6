"""`make run`'s demo (scripts/run.sh + scripts/demo.sh) deletes its VM on any exit, Ctrl-C during the boot too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.audit import vmm_processes_of
from tests.support.daemon import DaemonProcess

pytestmark = [pytest.mark.xdist_group("net")]

ROOT = Path(__file__).resolve().parents[2]
METALD_CLI = str(Path(sys.executable).parent / "metald")
VM = "demo-ctrlc"


def _terminal_signals() -> None:
    """SIGINT as a terminal's shell gives it. A background job of a non-interactive shell (the
    suite runs pytest as one) starts with SIGINT ignored, and bash cannot trap a signal that was
    ignored when it started, so `make run` would never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.vm
def test_ctrl_c_during_the_demo_boot_deletes_the_demo_vm(
    tmp_path: Path, require_isolated: None, require_image: Path
) -> None:
    d = DaemonProcess(tmp_path, require_image, UNKEY_METALD_NETWORK_ENABLED="false",
                      UNKEY_METALD_JAILER_UID="61000", UNKEY_METALD_JAILER_GID="61000")
    env = {**d.env, "DEMO_VM_ID": VM}
    out = (tmp_path / "run.out").open("wb")
    run = subprocess.Popen(["bash", str(ROOT / "scripts" / "run.sh"), METALD_CLI], env=env, cwd=ROOT,
                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                           preexec_fn=_terminal_signals)
    try:
        # wait until the demo has created its VM and started booting it
        deadline = time.monotonic() + 120
        while True:
            assert run.poll() is None, (tmp_path / "run.out").read_text()
            assert time.monotonic() < deadline, (tmp_path / "run.out").read_text()
            try:
                if d.rpc("ListVms", {}).get("vms"):
                    break
            except Exception:  # noqa: BLE001 - metald still starting
                pass
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        run.wait(180)
        text = (tmp_path / "run.out").read_text()
        assert f"== delete {VM}" in text, text
        # metald stopped with the demo; start it again: the demo VM is gone, and so is its VMM
        d.start()
        assert not d.rpc("ListVms", {}).get("vms"), text
        assert not vmm_processes_of(d.run_dir)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        d.kill_with_vmms()
