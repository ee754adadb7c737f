//! Consul's `PUT /v1/txn` for KV operations: the writes and conditions of a transaction are
//! applied as one command (`Command::KvTxn`), all or none; a transaction of reads only is answered
//! from the published state. Node, service and check operations are not supported (400).

use super::consul::{Params, check_dc};
use super::{Api, ApiError};
use crate::control::ControlError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use mesh_core::kv::{KvError, KvOp, KvState, KvValue, MAX_VALUE_SIZE, SetMode, TxnOp};
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

/// A parsed KV operation: what to apply (if anything) and what to answer.
enum Parsed {
    /// A write or a condition, answered with the key's entry (value left out) afterwards.
    Apply(TxnOp, Option<String>),
    /// `get`: the entry with its value.
    Get(String),
    /// `get-tree`: every entry under the prefix.
    GetTree(String),
}

fn field<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v).filter(|v| !v.is_null())
}

fn parse_op(i: usize, op: &Value, now: mesh_core::model::Millis) -> Result<Parsed, ApiError> {
    let Some(o) = op.as_object() else {
        return Err(bad(format!("Failed to parse body: operation {i} is not an object")));
    };
    let Some(kv) = field(o, "KV").and_then(Value::as_object) else {
        let kind = o.keys().next().cloned().unwrap_or_default();
        return Err(bad(format!("Operation {i}: {kind} operations are not supported by mesh (only KV)")));
    };
    let s = |name: &str| field(kv, name).and_then(Value::as_str).unwrap_or_default().to_owned();
    let n = |name: &str| -> Result<u64, ApiError> {
        match field(kv, name) {
            None => Ok(0),
            Some(v) => v.as_u64().ok_or_else(|| bad(format!("Operation {i}: {name} must be a non-negative integer"))),
        }
    };
    let verb = s("Verb");
    let key = s("Key");
    if key.is_empty() && verb != "get-tree" && verb != "delete-tree" {
        return Err(bad(format!("Operation {i}: missing key")));
    }
    let value = || -> Result<KvValue, ApiError> {
        let v =
            KvValue::from_base64(&s("Value")).map_err(|e| bad(format!("Operation {i}: Value must be base64: {e}")))?;
        if v.as_bytes().len() > MAX_VALUE_SIZE {
            return Err(bad(format!(
                "Operation {i}: value too large ({} > {MAX_VALUE_SIZE} bytes)",
                v.as_bytes().len()
            )));
        }
        Ok(v)
    };
    let set = |mode: SetMode| -> Result<Parsed, ApiError> {
        let op = KvOp::Set { key: key.clone(), value: value()?, flags: n("Flags")?, mode, now };
        Ok(Parsed::Apply(TxnOp::Kv(op), Some(key.clone())))
    };
    let session = || -> Result<String, ApiError> {
        let v = s("Session");
        if v.is_empty() { Err(bad(format!("Operation {i}: missing Session"))) } else { Ok(v) }
    };
    let del = |recurse: bool, cas: Option<u64>| {
        Parsed::Apply(TxnOp::Kv(KvOp::Delete { key: key.clone(), recurse, cas, now }), None)
    };
    Ok(match verb.as_str() {
        "set" => set(SetMode::Plain)?,
        "cas" => set(SetMode::Cas(n("Index")?))?,
        "lock" => set(SetMode::Acquire(session()?))?,
        "unlock" => set(SetMode::Release(session()?))?,
        "get" => Parsed::Get(key),
        "get-tree" => Parsed::GetTree(key),
        "check-index" => Parsed::Apply(TxnOp::CheckIndex { key: key.clone(), index: n("Index")? }, Some(key)),
        "check-session" => Parsed::Apply(TxnOp::CheckSession { key: key.clone(), session: session()? }, Some(key)),
        "check-not-exists" => Parsed::Apply(TxnOp::CheckNotExists { key }, None),
        "delete" => del(false, None),
        "delete-tree" => del(true, None),
        "delete-cas" => del(false, Some(n("Index")?)),
        other => return Err(bad(format!("Operation {i}: unknown KV verb {other:?}"))),
    })
}

