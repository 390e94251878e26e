//! The request inputs policy trusts (R15): the path (normalized as Istio's default `BASE`
//! before policy, routing and the upstream request), the client address (`forwarded: for=`
//! only from the hop that captured the client; `X-Forwarded-For` only through
//! `num_trusted_proxies`), `Host` / `:authority` (required), and the client's workload in
//! telemetry (never from baggage). Table tests of the pure parts, then the same through
//! the waypoint on real sockets: a DENY policy cannot be dodged with `/x/../admin`,
//! `/./admin`, `%2e%2e`, a spoofed `X-Forwarded-For` or a spoofed `forwarded: for=`.

mod common;

use std::borrow::Cow;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{
    app_model, bind_node_ztunnel, block_on, connect, h2_get_from, id, ip, next_request,
    ok_response, read_response, serve_threads, stand_in_ztunnel, start_service, wp_deny, Ztunnel,
};
use hbone::ca::{CertSource, SigningCa, WorkloadCert};
use hbone::stream::H2Stream;
use hbone::wire::{Baggage, ConnectRequest};
use hbone::Identity;
use waypoint::http1::{body_framing, parse_head, remote_ip, Parsed};
use waypoint::path::{normalize, BadPath};
use waypoint::source::{client_ip, workload_of};

// ------------------------------------------------------------------ path normalization

/// RFC 3986 §5.4's examples (base `http://a/b/c/d;p?q`) whose reference is a path: the
/// reference merged with the base's directory `/b/c/` (§5.2.3) is the request path, and
/// its normalization must be the path of the RFC's resolved URI.
#[test]
fn r15_path_normalization_resolves_rfc3986_section_5_4_examples() {
    let table = [
        // §5.4.1 normal examples: (reference, merged path, RFC result path)
        ("g", "/b/c/g", "/b/c/g"),
        ("./g", "/b/c/./g", "/b/c/g"),
        ("g/", "/b/c/g/", "/b/c/g/"),
        ("/g", "/g", "/g"),
        (";x", "/b/c/;x", "/b/c/;x"),
        ("g;x", "/b/c/g;x", "/b/c/g;x"),
        (".", "/b/c/.", "/b/c/"),
        ("./", "/b/c/./", "/b/c/"),
        ("..", "/b/c/..", "/b/"),
        ("../", "/b/c/../", "/b/"),
        ("../g", "/b/c/../g", "/b/g"),
        ("../..", "/b/c/../..", "/"),
        ("../../", "/b/c/../../", "/"),
        ("../../g", "/b/c/../../g", "/g"),
        // §5.4.2 abnormal examples
        ("../../../g", "/b/c/../../../g", "/g"),
        ("../../../../g", "/b/c/../../../../g", "/g"),
        ("/./g", "/./g", "/g"),
        ("/../g", "/../g", "/g"),
        ("g.", "/b/c/g.", "/b/c/g."),
        (".g", "/b/c/.g", "/b/c/.g"),
        ("g..", "/b/c/g..", "/b/c/g.."),
        ("..g", "/b/c/..g", "/b/c/..g"),
        ("./../g", "/b/c/./../g", "/b/g"),
        ("./g/.", "/b/c/./g/.", "/b/c/g/"),
        ("g/./h", "/b/c/g/./h", "/b/c/g/h"),
        ("g/../h", "/b/c/g/../h", "/b/c/h"),
        ("g;x=1/./y", "/b/c/g;x=1/./y", "/b/c/g;x=1/y"),
        ("g;x=1/../y", "/b/c/g;x=1/../y", "/b/c/y"),
    ];
    for (reference, merged, want) in table {
        assert_eq!(
            normalize(merged).as_deref(),
            Ok(want),
            "RFC 3986 §5.4 reference {reference:?}"
        );
    }
}

