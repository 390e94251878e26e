//! Endpoint choice for routed requests: the model's endpoints, the DestinationRule's policy.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use waypoint::config::{load_str, WaypointConfig};
use waypoint::lb::{HashInput, SplitMix64};
use waypoint::route::ObjectRef;
use waypoint::upstream::{endpoints, Balancers};

const MODEL: &str = r#"
nodes:
  - {name: node-a, ztunnel: 10.0.0.1}
workloads:
  - {uid: e1, name: e1, namespace: default, workloadIps: ["10.1.0.1"], node: node-a, services: {"default/echo.default.svc.cluster.local": {80: 8080}}}
  - {uid: e2, name: e2, namespace: default, workloadIps: ["10.1.0.2"], services: {"default/echo.default.svc.cluster.local": {80: 9090}}}
  - {uid: e3, name: e3, namespace: default, workloadIps: ["10.1.0.3"], services: {"default/echo.default.svc.cluster.local": {80: 8080}}}
  - {uid: sick, name: sick, namespace: default, workloadIps: ["10.1.0.4"], status: Unhealthy, services: {"default/echo.default.svc.cluster.local": {80: 8080}}}
services:
  - {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["10.96.0.10"], ports: {80: 8080}}
"#;

fn load(extra: &str, version: u64) -> WaypointConfig {
    load_str(Path::new("u.yaml"), &format!("{MODEL}{extra}"), version)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn endpoints_are_healthy_workloads_with_target_ports() {
    let cfg = load("", 1);
    let eps = endpoints(
        cfg.mesh.as_ref().unwrap(),
        &ObjectRef::new("default", "echo"),
        80,
        None,
        None,
        None,
    );
    let got: Vec<(String, String, String)> = eps
        .iter()
        .map(|e| {
            (
                e.workload_uid.clone(),
                e.authority.to_string(),
                e.hbone.to_string(),
            )
        })
        .collect();
    let want = [
        ("e1", "10.1.0.1:8080", "10.0.0.1:15008"),
        ("e2", "10.1.0.2:9090", "10.1.0.2:15008"),
        ("e3", "10.1.0.3:8080", "10.1.0.3:15008"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, want);
    assert!(endpoints(
        cfg.mesh.as_ref().unwrap(),
        &ObjectRef::new("default", "echo"),
        81,
        None,
        None,
        None
    )
    .is_empty());
    assert!(endpoints(
        cfg.mesh.as_ref().unwrap(),
        &ObjectRef::new("default", "nope"),
        80,
        None,
        None,
        None
    )
    .is_empty());
}

fn spread(cfg: &WaypointConfig, n: usize) -> BTreeMap<String, usize> {
    let mut b = Balancers::default();
    let mut rng = SplitMix64(9);
    let now = Instant::now();
    let echo = ObjectRef::new("default", "echo");
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let (i, ep) = b
            .pick(cfg, &echo, 80, &HashInput::default(), now, &mut rng)
            .unwrap();
        *counts.entry(ep.workload_uid).or_default() += 1;
        b.finish(&echo, 80, i, 200, now);
    }
    counts
}

#[test]
fn r17_default_self_routing_spreads_over_endpoints() {
    // Least request (the default) with no load: even.
    let counts = spread(&load("", 1), 3_000);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|&c| (800..1_200).contains(&c)),
        "{counts:?}"
    );
    // Round robin from a DestinationRule: exact.
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo}\nspec:\n  host: echo.default.svc.cluster.local\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n";
    let counts = spread(&load(dr, 1), 300);
    assert!(counts.values().all(|&c| c == 100), "{counts:?}");
}

#[test]
fn outlier_state_survives_an_unrelated_reload() {
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 30s, maxEjectionPercent: 100}\n";
    let cfg = load(dr, 1);
    let echo = ObjectRef::new("default", "echo");
    let mut b = Balancers::default();
    let mut rng = SplitMix64(1);
    let now = Instant::now();
    let (i, ep) = b
        .pick(&cfg, &echo, 80, &HashInput::default(), now, &mut rng)
        .unwrap();
    assert_eq!(ep.workload_uid, "e1");
    b.finish(&echo, 80, i, 503, now);
    // A new snapshot version with the same endpoints keeps e1 ejected.
    let cfg2 = load(dr, 2);
    for _ in 0..6 {
        let (_, ep) = b
            .pick(&cfg2, &echo, 80, &HashInput::default(), now, &mut rng)
            .unwrap();
        assert_ne!(ep.workload_uid, "e1");
    }
    let later = now + Duration::from_secs(30);
    let seen: Vec<String> = (0..3)
        .map(|_| {
            b.pick(&cfg2, &echo, 80, &HashInput::default(), later, &mut rng)
                .unwrap()
                .1
                .workload_uid
        })
        .collect();
    assert!(seen.contains(&"e1".to_string()), "{seen:?}");
}

