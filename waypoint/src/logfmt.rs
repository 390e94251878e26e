//! Envoy's access-log formats, as Istio's `envoyFileAccessLog` provider and MeshConfig
//! `accessLogFormat` / `accessLogEncoding` take them: a format string of command operators
//! (`%REQ(:METHOD)%`, `%RESPONSE_CODE%`, …) or a JSON object whose values are such strings.
//! A format is compiled once, at config load ([`Format::text`], [`Format::json`]); each
//! request's line is rendered from its [`Fields`] ([`Format::render`]).
//!
//! The grammar and the values are those of Envoy's substitution formatter:
//! * `%NAME%`, `%NAME(ARG)%`, `%NAME(ARG):N%` (at most N characters, where Envoy takes a
//!   length: the header operators, `PATH`, `ENVIRONMENT`), `%%` a literal `%`. Anything
//!   else is an error naming the operator and its byte offset, and so is an operator whose
//!   data this waypoint does not keep (metadata, filter state, CEL, TLS details, local
//!   time…): a format is rejected whole at config load, never half-rendered.
//! * A missing value is `-` in a text line (nothing with `omitEmptyValues`); a header
//!   that is present but empty is empty, and its alternative (`X?Y`) is not looked at.
//! * JSON: a value that is exactly one operator is typed as Envoy types it (numbers for
//!   codes, byte counts, durations, ports, ids; `null` when missing, left out with
//!   `omitEmptyValues`); any other format string is a string; the configuration's numbers,
//!   booleans and `null`s are kept. Keys are sorted; one object per line.
//! * `START_TIME` is UTC, by default `%Y-%m-%dT%H:%M:%E3SZ`, else `strftime`'s
//!   conversions with Envoy's `%s`, `%f`, `%1f`…`%9f` (truncated) and absl's `%E<n>S`,
//!   `%E*S`.
//!
//! Operators are compiled into an enum; rendering borrows every value from the request
//! and formats numbers, addresses and times on the stack, appending to the caller's
//! buffer: a line allocates nothing beyond that buffer's growth.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Istio's default text format (`EnvoyTextLogFormat`, Istio 1.9 onwards).
pub const ISTIO_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON format (`EnvoyJSONLogFormatIstio`): key → format string.
pub const ISTIO_JSON: &[(&str, &str)] = &[
    ("authority", "%REQ(:AUTHORITY)%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("duration", "%DURATION%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("route_name", "%ROUTE_NAME%"),
    ("start_time", "%START_TIME%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
];

/// A request's or response's fields, by lower-case name. A request's also answers the
/// pseudo-headers `:method`, `:path` (with the query), `:authority` and `:scheme`.
pub trait HeaderLookup {
    fn header(&self, lower_name: &str) -> Option<&str>;
}

/// No fields (a response the waypoint did not see, say).
pub struct NoHeaders;

impl HeaderLookup for NoHeaders {
    fn header(&self, _: &str) -> Option<&str> {
        None
    }
}

/// What one request's line is made of. `None` (or an empty text) is a value the request
/// does not have: `-` in a text line, `null` in a JSON one (left out with `omitEmptyValues`).
/// An address with port 0 has no known port: its `%…_ADDRESS%` is the bare IP, its
/// `%…_PORT%` missing.
pub struct Fields<'a> {
    /// When its first byte came.
    pub start: SystemTime,
    /// `%DURATION%`: first request byte to last response byte.
    pub duration: Duration,
    /// `%REQUEST_DURATION%`: first to last request byte.
    pub request_duration: Option<Duration>,
    /// `%RESPONSE_DURATION%`: first request byte to the upstream's first response byte.
    pub response_duration: Option<Duration>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    /// `0`: no response was sent.
    pub status: u16,
    /// Envoy's short response flags, `-` for none.
    pub flags: &'a str,
    /// `%RESPONSE_CODE_DETAILS%` (`via_upstream`, `rbac_access_denied_matched_policy[…]`…).
    pub details: Option<&'a str>,
    pub connection_termination: Option<&'a str>,
    pub transport_failure: Option<&'a str>,
    /// Body bytes (Envoy's `BYTES_RECEIVED` / `BYTES_SENT`).
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub request: &'a dyn HeaderLookup,
    pub response: &'a dyn HeaderLookup,
    pub upstream_host: Option<SocketAddr>,
    /// `outbound|port||host`.
    pub upstream_cluster: Option<&'a str>,
    pub upstream_local: Option<SocketAddr>,
    pub upstream_peer_uri_san: Option<&'a str>,
    pub upstream_attempts: Option<u32>,
    /// The address the client called (for a waypoint: the tunnel's target).
    pub downstream_local: SocketAddr,
    /// The original client (`forwarded: for=`, else the peer), and the peer itself.
    pub downstream_remote: SocketAddr,
    pub downstream_direct_remote: SocketAddr,
    pub downstream_peer_uri_san: Option<&'a str>,
    pub downstream_local_uri_san: Option<&'a str>,
    pub requested_server_name: Option<&'a str>,
    pub route_name: Option<&'a str>,
    pub connection_id: u64,
    /// 32 hex digits.
    pub trace_id: Option<&'a str>,
}

/// A compiled format.
#[derive(Debug, Clone, PartialEq)]
pub struct Format {
    body: Body,
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    /// One line's pieces, its final newline included.
    Text(Vec<Piece>),
    /// The top object's members, sorted by key.
    Json(Vec<Member>),
}

/// A JSON object's member: its key already written as JSON (`"key":`), and its value.
#[derive(Debug, Clone, PartialEq)]
struct Member {
    key: Box<[u8]>,
    value: Node,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// A format string that is exactly one operator: a number, a string or `null`, as
    /// Envoy types it.
    Typed(Op),
    /// Any other format string (literal text, or text and operators): a JSON string.
    Text(Vec<Piece>),
    /// A number, boolean or `null` of the configuration, serialized once.
    Raw(Box<str>),
    Object(Vec<Member>),
    Array(Vec<Node>),
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(Box<str>),
    Op(Op),
}

/// One command operator.
#[derive(Debug, Clone, PartialEq)]
struct Op {
    kind: Kind,
    /// `:N`: at most this many characters of the value (only where Envoy takes a length).
    max_len: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    StartTime(Vec<Tf>),
    /// `REQ`, `RESP`, `REQ_WITHOUT_QUERY`: `main`, else `alt` (both lower case).
    Header {
        from: Headers,
        main: Box<str>,
        alt: Option<Box<str>>,
        strip_query: bool,
    },
    /// `TRAILER`: no trailers are kept, so always missing.
    Trailer,
    Path {
        with_query: bool,
        from: PathFrom,
    },
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseFlagsLong,
    ResponseCodeDetails {
        keep_whitespace: bool,
    },
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    RequestDuration,
    ResponseDuration,
    ResponseTxDuration,
    Address {
        of: Addr,
        part: AddrPart,
    },
    UpstreamCluster,
    UpstreamPeerUriSan,
    UpstreamRequestAttemptCount,
    DownstreamPeerUriSan,
    DownstreamLocalUriSan,
    RequestedServerName {
        order: SniOrder,
        host: HostFrom,
    },
    RouteName,
    ConnectionId,
    TraceId,
    /// Read once, when the format is compiled.
    Hostname(Option<Box<str>>),
    /// Read (and truncated) once, when the format is compiled; `-` when unset.
    Environment(Box<str>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Headers {
    Request,
    Response,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PathFrom {
    /// `x-envoy-original-path`.
    Orig,
    /// `:path`.
    Path,
    OrigOrPath,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SniOrder {
    SniOnly,
    SniFirst,
    HostFirst,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum HostFrom {
    /// `x-envoy-original-host`.
    Orig,
    /// `:authority`.
    Host,
    OrigOrHost,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Addr {
    UpstreamHost,
    UpstreamLocal,
    DownstreamLocal,
    DownstreamRemote,
    DownstreamDirectRemote,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AddrPart {
    /// `10.0.0.1:80`, `[::1]:80`.
    WithPort,
    /// `10.0.0.1`, `::1`.
    Ip,
    Port,
}

/// One piece of a `START_TIME` format, the time in UTC.
#[derive(Debug, Clone, PartialEq)]
enum Tf {
    Lit(Box<str>),
    /// `%Y`
    Year,
    /// `%y`
    Year2,
    /// `%C`
    Century,
    /// `%m`
    Month,
    /// `%d`
    Day,
    /// `%e`: space-padded.
    DaySpace,
    /// `%j`
    DayOfYear,
    /// `%H`
    Hour,
    /// `%I`
    Hour12,
    /// `%M`
    Minute,
    /// `%S`
    Second,
    /// `%p`
    AmPm,
    /// `%a`
    WeekdayAbbr,
    /// `%A`
    WeekdayName,
    /// `%b`, `%h`
    MonthAbbr,
    /// `%B`
    MonthName,
    /// `%u`: 1 (Monday) to 7.
    WeekdayFromMonday,
    /// `%w`: 0 (Sunday) to 6.
    WeekdayFromSunday,
    /// `%s`
    Epoch,
    /// `%f` (9 digits), `%1f`…`%9f`: fractional seconds, truncated.
    Frac(u8),
    /// `%E<n>S`: seconds and `n` fraction digits (`%E0S`: none, no dot).
    SecondsFrac(u8),
    /// `%E*S`: seconds and as many fraction digits as the time has.
    SecondsFracAll,
}

/// Envoy's `START_TIME` default.
const DEFAULT_TIME: &str = "%Y-%m-%dT%H:%M:%E3SZ";

impl Format {
    /// A format string (Istio adds a final newline when it has none).
    pub fn text(s: &str) -> Result<Format, String> {
        let mut pieces = parse(s)?;
        if !s.ends_with('\n') {
            match pieces.last_mut() {
                Some(Piece::Lit(lit)) => *lit = format!("{lit}\n").into(),
                _ => pieces.push(Piece::Lit("\n".into())),
            }
        }
        Ok(Format {
            body: Body::Text(pieces),
        })
    }

    /// A format string as it is, no newline added: an OpenTelemetry log's body or one of
    /// its attributes (Istio's `envoyOtelAls`).
    pub fn value(s: &str) -> Result<Format, String> {
        Ok(Format {
            body: Body::Text(parse(s)?),
        })
    }

    /// A JSON object: key → format string (nested objects allowed; numbers and booleans
    /// kept as they are).
    pub fn json(labels: &serde_json::Map<String, serde_json::Value>) -> Result<Format, String> {
        Ok(Format {
            body: Body::Json(members(labels, "")?),
        })
    }

    /// [`ISTIO_TEXT`], compiled.
    pub fn istio_text() -> Format {
        Format::text(ISTIO_TEXT).expect("ISTIO_TEXT compiles")
    }

    /// [`ISTIO_JSON`], compiled.
    pub fn istio_json() -> Format {
        let labels = ISTIO_JSON
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        Format::json(&labels).expect("ISTIO_JSON compiles")
    }

    /// Appends the line (with its newline) to `out`.
    pub fn render(&self, f: &Fields<'_>, omit_empty: bool, out: &mut Vec<u8>) {
        match &self.body {
            Body::Text(pieces) => render_text(pieces, f, omit_empty, false, out),
            Body::Json(members) => {
                render_object(members, f, omit_empty, out);
                out.push(b'\n');
            }
        }
    }
}

// ---- Compiling ----

/// A format string's pieces: literal text, `%%` as `%`, and operators.
fn parse(s: &str) -> Result<Vec<Piece>, String> {
    let b = s.as_bytes();
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            let end = s[i..].find('%').map_or(b.len(), |n| i + n);
            lit.push_str(&s[i..end]);
            i = end;
        } else if b.get(i + 1) == Some(&b'%') {
            lit.push('%');
            i += 2;
        } else {
            let (op, end) = operator(s, i)?;
            if !lit.is_empty() {
                pieces.push(Piece::Lit(std::mem::take(&mut lit).into()));
            }
            pieces.push(Piece::Op(op));
            i = end;
        }
    }
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit.into()));
    }
    Ok(pieces)
}

/// The operator at byte `at` (a `%`): `%NAME%`, `%NAME(ARG)%`, `%NAME:N%` or
/// `%NAME(ARG):N%` (Envoy's grammar: NAME of `A-Z 0-9 _`, ARG without `)`), and the byte
/// after it.
fn operator(s: &str, at: usize) -> Result<(Op, usize), String> {
    let b = s.as_bytes();
    let mut i = at + 1;
    while i < b.len() && (b[i].is_ascii_uppercase() || b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    let name = &s[at + 1..i];
    if name.is_empty() {
        return Err(format!(
            "byte {at}: '%' does not start an operator (%NAME%, %NAME(ARG)%, %NAME(ARG):N%; \
             a literal '%' is written %%)"
        ));
    }
    let mut arg = None;
    if b.get(i) == Some(&b'(') {
        let Some(len) = s[i + 1..].find(')') else {
            return Err(format!(
                "%{name}( at byte {at}: the argument has no closing ')'"
            ));
        };
        arg = Some(&s[i + 1..i + 1 + len]);
        i += len + 2;
    }
    let mut max_len = None;
    if b.get(i) == Some(&b':') {
        let digits_at = i + 1;
        i = digits_at;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[digits_at..i];
        if digits.is_empty() {
            return Err(format!(
                "%{name}% at byte {at}: ':' must be followed by a maximum length (digits)"
            ));
        }
        let n = digits
            .parse::<usize>()
            .map_err(|_| format!("%{name}% at byte {at}: maximum length {digits} is too large"))?;
        max_len = Some(n);
    }
    if b.get(i) != Some(&b'%') {
        return Err(format!("%{name} at byte {at} is not closed by '%'"));
    }
    let op = compile(name, arg.filter(|a| !a.is_empty()), max_len)
        .map_err(|e| format!("%{name}% at byte {at}: {e}"))?;
    Ok((op, i + 1))
}

fn compile(name: &str, arg: Option<&str>, max_len: Option<usize>) -> Result<Op, String> {
    let kind = match name {
        "REQ" | "REQUEST_HEADER" => return header(Headers::Request, false, arg, max_len),
        "REQ_WITHOUT_QUERY" => return header(Headers::Request, true, arg, max_len),
        "RESP" | "RESPONSE_HEADER" => return header(Headers::Response, false, arg, max_len),
        "TRAILER" | "RESPONSE_TRAILER" => {
            header_names(required(arg)?)?;
            return Ok(Op {
                kind: Kind::Trailer,
                max_len,
            });
        }
        "PATH" => {
            return Ok(Op {
                kind: path(arg)?,
                max_len,
            })
        }
        "ENVIRONMENT" => {
            let key = required(arg)?;
            let value = match std::env::var_os(key) {
                Some(v) => truncated(&v.to_string_lossy(), max_len).into(),
                None => "-".into(),
            };
            Kind::Environment(value)
        }
        "START_TIME" => {
            no_length(max_len)?;
            Kind::StartTime(time_format(arg.unwrap_or(DEFAULT_TIME))?)
        }
        "REQUESTED_SERVER_NAME" => {
            no_length(max_len)?;
            requested_server_name(arg)?
        }
        "RESPONSE_CODE_DETAILS" => {
            no_length(max_len)?;
            // Envoy reads any other argument as the default.
            Kind::ResponseCodeDetails {
                keep_whitespace: arg == Some("ALLOW_WHITESPACES"),
            }
        }
        _ => {
            let kind = plain(name)?;
            if arg.is_some() {
                return Err("takes no argument".into());
            }
            no_length(max_len)?;
            kind
        }
    };
    Ok(Op {
        kind,
        max_len: None,
    })
}

/// The operators without argument nor length.
fn plain(name: &str) -> Result<Kind, String> {
    use Addr::*;
    use AddrPart::*;
    let address = |of, part| Kind::Address { of, part };
    Ok(match name {
        "PROTOCOL" => Kind::Protocol,
        "RESPONSE_CODE" => Kind::ResponseCode,
        "RESPONSE_FLAGS" => Kind::ResponseFlags,
        "RESPONSE_FLAGS_LONG" => Kind::ResponseFlagsLong,
        "CONNECTION_TERMINATION_DETAILS" => Kind::ConnectionTerminationDetails,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Kind::UpstreamTransportFailureReason,
        "BYTES_RECEIVED" => Kind::BytesReceived,
        "BYTES_SENT" => Kind::BytesSent,
        "DURATION" => Kind::Duration,
        "REQUEST_DURATION" => Kind::RequestDuration,
        "RESPONSE_DURATION" => Kind::ResponseDuration,
        "RESPONSE_TX_DURATION" => Kind::ResponseTxDuration,
        "UPSTREAM_HOST" | "UPSTREAM_REMOTE_ADDRESS" => address(UpstreamHost, WithPort),
        "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => address(UpstreamHost, Ip),
        "UPSTREAM_REMOTE_PORT" => address(UpstreamHost, Port),
        "UPSTREAM_LOCAL_ADDRESS" => address(UpstreamLocal, WithPort),
        "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => address(UpstreamLocal, Ip),
        "UPSTREAM_LOCAL_PORT" => address(UpstreamLocal, Port),
        "DOWNSTREAM_LOCAL_ADDRESS" => address(DownstreamLocal, WithPort),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => address(DownstreamLocal, Ip),
        "DOWNSTREAM_LOCAL_PORT" => address(DownstreamLocal, Port),
        "DOWNSTREAM_REMOTE_ADDRESS" => address(DownstreamRemote, WithPort),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => address(DownstreamRemote, Ip),
        "DOWNSTREAM_REMOTE_PORT" => address(DownstreamRemote, Port),
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => address(DownstreamDirectRemote, WithPort),
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => address(DownstreamDirectRemote, Ip),
        "DOWNSTREAM_DIRECT_REMOTE_PORT" => address(DownstreamDirectRemote, Port),
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Kind::UpstreamCluster,
        "UPSTREAM_PEER_URI_SAN" => Kind::UpstreamPeerUriSan,
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => Kind::UpstreamRequestAttemptCount,
        "DOWNSTREAM_PEER_URI_SAN" => Kind::DownstreamPeerUriSan,
        "DOWNSTREAM_LOCAL_URI_SAN" => Kind::DownstreamLocalUriSan,
        "ROUTE_NAME" => Kind::RouteName,
        "CONNECTION_ID" => Kind::ConnectionId,
        "TRACE_ID" => Kind::TraceId,
        "HOSTNAME" => Kind::Hostname(hostname()),
        _ if unprovided(name) => return Err("not supported by this waypoint".into()),
        _ => return Err("unknown operator".into()),
    })
}

/// Envoy operators whose data this waypoint does not have (metadata, filter state, CEL,
/// TLS details, wire byte counts, local time…): named as such rather than as unknown.
fn unprovided(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "DYNAMIC_METADATA",
        "CLUSTER_METADATA",
        "UPSTREAM_METADATA",
        "METADATA",
        "FILTER_STATE",
        "UPSTREAM_FILTER_STATE",
        "PER_REQUEST_STATE",
        "CEL",
        "TYPED_CEL",
        "START_TIME_LOCAL",
        "EMIT_TIME",
        "EMIT_TIME_LOCAL",
        "LOCAL_REPLY_BODY",
        "GRPC_STATUS",
        "GRPC_STATUS_NUMBER",
        "UNIQUE_ID",
        "STREAM_ID",
        "COALESCE",
        "QUERY_PARAM",
        "CUSTOM_FLAGS",
        "ACCESS_LOG_TYPE",
        "FILTER_CHAIN_NAME",
        "VIRTUAL_CLUSTER_NAME",
        "UPSTREAM_PROTOCOL",
        "UPSTREAM_HOST_NAME",
        "UPSTREAM_HOST_NAME_WITHOUT_PORT",
        "UPSTREAM_CONNECTION_ID",
        "REQUEST_TX_DURATION",
        "ROUNDTRIP_DURATION",
        "DOWNSTREAM_HANDSHAKE_DURATION",
        "UPSTREAM_CONNECTION_POOL_READY_DURATION",
        "COMMON_DURATION",
        "REQUEST_HEADERS_BYTES",
        "RESPONSE_HEADERS_BYTES",
        "RESPONSE_TRAILERS_BYTES",
        "BYTES_RETRANSMITTED",
        "PACKETS_RETRANSMITTED",
        "TLS_JA3_FINGERPRINT",
        "TLS_JA4_FINGERPRINT",
    ];
    // Families: the supported members are matched before this is asked.
    const PREFIXES: &[&str] = &[
        "UPSTREAM_WIRE_",
        "UPSTREAM_HEADER_",
        "UPSTREAM_DECOMPRESSED_",
        "UPSTREAM_TLS_",
        "UPSTREAM_PEER_",
        "UPSTREAM_LOCAL_",
        "UPSTREAM_REMOTE_ADDRESS_",
        "UPSTREAM_DETECTED_",
        "DOWNSTREAM_WIRE_",
        "DOWNSTREAM_HEADER_",
        "DOWNSTREAM_DECOMPRESSED_",
        "DOWNSTREAM_TLS_",
        "DOWNSTREAM_PEER_",
        "DOWNSTREAM_LOCAL_",
        "DOWNSTREAM_DIRECT_LOCAL_",
        "DOWNSTREAM_TRANSPORT_",
        "DOWNSTREAM_DETECTED_",
    ];
    NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

fn required(arg: Option<&str>) -> Result<&str, String> {
    arg.ok_or_else(|| "needs an argument".to_string())
}

fn no_length(max_len: Option<usize>) -> Result<(), String> {
    match max_len {
        Some(_) => Err("takes no maximum length".into()),
        None => Ok(()),
    }
}

fn header(
    from: Headers,
    strip_query: bool,
    arg: Option<&str>,
    max_len: Option<usize>,
) -> Result<Op, String> {
    let (main, alt) = header_names(required(arg)?)?;
    Ok(Op {
        kind: Kind::Header {
            from,
            main,
            alt,
            strip_query,
        },
        max_len,
    })
}

/// `X` or `X?Y`, lower-cased.
fn header_names(arg: &str) -> Result<(Box<str>, Option<Box<str>>), String> {
    let mut names = arg.split('?');
    let main = names.next().unwrap_or_default();
    let alt = names.next().filter(|a| !a.is_empty());
    if names.next().is_some() {
        return Err(format!(
            "more than one alternative header in {arg:?} (X or X?Y)"
        ));
    }
    Ok((header_name(main)?, alt.map(header_name).transpose()?))
}

fn header_name(name: &str) -> Result<Box<str>, String> {
    let token = name.strip_prefix(':').unwrap_or(name);
    let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    if token.is_empty() || !token.bytes().all(tchar) {
        return Err(format!("{name:?} is not a header name"));
    }
    Ok(name.to_ascii_lowercase().into())
}

/// `PATH(X:Y)`: X `WQ` (with the query, the default) or `NQ`; Y `ORIG`, `PATH` or
/// `ORIG_OR_PATH` (the default).
fn path(arg: Option<&str>) -> Result<Kind, String> {
    let (query, from) = two_args(arg)?;
    let with_query = match query {
        "" | "WQ" => true,
        "NQ" => false,
        other => return Err(format!("{other:?} is not WQ or NQ")),
    };
    let from = match from {
        "" | "ORIG_OR_PATH" => PathFrom::OrigOrPath,
        "ORIG" => PathFrom::Orig,
        "PATH" => PathFrom::Path,
        other => return Err(format!("{other:?} is not ORIG, PATH or ORIG_OR_PATH")),
    };
    Ok(Kind::Path { with_query, from })
}

/// `REQUESTED_SERVER_NAME(X:Y)`: X `SNI_ONLY` (the default), `SNI_FIRST` or
/// `HOST_FIRST`; Y `ORIG`, `HOST` or `ORIG_OR_HOST` (the default).
fn requested_server_name(arg: Option<&str>) -> Result<Kind, String> {
    let (order, host) = two_args(arg)?;
    let order = match order {
        "" | "SNI_ONLY" => SniOrder::SniOnly,
        "SNI_FIRST" => SniOrder::SniFirst,
        "HOST_FIRST" => SniOrder::HostFirst,
        other => {
            return Err(format!(
                "{other:?} is not SNI_ONLY, SNI_FIRST or HOST_FIRST"
            ))
        }
    };
    let host = match host {
        "" | "ORIG_OR_HOST" => HostFrom::OrigOrHost,
        "ORIG" => HostFrom::Orig,
        "HOST" => HostFrom::Host,
        other => return Err(format!("{other:?} is not ORIG, HOST or ORIG_OR_HOST")),
    };
    Ok(Kind::RequestedServerName { order, host })
}

fn two_args(arg: Option<&str>) -> Result<(&str, &str), String> {
    let Some(arg) = arg else {
        return Ok(("", ""));
    };
    let mut parts = arg.split(':');
    let first = parts.next().unwrap_or_default();
    let second = parts.next().unwrap_or_default();
    if parts.next().is_some() {
        return Err(format!("{arg:?} has more than two parts (X or X:Y)"));
    }
    Ok((first, second))
}

/// The machine's host name, as `%HOSTNAME%` shows it.
fn hostname() -> Option<Box<str>> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let name = kernel
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|n| !n.is_empty()))?;
    Some(name.into())
}

/// A `START_TIME` format (`strftime`'s, with Envoy's `%s`, `%f`, `%<n>f` and absl's
/// `%E<n>S`, `%E*S`).
fn time_format(s: &str) -> Result<Vec<Tf>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            lit.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            return Err(format!("time format {s:?} ends in a lone '%'"));
        };
        let tf = match spec {
            '%' | 't' | 'z' | 'Z' => {
                lit.push_str(match spec {
                    '%' => "%",
                    't' => "\t",
                    'z' => "+0000",
                    _ => "UTC",
                });
                continue;
            }
            'T' | 'F' | 'D' | 'R' => {
                let expansion = match spec {
                    'T' => "%H:%M:%S",
                    'F' => "%Y-%m-%d",
                    'D' => "%m/%d/%y",
                    _ => "%H:%M",
                };
                for tf in time_format(expansion)? {
                    push_tf(&mut out, &mut lit, tf);
                }
                continue;
            }
            'n' => {
                return Err(format!(
                    "time format {s:?}: %n (a newline) is not allowed, as in Envoy"
                ))
            }
            'Y' => Tf::Year,
            'y' => Tf::Year2,
            'C' => Tf::Century,
            'm' => Tf::Month,
            'd' => Tf::Day,
            'e' => Tf::DaySpace,
            'j' => Tf::DayOfYear,
            'H' => Tf::Hour,
            'I' => Tf::Hour12,
            'M' => Tf::Minute,
            'S' => Tf::Second,
            'p' => Tf::AmPm,
            'a' => Tf::WeekdayAbbr,
            'A' => Tf::WeekdayName,
            'b' | 'h' => Tf::MonthAbbr,
            'B' => Tf::MonthName,
            'u' => Tf::WeekdayFromMonday,
            'w' => Tf::WeekdayFromSunday,
            's' => Tf::Epoch,
            'f' => Tf::Frac(9),
            '1'..='9' if chars.clone().next() == Some('f') => {
                chars.next();
                Tf::Frac(digit(spec))
            }
            'E' => {
                let mut ahead = chars.clone();
                match (ahead.next(), ahead.next()) {
                    (Some('*'), Some('S')) => {
                        chars = ahead;
                        Tf::SecondsFracAll
                    }
                    (Some(d @ '0'..='9'), Some('S')) => {
                        chars = ahead;
                        Tf::SecondsFrac(digit(d))
                    }
                    _ => {
                        return Err(format!(
                            "time format {s:?}: %E must be followed by <digit>S or *S"
                        ))
                    }
                }
            }
            other => {
                return Err(format!(
                    "time format {s:?}: %{other} is not a known conversion"
                ))
            }
        };
        push_tf(&mut out, &mut lit, tf);
    }
    if !lit.is_empty() {
        out.push(Tf::Lit(lit.into()));
    }
    Ok(out)
}