/// Istio's documented normalizations (security/normalization: what `BASE` does and what
/// it leaves to the other options), and the bypasses of finding #4.
#[test]
fn r15_path_normalization_is_istios_base() {
    let table: &[(&str, Result<&str, BadPath>)] = &[
        // Percent-encoded unreserved characters are decoded, once, either hex case.
        ("/some/%61%62%63", Ok("/some/abc")),
        ("/%41%5A%30%39%2D%5F%7E%2e", Ok("/AZ09-_~.")),
        ("/%7e%2d", Ok("/~-")),
        ("/a%252e", Ok("/a%252e")),
        // `%2F` / `%5C` stay as they are (decoding them is DECODE_AND_MERGE_SLASHES);
        // other reserved or non-ASCII escapes too.
        ("/some%2fdata/%61", Ok("/some%2fdata/a")),
        ("/a%2F..%2Fadmin", Ok("/a%2F..%2Fadmin")),
        ("/a%5cb", Ok("/a%5cb")),
        ("/q%3Fx%23y%20z%c3%a9", Ok("/q%3Fx%23y%20z%c3%a9")),
        // A backslash is a slash.
        ("/some\\data", Ok("/some/data")),
        ("\\admin", Err(BadPath::NotAbsolute)),
        ("/x\\..\\admin", Ok("/admin")),
        // Dot segments, also spelled with escapes.
        ("/public/./data/abc/../xyz", Ok("/public/data/xyz")),
        ("/x/../admin", Ok("/admin")),
        ("/./admin", Ok("/admin")),
        ("/%2e%2e/admin", Ok("/admin")),
        ("/x/%2E%2E/admin", Ok("/admin")),
        ("/x/.%2e/admin", Ok("/admin")),
        ("/%2e/admin", Ok("/admin")),
        ("/x/..", Ok("/")),
        // Slashes are not merged (MERGE_SLASHES is not the default).
        ("/some//data///abc", Ok("/some//data///abc")),
        ("/a//../b", Ok("/a/b")),
        // Broken escapes are left alone.
        ("/a%zz%4", Ok("/a%zz%4")),
        // `%00` is always rejected.
        ("/a%00b", Err(BadPath::EncodedNul)),
        ("/a%2e%00", Err(BadPath::EncodedNul)),
        // Not origin form.
        ("", Err(BadPath::NotAbsolute)),
        ("admin", Err(BadPath::NotAbsolute)),
        ("*", Err(BadPath::NotAbsolute)),
        // Already normal: unchanged.
        ("/", Ok("/")),
        ("/a/b.c/.d/e..", Ok("/a/b.c/.d/e..")),
    ];
    for (path, want) in table {
        assert_eq!(normalize(path).as_deref(), want.as_deref(), "{path:?}");
    }
    // Normal paths are not copied; normalizing twice changes nothing.
    assert!(matches!(normalize("/api/v1/items"), Ok(Cow::Borrowed(_))));
    for (path, _) in table {
        if let Ok(once) = normalize(path) {
            assert_eq!(normalize(&once).as_deref(), Ok(&*once), "{path:?}");
        }
    }
}

/// A raw request head and the (path, query) it parses to; `None`: 400.
type HeadCase<'a> = (&'a [u8], Option<(&'a str, Option<&'a str>)>);

