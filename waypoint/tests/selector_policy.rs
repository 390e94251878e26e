//! AuthorizationPolicy `selector` in ambient mode, where Istio enforces it (review #3):
//! Istio's waypoints never apply `selector` policies (only `targetRefs` ones); the
//! destination's ztunnel does, at L4, and traffic through a waypoint reaches it with the
//! waypoint's identity ("Selector | waypoint | destination ztunnel" in Istio's L4 policy
//! docs).
//!
//! * The waypoint loads such a policy (and a namespace-wide one: no `targetRefs` either),
//!   warns and shows it as `waypoint_policies_ignored` (document and line) on its stats
//!   page; it is not in its enforced set.
//! * The real ztunnel (in process, on loopback), given the same selector as a mesh-model
//!   policy, denies a CONNECT from the waypoint's identity to a pod whose labels match and
//!   lets one to a pod whose labels do not through, bytes echoed.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{
    block_on, connect, id, prometheus_page, serve_threads, start_with_stats, stats_page, test_dir,
};
use hbone::ca::{CertSource, SigningCa};
use hbone::wire::ConnectRequest;
use hbone::HboneError;

const SELECTOR_DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-echo, namespace: app}
spec:
  selector:
    matchLabels: {app: echo}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/app/sa/wp]}}]
"#;

/// Istio's "only through my waypoint" policy for ztunnel: namespace-wide (no selector, no
/// targetRefs). Enforced at the waypoint it would deny every client.
const NAMESPACE_ALLOW: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-from-waypoint, namespace: app}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/app/sa/waypoint]}}]
"#;

/// A workload-selector RequestAuthentication: a sidecar's, not a waypoint's.
const SELECTOR_JWT: &str = r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt-echo, namespace: app}
spec:
  selector:
    matchLabels: {app: echo}
  jwtRules:
  - issuer: https://idp.example
    jwks: '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'
"#;

/// The waypoint's file: the mesh model, then the selector policy (document 2), the
/// namespace-wide one (document 3) and the selector RequestAuthentication (document 4).
fn waypoint_file() -> String {
    let model = common::app_model(
        Ipv4Addr::new(127, 0, 0, 1),
        "  - {name: echo, namespace: app, workloadIps: [\"10.1.0.20\"], labels: {app: echo}}\n",
        "  []\n",
    );
    format!("{model}---\n{SELECTOR_DENY}---\n{NAMESPACE_ALLOW}---\n{SELECTOR_JWT}")
}

#[test]
fn r15_waypoint_ignores_selector_policies_and_says_so() {
    let text = waypoint_file();
    let cfg = waypoint::config::load_str(std::path::Path::new("w.yaml"), &text, 1).unwrap();
    assert!(cfg.policies.is_empty(), "{:?}", cfg.policies);
    assert!(cfg.request_authns.is_empty(), "{:?}", cfg.request_authns);
    assert_eq!(cfg.ignored_policies.len(), 3);
    let jwt = &cfg.ignored_policies[2];
    assert_eq!(
        (jwt.kind, jwt.id.name.as_str(), jwt.document, jwt.reason),
        ("RequestAuthentication", "jwt-echo", 4, "selector")
    );
    let ns = &cfg.ignored_policies[1];
    assert_eq!(
        (ns.id.name.as_str(), ns.document, ns.reason),
        ("only-from-waypoint", 3, "no_target_refs")
    );
    let p = &cfg.ignored_policies[0];
    assert_eq!(
        (
            p.id.namespace.as_str(),
            p.id.name.as_str(),
            p.document,
            p.reason
        ),
        ("app", "deny-echo", 2, "selector")
    );
    let line = text
        .lines()
        .position(|l| l.trim_start().starts_with("selector:"))
        .unwrap()
        + 1;
    assert_eq!(p.line, line);
    let ns_line = text
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == "spec:")
        .map(|(i, _)| i + 1)
        .nth(1)
        .unwrap();
    assert_eq!(ns.line, ns_line);
    // The pod's labels reach the model the waypoint checks targets with.
    let snap = cfg.mesh.as_ref().unwrap();
    let w = snap.workload("app/echo").unwrap();
    assert_eq!(w.labels.get("app").map(String::as_str), Some("echo"));

    // On the stats page of a running waypoint.
    let dir = test_dir("selector-stats");
    let ca = Arc::new(SigningCa::builtin(&dir.join("ca"), "cluster.local").unwrap());
    let (handle, shutdown) = start_with_stats(&ca, cfg);
    let body = stats_page(&handle);
    let want = format!(
        "waypoint_policies_ignored{{kind=\"AuthorizationPolicy\",policy=\"app/deny-echo\",document=\"2\",line=\"{line}\",reason=\"selector\"}} 1"
    );
    assert!(body.contains(&want), "{body}");
    assert!(
        body.contains(&format!(
            "waypoint_policies_ignored{{kind=\"AuthorizationPolicy\",policy=\"app/only-from-waypoint\",document=\"3\",line=\"{}\",reason=\"no_target_refs\"}} 1",
            ns_line
        )),
        "{body}"
    );
    assert!(
        body.contains("waypoint_policies_ignored{kind=\"RequestAuthentication\",policy=\"app/jwt-echo\",document=\"4\","),
        "{body}"
    );
    shutdown.drain(Duration::from_millis(200));
    let _ = handle.join();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP echo server on `ip` (any port), one thread per connection.
