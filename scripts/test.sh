#!/usr/bin/env bash
# The second command: set everything up on a fresh Debian machine (as root) and run the test
# suite on both tested Salt releases: the pure core, the modules through Salt's loader, a real
# libvirtd with real QEMU guests, real Salt daemons and the benchmarks' smoke run on Salt 3008
# in .venv, and everything that goes through Salt (tests/unit, tests/real, tests/daemons) again
# on Salt 3006 LTS in .venv-3006. The work runs in lanes side by side (scripts/lane.sh): each a
# pytest run with a libvirtd, a loopback and processes of its own. The exit status is 0 only if
# every lane passed; the end shows each lane's pytest summary line, the names of its failing
# tests, and one line adding up the counts.
#
# Extra arguments go to pytest and run on one release only, in the foreground, outside any
# lane: Salt 3008, or 3006 with VMPOWER_SALT=3006 (e.g. `bash scripts/test.sh tests/unit -x`,
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
# Lanes still running when this script is stopped are stopped with it: killing a lane's
# unshare(1), which ignores SIGINT and SIGTERM, makes the lane's PID 1 interrupt its pytest,
# whose fixtures stop what they started, and then the lane's namespaces end.
lane_pids=()
trap 'kill -KILL "${lane_pids[@]}" 2>/dev/null; rm -rf "$logs"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
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

passed=0 failed=0 skipped=0

record_part() {  # <label> <pytest exit status> <seconds> <log>: the summary lines of one part
  local label="$1" rc="$2" took="$3" log="$4"
  # pytest's own last line ("=== 1840 passed, 3 skipped in 37.8s ===", without the "=" under -q).
  local last
  last="$(grep -E '(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s' "$log" \
          | tail -1 | sed -E 's/^=+ //; s/ =+$//')"
  summary+=("$label: $(meaning "$rc") after $took s: ${last:-no pytest summary line}")
  local count word
  while read -r count word; do
    case "$word" in
      passed) passed=$((passed + count)) ;;
      failed|error|errors) failed=$((failed + count)) ;;
      skipped) skipped=$((skipped + count)) ;;
    esac
  done < <(grep -oE '[0-9]+ (passed|failed|errors?|skipped)' <<<"$last")
  # ... and the failing tests by name (-ra's short summary), so that the end of a long CI log
  # says which tests failed where.
  local failing
  while IFS= read -r failing; do
    summary+=("  $failing")
  done < <(grep -E '^(FAILED|ERROR) [^ ]+\.py' "$log" | cut -c1-240)
  [ "$rc" -eq 0 ] || status=1
}

run_part() {  # <label> <venv> <pytest arguments...>: in the foreground, its output as it comes
  local label="$1" venv="$2"
  shift 2
  local log="$logs/$(echo "$label" | tr -c 'a-zA-Z0-9' _).log" began=$SECONDS
  echo "=== $label: pytest $* ($("$venv/bin/python" -c 'import salt.version; print("salt", salt.version.__version__)'))"
  "$venv/bin/python" -m pytest -ra "$@" 2>&1 | tee "$log"
  record_part "$label" "${PIPESTATUS[0]}" "$((SECONDS - began))" "$log"
}

# A lane: pytest in namespaces of its own (scripts/lane.sh), with a libvirtd of its own and
# loopback to itself, so that lanes run side by side and share nothing but the machine's
# cores. Its output goes to its log, printed whole when it ends.
lane_root() { echo "${VMPOWER_LANES_DIR:-/tmp}/vpl-$1"; }

declare -A lane_args=() lane_logs=() lane_began=() lane_name=()

run_lane() {  # <name> <venv> <pytest arguments...>: started in the background
  local name="$1" venv="$2"
  shift 2
  local root
  root="$(lane_root "$name")"
  lane_args[$name]="$*"
  lane_logs[$name]="$logs/$name.log"
  # --durations: each lane's slowest setups, calls and teardowns (a module's shared daemons
  # show up as one test's setup), so that where the time goes is in every CI log.
  bash "$here/scripts/lane.sh" "$root" "$venv/bin/python" -m pytest -ra -p no:cacheprovider \
    --durations=15 --basetemp="$root/t" "$@" >"${lane_logs[$name]}" 2>&1 &
  lane_pids+=("$!")
  lane_began[$!]=$SECONDS
  lane_name[$!]=$name
}

# The lanes of the whole suite, on two releases: on each, one lane for the tests that keep the
# cores busy and two for the real-daemon tests, which mostly wait on Salt, libvirtd and their
# guests (idle in hlt: see vmpower_lab.lab). The second daemon lane takes every module the
# first does not name, so a new module is never left out. Salt-free tests run once, on the
# newest release.
daemons_first="tests/daemons/test_end_to_end.py tests/daemons/test_master_away.py \
tests/daemons/test_crash_loop.py tests/daemons/test_beacon_real.py \
tests/daemons/test_dry_run_real.py tests/daemons/test_boot_storm.py"
daemons_rest="tests/daemons$(printf ' --ignore=%s' $daemons_first)"
lanes_3008=(
  "3008-core|tests/core tests/unit tests/bench tests/sim tests/real"
  "3008-daemons-1|$daemons_first"
  "3008-daemons-2|$daemons_rest"
)
lanes_3006=(
  "3006-unit|tests/unit tests/real"
  "3006-daemons-1|$daemons_first"
  "3006-daemons-2|$daemons_rest"
)

if [ $# -gt 0 ]; then
  if [ "$salt" = 3006 ]; then
    run_part "Salt 3006" "$venv_3006" "$@"
  else
    run_part "Salt 3008" "$venv_3008" "$@"
  fi
else
  if [ "$salt" != 3006 ]; then
    for lane in "${lanes_3008[@]}"; do
      # shellcheck disable=SC2086  # the paths are words
      run_lane "${lane%%|*}" "$venv_3008" ${lane#*|}
    done
  fi
  if [ "$salt" != 3008 ]; then
    for lane in "${lanes_3006[@]}"; do
      # shellcheck disable=SC2086
      run_lane "${lane%%|*}" "$venv_3006" ${lane#*|}
    done
  fi
  echo "=== ${#lane_pids[@]} lanes side by side: ${lane_name[*]}"
  # Each lane's log, whole, as it ends.
  left=${#lane_pids[@]}
  running=("${lane_pids[@]}")
  while [ "$left" -gt 0 ]; do
    ended=""
    wait -n -p ended "${running[@]}"
    rc=$?
    if [ -z "$ended" ]; then
      [ "$rc" -eq 127 ] && break  # no lane left to wait for
      continue  # woken by a signal
    fi
    left=$((left - 1))
    still=("${running[@]}")
    running=()
    for pid in "${still[@]}"; do
      [ "$pid" = "$ended" ] || running+=("$pid")
    done
    name="${lane_name[$ended]}"
    took=$((SECONDS - lane_began[$ended]))
    echo
    echo "=== lane $name ended after $took s ($(meaning "$rc")): pytest ${lane_args[$name]}"
    cat "${lane_logs[$name]}"
    record_part "lane $name" "$rc" "$took" "${lane_logs[$name]}"
  done
fi

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
# One plain line for whoever reads only the end: every part's counts added up.
echo "tests: $passed passed, $failed failed, $skipped skipped"
exit "$status"
