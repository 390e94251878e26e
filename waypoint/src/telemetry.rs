//! Istio's HTTP metrics as a waypoint reports them (`reporter="waypoint"`), the access log
//! (tracing target `access`, one line per request) and `traceparent` handling.
//!
//! Each label set owns a block of relaxed atomics (counter and three fixed-bucket
//! histograms) shared by every worker. A worker finds the block through its own cache (no
//! lock); only the first request of a label set on a worker goes to the registry, a
//! copy-on-write map (`arc-swap`, no lock). Scrapes read the atomics.
//!
//! | metric | type | unit / buckets |
//! |---|---|---|
//! | `istio_requests_total` | counter | |
//! | `istio_request_duration_milliseconds` | histogram | ms: Istio's buckets 0.5 … 3,600,000 |
//! | `istio_request_bytes` | histogram | bytes (head + body): 1 … 10^9 by 10× |
//! | `istio_response_bytes` | histogram | bytes (head + body): 1 … 10^9 by 10× |
//! | `istio_tcp_connections_opened_total`, `…_closed_total` | counter | opaque TCP tunnels |
//! | `istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total` | counter | bytes from / to the client, counted as the tunnel ends |
//!
//! Labels (Istio's standard set): `reporter`, `source_workload`,
//! `source_canonical_service`, `source_canonical_revision`, `source_workload_namespace`,
//! `source_principal`, `source_app`, `source_version`, `source_cluster`,
//! `destination_workload`, `destination_workload_namespace`, `destination_principal`,
//! `destination_app`, `destination_version`, `destination_service`,
//! `destination_canonical_service`, `destination_canonical_revision`,
//! `destination_service_name`, `destination_service_namespace`, `destination_cluster`,
//! `request_protocol` (`http`, or `grpc` for a gRPC request), `response_code`,
//! `grpc_response_status` (a gRPC response's `grpc-status` from its head or trailers, one
//! of the codes 0–16, any other number `2` (see [`grpc_code`]), else
//! its HTTP status mapped as Envoy does; empty for HTTP), `response_flags`,
//! `connection_security_policy` (always
//! `mutual_tls`: the waypoint is HBONE only); `unknown` where the value is not known, as
//! Istio. App, version, canonical service and revision come from the model's workload
//! (`canonicalName`/`canonicalRevision`, else its labels as istiod derives them: see
//! [`canonical_service`]), the cluster from its `clusterId`. A label set's text is
//! rendered once, when it is first recorded; a tunnel keeps its recent label sets' counters
//! (no label strings are built for a request whose set its tunnel has seen). The source is the original client:
//! the inbound tunnel's peer certificate (`source_principal`) and the `baggage` /
//! `forwarded` headers its ztunnel sent (workload name and namespace, else the model's
//! workload at the `forwarded: for=` address). Response flags follow Envoy: `UF`
//! (upstream connect failure), `UT` (upstream timeout), `NR` (no route), `-` otherwise.
//! The TCP metrics (opaque TCP tunnels, TCPRoute) take the same labels but
//! `response_code` and `grpc_response_status`, with `request_protocol="tcp"`; Telemetry
//! overrides do not change them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::Hash;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::lb::Rng;

/// Istio's standard labels of `istio_requests_total` and friends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    /// The source workload's [`app`], [`version`], [`canonical_service`],
    /// [`canonical_revision`] and [`cluster`] (`unknown` when the source is not known).
    pub source: WorkloadLabels,
    /// The service's hostname (`echo.app.svc.cluster.local`), or `unknown`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// As [`RequestLabels::source`], of the endpoint that answered.
    pub destination: WorkloadLabels,
    /// `http` (HTTP/1.1 and HTTP/2), or `grpc` for a gRPC request (`content-type:
    /// application/grpc…`), as Istio.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// The gRPC status of a gRPC response (its `grpc-status`, else its HTTP status mapped
    /// as Envoy does); empty otherwise (as Istio's label on HTTP).
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    /// Telemetry `tagOverrides` with their values for this set's requests (`None`: none).
    pub tweaks: Option<Arc<TagTweaks>>,
}

/// Label changes by metric ([`METRICS`]), in order: a label set to a value (a standard one
/// replaced where it stands, a new one added at the end), or left out (`None`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagTweaks(pub [Vec<(String, Option<String>)>; 8]);

/// Whether `s` is a Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`, not `__`-prefixed).
pub fn label_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && !s.starts_with("__")
}

/// A workload's app, version, canonical service and revision, and cluster, as Istio's
/// standard labels give them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadLabels {
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl WorkloadLabels {
    /// All `unknown` (Istio's value when the workload is not known).
    pub fn unknown() -> Self {
        let u = || "unknown".to_string();
        WorkloadLabels {
            app: u(),
            version: u(),
            canonical_service: u(),
            canonical_revision: u(),
            cluster: u(),
        }
    }

    /// Of a model workload: see [`canonical_service`], [`canonical_revision`], [`app`],
    /// [`version`], [`cluster`].
    pub fn of(w: Option<&mesh_model::model::Workload>) -> Self {
        match w {
            None => WorkloadLabels::unknown(),
            Some(w) => WorkloadLabels {
                app: app(w).to_string(),
                version: version(w).to_string(),
                canonical_service: canonical_service(w).to_string(),
                canonical_revision: canonical_revision(w).to_string(),
                cluster: cluster(w).to_string(),
            },
        }
    }
}

