//! AuthorizationPolicy (R15) table tests, from Istio's AuthorizationPolicy reference: each
//! field, the `not*` forms, path templates, attachment and evaluation order.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use waypoint::authz::{
    custom, custom_tcp, evaluate, evaluate_tcp, PathPattern, Policy, Request, Subject, Verdict,
};
use waypoint::config::load_str;
use waypoint::jwt::Authenticated;
use waypoint::route::ObjectRef;

type Labels = BTreeMap<String, String>;

fn policies(yaml: &str) -> Vec<Policy> {
    load_str(Path::new("p.yaml"), yaml, 1)
        .unwrap_or_else(|e| panic!("{e}"))
        .policies
}

/// A policy in namespace `default` attached to the waypoint.
fn on_waypoint(action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{action}, namespace: default}}\nspec:\n  targetRefs:\n  - {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}\n  action: {action}\n  rules:\n{rules}"
    )
}

#[derive(Clone)]
struct R {
    source_ip: &'static str,
    remote_ip: Option<&'static str>,
    principal: Option<&'static str>,
    port: u16,
    host: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    /// The request's verified JWT.
    auth: Option<Authenticated>,
}

fn req() -> R {
    R {
        source_ip: "10.1.0.1",
        remote_ip: None,
        principal: Some("cluster.local/ns/client/sa/sleep"),
        port: 8080,
        host: "echo.default.svc.cluster.local:8080",
        method: "GET",
        path: "/api/v1/items",
        headers: vec![],
        auth: None,
    }
}

/// A verified JWT of `iss/sub` with `claims` (its `aud` and `azp` taken from them).
fn jwt(principal: &str, claims: serde_json::Value) -> Authenticated {
    let claims = claims.as_object().unwrap().clone();
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(l)) => {
            l.iter().map(|a| a.as_str().unwrap().to_string()).collect()
        }
        _ => vec![],
    };
    Authenticated {
        principal: principal.into(),
        audiences,
        presenter: claims
            .get("azp")
            .and_then(|p| p.as_str())
            .map(str::to_string),
        claims,
    }
}

fn verdict_for(
    ps: &[Policy],
    svc: Option<&str>,
    workload: Option<(&str, &BTreeMap<String, String>)>,
    r: &R,
) -> Verdict {
    let wp = ObjectRef::new("default", "waypoint");
    let service = svc.map(|s| ObjectRef::new("default", s));
    let subject = Subject {
        waypoint: &wp,
        root_namespace: "istio-system",
        service: service.as_ref(),
        workload,
    };
    let source_ip: IpAddr = r.source_ip.parse().unwrap();
    let request = Request {
        source_ip,
        remote_ip: r.remote_ip.map(|x| x.parse().unwrap()).unwrap_or(source_ip),
        principal: r.principal,
        auth: r.auth.as_ref(),
        destination_ip: "10.96.0.10".parse().unwrap(),
        destination_port: r.port,
        host: r.host,
        method: r.method,
        path: r.path,
        headers: &r.headers,
    };
    if r.method.is_empty() {
        evaluate_tcp(ps, &subject, &request)
    } else {
        evaluate(ps, &subject, &request)
    }
}

fn allowed(ps: &[Policy], r: &R) -> bool {
    verdict_for(ps, Some("echo"), None, r).allowed
}

