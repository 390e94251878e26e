//! gRPC requests on the waypoint's metrics (review #8): `request_protocol="grpc"` and
//! `grpc_response_status` from the response's `grpc-status` trailer, from a trailers-only
//! head, or (no status, as Envoy) from the HTTP status of a local answer (403 → 7).
//! Client (HTTP/2 in the tunnel) → waypoint → stand-in ztunnel → HTTP/2 backend
//! (`useClientProtocol`).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{
    echo_node, grpc_posts, h2_server, ip, requests_in, send_grpc_message, serve_async, start_grpc,
    stats_page,
};

/// An HTTP/2 backend answering a gRPC-looking response: `/data` a message then trailers
/// with `grpc-status: 5`; `/only` a trailers-only head with `grpc-status: 14`.
fn grpc_backend(ip: Ipv4Addr) -> SocketAddr {
    serve_async(ip, move |tcp| async move {
        let Some(mut conn) = h2_server(tcp).await else {
            return;
        };
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            let only = req.uri().path() == "/only";
            let mut resp = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc");
            if only {
                resp = resp.header("grpc-status", "14");
            }
            let resp = resp.body(()).unwrap();
            let Ok(mut tx) = respond.send_response(resp, only) else {
                continue;
            };
            if !only {
                send_grpc_message(&mut tx, Some("5"));
            }
        }
    })
}

#[test]
fn telemetry_grpc_requests_report_grpc_and_their_status() {
    let (net, ca, _zt) = echo_node(23);
    let b = grpc_backend(ip(net, 2));
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: app}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: grpc}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/denied]}}]\n";
    let (handle, shutdown, cert) = start_grpc(&ca, ip(net, 1), b, deny, "grpc.yaml");
    let posts = [
        ("/data", true),
        ("/only", true),
        ("/denied", true),
        ("/plain", false),
    ];
    let got = grpc_posts(handle.addr, &cert, &posts);
    // The trailers and the trailers-only head reach the client as sent.
    assert_eq!(
        got,
        [
            (200, Some("5".to_string())),
            (200, Some("14".to_string())),
            (403, None),
            (200, Some("5".to_string())),
        ]
    );
    let page = stats_page(&handle);
    let count = |with: &[&str]| requests_in(&page, with);
    let grpc = |code: &str, status: &str| {
        count(&[
            "request_protocol=\"grpc\"",
            &format!("response_code=\"{code}\",grpc_response_status=\"{status}\","),
        ])
    };
    assert_eq!(grpc("200", "5"), 1, "{page}");
    assert_eq!(grpc("200", "14"), 1, "{page}");
    // Denied here, no grpc-status: the 403 mapped as Envoy does (PERMISSION_DENIED).
    assert_eq!(grpc("403", "7"), 1, "{page}");
    // Not gRPC (no application/grpc content type): `http`, empty status, whatever the
    // response carries.
    assert_eq!(
        count(&["request_protocol=\"http\"", "grpc_response_status=\"\","]),
        1,
        "{page}"
    );
    assert_eq!(count(&["istio_requests_total{"]), 4, "{page}");
    shutdown.drain(Duration::from_millis(200));
    let _ = handle.join();
}
