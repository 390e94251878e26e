//! HTTPRoute routing (R16, R17) table tests, written from the Gateway API's
//! `apis/v1/httproute_types.go` semantics.

mod common;

use std::path::Path;
use std::time::Duration;

use common::SPEC_ECHO_ROUTE;

use waypoint::config::{load_str, WaypointConfig};
use waypoint::lb::SplitMix64;
use waypoint::route::{Decision, Forward, HeaderModifier, Mirror, ObjectRef, Request, Target};

/// The services every test can route to (namespace `default`).
const MESH: &str = r#"
services:
  - {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["10.96.0.10"], ports: {80: 8080}}
  - {name: echo-v1, namespace: default, hostname: echo-v1.default.svc.cluster.local, vips: ["10.96.0.11"], ports: {80: 8080}}
  - {name: echo-v2, namespace: default, hostname: echo-v2.default.svc.cluster.local, vips: ["10.96.0.12"], ports: {80: 8080}}
  - {name: mirror, namespace: default, hostname: mirror.default.svc.cluster.local, vips: ["10.96.0.13"], ports: {80: 8080}}
  - {name: other, namespace: other, hostname: other.other.svc.cluster.local, vips: ["10.96.0.14"], ports: {8080: 8080}}
"#;

/// Lets the routes of `default` name Services of `other` (Gateway API ReferenceGrant).
const GRANT: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-default, namespace: other}
spec:
  from:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}
  - {group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: default}
  to: [{group: "", kind: Service, name: other}]
"#;

fn load(routes: &str) -> WaypointConfig {
    let text = format!("{MESH}---\n{GRANT}---\n{routes}");
    load_str(Path::new("test.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"))
}

/// The parent reference of every route here but two: service `echo`.
const ECHO: &str = r#"{group: "", kind: Service, name: echo}"#;

/// An HTTPRoute document: `metadata` (a YAML flow map), one parent, `rules` (the list
/// items of `spec.rules`, indented two spaces).
fn http_route(metadata: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {metadata}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}"
    )
}

/// HTTPRoute `r` on service `echo` with `rules`: the fixture of most tests here.
fn route(rules: &str) -> String {
    http_route("{name: r}", ECHO, rules)
}

/// Every request of `uris` is answered by the waypoint itself with `status`.
fn assert_responds(cfg: &WaypointConfig, uris: &[&str], status: u16) {
    for uri in uris {
        match decide(cfg, &get(uri)) {
            Decision::Respond { status: s, .. } => assert_eq!(s, status, "{uri}"),
            other => panic!("{uri}: expected {status}, got {other:?}"),
        }
    }
}

struct Req<'a> {
    method: &'a str,
    uri: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

fn get(uri: &str) -> Req<'_> {
    Req {
        method: "GET",
        uri,
        headers: vec![("host", "echo.default.svc.cluster.local")],
    }
}

impl<'a> Req<'a> {
    fn method(mut self, m: &'a str) -> Self {
        self.method = m;
        self
    }
    fn header(mut self, n: &'a str, v: &'a str) -> Self {
        self.headers.push((n, v));
        self
    }
    /// The router's view of this request (`uri` split into path and query).
    fn request(&self) -> Request<'_> {
        let (path, query) = match self.uri.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.uri, None),
        };
        Request {
            method: self.method,
            path,
            query,
            headers: &self.headers,
            scheme: "http",
        }
    }
}

fn decide_to(cfg: &WaypointConfig, svc: &str, port: u16, r: &Req<'_>, seed: u64) -> Decision {
    let req = r.request();
    let service = ObjectRef::new("default", svc);
    cfg.routes.route(
        Target::Service {
            service: &service,
            port,
        },
        &req,
        &|s| cfg.service_exists(s),
        &mut SplitMix64(seed),
    )
}

fn decide(cfg: &WaypointConfig, r: &Req<'_>) -> Decision {
    decide_to(cfg, "echo", 80, r, 1)
}

