#!/usr/bin/env bash
# Issue 18 / issue 12 scenarios on the lab (scripts/lab.sh; root). Each scenario runs lab.sh
# with its schedule, checks the outputs with scripts/lab_scenarios_check.py (or lab.sh's
# summary) and prints ONE line of figures; details stay in the output folder.
#
#   a  leader cut off: node 1 has priority 10 and is cut off; `tempo` through node 2 on the
#      other side (90, 100, 90, ... alternately), heal: every box plays it within 1 s of the
#      heal plus the next bar, on one grid.  A_CYCLES cycles in one run (default 10).
#   b  both sides decide: node 3 cut off; tempo through one side, 3 s later another tempo
#      through the other side, heal: the later one everywhere (cycle 0: 100 via node 1, then
#      80 via node 3 -> 80; odd cycles the other way round: 110 via node 3, 70 via node 1 -> 70).
#      B_CYCLES cycles (default 4).
#   c  boot together: node 1 `--play --tempo T`, node 2 fresh (no --tempo/--play), started at
#      the same moment: both always play, at T. C_RUNS runs at 120 (default 10) plus C_RUNS_ODD
#      runs at 97 BPM (default 5: 120 is also a fresh box's default, 97 is not).
#   d  a box switched off (kill -9), the room's tempo changed (120 -> 90), the box back on
#      with the same state dir: it adopts 90, nobody ever plays 120 again. D_RUNS runs
#      (default 3; odd runs: the switched-off box has priority 5, i.e. it was the leader and
#      ranks first again when it comes back).
#   h  heal benchmark (issue 12): node 3 cut off and healed H_CYCLES times (default 20) in one
#      run, no change during the cut: heal -> one leader, one timeline, max/p50.
#   s  stranger (issue 12): scripts/stranger.py floods node 1 for 25 s while 3 boxes play
#      (S_ARGS: extra stranger.py arguments, e.g. "--quic-hold 5").
#   l  Ableton Link (issue 15): two boxes with the lab's distorted clocks (±100 ppm, ±250 ms)
#      and a real Link app (aalink) on the bridge from 8 s; `tempo 100` at 30 s, the app
#      sets 90 at 45 s. The app takes the room's tempo within 1 s, its beat phase against
#      both boxes' clicks is <= 1 ms p95, the change reaches it within 2 s and its own is
#      overruled within 2 s. L_RUNS runs (default 1; needs pip install aalink).
#
# Usage: scripts/lab-scenarios.sh [--only a,b,c,d,h,s,l] [--out DIR] [-- extra lab.sh args]
# Exit status: 0 when every scenario run passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ONLY=a,b,c,d,h,s,l
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "lab-scenarios: unknown option $1" >&2; exit 1 ;;
    esac
