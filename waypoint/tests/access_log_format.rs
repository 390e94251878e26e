//! Envoy-formatted access logs, configured as Istio users write them: MeshConfig
//! `accessLogFile` (the built-in `envoy` provider in Istio's default text format) and
//! `envoyFileAccessLog` extension providers (JSON `labels`, a custom `text` with
//! `omitEmptyValues`), named by a Telemetry with a filter. Real sockets through the
//! waypoint (R15); the files are read once the waypoint has stopped (its workers write
//! what they hold as they end).

mod common;

use common::{echo_node, ip};
use waypoint::spans::pb::string_of;

#[test]
fn r15_envoy_file_access_logs_in_istio_text_json_and_custom_formats() {
    let (net, ca, _zt) = echo_node(47);
    let pod = common::backend_404_on_missing(ip(net, 2));
    let dir = common::TempDir(std::env::temp_dir().join(format!("access-log-format-{net}")));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let (mesh_log, json_log, custom_log) = (
        dir.0.join("mesh.log"),
        dir.0.join("json.log"),
        dir.0.join("custom.log"),
    );
    let model = common::echo_model(ip(net, 1), pod);
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
    // A request the waypoint answers itself (R15) after routed ones on the same tunnel:
    // no upstream host, no cluster.
    let deny = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-denied, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/denied"]}}]}]
"#;
    let text = format!("{model}---\n{mesh_config}---\n{telemetry}---\n{deny}");
    let wp = common::Waypoint::with_stats(&ca, &text, &format!("waypoint-log-format-{net}.yaml"));
    let get = |path: &str, fields: &str| {
        common::echo_get(path, &format!("user-agent: probe/1\r\n{fields}"))
    };
    let requests = [
        get("/ok", ""),
        get("/missing?q=1", "x-debug: on\r\n"),
        get("/denied", ""),
    ];
    let got = common::http1_on_tunnel(
        wp.addr,
        &wp.client_cert,
        "10.96.0.1:80",
        std::net::Ipv4Addr::new(10, 1, 0, 7),
        &requests,
    );
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404, 403]);
    let client = wp.client_cert.identity.to_string();
    // Stopped: every worker wrote what it held.
    drop(wp);
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };

    // The built-in provider as MeshConfig's accessLogFile: Istio's default text format.
    let mesh = read(&mesh_log);
    let lines: Vec<&str> = mesh.lines().collect();
    assert_eq!(lines.len(), 3, "{mesh}");
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

    // Denied here: Envoy's RBAC details, no upstream host or cluster.
    let denied = lines[2];
    assert!(
        denied.contains("\"GET /denied HTTP/1.1\" 403 - rbac_access_denied - "),
        "{denied}"
    );
    let quoted: Vec<&str> = denied.split('"').collect();
    assert_eq!(quoted[13], "-", "no upstream host: {denied}");
    assert!(
        quoted[14].trim_start().starts_with("- "),
        "no cluster: {denied}"
    );

    // JSON labels: typed values, null for what the request lacks, nested objects.
    let json = read(&json_log);
    let objs: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(objs.len(), 3, "{json}");
    let sent: Vec<u64> = objs[..2]
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
    assert_eq!(objs[2]["code"], 403);
    assert_eq!(objs[2]["upstream"], serde_json::Value::Null, "{json}");
    // Keys in order, one object per line.
    assert!(
        json.lines().all(|l| l.starts_with("{\"called\":")),
        "{json}"
    );

    // The custom text: only the filter's requests, `:8` cuts, empty values left empty.
    let custom = read(&custom_log);
    assert_eq!(
        custom,
        "GET /missing 404 [on] [] outbound|80||echo.app.svc.cluster.local\nGET /denied 403 [] [] \n"
    );
}

/// The records an OTLP logs collector (`LogsService/Export` over gRPC, HTTP/2) took, with
/// their resource's `log_name`.
type Records = Vec<(String, waypoint::spans::pb::LogRecord)>;

/// An OTLP logs collector: OK to every export, each export's records sent on.
fn logs_collector(
    ip: std::net::Ipv4Addr,
) -> (std::net::SocketAddr, std::sync::mpsc::Receiver<Records>) {
    use prost::Message;
    use waypoint::spans::pb;
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = common::serve_h2(ip, move |req, respond| {
        let tx = tx.clone();
        async move {
            assert_eq!(req.uri().path(), waypoint::spans::OTLP_LOGS_GRPC_PATH);
            let data = common::h2_body(req.into_body()).await;
            assert_eq!(data[0], 0, "an uncompressed gRPC message");
            let msg = pb::ExportLogsServiceRequest::decode(&data[5..]).unwrap();
            let mut records = vec![];
            for rl in msg.resource_logs {
                let name = rl
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "log_name")
                    .map(|kv| waypoint::spans::pb::string_of(&kv.value).to_string())
                    .unwrap_or_default();
                for sl in rl.scope_logs {
                    records.extend(sl.log_records.into_iter().map(|l| (name.clone(), l)));
                }
            }
            let _ = tx.send(records);
            // An empty ExportLogsServiceResponse.
            common::grpc_reply(respond, &[]);
        }
    });
    (addr, rx)
}