fn label<'a>(w: &'a mesh_model::model::Workload, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| w.labels.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Istio's canonical service: the workload's `canonicalName`, else (as istiod derives it)
/// its `service.istio.io/canonical-name`, `app.kubernetes.io/name` or `app` label, else its
/// workload name.
pub fn canonical_service(w: &mesh_model::model::Workload) -> &str {
    if !w.canonical_name.is_empty() {
        return &w.canonical_name;
    }
    label(
        w,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or(if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    })
}

/// Istio's canonical revision: `canonicalRevision`, else the
/// `service.istio.io/canonical-revision`, `app.kubernetes.io/version` or `version` label,
/// else `latest`.
pub fn canonical_revision(w: &mesh_model::model::Workload) -> &str {
    if !w.canonical_revision.is_empty() {
        return &w.canonical_revision;
    }
    label(
        w,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest")
}

/// `source_app` / `destination_app`: the `app` label (Istio's docs), else the canonical
/// service (what Istio's ztunnel reports).
pub fn app(w: &mesh_model::model::Workload) -> &str {
    label(w, &["app"]).unwrap_or_else(|| canonical_service(w))
}

/// `source_version` / `destination_version`: the `version` label, else the canonical
/// revision.
pub fn version(w: &mesh_model::model::Workload) -> &str {
    label(w, &["version"]).unwrap_or_else(|| canonical_revision(w))
}

/// `source_cluster` / `destination_cluster`: the workload's `clusterId`, `unknown` when
/// it has none.
pub fn cluster(w: &mesh_model::model::Workload) -> &str {
    if w.cluster_id.is_empty() {
        "unknown"
    } else {
        &w.cluster_id
    }
}

/// The highest gRPC status code (`UNAUTHENTICATED`).
pub const GRPC_MAX_CODE: u32 = 16;

/// A response's `grpc-status` as the `grpc_response_status` label gives it: the gRPC codes
/// 0–16 as they are; any other number (the upstream writes it) is `2` (`UNKNOWN`), as gRPC
/// clients read a code they do not know (grpc-java's `Status.fromCodeValue`, grpc-go's
/// status conversion). The label's values thus stay a fixed set of 17 whatever an
/// upstream sends.
pub fn grpc_code(status: u32) -> u32 {
    if status <= GRPC_MAX_CODE {
        status
    } else {
        2
    }
}

/// The gRPC status Envoy gives a gRPC response without `grpc-status`, from its HTTP status
/// (gRPC's HTTP-to-gRPC mapping); `None` for a `200` (no status known).
pub fn grpc_status_of_http(status: u16) -> Option<u32> {
    Some(match status {
        200 => return None,
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    })
}

impl RequestLabels {
    /// Istio's standard labels, names and values, in Istio's order.
    fn pairs(&self) -> [(&'static str, std::borrow::Cow<'_, str>); 24] {
        use std::borrow::Cow::{Borrowed, Owned};
        let (s, d) = (&self.source, &self.destination);
        [
            ("reporter", Borrowed("waypoint")),
            ("source_workload", Borrowed(&self.source_workload)),
            ("source_canonical_service", Borrowed(&s.canonical_service)),
            ("source_canonical_revision", Borrowed(&s.canonical_revision)),
            (
                "source_workload_namespace",
                Borrowed(&self.source_workload_namespace),
            ),
            ("source_principal", Borrowed(&self.source_principal)),
            ("source_app", Borrowed(&s.app)),
            ("source_version", Borrowed(&s.version)),
            ("source_cluster", Borrowed(&s.cluster)),
            ("destination_workload", Borrowed(&self.destination_workload)),
            (
                "destination_workload_namespace",
                Borrowed(&self.destination_workload_namespace),
            ),
            (
                "destination_principal",
                Borrowed(&self.destination_principal),
            ),
            ("destination_app", Borrowed(&d.app)),
            ("destination_version", Borrowed(&d.version)),
            ("destination_service", Borrowed(&self.destination_service)),
            (
                "destination_canonical_service",
                Borrowed(&d.canonical_service),
            ),
            (
                "destination_canonical_revision",
                Borrowed(&d.canonical_revision),
            ),
            (
                "destination_service_name",
                Borrowed(&self.destination_service_name),
            ),
            (
                "destination_service_namespace",
                Borrowed(&self.destination_service_namespace),
            ),
            ("destination_cluster", Borrowed(&d.cluster)),
            ("request_protocol", Borrowed(self.request_protocol)),
            ("response_code", Owned(self.response_code.to_string())),
            ("grpc_response_status", Borrowed(&self.grpc_response_status)),
            ("response_flags", Borrowed(self.response_flags)),
        ]
    }

    /// The label text, Istio's names (rendered once per label set, when first recorded).
    pub fn render(&self) -> String {
        self.render_metric(None)
    }

    /// The label text of Istio's TCP metrics: no `response_code`, no
    /// `grpc_response_status`.
    pub fn render_tcp(&self) -> String {
        self.render_metric(Some(TCP_OPENED))
    }

    /// The label text of metric `m` ([`METRICS`]: its `tagOverrides` applied; a TCP
    /// metric's without `response_code` and `grpc_response_status`; `None`: Istio's
    /// request labels).
    fn render_metric(&self, m: Option<usize>) -> String {
        let tweaks = m.and_then(|m| Some(&self.tweaks.as_ref()?.0[m]));
        let mut pairs: Vec<(&str, std::borrow::Cow<'_, str>)> = self.pairs().into();
        if m.is_some_and(|m| m >= TCP_OPENED) {
            pairs.retain(|(n, _)| *n != "response_code" && *n != "grpc_response_status");
        }
        pairs.push(("connection_security_policy", "mutual_tls".into()));
        for (name, value) in tweaks.into_iter().flatten() {
            let at = pairs.iter().position(|(n, _)| n == name);
            match (at, value) {
                (Some(i), Some(v)) => pairs[i].1 = v.as_str().into(),
                (None, Some(v)) => pairs.push((name, v.as_str().into())),
                (Some(i), None) => {
                    pairs.remove(i);
                }
                (None, None) => {}
            }
        }
        join_labels(&pairs)
    }
}

/// `name="value",…` (values escaped).
fn join_labels(pairs: &[(&str, std::borrow::Cow<'_, str>)]) -> String {
    let mut out = String::with_capacity(768);
    for (i, (n, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{n}=\"{}\"", esc(v));
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A label set's destination as the access log names it (`dst_service`, `dst_workload`,
/// `dst_identity`): made with the set's counters and kept beside them, so a request whose
/// set its tunnel has seen is logged without building its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessDst {
    pub service: String,
    pub workload: String,
    pub identity: String,
}

impl AccessDst {
    pub fn of(l: &RequestLabels) -> Self {
        AccessDst {
            service: l.destination_service.clone(),
            workload: l.destination_workload.clone(),
            identity: l.destination_principal.clone(),
        }
    }
}

/// The original client as the access log names it (`src_*`).
pub struct AccessSrc<'a> {
    pub addr: std::net::IpAddr,
    pub workload: &'a str,
    pub namespace: &'a str,
    pub identity: &'a str,
}

/// A duration in milliseconds as the access log gives it: `"{ms:.3}"` (quoted, as a
/// string field), written without `format!` (integer digits; the float formatter only for
/// the rare value whose rounding is too close to call).
struct Millis(f64);

impl std::fmt::Debug for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; 24];
        match millis_text(self.0, &mut buf) {
            Some(t) => {
                f.write_str("\"")?;
                f.write_str(t)?;
                f.write_str("\"")
            }
            None => write!(f, "\"{:.3}\"", self.0),
        }
    }
}

/// `ms` with three decimals (as `{:.3}`, which rounds the exact value half to even), or
/// `None` when the thousandths are not clear from `ms * 1000` (within 1e-6 of a half, not
/// finite, negative, or 4e9 µs and more, where the product's rounding error nears that
/// margin): the caller formats those as floats.
fn millis_text(ms: f64, buf: &mut [u8; 24]) -> Option<&str> {
    let v = ms * 1000.0;
    if !(0.0..4e9).contains(&v) {
        return None;
    }
    let r = v.round();
    if ((v - r).abs() - 0.5).abs() < 1e-6 {
        return None;
    }
    let mut n = r as u64;
    let mut i = buf.len();
    for k in 0.. {
        i -= 1;
        if k == 3 {
            buf[i] = b'.';
            continue;
        }
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if k > 3 && n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).ok()
}

thread_local! {
    /// The request target (`path?query`) of the access line being written.
    static TARGET: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The access-log line of one request (tracing target `access`, level `info`): its client,
/// destination and request. The target with a query is joined in a per-thread buffer.
pub fn access_log(
    src: &AccessSrc<'_>,
    dst: &AccessDst,
    r: &crate::http1::Record<'_>,
    duration_ms: f64,
) {
    let emit = |path: &str| {
        tracing::info!(
            target: "access",
            src_addr = %src.addr,
            src_workload = %src.workload,
            src_namespace = %src.namespace,
            src_identity = %src.identity,
            dst_service = %dst.service,
            dst_workload = %dst.workload,
            dst_identity = %dst.identity,
            protocol = r.protocol,
            method = r.method,
            authority = r.host,
            path = path,
            status = r.status,
            flags = r.flags,
            request_bytes = r.request_bytes,
            response_bytes = r.response_bytes,
            duration_ms = ?Millis(duration_ms),
            traceparent = r.traceparent,
            request_id = r.request_id,
            "request"
        );
    };
    match r.query {
        None => emit(r.path),
        Some(q) => TARGET.with(|t| match t.try_borrow_mut() {
            Ok(mut t) => {
                t.clear();
                t.push_str(r.path);
                t.push('?');
                t.push_str(q);
                emit(t.as_str());
            }
            Err(_) => emit(&format!("{}?{q}", r.path)),
        }),
    }
}

/// A request as an Envoy-formatted access log reads it ([`crate::logfmt::HeaderLookup`]):
/// its fields, and the pseudo-headers `:method`, `:path` (with the query), `:authority` and
/// `:scheme`; `x-request-id` is the one it went upstream with (the client's, else the
/// waypoint's).
pub struct LoggedRequest<'a> {
    r: &'a crate::http1::Record<'a>,
    /// `path?query`, when it has a query.
    target: Option<String>,
}

impl<'a> LoggedRequest<'a> {
    pub fn new(r: &'a crate::http1::Record<'a>) -> Self {
        LoggedRequest {
            r,
            target: r.query.map(|q| format!("{}?{q}", r.path)),
        }
    }
}

impl crate::logfmt::HeaderLookup for LoggedRequest<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        let r = self.r;
        let v = match name {
            ":method" => r.method,
            ":path" => self.target.as_deref().unwrap_or(r.path),
            ":authority" => r.host,
            ":scheme" => "http",
            "x-request-id" => r.request_id,
            _ => return r.head.and_then(|h| h.header(name)),
        };
        Some(v).filter(|v| !v.is_empty())
    }
}

