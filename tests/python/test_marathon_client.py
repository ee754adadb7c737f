"""marathon-python 0.13.0 against a real `mesh dev`: every client method that touches apps,
groups, tasks, deployments, queue, info, leader, ping, metrics and the event stream must parse
the server's answers (the client turns any unknown JSON key into a TypeError).

The server and the per-test cleanup live in conftest.py. Every wait is a deadline-bounded poll.
"""

import queue
import socket
import threading
import time

import marathon
import pytest
import requests
from marathon import MarathonApp, MarathonTask
from marathon.exceptions import ConflictError, MarathonHttpError, NotFoundError
from marathon.models import (
    MarathonDeployment,
    MarathonDeploymentAction,
    MarathonDeploymentStep,
    MarathonEndpoint,
    MarathonGroup,
    MarathonHealthCheck,
    MarathonInfo,
    MarathonQueueItem,
)
from marathon.models.app import MarathonTaskFailure
from marathon.models.container import (
    MarathonContainer,
    MarathonContainerPortMapping,
    MarathonContainerVolume,
    MarathonDockerContainer,
)
from marathon.models.events import (
    MarathonDeploymentSuccess,
    MarathonEventStreamAttached,
    MarathonStatusUpdateEvent,
)
from marathon.models.info import MarathonConfig, MarathonHttpConfig, MarathonZooKeeperConfig


# ---------------------------------------------------------------------------------------------
# helpers


def wait_until(what, fn, timeout=30.0, interval=0.1):
    """Poll `fn` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def settled(client, app_id, instances):
    """The app has no deployment and `instances` running tasks (returns the app)."""

    def check():
        app = client.get_app(app_id)
        running = [t for t in app.tasks if t.state == "TASK_RUNNING"]
        if not app.deployments and app.tasks_running == instances and len(running) == instances:
            return app
        return None

    return wait_until(f"{app_id} to settle at {instances} running tasks", check)


def trivial(instances=1, **kw):
    return MarathonApp(cmd="sleep 3600", cpus=0.1, mem=16, instances=instances, **kw)


def assert_deployment_result(r):
    assert isinstance(r, dict), r
    assert isinstance(r.get("deploymentId"), str) and r["deploymentId"], r
    assert isinstance(r.get("version"), str) and r["version"].endswith("Z"), r


def assert_task(t, app_id):
    assert isinstance(t, MarathonTask)
    assert t.app_id == app_id
    assert t.id and t.host and t.slave_id
    assert isinstance(t.ports, list)


def server_has(url, method, path, ok):
    try:
        r = requests.request(method, url + path, timeout=5)
    except requests.RequestException:
        return False
    return ok(r)


def has_groups(url):
    return server_has(url, "GET", "/v2/groups", lambda r: r.status_code == 200)


def has_delete_deployment(url):
    # A missing route answers 404 "URI not found" (or 405); the real one says the plan is unknown.
    def ok(r):
        if r.status_code == 405:
            return False
        try:
            return r.json().get("message") != "URI not found"
        except ValueError:
            return False

    return server_has(url, "DELETE", "/v2/deployments/00000000-0000-0000-0000-000000000000", ok)


class _RecordingSession(requests.Session):
    """An SSE session that remembers its responses, so a test can close the stream it opened."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def get(self, *args, **kwargs):
        r = super().get(*args, **kwargs)
        self.sink.append(r)
        return r


class EventReader:
    """Reads `client.event_stream(...)` in a thread; every event is parsed by marathon-python."""

    def __init__(self, url, event_types=None):
        self.events = queue.Queue()
        self.error = None
        self.closed = False
        self.seen = []
        self._responses = []
        self.client = marathon.MarathonClient(url, sse_session=_RecordingSession(self._responses))
        self.thread = threading.Thread(target=self._run, args=(event_types,), daemon=True)
        self.thread.start()

    def _run(self, event_types):
        try:
            for e in self.client.event_stream(event_types=event_types):
                self.events.put(e)
        except Exception as e:  # parse errors end up here, reported by wait_for
            if not self.closed:
                self.error = e
                self.events.put(None)

    def wait_for(self, what, pred, timeout=30.0):
        """The first event, seen before or arriving within `timeout`, that matches `pred`
        (Marathon does not promise any order between events)."""
        for e in self.seen:
            if pred(e):
                return e
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                types = [type(e).__name__ for e in self.seen]
                pytest.fail(f"no {what} within {timeout} s; saw {types}")
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if e is None:
                pytest.fail(f"event stream failed while waiting for {what}: {self.error!r}")
            self.seen.append(e)
            if pred(e):
                return e

    def close(self):
        self.closed = True
        for r in self._responses:
            for path in (("raw", "_connection", "sock"), ("raw", "_fp", "fp", "raw", "_sock")):
                obj = r
                for attr in path:
                    obj = getattr(obj, attr, None)
                    if obj is None:
                        break
                if obj is not None:
                    try:
                        obj.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            r.close()
        self.thread.join(10)


