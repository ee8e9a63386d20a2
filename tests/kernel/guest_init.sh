#!/bin/bash
# The kernel stage, guest side (started by tests/kernel/stage.py through virtme-ng).
# Runs as root inside the VM: Debian's kernel, the host's filesystem over 9p (read-only,
# except the result directory $1). Loads the kernel's WireGuard, then runs tests/kernel/ with
# the project's own pytest and leaves its exit code in $1/rc and its output in $1/pytest.log.
set -u
result=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
echo "wgnest-kernel-guest: booted, kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8

fail() {
    echo "wgnest-kernel-guest: $*" >&2
    echo 1 >"$result/rc"
    exit 1
}

modprobe -a wireguard tun veth || fail "modprobe wireguard tun veth failed"
[ -d /sys/module/wireguard ] || fail "the wireguard module is not loaded"
mkdir -p /dev/net /var/run/wireguard /run/netns
[ -c /dev/net/tun ] || mknod /dev/net/tun c 10 200 || fail "cannot create /dev/net/tun"

export WGNEST_KERNEL_GUEST=1
# wg-quick falls back to wireguard-go only when /sys/module/wireguard is missing and the
# userspace implementation exists; name one that does not, so a fallback is an error.
export WG_QUICK_USERSPACE_IMPLEMENTATION=wgnest-kernel-stage-forbids-userspace
export PYTHONDONTWRITEBYTECODE=1           # the root is read-only; stage.py compiled it all
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1    # hypothesis' plugin alone costs seconds here

args=()
if [ -s "$result/pytest-args" ]; then
    mapfile -t args <"$result/pytest-args"
fi
cd "$repo" || fail "cannot cd to $repo"
echo "wgnest-kernel-guest: modules loaded; running pytest at uptime $(cut -d' ' -f1 /proc/uptime) s"
start=$(date +%s)
.venv/bin/pytest -p no:cacheprovider --durations=0 tests/kernel "${args[@]}" 2>&1 | tee "$result/pytest.log"
rc=${PIPESTATUS[0]}
echo "wgnest-kernel-guest: pytest exit code $rc after $(($(date +%s) - start)) s"
echo "$rc" >"$result/rc"
exit "$rc"
