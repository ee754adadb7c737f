"""marathon-python deploys into another datacenter through this one's address (issue 14):
every request of the client carries `?dc=<dc>` (requests' session params), so the node at
URL sends it to a server of that datacenter.

    python3 tests/python/wan_deploy.py URL DC APP_ID INSTANCES

Creates APP_ID (`sleep`, INSTANCES instances), waits until they all run, and prints one JSON
line: {"running": n, "hosts": [...]} as the client read them, through URL.
"""

import collections
import collections.abc

# marathon-python 0.13.0 still uses the aliases Python 3.10 removed from `collections`.
for _name in ("Iterable", "Mapping", "MutableMapping", "Sequence", "MutableSequence", "Callable"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from marathon import MarathonClient  # noqa: E402
from marathon.models import MarathonApp  # noqa: E402


def main():
    url, dc, app_id, instances = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = MarathonClient([url], timeout=30)
    client.session.params = {"dc": dc}
    client.create_app(app_id, MarathonApp(cmd="sleep 600", cpus=0.1, mem=16, instances=instances))
    deadline = time.monotonic() + 120
    while True:
        app = client.get_app(app_id)
        if app.tasks_running == instances and not app.deployments:
            break
        if time.monotonic() > deadline:
            sys.exit(f"{app_id} in {dc}: {app.tasks_running}/{instances} running after 120 s")
        time.sleep(0.3)
    tasks = client.list_tasks(app_id)
    print(json.dumps({"running": app.tasks_running, "hosts": sorted(t.host for t in tasks)}))


if __name__ == "__main__":
    main()
