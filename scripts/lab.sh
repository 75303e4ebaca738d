#!/usr/bin/env bash
# bandsync lab: N nodes, each in its own network namespace, on one Linux bridge (real mDNS,
# real QUIC), for a chosen time; then a summary of their click logs. Cleans up after itself.
# Run `scripts/lab.sh --help` for the options. Needs root and iproute2.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX="bsl$$"              # every name this run creates starts with it
SW_NS="${PREFIX}-sw"        # the namespace holding the bridge
BRIDGE="${PREFIX}br"        # interface names are <= 15 characters
SUBNET_PREFIX="10.77.0"     # node i is 10.77.0.(10+i)/24; nothing else is ever used
QUIC_PORT=47810
ROOM=lab

usage() {
    cat <<EOF
Usage: scripts/lab.sh [OPTIONS]
       scripts/lab.sh --cleanup-stale

Runs N bandsync nodes, each in its own network namespace (${PREFIX%%[0-9]*}<PID>-n<i>) on one
bridge in a namespace of its own (${PREFIX%%[0-9]*}<PID>-sw), with real mDNS and QUIC on
${SUBNET_PREFIX}.0/24 (node i = ${SUBNET_PREFIX}.(10+i)), for a given time. Then it stops them,
prints scripts/lab_summary.py's report of their click logs (also saved to OUT/summary.txt)
and deletes everything it created. The root namespace is never touched. Must run as root.

Options:
  -n N                  number of nodes (default 3; 1..200)
  -t SECONDS            run length, from the start of node 1 (default 30)
  --warmup S            summary: skip clicks before the first click + S seconds (default 10)
  --node-warmup S       summary: also skip each node's first S seconds of clicks (default 0)
  --bin PATH            the daemon (default target/release/bandsync, built with
                        \`cargo build --release\` when missing)
  --build               run \`cargo build --release\` first even if the binary exists
  --out DIR             output folder, kept (default lab-out/<timestamp>)
  --clock SPEC          BANDSYNC_TEST_CLOCK of the next node, in order: first --clock is
                        node 1, the second node 2, ... "none" = undistorted. Nodes without
                        one get the default spread: node i gets offset_ms -250, +250, -125,
                        +125, -62.5, ... and skew_ppm +100, -100, +50, -50, +25, ...
  --no-clock            nodes without a --clock run undistorted (instead of the spread)
  --impair SPEC         BANDSYNC_TEST_IMPAIR for every node, e.g.
                        "delay_ms=3,jitter_ms=20,loss=0.02"; node i gets ",seed=<S+i>"
                        appended (S = the seed in SPEC, else 0)
  --kill-leader-at T    kill -9 the current leader T seconds into the run (leader from the
                        nodes' <state>/status.json; else the highest --priority, then the
                        highest node id)
  --join-at T           start the last node only at T seconds (a box joining a running room)
  --partition-at T      cut the links of --partition-nodes (default: the last node) off the
                        bridge at T seconds (link down in the switch namespace)
  --heal-at T           bring those links back up at T seconds
  --partition-nodes L   comma-separated node numbers on the cut-off side, e.g. "3" or "2,3"
  --repeat-heal K       do K partition/heal cycles: cycle k (0-based) cuts at
                        --partition-at + k*S and heals at --heal-at + k*S (S = --heal-every);
                        -t is stretched to the last heal + 4 s when shorter
  --heal-every S        period of the cycles (default: 2 x (heal-at - partition-at))
  --wrong-key-node I    node I gets a different room key
  --at "T:I:ARGS"       at T seconds run \`bandsync ARGS\` as a CLI against node I, inside node
                        I's namespace, with --room, --room-key-file and --node <node I's QUIC
                        address> appended (e.g. --at "12:2:tempo 90"); repeatable. Output in
                        OUT/cli/<k>.txt, events cli_start/cli (rc, ms, first output line)
  --kill-at "T:I"       kill -9 node I at T seconds (repeatable)
  --restart-at "T:I"    start node I again at T seconds, same state dir, same click log
                        (appended), same flags (repeatable)
  --together            start every node at the same moment (default: node 1, then the
                        others 1 s later)
  --node-args "I:ARGS"  extra \`bandsync run\` arguments for node I only (repeatable)
  --bare-nodes L        comma-separated nodes started without the lab's --tempo, --meter
                        and --play (a fresh box with its defaults)
  --status-log          sample every node's <state>/status.json every 50 ms into
                        OUT/status.jsonl (on by default with partitions, --at, --kill-at,
                        --restart-at, --stranger-at; the heal report needs it)
  --stranger-at T       at T seconds start scripts/stranger.py in a namespace of its own on
                        the bridge (${SUBNET_PREFIX}.3): QUIC handshake flood, HTTP slowloris,
                        PIN guessing over /ws and spoofed mDNS adverts against node
                        --stranger-target (default 1) for --stranger-for S seconds
                        (default 25); needs python3 with aioquic (pip install aioquic)
  --stranger-for S      how long the stranger attacks
  --stranger-args "A"   extra scripts/stranger.py arguments (e.g. "--quic-hold 5")
  --stranger-target I   the node attacked
  --link-app-at T       at T seconds start a real Ableton Link app (scripts/link_app.py: the
                        aalink wheel, at 90 BPM, quantum = --meter) in a namespace of its
                        own on the bridge (${SUBNET_PREFIX}.4); it samples its beat, tempo
                        and transport every 20 ms into OUT/link_app.jsonl until the end, and
                        the summary compares its beats with every node's clicks (needs
                        python3 with aalink: pip install aalink)
  --link-app-tempo-at "T:BPM"
                        the Link app sets its own tempo T seconds after the run's start
                        (repeatable; the room overrules it unless link_control)
  --redis               run redis-server on a host of its own on the bridge
                        (${SUBNET_PREFIX}.2, in namespace ${PREFIX%%[0-9]*}<PID>-rd) and give every node
                        --redis redis://${SUBNET_PREFIX}.2:6379/0
  --redis-stop-at T     (with --redis) stop redis-server at T seconds, change the tempo
                        (+7 BPM, through node 1) while it is down, start it again
                        --redis-stop-for S later (default 10); then poll the room's hash
                        until it shows the new tempo and the leader's epoch, and report
                        how long after the restart that took
  --tempo BPM           initial tempo (default 120)
  --meter N             beats per bar (default 4)
  --priority-list LIST  per-node priorities, e.g. "0,0,5" (node 1 first; missing = none)
  --extra "ARGS"        extra \`bandsync run\` arguments for every node (split on spaces;
                        repeatable)
  --log FILTER          BANDSYNC_LOG of the nodes (default info)
  --kernel-defaults     leave the nodes' namespaces at the kernel's defaults instead of the
                        settings an installed box has (systemd/60-bandsync-net.conf)
  --ipv6                keep IPv6 on in the namespaces (default: off, so only
                        ${SUBNET_PREFIX}.0/24 addresses exist)
  --cleanup-stale       delete leftover ${PREFIX%%[0-9]*}<PID>-* namespaces of runs that are no
                        longer alive (killing their nodes), then exit
  -h, --help            this text

Output folder: room.key (room-wrong.key), events.jsonl (lab events with CLOCK_MONOTONIC
times: start, join, kill, exit, stop, partition, heal, cli, restart, stranger_*),
status.jsonl (with --status-log), cli/, stranger.{log,json}, lab.txt (the run's settings), summary.txt, and per
node node<i>/{node.log, clicks.jsonl, state/}.

Exit status: 0 when the run and the summary completed (whatever the figures); 1 on usage or
setup errors; 2 when the summary could not read any click log; 3 when a node exited on its
own (crash, bad flag) before the end; 130/143 when interrupted.
EOF
}

die() { echo "lab.sh: $*" >&2; exit 1; }
log() { printf '[%6.2fs] %s\n' "$(elapsed_s)" "$*"; }

# ------------------------------------------------------------------------------ numbers

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_int() { [[ $1 =~ ^-?[0-9]+$ ]]; }
is_secs() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }
# seconds (decimal) -> integer microseconds
secs_to_us() { awk -v s="$1" 'BEGIN { printf "%d", s * 1000000 }'; }
now_us() { local r=$EPOCHREALTIME; echo "${r//[.,]/}"; }
T0_US=""
elapsed_us() { if [ -n "$T0_US" ]; then echo $(( $(now_us) - T0_US )); else echo 0; fi; }
elapsed_s() { local e; e=$(elapsed_us); awk -v e="$e" 'BEGIN { printf "%.2f", e / 1e6 }'; }

# ------------------------------------------------------------------------------ options

N=3
DURATION=30
WARMUP=10
NODE_WARMUP=0
BIN=""
BUILD=0
OUT=""
CLOCKS=()
NO_CLOCK=0
IMPAIR=""
KILL_AT=""
REDIS=0 REDIS_STOP_AT="" REDIS_STOP_FOR=10
JOIN_AT=""
PART_AT=""
HEAL_AT=""
PART_NODES=""
WRONG_KEY=""
TEMPO=120
METER=4
PRIO_LIST=""
EXTRA=()
LOG_FILTER=info
BOX_SYSCTL=1
IPV6=0
CLEANUP_STALE=0
REPEAT_HEAL=1 HEAL_EVERY=""
AT_SPECS=() KILL_SPECS=() RESTART_SPECS=() NODE_ARGS_SPECS=()
TOGETHER=0 BARE_NODES="" STATUS_LOG=0
STRANGER_AT="" STRANGER_FOR=25 STRANGER_TARGET=1 STRANGER_ARGS=""
LINK_APP_AT="" LINK_APP_TEMPO=()
ORIG_ARGS=("$@")

need_arg() { [ $# -ge 2 ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -n) need_arg "$@"; N=$2; shift 2 ;;
        -t) need_arg "$@"; DURATION=$2; shift 2 ;;
        --warmup) need_arg "$@"; WARMUP=$2; shift 2 ;;
        --node-warmup) need_arg "$@"; NODE_WARMUP=$2; shift 2 ;;
        --bin) need_arg "$@"; BIN=$2; shift 2 ;;
        --build) BUILD=1; shift ;;
        --out) need_arg "$@"; OUT=$2; shift 2 ;;
        --clock) need_arg "$@"; CLOCKS+=("$2"); shift 2 ;;
        --no-clock) NO_CLOCK=1; shift ;;
        --impair) need_arg "$@"; IMPAIR=$2; shift 2 ;;
        --kill-leader-at) need_arg "$@"; KILL_AT=$2; shift 2 ;;
        --redis) REDIS=1; shift ;;
        --redis-stop-at) need_arg "$@"; REDIS_STOP_AT=$2; shift 2 ;;
        --redis-stop-for) need_arg "$@"; REDIS_STOP_FOR=$2; shift 2 ;;
        --join-at) need_arg "$@"; JOIN_AT=$2; shift 2 ;;
        --partition-at) need_arg "$@"; PART_AT=$2; shift 2 ;;
        --heal-at) need_arg "$@"; HEAL_AT=$2; shift 2 ;;
        --partition-nodes) need_arg "$@"; PART_NODES=$2; shift 2 ;;
        --wrong-key-node) need_arg "$@"; WRONG_KEY=$2; shift 2 ;;
        --tempo) need_arg "$@"; TEMPO=$2; shift 2 ;;
        --meter) need_arg "$@"; METER=$2; shift 2 ;;
        --priority-list) need_arg "$@"; PRIO_LIST=$2; shift 2 ;;
        --extra) need_arg "$@"; read -ra _x <<<"$2"; EXTRA+=("${_x[@]}"); shift 2 ;;
        --log) need_arg "$@"; LOG_FILTER=$2; shift 2 ;;
        --kernel-defaults) BOX_SYSCTL=0; shift ;;
        --ipv6) IPV6=1; shift ;;
        --cleanup-stale) CLEANUP_STALE=1; shift ;;
        --repeat-heal) need_arg "$@"; REPEAT_HEAL=$2; shift 2 ;;
        --heal-every) need_arg "$@"; HEAL_EVERY=$2; shift 2 ;;
        --at) need_arg "$@"; AT_SPECS+=("$2"); shift 2 ;;
        --kill-at) need_arg "$@"; KILL_SPECS+=("$2"); shift 2 ;;
        --restart-at) need_arg "$@"; RESTART_SPECS+=("$2"); shift 2 ;;
        --together) TOGETHER=1; shift ;;
        --node-args) need_arg "$@"; NODE_ARGS_SPECS+=("$2"); shift 2 ;;
        --bare-nodes) need_arg "$@"; BARE_NODES=$2; shift 2 ;;
        --status-log) STATUS_LOG=1; shift ;;
        --stranger-at) need_arg "$@"; STRANGER_AT=$2; shift 2 ;;
        --stranger-for) need_arg "$@"; STRANGER_FOR=$2; shift 2 ;;
        --stranger-target) need_arg "$@"; STRANGER_TARGET=$2; shift 2 ;;
        --stranger-args) need_arg "$@"; STRANGER_ARGS=$2; shift 2 ;;
        --link-app-at) need_arg "$@"; LINK_APP_AT=$2; shift 2 ;;
        --link-app-tempo-at) need_arg "$@"; LINK_APP_TEMPO+=("$2"); shift 2 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces), e.g. sudo $0 ${ORIG_ARGS[*]}"
command -v ip >/dev/null || die "needs iproute2 (ip)"
ip netns list >/dev/null 2>&1 || die "\`ip netns\` does not work here"

# ------------------------------------------------------------------------------ stale runs

# A namespace is ours if it is named bsl<PID>-sw or bsl<PID>-n<i>; it is stale when that PID
# is no longer a running lab.sh.
run_alive() {
    local pid=$1
    [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'lab\.sh'
}
cleanup_stale() {
    local ns pid found=0 p
    while read -r ns _; do
        [[ $ns =~ ^bsl([0-9]+)-(sw|n[0-9]+|rd|st)$ ]] || continue
        pid=${BASH_REMATCH[1]}
        if [ "$pid" != "$$" ] && run_alive "$pid"; then
            echo "keeping $ns: lab run $pid is still alive"
            continue
        fi
        found=1
        for p in $(ip netns pids "$ns" 2>/dev/null); do
            echo "killing pid $p ($(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-60)) in $ns"
            kill -9 "$p" 2>/dev/null
        done
        if ip netns del "$ns"; then echo "deleted namespace $ns"; else echo "could not delete $ns" >&2; fi
    done < <(ip netns list 2>/dev/null)
    [ $found -eq 1 ] || echo "no stale bsl* namespaces"
}
if [ $CLEANUP_STALE -eq 1 ]; then
    cleanup_stale
    exit 0
fi

# ------------------------------------------------------------------------------ validation

is_uint "$N" && [ "$N" -ge 1 ] && [ "$N" -le 200 ] || die "-n must be 1..200, got '$N'"
is_secs "$DURATION" || die "-t must be a number of seconds, got '$DURATION'"
is_secs "$WARMUP" || die "--warmup must be a number of seconds, got '$WARMUP'"
is_secs "$NODE_WARMUP" || die "--node-warmup must be a number of seconds, got '$NODE_WARMUP'"
is_uint "$METER" || die "--meter must be an integer, got '$METER'"
[[ $TEMPO =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--tempo must be a number (BPM), got '$TEMPO'"
DURATION_US=$(secs_to_us "$DURATION")
[ "$DURATION_US" -gt 0 ] || die "-t must be > 0"
KILL_US=""
REDIS_STOP_US="" REDIS_START_US=""
if [ -n "$REDIS_STOP_AT" ]; then
    [ "$REDIS" = 1 ] || die "--redis-stop-at needs --redis"
    is_secs "$REDIS_STOP_AT" || die "--redis-stop-at must be a number of seconds, got '$REDIS_STOP_AT'"
    is_secs "$REDIS_STOP_FOR" || die "--redis-stop-for must be a number of seconds, got '$REDIS_STOP_FOR'"
    REDIS_STOP_US=$(secs_to_us "$REDIS_STOP_AT")
    REDIS_START_US=$(( REDIS_STOP_US + $(secs_to_us "$REDIS_STOP_FOR") ))
    [ "$REDIS_START_US" -lt "$DURATION_US" ] || die "redis must be back before the end (-t $DURATION)"
fi
if [ "$REDIS" = 1 ]; then
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
        || die "--redis needs redis-server and redis-cli (apt-get install -y redis-server)"
fi

if [ -n "$KILL_AT" ]; then
    is_secs "$KILL_AT" || die "--kill-leader-at must be a number of seconds, got '$KILL_AT'"
    KILL_US=$(secs_to_us "$KILL_AT")
    [ "$KILL_US" -lt "$DURATION_US" ] || die "--kill-leader-at $KILL_AT is not before the end (-t $DURATION)"
fi
JOIN_US=""
PART_US=""; HEAL_US=""
if [ -n "$PART_AT" ]; then
    is_secs "$PART_AT" || die "--partition-at must be a number of seconds, got '$PART_AT'"
    PART_US=$(secs_to_us "$PART_AT")
    [ -n "$PART_NODES" ] || PART_NODES=$N
    for p in ${PART_NODES//,/ }; do
        [[ "$p" =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le "$N" ] || die "--partition-nodes: '$p' is not a node number (1..$N)"
    done
    if [ -n "$HEAL_AT" ]; then
        is_secs "$HEAL_AT" || die "--heal-at must be a number of seconds, got '$HEAL_AT'"
        HEAL_US=$(secs_to_us "$HEAL_AT")
        [ "$HEAL_US" -gt "$PART_US" ] || die "--heal-at must come after --partition-at"
    fi
fi
PART_LIST=() HEAL_LIST=()   # µs into the run, one per cycle
is_uint "$REPEAT_HEAL" && [ "$REPEAT_HEAL" -ge 1 ] || die "--repeat-heal must be >= 1, got '$REPEAT_HEAL'"
if [ "$REPEAT_HEAL" -gt 1 ] || [ -n "$HEAL_EVERY" ]; then
    [ -n "$PART_US" ] && [ -n "$HEAL_US" ] || die "--repeat-heal/--heal-every need --partition-at and --heal-at"
fi
if [ -n "$PART_US" ]; then
    if [ -n "$HEAL_EVERY" ]; then
        is_secs "$HEAL_EVERY" || die "--heal-every must be a number of seconds, got '$HEAL_EVERY'"
        EVERY_US=$(secs_to_us "$HEAL_EVERY")
    elif [ -n "$HEAL_US" ]; then
        EVERY_US=$(( 2 * (HEAL_US - PART_US) ))
    else
        EVERY_US=0
    fi
    [ -z "$HEAL_US" ] || [ "$REPEAT_HEAL" -eq 1 ] || [ "$EVERY_US" -gt $(( HEAL_US - PART_US )) ] \
        || die "--heal-every must be longer than the partition (heal-at - partition-at)"
    for ((k = 0; k < REPEAT_HEAL; k++)); do
        PART_LIST+=($(( PART_US + k * EVERY_US )))
        [ -n "$HEAL_US" ] && HEAL_LIST+=($(( HEAL_US + k * EVERY_US )))
    done
    if [ -n "$HEAL_US" ]; then
        last=${HEAL_LIST[$((REPEAT_HEAL - 1))]}
        if [ "$DURATION_US" -lt $(( last + 4000000 )) ]; then
            DURATION_US=$(( last + 4000000 ))
            DURATION=$(awk -v u="$DURATION_US" 'BEGIN { printf "%g", u / 1e6 }')
            echo "lab.sh: -t stretched to ${DURATION}s (the last heal + 4 s)" >&2
        fi
    fi
fi
is_node_no() { is_uint "$1" && [ "$1" -ge 1 ] && [ "$1" -le "$N" ]; }
AT_US=() AT_NODE=() AT_ARGS=() AT_DONE=()
for spec in "${AT_SPECS[@]}"; do
    [[ $spec =~ ^([0-9]+([.][0-9]+)?):([0-9]+):(.+)$ ]] || die "--at must look like 'T:I:ARGS', got '$spec'"
    m=("${BASH_REMATCH[@]}")
    is_node_no "${m[3]}" || die "--at: node '${m[3]}' is not 1..$N"
    AT_US+=("$(secs_to_us "${m[1]}")"); AT_NODE+=("${m[3]}")
    AT_ARGS+=("${m[4]}"); AT_DONE+=(0)
done
# --kill-at / --restart-at: "T:I" -> parallel arrays of (µs, node, what)
ACT_US=() ACT_NODE=() ACT_WHAT=() ACT_DONE=()
add_act() {
    [[ $2 =~ ^([0-9]+([.][0-9]+)?):([0-9]+)$ ]] || die "--$1-at must look like 'T:I', got '$2'"
    local m=("${BASH_REMATCH[@]}")
    is_node_no "${m[3]}" || die "--$1-at: node '${m[3]}' is not 1..$N"
    ACT_US+=("$(secs_to_us "${m[1]}")"); ACT_NODE+=("${m[3]}")
    ACT_WHAT+=("$1"); ACT_DONE+=(0)
}
for spec in "${KILL_SPECS[@]}"; do add_act kill "$spec"; done
for spec in "${RESTART_SPECS[@]}"; do add_act restart "$spec"; done
declare -A NODE_ARGS=()
for spec in "${NODE_ARGS_SPECS[@]}"; do
    [[ $spec =~ ^([0-9]+):(.*)$ ]] || die "--node-args must look like 'I:ARGS', got '$spec'"
    m=("${BASH_REMATCH[@]}")
    is_node_no "${m[1]}" || die "--node-args: node '${m[1]}' is not 1..$N"
    NODE_ARGS[${m[1]}]="${NODE_ARGS[${m[1]}]:-} ${m[2]}"
done
for p in ${BARE_NODES//,/ }; do is_node_no "$p" || die "--bare-nodes: '$p' is not 1..$N"; done
is_bare() { [[ ,$BARE_NODES, == *,$1,* ]]; }
STRANGER_US="" STRANGER_END_US=""
if [ -n "$STRANGER_AT" ]; then
    is_secs "$STRANGER_AT" || die "--stranger-at must be a number of seconds, got '$STRANGER_AT'"
    is_secs "$STRANGER_FOR" || die "--stranger-for must be a number of seconds, got '$STRANGER_FOR'"
    is_node_no "$STRANGER_TARGET" || die "--stranger-target must be 1..$N"
    STRANGER_US=$(secs_to_us "$STRANGER_AT")
    STRANGER_END_US=$(( STRANGER_US + $(secs_to_us "$STRANGER_FOR") ))
    [ "$STRANGER_END_US" -lt "$DURATION_US" ] || die "the stranger must be done before the end (-t $DURATION)"
fi
LINK_APP_US="" LINK_APP_ARGS=()
if [ -n "$LINK_APP_AT" ]; then
    is_secs "$LINK_APP_AT" || die "--link-app-at must be a number of seconds, got '$LINK_APP_AT'"
    LINK_APP_US=$(secs_to_us "$LINK_APP_AT")
    [ "$LINK_APP_US" -lt "$DURATION_US" ] || die "--link-app-at must be before the end (-t $DURATION)"
    for spec in "${LINK_APP_TEMPO[@]}"; do
        [[ $spec =~ ^([0-9]+([.][0-9]+)?):([0-9]+([.][0-9]+)?)$ ]] || die "--link-app-tempo-at wants T:BPM, got '$spec'"
        t=${BASH_REMATCH[1]} bpm=${BASH_REMATCH[3]}
        rel=$(python3 -S -I -c 'import sys; print(float(sys.argv[1]) - float(sys.argv[2]))' "$t" "$LINK_APP_AT" 2>/dev/null || echo -1)
        [[ $rel != -* ]] || die "--link-app-tempo-at: $t is before --link-app-at $LINK_APP_AT"
        LINK_APP_ARGS+=(--tempo-at "$rel:$bpm")
    done
elif [ ${#LINK_APP_TEMPO[@]} -gt 0 ]; then
    die "--link-app-tempo-at needs --link-app-at"
fi
if [ -n "$PART_US" ] || [ ${#AT_US[@]} -gt 0 ] || [ ${#ACT_US[@]} -gt 0 ] || [ -n "$STRANGER_US" ]; then
    STATUS_LOG=1
fi
if [ -n "$JOIN_AT" ]; then
    is_secs "$JOIN_AT" || die "--join-at must be a number of seconds, got '$JOIN_AT'"
    [ "$N" -ge 2 ] || die "--join-at needs at least 2 nodes"
    JOIN_US=$(secs_to_us "$JOIN_AT")
    [ "$JOIN_US" -lt "$DURATION_US" ] || die "--join-at $JOIN_AT is not before the end (-t $DURATION)"
fi
if [ -n "$WRONG_KEY" ]; then
    is_uint "$WRONG_KEY" && [ "$WRONG_KEY" -ge 1 ] && [ "$WRONG_KEY" -le "$N" ] \
        || die "--wrong-key-node must be 1..$N, got '$WRONG_KEY'"
fi
[ ${#CLOCKS[@]} -le "$N" ] || die "${#CLOCKS[@]} --clock given for $N nodes"
for c in "${CLOCKS[@]}"; do
    [[ $c == none || $c =~ ^[a-z_]+=[-+0-9.eE]+(,[a-z_]+=[-+0-9.eE]+)*$ ]] \
        || die "--clock must look like 'offset_ms=X,skew_ppm=Y' or 'none', got '$c'"
done
PRIOS=()
if [ -n "$PRIO_LIST" ]; then
    IFS=',' read -ra PRIOS <<<"$PRIO_LIST"
    [ ${#PRIOS[@]} -le "$N" ] || die "--priority-list has ${#PRIOS[@]} entries for $N nodes"
    for p in "${PRIOS[@]}"; do
        p=${p// /}
        [ -z "$p" ] || is_int "$p" || die "--priority-list entries must be integers, got '$p'"
    done
fi
IMPAIR_BASE=""; SEED_BASE=0
if [ -n "$IMPAIR" ]; then
    [[ $IMPAIR =~ ^[a-z_]+=[-+0-9.eE]+(,[a-z_]+=[-+0-9.eE]+)*$ ]] \
        || die "--impair must look like 'delay_ms=3,jitter_ms=20,loss=0.02', got '$IMPAIR'"
    if [[ ,$IMPAIR, =~ ,seed=([0-9]+), ]]; then SEED_BASE=${BASH_REMATCH[1]}; fi
    IMPAIR_BASE=$(printf '%s' "$IMPAIR" | tr ',' '\n' | grep -v '^seed=' | paste -sd, -)
fi
command -v python3 >/dev/null || die "needs python3 (the summary)"
# The interpreter itself, not a wrapper (a pyenv shim costs ~0.2 s per call; the leader
# lookup at --kill-leader-at T should be quick).
PY=$(python3 -c 'import sys; print(sys.executable)') && [ -x "$PY" ] || die "python3 does not run"
command -v awk >/dev/null || die "needs awk"

# Paths the user gave are relative to where they ran us; defaults to the repository.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
if [ -z "$BIN" ]; then
    BIN="$REPO/target/release/bandsync"
    if [ $BUILD -eq 1 ] || [ ! -x "$BIN" ]; then
        echo "building bandsync (cargo build --release)..."
        (cd "$REPO" && cargo build --release --bin bandsync) || die "cargo build --release failed"
    fi
else
    BIN=$(abspath "$BIN")
    if [ $BUILD -eq 1 ]; then
        (cd "$REPO" && cargo build --release --bin bandsync) || die "cargo build --release failed"
    fi
fi
[ -x "$BIN" ] || die "no executable daemon at $BIN"
if [ -z "$OUT" ]; then
    OUT="$REPO/lab-out/$(date +%Y%m%d-%H%M%S)-$$"
else
    OUT=$(abspath "$OUT")
fi
mkdir -p "$OUT" || die "cannot create $OUT"
: >"$OUT/events.jsonl" || die "cannot write in $OUT"
for ((i = 1; i <= N; i++)); do
    [ ! -e "$OUT/node$i/clicks.jsonl" ] || die "$OUT/node$i/clicks.jsonl exists already (use a new --out)"
done

# ------------------------------------------------------------------------------ per node

ns_of() { echo "${PREFIX}-n$1"; }
if_of() { echo "${PREFIX}n$1"; }     # the node's end of its veth, inside its namespace
swif_of() { echo "${PREFIX}s$1"; }   # the bridge's end, inside the switch namespace
ip_of() { echo "$SUBNET_PREFIX.$((10 + $1))"; }
RD_NS="${PREFIX}-rd"; RD_IF="${PREFIX}rd"; RD_SWIF="${PREFIX}sr"; RD_IP="$SUBNET_PREFIX.2"
RD_PORT=6379
ST_NS="${PREFIX}-st"; ST_IF="${PREFIX}st"; ST_SWIF="${PREFIX}ss"; ST_IP="$SUBNET_PREFIX.3"
LK_NS="${PREFIX}-lk"; LK_IF="${PREFIX}lk"; LK_SWIF="${PREFIX}sl"; LK_IP="$SUBNET_PREFIX.4"

clock_of() {   # BANDSYNC_TEST_CLOCK of node i ("" = none)
    local i=$1 c
    if [ "$i" -le ${#CLOCKS[@]} ]; then
        c=${CLOCKS[$((i - 1))]}
        [ "$c" = none ] && c=""
        echo "$c"
    elif [ $NO_CLOCK -eq 1 ]; then
        echo ""
    else
        awk -v i="$i" 'BEGIN {
            k = int((i - 1) / 2); s = (i % 2 == 1) ? -1 : 1
            printf "offset_ms=%g,skew_ppm=%g", s * 250 / 2^k, -s * 100 / 2^k }'
    fi
}
impair_of() {
    [ -n "$IMPAIR" ] || return 0
    if [ -n "$IMPAIR_BASE" ]; then echo "$IMPAIR_BASE,seed=$((SEED_BASE + $1))"
    else echo "seed=$((SEED_BASE + $1))"; fi
}
prio_of() { local p=${PRIOS[$(($1 - 1))]:-}; echo "${p// /}"; }
key_of() { if [ "$1" = "$WRONG_KEY" ]; then echo "$OUT/room-wrong.key"; else echo "$OUT/room.key"; fi; }

# ------------------------------------------------------------------------------ events

MONO_OFF_NS=$("$PY" -c 'import time; print(time.monotonic_ns() - time.time_ns())')
event() {   # event NAME [json fields...]; t_mono_ns is CLOCK_MONOTONIC like the click logs
    local name=$1; shift
    local u; u=$(now_us)
    local t=$(( u * 1000 + MONO_OFF_NS ))
    local extra=""
    [ $# -gt 0 ] && extra=",$(IFS=,; echo "$*")"
    printf '{"event":"%s","t_mono_ns":%d,"t_unix_us":%d,"t_s":%s%s}\n' "$name" "$t" "$u" "$(elapsed_s)" "$extra" >>"$OUT/events.jsonl"
}

# ------------------------------------------------------------------------------ cleanup

CREATED_NS=()      # namespaces, in creation order
CREATED_LINKS=()   # "namespace interface"
declare -A PID=() STOPPED=() EXITED=()
CLEANED=0

stop_nodes() {   # SIGTERM, up to 3 s, then SIGKILL; reaps them all
    local i pid left deadline
    for i in "${!PID[@]}"; do
        pid=${PID[$i]}
        [ -n "${STOPPED[$i]:-}" ] && continue
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null
    done
    deadline=$(( $(now_us) + 3000000 ))
    while :; do
        left=0
        for i in "${!PID[@]}"; do
            [ -n "${STOPPED[$i]:-}" ] && continue
            kill -0 "${PID[$i]}" 2>/dev/null && left=1
        done
        [ $left -eq 0 ] && break
        if [ "$(now_us)" -ge "$deadline" ]; then
            for i in "${!PID[@]}"; do
                [ -n "${STOPPED[$i]:-}" ] && continue
                if kill -0 "${PID[$i]}" 2>/dev/null; then
                    echo "lab.sh: node$i (pid ${PID[$i]}) ignored SIGTERM for 3 s: kill -9" >&2
                    kill -KILL "${PID[$i]}" 2>/dev/null
                fi
            done
            break
        fi
        sleep 0.05
    done
    for i in "${!PID[@]}"; do
        [ -n "${STOPPED[$i]:-}" ] && continue
        wait "${PID[$i]}" 2>/dev/null
        STOPPED[$i]=$?
    done
}

cleanup() {
    [ $CLEANED -eq 1 ] && return
    CLEANED=1
    stop_nodes
    local entry ns ifname p idx
    for entry in "${CREATED_LINKS[@]}"; do
        ns=${entry%% *}; ifname=${entry#* }
        ip -n "$ns" link del "$ifname" 2>/dev/null
    done
    for ((idx = ${#CREATED_NS[@]} - 1; idx >= 0; idx--)); do
        ns=${CREATED_NS[$idx]}
        # Only our nodes ran in here; anything left would keep the namespace alive.
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null || echo "lab.sh: could not delete namespace $ns" >&2
    done
    CREATED_NS=(); CREATED_LINKS=()
}
on_exit() { local rc=$?; trap - EXIT INT TERM; cleanup; exit $rc; }
trap on_exit EXIT
interrupted() {
    echo
    echo "lab.sh: interrupted; cleaning up. Outputs stay in $OUT; summary of what was logged:" >&2
    echo "  python3 $REPO/scripts/lab_summary.py --warmup $WARMUP --events $OUT/events.jsonl $OUT/node*/clicks.jsonl" >&2
    exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM

# ------------------------------------------------------------------------------ network

run() { "$@" || die "failed: $*"; }

# side_host NS IF SWIF IP: a host of its own on the bridge (multicast on, with the
# 224.0.0.0/4 route), e.g. the stranger or the Link app.
side_host() {
    local ns=$1 ifn=$2 swif=$3 addr=$4
    make_ns "$ns"
    run ip link add name "$ifn" netns "$ns" type veth peer name "$swif" netns "$SW_NS"
    CREATED_LINKS+=("$ns $ifn")
    run ip -n "$SW_NS" link set dev "$swif" master "$BRIDGE"
    run ip -n "$SW_NS" link set dev "$swif" multicast on up
    run ip -n "$ns" addr add "$addr/24" dev "$ifn"
    run ip -n "$ns" link set dev "$ifn" multicast on up
    run ip -n "$ns" route add 224.0.0.0/4 dev "$ifn"
}

make_ns() {
    local ns=$1
    ip netns list | awk '{print $1}' | grep -qx "$ns" \
        && die "namespace $ns already exists (a crashed run with our PID? try --cleanup-stale)"
    run ip netns add "$ns"
    CREATED_NS+=("$ns")
    if [ $IPV6 -eq 0 ]; then
        # net.* sysctls are per namespace: this only affects $ns.
        ip netns exec "$ns" sh -c 'for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6; do [ -w "$f" ] && echo 1 >"$f"; done; true'
    fi
    run ip -n "$ns" link set lo up
}

setup_network() {
    local i ns ifn swif
    make_ns "$SW_NS"
    run ip -n "$SW_NS" link add name "$BRIDGE" type bridge stp_state 0 mcast_snooping 0
    CREATED_LINKS+=("$SW_NS $BRIDGE")
    run ip -n "$SW_NS" link set dev "$BRIDGE" type bridge mcast_snooping 0
    run ip -n "$SW_NS" link set dev "$BRIDGE" multicast on up
    for ((i = 1; i <= N; i++)); do
        ns=$(ns_of "$i"); ifn=$(if_of "$i"); swif=$(swif_of "$i")
        make_ns "$ns"
        # Both ends are created directly in their namespaces: nothing appears in the root one.
        run ip link add name "$ifn" netns "$ns" type veth peer name "$swif" netns "$SW_NS"
        CREATED_LINKS+=("$ns $ifn")
        run ip -n "$SW_NS" link set dev "$swif" master "$BRIDGE"
        run ip -n "$SW_NS" link set dev "$swif" multicast on up
        run ip -n "$ns" addr add "$(ip_of "$i")/24" dev "$ifn"
        run ip -n "$ns" link set dev "$ifn" multicast on up
        # mDNS (224.0.0.251) needs a multicast route; there is deliberately no default route.
        run ip -n "$ns" route add 224.0.0.0/4 dev "$ifn"
        # the kernel settings an installed box has (fast ARP re-probe after a heal)
        [ $BOX_SYSCTL -eq 1 ] && run ip netns exec "$ns" sysctl -q -e -p "$REPO/systemd/60-bandsync-net.conf"
    done
    [ -n "$STRANGER_AT" ] && side_host "$ST_NS" "$ST_IF" "$ST_SWIF" "$ST_IP"
    [ -n "$LINK_APP_AT" ] && side_host "$LK_NS" "$LK_IF" "$LK_SWIF" "$LK_IP"
    if [ "$REDIS" = 1 ]; then
        make_ns "$RD_NS"
        run ip link add name "$RD_IF" netns "$RD_NS" type veth peer name "$RD_SWIF" netns "$SW_NS"
        CREATED_LINKS+=("$RD_NS $RD_IF")
        run ip -n "$SW_NS" link set dev "$RD_SWIF" master "$BRIDGE"
        run ip -n "$SW_NS" link set dev "$RD_SWIF" up
        run ip -n "$RD_NS" addr add "$RD_IP/24" dev "$RD_IF"
        run ip -n "$RD_NS" link set dev "$RD_IF" up
    fi
}

# redis-server in its namespace (killed with the namespace at cleanup)
REDIS_PID=""
redis_start() {
    ip netns exec "$RD_NS" redis-server --bind "$RD_IP" --port "$RD_PORT" --save "" \
        --protected-mode no --appendonly no --daemonize no >>"$OUT/redis.log" 2>&1 &
    REDIS_PID=$!
    local deadline=$(( $(now_us) + 5000000 ))
    until ip netns exec "$RD_NS" redis-cli -h "$RD_IP" -p "$RD_PORT" ping >/dev/null 2>&1; do
        [ "$(now_us)" -lt "$deadline" ] || die "redis-server did not start (see $OUT/redis.log)"
        sleep 0.05
    done
}
redis_stop() {
    [ -n "$REDIS_PID" ] && kill -TERM "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null
    REDIS_PID=""
}
rcli() { ip netns exec "$RD_NS" redis-cli -h "$RD_IP" -p "$RD_PORT" --raw "$@"; }

# ------------------------------------------------------------------------------ nodes

start_node() {
    local i=$1 ns ifn clock impair prio
    ns=$(ns_of "$i"); ifn=$(if_of "$i")
    clock=$(clock_of "$i"); impair=$(impair_of "$i"); prio=$(prio_of "$i")
    local envs=(-u BANDSYNC_TEST_CLOCK -u BANDSYNC_TEST_IMPAIR "BANDSYNC_LOG=$LOG_FILTER")
    [ -n "$clock" ] && envs+=("BANDSYNC_TEST_CLOCK=$clock")
    [ -n "$impair" ] && envs+=("BANDSYNC_TEST_IMPAIR=$impair")
    # every clock exchange, for examples/sync_replay.rs
    [ -n "${LAB_SYNC_DUMP:-}" ] && envs+=("BANDSYNC_DEBUG_SYNC_DUMP=$OUT/node$i/sync.txt")
    local args=(run --name "node$i" --room "$ROOM" --room-key-file "$(key_of "$i")"
        --state-dir "$OUT/node$i/state" --interface "$ifn" --quic "$(ip_of "$i"):$QUIC_PORT"
        --audio null --click-log "$OUT/node$i/clicks.jsonl")
    is_bare "$i" || args+=(--tempo "$TEMPO" --meter "$METER" --play)
    [ -n "$prio" ] && args+=(--priority "$prio")
    [ "$REDIS" = 1 ] && args+=(--redis "redis://$RD_IP:$RD_PORT/0")
    args+=("${EXTRA[@]}")
    local own=()
    [ -n "${NODE_ARGS[$i]:-}" ] && read -ra own <<<"${NODE_ARGS[$i]}"
    args+=("${own[@]}")
    mkdir -p "$OUT/node$i/state"
    local what=start redir=">"
    [ -n "${PID[$i]:-}" ] && what=restart
    # `ip netns exec` and `env` both exec: $! is the daemon itself. A restart appends to the log.
    if [ $what = restart ]; then
        echo "----- lab.sh: restarted at $(elapsed_s)s -----" >>"$OUT/node$i/node.log"
        ip netns exec "$ns" env "${envs[@]}" "$BIN" "${args[@]}" </dev/null >>"$OUT/node$i/node.log" 2>&1 &
    else
        ip netns exec "$ns" env "${envs[@]}" "$BIN" "${args[@]}" </dev/null >"$OUT/node$i/node.log" 2>&1 &
    fi
    PID[$i]=$!
    unset "STOPPED[$i]"
    echo "${PID[$i]}" >"$OUT/node$i/pid"
    event $what "\"node\":$i" "\"label\":\"node$i\"" "\"pid\":${PID[$i]}"
    log "${what}ed node$i (pid ${PID[$i]}, $(ip_of "$i"), clock '${clock:-none}'${impair:+, impair '$impair'}${prio:+, priority $prio}${own[*]:+, args '${own[*]}'}$(is_bare "$i" && echo ', bare'))"
}

kill_node() {   # kill -9 node i
    local i=$1
    if [ -n "${STOPPED[$i]:-}" ] || ! kill -0 "${PID[$i]:-0}" 2>/dev/null; then
        log "kill-at: node$i is not running"; event kill_skipped "\"node\":$i"; return
    fi
    kill -KILL "${PID[$i]}" 2>/dev/null
    wait "${PID[$i]}" 2>/dev/null
    STOPPED[$i]=killed
    rm -f "$OUT/node$i/pid"
    event kill "\"node\":$i" "\"label\":\"node$i\"" "\"pid\":${PID[$i]}" "\"why\":\"--kill-at\""
    log "killed node$i (pid ${PID[$i]}) with SIGKILL"
}

# --at: `bandsync ARGS --node <node i> --room --room-key-file` in node i's namespace, in the
# background (a slow CLI must not hold up the schedule); output in OUT/cli/<k>.txt.
run_cli() {
    local k=$1 i=$2 argstr=$3 a=()
    read -ra a <<<"$argstr"
    mkdir -p "$OUT/cli"
    (
        local t0 t1 rc first
        t0=$(now_us)
        event cli_start "\"k\":$k" "\"node\":$i" "\"args\":\"${argstr//\"/}\""
        ip netns exec "$(ns_of "$i")" "$BIN" "${a[@]}" --node "$(ip_of "$i"):$QUIC_PORT" \
            --room "$ROOM" --room-key-file "$(key_of "$i")" >"$OUT/cli/$k.txt" 2>&1 </dev/null
        rc=$?
        t1=$(now_us)
        first=$(head -c 200 "$OUT/cli/$k.txt" | head -n 1 | tr -d '"\\\000-\037')
        event cli "\"k\":$k" "\"node\":$i" "\"args\":\"${argstr//\"/}\"" "\"rc\":$rc" \
            "\"ms\":$(( (t1 - t0) / 1000 ))" "\"out\":\"$first\""
        log "cli #$k on node$i: bandsync $argstr -> rc $rc in $(( (t1 - t0) / 1000 )) ms: $first"
    ) &
    CLI_PIDS+=($!)
}
CLI_PIDS=()

# status.json of every running node, every 50 ms, into OUT/status.jsonl (a line when
# anything but the clock changed): the heal report's leader/epoch agreement.
SAMPLER_PID=""
start_sampler() {
    "$PY" -S -I - "$OUT" "$N" >"$OUT/status.jsonl" 2>"$OUT/sampler.err" <<'PYEOF' &
import json, os, sys, time
out, n = sys.argv[1], int(sys.argv[2])
keep = ("role", "leader", "epoch", "tempo", "playing", "meter", "decided", "node", "pinned")
last = None
while True:
    snap = {}
    for i in range(1, n + 1):
        d = os.path.join(out, "node%d" % i)
        try:
            pid = int(open(os.path.join(d, "pid")).read())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        try:
            st = json.load(open(os.path.join(d, "state", "status.json")))
            mt = os.stat(os.path.join(d, "state", "status.json")).st_mtime_ns
        except (OSError, ValueError):
            continue
        # a status.json older than this life of the node is a previous life's
        if mt < os.stat(os.path.join(d, "pid")).st_mtime_ns:
            continue
        snap["node%d" % i] = {k: st.get(k) for k in keep}
    if snap != last:
        last = snap
        sys.stdout.write(json.dumps({"t_mono_ns": time.monotonic_ns(), "s": snap}, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    time.sleep(0.05)
PYEOF
    SAMPLER_PID=$!
}
stop_sampler() { [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null; SAMPLER_PID=""; }

STRANGER_PID=""
start_stranger() {
    local i=$STRANGER_TARGET nid sargs=()
    [ -n "$STRANGER_ARGS" ] && read -ra sargs <<<"$STRANGER_ARGS"
    nid=$("$PY" -S -I -c 'import json,sys; print(json.load(open(sys.argv[1])).get("node",""))' \
        "$OUT/node$i/state/status.json" 2>/dev/null)
    [ -n "$nid" ] || nid=$(cat "$OUT/node$i/state/node-id" 2>/dev/null)
    event stranger_start "\"target\":$i" "\"spoofed_id\":\"$nid\""
    log "stranger: attacking node$i ($(ip_of "$i"), id $nid) for ${STRANGER_FOR}s from $ST_IP"
    ip netns exec "$ST_NS" "$PY" "$REPO/scripts/stranger.py" --target "$(ip_of "$i")" \
        --quic-port "$QUIC_PORT" --http-port 8080 --duration "$STRANGER_FOR" --spoof-id "$nid" \
        --room "$ROOM" --self "$ST_IP" --iface "$ST_IF" --report "$OUT/stranger.json" "${sargs[@]}" \
        >"$OUT/stranger.log" 2>&1 </dev/null &
    STRANGER_PID=$!
}

LINK_APP_PID=""
start_link_app() {
    event link_app_start "\"ip\":\"$LK_IP\""
    log "link app: aalink at 90 BPM from $LK_IP (OUT/link_app.jsonl)"
    ip netns exec "$LK_NS" "$PY" "$REPO/scripts/link_app.py" --out "$OUT/link_app.jsonl" \
        --quantum "$METER" "${LINK_APP_ARGS[@]}" >"$OUT/link_app.log" 2>&1 </dev/null &
    LINK_APP_PID=$!
}
stop_link_app() {
    [ -n "$LINK_APP_PID" ] || return 0
    kill -TERM "$LINK_APP_PID" 2>/dev/null; wait "$LINK_APP_PID" 2>/dev/null
    LINK_APP_PID=""
    event link_app_stop
}

# Prints "<index> <how it was found>" of the current leader among the running nodes.
find_leader() {
    local alive=() i
    for i in "${!PID[@]}"; do
        [ -z "${STOPPED[$i]:-}" ] && kill -0 "${PID[$i]}" 2>/dev/null && alive+=("$i:$(prio_of "$i")")
    done
    [ ${#alive[@]} -gt 0 ] || return 1
    "$PY" -S -I - "$OUT" "${alive[@]}" <<'EOF'
import json, os, sys
out, alive = sys.argv[1], sys.argv[2:]
nodes = []  # (index, priority, id, status)
for a in alive:
    i, _, p = a.partition(":")
    i = int(i)
    state = os.path.join(out, "node%d" % i, "state")
    st = None
    try:
        with open(os.path.join(state, "status.json")) as f:
            st = json.load(f)
        if not isinstance(st, dict):
            st = None
    except (OSError, ValueError):
        pass
    nid = st.get("node") if st and isinstance(st.get("node"), str) else None
    if nid is None:
        try:
            with open(os.path.join(state, "node-id")) as f:
                nid = f.read().strip() or None
        except OSError:
            pass
    nodes.append((i, int(p) if p.strip() else 0, nid or "", st))
by_id = {n[2]: n[0] for n in nodes if n[2]}
def epoch(st):
    e = st.get("epoch")
    return e if isinstance(e, int) and not isinstance(e, bool) else -1
# Every running node with a status votes for the leader it names (a node whose role is
# "leader" names itself). The most named wins; ties go to the newest epoch among its
# voters, then to the lowest node index (node 1's room, with --wrong-key-node).
score = {}
for i, _, nid, st in nodes:
    if st is None:
        continue
    l = nid if st.get("role") == "leader" and nid else st.get("leader")
    if isinstance(l, str) and l in by_id:
        v, e = score.get(l, (0, -1))
        score[l] = (v + 1, max(e, epoch(st)))
if score:
    lid = max(score, key=lambda k: (score[k][0], score[k][1], -by_id[k]))
    voted = sum(1 for n in nodes if n[3] is not None)
    print(by_id[lid], "status.json: named leader by %d of %d running node(s), epoch %d"
          % (score[lid][0], voted, score[lid][1]))
    sys.exit(0)
# Fallback: the election's rank without pins: (priority, id), highest wins.
best = max(nodes, key=lambda n: (n[1], n[2], -n[0]))
print(best[0], "no usable status.json: highest priority (%d), then highest node id" % best[1])
EOF
}

kill_leader() {
    local line idx why
    line=$(find_leader) || { log "kill-leader: no running node to kill"; event kill_skipped; return; }
    idx=${line%% *}; why=${line#* }
    log "killing the leader node$idx (pid ${PID[$idx]}) with SIGKILL: $why"
    kill -KILL "${PID[$idx]}" 2>/dev/null
    wait "${PID[$idx]}" 2>/dev/null
    STOPPED[$idx]=killed
    local whyjson=${why//\\/\\\\}; whyjson=${whyjson//\"/\\\"}
    event kill "\"node\":$idx" "\"label\":\"node$idx\"" "\"pid\":${PID[$idx]}" "\"why\":\"$whyjson\""
}

check_nodes() {   # notice nodes that exited on their own
    local i rc
    for i in "${!PID[@]}"; do
        [ -n "${STOPPED[$i]:-}" ] && continue
        kill -0 "${PID[$i]}" 2>/dev/null && continue
        wait "${PID[$i]}" 2>/dev/null; rc=$?
        STOPPED[$i]=$rc; EXITED[$i]=$rc
        log "node$i (pid ${PID[$i]}) exited on its own with status $rc; last lines of its log:"
        tail -n 5 "$OUT/node$i/node.log" | sed 's/^/    /'
        event exit "\"node\":$i" "\"label\":\"node$i\"" "\"status\":$rc"
    done
}

# ------------------------------------------------------------------------------ run

"$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$OUT/room.key" || die "cannot write the room key"
[ -n "$WRONG_KEY" ] && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$OUT/room-wrong.key"
chmod 600 "$OUT"/room*.key
{
    echo "command: $0 ${ORIG_ARGS[*]}"
    echo "bin: $BIN ($(stat -c '%y' "$BIN" 2>/dev/null | cut -c1-19), sha256 $(sha256sum "$BIN" 2>/dev/null | cut -c1-16))"
    echo "prefix: $PREFIX  bridge: $SW_NS/$BRIDGE  duration: ${DURATION}s  warmup: ${WARMUP}s"
    echo "tempo: $TEMPO  meter: $METER  kill-leader-at: ${KILL_AT:-}  join-at: ${JOIN_AT:-}  wrong-key-node: ${WRONG_KEY:-}"
    for ((i = 1; i <= N; i++)); do
        echo "node$i: ns $(ns_of "$i") if $(if_of "$i") ip $(ip_of "$i") clock '$(clock_of "$i")' impair '$(impair_of "$i")' priority '$(prio_of "$i")' key $(basename "$(key_of "$i")")"
    done
    [ ${#EXTRA[@]} -gt 0 ] && echo "extra: ${EXTRA[*]}"
} >"$OUT/lab.txt"

echo "bandsync lab: $N node(s), ${DURATION}s, output in $OUT"
[ "$(secs_to_us "$WARMUP")" -lt "$DURATION_US" ] \
    || echo "lab.sh: warning: --warmup $WARMUP is not shorter than the run (-t $DURATION): the summary will skip every click" >&2
setup_network
echo "network: bridge $BRIDGE in $SW_NS, nodes $(ns_of 1)..$(ns_of "$N") on $SUBNET_PREFIX.0/24"

T0_US=$(now_us)
event lab_start "\"nodes\":$N" "\"prefix\":\"$PREFIX\""
if [ "$REDIS" = 1 ]; then
    redis_start
    log "redis-server running at $RD_IP:$RD_PORT (pid $REDIS_PID)"
fi
RSTOP_DONE=1; RSTART_DONE=1; RWATCH=0
[ -n "$REDIS_STOP_US" ] && RSTOP_DONE=0 && RSTART_DONE=0
RKEY="bandsync:room:$ROOM"
declare -A PENDING=()   # node -> start time (µs into the run)
if [ $TOGETHER -eq 1 ]; then
    for ((i = 1; i <= N; i++)); do PENDING[$i]=0; done
else
    start_node 1
    for ((i = 2; i <= N; i++)); do PENDING[$i]=1000000; done
fi
[ -n "$JOIN_US" ] && PENDING[$N]=$JOIN_US
if [ $TOGETHER -eq 1 ]; then
    # as close together as bash allows: launch every node due at 0 now
    for ((i = 1; i <= N; i++)); do
        [ "${PENDING[$i]:-1}" -eq 0 ] && { unset "PENDING[$i]"; start_node "$i"; }
    done
fi
[ $STATUS_LOG -eq 1 ] && start_sampler
KILL_DONE=0
[ -z "$KILL_US" ] && KILL_DONE=1
PART_IDX=0; HEAL_IDX=0   # next partition / heal cycle to do
STRANGER_DONE=1; [ -n "$STRANGER_US" ] && STRANGER_DONE=0
set_links() {   # set_links up|down: the partitioned nodes' switch-side veths
    for p in ${PART_NODES//,/ }; do
        ip -n "$SW_NS" link set dev "$(swif_of "$p")" "$1" || echo "lab.sh: cannot set ${PREFIX}s$p $1" >&2
    done
}

while :; do
    now=$(elapsed_us)
    [ "$now" -ge "$DURATION_US" ] && break
    for i in $(printf '%s\n' "${!PENDING[@]}" | sort -n); do
        if [ "$now" -ge "${PENDING[$i]}" ]; then
            unset "PENDING[$i]"
            [ -n "$JOIN_US" ] && [ "$i" -eq "$N" ] && event join "\"node\":$i" "\"label\":\"node$i\""
            start_node "$i"
        fi
    done
    if [ $KILL_DONE -eq 0 ] && [ "$now" -ge "$KILL_US" ]; then
        KILL_DONE=1
        kill_leader
    fi
    if [ $PART_IDX -lt ${#PART_LIST[@]} ] && [ "$now" -ge "${PART_LIST[$PART_IDX]}" ]; then
        set_links down
        event partition "\"nodes\":\"$PART_NODES\"" "\"cycle\":$PART_IDX"
        log "partition #$PART_IDX: node(s) $PART_NODES cut off"
        PART_IDX=$((PART_IDX + 1))
    fi
    if [ $HEAL_IDX -lt ${#HEAL_LIST[@]} ] && [ "$now" -ge "${HEAL_LIST[$HEAL_IDX]}" ]; then
        set_links up
        event heal "\"nodes\":\"$PART_NODES\"" "\"cycle\":$HEAL_IDX"
        log "heal #$HEAL_IDX: node(s) $PART_NODES reconnected"
        HEAL_IDX=$((HEAL_IDX + 1))
    fi
    for k in "${!AT_US[@]}"; do
        if [ "${AT_DONE[$k]}" -eq 0 ] && [ "$now" -ge "${AT_US[$k]}" ]; then
            AT_DONE[$k]=1
            run_cli "$k" "${AT_NODE[$k]}" "${AT_ARGS[$k]}"
        fi
    done
    for k in "${!ACT_US[@]}"; do
        if [ "${ACT_DONE[$k]}" -eq 0 ] && [ "$now" -ge "${ACT_US[$k]}" ]; then
            ACT_DONE[$k]=1
            case "${ACT_WHAT[$k]}" in
                kill) kill_node "${ACT_NODE[$k]}" ;;
                restart)
                    if [ -z "${STOPPED[${ACT_NODE[$k]}]:-}" ] && kill -0 "${PID[${ACT_NODE[$k]}]:-0}" 2>/dev/null; then
                        log "restart-at: node${ACT_NODE[$k]} is still running"
                    else
                        start_node "${ACT_NODE[$k]}"
                    fi ;;
            esac
        fi
    done
    if [ -n "$LINK_APP_US" ] && [ -z "$LINK_APP_PID" ] && [ "$now" -ge "$LINK_APP_US" ] && [ "${LINK_APP_DONE:-0}" = 0 ]; then
        LINK_APP_DONE=1
        start_link_app
    fi
    if [ $STRANGER_DONE -eq 0 ] && [ "$now" -ge "$STRANGER_US" ]; then
        STRANGER_DONE=1
        start_stranger
    fi
    if [ -n "$STRANGER_PID" ] && ! kill -0 "$STRANGER_PID" 2>/dev/null; then
        wait "$STRANGER_PID"; src=$?
        STRANGER_PID=""
        event stranger_end "\"status\":$src"
        log "stranger: done (status $src; $OUT/stranger.log)"
    fi
    if [ $RSTOP_DONE -eq 0 ] && [ "$now" -ge "$REDIS_STOP_US" ]; then
        RSTOP_DONE=1
        log "redis: hash before the outage: $(rcli HGETALL "$RKEY" | paste -sd' ')"
        redis_stop
        event redis_stop
        log "redis-server stopped"
        NEW_TEMPO=$(( TEMPO + 7 ))
        if ip netns exec "$(ns_of 1)" "$BIN" tempo "$NEW_TEMPO" --node "$(ip_of 1):$QUIC_PORT" \
            --room "$ROOM" --room-key-file "$(key_of 1)" >>"$OUT/cli.log" 2>&1; then
            log "tempo changed to $NEW_TEMPO through node1 while redis is down"
        else
            log "could not change the tempo (see $OUT/cli.log)"
        fi
    fi
    if [ $RSTART_DONE -eq 0 ] && [ "$now" -ge "$REDIS_START_US" ]; then
        RSTART_DONE=1
        redis_start
        event redis_start
        log "redis-server started again (empty: it saves nothing)"
        RWATCH=1; RWATCH_FROM=$(now_us)
    fi
    if [ $RWATCH -eq 1 ]; then
        want_epoch=$("$PY" -S -I -c '
import json, sys, glob
e = 0
for f in glob.glob(sys.argv[1] + "/node*/state/status.json"):
    try:
        st = json.load(open(f))
        if st.get("role") == "leader": e = max(e, int(st.get("epoch", 0)))
    except Exception: pass
print(e)' "$OUT")
        got=$(rcli HMGET "$RKEY" epoch tempo_mbpm | paste -sd' ')
        if [ "$got" = "$want_epoch $(( NEW_TEMPO * 1000 ))" ]; then
            RWATCH=0
            took=$(( $(now_us) - RWATCH_FROM ))
            event redis_current "\"after_us\":$took"
            log "redis: the room's hash is current again $(( took / 1000 )) ms after the restart (epoch $want_epoch, tempo ${NEW_TEMPO})"
        elif [ $(( $(now_us) - RWATCH_FROM )) -gt 5000000 ] && [ "${RWARNED:-0}" = 0 ]; then
            RWARNED=1
            log "redis: hash NOT current 5 s after the restart: $got (want epoch $want_epoch, tempo_mbpm $(( NEW_TEMPO * 1000 )))"
        fi
    fi
    check_nodes
    if [ ${#PENDING[@]} -eq 0 ] && [ ${#ACT_US[@]} -eq 0 ]; then
        running=0
        for i in "${!PID[@]}"; do [ -z "${STOPPED[$i]:-}" ] && running=1; done
        if [ $running -eq 0 ]; then log "no node is running any more: ending the run early"; break; fi
    fi
    sleep 0.05
done

if [ "$REDIS" = 1 ] && [ -n "$REDIS_PID" ]; then
    log "redis: hash at the end: $(rcli HGETALL "$RKEY" | paste -sd' ')"
fi
redis_stop
if [ -n "$STRANGER_PID" ]; then
    kill "$STRANGER_PID" 2>/dev/null; wait "$STRANGER_PID" 2>/dev/null; STRANGER_PID=""
    event stranger_end "\"status\":-1"
fi
for p in "${CLI_PIDS[@]}"; do wait "$p" 2>/dev/null; done
stop_link_app
log "run over: stopping the nodes (SIGTERM, then SIGKILL after 3 s)"
event stop
stop_sampler
stop_nodes
LAB_RC=0
for i in "${!EXITED[@]}"; do LAB_RC=3; done
for ((i = 1; i <= N; i++)); do
    s=${STOPPED[$i]:-not started}
    case "$s" in
        0|killed) ;;
        *) [ -z "${EXITED[$i]:-}" ] && echo "lab.sh: note: node$i stopped with status $s" >&2 ;;
    esac
done
cleanup
echo "network: namespaces and links deleted"
echo

LOGS=()
for ((i = 1; i <= N; i++)); do LOGS+=("$OUT/node$i/clicks.jsonl"); done
SUM_ARGS=()
[ $STATUS_LOG -eq 1 ] && SUM_ARGS+=(--status "$OUT/status.jsonl")
[ -n "$STRANGER_AT" ] && SUM_ARGS+=(--stranger "$OUT/stranger.json")
[ -n "$LINK_APP_AT" ] && SUM_ARGS+=(--link-app "$OUT/link_app.jsonl")
"$PY" "$REPO/scripts/lab_summary.py" --warmup "$WARMUP" --node-warmup "$NODE_WARMUP" \
    --events "$OUT/events.jsonl" --meter "$METER" "${SUM_ARGS[@]}" "${LOGS[@]}" >"$OUT/summary.txt"
SUM_RC=$?
cat "$OUT/summary.txt"
echo "(outputs: $OUT)"
if [ $LAB_RC -ne 0 ]; then
    echo "lab.sh: node(s) $(printf '%s\n' "${!EXITED[@]}" | sort -n | paste -sd, -) exited on their own before the end (see their node.log)" >&2
fi
if [ $SUM_RC -ne 0 ]; then
    echo "lab.sh: the summary could not read any click log (status $SUM_RC)" >&2
    [ $LAB_RC -eq 0 ] && LAB_RC=2
fi
exit $LAB_RC
