#!/usr/bin/env bash
# Install bandsync as a systemd service on this box (or into a staging root).
#
#   scripts/install.sh                      build (cargo build --release) and install
#   scripts/install.sh --binary PATH        install a prebuilt binary (e.g. from build-arm64)
#   scripts/install.sh --uninstall          stop, disable, remove the binary and the unit
#   scripts/install.sh --uninstall --purge  ... and the config, state, logs and the user
#
# Options:
#   --binary PATH   the bandsync binary to install (default: build it)
#   --root DIR      install into the staging root DIR (an image being built, a test):
#                   paths go under DIR, no user is created, systemctl is not called
#   --prefix DIR    where the binary goes: PREFIX/bin/bandsync (default /usr/local);
#                   the unit's ExecStart follows it
#   --no-start      enable the service but do not start it now
#   --dry-run       print what would be done, change nothing
#
# What it installs:
#   PREFIX/bin/bandsync                     the binary
#   /etc/systemd/system/bandsync.service    the unit (from systemd/bandsync.service)
#   /etc/bandsync/bandsync.toml             a commented default config, only if absent
#   the `bandsync` system user, in the `audio` group
# then `systemctl daemon-reload && systemctl enable --now bandsync` when systemd runs
# (skipped with a message otherwise, e.g. in a container).
#
# Idempotent: running it again replaces what changed (and restarts the service if
# it was running), keeps the config file, never duplicates the user.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

BINARY="" ROOT="" PREFIX=/usr/local DRY=0 UNINSTALL=0 PURGE=0 START=1
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) BINARY="${2:?--binary needs a path}"; shift ;;
        --root) ROOT="${2:?--root needs a directory}"; shift ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift ;;
        --dry-run) DRY=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --no-start) START=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || { echo "install.sh: --purge goes with --uninstall" >&2; exit 2; }