/// Each row: an ALLOW rule, a request, whether it is allowed.
#[test]
fn allow_rule_fields_table() {
    let base = req();
    let with = |f: &dyn Fn(&mut R)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let table: Vec<(&str, R, bool)> =
        vec![
        // principals: exact, prefix*, *suffix, *
        (
            "- from: [{source: {principals: [cluster.local/ns/client/sa/sleep]}}]",
            base.clone(),
            true,
        ),
        (
            "- from: [{source: {principals: [cluster.local/ns/client/sa/other]}}]",
            base.clone(),
            false,
        ),
        (
            "- from: [{source: {principals: [\"cluster.local/ns/client/*\"]}}]",
            base.clone(),
            true,
        ),
        (
            "- from: [{source: {principals: [\"*/sa/sleep\"]}}]",
            base.clone(),
            true,
        ),
        (
            "- from: [{source: {principals: [\"*\"]}}]",
            base.clone(),
            true,
        ),
        // `*` needs an identity: plaintext is refused (R10).
        (
            "- from: [{source: {principals: [\"*\"]}}]",
            with(&|r| r.principal = None),
            false,
        ),
        (
            "- from: [{source: {notPrincipals: [\"*/sa/sleep\"]}}]",
            base.clone(),
            false,
        ),
        (
            "- from: [{source: {notPrincipals: [\"*/sa/other\"]}}]",
            base.clone(),
            true,
        ),
        // namespaces (from the principal)
        (
            "- from: [{source: {namespaces: [client]}}]",
            base.clone(),
            true,
        ),
        (
            "- from: [{source: {namespaces: [\"cli*\"]}}]",
            base.clone(),
            true,
        ),
        (
            "- from: [{source: {namespaces: [other]}}]",
            base.clone(),
            false,
        ),
        (
            "- from: [{source: {namespaces: [client]}}]",
            with(&|r| r.principal = None),
            false,
        ),
        (
            "- from: [{source: {notNamespaces: [client]}}]",
            base.clone(),
            false,
        ),
        (
            "- from: [{source: {notNamespaces: [other]}}]",
            base.clone(),
            true,
        ),
        // ipBlocks (the peer), remoteIpBlocks (the original client)
        (
            "- from: [{source: {ipBlocks: [10.1.0.0/16]}}]",
            base.clone(),
            true,
        ),
        (
            "- from: [{source: {ipBlocks: [10.1.0.1]}}]",
            base.clone(),
            true,
        ),
        (
            "- from: [{source: {ipBlocks: [10.2.0.0/16]}}]",
            base.clone(),
            false,
        ),
        (
            "- from: [{source: {notIpBlocks: [10.1.0.0/16]}}]",
            base.clone(),
            false,
        ),
        (
            "- from: [{source: {remoteIpBlocks: [192.168.0.0/16]}}]",
            with(&|r| r.remote_ip = Some("192.168.1.1")),
            true,
        ),
        (
            "- from: [{source: {remoteIpBlocks: [192.168.0.0/16]}}]",
            base.clone(),
            false,
        ),
        (
            "- from: [{source: {notRemoteIpBlocks: [192.168.0.0/16]}}]",
            with(&|r| r.remote_ip = Some("192.168.1.1")),
            false,
        ),
        // hosts: with or without the port, case-insensitive
        (
            "- to: [{operation: {hosts: [echo.default.svc.cluster.local]}}]",
            base.clone(),
            true,
        ),
        (
            "- to: [{operation: {hosts: [ECHO.default.svc.cluster.local:8080]}}]",
            base.clone(),
            true,
        ),
        (
            "- to: [{operation: {hosts: [\"*.cluster.local\"]}}]",
            base.clone(),
            true,
        ),
        ("- to: [{operation: {hosts: [other]}}]", base.clone(), false),
        (
            "- to: [{operation: {notHosts: [\"echo.*\"]}}]",
            base.clone(),
            false,
        ),
        // ports (strings, as Istio writes them, or numbers)
        (
            "- to: [{operation: {ports: [\"8080\"]}}]",
            base.clone(),
            true,
        ),
        ("- to: [{operation: {ports: [9090]}}]", base.clone(), false),
        (
            "- to: [{operation: {notPorts: [\"8080\"]}}]",
            base.clone(),
            false,
        ),
        // methods
        (
            "- to: [{operation: {methods: [GET, HEAD]}}]",
            base.clone(),
            true,
        ),
        (
            "- to: [{operation: {methods: [POST]}}]",
            base.clone(),
            false,
        ),
        (
            "- to: [{operation: {notMethods: [GET]}}]",
            base.clone(),
            false,
        ),
        // paths: exact, prefix*, *suffix, *, templates
        (
            "- to: [{operation: {paths: [/api/v1/items]}}]",
            base.clone(),
            true,
        ),
        (
            "- to: [{operation: {paths: [/api/v1]}}]",
            base.clone(),
            false,
        ),
        (
            "- to: [{operation: {paths: [\"/api/*\"]}}]",
            base.clone(),
            true,
        ),
        (
            "- to: [{operation: {paths: [\"*/items\"]}}]",
            base.clone(),
            true,
        ),
        ("- to: [{operation: {paths: [\"*\"]}}]", base.clone(), true),
        (
            "- to: [{operation: {notPaths: [\"/api/*\"]}}]",
            base.clone(),
            false,
        ),
        (
            "- to: [{operation: {paths: [\"/api/{*}/items\"]}}]",
            base.clone(),
            true,
        ),
        (
            "- to: [{operation: {paths: [\"/{*}/items\"]}}]",
            base.clone(),
            false,
        ),
        (
            "- to: [{operation: {paths: [\"/api/{**}\"]}}]",
            base.clone(),
            true,
        ),
        (
            "- to: [{operation: {paths: [\"/other/{**}\"]}}]",
            base.clone(),
            false,
        ),
        // from AND to AND when; lists inside are OR
        (
            "- from: [{source: {namespaces: [client]}}]\n    to: [{operation: {methods: [POST]}}]",
            base.clone(),
            false,
        ),
        (
            "- from: [{source: {namespaces: [x]}}, {source: {namespaces: [client]}}]",
            base.clone(),
            true,
        ),
        // when
        (
            "- when: [{key: \"request.headers[X-Token]\", values: [secret]}]",
            with(&|r| r.headers = vec![("x-token", "secret")]),
            true,
        ),
        (
            "- when: [{key: \"request.headers[x-token]\", values: [\"sec*\"]}]",
            with(&|r| r.headers = vec![("X-Token", "secret")]),
            true,
        ),
        (
            "- when: [{key: \"request.headers[x-token]\", values: [secret]}]",
            base.clone(),
            false,
        ),
        (
            "- when: [{key: \"request.headers[x-token]\", notValues: [bad]}]",
            with(&|r| r.headers = vec![("x-token", "bad")]),
            false,
        ),
        (
            "- when: [{key: source.ip, values: [10.1.0.0/24]}]",
            base.clone(),
            true,
        ),
        (
            "- when: [{key: source.ip, notValues: [10.1.0.1]}]",
            base.clone(),
            false,
        ),
        (
            "- when: [{key: source.namespace, values: [client]}]",
            base.clone(),
            true,
        ),
        (
            "- when: [{key: source.principal, values: [\"*/sa/sleep\"]}]",
            base.clone(),
            true,
        ),
        (
            "- when: [{key: source.principal, values: [\"*/sa/x\"]}]",
            base.clone(),
            false,
        ),
        (
            "- when: [{key: destination.port, values: [\"8080\"]}]",
            base.clone(),
            true,
        ),
        (
            "- when: [{key: destination.port, notValues: [\"8080\"]}]",
            base.clone(),
            false,
        ),
        // requestPrincipals: `<iss>/<sub>` of the verified JWT; none without one.
        (
            "- from: [{source: {requestPrincipals: [\"https://idp.example/alice\"]}}]",
            with(&|r| r.auth = Some(jwt("https://idp.example/alice", serde_json::json!({})))),
            true,
        ),
        (
            "- from: [{source: {requestPrincipals: [\"https://idp.example/*\"]}}]",
            with(&|r| r.auth = Some(jwt("https://other.example/alice", serde_json::json!({})))),
            false,
        ),
        ("- from: [{source: {requestPrincipals: [\"*\"]}}]", base.clone(), false),
        (
            "- from: [{source: {requestPrincipals: [\"*\"]}}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({})))),
            true,
        ),
        ("- from: [{source: {notRequestPrincipals: [\"*\"]}}]", base.clone(), true),
        (
            "- from: [{source: {notRequestPrincipals: [\"*\"]}}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({})))),
            false,
        ),
        // The peer's principal and the request's are separate fields of one source.
        (
            "- from: [{source: {principals: [\"*/sa/sleep\"], requestPrincipals: [\"i/s\"]}}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({})))),
            true,
        ),
        (
            "- from: [{source: {principals: [\"*/sa/other\"], requestPrincipals: [\"i/s\"]}}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({})))),
            false,
        ),
        // request.auth.*: principal, audiences (any), presenter, claims (string, list, nested).
        (
            "- when: [{key: request.auth.principal, values: [\"i/*\"]}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({})))),
            true,
        ),
        ("- when: [{key: request.auth.principal, values: [\"*\"]}]", base.clone(), false),
        ("- when: [{key: request.auth.principal, notValues: [\"i/s\"]}]", base.clone(), true),
        (
            "- when: [{key: request.auth.audiences, values: [api]}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({"aud": ["web", "api"]})))),
            true,
        ),
        (
            "- when: [{key: request.auth.audiences, notValues: [api]}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({"aud": ["web", "api"]})))),
            false,
        ),
        (
            "- when: [{key: request.auth.presenter, values: [frontend]}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({"azp": "frontend"})))),
            true,
        ),
        (
            "- when: [{key: \"request.auth.claims[groups]\", values: [admin]}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({"groups": ["dev", "admin"]})))),
            true,
        ),
        (
            "- when: [{key: \"request.auth.claims[groups]\", values: [admin]}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({"groups": ["dev"]})))),
            false,
        ),
        (
            "- when: [{key: \"request.auth.claims[groups]\", notValues: [dev]}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({"groups": ["dev", "admin"]})))),
            false,
        ),
        (
            "- when: [{key: \"request.auth.claims[org][team]\", values: [\"blue*\"]}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({"org": {"team": "blue-2"}})))),
            true,
        ),
        // Only strings (and lists of them) are compared, as in Istio.
        (
            "- when: [{key: \"request.auth.claims[level]\", values: [\"3\"]}]",
            with(&|r| r.auth = Some(jwt("i/s", serde_json::json!({"level": 3})))),
            false,
        ),
        (
            "- when: [{key: \"request.auth.claims[groups]\", values: [admin]}]",
            base.clone(),
            false,
        ),
        // An empty rule matches everything.
        ("- {}", base.clone(), true),
    ];
    for (rules, r, want) in table {
        let ps = policies(&on_waypoint("ALLOW", &format!("  {rules}\n")));
        assert_eq!(allowed(&ps, &r), want, "{rules}");
    }
}

