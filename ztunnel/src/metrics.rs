//! Istio's TCP metrics and ztunnel's own path counters, in Prometheus text.
//!
//! Each label set owns a block of relaxed atomics shared by every worker. A worker finds the
//! block through its own cache (no lock, no shared write); only the first connection of a
//! label set on a worker goes to the registry, a copy-on-write map (`arc-swap`, no lock).
//! Scrapes read the atomics.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::Hash;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hbone::server::ServerCounters;
use hbone::tls::TlsCounters;

/// Istio's standard labels of `istio_tcp_*`. The values are shared text (the snapshot's
/// per-workload label values, [`crate::state::WorkloadText`]): a connection's labels take
/// references, not copies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnLabels {
    /// `source` (outbound) or `destination` (inbound).
    pub reporter: &'static str,
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

impl ConnLabels {
    fn render(&self) -> String {
        format!(
            "reporter=\"{}\",source_workload=\"{}\",source_workload_namespace=\"{}\",source_principal=\"{}\",destination_service=\"{}\",destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_principal=\"{}\",connection_security_policy=\"{}\",request_protocol=\"tcp\"",
            self.reporter,
            esc(&self.source_workload),
            esc(&self.source_workload_namespace),
            esc(&self.source_principal),
            esc(&self.destination_service),
            esc(&self.destination_workload),
            esc(&self.destination_workload_namespace),
            esc(&self.destination_principal),
            self.connection_security_policy
        )
    }
}

/// The path a connection took, as this ztunnel saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// Outbound: `passthrough`, `hbone`, `waypoint`, `no_endpoint`, `refused`, `failed`.
    /// Inbound: `<hbone|plaintext>_<allow|deny|hairpin|not_served|failed>`.
    pub route: &'static str,
    /// Where this ztunnel sent it (`ip:port`), none when nowhere (rendered empty).
    pub target: Option<SocketAddr>,
    /// The HBONE `:authority` sent (outbound) or received (inbound), else none.
    pub authority: Option<SocketAddr>,
    /// Inbound HBONE: the peer's verified (client certificate) identity. Outbound HBONE: the
    /// identities the server certificate was required to carry (comma separated; one when
    /// the tunnel goes to a pod or a waypoint of known identity). Else empty.
    pub peer: Arc<str>,
    /// The identity this ztunnel acted as on the tunnel: outbound, the client certificate
    /// (the source workload's); inbound HBONE, the certificate presented (the destination
    /// pod's, or the ztunnel's for a connection addressed to the node). Else empty.
    pub identity: Arc<str>,
}

/// Denials by policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DenyLabels {
    /// `hbone` or `plaintext`.
    pub transport: &'static str,
    /// The DENY policy that matched, or the ALLOW policies none of which matched.
    pub policy: String,
}

/// An address label: `ip:port`, or empty.
pub(crate) struct Opt(pub(crate) Option<SocketAddr>);

impl std::fmt::Display for Opt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => Ok(()),
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Counters of one connection label set.
#[derive(Debug, Default)]
pub struct ConnCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

struct Family<K, V>(ArcSwap<HashMap<K, Arc<V>>>);