case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be absolute, got $PREFIX" >&2; exit 2 ;; esac
PREFIX=${PREFIX%/}
if [ -n "$ROOT" ]; then
    case "$ROOT" in /*) ;; *) ROOT="$(pwd)/$ROOT" ;; esac
    ROOT=${ROOT%/}
fi
STAGING=0
[ -n "$ROOT" ] && STAGING=1

SERVICE=bandsync
USER_NAME=bandsync
BIN_DST="$PREFIX/bin/bandsync"
UNIT_DST=/etc/systemd/system/bandsync.service
SYSCTL_DST=/etc/sysctl.d/60-bandsync-net.conf
CONF_DIR=/etc/bandsync
CONF_DST=$CONF_DIR/bandsync.toml
STATE_DIRS=(/var/lib/bandsync /var/lib/private/bandsync /var/log/bandsync)
UNIT_SRC="$REPO/systemd/bandsync.service"
SYSCTL_SRC="$REPO/systemd/60-bandsync-net.conf"

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }
# Run a command, or only print it with --dry-run.
run() {
    if [ "$DRY" = 1 ]; then printf '[install] would run:'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
r() { printf '%s%s' "$ROOT" "$1"; }   # a path inside the (staging) root

systemd_running() { [ "$STAGING" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

if [ "$DRY" = 0 ] && [ "$STAGING" = 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo $0 $*), or use --root DIR to stage, or --dry-run"
fi
[ "$STAGING" = 1 ] && say "staging root $ROOT: no user is created and systemctl is not called"

# Replace DST by SRC atomically (a running binary can be replaced) if they differ.
# Sets CHANGED=1 when it did (or would).
CHANGED=0
put_file() {  # SRC DST MODE
    local src=$1 dst=$2 mode=$3
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        say "up to date: $dst"
        return 0
    fi
    CHANGED=1
    if [ "$DRY" = 1 ]; then say "would install $dst (mode $mode)"; return 0; fi
    mkdir -p "$(dirname "$dst")"
    local tmp
    tmp=$(mktemp "$(dirname "$dst")/.$(basename "$dst").XXXXXX")
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dst"
    say "installed $dst"
}

remove_path() {
    local p=$1
    if [ -e "$p" ] || [ -L "$p" ]; then
        run rm -rf -- "$p"
        [ "$DRY" = 1 ] || say "removed $p"
    fi
}

# ---------------------------------------------------------------- uninstall
if [ "$UNINSTALL" = 1 ]; then
    if systemd_running; then
        if systemctl list-unit-files "$SERVICE.service" >/dev/null 2>&1 && [ -e "$UNIT_DST" ]; then
            run systemctl disable --now "$SERVICE" || true
        fi
    else
        [ "$STAGING" = 1 ] || say "systemd is not running here: nothing to stop or disable"
    fi
    remove_path "$(r "$BIN_DST")"
    remove_path "$(r "$UNIT_DST")"
    remove_path "$(r "$UNIT_DST").d"
    remove_path "$(r "$SYSCTL_DST")"
    if systemd_running; then run systemctl daemon-reload; fi
    if [ "$PURGE" = 1 ]; then
        remove_path "$(r "$CONF_DIR")"
        for d in "${STATE_DIRS[@]}"; do remove_path "$(r "$d")"; done
        if [ "$STAGING" = 0 ] && id "$USER_NAME" >/dev/null 2>&1; then
            run userdel "$USER_NAME" || say "could not remove the user $USER_NAME (still in use?)"
        fi
        say "uninstalled and purged (config, state, logs, user)"
    else
        say "uninstalled; kept $CONF_DIR and /var/lib/bandsync (use --purge to remove them too)"
    fi
    exit 0
fi

# ---------------------------------------------------------------- install
[ -f "$UNIT_SRC" ] || die "missing $UNIT_SRC"

# 1. The binary.
if [ -z "$BINARY" ]; then
    BINARY="${CARGO_TARGET_DIR:-$REPO/target}/release/bandsync"
    if [ "$DRY" = 1 ]; then
        say "would run: cargo build --release --locked --bin bandsync"
    else
        command -v cargo >/dev/null || die "cargo not found: build elsewhere and pass --binary PATH (sudo often drops ~/.cargo/bin from PATH)"
        say "building: cargo build --release --locked --bin bandsync"
        cargo build --release --locked --bin bandsync
    fi
fi
if [ "$DRY" = 0 ] || [ -e "$BINARY" ]; then
    [ -f "$BINARY" ] && [ -x "$BINARY" ] || die "no executable binary at $BINARY"
    # Refuse a binary for another machine (e.g. an arm64 build on a PC), unless staging.
    if [ "$STAGING" = 0 ] && ! "$BINARY" --version >/dev/null 2>&1; then
        die "$BINARY does not run here (wrong architecture?); use --root DIR to stage it for another box"
    fi
fi
BIN_CHANGED=0
if [ -e "$BINARY" ]; then
    CHANGED=0; put_file "$BINARY" "$(r "$BIN_DST")" 0755; BIN_CHANGED=$CHANGED
else
    say "would install $(r "$BIN_DST") from $BINARY (after the build)"; BIN_CHANGED=1
fi

# 2. The unit, its ExecStart following --prefix.
tmpd=$(mktemp -d)
trap 'rm -rf "$tmpd"' EXIT
sed "s#^ExecStart=/usr/local/bin/bandsync#ExecStart=$BIN_DST#" "$UNIT_SRC" >"$tmpd/bandsync.service"
grep -q "^ExecStart=$BIN_DST " "$tmpd/bandsync.service" || die "cannot point ExecStart at $BIN_DST (unit changed?)"
CHANGED=0; put_file "$tmpd/bandsync.service" "$(r "$UNIT_DST")" 0644; UNIT_CHANGED=$CHANGED
# The kernel settings a box runs with (systemd/60-bandsync-net.conf: fast ARP re-probe,
# so a healed link rejoins the room at once), applied now when systemd runs.
CHANGED=0; put_file "$SYSCTL_SRC" "$(r "$SYSCTL_DST")" 0644
if [ "$CHANGED" = 1 ] && systemd_running && command -v sysctl >/dev/null; then
    run sysctl -q -e -p "$SYSCTL_DST" || say "warning: could not apply $SYSCTL_DST now (it applies at the next boot)"
fi

# 3. The system user (the unit runs as it), in the audio group.
if grep -q "^User=$USER_NAME\$" "$UNIT_SRC"; then
    if [ "$STAGING" = 1 ]; then
        say "staging: not creating the user '$USER_NAME'; on the box: useradd --system --user-group --groups audio --home-dir /var/lib/bandsync --no-create-home --shell /usr/sbin/nologin $USER_NAME"
    else
        if ! getent group audio >/dev/null; then run groupadd --system audio; fi
        if id "$USER_NAME" >/dev/null 2>&1; then
            if id -nG "$USER_NAME" | tr ' ' '\n' | grep -qx audio; then
                say "user $USER_NAME exists (in group audio)"
            else
                run usermod -a -G audio "$USER_NAME"
            fi
        else
            run useradd --system --user-group --groups audio --home-dir /var/lib/bandsync \
                --no-create-home --shell /usr/sbin/nologin --comment "bandsync metronome daemon" "$USER_NAME"
            [ "$DRY" = 1 ] || say "created system user $USER_NAME (groups: $(id -nG "$USER_NAME"))"
        fi
    fi
fi

# 4. A commented default config, only if there is none. Readable by the service's
# group only (it may hold the control PIN).
cat >"$tmpd/bandsync.toml" <<'EOF'
# /etc/bandsync/bandsync.toml: bandsync's settings (TOML). Every key is optional and
# commented out here. The value shown is the built-in default, except where the
# comment says "example" (the default is then said in words).
# Command-line flags (see `bandsync run --help`) override this file. Unknown keys and
# out-of-range values are errors that name the key. After a change:
#   sudo systemctl restart bandsync

# Human name of this box, shown to phones and in `bandsync peers`.
# Default: the hostname. Example:
# name = "stage-left"

# Boxes with the same room name and room key play together.
# room = "default"
# File holding the room key. Default: "room-key" in the state dir, generated on first
# start (print it with `bandsync room-key`, copy it to the room's other boxes):
# room_key_file = "/var/lib/bandsync/room-key"

# Where the node id, certificate, room key and session live. Under systemd this is
# $STATE_DIRECTORY (/var/lib/bandsync); other paths are read-only for the service.
# state_dir = "/var/lib/bandsync"

# Board profile: a name from the hw/ profiles (rpi-headphones, rpi-i2s-dac,
# usb-class-compliant, x86-mini-pc) or the path of a .toml profile. It sets audio
# device, buffer_frames, sample_rate and latency_offset_ms; keys set here win.
# Default: detected from the board and its sound cards. Example:
# hw = "rpi-i2s-dac"

# Output: "auto" (default device, or a silent sink with a warning when there is none),
# "null" (silent sink), "default", or a device id from `bandsync devices`.
# audio = "auto"
# Period size in frames (32-4096) and sample rate in Hz.
# buffer_frames = 256
# sample_rate = 48000
# How long after the DAC the speaker sounds, in ms (-500 to 500): from the hw profile
# or a calibration (hw/README.md).
# latency_offset_ms = 0.0
# Click volume, 0.0-1.0.
# volume = 0.8

# Initial timeline of a box alone (a box that joins a room adopts the room's).
# tempo = 120        # BPM, 20-400
# meter = 4          # beats per bar, 1-16
# play = false       # start the transport at once
# quantum = "bar"    # changes land on the next "bar" or "beat"

# Leadership: among live boxes the highest (pinned, priority, id) leads.
# priority = 0

# Network. QUIC for the room mesh, HTTP for phones, /health and /metrics.
# quic = "0.0.0.0:47810"
# http = "0.0.0.0:8080"
# Interfaces for mDNS and QUIC. Default: all. Example:
# interface = ["eth0", "wlan0"]

# PIN phones must give to change tempo or transport (following the beat never
# needs it). Default: none. Example:
# control_pin = "1234"

# Mirror the session to an upstream Redis. Default: none. Example:
# redis = "redis://redis.example:6379/0"

# One JSON line per click (the measurement contract). Under systemd only
# /var/log/bandsync is writable. Default: none. Example:
# click_log = "/var/log/bandsync/clicks.jsonl"
EOF
if [ -e "$(r "$CONF_DST")" ]; then
    say "kept existing $(r "$CONF_DST")"
else
    put_file "$tmpd/bandsync.toml" "$(r "$CONF_DST")" 0644
    if [ "$STAGING" = 0 ] && { [ "$DRY" = 1 ] || getent group "$USER_NAME" >/dev/null; }; then
        run chgrp "$USER_NAME" "$CONF_DST"
        run chmod 0640 "$CONF_DST"
    fi
fi

# 5. systemd.
if systemd_running; then
    if [ "$UNIT_CHANGED" = 1 ]; then run systemctl daemon-reload; fi
    was_active=0
    systemctl is-active --quiet "$SERVICE" && was_active=1
    if [ "$START" = 1 ]; then
        run systemctl enable --now "$SERVICE"
        if [ "$was_active" = 1 ] && { [ "$BIN_CHANGED" = 1 ] || [ "$UNIT_CHANGED" = 1 ]; }; then
            run systemctl restart "$SERVICE"
        fi
        if [ "$DRY" = 0 ]; then
            sleep 1
            systemctl --no-pager --lines=5 status "$SERVICE" || say "the service is not running: journalctl -u $SERVICE"
        fi
    else
        run systemctl enable "$SERVICE"
    fi
elif [ "$STAGING" = 1 ]; then
    say "staging: on the box run: systemctl daemon-reload && systemctl enable --now $SERVICE"
else
    say "systemd is not running here (a container?): not enabling or starting the service."
    say "on a systemd box: systemctl daemon-reload && systemctl enable --now $SERVICE"
fi
[ "$DRY" = 1 ] && say "dry run: nothing was changed"
say "done"
