//! Istio's TCP metrics and ztunnel's own path counters, in Prometheus text.
//!
//! Each label set owns a block of relaxed atomics shared by every worker. A worker finds the
//! block through its own cache (no lock, no shared write); only the first connection of a
//! label set on a worker goes to the registry: copy-on-write maps (`arc-swap`, no lock),
//! [`SHARDS`] per family by key hash, so a new series copies one shard, not every series.
//! A family holds at most [`MAX_SERIES`] label sets; later new ones are counted in one
//! overflow series (text labels `overflow`) and are not cached per worker. Scrapes read the
//! atomics.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
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
    /// Where this ztunnel sent it (`ip:port`), none when nowhere (rendered empty);
    /// `unknown` for an address the mesh model does not know (a passthrough destination
    /// outside the mesh).
    pub target: AddrLabel,
    /// The HBONE `:authority` sent (outbound) or received (inbound), else none; `unknown`
    /// when a peer asked for an address the mesh model does not know.
    pub authority: AddrLabel,
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

/// An address label: `ip:port` of an address the mesh model knows (a workload, service
/// VIP or waypoint), empty, or `unknown`: label values never carry an address taken from
/// the wire that the model does not bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddrLabel {
    None,
    Known(SocketAddr),
    Unknown,
}

impl From<Option<SocketAddr>> for AddrLabel {
    fn from(a: Option<SocketAddr>) -> Self {
        a.map_or(AddrLabel::None, AddrLabel::Known)
    }
}

impl std::fmt::Display for AddrLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddrLabel::None => Ok(()),
            AddrLabel::Known(a) => a.fmt(f),
            AddrLabel::Unknown => f.write_str("unknown"),
        }
    }
}

/// An address for the access log: `ip:port`, or empty.
pub(crate) struct Opt(pub(crate) Option<SocketAddr>);

impl std::fmt::Display for Opt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => Ok(()),
        }
    }
}

/// A source address for the access log: `ip:port`, or the IP alone when the port is not
/// known (0): an inbound HBONE stream learns the client's address from `forwarded: for=`,
/// which carries no port.
pub(crate) struct Src(pub(crate) SocketAddr);

