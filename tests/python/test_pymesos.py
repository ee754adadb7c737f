"""pymesos 0.3.15 against mesh dev's Mesos v1 scheduler API (`POST /api/v1/scheduler`).

A small pymesos framework subscribes, receives offers in the nested JSON form pymesos parses,
launches command tasks that run to TASK_FINISHED, acknowledges the updates (pymesos' implicit
acknowledgements), reconciles, and tears down on stop. Any error pymesos logs, or an ERROR event,
fails the test.
"""

import logging
import threading

import requests
from pymesos import MesosSchedulerDriver, Scheduler
from polling import eventually

JOBS = 3


class ErrorLog(logging.Handler):
    """Collects every ERROR (and worse) record pymesos logs: parse failures, aborted threads."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(self.format(record))


def scalar(offer, name):
    return sum(r["scalar"]["value"] for r in offer["resources"] if r["name"] == name)


class Batch(Scheduler):
    """Runs JOBS one-off `echo` tasks, then suppresses offers."""

    def __init__(self):
        self.framework_id = None
        self.master_info = None
        self.launched = 0
        self.states = {}
        self.updates = []
        self.errors = []
        self.offers_seen = 0
        self.finished = threading.Event()
        self.reconciled = threading.Event()

    def registered(self, driver, framework_id, master_info):
        self.framework_id = framework_id["value"]
        self.master_info = master_info

    def resourceOffers(self, driver, offers):
        for offer in offers:
            self.offers_seen += 1
            cpus, mem = scalar(offer, "cpus"), scalar(offer, "mem")
            tasks = []
            while self.launched < JOBS and cpus >= 0.1 and mem >= 32:
                i = self.launched
                self.launched += 1
                cpus -= 0.1
                mem -= 32
                tasks.append({
                    "task_id": {"value": f"pymesos-job-{i}"},
                    "agent_id": offer["agent_id"],
                    "name": f"job {i}",
                    "command": {"value": f"echo job {i} done"},
                    "resources": [
                        {"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}},
                        {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}},
                    ],
                })
            if tasks:
                driver.launchTasks(offer["id"], tasks, filters={"refuse_seconds": 1})
            else:
                driver.declineOffer(offer["id"], filters={"refuse_seconds": 60})
        if self.launched >= JOBS:
            driver.suppressOffers()

    def statusUpdate(self, driver, update):
        self.updates.append(update)
        task = update["task_id"]["value"]
        if update.get("reason") == "REASON_RECONCILIATION" and task == "never-launched":
            self.reconciled.set()
            return
        self.states[task] = update["state"]
        if len(self.states) == JOBS and all(s == "TASK_FINISHED" for s in self.states.values()):
            self.finished.set()

    def error(self, driver, message):
        self.errors.append(message)


def framework_entry(mesh_url, fid):
    r = requests.get(f"{mesh_url}/master/frameworks", timeout=5).json()
    for f in r["frameworks"]:
        if f["id"] == fid:
            return "active", f
    for f in r["completed_frameworks"]:
        if f["id"] == fid:
            return "completed", f
    return None, None


def test_pymesos_framework_runs_tasks_to_finished_and_tears_down(mesh_url):
    errors = ErrorLog()
    logging.getLogger("pymesos").addHandler(errors)
    master = mesh_url.split("://", 1)[1]
    sched = Batch()
    driver = MesosSchedulerDriver(sched, {"user": "", "name": "pymesos-batch", "hostname": "test"}, master)
    driver.start()
    try:
        eventually("SUBSCRIBED", lambda: sched.framework_id)
        assert driver.version == "1.11.0", "pymesos read /version"
        assert sched.finished.wait(60), f"jobs did not all finish: {sched.states} errors={sched.errors}"
        assert sched.offers_seen >= 1
        # Every update carried a uuid and was acknowledged: mesh holds none back.
        assert all("uuid" in u for u in sched.updates), sched.updates
        fid = sched.framework_id
        eventually(
            "every status update acknowledged",
            lambda: framework_entry(mesh_url, fid)[1]["unacknowledged_updates"] == 0,
        )
        kind, entry = framework_entry(mesh_url, fid)
        assert kind == "active" and entry["name"] == "pymesos-batch" and entry["connected"]
        assert entry["failover_timeout"] == 100, "pymesos' default failover timeout is recorded"
        done = sorted(t["id"] for t in entry["completed_tasks"] if t["state"] == "TASK_FINISHED")
        assert done == [f"pymesos-job-{i}" for i in range(JOBS)], entry["completed_tasks"]
        # Explicit reconciliation of a task the master never saw: TASK_LOST, no uuid.
        driver.reconcileTasks([{"task_id": {"value": "never-launched"}}])
        assert sched.reconciled.wait(10), "no reconciliation answer"
        answer = [u for u in sched.updates if u["task_id"]["value"] == "never-launched"][0]
        assert answer["state"] == "TASK_LOST" and "uuid" not in answer
    finally:
        driver.stop()
        driver.join()
        logging.getLogger("pymesos").removeHandler(errors)
    # stop() without failover sends TEARDOWN: the framework is completed at once.
    eventually("framework torn down", lambda: framework_entry(mesh_url, sched.framework_id)[0] == "completed", 10)
    assert sched.errors == [], sched.errors
    assert errors.records == [], errors.records
