//! HTTP/1.1 inside an HBONE stream: the request head (httparse), policy first (R15), then
//! routing (R16/R17), then one exchange with the upstream per request, keep-alive.
//!
//! The byte streams are abstract ([`Tunnel`] downstream, [`Upstream`] for the chosen
//! service), so the whole path is driven in tests over memory; [`Tunnel`] is implemented
//! for [`hbone::stream::H2Stream`]. Bad input: a malformed head is `400`, a head over
//! [`MAX_HEAD`] bytes is `431`; both close the stream.
//!
//! Bodies are **streamed** ([`crate::body`]): a request body up to [`REPLAY_BUFFER`]
//! bytes is read whole first (so a retry or a mirror can send it again), a longer one is
//! copied to the upstream as it arrives and its request is never retried; responses are
//! copied to the tunnel as they arrive (Content-Length and chunked as received; a body
//! delimited by the end of the upstream connection is re-framed chunked, with an
//! `HTTP/1.1` status line). While a request body goes out the upstream is watched: an
//! early final response (`413`, `401`, …) stops the body, is passed on, and neither the
//! upstream connection nor (for a streamed body) the tunnel carries another request.
//! Mirrors, timeouts (`504`), retries; a failed upstream answers `503` as Istio does, and
//! so does an upstream response head with ambiguous framing (differing or malformed
//! `Content-Length`s, several `Transfer-Encoding` lines or a final coding other than
//! chunked); a `Content-Length` next to `Transfer-Encoding: chunked` is dropped.
//!
//! `Expect: 100-continue`: once policy and routing allow the request, the waypoint
//! answers `100 Continue` itself and does not pass the expectation on (Envoy's default);
//! a request answered here (a `403` denial, a redirect, `404`) is answered without
//! reading its body, and the tunnel is closed after it.
//!
//! Upgrades: only those in [`ALLOWED_UPGRADES`] (websocket, as Istio's default
//! `upgradeConfigs`), asked with `Connection: upgrade`, are forwarded; after a `101` from
//! the upstream the tunnel and the upstream connection are spliced as raw bytes both ways
//! with half-close ([`End::Upgraded`]). Any other upgrade (`h2c`, …) is stripped so the
//! request stays an ordinary one under L7 policy, and an unasked `101` is `502`.
//!
//! Framing is strict (request smuggling): see [`body_framing`] and [`crate::body`];
//! hop-by-hop fields are removed both ways ([`normalize_request`], RFC 9110 §7.6.1);
//! `Expect` other than `100-continue` is `417`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::authz::{self, DENIED_BODY};
use crate::body::{CopyError, Framing};
use crate::config::{TunnelTimeouts, WaypointConfig};
use crate::jwt::Authenticated;
use crate::lb::Rng;
use crate::route::{self, Decision, Forward, HeaderModifier, ObjectRef, Retry, Target};
use runtime::worker::{race, Either};

/// The largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 256;

/// A piece of text of a request head: a slice of the head as received (shared by all its
/// fields: parsing copies the head once, not each field), a static name, or a value made
/// here. Reads as a `str`.
#[derive(Clone)]
pub struct Text(TextRepr);

#[derive(Clone)]
enum TextRepr {
    Static(&'static str),
    Slice { src: Rc<str>, start: u32, end: u32 },
    Owned(String),
}

impl Text {
    pub fn as_str(&self) -> &str {
        match &self.0 {
            TextRepr::Static(s) => s,
            TextRepr::Slice { src, start, end } => &src[*start as usize..*end as usize],
            TextRepr::Owned(s) => s,
        }
    }

    /// `sub` of `src`, as a range of it. `sub` is meant to lie within `src` (which the
    /// parser guarantees); one that does not, or beyond 4 GiB, becomes a copy rather than
    /// a wrong range or a panic.
    pub(crate) fn slice_of(src: &Rc<str>, sub: &str) -> Text {
        let range = (sub.as_ptr() as usize)
            .checked_sub(src.as_ptr() as usize)
            .and_then(|start| Some((start, start.checked_add(sub.len())?)))
            .filter(|&(_, end)| end <= src.len())
            .and_then(|(start, end)| Some((u32::try_from(start).ok()?, u32::try_from(end).ok()?)));
        match range {
            Some((start, end)) => Text(TextRepr::Slice {
                src: src.clone(),
                start,
                end,
            }),
            None => Text(TextRepr::Owned(sub.to_owned())),
        }
    }
}

impl Text {
    /// This text without whitespace around it: the same text when it has none, else a
    /// narrower slice of the same source (a copy only for a value made here).
    fn trimmed(&self) -> Text {
        let s = self.as_str();
        let t = s.trim();
        if t.len() == s.len() {
            return self.clone();
        }
        match &self.0 {
            TextRepr::Static(s) => Text(TextRepr::Static(s.trim())),
            TextRepr::Slice { src, start, .. } => {
                let at = *start + (t.as_ptr() as usize - s.as_ptr() as usize) as u32;
                Text(TextRepr::Slice {
                    src: src.clone(),
                    start: at,
                    end: at + t.len() as u32,
                })
            }
            TextRepr::Owned(_) => Text::from(t.to_owned()),
        }
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text(TextRepr::Static(s))
    }
}

impl From<Rc<str>> for Text {
    fn from(src: Rc<str>) -> Self {
        let end = src.len() as u32;
        Text(TextRepr::Slice { src, start: 0, end })
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text(TextRepr::Owned(s))
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Text,
    /// Without the query.
    pub path: Text,
    pub query: Option<Text>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(Text, Text)>,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the connection persists after this request (RFC 9112 §9.3): not when a
    /// `Connection` field has the `close` option; else for HTTP/1.1, and for HTTP/1.0 only
    /// with `keep-alive`. `Connection` is a comma-separated list of case-insensitive
    /// tokens (RFC 9110 §7.6.1), possibly over several field lines: an option is a whole
    /// token, never part of one.
    fn keep_alive(&self) -> bool {
        let has = |option: &[u8]| {
            self.headers.iter().any(|(n, v)| {
                n.eq_ignore_ascii_case("connection") && contains_token(v.as_bytes(), option)
            })
        };
        !has(b"close") && (self.version == 1 || has(b"keep-alive"))
    }
}

/// The result of looking at the buffered bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Need more bytes.
    Partial,
    /// A head, and how many bytes it took.
    Head(RequestHead, usize),
    /// Answer this status and close: 400 malformed, 431 too large.
    Bad(u16),
}

/// Parse a request head from the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Parsed {
    parse_head_traced(buf, None).0
}

/// What gives a request its `traceparent` (and, without one, an `x-request-id`) as its head
/// is parsed ([`parse_head_traced`]): the tunnel's (a
/// [`crate::telemetry::valid_tunnel_traceparent`]) and the random numbers of new ones.
pub(crate) struct TraceFrom<'a> {
    pub tunnel: Option<&'a str>,
    pub rng: &'a mut dyn Rng,
    /// Tracing on for the tunnel's destination ([`crate::spans`]): the sampling of new
    /// traces; each request gets a span of the waypoint's own.
    pub spans: Option<crate::spans::Sampling>,
}

/// A request's trace context as the waypoint sends it upstream ([`trace`],
/// [`parse_head_traced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Its `traceparent`.
    pub value: Text,
    /// With tracing on ([`crate::spans`]): `value` names the waypoint's own span, and
    /// this is its parent's span id (0: it starts the trace).
    pub span: Option<u64>,
}

impl Trace {
    /// No trace context (a request whose head never came whole).
    pub fn none() -> Trace {
        Trace {
            value: Text::from(""),
            span: None,
        }
    }
}

/// [`parse_head`]; with `trace`, the head also gets its `traceparent` as [`trace`] sets
/// it (returned too) and its `x-request-id` as [`request_id`] does, without an allocation
/// of their own: a request's valid ones are kept (slices of the head), new ones are
/// written after the head in the same copy.
pub(crate) fn parse_head_traced(
    buf: &[u8],
    mut trace: Option<TraceFrom<'_>>,
) -> (Parsed, Option<Trace>) {
    #[cfg(test)]
    tests::PARSES.with(|n| n.set(n.get() + 1));
    // Most requests have few headers: a small array first (cheap to set up per request),
    // the full one only when it is too small.
    let mut few = [httparse::EMPTY_HEADER; 32];
    match parse_head_with(buf, &mut few, trace.as_mut()) {
        (Parsed::Bad(431), _) if buf.len() <= MAX_HEAD => {
            let mut all = [httparse::EMPTY_HEADER; MAX_HEADERS];
            parse_head_with(buf, &mut all, trace.as_mut())
        }
        p => p,
    }
}

/// Header lists kept for the next requests' heads on this thread ([`recycle_headers`]).
const SPARE_HEADER_LISTS: usize = 256;
/// The longest header list kept ([`recycle_headers`]): the room of a usual head.
const SPARE_HEADER_ROOM: usize = 32;

thread_local! {
    static SPARE_HEADERS: std::cell::RefCell<Vec<Vec<(Text, Text)>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty header list with room for `n` fields: one a finished request left on this
/// thread ([`recycle_headers`]) when there is one, else a new one.
fn header_list(n: usize) -> Vec<(Text, Text)> {
    let mut v = SPARE_HEADERS
        .with_borrow_mut(|s| s.pop())
        .unwrap_or_default();
    v.reserve(n);
    v
}

/// Keep a finished request's header list (emptied) for the next head parsed on this
/// thread: a keep-alive tunnel's requests do not allocate one each. At most
/// [`SPARE_HEADER_LISTS`] lists of up to [`SPARE_HEADER_ROOM`] fields are kept per thread.
pub(crate) fn recycle_headers(mut headers: Vec<(Text, Text)>) {
    if headers.capacity() == 0 || headers.capacity() > SPARE_HEADER_ROOM {
        return;
    }
    headers.clear();
    SPARE_HEADERS.with_borrow_mut(|s| {
        if s.len() < SPARE_HEADER_LISTS {
            s.push(headers);
        }
    });
}

fn parse_head_with<'b>(
    buf: &'b [u8],
    headers: &mut [httparse::Header<'b>],
    trace: Option<&mut TraceFrom<'_>>,
) -> (Parsed, Option<Trace>) {
    let mut req = httparse::Request::new(headers);
    let bad = |status| (Parsed::Bad(status), None);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                bad(431)
            } else {
                (Parsed::Partial, None)
            }
        }
        Ok(httparse::Status::Complete(n)) => {
            if n > MAX_HEAD {
                return bad(431);
            }
            let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
            else {
                return bad(400);
            };
            if !target.starts_with('/') {
                return bad(400);
            }
            // Method, target and names are text (httparse checks their bytes); the values
            // must be too. The head is copied once and every field is a slice of it.
            let Ok(text) = std::str::from_utf8(&buf[..n]) else {
                return bad(400);
            };
            // The parsed fields point into `buf`, which `text` is: their offsets.
            let offset = |sub: &[u8]| sub.as_ptr() as usize - buf.as_ptr() as usize;
            let in_text = |sub: &[u8]| &text[offset(sub)..offset(sub) + sub.len()];
            let target = in_text(target.as_bytes());
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (target, None),
            };
            // Normalized once here (Istio's `BASE`): policy, routing and the upstream
            // request all see the same path.
            let Ok(path) = crate::path::normalize(path) else {
                return bad(400);
            };
            // The `traceparent` ([`trace`]): the first field's when valid (a range of the
            // head), else a new one, written after the head in its copy. `Some(i)`: field
            // `i` is the only one and takes the value; else any are dropped and it is
            // added last.
            let mut traced: Option<(Option<usize>, TraceValue)> = None;
            // With tracing on: the parent of the waypoint's span.
            let mut span = None;
            // A new `x-request-id` ([`request_id`]), written after the `traceparent`.
            let mut new_id: Option<[u8; crate::telemetry::REQUEST_ID_LEN]> = None;
            if let Some(tr) = trace {
                let (mut first, mut count, mut has_id) = (None, 0, false);
                for (i, h) in req.headers.iter().enumerate() {
                    if h.name.eq_ignore_ascii_case("traceparent") {
                        count += 1;
                        first = first.or(Some(i));
                    } else if h.name.eq_ignore_ascii_case("x-request-id") {
                        has_id = true;
                    }
                }
                let kept = first
                    .map(|i| in_text(req.headers[i].value))
                    .filter(|v| crate::telemetry::valid_traceparent(v))
                    .map(|v| {
                        let v = v.trim();
                        (offset(v.as_bytes()), offset(v.as_bytes()) + v.len())
                    });
                let (new, parent) = crate::telemetry::upstream_traceparent(
                    kept.map(|(start, end)| &text[start..end]),
                    tr.tunnel,
                    tr.spans,
                    tr.rng,
                );
                span = parent;
                let value = match (new, kept) {
                    (Some(new), _) => TraceValue::New(new),
                    (None, Some((start, end))) => TraceValue::Kept(start, end),
                    (None, None) => unreachable!("a new traceparent without the request's"),
                };
                traced = Some((first.filter(|_| count == 1), value));
                if !has_id {
                    new_id = Some(crate::telemetry::new_request_id(tr.rng));
                }
            }
            let new_trace = match &traced {
                Some((_, TraceValue::New(new))) => Some(new),
                _ => None,
            };
            let src: Rc<str> = if new_trace.is_none() && new_id.is_none() {
                Rc::from(text)
            } else {
                HEAD_TEXT.with_borrow_mut(|s| {
                    s.clear();
                    s.push_str(text);
                    for new in [new_trace.map(|t| &t[..]), new_id.as_ref().map(|i| &i[..])]
                        .into_iter()
                        .flatten()
                    {
                        s.push_str(std::str::from_utf8(new).unwrap_or(""));
                    }
                    Rc::from(s.as_str())
                })
            };
            // Where the new `traceparent` ends in `src` (the new id follows it).
            let trace_end = n + new_trace.map_or(0, |t| t.len());
            let range = |start: usize, end: usize| {
                Text(TextRepr::Slice {
                    src: src.clone(),
                    start: start as u32,
                    end: end as u32,
                })
            };
            let at = |sub: &[u8]| range(offset(sub), offset(sub) + sub.len());
            let traceparent = traced.as_ref().map(|(_, v)| match *v {
                TraceValue::Kept(start, end) => range(start, end),
                TraceValue::New(_) => range(n, trace_end),
            });
            let mut hs = header_list(req.headers.len() + 3);
            for (i, h) in req.headers.iter().enumerate() {
                let value = match (&traced, &traceparent) {
                    (Some((only, _)), Some(t)) if h.name.eq_ignore_ascii_case("traceparent") => {
                        if *only != Some(i) {
                            continue;
                        }
                        t.clone()
                    }
                    _ => at(h.value),
                };
                hs.push((at(h.name.as_bytes()), value));
            }
            if let (Some((None, _)), Some(t)) = (&traced, &traceparent) {
                hs.push(("traceparent".into(), t.clone()));
            }
            if new_id.is_some() {
                hs.push(("x-request-id".into(), range(trace_end, src.len())));
            }
            let path = match path {
                // A slice of the head (a range of its copy), else a copy.
                Cow::Borrowed(p) => match (p.as_ptr() as usize).checked_sub(text.as_ptr() as usize)
                {
                    Some(start) if start + p.len() <= n => range(start, start + p.len()),
                    _ => Text::from(p.to_owned()),
                },
                Cow::Owned(p) => Text::from(p),
            };
            let head = RequestHead {
                method: at(method.as_bytes()),
                path,
                query: query.map(|q| at(q.as_bytes())),
                version,
                headers: hs,
            };
            let trace = traceparent.map(|value| Trace { value, span });
            (Parsed::Head(head, n), trace)
        }
        Err(httparse::Error::TooManyHeaders) => bad(431),
        Err(_) => bad(400),
    }
}

/// A request's `traceparent` as its head is parsed ([`parse_head_traced`]): its own
/// (valid), as a range of the head; or a new one, to be written after the head.
enum TraceValue {
    Kept(usize, usize),
    New([u8; crate::telemetry::TRACEPARENT_LEN]),
}

thread_local! {
    /// Where a head and its new `traceparent` and `x-request-id` are put together before
    /// their one copy.
    static HEAD_TEXT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// A response the waypoint writes itself: `headers`, then its framing; a body is labelled
/// `text/plain` unless `headers` give a `content-type`.
pub fn simple_response(
    status: u16,
    headers: &[(String, String)],
    body: &str,
    close: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n", body.len()));
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        out.push_str("content-type: text/plain\r\n");
    }
    if close {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        _ => "",
    }
}

/// Where the tunnel was addressed (the CONNECT target, resolved by the R14 check).
#[derive(Debug, Clone)]
pub enum Destination {
    /// A pod (R16): its namespace and labels (for `selector` policies).
    Workload {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    /// A service and port (R17).
    Service { service: ObjectRef, port: u16 },
}

/// Per-tunnel facts: who called, what they addressed, who we are.
#[derive(Debug, Clone)]
pub struct TunnelCtx {
    pub waypoint: ObjectRef,
    pub root_namespace: String,
    pub destination: Destination,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub source_ip: IpAddr,
    /// `td/ns/N/sa/S` from the peer's certificate.
    pub principal: Option<String>,
    /// The namespace whose consumer routes apply ([`crate::source::consumer_namespace`]
    /// of the peer's identity under the snapshot this was derived from; `None` for a
    /// ztunnel's hairpin or an unverified peer).
    pub client_namespace: Option<Arc<str>>,
    /// The CONNECT's `traceparent`, if any (requests without a valid one continue it).
    pub traceparent: Option<String>,
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<'c> {
    /// Answer directly (denial, redirect, 404, 500).
    Respond(Vec<u8>),
    /// Send the request to the route's upstream ([`upstream_head`] for HTTP/1.1); borrowed
    /// from the configuration when the route's forward is prebuilt
    /// ([`crate::route::RouteTable::route_shared`]). `auth`: the request's verified JWT,
    /// when it carried one (its head may have been rewritten for it, [`crate::jwt`]).
    Forward {
        forward: Fwd<'c>,
        auth: Option<Arc<Authenticated>>,
    },
    /// Ask a CUSTOM policy's external authorizer first ([`crate::ext_authz`]), then go on
    /// with [`decide_checked`] ([`decide_with`] does both).
    Check {
        provider: &'c Arc<crate::ext_authz::Provider>,
        auth: Option<Arc<Authenticated>>,
    },
}

/// A request's [`Forward`]: the configuration's prebuilt one, or one made for it (boxed:
/// a decision is held in a tunnel's future while its request is in flight, and an inline
/// `Forward` would size every tunnel's future by it). Reads as a `Forward`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fwd<'c> {
    Shared(&'c Forward),
    Owned(Box<Forward>),
}

impl std::ops::Deref for Fwd<'_> {
    type Target = Forward;

    fn deref(&self) -> &Forward {
        match self {
            Fwd::Shared(f) => f,
            Fwd::Owned(f) => f,
        }
    }
}

/// Header lists up to this long are viewed from the stack by [`decide`].
const STACK_HEADERS: usize = 24;

/// Authentication (a JWT, if RequestAuthentication applies), authorization (R15), then
/// routing: pure but for the clock a token is checked against, no I/O.
pub fn decide<'c>(
    cfg: &'c WaypointConfig,
    ctx: &TunnelCtx,
    head: &mut RequestHead,
    rng: &mut dyn Rng,
) -> Action<'c> {
    let close = !head.keep_alive();
    // RequestAuthentication before policy, as Envoy's `jwt_authn` runs before RBAC: a bad
    // token is `401`; a good one may rewrite the head (its header removed, claims added).
    let auth = match authenticate(cfg, ctx, head) {
        Ok(a) => a,
        Err(f) => {
            let challenge = crate::jwt::challenge(head.header("host").unwrap_or(""), &head.path);
            let h = [("www-authenticate".to_string(), challenge)];
            return Action::Respond(simple_response(401, &h, f.message(), close));
        }
    };
    // CUSTOM first (Istio's order: CUSTOM, DENY, ALLOW).
    if !cfg.ext_authz.is_empty() {
        let provider = with_fields(head, |hdrs| {
            let subject = subject(ctx);
            let areq = policy_request(cfg, ctx, head, hdrs, auth.as_deref());
            authz::custom(&cfg.policies, &subject, &areq)
        });
        if let Some(provider) = provider.and_then(|p| cfg.ext_authz.get(p)) {
            return Action::Check { provider, auth };
        }
    }
    decide_checked(cfg, ctx, head, rng, auth)
}

