//! What workers read through the snapshot: the mesh model and the certificates this node's
//! workloads (and the ztunnel itself) use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use hbone::ca::{CaError, CertSource, SigningCa, StaticCerts, WorkloadCert};
use hbone::proxy::CaConfig;
use mesh_model::model::Workload;
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
    /// Per IP of each captured workload of this node: what an outbound connection from it
    /// needs of its source, worked out with the snapshot instead of per connection.
    pub sources: HashMap<IpAddr, Arc<Source>>,
    /// Per workload uid: its telemetry label values (every workload of the snapshot).
    pub texts: HashMap<String, WorkloadText>,
    /// Per service key (`namespace/hostname`, `Service::key`): the hostname, as a label value.
    pub service_hosts: HashMap<String, Arc<str>>,
    /// Per identity of the snapshot (workloads, waypoints, this node's `peer_identity` and its
    /// own `identity`): its SPIFFE text, as a label value (the `peer` and `identity` path
    /// labels), rendered once per snapshot.
    pub principals: HashMap<hbone::Identity, Arc<str>>,
}

/// A captured workload of this node as the source of outbound HBONE: the identity it acts
/// as, its certificate and the `baggage` it sends, rendered once per snapshot.
pub struct Source {
    pub identity: hbone::Identity,
    pub cert: Arc<WorkloadCert>,
    /// Istio's `baggage` for the workload ([`source_baggage`]); every CONNECT from it sends
    /// these same bytes.
    pub baggage: Option<http::HeaderValue>,
}

/// A workload's Istio telemetry label values, shared by every connection's labels.
#[derive(Debug, Clone)]
pub struct WorkloadText {
    /// `workload_name`, else the pod name.
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub identity: hbone::Identity,
    /// The SPIFFE identity, as text.
    pub principal: Arc<str>,
    /// `<principal>,<ztunnel.peer_identity>`: the identities an outbound tunnel to its
    /// node's ztunnel accepts (the `peer` path label).
    pub principal_or_node: Arc<str>,
    /// The hostname of the first service it backs (a destination with no service named).
    pub service: Option<Arc<str>>,
}

impl WorkloadText {
    fn of(w: &Workload, node_identity: &hbone::Identity) -> Self {
        let name = if w.workload_name.is_empty() {
            &w.name
        } else {
            &w.workload_name
        };
        let identity = w.identity();
        WorkloadText {
            name: name.as_str().into(),
            namespace: w.namespace.as_str().into(),
            principal: identity.to_string().into(),
            principal_or_node: format!("{identity},{node_identity}").into(),
            identity,
            service: w.services.keys().next().map(|s| service_host(s).into()),
        }
    }
}

/// `namespace/hostname` → `hostname`.
pub fn service_host(key: &str) -> &str {
    key.split_once('/').map(|(_, h)| h).unwrap_or(key)
}

/// The `baggage` of an outbound CONNECT for `w`, as Istio's ztunnel writes it:
/// `k8s.cluster.name`, `k8s.namespace.name`, `k8s.<kind>.name`, `service.name` (canonical
/// name), `service.version` (canonical revision). The model carries no workload type, so
/// a workload with a `workload_name` is sent as Istio's default type, `deployment`, and
/// one without as the bare `pod` by its own name; an empty canonical name or revision gets
/// istiod's fallbacks (the workload's name, `latest`). Receivers use it for telemetry only.
pub fn source_baggage(w: &Workload, cluster: &str) -> hbone::wire::Baggage {
    let (kind, name) = if w.workload_name.is_empty() {
        ("pod", w.name.clone())
    } else {
        ("deployment", w.workload_name.clone())
    };
    let non_empty = |s: &str, or: String| if s.is_empty() { or } else { s.to_string() };
    hbone::wire::Baggage {
        cluster: Some(cluster.to_string()),
        namespace: Some(w.namespace.clone()),
        service_name: Some(non_empty(&w.canonical_name, name.clone())),
        service_version: Some(non_empty(&w.canonical_revision, "latest".into())),
        workload_kind: Some(kind.into()),
        workload_name: Some(name),
    }
}

impl State {
    /// The SPIFFE text of `id`, as a label value: the snapshot's shared text, rendered only
    /// for an identity the snapshot doesn't know.
    pub fn principal(&self, id: &hbone::Identity) -> Arc<str> {
        match self.principals.get(id) {
            Some(p) => p.clone(),
            None => id.to_string().into(),
        }
    }

    /// The `destination_service` label value of service `key`.
    pub fn service_label(&self, key: &str) -> Arc<str> {
        match self.service_hosts.get(key) {
            Some(h) => h.clone(),
            None => service_host(key).into(),
        }
    }

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
    let mut sources = HashMap::new();
    for w in model
        .workloads()
        .filter(|w| w.node == s.node && w.captured())
    {
        let identity = w.identity();
        let Some(cert) = certs.get(&identity).cloned() else {
            continue;
        };
        let src = Arc::new(Source {
            baggage: source_baggage(w, &s.cluster_id).to_header_value(),
            identity,
            cert,
        });
        for ip in &w.ips {
            sources.insert(*ip, src.clone());
        }
    }
    let texts: HashMap<String, WorkloadText> = model
        .workloads()
        .map(|w| (w.uid.clone(), WorkloadText::of(w, &s.peer_identity)))
        .collect();
    let mut principals: HashMap<hbone::Identity, Arc<str>> = texts
        .values()
        .map(|t| (t.identity.clone(), t.principal.clone()))
        .collect();
    for id in model
        .waypoints()
        .iter()
        .map(|wp| &wp.identity)
        .chain([&s.peer_identity, &s.identity])
    {
        principals
            .entry(id.clone())
            .or_insert_with(|| id.to_string().into());
    }
    let service_hosts = model
        .services()
        .map(|svc| (svc.key(), svc.hostname.as_str().into()))
        .collect();
    Ok(State {
        model,
        certs,
        server_tls,
        workload_tls,
        sources,
        texts,
        service_hosts,
        principals,
    })
}

