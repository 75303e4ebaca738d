#!/usr/bin/env bash
# Check systemd/bandsync.service with `systemd-analyze verify`; exit non-zero on any
# error or warning it prints.
#
#   scripts/verify-unit.sh [--unit FILE] [--binary PATH] [--no-install] [--security]
#
# `systemd-analyze verify` insists that ExecStart's program exists and is executable.
# The unit starts /usr/local/bin/bandsync; when that is not installed (a CI machine,
# a build box) the check runs on a temporary copy of the unit whose ExecStart points
# at --binary PATH (default: target/release/bandsync or target/debug/bandsync when
# built, else a stub script in the temporary directory). Nothing else in the copy
# changes, and nothing is installed or enabled.
#
# It installs Debian's `systemd` package when systemd-analyze is missing (as root,
# unless --no-install). It needs no running systemd (works in containers).
# --security also prints `systemd-analyze security --offline=true` (informative only).
set -euo pipefail
cd "$(dirname "$0")/.."

UNIT=systemd/bandsync.service
BINARY=""
INSTALL=1
SECURITY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --unit) UNIT="${2:?--unit needs a file}"; shift ;;
        --binary) BINARY="${2:?--binary needs a path}"; shift ;;
        --no-install) INSTALL=0 ;;
        --security) SECURITY=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "verify-unit: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -f "$UNIT" ] || { echo "verify-unit: no unit file $UNIT" >&2; exit 2; }

if ! command -v systemd-analyze >/dev/null; then
    if [ "$INSTALL" = 1 ]; then
        echo "verify-unit: installing Debian's systemd package (for systemd-analyze)" >&2
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends systemd >/dev/null
    fi
    command -v systemd-analyze >/dev/null || { echo "verify-unit: systemd-analyze not found (apt-get install systemd)" >&2; exit 2; }
fi

exec_path=$(sed -n 's/^ExecStart=[-@:+!]*\([^ ]*\).*/\1/p' "$UNIT" | head -n1)
[ -n "$exec_path" ] || { echo "verify-unit: $UNIT has no ExecStart=" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
name=$(basename "$UNIT")
check="$tmp/$name"
if [ -z "$BINARY" ] && [ -x "$exec_path" ]; then
    cp "$UNIT" "$check"
    echo "verify-unit: ExecStart program $exec_path is installed; verifying the unit as is" >&2
else
    if [ -z "$BINARY" ]; then
        for b in target/release/bandsync target/debug/bandsync; do
            if [ -x "$b" ]; then BINARY=$b; break; fi
        done
    fi
    if [ -z "$BINARY" ]; then
        BINARY="$tmp/bandsync-stub"
        printf '#!/bin/sh\nexit 0\n' >"$BINARY"
        chmod +x "$BINARY"
    fi
    BINARY=$(readlink -f "$BINARY")
    [ -x "$BINARY" ] || { echo "verify-unit: $BINARY is not executable" >&2; exit 2; }
    # Only the program path of ExecStart changes.
    sed "s#^\(ExecStart=[-@:+!]*\)$exec_path#\1$BINARY#" "$UNIT" >"$check"
    echo "verify-unit: $exec_path is not installed; verifying a copy with ExecStart=$BINARY" >&2
fi

# verify prints warnings (unknown or misspelt directives, bad values, a missing
# program) without always failing: any output at all counts as a failure.
out=$(cd "$tmp" && SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "./$name" 2>&1) && rc=0 || rc=$?
if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    echo "verify-unit: FAIL: systemd-analyze verify $UNIT (exit $rc, $(printf '%s' "$out" | grep -c . ) line(s) of output)" >&2
    exit 1
fi
echo "verify-unit: OK: systemd-analyze verify $UNIT is clean ($(systemd-analyze --version | head -n1))"

if [ "$SECURITY" = 1 ]; then
    (cd "$tmp" && systemd-analyze security --offline=true --no-pager "./$name" 2>&1 | tail -n 25) || true
fi
