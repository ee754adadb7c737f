//! Consul-style DNS for the catalog, as plain functions and values: no IO, no clock, no global
//! randomness. The server (`mesh-server`'s `dns` module) feeds it bytes and sends what it returns.
//!
//! **Grammar** ([`DnsZone::parse`]; case-insensitive, keywords scanned right to left as Consul does),
//! under the domain or the alternative domain (answers use whichever the query used):
//!
//! - `[<tag>.]<service>.service[.<dc>].<domain>` (the tag may contain dots),
//! - RFC 2782 `_<service>._<tag|tcp>[.service][.<dc>].<domain>` (`_tcp` means no tag filter; the
//!   `service` label may be left out only for SRV queries),
//! - `<node>.node[.<dc>].<domain>` (node names may contain dots),
//! - `<hex>.addr[.<dc>].<domain>` (8 hex digits for IPv4, 32 for IPv6; the dc is ignored),
//! - `<name>.query[.<dc>].<domain>` and RFC 2782 `_<name>._tcp.query.<domain>` (prepared queries),
//! - the apex `<domain>` (SOA and NS),
//! - reverse names `<a.b.c.d>.in-addr.arpa` and the 32 nibbles of `ip6.arpa` (PTR),
//!
//! where `<dc>` may also be written `<dc>.dc`.
//!
//! **Beyond this node's catalog**: names of another datacenter, prepared queries and (with
//! `failover_nearest`) plain service names with nothing answerable here are answered NXDOMAIN
//! with a [`RemoteAsk`] attached ([`DnsAnswer::remote`]); the server looks it up (its servers,
//! over the WAN) and [`DnsZone::answer_remote`] answers from what it found as that datacenter's
//! own zone would, records owned by the question.
//!
//! **Answers** ([`DnsZone::answer`]) come from a [`DnsIndex`], built once per published catalog
//! (reusing the entries of services that did not change), so a query is a hash lookup:
//!
//! - service A/AAAA/ANY: one record per instance (its own address, else its node's), addresses
//!   de-duplicated; SRV: priority 1, the instance's weight (Consul's `Weights.Passing`, or
//!   `Weights.Warning` in warning; 1 unless registered otherwise), the port, target `<node>.node.<dc>.<domain>.` (or
//!   `<hex>.addr.<dc>.<domain>.` when the instance has its own address), the target's address and
//!   node meta TXT records in Additional; instances with the same node, address and port once;
//! - instances in warning are answered, critical ones never; with `only_passing` only passing ones;
//! - node A/AAAA/ANY/TXT: the address, and node meta as RFC 1464 TXT records (`key=value`, the bare
//!   value for `rfc1035-` keys) in Answer for TXT/ANY and in Additional otherwise;
//! - apex SOA (`ns.<domain>. hostmaster.<domain>.`, serial = Unix time) and NS (the DNS server's
//!   nodes as `<node>.node.<dc>.<domain>.` with glue, else `ns.<domain>.`);
//! - PTR: node addresses first (`<node>.node.<dc>.<domain>.`), then service instance addresses
//!   (`<service>.service.<dc>.<domain>.`), always in the primary domain;
//! - answers shuffled with the caller's rng;
//! - NXDOMAIN for names that do not exist, unknown datacenters and services without an answerable
//!   instance; NOERROR without answers (NODATA) when the name exists but has no data of the asked
//!   type; both with the SOA in Authority (TTL and minimum `soa_min_ttl`); NOTIMP for zone
//!   transfers; names outside the domains, and reverse names we do not know, are marked
//!   [`DnsAnswer::recurse`] (the server forwards them, or answers REFUSED / NXDOMAIN).
//!
//! **Size** ([`encode_response`]): an answer that does not fit the transport's limit
//! ([`SizeLimit::for_request`]) is cut to whole answer records, the Additional section re-synced to
//! the records kept; the server sets TC unless asked for Consul's behaviour (see `DnsConfig`).

use crate::catalog::{CatalogState, Health, Node, ServiceInstance};
use hickory_proto::ProtoError;
use hickory_proto::op::{Edns, Metadata, Query, ResponseCode, emit_message_parts};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use imbl::{HashMap as ImHashMap, OrdMap, OrdSet};
use rand::Rng;
use rand::seq::SliceRandom;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// SOA refresh, in seconds (Consul's default).
pub const SOA_REFRESH: i32 = 3600;
/// SOA retry, in seconds (Consul's default).
pub const SOA_RETRY: i32 = 600;
/// SOA expire, in seconds (Consul's default).
pub const SOA_EXPIRE: i32 = 86400;
/// Consul's `udp_answer_limit`: answers of a UDP query without EDNS, in Consul's truncation mode.
pub const CONSUL_UDP_ANSWER_LIMIT: usize = 3;
/// Largest DNS message (TCP, or what an EDNS client may advertise).
pub const MAX_MESSAGE: usize = 65535;
/// At most this many NS records for the apex (as Consul).
const MAX_NS: usize = 3;

/// Bad DNS settings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnsConfigError {
    /// A domain that is not a valid DNS name.
    #[error("invalid DNS domain {0:?}")]
    Domain(String),
    /// A datacenter name that is not a valid DNS label.
    #[error("invalid datacenter {0:?}: must be a DNS label")]
    Datacenter(String),
    /// A `--dns-service-ttl` entry that is not `NAME=SECS`.
    #[error("invalid service TTL {0:?}: expected NAME=SECS, NAME may end in * (e.g. web=30, db*=10, *=5)")]
    ServiceTtl(String),
}

/// Per-service TTLs (Consul's `service_ttl`): an exact name wins, else the longest `prefix*` entry
/// (`*` alone is the default), else 0. Names compare case-insensitively.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTtls {
    exact: BTreeMap<String, u32>,
    /// Prefix entries, longest first.
    prefixes: Vec<(String, u32)>,
}

impl ServiceTtls {
    /// Adds `NAME=SECS` (`SECS` may end in `s`).
    pub fn add(&mut self, entry: &str) -> Result<(), DnsConfigError> {
        let bad = || DnsConfigError::ServiceTtl(entry.to_owned());
        let (name, secs) = entry.split_once('=').ok_or_else(bad)?;
        let name = name.trim().to_ascii_lowercase();
        let secs = secs.trim();
        let secs: u32 = secs.strip_suffix('s').unwrap_or(secs).parse().map_err(|_| bad())?;
        if name.is_empty() {
            return Err(bad());
        }
        match name.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => {
                self.prefixes.retain(|(p, _)| p != prefix);
                self.prefixes.push((prefix.to_owned(), secs));
                self.prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
            }
            Some(_) => return Err(bad()),
            None if name.contains('*') => return Err(bad()),
            None => {
                self.exact.insert(name, secs);
            }
        }
        Ok(())
    }

    /// Parses several `NAME=SECS` entries.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, DnsConfigError> {
        let mut ttls = Self::default();
        for e in entries {
            ttls.add(e)?;
        }
        Ok(ttls)
    }

    /// The TTL of `service`'s records.
    pub fn ttl(&self, service: &str) -> u32 {
        let lower = service.to_ascii_lowercase();
        if let Some(ttl) = self.exact.get(&lower) {
            return *ttl;
        }
        self.prefixes.iter().find(|(p, _)| lower.starts_with(p.as_str())).map_or(0, |(_, ttl)| *ttl)
    }
}

/// DNS settings (Consul's `domain`, `alt_domain`, `node_ttl`, `service_ttl`, `soa.min_ttl`,
/// `only_passing`, `enable_truncate`, `recursors`, `recursor_timeout`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// The domain we answer for, without a trailing dot (default `mesh`); may have several labels.
    pub domain: String,
    /// A second domain answered the same way (answers use the domain of the query).
    pub alt_domain: Option<String>,
    /// The local datacenter: the only one a query may name.
    pub datacenter: String,
    /// The nodes that serve DNS (the apex NS records), by name.
    pub servers: Vec<String>,
    /// TTL (seconds) of node, `.addr`, NS and PTR answers.
    pub node_ttl: u32,
    /// TTLs of service answers (A/AAAA/SRV and their Additional records).
    pub service_ttl: ServiceTtls,
    /// The SOA `minimum` (negative-caching TTL), also the TTL of the SOA record itself.
    pub soa_min_ttl: u32,
    /// Answer only passing instances (by default warning ones are answered too).
    pub only_passing: bool,
    /// Consul's truncation: UDP answers without EDNS are cut to 3 records, and nothing sets TC.
    /// By default answers are cut only to what fits, with TC set so clients retry over TCP.
    pub consul_truncation: bool,
    /// Upstream servers for names outside our domains, tried in order.
    pub recursors: Vec<SocketAddr>,
    /// How long each upstream gets.
    pub recursor_timeout: Duration,
    /// `--dns-failover nearest`: a plain `<svc>.service.<domain>` with no answerable instance
    /// here is answered from the nearest datacenter that has one ([`RemoteAsk::Failover`]).
    pub failover_nearest: bool,
    /// `--translate-wan-addrs`: names of other datacenters answer their nodes' and instances'
    /// WAN addresses (`TaggedAddresses.wan`) where they have one.
    pub translate_wan_addrs: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            domain: "mesh".to_owned(),
            alt_domain: None,
            datacenter: "dc1".to_owned(),
            servers: Vec::new(),
            node_ttl: 0,
            service_ttl: ServiceTtls::default(),
            soa_min_ttl: 0,
            only_passing: false,
            consul_truncation: false,
            recursors: Vec::new(),
            recursor_timeout: Duration::from_secs(2),
            failover_nearest: false,
            translate_wan_addrs: false,
        }
    }
}

/// One of the domains we answer for, with the names derived from it.
#[derive(Clone, Debug)]
struct Domain {
    /// Lowercase labels.
    labels: Vec<Vec<u8>>,
    /// `<domain>.`
    apex: Name,
    /// `ns.<domain>.`
    ns: Name,
    /// `hostmaster.<domain>.`
    hostmaster: Name,
}

/// A validated [`DnsConfig`] with the names it implies: what answers queries.
#[derive(Clone, Debug)]
pub struct DnsZone {
    config: DnsConfig,
    /// The primary domain first, then the alternative one.
    domains: Vec<Domain>,
    /// The datacenter label, lowercase.
    dc: String,
}

/// A fully qualified name from raw labels (1 to 63 bytes each).
fn labels_name<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> Result<Name, ProtoError> {
    Name::from_labels(labels)
}

impl DnsZone {
    /// Checks `config` and derives the names it needs.
    pub fn new(config: DnsConfig) -> Result<Self, DnsConfigError> {
        let dc = config.datacenter.to_ascii_lowercase();
        if dc.is_empty() || labels_name([dc.as_bytes()]).is_err() || dc.contains('.') {
            return Err(DnsConfigError::Datacenter(config.datacenter.clone()));
        }
        let mut domains = Vec::new();
        for d in std::iter::once(&config.domain).chain(config.alt_domain.as_ref()) {
            let labels: Vec<Vec<u8>> =
                d.split('.').filter(|l| !l.is_empty()).map(|l| l.to_ascii_lowercase().into_bytes()).collect();
            let bad = || DnsConfigError::Domain(d.clone());
            if labels.is_empty() {
                return Err(bad());
            }
            let apex = labels_name(labels.iter().map(Vec::as_slice)).map_err(|_| bad())?;
            // Room for `<name>.service.<dc>.` under the domain.
            apex.prepend_label(dc.as_bytes()).map_err(|_| bad())?;
            let ns = apex.prepend_label("ns").map_err(|_| bad())?;
            let hostmaster = apex.prepend_label("hostmaster").map_err(|_| bad())?;
            domains.push(Domain { labels, apex, ns, hostmaster });
        }
        Ok(Self { config, domains, dc })
    }

    /// The settings.
    pub fn config(&self) -> &DnsConfig {
        &self.config
    }

    /// Whether names outside our domains are forwarded (the `ra` flag).
    pub fn recursion_available(&self) -> bool {
        !self.config.recursors.is_empty()
    }

