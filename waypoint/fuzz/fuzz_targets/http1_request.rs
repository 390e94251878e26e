//! Fuzz what the waypoint does with the bytes a client sends inside a tunnel: protocol
//! detection, the HTTP/1.1 request head (framing, normalization, upgrade, target, path
//! normalization), the policy and routing decision on it under a configuration with
//! regular expressions, templates, header and query matches, redirects and rewrites, the
//! upstream head built from it; and the response-side parsers (chunked bodies, HTTP/1.1 to
//! HTTP/2 responses) on the same bytes.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use waypoint::config::WaypointConfig;
use waypoint::http1::{self, Action, Destination, Parsed, TunnelCtx};
use waypoint::lb::SplitMix64;
use waypoint::route::ObjectRef;

const CONFIG: &str = r#"services:
  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {80: 8080}}
  - {name: echo-v1, namespace: app, hostname: echo-v1.app.svc.cluster.local, vips: ["10.96.0.2"], ports: {80: 8080}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: RegularExpression, value: '/re/[a-z]+(/.*)?'}, headers: [{name: x-v, value: '1'}]}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}, queryParams: [{name: q, type: RegularExpression, value: '.+'}]}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: new.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 3}, {name: echo, port: 80, weight: 1}]
  - matches: [{path: {type: Exact, value: /moved}, method: GET}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, path: {type: ReplaceFullPath, replaceFullPath: /here}, statusCode: 301}}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: b}], remove: [x-drop]}}]
    backendRefs: [{name: echo, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/{**}", "*.secret", "/x/{*}/y"], notMethods: [OPTIONS]}}]
    when: [{key: "request.headers[x-token]", notValues: ["ok*"]}]
"#;

fn config() -> &'static WaypointConfig {
    static CFG: OnceLock<WaypointConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        waypoint::config::load_str(Path::new("fuzz.yaml"), CONFIG, 1)
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = waypoint::inner::classify(data);
    let _ = waypoint::h2srv::dechunk(data);
    let _ = waypoint::h2srv::to_h2(data, data.first().is_some_and(|b| b & 1 == 1));
    let _ = waypoint::service::chunked_end(data);
    let Parsed::Head(head, n) = http1::parse_head(data) else {
        return;
    };
    assert!(n <= data.len());
    let _ = http1::body_framing(&head);
    let target = http1::target_of(&head);
    let _ = waypoint::path::normalize(&target);
    let upgrade = http1::allowed_upgrade(&head);
    let mut normalized = head.clone();
    http1::normalize_request(&mut normalized, upgrade.as_deref());
    let source = "10.1.0.2".parse().unwrap();
    let _ = http1::remote_ip(&head, source, 2);
    let ctx = TunnelCtx {
        waypoint: ObjectRef::new("app", "wp"),
        root_namespace: "istio-system".into(),
        destination: Destination::Service {
            service: ObjectRef::new("app", "echo"),
            port: 80,
        },
        destination_ip: "10.96.0.1".parse().unwrap(),
        destination_port: 80,
        source_ip: source,
        principal: Some("cluster.local/ns/app/sa/client".into()),
        client_namespace: None,
        traceparent: None,
    };
    let mut rng = SplitMix64(n as u64);
    if let Action::Forward { forward, .. } = http1::decide(config(), &ctx, &mut normalized, &mut rng) {
        let up = http1::upstream_head(&normalized, &forward, source);
        // What goes upstream is itself one well-formed head.
        // (Or one past the head size limit: the added fields can take it there.)
        match http1::parse_head(&up) {
            Parsed::Head(_, m) => assert_eq!(m, up.len(), "{}", String::from_utf8_lossy(&up)),
            Parsed::Bad(431) => {}
            other => panic!("upstream head {other:?}: {}", String::from_utf8_lossy(&up)),
        }
    }
});
