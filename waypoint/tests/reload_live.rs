//! A reload reaches live tunnels: each request on a keep-alive tunnel (HTTP/1.1, or an
//! HTTP/2 stream) takes the snapshot current when it starts and keeps it to its end; a
//! live opaque TCP tunnel is authorized again at each reload. Real waypoint, file watcher,
//! stand-in ztunnel and backends on loopback; every wait is on a counter or an event.

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::SystemTime;

use bytes::Bytes;
use common::{
    block_on, bounded, connect, echo_node, get, h2_in_tunnel, id, ip, next_request, ok_response,
    read_response, serve_threads, wait_until, wp_deny, Watched, Ztunnel,
};
use hbone::ca::{CertSource, WorkloadCert};
use hbone::client::Client;
use hbone::stream::H2Stream;
use hbone::wire::ConnectRequest;
use waypoint::service::Counters;

/// A keep-alive HTTP/1.1 backend answering `<name> <path> xff=<x-forwarded-for>`. The first
/// `/hold` it gets is announced on `arrived` and answered `503` once `release` says so;
/// later ones are answered at once. A request asking to upgrade gets `101`, then every byte
/// is sent back until the connection ends (then `closed <path>` is seen).
struct Backend {
    addr: SocketAddr,
    seen: mpsc::Receiver<String>,
}

impl Backend {
    fn seen(&self) -> Vec<String> {
        self.seen.try_iter().collect()
    }
}

struct Hold {
    arrived: mpsc::Sender<()>,
    /// Both the backend and the test wait on it: the test's wait releases the backend.
    release: Barrier,
    hits: AtomicU32,
}

fn backend(ip: Ipv4Addr, name: &'static str, hold: Option<Arc<Hold>>) -> Backend {
    let (tx, seen) = mpsc::channel();
    let addr = serve_threads(ip, move |mut c| {
        let tx = tx.clone();
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let _ = tx.send(req.path.clone());
            if let Some(proto) = req.header("upgrade") {
                let head = format!("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {proto}\r\n\r\n");
                if c.write_all(head.as_bytes()).is_ok() && c.write_all(&buf).is_ok() {
                    let mut r = c.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut c);
                }
                let _ = tx.send(format!("closed {}", req.path));
                return;
            }
            let xff = req.header("x-forwarded-for").unwrap_or_default();
            let body = format!("{name} {} xff={xff}", req.path);
            let resp = match (&hold, req.path.as_str()) {
                (Some(h), "/hold") if h.hits.fetch_add(1, Ordering::SeqCst) == 0 => {
                    let _ = h.arrived.send(());
                    h.release.wait();
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nheld".to_string()
                }
                _ => ok_response(&body),
            };
            if c.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    });
    Backend { addr, seen }
}

/// A TCP backend sending back every byte it reads; each connection's end is announced on
/// the receiver.
fn tcp_echo(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<()>) {
    let (tx, closed) = mpsc::channel();
    let addr = serve_threads(ip, move |mut c| {
        let mut r = c.try_clone().unwrap();
        let _ = std::io::copy(&mut r, &mut c);
        let _ = tx.send(());
    });
    (addr, closed)
}

/// Denies `/blocked` and `/hold`.
fn deny() -> String {
    wp_deny(
        "deny",
        "  - to: [{operation: {paths: [\"/blocked\", \"/hold\"]}}]\n",
    )
}

/// Denies every connection of the test client (an L4 rule: it applies to opaque TCP).
fn deny_client() -> String {
    wp_deny(
        "deny-client",
        "  - from: [{source: {principals: [\"cluster.local/ns/app/sa/client\"]}}]\n",
    )
}

/// Denies `/ws` (an HTTP rule: only an HTTP request's path can match it).
fn deny_ws() -> String {
    wp_deny("deny-ws", "  - to: [{operation: {paths: [\"/ws\"]}}]\n")
}

/// HTTPRoute on Service `echo`: everything to `backend`.
fn route_to(backend: &str) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo, namespace: app}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo}}]
  rules:
  - backendRefs: [{{name: {backend}, port: 80}}]