done
EXTRA=("$@")
[ "$(id -u)" -eq 0 ] || { echo "lab-scenarios: must run as root (lab.sh)" >&2; exit 1; }
OUT=${OUT:-lab-out/scenarios-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
A_CYCLES=${A_CYCLES:-10} A_TEMPO_AFTER=${A_TEMPO_AFTER:-4}
B_CYCLES=${B_CYCLES:-4}
C_RUNS=${C_RUNS:-10} C_RUNS_ODD=${C_RUNS_ODD:-5}
D_RUNS=${D_RUNS:-3}
H_CYCLES=${H_CYCLES:-20}
L_RUNS=${L_RUNS:-1}
RC=0
want() { [[ ,$ONLY, == *,$1,* ]]; }
lab() {   # lab DIR ARGS...: one lab.sh run, its console output in DIR.txt
    local dir=$1; shift
    echo "+ scripts/lab.sh $* ${EXTRA[*]} --out $dir" >"$dir.txt"
    scripts/lab.sh "$@" "${EXTRA[@]}" --out "$dir" >>"$dir.txt" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || echo "  (lab.sh exited $rc; see $dir.txt)" >&2
    scripts/lab.sh --cleanup-stale >/dev/null 2>&1
    return 0
}
check_line() {   # check_line NAME CHECKFILE: one line from the CHECK json of the checker
    "$(command -v python3)" - "$@" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
c = None
for line in open(path):
    if line.startswith("CHECK "):
        c = json.loads(line[6:])
if c is None:
    print("%s: no result (see %s)" % (name, path)); sys.exit(0)
if "cycles" in c:
    print("%s: %d/%d heals ok (clicks); every box at the new tempo max %s ms p50 %s ms after the heal, "
          "one grid max %s p50 %s ms; tightest deadline (1 s + next bar) %s ms; status.json "
          "leader+epoch agree max %s p50 %s ms (<= 1 s: %d/%d, by the deadline: %d/%d); leaders "
          "after heal %s; CLI failures %d" % (
        name, c["passed"], c["cycles"], c["settle_max_ms"], c["settle_p50_ms"], c["grid_max_ms"],
        c["grid_p50_ms"], c["deadline_min_ms"], c["leader_epoch_max_ms"], c.get("leader_epoch_p50_ms"),
        c.get("leader_epoch_within_1s", 0), c["cycles"], c.get("leader_epoch_by_deadline", 0), c["cycles"],
        ",".join(c["leaders_after"]), c["cli_failed"]))
elif "together_max_ms" in c:
    print("%s: %d/%d runs ok; clicking together max %s ms p50 %s ms after the start; off-tempo "
          "intervals %d; clicks off the other box's grid %d; runs where a status.json said playing=false %d (the last such sample %s ms after "
          "the start)" % (
        name, c["passed"], c["runs"], c["together_max_ms"], c["together_p50_ms"],
        c["off_tempo_intervals"], c.get("discordant_clicks", 0), c["runs_with_not_playing_status"],
        c.get("not_playing_until_max_ms")))
else:
    print("%s: %d/%d runs ok; the box on the room's grid max %s ms after its restart; its clicks off "
          "the room's grid after the restart %d; old-tempo intervals after the change (all nodes) %d" % (
        name, c["passed"], c["runs"], c["box_on_grid_max_ms"], c.get("box_off_grid_clicks", 0),
        c["old_tempo_intervals_total"]))
PY
}
summary_json() { grep '^SUMMARY ' "$1/summary.txt" 2>/dev/null | tail -n 1 | cut -c9-; }
RESULTS=()

if want a; then
    # -t: the last heal + 8 s (two beats after 1 s + a bar at 90 BPM)
    d=$OUT/a; args=(-n 3 -t $(( 12 + 13 * (A_CYCLES - 1) + 7 + 8 )) --warmup 5 --priority-list 10,0,0 --partition-nodes 1
        --partition-at 12 --heal-at 19 --repeat-heal "$A_CYCLES" --heal-every 13)
    expect=()
    for ((k = 0; k < A_CYCLES; k++)); do
        bpm=$(( k % 2 == 0 ? 90 : 100 )); expect+=("$bpm")
        args+=(--at "$(awk -v k="$k" -v a="$A_TEMPO_AFTER" 'BEGIN { print 12 + 13 * k + a }'):2:tempo $bpm")
    done
    lab "$d" "${args[@]}"
    python3 scripts/lab_scenarios_check.py heal-tempo "$d" --expect "$(IFS=,; echo "${expect[*]}")" \
        --ref-node 2 >"$d.check" 2>&1 || RC=1
    RESULTS+=("$(check_line "a) leader cut off, tempo through the other side, heal" "$d.check")  [$d]")
    echo "${RESULTS[-1]}"
fi

