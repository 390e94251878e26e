//! The HTTP/1.1 request path inside a tunnel, driven over memory: bad input (400/431),
//! policy before any upstream exchange (R15), routing (R16/R17), filters, keep-alive.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use common::echo_route_with_rules;
use waypoint::config::{load_str, WaypointConfig};
use waypoint::http1::{
    parse_head, serve, Destination, End, Parsed, Tunnel, TunnelCtx, Upstream, MAX_HEAD,
};
use waypoint::lb::SplitMix64;
use waypoint::route::ObjectRef;

/// Every future here is ready whenever polled (memory streams): poll to completion.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future did not complete");
}

struct MemTunnel {
    input: VecDeque<Bytes>,
    output: Vec<u8>,
    finished: bool,
}

impl MemTunnel {
    fn new(chunks: &[&[u8]]) -> Self {
        MemTunnel {
            input: chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect(),
            output: vec![],
            finished: false,
        }
    }
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

impl Tunnel for MemTunnel {
    async fn read(&mut self) -> Option<io::Result<Bytes>> {
        self.input.pop_front().map(Ok)
    }
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        assert!(!self.finished, "write after finish");
        self.output.extend_from_slice(&data);
        Ok(())
    }
    async fn finish(&mut self) -> io::Result<()> {
        self.finished = true;
        Ok(())
    }
}

/// Records each exchange (on `done`); answers 200 with the service name in the body.
#[derive(Default)]
struct MockUpstream {
    calls: Vec<(Option<(ObjectRef, u16)>, String)>,
    mirrors: Vec<((ObjectRef, u16), String)>,
    /// Connections opened.
    connects: usize,
    /// The upstream's response instead of the default `200` (then end of stream).
    response: Option<String>,
}

/// One upstream connection over memory: what was written, and the canned response.
struct MemConn {
    service: Option<(ObjectRef, u16)>,
    written: Vec<u8>,
    response: Option<Bytes>,
}

