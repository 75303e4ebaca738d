#!/usr/bin/env python3
"""Summarise bandsync click logs (SPEC §5) from one machine: alignment, gaps, jumps.

Usage:
    lab_summary.py [--warmup S] [--node-warmup S] [--events FILE] [--json-only] CLICKS.jsonl...
    lab_summary.py --self-test

Each input is a click log: one JSON object per line,
    {"node": "<id>", "beat": <int>, "t_mono_ns": <int>, "epoch": <u64>}
All logs must come from one machine: every node's t_mono_ns is the same true
CLOCK_MONOTONIC, so click times compare directly.

A node is labelled by its log's folder ("out/node2/clicks.jsonl" -> "node2"), else by
the file name, else by its id. Clicks earlier than (first click of all + --warmup) are
skipped, and so are a node's clicks earlier than (its own first click + --node-warmup).

Reported, after the warm-up:
  * spread: for every beat index heard on >= 2 nodes, max t - min t over those nodes;
    count, p50, p99, max (µs), overall and for every pair of nodes (|ti - tj|);
  * per node: clicks, first/last beat, missed beats (holes between its first and its
    last beat), doubled beats (a beat clicked more than once), backsteps (a click whose
    beat is not above the previous click's), the epochs seen, and the phase jump:
    the largest deviation of an interval between successive clicks from the node's
    median beat interval (times the beats between them), in µs. A click moved by X µs
    shows up as a jump of X;
  * with --events (lab.sh's events.jsonl): start-to-first-click per node; what the
    survivors did after a node was killed; for a node that joined, how long after its
    start it first clicked within 1 ms of another node on the same beat ("following the
    room"), its figures from then on, and what the others did after it joined.
The last line is machine readable:
    SUMMARY {"nodes":..,"clicking_nodes":..,"beats":..,"pairs":..,"p50_us":..,"p99_us":..,
             "max_us":..,"missed":..,"doubled":..,"backsteps":..,"jump_max_us":..,
             "bad_lines":..,"missing_files":..,"epochs":[..],"pair":{"node1-node2":{"n",
             "p50_us","p99_us","max_us"}},"node":{"node1":{..}},"after_kill":[..],
             "after_join":[..]}
  beats = beat indices heard on >= 2 nodes (the spread's count), pairs = pairwise
  samples; figures in µs, null when there is no data.
Exit status: 0 when the logs were read (whatever the figures), 2 on usage errors or when
no input file could be read at all.
"""

import argparse
import bisect
import json
import math
import os
import sys
import tempfile

NS_PER_US = 1000.0
# A joining node follows the room from its first click within this of another node's
# click on the same beat.
ALIGN_NS = 1_000_000


# ---------------------------------------------------------------------------- input

class NodeLog:
    """The clicks of one node, from one file."""

    def __init__(self, label, path, node_id):
        self.label = label
        self.path = path
        self.node_id = node_id
        self.clicks = []  # (t_mono_ns, beat, epoch), file order
        self.skipped = 0  # before the warm-up


def label_for(path):
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    base = os.path.basename(path)
    stem = base.split(".")[0]
    if stem in ("clicks", "click", "click-log", "clicklog") and parent:
        return parent
    return stem or base


def parse_line(line):
    """Returns (node, beat, t, epoch) or raises ValueError naming the problem."""
    try:
        o = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError("not JSON (%s)" % e.msg)
    if not isinstance(o, dict):
        raise ValueError("not a JSON object")

    def int_field(k, minimum=None):
        if k not in o:
            raise ValueError("missing %r" % k)
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("%r is not an integer: %r" % (k, v))
        if minimum is not None and v < minimum:
            raise ValueError("%r is below %d: %r" % (k, minimum, v))
        return v

    node = o.get("node")
    if not isinstance(node, str) or not node:
        raise ValueError("missing or empty 'node'")
    return node, int_field("beat"), int_field("t_mono_ns", 0), int_field("epoch", 0)


def read_logs(paths):
    """Returns (nodes, problems): nodes is a list of NodeLog, problems a dict."""
    problems = {"bad_lines": 0, "bad_examples": [], "missing_files": []}
    nodes = []
    labels_used = {}
    for path in paths:
        per_id = {}
        try:
            f = open(path, "r", encoding="utf-8", errors="replace")
        except OSError as e:
            problems["missing_files"].append("%s (%s)" % (path, e.strerror or e))
            # Keep the node in the report: it never clicked (or never started).
            label = label_for(path)
            if label in labels_used:
                labels_used[label] += 1
                label = "%s#%d" % (label, labels_used[label])
            else:
                labels_used[label] = 1
            nodes.append(NodeLog(label, path, "?"))
            continue
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    node, beat, t, epoch = parse_line(line)
                except ValueError as e:
                    problems["bad_lines"] += 1
                    if len(problems["bad_examples"]) < 5:
                        problems["bad_examples"].append("%s:%d: %s" % (path, lineno, e))
                    continue
                per_id.setdefault(node, []).append((t, beat, epoch))
        base = label_for(path)
        if not per_id:
            # Keep the node in the report: it never clicked.
            per_id = {"?": []}
        for node_id, clicks in per_id.items():
            label = base if len(per_id) == 1 else "%s/%s" % (base, node_id[:8])
            if label in labels_used:
                labels_used[label] += 1
                label = "%s#%d" % (label, labels_used[label])
            else:
                labels_used[label] = 1
            nl = NodeLog(label, path, node_id)
            nl.clicks = clicks
            nodes.append(nl)
    return nodes, problems


def read_events(path):
    events = []
    if not path:
        return events
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    o = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(o, dict) and isinstance(o.get("t_mono_ns"), int):
                    events.append(o)
    except OSError as e:
        print("warning: cannot read events %s: %s" % (path, e.strerror or e), file=sys.stderr)
    return events


# ---------------------------------------------------------------------------- maths

def percentile(sorted_vals, p):
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_vals:
        return None
    k = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return sorted_vals[min(k, len(sorted_vals)) - 1]


