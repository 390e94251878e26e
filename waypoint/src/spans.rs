//! Distributed tracing: the waypoint's own span of each sampled request, exported to an
//! Istio tracing extension provider, as Envoy's tracers do under istiod's configuration.
//!
//! * **Configured** by a Telemetry's `tracing` (its provider, `randomSamplingPercentage`,
//!   `disableSpanReporting`, `customTags`), resolved per destination as accessLogging is
//!   ([`crate::config::WaypointConfig::tracing_for`]), with the providers of MeshConfig
//!   `extensionProviders` of kinds `opentelemetry` (OTLP over gRPC, or over HTTP with
//!   `http`) and `zipkin` (Zipkin v2 JSON), whose `service` is a service of the mesh
//!   model (reached over HBONE like any upstream).
//! * **Trace context** (W3C `traceparent`): with tracing on, the waypoint makes a span of
//!   its own for every request and sends upstream a `traceparent` naming it (the same
//!   trace id and flags, a new span id), so the server's span is its child. Its parent is
//!   the request's `traceparent`; without one it starts a new trace (not the CONNECT's:
//!   the ztunnel reports no span, and a keep-alive tunnel's requests are traces of their
//!   own), sampled at `randomSamplingPercentage` (Istio's default 1 %). A request with a
//!   trace context keeps its sampling decision (parent-based, as Envoy's OpenTelemetry
//!   tracer).
//! * **The span** ([`Span`]): kind SERVER, named as Istio names a waypoint's route
//!   (`<service hostname>:<port>/*`, or `<pod ip>:<port>/*` for a pod target), from the
//!   request's head to its last response byte, with Envoy's standard tags (`http.method`,
//!   `http.url`, `http.status_code`, `http.protocol`, `user_agent`, `guid:x-request-id`,
//!   `request_size`, `response_size`, `response_flags`, `upstream_cluster`,
//!   `peer.address`, `component`, `error` on a 5xx) and Istio's (`istio.canonical_service`,
//!   `istio.namespace` of the waypoint), then the Telemetry's `customTags` (a literal, an
//!   environment variable of the waypoint read at load, a request header); string values
//!   cut to the provider's `maxTagLength` (default 256).
//! * **Export**: each worker keeps its sampled spans in a batch per provider (no lock) and
//!   sends a batch when it holds [`MAX_BATCH`] spans or [`FLUSH_INTERVAL`] after its first
//!   span, at most [`MAX_EXPORTS_IN_FLIGHT`] at once; past [`MAX_BUFFERED`] waiting spans
//!   new ones are dropped. Counted: `waypoint_tracing_spans_total{result="exported|failed|dropped"}`.
//!   A draining worker sends its waiting spans at once and waits for its exports (2 s at
//!   most) before it stops, so a restart or a rollout loses none.
//!   A span's tag values share one text ([`Tags`]); OTLP is encoded by hand straight
//!   from the spans and Zipkin's JSON written as it goes (measured: building message trees
//!   cost more than the rest of a sampled request's span).
//! * **Access log records** of `envoyOtelAls` providers (Istio's OpenTelemetry access log,
//!   configured in [`crate::config`]) take the same way: queued per worker beside the
//!   spans ([`Item`]), exported as OTLP logs over gRPC (`LogsService/Export`, resource
//!   attribute `log_name`; each record's time, body, attributes and trace context),
//!   counted as `waypoint_access_log_records_total{result}`.
//! * **B3** (a `zipkin` provider, as Envoy's Zipkin tracer): a request without a
//!   `traceparent` continues its B3 context (`b3`, else `x-b3-traceid`/`x-b3-spanid`/
//!   `x-b3-sampled`/`x-b3-flags`), and every request goes upstream with `x-b3-traceid`,
//!   `x-b3-spanid` (the waypoint's span), `x-b3-parentspanid` and `x-b3-sampled` beside
//!   its `traceparent` ([`b3`]).
//!
//! Not done: `useRequestIdForTraceSampling` (the decision is a random draw either way),
//! OpenTelemetry `resourceDetectors` and samplers, `tracestate` changes (passed as sent).

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::route::ObjectRef;

/// Spans a worker sends in one export at most; a batch this full is sent at once.
pub const MAX_BATCH: usize = 512;
/// How long a span waits for its batch to fill before the batch is sent anyway.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Spans a worker keeps waiting for export; more are dropped (counted).
pub const MAX_BUFFERED: usize = 4 * MAX_BATCH;
/// Exports a worker has in flight at once; a batch due past them waits for one to end
/// (which then takes it).
pub const MAX_EXPORTS_IN_FLIGHT: usize = 2;
/// Istio's default `maxTagLength`.
pub const MAX_TAG_LENGTH: usize = 256;
/// Istio's default sampling of new traces (MeshConfig `defaultConfig.tracing.sampling`).
pub const DEFAULT_SAMPLING: f64 = 1.0;
/// An export not answered within this (or an OpenTelemetry provider's `http.timeout`)
/// has failed.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The gRPC method of an OTLP export.
pub const OTLP_GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// The gRPC method of an OTLP logs export (an `envoyOtelAls` access log provider).
pub const OTLP_LOGS_GRPC_PATH: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
/// Istio's default `logName` of an `envoyOtelAls` provider.
pub const OTEL_LOG_NAME: &str = "otel_envoy_accesslog";