"#
    )
}

const ECHO: &str = "echo.app.svc.cluster.local";
const V1: &str = "echo-v1.app.svc.cluster.local";

/// What the model holds, for the reloads to change.
#[derive(Clone, Copy)]
struct Model {
    /// Service `echo-v1` (`10.96.0.2`) exists.
    v1_service: bool,
    /// The client workload `10.1.0.7` (so a tunnel's `forwarded: for=` naming it is believed).
    client: bool,
    /// Service `raw` (`10.96.0.4`, an opaque TCP echo) exists.
    raw_service: bool,
}

const FULL: Model = Model {
    v1_service: true,
    client: true,
    raw_service: true,
};

struct Mesh {
    waypoint: SocketAddr,
    client_cert: WorkloadCert,
    _zt: Ztunnel,
    echo_v1: Backend,
    echo_v2: Backend,
    hold: Arc<Hold>,
    arrived: mpsc::Receiver<()>,
    /// One message per connection of the opaque TCP echo (Service `raw`) that ended.
    raw_closed: mpsc::Receiver<()>,
    zt_ip: Ipv4Addr,
    addrs: [SocketAddr; 4],
    /// The waypoint, on the configuration file the watcher reloads.
    live: Watched,
}

/// The whole configuration file for the node ztunnel at `zt` and the endpoints `addrs`
/// (echo, echo-v1, echo-v2, raw): the model, then `route` and `policies` (documents).
fn config(
    zt: Ipv4Addr,
    addrs: [SocketAddr; 4],
    model: Model,
    route: &str,
    policies: &str,
) -> String {
    let [e, v1, v2, raw] = addrs;
    let client = if model.client {
        "  - {uid: client-7, name: client-7, namespace: app, serviceAccount: client, workloadIps: [\"10.1.0.7\"]}\n"
    } else {
        ""
    };
    let v1_service = if model.v1_service {
        "  - {name: echo-v1, namespace: app, hostname: echo-v1.app.svc.cluster.local, vips: [\"10.96.0.2\"], ports: {80: 8080}}\n"
    } else {
        ""
    };
    let raw_service = if model.raw_service {
        "  - {name: raw, namespace: app, hostname: raw.app.svc.cluster.local, vips: [\"10.96.0.4\"], ports: {80: 8080}}\n"
    } else {
        ""
    };
    let svc = |uid: &str, a: SocketAddr, s: &str| {
        format!("  - {{uid: {uid}, name: {uid}, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/{s}.app.svc.cluster.local\": {{80: {}}}}}}}\n", a.ip(), a.port())
    };
    // Without its service, a pod stays (serving no service).
    let pod = |uid: &str, a: SocketAddr, s: &str, served: bool| {
        if served {
            svc(uid, a, s)
        } else {
            format!("  - {{uid: {uid}, name: {uid}, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"]}}\n", a.ip())
        }
    };
    let model = format!(
        "namespaces:\n  - name: app\n    labels: {{istio.io/dataplane-mode: ambient}}\nwaypoints:\n  - {{name: wp, namespace: app, address: 10.1.0.100}}\nnodes:\n  - {{name: node-b, ztunnel: {zt}}}\nworkloads:\n  - {{uid: wp, name: wp, namespace: app, serviceAccount: waypoint, workloadIps: [\"10.1.0.100\"]}}\n{client}{}{}{}{}services:\n  - {{name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {{80: 8080}}}}\n{v1_service}  - {{name: echo-v2, namespace: app, hostname: echo-v2.app.svc.cluster.local, vips: [\"10.96.0.3\"], ports: {{80: 8080}}}}\n{raw_service}",
        svc("echo-1", e, "echo"),
        pod("v1-1", v1, "echo-v1", model.v1_service),
        svc("v2-1", v2, "echo-v2"),
        pod("raw-1", raw, "raw", model.raw_service),
    );
    let mut text = format!("{model}---\n{route}");
    if !policies.is_empty() {
        text.push_str(&format!("---\n{policies}"));
    }
    text
}

