//! Control-side HTTP endpoints (blocking, on their own threads — never on a worker):
//! readiness (`/healthz/ready`), stats (`/stats/prometheus`) and admin (`/config_dump`).
//! The server is the runtime's [`runtime::admin`]; this module adds the config dump.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::state::State;

pub use runtime::admin::{not_found, serve, Answer, Endpoint};

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `/config_dump`: workloads, services, policies, waypoints, nodes, certificates, version.
pub fn config_dump(state: &State, version: u64) -> Value {
    let m = &state.model;
    let workloads: Vec<Value> = m
        .workloads()
        .map(|w| {
            json!({
                "uid": w.uid, "name": w.name, "namespace": w.namespace,
                "serviceAccount": w.service_account, "identity": w.identity().to_string(),
                "workloadIps": w.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "node": w.node,
                "protocol": if w.captured() { "HBONE" } else { "TCP" },
                "waypoint": w.waypoint.as_ref().map(|wp| json!({
                    "address": wp.address.to_string(), "name": wp.name,
                    "identity": wp.identity.as_ref().map(|i| i.to_string()),
                    "for": wp.traffic.as_str(),
                })),
                "services": w.services, "authorizationPolicies": w.authorization_policies,
                "healthy": w.healthy, "capacity": w.capacity,
            })
        })
        .collect();
    let services: Vec<Value> = m
        .services()
        .map(|s| {
            json!({
                "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
                "vips": s.vips.iter().map(|(n, ip)| format!("{n}/{ip}")).collect::<Vec<_>>(),
                "ports": s.ports,
                "endpoints": s.endpoints.iter().map(|e| json!({"workloadUid": e.workload_uid, "ports": e.ports})).collect::<Vec<_>>(),
                "waypoint": s.waypoint.as_ref().map(|wp| wp.address.to_string()),
                "waypointFor": s.waypoint.as_ref().map(|wp| wp.traffic.as_str()),
                "loadBalancing": format!("{:?}", s.load_balancing),
            })
        })
        .collect();
    let policies: Vec<Value> = m
        .policies()
        .iter()
        .map(|p| {
            json!({
                "name": p.name, "namespace": p.namespace,
                "scope": format!("{:?}", p.scope), "action": format!("{:?}", p.action),
                "dryRun": p.dry_run, "rules": format!("{:?}", p.rules),
            })
        })
        .collect();
    let waypoints: Vec<Value> = m
        .waypoints()
        .iter()
        .map(|w| json!({"name": w.key(), "address": w.address.to_string(), "identity": w.identity.to_string(), "forServiceAccount": w.for_service_account}))
        .collect();
    let mut certs: Vec<Value> = state
        .certs
        .iter()
        .map(|(id, c)| {
            json!({
                "identity": id.to_string(),
                "notBefore": epoch(c.not_before),
                "notAfter": epoch(c.not_after),
                "refreshAt": epoch(c.refresh_at()),
            })
        })
        .collect();
    certs.sort_by_key(|c| c["identity"].as_str().unwrap_or_default().to_string());
    json!({
        "version": version,
        "snapshotVersion": m.version,
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "waypoints": waypoints,
        "certificates": certs,
    })
}