#[test]
fn evaluation_order() {
    let r = req();
    // No policy: allowed.
    assert!(allowed(&[], &r));
    // ALLOW with no rules allows nothing (attached: a waypoint ignores namespace-wide ones).
    let ps = policies(&on_waypoint("ALLOW", "    []\n"));
    assert!(!allowed(&ps, &r));
    // DENY with no rules denies nothing.
    let ps = policies(&on_waypoint("DENY", "    []\n"));
    assert!(allowed(&ps, &r));
    // DENY wins over a matching ALLOW.
    let text = [
        on_waypoint("ALLOW", "  - {}\n"),
        on_waypoint("DENY", "  - to: [{operation: {methods: [GET]}}]\n"),
    ]
    .join("---\n");
    let ps = policies(&text);
    let v = verdict_for(&ps, Some("echo"), None, &r);
    assert!(!v.allowed);
    assert_eq!(v.policy, Some(ObjectRef::new("default", "p-DENY")));
    let mut post = r.clone();
    post.method = "POST";
    assert!(allowed(&ps, &post));
    // Some ALLOW must match: one that does not, one that does.
    let text = [
        on_waypoint("ALLOW", "  - to: [{operation: {methods: [POST]}}]\n"),
        on_waypoint("ALLOW", "  - to: [{operation: {methods: [GET]}}]\n")
            .replace("p-ALLOW", "p-ALLOW-2"),
    ]
    .join("---\n");
    let ps = policies(&text);
    let v = verdict_for(&ps, Some("echo"), None, &r);
    assert!(v.allowed);
    assert_eq!(v.policy, Some(ObjectRef::new("default", "p-ALLOW-2")));
    // AUDIT never changes the outcome but is reported.
    let ps = policies(&on_waypoint("AUDIT", "  - {}\n"));
    let v = verdict_for(&ps, Some("echo"), None, &r);
    assert!(v.allowed);
    assert_eq!(v.audited, [ObjectRef::new("default", "p-AUDIT")]);
}

