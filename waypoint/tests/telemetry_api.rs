//! Istio's Telemetry API on the waypoint: which requests go to the access log and which
//! request metrics count them — for each, the most specific Telemetry that applies
//! (`targetRefs`, then its namespace's, then the root namespace's), else the settings'
//! `access_log` and every metric.

mod common;

use std::path::Path;
use std::sync::mpsc;

use common::{access_lines, echo_node, ip, named_backend, Capture};
use waypoint::authz::Subject;
use waypoint::config::{load_str, WaypointConfig};
use waypoint::route::ObjectRef;

const MESH: &str = r#"
services:
  - {name: loud, namespace: app, hostname: loud.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {80: 8080}}
  - {name: quiet, namespace: app, hostname: quiet.app.svc.cluster.local, vips: ["10.96.0.2"], ports: {80: 8080}}
  - {name: other, namespace: shop, hostname: other.shop.svc.cluster.local, vips: ["10.96.0.3"], ports: {80: 8080}}
"#;

fn telemetry(ns: &str, name: &str, target: &str, logging: &str) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{target}  accessLogging:\n{logging}"
    )
}

/// A Telemetry `name` of namespace `app` with `target` and `metrics` (its list items).
fn metrics(name: &str, target: &str, metrics: &str) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: app}}\nspec:\n{target}  metrics:\n{metrics}"
    )
}

/// A Telemetry `name` of namespace `ns` with `target` and `tracing` (its list items).
fn tracing(ns: &str, name: &str, target: &str, tracing: &str) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{target}  tracing:\n{tracing}"
    )
}

/// Tracing providers `z` (Zipkin) and `o` (OpenTelemetry) whose collector is `loud`.
const PROVIDERS: &str = "meshConfig:\n  extensionProviders:\n  - name: z\n    zipkin: {service: loud.app.svc.cluster.local, port: 9411}\n  - name: o\n    opentelemetry: {service: loud.app.svc.cluster.local, port: 4317}\n";

fn try_load(docs: &[String]) -> Result<WaypointConfig, String> {
    let text = format!("{MESH}---\n{}", docs.join("---\n"));
    load_str(Path::new("t.yaml"), &text, 1).map_err(|e| e.to_string())
}

/// What Telemetry says of a request to service `ns/name` through the `app/wp` waypoint.
fn choice(cfg: &WaypointConfig, ns: &str, name: &str) -> waypoint::config::TelemetryChoice {
    let wp = ObjectRef::new("app", "wp");
    let svc = ObjectRef::new(ns, name);
    cfg.telemetry_for(&Subject {
        waypoint: &wp,
        root_namespace: "istio-system",
        service: Some(&svc),
        workload: None,
    })
}

/// Whether a request to service `ns/name` is logged.
fn logged(cfg: &WaypointConfig, ns: &str, name: &str) -> bool {
    !choice(cfg, ns, name).logs.is_empty()
}

/// Access logs: provider, and whether a filter chooses its requests.
type Logs = Vec<(String, bool)>;

/// The access logs of a request to service `ns/name`.
fn logs(cfg: &WaypointConfig, ns: &str, name: &str) -> Logs {
    choice(cfg, ns, name)
        .logs
        .into_iter()
        .map(|s| (s.name, s.filter.is_some()))
        .collect()
}

