//! Telemetry `accessLogging` with a CEL `filter.expression` (as Istio's docs write it, to
//! log only failures), through the waypoint on real sockets: only the requests the filter
//! matches leave an access line (R15).

mod common;

use std::sync::mpsc;

use common::{access_lines, echo_node, ip, Capture};

#[test]
fn r15_access_log_filter_logs_only_the_requests_it_matches() {
    let (tx, rx) = mpsc::channel();
    tracing::subscriber::set_global_default(Capture(tx)).unwrap();
    let (net, ca, _zt) = echo_node(43);
    let pod = common::backend_404_on_missing(ip(net, 2));
    let model = common::echo_model(ip(net, 1), pod);
    let telemetry = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}]
    filter:
      expression: "response.code >= 400 || request.headers['x-debug'] == 'on'"
"#;
    let text = format!("{model}---\n{telemetry}");
    let wp = common::Waypoint::with_stats(&ca, &text, &format!("waypoint-log-filter-{net}.yaml"));
    let get = common::echo_get;
    let got = common::http1_on_tunnel(
        wp.addr,
        &wp.client_cert,
        "10.96.0.1:80",
        std::net::Ipv4Addr::new(10, 1, 0, 7),
        &[
            get("/ok", ""),
            get("/missing", ""),
            get("/debugged", "x-debug: on\r\n"),
            get("/ok", ""),
            get("/missing", "x-last: 1\r\n"),
        ],
    );
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404, 200, 200, 404]);
    // One worker writes the lines in request order: a line of an unmatched request would
    // come before the last one's.
    let lines = access_lines(&rx, 3);
    let field = |l: &common::Line, k: &str| {
        l.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.trim_matches('"').to_string())
            .unwrap()
    };
    let seen: Vec<(String, String)> = lines
        .iter()
        .map(|l| (field(l, "path"), field(l, "status")))
        .collect();
    assert_eq!(
        seen,
        [
            ("/missing".to_string(), "404".to_string()),
            ("/debugged".to_string(), "200".to_string()),
            ("/missing".to_string(), "404".to_string()),
        ]
    );
}
