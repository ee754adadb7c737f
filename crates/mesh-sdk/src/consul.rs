//! A small client of the Consul v1 HTTP API (mesh serves it; so does Consul): the agent calls
//! that [`registry`](crate::registry) needs and the health query that
//! [`endpoints`](crate::endpoints) watches with blocking queries.

use reqwest::{Method, RequestBuilder};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// What went wrong talking to Consul.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsulError {
    /// An error status, with Consul's plain-text message (e.g. 500 `No path to datacenter`).
    #[error("Consul answered {status}: {message}")]
    Status {
        /// The status code.
        status: u16,
        /// The body.
        message: String,
    },
    /// The request did not get an answer.
    #[error("cannot reach Consul: {0}")]
    Transport(#[from] reqwest::Error),
    /// An answer that is not what the API promises.
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A blocking endpoint answered without a valid `X-Consul-Index`.
    #[error("no X-Consul-Index in the answer of {0}")]
    MissingIndex(String),
    /// The address is not valid.
    #[error("invalid Consul address {0:?}")]
    Url(String),
}

impl ConsulError {
    /// The HTTP status, for error answers.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConsulError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A Consul HTTP API client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: reqwest::Url,
    token: Option<String>,
    timeout: Duration,
}

impl ConsulClient {
    /// A client of the agent at `addr`: `http://127.0.0.1:8500`, or `127.0.0.1:8500` as in
    /// `CONSUL_HTTP_ADDR`.
    pub fn new(addr: &str) -> Result<Self, ConsulError> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?;
        Self::with_http_client(addr, http)
    }

    /// A client of the agent at `addr` that sends through `http`.
    pub fn with_http_client(addr: &str, http: reqwest::Client) -> Result<Self, ConsulError> {
        let full = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
        let base = reqwest::Url::parse(full.trim_end_matches('/')).map_err(|_| ConsulError::Url(addr.to_owned()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(ConsulError::Url(addr.to_owned()));
        }
        Ok(ConsulClient { http, base, token: None, timeout: Duration::from_secs(30) })
    }

    /// A client from the environment: `CONSUL_HTTP_ADDR` (default `127.0.0.1:8500`) and
    /// `CONSUL_HTTP_TOKEN`.
    pub fn from_env() -> Result<Self, ConsulError> {
        let addr = std::env::var("CONSUL_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8500".into());
        let mut c = Self::new(&addr)?;
        c.token = std::env::var("CONSUL_HTTP_TOKEN").ok().filter(|t| !t.is_empty());
        Ok(c)
    }

    /// Send `X-Consul-Token: token` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// A request to `segments` joined as path segments (each percent-encoded).
    fn request(&self, method: Method, segments: &[&str], timeout: Duration) -> RequestBuilder {
        let mut url = self.base.clone();
        if let Ok(mut p) = url.path_segments_mut() {
            p.pop_if_empty().extend(segments);
        }
        let mut req = self.http.request(method, url).timeout(timeout);
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        req
    }

    async fn send(&self, req: RequestBuilder) -> Result<reqwest::Response, ConsulError> {
        let resp = req.send().await?;
        let status = resp.status();
        if !status.is_success() {
            let message = resp.text().await.unwrap_or_default().trim().to_owned();
            return Err(ConsulError::Status { status: status.as_u16(), message });
        }
        Ok(resp)
    }

    /// `PUT /v1/agent/service/register`: register (or replace) a service instance on the agent.
    pub async fn register_service(&self, service: &ServiceRegistration) -> Result<(), ConsulError> {
        let req = self.request(Method::PUT, &["v1", "agent", "service", "register"], self.timeout).json(service);
        self.send(req).await.map(|_| ())
    }

    /// `PUT /v1/agent/service/deregister/<id>`: remove a service instance and its checks.
    pub async fn deregister_service(&self, service_id: &str) -> Result<(), ConsulError> {
        let req = self.request(Method::PUT, &["v1", "agent", "service", "deregister", service_id], self.timeout);
        self.send(req).await.map(|_| ())
    }

    /// `PUT /v1/agent/check/{pass,warn,fail}/<id>`: set a TTL check's status (and reset its clock).
    pub async fn update_ttl(&self, check_id: &str, status: CheckStatus, note: Option<&str>) -> Result<(), ConsulError> {
        let verb = match status {
            CheckStatus::Passing => "pass",
            CheckStatus::Warning => "warn",
            CheckStatus::Critical => "fail",
        };
        let mut req = self.request(Method::PUT, &["v1", "agent", "check", verb, check_id], self.timeout);
        if let Some(n) = note {
            req = req.query(&[("note", n)]);
        }
        self.send(req).await.map(|_| ())
    }

    /// `GET /v1/catalog/datacenters`: every datacenter the servers know through the WAN pool,
    /// nearest first (the agent's own first: its distance is zero).
    pub async fn datacenters(&self) -> Result<Vec<String>, ConsulError> {
        let req = self.request(Method::GET, &["v1", "catalog", "datacenters"], self.timeout);
        let body = self.send(req).await?.bytes().await?;
        serde_json::from_slice(&body)
            .map_err(|source| ConsulError::Decode { what: "/v1/catalog/datacenters".into(), source })
    }

    /// `GET /v1/health/service/<name>`: the instances of a service with their checks, and the
    /// `X-Consul-Index` of the answer. With `query.index`, a blocking query.
    pub async fn health_service(
        &self,
        name: &str,
        query: &HealthQuery,
    ) -> Result<(Vec<ServiceEntry>, u64), ConsulError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if query.passing {
            q.push(("passing", "1".into()));
        }
        for t in &query.tags {
            q.push(("tag", t.clone()));
        }
        if let Some(dc) = &query.datacenter {
            q.push(("dc", dc.clone()));
        }
        let mut timeout = self.timeout;
        if let Some(index) = query.index {
            q.push(("index", index.to_string()));
            let wait = query.wait.unwrap_or(Duration::from_secs(300));
            q.push(("wait", go_duration(wait)));
            // The server may hold the request for wait + wait/16.
            timeout = wait + wait / 16 + Duration::from_secs(10);
        }
        let req = self.request(Method::GET, &["v1", "health", "service", name], timeout).query(&q);
        let resp = self.send(req).await?;
        let what = || format!("/v1/health/service/{name}");
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| ConsulError::MissingIndex(what()))?;
        let body = resp.bytes().await?;
        let entries = serde_json::from_slice(&body).map_err(|source| ConsulError::Decode { what: what(), source })?;
        Ok((entries, index))
    }
}