# ---------------------------------------------------------------------------------------------
# info, leader, ping, metrics


def test_ping_info_leader_metrics(client, mesh_url):
    assert client.ping().strip() == b"pong"

    info = client.get_info()
    assert isinstance(info, MarathonInfo)
    assert isinstance(info.http_config, MarathonHttpConfig)
    assert isinstance(info.marathon_config, MarathonConfig)
    assert isinstance(info.zookeeper_config, MarathonZooKeeperConfig)
    assert info.name and info.version and info.elected is True
    # marathon-python's itests check the SSE support by version (> 0.11.0).
    assert tuple(int(x) for x in info.version.split(".")[:2]) > (0, 11)

    leader = client.get_leader()
    assert leader == {"leader": mesh_url[len("http://"):]}

    metrics = client.get_metrics()
    for key in ("version", "counters", "gauges", "histograms", "meters", "timers"):
        assert key in metrics, metrics


def test_delete_leader_is_answered_cleanly(client):
    # A single mesh node cannot abdicate. Whatever it answers must be a clean HTTP answer the
    # client understands: Marathon's {"message": ...} or an HTTP error, never a parse error.
    try:
        r = client.delete_leader()
    except MarathonHttpError as e:
        assert e.status_code in (404, 405, 501, 503), e
        print(f"delete_leader: HTTP {e.status_code} ({e.error_message})")
    else:
        assert isinstance(r, dict) and "message" in r, r
        # If it abdicated, the node must come back as leader.
        wait_until("a leader again", lambda: client.get_leader().get("leader"))


# ---------------------------------------------------------------------------------------------
# apps


def test_create_trivial_app_and_get_it_with_every_embed(client):
    created = client.create_app("pytest-trivial", trivial(instances=2, labels={"team": "py"}))
    assert isinstance(created, MarathonApp)
    assert created.id == "/pytest-trivial"
    assert created.instances == 2 and created.cpus == 0.1 and created.mem == 16
    assert created.tasks_staged is not None and created.tasks_running is not None
    assert len(created.deployments) == 1 and isinstance(created.deployments[0], MarathonDeployment)

    app = settled(client, "/pytest-trivial", 2)
    assert all(isinstance(t, MarathonTask) for t in app.tasks)
    for t in app.tasks:
        assert_task(t, "/pytest-trivial")
        assert t.started_at is not None and t.staged_at is not None

    embeds = dict(
        embed_tasks=True,
        embed_counts=True,
        embed_deployments=True,
        embed_readiness=True,
        embed_last_task_failure=True,
        embed_failures=True,
    )
    for name in embeds:
        one = client.get_app("pytest-trivial", **{name: True})
        assert one.id == "/pytest-trivial", name
    every = client.get_app("pytest-trivial", **embeds)
    assert len(every.tasks) == 2
    assert every.tasks_running == 2

    # Marathon's ids are paths: the leading slash form works too.
    assert client.get_app("/pytest-trivial").id == "/pytest-trivial"

    with pytest.raises(NotFoundError):
        client.get_app("pytest-no-such-app")
    with pytest.raises(ConflictError):
        client.create_app("pytest-trivial", trivial())


