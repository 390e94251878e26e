//! Telemetry metrics `tagOverrides` through the waypoint on real sockets, as Istio users
//! write them: a label added with a CEL value per request (`request.host`, a header), a
//! standard label's value replaced, one removed (its series merged), each for the metrics
//! it names only (R15).

mod common;

use common::{echo_node, ip};

/// The series of `metric` on the page: each its labels (name → value) and value.
fn series(page: &str, metric: &str) -> Vec<(Vec<(String, String)>, String)> {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .map(|kv| {
                    let (k, v) = kv.split_once("=\"").expect(l);
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            Some((labels, value.to_string()))
        })
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn r15_metric_tag_overrides_add_replace_and_remove_labels() {
    let (net, ca, _zt) = echo_node(59);
    let pod = common::backend_404_on_missing(ip(net, 2));
    let model = common::echo_model(ip(net, 1), pod);
    // Mesh-wide: REQUEST_COUNT gets `request_host` and `tenant`, loses `response_code`;
    // the namespace's Telemetry replaces `request_protocol` for every metric and takes
    // `tenant` back out of REQUEST_COUNT (the more specific one wins, tag by tag).
    let telemetry = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_COUNT}
      tagOverrides:
        request_host: {value: "request.host"}
        tenant: {value: "request.headers['x-tenant']"}
        response_code: {operation: REMOVE}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: app, namespace: app}
spec:
  metrics:
  - overrides:
    - tagOverrides:
        request_protocol: {operation: UPSERT, value: "'custom'"}
    - match: {metric: REQUEST_COUNT, mode: SERVER}
      tagOverrides:
        tenant: {operation: REMOVE}
"#;
    let text = format!("{model}---\n{telemetry}");
    let wp = common::Waypoint::with_stats(&ca, &text, &format!("waypoint-metric-tags-{net}.yaml"));
    let get = |path: &str, host: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nx-tenant: t1\r\n\r\n")
    };
    let got = common::http1_on_tunnel(
        wp.addr,
        &wp.client_cert,
        "10.96.0.1:80",
        std::net::Ipv4Addr::new(10, 1, 0, 7),
        &[
            get("/ok", "echo.app.svc.cluster.local"),
            get("/missing", "echo.app.svc.cluster.local"),
            get("/ok", "echo.app"),
        ],
    );
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404, 200]);
    let page = common::prometheus_page(wp.handle().stats_addr().unwrap());

    // REQUEST_COUNT: by host, no response_code (the 200 and the 404 of one host are one
    // series), no tenant, request_protocol replaced where it stands.
    let counts = series(&page, "istio_requests_total");
    assert_eq!(counts.len(), 2, "{page}");
    let mut by_host: Vec<(String, String)> = counts
        .iter()
        .map(|(l, v)| {
            (
                label(l, "request_host").expect("request_host").to_string(),
                v.clone(),
            )
        })
        .collect();
    by_host.sort();
    assert_eq!(
        by_host,
        [
            ("echo.app".to_string(), "1".to_string()),
            ("echo.app.svc.cluster.local".to_string(), "2".to_string())
        ]
    );
    for (l, _) in &counts {
        assert_eq!(label(l, "response_code"), None, "{l:?}");
        assert_eq!(label(l, "tenant"), None, "{l:?}");
        assert_eq!(label(l, "request_protocol"), Some("custom"), "{l:?}");
        assert_eq!(label(l, "reporter"), Some("waypoint"));
        // The added label comes last, the replaced one where it stood.
        assert_eq!(l.last().unwrap().0, "request_host");
        let names: Vec<&str> = l.iter().map(|(k, _)| k.as_str()).collect();
        let at = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(
            at("request_protocol") < at("grpc_response_status"),
            "{names:?}"
        );
    }

    // REQUEST_DURATION: Istio's labels but request_protocol; one series per response code.
    let counts = series(&page, "istio_request_duration_milliseconds_count");
    let mut codes: Vec<(String, String)> = counts
        .iter()
        .map(|(l, v)| (label(l, "response_code").unwrap().to_string(), v.clone()))
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            ("200".to_string(), "2".to_string()),
            ("404".to_string(), "1".to_string())
        ]
    );
    for (l, _) in &counts {
        assert_eq!(label(l, "request_host"), None);
        assert_eq!(label(l, "request_protocol"), Some("custom"));
    }
}