/// Istio's `envoyOtelAls` providers: each request's record (body from `logFormat.text`,
/// else Istio's text format; an attribute per `labels` entry; its trace context) exported
/// to an OpenTelemetry collector in the mesh over HBONE, in batches, and counted.
#[test]
fn r15_envoy_otel_als_exports_access_log_records() {
    let (net, ca, _zt) = echo_node(53);
    let pod = common::backend_404_on_missing(ip(net, 2));
    let (collector, records) = logs_collector(ip(net, 3));
    let workloads = format!(
        "{}  - {{uid: c1, name: c1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/otel.app.svc.cluster.local\": {{4317: {}}}}}}}\n",
        common::app_workload("echo", pod),
        collector.ip(),
        collector.port()
    );
    let model = common::app_model(
        ip(net, 1),
        &workloads,
        &format!("{}  - {{name: otel, namespace: app, hostname: otel.app.svc.cluster.local, vips: [\"10.96.0.9\"], ports: {{4317: 4317}}}}\n", common::ECHO_SERVICE),
    );
    let mesh_config = r#"meshConfig:
  extensionProviders:
  - name: als
    envoyOtelAls:
      service: otel.app.svc.cluster.local
      port: 4317
      logName: custom
      logFormat:
        text: "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%"
        labels:
          code: "%RESPONSE_CODE%"
          client: "%DOWNSTREAM_PEER_URI_SAN%"
          debug: "%REQ(X-DEBUG)%"
  - name: als-default
    envoyOtelAls: {service: app/otel.app.svc.cluster.local, port: 4317}
"#;
    let telemetry = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: als}, {name: als-default}]
"#;
    let text_cfg = format!("{model}---\n{mesh_config}---\n{telemetry}");
    let wp = common::Waypoint::with_stats(&ca, &text_cfg, &format!("waypoint-otel-als-{net}.yaml"));
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let get = common::echo_get;
    let got = common::http1_on_tunnel(
        wp.addr,
        &wp.client_cert,
        "10.96.0.1:80",
        std::net::Ipv4Addr::new(10, 1, 0, 7),
        &[
            get("/ok", ""),
            get(
                "/missing?q=1",
                &format!("x-debug: on\r\ntraceparent: 00-{trace}-b7ad6b7169203331-01\r\n"),
            ),
        ],
    );
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404]);
    // The waypoint sends a batch a second after its first record; the bound is generous.
    let mut all: Records = vec![];
    while all.len() < 4 {
        let more = records
            .recv_timeout(common::EVENT_BOUND)
            .unwrap_or_else(|e| panic!("records: {e}; got {all:?}"));
        all.extend(more);
    }
    assert_eq!(all.len(), 4, "{all:?}");
    let of = |name: &str| -> Vec<&waypoint::spans::pb::LogRecord> {
        all.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, l)| l)
            .collect()
    };
    let custom = of("custom");
    assert_eq!(custom.len(), 2, "{all:?}");
    let client = wp.client_cert.identity.to_string();
    for (l, (body, code, debug)) in custom.iter().zip([
        ("GET /ok 200", "200", "-"),
        ("GET /missing?q=1 404", "404", "on"),
    ]) {
        assert_eq!(string_of(&l.body), body);
        let attrs: Vec<(String, String)> = l
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), string_of(&kv.value).to_string()))
            .collect();
        assert_eq!(
            attrs,
            [
                ("client".to_string(), client.clone()),
                ("code".to_string(), code.to_string()),
                ("debug".to_string(), debug.to_string()),
            ]
        );
        assert!(l.time_unix_nano > 0 && l.observed_time_unix_nano == l.time_unix_nano);
    }
    // The client's trace context, kept.
    assert_eq!(hex(&custom[1].trace_id), trace);
    assert_eq!(custom[1].flags, 1);
    // Without a logFormat: Istio's text format, no attributes.
    let default = of("otel_envoy_accesslog");
    assert_eq!(default.len(), 2, "{all:?}");
    let body = string_of(&default[0].body);
    assert!(body.starts_with('['), "{body}");
    assert!(
        body.contains("\"GET /ok HTTP/1.1\" 200 - via_upstream"),
        "{body}"
    );
    assert!(body.ends_with('\n'), "{body}");
    assert!(default[0].attributes.is_empty());
    // Counted once the collector's answer to each export is back: the collector may have
    // handed over the last records before the waypoint read that answer.
    let stats = wp.handle().stats_addr().unwrap();
    let exported = || {
        common::counter_in(
            &common::prometheus_page(stats),
            "waypoint_access_log_records_total{result=\"exported\"}",
        )
    };
    common::block_on(common::bounded(async {
        while exported() < 4 {
            monoio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }));
    assert_eq!(exported(), 4, "{}", common::prometheus_page(stats));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
