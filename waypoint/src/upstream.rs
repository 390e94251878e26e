//! Choosing the upstream endpoint of a routed request (R17): a service's endpoints from the
//! mesh model, balanced per service as its DestinationRule says.
//!
//! [`Balancers`] belongs to one worker; on a new snapshot version it rebuilds a service's
//! balancer only if that service's endpoint list or DestinationRule changed, keeping the
//! others' state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use mesh_model::model::HBONE_PORT;
use mesh_model::snapshot::Snapshot;

use crate::config::{ServiceLb, WaypointConfig};
use crate::lb::{Balancer, HashInput, Rng};
use crate::route::ObjectRef;

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub workload_uid: String,
    /// `podIP:targetPort`: the HBONE CONNECT `:authority`.
    pub authority: SocketAddr,
    /// Where the tunnel goes: the pod's node's ztunnel on 15008 (or the pod itself).
    pub hbone: SocketAddr,
}

/// The healthy endpoints of `service` that serve `port`, in the model's (uid) order.
pub fn endpoints(snap: &Snapshot, service: &ObjectRef, port: u16) -> Vec<Endpoint> {
    let Some(svc) = snap
        .services()
        .find(|s| s.namespace == service.namespace && s.name == service.name)
    else {
        return vec![];
    };
    svc.endpoints
        .iter()
        .filter_map(|ep| {
            let w = snap.workload(&ep.workload_uid)?;
            if !w.healthy {
                return None;
            }
            let target = svc.target_port(ep, port)?;
            let ip = *w.ips.first()?;
            let hbone_ip = snap.node(&w.node).map_or(ip, |n| n.ztunnel);
            Some(Endpoint {
                workload_uid: w.uid.clone(),
                authority: SocketAddr::new(ip, target),
                hbone: SocketAddr::new(hbone_ip, HBONE_PORT),
            })
        })
        .collect()
}

struct Entry {
    /// The snapshot version the endpoints were read from.
    version: u64,
    endpoints: Vec<Endpoint>,
    /// The DestinationRule it was built with.
    lb: ServiceLb,
    balancer: Balancer,
}

/// Per-worker balancers, by service port.
#[derive(Default)]
pub struct Balancers {
    by_service: HashMap<(ObjectRef, u16), Entry>,
}

impl Balancers {
    /// Choose an endpoint of `service:port`; `None` when it has none. Call
    /// [`Balancers::finish`] with the same key and index when the request ends.
    pub fn pick(
        &mut self,
        cfg: &WaypointConfig,
        service: &ObjectRef,
        port: u16,
        input: &HashInput<'_>,
        now: Instant,
        rng: &mut dyn Rng,
    ) -> Option<(usize, Endpoint)> {
        let snap = cfg.mesh.as_ref()?;
        let key = (service.clone(), port);
        let current = self
            .by_service
            .get(&key)
            .is_some_and(|e| e.version == snap.version);
        if !current {
            // A new snapshot: keep the balancer's state unless this service's endpoints
            // or its DestinationRule changed.
            let eps = endpoints(snap, service, port);
            let lb = cfg.lb(service);
            match self.by_service.get_mut(&key) {
                Some(e) if e.endpoints == eps && e.lb == lb => e.version = snap.version,
                _ => {
                    let balancer = Balancer::new(eps.len(), lb.policy.clone(), lb.outlier);
                    self.by_service.insert(
                        key.clone(),
                        Entry {
                            version: snap.version,
                            endpoints: eps,
                            lb,
                            balancer,
                        },
                    );
                }
            }
        }
        let entry = self.by_service.get_mut(&key).expect("inserted");
        let i = entry.balancer.pick(input, now, rng)?;
        entry.balancer.start(i);
        Some((i, entry.endpoints[i].clone()))
    }

    /// The request to endpoint `i` of `service:port` ended with `status` (0: no response).
    pub fn finish(&mut self, service: &ObjectRef, port: u16, i: usize, status: u16, now: Instant) {
        if let Some(e) = self.by_service.get_mut(&(service.clone(), port)) {
            if i < e.balancer.len() {
                e.balancer.finish(i, status, now);
            }
        }
    }
}