fn forward(d: Decision) -> Forward {
    match d {
        Decision::Forward(f) => *f,
        other => panic!("expected forward, got {other:?}"),
    }
}

/// `(rule index, backend name)` of a forwarded request.
fn rule_of(cfg: &WaypointConfig, r: &Req<'_>) -> Option<(String, usize)> {
    match decide(cfg, r) {
        Decision::Forward(f) => f.route.map(|(id, i)| (id.name, i)),
        _ => None,
    }
}

fn backend(d: &Decision) -> Option<(String, u16)> {
    match d {
        Decision::Forward(f) => f.service.as_ref().map(|(s, p)| (s.name.clone(), *p)),
        _ => None,
    }
}

#[test]
fn r17_spec_echo_example_sends_everything_to_echo_v1() {
    let cfg = load(SPEC_ECHO_ROUTE);
    for r in [
        get("/"),
        get("/anything/at/all?x=1"),
        get("/x").method("POST").header("x-a", "b"),
    ] {
        let d = decide(&cfg, &r);
        assert_eq!(backend(&d), Some(("echo-v1".into(), 80)), "{}", r.uri);
    }
    // Another service without a route still routes to itself.
    let d = decide_to(&cfg, "echo-v2", 80, &get("/"), 1);
    assert_eq!(backend(&d), Some(("echo-v2".into(), 80)));
}

#[test]
fn r17_no_route_attached_routes_to_the_service_itself() {
    let cfg = load("# nothing\n");
    let f = forward(decide(&cfg, &get("/a")));
    assert_eq!(f.service, Some((ObjectRef::new("default", "echo"), 80)));
    assert_eq!(f.route, None);
    // A service the model does not know: 500.
    assert!(matches!(
        decide_to(&cfg, "ghost", 80, &get("/"), 1),
        Decision::Respond { status: 500, .. }
    ));
}

#[test]
fn r16_pod_addressed_requests_are_never_routed() {
    let cfg = load(SPEC_ECHO_ROUTE);
    let r = Req {
        method: "GET",
        uri: "/",
        headers: vec![("host", "10.1.0.5:8080")],
    };
    let d = cfg.routes.route(
        Target::Workload,
        &r.request(),
        &|_| true,
        &mut SplitMix64(1),
    );
    assert_eq!(forward(d), Forward::default());
}

/// Two rules: a prefix and an exact path.
const TWO_PATHS: &str = r#"
  - matches: [{path: {type: PathPrefix, value: /foo}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: echo-v2, port: 80}]
"#;

#[test]
fn routes_attached_but_none_matching_is_404() {
    let cfg = load(&route(TWO_PATHS));
    assert_responds(&cfg, &["/", "/foobar", "/exact/more", "/fo"], 404);
}

#[test]
fn path_prefix_matches_by_segment() {
    let cfg = load(&route(TWO_PATHS));
    let table = [
        ("/foo", true),
        ("/foo/", true),
        ("/foo/bar", true),
        ("/foo?x=1", true),
        ("/foobar", false),
        ("/fo", false),
        ("/bar/foo", false),
    ];
    for (uri, hit) in table {
        assert_eq!(rule_of(&cfg, &get(uri)).is_some(), hit, "{uri}");
    }
    // A trailing slash in the prefix is ignored: `/foo/` matches `/foo`.
    let cfg = load(&route(&TWO_PATHS.replace("value: /foo}", "value: /foo/}")));
    assert!(rule_of(&cfg, &get("/foo")).is_some());
    assert!(rule_of(&cfg, &get("/foobar")).is_none());
}

#[test]
fn exact_and_regex_paths() {
    let cfg = load(&route(
        r#"  - matches: [{path: {type: Exact, value: /a}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}}]
    backendRefs: [{name: echo-v2, port: 80}]
"#,
    ));
    let table = [
        ("/a", Some(0)),
        ("/a/", None),
        ("/a/b", None),
        ("/items/42", Some(1)),
        ("/items/42/x", None), // regex is anchored: the whole path must match
        ("/x/items/42", None),
        ("/items/abc", None),
    ];
    for (uri, want) in table {
        assert_eq!(rule_of(&cfg, &get(uri)).map(|r| r.1), want, "{uri}");
    }
}

