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
    /// The HBONE inbound's TLS (the ztunnel identity, client certificates required).
    pub server_tls: Arc<rustls::ServerConfig>,
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
        _ => hbone::tls::server_config(own)?,
    };
    Ok(State {
        model,
        certs,
        server_tls,
    })
}

/// Does any certificate need renewal now?
pub fn needs_renewal(state: &State) -> bool {
    let now = SystemTime::now();
    state.certs.values().any(|c| c.needs_refresh(now))
}
