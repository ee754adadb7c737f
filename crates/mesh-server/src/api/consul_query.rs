//! Consul's prepared queries (`/v1/query`): create, list, read, update, delete, `execute` and
//! `explain`. Definitions are replicated state ([`Command::PutQuery`]); executing one reads this
//! node's catalog and, when it has no instance that passes the query's filters, fails over:
//! first to the `Failover.NearestN` nearest datacenters (the order of
//! `/v1/catalog/datacenters`, nearest first by WAN round-trip time), then to
//! `Failover.Datacenters` in order, asking each with `?dc=` as a client would (through this
//! node's own API, [`Api::loopback`]). `Datacenter` and `Failovers` in the result say where the
//! answer came from and how many other datacenters were asked.
//!
//! Templates (`Template.Type` `name_prefix_match`, with an optional `Regexp`) answer every name
//! they prefix, the longest prefix winning, and an empty-named template every name; their
//! strings interpolate `${name.full}`, `${name.prefix}`, `${name.suffix}` and `${match(N)}`.
//! Keys are read case-insensitively, as Consul's decoder does (py-consul sends lower case).
//! Not supported: `Session` invalidation, `IgnoreCheckIDs`, `Connect`, sameness groups, peers.

use super::consul::{Ci, Params, check_dc, health_entry, indexed, reply};
use super::{Api, ApiError, enc};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mesh_core::catalog::{Catalog, CatalogState, Health, ServiceInstance};
use mesh_core::state::{ApplyError, Command, PreparedQuery, State as ClusterState};
use serde_json::{Map, Value, json};

/// Routes of the prepared query API.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/query", get(list).post(create))
        .route("/v1/query/{id}", get(read).put(update).delete(delete))
        .route("/v1/query/{id}/execute", get(execute))
        .route("/v1/query/{id}/explain", get(explain))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::ConsulBadRequest(msg.into())
}

fn not_found() -> ApiError {
    ApiError::ConsulNotFound("Query not found".into())
}

fn control_err(e: crate::control::ControlError) -> ApiError {
    use crate::control::ControlError;
    match e {
        ControlError::Rejected(ApplyError::UnknownQuery(_)) => not_found(),
        ControlError::Rejected(e @ (ApplyError::QueryNameTaken(_) | ApplyError::QueryExists(_))) => bad(e.to_string()),
        e => ApiError::from_consul(e),
    }
}

/// A definition from a request body, checked and in Consul's shape (keys as Consul writes
/// them), with whether it is a template.
fn definition(body: &[u8]) -> Result<(Value, bool), ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("Request decode failed: {e}")))?;
    let Some(m) = v.as_object() else { return Err(bad("Request decode failed: not a JSON object")) };
    let c = Ci(m);
    let svc = c.obj("Service")?;
    let service = match &svc {
        Some(s) => s.str("Service")?.unwrap_or_default().to_owned(),
        None => String::new(),
    };
    if service.is_empty() {
        return Err(bad("Must provide a Service name to query"));
    }
    let empty = Map::new();
    let s = svc.unwrap_or(Ci(&empty));
    let failover = s.obj("Failover")?.unwrap_or(Ci(&empty));
    let nearest = match failover.get("NearestN") {
        None | Some(Value::Null) => 0,
        Some(n) => match n.as_i64() {
            Some(n) if n >= 0 => n,
            _ => return Err(bad(format!("Bad NearestN '{n}', must be >= 0"))),
        },
    };
    let dns = c.obj("DNS")?.unwrap_or(Ci(&empty));
    let ttl = dns.str("TTL")?.unwrap_or_default().to_owned();
    if !ttl.is_empty() {
        match mesh_core::registrator::parse_go_duration(&ttl) {
            Ok(_) => {}
            Err(e) => return Err(bad(format!("Bad DNS TTL '{ttl}': {e}"))),
        }
    }
    let template = c.obj("Template")?.unwrap_or(Ci(&empty));
    let ttype = template.str("Type")?.unwrap_or_default().to_owned();
    if !ttype.is_empty() && ttype != "name_prefix_match" {
        return Err(bad(format!("Bad Type '{ttype}'")));
    }
    let regexp = template.str("Regexp")?.unwrap_or_default().to_owned();
    if !regexp.is_empty() {
        regex::Regex::new(&regexp).map_err(|e| bad(format!("Bad Regexp: {e}")))?;
    }
    let def = json!({
        "Name": c.str("Name")?.unwrap_or_default(),
        "Session": c.str("Session")?.unwrap_or_default(),
        "Token": "",
        "Template": {"Type": ttype, "Regexp": regexp, "RemoveEmptyTags": template.bool("RemoveEmptyTags")?},
        "Service": {
            "Service": service,
            "Failover": {"NearestN": nearest, "Datacenters": failover.strings("Datacenters")?},
            "OnlyPassing": s.bool("OnlyPassing")?,
            "Near": s.str("Near")?.unwrap_or_default(),
            "Tags": s.strings("Tags")?,
            "NodeMeta": s.string_map("NodeMeta")?,
            "ServiceMeta": s.string_map("ServiceMeta")?,
            "IgnoreCheckIDs": s.strings("IgnoreCheckIDs")?,
        },
        "DNS": {"TTL": ttl},
    });
    Ok((def, !ttype.is_empty()))
}

