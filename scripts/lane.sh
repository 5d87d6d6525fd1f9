#!/usr/bin/env bash
# Run a command in a test lane of its own: new mount and network namespaces in which this
# machine's libvirt directories (/etc/libvirt, /run, /var/lib/libvirt, /var/cache/libvirt,
# /var/log/libvirt) are fresh directories under ROOT, and loopback is the lane's own. So two
# lanes each start a libvirtd of their own at qemu:///system (with its own guests, pid files
# and sockets), and their Salt daemons, PostgreSQL and node_exporter never compete for a port:
# scripts/test.sh runs the two Salt releases' suites side by side this way.
#
#   bash scripts/lane.sh ROOT COMMAND [ARG...]
#
# ROOT is emptied first. As root, Linux only (unshare(1), mount(8), ip(8)). The namespaces,
# their mounts and every daemon started in them end with the lane's last process.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 ROOT COMMAND [ARG...]" >&2
  exit 2
fi

if [ "${VMPOWER_IN_LANE:-}" != "$1" ]; then
  root="$1"
  # Only this script's own leftovers are removed; a ROOT with anything else in it is refused.
  if [ -e "$root" ] && [ ! -f "$root/.vmpower-lane" ]; then
    echo "lane: $root exists and is not a vmpower test lane; refusing to empty it" >&2
    exit 2
  fi
  rm -rf "$root"
  mkdir -p "$root"/{run,etc,lib,cache,log}
  touch "$root/.vmpower-lane"
  # The lane's libvirt starts from this machine's configuration (qemu.conf and the rest).
  if [ -d /etc/libvirt ]; then
    cp -a /etc/libvirt/. "$root/etc/"
  fi
  exec env VMPOWER_IN_LANE="$root" \
    unshare --mount --net --propagation private --fork --kill-child=SIGINT -- bash "$0" "$@"
fi

# Inside the namespaces.
root="$1"
shift
ip link set lo up
mount --bind "$root/run" /run
mkdir -p /run/libvirt /run/lock
for pair in etc:/etc/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
  mkdir -p "${pair#*:}"
  mount --bind "$root/${pair%%:*}" "${pair#*:}"
done
# Two libvirtds side by side must not make the same cgroup names (a domain's id and name are
# the same in both lanes).
if ! grep -qE '^\s*cgroup_controllers' /etc/libvirt/qemu.conf 2>/dev/null; then
  echo 'cgroup_controllers = [ ]' >>/etc/libvirt/qemu.conf
fi
exec "$@"