/// How a provider takes spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (`TraceService/Export`): an `opentelemetry` provider without `http`.
    OtlpGrpc,
    /// OTLP over HTTP: protobuf POSTed to `path` (`opentelemetry.http`).
    OtlpHttp { path: String },
    /// Zipkin v2 JSON POSTed to `path` (default `/api/v2/spans`); `trace_id_64`:
    /// `enable64bitTraceId` (the trace id's low 64 bits).
    Zipkin { path: String, trace_id_64: bool },
    /// Access log records, not spans: OTLP logs over gRPC (`LogsService/Export`), an
    /// `envoyOtelAls` provider; `log_name` is its `logName` (the resource's `log_name`).
    OtlpLogs { log_name: String },
}

/// One tracing extension provider, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    pub protocol: Protocol,
    /// The collector's service and port (in the mesh model) and its hostname.
    pub service: ObjectRef,
    pub port: u16,
    pub host: String,
    pub timeout: Duration,
    pub max_tag_length: usize,
    /// Fields added to every export request (`http.headers` / `headers`).
    pub headers: Vec<(String, String)>,
}

impl Provider {
    /// Whether it takes its exports over gRPC.
    pub fn grpc(&self) -> bool {
        matches!(
            self.protocol,
            Protocol::OtlpGrpc | Protocol::OtlpLogs { .. }
        )
    }

    /// Whether it takes access log records (else spans).
    pub fn logs(&self) -> bool {
        matches!(self.protocol, Protocol::OtlpLogs { .. })
    }
}

/// The share of new traces sampled: a draw below the threshold is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling(u64);

impl Sampling {
    /// `percent` (0 to 100) of new traces.
    pub fn percent(percent: f64) -> Sampling {
        if percent >= 100.0 {
            Sampling(u64::MAX)
        } else {
            // `as` saturates; 0 % samples nothing.
            Sampling((percent.max(0.0) / 100.0 * 18_446_744_073_709_551_616.0) as u64)
        }
    }

    /// Whether a new trace is sampled (one draw).
    pub fn decide(self, rng: &mut dyn crate::lb::Rng) -> bool {
        self.0 == u64::MAX || rng.next_u64() < self.0
    }
}

/// What a request's trace context needs from the tracing of its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Propagation {
    pub sampling: Sampling,
    /// A `zipkin` provider: B3 headers read and written ([`b3`]), with 64-bit trace ids
    /// (`enable64bitTraceId`) or not.
    pub b3: Option<bool>,
}

impl Tracing {
    pub fn propagation(&self) -> Propagation {
        let b3 = match self.provider.protocol {
            Protocol::Zipkin { trace_id_64, .. } => Some(trace_id_64),
            _ => None,
        };
        Propagation {
            sampling: self.sampling,
            b3,
        }
    }
}

/// The B3 fields a request may carry (`b3` is the single-header form).
const B3_FIELDS: [&str; 6] = [
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// A trace id and a span id.
type Ids = ([u8; 16], [u8; 8]);

/// A request's B3 context: its trace and span ids when it has them, and its sampling
/// decision when it states one.
fn b3_context(head: &crate::http1::RequestHead) -> (Option<Ids>, Option<bool>) {
    let ids = |trace: &str, span: &str| {
        let (trace, span) = (trace.trim(), span.trim());
        if !matches!(trace.len(), 16 | 32) || span.len() != 16 {
            return None;
        }
        let mut t = [0u8; 16];
        let mut sp = [0u8; 8];
        // A 64-bit trace id is the low half of a 128-bit one.
        hex_into(trace.as_bytes(), &mut t[16 - trace.len() / 2..])?;
        hex_into(span.as_bytes(), &mut sp)?;
        (t != [0; 16] && sp != [0; 8]).then_some((t, sp))
    };
    let decision = |v: &str| match v.trim() {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    };
    if let Some(single) = head.header("b3") {
        let parts: Vec<&str> = single.split('-').collect();
        return match parts.as_slice() {
            [state] => (None, decision(state)),
            [trace, span] => (ids(trace, span), None),
            [trace, span, state, ..] => (ids(trace, span), decision(state)),
            [] => (None, None),
        };
    }
    let ids = match (head.header("x-b3-traceid"), head.header("x-b3-spanid")) {
        (Some(t), Some(sp)) => ids(t, sp),
        _ => None,
    };
    let sampled = if head.header("x-b3-flags").is_some_and(|f| f.trim() == "1") {
        Some(true)
    } else {
        head.header("x-b3-sampled").and_then(decision)
    };
    (ids, sampled)
}

/// B3 for a `zipkin` provider (`trace_id_64`: its `enable64bitTraceId`), on a request
/// whose trace context `trace` the waypoint made its span in ([`crate::http1::trace`]):
/// a new trace (no `traceparent` of the request's own) continues the request's B3 context
/// instead (its trace id, its span the parent, its sampling decision when it states one),
/// and the request's B3 fields are replaced by the waypoint span's.
pub fn b3(
    head: &mut crate::http1::RequestHead,
    trace: &mut crate::http1::Trace,
    trace_id_64: bool,
) {
    let Some(parent) = trace.span else {
        return;
    };
    let Some((mut trace_id, span_id, mut flags)) = parse_traceparent(&trace.value) else {
        return;
    };
    let mut parent = parent;
    if parent == 0 {
        let (ids, sampled) = b3_context(head);
        if let Some((t, sp)) = ids {
            trace_id = t;
            parent = u64::from_be_bytes(sp);
        }
        if let Some(on) = sampled {
            flags = (flags & !1) | u8::from(on);
        }
        if ids.is_some() || sampled.is_some() {
            let value = format!("00-{}-{}-{flags:02x}", hex(&trace_id), hex(&span_id));
            let text = crate::http1::Text::from(value);
            for (n, v) in head.headers.iter_mut() {
                if n.eq_ignore_ascii_case("traceparent") {
                    *v = text.clone();
                }
            }
            trace.value = text;
            trace.span = Some(parent);
        }
    }
    head.headers
        .retain(|(n, _)| !B3_FIELDS.iter().any(|f| n.eq_ignore_ascii_case(f)));
    let trace_hex = if trace_id_64 {
        hex(&trace_id[8..])
    } else {
        hex(&trace_id)
    };
    let mut put = |n: &'static str, v: String| head.headers.push((n.into(), v.into()));
    put("x-b3-traceid", trace_hex);
    put("x-b3-spanid", hex(&span_id));
    if parent != 0 {
        put("x-b3-parentspanid", format!("{parent:016x}"));
    }
    put(
        "x-b3-sampled",
        if flags & 1 == 1 { "1" } else { "0" }.into(),
    );
}

/// A Telemetry `customTags` entry, as a span gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomTag {
    /// `literal.value`, or an `environment` tag's value read at load.
    Literal(String),
    /// `header`: the request's field `name`, else `default` (no tag without either).
    Header {
        name: String,
        default: Option<String>,
    },
}