if want b; then
    d=$OUT/b; args=(-n 3 -t $(( 12 + 16 * (B_CYCLES - 1) + 9 + 8 )) --warmup 5 --partition-nodes 3 --partition-at 12 --heal-at 21
        --repeat-heal "$B_CYCLES" --heal-every 16)
    expect=()
    for ((k = 0; k < B_CYCLES; k++)); do
        p=$(( 12 + 16 * k ))
        if [ $((k % 2)) -eq 0 ]; then
            args+=(--at "$(( p + 3 )).5:1:tempo 100" --at "$(( p + 6 )).5:3:tempo 80"); expect+=(80)
        else
            args+=(--at "$(( p + 3 )).5:3:tempo 110" --at "$(( p + 6 )).5:1:tempo 70"); expect+=(70)
        fi
    done
    lab "$d" "${args[@]}"
    python3 scripts/lab_scenarios_check.py heal-tempo "$d" --expect "$(IFS=,; echo "${expect[*]}")" \
        --ref-node 2 >"$d.check" 2>&1 || RC=1
    RESULTS+=("$(check_line "b) both sides decide, the later wins" "$d.check")  [$d]")
    echo "${RESULTS[-1]}"
fi

if want c; then
    for tempo in 120 97; do
        runs=$C_RUNS; [ "$tempo" = 97 ] && runs=$C_RUNS_ODD
        [ "$runs" -gt 0 ] || continue
        dirs=()
        for ((r = 1; r <= runs; r++)); do
            d=$OUT/c$tempo-$r; dirs+=("$d")
            lab "$d" -n 2 -t 8 --warmup 0 --together --bare-nodes 2 --status-log --tempo "$tempo"
        done
        python3 scripts/lab_scenarios_check.py boot "${dirs[@]}" --tempo "$tempo" >"$OUT/c$tempo.check" 2>&1 || RC=1
        RESULTS+=("$(check_line "c) boot together at $tempo (node 1 --play --tempo $tempo, node 2 fresh)" "$OUT/c$tempo.check")  [$OUT/c$tempo-*]")
        echo "${RESULTS[-1]}"
    done
fi

if want d; then
    dirs=()
    for ((r = 1; r <= D_RUNS; r++)); do
        d=$OUT/d-$r; dirs+=("$d")
        prio=(); [ $((r % 2)) -eq 1 ] && prio=(--priority-list 0,0,5)
        lab "$d" -n 3 -t 26 --warmup 5 "${prio[@]}" --kill-at 10:3 --at "12:1:tempo 90" --restart-at 16:3
    done
    python3 scripts/lab_scenarios_check.py rejoin "${dirs[@]}" --old 120 --new 90 --box 3 >"$OUT/d.check" 2>&1 || RC=1
    RESULTS+=("$(check_line "d) box off, tempo changed, box back on" "$OUT/d.check")  [$OUT/d-*]")
    echo "${RESULTS[-1]}"
fi

if want h; then
    d=$OUT/h
    lab "$d" -n 3 -t 20 --warmup 5 --partition-nodes 3 --partition-at 10 --heal-at 13 \
        --repeat-heal "$H_CYCLES" --heal-every 6
    line=$(grep '^heal → one leader, one timeline:' "$d/summary.txt" | tail -n 1)
    hj=$(summary_json "$d")
    ok=$(python3 -c 'import json,sys; h=json.loads(sys.argv[1]).get("heal") or {}; print(1 if h.get("n",0)>=20 and (h.get("max_ms") or 1e9)<=1000 else 0)' "$hj" 2>/dev/null)
    [ "$ok" = 1 ] || RC=1
    RESULTS+=("h) repeated heals (issue 12, max <= 1 s over >= 20): ${line#heal → one leader, one timeline: }$([ "$ok" = 1 ] && echo ' ok' || echo ' FAIL')  [$d]")
    echo "${RESULTS[-1]}"
fi

