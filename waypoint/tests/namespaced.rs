//! R13–R17 end to end on real network namespaces (needs root; fails under `CI` without it):
//! client pod → its node's ztunnel (transparent capture, nftables) → the waypoint (the real
//! `waypoint` binary) → the destination node's ztunnel → server pod, with the real
//! `ztunnel` (its command line, run by re-executing this test binary).
//!
//! ```text
//!  pod "client" 10.51.0.2 ──veth── node A (ztunnel) ──veth── node B (ztunnel) ──veth── pods "echo-1" 10.52.0.2, "echo-2" 10.52.0.3, "echo-v1" 10.52.0.4
//!  pod "outsider" 10.51.0.3 ─┘ 192.168.151.1      192.168.151.2 └──veth── pod "waypoint" 10.52.0.10 (waypoint binary)
//! ```
//!
//! Namespaces are `wp<pid>-<test>-…` and addresses `10.51/10.52/10.196/192.168.151`, apart
//! from ztunnel's own namespace tests, so both can run at once. Each test checks the bytes
//! and the path from the ztunnels' and the waypoint's metrics.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use common::{block_on, connect, exchange, get, id, next_request, ok_response, SPEC_ECHO_ROUTE};
use netlab::{in_ns, metric, Addressing, Lab, Pod, TwoNodes};

/// The env var that turns this test binary into a ztunnel (see [`ztunnel_child`]).
const ZT_ARGS: &str = "WP_NS_ZTUNNEL_ARGS";

/// Not a test: the entry point of the re-executed child that runs the real ztunnel's
/// command line (`ZT_ARGS`, unit-separator separated). Ignored, so it runs only when
/// asked for by name with `--ignored`; without `ZT_ARGS` (e.g. `--include-ignored` over
/// the whole workspace) it is not a child and passes without doing anything.
#[test]
#[ignore = "the ztunnel child process of the namespace tests"]
fn ztunnel_child() {
    let Some(args) = std::env::var_os(ZT_ARGS) else {
        return;
    };
    let mut argv = vec![std::ffi::OsString::from("ztunnel")];
    argv.extend(
        args.to_string_lossy()
            .split('\u{1f}')
            .map(std::ffi::OsString::from),
    );
    let code = ztunnel::cli::main_with_args(argv);
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
}

/// Root, or a failure under `CI`, or a printed SKIP.
macro_rules! need_root {
    ($name:expr) => {
        if !netlab::require_root($name) {
            return;
        }
    };
}

/// The pods: `(name, node, IPv4, captured)` (the model's ambient namespaces).
const PODS: &[Pod] = &[
    Pod::new("client", 0, [10, 51, 0, 2], true),
    Pod::new("outsider", 0, [10, 51, 0, 3], false),
    Pod::new("external", 0, [10, 51, 0, 5], false),
    Pod::new("echo-1", 1, [10, 52, 0, 2], true),
    Pod::new("echo-2", 1, [10, 52, 0, 3], true),
    Pod::new("echo-v1", 1, [10, 52, 0, 4], true),
    Pod::new("waypoint", 1, [10, 52, 0, 10], false),
];

const NODE_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 151, 1),
    Ipv4Addr::new(192, 168, 151, 2),
];
const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 196, 0, 1);
const PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 196, 0, 3);
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 196, 0, 9);

fn pod(name: &str) -> Pod {
    *PODS.iter().find(|p| p.name == name).expect("pod")
}

fn pod_addr(name: &str) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod(name).ip), 8080)
}

fn waypoint_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod("waypoint").ip), 15008)
}

