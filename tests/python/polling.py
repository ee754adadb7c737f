"""Polling with a deadline, shared by the suites (never sleep to synchronise)."""

import time

import pytest


def eventually(what, pred, timeout=30.0, interval=0.05):
    """Poll `pred` until it returns a truthy value (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last value {last!r}")
        time.sleep(interval)
