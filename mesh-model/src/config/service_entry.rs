//! Istio's `ServiceEntry` (`networking.istio.io`), as the local file's `serviceEntries[]`
//! (its `metadata` name, namespace and labels beside its `spec` fields, as
//! `peerAuthentications[]` are written), converted as istiod converts one for ambient
//! mode: a service (hostname = the host, VIPs = `addresses`, its ports) and a workload per
//! endpoint address, outside the mesh (R1: plain TCP; a waypoint may originate TLS to
//! it). With `istio.io/use-waypoint` among its labels the service is bound to that
//! waypoint (R7) — Istio's egress through a waypoint.
//!
//! `resolution: STATIC` takes the endpoints' IP addresses; `DNS` resolves the endpoints'
//! host names (or, with no endpoints, the host itself) when the file is loaded; the
//! answers are kept with the snapshot ([`crate::snapshot::Snapshot::dns_answers`]), and
//! ztunnel and the waypoint look them up again every `dns_refresh` (Istio's
//! `dnsRefreshRate`, 60 s), loading the file again when one changed
//! ([`crate::config::dns_changed`]). Several entries (or endpoints) at one address share
//! one workload, which then backs each of their services. Refused with an error naming
//! the field: `resolution: NONE` and `DNS_ROUND_ROBIN`, wildcard hosts, more than one
//! host, `workloadSelector`, and `exportTo` other than `*`.
//!
//! An entry without `addresses` is given one VIP, as Istio allocates them ([`allocate`]:
//! 240.240.0.0/16, by a hash of its namespace and host). Its clients reach it by that
//! address: ztunnel's DNS proxy (`ztunnel.dns`) answers the host with it. Without the
//! proxy they would resolve the host to its own addresses, and go past a waypoint.

use std::collections::BTreeMap;
use std::net::{IpAddr, ToSocketAddrs};

use runtime::config::Invalid;
use serde::Deserialize;

use super::{LocalLocality, LocalProtocol, LocalService, LocalWorkload, NetIp};
use crate::model::Labels;

/// `serviceEntries[]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalServiceEntry {
    pub name: String,
    pub namespace: String,
    /// `metadata.labels`: `istio.io/use-waypoint` binds it to a waypoint.
    #[serde(default)]
    pub labels: Labels,
    pub hosts: Vec<String>,
    /// VIPs: where clients send to reach it.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<SePort>,
    #[serde(default)]
    pub location: SeLocation,
    #[serde(default)]
    pub resolution: SeResolution,
    #[serde(default)]
    pub endpoints: Vec<SeEndpoint>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub workload_selector: Option<SeSelector>,
}

/// `workloadSelector` (refused).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeSelector {
    #[serde(default)]
    pub labels: Labels,
}

/// `ports[]`: `number`, `name`, `protocol` (checked; the waypoint detects what it
/// carries), `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SePort {
    pub number: u16,
    pub name: String,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SeLocation {
    #[default]
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SeResolution {
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

/// `endpoints[]` (Istio's `WorkloadEntry` fields).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SeEndpoint {
    /// An IP address (`STATIC`), or a host name (`DNS`).
    pub address: String,
    /// Port name → the endpoint's port for it.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub network: String,
    /// `region/zone/subzone`.
    #[serde(default)]
    pub locality: String,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: Option<String>,
}

/// The protocols Istio's `ports[].protocol` takes.
const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "REDIS", "MYSQL", "TCP", "TLS", "UDP",
];

/// How a host name is resolved (`DNS`): its addresses. The system's resolver by default.
pub type Resolver<'a> = &'a dyn Fn(&str) -> Result<Vec<IpAddr>, String>;

/// A resolver function as a setting: the system's by default, a test's own; any two
/// compare equal (what resolves is not part of a configuration).
#[derive(Clone, Copy)]
pub struct ResolverFn(pub fn(&str) -> Result<Vec<IpAddr>, String>);

impl Default for ResolverFn {
    fn default() -> Self {
        ResolverFn(system_resolver)
    }
}

impl PartialEq for ResolverFn {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for ResolverFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResolverFn")
    }
}

/// The address Istio would allocate an entry without `addresses` (its `ipAutoallocate`
/// range, 240.240.0.0/16): one picked by a hash of `namespace/host`, else the next free
/// one after it; `None` when `taken` says all are.
pub fn allocate(namespace: &str, host: &str, taken: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    // FNV-1a of `namespace/host` (the host as services are found by it).
    let mut h: u32 = 0x811c_9dc5;
    for b in namespace
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(crate::names::host_key(host).bytes())
    {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    // 240.240.0.1 ..= 240.240.255.254.
    const SIZE: u32 = 65534;
    (0..SIZE).find_map(|i| {
        let n = (h % SIZE + i) % SIZE + 1;
        let ip = IpAddr::V4(std::net::Ipv4Addr::new(240, 240, (n >> 8) as u8, n as u8));
        (!taken(ip)).then_some(ip)
    })
}

/// The system's resolver (`getaddrinfo`), each address once, in its order.
pub fn system_resolver(host: &str) -> Result<Vec<IpAddr>, String> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in (host, 0).to_socket_addrs().map_err(|e| e.to_string())? {
        if !out.contains(&a.ip()) {
            out.push(a.ip());
        }
    }
    Ok(out)
}

