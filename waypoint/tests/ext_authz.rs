//! AuthorizationPolicy CUSTOM with an `envoyExtAuthzHttp` extension provider, through the
//! waypoint service on real sockets: an external authorizer in the mesh (a service of the
//! model, reached over HBONE like any upstream) that allows a request carrying
//! `x-ext-authz: allow`, as Istio's ext-authz sample does, and reports what it was asked.
//!
//! What an Istio user sees: a request no CUSTOM rule matches is not checked; a denied one
//! gets the authorizer's status, body and headers and never reaches the backend; an
//! allowed one reaches it with the authorizer's `headersToUpstreamOnAllow`, and DENY
//! policies run after the check (and see those headers); an authorizer that fails to
//! answer gives `statusOnError`. Over HTTP/1.1 and HTTP/2 (R15).

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

use bytes::Bytes;
use common::{
    app_model, bind_node_ztunnel, id, ip, next_request, ok_response, serve_threads,
    stand_in_ztunnel, Ztunnel,
};
use hbone::ca::{CertSource, SigningCa};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);

/// The echo backend: answers `<target> result=<x-ext-authz-check-result>`.
fn backend(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let addr = serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let r = req.header("x-ext-authz-check-result").unwrap_or("-");
            let body = format!("{} result={r}", req.path);
            let _ = tx.send(body.clone());
            if c.write_all(ok_response(&body).as_bytes()).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// The authorizer: `200` with `x-ext-authz-check-result: allowed` for a check carrying
/// `x-ext-authz: allow`, else `403` with `…: denied` and a body saying why; a check of a
/// path ending `/crash` gets its connection closed unanswered. Reports each check as
/// `<method> <target> x-ext-authz=<v> authorization=<v> x-extra=<v>`.
fn authorizer(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let addr = serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let f = |n: &str| req.header(n).unwrap_or("-").to_string();
            let _ = tx.send(format!(
                "{} {} x-ext-authz={} authorization={} x-extra={} len={}",
                req.method,
                req.path,
                f("x-ext-authz"),
                f("authorization"),
                f("x-extra"),
                f("content-length"),
            ));
            if req.path.ends_with("/crash") {
                return;
            }
            let resp = if req.header("x-ext-authz") == Some("allow") {
                "HTTP/1.1 200 OK\r\nx-ext-authz-check-result: allowed\r\nx-internal: no\r\ncontent-length: 0\r\n\r\n".to_string()
            } else {
                let body =
                    "denied by ext_authz for not found header `x-ext-authz: allow` in the request";
                format!("HTTP/1.1 403 Forbidden\r\nx-ext-authz-check-result: denied\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}", body.len())
            };
            if c.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// The gRPC authorizer (`envoy.service.auth.v3.Authorization/Check` over HTTP/2, with
/// the waypoint's own message types): OK, setting `x-ext-authz-check-result: allowed` and
/// removing `authorization`, for a request whose headers have `x-ext-authz: allow`; else
/// PERMISSION_DENIED with a `403`, a header and a body. Reports each check as
/// `<method> <path> principal=<source principal> auth=<authorization>`.
fn grpc_authorizer(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let addr = common::serve_h2(ip, move |req, respond| grpc_check(req, respond, tx.clone()));
    (addr, rx)
}

/// One call of [`grpc_authorizer`].
async fn grpc_check(
    req: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    tx: mpsc::Sender<String>,
) {
    use prost::Message;
    use waypoint::ext_authz::pb;
    assert_eq!(
        req.uri().path(),
        "/envoy.service.auth.v3.Authorization/Check"
    );
    assert_eq!(req.headers()["content-type"], "application/grpc");
    let data = common::h2_body(req.into_body()).await;
    let check = pb::CheckRequest::decode(&data[5..]).unwrap();
    let a = check.attributes.unwrap();
    let http = a.request.unwrap().http.unwrap();
    let h = |n: &str| http.headers.get(n).cloned().unwrap_or("-".into());
    let _ = tx.send(format!(
        "{} {} {} principal={} auth={}",
        http.method,
        http.path,
        http.protocol,
        a.source.unwrap().principal,
        h("authorization")
    ));
    let option = |k: &str, v: &str| pb::HeaderValueOption {
        header: Some(pb::HeaderValue {
            key: k.into(),
            value: v.into(),
            raw_value: vec![],
        }),
        append: None,
    };
    let answer = if h("x-ext-authz") == "allow" {
        pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 0,
                message: String::new(),
            }),
            http_response: Some(pb::check_response::HttpResponse::OkResponse(
                pb::OkHttpResponse {
                    headers: vec![option("x-ext-authz-check-result", "allowed")],
                    headers_to_remove: vec!["authorization".into()],
                    response_headers_to_add: vec![option("x-authz-served-by", "grpc")],
                },
            )),
        }
    } else {
        pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 7,
                message: "denied".into(),
            }),
            http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
                pb::DeniedHttpResponse {
                    status: Some(pb::HttpStatus { code: 403 }),
                    headers: vec![option("x-ext-authz-check-result", "denied")],
                    body: "denied by the gRPC authorizer".into(),
                },
            )),
        }
    };
    common::grpc_reply(respond, &answer.encode_to_vec());
}