#[test]
fn r15_http1_head_carries_the_normalized_path_and_the_query_untouched() {
    let table: &[HeadCase<'_>] = &[
        (
            b"GET /x/../admin?a=/../b&c=%2e%2e HTTP/1.1\r\nHost: h\r\n\r\n",
            Some(("/admin", Some("a=/../b&c=%2e%2e"))),
        ),
        (
            b"GET /./admin HTTP/1.1\r\nHost: h\r\n\r\n",
            Some(("/admin", None)),
        ),
        (
            b"GET /%2e%2e/admin HTTP/1.1\r\nHost: h\r\n\r\n",
            Some(("/admin", None)),
        ),
        (b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n", Some(("/ok", None))),
        (b"GET /a%00 HTTP/1.1\r\nHost: h\r\n\r\n", None),
    ];
    for (raw, want) in table {
        let got = match parse_head(raw) {
            Parsed::Head(h, _) => Some((h.path.to_string(), h.query.map(|q| q.to_string()))),
            Parsed::Bad(400) => None,
            other => panic!("{other:?}"),
        };
        let want = want.map(|(p, q)| (p.to_string(), q.map(str::to_string)));
        assert_eq!(got, want, "{:?}", String::from_utf8_lossy(raw));
    }
}

// ------------------------------------------------------------------ Host

#[test]
fn http1_1_request_without_host_is_400_rfc9112_section_3_2() {
    let table: &[(&[u8], Result<(), u16>)] = &[
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", Ok(())),
        (b"GET / HTTP/1.1\r\nhost:\r\n\r\n", Ok(())),
        (b"GET / HTTP/1.1\r\nx: y\r\n\r\n", Err(400)),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Err(400)),
        // HTTP/1.0 has no Host requirement.
        (b"GET / HTTP/1.0\r\n\r\n", Ok(())),
    ];
    for (raw, want) in table {
        let Parsed::Head(h, _) = parse_head(raw) else {
            panic!("{:?}", String::from_utf8_lossy(raw))
        };
        assert_eq!(
            body_framing(&h).map(|_| ()),
            *want,
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }
}

// ------------------------------------------------------------------ remote.ip

#[test]
fn r15_remote_ip_is_the_peer_unless_trusted_proxies_say_otherwise() {
    let peer: IpAddr = "10.1.0.7".parse().unwrap();
    let head = |xff: &[&str]| {
        let mut raw = "GET / HTTP/1.1\r\nHost: h\r\n".to_string();
        for v in xff {
            raw.push_str(&format!("X-Forwarded-For: {v}\r\n"));
        }
        raw.push_str("\r\n");
        match parse_head(raw.as_bytes()) {
            Parsed::Head(h, _) => h,
            other => panic!("{other:?}"),
        }
    };
    let table: &[(&[&str], u32, &str)] = &[
        // numTrustedProxies 0 (the default): the header is the client's, never read.
        (&["192.0.2.1"], 0, "10.1.0.7"),
        (&["192.0.2.1, 198.51.100.2"], 0, "10.1.0.7"),
        // N > 0: the Nth entry from the right, across all the header's lines.
        (&["192.0.2.1, 198.51.100.2"], 1, "198.51.100.2"),
        (&["192.0.2.1, 198.51.100.2"], 2, "192.0.2.1"),
        (
            &["192.0.2.1", "198.51.100.2, 203.0.113.3"],
            2,
            "198.51.100.2",
        ),
        (&["192.0.2.1", "198.51.100.2, 203.0.113.3"], 3, "192.0.2.1"),
        (&["2001:db8::1 , 192.0.2.1"], 2, "2001:db8::1"),
        // Fewer entries than trusted hops, no header, or not an address: the peer.
        (&["192.0.2.1"], 2, "10.1.0.7"),
        (&[], 1, "10.1.0.7"),
        (&["unknown"], 1, "10.1.0.7"),
    ];
    for (xff, trusted, want) in table {
        assert_eq!(
            remote_ip(&head(xff), peer, *trusted),
            want.parse::<IpAddr>().unwrap(),
            "{xff:?} with {trusted} trusted"
        );
    }
}

/// `waypoint.num_trusted_proxies` in the settings document reaches the policy decision.
#[test]
fn r15_num_trusted_proxies_setting_moves_remote_ip_along_x_forwarded_for() {
    use waypoint::http1::{decide, Action};
    let cfg = |n: &str| {
        let text = format!(
            r#"services:
  - {{name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {{80: 8080}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-lb-net, namespace: app}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]
  action: DENY
  rules:
  - from: [{{source: {{remoteIpBlocks: ["198.51.100.0/24"]}}}}]
---
waypoint:
  gateway: app/wp
  identity: spiffe://cluster.local/ns/app/sa/waypoint
  ca: {{static: /nonexistent}}
{n}"#
        );
        let path = std::env::temp_dir().join("request-inputs-trusted.yaml");
        waypoint::config::load_str(&path, &text, 1)
    };
    let ctx = common::echo_tunnel_ctx(
        "10.1.0.7",
        Some("cluster.local/ns/app/sa/client".into()),
        Some("app".into()),
    );
    let head = |xff: &str| {
        let raw = format!("GET / HTTP/1.1\r\nHost: echo\r\nX-Forwarded-For: {xff}\r\n\r\n");
        match parse_head(raw.as_bytes()) {
            Parsed::Head(h, _) => h,
            other => panic!("{other:?}"),
        }
    };
    let denied = |cfg: &waypoint::config::WaypointConfig, xff: &str| {
        let mut rng = waypoint::lb::SplitMix64(1);
        match decide(cfg, &ctx, &mut head(xff), &mut rng) {
            Action::Respond(r) => r.starts_with(b"HTTP/1.1 403"),
            Action::Forward { .. } => false,
            Action::Check { .. } => panic!("no CUSTOM policy here"),
        }
    };
    // Default 0: the header is the client's own, and 10.1.0.7 is not in the DENY range.
    let zero = cfg("").unwrap();
    assert!(!denied(&zero, "198.51.100.7"));
    // One trusted proxy: the rightmost entry is the client it saw.
    let one = cfg("  num_trusted_proxies: 1\n").unwrap();
    assert!(denied(&one, "192.0.2.1, 198.51.100.7"));
    assert!(!denied(&one, "198.51.100.7, 192.0.2.1"));
    // Two: the second from the right; the proxies' own entries do not count as the client.
    let two = cfg("  num_trusted_proxies: 2\n").unwrap();
    assert!(denied(&two, "198.51.100.7, 192.0.2.1"));
    assert!(!denied(&two, "192.0.2.1, 198.51.100.7"));
    // A ztunnel_identity that is not a SPIFFE identity is refused at load, by field.
    let e = cfg("  ztunnel_identity: ztunnel\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("waypoint.ztunnel_identity"), "{e}");
}

// ------------------------------------------------------------------ forwarded: for=

/// A model: captured `app/client` workloads at 10.1.0.7 (no node) and 10.1.0.9 (node-b,
/// whose ztunnel is 192.168.0.2), `legacy/old` (not captured) at 10.1.0.10.
fn trust_model() -> mesh_model::snapshot::Snapshot {
    let text = r#"namespaces:
  - name: app
    labels: {istio.io/dataplane-mode: ambient}
  - name: legacy
nodes:
  - {name: node-b, ztunnel: 192.168.0.2}
workloads:
  - {uid: c7, name: c7, namespace: app, serviceAccount: client, workloadIps: ["10.1.0.7"]}
  - {uid: c9, name: c9, namespace: app, serviceAccount: client, node: node-b, workloadIps: ["10.1.0.9"]}
  - {uid: old, name: old, namespace: legacy, serviceAccount: client, workloadIps: ["10.1.0.10"]}
"#;
    let path = std::env::temp_dir().join("request-inputs-trust.yaml");
    waypoint::config::load_str(&path, text, 1)
        .unwrap_or_else(|e| panic!("{e}"))
        .mesh
        .unwrap()
}

#[test]
fn r15_forwarded_for_is_believed_only_from_the_hop_that_captured_the_client() {
    let model = trust_model();
    let ztunnel = id("istio-system", "ztunnel");
    let client = id("app", "client");
    let other = id("app", "intruder");
    let legacy = Identity::new("cluster.local", "legacy", "client");
    let a = |s: &str| s.parse::<IpAddr>().unwrap();
    // (peer identity, peer address, for=, believed source)
    let table: &[(Option<&Identity>, &str, Option<&str>, &str)] = &[
        // No for=: the peer.
        (Some(&client), "127.0.0.1", None, "127.0.0.1"),
        // The client's ztunnel speaking for it (its certificate is the client's).
        (Some(&client), "127.0.0.1", Some("10.1.0.7"), "10.1.0.7"),
        // Another identity claiming that client: its own address (finding #2).
        (Some(&other), "127.0.0.1", Some("10.1.0.7"), "127.0.0.1"),
        // An address the model does not know, from a workload identity: the peer.
        (Some(&client), "127.0.0.1", Some("192.0.2.1"), "127.0.0.1"),
        // A workload that is not captured (no ztunnel speaks for it).
        (Some(&legacy), "127.0.0.1", Some("10.1.0.10"), "127.0.0.1"),
        // The model names the client's node's ztunnel: only from there (or the client).
        (Some(&client), "192.168.0.2", Some("10.1.0.9"), "10.1.0.9"),
        (Some(&client), "10.1.0.9", Some("10.1.0.9"), "10.1.0.9"),
        (
            Some(&client),
            "192.168.0.3",
            Some("10.1.0.9"),
            "192.168.0.3",
        ),
        // A ztunnel's hairpin (R12): any client.
        (
            Some(&ztunnel),
            "192.168.0.3",
            Some("192.0.2.1"),
            "192.0.2.1",
        ),
        (Some(&ztunnel), "192.168.0.3", None, "192.168.0.3"),
        // No verified identity: the peer.
        (None, "127.0.0.1", Some("10.1.0.7"), "127.0.0.1"),
        // IPv4-mapped addresses are the IPv4 ones.
        (
            Some(&client),
            "::ffff:192.168.0.2",
            Some("10.1.0.9"),
            "10.1.0.9",
        ),
    ];
    for (peer, addr, fwd, want) in table {
        assert_eq!(
            client_ip(Some(&model), *peer, a(addr), fwd.map(a), &ztunnel),
            a(want),
            "{peer:?} from {addr} for {fwd:?}"
        );
    }
    // Without a model only a ztunnel's for= is believed.
    assert_eq!(
        client_ip(
            None,
            Some(&client),
            a("127.0.0.1"),
            Some(a("10.1.0.7")),
            &ztunnel
        ),
        a("127.0.0.1")
    );
}

#[test]
fn telemetry_workload_and_namespace_come_from_the_identity_and_model_not_baggage() {
    let model = trust_model();
    let ztunnel = id("istio-system", "ztunnel");
    let client = id("app", "client");
    let a = |s: &str| s.parse::<IpAddr>().unwrap();
    let lie = Baggage::parse("k8s.namespace.name=kube-system,k8s.deployment.name=admin");
    let named = Baggage::parse("k8s.namespace.name=app,k8s.deployment.name=client-app");
    let none = Baggage::default();
    let pair = |w: &str, n: &str| (w.to_string(), n.to_string());
    // The model's workload at the address, running as the identity: baggage is ignored.
    assert_eq!(
        workload_of(Some(&model), Some(&client), a("10.1.0.7"), &ztunnel, &lie),
        pair("c7", "app")
    );
    // Unknown address: the identity's namespace; baggage names the workload only within it.
    assert_eq!(
        workload_of(Some(&model), Some(&client), a("127.0.0.1"), &ztunnel, &lie),
        pair("unknown", "app")
    );
    assert_eq!(
        workload_of(
            Some(&model),
            Some(&client),
            a("127.0.0.1"),
            &ztunnel,
            &named
        ),
        pair("client-app", "app")
    );
    // A workload at the address running as someone else is not the client.
    let other = id("other", "x");
    assert_eq!(
        workload_of(Some(&model), Some(&other), a("10.1.0.7"), &ztunnel, &none),
        pair("unknown", "other")
    );
    // A ztunnel's hairpin: the model's workload at the (believed) client address.
    assert_eq!(
        workload_of(Some(&model), Some(&ztunnel), a("10.1.0.9"), &ztunnel, &lie),
        pair("c9", "app")
    );
    assert_eq!(
        workload_of(Some(&model), Some(&ztunnel), a("192.0.2.1"), &ztunnel, &lie),
        pair("unknown", "unknown")
    );
}

// ------------------------------------------------------------------ through the waypoint

/// The rules of the waypoint's DENY policy ([`wp_deny`]).
const DENY_RULES: &str = r#"  - to: [{operation: {paths: ["/admin*"]}}]
  # The client 10.1.0.7 (believed from its ztunnel) may not reach /remote, whatever
  # X-Forwarded-For says.
  - from: [{source: {remoteIpBlocks: ["10.1.0.7/32"]}}]
    to: [{operation: {paths: ["/remote*"]}}]
  # The tunnel's own address (the test process on loopback) may not reach /peer.
  - from: [{source: {ipBlocks: ["127.0.0.1/32"]}}]
    to: [{operation: {paths: ["/peer*"]}}]
  # A client a ztunnel hairpins (R12) may not reach /hairpin.
  - from: [{source: {ipBlocks: ["192.0.2.9/32"]}}]
    to: [{operation: {paths: ["/hairpin*"]}}]
"#;

struct Mesh {
    waypoint: SocketAddr,
    ca: Arc<SigningCa>,
    /// Request targets the backend saw.
    seen: mpsc::Receiver<String>,
    /// Request targets the HTTP/2 backend (Service `grpcish`) saw.
    h2seen: mpsc::Receiver<String>,
    _zt: Ztunnel,
    handle: Option<waypoint::service::Handle>,
    shutdown: runtime::Shutdown,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown.drain(Duration::from_millis(200));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A keep-alive HTTP/1.1 backend answering `<target> xff=<x-forwarded-for>`.
fn backend(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let addr = serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let _ = tx.send(req.path.clone());
            let xff = req.header("x-forwarded-for").unwrap_or_default();
            let body = format!("{} xff={xff}", req.path);
            if c.write_all(ok_response(&body).as_bytes()).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// `useClientProtocol` for `grpcish`: HTTP/2 clients get HTTP/2 upstream.
const USE_CLIENT_PROTOCOL: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: grpcish, namespace: app}\nspec:\n  host: grpcish\n  trafficPolicy:\n    connectionPool:\n      http: {useClientProtocol: true}\n";

/// An HTTP/2 (prior knowledge) backend answering `h2 <path and query>`.
fn h2_backend(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<String>) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        block_on(async move {
            let l = monoio::net::TcpListener::from_std(l).unwrap();
            while let Ok((tcp, _)) = l.accept().await {
                let tx = tx.clone();
                monoio::spawn(async move {
                    let io = monoio::io::IntoPollIo::into_poll_io(tcp).unwrap();
                    let Ok(mut conn) = h2::server::handshake(io).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let target = req.uri().path_and_query().unwrap().to_string();
                        let _ = tx.send(target.clone());
                        let resp = http::Response::builder().status(200).body(()).unwrap();
                        let mut body = respond.send_response(resp, false).unwrap();
                        let _ = body.send_data(Bytes::from(format!("h2 {target}")), true);
                    }
                });
            }
        })
    });
    (addr, rx)
}

