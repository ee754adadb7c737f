"""Fixtures for the Python client suites: one `mesh dev` per session, started from $MESH_BIN,
with a marathon-python client (`client`) and a py-consul client (`consul`) on it.

Run standalone with `MESH_BIN=target/debug/mesh python3 -m pytest -q tests/python`; the Rust
test `tests/python_clients.rs` runs it the same way from `cargo test`.
"""

import collections
import collections.abc

# marathon-python 0.13.0 still uses the aliases Python 3.10 removed from `collections`
# (serialising any nested model crashes without them). Must run before `import marathon`.
for _name in ("Iterable", "Mapping", "MutableMapping", "Sequence", "MutableSequence", "Callable"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402

import marathon  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

READY = re.compile(r"^mesh dev ready: http=(\S+) dns=(\S+)")


def _read_ready_line(proc, timeout):
    """The first stdout line of `mesh dev`, read in a thread so a hung start fails by deadline."""
    line = {}

    def read():
        line["v"] = proc.stdout.readline()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    return line.get("v")


def _stop(proc, grace):
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="session")
def mesh_url():
    binary = os.environ.get("MESH_BIN")
    if not binary:
        pytest.fail("set MESH_BIN to the mesh binary (e.g. MESH_BIN=target/debug/mesh)")
    data_dir = tempfile.mkdtemp(prefix="mesh-pyclient-")
    stderr_path = os.path.join(data_dir, "mesh.stderr")
    ports = os.environ.get("MESH_PY_PORTS", "45000-45099")
    cmd = [
        binary, "dev",
        "--http", "127.0.0.1:0",
        "--dns", "127.0.0.1:0",
        "--data-dir", os.path.join(data_dir, "data"),
        "--node", "pyclient",
        "--runtime", "process",
        "--ports", ports,
        "--cpus", "4",
        "--mem", "4096",
        "--no-registrator",
        # complex_app() mounts this host path (the app never runs: process runtime)
        "--allowed-host-path", "/etc/stuff",
    ]
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = _read_ready_line(proc, 60)
        m = READY.match(line or "")
        if not m:
            _stop(proc, 10)
            with open(stderr_path, errors="replace") as f:
                log = f.read()[-4000:]
            pytest.fail(f"mesh dev did not report ready (first line {line!r}); stderr:\n{log}")
        http = m.group(1).split(",")[0]
        url = f"http://{http}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/ping", timeout=2).text == "pong":
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("GET /ping never answered pong")
            time.sleep(0.1)
        yield url
    finally:
        _stop(proc, 30)
        if proc.returncode not in (0, None):
            with open(stderr_path, errors="replace") as f:
                print(f"mesh dev exited with {proc.returncode}; stderr tail:\n{f.read()[-4000:]}")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def client(mesh_url):
    return marathon.MarathonClient(mesh_url)


@pytest.fixture(autouse=True)
def clean_slate(client):
    """After every test, like marathon-python's itests: delete every app (force) and wait until
    no deployment and no task is left, so each test starts from an empty node."""
    yield
    for app in client.list_apps():
        try:
            client.delete_app(app.id, force=True)
        except marathon.exceptions.NotFoundError:
            pass
    deadline = time.monotonic() + 60
    while True:
        left = (client.list_apps(), client.list_deployments(), client.list_tasks())
        if not any(left):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"cleanup: apps/deployments/tasks still present after 60 s: {left}")
        time.sleep(0.1)


@pytest.fixture
def consul(mesh_url):
    """A py-consul client on the session's node. Afterwards every KV key and session is removed,
    so each test starts from an empty store."""
    import consul as py_consul

    url = urllib.parse.urlparse(mesh_url)
    c = py_consul.Consul(host=url.hostname, port=url.port)
    yield c
    c.kv.delete("", recurse=True)
    for s in c.session.list()[1]:
        c.session.destroy(s["ID"])
    assert c.kv.get("", recurse=True)[1] is None
    assert c.session.list()[1] == []
