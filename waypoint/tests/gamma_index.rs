//! GAMMA route selection (R17, GEP-1294) over many generated route tables, against a
//! plain reading of the rule: the routes of the client's namespace attached to the
//! service and port replace the producer routes (those of the service's namespace) when
//! there is one, else the producer routes apply; the longest matching path prefix wins,
//! ties to the oldest route, then namespace/name; no route attached: the service itself;
//! routes attached, none matching: 404. Routes name several parents (other services,
//! ports), so the per-service index the table keeps must give the same answers as a
//! scan of every route.

mod common;

use std::path::Path;

use waypoint::config::load_str;
use waypoint::lb::{Rng, SplitMix64};

const NAMESPACES: [&str; 3] = ["app", "ns-a", "ns-b"];
const PREFIXES: [&str; 4] = ["/", "/a", "/a/b", "/c"];
const PATHS: [&str; 5] = ["/", "/a", "/a/b/x", "/c/d", "/e"];
const CREATED: [Option<&str>; 3] = [
    Some("2024-01-01T00:00:00Z"),
    Some("2024-06-01T00:00:00Z"),
    None,
];

/// One generated route: one rule, one PathPrefix match, all traffic to `backend`.
struct Gen {
    ns: &'static str,
    name: String,
    created: Option<&'static str>,
    /// (service name in `app`, port)
    parents: Vec<(&'static str, Option<u16>)>,
    prefix: &'static str,
    backend: String,
}

impl Gen {
    fn yaml(&self) -> String {
        let created = self
            .created
            .map_or(String::new(), |c| format!(", creationTimestamp: \"{c}\""));
        let parents: Vec<String> = self
            .parents
            .iter()
            .map(|(s, p)| {
                let port = p.map_or(String::new(), |p| format!(", port: {p}"));
                format!("{{group: \"\", kind: Service, name: {s}, namespace: app{port}}}")
            })
            .collect();
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {}, namespace: {}{created}}}\nspec:\n  parentRefs: [{}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: \"{}\"}}}}]\n    backendRefs: [{{name: {}, namespace: app, port: 80}}]\n",
            self.name,
            self.ns,
            parents.join(", "),
            self.prefix,
            self.backend
        )
    }

    fn attached(&self, port: u16) -> bool {
        self.parents
            .iter()
            .any(|(s, p)| *s == "echo" && p.is_none_or(|p| p == port))
    }
}

/// Segment-wise prefix match, as the Gateway API defines PathPrefix.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty()
        || path == p
        || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
}

/// The plain reading of the rule (module docs): the backend, or the status.
fn expected(routes: &[Gen], client: Option<&str>, port: u16, path: &str) -> String {
    let consumer = client
        .filter(|ns| *ns != "app")
        .filter(|ns| routes.iter().any(|r| r.ns == *ns && r.attached(port)));
    let group = consumer.unwrap_or("app");
    let mut candidates: Vec<&Gen> = routes
        .iter()
        .filter(|r| r.ns == group && r.attached(port))
        .collect();
    if candidates.is_empty() {
        return "echo".into();
    }
    candidates.sort_by(|a, b| {
        (a.created.is_none(), a.created, a.ns, &a.name).cmp(&(
            b.created.is_none(),
            b.created,
            b.ns,
            &b.name,
        ))
    });
    let mut best: Option<(usize, &Gen)> = None;
    for r in candidates {
        if !prefix_matches(r.prefix, path) {
            continue;
        }
        let len = r.prefix.trim_end_matches('/').len();
        if best.is_none_or(|(l, _)| len > l) {
            best = Some((len, r));
        }
    }
    best.map_or("404".into(), |(_, r)| r.backend.clone())
}

#[test]
fn r17_gamma_route_choice_matches_the_rule_over_generated_tables() {
    let mut rng = SplitMix64(0x5eed);
    let mut pick = |n: usize| rng.below(n as u64) as usize;
    let mut checked = 0;
    // Outcomes seen: the service itself, 404, a producer route, a consumer route.
    let mut seen = [0u32; 4];
    for table in 0..150 {
        let n = 1 + pick(6);
        let routes: Vec<Gen> = (0..n)
            .map(|i| {
                let mut parents = Vec::new();
                for (svc, p) in [("echo", 0.7), ("other", 0.4), ("echo", 0.2)] {
                    if (pick(10) as f64) < p * 10.0 {
                        let port = [None, Some(80), Some(81)][pick(3)];
                        if !parents.contains(&(svc, port)) {
                            parents.push((svc, port));
                        }
                    }
                }
                if parents.is_empty() {
                    parents.push(("echo", None));
                }
                Gen {
                    ns: NAMESPACES[pick(3)],
                    name: format!("r{i}"),
                    created: CREATED[pick(3)],
                    parents,
                    prefix: PREFIXES[pick(4)],
                    backend: format!("b{i}"),
                }
            })
            .collect();
        let mut services = String::from(
            "services:\n  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080, 81: 8081}}\n  - {name: other, namespace: app, hostname: other.app.svc.cluster.local, vips: [\"10.96.0.2\"], ports: {80: 8080, 81: 8081}}\n",
        );
        for i in 0..n {
            services.push_str(&format!(
                "  - {{name: b{i}, namespace: app, hostname: b{i}.app.svc.cluster.local, vips: [\"10.96.1.{i}\"], ports: {{80: 8080}}}}\n"
            ));
        }
        let docs: Vec<String> = routes.iter().map(Gen::yaml).collect();
        // The consumer routes' backends are in `app`: a ReferenceGrant there lets them.
        let from: Vec<String> = NAMESPACES
            .iter()
            .map(|ns| {
                format!("{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {ns}}}")
            })
            .collect();
        let grant = format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: all, namespace: app}}\nspec:\n  from: [{}]\n  to: [{{group: \"\", kind: Service}}]\n",
            from.join(", ")
        );
        let text = format!("{services}---\n{grant}---\n{}", docs.join("---\n"));
        let cfg = load_str(Path::new("gamma-gen.yaml"), &text, 1)
            .unwrap_or_else(|e| panic!("table {table}: {e}\n{text}"));
        for client in [None, Some("app"), Some("ns-a"), Some("ns-b"), Some("ns-c")] {
            for port in [80, 81] {
                for path in PATHS {
                    let got = common::echo_route_decision(&cfg, client, port, path);
                    let kind = match got.as_str() {
                        "echo" => 0,
                        "404" => 1,
                        b => {
                            let i: usize = b[1..].parse().unwrap();
                            if routes[i].ns == "app" {
                                2
                            } else {
                                3
                            }
                        }
                    };
                    seen[kind] += 1;
                    assert_eq!(
                        got,
                        expected(&routes, client, port, path),
                        "table {table}, client {client:?}, port {port}, path {path}\n{text}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 150 * 5 * 2 * PATHS.len());
    assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
}