#[test]
fn header_query_and_method_matches() {
    let cfg = load(&route(
        r#"  - matches:
    - headers: [{name: X-Version, value: v2}]
      queryParams: [{name: debug, value: "1"}]
      method: POST
    backendRefs: [{name: echo-v2, port: 80}]
  - matches:
    - headers: [{type: RegularExpression, name: user-agent, value: ".*Mobile.*"}]
    - queryParams: [{type: RegularExpression, name: id, value: "[a-f]+"}]
    backendRefs: [{name: echo-v1, port: 80}]
"#,
    ));
    let table: Vec<(Req<'_>, Option<usize>)> = vec![
        (
            get("/?debug=1").method("POST").header("x-version", "v2"),
            Some(0),
        ),
        // Header names are case-insensitive, values are not.
        (
            get("/?debug=1").method("POST").header("X-VERSION", "V2"),
            None,
        ),
        (get("/?debug=1").header("x-version", "v2"), None), // method
        (
            get("/?debug=2").method("POST").header("x-version", "v2"),
            None,
        ),
        (
            get("/?a=b&debug=1")
                .method("POST")
                .header("x-version", "v2"),
            Some(0),
        ),
        // Query parameter names are case-sensitive.
        (
            get("/?DEBUG=1").method("POST").header("x-version", "v2"),
            None,
        ),
        // Any one of a rule's matches suffices.
        (get("/").header("user-agent", "Foo Mobile Bar"), Some(1)),
        (get("/").header("user-agent", "Desktop"), None),
        (get("/?id=cafe"), Some(1)),
        (get("/?id=cafe1"), None),
    ];
    for (r, want) in table {
        assert_eq!(
            rule_of(&cfg, &r).map(|r| r.1),
            want,
            "{} {:?}",
            r.uri,
            r.headers
        );
    }
}

/// One route per precedence criterion; each pair differs only in that criterion.
#[test]
fn precedence_across_rules_and_routes() {
    let route = |name: &str, ts: &str, rules: &str| {
        http_route(
            &format!("{{name: {name}, creationTimestamp: \"{ts}\"}}"),
            ECHO,
            rules,
        )
    };
    let rule =
        |m: &str| format!("  - matches: [{m}]\n    backendRefs: [{{name: echo-v1, port: 80}}]\n");
    let docs = [
        // Newest route first in the file: file order must not matter.
        route(
            "newer",
            "2024-02-01T00:00:00Z",
            &[
                rule("{path: {type: PathPrefix, value: /a}}"),
                rule("{path: {type: Exact, value: /a/b}}"),
                rule("{path: {type: PathPrefix, value: /m}, method: GET}"),
                rule("{path: {type: PathPrefix, value: /h}, headers: [{name: x, value: '1'}, {name: y, value: '1'}]}"),
                rule("{path: {type: PathPrefix, value: /q}, queryParams: [{name: a, value: '1'}, {name: b, value: '1'}]}"),
                rule("{path: {type: PathPrefix, value: /tie}}"),
            ]
            .concat(),
        ),
        route(
            "older",
            "2024-01-01T00:00:00Z",
            &[
                rule("{path: {type: PathPrefix, value: /a/b}}"),
                rule("{path: {type: PathPrefix, value: /m}}"),
                rule("{path: {type: PathPrefix, value: /h}, headers: [{name: x, value: '1'}]}"),
                rule("{path: {type: PathPrefix, value: /q}, queryParams: [{name: a, value: '1'}]}"),
                rule("{path: {type: PathPrefix, value: /tie}}"),
                rule("{path: {type: PathPrefix, value: /tie}}"),
                rule("{path: {type: PathPrefix, value: /m}, headers: [{name: x, value: '1'}, {name: y, value: '1'}]}"),
            ]
            .concat(),
        ),
    ];
    let cfg = load(&docs.join("---\n"));
    let table: Vec<(Req<'_>, (&str, usize))> = vec![
        // Exact beats any prefix.
        (get("/a/b"), ("newer", 1)),
        // Longest prefix wins.
        (get("/a/b/c"), ("older", 0)),
        (get("/a/c"), ("newer", 0)),
        // Method match beats none, and beats header matches.
        (get("/m").header("x", "1").header("y", "1"), ("newer", 2)),
        (get("/m").method("PUT"), ("older", 1)),
        (
            get("/m").method("PUT").header("x", "1").header("y", "1"),
            ("older", 6),
        ),
        // Most header matches.
        (get("/h").header("x", "1").header("y", "1"), ("newer", 3)),
        (get("/h").header("x", "1"), ("older", 2)),
        // Most query matches.
        (get("/q?a=1&b=1"), ("newer", 4)),
        (get("/q?a=1"), ("older", 3)),
        // Full tie: the oldest route, then its first matching rule.
        (get("/tie"), ("older", 4)),
    ];
    for (r, (name, idx)) in table {
        assert_eq!(
            rule_of(&cfg, &r),
            Some((name.to_string(), idx)),
            "{} {:?}",
            r.uri,
            r.headers
        );
    }
}

