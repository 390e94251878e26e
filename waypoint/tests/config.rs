//! The multi-document configuration: what loads, and errors that name document, line, field.

use std::path::Path;
use std::time::Duration;

use waypoint::breaker::Limits;
use waypoint::config::{gateway_duration, load_str, LoadError, ServiceLb};
use waypoint::lb::{HashKey, LbPolicy, OutlierDetection};
use waypoint::route::ObjectRef;

fn err(text: &str) -> LoadError {
    match load_str(Path::new("w.yaml"), text, 1) {
        Ok(_) => panic!("loaded:\n{text}"),
        Err(e) => e,
    }
}

const MESH: &str = "services:\n  - {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: [\"10.96.0.10\"], ports: {80: 8080}}\n";

/// A key set of one P-256 key (its point is not checked until a token is).
const JWKS: &str = r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "y": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]}"#;

const ROUTE_V1: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: r
  namespace: default
spec:
  parentRefs:
  - {group: \"\", kind: Service, name: echo}
  rules:
  - backendRefs: [{name: echo, port: 80}]
";

#[test]
fn loads_every_kind_and_version() {
    let dr = |api: &str, name: &str, host: &str, tp: &str| {
        format!("apiVersion: networking.istio.io/{api}\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  host: {host}\n  trafficPolicy:\n{tp}")
    };
    let text = [
        format!("# the model\n{MESH}"),
        ROUTE_V1.to_string(),
        ROUTE_V1.replace("/v1\n", "/v1beta1\n").replace("name: r\n", "name: r2\n"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: DENY}\n".to_string(),
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: b}\nspec: {action: AUDIT, rules: [{}]}\n".to_string(),
        // The destination ztunnel's to enforce: checked, set aside.
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n".to_string(),
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: db}\nspec:\n  selector: {matchLabels: {app: db}}\n  portLevelMtls: {5432: {mode: PERMISSIVE}}\n".to_string(),
        dr("v1", "d1", "echo", "    loadBalancer: {simple: ROUND_ROBIN}\n"),
        dr("v1beta1", "d2", "a.other", "    loadBalancer: {consistentHash: {httpHeaderName: X-User}}\n    outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 4, interval: 2s, baseEjectionTime: 10s, maxEjectionPercent: 50}\n"),
        dr("v1alpha3", "d3", "b.other.svc.cluster.local", "    loadBalancer: {consistentHash: {httpCookie: {name: session}}}\n"),
        dr("v1", "d4", "c.other.svc", "    loadBalancer: {consistentHash: {useSourceIp: true}}\n"),
        dr("v1", "d5", "d.other", "    loadBalancer: {simple: RANDOM}\n    outlierDetection: {}\n"),
        dr("v1", "d6", "e.other", "    loadBalancer: {simple: LEAST_REQUEST}\n"),
        dr("v1", "d10", "i.other", "    loadBalancer: {consistentHash: {httpQueryParameterName: user}}\n"),
        dr("v1", "d7", "f.other", "    connectionPool:\n      tcp: {maxConnections: 100, connectTimeout: 250ms}\n      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 5, maxRetries: 3}\n"),
        // 0 is Istio's unset: no limit; a DestinationRule setting none has no breaker.
        dr("v1", "d8", "g.other", "    connectionPool:\n      tcp: {maxConnections: 0}\n      http: {http2MaxRequests: 7}\n"),
        dr("v1", "d9", "h.other", "    connectionPool:\n      http: {idleTimeout: 10s}\n    tls: {mode: ISTIO_MUTUAL, sni: h.other.svc.cluster.local}\n"),
    ]
    .join("---\n");
    let cfg = load_str(Path::new("w.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.mesh.is_some());
    assert!(cfg.service_exists(&ObjectRef::new("default", "echo")));
    assert_eq!(cfg.routes.routes().len(), 2);
    // Both namespace-wide (no targetRefs): loaded, and not enforced by a waypoint (Istio);
    // nor are PeerAuthentications (the destination ztunnel's).
    assert_eq!(cfg.policies.len(), 0);
    let ignored: Vec<(&str, &str)> = cfg
        .ignored_policies
        .iter()
        .map(|p| (p.kind, p.reason))
        .collect();
    assert_eq!(
        ignored,
        [
            ("AuthorizationPolicy", "no_target_refs"),
            ("AuthorizationPolicy", "no_target_refs"),
            ("PeerAuthentication", "ztunnel_enforces"),
            ("PeerAuthentication", "ztunnel_enforces"),
        ]
    );
    let lb = |ns: &str, n: &str| cfg.lb(&ObjectRef::new(ns, n), None);
    assert_eq!(lb("default", "echo").policy, LbPolicy::RoundRobin);
    assert_eq!(
        lb("other", "a"),
        ServiceLb {
            policy: LbPolicy::ConsistentHash(HashKey::Header("x-user".into())),
            outlier: Some(OutlierDetection {
                consecutive_5xx: 3,
                base_ejection_time: Duration::from_secs(10),
                max_ejection_percent: 50,
                interval: Duration::from_secs(2),
                consecutive_gateway: 4,
            }),
            use_client_protocol: false,
            // Istio: locality failover is on with outlier detection.
            locality: Some(waypoint::lb::LocalityLb::default()),
            warmup: None,
        }
    );
    assert_eq!(
        lb("other", "b").policy,
        LbPolicy::ConsistentHash(HashKey::Cookie(waypoint::lb::CookieKey {
            name: "session".into(),
            ttl: None,
            path: None,
            attributes: vec![],
        }))
    );
    assert_eq!(
        lb("other", "c").policy,
        LbPolicy::ConsistentHash(HashKey::SourceIp)
    );
    assert_eq!(lb("other", "d").policy, LbPolicy::Random);
    assert_eq!(lb("other", "d").outlier, Some(OutlierDetection::default()));
    assert_eq!(lb("other", "e").policy, LbPolicy::LeastRequest);
    assert_eq!(
        lb("other", "i").policy,
        LbPolicy::ConsistentHash(HashKey::Query("user".into()))
    );
    // No DestinationRule: least request, no outlier detection.
    assert_eq!(lb("default", "nope"), ServiceLb::default());
    // connectionPool limits: the circuit breakers (Istio's defaults where unset).
    let limits = |n: &str| {
        cfg.breaker(&ObjectRef::new("other", n), None)
            .map(|b| b.limits)
    };
    assert_eq!(
        limits("f"),
        Some(Limits {
            max_connections: 100,
            max_pending: 10,
            max_requests: 1000,
            max_retries: 3,
            max_requests_per_connection: 5,
            connect_timeout: Some(Duration::from_millis(250)),
        })
    );
    assert_eq!(
        limits("g"),
        Some(Limits {
            max_requests: 7,
            ..Limits::default()
        })
    );
    assert_eq!(limits("h"), None);
    assert_eq!(limits("a"), None);
}

/// A reload keeps a service's breaker (what is in flight against its limits) while its
/// limits stay the same; changed limits start afresh.
#[test]
fn reload_keeps_a_breaker_whose_limits_did_not_change() {
    let text = |a: u32, b: u32| {
        format!("{MESH}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: a, namespace: default}}\nspec:\n  host: a\n  trafficPolicy:\n    connectionPool: {{http: {{http2MaxRequests: {a}}}}}\n    portLevelSettings: [{{port: {{number: 80}}, connectionPool: {{http: {{http2MaxRequests: 1}}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: b, namespace: default}}\nspec:\n  host: b\n  trafficPolicy:\n    connectionPool: {{http: {{http2MaxRequests: {b}}}}}\n")
    };
    let old = load_str(Path::new("w.yaml"), &text(1, 1), 1).unwrap();
    let (a, b) = (
        ObjectRef::new("default", "a"),
        ObjectRef::new("default", "b"),
    );
    let held = old.breaker(&a, None).unwrap().request().unwrap();
    let held_80 = old.breaker(&a, Some(80)).unwrap().request().unwrap();
    let _held_b = old.breaker(&b, None).unwrap().request().unwrap();
    let mut new = load_str(Path::new("w.yaml"), &text(1, 2), 2).unwrap();
    new.adopt_breakers(&old);
    // a: the same breaker, its request still counted (its limit reached).
    assert!(new.breaker(&a, None).unwrap().request().is_err());
    drop(held);
    assert!(new.breaker(&a, None).unwrap().request().is_ok());
    // a's port 80 (`portLevelSettings`): the same breaker too.
    assert!(new.breaker(&a, Some(80)).unwrap().request().is_err());
    drop(held_80);
    assert!(new.breaker(&a, Some(80)).unwrap().request().is_ok());
    // b: new limits, nothing in use.
    assert_eq!(new.breaker(&b, None).unwrap().in_use(), (0, 0, 0, 0));
}

/// (text, document, line, field substring, message substring)
#[test]
fn errors_name_document_line_and_field() {
    let route_with = |extra_rule_line: &str| format!("{ROUTE_V1}{extra_rule_line}");
    let ap = |spec: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a}}\nspec:\n{spec}")
    };
    let ra = |rules: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: a}}\nspec:\n  jwtRules:\n{rules}")
    };
    let table: Vec<(String, usize, Option<usize>, &str, &str)> = vec![
        // An unknown field in the second document, on the file's line 14.
        (
            format!("{MESH}---\n{}", route_with("    bogus: 1\n")),
            2,
            Some(14),
            "spec.rules[0]",
            "unknown field `bogus`",
        ),
        // Unknown metadata key.
        (
            ROUTE_V1.replace("  namespace: default\n", "  uid: x\n"),
            1,
            Some(5),
            "metadata",
            "unknown field `uid`",
        ),
        // CUSTOM names a provider of the MeshConfig document, which names a model service.
        (
            format!("{ROUTE_V1}---\n{}", ap("  action: CUSTOM\n  rules: [{}]\n")),
            2,
            Some(15),
            "spec.provider.name",
            "required for CUSTOM",
        ),
        (
            format!("{ROUTE_V1}---\n{}", ap("  action: CUSTOM\n  provider: {name: nope}\n  rules: [{}]\n")),
            2,
            Some(17),
            "spec.provider.name",
            "no extension provider \"nope\"",
        ),
        (ap("  action: DENY\n  provider: {name: x}\n"), 1, Some(6), "spec.provider", "only for action CUSTOM"),
        (
            format!("{MESH}---\nmeshConfig:\n  extensionProviders:\n  - name: s\n    skywalking: {{service: s, port: 11800}}\n"),
            2,
            Some(7),
            "meshConfig.extensionProviders[0]",
            "unknown field `skywalking`",
        ),
        (
            format!("{MESH}---\nmeshConfig:\n  extensionProviders:\n  - name: a\n    envoyExtAuthzHttp: {{service: authz.default.svc.cluster.local, port: 80}}\n"),
            2,
            Some(7),
            "meshConfig.extensionProviders[0].envoyExtAuthzHttp.service",
            "not a service of the mesh model",
        ),
        (
            format!("{MESH}---\nmeshConfig:\n  extensionProviders:\n  - name: a\n    envoyExtAuthzHttp:\n      service: echo.default.svc.cluster.local\n      port: 80\n      statusOnError: \"99\"\n"),
            2,
            Some(10),
            "statusOnError",
            "not an HTTP status",
        ),
        // A claim condition written other than request.auth.claims[name][member]….
        (
            ap("  rules:\n  - when:\n    - key: request.auth.claims[]\n      values: [x]\n"),
            1,
            None,
            "spec.rules[0].when[0].key",
            "request.auth.claims[name]",
        ),
        (
            ap("  rules:\n  - when:\n    - key: request.auth.claims.iss\n      values: [x]\n"),
            1,
            None,
            "spec.rules[0].when[0].key",
            "request.auth.claims[name]",
        ),
        // RequestAuthentication: key sets inline only, valid ones, usable header names.
        (ra(&format!("  - issuer: i\n    jwks: '{JWKS}'\n    jwksUri: https://example.com/jwks\n")), 1, Some(8), "spec.jwtRules[0].jwksUri", "only one of jwks and jwksUri"),
        (ra("  - issuer: i\n    jwksUri: ftp://example.com/jwks\n"), 1, Some(7), "spec.jwtRules[0].jwksUri", "http:// or https://"),
        (ra("  - issuer: i\n    jwksUri: https://x/k\n    timeout: 5 seconds\n"), 1, Some(8), "spec.jwtRules[0].timeout", ""),
        (ra("  - issuer: i\n"), 1, Some(6), "spec.jwtRules[0].jwks", "jwks or jwksUri is required"),
        (ra("  - issuer: \"\"\n    jwks: x\n"), 1, Some(6), "spec.jwtRules[0].issuer", "must not be empty"),
        (ra("  - issuer: i\n    jwks: '{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"AA\", \"y\": \"AA\"}]}'\n"), 1, Some(7), "spec.jwtRules[0].jwks", "x and y must be 32 bytes"),
        (ra("  - issuer: i\n    jwks: 'not json'\n"), 1, Some(7), "spec.jwtRules[0].jwks", "not a JWKS"),
        (ra(&format!("  - issuer: i\n    jwks: '{JWKS}'\n    fromHeaders: [{{name: \"bad name\"}}]\n")), 1, None, "spec.jwtRules[0].fromHeaders[0].name", "not a valid header name"),
        (ra(&format!("  - issuer: i\n    jwks: '{JWKS}'\n    outputClaimToHeaders: [{{header: host, claim: sub}}]\n")), 1, None, "outputClaimToHeaders[0].header", "sets itself"),
        (ra(&format!("  - issuer: i\n    jwks: '{JWKS}'\n    outputClaimToHeaders: [{{header: x-a, claim: a..b}}]\n")), 1, None, "outputClaimToHeaders[0].claim", "not a claim name"),
        (ra(&format!("  - issuer: i\n    jwks: '{JWKS}'\n    fromCookies: [\"a=b\"]\n")), 1, None, "fromCookies[0]", "not a cookie name"),
        (ra("  - issuer: i\n    jwks: x\n    audience: [a]\n"), 1, Some(8), "spec.jwtRules[0]", "unknown field `audience`"),
        (
            ap("  rules:\n  - when:\n    - key: connection.sni\n      values: [x]\n"),
            1,
            None,
            "spec.rules[0].when[0].key",
            "unsupported condition key",
        ),
        (ap("  rules:\n  - when:\n    - key: source.ip\n"), 1, None, "when[0].values", "values or notValues"),
        (ap("  rules:\n  - to:\n    - operation:\n        paths: [\"/{**}/x\"]\n"), 1, None, "paths[0]", "last segment"),
        (ap("  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/40]\n"), 1, Some(8), "ipBlocks", "prefix length"),
        (
            ap("  targetRefs: [{kind: Service, name: a}]\n  selector: {matchLabels: {a: b}}\n"),
            1,
            Some(6),
            "spec.selector",
            "cannot be combined",
        ),
        (ap("  targetRefs: [{kind: Pod, name: a}]\n"), 1, None, "spec.targetRefs[0].kind", "unsupported target"),
        (ap("  action: MAYBE\n"), 1, Some(5), "spec.action", "unknown variant"),
        // HTTPRoute features the waypoint does not implement, or invalid combinations.
        (ROUTE_V1.replace("  parentRefs:", "  hostnames: [a]\n  parentRefs:"), 1, Some(7), "spec.hostnames", "not supported"),
        (ROUTE_V1.replace("{group: \"\", kind: Service, name: echo}", "{name: gw}"), 1, None, "spec.parentRefs[0]", "only for Services"),
        (route_with("    filters: [{type: ExtensionRef}]\n"), 1, None, "spec.rules[0].filters[0].type", "unknown variant"),
        (route_with("    filters: [{type: RequestHeaderModifier}]\n"), 1, None, "spec.rules[0].filters[0]", "needs its own field"),
        (route_with("    matches: [{path: {type: RegularExpression, value: \"(\"}}]\n"), 1, None, "spec.rules[0].matches[0].path.value", "regular expression"),
        (route_with("    matches: [{path: {type: Exact, value: x}}]\n"), 1, None, "path.value", "must start with /"),
        (route_with("    matches: [{method: FETCH}]\n"), 1, None, "method", "unknown variant"),
        (
            route_with("    matches: [{path: {type: Exact, value: /x}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}}]\n"),
            1,
            None,
            "spec.rules[0].filters",
            "ReplacePrefixMatch needs",
        ),
        (
            route_with("    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]\n"),
            1,
            None,
            "statusCode",
            "301, 302, 303, 307 or 308",
        ),
        (route_with("    timeouts: {request: 10 seconds}\n"), 1, None, "spec.rules[0].timeouts.request", "invalid duration"),
        (route_with("    timeouts: {request: 1s, backendRequest: 2s}\n"), 1, None, "backendRequest", "must not exceed"),
        (ROUTE_V1.replace("[{name: echo, port: 80}]", "[{name: echo}]"), 1, None, "backendRefs[0].port", "required"),
        (ROUTE_V1.replace("[{name: echo, port: 80}]", "[{name: echo, kind: ServiceImport, port: 80}]"), 1, None, "backendRefs[0]", "only Services"),
        (format!("{ROUTE_V1}---\n{ROUTE_V1}"), 2, Some(15), "metadata.name", "duplicate"),
        // Documents and kinds.
        (ROUTE_V1.replace("kind: HTTPRoute", "kind: TLSRoute"), 1, Some(2), "kind", "unsupported kind"),
        (ROUTE_V1.replace("gateway.networking.k8s.io/v1", "example.com/v1"), 1, Some(1), "apiVersion", "unsupported apiVersion"),
        (ROUTE_V1.replace("kind: HTTPRoute\n", ""), 1, None, "kind", "required"),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    outlierDetection: {splitExternalLocalOriginErrors: true}\n".into(),
            1,
            Some(7),
            "outlierDetection",
            "unknown field `splitExternalLocalOriginErrors`",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    outlierDetection: {interval: 0s}\n".into(),
            1,
            None,
            "outlierDetection.interval",
            "more than 0",
        ),
        // tls: ISTIO_MUTUAL is what HBONE is; SIMPLE/MUTUAL originate TLS to endpoints
        // outside the mesh, from files (no Kubernetes secrets).
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    tls: {mode: SIMPLE, credentialName: echo-tls}\n".into(),
            1,
            None,
            "tls.credentialName",
            "Kubernetes secrets",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    tls: {mode: DISABLE}\n".into(),
            1,
            None,
            "tls.mode",
            "HBONE",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL, caCrl: c}\n".into(),
            1,
            Some(7),
            "tls",
            "unknown field `caCrl`",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL, caCertificates: /etc/ca.pem}\n".into(),
            1,
            None,
            "tls.caCertificates",
            "ISTIO_MUTUAL",
        ),
        // connectionPool: what the waypoint does not enforce is refused, by name.
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 10, tcpKeepalive: {time: 7200s}}\n".into(),
            1,
            Some(8),
            "connectionPool.tcp",
            "unknown field `tcpKeepalive`",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    connectionPool:\n      http: {maxRetries: -1}\n".into(),
            1,
            Some(8),
            "connectionPool.http.maxRetries",
            "integer `-1`, expected u32",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    connectionPool:\n      tcp: {connectTimeout: soon}\n".into(),
            1,
            None,
            "connectionPool.tcp.connectTimeout",
            "soon",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: \"*.local\"\n".into(),
            1,
            Some(5),
            "spec.host",
            "expected a service name",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer: {simple: PASSTHROUGH}\n".into(),
            1,
            Some(7),
            "simple",
            "unknown variant",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: a, httpQueryParameterName: q}\n".into(),
            1,
            None,
            "consistentHash",
            "exactly one",
        ),
        // The mesh-model document: its errors keep mesh-model's field and the file's line.
        (format!("{ROUTE_V1}---\n# model\nservices:\n  - {{name: a}}\n"), 2, Some(14), "services[0]", "missing field"),
        (format!("{MESH}---\n{MESH}"), 2, None, "workloads", "second mesh-model document"),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  mtls:\n    mode: STRICTER\n".to_string(),
            1,
            Some(6),
            "spec.mtls.mode",
            "unknown variant",
        ),
    ];
    for (text, doc, line, field, msg) in table {
        let e = err(&text);
        let shown = e.to_string();
        assert_eq!(e.document, doc, "{shown}\n{text}");
        if let Some(l) = line {
            assert_eq!(e.line, Some(l), "{shown}\n{text}");
        }
        assert!(e.line.is_some(), "every error has a line: {shown}");
        assert!(
            e.field.as_deref().is_some_and(|f| f.contains(field)),
            "field {field:?} in {shown}"
        );
        assert!(e.message.contains(msg), "message {msg:?} in {shown}");
        assert!(shown.starts_with("w.yaml:"), "{shown}");
        assert!(shown.contains(&format!("document {doc}")), "{shown}");
    }
}

