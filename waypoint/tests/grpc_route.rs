//! R17 with a GRPCRoute, end to end: gRPC calls (HTTP/2 in the tunnel) through the
//! waypoint to an HTTP/2 backend (`useClientProtocol`), routed by service and method, with
//! the rule's RequestHeaderModifier applied; a call no rule matches is answered `404` by
//! the waypoint and never reaches the backend.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use common::{
    echo_node, grpc_posts, h2_server, ip, requests_in, serve_async, start_grpc, stats_page,
};

/// An HTTP/2 gRPC backend answering every call `200` with one message and `grpc-status:
/// 0`; `calls` counts them, `tagged` those carrying `x-route: hello`.
fn backend(ip: Ipv4Addr, calls: Arc<AtomicU32>, tagged: Arc<AtomicU32>) -> SocketAddr {
    serve_async(ip, move |tcp| {
        let (calls, tagged) = (calls.clone(), tagged.clone());
        async move {
            let Some(mut conn) = h2_server(tcp).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                calls.fetch_add(1, Ordering::SeqCst);
                if req.headers().get("x-route").is_some_and(|v| v == "hello") {
                    tagged.fetch_add(1, Ordering::SeqCst);
                }
                let resp = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                if let Ok(mut tx) = respond.send_response(resp, false) {
                    common::send_grpc_message(&mut tx, Some("0"));
                }
            }
        }
    })
}

#[test]
fn r17_grpc_route_routes_calls_by_service_and_method() {
    let (net, ca, _zt) = echo_node(47);
    let (calls, tagged) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let pod = backend(ip(net, 2), calls.clone(), tagged.clone());
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc}]
  rules:
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-route, value: hello}]}
    backendRefs: [{name: grpc, port: 80}]
  - matches: [{method: {type: RegularExpression, service: 'grpc\.health\.v1\..+'}}]
    backendRefs: [{name: grpc, port: 80}]
"#;
    let (handle, _shutdown, cert) = start_grpc(&ca, ip(net, 1), pod, route, "grpc-route.yaml");
    let got = grpc_posts(
        handle.addr,
        &cert,
        &[
            ("/helloworld.Greeter/SayHello", true),
            ("/grpc.health.v1.Health/Check", true),
            ("/helloworld.Greeter/SayGoodbye", true),
        ],
    );
    assert_eq!(
        got,
        vec![
            (200, Some("0".into())),
            (200, Some("0".into())),
            // No rule: the waypoint's 404 (gRPC clients read it as UNIMPLEMENTED).
            (404, None),
        ]
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the unrouted call never left"
    );
    assert_eq!(
        tagged.load(Ordering::SeqCst),
        1,
        "the first rule's header, only there"
    );
    let page = stats_page(&handle);
    assert_eq!(
        requests_in(
            &page,
            &["response_code=\"200\"", "grpc_response_status=\"0\""]
        ),
        2,
        "{page}"
    );
}