fn digit(c: char) -> u8 {
    c.to_digit(10)
        .and_then(|d| u8::try_from(d).ok())
        .unwrap_or(0)
}

/// Appends `tf`, literal text joining the pending literal.
fn push_tf(out: &mut Vec<Tf>, lit: &mut String, tf: Tf) {
    match tf {
        Tf::Lit(s) => lit.push_str(&s),
        tf => {
            if !lit.is_empty() {
                out.push(Tf::Lit(std::mem::take(lit).into()));
            }
            out.push(tf);
        }
    }
}

fn members(
    map: &serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Result<Vec<Member>, String> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let here = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            let mut key = Vec::with_capacity(k.len() + 3);
            key.push(b'"');
            escape_json(&mut key, k);
            key.extend_from_slice(b"\":");
            Ok(Member {
                key: key.into(),
                value: node(&map[k], &here)?,
            })
        })
        .collect()
}

fn node(value: &serde_json::Value, path: &str) -> Result<Node, String> {
    use serde_json::Value;
    Ok(match value {
        Value::String(s) => {
            let pieces = parse(s).map_err(|e| format!("key {path:?}: {e}"))?;
            match <[Piece; 1]>::try_from(pieces) {
                Ok([Piece::Op(op)]) => Node::Typed(op),
                Ok([lit]) => Node::Text(vec![lit]),
                Err(pieces) => Node::Text(pieces),
            }
        }
        Value::Object(map) => Node::Object(members(map, path)?),
        Value::Array(items) => Node::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| node(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        literal => Node::Raw(literal.to_string().into()),
    })
}

/// The first `max_len` characters of `s`.
fn truncated(s: &str, max_len: Option<usize>) -> &str {
    match max_len.and_then(|n| s.char_indices().nth(n)) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

// ---- Rendering ----

/// An operator's value for one request, borrowed from the request and the format.
enum Val<'a> {
    Missing,
    Str(&'a str),
    /// Written with each whitespace character (or each space only) as `_`.
    Underscored {
        s: &'a str,
        spaces_only: bool,
    },
    /// Short response flags, written as their long names.
    FlagsLong(&'a str),
    Num(u64),
    Addr(SocketAddr),
    Ip(IpAddr),
    Time(&'a [Tf], SystemTime),
}

/// `None` and `""` alike are missing.
fn text_val(s: Option<&str>) -> Val<'_> {
    match s {
        Some(s) if !s.is_empty() => Val::Str(s),
        _ => Val::Missing,
    }
}

/// Whole milliseconds, as Envoy truncates them.
fn millis(d: Option<Duration>) -> Val<'static> {
    match d {
        Some(d) => Val::Num(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => Val::Missing,
    }
}

fn without_query(s: &str) -> &str {
    s.find('?').map_or(s, |q| &s[..q])
}

impl Op {
    fn value<'a>(&'a self, f: &Fields<'a>) -> Val<'a> {
        let non_empty = |v: Option<&'a str>| v.filter(|v| !v.is_empty());
        match &self.kind {
            Kind::StartTime(tf) => Val::Time(tf, f.start),
            Kind::Header {
                from,
                main,
                alt,
                strip_query,
            } => {
                let headers = match from {
                    Headers::Request => f.request,
                    Headers::Response => f.response,
                };
                let value = match headers.header(main) {
                    None => alt.as_deref().and_then(|alt| headers.header(alt)),
                    found => found,
                };
                match value {
                    Some(v) if *strip_query => Val::Str(without_query(v)),
                    Some(v) => Val::Str(v),
                    None => Val::Missing,
                }
            }
            Kind::Trailer => Val::Missing,
            Kind::Path { with_query, from } => {
                let orig = || non_empty(f.request.header("x-envoy-original-path"));
                let path = || non_empty(f.request.header(":path"));
                let found = match from {
                    PathFrom::Orig => orig(),
                    PathFrom::Path => path(),
                    PathFrom::OrigOrPath => orig().or_else(path),
                };
                match found {
                    Some(p) if *with_query => Val::Str(p),
                    Some(p) => Val::Str(without_query(p)),
                    None => Val::Missing,
                }
            }
            Kind::Protocol => text_val(Some(f.protocol)),
            Kind::ResponseCode => Val::Num(f.status.into()),
            Kind::ResponseFlags => text_val(Some(f.flags)),
            Kind::ResponseFlagsLong => match text_val(Some(f.flags)) {
                Val::Str(flags) => Val::FlagsLong(flags),
                other => other,
            },
            Kind::ResponseCodeDetails { keep_whitespace } => match non_empty(f.details) {
                Some(s) if !keep_whitespace => Val::Underscored {
                    s,
                    spaces_only: false,
                },
                found => text_val(found),
            },
            Kind::ConnectionTerminationDetails => text_val(f.connection_termination),
            Kind::UpstreamTransportFailureReason => match non_empty(f.transport_failure) {
                Some(s) => Val::Underscored {
                    s,
                    spaces_only: true,
                },
                None => Val::Missing,
            },
            Kind::BytesReceived => Val::Num(f.bytes_received),
            Kind::BytesSent => Val::Num(f.bytes_sent),
            Kind::Duration => millis(Some(f.duration)),
            Kind::RequestDuration => millis(f.request_duration),
            Kind::ResponseDuration => millis(f.response_duration),
            Kind::ResponseTxDuration => {
                millis(f.response_duration.and_then(|r| f.duration.checked_sub(r)))
            }
            Kind::Address { of, part } => {
                let addr = match of {
                    Addr::UpstreamHost => f.upstream_host,
                    Addr::UpstreamLocal => f.upstream_local,
                    Addr::DownstreamLocal => Some(f.downstream_local),
                    Addr::DownstreamRemote => Some(f.downstream_remote),
                    Addr::DownstreamDirectRemote => Some(f.downstream_direct_remote),
                };
                // Port 0: the port is not known (HBONE does not carry the original
                // client's), so it is left out rather than shown as Envoy's `:0`.
                match (addr, part) {
                    (None, _) => Val::Missing,
                    (Some(a), AddrPart::Port) if a.port() == 0 => Val::Missing,
                    (Some(a), AddrPart::WithPort) if a.port() == 0 => Val::Ip(a.ip()),
                    (Some(a), AddrPart::WithPort) => Val::Addr(a),
                    (Some(a), AddrPart::Ip) => Val::Ip(a.ip()),
                    (Some(a), AddrPart::Port) => Val::Num(a.port().into()),
                }
            }
            Kind::UpstreamCluster => text_val(f.upstream_cluster),
            Kind::UpstreamPeerUriSan => text_val(f.upstream_peer_uri_san),
            // Envoy: 0 when the request never went upstream.
            Kind::UpstreamRequestAttemptCount => Val::Num(f.upstream_attempts.unwrap_or(0).into()),
            Kind::DownstreamPeerUriSan => text_val(f.downstream_peer_uri_san),
            Kind::DownstreamLocalUriSan => text_val(f.downstream_local_uri_san),
            Kind::RequestedServerName { order, host: from } => {
                let sni = non_empty(f.requested_server_name);
                let orig = || non_empty(f.request.header("x-envoy-original-host"));
                let authority = || non_empty(f.request.header(":authority"));
                let host = || match from {
                    HostFrom::Orig => orig(),
                    HostFrom::Host => authority(),
                    HostFrom::OrigOrHost => orig().or_else(authority),
                };
                text_val(match order {
                    SniOrder::SniOnly => sni,
                    SniOrder::SniFirst => sni.or_else(host),
                    SniOrder::HostFirst => host().or(sni),
                })
            }
            Kind::RouteName => text_val(f.route_name),
            Kind::ConnectionId => Val::Num(f.connection_id),
            Kind::TraceId => text_val(f.trace_id),
            Kind::Hostname(name) => text_val(name.as_deref()),
            Kind::Environment(value) => Val::Str(value),
        }
    }
}

/// Text format pieces, or (`json`) a JSON string's contents. A missing value is `-`, or
/// nothing with `omit_empty`.
fn render_text(pieces: &[Piece], f: &Fields<'_>, omit_empty: bool, json: bool, out: &mut Vec<u8>) {
    for piece in pieces {
        match piece {
            Piece::Lit(s) if json => escape_json(out, s),
            Piece::Lit(s) => out.extend_from_slice(s.as_bytes()),
            Piece::Op(op) => match op.value(f) {
                Val::Missing if omit_empty => {}
                Val::Missing => out.push(b'-'),
                v => write_val(&v, out, json, op.max_len),
            },
        }
    }
}

/// A JSON object; with `omit_empty`, members whose operator has no value are left out.
fn render_object(members: &[Member], f: &Fields<'_>, omit_empty: bool, out: &mut Vec<u8>) {
    out.push(b'{');
    let mut first = true;
    for member in members {
        let typed = match &member.value {
            Node::Typed(op) => match op.value(f) {
                Val::Missing if omit_empty => continue,
                v => Some((op, v)),
            },
            _ => None,
        };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&member.key);
        match typed {
            Some((op, v)) => render_typed(op, &v, out),
            None => render_node(&member.value, f, omit_empty, out),
        }
    }
    out.push(b'}');
}

fn render_node(node: &Node, f: &Fields<'_>, omit_empty: bool, out: &mut Vec<u8>) {
    match node {
        Node::Typed(op) => render_typed(op, &op.value(f), out),
        Node::Text(pieces) => {
            out.push(b'"');
            render_text(pieces, f, omit_empty, true, out);
            out.push(b'"');
        }
        Node::Raw(raw) => out.extend_from_slice(raw.as_bytes()),
        Node::Object(members) => render_object(members, f, omit_empty, out),
        Node::Array(items) => {
            out.push(b'[');
            let mut first = true;
            for item in items {
                let typed = match item {
                    Node::Typed(op) => match op.value(f) {
                        Val::Missing if omit_empty => continue,
                        v => Some((op, v)),
                    },
                    _ => None,
                };
                if !first {
                    out.push(b',');
                }
                first = false;
                match typed {
                    Some((op, v)) => render_typed(op, &v, out),
                    None => render_node(item, f, omit_empty, out),
                }
            }
            out.push(b']');
        }
    }
}

/// A lone operator's JSON value: `null`, a number, or a string.
fn render_typed(op: &Op, v: &Val<'_>, out: &mut Vec<u8>) {
    match v {
        Val::Missing => out.extend_from_slice(b"null"),
        Val::Num(_) => write_val(v, out, false, None),
        _ => {
            out.push(b'"');
            write_val(v, out, true, op.max_len);
            out.push(b'"');
        }
    }
}

/// Writes a value (not [`Val::Missing`]): JSON-escaped with `json`, and no more than
/// `max_len` characters.
fn write_val(v: &Val<'_>, out: &mut Vec<u8>, json: bool, max_len: Option<usize>) {
    let mut sink = Sink {
        out,
        json,
        left: max_len,
    };
    match *v {
        Val::Missing => {}
        Val::Str(s) => sink.str(s),
        Val::Underscored { s, spaces_only } => {
            let is_space = |c: char| {
                if spaces_only {
                    c == ' '
                } else {
                    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
                }
            };
            for (i, part) in s.split(is_space).enumerate() {
                if i > 0 {
                    sink.str("_");
                }
                sink.str(part);
            }
        }
        Val::FlagsLong(flags) => {
            for (i, flag) in flags.split(',').enumerate() {
                if i > 0 {
                    sink.str(",");
                }
                sink.str(long_flag(flag));
            }
        }
        Val::Num(n) => sink.fmt(format_args!("{n}")),
        Val::Addr(SocketAddr::V4(a)) => sink.fmt(format_args!("{}:{}", a.ip(), a.port())),
        Val::Addr(SocketAddr::V6(a)) => sink.fmt(format_args!("[{}]:{}", a.ip(), a.port())),
        Val::Ip(ip) => sink.fmt(format_args!("{ip}")),
        Val::Time(tf, t) => write_time(&mut sink, tf, t),
    }
}

/// Envoy's long name of a short response flag (an unknown one as it is).
fn long_flag(short: &str) -> &str {
    match short {
        "UH" => "NoHealthyUpstream",
        "UF" => "UpstreamConnectionFailure",
        "UO" => "UpstreamOverflow",
        "NR" => "NoRouteFound",
        "URX" => "UpstreamRetryLimitExceeded",
        "NC" => "NoClusterFound",
        "DT" => "DurationTimeout",
        "DC" => "DownstreamConnectionTermination",
        "LH" => "FailedLocalHealthCheck",
        "UT" => "UpstreamRequestTimeout",
        "LR" => "LocalReset",
        "UR" => "UpstreamRemoteReset",
        "UC" => "UpstreamConnectionTermination",
        "DI" => "DelayInjected",
        "FI" => "FaultInjected",
        "RL" => "RateLimited",
        "UAEX" => "UnauthorizedExternalService",
        "RLSE" => "RateLimitServiceError",
        "IH" => "InvalidEnvoyRequestHeaders",
        "SI" => "StreamIdleTimeout",
        "DPE" => "DownstreamProtocolError",
        "UPE" => "UpstreamProtocolError",
        "UMSDR" => "UpstreamMaxStreamDurationReached",
        "RFCF" => "ResponseFromCacheFilter",
        "NFCF" => "NoFilterConfigFound",
        "OM" => "OverloadManagerTerminated",
        "DF" => "DnsResolutionFailed",
        "DO" => "DropOverload",
        "DR" => "DownstreamRemoteReset",
        "UDO" => "UnconditionalDropOverload",
        other => other,
    }
}

/// Where a value goes: escaped or not, and how many characters it may still take.
struct Sink<'o> {
    out: &'o mut Vec<u8>,
    json: bool,
    left: Option<usize>,
}

impl Sink<'_> {
    fn str(&mut self, s: &str) {
        let s = match &mut self.left {
            None => s,
            Some(0) => return,
            Some(left) => match s.char_indices().nth(*left) {
                Some((end, _)) => {
                    *left = 0;
                    &s[..end]
                }
                None => {
                    *left -= s.chars().count();
                    s
                }
            },
        };
        if self.json {
            escape_json(self.out, s);
        } else {
            self.out.extend_from_slice(s.as_bytes());
        }
    }

    /// Numbers, addresses: formatted on the stack.
    fn fmt(&mut self, args: fmt::Arguments<'_>) {
        let mut buf = StackStr::new();
        // Nothing written here is longer than the buffer (an IPv6 address with its port
        // is 47 bytes).
        if buf.write_fmt(args).is_ok() {
            self.str(buf.as_str());
        }
    }

    fn pad(&mut self, n: i64, width: usize) {
        self.fmt(format_args!("{n:0width$}"));
    }
}

