"""Client load for tests/ha.rs: marathon-python creates apps and py-consul writes KV keys,
through every server in turn, while the test SIGKILLs the leader. Runs until the file named by
argv[2] exists, then prints a JSON summary: the apps and keys whose creation was acknowledged,
and how many calls failed (a failed call may or may not have taken effect).

    python3 ha_load.py http://ip1:port1,http://ip2:port2,... STOPFILE
"""
import collections
import collections.abc
import json
import os
import sys
import threading
import time

for n in ("Iterable", "Mapping", "MutableMapping", "Sequence", "MutableSequence", "Callable"):
    if not hasattr(collections, n):
        setattr(collections, n, getattr(collections.abc, n))

import consul  # noqa: E402
import marathon  # noqa: E402
from marathon.models import MarathonApp  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

servers = sys.argv[1].split(",")
stop = sys.argv[2]
lock = threading.Lock()
summary = {"apps": [], "keys": [], "app_errors": 0, "kv_errors": 0}


def stopping():
    return os.path.exists(stop)


def apps():
    n = 0
    while not stopping():
        n += 1
        app_id = "/load/app-%d" % n
        # marathon-python tries the servers in order when one does not answer.
        client = marathon.MarathonClient(servers[n % len(servers):] + servers[: n % len(servers)], timeout=15)
        try:
            client.create_app(app_id, MarathonApp(cmd="sleep 1000", instances=1, cpus=0.01, mem=8))
            with lock:
                summary["apps"].append(app_id)
        except Exception:  # noqa: BLE001 - any failure is counted; the app may still exist
            with lock:
                summary["app_errors"] += 1
            time.sleep(0.2)
        time.sleep(0.3)


def kv(worker):
    n = 0
    while not stopping():
        n += 1
        url = urlparse(servers[(n + worker) % len(servers)])
        key = "load/w%d/k%d" % (worker, n)
        try:
            c = consul.Consul(host=url.hostname, port=url.port)
            if c.kv.put(key, "v%d" % n):
                with lock:
                    summary["keys"].append(key)
            else:
                with lock:
                    summary["kv_errors"] += 1
        except Exception:  # noqa: BLE001
            with lock:
                summary["kv_errors"] += 1
            time.sleep(0.1)


threads = [threading.Thread(target=apps)] + [threading.Thread(target=kv, args=(w,)) for w in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(summary))