/// Does any certificate need renewal now?
pub fn needs_renewal(state: &State) -> bool {
    let now = SystemTime::now();
    state.certs.values().any(|c| c.needs_refresh(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(yaml: &str) -> crate::config::Loaded {
        let file = std::path::Path::new("t.yaml");
        crate::config::load_str(file, yaml, &tuning::Profile::default(), 1).unwrap()
    }

    /// The state built from `loaded`, with a built-in CA in a scratch folder named `tag`.
    fn built(loaded: &crate::config::Loaded, tag: &str) -> State {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        let ca = SigningCa::builtin(&dir, &loaded.settings.trust_domain).unwrap();
        let st = build(&ca, &loaded.settings, loaded.snapshot.clone(), None).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        st
    }

    /// The `baggage` string Istio's ztunnel writes, from the model's workload fields:
    /// a Deployment's pod with its canonical name and revision, and a bare pod with none.
    #[test]
    fn source_baggage_is_istios_format() {
        let yaml = r#"
ztunnel:
  node: node-a
  cluster_id: east
  ca: {builtin: /nonexistent}
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}
workloads:
  - {name: web-5d8f-x2x, namespace: shop, workloadName: web, canonicalName: web-frontend, canonicalRevision: v2, workloadIps: [10.0.0.1], node: node-a}
  - {name: debug, namespace: shop, workloadIps: [10.0.0.2], node: node-a}
"#;
        let loaded = loaded(yaml);
        let cluster = &loaded.settings.cluster_id;
        assert_eq!(cluster, "east");
        // The header each source sends is rendered once, with the snapshot's state.
        let st = built(&loaded, "ztunnel-state");
        let header = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            let w = st.model.workload_by_ip(ip).unwrap();
            let text = source_baggage(w, cluster).to_header().unwrap();
            let sent = st.sources[&ip].baggage.as_ref().unwrap();
            assert_eq!(sent.as_bytes(), text.as_bytes());
            text
        };
        assert_eq!(
            header("10.0.0.1"),
            "k8s.cluster.name=east,k8s.namespace.name=shop,k8s.deployment.name=web,\
             service.name=web-frontend,service.version=v2"
        );
        assert_eq!(
            header("10.0.0.2"),
            "k8s.cluster.name=east,k8s.namespace.name=shop,k8s.pod.name=debug,\
             service.name=debug,service.version=latest"
        );
    }

    /// A SOCKS5 name finds its service whatever the case and trailing dot on either side
    /// (Istio accepts `Echo.Shop.` as a service hostname).
    #[test]
    fn resolve_ignores_case_and_trailing_dot() {
        let yaml = r#"
ztunnel:
  node: node-a
  ca: {builtin: /nonexistent}
services:
  - {name: echo, namespace: shop, hostname: Echo.Shop., vips: ["10.1.0.1"]}
"#;
        let loaded = loaded(yaml);
        let want = Some("10.1.0.1:80".parse().unwrap());
        for name in ["echo.shop", "Echo.Shop.", "ECHO.SHOP."] {
            assert_eq!(
                crate::proxy::resolve(&loaded.snapshot, name, 80),
                want,
                "{name}"
            );
        }
        assert_eq!(
            crate::proxy::resolve(&loaded.snapshot, "echo.sho", 80),
            None
        );
    }

    /// The `peer` label texts are rendered once per snapshot for every identity a tunnel may
    /// expect: workloads', waypoints' and the node ztunnel's, and the ztunnel's own (the
    /// inbound `identity` label): a lookup, not a format per connection.
    #[test]
    fn principals_cover_workloads_waypoints_and_node() {
        let yaml = r#"
ztunnel:
  node: node-a
  ca: {builtin: /nonexistent}
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}
waypoints:
  - {name: wp, namespace: shop, address: 10.0.9.1}
workloads:
  - {name: web, namespace: shop, serviceAccount: web-sa, workloadIps: [10.0.0.1], node: node-a}
"#;
        let loaded = loaded(yaml);
        let st = built(&loaded, "ztunnel-principals");
        let wp = &st.model.waypoints()[0].identity;
        let web = st.model.workloads().next().unwrap().identity();
        for id in [
            wp,
            &web,
            &loaded.settings.peer_identity,
            &loaded.settings.identity,
        ] {
            assert_eq!(*st.principals[id], id.to_string(), "{id}");
        }
        assert_eq!(st.principals.len(), 3);
        assert_eq!(&*st.principals[wp], "spiffe://cluster.local/ns/shop/sa/wp");
        // The same shared text as the workload's telemetry text.
        let t = st.texts.values().next().unwrap();
        assert!(Arc::ptr_eq(&st.principals[&web], &t.principal));
    }

    /// The ztunnel's own identity (the inbound `identity` label of a connection addressed to
    /// the node) has its text too when it is not the `peer_identity`.
    #[test]
    fn principals_hold_the_ztunnels_own_identity() {
        let yaml = r#"
ztunnel:
  node: node-a
  ca: {builtin: /nonexistent}
  identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel-a
  peer_identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel
"#;
        let loaded = loaded(yaml);
        let st = built(&loaded, "ztunnel-own-id");
        let own = &loaded.settings.identity;
        assert_ne!(own, &loaded.settings.peer_identity);
        assert_eq!(
            &*st.principals[own],
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel-a"
        );
        assert_eq!(st.principals.len(), 2);
    }
}
