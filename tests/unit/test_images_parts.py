"""The logic of the image support: references, overrides, layer checks, the
exit marker, the initramfs archive, request validation, the draft changes."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from metald.api import validate
from metald.core.errors import InvalidArgument
from metald.core.models import Drive, VmDraft
from metald.core.ports import BackendLimits
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb
from metald.images import guestconfig
from metald.images.bootfiles import cpio
from metald.images.layers import Scan
from metald.images.reference import parse
from metald.images.vmdisk import VmImages, workload_exit
from tests.support.server import make_settings

LIMITS = BackendLimits(max_vcpus=64)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.27", "docker.io/library/nginx:1.27"),
        ("user/app", "docker.io/user/app:latest"),
        ("index.docker.io/library/redis:7", "docker.io/library/redis:7"),
        ("ghcr.io/org/app:v1", "ghcr.io/org/app:v1"),
        ("localhost/app", "localhost/app:latest"),
        ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000/a/b:c"),
        ("r.io/a@sha256:" + "a" * 64, "r.io/a@sha256:" + "a" * 64),
    ],
)
def test_references_resolve_as_docker_does(text: str, canonical: str) -> None:
    assert str(parse(text)) == canonical


@pytest.mark.parametrize(
    "text", ["", "Upper/Case", "a b", "https://r.io/a", "a@sha256:abc", "a:b:c:d", "a:" + "t" * 200]
)
def test_bad_references_name_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument, match="^config.metadata.docker_image: "):
        parse(text, "config.metadata.docker_image")


def _decode(arg: str) -> str:
    value = arg.split("=", 1)[1]
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()


def test_overrides_from_metadata() -> None:
    arg = guestconfig.kernel_arg(
        {"env.A": "1", "env.B": "x\ny", "cmd": '["sh", "-c", "echo hi"]', "workdir": "/srv", "user": "1:2"}
    )
    assert arg is not None and arg.startswith("metald.overrides=") and " " not in arg
    text = _decode(arg)
    assert "cmd-reset\t\ncmd\tsh\ncmd\t-c\ncmd\techo hi\n" in text
    assert "env\tA=1\n" in text and "env\tB=x\\ny\n" in text
    assert "workdir\t/srv\n" in text and "user\t1:2\n" in text
    assert "entrypoint" not in text
    # a new entrypoint drops the image's cmd, like docker run --entrypoint
    text = _decode(guestconfig.kernel_arg({"entrypoint": "/bin/app --flag"}) or "")
    assert text == "entrypoint-reset\t\nentrypoint\t/bin/app\nentrypoint\t--flag\ncmd-reset\t\n"
    assert guestconfig.kernel_arg({"owner": "me"}) is None


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"env.1BAD": "x"}, "config.metadata.env.1BAD"),
        ({"cmd": "[1, 2]"}, "config.metadata.cmd"),
        ({"cmd": "[oops"}, "config.metadata.cmd"),
        ({"entrypoint": "'unclosed"}, "config.metadata.entrypoint"),
        ({f"env.V{i}": "x" * 100 for i in range(20)}, "config.metadata"),
    ],
)
def test_bad_overrides(metadata: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        guestconfig.kernel_arg(metadata)
    assert err.value.field == field


def test_image_config_file() -> None:
    text = guestconfig.image_config(
        {"config": {"Entrypoint": ["/e"], "Cmd": ["a b", "c"], "Env": ["P=1"], "WorkingDir": "/w", "User": "u"}}
    )
    assert text == "entrypoint\t/e\ncmd\ta b\ncmd\tc\nenv\tP=1\nworkdir\t/w\nuser\tu\n"


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = size
    return info


def test_layer_scan_refuses_escapes_and_allows_rooted_links() -> None:
    scan = Scan("docker_image", 1 << 30)
    scan.member(0, _member("usr/bin/x"))
    scan.member(0, _member("bin", tarfile.SYMTYPE, "usr/bin"))
    scan.member(0, _member("bin/y"))  # through an in-root symlink: fine
    scan.member(0, _member("var/run", tarfile.SYMTYPE, "/run"))
    scan.member(1, _member("var/run/z"))  # absolute targets are rooted, as Docker does
    scan.member(0, _member("a/../b"))
    scan.member(0, _member("h", tarfile.LNKTYPE, "usr/bin/x"))
    for bad, why in [
        (_member("../x"), "escapes the root"),
        (_member("a/../../x"), "escapes the root"),
        (_member("/etc/x"), "absolute path"),
        (_member("h2", tarfile.LNKTYPE, "../etc/passwd"), "hard link"),
        (_member("h3", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
    ]:
        with pytest.raises(InvalidArgument, match=why):
            scan.member(2, bad)
    scan.member(3, _member("d/out", tarfile.SYMTYPE, "../../.."))
    with pytest.raises(InvalidArgument, match="symlink d/out"):
        scan.member(3, _member("d/out/etc/x"))
    small = Scan("docker_image", 4096)
    with pytest.raises(InvalidArgument, match="UNKEY_METALD_IMAGE_MAX_BYTES"):
        small.member(0, _member("big", size=8192))


def test_layer_scan_reads_tar_archives(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_member("../escape"), io.BytesIO(b""))
    with pytest.raises(InvalidArgument, match="layer 4: entry '../escape' escapes"):
        Scan("f", 1 << 20).layer(4, path)
    (tmp_path / "junk").write_bytes(b"not a tar")
    with pytest.raises(InvalidArgument, match="not a readable tar"):
        Scan("f", 1 << 20).layer(0, tmp_path / "junk")


def test_workload_exit_from_the_newest_boot(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert workload_exit(log) is None
    log.write_bytes(b"METALD_IMAGE_START vm_id=a\nhello\nMETALD_WORKLOAD_EXIT code=3\n")
    assert workload_exit(log) == "workload exited with code 3"
    with log.open("ab") as fh:  # rebooted: the old marker no longer counts
        fh.write(b"METALD_IMAGE_START vm_id=a\n")
    assert workload_exit(log) is None
    with log.open("ab") as fh:
        fh.write(b"METALD_WORKLOAD_EXIT signal=9\n")
    assert workload_exit(log) == "workload killed by signal 9"
    log.write_bytes(b"METALD_IMAGE_START vm_id=a\nMETALD_WORKLOAD_EXIT error=exec /x: No such file\n")
    assert workload_exit(log) == "workload could not start: exec /x: No such file"


def test_cpio_archive_is_read_by_cpio(tmp_path: Path) -> None:
    data = gzip.compress(cpio([("init", b"#!/bin/sh\n", 0o100755)]))
    out = subprocess.run(["cpio", "-t", "-v"], input=gzip.decompress(data), capture_output=True, check=True)
    assert b"init" in out.stdout and b"-rwxr-xr-x" in out.stdout


def _config(**kw: object) -> pb.VmConfig:
    config = pb.VmConfig(cpu=pb.CpuConfig(vcpu_count=1), memory=pb.MemoryConfig(size_bytes=128 << 20))
    for key, value in kw.items():
        if key == "storage":
            config.storage.extend(value)  # type: ignore[arg-type]
        elif key == "metadata":
            config.metadata.update(value)  # type: ignore[arg-type]
    return config


def test_request_validation(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    plain = validate.vm_config(_config(), settings, True, LIMITS)  # no image: the bundled root filesystem
    assert plain.image == "" and [d.drive_id for d in plain.drives] == ["rootfs"]
    draft = validate.vm_config(_config(metadata={"docker_image": "nginx:1.27"}), settings, True, LIMITS)
    assert draft.image == "docker.io/library/nginx:1.27" and draft.drives == ()
    root = pb.StorageDevice(id="root", is_root_device=True, options={"docker_image": "nginx"})
    assert validate.vm_config(_config(storage=[root]), settings, True, LIMITS).image == "docker.io/library/nginx:latest"
    bad = [
        (
            _config(storage=[pb.StorageDevice(options={"docker_image": "x", "size": "1"})]),
            "config.storage[0].options.size",
        ),
        (_config(storage=[pb.StorageDevice(path="/x", options={"docker_image": "x"})]), "config.storage[0].path"),
        (
            _config(storage=[pb.StorageDevice(read_only=True, options={"docker_image": "x"})]),
            "config.storage[0].read_only",
        ),
        (_config(storage=[root], metadata={"docker_image": "redis"}), "config.metadata.docker_image"),
        (_config(metadata={"docker_image": "BAD"}), "config.metadata.docker_image"),
    ]
    for config, field in bad:
        with pytest.raises(InvalidArgument) as err:
            validate.vm_config(config, settings, True, LIMITS)
        assert err.value.field == field


def test_prepare_boots_the_bundled_kernel_through_metald_init(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, image_cache_dir=tmp_path / "cache")
    image = settings.image_dir.resolve()
    draft = VmDraft(
        1, 128 << 20, image / "vmlinuz", image / "initramfs.cpio.gz", "console=ttyS0", (), None,
        metadata=(("env.A", "1"),), image="docker.io/library/x:1",
    )  # fmt: skip
    images = VmImages(settings)
    run_dir = tmp_path / "run" / "vm"
    made = asyncio.run(images.prepare("vm", draft, "qemu", run_dir))
    assert made.drives == (Drive("rootfs", run_dir / "rootfs.qcow2", False, True),)
    assert made.extra_files == (run_dir / "rootfs-base.ext4",)
    assert made.initrd_path is not None and made.initrd_path.name.startswith("initramfs-image-")
    # the bundled initramfs, then an archive whose /init is metald-init
    assert made.initrd_path.read_bytes().startswith(b"x")
    assert "metald.overrides=" in made.kernel_args and "init=" not in made.kernel_args
    fc = asyncio.run(images.prepare("vm", draft, "firecracker", run_dir))
    assert fc.drives[0].path == run_dir / "rootfs.ext4" and fc.extra_files == ()
    # the caller's own kernel mounts the disk itself and starts metald-init
    own = asyncio.run(images.prepare("vm", VmDraft(**{**draft.__dict__, "initrd_path": None}), "qemu", run_dir))
    assert own.initrd_path is None and "root=/dev/vda rw init=/.metald/init" in own.kernel_args


@pytest.mark.parametrize(
    ("stderr", "code"),
    [
        # a registry port that contains "403" is not an HTTP status: the TLS failure decides
        ('pinging container registry 127.0.0.1:40331: Get "https://127.0.0.1:40331/v2/": '
         "x509: certificate signed by unknown authority", "unavailable"),
        ("reading manifest 1 in 127.0.0.1:5000/web: received unexpected HTTP status: 401", "permission_denied"),
        ("reading manifest 1 in 127.0.0.1:40401/web: manifest unknown", "not_found"),
        ("127.0.0.1:40404/v2/: received unexpected HTTP status: 404 Not Found", "not_found"),
    ],
)
def test_skopeo_failures_map_to_codes_whatever_the_port(stderr: str, code: str) -> None:
    from metald.images.registry import translate
    from metald.images.tools import ToolFailed

    ref = parse("127.0.0.1:40331/team/web:1")
    assert translate(ToolFailed(["skopeo"], 1, stderr), ref, "docker_image").code == code