/// Parameters of [`ConsulClient::health_service`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct HealthQuery {
    /// Only instances whose checks all pass (`?passing=1`).
    pub passing: bool,
    /// Only instances with all of these tags (`?tag=`, repeated).
    pub tags: Vec<String>,
    /// Ask another datacenter (`?dc=`).
    pub datacenter: Option<String>,
    /// Block until the result's index passes this (`?index=`).
    pub index: Option<u64>,
    /// How long to block at most (`?wait=`; the server's default is 5 minutes).
    pub wait: Option<Duration>,
}

/// The status of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CheckStatus {
    /// Healthy.
    Passing,
    /// Degraded (still returned by DNS and by `passing`-less queries).
    Warning,
    /// Unhealthy: left out of every healthy answer.
    Critical,
}

/// A service instance to register with the agent (`PUT /v1/agent/service/register`).
///
/// ```
/// use mesh_sdk::consul::{Check, ServiceRegistration};
/// use std::time::Duration;
/// let reg = ServiceRegistration::new("web", 8080).id("web-1").address("10.0.0.5").tag("v2")
///     .check(Check::ttl(Duration::from_secs(10)).deregister_critical_after(Duration::from_secs(90)));
/// let json = serde_json::to_value(&reg).unwrap();
/// assert_eq!(json["Checks"][0]["TTL"], "10s");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
#[non_exhaustive]
pub struct ServiceRegistration {
    /// Instance id (default: the name). Unique on the agent.
    #[serde(rename = "ID", skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Service name.
    pub name: String,
    /// Tags.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Address (default: the agent's node address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Port.
    pub port: u16,
    /// Metadata.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Checks. Without an explicit id, the agent names a single check `service:<id>` and
    /// several `service:<id>:1`, `service:<id>:2`, ...
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
}

