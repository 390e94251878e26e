//! gRPC requests that the waypoint retries: `grpc_response_status` describes the final
//! response only — its `grpc-status` (trailers, or a trailers-only head), else its HTTP
//! status mapped as Envoy does — never a status an earlier, retried try carried.
//! Client (HTTP/2 in the tunnel) → waypoint → stand-in ztunnel → HTTP/2 backend
//! (`useClientProtocol`), whose first try of each path answers `503` with
//! `grpc-status: 14` (trailers-only) and whose second answers per path.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    echo_node, grpc_posts, h2_server, ip, requests_in, send_grpc_message, serve_async, start_grpc,
    stats_page,
};

/// The paths the backend knows, and how each answers its second (final) try.
const PATHS: [&str; 4] = ["/trailers", "/none", "/only", "/fail"];

/// An HTTP/2 backend: each path's first request gets `503` + `grpc-status: 14`
/// (trailers-only); later ones get, by path, `/trailers` 200 + a message + trailers
/// `grpc-status: 0`; `/none` 200 + a message and no trailers (no status anywhere);
/// `/only` 200 trailers-only with `grpc-status: 5`; `/fail` a bare `500` (no status).
/// `tries` counts the requests per path (index in [`PATHS`]).
fn flaky_grpc_backend(ip: Ipv4Addr, tries: Arc<[AtomicU32; 4]>) -> SocketAddr {
    serve_async(ip, move |tcp| {
        let tries = tries.clone();
        async move {
            let Some(mut conn) = h2_server(tcp).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let Some(i) = PATHS.iter().position(|p| *p == req.uri().path()) else {
                    let _ = respond.send_response(
                        http::Response::builder().status(404).body(()).unwrap(),
                        true,
                    );
                    continue;
                };
                let first = tries[i].fetch_add(1, Ordering::SeqCst) == 0;
                let grpc = |status: u16| {
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/grpc")
                };
                let (resp, end) = match (first, PATHS[i]) {
                    (true, _) => (grpc(503).header("grpc-status", "14"), true),
                    (false, "/only") => (grpc(200).header("grpc-status", "5"), true),
                    (false, "/fail") => (http::Response::builder().status(500), true),
                    (false, _) => (grpc(200), false),
                };
                let Ok(mut tx) = respond.send_response(resp.body(()).unwrap(), end) else {
                    continue;
                };
                if !end {
                    let status = (PATHS[i] != "/none").then_some("0");
                    send_grpc_message(&mut tx, status);
                }
            }
        }
    })
}

#[test]
fn telemetry_grpc_status_of_a_retried_request_is_the_final_responses() {
    let (net, ca, _zt) = echo_node(29);
    let tries = Arc::new([0, 0, 0, 0].map(AtomicU32::new));
    let b = flaky_grpc_backend(ip(net, 2), tries.clone());
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: grpc, namespace: app}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: grpc}]\n  rules:\n  - backendRefs: [{name: grpc, port: 80}]\n    retry: {codes: [503], attempts: 1, backoff: 1ms}\n";
    let (handle, shutdown, cert) = start_grpc(&ca, ip(net, 1), b, route, "grpc-retry.yaml");
    let got = grpc_posts(handle.addr, &cert, &PATHS.map(|p| (p, true)));
    // Every path was tried twice, and the client saw the second try's answer.
    for (p, n) in PATHS.iter().zip(tries.iter()) {
        assert_eq!(n.load(Ordering::SeqCst), 2, "{p}");
    }
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        got,
        [(200, s("0")), (200, None), (200, s("5")), (500, None)]
    );
    // Each request is recorded once (not once per try); wait for the last record.
    let give_up = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let page = stats_page(&handle);
        if requests_in(&page, &["istio_requests_total{"]) >= 4 || Instant::now() > give_up {
            break page;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(requests_in(&page, &["istio_requests_total{"]), 4, "{page}");
    let grpc = |code: &str, status: &str| {
        requests_in(
            &page,
            &[
                "request_protocol=\"grpc\"",
                &format!("response_code=\"{code}\",grpc_response_status=\"{status}\","),
            ],
        )
    };
    // The final trailers' status.
    assert_eq!(grpc("200", "0"), 1, "{page}");
    // No status in the final response: a 200 has none known (not the first try's 14).
    assert_eq!(grpc("200", ""), 1, "{page}");
    // The final trailers-only head's status.
    assert_eq!(grpc("200", "5"), 1, "{page}");
    // A final 500 without status: mapped as Envoy does (UNKNOWN), not the first try's 14.
    assert_eq!(grpc("500", "2"), 1, "{page}");
    assert_eq!(
        requests_in(&page, &["grpc_response_status=\"14\""]),
        0,
        "retried tries are not recorded: {page}"
    );
    shutdown.drain(Duration::from_millis(200));
    let _ = handle.join();
}