def test_list_apps_with_embeds_and_filters(client):
    client.create_app("pytest-list-a", trivial(labels={"tier": "web"}))
    client.create_app("pytest-list-b", MarathonApp(cmd="sleep 3601", cpus=0.1, mem=16, instances=1))
    settled(client, "/pytest-list-a", 1)
    settled(client, "/pytest-list-b", 1)

    plain = client.list_apps()
    assert sorted(a.id for a in plain) == ["/pytest-list-a", "/pytest-list-b"]

    embeds = dict(
        embed_tasks=True,
        embed_counts=True,
        embed_deployments=True,
        embed_readiness=True,
        embed_last_task_failure=True,
        embed_failures=True,
    )
    for name in embeds:
        apps = client.list_apps(**{name: True})
        assert len(apps) == 2, name
    apps = client.list_apps(**embeds)
    assert all(len(a.tasks) == 1 and isinstance(a.tasks[0], MarathonTask) for a in apps)
    assert all(a.tasks_running == 1 for a in apps)

    assert [a.id for a in client.list_apps(cmd="sleep 3601")] == ["/pytest-list-b"]
    assert [a.id for a in client.list_apps(app_id="list-a")] == ["/pytest-list-a"]
    assert [a.id for a in client.list_apps(label="tier==web")] == ["/pytest-list-a"]
    assert [a.id for a in client.list_apps(instances=1, cmd="sleep 3600")] == ["/pytest-list-a"]


def test_list_tasks_and_endpoints(client):
    client.create_app("pytest-tasks", trivial(instances=3))
    client.create_app("pytest-other", trivial(instances=1))
    settled(client, "/pytest-tasks", 3)
    settled(client, "/pytest-other", 1)

    tasks = client.list_tasks("pytest-tasks")
    app = client.get_app("pytest-tasks")
    assert len(tasks) == app.instances == 3  # marathon-python's itest
    for t in tasks:
        assert_task(t, "/pytest-tasks")
        assert len(t.ports) == 1 and 45000 <= t.ports[0] <= 45099

    everything = client.list_tasks()
    assert len(everything) == 4
    assert {t.app_id for t in everything} == {"/pytest-tasks", "/pytest-other"}
    assert len(client.list_tasks(app_id="pytest-other", state="TASK_RUNNING")) == 1

    endpoints = client.list_endpoints()
    assert len(endpoints) == 4 and all(isinstance(e, MarathonEndpoint) for e in endpoints)
    assert {e.task_port for e in endpoints} == {p for t in everything for p in t.ports}

    with pytest.raises(NotFoundError):
        client.list_tasks("pytest-no-such-app")


def test_update_app_versions_and_rollback(client):
    client.create_app("pytest-versions", trivial())
    first = settled(client, "/pytest-versions", 1)

    r = client.update_app("pytest-versions", MarathonApp(env={"COLOR": "blue"}, labels={"v": "2"}))
    assert_deployment_result(r)
    updated = wait_until(
        "the update to land",
        lambda: (lambda a: a if a.env == {"COLOR": "blue"} and not a.deployments else None)(
            client.get_app("pytest-versions")
        ),
    )
    settled(client, "/pytest-versions", 1)
    assert updated.labels == {"v": "2"}
    assert updated.version != first.version

    # A full round trip: change what get_app returned and send all of it back.
    full = client.get_app("pytest-versions")
    full.env["SHAPE"] = "round"
    assert_deployment_result(client.update_app("pytest-versions", full))
    wait_until("the round-trip update", lambda: client.get_app("pytest-versions").env.get("SHAPE") == "round")
    settled(client, "/pytest-versions", 1)

    versions = client.list_versions("pytest-versions")
    assert len(versions) >= 3 and all(isinstance(v, str) for v in versions)
    assert first.version in versions
    for v in versions:
        old = client.get_version("pytest-versions", v)
        assert isinstance(old, MarathonApp) and old.id == "/pytest-versions"
    assert client.get_version("pytest-versions", first.version).env == {}
    with pytest.raises(NotFoundError):
        client.get_version("pytest-versions", "2001-01-01T00:00:00.000Z")

    r = client.rollback_app("pytest-versions", first.version)
    assert_deployment_result(r)
    rolled = wait_until(
        "the rollback to land",
        lambda: (lambda a: a if a.env == {} and not a.deployments else None)(client.get_app("pytest-versions")),
    )
    assert rolled.labels == {}
    settled(client, "/pytest-versions", 1)