    /// `labels` followed by `<dc>.<domain>.` of domain `d`.
    fn name_in_dc<'a>(&'a self, labels: impl IntoIterator<Item = &'a [u8]>, d: usize) -> Option<Name> {
        let dom = &self.domains[d];
        let all =
            labels.into_iter().chain(std::iter::once(self.dc.as_bytes())).chain(dom.labels.iter().map(Vec::as_slice));
        labels_name(all).ok()
    }

    /// `<node>.node.<dc>.<domain>.` in every domain (node names with dots become several labels).
    fn node_names(&self, node: &str) -> Option<Vec<Name>> {
        (0..self.domains.len())
            .map(|d| self.name_in_dc(node.split('.').map(str::as_bytes).chain([&b"node"[..]]), d))
            .collect()
    }

    /// `<hex>.addr.<dc>.<domain>.` in every domain.
    fn addr_names(&self, ip: IpAddr) -> Option<Vec<Name>> {
        let hex = hex_ip(ip);
        (0..self.domains.len()).map(|d| self.name_in_dc([hex.as_bytes(), &b"addr"[..]], d)).collect()
    }

    /// Reads a query name (case-insensitive): what it asks for, and which of our domains it used
    /// (0 for the primary one, also for names outside our domains). The query type matters only for
    /// the RFC 2782 form without the `service` label, which Consul accepts only for SRV queries.
    pub fn parse(&self, name: &Name, qtype: RecordType) -> (QueryName, usize) {
        let labels: Vec<&[u8]> = name.iter().collect();
        self.parse_labels(&labels, qtype)
    }

    /// [`DnsZone::parse`] of a name given as its labels.
    fn parse_labels(&self, labels: &[&[u8]], qtype: RecordType) -> (QueryName, usize) {
        // The longest of our domains that ends the name.
        let mut best: Option<(usize, usize)> = None;
        for (i, d) in self.domains.iter().enumerate() {
            let n = d.labels.len();
            if labels.len() >= n
                && labels[labels.len() - n..].iter().zip(&d.labels).all(|(a, b)| a.eq_ignore_ascii_case(b))
                && best.is_none_or(|(_, m)| n > m)
            {
                best = Some((i, n));
            }
        }
        let Some((d, n)) = best else {
            return match parse_reverse(labels) {
                Some(ip) => (QueryName::Reverse(ip), 0),
                None => (QueryName::Outside, 0),
            };
        };
        (parse_in_domain(&labels[..labels.len() - n], qtype), d)
    }

    /// The SOA record of domain `d` owned by its apex: `ns.<domain>. hostmaster.<domain>.`,
    /// `serial`, 3600, 600, 86400 and `soa_min_ttl`, with TTL `soa_min_ttl`.
    pub fn soa_record(&self, d: usize, serial: u32) -> Record {
        let dom = &self.domains[d];
        let min = self.config.soa_min_ttl;
        let soa = SOA::new(dom.ns.clone(), dom.hostmaster.clone(), serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, min);
        Record::from_rdata(dom.apex.clone(), min, RData::SOA(soa))
    }

    /// The answer to `qname`/`qtype` from `index`. `unix_time` becomes the SOA serial; `rng` shuffles
    /// the answers. Answer records are owned by `qname` as given (its case preserved).
    pub fn answer<R: Rng + ?Sized>(
        &self,
        index: &DnsIndex,
        qname: &Name,
        qtype: RecordType,
        unix_time: u64,
        rng: &mut R,
    ) -> DnsAnswer {
        // Consul's serial is the low 32 bits of the Unix time.
        let serial = unix_time as u32;
        let (parsed, d) = self.parse(qname, qtype);
        let negative = |code: ResponseCode| {
            let mut a = DnsAnswer::new(code);
            a.authorities.push(self.soa_record(d, serial));
            a
        };
        match &parsed {
            QueryName::Outside => {
                let mut a = DnsAnswer::new(ResponseCode::Refused);
                a.recurse = true;
                return a;
            }
            QueryName::Reverse(ip) => {
                let Some(target) = ip.and_then(|ip| index.ptr_target(ip)) else {
                    let mut a = negative(ResponseCode::NXDomain);
                    a.recurse = true;
                    return a;
                };
                let mut out = DnsAnswer::new(ResponseCode::NoError);
                if matches!(qtype, RecordType::PTR | RecordType::ANY) {
                    out.answers.push(Record::from_rdata(
                        qname.clone(),
                        self.config.node_ttl,
                        RData::PTR(PTR(target.clone())),
                    ));
                }
                return if out.answers.is_empty() { negative(ResponseCode::NoError) } else { out };
            }
            _ => {}
        }
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return DnsAnswer::new(ResponseCode::NotImp);
        }
        let known_dc = |dc: &Option<String>| dc.as_ref().is_none_or(|x| x.eq_ignore_ascii_case(&self.dc));

        let mut out = DnsAnswer::new(ResponseCode::NoError);
        match parsed {
            QueryName::Outside | QueryName::Reverse(_) => unreachable!("handled above"),
            QueryName::Invalid => return negative(ResponseCode::NXDomain),
            QueryName::Apex => {
                if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                    let mut soa = self.soa_record(d, serial);
                    soa.name = qname.clone();
                    out.answers.push(soa);
                }
                if matches!(qtype, RecordType::NS | RecordType::ANY) {
                    self.ns_records(index, qname, d, &mut out);
                }
            }
            QueryName::Addr { ip, .. } => {
                if wants(qtype, ip) {
                    out.answers.push(addr_record(qname, ip, self.config.node_ttl));
                }
            }
            QueryName::Node { node, datacenter } => {
                if !known_dc(&datacenter) {
                    let mut a = negative(ResponseCode::NXDomain);
                    a.remote = datacenter.map(|dc| RemoteAsk::Node { dc, node });
                    return a;
                }
                let Some(node) = index.nodes.get(&node) else { return negative(ResponseCode::NXDomain) };
                let ttl = self.config.node_ttl;
                if wants(qtype, node.address) {
                    out.answers.push(addr_record(qname, node.address, ttl));
                }
                let txt = node.txt.iter().map(|t| Record::from_rdata(qname.clone(), ttl, RData::TXT(t.clone())));
                if matches!(qtype, RecordType::TXT | RecordType::ANY) {
                    out.answers.extend(txt);
                } else if !out.answers.is_empty() {
                    out.additionals.extend(txt);
                }
            }
            QueryName::Query { name, datacenter } => {
                let mut a = negative(ResponseCode::NXDomain);
                a.remote = Some(RemoteAsk::Query { name, dc: datacenter.filter(|dc| *dc != self.dc) });
                return a;
            }
            QueryName::Service { service, tag, datacenter } => {
                if !known_dc(&datacenter) {
                    let mut a = negative(ResponseCode::NXDomain);
                    a.remote = datacenter.map(|dc| RemoteAsk::Service { dc, service, tag });
                    return a;
                }
                // Nothing answerable here: NXDOMAIN, or with `failover_nearest` (and no
                // datacenter named) the nearest datacenter that has an answer.
                let failover = |service: String, tag: Option<String>| {
                    let mut a = negative(ResponseCode::NXDomain);
                    if self.config.failover_nearest && datacenter.is_none() {
                        a.remote = Some(RemoteAsk::Failover { service, tag });
                    }
                    a
                };
                let Some(entry) = index.services.get(&service) else { return failover(service, tag) };
                let selected = self.select(entry, tag.as_deref());
                if selected.is_empty() {
                    return failover(service, tag);
                }
                if qtype == RecordType::SRV {
                    srv_records(qname, &selected, entry.ttl, d, rng, &mut out);
                } else {
                    // Sorted by address: duplicates are neighbours.
                    let mut last: Option<IpAddr> = None;
                    for i in &selected {
                        if wants(qtype, i.ip) && last != Some(i.ip) {
                            out.answers.push(addr_record(qname, i.ip, entry.ttl));
                        }
                        last = Some(i.ip);
                    }
                    out.answers.shuffle(rng);
                }
            }
        }
        if out.answers.is_empty() {
            return negative(ResponseCode::NoError);
        }
        out
    }

    /// The answer to `qname`/`qtype` (whose [`DnsZone::answer`] asked for `ask`) from what the
    /// server found: the records the other datacenter's own DNS would give for
    /// `[<tag>.]<service>.service.<dc>.<domain>` (or `<node>.node.<dc>.<domain>`), owned by
    /// `qname`; SRV targets and their Additional records name that datacenter. A miss is
    /// NXDOMAIN (no such name) or SERVFAIL (unreachable).
    pub fn answer_remote<R: Rng + ?Sized>(
        &self,
        qname: &Name,
        qtype: RecordType,
        ask: &RemoteAsk,
        found: Result<&RemoteFound, RemoteMiss>,
        unix_time: u64,
        rng: &mut R,
    ) -> DnsAnswer {
        let (_, d) = self.parse(qname, qtype);
        let negative = |code: ResponseCode| {
            let mut a = DnsAnswer::new(code);
            if code == ResponseCode::NXDomain {
                a.authorities.push(self.soa_record(d, unix_time as u32));
            }
            a
        };
        let found = match found {
            Ok(f) => f,
            Err(RemoteMiss::NoSuchName) => return negative(ResponseCode::NXDomain),
            Err(RemoteMiss::Unavailable) => return negative(ResponseCode::ServFail),
        };
        // That datacenter's zone (same domains and settings).
        let config = DnsConfig { datacenter: found.datacenter.clone(), failover_nearest: false, ..self.config.clone() };
        let Ok(zone) = DnsZone::new(config) else { return negative(ResponseCode::ServFail) };
        let index = DnsIndex::build(&found.catalog, &zone, None);
        let labels: Vec<String> = match ask {
            RemoteAsk::Node { node, .. } => node.split('.').map(str::to_owned).chain(["node".to_owned()]).collect(),
            RemoteAsk::Service { tag, .. } | RemoteAsk::Failover { tag, .. } => tag
                .iter()
                .flat_map(|t| t.split('.'))
                .map(str::to_owned)
                .chain([found.service.to_ascii_lowercase(), "service".to_owned()])
                .collect(),
            RemoteAsk::Query { .. } => vec![found.service.to_ascii_lowercase(), "service".to_owned()],
        };
        let Some(asked) = zone.name_in_dc(labels.iter().map(String::as_bytes), d) else {
            return negative(ResponseCode::NXDomain);
        };
        let mut out = zone.answer(&index, &asked, qtype, unix_time, rng);
        out.remote = None;
        for r in out.answers.iter_mut() {
            if r.name == asked {
                r.name = qname.clone();
            }
        }
        if let Some(ttl) = found.ttl {
            for r in out.answers.iter_mut().chain(out.additionals.iter_mut()) {
                r.ttl = ttl;
            }
        }
        out
    }

    /// The instances of `entry` a query answers: not critical (only passing with `only_passing`),
    /// carrying `tag` if given; in the entry's order (address, node, port).
    fn select<'a>(&self, entry: &'a ServiceEntry, tag: Option<&str>) -> Vec<&'a InstanceEntry> {
        let only_passing = self.config.only_passing;
        entry
            .instances
            .iter()
            .filter(|i| if only_passing { i.health == Health::Passing } else { i.health != Health::Critical })
            .filter(|i| tag.is_none_or(|t| i.tags.iter().any(|x| x == t)))
            .collect()
    }

    /// The apex NS records: our DNS servers' nodes (at most 3) with glue, else `ns.<domain>.`.
    fn ns_records(&self, index: &DnsIndex, qname: &Name, d: usize, out: &mut DnsAnswer) {
        let ttl = self.config.node_ttl;
        for server in self.config.servers.iter().take(MAX_NS) {
            if let Some(node) = index.nodes.get(&server.to_ascii_lowercase()) {
                let target = node.names[d].clone();
                out.answers.push(Record::from_rdata(qname.clone(), ttl, RData::NS(NS(target.clone()))));
                out.additionals.push(addr_record(&target, node.address, ttl));
            }
        }
        if out.answers.iter().all(|r| !matches!(r.data, RData::NS(_))) {
            out.answers.push(Record::from_rdata(qname.clone(), ttl, RData::NS(NS(self.domains[d].ns.clone()))));
        }
    }
}

/// What a query name asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryName {
    /// The domain apex itself (`<domain>.`), where the SOA and NS records live.
    Apex,
    /// Instances of a service.
    Service {
        /// Service name, lowercased.
        service: String,
        /// Tag filter, lowercased (`None` for no filter, and for RFC 2782's `_tcp`).
        tag: Option<String>,
        /// The datacenter named in the query, lowercased, if any.
        datacenter: Option<String>,
    },
    /// A node.
    Node {
        /// Node name, lowercased; may contain dots.
        node: String,
        /// The datacenter named in the query, lowercased, if any.
        datacenter: Option<String>,
    },
    /// An address encoded in hex (`7f000001.addr.dc1.mesh`).
    Addr {
        /// The address.
        ip: IpAddr,
        /// The datacenter named in the query, lowercased, if any (ignored, as Consul does).
        datacenter: Option<String>,
    },
    /// A prepared query, by name or id (`<name>.query[.<dc>].<domain>`, or RFC 2782's
    /// `_<name>._tcp.query.<domain>`).
    Query {
        /// The query's name or id, lowercased.
        name: String,
        /// The datacenter named in the query, lowercased, if any.
        datacenter: Option<String>,
    },
    /// A name under `in-addr.arpa` or `ip6.arpa`: the address if the name spells a whole one.
    Reverse(Option<IpAddr>),
    /// Inside the domain, but naming nothing we serve: NXDOMAIN.
    Invalid,
    /// Outside our domains: forwarded to the recursors, else REFUSED.
    Outside,
}

fn lower(label: &[u8]) -> String {
    String::from_utf8_lossy(label).to_ascii_lowercase()
}

fn join_lower(labels: &[&[u8]]) -> String {
    let mut s = String::new();
    for (i, l) in labels.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(&lower(l));
    }
    s
}

/// The part of a name before our domain (`rest`, labels left to right).
fn parse_in_domain(rest: &[&[u8]], qtype: RecordType) -> QueryName {
    if rest.is_empty() {
        return QueryName::Apex;
    }
    // Scan right to left for the first keyword, as Consul does.
    let mut found = None;
    for i in (0..rest.len()).rev() {
        let label = rest[i];
        let keyword = ["service", "node", "addr", "query", "connect", "ingress", "virtual"]
            .into_iter()
            .find(|k| label.eq_ignore_ascii_case(k.as_bytes()));
        if let Some(kind) = keyword {
            found = Some((kind, &rest[..i], &rest[i + 1..]));
            break;
        }
        if qtype == RecordType::SRV && label.first() == Some(&b'_') {
            found = Some(("service", &rest[..=i], &rest[i + 1..]));
            break;
        }
    }
    let Some((kind, parts, suffix)) = found else { return QueryName::Invalid };
    let datacenter = match suffix {
        [] => None,
        [dc] => Some(lower(dc)),
        [dc, keyword] if keyword.eq_ignore_ascii_case(b"dc") => Some(lower(dc)),
        _ => return QueryName::Invalid,
    };
    match kind {
        "service" => match parts {
            [] => QueryName::Invalid,
            [svc, tag] if svc.len() > 1 && svc[0] == b'_' && tag.first() == Some(&b'_') => {
                let tag = &tag[1..];
                let tag = (!tag.is_empty() && !tag.eq_ignore_ascii_case(b"tcp")).then(|| lower(tag));
                QueryName::Service { service: lower(&svc[1..]), tag, datacenter }
            }
            [tag @ .., svc] => {
                let tag = (!tag.is_empty()).then(|| join_lower(tag));
                QueryName::Service { service: lower(svc), tag, datacenter }
            }
        },
        "node" if !parts.is_empty() => QueryName::Node { node: join_lower(parts), datacenter },
        "addr" => match parts {
            [hex] => std::str::from_utf8(hex)
                .ok()
                .and_then(parse_hex_ip)
                .map_or(QueryName::Invalid, |ip| QueryName::Addr { ip, datacenter }),
            _ => QueryName::Invalid,
        },
        "query" => match parts {
            [] => QueryName::Invalid,
            [name, tcp] if name.len() > 1 && name[0] == b'_' && tcp.eq_ignore_ascii_case(b"_tcp") => {
                QueryName::Query { name: lower(&name[1..]), datacenter }
            }
            _ => QueryName::Query { name: join_lower(parts), datacenter },
        },
        // Connect, ingress and virtual IPs are not served.
        _ => QueryName::Invalid,
    }
}

/// A reverse name's address: `Some(Some(ip))` for a whole address (`4.3.2.1.in-addr.arpa`, 32
/// nibbles of `ip6.arpa`), `Some(None)` for other names under those zones, `None` for other names.
fn parse_reverse(labels: &[&[u8]]) -> Option<Option<IpAddr>> {
    let n = labels.len();
    let is = |i: usize, s: &str| labels[i].eq_ignore_ascii_case(s.as_bytes());
    if n >= 2 && is(n - 1, "arpa") && is(n - 2, "in-addr") {
        let digits = &labels[..n - 2];
        if digits.len() != 4 {
            return Some(None);
        }
        let mut octets = [0u8; 4];
        for (i, l) in digits.iter().enumerate() {
            let s = std::str::from_utf8(l).ok();
            let ok = s.filter(|s| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()));
            // Reversed order; no leading zeros beyond "0" itself.
            match ok.filter(|s| s.len() == 1 || !s.starts_with('0')).and_then(|s| s.parse::<u8>().ok()) {
                Some(v) => octets[3 - i] = v,
                None => return Some(None),
            }
        }
        return Some(Some(IpAddr::V4(Ipv4Addr::from(octets))));
    }
    if n >= 2 && is(n - 1, "arpa") && is(n - 2, "ip6") {
        let nibbles = &labels[..n - 2];
        if nibbles.len() != 32 {
            return Some(None);
        }
        let mut v: u128 = 0;
        for l in nibbles.iter().rev() {
            let [c] = l else { return Some(None) };
            let Some(d) = (*c as char).to_digit(16) else { return Some(None) };
            v = (v << 4) | u128::from(d);
        }
        return Some(Some(IpAddr::V6(Ipv6Addr::from(v))));
    }
    None
}

/// Parses a reverse-lookup name (see [`QueryName::Reverse`]); `None` if it is not under
/// `in-addr.arpa` or `ip6.arpa`.
pub fn parse_reverse_name(name: &Name) -> Option<Option<IpAddr>> {
    let labels: Vec<&[u8]> = name.iter().collect();
    parse_reverse(&labels)
}

