//! The local YAML configuration (see the crate docs for every field): parsed with
//! `runtime::config::from_yaml_str` (errors name file:line:column and the field), validated,
//! then compiled to the wire types — applying capture (R2) and waypoint binding (R3) where
//! istiod would — and built into a [`Snapshot`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use runtime::config::{ConfigError, Invalid};
use serde::{Deserialize, Deserializer};

use crate::authz::Cidr;
use crate::binding::{self, FOR_SERVICE_ACCOUNT_ANNOTATION, WAYPOINT_FOR_LABEL};
use crate::model::{
    ip_to_bytes, Identity, Labels, Namespace, Node, Protocol, Waypoint, WaypointFor,
    DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, HBONE_PORT, ROOT_NAMESPACE,
};
use crate::names;
use crate::snapshot::{Extras, Snapshot, WireState, ROUND_ROBIN_EXTENSION};
use crate::wire::security as ws;
use crate::wire::workload as ww;

mod peer_authentication;
mod service_entry;
pub use peer_authentication::{LocalPeerAuthentication, Mtls, MtlsMode};
pub use service_entry::{
    allocate as allocate_vip, system_resolver, LocalServiceEntry, Resolver, ResolverFn,
};

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalConfig {
    pub workloads: Vec<LocalWorkload>,
    pub services: Vec<LocalService>,
    pub policies: Vec<LocalPolicy>,
    pub namespaces: Vec<LocalNamespace>,
    pub waypoints: Vec<LocalWaypoint>,
    pub nodes: Vec<LocalNode>,
    /// Istio's `PeerAuthentication`s, converted to L4 policies as istiod does.
    pub peer_authentications: Vec<LocalPeerAuthentication>,
    /// Istio's `ServiceEntry`s, converted to services and workloads outside the mesh as
    /// istiod does ([`LocalServiceEntry`]).
    pub service_entries: Vec<LocalServiceEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum LocalProtocol {
    #[serde(rename = "HBONE")]
    Hbone,
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum LocalStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// `network/ip` (ztunnel's form, network may be empty: `/10.0.0.1`) or a bare `ip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetIp {
    pub network: String,
    pub ip: IpAddr,
}

impl<'de> Deserialize<'de> for NetIp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (network, ip) = match s.rsplit_once('/') {
            Some((n, ip)) => (n, ip),
            None => ("", s.as_str()),
        };
        let ip = ip.parse().map_err(|_| {
            serde::de::Error::custom(format!("invalid address {s:?} (expected IP or network/IP)"))
        })?;
        Ok(NetIp {
            network: network.to_string(),
            ip,
        })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// ztunnel's `GatewayAddress`: `{destination: {Address: "network/ip"}, hboneMtlsPort: 15008}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalGatewayAddress {
    pub destination: LocalGatewayDestination,
    #[serde(default = "hbone_port")]
    pub hbone_mtls_port: u16,
}