def test_update_apps_bulk(client):
    client.create_app("pytest-bulk-a", trivial())
    settled(client, "/pytest-bulk-a", 1)
    r = client.update_apps(
        [
            MarathonApp(id="/pytest-bulk-a", instances=2),
            MarathonApp(id="/pytest-bulk-b", cmd="sleep 3600", cpus=0.1, mem=16, instances=1),
        ]
    )
    assert_deployment_result(r)
    settled(client, "/pytest-bulk-a", 2)
    settled(client, "/pytest-bulk-b", 1)


def test_scale_app_absolute_and_delta(client):
    client.create_app("pytest-scale", trivial())
    settled(client, "/pytest-scale", 1)

    assert_deployment_result(client.scale_app("pytest-scale", instances=3))
    settled(client, "/pytest-scale", 3)
    assert_deployment_result(client.scale_app("pytest-scale", delta=-2))
    settled(client, "/pytest-scale", 1)
    assert_deployment_result(client.scale_app("pytest-scale", delta=1))
    settled(client, "/pytest-scale", 2)
    assert_deployment_result(client.scale_app("pytest-scale", instances=0))
    settled(client, "/pytest-scale", 0)
    # An unknown app: the client logs and returns None.
    assert client.scale_app("pytest-no-such-app", instances=1) is None


def test_restart_app(client):
    client.create_app("pytest-restart", trivial(instances=2))
    before = {t.id for t in settled(client, "/pytest-restart", 2).tasks}
    r = client.restart_app("pytest-restart")
    assert_deployment_result(r)

    def replaced():
        app = client.get_app("pytest-restart")
        ids = {t.id for t in app.tasks if t.state == "TASK_RUNNING"}
        return not app.deployments and len(ids) == 2 and not (ids & before)

    wait_until("every task to be replaced by the restart", replaced)
    with pytest.raises(NotFoundError):
        client.restart_app("pytest-no-such-app")


def test_kill_task_and_kill_tasks(client):
    client.create_app("pytest-kill", trivial(instances=4))
    app = settled(client, "/pytest-kill", 4)

    # One task, no scale: it is replaced.
    victim = app.tasks[0].id
    killed = client.kill_task("pytest-kill", victim)
    assert isinstance(killed, MarathonTask) and killed.id == victim
    wait_until(
        "the killed task to be replaced",
        lambda: (lambda a: victim not in {t.id for t in a.tasks} and a.tasks_running == 4)(
            client.get_app("pytest-kill")
        ),
    )

    # One task with scale: the app shrinks.
    victim = client.get_app("pytest-kill").tasks[0].id
    r = client.kill_task("pytest-kill", victim, scale=True)
    assert_deployment_result(r)
    app = settled(client, "/pytest-kill", 3)
    assert app.instances == 3 and victim not in {t.id for t in app.tasks}

    # Every task on a host (no scale): all replaced.
    host = app.tasks[0].host
    before = {t.id for t in app.tasks}
    killed = client.kill_tasks("pytest-kill", host=host)
    assert isinstance(killed, list) and len(killed) == 3
    for t in killed:
        assert_task(t, "/pytest-kill")
    wait_until(
        "the host's tasks to be replaced",
        lambda: (lambda a: a.tasks_running == 3 and not ({t.id for t in a.tasks} & before))(
            client.get_app("pytest-kill")
        ),
    )
    assert client.kill_tasks("pytest-kill", host="no-such-host.example") == []

    # Every task with scale: the app goes to 0.
    r = client.kill_tasks("pytest-kill", scale=True)
    assert_deployment_result(r)
    app = settled(client, "/pytest-kill", 0)
    assert app.instances == 0

    with pytest.raises(NotFoundError):
        client.kill_task("pytest-kill", "pytest-kill.no-such-task")
    with pytest.raises(NotFoundError):
        client.kill_tasks("pytest-no-such-app")
    with pytest.raises(MarathonHttpError) as e:
        client.kill_tasks("pytest-kill", scale=True, wipe=True)
    assert e.value.status_code == 400


def test_kill_given_tasks(client):
    client.create_app("pytest-given", trivial(instances=3))
    app = settled(client, "/pytest-given", 3)

    ids = [t.id for t in app.tasks]
    assert client.kill_given_tasks(ids[:2]) is True  # marathon-python's itest kills #0,1
    wait_until(
        "the two tasks to be replaced",
        lambda: (lambda a: a.tasks_running == 3 and not ({t.id for t in a.tasks} & set(ids[:2])))(
            client.get_app("pytest-given")
        ),
    )

    one = client.get_app("pytest-given").tasks[0].id
    assert client.kill_given_tasks([one], scale=True, force=True) is True
    app = settled(client, "/pytest-given", 2)
    assert app.instances == 2

    with pytest.raises(MarathonHttpError) as e:
        client.kill_given_tasks(["pytest-given.no-such-task"])
    assert e.value.status_code == 400


