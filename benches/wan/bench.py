"""Driver of benches/wan/run.sh: starts two datacenters, measures, prints tables."""

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import dns.message
import dns.query
import dns.rcode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchlib import pct, until  # noqa: E402
import benchlib  # noqa: E402

MESH = sys.argv[1]
REQUESTS = int(os.environ.get("REQUESTS", "2000"))
KILLS = int(os.environ.get("KILLS", "3"))
procs = {}
root = tempfile.mkdtemp(prefix="mesh-wan-bench-")


def start(name, role, ip, dc, *extra):
    log = open(os.path.join(root, name + ".log"), "w")
    args = [MESH, role, "--bind", ip, "--rpc", ip + ":8300", "--node", name, "--dc", dc,
            "--data-dir", os.path.join(root, name)] + list(extra)
    if role == "agent":
        args += ["--runtime", "process", "--no-registrator"]
    procs[name] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), args)


def stop_all():
    for p, _ in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def get(ip, path, timeout=10):
    c = http.client.HTTPConnection(ip, 8500, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def http_latency(ip, path):
    return benchlib.http_latency(ip, 8500, path, REQUESTS)


def dns_latency(ip, name):
    q = dns.message.make_query(name, "A")
    out = []
    for _ in range(REQUESTS):
        t = time.perf_counter()
        r = dns.query.udp(q, ip, port=8600, timeout=10)
        out.append(time.perf_counter() - t)
        assert r.rcode() == dns.rcode.NOERROR and r.answer, (name, dns.rcode.to_text(r.rcode()))
    return out


def row(name, xs, ref):
    ms = lambda v: f"{v * 1000:.2f}"
    ratio = statistics.median(xs) / statistics.median(ref)
    return f"| {name} | {ms(pct(xs, 0.5))} | {ms(pct(xs, 0.99))} | {ms(max(xs))} | {ratio:.1f}x |"


def main():
    start("s1", "server", "127.81.1.1", "dc1")
    start("s2", "server", "127.81.2.1", "dc2", "--join-wan", "127.81.1.1")
    start("a1", "agent", "127.81.1.10", "dc1", "--join", "127.81.1.1")
    start("a2", "agent", "127.81.2.10", "dc2", "--join", "127.81.2.1", "--ports", "32001-33000")
    until("both datacenters", lambda: json.loads(get("127.81.1.10", "/v1/catalog/datacenters")[1]) == ["dc1", "dc2"])
    for ip, port in (("127.81.1.10", 9001), ("127.81.2.10", 9002)):
        body = json.dumps({"Name": "web", "Port": port})
        until("web registered", lambda: _put(ip, "/v1/agent/service/register", body) == 200)
    until("web of dc2 seen from dc1", lambda: len(json.loads(get("127.81.1.10", "/v1/health/service/web?dc=dc2")[1])) == 1)

    local = http_latency("127.81.1.10", "/v1/health/service/web")
    remote = http_latency("127.81.1.10", "/v1/health/service/web?dc=dc2")
    dlocal = dns_latency("127.81.1.10", "web.service.mesh")
    dremote = dns_latency("127.81.1.10", "web.service.dc2.mesh")
    print(f"\n{REQUESTS} sequential requests each, through dc1's agent (127.81.1.10)\n")
    print("| lookup | p50 ms | p99 ms | max ms | p50 / local |")
    print("|---|---:|---:|---:|---:|")
    print(row("HTTP local `/v1/health/service/web`", local, local))
    print(row("HTTP `?dc=dc2`", remote, local))
    print(row("DNS local `web.service.mesh`", dlocal, dlocal))
    print(row("DNS `web.service.dc2.mesh`", dremote, dlocal))

    detect = []
    for _ in range(KILLS):
        p, args = procs["s2"]
        p.send_signal(signal.SIGKILL)
        p.wait()
        t = time.time()
        until("dc2's server failed in dc1's view", lambda: _wan_status("s2.dc2") == 4, secs=120)
        detect.append(time.time() - t)
        log = open(os.path.join(root, "s2.log"), "a")
        procs["s2"] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), args)
        until("dc2's server alive again", lambda: _wan_status("s2.dc2") == 1, secs=120)
    print(f"\nWAN failure detection (default WAN timing: probe 5 s), {KILLS} SIGKILLs of dc2's server\n")
    print("| median s | max s | each |")
    print("|---:|---:|---|")
    print(f"| {statistics.median(detect):.1f} | {max(detect):.1f} | {', '.join(f'{d:.1f}' for d in detect)} |")


def _put(ip, path, body):
    c = http.client.HTTPConnection(ip, 8500, timeout=10)
    try:
        c.request("PUT", path, body)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def _wan_status(name):
    s, body = get("127.81.1.1", "/v1/agent/members?wan=1")
    for m in json.loads(body):
        if m["Name"] == name:
            return m["Status"]
    return None


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
        if not os.environ.get("KEEP"):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print("kept", root)