/// An HTTP/2 gRPC backend whose first answer to each path is `200` with `grpc-status: 14`
/// (UNAVAILABLE, trailers-only) and whose later ones are `200` + a message + trailers
/// `grpc-status: 0`; `tries` counts the requests per path (`/a`, `/b`, `/c`).
fn unavailable_once_backend(ip: Ipv4Addr, tries: Arc<[AtomicU32; 3]>) -> SocketAddr {
    common::serve_h2(ip, move |req, mut respond| {
        let tries = tries.clone();
        async move {
            let i = ["/a", "/b", "/c"]
                .iter()
                .position(|p| *p == req.uri().path())
                .unwrap_or(0);
            let first = tries[i].fetch_add(1, Ordering::SeqCst) == 0;
            let resp = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc");
            let (resp, end) = if first {
                (resp.header("grpc-status", "14"), true)
            } else {
                (resp, false)
            };
            if let Ok(mut tx) = respond.send_response(resp.body(()).unwrap(), end) {
                if !end {
                    send_grpc_message(&mut tx, Some("0"));
                }
            }
        }
    })
}

/// Retries by gRPC status, as Envoy makes them: a trailers-only `grpc-status` in a `200`
/// head. Istio's default policy retries UNAVAILABLE and CANCELLED; a VirtualService's
/// `retryOn` says which statuses it retries.
#[test]
fn grpc_statuses_are_retried_by_istios_default_and_by_virtual_service_retry_on() {
    let (net, ca, _zt) = echo_node(31);
    let tries = Arc::new([0, 0, 0].map(AtomicU32::new));
    let b = unavailable_once_backend(ip(net, 2), tries.clone());
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: grpc, namespace: app}\nspec:\n  hosts: [grpc]\n  http:\n  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: grpc}}]\n  - match: [{uri: {prefix: /b}}]\n    retries: {attempts: 2, retryOn: \"5xx\"}\n    route: [{destination: {host: grpc}}]\n  - retries: {attempts: 2, retryOn: \"unavailable\"}\n    route: [{destination: {host: grpc}}]\n";
    let (handle, shutdown, cert) = start_grpc(&ca, ip(net, 1), b, vs, "grpc-retry-on.yaml");
    let got = grpc_posts(
        handle.addr,
        &cert,
        &[("/a", true), ("/b", true), ("/c", true)],
    );
    let s = |v: &str| Some(v.to_string());
    // /a: no retries field, Istio's default retries UNAVAILABLE; /b: 5xx does not cover a
    // 200 with grpc-status 14; /c: retryOn unavailable.
    assert_eq!(got, [(200, s("0")), (200, s("14")), (200, s("0"))]);
    let n: Vec<u32> = tries.iter().map(|t| t.load(Ordering::SeqCst)).collect();
    assert_eq!(n, [2, 1, 2]);
    shutdown.drain(Duration::from_millis(200));
    let _ = handle.join();
}