/// `head`'s header list as `(&str, &str)` pairs, for `f`: on the stack for the usual few
/// headers.
fn with_fields<R>(head: &RequestHead, f: impl FnOnce(&[(&str, &str)]) -> R) -> R {
    let mut stack = [("", ""); STACK_HEADERS];
    if head.headers.len() <= STACK_HEADERS {
        for (slot, (n, v)) in stack.iter_mut().zip(&head.headers) {
            *slot = (n.as_str(), v.as_str());
        }
        f(&stack[..head.headers.len()])
    } else {
        let heap: Vec<(&str, &str)> = head
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        f(&heap)
    }
}

/// [`decide`] past authentication and any CUSTOM check: DENY/ALLOW policy (R15), then
/// routing. `auth`: the request's verified JWT.
pub fn decide_checked<'c>(
    cfg: &'c WaypointConfig,
    ctx: &TunnelCtx,
    head: &RequestHead,
    rng: &mut dyn Rng,
    auth: Option<Arc<Authenticated>>,
) -> Action<'c> {
    let close = !head.keep_alive();
    with_fields(head, |hdrs| {
        if !allows(cfg, ctx, head, hdrs, auth.as_deref()) {
            return Action::Respond(simple_response(403, &[], DENIED_BODY, close));
        }
        route_request(cfg, ctx, head, hdrs, rng, auth, close)
    })
}

/// Routing (R16/R17) of an allowed request.
fn route_request<'c>(
    cfg: &'c WaypointConfig,
    ctx: &TunnelCtx,
    head: &RequestHead,
    hdrs: &[(&str, &str)],
    rng: &mut dyn Rng,
    auth: Option<Arc<Authenticated>>,
    close: bool,
) -> Action<'c> {
    let target = match &ctx.destination {
        Destination::Service { service, port } => Target::Service {
            service,
            port: *port,
        },
        Destination::Workload { .. } => Target::Workload,
    };
    let rreq = route::Request {
        method: &head.method,
        path: &head.path,
        query: head.query.as_deref(),
        headers: hdrs,
        scheme: "http",
    };
    // Consumer routes by the verified client's namespace; a ztunnel's hairpin has none.
    match cfg.routes.route_shared_from(
        ctx.client_namespace.as_deref(),
        target,
        &rreq,
        &|s| cfg.service_exists(s),
        rng,
    ) {
        Ok(Cow::Borrowed(f)) => Action::Forward {
            forward: Fwd::Shared(f),
            auth,
        },
        Ok(Cow::Owned(f)) => Action::Forward {
            forward: Fwd::Owned(Box::new(f)),
            auth,
        },
        Err(Decision::Respond { status, reason }) => {
            Action::Respond(simple_response(status, &[], reason, close))
        }
        Err(Decision::Direct {
            status,
            body,
            response_headers,
        }) => {
            let mut h = vec![];
            for m in &response_headers {
                m.apply(&mut h);
            }
            Action::Respond(simple_response(status, &h, &body, close))
        }
        Err(Decision::Redirect {
            status,
            location,
            response_headers,
        }) => {
            let mut h = vec![("location".to_string(), location)];
            for m in &response_headers {
                m.apply(&mut h);
            }
            Action::Respond(simple_response(status, &h, "", close))
        }
        Err(Decision::Forward(fwd)) => Action::Forward {
            forward: Fwd::Owned(fwd),
            auth,
        },
    }
}

/// The request's verified JWT under the RequestAuthentications that apply to its target
/// ([`crate::jwt`]); `Ok(None)` without a token or without such rules.
fn authenticate(
    cfg: &WaypointConfig,
    ctx: &TunnelCtx,
    head: &mut RequestHead,
) -> Result<Option<Arc<Authenticated>>, crate::jwt::Failure> {
    if cfg.request_authns.is_empty() {
        return Ok(None);
    }
    let subject = subject(ctx);
    let rules: Vec<&crate::jwt::JwtRule> = crate::jwt::applicable(&cfg.request_authns, &subject)
        .map(|r| &**r)
        .collect();
    if rules.is_empty() {
        return Ok(None);
    }
    crate::jwt::authenticate(&rules, head, crate::jwt::unix_now())
}

/// Who the waypoint is and what the tunnel `ctx` is addressed to, for policies.
pub(crate) fn subject(ctx: &TunnelCtx) -> authz::Subject<'_> {
    let (service, workload) = match &ctx.destination {
        Destination::Service { service, .. } => (Some(service), None),
        Destination::Workload { namespace, labels } => (None, Some((namespace.as_str(), labels))),
    };
    authz::Subject {
        waypoint: &ctx.waypoint,
        root_namespace: &ctx.root_namespace,
        service,
        workload,
    }
}

/// Whether AuthorizationPolicy allows the request `head` (its fields as `hdrs`, its
/// verified JWT `auth`) on the tunnel `ctx` under `cfg` (R15): [`decide`]'s check after
/// authentication, and the one a reload makes again for a live upgraded connection.
pub(crate) fn allows(
    cfg: &WaypointConfig,
    ctx: &TunnelCtx,
    head: &RequestHead,
    hdrs: &[(&str, &str)],
    auth: Option<&Authenticated>,
) -> bool {
    let subject = subject(ctx);
    let areq = policy_request(cfg, ctx, head, hdrs, auth);
    authz::evaluate(&cfg.policies, &subject, &areq).allowed
}

/// The attributes policies read of the request `head` (its fields as `hdrs`, its JWT
/// `auth`) on the tunnel `ctx`.
fn policy_request<'a>(
    cfg: &WaypointConfig,
    ctx: &'a TunnelCtx,
    head: &'a RequestHead,
    hdrs: &'a [(&'a str, &'a str)],
    auth: Option<&'a Authenticated>,
) -> authz::Request<'a> {
    let trusted = cfg
        .settings
        .as_ref()
        .map_or(0, |s| s.waypoint.num_trusted_proxies);
    authz::Request {
        source_ip: ctx.source_ip,
        remote_ip: remote_ip(head, ctx.source_ip, trusted),
        principal: ctx.principal.as_deref(),
        auth,
        destination_ip: ctx.destination_ip,
        destination_port: ctx.destination_port,
        host: head.header("host").unwrap_or(""),
        method: &head.method,
        path: &head.path,
        headers: hdrs,
    }
}

/// [`decide`], with a CUSTOM policy's check made through `upstream` and its verdict
/// applied ([`crate::ext_authz`]); `h2`: the request came over HTTP/2 (the check says so).
pub(crate) async fn decide_with<'c, U: Upstream>(
    cfg: &'c WaypointConfig,
    ctx: &TunnelCtx,
    head: &mut RequestHead,
    rng: &mut dyn Rng,
    upstream: &mut U,
    h2: bool,
) -> Decided<'c> {
    let decided = match decide(cfg, ctx, head, rng) {
        // Boxed: a tunnel's future is not sized by a check it may never make.
        Action::Check { provider, auth } => {
            Box::pin(check_then_decide(
                cfg, ctx, head, rng, upstream, provider, auth, h2,
            ))
            .await
        }
        other => Decided::settle(other),
    };
    let decided = match decided {
        Decided::Forward { forward, auth } if cfg.generates_cookies => Decided::Forward {
            forward: hash_cookie(cfg, head, forward, rng),
            auth,
        },
        other => other,
    };
    let fault = match &decided {
        Decided::Forward { forward, .. } => forward.fault.clone(),
        Decided::Respond(..) => None,
    };
    match fault {
        // Boxed likewise: a delay's timer is in no other tunnel's future.
        Some(f) => Box::pin(inject_fault(f, decided, !head.keep_alive(), rng, upstream)).await,
        None => decided,
    }
}

/// Envoy's generated hash cookie: when the service balances by a consistent hash of a
/// cookie with a `ttl` (DestinationRule `consistentHash.httpCookie`) and the request has no
/// such cookie, one is made up for it (a random 64-bit hex value), the request is balanced
/// by it, and the response gives it to the client (`Set-Cookie`), whose next requests then
/// go to the same endpoint. The new cookie is added to the request's `Cookie` field, where
/// the balancer reads it (so the upstream sees it too, as it will on the client's next
/// requests).
fn hash_cookie<'c>(
    cfg: &WaypointConfig,
    head: &mut RequestHead,
    forward: Fwd<'c>,
    rng: &mut dyn Rng,
) -> Fwd<'c> {
    let Some((svc, port)) = &forward.service else {
        return forward;
    };
    let Some(crate::lb::LbPolicy::ConsistentHash(crate::lb::HashKey::Cookie(c))) =
        cfg.lb_ref(svc, Some(*port)).map(|l| &l.policy)
    else {
        return forward;
    };
    let fields = head.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    if c.ttl.is_none() || c.value_in(fields).is_some() {
        return forward;
    }
    let value = format!("{:016x}", rng.next_u64());
    let crumb = format!("{}={value}", c.name);
    match head
        .headers
        .iter_mut()
        .find(|(n, _)| n.eq_ignore_ascii_case("cookie"))
    {
        Some((_, v)) => *v = Text::from(format!("{v}; {crumb}")),
        None => head
            .headers
            .push((Text::from("cookie".to_string()), Text::from(crumb))),
    }
    let mut f: Forward = (*forward).clone();
    f.response_headers.push(HeaderModifier {
        add: vec![("set-cookie".to_string(), c.set_cookie(&value))],
        ..Default::default()
    });
    Fwd::Owned(Box::new(f))
}

/// A VirtualService's `fault` on a request about to be forwarded, as Envoy's fault filter
/// injects it: the delay (on its share of requests), then the abort (on its share), which
/// answers `fault filter abort` with the configured status (flag `FI`), or HTTP 200 with
/// `grpc-status` for a gRPC abort. The upstream never sees an aborted request.
async fn inject_fault<'c, U: Upstream>(
    fault: crate::route::Fault,
    decided: Decided<'c>,
    close: bool,
    rng: &mut dyn Rng,
    upstream: &mut U,
) -> Decided<'c> {
    if let Some((delay, share)) = fault.delay {
        if share.sampled(rng) {
            upstream.note(Note::Fault("delay"));
            monoio::time::sleep(delay).await;
        }
    }
    if let Some((abort, share)) = fault.abort {
        if share.sampled(rng) {
            upstream.note(Note::Fault("abort"));
            let resp = match abort {
                crate::route::Abort::Http(status) => {
                    simple_response(status, &[], "fault filter abort", close)
                }
                crate::route::Abort::Grpc(code) => {
                    let h = [
                        ("content-type".to_string(), "application/grpc".to_string()),
                        ("grpc-status".to_string(), code.to_string()),
                        ("grpc-message".to_string(), "fault filter abort".to_string()),
                    ];
                    simple_response(200, &h, "", close)
                }
            };
            return Decided::Respond(resp, Some(Refusal::Fault));
        }
    }
    decided
}

/// The CUSTOM check of [`decide_with`], then the rest of the decision.
#[allow(clippy::too_many_arguments)]
async fn check_then_decide<'c, U: Upstream>(
    cfg: &'c WaypointConfig,
    ctx: &TunnelCtx,
    head: &mut RequestHead,
    rng: &mut dyn Rng,
    upstream: &mut U,
    provider: &crate::ext_authz::Provider,
    auth: Option<Arc<Authenticated>>,
    h2: bool,
) -> Decided<'c> {
    let request = crate::ext_authz::check_request(provider, head, ctx, h2);
    let service = (provider.service.clone(), provider.port);
    let answer = upstream
        .side_exchange(&service, request, provider.timeout, provider.grpc)
        .await;
    let (verdict, outcome) = crate::ext_authz::verdict(provider, &answer, !head.keep_alive());
    upstream.note(Note::ExtAuthz(outcome));
    match verdict {
        crate::ext_authz::Verdict::Deny(resp, _) => Decided::Respond(resp, Some(Refusal::External)),
        crate::ext_authz::Verdict::Allow(changes) => {
            let down: Vec<(String, String)> = changes
                .iter()
                .filter_map(|c| match c {
                    crate::ext_authz::Change::Downstream(n, v) => Some((n.clone(), v.clone())),
                    _ => None,
                })
                .collect();
            crate::ext_authz::apply(head, changes);
            match decide_checked(cfg, ctx, head, rng, auth) {
                // The authorizer's fields for the client go on the route's response.
                Action::Forward { forward, auth } if !down.is_empty() => {
                    let mut f: Forward = (*forward).clone();
                    f.response_headers.push(HeaderModifier {
                        set: down,
                        ..Default::default()
                    });
                    Decided::Forward {
                        forward: Fwd::Owned(Box::new(f)),
                        auth,
                    }
                }
                other => Decided::settle(other),
            }
        }
    }
}

/// What [`decide_with`] decided: answer here (and, for an answer on the waypoint's own
/// authority, which refusal it is), or forward.
#[derive(Debug)]
pub(crate) enum Decided<'c> {
    Respond(Vec<u8>, Option<Refusal>),
    Forward {
        forward: Fwd<'c>,
        auth: Option<Arc<Authenticated>>,
    },
}

impl<'c> Decided<'c> {
    /// An action with its check made (a local answer with the refusal it is).
    fn settle(a: Action<'c>) -> Decided<'c> {
        match a {
            Action::Respond(resp) => {
                let r = Refusal::of_local(status_of(&resp));
                Decided::Respond(resp, r)
            }
            Action::Forward { forward, auth } => Decided::Forward { forward, auth },
            // Only `decide` asks for a check, and `decide_with` makes it before settling;
            // answered as an internal error rather than trusted blindly.
            Action::Check { .. } => Decided::Respond(simple_response(500, &[], "", false), None),
        }
    }
}

/// `remote.ip` (`remoteIpBlocks`) as Envoy derives it for Istio's `numTrustedProxies`
/// (`trusted`): the downstream peer (`source`) when 0; else the `trusted`-th address from
/// the right of `X-Forwarded-For` (all its lines, in order), the peer when the header has
/// fewer entries or that one is not an address. The client writes the left of the header,
/// so it is never read from there.
pub fn remote_ip(head: &RequestHead, source: IpAddr, trusted: u32) -> IpAddr {
    if trusted == 0 {
        return source;
    }
    let mut entries = head
        .headers
        .iter()
        .rev()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"))
        .flat_map(|(_, v)| v.rsplit(','));
    entries
        .nth(trusted as usize - 1)
        .and_then(|v| v.trim().parse::<IpAddr>().ok())
        .unwrap_or(source)
}

/// The request headers sent upstream: `Host` rewrite, header modifiers,
/// `x-forwarded-for` with the client appended.
pub fn routed_headers(head: &RequestHead, fwd: &Forward, client: IpAddr) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = head
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    if let Some(h) = &fwd.host {
        HeaderModifier {
            set: vec![("host".into(), h.clone())],
            ..Default::default()
        }
        .apply(&mut headers);
    }
    for m in &fwd.request_headers {
        m.apply(&mut headers);
    }
    match headers
        .iter_mut()
        .find(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"))
    {
        Some((_, v)) => {
            v.push_str(", ");
            v.push_str(&client.to_string());
        }
        None => headers.push(("x-forwarded-for".into(), client.to_string())),
    }
    headers
}

/// The request target sent upstream (a rewritten path, else path and query as received).
pub fn routed_target(head: &RequestHead, fwd: &Forward) -> String {
    match &fwd.path {
        Some(p) => p.clone(),
        None => target_of(head),
    }
}

/// The request head sent upstream as HTTP/1.1 bytes: rewrites, header modifiers,
/// `x-forwarded-for`. Without modifiers (the common case) the headers are written
/// straight from the parsed head, with no copy of the header list.
pub fn upstream_head(head: &RequestHead, fwd: &Forward, client: IpAddr) -> Vec<u8> {
    let mut out = BytesMut::new();
    upstream_head_into(&mut out, head, fwd, client);
    // Written from the start of its own allocation: the Vec takes it over, no copy.
    Vec::from(out)
}

/// [`upstream_head`] as `Bytes` cut from this thread's buffer of request heads: no
/// allocation per request (one per [`HEAD_BUFFER`] bytes of heads while earlier ones
/// are still in flight; the buffer is reused whole once they are all gone), and a clone
/// (kept for a retry) only counts a reference.
pub(crate) fn upstream_head_bytes(head: &RequestHead, fwd: &Forward, client: IpAddr) -> Bytes {
    HEADS.with_borrow_mut(|heads| {
        if heads.capacity() == 0 {
            *heads = BytesMut::with_capacity(HEAD_BUFFER);
        }
        upstream_head_into(heads, head, fwd, client);
        heads.split().freeze()
    })
}

/// The size of a thread's buffer of request heads ([`upstream_head_bytes`]).
const HEAD_BUFFER: usize = 8 * 1024;

thread_local! {
    static HEADS: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// [`upstream_head`], appended to `out` (room reserved for it first).
fn upstream_head_into(out: &mut BytesMut, head: &RequestHead, fwd: &Forward, client: IpAddr) {
    let mut ip = IpText {
        buf: [0; 48],
        len: 0,
    };
    if fwd.host.is_none() && fwd.request_headers.is_empty() {
        let fields = head.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        head_bytes(out, head, fwd, fields, Some(ip.format(client)))
    } else {
        // The routed list already has the client in `x-forwarded-for`.
        let routed = routed_headers(head, fwd, client);
        let fields = routed.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        head_bytes(out, head, fwd, fields, None)
    }
}

/// [`upstream_head`]'s bytes, appended to `out`: request line, `fields`, `client`
/// appended to the first `x-forwarded-for` (or added) when given. Sized first, so that
/// the room is reserved once (for an empty buffer exactly what the head takes, so that
/// [`upstream_head`]'s `Vec` becomes `Bytes` without another allocation).
fn head_bytes<'a>(
    out: &mut BytesMut,
    head: &RequestHead,
    fwd: &Forward,
    fields: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    client: Option<&str>,
) {
    let is_xff = |n: &str| n.eq_ignore_ascii_case("x-forwarded-for");
    let target_len = match (&fwd.path, &head.query) {
        (Some(p), _) => p.len(),
        (None, Some(q)) => head.path.len() + 1 + q.len(),
        (None, None) => head.path.len(),
    };
    let mut size = head.method.len() + 1 + target_len + " HTTP/1.1\r\n".len() + 2;
    size += fields
        .clone()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum::<usize>();
    if let Some(c) = client {
        size += if fields.clone().any(|(n, _)| is_xff(n)) {
            ", ".len() + c.len()
        } else {
            "x-forwarded-for: \r\n".len() + c.len()
        };
    }
    out.reserve(size);
    let start = out.len();
    out.extend_from_slice(head.method.as_bytes());
    out.extend_from_slice(b" ");
    match (&fwd.path, &head.query) {
        (Some(p), _) => out.extend_from_slice(p.as_bytes()),
        (None, q) => {
            out.extend_from_slice(head.path.as_bytes());
            if let Some(q) = q {
                out.extend_from_slice(b"?");
                out.extend_from_slice(q.as_bytes());
            }
        }
    }
    out.extend_from_slice(if head.version == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let mut client = client;
    for (n, v) in fields {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        if is_xff(n) {
            if let Some(c) = client.take() {
                out.extend_from_slice(b", ");
                out.extend_from_slice(c.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
    }
    if let Some(c) = client {
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(c.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    debug_assert_eq!(out.len() - start, size);
}

/// An IP address as text, formatted on the stack (IPv4 without `fmt`).
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn format(&mut self, ip: IpAddr) -> &str {
        self.len = 0;
        match ip {
            IpAddr::V4(v4) => {
                for (i, o) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b'.');
                    }
                    if o >= 100 {
                        self.push(b'0' + o / 100);
                    }
                    if o >= 10 {
                        self.push(b'0' + o / 10 % 10);
                    }
                    self.push(b'0' + o % 10);
                }
            }
            IpAddr::V6(_) => {
                use std::io::Write as _;
                let mut w = &mut self.buf[..];
                let _ = write!(w, "{ip}");
                self.len = 48 - w.len();
            }
        }
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }
}

/// The downstream byte stream (an HBONE CONNECT stream).
#[allow(async_fn_in_trait)]
pub trait Tunnel {
    /// Next chunk; `None` at end of stream.
    async fn read(&mut self) -> Option<io::Result<Bytes>>;
    async fn write(&mut self, data: Bytes) -> io::Result<()>;
    /// Close our half.
    async fn finish(&mut self) -> io::Result<()>;

    /// Write `data` (advanced as it goes out) unless the peer sends first: `Written` once
    /// all of it went, else what the peer sent (`data` keeps the unsent rest; call again
    /// to go on). Lets a request body be sent while an early response is watched for.
    /// The default (streams that cannot do both at once) just writes.
    async fn write_watching(&mut self, data: &mut Bytes) -> io::Result<Watched> {
        let d = std::mem::take(data);
        self.write(d).await?;
        Ok(Watched::Written)
    }

    /// Wait for the peer while `source` is read (`source` wins ties): what the peer sent
    /// (`Some`), or `None` with the source's next chunk. The default only reads `source`.
    async fn read_or_source<S: Tunnel>(
        &mut self,
        source: &mut S,
    ) -> Result<Option<io::Result<Bytes>>, Watched> {
        Ok(source.read().await)
    }

    /// Completes when the peer has abandoned the stream: reset it, or its connection is
    /// gone. Awaited beside the waits for the upstream, so that a request whose client
    /// left is not kept going (its upstream stream is reset). Never completes by default
    /// (a stream that cannot tell). Reads nothing: bytes the peer sent stay unread.
    async fn cancelled(&mut self) {
        std::future::pending().await
    }
}

/// What the peer did while [`Tunnel::write_watching`] wrote.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    /// Everything was written.
    Written,
    /// The peer sent these bytes first.
    Data(Bytes),
    /// The peer ended its half.
    End,
}

/// [`Tunnel::write_watching`] for an HTTP/2 stream: the send window and the receive side
/// are polled together.
pub(crate) async fn h2_write_watching(
    s: &mut hbone::stream::H2Stream,
    data: &mut Bytes,
) -> io::Result<Watched> {
    while !data.is_empty() {
        s.send.reserve_capacity(data.len());
        let send = &mut s.send;
        let recv = &mut s.recv;
        match race(
            std::future::poll_fn(|cx| send.poll_capacity(cx)),
            h2_read(recv),
        )
        .await
        {
            Either::Left(Some(Ok(0))) => continue,
            Either::Left(Some(Ok(cap))) => {
                let chunk = data.split_to(cap.min(data.len()));
                s.send.send_data(chunk, false).map_err(io::Error::other)?;
            }
            Either::Left(Some(Err(e))) => return Err(io::Error::other(e)),
            Either::Left(None) => return Err(io::Error::other("upstream stream closed")),
            Either::Right(Some(Ok(b))) => return Ok(Watched::Data(b)),
            Either::Right(Some(Err(e))) => return Err(e),
            Either::Right(None) => return Ok(Watched::End),
        }
    }
    Ok(Watched::Written)
}

/// [`Tunnel::read_or_source`] for an HTTP/2 stream.
pub(crate) async fn h2_read_or_source<S: Tunnel>(
    s: &mut hbone::stream::H2Stream,
    source: &mut S,
) -> Result<Option<io::Result<Bytes>>, Watched> {
    match race(source.read(), h2_read(&mut s.recv)).await {
        Either::Left(r) => Ok(r),
        Either::Right(Some(Ok(b))) => Err(Watched::Data(b)),
        Either::Right(Some(Err(_)) | None) => Err(Watched::End),
    }
}

/// Next non-empty chunk from an HTTP/2 receive side, its window released.
async fn h2_read(recv: &mut h2::RecvStream) -> Option<io::Result<Bytes>> {
    loop {
        match recv.data().await {
            Some(Ok(b)) if b.is_empty() => continue,
            Some(Ok(b)) => {
                let _ = recv.flow_control().release_capacity(b.len());
                return Some(Ok(b));
            }
            Some(Err(e)) => return Some(Err(io::Error::other(e))),
            None => return None,
        }
    }
}

impl Tunnel for hbone::stream::H2Stream {
    async fn read(&mut self) -> Option<io::Result<Bytes>> {
        hbone::stream::H2Stream::read(self)
            .await
            .map(|r| r.map_err(io::Error::other))
    }

    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.write_all(data, false).await.map_err(io::Error::other)
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.write_all(Bytes::new(), true)
            .await
            .map_err(io::Error::other)
    }

    async fn write_watching(&mut self, data: &mut Bytes) -> io::Result<Watched> {
        h2_write_watching(self, data).await
    }

    async fn read_or_source<S: Tunnel>(
        &mut self,
        source: &mut S,
    ) -> Result<Option<io::Result<Bytes>>, Watched> {
        h2_read_or_source(self, source).await
    }

    /// The peer's RST_STREAM, or the connection's end (the `h2` connection failed or was
    /// dropped): seen on the send side, without reading what the peer sent.
    async fn cancelled(&mut self) {
        let _ = std::future::poll_fn(|cx| self.send.poll_reset(cx)).await;
    }
}

/// The routed service's side: load balancing and upstream connections live behind this.
#[allow(async_fn_in_trait)]
pub trait Upstream {
    /// A byte stream to one endpoint, carrying one HTTP/1.1 exchange at a time.
    type Conn: Tunnel;

