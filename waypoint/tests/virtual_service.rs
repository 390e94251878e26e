//! Istio VirtualService routing on the waypoint (R17), table tests written from Istio's
//! `virtual-service` reference and the way istiod translates it for Envoy: rules tried in
//! order, `StringMatch` forms, subsets of DestinationRules, weights, redirects, rewrites,
//! direct responses, fault injection, mirrors, timeouts and retries.

mod common;

use std::path::Path;
use std::time::Duration;

use waypoint::config::{load_str, WaypointConfig};
use waypoint::lb::SplitMix64;
use waypoint::route::{Abort, Decision, Forward, ObjectRef, Request, Share, Target};

/// Services `reviews` (port 9080), `ratings` (9080), `mirror` (80) and `details` (9080 and
/// 9081) of namespace `default`; `reviews` has pods `r1` (version v1), `r2` (v2) and `r3` (v3).
const MESH: &str = r#"
workloads:
  - {uid: r1, name: r1, namespace: default, serviceAccount: reviews, workloadIps: ["10.1.0.1"], labels: {app: reviews, version: v1}, services: {"default/reviews.default.svc.cluster.local": {9080: 9080}}}
  - {uid: r2, name: r2, namespace: default, serviceAccount: reviews, workloadIps: ["10.1.0.2"], labels: {app: reviews, version: v2}, services: {"default/reviews.default.svc.cluster.local": {9080: 9080}}}
  - {uid: r3, name: r3, namespace: default, serviceAccount: reviews, workloadIps: ["10.1.0.3"], labels: {app: reviews, version: v3}, services: {"default/reviews.default.svc.cluster.local": {9080: 9080}}}
services:
  - {name: reviews, namespace: default, hostname: reviews.default.svc.cluster.local, vips: ["10.96.0.10"], ports: {9080: 9080}}
  - {name: ratings, namespace: default, hostname: ratings.default.svc.cluster.local, vips: ["10.96.0.11"], ports: {9080: 9080}}
  - {name: mirror, namespace: default, hostname: mirror.default.svc.cluster.local, vips: ["10.96.0.12"], ports: {80: 8080}}
  - {name: details, namespace: default, hostname: details.default.svc.cluster.local, vips: ["10.96.0.13"], ports: {9080: 9080, 9081: 9081}}
"#;

/// Bookinfo's DestinationRule for `reviews`: subsets v1, v2 and v3 by label.
const REVIEWS_DR: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
"#;

fn try_load(docs: &str) -> Result<WaypointConfig, String> {
    let text = format!("{MESH}---\n{REVIEWS_DR}---\n{docs}");
    load_str(Path::new("vs.yaml"), &text, 1).map_err(|e| e.to_string())
}

fn load(docs: &str) -> WaypointConfig {
    try_load(docs).unwrap_or_else(|e| panic!("{e}"))
}

/// A VirtualService on `reviews` with `http` (the items of `spec.http`, indented two
/// spaces).
fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
    )
}

struct Req<'a> {
    method: &'a str,
    uri: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    port: u16,
    client_ns: Option<&'a str>,
}

fn get(uri: &str) -> Req<'_> {
    Req {
        method: "GET",
        uri,
        headers: vec![("host", "reviews:9080")],
        port: 9080,
        client_ns: None,
    }
}

impl<'a> Req<'a> {
    fn header(mut self, n: &'a str, v: &'a str) -> Self {
        self.headers.push((n, v));
        self
    }
    fn method(mut self, m: &'a str) -> Self {
        self.method = m;
        self
    }
    fn client_ns(mut self, ns: &'a str) -> Self {
        self.client_ns = Some(ns);
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
}

fn decide_seed(cfg: &WaypointConfig, r: &Req<'_>, seed: u64) -> Decision {
    decide_for(cfg, "reviews", r, seed)
}

/// How `r` to Service `default/<svc>` is routed (`seed` for the weighted choice).
fn decide_for(cfg: &WaypointConfig, svc: &str, r: &Req<'_>, seed: u64) -> Decision {
    let (path, query) = match r.uri.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (r.uri, None),
    };
    let req = Request {
        method: r.method,
        path,
        query,
        headers: &r.headers,
        scheme: "http",
    };
    let service = ObjectRef::new("default", svc);
    cfg.routes.route_from(
        r.client_ns,
        Target::Service {
            service: &service,
            port: r.port,
        },
        &req,
        &|s| cfg.service_exists(s),
        &mut SplitMix64(seed),
    )
}

fn decide(cfg: &WaypointConfig, r: &Req<'_>) -> Decision {
    decide_seed(cfg, r, 1)
}

fn forward(d: Decision) -> Forward {
    match d {
        Decision::Forward(f) => *f,
        other => panic!("expected a forward, got {other:?}"),
    }
}

