#!/usr/bin/env bash
# The second command: set everything up on a fresh Debian machine (as root) and run the whole
# test suite: the pure core, the module through Salt's loader, then a real libvirtd with real
# QEMU guests and real Salt daemons, all started by the tests themselves. Extra arguments go
# to pytest (e.g. `bash scripts/test.sh tests/unit -x`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup.sh"
cd "$here"
exec "$here/.venv/bin/python" -m pytest -ra "${@:-tests}"