    /// A connection to an endpoint of `service` (`None`: the tunnel's pod, R16) for one
    /// try of `head`; `true` when it is a kept one (it may turn out closed). Every
    /// connect is followed by one [`Upstream::done`].
    async fn connect(
        &mut self,
        service: Option<&(ObjectRef, u16)>,
        head: &RequestHead,
    ) -> io::Result<(Self::Conn, bool)>;

    /// [`Upstream::connect`], told whether the request can go again on a new connection
    /// if a kept one turns out closed before any response byte (an idempotent method, its
    /// body read whole): an implementation keeping idle connections gives a long-idle one
    /// only to such a request. Each try of a forwarded request connects through this.
    async fn connect_try(
        &mut self,
        service: Option<&(ObjectRef, u16)>,
        head: &RequestHead,
        _replayable: bool,
    ) -> io::Result<(Self::Conn, bool)> {
        self.connect(service, head).await
    }

    /// The try ended: `status` (0: no response), `conn` back when it is there, kept for the
    /// next request when `reusable`; `error` when the try failed.
    fn done(
        &mut self,
        conn: Option<Self::Conn>,
        status: u16,
        reusable: bool,
        error: Option<io::ErrorKind>,
    );

    /// HTTP/2 to an endpoint of `service` (DestinationRule `useClientProtocol`): a
    /// request stream on the worker's HTTP/2 connection to it. Followed by one
    /// [`Upstream::done`] (without a connection).
    async fn h2_request(
        &mut self,
        _service: &(ObjectRef, u16),
        _req: http::Request<()>,
        _end: bool,
    ) -> io::Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no HTTP/2 upstream",
        ))
    }

    /// After [`Upstream::done`] with status 101: the connection is handed over to be
    /// spliced with the tunnel; `to_upstream` are tunnel bytes already read past the
    /// request, `head` the upgrade request and `auth` its verified JWT (what a reload
    /// authorizes again, [`allows`]).
    fn upgraded(
        &mut self,
        _to_upstream: Bytes,
        _head: &RequestHead,
        _auth: Option<Arc<Authenticated>>,
    ) {
    }

    /// One complete buffered exchange (not on the request paths, which stream; an
    /// implementation may build its mirrors on it): the complete response bytes; an error of kind `TimedOut` when no complete response came within
    /// `timeout` (`None`: no limit).
    async fn exchange(
        &mut self,
        service: Option<&(ObjectRef, u16)>,
        request: Bytes,
        timeout: Option<Duration>,
    ) -> io::Result<Vec<u8>>;

    /// A request to `service` made on the side of the one being served (an external
    /// authorizer's check, [`crate::ext_authz`]): its whole answer within `timeout` (an
    /// HTTP/2 answer's trailers among its head's fields), over HTTP/2 when `h2`. Not the
    /// request's own upstream: its telemetry still names the request's destination.
    async fn side_exchange(
        &mut self,
        service: &(ObjectRef, u16),
        request: Bytes,
        timeout: Duration,
        _h2: bool,
    ) -> io::Result<Vec<u8>> {
        self.exchange(Some(service), request, Some(timeout)).await
    }

    /// Send a copy of `request` to `service` in the background; its response is discarded
    /// and nothing waits for it.
    fn mirror(&mut self, service: &(ObjectRef, u16), request: Bytes);

    /// A request is about to be re-sent (for counters).
    fn retried(&mut self) {}

    /// Whether the request's service admits one more retry in flight (its circuit
    /// breakers' `maxRetries`, [`crate::breaker`]); asked only when a retry would be made.
    /// Refused, the try's own answer (or failure) is the request's.
    fn retry_allowed(&mut self) -> bool {
        true
    }

    /// The request was abandoned by its client (its stream reset, its connection gone)
    /// before its response was complete: a try in flight (connected, not yet
    /// [`Upstream::done`]) ends without a verdict on its endpoint (the client's leaving
    /// says nothing of the endpoint's health); counted. Its connection, dropped with the
    /// try, is reset. Called once per abandoned request, instead of `done`.
    fn cancelled(&mut self) {}

    /// Something worth counting happened.
    fn note(&mut self, _n: Note) {}

    /// The settings document's `stream_idle_timeout` and the tunnel's (or stream's) timer
    /// to keep it with: it bounds the waits of a request no route timeout bounds (the
    /// upstream's answer, the response head's write) and each wait of a streamed response
    /// body's relay (route timeout or not). `None` (the default): no bound.
    fn stream_idle(&mut self) -> Option<(&mut Clock, Duration)> {
        None
    }

    /// The tunnel's one idle timer, if the upstream keeps it: [`serve`]'s waits on the
    /// tunnel (the next request, its head, its body) then use the timer that
    /// [`Upstream::stream_idle`] gives for the waits on the upstream. They never wait at
    /// once, so a tunnel holds one timer instead of two. `None` (the default): `serve`
    /// keeps its own.
    fn clock(&mut self) -> Option<&mut Clock> {
        None
    }

    /// One request is done (answered here or upstream): metrics and the access log.
    fn record(&mut self, _r: &Record<'_>) {}

    /// Tracing on for the tunnel's destination ([`crate::spans`]): the sampling of new
    /// traces and the propagation (each request then gets a span of the waypoint's own).
    fn propagation(&mut self) -> Option<crate::spans::Propagation> {
        None
    }

    /// A request's head was read: the configuration it is served under, taken now and
    /// kept for its whole life (policy, route, retries, mirrors, response). The default
    /// keeps the one the tunnel was served with.
    fn begin(&mut self) -> Begin {
        Begin::Same
    }
}

/// The configuration a request is served under ([`Upstream::begin`]).
pub enum Begin {
    /// The one the tunnel was served with.
    Same,
    /// A newer snapshot, and the tunnel's facts under it (its R14 target resolved again,
    /// its client address).
    New(Arc<WaypointConfig>, Rc<TunnelCtx>),
    /// Under the current snapshot the tunnel's target is no longer served (R14): the
    /// request is answered `503` ([`NOT_SERVED_BODY`]) and no other goes on the tunnel.
    Refused,
}

/// The body of the `503` a request gets when its tunnel's target is no longer served.
pub const NOT_SERVED_BODY: &str = "waypoint: destination no longer served";

/// What [`Upstream::record`] gets about one finished request.
#[derive(Debug)]
pub struct Record<'a> {
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    pub method: &'a str,
    pub host: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub status: u16,
    /// Envoy's response flags: `UF`, `UT`, `NR` or `-`.
    pub flags: &'static str,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub started: Instant,
    pub traceparent: &'a str,
    /// Tracing on: the parent of the waypoint's span of it ([`Trace::span`]).
    pub span: Option<u64>,
    /// Its head, when it came whole (for a span's header tags).
    pub head: Option<&'a RequestHead>,
    /// Its `x-request-id` (the client's, else the one the waypoint gave it; empty for a
    /// request whose head never came whole).
    pub request_id: &'a str,
    /// Whether the waypoint refused it itself: AuthorizationPolicy (R15, `403`) or
    /// RequestAuthentication (a bad JWT, `401`).
    pub denied: Option<Refusal>,
}

/// Why the waypoint refused a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// AuthorizationPolicy (R15): `403`.
    Policy,
    /// RequestAuthentication: a JWT that did not verify, `401`.
    Token,
    /// A CUSTOM policy's external authorizer ([`crate::ext_authz`]): its status, response
    /// flag `UAEX`.
    External,
    /// A VirtualService's injected abort: its status, response flag `FI`.
    Fault,
}

impl Refusal {
    /// The refusal a locally answered request of `status` was ([`decide`] answers `403`
    /// for policy and `401` for a token, and no other local answer has those codes).
    pub fn of_local(status: u16) -> Option<Refusal> {
        match status {
            403 => Some(Refusal::Policy),
            401 => Some(Refusal::Token),
            _ => None,
        }
    }

    /// Envoy's response flags for a request so refused with `status`.
    pub fn flags(refusal: Option<Refusal>, status: u16) -> &'static str {
        match refusal {
            Some(Refusal::External) => "UAEX",
            Some(Refusal::Fault) => "FI",
            _ => local_flags(status),
        }
    }
}

/// Give the request an `x-request-id` when it has none (Envoy's `generate_request_id`: a
/// request's own is kept, as it is for requests from inside the mesh); returns the new one.
pub fn request_id(head: &mut RequestHead, rng: &mut dyn Rng) -> Option<Text> {
    if head
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("x-request-id"))
    {
        return None;
    }
    let id = crate::telemetry::new_request_id(rng);
    let id = Text::from(Rc::<str>::from(
        std::str::from_utf8(&id).expect("a request id is ASCII"),
    ));
    head.headers.push(("x-request-id".into(), id.clone()));
    Some(id)
}

/// Set a valid `traceparent` on the request (kept when valid, else continued from the
/// tunnel's or generated; with tracing on, `spans`, one naming the waypoint's span:
/// [`crate::telemetry::upstream_traceparent`]); returns it.
pub fn trace(
    head: &mut RequestHead,
    tunnel: Option<&str>,
    rng: &mut dyn Rng,
    spans: Option<crate::spans::Sampling>,
) -> Trace {
    let mut found: Option<usize> = None;
    let mut extra = false;
    for (i, (n, _)) in head.headers.iter().enumerate() {
        if n.eq_ignore_ascii_case("traceparent") {
            if found.is_some() {
                extra = true;
            } else {
                found = Some(i);
            }
        }
    }
    // The request's when valid (a slice of its head, no copy), else a new one.
    let own = found
        .map(|i| &head.headers[i].1)
        .filter(|v| crate::telemetry::valid_traceparent(v));
    let (new, span) = crate::telemetry::upstream_traceparent(
        own.map(|v| v.trim()),
        crate::telemetry::valid_tunnel_traceparent(tunnel),
        spans,
        rng,
    );
    let t = match (new, own) {
        (Some(new), _) => Text::from(Rc::<str>::from(
            std::str::from_utf8(&new).expect("traceparent is ASCII"),
        )),
        (None, Some(v)) => v.trimmed(),
        (None, None) => unreachable!("a new traceparent without the request's"),
    };
    if extra {
        head.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case("traceparent"));
        found = None;
    }
    match found {
        // Kept as it was: nothing to change.
        Some(i) if head.headers[i].1 == t => {}
        Some(i) => head.headers[i].1 = t.clone(),
        None => head.headers.push(("traceparent".into(), t.clone())),
    }
    Trace { value: t, span }
}

/// The response flags of a response the waypoint wrote itself (`NR`: no route matched).
pub fn local_flags(status: u16) -> &'static str {
    if status == 404 {
        "NR"
    } else {
        "-"
    }
}

/// Istio's default retry policy when the route gives none: 2 retries on connect failure,
/// refused stream, reset before a response, `503`, and the gRPC statuses `CANCELLED` (1)
/// and `UNAVAILABLE` (14) (`retry_on: connect-failure,refused-stream,unavailable,cancelled,
/// retriable-status-codes`).
pub fn default_retry() -> Retry {
    Retry {
        codes: vec![503],
        grpc: vec![1, 14],
        attempts: 2,
        backoff: None,
    }
}

/// Whether a response of `status` whose head has `grpc-status` `grpc` is one `policy`
/// retries.
pub(crate) fn retried_answer(
    policy: &Retry,
    status: u16,
    grpc: impl FnOnce() -> Option<u32>,
) -> bool {
    policy.codes.contains(&status)
        || (!policy.grpc.is_empty() && grpc().is_some_and(|g| policy.grpc.contains(&g)))
}

/// [`default_retry`], built once (not per request).
static DEFAULT_RETRY: std::sync::LazyLock<Retry> = std::sync::LazyLock::new(default_retry);

/// Envoy's default base interval between retries (doubling, at most 10×).
pub(crate) const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Methods a retry may re-send even with a body (RFC 9110 §9.2.2 idempotent methods).
pub(crate) fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// Whether a request can go again on a new connection when the kept one it was sent on
/// turns out closed before any response byte ([`attempt`] replays only a buffered body):
/// an idempotent method with its body read whole (possibly empty). A streamed body (longer
/// than [`REPLAY_BUFFER`], or of unknown length: an HTTP/2 body with no `content-length`
/// that END_STREAM ends) is gone once sent, whatever the head says.
pub(crate) fn replayable_on_new_stream(head: &RequestHead, body: &ReqBody) -> bool {
    idempotent(&head.method) && matches!(body, ReqBody::Buffered(_))
}

/// The mirrored copy of a request: `Host` gets `-shadow` appended (before any port).
pub(crate) fn shadow(request: &[u8]) -> Bytes {
    let Parsed::Head(mut head, n) = parse_head(request) else {
        return Bytes::copy_from_slice(request);
    };
    for (name, v) in head.headers.iter_mut() {
        if name.eq_ignore_ascii_case("host") {
            *v = match v.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => {
                    Text::from(format!("{h}-shadow:{p}"))
                }
                _ => Text::from(format!("{v}-shadow")),
            };
        }
    }
    let mut out = write_head(&head, None);
    out.extend_from_slice(&request[n..]);
    Bytes::from(out)
}

