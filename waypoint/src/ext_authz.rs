//! AuthorizationPolicy `CUSTOM`: the external authorizer of an Istio `envoyExtAuthzHttp`
//! or `envoyExtAuthzGrpc` extension provider (MeshConfig `extensionProviders`), asked as
//! Envoy's `ext_authz` filter asks it under istiod's configuration.
//!
//! * **When**: after authentication, before DENY and ALLOW (Istio's order: CUSTOM, DENY,
//!   ALLOW), for a request an applicable `CUSTOM` policy's rules match
//!   ([`crate::authz::custom`]). Requests no CUSTOM rule matches are not sent.
//! * **The check**: an HTTP/1.1 request to the provider's service (a service of the mesh
//!   model, over HBONE like any upstream, [`crate::http1::Upstream::side_exchange`]) with
//!   the client's method, `pathPrefix` + the client's path and query, its `Host`, no body
//!   (`content-length: 0`), the client's headers named by `includeRequestHeadersInCheck`
//!   (exact, `prefix*` or `*suffix`, any case) and `includeAdditionalHeadersInCheck`.
//! * **The answer**: `200` allows — the answer's headers named by
//!   `headersToUpstreamOnAllow` are set on the request sent upstream (replacing the
//!   client's), those its `x-envoy-auth-headers-to-remove` lists are removed, and
//!   DENY/ALLOW policies then see the result; those `headersToDownstreamOnAllow` names
//!   are set on the response to the client. Any other status denies with the
//!   authorizer's status, body and the headers `headersToDownstreamOnDeny` names (all but
//!   framing and hop-by-hop ones when it names none), response flag `UAEX`. No answer
//!   within `timeout` (default 600 s, Istio's), or none at all: allowed with `failOpen`,
//!   else `statusOnError` (default 403).
//! * **gRPC** (`envoyExtAuthzGrpc`, e.g. OPA's Envoy plugin): `envoy.service.auth.v3.
//!   Authorization/Check` over HTTP/2 with a `CheckRequest` ([`pb`]: the source and
//!   destination addresses, the source's SPIFFE principal, the request's method, target,
//!   host, scheme, protocol, size and every header, `:authority`, `:method` and `:path`
//!   among them). `status.code` 0 allows: `ok_response.headers` are set on the request
//!   (appended with `append: true`), `headers_to_remove` removed,
//!   `response_headers_to_add` set on the response. Any other code denies
//!   with `denied_response` (its status, else `403`; its headers; its body). A gRPC error
//!   (`grpc-status` not 0) or no answer: `failOpen` or `statusOnError`, as over HTTP.
//! * Counted: `waypoint_ext_authz_checks_total{result="allowed|denied|error"}`.
//!
//! Opaque TCP tunnels have no HTTP request: one that an applicable `CUSTOM` policy matches
//! is asked about once, as it opens, of a gRPC authorizer (Envoy's ext_authz network
//! filter: a `CheckRequest` with its source, the client's identity and its destination,
//! no `request`, [`tcp_check_request`]); OK lets it through, anything else (or no answer
//! without `failOpen`) resets it. With an HTTP authorizer it is refused (fail closed):
//! there is no request to forward.

use std::io;
use std::time::Duration;

use bytes::Bytes;

use crate::authz::StrMatch;
use crate::http1::{RequestHead, Text, TunnelCtx};
use crate::route::ObjectRef;

/// Istio's default `timeout`.
pub const TIMEOUT: Duration = Duration::from_secs(600);

/// One `envoyExtAuthzHttp` provider, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    /// `envoyExtAuthzGrpc` (else `envoyExtAuthzHttp`).
    pub grpc: bool,
    /// The authorizer's service and port (in the mesh model).
    pub service: ObjectRef,
    pub port: u16,
    pub path_prefix: String,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: u16,
    pub include_headers: Vec<StrMatch>,
    pub additional_headers: Vec<(String, String)>,
    pub to_upstream_on_allow: Vec<StrMatch>,
    pub to_downstream_on_deny: Vec<StrMatch>,
    pub to_downstream_on_allow: Vec<StrMatch>,
}