/// One endpoint address of an entry, before workloads are merged by address.
pub(super) struct SeAddress {
    pub ip: IpAddr,
    /// The field it came from (errors name it).
    pub field: String,
    pub service_key: String,
    pub ports: BTreeMap<u16, u16>,
    pub labels: Labels,
    pub network: String,
    pub locality: Option<LocalLocality>,
    pub weight: Option<u32>,
    pub service_account: Option<String>,
}

impl LocalServiceEntry {
    /// Its service, and the addresses of its endpoints (`f`: its field, for errors).
    pub(super) fn expand(
        &self,
        f: &str,
        resolve: Resolver<'_>,
    ) -> Result<(LocalService, Vec<SeAddress>), Invalid> {
        let host = match self.hosts.as_slice() {
            [h] => h,
            [] => return Err(Invalid::new(format!("{f}.hosts"), "one host is required")),
            _ => {
                return Err(Invalid::new(
                    format!("{f}.hosts"),
                    "one host per ServiceEntry here (write one entry per host)",
                ))
            }
        };
        if host.contains('*') {
            return Err(Invalid::new(
                format!("{f}.hosts[0]"),
                format!("{host:?}: wildcard hosts are not supported (their traffic is routed by SNI or Host, with resolution NONE)"),
            ));
        }
        if self.export_to.iter().any(|e| e != "*") {
            return Err(Invalid::new(
                format!("{f}.exportTo"),
                "only \"*\" (every namespace sees every service here)",
            ));
        }
        if self.workload_selector.is_some() {
            return Err(Invalid::new(
                format!("{f}.workloadSelector"),
                "not supported: list the endpoints (workloads are not selected by label into a ServiceEntry here)",
            ));
        }
        match self.resolution {
            SeResolution::Static | SeResolution::Dns => {}
            SeResolution::None => return Err(Invalid::new(
                format!("{f}.resolution"),
                "NONE (passthrough to the original destination) is not supported: STATIC or DNS",
            )),
            SeResolution::DnsRoundRobin => {
                return Err(Invalid::new(
                    format!("{f}.resolution"),
                    "DNS_ROUND_ROBIN is not supported: STATIC or DNS",
                ))
            }
        }
        if self.ports.is_empty() {
            return Err(Invalid::new(format!("{f}.ports"), "at least one port"));
        }
        let mut ports = BTreeMap::new();
        let mut names = BTreeMap::new();
        for (i, p) in self.ports.iter().enumerate() {
            let pf = format!("{f}.ports[{i}]");
            if p.number == 0 {
                return Err(Invalid::new(format!("{pf}.number"), "port 0"));
            }
            if let Some(proto) = &p.protocol {
                if !PROTOCOLS.contains(&proto.to_ascii_uppercase().as_str()) {
                    return Err(Invalid::new(
                        format!("{pf}.protocol"),
                        format!("{proto:?}: one of {}", PROTOCOLS.join(", ")),
                    ));
                }
                if proto.eq_ignore_ascii_case("UDP") {
                    return Err(Invalid::new(
                        format!("{pf}.protocol"),
                        "UDP is not carried (HBONE tunnels TCP)",
                    ));
                }
            }
            if p.target_port == Some(0) {
                return Err(Invalid::new(format!("{pf}.targetPort"), "port 0"));
            }
            if ports
                .insert(p.number, p.target_port.unwrap_or(p.number))
                .is_some()
            {
                return Err(Invalid::new(
                    format!("{pf}.number"),
                    format!("port {} is listed twice", p.number),
                ));
            }
            if names.insert(p.name.as_str(), p.number).is_some() {
                return Err(Invalid::new(
                    format!("{pf}.name"),
                    format!("port name {:?} is used twice", p.name),
                ));
            }
        }
        let service_key = format!("{}/{}", self.namespace, host);
        let mut addresses = Vec::new();
        let dns = self.resolution == SeResolution::Dns;
        // No endpoints: the host itself is the endpoint (DNS) — STATIC has none.
        let implied;
        let endpoints: &[SeEndpoint] = if self.endpoints.is_empty() && dns {
            implied = [SeEndpoint {
                address: host.clone(),
                ports: BTreeMap::new(),
                labels: Labels::new(),
                network: String::new(),
                locality: String::new(),
                weight: None,
                service_account: None,
            }];
            &implied
        } else {
            &self.endpoints
        };
        for (i, e) in endpoints.iter().enumerate() {
            let ef = if self.endpoints.is_empty() {
                format!("{f}.hosts[0]")
            } else {
                format!("{f}.endpoints[{i}]")
            };
            // The endpoint's port per service port: its own for the port's name, else the
            // port's target port, else the port's number.
            let mut eports = BTreeMap::new();
            for p in &self.ports {
                let t = e
                    .ports
                    .get(&p.name)
                    .copied()
                    .unwrap_or(p.target_port.unwrap_or(p.number));
                eports.insert(p.number, t);
            }
            for name in e.ports.keys() {
                if !names.contains_key(name.as_str()) {
                    return Err(Invalid::new(
                        format!("{ef}.ports"),
                        format!("{name:?} is not the name of one of the entry's ports"),
                    ));
                }
            }
            if e.ports.values().any(|p| *p == 0) {
                return Err(Invalid::new(format!("{ef}.ports"), "port 0"));
            }
            let locality = if e.locality.is_empty() {
                None
            } else {
                let mut parts = e.locality.splitn(3, '/').map(str::to_string);
                Some(LocalLocality {
                    region: parts.next().unwrap_or_default(),
                    zone: parts.next().unwrap_or_default(),
                    subzone: parts.next().unwrap_or_default(),
                })
            };
            if e.weight == Some(0) {
                return Err(Invalid::new(format!("{ef}.weight"), "weight 0"));
            }
            let ips = match e.address.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) if !dns => {
                    return Err(Invalid::new(
                        format!("{ef}.address"),
                        format!(
                            "{:?}: an IP address (resolution STATIC; a host name needs DNS)",
                            e.address
                        ),
                    ))
                }
                Err(_) => {
                    let ips = resolve(&e.address).map_err(|why| {
                        Invalid::new(
                            format!("{ef}.address"),
                            format!("cannot resolve {:?}: {why}", e.address),
                        )
                    })?;
                    if ips.is_empty() {
                        return Err(Invalid::new(
                            format!("{ef}.address"),
                            format!("{:?} resolves to no address", e.address),
                        ));
                    }
                    ips
                }
            };
            for ip in ips {
                addresses.push(SeAddress {
                    ip,
                    field: format!("{ef}.address"),
                    service_key: service_key.clone(),
                    ports: eports.clone(),
                    labels: e.labels.clone(),
                    network: e.network.clone(),
                    locality: locality.clone(),
                    weight: e.weight,
                    service_account: e.service_account.clone(),
                });
            }
        }
        let service = LocalService {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            hostname: host.clone(),
            vips: self
                .addresses
                .iter()
                .map(|ip| NetIp {
                    network: String::new(),
                    ip: *ip,
                })
                .collect(),
            ports,
            subject_alt_names: self.subject_alt_names.clone(),
            endpoints: vec![],
            load_balancing: Default::default(),
            waypoint: None,
            labels: self.labels.clone(),
            traffic_distribution: None,
            internal_traffic_policy: Default::default(),
        };
        Ok((service, addresses))
    }
}

