//! Consul KV and sessions against a real `mesh dev`, over HTTP with reqwest: reads and writes
//! with every flag, CAS, locks contended by two sessions with lock-delay and `Behavior=delete`,
//! TTL expiry with no request, blocking reads that wake for their key only, and bad requests
//! that change nothing.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use support::{MeshNode, eventually};

/// One HTTP answer: status, `X-Consul-Index` (if any), body text.
struct Answer {
    status: StatusCode,
    index: Option<u64>,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
    fn index(&self) -> u64 {
        let i = self.index.unwrap_or_else(|| panic!("no X-Consul-Index on {} {:?}", self.status, self.text));
        assert!(i >= 1, "X-Consul-Index must never be 0");
        i
    }
}

async fn call(node: &MeshNode, method: &str, path: &str, body: Option<Vec<u8>>) -> Answer {
    let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = node.client.request(m, node.url(path));
    if let Some(b) = body {
        req = req.body(b);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e:?}"));
    let status = r.status();
    let headers = r.headers().clone();
    let index = headers.get("X-Consul-Index").map(|v| v.to_str().unwrap().parse().expect("numeric index"));
    let text = r.text().await.unwrap_or_default();
    Answer { status, index, headers, text }
}

async fn get(node: &MeshNode, path: &str) -> Answer {
    call(node, "GET", path, None).await
}

async fn put(node: &MeshNode, path: &str, body: &str) -> Answer {
    call(node, "PUT", path, Some(body.as_bytes().to_vec())).await
}

/// PUT a KV write and return Consul's `true`/`false`.
async fn kv_put(node: &MeshNode, path: &str, body: &str) -> bool {
    let a = put(node, &format!("/v1/kv/{path}"), body).await;
    assert_eq!(a.status, 200, "PUT {path}: {}", a.text);
    a.json().as_bool().unwrap_or_else(|| panic!("PUT {path} answered {:?}", a.text))
}

/// The decoded value of a key, or None on 404.
async fn kv_value(node: &MeshNode, key: &str) -> Option<Vec<u8>> {
    let a = get(node, &format!("/v1/kv/{key}")).await;
    a.index();
    match a.status.as_u16() {
        404 => None,
        200 => Some(decode(&a.json()[0]["Value"])),
        s => panic!("GET {key}: {s} {}", a.text),
    }
}

fn decode(v: &Value) -> Vec<u8> {
    match v {
        Value::Null => Vec::new(),
        // mesh's own value type reads Consul's base64
        Value::String(_) => {
            serde_json::from_value::<mesh_core::kv::KvValue>(v.clone()).expect("base64").as_bytes().to_vec()
        }
        other => panic!("Value is {other}"),
    }
}

async fn session_create(node: &MeshNode, body: Value) -> String {
    let a = put(node, "/v1/session/create", &body.to_string()).await;
    assert_eq!(a.status, 200, "session/create {body}: {}", a.text);
    a.json()["ID"].as_str().expect("ID").to_owned()
}