/// What the authorizer decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on, with these changes to the request.
    Allow(Vec<Change>),
    /// The answer to give the client (HTTP/1.1 bytes) and its status.
    Deny(Vec<u8>, u16),
}

fn matches_any(list: &[StrMatch], name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    list.iter().any(|m| m.matches(&name))
}

/// A change an allowing authorizer makes to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Set the field (replacing any of the name).
    Set(String, String),
    /// Add the field (beside any of the name).
    Append(String, String),
    /// Remove the fields of the name.
    Remove(String),
    /// Set the field on the response to the client (`headersToDownstreamOnAllow`, gRPC
    /// `response_headers_to_add`).
    Downstream(String, String),
}

/// The check request for the client's `head` on the tunnel `ctx`.
pub fn check_request(p: &Provider, head: &RequestHead, ctx: &TunnelCtx, h2: bool) -> Bytes {
    if p.grpc {
        return grpc_check_request(p, head, ctx, h2);
    }
    let mut out = String::with_capacity(256);
    out.push_str(&head.method);
    out.push(' ');
    out.push_str(p.path_prefix.trim_end_matches('/'));
    out.push_str(&head.path);
    if let Some(q) = &head.query {
        out.push('?');
        out.push_str(q);
    }
    out.push_str(" HTTP/1.1\r\nhost: ");
    out.push_str(head.header("host").unwrap_or(""));
    out.push_str("\r\ncontent-length: 0\r\n");
    let hop = |n: &str| {
        matches!(
            n.to_ascii_lowercase().as_str(),
            "host"
                | "content-length"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "te"
                | "upgrade"
                | "expect"
                | "proxy-connection"
        )
    };
    for (n, v) in &head.headers {
        if !hop(n) && matches_any(&p.include_headers, n) {
            push_field(&mut out, n, v);
        }
    }
    for (n, v) in &p.additional_headers {
        push_field(&mut out, n, v);
    }
    out.push_str("\r\n");
    Bytes::from(out)
}

fn push_field(out: &mut String, n: &str, v: &str) {
    out.push_str(n);
    out.push_str(": ");
    out.push_str(v);
    out.push_str("\r\n");
}

/// The verdict without a usable answer: allowed with `failOpen`, else `statusOnError`.
fn unanswered(p: &Provider, close: bool) -> Verdict {
    if p.fail_open {
        Verdict::Allow(vec![])
    } else {
        let s = p.status_on_error;
        Verdict::Deny(crate::http1::simple_response(s, &[], "", close), s)
    }
}

/// The verdict of `answer` (the authorizer's whole response, or why there is none) and
/// its outcome label (`allowed`, `denied`, or `error` for no usable answer); a denial's
/// answer to the client says `connection: close` when `close`.
pub fn verdict(p: &Provider, answer: &io::Result<Vec<u8>>, close: bool) -> (Verdict, &'static str) {
    let usable = answer.as_ref().ok().and_then(|a| {
        if p.grpc {
            grpc_verdict(a, close)
        } else {
            http_verdict(p, a, close)
        }
    });
    match usable {
        Some(v @ Verdict::Allow(_)) => (v, "allowed"),
        Some(v) => (v, "denied"),
        None => (unanswered(p, close), "error"),
    }
}

