#!/usr/bin/env bash
# The whole suite as `make test` runs it: two pytest processes in parallel, each
# in its own private network and mount namespace (tests/isolated.sh), so tests
# that build bridges, namespaces and nftables rules never see each other's:
#   A: everything but real-VM tests;  B: tests that boot real guests (-m vm).
# Prints both logs, then one closing line over both.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
mkdir -p build/test
rm -f build/test/*.xml build/test/*.log
tests/isolated.sh "$PYTEST" -q -p no:cacheprovider -m "not vm" --junitxml=build/test/a.xml "$@" tests \
  >build/test/a.log 2>&1 &
a=$!
# real-VM tests get one retry: TCG boots on 2 shared cores make a few of them timing-sensitive;
# a retried test is reported as "R" in the log, so a flake stays visible
tests/isolated.sh "$PYTEST" -q -p no:cacheprovider -m vm --reruns 1 --junitxml=build/test/b.xml "$@" tests \
  >build/test/b.log 2>&1 &
b=$!
wait $a; rc_a=$?
wait $b; rc_b=$?
echo "=== group A (no real VMs), exit $rc_a"; cat build/test/a.log
echo "=== group B (real VMs), exit $rc_b"; cat build/test/b.log
.venv/bin/python - <<'PY'
import xml.etree.ElementTree as ET
tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for name in ("a", "b"):
    try:
        root = ET.parse(f"build/test/{name}.xml").getroot()
    except (OSError, ET.ParseError):
        continue
    suites = root.iter("testsuite")
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
print(f"{passed} passed, {tot['failures'] + tot['errors']} failed, {tot['skipped']} skipped")
PY
# pytest exit 5 means "no tests collected" for a group: not a failure by itself.
for rc in $rc_a $rc_b; do
  if [[ $rc -ne 0 && $rc -ne 5 ]]; then exit 1; fi
done
[[ $rc_a -eq 5 && $rc_b -eq 5 ]] && exit 1
exit 0
