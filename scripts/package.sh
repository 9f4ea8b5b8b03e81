#!/usr/bin/env bash
# Build the Debian package `msl` (target/debian/msl_<version>_<arch>.deb):
# release binaries of msld and mslctl, the systemd unit, man pages and
# completions generated from the command-line definitions, example
# configs, notify.sh, logrotate, the OCF agent, the Grafana dashboard and
# the Prometheus alert rules. Idempotent; run from anywhere.
#
#   scripts/package.sh            build the .deb
#   scripts/package.sh --test     build it, install it here, run msld, mslctl
#                                 and man from the package, then purge it
#
# Needs cargo-deb (installed from crates.io at a pinned version if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
t0=$(date +%s)

if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

echo "== build (release)"
cargo build --release -p msl-daemon --bin msld -p mslctl --bin mslctl

echo "== man pages and completions"
# Under target/release/ so that cargo-deb finds it in the target directory.
out="${CARGO_TARGET_DIR:-target}/release/package"
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
cargo run --release -q -p mslctl --features gen-docs --bin mslctl-gen-docs -- "$out/gen"
mv "$out"/gen/man/*.8 "$out/man/"
mv "$out"/gen/completions/* "$out/completions/"
rm -rf "$out/gen"
gzip -9n "$out"/man/*.8
cp dist/msld@.service "$out/msld@.service"

echo "== package"
# --no-strip: the release profile already dropped debug info and keeps
# the symbol table (function names in panics and perf).
deb=$(cargo deb -p mslctl --no-build --no-strip | tail -n 1)
echo "package.sh: $deb ($(du -h "$deb" | cut -f1)) in $(($(date +%s) - t0)) s"

if [ "${1:-}" = "--test" ]; then
    echo "== install test"
    if [ "$(dpkg-query -W -f='${db:Status-Status}' msl 2>/dev/null)" = installed ]; then
        echo "package.sh: msl is already installed here; not touching it" >&2
        exit 1
    fi
    dpkg -i "$deb"
    trap 'dpkg --purge msl >/dev/null' EXIT
    test -x /usr/bin/msld && test -x /usr/bin/mslctl
    /usr/bin/msld --version
    /usr/bin/mslctl --version
    man -w mslctl msld mslctl-promote
    test -f /usr/share/bash-completion/completions/mslctl
    test -f /usr/share/bash-completion/completions/msld
    test -f /lib/systemd/system/msld@.service
    grep -q '^ExecStart=/usr/bin/msld ' /lib/systemd/system/msld@.service
    test -x /etc/msl/notify.sh
    test -x /usr/lib/ocf/resource.d/msl/msld
    # No daemon runs: mslctl must say so and exit 1 (not hang, not crash).
    rc=0
    /usr/bin/mslctl --socket /nonexistent/msld.sock status 2>/dev/null || rc=$?
    test "$rc" = 1
    dpkg --purge msl
    trap - EXIT
    test ! -e /usr/bin/msld && test ! -e /etc/msl/notify.sh
    echo "package.sh: installed, ran and removed $deb in $(($(date +%s) - t0)) s total"
fi