/// The verdict of an HTTP authorizer's `answer`; `None` when it is not a usable one.
fn http_verdict(p: &Provider, answer: &[u8], close: bool) -> Option<Verdict> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut hs);
    let (size, code) = match r.parse(answer) {
        Ok(httparse::Status::Complete(n)) => (n, r.code?),
        _ => return None,
    };
    let fields: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    if code == 200 {
        let mut changes: Vec<Change> = vec![];
        for (n, v) in fields {
            if n == "x-envoy-auth-headers-to-remove" {
                changes.extend(
                    v.split(',')
                        .map(|h| h.trim().to_ascii_lowercase())
                        .filter(|h| !h.is_empty() && h != "host")
                        .map(Change::Remove),
                );
            } else if matches_any(&p.to_upstream_on_allow, &n) {
                changes.push(Change::Set(n, v));
            } else if matches_any(&p.to_downstream_on_allow, &n) {
                changes.push(Change::Downstream(n, v));
            }
        }
        return Some(Verdict::Allow(changes));
    }
    let chunked = fields
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let raw = &answer[size..];
    let body = if chunked {
        crate::h2srv::dechunk(raw).unwrap_or_default()
    } else {
        raw.to_vec()
    };
    let framing = |n: &str| {
        matches!(
            n,
            "content-length"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "host"
                | "te"
                | "upgrade"
                | "proxy-connection"
                | "content-type"
        )
    };
    let mut down: Vec<(String, String)> = fields
        .iter()
        .filter(|(n, _)| {
            !framing(n)
                && (p.to_downstream_on_deny.is_empty() || matches_any(&p.to_downstream_on_deny, n))
        })
        .cloned()
        .collect();
    if let Some(ct) = fields.iter().find(|(n, _)| n == "content-type") {
        down.push(ct.clone());
    }
    let body = String::from_utf8_lossy(&body);
    // The authorizer's own `content-type`, if any, replaces the default `text/plain`.
    let resp = crate::http1::simple_response(code, &down, &body, close);
    Some(Verdict::Deny(resp, code))
}

/// Make an allowing authorizer's `changes` to the request (those for the response,
/// [`Change::Downstream`], are the caller's).
pub fn apply(head: &mut RequestHead, changes: Vec<Change>) {
    for c in changes {
        match c {
            Change::Set(n, v) => {
                head.headers.retain(|(m, _)| !m.eq_ignore_ascii_case(&n));
                head.headers.push((Text::from(n), Text::from(v)));
            }
            Change::Append(n, v) => head.headers.push((Text::from(n), Text::from(v))),
            Change::Remove(n) => head.headers.retain(|(m, _)| !m.eq_ignore_ascii_case(&n)),
            Change::Downstream(..) => {}
        }
    }
}

/// The gRPC method of the check.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// A `CheckRequest` for the client's `head` on the tunnel `ctx`, as an HTTP/1.1-shaped
/// request carrying one gRPC message (sent over HTTP/2, [`crate::http1::Upstream::side_exchange`]).
fn grpc_check_request(p: &Provider, head: &RequestHead, ctx: &TunnelCtx, h2: bool) -> Bytes {
    let host = head.header("host").unwrap_or("");
    let mut headers = std::collections::HashMap::new();
    let mut put = |n: String, v: &str| {
        headers
            .entry(n)
            .and_modify(|e: &mut String| {
                e.push(',');
                e.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    };
    let target = crate::http1::target_of(head);
    put(":authority".into(), host);
    put(":method".into(), &head.method);
    put(":path".into(), &target);
    for (n, v) in &head.headers {
        let n = n.to_ascii_lowercase();
        if n != "host" {
            put(n, v);
        }
    }
    let size = head
        .header("content-length")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(-1);
    let check = pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            request: Some(pb::Request {
                http: Some(pb::HttpRequest {
                    id: head.header("x-request-id").unwrap_or("").to_string(),
                    method: head.method.to_string(),
                    headers,
                    path: target,
                    host: host.to_string(),
                    scheme: "http".into(),
                    size,
                    protocol: if h2 {
                        "HTTP/2"
                    } else if head.version == 0 {
                        "HTTP/1.0"
                    } else {
                        "HTTP/1.1"
                    }
                    .into(),
                    ..Default::default()
                }),
            }),
            ..peers(ctx)
        }),
    };
    grpc_request(p, &check)
}

/// The check of an opaque TCP connection for a gRPC authorizer (Envoy's ext_authz network
/// filter): its source and destination, no HTTP request.
pub fn tcp_check_request(p: &Provider, ctx: &TunnelCtx) -> Bytes {
    let check = pb::CheckRequest {
        attributes: Some(peers(ctx)),
    };
    grpc_request(p, &check)
}

