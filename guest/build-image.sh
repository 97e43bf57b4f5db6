#!/usr/bin/env bash
# Build metald's bundled guest image into OUTDIR:
#   vmlinuz            Debian linux-image-cloud-amd64 kernel (downloaded, never installed)
#   initramfs.cpio.gz  busybox-static + virtio/ACPI-button modules + guest/init as /init
#   rootfs.ext4        small read-only ext4 root drive (/dev/vda), with a marker file
#   cmdline            default kernel arguments (one line)
#   manifest.json      kernel version, sources and sha256 of each file; written last
#
# Usage: bash guest/build-image.sh OUTDIR
# Idempotent: the kernel .deb is cached in OUTDIR/.cache and checked against
# apt's SHA256; every output is built under a temporary name and moved into
# place, and manifest.json (removed first, written last) marks a complete image.
# Needs: apt-get/apt-cache, dpkg-deb, depmod (kmod), cpio, gzip, mkfs.ext4
# (e2fsprogs), python3, and busybox-static (fetched with apt-get download if
# it is not installed). Run as root so /dev/console can be created in the cpio.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUTDIR=$1
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
CACHE="$OUTDIR/.cache"
mkdir -p "$CACHE"

KERNEL_META=${METALD_KERNEL_PACKAGE:-linux-image-cloud-amd64}
# virtio_mmio/net/blk for the microvm devices; button+evdev so the ACPI power
# button (QMP system_powerdown) reaches busybox acpid. Dependencies are added
# from modules.dep.
WANTED_MODULES=(virtio_mmio virtio_net virtio_blk button evdev)
CMDLINE_DEFAULT="console=ttyS0 reboot=t panic=-1 quiet"
EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
ROOTFS_SIZE=${METALD_ROOTFS_SIZE:-8M}
ROOTFS_UUID=6d657461-6c64-4000-8000-726f6f746673

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-get apt-cache dpkg-deb cpio gzip mkfs.ext4 python3 sha256sum gcc; do
    command -v "$tool" >/dev/null || die "$tool not found (run: make deps)"
done
DEPMOD=$(command -v depmod || echo /sbin/depmod)
[[ -x $DEPMOD ]] || die "depmod not found (install kmod: make deps)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/metald-image.XXXXXX")
cleanup() {
    rm -rf "$WORK"
    rm -f "$OUTDIR"/.tmp.* 2>/dev/null || true
}
trap cleanup EXIT

# --- apt helpers ----------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        APT_UPDATED=1
    fi
}

# pkg_field PACKAGE FIELD -> field of the candidate version's record
pkg_field() {
    apt-cache show --no-all-versions "$1" 2>/dev/null | awk -v f="$2:" '$1 == f { print $2; exit }'
}

# fetch_deb PACKAGE -> prints path of a verified .deb in $CACHE
fetch_deb() {
    local pkg=$1 ver sha fname path
    ver=$(pkg_field "$pkg" Version)
    if [[ -z $ver ]]; then
        apt_update_once
        ver=$(pkg_field "$pkg" Version)
    fi
    [[ -n $ver ]] || die "apt knows no package $pkg"
    sha=$(pkg_field "$pkg" SHA256)
    fname=$(pkg_field "$pkg" Filename)
    path="$CACHE/$(basename "$fname")"
    if [[ -f $path ]] && echo "$sha  $path" | sha256sum -c --status; then
        log "using cached $(basename "$path")"
    else
        log "apt-get download $pkg=$ver"
        rm -f "$CACHE/${pkg}_"*.deb
        (cd "$WORK" && apt-get -q -o APT::Sandbox::User=root download "$pkg=$ver" >&2)
        mv "$WORK/$(basename "$fname")" "$path" 2>/dev/null ||
            mv "$WORK/${pkg}_"*.deb "$path"
        if [[ -n $sha ]]; then
            echo "$sha  $path" | sha256sum -c --status || die "sha256 mismatch for $path"
        fi
    fi
    echo "$path"
}