/// The mesh model: `client` (ns-a) calls services of `default`, whose namespace uses the
/// waypoint; `outsider` is not in the mesh; `other` has no waypoint; the ServiceEntry
/// `external.example.com`, bound to the waypoint, has the pod `external` (no workload of
/// the model, outside the mesh) as its endpoint, and no `addresses`: its VIP is allocated,
/// and the ztunnels' DNS proxies answer its host with it.
fn model() -> String {
    let ip = |n: &str| pod(n).ip;
    format!(
        r#"namespaces:
  - name: ns-a
    labels: {{istio.io/dataplane-mode: ambient}}
  - name: default
    labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
  - name: other
    labels: {{istio.io/dataplane-mode: ambient}}
  - name: legacy
waypoints:
  - {{name: waypoint, namespace: default, address: "{wp}"}}
workloads:
  - {{name: client, namespace: ns-a, serviceAccount: client, workloadIps: [{c}], node: node-a}}
  - {{name: outsider, namespace: legacy, workloadIps: [{o}], node: node-a}}
  - {{name: echo-1, namespace: default, serviceAccount: echo, workloadIps: [{e1}], node: node-b}}
  - {{name: echo-2, namespace: default, serviceAccount: echo, workloadIps: [{e2}], node: node-b}}
  - {{name: echo-v1, namespace: default, serviceAccount: echo-v1, workloadIps: [{v1}], node: node-b}}
services:
  - name: echo
    namespace: default
    hostname: echo.default.svc.cluster.local
    vips: [{ECHO_VIP}]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: default/echo-1}}, {{workloadUid: default/echo-2}}]
  - name: echo-v1
    namespace: default
    hostname: echo-v1.default.svc.cluster.local
    vips: [10.196.0.2]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: default/echo-v1}}]
  - name: plain
    namespace: default
    hostname: plain.default.svc.cluster.local
    vips: [{PLAIN_VIP}]
    ports: {{80: 8080}}
    endpoints: [{{workloadUid: default/echo-1}}, {{workloadUid: default/echo-2}}]
  - name: other
    namespace: other
    hostname: other.other.svc.cluster.local
    vips: [{OTHER_VIP}]
    ports: {{80: 8080}}
    endpoints: []
serviceEntries:
  - name: external
    namespace: default
    labels: {{istio.io/use-waypoint: waypoint}}
    hosts: [external.example.com]
    ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
    resolution: STATIC
    endpoints: [{{address: {x}}}]
"#,
        wp = waypoint_addr(),
        c = ip("client"),
        o = ip("outsider"),
        e1 = ip("echo-1"),
        e2 = ip("echo-2"),
        v1 = ip("echo-v1"),
        x = ip("external"),
    )
}

const DENY_ADMIN: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"#;

/// A keep-alive HTTP/1.1 server in a pod: answers `<name> <path> xff=<x-forwarded-for>`,
/// reports each request's (peer, path).
struct HttpPod {
    seen: mpsc::Receiver<(SocketAddr, String)>,
    _served: netlab::Served,
}

impl HttpPod {
    fn start(ns: &str, addr: SocketAddr, name: &'static str) -> HttpPod {
        let (tx, seen) = mpsc::channel();
        let served = netlab::serve_in(ns, addr, move |c, peer| {
            serve_http(c, peer, name, tx.clone())
        })
        .unwrap_or_else(|e| panic!("{name} on {addr}: {e}"));
        HttpPod {
            seen,
            _served: served,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.try_iter().map(|(_, p)| p).collect()
    }
}

fn serve_http(
    mut c: TcpStream,
    peer: SocketAddr,
    name: &str,
    tx: mpsc::Sender<(SocketAddr, String)>,
) {
    let mut buf = Vec::new();
    while let Some(req) = next_request(&mut c, &mut buf) {
        let xff = req.header("x-forwarded-for").unwrap_or_default();
        let _ = tx.send((peer, req.path.clone()));
        let body = format!("{name} {} xff={xff}", req.path);
        if c.write_all(ok_response(&body).as_bytes()).is_err() {
            return;
        }
    }
}

struct World {
    dir: PathBuf,
    ca_dir: PathBuf,
    nodes: TwoNodes,
    lab: Lab,
}

impl World {
    /// The topology, both ztunnels and the waypoint (with `l7`: HTTPRoutes and policies).
    fn new(tag: &str, l7: &str) -> World {
        let mut lab = Lab::for_test("wp", tag).unwrap();
        let dir = lab.dir().expect("the test's folder").to_path_buf();
        let ca_dir = dir.join("ca");
        hbone::ca::SigningCa::builtin(&ca_dir, "cluster.local").unwrap();
        let nodes = build(&mut lab).unwrap_or_else(|e| panic!("building the topology: {e}"));
        let mut w = World {
            dir,
            ca_dir,
            nodes,
            lab,
        };
        w.start_ztunnels();
        w.start_waypoint(l7);
        w
    }

    fn node(&self, i: usize) -> String {
        self.nodes.nodes[i].clone()
    }

    fn pod_ns(&self, name: &str) -> String {
        self.lab.ns(name)
    }

