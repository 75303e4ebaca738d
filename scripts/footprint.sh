#!/usr/bin/env bash
# Footprint of one bandsync node (issue 7, SPEC §6 targets):
#   * binary size (release profile: LTO, panic=abort, stripped) and stripped size
#   * idle RSS (VmRSS sampled every second, VmHWM) and idle CPU (utime+stime from
#     /proc/PID/stat) over --seconds N (default 60) of
#       bandsync run --audio null --interface lo --quic 127.0.0.1:0 --http 127.0.0.1:0 --state-dir TMP
#     after a --warmup of 2 s (start-up is not idle)
#   * start to first click: from spawning `bandsync run --play --click-log F` to the
#     first click's t_mono_ns in F (both CLOCK_MONOTONIC), fresh state dir each time
#     (first boot: id, certificate and room key are generated), --starts N runs
# It prints a table, then one line `FOOTPRINT {json}`. Loopback only.
#
#   scripts/footprint.sh [--seconds N] [--warmup S] [--starts N] [--binary PATH]
#                        [--playing] [--check]
#   --binary PATH  measure this binary instead of building (cargo build --release)
#   --playing      measure RSS/CPU with the transport running (--play) instead of stopped
#   --check        exit 1 when a target is missed (RSS ≤ 16 MiB, CPU ≤ 1 %, start ≤ 1 s)
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_RUN=60 WARMUP=2 STARTS=3 BINARY="" PLAYING=0 CHECK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_RUN="${2:?}"; shift ;;
        --warmup) WARMUP="${2:?}"; shift ;;
        --starts) STARTS="${2:?}"; shift ;;
        --binary) BINARY="${2:?}"; shift ;;
        --playing) PLAYING=1 ;;
        --check) CHECK=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "footprint: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for v in "$SECONDS_RUN" "$WARMUP" "$STARTS"; do
    case "$v" in ''|*[!0-9]*) echo "footprint: --seconds/--warmup/--starts want whole numbers, got $v" >&2; exit 2 ;; esac
done
[ "$SECONDS_RUN" -ge 1 ] && [ "$STARTS" -ge 1 ] || { echo "footprint: --seconds and --starts must be ≥ 1" >&2; exit 2; }

if [ -z "$BINARY" ]; then
    echo "footprint: cargo build --release --locked --bin bandsync" >&2
    cargo build --release --locked --bin bandsync >&2
    BINARY="${CARGO_TARGET_DIR:-target}/release/bandsync"
fi
[ -x "$BINARY" ] || { echo "footprint: no executable $BINARY" >&2; exit 2; }

exec python3 - "$BINARY" "$SECONDS_RUN" "$WARMUP" "$STARTS" "$PLAYING" "$CHECK" <<'PY'
import json, os, shutil, signal, statistics, subprocess, sys, tempfile, time

binary, seconds, warmup, starts, playing, check = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6] == "1"
TICK = os.sysconf("SC_CLK_TCK")
RSS_TARGET_KB, CPU_TARGET_PCT, START_TARGET_MS = 16 * 1024, 1.0, 1000.0
LOOPBACK = ["--audio", "null", "--interface", "lo", "--quic", "127.0.0.1:0", "--http", "127.0.0.1:0"]

def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)

def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)