/// A check's source (the original client, with its SPIFFE identity) and destination.
fn peers(ctx: &TunnelCtx) -> pb::AttributeContext {
    let peer = |ip: std::net::IpAddr, port: u16, principal: Option<String>| pb::Peer {
        address: Some(pb::Address {
            socket_address: Some(pb::SocketAddress {
                protocol: 0,
                address: ip.to_string(),
                port_value: u32::from(port),
            }),
        }),
        principal: principal.unwrap_or_default(),
        ..Default::default()
    };
    pb::AttributeContext {
        source: Some(peer(
            ctx.source_ip,
            0,
            ctx.principal.as_ref().map(|p| format!("spiffe://{p}")),
        )),
        destination: Some(peer(ctx.destination_ip, ctx.destination_port, None)),
        ..Default::default()
    }
}

/// `check` as the gRPC request (HTTP/1.1-shaped, sent over HTTP/2) to `p`.
fn grpc_request(p: &Provider, check: &pb::CheckRequest) -> Bytes {
    use prost::Message;
    let msg = check.encode_to_vec();
    let mut out = format!(
        "POST {CHECK_PATH} HTTP/1.1\r\nhost: {}.{}.svc:{}\r\ncontent-type: application/grpc\r\nte: trailers\r\ncontent-length: {}\r\n\r\n",
        p.service.name,
        p.service.namespace,
        p.port,
        msg.len() + 5
    )
    .into_bytes();
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    Bytes::from(out)
}

/// The verdict of a gRPC `answer` (an HTTP/1.1-shaped response whose fields include the
/// trailers); `None` when it is not a usable one (a gRPC error among them).
fn grpc_verdict(answer: &[u8], close: bool) -> Option<Verdict> {
    use prost::Message;
    let resp = grpc_message(answer)?;
    let check = pb::CheckResponse::decode(resp.as_slice()).ok()?;
    let value = |h: &pb::HeaderValue| {
        if h.value.is_empty() {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        } else {
            h.value.clone()
        }
    };
    let allowed = check.status.as_ref().is_none_or(|s| s.code == 0);
    if allowed {
        let mut changes = vec![];
        if let Some(pb::check_response::HttpResponse::OkResponse(ok)) = &check.http_response {
            for o in &ok.headers {
                let Some(h) = &o.header else { continue };
                let (n, v) = (h.key.to_ascii_lowercase(), value(h));
                if n.is_empty() || n.starts_with(':') || n == "host" {
                    continue;
                }
                changes.push(if o.append.as_ref().is_some_and(|a| a.value) {
                    Change::Append(n, v)
                } else {
                    Change::Set(n, v)
                });
            }
            for o in &ok.response_headers_to_add {
                let Some(h) = &o.header else { continue };
                let n = h.key.to_ascii_lowercase();
                if !n.is_empty()
                    && !n.starts_with(':')
                    && !matches!(
                        n.as_str(),
                        "content-length" | "transfer-encoding" | "connection"
                    )
                {
                    changes.push(Change::Downstream(n, value(h)));
                }
            }
            for n in &ok.headers_to_remove {
                let n = n.to_ascii_lowercase();
                if !n.starts_with(':') && n != "host" {
                    changes.push(Change::Remove(n));
                }
            }
        }
        return Some(Verdict::Allow(changes));
    }
    let (mut status, mut fields, mut body) = (403, vec![], String::new());
    if let Some(pb::check_response::HttpResponse::DeniedResponse(d)) = &check.http_response {
        if let Some(code) = d
            .status
            .as_ref()
            .map(|s| s.code)
            .filter(|c| (200..600).contains(c))
        {
            status = code as u16;
        }
        for o in &d.headers {
            if let Some(h) = &o.header {
                let n = h.key.to_ascii_lowercase();
                if !n.is_empty()
                    && !n.starts_with(':')
                    && !matches!(
                        n.as_str(),
                        "content-length" | "transfer-encoding" | "connection"
                    )
                {
                    fields.push((n, value(h)));
                }
            }
        }
        body = d.body.clone();
    }
    let resp = crate::http1::simple_response(status, &fields, &body, close);
    Some(Verdict::Deny(resp, status))
}