def test_delete_app(client):
    client.create_app("pytest-delete", trivial(instances=2))
    settled(client, "/pytest-delete", 2)
    r = client.delete_app("pytest-delete")
    assert_deployment_result(r)

    def gone():
        try:
            client.get_app("pytest-delete")
        except NotFoundError:
            return True
        return False

    wait_until("the app to be gone", gone)
    wait_until("its tasks to be gone", lambda: not client.list_tasks())
    with pytest.raises(NotFoundError):
        client.delete_app("pytest-delete")

    client.create_app("pytest-delete-forced", trivial())
    assert_deployment_result(client.delete_app("pytest-delete-forced", force=True))
    wait_until("the forced delete", lambda: not client.list_apps())


def complex_app(timeout_seconds):
    """marathon-python's itest "complex app", 1.4 format, built from the client's models."""
    return MarathonApp(
        cmd="/bin/true",
        args=[],
        cpus=0.25,
        mem=30,
        instances=1,
        backoff_factor=2,
        backoff_seconds=1,
        uris=["file:///root/.dockercfg"],
        container=MarathonContainer(
            type="DOCKER",
            docker=MarathonDockerContainer(
                image="localhost/fake_docker_url",
                network="BRIDGE",
                port_mappings=[MarathonContainerPortMapping(container_port=8888, host_port=0, protocol="tcp")],
                parameters=[{"key": "add-host", "value": "google-public-dns-a.google.com:8.8.8.8"}],
            ),
            volumes=[MarathonContainerVolume(container_path="/etc/stuff", host_path="/etc/stuff", mode="RO")],
        ),
        health_checks=[
            MarathonHealthCheck(
                protocol="HTTP",
                path="/health",
                grace_period_seconds=3,
                interval_seconds=10,
                port_index=0,
                timeout_seconds=timeout_seconds,
                max_consecutive_failures=3,
            )
        ],
    )


def test_complex_docker_app_create_and_get(client):
    # The image does not exist (and this node runs processes only): create and read back only.
    created = client.create_app("pytest-complex", complex_app(timeout_seconds=5))
    assert isinstance(created, MarathonApp) and created.id == "/pytest-complex"

    app = client.get_app("pytest-complex")
    assert app.container.type == "DOCKER"
    assert app.container.docker.image == "localhost/fake_docker_url"
    assert [(p.container_port, p.host_port, p.protocol) for p in app.container.port_mappings] == [
        (8888, 0, "tcp")
    ]
    assert [(v.container_path, v.host_path, v.mode) for v in app.container.volumes] == [
        ("/etc/stuff", "/etc/stuff", "RO")
    ]
    assert app.networks == [{"mode": "container/bridge"}]
    hc = app.health_checks[0]
    assert (hc.protocol, hc.path, hc.port_index, hc.timeout_seconds) == ("HTTP", "/health", 0, 5)

    listed = client.list_apps(embed_tasks=True, embed_counts=True, embed_last_task_failure=True)
    assert [a.id for a in listed] == ["/pytest-complex"]
    assert client.get_app("pytest-complex", embed_tasks=True, embed_failures=True).tasks == []
    versions = client.list_versions("pytest-complex")
    assert client.get_version("pytest-complex", versions[0]).container.type == "DOCKER"


def test_complex_docker_app_exactly_as_the_itest(client):
    # marathon-python's itest complex app uses timeoutSeconds == intervalSeconds == 10, which
    # Marathon accepts for health checks (the rule is only for readiness checks).
    created = client.create_app("pytest-complex-itest", complex_app(timeout_seconds=10))
    assert isinstance(created, MarathonApp)
    assert client.get_app("pytest-complex-itest").health_checks[0].timeout_seconds == 10


# ---------------------------------------------------------------------------------------------
# deployments and queue


