#!/usr/bin/env python3
"""A real Ableton Link app for the lab: the `aalink` wheel (the Link library itself).

Run by scripts/lab.sh --link-app-at inside a namespace of its own on the lab's bridge.
It enables Link at a tempo of its own (default 90 BPM, so adopting the room's shows),
with quantum = the room's meter and start/stop sync on, and writes one JSON line every
`--every` seconds to `--out`:

    {"t_mono_ns": ..., "beat": ..., "tempo": ..., "playing": ..., "peers": ...}

(the beat read is bracketed by CLOCK_MONOTONIC reads; reads preempted for more than
100 µs are retried). `--tempo-at T:BPM` sets the app's own tempo T seconds after its
start (a Link app trying to change the room's tempo). Runs until SIGTERM/SIGINT.
"""
import argparse
import asyncio
import json
import signal
import sys
import time


def mono_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


async def main(a):
    import aalink
    link = aalink.Link(a.tempo)
    link.quantum = a.quantum
    link.start_stop_sync_enabled = True
    link.enabled = True
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    t0 = time.monotonic()
    changes = sorted(a.tempo_at)
    with open(a.out, "w") as f:
        f.write(json.dumps({"event": "enabled", "t_mono_ns": mono_ns(), "tempo": a.tempo}) + "\n")
        while not stop.is_set():
            while changes and time.monotonic() - t0 >= changes[0][0]:
                _, bpm = changes.pop(0)
                link.tempo = bpm
                f.write(json.dumps({"event": "set_tempo", "t_mono_ns": mono_ns(), "tempo": bpm}) + "\n")
            for _ in range(5):
                m1 = mono_ns()
                b = link.beat
                m2 = mono_ns()
                if m2 - m1 < 100_000:
                    f.write(json.dumps({"t_mono_ns": (m1 + m2) // 2, "beat": b, "tempo": link.tempo,
                                        "playing": link.playing, "peers": link.num_peers}) + "\n")
                    break
            f.flush()
            try:
                await asyncio.wait_for(stop.wait(), a.every)
            except asyncio.TimeoutError:
                pass
    link.enabled = False


def tempo_at(s):
    t, bpm = s.split(":", 1)
    return float(t), float(bpm)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tempo", type=float, default=90.0)
    ap.add_argument("--quantum", type=float, default=4.0)
    ap.add_argument("--every", type=float, default=0.02)
    ap.add_argument("--tempo-at", type=tempo_at, action="append", default=[],
                    help="T:BPM (seconds after the start); repeatable")
    try:
        asyncio.run(main(ap.parse_args()))
    except ImportError:
        print("link_app.py: the Python wheel aalink is missing (pip install aalink)", file=sys.stderr)
        sys.exit(2)
