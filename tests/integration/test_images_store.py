"""Pulling, checking, converting and caching images against a real registry
(docker-registry on loopback in the test's private namespace); no VM boots."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from metald.config import Settings
from metald.core.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from metald.images.store import ImageStore
from tests.support.images import Registry, add_index, auth_file, build_hostile, build_web, manifest_of
from tests.support.server import free_port, make_settings

pytestmark = pytest.mark.xdist_group("images")


@pytest.fixture(scope="module")
def web_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_web(tmp_path_factory.mktemp("web"))


@pytest.fixture
def registry(tmp_path: Path, require_isolated: None) -> Iterator[Registry]:
    reg = Registry(tmp_path)
    yield reg
    reg.stop()


def _settings(tmp_path: Path, registry: Registry | None, **kw: object) -> Settings:
    insecure = registry.host if registry is not None else ""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return make_settings(tmp_path, image_cache_dir=tmp_path / "cache", insecure_registries=insecure, **kw)


def debugfs(image: Path, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, text=True).stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_convert_and_cache(tmp_path: Path, registry: Registry, web_layout: Path) -> None:
    ref = registry.push(web_layout, "web", "team/web:1")
    store = ImageStore(_settings(tmp_path, registry))

    async def twenty() -> list[str]:
        images = await asyncio.gather(*(store.resolve(ref) for _ in range(20)))
        return [i.digest for i in images]

    digests = asyncio.run(twenty())
    assert len(set(digests)) == 1
    (image,) = store.list()
    assert image.refs == [ref]
    # one conversion: one image directory, no work directory left
    assert [p.name for p in (tmp_path / "cache/images").iterdir()] == [image.digest.split(":")[1]]
    assert list((tmp_path / "cache/tmp").iterdir()) == []
    # the layers in order: whiteout and opaque directory applied, owners kept, init in place
    assert "deleted-later" not in debugfs(image.path, "ls /app")
    listing = debugfs(image.path, "ls /opt/data")
    assert "new" in listing and "old" not in listing
    assert "1000" in debugfs(image.path, "stat /app").split("User:")[1].split()[0]
    assert "metald-init" not in debugfs(image.path, "ls /bin")
    assert "init" in debugfs(image.path, "ls /.metald")
    config = debugfs(image.path, "cat /.metald/config")
    assert "entrypoint\t/app/start.sh" in config and "user\tapp" in config and "env\tFOO=bar" in config
    assert image.path.stat().st_mode & 0o777 == 0o444
    # by digest, the same cached image without a pull
    by_digest = asyncio.run(store.resolve(f"{registry.host}/team/web@{image.digest}"))
    assert by_digest.path == image.path


def test_bad_references(tmp_path: Path, registry: Registry, web_layout: Path) -> None:
    registry.push(web_layout, "web", "team/web:1")
    store = ImageStore(_settings(tmp_path, registry))
    with pytest.raises(NotFound):
        asyncio.run(store.resolve(f"{registry.host}/team/web:nope"))
    with pytest.raises(NotFound):
        asyncio.run(store.resolve(f"{registry.host}/team/absent:1"))
    with pytest.raises(Unavailable):
        asyncio.run(store.resolve(f"127.0.0.1:{free_port()}/team/web:1"))
    # not listed as insecure: HTTPS is required and the plain-HTTP registry fails
    strict = ImageStore(_settings(tmp_path / "strict", None))
    with pytest.raises(Unavailable):
        asyncio.run(strict.resolve(f"{registry.host}/team/web:1"))
    manifest = manifest_of(web_layout, "web")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(NotFound):
        asyncio.run(store.resolve(f"{registry.host}/team/web@{wrong}"))
    assert store.list() == []
    assert manifest


def test_corrupted_blob_is_refused(tmp_path: Path, registry: Registry, web_layout: Path) -> None:
    ref = registry.push(web_layout, "web", "team/web:1")
    layer = manifest_of(web_layout, "web")["layers"][0]["digest"]  # type: ignore[index]
    blob = registry.blob_path(str(layer))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    store = ImageStore(_settings(tmp_path, registry))
    with pytest.raises(InvalidArgument, match="digest"):
        asyncio.run(store.resolve(ref))
    assert store.list() == []
    assert list((tmp_path / "cache/tmp").iterdir()) == []


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_hostile_images_are_refused(tmp_path: Path, registry: Registry, kind: str) -> None:
    layout = build_hostile(tmp_path, kind)
    ref = registry.push(layout, "bad", f"hostile/{kind}:1")
    store = ImageStore(_settings(tmp_path, registry))
    with pytest.raises(InvalidArgument) as err:
        asyncio.run(store.resolve(ref))
    assert {"dotdot": "escapes", "absolute": "absolute", "symlink": "symlink", "hardlink": "hard link"}[kind] in str(
        err.value
    )
    assert not list(Path("/tmp").glob("metald-escaped-*"))
    assert store.list() == []
    assert list((tmp_path / "cache/tmp").iterdir()) == []


def test_size_limit(tmp_path: Path, registry: Registry) -> None:
    layout = build_web(tmp_path / "big", extra_bytes=3 << 20)
    ref = registry.push(layout, "web", "team/big:1")
    store = ImageStore(_settings(tmp_path, registry, image_max_bytes=2 << 20))
    with pytest.raises(InvalidArgument, match="UNKEY_METALD_IMAGE_MAX_BYTES"):
        asyncio.run(store.resolve(ref))
    assert store.list() == []


def test_auth_file(tmp_path: Path, require_isolated: None, web_layout: Path) -> None:
    reg = Registry(tmp_path, user=("alice", "s3cret"))
    try:
        ref = reg.push(web_layout, "web", "private/web:1")
        anonymous = ImageStore(_settings(tmp_path / "anon", reg))
        with pytest.raises(PermissionDenied):
            asyncio.run(anonymous.resolve(ref))
        creds = auth_file(tmp_path / "auth.json", reg.host, "alice", "s3cret")
        store = ImageStore(_settings(tmp_path / "auth", reg, registry_auth_file=creds))
        assert asyncio.run(store.resolve(ref)).digest.startswith("sha256:")
    finally:
        reg.stop()


def test_lru_eviction_spares_images_in_use(tmp_path: Path, registry: Registry) -> None:
    refs = []
    for i in range(3):
        layout = build_web(tmp_path / f"img{i}", extra_bytes=(i + 1) << 10)
        refs.append(registry.push(layout, "web", f"team/img{i}:1"))
    store = ImageStore(_settings(tmp_path, registry))
    first = asyncio.run(store.resolve(refs[0]))
    # a VM uses the first image: its run directory links to it
    vm_dir = tmp_path / "run" / "vm-a"
    vm_dir.mkdir(parents=True)
    (vm_dir / "rootfs-base.ext4").symlink_to(first.path)
    second = asyncio.run(store.resolve(refs[1]))
    store.settings = store.settings.model_copy(update={"image_cache_bytes": first.disk_bytes + second.disk_bytes})
    third = asyncio.run(store.resolve(refs[2]))
    kept = {i.digest for i in store.list()}
    assert kept == {first.digest, third.digest}  # the second was least recently used and not in use
    with pytest.raises(Exception, match="used by VMs: vm-a"):
        store.remove(refs[0])
    (vm_dir / "rootfs-base.ext4").unlink()
    store.remove(refs[0])
    assert {i.digest for i in store.list()} == {third.digest}


def test_interrupted_work_is_never_used(tmp_path: Path, registry: Registry, web_layout: Path) -> None:
    ref = registry.push(web_layout, "web", "team/web:1")
    settings = _settings(tmp_path, registry)
    # a pull cut short by the timeout: the tools are killed, nothing is kept
    hasty = ImageStore(settings.model_copy(update={"image_pull_timeout_seconds": 0.05}))
    with pytest.raises(Unavailable, match="UNKEY_METALD_IMAGE_PULL_TIMEOUT_SECONDS"):
        asyncio.run(hasty.resolve(ref))
    assert hasty.list() == [] and list((tmp_path / "cache/tmp").iterdir()) == []
    # what a crash leaves: a work directory, and an image directory without its metadata
    digest = asyncio.run(ImageStore(settings).resolve(ref)).digest
    image_dir = tmp_path / "cache/images" / digest.split(":")[1]
    (image_dir / "meta.json").unlink()
    (image_dir / "rootfs.ext4").write_bytes(b"half")
    (tmp_path / "cache/tmp/abandoned").mkdir()
    store = ImageStore(settings)
    image = asyncio.run(store.resolve(ref))
    assert image.digest == digest and image.path.stat().st_size > 1 << 20
    assert list((tmp_path / "cache/tmp").iterdir()) == []


def test_absolute_symlinks_stay_inside_the_image(tmp_path: Path, registry: Registry) -> None:
    """umoci resolves an absolute symlink inside the root: accepted, and the entry
    written through it lands in the image, never on the host."""
    ref = registry.push(build_hostile(tmp_path, "rooted-symlink"), "bad", "rooted/link:1")
    image = asyncio.run(ImageStore(_settings(tmp_path, registry)).resolve(ref))
    assert "inside" in debugfs(image.path, "ls /tmp/metald-rooted")
    assert not Path("/tmp/metald-rooted").exists()


def test_multi_arch_index_picks_linux_amd64(tmp_path: Path, registry: Registry) -> None:
    layout = build_web(tmp_path / "multi")
    add_index(layout, "web", "multi", build_hostile(tmp_path, "dotdot"))  # arm64: would be refused
    ref = registry.push(layout, "multi", "team/multi:1", all_images=True)
    image = asyncio.run(ImageStore(_settings(tmp_path, registry)).resolve(ref))
    assert "start.sh" in debugfs(image.path, "ls /app")


def test_private_ca(tmp_path: Path, require_isolated: None, web_layout: Path) -> None:
    reg = Registry(tmp_path, tls=True)
    try:
        ref = reg.push(web_layout, "web", "team/web:1")
        with pytest.raises(Unavailable, match="x509|certificate"):
            asyncio.run(ImageStore(_settings(tmp_path / "system-cas", None)).resolve(ref))
        store = ImageStore(_settings(tmp_path / "own-ca", None, registry_ca_file=reg.ca))
        assert asyncio.run(store.resolve(ref)).digest.startswith("sha256:")
    finally:
        reg.stop()