if want s; then
    d=$OUT/s
    lab "$d" -n 3 -t 50 --warmup 5 --stranger-at 15 --stranger-for 25 ${S_ARGS:+--stranger-args "$S_ARGS"}
    line=$(python3 - "$(summary_json "$d")" <<'PY'
import json, sys
try:
    s = json.loads(sys.argv[1])
except ValueError:
    print("no summary"); sys.exit(0)
st = s.get("stranger") or {}
a = st.get("attack") or {}
q, sl, pin, md = a.get("quic") or {}, a.get("slowloris") or {}, a.get("pin") or {}, a.get("mdns") or {}
nodes = st.get("nodes") or {}
missed = sum(v["missed"] for v in nodes.values()); doubled = sum(v["doubled"] for v in nodes.values())
tempos = sorted({t for v in nodes.values() for t in v["tempo"]})
ok = (not st.get("exits") and missed == 0 and doubled == 0 and st.get("one_leader_always")
      and len(st.get("leaders_seen", [])) == 1 and (st["during"]["p99_us"] or 1e9) <= 200
      and (st["after"]["p99_us"] or 1e9) <= 50 and pin.get("accepted", 1) == 0 and len(tempos) == 1)
print("restarts %s; missed %d doubled %d; spread p99 during %s µs (max %s), after %s µs; one leader "
      "throughout %s (%d seen); tempo %s; QUIC %s attempts/%s handshakes/%s timeouts; slowloris %s "
      "connected, max open %s, closed by the box %s; PIN %s guesses, %s accepted, errors %s; mDNS %s "
      "spoofed adverts: %s" % (
    ",".join(st.get("exits", [])) or "none", missed, doubled, st["during"]["p99_us"], st["during"]["max_us"],
    st["after"]["p99_us"], st.get("one_leader_always"), len(st.get("leaders_seen", [])),
    ",".join("%g" % t for t in tempos), q.get("attempts"), q.get("handshake_done"), q.get("timeout"),
    sl.get("connected"), sl.get("max_open"), sl.get("closed_by_box"), pin.get("guesses"),
    pin.get("accepted"), json.dumps(pin.get("errors")), md.get("packets"), "ok" if ok else "FAIL"))
PY
)
    [[ $line == *" ok" ]] || RC=1
    RESULTS+=("s) stranger flood on node 1 (25 s): $line  [$d]")
    echo "${RESULTS[-1]}"
fi
if want l; then
    for ((r = 0; r < L_RUNS; r++)); do
        d=$OUT/l$r
        lab "$d" -n 2 -t 62 --warmup 5 --link-app-at 8 --at "30:1:tempo 100" --link-app-tempo-at "45:90"
        line=$(python3 - "$(summary_json "$d")" <<'PY'
import json, sys
try:
    s = json.loads(sys.argv[1])
except ValueError:
    print("no summary"); sys.exit(0)
l = s.get("link_app") or {}
if "nodes" not in l:
    print("no Link app samples: %s FAIL" % l.get("error")); sys.exit(0)
n = l["nodes"]
rc = (l.get("room_changes") or [{}])[0].get("reached_s")
ov = (l.get("app_changes") or [{}])[0].get("overruled_s")
ok = (l.get("join_s") is not None and l["join_s"] <= 1.0 and abs(l.get("tempo_after_join", 0) - 120) < 1e-3
      and all(v["p95_ms"] is not None and v["p95_ms"] <= 1.0 and v["offsets_on_bars"] and v["n"] > 1000
              for v in n.values())
      and rc is not None and rc <= 2.0 and ov is not None and ov <= 2.0)
f = lambda v: "-" if v is None else "%.3f" % v
print("join %s s; phase %s; room tempo change reached it in %s s; its own change overruled in %s s: %s" % (
    f(l.get("join_s")), "; ".join("%s p50 %s p95 %s max %s ms (%d samples)" % (
        k, f(v["p50_ms"]), f(v["p95_ms"]), f(v["max_ms"]), v["n"]) for k, v in n.items()),
    f(rc), f(ov), "ok" if ok else "FAIL"))
PY
)
        [[ $line == *" ok" ]] || RC=1
        RESULTS+=("l) Link app with two skewed boxes, run $r: $line  [$d]")
        echo "${RESULTS[-1]}"
    done
fi

echo
echo "== lab scenarios ($(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs) =="
printf '%s\n' "${RESULTS[@]}" | tee "$OUT/scenarios.txt"
exit $RC