#[test]
fn equal_age_ties_go_to_namespace_name_order() {
    let doc = |ns: &str, name: &str, backend: &str| {
        http_route(
            &format!(
                "{{name: {name}, namespace: {ns}, creationTimestamp: \"2024-01-01T00:00:00Z\"}}"
            ),
            "{group: \"\", kind: Service, name: echo, namespace: default}",
            &format!("  - backendRefs: [{{name: {backend}, namespace: default, port: 80}}]\n"),
        )
    };
    let cfg = load(
        &[
            doc("zz", "a", "echo-v2"),
            doc("default", "b", "echo-v1"),
            doc("default", "c", "mirror"),
        ]
        .join("---\n"),
    );
    assert_eq!(
        backend(&decide(&cfg, &get("/"))),
        Some(("echo-v1".into(), 80))
    );
}

#[test]
fn parent_port_restricts_attachment() {
    let cfg = load(&http_route(
        "{name: r}",
        "{group: \"\", kind: Service, name: echo, port: 8080}",
        "  - backendRefs: [{name: echo-v1, port: 80}]\n",
    ));
    assert_eq!(
        backend(&decide_to(&cfg, "echo", 8080, &get("/"), 1)),
        Some(("echo-v1".into(), 80))
    );
    // Not attached on port 80: self-routing.
    assert_eq!(
        backend(&decide_to(&cfg, "echo", 80, &get("/"), 1)),
        Some(("echo".into(), 80))
    );
}

#[test]
fn missing_backend_service_is_500_and_zero_weights_are_500() {
    let cfg = load(&route(
        r#"  - matches: [{path: {value: /ghost}}]
    backendRefs: [{name: ghost, port: 80}]
  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 0}]
  - matches: [{path: {value: /none}}]
"#,
    ));
    assert_responds(&cfg, &["/ghost", "/zero", "/none"], 500);
}

#[test]
fn weights_split_10000_requests_within_5_percent() {
    let cfg = load(&route(
        r#"  - backendRefs:
    - {name: echo-v1, port: 80, weight: 70}
    - {name: echo-v2, port: 80, weight: 20}
    - {name: other, namespace: other, port: 8080, weight: 10}
    - {name: mirror, port: 80, weight: 0}
"#,
    ));
    let mut rng = SplitMix64(42);
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    let r = get("/");
    let req = r.request();
    let echo = ObjectRef::new("default", "echo");
    for _ in 0..10_000 {
        let d = cfg.routes.route(
            Target::Service {
                service: &echo,
                port: 80,
            },
            &req,
            &|s| cfg.service_exists(s),
            &mut rng,
        );
        *counts.entry(backend(&d).unwrap().0).or_default() += 1;
    }
    for (name, want) in [
        ("echo-v1", 7_000.0),
        ("echo-v2", 2_000.0),
        ("other", 1_000.0),
    ] {
        let got = counts[name] as f64;
        assert!((got - want).abs() <= want * 0.05, "{name}: {got} vs {want}");
    }
    assert!(!counts.contains_key("mirror"));
}

