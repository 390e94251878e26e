//! Routing decisions as pure functions of the snapshot: outbound (R1, R4–R8) and inbound
//! (R9–R12). Randomness and round-robin counters come from a [`Chooser`] the caller owns,
//! so a worker keeps its own and tests are deterministic.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::authz::{Connection, Verdict};
use crate::model::{Identity, LoadBalancing, Service, WaypointRef, Workload, HBONE_PORT};
use crate::snapshot::{Destination, Snapshot};

/// Source of choices for endpoint selection.
pub trait Chooser {
    /// A uniformly distributed number in `0..bound` (`bound` > 0).
    fn random_below(&mut self, bound: u64) -> u64;
    /// The next value of the round-robin counter of `service` (`namespace/hostname`).
    fn next_round_robin(&mut self, service: &str) -> u64;
}

/// A small seeded generator (splitmix64) with per-service counters: deterministic for a
/// seed, cheap enough for one per worker.
#[derive(Debug, Clone, Default)]
pub struct SeededChooser {
    state: u64,
    counters: HashMap<String, u64>,
}

impl SeededChooser {
    pub fn new(seed: u64) -> Self {
        SeededChooser {
            state: seed,
            counters: HashMap::new(),
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Chooser for SeededChooser {
    fn random_below(&mut self, bound: u64) -> u64 {
        // Multiply-shift: unbiased enough for load balancing, no division.
        ((u128::from(self.next_u64()) * u128::from(bound.max(1))) >> 64) as u64
    }

    fn next_round_robin(&mut self, service: &str) -> u64 {
        let c = self.counters.entry(service.to_string()).or_insert(0);
        let v = *c;
        *c = c.wrapping_add(1);
        v
    }
}

/// Why a connection leaves as plain TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassthroughReason {
    /// The sender is not captured (R1): ztunnel does not touch it.
    SourceNotCaptured,
    /// The address is no workload or service of the mesh (R4: like Kubernetes).
    UnknownDestination,
    /// The destination workload is not captured (R1/R4): plain TCP to it.
    DestinationNotCaptured,
}

/// Where and how ztunnel forwards an outbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// R6/R7: HBONE to a waypoint, which applies policy and forwards.
    Waypoint {
        /// The waypoint's HBONE address (`ip:15008`).
        target: SocketAddr,
        /// `:authority` of the CONNECT: the service VIP:port for a service (R7), else the
        /// pod IP and the original port.
        authority: SocketAddr,
        /// The identity the waypoint must present, when known.
        identity: Option<Identity>,
        waypoint: Option<String>,
        /// `namespace/hostname` when the destination was a service.
        service: Option<String>,
        /// The chosen endpoint, when one was chosen.
        workload: Option<String>,
    },
    /// R5: HBONE to the destination node's ztunnel.
    Hbone {
        /// `ztunnel-ip:15008` (the pod IP when the node's ztunnel is not known: in-pod mode).
        target: SocketAddr,
        /// `podIP:targetPort`.
        authority: SocketAddr,
        /// The destination's SPIFFE identity, to verify in the handshake.
        identity: Identity,
        service: Option<String>,
        workload: String,
    },
    /// Plain TCP (R1, R4).
    Passthrough {
        target: SocketAddr,
        reason: PassthroughReason,
        service: Option<String>,
        workload: Option<String>,
    },
    /// A service VIP with no healthy endpoint serving the port: refuse the connection.
    NoEndpoint { service: String, port: u16 },
}

/// Pick an endpoint of `svc` for service port `port` for a client `from`: only healthy
/// endpoints that serve the port, narrowed by the service's locality [`crate::model::Preference`] when it
/// has one; weighted random by capacity, or round robin. Returns the workload and target
/// port.
pub fn choose_endpoint<'s>(
    snap: &'s Snapshot,
    svc: &Service,
    port: u16,
    from: Option<&Workload>,
    chooser: &mut dyn Chooser,
) -> Option<(&'s Workload, u16)> {
    let eligible: Vec<(&Workload, u16)> = svc
        .endpoints
        .iter()
        .filter_map(|e| {
            let w = snap.workload(&e.workload_uid)?;
            let t = svc.target_port(e, port)?;
            (w.healthy && !w.ips.is_empty()).then_some((w, t))
        })
        .collect();
    let eligible = match &svc.preference {
        None => eligible,
        Some(p) => p.narrow(from, eligible.into_iter().map(|c| (c.0, c)).collect()),
    };
    if eligible.is_empty() {
        return None;
    }
    let i = match svc.load_balancing {
        LoadBalancing::RoundRobin => {
            (chooser.next_round_robin(&svc.key()) % eligible.len() as u64) as usize
        }
        LoadBalancing::WeightedRandom => {
            let total: u64 = eligible.iter().map(|(w, _)| u64::from(w.capacity)).sum();
            let mut r = chooser.random_below(total);
            eligible
                .iter()
                .position(|(w, _)| {
                    let c = u64::from(w.capacity);
                    if r < c {
                        true
                    } else {
                        r -= c;
                        false
                    }
                })
                .unwrap_or(0)
        }
    };
    Some(eligible[i])
}

