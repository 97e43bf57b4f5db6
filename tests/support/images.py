"""Container images for tests, built from local parts, and a real registry.

The registry is Debian's docker-registry (the CNCF distribution registry) on
loopback inside the test's private namespace; images are made with umoci
from busybox-static and pushed with skopeo. Hostile images are written by
hand (tarfile + an OCI layout) because no builder makes them.
"""

from __future__ import annotations

import base64
import crypt
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import httpx

from tests.support.server import free_port

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "env", "id", "pwd", "cat", "echo", "mkdir", "httpd", "sleep", "date", "wc", "ls", "kill")

# The web image's entrypoint: `serve` writes what the workload sees under
# /tmp/www and serves it on :8080; `exit N` exits with N.
START = """#!/bin/sh
case "$1" in
exit) echo "exiting with $2"; exit "$2" ;;
esac
mkdir -p /tmp/www
env | sort > /tmp/www/env
id > /tmp/www/id
pwd > /tmp/www/pwd
echo boot >> /app/boots
cat /app/boots > /tmp/www/boots
cat /etc/hostname > /tmp/www/hostname 2>/dev/null
echo "workload serving as $(id -u)"
exec httpd -f -p 8080 -h /tmp/www
"""


def run(*argv: str, **kw: object) -> str:
    done = subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    return str(done.stdout)


class Registry:
    """docker-registry on 127.0.0.1:<free port>; with ``user`` it wants htpasswd auth."""

    def __init__(self, tmp: Path, user: tuple[str, str] | None = None, tls: bool = False) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.dir = tmp / f"registry-{self.port}"
        self.dir.mkdir(parents=True)
        self.user = user
        config = [
            "version: 0.1",
            "log:\n  level: warn",
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n  delete:\n    enabled: true",
            f"http:\n  addr: {self.host}",
        ]
        if user is not None:
            hashed = crypt.crypt(user[1], crypt.mksalt(crypt.METHOD_BLOWFISH)).replace("$2b$", "$2y$", 1)
            (self.dir / "htpasswd").write_text(f"{user[0]}:{hashed}\n")
            config.append(f"auth:\n  htpasswd:\n    realm: test\n    path: {self.dir / 'htpasswd'}")
        self.ca: Path | None = None
        if tls:  # a self-signed certificate for 127.0.0.1: its own CA
            self.ca = self.dir / "ca.pem"
            run(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(self.dir / "key.pem"),
                "-out",
                str(self.ca),
            )
            config[3] += f"\n  tls:\n    certificate: {self.ca}\n    key: {self.dir / 'key.pem'}"
        (self.dir / "config.yml").write_text("\n".join(config) + "\n")
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(self.dir / "config.yml")],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "registry.log").open("wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{'https' if tls else 'http'}://{self.host}/v2/", timeout=1, verify=False)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("registry did not start: " + (self.dir / "registry.log").read_text())

    def push(self, layout: Path, tag: str, name: str, all_images: bool = False) -> str:
        """Push ``layout:tag`` as ``name`` (repo:tag); returns host/name."""
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
        if self.ca is not None:
            argv[-1] = f"--dest-cert-dir={self.ca.parent / 'certs'}"
            (self.ca.parent / "certs").mkdir(exist_ok=True)
            shutil.copy(self.ca, self.ca.parent / "certs" / "ca.crt")
        if all_images:
            argv.append("--all")
        if self.user is not None:
            argv += ["--dest-creds", f"{self.user[0]}:{self.user[1]}"]
        run(*argv, f"oci:{layout}:{tag}", f"docker://{self.host}/{name}")
        return f"{self.host}/{name}"

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.dir / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def auth_file(path: Path, registry: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    return path


def _busybox_root(root: Path) -> None:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)