/// A request head as HTTP/1.1 bytes (`target` replaces path and query when given).
fn write_head(head: &RequestHead, target: Option<&str>) -> Vec<u8> {
    let target = match (target, &head.query) {
        (Some(t), _) => t.to_string(),
        (None, Some(q)) => format!("{}?{q}", head.path),
        (None, None) => head.path.to_string(),
    };
    let mut out = format!("{} {target} HTTP/1.{}\r\n", head.method, head.version);
    for (n, v) in &head.headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Why [`serve`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client closed between requests.
    Eof,
    /// The waypoint closed after answering (bad input, `Connection: close`, error).
    Closed(u16),
    /// The upstream answered `101 Switching Protocols`: the connection was handed to
    /// [`Upstream::upgraded`] to be spliced as raw bytes both ways.
    Upgraded,
}

/// Serve HTTP/1.1 requests on one tunnel until it ends.
pub async fn serve<T: Tunnel, U: Upstream>(
    tunnel: &mut T,
    cfg: &WaypointConfig,
    ctx: &TunnelCtx,
    upstream: &mut U,
    rng: &mut dyn Rng,
) -> io::Result<End> {
    serve_from(tunnel, BytesMut::new(), cfg, ctx, upstream, rng).await
}

/// The largest request body kept in memory so that a retry (or a mirror) can send it
/// again. **Retry rule:** a request whose body is at most this long is read whole before
/// the first try and may be retried (if it is body-less or idempotent, as before); a
/// longer body, or one whose length is unknown past this limit, is streamed to the one
/// try and is **never retried** (its bytes are gone). **Mirror rule:** only requests
/// whose body fits this buffer are mirrored; a streamed one is not (counted,
/// [`Note::MirrorSkipped`]).
pub const REPLAY_BUFFER: usize = 64 * 1024;

/// Events [`Upstream::note`] is told about (for counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// A request body too large for [`REPLAY_BUFFER`] was streamed (no retry possible).
    StreamedBody,
    /// A mirror was not sent because the request body was streamed.
    MirrorSkipped,
    /// `Expect: 100-continue` was answered `100 Continue` by the waypoint.
    Continue,
    /// A connection was upgraded (`101`).
    Upgraded,
    /// The route's time ran out while the request body was read (answered `504`, flags
    /// `UT`): counted with the upstream timeouts.
    RequestBodyTimeout,
    /// A request answered `408` by the waypoint (its head or body stopped coming); an
    /// upstream's `408` passed on is not one.
    RequestTimeout,
    /// A request the waypoint refused as malformed (`400`, `413`, `431`); an upstream's
    /// answer passed on is not one.
    BadRequest,
    /// The request is gRPC (`content-type: application/grpc…`): its metrics say `grpc`.
    Grpc,
    /// The `grpc-status` of the response (its head, or its trailers).
    GrpcStatus(u32),
    /// A CUSTOM policy's check was made: `allowed`, `denied` or `error`.
    ExtAuthz(&'static str),
    /// A VirtualService fault was injected: `delay` or `abort`.
    Fault(&'static str),
}

/// A request body: read whole (replayable, possibly empty), or still in the tunnel
/// (`Framing::Eof`: an HTTP/2 body of unknown length, sent chunked).
pub(crate) enum ReqBody {
    Buffered(Bytes),
    Streamed(Framing),
}

/// [`serve`], with `buf` already read from the tunnel (by protocol detection).
pub async fn serve_from<T: Tunnel, U: Upstream>(
    tunnel: &mut T,
    mut buf: BytesMut,
    cfg: &WaypointConfig,
    ctx: &TunnelCtx,
    upstream: &mut U,
    rng: &mut dyn Rng,
) -> io::Result<End> {
    let times = cfg.tunnel_timeouts();
    // Used only when the upstream has no clock to share ([`Upstream::clock`]).
    let mut own_clock = Clock::default();
    // Each request's `traceparent` is set as its head is parsed ([`trace`]), from the
    // tunnel's checked once for all its requests. The random numbers of the whole loop
    // are taken from here (the future holds them once).
    let mut tr = TraceFrom {
        tunnel: crate::telemetry::valid_tunnel_traceparent(ctx.traceparent.as_deref()),
        rng,
        spans: None,
    };
    loop {
        let propagation = upstream.propagation();
        tr.spans = propagation.map(|p| p.sampling);
        let clock = upstream.clock().unwrap_or(&mut own_clock);
        let (mut head, used, traceparent) =
            match read_head(tunnel, &mut buf, &times, clock, Some(&mut tr)).await? {
                HeadWait::Head(h, n, t) => (h, n, t),
                HeadWait::Bad(status) => return reject(tunnel, upstream, status).await,
                // No request in flight for `idle_timeout`: closed (in order, as at its end).
                HeadWait::Eof | HeadWait::Idle => return Ok(End::Eof),
                HeadWait::Slow => {
                    let resp = simple_response(408, &[], "request headers timeout", true);
                    let (n, at) = (buf.len() as u64, Instant::now());
                    let started = times.request_headers.and_then(|d| at.checked_sub(d));
                    let none = Trace::none();
                    let said = Said::new(None, n, started.unwrap_or(at), &none);
                    upstream.note(Note::RequestTimeout);
                    return answer_and_close(tunnel, upstream, &said, resp, 408, "-").await;
                }
            };
        buf.advance(used);
        let started = Instant::now();
        let mut traceparent = match traceparent {
            Some(t) => t,
            None => trace(&mut head, ctx.traceparent.as_deref(), tr.rng, tr.spans),
        };
        if let Some(trace_id_64) = propagation.and_then(|p| p.b3) {
            crate::spans::b3(&mut head, &mut traceparent, trace_id_64);
        }
        // The snapshot current now serves this request to its end (a reload since the
        // tunnel's last request applies from here on).
        let fresh = match upstream.begin() {
            Begin::Same => None,
            Begin::New(c, x) => Some((c, x)),
            Begin::Refused => {
                let resp = simple_response(503, &[], NOT_SERVED_BODY, true);
                let said = Said::new(Some(&head), used as u64, started, &traceparent);
                return answer_and_close(tunnel, upstream, &said, resp, 503, local_flags(503))
                    .await;
            }
        };
        let (cfg, ctx): (&WaypointConfig, &TunnelCtx) = match &fresh {
            Some((c, x)) => (c, x),
            None => (cfg, ctx),
        };
        let framing = match body_framing(&head) {
            Ok(BodyFraming::Length(n)) => Framing::Length(n as u64),
            Ok(BodyFraming::Chunked) => Framing::Chunked,
            Err(status) => return reject(tunnel, upstream, status).await,
        };
        let has_body = framing != Framing::Length(0);
        // `Expect`: only `100-continue` is understood (and ignored from HTTP/1.0 clients,
        // RFC 9110 §10.1.1); any other expectation is `417` (and the tunnel closed, the
        // body unread).
        let mut expect = false;
        for (n, v) in &head.headers {
            if n.eq_ignore_ascii_case("expect") {
                if !v.trim().eq_ignore_ascii_case("100-continue") {
                    return close_with(tunnel, simple_response(417, &[], "", true), 417).await;
                }
                expect = head.version == 1;
            }
        }
        let close = !head.keep_alive();
        let upgrade = allowed_upgrade(&head);
        // Policy and routing before the body is read or anything is sent upstream.
        // The forward is bound by reference: a moved-out binding would hold a second copy
        // of it in the tunnel's future beside the (still reserved) decision.
        let action = decide_with(cfg, ctx, &mut head, tr.rng, upstream, false).await;
        match action {
            Decided::Respond(resp, refusal) => {
                let status = status_of(&resp);
                let mut request_bytes = used as u64;
                // The answer goes at once, whatever the body: a body already here whole is
                // dropped from the buffer (the tunnel stays open), any other is not waited
                // for (a denied upload does not stream through the waypoint first): the
                // answer says `Connection: close` and the tunnel is closed after it, the
                // client's late bytes read and dropped for a bounded time and amount
                // ([`crate::upstream::close_stream`]), then it is reset. A client waiting
                // for `100 Continue` may or may not send its body: closed likewise.
                let mut close = close || (expect && has_body);
                if has_body && !expect {
                    match body_here(&buf, framing) {
                        Some(n) => {
                            buf.advance(n);
                            request_bytes += n as u64;
                        }
                        None => {
                            request_bytes += buf.len() as u64;
                            close = true;
                        }
                    }
                }
                let resp = if close { with_close(resp) } else { resp };
                let said = Said::new(Some(&head), request_bytes, started, &traceparent);
                let flags = Refusal::flags(refusal, status);
                upstream.record(&said.record(status, flags, &resp, refusal));
                if close {
                    return close_with(tunnel, resp, status).await;
                }
                tunnel.write(Bytes::from(resp)).await?;
            }
            Decided::Forward {
                ref forward,
                ref auth,
            } => {
                // Hop-by-hop fields and `Expect` are not passed on; only an allowed
                // upgrade is.
                normalize_request(&mut head, upgrade.as_deref());
                let request = upstream_head_bytes(&head, forward, ctx.source_ip);
                let deadline = request_deadline(forward);
                if expect {
                    // Envoy's default: the proxy answers the expectation itself once the
                    // request is allowed and routed, and does not pass it on.
                    upstream.note(Note::Continue);
                    tunnel
                        .write(Bytes::from_static(b"HTTP/1.1 100 Continue\r\n\r\n"))
                        .await?;
                }
                // Read the body whole when it fits the replay buffer; else stream it. A
                // body already here whole (or none) is taken at once; waiting for one is
                // boxed, so its state does not size every tunnel's future.
                let body = match framing {
                    Framing::Length(n) if n as usize <= REPLAY_BUFFER && buf.len() as u64 >= n => {
                        ReqBody::Buffered(buf.split_to(n as usize).freeze())
                    }
                    Framing::Length(n) if n as usize > REPLAY_BUFFER => ReqBody::Streamed(framing),
                    Framing::Length(_) | Framing::Chunked => {
                        let said = Said::new(Some(&head), used as u64, started, &traceparent);
                        let read = Box::pin(read_body(
                            tunnel,
                            &mut buf,
                            upstream,
                            &mut own_clock,
                            times.stream_idle,
                            deadline,
                            framing,
                            &said,
                        ))
                        .await;
                        match read {
                            BodyRead::Body(b) => b,
                            BodyRead::Answered(r) => return r,
                        }
                    }
                    f => ReqBody::Streamed(f),
                };
                if matches!(body, ReqBody::Streamed(_)) {
                    upstream.note(Note::StreamedBody);
                }
                // Boxed: the state of a request in flight is allocated for its duration
                // only, so a tunnel idle between requests holds a small future.
                let out = Box::pin(forward_request(
                    tunnel, &mut buf, upstream, forward, &head, request, body, has_body, tr.rng,
                    deadline,
                ))
                .await?;
                // A temporary: not held across the awaits below (the idle tunnel's future
                // would carry it).
                upstream.record(&Record {
                    protocol: "HTTP/1.1",
                    method: &head.method,
                    host: head.header("host").unwrap_or(""),
                    path: &head.path,
                    query: head.query.as_deref(),
                    status: out.status,
                    flags: out.flags,
                    request_bytes: used as u64 + out.request_body,
                    response_bytes: out.response_bytes,
                    started,
                    traceparent: &traceparent.value,
                    span: traceparent.span,
                    head: Some(&head),
                    request_id: head.header("x-request-id").unwrap_or(""),
                    denied: None,
                });
                match out.next {
                    Next::Continue if !close && head.version == 1 => {}
                    Next::Continue | Next::Close => {
                        tunnel.finish().await?;
                        return Ok(End::Closed(out.status));
                    }
                    Next::Bad(status) => return reject(tunnel, upstream, status).await,
                    Next::Abort(e) => return Err(e),
                    Next::Upgraded => {
                        upstream.upgraded(buf.split().freeze(), &head, auth.clone());
                        return Ok(End::Upgraded);
                    }
                }
            }
        }
        // The next request's head may take this one's header list.
        recycle_headers(std::mem::take(&mut head.headers));
    }
}

/// What waiting for a request body came to ([`read_body`]).
enum BodyRead {
    Body(ReqBody),
    /// The waypoint answered (`408`, `504`, `400`) and the tunnel is done: [`serve`]'s end.
    Answered(io::Result<End>),
}

/// Wait for a request body that fits the replay buffer (`Framing::Length` up to
/// [`REPLAY_BUFFER`], or chunked) to be read whole into `buf`, under the route's
/// `deadline` and, per read, `stream_idle`: the body, or the answer that ended the tunnel
/// (a chunked body that grows past the buffer is streamed instead). `said`: the request
/// (its head's bytes) for the record of such an answer.
#[allow(clippy::too_many_arguments)]
async fn read_body<T: Tunnel, U: Upstream>(
    tunnel: &mut T,
    buf: &mut BytesMut,
    upstream: &mut U,
    own_clock: &mut Clock,
    stream_idle: Option<Duration>,
    deadline: Option<Instant>,
    framing: Framing,
    said: &Said<'_>,
) -> BodyRead {
    let head = said.head.expect("a body follows a head");
    let used = said.request_bytes;
    let (started, traceparent) = (said.started, said.traceparent);
    // The request's bytes so far, for the record of an answer here.
    let read_so_far =
        |buf: &BytesMut| Said::new(Some(head), used + buf.len() as u64, started, traceparent);
    let r = match framing {
        Framing::Length(n) => {
            let clock = upstream.clock().unwrap_or(own_clock);
            let f = fill(tunnel, buf, clock, stream_idle, |b| {
                (b.len() as u64 >= n).then_some(n as usize)
            });
            match in_time(race(f, Bound::deadline(deadline)).await) {
                Some(Ok(Some(n))) => Some(Ok(Some(Ok(Some(n))))),
                Some(Ok(None)) => Some(Ok(None)),
                Some(Err(e)) => Some(Err(e)),
                None => None,
            }
        }
        _ => {
            let mut scan = crate::body::ChunkScan::default();
            let mut seen = 0;
            let clock = upstream.clock().unwrap_or(own_clock);
            let f = fill(tunnel, buf, clock, stream_idle, |b| {
                let got = scan.feed(&b[seen..]);
                let r = match got {
                    Ok(Some(k)) => Some(Ok(Some(seen + k))),
                    Ok(None) if b.len() > REPLAY_BUFFER => Some(Ok(None)),
                    Ok(None) => None,
                    // Malformed: 400 here, before any upstream stream opens.
                    Err(_) => Some(Err(())),
                };
                seen = b.len();
                r
            });
            in_time(race(f, Bound::deadline(deadline)).await)
        }
    };
    let answered = match r {
        // The route's time ran out while the body came.
        None => body_timeout(tunnel, upstream, &read_so_far(buf)).await,
        Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
            stream_timeout(tunnel, upstream, &read_so_far(buf)).await
        }
        Some(Err(e)) => Err(e),
        Some(Ok(Some(Ok(Some(n))))) => {
            return BodyRead::Body(ReqBody::Buffered(buf.split_to(n).freeze()))
        }
        Some(Ok(Some(Ok(None)))) => return BodyRead::Body(ReqBody::Streamed(Framing::Chunked)),
        Some(Ok(Some(Err(())) | None)) => reject(tunnel, upstream, 400).await,
    };
    BodyRead::Answered(answered)
}

/// How the wait for a request head ended ([`read_head`]).
enum HeadWait {
    /// The head, its length, its `traceparent` when [`read_head`] was to set one.
    Head(RequestHead, usize, Option<Trace>),
    /// Answer this status and close (see [`Parsed::Bad`]).
    Bad(u16),
    /// The tunnel ended before a byte of it.
    Eof,
    /// No byte of it came within `idle_timeout`.
    Idle,
    /// It was not complete `request_headers_timeout` after its first byte (`408`).
    Slow,
}

/// Read the next request head into `buf` (which may hold some of it already). The wait
/// for its first byte is bounded by `idle_timeout` (no request in flight), the rest by
/// `request_headers_timeout` from then on. `buf` is parsed on the first look, then only
/// once a blank line ([`head_ended`]) came: a head arriving in many small reads is
/// parsed about twice, not once per read.
async fn read_head<T: Tunnel>(
    tunnel: &mut T,
    buf: &mut BytesMut,
    times: &TunnelTimeouts,
    clock: &mut Clock,
    mut trace: Option<&mut TraceFrom<'_>>,
) -> io::Result<HeadWait> {
    let mut seen = 0;
    let mut first_byte: Option<Instant> = None;
    loop {
        if !buf.is_empty() && (seen == 0 || head_ended(buf, seen)) {
            let tr = trace.as_mut().map(|t| TraceFrom {
                tunnel: t.tunnel,
                rng: &mut *t.rng,
                spans: t.spans,
            });
            match parse_head_traced(buf, tr) {
                (Parsed::Head(h, n), t) => return Ok(HeadWait::Head(h, n, t)),
                (Parsed::Bad(status), _) => return Ok(HeadWait::Bad(status)),
                (Parsed::Partial, _) => {}
            }
        }
        seen = buf.len();
        let read = if buf.is_empty() {
            let idle = Bound::idle(times.idle.map(|d| (&mut *clock, d)));
            match in_time(race(tunnel.read(), idle).await) {
                Some(r) => r,
                None => return Ok(HeadWait::Idle),
            }
        } else {
            // From when the head was first seen incomplete (no clock read for a head that
            // comes whole).
            let left = times.request_headers.map(|d| {
                let since = *first_byte.get_or_insert_with(Instant::now);
                d.saturating_sub(since.elapsed())
            });
            let bound = Bound::idle(left.map(|d| (&mut *clock, d)));
            match in_time(race(tunnel.read(), bound).await) {
                Some(r) => r,
                None => return Ok(HeadWait::Slow),
            }
        };
        match read {
            Some(chunk) => buf.extend_from_slice(&chunk?),
            None if buf.is_empty() => return Ok(HeadWait::Eof),
            None => return Ok(HeadWait::Bad(400)),
        }
    }
}

/// Whether a head in `buf` may be complete: a blank line (`\n\n` or `\n\r\n`) ends
/// it, looked for only in what came after the first `from` bytes (less the two that
/// may start one), or it is past [`MAX_HEAD`] (to be refused).
pub(crate) fn head_ended(buf: &[u8], from: usize) -> bool {
    if buf.len() > MAX_HEAD {
        return true;
    }
    let b = &buf[from.saturating_sub(2).min(buf.len())..];
    b.iter().enumerate().any(|(i, &c)| {
        c == b'\n'
            && match b.get(i + 1) {
                Some(b'\n') => true,
                Some(b'\r') => b.get(i + 2) == Some(&b'\n'),
                _ => false,
            }
    })
}

/// When a routed request's time is up: the route's `timeouts.request` (Gateway API;
/// VirtualService `timeout`; `0s` or unset: no limit) counted from now, when the request
/// has been allowed and routed: as Envoy's router timer, it starts after the steps before
/// routing, so neither a CUSTOM policy's check nor a VirtualService's injected delay eats
/// into it. It bounds the
/// whole exchange: the request body's arrival (buffered or streamed), every try and the
/// streamed response body until its last byte; `timeouts.backendRequest` bounds each try
/// within it, from the try's first byte upstream to the response's last byte. Before the
/// response head is sent the answer is `504`; after, the response is cut (tunnel reset).
pub(crate) fn request_deadline(fwd: &Forward) -> Option<Instant> {
    fwd.timeouts
        .request
        .filter(|d| !d.is_zero())
        .map(|d| Instant::now() + d)
}

/// A timer kept out of line. A monoio `Sleep` is cache-line padded (128-byte aligned on
/// x86-64): held inline, it makes every future around it 128-byte aligned, and boxing such
/// a future costs an aligned allocation (`posix_memalign`) even when no timer runs. Boxed
/// here, a timer costs an allocation only when one is set.
pub(crate) fn timer(d: Duration) -> std::pin::Pin<Box<monoio::time::Sleep>> {
    Box::pin(monoio::time::sleep(d))
}

/// One timer for a tunnel's (or an HTTP/2 stream's) idle waits, made at the first wait
/// that is not over at once and re-armed after that, so that the waiting costs no timer
/// (nor a clock read) unless `f` has to wait.
///
/// Re-arming is lazy: [`Clock::arm`] only notes when the wait is up (`due`). The timer in
/// the wheel keeps the deadline it has as long as that is not later than `due` (a tunnel
/// re-arming the same bound for each request only moves `due` on); when it fires before
/// `due`, [`Clock::poll_expired`] sets it to `due` then. So a keep-alive tunnel's timer is
/// touched about once per idle bound, not once per request; expiry is exactly as before.
#[derive(Default)]
pub struct Clock {
    timer: Option<std::pin::Pin<Box<monoio::time::Sleep>>>,
    /// When the current wait is up (meaningful once `timer` is set).
    due: Option<monoio::time::Instant>,
}

impl Clock {
    /// `f`'s output, or `None` when it waited `idle` (counted from its first pending
    /// poll) without finishing (`f` is then dropped). `idle: None` is no bound.
    pub(crate) async fn within<F: std::future::Future>(
        &mut self,
        idle: Option<Duration>,
        f: F,
    ) -> Option<F::Output> {
        in_time(race(f, Bound::idle(idle.map(|d| (self, d)))).await)
    }

    /// Set the timer to fire `idle` from now: the one timer made at the first call; later
    /// only `due` moves, unless it comes before the timer's deadline (then the timer is
    /// reset to it).
    pub(crate) fn arm(&mut self, idle: Duration) {
        let at = monoio::time::Instant::now() + idle;
        self.due = Some(at);
        match &mut self.timer {
            Some(t) if t.deadline() > at => t.as_mut().reset(at),
            Some(_) => {}
            None => self.timer = Some(Box::pin(monoio::time::sleep_until(at))),
        }
    }

    /// Ready once the wait set by [`Clock::arm`] is up (else `cx` is woken when the timer
    /// fires); never ready before the first `arm`.
    pub(crate) fn poll_expired(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::future::Future as _;
        let (Some(t), Some(due)) = (&mut self.timer, self.due) else {
            return std::task::Poll::Pending;
        };
        loop {
            std::task::ready!(t.as_mut().poll(cx));
            if t.deadline() >= due {
                return std::task::Poll::Ready(());
            }
            // Fired for an earlier wait: on to this one's end.
            t.as_mut().reset(due);
        }
    }
}

/// What a wait is bounded by, as a future that is ready once the bound is up: nothing
/// (never ready), a deadline (its timer made at the first poll, [`timer`]), or an idle
/// bound on a stream's [`Clock`] (armed at the first poll). Raced after what it bounds
/// (`race(f, bound)`, [`in_time`]): polled only once `f` is pending, so a wait that is over
/// at once costs no timer, and `f` is held once, in place (an `async fn` taking `f` by
/// value keeps it twice: its argument and the pinned local it is moved into, and each
/// nested one doubles it again).
pub(crate) struct Bound<'c>(BoundKind<'c>);

enum BoundKind<'c> {
    Never,
    Deadline(Instant, Option<std::pin::Pin<Box<monoio::time::Sleep>>>),
    Idle {
        clock: &'c mut Clock,
        idle: Duration,
        armed: bool,
    },
}

impl<'c> Bound<'c> {
    /// Up at `deadline`; `None`: never.
    pub(crate) fn deadline(deadline: Option<Instant>) -> Bound<'static> {
        Bound(match deadline {
            Some(at) => BoundKind::Deadline(at, None),
            None => BoundKind::Never,
        })
    }

    /// Up once the clock's `idle` bound passed with no progress (counted from the first
    /// poll); `None`: never.
    pub(crate) fn idle(idle: Option<(&'c mut Clock, Duration)>) -> Bound<'c> {
        Bound(match idle {
            Some((clock, idle)) => BoundKind::Idle {
                clock,
                idle,
                armed: false,
            },
            None => BoundKind::Never,
        })
    }

    /// `deadline`, or without one the upstream's `stream_idle_timeout`
    /// ([`Upstream::stream_idle`]).
    pub(crate) fn of<U: Upstream>(up: &'c mut U, deadline: Option<Instant>) -> Bound<'c> {
        match deadline {
            Some(_) => Bound::deadline(deadline),
            None => Bound::idle(up.stream_idle()),
        }
    }
}

impl std::future::Future for Bound<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        match &mut self.0 {
            BoundKind::Never => std::task::Poll::Pending,
            BoundKind::Deadline(at, t) => t
                .get_or_insert_with(|| timer(at.saturating_duration_since(Instant::now())))
                .as_mut()
                .poll(cx),
            BoundKind::Idle { clock, idle, armed } => {
                if !*armed {
                    *armed = true;
                    clock.arm(*idle);
                }
                clock.poll_expired(cx)
            }
        }
    }
}