def create_stuck_app(client, app_id):
    """marathon-python's itest trivial app: 5 × 1 cpu on a 4-cpu node, so its deployment stays."""
    client.create_app(app_id, MarathonApp(cmd="sleep 3600", mem=16, cpus=1, instances=5))


def test_list_deployments_right_after_create(client):
    create_stuck_app(client, "pytest-deploy")
    deployments = client.list_deployments()
    assert len(deployments) == 1  # marathon-python's itest
    d = deployments[0]
    assert isinstance(d, MarathonDeployment)
    assert d.id and d.version and d.affected_apps == ["/pytest-deploy"]
    assert d.total_steps == len(d.steps) >= 1 and 1 <= d.current_step <= d.total_steps
    assert all(isinstance(s, MarathonDeploymentStep) for s in d.steps)
    actions = [a for s in d.steps for a in s.actions]
    assert all(isinstance(a, MarathonDeploymentAction) and a.app == "/pytest-deploy" for a in actions)
    assert all(isinstance(a, MarathonDeploymentAction) for a in d.current_actions)

    # It stays: 4 of 5 run, and the app carries the deployment.
    wait_until("4 running tasks", lambda: client.get_app("pytest-deploy").tasks_running == 4)
    app = client.get_app("pytest-deploy", embed_deployments=True)
    assert [x.id for x in app.deployments] == [d.id]
    assert [x.id for x in client.list_deployments()] == [d.id]

    # Locked: a change without force is a 409; with force it wins and the deployment ends.
    with pytest.raises(ConflictError):
        client.scale_app("pytest-deploy", instances=4)
    assert_deployment_result(client.scale_app("pytest-deploy", instances=4, force=True))
    settled(client, "/pytest-deploy", 4)
    wait_until("no deployment left", lambda: client.list_deployments() == [])


def test_list_queue_and_last_unused_offers(client):
    create_stuck_app(client, "pytest-queue")
    wait_until("4 running tasks", lambda: client.get_app("pytest-queue").tasks_running == 4)

    def queued():
        items = [i for i in client.list_queue() if i.app.id == "/pytest-queue"]
        if len(items) == 1 and items[0].processed_offers_summary:
            return items[0]
        return None

    item = wait_until("the queue entry", queued)
    assert isinstance(item, MarathonQueueItem) and isinstance(item.app, MarathonApp)
    assert item.count == 1
    assert item.delay.overdue in (True, False) and item.delay.time_left_seconds >= 0
    assert item.since

    def cpu_rejections():
        items = client.list_queue(embed_last_unused_offers=True)
        for i in items:
            if i.app.id == "/pytest-queue":
                summary = {r["reason"]: r["declined"] for r in i.processed_offers_summary["rejectSummaryLastOffers"]}
                return summary.get("InsufficientCpus", 0) > 0
        return False

    wait_until("an InsufficientCpus rejection in the queue", cpu_rejections)

    # The docker app cannot run on a process-only node: it queues too.
    client.create_app("pytest-queue-docker", complex_app(timeout_seconds=5))
    wait_until(
        "the docker app in the queue",
        lambda: any(i.app.id == "/pytest-queue-docker" for i in client.list_queue(embed_last_unused_offers=True)),
    )


def test_reset_delay_and_last_task_failure(client):
    client.create_app(
        "pytest-backoff",
        MarathonApp(cmd="exit 1", cpus=0.1, mem=16, instances=1, backoff_seconds=120, max_launch_delay_seconds=300),
    )

    def failure():
        f = client.get_app("pytest-backoff", embed_last_task_failure=True).last_task_failure
        return f

    first = wait_until("a task failure", failure)
    assert isinstance(first, MarathonTaskFailure)
    assert first.app_id == "/pytest-backoff" and first.state == "TASK_FAILED" and first.task_id

    def delayed():
        items = [i for i in client.list_queue() if i.app.id == "/pytest-backoff"]
        return items and items[0].delay.time_left_seconds > 0

    wait_until("a launch delay in the queue", delayed)

    client.reset_delay("pytest-backoff")
    # Without the reset the next launch would be ~2 minutes away; with it the task runs (and
    # fails) again at once.
    wait_until(
        "a new failure after the delay reset",
        lambda: (lambda f: f is not None and f.task_id != first.task_id)(failure()),
        timeout=30,
    )
    assert client.list_apps(embed_failures=True)[0].last_task_failure.app_id == "/pytest-backoff"

    with pytest.raises(NotFoundError):
        client.reset_delay("pytest-no-such-app")