/// The workloads of entries' endpoint addresses, one per address (in `namespace`, named
/// after the address), backing every entry service listed there. Two endpoints at one
/// address must agree on its labels, network, locality, weight and service account.
pub(super) fn workloads(
    namespace_of: impl Fn(&str) -> String,
    addresses: Vec<SeAddress>,
) -> Result<Vec<LocalWorkload>, Invalid> {
    let mut by_ip: BTreeMap<IpAddr, (LocalWorkload, SeAddress)> = BTreeMap::new();
    for a in addresses {
        match by_ip.get_mut(&a.ip) {
            Some((w, first)) => {
                let same = first.labels == a.labels
                    && first.network == a.network
                    && first.locality == a.locality
                    && first.weight == a.weight
                    && first.service_account == a.service_account;
                if !same {
                    return Err(Invalid::new(
                        a.field.clone(),
                        format!(
                            "address {} is also at {}, with other labels, network, locality, weight or serviceAccount (one workload per address)",
                            a.ip, first.field
                        ),
                    ));
                }
                w.services
                    .entry(a.service_key.clone())
                    .or_default()
                    .extend(a.ports.clone());
            }
            None => {
                let namespace = namespace_of(&a.service_key);
                let name = format!("se-{}", a.ip).replace([':', '.'], "-");
                let w = LocalWorkload {
                    uid: format!("{namespace}/ServiceEntry/{}", a.ip),
                    name,
                    namespace,
                    service_account: a.service_account.clone(),
                    trust_domain: None,
                    workload_ips: vec![a.ip],
                    hostname: String::new(),
                    protocol: Some(LocalProtocol::Tcp),
                    node: String::new(),
                    network: a.network.clone(),
                    cluster_id: String::new(),
                    canonical_name: String::new(),
                    canonical_revision: String::new(),
                    workload_name: String::new(),
                    services: BTreeMap::from([(a.service_key.clone(), a.ports.clone())]),
                    authorization_policies: vec![],
                    status: Default::default(),
                    capacity: a.weight,
                    native_tunnel: false,
                    waypoint: None,
                    labels: a.labels.clone(),
                    locality: a.locality.clone(),
                };
                by_ip.insert(a.ip, (w, a));
            }
        }
    }
    Ok(by_ip.into_values().map(|(w, _)| w).collect())
}