fn echo_pod(ip: Ipv4Addr) -> SocketAddr {
    serve_threads(ip, move |mut c| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 || c.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    })
}

#[test]
fn r9_destination_ztunnel_enforces_selector_deny_on_traffic_from_the_waypoint() {
    runtime::init_logging();
    let net = (20 + std::process::id() % 200) as u8;
    let ip = |h: u8| Ipv4Addr::new(127, net, 7, h);
    let (echo, db) = (echo_pod(ip(2)), echo_pod(ip(3)));
    let dir = test_dir("selector-ztunnel");
    let ca_dir = dir.join("ca");
    let ca = SigningCa::builtin(&ca_dir, "cluster.local").unwrap();
    let zt = ip(10);
    let file = dir.join("node-b.yaml");
    let config = format!(
        r#"ztunnel:
  node: node-b
  address: {zt}
  socks5: {zt}:0
  hbone: {zt}:0
  admin: {zt}:0
  stats: {zt}:0
  readiness: {zt}:0
  ca: {{builtin: {ca}}}
runtime: {{workers: 1, pin: false, drain_timeout: 1s}}
namespaces:
  - {{name: app, labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}}}
waypoints:
  - {{name: wp, namespace: app, address: "{wp}"}}
nodes:
  - {{name: node-b, ztunnel: {zt}}}
workloads:
  - {{name: echo, namespace: app, serviceAccount: echo, workloadIps: ["{e}"], node: node-b, labels: {{app: echo, version: v1}}}}
  - {{name: db, namespace: app, serviceAccount: db, workloadIps: ["{d}"], node: node-b, labels: {{app: db}}}}
policies:
  - name: deny-echo
    namespace: app
    action: Deny
    selector: {{matchLabels: {{app: echo}}}}
    rules: [[[{{principals: [cluster.local/ns/app/sa/wp]}}]]]
"#,
        ca = ca_dir.display(),
        wp = ip(100),
        e = echo.ip(),
        d = db.ip(),
    );
    std::fs::write(&file, config).unwrap();
    let profile = tuning::Profile::default();
    let loaded = ztunnel::config::load_file(&file, &profile, 1).unwrap_or_else(|e| panic!("{e}"));
    let h = ztunnel::start(loaded, None, runtime::Shutdown::new()).unwrap();
    let hbone_addr = h.addrs.hbone;
    // The waypoint's upstream leg: its own certificate, to the node's ztunnel.
    let cert = CertSource::issue(&ca, &id("app", "wp"), SystemTime::now()).unwrap();
    let ztunnel_id = id("istio-system", "ztunnel");
    let (to_echo, to_db) = block_on(async move {
        let c = connect(hbone_addr, &cert, ztunnel_id).await.unwrap();
        let to_echo = c
            .open(&ConnectRequest::new(echo))
            .await
            .map(|_| ())
            .map_err(|e| match e {
                HboneError::Status(s) => s.as_u16(),
                other => panic!("{other}"),
            });
        let mut s = c.open(&ConnectRequest::new(db)).await.unwrap();
        s.write_all(bytes::Bytes::from_static(b"ping"), false)
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            // A generous bound: a hang fails the test instead of blocking it.
            match monoio::time::timeout(Duration::from_secs(30), s.read()).await {
                Ok(Some(Ok(b))) => got.extend_from_slice(&b),
                other => panic!("db echo: {other:?}"),
            }
        }
        (to_echo, got)
    });
    assert_eq!(to_echo, Err(401), "the selector DENY was not enforced");
    assert_eq!(to_db, b"ping");
    let stats = prometheus_page(h.addrs.stats);
    assert!(
        stats.contains(
            "ztunnel_authorization_denied_total{transport=\"hbone\",policy=\"app/deny-echo\"} 1"
        ),
        "{stats}"
    );
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}