def build_web(work: Path, extra_bytes: int = 0) -> Path:
    """OCI layout ``work/oci`` with tag ``web``: busybox, user app (1000) in
    WORKDIR /app, entrypoint /app/start.sh, cmd serve; a second layer deletes a
    file of the first (whiteout) and one makes /opt/data opaque."""
    layout = work / "oci"
    bundle = work / "bundle"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:web")
    run("umoci", "unpack", "--image", f"{layout}:web", str(bundle))
    root = bundle / "rootfs"
    _busybox_root(root)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\napp:x:1000:\n")
    (root / "app").mkdir()
    (root / "app/start.sh").write_text(START)
    os.chmod(root / "app/start.sh", 0o755)
    os.chown(root / "app", 1000, 1000)
    (root / "app/deleted-later").write_text("x")
    (root / "opt/data").mkdir(parents=True)
    (root / "opt/data/old").write_text("old")
    if extra_bytes:
        with open(root / "opt/big", "wb") as fh:
            fh.write(os.urandom(extra_bytes))
    run("umoci", "repack", "--image", f"{layout}:web", str(bundle))
    # layer 2: a whiteout and an opaque directory
    (root / "app/deleted-later").unlink()
    shutil.rmtree(root / "opt/data")
    (root / "opt/data").mkdir()
    (root / "opt/data/new").write_text("new")
    run("umoci", "repack", "--image", f"{layout}:web", str(bundle))
    run(
        "umoci",
        "config",
        "--image",
        f"{layout}:web",
        "--config.entrypoint",
        "/app/start.sh",
        "--config.cmd",
        "serve",
        "--config.env",
        "GREETING=image",
        "--config.env",
        "FOO=bar",
        "--config.workingdir",
        "/app",
        "--config.user",
        "app",
    )
    shutil.rmtree(bundle)
    return layout


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def build_hostile(work: Path, kind: str) -> Path:
    """A one-layer OCI layout (tag ``bad``) whose layer does ``kind``:
    dotdot, absolute, symlink (written through a symlink out of the root),
    hardlink (a hard link to a file outside)."""
    layout = work / f"hostile-{kind}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, data: bytes = b"x", **attrs: object) -> None:
            info = tarfile.TarInfo(name)
            for key, value in attrs.items():
                setattr(info, key, value)
            if info.type == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)

        add("bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755)
        if kind == "dotdot":
            add("../../../../../../tmp/metald-escaped-dotdot")
        elif kind == "absolute":
            add("/tmp/metald-escaped-absolute")
        elif kind == "symlink":
            add("out", type=tarfile.SYMTYPE, linkname="../../../../../../tmp")
            add("out/metald-escaped-symlink")
        elif kind == "hardlink":
            add("h", type=tarfile.LNKTYPE, linkname="../../../../../../etc/hostname")
        elif kind == "rooted-symlink":  # accepted: the absolute target is resolved inside the image
            add("out", type=tarfile.SYMTYPE, linkname="/tmp/metald-rooted")
            add("out/inside")
    layer, layer_size = _blob(layout, buf.getvalue())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "true"]},
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    }
    cfg, cfg_size = _blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": cfg_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
    }
    man, man_size = _blob(layout, json.dumps(manifest).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": man,
                        "size": man_size,
                        "annotations": {"org.opencontainers.image.ref.name": "bad"},
                    }
                ],
            }
        )
    )
    return layout


def manifest_of(layout: Path, tag: str) -> dict[str, object]:
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            hexd = entry["digest"].split(":", 1)[1]
            return dict(json.loads((layout / "blobs/sha256" / hexd).read_bytes()))
    raise KeyError(tag)


def add_index(layout: Path, tag: str, index_tag: str, decoy: Path) -> None:
    """Tag ``index_tag``: an image index with ``tag`` as linux/amd64 and the
    manifest of layout ``decoy`` (tag ``bad``) as linux/arm64, first."""
    amd64 = next(
        e
        for e in json.loads((layout / "index.json").read_text())["manifests"]
        if e["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    arm64 = json.loads((decoy / "index.json").read_text())["manifests"][0]
    for sub in ("blobs/sha256",):
        for blob in (decoy / sub).iterdir():
            shutil.copy(blob, layout / sub / blob.name)
    entries = []
    for entry, arch in ((arm64, "arm64"), (amd64, "amd64")):
        entries.append(
            {
                "mediaType": entry["mediaType"],
                "digest": entry["digest"],
                "size": entry["size"],
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    digest, size = _blob(layout, json.dumps(index).encode())
    top = json.loads((layout / "index.json").read_text())
    top["manifests"].append(
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": index_tag},
        }
    )
    (layout / "index.json").write_text(json.dumps(top))
