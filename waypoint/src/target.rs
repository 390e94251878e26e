//! The target check (R14): a CONNECT target must be a pod this waypoint manages, or a
//! service (VIP:port) that contains such a pod; anything else is refused.

use std::net::SocketAddr;

use mesh_model::model::WaypointRef;
use mesh_model::snapshot::Snapshot;

use crate::http1::Destination;
use crate::route::ObjectRef;

/// This waypoint, as bindings name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    /// The Gateway, `namespace/name`.
    pub gateway: ObjectRef,
    /// Its HBONE address (`ip:15008`).
    pub address: SocketAddr,
}

impl Me {
    fn is(&self, r: &WaypointRef) -> bool {
        r.address == self.address
            || r.name.as_deref()
                == Some(format!("{}/{}", self.gateway.namespace, self.gateway.name).as_str())
    }
}

/// Why a target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Neither a known service VIP nor a known workload address.
    Unknown,
    /// Known, but not bound to this waypoint.
    NotBound,
    /// A service VIP on a port the service does not have.
    NoSuchPort,
}

/// Resolve and check a CONNECT target.
pub fn resolve(snap: &Snapshot, me: &Me, target: SocketAddr) -> Result<Destination, Refused> {
    if let Some(svc) = snap.service_by_vip(target.ip()) {
        if !svc.ports.contains_key(&target.port()) {
            return Err(Refused::NoSuchPort);
        }
        // Bound, for traffic addressed to services (`istio.io/waypoint-for`).
        let mine = |w: &WaypointRef| me.is(w) && w.traffic.services();
        let bound = svc.waypoint.as_ref().is_some_and(mine)
            || svc.endpoints.iter().any(|ep| {
                snap.workload(&ep.workload_uid)
                    .and_then(|w| w.waypoint.as_ref())
                    .is_some_and(mine)
            });
        if !bound {
            return Err(Refused::NotBound);
        }
        return Ok(Destination::Service {
            service: ObjectRef::new(&svc.namespace, &svc.name),
            port: target.port(),
        });
    }
    let w = snap.workload_by_ip(target.ip()).ok_or(Refused::Unknown)?;
    if !w
        .waypoint
        .as_ref()
        .is_some_and(|r| me.is(r) && r.traffic.workloads())
    {
        return Err(Refused::NotBound);
    }
    Ok(Destination::Workload {
        namespace: w.namespace.clone(),
        labels: w.labels.clone(),
    })
}
