"""A pymesos framework for tests/ha.rs: it subscribes through MASTER (a mesh node's HTTP address,
`host:port`), launches TASKS long-running command tasks, and then only declines offers, while the
test SIGKILLs the Raft leader again and again. pymesos follows a 307 to the leader; when the
leader's stream ends it reconnects to the same address with backoff (a restarted server, now a
follower, sends it on to the new leader) and re-subscribes with its framework id.

It writes what it saw to STATUS (JSON, replaced atomically on every event) and runs until the
file STOP exists; then it tears the framework down (pymesos' `stop()` without failover), waits
for the driver, and prints the same JSON on stdout.

    python3 ha_framework.py MASTER STATUS STOP [TAG]

TAG, if given, is set as MESH_TEST_TAG in the tasks' environment (the test finds their processes).

Every driver call from a callback is guarded: a call that fails while the leader changes is
counted in `call_errors` (pymesos would otherwise abort its I/O thread). Acknowledgements are
explicit for the same reason.
"""
import json
import logging
import os
import sys
import threading
import time

from pymesos import MesosSchedulerDriver, Scheduler

TASKS = 3
master, status_path, stop_path = sys.argv[1:4]
tag = sys.argv[4] if len(sys.argv) > 4 else ""


class Log(logging.Handler):
    """pymesos' ERROR records (the expected ones of a leader kill are counted, not failed on)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.errors = []
        self.redirects = []

    def emit(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            self.errors.append(msg)
        elif "redirect to new master" in msg:
            self.redirects.append(msg.rsplit(" ", 1)[-1])


class LongRunning(Scheduler):
    def __init__(self, log):
        self.lock = threading.RLock()
        self.log = log
        self.s = {
            "framework_id": None,
            "registered": 0,
            "masters": [],
            # One entry per re-subscription: when, where, and how long since the stream broke.
            "reregistrations": [],
            "disconnects": 0,
            "offers": 0,
            "offers_since_reregistered": 0,
            "launched": [],
            "updates": {},
            "states": {},
            "reconciled": {},
            "call_errors": [],
            "error_events": [],
        }
        self.subscribed = False
        self.down_since = None

    def save(self):
        with self.lock:
            self.s["log_errors"] = list(self.log.errors)
            self.s["redirects"] = list(self.log.redirects)
            tmp = status_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.s, f)
            os.replace(tmp, status_path)

    def call(self, what, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the leader may be going away; counted
            with self.lock:
                self.s["call_errors"].append("%s: %s" % (what, str(e).splitlines()[0] if str(e) else type(e).__name__))

    def registered(self, driver, framework_id, master_info):
        with self.lock:
            self.s["framework_id"] = framework_id["value"]
            self.s["registered"] += 1
            self.s["masters"].append("%s:%s" % (master_info["hostname"], master_info["port"]))
            self.subscribed = True
        self.save()

    def reregistered(self, driver, master_info):
        now = time.time()
        with self.lock:
            where = "%s:%s" % (master_info["hostname"], master_info["port"])
            self.s["masters"].append(where)
            self.s["reregistrations"].append({
                "at": now,
                "master": where,
                "after_s": round(now - self.down_since, 3) if self.down_since else None,
            })
            self.s["offers_since_reregistered"] = 0
            self.subscribed = True
            self.down_since = None
        # Ask for the latest state of every task (implicit reconciliation), as a framework
        # should after a master failover.
        self.call("reconcile", driver.reconcileTasks, [])
        self.save()

    def disconnected(self, driver):
        with self.lock:
            if self.subscribed:
                self.subscribed = False
                self.down_since = time.time()
                self.s["disconnects"] += 1
        self.save()

    def resourceOffers(self, driver, offers):
        for offer in offers:
            with self.lock:
                self.s["offers"] += 1
                self.s["offers_since_reregistered"] += 1
                todo = TASKS - len(self.s["launched"])
            cpus = sum(r["scalar"]["value"] for r in offer["resources"] if r["name"] == "cpus")
            mem = sum(r["scalar"]["value"] for r in offer["resources"] if r["name"] == "mem")
            tasks = []
            while todo > 0 and cpus >= 0.05 and mem >= 16:
                with self.lock:
                    i = len(self.s["launched"])
                    tid = "ha-fw-%d" % i
                    self.s["launched"].append(tid)
                todo -= 1
                cpus -= 0.05
                mem -= 16
                tasks.append({
                    "task_id": {"value": tid},
                    "agent_id": offer["agent_id"],
                    "name": tid,
                    "command": {
                        "value": "sleep 3600",
                        "environment": {"variables": [{"name": "MESH_TEST_TAG", "value": tag}]},
                    },
                    "resources": [
                        {"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.05}},
                        {"name": "mem", "type": "SCALAR", "scalar": {"value": 16}},
                    ],
                })
            if tasks:
                self.call("launch", driver.launchTasks, offer["id"], tasks, filters={"refuse_seconds": 1})
            else:
                # Short refusals: offers keep coming, so the test sees them after a failover.
                self.call("decline", driver.declineOffer, offer["id"], filters={"refuse_seconds": 2})
        self.save()

    def statusUpdate(self, driver, update):
        task = update["task_id"]["value"]
        with self.lock:
            self.s["updates"][task] = self.s["updates"].get(task, 0) + 1
            self.s["states"][task] = update["state"]
            if update.get("reason") == "REASON_RECONCILIATION":
                self.s["reconciled"][task] = update["state"]
        if "uuid" in update:
            self.call("acknowledge", driver.acknowledgeStatusUpdate, update)
        self.save()

    def error(self, driver, message):
        with self.lock:
            self.s["error_events"].append(message)
        self.save()


log = Log()
logging.getLogger("pymesos").addHandler(log)
sched = LongRunning(log)
driver = MesosSchedulerDriver(
    sched,
    {"user": "", "name": "ha-pymesos", "hostname": "ha-test", "failover_timeout": 100},
    master,
    implicit_acknowledgements=False,
)
sched.save()
driver.start()
while not os.path.exists(stop_path):
    if driver.aborted:
        sys.exit("the pymesos driver aborted")
    time.sleep(0.2)
driver.stop()
driver.join()
sched.save()
print(json.dumps(sched.s))
