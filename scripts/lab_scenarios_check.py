#!/usr/bin/env python3
"""Checks of scripts/lab-scenarios.sh (issue 18: the room follows the latest decision when
groups of boxes meet). Reads lab.sh output folders (events.jsonl, node*/clicks.jsonl,
status.jsonl) and prints one line of figures per scenario, then a machine-readable
`CHECK {json}` line. Exit 0 when the scenario passed, 1 when it failed, 2 on bad input.

  lab_scenarios_check.py heal-tempo OUT --expect "90,100,..." [--ref-node 2] [--meter 4]
      a) and b): after heal k, every node must play tempo expect[k] (successive clicks
      60/bpm apart, ±0.3 %) from a click no later than the deadline: the first downbeat
      (beat % meter == 0) of the reference node at or after heal + 1 s (SPEC §6: "1 s plus
      the next bar"), and all nodes on one grid (lab_summary's heal report) by then.
  lab_scenarios_check.py boot OUT... --tempo 120 [--meter 4]
      c): per run, both nodes play (click) at --tempo from their first click on, on one
      grid, and never at another tempo; figures: time from start to both playing together.
  lab_scenarios_check.py rejoin OUT... --old 120 --new 90 --box 3
      d): after the tempo change (the cli event with --new), no click of any other node is
      at --old again; the restarted box's clicks after its restart are all at --new, on the
      room's grid (within 1 ms of another node on the same beat).
"""

import argparse
import glob
import json
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab_summary as ls  # noqa: E402

TOL = 0.003   # relative tempo tolerance (clock skews are 100 ppm; tempos differ by >= 5 %)


def load(out):
    paths = sorted(glob.glob(os.path.join(out, "node*", "clicks.jsonl")),
                   key=lambda p: int(os.path.basename(os.path.dirname(p))[4:]))
    nodes, problems = ls.read_logs(paths)
    events = ls.read_events(os.path.join(out, "events.jsonl"))
    samples = ls.read_status(os.path.join(out, "status.jsonl"))
    base = [e["t_mono_ns"] for e in events if e.get("event") == "lab_start"]
    return nodes, events, samples, (base[0] if base else 0)


def at_tempo(dt_ns, bpm):
    want = 60e9 / bpm
    return abs(dt_ns - want) <= TOL * want


def settled_at(clicks, bpm, t0, t1):
    """The first click (>= t0) from which every successive-beat interval up to t1 is at bpm;
    None when the node is not at bpm at the end of the window (or has no clicks in it)."""
    cs = sorted(c for c in clicks if t0 <= c[0] < t1)
    if len(cs) < 2:
        return None
    start = None
    for (ta, ba, _), (tb, bb, _) in zip(cs, cs[1:]):
        ok = bb == ba + 1 and at_tempo(tb - ta, bpm)
        if ok and start is None:
            start = ta
        elif not ok:
            start = None
    return start


def pct(vals, p):
    v = sorted(x for x in vals if x is not None)
    return ls.percentile(v, p)


def fmt_ms(x):
    return "-" if x is None else "%.0f" % x


def discordant(nodes, label, t0=0, t1=float("inf")):
    """Clicks of `label` in [t0, t1) made while another node was clicking (it has clicks
    before and after) that no other node clicked on the same beat within 1 ms: a box
    playing a state of its own (a default, an older session) beside the room."""
    me = next(nl for nl in nodes if nl.label == label)
    others = [nl for nl in nodes if nl.label != label and nl.clicks]
    idx = ls.click_index(nodes)
    bad = []
    for t, b, _ in sorted(me.clicks):
        if not t0 <= t < t1:
            continue
        playing = [o for o in others if min(c[0] for c in o.clicks) < t < max(c[0] for c in o.clicks)]
        if playing and not any(abs(u - t) <= ls.ALIGN_NS for o in playing for u in idx[o.label].get(b, [])):
            bad.append((t, b))
    return bad


def label_of_id(nodes):
    return {nl.node_id: nl.label for nl in nodes}