impl Mesh {
    fn start(salt: u32) -> Mesh {
        let (net, ca, zt) = echo_node(salt);
        let client_cert = ca.issue(&id("app", "client"), SystemTime::now()).unwrap();
        let (arrived_tx, arrived) = mpsc::channel();
        let hold = Arc::new(Hold {
            arrived: arrived_tx,
            release: Barrier::new(2),
            hits: AtomicU32::new(0),
        });
        let echo = backend(ip(net, 2), "echo", None);
        let echo_v1 = backend(ip(net, 3), "echo-v1", Some(hold.clone()));
        let echo_v2 = backend(ip(net, 4), "echo-v2", None);
        let (raw, raw_closed) = tcp_echo(ip(net, 5));
        let addrs = [echo.addr, echo_v1.addr, echo_v2.addr, raw];
        let text = config(ip(net, 1), addrs, FULL, &route_to("echo-v1"), "");
        let dir = format!("waypoint-reload-live-{}-{net}", std::process::id());
        let live = Watched::start(&ca, &dir, "wp.yaml", text);
        Mesh {
            waypoint: live.handle().addr,
            client_cert,
            _zt: zt,
            echo_v1,
            echo_v2,
            hold,
            arrived,
            raw_closed,
            zt_ip: ip(net, 1),
            addrs,
            live,
        }
    }

    fn counters(&self) -> &Counters {
        &self.live.handle().counters
    }

    /// The whole configuration file: the model, then `route` and `policies` (documents).
    fn config(&self, model: Model, route: &str, policies: &str) -> String {
        config(self.zt_ip, self.addrs, model, route, policies)
    }

    /// Write a new configuration and wait (generously) until the waypoint published it as
    /// its `n`th reload.
    async fn reload(&self, text: &str, n: u64) {
        std::fs::write(&self.live.file, text).unwrap();
        let c = self.counters();
        wait_until(&format!("reload #{n}"), || {
            c.config_reloads.load(Ordering::Relaxed) >= n
                || c.config_reload_errors.load(Ordering::Relaxed) > 0
        })
        .await;
        assert_eq!(c.config_reload_errors.load(Ordering::Relaxed), 0, "{text}");
    }

    /// A tunnel to `target` for client `10.1.0.7` (the CONNECT's `forwarded: for=`).
    async fn tunnel(&self, target: &str) -> (Client, H2Stream) {
        let c = connect(self.waypoint, &self.client_cert, id("app", "waypoint"))
            .await
            .unwrap();
        let mut req = ConnectRequest::new(target.parse().unwrap());
        req.forwarded_for = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 7)));
        let s = c.open(&req).await.unwrap();
        (c, s)
    }

    /// An HTTP/2 (prior knowledge) connection inside a tunnel to `target`.
    async fn h2_tunnel(&self, target: &str) -> (Client, h2::client::SendRequest<Bytes>) {
        let (c, s) = self.tunnel(target).await;
        let (send, _) = h2_in_tunnel(s).await;
        (c, send)
    }
}

/// One HTTP/1.1 exchange on a tunnel.
async fn ask(s: &mut H2Stream, buf: &mut Vec<u8>, path: &str, host: &str) -> (u16, String) {
    s.write_all(Bytes::from(get(path, host)), false)
        .await
        .unwrap();
    let r = read_response(s, buf).await;
    (r.status, r.text())
}

const ME: &str = "xff=10.1.0.7";