/// `service[/subset]:port` a request goes to, or the status the waypoint answers.
fn dest(cfg: &WaypointConfig, r: &Req<'_>) -> String {
    match decide(cfg, r) {
        Decision::Forward(f) => {
            let (s, p) = f.service.expect("a service");
            match s.subset {
                Some(sub) => format!("{}/{sub}:{p}", s.name),
                None => format!("{}:{p}", s.name),
            }
        }
        Decision::Respond { status, .. }
        | Decision::Redirect { status, .. }
        | Decision::Direct { status, .. } => status.to_string(),
    }
}

#[test]
fn r17_bookinfo_header_match_sends_jason_to_v2_and_everyone_else_to_v1() {
    let cfg = load(&vs(r#"  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"#));
    // The destination has no port: the request's port.
    assert_eq!(
        dest(&cfg, &get("/").header("end-user", "jason")),
        "reviews/v2:9080"
    );
    assert_eq!(
        dest(&cfg, &get("/").header("end-user", "Jason")),
        "reviews/v1:9080"
    );
    assert_eq!(dest(&cfg, &get("/reviews/1")), "reviews/v1:9080");
    // Header names are case-insensitive.
    assert_eq!(
        dest(&cfg, &get("/").header("End-User", "jason")),
        "reviews/v2:9080"
    );
}

#[test]
fn r17_rules_are_tried_in_order_and_none_matching_is_404() {
    // A broad rule first wins over a more specific one later (no Gateway API precedence).
    let cfg = load(&vs(r#"  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {exact: /api/special}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /other}}, {method: {exact: POST}}]
    route: [{destination: {host: ratings, port: {number: 9080}}}]
"#));
    assert_eq!(dest(&cfg, &get("/api/special")), "reviews/v1:9080");
    // Any one of a rule's match entries is enough.
    assert_eq!(dest(&cfg, &get("/other/x")), "ratings:9080");
    assert_eq!(dest(&cfg, &get("/x").method("POST")), "ratings:9080");
    assert_eq!(dest(&cfg, &get("/x")), "404");
}

#[test]
fn string_matches_table() {
    let cfg = load(&vs(r#"  - match: [{uri: {exact: /exact}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /pre}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {regex: "/items/[0-9]+"}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{uri: {prefix: /CASE}, ignoreUriCase: true}]
    route: [{destination: {host: ratings}}]
  - match: [{uri: {exact: /Exact-NoCase}, ignoreUriCase: true}]
    route: [{destination: {host: mirror, port: {number: 80}}}]
  - match:
    - headers:
        x-pre: {prefix: ab}
        x-any: {}
    route: [{destination: {host: reviews, subset: v1}}]
  - match:
    - queryParams:
        id: {regex: "[a-f]+"}
        mode: {exact: fast}
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{method: {regex: "PUT|PATCH"}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{authority: {prefix: "reviews.default"}}]
    route: [{destination: {host: ratings}}]
"#));
    let table: Vec<(Req<'_>, &str)> = vec![
        (get("/exact"), "reviews/v1:9080"),
        (get("/exact/"), "404"),
        // A VirtualService prefix is by character, not by segment.
        (get("/pre"), "reviews/v2:9080"),
        (get("/prefix/x"), "reviews/v2:9080"),
        (get("/items/42"), "reviews/v3:9080"),
        // Regexes are anchored.
        (get("/items/42/x"), "404"),
        (get("/case/x"), "ratings:9080"),
        (get("/CaSeD"), "ratings:9080"),
        (get("/exact-nocase"), "mirror:80"),
        (get("/EXACT-NOCASE/x"), "404"),
        (
            get("/h").header("x-pre", "abc").header("x-any", ""),
            "reviews/v1:9080",
        ),
        // Present with any value, but present.
        (get("/h").header("x-pre", "abc"), "404"),
        (get("/h").header("x-pre", "zab").header("x-any", "1"), "404"),
        (get("/q?mode=fast&id=cafe"), "reviews/v2:9080"),
        (get("/q?mode=fast&id=xyz"), "404"),
        (get("/q?id=cafe"), "404"),
        (get("/m").method("PATCH"), "reviews/v3:9080"),
        (get("/m").method("PATCHES"), "404"),
        (
            Req {
                headers: vec![("host", "reviews.default.svc.cluster.local:9080")],
                ..get("/a")
            },
            "ratings:9080",
        ),
    ];
    for (i, (r, want)) in table.iter().enumerate() {
        assert_eq!(dest(&cfg, r), *want, "row {i}: {} {:?}", r.uri, r.headers);
    }
}

#[test]
fn without_headers_port_and_source_namespace_matches() {
    let cfg = load(&vs(r#"  - match:
    - withoutHeaders:
        x-canary: {exact: "true"}
      port: 9080
      sourceNamespace: shop
    route: [{destination: {host: reviews, subset: v1}}]
  - route: [{destination: {host: reviews, subset: v3}}]
"#));
    let shop = || get("/").client_ns("shop");
    assert_eq!(dest(&cfg, &shop()), "reviews/v1:9080");
    // withoutHeaders: absent or not matching.
    assert_eq!(
        dest(&cfg, &shop().header("x-canary", "false")),
        "reviews/v1:9080"
    );
    assert_eq!(
        dest(&cfg, &shop().header("x-canary", "true")),
        "reviews/v3:9080"
    );
    assert_eq!(dest(&cfg, &get("/").client_ns("other")), "reviews/v3:9080");
    // No verified namespace: sourceNamespace cannot match.
    assert_eq!(dest(&cfg, &get("/")), "reviews/v3:9080");
    // A destination without a port takes its service's only port.
    assert_eq!(dest(&cfg, &shop().port(9081)), "reviews/v3:9080");
}

#[test]
fn a_destination_without_a_port_takes_its_only_port_else_the_requests() {
    let cfg = load(&vs(r#"  - match: [{uri: {prefix: /details}}]
    route: [{destination: {host: details}}]
    mirror: {host: details}
  - route: [{destination: {host: ratings}}]
"#));
    // `details` has two ports: the request's.
    assert_eq!(dest(&cfg, &get("/details").port(9081)), "details:9081");
    assert_eq!(dest(&cfg, &get("/details")), "details:9080");
    let f = forward(decide(&cfg, &get("/details").port(9081)));
    assert_eq!(f.mirrors[0].port, 9081);
    // `ratings` has one: that one, whatever the request's.
    assert_eq!(dest(&cfg, &get("/").port(9081)), "ratings:9080");
    // Resolved once with the model, that forward is prebuilt: requests borrow it.
    let service = ObjectRef::new("default", "reviews");
    let req = Request {
        method: "GET",
        path: "/",
        query: None,
        headers: &[("host", "reviews")],
        scheme: "http",
    };
    let target = Target::Service {
        service: &service,
        port: 9080,
    };
    let shared =
        cfg.routes
            .route_shared(target, &req, &|s| cfg.service_exists(s), &mut SplitMix64(1));
    assert!(
        matches!(shared, Ok(std::borrow::Cow::Borrowed(_))),
        "{shared:?}"
    );
}

#[test]
fn weights_split_10000_requests_within_5_percent() {
    let cfg = load(&vs(r#"  - route:
    - destination: {host: reviews, subset: v1}
      weight: 75
    - destination: {host: reviews, subset: v2}
      weight: 20
    - destination: {host: reviews, subset: v3}
      weight: 5
"#));
    let mut counts = [0u32; 3];
    let r = get("/");
    for seed in 0..10_000u64 {
        let f = forward(decide_seed(&cfg, &r, seed));
        let sub = f.service.unwrap().0.subset.unwrap();
        counts[["v1", "v2", "v3"].iter().position(|s| *s == sub).unwrap()] += 1;
    }
    for (got, want) in counts.iter().zip([7500.0, 2000.0, 500.0]) {
        let share = f64::from(*got);
        assert!(
            (share - want).abs() <= 500.0,
            "{counts:?} against 75/20/5 %"
        );
    }
}

#[test]
fn rewrites_replace_the_matched_prefix_as_envoy_prefix_rewrite_does() {
    let cfg = load(&vs(r#"  - match: [{uri: {prefix: /v1/api}}]
    rewrite: {uri: /v2/api, authority: reviews-v2}
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {exact: /old}}]
    rewrite: {uri: /new}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /re/}}]
    rewrite:
      uriRegexRewrite: {match: "^/re/([^/]+)/(.*)$", rewrite: '/\2/\1'}
    route: [{destination: {host: reviews, subset: v1}}]
  - rewrite: {uri: /base}
    route: [{destination: {host: reviews, subset: v1}}]
"#));
    let table = [
        (
            "/v1/api/items?x=1",
            Some("/v2/api/items?x=1"),
            Some("reviews-v2"),
        ),
        ("/v1/apiary", Some("/v2/apiary"), Some("reviews-v2")),
        ("/old", Some("/new"), None),
        ("/re/a/b/c", Some("/b/c/a"), None),
        // No uri match is Istio's prefix `/`: the rewrite takes its place.
        ("/x/y", Some("/basex/y"), None),
    ];
    for (uri, path, host) in table {
        let f = forward(decide(&cfg, &get(uri)));
        assert_eq!(f.path.as_deref(), path, "{uri}");
        assert_eq!(f.host.as_deref(), host, "{uri}");
    }
}

#[test]
fn redirects_and_direct_responses_are_answered_by_the_waypoint() {
    let cfg = load(&vs(r#"  - match: [{uri: {prefix: /moved}}]
    redirect: {uri: /new-home, authority: ratings}
  - match: [{uri: {prefix: /temp}}]
    redirect: {scheme: https, redirectCode: 307, derivePort: FROM_PROTOCOL_DEFAULT}
  - match: [{uri: {exact: /health}}]
    directResponse: {status: 200, body: {string: "ok\n"}}
    headers:
      response:
        set: {cache-control: no-store}
  - match: [{uri: {exact: /gone}}]
    directResponse: {status: 410, body: {bytes: "Z29uZQ=="}}
"#));
    match decide(&cfg, &get("/moved/x?q=1")) {
        // VirtualService redirects default to 301 and replace the whole path.
        Decision::Redirect {
            status, location, ..
        } => {
            assert_eq!(status, 301);
            assert_eq!(location, "http://ratings:9080/new-home?q=1");
        }
        other => panic!("{other:?}"),
    }
    match decide(&cfg, &get("/temp/a")) {
        Decision::Redirect {
            status, location, ..
        } => {
            assert_eq!(status, 307);
            assert_eq!(location, "https://reviews/temp/a");
        }
        other => panic!("{other:?}"),
    }
    match decide(&cfg, &get("/health")) {
        Decision::Direct {
            status,
            body,
            response_headers,
        } => {
            assert_eq!((status, body.as_str()), (200, "ok\n"));
            assert_eq!(
                response_headers[0].set,
                vec![("cache-control".to_string(), "no-store".to_string())]
            );
        }
        other => panic!("{other:?}"),
    }
    match decide(&cfg, &get("/gone")) {
        Decision::Direct { status, body, .. } => assert_eq!((status, body.as_str()), (410, "gone")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn faults_mirrors_headers_timeouts_and_retries_are_carried() {
    let cfg = load(&vs(r#"  - match: [{uri: {prefix: /slow}}]
    fault:
      delay: {fixedDelay: 1.5s, percentage: {value: 12.5}}
      abort: {httpStatus: 503, percentage: {value: 100}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /grpc}}]
    fault:
      abort: {grpcStatus: UNAVAILABLE}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /mirrored}}]
    mirror: {host: mirror}
    mirrorPercentage: {value: 50}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /many}}]
    mirrors:
    - destination: {host: mirror, port: {number: 80}}
    - destination: {host: reviews, subset: v3}
      percentage: {value: 1}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /retry-grpc}}]
    retries: {attempts: 1, retryOn: "unavailable,deadline-exceeded,503"}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /default-retry}}]
    retries: {attempts: 4}
    route: [{destination: {host: reviews, subset: v1}}]
  - timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "gateway-error,connect-failure,409"}
    headers:
      request:
        set: {x-a: "1"}
        add: {x-b: "2"}
        remove: [x-c]
    route:
    - destination: {host: reviews, subset: v1}
      headers:
        response:
          set: {x-backend: v1}
"#));
    let f = forward(decide(&cfg, &get("/slow")));
    let fault = f.fault.expect("a fault");
    assert_eq!(
        fault.delay,
        Some((
            Duration::from_millis(1500),
            Share {
                numerator: 125_000,
                denominator: 1_000_000
            }
        ))
    );
    assert_eq!(fault.abort, Some((Abort::Http(503), Share::percent(100.0))));
    // No percentage: Istio injects into no request.
    let f = forward(decide(&cfg, &get("/grpc")));
    assert_eq!(
        f.fault.unwrap().abort,
        Some((Abort::Grpc(14), Share::percent(0.0)))
    );

    let f = forward(decide(&cfg, &get("/mirrored")));
    assert_eq!(f.mirrors.len(), 1);
    let m = &f.mirrors[0];
    // Without a port, the mirror goes to its service's only port.
    assert_eq!((m.service.name.as_str(), m.port), ("mirror", 80));
    assert_eq!((m.numerator, m.denominator), (500_000, 1_000_000));
    let f = forward(decide(&cfg, &get("/many")));
    let got: Vec<_> = f
        .mirrors
        .iter()
        .map(|m| {
            (
                m.service.name.clone(),
                m.service.subset.clone(),
                m.port,
                m.numerator,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("mirror".to_string(), None, 80, 1_000_000),
            ("reviews".to_string(), Some("v3".to_string()), 9080, 10_000),
        ]
    );

    // gRPC conditions by status code; without retryOn, Istio's default conditions.
    let r = forward(decide(&cfg, &get("/retry-grpc"))).retry.unwrap();
    assert_eq!((r.attempts, r.codes, r.grpc), (1, vec![503], vec![4, 14]));
    let r = forward(decide(&cfg, &get("/default-retry"))).retry.unwrap();
    assert_eq!((r.attempts, r.codes, r.grpc), (4, vec![503], vec![1, 14]));

    let f = forward(decide(&cfg, &get("/other")));
    assert_eq!(f.timeouts.request, Some(Duration::from_secs(2)));
    assert_eq!(f.timeouts.backend_request, Some(Duration::from_millis(500)));
    let retry = f.retry.expect("retries");
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.codes, vec![409, 502, 503, 504]);
    assert!(retry.grpc.is_empty());
    assert_eq!(f.request_headers.len(), 1);
    assert_eq!(f.request_headers[0].set, vec![("x-a".into(), "1".into())]);
    assert_eq!(f.request_headers[0].add, vec![("x-b".into(), "2".into())]);
    assert_eq!(f.request_headers[0].remove, vec!["x-c".to_string()]);
    assert_eq!(
        f.response_headers[0].set,
        vec![("x-backend".into(), "v1".into())]
    );
}

#[test]
fn subsets_select_endpoints_by_label_and_take_their_own_policy() {
    let cfg = load(&vs(
        "  - route: [{destination: {host: reviews, subset: v2}}]\n",
    ));
    let snap = cfg.mesh.as_ref().unwrap();
    let uids = |s: &ObjectRef| -> Vec<String> {
        waypoint::upstream::endpoints(snap, s, 9080, cfg.subset_labels(s), None, None)
            .into_iter()
            .map(|e| e.workload_uid)
            .collect()
    };
    let reviews = ObjectRef::new("default", "reviews");
    assert_eq!(uids(&reviews), ["r1", "r2", "r3"]);
    for (sub, want) in [("v1", "r1"), ("v2", "r2"), ("v3", "r3")] {
        let s = reviews.clone().with_subset(Some(sub.into()));
        assert_eq!(uids(&s), [want], "{sub}");
    }
    // v3's own load balancer; the others the rule's (least request).
    let v3 = reviews.clone().with_subset(Some("v3".into()));
    assert_eq!(
        cfg.lb(&v3, Some(9080)).policy,
        waypoint::lb::LbPolicy::RoundRobin
    );
    let v1 = reviews.clone().with_subset(Some("v1".into()));
    assert_eq!(
        cfg.lb(&v1, Some(9080)).policy,
        waypoint::lb::LbPolicy::LeastRequest
    );
    // The whole service still routes to itself where no VirtualService applies.
    let forward = forward(decide(&cfg, &get("/")));
    assert_eq!(
        forward.service.unwrap().0,
        reviews.with_subset(Some("v2".into()))
    );
}

#[test]
fn virtual_service_errors_name_their_field() {
    let table: Vec<(String, &str, &str)> = vec![
        (
            vs("  - route: [{destination: {host: reviews, subset: v9}}]\n"),
            "spec.http[0].route[0].destination.subset",
            "no subset \"v9\"",
        ),
        (
            vs("  - mirror: {host: reviews, subset: nope}\n    route: [{destination: {host: reviews}}]\n"),
            "spec.http[0].mirror.subset",
            "no subset",
        ),
        (
            vs("  - match: [{sourceLabels: {app: x}}]\n    route: [{destination: {host: reviews}}]\n"),
            "spec.http[0].match[0].sourceLabels",
            "not supported",
        ),
        (
            vs("  - match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: reviews}}]\n"),
            "spec.http[0].match[0].uri",
            "exclusive",
        ),
        (
            vs("  - match: [{uri: {regex: /a.*}}]\n    rewrite: {uri: /b}\n    route: [{destination: {host: reviews}}]\n"),
            "spec.http[0].rewrite.uri",
            "uriRegexRewrite",
        ),
        (
            vs("  - retries: {attempts: 2, retryOn: sometimes}\n    route: [{destination: {host: reviews}}]\n"),
            "spec.http[0].retries.retryOn",
            "unknown retry condition",
        ),
        (
            vs("  - fault: {delay: {fixedDelay: 1s, percentage: {value: 101}}}\n    route: [{destination: {host: reviews}}]\n"),
            "spec.http[0].fault.delay.percentage.value",
            "0–100",
        ),
        (
            vs("  - fault: {abort: {grpcStatus: NOPE}}\n    route: [{destination: {host: reviews}}]\n"),
            "spec.http[0].fault.abort.grpcStatus",
            "gRPC status",
        ),
        (
            vs("  - corsPolicy: {allowOrigins: [{}]}\n    route: [{destination: {host: reviews}}]\n"),
            "spec.http[0].corsPolicy.allowOrigins[0]",
            "one of exact, prefix and regex",
        ),
        (
            vs("  - route: [{destination: {host: reviews}}]\n    redirect: {uri: /x}\n"),
            "spec.http[0]",
            "exclusive",
        ),
        (
            vs("  - route:\n    - destination: {host: reviews, subset: v1}\n    - destination: {host: reviews, subset: v2}\n"),
            "spec.http[0].route",
            "add up to 0",
        ),
        (
            vs("  - route: [{destination: {host: \"*.example.com\"}}]\n"),
            "spec.http[0].route[0].destination.host",
            "service name",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: t}\nspec:\n  hosts: [reviews]\n  tcp:\n  - route: [{destination: {host: reviews}}]\n".into(),
            "spec.tcp",
            "not supported",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: g}\nspec:\n  hosts: [reviews]\n  gateways: [istio-system/ingress]\n  http:\n  - route: [{destination: {host: reviews}}]\n".into(),
            "spec.gateways[0]",
            "mesh",
        ),
        (
            format!(
                "{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: again}}\nspec:\n  hosts: [reviews.default.svc.cluster.local]\n  http:\n  - route: [{{destination: {{host: ratings}}}}]\n",
                vs("  - route: [{destination: {host: reviews}}]\n")
            ),
            "spec.hosts[0]",
            "also has VirtualService",
        ),
        (
            format!(
                "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: hr}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews}}]\n  rules:\n  - backendRefs: [{{name: ratings, port: 9080}}]\n",
                vs("  - route: [{destination: {host: reviews}}]\n")
            ),
            "spec.hosts[0]",
            "also has HTTPRoute",
        ),
    ];
    for (docs, field, words) in table {
        let err = try_load(&docs).expect_err(&docs);
        assert!(
            err.contains(field) && err.contains(words),
            "want {field:?} and {words:?} in: {err}\n{docs}"
        );
    }
}