impl ServiceRegistration {
    /// An instance of service `name` on `port`.
    pub fn new(name: impl Into<String>, port: u16) -> Self {
        ServiceRegistration { name: name.into(), port, ..Default::default() }
    }
    /// Set the instance id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
    /// Set the address.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }
    /// Add a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
    /// Add a metadata entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }
    /// Add a check.
    pub fn check(mut self, check: Check) -> Self {
        self.checks.push(check);
        self
    }
    /// The instance id the agent uses: `ID`, or the name.
    pub fn service_id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.name)
    }
    /// The id of each check, in order, as the agent assigns them.
    pub fn check_ids(&self) -> Vec<String> {
        let sid = self.service_id();
        let n = self.checks.len();
        self.checks
            .iter()
            .enumerate()
            .map(|(i, c)| match &c.check_id {
                Some(id) => id.clone(),
                None if n == 1 => format!("service:{sid}"),
                None => format!("service:{sid}:{}", i + 1),
            })
            .collect()
    }
}

/// A check of a service instance: HTTP, TCP or TTL.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Check {
    /// Check id (default: assigned by the agent, see [`ServiceRegistration::check_ids`]).
    #[serde(rename = "CheckID", skip_serializing_if = "Option::is_none")]
    pub check_id: Option<String>,
    /// Name.
    #[serde(rename = "Name", skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// HTTP check: the URL to GET (2xx passes, 429 warns).
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// HTTP method (default GET).
    #[serde(rename = "Method", skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// TCP check: `host:port` to connect to.
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// TTL check: critical unless updated within this time (Go duration, e.g. `10s`).
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// How often HTTP and TCP checks run.
    #[serde(rename = "Interval", skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Time limit of one HTTP or TCP check.
    #[serde(rename = "Timeout", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Deregister the service when this check has been critical this long.
    #[serde(rename = "DeregisterCriticalServiceAfter", skip_serializing_if = "Option::is_none")]
    pub deregister_critical_service_after: Option<String>,
    /// Initial status (the agent's default is critical).
    #[serde(rename = "Status", skip_serializing_if = "Option::is_none")]
    pub status: Option<CheckStatus>,
    /// Notes.
    #[serde(rename = "Notes", skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

impl Check {
    /// A TTL check: the service reports in (see [`Registration`](crate::registry::Registration),
    /// which does it from a background task).
    pub fn ttl(ttl: Duration) -> Self {
        Check { ttl: Some(go_duration(ttl)), ..Default::default() }
    }
    /// An HTTP check of `url` every `interval`.
    pub fn http(url: impl Into<String>, interval: Duration) -> Self {
        Check { http: Some(url.into()), interval: Some(go_duration(interval)), ..Default::default() }
    }
    /// A TCP check of `host:port` every `interval`.
    pub fn tcp(addr: impl Into<String>, interval: Duration) -> Self {
        Check { tcp: Some(addr.into()), interval: Some(go_duration(interval)), ..Default::default() }
    }
    /// Set the time limit of one check.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(go_duration(timeout));
        self
    }
    /// Deregister the service after this check has been critical for `after`.
    pub fn deregister_critical_after(mut self, after: Duration) -> Self {
        self.deregister_critical_service_after = Some(go_duration(after));
        self
    }
    /// Set the initial status.
    pub fn status(mut self, status: CheckStatus) -> Self {
        self.status = Some(status);
        self
    }
    /// Set the check id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.check_id = Some(id.into());
        self
    }
    /// Set the name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The TTL, for TTL checks.
    pub fn ttl_duration(&self) -> Option<Duration> {
        self.ttl.as_deref().and_then(parse_go_duration)
    }
}

/// One entry of `/v1/health/service/<name>`: an instance, its node and its checks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[non_exhaustive]
pub struct ServiceEntry {
    /// The node.
    pub node: NodeInfo,
    /// The instance.
    pub service: ServiceInfo,
    /// Its checks and its node's.
    #[serde(default)]
    pub checks: Vec<CheckInfo>,
}

