#!/usr/bin/env bash
# The second command: set everything up on a fresh Debian machine (as root) and run the test
# suite on both tested Salt releases: the whole suite (the pure core, the modules through Salt's
# loader, a real libvirtd with real QEMU guests, real Salt daemons, the benchmarks' smoke run) on
# Salt 3008 in .venv, then the unit tests and the real-libvirt and real-daemon tests (tests/unit,
# tests/real, tests/daemons) on Salt 3006 LTS in .venv-3006. Both parts always run; the exit
# status is 0 only if both passed, and the end shows each part's pytest summary line and the
# names of its failing tests.
#
# Extra arguments go to pytest and run on one release only: Salt 3008, or 3006 with
# VMPOWER_SALT=3006 (e.g. `bash scripts/test.sh tests/unit -x`,
# `VMPOWER_SALT=3006 bash scripts/test.sh tests/daemons/test_harness.py`).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
salt="${VMPOWER_SALT:-both}"
if [ $# -gt 0 ] && [ "$salt" = both ]; then
  salt=3008
fi
VMPOWER_SALT="$salt" bash "$here/scripts/setup.sh" || exit $?

venv_3008="${VMPOWER_VENV:-$here/.venv}"
venv_3006="${VMPOWER_VENV_3006:-$here/.venv-3006}"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
summary=()
status=0

# What pytest's exit status means (pytest.ExitCode); 5, no test collected, fails a run too:
# a suite that finds nothing has lost its tests.
meaning() {
  case "$1" in
    0) echo "passed" ;; 1) echo "tests failed" ;; 2) echo "interrupted" ;;
    3) echo "pytest internal error" ;; 4) echo "pytest usage error" ;; 5) echo "no tests collected" ;;
    *) echo "exit status $1" ;;
  esac
}

run_part() {  # <label> <venv> <pytest arguments...>
  local label="$1" venv="$2"
  shift 2
  local log="$logs/$(echo "$label" | tr -c 'a-zA-Z0-9' _).log" began=$SECONDS
  echo "=== $label: pytest $* ($("$venv/bin/python" -c 'import salt.version; print("salt", salt.version.__version__)'))"
  "$venv/bin/python" -m pytest -ra "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  # pytest's own last line ("=== 1840 passed, 3 skipped in 37.8s ===", without the "=" under -q).
  local last
  last="$(grep -E '(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s' "$log" \
          | tail -1 | sed -E 's/^=+ //; s/ =+$//')"
  summary+=("$label: $(meaning "$rc") after $((SECONDS - began)) s: ${last:-no pytest summary line}")
  # ... and the failing tests by name (-ra's short summary), so that the end of a long CI log
  # says which tests failed on which release.
  local failing
  while IFS= read -r failing; do
    summary+=("  $failing")
  done < <(grep -E '^(FAILED|ERROR) [^ ]+\.py' "$log" | cut -c1-240)
  [ "$rc" -eq 0 ] || status=1
}

if [ $# -gt 0 ]; then
  if [ "$salt" = 3006 ]; then
    run_part "Salt 3006" "$venv_3006" "$@"
  else
    run_part "Salt 3008" "$venv_3008" "$@"
  fi
else
  if [ "$salt" != 3006 ]; then
    run_part "Salt 3008, whole suite" "$venv_3008" tests
  fi
  if [ "$salt" != 3008 ]; then
    run_part "Salt 3006, unit + real + daemons" "$venv_3006" tests/unit tests/real tests/daemons
  fi
fi

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
exit "$status"
