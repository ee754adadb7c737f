#!/usr/bin/env python3
"""The cluster benchmark (issue 12), driven by benches/cluster/run.sh: real `mesh server` and
`mesh agent` processes, each on its own loopback address (127.77.S.H: S the scenario, H the
host; the server is .1, agent i is .(10 + i)). Prints Markdown tables.

  bench.py MESH failure N TIMING       SIGKILL one agent of N; times to serfHealth critical, out
                                       of DNS, TASK_UNREACHABLE, replaced. TIMING `test` (gossip
                                       probe 200 ms, --agent-down-after 2s, as tests/cluster.rs)
                                       or `default` (probe 1 s, --agent-down-after 5s)
  bench.py MESH placement N TASKS      one app of TASKS instances on N agents, then on `mesh dev`
  bench.py MESH dns WORK               dnsperf against an agent's replica and against `mesh dev`
  bench.py MESH all                    everything, then the tables

Agents run `--runtime memory` (tasks that run nowhere: what is measured is the cluster, not
process spawning), so MESH must be built with `--features memory-runtime`.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "..", "dns", "gen.py")
MESH = None
WORK = None
PROCS = []


def now():
    return time.monotonic()


class Node:
    """A mesh process, started and ready (its first stdout line names its listeners)."""

    def __init__(self, role, name, ip, args, data, pin=()):
        self.role, self.name, self.ip = role, name, ip
        self.data = data
        log = open(data + ".log", "ab")
        cmd = list(pin) + [MESH, role, "--node", name, "--data-dir", data,
               "--http", f"{ip}:8500", "--dns", f"{ip}:8600"] + args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                     env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn")))
        PROCS.append(self.proc)
        self.http = self.dns = None

    def wait_ready(self):
        line = self.proc.stdout.readline().decode()
        m = re.search(r"http=([^ ,]+).* dns=(\S+)", line)
        if not m:
            raise SystemExit(f"mesh {self.role} {self.name} did not start: {line!r}; see {self.data}.log")
        self.http, self.dns = m.group(1), m.group(2)
        # Keep draining stdout so the process never blocks on a full pipe.
        threading.Thread(target=lambda: self.proc.stdout.read(), daemon=True).start()
        return self

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait()

    def get(self, path):
        return request(self.http, "GET", path)


def request(addr, method, path, body=None):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request(method, path, body=None if body is None else json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data) if data else None
        except ValueError:
            return r.status, data.decode(errors="replace")
    except OSError:
        return 0, None
    finally:
        c.close()


def dig_addrs(dns, name):
    """The addresses in the A answer for `name` from the DNS server at `dns` (None on failure)."""
    host, port = dns.rsplit(":", 1)
    r = subprocess.run(["dig", f"@{host}", "-p", port, "+short", "+time=1", "+tries=1", name, "A"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return set(l for l in r.stdout.split() if re.fullmatch(r"[0-9.]+", l))


def poll(what, deadline_s, f, every=0.02):
    end = now() + deadline_s
    while now() < end:
        v = f()
        if v:
            return v
        time.sleep(every)
    raise SystemExit(f"timed out after {deadline_s} s waiting for {what}")


def cluster(scenario, agents, timing, extra_agent=()):
    """A server and `agents` agents on 127.77.<scenario>.x, every agent registered."""
    net = f"127.77.{scenario}"
    base = tempfile.mkdtemp(dir=WORK, prefix=f"s{scenario}-")
    fast = ["--gossip-probe-period", "200ms"] if timing == "test" else []
    down = ["--agent-down-after", "2s"] if timing == "test" else []
    server = Node("server", "server1", f"{net}.1",
                  ["--bind", f"{net}.1"] + fast + down, os.path.join(base, "server")).wait_ready()
    nodes = []
    for i in range(agents):
        ip = f"{net}.{10 + i}"
        # Every agent joins the server's gossip address; any member would do.
        nodes.append(Node("agent", f"agent{i}", ip,
                          ["--bind", ip, "--join", f"{net}.1:8301", "--runtime", "memory",
                           "--no-registrator", "--cpus", "4", "--mem", "8192"] + fast + list(extra_agent),
                          os.path.join(base, f"agent{i}")))
    for n in nodes:
        n.wait_ready()

    def registered():
        s, v = server.get("/master/slaves")
        return s == 200 and sum(1 for a in v.get("slaves", []) if a.get("active")) == agents
    poll(f"{agents} agents registered", 120, registered, every=0.1)
    return server, nodes


def stop(nodes):
    for n in nodes:
        n.kill(signal.SIGKILL)


def app_json(id, instances, max_per):
    a = {
        "id": id, "cmd": "sleep 1000000", "instances": instances, "cpus": 0.01, "mem": 4,
        "portDefinitions": [{"port": 0}],
        # Replace unreachable tasks 1 s after they become unreachable (Marathon's default is
        # 300 s; what is measured here is mesh, not the wait).
        "unreachableStrategy": {"inactiveAfterSeconds": 1, "expungeAfterSeconds": 300},
    }
    if max_per:
        a["constraints"] = [["hostname", "MAX_PER", str(max_per)]]
    return a


def running(node, app):
    s, v = node.get(f"/v2/apps/{app}/tasks")
    if s != 200:
        return []
    return [t for t in v["tasks"] if t.get("state") == "TASK_RUNNING"]


def failure(n, timing, scenario):
    """SIGKILL one agent of n: seconds from the kill to each observation."""
    server, agents = cluster(scenario, n, timing)
    instances, max_per = 2 * n, 3
    s, v = request(server.http, "POST", "/v2/apps", app_json("web", instances, max_per))
    assert s == 201, (s, v)
    poll("all instances running", 120, lambda: len(running(server, "web")) == instances, every=0.05)
    # Every agent's replica answers all of them before the kill.
    victim = agents[0]
    others = [server] + agents[1:3]
    for o in others:
        poll(f"{o.name} answers web", 60, lambda o=o: victim.ip in (dig_addrs(o.dns, "web.service.mesh") or set()))
    on_victim = {t["id"] for t in running(server, "web") if t["host"] == victim.name}
    assert on_victim, "the victim runs no task"
    times = {}
    t0 = now()
    victim.kill(signal.SIGKILL)

    def watch(key, cond):
        def run():
            end = t0 + 120
            while now() < end:
                if cond():
                    times[key] = now() - t0
                    return
                time.sleep(0.02)
        th = threading.Thread(target=run)
        th.start()
        return th

    def serf_critical():
        s, v = server.get(f"/v1/health/node/{victim.name}")
        return s == 200 and any(c["CheckID"] == "serfHealth" and c["Status"] == "critical" for c in v)

    def out_of_dns(o):
        got = dig_addrs(o.dns, "web.service.mesh")
        return got is not None and len(got) > 0 and victim.ip not in got

    def unreachable():
        s, v = server.get("/v2/apps/web/tasks")
        if s != 200:
            return False
        states = [t["state"] for t in v["tasks"] if t["id"] in on_victim]
        return len(states) == len(on_victim) and all(x == "TASK_UNREACHABLE" for x in states)

    def replaced():
        return sum(1 for t in running(server, "web") if t["host"] != victim.name) == instances

    threads = [watch("serf", serf_critical), watch("unreachable", unreachable), watch("replaced", replaced)]
    threads += [watch(f"dns:{o.name}", lambda o=o: out_of_dns(o)) for o in others]
    for th in threads:
        th.join()
    stop(agents[1:] + [server])
    missing = [k for k in ["serf", "unreachable", "replaced"] + [f"dns:{o.name}" for o in others] if k not in times]
    if missing:
        raise SystemExit(f"failure {n} {timing}: never saw {missing}")
    dns = max(v for k, v in times.items() if k.startswith("dns:"))
    return {"serf": times["serf"], "dns": dns, "unreachable": times["unreachable"], "replaced": times["replaced"],
            "tasks": len(on_victim)}


def placement(n, tasks, scenario):
    """One app of `tasks` instances on n agents of 4 CPUs each, tasks of 0.1 CPU (at most 40 per
    agent): without constraints, then with `["hostname", "MAX_PER", "34"]`; then the first on
    `mesh dev` with the CPUs of all n agents (the reference)."""
    out = {}
    server, agents = cluster(scenario, n, "test")
    probe = agents[-1]
    for key, constraints in (("plain", None), ("max_per", [["hostname", "MAX_PER", "34"]])):
        app = dict(app_json("many", tasks, None), cpus=0.1, mem=64)
        if constraints:
            app["constraints"] = constraints
        t0 = now()
        s, v = request(server.http, "POST", "/v2/apps", app)
        assert s == 201, (s, v)
        poll(f"{tasks} running", 600, lambda: server.get("/v2/apps/many")[1]["app"]["tasksRunning"] == tasks, every=0.05)
        running_s = now() - t0

        def in_replica():
            s, v = probe.get("/v1/catalog/service/many")
            return s == 200 and len(v) == tasks
        poll(f"{tasks} in {probe.name}'s catalog", 600, in_replica, every=0.05)
        per = {}
        for t in running(server, "many"):
            per[t["host"]] = per.get(t["host"], 0) + 1
        out[key] = {"running": running_s, "replica": now() - t0, "min": min(per.values()),
                    "max": max(per.values()), "agents": len(per)}
        s, v = request(server.http, "DELETE", "/v2/apps/many")
        assert s == 200, (s, v)
        poll("the app gone", 600, lambda: server.get("/v2/apps/many")[0] == 404 and not running(server, "many"))
        poll("every task gone", 600, lambda: server.get("/v2/tasks")[1]["tasks"] == [], every=0.1)
    stop(agents + [server])

    data = tempfile.mkdtemp(dir=WORK, prefix="dev-")
    ip = f"127.77.{scenario}.200"
    dev = Node("dev", "dev", ip, ["--bind", ip, "--runtime", "memory", "--no-registrator",
                                   "--cpus", str(4 * n), "--mem", str(8192 * n)], data).wait_ready()
    t0 = now()
    s, v = request(dev.http, "POST", "/v2/apps", dict(app_json("many", tasks, None), cpus=0.1, mem=64))
    assert s == 201, (s, v)
    poll(f"{tasks} running on dev", 600, lambda: dev.get("/v2/apps/many")[1]["app"]["tasksRunning"] == tasks, every=0.05)
    out["dev"] = now() - t0
    dev.kill()
    return out


def dnsperf(dns, queries, seconds):
    host, port = dns.rsplit(":", 1)
    pin = ["taskset", "-c", "0"] if os.cpu_count() >= 2 and shutil.which("taskset") else []
    r = subprocess.run(pin + ["dnsperf", "-s", host, "-p", port, "-d", queries, "-l", str(seconds)],
                       capture_output=True, text=True)
    qps = float(re.search(r"Queries per second:\s*([0-9.]+)", r.stdout).group(1))
    lost = int(re.search(r"Queries lost:\s*([0-9]+)", r.stdout).group(1))
    return qps, lost


def dns(scenario, seconds, rounds):
    """dnsperf against an agent that answers from its replica, and against `mesh dev`, with the
    same 1,000 services x 3 instances and the same query file."""
    queries = os.path.join(WORK, "queries.txt")
    subprocess.run([sys.executable, GEN, "queries", queries, "100000"], check=True)
    pin = ["taskset", "-c", "1"] if os.cpu_count() >= 2 and shutil.which("taskset") else []

    def answers(node):
        return lambda: len(dig_addrs(node.dns, "svc-999.service.mesh") or ()) == 3

    net = f"127.77.{scenario}"
    base = tempfile.mkdtemp(dir=WORK, prefix="dns-")
    results = {"agent": [], "dev": []}
    server = Node("server", "server1", f"{net}.1", ["--bind", f"{net}.1"], os.path.join(base, "server")).wait_ready()
    # The node that answers runs pinned to CPU 1 (dnsperf to CPU 0), as in benches/dns; both
    # nodes run at once and take turns, so whatever else the machine does falls on both alike.
    ip = f"{net}.10"
    agent = Node("agent", "agent0", ip, ["--bind", ip, "--join", f"{net}.1:8301", "--runtime", "memory",
                                         "--no-registrator"], os.path.join(base, "agent0"), pin).wait_ready()
    ip = f"{net}.200"
    dev = Node("dev", "bench", ip, ["--bind", ip, "--runtime", "memory", "--no-registrator"],
               os.path.join(base, "dev"), pin).wait_ready()
    subprocess.run([sys.executable, GEN, "register", server.http], check=True)
    subprocess.run([sys.executable, GEN, "register", dev.http], check=True)
    poll("the agent's replica answers svc-999", 120, answers(agent), every=0.1)
    poll("mesh dev answers svc-999", 120, answers(dev), every=0.1)
    for _ in range(rounds):
        results["agent"].append(dnsperf(agent.dns, queries, seconds))
        results["dev"].append(dnsperf(dev.dns, queries, seconds))
    stop([agent, server, dev])
    return results


def main():
    global MESH, WORK
    MESH = os.path.abspath(sys.argv[1])
    WORK = tempfile.mkdtemp(prefix="mesh-cluster-bench.")
    try:
        run(sys.argv[2:])
    finally:
        for p in PROCS:
            if p.poll() is None:
                p.kill()
                p.wait()
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(WORK, ignore_errors=True)
        else:
            print(f"logs kept in {WORK}", file=sys.stderr)


def fmt(s):
    return f"{s:.2f}"


def run(args):
    what = args[0] if args else "all"
    agents = [int(x) for x in os.environ.get("AGENTS", "3,30").split(",")]
    big = max(agents)
    tasks = int(os.environ.get("TASKS", "1000"))
    seconds = int(os.environ.get("DURATION", "10"))
    rounds = int(os.environ.get("ROUNDS", "3"))
    scenario = 1
    if what in ("all", "failure"):
        rows = []
        for timing in ("test", "default"):
            for n in agents:
                print(f"failure detection: {n} agents, {timing} timing", file=sys.stderr)
                r = failure(n, timing, scenario)
                scenario += 1
                print(f"  {r}", file=sys.stderr)
                rows.append((timing, n, r))
        print("\nFailure of one agent (SIGKILL), seconds from the kill. App of 2 instances per agent,"
              " `unreachableStrategy.inactiveAfterSeconds: 1`; DNS = the last of the server and two other"
              " agents to drop the victim's address; polled every 20 ms\n")
        print("| gossip timing | agents | serfHealth critical | out of DNS | TASK_UNREACHABLE | replaced | tasks replaced |"
              f" replaced vs {min(agents)} agents |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for timing, n, r in rows:
            ref = next(x for t, m, x in rows if t == timing and m == min(agents))
            label = "test (probe 200 ms, down after 2 s)" if timing == "test" else "default (probe 1 s, down after 5 s)"
            print(f"| {label} | {n} | {fmt(r['serf'])} | {fmt(r['dns'])} | {fmt(r['unreachable'])} | {fmt(r['replaced'])}"
                  f" | {r['tasks']} | {r['replaced'] / ref['replaced']:.2f} |")
    if what in ("all", "placement"):
        print(f"placement: {tasks} tasks on {big} agents", file=sys.stderr)
        r = placement(big, tasks, 100)
        print(f"  {r}", file=sys.stderr)
        print(f"\nPlacement of one app with {tasks:,} instances of 0.1 CPU on {big} agents of 4 CPUs (memory runtime),"
              " seconds from the POST\n")
        print("| where | constraints | all RUNNING | in an agent's replica | tasks per agent (min–max) | RUNNING vs `mesh dev` |")
        print("|---|---|---:|---:|---:|---:|")
        for key, label in (("plain", "none"), ("max_per", "`hostname MAX_PER 34`")):
            x = r[key]
            print(f"| {big} agents | {label} | {fmt(x['running'])} | {fmt(x['replica'])} | {x['min']}–{x['max']} over {x['agents']} |"
                  f" {x['running'] / r['dev']:.2f} |")
        print(f"| `mesh dev`, {4 * big} CPUs | none | {fmt(r['dev'])} | | all on one node | 1.00 |")
    if what in ("all", "dns"):
        print("dns: an agent's replica against mesh dev", file=sys.stderr)
        r = dns(101, seconds, rounds)
        print(f"  {r}", file=sys.stderr)
        best = {k: max(q for q, _ in v) for k, v in r.items()}
        lost = {k: sum(l for _, l in v) for k, v in r.items()}
        print(f"\nDNS queries/s, 1,000 services x 3 instances, A+SRV (benches/dns's query file), best of {rounds}"
              f" {seconds} s saturation runs, the answering node pinned to one CPU\n")
        print("| answered by | queries/s | lost | vs `mesh dev` |")
        print("|---|---:|---:|---:|")
        print(f"| an agent, from its replica | {best['agent']:,.0f} | {lost['agent']} | {best['agent'] / best['dev']:.2f} |")
        print(f"| `mesh dev` | {best['dev']:,.0f} | {lost['dev']} | 1.00 |")


if __name__ == "__main__":
    main()
