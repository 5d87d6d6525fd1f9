#!/usr/bin/env bash
# The first command: set everything up on a fresh Debian machine (as root) and run the main job,
# a live walk through vmpower with a real salt-master, salt-minion, libvirtd and QEMU guests.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VMPOWER_SALT=3008 bash "$here/scripts/setup.sh"  # the demo runs on .venv (Salt 3008) only
exec "$here/.venv/bin/python" "$here/scripts/demo.py" "$@"
