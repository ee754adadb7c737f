//! The DNS server: a hickory-server [`RequestHandler`] over the published catalog.
//!
//! Each request loads the current [`CatalogState`] from the `ArcSwap` (lock-free; nothing is held
//! across IO), builds the answer with the pure [`mesh_core::dns::build_answer`] and sends it with
//! the `aa` flag set and the request's EDNS mirrored (so EDNS clients get answers larger than 512
//! bytes over UDP). Every request that hickory can attribute to a client gets a response: FORMERR for
//! a malformed question section, NOTIMP for other opcodes, BADVERS for EDNS versions above 0, SERVFAIL
//! if building the answer fails. A UDP answer that does not fit is truncated by hickory with the TC
//! bit set, so clients retry over TCP.

use arc_swap::ArcSwap;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use mesh_core::catalog::CatalogState;
use mesh_core::dns::{DnsAnswer, DnsConfig, build_answer};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, warn};

/// How long an idle TCP connection is kept open.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses buffered per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 64;

/// Answers DNS queries from the catalog currently published in an `ArcSwap`.
pub struct CatalogDns {
    catalog: Arc<ArcSwap<CatalogState>>,
    config: DnsConfig,
}

impl CatalogDns {
    /// A handler reading `catalog` and answering for `config.domain`.
    pub fn new(catalog: Arc<ArcSwap<CatalogState>>, config: DnsConfig) -> Self {
        Self { catalog, config }
    }

    /// The answer to one question from the current catalog; SERVFAIL if building it panics.
    fn answer(&self, query: &hickory_server::proto::op::Query) -> DnsAnswer {
        let unix_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let build = || {
            let catalog = self.catalog.load();
            build_answer(&catalog, query.name(), query.query_type(), &self.config, unix_time, &mut rand::rng())
        };
        std::panic::catch_unwind(AssertUnwindSafe(build)).unwrap_or_else(|_| {
            warn!(name = %query.name(), qtype = %query.query_type(), "DNS answer building panicked");
            DnsAnswer {
                response_code: ResponseCode::ServFail,
                answers: Vec::new(),
                authorities: Vec::new(),
                additionals: Vec::new(),
            }
        })
    }
}

/// The EDNS of our response: mirrors the request's (payload size at least 512, version 0).
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut edns = Edns::new();
        edns.set_max_payload(req.max_payload().max(512));
        edns.set_version(0);
        edns
    })
}

/// Sends a response with no records and `code`.
async fn send_error<R: ResponseHandler>(
    request: &Request,
    edns: Option<&Edns>,
    code: ResponseCode,
    mut response_handle: R,
) -> ResponseInfo {
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = edns {
        builder.edns(edns);
    }
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.response_code = code;
    let response = builder.build(metadata, &[], &[], &[], &[]);
    send(request, response_handle.send_response(response).await)
}

/// The `ResponseInfo` of a sent response, or a SERVFAIL one if sending failed.
fn send(request: &Request, sent: Result<ResponseInfo, hickory_server::net::NetError>) -> ResponseInfo {
    sent.unwrap_or_else(|error| {
        warn!(%error, id = request.metadata.id, "failed to send DNS response");
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = ResponseCode::ServFail;
        Header { metadata, counts: HeaderCounts::default() }.into()
    })
}

#[async_trait::async_trait]
impl RequestHandler for CatalogDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let edns = response_edns(request);
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return send_error(request, edns.as_ref(), ResponseCode::BADVERS, response_handle).await;
        }
        if request.metadata.op_code != OpCode::Query {
            return send_error(request, edns.as_ref(), ResponseCode::NotImp, response_handle).await;
        }
        let Ok(info) = request.request_info() else {
            return send_error(request, edns.as_ref(), ResponseCode::FormErr, response_handle).await;
        };
        let query = info.query.original();
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return send_error(request, edns.as_ref(), ResponseCode::Refused, response_handle).await;
        }
        let answer = self.answer(query);
        debug!(
            name = %query.name(), qtype = %query.query_type(), rcode = %answer.response_code,
            answers = answer.answers.len(), "DNS query"
        );

        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.response_code = answer.response_code;
        let none: &[Record] = &[];
        let response =
            builder.build(metadata, answer.answers.iter(), answer.authorities.iter(), none, answer.additionals.iter());
        send(request, response_handle.send_response(response).await)
    }
}

/// A running DNS server (UDP and TCP) over the published catalog.
pub struct DnsServer {
    server: Server<CatalogDns>,
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
}

impl DnsServer {
    /// Serves DNS on the already-bound `udp` socket and `tcp` listener (normally the same port),
    /// answering from whatever catalog is in `catalog` at the time of each query.
    pub async fn start(
        udp: tokio::net::UdpSocket,
        tcp: tokio::net::TcpListener,
        catalog: Arc<ArcSwap<CatalogState>>,
        config: DnsConfig,
    ) -> std::io::Result<DnsServer> {
        let udp_addr = udp.local_addr()?;
        let tcp_addr = tcp.local_addr()?;
        let mut server = Server::new(CatalogDns::new(catalog, config));
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        debug!(%udp_addr, %tcp_addr, "DNS server started");
        Ok(DnsServer { server, udp_addr, tcp_addr })
    }

    /// The UDP address served.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The TCP address served.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Stops accepting queries and waits for the listeners to finish.
    pub async fn shutdown(mut self) {
        if let Err(error) = self.server.shutdown_gracefully().await {
            warn!(%error, "DNS server shut down with an error");
        }
    }
}
