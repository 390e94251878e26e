//! Circuit breaking: Istio's DestinationRule `trafficPolicy.connectionPool` on a service,
//! enforced as Envoy's cluster circuit breakers (see `waypoint::breaker`). The `waypoint`
//! binary (one worker), a stand-in destination ztunnel and a backend that holds `/hold`
//! requests until the test lets one go, so every request's state (at the backend, waiting
//! in the waypoint, refused) is an event the test waits for, never a time.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    block_on, bounded, get, next_request, prometheus_page, read_response, serve_threads,
    wait_until, EchoBinary,
};
use hbone::stream::H2Stream;

const HOST: &str = "echo.app.svc.cluster.local";

/// What the backend saw.
#[derive(Default)]
struct Seen {
    /// Connections accepted (one per upstream HBONE stream).
    connections: AtomicUsize,
    /// `/hold` requests being held now.
    held: AtomicUsize,
    /// `/flaky` and `/fail` requests.
    flaky: AtomicUsize,
    fail: AtomicUsize,
    /// Held requests in arrival order take tickets; the test lets them go in that order.
    tickets: AtomicUsize,
    released: AtomicUsize,
}

/// `/hold`: held until the test lets it go ([`Setup::release`]), then `200 released`;
/// `/flaky`: `503` the first time, then as `/hold`; `/fail`: always `503`; else `200 ok`.
/// `/upgrade`: `101`, then the connection is echoed until its end, as is a connection
/// starting `TCP\n` (an opaque tunnel).
fn backend(ip: Ipv4Addr, seen: Arc<Seen>) -> SocketAddr {
    serve_threads(ip, move |mut c| {
        seen.connections.fetch_add(1, Ordering::SeqCst);
        let mut first = [0u8; 4];
        if matches!(c.peek(&mut first), Ok(4)) && &first == b"TCP\n" {
            let mut r = c.try_clone().unwrap();
            let _ = std::io::copy(&mut r, &mut c);
            return;
        }
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            if req.path == "/upgrade" {
                let r = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
                if c.write_all(r).is_err() {
                    return;
                }
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
                return;
            }
            let hold = match req.path.as_str() {
                "/hold" => true,
                "/flaky" => seen.flaky.fetch_add(1, Ordering::SeqCst) > 0,
                "/fail" => {
                    seen.fail.fetch_add(1, Ordering::SeqCst);
                    let r = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nfail";
                    if c.write_all(r).is_err() {
                        return;
                    }
                    continue;
                }
                _ => false,
            };
            if req.path == "/flaky" && !hold {
                let r = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nflaky";
                if c.write_all(r).is_err() {
                    return;
                }
                continue;
            }
            let body = if hold {
                let ticket = seen.tickets.fetch_add(1, Ordering::SeqCst);
                seen.held.fetch_add(1, Ordering::SeqCst);
                let until = Instant::now() + common::EVENT_BOUND;
                while seen.released.load(Ordering::SeqCst) <= ticket {
                    if Instant::now() > until {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                seen.held.fetch_sub(1, Ordering::SeqCst);
                "released"
            } else {
                "ok"
            };
            let r = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if c.write_all(r.as_bytes()).is_err() {
                return;
            }
        }
    })
}

struct Setup {
    wp: EchoBinary,
    seen: Arc<Seen>,
}

/// The waypoint with `docs` (DestinationRule, HTTPRoute) beside the echo model.
fn setup(salt: u32, name: &str, docs: &str) -> Setup {
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    let wp = EchoBinary::start(
        salt,
        &format!("breaker-{name}"),
        |ip| backend(ip, s2),
        |model, settings| format!("{model}---\n{settings}---\n{docs}"),
    );
    Setup { wp, seen }
}

impl Setup {
    /// Wait until the backend holds `n` requests (`what` says which).
    async fn wait_held(&self, n: usize, what: &str) {
        wait_until(what, || self.seen.held.load(Ordering::SeqCst) == n).await;
    }

    /// Let the longest-held `/hold` request go.
    fn release(&self) {
        self.seen.released.fetch_add(1, Ordering::SeqCst);
    }

    fn stats(&self) -> String {
        prometheus_page(self.wp.stats)
    }

    /// `waypoint_circuit_breaker_in_use` of service `app/echo` for `resource`.
    fn in_use(&self, resource: &str) -> u64 {
        gauge(
            &self.stats(),
            &format!(
                "waypoint_circuit_breaker_in_use{{service=\"app/echo\",resource=\"{resource}\"}}"
            ),
        )
    }

    fn overflows(&self, limit: &str) -> u64 {
        gauge(
            &self.stats(),
            &format!("waypoint_upstream_overflows_total{{limit=\"{limit}\"}}"),
        )
    }
}

fn gauge(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in the stats:\n{page}"))
}

/// Send a GET of `path` on `s` (not waiting for the answer).
async fn send(s: &mut H2Stream, path: &str) {
    s.write_all(Bytes::from(get(path, HOST)), false)
        .await
        .unwrap();
}

/// The next response on `s`: status, the head's `x-envoy-overloaded`, body.
async fn answer(s: &mut H2Stream) -> (u16, bool, String) {
    let mut buf = Vec::new();
    let r = bounded(read_response(s, &mut buf)).await;
    let overloaded = r
        .head
        .to_ascii_lowercase()
        .contains("\r\nx-envoy-overloaded: true");
    (r.status, overloaded, r.text())
}

/// A DestinationRule (`networking.istio.io/<api>`) for service `host` with
/// `connectionPool: {<pool>}`.
fn pool_dr(api: &str, host: &str, pool: &str) -> String {
    format!("apiVersion: networking.istio.io/{api}\nkind: DestinationRule\nmetadata: {{name: echo, namespace: app}}\nspec:\n  host: {host}\n  trafficPolicy:\n    connectionPool: {{{pool}}}\n")
}

/// Istio's circuit-breaking task's DestinationRule, verbatim but for the host and
/// namespace (`maxConnections: 1`, `http1MaxPendingRequests: 1`,
/// `maxRequestsPerConnection: 1`, and its outlier detection with `interval`).
const ISTIO_TASK_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: echo
  namespace: app
spec:
  host: echo
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
";

/// One connection in use: the next request waits for it (pending), the one after that is
/// refused at once with Envoy's overflow answer (`503`, `x-envoy-overloaded: true`, flag
/// `UO`); when the first ends its slot goes to the waiting one, on a new upstream
/// connection (`maxRequestsPerConnection: 1`: none is reused).
#[test]
fn pending_request_waits_for_the_connection_and_the_next_overflows() {
    let t = setup(41, "pending", ISTIO_TASK_DR);
    block_on(async {
        let (_c1, mut s1) = t.wp.tunnel().await;
        let (_c2, mut s2) = t.wp.tunnel().await;
        let (_c3, mut s3) = t.wp.tunnel().await;
        send(&mut s1, "/hold").await;
        t.wait_held(1, "the first request at the backend").await;
        assert_eq!(t.in_use("connections"), 1);
        send(&mut s2, "/hold").await;
        wait_until("the second request pending in the waypoint", || {
            t.in_use("pending_requests") == 1
        })
        .await;
        assert_eq!(t.seen.held.load(Ordering::SeqCst), 1, "not at the backend");
        // Connections and pending requests at their limits: refused.
        send(&mut s3, "/hold").await;
        let (status, overloaded, body) = answer(&mut s3).await;
        assert_eq!(
            (status, overloaded, body.as_str()),
            (
                503,
                true,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            )
        );
        assert_eq!(t.overflows("pending_requests"), 1);
        // The first ends: the second gets its connection slot.
        t.release();
        assert_eq!(answer(&mut s1).await, (200, false, "released".into()));
        t.wait_held(1, "the second request at the backend").await;
        assert_eq!(t.in_use("pending_requests"), 0);
        assert_eq!(t.in_use("connections"), 1);
        t.release();
        assert_eq!(answer(&mut s2).await, (200, false, "released".into()));
        // A third request on the first tunnel: a new upstream connection again.
        send(&mut s1, "/ok").await;
        assert_eq!(answer(&mut s1).await, (200, false, "ok".into()));
    });
    assert_eq!(
        t.seen.connections.load(Ordering::SeqCst),
        3,
        "each request on its own upstream connection (maxRequestsPerConnection: 1)"
    );
    let page = t.stats();
    assert_eq!(t.in_use("connections"), 0);
    assert_eq!(
        common::requests_in(&page, &["response_code=\"503\"", "response_flags=\"UO\""]),
        1
    );
    assert_eq!(
        common::requests_in(&page, &["response_code=\"200\"", "response_flags=\"-\""]),
        3
    );
    // The overflow was the waypoint's own answer: not held against the endpoint (its
    // outlier detection ejects after one 5xx), which served the requests after it.
    assert_eq!(t.overflows("requests"), 0);
}

/// `http2MaxRequests: 1`: a second request while one is in flight is refused at once
/// (no waiting, whatever the connections); after the first, requests go through again.
#[test]
fn requests_in_flight_are_bounded() {
    let dr = pool_dr(
        "v1beta1",
        "echo.app.svc.cluster.local",
        "http: {http2MaxRequests: 1}",
    );
    let t = setup(42, "requests", &dr);
    block_on(async {
        let (_c1, mut s1) = t.wp.tunnel().await;
        let (_c2, mut s2) = t.wp.tunnel().await;
        send(&mut s1, "/hold").await;
        t.wait_held(1, "the first request at the backend").await;
        assert_eq!(t.in_use("requests"), 1);
        send(&mut s2, "/ok").await;
        let (status, overloaded, _) = answer(&mut s2).await;
        assert_eq!((status, overloaded), (503, true));
        assert_eq!(t.overflows("requests"), 1);
        t.release();
        assert_eq!(answer(&mut s1).await, (200, false, "released".into()));
        send(&mut s2, "/ok").await;
        assert_eq!(answer(&mut s2).await, (200, false, "ok".into()));
    });
    assert_eq!(t.in_use("requests"), 0);
    assert_eq!(t.overflows("pending_requests"), 0);
}

/// `maxRetries: 1`: while one request's retry is in flight, another request's failed try
/// is not retried (the client gets that try's own answer, no overflow flag); once the
/// first request ended, retries are made again.
#[test]
fn retries_in_flight_are_bounded() {
    let docs = pool_dr("v1", "echo", "http: {maxRetries: 1}")
        + "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: app}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo}]
  rules:
  - backendRefs: [{name: echo, port: 80}]
    retry: {codes: [503], attempts: 2, backoff: 1ms}
";
    let t = setup(43, "retries", &docs);
    block_on(async {
        let (_c1, mut s1) = t.wp.tunnel().await;
        let (_c2, mut s2) = t.wp.tunnel().await;
        // `/flaky` fails once, then its retry is held at the backend.
        send(&mut s1, "/flaky").await;
        t.wait_held(1, "the first request's retry at the backend")
            .await;
        assert_eq!(t.in_use("retries"), 1);
        send(&mut s2, "/fail").await;
        assert_eq!(answer(&mut s2).await, (503, false, "fail".into()));
        assert_eq!(t.seen.fail.load(Ordering::SeqCst), 1, "not retried");
        assert_eq!(t.overflows("retries"), 1);
        t.release();
        assert_eq!(answer(&mut s1).await, (200, false, "released".into()));
        wait_until("the retry given back", || t.in_use("retries") == 0).await;
        // Now `/fail` is retried: three tries in all (attempts: 2).
        send(&mut s2, "/fail").await;
        assert_eq!(answer(&mut s2).await, (503, false, "fail".into()));
        assert_eq!(t.seen.fail.load(Ordering::SeqCst), 4);
    });
    assert_eq!(
        common::requests_in(&t.stats(), &["response_flags=\"UO\""]),
        0
    );
}

/// The same bound for HTTP/2 inside the tunnel: two streams of one connection, the second
/// refused with the overflow answer as an HTTP/2 response.
#[test]
fn http2_streams_are_bounded_too() {
    let dr = pool_dr("v1", "echo", "http: {http2MaxRequests: 1}");
    let t = setup(44, "h2", &dr);
    block_on(async {
        let (_c, s) = t.wp.tunnel().await;
        let (mut send, _conn) = common::h2_in_tunnel(s).await;
        let req = |path: &str| {
            http::Request::get(format!("http://{HOST}{path}"))
                .body(())
                .unwrap()
        };
        let (held, _) = send.send_request(req("/hold"), true).unwrap();
        t.wait_held(1, "the first request at the backend").await;
        let (refused, _) = send.send_request(req("/ok"), true).unwrap();
        let resp = bounded(refused).await.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(
            resp.headers()
                .get("x-envoy-overloaded")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        t.release();
        assert_eq!(
            bounded(common::h2_response(held)).await,
            (200, "released".into())
        );
    });
    let page = t.stats();
    assert_eq!(
        common::requests_in(
            &page,
            &[
                "response_code=\"503\"",
                "response_flags=\"UO\"",
                "request_protocol=\"http\""
            ]
        ),
        1,
        "{page}"
    );
    assert_eq!(t.overflows("requests"), 1);
}

/// `tcp.connectTimeout`: an endpoint whose node never completes the HBONE handshake (its
/// listener takes TCP connections and never answers) is answered `503` (a connect failure,
/// flag `UF`) once the service's connect timeout passes, although the waypoint's own
/// HBONE handshake bound (`h2.handshake_timeout`) is an hour here.
#[test]
fn connect_timeout_bounds_a_new_upstream_connection() {
    let (net, black_hole) = common::bind_node_ztunnel(45);
    let dr = pool_dr("v1", "echo", "tcp: {connectTimeout: 200ms}");
    let pod = SocketAddr::from((common::ip(net, 2), 8080));
    let wp = EchoBinary::start(
        46,
        "breaker-connect",
        |ip| SocketAddr::from((ip, 8080)),
        |_, settings| {
            let model = common::echo_model(common::ip(net, 1), pod);
            format!("{model}---\n{settings}h2: {{handshake_timeout: 1h}}\n---\n{dr}")
        },
    );
    block_on(async {
        let (_c, mut s) = wp.tunnel().await;
        send(&mut s, "/ok").await;
        let (status, overloaded, body) = answer(&mut s).await;
        assert_eq!((status, overloaded), (503, false), "{body}");
        assert!(body.starts_with("upstream connect error"), "{body}");
    });
    assert_eq!(
        wp.requests(&["response_code=\"503\"", "response_flags=\"UF\""]),
        1
    );
    drop(black_hole);
}

/// `tcp.maxConnections: 1` for opaque TCP tunnels (Envoy's TCP proxy): a second tunnel
/// while one is open is reset at once (it never reaches the backend); once the first has
/// ended, a new one goes through.
#[test]
fn opaque_tcp_tunnels_are_bounded_by_max_connections() {
    let dr = pool_dr("v1", "echo", "tcp: {maxConnections: 1}");
    let t = setup(48, "tcp", &dr);
    block_on(async {
        let (_c1, mut s1) = t.wp.tunnel().await;
        s1.write_all(Bytes::from_static(b"TCP\n"), false)
            .await
            .unwrap();
        let mut buf = Vec::new();
        bounded(common::read_until(&mut s1, &mut buf, |b: &mut Vec<u8>| {
            (b.as_slice() == b"TCP\n").then_some(())
        }))
        .await;
        assert_eq!(t.in_use("connections"), 1);
        let (_c2, mut s2) = t.wp.tunnel().await;
        s2.write_all(Bytes::from_static(b"TCP\n"), false)
            .await
            .unwrap();
        let (got, ended) = common::read_to_end(&mut s2).await;
        assert_eq!((got.as_slice(), ended), (&b""[..], common::Ended::Reset));
        assert_eq!(t.overflows("connections"), 1);
        assert_eq!(t.seen.connections.load(Ordering::SeqCst), 1);
        // The first ends (both ways): its slot is given back.
        s1.write_all(Bytes::new(), true).await.unwrap();
        let (rest, ended) = common::read_to_end(&mut s1).await;
        assert_eq!((rest.as_slice(), ended), (&b""[..], common::Ended::Closed));
        wait_until("the first tunnel's connection given back", || {
            t.in_use("connections") == 0
        })
        .await;
        let (_c3, mut s3) = t.wp.tunnel().await;
        s3.write_all(Bytes::from_static(b"TCP\n"), true)
            .await
            .unwrap();
        let (back, ended) = common::read_to_end(&mut s3).await;
        assert_eq!(
            (back.as_slice(), ended),
            (&b"TCP\n"[..], common::Ended::Closed)
        );
    });
    assert_eq!(t.seen.connections.load(Ordering::SeqCst), 2);
}

/// An upgraded (`101`, websocket) connection is an upstream connection while it lives:
/// with `maxConnections: 1` the next request waits (pending) until it ends.
#[test]
fn an_upgraded_connection_keeps_its_connection_slot() {
    let dr = pool_dr(
        "v1",
        "echo",
        "tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}",
    );
    let t = setup(49, "upgrade", &dr);
    block_on(async {
        let (_c1, mut s1) = t.wp.tunnel().await;
        let upgrade = format!(
            "GET /upgrade HTTP/1.1\r\nhost: {HOST}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        s1.write_all(Bytes::from(upgrade), false).await.unwrap();
        let mut buf = Vec::new();
        let r = bounded(read_response(&mut s1, &mut buf)).await;
        assert_eq!(r.status, 101);
        s1.write_all(Bytes::from_static(b"ping"), false)
            .await
            .unwrap();
        bounded(common::read_until(&mut s1, &mut buf, |b: &mut Vec<u8>| {
            (b.as_slice() == b"ping").then_some(())
        }))
        .await;
        assert_eq!(t.in_use("connections"), 1, "the upgraded connection");
        let (_c2, mut s2) = t.wp.tunnel().await;
        send(&mut s2, "/ok").await;
        wait_until("the request pending behind the upgraded connection", || {
            t.in_use("pending_requests") == 1
        })
        .await;
        // The upgraded connection ends: the request gets its slot.
        s1.write_all(Bytes::new(), true).await.unwrap();
        let _ = common::read_to_end(&mut s1).await;
        assert_eq!(answer(&mut s2).await, (200, false, "ok".into()));
    });
    assert_eq!(t.in_use("connections"), 0);
    assert_eq!(t.overflows("pending_requests"), 0);
}

/// A mirrored request counts against its service's `http2MaxRequests`: with the mirror
/// service's one request in flight (a mirror held at the backend), the next request's
/// mirror is not sent (counted in `waypoint_mirrors_skipped`) while the request itself goes
/// through.
#[test]
fn a_mirror_past_its_services_limit_is_not_sent() {
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    let docs = pool_dr("v1", "shadow", "http: {http2MaxRequests: 1}")
        + "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: app}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo}]
  rules:
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]
    backendRefs: [{name: echo, port: 80}]
";
    let wp = EchoBinary::start(
        50,
        "breaker-mirror",
        |ip| backend(ip, s2),
        |model, settings| {
            // Service `shadow` beside `echo`, served by the same pod.
            let echo = "\"app/echo.app.svc.cluster.local\": ";
            let (head, tail) = model.split_once(echo).expect("the echo endpoint");
            let ports = &tail[..tail.find('}').expect("its ports") + 1];
            let model = format!(
                "{head}{echo}{ports}, \"app/shadow.app.svc.cluster.local\": {tail}"
            ) + "  - {name: shadow, namespace: app, hostname: shadow.app.svc.cluster.local, vips: [\"10.96.0.8\"], ports: {80: 8080}}\n";
            format!("{model}---\n{settings}---\n{docs}")
        },
    );
    let t = Setup { wp, seen };
    block_on(async {
        let (_c1, mut s1) = t.wp.tunnel().await;
        send(&mut s1, "/hold").await;
        t.wait_held(2, "the request and its mirror at the backend")
            .await;
        let (_c2, mut s2) = t.wp.tunnel().await;
        send(&mut s2, "/ok").await;
        assert_eq!(answer(&mut s2).await, (200, false, "ok".into()));
        assert_eq!(t.seen.held.load(Ordering::SeqCst), 2, "no second mirror");
        t.release();
        t.release();
        assert_eq!(answer(&mut s1).await, (200, false, "released".into()));
    });
    let page = t.stats();
    assert_eq!(t.overflows("requests"), 1);
    assert_eq!(
        common::counter_in(&page, "waypoint_mirrors_skipped_total"),
        1
    );
    assert_eq!(
        common::counter_in(&page, "waypoint_mirrored_requests_total"),
        1
    );
}

/// `portLevelSettings`: the limits of the service port the request goes to (80 here, the
/// echo service's), shown per port in the gauges.
#[test]
fn port_level_limits_apply_at_their_port() {
    let dr = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: app}
spec:
  host: echo
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      connectionPool: {http: {http2MaxRequests: 1}}
";
    let t = setup(51, "port", dr);
    block_on(async {
        let (_c1, mut s1) = t.wp.tunnel().await;
        let (_c2, mut s2) = t.wp.tunnel().await;
        send(&mut s1, "/hold").await;
        t.wait_held(1, "the first request at the backend").await;
        let in_use = gauge(
            &t.stats(),
            "waypoint_circuit_breaker_in_use{service=\"app/echo:80\",resource=\"requests\"}",
        );
        assert_eq!(in_use, 1);
        send(&mut s2, "/ok").await;
        let (status, overloaded, _) = answer(&mut s2).await;
        assert_eq!((status, overloaded), (503, true));
        t.release();
        assert_eq!(answer(&mut s1).await, (200, false, "released".into()));
    });
    assert_eq!(t.overflows("requests"), 1);
}