fn entry(kv: &KvState, key: &str, with_value: bool) -> Option<Value> {
    let e = kv.entries.get(key)?;
    let mut v = json!({
        "LockIndex": e.lock_index, "Key": e.key, "Flags": e.flags, "Value": Value::Null,
        "CreateIndex": e.create_index, "ModifyIndex": e.modify_index,
    });
    if with_value && !e.value.as_bytes().is_empty() {
        v["Value"] = json!(e.value.to_base64());
    }
    if let Some(s) = &e.session {
        v["Session"] = json!(s);
    }
    Some(json!({"KV": v}))
}

fn conflict(op: usize, what: String) -> Response {
    (StatusCode::CONFLICT, axum::Json(json!({"Results": null, "Errors": [{"OpIndex": op, "What": what}]})))
        .into_response()
}

async fn txn(State(api): State<Api>, RawQuery(raw): RawQuery, body: Bytes) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let ops: Vec<Value> = match serde_json::from_slice(&body) {
        Ok(Value::Array(a)) => a,
        Ok(_) => return Err(bad("Failed to parse body: expected a JSON list of operations")),
        Err(e) => return Err(bad(format!("Failed to parse body: {e}"))),
    };
    if ops.len() > MAX_OPS {
        return Err(ApiError::ConsulStatus(
            413,
            format!("Transaction contains too many operations ({} > {MAX_OPS})", ops.len()),
        ));
    }
    let parsed =
        ops.iter().enumerate().map(|(i, o)| parse_op(i, o, api.control.now())).collect::<Result<Vec<_>, _>>()?;
    let apply: Vec<TxnOp> =
        parsed.iter().filter_map(|p| if let Parsed::Apply(t, _) = p { Some(t.clone()) } else { None }).collect();
    let writes = apply.iter().any(|t| matches!(t, TxnOp::Kv(_)));
    if writes {
        match api.control.propose(Command::KvTxn(apply)).await {
            Ok(()) => {}
            Err(ControlError::Rejected(ApplyError::Kv(KvError::TxnFailed { op, what }))) => {
                // `op` counts the applied operations; map it back to the request's index.
                let index = parsed
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| matches!(p, Parsed::Apply(..)))
                    .nth(op)
                    .map_or(op, |(i, _)| i);
                return Ok(conflict(index, what));
            }
            Err(e) => return Err(ApiError::from_consul(e)),
        }
    }
    let state = api.control.published.state.load();
    let kv = &state.kv;
    if !writes {
        // Reads and conditions only: checked against the current state.
        let mut check = kv.clone();
        let conds: Vec<TxnOp> =
            parsed.iter().filter_map(|p| if let Parsed::Apply(t, _) = p { Some(t.clone()) } else { None }).collect();
        if let Err(KvError::TxnFailed { op, what }) = check.apply_txn(&conds, kv.index) {
            let index = parsed
                .iter()
                .enumerate()
                .filter(|(_, p)| matches!(p, Parsed::Apply(..)))
                .nth(op)
                .map_or(op, |(i, _)| i);
            return Ok(conflict(index, what));
        }
    }
    let mut results = Vec::new();
    for (i, p) in parsed.iter().enumerate() {
        match p {
            Parsed::Apply(_, Some(key)) => results.extend(entry(kv, key, false)),
            Parsed::Apply(_, None) => {}
            Parsed::Get(key) => match entry(kv, key, true) {
                Some(e) => results.push(e),
                None => return Ok(conflict(i, format!("key {key:?} doesn't exist"))),
            },
            Parsed::GetTree(prefix) => {
                results.extend(kv.list(prefix).filter_map(|e| entry(kv, &e.key, true)));
            }
        }
    }
    let mut r = axum::Json(json!({"Results": results, "Errors": null})).into_response();
    super::consul::add_index_headers(&mut r, kv.index, &q);
    Ok(r)
}
