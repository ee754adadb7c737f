"""py-consul 1.8.0 against a real `mesh dev`: agent registration with HTTP and TTL checks, health
states, blocking queries, catalog and an unknown datacenter.

Uses the session's `mesh_url` fixture (conftest.py); every service registered here is removed
again by the test that made it.
"""

import http.server
import threading
import time
from urllib.parse import urlparse

import consul
import pytest

from polling import eventually

@pytest.fixture
def c(mesh_url):
    u = urlparse(mesh_url)
    return consul.Consul(host=u.hostname, port=u.port)


class Flippable(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the status the test sets in `Flippable.status`."""

    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = f"status {Flippable.status}".encode()
        self.send_response(Flippable.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_target():
    Flippable.status = 200
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flippable)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()


def statuses(c, service):
    _, checks = c.health.checks(service)
    return {ch["CheckID"]: ch["Status"] for ch in checks}


def test_http_and_ttl_checks_go_through_passing_warning_critical(c, http_target):
    http_check = consul.Check.http(f"http://127.0.0.1:{http_target}/health", interval="1s", timeout="1s")
    assert c.agent.service.register("web", service_id="web1", port=http_target, tags=["v1"], check=http_check)
    assert c.agent.check.register("web1-ttl", check=consul.Check.ttl("30s"), check_id="web1-ttl", service_id="web1")
    try:
        # Both start critical (Consul's default initial status).
        assert statuses(c, "web")["web1-ttl"] == "critical"
        eventually("HTTP check passing", lambda: statuses(c, "web").get("service:web1") == "passing")

        Flippable.status = 429
        eventually("HTTP check warning on 429", lambda: statuses(c, "web").get("service:web1") == "warning")
        Flippable.status = 503
        eventually("HTTP check critical on 503", lambda: statuses(c, "web").get("service:web1") == "critical")
        Flippable.status = 200
        eventually("HTTP check passing again", lambda: statuses(c, "web").get("service:web1") == "passing")

        assert c.agent.check.ttl_pass("web1-ttl", notes="all good")
        assert statuses(c, "web")["web1-ttl"] == "passing"
        # Healthy in every check: the instance is returned with ?passing.
        _, nodes = c.health.service("web", passing=True)
        assert [n["Service"]["ID"] for n in nodes] == ["web1"]

        assert c.agent.check.ttl_warn("web1-ttl", notes="slow")
        _, checks = c.health.checks("web")
        ttl = next(ch for ch in checks if ch["CheckID"] == "web1-ttl")
        assert (ttl["Status"], ttl["Output"]) == ("warning", "slow")
        _, nodes = c.health.service("web", passing=True)
        assert nodes == [], "a warning instance is not passing"
        _, nodes = c.health.service("web")
        assert len(nodes) == 1, "but it is still listed"

        assert c.agent.check.ttl_fail("web1-ttl", notes="down")
        assert statuses(c, "web")["web1-ttl"] == "critical"
        _, crit = c.health.state("critical")
        assert "web1-ttl" in [ch["CheckID"] for ch in crit]
    finally:
        c.agent.service.deregister("web1")
        c.agent.check.deregister("web1-ttl")
    _, nodes = c.health.service("web")
    assert nodes == []


def test_ttl_check_expires_to_critical_without_updates(c):
    assert c.agent.service.register("ttlsvc", service_id="ttl1", port=1, check=consul.Check.ttl("1s"))
    try:
        assert c.agent.check.ttl_pass("service:ttl1")
        assert statuses(c, "ttlsvc")["service:ttl1"] == "passing"
        eventually("TTL expiry", lambda: statuses(c, "ttlsvc")["service:ttl1"] == "critical", timeout=5)
        _, checks = c.health.checks("ttlsvc")
        assert checks[0]["Output"] == "TTL expired"
    finally:
        c.agent.service.deregister("ttl1")


def test_blocking_query_wakes_for_its_service_only(c):
    assert c.agent.service.register("watched", service_id="watched1", port=1000)
    assert c.agent.service.register("unrelated", service_id="unrelated1", port=1001)
    try:
        index, _ = c.health.service("watched")
        result = {}

        def watch():
            t0 = time.monotonic()
            idx, nodes = c.health.service("watched", index=index, wait="20s")
            result["elapsed"] = time.monotonic() - t0
            result["index"] = idx
            result["nodes"] = nodes

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        time.sleep(0.3)  # let the request reach the server and start waiting
        # A change to another service does not wake it.
        assert c.agent.service.register("unrelated", service_id="unrelated1", port=1002)
        t.join(1.0)
        assert t.is_alive(), f"woke for an unrelated change: {result}"
        # A change to its own service does, at once.
        changed_at = time.monotonic()
        assert c.agent.service.register("watched", service_id="watched2", port=1003)
        t.join(10)
        assert not t.is_alive(), "the blocking query did not return after its service changed"
        latency = time.monotonic() - changed_at
        print(f"blocking query returned {latency * 1000:.1f} ms after the change")
        assert latency < 2.0, f"returned {latency:.3f}s after the change: it waited for its timeout"
        assert int(result["index"]) > int(index)
        assert sorted(n["Service"]["ID"] for n in result["nodes"]) == ["watched1", "watched2"]
    finally:
        for sid in ("watched1", "watched2", "unrelated1"):
            c.agent.service.deregister(sid)


def test_catalog_register_and_node_views(c):
    assert c.catalog.register(
        "ext1", "10.1.2.3", service={"service": "db", "id": "db1", "port": 5432, "tags": ["primary"]},
        check={"name": "db alive", "CheckID": "db1-alive", "ServiceID": "db1", "Status": "passing"},
    )
    try:
        _, nodes = c.catalog.nodes()
        assert "ext1" in [n["Node"] for n in nodes]
        _, services = c.catalog.services()
        assert services["db"] == ["primary"]
        assert "consul" in services
        _, entries = c.catalog.service("db", tag="primary")
        assert [(e["Node"], e["ServiceID"], e["ServicePort"]) for e in entries] == [("ext1", "db1", 5432)]
        _, node = c.catalog.node("ext1")
        assert list(node["Services"]) == ["db1"]
        _, nochecks = c.health.node("ext1")
        assert [ch["CheckID"] for ch in nochecks] == ["db1-alive"]
        _, unknown = c.catalog.node("no-such-node")
        assert unknown is None
    finally:
        assert c.catalog.deregister("ext1")
    _, services = c.catalog.services()
    assert "db" not in services


def test_every_node_has_serf_health_and_the_agent_reports_itself(c):
    _, nodes = c.catalog.nodes()
    me = c.agent.self()
    name = me["Config"]["NodeName"]
    assert name in [n["Node"] for n in nodes]
    _, checks = c.health.node(name)
    assert ("serfHealth", "passing") in [(ch["CheckID"], ch["Status"]) for ch in checks]
    assert me["Stats"]["consul"]["leader_addr"] == c.status.leader()
    assert c.status.leader() in c.status.peers()


def test_unknown_datacenter_raises(c):
    with pytest.raises(consul.ConsulException):
        c.catalog.nodes(dc="dc2")
    with pytest.raises(consul.ConsulException):
        c.health.service("web", dc="dc2")