#[test]
fn the_most_specific_telemetry_decides_the_access_log() {
    let off = "  - disabled: true\n";
    let on = "  - providers: [{name: envoy}]\n";
    let svc = |n: &str| format!("  targetRefs: [{{kind: Service, group: \"\", name: {n}}}]\n");
    let gw = "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]\n";
    let mesh_off = telemetry("istio-system", "mesh", "", off);
    let app_off = telemetry("app", "ns", "", off);
    let quiet_off = telemetry("app", "quiet", &svc("quiet"), off);
    let loud_on = telemetry("app", "loud", &svc("loud"), on);
    let wp_on = telemetry("app", "wp", gw, on);
    // (documents, loud, quiet, shop/other)
    let table: Vec<(Vec<String>, [bool; 3])> = vec![
        // No Telemetry: the settings' default, on.
        (vec![], [true, true, true]),
        (vec![quiet_off.clone()], [true, false, true]),
        // The root namespace's applies to the mesh; a namespace's to its services.
        (vec![mesh_off.clone()], [false, false, false]),
        (vec![app_off.clone()], [false, false, true]),
        // More specific wins: a Service's over its namespace's over the root's.
        (
            vec![mesh_off.clone(), loud_on.clone()],
            [true, false, false],
        ),
        (
            vec![app_off.clone(), loud_on.clone(), mesh_off.clone()],
            [true, false, false],
        ),
        // The waypoint's own Gateway: everything it serves.
        (vec![mesh_off.clone(), wp_on.clone()], [true, true, true]),
    ];
    for (i, (docs, want)) in table.into_iter().enumerate() {
        let cfg = try_load(&docs).unwrap_or_else(|e| panic!("row {i}: {e}"));
        let got = [
            logged(&cfg, "app", "loud"),
            logged(&cfg, "app", "quiet"),
            logged(&cfg, "shop", "other"),
        ];
        assert_eq!(got, want, "row {i}");
    }
    // `access_log: false` in the settings: Istio's default, logs only where turned on.
    let settings = "waypoint:\n  gateway: app/wp\n  identity: spiffe://cluster.local/ns/app/sa/waypoint\n  ca: {builtin: /tmp/unused-ca}\n  access_log: false\n".to_string();
    let cfg = try_load(&[settings, loud_on]).unwrap();
    assert!(logged(&cfg, "app", "loud"));
    assert!(!logged(&cfg, "app", "quiet"));
}

/// The request metrics reported for a request to `ns/name`: bits of REQUEST_COUNT,
/// REQUEST_DURATION, REQUEST_SIZE, RESPONSE_SIZE.
fn shown(cfg: &WaypointConfig, ns: &str, name: &str) -> u8 {
    choice(cfg, ns, name).metrics & 0b1111
}

/// The TCP metrics reported for a connection to `ns/name`: bits of
/// TCP_OPENED_CONNECTIONS, TCP_CLOSED_CONNECTIONS, TCP_RECEIVED_BYTES, TCP_SENT_BYTES.
fn tcp_shown(cfg: &WaypointConfig, ns: &str, name: &str) -> u8 {
    choice(cfg, ns, name).metrics >> 4
}

#[test]
fn metrics_overrides_disable_metrics_per_target() {
    let svc = |n: &str| format!("  targetRefs: [{{kind: Service, group: \"\", name: {n}}}]\n");
    let count_off = "  - overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]\n";
    let all_off = "  - providers: [{name: prometheus}]\n    overrides: [{disabled: true}]\n";
    let sizes_on = "  - overrides:\n    - {match: {metric: REQUEST_SIZE, mode: SERVER}, disabled: false}\n    - {match: {metric: TCP_SENT_BYTES}, disabled: true}\n";
    let mesh_all_off = format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh, namespace: istio-system}}\nspec:\n  metrics:\n{all_off}"
    );
    let tcp_sent_off = "  - overrides: [{match: {metric: TCP_SENT_BYTES}, disabled: true}]\n";
    // (documents, request metrics of loud, quiet, shop/other; TCP metrics of the same)
    let table: Vec<(Vec<String>, [u8; 3], [u8; 3])> = vec![
        (vec![], [0b1111, 0b1111, 0b1111], [0b1111, 0b1111, 0b1111]),
        (
            vec![metrics("q", &svc("quiet"), count_off)],
            [0b1111, 0b1110, 0b1111],
            [0b1111, 0b1111, 0b1111],
        ),
        // Namespace-wide: app's services only (ALL_METRICS: the TCP ones too).
        (
            vec![metrics("ns", "", all_off)],
            [0, 0, 0b1111],
            [0, 0, 0b1111],
        ),
        // Mesh-wide off, a Service turning one back on (the others stay off).
        (
            vec![mesh_all_off.clone(), metrics("l", &svc("loud"), sizes_on)],
            [0b0100, 0, 0],
            [0, 0, 0],
        ),
        (
            vec![metrics("t", &svc("loud"), tcp_sent_off)],
            [0b1111, 0b1111, 0b1111],
            [0b0111, 0b1111, 0b1111],
        ),
    ];
    for (i, (docs, want, want_tcp)) in table.into_iter().enumerate() {
        let cfg = try_load(&docs).unwrap_or_else(|e| panic!("row {i}: {e}"));
        let got = [
            shown(&cfg, "app", "loud"),
            shown(&cfg, "app", "quiet"),
            shown(&cfg, "shop", "other"),
        ];
        assert_eq!(got, want, "row {i}");
        let got = [
            tcp_shown(&cfg, "app", "loud"),
            tcp_shown(&cfg, "app", "quiet"),
            tcp_shown(&cfg, "shop", "other"),
        ];
        assert_eq!(got, want_tcp, "row {i}: TCP");
        // Metrics overrides leave the access log alone.
        assert!(logged(&cfg, "app", "loud"), "row {i}");
    }
}

