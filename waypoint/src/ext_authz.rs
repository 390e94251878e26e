//! AuthorizationPolicy `CUSTOM`: the external authorizer of an Istio `envoyExtAuthzHttp`
//! extension provider (MeshConfig `extensionProviders`), asked as Envoy's HTTP `ext_authz`
//! filter asks it under istiod's configuration.
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
//!   client's), and DENY/ALLOW policies then see them. Any other status denies with the
//!   authorizer's status, body and the headers `headersToDownstreamOnDeny` names (all but
//!   framing and hop-by-hop ones when it names none), response flag `UAEX`. No answer
//!   within `timeout` (default 600 s, Istio's), or none at all: allowed with `failOpen`,
//!   else `statusOnError` (default 403).
//! * Counted: `waypoint_ext_authz_checks_total{result="allowed|denied|error"}`.
//!
//! Opaque TCP tunnels have no HTTP request to send: one that an applicable `CUSTOM` policy
//! matches is refused (fail closed; Istio's CUSTOM over TCP needs a gRPC provider).

use std::io;
use std::time::Duration;

use bytes::Bytes;

use crate::authz::StrMatch;
use crate::http1::{RequestHead, Text};
use crate::route::ObjectRef;

/// Istio's default `timeout`.
pub const TIMEOUT: Duration = Duration::from_secs(600);

/// One `envoyExtAuthzHttp` provider, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
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
}

/// What the authorizer decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on, with these headers set on the request (`headersToUpstreamOnAllow`).
    Allow(Vec<(String, String)>),
    /// The answer to give the client (HTTP/1.1 bytes) and its status.
    Deny(Vec<u8>, u16),
}

/// The outcome label of a verdict reached from `answer`.
pub fn outcome(answer: &io::Result<Vec<u8>>, v: &Verdict) -> &'static str {
    if answer.as_ref().ok().and_then(|a| status(a)).is_none() {
        return "error";
    }
    match v {
        Verdict::Allow(_) => "allowed",
        Verdict::Deny(..) => "denied",
    }
}

fn matches_any(list: &[StrMatch], name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    list.iter().any(|m| m.matches(&name))
}

/// The check request for the client's `head`.
pub fn check_request(p: &Provider, head: &RequestHead) -> Bytes {
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

/// The status of an HTTP/1.1 answer, when it is one.
fn status(answer: &[u8]) -> Option<u16> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut hs);
    match r.parse(answer) {
        Ok(httparse::Status::Complete(_)) => r.code,
        _ => None,
    }
}

/// The verdict of `answer` (the authorizer's whole response, or why there is none); a
/// denial's answer to the client says `connection: close` when `close`.
pub fn verdict(p: &Provider, answer: &io::Result<Vec<u8>>, close: bool) -> Verdict {
    let error = || {
        if p.fail_open {
            Verdict::Allow(vec![])
        } else {
            let s = p.status_on_error;
            Verdict::Deny(crate::http1::simple_response(s, &[], "", close), s)
        }
    };
    let Ok(answer) = answer else { return error() };
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut hs);
    let (size, code) = match r.parse(answer) {
        Ok(httparse::Status::Complete(n)) => match r.code {
            Some(c) => (n, c),
            None => return error(),
        },
        _ => return error(),
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
        let up = fields
            .into_iter()
            .filter(|(n, _)| matches_any(&p.to_upstream_on_allow, n))
            .collect();
        return Verdict::Allow(up);
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
    let mut resp = crate::http1::simple_response(code, &down, &body, close);
    // `simple_response` labels a body `text/plain`; the authorizer's own type wins.
    if down.iter().any(|(n, _)| n == "content-type") {
        resp = drop_default_type(resp);
    }
    Verdict::Deny(resp, code)
}

/// Remove the `content-type: text/plain` line `simple_response` adds (the authorizer gave
/// its own).
fn drop_default_type(resp: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&resp).into_owned();
    match text.find("content-type: text/plain\r\n") {
        Some(i) => {
            let mut t = text;
            t.replace_range(i..i + "content-type: text/plain\r\n".len(), "");
            t.into_bytes()
        }
        None => resp,
    }
}

/// Set `headers` on the request (replacing fields of the same names).
pub fn apply(head: &mut RequestHead, headers: Vec<(String, String)>) {
    for (n, v) in headers {
        head.headers.retain(|(m, _)| !m.eq_ignore_ascii_case(&n));
        head.headers.push((Text::from(n), Text::from(v)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Provider {
        Provider {
            name: "p".into(),
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
        let r = check_request(&provider(), &h);
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
            verdict(&p, &ok("HTTP/1.1 200 OK\r\nx-ext-authz-check-result: allowed\r\nx-other: 1\r\ncontent-length: 0\r\n\r\n"), false),
            Verdict::Allow(vec![("x-ext-authz-check-result".into(), "allowed".into())])
        );
        let Verdict::Deny(resp, 403) = verdict(
            &p,
            &ok("HTTP/1.1 403 Forbidden\r\nx-ext-authz-check-result: denied\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
            true,
        ) else {
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
        assert!(matches!(verdict(&p, &gone, false), Verdict::Deny(_, 403)));
        let bad = ok("garbage");
        assert!(matches!(verdict(&p, &bad, false), Verdict::Deny(_, 403)));
        assert_eq!(outcome(&bad, &verdict(&p, &bad, false)), "error");
        let open = Provider {
            fail_open: true,
            ..provider()
        };
        assert_eq!(verdict(&open, &gone, false), Verdict::Allow(vec![]));
        let down = Provider {
            status_on_error: 503,
            to_downstream_on_deny: vec![StrMatch::parse("x-keep")],
            ..provider()
        };
        assert!(matches!(
            verdict(&down, &gone, false),
            Verdict::Deny(_, 503)
        ));
        let Verdict::Deny(resp, 401) = verdict(
            &down,
            &ok("HTTP/1.1 401 Unauthorized\r\nx-keep: 1\r\nx-drop: 2\r\ncontent-length: 0\r\n\r\n"),
            false,
        ) else {
            panic!()
        };
        let text = String::from_utf8(resp).unwrap();
        assert!(
            text.contains("x-keep: 1") && !text.contains("x-drop"),
            "{text}"
        );
    }
}