#[test]
fn gateway_durations() {
    let ok = [
        ("1h", 3_600_000),
        ("30m", 1_800_000),
        ("10s", 10_000),
        ("500ms", 500),
        ("1m30s", 90_000),
        ("0s", 0),
    ];
    for (s, ms) in ok {
        assert_eq!(gateway_duration(s), Ok(Duration::from_millis(ms)), "{s}");
    }
    for s in ["", "10", "s", "1.5s", "1d", "123456s", "-1s"] {
        assert!(gateway_duration(s).is_err(), "{s}");
    }
}

#[test]
fn settings_document_loads_with_defaults_and_names_bad_fields() {
    let settings = "waypoint:\n  identity: spiffe://cluster.local/ns/app/sa/wp\n  gateway: app/wp\n  ca: {static: /certs}\n";
    let text = format!("{MESH}---\n{settings}runtime: {{workers: 1}}\n---\n{ROUTE_V1}");
    let cfg = load_str(Path::new("w.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"));
    let s = cfg.settings.expect("settings document");
    assert_eq!(s.waypoint.listen, "0.0.0.0:15008".parse().unwrap());
    assert_eq!(s.waypoint.address, None);
    assert_eq!(s.waypoint.stats, None);
    assert_eq!(s.waypoint.trust_domain, "cluster.local");
    assert_eq!(s.waypoint.root_namespace, "istio-system");
    assert_eq!(s.gateway().unwrap(), ObjectRef::new("app", "wp"));
    assert_eq!(s.runtime.unwrap().workers, Some(1));
    assert!(cfg.mesh.is_some());
    assert_eq!(cfg.routes.routes().len(), 1);

    // Errors: document, line in the whole file, field.
    let e = err(&format!("{MESH}---\n{}", settings.replace("app/wp", "wp")));
    assert_eq!((e.document, e.line), (2, Some(6)), "{e}");
    assert_eq!(e.field.as_deref(), Some("waypoint.gateway"), "{e}");
    let e = err(&format!("{MESH}---\n{settings}  ca_dir: /x\n"));
    assert_eq!((e.document, e.line), (2, Some(8)), "{e}");
    assert!(e.to_string().contains("ca_dir"), "{e}");
    let e = err(&format!("{MESH}---\n{settings}runtime: {{workers: 0}}\n"));
    assert_eq!(e.document, 2, "{e}");
    assert!(
        e.field.as_deref().unwrap_or("").starts_with("runtime"),
        "{e}"
    );
    // The h2 knobs are checked too (a congestion control this host lacks; a bad watermark).
    let e = err(&format!(
        "{MESH}---\n{settings}h2:\n  tcp_congestion: nosuchcc\n"
    ));
    assert_eq!(e.document, 2, "{e}");
    assert_eq!(e.field.as_deref(), Some("h2.tcp_congestion"), "{e}");
    assert_eq!(e.line, Some(9), "{e}");
    let e = err(&format!(
        "{MESH}---\n{settings}h2:\n  socket_notsent_lowat: 1\n"
    ));
    assert_eq!(e.field.as_deref(), Some("h2.socket_notsent_lowat"), "{e}");
    let e = err(&format!("apiVersion: v1\nkind: ConfigMap\n{settings}"));
    assert_eq!(e.field.as_deref(), Some("waypoint"), "{e}");
}