    fn start_ztunnels(&mut self) {
        for i in 0..2 {
            let name = ["node-a", "node-b"][i];
            let file = self.dir.join(format!("{name}.yaml"));
            // Node B's ztunnel installs its own capture rules; node A's are installed from
            // here, as `ztunnel capture install` would.
            let owned = if i == 1 { "  capture: {}\n" } else { "" };
            std::fs::write(
                &file,
                format!(
                    "ztunnel:\n  node: {name}\n  address: 0.0.0.0\n  outbound: 0.0.0.0:15001\n  plaintext:\n    - listen: 0.0.0.0:15006\n{owned}  ca: {{builtin: {}}}\n  dns: {{listen: \"0.0.0.0:15053\", upstream: [\"127.0.0.1:9\"]}}\nruntime: {{workers: 1, pin: false, drain_timeout: 1s}}\n{}",
                    self.ca_dir.display(),
                    model()
                ),
            )
            .unwrap();
            if i == 0 {
                let loaded =
                    ztunnel::config::load_file(&file, &tuning::Profile::default(), 1).unwrap();
                let mut rules = ztunnel::capture::Rules::for_node(&loaded.snapshot, name, |w| {
                    Some(TwoNodes::pod_dev(&w.name))
                });
                // The pods' DNS to the node's DNS proxy, as `ztunnel capture install
                // --dns-port 15053` would.
                rules.dns_port = Some(15053);
                assert_eq!(rules.pod_interfaces, netlab::captured_devs(PODS, 0));
                rules.install(Some(&self.node(i))).unwrap();
            }
            let args = format!("--config\u{1f}{}", file.display());
            let exe = std::env::current_exe().unwrap();
            let mut cmd = netlab::netns_command(&self.node(i), exe);
            cmd.args(["--ignored", "--exact", "ztunnel_child", "--nocapture"])
                .env(ZT_ARGS, args)
                .env("RUST_LOG", "info");
            self.spawn(&mut cmd, name);
        }
    }

    fn start_waypoint(&mut self, l7: &str) {
        let file = self.dir.join("waypoint.yaml");
        std::fs::write(
            &file,
            format!(
                "{}---\n{l7}---\nwaypoint:\n  listen: 0.0.0.0:15008\n  address: {}\n  gateway: default/waypoint\n  identity: spiffe://cluster.local/ns/default/sa/waypoint\n  ca: {{builtin: {}}}\n  stats: 0.0.0.0:15020\nruntime: {{workers: 1, pin: false, drain_timeout: 1s}}\n",
                model(),
                waypoint_addr(),
                self.ca_dir.display()
            ),
        )
        .unwrap();
        let mut cmd =
            netlab::netns_command(&self.pod_ns("waypoint"), env!("CARGO_BIN_EXE_waypoint"));
        cmd.arg("--config")
            .arg(&file)
            .env("RUST_LOG", "info,access=info");
        self.spawn(&mut cmd, "waypoint");
    }

    /// Start `cmd` and wait for its READY line (the test harness prints its own lines
    /// first).
    fn spawn(&mut self, cmd: &mut std::process::Command, name: &str) {
        self.lab.spawn_logged(name, cmd, Duration::from_secs(30));
    }

    fn log(&self, name: &str) -> String {
        self.lab.log(name)
    }

    /// `/stats/prometheus` on :15020 inside namespace `ns`.
    fn stats_in(&self, ns: String) -> String {
        let stats = SocketAddr::from(([127, 0, 0, 1], 15020));
        netlab::http_get_in(&ns, stats, "/stats/prometheus")
            .unwrap_or_else(|e| panic!("stats in {ns}: {e}"))
    }

    /// Node `i`'s ztunnel metrics.
    fn zt(&self, i: usize) -> String {
        self.stats_in(self.node(i))
    }

    /// The waypoint's metrics.
    fn wp(&self) -> String {
        self.stats_in(self.pod_ns("waypoint"))
    }

    fn http_pod(&self, name: &'static str) -> HttpPod {
        HttpPod::start(&self.pod_ns(name), pod_addr(name), name)
    }