impl<K: Hash + Eq + Clone + Ord, V: Default> Family<K, V> {
    fn new() -> Self {
        Family(ArcSwap::from_pointee(HashMap::new()))
    }
    fn get(&self, k: &K) -> Arc<V> {
        if let Some(v) = self.0.load().get(k) {
            return v.clone();
        }
        // Copy-on-write insert; a racing insert of the same key keeps the first block.
        let fresh = Arc::new(V::default());
        self.0.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.entry(k.clone()).or_insert_with(|| fresh.clone());
            m
        });
        self.0.load().get(k).cloned().unwrap_or(fresh)
    }
    fn sorted(&self) -> Vec<(K, Arc<V>)> {
        let m = self.0.load();
        let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// The process-wide registry.
pub struct Metrics {
    conns: Family<ConnLabels, ConnCounters>,
    paths: Family<PathLabels, AtomicU64>,
    denied: Family<DenyLabels, AtomicU64>,
    socks_errors: Family<u8, AtomicU64>,
    /// HBONE handshakes this ztunnel made as a client (outbound legs), shared by every
    /// worker's pool: refusals by reason and HelloRetryRequests answered.
    pub hbone_client_tls: Arc<TlsCounters>,
    /// The inbound HBONE server's counters (`:15008`), shared by every worker.
    pub hbone_server: Arc<ServerCounters>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            conns: Family::new(),
            paths: Family::new(),
            denied: Family::new(),
            socks_errors: Family::new(),
            hbone_client_tls: Arc::default(),
            hbone_server: Arc::default(),
        }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self, snapshot_version: u64) -> String {
        let mut out = String::new();
        let conns = self.conns.sorted();
        type Get = fn(&ConnCounters) -> u64;
        let series: [(&str, &str, Get); 4] = [
            (
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
                |c| c.opened.load(Relaxed),
            ),
            (
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
                |c| c.closed.load(Relaxed),
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the destination (client to server)",
                |c| c.sent.load(Relaxed),
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the destination (server to client)",
                |c| c.received.load(Relaxed),
            ),
        ];
        for (name, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
            for (k, v) in &conns {
                let _ = writeln!(out, "{name}{{{}}} {}", k.render(), get(v));
            }
        }
        let _ = writeln!(
            out,
            "# HELP ztunnel_connection_paths_total Connections by the path this ztunnel gave them.\n# TYPE ztunnel_connection_paths_total counter"
        );
        for (k, v) in self.paths.sorted() {
            let _ = writeln!(
                out,
                "ztunnel_connection_paths_total{{direction=\"{}\",route=\"{}\",target=\"{}\",authority=\"{}\",peer=\"{}\",identity=\"{}\"}} {}",
                k.direction,
                k.route,
                Opt(k.target),
                Opt(k.authority),
                esc(&k.peer),
                esc(&k.identity),
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ztunnel_authorization_denied_total Inbound connections denied by L4 authorization.\n# TYPE ztunnel_authorization_denied_total counter"
        );
        for (k, v) in self.denied.sorted() {
            let _ = writeln!(
                out,
                "ztunnel_authorization_denied_total{{transport=\"{}\",policy=\"{}\"}} {}",
                k.transport,
                esc(&k.policy),
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ztunnel_socks5_errors_total SOCKS5 requests answered with an error reply.\n# TYPE ztunnel_socks5_errors_total counter"
        );
        for (k, v) in self.socks_errors.sorted() {
            let _ = writeln!(
                out,
                "ztunnel_socks5_errors_total{{reply=\"{k}\"}} {}",
                v.load(Relaxed)
            );
        }
        render_hbone(&mut out, &self.hbone_client_tls, &self.hbone_server);
        let _ = writeln!(
            out,
            "# HELP ztunnel_config_version Version of the mesh snapshot in use.\n# TYPE ztunnel_config_version gauge\nztunnel_config_version {snapshot_version}"
        );
        out
    }
}

/// The HBONE layer's counters: TLS refusals per side and reason (issue 3: each rejection
/// has a counter), HelloRetryRequests our client was answered with, completed handshakes
/// per side as full or resumed (`h2.tls_resumption`), and the inbound server's
/// connections, streams and malformed CONNECTs.
fn render_hbone(out: &mut String, client: &TlsCounters, server: &ServerCounters) {
    let _ = writeln!(
        out,
        "# HELP ztunnel_hbone_tls_failures_total HBONE TLS handshakes refused, by side and reason.\n# TYPE ztunnel_hbone_tls_failures_total counter"
    );
    for (side, t) in [("client", client), ("server", &server.tls)] {
        for (reason, v) in [
            ("identity_mismatch", &t.identity_mismatch),
            ("untrusted", &t.untrusted),
            ("expired", &t.expired),
            ("no_client_cert", &t.no_client_cert),
            ("other", &t.other),
        ] {
            let _ = writeln!(
                out,
                "ztunnel_hbone_tls_failures_total{{side=\"{side}\",reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP ztunnel_hbone_hello_retries_total Outbound HBONE handshakes answered with a HelloRetryRequest (the peer wanted another key share).\n# TYPE ztunnel_hbone_hello_retries_total counter\nztunnel_hbone_hello_retries_total {}",
        client.hello_retries.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP ztunnel_hbone_outbound_handshake_timeouts_total Outbound HBONE connections that did not finish TCP connect, TLS and the HTTP/2 handshake within h2.handshake_timeout (each failed the requests waiting on it).\n# TYPE ztunnel_hbone_outbound_handshake_timeouts_total counter\nztunnel_hbone_outbound_handshake_timeouts_total {}",
        client.handshake_timeouts.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP ztunnel_hbone_handshakes_total Completed HBONE TLS handshakes, by side and kind (full: certificates and signatures; resumed: a session ticket).\n# TYPE ztunnel_hbone_handshakes_total counter"
    );
    for (side, t) in [("client", client), ("server", &server.tls)] {
        for (kind, v) in [
            ("full", &t.full_handshakes),
            ("resumed", &t.resumed_handshakes),
        ] {
            let _ = writeln!(
                out,
                "ztunnel_hbone_handshakes_total{{side=\"{side}\",kind=\"{kind}\"}} {}",
                v.load(Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP ztunnel_hbone_inbound_total Inbound HBONE connections and CONNECT streams, streams refused as malformed, and accepted sockets closed for not finishing TLS and the HTTP/2 preface within h2.handshake_timeout.\n# TYPE ztunnel_hbone_inbound_total counter"
    );
    for (what, v) in [
        ("connections", &server.connections),
        ("streams", &server.streams),
        ("bad_method", &server.bad_method),
        ("bad_authority", &server.bad_authority),
        ("h2_errors", &server.h2_errors),
        ("handshake_timeouts", &server.handshake_timeouts),
    ] {
        let _ = writeln!(
            out,
            "ztunnel_hbone_inbound_total{{kind=\"{what}\"}} {}",
            v.load(Relaxed)
        );
    }
}

/// One worker's view: caches the counter blocks it has used.
#[derive(Clone)]
pub struct LocalMetrics(Rc<LocalInner>);

struct LocalInner {
    shared: Arc<Metrics>,
    conns: RefCell<HashMap<ConnLabels, Arc<ConnCounters>>>,
    paths: RefCell<HashMap<PathLabels, Arc<AtomicU64>>>,
    denied: RefCell<HashMap<DenyLabels, Arc<AtomicU64>>>,
    socks: RefCell<HashMap<u8, Arc<AtomicU64>>>,
}

fn cached<K: Hash + Eq + Clone + Ord, V: Default>(
    cache: &RefCell<HashMap<K, Arc<V>>>,
    family: &Family<K, V>,
    k: &K,
) -> Arc<V> {
    if let Some(v) = cache.borrow().get(k) {
        return v.clone();
    }
    let v = family.get(k);
    cache.borrow_mut().insert(k.clone(), v.clone());
    v
}

impl LocalMetrics {
    pub fn new(shared: Arc<Metrics>) -> Self {
        LocalMetrics(Rc::new(LocalInner {
            shared,
            conns: RefCell::default(),
            paths: RefCell::default(),
            denied: RefCell::default(),
            socks: RefCell::default(),
        }))
    }

    /// Count a connection opened; returns its counters for the close.
    pub fn open(&self, labels: &ConnLabels) -> Arc<ConnCounters> {
        let c = cached(&self.0.conns, &self.0.shared.conns, labels);
        c.opened.fetch_add(1, Relaxed);
        c
    }

    pub fn path(&self, labels: &PathLabels) {
        cached(&self.0.paths, &self.0.shared.paths, labels).fetch_add(1, Relaxed);
    }

    pub fn denied(&self, labels: &DenyLabels) {
        cached(&self.0.denied, &self.0.shared.denied, labels).fetch_add(1, Relaxed);
    }

    pub fn socks_error(&self, reply: u8) {
        cached(&self.0.socks, &self.0.shared.socks_errors, &reply).fetch_add(1, Relaxed);
    }
}

/// Record the end of a connection.
pub fn close(c: &ConnCounters, sent: u64, received: u64) {
    c.sent.fetch_add(sent, Relaxed);
    c.received.fetch_add(received, Relaxed);
    c.closed.fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full and resumed HBONE handshakes are exposed per side.
    #[test]
    fn handshake_kinds_are_rendered_per_side() {
        let m = Metrics::default();
        m.hbone_client_tls.full_handshakes.fetch_add(2, Relaxed);
        m.hbone_client_tls.resumed_handshakes.fetch_add(5, Relaxed);
        m.hbone_server.tls.resumed_handshakes.fetch_add(7, Relaxed);
        let out = m.render(1);
        for line in [
            "ztunnel_hbone_handshakes_total{side=\"client\",kind=\"full\"} 2",
            "ztunnel_hbone_handshakes_total{side=\"client\",kind=\"resumed\"} 5",
            "ztunnel_hbone_handshakes_total{side=\"server\",kind=\"full\"} 0",
            "ztunnel_hbone_handshakes_total{side=\"server\",kind=\"resumed\"} 7",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in:\n{out}");
        }
    }
}