async fn session_ids(node: &MeshNode) -> Vec<String> {
    let a = get(node, "/v1/session/list").await;
    assert_eq!(a.status, 200);
    a.index();
    a.json().as_array().unwrap().iter().map(|s| s["ID"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn kv_reads_and_writes_with_every_flag() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);

    // A missing key: 404 with an index (py-consul raises without one), never 0.
    let a = get(&node, "/v1/kv/foo").await;
    assert_eq!(a.status, 404);
    assert_eq!(a.index(), 1);
    assert_eq!(a.headers["X-Consul-KnownLeader"], "true");
    assert_eq!(a.headers["X-Consul-LastContact"], "0");

    assert!(kv_put(&node, "foo", "bar").await);
    let a = get(&node, "/v1/kv/foo").await;
    let e = &a.json()[0];
    assert_eq!((e["Key"].as_str(), e["Flags"].as_u64(), e["LockIndex"].as_u64()), (Some("foo"), Some(0), Some(0)));
    assert_eq!(decode(&e["Value"]), b"bar");
    assert_eq!(e["CreateIndex"], e["ModifyIndex"]);
    assert!(e.get("Session").is_none(), "no Session field when unlocked: {e}");
    assert_eq!(a.index(), e["ModifyIndex"].as_u64().unwrap());

    // binary values round-trip; an empty value reads back as null
    let bin = vec![0u8, 1, 2, 255, 254, b'\n'];
    let a = call(&node, "PUT", "/v1/kv/bin", Some(bin.clone())).await;
    assert_eq!(a.text, "true");
    assert_eq!(kv_value(&node, "bin").await, Some(bin.clone()));
    assert!(kv_put(&node, "empty", "").await);
    let a = get(&node, "/v1/kv/empty").await;
    assert_eq!(a.json()[0]["Value"], Value::Null);

    // raw: the bytes themselves
    let a = get(&node, "/v1/kv/bin?raw").await;
    assert_eq!(a.status, 200);
    a.index();
    let raw = node.client.get(node.url("/v1/kv/bin?raw")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(raw.to_vec(), bin);

    // flags
    assert!(kv_put(&node, "flagged?flags=50", "x").await);
    assert_eq!(get(&node, "/v1/kv/flagged").await.json()[0]["Flags"], 50);

    // recurse and keys, with and without a separator
    for (k, v) in [("base/foo", "1"), ("base/base/foo", "5"), ("base/base/zed", "6"), ("bar", "4")] {
        assert!(kv_put(&node, k, v).await);
    }
    let a = get(&node, "/v1/kv/base/?recurse").await;
    let list = a.json();
    let keys: Vec<&str> = list.as_array().unwrap().iter().map(|e| e["Key"].as_str().unwrap()).collect();
    assert_eq!(keys, vec!["base/base/foo", "base/base/zed", "base/foo"]);
    let max = a.json().as_array().unwrap().iter().map(|e| e["ModifyIndex"].as_u64().unwrap()).max().unwrap();
    assert_eq!(a.index(), max, "a recursive read's index is the prefix's latest change");
    let a = get(&node, "/v1/kv/base/?keys&separator=/").await;
    assert_eq!(a.json(), json!(["base/base/", "base/foo"]));
    a.index();
    let a = get(&node, "/v1/kv/base/?keys=True").await;
    assert_eq!(a.json(), json!(["base/base/foo", "base/base/zed", "base/foo"]));
    let a = get(&node, "/v1/kv/?keys&separator=/").await;
    assert_eq!(a.json(), json!(["bar", "base/", "bin", "empty", "flagged", "foo"]));
    let a = get(&node, "/v1/kv/nothing/?keys").await;
    assert_eq!(a.status, 404);
    a.index();
    let a = get(&node, "/v1/kv/nothing/?recurse=1").await;
    assert_eq!(a.status, 404);
    a.index();

    // delete one key, then a whole prefix; the prefix's index moves with the deletes
    let before = get(&node, "/v1/kv/base/?recurse").await.index();
    let a = call(&node, "DELETE", "/v1/kv/base/foo", None).await;
    assert_eq!(a.text, "true");
    let a = get(&node, "/v1/kv/base/?recurse").await;
    assert!(a.index() > before, "a delete moves the prefix's index");
    assert_eq!(a.json().as_array().unwrap().len(), 2);
    assert_eq!(call(&node, "DELETE", "/v1/kv/base?recurse", None).await.text, "true");
    assert_eq!(get(&node, "/v1/kv/base/?recurse").await.status, 404);
    assert_eq!(kv_value(&node, "bar").await, Some(b"4".to_vec()), "other keys stay");
    assert_eq!(call(&node, "DELETE", "/v1/kv/never-was", None).await.text, "true");

    // consistency modes and dc
    for q in ["stale", "stale=", "consistent", "consistent=1"] {
        let a = get(&node, &format!("/v1/kv/bar?{q}")).await;
        assert_eq!(a.status, 200, "?{q}");
    }
    assert_eq!(get(&node, "/v1/kv/bar?stale").await.headers["X-Consul-Effective-Consistency"], "stale");
    let a = get(&node, "/v1/kv/bar?dc=dc2").await;
    assert_eq!((a.status.as_u16(), a.text.as_str()), (500, "No path to datacenter"));
    assert_eq!(get(&node, "/v1/kv/bar?dc=dc1").await.status, 200);
}

#[tokio::test]
async fn cas_writes_and_deletes() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    assert!(!kv_put(&node, "foo?cas=50", "bar").await, "cas on a missing key");
    assert!(kv_put(&node, "foo?cas=0", "bar").await, "cas=0 creates");
    assert!(!kv_put(&node, "foo?cas=0", "again").await, "cas=0 only creates");
    let m = get(&node, "/v1/kv/foo").await.json()[0]["ModifyIndex"].as_u64().unwrap();
    assert!(!kv_put(&node, &format!("foo?cas={}", m - 1), "stale").await);
    assert_eq!(kv_value(&node, "foo").await, Some(b"bar".to_vec()), "a failed CAS changes nothing");
    assert!(kv_put(&node, &format!("foo?cas={m}"), "bar2").await);
    assert_eq!(kv_value(&node, "foo").await, Some(b"bar2".to_vec()));
    assert!(!kv_put(&node, &format!("foo?cas={m}"), "bar3").await, "the index moved on");

    let a = get(&node, "/v1/kv/foo").await;
    let m = a.json()[0]["ModifyIndex"].as_u64().unwrap();
    assert_eq!(call(&node, "DELETE", &format!("/v1/kv/foo?cas={}", m - 1), None).await.text, "false");
    assert_eq!(call(&node, "DELETE", "/v1/kv/foo?cas=0", None).await.text, "false", "cas=0 never deletes");
    let again = get(&node, "/v1/kv/foo").await;
    assert_eq!((again.index(), again.json()), (a.index(), a.json()), "failed deletes change nothing");
    assert_eq!(call(&node, "DELETE", &format!("/v1/kv/foo?cas={m}"), None).await.text, "true");
    assert_eq!(kv_value(&node, "foo").await, None);
}

#[tokio::test]
async fn sessions_create_info_list_node_renew_destroy() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    assert!(session_ids(&node).await.is_empty());
    // lowercase fields as py-consul sends them; lock-delay as a duration string
    let id = session_create(&node, json!({"name": "my-session", "lockdelay": "2s", "ttl": "20s"})).await;
    let a = get(&node, &format!("/v1/session/info/{id}")).await;
    assert_eq!(a.status, 200);
    let idx = a.index();
    let s = &a.json()[0];
    assert_eq!(s["Name"], "my-session");
    assert_eq!(s["Node"], node.name.as_str(), "defaults to the agent's node");
    assert_eq!(s["LockDelay"], 2_000_000_000u64, "LockDelay is shown in nanoseconds");
    assert_eq!(s["TTL"], "20s");
    assert_eq!(s["Behavior"], "release");
    assert_eq!(s["NodeChecks"], json!(["serfHealth"]));
    assert_eq!(s["CreateIndex"].as_u64(), Some(idx));

    // PascalCase and nanoseconds work too
    let id2 = session_create(&node, json!({"Name": "two", "LockDelay": 3_000_000_000u64, "Behavior": "delete"})).await;
    let a = get(&node, &format!("/v1/session/info/{id2}")).await;
    assert_eq!(
        (a.json()[0]["LockDelay"].as_u64(), a.json()[0]["Behavior"].as_str()),
        (Some(3_000_000_000), Some("delete"))
    );

    let mut ids = session_ids(&node).await;
    ids.sort();
    let mut want = vec![id.clone(), id2.clone()];
    want.sort();
    assert_eq!(ids, want);
    let a = get(&node, &format!("/v1/session/node/{}", node.name)).await;
    assert_eq!(a.json().as_array().unwrap().len(), 2);
    a.index();
    let a = get(&node, "/v1/session/node/elsewhere").await;
    assert_eq!((a.status.as_u16(), a.json()), (200, json!([])));

    // renew returns the session; unknown ids: info [] with an index, renew 404
    let a = put(&node, &format!("/v1/session/renew/{id}"), "").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!((a.json()[0]["ID"].as_str(), a.json()[0]["TTL"].as_str()), (Some(id.as_str()), Some("20s")));
    let unknown = "1".repeat(36);
    let a = get(&node, &format!("/v1/session/info/{unknown}")).await;
    assert_eq!((a.status.as_u16(), a.json()), (200, json!([])));
    a.index();
    let a = put(&node, &format!("/v1/session/renew/{unknown}"), "").await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert!(a.text.contains("not found"), "{}", a.text);

    // unknown node and unknown dc are Consul's 500s, and create nothing
    let a = put(&node, "/v1/session/create", r#"{"node": "n2"}"#).await;
    assert_eq!((a.status.as_u16(), a.text.as_str()), (500, "Missing node registration"));
    let a = put(&node, "/v1/session/create?dc=dc2", "").await;
    assert_eq!((a.status.as_u16(), a.text.as_str()), (500, "No path to datacenter"));
    assert_eq!(get(&node, "/v1/session/list?dc=dc2").await.status, 500);
    assert_eq!(session_ids(&node).await.len(), 2);

    // destroy is idempotent
    for _ in 0..2 {
        let a = put(&node, &format!("/v1/session/destroy/{id}"), "").await;
        assert_eq!((a.status.as_u16(), a.text.as_str()), (200, "true"));
    }
    assert_eq!(session_ids(&node).await, vec![id2.clone()]);
    let a = get(&node, "/v1/session/list").await;
    assert!(a.index() > idx, "destroying moves the sessions' index");
}

#[tokio::test]
async fn a_lock_contended_by_two_sessions_with_lock_delay_and_delete_behavior() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    // A lock-delay long enough that the first retry surely falls inside it.
    let s1 = session_create(&node, json!({"name": "s1", "lockdelay": "8s"})).await;
    let s2 = session_create(&node, json!({"name": "s2", "lockdelay": "8s"})).await;

    assert!(kv_put(&node, &format!("lock?acquire={s1}"), "s1").await);
    let e = get(&node, "/v1/kv/lock").await.json()[0].clone();
    assert_eq!((e["Session"].as_str(), e["LockIndex"].as_u64()), (Some(s1.as_str()), Some(1)));
    assert!(!kv_put(&node, &format!("lock?acquire={s2}"), "s2").await, "s1 holds it");
    assert_eq!(kv_value(&node, "lock").await, Some(b"s1".to_vec()));
    assert!(kv_put(&node, &format!("lock?acquire={s1}"), "s1 again").await, "the holder re-acquires");
    assert_eq!(get(&node, "/v1/kv/lock").await.json()[0]["LockIndex"], 1);
    assert!(!kv_put(&node, &format!("lock?release={s2}"), "").await, "only the holder releases");
    assert!(!kv_put(&node, "lock?release=not-a-session", "").await);

    // release, then s2 takes it (no lock-delay after a release)
    assert!(kv_put(&node, &format!("lock?release={s1}"), "free").await);
    let e = get(&node, "/v1/kv/lock").await.json()[0].clone();
    assert!(e.get("Session").is_none());
    assert_eq!(e["LockIndex"], 1, "release keeps LockIndex");
    assert!(kv_put(&node, &format!("lock?acquire={s2}"), "s2").await);
    assert_eq!(get(&node, "/v1/kv/lock").await.json()[0]["LockIndex"], 2);

    // destroying the holder releases the key and starts its lock-delay
    assert_eq!(put(&node, &format!("/v1/session/destroy/{s2}"), "").await.text, "true");
    let e = get(&node, "/v1/kv/lock").await.json()[0].clone();
    assert!(e.get("Session").is_none(), "released on destroy: {e}");
    assert_eq!(decode(&e["Value"]), b"s2", "release keeps the value");
    assert!(!kv_put(&node, &format!("lock?acquire={s1}"), "s1").await, "inside the lock-delay");
    assert_eq!(kv_value(&node, "lock").await, Some(b"s2".to_vec()));
    // ... and once the delay is over, s1 gets it
    eventually(40, "s1 acquires once the lock-delay is over", || async {
        kv_put(&node, &format!("lock?acquire={s1}"), "s1 after delay").await.then_some(())
    })
    .await;
    assert_eq!(get(&node, "/v1/kv/lock").await.json()[0]["Session"], s1.as_str());

    // Behavior=delete: the held key goes with the session
    let eph = session_create(&node, json!({"behavior": "delete", "lockdelay": "0s"})).await;
    assert!(kv_put(&node, &format!("ephemeral?acquire={eph}"), "here").await);
    assert!(kv_put(&node, "unrelated", "stays").await);
    assert_eq!(put(&node, &format!("/v1/session/destroy/{eph}"), "").await.text, "true");
    assert_eq!(kv_value(&node, "ephemeral").await, None);
    assert_eq!(kv_value(&node, "unrelated").await, Some(b"stays".to_vec()));
    assert!(kv_put(&node, &format!("ephemeral?acquire={s1}"), "x").await, "lock-delay 0: free at once");
}

