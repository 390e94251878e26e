//! The immutable routing snapshot: every workload, service, policy, namespace, waypoint and
//! node, with the indexes a connection needs (by workload IP, by service VIP, by identity).
//! Built once per configuration version from the wire types; never changed afterwards.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use crate::authz::{self, Connection, Policy, Verdict};
use crate::model::{
    ip_from_bytes, Endpoint, Identity, Labels, LoadBalancing, Locality, Namespace, Node,
    Preference, PreferenceMode, Protocol, Scope, Service, Waypoint, WaypointRef, Workload,
    DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, HBONE_PORT,
};
use crate::names;
use crate::wire::workload as ww;

/// Name of the service extension that selects round-robin balancing (no config).
pub const ROUND_ROBIN_EXTENSION: &str = "mesh.io/load-balancing/round-robin";

/// Wire input that has no place in Istio's workload API: what the local config adds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    pub namespaces: Vec<Namespace>,
    pub waypoints: Vec<Waypoint>,
    pub nodes: Vec<Node>,
    /// Pod labels by workload uid (Istio's workload API carries none: istiod resolves
    /// selectors itself; the local config keeps them for telemetry and selection).
    pub labels: BTreeMap<String, Labels>,
    /// The answers `DNS` ServiceEntries were built from: host name → its addresses
    /// (sorted), to tell when a lookup now answers otherwise ([`crate::config::dns_changed`]).
    pub dns: BTreeMap<String, Vec<IpAddr>>,
}

/// The wire types that make up one configuration version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WireState {
    pub addresses: Vec<ww::Address>,
    pub authorizations: Vec<crate::wire::security::Authorization>,
    pub extras: Extras,
}

/// Inconsistent wire input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("{what}: address of {len} bytes (expected 4 or 16)")]
    BadAddress { what: String, len: usize },
    #[error("{what}: port {port} out of range")]
    BadPort { what: String, port: u32 },
    #[error("address {ip} is claimed by both {first} and {second}")]
    DuplicateAddress {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("duplicate {kind} {key}")]
    Duplicate { kind: &'static str, key: String },
    #[error(transparent)]
    Policy(#[from] authz::PolicyError),
}

/// An immutable view of the mesh.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: u64,
    workloads: BTreeMap<String, Workload>,
    services: BTreeMap<String, Service>,
    policies: Vec<Policy>,
    namespaces: BTreeMap<String, Namespace>,
    waypoints: Vec<Waypoint>,
    nodes: HashMap<String, Node>,
    by_ip: HashMap<IpAddr, String>,
    by_vip: HashMap<IpAddr, String>,
    /// Per hostname ([`names::host_key`]: lower case, no trailing dot): the key of the first
    /// service (in key order) with that hostname.
    by_host: HashMap<String, String>,
    by_identity: HashMap<Identity, Vec<String>>,
    /// [`Extras::dns`].
    dns: BTreeMap<String, Vec<IpAddr>>,
}