#[test]
fn r15_a_deny_reload_applies_to_the_next_request_of_live_http1_and_http2_tunnels() {
    let m = Mesh::start(31);
    block_on(async {
        let (_c1, mut t1) = m.tunnel("10.96.0.1:80").await;
        let mut buf = Vec::new();
        let (_c2, h2) = m.h2_tunnel("10.96.0.1:80").await;
        assert_eq!(
            ask(&mut t1, &mut buf, "/blocked", ECHO).await,
            (200, format!("echo-v1 /blocked {ME}"))
        );
        let r = common::h2_get_from(&h2, ECHO, "/blocked").await;
        assert_eq!(r, (200, format!("echo-v1 /blocked {ME}")));
        m.reload(&m.config(FULL, &route_to("echo-v1"), &deny()), 1)
            .await;
        // The same tunnels: the next request is denied, others still pass.
        assert_eq!(
            ask(&mut t1, &mut buf, "/blocked", ECHO).await,
            (403, "RBAC: access denied".into())
        );
        assert_eq!(
            common::h2_get_from(&h2, ECHO, "/blocked").await,
            (403, "RBAC: access denied".into())
        );
        assert_eq!(
            ask(&mut t1, &mut buf, "/ok", ECHO).await,
            (200, format!("echo-v1 /ok {ME}"))
        );
        assert_eq!(
            common::h2_get_from(&h2, ECHO, "/ok").await,
            (200, format!("echo-v1 /ok {ME}"))
        );
    });
    let c = m.counters();
    assert_eq!(c.denied.load(Ordering::Relaxed), 2);
    // Each tunnel derived its facts again once for the new version.
    assert_eq!(c.tunnel_refreshes.load(Ordering::Relaxed), 2);
    assert_eq!(m.echo_v1.seen(), vec!["/blocked", "/blocked", "/ok", "/ok"]);
}

#[test]
fn a_request_in_flight_during_a_reload_completes_under_its_snapshot_and_the_next_takes_the_new_route(
) {
    let m = Mesh::start(37);
    block_on(async {
        let (_c, mut t) = m.tunnel("10.96.0.1:80").await;
        let mut buf = Vec::new();
        // `/hold` goes to echo-v1, which holds it.
        t.write_all(Bytes::from(get("/hold", ECHO)), false)
            .await
            .unwrap();
        wait_until("the held request at echo-v1", || {
            m.arrived.try_recv().is_ok()
        })
        .await;
        // Meanwhile: echo routes to echo-v2, and /hold is denied.
        m.reload(&m.config(FULL, &route_to("echo-v2"), &deny()), 1)
            .await;
        // echo-v1 answers 503: the retry (Istio's default policy) still goes by the old
        // route, to echo-v1, and is allowed.
        m.hold.release.wait();
        let r = read_response(&mut t, &mut buf).await;
        assert_eq!((r.status, r.text()), (200, format!("echo-v1 /hold {ME}")));
        assert_eq!(m.echo_v1.seen(), vec!["/hold", "/hold"]);
        // The next request on the same tunnel: the new route and the new policy.
        assert_eq!(
            ask(&mut t, &mut buf, "/next", ECHO).await,
            (200, format!("echo-v2 /next {ME}"))
        );
        assert_eq!(
            ask(&mut t, &mut buf, "/hold", ECHO).await,
            (403, "RBAC: access denied".into())
        );
    });
    assert_eq!(m.hold.hits.load(Ordering::SeqCst), 2);
    assert_eq!(m.echo_v2.seen(), vec!["/next"]);
    assert!(m.echo_v1.seen().is_empty());
    assert_eq!(m.counters().retries.load(Ordering::Relaxed), 1);
}

#[test]
fn an_httproute_change_applies_to_the_next_http2_stream_of_a_live_tunnel() {
    let m = Mesh::start(41);
    block_on(async {
        let (_c, h2) = m.h2_tunnel("10.96.0.1:80").await;
        assert_eq!(
            common::h2_get_from(&h2, ECHO, "/a").await,
            (200, format!("echo-v1 /a {ME}"))
        );
        m.reload(&m.config(FULL, &route_to("echo-v2"), ""), 1).await;
        assert_eq!(
            common::h2_get_from(&h2, ECHO, "/b").await,
            (200, format!("echo-v2 /b {ME}"))
        );
        // And back: every version change is seen.
        m.reload(&m.config(FULL, &route_to("echo-v1"), ""), 2).await;
        assert_eq!(
            common::h2_get_from(&h2, ECHO, "/c").await,
            (200, format!("echo-v1 /c {ME}"))
        );
    });
    assert_eq!(m.echo_v1.seen(), vec!["/a", "/c"]);
    assert_eq!(m.echo_v2.seen(), vec!["/b"]);
}