#[tokio::test]
async fn a_ttl_session_expires_without_any_request() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let s = session_create(&node, json!({"ttl": "10s", "lockdelay": "0s"})).await;
    let keep = session_create(&node, json!({"name": "no ttl"})).await;
    assert!(kv_put(&node, &format!("leader?acquire={s}"), "me").await);
    let idx = get(&node, "/v1/session/list").await.index();
    // Consul invalidates after up to 2 x TTL; a blocking list wakes when it happens.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let r = client.get(node.url(&format!("/v1/session/list?index={idx}&wait=90s"))).send().await.unwrap();
    let woke: u64 = r.headers()["X-Consul-Index"].to_str().unwrap().parse().unwrap();
    assert!(woke > idx, "the blocking list ran out its wait instead of waking on the expiry");
    let ids = eventually(60, "the TTL session is gone", || async {
        let ids = session_ids(&node).await;
        (!ids.contains(&s)).then_some(ids)
    })
    .await;
    assert_eq!(ids, vec![keep]);
    let e = get(&node, "/v1/kv/leader").await.json()[0].clone();
    assert!(e.get("Session").is_none(), "released on expiry: {e}");
    assert_eq!(put(&node, &format!("/v1/session/renew/{s}"), "").await.status, 404);
}

#[tokio::test]
async fn blocking_reads_wake_for_their_key_only() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    assert!(kv_put(&node, "watched", "1").await);
    assert!(kv_put(&node, "elsewhere", "1").await);
    assert!(kv_put(&node, "dir/a", "1").await);
    let idx = get(&node, "/v1/kv/watched").await.index();
    let dir_idx = get(&node, "/v1/kv/dir/?recurse").await.index();

    // a blocking read with a spent wait returns the same index
    let a = get(&node, &format!("/v1/kv/watched?index={idx}&wait=100ms")).await;
    assert_eq!((a.status.as_u16(), a.index()), (200, idx));

    let url = node.url(&format!("/v1/kv/watched?index={idx}&wait=2m"));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(180)).build().unwrap();
    let mut key_watch = tokio::spawn({
        let c = client.clone();
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    });
    let url = node.url(&format!("/v1/kv/dir/?recurse&index={dir_idx}&wait=2m"));
    let mut dir_watch = tokio::spawn({
        let c = client.clone();
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    });

    // unrelated changes: other keys, a prefix sibling, sessions
    assert!(kv_put(&node, "elsewhere", "2").await);
    assert!(kv_put(&node, "watched-not", "2").await);
    assert!(kv_put(&node, "dirx", "2").await);
    session_create(&node, json!({})).await;
    let pending = tokio::time::timeout(Duration::from_secs(2), &mut key_watch).await;
    assert!(pending.is_err(), "the key watch returned for another key's change: {pending:?}");
    assert!(tokio::time::timeout(Duration::from_millis(100), &mut dir_watch).await.is_err());

    // the watched key changes: it returns, with the new value
    assert!(kv_put(&node, "watched", "2").await);
    let body = tokio::time::timeout(Duration::from_secs(20), &mut key_watch)
        .await
        .expect("the key watch did not return after its key changed")
        .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(decode(&v[0]["Value"]), b"2");
    assert!(!dir_watch.is_finished(), "the prefix watch ignores the key");

    // a delete under the prefix wakes the prefix watch
    assert_eq!(call(&node, "DELETE", "/v1/kv/dir/a", None).await.text, "true");
    let body = tokio::time::timeout(Duration::from_secs(20), &mut dir_watch)
        .await
        .expect("the prefix watch did not return after a delete under it")
        .unwrap();
    assert_eq!(body, "", "nothing is left under dir/ (404)");
    let a = get(&node, &format!("/v1/kv/dir/?recurse&index={dir_idx}")).await;
    assert_eq!(a.status, 404);
    assert!(a.index() > dir_idx);
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    assert!(kv_put(&node, "existing", "v").await);
    let kv_before = get(&node, "/v1/kv/?recurse").await;
    let s = session_create(&node, json!({"name": "ok"})).await;

    // malformed JSON, wrong types, a bad TTL, a bad behavior or lock-delay: 400, nothing created
    for body in [
        "{not json",
        "[1, 2]",
        r#"{"name": 42}"#,
        r#"{"ttl": "5s"}"#,
        r#"{"ttl": "86401s"}"#,
        r#"{"TTL": "soon"}"#,
        r#"{"behavior": "keep"}"#,
        r#"{"lockdelay": "2m"}"#,
        r#"{"checks": "serfHealth"}"#,
    ] {
        let a = put(&node, "/v1/session/create", body).await;
        assert_eq!(a.status, 400, "{body}: {}", a.text);
        assert!(!a.text.trim().is_empty(), "{body}: empty error body");
        assert!(a.headers["content-type"].to_str().unwrap().starts_with("text/plain"), "{body}");
    }
    let a = put(&node, "/v1/session/create", r#"{"ttl": "5s"}"#).await;
    assert!(a.text.contains("Invalid Session TTL"), "{}", a.text);
    assert_eq!(session_ids(&node).await, vec![s.clone()]);

    // a value over 512 KiB: 413 with a message, nothing written
    let big = vec![b'x'; 512 * 1024 + 1];
    let a = call(&node, "PUT", "/v1/kv/big", Some(big)).await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert!(a.text.contains("too large"), "{}", a.text);
    let a = call(&node, "PUT", "/v1/kv/existing", Some(vec![b'y'; 600 * 1024])).await;
    assert_eq!(a.status, 413);
    // exactly 512 KiB is fine
    let a = call(&node, "PUT", "/v1/kv/max", Some(vec![b'z'; 512 * 1024])).await;
    assert_eq!(a.text, "true");
    assert_eq!(kv_value(&node, "max").await.map(|v| v.len()), Some(512 * 1024));
    assert_eq!(call(&node, "DELETE", "/v1/kv/max", None).await.text, "true");

    // acquire with an invalid session: Consul's 500 and message
    let a = put(&node, "/v1/kv/locked?acquire=foo", "x").await;
    assert_eq!((a.status.as_u16(), a.text.as_str()), (500, r#"invalid session "foo""#));
    let a = put(&node, "/v1/kv/existing?acquire=00000000-0000-0000-0000-000000000000", "x").await;
    assert_eq!(a.status, 500);

    // bad query parameters
    for (path, want) in [
        ("/v1/kv/existing?cas=abc", 400),
        ("/v1/kv/existing?flags=-1", 400),
        ("/v1/kv/existing?cas=1&release=x", 400),
        ("/v1/kv/?cas=0", 400),
    ] {
        let a = put(&node, path, "x").await;
        assert_eq!(a.status, want, "{path}: {}", a.text);
    }
    let a = call(&node, "DELETE", "/v1/kv/existing?recurse&cas=1", None).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.text.starts_with("Conflicting flags"), "{}", a.text);
    let a = call(&node, "DELETE", "/v1/kv/", None).await;
    assert_eq!(a.status, 400, "deleting without a key or recurse: {}", a.text);
    let a = get(&node, "/v1/kv/existing?index=abc").await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a = get(&node, "/v1/kv/existing?index=1&wait=forever").await;
    assert_eq!(a.status, 400, "{}", a.text);

    // the store is as it was
    let kv_after = get(&node, "/v1/kv/?recurse").await;
    assert_eq!(kv_after.json(), kv_before.json());
    assert_eq!(session_ids(&node).await, vec![s]);
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// `PUT /v1/txn` with a JSON body.
async fn txn(node: &MeshNode, path: &str, ops: &Value) -> Answer {
    call(node, "PUT", path, Some(ops.to_string().into_bytes())).await
}

/// `PUT /v1/txn`: KV writes, checks and reads all or nothing, in order; results as Consul's
/// (no `Value` but for reads, nothing for deletes), a failed operation a 409 naming every failed
/// one with nothing applied, reads answered without a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_apply_all_or_nothing() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let ops = json!([
        {"KV": {"Verb": "set", "Key": "t/a", "Value": b64("1")}},
        {"KV": {"Verb": "set", "Key": "t/b", "Value": b64("2"), "Flags": 5}},
        {"KV": {"Verb": "get", "Key": "t/b"}},
    ]);
    let a = txn(&node, "/v1/txn", &ops).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["Errors"], Value::Null);
    let index = v["Results"][0]["KV"]["ModifyIndex"].as_u64().unwrap();
    assert_eq!(
        v["Results"][1],
        json!({"KV": {"LockIndex": 0, "Key": "t/b", "Flags": 5, "Value": null, "CreateIndex": index, "ModifyIndex": index}}),
        "a write's result has no value, and the transaction one index"
    );
    assert_eq!(v["Results"][2]["KV"]["Value"], b64("2"), "a get sees the set before it");
    assert_eq!(kv_value(&node, "t/a").await.as_deref(), Some(&b"1"[..]));

    // A failing check-index and a stale cas: 409 naming both, the set before them not applied.
    let ops = json!([
        {"KV": {"Verb": "set", "Key": "t/c", "Value": b64("3")}},
        {"KV": {"Verb": "check-index", "Key": "t/a", "Index": index + 100}},
        {"KV": {"Verb": "cas", "Key": "t/b", "Value": b64("x"), "Index": index + 100}},
        {"KV": {"Verb": "delete", "Key": "t/a"}},
    ]);
    let a = txn(&node, "/v1/txn", &ops).await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(
        a.json(),
        json!({"Results": null, "Errors": [
            {"OpIndex": 1, "What": format!("failed index check for key \"t/a\", current modify index {index} != {}", index + 100)},
            {"OpIndex": 2, "What": "failed to set key \"t/b\", index is stale"},
        ]})
    );
    assert_eq!(kv_value(&node, "t/c").await, None, "nothing of a failed transaction is applied");
    assert_eq!(kv_value(&node, "t/a").await.as_deref(), Some(&b"1"[..]), "nor its delete");
    let kv_before = get(&node, "/v1/kv/?recurse").await;

    // A cas on the right index, a get-tree that sees it, a delete without a result.
    let ops = json!([
        {"KV": {"Verb": "cas", "Key": "t/a", "Value": b64("10"), "Index": index}},
        {"KV": {"Verb": "delete-cas", "Key": "t/b", "Index": index}},
        {"KV": {"Verb": "check-not-exists", "Key": "t/b"}},
        {"KV": {"Verb": "get-tree", "Key": "t/"}},
    ]);
    let a = txn(&node, "/v1/txn", &ops).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let results = a.json()["Results"].as_array().unwrap().clone();
    let keys: Vec<(&str, &Value)> =
        results.iter().map(|r| (r["KV"]["Key"].as_str().unwrap(), &r["KV"]["Value"])).collect();
    assert_eq!(keys, vec![("t/a", &Value::Null), ("t/a", &json!(b64("10")))], "cas, then the tree: {results:?}");
    assert_ne!(get(&node, "/v1/kv/?recurse").await.json(), kv_before.json());
    assert_eq!(kv_value(&node, "t/b").await, None);

    // Reads only: answered without a write (the store's index stays), a missing key a 409.
    let before = get(&node, "/v1/kv/t/a").await.index();
    let read_only = json!([
        {"KV": {"Verb": "get", "Key": "t/a"}},
        {"KV": {"Verb": "check-index", "Key": "t/a", "Index": results[0]["KV"]["ModifyIndex"]}},
    ]);
    let a = txn(&node, "/v1/txn", &read_only).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["Results"][0]["KV"]["Value"], b64("10"));
    assert_eq!(a.headers["X-Consul-KnownLeader"], "true");
    let a = txn(&node, "/v1/txn", &json!([{"KV": {"Verb": "get", "Key": "t/missing"}}])).await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(a.json()["Errors"], json!([{"OpIndex": 0, "What": "key \"t/missing\" doesn't exist"}]));
    let a = txn(&node, "/v1/txn", &json!([])).await;
    assert_eq!((a.status.as_u16(), a.json()), (200, json!({"Results": [], "Errors": null})));
    assert_eq!(get(&node, "/v1/kv/t/a").await.index(), before, "reads write nothing");

    // ?dc= as every endpoint.
    let ops = json!([{"KV": {"Verb": "get", "Key": "t/a"}}]);
    let a = txn(&node, "/v1/txn?dc=dc2", &ops).await;
    assert_eq!((a.status.as_u16(), a.text.as_str()), (500, "No path to datacenter"));
    assert_eq!(txn(&node, "/v1/txn?dc=dc1", &ops).await.status, 200);
}

