#!/usr/bin/env python3
"""The Raft benchmark, driven by benches/raft/run.sh: three `mesh server`s (127.79.0.1-3) and a
three-member etcd (127.79.1.1-3) on loopback, both running for the whole run. Prints Markdown
tables.

  bench.py MESH LOADGEN [all|writes|failover]

  writes     replicated KV writes sent to each leader at every concurrency in CONCURRENCY, by the
             same load generator (LOADGEN, benches/raft/loadgen.rs): writes/s, p50/p99/max, the
             client's and the servers' CPU during the measured window
  failover   KILLS times: SIGKILL the leader, time until a write through a surviving member is
             accepted (the client retries), restart the killed one on its data dir, wait until
             all three name the same leader

Environment: CONCURRENCY (1,16,64,256), DURATION (10 s per point), WARMUP (2 s), KEYS (100),
KILLS (5), KEEP=1 keeps the data dirs and logs, ETCD (etcd binary).
"""
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from base64 import b64encode

MESH = LOADGEN = WORK = None
ETCD = os.environ.get("ETCD", "etcd")
PROCS = []
TICK = os.sysconf("SC_CLK_TCK")
MESH_NET = "127.79.0"
ETCD_NET = "127.79.1"


def now():
    return time.monotonic()


def die_with_parent():
    """In the child before exec: SIGKILL when the driver dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def cpu_ticks(pid):
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def request(addr, method, path, body=None, timeout=10.0):
    """(status, body as text); status 0 when the connection failed or timed out."""
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return 0, ""
    finally:
        c.close()


def poll(what, deadline_s, f, every=0.05):
    end = now() + deadline_s
    while now() < end:
        v = f()
        # 0 is an answer (the first member leads); None and False are not.
        if v is not None and v is not False:
            return v
        time.sleep(every)
    raise SystemExit(f"timed out after {deadline_s} s waiting for {what}")


class Proc:
    def __init__(self, name, cmd, log):
        self.name, self.cmd, self.log = name, cmd, log
        self.proc = None

    def start(self, ready=None):
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE if ready else log, stderr=log,
                                     stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
                                     env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn")))
        PROCS.append(self.proc)
        if ready:
            line = self.proc.stdout.readline().decode()
            if not re.search(ready, line):
                raise SystemExit(f"{self.name} did not start: {line!r}; see {self.log}")
            # Keep draining stdout so the process never blocks on a full pipe.
            out = self.proc.stdout
            threading.Thread(target=out.read, daemon=True).start()
        return self

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


class Mesh:
    """Three `mesh server`s forming their Raft group by themselves (--bootstrap-expect 3)."""
    name = "mesh"

    def __init__(self):
        base = tempfile.mkdtemp(dir=WORK, prefix="mesh-")
        self.nodes = []
        for i in (1, 2, 3):
            ip = f"{MESH_NET}.{i}"
            data = os.path.join(base, f"server{i}")
            cmd = [MESH, "server", "--node", f"server{i}", "--data-dir", data, "--bind", ip,
                   "--rpc", f"{ip}:8300", "--join", f"{MESH_NET}.1:8301", "--join", f"{MESH_NET}.2:8301",
                   "--bootstrap-expect", "3", "--gossip-probe-period", "200ms",
                   "--http", f"{ip}:8500", "--dns", f"{ip}:8600",
                   # Consul's default of 200 connections per client IP would refuse 56 of the
                   # load generator's 256 (all from 127.0.0.1).
                   "--http-max-conns-per-client", "0"]
            p = Proc(f"mesh server{i}", cmd, data + ".log")
            p.ip, p.http = ip, f"{ip}:8500"
            self.nodes.append(p)
        for p in self.nodes:
            p.start(ready=r"mesh server ready: http=")

    def start(self, i):
        self.nodes[i].start(ready=r"mesh server ready: http=")

    def leader_seen_by(self, i):
        s, body = request(self.nodes[i].http, "GET", "/v1/status/leader", timeout=2)
        if s != 200:
            return None
        try:
            v = json.loads(body)
        except ValueError:
            return None
        return v.split(":")[0] if v else None

    def agreed_leader(self):
        """The index of the leader every live node names, or None."""
        seen = {self.leader_seen_by(i) for i, p in enumerate(self.nodes) if p.alive()}
        if len(seen) != 1 or None in seen:
            return None
        ip = seen.pop()
        idx = [i for i, p in enumerate(self.nodes) if p.ip == ip and p.alive()]
        return idx[0] if idx else None

    def put(self, i, key, timeout=15.0):
        s, body = request(self.nodes[i].http, "PUT", f"/v1/kv/{key}", "v" * 100, timeout=timeout)
        return s == 200 and body.strip() == "true"

    def kind(self):
        return "mesh"


class Etcd:
    """Three etcd members, default settings (fsync on, heartbeat 100 ms, election 1,000 ms)."""
    name = "etcd"

    def __init__(self):
        base = tempfile.mkdtemp(dir=WORK, prefix="etcd-")
        cluster = ",".join(f"e{i}=http://{ETCD_NET}.{i}:2380" for i in (1, 2, 3))
        self.nodes = []
        for i in (1, 2, 3):
            ip = f"{ETCD_NET}.{i}"
            data = os.path.join(base, f"e{i}")
            cmd = [ETCD, "--name", f"e{i}", "--data-dir", data,
                   "--listen-client-urls", f"http://{ip}:2379", "--advertise-client-urls", f"http://{ip}:2379",
                   "--listen-peer-urls", f"http://{ip}:2380", "--initial-advertise-peer-urls", f"http://{ip}:2380",
                   "--initial-cluster", cluster, "--initial-cluster-state", "new",
                   "--initial-cluster-token", "mesh-raft-bench"]
            p = Proc(f"etcd e{i}", cmd, data + ".log")
            p.ip, p.http = ip, f"{ip}:2379"
            self.nodes.append(p)
        for p in self.nodes:
            p.start()

    def start(self, i):
        self.nodes[i].start()

    def status(self, i):
        s, body = request(self.nodes[i].http, "POST", "/v3/maintenance/status", "{}", timeout=2)
        if s != 200:
            return None
        try:
            v = json.loads(body)
            return v["header"]["member_id"], v.get("leader")
        except (ValueError, KeyError):
            return None

    def agreed_leader(self):
        st = {i: self.status(i) for i, p in enumerate(self.nodes) if p.alive()}
        if any(v is None for v in st.values()):
            return None
        leaders = {v[1] for v in st.values()}
        if len(leaders) != 1 or leaders == {None} or leaders == {"0"}:
            return None
        lid = leaders.pop()
        idx = [i for i, v in st.items() if v[0] == lid]
        return idx[0] if idx else None

    def put(self, i, key, timeout=15.0):
        body = json.dumps({"key": b64encode(key.encode()).decode(), "value": b64encode(b"v" * 100).decode()})
        s, text = request(self.nodes[i].http, "POST", "/v3/kv/put", body, timeout=timeout)
        return s == 200 and '"header"' in text and '"error"' not in text

    def kind(self):
        return "etcd"


def load(system, c, warmup, duration, keys):
    """One point: the load generator against the leader at concurrency c."""
    leader = poll(f"{system.name}: a leader", 60, system.agreed_leader)
    addr = system.nodes[leader].http
    pids = [p.proc.pid for p in system.nodes]
    lg = subprocess.Popen([LOADGEN, system.kind(), addr, str(c), str(warmup), str(duration), str(keys)],
                          stdout=subprocess.PIPE, preexec_fn=die_with_parent, text=True)
    PROCS.append(lg)
    line = lg.stdout.readline()
    if line.strip() != "measuring":
        raise SystemExit(f"load generator: {line!r}")
    t0, c0, s0 = now(), cpu_ticks(lg.pid), [cpu_ticks(p) for p in pids]
    line = lg.stdout.readline()
    c1, s1, t1 = cpu_ticks(lg.pid), [cpu_ticks(p) for p in pids], now()
    lg.wait()
    if lg.returncode != 0 or not line.startswith("{"):
        raise SystemExit(f"load generator failed ({lg.returncode}): {line!r}")
    r = json.loads(line)
    wall = (t1 - t0) * TICK / 100.0  # ticks per 1 % of a core
    r["client_cpu"] = (c1 - c0) / wall
    r["leader_cpu"] = (s1[leader] - s0[leader]) / wall
    r["servers_cpu"] = sum(b - a for a, b in zip(s0, s1)) / wall
    return r


def failover(system, kills):
    """Seconds from SIGKILL of the leader to the first write accepted through a survivor."""
    times = []
    for k in range(kills):
        leader = poll(f"{system.name}: all three name one leader", 120, system.agreed_leader)
        survivor = (leader + 1) % 3
        poll(f"{system.name}: a write through the survivor", 60, lambda: system.put(survivor, "failover/warm"))
        t0 = now()
        system.nodes[leader].kill()
        n = 0
        while True:
            n += 1
            if system.put(survivor, f"failover/{k}"):
                break
            if now() - t0 > 120:
                raise SystemExit(f"{system.name}: no write accepted 120 s after the kill")
            time.sleep(0.01)
        t = now() - t0
        times.append(t)
        print(f"  {system.name} kill {k + 1}: {system.nodes[leader].name} (leader) killed, write accepted through"
              f" {system.nodes[survivor].name} after {t:.3f} s ({n} attempts)", file=sys.stderr)
        system.start(leader)
        poll(f"{system.name}: the restarted member back", 120, lambda: system.agreed_leader() is not None
             and all(p.alive() for p in system.nodes))
    return times


def ms(x):
    return f"{x:.2f}"


def run(what):
    conc = [int(x) for x in os.environ.get("CONCURRENCY", "1,16,64,256").split(",")]
    duration = float(os.environ.get("DURATION", "10"))
    warmup = float(os.environ.get("WARMUP", "2"))
    keys = int(os.environ.get("KEYS", "100"))
    kills = int(os.environ.get("KILLS", "5"))
    print("starting 3 mesh servers and 3 etcd members", file=sys.stderr)
    mesh = Mesh()
    etcd = Etcd()
    for s in (mesh, etcd):
        poll(f"{s.name}: all three name one leader", 120, s.agreed_leader)
        poll(f"{s.name}: a first write", 60, lambda s=s: s.put(0, "hello"))
    if what in ("all", "writes"):
        rows = []
        for c in conc:
            row = {}
            for s in (mesh, etcd):
                r = load(s, c, warmup, duration, keys)
                print(f"  {s.name} c={c}: {r}", file=sys.stderr)
                row[s.name] = r
            rows.append((c, row))
        print(f"\nReplicated KV writes, 3 members on loopback, sent to the leader; 100-byte values over {keys} keys,"
              f" {duration:g} s per point after {warmup:g} s of warm-up, one keep-alive connection per client\n")
        print("| c | mesh writes/s | etcd writes/s | mesh/etcd | p50 ms mesh / etcd | p99 ms mesh / etcd |"
              " max ms mesh / etcd | errors mesh / etcd |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c, r in rows:
            m, e = r["mesh"], r["etcd"]
            ratio = m["rate"] / e["rate"] if e["rate"] else float("nan")
            print(f"| {c} | {m['rate']:,.0f} | {e['rate']:,.0f} | {ratio:.2f} | {ms(m['p50_ms'])} / {ms(e['p50_ms'])} |"
                  f" {ms(m['p99_ms'])} / {ms(e['p99_ms'])} | {m['max_ms']:.1f} / {e['max_ms']:.1f} |"
                  f" {m['errors']} / {e['errors']} |")
        print("\nCPU during the measured window, % of one core (the machine has "
              f"{os.cpu_count()}): the load generator, the leader, all three members\n")
        print("| c | client (mesh run) | client (etcd run) | mesh leader | mesh, 3 servers | etcd leader |"
              " etcd, 3 members |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for c, r in rows:
            m, e = r["mesh"], r["etcd"]
            print(f"| {c} | {m['client_cpu']:.0f} | {e['client_cpu']:.0f} | {m['leader_cpu']:.0f} |"
                  f" {m['servers_cpu']:.0f} | {e['leader_cpu']:.0f} | {e['servers_cpu']:.0f} |")
        sys.stdout.flush()
    if what in ("all", "failover"):
        res = {}
        for s in (mesh, etcd):
            print(f"failover: {s.name}, {kills} leader kills", file=sys.stderr)
            res[s.name] = failover(s, kills)
        print(f"\nFailover: seconds from SIGKILL of the leader to the first write accepted through a surviving"
              f" member (the client retries at once), {kills} kills each; the killed member restarted on its"
              " data dir between kills\n")
        print("| system | election timeout | median s | max s | min s | all |")
        print("|---|---|---:|---:|---:|---|")
        labels = {"mesh": "mesh (`--raft-multiplier 1.0`)", "etcd": "etcd 3.4 (defaults)"}
        timeouts = {"mesh": "1,000–2,000 ms, heartbeat 500 ms", "etcd": "1,000 ms, heartbeat 100 ms"}
        for name, t in res.items():
            print(f"| {labels[name]} | {timeouts[name]} | {statistics.median(t):.2f} | {max(t):.2f} | {min(t):.2f} |"
                  f" {', '.join(f'{x:.2f}' for x in t)} |")


def main():
    global MESH, LOADGEN, WORK
    MESH, LOADGEN = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    what = sys.argv[3] if len(sys.argv) > 3 else "all"
    if what not in ("all", "writes", "failover"):
        raise SystemExit(__doc__)
    WORK = tempfile.mkdtemp(prefix="mesh-raft-bench.")

    def stop(signum, _frame):
        raise SystemExit(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        run(what)
    finally:
        for p in PROCS:
            if p.poll() is None:
                p.kill()
                p.wait()
        if os.environ.get("KEEP") == "1":
            print(f"data dirs and logs kept in {WORK}", file=sys.stderr)
        else:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
