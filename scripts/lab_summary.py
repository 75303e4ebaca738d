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


# ---------------------------------------------------------------------------- report

def fmt(v, width=9):
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return ("%.1f" % v).rjust(width)
    return str(v).rjust(width)


def summarise(paths, warmup_s=0.0, node_warmup_s=0.0, events_path=None, out=sys.stdout,
              json_only=False):
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
    _, rc = summarise(a.logs, a.warmup, a.node_warmup, a.events, json_only=a.json_only)
    return rc


if __name__ == "__main__":
    sys.exit(main())
