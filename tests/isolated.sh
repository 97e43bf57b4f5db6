#!/usr/bin/env bash
# Run a command in a private network and mount namespace, so that bridges,
# namespaces, devices, nftables rules and sysctl files made by tests never
# touch the host. /run/netns, /run/metald and /etc/sysctl.d are private tmpfs.
set -euo pipefail
if [[ "${METALD_ISOLATED:-}" == "1" ]]; then exec "$@"; fi
# fd 9 keeps the host's network namespace reachable (bind-mounted at
# /run/metald/host-netns inside) for the one test that needs a package registry.
exec 9</proc/self/ns/net
exec unshare --net --mount --propagation private --fork -- bash -c '
  set -e
  mkdir -p /run/netns /run/metald /etc/sysctl.d
  mount -t tmpfs -o mode=755 metald-netns /run/netns
  mount --make-shared /run/netns 2>/dev/null || true
  mount -t tmpfs -o mode=755 metald-run /run/metald
  mount -t tmpfs -o mode=755 metald-sysctl /etc/sysctl.d
  touch /run/metald/host-netns && mount --bind /proc/self/fd/9 /run/metald/host-netns
  exec 9<&-
  ip link set lo up
  export METALD_ISOLATED=1
  exec "$@"
' isolated "$@"
