//! The agent's health checker: probes the tasks of this node (HTTP, TCP, command) and reports
//! changes to the control side. The decisions (grace period, consecutive failures) are made by
//! [`mesh_core::health::CheckState`]; this module only owns the timers and sockets.
//!
//! HTTPS checks speak TLS (rustls) without verifying the task's certificate, as Marathon's
//! HTTPS checks do: tasks commonly serve self-signed certificates.

use crate::control::{ControlHandle, ControlMsg};
use mesh_core::health::{CheckSpec, CheckState, Outcome, Probe, Protocol};
use mesh_core::model::{Clock, Millis, TaskId};
use mesh_core::proto::ToControl;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::AbortHandle;

/// Runs the checks of the tasks on one agent.
pub struct HealthRunner {
    address: IpAddr,
    control: ControlHandle,
    /// The agent's clock: dates every result (the grace period and consecutive failures count
    /// from it).
    clock: Arc<dyn Clock>,
    running: HashMap<TaskId, Vec<AbortHandle>>,
}

impl HealthRunner {
    /// A runner probing tasks at `address` (the agent's address), dating results by `clock`.
    pub fn new(address: IpAddr, control: ControlHandle, clock: Arc<dyn Clock>) -> Self {
        Self { address, control, clock, running: HashMap::new() }
    }

    /// Start (or restart) the checks of a task.
    pub fn watch(&mut self, task_id: TaskId, checks: Vec<CheckSpec>, started_at: Millis) {
        self.unwatch(&task_id);
        let handles = checks
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let control = self.control.clone();
                let task = task_id.clone();
                let (address, clock) = (self.address, self.clock.clone());
                tokio::spawn(run_check(task, i, spec, started_at, address, control, clock)).abort_handle()
            })
            .collect();
        self.running.insert(task_id, handles);
    }

    /// Stop the checks of a task.
    pub fn unwatch(&mut self, task_id: &TaskId) {
        if let Some(hs) = self.running.remove(task_id) {
            for h in hs {
                h.abort();
            }
        }
    }
}

impl Drop for HealthRunner {
    fn drop(&mut self) {
        for hs in self.running.values() {
            for h in hs {
                h.abort();
            }
        }
    }
}

async fn run_check(
    task: TaskId,
    index: usize,
    spec: CheckSpec,
    started_at: Millis,
    address: IpAddr,
    control: ControlHandle,
    clock: Arc<dyn Clock>,
) {
    let mut state = CheckState::new(&spec, started_at);
    if spec.protocol_name.starts_with("MESOS_") {
        tokio::time::sleep(spec.delay).await;
    }
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match tokio::time::timeout(spec.timeout, probe(&spec, address)).await {
            Ok(p) => p,
            Err(_) => Probe::Fail(format!("timed out after {:?}", spec.timeout)),
        };
        if state.record(result, clock.now()) == Outcome::Report {
            let msg = ToControl::Health { task_id: task.clone(), check: index, result: state.result.clone() };
            if control.send(ControlMsg::FromAgent(msg)).await.is_err() {
                return;
            }
        }
    }
}