    fn connect(&self, from: &str, dst: SocketAddr) -> TcpStream {
        netlab::connect_in(
            &self.pod_ns(from),
            dst,
            Duration::from_secs(5),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{from} to {dst}: {e}"))
    }

    fn dump(&self) -> String {
        format!(
            "--- node-a\n{}\n--- node-b\n{}\n--- waypoint\n{}\n--- node-a log\n{}\n--- node-b log\n{}\n--- waypoint log\n{}",
            self.zt(0),
            self.zt(1),
            self.wp(),
            self.log("node-a"),
            self.log("node-b"),
            self.log("waypoint")
        )
    }

    /// Poll `f` (generously) until true; else panic with everything the proxies said.
    fn eventually(&self, what: &str, f: impl FnMut() -> bool) {
        netlab::eventually(what, Duration::from_secs(20), f, || self.dump());
    }
}

/// The namespaces, veths, addresses and routes.
fn build(lab: &mut Lab) -> netlab::Result<TwoNodes> {
    let ip = |a: [u8; 4]| IpAddr::V4(a.into());
    let plan = Addressing {
        node_ips: NODE_IPS.map(IpAddr::V4),
        link_prefix: 24,
        gateways: [ip([10, 51, 0, 1]), ip([10, 52, 0, 1])],
        routes: vec![(0, "10.52.0.0/24".into()), (1, "10.51.0.0/24".into())],
        pod_ip: |p| IpAddr::V4(p.ip),
    };
    TwoNodes::with_pods(lab, PODS, &[plan])
}

const PATHS: &str = "ztunnel_connection_paths_total";

/// The text without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
const ECHO_HOST: &str = "echo.default.svc.cluster.local";

fn vip(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), 80)
}