impl Mesh {
    fn start() -> Mesh {
        let (net, zl) = bind_node_ztunnel(11);
        let ca = Arc::new(SigningCa::generate_root("cluster.local").unwrap().0);
        let zt = stand_in_ztunnel(
            zl,
            &ca.issue(&id("app", "echo"), SystemTime::now()).unwrap(),
        );
        let (pod, seen) = backend(ip(net, 2));
        let model = app_model(
            ip(net, 1),
            &format!(
                "  - {{uid: e1, name: e1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/echo.app.svc.cluster.local\": {{80: {}}}}}}}\n",
                pod.ip(),
                pod.port()
            ),
            "  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n",
        );
        let (h2pod, h2seen) = h2_backend(ip(net, 3));
        let model = model.replace(
            "services:\n",
            &format!(
                "  - {{uid: g1, name: g1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/grpcish.app.svc.cluster.local\": {{80: {}}}}}}}\nservices:\n  - {{name: grpcish, namespace: app, hostname: grpcish.app.svc.cluster.local, vips: [\"10.96.0.7\"], ports: {{80: 8080}}}}\n",
                h2pod.ip(),
                h2pod.port()
            ),
        );
        let policies = wp_deny("deny", DENY_RULES);
        let text = format!("{model}---\n{policies}---\n{USE_CLIENT_PROTOCOL}");
        let (handle, shutdown) =
            start_service(&ca, &text, &format!("waypoint-request-inputs-{net}.yaml"));
        Mesh {
            waypoint: handle.addr,
            ca,
            seen,
            h2seen,
            _zt: zt,
            handle: Some(handle),
            shutdown,
        }
    }

