//! The access log of requests whose label set a tunnel has already seen (counters and
//! access-log text kept with the tunnel's cached set) against the line of the request that
//! built the set from scratch: the same fields, byte for byte (only `duration_ms` differs
//! between requests), for a routed set, a denied one and a set seen again on a new
//! tunnel; and the metrics count each of them under the one label set.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use common::{
    access_lines as lines, block_on, connect, echo_node, id, ip, named_backend, read_response,
    requests_in, start_with_stats, stats_page, Capture,
};
use hbone::ca::CertSource;
use hbone::wire::ConnectRequest;

/// A line without its `duration_ms` (checked to be a quoted number with three decimals).
/// The line without the fields that differ between requests of the same set: its
/// duration (checked to be one) and its `request_id` (a new one each).
fn without_duration(l: &[(String, String)]) -> Vec<(String, String)> {
    let d = &l
        .iter()
        .find(|(k, _)| k == "duration_ms")
        .expect("duration_ms")
        .1;
    let t = d.trim_matches('"');
    assert!(
        d.starts_with('"')
            && t.split_once('.').is_some_and(|(i, f)| {
                !i.is_empty()
                    && f.len() == 3
                    && i.bytes().chain(f.bytes()).all(|b| b.is_ascii_digit())
            }),
        "{d}"
    );
    l.iter()
        .filter(|(k, _)| k != "duration_ms" && k != "request_id")
        .cloned()
        .collect()
}

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn telemetry_access_line_of_a_cached_label_set_is_the_line_built_from_scratch() {
    let (tx, rx) = mpsc::channel();
    tracing::subscriber::set_global_default(Capture(tx)).unwrap();
    let (net, ca, _zt) = echo_node(23);
    let now = SystemTime::now();
    let b1 = named_backend(ip(net, 2), "ok");
    let workloads = format!(
        r#"  - name: curl-5d8f
    namespace: app
    serviceAccount: client
    workloadIps: ["10.1.0.9"]
    workloadName: curl
    labels: {{app: curl, version: v7}}
  - name: echo-1
    namespace: app
    serviceAccount: echo
    node: node-b
    workloadIps: ["{e1}"]
    labels: {{app: echo, version: v1}}
    services: {{"app/echo.app.svc.cluster.local": {{80: {p1}}}}}
"#,
        e1 = b1.ip(),
        p1 = b1.port(),
    );
    let model = common::app_model(
        ip(net, 1),
        &workloads,
        r#"  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {80: 8080}}
"#,
    );
    let deny = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin"]}}]
"#;
    let text = format!("{model}---\n{deny}");
    let cfg = waypoint::config::load_str(std::path::Path::new("access.yaml"), &text, 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let (handle, shutdown) = start_with_stats(&ca, cfg);
    let waypoint = handle.addr;
    let cert = ca.issue(&id("app", "client"), now).unwrap();
    // Two tunnels, each: three GETs with a query, then three denied ones, on one
    // keep-alive connection.
    let paths = ["/p?q=a%20b&x=1", "/admin"];
    let statuses = block_on(async move {
        let c = connect(waypoint, &cert, id("app", "waypoint"))
            .await
            .unwrap();
        let mut out = Vec::new();
        for _tunnel in 0..2 {
            let mut req = ConnectRequest::new("10.96.0.1:80".parse().unwrap());
            req.forwarded_for = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 9)));
            let mut s = c.open(&req).await.unwrap();
            let mut buf = Vec::new();
            for path in paths {
                for _ in 0..3 {
                    let head = format!(
                        "GET {path} HTTP/1.1\r\nhost: echo.app.svc.cluster.local\r\ntraceparent: {TRACE}\r\n\r\n"
                    );
                    s.write_all(bytes::Bytes::from(head), false).await.unwrap();
                    out.push(read_response(&mut s, &mut buf).await.status);
                }
            }
        }
        out
    });
    assert_eq!(statuses, [200, 200, 200, 403, 403, 403].repeat(2));
    let got = lines(&rx, 12);
    for (tunnel, t) in got.chunks(6).enumerate() {
        for (set, reqs) in t.chunks(3).enumerate() {
            // The first request of a set on a tunnel built its labels; the others used
            // the tunnel's cached set. The second tunnel's first builds them again.
            let first = without_duration(&got[set * 3]);
            for (i, l) in reqs.iter().enumerate() {
                assert_eq!(without_duration(l), first, "tunnel {tunnel} set {set} #{i}");
            }
        }
    }
    let field = |l: &[(String, String)], k: &str| {
        l.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k} in {l:?}"))
    };
    let (ok, denied) = (&got[0], &got[3]);
    for (k, v) in [
        ("message", "request"),
        ("src_addr", "10.1.0.9"),
        ("src_workload", "curl"),
        ("src_namespace", "app"),
        ("src_identity", "spiffe://cluster.local/ns/app/sa/client"),
        ("dst_service", "echo.app.svc.cluster.local"),
        ("dst_workload", "echo-1"),
        ("dst_identity", "spiffe://cluster.local/ns/app/sa/echo"),
        ("protocol", "\"HTTP/1.1\""),
        ("method", "\"GET\""),
        ("authority", "\"echo.app.svc.cluster.local\""),
        ("path", "\"/p?q=a%20b&x=1\""),
        ("status", "200"),
        ("flags", "\"-\""),
    ] {
        assert_eq!(field(ok, k), v, "{k}");
    }
    assert_eq!(field(ok, "traceparent"), format!("{TRACE:?}"));
    // Each request's own `x-request-id` (the waypoint's: the client sent none), the
    // refused ones' too.
    let ids: std::collections::BTreeSet<String> =
        got.iter().map(|l| field(l, "request_id")).collect();
    assert_eq!(ids.len(), got.len(), "{ids:?}");
    assert!(
        ids.iter().all(|i| i.trim_matches('"').len() == 36),
        "{ids:?}"
    );
    assert_eq!(field(denied, "status"), "403");
    assert_eq!(field(denied, "path"), "\"/admin\"");
    assert_eq!(field(denied, "dst_workload"), "unknown");
    assert_eq!(field(denied, "dst_identity"), "unknown");
    assert_eq!(field(denied, "dst_service"), "echo.app.svc.cluster.local");
    // The metrics: each set's six requests under its one label set.
    let page = stats_page(&handle);
    let with = |code: &str, workload: &str| {
        requests_in(
            &page,
            &[
                &format!("response_code=\"{code}\""),
                &format!("destination_workload=\"{workload}\""),
                "source_workload=\"curl\"",
                "destination_service=\"echo.app.svc.cluster.local\"",
            ],
        )
    };
    assert_eq!(with("200", "echo-1"), 6, "{page}");
    assert_eq!(with("403", "unknown"), 6, "{page}");
    assert_eq!(
        page.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .count(),
        2,
        "{page}"
    );
    shutdown.drain(Duration::from_millis(200));
    let _ = handle.join();
}