#[test]
fn a_reload_changing_who_the_client_is_changes_the_next_requests_x_forwarded_for() {
    let m = Mesh::start(43);
    block_on(async {
        let (_c1, mut t) = m.tunnel("10.96.0.2:80").await;
        let mut buf = Vec::new();
        let (_c2, h2) = m.h2_tunnel("10.96.0.2:80").await;
        assert_eq!(
            ask(&mut t, &mut buf, "/a", V1).await,
            (200, format!("echo-v1 /a {ME}"))
        );
        assert_eq!(
            common::h2_get_from(&h2, V1, "/a").await,
            (200, format!("echo-v1 /a {ME}"))
        );
        // The model no longer has the client at 10.1.0.7: its `forwarded: for=` is not
        // believed any more, the peer's own address is the client's.
        let model = Model {
            client: false,
            ..FULL
        };
        m.reload(&m.config(model, &route_to("echo-v1"), ""), 1)
            .await;
        assert_eq!(
            ask(&mut t, &mut buf, "/b", V1).await,
            (200, "echo-v1 /b xff=127.0.0.1".into())
        );
        assert_eq!(
            common::h2_get_from(&h2, V1, "/b").await,
            (200, "echo-v1 /b xff=127.0.0.1".into())
        );
    });
}

#[test]
fn r14_a_reload_removing_the_tunnels_target_refuses_its_next_request() {
    let m = Mesh::start(47);
    block_on(async {
        let (_c1, mut t) = m.tunnel("10.96.0.2:80").await;
        let mut buf = Vec::new();
        assert_eq!(ask(&mut t, &mut buf, "/a", V1).await.0, 200);
        let model = Model {
            v1_service: false,
            ..FULL
        };
        m.reload(&m.config(model, &route_to("echo-v2"), ""), 1)
            .await;
        // HTTP/1.1: 503, and the tunnel ends.
        let not_served = waypoint::http1::NOT_SERVED_BODY.to_string();
        assert_eq!(ask(&mut t, &mut buf, "/b", V1).await, (503, not_served));
        assert!(buf.is_empty());
        match t.read().await {
            None => {}
            Some(Ok(b)) => panic!("bytes after the refusal: {b:?}"),
            Some(Err(e)) => panic!("tunnel reset instead of ended: {e}"),
        }
        // (A live HTTP/2 tunnel is sent GOAWAY at the reload: see the next tests.)
        // A new tunnel to it is refused at its CONNECT.
        let c = connect(m.waypoint, &m.client_cert, id("app", "waypoint"))
            .await
            .unwrap();
        let r = c
            .open(&ConnectRequest::new("10.96.0.2:80".parse().unwrap()))
            .await;
        assert!(
            matches!(r, Err(hbone::HboneError::Status(s)) if s.as_u16() == 400),
            "{:?}",
            r.err()
        );
    });
    let c = m.counters();
    assert_eq!(c.stale_target_requests.load(Ordering::Relaxed), 1);
    assert_eq!(c.refused_targets.load(Ordering::Relaxed), 1);
    assert_eq!(m.echo_v1.seen(), vec!["/a"]);
}

/// R14 over HTTP/2: once a reload no longer serves the tunnel's target, the connection is
/// sent a graceful GOAWAY at once (as Envoy drains a connection whose listener or route
/// went away): a stream in flight still completes, then the connection ends in order, so
/// the client reconnects instead of getting `503` for ever.
#[test]
fn r14_a_reload_removing_the_tunnels_target_sends_goaway_and_streams_in_flight_finish() {
    let m = Mesh::start(59);
    block_on(async {
        let (_c, s) = m.tunnel("10.96.0.2:80").await;
        let (h2, conn) = h2_in_tunnel(s).await;
        // `/hold` to echo-v1, held by it meanwhile.
        let req = http::Request::builder()
            .uri(format!("http://{V1}/hold"))
            .body(())
            .unwrap();
        let (held, _) = h2.clone().send_request(req, true).unwrap();
        wait_until("the held request at echo-v1", || {
            m.arrived.try_recv().is_ok()
        })
        .await;
        let model = Model {
            v1_service: false,
            ..FULL
        };
        m.reload(&m.config(model, &route_to("echo-v2"), ""), 1)
            .await;
        // The GOAWAY reaches the client with no further request: it opens no new stream
        // on this connection.
        goaway(&h2).await;
        // The stream in flight completes under its snapshot (echo-v1's `503`, retried).
        m.hold.release.wait();
        let r = common::h2_response(held).await;
        assert_eq!(r, (200, format!("echo-v1 /hold {ME}")));
        // Then the connection ends in order.
        let end = bounded(conn).await;
        assert!(end.is_ok(), "{end:?}");
    });
    let c = m.counters();
    assert_eq!(c.stale_target_requests.load(Ordering::Relaxed), 0);
    assert_eq!(c.h2_revoked.load(Ordering::Relaxed), 1);
    assert_eq!(m.echo_v1.seen(), vec!["/hold", "/hold"]);
}