def test_delete_deployment_with_and_without_force(client, mesh_url):
    if not has_delete_deployment(mesh_url):
        pytest.skip("server_has_delete_deployment: DELETE /v2/deployments/{id} is not routed yet")

    # Without force: Marathon answers with the deployment of the rollback.
    create_stuck_app(client, "pytest-cancel")
    [d] = client.list_deployments()
    r = client.delete_deployment(d.id)
    assert_deployment_result(r)
    assert r["deploymentId"] != d.id
    wait_until("the cancelled deployment to go", lambda: d.id not in {x.id for x in client.list_deployments()})

    # With force: 202, empty body, the client returns {}. Wait for the rollback (if any) to end.
    wait_until("no deployment left", lambda: client.list_deployments() == [])
    for a in client.list_apps():
        client.delete_app(a.id, force=True)
    wait_until("no app left", lambda: client.list_apps() == [] and client.list_deployments() == [])
    create_stuck_app(client, "pytest-cancel-forced")
    [d] = client.list_deployments()
    assert client.delete_deployment(d.id, force=True) == {}
    wait_until("the forced cancel", lambda: d.id not in {x.id for x in client.list_deployments()})

    with pytest.raises(NotFoundError):
        client.delete_deployment("00000000-0000-0000-0000-000000000000")


# ---------------------------------------------------------------------------------------------
# groups


def test_groups(client, mesh_url):
    if not has_groups(mesh_url):
        pytest.skip("server_has_groups: GET /v2/groups does not answer 200 yet")

    group = MarathonGroup(
        id="/pytest-group",
        apps=[MarathonApp(id="/pytest-group/web", cmd="sleep 3600", cpus=0.1, mem=16, instances=1)],
    )
    r = client.create_group(group)
    assert_deployment_result(r)
    settled(client, "/pytest-group/web", 1)
    with pytest.raises(ConflictError):
        client.create_group(MarathonGroup(id="/pytest-group"))

    groups = client.list_groups()
    assert all(isinstance(g, MarathonGroup) for g in groups)
    assert "/pytest-group" in {g.id for g in groups}
    assert [g.id for g in client.list_groups(id="/pytest-group")] == ["/pytest-group"]

    g = client.get_group("pytest-group")
    assert isinstance(g, MarathonGroup) and g.id == "/pytest-group"
    assert [a.id for a in g.apps] == ["/pytest-group/web"] and isinstance(g.apps[0], MarathonApp)
    first_version = g.version

    r = client.update_group(
        "pytest-group",
        MarathonGroup(
            id="/pytest-group",
            apps=[MarathonApp(id="/pytest-group/web", cmd="sleep 3600", cpus=0.1, mem=16, instances=2)],
        ),
    )
    assert_deployment_result(r)
    settled(client, "/pytest-group/web", 2)

    r = client.scale_group("pytest-group", 2)
    assert_deployment_result(r)
    settled(client, "/pytest-group/web", 4)

    # marathon-python's rollback_group uses PUT /v2/groups/{id}/versions/{v}, which is not a
    # Marathon route; whatever the answer, it must be one the client understands.
    try:
        r = client.rollback_group("pytest-group", first_version)
    except MarathonHttpError as e:
        print(f"rollback_group: HTTP {e.status_code} ({e.error_message})")
    else:
        assert_deployment_result(r)
        settled(client, "/pytest-group/web", 1)

    r = client.delete_group("pytest-group", force=True)
    assert_deployment_result(r)

    def gone():
        try:
            client.get_group("pytest-group")
        except NotFoundError:
            return True
        return False

    wait_until("the group to be gone", gone)
    wait_until("its app to be gone", lambda: client.list_apps() == [])
    with pytest.raises(NotFoundError):
        client.get_group("pytest-group")


# ---------------------------------------------------------------------------------------------
# the event stream