def dist(values_ns):
    v = sorted(values_ns)
    return {
        "n": len(v),
        "p50_us": us(percentile(v, 50)),
        "p99_us": us(percentile(v, 99)),
        "max_us": us(v[-1] if v else None),
    }


def us(ns):
    return None if ns is None else round(ns / NS_PER_US, 1)


def median(vals):
    v = sorted(vals)
    n = len(v)
    if n == 0:
        return None
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


def node_stats(clicks):
    """Stats of one node's clicks (already warm-up filtered), in time order."""
    cs = sorted(clicks, key=lambda c: c[0])
    st = {"clicks": len(cs), "first_beat": None, "last_beat": None, "missed": 0,
          "doubled": 0, "backsteps": 0, "epochs": [], "jump_max_us": None,
          "jump_at_beat": None, "interval_us": None, "missed_beats": [], "doubled_beats": []}
    if not cs:
        return st
    beats = [c[1] for c in cs]
    st["first_beat"], st["last_beat"] = beats[0], beats[-1]
    st["epochs"] = sorted({c[2] for c in cs})
    distinct = set(beats)
    lo, hi = min(distinct), max(distinct)
    st["missed"] = (hi - lo + 1) - len(distinct)
    st["doubled"] = len(beats) - len(distinct)
    if st["missed"]:
        st["missed_beats"] = [b for b in range(lo, hi + 1) if b not in distinct][:10]
    seen = set()
    for b in beats:
        if b in seen and b not in st["doubled_beats"]:
            st["doubled_beats"].append(b)
        seen.add(b)
    st["doubled_beats"] = st["doubled_beats"][:10]
    st["backsteps"] = sum(1 for a, b in zip(beats, beats[1:]) if b <= a)

    # Phase jumps: successive intervals against the node's beat interval. The interval is
    # the median slope over spans of k clicks: robust to a few jumps, and k times less
    # sensitive than single intervals to the one-sample (20.8 µs at 48 kHz) quantization
    # of click onsets, which is also the floor of the jump figure.
    steps = [(cs[i][0] - cs[i - 1][0], cs[i][1] - cs[i - 1][1], cs[i][1]) for i in range(1, len(cs))
             if cs[i][1] > cs[i - 1][1]]
    mono = [cs[0]]
    for c in cs[1:]:
        if c[1] > mono[-1][1]:
            mono.append(c)
    k = max(1, min(16, (len(mono) - 1) // 4))
    m = median([(mono[i + k][0] - mono[i][0]) / (mono[i + k][1] - mono[i][1])
                for i in range(len(mono) - k)])
    if m is not None:
        st["interval_us"] = round(m / NS_PER_US, 3)
        worst, at = -1.0, None
        for dt, db, b in steps:
            dev = abs(dt - m * db)
            if dev > worst:
                worst, at = dev, b
        st["jump_max_us"] = us(worst)
        st["jump_at_beat"] = at
    return st


def spreads(nodes, only=None):
    """Per-beat spread over nodes, and pairwise |ti - tj| for each pair.

    A beat clicked twice on a node counts with its first click. `only` restricts the
    nodes (labels) taken into account."""
    by_beat = {}
    for nl in nodes:
        if only is not None and nl.label not in only:
            continue
        first = {}
        for t, b, _ in nl.kept:
            if b not in first or t < first[b]:
                first[b] = t
        for b, t in first.items():
            by_beat.setdefault(b, {})[nl.label] = t
    spread_ns = []
    pairs = {}
    labels = [nl.label for nl in nodes if only is None or nl.label in only]
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            pairs[(a, b)] = []
    for b, ts in by_beat.items():
        if len(ts) < 2:
            continue
        vals = list(ts.values())
        spread_ns.append(max(vals) - min(vals))
        items = list(ts.items())
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (la, ta), (lb, tb) = items[i], items[j]
                key = (la, lb) if (la, lb) in pairs else (lb, la)
                pairs[key].append(abs(ta - tb))
    return spread_ns, pairs


# ---------------------------------------------------------------------------- heals, tempo, stranger

def read_status(path):
    """lab.sh's status.jsonl: [(t_mono_ns, {label: {role, leader, epoch, tempo, ...}})]."""
    samples = []
    if not path:
        return samples
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    o = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(o, dict) and isinstance(o.get("t_mono_ns"), int) and isinstance(o.get("s"), dict):
                    samples.append((o["t_mono_ns"], o["s"]))
    except OSError as e:
        print("warning: cannot read status samples %s: %s" % (path, e.strerror or e), file=sys.stderr)
    samples.sort(key=lambda x: x[0])
    return samples


def status_agrees(snap, want_n):
    """One leader and one epoch named by every sampled node (and at least want_n of them)."""
    if len(snap) < max(1, want_n):
        return False
    leaders = {s.get("leader") for s in snap.values()}
    epochs = {s.get("epoch") for s in snap.values()}
    return len(leaders) == 1 and len(epochs) == 1 and None not in leaders


def window_states(samples, t0, t1):
    """The status step function over [t0, t1): the state in force at t0, then every change."""
    before = [s for s in samples if s[0] <= t0]
    seq = [(t0, before[-1][1])] if before else []
    seq += [s for s in samples if t0 < s[0] < t1]
    return seq


def settle_time(seq, ok, t0):
    """ns after t0 from which ok(state) holds for good (0: it always held; None: never)."""
    if not seq:
        return None
    last_bad = None
    for i, (t, st) in enumerate(seq):
        if not ok(st):
            last_bad = i
    if last_bad is None:
        return 0
    if last_bad + 1 < len(seq):
        return seq[last_bad + 1][0] - t0
    return None


def click_index(nodes):
    """label -> {beat: [t...]} over each node's whole log."""
    idx = {}
    for nl in nodes:
        d = {}
        for t, b, _ in nl.clicks:
            d.setdefault(b, []).append(t)
        idx[nl.label] = d
    return idx


def timeline_settle(nodes, idx, t0, t1, tol_ns=ALIGN_NS):
    """Clicks in [t0, t1): a click is good when it is its node's last click of that beat
    (within 10 s) and every other node clicking in the window clicked the same beat within tol_ns.
    Returns (ns after t0 of the first good click after the last bad one, 0 when none was
    bad, None when no good click follows; number of bad clicks; nodes in the window)."""
    live = [nl for nl in nodes if any(t0 <= c[0] < t1 for c in nl.clicks)]
    clicks = sorted((t, b, nl.label) for nl in live for t, b, _ in nl.clicks if t0 <= t < t1)
    bad_t, bad_n = None, 0
    goods = []
    for t, b, lab in clicks:
        mine = [u for u in idx[lab].get(b, []) if abs(u - t) < 10_000_000_000]
        # a beat clicked twice (a node realigned backwards): only the later click can be good
        good = t == max(mine) and all(
            any(abs(u - t) <= tol_ns for u in idx[o.label].get(b, [])) for o in live if o.label != lab)
        if good:
            goods.append(t)
        else:
            bad_n += 1
            bad_t = t
    if bad_t is None:
        return (0 if clicks else None), 0, len(live)
    after = [t for t in goods if t > bad_t]
    return (after[0] - t0 if after else None), bad_n, len(live)


def heal_report(nodes, events, samples, meter=4):
    heals = sorted(e["t_mono_ns"] for e in events if e.get("event") == "heal")
    if not heals:
        return None
    parts = sorted(e["t_mono_ns"] for e in events if e.get("event") == "partition")
    stops = [e["t_mono_ns"] for e in events if e.get("event") == "stop"]
    t_stop = min(stops) if stops else max((c[0] for nl in nodes for c in nl.clicks), default=0)
    idx = click_index(nodes)
    res = []
    for k, h in enumerate(heals):
        nxt = [p for p in parts if p > h]
        t1 = min(nxt[0] if nxt else t_stop, t_stop - 1_000_000_000)
        seq = window_states(samples, h, t1)
        want = max((len(s) for _, s in seq), default=0)
        a = settle_time(seq, lambda st: status_agrees(st, want), h) if samples else None
        b, bad, live = timeline_settle(nodes, idx, h, t1)
        tot = None if (a is None and samples) or b is None else max(a or 0, b)
        after = seq[-1][1] if seq else {}
        # SPEC §6 "groups meet": the latest decision on every box within 1 s plus the next
        # bar: the first downbeat (beat % meter == 0) of the settled timeline after heal + 1 s.
        bar = None
        lead = {s.get("leader") for s in after.values()}
        refn = [nl for nl in nodes if nl.node_id in lead] or nodes
        # "the settled timeline": the grid the leader's last two clicks in the window
        # lie on, extrapolated back (no change is made after a heal in these scenarios);
        # a downbeat the leader played on the grid it left does not count.
        ref = []
        for nl in refn:
            cs = sorted(c for c in nl.clicks if h <= c[0] < t1)
            if len(cs) < 2 or cs[-1][1] != cs[-2][1] + 1:
                continue
            (ta, ba, _), (tb, bb, _) = cs[-2], cs[-1]
            period = tb - ta
            b = bb - (tb - (h + 1_000_000_000)) // period
            while True:
                tt = tb - (bb - b) * period
                if tt >= h + 1_000_000_000 and b % meter == 0:
                    break
                b += 1
            ref.append(tt)
        if ref:
            bar = min(ref)
        in_bar = None if tot is None or bar is None else h + tot <= bar + ALIGN_NS
        res.append({"bar_deadline_ms": None if bar is None else round((bar - h) / 1e6, 1),
                    "within_1s_plus_bar": in_bar,
                    "heal": k, "t_mono_ns": h, "window_ms": round((t1 - h) / 1e6),
                    "leader_epoch_ms": None if a is None else round(a / 1e6, 1),
                    "clicks_ms": None if b is None else round(b / 1e6, 1), "bad_clicks": bad,
                    "nodes": live, "total_ms": None if tot is None else round(tot / 1e6, 1),
                    "leader": sorted({s.get("leader") for s in after.values()} - {None}),
                    "epoch": sorted({s.get("epoch") for s in after.values()} - {None})})
    tots = sorted(r["total_ms"] for r in res if r["total_ms"] is not None)
    return {"heals": res, "n": len(res), "settled": len(tots),
            "p50_ms": percentile(tots, 50), "max_ms": tots[-1] if tots else None,
            "within_1s": sum(1 for x in tots if x <= 1000),
            "within_1s_plus_bar": sum(1 for r in res if r["within_1s_plus_bar"])}


def tempo_segments(clicks, t_base):
    """[[t_s, bpm, n_intervals], ...]: runs of successive clicks (one beat apart) at one
    tempo (BPM to 0.1), t_s = the run's first click in seconds after t_base."""
    cs = sorted(clicks)
    segs = []
    for (ta, ba, _), (tb, bb, _) in zip(cs, cs[1:]):
        if bb - ba != 1 or tb <= ta:
            continue
        bpm = round(60e9 / (tb - ta), 1)
        if segs and abs(segs[-1][1] - bpm) <= 0.15:
            segs[-1][2] += 1
        else:
            segs.append([round((ta - t_base) / 1e9, 3), bpm, 1])
    return segs


def window_spread(nodes, t0, t1):
    """Spread per beat whose first click (over nodes) lies in [t0, t1)."""
    by_beat = {}
    for nl in nodes:
        first = {}
        for t, b, _ in nl.clicks:
            if b not in first or t < first[b]:
                first[b] = t
        for b, t in first.items():
            by_beat.setdefault(b, []).append(t)
    vals = [max(ts) - min(ts) for ts in by_beat.values() if len(ts) >= 2 and t0 <= min(ts) < t1]
    return dist(vals)


def stranger_report(nodes, events, samples, path, cut=None):
    st = [e for e in events if e.get("event") == "stranger_start"]
    if not st:
        return None
    t0 = st[0]["t_mono_ns"]
    ends = [e["t_mono_ns"] for e in events if e.get("event") == "stranger_end"]
    stops = [e["t_mono_ns"] for e in events if e.get("event") == "stop"]
    t_stop = min(stops) if stops else max(c[0] for nl in nodes for c in nl.clicks)
    t1 = ends[0] if ends else t_stop
    rep = {"during": window_spread(nodes, t0, t1), "after": window_spread(nodes, t1 + 1, t_stop),
           "before": window_spread(nodes, max(t0 - 15_000_000_000, cut or 0), t0),
           "flood_s": round((t1 - t0) / 1e9, 1),
           "exits": [e.get("label") for e in events if e.get("event") == "exit"]}
    around = [nl for nl in nodes]
    mb = {}
    for nl in around:
        s = node_stats([c for c in nl.clicks if t0 - 2_000_000_000 <= c[0] < t_stop])
        mb[nl.label] = {"missed": s["missed"], "doubled": s["doubled"], "backsteps": s["backsteps"],
                        "tempo": sorted({x[1] for x in tempo_segments(
                            [c for c in nl.clicks if t0 <= c[0] < t_stop], t0)})}
    rep["nodes"] = mb
    seq = window_states(samples, t0, t_stop)
    rep["leaders_seen"] = sorted({s.get("leader") for _, snap in seq for s in snap.values()} - {None})
    rep["epochs_seen"] = sorted({s.get("epoch") for _, snap in seq for s in snap.values()} - {None})
    rep["one_leader_always"] = bool(seq) and all(
        len({s.get("leader") for s in snap.values()}) == 1 for _, snap in seq)
    try:
        with open(path) as f:
            rep["attack"] = json.load(f)
    except (OSError, ValueError, TypeError):
        rep["attack"] = None
    return rep


# ---------------------------------------------------------------------------- report

# ---------------------------------------------------------------------------- the Link app

def read_jsonl(path):
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    o = json.loads(line)
                except ValueError:
                    continue
                if isinstance(o, dict):
                    out.append(o)
    except OSError:
        pass
    return out


def beat_at(clicks, t):
    """(beat position, beat length ns) of a node at CLOCK_MONOTONIC t, interpolated
    between consecutive clicks; None outside them or across a gap."""
    i = bisect.bisect_right(clicks, (t, float("inf"))) - 1
    if i < 0 or i + 1 >= len(clicks):
        return None
    (t0, b0), (t1, b1) = clicks[i], clicks[i + 1]
    if b1 != b0 + 1 or t1 <= t0:
        return None
    return b0 + (t - t0) / (t1 - t0), t1 - t0


def link_report(nodes, events, path, t_base, meter=4):
    """scripts/link_app.py's samples vs every node's clicks: the app's beat phase
    (|error| ms, where it plays the room's tempo), when it took the room's tempo, how
    long the room's tempo changes (CLI) took to reach it, and how long its own tempo
    changes lasted before the room overruled them."""
    rows = read_jsonl(path)
    samples = [r for r in rows if "beat" in r and isinstance(r.get("t_mono_ns"), int)]
    if not samples:
        return {"error": "no samples in %s" % path}
    enabled = next((r["t_mono_ns"] for r in rows if r.get("event") == "enabled"), samples[0]["t_mono_ns"])
    own = next((r.get("tempo") for r in rows if r.get("event") == "enabled"), None)
    rep = {"samples": len(samples), "nodes": {}}
    for nl in nodes:
        clicks = sorted((t, b) for t, b, _ in nl.clicks)
        errs, offsets, away = [], set(), 0
        for r in samples:
            got = beat_at(clicks, r["t_mono_ns"])
            if got is None:
                continue
            bb, period = got
            room_bpm = 60e9 / period
            if not r.get("playing") or abs(r["tempo"] - room_bpm) > 0.05:
                away += 1
                continue
            k = round(r["beat"] - bb)
            offsets.add(k)
            errs.append(abs(r["beat"] - bb - k) * period / 1e6)
        errs.sort()
        rep["nodes"][nl.label] = {
            "n": len(errs), "not_following": away,
            "p50_ms": percentile(errs, 50) if errs else None,
            "p95_ms": percentile(errs, 95) if errs else None,
            "max_ms": errs[-1] if errs else None,
            "offsets_on_bars": all(k % meter == 0 for k in offsets),
        }
    # the room's tempo as the app took it: the first sample off its own start tempo
    first = next((r for r in samples if own is None or abs(r["tempo"] - own) > 1e-3), None)
    rep["join_s"] = None if first is None else (first["t_mono_ns"] - enabled) / 1e9
    rep["tempo_after_join"] = None if first is None else first["tempo"]
    changes = []
    for e in events:
        if e.get("event") != "cli_start":
            continue
        words = str(e.get("args", "")).split()
        if len(words) >= 2 and words[0] == "tempo":
            try:
                want = float(words[1])
            except ValueError:
                continue
            hit = next((r for r in samples if r["t_mono_ns"] >= e["t_mono_ns"]
                        and abs(r["tempo"] - want) < 1e-3), None)
            changes.append({"tempo": want, "t_s": round((e["t_mono_ns"] - t_base) / 1e9, 2) if t_base else None,
                            "reached_s": None if hit is None else (hit["t_mono_ns"] - e["t_mono_ns"]) / 1e9})
    rep["room_changes"] = changes
    overrules = []
    for r in rows:
        if r.get("event") != "set_tempo":
            continue
        mine = r.get("tempo")
        after = [x for x in samples if x["t_mono_ns"] >= r["t_mono_ns"]]
        back = next((x for x in after if abs(x["tempo"] - mine) > 1e-3), None)
        overrules.append({"tempo": mine, "overruled_s": None if back is None else
                          (back["t_mono_ns"] - r["t_mono_ns"]) / 1e9,
                          "back_to": None if back is None else back["tempo"]})
    rep["app_changes"] = overrules
    return rep


def fmt(v, width=9):
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return ("%.1f" % v).rjust(width)
    return str(v).rjust(width)


def summarise(paths, warmup_s=0.0, node_warmup_s=0.0, events_path=None, out=sys.stdout,
              json_only=False, status_path=None, stranger_path=None, meter=4, link_path=None):
    nodes, problems = read_logs(paths)
    events = read_events(events_path)
    all_t = [c[0] for nl in nodes for c in nl.clicks]
    t_first = min(all_t) if all_t else None
    cut = None if t_first is None else t_first + int(warmup_s * 1e9)
    for nl in nodes:
        own_cut = cut
        if nl.clicks and node_warmup_s > 0:
            own_cut = max(cut, min(c[0] for c in nl.clicks) + int(node_warmup_s * 1e9))
        nl.kept = [c for c in nl.clicks if own_cut is not None and c[0] >= own_cut]
        nl.skipped = len(nl.clicks) - len(nl.kept)
        nl.stats = node_stats(nl.kept)

    spread_ns, pairs = spreads(nodes)
    overall = dist(spread_ns)
    pair_stats = {"%s-%s" % k: dist(v) for k, v in pairs.items()}

    # Events from lab.sh: start -> first click; survivors after a kill.
    starts = {}
    kills = []
    joins = []
    for e in events:
        if e.get("event") == "start" and "label" in e:
            starts[e["label"]] = e["t_mono_ns"]
        elif e.get("event") == "kill" and "label" in e:
            kills.append(e)
        elif e.get("event") == "join" and "label" in e:
            joins.append(e)
    first_click_ms = {}
    for nl in nodes:
        if nl.label in starts and nl.clicks:
            first_click_ms[nl.label] = round((min(c[0] for c in nl.clicks) - starts[nl.label]) / 1e6, 1)
    def others_after(label, tk):
        """Stats of the other nodes that were clicking at tk, from their last click before
        it to the end (warm-up or not): a gap, doubled beat or jump across tk counts."""
        res = {}
        for nl in nodes:
            if nl.label == label:
                continue
            cs = sorted(nl.clicks)
            before = [c for c in cs if c[0] < tk]
            if not before:
                continue
            st = node_stats(before[-1:] + [c for c in cs if c[0] >= tk])
            res[nl.label] = {"missed": st["missed"], "doubled": st["doubled"],
                             "backsteps": st["backsteps"], "jump_max_us": st["jump_max_us"],
                             "epochs": st["epochs"]}
        return res

    after_kill = [{"killed": k["label"], "t_mono_ns": k["t_mono_ns"],
                   "nodes": others_after(k["label"], k["t_mono_ns"])} for k in kills]

    # A joining node: when did its clicks first land within ALIGN_NS of another node's
    # click on the same beat (it follows the room), and how did it do from then on.
    after_join = []
    for j in joins:
        me = next((nl for nl in nodes if nl.label == j["label"]), None)
        if me is None:
            continue
        t_start = starts.get(j["label"], j["t_mono_ns"])
        others = {}
        for nl in nodes:
            if nl is not me:
                for t, b, _ in nl.clicks:
                    others.setdefault(b, []).append(t)
        mine = sorted(c for c in me.clicks if c[0] >= t_start)
        aligned = next((i for i, (t, b, _) in enumerate(mine)
                        if any(abs(t - u) <= ALIGN_NS for u in others.get(b, []))), None)
        info = {"joined": j["label"], "t_mono_ns": j["t_mono_ns"], "following_after_ms": None,
                "joiner": None, "nodes": others_after(j["label"], j["t_mono_ns"])}
        if aligned is not None:
            info["following_after_ms"] = round((mine[aligned][0] - t_start) / 1e6, 1)
            st = node_stats(mine[aligned:])
            info["joiner"] = {"from_beat": mine[aligned][1], "missed": st["missed"],
                              "doubled": st["doubled"], "backsteps": st["backsteps"],
                              "jump_max_us": st["jump_max_us"]}
        after_join.append(info)

    totals = {
        "missed": sum(nl.stats["missed"] for nl in nodes),
        "doubled": sum(nl.stats["doubled"] for nl in nodes),
        "backsteps": sum(nl.stats["backsteps"] for nl in nodes),
    }
    jumps = [nl.stats["jump_max_us"] for nl in nodes if nl.stats["jump_max_us"] is not None]
    summary = {
        "nodes": len(nodes),
        "clicking_nodes": sum(1 for nl in nodes if nl.kept),
        "warmup_s": warmup_s,
        "beats": overall["n"],
        "pairs": sum(len(v) for v in pairs.values()),
        "p50_us": overall["p50_us"],
        "p99_us": overall["p99_us"],
        "max_us": overall["max_us"],
        "missed": totals["missed"],
        "doubled": totals["doubled"],
        "backsteps": totals["backsteps"],
        "jump_max_us": max(jumps) if jumps else None,
        "bad_lines": problems["bad_lines"],
        "missing_files": len(problems["missing_files"]),
        "epochs": sorted({e for nl in nodes for e in nl.stats["epochs"]}),
        "pair": pair_stats,
        "node": {nl.label: {"id": nl.node_id, "clicks": nl.stats["clicks"],
                            "skipped": nl.skipped,
                            "first_beat": nl.stats["first_beat"], "last_beat": nl.stats["last_beat"],
                            "missed": nl.stats["missed"], "doubled": nl.stats["doubled"],
                            "backsteps": nl.stats["backsteps"], "epochs": nl.stats["epochs"],
                            "jump_max_us": nl.stats["jump_max_us"],
                            "first_click_ms": first_click_ms.get(nl.label)}
                 for nl in nodes},
    }
    if after_kill:
        summary["after_kill"] = after_kill
    if after_join:
        summary["after_join"] = after_join

    # Heals (status.jsonl + click logs), tempo per node, CLI calls, the stranger.
    samples = read_status(status_path)
    heal = heal_report(nodes, events, samples, meter)
    if heal:
        summary["heal"] = heal
    lab_start = [e["t_mono_ns"] for e in events if e.get("event") == "lab_start"]
    t_base = lab_start[0] if lab_start else t_first
    tempo = {nl.label: tempo_segments(nl.clicks, t_base) for nl in nodes} if t_base is not None else {}
    summary["tempo"] = tempo
    clis = [e for e in events if e.get("event") == "cli"]
    if clis:
        summary["cli"] = [{"t_s": round((e["t_mono_ns"] - t_base) / 1e9, 2) if t_base else None,
                           "node": e.get("node"), "args": e.get("args"), "rc": e.get("rc"),
                           "ms": e.get("ms"), "out": e.get("out")} for e in clis]
    stranger = stranger_report(nodes, events, samples, stranger_path, cut)
    if stranger:
        summary["stranger"] = stranger
    link = link_report(nodes, events, link_path, t_base, meter) if link_path else None
    if link:
        summary["link_app"] = link

    if not json_only:
        w = out.write
        w("bandsync lab summary: %d node(s), warm-up %.3g s" % (len(nodes), warmup_s))
        if node_warmup_s:
            w(", per-node warm-up %.3g s" % node_warmup_s)
        w("\n")
        for m in problems["missing_files"]:
            w("  MISSING click log: %s\n" % m)
        if problems["bad_lines"]:
            w("  BAD LINES: %d (skipped), e.g.\n" % problems["bad_lines"])
            for ex in problems["bad_examples"]:
                w("    %s\n" % ex)
        w("\nper node (after warm-up):\n")
        w("  %-10s %-10s %7s %7s %9s %9s %6s %7s %5s %10s %11s  %s\n" % (
            "node", "id", "clicks", "skipped", "first", "last", "missed", "doubled", "back",
            "jump_us", "interval_us", "epochs"))
        for nl in nodes:
            s = nl.stats
            extra = ""
            if nl.label in first_click_ms:
                extra += "  first click %.0f ms after start" % first_click_ms[nl.label]
            if s["missed_beats"]:
                extra += "  missed e.g. %s" % s["missed_beats"][:5]
            if s["doubled_beats"]:
                extra += "  doubled e.g. %s" % s["doubled_beats"][:5]
            if s["jump_at_beat"] is not None and s["jump_max_us"] is not None and s["jump_max_us"] >= 100:
                extra += "  jump at beat %d" % s["jump_at_beat"]
            ep = ",".join(str(e) for e in s["epochs"]) or "-"
            w("  %-10s %-10s %7d %7d %9s %9s %6d %7d %5d %10s %11s  %s%s\n" % (
                nl.label[:10], nl.node_id[:10], s["clicks"], nl.skipped,
                fmt(s["first_beat"]).strip(), fmt(s["last_beat"]).strip(), s["missed"], s["doubled"],
                s["backsteps"], fmt(s["jump_max_us"]).strip(),
                ("%.3f" % s["interval_us"]) if s["interval_us"] is not None else "-", ep, extra))
        w("\nspread over nodes, per beat heard on >= 2 nodes (µs):\n")
        w("  %-24s %7s %11s %11s %11s\n" % ("", "beats", "p50", "p99", "max"))
        w("  %-24s %7d %11s %11s %11s\n" % ("all", overall["n"], fmt(overall["p50_us"]),
                                            fmt(overall["p99_us"]), fmt(overall["max_us"])))
        for k, d in pair_stats.items():
            w("  %-24s %7d %11s %11s %11s\n" % (k[:24], d["n"], fmt(d["p50_us"]), fmt(d["p99_us"]),
                                                fmt(d["max_us"])))
        if overall["n"] == 0 and len(nodes) >= 2:
            w("  (no beat index was heard on two nodes after the warm-up)\n")
        for k in after_kill:
            w("\nafter %s was killed (survivors, from their last click before the kill):\n" % k["killed"])
            for label, s in k["nodes"].items():
                w("  %-10s missed %d, doubled %d, backsteps %d, jump max %s µs, epochs %s\n" % (
                    label, s["missed"], s["doubled"], s["backsteps"], fmt(s["jump_max_us"]).strip(),
                    ",".join(str(e) for e in s["epochs"]) or "-"))
        for j in after_join:
            if j["following_after_ms"] is None:
                w("\n%s joined: it never clicked within %d µs of another node on the same beat\n"
                  % (j["joined"], ALIGN_NS // 1000))
            else:
                js = j["joiner"]
                w("\n%s joined: following the room %.0f ms after its start (from beat %d; then missed %d,"
                  " doubled %d, backsteps %d, jump max %s µs)\n" % (
                      j["joined"], j["following_after_ms"], js["from_beat"], js["missed"], js["doubled"],
                      js["backsteps"], fmt(js["jump_max_us"]).strip()))
            w("others, from their last click before the join:\n")
            for label, s in j["nodes"].items():
                w("  %-10s missed %d, doubled %d, backsteps %d, jump max %s µs, epochs %s\n" % (
                    label, s["missed"], s["doubled"], s["backsteps"], fmt(s["jump_max_us"]).strip(),
                    ",".join(str(e) for e in s["epochs"]) or "-"))
        if clis:
            w("\nCLI calls (--at):\n")
            for c in summary["cli"]:
                w("  %7.2fs node%s bandsync %s -> rc %s in %s ms: %s\n" % (
                    c["t_s"] or 0, c["node"], c["args"], c["rc"], c["ms"], (c["out"] or "")[:80]))
        if any(len(v) > 1 for v in tempo.values()):
            w("\ntempo per node from its clicks (seconds into the run: BPM x intervals):\n")
            for label, segs in tempo.items():
                w("  %-10s %s\n" % (label, "  ".join("%.1fs:%g x%d" % (a, b, c) for a, b, c in segs[:40])
                                     + ("  ..." if len(segs) > 40 else "")))
        if heal:
            w("\nheals (leader+epoch: every running node's status.json names one leader and one\n"
              "epoch, sampled every 50 ms, status.json itself written every <= 250 ms; clicks:\n"
              "every node clicks each beat once, within %d µs of the others):\n" % (ALIGN_NS // 1000))
            for r in heal["heals"]:
                w("  heal #%d → one leader, one timeline: %s ms (leader+epoch %s ms, clicks %s ms, "
                  "%d bad clicks, %d nodes; leader %s epoch %s; 1 s + next bar: %s ms, %s)\n" % (
                      r["heal"], fmt(r["total_ms"]).strip(), fmt(r["leader_epoch_ms"]).strip(),
                      fmt(r["clicks_ms"]).strip(), r["bad_clicks"], r["nodes"],
                      ",".join(x[:8] for x in r["leader"]) or "-", ",".join(str(x) for x in r["epoch"]) or "-",
                      fmt(r["bar_deadline_ms"]).strip(), {True: "met", False: "MISSED", None: "-"}[r["within_1s_plus_bar"]]))
            w("heal → one leader, one timeline: %d heals, settled %d, max %s ms, p50 %s ms, "
              "within 1 s: %d/%d, within 1 s + next bar: %d/%d\n" % (
                  heal["n"], heal["settled"], fmt(heal["max_ms"]).strip(), fmt(heal["p50_ms"]).strip(),
                  heal["within_1s"], heal["n"], heal["within_1s_plus_bar"], heal["n"]))
        if stranger:
            sr = stranger
            w("\nstranger (%.1f s flood; 'before' = up to 15 s before it, after the warm-up):\n" % sr["flood_s"])
            for k in ("before", "during", "after"):
                d = sr[k]
                w("  spread %-7s beats %5d  p50 %s  p99 %s  max %s µs\n" % (
                    k, d["n"], fmt(d["p50_us"]).strip(), fmt(d["p99_us"]).strip(), fmt(d["max_us"]).strip()))
            for label, m in sr["nodes"].items():
                w("  %-10s from 2 s before the flood: missed %d, doubled %d, backsteps %d, tempo %s\n" % (
                    label, m["missed"], m["doubled"], m["backsteps"], ",".join("%g" % x for x in m["tempo"])))
            w("  exits/restarts: %s; leaders seen %s, epochs %s, one leader in every sample: %s\n" % (
                ",".join(sr["exits"]) or "none", ",".join(x[:8] for x in sr["leaders_seen"]) or "-",
                ",".join(str(x) for x in sr["epochs_seen"]) or "-", sr["one_leader_always"]))
            if sr["attack"]:
                w("  attack: %s\n" % json.dumps(sr["attack"], separators=(",", ":"))[:600])
        if link:
            w("\nLink app (aalink) vs the nodes' clicks:\n")
            if "error" in link:
                w("  %s\n" % link["error"])
            else:
                ms3 = lambda v: "-" if v is None else "%.3f" % v
                w("  took the room's tempo %s s after enabling (%s BPM)\n" % (
                    ms3(link["join_s"]), link["tempo_after_join"]))
                for label, m in link["nodes"].items():
                    w("  %-10s phase |error| p50 %s  p95 %s  max %s ms over %d samples "
                      "(%d while not at the room's tempo); bars aligned: %s\n" % (
                          label, ms3(m["p50_ms"]), ms3(m["p95_ms"]),
                          ms3(m["max_ms"]), m["n"], m["not_following"], m["offsets_on_bars"]))
                for c in link["room_changes"]:
                    w("  room tempo %g at %s s reached the app after %s s\n" % (
                        c["tempo"], c["t_s"], ms3(c["reached_s"])))
                for c in link["app_changes"]:
                    w("  the app's own tempo %g overruled after %s s (back to %s)\n" % (
                        c["tempo"], ms3(c["overruled_s"]), c["back_to"]))
        w("\n")
    out.write("SUMMARY " + json.dumps(summary, separators=(",", ":"), sort_keys=False) + "\n")
    readable = len(paths) - len(problems["missing_files"])
    return summary, (0 if readable > 0 else 2)


# ---------------------------------------------------------------------------- self-test

def self_test():
    """Synthetic logs with known defects; checks every reported figure."""
    import io

    period = 500_000_000  # 120 BPM
    t0 = 1_000_000_000_000
    tmp = tempfile.mkdtemp(prefix="lab_summary_selftest.")
    paths = []

    def write(label, lines):
        d = os.path.join(tmp, label)
        os.makedirs(d)
        p = os.path.join(d, "clicks.jsonl")
        with open(p, "w") as f:
            for line in lines:
                f.write(line + "\n")
        paths.append(p)
        return p

    def click(node, beat, t, epoch=1):
        return json.dumps({"node": node, "beat": beat, "t_mono_ns": t, "epoch": epoch})

    # node1: beats 0..39, perfect grid, except a +300 µs phase jump from beat 30 on.
    n1 = []
    for b in range(40):
        t = t0 + b * period + (300_000 if b >= 30 else 0)
        n1.append(click("aaaa1111", b, t))
    n1.insert(5, "this is not json")
    n1.insert(7, json.dumps({"node": "aaaa1111", "beat": "3", "t_mono_ns": 1, "epoch": 1}))
    n1.insert(9, json.dumps({"node": "aaaa1111", "beat": 3, "t_mono_ns": True, "epoch": 1}))
    n1.append("[1,2]")
    write("node1", n1)
    # node2: +20 µs late, beat 12 missed, epoch 1 then 2 from beat 20.
    write("node2", [click("bbbb2222", b, t0 + b * period + 20_000 + (300_000 if b >= 30 else 0),
                          1 if b < 20 else 2)
                    for b in range(40) if b != 12])
    # node3: joins late (beat 10..39), 50 µs early, beat 15 clicked twice.
    n3 = []
    for b in range(10, 40):
        t = t0 + b * period - 50_000 + (300_000 if b >= 30 else 0)
        n3.append(click("cccc3333", b, t))
        if b == 15:
            n3.append(click("cccc3333", b, t + 1000))
    write("node3", n3)
    # node4: its file does not exist.
    paths.append(os.path.join(tmp, "node4", "clicks.jsonl"))
    # events: node3 started 300 ms before its first click; node1 "killed" at beat 35.
    ev = os.path.join(tmp, "events.jsonl")
    with open(ev, "w") as f:
        f.write(json.dumps({"event": "start", "label": "node3", "t_mono_ns": t0 + 10 * period - 50_000 - 300_000_000}) + "\n")
        f.write(json.dumps({"event": "join", "label": "node3", "t_mono_ns": t0 + 10 * period - 50_000 - 300_000_000}) + "\n")
        f.write(json.dumps({"event": "kill", "label": "node1", "t_mono_ns": t0 + 35 * period + 1}) + "\n")

    buf = io.StringIO()
    # warm-up 2.2 s skips beats 0..4 (t0 .. t0+2.0 s) on node1/node2.
    s, rc = summarise(paths, warmup_s=2.2, events_path=ev, out=buf)
    text = buf.getvalue()
    failures = []

    def check(what, got, want):
        if got != want:
            failures.append("%s: got %r, want %r" % (what, got, want))

    check("exit status", rc, 0)
    check("bad lines", s["bad_lines"], 4)
    check("missing files", s["missing_files"], 1)
    check("nodes", s["nodes"], 4)
    check("clicking nodes", s["clicking_nodes"], 3)
    n = s["node"]
    check("node1 clicks", n["node1"]["clicks"], 35)
    check("node1 skipped", n["node1"]["skipped"], 5)
    check("node1 first beat", n["node1"]["first_beat"], 5)
    check("node1 missed", n["node1"]["missed"], 0)
    check("node1 jump", n["node1"]["jump_max_us"], 300.0)
    check("node2 missed", n["node2"]["missed"], 1)
    check("node2 epochs", n["node2"]["epochs"], [1, 2])
    check("node3 doubled", n["node3"]["doubled"], 1)
    check("node3 backsteps", n["node3"]["backsteps"], 1)
    check("node3 first click", n["node3"]["first_click_ms"], 300.0)
    check("node4 clicks", n["node4"]["clicks"], 0)
    check("total missed", s["missed"], 1)
    check("total doubled", s["doubled"], 1)
    # Beats 5..39 on >= 2 nodes except none missing: beat 12 still on node1+node3.
    check("beats", s["beats"], 35)
    check("pair 1-2 n", s["pair"]["node1-node2"]["n"], 34)
    check("pair 1-2 max", s["pair"]["node1-node2"]["max_us"], 20.0)
    check("pair 1-3 p50", s["pair"]["node1-node3"]["p50_us"], 50.0)
    check("pair 2-3 max", s["pair"]["node2-node3"]["max_us"], 70.0)
    check("pair 1-4 n", s["pair"]["node1-node4"]["n"], 0)
    # Beats 5..9: node1+node2 only (spread 20); 10..39 all three (70), beat 12: node1+3 (50).
    check("max spread", s["max_us"], 70.0)
    check("p50 spread", s["p50_us"], 70.0)
    check("after kill", s["after_kill"][0]["nodes"]["node2"]["missed"], 0)
    check("after kill jump", s["after_kill"][0]["nodes"]["node2"]["jump_max_us"], 0.0)
    check("join: following after", s["after_join"][0]["following_after_ms"], 300.0)
    check("join: joiner doubled", s["after_join"][0]["joiner"]["doubled"], 1)
    check("join: others", sorted(s["after_join"][0]["nodes"]), ["node1", "node2"])
    check("join: node2 missed after", s["after_join"][0]["nodes"]["node2"]["missed"], 1)
    check("SUMMARY line", text.strip().splitlines()[-1].startswith("SUMMARY {"), True)
    last = json.loads(text.strip().splitlines()[-1][len("SUMMARY "):])
    check("SUMMARY parses", last["p99_us"], 70.0)

    # Percentiles.
    check("p50 of 1..100", percentile(list(range(1, 101)), 50), 50)
    check("p99 of 1..100", percentile(list(range(1, 101)), 99), 99)
    check("p99 of [7]", percentile([7], 99), 7)
    check("p99 of []", percentile([], 99), None)

    # Nothing readable at all -> exit 2.
    _, rc2 = summarise([os.path.join(tmp, "nope.jsonl")], out=io.StringIO())
    check("exit status, no files", rc2, 2)

    # Node warm-up: node3's first 5 s are skipped.
    s3, _ = summarise(paths, warmup_s=0, node_warmup_s=5.0, out=io.StringIO())
    check("node warm-up", s3["node"]["node3"]["first_beat"], 20)

    for root, dirs, files in os.walk(tmp, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(tmp)
    if failures:
        print(text)
        for f in failures:
            print("FAIL", f)
        return 1
    print("self-test: ok")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Summarise bandsync click logs (SPEC §5): spread between nodes per beat "
                    "(p50/p99/max µs, overall and per pair), missed/doubled beats, phase jumps.",
        epilog="The last output line is 'SUMMARY {json}'. Exit 0 once logs were read, "
               "whatever the figures; 2 on usage errors or when no log could be read.")
    ap.add_argument("logs", nargs="*", help="click logs (JSON lines); folder name = node label")
    ap.add_argument("--warmup", type=float, default=0.0, metavar="S",
                    help="skip clicks before the first click of all + S seconds (default 0)")
    ap.add_argument("--node-warmup", type=float, default=0.0, metavar="S",
                    help="also skip each node's clicks before its own first click + S seconds")
    ap.add_argument("--events", metavar="FILE", help="lab.sh's events.jsonl (start/kill/join times)")
    ap.add_argument("--status", metavar="FILE", help="lab.sh's status.jsonl (heal report)")
    ap.add_argument("--stranger", metavar="FILE", help="stranger.py's report (JSON)")
    ap.add_argument("--link-app", metavar="FILE", help="link_app.py's samples (JSON lines)")
    ap.add_argument("--meter", type=int, default=4, help="beats per bar (heal report; default 4)")
    ap.add_argument("--json-only", action="store_true", help="print only the SUMMARY line")
    ap.add_argument("--self-test", action="store_true", help="check this script on synthetic logs")
    a = ap.parse_args(argv)
    if a.self_test:
        return self_test()
    if not a.logs:
        ap.error("no click logs given")
    if not (a.warmup >= 0 and math.isfinite(a.warmup)):
        ap.error("--warmup must be >= 0, got %r" % a.warmup)
    if not (a.node_warmup >= 0 and math.isfinite(a.node_warmup)):
        ap.error("--node-warmup must be >= 0, got %r" % a.node_warmup)
    _, rc = summarise(a.logs, a.warmup, a.node_warmup, a.events, json_only=a.json_only,
                      status_path=a.status, stranger_path=a.stranger, meter=a.meter,
                      link_path=a.link_app)
    return rc


if __name__ == "__main__":
    sys.exit(main())
