//! Telemetry `tracing` through the waypoint service on real sockets: the waypoint's own
//! span of each sampled request, exported to collectors in the mesh (services of the model,
//! reached over HBONE like any upstream) as Istio's `opentelemetry` (OTLP over HTTP and
//! over gRPC) and `zipkin` extension providers configure Envoy's tracers.
//!
//! What an Istio user sees: the backend gets a `traceparent` naming the waypoint's span
//! (the client's trace id and sampling decision, a new span id), and the collector gets
//! that span, child of the client's, named after the service, with Envoy's standard tags
//! and the Telemetry's custom tags. Unsampled requests and `disableSpanReporting` export
//! nothing; the Telemetry hierarchy (mesh, namespace, service) decides each field (R15).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{app_model, bind_node_ztunnel, id, ip, next_request, ok_response, stand_in_ztunnel};
use hbone::ca::{CertSource, SigningCa};
use waypoint::spans::pb;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);
/// How long an export may take to arrive (the waypoint sends a batch a second after its
/// first span; this bound is generous).
const WAIT: Duration = Duration::from_secs(30);

/// The echo backend: answers `<target> <traceparent> <x-b3-traceid> <x-b3-spanid>
/// <x-b3-parentspanid> <x-b3-sampled>` as it got them (`-`: none).
fn backend(ip: Ipv4Addr) -> SocketAddr {
    common::serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let f = |n: &str| req.header(n).unwrap_or("-").to_string();
            let body = format!(
                "{} {} {} {} {} {}",
                req.path,
                f("traceparent"),
                f("x-b3-traceid"),
                f("x-b3-spanid"),
                f("x-b3-parentspanid"),
                f("x-b3-sampled")
            );
            if c.write_all(ok_response(&body).as_bytes()).is_err() {
                return;
            }
        }
    })
}

/// One export a collector took: its path, `content-type`, `x-tenant` and body.
struct Export {
    path: String,
    content_type: String,
    tenant: String,
    body: Vec<u8>,
}

