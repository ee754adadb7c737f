//! Marathon health checks: their definitions (with Marathon's defaults and validation), and
//! the per-check state machine that turns probe results into a task's health.
//!
//! Checks run on the agent that runs the task, never centrally (the scaling problem of
//! Marathon's leader-side checks). The agent probes; [`CheckState`] decides, without I/O, what
//! a result means (grace period, consecutive failures) and when the control side must hear.

use crate::model::Millis;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

/// Check protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// HTTP GET; healthy on 200–399.
    Http,
    /// HTTPS GET (TLS is not verified); healthy on 200–399.
    Https,
    /// A TCP connect.
    Tcp,
    /// A shell command; healthy on exit 0.
    Command,
}

/// A resolved health check of one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// Protocol.
    pub protocol: Protocol,
    /// Marathon's protocol name as given (`HTTP`, `MESOS_HTTP`, ...).
    pub protocol_name: String,
    /// HTTP path.
    pub path: String,
    /// Host port to probe (resolved from `port` or `portIndex`).
    pub port: Option<u16>,
    /// Command for `COMMAND` checks.
    pub command: Option<String>,
    /// Failures in this period after the task starts are ignored until the first success.
    pub grace_period: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Kill the task after this many consecutive failures (0 = never).
    pub max_consecutive_failures: u32,
    /// Wait this long before the first probe.
    pub delay: Duration,
    /// Ignore HTTP 1xx answers (count them neither as healthy nor as unhealthy).
    pub ignore_http1xx: bool,
}

fn num(v: &Value, key: &str, default: f64) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// Validate the `healthChecks` of an app; returns (path, error) pairs.
pub fn validate(checks: &[Value]) -> Vec<(String, String)> {
    let mut bad = Vec::new();
    let mut mesos = 0;
    for (i, c) in checks.iter().enumerate() {
        let p = format!("/healthChecks({i})");
        let Some(o) = c.as_object() else {
            bad.push((p, "error.expected.jsobject".into()));
            continue;
        };
        let proto = o.get("protocol").and_then(Value::as_str).unwrap_or("HTTP");
        if !["HTTP", "HTTPS", "TCP", "COMMAND", "MESOS_HTTP", "MESOS_HTTPS", "MESOS_TCP"].contains(&proto) {
            bad.push((format!("{p}/protocol"), format!("unknown health check protocol {proto}")));
        }
        if proto.starts_with("MESOS_") || proto == "COMMAND" {
            mesos += 1;
        }
        if proto == "COMMAND" && o.get("command").and_then(|c| c.get("value")).and_then(Value::as_str).is_none() {
            bad.push((format!("{p}/command"), "COMMAND checks need command.value".into()));
        }
        for key in ["gracePeriodSeconds", "intervalSeconds", "timeoutSeconds", "maxConsecutiveFailures", "delaySeconds"]
        {
            if let Some(v) = o.get(key)
                && !v.as_f64().is_some_and(|x| x >= 0.0 && x.is_finite())
            {
                bad.push((format!("{p}/{key}"), "must be a number, 0 or more".into()));
            }
        }
        if num(c, "intervalSeconds", 60.0) <= 0.0 {
            bad.push((format!("{p}/intervalSeconds"), "must be more than 0".into()));
        }
    }
    if mesos > 1 {
        bad.push(("/healthChecks".into(), "at most one Mesos health check is allowed".into()));
    }
    bad
}

/// Resolve an app's `healthChecks` for a task with these host ports.
pub fn resolve(checks: &[Value], host_ports: &[u16]) -> Vec<CheckSpec> {
    checks
        .iter()
        .map(|c| {
            let name = c.get("protocol").and_then(Value::as_str).unwrap_or("HTTP").to_owned();
            let protocol = match name.trim_start_matches("MESOS_") {
                "HTTPS" => Protocol::Https,
                "TCP" => Protocol::Tcp,
                "COMMAND" => Protocol::Command,
                _ => Protocol::Http,
            };
            let port = c.get("port").and_then(Value::as_u64).filter(|p| *p > 0).map(|p| p as u16).or_else(|| {
                let i = c.get("portIndex").and_then(Value::as_u64).unwrap_or(0) as usize;
                host_ports.get(i).copied()
            });
            let secs = |k: &str, d: f64| Duration::from_secs_f64(num(c, k, d).clamp(0.0, 86_400.0));
            CheckSpec {
                protocol,
                protocol_name: name,
                path: c.get("path").and_then(Value::as_str).unwrap_or("/").to_owned(),
                port,
                command: c.get("command").and_then(|c| c.get("value")).and_then(Value::as_str).map(str::to_owned),
                grace_period: secs("gracePeriodSeconds", 300.0),
                interval: secs("intervalSeconds", 60.0).max(Duration::from_millis(100)),
                timeout: secs("timeoutSeconds", 20.0).max(Duration::from_millis(50)),
                max_consecutive_failures: num(c, "maxConsecutiveFailures", 3.0) as u32,
                delay: secs("delaySeconds", 15.0),
                ignore_http1xx: c.get("ignoreHttp1xx").and_then(Value::as_bool).unwrap_or(false),
            }
        })
        .collect()
}