/// On opaque TCP (no HTTP request, no JWT) `requestPrincipals` and `request.auth.*` are
/// HTTP-only, as headers are (Istio): never matched in an ALLOW rule, ignored in a DENY
/// rule (which then denies on its other fields).
#[test]
fn request_principals_on_opaque_tcp_follow_istios_http_only_rule() {
    let mut tcp = req();
    tcp.method = "";
    tcp.path = "";
    tcp.host = "";
    let allow = policies(&on_waypoint(
        "ALLOW",
        "  - from: [{source: {requestPrincipals: [\"*\"]}}]\n",
    ));
    assert!(!allowed(&allow, &tcp));
    let allow = policies(&on_waypoint(
        "ALLOW",
        "  - from: [{source: {notRequestPrincipals: [\"*\"]}}]\n",
    ));
    assert!(!allowed(&allow, &tcp));
    let deny = policies(&on_waypoint(
        "DENY",
        "  - from: [{source: {requestPrincipals: [\"*\"]}}]\n",
    ));
    assert!(!allowed(&deny, &tcp));
    let deny = policies(&on_waypoint(
        "DENY",
        "  - from: [{source: {requestPrincipals: [\"*\"], namespaces: [elsewhere]}}]\n",
    ));
    assert!(
        allowed(&deny, &tcp),
        "the DENY's other field does not match"
    );
    let deny = policies(&on_waypoint(
        "DENY",
        "  - when: [{key: \"request.auth.claims[groups]\", values: [x]}]\n",
    ));
    assert!(!allowed(&deny, &tcp));
    let allow = policies(&on_waypoint(
        "ALLOW",
        "  - when: [{key: request.auth.principal, notValues: [x]}]\n",
    ));
    assert!(!allowed(&allow, &tcp));
}