/// The one message of a gRPC answer whose `grpc-status` is 0.
fn grpc_message(answer: &[u8]) -> Option<Vec<u8>> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut hs);
    let size = match r.parse(answer) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    if r.code != Some(200) {
        return None;
    }
    let status = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("grpc-status"))
        .map(|h| h.value.trim_ascii());
    if status != Some(b"0".as_slice()) {
        return None;
    }
    let body = &answer[size..];
    let (flag, rest) = body.split_first()?;
    if *flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    rest.get(4..4 + len).map(<[u8]>::to_vec)
}

/// The messages of Envoy's `envoy.service.auth.v3` external authorization API the
/// waypoint sends and reads (field numbers as in Envoy's `external_auth.proto`,
/// `attribute_context.proto`, `config/core/v3` and `google/rpc/status.proto`; fields the
/// waypoint neither sets nor reads are left out, which protobuf allows).
pub mod pb {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckRequest {
        #[prost(message, optional, tag = "1")]
        pub attributes: Option<AttributeContext>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeContext {
        #[prost(message, optional, tag = "1")]
        pub source: Option<Peer>,
        #[prost(message, optional, tag = "2")]
        pub destination: Option<Peer>,
        #[prost(message, optional, tag = "4")]
        pub request: Option<Request>,
        #[prost(map = "string, string", tag = "10")]
        pub context_extensions: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Peer {
        #[prost(message, optional, tag = "1")]
        pub address: Option<Address>,
        #[prost(string, tag = "2")]
        pub service: String,
        #[prost(map = "string, string", tag = "3")]
        pub labels: HashMap<String, String>,
        #[prost(string, tag = "4")]
        pub principal: String,
    }

    /// `envoy.config.core.v3.Address` (its socket address only).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(message, optional, tag = "1")]
        pub socket_address: Option<SocketAddress>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SocketAddress {
        #[prost(int32, tag = "1")]
        pub protocol: i32,
        #[prost(string, tag = "2")]
        pub address: String,
        #[prost(uint32, tag = "3")]
        pub port_value: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, optional, tag = "2")]
        pub http: Option<HttpRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub method: String,
        #[prost(map = "string, string", tag = "3")]
        pub headers: HashMap<String, String>,
        #[prost(string, tag = "4")]
        pub path: String,
        #[prost(string, tag = "5")]
        pub host: String,
        #[prost(string, tag = "6")]
        pub scheme: String,
        #[prost(int64, tag = "9")]
        pub size: i64,
        #[prost(string, tag = "10")]
        pub protocol: String,
        #[prost(string, tag = "11")]
        pub body: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<RpcStatus>,
        #[prost(oneof = "check_response::HttpResponse", tags = "2, 3")]
        pub http_response: Option<check_response::HttpResponse>,
    }

    pub mod check_response {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum HttpResponse {
            #[prost(message, tag = "2")]
            DeniedResponse(super::DeniedHttpResponse),
            #[prost(message, tag = "3")]
            OkResponse(super::OkHttpResponse),
        }
    }

    /// `google.rpc.Status` (its details are not read).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RpcStatus {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeniedHttpResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<HttpStatus>,
        #[prost(message, repeated, tag = "2")]
        pub headers: Vec<HeaderValueOption>,
        #[prost(string, tag = "3")]
        pub body: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OkHttpResponse {
        #[prost(message, repeated, tag = "2")]
        pub headers: Vec<HeaderValueOption>,
        #[prost(string, repeated, tag = "5")]
        pub headers_to_remove: Vec<String>,
        #[prost(message, repeated, tag = "6")]
        pub response_headers_to_add: Vec<HeaderValueOption>,
    }

