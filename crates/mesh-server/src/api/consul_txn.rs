//! Consul's `PUT /v1/txn` for KV operations. A transaction with a write is one command
//! (`Command::KvTxn`): the state machine applies its operations in order, all or none, and
//! returns their results (reads included, each at its place in the transaction); a transaction
//! of reads and checks only is answered from the published state without a write. A failed
//! operation is Consul's 409 listing every failed one; a malformed request its 400 (413 for too
//! many operations or too large a value). Node, service and check operations are not supported
//! (400).

use super::consul::{Params, check_dc};
use super::{Api, ApiError};
use crate::control::ControlError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use mesh_core::kv::{KvEntry, KvError, KvOp, KvValue, MAX_VALUE_SIZE, SetMode, TxnError, TxnOp};
use mesh_core::model::Millis;
use mesh_core::state::{ApplyError, Command};
use serde_json::{Map, Value, json};

/// Consul's limit of operations per transaction.
pub const MAX_OPS: usize = 128;

/// Routes of the transaction API.
pub fn routes() -> Router<Api> {
    Router::new().route("/v1/txn", put(txn))
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::ConsulBadRequest(m.into())
}

/// Why a request is refused before its operations are tried (Consul's HTTP layer).
fn parse_error(m: impl std::fmt::Display) -> ApiError {
    bad(format!("Failed to parse body: {m}"))
}

fn field<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v).filter(|v| !v.is_null())
}

/// One KV operation as the request gives it; `Err` holds the reason for Consul's 409 found
/// before any operation is tried (its pre-checks: a missing key, an unknown verb).
fn parse_op(i: usize, op: &Value, now: Millis) -> Result<Result<TxnOp, String>, ApiError> {
    let Some(o) = op.as_object() else {
        return Err(parse_error(format!("operation {i} is not an object")));
    };
    let Some(kv) = field(o, "KV") else {
        let name = o.keys().next().cloned().unwrap_or_default();
        return Err(bad(format!("Operation {i}: {name:?} operations are not supported by mesh (only KV)")));
    };
    let Some(kv) = kv.as_object() else {
        return Err(parse_error(format!("operation {i}: KV is not an object")));
    };
    let s = |name: &str| -> Result<String, ApiError> {
        match field(kv, name) {
            None => Ok(String::new()),
            Some(v) => v.as_str().map(str::to_owned).ok_or_else(|| {
                parse_error(format!(
                    "json: cannot unmarshal {} into Go struct field KVTxnOp.KV.{name} of type string",
                    kind(v)
                ))
            }),
        }
    };
    let n = |name: &str| -> Result<u64, ApiError> {
        match field(kv, name) {
            None => Ok(0),
            Some(v) => v.as_u64().ok_or_else(|| {
                parse_error(format!(
                    "json: cannot unmarshal {} into Go struct field KVTxnOp.KV.{name} of type uint64",
                    kind(v)
                ))
            }),
        }
    };
    let (verb, key, session) = (s("Verb")?, s("Key")?, s("Session")?);
    let (flags, index) = (n("Flags")?, n("Index")?);
    let value = KvValue::from_base64(&s("Value")?).map_err(|e| parse_error(format!("failed to decode value: {e}")))?;
    if value.as_bytes().len() > MAX_VALUE_SIZE {
        let msg = format!("Value for key {key:?} is too large ({} > {MAX_VALUE_SIZE} bytes)", value.as_bytes().len());
        return Err(ApiError::ConsulStatus(413, msg));
    }
    if key.is_empty() && verb != "delete-tree" {
        return Ok(Err("Must provide key".into()));
    }
    let set = |mode: SetMode| TxnOp::Kv(KvOp::Set { key: key.clone(), value: value.clone(), flags, mode, now });
    let del = |recurse: bool, cas: Option<u64>| TxnOp::Kv(KvOp::Delete { key: key.clone(), recurse, cas, now });
    Ok(Ok(match verb.as_str() {
        "set" => set(SetMode::Plain),
        "cas" => set(SetMode::Cas(index)),
        "lock" => set(SetMode::Acquire(session)),
        "unlock" => set(SetMode::Release(session)),
        "get" => TxnOp::Get { key },
        "get-or-empty" => TxnOp::GetOrEmpty { key },
        "get-tree" => TxnOp::GetTree { prefix: key },
        "check-index" => TxnOp::CheckIndex { key, index },
        "check-session" => TxnOp::CheckSession { key, session },
        "check-not-exists" => TxnOp::CheckNotExists { key },
        "delete" => del(false, None),
        "delete-tree" => del(true, None),
        "delete-cas" => del(false, Some(index)),
        other => return Ok(Err(format!("unknown KV verb {other:?}"))),
    }))
}