#[test]
fn r13_plaintext_to_the_waypoint_is_refused() {
    need_root!("r13_plaintext_to_the_waypoint_is_refused");
    let w = World::new("r13", "");
    let _e = w.http_pod("echo-1");
    // An uncaptured pod speaks plain HTTP straight to the waypoint's HBONE port.
    let mut s = w.connect("outsider", waypoint_addr());
    s.write_all(get("/", ECHO_HOST).as_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    w.eventually("the waypoint counted the refusal", || {
        metric(&w.wp(), "waypoint_refused_connections_total", &[]) == 1
    });
    let st = w.wp();
    assert_eq!(metric(&st, "waypoint_tunnels_total", &[]), 0, "{st}");
    assert_eq!(metric(&st, "istio_requests_total", &[]), 0, "{st}");
}

#[test]
fn r14_target_not_bound_to_the_waypoint_is_refused() {
    need_root!("r14_target_not_bound_to_the_waypoint_is_refused");
    let w = World::new("r14", "");
    let _e1 = w.http_pod("echo-1");
    let _e2 = w.http_pod("echo-2");
    // An HBONE client with a mesh identity (as a misbehaving ztunnel would be) asks the
    // waypoint for a service that does not use it, then for one that does.
    let ca = hbone::ca::SigningCa::builtin(&w.ca_dir, "cluster.local").unwrap();
    let cert = hbone::ca::CertSource::issue(&ca, &id("ns-a", "client"), SystemTime::now()).unwrap();
    let results = in_ns(&w.pod_ns("outsider"), move || {
        block_on(async move {
            let c = connect(waypoint_addr(), &cert, id("default", "waypoint"))
                .await
                .unwrap();
            let mut out = Vec::new();
            for target in [vip(OTHER_VIP), vip(PLAIN_VIP)] {
                let r = c
                    .open(&hbone::wire::ConnectRequest::new(target))
                    .await
                    .map(|_| ())
                    .map_err(|e| match e {
                        hbone::HboneError::Status(s) => s.as_u16(),
                        other => panic!("{other}"),
                    });
                out.push(r);
            }
            out
        })
    });
    assert_eq!(results, vec![Err(400), Ok(())]);
    let st = w.wp();
    assert_eq!(
        metric(&st, "waypoint_refused_targets_total", &[]),
        1,
        "{st}"
    );
    assert_eq!(metric(&st, "waypoint_tunnels_total", &[]), 1, "{st}");
    // Nothing went to node B.
    assert_eq!(metric(&w.zt(1), PATHS, &[("direction", "inbound")]), 0);
}

#[test]
fn r15_deny_answers_403_and_no_upstream_connection_is_made() {
    need_root!("r15_deny_answers_403_and_no_upstream_connection_is_made");
    let w = World::new("r15", &format!("{SPEC_ECHO_ROUTE}---\n{DENY_ADMIN}"));
    let (e1, e2, v1) = (
        w.http_pod("echo-1"),
        w.http_pod("echo-2"),
        w.http_pod("echo-v1"),
    );
    let mut s = w.connect("client", vip(ECHO_VIP));
    let r = exchange(&mut s, &get("/admin/users", ECHO_HOST));
    assert_eq!(r, (403, "RBAC: access denied".to_string()));
    let r = exchange(&mut s, &get("/admin", ECHO_HOST));
    assert_eq!(r.0, 403);
    drop(s);
    // Node A sent it to the waypoint (R7: the service uses it)…
    w.eventually("node A routed the client to the waypoint", || {
        metric(
            &w.zt(0),
            PATHS,
            &[
                ("direction", "outbound"),
                ("route", "waypoint"),
                ("target", &waypoint_addr().to_string()),
            ],
        ) == 1
    });
    // …which denied both requests with no upstream stream: node B saw nothing, no pod did.
    let st = w.wp();
    assert_eq!(
        metric(
            &st,
            "istio_requests_total",
            &[
                ("response_code", "403"),
                ("destination_service_name", "echo")
            ]
        ),
        2,
        "{st}"
    );
    assert_eq!(metric(&st, "waypoint_http_denied_total", &[]), 2, "{st}");
    assert_eq!(
        metric(&st, "waypoint_upstream_streams_total", &[]),
        0,
        "{st}"
    );
    assert_eq!(metric(&w.zt(1), PATHS, &[]), 0, "{}", w.zt(1));
    for p in [&e1, &e2, &v1] {
        assert!(p.seen().is_empty());
    }
}

#[test]
fn r16_pod_addressed_request_is_not_rerouted() {
    need_root!("r16_pod_addressed_request_is_not_rerouted");
    let w = World::new("r16", SPEC_ECHO_ROUTE);
    let (e1, v1) = (w.http_pod("echo-1"), w.http_pod("echo-v1"));
    // echo-1 is an endpoint of `echo`, whose HTTPRoute sends everything to echo-v1; a
    // request addressed to the pod itself stays with the pod.
    let mut s = w.connect("client", pod_addr("echo-1"));
    let host = pod_addr("echo-1").to_string();
    for path in ["/direct", "/again"] {
        let (code, body) = exchange(&mut s, &get(path, &host));
        assert_eq!(code, 200);
        assert_eq!(body, format!("echo-1 {path} xff={}", pod("client").ip));
    }
    drop(s);
    assert_eq!(e1.seen(), vec!["/direct", "/again"]);
    assert!(v1.seen().is_empty());
    w.eventually("both ztunnels and the waypoint counted the path", || {
        metric(
            &w.zt(0),
            PATHS,
            &[("direction", "outbound"), ("route", "waypoint")],
        ) == 1
            && metric(&w.zt(1), PATHS, &[("direction", "inbound")]) >= 1
    });
    let st = w.wp();
    assert_eq!(
        metric(
            &st,
            "istio_requests_total",
            &[
                ("response_code", "200"),
                ("destination_workload", "echo-1"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/ns-a/sa/client"
                ),
            ]
        ),
        2,
        "{st}"
    );
}

#[test]
fn r17_service_routes_to_itself_across_endpoints_and_the_httproute_wins() {
    need_root!("r17_service_routes_to_itself_across_endpoints_and_the_httproute_wins");
    let w = World::new("r17", SPEC_ECHO_ROUTE);
    let (e1, e2, v1) = (
        w.http_pod("echo-1"),
        w.http_pod("echo-2"),
        w.http_pod("echo-v1"),
    );
    // `plain` has no route: it routes to itself, spread over its two endpoints.
    let mut s = w.connect("client", vip(PLAIN_VIP));
    let n = 40;
    let mut by = std::collections::BTreeMap::new();
    for i in 0..n {
        let (code, body) = exchange(
            &mut s,
            &get(&format!("/p{i}"), "plain.default.svc.cluster.local"),
        );
        assert_eq!(code, 200);
        *by.entry(body.split(' ').next().unwrap().to_string())
            .or_insert(0) += 1;
    }
    drop(s);
    assert_eq!(by.values().sum::<i32>(), n);
    assert!(by.get("echo-1").is_some_and(|c| *c > 0), "{by:?}");
    assert!(by.get("echo-2").is_some_and(|c| *c > 0), "{by:?}");
    assert!(v1.seen().is_empty());
    let _ = (e1.seen(), e2.seen());
    // `echo` with the spec's HTTPRoute: every request to echo-v1.
    let mut s = w.connect("client", vip(ECHO_VIP));
    for i in 0..10 {
        let (code, body) = exchange(&mut s, &get(&format!("/e{i}"), ECHO_HOST));
        assert_eq!(code, 200);
        assert_eq!(body, format!("echo-v1 /e{i} xff={}", pod("client").ip));
    }
    drop(s);
    assert!(e1.seen().is_empty() && e2.seen().is_empty());
    assert_eq!(v1.seen().len(), 10);
    let st = w.wp();
    assert_eq!(
        metric(
            &st,
            "istio_requests_total",
            &[
                ("destination_service_name", "echo-v1"),
                ("destination_workload", "echo-v1"),
                ("response_code", "200"),
            ]
        ),
        10,
        "{st}"
    );
    assert_eq!(
        metric(
            &st,
            "istio_requests_total",
            &[
                ("destination_service_name", "plain"),
                ("response_code", "200")
            ]
        ),
        n as u64,
        "{st}"
    );
    // One access-log line per request, naming the original client and the endpoint (a
    // worker writes its access lines in batches, at least every second).
    let access_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(" access: request") && l.contains("dst_workload=echo-v1"))
            .map(str::to_owned)
            .collect()
    };
    w.eventually("the waypoint's access log has a line per request", || {
        access_lines(&strip_ansi(&w.log("waypoint"))).len() >= 10
    });
    let log = strip_ansi(&w.log("waypoint"));
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 10, "{log}");
    for (i, l) in lines.iter().enumerate() {
        assert!(l.contains(&format!("path=\"/e{i}\" ")), "{l}");
        assert!(
            l.contains("src_identity=spiffe://cluster.local/ns/ns-a/sa/client"),
            "{l}"
        );
        assert!(l.contains("status=200"), "{l}");
    }
    w.eventually("node A sent both connections to the waypoint", || {
        metric(
            &w.zt(0),
            PATHS,
            &[("direction", "outbound"), ("route", "waypoint")],
        ) == 2
    });
}

