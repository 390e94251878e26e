//! Control-side HTTP endpoints (blocking, on their own threads — never on a worker):
//! readiness (`/healthz/ready`), stats (`/stats/prometheus`) and admin (`/config_dump`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runtime::listener::{self, BindError};
use serde_json::{json, Value};

use crate::state::State;

/// An HTTP answer: status line, content type, body.
pub type Answer = (&'static str, &'static str, String);

/// A running endpoint; dropped or [`Endpoint::stop`]ped, its thread ends.
pub struct Endpoint {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Endpoint {
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bind `addr` (refusing one another process serves) and answer GETs with `route(path)`.
pub fn serve(
    name: &str,
    addr: SocketAddr,
    route: impl Fn(&str) -> Answer + Send + 'static,
) -> Result<Endpoint, BindError> {
    listener::ensure_not_served(addr)?;
    let l = TcpListener::bind(addr).map_err(|source| BindError::Io { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| BindError::Io { addr, source })?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            for conn in l.incoming() {
                if s2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut req = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match c.read(&mut buf) {
                        // Not expected on this thread (see `proxy::start` on EINTR), but a
                        // server loop retries an interrupted read whatever its cause.
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req);
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = route(path);
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|source| BindError::Io { addr, source })?;
    Ok(Endpoint {
        addr: local,
        stop,
        thread: Some(thread),
    })
}

pub fn not_found() -> Answer {
    ("404 Not Found", "text/plain", "not found\n".into())
}

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
