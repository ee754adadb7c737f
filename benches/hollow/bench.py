"""Driver of benches/hollow/run.sh: real `mesh server`s against hollow agents, measures, prints a table."""

import http.client
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import benchlib  # noqa: E402
from benchlib import pct  # noqa: E402

MESH = sys.argv[1]
SERVERS = int(os.environ.get("SERVERS", "1"))
AGENTS = int(os.environ.get("AGENTS", "1000"))
PROCS = int(os.environ.get("PROCS", "2"))
APPS = int(os.environ.get("APPS", "100"))
INSTANCES = int(os.environ.get("INSTANCES", "1000"))
REQUESTS = int(os.environ.get("REQUESTS", "500"))
TIMEOUT = float(os.environ.get("TIMEOUT", "600"))
KEEP = os.environ.get("KEEP") == "1"
TOTAL = APPS * INSTANCES
TASK_CPUS = 0.01
HZ = os.sysconf("SC_CLK_TCK")
API = "127.90.0.1"  # the leader, once known
procs = {}
root = tempfile.mkdtemp(prefix="mesh-hollow-bench-")


def ip_of(i):
    return f"127.90.0.{i}"


def start(name, args):
    log = open(os.path.join(root, name + ".log"), "w")
    procs[name] = subprocess.Popen([MESH] + args, stdout=log, stderr=subprocess.STDOUT)


