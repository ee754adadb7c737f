//! Consul-style DNS for the catalog, as plain functions: no IO, no clock, no global randomness.
//!
//! [`parse_query_name`] reads a query name against the configured domain (Consul's grammar,
//! case-insensitive, keywords scanned right to left):
//!
//! - `[<tag>.]<service>.service[.<dc>].<domain>` (the tag may contain dots),
//! - RFC 2782 `_<service>._<tag|tcp>[.service][.<dc>].<domain>` (`_tcp` means no tag filter; the
//!   `service` label may be left out only for SRV queries),
//! - `<node>.node[.<dc>].<domain>` (node names may contain dots),
//! - `<hex>.addr[.<dc>].<domain>` (8 hex digits for IPv4, 32 for IPv6),
//!
//! where `<dc>` may also be written `<dc>.dc`.
//!
//! [`build_answer`] turns a query into the sections of a response from a [`CatalogState`]:
//!
//! - service A/AAAA/ANY: one record per non-critical instance (instance address, else its node's),
//!   addresses de-duplicated;
//! - service SRV: priority 1, weight 1, the instance port, target `<node>.node.<dc>.<domain>.` with the
//!   node's address in Additional (or `<hex>.addr.<dc>.<domain>.` when the instance has its own address
//!   that differs from its node's, as Consul does);
//! - node: its address record;
//! - answers shuffled with the caller's rng; critical instances never returned, warning ones are;
//! - NXDOMAIN (SOA in Authority) for names that do not exist, unknown datacenters, services without a
//!   non-critical instance; NOERROR without answers (SOA in Authority) when the name exists but has no
//!   data of the asked type; REFUSED outside the domain (we do not recurse); NOTIMP for zone transfers.

use crate::catalog::{Catalog, CatalogState, Health, ServiceInstance};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use rand::Rng;
use rand::seq::SliceRandom;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// SOA refresh, in seconds (Consul's default).
pub const SOA_REFRESH: i32 = 3600;
/// SOA retry, in seconds (Consul's default).
pub const SOA_RETRY: i32 = 600;
/// SOA expire, in seconds (Consul's default).
pub const SOA_EXPIRE: i32 = 86400;

/// DNS settings (Consul's `domain`, `node_ttl`, `service_ttl` and `soa.min_ttl`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// The domain we answer for, without a trailing dot (default `mesh`); may have several labels.
    pub domain: String,
    /// The local datacenter: the only one that `<name>.service.<dc>.<domain>` may name.
    pub datacenter: String,
    /// TTL (seconds) of node and `.addr` answers.
    pub node_ttl: u32,
    /// TTL (seconds) of service answers (A/AAAA/SRV and their Additional records).
    pub service_ttl: u32,
    /// The SOA `minimum` (negative-caching TTL), also the TTL of the SOA record itself.
    pub soa_min_ttl: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self { domain: "mesh".to_owned(), datacenter: "dc1".to_owned(), node_ttl: 0, service_ttl: 0, soa_min_ttl: 0 }
    }
}

impl DnsConfig {
    /// The domain's labels, lowercased (`"Mesh."` and `"mesh"` both give `["mesh"]`).
    fn domain_labels(&self) -> Vec<String> {
        self.domain.split('.').filter(|l| !l.is_empty()).map(|l| l.to_ascii_lowercase()).collect()
    }

    /// The domain apex as a fully qualified name (`mesh.`); the root if the domain is not a valid name.
    pub fn domain_name(&self) -> Name {
        labels_name(self.domain_labels().iter().map(String::as_str)).unwrap_or_else(|_| Name::root())
    }

    /// `labels` followed by `<dc>.<domain>.`, if that forms a valid name.
    fn name_in_dc<'a>(&self, labels: impl IntoIterator<Item = &'a str>) -> Option<Name> {
        let mut all: Vec<String> = labels.into_iter().map(str::to_owned).collect();
        all.push(self.datacenter.to_ascii_lowercase());
        all.extend(self.domain_labels());
        labels_name(all.iter().map(String::as_str)).ok()
    }
}

/// A fully qualified name from raw labels (any bytes; 1 to 63 of them per label).
fn labels_name<'a>(labels: impl IntoIterator<Item = &'a str>) -> Result<Name, hickory_proto::ProtoError> {
    Name::from_labels(labels.into_iter().map(|l| l.as_bytes()))
}

