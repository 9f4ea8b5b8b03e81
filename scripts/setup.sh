#!/usr/bin/env bash
# Install what the msl data path (engine/transport) and `msl-bench` need on a
# fresh Debian machine. Idempotent: safe to run again.
#
#   iproute2  `ip netns`, `ip link` (two-namespace veth topology)
#   iperf3    the kernel-TCP ceiling printed beside the MSL backends
#   linux-perf (optional) profiling the data path
#   libnbd-bin, qemu-utils, fio  NBD clients for the engine/nbd tests
#             (nbdinfo, nbdcopy; qemu-io, qemu-img; fio --ioengine=nbd)
#   nbdkit    reference NBD server of `msl-bench nbd` (qemu-nbd, the other
#             one, comes with qemu-utils)
#   resource-agents, prometheus, libxml2-utils, help2man
#             ocf-tester, promtool and xmllint check dist/ (OCF agent,
#             alert rules); help2man renders msld's man page
#   openssl, python3-libnbd  TLS certificates and pipelined NBD clients
#             in the tests
#   corosync, pacemaker, pacemaker-cli-utils  the two-node cluster of
#             tools/mslctl/tests/pacemaker.rs, which drives msld through
#             the OCF agent (dist/ocf/msld); each node runs in a server
#             namespace with private mounts (/etc/corosync,
#             /var/lib/pacemaker, /run, /dev/shm ...) and its own hostname,
#             never with the host's files. Installed with their services
#             neither started nor enabled (no cluster runs on this host).
#             MSL_SETUP_CLUSTER=0 leaves them out (that test then fails,
#             saying what to install).
#
# No clang/llvm: the XDP program is hand-assembled eBPF loaded with the bpf
# syscall (engine/transport/src/xdp_prog.rs).
set -euo pipefail

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
command -v ocf-tester >/dev/null 2>&1 || need+=(resource-agents)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v xmllint >/dev/null 2>&1 || need+=(libxml2-utils)
command -v help2man >/dev/null 2>&1 || need+=(help2man)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)
if [ "${MSL_SETUP_PERF:-0}" = 1 ] && ! command -v perf >/dev/null 2>&1; then
    need+=(linux-perf)
fi
cluster=()
if [ "${MSL_SETUP_CLUSTER:-1}" != 0 ]; then
    command -v corosync >/dev/null 2>&1 || cluster+=(corosync)
    [ -x /usr/sbin/pacemakerd ] || cluster+=(pacemaker)
    command -v crm_mon >/dev/null 2>&1 || cluster+=(pacemaker-cli-utils)
    need+=("${cluster[@]}")
fi

if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: need root to install: ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # The cluster packages would start corosync and pacemaker on this host
    # (Debian's default single-node corosync.conf): policy-rc.d forbids
    # starting services during the install, and their units are disabled.
    own_policy=0
    if [ "${#cluster[@]}" -gt 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
    if [ "${#cluster[@]}" -gt 0 ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable corosync.service pacemaker.service >/dev/null 2>&1 || true
    fi
    if [ "$own_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
fi
if [ "${MSL_SETUP_CLUSTER:-1}" != 0 ]; then
    echo "setup.sh: iproute2, iperf3, the NBD clients, nbdkit, the dist/ checkers and the cluster manager present"
else
    echo "setup.sh: iproute2, iperf3, the NBD clients, nbdkit and the dist/ checkers present (cluster manager left out)"
fi