/// CUSTOM policies name their extension provider for the requests their rules match, and
/// take no part in DENY/ALLOW evaluation; on opaque TCP their HTTP-only fields are
/// ignored, so they match (and the tunnel is refused, having no request to check).
#[test]
fn custom_policies_name_their_provider_and_stay_out_of_allow_and_deny() {
    let text = format!(
        "services:\n  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: [\"10.96.0.10\"], ports: {{80: 8080}}}}\n---\nmeshConfig:\n  extensionProviders:\n  - name: authz\n    envoyExtAuthzHttp: {{service: echo.default.svc.cluster.local, port: 80}}\n---\n{}",
        on_waypoint("CUSTOM", "  - to: [{operation: {paths: [\"/admin*\"]}}]\n")
            .replace("  action: CUSTOM\n", "  action: CUSTOM\n  provider: {name: authz}\n")
    );
    let ps = policies(&text);
    let wp = ObjectRef::new("default", "waypoint");
    let svc = ObjectRef::new("default", "echo");
    let subject = Subject {
        waypoint: &wp,
        root_namespace: "istio-system",
        service: Some(&svc),
        workload: None,
    };
    let ask = |path: &'static str, method: &'static str| {
        let r = R {
            path,
            method,
            ..req()
        };
        let source_ip: IpAddr = r.source_ip.parse().unwrap();
        let request = Request {
            source_ip,
            remote_ip: source_ip,
            principal: r.principal,
            auth: None,
            destination_ip: "10.96.0.10".parse().unwrap(),
            destination_port: r.port,
            host: r.host,
            method: r.method,
            path: r.path,
            headers: &[],
        };
        (
            custom(&ps, &subject, &request).map(str::to_string),
            custom_tcp(&ps, &subject, &request).map(str::to_string),
            evaluate(&ps, &subject, &request).allowed,
        )
    };
    assert_eq!(
        ask("/admin/users", "GET"),
        (Some("authz".into()), Some("authz".into()), true)
    );
    assert_eq!(ask("/public", "GET"), (None, Some("authz".into()), true));
}