/// An OTLP/HTTP or Zipkin collector: `answer` (`200 OK`) to every POST, each reported
/// whole; `""`: it never answers (the connection held open).
fn collector(ip: Ipv4Addr, answer: &'static str) -> (SocketAddr, mpsc::Receiver<Export>) {
    let (tx, rx) = mpsc::channel();
    let addr = common::serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let len = req.content_length();
            let mut chunk = [0u8; 16384];
            while buf.len() < len {
                match c.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: Vec<u8> = buf.drain(..len).collect();
            let f = |n: &str| req.header(n).unwrap_or("-").to_string();
            let _ = tx.send(Export {
                path: req.path.clone(),
                content_type: f("content-type"),
                tenant: f("x-tenant"),
                body,
            });
            if answer.is_empty() {
                // Stuck: holds the connection, reads on, answers nothing.
                continue;
            }
            let resp = format!("HTTP/1.1 {answer}\r\ncontent-length: 0\r\n\r\n");
            if c.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// An OTLP/gRPC collector (`TraceService/Export` over HTTP/2): OK to every export, each
/// reported with its path and content type.
fn grpc_collector(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<Export>) {
    let (tx, rx) = mpsc::channel();
    let addr = common::serve_h2(ip, move |req, respond| {
        grpc_export(req, respond, tx.clone())
    });
    (addr, rx)
}

async fn grpc_export(
    req: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    tx: mpsc::Sender<Export>,
) {
    let path = req.uri().path().to_string();
    let h = |n: &str| {
        req.headers()
            .get(n)
            .map_or("-".to_string(), |v| v.to_str().unwrap().to_string())
    };
    let (content_type, tenant) = (h("content-type"), h("x-tenant"));
    let data = common::h2_body(req.into_body()).await;
    assert_eq!(data[0], 0, "an uncompressed gRPC message");
    let _ = tx.send(Export {
        path,
        content_type,
        tenant,
        body: data[5..].to_vec(),
    });
    // An empty ExportTraceServiceResponse.
    common::grpc_reply(respond, &[]);
}

struct Mesh {
    wp: common::Waypoint,
    otlp: mpsc::Receiver<Export>,
    grpc: mpsc::Receiver<Export>,
    zipkin: mpsc::Receiver<Export>,
    pod: SocketAddr,
    _zt: common::Ztunnel,
}

const PROVIDERS: &str = r#"meshConfig:
  extensionProviders:
  - name: otel
    opentelemetry:
      service: otel-collector.app.svc.cluster.local
      port: 4318
      http:
        path: /v1/traces
        timeout: 10s
        headers: [{name: x-tenant, value: mesh}]
  - name: otel-grpc
    opentelemetry: {service: otel-grpc.app.svc.cluster.local, port: 4317}
  - name: zipkin
    zipkin: {service: zipkin.app.svc.cluster.local, port: 9411}
"#;

impl Mesh {
    /// The mesh with the three providers and `telemetry` (Telemetry documents).
    fn with(telemetry: &str) -> Mesh {
        Mesh::with_answer(telemetry, "200 OK")
    }

    /// [`Mesh::with`], the HTTP collectors answering `answer`.
    fn with_answer(telemetry: &str, answer: &'static str) -> Mesh {
        let (net, zl) = bind_node_ztunnel(67);
        let ca = Arc::new(SigningCa::generate_root("cluster.local").unwrap().0);
        let zt = stand_in_ztunnel(
            zl,
            &ca.issue(&id("app", "echo"), SystemTime::now()).unwrap(),
        );
        let pod = backend(ip(net, 2));
        let (otlp_addr, otlp) = collector(ip(net, 3), answer);
        let (grpc_addr, grpc) = grpc_collector(ip(net, 4));
        let (zipkin_addr, zipkin) = collector(ip(net, 5), answer);
        let workload = |uid: &str, svc: &str, port: u16, at: SocketAddr| {
            format!(
                "  - {{uid: {uid}, name: {uid}, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/{svc}.app.svc.cluster.local\": {{{port}: {}}}}}}}\n",
                at.ip(),
                at.port()
            )
        };
        let workloads = [
            workload("e1", "echo", 80, pod),
            workload("c1", "otel-collector", 4318, otlp_addr),
            workload("g1", "otel-grpc", 4317, grpc_addr),
            workload("z1", "zipkin", 9411, zipkin_addr),
        ]
        .concat();
        let service = |name: &str, vip: u8, port: u16| {
            format!("  - {{name: {name}, namespace: app, hostname: {name}.app.svc.cluster.local, vips: [\"10.96.0.{vip}\"], ports: {{{port}: {port}}}}}\n")
        };
        let services = [
            service("echo", 1, 80),
            service("otel-collector", 20, 4318),
            service("otel-grpc", 21, 4317),
            service("zipkin", 22, 9411),
        ]
        .concat();
        let model = app_model(ip(net, 1), &workloads, &services);
        let text = format!("{model}---\n{PROVIDERS}---\n{telemetry}");
        let wp = common::Waypoint::with_stats(&ca, &text, &format!("waypoint-tracing-{net}.yaml"));
        Mesh {
            wp,
            otlp,
            grpc,
            zipkin,
            pod,
            _zt: zt,
        }
    }

    /// Raw HTTP/1.1 requests on one tunnel to `target`: each response body.
    fn http1(&self, target: &str, reqs: &[String]) -> Vec<String> {
        common::http1_on_tunnel(self.wp.addr, &self.wp.client_cert, target, CLIENT, reqs)
            .into_iter()
            .map(|r| {
                assert_eq!(r.status, 200, "{}", r.text());
                r.text()
            })
            .collect()
    }

    /// `waypoint_tracing_spans_total{result}` once it reaches `at_least` (bounded wait).
    fn spans_counted(&self, result: &str, at_least: u64) -> u64 {
        let stats = self.wp.handle().stats_addr().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let page = common::prometheus_page(stats);
            let n = common::counter_in(
                &page,
                &format!("waypoint_tracing_spans_total{{result=\"{result}\"}}"),
            );
            if n >= at_least || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn get(path: &str, fields: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: echo.app.svc.cluster.local\r\nuser-agent: curl/8\r\n{fields}\r\n")
}

/// The `traceparent` the backend got, from its answer `<path> <traceparent>`.
fn sent(answer: &str) -> ([u8; 16], [u8; 8], u8) {
    let tp = answer.split(' ').nth(1).unwrap();
    waypoint::spans::parse_traceparent(tp).unwrap_or_else(|| panic!("{answer}"))
}

/// The spans of one OTLP export.
fn otlp_spans_of(e: &Export) -> Vec<pb::Span> {
    use prost::Message;
    let r = pb::ExportTraceServiceRequest::decode(e.body.as_slice()).unwrap();
    r.resource_spans
        .into_iter()
        .flat_map(|rs| rs.scope_spans)
        .flat_map(|ss| ss.spans)
        .collect()
}

/// The spans of OTLP exports (until `n` came), with their resource's `service.name`.
fn otlp_spans(
    rx: &mpsc::Receiver<Export>,
    n: usize,
    check: impl Fn(&Export),
) -> Vec<(String, pb::Span)> {
    use prost::Message;
    let mut out = vec![];
    while out.len() < n {
        let e = rx.recv_timeout(WAIT).expect("an export");
        check(&e);
        let r = pb::ExportTraceServiceRequest::decode(e.body.as_slice()).unwrap();
        for rs in r.resource_spans {
            let service = attr_of(&rs.resource.unwrap().attributes, "service.name").unwrap();
            for ss in rs.scope_spans {
                assert_eq!(ss.scope.unwrap().name, "waypoint");
                out.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
    }
    out
}

fn attr_of(list: &[pb::KeyValue], key: &str) -> Option<String> {
    list.iter().find(|kv| kv.key == key).map(|kv| {
        kv.value
            .as_ref()
            .and_then(pb::AnyValue::string)
            .unwrap_or_else(|| panic!("{key}: {:?}", kv.value))
            .to_string()
    })
}

fn attr(s: &pb::Span, key: &str) -> Option<String> {
    attr_of(&s.attributes, key)
}

const MESH_OTLP: &str = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 100
    customTags:
      cluster: {literal: {value: east}}
      tenant: {header: {name: x-tenant-id, defaultValue: none}}
"#;

/// OTLP over HTTP, mesh-wide: a sampled client trace is continued (the backend's
/// `traceparent` names the waypoint's span, whose parent is the client's); an unsampled
/// one keeps its decision and exports nothing; a request without a trace starts one
/// (sampled at 100 %), a root span. Each span carries the service's name, Envoy's tags
/// and the custom tags.
#[test]
fn r15_tracing_exports_the_waypoints_spans_over_otlp_http() {
    let m = Mesh::with(MESH_OTLP);
    let t1 = "4bf92f3577b34da6a3ce929d0e0e4736";
    let t2 = "0af7651916cd43dd8448eb211c80319c";
    let got = m.http1(
        "10.96.0.1:80",
        &[
            get(
                "/a?x=1",
                &format!("traceparent: 00-{t1}-00f067aa0ba902b7-01\r\nx-tenant-id: t1\r\n"),
            ),
            get(
                "/b",
                &format!("traceparent: 00-{t2}-b7ad6b7169203331-00\r\n"),
            ),
            get("/c", ""),
        ],
    );
    let (a, b, c) = (sent(&got[0]), sent(&got[1]), sent(&got[2]));
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    // The client's trace and decision, a new span id.
    assert_eq!((hex(&a.0), a.2), (t1.to_string(), 1));
    assert_ne!(hex(&a.1), "00f067aa0ba902b7");
    assert_eq!((hex(&b.0), b.2), (t2.to_string(), 0));
    assert_ne!(hex(&b.1), "b7ad6b7169203331");
    assert_eq!(c.2, 1, "a new trace, sampled at 100 %");
    let spans = otlp_spans(&m.otlp, 2, |e| {
        assert_eq!(e.path, "/v1/traces");
        assert_eq!(e.content_type, "application/x-protobuf");
        assert_eq!(e.tenant, "mesh");
    });
    assert_eq!(spans.len(), 2, "the unsampled request exports nothing");
    let span = |trace: [u8; 16]| {
        spans
            .iter()
            .find(|(_, s)| s.trace_id == trace)
            .unwrap_or_else(|| panic!("no span of {}", hex(&trace)))
    };
    let (service, sa) = span(a.0);
    assert_eq!(service, "wp.app");
    assert_eq!(sa.span_id, a.1, "the span the backend's traceparent names");
    assert_eq!(hex(&sa.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(sa.name, "echo.app.svc.cluster.local:80/*");
    assert_eq!(sa.kind, pb::SPAN_KIND_SERVER);
    assert!(sa.end_time_unix_nano >= sa.start_time_unix_nano);
    let now = waypoint::spans::unix_nanos(SystemTime::now());
    assert!(
        now - sa.start_time_unix_nano < 600_000_000_000,
        "a start time of now"
    );
    for (k, v) in [
        ("http.method", "GET"),
        ("http.url", "http://echo.app.svc.cluster.local/a?x=1"),
        ("http.status_code", "200"),
        ("http.protocol", "HTTP/1.1"),
        ("user_agent", "curl/8"),
        (
            "upstream_cluster",
            "outbound|80||echo.app.svc.cluster.local",
        ),
        ("peer.address", "10.1.0.7"),
        ("response_flags", "-"),
        ("component", "proxy"),
        ("istio.canonical_service", "wp"),
        ("istio.namespace", "app"),
        ("cluster", "east"),
        ("tenant", "t1"),
    ] {
        assert_eq!(attr(sa, k).as_deref(), Some(v), "{k}");
    }
    assert!(attr(sa, "guid:x-request-id").is_some_and(|v| v.len() == 36));
    assert_eq!(attr(sa, "error"), None);
    let (_, sc) = span(c.0);
    assert!(sc.parent_span_id.is_empty(), "a root span");
    assert_eq!(sc.span_id, c.1);
    assert_eq!(
        attr(sc, "tenant").as_deref(),
        Some("none"),
        "the header tag's default"
    );
    assert_eq!(m.spans_counted("exported", 2), 2);
    assert_eq!(m.spans_counted("failed", 0), 0);
}

/// OTLP over gRPC (an `opentelemetry` provider without `http`) for HTTP/2 clients, by a
/// Telemetry attached to the service: the same span, sent to
/// `TraceService/Export`.
#[test]
fn tracing_exports_over_grpc_for_http2_requests() {
    let m = Mesh::with(
        r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: echo-traces, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  tracing:
  - providers: [{name: otel-grpc}]
    randomSamplingPercentage: 100
"#,
    );
    let tp = "00-11111111111111111111111111111111-2222222222222222-01";
    let got = common::h2_on_tunnel(
        m.wp.addr,
        &m.wp.client_cert,
        "10.96.0.1:80",
        CLIENT,
        "echo.app.svc.cluster.local",
        &[("/h2", vec![("traceparent", tp)])],
    );
    assert_eq!(got[0].0, 200, "{}", got[0].1);
    let a = sent(&got[0].1);
    let spans = otlp_spans(&m.grpc, 1, |e| {
        assert_eq!(
            e.path,
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        assert_eq!(e.content_type, "application/grpc");
    });
    let (_, s) = &spans[0];
    assert_eq!((&s.trace_id[..], &s.span_id[..]), (&a.0[..], &a.1[..]));
    assert_eq!(s.parent_span_id, vec![0x22; 8]);
    assert_eq!(attr(s, "http.protocol").as_deref(), Some("HTTP/2"));
    assert_eq!(
        attr(s, "http.url").as_deref(),
        Some("http://echo.app.svc.cluster.local/h2")
    );
    assert_eq!(m.spans_counted("exported", 1), 1);
}

/// Zipkin (v2 JSON, B3) and the Telemetry hierarchy: mesh-wide 0 % sampling, the
/// namespace's 100 %; the service's Telemetry turns span reporting off (its requests still
/// carry the waypoint's span in their `traceparent`); a pod-addressed request (the
/// service's Telemetry does not apply), continuing its client's B3 context, is reported.
#[test]
fn tracing_to_zipkin_follows_the_telemetry_hierarchy() {
    let m = Mesh::with(
        r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: zipkin}]
    randomSamplingPercentage: 0
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: app-traces, namespace: app}
spec:
  tracing:
  - randomSamplingPercentage: 100
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: echo-quiet, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  tracing:
  - disableSpanReporting: true
"#,
    );
    // Reporting off for the service: the span is made and propagated, not sent.
    let quiet = m.http1("10.96.0.1:80", &[get("/quiet", "")]);
    let q = sent(&quiet[0]);
    assert_eq!(q.2, 1, "sampled (the namespace's 100 %)");
    // Addressed to the pod: reported; a B3 context (no traceparent) continued, as
    // Envoy's Zipkin tracer does, and B3 sent upstream beside the traceparent.
    let pod = m.pod.to_string();
    let got = m.http1(
        &pod,
        &[get(
            "/pod",
            "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7\r\nx-b3-spanid: e457b5a2e4d86bd1\r\nx-b3-sampled: 1\r\n",
        )],
    );
    let p = sent(&got[0]);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let b3: Vec<&str> = got[0].split(' ').skip(2).collect();
    assert_eq!(
        b3,
        [
            "80f198ee56343ba864fe8b2a57d3eff7",
            hex(&p.1).as_str(),
            "e457b5a2e4d86bd1",
            "1"
        ]
    );
    assert_eq!(hex(&p.0), "80f198ee56343ba864fe8b2a57d3eff7");
    let e = m.zipkin.recv_timeout(WAIT).expect("an export");
    assert_eq!(e.path, "/api/v2/spans");
    assert_eq!(e.content_type, "application/json");
    let v: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "only the pod-addressed request's span: {v}");
    let s = &list[0];
    assert_eq!(s["traceId"], hex(&p.0));
    assert_eq!(s["id"], hex(&p.1));
    assert_eq!(s["parentId"], "e457b5a2e4d86bd1");
    assert_eq!(s["kind"], "SERVER");
    assert_eq!(s["name"], format!("{pod}/*"));
    assert_eq!(s["localEndpoint"]["serviceName"], "wp.app");
    assert_eq!(s["remoteEndpoint"]["ipv4"], "10.1.0.7");
    assert_eq!(
        s["tags"]["http.url"],
        "http://echo.app.svc.cluster.local/pod"
    );
    assert_eq!(s["tags"]["upstream_cluster"], "-", "not routed (R16)");
    assert_eq!(
        m.spans_counted("exported", 1),
        1,
        "the quiet request's span was never queued"
    );
}

/// A collector that answers with an error: the spans count as failed, and the requests
/// are served as ever.
#[test]
fn a_failing_collector_costs_the_requests_nothing() {
    let m = Mesh::with_answer(MESH_OTLP, "503 Service Unavailable");
    let got = m.http1("10.96.0.1:80", &[get("/a", ""), get("/b", "")]);
    assert!(got[0].starts_with("/a 00-"), "{}", got[0]);
    let e = m.otlp.recv_timeout(WAIT).expect("an export");
    assert_eq!(e.path, "/v1/traces");
    assert_eq!(m.spans_counted("failed", 2), 2);
    assert_eq!(m.spans_counted("exported", 0), 0);
}

/// A stuck collector (it takes exports and never answers): each worker holds at most its
/// exports in flight and `MAX_BUFFERED` waiting spans; the rest are dropped and counted,
/// and every request is served.
#[test]
fn a_stuck_collector_bounds_the_spans_held() {
    use waypoint::spans::{MAX_BATCH, MAX_BUFFERED, MAX_EXPORTS_IN_FLIGHT};
    let m = Mesh::with_answer(MESH_OTLP, "");
    let held = MAX_EXPORTS_IN_FLIGHT * MAX_BATCH + MAX_BUFFERED;
    let n = held + 500;
    // One tunnel, one worker: requests pipelined in rounds of 100.
    let answered: usize = (0..n.div_ceil(100))
        .map(|_| {
            let reqs: Vec<String> = (0..100).map(|i| get(&format!("/{i}"), "")).collect();
            m.http1("10.96.0.1:80", &reqs).len()
        })
        .sum();
    assert!(answered >= n);
    let dropped = m.spans_counted("dropped", (answered - held) as u64);
    assert!(
        dropped >= (answered - held) as u64 && dropped < answered as u64,
        "{dropped} of {answered} dropped, {held} held at most"
    );
    // The collector got the exports in flight, and nothing was taken.
    assert!(m.otlp.recv_timeout(WAIT).is_ok());
    assert_eq!(m.spans_counted("exported", 0), 0);
}

/// Spans still waiting for their batch when the waypoint stops are sent as it drains (a
/// restart or rollout loses none): the span of a request made just before the stop
/// reaches the collector although its batch was not due for a second.
#[test]
fn spans_are_sent_when_the_waypoint_stops() {
    let m = Mesh::with(MESH_OTLP);
    let got = m.http1("10.96.0.1:80", &[get("/last", "")]);
    let sent_span = sent(&got[0]);
    // The drain (200 ms here) and the join, well within the batch's second.
    drop(m.wp);
    let e = m
        .otlp
        .recv_timeout(WAIT)
        .expect("the span, sent at the stop");
    let spans = otlp_spans_of(&e);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].span_id, sent_span.1);
}