/// The tracing in force for one destination ([`crate::config::WaypointConfig::tracing_for`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    pub provider: std::sync::Arc<Provider>,
    pub sampling: Sampling,
    /// `disableSpanReporting: true` turns this off: spans are made and propagated, not sent.
    pub report: bool,
    /// By tag name.
    pub custom_tags: Vec<(String, CustomTag)>,
}

/// One finished span, waiting for export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// `None`: the root of its trace.
    pub parent: Option<[u8; 8]>,
    /// The W3C trace flags.
    pub flags: u8,
    pub name: String,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// The request's client (the original caller).
    pub peer: IpAddr,
    /// A 5xx (Envoy's `error` tag; OTLP status ERROR).
    pub error: bool,
    pub tags: Tags,
}

/// One request's access log record for an `envoyOtelAls` provider, waiting for export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// When the request began.
    pub time_unix_nanos: u64,
    /// The provider's `logFormat.text` (Istio's text format by default).
    pub body: String,
    /// Its `logFormat.labels`, each rendered as text.
    pub attributes: Tags,
    /// The request's trace context (its `traceparent`), when it has one.
    pub trace: Option<([u8; 16], [u8; 8], u8)>,
}

/// What a worker holds for a provider's next export: a span, or an access log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Span(Span),
    Log(LogRecord),
}

/// A span's tags: their values written one after the other in one text (one allocation
/// for all of them, none for a value written with `format_args!`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags {
    text: String,
    /// Each tag's name and where its value ends in `text`.
    ends: Vec<(Cow<'static, str>, usize)>,
}

impl Tags {
    pub fn with_capacity(tags: usize, text: usize) -> Tags {
        Tags {
            text: String::with_capacity(text),
            ends: Vec::with_capacity(tags),
        }
    }

    /// Add the tag `name` of value `value` (as it displays).
    pub fn push(&mut self, name: impl Into<Cow<'static, str>>, value: impl std::fmt::Display) {
        use std::fmt::Write;
        let _ = write!(self.text, "{value}");
        self.ends.push((name.into(), self.text.len()));
    }

    /// The tags in order, each value cut to `max` bytes (at a character boundary).
    pub fn iter(&self, max: usize) -> impl Iterator<Item = (&str, &str)> {
        let mut start = 0;
        self.ends.iter().map(move |(name, end)| {
            let v = &self.text[start..*end];
            start = *end;
            (name.as_ref(), cut(v, max))
        })
    }

    /// The value of tag `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter(usize::MAX)
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}

/// The parts of a valid `traceparent` ([`crate::telemetry::valid_traceparent`]): trace
/// id, span id, flags.
pub fn parse_traceparent(v: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let b = v.trim().as_bytes();
    if b.len() != crate::telemetry::TRACEPARENT_LEN {
        return None;
    }
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    hex_into(&b[3..35], &mut trace)?;
    hex_into(&b[36..52], &mut span)?;
    let mut flags = [0u8];
    hex_into(&b[53..55], &mut flags)?;
    Some((trace, span, flags[0]))
}

fn hex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Nanoseconds since the Unix epoch of `t`.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Who made the spans: the waypoint (its Gateway) and its address.
#[derive(Debug, Clone)]
pub struct Local {
    /// `<gateway name>.<namespace>`, as Istio names a proxy's service in traces.
    pub service_name: String,
    pub ip: IpAddr,
}

/// `v` cut to `max` bytes (at a character boundary).
fn cut(v: &str, max: usize) -> &str {
    if v.len() <= max {
        return v;
    }
    let mut end = max;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    &v[..end]
}