/// A bounded wait's outcome ([`Bound`]): what it waited for, or `None` when the bound
/// came first.
pub(crate) fn in_time<A>(e: Either<A, ()>) -> Option<A> {
    match e {
        Either::Left(a) => Some(a),
        Either::Right(()) => None,
    }
}

/// `f`'s output, or `None` when `deadline` passes first (`f` is then dropped). The timer
/// is boxed ([`timer`]): a future awaiting this without a deadline stays small and
/// ordinarily aligned. (On a hot path, race `f` with a [`Bound`] in place instead: this
/// holds `f` twice.)
pub(crate) async fn within<F: std::future::Future>(
    deadline: Option<Instant>,
    f: F,
) -> Option<F::Output> {
    in_time(race(f, Bound::deadline(deadline)).await)
}

/// [`within`] `deadline`, or without one under the upstream's `stream_idle_timeout`
/// ([`Upstream::stream_idle`]).
pub(crate) async fn bounded<U: Upstream, F: std::future::Future>(
    up: &mut U,
    deadline: Option<Instant>,
    f: F,
) -> Option<F::Output> {
    in_time(race(f, Bound::of(up, deadline)).await)
}

/// `504` for a request whose body did not come within the route's time: recorded (flags
/// `UT`) and counted ([`Note::RequestBodyTimeout`]) as the route's other timeouts, then
/// the tunnel is closed (the rest of the body is not read).
async fn body_timeout<T: Tunnel, U: Upstream>(
    tunnel: &mut T,
    upstream: &mut U,
    said: &Said<'_>,
) -> io::Result<End> {
    let resp = simple_response(504, &[], "upstream request timeout", true);
    upstream.note(Note::RequestBodyTimeout);
    answer_and_close(tunnel, upstream, said, resp, 504, "UT").await
}

/// The waypoint's answer to a request it cannot take (bad head, framing or body):
/// `status`, and the tunnel closed; `400`, `413` and `431` are counted as bad requests
/// ([`Note::BadRequest`]), an upstream's passed on never is.
async fn reject<T: Tunnel, U: Upstream>(
    tunnel: &mut T,
    upstream: &mut U,
    status: u16,
) -> io::Result<End> {
    if matches!(status, 400 | 413 | 431) {
        upstream.note(Note::BadRequest);
    }
    close_with(tunnel, simple_response(status, &[], "", true), status).await
}

/// Read from the tunnel into `buf` until `done` says how many bytes are wanted
/// (`Some`), or the tunnel ends (`None`). A read that waits `idle` fails `TimedOut`.
async fn fill<T: Tunnel, R>(
    tunnel: &mut T,
    buf: &mut BytesMut,
    clock: &mut Clock,
    idle: Option<Duration>,
    mut done: impl FnMut(&[u8]) -> Option<R>,
) -> io::Result<Option<R>> {
    loop {
        if let Some(r) = done(buf) {
            return Ok(Some(r));
        }
        let bound = Bound::idle(idle.map(|d| (&mut *clock, d)));
        match in_time(race(tunnel.read(), bound).await) {
            Some(Some(chunk)) => buf.extend_from_slice(&chunk?),
            Some(None) => return Ok(None),
            None => return Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

/// `408` (`SI`) for a request whose body stopped coming for `stream_idle_timeout`
/// (Envoy's "stream timeout" before the request was read whole); recorded, counted
/// ([`Note::RequestTimeout`]), and the tunnel is closed.
async fn stream_timeout<T: Tunnel, U: Upstream>(
    tunnel: &mut T,
    upstream: &mut U,
    said: &Said<'_>,
) -> io::Result<End> {
    let resp = simple_response(408, &[], "stream timeout", true);
    upstream.note(Note::RequestTimeout);
    answer_and_close(tunnel, upstream, said, resp, 408, "SI").await
}

/// What a request the waypoint answers itself said: its head (`None`: it never came
/// whole), the bytes read of it, when it began, its `traceparent`.
struct Said<'a> {
    head: Option<&'a RequestHead>,
    request_bytes: u64,
    started: Instant,
    traceparent: &'a Trace,
}

impl<'a> Said<'a> {
    fn new(
        head: Option<&'a RequestHead>,
        request_bytes: u64,
        started: Instant,
        traceparent: &'a Trace,
    ) -> Self {
        Said {
            head,
            request_bytes,
            started,
            traceparent,
        }
    }

    /// The record of this request answered `resp` (`status`, `flags`) by the waypoint;
    /// `denied` by policy or authentication.
    fn record(
        &self,
        status: u16,
        flags: &'static str,
        resp: &[u8],
        denied: Option<Refusal>,
    ) -> Record<'a> {
        let head = self.head;
        Record {
            protocol: "HTTP/1.1",
            method: head.map_or("", |h| &h.method),
            host: head.and_then(|h| h.header("host")).unwrap_or(""),
            path: head.map_or("", |h| &h.path),
            query: head.and_then(|h| h.query.as_deref()),
            status,
            flags,
            request_bytes: self.request_bytes,
            response_bytes: resp.len() as u64,
            started: self.started,
            traceparent: &self.traceparent.value,
            span: self.traceparent.span,
            head,
            request_id: head.and_then(|h| h.header("x-request-id")).unwrap_or(""),
            denied,
        }
    }
}

/// Answer a request locally with `resp` (`status`, `flags`), record it (metrics, access
/// log) and close the tunnel.
async fn answer_and_close<T: Tunnel, U: Upstream>(
    tunnel: &mut T,
    upstream: &mut U,
    said: &Said<'_>,
    resp: Vec<u8>,
    status: u16,
    flags: &'static str,
) -> io::Result<End> {
    upstream.record(&said.record(status, flags, &resp, None));
    close_with(tunnel, resp, status).await
}

/// What to do with the tunnel after a forwarded request.
enum Next {
    /// Serve the next request (unless the client asked to close).
    Continue,
    /// Close after this response (its body was EOF-delimited for an HTTP/1.0 client, or
    /// the request body was not fully read).
    Close,
    /// Answer this status and close (the request body was bad).
    Bad(u16),
    /// The response was cut after its head went out: reset the tunnel.
    Abort(io::Error),
    /// `101`: the connection is handed over ([`Upstream::upgraded`]).
    Upgraded,
}

pub(crate) struct Forwarded {
    status: u16,
    flags: &'static str,
    request_body: u64,
    response_bytes: u64,
    next: Next,
}

/// A response head read from the upstream.
pub(crate) struct RespHead {
    pub status: u16,
    /// Its length in the buffer.
    pub len: usize,
    pub framing: Framing,
    pub close: bool,
    /// The head has fields not to pass on as they are (hop-by-hop, duplicate or
    /// overridden `Content-Length`): see [`rewrite_response_head`].
    pub rewrite: bool,
    /// It came before the request body was all sent (an early response): the rest was
    /// not sent, so neither the upstream connection nor the tunnel can carry another
    /// request.
    pub early: bool,
    /// The whole response (head and Content-Length body) when it came as one chunk:
    /// then `ubuf` was left empty (a small response is passed on without a copy; whoever
    /// needs the bytes in `ubuf` puts them there, [`RespHead::spill`]).
    pub whole: Option<Bytes>,
    /// Its `grpc-status` (a trailers-only gRPC response), when it has one.
    pub grpc_status: Option<u32>,
}

impl RespHead {
    /// Put a response kept whole ([`RespHead::whole`]) into `ubuf`, where the rest of the
    /// code reads head and body from.
    pub(crate) fn spill(&mut self, ubuf: &mut BytesMut) {
        if let Some(w) = self.whole.take() {
            ubuf.extend_from_slice(&w);
        }
    }
}

/// Parse a response head at the start of `buf`: `None` when incomplete.
fn parse_response_head(buf: &[u8], head_request: bool) -> io::Result<Option<RespHead>> {
    #[cfg(test)]
    tests::PARSES.with(|n| n.set(n.get() + 1));
    if buf.is_empty() {
        // Nothing read yet (the usual first look): no header array to set up.
        return Ok(None);
    }
    // As for requests ([`parse_head`]): a small array first, cheap to set up per response,
    // the full one only when it is too small.
    let mut hs = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut hs);
    let parsed = match r.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => {
            let mut all = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut r2 = httparse::Response::new(&mut all);
            return match r2.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    Ok(Some(response_facts(&r2, n, head_request)?))
                }
                Ok(httparse::Status::Partial) => Ok(None),
                Err(_) => Err(io::Error::other("malformed upstream response head")),
            };
        }
        Err(_) => return Err(io::Error::other("malformed upstream response head")),
    };
    match parsed {
        httparse::Status::Complete(n) => Ok(Some(response_facts(&r, n, head_request)?)),
        httparse::Status::Partial if buf.len() > MAX_HEAD => {
            Err(io::Error::other("upstream response head too large"))
        }
        httparse::Status::Partial => Ok(None),
    }
}

fn response_facts(
    r: &httparse::Response<'_, '_>,
    n: usize,
    head_request: bool,
) -> io::Result<RespHead> {
    let status = r.code.unwrap_or(0);
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut te: Option<&[u8]> = None;
    let mut cl = None;
    let mut cls = 0;
    let mut close = r.version == Some(0);
    let mut grpc_status = None;
    // Whether a field is hop-by-hop (RFC 9110 §7.6.1): one of [`HOP_BY_HOP`], or one a
    // `Connection` names, which can only be there when a `Connection` (itself one of
    // them) is: so any [`HOP_BY_HOP`] field is the whole test.
    let mut hop = false;
    for h in r.headers.iter() {
        hop = hop || listed_hop_by_hop(h.name);
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Err(bad("several upstream transfer-encoding lines"));
            }
            te = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(content_length)
                .ok_or_else(|| bad("bad upstream content-length"))?;
            if cl.is_some_and(|c| c != v) {
                return Err(bad("conflicting upstream content-lengths"));
            }
            cl = Some(v);
            cls += 1;
        } else if h.name.eq_ignore_ascii_case("grpc-status") {
            grpc_status = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok());
        } else if h.name.eq_ignore_ascii_case("connection") {
            if contains_token(h.value, b"close") {
                close = true;
            } else if contains_token(h.value, b"keep-alive") {
                close = false;
            }
        }
    }
    // Hop-by-hop fields (RFC 9110 §7.6.1) are removed before the head goes downstream
    // (kept for a `101`, whose `Connection`/`Upgrade` the client needs); several
    // `Content-Length`s and one next to `Transfer-Encoding` are rewritten too.
    let rewrite = (status != 101 && hop) || cls > 1 || (te.is_some() && cls > 0);
    let no_body = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    let framing = if let Some(te) = te {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length (which is dropped on the
        // way down). A final coding other than chunked would be delimited by the end of
        // the connection: not passed on (the waypoint answers 503).
        let last = te.rsplit(|&b| b == b',').next().unwrap_or(b"").trim_ascii();
        if !last.eq_ignore_ascii_case(b"chunked") {
            return Err(bad("upstream transfer-encoding not ending in chunked"));
        }
        if no_body {
            Framing::Length(0)
        } else {
            Framing::Chunked
        }
    } else if no_body {
        Framing::Length(0)
    } else if let Some(len) = cl {
        // Head and body lengths are added up where the response is read and passed on: a
        // length they cannot be added to (`u64::MAX`) is a bad response, not an overflow.
        if len.checked_add(n as u64).is_none() || usize::try_from(len).is_err() {
            return Err(bad("upstream content-length too large"));
        }
        Framing::Length(len)
    } else {
        Framing::Eof
    };
    Ok(RespHead {
        status,
        len: n,
        framing,
        close,
        rewrite,
        early: false,
        whole: None,
        grpc_status,
    })
}

/// Whether the comma-separated list `v` has `token` (ASCII case ignored, whitespace
/// around list items ignored).
fn contains_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Read one final response head from `conn` into `ubuf` (interim `1xx` other than `101`
/// dropped). `got` is set once any byte arrived.
pub(crate) async fn read_response_head<C: Tunnel>(
    conn: &mut C,
    ubuf: &mut BytesMut,
    head_request: bool,
    got: &mut bool,
) -> io::Result<RespHead> {
    // As for requests ([`read_head`]): parsed on the first look, then once a blank line
    // came, not at every read.
    let mut seen = 0;
    loop {
        if seen == 0 || head_ended(ubuf, seen) {
            if let Some(h) = parse_response_head(ubuf, head_request)? {
                if (100..200).contains(&h.status) && h.status != 101 {
                    ubuf.advance(h.len);
                    seen = 0;
                    continue;
                }
                return Ok(h);
            }
        }
        seen = ubuf.len();
        match conn.read().await {
            Some(Ok(b)) => {
                *got = true;
                // The usual small response: all of it (head and a Content-Length body) in
                // one chunk, kept as it came (not copied into `ubuf`).
                if ubuf.is_empty() {
                    if let Some(mut h) = parse_response_head(&b, head_request)? {
                        let interim = (100..200).contains(&h.status) && h.status != 101;
                        if !interim
                            && matches!(h.framing, Framing::Length(n) if h.len as u64 + n == b.len() as u64)
                        {
                            h.whole = Some(b);
                            return Ok(h);
                        }
                    }
                }
                ubuf.extend_from_slice(&b);
            }
            Some(Err(e)) => return Err(e),
            None => return Err(io::Error::other("upstream closed before a response")),
        }
    }
}

/// How one try failed.
enum TryError {
    /// Upstream failure; `fresh` when no response byte came (a kept connection that turns
    /// out dead can be replaced transparently).
    Upstream { e: io::Error, fresh: bool },
    /// The downstream request body failed while being streamed.
    Body(CopyError),
    /// The client abandoned the request ([`Tunnel::cancelled`]).
    Cancelled,
}

/// One try: connect (or reuse), send the head and body, read the response head.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_async_fn)] // on purpose: see the `async` block
fn one_try<'a, T: Tunnel, U: Upstream>(
    up: &'a mut U,
    tunnel: &'a mut T,
    buf: &'a mut BytesMut,
    service: Option<&'a (ObjectRef, u16)>,
    head: &'a RequestHead,
    request: &'a Bytes,
    body: &'a ReqBody,
    sent: &'a mut u64,
) -> impl std::future::Future<Output = Result<(U::Conn, bool, RespHead, BytesMut), TryError>> + 'a {
    // An `async` block, not an `async fn`: the arguments are held once (an `async fn`
    // keeps them again in the locals it moves them into).
    async move {
        // Every wait on the upstream is raced against the client's leaving
        // ([`Tunnel::cancelled`]): a request abandoned downstream does not hold its
        // upstream stream (dropped with the try: reset) while the endpoint takes its time.
        // (Each future below is made in the `race` it is awaited in: one bound to a local
        // first would be held twice in this try's future.)
        let replayable = replayable_on_new_stream(head, body);
        let connect = race(
            up.connect_try(service, head, replayable),
            tunnel.cancelled(),
        );
        let (mut conn, reused) = match connect.await {
            Either::Left(r) => r.map_err(|e| TryError::Upstream { e, fresh: false })?,
            Either::Right(()) => return Err(TryError::Cancelled),
        };
        let fail = |e: io::Error| TryError::Upstream { e, fresh: reused };
        // The response head is watched for while the body goes out: an upstream may answer
        // early (413, 401, …) and stop reading; then the rest of the body is not sent, and
        // neither the upstream connection nor the tunnel is used again (RFC 9112 §9.6).
        let head_request = head.method == "HEAD";
        let answered = |u: &mut BytesMut| loop {
            match parse_response_head(u, head_request) {
                Ok(Some(h)) if (100..200).contains(&h.status) && h.status != 101 => {
                    u.advance(h.len)
                }
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) => return !u.is_empty(),
            }
        };
        let mut ubuf = BytesMut::new();
        let mut complete = true;
        match body {
            ReqBody::Buffered(b) => {
                // One write: head and body together.
                let mut all = if b.is_empty() {
                    request.clone()
                } else {
                    let mut all = BytesMut::with_capacity(request.len() + b.len());
                    all.extend_from_slice(request);
                    all.extend_from_slice(b);
                    all.freeze()
                };
                while !all.is_empty() {
                    let written =
                        match race(conn.write_watching(&mut all), tunnel.cancelled()).await {
                            Either::Left(w) => w.map_err(fail)?,
                            Either::Right(()) => return Err(TryError::Cancelled),
                        };
                    match written {
                        Watched::Written => {}
                        Watched::Data(d) => {
                            ubuf.extend_from_slice(&d);
                            if answered(&mut ubuf) {
                                complete = false;
                                break;
                            }
                        }
                        Watched::End => {
                            complete = false;
                            break;
                        }
                    }
                }
                *sent = b.len() as u64;
            }
            ReqBody::Streamed(framing) => {
                conn.write(request.clone()).await.map_err(fail)?;
                let encode = *framing == Framing::Eof;
                // Boxed: a streamed request body is the rare case; its copy's state would
                // otherwise size every request's future.
                let r = Box::pin(crate::body::copy_watching(
                    tunnel, buf, *framing, &mut conn, encode, &mut ubuf, answered,
                ))
                .await;
                (*sent, complete) = match r {
                    Ok(r) => r,
                    Err(CopyError::Write(e)) => return Err(TryError::Upstream { e, fresh: false }),
                    Err(e) => return Err(TryError::Body(e)),
                };
            }
        }
        let mut got = !ubuf.is_empty();
        // No byte moves while the upstream thinks: bounded by `stream_idle_timeout` (a 504).
        let read = race(
            race(
                read_response_head(&mut conn, &mut ubuf, head_request, &mut got),
                Bound::of(up, None),
            ),
            tunnel.cancelled(),
        );
        let r = match read.await {
            Either::Left(Either::Left(r)) => r,
            Either::Left(Either::Right(())) => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "stream timeout"))
            }
            Either::Right(()) => return Err(TryError::Cancelled),
        };
        match r {
            Ok(mut h) => {
                h.early = !complete;
                Ok((conn, reused, h, ubuf))
            }
            // A try cut by the idle bound is never "found closed": the upstream may have the
            // request (resending it could run it twice); a 504 counted as a timeout.
            Err(e) => Err(TryError::Upstream {
                fresh: reused && !got && e.kind() != io::ErrorKind::TimedOut,
                e,
            }),
        }
    }
}

/// What the tries of a forwarded request came to.
pub(crate) enum Attempt<C> {
    /// A final response head from the upstream (`head.len` bytes at the start of `ubuf`).
    Answer {
        conn: C,
        head: RespHead,
        ubuf: BytesMut,
        /// Request body bytes sent.
        sent: u64,
        /// When this try's time is up (the route's `backendRequest` from the try's start,
        /// within its `request` deadline): the response body must be complete by then.
        deadline: Option<Instant>,
    },
    /// Answer this locally (`503`, `504`); `close` when the streamed request body was not
    /// fully read.
    Local {
        resp: Vec<u8>,
        flags: &'static str,
        sent: u64,
        close: bool,
    },
    /// The downstream request body failed while streamed (`Some`: a read error).
    BodyFailed { sent: u64, read: Option<io::Error> },
    /// The client abandoned the request ([`Tunnel::cancelled`]); [`Upstream::cancelled`]
    /// was called.
    Cancelled { sent: u64 },
}

