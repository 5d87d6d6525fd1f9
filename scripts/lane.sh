#!/usr/bin/env bash
# Run a command in a test lane of its own: new PID, mount and network namespaces in which this
# machine's libvirt directories (/etc/libvirt, /run, /var/lib/libvirt, /var/cache/libvirt,
# /var/log/libvirt) are fresh directories under ROOT, and loopback is the lane's own. So two
# lanes each start a libvirtd of their own at qemu:///system (with its own guests, pid files
# and sockets), and their Salt daemons, PostgreSQL and node_exporter never compete for a port:
# scripts/test.sh runs the two Salt releases' suites side by side this way.
#
#   bash scripts/lane.sh ROOT COMMAND [ARG...]
#
# ROOT is emptied first. As root, Linux only (unshare(1), mount(8), ip(8)). When the command
# ends, or the lane is stopped (this script's process killed: the lane's PID 1 passes an
# interrupt on to the command, so that pytest's fixtures stop what they started), every process
# left in the lane is killed by the kernel with its PID namespace: a lane never leaves a daemon
# behind.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 ROOT COMMAND [ARG...]" >&2
  exit 2
fi

if [ "${VMPOWER_IN_LANE:-}" != "$1" ]; then
  root="$1"
  # Nothing of an earlier lane on ROOT can still run (its PID namespace died with it).
  rm -rf "$root" || { echo "lane: cannot empty $root" >&2; exit 2; }
  mkdir -p "$root"/{run,etc,lib,cache,log}
  # The lane's libvirt starts from this machine's configuration (qemu.conf and the rest).
  if [ -d /etc/libvirt ]; then
    cp -a /etc/libvirt/. "$root/etc/"
  fi
  # unshare(1) ignores SIGINT and SIGTERM while it waits for the lane, and its child would
  # inherit that: env puts them back, so the lane can be interrupted. When unshare itself dies
  # (scripts/test.sh kills it to stop a lane), the lane's PID 1 gets SIGINT.
  exec env VMPOWER_IN_LANE="$root" \
    unshare --pid --mount-proc --mount --net --propagation private --fork \
      --kill-child=SIGINT -- env --default-signal=INT,TERM bash "$0" "$@"
fi

# Inside the namespaces, as their PID 1.
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
set -m  # the command in a job of its own, so that it hears SIGINT (a plain background job ignores it)
"$@" &
child=$!
trap 'kill -INT "$child" 2>/dev/null' INT TERM
while true; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break  # else a signal woke the wait: wait on
done
exit "$status"