/// `7f000001` → 127.0.0.1; 32 hex digits → an IPv6 address.
fn parse_hex_ip(hex: &str) -> Option<IpAddr> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.len() {
        8 => u32::from_str_radix(hex, 16).ok().map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(hex, 16).ok().map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

/// The `<hex>` label of an `.addr` name.
fn hex_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

/// Whether an address record for `ip` answers a query of type `qtype`.
fn wants(qtype: RecordType, ip: IpAddr) -> bool {
    match qtype {
        RecordType::ANY => true,
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        _ => false,
    }
}

/// An A or AAAA record.
fn addr_record(owner: &Name, ip: IpAddr, ttl: u32) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(owner.clone(), ttl, data)
}

/// Whether two instances have the same SRV target: it is a function of node and address.
fn same_target(a: &InstanceEntry, b: &InstanceEntry) -> bool {
    a.ip == b.ip && a.node == b.node
}

/// SRV answers for `instances` (sorted by address, node and port; shuffled here), with their
/// targets' addresses and node meta TXT records in Additional.
fn srv_records<R: Rng + ?Sized>(
    qname: &Name,
    instances: &[&InstanceEntry],
    ttl: u32,
    d: usize,
    rng: &mut R,
    out: &mut DnsAnswer,
) {
    let mut last: Option<&InstanceEntry> = None;
    for inst in instances {
        // Same node, address and port: once (they are neighbours).
        if last.is_some_and(|l| l.ip == inst.ip && l.port == inst.port && l.node == inst.node) {
            continue;
        }
        let new_target = !last.is_some_and(|l| same_target(l, inst));
        last = Some(inst);
        let target = &inst.targets[d];
        out.answers.push(Record::from_rdata(
            qname.clone(),
            ttl,
            RData::SRV(SRV::new(1, inst.weight, inst.port, target.clone())),
        ));
        // Equal targets are neighbours too.
        if new_target {
            out.additionals.push(addr_record(target, inst.ip, ttl));
            out.additionals
                .extend(inst.txt.iter().map(|t| Record::from_rdata(target.clone(), ttl, RData::TXT(t.clone()))));
        }
    }
    out.answers.shuffle(rng);
}

/// The sections of a response (the caller adds the header, question and EDNS).
#[derive(Clone, Debug, PartialEq)]
pub struct DnsAnswer {
    /// Response code.
    pub response_code: ResponseCode,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA on negative answers).
    pub authorities: Vec<Record>,
    /// Additional section (addresses of SRV targets, node meta).
    pub additionals: Vec<Record>,
    /// The name is not ours: forward it to the recursors if there are any; otherwise send this
    /// answer (REFUSED outside our domains, NXDOMAIN for unknown reverse names).
    pub recurse: bool,
    /// The answer needs what this node's catalog does not hold (another datacenter, a prepared
    /// query, a failover): the server looks it up ([`DnsZone::answer_remote`] makes the answer);
    /// without a way to look it up, this answer (NXDOMAIN) is sent.
    pub remote: Option<RemoteAsk>,
}

/// What a query needs from outside this node's catalog: the server asks its datacenter's
/// servers (which ask the other datacenter's over the WAN) and answers with
/// [`DnsZone::answer_remote`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteAsk {
    /// The instances of a service in another datacenter (`<svc>.service.<dc>.<domain>`).
    Service {
        /// The datacenter, lowercased.
        dc: String,
        /// The service, lowercased.
        service: String,
        /// A tag filter, lowercased.
        tag: Option<String>,
    },
    /// A node of another datacenter (`<node>.node.<dc>.<domain>`).
    Node {
        /// The datacenter, lowercased.
        dc: String,
        /// The node, lowercased.
        node: String,
    },
    /// A prepared query (`<name>.query[.<dc>].<domain>`), executed where it is defined.
    Query {
        /// The query's name or id.
        name: String,
        /// The datacenter named, if another than ours.
        dc: Option<String>,
    },
    /// `--dns-failover nearest`: this datacenter has no answerable instance of the service
    /// asked by a plain `<svc>.service.<domain>`: the nearest datacenter that has one answers.
    Failover {
        /// The service, lowercased.
        service: String,
        /// A tag filter, lowercased.
        tag: Option<String>,
    },
}

/// What the server found for a [`RemoteAsk`]: the instances (or node) of one datacenter, as a
/// small catalog of that datacenter.
#[derive(Clone, Debug)]
pub struct RemoteFound {
    /// The datacenter that answered.
    pub datacenter: String,
    /// The service whose instances `catalog` holds (a prepared query names its own).
    pub service: String,
    /// The nodes and instances found, health included (critical ones are left out by the
    /// answer, as locally).
    pub catalog: CatalogState,
    /// A TTL for the answer's records (a prepared query's `DNS.TTL`), instead of the configured.
    pub ttl: Option<u32>,
}

/// Why a [`RemoteAsk`] found nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteMiss {
    /// No such datacenter, service, node or query: NXDOMAIN.
    NoSuchName,
    /// The datacenter (or this node's servers) could not be reached: SERVFAIL.
    Unavailable,
}

impl DnsAnswer {
    fn sections(&self) -> Sections<'_> {
        Sections { answers: &self.answers, authorities: &self.authorities, additionals: &self.additionals }
    }

    /// An answer without records.
    pub fn new(response_code: ResponseCode) -> Self {
        Self {
            response_code,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            recurse: false,
            remote: None,
        }
    }
}

/// A node as DNS sees it.
#[derive(Clone, Debug, PartialEq)]
struct NodeEntry {
    address: IpAddr,
    /// `<node>.node.<dc>.<domain>.` per domain.
    names: Vec<Name>,
    /// Node meta as RFC 1464 TXT data.
    txt: Arc<[TXT]>,
}

/// A service instance as DNS sees it.
#[derive(Clone, Debug, PartialEq)]
struct InstanceEntry {
    health: Health,
    /// Lowercase tags.
    tags: Box<[String]>,
    ip: IpAddr,
    port: u16,
    /// SRV weight: Consul's `Weights.Passing`, or `Weights.Warning` for an instance in warning.
    weight: u16,
    /// The node name, lowercased.
    node: Arc<str>,
    /// SRV target per domain.
    targets: Vec<Name>,
    /// Node meta TXT data when the target is the node's name.
    txt: Arc<[TXT]>,
    /// Per domain, for the fast path: the SRV RDATA (priority, weight, port, target uncompressed).
    srv_rdata: Vec<Box<[u8]>>,
    /// Per domain, for the fast path: the Additional records of an SRV answer (the target's address
    /// and node meta TXT, names uncompressed), and how many there are.
    srv_extra: Vec<Box<[u8]>>,
    srv_extra_count: u16,
}

/// The instances of one service (or of several whose names differ only in case).
#[derive(Clone, Debug, PartialEq)]
struct ServiceEntry {
    ttl: u32,
    /// Sorted by address, node and port.
    instances: Vec<InstanceEntry>,
}

/// Who claims an address for reverse lookups: nodes (by name) before services (by name), the
/// order in which a from-scratch build would have met them.
type PtrClaim = (bool, String);

/// What DNS answers from: the catalog rearranged for lookups by lowercase name.
///
/// Maintained per change ([`DnsIndex::update`]): the catalog maps it was built from are kept, and
/// an update diffs them against the new catalog's (persistent maps sharing structure: the diff
/// visits only what changed), then rebuilds the entries of the services and nodes the change
/// touched, and of the services on a changed node. Every map here is persistent too, so the
/// updated index shares all the rest with the previous one: an update costs O(change), whatever
/// the size of the catalog, and the previous index stays whole for whoever still reads it.
#[derive(Clone, Debug, Default)]
pub struct DnsIndex {
    services: ImHashMap<String, Arc<ServiceEntry>>,
    nodes: ImHashMap<String, Arc<NodeEntry>>,
    /// Reverse lookups: address → its claimants → PTR target in the primary domain; the first
    /// claimant answers.
    ptr: ImHashMap<IpAddr, OrdMap<PtrClaim, Name>>,
    /// The catalog maps this was built from.
    source_nodes: OrdMap<String, Node>,
    source_services: OrdMap<String, OrdMap<String, ServiceInstance>>,
    /// Entry per service as named in the catalog.
    by_catalog_name: ImHashMap<String, Arc<ServiceEntry>>,
    /// Lowercase name → the catalog's names of nodes, and of services, that differ only in case.
    node_spellings: ImHashMap<String, OrdSet<String>>,
    service_spellings: ImHashMap<String, OrdSet<String>>,
    /// Lowercase node name → the services (catalog names) with an instance on it: their entries
    /// carry the node's address, names and meta.
    services_on: ImHashMap<String, OrdSet<String>>,
}

/// The work an index update did (tests pin its shape: it follows the change, not the catalog).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexUpdateStats {
    /// Changed entries the catalog diff reported (nodes and services).
    pub diff_items: usize,
    /// Node entries rebuilt (by lowercase name).
    pub nodes_rebuilt: usize,
    /// Service entries rebuilt (by catalog name).
    pub services_rebuilt: usize,
    /// Instances visited to rebuild them (old and new).
    pub instances_visited: usize,
}

/// RFC 1464 TXT data of node meta (`key=value`; keys prefixed `rfc1035-` give the bare value).
fn meta_txt(meta: &BTreeMap<String, String>) -> Arc<[TXT]> {
    meta.iter()
        .map(|(k, v)| match k.strip_prefix("rfc1035-") {
            Some(_) => TXT::new(vec![v.clone()]),
            None => TXT::new(vec![format!("{k}={v}")]),
        })
        .collect()
}

/// Adds (or removes) `name` to the set of spellings at `lower`.
fn respell(map: &mut ImHashMap<String, OrdSet<String>>, lower: &str, name: &str, present: bool) {
    let mut set = map.get(lower).cloned().unwrap_or_default();
    if present {
        set.insert(name.to_owned());
    } else {
        set.remove(name);
    }
    if set.is_empty() {
        map.remove(lower);
    } else {
        map.insert(lower.to_owned(), set);
    }
}

impl DnsIndex {
    /// Indexes `catalog` for `zone`: an update of `previous` (see [`DnsIndex::update`]) when given
    /// (it must have been built for the same zone), else from scratch.
    pub fn build(catalog: &CatalogState, zone: &DnsZone, previous: Option<&DnsIndex>) -> DnsIndex {
        match previous {
            Some(p) => p.update(catalog, zone).0,
            None => DnsIndex::default().update(catalog, zone).0,
        }
    }

    /// The index of `catalog`, made from this one (built for `zone`) by redoing only what changed
    /// between the catalog this one was built from and `catalog`; with what that took.
    pub fn update(&self, catalog: &CatalogState, zone: &DnsZone) -> (DnsIndex, IndexUpdateStats) {
        let mut next = self.clone();
        let stats = next.apply(catalog, zone);
        (next, stats)
    }

    /// Whether this was built from `catalog`'s nodes and services (what DNS reads of it).
    pub fn is_built_from(&self, catalog: &CatalogState) -> bool {
        self.source_nodes.ptr_eq(&catalog.nodes) && self.source_services.ptr_eq(&catalog.services)
    }

    fn claim(&mut self, ip: IpAddr, claim: PtrClaim, target: Option<Name>) {
        let mut claims = self.ptr.get(&ip).cloned().unwrap_or_default();
        match target {
            Some(t) => {
                claims.insert(claim, t);
            }
            None => {
                claims.remove(&claim);
            }
        }
        if claims.is_empty() {
            self.ptr.remove(&ip);
        } else {
            self.ptr.insert(ip, claims);
        }
    }

    fn apply(&mut self, catalog: &CatalogState, zone: &DnsZone) -> IndexUpdateStats {
        use imbl::ordmap::DiffItem;
        let mut stats = IndexUpdateStats::default();
        // Nodes: their spellings and address claims now; their entries below, per lowercase name.
        let mut dirty_nodes: BTreeSet<String> = BTreeSet::new();
        let old_nodes = std::mem::take(&mut self.source_nodes);
        for item in old_nodes.diff(&catalog.nodes) {
            stats.diff_items += 1;
            let (old, new) = match item {
                DiffItem::Add(_, n) => (None, Some(n)),
                DiffItem::Remove(_, o) => (Some(o), None),
                DiffItem::Update { old: (_, o), new: (_, n) } => (Some(o), Some(n)),
            };
            let name = new.or(old).map(|n| n.name.clone()).unwrap_or_default();
            let lower = name.to_ascii_lowercase();
            if let Some(o) = old {
                self.claim(o.address, (false, name.clone()), None);
            }
            if let Some(n) = new
                && let Some(names) = zone.node_names(&n.name)
            {
                self.claim(n.address, (false, name.clone()), names.into_iter().next());
            }
            respell(&mut self.node_spellings, &lower, &name, new.is_some());
            dirty_nodes.insert(lower);
        }
        // Services that changed, and those on a node whose entry changed.
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        for lower in &dirty_nodes {
            stats.nodes_rebuilt += 1;
            let spellings = self.node_spellings.get(lower).cloned().unwrap_or_default();
            let entry = spellings.iter().find_map(|name| {
                let node = catalog.nodes.get(name)?;
                let names = zone.node_names(name)?;
                Some(NodeEntry { address: node.address, names, txt: meta_txt(&node.meta) })
            });
            // Names compare without case; the entries carry them as spelled.
            let changed = match (&entry, self.nodes.get(lower)) {
                (Some(e), Some(old)) => {
                    old.address != e.address
                        || old.txt != e.txt
                        || old.names.len() != e.names.len()
                        || old.names.iter().zip(&e.names).any(|(a, b)| !a.eq_case(b))
                }
                (None, None) => false,
                _ => true,
            };
            if !changed {
                continue;
            }
            match entry {
                Some(e) => self.nodes.insert(lower.clone(), Arc::new(e)),
                None => self.nodes.remove(lower),
            };
            if let Some(on) = self.services_on.get(lower) {
                dirty.extend(on.iter().cloned());
            }
        }
        let old_services = std::mem::take(&mut self.source_services);
        for item in old_services.diff(&catalog.services) {
            stats.diff_items += 1;
            let name = match item {
                DiffItem::Add(k, _) | DiffItem::Remove(k, _) | DiffItem::Update { new: (k, _), .. } => k,
            };
            dirty.insert(name.clone());
        }
        let mut dirty_lower: BTreeSet<String> = BTreeSet::new();
        let empty = OrdMap::new();
        for name in &dirty {
            let old = old_services.get(name).unwrap_or(&empty);
            let new = catalog.services.get(name);
            stats.services_rebuilt += 1;
            stats.instances_visited += old.len() + new.map_or(0, OrdMap::len);
            // Address claims and the nodes it is on: what it had against what it has.
            if !old.ptr_eq(new.unwrap_or(&empty)) {
                let ips = |m: &OrdMap<String, ServiceInstance>| -> BTreeSet<IpAddr> {
                    m.values().filter_map(|i| i.address).collect()
                };
                let on = |m: &OrdMap<String, ServiceInstance>| -> BTreeSet<String> {
                    m.values().map(|i| i.node.to_ascii_lowercase()).collect()
                };
                let (old_ips, new_ips) = (ips(old), new.map(ips).unwrap_or_default());
                if let Some(target) = zone.name_in_dc([name.as_bytes(), &b"service"[..]], 0) {
                    for ip in old_ips.difference(&new_ips) {
                        self.claim(*ip, (true, name.clone()), None);
                    }
                    for ip in new_ips.difference(&old_ips) {
                        self.claim(*ip, (true, name.clone()), Some(target.clone()));
                    }
                }
                let (old_on, new_on) = (on(old), new.map(on).unwrap_or_default());
                for node in old_on.difference(&new_on) {
                    respell(&mut self.services_on, node, name, false);
                }
                for node in new_on.difference(&old_on) {
                    respell(&mut self.services_on, node, name, true);
                }
            }
            let lower = name.to_ascii_lowercase();
            match new {
                Some(instances) => {
                    let entry = Arc::new(service_entry(name, instances, &self.nodes, zone));
                    self.by_catalog_name.insert(name.clone(), entry);
                }
                None => {
                    self.by_catalog_name.remove(name);
                }
            }
            respell(&mut self.service_spellings, &lower, name, new.is_some());
            dirty_lower.insert(lower);
        }
        // Names that differ only in case answer together.
        for lower in dirty_lower {
            let spellings = self.service_spellings.get(&lower).cloned().unwrap_or_default();
            let mut entry: Option<Arc<ServiceEntry>> = None;
            for name in &spellings {
                let Some(e) = self.by_catalog_name.get(name) else { continue };
                entry = Some(match entry {
                    None => e.clone(),
                    Some(first) => Arc::new(merge_entries(&first, e)),
                });
            }
            match entry {
                Some(e) => self.services.insert(lower, e),
                None => self.services.remove(&lower),
            };
        }
        self.source_nodes = catalog.nodes.clone();
        self.source_services = catalog.services.clone();
        stats
    }