impl std::fmt::Display for Src {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.port() {
            0 => self.0.ip().fmt(f),
            _ => self.0.fmt(f),
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

/// Label sets per family at most; further new ones share the overflow series.
pub const MAX_SERIES: usize = 10_000;
/// Copy-on-write shards per family.
pub const SHARDS: usize = 32;

type Shard<K, V> = ArcSwap<HashMap<K, Arc<V>>>;

struct Family<K, V> {
    shards: Box<[Shard<K, V>]>,
    hasher: std::hash::RandomState,
    len: AtomicUsize,
    cap: usize,
    overflow_key: K,
    overflow: Arc<V>,
    overflowed: AtomicBool,
}

impl<K: Hash + Eq + Clone + Ord, V: Default> Family<K, V> {
    fn new(overflow_key: K) -> Self {
        Self::with_cap(MAX_SERIES, overflow_key)
    }
    fn with_cap(cap: usize, overflow_key: K) -> Self {
        Family {
            shards: (0..SHARDS)
                .map(|_| ArcSwap::from_pointee(HashMap::new()))
                .collect(),
            hasher: std::hash::RandomState::new(),
            len: AtomicUsize::new(0),
            cap,
            overflow_key,
            overflow: Arc::default(),
            overflowed: AtomicBool::new(false),
        }
    }
    /// The counters of `k`, or the overflow series' once the family is full (the cap can
    /// be passed by the workers racing on it, at most once each).
    fn get(&self, k: &K) -> Arc<V> {
        let shard = &self.shards[self.hasher.hash_one(k) as usize % SHARDS];
        if let Some(v) = shard.load().get(k) {
            return v.clone();
        }
        if self.len.load(Relaxed) >= self.cap {
            self.overflowed.store(true, Relaxed);
            return self.overflow.clone();
        }
        // Copy-on-write insert into one shard; a racing insert of the same key keeps the
        // first block.
        let fresh = Arc::new(V::default());
        shard.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.entry(k.clone()).or_insert_with(|| fresh.clone());
            m
        });
        let v = shard
            .load()
            .get(k)
            .cloned()
            .unwrap_or_else(|| fresh.clone());
        if Arc::ptr_eq(&v, &fresh) {
            self.len.fetch_add(1, Relaxed);
        }
        v
    }
    /// `v` is the overflow series (not to be cached per key).
    fn is_overflow(&self, v: &Arc<V>) -> bool {
        Arc::ptr_eq(v, &self.overflow)
    }
    fn sorted(&self) -> Vec<(K, Arc<V>)> {
        let mut v: Vec<_> = Vec::new();
        for shard in self.shards.iter() {
            v.extend(shard.load().iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        if self.overflowed.load(Relaxed) {
            v.push((self.overflow_key.clone(), self.overflow.clone()));
        }
        v
    }
}

/// The text label value of an overflow series.
fn overflow() -> Arc<str> {
    Arc::from("overflow")
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
    /// Connects given up after `h2.handshake_timeout`, by [`ConnectTimeout`].
    connect_timeouts: [AtomicU64; ConnectTimeout::ALL.len()],
}

/// What did not connect within `h2.handshake_timeout` (Envoy's `connect_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectTimeout {
    /// Inbound HBONE: the TCP connect to the pod (the CONNECT answered 503).
    HbonePod,
    /// Inbound plaintext: the TCP connect to the pod (the client reset).
    PlaintextPod,
    /// Outbound passthrough: the TCP connect to the destination (SOCKS5 host unreachable,
    /// or a reset for a captured connection).
    Passthrough,
    /// Outbound HBONE: the CONNECT's reply (SOCKS5 host unreachable, or a reset).
    HboneReply,
}

impl ConnectTimeout {
    const ALL: [ConnectTimeout; 4] = [
        ConnectTimeout::HbonePod,
        ConnectTimeout::PlaintextPod,
        ConnectTimeout::Passthrough,
        ConnectTimeout::HboneReply,
    ];
    fn label(self) -> &'static str {
        match self {
            ConnectTimeout::HbonePod => "hbone_pod",
            ConnectTimeout::PlaintextPod => "plaintext_pod",
            ConnectTimeout::Passthrough => "passthrough",
            ConnectTimeout::HboneReply => "hbone_reply",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            conns: Family::new(ConnLabels {
                reporter: "overflow",
                source_workload: overflow(),
                source_workload_namespace: overflow(),
                source_principal: overflow(),
                destination_service: overflow(),
                destination_workload: overflow(),
                destination_workload_namespace: overflow(),
                destination_principal: overflow(),
                connection_security_policy: "overflow",
            }),
            paths: Family::new(PathLabels {
                direction: "overflow",
                route: "overflow",
                target: AddrLabel::None,
                authority: AddrLabel::None,
                peer: overflow(),
                identity: overflow(),
            }),
            denied: Family::new(DenyLabels {
                transport: "overflow",
                policy: "overflow".into(),
            }),
            // Reply codes: at most 256 series.
            socks_errors: Family::new(u8::MAX),
            hbone_client_tls: Arc::default(),
            hbone_server: Arc::default(),
            connect_timeouts: Default::default(),
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
                k.target,
                k.authority,
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
        let _ = writeln!(
            out,
            "# HELP ztunnel_connect_timeouts_total Connections given up for not connecting (or an HBONE CONNECT not answered) within h2.handshake_timeout, by what was waited for.\n# TYPE ztunnel_connect_timeouts_total counter"
        );
        for (kind, v) in ConnectTimeout::ALL.iter().zip(&self.connect_timeouts) {
            let _ = writeln!(
                out,
                "ztunnel_connect_timeouts_total{{what=\"{}\"}} {}",
                kind.label(),
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
    if !family.is_overflow(&v) {
        cache.borrow_mut().insert(k.clone(), v.clone());
    }
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

    pub fn connect_timeout(&self, what: ConnectTimeout) {
        self.0.shared.connect_timeouts[what as usize].fetch_add(1, Relaxed);
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

    /// A family stops at MAX_SERIES label sets: the rest are counted in one overflow
    /// series, and nothing is lost from the sum.
    #[test]
    fn paths_beyond_the_cap_go_to_the_overflow_series() {
        let m = Arc::new(Metrics::default());
        let local = LocalMetrics::new(m.clone());
        let extra = 2_000;
        for i in 0..(MAX_SERIES + extra) as u32 {
            let labels = PathLabels {
                direction: "inbound",
                route: "hbone_allow",
                target: AddrLabel::None,
                authority: AddrLabel::Known(SocketAddr::from(([10, 0, 0, 1], i as u16))),
                peer: Arc::from(""),
                identity: Arc::from(""),
            };
            local.path(&labels);
            if i == 0 {
                local.path(&labels);
            }
        }
        let out = m.render(1);
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("ztunnel_connection_paths_total{"))
            .collect();
        assert_eq!(lines.len(), MAX_SERIES + 1);
        let overflow = "ztunnel_connection_paths_total{direction=\"overflow\",route=\"overflow\",target=\"\",authority=\"\",peer=\"overflow\",identity=\"overflow\"}";
        assert!(
            lines.contains(&format!("{overflow} {extra}").as_str()),
            "{:?}",
            lines.last()
        );
        let sum: u64 = lines
            .iter()
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum();
        assert_eq!(sum, (MAX_SERIES + extra + 1) as u64);
        // Overflowing keys are not cached per worker.
        assert_eq!(local.0.paths.borrow().len(), MAX_SERIES);
    }
}
