//! The internal model: what a proxy consults on a connection's path. Built from the wire
//! types (see [`crate::snapshot::Snapshot::from_wire`]); plain data, cheap to share.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// Istio's HBONE port: ztunnel's and every waypoint's mTLS tunnel listener.
pub const HBONE_PORT: u16 = 15008;
/// The mesh-wide default trust domain, used when a workload names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The service account a workload runs as when it names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Istio's default root namespace: a `selector` policy there applies to matching workloads
/// of every namespace.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// Labels or annotations of a Kubernetes object.
pub type Labels = BTreeMap<String, String>;

pub use crate::identity::Identity;

/// How a workload is reached. HBONE means it is captured by its node's ztunnel (R2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// In the mesh: inbound and outbound go through ztunnel, peers tunnel to it.
    Hbone,
    /// Not in the mesh (R1): plain TCP, never touched.
    #[default]
    Tcp,
}

/// A waypoint a workload or service is bound to, as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WaypointRef {
    /// HBONE address of the waypoint (`ip:15008`).
    pub address: SocketAddr,
    /// The waypoint's identity, when known (from a `waypoints` entry or the workload at that
    /// address); a connection from this identity is the waypoint itself.
    pub identity: Option<Identity>,
    /// `namespace/name` of the Gateway, when known.
    pub name: Option<String>,
    /// The traffic it takes (`istio.io/waypoint-for`); [`WaypointFor::All`] when the
    /// reference is not to a known waypoint.
    pub traffic: WaypointFor,
}

/// The traffic a waypoint takes: its Gateway's `istio.io/waypoint-for` label. Without the
/// label, `all`: what the spec says of a waypoint (R6, R7, R11, R16). Istio 1.22+ creates
/// waypoints labelled `service`; label them so to get Istio's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WaypointFor {
    /// Traffic addressed to a service (its VIP) only: a pod called by its own address
    /// is reached directly, and takes such calls without a hairpin.
    Service,
    /// Traffic addressed to a pod only: a service's traffic goes to its endpoints.
    Workload,
    #[default]
    All,
    /// Bound, but no traffic goes through it.
    None,
}

impl WaypointFor {
    /// The label's value (`service`, `workload`, `all`, `none`).
    pub fn parse(v: &str) -> Result<WaypointFor, String> {
        Ok(match v {
            "service" => WaypointFor::Service,
            "workload" => WaypointFor::Workload,
            "all" => WaypointFor::All,
            "none" => WaypointFor::None,
            _ => return Err(format!("{v:?}: service, workload, all or none")),
        })
    }

    /// The label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            WaypointFor::Service => "service",
            WaypointFor::Workload => "workload",
            WaypointFor::All => "all",
            WaypointFor::None => "none",
        }
    }

    /// Whether it takes traffic addressed to a service (R7).
    pub fn services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    /// Whether it takes traffic addressed to a pod (R6, R11, R12, R16).
    pub fn workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// A pod, VM or other endpoint. (`Default`: empty, unhealthy, capacity 0 — for tests
/// that set what they need.)
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub network: String,
    /// The cluster it runs in (Istio's `clusterName`), empty when not given.
    pub cluster_id: String,
    pub protocol: Protocol,
    pub waypoint: Option<WaypointRef>,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    /// Services it backs: `namespace/hostname` → service port → target port.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// Keys (`namespace/name`) of the selector-scoped policies that apply to it.
    pub authorization_policies: Vec<String>,
    /// The pod's labels (`app`, `version`, …), as Kubernetes users write them.
    pub labels: Labels,
    pub healthy: bool,
    /// Relative weight for weighted-random balancing (at least 1).
    pub capacity: u32,
    /// Where it runs (Kubernetes' topology labels), for locality-aware balancing.
    pub locality: Locality,
}

/// `region`, `zone`, `subzone`; empty when not known.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// What a client shares with an endpoint, from the coarsest (Istio's workload API
/// `LoadBalancing.Scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Network,
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
}

impl Scope {
    /// Whether `a` and `b` are in the same one of this scope (compared as ztunnel does:
    /// unknown equals unknown).
    pub fn shared(self, a: &Workload, b: &Workload) -> bool {
        let (la, lb) = (&a.locality, &b.locality);
        match self {
            Scope::Network => a.network == b.network,
            Scope::Region => la.region == lb.region,
            Scope::Zone => la.zone == lb.zone,
            Scope::Subzone => la.subzone == lb.subzone,
            Scope::Node => a.node == b.node,
            Scope::Cluster => a.cluster_id == b.cluster_id,
        }
    }
}

/// How the scopes of a [`Preference`] are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreferenceMode {
    /// Only endpoints sharing every scope with the client.
    Strict,
    /// The endpoints sharing the longest run of scopes (from the first) with the client;
    /// the next tier when a tier has none (healthy).
    Failover,
}

/// A service's locality preference (Kubernetes `trafficDistribution: PreferClose`,
/// `internalTrafficPolicy: Local`; istiod's `LoadBalancing` for ztunnel).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Preference {
    pub scopes: Vec<Scope>,
    pub mode: PreferenceMode,
}