async fn probe(spec: &CheckSpec, address: IpAddr) -> Probe {
    let target = |port: u16| SocketAddr::new(address, port);
    match spec.protocol {
        Protocol::Command => {
            let Some(cmd) = &spec.command else { return Probe::Fail("no command".into()) };
            match tokio::process::Command::new("/bin/sh").arg("-c").arg(cmd).kill_on_drop(true).status().await {
                Ok(s) if s.success() => Probe::Pass,
                Ok(s) => Probe::Fail(format!("command exited with {s}")),
                Err(e) => Probe::Fail(format!("command failed to start: {e}")),
            }
        }
        Protocol::Https => {
            let Some(port) = spec.port else { return Probe::Fail("no port to check".into()) };
            match https_status(target(port), &spec.path).await {
                Ok(code) if (200..400).contains(&code) => Probe::Pass,
                Ok(code) if code < 200 && spec.ignore_http1xx => Probe::Ignore,
                Ok(code) => Probe::Fail(format!("HTTPS {code} from {}", spec.path)),
                Err(e) => Probe::Fail(format!("HTTPS check of port {port}: {e}")),
            }
        }
        Protocol::Tcp => {
            let Some(port) = spec.port else { return Probe::Fail("no port to check".into()) };
            match tokio::net::TcpStream::connect(target(port)).await {
                Ok(_) => Probe::Pass,
                Err(e) => Probe::Fail(format!("connect to port {port}: {e}")),
            }
        }
        Protocol::Http => {
            let Some(port) = spec.port else { return Probe::Fail("no port to check".into()) };
            match http_status(target(port), &spec.path).await {
                Ok(code) if (200..400).contains(&code) => Probe::Pass,
                Ok(code) if code < 200 && spec.ignore_http1xx => Probe::Ignore,
                Ok(code) => Probe::Fail(format!("HTTP {code} from {}", spec.path)),
                Err(e) => Probe::Fail(format!("HTTP check of port {port}: {e}")),
            }
        }
    }
}

/// A minimal HTTP/1.0 GET that returns the status code.
async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    get_status(s, addr, path).await
}

/// The same over TLS, accepting any certificate.
async fn https_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tls_connect(addr, tcp).await?;
    get_status(tls, addr, path).await
}

/// A TLS client session over `tcp` that accepts any certificate (signatures still checked).
pub(crate) async fn tls_connect(
    addr: SocketAddr,
    tcp: tokio::net::TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use std::sync::{Arc, OnceLock};
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Arc::new(config)
    });
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await
}

/// Marathon does not verify a task's certificate; neither does mesh. Signatures are still
/// checked, so the handshake is a real TLS handshake.
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn get_status<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<u16> {
    let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: mesh-health\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::health::resolve;
    use serde_json::json;

    /// An HTTPS server (python's http.server with a fresh self-signed certificate) on `port`,
    /// serving `dir`. Returns None when openssl or python3 is missing.
    fn https_server(dir: &std::path::Path, port: u16) -> Option<std::process::Child> {
        let cert = dir.join("cert.pem");
        let ok = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
            .arg("-keyout")
            .arg(&cert)
            .arg("-out")
            .arg(&cert)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let script = format!(
            "import http.server, ssl, functools\n\
             h = functools.partial(http.server.SimpleHTTPRequestHandler, directory={dir:?})\n\
             s = http.server.HTTPServer(('127.0.0.1', {port}), h)\n\
             c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain({cert:?})\n\
             s.socket = c.wrap_socket(s.socket, server_side=True)\n\
             s.serve_forever()\n",
            dir = dir.display().to_string(),
            cert = cert.display().to_string(),
        );
        std::process::Command::new("python3").arg("-c").arg(script).spawn().ok()
    }

    #[tokio::test]
    async fn https_checks_speak_tls_and_read_the_status() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("healthy"), "ok").unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let Some(mut server) = https_server(dir.path(), port) else {
            eprintln!("SKIP: openssl or python3 missing");
            return;
        };
        let ok = &resolve(&[json!({"protocol": "HTTPS", "path": "/healthy"})], &[port])[0];
        let missing = &resolve(&[json!({"protocol": "MESOS_HTTPS", "path": "/nope"})], &[port])[0];
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        // Wait (with a deadline) for the server to come up.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while probe(ok, addr).await != Probe::Pass {
            assert!(tokio::time::Instant::now() < deadline, "HTTPS check never passed");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        match probe(missing, addr).await {
            Probe::Fail(cause) => assert!(cause.contains("HTTPS 404"), "{cause}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        let _ = server.kill();
        let _ = server.wait();
        // A plain-TCP listener that does not speak TLS fails the check.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_port = plain.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = plain.accept().await {
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
            }
        });
        let spec = &resolve(&[json!({"protocol": "HTTPS"})], &[plain_port])[0];
        assert!(matches!(probe(spec, addr).await, Probe::Fail(_)));
    }
}