/// `lock` and `unlock` in a transaction follow `PUT /v1/kv?acquire=`/`release=`: `LockIndex`
/// counts acquisitions, `Session` names the holder, another session is refused, and
/// `check-session` checks the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_lock_and_unlock_with_a_session() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let s1 = session_create(&node, json!({"name": "s1", "lockdelay": "0s"})).await;
    let s2 = session_create(&node, json!({"name": "s2", "lockdelay": "0s"})).await;
    let lock = |verb: &str, s: &str| json!({"KV": {"Verb": verb, "Key": "l/leader", "Value": b64(s), "Session": s}});
    let a = txn(&node, "/v1/txn", &json!([lock("lock", &s1)])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let e = &a.json()["Results"][0]["KV"];
    assert_eq!((e["LockIndex"].as_u64(), e["Session"].as_str()), (Some(1), Some(s1.as_str())));
    let held = get(&node, "/v1/kv/l/leader").await.json();
    assert_eq!((held[0]["LockIndex"].as_u64(), held[0]["Session"].as_str()), (Some(1), Some(s1.as_str())));

    // s2 can neither take it nor release it; the check names the holder.
    let ops = json!([
        lock("lock", &s2),
        lock("unlock", &s2),
        {"KV": {"Verb": "check-session", "Key": "l/leader", "Session": s2}},
        {"KV": {"Verb": "lock", "Key": "l/other", "Value": b64("x")}},
    ]);
    let a = txn(&node, "/v1/txn", &ops).await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(
        a.json()["Errors"],
        json!([
            {"OpIndex": 0, "What": "failed to lock key \"l/leader\", lock is already held"},
            {"OpIndex": 1, "What": "failed to unlock key \"l/leader\", lock isn't held, or is held by another session"},
            {"OpIndex": 2, "What": format!("failed session check for key \"l/leader\", current session \"{s1}\" != \"{s2}\"")},
            {"OpIndex": 3, "What": "missing session"},
        ])
    );

    // s1 hands it to s2 in one transaction: LockIndex 2, as `?release=` then `?acquire=`.
    let ops = json!([
        {"KV": {"Verb": "check-session", "Key": "l/leader", "Session": s1}},
        lock("unlock", &s1),
        lock("lock", &s2),
    ]);
    let a = txn(&node, "/v1/txn", &ops).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let r = a.json()["Results"].clone();
    assert_eq!(r[1]["KV"].get("Session"), None, "unlocked: no Session: {r}");
    assert_eq!((r[2]["KV"]["LockIndex"].as_u64(), r[2]["KV"]["Session"].as_str()), (Some(2), Some(s2.as_str())));
    let held = get(&node, "/v1/kv/l/leader").await.json();
    assert_eq!((held[0]["LockIndex"].as_u64(), held[0]["Session"].as_str()), (Some(2), Some(s2.as_str())));
    assert_eq!(decode(&held[0]["Value"]), s2.as_bytes());
    assert!(!kv_put(&node, &format!("l/leader?acquire={s1}"), "x").await, "the KV API sees s2's lock");
}