    /// How many services (by lowercase name) are indexed.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The PTR target of `ip`, if anything claims it.
    fn ptr_target(&self, ip: IpAddr) -> Option<&Name> {
        self.ptr.get(&ip).and_then(|claims| claims.get_min()).map(|(_, name)| name)
    }
}

/// One entry for two services whose names differ only in case.
fn merge_entries(a: &ServiceEntry, b: &ServiceEntry) -> ServiceEntry {
    let mut instances: Vec<InstanceEntry> = a.instances.iter().chain(&b.instances).cloned().collect();
    instances.sort_by(|x, y| (x.ip, &x.node, x.port).cmp(&(y.ip, &y.node, y.port)));
    ServiceEntry { ttl: a.ttl, instances }
}

/// The entry of service `name` from its catalog instances.
fn service_entry(
    name: &str,
    instances: &OrdMap<String, ServiceInstance>,
    nodes: &ImHashMap<String, Arc<NodeEntry>>,
    zone: &DnsZone,
) -> ServiceEntry {
    let ttl = zone.config.service_ttl.ttl(name);
    let mut out: Vec<InstanceEntry> = Vec::with_capacity(instances.len());
    for inst in instances.values() {
        let node = nodes.get(&inst.node.to_ascii_lowercase());
        let Some(ip) = inst.address.or(node.map(|n| n.address)) else { continue };
        // The node's name when the instance is at the node's address, else the address itself.
        let (targets, txt) = match node {
            Some(n) if n.address == ip => (n.names.clone(), n.txt.clone()),
            _ => match zone.addr_names(ip) {
                Some(t) => (t, Arc::from(Vec::new())),
                None => continue,
            },
        };
        let weight = if inst.health == Health::Warning { inst.weights.warning } else { inst.weights.passing };
        let mut srv_rdata = Vec::with_capacity(targets.len());
        let mut srv_extra = Vec::with_capacity(targets.len());
        for target in &targets {
            let mut rdata = Vec::with_capacity(6 + target.len() + 2);
            rdata.extend_from_slice(&[0, 1]);
            rdata.extend_from_slice(&weight.to_be_bytes());
            rdata.extend_from_slice(&inst.port.to_be_bytes());
            push_wire_name(&mut rdata, target);
            srv_rdata.push(rdata.into_boxed_slice());
            let mut extra = Vec::new();
            let owner = wire_name(target);
            push_wire_record(&mut extra, &owner, addr_type(ip), ttl, &ip_bytes(ip));
            for t in txt.iter() {
                let mut rdata = Vec::new();
                if t.emit(&mut BinEncoder::new(&mut rdata)).is_err() {
                    continue;
                }
                push_wire_record(&mut extra, &owner, RecordType::TXT, ttl, &rdata);
            }
            srv_extra.push(extra.into_boxed_slice());
        }
        out.push(InstanceEntry {
            health: inst.health,
            tags: inst.tags.iter().map(|t| t.to_ascii_lowercase()).collect(),
            ip,
            port: inst.port,
            weight,
            node: Arc::from(inst.node.to_ascii_lowercase()),
            targets,
            srv_extra_count: u16::try_from(1 + txt.len()).unwrap_or(u16::MAX),
            txt,
            srv_rdata,
            srv_extra,
        });
    }
    out.sort_by(|a, b| (a.ip, &a.node, a.port).cmp(&(b.ip, &b.node, b.port)));
    ServiceEntry { ttl, instances: out }
}

// ---- The fast path: the common query answered straight into wire format ----

/// A name in wire format, uncompressed.
fn push_wire_name(out: &mut Vec<u8>, name: &Name) {
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
}

fn wire_name(name: &Name) -> Vec<u8> {
    let mut v = Vec::with_capacity(name.len() + 2);
    push_wire_name(&mut v, name);
    v
}

/// A resource record of class IN in wire format (`owner` already encoded).
fn push_wire_record(out: &mut Vec<u8>, owner: &[u8], rtype: RecordType, ttl: u32, rdata: &[u8]) {
    out.extend_from_slice(owner);
    out.extend_from_slice(&u16::from(rtype).to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
}

fn addr_type(ip: IpAddr) -> RecordType {
    if ip.is_ipv4() { RecordType::A } else { RecordType::AAAA }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Most labels a query name may have for the fast path.
const FAST_MAX_LABELS: usize = 32;

/// A plain query read straight from the wire: a standard query with one question of class IN and
/// no records but an optional EDNS version 0 OPT record, names uncompressed. Anything else takes
/// the general way (hickory's `Message`).
#[derive(Debug)]
pub struct SimpleQuery<'a> {
    id: u16,
    rd: bool,
    cd: bool,
    /// The question as sent: name, type and class.
    question: &'a [u8],
    labels: [&'a [u8]; FAST_MAX_LABELS],
    label_count: usize,
    qtype: RecordType,
    /// The payload size of the query's EDNS, if it has any.
    pub edns_payload: Option<u16>,
}

impl<'a> SimpleQuery<'a> {
    /// Reads `bytes` if they are such a query.
    pub fn read(bytes: &'a [u8]) -> Option<Self> {
        let u16_at = |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*bytes.get(i)?, *bytes.get(i + 1)?])) };
        let flags = u16_at(2)?;
        // QR = 0 (a query) and opcode QUERY.
        if flags & 0xf800 != 0 {
            return None;
        }
        if u16_at(4)? != 1 || u16_at(6)? != 0 || u16_at(8)? != 0 || u16_at(10)? > 1 {
            return None;
        }
        let mut labels: [&[u8]; FAST_MAX_LABELS] = [&[]; FAST_MAX_LABELS];
        let mut label_count = 0;
        let mut pos = 12;
        loop {
            let len = usize::from(*bytes.get(pos)?);
            if len == 0 {
                pos += 1;
                break;
            }
            // Compression pointers and extended label types: not here.
            if len > 63 || label_count == FAST_MAX_LABELS {
                return None;
            }
            labels[label_count] = bytes.get(pos + 1..pos + 1 + len)?;
            label_count += 1;
            pos += 1 + len;
        }
        if pos - 12 > 255 {
            return None;
        }
        let qtype = RecordType::from(u16_at(pos)?);
        if u16_at(pos + 2)? != 1 {
            return None;
        }
        pos += 4;
        let question = &bytes[12..pos];
        let mut edns_payload = None;
        if u16_at(10)? == 1 {
            // The OPT record: root owner, type 41, class = payload size, version 0.
            if *bytes.get(pos)? != 0 || u16_at(pos + 1)? != 41 || *bytes.get(pos + 6)? != 0 {
                return None;
            }
            edns_payload = Some(u16_at(pos + 3)?);
            pos += 11 + usize::from(u16_at(pos + 9)?);
        }
        if pos != bytes.len() {
            return None;
        }
        Some(Self {
            id: u16_at(0)?,
            rd: flags & 0x0100 != 0,
            cd: flags & 0x0010 != 0,
            question,
            labels,
            label_count,
            qtype,
            edns_payload,
        })
    }

    /// The question's type.
    pub fn qtype(&self) -> RecordType {
        self.qtype
    }
}

impl DnsZone {
    /// Writes the whole response to `q` into `out` if it is a positive answer about a service (A,
    /// AAAA or SRV) that fits `limit` uncut: the same records [`DnsZone::answer`] gives, answer
    /// owners pointing at the question, encoded from bytes the index prepared. Returns false (and
    /// `out` holds nothing useful) for everything else, which takes the general path.
    pub fn answer_fast<R: Rng + ?Sized>(
        &self,
        index: &DnsIndex,
        q: &SimpleQuery<'_>,
        limit: SizeLimit,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> bool {
        let qtype = q.qtype;
        if !matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::SRV) {
            return false;
        }
        let (QueryName::Service { service, tag, datacenter }, d) = self.parse_labels(&q.labels[..q.label_count], qtype)
        else {
            return false;
        };
        if datacenter.is_some_and(|dc| dc != self.dc) {
            return false;
        }
        let Some(entry) = index.services.get(&service) else { return false };
        let mut selected = self.select(entry, tag.as_deref());
        let ttl = entry.ttl.to_be_bytes();
        out.clear();
        out.extend_from_slice(&[0; 12]);
        out.extend_from_slice(q.question);
        let mut extra_count: usize = 0;
        if qtype == RecordType::SRV {
            // Same node, address and port once (neighbours: sorted).
            selected.dedup_by(|b, a| a.ip == b.ip && a.port == b.port && a.node == b.node);
            let mut extras: Vec<&[u8]> = Vec::with_capacity(selected.len());
            let mut last: Option<&InstanceEntry> = None;
            for inst in &selected {
                // One set of Additional records per target (equal targets are neighbours).
                if !last.is_some_and(|l| same_target(l, inst)) {
                    extras.push(&inst.srv_extra[d]);
                    extra_count += usize::from(inst.srv_extra_count);
                }
                last = Some(inst);
            }
            selected.shuffle(rng);
            for inst in &selected {
                out.extend_from_slice(&[0xc0, 0x0c, 0, 33, 0, 1]);
                out.extend_from_slice(&ttl);
                let rdata = &inst.srv_rdata[d];
                out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
                out.extend_from_slice(rdata);
            }
            for e in extras {
                out.extend_from_slice(e);
            }
        } else {
            selected.retain(|i| wants(qtype, i.ip));
            selected.dedup_by(|b, a| a.ip == b.ip);
            selected.shuffle(rng);
            for inst in &selected {
                out.extend_from_slice(&[0xc0, 0x0c]);
                out.extend_from_slice(&u16::from(qtype).to_be_bytes());
                out.extend_from_slice(&[0, 1]);
                out.extend_from_slice(&ttl);
                match inst.ip {
                    IpAddr::V4(v4) => {
                        out.extend_from_slice(&[0, 4]);
                        out.extend_from_slice(&v4.octets());
                    }
                    IpAddr::V6(v6) => {
                        out.extend_from_slice(&[0, 16]);
                        out.extend_from_slice(&v6.octets());
                    }
                }
            }
        }
        // No answer (NXDOMAIN or NODATA), or too many: the general path.
        if selected.is_empty() || limit.answers.is_some_and(|n| selected.len() > n) {
            return false;
        }
        if let Some(payload) = q.edns_payload {
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&payload.max(512).to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            extra_count += 1;
        }
        if out.len() > limit.bytes.clamp(512, MAX_MESSAGE) {
            return false;
        }
        let (Ok(answers), Ok(extras)) = (u16::try_from(selected.len()), u16::try_from(extra_count)) else {
            return false;
        };
        // QR, AA, RD and CD as asked, RA with recursors; NOERROR.
        let mut flags: u16 = 0x8400;
        if q.rd {
            flags |= 0x0100;
        }
        if self.recursion_available() {
            flags |= 0x0080;
        }
        if q.cd {
            flags |= 0x0010;
        }
        out[0..2].copy_from_slice(&q.id.to_be_bytes());
        out[2..4].copy_from_slice(&flags.to_be_bytes());
        out[4..6].copy_from_slice(&1u16.to_be_bytes());
        out[6..8].copy_from_slice(&answers.to_be_bytes());
        out[8..10].copy_from_slice(&0u16.to_be_bytes());
        out[10..12].copy_from_slice(&extras.to_be_bytes());
        true
    }
}

/// How large a response may be, and what cutting it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeLimit {
    /// Bytes of the whole message.
    pub bytes: usize,
    /// Answer records at most (Consul's `udp_answer_limit`), before any size check.
    pub answers: Option<usize>,
    /// Whether a response that was cut gets the TC bit.
    pub set_tc: bool,
}

impl SizeLimit {
    /// The limit of a response over TCP (64 KiB) or UDP (512 bytes without EDNS, the advertised
    /// payload size with it). With `consul_truncation`, UDP without EDNS is also cut to 3 answers and
    /// TC is never set, as Consul does by default.
    pub fn for_request(tcp: bool, edns_payload: Option<u16>, consul_truncation: bool) -> Self {
        let set_tc = !consul_truncation;
        match (tcp, edns_payload) {
            (true, _) => Self { bytes: MAX_MESSAGE, answers: None, set_tc },
            (false, Some(payload)) => Self { bytes: usize::from(payload).max(512), answers: None, set_tc },
            (false, None) => Self { bytes: 512, answers: consul_truncation.then_some(CONSUL_UDP_ANSWER_LIMIT), set_tc },
        }
    }
}

/// The Additional records that belong to `answers`: those owned by an answer's name or by the
/// target of an SRV, NS, MX or CNAME answer.
pub fn resync_additionals(answers: &[Record], additionals: &[Record]) -> Vec<Record> {
    let mut wanted: HashSet<&Name> = HashSet::with_capacity(answers.len() * 2);
    for r in answers {
        wanted.insert(&r.name);
        match &r.data {
            RData::SRV(s) => {
                wanted.insert(&s.target);
            }
            RData::NS(ns) => {
                wanted.insert(&ns.0);
            }
            RData::MX(mx) => {
                wanted.insert(&mx.exchange);
            }
            RData::CNAME(c) => {
                wanted.insert(&c.0);
            }
            _ => {}
        }
    }
    additionals.iter().filter(|r| wanted.contains(&r.name)).cloned().collect()
}

/// The record sections of a message.
struct Sections<'a> {
    answers: &'a [Record],
    authorities: &'a [Record],
    additionals: &'a [Record],
}

