//! echo-service: an HTTP echo server that registers itself in the catalog with a TTL check
//! ([`mesh_sdk::registry`]) and calls its peers through client-side load balancing
//! ([`mesh_sdk::endpoints`]).
//!
//! Routes:
//! - `GET /echo?msg=hi` answers `{"id": "<this instance>", "msg": "hi"}`.
//! - `GET /peers` calls `/echo` on another healthy instance of the service (chosen by
//!   power-of-two-choices, this instance excluded) and answers what it said; 503 when there is no
//!   other healthy instance, 502 when the call fails (and the failure is reported, so a peer
//!   that keeps failing is ejected for a while).
//! - `GET /peers/known` lists the healthy instances this one knows of (kept current by a
//!   blocking-query watch, not polling).
//!
//! Run two of them against `mesh dev` (its Consul API is on the same port as Marathon's):
//!
//! ```text
//! cargo run -p mesh-sdk --example echo-service -- --consul 127.0.0.1:8080 --port 7001
//! cargo run -p mesh-sdk --example echo-service -- --consul 127.0.0.1:8080 --port 7002
//! curl 127.0.0.1:7001/peers     # {"from":"echo-7001","peer":"echo-7002","reply":{...}}
//! ```
//!
//! Kill one with SIGKILL and its TTL check expires: within a TTL the other stops seeing it.
//! Stop one with SIGTERM or Ctrl-C and it deregisters at once.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use mesh_sdk::consul::{Check, ConsulClient, ServiceRegistration};
use mesh_sdk::endpoints::{Endpoints, EndpointsOptions};
use mesh_sdk::registry::Registration;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(about = "HTTP echo server that registers itself and calls its peers")]
struct Args {
    /// Consul (or mesh) HTTP address.
    #[arg(long, env = "CONSUL_HTTP_ADDR", default_value = "127.0.0.1:8500")]
    consul: String,
    /// Service name.
    #[arg(long, env = "ECHO_SERVICE", default_value = "echo")]
    name: String,
    /// Instance id (default: <name>-<port>).
    #[arg(long, env = "ECHO_ID")]
    id: Option<String>,
    /// Address to listen on and register.
    #[arg(long, env = "ECHO_ADDRESS", default_value = "127.0.0.1")]
    address: String,
    /// Port to listen on (0: any free port).
    #[arg(long, env = "ECHO_PORT", default_value_t = 0)]
    port: u16,
    /// TTL of the check, in seconds; the instance reports in every third of it.
    #[arg(long, env = "ECHO_TTL", default_value_t = 3.0)]
    ttl: f64,
    /// Tags to register with (and to require of peers); may repeat.
    #[arg(long = "tag")]
    tags: Vec<String>,
}

struct App {
    id: String,
    endpoints: Endpoints,
    http: reqwest::Client,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("echo-service: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind((args.address.as_str(), args.port)).await?;
    let port = listener.local_addr()?.port();
    let id = args.id.clone().unwrap_or_else(|| format!("{}-{port}", args.name));
    println!("echo-service: {id} listening on {}:{port}", args.address);

    let consul = ConsulClient::new(&args.consul)?;
    let ttl = Duration::from_secs_f64(args.ttl.max(0.1));
    let mut service = ServiceRegistration::new(&args.name, port)
        .id(&id)
        .address(&args.address)
        .check(Check::ttl(ttl).name(format!("{id} heartbeat")).deregister_critical_after(Duration::from_secs(60)));
    for t in &args.tags {
        service = service.tag(t);
    }
    let registration = Registration::register(&consul, service).await?;
    println!(
        "echo-service: registered {id} as {} with TTL check {} ({}s)",
        args.name,
        registration.ttl_check_ids().join(","),
        args.ttl
    );

    let mut opts = EndpointsOptions::default();
    for t in &args.tags {
        opts = opts.tag(t);
    }
    let endpoints = Endpoints::watch(&consul, &args.name, opts).await?;
    let app = Arc::new(App {
        id: id.clone(),
        endpoints,
        http: reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?,
    });

    // Say whenever the set of healthy instances changes.
    {
        let app = app.clone();
        let mut updates = app.endpoints.subscribe();
        tokio::spawn(async move {
            loop {
                let ids: Vec<String> = app.endpoints.instances().into_iter().map(|i| i.id).collect();
                println!("echo-service: {} healthy instances of {}: {ids:?}", app.id, app.endpoints.service());
                if updates.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    let router = Router::new()
        .route("/", get(|State(app): State<Arc<App>>| async move { format!("echo-service {}\n", app.id) }))
        .route("/echo", get(echo))
        .route("/peers", get(peers))
        .route("/peers/known", get(known))
        .with_state(app);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    registration.shutdown().await?;
    println!("echo-service: {id} deregistered; bye");
    Ok(())
}

async fn echo(State(app): State<Arc<App>>, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    Json(json!({"id": app.id, "msg": q.get("msg").cloned().unwrap_or_default()}))
}

async fn peers(State(app): State<Arc<App>>) -> Response {
    let Some(lease) = app.endpoints.pick_where(|i| i.id != app.id) else {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"from": app.id, "error": "no healthy peer"})))
            .into_response();
    };
    let peer = lease.instance().id.clone();
    let url = format!("http://{}/echo", lease.authority());
    let msg = format!("hello from {}", app.id);
    let reply = async {
        let r = app.http.get(&url).query(&[("msg", &msg)]).send().await?.error_for_status()?;
        r.json::<Value>().await
    }
    .await;
    match reply {
        Ok(reply) => {
            lease.success();
            println!("echo-service: {} -> {peer}: ok", app.id);
            Json(json!({"from": app.id, "peer": peer, "reply": reply})).into_response()
        }
        Err(e) => {
            lease.failure();
            println!("echo-service: {} -> {peer}: failed: {e}", app.id);
            (StatusCode::BAD_GATEWAY, Json(json!({"from": app.id, "peer": peer, "error": e.to_string()})))
                .into_response()
        }
    }
}

async fn known(State(app): State<Arc<App>>) -> Json<Value> {
    let list: Vec<Value> = app
        .endpoints
        .instances()
        .into_iter()
        .map(|i| json!({"id": i.id, "address": i.address, "port": i.port, "datacenter": i.datacenter}))
        .collect();
    Json(json!({"service": app.endpoints.service(), "instances": list}))
}
