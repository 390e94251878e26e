//! Envoy-formatted access logs, configured as Istio users write them: MeshConfig
//! `accessLogFile` (the built-in `envoy` provider in Istio's default text format) and
//! `envoyFileAccessLog` extension providers (JSON `labels`, a custom `text` with
//! `omitEmptyValues`), named by a Telemetry with a filter. Real sockets through the
//! waypoint (R15); the files are read once the waypoint has stopped (its workers write
//! what they hold as they end).

mod common;

use std::io::Write;

use common::{echo_node, ip, next_request};

/// A backend answering `404` to `/missing`, else `200 <path>`.
fn backend(ip: std::net::Ipv4Addr) -> std::net::SocketAddr {
    common::serve_threads(ip, |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let resp = if req.path.starts_with("/missing") {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_string()
            } else {
                common::ok_response(&req.path)
            };
            if c.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    })
}

#[test]
fn r15_envoy_file_access_logs_in_istio_text_json_and_custom_formats() {
    let (net, ca, _zt) = echo_node(47);
    let pod = backend(ip(net, 2));
    let dir = common::TempDir(std::env::temp_dir().join(format!("access-log-format-{net}")));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let (mesh_log, json_log, custom_log) = (
        dir.0.join("mesh.log"),
        dir.0.join("json.log"),
        dir.0.join("custom.log"),
    );
    let model = common::app_model(
        ip(net, 1),
        &common::app_workload("echo", pod),
        "  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n",
    );
    let mesh_config = format!(
        r#"meshConfig:
  accessLogFile: {mesh}
  extensionProviders:
  - name: json
    envoyFileAccessLog:
      path: {json}
      logFormat:
        labels:
          method: "%REQ(:METHOD)%"
          path: "%REQ_WITHOUT_QUERY(:PATH)%"
          code: "%RESPONSE_CODE%"
          sent: "%BYTES_SENT%"
          debug: "%REQ(X-DEBUG)%"
          upstream: "%UPSTREAM_HOST%"
          client: "%DOWNSTREAM_PEER_URI_SAN%"
          called: "%DOWNSTREAM_LOCAL_ADDRESS%"
          fixed: 7
          nested: {{flags: "%RESPONSE_FLAGS%"}}
  - name: custom
    envoyFileAccessLog:
      path: {custom}
      omitEmptyValues: true
      logFormat:
        text: "%REQ(:METHOD)% %REQ(:PATH):8% %RESPONSE_CODE% [%REQ(X-DEBUG)%] [%REQ(X-ABSENT)%] %UPSTREAM_CLUSTER%"
"#,
        mesh = mesh_log.display(),
        json = json_log.display(),
        custom = custom_log.display(),
    );
    let telemetry = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}, {name: json}]
  - providers: [{name: custom}]
    filter:
      expression: "response.code >= 400"
"#;
    let text = format!("{model}---\n{mesh_config}---\n{telemetry}");
    let wp = common::Waypoint::with_stats(&ca, &text, &format!("waypoint-log-format-{net}.yaml"));
    let get = |path: &str, fields: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: echo.app.svc.cluster.local\r\nuser-agent: probe/1\r\n{fields}\r\n")
    };
    let requests = [get("/ok", ""), get("/missing?q=1", "x-debug: on\r\n")];
    let got = common::http1_on_tunnel(
        wp.addr,
        &wp.client_cert,
        "10.96.0.1:80",
        std::net::Ipv4Addr::new(10, 1, 0, 7),
        &requests,
    );
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404]);
    let client = wp.client_cert.identity.to_string();
    // Stopped: every worker wrote what it held.
    drop(wp);
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };

    // The built-in provider as MeshConfig's accessLogFile: Istio's default text format.
    let mesh = read(&mesh_log);
    let lines: Vec<&str> = mesh.lines().collect();
    assert_eq!(lines.len(), 2, "{mesh}");
    for ((line, request), (target, code)) in lines
        .iter()
        .zip(&requests)
        .zip([("/ok", 200), ("/missing?q=1", 404)])
    {
        // [START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS DETAILS TERMINATION "FAILURE"
        // RECEIVED SENT DURATION SERVICE_TIME "XFF" "UA" "ID" "AUTHORITY" "UPSTREAM" CLUSTER
        // UPSTREAM_LOCAL DOWNSTREAM_LOCAL DOWNSTREAM_REMOTE SNI ROUTE
        let (start, rest) = line[1..].split_once("] ").expect(line);
        assert_eq!(start.len(), "2026-11-27T21:31:38.123Z".len(), "{line}");
        assert!(
            start.ends_with('Z') && start.as_bytes()[10] == b'T',
            "{line}"
        );
        // The bytes as the metrics count them: head and body.
        let want_head = format!(
            "\"GET {target} HTTP/1.1\" {code} - via_upstream - \"-\" {} ",
            request.len()
        );
        assert!(rest.starts_with(&want_head), "{line}\nwant {want_head}");
        let numbers: Vec<u64> = rest[want_head.len()..]
            .split_whitespace()
            .take(2)
            .map(|n| n.parse().expect(line))
            .collect();
        assert!(numbers[0] > 20, "BYTES_SENT, a whole response: {line}");
        let quoted: Vec<&str> = rest.split('"').collect();
        // "-" (xff), "probe/1", the request id, the authority, the upstream host.
        assert_eq!(quoted[5], "-", "{line}");
        assert_eq!(quoted[7], "probe/1", "{line}");
        assert_eq!(quoted[9].len(), 36, "a generated x-request-id: {line}");
        assert_eq!(quoted[11], "echo.app.svc.cluster.local", "{line}");
        assert_eq!(quoted[13], pod.to_string(), "{line}");
        let tail: Vec<&str> = quoted[14].split_whitespace().collect();
        assert_eq!(
            tail,
            [
                "outbound|80||echo.app.svc.cluster.local",
                "-",
                "10.96.0.1:80",
                "10.1.0.7",
                "-",
                "-"
            ],
            "{line}"
        );
    }

    // JSON labels: typed values, null for what the request lacks, nested objects.
    let json = read(&json_log);
    let objs: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(objs.len(), 2, "{json}");
    let sent: Vec<u64> = objs
        .iter()
        .map(|o| o["sent"].as_u64().expect("a number"))
        .collect();
    assert!(sent.iter().all(|n| *n > 20), "{json}");
    let want = |path: &str, code: u64, sent: u64, debug: serde_json::Value| {
        serde_json::json!({
            "method": "GET",
            "path": path,
            "code": code,
            "sent": sent,
            "debug": debug,
            "upstream": pod.to_string(),
            "client": client,
            "called": "10.96.0.1:80",
            "fixed": 7,
            "nested": {"flags": "-"},
        })
    };
    assert_eq!(objs[0], want("/ok", 200, sent[0], serde_json::Value::Null));
    assert_eq!(objs[1], want("/missing", 404, sent[1], "on".into()));
    // Keys in order, one object per line.
    assert!(
        json.lines().all(|l| l.starts_with("{\"called\":")),
        "{json}"
    );

    // The custom text: only the filter's request, `:8` cuts, empty values left empty.
    let custom = read(&custom_log);
    assert_eq!(
        custom,
        "GET /missing 404 [on] [] outbound|80||echo.app.svc.cluster.local\n"
    );
}