#[test]
fn telemetry_errors_name_their_field() {
    let table = [
        (
            telemetry("app", "t", "", "  - filter: {expression: \"response.cod >= 400\"}\n"),
            "spec.accessLogging[0].filter.expression",
        ),
        (
            telemetry("app", "t", "", "  - providers: [{name: otel}]\n"),
            "spec.accessLogging[0].providers[0].name",
        ),
        (
            telemetry("app", "t", "", "  - match: {mode: CLIENT}\n"),
            "spec.accessLogging[0].match.mode",
        ),
        (
            metrics("m", "", "  - overrides: [{tagOverrides: {request-host: {operation: REMOVE}}}]\n"),
            "spec.metrics[0].overrides[0].tagOverrides.request-host",
        ),
        (
            metrics("m", "", "  - overrides: [{tagOverrides: {request_host: {}}}]\n"),
            "spec.metrics[0].overrides[0].tagOverrides.request_host.value",
        ),
        (
            metrics("m", "", "  - overrides: [{tagOverrides: {request_host: {operation: DELETE}}}]\n"),
            "spec.metrics[0].overrides[0].tagOverrides.request_host.operation",
        ),
        (
            metrics("m", "", "  - overrides: [{tagOverrides: {request_host: {value: \"request.hots\"}}}]\n"),
            "spec.metrics[0].overrides[0].tagOverrides.request_host.value",
        ),
        (
            metrics("m", "", "  - overrides: [{match: {metric: REQUEST_COUNTS}, disabled: true}]\n"),
            "spec.metrics[0].overrides[0].match.metric",
        ),
        (
            metrics("m", "", "  - providers: [{name: stackdriver}]\n"),
            "spec.metrics[0].providers[0].name",
        ),
        (
            metrics("m", "", "  - reportingInterval: 5s\n"),
            "spec.metrics[0].reportingInterval",
        ),
        (
            metrics("m", "", "  - overrides: [{match: {mode: CLIENT}, disabled: true}]\n"),
            "spec.metrics[0].overrides[0].match.mode",
        ),
        (
            tracing("app", "t", "", "  - randomSamplingPercentage: 120\n"),
            "spec.tracing[0].randomSamplingPercentage",
        ),
        (
            tracing("app", "t", "", "  - providers: [{name: z}, {name: o}]\n"),
            "spec.tracing[0].providers",
        ),
        (
            tracing("app", "t", "", "  - match: {mode: CLIENT}\n"),
            "spec.tracing[0].match.mode",
        ),
        (
            tracing(
                "app",
                "t",
                "",
                "  - customTags: {x: {literal: {value: a}, header: {name: b}}}\n",
            ),
            "spec.tracing[0].customTags.x",
        ),
        (
            tracing("app", "t", "", "  - customTags: {x: {header: {name: \"a b\"}}}\n"),
            "spec.tracing[0].customTags.x.header.name",
        ),
        // A provider the MeshConfig does not have.
        (
            tracing("app", "t", "", "  - providers: [{name: jaeger}]\n"),
            "spec.tracing.providers.name",
        ),
        (
            format!("{PROVIDERS}  defaultProviders: {{tracing: [jaeger]}}\n"),
            "meshConfig.defaultProviders.tracing[0]",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: z\n    zipkin: {service: nowhere.svc, port: 9411}\n".to_string(),
            "meshConfig.extensionProviders[0].zipkin.service",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: o\n    opentelemetry: {service: loud.app.svc.cluster.local, port: 4318, http: {path: v1/traces}}\n".to_string(),
            "meshConfig.extensionProviders[0].opentelemetry.http.path",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: o\n    opentelemetry: {service: loud.app.svc.cluster.local, port: 4317, resourceDetectors: {environment: {}}}\n".to_string(),
            "resourceDetectors",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: o\n    opentelemetry: {service: loud.app.svc.cluster.local, port: 4317}\n    zipkin: {service: loud.app.svc.cluster.local, port: 9411}\n".to_string(),
            "one provider kind per provider",
        ),
        // Access log providers.
        (
            telemetry("app", "t", "", "  - providers: [{name: envoy}, {name: json}]\n"),
            "spec.accessLogging[0].providers[1].name",
        ),
        (
            "meshConfig:\n  accessLogEncoding: YAML\n".to_string(),
            "meshConfig.accessLogEncoding",
        ),
        (
            "meshConfig:\n  accessLogEncoding: JSON\n  accessLogFormat: \"[%START_TIME%]\"\n".to_string(),
            "meshConfig.accessLogFormat",
        ),
        (
            "meshConfig:\n  accessLogFormat: \"%REQ(:METHOD)% %NOT_AN_OPERATOR%\"\n".to_string(),
            "meshConfig.accessLogFormat",
        ),
        (
            "meshConfig:\n  accessLogFile: /nonexistent-dir/access.log\n".to_string(),
            "meshConfig.accessLogFile",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: f\n    envoyFileAccessLog: {path: /dev/null, logFormat: {text: \"%DYNAMIC_METADATA(istio.mixer:status)%\"}}\n".to_string(),
            "meshConfig.extensionProviders[0].envoyFileAccessLog.logFormat.text",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: f\n    envoyFileAccessLog: {path: /dev/null, logFormat: {labels: {a: \"%RESPONSE_CODE\"}}}\n".to_string(),
            "meshConfig.extensionProviders[0].envoyFileAccessLog.logFormat.labels",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: f\n    envoyFileAccessLog: {path: /dev/null, logFormat: {text: a, labels: {a: b}}}\n".to_string(),
            "meshConfig.extensionProviders[0].envoyFileAccessLog.logFormat",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: f\n    envoyFileAccessLog: {path: /nonexistent-dir/access.log}\n".to_string(),
            "meshConfig.extensionProviders[0].envoyFileAccessLog.path",
        ),
        (
            "meshConfig:\n  defaultProviders: {accessLogging: [otel]}\n".to_string(),
            "meshConfig.defaultProviders.accessLogging[0]",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: f\n    envoyHttpAls: {service: loud.app.svc.cluster.local, port: 4317}\n".to_string(),
            "envoyHttpAls",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: f\n    envoyOtelAls: {service: nowhere.svc, port: 4317}\n".to_string(),
            "meshConfig.extensionProviders[0].envoyOtelAls.service",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: f\n    envoyOtelAls: {service: loud.app.svc.cluster.local, port: 4317, logFormat: {labels: {a: 1}}}\n".to_string(),
            "meshConfig.extensionProviders[0].envoyOtelAls.logFormat.labels.a",
        ),
        (
            "meshConfig:\n  extensionProviders:\n  - name: f\n    envoyOtelAls: {service: loud.app.svc.cluster.local, port: 4317, logFormat: {text: \"%FILTER_STATE(x)%\"}}\n".to_string(),
            "meshConfig.extensionProviders[0].envoyOtelAls.logFormat.text",
        ),
    ];
    for (doc, field) in table {
        let err = try_load(std::slice::from_ref(&doc)).expect_err(&doc);
        assert!(err.contains(field), "want {field} in {err}");
    }
    // A workload selector is the sidecars' way: set aside, listed as ignored.
    let sel = telemetry(
        "app",
        "sel",
        "  selector: {matchLabels: {app: x}}\n",
        "  - disabled: true\n",
    );
    let cfg = try_load(&[sel]).unwrap();
    assert!(cfg
        .ignored_policies_prometheus()
        .contains("kind=\"Telemetry\""));
    assert!(logged(&cfg, "app", "loud"));
}

/// Through the waypoint on real sockets: requests to a service whose Telemetry turns the
/// access log off leave no line; the others do.
#[test]
fn telemetry_turns_the_access_log_off_for_one_service_end_to_end() {
    let (tx, rx) = mpsc::channel();
    tracing::subscriber::set_global_default(Capture(tx)).unwrap();
    let (net, ca, _zt) = echo_node(41);
    let loud = named_backend(ip(net, 2), "loud");
    let quiet = named_backend(ip(net, 3), "quiet");
    let w = common::app_workload;
    let model = common::app_model(
        ip(net, 1),
        &format!("{}{}", w("loud", loud), w("quiet", quiet)),
        "  - {name: loud, namespace: app, hostname: loud.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n  - {name: quiet, namespace: app, hostname: quiet.app.svc.cluster.local, vips: [\"10.96.0.2\"], ports: {80: 8080}}\n",
    );
    let off = format!(
        "{}  metrics:\n  - overrides: [{{match: {{metric: REQUEST_COUNT}}, disabled: true}}]\n",
        telemetry(
            "app",
            "quiet",
            "  targetRefs: [{kind: Service, group: \"\", name: quiet}]\n",
            "  - disabled: true\n",
        )
    );
    let text = format!("{model}---\n{off}");
    let wp = common::Waypoint::with_stats(&ca, &text, &format!("waypoint-telemetry-{net}.yaml"));
    let get = |host: &str| format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n");
    for (vip, host, body) in [
        ("10.96.0.2:80", "quiet.app.svc.cluster.local", "quiet"),
        ("10.96.0.1:80", "loud.app.svc.cluster.local", "loud"),
        ("10.96.0.2:80", "quiet.app.svc.cluster.local", "quiet"),
        ("10.96.0.1:80", "loud.app.svc.cluster.local", "loud"),
    ] {
        let r = common::http1_on_tunnel(
            wp.addr,
            &wp.client_cert,
            vip,
            std::net::Ipv4Addr::new(10, 1, 0, 7),
            &[get(host)],
        );
        assert_eq!((r[0].status, r[0].text()), (200, body.to_string()));
    }
    // One worker writes the lines in request order: a line of the first (quiet) request
    // would come first.
    let got = access_lines(&rx, 2);
    for l in &got {
        let dst = &l.iter().find(|(k, _)| k == "dst_service").unwrap().1;
        assert!(dst.contains("loud"), "{l:?}");
    }
    // The quiet service's requests are not counted in istio_requests_total, and are in
    // the duration histogram.
    let page = common::stats_page(wp.handle());
    let series = |metric: &str, svc: &str| {
        page.lines()
            .filter(|l| {
                l.starts_with(metric) && l.contains(&format!("destination_service_name=\"{svc}\""))
            })
            .count()
    };
    assert!(series("istio_requests_total{", "loud") > 0, "{page}");
    assert_eq!(series("istio_requests_total{", "quiet"), 0, "{page}");
    assert!(
        series("istio_request_duration_milliseconds_count{", "quiet") > 0,
        "{page}"
    );
}

/// Tracing for a request to `ns/name`: (provider, reported, custom tags as `name=value`).
fn traced(cfg: &WaypointConfig, ns: &str, name: &str) -> Option<(String, bool, Vec<String>)> {
    let wp = ObjectRef::new("app", "wp");
    let svc = ObjectRef::new(ns, name);
    let t = cfg.tracing_for(&Subject {
        waypoint: &wp,
        root_namespace: "istio-system",
        service: Some(&svc),
        workload: None,
    })?;
    let tags = t
        .custom_tags
        .iter()
        .map(|(n, v)| match v {
            waypoint::spans::CustomTag::Literal(v) => format!("{n}={v}"),
            waypoint::spans::CustomTag::Header { name, default } => {
                format!("{n}=header:{name}:{}", default.as_deref().unwrap_or("-"))
            }
        })
        .collect();
    Some((t.provider.name.clone(), t.report, tags))
}

/// Each tracing field (provider, sampling, reporting) from the most specific Telemetry that
/// sets it; custom tags merged by name, the most specific winning; the MeshConfig's
/// `defaultProviders.tracing` where none names a provider; none at all: tracing off.
#[test]
fn tracing_fields_come_from_the_most_specific_telemetry() {
    use waypoint::spans::Sampling;
    let svc = |n: &str| format!("  targetRefs: [{{kind: Service, group: \"\", name: {n}}}]\n");
    let mesh = tracing(
        "istio-system",
        "mesh",
        "",
        "  - providers: [{name: z}]\n    randomSamplingPercentage: 5\n    customTags:\n      env: {literal: {value: prod}}\n      who: {header: {name: X-User}}\n",
    );
    let app = tracing(
        "app",
        "ns",
        "",
        "  - randomSamplingPercentage: 50\n    customTags: {env: {literal: {value: app}}}\n",
    );
    let quiet = tracing(
        "app",
        "q",
        &svc("quiet"),
        "  - providers: [{name: o}]\n    disableSpanReporting: true\n",
    );
    let with_default = format!("{PROVIDERS}  defaultProviders: {{tracing: [o]}}\n");
    // Providers only: tracing off.
    let cfg = try_load(&[PROVIDERS.to_string()]).unwrap();
    assert_eq!(traced(&cfg, "app", "loud"), None);
    // A Telemetry without a provider and no default: off.
    let cfg = try_load(&[PROVIDERS.to_string(), app.clone()]).unwrap();
    assert_eq!(traced(&cfg, "app", "loud"), None);
    // The default provider alone: on, at Istio's 1 %.
    let cfg = try_load(std::slice::from_ref(&with_default)).unwrap();
    assert_eq!(
        traced(&cfg, "app", "loud"),
        Some(("o".into(), true, vec![]))
    );
    let wp = ObjectRef::new("app", "wp");
    let loud = ObjectRef::new("app", "loud");
    let sampling = |cfg: &WaypointConfig, svc: &ObjectRef| {
        cfg.tracing_for(&Subject {
            waypoint: &wp,
            root_namespace: "istio-system",
            service: Some(svc),
            workload: None,
        })
        .unwrap()
        .sampling
    };
    assert_eq!(sampling(&cfg, &loud), Sampling::percent(1.0));
    // The hierarchy.
    let cfg = try_load(&[PROVIDERS.to_string(), quiet, app, mesh]).unwrap();
    assert_eq!(
        traced(&cfg, "app", "loud"),
        Some((
            "z".into(),
            true,
            vec!["env=app".into(), "who=header:x-user:-".into()]
        ))
    );
    assert_eq!(sampling(&cfg, &loud), Sampling::percent(50.0));
    assert_eq!(
        traced(&cfg, "app", "quiet"),
        Some((
            "o".into(),
            false,
            vec!["env=app".into(), "who=header:x-user:-".into()]
        ))
    );
    assert_eq!(
        traced(&cfg, "shop", "other"),
        Some((
            "z".into(),
            true,
            vec!["env=prod".into(), "who=header:x-user:-".into()]
        ))
    );
    assert_eq!(
        sampling(&cfg, &ObjectRef::new("shop", "other")),
        Sampling::percent(5.0)
    );
    // An environment tag is read at load: its value, else its default, else no tag.
    let env = tracing(
        "istio-system",
        "mesh",
        "",
        "  - providers: [{name: z}]\n    customTags:\n      path: {environment: {name: PATH}}\n      none: {environment: {name: WAYPOINT_TEST_UNSET_VARIABLE}}\n      dflt: {environment: {name: WAYPOINT_TEST_UNSET_VARIABLE, defaultValue: d}}\n",
    );
    let cfg = try_load(&[PROVIDERS.to_string(), env]).unwrap();
    let path = std::env::var("PATH").unwrap();
    assert_eq!(
        traced(&cfg, "app", "loud").unwrap().2,
        vec!["dflt=d".to_string(), format!("path={path}")]
    );
}

/// An access log's entries, as Istio's `mergeLogs`: each sets the providers it names (none:
/// the previous entry's, the first one's the default ones) on with its filter, or off; a
/// later entry over an earlier one.
#[test]
fn access_log_entries_merge_per_provider() {
    let errors = "  - filter: {expression: \"response.code >= 400\"}\n";
    let slow = "  - filter: {expression: \"request.duration > duration('1s')\"}\n";
    let all = "  - providers: [{name: envoy}]\n";
    let off = "  - disabled: true\n    filter: {expression: \"response.code >= 500\"}\n";
    let on = |filtered: bool| vec![("envoy".to_string(), filtered)];
    // (entries, logs)
    let table: [(String, Vec<(String, bool)>); 5] = [
        (errors.to_string(), on(true)),
        // The later entry's filter.
        (format!("{errors}{slow}"), on(true)),
        (format!("{errors}{all}"), on(false)),
        (format!("{all}{errors}"), on(true)),
        (off.to_string(), vec![]),
    ];
    for (i, (entries, want)) in table.into_iter().enumerate() {
        let cfg = try_load(&[telemetry("istio-system", "mesh", "", &entries)])
            .unwrap_or_else(|e| panic!("row {i}: {e}"));
        assert_eq!(logs(&cfg, "app", "loud"), want, "row {i}");
    }
}

/// Access log providers: MeshConfig `envoyFileAccessLog` ones and `defaultProviders`, named
/// by Telemetries at each level, merged as Istio's `mergeLogs` (only the providers the most
/// specific Telemetry naming any names are in scope).
#[test]
fn access_log_providers_merge_across_the_hierarchy() {
    let providers = |defaults: &str| {
        format!(
            "meshConfig:\n  extensionProviders:\n  - name: json\n    envoyFileAccessLog: {{path: /dev/null, logFormat: {{labels: {{code: \"%RESPONSE_CODE%\"}}}}}}\n  - name: text\n    envoyFileAccessLog: {{path: /dev/null}}\n{defaults}"
        )
    };
    let svc = |n: &str| format!("  targetRefs: [{{kind: Service, group: \"\", name: {n}}}]\n");
    let names =
        |v: &[&str]| -> Vec<(String, bool)> { v.iter().map(|n| (n.to_string(), false)).collect() };
    let mesh_json = telemetry(
        "istio-system",
        "mesh",
        "",
        "  - providers: [{name: json}]\n",
    );
    let mesh_both = telemetry(
        "istio-system",
        "mesh",
        "",
        "  - providers: [{name: envoy}, {name: json}]\n",
    );
    let app_text = telemetry("app", "ns", "", "  - providers: [{name: text}]\n");
    let loud_json_off = telemetry(
        "app",
        "loud",
        &svc("loud"),
        "  - providers: [{name: json}]\n    disabled: true\n",
    );
    let loud_inherit = telemetry(
        "app",
        "loud",
        &svc("loud"),
        "  - providers: [{name: text}]\n  - filter: {expression: \"response.code >= 500\"}\n",
    );
    // (documents, loud, quiet, shop/other)
    let table: Vec<(Vec<String>, [Logs; 3])> = vec![
        (
            vec![providers("")],
            [names(&["envoy"]), names(&["envoy"]), names(&["envoy"])],
        ),
        (
            vec![providers(
                "  defaultProviders: {accessLogging: [json, envoy]}\n",
            )],
            [
                names(&["envoy", "json"]),
                names(&["envoy", "json"]),
                names(&["envoy", "json"]),
            ],
        ),
        (
            vec![providers(""), mesh_json.clone()],
            [names(&["json"]), names(&["json"]), names(&["json"])],
        ),
        // The namespace names its own: the mesh's is out of scope there.
        (
            vec![providers(""), mesh_json.clone(), app_text.clone()],
            [names(&["text"]), names(&["text"]), names(&["json"])],
        ),
        // The service turns json off and names no other: envoy is out of scope for it.
        (
            vec![providers(""), mesh_both.clone(), loud_json_off],
            [vec![], names(&["envoy", "json"]), names(&["envoy", "json"])],
        ),
        // An entry without providers takes the previous entry's.
        (
            vec![providers(""), mesh_json, loud_inherit],
            [
                vec![("text".to_string(), true)],
                names(&["json"]),
                names(&["json"]),
            ],
        ),
    ];
    for (i, (docs, want)) in table.into_iter().enumerate() {
        let cfg = try_load(&docs).unwrap_or_else(|e| panic!("row {i}: {e}"));
        let got = [
            logs(&cfg, "app", "loud"),
            logs(&cfg, "app", "quiet"),
            logs(&cfg, "shop", "other"),
        ];
        assert_eq!(got, want, "row {i}");
    }
}

/// The tag overrides of a request to `ns/name`, by metric: (label, `None` REMOVE / `Some`
/// UPSERT).
fn tags(cfg: &WaypointConfig, ns: &str, name: &str) -> Vec<Vec<(String, bool)>> {
    match choice(cfg, ns, name).tags {
        None => vec![],
        Some(t) => {
            t.0.iter()
                .map(|list| {
                    list.iter()
                        .map(|(n, o)| {
                            (
                                n.clone(),
                                matches!(o, waypoint::config::TagOverride::Upsert(_)),
                            )
                        })
                        .collect()
                })
                .collect()
        }
    }
}

/// Tag overrides merge as Istio's `mergeMetrics`: label by label, a more specific
/// Telemetry's over a less specific one's, a later override over an earlier one;
/// `ALL_METRICS` (or no match) names the four; an override without `disabled` leaves the
/// metric's reporting as it was.
#[test]
fn metric_tag_overrides_merge_label_by_label() {
    let svc = |n: &str| format!("  targetRefs: [{{kind: Service, group: \"\", name: {n}}}]\n");
    let mesh = format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh, namespace: istio-system}}\nspec:\n  metrics:\n{}",
        "  - overrides:\n    - tagOverrides: {a: {value: \"request.host\"}, b: {operation: REMOVE}}\n    - match: {metric: REQUEST_COUNT}\n      tagOverrides: {a: {operation: REMOVE}}\n"
    );
    let loud = metrics(
        "l",
        &svc("loud"),
        "  - overrides:\n    - match: {metric: REQUEST_SIZE}\n      tagOverrides: {b: {value: \"'x'\"}, c: {value: \"request.method\"}}\n",
    );
    let cfg = try_load(&[mesh, loud]).unwrap();
    let t = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
        v.iter().map(|(n, u)| (n.to_string(), *u)).collect()
    };
    // The four request metrics, then the four TCP ones (ALL_METRICS names them too).
    let all = t(&[("a", true), ("b", false)]);
    let tcp = vec![all.clone(); 4];
    assert_eq!(
        tags(&cfg, "app", "quiet"),
        [
            vec![
                t(&[("a", false), ("b", false)]),
                all.clone(),
                all.clone(),
                all.clone()
            ],
            tcp.clone()
        ]
        .concat()
    );
    assert_eq!(
        tags(&cfg, "app", "loud"),
        [
            vec![
                t(&[("a", false), ("b", false)]),
                all.clone(),
                t(&[("a", true), ("b", true), ("c", true)]),
                all.clone()
            ],
            tcp
        ]
        .concat()
    );
    // Tags only: every metric still reported.
    assert_eq!(shown(&cfg, "app", "loud"), 0b1111);
    assert!(tags(&try_load(&[]).unwrap(), "app", "loud").is_empty());
}

/// The built-in `envoy` provider: the waypoint's own line until MeshConfig sets a file, a
/// format or an encoding (empty ones are unset, as Istio reads `accessLogFile: ""`).
#[test]
fn mesh_access_log_settings_make_the_builtin_provider_envoy_formatted() {
    use waypoint::config::LogProvider;
    let builtin = |mesh: &str| {
        let cfg = try_load(&[format!("meshConfig:\n{mesh}")]).unwrap_or_else(|e| panic!("{e}"));
        matches!(*cfg.log_providers["envoy"], LogProvider::Builtin)
    };
    assert!(builtin("  accessLogFile: \"\"\n"));
    assert!(builtin(
        "  accessLogFile: \"\"\n  accessLogFormat: \"\"\n  accessLogEncoding: \"\"\n"
    ));
    assert!(builtin("  extensionProviders: []\n"));
    assert!(!builtin("  accessLogFile: /dev/null\n"));
    assert!(!builtin("  accessLogEncoding: JSON\n"));
    assert!(!builtin("  accessLogFormat: \"%RESPONSE_CODE%\"\n"));
    assert!(matches!(
        *try_load(&[]).unwrap().log_providers["envoy"],
        LogProvider::Builtin
    ));
}