/// The client all end-to-end requests here come from.
const CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 1, 0, 7);

/// Pods `e-v1`, `e-v2`, `e-v3` of Service `app/echo`, labelled by version, each answering
/// `200 <version>`; `v3` counts the connections it accepts. The VirtualService sends
/// `end-user: jason` to v2, aborts `/abort` (bound for v3) and gRPC calls, delays `/delay`
/// 300 ms, answers `/health` itself, and sends the rest to v1.
#[test]
fn r17_virtual_service_end_to_end_subsets_faults_and_direct_responses() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use std::time::Instant;

    let (net, ca, _zt) = common::echo_node(29);
    let ip = |h| common::ip(net, h);
    let v1 = common::named_backend(ip(2), "v1");
    let v2 = common::named_backend(ip(3), "v2");
    let v3_conns = Arc::new(AtomicUsize::new(0));
    let counted = v3_conns.clone();
    let v3 = common::serve_threads(ip(4), move |mut c| {
        counted.fetch_add(1, SeqCst);
        let mut buf = Vec::new();
        while common::next_request(&mut c, &mut buf).is_some() {
            use std::io::Write;
            if c.write_all(common::ok_response("v3").as_bytes()).is_err() {
                return;
            }
        }
    });
    let pod = |v: &str, a: std::net::SocketAddr| {
        format!(
            "  - {{uid: e-{v}, name: e-{v}, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], labels: {{app: echo, version: {v}}}, services: {{\"app/echo.app.svc.cluster.local\": {{80: {}}}}}}}\n",
            a.ip(),
            a.port()
        )
    };
    let model = common::app_model(
        ip(1),
        &format!("{}{}{}", pod("v1", v1), pod("v2", v2), pod("v3", v3)),
        "  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n",
    );
    let istio = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: app}