/// Wait (bounded) until the HTTP/2 connection of `h2` got a GOAWAY from the waypoint.
async fn goaway(h2: &h2::client::SendRequest<Bytes>) {
    bounded(async {
        loop {
            match h2.clone().ready().await {
                Err(e) if e.is_go_away() && e.is_remote() => break,
                Err(e) => panic!("not a GOAWAY: {e}"),
                Ok(_) => monoio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    })
    .await;
}

/// R14 over HTTP/2, idle: a reload removing an HTTP/2 tunnel's target sends it a graceful
/// GOAWAY though it sends no request (it was never told before its next request or its
/// idle timeout), and its connection ends in order; a tunnel on the same HBONE connection
/// (so the same worker, which sees the reload for both at once) whose target the reload
/// keeps is not told and keeps serving.
#[test]
fn r14_an_idle_http2_tunnel_gets_goaway_when_a_reload_removes_its_target_and_a_kept_one_does_not() {
    let m = Mesh::start(73);
    block_on(async {
        let (c, s) = m.tunnel("10.96.0.2:80").await;
        let (gone, gone_conn) = h2_in_tunnel(s).await;
        let mut req = ConnectRequest::new("10.96.0.1:80".parse().unwrap());
        req.forwarded_for = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 7)));
        let (kept, _kept_conn) = h2_in_tunnel(c.open(&req).await.unwrap()).await;
        let counters = m.counters();
        wait_until("both HTTP/2 tunnels served", || {
            counters.http2_tunnels.load(Ordering::Relaxed) >= 2
        })
        .await;
        assert_eq!(
            common::h2_get_from(&kept, ECHO, "/a").await,
            (200, format!("echo-v1 /a {ME}"))
        );
        let model = Model {
            v1_service: false,
            ..FULL
        };
        m.reload(&m.config(model, &route_to("echo-v2"), ""), 1)
            .await;
        goaway(&gone).await;
        // No stream in flight: the connection then ends in order.
        let end = bounded(gone_conn).await;
        assert!(end.is_ok(), "{end:?}");
        // The kept tunnel's watch saw the same reload (same worker, same wake-up) before
        // that GOAWAY reached the client: it still takes new streams, under the new route.
        assert_eq!(
            common::h2_get_from(&kept, ECHO, "/b").await,
            (200, format!("echo-v2 /b {ME}"))
        );
        assert!(kept.clone().ready().await.is_ok());
    });
    let c = m.counters();
    assert_eq!(c.h2_revoked.load(Ordering::Relaxed), 1);
    assert_eq!(c.stale_target_requests.load(Ordering::Relaxed), 0);
    assert_eq!(c.http2_tunnels.load(Ordering::Relaxed), 2);
    assert_eq!(m.echo_v1.seen(), vec!["/a"]);
    assert_eq!(m.echo_v2.seen(), vec!["/b"]);
}

/// Ask for a websocket to `path` on `host` on the tunnel `t`, and read the waypoint's
/// `101` (the connection is upgraded from then on).
async fn upgrade(t: &mut H2Stream, path: &str, host: &str) {
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    );
    t.write_all(Bytes::from(req), false).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match bounded(t.read()).await {
            Some(Ok(b)) => head.extend_from_slice(&b),
            other => panic!("no upgrade: {other:?}"),
        }
    }
    let text = String::from_utf8_lossy(&head);
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
}