/// What a query name asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryName {
    /// The domain apex itself (`<domain>.`), where the SOA lives.
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
    /// Inside the domain, but naming nothing we serve: NXDOMAIN.
    Invalid,
    /// Outside the domain: REFUSED, since we have no recursor.
    Outside,
}

/// Parses a query name against `config` (case-insensitive). The query type matters only for the
/// RFC 2782 form without the `service` label, which Consul accepts only for SRV queries.
pub fn parse_query_name(name: &Name, qtype: RecordType, config: &DnsConfig) -> QueryName {
    let labels: Vec<String> = name.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();
    let domain = config.domain_labels();
    if labels.len() < domain.len() || labels[labels.len() - domain.len()..] != domain[..] {
        return QueryName::Outside;
    }
    let rest = &labels[..labels.len() - domain.len()];
    if rest.is_empty() {
        return QueryName::Apex;
    }

    // Scan right to left for the first keyword, as Consul does.
    let mut found = None;
    for i in (0..rest.len()).rev() {
        match rest[i].as_str() {
            kind @ ("service" | "node" | "addr" | "query" | "connect" | "ingress" | "virtual") => {
                found = Some((kind, &rest[..i], &rest[i + 1..]));
                break;
            }
            label if qtype == RecordType::SRV && label.starts_with('_') => {
                found = Some(("service", &rest[..=i], &rest[i + 1..]));
                break;
            }
            _ => {}
        }
    }
    let Some((kind, parts, suffix)) = found else { return QueryName::Invalid };
    let datacenter = match suffix {
        [] => None,
        [dc] => Some(dc.clone()),
        [dc, dc_keyword] if dc_keyword == "dc" => Some(dc.clone()),
        _ => return QueryName::Invalid,
    };

    match kind {
        "service" => match parts {
            [] => QueryName::Invalid,
            [svc, tag] if svc.len() > 1 && svc.starts_with('_') && tag.starts_with('_') => {
                let tag = &tag[1..];
                let tag = (!tag.is_empty() && tag != "tcp").then(|| tag.to_owned());
                QueryName::Service { service: svc[1..].to_owned(), tag, datacenter }
            }
            [tag @ .., svc] => {
                let tag = (!tag.is_empty()).then(|| tag.join("."));
                QueryName::Service { service: svc.clone(), tag, datacenter }
            }
        },
        "node" if !parts.is_empty() => QueryName::Node { node: parts.join("."), datacenter },
        "addr" => match parts {
            [hex] => parse_hex_ip(hex).map_or(QueryName::Invalid, |ip| QueryName::Addr { ip, datacenter }),
            _ => QueryName::Invalid,
        },
        // Prepared queries, Connect, ingress and virtual IPs are not served.
        _ => QueryName::Invalid,
    }
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

/// The sections of a response (the caller adds the header, question and EDNS).
#[derive(Clone, Debug, PartialEq)]
pub struct DnsAnswer {
    /// Response code.
    pub response_code: ResponseCode,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA on negative answers).
    pub authorities: Vec<Record>,
    /// Additional section (addresses of SRV targets).
    pub additionals: Vec<Record>,
}

impl DnsAnswer {
    fn new(response_code: ResponseCode) -> Self {
        Self { response_code, answers: Vec::new(), authorities: Vec::new(), additionals: Vec::new() }
    }
}

