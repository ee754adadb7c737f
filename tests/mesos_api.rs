//! The Mesos v1 scheduler API of a real `mesh dev`, spoken over HTTP (the mesh-sdk transport for
//! streams, raw reqwest for malformed requests): master endpoints, Mesos' answers to bad calls
//! with allocations left consistent, failover within and past `failover_timeout` (with the
//! task processes checked), and frameworks, their tasks and weights surviving a restart.

mod support;

use futures_util::StreamExt;
use mesh_core::mesos::{
    self, Acknowledge, Call, CallType, Event, FrameworkInfo, Id, Kill, Offer, Operation, Reconcile, ReconcileTask,
    TaskInfo, TaskState, TaskStatus,
};
use mesh_sdk::framework::{FrameworkError, HttpTransport, Subscription, Transport};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::*;

/// A subscription as a test sees it.
struct Sub {
    fid: Id,
    stream: String,
    sub: Subscription,
    /// Every event received, in order.
    seen: Vec<Event>,
    /// Received events no `next` has taken yet.
    backlog: std::collections::VecDeque<Event>,
}

impl Sub {
    async fn open(t: &HttpTransport, info: FrameworkInfo) -> Sub {
        let sub = t.subscribe(Call::subscribe(info)).await.expect("subscribe");
        let mut s = Sub {
            fid: Id::default(),
            stream: sub.stream_id.clone(),
            sub,
            seen: Vec::new(),
            backlog: Default::default(),
        };
        let ev = s.next(10, "SUBSCRIBED", |e| matches!(e, Event::Subscribed(_) | Event::Error(_))).await;
        match ev {
            Event::Subscribed(x) => s.fid = x.framework_id,
            other => panic!("expected SUBSCRIBED, got {other:?}"),
        }
        s
    }

    /// The first not yet taken event matching `pred` (others stay for later calls), or panic
    /// after `secs`.
    async fn next(&mut self, secs: u64, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i).expect("index");
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.sub.events.next()).await {
                Ok(Some(Ok(ev))) => {
                    self.seen.push(ev.clone());
                    if pred(&ev) {
                        return ev;
                    }
                    self.backlog.push_back(ev);
                }
                Ok(Some(Err(e))) => panic!("stream error while waiting for {what}: {e}"),
                Ok(None) => panic!("stream ended while waiting for {what}; saw {:?}", types(&self.seen)),
                Err(_) => panic!("no {what} within {secs}s; saw {:?}", types(&self.seen)),
            }
        }
    }

    async fn offer(&mut self) -> Offer {
        match self.next(20, "OFFERS", |e| matches!(e, Event::Offers(o) if !o.offers.is_empty())).await {
            Event::Offers(mut o) => o.offers.remove(0),
            _ => unreachable!(),
        }
    }

    async fn update(&mut self, task: &str, pred: impl Fn(&TaskStatus) -> bool) -> TaskStatus {
        let t = task.to_owned();
        let ev = self
            .next(
                30,
                &format!("UPDATE of {task}"),
                |e| matches!(e, Event::Update(u) if u.status.task_id.value == t && pred(&u.status)),
            )
            .await;
        match ev {
            Event::Update(u) => u.status,
            _ => unreachable!(),
        }
    }

    fn call(&self, kind: CallType) -> Call {
        Call::new(kind, Some(self.fid.clone()))
    }
}

fn types(evs: &[Event]) -> Vec<&'static str> {
    evs.iter().map(Event::type_name).collect()
}

fn info(name: &str, failover: f64) -> FrameworkInfo {
    FrameworkInfo { name: name.into(), failover_timeout: Some(failover), ..Default::default() }
}

fn task(id: &str, offer: &Offer, cmd: &str, cpus: f64, tag: &str) -> TaskInfo {
    let mut t: TaskInfo = serde_json::from_value(json!({
        "name": id, "task_id": {"value": id}, "agent_id": offer.agent_id,
        "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
                      {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}}],
        "command": {"value": cmd, "environment": {"variables": [{"name": "MESH_TEST_TAG", "value": tag}]}}
    }))
    .unwrap();
    t.name = format!("{id} name");
    t
}

fn accept(s: &Sub, offers: &[&str], tasks: Vec<TaskInfo>, refuse: f64) -> Call {
    let mut c = s.call(CallType::Accept);
    c.accept = Some(mesos::Accept {
        offer_ids: offers.iter().map(|o| Id::new(*o)).collect(),
        operations: vec![Operation::launch(tasks)],
        filters: Some(mesos::Filters::refuse(refuse)),
    });
    c
}

