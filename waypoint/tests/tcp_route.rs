//! Gateway API `TCPRoute` on Services (GAMMA), as Istio's ambient "TCP traffic shifting"
//! task uses it: connections to the parent's port are opaque TCP — no protocol detection,
//! so a server-first protocol is served at once — split over the weighted backends.
//!
//! The backends are server-first: each greets with its name before it reads, then echoes
//! every byte until the client's half-close. Without the route's port claimed, the
//! waypoint would wait for the client's first byte and the greeting would never come.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::SystemTime;

use bytes::Bytes;
use common::{
    app_model, bind_node_ztunnel, block_on, bounded, fnv, id, ip, open_tunnel, payload,
    read_to_end, serve_threads, stand_in_ztunnel, test_ca, Ended, Waypoint,
};
use hbone::ca::CertSource;
use hbone::stream::H2Stream;

/// A server-first backend: `<name>\n`, then every byte back until the client's half-close.
fn greeter(ip: Ipv4Addr, name: &'static str) -> SocketAddr {
    serve_threads(ip, move |mut c| {
        if c.write_all(format!("{name}\n").as_bytes()).is_err() {
            return;
        }
        common::echo_to_end(c);
    })
}

/// Istio's `tcp-echo` task: 80 % to v1, 20 % to v2. `tcp-broken` routes to a service the
/// model does not have.
const ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-echo
  namespace: app
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: tcp-echo
    port: 9000
  rules:
  - backendRefs:
    - name: tcp-echo-v1
      port: 9000
      weight: 80
    - name: tcp-echo-v2
      port: 9000
      weight: 20
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: broken, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: tcp-broken}]
  rules: [{backendRefs: [{name: nowhere, port: 9000}]}]
"#;

struct Mesh {
    wp: Waypoint,
    /// What the gRPC authorizer was asked: `principal=<source> dst=<ip:port> http=<bool>`.
    checks: std::sync::mpsc::Receiver<String>,
}

/// An Envoy ext_authz gRPC authorizer for connections: allows those to port 9000, denies
/// the rest; reports each check.
fn tcp_authorizer(ip: Ipv4Addr) -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = common::serve_h2(ip, move |req, respond| {
        let tx = tx.clone();
        async move {
            use prost::Message;
            use waypoint::ext_authz::pb;
            let data = common::h2_body(req.into_body()).await;
            let a = pb::CheckRequest::decode(&data[5..])
                .unwrap()
                .attributes
                .unwrap();
            let dst = a
                .destination
                .unwrap()
                .address
                .unwrap()
                .socket_address
                .unwrap();
            let _ = tx.send(format!(
                "principal={} dst={}:{} http={}",
                a.source.unwrap().principal,
                dst.address,
                dst.port_value,
                a.request.is_some()
            ));
            let code = if dst.port_value == 9000 { 0 } else { 7 };
            let answer = pb::CheckResponse {
                status: Some(pb::RpcStatus {
                    code,
                    message: String::new(),
                }),
                http_response: None,
            };
            common::grpc_reply(respond, &answer.encode_to_vec());
        }
    });
    (addr, rx)
}

impl Mesh {
    fn start() -> Mesh {
        Mesh::start_with("")
    }