/// What an IP address is.
#[derive(Debug, Clone, Copy)]
pub enum Destination<'a> {
    Service(&'a Service),
    Workload(&'a Workload),
}

fn port16(what: &str, p: u32) -> Result<u16, ModelError> {
    u16::try_from(p).map_err(|_| ModelError::BadPort {
        what: what.to_string(),
        port: p,
    })
}

fn ports(what: &str, ports: &[ww::Port]) -> Result<BTreeMap<u16, u16>, ModelError> {
    ports
        .iter()
        .map(|p| Ok((port16(what, p.service_port)?, port16(what, p.target_port)?)))
        .collect()
}

impl Snapshot {
    /// The DNS answers its ServiceEntries were built from (host name → sorted addresses);
    /// empty without `DNS` entries.
    pub fn dns_answers(&self) -> &BTreeMap<String, Vec<IpAddr>> {
        &self.dns
    }

    /// Build the internal model from the wire types. Waypoint references (`GatewayAddress`)
    /// are resolved to a known waypoint by address, else to the workload at that address
    /// (for its identity).
    pub fn from_wire(version: u64, state: &WireState) -> Result<Snapshot, ModelError> {
        let mut snap = Snapshot {
            version,
            waypoints: state.extras.waypoints.clone(),
            dns: state.extras.dns.clone(),
            ..Default::default()
        };
        for n in &state.extras.namespaces {
            snap.namespaces.insert(n.name.clone(), n.clone());
        }
        for n in &state.extras.nodes {
            snap.nodes.insert(n.name.clone(), n.clone());
        }
        // Workloads first (their IPs are needed to resolve waypoint identities).
        let mut raw_waypoints: Vec<(String, Option<&ww::GatewayAddress>)> = Vec::new();
        let mut services_wire = Vec::new();
        for a in &state.addresses {
            match &a.r#type {
                Some(ww::address::Type::Workload(w)) => {
                    let what = format!("workload {}", w.uid);
                    let ips = w
                        .addresses
                        .iter()
                        .map(|b| {
                            ip_from_bytes(b).ok_or_else(|| ModelError::BadAddress {
                                what: what.clone(),
                                len: b.len(),
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut services = BTreeMap::new();
                    for (k, pl) in &w.services {
                        services.insert(k.clone(), ports(&what, &pl.ports)?);
                    }
                    let wl = Workload {
                        uid: w.uid.clone(),
                        name: w.name.clone(),
                        namespace: w.namespace.clone(),
                        service_account: non_empty(&w.service_account, DEFAULT_SERVICE_ACCOUNT),
                        trust_domain: non_empty(&w.trust_domain, DEFAULT_TRUST_DOMAIN),
                        ips,
                        node: w.node.clone(),
                        network: w.network.clone(),
                        cluster_id: w.cluster_id.clone(),
                        protocol: if w.tunnel_protocol == ww::TunnelProtocol::Hbone as i32 {
                            Protocol::Hbone
                        } else {
                            Protocol::Tcp
                        },
                        waypoint: None,
                        canonical_name: w.canonical_name.clone(),
                        canonical_revision: w.canonical_revision.clone(),
                        workload_name: w.workload_name.clone(),
                        services,
                        authorization_policies: w.authorization_policies.clone(),
                        labels: state.extras.labels.get(&w.uid).cloned().unwrap_or_default(),
                        healthy: w.status != ww::WorkloadStatus::Unhealthy as i32,
                        capacity: w.capacity.unwrap_or(1).max(1),
                        locality: w
                            .locality
                            .as_ref()
                            .map(|l| Locality {
                                region: l.region.clone(),
                                zone: l.zone.clone(),
                                subzone: l.subzone.clone(),
                            })
                            .unwrap_or_default(),
                    };
                    for ip in &wl.ips {
                        if let Some(first) = snap.by_ip.insert(*ip, wl.uid.clone()) {
                            return Err(ModelError::DuplicateAddress {
                                ip: *ip,
                                first: format!("workload {first}"),
                                second: what,
                            });
                        }
                    }
                    snap.by_identity
                        .entry(wl.identity())
                        .or_default()
                        .push(wl.uid.clone());
                    raw_waypoints.push((wl.uid.clone(), w.waypoint.as_ref()));
                    if snap.workloads.insert(wl.uid.clone(), wl).is_some() {
                        return Err(ModelError::Duplicate {
                            kind: "workload",
                            key: w.uid.clone(),
                        });
                    }
                }
                Some(ww::address::Type::Service(s)) => services_wire.push(s),
                None => {}
            }
        }
        for (uid, gw) in raw_waypoints {
            let r = gw.and_then(|g| snap.resolve_gateway(g));
            if let Some(w) = snap.workloads.get_mut(&uid) {
                w.waypoint = r;
            }
        }
        for s in services_wire {
            let what = format!("service {}/{}", s.namespace, s.hostname);
            let mut vips = Vec::new();
            for a in &s.addresses {
                let ip = ip_from_bytes(&a.address).ok_or_else(|| ModelError::BadAddress {
                    what: what.clone(),
                    len: a.address.len(),
                })?;
                if let Some(first) = snap
                    .by_vip
                    .insert(ip, format!("{}/{}", s.namespace, s.hostname))
                {
                    return Err(ModelError::DuplicateAddress {
                        ip,
                        first: format!("service {first}"),
                        second: what,
                    });
                }
                if let Some(uid) = snap.by_ip.get(&ip) {
                    return Err(ModelError::DuplicateAddress {
                        ip,
                        first: format!("workload {uid}"),
                        second: what,
                    });
                }
                vips.push((a.network.clone(), ip));
            }
            let round_robin = s.extensions.iter().any(|e| e.name == ROUND_ROBIN_EXTENSION);
            let svc = Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                hostname: s.hostname.clone(),
                vips,
                ports: ports(&what, &s.ports)?,
                endpoints: Vec::new(),
                waypoint: s.waypoint.as_ref().and_then(|g| snap.resolve_gateway(g)),
                load_balancing: if round_robin {
                    LoadBalancing::RoundRobin
                } else {
                    LoadBalancing::WeightedRandom
                },
                preference: s.load_balancing.as_ref().and_then(preference),
                subject_alt_names: s.subject_alt_names.clone(),
            };
            let key = svc.key();
            if snap.services.insert(key.clone(), svc).is_some() {
                return Err(ModelError::Duplicate {
                    kind: "service",
                    key,
                });
            }
        }
        for (key, svc) in &snap.services {
            snap.by_host
                .entry(names::host_key(&svc.hostname))
                .or_insert_with(|| key.clone());
        }
        // Endpoints come from the workloads' `services` (BTreeMap order: sorted by uid).
        for w in snap.workloads.values() {
            for (key, ports) in &w.services {
                if let Some(s) = snap.services.get_mut(key) {
                    s.endpoints.push(Endpoint {
                        workload_uid: w.uid.clone(),
                        ports: ports.clone(),
                    });
                }
            }
        }
        for a in &state.authorizations {
            snap.policies.push(Policy::try_from(a)?);
        }
        Ok(snap)
    }

    fn resolve_gateway(&self, g: &ww::GatewayAddress) -> Option<WaypointRef> {
        let ww::gateway_address::Destination::Address(a) = g.destination.as_ref()? else {
            return None; // hostname destinations are not resolved (no DNS in the model)
        };
        let ip = ip_from_bytes(&a.address)?;
        let port = u16::try_from(g.hbone_mtls_port)
            .ok()
            .filter(|p| *p != 0)
            .unwrap_or(HBONE_PORT);
        let address = SocketAddr::new(ip, port);
        if let Some(w) = self.waypoints.iter().find(|w| w.address.ip() == ip) {
            return Some(WaypointRef {
                address,
                ..w.as_ref()
            });
        }
        Some(WaypointRef {
            address,
            identity: self.workload_by_ip(ip).map(Workload::identity),
            name: None,
            traffic: Default::default(),
        })
    }

    pub fn workload(&self, uid: &str) -> Option<&Workload> {
        self.workloads.get(uid)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values()
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).and_then(|u| self.workloads.get(u))
    }

    /// Workloads running as `id`.
    pub fn workloads_by_identity(&self, id: &Identity) -> impl Iterator<Item = &Workload> {
        self.by_identity
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|u| self.workloads.get(u))
    }

    /// A service by `namespace/hostname`.
    pub fn service(&self, key: &str) -> Option<&Service> {
        self.services.get(key)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// The service a host name (a SOCKS5 domain) names, whatever its case and trailing dots
    /// (the first in key order when namespaces share a hostname). No allocation: the name
    /// is lower-cased on the stack.
    pub fn service_by_host(&self, name: &str) -> Option<&Service> {
        let name = name.trim_end_matches('.');
        // No indexed hostname is longer than 255 bytes.
        let mut buf = [0u8; 255];
        let b = buf.get_mut(..name.len())?;
        b.copy_from_slice(name.as_bytes());
        b.make_ascii_lowercase();
        let key = std::str::from_utf8(b).ok()?;
        self.by_host.get(key).and_then(|k| self.services.get(k))
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.by_vip.get(&ip).and_then(|k| self.services.get(k))
    }

    /// A service VIP first, then a workload IP.
    pub fn lookup(&self, ip: IpAddr) -> Option<Destination<'_>> {
        self.service_by_vip(ip)
            .map(Destination::Service)
            .or_else(|| self.workload_by_ip(ip).map(Destination::Workload))
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    pub fn waypoints(&self) -> &[Waypoint] {
        &self.waypoints
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Whether a connection proven as `peer` from address `socket` is the node ztunnel of
    /// the captured workload at `claimed`, speaking for it (so its `forwarded: for=claimed`
    /// can be believed; the ztunnel's inbound and the waypoint both apply this): that
    /// workload runs as `peer` (only the ztunnel of a node running a workload of that
    /// identity holds its certificate) and, when the model names the ztunnel address of the
    /// workload's node (`nodes[].ztunnel`), `socket` is that address. Without `nodes[]` for
    /// that node (Istio's `podIP:15008` addressing) the identity is all there is to check.
    /// Lookups only, no allocation.
    pub fn node_ztunnel_speaks_for(
        &self,
        peer: &Identity,
        claimed: IpAddr,
        socket: IpAddr,
    ) -> bool {
        let Some(w) = self.workload_by_ip(claimed) else {
            return false;
        };
        w.captured()
            && w.has_identity(peer)
            && self
                .node(&w.node)
                .is_none_or(|n| n.ztunnel.to_canonical() == socket.to_canonical())
    }

    /// L4 authorization of a connection to `dst` (R9, R10).
    pub fn authorize(&self, dst: &Workload, conn: &Connection<'_>) -> Verdict {
        authz::evaluate(self.policies.iter().filter(|p| p.applies_to(dst)), conn)
    }

    /// Only `dst`'s PeerAuthentication policies: what the transport must be, which its
    /// ztunnel enforces even where its waypoint applies the rest (R12).
    pub fn authorize_peer_authentication(&self, dst: &Workload, conn: &Connection<'_>) -> Verdict {
        authz::evaluate(
            self.policies
                .iter()
                .filter(|p| p.from_peer_authentication() && p.applies_to(dst)),
            conn,
        )
    }
}

/// istiod's `LoadBalancing` as a [`Preference`] (an unspecified mode fails over); `None`
/// without scopes, or in `PASSTHROUGH`. Unknown scopes are dropped.
fn preference(lb: &ww::LoadBalancing) -> Option<Preference> {
    use ww::load_balancing::{Mode, Scope as S};
    let mode = match Mode::try_from(lb.mode).ok()? {
        Mode::Strict => PreferenceMode::Strict,
        Mode::Failover | Mode::UnspecifiedMode => PreferenceMode::Failover,
        Mode::Passthrough => return None,
    };
    let scopes: Vec<Scope> = lb
        .routing_preference
        .iter()
        .filter_map(|s| {
            Some(match S::try_from(*s).ok()? {
                S::Network => Scope::Network,
                S::Region => Scope::Region,
                S::Zone => Scope::Zone,
                S::Subzone => Scope::Subzone,
                S::Node => Scope::Node,
                S::Cluster => Scope::Cluster,
                S::UnspecifiedScope => return None,
            })
        })
        .collect();
    (!scopes.is_empty()).then_some(Preference { scopes, mode })
}

fn non_empty(s: &str, default: &str) -> String {
    if s.is_empty() { default } else { s }.to_string()
}