fn ack(s: &Sub, st: &TaskStatus) -> Call {
    let mut c = s.call(CallType::Acknowledge);
    c.acknowledge = Some(Acknowledge {
        agent_id: st.agent_id.clone().unwrap(),
        task_id: st.task_id.clone(),
        uuid: st.uuid.clone().unwrap(),
    });
    c
}

fn kill(s: &Sub, task: &str) -> Call {
    let mut c = s.call(CallType::Kill);
    c.kill = Some(Kill { task_id: Id::new(task), agent_id: None, kill_policy: None });
    c
}

fn reconcile(s: &Sub, tasks: &[&str]) -> Call {
    let mut c = s.call(CallType::Reconcile);
    c.reconcile = Some(Reconcile {
        tasks: tasks.iter().map(|t| ReconcileTask { task_id: Id::new(*t), agent_id: None }).collect(),
    });
    c
}

fn scalar(o: &Offer, name: &str) -> f64 {
    o.resources.iter().filter(|r| r.name == name).filter_map(|r| r.scalar.map(|s| s.value)).sum()
}

async fn raw(node: &MeshNode, ct: Option<&str>, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut req = node.client.post(node.url("/api/v1/scheduler")).body(body.to_owned());
    if let Some(ct) = ct {
        req = req.header("Content-Type", ct);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("POST");
    let status = r.status().as_u16();
    let ctype = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let text = r.text().await.unwrap();
    if status >= 400 {
        assert!(ctype.starts_with("text/plain"), "Mesos errors are plain text, got {ctype:?}: {text}");
    }
    (status, text)
}

async fn rejected(t: &HttpTransport, stream: &str, call: Call) -> (u16, String) {
    match t.call(stream, call).await {
        Err(FrameworkError::Rejected { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn framework_entry(node: &MeshNode, fid: &Id) -> Option<(bool, Value)> {
    let (_, v) = node.get("/master/frameworks").await;
    if let Some(f) = v["frameworks"].as_array()?.iter().find(|f| f["id"] == json!(fid.value)) {
        return Some((true, f.clone()));
    }
    v["completed_frameworks"].as_array()?.iter().find(|f| f["id"] == json!(fid.value)).map(|f| (false, f.clone()))
}

#[tokio::test]
async fn master_endpoints_answer_in_mesos_shape() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let (s, v) = node.get("/version").await;
    assert_eq!(s, 200);
    let ver = v["version"].as_str().unwrap();
    assert!(ver.split('.').all(|n| n.parse::<u32>().is_ok()) && ver.split('.').count() == 3, "{ver}");
    for path in ["/master/state", "/master/state.json", "/state", "/state.json"] {
        let (s, v) = node.get(path).await;
        assert_eq!(s, 200, "{path}");
        assert_eq!(v["slaves"].as_array().unwrap().len(), 1, "{path}: {v}");
        assert_eq!(v["slaves"][0]["resources"]["cpus"], json!(4.0));
        assert!(v["frameworks"].as_array().unwrap().iter().any(|f| f["id"] == "marathon"));
        assert_eq!(v["version"], json!(ver));
        assert!(v["completed_frameworks"].is_array() && v["orphan_tasks"].is_array());
    }
    let (s, v) = node.get("/master/state?jsonp=cb").await;
    assert_eq!(s, 200);
    assert!(v.as_str().unwrap().starts_with("cb({"), "{v}");
    let r = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = r.get(node.url("/master/redirect")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 307);
    assert_eq!(resp.headers()["location"].to_str().unwrap(), format!("//{}", node.http));
    assert_eq!(r.get(node.url("/master/redirect/x")).send().await.unwrap().status().as_u16(), 404);
    let resp = r.get(node.url("/master/health")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.text().await.unwrap().is_empty());
    let (s, v) = node.get("/master/slaves").await;
    assert_eq!((s, v["slaves"][0]["hostname"].clone()), (200, json!(node.name)));
    let (s, v) = node.get("/master/tasks").await;
    assert_eq!((s, v["tasks"].clone()), (200, json!([])));

    // Weights: PUT persists (a Command), GET shows them, bad input is a 400 and changes nothing.
    let (s, v) = node.get("/master/weights").await;
    assert_eq!((s, v), (200, json!([])));
    let (s, _) = node.send("PUT", "/master/weights", Some(r#"[{"role":"batch","weight":2.5}]"#)).await;
    assert_eq!(s, 200);
    for bad in [r#"[{"role":"batch","weight":-1}]"#, r#"{"role":"x"}"#, "nope", r#"[{"role":"a b","weight":1}]"#] {
        let (s, v) = node.send("PUT", "/master/weights", Some(bad)).await;
        assert_eq!(s, 400, "{bad}: {v}");
    }
    let (_, v) = node.get("/master/weights").await;
    assert_eq!(v, json!([{"role": "batch", "weight": 2.5}]));
    let (_, v) = node.get("/master/roles").await;
    assert!(v["roles"].as_array().unwrap().iter().any(|r| r["name"] == "batch" && r["weight"] == json!(2.5)), "{v}");

    // Quota through the operator API (Mesos' UPDATE_QUOTA), readable at /master/quota.
    let q = json!({"type": "UPDATE_QUOTA", "update_quota": {"force": true, "quota_configs": [
        {"role": "batch", "limits": {"cpus": {"value": 1.5}}}]}});
    let (s, v) = node.send("POST", "/api/v1", Some(&q.to_string())).await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = node.get("/master/quota").await;
    assert_eq!(v["configs"], json!([{"role": "batch", "limits": {"cpus": {"value": 1.5}}}]));
    let bad = json!({"type": "UPDATE_QUOTA", "update_quota": {"quota_configs": [
        {"role": "batch", "guarantees": {"cpus": {"value": 1}}}]}});
    let (s, _) = node.send("POST", "/api/v1", Some(&bad.to_string())).await;
    assert_eq!(s, 400);
    let (s, v) = node.send("POST", "/api/v1", Some(r#"{"type":"GET_WEIGHTS"}"#)).await;
    assert_eq!(s, 200);
    assert_eq!(v["get_weights"]["weight_infos"], json!([{"role": "batch", "weight": 2.5}]));
}

#[tokio::test]
async fn bad_calls_get_mesos_answers_and_leave_allocations_consistent() {
    let node = MeshNode::start(&["--runtime", "process", "--mesos-heartbeat", "1s"]);
    let sub = r#"{"type":"SUBSCRIBE","subscribe":{"framework_info":{"user":"","name":"x"}}}"#;
    // Transport-level mistakes.
    let r = node.client.get(node.url("/api/v1/scheduler")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let (s, m) = raw(&node, None, &[], sub).await;
    assert_eq!((s, m.as_str()), (400, "Expecting 'Content-Type' to be present"));
    let (s, _) = raw(&node, Some("application/recordio"), &[], sub).await;
    assert_eq!(s, 415);
    let (s, m) = raw(&node, Some("application/json"), &[], r#"{"type":"#).await;
    assert_eq!(s, 400);
    assert!(m.starts_with("Failed to parse body into JSON"), "{m}");
    // A RecordIO-framed call is not JSON.
    let framed = String::from_utf8(mesos::encode_record(sub.as_bytes())).unwrap();
    let (s, m) = raw(&node, Some("application/json"), &[], &framed).await;
    assert_eq!(s, 400);
    assert!(m.starts_with("Failed to parse body into JSON"), "{m}");
    let (s, m) = raw(&node, Some("application/json"), &[], r#"{"type":"FLY"}"#).await;
    assert_eq!(s, 400);
    assert!(m.starts_with("Failed to convert JSON into Call protobuf"), "{m}");
    let (s, m) = raw(&node, Some("application/json"), &[], r#"{"type":"ACCEPT","framework_id":{"value":"f"}}"#).await;
    assert_eq!((s, m.as_str()), (400, "Failed to validate scheduler::Call: Expecting 'accept' to be present"));
    let (s, m) = raw(&node, Some("application/json"), &[("Mesos-Stream-Id", "x")], sub).await;
    assert_eq!((s, m.as_str()), (400, "Subscribe calls should not include the 'Mesos-Stream-Id' header"));
    let (s, _) = raw(&node, Some("application/json"), &[("Accept", "application/x-protobuf")], sub).await;
    assert_eq!(s, 406);
    let (s, m) =
        raw(&node, Some("application/json"), &[], r#"{"type":"REVIVE","framework_id":{"value":"nobody"}}"#).await;
    assert_eq!((s, m.as_str()), (400, "Framework cannot be found"));

    let t = HttpTransport::new(&node.url("")).unwrap();
    let mut f = Sub::open(&t, info("bad-calls", 60.0)).await;
    // Stream ids: missing, wrong.
    let body = json!({"type": "REVIVE", "framework_id": f.fid}).to_string();
    let (s, m) = raw(&node, Some("application/json"), &[], &body).await;
    assert_eq!((s, m.as_str()), (400, "All non-subscribe calls should include the 'Mesos-Stream-Id' header"));
    let (s, m) = rejected(&t, "not-my-stream", f.call(CallType::Revive)).await;
    assert_eq!(s, 400);
    assert!(m.contains("didn't match the stream ID"), "{m}");

    let o1 = f.offer().await;
    assert_eq!((scalar(&o1, "cpus"), scalar(&o1, "mem")), (4.0, 4096.0), "the whole agent");
    let tag = uuid::Uuid::new_v4().to_string();

    // ACCEPT of an offer that does not exist: 202, then TASK_LOST with REASON_INVALID_OFFERS.
    t.call(&f.stream, accept(&f, &["no-such-offer"], vec![task("ghost", &o1, "true", 0.1, &tag)], 0.0)).await.unwrap();
    let st = f.update("ghost", |_| true).await;
    assert_eq!(
        (st.state, st.reason.as_deref(), st.source.as_deref()),
        (TaskState::Lost, Some("REASON_INVALID_OFFERS"), Some("SOURCE_MASTER"))
    );
    assert!(st.message.unwrap().contains("no-such-offer is no longer valid"));
    assert!(st.uuid.is_none(), "master-generated updates carry no uuid");

    // Resources beyond the offer: TASK_ERROR, and the offer's resources go back (refuse 0 s).
    t.call(&f.stream, accept(&f, &[&o1.id.value], vec![task("hog", &o1, "true", 64.0, &tag)], 0.0)).await.unwrap();
    let st = f.update("hog", |_| true).await;
    assert_eq!((st.state, st.reason.as_deref()), (TaskState::Error, Some("REASON_TASK_INVALID")));
    assert!(st.message.unwrap().starts_with("Task uses more resources"));

    // The same offer again: it was used.
    t.call(&f.stream, accept(&f, &[&o1.id.value], vec![task("again", &o1, "true", 0.1, &tag)], 0.0)).await.unwrap();
    let st = f.update("again", |_| true).await;
    assert_eq!(st.state, TaskState::Lost);
    assert!(st.message.unwrap().contains("is no longer valid"));

    // KILL of a task nobody launched: reconciliation answers TASK_LOST, no uuid.
    t.call(&f.stream, kill(&f, "never-was")).await.unwrap();
    let st = f.update("never-was", |_| true).await;
    assert_eq!(
        (st.state, st.reason.as_deref(), st.uuid.clone()),
        (TaskState::Lost, Some("REASON_RECONCILIATION"), None)
    );

    // Nothing leaked: the next offer holds the whole agent again, and the master agrees.
    let o2 = f.offer().await;
    assert_ne!(o2.id, o1.id);
    assert_eq!((scalar(&o2, "cpus"), scalar(&o2, "mem")), (4.0, 4096.0));
    assert_eq!(o2.mesh_resources().ports.len(), (node.ports.1 - node.ports.0 + 1) as usize);
    let (_, state) = node.get("/master/state").await;
    assert_eq!(state["slaves"][0]["used_resources"]["cpus"], json!(0.0));
    assert_eq!(state["slaves"][0]["offered_resources"]["cpus"], json!(4.0));
    assert_eq!(state["orphan_tasks"], json!([]));

    // And a real launch on it works: RUNNING (with a uuid, acknowledged), counted as used.
    t.call(&f.stream, accept(&f, &[&o2.id.value], vec![task("real", &o2, "sleep 60", 1.0, &tag)], 0.0)).await.unwrap();
    let st = f.update("real", |s| s.state == TaskState::Running).await;
    assert!(st.uuid.is_some());
    t.call(&f.stream, ack(&f, &st)).await.unwrap();
    let (_, e) = framework_entry(&node, &f.fid).await.unwrap();
    assert_eq!(e["used_resources"]["cpus"], json!(1.0));
    eventually(10, "the acknowledgement is recorded", || async {
        framework_entry(&node, &f.fid).await.filter(|(_, e)| e["unacknowledged_updates"] == json!(0))
    })
    .await;
    // Exactly one task process: the bad calls launched nothing. (RUNNING comes once the task's
    // first process, a shell joining its cgroups, is spawned; it `exec`s `sleep` a moment later.)
    eventually(10, "exactly one task process", || async { (tagged_pids(&tag, "sleep").len() == 1).then_some(()) })
        .await;
    assert_eq!(tagged_pids(&tag, "sh"), Vec::<u32>::new(), "no shell left: it became the task");
    t.call(&f.stream, kill(&f, "real")).await.unwrap();
    let st = f.update("real", |s| s.state.is_terminal()).await;
    assert_eq!(st.state, TaskState::Killed);
    t.call(&f.stream, ack(&f, &st)).await.unwrap();
    eventually(10, "the task process is gone", || async { tagged_pids(&tag, "sleep").is_empty().then_some(()) }).await;
    let (_, state) = node.get("/master/state").await;
    assert_eq!(state["slaves"][0]["used_resources"]["cpus"], json!(0.0));
}

#[tokio::test]
async fn failover_within_the_timeout_keeps_tasks_and_past_it_kills_them() {
    let node = MeshNode::start(&["--runtime", "process", "--mesos-heartbeat", "1s"]);
    let t = HttpTransport::new(&node.url("")).unwrap();
    let (tag_a, tag_b) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());

    // A: 30 s failover timeout, one long task; its RUNNING update is not acknowledged.
    let mut a = Sub::open(&t, info("keeper", 30.0)).await;
    let o = a.offer().await;
    t.call(&a.stream, accept(&a, &[&o.id.value], vec![task("a-1", &o, "sleep 300", 0.5, &tag_a)], 1.0)).await.unwrap();
    let running = a.update("a-1", |s| s.state == TaskState::Running).await;
    let pid = eventually(10, "A's task process", || async { tagged_pids(&tag_a, "sleep").first().copied() }).await;

    // B: 1 s failover timeout.
    let mut b = Sub::open(&t, info("goner", 1.0)).await;
    let o = b.offer().await;
    t.call(&b.stream, accept(&b, &[&o.id.value], vec![task("b-1", &o, "sleep 300", 0.5, &tag_b)], 1.0)).await.unwrap();
    let st = b.update("b-1", |s| s.state == TaskState::Running).await;
    t.call(&b.stream, ack(&b, &st)).await.unwrap();
    eventually(10, "B's task process", || async { (!tagged_pids(&tag_b, "sleep").is_empty()).then_some(()) }).await;

    // Both disconnect.
    let (a_id, a_stream, b_id) = (a.fid.clone(), a.stream.clone(), b.fid.clone());
    drop(a);
    drop(b);
    eventually(10, "A is marked disconnected", || async {
        framework_entry(&node, &a_id).await.filter(|(active, e)| *active && e["connected"] == json!(false))
    })
    .await;
    // A framework that is not connected may not call.
    let (s, m) = rejected(&t, &a_stream, Call::new(CallType::Revive, Some(a_id.clone()))).await;
    assert_eq!((s, m.as_str()), (403, "Framework is not subscribed"));

    // B is torn down after its timeout: its process is gone, it is completed, it may not return.
    eventually(20, "B's task process is killed", || async { tagged_pids(&tag_b, "sleep").is_empty().then_some(()) })
        .await;
    eventually(10, "B is a completed framework", || async {
        framework_entry(&node, &b_id).await.filter(|(active, _)| !*active)
    })
    .await;
    let back =
        t.subscribe(Call::subscribe(FrameworkInfo { id: Some(b_id.clone()), ..info("goner", 1.0) })).await.unwrap();
    let first: Vec<_> = back.events.take(1).collect().await;
    assert!(matches!(&first[..], [Ok(Event::Error(e))] if e.message == "Framework has been removed"), "{first:?}");

    // A re-subscribes in time: same id, its task still runs (same process), and the update it
    // did not acknowledge comes again with the same uuid.
    let mut a = Sub::open(&t, FrameworkInfo { id: Some(a_id.clone()), ..info("keeper", 30.0) }).await;
    assert_eq!(a.fid, a_id);
    let again = a.update("a-1", |s| s.uuid.is_some()).await;
    assert_eq!((again.state, again.uuid.clone()), (TaskState::Running, running.uuid.clone()));
    t.call(&a.stream, ack(&a, &again)).await.unwrap();
    t.call(&a.stream, reconcile(&a, &[])).await.unwrap();
    let st = a.update("a-1", |s| s.reason.as_deref() == Some("REASON_RECONCILIATION")).await;
    assert_eq!(st.state, TaskState::Running);
    assert_eq!(tagged_pids(&tag_a, "sleep"), vec![pid], "the same process kept running");

    // TEARDOWN kills its tasks too.
    t.call(&a.stream, a.call(CallType::Teardown)).await.unwrap();
    eventually(20, "A's task process is killed", || async { tagged_pids(&tag_a, "sleep").is_empty().then_some(()) })
        .await;
    eventually(10, "A is completed, its task recorded as killed", || async {
        framework_entry(&node, &a_id)
            .await
            .filter(|(active, e)| !*active && e["completed_tasks"][0]["state"] == json!("TASK_KILLED"))
    })
    .await;
}

#[tokio::test]
async fn frameworks_tasks_and_weights_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ports = port_range();
    let extra = ["--runtime", "process", "--keep-tasks-on-exit", "--mesos-heartbeat", "1s"];
    let tag = uuid::Uuid::new_v4().to_string();
    let mut node = MeshNode::start_on(&data, ports, &extra);
    let (s, _) = node.send("PUT", "/master/weights", Some(r#"[{"role":"batch","weight":3}]"#)).await;
    assert_eq!(s, 200);
    let t = HttpTransport::new(&node.url("")).unwrap();
    let fi = FrameworkInfo { roles: vec!["batch".into()], ..info("durable", 120.0) };
    let mut f = Sub::open(&t, fi.clone()).await;
    let o = f.offer().await;
    t.call(&f.stream, accept(&f, &[&o.id.value], vec![task("d-1", &o, "sleep 300", 0.5, &tag)], 1.0)).await.unwrap();
    let st = f.update("d-1", |s| s.state == TaskState::Running).await;
    t.call(&f.stream, ack(&f, &st)).await.unwrap();
    let pid = eventually(10, "the task process", || async { tagged_pids(&tag, "sleep").first().copied() }).await;
    let fid = f.fid.clone();
    drop(f);

    node.stop_with("TERM");
    let node = MeshNode::start_on(&data, ports, &extra);
    let (_, v) = node.get("/master/weights").await;
    assert_eq!(v, json!([{"role": "batch", "weight": 3.0}]));
    let (active, e) = framework_entry(&node, &fid).await.expect("the framework is known after the restart");
    assert!(active && e["connected"] == json!(false), "{e}");
    let t = HttpTransport::new(&node.url("")).unwrap();
    let mut f = Sub::open(&t, FrameworkInfo { id: Some(fid.clone()), ..fi }).await;
    assert_eq!(f.fid, fid);
    t.call(&f.stream, reconcile(&f, &["d-1"])).await.unwrap();
    let st = f.update("d-1", |s| s.reason.as_deref() == Some("REASON_RECONCILIATION")).await;
    assert_eq!(st.state, TaskState::Running);
    assert_eq!(tagged_pids(&tag, "sleep"), vec![pid], "the task was adopted, not restarted");
    t.call(&f.stream, f.call(CallType::Teardown)).await.unwrap();
    eventually(20, "the task process is killed", || async { tagged_pids(&tag, "sleep").is_empty().then_some(()) })
        .await;
}

#[tokio::test]
async fn hoarded_offers_are_rescinded_after_the_offer_timeout_and_go_to_others() {
    let node = MeshNode::start(&["--runtime", "process", "--offer-timeout", "1s", "--mesos-heartbeat", "1s"]);
    let t = HttpTransport::new(&node.url("")).unwrap();
    // The hoarder gets the whole node and never answers.
    let mut hoarder = Sub::open(&t, info("hoarder", 60.0)).await;
    let held = hoarder.offer().await;
    assert_eq!(scalar(&held, "cpus"), 4.0);
    let mut other = Sub::open(&t, info("patient", 60.0)).await;
    let ev = hoarder.next(10, "RESCIND", |e| matches!(e, Event::Rescind(_))).await;
    let Event::Rescind(r) = ev else { unreachable!() };
    assert_eq!(r.offer_id, held.id);
    // The rescinded offer cannot be used any more ...
    t.call(&hoarder.stream, accept(&hoarder, &[&held.id.value], vec![task("late", &held, "true", 0.1, "x")], 0.0))
        .await
        .unwrap();
    let st = hoarder.update("late", |_| true).await;
    assert_eq!(st.state, TaskState::Lost);
    // ... and the other framework gets its share of the node.
    let o = other.offer().await;
    assert!(scalar(&o, "cpus") >= 2.0, "{o:?}");
}

#[tokio::test]
async fn a_second_subscription_with_the_same_id_fails_the_first_over() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let t = HttpTransport::new(&node.url("")).unwrap();
    let mut first = Sub::open(&t, info("twice", 60.0)).await;
    let second = Sub::open(&t, FrameworkInfo { id: Some(first.fid.clone()), ..info("twice", 60.0) }).await;
    assert_eq!(second.fid, first.fid);
    let ev = first.next(10, "ERROR", |e| matches!(e, Event::Error(_))).await;
    assert!(matches!(&ev, Event::Error(e) if e.message == "Framework failed over"), "{ev:?}");
    let rest: Vec<_> = first.sub.events.by_ref().collect().await;
    assert!(rest.is_empty(), "the old stream ends after the ERROR: {rest:?}");
    // Calls on the old stream are refused; on the new one they are accepted.
    let (s, m) = rejected(&t, &first.stream, first.call(CallType::Revive)).await;
    assert_eq!(s, 400);
    assert!(m.contains("didn't match the stream ID"), "{m}");
    t.call(&second.stream, second.call(CallType::Revive)).await.unwrap();
}

/// The operator API at `/api/v1/operator` too (where pymesos posts), with GET_STATE,
/// GET_FRAMEWORKS, GET_AGENTS and GET_TASKS in Mesos' v1 JSON.
#[tokio::test]
async fn operator_state_calls_answer_in_v1_json_at_both_paths() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let app = json!({"id": "/op-sleep", "cmd": "sleep 300", "cpus": 0.1, "mem": 16, "instances": 1});
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let call = |t: &str| json!({"type": t}).to_string();
    let task = eventually(30, "the task in GET_TASKS, running", || async {
        let (s, v) = node.send("POST", "/api/v1/operator", Some(&call("GET_TASKS"))).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["type"], "GET_TASKS");
        v["get_tasks"]["tasks"].as_array()?.iter().find(|t| t["state"] == "TASK_RUNNING").cloned()
    })
    .await;
    assert!(task["task_id"]["value"].as_str().unwrap().starts_with("op-sleep"), "{task}");
    assert_eq!(task["framework_id"]["value"], "marathon");
    assert!(
        task["resources"].as_array().unwrap().iter().any(|r| r["name"] == "cpus" && r["type"] == "SCALAR"),
        "{task}"
    );

    for path in ["/api/v1", "/api/v1/operator", "/master/api/v1/operator"] {
        let (s, v) = node.send("POST", path, Some(&call("GET_AGENTS"))).await;
        assert_eq!(s, 200, "{path}: {v}");
        let agents = v["get_agents"]["agents"].as_array().unwrap();
        assert_eq!(agents.len(), 1, "{v}");
        assert!(agents[0]["agent_info"]["id"]["value"].is_string(), "{v}");
    }
    let (_, v) = node.send("POST", "/api/v1/operator", Some(&call("GET_FRAMEWORKS"))).await;
    let fws = v["get_frameworks"]["frameworks"].as_array().unwrap();
    assert!(fws.iter().any(|f| f["framework_info"]["id"]["value"] == "marathon" && f["active"] == true), "{v}");
    let (_, v) = node.send("POST", "/api/v1/operator", Some(&call("GET_STATE"))).await;
    let st = &v["get_state"];
    assert_eq!(v["type"], "GET_STATE");
    assert_eq!(st["get_tasks"]["tasks"][0]["task_id"], task["task_id"], "{v}");
    assert_eq!(st["get_agents"]["agents"].as_array().map(Vec::len), Some(1));
    assert!(st["get_frameworks"]["frameworks"].as_array().is_some_and(|f| !f.is_empty()));
    let (s, _) = node.send("POST", "/api/v1/operator", Some(&call("GET_NOTHING"))).await;
    assert_eq!(s, 501);
}