impl Tunnel for MemConn {
    async fn read(&mut self) -> Option<io::Result<Bytes>> {
        self.response.take().map(Ok)
    }
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.written.extend_from_slice(&data);
        Ok(())
    }
    async fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Upstream for MockUpstream {
    type Conn = MemConn;

    async fn connect(
        &mut self,
        service: Option<&(ObjectRef, u16)>,
        _head: &waypoint::http1::RequestHead,
    ) -> io::Result<(MemConn, bool)> {
        self.connects += 1;
        let body = service.map_or("pod".to_string(), |(s, _)| s.name.clone());
        let resp = self.response.clone().unwrap_or_else(|| {
            format!(
                "HTTP/1.1 200 OK\r\nserver: echo\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
        });
        Ok((
            MemConn {
                service: service.cloned(),
                written: Vec::new(),
                response: Some(Bytes::from(resp)),
            },
            false,
        ))
    }

    fn done(
        &mut self,
        conn: Option<MemConn>,
        _status: u16,
        _reusable: bool,
        _error: Option<io::ErrorKind>,
    ) {
        if let Some(c) = conn {
            self.calls
                .push((c.service, String::from_utf8_lossy(&c.written).into_owned()));
        }
    }

    async fn exchange(
        &mut self,
        _service: Option<&(ObjectRef, u16)>,
        _request: Bytes,
        _timeout: Option<std::time::Duration>,
    ) -> io::Result<Vec<u8>> {
        unreachable!("HTTP/1.1 requests use connect/done")
    }

    fn mirror(&mut self, service: &(ObjectRef, u16), request: Bytes) {
        self.mirrors.push((
            service.clone(),
            String::from_utf8_lossy(&request).into_owned(),
        ));
    }
}

/// Services `echo` and `echo-v1`, the route on `echo` (everything to echo-v1 with header
/// filters; `/old` redirected), and a DENY of `/admin/*`.
fn cfg() -> WaypointConfig {
    let route = echo_route_with_rules(
        r#"  - matches: [{path: {type: PathPrefix, value: /}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-routed, value: "yes"}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {remove: [server], add: [{name: x-via, value: waypoint}]}
    backendRefs:
    - name: echo-v1
      port: 80
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
"#,
    );
    let text = format!(
        r#"
services:
  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["10.96.0.10"], ports: {{80: 8080}}}}
  - {{name: echo-v1, namespace: default, hostname: echo-v1.default.svc.cluster.local, vips: ["10.96.0.11"], ports: {{80: 8080}}}}
---
{route}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/admin/*"]}}}}]
"#
    );
    load_str(Path::new("c.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"))
}

fn service_ctx() -> TunnelCtx {
    TunnelCtx {
        waypoint: ObjectRef::new("default", "waypoint"),
        root_namespace: "istio-system".into(),
        destination: Destination::Service {
            service: ObjectRef::new("default", "echo"),
            port: 80,
        },
        destination_ip: "10.96.0.10".parse().unwrap(),
        destination_port: 80,
        source_ip: "10.1.0.1".parse().unwrap(),
        principal: Some("cluster.local/ns/default/sa/client".into()),
        client_namespace: Some("default".into()),
        traceparent: None,
    }
}

fn run(chunks: &[&[u8]], ctx: &TunnelCtx) -> (End, MemTunnel, MockUpstream) {
    run_with(chunks, ctx, None)
}

/// [`run`] with the upstream answering `response`.
fn run_with(
    chunks: &[&[u8]],
    ctx: &TunnelCtx,
    response: Option<&str>,
) -> (End, MemTunnel, MockUpstream) {
    let cfg = cfg();
    let mut t = MemTunnel::new(chunks);
    let mut up = MockUpstream {
        response: response.map(str::to_string),
        ..Default::default()
    };
    let end = block_on(serve(&mut t, &cfg, ctx, &mut up, &mut SplitMix64(1))).unwrap();
    (end, t, up)
}

#[test]
fn parse_head_table() {
    let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD));
    let many: String = (0..300).map(|i| format!("h{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
    let table: Vec<(&[u8], &str)> = vec![
        (b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n", "head"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\n", "partial"),
        (b"GET /a HTT", "partial"),
        (b"GET /a HTTP/9.9\r\n\r\n", "400"),
        (b"G E T / HTTP/1.1\r\n\r\n", "400"),
        (b"GET a HTTP/1.1\r\n\r\n", "400"),
        (b"\x00\x01\x02\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", "400"),
        (big.as_bytes(), "431"),
        (&big.as_bytes()[..MAX_HEAD + 10], "431"),
        (many.as_bytes(), "431"),
    ];
    for (input, want) in table {
        let got = match parse_head(input) {
            Parsed::Head(..) => "head".to_string(),
            Parsed::Partial => "partial".to_string(),
            Parsed::Bad(s) => s.to_string(),
        };
        assert_eq!(
            got,
            want,
            "{:?}",
            String::from_utf8_lossy(&input[..input.len().min(40)])
        );
    }
    let Parsed::Head(h, n) = parse_head(b"POST /a/b?x=1&y HTTP/1.0\r\nHost: h\r\n\r\nBODY") else {
        panic!()
    };
    assert_eq!(
        (
            h.method.as_str(),
            h.path.as_str(),
            h.query.as_deref(),
            h.version,
            n
        ),
        ("POST", "/a/b", Some("x=1&y"), 0, 37)
    );
}

#[test]
fn malformed_request_line_is_400_and_closes() {
    let (end, t, up) = run(&[b"BLAH\r\n\r\n"], &service_ctx());
    assert_eq!(end, End::Closed(400));
    assert!(t.out().starts_with("HTTP/1.1 400 "), "{}", t.out());
    assert!(t.finished);
    assert!(up.calls.is_empty());
}

#[test]
fn headers_over_64k_are_431() {
    let filler = format!("x-filler: {}\r\n", "a".repeat(8 * 1024));
    let mut chunks: Vec<Vec<u8>> = vec![b"GET / HTTP/1.1\r\nhost: echo\r\n".to_vec()];
    for _ in 0..9 {
        chunks.push(filler.clone().into_bytes());
    }
    let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
    let (end, t, up) = run(&refs, &service_ctx());
    assert_eq!(end, End::Closed(431));
    assert!(t.out().starts_with("HTTP/1.1 431 "));
    assert!(up.calls.is_empty());
}

#[test]
fn r15_denied_request_is_403_and_never_reaches_upstream() {
    let (end, t, up) = run(
        &[
            b"GET /admin/users HTTP/1.1\r\nhost: echo\r\ncontent-length: 4\r\n\r\nbody",
            b"GET /ok HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
        ],
        &service_ctx(),
    );
    let out = t.out();
    assert!(out.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{out}");
    assert!(out.contains("\r\n\r\nRBAC: access denied"), "{out}");
    // The keep-alive connection goes on: the next request is served.
    assert_eq!(up.calls.len(), 1);
    assert!(up.calls[0].1.starts_with("GET /ok HTTP/1.1\r\n"));
    assert_eq!(end, End::Closed(200));
}

#[test]
fn r17_routed_with_filters_and_keep_alive() {
    let req = b"GET /a?q=1 HTTP/1.1\r\nHost: echo\r\nx-forwarded-for: 192.0.2.1\r\n\r\n";
    let post = b"POST /b HTTP/1.1\r\nHost: echo\r\ncontent-length: 5\r\n\r\nhello";
    // The second request arrives split mid-head and mid-body.
    let (end, t, up) = run(
        &[req, &post[..20], &post[20..50], &post[50..]],
        &service_ctx(),
    );
    assert_eq!(end, End::Eof);
    assert_eq!(up.calls.len(), 2);
    let (svc, sent) = &up.calls[0];
    assert_eq!(svc, &Some((ObjectRef::new("default", "echo-v1"), 80)));
    assert!(sent.starts_with("GET /a?q=1 HTTP/1.1\r\n"), "{sent}");
    assert!(sent.contains("x-routed: yes\r\n"), "{sent}");
    assert!(
        sent.contains("x-forwarded-for: 192.0.2.1, 10.1.0.1\r\n"),
        "{sent}"
    );
    assert!(
        up.calls[1].1.ends_with("\r\n\r\nhello"),
        "{}",
        up.calls[1].1
    );
    let out = t.out();
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
    assert!(!out.contains("server: echo"), "{out}");
    assert!(out.contains("x-via: waypoint\r\n"), "{out}");
    assert!(!t.finished);
}

#[test]
fn redirects_are_answered_by_the_waypoint() {
    let (_, t, up) = run(
        &[b"GET /old HTTP/1.1\r\nHost: echo\r\n\r\n"],
        &service_ctx(),
    );
    let out = t.out();
    assert!(
        out.starts_with("HTTP/1.1 301 Moved Permanently\r\nlocation: http://echo/new\r\n"),
        "{out}"
    );
    assert!(up.calls.is_empty());
}

#[test]
fn r16_pod_addressed_request_is_not_routed() {
    let mut ctx = service_ctx();
    ctx.destination = Destination::Workload {
        namespace: "default".into(),
        labels: BTreeMap::new(),
    };
    let (_, t, up) = run(&[b"GET /a HTTP/1.1\r\nHost: 10.1.0.9\r\n\r\n"], &ctx);
    assert_eq!(up.calls.len(), 1);
    assert_eq!(up.calls[0].0, None);
    assert!(!up.calls[0].1.contains("x-routed"));
    assert!(t.out().ends_with("pod"));
    // Policy still applies to pods (the DENY targets the waypoint).
    let (_, t, up) = run(&[b"GET /admin/x HTTP/1.1\r\nHost: 10.1.0.9\r\n\r\n"], &ctx);
    assert!(t.out().starts_with("HTTP/1.1 403 "));
    assert!(up.calls.is_empty());
}

#[test]
fn chunked_request_bodies_are_forwarded_as_received() {
    let body = "4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nx-trailer: t\r\n\r\n";
    let req =
        format!("POST /up HTTP/1.1\r\nHost: echo\r\ntransfer-encoding: chunked\r\n\r\n{body}");
    // Split across reads, and followed by a second request on the same tunnel.
    let (head, rest) = req.split_at(40);
    let (end, t, up) = run(
        &[
            head.as_bytes(),
            rest.as_bytes(),
            b"GET /next HTTP/1.1\r\nHost: echo\r\n\r\n",
        ],
        &service_ctx(),
    );
    assert_eq!(end, End::Eof);
    assert_eq!(up.calls.len(), 2);
    assert!(up.calls[0].1.contains("transfer-encoding: chunked\r\n"));
    assert!(
        up.calls[0].1.ends_with(&format!("\r\n\r\n{body}")),
        "{}",
        up.calls[0].1
    );
    assert!(up.calls[1].1.starts_with("GET /next "));
    assert_eq!(t.out().matches("HTTP/1.1 200 OK").count(), 2);
}

#[test]
fn ambiguous_or_unsupported_body_framing_is_400() {
    for req in [
        // Both framings: a smuggling vector.
        &b"POST / HTTP/1.1\r\nHost: echo\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n"[..],
        // A final coding other than chunked.
        b"POST / HTTP/1.1\r\nHost: echo\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: x\r\n\r\n",
    ] {
        let (end, t, up) = run(&[req], &service_ctx());
        assert_eq!(end, End::Closed(400), "{}", String::from_utf8_lossy(req));
        assert!(t.out().starts_with("HTTP/1.1 400 "));
        assert!(up.calls.is_empty());
    }
}

#[test]
fn requests_with_many_headers_are_parsed_up_to_the_limit() {
    // More headers than the small first-try array, fewer than the limit: forwarded whole.
    let mut req = String::from("GET /many HTTP/1.1\r\nHost: echo\r\n");
    for i in 0..100 {
        req.push_str(&format!("x-h{i}: v{i}\r\n"));
    }
    req.push_str("\r\n");
    let (end, t, up) = run(&[req.as_bytes()], &service_ctx());
    assert_eq!(end, End::Eof);
    assert_eq!(up.calls.len(), 1);
    assert!(up.calls[0].1.contains("x-h99: v99\r\n"));
    assert!(t.out().starts_with("HTTP/1.1 200 "));
    // Over the limit (256): 431.
    let mut req = String::from("GET /many HTTP/1.1\r\nHost: echo\r\n");
    for i in 0..300 {
        req.push_str(&format!("x-h{i}: v{i}\r\n"));
    }
    req.push_str("\r\n");
    let (end, t, up) = run(&[req.as_bytes()], &service_ctx());
    assert_eq!(end, End::Closed(431));
    assert!(t.out().starts_with("HTTP/1.1 431 "));
    assert!(up.calls.is_empty());
}

#[test]
fn duplicate_or_malformed_framing_and_host_are_400() {
    let table: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: 5, 6\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: +5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: -0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: 0x5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: 5 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: 99999999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length:\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: echo\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: echo\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: echo\r\ntransfer-encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: echo\r\ntransfer-encoding: identity\r\n\r\n",
        b"POST / HTTP/1.0\r\nHost: echo\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: echo\r\nHost: admin.internal\r\n\r\n",
    ];
    for req in table {
        let (end, t, up) = run(&[req], &service_ctx());
        assert_eq!(end, End::Closed(400), "{}", String::from_utf8_lossy(req));
        assert!(t.out().starts_with("HTTP/1.1 400 "), "{}", t.out());
        assert_eq!(up.connects, 0, "{}", String::from_utf8_lossy(req));
    }
    // Equal copies are one length, and only one Content-Length goes upstream.
    for req in [
        &b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello"[..],
        b"POST / HTTP/1.1\r\nHost: echo\r\ncontent-length: 5, 5\r\n\r\nhello",
    ] {
        let (end, _, up) = run(&[req], &service_ctx());
        assert_eq!(end, End::Eof);
        let sent = &up.calls[0].1;
        assert_eq!(
            sent.to_ascii_lowercase().matches("content-length").count(),
            1,
            "{sent}"
        );
        assert!(sent.contains("content-length: 5\r\n"), "{sent}");
        assert!(sent.ends_with("\r\n\r\nhello"), "{sent}");
    }
}

#[test]
fn malformed_chunked_body_is_400_before_any_upstream() {
    for body in [
        // Trailer smuggling: a lenient backend would see `GET /admin` here.
        &b"0\r\n\nGET /admin/x HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"0\r\nx\n\r\n",
        b"zz\r\n",
        b"1 x\r\na\r\n0\r\n\r\n",
    ] {
        let mut req =
            b"POST /up HTTP/1.1\r\nHost: echo\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        let (end, t, up) = run(&[&req], &service_ctx());
        assert_eq!(end, End::Closed(400), "{}", String::from_utf8_lossy(body));
        assert!(t.out().starts_with("HTTP/1.1 400 "), "{}", t.out());
        assert_eq!(up.connects, 0, "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn expectations_other_than_100_continue_are_417() {
    let (end, t, up) = run(
        &[b"POST / HTTP/1.1\r\nHost: echo\r\nexpect: 100-continue-please\r\ncontent-length: 2\r\n\r\nhi"],
        &service_ctx(),
    );
    assert_eq!(end, End::Closed(417));
    assert!(
        t.out().starts_with("HTTP/1.1 417 Expectation Failed\r\n"),
        "{}",
        t.out()
    );
    assert_eq!(up.connects, 0);
    // 100-continue: answered here, not passed on.
    let (_, t, up) = run(
        &[
            b"POST / HTTP/1.1\r\nHost: echo\r\nExpect: 100-Continue\r\ncontent-length: 2\r\n\r\n",
            b"hi",
        ],
        &service_ctx(),
    );
    assert!(
        t.out()
            .starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "),
        "{}",
        t.out()
    );
    assert!(
        !up.calls[0].1.to_ascii_lowercase().contains("expect"),
        "{}",
        up.calls[0].1
    );
}

#[test]
fn h2c_upgrade_is_stripped_and_hop_by_hop_fields_are_not_forwarded() {
    let req = b"GET /a HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade, HTTP2-Settings, x-secret, content-length\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nx-secret: s\r\nkeep-alive: timeout=5\r\nte: trailers\r\nproxy-connection: keep-alive\r\nx-kept: k\r\ncontent-length: 0\r\n\r\n";
    // The upstream answers 101 anyway: not spliced (the request asked for nothing allowed).
    let (end, t, up) = run_with(
        &[req],
        &service_ctx(),
        Some("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"),
    );
    let sent = up.calls.first().map(|c| c.1.to_ascii_lowercase());
    assert_eq!(up.connects, 1);
    assert_ne!(end, End::Upgraded);
    assert!(t.out().starts_with("HTTP/1.1 502 "), "{}", t.out());
    let (end, t, up) = run(&[req], &service_ctx());
    assert_eq!(end, End::Eof);
    assert!(t.out().starts_with("HTTP/1.1 200 "), "{}", t.out());
    let sent = sent.unwrap_or_else(|| up.calls[0].1.to_ascii_lowercase());
    for gone in [
        "upgrade",
        "http2-settings",
        "connection",
        "x-secret",
        "keep-alive",
        "\r\nte:",
        "proxy-connection",
    ] {
        assert!(!sent.contains(gone), "{gone} in {sent}");
    }
    assert!(sent.contains("x-kept: k\r\n"), "{sent}");
    // `Connection` cannot make the framing hop-by-hop.
    assert!(sent.contains("content-length: 0\r\n"), "{sent}");
}

#[test]
fn websocket_upgrade_is_forwarded_and_spliced() {
    let req = b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n";
    let (end, t, up) = run_with(
        &[req],
        &service_ctx(),
        Some(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        ),
    );
    assert_eq!(end, End::Upgraded);
    assert!(t.out().contains("Upgrade: websocket\r\n"), "{}", t.out());
    assert_eq!(up.connects, 1);
    // Without `Connection: upgrade`, no upgrade is asked for.
    let (end, _, up) = run(
        &[b"GET /ws HTTP/1.1\r\nHost: echo\r\nUpgrade: websocket\r\n\r\n"],
        &service_ctx(),
    );
    assert_eq!(end, End::Eof);
    assert!(
        !up.calls[0].1.to_ascii_lowercase().contains("upgrade"),
        "{}",
        up.calls[0].1
    );
}

#[test]
fn response_heads_lose_hop_by_hop_fields_and_ambiguous_framing() {
    let pod = {
        let mut c = service_ctx();
        c.destination = Destination::Workload {
            namespace: "default".into(),
            labels: BTreeMap::new(),
        };
        c
    };
    let get = &b"GET /a HTTP/1.1\r\nHost: 10.1.0.9\r\n\r\n"[..];
    // Hop-by-hop fields dropped, others kept.
    let (_, t, _) = run_with(
        &[get],
        &pod,
        Some("HTTP/1.1 200 OK\r\nconnection: keep-alive, x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\nx-end: e\r\ncontent-length: 2\r\n\r\nok"),
    );
    let out = t.out();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        !out.contains("x-hop") && !out.contains("keep-alive") && !out.contains("connection"),
        "{out}"
    );
    assert!(
        out.contains("x-end: e\r\n") && out.ends_with("\r\n\r\nok"),
        "{out}"
    );
    // Transfer-Encoding and Content-Length: the length is dropped (RFC 9112 §6.3).
    let (_, t, _) = run_with(
        &[get],
        &pod,
        Some("HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    );
    let out = t.out();
    assert!(!out.contains("content-length"), "{out}");
    assert!(
        out.ends_with("transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        "{out}"
    );
    // Equal Content-Lengths: one passed on; different ones: not passed on at all.
    let (_, t, _) = run_with(
        &[get],
        &pod,
        Some("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok"),
    );
    assert_eq!(
        t.out().matches("content-length: 2\r\n").count(),
        1,
        "{}",
        t.out()
    );
    for bad in [
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        "HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        // Retried as a failed upstream (backoff timers): on a runtime.
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let cfg = cfg();
        let mut t = MemTunnel::new(&[get]);
        let mut up = MockUpstream {
            response: Some(bad.to_string()),
            ..Default::default()
        };
        rt.block_on(serve(&mut t, &cfg, &pod, &mut up, &mut SplitMix64(1)))
            .unwrap();
        assert!(t.out().starts_with("HTTP/1.1 503 "), "{bad:?}: {}", t.out());
    }
}

#[test]
fn eof_delimited_http10_response_is_rechunked_as_http11() {
    let (_, t, _) = run_with(
        &[b"GET /a HTTP/1.1\r\nHost: echo\r\n\r\n"],
        &service_ctx(),
        Some("HTTP/1.0 200 OK\r\nx-a: b\r\n\r\nbody"),
    );
    let out = t.out();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\n4\r\nbody\r\n0\r\n\r\n"), "{out}");
}