#[test]
fn attachment_target_refs_selector_and_namespace() {
    let deny = |spec_head: &str, ns: &str| {
        format!(
            "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: d, namespace: {ns}}}\nspec:\n{spec_head}  action: DENY\n  rules: [{{}}]\n"
        )
    };
    let r = req();
    let labels: BTreeMap<String, String> = [("app".to_string(), "echo".to_string())].into();
    let other: BTreeMap<String, String> = [("app".to_string(), "x".to_string())].into();
    // (policy, service, workload labels, denied)
    type Row<'a> = (String, Option<&'a str>, Option<(&'a str, &'a Labels)>, bool);
    let table: Vec<Row<'_>> = vec![
        (deny("  targetRefs: [{kind: Service, group: \"\", name: echo}]\n", "default"), Some("echo"), None, true),
        (deny("  targetRefs: [{kind: Service, group: \"\", name: echo}]\n", "default"), Some("other"), None, false),
        (deny("  targetRefs: [{kind: Service, group: \"\", name: echo}]\n", "default"), None, Some(("default", &labels)), false),
        (deny("  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n", "default"), Some("other"), None, true),
        (deny("  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n", "elsewhere"), Some("echo"), None, false),
        (deny("  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other-wp}]\n", "default"), Some("echo"), None, false),
        // Istio's waypoints never use `selector` policies (the destination ztunnel
        // enforces them: tests/selector_policy.rs): loaded, reported, not applied here.
        (deny("  selector: {matchLabels: {app: echo}}\n", "default"), None, Some(("default", &labels)), false),
        (deny("  selector: {matchLabels: {app: echo}}\n", "default"), None, Some(("default", &other)), false),
        (deny("  selector: {matchLabels: {app: echo}}\n", "elsewhere"), None, Some(("default", &labels)), false),
        (deny("  selector: {matchLabels: {app: echo}}\n", "istio-system"), None, Some(("default", &labels)), false),
        // Nor namespace-wide ones (no selector, no targetRefs): the destination ztunnel's.
        (deny("", "default"), Some("echo"), None, false),
        (deny("", "elsewhere"), Some("echo"), None, false),
        (deny("", "istio-system"), Some("echo"), None, false),
        // Istio's `core` group of Services.
        (deny("  targetRefs: [{kind: Service, group: core, name: echo}]\n", "default"), Some("echo"), None, true),
        // The GatewayClass of every waypoint, from the root namespace: this waypoint too,
        // for any service or pod it serves…
        (deny("  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n", "istio-system"), Some("other"), None, true),
        (deny("  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n", "istio-system"), None, Some(("default", &labels)), true),
        // …but another class (ingress gateways) is not this waypoint's.
        (deny("  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio}]\n", "istio-system"), Some("echo"), None, false),
    ];
    for (yaml, svc, wl, denied) in table {
        let ps = policies(&yaml);
        assert_eq!(
            !verdict_for(&ps, svc, wl, &r).allowed,
            denied,
            "{yaml} {svc:?}"
        );
    }
}

#[test]
fn a_gateway_class_target_outside_the_root_namespace_is_a_load_error() {
    let policy = |ns: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: all-waypoints, namespace: {ns}}}\nspec:\n  targetRefs:\n  - {{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}}\n  action: DENY\n  rules: [{{}}]\n")
    };
    let e = load_str(Path::new("p.yaml"), &policy("default"), 1).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("spec.targetRefs"), "{e}");
    assert!(e.message.contains("root namespace \"istio-system\""), "{e}");
    assert_eq!(e.line, Some(5), "{e}");
    // The root namespace is the settings document's.
    let settings = "waypoint:\n  gateway: app/wp\n  identity: spiffe://cluster.local/ns/app/sa/wp\n  ca: {builtin: /nonexistent}\n  root_namespace: mesh-root\n---\n";
    let text = format!("{settings}{}", policy("mesh-root"));
    if let Err(e) = load_str(Path::new("p.yaml"), &text, 1) {
        panic!("{e}");
    }
    let text = format!("{settings}{}", policy("istio-system"));
    assert!(load_str(Path::new("p.yaml"), &text, 1).is_err());
}

#[test]
fn path_templates() {
    let table = [
        ("/foo/{*}", "/foo/bar", true),
        ("/foo/{*}", "/foo/bar/baz", false),
        ("/foo/{*}", "/foo/", false),
        ("/foo/{*}/baz", "/foo/bar/baz", true),
        ("/foo/{**}", "/foo/bar/baz", true),
        ("/foo/{**}", "/foo/", true),
        ("/foo/{**}", "/foobar", false),
        ("/{*}/bar/{**}", "/a/bar/b/c", true),
        ("/a.b/{*}", "/aXb/c", false),
    ];
    for (pattern, path, want) in table {
        let p = PathPattern::parse(pattern).unwrap();
        assert_eq!(p.matches(path), want, "{pattern} {path}");
    }
    assert!(PathPattern::parse("/{**}/x").is_err());
    assert!(PathPattern::parse("/a{*}").is_err());
}