/// The SOA record of the domain: `ns.<domain>. hostmaster.<domain>.`, `serial`, 3600, 600, 86400 and
/// `soa_min_ttl`, with TTL `soa_min_ttl`, owned by `owner`.
pub fn soa_record(owner: &Name, config: &DnsConfig, serial: u32) -> Record {
    let domain = config.domain_name();
    let ns = domain.prepend_label("ns").unwrap_or_else(|_| domain.clone());
    let hostmaster = domain.prepend_label("hostmaster").unwrap_or_else(|_| domain.clone());
    let soa = SOA::new(ns, hostmaster, serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, config.soa_min_ttl);
    Record::from_rdata(owner.clone(), config.soa_min_ttl, RData::SOA(soa))
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

/// The address an instance is reached at: its own, else its node's.
fn instance_addr(catalog: &CatalogState, inst: &ServiceInstance) -> Option<IpAddr> {
    inst.address.or_else(|| catalog.node(&inst.node).map(|n| n.address))
}

/// Builds the answer to `qname`/`qtype` from `catalog`. `unix_time` becomes the SOA serial; `rng`
/// shuffles the answers. Answer records are owned by `qname` as given (its case preserved).
pub fn build_answer<R: Rng + ?Sized>(
    catalog: &CatalogState,
    qname: &Name,
    qtype: RecordType,
    config: &DnsConfig,
    unix_time: u64,
    rng: &mut R,
) -> DnsAnswer {
    let parsed = parse_query_name(qname, qtype, config);
    if parsed == QueryName::Outside {
        return DnsAnswer::new(ResponseCode::Refused);
    }
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        return DnsAnswer::new(ResponseCode::NotImp);
    }
    // Consul's serial is the low 32 bits of the Unix time.
    let serial = unix_time as u32;
    let negative = |code: ResponseCode| {
        let mut a = DnsAnswer::new(code);
        a.authorities.push(soa_record(&config.domain_name(), config, serial));
        a
    };
    let known_dc = |dc: &Option<String>| dc.as_ref().is_none_or(|d| d.eq_ignore_ascii_case(&config.datacenter));

    let mut out = DnsAnswer::new(ResponseCode::NoError);
    match parsed {
        QueryName::Outside => unreachable!("handled above"),
        QueryName::Invalid => return negative(ResponseCode::NXDomain),
        QueryName::Apex => {
            if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                out.answers.push(soa_record(qname, config, serial));
            }
        }
        QueryName::Addr { ip, .. } => {
            if wants(qtype, ip) {
                out.answers.push(addr_record(qname, ip, config.node_ttl));
            }
        }
        QueryName::Node { node, datacenter } => {
            if !known_dc(&datacenter) {
                return negative(ResponseCode::NXDomain);
            }
            let Some(node) = catalog.node(&node) else { return negative(ResponseCode::NXDomain) };
            if wants(qtype, node.address) {
                out.answers.push(addr_record(qname, node.address, config.node_ttl));
            }
        }
        QueryName::Service { service, tag, datacenter } => {
            if !known_dc(&datacenter) {
                return negative(ResponseCode::NXDomain);
            }
            let instances: Vec<&ServiceInstance> = catalog
                .instances(&service, tag.as_deref(), false)
                .into_iter()
                .filter(|i| i.health != Health::Critical)
                .collect();
            if instances.is_empty() {
                return negative(ResponseCode::NXDomain);
            }
            if qtype == RecordType::SRV {
                srv_records(catalog, qname, &instances, config, rng, &mut out);
            } else {
                let ttl = config.service_ttl;
                let mut seen: Vec<IpAddr> = Vec::new();
                for ip in instances.iter().filter_map(|i| instance_addr(catalog, i)) {
                    if wants(qtype, ip) && !seen.contains(&ip) {
                        seen.push(ip);
                        out.answers.push(addr_record(qname, ip, ttl));
                    }
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

/// SRV answers for `instances` (shuffled), with their targets' addresses in Additional.
fn srv_records<R: Rng + ?Sized>(
    catalog: &CatalogState,
    qname: &Name,
    instances: &[&ServiceInstance],
    config: &DnsConfig,
    rng: &mut R,
    out: &mut DnsAnswer,
) {
    let ttl = config.service_ttl;
    let mut seen: Vec<(&str, IpAddr, u16)> = Vec::new();
    let mut entries: Vec<(Record, Record)> = Vec::new();
    for inst in instances {
        let node = catalog.node(&inst.node);
        let Some(ip) = inst.address.or(node.map(|n| n.address)) else { continue };
        let key = (inst.node.as_str(), ip, inst.port);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let target = match node {
            Some(n) if n.address == ip => config.name_in_dc(n.name.split('.').chain(["node"])),
            _ => config.name_in_dc([hex_ip(ip).as_str(), "addr"]),
        };
        let Some(target) = target else { continue };
        let srv = Record::from_rdata(qname.clone(), ttl, RData::SRV(SRV::new(1, 1, inst.port, target.clone())));
        entries.push((srv, addr_record(&target, ip, ttl)));
    }
    entries.shuffle(rng);
    for (srv, extra) in entries {
        out.answers.push(srv);
        if !out.additionals.contains(&extra) {
            out.additionals.push(extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Node;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::{BTreeMap, BTreeSet};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
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
        assert_eq!(parse("web.query.mesh."), QueryName::Invalid);
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
        assert_eq!(ans, DnsAnswer::new(ResponseCode::Refused));
        assert_eq!(ask(&c, "mesh.", RecordType::AXFR).response_code, ResponseCode::NotImp);
    }

    #[test]
    fn ttls_from_config() {
        let c = catalog();
        let cfg = DnsConfig { node_ttl: 7, service_ttl: 9, ..DnsConfig::default() };
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
}
