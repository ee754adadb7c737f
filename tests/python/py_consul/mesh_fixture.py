# --- mesh: replaces py-consul's start_consul_container (tests/python/py_consul_suite.sh) ---------
# The rest of py-consul's conftest.py is kept as shipped: setup_and_teardown_consul() calls this
# function for every test (a fresh node per test, as upstream starts a fresh container), reads the
# version from /v1/agent/self, and at teardown calls container.logs(), .stop() and .remove().
# Instead of a `hashicorp/consul` container this starts `mesh dev` from $MESH_BIN with its own data
# directory and loopback ports, and waits until /v1/status/leader answers.
# ACL instances get a plain node: mesh has no ACL system (those tests are in the known list).


class MeshNode:
    """A running `mesh dev`, shaped like the docker container object the conftest expects."""

    def __init__(self, proc, tmp, log_path):
        self.proc = proc
        self.tmp = tmp
        self.log_path = log_path

    def logs(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def stop(self):
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def remove(self):
        import shutil

        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_consul_container(version: str, acl_master_token: str | None = None):  # noqa: ARG001
    import re
    import subprocess
    import tempfile
    import threading

    binary = os.environ.get("MESH_BIN")
    if not binary or not os.path.exists(binary):
        raise RuntimeError(f"MESH_BIN={binary!r}: set it to the built mesh binary (target/debug/mesh)")
    tmp = tempfile.mkdtemp(prefix="mesh-py-consul-")
    log_path = os.path.join(tmp, "mesh.log")
    cmd = [
        binary, "dev",
        # Port 0: the kernel picks a free port, which mesh reports on its first stdout line (no
        # window in which another process could take a port picked in advance).
        "--http", "127.0.0.1:0",
        "--dns", "127.0.0.1:0",
        "--data-dir", os.path.join(tmp, "data"),
        "--runtime", "process",
        "--no-registrator",
        "--ports", os.environ.get("MESH_PY_PORTS", "45150-45199"),
        # upstream runs Consul with enable_script_checks
        "--enable-script-checks",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    node = MeshNode(proc, tmp, log_path)
    first = {}
    reader = threading.Thread(target=lambda: first.setdefault("line", proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    m = re.match(r"^mesh dev ready: http=([^\s,]+)", first.get("line") or "")
    if not m:
        node.remove()
        raise RuntimeError(f"mesh dev did not report ready: {first.get('line')!r}")
    # Keep draining stdout so the node never blocks on a full pipe.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    port = int(m.group(1).rsplit(":", 1)[1])
    base_uri = f"http://127.0.0.1:{port}/v1/"
    deadline = time.time() + 30
    while True:
        try:
            response = requests.get(base_uri + "status/leader", timeout=2)
            if response.status_code == 200 and response.json():
                return node, port
        except (RequestException, ValueError):
            pass
        if time.time() > deadline or proc.poll() is not None:
            node.remove()
            raise TimeoutError(f"mesh dev on port {port}: /v1/status/leader never named a leader")
        time.sleep(0.05)


# --- end of the mesh replacement ------------------------------------------------------------------