/// Marathon's `healthCheckResults` entry for one check of one task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Whether the task counts as healthy by this check.
    pub alive: bool,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// First success.
    pub first_success: Option<Millis>,
    /// Last success.
    pub last_success: Option<Millis>,
    /// Last failure.
    pub last_failure: Option<Millis>,
    /// Why the last failure failed.
    pub last_failure_cause: Option<String>,
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq)]
pub enum Probe {
    /// Healthy.
    Pass,
    /// Unhealthy, with a cause.
    Fail(String),
    /// Neither (an ignored HTTP 1xx).
    Ignore,
}

/// The state of one check of one task: probe results in, what to report out.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckState {
    /// The current result.
    pub result: CheckResult,
    started_at: Millis,
    grace: Duration,
}

/// What a probe result means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing the control side needs to hear.
    Quiet,
    /// Health changed or a counted failure happened: report the result.
    Report,
}

impl CheckState {
    /// A check of a task that started at `started_at`.
    pub fn new(spec: &CheckSpec, started_at: Millis) -> Self {
        Self { result: CheckResult::default(), started_at, grace: spec.grace_period }
    }

    /// Record a probe at `now`.
    pub fn record(&mut self, probe: Probe, now: Millis) -> Outcome {
        match probe {
            Probe::Ignore => Outcome::Quiet,
            Probe::Pass => {
                let changed = !self.result.alive || self.result.consecutive_failures > 0;
                self.result.alive = true;
                self.result.consecutive_failures = 0;
                self.result.first_success.get_or_insert(now);
                self.result.last_success = Some(now);
                if changed { Outcome::Report } else { Outcome::Quiet }
            }
            Probe::Fail(cause) => {
                let in_grace = self.result.first_success.is_none()
                    && now.saturating_sub(self.started_at) < self.grace.as_millis() as Millis;
                self.result.last_failure = Some(now);
                self.result.last_failure_cause = Some(cause);
                if in_grace {
                    return Outcome::Quiet;
                }
                self.result.alive = false;
                self.result.consecutive_failures += 1;
                Outcome::Report
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_port_resolution() {
        let c = resolve(&[json!({"protocol": "MESOS_HTTP", "portIndex": 1}), json!({})], &[31000, 31001]);
        assert_eq!(c[0].protocol, Protocol::Http);
        assert_eq!(c[0].port, Some(31001));
        assert_eq!(c[1].port, Some(31000));
        assert_eq!(c[1].grace_period, Duration::from_secs(300));
        assert_eq!(c[1].interval, Duration::from_secs(60));
        assert_eq!(c[1].timeout, Duration::from_secs(20));
        assert_eq!(c[1].max_consecutive_failures, 3);
        assert_eq!(c[1].path, "/");
        let c = resolve(&[json!({"protocol": "TCP", "port": 8080})], &[31000]);
        assert_eq!((c[0].protocol, c[0].port), (Protocol::Tcp, Some(8080)));
    }

    #[test]
    fn validation() {
        assert!(validate(&[json!({"protocol": "HTTP"})]).is_empty());
        assert!(!validate(&[json!({"protocol": "GOPHER"})]).is_empty());
        assert!(!validate(&[json!({"protocol": "COMMAND"})]).is_empty());
        // Marathon allows a timeout as long as the interval (the rule is only for readiness checks).
        assert!(validate(&[json!({"intervalSeconds": 10, "timeoutSeconds": 10})]).is_empty());
        assert!(!validate(&[json!({"intervalSeconds": 0})]).is_empty());
        assert!(!validate(&[json!({"protocol": "MESOS_TCP"}), json!({"protocol": "MESOS_HTTP"})]).is_empty());
    }

    #[test]
    fn grace_period_then_consecutive_failures() {
        let spec = &resolve(&[json!({"gracePeriodSeconds": 10})], &[1])[0];
        let mut s = CheckState::new(spec, 0);
        assert_eq!(s.record(Probe::Fail("refused".into()), 1_000), Outcome::Quiet, "in grace");
        assert_eq!(s.result.consecutive_failures, 0);
        assert_eq!(s.record(Probe::Pass, 2_000), Outcome::Report);
        assert!(s.result.alive);
        assert_eq!(s.record(Probe::Pass, 3_000), Outcome::Quiet);
        // after a first success, grace no longer applies
        assert_eq!(s.record(Probe::Fail("500".into()), 4_000), Outcome::Report);
        assert_eq!(s.record(Probe::Fail("500".into()), 5_000), Outcome::Report);
        assert_eq!((s.result.alive, s.result.consecutive_failures), (false, 2));
        assert_eq!(s.result.last_failure_cause.as_deref(), Some("500"));
        assert_eq!(s.record(Probe::Ignore, 6_000), Outcome::Quiet);
        // grace expires without a success
        let mut s = CheckState::new(spec, 0);
        assert_eq!(s.record(Probe::Fail("x".into()), 11_000), Outcome::Report);
    }
}