/// A stored query as the API shows it: its definition with `ID` and the indexes.
fn view(q: &PreparedQuery) -> Value {
    let mut v: Value = serde_json::from_str(&q.definition).unwrap_or_else(|_| json!({}));
    if let Some(m) = v.as_object_mut() {
        m.insert("ID".into(), json!(q.id));
        m.insert("CreateIndex".into(), json!(q.create_index));
        m.insert("ModifyIndex".into(), json!(q.modify_index));
    }
    v
}

async fn list(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = api.control.state();
    let all: Vec<Value> = state.queries.values().map(view).collect();
    Ok(indexed(&Value::Array(all), state.index, &q))
}

/// The query a request body defines, to be stored under `id` (the state sets its indexes).
fn stored(id: String, body: &[u8]) -> Result<PreparedQuery, ApiError> {
    let (def, template) = definition(body)?;
    Ok(PreparedQuery {
        id,
        name: def["Name"].as_str().unwrap_or_default().to_owned(),
        template,
        definition: def.to_string(),
        create_index: 0,
        modify_index: 0,
    })
}

async fn create(State(api): State<Api>, RawQuery(raw): RawQuery, body: Bytes) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let id = api.control.uuid().to_string();
    let query = stored(id.clone(), &body)?;
    api.control.propose(Command::PutQuery { query, create: true }).await.map_err(control_err)?;
    Ok(reply(&json!({"ID": id}), &q))
}

async fn read(State(api): State<Api>, Path(id): Path<String>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = api.control.state();
    let found = state.queries.get(&id).ok_or_else(not_found)?;
    Ok(indexed(&json!([view(found)]), state.index, &q))
}

async fn update(
    State(api): State<Api>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let query = stored(id, &body)?;
    api.control.propose(Command::PutQuery { query, create: false }).await.map_err(control_err)?;
    Ok(axum::http::StatusCode::OK.into_response())
}

async fn delete(State(api): State<Api>, Path(id): Path<String>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    api.control.propose(Command::DeleteQuery { id }).await.map_err(control_err)?;
    Ok(axum::http::StatusCode::OK.into_response())
}

/// The definition of the query `key` names (an id, a name, or a name a template prefixes),
/// rendered for that name.
fn resolve(state: &ClusterState, key: &str) -> Option<Value> {
    if let Some(q) = state.queries.get(key) {
        return Some(view(q));
    }
    if let Some(q) =
        state.queries.values().find(|q| !q.template && !q.name.is_empty() && q.name.eq_ignore_ascii_case(key))
    {
        return Some(view(q));
    }
    let lower = key.to_ascii_lowercase();
    let t = state
        .queries
        .values()
        .filter(|q| q.template && lower.starts_with(&q.name.to_ascii_lowercase()))
        .max_by_key(|q| q.name.len())?;
    let mut v = view(t);
    render(&mut v, key, &t.name);
    Some(v)
}

/// Interpolates a template's strings for `name`: `${name.full}`, `${name.prefix}`,
/// `${name.suffix}` and `${match(N)}` (the Regexp's groups); with `RemoveEmptyTags`, tags that
/// end up empty are dropped.
fn render(v: &mut Value, name: &str, prefix: &str) {
    let regexp = v["Template"]["Regexp"].as_str().unwrap_or_default().to_owned();
    let groups: Vec<String> = regex::Regex::new(&regexp)
        .ok()
        .filter(|_| !regexp.is_empty())
        .and_then(|re| {
            re.captures(name).map(|c| c.iter().map(|m| m.map(|m| m.as_str().to_owned()).unwrap_or_default()).collect())
        })
        .unwrap_or_default();
    let suffix = name.get(prefix.len()..).unwrap_or_default();
    let sub = |s: &str| {
        let mut out =
            s.replace("${name.full}", name).replace("${name.prefix}", prefix).replace("${name.suffix}", suffix);
        for i in 0..10 {
            out = out.replace(&format!("${{match({i})}}"), groups.get(i).map_or("", String::as_str));
        }
        out
    };
    fn walk(v: &mut Value, sub: &dyn Fn(&str) -> String, skip: bool) {
        match v {
            Value::String(s) if !skip => *s = sub(s),
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, sub, skip)),
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    // The template's own settings and the name stay as written.
                    walk(x, sub, skip || k == "Template" || k == "Name" || k == "ID");
                }
            }
            _ => {}
        }
    }
    walk(v, &sub, false);
    if v["Template"]["RemoveEmptyTags"].as_bool() == Some(true)
        && let Some(tags) = v["Service"]["Tags"].as_array_mut()
    {
        tags.retain(|t| t.as_str().is_some_and(|s| !s.is_empty()));
    }
}