fn hbone_port() -> u16 {
    HBONE_PORT
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum LocalGatewayDestination {
    Address(NetIp),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalWorkload {
    /// Defaults to `namespace/name`.
    #[serde(default)]
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub hostname: String,
    /// `HBONE` (captured) or `TCP`; absent: from labels (R2).
    #[serde(default)]
    pub protocol: Option<LocalProtocol>,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub workload_name: String,
    /// `namespace/hostname` → service port → target port.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    #[serde(default)]
    pub status: LocalStatus,
    #[serde(default)]
    pub capacity: Option<u32>,
    #[serde(default)]
    pub native_tunnel: bool,
    /// Explicit waypoint (as istiod sends it); absent: from R3.
    #[serde(default)]
    pub waypoint: Option<LocalGatewayAddress>,
    #[serde(default)]
    pub labels: Labels,
    /// Where it runs (its node's `topology.kubernetes.io/region` and `zone`, Istio's
    /// `subzone`): for services that prefer close endpoints.
    #[serde(default)]
    pub locality: Option<LocalLocality>,
}

/// ztunnel's `{region, zone, subzone}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalLocality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// Kubernetes' `Service.spec.trafficDistribution`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TrafficDistribution {
    /// Istio: the same network, then region, zone and subzone, failing over outward.
    PreferClose,
    /// Kubernetes 1.34's name for the zone preference (Istio treats it as `PreferClose`).
    PreferSameZone,
    /// `PreferClose`, then the client's own node first.
    PreferSameNode,
}

/// Kubernetes' `Service.spec.internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum InternalTrafficPolicy {
    #[default]
    Cluster,
    /// Only endpoints on the client's node (none there: the connection is refused).
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum LocalLoadBalancing {
    #[default]
    WeightedRandom,
    RoundRobin,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalEndpoint {
    pub workload_uid: String,
    /// Service port → target port for this endpoint; absent: the service's.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    #[serde(default)]
    pub vips: Vec<NetIp>,
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub endpoints: Vec<LocalEndpoint>,
    #[serde(default)]
    pub load_balancing: LocalLoadBalancing,
    #[serde(default)]
    pub waypoint: Option<LocalGatewayAddress>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub traffic_distribution: Option<TrafficDistribution>,
    #[serde(default)]
    pub internal_traffic_policy: InternalTrafficPolicy,
}

impl LocalService {
    /// The `LoadBalancing` istiod sends ztunnel for it: `internalTrafficPolicy: Local` is
    /// the node only, strictly; a `trafficDistribution` fails over from the closest.
    fn load_balancing(&self) -> Option<ww::LoadBalancing> {
        use ww::load_balancing::{Mode, Scope as S};
        let close = [S::Network, S::Region, S::Zone, S::Subzone];
        let (scopes, mode) = match (self.internal_traffic_policy, self.traffic_distribution) {
            (InternalTrafficPolicy::Local, _) => (vec![S::Node], Mode::Strict),
            (_, None) => return None,
            (_, Some(TrafficDistribution::PreferClose | TrafficDistribution::PreferSameZone)) => {
                (close.to_vec(), Mode::Failover)
            }
            (_, Some(TrafficDistribution::PreferSameNode)) => {
                let mut s = close.to_vec();
                s.push(S::Node);
                (s, Mode::Failover)
            }
        };
        Some(ww::LoadBalancing {
            routing_preference: scopes.into_iter().map(|s| s as i32).collect(),
            mode: mode as i32,
            health_policy: 0,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum LocalScope {
    #[default]
    #[serde(alias = "GLOBAL")]
    Global,
    #[serde(alias = "NAMESPACE")]
    Namespace,
    #[serde(alias = "WORKLOAD_SELECTOR")]
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum LocalAction {
    #[default]
    #[serde(alias = "ALLOW")]
    Allow,
    #[serde(alias = "DENY")]
    Deny,
}

/// `{Exact: s}`, `{Prefix: s}`, `{Suffix: s}`, `{Presence: …}` (ztunnel's form) or Istio's
/// short string: `*` (presence), `abc*` (prefix), `*abc` (suffix), `abc` (exact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStringMatch(pub ws::StringMatch);

impl<'de> Deserialize<'de> for LocalStringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        enum Tagged {
            Exact(String),
            Prefix(String),
            Suffix(String),
            Presence(serde::de::IgnoredAny),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Short(String),
            Tagged(Tagged),
        }
        use ws::string_match::MatchType as M;
        let m = match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a string match: `*`, `abc*`, `*abc`, `abc`, or one of \
                 {Exact: ..}, {Prefix: ..}, {Suffix: ..}, {Presence: {}}",
            )
        })? {
            Raw::Short(s) if s == "*" => M::Presence(()),
            Raw::Short(s) if s.len() > 1 && s.ends_with('*') => {
                M::Prefix(s[..s.len() - 1].to_string())
            }
            Raw::Short(s) if s.len() > 1 && s.starts_with('*') => M::Suffix(s[1..].to_string()),
            Raw::Short(s) => M::Exact(s),
            Raw::Tagged(Tagged::Exact(s)) => M::Exact(s),
            Raw::Tagged(Tagged::Prefix(s)) => M::Prefix(s),
            Raw::Tagged(Tagged::Suffix(s)) => M::Suffix(s),
            Raw::Tagged(Tagged::Presence(_)) => M::Presence(()),
        };
        Ok(LocalStringMatch(ws::StringMatch {
            match_type: Some(m),
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalMatch {
    pub namespaces: Vec<LocalStringMatch>,
    pub not_namespaces: Vec<LocalStringMatch>,
    pub principals: Vec<LocalStringMatch>,
    pub not_principals: Vec<LocalStringMatch>,
    pub service_accounts: Vec<LocalServiceAccountMatch>,
    pub not_service_accounts: Vec<LocalServiceAccountMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// Kubernetes' `selector: {matchLabels: {…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

impl LocalSelector {
    /// Every `matchLabels` entry is among `labels` (an empty selector selects all).
    pub fn selects(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalPolicy {
    pub name: String,
    pub namespace: String,
    /// Absent: `Global` (`WorkloadSelector` with a `selector`).
    #[serde(default)]
    pub scope: Option<LocalScope>,
    /// Istio's workload selector, resolved here as istiod does: the policy is added to the
    /// `authorizationPolicies` of every workload whose labels match, in the policy's
    /// namespace (in every namespace from the root namespace, [`ROOT_NAMESPACE`]).
    #[serde(default)]
    pub selector: Option<LocalSelector>,
    #[serde(default)]
    pub action: LocalAction,
    /// `rules[rule][clause][match]`.
    #[serde(default)]
    pub rules: Vec<Vec<Vec<LocalMatch>>>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalNamespace {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

/// `ip` (port 15008) or `ip:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HboneAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for HboneAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(HboneAddr(a));
        }
        s.parse::<IpAddr>()
            .map(|ip| HboneAddr(SocketAddr::new(ip, HBONE_PORT)))
            .map_err(|_| {
                serde::de::Error::custom(format!("invalid address {s:?} (expected IP or IP:port)"))
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalWaypoint {
    pub name: String,
    pub namespace: String,
    pub address: HboneAddr,
    /// Defaults to the waypoint's name (as Istio's waypoint deployments do).
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub annotations: Labels,
    /// The Gateway's labels: `istio.io/waypoint-for` (the traffic it takes).
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalNode {
    pub name: String,
    /// Where this node's ztunnel takes HBONE (port 15008).
    pub ztunnel: IpAddr,
}

/// Parse, validate and build: the snapshot of a config text.
pub fn load_str(file: &Path, text: &str, version: u64) -> Result<Snapshot, ConfigError> {
    load_str_with(file, text, version, &system_resolver)
}

/// [`load_str`], the `DNS` ServiceEntries' host names resolved by `resolve`.
pub fn load_str_with(
    file: &Path,
    text: &str,
    version: u64,
    resolve: Resolver<'_>,
) -> Result<Snapshot, ConfigError> {
    let cfg: LocalConfig = runtime::config::from_yaml_str(file, text)?;
    let wire = cfg
        .compile_with(resolve)
        .map_err(|e| e.in_file(file, Some(text)))?;
    Snapshot::from_wire(version, &wire).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: None,
        column: None,
        field: None,
        message: e.to_string(),
    })
}

/// Read a file and [`load_str`] it.
pub fn load_file(file: &Path, version: u64) -> Result<Snapshot, ConfigError> {
    let text = runtime::config::read_file(file)?;
    load_str(file, &text, version)
}

fn gateway(g: &LocalGatewayAddress) -> ww::GatewayAddress {
    let LocalGatewayDestination::Address(a) = &g.destination;
    ww::GatewayAddress {
        destination: Some(ww::gateway_address::Destination::Address(
            ww::NetworkAddress {
                network: a.network.clone(),
                address: ip_to_bytes(a.ip),
            },
        )),
        hbone_mtls_port: u32::from(g.hbone_mtls_port),
    }
}

fn waypoint_gateway(w: &Waypoint, network: &str) -> ww::GatewayAddress {
    ww::GatewayAddress {
        destination: Some(ww::gateway_address::Destination::Address(
            ww::NetworkAddress {
                network: network.to_string(),
                address: ip_to_bytes(w.address.ip()),
            },
        )),
        hbone_mtls_port: u32::from(w.address.port()),
    }
}

fn port_list(m: &BTreeMap<u16, u16>) -> ww::PortList {
    ww::PortList {
        ports: m
            .iter()
            .map(|(s, t)| ww::Port {
                service_port: u32::from(*s),
                target_port: u32::from(*t),
            })
            .collect(),
    }
}

fn cidrs(v: &[Cidr]) -> Vec<ws::Address> {
    v.iter()
        .map(|c| ws::Address {
            address: ip_to_bytes(c.addr),
            length: u32::from(c.len),
        })
        .collect()
}

fn strings(v: &[LocalStringMatch]) -> Vec<ws::StringMatch> {
    v.iter().map(|s| s.0.clone()).collect()
}

fn sas(v: &[LocalServiceAccountMatch]) -> Vec<ws::ServiceAccountMatch> {
    v.iter()
        .map(|s| ws::ServiceAccountMatch {
            namespace: s.namespace.clone(),
            service_account: s.service_account.clone(),
        })
        .collect()
}

impl LocalPolicy {
    /// `namespace/name`, as workloads list it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The scope written, else `WorkloadSelector` with a selector, else `Global`.
    pub fn scope(&self) -> LocalScope {
        match (self.scope, &self.selector) {
            (Some(s), _) => s,
            (None, Some(_)) => LocalScope::WorkloadSelector,
            (None, None) => LocalScope::Global,
        }
    }

    /// Whether its selector picks `w` (Istio: same namespace, or any from the root one).
    pub fn selects(&self, w: &LocalWorkload) -> bool {
        self.selector.as_ref().is_some_and(|sel| {
            (self.namespace == ROOT_NAMESPACE || self.namespace == w.namespace)
                && sel.selects(&w.labels)
        })
    }

    pub fn to_wire(&self) -> ws::Authorization {
        ws::Authorization {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            scope: match self.scope() {
                LocalScope::Global => ws::Scope::Global,
                LocalScope::Namespace => ws::Scope::Namespace,
                LocalScope::WorkloadSelector => ws::Scope::WorkloadSelector,
            } as i32,
            action: match self.action {
                LocalAction::Allow => ws::Action::Allow,
                LocalAction::Deny => ws::Action::Deny,
            } as i32,
            rules: self
                .rules
                .iter()
                .map(|r| ws::Rule {
                    clauses: r
                        .iter()
                        .map(|c| ws::Clause {
                            matches: c
                                .iter()
                                .map(|m| ws::Match {
                                    namespaces: strings(&m.namespaces),
                                    not_namespaces: strings(&m.not_namespaces),
                                    principals: strings(&m.principals),
                                    not_principals: strings(&m.not_principals),
                                    source_ips: cidrs(&m.source_ips),
                                    not_source_ips: cidrs(&m.not_source_ips),
                                    destination_ips: cidrs(&m.destination_ips),
                                    not_destination_ips: cidrs(&m.not_destination_ips),
                                    destination_ports: m
                                        .destination_ports
                                        .iter()
                                        .map(|p| u32::from(*p))
                                        .collect(),
                                    not_destination_ports: m
                                        .not_destination_ports
                                        .iter()
                                        .map(|p| u32::from(*p))
                                        .collect(),
                                    service_accounts: sas(&m.service_accounts),
                                    not_service_accounts: sas(&m.not_service_accounts),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
            dry_run: self.dry_run,
        }
    }
}

impl LocalWorkload {
    pub fn uid(&self) -> String {
        if self.uid.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            self.uid.clone()
        }
    }
}

impl LocalConfig {
    /// The waypoints as model objects.
    pub fn waypoints(&self) -> Vec<Waypoint> {
        self.waypoints
            .iter()
            .map(|w| Waypoint {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                address: w.address.0,
                identity: Identity::new(
                    w.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN),
                    &w.namespace,
                    w.service_account.as_deref().unwrap_or(&w.name),
                ),
                for_service_account: w.annotations.get(FOR_SERVICE_ACCOUNT_ANNOTATION).cloned(),
                // Checked by `check_names`.
                traffic: w
                    .labels
                    .get(WAYPOINT_FOR_LABEL)
                    .and_then(|v| WaypointFor::parse(v).ok())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Every name and text that reaches a header, baggage, a certificate or telemetry
    /// follows its Kubernetes (or SPIFFE) syntax ([`crate::names`]): a control character, a
    /// `,` or a space there is an error naming the field, not a bad header on every
    /// connection later.
    pub fn check_names(&self) -> Result<(), Invalid> {
        type Check = fn(&str) -> Result<(), String>;
        let check = |field: String, value: &str, rule: Check| {
            rule(value).map_err(|why| Invalid::new(field, why))
        };
        // Optional texts: empty means unset.
        let opt = |field: String, value: &str, rule: Check| {
            if value.is_empty() {
                Ok(())
            } else {
                check(field, value, rule)
            }
        };
        // Optional fields: absent is fine.
        let some = |field: String, value: &Option<String>, rule: Check| match value {
            Some(v) => check(field, v, rule),
            None => Ok(()),
        };
        // What a workload's or waypoint's identity is made of.
        let identity = |f: &dyn Fn(&str) -> String,
                        name: &str,
                        namespace: &str,
                        service_account: &Option<String>,
                        trust_domain: &Option<String>| {
            check(f("name"), name, names::dns_subdomain)?;
            check(f("namespace"), namespace, names::dns_label)?;
            some(f("serviceAccount"), service_account, names::dns_subdomain)?;
            some(f("trustDomain"), trust_domain, names::trust_domain)
        };
        let labels = |field: String, l: &Labels| {
            for (k, v) in l {
                names::label_key(k)
                    .and_then(|()| names::label_value(v).map_err(|why| format!("{k}: {why}")))
                    .map_err(|why| Invalid::new(field.clone(), why))?;
            }
            Ok::<(), Invalid>(())
        };
        for (i, w) in self.workloads.iter().enumerate() {
            let f = |name: &str| format!("workloads[{i}].{name}");
            opt(f("uid"), &w.uid, names::token)?;
            identity(
                &f,
                &w.name,
                &w.namespace,
                &w.service_account,
                &w.trust_domain,
            )?;
            opt(f("hostname"), &w.hostname, names::hostname)?;
            opt(f("node"), &w.node, names::dns_subdomain)?;
            check(f("network"), &w.network, names::label_value)?;
            check(f("clusterId"), &w.cluster_id, names::token)?;
            check(f("canonicalName"), &w.canonical_name, names::label_value)?;
            check(
                f("canonicalRevision"),
                &w.canonical_revision,
                names::label_value,
            )?;
            opt(f("workloadName"), &w.workload_name, names::dns_subdomain)?;
            labels(f("labels"), &w.labels)?;
            if let Some(l) = &w.locality {
                check(f("locality.region"), &l.region, names::label_value)?;
                check(f("locality.zone"), &l.zone, names::label_value)?;
                check(f("locality.subzone"), &l.subzone, names::label_value)?;
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            let f = |name: &str| format!("services[{i}].{name}");
            check(f("name"), &s.name, names::dns_subdomain)?;
            check(f("namespace"), &s.namespace, names::dns_label)?;
            check(f("hostname"), &s.hostname, names::hostname)?;
            for v in &s.vips {
                check(f("vips"), &v.network, names::label_value)?;
            }
            for san in &s.subject_alt_names {
                check(f("subjectAltNames"), san, names::token)?;
            }
            labels(f("labels"), &s.labels)?;
        }
        for (i, p) in self.policies.iter().enumerate() {
            let f = |name: &str| format!("policies[{i}].{name}");
            check(f("name"), &p.name, names::dns_subdomain)?;
            check(f("namespace"), &p.namespace, names::dns_label)?;
            if let Some(sel) = &p.selector {
                labels(f("selector"), &sel.match_labels)?;
            }
        }
        for (i, p) in self.peer_authentications.iter().enumerate() {
            let f = |name: &str| format!("peerAuthentications[{i}].{name}");
            check(f("name"), &p.name, names::dns_subdomain)?;
            check(f("namespace"), &p.namespace, names::dns_label)?;
            if let Some(sel) = &p.selector {
                labels(f("selector"), &sel.match_labels)?;
            }
        }
        for (i, n) in self.namespaces.iter().enumerate() {
            check(format!("namespaces[{i}].name"), &n.name, names::dns_label)?;
            labels(format!("namespaces[{i}].labels"), &n.labels)?;
        }
        for (i, w) in self.waypoints.iter().enumerate() {
            let f = |name: &str| format!("waypoints[{i}].{name}");
            identity(
                &f,
                &w.name,
                &w.namespace,
                &w.service_account,
                &w.trust_domain,
            )?;
            check(f("network"), &w.network, names::label_value)?;
            for k in w.annotations.keys() {
                check(f("annotations"), k, names::label_key)?;
            }
            if let Some(sa) = w.annotations.get(FOR_SERVICE_ACCOUNT_ANNOTATION) {
                check(f("annotations"), sa, names::dns_subdomain)?;
            }
            labels(f("labels"), &w.labels)?;
            if let Some(v) = w.labels.get(WAYPOINT_FOR_LABEL) {
                WaypointFor::parse(v).map_err(|why| {
                    Invalid::new(format!("{}.{WAYPOINT_FOR_LABEL}", f("labels")), why)
                })?;
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            check(format!("nodes[{i}].name"), &n.name, names::dns_subdomain)?;
        }
        Ok(())
    }

    /// Check references and uniqueness, then build the wire types, applying R2 and R3 to
    /// workloads and services that do not state their protocol or waypoint explicitly.
    pub fn compile(&self) -> Result<WireState, Invalid> {
        self.compile_with(&system_resolver)
    }

    /// [`LocalConfig::compile`], the `DNS` ServiceEntries' host names resolved by
    /// `resolve`.
    pub fn compile_with(&self, resolve: Resolver<'_>) -> Result<WireState, Invalid> {
        if self.service_entries.is_empty() {
            return self.compile_expanded();
        }
        let mut c = self.clone();
        c.service_entries.clear();
        // Every answer used, kept with the snapshot ([`dns_changed`]).
        let answers = std::cell::RefCell::new(BTreeMap::<String, Vec<IpAddr>>::new());
        let recording = |host: &str| {
            let r = resolve(host)?;
            answers
                .borrow_mut()
                .insert(host.to_string(), answer_set(r.clone()));
            Ok(r)
        };
        let resolve: Resolver<'_> = &recording;
        let mut addresses = Vec::new();
        let mut vips: HashMap<IpAddr, String> = HashMap::new();
        for s in &self.services {
            for v in &s.vips {
                vips.insert(v.ip, format!("service {}/{}", s.namespace, s.hostname));
            }
        }
        let pods: HashMap<IpAddr, String> = self
            .workloads
            .iter()
            .flat_map(|w| w.workload_ips.iter().map(move |ip| (*ip, w.uid())))
            .collect();
        for (i, e) in self.service_entries.iter().enumerate() {
            let f = format!("serviceEntries[{i}]");
            let (svc, a) = e.expand(&f, resolve)?;
            for (j, ip) in e.addresses.iter().enumerate() {
                let also = vips
                    .get(ip)
                    .cloned()
                    .or_else(|| pods.get(ip).map(|u| format!("workload {u}")));
                if let Some(first) = also {
                    return Err(Invalid::new(
                        format!("{f}.addresses[{j}]"),
                        format!("duplicate IP {ip}: already used by {first}"),
                    ));
                }
                vips.insert(*ip, format!("service {}/{}", svc.namespace, svc.hostname));
            }
            for x in &a {
                if let Some(u) = pods.get(&x.ip) {
                    return Err(Invalid::new(
                        x.field.clone(),
                        format!(
                            "{} is the address of workload {u}, in the mesh model already",
                            x.ip
                        ),
                    ));
                }
                if let Some(v) = vips.get(&x.ip) {
                    return Err(Invalid::new(
                        x.field.clone(),
                        format!("{} is a VIP of {v}", x.ip),
                    ));
                }
            }
            c.services.push(svc);
            addresses.extend(a);
        }
        // Entries without `addresses` get one, as Istio allocates them (ztunnel's DNS proxy
        // answers their host with it): from 240.240.0.0/16, by a hash of namespace and
        // host (in that order, so a collision resolves the same way at every load).
        let taken: std::collections::HashSet<IpAddr> = vips
            .keys()
            .chain(pods.keys())
            .copied()
            .chain(addresses.iter().map(|a| a.ip))
            .collect();
        let first = self.services.len();
        let mut unaddressed: Vec<usize> = (first..c.services.len())
            .filter(|&k| c.services[k].vips.is_empty())
            .collect();
        unaddressed.sort_by(|&a, &b| {
            let key = |k: usize| (&c.services[k].namespace, &c.services[k].hostname);
            key(a).cmp(&key(b))
        });
        let mut allocated = std::collections::HashSet::new();
        for k in unaddressed {
            let s = &c.services[k];
            let ip = service_entry::allocate(&s.namespace, &s.hostname, |ip| {
                taken.contains(&ip) || allocated.contains(&ip)
            })
            .ok_or_else(|| {
                Invalid::new(
                    format!("serviceEntries[{}].addresses", k - first),
                    "no address left to allocate in 240.240.0.0/16",
                )
            })?;
            allocated.insert(ip);
            c.services[k].vips.push(NetIp {
                network: String::new(),
                ip,
            });
        }
        let namespace_of = |key: &str| key.split_once('/').map_or("", |(n, _)| n).to_string();
        c.workloads
            .extend(service_entry::workloads(namespace_of, addresses)?);
        // Errors about the entries' services name the entries.
        let (services, entries) = (self.services.len(), self.service_entries.len());
        let mut wire = c.compile_expanded().map_err(|e| {
            let Some(rest) = e.field.strip_prefix("services[") else {
                return e;
            };
            let Some((n, tail)) = rest.split_once(']') else {
                return e;
            };
            match n.parse::<usize>() {
                Ok(k) if k >= services && k < services + entries => {
                    let tail = match tail {
                        ".vips" => ".addresses",
                        ".hostname" => ".hosts[0]",
                        t => t,
                    };
                    Invalid::new(format!("serviceEntries[{}]{tail}", k - services), e.message)
                }
                _ => e,
            }
        })?;
        wire.extras.dns = answers.into_inner();
        Ok(wire)
    }

    fn compile_expanded(&self) -> Result<WireState, Invalid> {
        self.check_names()?;
        let waypoints = self.waypoints();
        // Namespaces, waypoints, nodes, policies: unique names.
        let mut seen = BTreeSet::new();
        for (i, n) in self.namespaces.iter().enumerate() {
            if !seen.insert(n.name.as_str()) {
                return Err(Invalid::new(
                    format!("namespaces[{i}].name"),
                    format!("namespace {:?} is defined twice", n.name),
                ));
            }
        }
        let ns_labels: HashMap<&str, &Labels> = self
            .namespaces
            .iter()
            .map(|n| (n.name.as_str(), &n.labels))
            .collect();
        let mut seen = BTreeSet::new();
        for (i, w) in waypoints.iter().enumerate() {
            if !seen.insert(w.key()) {
                return Err(Invalid::new(
                    format!("waypoints[{i}].name"),
                    format!("waypoint {} is defined twice", w.key()),
                ));
            }
        }
        let mut seen = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !seen.insert(n.name.as_str()) {
                return Err(Invalid::new(
                    format!("nodes[{i}].name"),
                    format!("node {:?} is defined twice", n.name),
                ));
            }
        }
        let mut policy_keys = BTreeSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            if !policy_keys.insert(p.key()) {
                return Err(Invalid::new(
                    format!("policies[{i}].name"),
                    format!("policy {}/{} is defined twice", p.namespace, p.name),
                ));
            }
            if p.selector.is_some() && p.scope() != LocalScope::WorkloadSelector {
                return Err(Invalid::new(
                    format!("policies[{i}].selector"),
                    format!(
                        "a selector needs scope WorkloadSelector, not {:?}",
                        p.scope()
                    ),
                ));
            }
        }
        // Namespace-level use-waypoint labels must name existing waypoints.
        for (i, n) in self.namespaces.iter().enumerate() {
            binding::workload_waypoint(
                &n.name,
                "",
                &[],
                &Labels::new(),
                Some(&n.labels),
                &waypoints,
            )
            .map_err(|e| Invalid::new(format!("namespaces[{i}].labels"), e.to_string()))?;
        }
        // Services: unique keys and VIPs.
        let mut ips: HashMap<IpAddr, String> = HashMap::new();
        let mut service_keys = BTreeMap::new();
        // Per namespace and hostname as services are found by it (`names::host_key`): a
        // hostname differing only in case or a trailing dot is the same service.
        let mut host_keys: HashMap<(&str, String), &str> = HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let key = format!("{}/{}", s.namespace, s.hostname);
            if let Some(first) = host_keys.insert(
                (s.namespace.as_str(), names::host_key(&s.hostname)),
                s.hostname.as_str(),
            ) {
                let also = if first == s.hostname {
                    String::new()
                } else {
                    format!(
                        " (as {}/{first}: hostnames match whatever their case and trailing dot)",
                        s.namespace
                    )
                };
                return Err(Invalid::new(
                    format!("services[{i}].hostname"),
                    format!("service {key} is defined twice{also}"),
                ));
            }
            service_keys.insert(key.clone(), i);
            for v in &s.vips {
                if let Some(first) = ips.insert(v.ip, format!("service {key}")) {
                    return Err(Invalid::new(
                        format!("services[{i}].vips"),
                        format!("duplicate IP {}: already used by {first}", v.ip),
                    ));
                }
            }
        }
        // Workloads: unique uids and IPs; every reference resolves.
        let mut uids = BTreeMap::new();
        let mut services_of: Vec<BTreeMap<String, BTreeMap<u16, u16>>> = Vec::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let uid = w.uid();
            if uids.insert(uid.clone(), i).is_some() {
                let f = if w.uid.is_empty() { "name" } else { "uid" };
                return Err(Invalid::new(
                    format!("workloads[{i}].{f}"),
                    format!("workload {uid} is defined twice"),
                ));
            }
            for ip in &w.workload_ips {
                if let Some(first) = ips.insert(*ip, format!("workload {uid}")) {
                    return Err(Invalid::new(
                        format!("workloads[{i}].workloadIps"),
                        format!("duplicate IP {ip}: already used by {first}"),
                    ));
                }
            }
            for key in w.services.keys() {
                if !service_keys.contains_key(key) {
                    return Err(Invalid::new(
                        format!("workloads[{i}].services"),
                        format!(
                            "names service {key:?}, which is not defined under `services` \
                             (expected namespace/hostname)"
                        ),
                    ));
                }
            }
            for p in &w.authorization_policies {
                if !policy_keys.contains(p) {
                    return Err(Invalid::new(
                        format!("workloads[{i}].authorizationPolicies"),
                        format!("names policy {p:?}, which is not defined under `policies` (expected namespace/name)"),
                    ));
                }
            }
            services_of.push(w.services.clone());
        }
        // Service endpoints add to their workloads' `services`.
        for (i, s) in self.services.iter().enumerate() {
            let key = format!("{}/{}", s.namespace, s.hostname);
            for (k, e) in s.endpoints.iter().enumerate() {
                let Some(&wi) = uids.get(&e.workload_uid) else {
                    return Err(Invalid::new(
                        format!("services[{i}].endpoints[{k}].workloadUid"),
                        format!(
                            "service {key} names endpoint workload {:?}, which is not defined under `workloads`",
                            e.workload_uid
                        ),
                    ));
                };
                services_of[wi].insert(key.clone(), e.ports.clone());
            }
        }
        let peer_authn = peer_authentication::convert(&self.peer_authentications, &self.workloads)?;
        let mut addresses = Vec::new();
        for (i, ((w, services), peer_authn)) in self
            .workloads
            .iter()
            .zip(services_of)
            .zip(peer_authn.per_workload)
            .enumerate()
        {
            let nsl = ns_labels.get(w.namespace.as_str()).copied();
            let explicit = w.protocol.map(|p| match p {
                LocalProtocol::Hbone => Protocol::Hbone,
                LocalProtocol::Tcp => Protocol::Tcp,
            });
            let captured = binding::captured(explicit, &w.labels, nsl);
            let sa = w
                .service_account
                .clone()
                .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string());
            let waypoint = match &w.waypoint {
                Some(g) => Some(gateway(g)),
                None => binding::workload_waypoint(
                    &w.namespace,
                    &sa,
                    &w.workload_ips,
                    &w.labels,
                    nsl,
                    &waypoints,
                )
                .map_err(|e| Invalid::new(format!("workloads[{i}].labels"), e.to_string()))?
                // Only captured pods have a waypoint (R3).
                .filter(|_| captured)
                .map(|(wp, _)| waypoint_gateway(wp, &w.network)),
            };
            addresses.push(ww::Address {
                r#type: Some(ww::address::Type::Workload(ww::Workload {
                    uid: w.uid(),
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    addresses: w.workload_ips.iter().map(|ip| ip_to_bytes(*ip)).collect(),
                    hostname: w.hostname.clone(),
                    network: w.network.clone(),
                    tunnel_protocol: if captured {
                        ww::TunnelProtocol::Hbone
                    } else {
                        ww::TunnelProtocol::None
                    } as i32,
                    trust_domain: w.trust_domain.clone().unwrap_or_default(),
                    service_account: sa,
                    waypoint,
                    node: w.node.clone(),
                    canonical_name: w.canonical_name.clone(),
                    canonical_revision: w.canonical_revision.clone(),
                    workload_name: w.workload_name.clone(),
                    native_tunnel: w.native_tunnel,
                    services: services
                        .iter()
                        .map(|(k, m)| (k.clone(), port_list(m)))
                        .collect(),
                    authorization_policies: {
                        // Listed ones, then those whose selector picks it, then its
                        // PeerAuthentication's (istiod's part).
                        let mut keys = w.authorization_policies.clone();
                        for p in self.policies.iter().filter(|p| p.selects(w)) {
                            let key = p.key();
                            if !keys.contains(&key) {
                                keys.push(key);
                            }
                        }
                        keys.extend(peer_authn);
                        keys
                    },
                    status: match w.status {
                        LocalStatus::Healthy => ww::WorkloadStatus::Healthy,
                        LocalStatus::Unhealthy => ww::WorkloadStatus::Unhealthy,
                    } as i32,
                    cluster_id: w.cluster_id.clone(),
                    capacity: w.capacity,
                    locality: w.locality.as_ref().map(|l| ww::Locality {
                        region: l.region.clone(),
                        zone: l.zone.clone(),
                        subzone: l.subzone.clone(),
                    }),
                    ..Default::default()
                })),
            });
        }
        for (i, s) in self.services.iter().enumerate() {
            let waypoint = match &s.waypoint {
                Some(g) => Some(gateway(g)),
                None => binding::service_waypoint(&s.namespace, &s.labels, &waypoints)
                    .map_err(|e| Invalid::new(format!("services[{i}].labels"), e.to_string()))?
                    .map(|(wp, _)| waypoint_gateway(wp, "")),
            };
            addresses.push(ww::Address {
                r#type: Some(ww::address::Type::Service(ww::Service {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    hostname: s.hostname.clone(),
                    addresses: s
                        .vips
                        .iter()
                        .map(|v| ww::NetworkAddress {
                            network: v.network.clone(),
                            address: ip_to_bytes(v.ip),
                        })
                        .collect(),
                    ports: port_list(&s.ports).ports,
                    subject_alt_names: s.subject_alt_names.clone(),
                    waypoint,
                    load_balancing: s.load_balancing(),
                    extensions: match s.load_balancing {
                        LocalLoadBalancing::RoundRobin => vec![ww::Extension {
                            name: ROUND_ROBIN_EXTENSION.to_string(),
                            config: None,
                        }],
                        LocalLoadBalancing::WeightedRandom => Vec::new(),
                    },
                    ..Default::default()
                })),
            });
        }
        Ok(WireState {
            addresses,
            authorizations: self
                .policies
                .iter()
                .chain(&peer_authn.policies)
                .map(LocalPolicy::to_wire)
                .collect(),
            extras: Extras {
                namespaces: self
                    .namespaces
                    .iter()
                    .map(|n| Namespace {
                        name: n.name.clone(),
                        labels: n.labels.clone(),
                    })
                    .collect(),
                waypoints,
                nodes: self
                    .nodes
                    .iter()
                    .map(|n| Node {
                        name: n.name.clone(),
                        ztunnel: n.ztunnel,
                    })
                    .collect(),
                labels: self
                    .workloads
                    .iter()
                    .filter(|w| !w.labels.is_empty())
                    .map(|w| (w.uid(), w.labels.clone()))
                    .collect(),
                dns: BTreeMap::new(),
            },
        })
    }
}

/// Whether `resolve` now answers otherwise for a host name `snap`'s ServiceEntries were
/// built from (another set of addresses). A lookup that fails keeps its last answer, as
/// Envoy keeps a cluster's last good hosts: no change.
pub fn dns_changed(snap: &Snapshot, resolve: Resolver<'_>) -> bool {
    snap.dns_answers()
        .iter()
        .any(|(host, was)| match resolve(host) {
            Ok(now) if !now.is_empty() => answer_set(now) != *was,
            _ => false,
        })
}

/// When a config watcher looks the `DNS` ServiceEntries' host names up again: every
/// `every` (`dns_refresh`; zero: never), from its start.
pub struct DnsRecheck {
    every: std::time::Duration,
    next: std::time::Instant,
}

impl DnsRecheck {
    pub fn new(every: std::time::Duration, now: std::time::Instant) -> Self {
        DnsRecheck {
            every,
            next: now + every,
        }
    }

    /// At `now`, when a look-up is due (the next one is then `every` later): whether one of
    /// `snap`'s host names answers otherwise ([`dns_changed`]) — the file in force is to be
    /// loaded again. `false` while none is due.
    pub fn changed(
        &mut self,
        now: std::time::Instant,
        snap: &Snapshot,
        resolve: Resolver<'_>,
    ) -> bool {
        if self.every.is_zero() || now < self.next {
            return false;
        }
        self.next = now + self.every;
        dns_changed(snap, resolve)
    }
}

/// A lookup's addresses as they are kept and compared: in order, each once (an answer
/// in another order is the same answer).
fn answer_set(mut ips: Vec<IpAddr>) -> Vec<IpAddr> {
    ips.sort();
    ips.dedup();
    ips
}