/// A DestinationRule hashing on a query parameter (`httpQueryParameterName`), at the
/// service port its `portLevelSettings` name: one user, one endpoint; the service's other
/// ports keep its round robin.
#[test]
fn query_parameter_hash_from_port_level_settings() {
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    portLevelSettings:\n    - port: {number: 80}\n      loadBalancer: {consistentHash: {httpQueryParameterName: user}}\n";
    let cfg = load(dr, 1);
    let echo = ObjectRef::new("default", "echo");
    let mut b = Balancers::default();
    let mut rng = SplitMix64(3);
    let now = Instant::now();
    assert!(Balancers::hashed(&cfg, &echo, 80));
    assert!(!Balancers::hashed(&cfg, &echo, 81));
    let mut users_per_endpoint = BTreeMap::<String, usize>::new();
    for user in 0..30 {
        let q = format!("user={user}");
        let input = HashInput {
            query: Some(&q),
            ..HashInput::default()
        };
        let mut first = None;
        for _ in 0..4 {
            let (i, ep) = b.pick(&cfg, &echo, 80, &input, now, &mut rng).unwrap();
            b.finish(&echo, 80, i, 200, now);
            assert_eq!(
                *first.get_or_insert(ep.workload_uid.clone()),
                ep.workload_uid,
                "{q}"
            );
        }
        *users_per_endpoint.entry(first.unwrap()).or_default() += 1;
    }
    assert_eq!(users_per_endpoint.len(), 3, "{users_per_endpoint:?}");
}

/// The waypoint (`10.9.0.1`, region `r1`, zone `z1`, node `n1`) and `echo`'s endpoints
/// around it; `{svc}` is the service's locality fields.
fn near_model(svc: &str, zone_a_healthy: bool) -> String {
    let status = if zone_a_healthy {
        "Healthy"
    } else {
        "Unhealthy"
    };
    format!(
        r#"
workloads:
  - {{uid: wp, name: wp, namespace: default, workloadIps: ["10.9.0.1"], node: n1, locality: {{region: r1, zone: z1}}}}
  - {{uid: same-zone, name: a, namespace: default, workloadIps: ["10.1.0.1"], node: n2, status: {status}, locality: {{region: r1, zone: z1}}, services: {{"default/echo.default.svc.cluster.local": {{80: 8080}}}}}}
  - {{uid: same-node, name: b, namespace: default, workloadIps: ["10.1.0.2"], node: n1, status: {status}, locality: {{region: r1, zone: z1}}, services: {{"default/echo.default.svc.cluster.local": {{80: 8080}}}}}}
  - {{uid: same-region, name: c, namespace: default, workloadIps: ["10.1.0.3"], node: n3, locality: {{region: r1, zone: z2}}, services: {{"default/echo.default.svc.cluster.local": {{80: 8080}}}}}}
  - {{uid: far, name: d, namespace: default, workloadIps: ["10.1.0.4"], node: n4, locality: {{region: r2, zone: z9}}, services: {{"default/echo.default.svc.cluster.local": {{80: 8080}}}}}}
services:
  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["10.96.0.10"], ports: {{80: 8080}}{svc}}}
"#
    )
}

/// The endpoints of `echo:80` the waypoint at `10.9.0.1` uses with their locality
/// priorities, and where its balancer sends 200 requests.
fn near(svc: &str, zone_a_healthy: bool) -> (Vec<(String, u8)>, Vec<String>) {
    let cfg = load_str(Path::new("n.yaml"), &near_model(svc, zone_a_healthy), 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let snap = cfg.mesh.as_ref().unwrap();
    let echo = ObjectRef::new("default", "echo");
    let me = "10.9.0.1".parse().unwrap();
    let eps = endpoints(snap, &echo, 80, None, snap.workload_by_ip(me), None)
        .into_iter()
        .map(|e| (e.workload_uid, e.tier))
        .collect();
    let mut b = Balancers::at(me);
    let mut rng = SplitMix64(3);
    let mut picked = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let input = HashInput::default();
        if let Some((i, e)) = b.pick(&cfg, &echo, 80, &input, Instant::now(), &mut rng) {
            picked.insert(e.workload_uid.clone());
            b.finish(&echo, 80, i, 200, Instant::now());
        }
    }
    (eps, picked.into_iter().collect())
}

fn tiers(list: &[(&str, u8)]) -> Vec<(String, u8)> {
    list.iter().map(|(n, t)| (n.to_string(), *t)).collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|n| n.to_string()).collect()
}