/// A JSON value's type as Go's decoder names it in its errors.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A result entry as Consul's `DirEntry` (`Value` null when empty, `Session` only when held).
fn entry(e: &KvEntry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index, "Key": e.key, "Flags": e.flags, "Value": Value::Null,
        "CreateIndex": e.create_index, "ModifyIndex": e.modify_index,
    });
    if !e.value.as_bytes().is_empty() {
        v["Value"] = json!(e.value.to_base64());
    }
    if let Some(s) = &e.session {
        v["Session"] = json!(s);
    }
    json!({"KV": v})
}

/// Consul's 409: the transaction was rolled back, for these reasons.
fn conflict(errors: &[TxnError]) -> Response {
    let errors: Vec<Value> = errors.iter().map(|e| json!({"OpIndex": e.op_index, "What": e.what})).collect();
    (StatusCode::CONFLICT, axum::Json(json!({"Results": null, "Errors": errors}))).into_response()
}

async fn txn(State(api): State<Api>, RawQuery(raw): RawQuery, body: Bytes) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let ops: Vec<Value> = match serde_json::from_slice(&body) {
        Ok(Value::Array(a)) => a,
        Ok(v) => {
            return Err(parse_error(format!("json: cannot unmarshal {} into Go value of type api.TxnOps", kind(&v))));
        }
        Err(e) => return Err(parse_error(e)),
    };
    if ops.len() > MAX_OPS {
        return Err(ApiError::ConsulStatus(
            413,
            format!("Transaction contains too many operations ({} > {MAX_OPS})", ops.len()),
        ));
    }
    let now = api.control.now();
    let mut parsed = Vec::with_capacity(ops.len());
    let mut refused = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match parse_op(i, op, now)? {
            Ok(op) => parsed.push(op),
            Err(what) => refused.push(TxnError { op_index: i, what }),
        }
    }
    if !refused.is_empty() {
        return Ok(conflict(&refused));
    }
    let read_only = !parsed.iter().any(TxnOp::is_write);
    let results = if !read_only {
        // Through the log, all or none; the results are the state machine's, at the
        // transaction's place in the log.
        match api.control.propose_changes(Command::KvTxn(parsed)).await {
            Ok(changes) => changes.txn_results.unwrap_or_default(),
            Err(ControlError::Rejected(ApplyError::Kv(KvError::TxnFailed(errors)))) => return Ok(conflict(&errors)),
            Err(e) => return Err(ApiError::from_consul(e)),
        }
    } else {
        // Reads and checks only: answered from the published state, nothing written.
        let mut kv = api.control.published.state.load().kv.clone();
        let index = kv.index;
        match kv.apply_txn(&parsed, index) {
            Ok(results) => results,
            Err(KvError::TxnFailed(errors)) => return Ok(conflict(&errors)),
            Err(e) => return Err(bad(e.to_string())),
        }
    };
    let results: Vec<Value> = results.iter().map(entry).collect();
    let mut r = axum::Json(json!({"Results": results, "Errors": null})).into_response();
    if read_only {
        // As Consul's read path (no index: a transaction is not a blocking query).
        let h = r.headers_mut();
        h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
        h.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    }
    Ok(r)
}