/// Mirrors, then the tries of a routed request with its body streamed or buffered:
/// timeouts, retries (see [`REPLAY_BUFFER`] for which requests can be retried). `source`
/// is where a streamed body comes from (the tunnel, or an HTTP/2 request stream).
#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_async_fn)] // on purpose: see the `async` block
pub(crate) fn attempt<'a, T: Tunnel, U: Upstream>(
    source: &'a mut T,
    buf: &'a mut BytesMut,
    up: &'a mut U,
    fwd: &'a Forward,
    head: &'a RequestHead,
    request: Bytes,
    body: &'a ReqBody,
    has_body: bool,
    rng: &'a mut dyn Rng,
    deadline: Option<Instant>,
) -> impl std::future::Future<Output = Attempt<U::Conn>> + 'a {
    // An `async` block, not an `async fn`: the arguments are held once (an `async fn`
    // keeps them again in the locals it moves them into).
    async move {
        let streamed = matches!(body, ReqBody::Streamed(_));
        for m in &fwd.mirrors {
            if m.sampled(rng) {
                match body {
                    ReqBody::Buffered(b) => {
                        let mut all = BytesMut::with_capacity(request.len() + b.len());
                        all.extend_from_slice(&request);
                        all.extend_from_slice(b);
                        up.mirror(&(m.service.clone(), m.port), shadow(&all));
                    }
                    ReqBody::Streamed(_) => up.note(Note::MirrorSkipped),
                }
            }
        }
        let policy = fwd.retry.as_ref().unwrap_or(&DEFAULT_RETRY);
        let replayable = !streamed && (!has_body || idempotent(&head.method));
        let nonzero = |d: &Duration| !d.is_zero();
        let remaining = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let mut retries = 0u32;
        let mut replaced = false;
        let mut sent = 0u64;
        let local = |status: u16, flags: &'static str, body: &str, sent: u64| Attempt::Local {
            resp: simple_response(status, &[], body, streamed),
            flags,
            sent,
            close: streamed,
        };
        loop {
            let left = remaining();
            if left.is_some_and(|d| d.is_zero()) {
                return local(504, "UT", "upstream request timeout", sent);
            }
            let per_try = match (fwd.timeouts.backend_request.filter(nonzero), left) {
                (Some(b), Some(l)) => Some(b.min(l)),
                (b, l) => b.or(l),
            };
            let try_deadline = per_try.map(|t| Instant::now() + t);
            let service = fwd.service.as_ref();
            // Dropped on expiry: the upstream stream is reset.
            let attempt = race(
                one_try(up, source, buf, service, head, &request, body, &mut sent),
                Bound::deadline(try_deadline),
            );
            let r = in_time(attempt.await);
            let again = retries < policy.attempts && replayable;
            match r {
                None => {
                    up.done(None, 0, false, Some(io::ErrorKind::TimedOut));
                    return local(504, "UT", "upstream request timeout", sent);
                }
                Some(Err(TryError::Cancelled)) => {
                    up.cancelled();
                    return Attempt::Cancelled { sent };
                }
                Some(Err(TryError::Body(e))) => {
                    let read = match e {
                        // The client's stream failed under its upload (reset, connection
                        // gone): it left; not the endpoint's failure.
                        CopyError::Read(e) => {
                            up.cancelled();
                            Some(e)
                        }
                        _ => {
                            up.done(None, 0, false, Some(io::ErrorKind::BrokenPipe));
                            None
                        }
                    };
                    return Attempt::BodyFailed { sent, read };
                }
                Some(Err(TryError::Upstream { e, .. }))
                    if crate::breaker::overflow_of(&e).is_some() =>
                {
                    // Refused before any endpoint was picked: not retried, nothing to end.
                    return Attempt::Local {
                        resp: upstream_failure(&e),
                        flags: failure_flags(&e),
                        sent,
                        close: streamed,
                    };
                }
                Some(Err(TryError::Upstream { e, fresh })) => {
                    if fresh && !replaced && !streamed {
                        // A kept connection the upstream had closed: once more on a new one
                        // (neither an error nor a retry).
                        up.done(None, 0, false, None);
                        replaced = true;
                        continue;
                    }
                    up.done(None, 0, false, Some(e.kind()));
                    if !again || e.kind() == io::ErrorKind::TimedOut || !up.retry_allowed() {
                        return Attempt::Local {
                            resp: upstream_failure(&e),
                            flags: failure_flags(&e),
                            sent,
                            close: streamed,
                        };
                    }
                }
                Some(Ok((conn, _, h, ubuf))) => {
                    if again
                        && retried_answer(policy, h.status, || h.grpc_status)
                        && up.retry_allowed()
                    {
                        up.done(Some(conn), h.status, false, None);
                    } else {
                        return Attempt::Answer {
                            conn,
                            head: h,
                            ubuf,
                            sent,
                            deadline: try_deadline,
                        };
                    }
                }
            }
            retries += 1;
            up.retried();
            let base = policy.backoff.unwrap_or(RETRY_BACKOFF);
            let mut wait = (base * (1 << (retries - 1).min(8))).min(base * 10);
            if let Some(l) = remaining() {
                wait = wait.min(l);
            }
            if let Either::Right(()) = race(timer(wait), source.cancelled()).await {
                up.cancelled();
                return Attempt::Cancelled { sent };
            }
        }
    }
}

/// Carry out a routed HTTP/1.1 request ([`attempt`]), then stream the response to the
/// tunnel.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_async_fn)] // on purpose: see the `async` block
pub(crate) fn forward_request<'a, T: Tunnel, U: Upstream>(
    tunnel: &'a mut T,
    buf: &'a mut BytesMut,
    up: &'a mut U,
    fwd: &'a Forward,
    head: &'a RequestHead,
    request: Bytes,
    body: ReqBody,
    has_body: bool,
    rng: &'a mut dyn Rng,
    deadline: Option<Instant>,
) -> impl std::future::Future<Output = io::Result<Forwarded>> + 'a {
    // An `async` block, not an `async fn`: the arguments are held once (an `async fn`
    // keeps them again in the locals it moves them into).
    async move {
        let streamed = matches!(body, ReqBody::Streamed(_));
        // The attempt's outcome is taken apart at once (not kept, partly moved, across the
        // waits below: it would take its own place beside the attempt's future).
        let (conn, mut h, mut ubuf, sent, deadline) = match attempt(
            tunnel, buf, up, fwd, head, request, &body, has_body, rng, deadline,
        )
        .await
        {
            Attempt::Answer {
                conn,
                head,
                ubuf,
                sent,
                deadline,
            } => (conn, head, ubuf, sent, deadline),
            other => {
                let (resp, done) = unanswered(other);
                if let Some(resp) = resp {
                    tunnel.write(resp).await?;
                }
                return Ok(done);
            }
        };
        // The common small response: head and whole body already read, passed on unchanged in
        // one write.
        if let Framing::Length(n) = h.framing {
            let whole = h.len + n as usize;
            let kept = h.whole.as_ref().is_some_and(|w| w.len() == whole);
            if fwd.response_headers.is_empty()
                && !h.rewrite
                && (kept || ubuf.len() == whole)
                && h.status != 101
            {
                let out = match h.whole.take() {
                    Some(w) => w,
                    None => ubuf.split().freeze(),
                };
                // The upstream's part is over (whatever becomes of the write): its try ends
                // here, so the balancer's count of active requests always comes back.
                let reusable = !h.close && head.keep_alive() && !h.early;
                up.done(Some(conn), h.status, reusable, None);
                // Under the try's deadline (else `stream_idle_timeout`): a client that does
                // not read cannot hold it.
                if in_time(race(tunnel.write(out), Bound::of(up, deadline)).await)
                    .transpose()?
                    .is_none()
                {
                    return Ok(response_cut(
                        h.status,
                        sent,
                        0,
                        "upstream request timeout while the response was written",
                    ));
                }
                return Ok(Forwarded {
                    status: h.status,
                    flags: "-",
                    request_body: sent,
                    response_bytes: whole as u64,
                    next: if h.early && streamed {
                        Next::Close
                    } else {
                        Next::Continue
                    },
                });
            }
        }
        // Any other: boxed, so that its state (the body's relay) does not size every
        // request's future.
        let answer = (conn, h, ubuf, sent, deadline);
        Box::pin(respond(tunnel, up, fwd, head, streamed, answer)).await
    }
}

/// What to write (if anything) and record for an [`Attempt`] that is no upstream answer.
fn unanswered<C>(a: Attempt<C>) -> (Option<Bytes>, Forwarded) {
    match a {
        Attempt::Answer { .. } => unreachable!("an answer is responded to"),
        Attempt::Local {
            resp,
            flags,
            sent,
            close,
        } => {
            let done = Forwarded {
                status: status_of(&resp),
                flags,
                request_body: sent,
                response_bytes: resp.len() as u64,
                next: if close { Next::Close } else { Next::Continue },
            };
            (Some(Bytes::from(resp)), done)
        }
        Attempt::BodyFailed { sent, read } => {
            let done = Forwarded {
                status: 400,
                flags: "DPE",
                request_body: sent,
                response_bytes: 0,
                next: match read {
                    Some(e) => Next::Abort(e),
                    None => Next::Bad(400),
                },
            };
            (None, done)
        }
        // Recorded as Envoy does a request whose client went away: no status, `DC`.
        Attempt::Cancelled { sent } => {
            let done = Forwarded {
                status: 0,
                flags: "DC",
                request_body: sent,
                response_bytes: 0,
                next: Next::Abort(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the client abandoned the request",
                )),
            };
            (None, done)
        }
    }
}

/// The response to a forwarded HTTP/1.1 request ([`forward_request`]) that is not the
/// common small one passed on in one write: the upstream's `answer` (connection, response
/// head, what was read of it, request body bytes sent, the try's deadline) streamed to
/// the tunnel, its head rewritten if need be, or an upgrade.
async fn respond<T: Tunnel, U: Upstream>(
    tunnel: &mut T,
    up: &mut U,
    fwd: &Forward,
    head: &RequestHead,
    streamed: bool,
    answer: (U::Conn, RespHead, BytesMut, u64, Option<Instant>),
) -> io::Result<Forwarded> {
    let (mut conn, mut h, mut ubuf, sent, deadline) = answer;
    // The response: its head (modified when the route says so, or re-framed), then the
    // body streamed.
    // Only an upgrade the waypoint passed on (an allowed one, [`allowed_upgrade`]) can be
    // switched to; a `101` to anything else is a bad upstream response.
    let upgrade = h.status == 101 && head.header("upgrade").is_some();
    if h.status == 101 && !upgrade {
        up.done(None, 101, false, Some(io::ErrorKind::InvalidData));
        let resp = simple_response(502, &[], "upstream switched protocols unasked", true);
        let n = resp.len() as u64;
        tunnel.write(Bytes::from(resp)).await?;
        return Ok(Forwarded {
            status: 502,
            flags: "UPE",
            request_body: sent,
            response_bytes: n,
            next: Next::Close,
        });
    }
    let eof_to_chunked = h.framing == Framing::Eof && head.version == 1 && !upgrade;
    h.spill(&mut ubuf);
    let raw_head = ubuf.split_to(h.len).freeze();
    let out_head = if fwd.response_headers.is_empty() && !eof_to_chunked && !h.rewrite {
        raw_head
    } else {
        Bytes::from(rewrite_response_head(
            &raw_head,
            &fwd.response_headers,
            eof_to_chunked,
        ))
    };
    let mut response_bytes = out_head.len() as u64;
    // Under the try's deadline, as the body; a failed write ends the try too (the
    // balancer's count of active requests comes back).
    match in_time(race(tunnel.write(out_head), Bound::of(up, deadline)).await) {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            up.done(None, h.status, false, None);
            return Err(e);
        }
        None => {
            up.done(None, h.status, false, Some(io::ErrorKind::TimedOut));
            return Ok(response_cut(
                h.status,
                sent,
                0,
                "upstream request timeout while the response was written",
            ));
        }
    }
    if upgrade {
        up.note(Note::Upgraded);
        up.done(Some(conn), 101, false, None);
        if !ubuf.is_empty() {
            tunnel.write(ubuf.split().freeze()).await?;
        }
        return Ok(Forwarded {
            status: 101,
            flags: "-",
            request_body: sent,
            response_bytes,
            next: Next::Upgraded,
        });
    }
    let framing = if h.status == 101 {
        Framing::Eof
    } else {
        h.framing
    };
    // Each wait of the body's relay (a read upstream, a write downstream) is bounded by
    // `stream_idle_timeout` too, the route's time or not.
    let idle = up.stream_idle();
    let copy = race(
        crate::body::copy_within(
            &mut conn,
            &mut ubuf,
            framing,
            Some(tunnel),
            eof_to_chunked,
            idle,
        ),
        Bound::deadline(deadline),
    );
    let Some(copied) = in_time(copy.await) else {
        // The route's time ran out after the response head went out: the tunnel is reset
        // (the client sees a cut body, never a complete-looking one).
        up.done(None, h.status, false, Some(io::ErrorKind::TimedOut));
        return Ok(response_cut(
            h.status,
            sent,
            response_bytes,
            "upstream request timeout in the response body",
        ));
    };
    match copied {
        Ok(n) => response_bytes += n,
        // No byte either way for `stream_idle_timeout` mid-body (Envoy's `SI`): cut as a
        // route timeout is, counted with the upstream timeouts.
        Err(CopyError::Idle) => {
            up.done(None, h.status, false, Some(io::ErrorKind::TimedOut));
            let why = "stream idle timeout in the response body";
            let cut = response_cut(h.status, sent, response_bytes, why);
            return Ok(Forwarded { flags: "SI", ..cut });
        }
        Err(e) => {
            up.done(None, h.status, false, Some(io::ErrorKind::UnexpectedEof));
            let e = match e {
                CopyError::Read(e) | CopyError::Write(e) => e,
                CopyError::Truncated => io::Error::other("upstream body truncated"),
                CopyError::Malformed => io::Error::other("upstream chunked body malformed"),
                CopyError::Idle => io::ErrorKind::TimedOut.into(),
            };
            return Ok(Forwarded {
                status: h.status,
                flags: "UPE",
                request_body: sent,
                response_bytes,
                next: Next::Abort(e),
            });
        }
    }
    let reusable =
        !h.close && !h.early && h.framing != Framing::Eof && ubuf.is_empty() && head.keep_alive();
    up.done(Some(conn), h.status, reusable, None);
    // After an early response to a streamed body, the rest of that body is still in the
    // tunnel: closed rather than drained.
    let next = if (h.framing == Framing::Eof && !eof_to_chunked) || (h.early && streamed) {
        Next::Close
    } else {
        Next::Continue
    };
    Ok(Forwarded {
        status: h.status,
        flags: "-",
        request_body: sent,
        response_bytes,
        next,
    })
}

/// The route's time ran out while the response went downstream (a client not reading it):
/// the tunnel is reset, so the client sees a cut response, never a complete-looking one.
fn response_cut(status: u16, sent: u64, response_bytes: u64, why: &'static str) -> Forwarded {
    Forwarded {
        status,
        flags: "UT",
        request_body: sent,
        response_bytes,
        next: Next::Abort(io::Error::new(io::ErrorKind::TimedOut, why)),
    }
}

/// An upstream response head as it goes downstream, HTTP/1.1 ([`rewrite_response_head`])
/// or HTTP/2 (`h2srv`): the status line's parts and the fields passed on.
pub(crate) struct DownstreamHead<'a> {
    pub status: u16,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub reason: &'a str,
    /// In order; borrowed from the raw head unless a `ResponseHeaderModifier` applied.
    pub fields: Vec<(Cow<'a, str>, Cow<'a, [u8]>)>,
}

/// The fields of an upstream response head that go downstream: hop-by-hop fields removed
/// (RFC 9110 §7.6.1, and those `Connection` names; for HTTP/1.1 a `101` keeps its
/// `Connection`/`Upgrade`, which the client needs), one `Content-Length` (none next to
/// `Transfer-Encoding`, RFC 9112 §6.3; its value normalised), then the route's
/// `ResponseHeaderModifier`s. For HTTP/2 (`h2`) also every field HTTP/2 forbids
/// (RFC 9113 §8.2.2, `Transfer-Encoding` included: the body is de-chunked). `None` when
/// `raw` is not a complete response head.
pub(crate) fn downstream_head<'a>(
    raw: &'a [u8],
    mods: &[HeaderModifier],
    h2: bool,
) -> Option<DownstreamHead<'a>> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut hs);
    if !matches!(r.parse(raw), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let status = r.code.unwrap_or(502);
    let connection: Vec<&str> = r
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| std::str::from_utf8(h.value).unwrap_or(""))
        .collect();
    let has_te = r
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    let keep_hop_by_hop = status == 101 && !h2;
    let mut seen_cl = false;
    let mut fields: Vec<(Cow<'a, str>, Cow<'a, [u8]>)> = Vec::with_capacity(r.headers.len());
    for h in r.headers.iter() {
        let (name, value): (&'a str, &'a [u8]) = (h.name, h.value);
        if name.eq_ignore_ascii_case("content-length") {
            if has_te || std::mem::replace(&mut seen_cl, true) {
                continue;
            }
            let v = std::str::from_utf8(value).ok().and_then(content_length);
            fields.push(match v {
                Some(n) if n.to_string().as_bytes() != value => {
                    (Cow::Borrowed(name), Cow::Owned(n.to_string().into_bytes()))
                }
                _ => (Cow::Borrowed(name), Cow::Borrowed(value)),
            });
            continue;
        }
        let dropped = if h2 {
            crate::h2srv::HOP_BY_HOP
                .iter()
                .any(|x| name.eq_ignore_ascii_case(x))
                || hop_by_hop(name, &connection)
        } else {
            !keep_hop_by_hop && hop_by_hop(name, &connection)
        };
        if !dropped {
            fields.push((Cow::Borrowed(name), Cow::Borrowed(value)));
        }
    }
    if !mods.is_empty() {
        let mut owned: Vec<(String, String)> = fields
            .iter()
            .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        for m in mods {
            m.apply(&mut owned);
        }
        fields = owned
            .into_iter()
            .map(|(n, v)| (Cow::Owned(n), Cow::Owned(v.into_bytes())))
            .collect();
    }
    Some(DownstreamHead {
        status,
        version: r.version.unwrap_or(1),
        reason: r.reason.unwrap_or(""),
        fields,
    })
}

/// A response head for an HTTP/1.1 client ([`downstream_head`]); with `chunked`,
/// re-framed as `transfer-encoding: chunked` (for an end-of-connection delimited body)
/// with an `HTTP/1.1` status line (chunked does not exist in HTTP/1.0).
fn rewrite_response_head(raw: &[u8], mods: &[HeaderModifier], chunked: bool) -> Vec<u8> {
    let Some(mut d) = downstream_head(raw, mods, false) else {
        return raw.to_vec();
    };
    if chunked {
        d.fields
            .retain(|(n, _)| !n.eq_ignore_ascii_case("transfer-encoding"));
        d.fields.push((
            Cow::Borrowed("transfer-encoding"),
            Cow::Borrowed(b"chunked"),
        ));
    }
    let version = if chunked { 1 } else { d.version };
    let mut out = Vec::with_capacity(raw.len() + 32);
    out.extend_from_slice(format!("HTTP/1.{version} {} {}\r\n", d.status, d.reason).as_bytes());
    for (k, v) in &d.fields {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The request target as received (path and query).
pub fn target_of(head: &RequestHead) -> String {
    match &head.query {
        Some(q) => format!("{}?{q}", head.path),
        None => head.path.to_string(),
    }
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Length(usize),
    /// `Transfer-Encoding: chunked`, forwarded as received.
    Chunked,
}

/// A `Content-Length` value: one or more comma-separated copies of the same decimal
/// number (RFC 9110 §8.6); digits only (no sign, no blanks inside), overflow-checked.
fn content_length(v: &str) -> Option<u64> {
    // The usual value, one plain number of up to 19 digits (which cannot overflow), read
    // at once; anything else as the list it may be.
    if (1..=19).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(v.bytes().fold(0, |n, b| n * 10 + u64::from(b - b'0')));
    }
    let mut out = None;
    for part in v.split(',') {
        let part = part.trim_matches([' ', '\t']);
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n = part.parse::<u64>().ok()?;
        if out.is_some_and(|o| o != n) {
            return None;
        }
        out = Some(n);
    }
    out
}

/// The request's body framing (RFC 9112 §6), strict about anything two parsers could
/// read differently (request smuggling): `400` for both `Transfer-Encoding` and
/// `Content-Length`, for more than one `Transfer-Encoding` line or one other than exactly
/// `chunked` (the only coding the waypoint forwards), for `Transfer-Encoding` in an
/// HTTP/1.0 request, for `Content-Length` values that differ or are not all digits, and
/// for more than one `Host`, or none in an HTTP/1.1 request (RFC 9112 §3.2). Several
/// equal `Content-Length` values are one length (the upstream gets a single
/// `Content-Length`, [`normalize_request`]).
pub fn body_framing(head: &RequestHead) -> Result<BodyFraming, u16> {
    let (mut te, mut tes, mut cl, mut hosts) = (None, 0, None::<u64>, 0);
    for (n, v) in &head.headers {
        if n.eq_ignore_ascii_case("transfer-encoding") {
            tes += 1;
            te = Some(v.as_str());
        } else if n.eq_ignore_ascii_case("content-length") {
            let len = content_length(v).ok_or(400u16)?;
            if cl.is_some_and(|c| c != len) {
                return Err(400);
            }
            cl = Some(len);
        } else if n.eq_ignore_ascii_case("host") {
            hosts += 1;
        }
    }
    if hosts > 1 || (hosts == 0 && head.version == 1) || tes > 1 {
        return Err(400);
    }
    match (te, cl) {
        (Some(_), Some(_)) => Err(400),
        (Some(te), None) => {
            if te.trim_matches([' ', '\t']).eq_ignore_ascii_case("chunked") && head.version == 1 {
                Ok(BodyFraming::Chunked)
            } else {
                Err(400)
            }
        }
        (None, Some(n)) => usize::try_from(n).map(BodyFraming::Length).map_err(|_| 400),
        (None, None) => Ok(BodyFraming::Length(0)),
    }
}

/// Upgrades passed on to the upstream (as Istio's default `upgradeConfigs`): only
/// websocket. Any other (`h2c`, …) is stripped, so the request is an ordinary one and
/// the tunnel stays under L7 policy and routing.
pub const ALLOWED_UPGRADES: &[&str] = &["websocket"];

/// The upgrade a request asks for, when it is allowed: HTTP/1.1, an `Upgrade` whose
/// protocol is in [`ALLOWED_UPGRADES`] and a `Connection` with the `upgrade` token.
pub fn allowed_upgrade(head: &RequestHead) -> Option<String> {
    if head.version != 1 {
        return None;
    }
    let mut upgrades = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("upgrade"));
    let (_, v) = upgrades.next()?;
    if upgrades.next().is_some() {
        return None;
    }
    let proto = v.trim();
    let name = proto.split('/').next().unwrap_or("");
    let allowed = ALLOWED_UPGRADES
        .iter()
        .any(|a| a.eq_ignore_ascii_case(name.trim()))
        && !proto.contains(',');
    let token = head.headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("connection") && contains_token(v.as_bytes(), b"upgrade")
    });
    (allowed && token).then(|| proto.to_string())
}