struct Mesh {
    wp: common::Waypoint,
    seen: mpsc::Receiver<String>,
    checks: mpsc::Receiver<String>,
    grpc_checks: mpsc::Receiver<String>,
    _zt: Ztunnel,
}

const POLICIES: &str = r#"meshConfig:
  extensionProviders:
  - name: sample-ext-authz-http
    envoyExtAuthzHttp:
      service: ext-authz.app.svc.cluster.local
      port: "8000"
      pathPrefix: /check
      timeout: 10s
      statusOnError: "503"
      includeRequestHeadersInCheck: [x-ext-authz]
      includeAdditionalHeadersInCheck: {x-extra: from-waypoint}
      headersToUpstreamOnAllow: [x-ext-authz-check-result]
      headersToDownstreamOnDeny: [x-ext-authz-check-result]
      headersToDownstreamOnAllow: [x-internal]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: app}
spec:
  targetRefs:
  - {kind: Service, name: echo}
  action: CUSTOM
  provider: {name: sample-ext-authz-http}
  rules:
  - to: [{operation: {paths: ["/headers*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: after-the-check, namespace: app}
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: wp}
  action: DENY
  rules:
  - to: [{operation: {paths: [/headers/deny-allowed]}}]
    when: [{key: "request.headers[x-ext-authz-check-result]", values: [allowed]}]
"#;

impl Mesh {
    fn start() -> Mesh {
        Mesh::with(POLICIES)
    }

    /// The mesh with `policies` (a MeshConfig document, policies) beside the model.
    fn with(policies: &str) -> Mesh {
        let (net, zl) = bind_node_ztunnel(61);
        let ca = Arc::new(SigningCa::generate_root("cluster.local").unwrap().0);
        let zt = stand_in_ztunnel(
            zl,
            &ca.issue(&id("app", "echo"), SystemTime::now()).unwrap(),
        );
        let (pod, seen) = backend(ip(net, 2));
        let (authz, checks) = authorizer(ip(net, 3));
        let (grpc_authz, grpc_checks) = grpc_authorizer(ip(net, 4));
        let workloads = format!(
            "  - {{uid: e1, name: e1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/echo.app.svc.cluster.local\": {{80: {}}}}}}}\n  - {{uid: a1, name: a1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/ext-authz.app.svc.cluster.local\": {{8000: {}}}}}}}\n  - {{uid: g1, name: g1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/ext-authz-grpc.app.svc.cluster.local\": {{9000: {}}}}}}}\n",
            pod.ip(),
            pod.port(),
            authz.ip(),
            authz.port(),
            grpc_authz.ip(),
            grpc_authz.port()
        );
        let services = "  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n  - {name: ext-authz, namespace: app, hostname: ext-authz.app.svc.cluster.local, vips: [\"10.96.0.9\"], ports: {8000: 8000}}\n  - {name: ext-authz-grpc, namespace: app, hostname: ext-authz-grpc.app.svc.cluster.local, vips: [\"10.96.0.10\"], ports: {9000: 9000}}\n";
        let model = app_model(ip(net, 1), &workloads, services);
        let text = format!("{model}---\n{policies}");
        let wp =
            common::Waypoint::with_stats(&ca, &text, &format!("waypoint-ext-authz-{net}.yaml"));
        Mesh {
            wp,
            seen,
            checks,
            grpc_checks,
            _zt: zt,
        }
    }

    fn counters(&self) -> &waypoint::service::Counters {
        &self.wp.handle().counters
    }

    /// Each raw HTTP/1.1 request on one tunnel to `echo`: (status, head, body).
    fn http1(&self, reqs: &[String]) -> Vec<(u16, String, String)> {
        common::http1_on_tunnel(
            self.wp.addr,
            &self.wp.client_cert,
            "10.96.0.1:80",
            CLIENT,
            reqs,
        )
        .into_iter()
        .map(|r| (r.status, r.head.to_ascii_lowercase(), r.text()))
        .collect()
    }

    /// HTTP/2 GETs of `(path, x-ext-authz)` on one tunnel to `echo`: (status, body).
    fn http2(&self, reqs: &[(&str, Option<&str>)]) -> Vec<(u16, String)> {
        let reqs: Vec<(&str, Vec<(&str, &str)>)> = reqs
            .iter()
            .map(|(p, v)| (*p, v.map(|v| ("x-ext-authz", v)).into_iter().collect()))
            .collect();
        let host = "echo.app.svc.cluster.local";
        common::h2_on_tunnel(
            self.wp.addr,
            &self.wp.client_cert,
            "10.96.0.1:80",
            CLIENT,
            host,
            &reqs,
        )
    }
}

fn get(path: &str, fields: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: echo.app.svc.cluster.local\r\n{fields}\r\n")
}

#[test]
fn r15_custom_policy_asks_the_external_authorizer_over_http1() {
    let m = Mesh::start();
    let got = m.http1(&[
        // No CUSTOM rule matches: not checked.
        get("/open", ""),
        // Denied by the authorizer: its status, body and named header; never upstream.
        get("/headers", "authorization: Bearer secret\r\n"),
        // Allowed: its header goes upstream.
        get(
            "/headers?x=1",
            "x-ext-authz: allow\r\nauthorization: Bearer secret\r\n",
        ),
        // DENY runs after the check and sees the authorizer's header.
        get("/headers/deny-allowed", "x-ext-authz: allow\r\n"),
        // The authorizer does not answer: statusOnError.
        get("/headers/crash", "x-ext-authz: allow\r\n"),
    ]);
    assert_eq!((got[0].0, got[0].2.as_str()), (200, "/open result=-"));
    assert_eq!(got[1].0, 403);
    assert_eq!(
        got[1].2,
        "denied by ext_authz for not found header `x-ext-authz: allow` in the request"
    );
    assert!(
        got[1].1.contains("x-ext-authz-check-result: denied\r\n"),
        "{}",
        got[1].1
    );
    assert_eq!(
        (got[2].0, got[2].2.as_str()),
        (200, "/headers?x=1 result=allowed")
    );
    assert!(got[2].1.contains("x-internal: no\r\n"), "{}", got[2].1);
    assert!(!got[0].1.contains("x-internal"), "{}", got[0].1);
    assert_eq!((got[3].0, got[3].2.as_str()), (403, "RBAC: access denied"));
    assert_eq!(got[4].0, 503);
    // What the authorizer was asked: the method, the prefixed target, the named header
    // and the added one; never the client's other fields or a body.
    let mut checks: Vec<String> = m.checks.try_iter().collect();
    // The unanswered check came on a kept connection: it may be tried once more on a new
    // one (as any idempotent request whose kept connection closes unanswered).
    if checks.len() == 5 {
        assert_eq!(checks[4], checks[3]);
        checks.pop();
    }
    assert_eq!(
        checks,
        [
            "GET /check/headers x-ext-authz=- authorization=- x-extra=from-waypoint len=0",
            "GET /check/headers?x=1 x-ext-authz=allow authorization=- x-extra=from-waypoint len=0",
            "GET /check/headers/deny-allowed x-ext-authz=allow authorization=- x-extra=from-waypoint len=0",
            "GET /check/headers/crash x-ext-authz=allow authorization=- x-extra=from-waypoint len=0",
        ]
    );
    let seen: Vec<String> = m.seen.try_iter().collect();
    assert_eq!(seen, ["/open result=-", "/headers?x=1 result=allowed"]);
    let c = &m.counters().ext_authz;
    let counts: Vec<u64> = c.iter().map(|x| x.load(Relaxed)).collect();
    assert_eq!(counts, [2, 1, 1], "allowed, denied, error");
    assert_eq!(
        m.counters().denied.load(Relaxed),
        1,
        "the DENY after the check"
    );
    // The authorizer's refusals carry Envoy's flag UAEX in the request metrics.
    let page = common::prometheus_page(m.wp.handle().stats_addr().unwrap());
    assert_eq!(
        common::requests_in(&page, &["response_flags=\"UAEX\""]),
        2,
        "{page}"
    );
    assert_eq!(
        common::requests_in(&page, &["response_code=\"403\"", "response_flags=\"UAEX\""]),
        1
    );
}

#[test]
fn r15_custom_policy_asks_the_external_authorizer_over_http2() {
    let m = Mesh::start();
    let got = m.http2(&[
        ("/open", None),
        ("/headers", None),
        ("/headers", Some("allow")),
    ]);
    assert_eq!(got[0], (200, "/open result=-".into()));
    assert_eq!(
        got[1],
        (
            403,
            "denied by ext_authz for not found header `x-ext-authz: allow` in the request".into()
        )
    );
    assert_eq!(got[2], (200, "/headers result=allowed".into()));
    assert_eq!(m.checks.try_iter().count(), 2);
    assert_eq!(m.seen.try_iter().count(), 2);
}

/// The gRPC provider (`envoyExtAuthzGrpc`, as OPA's Envoy plugin is deployed) on the
/// `echo` Service: its `CheckRequest` carries the request and the client's SPIFFE
/// identity; OK's header changes apply to what goes upstream; a denial's `403`, header
/// and body are the client's answer.
#[test]
fn r15_custom_policy_asks_a_grpc_authorizer() {
    let policies = r#"meshConfig:
  extensionProviders:
  - name: opa
    envoyExtAuthzGrpc: {service: ext-authz-grpc.app.svc.cluster.local, port: 9000, timeout: 10s}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: app}
spec:
  targetRefs:
  - {kind: Service, name: echo}
  action: CUSTOM
  provider: {name: opa}
  rules:
  - to: [{operation: {notPaths: ["/open"]}}]
"#;
    let m = Mesh::with(policies);
    let got = m.http1(&[
        get("/open", ""),
        get("/x?y=1", "authorization: Bearer t\r\n"),
        get("/x", "x-ext-authz: allow\r\nauthorization: Bearer t\r\n"),
    ]);
    assert_eq!((got[0].0, got[0].2.as_str()), (200, "/open result=-"));
    assert_eq!(
        (got[1].0, got[1].2.as_str()),
        (403, "denied by the gRPC authorizer")
    );
    assert!(
        got[1].1.contains("x-ext-authz-check-result: denied\r\n"),
        "{}",
        got[1].1
    );
    assert_eq!((got[2].0, got[2].2.as_str()), (200, "/x result=allowed"));
    assert!(
        got[2].1.contains("x-authz-served-by: grpc\r\n"),
        "{}",
        got[2].1
    );
    let checks: Vec<String> = m.grpc_checks.try_iter().collect();
    assert_eq!(
        checks,
        [
            "GET /x?y=1 HTTP/1.1 principal=spiffe://cluster.local/ns/app/sa/client auth=Bearer t",
            "GET /x HTTP/1.1 principal=spiffe://cluster.local/ns/app/sa/client auth=Bearer t",
        ]
    );
    assert_eq!(
        m.checks.try_iter().count(),
        0,
        "the HTTP authorizer was not asked"
    );
    // Over HTTP/2 too.
    let got = m.http2(&[("/x", Some("allow")), ("/x", None)]);
    assert_eq!(got[0], (200, "/x result=allowed".into()));
    assert_eq!(got[1].0, 403);
    // The check says the client spoke HTTP/2, as Envoy's does.
    let checks: Vec<String> = m.grpc_checks.try_iter().collect();
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert!(
        checks.iter().all(|c| c.starts_with("GET /x HTTP/2 ")),
        "{checks:?}"
    );
    let counts: Vec<u64> = m
        .counters()
        .ext_authz
        .iter()
        .map(|x| x.load(Relaxed))
        .collect();
    assert_eq!(counts, [2, 2, 0], "allowed, denied, error");
}