#[test]
fn prefer_close_keeps_the_waypoints_zone_and_fails_over_outward() {
    // No preference: every healthy endpoint, one priority.
    let (all, picked) = near("", true);
    let every = ["far", "same-node", "same-region", "same-zone"];
    assert_eq!(all, tiers(&every.map(|n| (n, 0))));
    assert_eq!(picked, names(&every));
    // PreferClose (network, region, zone, subzone): the waypoint's zone first (its node
    // counts no more than the zone)…
    let svc = ", trafficDistribution: PreferClose";
    let (eps, picked) = near(svc, true);
    assert_eq!(
        eps,
        tiers(&[
            ("far", 3),
            ("same-node", 0),
            ("same-region", 2),
            ("same-zone", 0)
        ])
    );
    assert_eq!(picked, names(&["same-node", "same-zone"]));
    // …then its region when the zone has no healthy endpoint.
    assert_eq!(near(svc, false).1, names(&["same-region"]));
    // PreferSameNode: the node first.
    let svc = ", trafficDistribution: PreferSameNode";
    assert_eq!(near(svc, true).1, names(&["same-node"]));
    assert_eq!(near(svc, false).1, names(&["same-region"]));
}

#[test]
fn internal_traffic_policy_local_is_the_node_only_and_strict() {
    let svc = ", internalTrafficPolicy: Local";
    assert_eq!(
        near(svc, true),
        (tiers(&[("same-node", 0)]), names(&["same-node"]))
    );
    // Nothing on the node: no endpoint at all (no failover).
    assert_eq!(near(svc, false), (vec![], vec![]));
}

/// A DestinationRule with outlier detection: Istio's locality failover, by the waypoint's
/// own locality (its region `r1`, zone `z1`).
#[test]
fn destination_rule_outlier_detection_brings_locality_failover() {
    let dr = |lb: &str| {
        format!("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: echo, namespace: default}}\nspec:\n  host: echo\n  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: 1}}\n{lb}")
    };
    let load = |extra: String| {
        load_str(Path::new("n.yaml"), &(near_model("", true) + &extra), 1)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let snap_tiers = |cfg: &WaypointConfig| {
        let snap = cfg.mesh.as_ref().unwrap();
        let echo = ObjectRef::new("default", "echo");
        let lb = cfg.lb(&echo, Some(80));
        let near = snap.workload_by_ip("10.9.0.1".parse().unwrap());
        endpoints(snap, &echo, 80, None, near, lb.locality.as_ref())
            .into_iter()
            .map(|e| (e.workload_uid, e.tier))
            .collect::<Vec<_>>()
    };
    // Same zone 0 (no subzones here), same region 2, another region 3.
    assert_eq!(
        snap_tiers(&load(dr(""))),
        tiers(&[
            ("far", 3),
            ("same-node", 0),
            ("same-region", 2),
            ("same-zone", 0)
        ])
    );
    // failoverPriority: by the region only.
    let by_region = "    loadBalancer:\n      localityLbSetting:\n        failoverPriority: [topology.kubernetes.io/region]\n";
    assert_eq!(
        snap_tiers(&load(dr(by_region))),
        tiers(&[
            ("far", 1),
            ("same-node", 0),
            ("same-region", 0),
            ("same-zone", 0)
        ])
    );
    // Turned off, or without outlier detection: one priority.
    let off = "    loadBalancer:\n      localityLbSetting: {enabled: false}\n";
    assert!(snap_tiers(&load(dr(off))).iter().all(|(_, t)| *t == 0));
    let no_od = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: default}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting: {failover: [{from: r1, to: r2}]}\n";
    assert!(snap_tiers(&load(no_od.to_string()))
        .iter()
        .all(|(_, t)| *t == 0));
    // What is refused, by field.
    for (lb, field) in [
        (
            "    loadBalancer:\n      localityLbSetting:\n        failover: [{from: r1, to: r2}]\n        distribute: [{from: r1/*, to: {r2/*: 100}}]\n",
            "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute",
        ),
        (
            "    loadBalancer:\n      localityLbSetting:\n        distribute: [{from: r1/*, to: {r2/*: 50}}]\n",
            "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
        ),
        (
            "    loadBalancer:\n      localityLbSetting:\n        distribute: [{from: \"r1/*/z\", to: {r2/*: 100}}]\n",
            "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].from",
        ),
        (
            "    loadBalancer:\n      localityLbSetting:\n        failover: [{from: r1, to: r2}]\n        failoverPriority: [version]\n",
            "spec.trafficPolicy.loadBalancer.localityLbSetting.failoverPriority",
        ),
        (
            "    loadBalancer:\n      localityLbSetting:\n        failoverPriority: [version=v1]\n",
            "spec.trafficPolicy.loadBalancer.localityLbSetting.failoverPriority[0]",
        ),
    ] {
        let text = near_model("", true) + &dr(lb);
        let e = load_str(Path::new("n.yaml"), &text, 1).unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
    }
}

