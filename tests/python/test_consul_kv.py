"""py-consul 1.8.0 against a real `mesh dev`: the KV store (reads, flags, CAS, recursion, key
listing) and sessions, with a lock contended by two sessions (acquire, release, destroy,
lock-delay) and Behavior=delete, and transactions (`txn.put`: all or nothing, a lock taken and
released), exactly through the client's own calls.

The node and the `consul` fixture (which empties the store after each test) live in
conftest.py. Every wait is a deadline-bounded poll.
"""

import base64
import struct
import threading

import pytest
from consul import ConsulException, NotFound
from consul.exceptions import ClientError
from polling import eventually


def test_kv_get_put_and_values(consul):
    index, data = consul.kv.get("app/config")
    assert data is None
    assert int(index) >= 1
    assert consul.kv.put("app/config", "v1") is True
    index, data = consul.kv.get("app/config")
    assert data["Value"] == b"v1"
    assert data["Key"] == "app/config"
    assert data["Flags"] == 0
    assert int(index) == data["ModifyIndex"]

    consul.kv.put("app/bin", struct.pack("<i", -7))
    assert struct.unpack("<i", consul.kv.get("app/bin")[1]["Value"]) == (-7,)
    for empty in ("", None):
        assert consul.kv.put("app/empty", empty) is True
        assert consul.kv.get("app/empty")[1]["Value"] is None

    assert consul.kv.put("app/flagged", "x", flags=42) is True
    assert consul.kv.get("app/flagged")[1]["Flags"] == 42

    # a blocking read whose wait runs out answers with the same index
    index, _ = consul.kv.get("app/config")
    again, data = consul.kv.get("app/config", index=index, wait="50ms")
    assert again == index
    assert data["Value"] == b"v1"


def test_kv_recurse_keys_and_delete(consul):
    assert consul.kv.get("tree/", recurse=True)[1] is None
    consul.kv.put("tree/", None)
    assert len(consul.kv.get("tree/", recurse=True)[1]) == 1
    for i in (3, 1, 2):
        consul.kv.put(f"tree/n{i}", str(i))
    consul.kv.put("tree/deeper/leaf", "x")
    consul.kv.put("treetop", "not under tree/")
    _, items = consul.kv.get("tree/", recurse=True)
    assert [x["Key"] for x in items] == ["tree/", "tree/deeper/leaf", "tree/n1", "tree/n2", "tree/n3"]
    assert [x["Value"] for x in items] == [None, b"x", b"1", b"2", b"3"]

    _, keys = consul.kv.get("tree/", keys=True, separator="/")
    assert keys == ["tree/", "tree/deeper/", "tree/n1", "tree/n2", "tree/n3"]
    _, keys = consul.kv.get("tree/d", keys=True)
    assert keys == ["tree/deeper/leaf"]

    assert consul.kv.delete("tree/n2") is True
    assert [x["Key"] for x in consul.kv.get("tree/n", recurse=True)[1]] == ["tree/n1", "tree/n3"]
    assert consul.kv.delete("tree/", recurse=True) is True
    assert consul.kv.get("tree/", recurse=True)[1] is None
    assert consul.kv.get("treetop")[1]["Value"] == b"not under tree/"


def test_kv_cas(consul):
    assert consul.kv.put("cas/key", "first", cas=12345) is False, "cas on a missing key"
    assert consul.kv.put("cas/key", "first", cas=0) is True, "cas=0 creates"
    assert consul.kv.put("cas/key", "second", cas=0) is False, "cas=0 creates only"
    index, data = consul.kv.get("cas/key")
    assert data["Value"] == b"first"
    modify = data["ModifyIndex"]
    assert consul.kv.put("cas/key", "stale", cas=modify - 1) is False
    assert consul.kv.get("cas/key") == (index, data), "a failed CAS changes nothing"
    assert consul.kv.put("cas/key", "second", cas=modify) is True
    assert consul.kv.put("cas/key", "third", cas=modify) is False, "the index moved on"
    index, data = consul.kv.get("cas/key")
    assert data["Value"] == b"second"

    assert consul.kv.delete("cas/key", cas=data["ModifyIndex"] - 1) is False
    assert consul.kv.get("cas/key") == (index, data)
    assert consul.kv.delete("cas/key", cas=data["ModifyIndex"]) is True
    assert consul.kv.get("cas/key")[1] is None


