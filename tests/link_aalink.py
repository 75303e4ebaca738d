#!/usr/bin/env python3
"""Two bandsync boxes and a real Ableton Link peer (the `aalink` wheel), measured.

Run by tests/link_aalink.rs *inside* a fresh network namespace that has only `lo`
(up, with a multicast route): nothing leaves the namespace. Standalone:

    ip netns add lk && ip -n lk link set lo up && ip -n lk route add 224.0.0.0/4 dev lo
    ip netns exec lk python3 tests/link_aalink.py --bin target/debug/bandsync --dir /tmp/x
    ip netns del lk

Box A runs with BANDSYNC_TEST_CLOCK=offset_ms=250,skew_ppm=100, box B with
offset_ms=-250,skew_ppm=-100, both `--play --tempo 123`. Then aalink starts at 90 BPM
(quantum 4, start/stop sync on) and the script measures:

  join        seconds until aalink's tempo is the room's (123)
  phase       aalink's beat vs each box's click log at the same CLOCK_MONOTONIC
              instant (|error| in ms: p50/p95/max; the Link beat minus the room beat
              must be a multiple of the meter), for 36 s after the join: across
              aalink's own 30-s clock re-measurement, while the room steers its ghost
              clock onto aalink's (the boxes' `bandsync_link_*` metrics are reported)
  tempo       `bandsync tempo 100` → seconds until aalink shows 100
  overrule    aalink sets 90 → seconds until it is back to the room's 100
  stop/start  `bandsync stop` / `start` → seconds until aalink follows
  kill        SIGKILL the leader box → aalink's phase vs the survivor, before/after

It prints progress lines and one final line `RESULTS <json>`; the Rust test asserts.
Every process it starts is killed (by pid) when it exits.
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

CLOCKS = {"a": "offset_ms=250,skew_ppm=100", "b": "offset_ms=-250,skew_ppm=-100"}
UNSKEWED = {"a": "offset_ms=250,skew_ppm=0", "b": "offset_ms=-250,skew_ppm=0"}
METER = 4
CHILDREN = []


def log(*a):
    print("[link_aalink %.3f]" % time.monotonic(), *a, flush=True)


def mono_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def free_port(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Box:
    def __init__(self, name, args):
        self.name = name
        self.dir = os.path.join(args.dir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.quic = free_port(socket.SOCK_DGRAM)
        self.http = free_port(socket.SOCK_STREAM)
        self.clicks = os.path.join(self.dir, "clicks.jsonl")
        self.log = os.path.join(self.dir, "node.log")
        env = dict(os.environ, BANDSYNC_TEST_CLOCK=args.clocks[name], BANDSYNC_LOG="info")
        env.pop("BANDSYNC_TEST_IMPAIR", None)
        cmd = [args.bin, "run", "--audio", "null", "--interface", "lo", "--name", "box-" + name,
               "--quic", "127.0.0.1:%d" % self.quic, "--http", "127.0.0.1:%d" % self.http,
               "--room", args.room, "--room-key-file", args.key, "--state-dir",
               os.path.join(self.dir, "state"), "--click-log", self.clicks,
               "--play", "--tempo", "123", "--meter", str(METER)]
        self.p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(self.log, "w"))
        CHILDREN.append(self.p)

    def health(self):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/health" % self.http, timeout=2) as r:
                return json.loads(r.read())
        except Exception:
            return None

    def metric(self, name):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.http, timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(name + " "):
                        return float(line.split()[1])
        except Exception:
            return None
        return None

    def alive(self):
        return self.p.poll() is None

    def read_clicks(self):
        out = []
        try:
            with open(self.clicks) as f:
                for line in f:
                    try:
                        o = json.loads(line)
                        out.append((o["t_mono_ns"], o["beat"]))
                    except (ValueError, KeyError):
                        pass
        except FileNotFoundError:
            pass
        out.sort()
        return out


def cli(args, box, *words):
    cmd = [args.bin, *words, "--node", "127.0.0.1:%d" % box.quic, "--room", args.room,
           "--room-key-file", args.key]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    log("cli", " ".join(words), "->", r.returncode, (r.stdout + r.stderr).strip()[:200])
    return r.returncode == 0


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else None


def box_beat_at(clicks, t):
    """The box's beat position at CLOCK_MONOTONIC t (interpolated between its clicks),
    and its beat length in ns there; None outside its clicks or across a gap."""
    lo, hi = 0, len(clicks) - 1
    if hi < 1 or t < clicks[0][0] or t >= clicks[-1][0]:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if clicks[mid][0] <= t:
            lo = mid
        else:
            hi = mid
    (t0, b0), (t1, b1) = clicks[lo], clicks[lo + 1]
    if b1 != b0 + 1:
        return None
    return b0 + (t - t0) / (t1 - t0), (t1 - t0)


def phase_stats(samples, clicks):
    """|aalink beat − box beat| in ms at the samples' instants, and the line through
    the signed errors (Link re-measures its clock offset only every 30 s, so a
    session clock that runs at another rate than aalink's shows as a slope)."""
    e = errors(samples, clicks)
    if not e:
        return None
    a = [abs(x) for _, x, _ in e]
    offsets = sorted({k for _, _, k in e})
    f = fit(e)
    return {"n": len(e), "p50_ms": pct(a, 0.5), "p95_ms": pct(a, 0.95), "max_ms": max(a),
            "mean_signed_ms": statistics.mean(x for _, x, _ in e), "beat_offsets": offsets,
            "offsets_on_bars": all(k % METER == 0 for k in offsets),
            "at_start_ms": f and f["at_start_ms"], "drift_ppm": f and f["drift_ppm"],
            "residual_p95_ms": f and f["residual_p95_ms"]}


async def poll(cond, timeout, step=0.002):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        await asyncio.sleep(step)
    return None


async def sample(link, seconds, every=0.02):
    """(CLOCK_MONOTONIC ns, aalink's beat) pairs; a read bracketed by more than
    100 µs of clock reads (the interpreter was preempted) is retried."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(5):
            m1 = mono_ns()
            b = link.beat
            m2 = mono_ns()
            if m2 - m1 < 100_000:
                out.append(((m1 + m2) // 2, b))
                break
        await asyncio.sleep(every)
    return out


def errors(samples, clicks):
    """[(t_ns, signed error ms, beat offset)] of aalink vs a box's click log."""
    out = []
    for (t, b) in samples:
        r = box_beat_at(clicks, t)
        if r is None:
            continue
        bb, period = r
        k = round(b - bb)
        out.append((t, (b - bb - k) * period / 1e6, k))
    return out


def fit(errs):
    """Least-squares line through (t, err): (err at errs[0]'s time ms, slope ppm,
    residual |err − line| p95 ms)."""
    if len(errs) < 3:
        return None
    t0 = errs[0][0]
    xs = [(t - t0) / 1e9 for t, _, _ in errs]
    ys = [e for _, e, _ in errs]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs) or 1e-12
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    icpt = my - slope * mx
    res = [abs(y - (icpt + slope * x)) for x, y in zip(xs, ys)]
    return {"at_start_ms": icpt, "drift_ppm": slope * 1000.0, "residual_p95_ms": pct(res, 0.95),
            "t0_ns": t0, "intercept": icpt, "slope_ms_per_s": slope}