def heal_tempo(a):
    nodes, events, samples, base = load(a.out[0])
    expect = [float(x) for x in a.expect.split(",") if x]
    heals = sorted(e["t_mono_ns"] for e in events if e.get("event") == "heal")
    parts = sorted(e["t_mono_ns"] for e in events if e.get("event") == "partition")
    stop = min([e["t_mono_ns"] for e in events if e.get("event") == "stop"] or [max(c[0] for nl in nodes for c in nl.clicks)])
    hr = ls.heal_report(nodes, events, samples, a.meter) or {"heals": []}
    ids = label_of_id(nodes)
    ref = next((nl for nl in nodes if nl.label == "node%d" % a.ref_node), nodes[0])
    clis = [e for e in events if e.get("event") == "cli"]
    cycles = []
    for k, h in enumerate(heals):
        bpm = expect[k % len(expect)] if expect else None
        nxt = [p for p in parts if p > h]
        t1 = min(nxt[0] if nxt else stop, stop - 500_000_000)
        per = {}
        for nl in nodes:
            t = settled_at(nl.clicks, bpm, max(h - 10_000_000_000, 0), t1)
            per[nl.label] = t
        # the deadline's bar is on the winning grid: a node already at the tempo at the heal
        win = [nl for nl in nodes if per[nl.label] is not None and per[nl.label] <= h]
        refk = win[0] if win else ref
        downs = sorted(c[0] for c in refk.clicks if h + 1_000_000_000 <= c[0] < t1 and c[1] % a.meter == 0)
        deadline = downs[0] if downs else None
        # settle: the latest node's first click at the new tempo, counted from the heal
        # (a node already at it before the heal counts 0)
        lat = [None if t is None else max(0, t - h) / 1e6 for t in per.values()]
        settle = None if any(x is None for x in lat) else max(lat)
        last = None if settle is None else max(per, key=lambda k: per[k])
        hrk = hr["heals"][k] if k < len(hr["heals"]) else {}
        # one grid from the clicks (every node clicks each beat once, within 1 ms of the
        # others); the status agreement (leader+epoch) is reported apart: status.json lags
        grid = hrk.get("clicks_ms")
        dl = None if deadline is None else (deadline - h) / 1e6
        ok_tempo = settle is not None and dl is not None and settle <= dl + 1
        ok_grid = grid is not None and dl is not None and grid <= dl + 1
        le = hrk.get("leader_epoch_ms")
        ok_status = le is not None and dl is not None and le <= dl + 1
        leader = [ids.get(x, x[:8]) for x in hrk.get("leader", [])]
        cyc_clis = [c for c in clis if (parts[k] if k < len(parts) else 0) <= c["t_mono_ns"] <= h]
        cycles.append({"heal": k, "t_s": round((h - base) / 1e9, 2), "expect": bpm,
                       "settle_ms": None if settle is None else round(settle, 1),
                       "grid_ms": grid, "leader_epoch_ms": hrk.get("leader_epoch_ms"),
                       "deadline_ms": None if dl is None else round(dl, 1),
                       "ok": ok_tempo and ok_grid, "ok_tempo": ok_tempo, "ok_grid": ok_grid,
                       "ok_status": ok_status, "last_node": last,
                       "leader_after": leader,
                       "cli": [(c.get("node"), c.get("args"), c.get("rc"), c.get("ms")) for c in cyc_clis],
                       "not_at_tempo": [lab for lab, t in per.items() if t is None]})
    for c in cycles:
        print("  heal #%d at %.1fs: expect %g BPM: every box at it %s ms after the heal, one grid %s ms"
              " (last to switch: %s), leader+epoch %s ms%s; deadline (1 s + next bar) %s ms: %s; leader after: %s; cli %s%s" % (
                  c["heal"], c["t_s"], c["expect"], fmt_ms(c["settle_ms"]), fmt_ms(c["grid_ms"]),
                  c["last_node"] or "-", fmt_ms(c["leader_epoch_ms"]), "" if c["ok_status"] else " (after the deadline)",
                  fmt_ms(c["deadline_ms"]), "ok" if c["ok"] else "FAIL",
                  ",".join(c["leader_after"]) or "-",
                  "; ".join("node%s '%s' rc %s %s ms" % x for x in c["cli"]) or "-",
                  ("; NOT at tempo: " + ",".join(c["not_at_tempo"])) if c["not_at_tempo"] else ""))
    n_ok = sum(1 for c in cycles if c["ok"])
    res = {"cycles": len(cycles), "passed": n_ok,
           "settle_max_ms": pct([c["settle_ms"] for c in cycles], 100),
           "settle_p50_ms": pct([c["settle_ms"] for c in cycles], 50),
           "grid_max_ms": pct([c["grid_ms"] for c in cycles], 100),
           "grid_p50_ms": pct([c["grid_ms"] for c in cycles], 50),
           "leader_epoch_max_ms": pct([c["leader_epoch_ms"] for c in cycles], 100),
           "leader_epoch_p50_ms": pct([c["leader_epoch_ms"] for c in cycles], 50),
           "leader_epoch_within_1s": sum(1 for c in cycles if (c["leader_epoch_ms"] or 1e9) <= 1000),
           "leader_epoch_by_deadline": sum(1 for c in cycles if c["ok_status"]),
           "deadline_min_ms": pct([c["deadline_ms"] for c in cycles], 0.0001),
           "leaders_after": sorted({x for c in cycles for x in c["leader_after"]}),
           "cli_failed": sum(1 for c in cycles for x in c["cli"] if x[2] != 0),
           "detail": cycles}
    print("CHECK " + json.dumps(res, separators=(",", ":")))
    return 0 if cycles and n_ok == len(cycles) else 1