/// Emits one message into `out` (cleared first) within `max` bytes; whether every record fitted.
fn emit_within(
    metadata: &Metadata,
    query: Option<&Query>,
    Sections { answers, authorities, additionals }: Sections<'_>,
    edns: Option<&Edns>,
    max: usize,
    out: &mut Vec<u8>,
) -> Result<bool, ProtoError> {
    out.clear();
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(u16::try_from(max).unwrap_or(u16::MAX));
    match emit_message_parts(
        metadata,
        &mut query.into_iter(),
        &mut answers.iter(),
        &mut authorities.iter(),
        &mut additionals.iter(),
        edns,
        None,
        &mut encoder,
    ) {
        Ok(header) => {
            let c = header.counts;
            Ok(usize::from(c.answers) == answers.len()
                && usize::from(c.authorities) == authorities.len()
                && usize::from(c.additionals) == additionals.len() + usize::from(edns.is_some()))
        }
        Err(ProtoError::MaxBufferSizeExceeded(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Encodes a response into `out`: `metadata` (with `answer`'s response code), the question, `answer`'s sections and `edns`, within
/// `limit`. What does not fit is cut to the most whole answer records that do (binary search over
/// trial encodings; the usual answer that fits is encoded once), the Additional section re-synced
/// to the answers kept ([`resync_additionals`]); TC is set on a cut response if `limit.set_tc`.
/// `answer` is left holding what was sent. Returns whether anything was cut.
pub fn encode_response(
    metadata: &Metadata,
    query: Option<&Query>,
    answer: &mut DnsAnswer,
    edns: Option<&Edns>,
    limit: SizeLimit,
    out: &mut Vec<u8>,
) -> Result<bool, ProtoError> {
    let max = limit.bytes.clamp(512, MAX_MESSAGE);
    let mut meta = *metadata;
    meta.response_code = answer.response_code;
    let mut cut = false;
    if let Some(n) = limit.answers
        && answer.answers.len() > n
    {
        answer.answers.truncate(n);
        answer.additionals = resync_additionals(&answer.answers, &answer.additionals);
        cut = true;
    }
    meta.truncation = cut && limit.set_tc;
    let a = &*answer;
    if emit_within(&meta, query, a.sections(), edns, max, out)? {
        return Ok(cut);
    }

    // Too large: find the most answers that fit.
    meta.truncation = limit.set_tc;
    let n = answer.answers.len();
    let fits = |k: usize, out: &mut Vec<u8>| -> Result<bool, ProtoError> {
        let extra = resync_additionals(&answer.answers[..k], &answer.additionals);
        emit_within(
            &meta,
            query,
            Sections { answers: &answer.answers[..k], authorities: &answer.authorities, additionals: &extra },
            edns,
            max,
            out,
        )
    };
    let (mut lo, mut hi) = (0, n);
    if fits(0, out)? {
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid, out)? { lo = mid } else { hi = mid - 1 }
        }
        answer.answers.truncate(lo);
        answer.additionals = resync_additionals(&answer.answers, &answer.additionals);
    } else {
        // Not even the other sections fit: send the bare header and question.
        answer.answers.clear();
        answer.authorities.clear();
        answer.additionals.clear();
    }
    let a = &*answer;
    if !emit_within(&meta, query, a.sections(), edns, max, out)? {
        return Err(ProtoError::Message("response header and question do not fit"));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Check, Node, Weights};
    use hickory_proto::op::{Message, MessageType, OpCode};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::{BTreeMap, BTreeSet};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn parse_query_name(qname: &Name, qtype: RecordType, cfg: &DnsConfig) -> QueryName {
        DnsZone::new(cfg.clone()).unwrap().parse(qname, qtype).0
    }

    fn build_answer(
        c: &CatalogState,
        qname: &Name,
        qtype: RecordType,
        cfg: &DnsConfig,
        unix_time: u64,
        rng: &mut StdRng,
    ) -> DnsAnswer {
        let zone = DnsZone::new(cfg.clone()).unwrap();
        zone.answer(&DnsIndex::build(c, &zone, None), qname, qtype, unix_time, rng)
    }

    fn parse(s: &str) -> QueryName {
        parse_query_name(&name(s), RecordType::A, &DnsConfig::default())
    }

    fn svc(service: &str, tag: Option<&str>, dc: Option<&str>) -> QueryName {
        QueryName::Service { service: service.into(), tag: tag.map(Into::into), datacenter: dc.map(Into::into) }
    }

    fn node(n: &str, dc: Option<&str>) -> QueryName {
        QueryName::Node { node: n.into(), datacenter: dc.map(Into::into) }
    }

    #[test]
    fn parses_services_case_insensitively_with_tags_and_dc() {
        assert_eq!(parse("web.service.mesh."), svc("web", None, None));
        assert_eq!(parse("WeB.SeRvIcE.MESH."), svc("web", None, None));
        assert_eq!(parse("web.service.mesh"), svc("web", None, None));
        assert_eq!(parse("web.service.dc1.mesh."), svc("web", None, Some("dc1")));
        assert_eq!(parse("web.service.DC2.dc.mesh."), svc("web", None, Some("dc2")));
        assert_eq!(parse("Primary.web.service.mesh."), svc("web", Some("primary"), None));
        assert_eq!(parse("v1.2.web.service.dc1.mesh."), svc("web", Some("v1.2"), Some("dc1")));
        assert_eq!(parse("service.mesh."), QueryName::Invalid);
        assert_eq!(parse("web.service.a.b.mesh."), QueryName::Invalid);
        assert_eq!(parse("web.mesh."), QueryName::Invalid);
        assert_eq!(parse("web.connect.mesh."), QueryName::Invalid);
        assert_eq!(parse("mesh."), QueryName::Apex);
        assert_eq!(parse("MESH."), QueryName::Apex);
    }

    #[test]
    fn parses_rfc2782() {
        let cfg = DnsConfig::default();
        let srv = |s: &str| parse_query_name(&name(s), RecordType::SRV, &cfg);
        assert_eq!(srv("_web._tcp.service.mesh."), svc("web", None, None));
        assert_eq!(srv("_Web._TCP.service.dc1.mesh."), svc("web", None, Some("dc1")));
        assert_eq!(srv("_dns._udp.service.mesh."), svc("dns", Some("udp"), None));
        assert_eq!(srv("_web._http.service.mesh."), svc("web", Some("http"), None));
        // Without the `service` label: SRV only.
        assert_eq!(srv("_web._tcp.mesh."), svc("web", None, None));
        assert_eq!(srv("_web._tcp.dc1.mesh."), svc("web", None, Some("dc1")));
        assert_eq!(parse("_web._tcp.mesh."), QueryName::Invalid);
        // The RFC 2782 form through the `service` label also works for A queries.
        assert_eq!(parse("_web._tcp.service.mesh."), svc("web", None, None));
    }

    #[test]
    fn parses_nodes_and_addresses() {
        assert_eq!(parse("host-1.node.mesh."), node("host-1", None));
        assert_eq!(parse("Host-1.Node.DC1.mesh."), node("host-1", Some("dc1")));
        assert_eq!(parse("host.example.com.node.dc1.mesh."), node("host.example.com", Some("dc1")));
        // The rightmost keyword wins: a node called `web.service`.
        assert_eq!(parse("web.service.node.mesh."), node("web.service", None));
        assert_eq!(parse("node.mesh."), QueryName::Invalid);
        assert_eq!(
            parse("0A000001.addr.dc1.mesh."),
            QueryName::Addr { ip: "10.0.0.1".parse().unwrap(), datacenter: Some("dc1".into()) }
        );
        assert_eq!(
            parse("20010db8000000000000000000000001.addr.mesh."),
            QueryName::Addr { ip: "2001:db8::1".parse().unwrap(), datacenter: None }
        );
        assert_eq!(parse("0a0001.addr.mesh."), QueryName::Invalid);
        assert_eq!(parse("zz000001.addr.mesh."), QueryName::Invalid);
        assert_eq!(hex_ip("10.0.0.1".parse().unwrap()), "0a000001");
    }

    #[test]
    fn names_outside_the_domain() {
        assert_eq!(parse("example.com."), QueryName::Outside);
        assert_eq!(parse("web.service.consul."), QueryName::Outside);
        assert_eq!(parse("."), QueryName::Outside);
        assert_eq!(parse("mesh.example.com."), QueryName::Outside);
        let cfg = DnsConfig { domain: "Svc.Example.".into(), ..DnsConfig::default() };
        assert_eq!(parse_query_name(&name("web.service.svc.example."), RecordType::A, &cfg), svc("web", None, None));
        assert_eq!(parse_query_name(&name("web.service.example."), RecordType::A, &cfg), QueryName::Outside);
        assert_eq!(parse_query_name(&name("web.service.mesh."), RecordType::A, &cfg), QueryName::Outside);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn inst(id: &str, service: &str, node: &str, address: Option<&str>, port: u16, health: Health) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            service: service.into(),
            node: node.into(),
            address: address.map(ip),
            port,
            tags: vec!["primary".into()],
            meta: BTreeMap::new(),
            health,
            source_health: Default::default(),
            weights: Default::default(),
            create_index: 0,
            modify_index: 0,
            extra: Default::default(),
        }
    }

    fn catalog() -> CatalogState {
        let mut c = CatalogState::new("dc1");
        for (n, a) in [("host-1", "10.0.0.1"), ("host-2", "10.0.0.2"), ("host-3.rack", "10.0.0.3")] {
            let node = Node {
                name: n.into(),
                address: ip(a),
                datacenter: "dc1".into(),
                meta: BTreeMap::new(),
                create_index: 0,
                modify_index: 0,
                tagged_addresses: Default::default(),
            };
            c.upsert_node(node, 1);
        }
        c.upsert_instance(inst("w1", "web", "host-1", None, 31001, Health::Passing), 2);
        c.upsert_instance(inst("w2", "web", "host-2", None, 31002, Health::Warning), 3);
        c.upsert_instance(inst("w3", "web", "host-3.rack", None, 31003, Health::Critical), 4);
        // Same address as w1: deduplicated in A answers, but a distinct SRV (other port).
        c.upsert_instance(inst("w4", "web", "host-1", Some("10.0.0.1"), 31004, Health::Passing), 5);
        c.upsert_instance(inst("d1", "db", "host-3.rack", Some("10.9.9.9"), 5432, Health::Passing), 6);
        c.upsert_instance(inst("x1", "down", "host-1", None, 1, Health::Critical), 7);
        c
    }

    fn ask(c: &CatalogState, q: &str, t: RecordType) -> DnsAnswer {
        build_answer(c, &name(q), t, &DnsConfig::default(), 1_700_000_000, &mut StdRng::seed_from_u64(7))
    }

    fn a_ips(records: &[Record]) -> BTreeSet<IpAddr> {
        records
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    fn is_soa(r: &Record) -> bool {
        matches!(&r.data, RData::SOA(soa)
            if soa.mname == name("ns.mesh.") && soa.rname == name("hostmaster.mesh.")
                && soa.serial == 1_700_000_000 && soa.refresh == 3600 && soa.retry == 600
                && soa.expire == 86400 && soa.minimum == 0)
    }

    #[test]
    fn prepared_query_names() {
        let q = |n: &str, dc: Option<&str>| QueryName::Query { name: n.into(), datacenter: dc.map(Into::into) };
        assert_eq!(parse("web.query.mesh."), q("web", None));
        assert_eq!(parse("Web.Query.dc2.mesh."), q("web", Some("dc2")));
        assert_eq!(parse("a.b.query.mesh."), q("a.b", None));
        let srv = parse_query_name(&name("_web._tcp.query.mesh."), RecordType::SRV, &DnsConfig::default());
        assert_eq!(srv, q("web", None));
        assert_eq!(parse("query.mesh."), QueryName::Invalid);
    }

    /// Names this node's catalog cannot answer are asked beyond it: another datacenter, a
    /// prepared query, and (only with `failover_nearest`, only without a datacenter named) a
    /// service with nothing answerable here. The answer meanwhile is NXDOMAIN.
    #[test]
    fn asks_beyond_the_catalog() {
        let c = catalog();
        let remote = |q: &str, cfg: &DnsConfig| {
            let a = build_answer(&c, &name(q), RecordType::A, cfg, 0, &mut StdRng::seed_from_u64(1));
            (a.response_code, a.remote)
        };
        let cfg = DnsConfig::default();
        let nx = ResponseCode::NXDomain;
        let service = |dc: &str, s: &str, tag: Option<&str>| RemoteAsk::Service {
            dc: dc.into(),
            service: s.into(),
            tag: tag.map(Into::into),
        };
        assert_eq!(remote("web.service.dc2.mesh.", &cfg), (nx, Some(service("dc2", "web", None))));
        assert_eq!(remote("v1.web.service.dc2.mesh.", &cfg), (nx, Some(service("dc2", "web", Some("v1")))));
        assert_eq!(
            remote("n1.node.dc2.mesh.", &cfg),
            (nx, Some(RemoteAsk::Node { dc: "dc2".into(), node: "n1".into() }))
        );
        assert_eq!(remote("web.query.mesh.", &cfg), (nx, Some(RemoteAsk::Query { name: "web".into(), dc: None })));
        assert_eq!(
            remote("web.query.dc1.mesh.", &cfg),
            (nx, Some(RemoteAsk::Query { name: "web".into(), dc: None })),
            "our own datacenter named"
        );
        assert_eq!(remote("down.service.mesh.", &cfg), (nx, None), "no failover by default");
        let failover = DnsConfig { failover_nearest: true, ..cfg.clone() };
        let want = RemoteAsk::Failover { service: "down".into(), tag: None };
        assert_eq!(remote("down.service.mesh.", &failover), (nx, Some(want)));
        assert_eq!(
            remote("nosuch.service.mesh.", &failover).1,
            Some(RemoteAsk::Failover { service: "nosuch".into(), tag: None })
        );
        assert_eq!(remote("down.service.dc1.mesh.", &failover), (nx, None), "a datacenter named: no failover");
        assert_eq!(remote("web.service.mesh.", &failover).0, ResponseCode::NoError, "answerable here");
    }

    /// What another datacenter holds is answered as its own DNS would, owned by the question.
    #[test]
    fn answers_from_another_datacenter() {
        let mut dc2 = CatalogState::new("dc2");
        let node = Node {
            name: "n1".into(),
            address: ip("10.2.0.1"),
            datacenter: "dc2".into(),
            meta: BTreeMap::new(),
            create_index: 0,
            modify_index: 0,
            tagged_addresses: Default::default(),
        };
        dc2.upsert_node(node, 1);
        dc2.upsert_instance(inst("w", "web", "n1", None, 8080, Health::Passing), 2);
        dc2.upsert_instance(inst("x", "web", "n1", Some("10.2.0.9"), 8081, Health::Critical), 3);
        let zone = DnsZone::new(DnsConfig::default()).unwrap();
        let found = RemoteFound { datacenter: "dc2".into(), service: "web".into(), catalog: dc2, ttl: Some(7) };
        let ask = RemoteAsk::Failover { service: "web".into(), tag: None };
        let mut rng = StdRng::seed_from_u64(1);
        let qname = name("web.service.mesh.");
        let a = zone.answer_remote(&qname, RecordType::A, &ask, Ok(&found), 0, &mut rng);
        assert_eq!(a.answers.len(), 1, "the critical instance is left out: {a:?}");
        assert_eq!((&a.answers[0].name, a.answers[0].ttl), (&qname, 7));
        assert_eq!(a_ips(&a.answers), BTreeSet::from([ip("10.2.0.1")]));
        let srv = zone.answer_remote(&qname, RecordType::SRV, &ask, Ok(&found), 0, &mut rng);
        let RData::SRV(s) = &srv.answers[0].data else { panic!("{srv:?}") };
        assert_eq!((s.port, &s.target), (8080, &name("n1.node.dc2.mesh.")));
        assert_eq!(srv.additionals[0].name, name("n1.node.dc2.mesh."));
        let miss = zone.answer_remote(&qname, RecordType::A, &ask, Err(RemoteMiss::NoSuchName), 0, &mut rng);
        assert_eq!(miss.response_code, ResponseCode::NXDomain);
        let down = zone.answer_remote(&qname, RecordType::A, &ask, Err(RemoteMiss::Unavailable), 0, &mut rng);
        assert_eq!(down.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn service_a_records_skip_critical_and_dedupe() {
        let c = catalog();
        let ans = ask(&c, "Web.Service.mesh.", RecordType::A);
        assert_eq!(ans.response_code, ResponseCode::NoError);
        assert_eq!(ans.answers.len(), 2);
        assert_eq!(a_ips(&ans.answers), [ip("10.0.0.1"), ip("10.0.0.2")].into());
        assert!(ans.answers.iter().all(|r| r.name == name("Web.Service.mesh.") && r.ttl == 0));
        assert!(ans.authorities.is_empty() && ans.additionals.is_empty());
        // The instance's own address wins over its node's.
        assert_eq!(a_ips(&ask(&c, "db.service.dc1.mesh.", RecordType::A).answers), [ip("10.9.9.9")].into());
        // ANY gives the address records too.
        assert_eq!(ask(&c, "web.service.mesh.", RecordType::ANY).answers.len(), 2);
    }

    #[test]
    fn tag_filter() {
        let mut c = catalog();
        let mut tagged = inst("w5", "web", "host-2", Some("10.0.0.5"), 1, Health::Passing);
        tagged.tags = vec!["Canary".into()];
        c.upsert_instance(tagged, 9);
        assert_eq!(a_ips(&ask(&c, "canary.web.service.mesh.", RecordType::A).answers), [ip("10.0.0.5")].into());
        assert_eq!(a_ips(&ask(&c, "_web._canary.service.mesh.", RecordType::A).answers), [ip("10.0.0.5")].into());
        assert_eq!(ask(&c, "_web._tcp.service.mesh.", RecordType::A).answers.len(), 3);
        assert_eq!(ask(&c, "nope.web.service.mesh.", RecordType::A).response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn srv_records_with_additional() {
        let c = catalog();
        let ans = ask(&c, "_web._tcp.service.mesh.", RecordType::SRV);
        assert_eq!(ans.response_code, ResponseCode::NoError);
        let mut srvs: Vec<(u16, u16, u16, Name)> = ans
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => (s.priority, s.weight, s.port, s.target.clone()),
                other => panic!("not an SRV: {other:?}"),
            })
            .collect();
        srvs.sort();
        assert_eq!(
            srvs,
            vec![
                (1, 1, 31001, name("host-1.node.dc1.mesh.")),
                (1, 1, 31002, name("host-2.node.dc1.mesh.")),
                (1, 1, 31004, name("host-1.node.dc1.mesh.")),
            ]
        );
        // One glue record per target.
        assert_eq!(ans.additionals.len(), 2);
        for extra in &ans.additionals {
            let want = if extra.name == name("host-1.node.dc1.mesh.") { "10.0.0.1" } else { "10.0.0.2" };
            assert_eq!(extra.data, RData::A(A(want.parse().unwrap())));
        }
        // An instance address that differs from its node's gives an `.addr` target.
        let db = ask(&c, "db.service.mesh.", RecordType::SRV);
        let RData::SRV(s) = &db.answers[0].data else { panic!("not an SRV") };
        assert_eq!((s.port, &s.target), (5432, &name("0a090909.addr.dc1.mesh.")));
        assert_eq!(db.additionals[0].name, name("0a090909.addr.dc1.mesh."));
        assert_eq!(db.additionals[0].data, RData::A(A("10.9.9.9".parse().unwrap())));
        // Node names with dots become several labels.
        let mut c2 = catalog();
        c2.upsert_instance(inst("r1", "rack", "host-3.rack", None, 80, Health::Passing), 9);
        let RData::SRV(s) = &ask(&c2, "rack.service.mesh.", RecordType::SRV).answers[0].data else { panic!() };
        assert_eq!(s.target, name("host-3.rack.node.dc1.mesh."));
    }

    #[test]
    fn answers_are_shuffled() {
        let mut c = CatalogState::new("dc1");
        for i in 1..=5u8 {
            let addr = format!("10.1.0.{i}");
            c.upsert_instance(
                inst(&format!("i{i}"), "many", "nowhere", Some(&addr), 80, Health::Passing),
                u64::from(i),
            );
        }
        let cfg = DnsConfig::default();
        let mut a_orders = BTreeSet::new();
        let mut srv_orders = BTreeSet::new();
        for seed in 0..64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let a = build_answer(&c, &name("many.service.mesh."), RecordType::A, &cfg, 0, &mut rng);
            assert_eq!(a.answers.len(), 5);
            a_orders.insert(format!("{:?}", a.answers.iter().map(|r| r.data.clone()).collect::<Vec<_>>()));
            let s = build_answer(&c, &name("many.service.mesh."), RecordType::SRV, &cfg, 0, &mut rng);
            assert_eq!((s.answers.len(), s.additionals.len()), (5, 5));
            srv_orders.insert(format!("{:?}", s.answers.iter().map(|r| r.data.clone()).collect::<Vec<_>>()));
        }
        assert!(a_orders.len() > 10, "only {} distinct A orders", a_orders.len());
        assert!(srv_orders.len() > 10, "only {} distinct SRV orders", srv_orders.len());
    }

    #[test]
    fn nodes() {
        let c = catalog();
        let ans = ask(&c, "HOST-2.node.mesh.", RecordType::A);
        assert_eq!((ans.response_code, a_ips(&ans.answers)), (ResponseCode::NoError, [ip("10.0.0.2")].into()));
        let ans = ask(&c, "host-3.rack.node.dc1.mesh.", RecordType::A);
        assert_eq!(a_ips(&ans.answers), [ip("10.0.0.3")].into());
        let ans = ask(&c, "0a000063.addr.dc1.mesh.", RecordType::A);
        assert_eq!(a_ips(&ans.answers), [ip("10.0.0.99")].into());
        let ans = ask(&c, "ghost.node.mesh.", RecordType::A);
        assert_eq!(ans.response_code, ResponseCode::NXDomain);
        assert!(ans.answers.is_empty() && ans.authorities.len() == 1 && is_soa(&ans.authorities[0]));
    }

    #[test]
    fn nxdomain_with_soa() {
        let c = catalog();
        for q in [
            "nope.service.mesh.",    // unknown service
            "down.service.mesh.",    // only critical instances
            "web.service.dc2.mesh.", // unknown datacenter
            "host-1.node.dc2.mesh.", // unknown datacenter
            "whatever.mesh.",        // no keyword
            "web.query.mesh.",       // prepared queries are not served
        ] {
            let ans = ask(&c, q, RecordType::A);
            assert_eq!(ans.response_code, ResponseCode::NXDomain, "{q}");
            assert!(ans.answers.is_empty() && ans.additionals.is_empty(), "{q}");
            assert_eq!(ans.authorities.len(), 1, "{q}");
            assert!(is_soa(&ans.authorities[0]), "{q}: {:?}", ans.authorities[0]);
            assert_eq!(ans.authorities[0].name, name("mesh."));
        }
        let cfg = DnsConfig { soa_min_ttl: 30, ..DnsConfig::default() };
        let ans = build_answer(&c, &name("nope.service.mesh."), RecordType::A, &cfg, 5, &mut StdRng::seed_from_u64(0));
        let RData::SOA(soa) = &ans.authorities[0].data else { panic!() };
        assert_eq!((ans.authorities[0].ttl, soa.minimum, soa.serial), (30, 30, 5));
    }

    #[test]
    fn nodata_with_soa() {
        let c = catalog();
        for (q, t) in [
            ("web.service.mesh.", RecordType::AAAA), // IPv4-only service
            ("web.service.mesh.", RecordType::TXT),
            ("host-1.node.mesh.", RecordType::AAAA),
            ("host-1.node.mesh.", RecordType::SRV),
            ("mesh.", RecordType::A),
        ] {
            let ans = ask(&c, q, t);
            assert_eq!(ans.response_code, ResponseCode::NoError, "{q} {t}");
            assert!(ans.answers.is_empty() && ans.additionals.is_empty(), "{q} {t}");
            assert!(ans.authorities.len() == 1 && is_soa(&ans.authorities[0]), "{q} {t}");
        }
    }

    #[test]
    fn apex_soa_refused_and_notimp() {
        let c = catalog();
        let ans = ask(&c, "Mesh.", RecordType::SOA);
        assert_eq!(ans.response_code, ResponseCode::NoError);
        assert_eq!(ans.answers.len(), 1);
        assert!(is_soa(&ans.answers[0]));
        assert_eq!(ans.answers[0].name, name("Mesh."));
        let ans = ask(&c, "example.com.", RecordType::A);
        assert_eq!(ans, DnsAnswer { recurse: true, ..DnsAnswer::new(ResponseCode::Refused) });
        assert_eq!(ask(&c, "mesh.", RecordType::AXFR).response_code, ResponseCode::NotImp);
    }

    #[test]
    fn ttls_from_config() {
        let c = catalog();
        let cfg = DnsConfig { node_ttl: 7, service_ttl: ServiceTtls::parse(["*=9"]).unwrap(), ..DnsConfig::default() };
        let mut rng = StdRng::seed_from_u64(1);
        let n = build_answer(&c, &name("host-1.node.mesh."), RecordType::A, &cfg, 0, &mut rng);
        assert_eq!(n.answers[0].ttl, 7);
        let s = build_answer(&c, &name("web.service.mesh."), RecordType::SRV, &cfg, 0, &mut rng);
        assert!(s.answers.iter().chain(&s.additionals).all(|r| r.ttl == 9));
    }

    #[test]
    fn ipv6_instances() {
        let mut c = CatalogState::new("dc1");
        c.upsert_instance(inst("v6", "six", "nowhere", Some("2001:db8::1"), 80, Health::Passing), 1);
        assert_eq!(a_ips(&ask(&c, "six.service.mesh.", RecordType::AAAA).answers), [ip("2001:db8::1")].into());
        let ans = ask(&c, "six.service.mesh.", RecordType::A);
        assert!(ans.response_code == ResponseCode::NoError && ans.answers.is_empty());
        let srv = ask(&c, "six.service.mesh.", RecordType::SRV);
        let RData::SRV(s) = &srv.answers[0].data else { panic!() };
        assert_eq!(s.target, name("20010db8000000000000000000000001.addr.dc1.mesh."));
        assert_eq!(a_ips(&srv.additionals), [ip("2001:db8::1")].into());
    }

    #[test]
    fn service_ttl_selection() {
        let ttls = ServiceTtls::parse(["*=5", "db*=10", "db-prod*=20", "Web=30", "web-*=40s"]).unwrap();
        assert_eq!(ttls.ttl("web"), 30, "exact name");
        assert_eq!(ttls.ttl("WEB"), 30, "case-insensitive");
        assert_eq!(ttls.ttl("web-1"), 40, "prefix");
        assert_eq!(ttls.ttl("db"), 10, "a prefix matches the bare prefix too");
        assert_eq!(ttls.ttl("db-prod-eu"), 20, "longest prefix wins");
        assert_eq!(ttls.ttl("db-staging"), 10);
        assert_eq!(ttls.ttl("other"), 5, "`*` is the default");
        assert_eq!(ServiceTtls::default().ttl("web"), 0, "0 without entries");
        let mut ttls = ServiceTtls::parse(["db*=10"]).unwrap();
        assert_eq!(ttls.ttl("other"), 0);
        ttls.add("db*=11").unwrap();
        assert_eq!(ttls.ttl("db1"), 11, "a later entry replaces an earlier one");
        for bad in ["web", "=5", "web=", "web=x", "web=-1", "w*b=5", "**=5", "web=5m"] {
            assert_eq!(ServiceTtls::parse([bad]), Err(DnsConfigError::ServiceTtl(bad.into())), "{bad}");
        }
    }

    #[test]
    fn reverse_names() {
        let rev = |s: &str| parse_reverse_name(&name(s));
        assert_eq!(rev("4.3.2.10.in-addr.arpa."), Some(Some(ip("10.2.3.4"))));
        assert_eq!(rev("1.0.0.127.IN-ADDR.ARPA."), Some(Some(ip("127.0.0.1"))));
        assert_eq!(rev("0.0.0.0.in-addr.arpa."), Some(Some(ip("0.0.0.0"))));
        assert_eq!(rev("3.2.10.in-addr.arpa."), Some(None), "a network, not an address");
        assert_eq!(rev("1.4.3.2.10.in-addr.arpa."), Some(None));
        assert_eq!(rev("256.3.2.10.in-addr.arpa."), Some(None));
        assert_eq!(rev("04.3.2.10.in-addr.arpa."), Some(None), "leading zero");
        assert_eq!(rev("x.3.2.10.in-addr.arpa."), Some(None));
        assert_eq!(rev("in-addr.arpa."), Some(None));
        let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.";
        assert_eq!(rev(v6), Some(Some(ip("2001:db8::1"))));
        assert_eq!(rev(&v6.to_uppercase()), Some(Some(ip("2001:db8::1"))));
        assert_eq!(rev("8.b.d.0.1.0.0.2.ip6.arpa."), Some(None));
        assert_eq!(rev(&v6.replacen("1.", "10.", 1)), Some(None), "one nibble per label");
        assert_eq!(rev(&v6.replacen("1.", "g.", 1)), Some(None));
        assert_eq!(rev("4.3.2.10.in-addr.example."), None);
        assert_eq!(rev("example.com."), None);
        assert_eq!(rev("arpa."), None);
    }

    #[test]
    fn ptr_answers() {
        let mut c = catalog();
        // 10.0.0.1 is both host-1's address and w4's: the node wins.
        c.upsert_instance(inst("d2", "db", "host-1", Some("10.9.9.8"), 5432, Health::Critical), 20);
        let cfg = DnsConfig { alt_domain: Some("alt.example".into()), node_ttl: 4, ..DnsConfig::default() };
        let ptr = |q: &str, t: RecordType| build_answer(&c, &name(q), t, &cfg, 0, &mut StdRng::seed_from_u64(0));
        let target = |a: &DnsAnswer| match &a.answers[..] {
            [r] => match &r.data {
                RData::PTR(p) => (r.name.clone(), r.ttl, p.0.clone()),
                other => panic!("not a PTR: {other:?}"),
            },
            other => panic!("answers: {other:?}"),
        };
        let q = "1.0.0.10.in-addr.arpa.";
        assert_eq!(target(&ptr(q, RecordType::PTR)), (name(q), 4, name("host-1.node.dc1.mesh.")));
        assert_eq!(target(&ptr("3.0.0.10.IN-ADDR.ARPA.", RecordType::PTR)).2, name("host-3.rack.node.dc1.mesh."));
        // Service addresses (critical instances too: PTR names an address, not a healthy instance).
        assert_eq!(target(&ptr("9.9.9.10.in-addr.arpa.", RecordType::PTR)).2, name("db.service.dc1.mesh."));
        assert_eq!(target(&ptr("8.9.9.10.in-addr.arpa.", RecordType::ANY)).2, name("db.service.dc1.mesh."));
        // Known address, other type: NODATA.
        let a = ptr(q, RecordType::A);
        assert!(a.response_code == ResponseCode::NoError && a.answers.is_empty() && a.authorities.len() == 1);
        // Unknown addresses and networks: for the recursors, else NXDOMAIN with the SOA.
        for q in ["7.7.7.7.in-addr.arpa.", "0.10.in-addr.arpa."] {
            let a = ptr(q, RecordType::PTR);
            assert!(a.recurse, "{q}");
            assert_eq!(a.response_code, ResponseCode::NXDomain, "{q}");
            assert!(matches!(a.authorities[0].data, RData::SOA(_)), "{q}");
        }
        let mut c6 = CatalogState::new("dc1");
        c6.upsert_instance(inst("v6", "six", "nowhere", Some("2001:db8::1"), 80, Health::Passing), 1);
        let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.";
        let a = build_answer(&c6, &name(v6), RecordType::PTR, &cfg, 0, &mut StdRng::seed_from_u64(0));
        assert_eq!(target(&a).2, name("six.service.dc1.mesh."));
    }

    #[test]
    fn alt_domain_answers_in_the_domain_asked() {
        let c = catalog();
        let cfg = DnsConfig { alt_domain: Some("Alt.Example.".into()), ..DnsConfig::default() };
        let zone = DnsZone::new(cfg.clone()).unwrap();
        assert_eq!(zone.parse(&name("web.service.alt.example."), RecordType::A), (svc("web", None, None), 1));
        assert_eq!(zone.parse(&name("web.service.mesh."), RecordType::A), (svc("web", None, None), 0));
        assert_eq!(zone.parse(&name("web.service.example."), RecordType::A).0, QueryName::Outside);
        let ask = |q: &str, t| build_answer(&c, &name(q), t, &cfg, 0, &mut StdRng::seed_from_u64(3));
        let srv = ask("_web._tcp.service.dc1.alt.example.", RecordType::SRV);
        let targets: BTreeSet<Name> = srv
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.target.clone(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(targets, [name("host-1.node.dc1.alt.example."), name("host-2.node.dc1.alt.example.")].into());
        assert!(srv.additionals.iter().all(|r| targets.contains(&r.name)));
        let db = ask("db.service.alt.example.", RecordType::SRV);
        assert!(matches!(&db.answers[0].data, RData::SRV(s) if s.target == name("0a090909.addr.dc1.alt.example.")));
        // Negative answers carry the SOA of the domain asked.
        let nx = ask("nope.service.alt.example.", RecordType::A);
        assert_eq!(nx.response_code, ResponseCode::NXDomain);
        let RData::SOA(soa) = &nx.authorities[0].data else { panic!() };
        assert_eq!((&nx.authorities[0].name, &soa.mname), (&name("alt.example."), &name("ns.alt.example.")));
        assert_eq!(a_ips(&ask("host-2.node.alt.example.", RecordType::A).answers), [ip("10.0.0.2")].into());
        // A domain nested in the other: the longer one is the one used.
        let nested = DnsConfig { alt_domain: Some("x.mesh".into()), ..DnsConfig::default() };
        let zone = DnsZone::new(nested).unwrap();
        assert_eq!(zone.parse(&name("web.service.x.mesh."), RecordType::A), (svc("web", None, None), 1));
        assert!(DnsZone::new(DnsConfig { alt_domain: Some("..".into()), ..DnsConfig::default() }).is_err());
        assert!(DnsZone::new(DnsConfig { domain: "a".repeat(64), ..DnsConfig::default() }).is_err());
        assert!(DnsZone::new(DnsConfig { datacenter: "a.b".into(), ..DnsConfig::default() }).is_err());
    }

    fn with_meta() -> CatalogState {
        let mut c = catalog();
        let mut node = c.nodes["host-1"].clone();
        node.meta = [("rack".to_owned(), "r1".to_owned()), ("rfc1035-x".to_owned(), "bare".to_owned())].into();
        c.upsert_node(node, 30);
        c
    }

    fn txts(records: &[Record]) -> BTreeSet<(Name, String)> {
        records
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some((r.name.clone(), t.to_string())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn node_meta_as_txt() {
        let c = with_meta();
        let meta = |owner: &str| -> BTreeSet<(Name, String)> {
            [(name(owner), "bare".to_owned()), (name(owner), "rack=r1".to_owned())].into()
        };
        let a = ask(&c, "host-1.node.mesh.", RecordType::A);
        assert_eq!((a.answers.len(), txts(&a.additionals)), (1, meta("host-1.node.mesh.")));
        let t = ask(&c, "host-1.node.mesh.", RecordType::TXT);
        assert_eq!((txts(&t.answers), t.additionals.len()), (meta("host-1.node.mesh."), 0));
        let any = ask(&c, "host-1.node.mesh.", RecordType::ANY);
        assert_eq!((a_ips(&any.answers), txts(&any.answers)), ([ip("10.0.0.1")].into(), meta("host-1.node.mesh.")));
        // No meta: TXT is NODATA.
        let t = ask(&c, "host-2.node.mesh.", RecordType::TXT);
        assert!(t.response_code == ResponseCode::NoError && t.answers.is_empty() && t.authorities.len() == 1);
        // SRV targets that are the node's name carry its meta in Additional.
        let srv = ask(&c, "web.service.mesh.", RecordType::SRV);
        assert_eq!(txts(&srv.additionals), meta("host-1.node.dc1.mesh."));
    }

    #[test]
    fn apex_ns_and_soa() {
        let c = catalog();
        let cfg = DnsConfig { servers: vec!["HOST-2".into(), "ghost".into()], node_ttl: 3, ..DnsConfig::default() };
        let ask = |q: &str, t| build_answer(&c, &name(q), t, &cfg, 0, &mut StdRng::seed_from_u64(3));
        let ns = ask("mesh.", RecordType::NS);
        assert_eq!(ns.response_code, ResponseCode::NoError);
        assert!(matches!(&ns.answers[..], [r] if r.ttl == 3 && r.data == RData::NS(NS(name("host-2.node.dc1.mesh.")))));
        assert_eq!(ns.additionals, vec![addr_record(&name("host-2.node.dc1.mesh."), ip("10.0.0.2"), 3)]);
        let any = ask("mesh.", RecordType::ANY);
        assert!(
            matches!(&any.answers[..], [soa, ns] if matches!(soa.data, RData::SOA(_)) && matches!(ns.data, RData::NS(_)))
        );
        // Without a known server node: `ns.<domain>`.
        let ns =
            build_answer(&c, &name("mesh."), RecordType::NS, &DnsConfig::default(), 0, &mut StdRng::seed_from_u64(0));
        assert!(matches!(&ns.answers[..], [r] if r.data == RData::NS(NS(name("ns.mesh.")))));
        assert!(ns.additionals.is_empty());
    }

    #[test]
    fn only_passing_and_datacenter_labels() {
        let c = catalog();
        let cfg = DnsConfig { only_passing: true, ..DnsConfig::default() };
        let a = build_answer(&c, &name("web.service.mesh."), RecordType::A, &cfg, 0, &mut StdRng::seed_from_u64(0));
        assert_eq!(a_ips(&a.answers), [ip("10.0.0.1")].into(), "the warning instance is left out");
        assert_eq!(a_ips(&ask(&c, "web.service.dc1.dc.mesh.", RecordType::A).answers).len(), 2);
        assert_eq!(a_ips(&ask(&c, "host-1.node.DC1.DC.mesh.", RecordType::A).answers), [ip("10.0.0.1")].into());
        assert_eq!(ask(&c, "web.service.dc2.dc.mesh.", RecordType::A).response_code, ResponseCode::NXDomain);
        assert_eq!(ask(&c, "web.service.dc1.xx.mesh.", RecordType::A).response_code, ResponseCode::NXDomain);
        // The dc of an `.addr` name is ignored, as in Consul.
        assert_eq!(a_ips(&ask(&c, "0a000001.addr.dc9.mesh.", RecordType::A).answers), [ip("10.0.0.1")].into());
    }

    #[test]
    fn index_reuses_unchanged_services() {
        let zone = DnsZone::new(DnsConfig::default()).unwrap();
        let mut c = catalog();
        let first = DnsIndex::build(&c, &zone, None);
        c.upsert_instance(inst("d9", "db", "host-2", None, 1, Health::Passing), 40);
        let second = DnsIndex::build(&c, &zone, Some(&first));
        assert!(Arc::ptr_eq(&first.services["web"], &second.services["web"]), "web did not change");
        assert!(!Arc::ptr_eq(&first.services["db"], &second.services["db"]), "db changed");
        assert_eq!(second.services["db"].instances.len(), 2);
        // A node change (its address is in every entry) rebuilds everything.
        let mut node = c.nodes["host-1"].clone();
        node.address = ip("10.0.1.1");
        c.upsert_node(node, 41);
        let third = DnsIndex::build(&c, &zone, Some(&second));
        assert!(!Arc::ptr_eq(&second.services["web"], &third.services["web"]));
        let a = zone.answer(&third, &name("web.service.mesh."), RecordType::A, 0, &mut StdRng::seed_from_u64(0));
        assert_eq!(a_ips(&a.answers), [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.1.1")].into());
        assert_eq!(third.service_count(), 3);
    }

    #[test]
    fn srv_weights() {
        let mut c = catalog();
        for id in ["w1", "w2"] {
            let mut i = c.services["web"].values().find(|i| i.id == id).unwrap().clone();
            i.weights = Weights { passing: 10, warning: 3 };
            c.upsert_instance(i, 60);
        }
        let srv = ask(&c, "web.service.mesh.", RecordType::SRV);
        let mut weights: Vec<(u16, u16)> = srv
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => (s.port, s.weight),
                _ => panic!(),
            })
            .collect();
        weights.sort();
        // w1 passing, w2 in warning, w4 with the default weights.
        assert_eq!(weights, [(31001, 10), (31002, 3), (31004, 1)]);
    }

    #[test]
    fn service_names_differing_in_case_answer_together() {
        let mut c = catalog();
        c.upsert_instance(inst("W1", "Web", "nowhere", Some("10.5.5.5"), 80, Health::Passing), 50);
        let a = ask(&c, "WEB.service.mesh.", RecordType::A);
        assert_eq!(a_ips(&a.answers), [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.5.5.5")].into());
    }

    /// `n` passing instances of `big`, each on its own node `node-<i>` (so SRV targets differ).
    fn big_catalog(n: u16) -> CatalogState {
        let mut c = CatalogState::new("dc1");
        for i in 0..n {
            let node = Node {
                name: format!("node-{i}"),
                address: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + u32::from(i))),
                datacenter: "dc1".into(),
                meta: BTreeMap::new(),
                create_index: 0,
                modify_index: 0,
                tagged_addresses: Default::default(),
            };
            c.upsert_node(node, 1);
            c.upsert_instance(inst(&format!("b{i}"), "big", &format!("node-{i}"), None, 20000 + i, Health::Passing), 2);
        }
        c
    }

    /// Encodes the answer to `q`/`t` from `c` within `limit`: (decoded message, bytes, cut).
    fn encoded(
        c: &CatalogState,
        q: &str,
        t: RecordType,
        edns: Option<u16>,
        limit: SizeLimit,
    ) -> (Message, usize, bool) {
        let mut ans = ask(c, q, t);
        let query = Query::query(name(q), t);
        let edns = edns.map(|p| {
            let mut e = Edns::new();
            e.set_max_payload(p);
            e
        });
        let mut meta = Metadata::new(7, MessageType::Response, OpCode::Query);
        meta.authoritative = true;
        let mut out = Vec::new();
        let cut = encode_response(&meta, Some(&query), &mut ans, edns.as_ref(), limit, &mut out).unwrap();
        let msg = Message::from_vec(&out).unwrap();
        assert_eq!((msg.answers.len(), msg.additionals.len()), (ans.answers.len(), ans.additionals.len()));
        (msg, out.len(), cut)
    }

    /// Every Additional record belongs to a kept SRV target, and every kept target has its glue.
    fn additionals_in_sync(m: &Message) {
        let targets: BTreeSet<Name> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some(s.target.clone()),
                _ => None,
            })
            .collect();
        let glue: BTreeSet<Name> = m.additionals.iter().map(|r| r.name.clone()).collect();
        assert_eq!(targets, glue);
    }

    #[test]
    fn trimming_to_fit() {
        let c = big_catalog(20);
        // UDP without EDNS: cut to whole records within 512 bytes, TC set, glue re-synced.
        let (m, len, cut) =
            encoded(&c, "big.service.mesh.", RecordType::SRV, None, SizeLimit::for_request(false, None, false));
        assert!(cut && m.metadata.truncation && m.metadata.authoritative && len <= 512, "{len}");
        assert!(!m.answers.is_empty() && m.answers.len() < 20, "{}", m.answers.len());
        additionals_in_sync(&m);
        // One more answer would not have fitted.
        let full = ask(&c, "big.service.mesh.", RecordType::SRV);
        let k = m.answers.len();
        assert_eq!(m.answers[..], full.answers[..k], "the first answers are kept");
        let extra = resync_additionals(&full.answers[..=k], &full.additionals);
        let meta = Metadata::new(7, MessageType::Response, OpCode::Query);
        let query = Query::query(name("big.service.mesh."), RecordType::SRV);
        let mut out = Vec::new();
        let fits = emit_within(
            &meta,
            Some(&query),
            Sections { answers: &full.answers[..=k], authorities: &[], additionals: &extra },
            None,
            512,
            &mut out,
        )
        .unwrap();
        assert!(!fits);

        // Consul's mode: 3 answers, no TC.
        let consul = SizeLimit::for_request(false, None, true);
        assert_eq!(consul, SizeLimit { bytes: 512, answers: Some(3), set_tc: false });
        let (m, _, cut) = encoded(&c, "big.service.mesh.", RecordType::SRV, None, consul);
        assert!(cut && !m.metadata.truncation);
        assert_eq!((m.answers.len(), m.additionals.len()), (3, 3));
        additionals_in_sync(&m);

        // EDNS: the advertised size (all 20 fit in 4096); never less than 512.
        let (m, len, cut) = encoded(
            &c,
            "big.service.mesh.",
            RecordType::SRV,
            Some(4096),
            SizeLimit::for_request(false, Some(4096), false),
        );
        assert!(!cut && !m.metadata.truncation && len > 512);
        assert_eq!((m.answers.len(), m.additionals.len()), (20, 20));
        assert!(m.edns.is_some());
        assert_eq!(SizeLimit::for_request(false, Some(100), false).bytes, 512);
        assert_eq!(SizeLimit::for_request(false, Some(1232), true).answers, None, "Consul caps non-EDNS only");

        // TCP: everything up to 64 KiB.
        let (m, _, cut) =
            encoded(&c, "big.service.mesh.", RecordType::SRV, None, SizeLimit::for_request(true, None, false));
        assert!(!cut && !m.metadata.truncation && m.answers.len() == 20);
    }

    #[test]
    fn tcp_answers_are_cut_at_64k() {
        let c = big_catalog(5000);
        let (m, len, cut) =
            encoded(&c, "big.service.mesh.", RecordType::A, None, SizeLimit::for_request(true, None, false));
        assert!(cut && m.metadata.truncation && len <= 65535 && len > 60000, "{len}");
        // hickory's encoder stops compressing names past 16 KiB, so about 2,100 A records fit.
        assert!(m.answers.len() > 2000 && m.answers.len() < 5000, "{}", m.answers.len());
        let (m, len, cut) =
            encoded(&c, "big.service.mesh.", RecordType::SRV, None, SizeLimit::for_request(true, None, true));
        assert!(cut && !m.metadata.truncation && len <= 65535, "Consul mode: no TC");
        additionals_in_sync(&m);
    }

    #[test]
    fn small_answers_are_encoded_whole() {
        let c = catalog();
        for t in [RecordType::A, RecordType::SRV] {
            let (m, _, cut) = encoded(&c, "web.service.mesh.", t, None, SizeLimit::for_request(false, None, false));
            assert!(!cut && !m.metadata.truncation);
            assert_eq!(m.queries, vec![Query::query(name("web.service.mesh."), t)]);
        }
        // A negative answer keeps its SOA.
        let (m, _, _) =
            encoded(&c, "nope.service.mesh.", RecordType::A, None, SizeLimit::for_request(false, None, true));
        assert_eq!((m.metadata.response_code, m.authorities.len()), (ResponseCode::NXDomain, 1));
    }

    fn sorted(records: &[Record]) -> Vec<String> {
        let mut v: Vec<String> = records.iter().map(|r| format!("{r:?}")).collect();
        v.sort();
        v
    }

    #[test]
    fn fast_path_matches_the_general_path() {
        let mut c = with_meta();
        let mut six = inst("v6", "web", "nowhere", Some("2001:db8::1"), 80, Health::Passing);
        six.weights = Weights { passing: 7, warning: 1 };
        c.upsert_instance(six, 70);
        c.upsert_instance(inst("r1", "rack", "host-3.rack", None, 80, Health::Passing), 71);
        let mut tagged = inst("w5", "web", "host-2", Some("10.0.0.5"), 1, Health::Passing);
        tagged.tags = vec!["Canary".into()];
        c.upsert_instance(tagged, 72);
        for cfg in [
            DnsConfig::default(),
            DnsConfig {
                alt_domain: Some("alt.example".into()),
                only_passing: true,
                service_ttl: ServiceTtls::parse(["web=9"]).unwrap(),
                recursors: vec!["127.0.0.1:53".parse().unwrap()],
                ..DnsConfig::default()
            },
        ] {
            let zone = DnsZone::new(cfg.clone()).unwrap();
            let index = DnsIndex::build(&c, &zone, None);
            let mut fast_used = 0;
            for q in [
                "web.service.mesh.",
                "WEB.Service.DC1.mesh.",
                "_web._tcp.service.mesh.",
                "primary.web.service.mesh.",
                "canary.web.service.dc1.dc.mesh.",
                "db.service.mesh.",
                "rack.service.mesh.",
                "web.service.alt.example.",
                "nope.service.mesh.",
                "web.service.dc2.mesh.",
                "down.service.mesh.",
                "host-1.node.mesh.",
                "mesh.",
                "example.com.",
            ] {
                for t in [RecordType::A, RecordType::AAAA, RecordType::SRV, RecordType::TXT] {
                    for edns in [None, Some(1232u16)] {
                        for rd in [false, true] {
                            let mut msg = Message::query();
                            msg.metadata.id = 0x4242;
                            msg.metadata.recursion_desired = rd;
                            msg.add_query(Query::query(name(q), t));
                            if let Some(p) = edns {
                                let mut e = Edns::new();
                                e.set_max_payload(p);
                                msg.set_edns(e);
                            }
                            let bytes = msg.to_vec().unwrap();
                            let simple = SimpleQuery::read(&bytes).expect("a simple query");
                            assert_eq!((simple.edns_payload, simple.qtype()), (edns, t));
                            let limit = SizeLimit::for_request(false, edns, cfg.consul_truncation);
                            let mut fast = Vec::new();
                            let mut rng = StdRng::seed_from_u64(5);
                            if !zone.answer_fast(&index, &simple, limit, &mut rng, &mut fast) {
                                continue;
                            }
                            fast_used += 1;
                            let mut general = zone.answer(&index, &name(q), t, 0, &mut rng);
                            assert!(!general.answers.is_empty(), "{q} {t}");
                            let mut meta = Metadata::response_from_request(&msg.metadata);
                            meta.authoritative = true;
                            meta.recursion_available = zone.recursion_available();
                            let e = edns.map(|p| {
                                let mut e = Edns::new();
                                e.set_max_payload(p.max(512));
                                e
                            });
                            let query = Query::query(name(q), t);
                            let mut out = Vec::new();
                            encode_response(&meta, Some(&query), &mut general, e.as_ref(), limit, &mut out).unwrap();
                            let (f, g) = (Message::from_vec(&fast).unwrap(), Message::from_vec(&out).unwrap());
                            let ctx = format!("{q} {t} edns={edns:?} rd={rd}");
                            assert_eq!(f.metadata, g.metadata, "{ctx}");
                            assert_eq!(f.queries, g.queries, "{ctx}");
                            assert_eq!(sorted(&f.answers), sorted(&g.answers), "{ctx}");
                            assert!(f.authorities.is_empty() && g.authorities.is_empty(), "{ctx}");
                            assert_eq!(sorted(&f.additionals), sorted(&g.additionals), "{ctx}");
                            assert_eq!(f.edns.map(|e| e.max_payload()), g.edns.map(|e| e.max_payload()), "{ctx}");
                        }
                    }
                }
            }
            assert!(fast_used >= 40, "the fast path answered {fast_used} times");
        }
    }

    #[test]
    fn simple_queries_only() {
        let plain = |f: &dyn Fn(&mut Message)| {
            let mut m = Message::query();
            m.add_query(Query::query(name("web.service.mesh."), RecordType::A));
            f(&mut m);
            m.to_vec().unwrap()
        };
        assert!(SimpleQuery::read(&plain(&|_| {})).is_some());
        // A response, another opcode, two questions, a class other than IN, EDNS version 1,
        // trailing bytes, a truncated message: the general path.
        assert!(SimpleQuery::read(&plain(&|m| m.metadata.message_type = MessageType::Response)).is_none());
        assert!(SimpleQuery::read(&plain(&|m| m.metadata.op_code = OpCode::Update)).is_none());
        assert!(
            SimpleQuery::read(&plain(&|m| {
                m.add_query(Query::query(name("a.mesh."), RecordType::A));
            }))
            .is_none()
        );
        assert!(
            SimpleQuery::read(&plain(&|m| {
                m.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
            }))
            .is_none()
        );
        assert!(
            SimpleQuery::read(&plain(&|m| {
                let mut e = Edns::new();
                e.set_version(1);
                m.set_edns(e);
            }))
            .is_none()
        );
        let mut bytes = plain(&|_| {});
        bytes.push(0);
        assert!(SimpleQuery::read(&bytes).is_none());
        bytes.truncate(bytes.len() - 3);
        assert!(SimpleQuery::read(&bytes).is_none());
        assert!(SimpleQuery::read(&[0; 11]).is_none());
        // A compressed question name (legal, unusual): the general path.
        let mut ptr = plain(&|_| {});
        ptr.truncate(12);
        ptr.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(SimpleQuery::read(&ptr).is_none());
    }

    /// What a from-scratch build gives (the algorithm the per-change update replaced): services
    /// and nodes by lowercase name, and the PTR target of each address.
    type IndexView = (BTreeMap<String, ServiceEntry>, BTreeMap<String, NodeEntry>, BTreeMap<IpAddr, Name>);

    fn scratch_view(catalog: &CatalogState, zone: &DnsZone) -> IndexView {
        let mut nodes: ImHashMap<String, Arc<NodeEntry>> = ImHashMap::new();
        let mut ptr: BTreeMap<IpAddr, Name> = BTreeMap::new();
        for node in catalog.nodes.values() {
            let Some(names) = zone.node_names(&node.name) else { continue };
            let entry = Arc::new(NodeEntry { address: node.address, names, txt: meta_txt(&node.meta) });
            ptr.entry(node.address).or_insert_with(|| entry.names[0].clone());
            let lower = node.name.to_ascii_lowercase();
            if !nodes.contains_key(&lower) {
                nodes.insert(lower, entry);
            }
        }
        let mut services: BTreeMap<String, ServiceEntry> = BTreeMap::new();
        for (name, instances) in &catalog.services {
            let entry = service_entry(name, instances, &nodes, zone);
            if let Some(svc_name) = zone.name_in_dc([name.as_bytes(), &b"service"[..]], 0) {
                for ip in instances.values().filter_map(|i| i.address) {
                    ptr.entry(ip).or_insert_with(|| svc_name.clone());
                }
            }
            match services.entry(name.to_ascii_lowercase()) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(entry);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    let merged = merge_entries(o.get(), &entry);
                    o.insert(merged);
                }
            }
        }
        let nodes = nodes.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect();
        (services, nodes, ptr)
    }

    fn index_view(index: &DnsIndex) -> IndexView {
        let services = index.services.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect();
        let nodes = index.nodes.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect();
        let ptr = index.ptr.keys().filter_map(|ip| Some((*ip, index.ptr_target(*ip)?.clone()))).collect();
        (services, nodes, ptr)
    }

    #[test]
    fn index_maintained_per_change_equals_a_fresh_build() {
        use rand::Rng;
        let cfg = DnsConfig { alt_domain: Some("alt.".into()), ..DnsConfig::default() };
        let zone = DnsZone::new(cfg).unwrap();
        let node_names = ["n1", "N1", "n2", "host.rack", "n3"];
        let services = ["web", "Web", "db", "api", "cache", "WEB", "q"];
        let ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.1.0.9", "fd00::1"];
        let tags = ["primary", "Blue", "v1"];
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut c = CatalogState::new("dc1");
            let mut index = DnsIndex::default();
            for step in 1..=300u64 {
                let node = node_names[rng.random_range(0..node_names.len())];
                match rng.random_range(0..10) {
                    0 | 1 => {
                        let mut meta = BTreeMap::new();
                        if rng.random_bool(0.5) {
                            meta.insert("rack".to_owned(), format!("r{}", rng.random_range(0..3)));
                        }
                        let address = ip(ips[rng.random_range(0..ips.len())]);
                        let n = Node {
                            name: node.into(),
                            address,
                            datacenter: "dc1".into(),
                            meta,
                            create_index: 0,
                            modify_index: 0,
                            tagged_addresses: Default::default(),
                        };
                        c.upsert_node(n, step);
                    }
                    2 => {
                        c.remove_node(node, step);
                    }
                    3..=5 => {
                        let svc = services[rng.random_range(0..services.len())];
                        let id = format!("{svc}-{}", rng.random_range(0..4));
                        let addr = rng.random_bool(0.5).then(|| ips[rng.random_range(0..ips.len())]);
                        let health = [Health::Passing, Health::Warning, Health::Critical][rng.random_range(0..3)];
                        let mut i = inst(&id, svc, node, addr, rng.random_range(1..4), health);
                        i.tags = tags.iter().filter(|_| rng.random_bool(0.5)).map(|t| t.to_string()).collect();
                        i.weights.passing = rng.random_range(1..3);
                        c.upsert_instance(i, step);
                    }
                    6 => {
                        let svc = services[rng.random_range(0..services.len())];
                        c.remove_instance(svc, node, &format!("{svc}-{}", rng.random_range(0..4)), step);
                    }
                    _ => {
                        // A check of the node, or of one of its instances: health changes.
                        let on: Vec<String> = c.instances_on(node).map(|i| i.id.clone()).collect();
                        let mut chk = Check::new(node, "chk", "chk", Health::Passing);
                        if !on.is_empty() && rng.random_bool(0.5) {
                            chk.service_id = on[rng.random_range(0..on.len())].clone();
                            chk.id = format!("service:{}", chk.service_id);
                        }
                        let status = [Health::Passing, Health::Warning, Health::Critical][rng.random_range(0..3)];
                        if c.set_check_status(node, &chk.id, status, "", 0, step).is_none() {
                            chk.status = status;
                            c.upsert_check(chk, step, true);
                        }
                    }
                }
                // Sometimes several changes at once.
                if rng.random_bool(0.3) {
                    continue;
                }
                let (next, _) = index.update(&c, &zone);
                // Compared as text: names compare without case, but answers carry them as spelled.
                let (got, want) = (format!("{:?}", index_view(&next)), format!("{:?}", scratch_view(&c, &zone)));
                assert_eq!(got, want, "seed {seed}, step {step}");
                assert!(next.is_built_from(&c));
                index = next;
            }
        }
    }
    /// A catalog of `n` services with one instance each, on one node.
    /// A catalog of `n` services with one instance each, on one node.
    fn many_services(n: usize) -> CatalogState {
        let mut c = CatalogState::new("dc1");
        let node = Node {
            name: "n1".into(),
            address: ip("127.0.0.1"),
            datacenter: "dc1".into(),
            meta: BTreeMap::new(),
            create_index: 0,
            modify_index: 0,
            tagged_addresses: Default::default(),
        };
        c.upsert_node(node, 1);
        c.services = (0..n)
            .map(|i| {
                let name = format!("svc-{i}");
                let addr = format!("10.{}.{}.1", i / 256 % 256, i % 256);
                let id = format!("{name}-1");
                let instance = inst(&id, &name, "n1", Some(&addr), 8080, Health::Passing);
                (name, OrdMap::unit(crate::catalog::instance_key("n1", &id), instance))
            })
            .collect();
        c
    }

    #[test]
    fn an_index_update_costs_what_changed_not_the_catalog_size() {
        let zone = DnsZone::new(DnsConfig::default()).unwrap();
        let mut work = Vec::new();
        for n in [1_000, 100_000] {
            let mut c = many_services(n);
            let index = DnsIndex::build(&c, &zone, None);
            assert_eq!(index.service_count(), n);
            // Register a new service, deregister it, and turn an instance critical.
            c.upsert_instance(inst("new-1", "new", "n1", Some("10.255.0.1"), 80, Health::Passing), 10);
            let (index, registered) = index.update(&c, &zone);
            c.remove_instance("new", "n1", "new-1", 11);
            let (index, deregistered) = index.update(&c, &zone);
            let mut down = c.services["svc-7"].values().find(|i| i.id == "svc-7-1").unwrap().clone();
            down.health = Health::Critical;
            c.upsert_instance(down, 12);
            let (index, failed) = index.update(&c, &zone);
            assert_eq!(index_view(&index).0.len(), n);
            assert_eq!(registered.services_rebuilt, 1);
            work.push((registered, deregistered, failed));
        }
        assert_eq!(work[0], work[1], "the same changes cost the same at 1,000 and 100,000 services");
    }
}