#[test]
fn header_modifiers_set_add_remove() {
    let cfg = load(&route(
        r#"  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Set, value: new}]
        add: [{name: x-add, value: two}]
        remove: [x-drop]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: server, value: waypoint}]
    backendRefs:
    - name: echo-v1
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {add: [{name: x-backend, value: v1}]}
"#,
    ));
    let f = forward(decide(&cfg, &get("/")));
    assert_eq!(f.request_headers.len(), 2);
    let mut h: Vec<(String, String)> = [
        ("x-set", "old"),
        ("X-SET", "old2"),
        ("x-add", "one"),
        ("X-Drop", "gone"),
        ("keep", "k"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for m in &f.request_headers {
        m.apply(&mut h);
    }
    let h: Vec<(&str, &str)> = h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        h,
        [
            ("x-add", "one"),
            ("keep", "k"),
            ("X-Set", "new"),
            ("x-add", "two"),
            ("x-backend", "v1")
        ]
    );
    assert_eq!(
        f.response_headers,
        [HeaderModifier {
            set: vec![("server".into(), "waypoint".into())],
            ..Default::default()
        }]
    );
}

/// Route `r` with one rule: requests under `path` get `filter`.
fn redirect_route(filter: &str, path: &str) -> String {
    route(&format!(
        "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    filters:\n    - {filter}\n"
    ))
}

#[test]
fn request_redirects() {
    let table = [
        // (filter, prefix, request, status, location)
        ("{type: RequestRedirect, requestRedirect: {}}", "/", "/a?b=c", 302, "http://echo.default.svc.cluster.local/a?b=c"),
        ("{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}", "/", "/a", 301, "https://echo.default.svc.cluster.local/a"),
        ("{type: RequestRedirect, requestRedirect: {hostname: example.com, port: 8443, scheme: https}}", "/", "/a", 302, "https://example.com:8443/a"),
        ("{type: RequestRedirect, requestRedirect: {port: 80}}", "/", "/a", 302, "http://echo.default.svc.cluster.local/a"),
        ("{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}}}", "/old", "/old/x", 302, "http://echo.default.svc.cluster.local/new"),
        ("{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}", "/old", "/old/x", 302, "http://echo.default.svc.cluster.local/new/x"),
    ];
    for (filter, prefix, uri, status, location) in table {
        let cfg = load(&redirect_route(filter, prefix));
        match decide(&cfg, &get(uri)) {
            Decision::Redirect {
                status: s,
                location: l,
                ..
            } => {
                assert_eq!((s, l.as_str()), (status, location), "{filter}");
            }
            other => panic!("{filter}: {other:?}"),
        }
    }
    // Neither scheme nor port configured: the listener port (the service port addressed).
    let cfg = load(&redirect_route(
        "{type: RequestRedirect, requestRedirect: {hostname: h, statusCode: 308}}",
        "/",
    ));
    let r = Req {
        method: "GET",
        uri: "/p",
        headers: vec![("host", "echo:9999")],
    };
    assert!(matches!(
        decide_to(&cfg, "echo", 8080, &r, 1),
        Decision::Redirect { status: 308, location, .. } if location == "http://h:8080/p"
    ));
    assert!(matches!(
        decide_to(&cfg, "echo", 80, &get("/p"), 1),
        Decision::Redirect { location, .. } if location == "http://h/p"
    ));
}