def boot(a):
    runs = []
    for out in a.out:
        nodes, events, samples, base = load(out)
        starts = {e["label"]: e["t_mono_ns"] for e in events if e.get("event") == "start"}
        stop = min([e["t_mono_ns"] for e in events if e.get("event") == "stop"] or [0]) or None
        t0 = max(starts.values()) if starts else base
        info = {"out": out, "nodes": {}}
        firsts = []
        for nl in nodes:
            cs = sorted(c for c in nl.clicks if stop is None or c[0] < stop - 300_000_000)
            iv = [(tb - ta) for (ta, ba, _), (tb, bb, _) in zip(cs, cs[1:]) if bb == ba + 1]
            off = [round(60e9 / d, 1) for d in iv if not at_tempo(d, a.tempo)]
            info["nodes"][nl.label] = {"clicks": len(cs), "cs": cs,
                                       "first_click_ms": None if not cs else round((cs[0][0] - starts.get(nl.label, t0)) / 1e6),
                                       "off_tempo": off[:5], "n_off_tempo": len(off)}
            firsts.append(cs[0][0] if cs else None)
        # together: the first beat clicked by every node within 1 ms
        idx = ls.click_index(nodes)
        common = None
        if nodes and all(f is not None for f in firsts):
            beats = sorted(set.intersection(*[set(idx[nl.label]) for nl in nodes]))
            for b in beats:
                ts = [min(idx[nl.label][b]) for nl in nodes]
                if max(ts) - min(ts) <= ls.ALIGN_NS:
                    common = min(ts)
                    break
        # playing from the status samples: any sample with playing false, and the last one
        # from then on: no beat skipped or repeated, and the spread
        for nl in nodes:
            v = info["nodes"][nl.label]
            cs = [c for c in v.pop("cs") if common is not None and c[0] >= common - ls.ALIGN_NS]
            v["gaps"] = sum(1 for (_, ba, _), (_, bb, _) in zip(cs, cs[1:]) if bb != ba + 1)
            v["discordant"] = len(discordant(nodes, nl.label))
            nl.kept = cs
        sp, _ = ls.spreads(nodes)
        notplay = sorted({lab for _, snap in samples for lab, s in snap.items() if s.get("playing") is False})
        np_last = max((t for t, snap in samples for s in snap.values() if s.get("playing") is False), default=None)
        info["not_playing_until_ms"] = None if np_last is None else round((np_last - t0) / 1e6)
        last = samples[-1][1] if samples else {}
        tempos = {lab: s.get("tempo") for lab, s in last.items()}
        info.update({"together_ms": None if common is None else round((common - t0) / 1e6),
                     "status_not_playing": notplay, "final_tempo": tempos,
                     "spread_p99_us": ls.us(ls.percentile(sorted(sp), 99))})
        info["ok"] = (common is not None and all(v["n_off_tempo"] == 0 and v["gaps"] == 0 and v["clicks"] > 0
                                                 and v["discordant"] == 0
                                                 for v in info["nodes"].values())
                      and all(abs((t or 0) - a.tempo) < 0.01 for t in tempos.values()) and len(tempos) == len(nodes))
        runs.append(info)
        print("  %s: %s; all clicking together %s ms after the (last) start; status playing=false seen on: %s (last sample %s ms after the start);"
              " final tempo %s; spread p99 %s µs: %s" % (
                  os.path.basename(out.rstrip("/")),
                  "; ".join("%s first click %s ms, off-tempo intervals %d%s, gaps after together %d, "
                            "clicks off the other's grid %d" % (
                      k, v["first_click_ms"], v["n_off_tempo"], (" e.g. %s" % v["off_tempo"]) if v["off_tempo"] else "",
                      v["gaps"], v["discordant"]) for k, v in info["nodes"].items()),
                  info["together_ms"], ",".join(notplay) or "none", info["not_playing_until_ms"],
                  ",".join("%s=%s" % kv for kv in sorted(tempos.items())), info["spread_p99_us"],
                  "ok" if info["ok"] else "FAIL"))
    n_ok = sum(1 for r in runs if r["ok"])
    res = {"runs": len(runs), "passed": n_ok,
           "together_max_ms": pct([r["together_ms"] for r in runs], 100),
           "together_p50_ms": pct([r["together_ms"] for r in runs], 50),
           "off_tempo_intervals": sum(v["n_off_tempo"] for r in runs for v in r["nodes"].values()),
           "discordant_clicks": sum(v["discordant"] for r in runs for v in r["nodes"].values()),
           "runs_with_not_playing_status": sum(1 for r in runs if r["status_not_playing"]),
           "not_playing_until_max_ms": pct([r["not_playing_until_ms"] for r in runs], 100)}
    print("CHECK " + json.dumps(res, separators=(",", ":")))
    return 0 if runs and n_ok == len(runs) else 1