    /// The mesh with `docs` (more documents, `---`-led) in the waypoint's file.
    fn start_with(docs: &str) -> Mesh {
        let (net, zl) = bind_node_ztunnel(31);
        let ca = test_ca();
        let _zt = stand_in_ztunnel(
            zl,
            &ca.issue(&id("app", "echo"), SystemTime::now()).unwrap(),
        );
        let v1 = greeter(ip(net, 2), "v1");
        let v2 = greeter(ip(net, 3), "v2");
        let (authz, checks) = tcp_authorizer(ip(net, 4));
        let workloads = format!(
            "  - {{uid: v1, name: tcp-echo-v1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/tcp-echo.app.svc.cluster.local\": {{9000: {p1}, 9001: {p1}}}, \"app/tcp-echo-v1.app.svc.cluster.local\": {{9000: {p1}}}, \"app/tcp-broken.app.svc.cluster.local\": {{9000: {p1}}}}}}}\n  - {{uid: v2, name: tcp-echo-v2, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/tcp-echo.app.svc.cluster.local\": {{9000: {p2}, 9001: {p2}}}, \"app/tcp-echo-v2.app.svc.cluster.local\": {{9000: {p2}}}}}}}\n",
            v1.ip(),
            v2.ip(),
            p1 = v1.port(),
            p2 = v2.port(),
        ) + &format!(
            "  - {{uid: g1, name: g1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/ext-authz-grpc.app.svc.cluster.local\": {{9000: {}}}}}}}\n",
            authz.ip(),
            authz.port()
        );
        let services = "  - {name: tcp-echo, namespace: app, hostname: tcp-echo.app.svc.cluster.local, vips: [\"10.96.0.20\"], ports: {9000: 9000, 9001: 9001}}
  - {name: tcp-echo-v1, namespace: app, hostname: tcp-echo-v1.app.svc.cluster.local, vips: [\"10.96.0.21\"], ports: {9000: 9000}}
  - {name: tcp-echo-v2, namespace: app, hostname: tcp-echo-v2.app.svc.cluster.local, vips: [\"10.96.0.22\"], ports: {9000: 9000}}
  - {name: tcp-broken, namespace: app, hostname: tcp-broken.app.svc.cluster.local, vips: [\"10.96.0.23\"], ports: {9000: 9000}}
  - {name: ext-authz-grpc, namespace: app, hostname: ext-authz-grpc.app.svc.cluster.local, vips: [\"10.96.0.24\"], ports: {9000: 9000}}
";
        let text = format!(
            "{}---\n{ROUTES}{docs}",
            app_model(ip(net, 1), &workloads, services)
        );
        let wp = Waypoint::with_stats(&ca, &text, &format!("waypoint-tcp-route-{net}.yaml"));
        Mesh { wp, checks }
    }

    async fn tunnel(&self, target: &str) -> (hbone::client::Client, H2Stream) {
        open_tunnel(self.wp.addr, &self.wp.client_cert, target).await
    }
}

/// Read the backend's greeting line (the client has sent nothing yet).
async fn greeting(s: &mut H2Stream) -> String {
    let mut buf = Vec::new();
    while !buf.contains(&b'\n') {
        match bounded(s.read()).await {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            other => panic!("no greeting: {other:?} after {buf:?}"),
        }
    }
    String::from_utf8(buf).unwrap()
}

#[test]
fn tcp_route_splits_connections_by_weight_and_serves_server_first_protocols() {
    let m = Mesh::start();
    let n = 1000;
    let v2 = block_on(async {
        let mut v2 = 0;
        for _ in 0..n {
            let (_c, mut s) = m.tunnel("10.96.0.20:9000").await;
            // The backend speaks first: the waypoint forwarded without waiting for a byte.
            match greeting(&mut s).await.as_str() {
                "v1\n" => {}
                "v2\n" => v2 += 1,
                other => panic!("greeting {other:?}"),
            }
            s.write_all(Bytes::from_static(b"bye"), true).await.unwrap();
            let (back, ended) = read_to_end(&mut s).await;
            assert_eq!((back.as_slice(), ended), (&b"bye"[..], Ended::Closed));
        }
        v2
    });
    // 20 % of 1,000 within ±5 % of all connections (the issue's bound for weights).
    assert!((150..=250).contains(&v2), "v2 took {v2} of {n}");
}

#[test]
fn tcp_route_carries_every_byte_and_the_half_close() {
    let m = Mesh::start();
    let data = payload(4 * 1024 * 1024 + 5);
    let (head, back, ended) = block_on(async {
        let (_c, mut s) = m.tunnel("10.96.0.20:9000").await;
        let head = greeting(&mut s).await;
        s.write_all(Bytes::from(data.clone()), true).await.unwrap();
        let (back, ended) = read_to_end(&mut s).await;
        (head, back, ended)
    });
    assert!(head == "v1\n" || head == "v2\n", "{head:?}");
    assert_eq!(ended, Ended::Closed);
    assert_eq!(back.len(), data.len());
    assert_eq!(fnv(&back), fnv(&data));
}

#[test]
fn a_port_without_a_tcp_route_is_detected_and_self_routed() {
    let m = Mesh::start();
    // 9001 has no route: the service routes to itself over both endpoints, after the
    // client's first bytes (not HTTP: opaque).
    let seen = block_on(async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let (_c, mut s) = m.tunnel("10.96.0.20:9001").await;
            s.write_all(Bytes::from_static(b"\x16hi"), true)
                .await
                .unwrap();
            let (back, ended) = read_to_end(&mut s).await;
            assert_eq!(ended, Ended::Closed);
            let text = String::from_utf8(back).unwrap();
            let (name, rest) = text.split_once('\n').unwrap();
            assert_eq!(rest, "\x16hi");
            seen.insert(name.to_string());
        }
        seen
    });
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["v1", "v2"]);
}

/// Istio's TCP metrics (`reporter="waypoint"`, `request_protocol="tcp"`, no
/// `response_code`) count each opaque connection through the waypoint, by the backend the
/// TCPRoute chose, with its bytes each way (received from the client, sent to it).
/// `n` connections through the TCPRoute of `tcp-echo`, each greeted, then `bye!` echoed.
fn connections(m: &Mesh, n: u64) {
    block_on(async {
        for _ in 0..n {
            let (_c, mut s) = m.tunnel("10.96.0.20:9000").await;
            greeting(&mut s).await;
            s.write_all(Bytes::from_static(b"bye!"), true)
                .await
                .unwrap();
            let (back, ended) = read_to_end(&mut s).await;
            assert_eq!((back.as_slice(), ended), (&b"bye!"[..], Ended::Closed));
        }
    });
}

/// The sum over the series of `metric`, and the series; first waits for
/// `istio_tcp_connections_closed_total` to reach `n` (counted as each tunnel ends, after
/// the client saw its end).
fn tcp_sum(m: &Mesh, metric: &str, n: u64) -> (u64, Vec<String>) {
    let stats = m.wp.handle().stats_addr().unwrap();
    let deadline = std::time::Instant::now() + common::EVENT_BOUND;
    loop {
        let page = common::prometheus_page(stats);
        let series = |name: &str| -> (u64, Vec<String>) {
            let lines: Vec<String> = page
                .lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .map(String::from)
                .collect();
            let total = lines
                .iter()
                .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
                .sum();
            (total, lines)
        };
        if series("istio_tcp_connections_closed_total").0 >= n
            || std::time::Instant::now() > deadline
        {
            return series(metric);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn istio_tcp_metrics_count_each_opaque_connection() {
    let m = Mesh::start();
    let n = 6;
    connections(&m, n);
    let sum = |metric: &str| tcp_sum(&m, metric, n);
    let (closed, lines) = sum("istio_tcp_connections_closed_total");
    assert_eq!(closed, n, "{lines:?}");
    assert_eq!(sum("istio_tcp_connections_opened_total").0, n);
    assert_eq!(sum("istio_tcp_received_bytes_total").0, 4 * n);
    // The greeting (`v1\n` or `v2\n`) and the echo.
    assert_eq!(sum("istio_tcp_sent_bytes_total").0, 7 * n);
    for l in &lines {
        assert!(l.contains("reporter=\"waypoint\""), "{l}");
        assert!(l.contains("request_protocol=\"tcp\""), "{l}");
        assert!(l.contains("response_flags=\"-\""), "{l}");
        assert!(
            l.contains("destination_service=\"tcp-echo-v1.app.svc.cluster.local\"")
                || l.contains("destination_service=\"tcp-echo-v2.app.svc.cluster.local\""),
            "by the chosen backend: {l}"
        );
        assert!(!l.contains("response_code="), "{l}");
        assert!(!l.contains("grpc_response_status="), "{l}");
    }
}

/// Telemetry metrics overrides on the TCP metrics: one disabled, a label added from the
/// connection (`destination.port`) and one removed, on the metric they name only.
#[test]
fn telemetry_overrides_change_the_tcp_metrics() {
    let m = Mesh::start_with(
        "---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh, namespace: istio-system}
spec:
  metrics:
  - overrides:
    - match: {metric: TCP_SENT_BYTES}
      disabled: true
    - match: {metric: TCP_OPENED_CONNECTIONS}
      tagOverrides:
        dport: {value: destination.port}
        response_flags: {operation: REMOVE}
",
    );
    let n = 4;
    connections(&m, n);
    let (closed, closed_lines) = tcp_sum(&m, "istio_tcp_connections_closed_total", n);
    assert_eq!(closed, n);
    let (opened, opened_lines) = tcp_sum(&m, "istio_tcp_connections_opened_total", n);
    assert_eq!(opened, n);
    assert_eq!(tcp_sum(&m, "istio_tcp_received_bytes_total", n).0, 4 * n);
    let (sent, sent_lines) = tcp_sum(&m, "istio_tcp_sent_bytes_total", n);
    assert_eq!((sent, sent_lines.len()), (0, 0), "disabled: no series");
    for l in &opened_lines {
        assert!(l.contains(",dport=\"9000\"}"), "{l}");
        assert!(!l.contains("response_flags="), "{l}");
    }
    for l in &closed_lines {
        assert!(!l.contains("dport="), "{l}");
        assert!(l.contains("response_flags=\"-\""), "{l}");
    }
}

/// Each opaque connection leaves an access log line as a request does (Istio's waypoints
/// log TCP): here in Envoy's format, with its bytes each way, the endpoint the TCPRoute's
/// backend chose and no HTTP fields.
#[test]
fn opaque_tcp_connections_are_logged() {
    let dir = std::env::temp_dir().join(format!("tcp-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = common::TempDir(dir.clone());
    let log = dir.join("access.log");
    let m = Mesh::start_with(&format!(
        "---
meshConfig:
  accessLogFile: {}
  accessLogFormat: \"%PROTOCOL% %REQ(:METHOD)% %RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_CLUSTER% %DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST%\"
",
        log.display()
    ));
    let n = 3;
    connections(&m, n);
    // Counted (and logged) as each tunnel ends: wait for all, then stop the waypoint (its
    // workers write what they hold).
    tcp_sum(&m, "istio_tcp_connections_closed_total", n);
    drop(m);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64, n, "{text}");
    for l in lines {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!(&f[..7], ["-", "-", "0", "-", "4", "7", f[6]], "{l}");
        assert!(
            f[6] == "outbound|9000||tcp-echo-v1.app.svc.cluster.local"
                || f[6] == "outbound|9000||tcp-echo-v2.app.svc.cluster.local",
            "{l}"
        );
        assert_eq!(f[7], "10.96.0.20:9000", "{l}");
        assert!(f[8].parse::<SocketAddr>().is_ok(), "{l}");
    }
}

/// A CUSTOM policy on opaque TCP with a gRPC authorizer (Envoy's ext_authz network
/// filter): the authorizer is asked once per connection, with the source identity and the
/// destination and no HTTP request, and its answer decides (R15); with an HTTP authorizer
/// there is no request to ask about, so the connection is refused.
#[test]
fn r15_custom_policy_asks_a_grpc_authorizer_about_tcp_connections() {
    let policy = |provider: &str| {
        format!(
            "---
meshConfig:
  extensionProviders:
  - name: grpc
    envoyExtAuthzGrpc: {{service: ext-authz-grpc.app.svc.cluster.local, port: 9000}}
  - name: http
    envoyExtAuthzHttp: {{service: ext-authz-grpc.app.svc.cluster.local, port: 9000}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext, namespace: app}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: tcp-echo}}]
  action: CUSTOM
  provider: {{name: {provider}}}
  rules: [{{}}]
"
        )
    };
    let m = Mesh::start_with(&policy("grpc"));
    // Port 9000 (the TCPRoute's, opaque at once): allowed.
    connections(&m, 1);
    let check = m.checks.recv_timeout(common::EVENT_BOUND).unwrap();
    assert_eq!(
        check,
        format!(
            "principal={} dst=10.96.0.20:9000 http=false",
            id("app", "client")
        ),
    );
    // Port 9001 (detected opaque once the client speaks): denied, the stream reset.
    let ended = block_on(async {
        let (_c, mut s) = m.tunnel("10.96.0.20:9001").await;
        let _ = s
            .write_all(Bytes::from_static(b"\x00\x01binary"), false)
            .await;
        read_to_end(&mut s).await.1
    });
    assert_eq!(ended, Ended::Reset);
    assert!(m
        .checks
        .recv_timeout(common::EVENT_BOUND)
        .unwrap()
        .contains("dst=10.96.0.20:9001"));
    let c = &m.wp.handle().counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((get(&c.ext_authz[0]), get(&c.ext_authz[1])), (1, 1));
    assert_eq!(get(&c.tcp_denied), 1);
    drop(m);
    // An HTTP authorizer: refused, nobody asked.
    let m = Mesh::start_with(&policy("http"));
    let ended = block_on(async {
        let c = common::connect(m.wp.addr, &m.wp.client_cert, id("app", "waypoint"))
            .await
            .unwrap();
        let req = hbone::wire::ConnectRequest::new("10.96.0.20:9000".parse().unwrap());
        match c.open(&req).await {
            Ok(mut s) => read_to_end(&mut s).await.1,
            Err(_) => Ended::Reset,
        }
    });
    assert_eq!(ended, Ended::Reset);
    assert!(m.checks.try_recv().is_err());
}

#[test]
fn a_tcp_route_to_a_missing_service_refuses_the_connection() {
    let m = Mesh::start();
    // Refused without a byte: the stream is reset, before or after its `200` reached the
    // client (nothing waits for the client's first byte).
    block_on(async {
        let c = common::connect(m.wp.addr, &m.wp.client_cert, id("app", "waypoint"))
            .await
            .unwrap();
        let req = hbone::wire::ConnectRequest::new("10.96.0.23:9000".parse().unwrap());
        match c.open(&req).await {
            Ok(mut s) => assert_eq!(read_to_end(&mut s).await, (Vec::new(), Ended::Reset)),
            Err(e) => assert!(e.to_string().contains("refused stream"), "{e}"),
        }
    });
    assert_eq!(
        m.wp.counters()
            .upstream_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn tcp_route_load_errors_name_the_field() {
    let mesh = "services:\n  - {name: t, namespace: app, hostname: t.app.svc.cluster.local, vips: [\"10.96.0.30\"], ports: {9000: 9000, 80: 8080}}\n";
    let tcp = |spec: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {{name: r, namespace: app}}\nspec:\n{spec}")
    };
    let parent = "  parentRefs:\n  - {group: \"\", kind: Service, name: t, port: 9000}\n";
    let http = |port: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: h, namespace: app}}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: t{port}}}\n  rules: [{{backendRefs: [{{name: t, port: 80}}]}}]\n")
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            tcp(&format!("{parent}  rules:\n  - backendRefs: [{{name: t, port: 9000}}]\n  - backendRefs: [{{name: t, port: 9000}}]\n")),
            "spec.rules[1]",
            "more than one rule",
        ),
        (tcp(parent), "spec.rules", "one rule is required"),
        (
            tcp("  parentRefs: [{name: gw}]\n  rules: [{backendRefs: [{name: t, port: 9000}]}]\n"),
            "spec.parentRefs[0]",
            "only for Services",
        ),
        (
            tcp(&format!("{parent}  rules:\n  - backendRefs:\n    - name: t\n")),
            "spec.rules[0].backendRefs[0].port",
            "required",
        ),
        (
            tcp(&format!("{parent}  rules:\n  - backendRefs:\n    - name: t\n      port: 9000\n      filters: [{{type: RequestHeaderModifier}}]\n")),
            "spec.rules[0].backendRefs[0].filters",
            "has no filters",
        ),
        // An HTTPRoute on every port of the service overlaps the TCPRoute's port…
        (
            format!("{}---\n{}", http(""), tcp(&format!("{parent}  rules: [{{backendRefs: [{{name: t, port: 9000}}]}}]\n"))),
            "spec.parentRefs[0]",
            "a port is TCP (TCPRoute) or HTTP",
        ),
    ];
    for (doc, field, says) in cases {
        let text = format!("{mesh}---\n{doc}");
        let e = match waypoint::config::load_str(Path::new("w.yaml"), &text, 1) {
            Ok(_) => panic!("loaded:\n{text}"),
            Err(e) => e,
        };
        assert_eq!(e.field.as_deref(), Some(field), "{e}\n{text}");
        assert!(e.message.contains(says), "{e}");
        assert!(e.line.is_some(), "{e}");
    }
    // …one on another port does not.
    let text = format!(
        "{mesh}---\n{}---\n{}",
        http(", port: 80"),
        tcp(&format!(
            "{parent}  rules: [{{backendRefs: [{{name: t, port: 9000}}]}}]\n"
        ))
    );
    let cfg = waypoint::config::load_str(Path::new("w.yaml"), &text, 1).unwrap();
    assert_eq!(cfg.routes.tcp_routes().len(), 1);
}

/// A TCPRoute's backend in another namespace needs a ReferenceGrant there for TCPRoutes
/// (Gateway API); without one its connections are refused.
#[test]
fn a_tcp_route_backend_in_another_namespace_needs_a_reference_grant() {
    let mesh = "services:\n  - {name: t, namespace: app, hostname: t.app.svc.cluster.local, vips: [\"10.96.0.30\"], ports: {9000: 9000}}\n  - {name: db, namespace: data, hostname: db.data.svc.cluster.local, vips: [\"10.96.0.31\"], ports: {5432: 5432}}\n";
    let route = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: r, namespace: app}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: t}]\n  rules: [{backendRefs: [{name: db, namespace: data, port: 5432}]}]\n";
    let grant = |kind: &str| {
        format!("---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: data}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: {kind}, namespace: app}}]\n  to: [{{group: \"\", kind: Service, name: db}}]\n")
    };
    let permitted = |extra: &str| {
        let text = format!("{mesh}---\n{route}{extra}");
        let cfg = waypoint::config::load_str(Path::new("w.yaml"), &text, 1).unwrap();
        cfg.routes.tcp_routes()[0].backends[0].permitted
    };
    assert!(!permitted(""));
    assert!(!permitted(&grant("HTTPRoute")));
    assert!(permitted(&grant("TCPRoute")));
}