/// The Gateway API's `ReplacePrefixMatch` table (HTTPPathModifier docs).
#[test]
fn url_rewrite_replace_prefix_match_table() {
    let table = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ];
    for (path, prefix, repl, want) in table {
        let filter = format!(
            "{{type: URLRewrite, urlRewrite: {{hostname: rewritten, path: {{type: ReplacePrefixMatch, replacePrefixMatch: \"{repl}\"}}}}}}"
        );
        let text =
            redirect_route(&filter, prefix) + "    backendRefs: [{name: echo-v1, port: 80}]\n";
        let cfg = load(&text);
        let f = forward(decide(&cfg, &get(path)));
        assert_eq!(f.path.as_deref(), Some(want), "{path} {prefix} {repl:?}");
        assert_eq!(f.host.as_deref(), Some("rewritten"));
    }
    // ReplaceFullPath keeps the query.
    let text = redirect_route(
        "{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /full}}}",
        "/",
    ) + "    backendRefs: [{name: echo-v1, port: 80}]\n";
    let f = forward(decide(&load(&text), &get("/a/b?q=1")));
    assert_eq!(f.path.as_deref(), Some("/full?q=1"));
    assert_eq!(f.host, None);
}

#[test]
fn request_mirrors_route_and_backend_level() {
    let cfg = load(&route(
        r#"  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: mirror, port: 80}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: ghost, port: 80}, percent: 50}
    backendRefs:
    - name: echo-v1
      port: 80
      filters:
      - type: RequestMirror
        requestMirror: {backendRef: {name: other, namespace: other, port: 8080}, percent: 10}
      - type: RequestMirror
        requestMirror: {backendRef: {name: echo-v2, port: 80}, fraction: {numerator: 1, denominator: 1000}}
"#,
    ));
    let f = forward(decide(&cfg, &get("/")));
    assert_eq!(
        f.mirrors,
        [
            Mirror {
                service: ObjectRef::new("default", "mirror"),
                port: 80,
                numerator: 1,
                denominator: 1,
            },
            Mirror {
                service: ObjectRef::new("other", "other"),
                port: 8080,
                numerator: 10,
                denominator: 100,
            },
            Mirror {
                service: ObjectRef::new("default", "echo-v2"),
                port: 80,
                numerator: 1,
                denominator: 1000,
            },
        ],
        "a mirror to a missing service is dropped"
    );
}

#[test]
fn timeouts_and_retries_are_carried() {
    let cfg = load(&route(
        r#"  - timeouts: {request: 1m30s, backendRequest: 500ms}
    retry: {codes: [503, 504], attempts: 3, backoff: 100ms}
    backendRefs: [{name: echo-v1, port: 80}]
"#,
    ));
    let f = forward(decide(&cfg, &get("/")));
    assert_eq!(f.timeouts.request, Some(Duration::from_secs(90)));
    assert_eq!(f.timeouts.backend_request, Some(Duration::from_millis(500)));
    let retry = f.retry.unwrap();
    assert_eq!(retry.codes, [503, 504]);
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.backoff, Some(Duration::from_millis(100)));
}

/// A GRPCRoute document on service `echo` with `rules` (list items of `spec.rules`).
fn grpc_route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{ECHO}]\n  rules:\n{rules}"
    )
}

/// A gRPC call: `POST /<service>/<method>`.
fn call(path: &str) -> Req<'_> {
    get(path)
        .method("POST")
        .header("content-type", "application/grpc")
}

