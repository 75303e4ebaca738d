#!/usr/bin/env bash
# Failover benchmark: K lab runs of 3 nodes, each killing the leader (kill -9) mid-run.
# For each kill: how long until every survivor reports the same new leader (from the
# node logs), and whether any survivor missed, doubled or shifted a beat.
# Usage: scripts/failover-bench.sh [-k RUNS] [--impair SPEC] [-- extra lab.sh args]
set -euo pipefail
cd "$(dirname "$0")/.."
K=10; IMPAIR=()
while [ $# -gt 0 ]; do
    case "$1" in
        -k) K=$2; shift 2 ;;
        --impair) IMPAIR=(--impair "$2"); shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
        *) echo "failover-bench: unknown option $1" >&2; exit 1 ;;
    esac
done
OUT=${OUT:-lab-out/failover-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
for ((r = 1; r <= K; r++)); do
    scripts/lab.sh -n 3 -t 22 --warmup 3 --kill-leader-at 16 "${IMPAIR[@]}" --out "$OUT/run$r" "$@" >"$OUT/run$r.txt" 2>&1 || true
done
python3 - "$OUT" "$K" <<'PY'
import json, re, sys, glob, datetime, statistics
out, k = sys.argv[1], int(sys.argv[2])
ts = re.compile(r'^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z.*?(this node now leads the room|following leader=(\w+))')
times, bad = [], []
for r in range(1, k + 1):
    d = f"{out}/run{r}"
    try:
        ev = [json.loads(l) for l in open(f"{d}/events.jsonl")]
    except OSError:
        bad.append(f"run{r}: no events"); continue
    kills = [e for e in ev if e["event"] == "kill"]
    if not kills:
        bad.append(f"run{r}: no kill"); continue
    kill = kills[0]; t_kill = kill["t_unix_us"]
    killed = kill.get("label") or f"node{kill.get('node')}"
    reports = {}
    for log in glob.glob(f"{d}/node*/node.log"):
        label = log.split("/")[-2]
        if label == killed:
            continue
        me = open(f"{d}/{label}/state/node-id").read().strip()
        for line in open(log):
            m = ts.search(line)
            if not m:
                continue
            t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc).timestamp() * 1e6
            if t < t_kill:
                continue
            leader = me if m.group(2).startswith("this node") else m.group(3)
            reports[label] = (t, leader)
            break
    leaders = {l for _, l in reports.values()}
    if len(reports) < 2 or len(leaders) != 1:
        bad.append(f"run{r}: survivors reported {reports}"); continue
    times.append(max(t for t, _ in reports.values()) - t_kill)
    summ = [l for l in open(f"{d}/summary.txt") if l.startswith("SUMMARY ")]
    if summ:
        s = json.loads(summ[0][8:])
        for a in s.get("after_kill", []):
            for n, st in a["nodes"].items():
                if st["missed"] or st["doubled"] or st["backsteps"]:
                    bad.append(f"run{r}: {n} {st}")
                print(f"run{r} {n}: missed {st['missed']} doubled {st['doubled']} jump_max_us {st['jump_max_us']}")
if times:
    ms = sorted(t / 1000 for t in times)
    print(f"FAILOVER runs={len(ms)} p50_ms={statistics.median(ms):.1f} max_ms={ms[-1]:.1f} all_ms={[round(x) for x in ms]}")
for b in bad:
    print("PROBLEM", b)
PY