async def main(args):
    import aalink  # noqa: late import: the Rust test reports a missing wheel clearly

    res = {"clocks": args.clocks}
    boxes = {n: Box(n, args) for n in ("a", "b")}
    # Both boxes up and in one room (one leader, each sees the other).
    def joined():
        h = [b.health() for b in boxes.values()]
        return all(x and len(x.get("peers", [])) == 1 for x in h) and h[0]["leader"] == h[1]["leader"]
    t = await poll(joined, 20.0, 0.1)
    if t is None:
        res["error"] = "the two boxes did not form one room"
        return res
    leader = next(n for n, b in boxes.items() if b.health()["role"] == "leader")
    res["leader"] = leader
    # Both clicking the same beats.
    def clicking():
        ca, cb = boxes["a"].read_clicks(), boxes["b"].read_clicks()
        return len(ca) > 2 and len(cb) > 2 and ca[-1][1] - cb[-1][1] in (-1, 0, 1)
    await poll(clicking, 10.0, 0.1)
    await asyncio.sleep(1.0)  # let clock sync settle on the followers' side
    log("boxes joined; leader", leader)

    link = aalink.Link(90)
    link.quantum = METER
    link.start_stop_sync_enabled = True
    t_enable = time.monotonic()
    link.enabled = True
    dt = await poll(lambda: abs(link.tempo - 123.0) < 1e-3, 5.0)
    res["join_s"] = dt
    res["tempo_after_join"] = link.tempo
    log("join", dt, "tempo", link.tempo, "peers", link.num_peers)
    await poll(lambda: link.playing, 2.0)
    res["playing_after_join"] = link.playing

    s_join = await sample(link, args.phase_s)
    res["tempo_during_phase"] = link.tempo
    # The room steers its ghost clock onto aalink's (core::link::steer).
    res["steering"] = {n: {k: b.metric("bandsync_link_" + k) for k in
                           ("steps_total", "app_samples_total", "shift_us")}
                       for n, b in boxes.items()}
    # every box holds the leader's shift (read both until a read falls between steps)
    res["shift_agrees"] = False
    for _ in range(20):
        sa, sb = (b.metric("bandsync_link_shift_us") for b in boxes.values())
        if sa is not None and sa == sb:
            res["shift_agrees"] = True
            break
        await asyncio.sleep(0.05)
    if args.short:
        link.enabled = False
        for b in boxes.values():
            b.p.send_signal(signal.SIGTERM)
            b.p.wait(timeout=10)
        clicks = {n: b.read_clicks() for n, b in boxes.items()}
        res["phase"] = {"join": {n: phase_stats(s_join, clicks[n]) for n in boxes}}
        return res

    # Room tempo change from the CLI (lands on the next bar on every box).
    t_cmd = time.monotonic()
    res["tempo_cli_ok"] = cli(args, boxes["a"], "tempo", "100")
    dt = await poll(lambda: abs(link.tempo - 100.0) < 1e-3, 5.0)
    res["tempo_change_s"] = None if dt is None else time.monotonic() - t_cmd
    await asyncio.sleep(0.3)
    s_tempo = await sample(link, 3.0)

    # The Link app's own change is overruled.
    link.tempo = 90
    saw = await poll(lambda: abs(link.tempo - 90) < 1e-3, 0.3, 0.0005)
    dt = await poll(lambda: abs(link.tempo - 100.0) < 1e-3, 5.0, 0.0005)
    res["overrule_s"] = dt
    res["app_change_visible_locally"] = saw is not None
    res["tempo_after_overrule"] = link.tempo
    await asyncio.sleep(0.3)
    s_overrule = await sample(link, 2.0)

    # Start/stop follows the room.
    t_cmd = time.monotonic()
    res["stop_cli_ok"] = cli(args, boxes["b"], "stop")
    dt = await poll(lambda: not link.playing, 5.0, 0.001)
    res["stop_s"] = None if dt is None else time.monotonic() - t_cmd
    # ... a start from the app is overruled ...
    link.playing = True
    await poll(lambda: link.playing, 0.2, 0.0005)
    dt = await poll(lambda: not link.playing, 5.0, 0.0005)
    res["start_overrule_s"] = dt
    t_cmd = time.monotonic()
    res["start_cli_ok"] = cli(args, boxes["b"], "start")
    dt = await poll(lambda: link.playing, 5.0, 0.001)
    res["start_s"] = None if dt is None else time.monotonic() - t_cmd
    await asyncio.sleep(2.5)  # the start lands on a bar; clicks resume

    # What the boxes counted as Link apps' changes: aalink's tempo and start, nothing
    # else (the room's own steps are no app's change).
    res["overruled"] = {n: b.metric('bandsync_link_messages_total{kind="overruled"}')
                        for n, b in boxes.items()}

    # Kill the leader: the Link peer keeps tempo and phase.
    survivor = "b" if leader == "a" else "a"
    s_before = await sample(link, 1.5)
    t_kill = mono_ns()
    os.kill(boxes[leader].p.pid, signal.SIGKILL)
    boxes[leader].p.wait()
    log("killed the leader box", leader)
    s_after = await sample(link, 3.0)
    res["tempo_after_kill"] = link.tempo
    res["peers_after_kill"] = link.num_peers
    res["playing_after_kill"] = link.playing
    link.enabled = False

    # Stop the survivor (SIGTERM: orderly, flushes its click log).
    boxes[survivor].p.send_signal(signal.SIGTERM)
    try:
        boxes[survivor].p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        boxes[survivor].p.kill()
    clicks = {n: b.read_clicks() for n, b in boxes.items()}
    res["clicks"] = {n: len(c) for n, c in clicks.items()}
    res["phase"] = {}
    for label, s in (("join", s_join), ("tempo", s_tempo), ("overrule", s_overrule)):
        res["phase"][label] = {n: phase_stats(s, clicks[n]) for n in boxes}
    res["phase"]["before_kill"] = phase_stats(s_before, clicks[survivor])
    res["phase"]["after_kill"] = phase_stats(s_after, clicks[survivor])
    # The jump at the kill: both sides' lines evaluated at the kill instant (the
    # first 300 ms after it left out: the survivor's clicks are the reference).
    res["kill_jump_ms"] = None
    fb = fit(errors(s_before, clicks[survivor]))
    fa = fit(errors([x for x in s_after if x[0] > t_kill + 300_000_000], clicks[survivor]))
    if fb and fa:
        at = lambda f: f["intercept"] + f["slope_ms_per_s"] * (t_kill - f["t0_ns"]) / 1e9
        res["kill_jump_ms"] = abs(at(fa) - at(fb))
    res["after_kill_max_ms"] = max((abs(e) for _, e, _ in errors(s_after, clicks[survivor])), default=None)
    # Phase error over time since join (1 s bins), against box A: shows drift.
    bins = {}
    for (t, b) in s_join:
        r = box_beat_at(clicks["a"], t)
        if r:
            k = round(b - r[0])
            bins.setdefault(int((t / 1e9) - (s_join[0][0] / 1e9)), []).append((b - r[0] - k) * r[1] / 1e6)
    res["phase_join_by_second_ms"] = {k: round(statistics.mean(v), 3) for k, v in sorted(bins.items())}
    return res


def run(args):
    try:
        res = asyncio.run(main(args))
    except Exception as e:  # report, never hang
        import traceback
        traceback.print_exc()
        res = {"error": repr(e)}
    finally:
        for p in CHILDREN:
            if p.poll() is None:
                p.kill()
                p.wait()
    print("RESULTS " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--room", default="link-%d" % os.getpid())
    ap.add_argument("--key", help="room key file (written if absent)")
    ap.add_argument("--phase-s", type=float, default=36.0,
                    help="phase samples after join (36 s: across aalink's 30-s re-measurement)")
    ap.add_argument("--short", action="store_true",
                    help="only join + phase, with unskewed clocks (offsets ±250 ms)")
    a = ap.parse_args()
    a.clocks = UNSKEWED if a.short else CLOCKS
    os.makedirs(a.dir, exist_ok=True)
    if not a.key:
        a.key = os.path.join(a.dir, "room.key")
    if not os.path.exists(a.key):
        with open(a.key, "w") as f:
            f.write("5a" * 32)
    sys.exit(run(a))