/// The query's filters: passing only or not critical, tags (`!tag` excludes), node and service
/// meta.
struct Filter {
    only_passing: bool,
    tags: Vec<String>,
    node_meta: Map<String, Value>,
    service_meta: Map<String, Value>,
}

impl Filter {
    fn of(def: &Value) -> Filter {
        let s = &def["Service"];
        Filter {
            only_passing: s["OnlyPassing"].as_bool().unwrap_or(false),
            tags: s["Tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_ascii_lowercase))
                .collect(),
            node_meta: s["NodeMeta"].as_object().cloned().unwrap_or_default(),
            service_meta: s["ServiceMeta"].as_object().cloned().unwrap_or_default(),
        }
    }

    fn health_ok(&self, h: Health) -> bool {
        if self.only_passing { h == Health::Passing } else { h != Health::Critical }
    }

    fn tags_ok<'a>(&self, tags: impl Iterator<Item = &'a str> + Clone) -> bool {
        self.tags.iter().all(|t| match t.strip_prefix('!') {
            Some(not) => !tags.clone().any(|x| x.eq_ignore_ascii_case(not)),
            None => tags.clone().any(|x| x.eq_ignore_ascii_case(t)),
        })
    }

    fn meta_ok(want: &Map<String, Value>, have: &Value) -> bool {
        want.iter().all(|(k, v)| have.get(k) == Some(v))
    }

    /// Whether a `/v1/health/service` entry passes.
    fn entry_ok(&self, e: &Value) -> bool {
        let health = e["Checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| Health::parse(c["Status"].as_str().unwrap_or("passing")).unwrap_or(Health::Critical))
            .max()
            .unwrap_or(Health::Passing);
        let tags = e["Service"]["Tags"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>());
        let tags = tags.unwrap_or_default();
        self.health_ok(health)
            && self.tags_ok(tags.iter().copied())
            && Self::meta_ok(&self.node_meta, &e["Node"]["Meta"])
            && Self::meta_ok(&self.service_meta, &e["Service"]["Meta"])
    }

    /// This datacenter's instances of `service` that pass, as `/v1/health/service` entries.
    fn local(&self, cat: &CatalogState, service: &str) -> Vec<Value> {
        let mut found: Vec<&ServiceInstance> = cat
            .instances(service, None, false)
            .into_iter()
            .filter(|i| self.health_ok(i.health) && self.tags_ok(i.tags.iter().map(String::as_str)))
            .collect();
        found.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
        found.into_iter().map(|i| health_entry(cat, i)).filter(|e| self.entry_ok(e)).collect()
    }
}

/// `GET uri` through this node's own API: the JSON of a 200, else `None`.
async fn loopback_get(api: &Api, uri: &str) -> Option<Value> {
    let (status, body) = super::get_in_process(api.loopback.get()?, uri).await?;
    if !status.is_success() {
        tracing::debug!(%uri, %status, "prepared query: no answer");
        return None;
    }
    serde_json::from_slice(&body).ok()
}

/// The datacenters to fail over to, in order: the `NearestN` nearest others, then the listed
/// ones not already in.
async fn failover_targets(api: &Api, def: &Value) -> Vec<String> {
    let own = api.info.datacenter.to_ascii_lowercase();
    let f = &def["Service"]["Failover"];
    let nearest = f["NearestN"].as_u64().unwrap_or(0) as usize;
    let mut out: Vec<String> = Vec::new();
    if nearest > 0
        && let Some(Value::Array(dcs)) = loopback_get(api, "/v1/catalog/datacenters").await
    {
        out.extend(
            dcs.iter().filter_map(Value::as_str).map(str::to_ascii_lowercase).filter(|dc| *dc != own).take(nearest),
        );
    }
    for dc in f["Datacenters"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        let dc = dc.to_ascii_lowercase();
        if dc != own && !out.contains(&dc) {
            out.push(dc);
        }
    }
    out
}

async fn execute(
    State(api): State<Api>,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = api.control.state();
    let def = resolve(&state, &key).ok_or_else(not_found)?;
    let service = def["Service"]["Service"].as_str().unwrap_or_default().to_owned();
    let filter = Filter::of(&def);
    let mut datacenter = api.info.datacenter.clone();
    let mut nodes = filter.local(&state.catalog, &service);
    let mut failovers = 0u64;
    if nodes.is_empty() {
        for dc in failover_targets(&api, &def).await {
            failovers += 1;
            let uri = format!("/v1/health/service/{}?dc={}", enc(&service), enc(&dc));
            let Some(Value::Array(entries)) = loopback_get(&api, &uri).await else { continue };
            let passing: Vec<Value> = entries.into_iter().filter(|e| filter.entry_ok(e)).collect();
            if !passing.is_empty() {
                datacenter = dc;
                nodes = passing;
                break;
            }
        }
    }
    // Shuffled, as Consul does; then with `?near=` (or the query's `Near`) sorted by the
    // estimated round trip from that node (`_agent`: this one), for this datacenter's answer.
    {
        use rand::seq::SliceRandom;
        nodes.shuffle(&mut rand::rng());
    }
    let near = q.get("near").map(|s| s.to_string()).or_else(|| def["Service"]["Near"].as_str().map(str::to_owned));
    if let Some(near) = near.filter(|n| !n.is_empty())
        && datacenter == api.info.datacenter
    {
        let by = Params::parse(Some(&format!("near={}", enc(&near))));
        super::consul_coordinate::sort_near(&api, &by, &mut nodes, |e| e["Node"]["Node"].as_str());
    }
    if let Some(limit) = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0) {
        nodes.truncate(limit);
    }
    let body = json!({
        "Service": service,
        "Nodes": nodes,
        "DNS": def["DNS"],
        "Datacenter": datacenter,
        "Failovers": failovers,
    });
    Ok(indexed(&body, state.index, &q))
}

