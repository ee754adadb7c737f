#!/usr/bin/env python3
"""Inputs of the DNS benchmark (benches/dns/run.sh): the same zone for NSD and for mesh, and the
query file dnsperf sends to both.

  gen.py zone FILE                 NSD zone file for `mesh.`
  gen.py queries FILE [N]          N dnsperf queries (A and SRV for random services), fixed seed
  gen.py register HOST:PORT        PUT /v1/catalog/register for every instance (keep-alive
                                   connections, CONNECTIONS of them at once: the control loop
                                   batches what arrives together into one write)
  gen.py churn HOST:PORT RATE S    RATE catalog changes/s for S seconds: register and deregister
                                   services `churn-k` on node n1, alternately; prints the rate had
  gen.py p99 FILE                  p99 latency (ms) from `dnsperf -v` output
  gen.py cpu PID                   CPU seconds (user + system) used so far by PID and its children

Service i (0 <= i < SERVICES, env SERVICES, default 1,000) has INSTANCES instances; instance j
(1-based) is `svc-i-j` at (10 + i / 65536).(i / 256 % 256).(i % 256).j port 8080 on node n1
(127.0.0.1), as mesh answers it: SRV targets are `<hex address>.addr.dc1.mesh.` with the address
in the Additional section.
"""
import http.client
import json
import os
import random
import sys
import threading
import time

SERVICES = int(os.environ.get("SERVICES", "1000"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "32"))
INSTANCES = 3
PORT = 8080


def address(i, j):
    return f"{10 + i // 65536}.{i // 256 % 256}.{i % 256}.{j}"


def hex_address(i, j):
    return "".join(f"{int(o):02x}" for o in address(i, j).split("."))


def zone(path):
    lines = [
        "$ORIGIN mesh.",
        "$TTL 0",
        "@ IN SOA ns.mesh. hostmaster.mesh. 1 3600 600 86400 0",
        "@ IN NS ns.mesh.",
        "ns IN A 127.0.0.1",
    ]
    for i in range(SERVICES):
        for j in range(1, INSTANCES + 1):
            lines.append(f"svc-{i}.service IN A {address(i, j)}")
            lines.append(f"svc-{i}.service IN SRV 1 1 {PORT} {hex_address(i, j)}.addr.dc1.mesh.")
            lines.append(f"{hex_address(i, j)}.addr.dc1 IN A {address(i, j)}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def queries(path, n=100_000):
    rng = random.Random(42)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(f"svc-{rng.randrange(SERVICES)}.service.mesh {rng.choice(['A', 'SRV'])}\n")


def put(conn, path, body):
    conn.request("PUT", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"PUT {path} {body}: HTTP {resp.status}: {text[:200]!r}")


def register(hostport):
    host, port = hostport.rsplit(":", 1)
    failed = []

    def worker(k):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            for i in range(k, SERVICES, CONNECTIONS):
                for j in range(1, INSTANCES + 1):
                    svc = {"ID": f"svc-{i}-{j}", "Service": f"svc-{i}", "Address": address(i, j), "Port": PORT}
                    put(conn, "/v1/catalog/register", {"Node": "n1", "Address": "127.0.0.1", "Service": svc})
        except Exception as e:  # noqa: BLE001 - reported below
            failed.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        sys.exit(f"register: {failed[0]}")


def churn(hostport, rate, seconds):
    """Catalog changes at a steady rate: each tick registers or deregisters one `churn-k`."""
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    rate, seconds = float(rate), float(seconds)
    start, done, k = time.monotonic(), 0, 0
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        due = start + done / rate
        if now < due:
            time.sleep(due - now)
        if done % 2 == 0:
            svc = {"ID": f"churn-{k}", "Service": f"churn-{k}", "Port": PORT}
            put(conn, "/v1/catalog/register", {"Node": "n1", "Address": "127.0.0.1", "Service": svc})
        else:
            put(conn, "/v1/catalog/deregister", {"Node": "n1", "ServiceID": f"churn-{k}"})
            k += 1
        done += 1
    print(f"{done / (time.monotonic() - start):.1f}")


def p99(path):
    """`dnsperf -v` prints one line per answer: `> NOERROR name type latency`."""
    lat = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0] == ">":
                try:
                    lat.append(float(parts[-1]))
                except ValueError:
                    pass
    if not lat:
        sys.exit(f"no latencies in {path}")
    lat.sort()
    print(f"{lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000:.3f}")


def cpu(pid):
    """CPU seconds of `pid` and every process below it (NSD serves from a forked child)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
            except (OSError, IndexError, ValueError):
                pass
    tree, ticks, grew = {int(pid)}, 0, True
    while grew:
        grew = False
        for p, (ppid, _) in parents.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                grew = True
    ticks = sum(parents[p][1] for p in tree if p in parents)
    print(f"{ticks / os.sysconf('SC_CLK_TCK'):.2f}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"zone": zone, "queries": lambda p, n=100_000: queries(p, int(n)), "register": register, "churn": churn, "p99": p99, "cpu": cpu}[cmd](*args)