/// Malformed transactions: Consul's plain-text 400 (`Failed to parse body: ...`), 413 for too
/// many operations or too large a value, its 409 for a missing key or an unknown verb; none
/// changes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_transactions_are_refused() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    assert!(kv_put(&node, "m/k", "v").await);
    let kv_before = get(&node, "/v1/kv/?recurse").await;
    let set_first = |op: Value| json!([{"KV": {"Verb": "set", "Key": "m/new", "Value": b64("n")}}, op]);
    for (body, code, want) in [
        ("{}".to_string(), 400, "Failed to parse body: "),
        ("[".to_string(), 400, "Failed to parse body: "),
        (String::new(), 400, "Failed to parse body: "),
        (
            set_first(json!({"KV": {"Verb": "set", "Key": "k", "Value": "%%%"}})).to_string(),
            400,
            "Failed to parse body: failed to decode value: ",
        ),
        (
            set_first(json!({"KV": {"Verb": "set", "Key": "k", "Flags": "x"}})).to_string(),
            400,
            "Failed to parse body: json: cannot unmarshal string",
        ),
        (set_first(json!({"Node": {"Verb": "get", "Node": {"Node": "x"}}})).to_string(), 400, "not supported"),
        (
            json!(vec![json!({"KV": {"Verb": "get", "Key": "m/k"}}); 129]).to_string(),
            413,
            "Transaction contains too many operations (129 > 128)",
        ),
        (
            set_first(json!({"KV": {"Verb": "set", "Key": "m/big", "Value": b64(&"x".repeat(512 * 1024 + 1))}}))
                .to_string(),
            413,
            "Value for key \"m/big\" is too large (524289 > 524288 bytes)",
        ),
    ] {
        let a = call(&node, "PUT", "/v1/txn", Some(body.clone().into_bytes())).await;
        let short = &body[..body.len().min(120)];
        assert_eq!(a.status.as_u16(), code, "{short}: {}", a.text);
        assert!(a.text.starts_with(want) || (want == "not supported" && a.text.contains(want)), "{short}: {}", a.text);
    }
    let a = txn(&node, "/v1/txn", &set_first(json!({"KV": {"Verb": "explode", "Key": "m/k"}}))).await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(a.json(), json!({"Results": null, "Errors": [{"OpIndex": 1, "What": "unknown KV verb \"explode\""}]}));
    let a = txn(&node, "/v1/txn", &set_first(json!({"KV": {"Verb": "get"}}))).await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(a.json()["Errors"], json!([{"OpIndex": 1, "What": "Must provide key"}]));
    assert_eq!(get(&node, "/v1/kv/?recurse").await.json(), kv_before.json(), "nothing was applied");
}
