#!/usr/bin/env bash
# Install everything vmpower needs on a fresh Debian machine, as root, with no prompt:
# Debian packages for libvirt and QEMU, then two virtual environments (Salt 3008 and Salt 3006
# LTS) with libvirt-python and the test tools. Safe to run again: every step is skipped when
# already done.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VMPOWER_VENV:-$here/.venv}"

# prometheus: for promtool, which checks and unit-tests the alerting rules in monitoring/.
debs=(libvirt-dev pkg-config libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      qemu-system-x86 procps prometheus-node-exporter prometheus)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# PostgreSQL server binaries for the tests of the PostgreSQL store, which initdb and run a
# server of their own as the postgres user; Debian keeps them in /usr/lib/postgresql/<v>/bin.
# The package's default cluster is not wanted: none is created (so none is started).
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null; then
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/vmpower-no-main-cluster.conf
  missing+=(postgresql)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Only promtool is wanted from the prometheus package, not a Prometheus server: its postinst
  # enables and starts prometheus.service under systemd. A unit masked by the administrator
  # (not by deb-systemd-helper) stays masked through the postinst, which then does not start
  # it; afterwards it is unmasked and left disabled. Without systemd (a container) nothing is
  # started either: invoke-rc.d cannot tell the runlevel, finds no start link and declines.
  masked=()
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ] \
      && systemctl mask prometheus.service >/dev/null 2>&1; then
    masked+=(prometheus.service)
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  for unit in "${masked[@]}"; do
    systemctl unmask "$unit" >/dev/null 2>&1 || true
    systemctl disable "$unit" >/dev/null 2>&1 || true
  done
fi

# Two virtual environments, one per tested Salt release, each with vmpower installed editable
# and the same test tools: .venv (Salt 3008, the whole suite) and .venv-3006 (the 3006 LTS:
# the unit and real-daemon tests). VMPOWER_VENV / VMPOWER_VENV_3006 move them;
# VMPOWER_SALT=3008 makes only the first.
make_venv() {  # <venv> <salt requirements file>
  local venv="$1" salt_req="$here/$2"
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtual environment $venv"
    python3 -m venv "$venv"
  fi
  local stamp="$venv/.vmpower-deps"
  if [ ! -f "$stamp" ] || [ "$here/setup.cfg" -nt "$stamp" ] || [ "$here/requirements-dev.txt" -nt "$stamp" ] \
      || [ "$salt_req" -nt "$stamp" ]; then
    echo "setup: installing Python packages into $venv ($(grep -m1 '^salt==' "$salt_req"))"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -r "$here/requirements-dev.txt" -r "$salt_req"
    "$venv/bin/pip" install -q -e "$here"
    touch "$stamp"
  fi
}
make_venv "$venv" requirements-salt3008.txt
if [ "${VMPOWER_SALT:-both}" != 3008 ]; then
  make_venv "${VMPOWER_VENV_3006:-$here/.venv-3006}" requirements-salt3006.txt
fi
