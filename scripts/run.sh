#!/usr/bin/env bash
# `make run`: start metald on its embedded defaults, show it working with one
# VM (scripts/demo.sh), then keep serving in the foreground until Ctrl-C.
set -euo pipefail
METALD=$1
# metald runs in its own session: Ctrl-C reaches this script and the demo (which
# deletes its VM through metald first), then the trap stops metald.
setsid "$METALD" serve &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid' INT TERM
if ! bash "$(dirname "$0")/demo.sh" "$METALD"; then
  echo "demo failed; metald keeps running (Ctrl-C to stop)" >&2
fi
echo
echo "metald is running on http://127.0.0.1:8080 (Ctrl-C stops metald; VMs keep running)."
echo "Try: $METALD vm create --id hello --boot && $METALD vm info hello"
wait $pid