    fn cert(&self, ns: &str, sa: &str) -> WorkloadCert {
        self.ca.issue(&id(ns, sa), SystemTime::now()).unwrap()
    }

    fn counters(&self) -> &waypoint::service::Counters {
        &self.handle.as_ref().unwrap().counters
    }

    /// A tunnel to the `echo` Service as `cert`, saying `forwarded: for=` `from`.
    async fn tunnel(
        &self,
        cert: &WorkloadCert,
        from: Option<Ipv4Addr>,
    ) -> (hbone::client::Client, H2Stream) {
        self.tunnel_to(cert, from, "10.96.0.1:80").await
    }

    /// [`Mesh::tunnel`] to Service address `target`.
    async fn tunnel_to(
        &self,
        cert: &WorkloadCert,
        from: Option<Ipv4Addr>,
        target: &str,
    ) -> (hbone::client::Client, H2Stream) {
        let c = connect(self.waypoint, cert, id("app", "waypoint"))
            .await
            .unwrap();
        let mut req = ConnectRequest::new(target.parse().unwrap());
        req.forwarded_for = from.map(IpAddr::V4);
        let s = c.open(&req).await.unwrap();
        (c, s)
    }

    /// Each raw HTTP/1.1 request on one tunnel as `cert` for `from`: (status, body).
    fn http1(
        &self,
        cert: &WorkloadCert,
        from: Option<Ipv4Addr>,
        reqs: &[&str],
    ) -> Vec<(u16, String)> {
        block_on(async {
            let (_c, mut s) = self.tunnel(cert, from).await;
            let mut buf = Vec::new();
            let mut out = Vec::new();
            for r in reqs {
                s.write_all(Bytes::from(r.to_string()), false)
                    .await
                    .unwrap();
                let resp = read_response(&mut s, &mut buf).await;
                out.push((resp.status, resp.text()));
            }
            out
        })
    }