/// `portLevelSettings`: per service port, each entry in place of the whole service's
/// policy for its port (Istio: unset fields at their defaults, not inherited).
#[test]
fn port_level_settings_replace_the_services_policy_at_their_port() {
    let text = format!(
        "{MESH}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: default}}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer: {{simple: ROUND_ROBIN}}\n    connectionPool: {{http: {{maxRetries: 3}}}}\n    portLevelSettings:\n    - port: {{number: 80}}\n      loadBalancer: {{simple: RANDOM}}\n      connectionPool: {{http: {{http2MaxRequests: 5, idleTimeout: 0s}}}}\n    - port: {{number: 9090}}\n      loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}\n"
    );
    let cfg = load_str(Path::new("w.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"));
    let echo = ObjectRef::new("default", "echo");
    assert_eq!(cfg.lb(&echo, Some(80)).policy, LbPolicy::Random);
    assert_eq!(
        cfg.lb(&echo, Some(9090)).policy,
        LbPolicy::ConsistentHash(HashKey::Header("x-user".into()))
    );
    assert_eq!(cfg.lb(&echo, Some(8080)).policy, LbPolicy::RoundRobin);
    assert_eq!(cfg.lb(&echo, None).policy, LbPolicy::RoundRobin);
    // Port 80's limits replace the service's: maxRetries is back at Istio's default.
    let at = |port| cfg.breaker(&echo, port).map(|b| b.limits);
    assert_eq!(
        at(Some(80)),
        Some(Limits {
            max_requests: 5,
            ..Limits::default()
        })
    );
    assert_eq!(
        at(Some(8080)),
        Some(Limits {
            max_retries: 3,
            ..Limits::default()
        })
    );
    assert_eq!(at(Some(9090)), None, "port 9090 sets no limit");
    assert_eq!(cfg.idle_expiry(Some(&echo), Some(80)), Duration::MAX);
    assert_eq!(
        cfg.idle_expiry(Some(&echo), Some(9090)),
        waypoint::upstream::IDLE_STREAM_EXPIRY
    );
    for (tp, field, msg) in [
        (
            "    portLevelSettings:\n    - loadBalancer: {simple: RANDOM}\n",
            "spec.trafficPolicy.portLevelSettings[0].port",
            "required",
        ),
        (
            "    portLevelSettings:\n    - port: {number: 80}\n    - port: {number: 80}\n",
            "spec.trafficPolicy.portLevelSettings[1].port.number",
            "a second entry for port 80",
        ),
        (
            "    port: {number: 80}\n",
            "spec.trafficPolicy.port",
            "only in portLevelSettings",
        ),
        (
            "    portLevelSettings:\n    - port: {number: 80}\n      connectionPool: {http: {idleTimeout: soon}}\n",
            "spec.trafficPolicy.portLevelSettings[0].connectionPool.http.idleTimeout",
            "soon",
        ),
    ] {
        let text = format!(
            "{MESH}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: echo\n  trafficPolicy:\n{tp}"
        );
        let e = err(&text);
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(e.message.contains(msg), "{e}");
    }
}