/// The export request of `spans` to `p`: an HTTP/1.1-shaped request (a gRPC one is sent
/// over HTTP/2, [`crate::http1::Upstream::side_exchange`]).
pub fn export_request(p: &Provider, local: &Local, items: &[Item]) -> Bytes {
    let spans: Vec<&Span> = items
        .iter()
        .filter_map(|i| match i {
            Item::Span(s) => Some(s),
            Item::Log(_) => None,
        })
        .collect();
    let grpc = |path: &'static str, msg: Vec<u8>| {
        let mut body = Vec::with_capacity(msg.len() + 5);
        body.push(0);
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);
        (path, "application/grpc", body)
    };
    let (path, content_type, body) = match &p.protocol {
        Protocol::OtlpGrpc => grpc(OTLP_GRPC_PATH, otlp(p, local, &spans)),
        Protocol::OtlpLogs { log_name } => {
            let logs: Vec<&LogRecord> = items
                .iter()
                .filter_map(|i| match i {
                    Item::Log(l) => Some(l),
                    Item::Span(_) => None,
                })
                .collect();
            grpc(OTLP_LOGS_GRPC_PATH, otlp_logs(log_name, &logs))
        }
        Protocol::OtlpHttp { path } => (
            path.as_str(),
            "application/x-protobuf",
            otlp(p, local, &spans),
        ),
        Protocol::Zipkin { path, trace_id_64 } => (
            path.as_str(),
            "application/json",
            zipkin(p, local, &spans, *trace_id_64),
        ),
    };
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nhost: {}:{}\r\ncontent-type: {content_type}\r\n",
        p.host, p.port
    );
    if p.grpc() {
        out.push_str("te: trailers\r\n");
    }
    for (n, v) in &p.headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// Whether the collector took the export: a 2xx answer, and for gRPC `grpc-status: 0`
/// among its fields (an HTTP/2 answer's trailers are among them).
pub fn accepted(p: &Provider, answer: &[u8]) -> bool {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut fields);
    if !matches!(r.parse(answer), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    let ok = r.code.is_some_and(|c| (200..300).contains(&c));
    if !p.grpc() {
        return ok;
    }
    ok && r
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("grpc-status") && h.value == b"0")
}

/// `ExportTraceServiceRequest` of `spans`, encoded by hand (the messages of [`pb`], the
/// fields the waypoint sets): straight from the spans, with no message tree to allocate.
/// Protobuf by hand: the pieces of the OTLP encoders.
mod wire {
    pub use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

    /// A length-delimited field of `len` bytes, whole.
    pub fn field_len(tag: u32, len: usize) -> usize {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }

    pub fn open(tag: u32, len: usize, out: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
    }

    pub fn bytes(tag: u32, b: &[u8], out: &mut Vec<u8>) {
        open(tag, b.len(), out);
        out.extend_from_slice(b);
    }

    /// `KeyValue { key = 1, value = 2: AnyValue { string_value = 1 } }`.
    pub fn kv_len(k: &str, v: &str) -> usize {
        field_len(1, k.len()) + field_len(2, field_len(1, v.len()))
    }

    /// A `KeyValue` as field `tag`.
    pub fn kv(tag: u32, k: &str, v: &str, out: &mut Vec<u8>) {
        open(tag, kv_len(k, v), out);
        bytes(1, k.as_bytes(), out);
        open(2, field_len(1, v.len()), out);
        bytes(1, v.as_bytes(), out);
    }

    /// `InstrumentationScope { name = 1, version = 2 }` of the waypoint.
    pub fn scope_len() -> usize {
        field_len(1, "waypoint".len()) + field_len(2, env!("CARGO_PKG_VERSION").len())
    }

    /// The scope as field 1 (of `ScopeSpans` or `ScopeLogs`).
    pub fn scope(out: &mut Vec<u8>) {
        open(1, scope_len(), out);
        bytes(1, b"waypoint", out);
        bytes(2, env!("CARGO_PKG_VERSION").as_bytes(), out);
    }
}

/// `ExportLogsServiceRequest` of `logs` (an `envoyOtelAls` provider's records), encoded by
/// hand as [`otlp`] is: resource attribute `log_name`, each record's time (as its
/// observed time too), body, attributes and trace context.
fn otlp_logs(log_name: &str, logs: &[&LogRecord]) -> Vec<u8> {
    use wire::*;
    let record_len = |l: &LogRecord| {
        2 * (key_len(1) + 8)
            + field_len(5, field_len(1, l.body.len()))
            + l.attributes
                .iter(usize::MAX)
                .map(|(k, v)| field_len(6, kv_len(k, v)))
                .sum::<usize>()
            + l.trace
                .map_or(0, |_| key_len(8) + 4 + field_len(9, 16) + field_len(10, 8))
    };
    let lens: Vec<usize> = logs.iter().map(|l| record_len(l)).collect();
    let scope_logs_len =
        field_len(1, scope_len()) + lens.iter().map(|l| field_len(2, *l)).sum::<usize>();
    let resource_len = field_len(1, kv_len("log_name", log_name));
    let resource_logs_len = field_len(1, resource_len) + field_len(2, scope_logs_len);
    let mut out = Vec::with_capacity(field_len(1, resource_logs_len));
    // ExportLogsServiceRequest.resource_logs = 1.
    open(1, resource_logs_len, &mut out);
    // ResourceLogs.resource = 1: Resource.attributes = 1.
    open(1, resource_len, &mut out);
    kv(1, "log_name", log_name, &mut out);
    // ResourceLogs.scope_logs = 2: ScopeLogs { scope = 1, log_records = 2 }.
    open(2, scope_logs_len, &mut out);
    scope(&mut out);
    for (l, len) in logs.iter().zip(lens) {
        open(2, len, &mut out);
        encode_key(1, WireType::SixtyFourBit, &mut out);
        out.extend_from_slice(&l.time_unix_nanos.to_le_bytes());
        // body = 5: AnyValue { string_value = 1 }.
        open(5, field_len(1, l.body.len()), &mut out);
        bytes(1, l.body.as_bytes(), &mut out);
        for (k, v) in l.attributes.iter(usize::MAX) {
            kv(6, k, v, &mut out);
        }
        if let Some((trace_id, span_id, flags)) = &l.trace {
            encode_key(8, WireType::ThirtyTwoBit, &mut out);
            out.extend_from_slice(&u32::from(*flags).to_le_bytes());
            bytes(9, trace_id, &mut out);
            bytes(10, span_id, &mut out);
        }
        // observed_time_unix_nano = 11.
        encode_key(11, WireType::SixtyFourBit, &mut out);
        out.extend_from_slice(&l.time_unix_nanos.to_le_bytes());
    }
    out
}