/// Envoy's `%RESPONSE_CODE_DETAILS%` of a request: why the waypoint answered it itself, or
/// `via_upstream`; `None` for an opaque TCP connection (no HTTP response).
pub fn response_code_details(r: &crate::http1::Record<'_>) -> Option<&'static str> {
    if r.protocol == "tcp" {
        return None;
    }
    Some(http_response_code_details(r))
}

fn http_response_code_details(r: &crate::http1::Record<'_>) -> &'static str {
    use crate::http1::Refusal;
    match r.denied {
        Some(Refusal::Policy) => return "rbac_access_denied",
        Some(Refusal::Token) => return "jwt_authn_access_denied",
        Some(Refusal::External) => return "ext_authz_denied",
        Some(Refusal::Fault) => return "fault_filter_abort",
        None => {}
    }
    match r.flags {
        "NR" => "route_not_found",
        "UT" => "upstream_response_timeout",
        "UF" => "upstream_reset_before_response_started{connection_failure}",
        "UO" => "upstream_reset_before_response_started{overflow}",
        "UPE" => "upstream_reset_after_response_started{protocol_error}",
        "DPE" => "http1.codec_error",
        "SI" => "stream_idle_timeout",
        "DC" => "downstream_remote_disconnect",
        _ if r.status == 0 => "downstream_remote_disconnect",
        _ => "via_upstream",
    }
}

/// Istio's default `istio_request_duration_milliseconds` buckets.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Size buckets: 1 B … 1 GB by powers of ten.
pub const BYTES_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// A fixed-bucket histogram of relaxed atomics (non-cumulative buckets; rendered
/// cumulatively). The sum is kept in thousandths of the unit.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_milli: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_milli: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_milli.fetch_add((v * 1000.0) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// One series of the histograms `hs` (of the same bounds) added up.
    fn render_sum(hs: &[&Histogram], out: &mut String, name: &str, labels: &str) {
        let Some(first) = hs.first() else { return };
        let mut acc = 0;
        for (i, bound) in first.bounds.iter().map(Some).chain([None]).enumerate() {
            acc += hs.iter().map(|h| h.buckets[i].load(Relaxed)).sum::<u64>();
            let le = match bound {
                Some(x) => format!("{x}"),
                None => "+Inf".into(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {acc}");
        }
        let sum = hs.iter().map(|h| h.sum_milli.load(Relaxed)).sum::<u64>() as f64 / 1000.0;
        let count: u64 = hs.iter().map(|h| h.count.load(Relaxed)).sum();
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Istio's standard metrics the waypoint reports, as Telemetry `metrics` overrides name
/// them, in the order of a [`Shown`] mask: the request metrics `REQUEST_COUNT`,
/// `REQUEST_DURATION`, `REQUEST_SIZE`, `RESPONSE_SIZE`, then the TCP metrics (opaque
/// tunnels) from [`TCP_OPENED`] on.
pub const METRICS: [&str; 8] = [
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_RECEIVED_BYTES",
    "TCP_SENT_BYTES",
];

/// The index of the first TCP metric in [`METRICS`].
pub const TCP_OPENED: usize = 4;

/// Which of [`METRICS`] a label set reports (Telemetry `metrics` overrides): bit `i` for
/// `METRICS[i]`.
pub type Shown = u8;

/// Every metric reported.
pub const ALL_SHOWN: Shown = 0xff;

/// Counters of one label set.
#[derive(Debug)]
pub struct RequestCounters {
    /// The label set's text, rendered once when the set was first recorded.
    labels: String,
    /// Each metric's, when `tagOverrides` change them.
    tweaked: Option<Box<[String; 4]>>,
    /// The metrics reported for it: the [`Shown`] mask its requests were last recorded
    /// under (a disabled one is neither counted nor shown).
    pub shown: std::sync::atomic::AtomicU8,
    pub requests: AtomicU64,
    pub duration_ms: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

impl RequestCounters {
    /// The label text of metric `m`.
    fn labels_of(&self, m: usize) -> &str {
        self.tweaked.as_ref().map_or(&self.labels, |t| &t[m])
    }

    fn new(l: &RequestLabels) -> Self {
        RequestCounters {
            labels: l.render(),
            tweaked: l
                .tweaks
                .as_ref()
                .map(|_| Box::new(std::array::from_fn(|m| l.render_metric(Some(m))))),
            shown: std::sync::atomic::AtomicU8::new(ALL_SHOWN),
            requests: AtomicU64::new(0),
            duration_ms: Histogram::new(&DURATION_BUCKETS_MS),
            request_bytes: Histogram::new(&BYTES_BUCKETS),
            response_bytes: Histogram::new(&BYTES_BUCKETS),
        }
    }
}

/// Istio's TCP metrics of one label set (opaque TCP tunnels; `request_protocol="tcp"`).
#[derive(Debug)]
pub struct TcpCounters {
    /// The label text of each TCP metric: Istio's TCP labels (no `response_code`, no
    /// `grpc_response_status`), `tagOverrides` applied.
    labels: [String; 4],
    /// The metrics reported for it (bits of [`METRICS`], as [`RequestCounters::shown`]).
    pub shown: std::sync::atomic::AtomicU8,
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Bytes from the client (`istio_tcp_received_bytes_total`) and to it (`…_sent_…`).
    pub received_bytes: AtomicU64,
    pub sent_bytes: AtomicU64,
}

/// The process-wide registry.
pub struct Metrics {
    requests: ArcSwap<HashMap<RequestLabels, Arc<RequestCounters>>>,
    tcp: ArcSwap<HashMap<RequestLabels, Arc<TcpCounters>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: ArcSwap::from_pointee(HashMap::new()),
            tcp: ArcSwap::from_pointee(HashMap::new()),
        }
    }
}

impl Metrics {
    fn get(&self, k: &RequestLabels) -> Arc<RequestCounters> {
        registered(&self.requests, k, || RequestCounters::new(k))
    }

    /// The TCP counters of `labels` (made when first asked for: an opaque tunnel's end).
    pub fn tcp(&self, k: &RequestLabels) -> Arc<TcpCounters> {
        registered(&self.tcp, k, || TcpCounters {
            labels: std::array::from_fn(|i| k.render_metric(Some(TCP_OPENED + i))),
            shown: std::sync::atomic::AtomicU8::new(ALL_SHOWN),
            opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
        })
    }

    /// The counters of `labels`, if any request was recorded with them.
    pub fn lookup(&self, labels: &RequestLabels) -> Option<Arc<RequestCounters>> {
        self.requests.load().get(labels).cloned()
    }

    /// All label sets recorded so far.
    pub fn label_sets(&self) -> Vec<RequestLabels> {
        let mut v: Vec<_> = self.requests.load().keys().cloned().collect();
        v.sort();
        v
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = self.requests.load();
        let shown = |c: &RequestCounters, i: usize| shows(&c.shown, i);
        // Metric `i`'s series: the label text rendered when each set was first recorded
        // (no formatting here), sorted; sets whose texts are equal (a `tagOverrides` REMOVE
        // took out what told them apart) are one series, their counts added up.
        let series = |i: usize| {
            merged(
                m.values()
                    .filter(|c| shown(c, i))
                    .map(|c| (c.labels_of(i), &**c))
                    .collect(),
            )
        };
        let mut out = String::new();
        write_counter(
            &mut out,
            "istio_requests_total",
            "Requests handled by this waypoint.",
            series(0),
            |c| &c.requests,
        );
        type Get = fn(&RequestCounters) -> &Histogram;
        let hists: [(&str, &str, Get); 3] = [
            (
                "istio_request_duration_milliseconds",
                "Request duration.",
                |c| &c.duration_ms,
            ),
            (
                "istio_request_bytes",
                "Request size (head and body).",
                |c| &c.request_bytes,
            ),
            (
                "istio_response_bytes",
                "Response size (head and body).",
                |c| &c.response_bytes,
            ),
        ];
        for (i, (name, help, get)) in hists.into_iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (l, cs) in series(i + 1) {
                let hs: Vec<&Histogram> = cs.into_iter().map(get).collect();
                Histogram::render_sum(&hs, &mut out, name, l);
            }
        }
        // Istio's TCP metrics (opaque tunnels), in the order of [`METRICS`].
        let tcp = self.tcp.load();
        type TcpGet = fn(&TcpCounters) -> &AtomicU64;
        let tcp_metrics: [(&str, &str, TcpGet); 4] = [
            (
                "istio_tcp_connections_opened_total",
                "TCP connections opened.",
                |c| &c.opened,
            ),
            (
                "istio_tcp_connections_closed_total",
                "TCP connections closed.",
                |c| &c.closed,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the client.",
                |c| &c.received_bytes,
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the client.",
                |c| &c.sent_bytes,
            ),
        ];
        for (i, (name, help, get)) in tcp_metrics.into_iter().enumerate() {
            let sets = merged(
                tcp.values()
                    .filter(|c| shows(&c.shown, TCP_OPENED + i))
                    .map(|c| (c.labels[i].as_str(), &**c))
                    .collect(),
            );
            write_counter(&mut out, name, help, sets, get);
        }
        // Whether this process holds `runtime.cpu_latency_limit` (a process-wide gauge).
        out.push_str(&runtime::pmqos::render_prometheus("waypoint"));
        out
    }
}

/// The counters of `k` in `map` (a copy-on-write registry), made by `make` and registered
/// when `k` has none yet.
fn registered<C>(
    map: &ArcSwap<HashMap<RequestLabels, Arc<C>>>,
    k: &RequestLabels,
    make: impl FnOnce() -> C,
) -> Arc<C> {
    if let Some(v) = map.load().get(k) {
        return v.clone();
    }
    let fresh = Arc::new(make());
    map.rcu(|m| {
        let mut m = HashMap::clone(m);
        m.entry(k.clone()).or_insert_with(|| fresh.clone());
        m
    });
    map.load().get(k).cloned().unwrap_or(fresh)
}

/// Whether metric `m` ([`METRICS`]) is reported under the [`Shown`] mask `shown`.
fn shows(shown: &std::sync::atomic::AtomicU8, m: usize) -> bool {
    shown.load(Relaxed) & (1 << m) != 0
}

/// Counter `name` (with its HELP and TYPE lines): a line per series, its sets' counts
/// (`get`) added up.
fn write_counter<C>(
    out: &mut String,
    name: &str,
    help: &str,
    series: Vec<(&str, Vec<&C>)>,
    get: impl Fn(&C) -> &AtomicU64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (l, cs) in series {
        let n: u64 = cs.iter().map(|c| get(c).load(Relaxed)).sum();
        let _ = writeln!(out, "{name}{{{l}}} {n}");
    }
}

/// Series by label text, sorted; sets whose texts are equal (a `tagOverrides` REMOVE took
/// out what told them apart) are one series.
fn merged<'a, C>(mut sets: Vec<(&'a str, &'a C)>) -> Vec<(&'a str, Vec<&'a C>)> {
    sets.sort_by(|a, b| a.0.cmp(b.0));
    let mut out: Vec<(&str, Vec<&C>)> = vec![];
    for (l, c) in sets {
        match out.last_mut() {
            Some((last, cs)) if *last == l => cs.push(c),
            _ => out.push((l, vec![c])),
        }
    }
    out
}

/// One worker's view: caches the counter blocks it has used.
#[derive(Clone)]
pub struct LocalMetrics {
    shared: Arc<Metrics>,
    cache: Rc<RefCell<HashMap<RequestLabels, Arc<RequestCounters>>>>,
}

impl LocalMetrics {
    pub fn new(shared: Arc<Metrics>) -> Self {
        LocalMetrics {
            shared,
            cache: Rc::default(),
        }
    }

    /// Count one request.
    /// The counters of a label set (from this worker's cache when it has them).
    pub fn counters(&self, labels: &RequestLabels) -> Arc<RequestCounters> {
        let hit = self.cache.borrow().get(labels).cloned();
        match hit {
            Some(c) => c,
            None => {
                let c = self.shared.get(labels);
                self.cache.borrow_mut().insert(labels.clone(), c.clone());
                c
            }
        }
    }

    /// The TCP counters of `labels` (the process's; an opaque tunnel's end is rare enough
    /// not to cache them here).
    pub fn tcp(&self, labels: &RequestLabels) -> Arc<TcpCounters> {
        self.shared.tcp(labels)
    }

    /// Count one request.
    pub fn record(
        &self,
        labels: &RequestLabels,
        duration_ms: f64,
        req_bytes: u64,
        resp_bytes: u64,
    ) {
        observe(&self.counters(labels), duration_ms, req_bytes, resp_bytes);
    }
}

/// Count one request in a label set's counters.
pub fn observe(c: &RequestCounters, duration_ms: f64, req_bytes: u64, resp_bytes: u64) {
    observe_shown(c, ALL_SHOWN, duration_ms, req_bytes, resp_bytes);
}

/// [`observe`] in the metrics of `shown` only.
pub fn observe_shown(
    c: &RequestCounters,
    shown: Shown,
    duration_ms: f64,
    req_bytes: u64,
    resp_bytes: u64,
) {
    if shown & 1 != 0 {
        c.requests.fetch_add(1, Relaxed);
    }
    if shown & 2 != 0 {
        c.duration_ms.observe(duration_ms);
    }
    if shown & 4 != 0 {
        c.request_bytes.observe(req_bytes as f64);
    }
    if shown & 8 != 0 {
        c.response_bytes.observe(resp_bytes as f64);
    }
}

/// Whether `v` is a valid W3C `traceparent` (version 00, non-zero ids).
pub fn valid_traceparent(v: &str) -> bool {
    // `00-<32 hex>-<16 hex>-<2 hex>`, lower-case hex, trace and span ids not all zero.
    // One table look-up per byte (no per-byte branches on character ranges).
    const LOWER_HEX: [bool; 256] = {
        let mut t = [false; 256];
        let mut c = 0;
        while c < 256 {
            t[c] = matches!(c as u8, b'0'..=b'9' | b'a'..=b'f');
            c += 1;
        }
        t
    };
    let hex = |s: &[u8]| s.iter().fold(true, |ok, &c| ok & LOWER_HEX[c as usize]);
    let b = v.as_bytes();
    // Whitespace around it is allowed (trimmed); the usual value has none.
    let b = if b.len() == 55 {
        b
    } else {
        v.trim().as_bytes()
    };
    b.len() == 55
        && &b[..3] == b"00-"
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(&b[3..35])
        && hex(&b[36..52])
        && hex(&b[53..55])
        && b[3..35] != [b'0'; 32]
        && b[36..52] != [b'0'; 16]
}

/// `n` as 16 lower-case hex digits: eight at a time, each nibble spread to a byte of a
/// word and made a digit there (no loop per digit).
fn hex16(out: &mut [u8], n: u64) {
    fn eight(x: u32) -> [u8; 8] {
        // 0xABCDEFGH -> 0x0A0B0C0D0E0F0G0H (the most significant nibble first).
        let x = u64::from(x);
        let x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF;
        let x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF;
        let x = (x | (x << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
        // 1 in each byte whose nibble is 10 or more; those go to `a`…`f` (`'a' - '0' - 10`
        // = 39 past the digits).
        let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        (x + 0x3030_3030_3030_3030 + letters * 39).to_be_bytes()
    }
    out[..8].copy_from_slice(&eight((n >> 32) as u32));
    out[8..16].copy_from_slice(&eight(n as u32));
}

/// The `traceparent` to send upstream: the request's when valid; else a new span of the
/// tunnel's trace (the CONNECT's `traceparent`) when that one is valid; else a new trace.
/// Shared text (one allocation; the request's header and its access log use the same).
pub fn traceparent(request: Option<&str>, tunnel: Option<&str>, rng: &mut dyn Rng) -> Rc<str> {
    if let Some(v) = request.filter(|v| valid_traceparent(v)) {
        return Rc::from(v.trim());
    }
    let t = new_traceparent(valid_tunnel_traceparent(tunnel), rng);
    Rc::from(std::str::from_utf8(&t).expect("traceparent is ASCII"))
}

/// The tunnel's `traceparent` (the CONNECT's) as [`new_traceparent`] takes it: trimmed,
/// `None` unless valid. A tunnel's requests can check it once, not once each.
pub fn valid_tunnel_traceparent(tunnel: Option<&str>) -> Option<&str> {
    tunnel.filter(|v| valid_traceparent(v)).map(str::trim)
}

/// The length of a `traceparent` value.
pub const TRACEPARENT_LEN: usize = 55;

/// A new `traceparent` (built in place, no allocation): a new span of `tunnel`'s trace (a
/// [`valid_tunnel_traceparent`]), else a new trace. [`traceparent`] when the request has
/// none that is valid.
pub fn new_traceparent(tunnel: Option<&str>, rng: &mut dyn Rng) -> [u8; TRACEPARENT_LEN] {
    // `00-<trace id>-<span id>-<flags>`.
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match tunnel
        .map(str::as_bytes)
        .filter(|t| t.len() == TRACEPARENT_LEN)
    {
        Some(t) => {
            let span = rng.next_u64() | 1;
            out[3..35].copy_from_slice(&t[3..35]);
            hex16(&mut out[36..52], span);
            out[53..55].copy_from_slice(&t[53..55]);
        }
        None => {
            let span = rng.next_u64() | 1;
            hex16(&mut out[3..19], rng.next_u64() | 1);
            hex16(&mut out[19..35], rng.next_u64());
            hex16(&mut out[36..52], span);
        }
    }
    out
}

/// The `traceparent` a request is sent upstream with, and, with tracing on (`spans`, the
/// sampling of new traces; [`crate::spans`]), the parent of the waypoint's own span (0: a
/// new trace). `request`: the request's own valid one (trimmed); `tunnel`: the CONNECT's
/// ([`valid_tunnel_traceparent`]). A new value, or `None` when the request's goes as it is
/// (tracing off). Tracing on, the value names the waypoint's span: the request's trace and
/// flags with a new span id; without one a new trace (not the tunnel's: a keep-alive
/// tunnel's requests are traces of their own, and the ztunnel reports no span to be a
/// parent), its sampled flag drawn from `spans`.
pub fn upstream_traceparent(
    request: Option<&str>,
    tunnel: Option<&str>,
    spans: Option<crate::spans::Sampling>,
    rng: &mut dyn Rng,
) -> (Option<[u8; TRACEPARENT_LEN]>, Option<u64>) {
    match (request, spans) {
        (Some(_), None) => (None, None),
        (Some(r), Some(_)) => {
            let mut out = [0u8; TRACEPARENT_LEN];
            out.copy_from_slice(r.as_bytes());
            hex16(&mut out[36..52], rng.next_u64() | 1);
            let parent = crate::spans::parse_traceparent(r).map(|(_, span, _)| span);
            (Some(out), Some(parent.map_or(0, u64::from_be_bytes)))
        }
        (None, None) => (Some(new_traceparent(tunnel, rng)), None),
        (None, Some(s)) => {
            let mut t = new_traceparent(None, rng);
            if !s.decide(rng) {
                t[53..55].copy_from_slice(b"00");
            }
            (Some(t), Some(0))
        }
    }
}

/// The length of an `x-request-id` the waypoint makes (a UUID).
pub const REQUEST_ID_LEN: usize = 36;

/// A new `x-request-id`, as Envoy makes one for a request without it: a random (version
/// 4) UUID, built in place.
pub fn new_request_id(rng: &mut dyn Rng) -> [u8; REQUEST_ID_LEN] {
    let mut hex = [0u8; 32];
    // Version 4, variant 10xx.
    let hi = (rng.next_u64() & !0xf000) | 0x4000;
    let lo = (rng.next_u64() & !(0xc << 60)) | (0x8 << 60);
    hex16(&mut hex[..16], hi);
    hex16(&mut hex[16..], lo);
    let mut out = [b'-'; REQUEST_ID_LEN];
    out[..8].copy_from_slice(&hex[..8]);
    out[9..13].copy_from_slice(&hex[8..12]);
    out[14..18].copy_from_slice(&hex[12..16]);
    out[19..23].copy_from_slice(&hex[16..20]);
    out[24..].copy_from_slice(&hex[20..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::SplitMix64;

    #[test]
    fn request_ids_are_version_4_uuids() {
        let mut rng = SplitMix64(5);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let id = new_request_id(&mut rng);
            let id = std::str::from_utf8(&id).unwrap().to_string();
            let parts: Vec<&str> = id.split('-').collect();
            assert_eq!(
                parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12],
                "{id}"
            );
            assert!(id
                .bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(parts[2].starts_with('4'), "{id}");
            assert!(
                matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
                "{id}"
            );
            seen.insert(id);
        }
        assert_eq!(seen.len(), 1000);
    }

    #[test]
    fn grpc_status_label_is_one_of_the_17_codes() {
        for c in 0..=16 {
            assert_eq!(grpc_code(c), c);
        }
        for c in [17, 99, 1000, 65_536, u32::MAX] {
            assert_eq!(grpc_code(c), 2, "{c}");
        }
        // Every status an upstream can send maps into the fixed label set.
        let mut seen = std::collections::BTreeSet::new();
        for c in (0..100_000).chain([u32::MAX - 1, u32::MAX]) {
            seen.insert(grpc_code(c));
        }
        assert_eq!(seen.len(), 17);
        // The HTTP-status mapping stays within it too.
        for s in 100..600 {
            if let Some(c) = grpc_status_of_http(s) {
                assert_eq!(grpc_code(c), c);
            }
        }
    }

    #[test]
    fn traceparent_is_kept_when_valid_and_generated_otherwise() {
        let mut rng = SplitMix64(7);
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good));
        assert_eq!(&*traceparent(Some(good), None, &mut rng), good);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
            let t = traceparent(Some(bad), None, &mut rng);
            assert!(valid_traceparent(&t), "{t}");
            assert_ne!(&*t, bad);
        }
        // The tunnel's trace continues with a new span.
        let t = traceparent(None, Some(good), &mut rng);
        assert!(valid_traceparent(&t));
        assert!(t.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!t.contains("00f067aa0ba902b7"));
    }

    #[test]
    fn hex16_is_the_lower_case_hex_of_the_number() {
        let mut rng = SplitMix64(11);
        let edge = [
            0,
            1,
            9,
            10,
            15,
            16,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            0xa0a0_9f9f_0f0f_f0f0,
        ];
        for n in edge.into_iter().chain((0..1000).map(|_| rng.next_u64())) {
            let mut out = [0u8; 16];
            hex16(&mut out, n);
            assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{n:016x}"));
        }
    }

    #[test]
    fn access_log_duration_is_the_float_formatters_text() {
        let mut rng = SplitMix64(5);
        let edge = [
            0.0,
            0.0005,
            0.0015,
            0.0625,
            0.1875,
            1.0,
            1.2345,
            2.5e-4,
            999.9995,
            1e6,
            3.9e6,
            4e6,
            1e9,
            -1.0,
            f64::NAN,
            f64::INFINITY,
        ];
        // Durations as the access log gets them (`as_secs_f64() * 1000`), from nanoseconds.
        let nanos = (0..20_000).map(|_| {
            let n = rng.next_u64() % 10_000_000_000;
            std::time::Duration::from_nanos(n >> (n % 24)).as_secs_f64() * 1000.0
        });
        for ms in edge.into_iter().chain(nanos) {
            assert_eq!(format!("{:?}", Millis(ms)), format!("\"{ms:.3}\""), "{ms}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_when_rendered() {
        let h = Histogram::new(&BYTES_BUCKETS);
        for v in [0.0, 5.0, 5.0, 2e9] {
            h.observe(v);
        }
        let mut out = String::new();
        Histogram::render_sum(&[&h], &mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 3\n"), "{out}");
        assert!(
            out.contains("x_bucket{a=\"b\",le=\"1000000000\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 4\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 2000000010\n"), "{out}");
    }
}