    fn seen(&self) -> Vec<String> {
        self.seen.try_iter().collect()
    }
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);

fn get(target: &str) -> String {
    common::get(target, "echo.app.svc.cluster.local")
}

#[test]
fn r15_deny_by_path_is_not_dodged_by_dot_segments_or_escapes_over_http1() {
    let m = Mesh::start();
    let client = m.cert("app", "client");
    let dodges = [
        "/x/../admin",
        "/./admin",
        "/%2e%2e/admin",
        "/x/%2E%2E/admin",
        "/x/.%2e/admin/users",
        "/%61dmin",
        "/x\\..\\admin",
    ];
    let reqs: Vec<String> = dodges.iter().map(|p| get(p)).collect();
    let reqs: Vec<&str> = reqs.iter().map(String::as_str).collect();
    for (path, (status, body)) in dodges.iter().zip(m.http1(&client, Some(CLIENT), &reqs)) {
        assert_eq!(
            (status, body.as_str()),
            (403, "RBAC: access denied"),
            "{path}"
        );
    }
    assert!(m.seen().is_empty(), "a denied request reached the backend");
    // Allowed requests go upstream normalized, the query as sent.
    let r = m.http1(
        &client,
        Some(CLIENT),
        &[
            &get("/x/./ok/../fine?a=/../b&c=%2e%2e"),
            &get("/%7Euser/%2e/x%2Fy"),
        ],
    );
    assert_eq!(r[0], (200, "/x/fine?a=/../b&c=%2e%2e xff=10.1.0.7".into()));
    assert_eq!(r[1], (200, "/~user/x%2Fy xff=10.1.0.7".into()));
    // A path that cannot be normalized is a bad request, counted.
    let r = m.http1(&client, Some(CLIENT), &[&get("/a%00")]);
    assert_eq!(r[0].0, 400);
    assert_eq!(m.counters().bad_requests.load(Ordering::Relaxed), 1);
    assert_eq!(
        m.seen(),
        ["/x/fine?a=/../b&c=%2e%2e", "/~user/x%2Fy"].map(String::from)
    );
}