fn otlp(p: &Provider, local: &Local, spans: &[&Span]) -> Vec<u8> {
    use wire::*;
    let max = p.max_tag_length;
    let code = |s: &Span| {
        if s.error {
            pb::STATUS_CODE_ERROR
        } else {
            pb::STATUS_CODE_UNSET
        }
    };
    // Status { code = 3 } (nothing when UNSET).
    let status_len = |s: &Span| match code(s) {
        0 => 0,
        c => key_len(3) + encoded_len_varint(c as u64),
    };
    let span_len = |s: &Span| {
        field_len(1, 16)
            + field_len(2, 8)
            + s.parent.map_or(0, |_| field_len(4, 8))
            + field_len(5, s.name.len())
            + key_len(6)
            + encoded_len_varint(pb::SPAN_KIND_SERVER as u64)
            + 2 * (key_len(7) + 8)
            + s.tags
                .iter(max)
                .map(|(k, v)| field_len(9, kv_len(k, v)))
                .sum::<usize>()
            + field_len(15, status_len(s))
            + key_len(16)
            + 4
    };
    let lens: Vec<usize> = spans.iter().map(|s| span_len(s)).collect();
    let scope_spans_len =
        field_len(1, scope_len()) + lens.iter().map(|l| field_len(2, *l)).sum::<usize>();
    let resource_len = field_len(1, kv_len("service.name", &local.service_name));
    let resource_spans_len = field_len(1, resource_len) + field_len(2, scope_spans_len);
    let mut out = Vec::with_capacity(field_len(1, resource_spans_len));
    // ExportTraceServiceRequest.resource_spans = 1.
    open(1, resource_spans_len, &mut out);
    // ResourceSpans.resource = 1: Resource.attributes = 1.
    open(1, resource_len, &mut out);
    kv(1, "service.name", &local.service_name, &mut out);
    // ResourceSpans.scope_spans = 2: ScopeSpans { scope = 1, spans = 2 }.
    open(2, scope_spans_len, &mut out);
    scope(&mut out);
    for (s, len) in spans.iter().zip(lens) {
        open(2, len, &mut out);
        bytes(1, &s.trace_id, &mut out);
        bytes(2, &s.span_id, &mut out);
        if let Some(parent) = &s.parent {
            bytes(4, parent, &mut out);
        }
        bytes(5, s.name.as_bytes(), &mut out);
        encode_key(6, WireType::Varint, &mut out);
        encode_varint(pb::SPAN_KIND_SERVER as u64, &mut out);
        encode_key(7, WireType::SixtyFourBit, &mut out);
        out.extend_from_slice(&s.start_unix_nanos.to_le_bytes());
        encode_key(8, WireType::SixtyFourBit, &mut out);
        out.extend_from_slice(&s.end_unix_nanos.to_le_bytes());
        for (k, v) in s.tags.iter(max) {
            kv(9, k, v, &mut out);
        }
        open(15, status_len(s), &mut out);
        if code(s) != 0 {
            encode_key(3, WireType::Varint, &mut out);
            encode_varint(code(s) as u64, &mut out);
        }
        encode_key(16, WireType::ThirtyTwoBit, &mut out);
        out.extend_from_slice(&u32::from(s.flags).to_le_bytes());
    }
    out
}

/// A Zipkin v2 JSON list of `spans`, written as it goes (no document tree).
fn zipkin(p: &Provider, local: &Local, spans: &[&Span], trace_id_64: bool) -> Vec<u8> {
    use std::io::Write;
    let mut out: Vec<u8> = Vec::with_capacity(spans.len() * 900);
    // A JSON string (escaped as JSON needs).
    fn string(out: &mut Vec<u8>, v: &str) {
        let _ = serde_json::to_writer(&mut *out, v);
    }
    fn endpoint(out: &mut Vec<u8>, ip: IpAddr, name: Option<&str>) {
        out.push(b'{');
        if let Some(n) = name {
            out.extend_from_slice(b"\"serviceName\":");
            string(out, n);
            out.push(b',');
        }
        let key = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
        let _ = write!(out, "\"{key}\":\"{ip}\"}}");
    }
    out.push(b'[');
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let trace = if trace_id_64 {
            &s.trace_id[8..]
        } else {
            &s.trace_id[..]
        };
        let duration = (s.end_unix_nanos.saturating_sub(s.start_unix_nanos) / 1000).max(1);
        let _ = write!(
            out,
            "{{\"traceId\":\"{}\",\"id\":\"{}\",",
            hex(trace),
            hex(&s.span_id)
        );
        if let Some(parent) = s.parent {
            let _ = write!(out, "\"parentId\":\"{}\",", hex(&parent));
        }
        out.extend_from_slice(b"\"name\":");
        string(&mut out, &s.name);
        let _ = write!(
            out,
            ",\"kind\":\"SERVER\",\"timestamp\":{},\"duration\":{duration},\"localEndpoint\":",
            s.start_unix_nanos / 1000
        );
        endpoint(&mut out, local.ip, Some(&local.service_name));
        out.extend_from_slice(b",\"remoteEndpoint\":");
        endpoint(&mut out, s.peer, None);
        out.extend_from_slice(b",\"tags\":{");
        for (j, (k, v)) in s.tags.iter(p.max_tag_length).enumerate() {
            if j > 0 {
                out.push(b',');
            }
            string(&mut out, k);
            out.push(b':');
            string(&mut out, v);
        }
        out.extend_from_slice(b"}}");
    }
    out.push(b']');
    out
}