/// DestinationRule `warmupDurationSecs`: an endpoint that joins later ramps up, while the
/// ones already balanced keep their age across the snapshot change.
#[test]
fn warmup_ramps_an_endpoint_that_joins_later() {
    let model = |extra: &str| {
        format!(
            "workloads:\n  - {{uid: e1, name: e1, namespace: default, workloadIps: [\"10.1.0.1\"], services: {{\"default/echo.default.svc.cluster.local\": {{80: 8080}}}}}}\n  - {{uid: e2, name: e2, namespace: default, workloadIps: [\"10.1.0.2\"], services: {{\"default/echo.default.svc.cluster.local\": {{80: 8080}}}}}}\n{extra}services:\n  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: [\"10.96.0.10\"], ports: {{80: 8080}}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: echo, namespace: default}}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer: {{simple: ROUND_ROBIN, warmupDurationSecs: 100s}}\n"
        )
    };
    let v1 = load_str(Path::new("w.yaml"), &model(""), 1).unwrap_or_else(|e| panic!("{e}"));
    let e3 = "  - {uid: e3, name: e3, namespace: default, workloadIps: [\"10.1.0.3\"], services: {\"default/echo.default.svc.cluster.local\": {80: 8080}}}\n";
    let v2 = load_str(Path::new("w.yaml"), &model(e3), 2).unwrap_or_else(|e| panic!("{e}"));
    let echo = ObjectRef::new("default", "echo");
    let mut b = Balancers::default();
    let mut rng = SplitMix64(9);
    let t0 = Instant::now();
    assert!(b
        .pick(&v1, &echo, 80, &HashInput::default(), t0, &mut rng)
        .is_some());
    // e3 joins 50 s later: e1 and e2 are half warm (0.5), e3 starts at 10 %.
    let at = t0 + Duration::from_secs(50);
    let mut e3_share = 0;
    for _ in 0..4_000 {
        let (_, e) = b
            .pick(&v2, &echo, 80, &HashInput::default(), at, &mut rng)
            .unwrap();
        e3_share += usize::from(e.workload_uid == "e3");
    }
    // 0.1 / 1.1 of 4,000 ≈ 364 (had e1 and e2 started over with it: a third, 1,333).
    assert!((250..500).contains(&e3_share), "{e3_share}");
    // A warmup on consistent hashing is refused, naming the field.
    let text = model("").replace("simple: ROUND_ROBIN", "consistentHash: {useSourceIp: true}");
    let e = load_str(Path::new("w.yaml"), &text, 1).unwrap_err();
    assert_eq!(
        e.field.as_deref(),
        Some("spec.trafficPolicy.loadBalancer.warmupDurationSecs"),
        "{e}"
    );
}

/// DestinationRule `localityLbSetting.distribute` (with or without outlier detection, as
/// Istio applies it): for the waypoint in `r1/z1`, its zone takes 80 % and region `r2`
/// 20 %; `r1/z2`, which no `to` names, takes nothing (10,000 requests, ±2 %).
#[test]
fn destination_rule_distribute_weighs_localities() {
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: default}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n      localityLbSetting:\n        distribute:\n        - from: r1/z1/*\n          to: {\"r1/z1/*\": 80, \"r2/*\": 20}\n";
    let cfg = load_str(Path::new("d.yaml"), &(near_model("", true) + dr), 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let snap = cfg.mesh.as_ref().unwrap();
    let echo = ObjectRef::new("default", "echo");
    let me = "10.9.0.1".parse().unwrap();
    let lb = cfg.lb(&echo, Some(80));
    let shares: Vec<(String, Option<(u32, u32)>)> = endpoints(
        snap,
        &echo,
        80,
        None,
        snap.workload_by_ip(me),
        lb.locality.as_ref(),
    )
    .into_iter()
    .map(|e| (e.workload_uid, e.share))
    .collect();
    assert_eq!(
        shares,
        [
            ("far".to_string(), Some((0, 20))),
            ("same-node".to_string(), Some((1, 80))),
            ("same-zone".to_string(), Some((1, 80))),
        ]
    );
    let mut b = Balancers::at(me);
    let mut rng = SplitMix64(5);
    let mut by = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..10_000 {
        let now = Instant::now();
        let (i, e) = b
            .pick(&cfg, &echo, 80, &HashInput::default(), now, &mut rng)
            .unwrap();
        *by.entry(e.workload_uid.clone()).or_default() += 1;
        b.finish(&echo, 80, i, 200, now);
    }
    let zone =
        by.get("same-node").copied().unwrap_or(0) + by.get("same-zone").copied().unwrap_or(0);
    assert!((7_800..=8_200).contains(&zone), "{by:?}");
    assert_eq!(by.get("same-region"), None, "{by:?}");
}