impl ServiceEntry {
    /// The address to connect to: the service's, or its node's when it has none.
    pub fn address(&self) -> &str {
        if self.service.address.is_empty() { &self.node.address } else { &self.service.address }
    }
    /// The worst status of its checks (passing when it has none).
    pub fn status(&self) -> CheckStatus {
        let mut worst = CheckStatus::Passing;
        for c in &self.checks {
            match c.status.as_str() {
                "critical" | "maintenance" => return CheckStatus::Critical,
                "warning" => worst = CheckStatus::Warning,
                _ => {}
            }
        }
        worst
    }
}

/// The node of a [`ServiceEntry`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[non_exhaustive]
pub struct NodeInfo {
    /// Node name.
    #[serde(default)]
    pub node: String,
    /// Node address.
    #[serde(default)]
    pub address: String,
    /// Datacenter.
    #[serde(default)]
    pub datacenter: String,
}

/// The service of a [`ServiceEntry`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[non_exhaustive]
pub struct ServiceInfo {
    /// Instance id.
    #[serde(rename = "ID", default)]
    pub id: String,
    /// Service name.
    #[serde(default)]
    pub service: String,
    /// Tags.
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    /// Address (empty: the node's).
    #[serde(default)]
    pub address: String,
    /// Port.
    #[serde(default)]
    pub port: u16,
    /// Metadata.
    #[serde(default, deserialize_with = "null_as_default")]
    pub meta: BTreeMap<String, String>,
}

/// A check of a [`ServiceEntry`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[non_exhaustive]
pub struct CheckInfo {
    /// Check id.
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
    /// `passing`, `warning` or `critical`.
    #[serde(default)]
    pub status: String,
    /// The instance it checks (empty for node checks).
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    /// Output of the last run.
    #[serde(default)]
    pub output: String,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A duration in Go's notation, as Consul takes it: `10s`, `1500ms`, `5m`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) || ms == 0 {
        if ms == 0 && d.as_nanos() > 0 { format!("{}ns", d.as_nanos()) } else { format!("{ms}ms") }
    } else if ms.is_multiple_of(60_000) && ms >= 60_000 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Parse a Go duration (`1h2m3.5s`, `500ms`, `10s`; units ns, us, µs, ms, s, m, h).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(go_duration(Duration::ZERO), "0ms");
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("x"), None);
    }

    #[test]
    fn check_ids_follow_the_agent() {
        let one = ServiceRegistration::new("web", 80).id("web-1").check(Check::ttl(Duration::from_secs(5)));
        assert_eq!(one.check_ids(), ["service:web-1"]);
        let two = ServiceRegistration::new("web", 80)
            .check(Check::ttl(Duration::from_secs(5)))
            .check(Check::http("http://x/", Duration::from_secs(1)));
        assert_eq!(two.check_ids(), ["service:web:1", "service:web:2"]);
        let named = two.clone().check(Check::ttl(Duration::from_secs(1)).id("mine"));
        assert_eq!(named.check_ids(), ["service:web:1", "service:web:2", "mine"]);
    }

    #[test]
    fn registration_json() {
        let r = ServiceRegistration::new("web", 8080).id("w1").check(
            Check::http("http://127.0.0.1:8080/health", Duration::from_secs(1))
                .timeout(Duration::from_millis(500))
                .deregister_critical_after(Duration::from_secs(60))
                .status(CheckStatus::Passing),
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"ID": "w1", "Name": "web", "Port": 8080, "Checks": [{
                "HTTP": "http://127.0.0.1:8080/health", "Interval": "1s", "Timeout": "500ms",
                "DeregisterCriticalServiceAfter": "1m", "Status": "passing"}]})
        );
    }

    #[test]
    fn health_entries() {
        let v = serde_json::json!([{
            "Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1", "Meta": null},
            "Service": {"ID": "w1", "Service": "web", "Tags": null, "Address": "", "Port": 80, "Meta": null},
            "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "service:w1", "Status": "warning", "ServiceID": "w1"}]
        }]);
        let e: Vec<ServiceEntry> = serde_json::from_value(v).unwrap();
        assert_eq!(e[0].address(), "10.0.0.1");
        assert_eq!(e[0].status(), CheckStatus::Warning);
        assert!(e[0].service.tags.is_empty());
    }
}