impl Preference {
    /// How many of the scopes, from the first, `to` shares with `from` ([`Scope::shared`]);
    /// an unknown client shares none.
    pub fn rank(&self, from: Option<&Workload>, to: &Workload) -> usize {
        let Some(from) = from else { return 0 };
        self.scopes
            .iter()
            .take_while(|scope| scope.shared(from, to))
            .count()
    }

    /// The priority of endpoint `to` for client `from` (0: the closest): the scopes it
    /// does not share; `None` when [`PreferenceMode::Strict`] excludes it (it does not
    /// share them all).
    pub fn tier(&self, from: Option<&Workload>, to: &Workload) -> Option<u8> {
        let missing = self.scopes.len() - self.rank(from, to);
        match self.mode {
            PreferenceMode::Strict if missing > 0 => None,
            _ => Some(u8::try_from(missing).unwrap_or(u8::MAX)),
        }
    }

    /// Of `candidates`, those a client `from` uses: the closest priority present
    /// ([`Preference::tier`]; in [`PreferenceMode::Strict`] only full matches have one).
    pub fn narrow<T>(&self, from: Option<&Workload>, candidates: Vec<(&Workload, T)>) -> Vec<T> {
        let tiered: Vec<(u8, T)> = candidates
            .into_iter()
            .filter_map(|(w, t)| Some((self.tier(from, w)?, t)))
            .collect();
        let best = tiered.iter().map(|(p, _)| *p).min();
        tiered
            .into_iter()
            .filter(|(p, _)| Some(*p) == best)
            .map(|(_, t)| t)
            .collect()
    }
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// Whether it runs as `id` (as `identity() == *id`, without building one).
    pub fn has_identity(&self, id: &Identity) -> bool {
        self.trust_domain == id.trust_domain
            && self.namespace == id.namespace
            && self.service_account == id.service_account
    }

    /// Captured by its node's ztunnel (R2).
    pub fn captured(&self) -> bool {
        self.protocol == Protocol::Hbone
    }
}

/// How a service picks one of its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LoadBalancing {
    /// Random, weighted by each endpoint workload's capacity (the default).
    #[default]
    WeightedRandom,
    /// In turn, by a counter the caller supplies.
    RoundRobin,
}

/// One workload backing a service, with its own target ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub workload_uid: String,
    /// Service port → target port for this endpoint. Empty means "the service's".
    pub ports: BTreeMap<u16, u16>,
}

/// A group of workloads reached through virtual IPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// Virtual IPs with their network.
    pub vips: Vec<(String, IpAddr)>,
    /// Service port → default target port.
    pub ports: BTreeMap<u16, u16>,
    /// Sorted by workload uid, so that choices are reproducible.
    pub endpoints: Vec<Endpoint>,
    pub waypoint: Option<WaypointRef>,
    pub load_balancing: LoadBalancing,
    /// Locality preference; `None`: every healthy endpoint alike.
    pub preference: Option<Preference>,
    pub subject_alt_names: Vec<String>,
}

impl Service {
    /// `namespace/hostname`, the key workloads use to name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// The target port of `endpoint` for service port `port`, if the endpoint serves it:
    /// the endpoint's own mapping when it has any, else the service's. 0 means unresolved.
    pub fn target_port(&self, endpoint: &Endpoint, port: u16) -> Option<u16> {
        let t = if endpoint.ports.is_empty() {
            self.ports.get(&port).copied()
        } else {
            endpoint.ports.get(&port).copied()
        };
        t.filter(|t| *t != 0)
    }
}

/// A namespace with its labels (`istio.io/dataplane-mode`, `istio.io/use-waypoint`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// A waypoint: a Gateway object with its address and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    /// HBONE address, normally `ip:15008`.
    pub address: SocketAddr,
    pub identity: Identity,
    /// The `istio.io/for-service-account` annotation: applies only to that service account.
    pub for_service_account: Option<String>,
    /// The `istio.io/waypoint-for` label.
    pub traffic: WaypointFor,
}

impl Waypoint {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn as_ref(&self) -> WaypointRef {
        WaypointRef {
            address: self.address,
            identity: Some(self.identity.clone()),
            name: Some(self.key()),
            traffic: self.traffic,
        }
    }
}

/// A node and the address of its ztunnel (peers send HBONE to `address:15008`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub ztunnel: IpAddr,
}

/// IPv4 from 4 bytes, IPv6 from 16.
pub fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// 4 bytes for IPv4, 16 for IPv6.
pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_parses_and_prints() {
        let id = Identity::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "a", "b"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(id.principal(), "cluster.local/ns/a/sa/b");
        assert!(Identity::parse("spiffe://cluster.local/ns/a").is_none());
        assert!(Identity::parse("cluster.local/ns/a/sa/b").is_none());
    }

    #[test]
    fn ip_bytes_round_trip() {
        for ip in ["10.1.2.3", "fd00::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_from_bytes(&ip_to_bytes(ip)), Some(ip));
        }
        assert_eq!(ip_from_bytes(&[1, 2, 3]), None);
    }
}
