#!/usr/bin/env bash
# Installs everything ShuntFlow and its tests need on Debian 12, as root: the Debian packages of the
# real servers and clients, a venv in .venv, and the package itself (which compiles the C library).
# Safe to run again; it only installs what is missing, then reinstalls the package.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(iproute2 iputils-ping procps python3 python3-venv python3-dev gcc make
          redis-server redis-tools memcached libmemcached-tools nginx-light wrk sockperf iperf3
          apache2-utils nftables strace systemd podman runc musl-tools
          clang libbpf-dev libbpf1 libssl-dev libclang-rt-14-dev)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (network namespaces and apt need it)" >&2
    exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    # Keep the packaged servers from starting system-wide instances: ShuntFlow starts its own.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q '.[dev]'
echo "setup: ready ($(.venv/bin/shuntflow --version))"
