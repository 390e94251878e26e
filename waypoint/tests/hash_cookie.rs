//! Session affinity by a generated cookie, as Envoy gives it for Istio's DestinationRule
//! `consistentHash.httpCookie` with a `ttl`: a client without the cookie gets one
//! (`Set-Cookie`), and its requests carrying it go to one endpoint.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{echo_node, ip, named_backend};

const CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 1, 0, 7);

#[test]
fn a_cookie_with_a_ttl_is_generated_and_keeps_the_client_on_one_endpoint() {
    let (net, ca, _zt) = echo_node(37);
    let pods: Vec<_> = (0..4)
        .map(|i| named_backend(ip(net, 2 + i), ["p0", "p1", "p2", "p3"][i as usize]))
        .collect();
    let workloads: String = pods
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!(
                "  - {{uid: p{i}, name: p{i}, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/echo.app.svc.cluster.local\": {{80: {}}}}}}}\n",
                a.ip(),
                a.port()
            )
        })
        .collect();
    let model = common::app_model(
        ip(net, 1),
        &workloads,
        "  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n",
    );
    let dr = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: app}
spec:
  host: echo
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie:
          name: session
          path: /
          ttl: 3600s
          attributes: [{name: SameSite, value: Lax}]
"#;
    let text = format!("{model}---\n{dr}");
    let wp = common::Waypoint::with_stats(&ca, &text, &format!("waypoint-cookie-{net}.yaml"));
    let get = |cookie: Option<&str>| {
        let c = cookie.map_or(String::new(), |c| {
            format!("cookie: other=1; session={c}\r\n")
        });
        format!("GET / HTTP/1.1\r\nhost: echo.app.svc.cluster.local\r\n{c}\r\n")
    };
    // Clients without the cookie: each gets one of its own.
    let mut cookies = vec![];
    for _ in 0..8 {
        let r = common::http1_on_tunnel(
            wp.addr,
            &wp.client_cert,
            "10.96.0.1:80",
            CLIENT,
            &[get(None)],
        );
        let head = r[0].head.to_ascii_lowercase();
        let line = head
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .unwrap_or_else(|| panic!("no set-cookie in {head}"))
            .to_string();
        let (value, attrs) = line
            .strip_prefix("session=\"")
            .and_then(|l| l.split_once('"'))
            .unwrap_or_else(|| panic!("{line}"));
        assert_eq!(attrs, "; max-age=3600; path=/; httponly; samesite=lax");
        cookies.push((value.to_string(), r[0].text()));
    }
    assert_eq!(
        cookies.iter().map(|c| &c.0).collect::<BTreeSet<_>>().len(),
        8,
        "{cookies:?}"
    );
    // With its cookie (quoted or not), a client stays on the endpoint its first request
    // went to (balanced by the cookie it was given); no new cookie.
    let mut endpoints = BTreeSet::new();
    for (c, first) in &cookies {
        let reqs: Vec<String> = (0..10)
            .map(|i| {
                if i % 2 == 0 {
                    get(Some(c))
                } else {
                    get(Some(&format!("\"{c}\"")))
                }
            })
            .collect();
        let rs = common::http1_on_tunnel(wp.addr, &wp.client_cert, "10.96.0.1:80", CLIENT, &reqs);
        let seen: BTreeSet<String> = rs.iter().map(|r| r.text()).collect();
        assert_eq!(seen, BTreeSet::from([first.clone()]), "cookie {c}");
        assert!(rs
            .iter()
            .all(|r| !r.head.to_ascii_lowercase().contains("set-cookie")));
        endpoints.extend(seen);
    }
    // Eight cookies did not all land on one of four endpoints.
    assert!(endpoints.len() > 1, "{endpoints:?}");
}

#[test]
fn cookie_ttl_errors_name_their_field() {
    let text = "services:\n  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: app}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer:\n      consistentHash:\n        httpCookie: {name: s, ttl: soon}\n";
    let err = waypoint::config::load_str(Path::new("c.yaml"), text, 1)
        .expect_err("a bad ttl")
        .to_string();
    assert!(
        err.contains("spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl"),
        "{err}"
    );
}
