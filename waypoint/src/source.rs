//! Who the original client of a tunnel is, from what the waypoint can verify.
//!
//! **Source address** (`ipBlocks`, `source.ip`, source-IP hashing, telemetry, the
//! `x-forwarded-for` added upstream): the CONNECT's `forwarded: for=` is believed only from
//! a hop that captured that client itself; otherwise it is the TCP peer's address:
//!
//! - a **ztunnel** (its own identity, [`ztunnel_identity`]: `ns/istio-system/sa/ztunnel`
//!   unless the settings name another), which sends `for=` when it hairpins a captured
//!   connection to this waypoint (R12);
//! - the client's **node ztunnel speaking for it**: the model has a captured workload at the
//!   `for=` address whose identity is the peer certificate's (only that workload's node
//!   ztunnel holds its certificate), and, when the model names that node's ztunnel address,
//!   the connection comes from there (or from the workload's own address).
//!
//! Anyone else (a sidecar, another waypoint, a ztunnel speaking for a different workload, a
//! workload outside the model) gets its peer address: a spoofed `for=` no longer dodges a
//! DENY on the real address.
//!
//! **Workload and namespace** (telemetry): from the verified identity and the model, never
//! from the CONNECT's `baggage`, which the client writes; baggage may only name the workload
//! the model does not know, and only within the verified namespace.

use std::net::IpAddr;

use hbone::wire::Baggage;
use hbone::Identity;
use mesh_model::snapshot::Snapshot;

use crate::config::WaypointConfig;

/// The ztunnel identity a waypoint trusts `forwarded: for=` from: the settings'
/// `ztunnel_identity`, else `spiffe://<trust domain>/ns/istio-system/sa/ztunnel` (Istio's
/// ztunnel service account, and ztunnel's own default). Parsed when the snapshot was
/// loaded ([`crate::config::ZtunnelIdentity`]): a tunnel only borrows it.
pub fn ztunnel_identity(cfg: &WaypointConfig) -> &Identity {
    &cfg.ztunnel_identity
}

/// The namespace whose GAMMA consumer routes ([`crate::route`]) apply to the requests of a
/// tunnel whose verified peer is `peer` (derived once per tunnel and snapshot, kept in
/// [`crate::http1::TunnelCtx::client_namespace`]): that identity's namespace,
/// except for the trusted `ztunnel`'s. A ztunnel's hairpin (R12) carries a client that
/// called the pod directly, outside the mesh: nothing authenticates it, and the ztunnel's
/// own identity says nothing of its namespace, so it gets the producer routes only (`None`).
/// The address a hairpin's `forwarded: for=` names is believed for policy and telemetry,
/// but an address is not an identity: it never selects consumer routes. (Istio's waypoint
/// does not route by client namespace at all: it builds one route table per Service from
/// the routes of the Service's namespace or its own.)
pub fn consumer_namespace<'a>(peer: Option<&'a Identity>, ztunnel: &Identity) -> Option<&'a str> {
    peer.filter(|id| *id != ztunnel)
        .map(|id| id.namespace.as_str())
}

/// The tunnel's client address: `forwarded` when the hop that sent it captured that client
/// (see the module docs), else `peer_addr`.
pub fn client_ip(
    model: Option<&Snapshot>,
    peer: Option<&Identity>,
    peer_addr: IpAddr,
    forwarded: Option<IpAddr>,
    ztunnel: &Identity,
) -> IpAddr {
    let peer_addr = peer_addr.to_canonical();
    let (Some(f), Some(id)) = (forwarded.map(|f| f.to_canonical()), peer) else {
        return peer_addr;
    };
    if id == ztunnel {
        return f;
    }
    if f == peer_addr || model.is_some_and(|m| m.node_ztunnel_speaks_for(id, f, peer_addr)) {
        f
    } else {
        peer_addr
    }
}

/// The client's workload and namespace for telemetry (`unknown` when not known): the
/// namespace of the verified identity (the model's workload's for a ztunnel's hairpin), the
/// model's workload at `addr` when it runs as that identity; `baggage` only names a
/// workload the model does not, and only in that namespace.
pub fn workload_of(
    model: Option<&Snapshot>,
    peer: Option<&Identity>,
    addr: IpAddr,
    ztunnel: &Identity,
    baggage: &Baggage,
) -> (String, String) {
    let unknown = || "unknown".to_string();
    let w = model.and_then(|m| m.workload_by_ip(addr));
    match peer {
        // A hairpin: the ztunnel's identity says nothing of the client; the model does.
        Some(id) if id == ztunnel => match w {
            Some(w) => (crate::service::workload_name(w), w.namespace.clone()),
            None => (unknown(), unknown()),
        },
        Some(id) => {
            let ns = id.namespace.clone();
            let name = match w {
                Some(w) if w.has_identity(id) => crate::service::workload_name(w),
                Some(_) => unknown(),
                None => baggage
                    .workload_name
                    .clone()
                    .filter(|_| baggage.namespace.as_ref().is_none_or(|n| *n == ns))
                    .unwrap_or_else(unknown),
            };
            (name, ns)
        }
        None => match w {
            Some(w) => (crate::service::workload_name(w), w.namespace.clone()),
            None => (unknown(), unknown()),
        },
    }
}