# --- kernel -----------------------------------------------------------------
if [[ -z $(pkg_field "$KERNEL_META" Version) ]]; then apt_update_once; fi
KERNEL_PKG=$(apt-cache depends --no-recommends --no-suggests "$KERNEL_META" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
[[ -n $KERNEL_PKG ]] || die "cannot resolve the kernel package $KERNEL_META depends on"
KERNEL_DEB=$(fetch_deb "$KERNEL_PKG")
KERNEL_PKG_VERSION=$(dpkg-deb -f "$KERNEL_DEB" Version)
log "kernel package $KERNEL_PKG $KERNEL_PKG_VERSION"

mkdir -p "$WORK/kernel"
dpkg-deb -x "$KERNEL_DEB" "$WORK/kernel"
mapfile -t KVERS < <(ls "$WORK/kernel/lib/modules")
[[ ${#KVERS[@]} -eq 1 ]] || die "expected one kernel version in $KERNEL_DEB, got: ${KVERS[*]}"
KVER=${KVERS[0]}
VMLINUZ_SRC="$WORK/kernel/boot/vmlinuz-$KVER"
[[ -f $VMLINUZ_SRC ]] || die "no $VMLINUZ_SRC in $KERNEL_DEB"
MODDIR="$WORK/kernel/lib/modules/$KVER"
# The package ships no modules.dep (made at install time): make it here.
"$DEPMOD" -b "$WORK/kernel" "$KVER"

# --- module load order from modules.dep ---------------------------------------
declare -A MOD_PATH=() MOD_DEPS=() SEEN=()
while IFS= read -r line; do
    file=${line%%:*}
    name=$(basename "$file")
    name=${name%.ko*}
    MOD_PATH[$name]=$file
    MOD_DEPS[$name]=${line#*:}
done <"$MODDIR/modules.dep"

ORDER=()
visit() {
    local name=$1 dep dname
    [[ -n ${SEEN[$name]:-} ]] && return 0
    SEEN[$name]=1
    [[ -n ${MOD_PATH[$name]:-} ]] || {
        grep -q "/$name.ko" "$MODDIR/modules.builtin" && return 0
        die "module $name not found in $KVER"
    }
    for dep in ${MOD_DEPS[$name]}; do
        dname=$(basename "$dep")
        visit "${dname%.ko*}"
    done
    ORDER+=("${MOD_PATH[$name]}")
}
for m in "${WANTED_MODULES[@]}"; do visit "$m"; done
log "modules: ${ORDER[*]##*/}"

# --- busybox ------------------------------------------------------------------
BUSYBOX=""
BUSYBOX_VERSION=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || true)
if [[ -n $BUSYBOX_VERSION ]]; then
    for cand in $(dpkg -L busybox-static | grep -E '/s?bin/busybox$'); do
        [[ -x $cand ]] && { BUSYBOX=$cand; break; }
    done
fi
if [[ -z $BUSYBOX ]]; then
    BB_DEB=$(fetch_deb busybox-static)
    BUSYBOX_VERSION=$(dpkg-deb -f "$BB_DEB" Version)
    mkdir -p "$WORK/bb"
    dpkg-deb -x "$BB_DEB" "$WORK/bb"
    BUSYBOX=$(find "$WORK/bb" -name busybox -type f -perm -u+x | head -n1)
fi
[[ -n $BUSYBOX && -x $BUSYBOX ]] || die "no busybox-static binary"
if command -v file >/dev/null && ! file -L "$BUSYBOX" | grep -q 'statically linked'; then
    die "$BUSYBOX is not statically linked"
fi
log "busybox $BUSYBOX_VERSION ($BUSYBOX)"

# --- initramfs ----------------------------------------------------------------
ROOT="$WORK/initramfs"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,mnt/root,etc/acpi/PWRF,www,var/run,var/log}
mkdir -p "$ROOT/lib/modules/$KVER"
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
install -m 0755 "$HERE/init" "$ROOT/init"
# metald-agent: takes a new identity after a snapshot restore (see guest/agent.c)
gcc -static -Os -s -Wall -Wextra -o "$ROOT/bin/metald-agent" "$HERE/agent.c" ||
    die "cannot build metald-agent (static libc from libc6-dev needed)"
: >"$ROOT/etc/modules.order"
for rel in "${ORDER[@]}"; do
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$rel")"
    install -m 0644 "$MODDIR/$rel" "$ROOT/lib/modules/$KVER/$rel"
    echo "$KVER/$rel" >>"$ROOT/etc/modules.order"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [[ -f $MODDIR/$f ]] && install -m 0644 "$MODDIR/$f" "$ROOT/lib/modules/$KVER/$f"
done
"$DEPMOD" -b "$ROOT" "$KVER"
# busybox acpid runs /etc/acpi/PWRF/00000080 for the power button (KEY_POWER).
printf '#!/bin/sh\nexec poweroff\n' >"$ROOT/etc/acpi/PWRF/00000080"
chmod 0755 "$ROOT/etc/acpi/PWRF/00000080"
printf 'root:x:0:0:root:/:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
echo "metald-guest kernel=$KVER" >"$ROOT/etc/metald-release"
# The kernel opens /dev/console for /init before devtmpfs is mounted.
if ! mknod -m 0600 "$ROOT/dev/console" c 5 1 2>/dev/null; then
    log "warning: cannot mknod /dev/console (not root?): init output before devtmpfs is lost"
fi
find "$ROOT" -exec touch -h -d "@$EPOCH" {} +
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$WORK/initramfs.cpio.gz"

# --- rootfs -----------------------------------------------------------------
RFS="$WORK/rootfs"
mkdir -p "$RFS/etc"
echo "metald bundled rootfs (kernel $KVER)" >"$RFS/metald-rootfs"
echo "metald-guest" >"$RFS/etc/hostname"
find "$RFS" -exec touch -h -d "@$EPOCH" {} +
E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -L metald-root -U "$ROOTFS_UUID" \
    -E "root_owner=0:0,hash_seed=$ROOTFS_UUID" -d "$RFS" "$WORK/rootfs.ext4" "$ROOTFS_SIZE" >/dev/null

# --- cmdline ------------------------------------------------------------------
echo "$CMDLINE_DEFAULT" >"$WORK/cmdline"
install -m 0644 "$VMLINUZ_SRC" "$WORK/vmlinuz"

# --- move into place ----------------------------------------------------------
rm -f "$OUTDIR/manifest.json"
for f in vmlinuz initramfs.cpio.gz rootfs.ext4 cmdline; do
    cp "$WORK/$f" "$OUTDIR/.tmp.$f"
    chmod 0644 "$OUTDIR/.tmp.$f"
    mv -f "$OUTDIR/.tmp.$f" "$OUTDIR/$f"
done

KVER="$KVER" KERNEL_PKG="$KERNEL_PKG" KERNEL_PKG_VERSION="$KERNEL_PKG_VERSION" \
BUSYBOX_VERSION="$BUSYBOX_VERSION" MODULES="${ORDER[*]}" OUTDIR="$OUTDIR" \
    python3 - >"$OUTDIR/.tmp.manifest.json" <<'EOF'
import hashlib, json, os
out = os.environ["OUTDIR"]
files = {}
for name in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4", "cmdline"):
    p = os.path.join(out, name)
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    files[name] = {"sha256": h.hexdigest(), "size": os.path.getsize(p)}
with open(os.path.join(out, "cmdline")) as fh:
    cmdline = fh.read().strip()
manifest = {
    "format": 1,
    "kernel_version": os.environ["KVER"],
    "kernel_package": os.environ["KERNEL_PKG"],
    "kernel_package_version": os.environ["KERNEL_PKG_VERSION"],
    "busybox_version": os.environ["BUSYBOX_VERSION"],
    "modules": [os.path.basename(m).removesuffix(".ko") for m in os.environ["MODULES"].split()],
    "cmdline": cmdline,
    "root_device": "/dev/vda",
    "guest_http_port": 8080,
    "files": files,
}
print(json.dumps(manifest, indent=2, sort_keys=True))
EOF
mv -f "$OUTDIR/.tmp.manifest.json" "$OUTDIR/manifest.json"
log "image ready in $OUTDIR (kernel $KVER)"