def test_event_stream_sees_a_task_launch(client, mesh_url):
    reader = EventReader(mesh_url)
    try:
        reader.wait_for("event_stream_attached", lambda e: isinstance(e, MarathonEventStreamAttached), timeout=10)
        client.create_app("pytest-events", trivial())
        e = reader.wait_for(
            "a TASK_RUNNING status_update_event",
            lambda e: isinstance(e, MarathonStatusUpdateEvent)
            and e.app_id == "/pytest-events"
            and e.task_status == "TASK_RUNNING",
        )
        assert e.task_id and e.host and e.slave_id and e.version and e.timestamp
        assert e.ports and 45000 <= e.ports[0] <= 45099
        running = settled(client, "/pytest-events", 1)
        assert e.task_id == running.tasks[0].id
        reader.wait_for(
            "deployment_success", lambda e: isinstance(e, MarathonDeploymentSuccess) and e.id, timeout=30
        )
        # Scale down and delete: kills, deployment and termination events must parse as well.
        client.scale_app("pytest-events", instances=0)
        reader.wait_for(
            "a TASK_KILLED status_update_event",
            lambda e: isinstance(e, MarathonStatusUpdateEvent)
            and e.app_id == "/pytest-events"
            and e.task_status == "TASK_KILLED",
        )
        client.delete_app("pytest-events")
        reader.wait_for("app_terminated_event", lambda e: e.event_type == "app_terminated_event")
    finally:
        reader.close()
    assert reader.error is None, reader.error


def test_event_stream_with_event_types_filter(client, mesh_url):
    reader = EventReader(mesh_url, event_types=["status_update_event", MarathonDeploymentSuccess])
    try:
        # event_stream_attached is filtered out, so wait for the response headers instead: the
        # server subscribes the client before it answers.
        wait_until("the stream to open", lambda: reader._responses, timeout=10)
        client.create_app("pytest-filtered", trivial())
        reader.wait_for(
            "a TASK_RUNNING status_update_event",
            lambda e: isinstance(e, MarathonStatusUpdateEvent) and e.app_id == "/pytest-filtered"
            and e.task_status == "TASK_RUNNING",
        )
        reader.wait_for("deployment_success", lambda e: isinstance(e, MarathonDeploymentSuccess))
    finally:
        reader.close()
    assert reader.error is None, reader.error
    assert reader.seen and all(isinstance(e, (MarathonStatusUpdateEvent, MarathonDeploymentSuccess)) for e in reader.seen)


def test_event_stream_parses_health_and_cancelled_deployment_events(client, mesh_url):
    def tcp_check(interval):
        return MarathonHealthCheck(
            protocol="TCP",
            port_index=0,
            grace_period_seconds=0,
            interval_seconds=interval,
            timeout_seconds=0.5,
            max_consecutive_failures=0,  # never kill
        )

    reader = EventReader(mesh_url)
    try:
        reader.wait_for("event_stream_attached", lambda e: isinstance(e, MarathonEventStreamAttached), timeout=10)
        # `sleep` never listens on $PORT0: the check fails, and the deployment waits for health.
        client.create_app("pytest-unhealthy", trivial(health_checks=[tcp_check(1)]))
        added = reader.wait_for("add_health_check_event", lambda e: e.event_type == "add_health_check_event")
        assert isinstance(added.health_check, MarathonHealthCheck) and added.health_check.protocol == "TCP"
        reader.wait_for("failed_health_check_event", lambda e: e.event_type == "failed_health_check_event")
        reader.wait_for("health_status_changed_event", lambda e: e.event_type == "health_status_changed_event")
        [stuck] = client.list_deployments()

        # A forced change replaces the check and cancels the stuck deployment.
        assert_deployment_result(
            client.update_app("pytest-unhealthy", MarathonApp(health_checks=[tcp_check(2)]), force=True)
        )
        reader.wait_for("remove_health_check_event", lambda e: e.event_type == "remove_health_check_event")
        reader.wait_for(
            "deployment_step_failure", lambda e: e.event_type == "deployment_step_failure" and e.plan.id == stuck.id
        )
        reader.wait_for("deployment_failed", lambda e: e.event_type == "deployment_failed" and e.id == stuck.id)

        if has_groups(mesh_url):
            client.create_group(MarathonGroup(id="/pytest-event-group"))
            reader.wait_for("group_change_success", lambda e: e.event_type == "group_change_success")
            client.delete_group("pytest-event-group", force=True)
    finally:
        reader.close()
    assert reader.error is None, reader.error