spec:
  host: echo.app.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: app}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: echo, subset: v2}}]
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: echo, subset: v3}}]
  - match: [{uri: {prefix: /grpc.Echo/}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: echo, subset: v3}}]
  - match: [{uri: {prefix: /delay}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
    timeout: 250ms
    route: [{destination: {host: echo, subset: v1}}]
  - match: [{uri: {exact: /health}}]
    directResponse: {status: 200, body: {string: healthy}}
  - match: [{uri: {prefix: /api}}]
    corsPolicy:
      allowOrigins: [{exact: "https://shop.example"}]
      allowMethods: [GET, PUT]
      exposeHeaders: [x-request-id]
    route: [{destination: {host: echo, subset: v1}}]
  - route: [{destination: {host: echo, subset: v1}}]
"#;
    let text = format!("{model}---\n{istio}");
    let wp = common::Waypoint::with_stats(&ca, &text, &format!("waypoint-vs-{net}.yaml"));
    let head = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: echo.app.svc.cluster.local\r\n{extra}\r\n")
    };
    let started = Instant::now();
    let mut delayed = Duration::ZERO;
    let mut heads = vec![];
    let answers: Vec<(u16, String)> = common::block_on(async {
        let (_c, mut s) =
            common::open_tunnel_for(wp.addr, &wp.client_cert, "10.96.0.1:80", Some(CLIENT)).await;
        let mut buf = Vec::new();
        let mut out = vec![];
        for (path, extra) in [
            ("/", "end-user: jason\r\n"),
            ("/", ""),
            ("/abort/x", ""),
            ("/health", ""),
            ("/delay", ""),
            (
                "OPTIONS /api",
                "origin: https://shop.example\r\naccess-control-request-method: PUT\r\n",
            ),
            ("/api/x", "origin: https://shop.example\r\n"),
        ] {
            let t = Instant::now();
            let req = match path.strip_prefix("OPTIONS ") {
                Some(p) => head(p, extra).replacen("GET", "OPTIONS", 1),
                None => head(path, extra),
            };
            s.write_all(bytes::Bytes::from(req), false).await.unwrap();
            let r = common::read_response(&mut s, &mut buf).await;
            if path == "/delay" {
                delayed = t.elapsed();
            }
            heads.push(r.head.to_ascii_lowercase());
            out.push((r.status, r.text()));
        }
        out
    });
    let want = [
        (200, "v2"),
        (200, "v1"),
        (418, "fault filter abort"),
        (200, "healthy"),
        (200, "v1"),
        (200, ""),
        (200, "v1"),
    ];
    let want: Vec<(u16, String)> = want.iter().map(|(s, b)| (*s, b.to_string())).collect();
    assert_eq!(answers, want);
    // The preflight answered by the waypoint; the actual request's response marked.
    for field in [
        "access-control-allow-origin: https://shop.example\r\n",
        "access-control-allow-methods: get,put\r\n",
    ] {
        assert!(heads[5].contains(field), "{field:?} not in {}", heads[5]);
    }
    for field in [
        "access-control-allow-origin: https://shop.example\r\n",
        "access-control-expose-headers: x-request-id\r\n",
    ] {
        assert!(heads[6].contains(field), "{field:?} not in {}", heads[6]);
    }
    // The delay held the request back at least its 300 ms (a lower bound, not a timing
    // threshold: nothing makes it shorter), and did not count against the route's 250 ms
    // timeout, which starts after it as Envoy's router timer does (the answer is v1's 200,
    // not 504).
    assert!(delayed >= Duration::from_millis(300), "{delayed:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The aborted request never reached v3.
    assert_eq!(v3_conns.load(SeqCst), 0);

    // HTTP/2 inside the tunnel: the same rules; a gRPC abort is HTTP 200 with grpc-status.
    let (health, grpc) = common::block_on(async {
        let (_c, s) =
            common::open_tunnel_for(wp.addr, &wp.client_cert, "10.96.0.1:80", Some(CLIENT)).await;
        let (send, _conn) = common::h2_in_tunnel(s).await;
        let health = common::h2_get_from(&send, "echo.app.svc.cluster.local", "/health").await;
        let req = http::Request::builder()
            .method("POST")
            .uri("http://echo.app.svc.cluster.local/grpc.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, _) = send.clone().send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        let grpc = (
            resp.status().as_u16(),
            resp.headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_string()),
        );
        (health, grpc)
    });
    assert_eq!(health, (200, "healthy".to_string()));
    assert_eq!(grpc, (200, Some("14".to_string())));
    assert_eq!(v3_conns.load(SeqCst), 0);

    let page = common::stats_page(wp.handle());
    for line in [
        "waypoint_faults_injected_total{fault=\"delay\"} 1",
        "waypoint_faults_injected_total{fault=\"abort\"} 2",
    ] {
        assert!(page.contains(line), "{line} not in:\n{page}");
    }
    assert!(
        page.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"418\"")
            && l.contains("response_flags=\"FI\"")),
        "no 418 with flag FI in:\n{page}"
    );
}