    /// `envoy.type.v3.HttpStatus`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpStatus {
        #[prost(int32, tag = "1")]
        pub code: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValueOption {
        #[prost(message, optional, tag = "1")]
        pub header: Option<HeaderValue>,
        #[prost(message, optional, tag = "2")]
        pub append: Option<BoolValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
        #[prost(bytes = "vec", tag = "3")]
        pub raw_value: Vec<u8>,
    }

    /// `google.protobuf.BoolValue`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BoolValue {
        #[prost(bool, tag = "1")]
        pub value: bool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Provider {
        Provider {
            name: "p".into(),
            grpc: false,
            service: ObjectRef::new("app", "authz"),
            port: 8000,
            path_prefix: "/check".into(),
            timeout: TIMEOUT,
            fail_open: false,
            status_on_error: 403,
            include_headers: vec![StrMatch::parse("x-ext-authz"), StrMatch::parse("x-user-*")],
            additional_headers: vec![("x-from".into(), "waypoint".into())],
            to_upstream_on_allow: vec![StrMatch::parse("x-ext-authz-check-result")],
            to_downstream_on_deny: vec![],
            to_downstream_on_allow: vec![StrMatch::parse("x-ratelimit-*")],
        }
    }

    fn ctx() -> TunnelCtx {
        TunnelCtx {
            waypoint: ObjectRef::new("app", "wp"),
            root_namespace: "istio-system".into(),
            destination: crate::http1::Destination::Service {
                service: ObjectRef::new("app", "echo"),
                port: 80,
            },
            destination_ip: "10.96.0.1".parse().unwrap(),
            destination_port: 80,
            source_ip: "10.1.0.7".parse().unwrap(),
            principal: Some("cluster.local/ns/app/sa/client".into()),
            client_namespace: None,
            traceparent: None,
        }
    }