/// A websocket (`/ws` on `host`) in a tunnel to `target` (served by echo-v1), upgraded;
/// the reload to `kept` checks it again and leaves it; the reload to `revoking` resets it
/// (not ended in order, no bytes after), counted, and its upstream connection is closed.
async fn upgraded_kept_then_revoked(
    m: &Mesh,
    target: &str,
    host: &str,
    kept: &str,
    revoking: &str,
) {
    let (_c, mut t) = m.tunnel(target).await;
    upgrade(&mut t, "/ws", host).await;
    echo(&mut t, b"frame-1").await;
    let c = m.counters();
    assert_eq!(c.upgrades.load(Ordering::Relaxed), 1);
    m.reload(kept, 1).await;
    wait_until("the connection checked again", || {
        c.tunnel_refreshes.load(Ordering::Relaxed) >= 1
    })
    .await;
    echo(&mut t, b"frame-2").await;
    assert_eq!(c.upgrades_revoked.load(Ordering::Relaxed), 0);
    m.reload(revoking, 2).await;
    wait_until("the upgraded connection revoked", || {
        c.upgrades_revoked.load(Ordering::Relaxed) >= 1
    })
    .await;
    match bounded(t.read()).await {
        Some(Ok(b)) => panic!("bytes after the revocation: {b:?}"),
        Some(Err(_)) => {}
        None => panic!("ended in order instead of reset"),
    }
    wait_until("the upstream connection closed", || {
        m.echo_v1.seen.try_iter().any(|p| p == "closed /ws")
    })
    .await;
}

/// Send `data` on an opaque tunnel and read its echo.
async fn echo(s: &mut H2Stream, data: &[u8]) {
    s.write_all(Bytes::copy_from_slice(data), false)
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        match s.read().await {
            Some(Ok(b)) => got.extend_from_slice(&b),
            other => panic!("echo cut: {other:?}"),
        }
    }
    assert_eq!(got, data);
}

/// Live connections reset by reloads: (opaque TCP tunnels, upgraded connections).
fn revocations(c: &Counters) -> (u64, u64) {
    (
        c.tcp_revoked.load(Ordering::Relaxed),
        c.upgrades_revoked.load(Ordering::Relaxed),
    )
}

/// An opaque TCP tunnel (not HTTP: spliced) to Service `raw`, echoed; the reload to `kept`
/// checks it again and leaves it; the reload to `revoking` resets it (not ended in order,
/// no bytes after), counted once, and its upstream connection is closed.
async fn opaque_kept_then_revoked(m: &Mesh, kept: &str, revoking: &str) {
    let (_c, mut t) = m.tunnel("10.96.0.4:80").await;
    echo(&mut t, b"\x00\x01opaque").await;
    let c = m.counters();
    assert_eq!(c.tcp_tunnels.load(Ordering::Relaxed), 1);
    m.reload(kept, 1).await;
    wait_until("the tunnel checked again", || {
        c.tunnel_refreshes.load(Ordering::Relaxed) >= 1
    })
    .await;
    echo(&mut t, b"\x00\x02still").await;
    assert_eq!(c.tcp_revoked.load(Ordering::Relaxed), 0);
    assert!(
        m.raw_closed.try_recv().is_err(),
        "the upstream closed early"
    );
    m.reload(revoking, 2).await;
    wait_until("the tunnel revoked", || {
        c.tcp_revoked.load(Ordering::Relaxed) >= 1
    })
    .await;
    match bounded(t.read()).await {
        Some(Ok(b)) => panic!("bytes after the revocation: {b:?}"),
        Some(Err(_)) => {}
        None => panic!("ended in order instead of reset"),
    }
    wait_until("the upstream connection closed", || {
        m.raw_closed.try_recv().is_ok()
    })
    .await;
}

