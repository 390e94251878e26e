//! What workers read through the snapshot: the mesh model and the certificates this node's
//! workloads (and the ztunnel itself) use.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use hbone::ca::{CaError, CertSource, SigningCa, StaticCerts, WorkloadCert};
use hbone::proxy::CaConfig;
use mesh_model::snapshot::Snapshot;

use crate::config::Settings;

/// One published version.
pub struct State {
    pub model: Snapshot,
    /// Certificates of this node's captured workloads and of the ztunnel identity.
    pub certs: HashMap<hbone::Identity, Arc<WorkloadCert>>,
    /// The HBONE inbound's TLS as the ztunnel identity (client certificates required): for
    /// connections addressed to the node's ztunnel rather than to a pod.
    pub server_tls: Arc<rustls::ServerConfig>,
    /// The HBONE inbound's TLS per captured workload identity of this node: a connection
    /// addressed to a pod (`podIP:15008`, redirected or not) presents that pod's identity.
    pub workload_tls: HashMap<hbone::Identity, Arc<rustls::ServerConfig>>,
}

impl State {
    /// The server TLS for an HBONE connection addressed to `addr` (its original destination,
    /// or its local address when not redirected): the identity of the captured workload of
    /// `node` at that address, else the ztunnel's own. Returns the identity too.
    pub fn server_tls_for(
        &self,
        addr: std::net::IpAddr,
        node: &str,
    ) -> Option<(&hbone::Identity, &Arc<rustls::ServerConfig>)> {
        let w = self
            .model
            .workload_by_ip(addr)
            .filter(|w| w.node == node && w.captured())?;
        self.workload_tls.get_key_value(&w.identity())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("certificates: {0}")]
    Ca(#[from] CaError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

pub fn cert_source(s: &Settings) -> Result<Arc<dyn CertSource>, CaError> {
    Ok(match &s.ca {
        CaConfig::Builtin(dir) => Arc::new(SigningCa::builtin(dir, &s.trust_domain)?),
        CaConfig::Plugin(dir) => Arc::new(SigningCa::plugin(dir)?),
        CaConfig::Static(dir) => Arc::new(StaticCerts::new(dir)?),
    })
}

/// The identities this node needs certificates for.
fn identities(s: &Settings, model: &Snapshot) -> Vec<hbone::Identity> {
    let mut ids: Vec<hbone::Identity> = model
        .workloads()
        .filter(|w| w.node == s.node && w.captured())
        .map(|w| w.identity())
        .chain(std::iter::once(s.identity.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Build a state, reusing `previous` certificates that are not due for renewal.
pub fn build(
    source: &dyn CertSource,
    s: &Settings,
    model: Snapshot,
    previous: Option<&State>,
) -> Result<State, StateError> {
    let now = SystemTime::now();
    let mut certs = HashMap::new();
    for id in identities(s, &model) {
        let reuse = previous
            .and_then(|p| p.certs.get(&id))
            .filter(|c| !c.needs_refresh(now))
            .cloned();
        let cert = match reuse {
            Some(c) => c,
            None => Arc::new(source.issue(&id, now)?),
        };
        certs.insert(id, cert);
    }
    let own = &certs[&s.identity];
    let server_tls = match previous {
        Some(p)
            if p.certs
                .get(&s.identity)
                .is_some_and(|c| Arc::ptr_eq(c, own)) =>
        {
            p.server_tls.clone()
        }
        _ => hbone::tls::server_config_with(own, s.h2.tls_resumption)?,
    };
    // One server config per workload identity, reused from `previous` while its
    // certificate is the same (a config holds the parsed key: not rebuilt per snapshot).
    let mut workload_tls = HashMap::new();
    for (id, cert) in &certs {
        if *id == s.identity {
            continue;
        }
        let reuse = previous.and_then(|p| {
            let same = p.certs.get(id).is_some_and(|c| Arc::ptr_eq(c, cert));
            same.then(|| p.workload_tls.get(id).cloned()).flatten()
        });
        let tls = match reuse {
            Some(t) => t,
            None => hbone::tls::server_config_with(cert, s.h2.tls_resumption)?,
        };
        workload_tls.insert(id.clone(), tls);
    }
    Ok(State {
        model,
        certs,
        server_tls,
        workload_tls,
    })
}

/// Does any certificate need renewal now?
pub fn needs_renewal(state: &State) -> bool {
    let now = SystemTime::now();
    state.certs.values().any(|c| c.needs_refresh(now))
}