/// The fields of a locally answered request, or of the response modifiers of a forward.
fn answer_fields(d: &Decision) -> (u16, Vec<(String, String)>) {
    let (status, mods) = match d {
        Decision::Direct {
            status,
            response_headers,
            ..
        } => (*status, response_headers.clone()),
        Decision::Forward(f) => (0, f.response_headers.clone()),
        other => panic!("{other:?}"),
    };
    let mut h = vec![];
    for m in &mods {
        m.apply(&mut h);
    }
    (status, h)
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

#[test]
fn cors_policy_answers_preflights_and_marks_allowed_responses_as_envoy_does() {
    let cfg = load(&vs(r#"  - match: [{uri: {prefix: /strict}}]
    corsPolicy:
      allowOrigins: [{exact: "https://shop.example"}, {regex: "https://.*\\.partner\\.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token, content-type]
      exposeHeaders: [x-request-id]
      maxAge: 24h
      allowCredentials: true
      unmatchedPreflights: IGNORE
    route: [{destination: {host: reviews, subset: v1}}]
  - corsPolicy:
      allowOrigins: [{prefix: "https://"}]
      allowMethods: ["*"]
      allowHeaders: ["*"]
    route: [{destination: {host: reviews, subset: v2}}]
"#));
    let preflight = |path, origin| {
        get(path)
            .method("OPTIONS")
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
            .header("access-control-request-headers", "x-a, x-b")
    };
    // An allowed preflight is answered here, never forwarded.
    let d = decide(&cfg, &preflight("/strict", "https://shop.example"));
    assert_eq!(
        answer_fields(&d),
        (
            200,
            pairs(&[
                ("access-control-allow-origin", "https://shop.example"),
                ("access-control-allow-credentials", "true"),
                ("access-control-allow-methods", "GET,POST"),
                ("access-control-allow-headers", "x-token,content-type"),
                ("access-control-max-age", "86400"),
            ])
        )
    );
    let d = decide(&cfg, &preflight("/strict", "https://a.partner.example"));
    assert_eq!(answer_fields(&d).1[0].1, "https://a.partner.example");
    // Not allowed, unmatchedPreflights IGNORE: answered, without the origin.
    let d = decide(&cfg, &preflight("/strict", "https://evil.example"));
    let (status, fields) = answer_fields(&d);
    assert_eq!(status, 200);
    assert!(fields
        .iter()
        .all(|(n, _)| n != "access-control-allow-origin"));
    // `*` echoes what the preflight asks for; a not allowed origin is forwarded (FORWARD
    // is the default).
    let d = decide(&cfg, &preflight("/other", "https://any.example"));
    assert_eq!(
        answer_fields(&d),
        (
            200,
            pairs(&[
                ("access-control-allow-origin", "https://any.example"),
                ("access-control-allow-methods", "PUT"),
                ("access-control-allow-headers", "x-a, x-b"),
            ])
        )
    );
    assert_eq!(
        dest(&cfg, &preflight("/other", "http://plain.example")),
        "reviews/v2:9080"
    );
    // An actual request from an allowed origin is forwarded, its response marked.
    let d = decide(
        &cfg,
        &get("/strict").header("origin", "https://shop.example"),
    );
    assert_eq!(
        answer_fields(&d),
        (
            0,
            pairs(&[
                ("access-control-allow-origin", "https://shop.example"),
                ("access-control-allow-credentials", "true"),
                ("access-control-expose-headers", "x-request-id"),
            ])
        )
    );
    // Other origins and requests without one: nothing added.
    let d = decide(
        &cfg,
        &get("/strict").header("origin", "https://evil.example"),
    );
    assert_eq!(answer_fields(&d), (0, vec![]));
    let d = decide(&cfg, &get("/strict"));
    assert_eq!(answer_fields(&d), (0, vec![]));
    // An OPTIONS without Access-Control-Request-Method is no preflight.
    let d = decide(
        &cfg,
        &get("/strict")
            .method("OPTIONS")
            .header("origin", "https://shop.example"),
    );
    assert!(matches!(d, Decision::Forward(_)), "{d:?}");
}

#[test]
fn httproute_cors_filter_with_wildcard_origins() {
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ratings}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings}]
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://*.example.com", "http://localhost:8080"]
        allowMethods: [GET]
        allowCredentials: true
    backendRefs: [{name: ratings, port: 9080}]
"#;
    let cfg = load(route);
    let ask = |origin: &str| {
        let r = Req {
            headers: vec![
                ("host", "ratings"),
                ("origin", origin),
                ("access-control-request-method", "GET"),
            ],
            ..get("/").method("OPTIONS")
        };
        let d = decide_for(&cfg, "ratings", &r, 1);
        match d {
            Decision::Direct { .. } => answer_fields(&d).1,
            Decision::Forward(_) => vec![("forwarded".to_string(), String::new())],
            other => panic!("{other:?}"),
        }
    };
    let allowed = ask("https://app.example.com");
    assert_eq!(
        allowed,
        pairs(&[
            ("access-control-allow-origin", "https://app.example.com"),
            ("access-control-allow-credentials", "true"),
            ("access-control-allow-methods", "GET"),
            // The Gateway API's default maxAge.
            ("access-control-max-age", "5"),
        ])
    );
    assert_eq!(ask("http://localhost:8080")[0].1, "http://localhost:8080");
    // The wildcard stays inside the host.
    assert_eq!(ask("https://example.com")[0].0, "forwarded");
    assert_eq!(ask("https://a.example.com/x")[0].0, "forwarded");
    assert_eq!(ask("http://app.example.com")[0].0, "forwarded");
}

/// The README's bookinfo example loads as written and routes as it says.
#[test]
fn r17_the_readme_bookinfo_example_loads_and_routes() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let from = readme
        .find("For example, bookinfo's request-routing")
        .expect("the example");
    let block = &readme[from..];
    let start = block.find("```yaml\n").expect("its YAML") + "```yaml\n".len();
    let yaml = &block[start..start + block[start..].find("```").expect("its end")];
    // `MESH` has reviews (pods of versions v1, v2, v3) and ratings; the README's objects
    // replace the DestinationRule these tests load.
    let text = format!("{MESH}---\n{yaml}");
    let cfg = load_str(Path::new("README.md"), &text, 1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        dest(&cfg, &get("/").header("end-user", "jason")),
        "reviews/v2:9080"
    );
    assert_eq!(dest(&cfg, &get("/")), "reviews/v1:9080");
    let ratings = |r: &Req<'_>| forward(decide_for(&cfg, "ratings", r, 1));
    let jason = ratings(&get("/ratings/0").header("end-user", "jason"));
    assert_eq!(
        jason.fault.and_then(|f| f.delay),
        Some((Duration::from_secs(7), Share::percent(100.0)))
    );
    assert_eq!(ratings(&get("/ratings/0")).fault, None);
}
