"""What the bench scripts (benches/*/bench.py) share: percentiles, polling with a deadline, and
timing GET requests on one kept-alive connection."""

import http.client
import time


def pct(xs, p):
    """The `p` quantile (0..1) of the samples `xs`."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def until(what, f, secs=60, every=0.1, note=""):
    """Call `f` every `every` seconds until it is true (connection errors count as false); exit
    with `timed out waiting for <what><note>` after `secs`."""
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            if f():
                return
        except OSError:
            pass
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}{note}")


def http_latency(host, port, path, n, timeout=10):
    """Seconds each of `n` GETs of `path` took on one connection; every answer must be 200."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        out.append(time.perf_counter() - t)
        assert r.status == 200, (path, r.status)
    c.close()
    return out