struct StackStr {
    buf: [u8; 64],
    len: usize,
}

impl StackStr {
    fn new() -> StackStr {
        StackStr {
            buf: [0; 64],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `s` inside a JSON string: `"`, `\` and control characters escaped (`\u00XX`).
fn escape_json(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = s.as_bytes();
    let mut from = 0;
    for (i, &c) in b.iter().enumerate() {
        if c == b'"' || c == b'\\' || c < 0x20 {
            out.extend_from_slice(&b[from..i]);
            match c {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                _ => out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(c >> 4)],
                    HEX[usize::from(c & 15)],
                ]),
            }
            from = i + 1;
        }
    }
    out.extend_from_slice(&b[from..]);
}

// ---- Time ----

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A UTC time's calendar fields.
struct Civil {
    /// Seconds since the epoch (floor: a time before it has a negative second and a
    /// positive fraction).
    epoch: i64,
    nanos: u32,
    year: i64,
    /// 1 to 12.
    month: i64,
    /// 1 to 31.
    day: i64,
    /// 1 to 366.
    yday: i64,
    /// 0 (Sunday) to 6.
    wday: i64,
    hour: i64,
    minute: i64,
    second: i64,
}

impl Civil {
    fn of(t: SystemTime) -> Civil {
        let (epoch, nanos) = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                d.subsec_nanos(),
            ),
            Err(before) => {
                let d = before.duration();
                let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                match d.subsec_nanos() {
                    0 => (-secs, 0),
                    n => (-secs - 1, 1_000_000_000 - n),
                }
            }
        };
        let days = epoch.div_euclid(86_400);
        let of_day = epoch.rem_euclid(86_400);
        // Days to civil date (proleptic Gregorian; eras of 400 years from 0000-03-01).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        const BEFORE_MONTH: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = BEFORE_MONTH[usize::try_from(month - 1).unwrap_or(0)]
            + day
            + i64::from(leap && month > 2);
        Civil {
            epoch,
            nanos,
            year,
            month,
            day,
            yday,
            // 1970-01-01 was a Thursday.
            wday: (days + 4).rem_euclid(7),
            hour: of_day / 3_600,
            minute: of_day % 3_600 / 60,
            second: of_day % 60,
        }
    }
}

fn write_time(sink: &mut Sink<'_>, format: &[Tf], t: SystemTime) {
    let c = Civil::of(t);
    let name = |names: &'static [&'static str], i: i64| -> &'static str {
        usize::try_from(i)
            .ok()
            .and_then(|i| names.get(i))
            .copied()
            .unwrap_or("???")
    };
    let fraction = |sink: &mut Sink<'_>, digits: u8| {
        let n = i64::from(c.nanos / 10u32.pow(9 - u32::from(digits)));
        sink.pad(n, usize::from(digits));
    };
    for tf in format {
        match tf {
            Tf::Lit(s) => sink.str(s),
            Tf::Year => sink.fmt(format_args!("{}", c.year)),
            Tf::Year2 => sink.pad(c.year.rem_euclid(100), 2),
            Tf::Century => sink.pad(c.year.div_euclid(100), 2),
            Tf::Month => sink.pad(c.month, 2),
            Tf::Day => sink.pad(c.day, 2),
            Tf::DaySpace => sink.fmt(format_args!("{:>2}", c.day)),
            Tf::DayOfYear => sink.pad(c.yday, 3),
            Tf::Hour => sink.pad(c.hour, 2),
            Tf::Hour12 => sink.pad(if c.hour % 12 == 0 { 12 } else { c.hour % 12 }, 2),
            Tf::Minute => sink.pad(c.minute, 2),
            Tf::Second => sink.pad(c.second, 2),
            Tf::AmPm => sink.str(if c.hour < 12 { "AM" } else { "PM" }),
            Tf::WeekdayAbbr => sink.str(&name(&WEEKDAYS, c.wday)[..3]),
            Tf::WeekdayName => sink.str(name(&WEEKDAYS, c.wday)),
            Tf::MonthAbbr => sink.str(&name(&MONTHS, c.month - 1)[..3]),
            Tf::MonthName => sink.str(name(&MONTHS, c.month - 1)),
            Tf::WeekdayFromMonday => sink.pad(if c.wday == 0 { 7 } else { c.wday }, 1),
            Tf::WeekdayFromSunday => sink.pad(c.wday, 1),
            Tf::Epoch => sink.fmt(format_args!("{}", c.epoch)),
            Tf::Frac(digits) => fraction(sink, *digits),
            Tf::SecondsFrac(digits) => {
                sink.pad(c.second, 2);
                if *digits > 0 {
                    sink.str(".");
                    fraction(sink, *digits);
                }
            }
            Tf::SecondsFracAll => {
                sink.pad(c.second, 2);
                if c.nanos > 0 {
                    let mut n = c.nanos;
                    let mut digits: usize = 9;
                    while n % 10 == 0 {
                        n /= 10;
                        digits -= 1;
                    }
                    sink.str(".");
                    sink.pad(i64::from(n), digits);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Headers by lower-case name: a name asked in any other case is not found.
    struct H(&'static [(&'static str, &'static str)]);

    impl HeaderLookup for H {
        fn header(&self, lower_name: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(name, _)| *name == lower_name)
                .map(|(_, value)| *value)
        }
    }

    static REQUEST: H = H(&[
        (":method", "GET"),
        (":path", "/api/v1/items?id=7&x=1"),
        (":authority", "reviews.default.svc.cluster.local:9080"),
        (":scheme", "http"),
        ("user-agent", "curl/8.5.0"),
        ("x-request-id", "6f1c2a4e-9b1d-4c3e-8f2a-1b2c3d4e5f60"),
        ("x-forwarded-for", "10.0.0.9"),
        ("x-empty", ""),
        ("x-quote", "say \"hi\"\\ \u{1}\ttab"),
        ("x-utf8", "héllo wörld"),
    ]);

    static FORWARDED_REQUEST: H = H(&[
        (":method", "POST"),
        (":path", "/internal/v2?q=1"),
        ("x-envoy-original-path", "/public/v1?q=1"),
        ("x-envoy-original-host", "shop.example.com"),
        (":authority", "shop.default.svc.cluster.local"),
    ]);

    static RESPONSE: H = H(&[
        ("x-envoy-upstream-service-time", "12"),
        ("content-type", "text/plain"),
    ]);

    /// `secs` (negative: before 1970) and `nanos` after the epoch.
    fn at(secs: i64, nanos: u32) -> SystemTime {
        let whole = Duration::from_secs(secs.unsigned_abs());
        let base = if secs >= 0 {
            UNIX_EPOCH + whole
        } else {
            UNIX_EPOCH - whole
        };
        base + Duration::from_nanos(nanos.into())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A proxied request: 2026-11-27T21:31:38.123456789Z, everything known but the
    /// connection termination, the transport failure and the SNI.
    fn fields() -> Fields<'static> {
        Fields {
            start: at(1_795_815_098, 123_456_789),
            duration: Duration::from_micros(15_900),
            request_duration: Some(Duration::from_micros(2_999)),
            response_duration: Some(Duration::from_micros(11_400)),
            protocol: "HTTP/1.1",
            status: 200,
            flags: "-",
            details: Some("via_upstream"),
            connection_termination: None,
            transport_failure: None,
            bytes_received: 0,
            bytes_sent: 295,
            request: &REQUEST,
            response: &RESPONSE,
            upstream_host: Some(addr("10.244.1.17:9080")),
            upstream_cluster: Some("inbound|9080||reviews.default.svc.cluster.local"),
            upstream_local: Some(addr("10.244.1.5:40538")),
            upstream_peer_uri_san: Some("spiffe://cluster.local/ns/default/sa/reviews"),
            upstream_attempts: Some(1),
            downstream_local: addr("10.96.12.34:9080"),
            downstream_remote: addr("10.244.2.8:51234"),
            downstream_direct_remote: addr("10.244.3.3:15008"),
            downstream_peer_uri_san: Some("spiffe://cluster.local/ns/default/sa/productpage"),
            downstream_local_uri_san: Some("spiffe://cluster.local/ns/default/sa/waypoint"),
            requested_server_name: None,
            route_name: Some("default"),
            connection_id: 42,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        }
    }

    /// A request the waypoint answered itself: no healthy upstream.
    fn local_reply() -> Fields<'static> {
        Fields {
            status: 503,
            flags: "UH",
            details: Some("no_healthy_upstream"),
            bytes_sent: 19,
            duration: Duration::from_micros(3_100),
            response_duration: None,
            response: &NoHeaders,
            upstream_host: None,
            upstream_cluster: None,
            upstream_local: None,
            upstream_peer_uri_san: None,
            upstream_attempts: None,
            route_name: None,
            trace_id: None,
            ..fields()
        }
    }

    fn render(format: &Format, f: &Fields<'_>, omit_empty: bool) -> String {
        let mut out = Vec::new();
        format.render(f, omit_empty, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// `format` as a text format, rendered, without its final newline.
    fn line(format: &str, f: &Fields<'_>) -> String {
        line_with(format, f, false)
    }

    fn line_with(format: &str, f: &Fields<'_>, omit_empty: bool) -> String {
        let s = render(&Format::text(format).unwrap(), f, omit_empty);
        s.strip_suffix('\n').unwrap().to_string()
    }

    fn json_format(labels: serde_json::Value) -> Format {
        Format::json(labels.as_object().unwrap()).unwrap()
    }

    /// The rendered JSON line, checked to be one line, and parsed back.
    fn json_line(format: &Format, f: &Fields<'_>, omit_empty: bool) -> serde_json::Value {
        let s = render(format, f, omit_empty);
        let body = s.strip_suffix('\n').expect("a JSON line ends in a newline");
        assert!(!body.contains('\n'), "{s:?}");
        serde_json::from_str(body).unwrap()
    }

    /// One operator (a whole JSON value): its typed value.
    fn typed(op: &str, f: &Fields<'_>) -> serde_json::Value {
        json_line(&json_format(json!({ "v": op })), f, false)["v"].clone()
    }

    fn text_error(format: &str) -> String {
        let e = Format::text(format).unwrap_err();
        assert!(!e.contains('\n'), "one line: {e:?}");
        e
    }

    #[test]
    fn istio_text_renders_the_istio_default_line() {
        let out = render(&Format::istio_text(), &fields(), false);
        assert_eq!(
            out,
            "[2026-11-27T21:31:38.123Z] \"GET /api/v1/items?id=7&x=1 HTTP/1.1\" 200 - \
             via_upstream - \"-\" 0 295 15 12 \"10.0.0.9\" \"curl/8.5.0\" \
             \"6f1c2a4e-9b1d-4c3e-8f2a-1b2c3d4e5f60\" \"reviews.default.svc.cluster.local:9080\" \
             \"10.244.1.17:9080\" inbound|9080||reviews.default.svc.cluster.local \
             10.244.1.5:40538 10.96.12.34:9080 10.244.2.8:51234 - default\n"
        );
    }

    #[test]
    fn istio_text_renders_a_local_reply_with_dashes() {
        let f = Fields {
            request: &FORWARDED_REQUEST,
            ..local_reply()
        };
        let out = render(&Format::istio_text(), &f, false);
        assert_eq!(
            out,
            "[2026-11-27T21:31:38.123Z] \"POST /public/v1?q=1 HTTP/1.1\" 503 UH \
             no_healthy_upstream - \"-\" 0 19 3 - \"-\" \"-\" \"-\" \
             \"shop.default.svc.cluster.local\" \"-\" - - 10.96.12.34:9080 10.244.2.8:51234 - -\n"
        );
    }

    #[test]
    fn istio_json_renders_typed_values() {
        let v = json_line(&Format::istio_json(), &fields(), false);
        assert_eq!(
            v,
            json!({
                "authority": "reviews.default.svc.cluster.local:9080",
                "bytes_received": 0,
                "bytes_sent": 295,
                "connection_termination_details": null,
                "downstream_local_address": "10.96.12.34:9080",
                "downstream_remote_address": "10.244.2.8:51234",
                "duration": 15,
                "method": "GET",
                "path": "/api/v1/items?id=7&x=1",
                "protocol": "HTTP/1.1",
                "request_id": "6f1c2a4e-9b1d-4c3e-8f2a-1b2c3d4e5f60",
                "requested_server_name": null,
                "response_code": 200,
                "response_code_details": "via_upstream",
                "response_flags": "-",
                "route_name": "default",
                "start_time": "2026-11-27T21:31:38.123Z",
                "upstream_cluster": "inbound|9080||reviews.default.svc.cluster.local",
                "upstream_host": "10.244.1.17:9080",
                "upstream_local_address": "10.244.1.5:40538",
                "upstream_service_time": "12",
                "upstream_transport_failure_reason": null,
                "user_agent": "curl/8.5.0",
                "x_forwarded_for": "10.0.0.9",
            })
        );
        assert!(v["bytes_sent"].is_u64() && v["response_code"].is_u64());
        assert!(v["upstream_service_time"].is_string() && v["start_time"].is_string());
    }

    #[test]
    fn istio_json_keys_come_out_sorted() {
        let s = render(&Format::istio_json(), &fields(), false);
        let positions: Vec<usize> = ISTIO_JSON
            .iter()
            .map(|(k, _)| s.find(&format!("\"{k}\":")).unwrap())
            .collect();
        let mut keys: Vec<&str> = ISTIO_JSON.iter().map(|(k, _)| *k).collect();
        keys.sort();
        let mut by_position: Vec<(usize, &str)> = positions
            .into_iter()
            .zip(ISTIO_JSON.iter().map(|(k, _)| *k))
            .collect();
        by_position.sort();
        let order: Vec<&str> = by_position.into_iter().map(|(_, k)| k).collect();
        assert_eq!(order, keys);
    }

    #[test]
    fn istio_json_with_omit_empty_leaves_missing_keys_out() {
        let v = json_line(&Format::istio_json(), &local_reply(), true);
        let o = v.as_object().unwrap();
        for gone in [
            "connection_termination_details",
            "requested_server_name",
            "route_name",
            "upstream_cluster",
            "upstream_host",
            "upstream_local_address",
            "upstream_service_time",
            "upstream_transport_failure_reason",
        ] {
            assert!(!o.contains_key(gone), "{gone} in {v}");
        }
        assert_eq!(v["response_code"], 503);
        assert_eq!(v["response_flags"], "UH");
        assert_eq!(o.len(), ISTIO_JSON.len() - 8);
        // Without it, they are nulls.
        let v = json_line(&Format::istio_json(), &local_reply(), false);
        assert_eq!(v["upstream_host"], serde_json::Value::Null);
        assert_eq!(v.as_object().unwrap().len(), ISTIO_JSON.len());
    }

    #[test]
    fn json_keeps_literals_nests_objects_and_lists_sorted() {
        let format = json_format(json!({
            "z": null,
            "n": 3,
            "lit": "plain text",
            "b": true,
            "nested": { "host": "%UPSTREAM_HOST%", "code": "%RESPONSE_CODE%" },
            "list": ["%BYTES_SENT%", "x", "%TRACE_ID%", 1.5],
            "empty": "",
        }));
        assert_eq!(
            render(&format, &fields(), false),
            "{\"b\":true,\"empty\":\"\",\"list\":[295,\"x\",\"4bf92f3577b34da6a3ce929d0e0e4736\",1.5],\
             \"lit\":\"plain text\",\"n\":3,\"nested\":{\"code\":200,\"host\":\"10.244.1.17:9080\"},\
             \"z\":null}\n"
        );
        // With omit_empty a missing operator leaves its list slot and key out.
        assert_eq!(
            render(&format, &local_reply(), true),
            "{\"b\":true,\"empty\":\"\",\"list\":[19,\"x\",1.5],\"lit\":\"plain text\",\"n\":3,\
             \"nested\":{\"code\":503},\"z\":null}\n"
        );
    }

    #[test]
    fn json_mixed_text_is_a_string_with_dashes_for_missing_values() {
        let format =
            json_format(json!({ "summary": "%REQ(:METHOD)% %REQ(X-NOPE)% %RESPONSE_CODE%" }));
        assert_eq!(json_line(&format, &fields(), false)["summary"], "GET - 200");
        // omit_empty: nothing in its place, and the key stays (it is a string).
        assert_eq!(json_line(&format, &fields(), true)["summary"], "GET  200");
    }

    #[test]
    fn json_escapes_quotes_backslashes_and_control_characters() {
        let format = json_format(json!({ "q": "%REQ(X-QUOTE)%", "m": "<%REQ(X-QUOTE)%>\t" }));
        let s = render(&format, &fields(), false);
        assert_eq!(
            s,
            "{\"m\":\"<say \\\"hi\\\"\\\\ \\u0001\\u0009tab>\\u0009\",\
             \"q\":\"say \\\"hi\\\"\\\\ \\u0001\\u0009tab\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["q"], "say \"hi\"\\ \u{1}\ttab");
        // Keys too.
        let format = json_format(json!({ "a\"b\n\u{1f}\u{0}\u{7f}é": "x" }));
        assert_eq!(
            render(&format, &fields(), false),
            "{\"a\\\"b\\u000a\\u001f\\u0000\u{7f}é\":\"x\"}\n"
        );
    }

    #[test]
    fn text_output_is_not_escaped() {
        assert_eq!(line("%REQ(X-QUOTE)%", &fields()), "say \"hi\"\\ \u{1}\ttab");
    }

    #[test]
    fn text_format_gets_one_final_newline() {
        let f = fields();
        assert_eq!(render(&Format::text("a").unwrap(), &f, false), "a\n");
        assert_eq!(render(&Format::text("a\n").unwrap(), &f, false), "a\n");
        assert_eq!(
            render(&Format::text("%RESPONSE_CODE%").unwrap(), &f, false),
            "200\n"
        );
        assert_eq!(render(&Format::text("").unwrap(), &f, false), "\n");
        // A value (an OpenTelemetry log's body or attribute) is taken as it is.
        assert_eq!(render(&Format::value("a").unwrap(), &f, false), "a");
        assert_eq!(render(&Format::value("a\n").unwrap(), &f, false), "a\n");
        assert_eq!(
            render(
                &Format::value("%RESPONSE_CODE% %REQ(X-ABSENT)%").unwrap(),
                &f,
                false
            ),
            "200 -"
        );
        assert!(Format::value("%NOT_AN_OPERATOR%").is_err());
    }

    #[test]
    fn render_appends_to_the_buffer() {
        let mut out = b"earlier\n".to_vec();
        Format::text("%RESPONSE_CODE%")
            .unwrap()
            .render(&fields(), false, &mut out);
        json_format(json!({ "c": "%RESPONSE_CODE%" })).render(&fields(), false, &mut out);
        assert_eq!(out, b"earlier\n200\n{\"c\":200}\n");
    }

    #[test]
    fn double_percent_is_a_literal_percent() {
        let f = fields();
        assert_eq!(line("100%% %RESPONSE_CODE%%%", &f), "100% 200%");
        assert_eq!(line("%%%%", &f), "%%");
        assert_eq!(line("%%RESPONSE_CODE%%", &f), "%RESPONSE_CODE%");
    }

    #[test]
    fn compiled_formats_compare_and_clone() {
        assert_eq!(Format::text(ISTIO_TEXT).unwrap(), Format::istio_text());
        assert_ne!(
            Format::text("%BYTES_SENT%").unwrap(),
            Format::text("%BYTES_RECEIVED%").unwrap()
        );
        let f = Format::istio_json();
        assert_eq!(f.clone(), f);
    }

    #[test]
    fn req_takes_the_header_in_any_case_else_the_alternative() {
        let f = fields();
        assert_eq!(
            line("%REQ(User-Agent)%|%REQ(:METHOD)%|%REQ(:path)%", &f),
            "curl/8.5.0|GET|/api/v1/items?id=7&x=1"
        );
        assert_eq!(line("%REQ(X-NOPE?USER-AGENT)%", &f), "curl/8.5.0");
        assert_eq!(
            line("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", &f),
            "/api/v1/items?id=7&x=1"
        );
        assert_eq!(line("%REQ(X-NOPE?X-NADA)%|%REQ(X-NOPE)%", &f), "-|-");
        assert_eq!(
            line("%REQUEST_HEADER(:AUTHORITY)%", &f),
            "reviews.default.svc.cluster.local:9080"
        );
        let forwarded = Fields {
            request: &FORWARDED_REQUEST,
            ..fields()
        };
        assert_eq!(
            line("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", &forwarded),
            "/public/v1?q=1"
        );
        // A header that is there but empty is an empty value, not a missing one (Envoy):
        // no fallback, no dash.
        assert_eq!(line("[%REQ(X-EMPTY?USER-AGENT)%]", &f), "[]");
        assert_eq!(typed("%REQ(X-EMPTY)%", &f), "");
    }

    #[test]
    fn req_without_query_and_path_drop_the_query() {
        let f = fields();
        assert_eq!(
            line("%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%", &f),
            "/api/v1/items"
        );
        assert_eq!(line("%REQ_WITHOUT_QUERY(:PATH):7%", &f), "/api/v1");
        assert_eq!(line("%REQ_WITHOUT_QUERY(USER-AGENT)%", &f), "curl/8.5.0");
        assert_eq!(
            line("%PATH%|%PATH(NQ)%|%PATH(WQ:ORIG)%|%PATH(NQ:PATH):4%", &f),
            "/api/v1/items?id=7&x=1|/api/v1/items|-|/api"
        );
        let forwarded = Fields {
            request: &FORWARDED_REQUEST,
            ..fields()
        };
        assert_eq!(
            line("%PATH(NQ)%|%PATH(WQ:PATH)%", &forwarded),
            "/public/v1|/internal/v2?q=1"
        );
    }

    #[test]
    fn resp_reads_the_response_and_trailers_are_always_missing() {
        let f = fields();
        assert_eq!(
            line(
                "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% %RESPONSE_HEADER(content-type)%",
                &f
            ),
            "12 text/plain"
        );
        assert_eq!(line("%RESP(X-NOPE?CONTENT-TYPE)%", &f), "text/plain");
        assert_eq!(line("%RESP(CONTENT-TYPE)%", &local_reply()), "-");
        assert_eq!(
            line(
                "%TRAILER(GRPC-STATUS)% %RESPONSE_TRAILER(grpc-message?x):3%",
                &f
            ),
            "- -"
        );
        assert_eq!(typed("%TRAILER(grpc-status)%", &f), serde_json::Value::Null);
    }

    #[test]
    fn max_length_truncates_characters() {
        let f = fields();
        assert_eq!(line("%REQ(USER-AGENT):4%", &f), "curl");
        assert_eq!(line("%REQ(USER-AGENT):400%", &f), "curl/8.5.0");
        assert_eq!(line("[%REQ(USER-AGENT):0%]", &f), "[]");
        assert_eq!(line("%REQ(X-UTF8):2%", &f), "hé");
        // A missing value is a whole dash.
        assert_eq!(line("%REQ(X-NOPE):0%", &f), "-");
        assert_eq!(typed("%REQ(USER-AGENT):4%", &f), "curl");
        // Truncation counts characters before escaping.
        assert_eq!(typed("%REQ(X-QUOTE):6%", &f), "say \"h");
    }

    #[test]
    fn protocol_code_and_flags() {
        let f = fields();
        assert_eq!(
            line(
                "%PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_FLAGS_LONG%",
                &f
            ),
            "HTTP/1.1 200 - -"
        );
        let no_response = Fields {
            status: 0,
            flags: "DC",
            ..fields()
        };
        assert_eq!(
            line(
                "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_FLAGS_LONG%",
                &no_response
            ),
            "0 DC DownstreamConnectionTermination"
        );
        assert_eq!(typed("%RESPONSE_CODE%", &no_response), 0);
        let several = Fields {
            flags: "UH,UF,ZZ",
            ..fields()
        };
        assert_eq!(
            line("%RESPONSE_FLAGS_LONG%", &several),
            "NoHealthyUpstream,UpstreamConnectionFailure,ZZ"
        );
        assert_eq!(typed("%RESPONSE_FLAGS%", &several), "UH,UF,ZZ");
        let empty = Fields {
            protocol: "",
            flags: "",
            ..fields()
        };
        assert_eq!(
            line("%PROTOCOL% %RESPONSE_FLAGS% %RESPONSE_FLAGS_LONG%", &empty),
            "- - -"
        );
    }

    #[test]
    fn response_flags_long_names_match_envoy() {
        for (short, long) in [
            ("UF", "UpstreamConnectionFailure"),
            ("UT", "UpstreamRequestTimeout"),
            ("NR", "NoRouteFound"),
            ("UAEX", "UnauthorizedExternalService"),
            ("FI", "FaultInjected"),
            ("UO", "UpstreamOverflow"),
            ("DC", "DownstreamConnectionTermination"),
            ("DPE", "DownstreamProtocolError"),
            ("UPE", "UpstreamProtocolError"),
            ("SI", "StreamIdleTimeout"),
            ("URX", "UpstreamRetryLimitExceeded"),
            ("UH", "NoHealthyUpstream"),
            ("UC", "UpstreamConnectionTermination"),
            ("UR", "UpstreamRemoteReset"),
            ("LR", "LocalReset"),
            ("RL", "RateLimited"),
            ("DI", "DelayInjected"),
            ("NC", "NoClusterFound"),
            ("DT", "DurationTimeout"),
            ("OM", "OverloadManagerTerminated"),
            ("DO", "DropOverload"),
        ] {
            let f = Fields {
                flags: short,
                ..fields()
            };
            assert_eq!(line("%RESPONSE_FLAGS_LONG%", &f), long, "{short}");
        }
    }

    #[test]
    fn details_and_failure_reasons_have_no_spaces() {
        let f = Fields {
            details: Some("upstream reset\tbefore response"),
            connection_termination: Some("idle timeout"),
            transport_failure: Some("TLS error: 268435581:SSL routines:CERTIFICATE_VERIFY_FAILED"),
            ..fields()
        };
        assert_eq!(
            line("%RESPONSE_CODE_DETAILS%", &f),
            "upstream_reset_before_response"
        );
        assert_eq!(
            line("%RESPONSE_CODE_DETAILS(ALLOW_WHITESPACES)%", &f),
            "upstream reset\tbefore response"
        );
        assert_eq!(line("%CONNECTION_TERMINATION_DETAILS%", &f), "idle timeout");
        assert_eq!(
            line("%UPSTREAM_TRANSPORT_FAILURE_REASON%", &f),
            "TLS_error:_268435581:SSL_routines:CERTIFICATE_VERIFY_FAILED"
        );
        let empty = Fields {
            details: Some(""),
            ..fields()
        };
        assert_eq!(line("%RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% %UPSTREAM_TRANSPORT_FAILURE_REASON%", &empty), "- - -");
    }

    #[test]
    fn bytes_and_durations_are_whole_milliseconds() {
        let f = fields();
        assert_eq!(
            line("%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %REQUEST_DURATION% %RESPONSE_DURATION% %RESPONSE_TX_DURATION%", &f),
            "0 295 15 2 11 4"
        );
        for (op, n) in [
            ("%BYTES_RECEIVED%", 0),
            ("%BYTES_SENT%", 295),
            ("%DURATION%", 15),
            ("%REQUEST_DURATION%", 2),
            ("%RESPONSE_DURATION%", 11),
            ("%RESPONSE_TX_DURATION%", 4),
        ] {
            assert_eq!(typed(op, &f), n, "{op}");
        }
        let unknown = Fields {
            request_duration: None,
            response_duration: None,
            ..fields()
        };
        assert_eq!(
            line(
                "%REQUEST_DURATION% %RESPONSE_DURATION% %RESPONSE_TX_DURATION%",
                &unknown
            ),
            "- - -"
        );
        assert_eq!(
            typed("%RESPONSE_TX_DURATION%", &unknown),
            serde_json::Value::Null
        );
        let big = Fields {
            bytes_received: u64::MAX,
            ..fields()
        };
        assert_eq!(line("%BYTES_RECEIVED%", &big), "18446744073709551615");
    }

    #[test]
    fn ipv4_addresses_with_and_without_port() {
        let f = fields();
        assert_eq!(
            line("%UPSTREAM_HOST% %UPSTREAM_REMOTE_ADDRESS% %UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %UPSTREAM_REMOTE_PORT%", &f),
            "10.244.1.17:9080 10.244.1.17:9080 10.244.1.17 9080"
        );
        assert_eq!(
            line("%UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %UPSTREAM_LOCAL_PORT%", &f),
            "10.244.1.5:40538 10.244.1.5 40538"
        );
        assert_eq!(
            line("%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_PORT%", &f),
            "10.96.12.34:9080 10.96.12.34 9080"
        );
        assert_eq!(
            line("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_REMOTE_PORT%", &f),
            "10.244.2.8:51234 10.244.2.8 51234"
        );
        assert_eq!(
            line("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_DIRECT_REMOTE_PORT%", &f),
            "10.244.3.3:15008 10.244.3.3 15008"
        );
        let none = local_reply();
        assert_eq!(
            line("%UPSTREAM_HOST% %UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %UPSTREAM_REMOTE_PORT% %UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_LOCAL_PORT%", &none),
            "- - - - -"
        );
        assert_eq!(
            typed("%UPSTREAM_LOCAL_PORT%", &none),
            serde_json::Value::Null
        );
    }

    #[test]
    fn ipv6_addresses_are_bracketed_only_with_a_port() {
        let f = Fields {
            upstream_host: Some(addr("[2001:db8:1::17]:9080")),
            upstream_local: Some(addr("[fd00::5]:40538")),
            downstream_local: addr("[::1]:80"),
            downstream_remote: addr("[2001:db8::7]:51234"),
            downstream_direct_remote: addr("[::ffff:10.0.0.1]:15008"),
            ..fields()
        };
        assert_eq!(
            line("%UPSTREAM_HOST% %UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", &f),
            "[2001:db8:1::17]:9080 2001:db8:1::17 [fd00::5]:40538 fd00::5"
        );
        assert_eq!(
            line("%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_PORT%", &f),
            "[::1]:80 ::1 80"
        );
        assert_eq!(
            line("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_REMOTE_PORT%", &f),
            "[2001:db8::7]:51234 2001:db8::7 51234"
        );
        assert_eq!(
            line("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%", &f),
            "[::ffff:10.0.0.1]:15008"
        );
        let v = json_line(
            &json_format(json!({
                "a": "%DOWNSTREAM_REMOTE_ADDRESS%",
                "ip": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                "port": "%DOWNSTREAM_REMOTE_PORT%",
            })),
            &f,
            false,
        );
        assert_eq!(
            v,
            json!({ "a": "[2001:db8::7]:51234", "ip": "2001:db8::7", "port": 51234 })
        );
    }

    #[test]
    fn a_port_of_zero_is_left_out() {
        let f = Fields {
            downstream_remote: addr("10.1.0.7:0"),
            downstream_direct_remote: addr("[2001:db8::9]:0"),
            ..fields()
        };
        assert_eq!(
            line(
                "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% \
                 %DOWNSTREAM_REMOTE_PORT% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS% \
                 %DOWNSTREAM_DIRECT_REMOTE_PORT%",
                &f
            ),
            "10.1.0.7 10.1.0.7 - 2001:db8::9 -"
        );
        assert_eq!(typed("%DOWNSTREAM_REMOTE_ADDRESS%", &f), "10.1.0.7");
        assert_eq!(
            typed("%DOWNSTREAM_REMOTE_PORT%", &f),
            serde_json::Value::Null
        );
    }

    #[test]
    fn ports_ids_and_counts_are_json_numbers() {
        let f = fields();
        for (op, n) in [
            ("%UPSTREAM_REMOTE_PORT%", 9080),
            ("%UPSTREAM_LOCAL_PORT%", 40538),
            ("%DOWNSTREAM_LOCAL_PORT%", 9080),
            ("%DOWNSTREAM_REMOTE_PORT%", 51234),
            ("%DOWNSTREAM_DIRECT_REMOTE_PORT%", 15008),
            ("%CONNECTION_ID%", 42),
            ("%UPSTREAM_REQUEST_ATTEMPT_COUNT%", 1),
        ] {
            assert_eq!(typed(op, &f), n, "{op}");
        }
        for op in [
            "%UPSTREAM_HOST%",
            "%DOWNSTREAM_LOCAL_ADDRESS%",
            "%START_TIME%",
            "%ROUTE_NAME%",
        ] {
            assert!(typed(op, &f).is_string(), "{op}");
        }
    }

    #[test]
    fn upstream_cluster_san_and_attempts() {
        let f = fields();
        assert_eq!(
            line("%UPSTREAM_CLUSTER% %UPSTREAM_CLUSTER_RAW% %UPSTREAM_PEER_URI_SAN% %UPSTREAM_REQUEST_ATTEMPT_COUNT%", &f),
            "inbound|9080||reviews.default.svc.cluster.local inbound|9080||reviews.default.svc.cluster.local \
             spiffe://cluster.local/ns/default/sa/reviews 1"
        );
        let retried = Fields {
            upstream_attempts: Some(3),
            ..fields()
        };
        assert_eq!(line("%UPSTREAM_REQUEST_ATTEMPT_COUNT%", &retried), "3");
        // Envoy: 0 when the request never went upstream.
        assert_eq!(
            line(
                "%UPSTREAM_CLUSTER% %UPSTREAM_PEER_URI_SAN% %UPSTREAM_REQUEST_ATTEMPT_COUNT%",
                &local_reply()
            ),
            "- - 0"
        );
    }

    #[test]
    fn downstream_sans_route_connection_and_trace() {
        let f = fields();
        assert_eq!(
            line("%DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_LOCAL_URI_SAN% %ROUTE_NAME% %CONNECTION_ID% %TRACE_ID%", &f),
            "spiffe://cluster.local/ns/default/sa/productpage spiffe://cluster.local/ns/default/sa/waypoint \
             default 42 4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let anonymous = Fields {
            downstream_peer_uri_san: None,
            downstream_local_uri_san: Some(""),
            route_name: None,
            trace_id: None,
            ..fields()
        };
        assert_eq!(
            line(
                "%DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_LOCAL_URI_SAN% %ROUTE_NAME% %TRACE_ID%",
                &anonymous
            ),
            "- - - -"
        );
    }

    #[test]
    fn requested_server_name_and_its_host_fallbacks() {
        let f = fields();
        assert_eq!(line("%REQUESTED_SERVER_NAME%", &f), "-");
        assert_eq!(
            line("%REQUESTED_SERVER_NAME(SNI_FIRST)%", &f),
            "reviews.default.svc.cluster.local:9080"
        );
        assert_eq!(line("%REQUESTED_SERVER_NAME(SNI_FIRST:ORIG)%", &f), "-");
        let with_sni = Fields {
            requested_server_name: Some("outbound_.9080_._.reviews.default.svc.cluster.local"),
            request: &FORWARDED_REQUEST,
            ..fields()
        };
        assert_eq!(
            line("%REQUESTED_SERVER_NAME%|%REQUESTED_SERVER_NAME(SNI_FIRST)%", &with_sni),
            "outbound_.9080_._.reviews.default.svc.cluster.local|outbound_.9080_._.reviews.default.svc.cluster.local"
        );
        assert_eq!(
            line(
                "%REQUESTED_SERVER_NAME(HOST_FIRST)%|%REQUESTED_SERVER_NAME(HOST_FIRST:HOST)%",
                &with_sni
            ),
            "shop.example.com|shop.default.svc.cluster.local"
        );
    }

    #[test]
    fn hostname_and_environment_are_read_at_compile_time() {
        let f = fields();
        let expected = hostname().map(String::from).unwrap_or_else(|| "-".into());
        assert_eq!(line("%HOSTNAME%", &f), expected);
        if let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            if !kernel.trim().is_empty() {
                assert_eq!(expected, kernel.trim());
            }
        }
        let path = std::env::var("PATH").expect("tests run with a PATH");
        assert_eq!(line("%ENVIRONMENT(PATH)%", &f), path);
        let first: String = path.chars().take(3).collect();
        assert_eq!(line("%ENVIRONMENT(PATH):3%", &f), first);
        // Unset: Envoy's "-", a string even in JSON and with omit_empty.
        let unset = "%ENVIRONMENT(WAYPOINT_LOGFMT_TEST_VARIABLE_NEVER_SET)%";
        assert_eq!(line(unset, &f), "-");
        assert_eq!(line_with(unset, &f, true), "-");
        assert_eq!(typed(unset, &f), "-");
    }

    #[test]
    fn omit_empty_text_writes_nothing_for_missing_values() {
        let f = local_reply();
        let format = "%CONNECTION_TERMINATION_DETAILS%|%TRACE_ID%|%UPSTREAM_HOST%|%RESPONSE_CODE%";
        assert_eq!(line(format, &f), "-|-|-|503");
        assert_eq!(line_with(format, &f, true), "|||503");
    }

    #[test]
    fn start_time_default_is_utc_with_milliseconds() {
        for (secs, nanos, expected) in [
            (1_795_815_098, 123_456_789, "2026-11-27T21:31:38.123Z"),
            (1_795_815_098, 999_999_999, "2026-11-27T21:31:38.999Z"),
            (0, 0, "1970-01-01T00:00:00.000Z"),
            (1_709_251_199, 5_000_000, "2024-02-29T23:59:59.005Z"),
            (946_684_799, 0, "1999-12-31T23:59:59.000Z"),
            (-1, 500_000_000, "1969-12-31T23:59:59.500Z"),
        ] {
            let f = Fields {
                start: at(secs, nanos),
                ..fields()
            };
            assert_eq!(line("%START_TIME%", &f), expected, "{secs}.{nanos}");
            assert_eq!(line("%START_TIME()%", &f), expected, "{secs}.{nanos}");
        }
    }

    /// Expected values from `date -u -d @SECS` with the same format.
    #[test]
    fn start_time_custom_formats_match_date() {
        let format = "%START_TIME(%Y-%m-%dT%H:%M:%S | %y %j %a %A %b %B |%e| %p %I | %T %F %D %R | %z %Z %s | %u %w %C)%";
        for (secs, expected) in [
            (1_795_815_098, "2026-11-27T21:31:38 | 26 331 Fri Friday Nov November |27| PM 09 | 21:31:38 2026-11-27 11/27/26 21:31 | +0000 UTC 1795815098 | 5 5 20"),
            (1_709_251_199, "2024-02-29T23:59:59 | 24 060 Thu Thursday Feb February |29| PM 11 | 23:59:59 2024-02-29 02/29/24 23:59 | +0000 UTC 1709251199 | 4 4 20"),
            (951_825_600, "2000-02-29T12:00:00 | 00 060 Tue Tuesday Feb February |29| PM 12 | 12:00:00 2000-02-29 02/29/00 12:00 | +0000 UTC 951825600 | 2 2 20"),
            (946_684_799, "1999-12-31T23:59:59 | 99 365 Fri Friday Dec December |31| PM 11 | 23:59:59 1999-12-31 12/31/99 23:59 | +0000 UTC 946684799 | 5 5 19"),
            (4_107_567_909, "2100-03-01T07:05:09 | 00 060 Mon Monday Mar March | 1| AM 07 | 07:05:09 2100-03-01 03/01/00 07:05 | +0000 UTC 4107567909 | 1 1 21"),
            (0, "1970-01-01T00:00:00 | 70 001 Thu Thursday Jan January | 1| AM 12 | 00:00:00 1970-01-01 01/01/70 00:00 | +0000 UTC 0 | 4 4 19"),
            (-14_182_940, "1969-07-20T20:17:40 | 69 201 Sun Sunday Jul July |20| PM 08 | 20:17:40 1969-07-20 07/20/69 20:17 | +0000 UTC -14182940 | 7 0 19"),
        ] {
            let f = Fields {
                start: at(secs, 0),
                ..fields()
            };
            assert_eq!(line(format, &f), expected, "{secs}");
        }
    }

    #[test]
    fn start_time_fractions_are_truncated_digits() {
        let f = fields();
        assert_eq!(
            line("%START_TIME(%s.%3f)% %START_TIME(%s.%6f)% %START_TIME(%s.%9f)% %START_TIME(%f)% %START_TIME(%1f)%", &f),
            "1795815098.123 1795815098.123456 1795815098.123456789 123456789 1"
        );
        assert_eq!(
            line(
                "%START_TIME(%E6S)% %START_TIME(%E0S)% %START_TIME(%E*S)% %START_TIME(%H%%%M\t%t)%",
                &f
            ),
            "38.123456 38 38.123456789 21%31\t\t"
        );
        let round = Fields {
            start: at(1_795_815_098, 120_000_000),
            ..fields()
        };
        assert_eq!(
            line(
                "%START_TIME(%E*S)% %START_TIME(%3f)% %START_TIME(%9f)%",
                &round
            ),
            "38.12 120 120000000"
        );
        let whole = Fields {
            start: at(1_795_815_098, 0),
            ..fields()
        };
        assert_eq!(
            line(
                "%START_TIME(%E*S)% %START_TIME(%E3S)% %START_TIME(%6f)%",
                &whole
            ),
            "38 38.000 000000"
        );
        let small = Fields {
            start: at(0, 7),
            ..fields()
        };
        assert_eq!(
            line("%START_TIME(%s.%9f)% %START_TIME(%s.%6f)%", &small),
            "0.000000007 0.000000"
        );
    }

    #[test]
    fn errors_name_the_operator_and_its_byte_offset() {
        let e = text_error("ab %FOO% cd");
        assert!(
            e.contains("%FOO%") && e.contains("byte 3") && e.contains("unknown operator"),
            "{e}"
        );
        let e = text_error("%req(user-agent)%");
        assert!(
            e.contains("byte 0") && e.contains("does not start an operator"),
            "{e}"
        );
        let e = text_error("100%");
        assert!(
            e.contains("byte 3") && e.contains("does not start an operator"),
            "{e}"
        );
    }

    #[test]
    fn unterminated_operators_are_errors() {
        let e = text_error("abc %REQ(x");
        assert!(
            e.contains("%REQ(") && e.contains("byte 4") && e.contains("closing ')'"),
            "{e}"
        );
        let e = text_error("%DURATION");
        assert!(e.contains("%DURATION") && e.contains("not closed"), "{e}");
        let e = text_error("%DURATION %BYTES_SENT%");
        assert!(e.contains("%DURATION") && e.contains("not closed"), "{e}");
        let e = text_error("%REQ(x)y%");
        assert!(e.contains("%REQ") && e.contains("not closed"), "{e}");
    }

    #[test]
    fn missing_and_extra_arguments_are_errors() {
        for format in [
            "%REQ%",
            "%REQ()%",
            "%RESP%",
            "%REQ_WITHOUT_QUERY%",
            "%TRAILER%",
            "%ENVIRONMENT%",
        ] {
            let e = text_error(format);
            assert!(e.contains("needs an argument"), "{format}: {e}");
        }
        for format in [
            "%DURATION(x)%",
            "%RESPONSE_CODE(NUMBER)%",
            "%HOSTNAME(short)%",
        ] {
            let e = text_error(format);
            assert!(e.contains("takes no argument"), "{format}: {e}");
        }
        let e = text_error("%REQ(A?B?C)%");
        assert!(e.contains("more than one alternative"), "{e}");
        let e = text_error("%REQ(bad header)%");
        assert!(e.contains("not a header name"), "{e}");
        let e = text_error("%REQ(?USER-AGENT)%");
        assert!(e.contains("not a header name"), "{e}");
        for format in [
            "%PATH(XQ)%",
            "%PATH(NQ:ELSEWHERE)%",
            "%PATH(NQ:PATH:X)%",
            "%REQUESTED_SERVER_NAME(SNI_LAST)%",
        ] {
            assert!(Format::text(format).is_err(), "{format}");
        }
    }

    #[test]
    fn bad_max_lengths_are_errors() {
        let e = text_error("%REQ(USER-AGENT):abc%");
        assert!(e.contains("maximum length"), "{e}");
        let e = text_error("%REQ(USER-AGENT):%");
        assert!(e.contains("maximum length"), "{e}");
        let e = text_error("%REQ(USER-AGENT):99999999999999999999999999%");
        assert!(e.contains("too large"), "{e}");
        // Envoy takes a length only where it truncates text.
        for format in [
            "%DURATION:5%",
            "%START_TIME:5%",
            "%START_TIME(%s):5%",
            "%UPSTREAM_HOST:3%",
        ] {
            let e = text_error(format);
            assert!(e.contains("takes no maximum length"), "{format}: {e}");
        }
    }

    #[test]
    fn operators_this_waypoint_cannot_provide_are_errors() {
        for format in [
            "%DYNAMIC_METADATA(istio.mixer:status)%",
            "%FILTER_STATE(upstream_peer:PLAIN)%",
            "%METADATA(ROUTE:com.test:key)%",
            "%CEL(response.code)%",
            "%CLUSTER_METADATA(istio:default_original_port)%",
            "%UPSTREAM_METADATA(istio:workload)%",
            "%START_TIME_LOCAL%",
            "%DOWNSTREAM_TLS_VERSION%",
            "%UPSTREAM_PEER_SUBJECT%",
            "%GRPC_STATUS%",
        ] {
            let e = text_error(&format!("x {format}"));
            assert!(
                e.contains("not supported by this waypoint"),
                "{format}: {e}"
            );
            assert!(e.contains("byte 2"), "{format}: {e}");
        }
    }

    #[test]
    fn bad_start_time_formats_are_errors() {
        let e = text_error("%START_TIME(%Q)%");
        assert!(e.contains("%Q"), "{e}");
        let e = text_error("%START_TIME(%Y%)%");
        assert!(e.contains("lone '%'"), "{e}");
        let e = text_error("%START_TIME(%Y%n)%");
        assert!(e.contains("newline"), "{e}");
        for format in [
            "%START_TIME(%0f)%",
            "%START_TIME(%E3)%",
            "%START_TIME(%EX)%",
        ] {
            assert!(Format::text(format).is_err(), "{format}");
        }
    }

    #[test]
    fn json_errors_name_the_key() {
        let e = Format::json(json!({ "a": { "b": "%NOPE%" } }).as_object().unwrap()).unwrap_err();
        assert!(
            e.contains("\"a.b\"") && e.contains("%NOPE%") && e.contains("unknown operator"),
            "{e}"
        );
        let e = Format::json(
            json!({ "l": ["ok", "%DYNAMIC_METADATA(x)%"] })
                .as_object()
                .unwrap(),
        )
        .unwrap_err();
        assert!(
            e.contains("\"l[1]\"") && e.contains("not supported by this waypoint"),
            "{e}"
        );
    }
}