def rejoin(a):
    runs = []
    for out in a.out:
        nodes, events, samples, base = load(out)
        box = "node%d" % a.box
        change = [e for e in events if e.get("event") == "cli" and str(a.new).rstrip("0").rstrip(".") in str(e.get("args"))]
        restart = [e["t_mono_ns"] for e in events if e.get("event") == "restart" and e.get("label") == box]
        kill = [e["t_mono_ns"] for e in events if e.get("event") == "kill" and e.get("label") == box]
        stop = min([e["t_mono_ns"] for e in events if e.get("event") == "stop"] or [0])
        info = {"out": out, "ok": False}
        if not change or not restart:
            info["why"] = "no tempo change or no restart event"
            runs.append(info)
            print("  %s: FAIL (%s)" % (os.path.basename(out.rstrip("/")), info["why"]))
            continue
        tc, tr = change[0]["t_mono_ns"], restart[0]
        idx = ls.click_index(nodes)
        # when the room went over to the new tempo (first click at it on any other node)
        others = [nl for nl in nodes if nl.label != box]
        t_new = [settled_at(nl.clicks, a.new, tc, tr) for nl in others]
        t_new = min((t for t in t_new if t is not None), default=None)
        old_after = {}
        for nl in others:
            cs = sorted(c for c in nl.clicks if t_new is not None and c[0] >= t_new and c[0] < stop - 300_000_000)
            old_after[nl.label] = sum(1 for (ta, ba, _), (tb, bb, _) in zip(cs, cs[1:])
                                      if bb == ba + 1 and at_tempo(tb - ta, a.old))
        mine = sorted(c for c in next(nl for nl in nodes if nl.label == box).clicks if tr <= c[0] < stop - 300_000_000)
        iv = [(tb - ta) for (ta, ba, _), (tb, bb, _) in zip(mine, mine[1:]) if bb == ba + 1]
        box_old = sum(1 for d in iv if at_tempo(d, a.old))
        box_other = sum(1 for d in iv if not at_tempo(d, a.new))
        aligned = None
        for t, b, _ in mine:
            if any(abs(u - t) <= ls.ALIGN_NS for o in others for u in idx[o.label].get(b, [])):
                aligned = t
                break
        misaligned_after = 0
        if aligned is not None:
            for t, b, _ in mine:
                if t > aligned and not any(abs(u - t) <= ls.ALIGN_NS for o in others for u in idx[o.label].get(b, [])):
                    misaligned_after += 1
        off_grid = discordant(nodes, box, tr, stop - 300_000_000)
        leaders = []
        seq = ls.window_states(samples, tr, stop)
        for _, snap in seq:
            for s in snap.values():
                if s.get("leader") and s.get("leader") not in leaders:
                    leaders.append(s.get("leader"))
        ids = label_of_id(nodes)
        info.update({"kill_s": round((kill[0] - base) / 1e9, 2) if kill else None,
                     "change_s": round((tc - base) / 1e9, 2), "restart_s": round((tr - base) / 1e9, 2),
                     "room_at_new_ms_after_cli": None if t_new is None else round((t_new - tc) / 1e6),
                     "others_old_tempo_intervals_after_change": old_after,
                     "box_clicks_after_restart": len(mine), "box_old_tempo_intervals": box_old,
                     "box_off_new_intervals": box_other,
                     "box_first_click_ms": None if not mine else round((mine[0][0] - tr) / 1e6),
                     "box_on_grid_ms": None if aligned is None else round((aligned - tr) / 1e6),
                     "box_misaligned_after": misaligned_after,
                     "box_off_grid": [(round((t - tr) / 1e6), b) for t, b in off_grid],
                     "leaders_after_restart": [ids.get(x, x[:8]) for x in leaders],
                     "cli": [(e.get("args"), e.get("rc"), e.get("ms")) for e in events if e.get("event") == "cli"]})
        info["ok"] = (t_new is not None and all(v == 0 for v in old_after.values()) and box_old == 0
                      and box_other == 0 and len(mine) > 0 and aligned is not None and misaligned_after == 0
                      and not off_grid)
        runs.append(info)
        print("  %s: killed %ss, tempo %g through the room at %ss (room at it %s ms later), restarted %ss:"
              " old-tempo intervals after the change on the others %s; the box: %d clicks, first %s ms after"
              " its restart, on the room's grid %s ms after it, old-tempo intervals %d, other off-tempo %d,"
              " misaligned later %d, clicks off the room's grid %s; leaders after restart %s: %s" % (
                  os.path.basename(out.rstrip("/")), info["kill_s"], a.new, info["change_s"],
                  info["room_at_new_ms_after_cli"], info["restart_s"],
                  ",".join("%s=%d" % kv for kv in old_after.items()), len(mine), info["box_first_click_ms"],
                  info["box_on_grid_ms"], box_old, box_other, misaligned_after,
                  ("%d (ms after restart, beat: %s)" % (len(off_grid), info["box_off_grid"][:5])) if off_grid else "0",
                  "→".join(info["leaders_after_restart"]) or "-", "ok" if info["ok"] else "FAIL"))
    n_ok = sum(1 for r in runs if r["ok"])
    res = {"runs": len(runs), "passed": n_ok,
           "box_on_grid_max_ms": pct([r.get("box_on_grid_ms") for r in runs], 100),
           "box_off_grid_clicks": sum(len(r.get("box_off_grid", [])) for r in runs),
           "old_tempo_intervals_total": sum(sum(r.get("others_old_tempo_intervals_after_change", {}).values())
                                            + r.get("box_old_tempo_intervals", 0) for r in runs)}
    print("CHECK " + json.dumps(res, separators=(",", ":")))
    return 0 if runs and n_ok == len(runs) else 1


def main():
    ap = argparse.ArgumentParser(description="checks of scripts/lab-scenarios.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("heal-tempo")
    p.add_argument("out", nargs=1)
    p.add_argument("--expect", required=True, help="tempo after each heal, cycled: '90,100'")
    p.add_argument("--ref-node", type=int, default=2)
    p.add_argument("--meter", type=int, default=4)
    p = sub.add_parser("boot")
    p.add_argument("out", nargs="+")
    p.add_argument("--tempo", type=float, default=120)
    p = sub.add_parser("rejoin")
    p.add_argument("out", nargs="+")
    p.add_argument("--old", type=float, default=120)
    p.add_argument("--new", type=float, default=90)
    p.add_argument("--box", type=int, default=3)
    a = ap.parse_args()
    return {"heal-tempo": heal_tempo, "boot": boot, "rejoin": rejoin}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