#[test]
fn r7_egress_through_the_waypoint_reaches_a_service_entry_outside_the_mesh() {
    need_root!("r7_egress_through_the_waypoint_reaches_a_service_entry_outside_the_mesh");
    let w = World::new("egress", SPEC_ECHO_ROUTE);
    let external = w.http_pod("external");
    // The client resolves the entry's host with its usual resolver: node A's capture
    // hands the query to its ztunnel's DNS proxy, which answers with the VIP allocated to
    // the entry (it has no `addresses`), as Istio's DNS proxy does.
    let resolver = SocketAddr::from(([10, 96, 0, 10], 53));
    let ips = netlab::resolve_a_in(&w.pod_ns("client"), resolver, "external.example.com")
        .unwrap_or_else(|e| panic!("{e}\n{}", w.dump()));
    assert_eq!(ips.len(), 1, "{ips:?}");
    assert_eq!(ips[0].octets()[..2], [240, 240], "{ips:?}");
    // The same over TCP (the capture redirects TCP to port 53 as well).
    let over_tcp = netlab::resolve_a_tcp_in(&w.pod_ns("client"), resolver, "external.example.com")
        .unwrap_or_else(|e| panic!("{e}\n{}", w.dump()));
    assert_eq!(over_tcp, ips);
    // The client calls the entry's VIP: node A's ztunnel captures it and tunnels it to the
    // waypoint (R7); the waypoint reaches the endpoint, outside the mesh, in plain TCP.
    let mut s = w.connect("client", vip(ips[0]));
    for i in 0..3 {
        let (code, body) = exchange(&mut s, &get(&format!("/x{i}"), "external.example.com"));
        assert_eq!(code, 200, "{}", w.dump());
        assert_eq!(body, format!("external /x{i} xff={}", pod("client").ip));
    }
    drop(s);
    // Straight from the waypoint's pod, on one kept connection.
    let seen: Vec<(SocketAddr, String)> = external.seen.try_iter().collect();
    assert_eq!(seen.len(), 3);
    for (peer, _) in &seen {
        assert_eq!(peer.ip(), IpAddr::V4(pod("waypoint").ip));
        assert_eq!(peer.port(), seen[0].0.port());
    }
    let st = w.wp();
    assert_eq!(
        metric(&st, "waypoint_upstream_plain_connections_total", &[]),
        1,
        "{st}"
    );
    assert_eq!(
        metric(
            &st,
            "istio_requests_total",
            &[
                ("destination_service", "external.example.com"),
                ("response_code", "200"),
            ]
        ),
        3,
        "{st}"
    );
    w.eventually("node A sent the connection to the waypoint", || {
        metric(
            &w.zt(0),
            PATHS,
            &[("direction", "outbound"), ("route", "waypoint")],
        ) == 1
    });
}