/// Hop-by-hop fields (RFC 9110 §7.6.1) never passed on by the waypoint (besides any
/// field named in `Connection`).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "http2-settings",
];

/// Whether `name` is one of [`HOP_BY_HOP`] (looked for only at their lengths: most
/// fields are not one).
fn listed_hop_by_hop(name: &str) -> bool {
    matches!(name.len(), 2 | 7 | 10 | 14 | 16)
        && HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Fields a `Connection` header cannot make hop-by-hop: the message framing and the
/// target, which the waypoint relies on (dropping them would desynchronise the upstream).
const NOT_DROPPABLE: &[&str] = &["content-length", "transfer-encoding", "host"];

/// Whether field `name` is hop-by-hop for a message whose `Connection` fields are
/// `connection`.
pub(crate) fn hop_by_hop(name: &str, connection: &[&str]) -> bool {
    listed_hop_by_hop(name)
        || (!connection.is_empty()
            && !NOT_DROPPABLE.iter().any(|h| name.eq_ignore_ascii_case(h))
            && connection.iter().any(|c| {
                c.split(',')
                    .any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case(name))
            }))
}

/// The request as it goes upstream (after [`body_framing`] accepted it): hop-by-hop
/// fields removed (RFC 9110 §7.6.1: `Connection`, `Keep-Alive`, `Proxy-Connection`, `TE`,
/// `Upgrade`, `HTTP2-Settings` and every field `Connection` names), an allowed `upgrade`
/// put back as `Upgrade` + `Connection: upgrade`, `Expect` dropped (the waypoint answers
/// it), several equal `Content-Length`s made one.
pub fn normalize_request(head: &mut RequestHead, upgrade: Option<&str>) {
    let connection: Vec<Text> = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| v.clone())
        .collect();
    let connection: Vec<&str> = connection.iter().map(|s| s.as_str()).collect();
    let mut seen_cl = false;
    head.headers.retain_mut(|(n, v)| {
        if n.eq_ignore_ascii_case("content-length") {
            if seen_cl {
                return false;
            }
            seen_cl = true;
            if let Some(len) = content_length(v) {
                // Rewritten only when it is not already the plain number.
                if v.bytes().any(|b| !b.is_ascii_digit()) || (v.len() > 1 && v.starts_with('0')) {
                    *v = Text::from(len.to_string());
                }
            }
            return true;
        }
        !(n.eq_ignore_ascii_case("expect") || hop_by_hop(n, &connection))
    });
    if let Some(u) = upgrade {
        head.headers.push(("connection".into(), "upgrade".into()));
        head.headers
            .push(("upgrade".into(), Text::from(u.to_string())));
    }
}

/// The answer to a failed upstream exchange, as Envoy/Istio give it: `504` when the
/// response did not come in time, `503` otherwise (connect failure, refused, reset before
/// a response, no healthy endpoint).
/// Envoy's response flag for a try that failed with `e`: `UO` (a circuit breaker's
/// overflow), `UT` (timeout) or `UF` (connect or stream failure).
pub fn failure_flags(e: &io::Error) -> &'static str {
    if crate::breaker::overflow_of(e).is_some() {
        "UO"
    } else if e.kind() == io::ErrorKind::TimedOut {
        "UT"
    } else {
        "UF"
    }
}

pub fn upstream_failure(e: &io::Error) -> Vec<u8> {
    if crate::breaker::overflow_of(e).is_some() {
        // Envoy's answer to a circuit breaker's overflow.
        simple_response(
            503,
            &[("x-envoy-overloaded".into(), "true".into())],
            crate::breaker::OVERFLOW_BODY,
            false,
        )
    } else if e.kind() == io::ErrorKind::TimedOut {
        simple_response(504, &[], "upstream request timeout", false)
    } else {
        simple_response(
            503,
            &[],
            "upstream connect error or disconnect/reset before headers",
            false,
        )
    }
}

fn status_of(resp: &[u8]) -> u16 {
    resp.get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// How long the request body of `framing` is when all of it is already in `buf`.
fn body_here(buf: &[u8], framing: Framing) -> Option<usize> {
    match framing {
        Framing::Length(n) => (buf.len() as u64 >= n).then_some(n as usize),
        Framing::Chunked => crate::service::chunked_end(buf),
        Framing::Eof => None,
    }
}

/// `resp` (a response the waypoint wrote) saying `Connection: close`.
fn with_close(mut resp: Vec<u8>) -> Vec<u8> {
    let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return resp;
    };
    let says = resp[..end]
        .split(|&b| b == b'\n')
        .any(|l| l.trim_ascii().eq_ignore_ascii_case(b"connection: close"));
    if !says {
        resp.splice(end + 2..end + 2, b"connection: close\r\n".iter().copied());
    }
    resp
}