async fn explain(
    State(api): State<Api>,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = api.control.state();
    let def = resolve(&state, &key).ok_or_else(not_found)?;
    Ok(indexed(&json!({"Query": def}), state.index, &q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_checked_and_read_case_insensitively() {
        // py-consul's shape: lower-case keys, always a template.
        let (d, template) = definition(
            br#"{"name": "web", "service": {"service": "web", "failover": {"nearestn": 2}}, "template": {"type": "name_prefix_match"}, "dns": {"ttl": "10s"}}"#,
        )
        .unwrap();
        assert!(template);
        assert_eq!(d["Service"]["Failover"]["NearestN"], 2);
        assert_eq!(d["DNS"]["TTL"], "10s");
        for (body, err) in [
            (&br#"{"Name": "x"}"#[..], "Must provide a Service name to query"),
            (br#"{"Service": {"Service": "w", "Failover": {"NearestN": -1}}}"#, "Bad NearestN '-1', must be >= 0"),
            (br#"{"Service": {"Service": "w"}, "DNS": {"TTL": "soon"}}"#, "Bad DNS TTL 'soon'"),
            (br#"{"Service": {"Service": "w"}, "Template": {"Type": "glob"}}"#, "Bad Type 'glob'"),
            (
                br#"{"Service": {"Service": "w"}, "Template": {"Type": "name_prefix_match", "Regexp": "("}}"#,
                "Bad Regexp",
            ),
            (b"[1]", "Request decode failed"),
        ] {
            let Err(ApiError::ConsulBadRequest(m)) = definition(body) else { panic!("accepted {body:?}") };
            assert!(m.starts_with(err), "{m}");
        }
    }

    #[test]
    fn templates_render_the_name() {
        let (def, _) = definition(
            br#"{"Name": "geo-", "Template": {"Type": "name_prefix_match", "Regexp": "^geo-(.+?)-(.*)$", "RemoveEmptyTags": true},
                 "Service": {"Service": "${match(1)}", "Tags": ["${match(2)}", "${name.suffix}x"]}}"#,
        )
        .unwrap();
        let mut v = def.clone();
        render(&mut v, "geo-web-", "geo-");
        assert_eq!(v["Service"]["Service"], "web");
        assert_eq!(v["Service"]["Tags"], json!(["web-x"]), "the empty tag removed");
        assert_eq!(v["Name"], "geo-");
    }
}