/// R17 with GRPCRoute (Gateway API `grpcroute_types.go`): method matches by service and
/// method, exact or regular expression, with header matches; an exact method beats its
/// service alone; no match is 404 as for HTTPRoute.
#[test]
fn r17_grpc_route_matches_service_and_method() {
    let cfg = load(&grpc_route(
        "g",
        r#"  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{method: {service: helloworld.Greeter}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{method: {method: Check}, headers: [{name: x-debug, value: "1"}]}]
    backendRefs: [{name: mirror, port: 80}]
  - matches: [{method: {type: RegularExpression, service: 'grpc\.health\.v1\..+', method: 'Check|Watch'}}]
    backendRefs: [{name: other, namespace: other, port: 8080}]
"#,
    ));
    let to = |r: Req<'_>| backend(&decide(&cfg, &r)).map(|(s, _)| s);
    assert_eq!(
        to(call("/helloworld.Greeter/SayHello")).as_deref(),
        Some("echo-v1")
    );
    assert_eq!(
        to(call("/helloworld.Greeter/SayGoodbye")).as_deref(),
        Some("echo-v2")
    );
    assert_eq!(to(call("/helloworld.Greeter")).as_deref(), Some("echo-v2"));
    assert_eq!(
        to(call("/any.Service/Check").header("x-debug", "1")).as_deref(),
        Some("mirror")
    );
    assert_eq!(
        to(call("/grpc.health.v1.Health/Watch")).as_deref(),
        Some("other")
    );
    // Not the service (segment-wise), the method without its header, the regex anchored.
    assert_responds(
        &cfg,
        &[
            "/helloworld.GreeterX/SayHello",
            "/any.Service/Check",
            "/grpc.health.v1.Health/CheckAll",
        ],
        404,
    );
}

/// GRPCRoute fields are checked where they are written: names, regular expressions, the
/// filters a GRPCRoute may not have, and a method match that names nothing.
#[test]
fn grpc_route_errors_name_their_field() {
    for (rules, field, msg) in [
        (
            "  - matches: [{method: {service: 'hello world'}}]\n",
            "spec.rules[0].matches[0].method.service",
            "not a gRPC service name",
        ),
        (
            "  - matches: [{method: {method: Say.Hello}}]\n",
            "spec.rules[0].matches[0].method.method",
            "not a gRPC method name",
        ),
        (
            "  - matches: [{method: {type: RegularExpression, method: '(unclosed'}}]\n",
            "spec.rules[0].matches[0].method.method",
            "regular expression",
        ),
        (
            "  - matches: [{method: {type: Exact}}]\n",
            "spec.rules[0].matches[0].method",
            "one of service and method",
        ),
        (
            "  - filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n",
            "spec.rules[0].filters[0].type",
            "not a GRPCRoute filter",
        ),
        (
            "  - matches: [{path: {value: /x}}]\n",
            "spec.rules[0].matches[0]",
            "unknown field `path`",
        ),
    ] {
        let text = format!("{MESH}---\n{}", grpc_route("bad", rules));
        let e = load_str(Path::new("test.yaml"), &text, 1).unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(e.message.contains(msg), "{e}");
        assert_eq!(e.document, 2, "{e}");
    }
}

/// RequestMirror's share: `percent` or `fraction` (not both), checked where written.
#[test]
fn request_mirror_fraction_errors_name_their_field() {
    for (mirror, field, msg) in [
        (
            "{backendRef: {name: mirror, port: 80}, percent: 10, fraction: {numerator: 1}}",
            "spec.rules[0].filters[0].requestMirror",
            "exclusive",
        ),
        (
            "{backendRef: {name: mirror, port: 80}, fraction: {numerator: 1, denominator: 0}}",
            "spec.rules[0].filters[0].requestMirror.fraction.denominator",
            "more than 0",
        ),
        (
            "{backendRef: {name: mirror, port: 80}, fraction: {numerator: 101}}",
            "spec.rules[0].filters[0].requestMirror.fraction.numerator",
            "not exceed",
        ),
    ] {
        let rules = format!(
            "  - filters:\n    - type: RequestMirror\n      requestMirror: {mirror}\n    backendRefs: [{{name: echo-v1, port: 80}}]\n"
        );
        let text = format!("{MESH}---\n{}", route(&rules));
        let e = load_str(Path::new("test.yaml"), &text, 1).unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(e.message.contains(msg), "{e}");
    }
}
