#!/usr/bin/env bash
# Show metald doing its job against a running daemon: create and boot a VM from
# the bundled image, wait for its console to reach userspace, ask its HTTP
# server for its id, print GetVmInfo, then delete it.
set -euo pipefail
METALD=${1:-metald}
SERVER=${METALD_SERVER:-http://127.0.0.1:8080}
RUN_DIR=${UNKEY_METALD_RUN_DIR:-/run/metald}
VM=${DEMO_VM_ID:-demo-$(date +%s)}
export METALD_SERVER=$SERVER

# Whatever ends the demo (an error, Ctrl-C during the boot, SIGTERM), the VM it
# made is deleted: metald finishes the create/boot under way first.
made=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$made" && "${DEMO_KEEP:-0}" != "1" ]]; then
    echo "== delete $VM"
    "$METALD" vm delete --force "$VM" >/dev/null 2>&1 || "$METALD" vm delete --force "$VM" || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq 1 100); do curl -sf "$SERVER/_/health" >/dev/null && break; sleep 0.2; done
echo "== health";  curl -s "$SERVER/_/health"; echo
echo "== ListVms over plain curl (Connect JSON)"
curl -s -H 'content-type: application/json' -d '{}' "$SERVER/metal.vmprovisioner.v1.VmService/ListVms"; echo
echo "== create and boot $VM"
made=1  # from here on the VM may exist (the create may reach metald even if this shell is interrupted)
"$METALD" vm create --id "$VM" --vcpus 1 --memory 256M --boot
echo "== waiting for the guest's userspace (console: $RUN_DIR/$VM/console.log)"
ok=""
for _ in $(seq 1 120); do
  if grep -q "METALD_GUEST_READY" "$RUN_DIR/$VM/console.log" 2>/dev/null; then ok=1; break; fi
  sleep 0.5
done
[[ -n "$ok" ]] || { echo "guest did not reach userspace"; tail -20 "$RUN_DIR/$VM/console.log" || true; exit 1; }
grep -m1 "METALD_GUEST_READY" "$RUN_DIR/$VM/console.log"
ip=$("$METALD" vm --json info "$VM" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("networkInfo",{}).get("ipAddress",""))')
if [[ -n "$ip" ]]; then
  echo "== the guest's HTTP server at $ip:8080 answers:"
  curl -s --max-time 10 "http://$ip:8080/" || echo "(no answer)"
fi
echo "== GetVmInfo"
"$METALD" vm info "$VM"
if [[ "${DEMO_KEEP:-0}" != "1" ]]; then
  echo "== delete"
  "$METALD" vm delete --force "$VM"
  made=""
fi
"$METALD" vm list