#[test]
fn r15_a_live_opaque_tcp_tunnel_is_authorized_again_at_each_reload() {
    let m = Mesh::start(53);
    // Another route for Service echo: checked again, still allowed; a DENY of the client
    // (an L4 rule): reset.
    let kept = m.config(FULL, &route_to("echo-v2"), "");
    let revoking = m.config(FULL, &route_to("echo-v2"), &deny_client());
    block_on(opaque_kept_then_revoked(&m, &kept, &revoking));
    let c = m.counters();
    assert_eq!(revocations(c), (1, 0), "(opaque TCP, upgraded) revoked");
}

/// R14 for a live opaque TCP tunnel (to Service `raw`): a reload that still serves its
/// target (another Service, `echo-v1`, removed) leaves it; one after which this waypoint
/// no longer serves it (Service `raw` gone from the model, its pod kept) resets it, counts
/// it (`waypoint_tcp_revoked_total`, once) and closes the upstream connection, though no
/// policy denies it.
#[test]
fn r14_a_live_opaque_tcp_tunnel_whose_target_a_reload_removes_is_reset() {
    let m = Mesh::start(71);
    let other_removed = Model {
        v1_service: false,
        ..FULL
    };
    let kept = m.config(other_removed, &route_to("echo-v2"), "");
    let raw_removed = Model {
        raw_service: false,
        ..other_removed
    };
    let revoking = m.config(raw_removed, &route_to("echo-v2"), "");
    block_on(opaque_kept_then_revoked(&m, &kept, &revoking));
    let c = m.counters();
    assert_eq!(revocations(c), (1, 0), "(opaque TCP, upgraded) revoked");
    assert_eq!(c.denied.load(Ordering::Relaxed), 0);
    assert_eq!(c.tcp_denied.load(Ordering::Relaxed), 0);
    assert_eq!(c.tcp_tunnels.load(Ordering::Relaxed), 1);
}

/// R15 for a connection upgraded after a `101` (a websocket): authorized again at each
/// reload by its upgrade request (its HTTP fields: path, headers), as opaque TCP is by its
/// L4 fields. A reload whose DENY matches other paths leaves it; one denying its path
/// resets it (`waypoint_upgrades_revoked_total`) and closes the upstream connection.
#[test]
fn r15_a_live_upgraded_connection_is_authorized_again_at_each_reload() {
    let m = Mesh::start(61);
    // A DENY of other paths: checked again, still allowed; a DENY of its path: reset.
    let kept = m.config(FULL, &route_to("echo-v1"), &deny());
    let revoking = m.config(FULL, &route_to("echo-v1"), &deny_ws());
    block_on(upgraded_kept_then_revoked(
        &m,
        "10.96.0.1:80",
        ECHO,
        &kept,
        &revoking,
    ));
    let c = m.counters();
    assert_eq!(revocations(c), (0, 1), "(opaque TCP, upgraded) revoked");
}

/// R14 for a connection upgraded after a `101` (a websocket to Service `echo-v1`): a
/// reload that still serves its target leaves it; one after which this waypoint no longer
/// serves it (the Service gone from the model, its pod kept) resets it, counts it
/// (`waypoint_upgrades_revoked_total`) and closes the upstream connection, as for an
/// opaque TCP tunnel, though no policy denies it.
#[test]
fn r14_a_live_upgraded_connection_whose_target_a_reload_removes_is_reset() {
    let m = Mesh::start(67);
    // Another route for Service echo: the target is still served, the connection stays.
    let kept = m.config(FULL, &route_to("echo-v2"), "");
    // Service echo-v1 removed: the live connection's target is no longer served.
    let model = Model {
        v1_service: false,
        ..FULL
    };
    let revoking = m.config(model, &route_to("echo-v2"), "");
    block_on(upgraded_kept_then_revoked(
        &m,
        "10.96.0.2:80",
        V1,
        &kept,
        &revoking,
    ));
    let c = m.counters();
    assert_eq!(revocations(c), (0, 1), "(opaque TCP, upgraded) revoked");
    assert_eq!(c.denied.load(Ordering::Relaxed), 0);
}