def test_lock_contended_by_two_sessions(consul):
    # lock_delay is whole seconds in py-consul (sent as "5s"); long enough that the first retry
    # after the destroy surely lands inside it
    s1 = consul.session.create(name="candidate-1", lock_delay=5)
    s2 = consul.session.create(name="candidate-2", lock_delay=5)
    assert consul.session.info(s1)[1]["LockDelay"] == 5_000_000_000

    pytest.raises(ConsulException, consul.kv.put, "service/leader", "x", acquire="not-a-session")
    assert consul.kv.get("service/leader")[1] is None, "a refused acquire writes nothing"

    assert consul.kv.put("service/leader", "candidate-1", acquire=s1) is True
    assert consul.kv.put("service/leader", "candidate-2", acquire=s2) is False
    _, data = consul.kv.get("service/leader")
    assert (data["Session"], data["LockIndex"], data["Value"]) == (s1, 1, b"candidate-1")
    assert consul.kv.put("service/leader", "candidate-1 still", acquire=s1) is True, "the holder re-acquires"
    assert consul.kv.get("service/leader")[1]["LockIndex"] == 1

    assert consul.kv.put("service/leader", "x", release=s2) is False, "only the holder releases"
    assert consul.kv.put("service/leader", "x", release="not-a-session") is False
    assert consul.kv.put("service/leader", "released", release=s1) is True
    _, data = consul.kv.get("service/leader")
    assert "Session" not in data or data["Session"] is None
    assert data["LockIndex"] == 1

    assert consul.kv.put("service/leader", "candidate-2", acquire=s2) is True
    assert consul.kv.get("service/leader")[1]["LockIndex"] == 2

    # the holder's session goes away: the lock is released and its lock-delay starts
    assert consul.session.destroy(s2) is True
    _, data = consul.kv.get("service/leader")
    assert data.get("Session") is None
    assert data["Value"] == b"candidate-2"
    assert consul.kv.put("service/leader", "candidate-1", acquire=s1) is False, "inside the lock-delay"
    eventually(
        "candidate-1 acquires once the lock-delay is over",
        lambda: consul.kv.put("service/leader", "candidate-1", acquire=s1),
    )
    assert consul.kv.get("service/leader")[1]["Session"] == s1
    assert [s["ID"] for s in consul.session.list()[1]] == [s1]
    assert consul.session.destroy(s1) is True
    assert consul.session.list()[1] == []


def test_sessions_behavior_delete_ttl_and_errors(consul):
    s = consul.session.create(behavior="delete", ttl=20)
    session = consul.session.renew(s)
    assert (session["Behavior"], session["TTL"]) == ("delete", "20s")
    pytest.raises(NotFound, consul.session.renew, "1" * 36)
    assert consul.session.info("1" * 36)[1] is None

    named = consul.session.create("named")
    _, info = consul.session.info(named)
    node = info["Node"]
    assert [x["Name"] for x in consul.session.node(node)[1] if x["ID"] == named] == ["named"]
    pytest.raises(ConsulException, consul.session.create, node="no-such-node")
    pytest.raises(ConsulException, consul.session.create, dc="dc2")
    pytest.raises(ConsulException, consul.session.list, dc="dc2")
    pytest.raises(ConsulException, consul.kv.get, "x", dc="dc2")

    assert consul.kv.put("ephemeral", "1", acquire=s) is True
    assert consul.kv.get("ephemeral")[1]["Value"] == b"1"
    consul.session.destroy(s)
    assert consul.kv.get("ephemeral")[1] is None, "Behavior=delete deletes held keys"


def test_blocking_get_wakes_for_its_key(consul):
    consul.kv.put("watch/me", "1")
    index, _ = consul.kv.get("watch/me")
    result = {}

    def watch():
        result["answer"] = consul.kv.get("watch/me", index=index, wait="60s")

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    consul.kv.put("watch/other", "1")
    consul.kv.put("watch/me-not", "1")
    t.join(1.0)
    assert t.is_alive(), f"the watch returned for other keys: {result}"
    consul.kv.put("watch/me", "2")
    t.join(20.0)
    assert not t.is_alive(), "the watch did not return after its key changed"
    new_index, data = result["answer"]
    assert int(new_index) > int(index)
    assert data["Value"] == b"2"


def test_txn_put_all_or_nothing_with_a_lock(consul):
    def b64(v):
        return base64.b64encode(v.encode()).decode()

    sid = consul.session.create(name="txn", lock_delay=0)
    r = consul.txn.put(
        [
            {"KV": {"Verb": "set", "Key": "txn/a", "Value": b64("1")}},
            {"KV": {"Verb": "lock", "Key": "txn/leader", "Value": b64("me"), "Session": sid}},
            {"KV": {"Verb": "get-tree", "Key": "txn/"}},
        ]
    )
    assert r["Errors"] is None
    a, lock, tree_a, tree_leader = r["Results"]
    assert a["KV"]["Key"] == "txn/a" and a["KV"]["Value"] is None, "a write's result has no value"
    assert (lock["KV"]["Session"], lock["KV"]["LockIndex"]) == (sid, 1)
    assert [tree_a["KV"]["Value"], tree_leader["KV"]["Value"]] == [b64("1"), b64("me")]
    index = a["KV"]["ModifyIndex"]

    # a failing check-index: 409 (py-consul raises), and the set before it is not applied
    with pytest.raises(ClientError, match="409"):
        consul.txn.put(
            [
                {"KV": {"Verb": "set", "Key": "txn/b", "Value": b64("2")}},
                {"KV": {"Verb": "check-index", "Key": "txn/a", "Index": index + 1000}},
            ]
        )
    assert consul.kv.get("txn/b")[1] is None
    _, data = consul.kv.get("txn/leader")
    assert (data["Session"], data["LockIndex"], data["Value"]) == (sid, 1, b"me")

    r = consul.txn.put(
        [
            {"KV": {"Verb": "check-session", "Key": "txn/leader", "Session": sid}},
            {"KV": {"Verb": "unlock", "Key": "txn/leader", "Value": b64("free"), "Session": sid}},
            {"KV": {"Verb": "delete", "Key": "txn/a"}},
        ]
    )
    assert len(r["Results"]) == 2, "no result for a delete"
    _, data = consul.kv.get("txn/leader")
    assert data.get("Session") is None and data["Value"] == b"free"
    assert consul.kv.get("txn/a")[1] is None