    fn head(raw: &str) -> RequestHead {
        match crate::http1::parse_head(raw.as_bytes()) {
            crate::http1::Parsed::Head(h, _) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_check_carries_method_prefixed_target_host_and_named_headers_only() {
        let h = head("POST /a/b?q=1 HTTP/1.1\r\nHost: echo\r\nX-Ext-Authz: allow\r\nx-user-id: 7\r\nauthorization: secret\r\ncontent-length: 5\r\n\r\n");
        let ctx = ctx();
        let r = check_request(&provider(), &h, &ctx, false);
        assert_eq!(
            std::str::from_utf8(&r).unwrap(),
            "POST /check/a/b?q=1 HTTP/1.1\r\nhost: echo\r\ncontent-length: 0\r\nX-Ext-Authz: allow\r\nx-user-id: 7\r\nx-from: waypoint\r\n\r\n"
        );
    }

    #[test]
    fn answers_allow_deny_or_fail_closed() {
        let p = provider();
        let ok = |s: &str| Ok(s.as_bytes().to_vec());
        assert_eq!(
            verdict(&p, &ok("HTTP/1.1 200 OK\r\nx-ext-authz-check-result: allowed\r\nx-other: 1\r\nx-ratelimit-left: 9\r\ncontent-length: 0\r\n\r\n"), false).0,
            Verdict::Allow(vec![
                Change::Set("x-ext-authz-check-result".into(), "allowed".into()),
                Change::Downstream("x-ratelimit-left".into(), "9".into()),
            ])
        );
        let Verdict::Deny(resp, 403) = verdict(
            &p,
            &ok("HTTP/1.1 403 Forbidden\r\nx-ext-authz-check-result: denied\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
            true,
        ).0 else {
            panic!()
        };
        let text = String::from_utf8(resp).unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(
            text.contains("x-ext-authz-check-result: denied\r\n"),
            "{text}"
        );
        assert!(
            text.contains("content-type: application/json\r\n"),
            "{text}"
        );
        assert!(
            !text.contains("text/plain") && !text.contains("chunked"),
            "{text}"
        );
        assert!(
            text.contains("connection: close\r\n") && text.ends_with("\r\n\r\n{}"),
            "{text}"
        );
        // No answer: statusOnError, or allowed with failOpen.
        let gone: io::Result<Vec<u8>> = Err(io::ErrorKind::TimedOut.into());
        assert!(matches!(verdict(&p, &gone, false).0, Verdict::Deny(_, 403)));
        let bad = ok("garbage");
        assert!(matches!(verdict(&p, &bad, false).0, Verdict::Deny(_, 403)));
        assert_eq!(verdict(&p, &bad, false).1, "error");
        let open = Provider {
            fail_open: true,
            ..provider()
        };
        assert_eq!(verdict(&open, &gone, false).0, Verdict::Allow(vec![]));
        let down = Provider {
            status_on_error: 503,
            to_downstream_on_deny: vec![StrMatch::parse("x-keep")],
            ..provider()
        };
        assert!(matches!(
            verdict(&down, &gone, false).0,
            Verdict::Deny(_, 503)
        ));
        let Verdict::Deny(resp, 401) = verdict(
            &down,
            &ok("HTTP/1.1 401 Unauthorized\r\nx-keep: 1\r\nx-drop: 2\r\ncontent-length: 0\r\n\r\n"),
            false,
        )
        .0
        else {
            panic!()
        };
        let text = String::from_utf8(resp).unwrap();
        assert!(
            text.contains("x-keep: 1") && !text.contains("x-drop"),
            "{text}"
        );
    }

    /// A gRPC answer (HTTP/1.1-shaped, trailers among the fields) carrying `msg`.
    fn grpc_answer(msg: &pb::CheckResponse, status: &str) -> io::Result<Vec<u8>> {
        use prost::Message;
        let m = msg.encode_to_vec();
        let mut out = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: {status}\r\ncontent-length: {}\r\n\r\n",
            m.len() + 5
        )
        .into_bytes();
        out.push(0);
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(&m);
        Ok(out)
    }

    fn option(k: &str, v: &str, append: Option<bool>) -> pb::HeaderValueOption {
        pb::HeaderValueOption {
            header: Some(pb::HeaderValue {
                key: k.into(),
                value: v.into(),
                raw_value: vec![],
            }),
            append: append.map(|value| pb::BoolValue { value }),
        }
    }

    #[test]
    fn grpc_check_carries_the_request_attributes() {
        use prost::Message;
        let p = Provider {
            grpc: true,
            ..provider()
        };
        let h = head("POST /a?b=1 HTTP/1.1\r\nHost: echo\r\nAuthorization: Bearer t\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 3\r\n\r\n");
        let r = check_request(&p, &h, &ctx(), false);
        let text = String::from_utf8_lossy(&r);
        assert!(
            text.starts_with("POST /envoy.service.auth.v3.Authorization/Check HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(
            text.contains("content-type: application/grpc\r\n")
                && text.contains("te: trailers\r\n")
        );
        let body = &r[r.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        assert_eq!(body[0], 0);
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, body.len() - 5);
        let req = pb::CheckRequest::decode(&body[5..]).unwrap();
        let a = req.attributes.unwrap();
        let src = a.source.unwrap();
        assert_eq!(src.principal, "spiffe://cluster.local/ns/app/sa/client");
        assert_eq!(
            src.address.unwrap().socket_address.unwrap().address,
            "10.1.0.7"
        );
        let dst = a
            .destination
            .unwrap()
            .address
            .unwrap()
            .socket_address
            .unwrap();
        assert_eq!((dst.address.as_str(), dst.port_value), ("10.96.0.1", 80));
        let http = a.request.unwrap().http.unwrap();
        assert_eq!(
            (http.method.as_str(), http.path.as_str(), http.host.as_str()),
            ("POST", "/a?b=1", "echo")
        );
        assert_eq!(
            (http.size, http.protocol.as_str(), http.scheme.as_str()),
            (3, "HTTP/1.1", "http")
        );
        assert_eq!(
            http.headers.get("authorization").map(String::as_str),
            Some("Bearer t")
        );
        assert_eq!(http.headers.get("x-a").map(String::as_str), Some("1,2"));
        assert_eq!(
            http.headers.get(":path").map(String::as_str),
            Some("/a?b=1")
        );
        assert_eq!(
            http.headers.get(":authority").map(String::as_str),
            Some("echo")
        );
        assert!(!http.headers.contains_key("host"));
    }

    #[test]
    fn grpc_answers_allow_with_changes_deny_or_fail_closed() {
        let p = Provider {
            grpc: true,
            ..provider()
        };
        let ok = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 0,
                message: String::new(),
            }),
            http_response: Some(pb::check_response::HttpResponse::OkResponse(
                pb::OkHttpResponse {
                    headers: vec![
                        option("x-user", "alice", None),
                        option("x-tag", "t", Some(true)),
                        option(":path", "/evil", None),
                    ],
                    headers_to_remove: vec!["authorization".into(), "host".into()],
                    response_headers_to_add: vec![option("x-served-by", "opa", None)],
                },
            )),
        };
        assert_eq!(
            verdict(&p, &grpc_answer(&ok, "0"), false).0,
            Verdict::Allow(vec![
                Change::Set("x-user".into(), "alice".into()),
                Change::Append("x-tag".into(), "t".into()),
                Change::Downstream("x-served-by".into(), "opa".into()),
                Change::Remove("authorization".into()),
            ])
        );
        // PERMISSION_DENIED with a custom answer; without one, 403.
        let denied = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 7,
                message: "no".into(),
            }),
            http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
                pb::DeniedHttpResponse {
                    status: Some(pb::HttpStatus { code: 401 }),
                    headers: vec![option("www-authenticate", "Basic", None)],
                    body: "who are you".into(),
                },
            )),
        };
        let Verdict::Deny(resp, 401) = verdict(&p, &grpc_answer(&denied, "0"), false).0 else {
            panic!()
        };
        let text = String::from_utf8(resp).unwrap();
        assert!(
            text.contains("www-authenticate: Basic\r\n") && text.ends_with("who are you"),
            "{text}"
        );
        let bare = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 16,
                message: String::new(),
            }),
            http_response: None,
        };
        assert!(matches!(
            verdict(&p, &grpc_answer(&bare, "0"), false).0,
            Verdict::Deny(_, 403)
        ));
        // A gRPC error, or no answer: statusOnError (or failOpen).
        assert!(matches!(
            verdict(&p, &grpc_answer(&ok, "14"), false).0,
            Verdict::Deny(_, 403)
        ));
        // Counted as an error, not a denial.
        assert_eq!(verdict(&p, &grpc_answer(&ok, "14"), false).1, "error");
        let gone: io::Result<Vec<u8>> = Err(io::ErrorKind::ConnectionRefused.into());
        let open = Provider {
            fail_open: true,
            ..p.clone()
        };
        assert_eq!(verdict(&open, &gone, false).0, Verdict::Allow(vec![]));
    }

    #[test]
    fn http_authorizer_removes_the_headers_it_names() {
        let p = provider();
        let a: io::Result<Vec<u8>> = Ok(b"HTTP/1.1 200 OK\r\nx-envoy-auth-headers-to-remove: Authorization, x-secret, host\r\ncontent-length: 0\r\n\r\n".to_vec());
        assert_eq!(
            verdict(&p, &a, false).0,
            Verdict::Allow(vec![
                Change::Remove("authorization".into()),
                Change::Remove("x-secret".into())
            ])
        );
        let mut h = head("GET / HTTP/1.1\r\nhost: e\r\nAuthorization: x\r\nx-keep: 1\r\n\r\n");
        let Verdict::Allow(changes) = verdict(&p, &a, false).0 else {
            panic!()
        };
        apply(&mut h, changes);
        assert_eq!(h.header("authorization"), None);
        assert_eq!(h.header("x-keep"), Some("1"));
    }
}