def stop_all():
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def request(method, path, body=None, ip=None, timeout=60):
    c = http.client.HTTPConnection(ip or API, 8080, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def until(what, f, secs=120, every=0.2):
    benchlib.until(what, f, secs, every, note=f" (logs in {root})")


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime


def rss_mb(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def dir_mb(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return total / 2**20


def dns_query(name, qtype=1, tcp=False, ip=None):
    """One DNS query (hand-built, no dependency); returns (rcode, answer count, truncated)."""
    qid = 0x4D48
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", qtype, 1)
    addr = (ip or API, 8600)
    if tcp:
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(struct.pack(">H", len(q)) + q)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack(">H", buf[:2])[0]:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            r = buf[2:]
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            s.sendto(q, addr)
            r, _ = s.recvfrom(65536)
    _, flags, _, an, _, _ = struct.unpack(">HHHHHH", r[:12])
    return flags & 0xF, an, bool(flags & 0x0200)


def http_latency(path, n):
    return benchlib.http_latency(API, 8080, path, n, timeout=60)


def dns_latency(name, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        rcode, an, _ = dns_query(name)
        out.append(time.perf_counter() - t)
        assert rcode == 0 and an > 0, (name, rcode)
    return out


def app_body(i):
    return json.dumps({
        "id": f"/app{i:04d}", "cmd": "sleep 100000", "instances": INSTANCES, "cpus": TASK_CPUS, "mem": 8,
        "portDefinitions": [{"port": 0}],
    })


def apps_summary():
    _, body = request("GET", "/v2/apps")
    apps = json.loads(body)["apps"]
    return sum(a["tasksRunning"] for a in apps), sum(a["tasksStaged"] for a in apps), len(apps)


class Sampler(threading.Thread):
    """Peak RSS of the leader server, sampled (VmHWM covers it too)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, False

    def run(self):
        while not self.stop:
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            time.sleep(0.5)


def main():
    servers = [ip_of(i) for i in range(1, SERVERS + 1)]
    for i, ip in enumerate(servers, 1):
        args = ["server", "--bind", ip, "--rpc", ip + ":8300", "--node", f"s{i}",
                "--data-dir", os.path.join(root, f"s{i}"), "--bootstrap-expect", str(SERVERS)]
        if i > 1:
            args += ["--join", servers[0]]
        start(f"s{i}", args)
    until("a leader", lambda: request("GET", "/v1/status/leader", timeout=2)[1].strip() not in (b"", b'""'), secs=60)
    global API
    leader = json.loads(request("GET", "/v1/status/leader")[1]).rsplit(":", 1)[0]
    li = servers.index(leader)
    API = leader  # every request goes to the leader
    # The leader first, then the followers.
    server_pids = [procs[f"s{i}"].pid for i in [li + 1] + [j for j in range(1, SERVERS + 1) if j != li + 1]]
    cpu0 = [cpu_secs(p) for p in server_pids]

    t = time.time()
    per = (AGENTS + PROCS - 1) // PROCS
    for k in range(PROCS):
        first, count = k * per, min(per, AGENTS - k * per)
        if count <= 0:
            break
        # Each agent fits exactly its share of the tasks (0.01 CPU each): tasks fill each offer as
        # Marathon does, so with more room the first agents would take everything.
        cpus = -(-TOTAL // AGENTS) * TASK_CPUS + TASK_CPUS / 2
        args = ["hollow-agents", "--count", str(count), "--first-index", str(first), "--rate", "500",
                "--cpus", f"{cpus:.4f}", "--mem", "1000000"]
        for ip in servers:
            args += ["--server", ip + ":8300"]
        start(f"hollow{k}", args)

    def registered():
        _, body = request("GET", "/master/slaves")
        return sum(1 for s in json.loads(body)["slaves"] if s.get("active")) >= AGENTS
    until(f"{AGENTS} agents registered", registered, secs=300, every=1)
    t_register = time.time() - t
    print(f"{AGENTS} hollow agents registered in {t_register:.1f}s", file=sys.stderr)

    sampler = Sampler(server_pids[0])
    sampler.start()
    cpu1 = [cpu_secs(p) for p in server_pids]
    t0 = time.time()
    post_lat = []
    for i in range(APPS):
        ts = time.perf_counter()
        status, body = request("POST", "/v2/apps", app_body(i))
        post_lat.append(time.perf_counter() - ts)
        assert status in (200, 201), (status, body[:300])
    t_posted = time.time() - t0
    print(f"{APPS} apps posted in {t_posted:.1f}s", file=sys.stderr)

    t_placed = t_running = None
    last = 0
    deadline = t0 + TIMEOUT
    while time.time() < deadline:
        running, staged, _ = apps_summary()
        now = time.time() - t0
        if t_placed is None and running + staged >= TOTAL:
            t_placed = now
        if running >= TOTAL:
            t_running = now
            t_placed = t_placed or now
            break
        if now - last >= 10:
            print(f"  {now:.0f}s: {running} running, {staged} staged of {TOTAL}", file=sys.stderr)
            last = now
        time.sleep(1)
    if t_running is None:
        running, staged, _ = apps_summary()
        print(f"NOT all running after {TIMEOUT:.0f}s: {running} running, {staged} staged of {TOTAL}", file=sys.stderr)

    def in_catalog():
        for i in range(APPS):
            _, body = request("GET", f"/v1/catalog/service/app{i:04d}")
            if len(json.loads(body)) != INSTANCES:
                return False
        return True
    until("every task in the catalog", in_catalog, secs=max(10, deadline - time.time()), every=1)
    t_catalog = time.time() - t0
    rcode, dns_an, _ = dns_query("app0000.service.mesh", qtype=33, tcp=True)
    cpu2 = [cpu_secs(p) for p in server_pids]
    sampler.stop = True

    lat_app = http_latency("/v2/apps/app0000", REQUESTS)
    lat_tasks = http_latency("/v2/apps/app0000/tasks", max(20, REQUESTS // 10))
    lat_all = http_latency("/v2/apps", 5)
    lat_cat = http_latency("/v1/catalog/service/app0000", REQUESTS)
    lat_dns = dns_latency("app0000.service.mesh", REQUESTS * 2)
    time.sleep(1)
    s0 = server_pids[0]
    # A follower sends an agent on to the leader ("not the leader"): that is no lost connection.
    reconnects = redirects = 0
    for n in procs:
        if n.startswith("hollow"):
            with open(os.path.join(root, n + ".log")) as f:
                for line in f:
                    if "lost the server" in line:
                        redirects += "not the leader" in line
                        reconnects += "not the leader" not in line
    hollow_rss = sum(rss_mb(p.pid) for n, p in procs.items() if n.startswith("hollow"))
    data = [dir_mb(os.path.join(root, f"s{i}")) for i in range(1, SERVERS + 1)]  # s1, s2, ...
    files = []
    for d, _, fs in os.walk(os.path.join(root, f"s{li + 1}")):
        for f in fs:
            p = os.path.join(d, f)
            files.append((os.path.relpath(p, root), os.path.getsize(p)))

    ms = lambda v: f"{v * 1000:.2f}"
    tasks_per_agent = TOTAL / AGENTS
    print(f"\n{SERVERS} server(s), {AGENTS} hollow agents in {PROCS} processes, {APPS} apps x {INSTANCES} instances"
          f" = {TOTAL:,} tasks ({tasks_per_agent:.0f} per agent), {os.cpu_count()} cores\n")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| agents registered | {t_register:.1f} s |")
    print(f"| {APPS} `POST /v2/apps` | {t_posted:.1f} s (p50 {ms(pct(post_lat, .5))} ms) |")
    if t_placed:
        print(f"| every task placed (staged or running) | {t_placed:.1f} s |")
        print(f"| placements/s | {TOTAL / t_placed:,.0f} |")
    if t_running:
        print(f"| every task TASK_RUNNING (`/v2/apps` tasksRunning) | {t_running:.1f} s |")
    else:
        print(f"| every task TASK_RUNNING | not within {TIMEOUT:.0f} s |")
    print(f"| every task in the catalog (`/v1/catalog/service/<app>` = {INSTANCES}) | {t_catalog:.1f} s |")
    print(f"| SRV answers for `app0000.service.mesh` over TCP | {dns_an} |")
    print(f"| leader RSS now / peak sampled / VmHWM | {rss_mb(s0):,.0f} / {sampler.peak:,.0f} / {rss_mb(s0, 'VmHWM'):,.0f} MB |")
    print(f"| leader CPU while agents registered | {cpu1[0] - cpu0[0]:.1f} s |")
    print(f"| leader CPU from first POST to all in catalog | {cpu2[0] - cpu1[0]:.1f} s ({(cpu2[0] - cpu1[0]) / t_catalog * 100:.0f}% of a core) |")
    if SERVERS > 1:
        print(f"| followers' CPU over the same span | {', '.join(f'{c2 - c1:.1f}' for c1, c2 in zip(cpu1[1:], cpu2[1:]))} s |")
    print(f"| hollow agent processes' RSS (total) | {hollow_rss:,.0f} MB ({hollow_rss / AGENTS * 1024:.0f} KB per agent) |")
    print(f"| agents' lost connections (and redirects by a follower to the leader) | {reconnects} ({redirects}) |")
    print(f"| data dir per server | {', '.join(f'{d:,.1f}' for d in data)} MB |")
    for name, xs in (("`GET /v2/apps/app0000`", lat_app), (f"`GET /v2/apps/app0000/tasks` ({INSTANCES} tasks)", lat_tasks),
                     (f"`GET /v2/apps` (all {APPS} apps)", lat_all),
                     (f"`GET /v1/catalog/service/app0000` ({INSTANCES} instances)", lat_cat),
                     ("DNS A `app0000.service.mesh` (UDP)", lat_dns)):
        print(f"| {name} p50 / p99 | {ms(pct(xs, .5))} / {ms(pct(xs, .99))} ms |")
    print("\nleader's data dir:")
    print(f"(API and DNS asked of the leader, {API})")
    for f, size in sorted(files):
        print(f"  {f}: {size / 2**20:,.2f} MB")


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
        if KEEP:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
