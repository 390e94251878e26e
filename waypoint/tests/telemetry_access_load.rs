//! Many GETs on one keep-alive tunnel through a running waypoint, with the process's log
//! set up as the binaries do (`runtime::init_logging`: `RUST_LOG`, default `info`, so the
//! access log is on unless `RUST_LOG` turns it off). Checks every answer and that the
//! metrics count every request under one label set. `TELEMETRY_LOAD_REQUESTS` sets how
//! many (default 50): run under `valgrind --tool=callgrind` at two counts (with
//! `RUST_LOG=info` and `RUST_LOG=warn`), the difference divided by the difference of the
//! counts is the cost of one request, with and without its access line.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use common::{
    block_on, connect, echo_node, get, id, ip, named_backend, read_response, requests_in,
    start_with_stats, stats_page,
};
use hbone::ca::CertSource;
use hbone::wire::ConnectRequest;

#[test]
fn telemetry_access_load_counts_every_request_of_a_keep_alive_tunnel() {
    runtime::init_logging();
    let n: usize = std::env::var("TELEMETRY_LOAD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let (net, ca, _zt) = echo_node(29);
    let b1 = named_backend(ip(net, 2), "ok");
    let workloads = format!(
        r#"  - name: curl-5d8f
    namespace: app
    serviceAccount: client
    workloadIps: ["10.1.0.9"]
    workloadName: curl
  - name: echo-1
    namespace: app
    serviceAccount: echo
    node: node-b
    workloadIps: ["{e1}"]
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
    let cfg = waypoint::config::load_str(std::path::Path::new("load.yaml"), &model, 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let (handle, shutdown) = start_with_stats(&ca, cfg);
    let waypoint = handle.addr;
    let cert = ca.issue(&id("app", "client"), SystemTime::now()).unwrap();
    let ok = block_on(async move {
        let c = connect(waypoint, &cert, id("app", "waypoint"))
            .await
            .unwrap();
        let mut req = ConnectRequest::new("10.96.0.1:80".parse().unwrap());
        req.forwarded_for = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 9)));
        let mut s = c.open(&req).await.unwrap();
        let mut buf = Vec::new();
        let head = bytes::Bytes::from(get("/100", "echo.app.svc.cluster.local"));
        let mut ok = 0;
        for _ in 0..n {
            s.write_all(head.clone(), false).await.unwrap();
            ok += usize::from(read_response(&mut s, &mut buf).await.status == 200);
        }
        ok
    });
    assert_eq!(ok, n);
    // The last request is counted after its answer was sent: wait for it (generous bound).
    let mut page = String::new();
    for _ in 0..3000 {
        page = stats_page(&handle);
        if requests_in(&page, &["destination_workload=\"echo-1\""]) >= n as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let counted = requests_in(&page, &["destination_workload=\"echo-1\""]);
    assert_eq!(counted, n as u64, "{page}");
    shutdown.drain(Duration::from_millis(200));
    let _ = handle.join();
}