/// The address of `w` in the family of `like` when it has one, else its first.
fn pick_ip(w: &Workload, like: IpAddr) -> IpAddr {
    w.ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .unwrap_or(w.ips[0])
}

/// Is `source` the waypoint itself? Then it must not be sent to itself again.
fn is_waypoint(source: Option<&Workload>, wp: &WaypointRef) -> bool {
    match (source, &wp.identity) {
        (Some(s), Some(id)) => s.identity() == *id || s.ips.contains(&wp.address.ip()),
        (Some(s), None) => s.ips.contains(&wp.address.ip()),
        _ => false,
    }
}

/// R1, R4–R8: decide the path of a connection from `source` (the captured sender, `None`
/// if unknown — treated as captured, since ztunnel only sees captured senders) to the
/// original destination `dst`.
pub fn outbound(
    snap: &Snapshot,
    source: Option<&Workload>,
    dst: SocketAddr,
    chooser: &mut dyn Chooser,
) -> Outbound {
    if source.is_some_and(|s| !s.captured()) {
        return Outbound::Passthrough {
            target: dst,
            reason: PassthroughReason::SourceNotCaptured,
            service: None,
            workload: None,
        };
    }
    match snap.lookup(dst.ip()) {
        None => Outbound::Passthrough {
            target: dst,
            reason: PassthroughReason::UnknownDestination,
            service: None,
            workload: None,
        },
        Some(Destination::Service(svc)) => {
            let key = svc.key();
            // A waypoint bound to the service itself (use-waypoint label) takes everything
            // (when it takes service traffic, `istio.io/waypoint-for`).
            let for_services =
                |wp: &&WaypointRef| wp.traffic.services() && !is_waypoint(source, wp);
            if let Some(wp) = svc.waypoint.as_ref().filter(for_services) {
                return via_waypoint(wp, dst, Some(key), None);
            }
            let Some((ep, target_port)) = choose_endpoint(snap, svc, dst.port(), source, chooser)
            else {
                return Outbound::NoEndpoint {
                    service: key,
                    port: dst.port(),
                };
            };
            // R7: the chosen endpoint decides; the waypoint gets the service as target.
            if let Some(wp) = ep.waypoint.as_ref().filter(for_services) {
                return via_waypoint(wp, dst, Some(key), Some(ep.uid.clone()));
            }
            let pod = SocketAddr::new(pick_ip(ep, dst.ip()), target_port);
            to_workload(snap, ep, pod, Some(key))
        }
        Some(Destination::Workload(w)) => {
            // R6: a direct pod IP with a waypoint goes to the waypoint (when it takes pod
            // traffic, `istio.io/waypoint-for`).
            if let Some(wp) = w
                .waypoint
                .as_ref()
                .filter(|wp| wp.traffic.workloads() && !is_waypoint(source, wp))
            {
                return via_waypoint(wp, dst, None, Some(w.uid.clone()));
            }
            to_workload(snap, w, dst, None)
        }
    }
}