/// An HTTP/2 client inside a tunnel to the `echo` Service.
async fn h2_client(
    m: &Mesh,
    cert: &WorkloadCert,
) -> (hbone::client::Client, h2::client::SendRequest<Bytes>) {
    h2_client_to(m, cert, "10.96.0.1:80").await
}

/// An HTTP/2 client inside a tunnel to Service address `target`.
async fn h2_client_to(
    m: &Mesh,
    cert: &WorkloadCert,
    target: &str,
) -> (hbone::client::Client, h2::client::SendRequest<Bytes>) {
    let (c, s) = m.tunnel_to(cert, Some(CLIENT), target).await;
    let io = waypoint::inner::StreamIo::new(s, Bytes::new());
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    monoio::spawn(async move {
        let _ = conn.await;
    });
    (c, send)
}

async fn h2_get(client: &h2::client::SendRequest<Bytes>, path: &str) -> (u16, String) {
    h2_get_from(client, "echo.app.svc.cluster.local", path).await
}

#[test]
fn r15_deny_by_path_is_not_dodged_by_dot_segments_or_escapes_over_http2() {
    let m = Mesh::start();
    let client = m.cert("app", "client");
    block_on(async {
        let (_c, send) = h2_client(&m, &client).await;
        for path in [
            "/x/../admin",
            "/./admin",
            "/%2e%2e/admin",
            "/x/%2e%2E/admin",
        ] {
            assert_eq!(
                h2_get(&send, path).await,
                (403, "RBAC: access denied".into()),
                "{path}"
            );
        }
        assert_eq!(
            h2_get(&send, "/x/./ok/../fine?q=/../z").await,
            (200, "/x/fine?q=/../z xff=10.1.0.7".into())
        );
        assert_eq!(h2_get(&send, "/a%00").await.0, 400);
    });
    assert_eq!(m.seen(), ["/x/fine?q=/../z"].map(String::from));
    assert_eq!(m.counters().bad_requests.load(Ordering::Relaxed), 1);
}

/// The HTTP/2 upstream (`useClientProtocol`) gets the normalized path too, the query as
/// sent; the denial comes first.
#[test]
fn r15_http2_upstream_gets_the_normalized_path() {
    let m = Mesh::start();
    let client = m.cert("app", "client");
    let host = "grpcish.app.svc.cluster.local";
    block_on(async {
        let (_c, send) = h2_client_to(&m, &client, "10.96.0.7:80").await;
        assert_eq!(h2_get_from(&send, host, "/x/%2e%2e/admin").await.0, 403);
        assert_eq!(
            h2_get_from(&send, host, "/a/./b/../%63?q=/../z").await,
            (200, "h2 /a/c?q=/../z".into())
        );
        assert_eq!(
            h2_get_from(&send, host, "/plain?x=1").await,
            (200, "h2 /plain?x=1".into())
        );
    });
    let seen: Vec<String> = m.h2seen.try_iter().collect();
    assert_eq!(seen, ["/a/c?q=/../z", "/plain?x=1"]);
}