def sched_ns(pid):
    """On-CPU time of all live threads in ns (/proc/PID/task/*/schedstat), or None."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total

def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

tmp = tempfile.mkdtemp(prefix="bandsync-footprint-")
procs = []
try:
    # Binary size.
    size = os.path.getsize(binary)
    stripped = size
    if shutil.which("strip"):
        s = os.path.join(tmp, "bandsync.stripped")
        subprocess.run(["strip", "-o", s, binary], check=True)
        stripped = os.path.getsize(s)

    # Idle RSS and CPU.
    args = [binary, "run", *LOOPBACK, "--state-dir", os.path.join(tmp, "idle-state")] + (["--play"] if playing else [])
    log = open(os.path.join(tmp, "idle.log"), "w")
    p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    procs.append(p)
    time.sleep(warmup)
    if p.poll() is not None:
        sys.exit(f"footprint: the daemon exited during warm-up (status {p.returncode}):\n" + open(log.name).read())
    rss_start = status_kb(p.pid, "VmRSS")
    c0, s0, t0 = cpu_ticks(p.pid), sched_ns(p.pid), time.monotonic()
    rss = []
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if p.poll() is not None:
            sys.exit(f"footprint: the daemon died (status {p.returncode}):\n" + open(log.name).read())
        rss.append(status_kb(p.pid, "VmRSS"))
    c1, s1, t1 = cpu_ticks(p.pid), sched_ns(p.pid), time.monotonic()
    hwm = status_kb(p.pid, "VmHWM")
    threads = status_kb(p.pid, "Threads")
    total_ticks = c1
    stop(p)
    cpu_pct = 100.0 * (c1 - c0) / TICK / (t1 - t0)
    # Finer grained (ns) cross-check; threads that ended in between are not counted.
    cpu_pct_sched = None if s0 is None or s1 is None else 100.0 * (s1 - s0) / 1e9 / (t1 - t0)

    # Start to first click.
    firsts = []
    for i in range(starts):
        d = os.path.join(tmp, f"start-{i}")
        os.mkdir(d)
        clog = os.path.join(d, "clicks.jsonl")
        slog = open(os.path.join(d, "node.log"), "w")
        t_spawn = time.monotonic_ns()
        q = subprocess.Popen([binary, "run", *LOOPBACK, "--state-dir", os.path.join(d, "state"), "--play", "--click-log", clog],
                             stdout=slog, stderr=subprocess.STDOUT)
        procs.append(q)
        first = None
        give_up = time.monotonic() + 10
        while first is None and time.monotonic() < give_up and q.poll() is None:
            time.sleep(0.01)
            try:
                with open(clog) as f:
                    line = f.readline()
                if line.endswith("\n"):
                    first = json.loads(line)
            except FileNotFoundError:
                pass
        stop(q)
        if first is None:
            sys.exit(f"footprint: no click within 10 s of start (run {i}):\n" + open(slog.name).read())
        firsts.append((first["t_mono_ns"] - t_spawn) / 1e6)

    result = {
        "binary": binary,
        "binary_bytes": size,
        "binary_stripped_bytes": stripped,
        "state": "playing" if playing else "stopped",
        "seconds": round(t1 - t0, 3),
        "rss_kb_start": rss_start,
        "rss_kb_end": rss[-1],
        "rss_kb_max": max(rss),
        "vm_hwm_kb": hwm,
        "threads": threads,
        "cpu_pct": round(cpu_pct, 3),
        "cpu_ticks": c1 - c0,
        "cpu_pct_schedstat": None if cpu_pct_sched is None else round(cpu_pct_sched, 3),
        "clk_tck": TICK,
        "cpu_s_incl_startup": round(total_ticks / TICK, 2),
        "start_to_first_click_ms": [round(x, 1) for x in firsts],
        "start_to_first_click_ms_median": round(statistics.median(firsts), 1),
        "start_to_first_click_ms_max": round(max(firsts), 1),
    }
    ok = {
        "rss": max(rss) <= RSS_TARGET_KB,
        "cpu": cpu_pct <= CPU_TARGET_PCT,
        "start": max(firsts) <= START_TARGET_MS,
    }
    result["targets_met"] = ok

    mark = lambda b: "ok" if b else "MISSED"
    rows = [
        ("binary size", f"{size / 1024 / 1024:.2f} MiB ({size} B)", ""),
        ("stripped binary size", f"{stripped / 1024 / 1024:.2f} MiB ({stripped} B)", ""),
        (f"idle RSS ({result['state']}), end / max", f"{rss[-1] / 1024:.1f} / {max(rss) / 1024:.1f} MiB", f"≤ 16 MiB  {mark(ok['rss'])}"),
        ("VmHWM (peak RSS, incl. start-up)", f"{hwm / 1024:.1f} MiB", ""),
        (f"idle CPU over {t1 - t0:.0f} s", f"{cpu_pct:.3f} % of a core ({c1 - c0} ticks @ {TICK} Hz)", f"≤ 1 %  {mark(ok['cpu'])}"),
        ("idle CPU, schedstat (ns) cross-check", "n/a" if cpu_pct_sched is None else f"{cpu_pct_sched:.3f} % of a core", ""),
        ("threads", str(threads), ""),
        (f"start → first click ({starts} runs)", f"median {statistics.median(firsts):.1f} ms, max {max(firsts):.1f} ms", f"≤ 1 s  {mark(ok['start'])}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'what':<{w0}}  {'measured':<{w1}}  target")
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")
    print("FOOTPRINT " + json.dumps(result, separators=(",", ":")))
    sys.stdout.flush()
    if check and not all(ok.values()):
        sys.exit(1)
finally:
    for p in procs:
        stop(p)
    shutil.rmtree(tmp, ignore_errors=True)
PY