async fn close_with<T: Tunnel>(tunnel: &mut T, resp: Vec<u8>, status: u16) -> io::Result<End> {
    tunnel.write(Bytes::from(resp)).await?;
    tunnel.finish().await?;
    Ok(End::Closed(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(raw: &[u8]) -> RequestHead {
        match parse_head(raw) {
            Parsed::Head(h, _) => h,
            other => panic!("{other:?}"),
        }
    }

    /// `Connection` is a list of case-insensitive tokens over any number of field lines
    /// (RFC 9110 §7.6.1); `close` ends the connection, HTTP/1.0 persists only with
    /// `keep-alive` (RFC 9112 §9.3). An option is a whole token: `x-close` or
    /// `keep-alive-ish` are other options (a substring match took them for these).
    #[test]
    fn keep_alive_reads_connection_as_a_token_list() {
        let cases: &[(&str, &str, bool)] = &[
            ("1.1", "", true),
            ("1.1", "connection: close\r\n", false),
            ("1.1", "connection: CLOSE\r\n", false),
            ("1.1", "connection: te, Close \r\n", false),
            ("1.1", "connection: te,close\r\n", false),
            ("1.1", "connection: te\r\nconnection: close\r\n", false),
            ("1.1", "connection: x-close\r\n", true),
            ("1.1", "connection: closed\r\n", true),
            ("1.1", "connection: upgrade, enclose\r\n", true),
            ("1.1", "x-note: close\r\n", true),
            ("1.0", "", false),
            ("1.0", "connection: keep-alive\r\n", true),
            ("1.0", "connection: Keep-Alive\r\n", true),
            ("1.0", "connection: te , keep-alive\r\n", true),
            ("1.0", "connection: te\r\nconnection: keep-alive\r\n", true),
            ("1.0", "connection: keep-alive-ish\r\n", false),
            ("1.0", "connection: no-keep-alive\r\n", false),
            ("1.0", "connection: keep-alive, close\r\n", false),
        ];
        for (version, fields, want) in cases {
            let raw = format!("GET / HTTP/{version}\r\nhost: echo\r\n{fields}\r\n");
            let head = head_of(raw.as_bytes());
            assert_eq!(head.keep_alive(), *want, "HTTP/{version} with {fields:?}");
        }
    }

    /// The request heads going upstream are cut from one buffer per thread: the same
    /// bytes as [`upstream_head`], cut one after the other (a head still held keeps its
    /// bytes); once the buffer is used up and none is held, it is reused from its start
    /// (no allocation per request).
    #[test]
    fn upstream_heads_share_a_reused_buffer() {
        // A thread of its own: its buffer is new.
        std::thread::spawn(|| {
            let fwd = Forward::default();
            let client: IpAddr = "10.0.0.9".parse().unwrap();
            let a = head_of(b"GET /a HTTP/1.1\r\nhost: echo\r\n\r\n");
            let b =
                head_of(b"POST /b?x=1 HTTP/1.1\r\nhost: echo\r\nx-forwarded-for: 1.2.3.4\r\n\r\n");
            let first = upstream_head_bytes(&a, &fwd, client);
            assert_eq!(&first[..], &upstream_head(&a, &fwd, client)[..]);
            let kept = first.clone();
            let second = upstream_head_bytes(&b, &fwd, client);
            assert_eq!(&second[..], &upstream_head(&b, &fwd, client)[..]);
            assert_eq!(
                second.as_ptr(),
                first[first.len()..].as_ptr(),
                "cut after the first"
            );
            assert_eq!(
                &kept[..],
                &upstream_head(&a, &fwd, client)[..],
                "the first kept"
            );
            // Dropped as they go, heads are cut one after the other until the buffer is
            // used up, then from its start again.
            let (start, mut end) = (first.as_ptr(), second[second.len()..].as_ptr());
            drop((first, kept, second));
            let mut wrapped = false;
            for _ in 0..HEAD_BUFFER {
                let h = upstream_head_bytes(&b, &fwd, client);
                assert_eq!(&h[..], &upstream_head(&b, &fwd, client)[..]);
                if h.as_ptr() == start {
                    wrapped = true;
                    break;
                }
                assert_eq!(h.as_ptr(), end, "cut after the previous one");
                end = h[h.len()..].as_ptr();
            }
            assert!(wrapped, "the buffer is reused from its start");
        })
        .join()
        .unwrap();
    }

    /// An upstream stream that yields one response, then its end.
    struct OneResponse(Option<Bytes>);

    impl Tunnel for OneResponse {
        async fn read(&mut self) -> Option<io::Result<Bytes>> {
            self.0.take().map(Ok)
        }
        async fn write(&mut self, _data: Bytes) -> io::Result<()> {
            Ok(())
        }
        async fn finish(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A downstream client that went away: every write fails.
    struct Gone;

    impl Tunnel for Gone {
        async fn read(&mut self) -> Option<io::Result<Bytes>> {
            None
        }
        async fn write(&mut self, _data: Bytes) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        async fn finish(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    /// A scripted upstream: each try (always through `connect_try`) gets `response` on a
    /// new stream and is recorded with what it was told about replaying (`replays`); one
    /// endpoint balanced by least request, as the service's upstream does (a try starts a
    /// request on it, `done` finishes it).
    struct Scripted {
        lb: crate::lb::Balancer,
        response: &'static [u8],
        replays: Vec<bool>,
    }

    impl Scripted {
        fn new(response: &'static [u8]) -> Scripted {
            Scripted {
                lb: crate::lb::Balancer::new(1, crate::lb::LbPolicy::LeastRequest, None),
                response,
                replays: Vec::new(),
            }
        }
    }

    impl Upstream for Scripted {
        type Conn = OneResponse;

        async fn connect(
            &mut self,
            _service: Option<&(ObjectRef, u16)>,
            _head: &RequestHead,
        ) -> io::Result<(OneResponse, bool)> {
            unreachable!("tries connect through connect_try")
        }

        async fn connect_try(
            &mut self,
            _service: Option<&(ObjectRef, u16)>,
            _head: &RequestHead,
            replayable: bool,
        ) -> io::Result<(OneResponse, bool)> {
            self.replays.push(replayable);
            let input = crate::lb::HashInput {
                headers: &[],
                source_ip: None,
                query: None,
            };
            let mut rng = crate::lb::SplitMix64(1);
            let i = self.lb.pick(&input, Instant::now(), &mut rng).unwrap();
            self.lb.start(i);
            Ok((OneResponse(Some(Bytes::from_static(self.response))), false))
        }

        fn done(
            &mut self,
            _c: Option<OneResponse>,
            status: u16,
            _r: bool,
            _e: Option<io::ErrorKind>,
        ) {
            self.lb.finish(0, status, Instant::now());
        }

        async fn exchange(
            &mut self,
            _service: Option<&(ObjectRef, u16)>,
            _request: Bytes,
            _timeout: Option<Duration>,
        ) -> io::Result<Vec<u8>> {
            Err(io::Error::other("not used here"))
        }

        fn mirror(&mut self, _service: &(ObjectRef, u16), _request: Bytes) {}
    }

    /// A runtime for a test's futures (epoll: no ring needed).
    fn test_runtime() -> runtime::driver::MeshRuntime {
        runtime::driver::build_runtime(
            &runtime::driver::DriverDecision {
                kind: runtime::DriverKind::Epoll,
                reason: "test".into(),
            },
            64,
        )
        .unwrap()
        .0
    }

    /// An upstream stream that never answers.
    struct Silent;

    impl Tunnel for Silent {
        async fn read(&mut self) -> Option<io::Result<Bytes>> {
            std::future::pending().await
        }
        async fn write(&mut self, _data: Bytes) -> io::Result<()> {
            Ok(())
        }
        async fn finish(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A client that has left: its stream is reset ([`Tunnel::cancelled`] at once).
    struct Left;

    impl Tunnel for Left {
        async fn read(&mut self) -> Option<io::Result<Bytes>> {
            Some(Err(io::ErrorKind::ConnectionReset.into()))
        }
        async fn write(&mut self, _data: Bytes) -> io::Result<()> {
            Err(io::ErrorKind::ConnectionReset.into())
        }
        async fn finish(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::ConnectionReset.into())
        }
        async fn cancelled(&mut self) {}
    }

    /// One least-request endpoint whose streams never answer; counts `done` and
    /// `cancelled`, and releases the endpoint on `cancelled` as the service's upstream
    /// does.
    struct Holding {
        lb: crate::lb::Balancer,
        dones: usize,
        cancels: usize,
    }

    impl Upstream for Holding {
        type Conn = Silent;

        async fn connect(
            &mut self,
            _service: Option<&(ObjectRef, u16)>,
            _head: &RequestHead,
        ) -> io::Result<(Silent, bool)> {
            let input = crate::lb::HashInput {
                headers: &[],
                source_ip: None,
                query: None,
            };
            let mut rng = crate::lb::SplitMix64(1);
            let i = self.lb.pick(&input, Instant::now(), &mut rng).unwrap();
            self.lb.start(i);
            Ok((Silent, false))
        }

        fn done(&mut self, _c: Option<Silent>, status: u16, _r: bool, _e: Option<io::ErrorKind>) {
            self.dones += 1;
            self.lb.finish(0, status, Instant::now());
        }

        fn cancelled(&mut self) {
            self.cancels += 1;
            self.lb.release(0);
        }

        async fn exchange(
            &mut self,
            _service: Option<&(ObjectRef, u16)>,
            _request: Bytes,
            _timeout: Option<Duration>,
        ) -> io::Result<Vec<u8>> {
            Err(io::Error::other("not used here"))
        }

        fn mirror(&mut self, _service: &(ObjectRef, u16), _request: Bytes) {}
    }

    /// A request whose client left while it waited for an upstream that does not answer
    /// ends as cancelled (the try dropped), not as done: the endpoint's count of active
    /// requests comes back to 0 and no verdict is given on it. A forwarded HTTP/1.1
    /// request is then recorded with status 0 and `DC`, and the tunnel aborted.
    #[test]
    fn a_client_leaving_cancels_the_try_without_a_verdict() {
        let mut rt = test_runtime();
        let req = b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n";
        let head = head_of(req);
        let mut up = Holding {
            lb: crate::lb::Balancer::new(1, crate::lb::LbPolicy::LeastRequest, None),
            dones: 0,
            cancels: 0,
        };
        let a = rt.block_on(attempt(
            &mut Left,
            &mut BytesMut::new(),
            &mut up,
            &Forward::default(),
            &head,
            Bytes::from_static(req),
            &ReqBody::Buffered(Bytes::new()),
            false,
            &mut crate::lb::SplitMix64(2),
            None,
        ));
        assert!(matches!(a, Attempt::Cancelled { sent: 0 }));
        assert_eq!((up.lb.active(0), up.dones, up.cancels), (0, 0, 1));
        let out = rt
            .block_on(forward_request(
                &mut Left,
                &mut BytesMut::new(),
                &mut up,
                &Forward::default(),
                &head,
                Bytes::from_static(req),
                ReqBody::Buffered(Bytes::new()),
                false,
                &mut crate::lb::SplitMix64(2),
                None,
            ))
            .unwrap();
        assert_eq!((out.status, out.flags), (0, "DC"));
        assert!(matches!(out.next, Next::Abort(_)));
        assert_eq!((up.lb.active(0), up.dones, up.cancels), (0, 0, 2));
    }

    /// A client that disconnects while the response goes out (the whole one-chunk
    /// response, or the head of a streamed one) leaves no request counted as active on
    /// the endpoint (least-request balancing would avoid it for ever).
    #[test]
    fn least_request_count_returns_to_zero_when_the_client_is_gone() {
        let mut rt = test_runtime();
        for response in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ] {
            let mut up = Scripted::new(response);
            let head = head_of(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n");
            let r = rt.block_on(forward_request(
                &mut Gone,
                &mut BytesMut::new(),
                &mut up,
                &Forward::default(),
                &head,
                Bytes::from_static(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n"),
                ReqBody::Buffered(Bytes::new()),
                false,
                &mut crate::lb::SplitMix64(2),
                None,
            ));
            assert_eq!(r.err().map(|e| e.kind()), Some(io::ErrorKind::BrokenPipe));
            assert_eq!(up.lb.active(0), 0);
        }
    }

    /// The per-request future `serve_from` boxes holds no timer inline (a monoio timer is
    /// 128-byte aligned, and an over-aligned box is a `posix_memalign` per request): the
    /// route's timers are boxed when set ([`timer`]).
    #[test]
    fn forward_request_future_is_not_over_aligned() {
        let mut up = Scripted::new(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        let head = head_of(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n");
        let (mut buf, mut rng, fwd) = (
            BytesMut::new(),
            crate::lb::SplitMix64(2),
            Forward::default(),
        );
        let mut gone = Gone;
        let f = forward_request(
            &mut gone,
            &mut buf,
            &mut up,
            &fwd,
            &head,
            Bytes::new(),
            ReqBody::Buffered(Bytes::new()),
            false,
            &mut rng,
            None,
        );
        let (size, align) = (std::mem::size_of_val(&f), std::mem::align_of_val(&f));
        assert!(
            align <= 16,
            "forward_request future: {size} bytes, aligned to {align}"
        );
    }

    thread_local! {
        /// Calls of [`parse_head`] and [`parse_response_head`] on this thread.
        pub(super) static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A peer that sends `data` one byte per read, then its end.
    struct ByteByByte(Vec<u8>, usize);

    impl Tunnel for ByteByByte {
        async fn read(&mut self) -> Option<io::Result<Bytes>> {
            let b = *self.0.get(self.1)?;
            self.1 += 1;
            Some(Ok(Bytes::copy_from_slice(&[b])))
        }
        async fn write(&mut self, _data: Bytes) -> io::Result<()> {
            Ok(())
        }
        async fn finish(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A head of `fields` lines after `first`, ending in a blank line.
    fn big_head(first: &str, fields: usize) -> Vec<u8> {
        let mut h = format!("{first}\r\nhost: echo\r\n");
        for i in 0..fields {
            h.push_str(&format!("x-field-{i}: {}\r\n", "v".repeat(40)));
        }
        h.push_str("\r\n");
        h.into_bytes()
    }

    /// A request head (and a response head) that comes one byte per read is parsed a
    /// bounded number of times, not once per read (which made a 60 KB head cost 60,000
    /// parses): the blank line that ends it is looked for in the new bytes only.
    #[test]
    fn a_head_read_one_byte_at_a_time_is_parsed_a_few_times_not_per_byte() {
        let mut rt = test_runtime();
        let req = big_head("GET /a HTTP/1.1", 90);
        assert!(req.len() > 4000);
        PARSES.with(|n| n.set(0));
        let mut tunnel = ByteByByte(req.clone(), 0);
        let (mut buf, mut clock) = (BytesMut::new(), Clock::default());
        let times = TunnelTimeouts::default();
        let got = rt.block_on(read_head(&mut tunnel, &mut buf, &times, &mut clock, None));
        match got.unwrap() {
            HeadWait::Head(h, n, _) => {
                assert_eq!(n, req.len());
                assert_eq!(h.headers.len(), 91);
                assert_eq!(&*h.path, "/a");
            }
            _ => panic!("no head"),
        }
        let parses = PARSES.with(|n| n.get());
        assert!(parses <= 2, "{parses} parses for a {} byte head", req.len());

        let resp = big_head("HTTP/1.1 200 OK", 90);
        PARSES.with(|n| n.set(0));
        let mut conn = ByteByByte(resp.clone(), 0);
        let (mut ubuf, mut got) = (BytesMut::new(), false);
        let h = rt
            .block_on(read_response_head(&mut conn, &mut ubuf, false, &mut got))
            .unwrap();
        assert_eq!((h.status, h.len), (200, resp.len()));
        let parses = PARSES.with(|n| n.get());
        assert!(
            parses <= 4,
            "{parses} parses for a {} byte head",
            resp.len()
        );

        // Past the largest head without an end: refused once, not parsed per byte.
        let mut endless = big_head("GET /a HTTP/1.1", 2000);
        endless.truncate(MAX_HEAD + 100);
        PARSES.with(|n| n.set(0));
        let mut tunnel = ByteByByte(endless, 0);
        let mut buf = BytesMut::new();
        let got = rt.block_on(read_head(&mut tunnel, &mut buf, &times, &mut clock, None));
        assert!(matches!(got.unwrap(), HeadWait::Bad(431)));
        assert!(PARSES.with(|n| n.get()) <= 2);
    }

    /// Where a head may end: a blank line (CRLF or bare LF) in the new bytes, or one that
    /// straddles the old and new bytes.
    #[test]
    fn head_end_is_found_in_new_bytes_and_across_reads() {
        let t: &[(&[u8], usize, bool)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", 0, true),
            (b"GET / HTTP/1.1\r\n\r\n", 17, true),
            (b"GET / HTTP/1.1\r\n\r\n", 16, true),
            (b"GET / HTTP/1.1\n\n", 15, true),
            (b"GET / HTTP/1.1\r\nhost: a\r\n", 0, false),
            (b"GET / HTTP/1.1\r\nhost: a\r\n\r", 27, false),
            (b"", 0, false),
        ];
        for (buf, from, want) in t {
            assert_eq!(
                head_ended(buf, *from),
                *want,
                "{:?} from {from}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    /// An upstream `Content-Length` that the head's length cannot be added to is a bad
    /// response (an error, so the client gets the waypoint's answer), not an overflow
    /// (a panic in a debug build), also when the whole response comes in one chunk.
    #[test]
    fn an_upstream_content_length_of_u64_max_is_a_bad_response() {
        let mut rt = test_runtime();
        let raw: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\n";
        let e = parse_response_head(raw, false).err().expect("accepted");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut conn = OneResponse(Some(Bytes::from_static(raw)));
        let (mut ubuf, mut got) = (BytesMut::new(), false);
        let r = rt.block_on(read_response_head(&mut conn, &mut ubuf, false, &mut got));
        assert_eq!(r.err().map(|e| e.kind()), Some(io::ErrorKind::InvalidData));
        // The largest that fits still passes as a length.
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n";
        let h = parse_response_head(ok, false).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Length(1_000_000_000_000));
    }

    /// A response head with more fields than the first, small header array still parses
    /// (the full array then), its framing read from a field past the small one's end.
    #[test]
    fn response_heads_with_many_fields_parse() {
        for n in [0, 31, 32, 40, 200] {
            let mut raw = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..n {
                raw.push_str(&format!("x-f{i}: {i}\r\n"));
            }
            raw.push_str("content-length: 3\r\n\r\nabc");
            let h = parse_response_head(raw.as_bytes(), false)
                .unwrap()
                .unwrap_or_else(|| panic!("{n} fields: incomplete"));
            assert_eq!(h.status, 200);
            assert_eq!(h.framing, Framing::Length(3), "{n} fields");
            assert_eq!(h.len, raw.len() - 3, "{n} fields");
        }
        assert!(parse_response_head(b"", false).unwrap().is_none());
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\n", false)
            .unwrap()
            .is_none());
    }

    /// A trailers-only gRPC head's `grpc-status` is read with the head's other fields, and
    /// Istio's default policy retries UNAVAILABLE by it (an HTTP 200), not OK.
    #[test]
    fn response_head_grpc_status_decides_a_grpc_retry() {
        let head = |g: &str| {
            let raw = format!("HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\nGrpc-Status: {g}\r\ncontent-length: 0\r\n\r\n");
            parse_response_head(raw.as_bytes(), false).unwrap().unwrap()
        };
        let policy = default_retry();
        let (unavailable, ok) = (head("14"), head("0"));
        assert_eq!(
            (unavailable.grpc_status, ok.grpc_status),
            (Some(14), Some(0))
        );
        assert!(retried_answer(&policy, 200, || unavailable.grpc_status));
        assert!(!retried_answer(&policy, 200, || ok.grpc_status));
        let plain = parse_response_head(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(plain.grpc_status, None);
        assert!(!retried_answer(&policy, 200, || plain.grpc_status));
        assert!(retried_answer(&policy, 503, || plain.grpc_status));
    }

    /// Only a request that can be sent again on a new stream (idempotent, its body read
    /// whole) may take a long-idle kept one. An HTTP/2 body of unknown length (no
    /// `content-length`, ended by END_STREAM) is streamed: its HTTP/1.1 head upstream has
    /// neither `content-length` nor `transfer-encoding` (h2srv adds the framing to the
    /// bytes, not the head), yet it cannot be replayed.
    #[test]
    fn only_buffered_idempotent_requests_are_replayable_on_a_new_stream() {
        let mut rt = test_runtime();
        let small = Bytes::from_static(b"0123456789");
        let cases = [
            (
                "GET / HTTP/1.1\r\nhost: a\r\n\r\n",
                ReqBody::Buffered(Bytes::new()),
                true,
            ),
            (
                "PUT / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n",
                ReqBody::Buffered(small.clone()),
                true,
            ),
            (
                "PUT / HTTP/1.1\r\nhost: a\r\n\r\n",
                ReqBody::Streamed(Framing::Eof),
                false,
            ),
            (
                "PUT / HTTP/1.1\r\nhost: a\r\ncontent-length: 100000\r\n\r\n",
                ReqBody::Streamed(Framing::Length(100_000)),
                false,
            ),
            (
                "GET / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n",
                ReqBody::Streamed(Framing::Chunked),
                false,
            ),
            (
                "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n",
                ReqBody::Buffered(small),
                false,
            ),
        ];
        for (raw, body, want) in cases {
            let head = head_of(raw.as_bytes());
            assert_eq!(replayable_on_new_stream(&head, &body), want, "{raw:?}");
            let mut up = Scripted::new(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            let has_body = !matches!(&body, ReqBody::Buffered(b) if b.is_empty());
            // (A streamed body then fails: the test's source is empty.)
            let _ = rt.block_on(attempt(
                &mut Gone,
                &mut BytesMut::new(),
                &mut up,
                &Forward::default(),
                &head,
                Bytes::from_static(raw.as_bytes()),
                &body,
                has_body,
                &mut crate::lb::SplitMix64(2),
                None,
            ));
            assert_eq!(up.replays, [want], "{raw:?}");
        }
    }

    #[test]
    fn slice_of_a_foreign_str_is_a_copy_not_a_wrong_range() {
        let src: Rc<str> = Rc::from("GET /a HTTP/1.1");
        let t = Text::slice_of(&src, &src[4..6]);
        assert!(matches!(
            t.0,
            TextRepr::Slice {
                start: 4,
                end: 6,
                ..
            }
        ));
        assert_eq!(t.as_str(), "/a");
        let other = String::from("elsewhere");
        let t = Text::slice_of(&src, &other);
        assert!(matches!(t.0, TextRepr::Owned(_)));
        assert_eq!(t.as_str(), "elsewhere");
    }

    #[test]
    fn parsed_fields_are_slices_of_one_copy_of_the_head() {
        let h = head_of(b"GET /a/b?x=1 HTTP/1.1\r\nHost: echo\r\nX-Y:  z \r\n\r\nrest");
        assert_eq!(
            (h.method.as_str(), h.path.as_str(), h.query.as_deref()),
            ("GET", "/a/b", Some("x=1"))
        );
        assert_eq!(h.header("host"), Some("echo"));
        assert_eq!(h.header("x-y"), Some("z"));
        // A value that is not UTF-8 is still 400.
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nx: \xff\r\n\r\n"),
            Parsed::Bad(400)
        );
    }

    /// The head sent upstream is sized exactly (so it becomes `Bytes` without copying) and
    /// carries the client in `x-forwarded-for`, appended or added, IPv4 and IPv6.
    #[test]
    fn upstream_head_is_exact_and_appends_the_client() {
        let fwd = Forward::default();
        for (raw, client, want) in [
            (
                &b"GET /p?q HTTP/1.1\r\nhost: echo\r\n\r\n"[..],
                "10.1.0.1",
                "GET /p?q HTTP/1.1\r\nhost: echo\r\nx-forwarded-for: 10.1.0.1\r\n\r\n",
            ),
            (
                b"GET / HTTP/1.0\r\nX-Forwarded-For: 1.2.3.4\r\nx-forwarded-for: 5.6.7.8\r\n\r\n",
                "255.0.10.9",
                "GET / HTTP/1.0\r\nX-Forwarded-For: 1.2.3.4, 255.0.10.9\r\nx-forwarded-for: 5.6.7.8\r\n\r\n",
            ),
            (
                b"GET / HTTP/1.1\r\n\r\n",
                "fd00::1",
                "GET / HTTP/1.1\r\nx-forwarded-for: fd00::1\r\n\r\n",
            ),
        ] {
            let out = upstream_head(&head_of(raw), &fwd, client.parse().unwrap());
            assert_eq!(String::from_utf8_lossy(&out), want);
            assert_eq!(out.len(), out.capacity());
        }
        // With a header modifier and a rewritten path.
        let fwd = Forward {
            path: Some("/new?q".into()),
            host: Some("h2".into()),
            request_headers: vec![HeaderModifier {
                add: vec![("x-a".into(), "1".into())],
                ..Default::default()
            }],
            ..Default::default()
        };
        let out = upstream_head(
            &head_of(b"GET /old?q HTTP/1.1\r\nhost: echo\r\n\r\n"),
            &fwd,
            "10.0.0.7".parse().unwrap(),
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET /new?q HTTP/1.1\r\nhost: h2\r\nx-a: 1\r\nx-forwarded-for: 10.0.0.7\r\n\r\n"
        );
        assert_eq!(out.len(), out.capacity());
    }

    /// A head parsed with its `traceparent` and `x-request-id` set ([`parse_head_traced`],
    /// as [`serve`] reads heads) is the head [`parse_head`] gives with [`trace`] and
    /// [`request_id`] applied, the same values from the same random numbers, for a request
    /// with no `traceparent`, a valid one (with blanks around it too), an invalid one and
    /// several, with and without a valid tunnel `traceparent`, with and without its own
    /// `x-request-id`; a kept or new value is a slice of the head's one copy.
    #[test]
    fn a_head_traced_as_parsed_is_the_head_traced_after() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let heads = [
            "GET /a?b HTTP/1.1\r\nhost: echo\r\n\r\n".to_string(),
            format!("GET / HTTP/1.1\r\ntraceparent: {good}\r\nhost: echo\r\n\r\n"),
            format!("GET / HTTP/1.1\r\nTraceparent:  {good} \r\nx: y\r\n\r\n"),
            "GET / HTTP/1.1\r\nhost: e\r\ntraceparent: bad\r\nx: y\r\n\r\n".to_string(),
            format!("GET / HTTP/1.1\r\ntraceparent: {good}\r\nx: y\r\ntraceparent: {good}\r\n\r\n"),
            "GET /x/../y HTTP/1.0\r\ntraceparent: 00-00\r\ntraceparent: z\r\n\r\n".to_string(),
            "GET / HTTP/1.1\r\nX-Request-Id: mine\r\nhost: echo\r\n\r\n".to_string(),
            format!("GET / HTTP/1.1\r\ntraceparent: {good}\r\nx-request-id: mine\r\n\r\n"),
        ];
        let samplings = [
            None,
            Some(crate::spans::Sampling::percent(0.0)),
            Some(crate::spans::Sampling::percent(100.0)),
        ];
        for (tunnel, spans) in [None, Some(good), Some("junk")]
            .into_iter()
            .flat_map(|t| samplings.map(|s| (t, s)))
        {
            for raw in &heads {
                let (mut r1, mut r2) = (crate::lb::SplitMix64(5), crate::lb::SplitMix64(5));
                let mut want = head_of(raw.as_bytes());
                let want_t = trace(&mut want, tunnel, &mut r1, spans);
                let new_id = request_id(&mut want, &mut r1);
                assert_eq!(new_id.is_none(), raw.contains("mine"), "{raw}");
                let from = TraceFrom {
                    tunnel: crate::telemetry::valid_tunnel_traceparent(tunnel),
                    rng: &mut r2,
                    spans,
                };
                let (Parsed::Head(got, n), Some(got_t)) =
                    parse_head_traced(raw.as_bytes(), Some(from))
                else {
                    panic!("{raw}");
                };
                assert_eq!(n, raw.len());
                assert_eq!(got, want, "{raw} {tunnel:?}");
                assert_eq!(got_t, want_t, "{raw} {tunnel:?}");
                assert!(crate::telemetry::valid_traceparent(&got_t.value));
                assert!(matches!(got_t.value.0, TextRepr::Slice { .. }));
                assert_eq!(got_t.span.is_some(), spans.is_some());
                let id = got.header("x-request-id").unwrap();
                assert!(
                    id == "mine" || id.len() == crate::telemetry::REQUEST_ID_LEN,
                    "{id}"
                );
                // The same random numbers were taken.
                assert_eq!(r1.next_u64(), r2.next_u64());
            }
        }
    }

    /// A finished request's header list is taken by the next head parsed on the thread.
    #[test]
    fn header_lists_are_reused_by_later_heads() {
        let raw = b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n";
        let first = head_of(raw);
        let at = first.headers.as_ptr();
        recycle_headers(first.headers);
        let second = head_of(raw);
        assert_eq!(second.headers.as_ptr(), at);
        assert_eq!(second.header("host"), Some("echo"));
        assert_eq!(second.headers.len(), 1);
        // A list much longer than a usual head's is not kept.
        let mut big = head_of(raw).headers;
        big.reserve(SPARE_HEADER_ROOM * 2);
        recycle_headers(big);
        assert!(head_of(raw).headers.capacity() <= SPARE_HEADER_ROOM);
    }

    /// [`listed_hop_by_hop`] looks only at some lengths: every name of [`HOP_BY_HOP`] has
    /// one of them, in any case.
    #[test]
    fn every_listed_hop_by_hop_name_is_found() {
        for h in HOP_BY_HOP {
            assert!(listed_hop_by_hop(h), "{h}");
            assert!(listed_hop_by_hop(&h.to_ascii_uppercase()), "{h}");
            assert!(hop_by_hop(h, &[]), "{h}");
        }
        for h in ["host", "content-length", "x-te", "upgrades", "traceparent"] {
            assert!(!listed_hop_by_hop(h), "{h}");
        }
        assert!(hop_by_hop("x-a", &["close, X-A"]));
        assert!(!hop_by_hop("content-length", &["content-length"]));
    }

    #[test]
    fn traceparent_header_is_added_once_and_shared_with_the_record() {
        let mut rng = crate::lb::SplitMix64(3);
        let mut h = head_of(b"GET / HTTP/1.1\r\ntraceparent: bad\r\ntraceparent: x\r\n\r\n");
        let t = trace(&mut h, None, &mut rng, None).value;
        let found: Vec<&str> = h
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("traceparent"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(found, [t.as_str()]);
        assert!(crate::telemetry::valid_traceparent(&t));
    }

    /// With tracing on, the `traceparent` sent upstream names the waypoint's own span: a
    /// request's trace context is continued (its trace id and flags, a new span id, its
    /// span the parent); without one a new trace is started (not the tunnel's), sampled
    /// as the sampling draws, with no parent. Tracing off, a valid `traceparent` goes as
    /// it came.
    #[test]
    fn tracing_on_the_traceparent_names_the_waypoints_span() {
        use crate::spans::Sampling;
        let parts = |t: &str| crate::spans::parse_traceparent(t).unwrap();
        let mine = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let tunnel = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01";
        let mut rng = crate::lb::SplitMix64(9);
        let get = |tp: Option<&str>| match tp {
            Some(v) => head_of(format!("GET / HTTP/1.1\r\ntraceparent: {v}\r\n\r\n").as_bytes()),
            None => head_of(b"GET / HTTP/1.1\r\n\r\n"),
        };
        // Off: kept.
        let t = trace(&mut get(Some(mine)), Some(tunnel), &mut rng, None);
        assert_eq!((t.value.as_str(), t.span), (mine, None));
        let all = Some(Sampling::percent(100.0));
        // The request's context: its trace and (unsampled) flags, a new span.
        let t = trace(&mut get(Some(mine)), Some(tunnel), &mut rng, all);
        let (trace_id, span, flags) = parts(&t.value);
        assert_eq!((trace_id, flags), (parts(mine).0, 0));
        assert_ne!(span, parts(mine).1);
        assert_eq!(t.span, Some(0x00f0_67aa_0ba9_02b7));
        // Without one, a new trace whatever the tunnel's: the draw decides.
        for (s, flags) in [(Sampling::percent(100.0), 1), (Sampling::percent(0.0), 0)] {
            for tun in [None, Some(tunnel)] {
                let t = trace(&mut get(None), tun, &mut rng, Some(s));
                assert_ne!(parts(&t.value).0, parts(tunnel).0);
                assert_eq!(parts(&t.value).2, flags);
                assert_eq!(t.span, Some(0));
            }
        }
    }

    /// The HTTP/1.1 and HTTP/2 response heads come from one filter
    /// ([`downstream_head`]): hop-by-hop fields (and those `Connection` names) dropped,
    /// one normalised `content-length`, none next to `transfer-encoding`; HTTP/2 also
    /// drops `transfer-encoding`; HTTP/1.1 keeps a `101`'s `Connection`/`Upgrade`.
    #[test]
    fn response_heads_for_both_protocols_share_one_filter() {
        let names = |raw: &[u8], h2: bool| -> Vec<(String, String)> {
            downstream_head(raw, &[], h2)
                .unwrap()
                .fields
                .iter()
                .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v).into_owned()))
                .collect()
        };
        let raw = b"HTTP/1.1 200 OK\r\nconnection: x-a\r\nx-a: 1\r\nkeep-alive: t=1\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\nx-b: 2\r\n\r\n";
        let both = [("transfer-encoding", "chunked"), ("x-b", "2")];
        let want: Vec<(String, String)> = both
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(names(raw, false), want);
        assert_eq!(names(raw, true), want[1..]);
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\ncontent-length: 2\r\n\r\n";
        for h2 in [false, true] {
            assert_eq!(names(raw, h2), [("content-length".into(), "2".into())]);
        }
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
        assert_eq!(names(raw, false).len(), 2);
        assert!(names(raw, true).is_empty());
        // Modifiers apply after the filter.
        let m = HeaderModifier {
            set: vec![("x-b".into(), "3".into())],
            remove: vec!["server".into()],
            ..Default::default()
        };
        let d = downstream_head(
            b"HTTP/1.0 200 OK\r\nserver: s\r\nx-b: 2\r\n\r\n",
            &[m],
            false,
        )
        .unwrap();
        assert_eq!((d.status, d.version, d.reason), (200, 0, "OK"));
        assert_eq!(d.fields, [(Cow::Borrowed("x-b"), Cow::Borrowed(&b"3"[..]))]);
        assert_eq!(
            rewrite_response_head(b"HTTP/1.0 200 OK\r\nx: 1\r\n\r\n", &[], true),
            b"HTTP/1.1 200 OK\r\nx: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }
}