/// The OTLP messages the waypoint sends (`opentelemetry/proto/collector/trace/v1`,
/// `trace/v1`, `common/v1`, `resource/v1`), the fields it uses; public for tests and
/// collectors built on them.
pub mod pb {
    pub const SPAN_KIND_SERVER: i32 = 2;
    pub const STATUS_CODE_UNSET: i32 = 0;
    pub const STATUS_CODE_ERROR: i32 = 2;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(string, tag = "3")]
        pub trace_state: String,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
        #[prost(fixed32, tag = "16")]
        pub flags: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(int32, tag = "3")]
        pub code: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportLogsServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_logs: Vec<ResourceLogs>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceLogs {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_logs: Vec<ScopeLogs>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeLogs {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub log_records: Vec<LogRecord>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LogRecord {
        #[prost(fixed64, tag = "1")]
        pub time_unix_nano: u64,
        #[prost(message, optional, tag = "5")]
        pub body: Option<AnyValue>,
        #[prost(message, repeated, tag = "6")]
        pub attributes: Vec<KeyValue>,
        #[prost(fixed32, tag = "8")]
        pub flags: u32,
        #[prost(bytes = "vec", tag = "9")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "10")]
        pub span_id: Vec<u8>,
        #[prost(fixed64, tag = "11")]
        pub observed_time_unix_nano: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(oneof = "any_value::Value", tags = "1, 2, 3, 4")]
        pub value: Option<any_value::Value>,
    }

    impl AnyValue {
        /// Its string, when it holds one.
        pub fn string(&self) -> Option<&str> {
            match &self.value {
                Some(any_value::Value::StringValue(s)) => Some(s),
                _ => None,
            }
        }
    }

    /// The string value of an optional [`AnyValue`] (`""` when it holds none).
    pub fn string_of(v: &Option<AnyValue>) -> &str {
        v.as_ref().and_then(AnyValue::string).unwrap_or("")
    }

    pub mod any_value {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(string, tag = "1")]
            StringValue(String),
            #[prost(bool, tag = "2")]
            BoolValue(bool),
            #[prost(int64, tag = "3")]
            IntValue(i64),
            #[prost(double, tag = "4")]
            DoubleValue(f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(protocol: Protocol) -> Provider {
        Provider {
            name: "p".into(),
            protocol,
            service: ObjectRef::new("obs", "collector"),
            port: 4317,
            host: "collector.obs.svc.cluster.local".into(),
            timeout: EXPORT_TIMEOUT,
            max_tag_length: 8,
            headers: vec![("x-tenant".into(), "a".into())],
        }
    }

    fn span(parent: Option<[u8; 8]>) -> Span {
        Span {
            trace_id: [0xab; 16],
            span_id: [0x01, 2, 3, 4, 5, 6, 7, 8],
            parent,
            flags: 1,
            name: "echo.app.svc.cluster.local:80/*".into(),
            start_unix_nanos: 1_000_000_000,
            end_unix_nanos: 1_002_500_000,
            peer: "10.1.0.7".parse().unwrap(),
            error: true,
            tags: {
                let mut t = Tags::default();
                t.push("http.url", "http://echo/a/long/path");
                t
            },
        }
    }

    fn local() -> Local {
        Local {
            service_name: "wp.app".into(),
            ip: "10.1.0.9".parse().unwrap(),
        }
    }

    #[test]
    fn traceparent_parts() {
        let (t, s, f) =
            parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(hex(&t), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex(&s), "b7ad6b7169203331");
        assert_eq!(f, 1);
        assert!(parse_traceparent("00-0af7").is_none());
    }

    #[test]
    fn sampling_draws_the_configured_share() {
        let mut rng = crate::lb::SplitMix64(7);
        for (pct, lo, hi) in [(0.0, 0, 0), (1.0, 50, 150), (50.0, 4_700, 5_300)] {
            let s = Sampling::percent(pct);
            let n = (0..10_000).filter(|_| s.decide(&mut rng)).count();
            assert!((lo..=hi).contains(&n), "{pct} %: {n} of 10,000");
        }
        let all = Sampling::percent(100.0);
        assert!((0..1000).all(|_| all.decide(&mut rng)));
    }

    #[test]
    fn otlp_logs_export_carries_each_record_and_only_the_records() {
        use prost::Message;
        let p = provider(Protocol::OtlpLogs {
            log_name: "otel_envoy_accesslog".into(),
        });
        assert!(p.grpc() && p.logs());
        let record = |trace: Option<([u8; 16], [u8; 8], u8)>, code: &str| {
            let mut attributes = Tags::with_capacity(2, 32);
            attributes.push("code", code);
            attributes.push("long", "a value longer than the provider's tag length");
            LogRecord {
                time_unix_nanos: 1_700_000_000_123_456_789,
                body: format!("GET / {code}\n"),
                attributes,
                trace,
            }
        };
        let traced = record(Some(([0xab; 16], [7; 8], 1)), "200");
        let items = [
            Item::Log(traced),
            // A span among them is not the logs provider's: left out.
            Item::Span(span(None)),
            Item::Log(record(None, "503")),
        ];
        let req = export_request(&p, &local(), &items);
        let end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = std::str::from_utf8(&req[..end + 2]).unwrap();
        assert!(head.starts_with(&format!("POST {OTLP_LOGS_GRPC_PATH} HTTP/1.1\r\n")));
        assert!(
            head.contains("content-type: application/grpc\r\nte: trailers\r\n"),
            "{head}"
        );
        let body = &req[end + 4..];
        assert_eq!(body[0], 0);
        assert_eq!(
            u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize,
            body.len() - 5
        );
        let r = pb::ExportLogsServiceRequest::decode(&body[5..]).unwrap();
        let rl = &r.resource_logs[0];
        let attr = &rl.resource.as_ref().unwrap().attributes[0];
        assert_eq!(attr.key, "log_name");
        let text = pb::string_of;
        assert_eq!(text(&attr.value), "otel_envoy_accesslog");
        let sl = &rl.scope_logs[0];
        assert_eq!(sl.scope.as_ref().unwrap().name, "waypoint");
        assert_eq!(sl.log_records.len(), 2);
        let (a, b) = (&sl.log_records[0], &sl.log_records[1]);
        assert_eq!(a.time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(a.observed_time_unix_nano, a.time_unix_nano);
        assert_eq!(text(&a.body), "GET / 200\n");
        let attrs: Vec<(String, String)> = a
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), text(&kv.value).to_string()))
            .collect();
        assert_eq!(
            attrs,
            [
                ("code".to_string(), "200".to_string()),
                (
                    "long".to_string(),
                    "a value longer than the provider's tag length".to_string()
                )
            ]
        );
        assert_eq!(
            (a.trace_id.clone(), a.span_id.clone(), a.flags),
            (vec![0xab; 16], vec![7; 8], 1)
        );
        assert_eq!(text(&b.body), "GET / 503\n");
        assert!(b.trace_id.is_empty() && b.span_id.is_empty() && b.flags == 0);
    }

    #[test]
    fn otlp_export_carries_the_span_and_its_resource() {
        use prost::Message;
        for grpc in [false, true] {
            let proto = if grpc {
                Protocol::OtlpGrpc
            } else {
                Protocol::OtlpHttp {
                    path: "/v1/traces".into(),
                }
            };
            let p = provider(proto);
            let req = export_request(&p, &local(), &[Item::Span(span(Some([9; 8])))]);
            let end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let head = std::str::from_utf8(&req[..end + 2]).unwrap();
            assert!(head.contains("x-tenant: a\r\n"), "{head}");
            let body = &req[end + 4..];
            let msg = if grpc {
                assert!(head.starts_with(&format!("POST {OTLP_GRPC_PATH} HTTP/1.1\r\n")));
                assert!(head.contains("content-type: application/grpc\r\n"));
                assert_eq!(body[0], 0);
                assert_eq!(
                    u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize,
                    body.len() - 5
                );
                &body[5..]
            } else {
                assert!(head.starts_with("POST /v1/traces HTTP/1.1\r\n"));
                assert!(head.contains("content-type: application/x-protobuf\r\n"));
                body
            };
            let r = pb::ExportTraceServiceRequest::decode(msg).unwrap();
            let rs = &r.resource_spans[0];
            let attr = &rs.resource.as_ref().unwrap().attributes[0];
            assert_eq!(attr.key, "service.name");
            let s = &rs.scope_spans[0].spans[0];
            assert_eq!(s.trace_id, vec![0xab; 16]);
            assert_eq!(s.parent_span_id, vec![9; 8]);
            assert_eq!(s.kind, pb::SPAN_KIND_SERVER);
            assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 2_500_000);
            assert_eq!(s.status.as_ref().unwrap().code, pb::STATUS_CODE_ERROR);
            // Cut to maxTagLength.
            assert_eq!(
                s.attributes[0].value.as_ref().unwrap().value,
                Some(pb::any_value::Value::StringValue("http://e".into()))
            );
        }
    }

    #[test]
    fn zipkin_export_is_v2_json() {
        let p = provider(Protocol::Zipkin {
            path: "/api/v2/spans".into(),
            trace_id_64: false,
        });
        let mut odd = span(None);
        odd.tags.push("q", "a\"b\\\n");
        let req = export_request(
            &p,
            &local(),
            &[Item::Span(odd), Item::Span(span(Some([9; 8])))],
        );
        let text = String::from_utf8(req.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /api/v2/spans HTTP/1.1\r\n"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v[0]["traceId"], "ab".repeat(16));
        assert_eq!(v[0]["id"], "0102030405060708");
        assert!(v[0].get("parentId").is_none());
        assert_eq!(v[1]["parentId"], "09".repeat(8));
        assert_eq!(v[0]["kind"], "SERVER");
        assert_eq!(v[0]["timestamp"], 1_000_000);
        assert_eq!(v[0]["duration"], 2_500);
        assert_eq!(v[0]["localEndpoint"]["serviceName"], "wp.app");
        assert_eq!(v[0]["remoteEndpoint"]["ipv4"], "10.1.0.7");
        assert_eq!(v[0]["tags"]["http.url"], "http://e");
        assert_eq!(v[0]["tags"]["q"], "a\"b\\\n", "escaped as JSON");
        let p64 = provider(Protocol::Zipkin {
            path: "/api/v2/spans".into(),
            trace_id_64: true,
        });
        let req = export_request(&p64, &local(), &[Item::Span(span(None))]);
        let text = String::from_utf8(req.to_vec()).unwrap();
        assert!(text.contains(&format!("\"traceId\":\"{}\"", "ab".repeat(8))));
    }

    /// B3 (a Zipkin provider): a request without a `traceparent` continues its B3 context
    /// (multi-header or single `b3`, 128- or 64-bit trace ids, its stated decision over
    /// the draw); a `traceparent` of its own wins; the request leaves with the waypoint
    /// span's B3 fields, once each, and the same ids in its `traceparent`.
    #[test]
    fn b3_context_is_continued_and_replaced() {
        use crate::http1::{parse_head, trace, Parsed, RequestHead};
        let head =
            |fields: &str| match parse_head(format!("GET / HTTP/1.1\r\n{fields}\r\n").as_bytes()) {
                Parsed::Head(h, _) => h,
                _ => panic!("{fields}"),
            };
        let field = |h: &RequestHead, n: &str| {
            let all: Vec<&str> = h
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.as_str())
                .collect();
            assert!(all.len() <= 1, "{n}: {all:?}");
            all.first().map(|v| v.to_string())
        };
        let mut rng = crate::lb::SplitMix64(11);
        let none = Sampling::percent(0.0);
        // Multi-header, 128-bit, sampled: over the draw (0 %).
        let mut h = head("x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7\r\nx-b3-spanid: e457b5a2e4d86bd1\r\nx-b3-sampled: 1\r\n");
        let mut t = trace(&mut h, None, &mut rng, Some(none));
        b3(&mut h, &mut t, false);
        let (tid, sid, flags) = parse_traceparent(&t.value).unwrap();
        assert_eq!(hex(&tid), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(flags, 1);
        assert_eq!(t.span, Some(0xe457_b5a2_e4d8_6bd1));
        assert_eq!(field(&h, "traceparent").as_deref(), Some(t.value.as_str()));
        assert_eq!(field(&h, "x-b3-traceid").unwrap(), hex(&tid));
        assert_eq!(field(&h, "x-b3-spanid").unwrap(), hex(&sid));
        assert_eq!(
            field(&h, "x-b3-parentspanid").as_deref(),
            Some("e457b5a2e4d86bd1")
        );
        assert_eq!(field(&h, "x-b3-sampled").as_deref(), Some("1"));
        // Single header, 64-bit, not sampled; 64-bit ids upstream.
        let mut h = head("b3: 80f198ee56343ba8-e457b5a2e4d86bd1-0\r\n");
        let mut t = trace(&mut h, None, &mut rng, Some(Sampling::percent(100.0)));
        b3(&mut h, &mut t, true);
        let (tid, _, flags) = parse_traceparent(&t.value).unwrap();
        assert_eq!(hex(&tid), "000000000000000080f198ee56343ba8");
        assert_eq!(flags, 0);
        assert_eq!(field(&h, "b3"), None);
        assert_eq!(
            field(&h, "x-b3-traceid").as_deref(),
            Some("80f198ee56343ba8")
        );
        assert_eq!(field(&h, "x-b3-sampled").as_deref(), Some("0"));
        // A decision only: a new root, as stated.
        let mut h = head("b3: 0\r\n");
        let mut t = trace(&mut h, None, &mut rng, Some(Sampling::percent(100.0)));
        b3(&mut h, &mut t, false);
        assert_eq!(
            (parse_traceparent(&t.value).unwrap().2, t.span),
            (0, Some(0))
        );
        assert_eq!(field(&h, "x-b3-parentspanid"), None);
        // A traceparent of its own wins over B3.
        let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = head(&format!("traceparent: {w3c}\r\nx-b3-traceid: 80f198ee56343ba8\r\nx-b3-spanid: e457b5a2e4d86bd1\r\n"));
        let mut t = trace(&mut h, None, &mut rng, Some(none));
        b3(&mut h, &mut t, false);
        assert_eq!(
            hex(&parse_traceparent(&t.value).unwrap().0),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(t.span, Some(0x00f0_67aa_0ba9_02b7));
        assert_eq!(
            field(&h, "x-b3-traceid").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            field(&h, "x-b3-parentspanid").as_deref(),
            Some("00f067aa0ba902b7")
        );
        // Bad B3 ids: ignored (a new trace), the fields replaced.
        let mut h = head("x-b3-traceid: nothex\r\nx-b3-spanid: e457b5a2e4d86bd1\r\n");
        let mut t = trace(&mut h, None, &mut rng, Some(none));
        b3(&mut h, &mut t, false);
        assert_eq!(t.span, Some(0));
        assert_ne!(field(&h, "x-b3-traceid").as_deref(), Some("nothex"));
    }

    #[test]
    fn an_export_is_taken_on_2xx_and_grpc_status_0() {
        let http = provider(Protocol::OtlpHttp {
            path: "/v1/traces".into(),
        });
        let grpc = provider(Protocol::OtlpGrpc);
        assert!(accepted(
            &http,
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(accepted(&http, b"HTTP/1.1 202 Accepted\r\n\r\n"));
        assert!(!accepted(
            &http,
            b"HTTP/1.1 503 Service Unavailable\r\n\r\n"
        ));
        assert!(!accepted(&http, b"garbage"));
        assert!(accepted(
            &grpc,
            b"HTTP/1.1 200 OK\r\ngrpc-status: 0\r\n\r\n"
        ));
        assert!(!accepted(
            &grpc,
            b"HTTP/1.1 200 OK\r\ngrpc-status: 14\r\n\r\n"
        ));
        assert!(!accepted(&grpc, b"HTTP/1.1 200 OK\r\n\r\n"));
    }
}