#[test]
fn r15_remote_ip_blocks_ignore_a_spoofed_x_forwarded_for() {
    let m = Mesh::start();
    let client = m.cert("app", "client");
    let host = "echo.app.svc.cluster.local";
    let r = m.http1(
        &client,
        Some(CLIENT),
        &[
            &get("/remote"),
            &format!("GET /remote HTTP/1.1\r\nhost: {host}\r\nx-forwarded-for: 192.0.2.1\r\n\r\n"),
            &format!("GET /other HTTP/1.1\r\nhost: {host}\r\nx-forwarded-for: 192.0.2.1\r\n\r\n"),
        ],
    );
    assert_eq!(r[0].0, 403);
    assert_eq!(
        r[1].0, 403,
        "a spoofed X-Forwarded-For dodged remoteIpBlocks"
    );
    // The header still goes upstream, the client appended.
    assert_eq!(r[2], (200, "/other xff=192.0.2.1, 10.1.0.7".into()));
}

#[test]
fn r15_ip_blocks_ignore_a_spoofed_forwarded_for_from_another_identity() {
    let m = Mesh::start();
    // Another mesh identity claims to tunnel for client 10.1.0.7: its own address counts.
    let intruder = m.cert("app", "intruder");
    let r = m.http1(&intruder, Some(CLIENT), &[&get("/peer"), &get("/other")]);
    assert_eq!(r[0].0, 403, "a spoofed forwarded: for= dodged ipBlocks");
    assert_eq!(r[1], (200, "/other xff=127.0.0.1".into()));
    // The client's own ztunnel (its certificate) is believed: 10.1.0.7, not the loopback.
    let client = m.cert("app", "client");
    let r = m.http1(&client, Some(CLIENT), &[&get("/peer")]);
    assert_eq!(r[0], (200, "/peer xff=10.1.0.7".into()));
    // A ztunnel's hairpin is believed for any client.
    let ztunnel = m.cert("istio-system", "ztunnel");
    let hairpinned = Some(Ipv4Addr::new(192, 0, 2, 9));
    let r = m.http1(&ztunnel, hairpinned, &[&get("/hairpin"), &get("/peer")]);
    assert_eq!(r[0].0, 403);
    assert_eq!(r[1], (200, "/peer xff=192.0.2.9".into()));
}

#[test]
fn http1_1_without_host_is_400_and_counted() {
    let m = Mesh::start();
    let client = m.cert("app", "client");
    let r = m.http1(
        &client,
        Some(CLIENT),
        &["GET /a HTTP/1.1\r\naccept: */*\r\n\r\n"],
    );
    assert_eq!(r[0].0, 400);
    assert_eq!(m.counters().bad_requests.load(Ordering::Relaxed), 1);
    assert!(m.seen().is_empty());
}

/// One HTTP/2 GET of `/x` sent as raw frames (the `h2` client cannot leave `:authority`
/// out of a request with a `:scheme`): `host`, when given, as a header. Returns the
/// response's `:status` (`400` and `200` are HPACK static entries 12 and 8).
async fn raw_h2_get(m: &Mesh, cert: &WorkloadCert, host: Option<&str>) -> u16 {
    let (_c, mut s) = m.tunnel(cert, Some(CLIENT)).await;
    let mut block = vec![0x82, 0x86, 0x04, 0x02, b'/', b'x']; // GET, http, :path /x
    if let Some(h) = host {
        block.extend_from_slice(&[0x0f, 0x17, h.len() as u8]); // `host` (static 38)
        block.extend_from_slice(h.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    let len = block.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[1, 0x05, 0, 0, 0, 1]); // HEADERS, END_STREAM|END_HEADERS, 1
    out.extend_from_slice(&block);
    s.write_all(Bytes::from(out), false).await.unwrap();
    let mut buf = Vec::new();
    loop {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, stream) = (buf[3], u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]));
            if kind == 1 && stream == 1 {
                return match buf[9] {
                    0x8c => 400,
                    0x88 => 200,
                    b => panic!("unexpected :status encoding {b:#x}"),
                };
            }
            assert!(
                kind != 3 && kind != 7,
                "stream reset or GOAWAY: {:?}",
                &buf[..9 + len]
            );
            buf.drain(..9 + len);
        }
        match s.read().await {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            other => panic!("tunnel ended before the response: {other:?}"),
        }
    }
}

#[test]
fn http2_without_authority_and_host_is_400_and_counted() {
    let m = Mesh::start();
    let client = m.cert("app", "client");
    block_on(async {
        assert_eq!(raw_h2_get(&m, &client, None).await, 400);
        assert_eq!(
            raw_h2_get(&m, &client, Some("echo.app.svc.cluster.local")).await,
            200
        );
    });
    assert_eq!(m.counters().bad_requests.load(Ordering::Relaxed), 1);
    assert_eq!(m.seen(), ["/x"].map(String::from));
}
