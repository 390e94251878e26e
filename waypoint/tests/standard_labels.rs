//! Istio's standard labels on the waypoint's request metrics (review #8): source_/
//! destination_ app, version, canonical_service, canonical_revision, cluster and
//! `grpc_response_status`, beside the rest, read from the stats page of a running waypoint
//! after requests through it (client → waypoint → stand-in ztunnel → backend).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use common::{
    block_on, connect, echo_node, get, id, ip, named_backend, read_response, start_with_stats,
    stats_page,
};
use hbone::ca::CertSource;
use hbone::wire::ConnectRequest;

/// The labels of the `istio_requests_total` line whose labels contain all of `with`.
fn requests_line<'a>(page: &'a str, with: &[&str]) -> &'a str {
    page.lines()
        .find(|l| l.starts_with("istio_requests_total{") && with.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no istio_requests_total with {with:?} in\n{page}"))
}

#[test]
fn telemetry_standard_labels_name_app_version_canonical_service_and_cluster() {
    let (net, ca, _zt) = echo_node(17);
    let now = SystemTime::now();
    let (b1, b2) = (
        named_backend(ip(net, 2), "ok"),
        named_backend(ip(net, 3), "ok"),
    );
    let workloads = format!(
        r#"  - name: curl-5d8f
    namespace: app
    serviceAccount: client
    workloadIps: ["10.1.0.9"]
    workloadName: curl
    clusterId: east
    labels: {{app: curl, version: v7}}
  - name: echo-1
    namespace: app
    serviceAccount: echo
    node: node-b
    workloadIps: ["{e1}"]
    clusterId: west
    canonicalName: echo-svc
    canonicalRevision: "2024.1"
    labels: {{app: echo, version: v1}}
    services: {{"app/echo.app.svc.cluster.local": {{80: {p1}}}}}
  - name: echo-2
    namespace: app
    serviceAccount: echo
    node: node-b
    workloadIps: ["{e2}"]
    labels: {{app.kubernetes.io/name: echo-k8s, app.kubernetes.io/version: "3.1"}}
    services: {{"app/echo2.app.svc.cluster.local": {{80: {p2}}}}}
"#,
        e1 = b1.ip(),
        p1 = b1.port(),
        e2 = b2.ip(),
        p2 = b2.port(),
    );
    let model = common::app_model(
        ip(net, 1),
        &workloads,
        r#"  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {80: 8080}}
  - {name: echo2, namespace: app, hostname: echo2.app.svc.cluster.local, vips: ["10.96.0.2"], ports: {80: 8080}}
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
    let cfg = waypoint::config::load_str(std::path::Path::new("labels.yaml"), &text, 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let (handle, shutdown) = start_with_stats(&ca, cfg);
    let waypoint = handle.addr;
    let cert = ca.issue(&id("app", "client"), now).unwrap();
    let results = block_on(async move {
        let c = connect(waypoint, &cert, id("app", "waypoint"))
            .await
            .unwrap();
        let mut out = Vec::new();
        for (vip, host, path) in [
            ("10.96.0.1:80", "echo.app.svc.cluster.local", "/"),
            ("10.96.0.1:80", "echo.app.svc.cluster.local", "/admin"),
            ("10.96.0.2:80", "echo2.app.svc.cluster.local", "/"),
        ] {
            let mut req = ConnectRequest::new(vip.parse().unwrap());
            req.forwarded_for = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 9)));
            let mut s = c.open(&req).await.unwrap();
            s.write_all(bytes::Bytes::from(get(path, host)), false)
                .await
                .unwrap();
            out.push(read_response(&mut s, &mut Vec::new()).await.status);
        }
        out
    });
    assert_eq!(results, [200, 403, 200]);
    let page = stats_page(&handle);
    // The client: its `app`/`version` labels, canonical service/revision derived from them
    // as istiod does (no canonicalName given), its cluster.
    let source = "source_workload=\"curl\",source_canonical_service=\"curl\",source_canonical_revision=\"v7\",source_workload_namespace=\"app\",source_principal=\"spiffe://cluster.local/ns/app/sa/client\",source_app=\"curl\",source_version=\"v7\",source_cluster=\"east\"";
    // echo-1: explicit canonical names, app/version from its labels, cluster `west`.
    let line = requests_line(
        &page,
        &["response_code=\"200\"", "destination_service_name=\"echo\""],
    );
    assert!(line.contains(source), "{line}");
    assert!(
        line.contains("destination_workload=\"echo-1\",destination_workload_namespace=\"app\",destination_principal=\"spiffe://cluster.local/ns/app/sa/echo\",destination_app=\"echo\",destination_version=\"v1\",destination_service=\"echo.app.svc.cluster.local\",destination_canonical_service=\"echo-svc\",destination_canonical_revision=\"2024.1\",destination_service_name=\"echo\",destination_service_namespace=\"app\",destination_cluster=\"west\""),
        "{line}"
    );
    assert!(
        line.contains("request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"mutual_tls\""),
        "{line}"
    );
    assert!(line.ends_with("} 1"), "{line}");
    // echo-2: app.kubernetes.io labels give canonical service and revision; no `app` or
    // `version` label: those follow the canonical ones (as Istio's ztunnel); no cluster.
    let line = requests_line(&page, &["destination_service_name=\"echo2\""]);
    assert!(line.contains(source), "{line}");
    assert!(
        line.contains("destination_app=\"echo-k8s\",destination_version=\"3.1\",destination_service=\"echo2.app.svc.cluster.local\",destination_canonical_service=\"echo-k8s\",destination_canonical_revision=\"3.1\""),
        "{line}"
    );
    assert!(line.contains("destination_cluster=\"unknown\""), "{line}");
    // Denied before routing: no destination workload, every one of its labels `unknown`.
    let line = requests_line(&page, &["response_code=\"403\""]);
    assert!(line.contains(source), "{line}");
    assert!(
        line.contains("destination_workload=\"unknown\",destination_workload_namespace=\"unknown\",destination_principal=\"unknown\",destination_app=\"unknown\",destination_version=\"unknown\",destination_service=\"echo.app.svc.cluster.local\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"unknown\",destination_service_name=\"echo\",destination_service_namespace=\"app\",destination_cluster=\"unknown\""),
        "{line}"
    );
    // The same labels on the histograms.
    for metric in [
        "istio_request_duration_milliseconds_count{",
        "istio_request_bytes_count{",
        "istio_response_bytes_count{",
    ] {
        assert!(
            page.lines().any(|l| l.starts_with(metric)
                && l.contains(source)
                && l.contains("destination_cluster=\"west\"")),
            "{metric} in\n{page}"
        );
    }
    shutdown.drain(Duration::from_millis(200));
    let _ = handle.join();
}