fn via_waypoint(
    wp: &WaypointRef,
    authority: SocketAddr,
    service: Option<String>,
    workload: Option<String>,
) -> Outbound {
    Outbound::Waypoint {
        target: wp.address,
        authority,
        identity: wp.identity.clone(),
        waypoint: wp.name.clone(),
        service,
        workload,
    }
}

/// R5 or passthrough to a chosen pod address.
fn to_workload(
    snap: &Snapshot,
    w: &Workload,
    pod: SocketAddr,
    service: Option<String>,
) -> Outbound {
    if !w.captured() {
        return Outbound::Passthrough {
            target: pod,
            reason: PassthroughReason::DestinationNotCaptured,
            service,
            workload: Some(w.uid.clone()),
        };
    }
    let ztunnel = snap.node(&w.node).map(|n| n.ztunnel).unwrap_or(pod.ip());
    Outbound::Hbone {
        target: SocketAddr::new(ztunnel, HBONE_PORT),
        authority: pod,
        identity: w.identity(),
        service,
        workload: w.uid.clone(),
    }
}

/// An inbound connection as ztunnel receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundRequest<'a> {
    /// The peer's verified identity (HBONE); `None` for plaintext (R10).
    pub peer: Option<&'a Identity>,
    pub src: IpAddr,
    /// The destination pod address (`:authority` for HBONE, original dst for plaintext).
    pub dst: SocketAddr,
}

/// What ztunnel does with an inbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// The address is not a captured workload on this node: refuse.
    NotServed,
    /// R11/R12: the destination has a waypoint and the caller is not it: send the
    /// connection to the waypoint (HBONE, `:authority` = the original destination).
    Hairpin {
        waypoint: WaypointRef,
        authority: SocketAddr,
        workload: String,
    },
    /// R9: allowed by authorization; forward to the pod.
    Allow { workload: String, verdict: Verdict },
    /// R9/R10: denied by authorization (HBONE 401, plaintext reset).
    Deny { workload: String, verdict: Verdict },
}

/// R9–R12: decide an inbound connection on `node`.
///
/// Order: not a captured workload of this node → [`Inbound::NotServed`]; destination with a
/// waypoint and caller other than that waypoint (by identity; plaintext never is) →
/// [`Inbound::Hairpin`] — the waypoint enforces policy and comes back with its own identity;
/// otherwise L4 authorization decides [`Inbound::Allow`] or [`Inbound::Deny`].
pub fn inbound(snap: &Snapshot, req: &InboundRequest<'_>, node: &str) -> Inbound {
    let Some(w) = snap
        .workload_by_ip(req.dst.ip())
        .filter(|w| w.node == node && w.captured())
    else {
        return Inbound::NotServed;
    };
    let conn = Connection {
        peer: req.peer,
        src: req.src,
        dst: req.dst,
    };
    // A waypoint that takes no pod traffic (`istio.io/waypoint-for: service|none`) is not
    // enforced here: a call to the pod's own address reaches it directly.
    if let Some(wp) = w.waypoint.as_ref().filter(|wp| wp.traffic.workloads()) {
        let from_waypoint = match (&wp.identity, req.peer) {
            (Some(id), Some(peer)) => id == peer,
            _ => false,
        };
        if !from_waypoint {
            // The waypoint applies the pod's policies, but not its PeerAuthentication: a
            // STRICT pod's plaintext is refused here, never hairpinned (Istio's ambient
            // PeerAuthentication design).
            let verdict = snap.authorize_peer_authentication(w, &conn);
            if !verdict.allowed {
                return Inbound::Deny {
                    workload: w.uid.clone(),
                    verdict,
                };
            }
            return Inbound::Hairpin {
                waypoint: wp.clone(),
                authority: req.dst,
                workload: w.uid.clone(),
            };
        }
    }
    let verdict = snap.authorize(w, &conn);
    if verdict.allowed {
        Inbound::Allow {
            workload: w.uid.clone(),
            verdict,
        }
    } else {
        Inbound::Deny {
            workload: w.uid.clone(),
            verdict,
        }
    }
}
