//! Outbound (R1, R4–R8) and inbound (R9–R12) decisions on a small topology loaded through
//! the whole path: YAML → wire types → snapshot.

use std::net::SocketAddr;
use std::path::Path;

use mesh_model::authz::Reason;
use mesh_model::config;
use mesh_model::model::Identity;
use mesh_model::route::{
    inbound, outbound, Inbound, InboundRequest, Outbound, PassthroughReason, SeededChooser,
};
use mesh_model::snapshot::Snapshot;

fn snap() -> Snapshot {
    let text = include_str!("topology.yaml");
    config::load_str(Path::new("tests/topology.yaml"), text, 1).unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

fn from<'a>(snap: &'a Snapshot, uid: &str) -> Option<&'a mesh_model::model::Workload> {
    Some(snap.workload(uid).unwrap())
}

#[test]
fn outbound_r1_uncaptured_source_is_untouched() {
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "legacy"),
        sa("10.96.0.2:80"),
        &mut SeededChooser::new(1),
    );
    assert_eq!(
        d,
        Outbound::Passthrough {
            target: sa("10.96.0.2:80"),
            reason: PassthroughReason::SourceNotCaptured,
            service: None,
            workload: None,
        }
    );
}

#[test]
fn outbound_r4_unknown_destination_is_passthrough() {
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "client"),
        sa("93.184.216.34:443"),
        &mut SeededChooser::new(1),
    );
    assert!(matches!(
        d,
        Outbound::Passthrough { target, reason: PassthroughReason::UnknownDestination, .. }
            if target == sa("93.184.216.34:443")
    ));
}

#[test]
fn outbound_r4_service_goes_to_one_endpoint_like_kubernetes() {
    // The legacy service's only endpoint is not captured: plain TCP to podIP:targetPort.
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "client"),
        sa("10.96.0.3:80"),
        &mut SeededChooser::new(1),
    );
    assert_eq!(
        d,
        Outbound::Passthrough {
            target: sa("10.1.0.3:8080"),
            reason: PassthroughReason::DestinationNotCaptured,
            service: Some("plain/legacy.plain.svc.cluster.local".into()),
            workload: Some("legacy".into()),
        }
    );
}

#[test]
fn outbound_r4_direct_pod_ip_goes_to_that_ip() {
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "client"),
        sa("10.1.0.3:7000"),
        &mut SeededChooser::new(1),
    );
    assert!(matches!(
        d,
        Outbound::Passthrough { target, reason: PassthroughReason::DestinationNotCaptured, .. }
            if target == sa("10.1.0.3:7000")
    ));
}

#[test]
fn outbound_r5_captured_service_endpoint_gets_hbone_to_its_node_ztunnel() {
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "client"),
        sa("10.96.0.2:80"),
        &mut SeededChooser::new(1),
    );
    assert_eq!(
        d,
        Outbound::Hbone {
            target: sa("10.0.0.2:15008"),
            authority: sa("10.1.0.2:8080"),
            identity: id("mesh", "server"),
            service: Some("mesh/server.mesh.svc.cluster.local".into()),
            workload: "server".into(),
        }
    );
}

#[test]
fn outbound_r5_direct_pod_ip_gets_hbone_with_pod_authority() {
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "client"),
        sa("10.1.0.2:8080"),
        &mut SeededChooser::new(1),
    );
    assert!(matches!(
        d,
        Outbound::Hbone { target, authority, ref identity, .. }
            if target == sa("10.0.0.2:15008") && authority == sa("10.1.0.2:8080")
                && *identity == id("mesh", "server")
    ));
    // IPv6 pod address: same decision, v6 authority.
    let d = outbound(
        &s,
        from(&s, "client"),
        sa("[fd00::2]:8080"),
        &mut SeededChooser::new(1),
    );
    assert!(matches!(d, Outbound::Hbone { authority, .. } if authority == sa("[fd00::2]:8080")));
}

#[test]
fn outbound_r6_direct_call_to_waypoint_enabled_pod_goes_to_waypoint() {
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "client"),
        sa("10.1.0.6:8080"),
        &mut SeededChooser::new(1),
    );
    assert_eq!(
        d,
        Outbound::Waypoint {
            target: sa("10.1.0.100:15008"),
            authority: sa("10.1.0.6:8080"),
            identity: Some(id("wpns", "wpns-wp")),
            waypoint: Some("wpns/wpns-wp".into()),
            service: None,
            workload: Some("wpapp".into()),
        }
    );
}

#[test]
fn outbound_r7_service_target_kept_via_waypoint() {
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "client"),
        sa("10.96.0.6:80"),
        &mut SeededChooser::new(1),
    );
    assert_eq!(
        d,
        Outbound::Waypoint {
            target: sa("10.1.0.100:15008"),
            authority: sa("10.96.0.6:80"), // the VIP, not the endpoint
            identity: Some(id("wpns", "wpns-wp")),
            waypoint: Some("wpns/wpns-wp".into()),
            service: Some("wpns/wpapp.wpns.svc.cluster.local".into()),
            workload: Some("wpapp".into()),
        }
    );
}

#[test]
fn outbound_r8_mixed_service_sends_some_via_waypoint_and_some_not() {
    let s = snap();
    let mut chooser = SeededChooser::new(42);
    let (mut via_waypoint, mut direct) = (0, 0);
    for _ in 0..200 {
        match outbound(&s, from(&s, "client"), sa("10.96.0.4:9080"), &mut chooser) {
            Outbound::Waypoint {
                target,
                authority,
                workload,
                ..
            } => {
                assert_eq!(target, sa("10.1.0.101:15008"));
                assert_eq!(authority, sa("10.96.0.4:9080"));
                assert_eq!(workload.as_deref(), Some("reviews-v2"));
                via_waypoint += 1;
            }
            Outbound::Hbone {
                authority,
                workload,
                ..
            } => {
                assert_eq!(workload, "reviews-v1");
                assert_eq!(authority, sa("10.1.0.4:9080"));
                direct += 1;
            }
            other => panic!("unexpected {other:?} (the unhealthy endpoint must never be picked)"),
        }
    }
    assert!(
        via_waypoint > 50 && direct > 50,
        "{via_waypoint} via waypoint, {direct} direct"
    );
    // Deterministic: the same seed gives the same sequence.
    let run = |seed| {
        let mut c = SeededChooser::new(seed);
        (0..20)
            .map(|_| outbound(&s, from(&s, "client"), sa("10.96.0.4:9080"), &mut c))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
}

#[test]
fn outbound_only_endpoints_with_the_port_and_per_endpoint_target_ports() {
    let s = snap();
    let mut c = SeededChooser::new(3);
    let mut seen_80 = std::collections::BTreeSet::new();
    for _ in 0..50 {
        // Port 81: only reviews-v1 serves it (server's own port list has only 80).
        match outbound(&s, from(&s, "client"), sa("10.96.0.7:81"), &mut c) {
            Outbound::Hbone { authority, .. } => assert_eq!(authority, sa("10.1.0.4:8081")),
            o => panic!("{o:?}"),
        }
        if let Outbound::Hbone { authority, .. } =
            outbound(&s, from(&s, "client"), sa("10.96.0.7:80"), &mut c)
        {
            seen_80.insert(authority);
        }
    }
    // Port 80: server overrides the target port to 9090; reviews-v1 uses the service's 8080.
    assert_eq!(
        seen_80.into_iter().collect::<Vec<_>>(),
        vec![sa("10.1.0.2:9090"), sa("10.1.0.4:8080")]
    );
    // A port the service does not have: no endpoint.
    assert_eq!(
        outbound(&s, from(&s, "client"), sa("10.96.0.7:82"), &mut c),
        Outbound::NoEndpoint {
            service: "mesh/multi.mesh.svc.cluster.local".into(),
            port: 82
        }
    );
}

#[test]
fn outbound_round_robin_cycles_through_endpoints() {
    let s = snap();
    let mut c = SeededChooser::new(0);
    let picks: Vec<String> = (0..6)
        .map(
            |_| match outbound(&s, from(&s, "client"), sa("10.96.0.8:80"), &mut c) {
                Outbound::Hbone { workload, .. } => workload,
                Outbound::Passthrough { workload, .. } => workload.unwrap(),
                o => panic!("{o:?}"),
            },
        )
        .collect();
    assert_eq!(
        picks,
        [
            "legacy",
            "reviews-v1",
            "server",
            "legacy",
            "reviews-v1",
            "server"
        ]
    );
}

#[test]
fn outbound_service_use_waypoint_label_sends_everything_to_the_service_waypoint() {
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "client"),
        sa("10.96.0.9:80"),
        &mut SeededChooser::new(1),
    );
    assert!(matches!(
        d,
        Outbound::Waypoint { target, authority, ref waypoint, .. }
            if target == sa("10.1.0.102:15008") && authority == sa("10.96.0.9:80")
                && waypoint.as_deref() == Some("mesh/svc-wp")
    ));
}

#[test]
fn outbound_from_the_waypoint_itself_is_not_looped_back() {
    let s = snap();
    let d = outbound(
        &s,
        from(&s, "wpns-wp-pod"),
        sa("10.1.0.6:8080"),
        &mut SeededChooser::new(1),
    );
    assert!(matches!(d, Outbound::Hbone { target, .. } if target == sa("10.0.0.2:15008")));
}

fn req<'a>(peer: Option<&'a Identity>, src: &str, dst: &str) -> InboundRequest<'a> {
    InboundRequest {
        peer,
        src: src.parse().unwrap(),
        dst: sa(dst),
    }
}

#[test]
fn inbound_r9_authorization_allows_or_denies_with_the_policy_name() {
    let s = snap();
    let client = id("mesh", "client");
    match inbound(
        &s,
        &req(Some(&client), "10.1.0.1", "10.1.0.2:8080"),
        "node-b",
    ) {
        Inbound::Allow { workload, verdict } => {
            assert_eq!(workload, "server");
            assert_eq!(verdict.policy(), Some("mesh/require-identity"));
        }
        o => panic!("{o:?}"),
    }
    match inbound(
        &s,
        &req(Some(&client), "10.1.0.1", "10.1.0.2:9999"),
        "node-b",
    ) {
        Inbound::Deny { verdict, .. } => {
            assert_eq!(verdict.reason, Reason::DenyPolicy("mesh/deny-9999".into()))
        }
        o => panic!("{o:?}"),
    }
    // No ALLOW policy applies to reviews-v1: allowed, no deciding policy.
    match inbound(&s, &req(None, "10.1.0.1", "10.1.0.4:9080"), "node-b") {
        Inbound::Allow { verdict, .. } => assert_eq!(verdict.reason, Reason::NoAllowPolicies),
        o => panic!("{o:?}"),
    }
}

#[test]
fn inbound_r9_only_captured_workloads_of_this_node_are_served() {
    let s = snap();
    let client = id("mesh", "client");
    for (dst, node) in [
        ("10.1.0.2:8080", "node-a"), // server lives on node-b
        ("10.1.0.3:8080", "node-b"), // legacy is not captured
        ("10.96.0.2:80", "node-b"),  // a VIP is no workload
        ("10.200.0.1:80", "node-b"), // unknown
    ] {
        assert_eq!(
            inbound(&s, &req(Some(&client), "10.1.0.1", dst), node),
            Inbound::NotServed,
            "{dst} on {node}"
        );
    }
}

#[test]
fn inbound_r10_policy_requiring_identity_rejects_plaintext() {
    let s = snap();
    match inbound(&s, &req(None, "10.1.0.1", "10.1.0.2:8080"), "node-b") {
        Inbound::Deny { workload, verdict } => {
            assert_eq!(workload, "server");
            assert_eq!(
                verdict.reason,
                Reason::NoAllowMatched(vec!["mesh/require-identity".into()])
            );
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn inbound_r11_the_waypoint_itself_is_admitted_and_authorized() {
    let s = snap();
    let wp = id("wpns", "wpns-wp");
    match inbound(&s, &req(Some(&wp), "10.1.0.100", "10.1.0.6:8080"), "node-b") {
        Inbound::Allow { verdict, .. } => {
            assert_eq!(verdict.policy(), Some("wpns/only-from-waypoint"))
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn inbound_r12_direct_call_is_hairpinned() {
    let s = snap();
    let client = id("mesh", "client");
    // A well-identified caller that is not the waypoint, and a plaintext caller, alike.
    for peer in [Some(&client), None] {
        match inbound(&s, &req(peer, "10.1.0.1", "10.1.0.6:8080"), "node-b") {
            Inbound::Hairpin {
                waypoint,
                authority,
                workload,
            } => {
                assert_eq!(waypoint.address, sa("10.1.0.100:15008"));
                assert_eq!(waypoint.identity, Some(id("wpns", "wpns-wp")));
                assert_eq!(authority, sa("10.1.0.6:8080"));
                assert_eq!(workload, "wpapp");
            }
            o => panic!("{o:?}"),
        }
    }
    // The service-account waypoint: only reviews-v2 is hairpinned, reviews-v1 is not.
    assert!(matches!(
        inbound(
            &s,
            &req(Some(&client), "10.1.0.1", "10.1.0.5:9080"),
            "node-b"
        ),
        Inbound::Hairpin { .. }
    ));
    assert!(matches!(
        inbound(
            &s,
            &req(Some(&client), "10.1.0.1", "10.1.0.4:9080"),
            "node-b"
        ),
        Inbound::Allow { .. }
    ));
}

#[test]
fn snapshot_indexes() {
    let s = snap();
    assert_eq!(s.version, 1);
    assert_eq!(
        s.workload_by_ip("fd00::2".parse().unwrap()).unwrap().uid,
        "server"
    );
    assert_eq!(
        s.service_by_vip("10.96.0.4".parse().unwrap()).unwrap().name,
        "reviews"
    );
    let by_id: Vec<_> = s
        .workloads_by_identity(&id("mesh", "server"))
        .map(|w| &w.uid)
        .collect();
    assert_eq!(by_id, ["server"]);
    // R3 applied through config: SA waypoint on reviews-v2 only, namespace waypoint on wpapp
    // but not on the waypoint's own pod; capture from the namespace label.
    assert!(s.workload("reviews-v2").unwrap().waypoint.is_some());
    assert!(s.workload("reviews-v1").unwrap().waypoint.is_none());
    assert!(s.workload("wpapp").unwrap().waypoint.is_some());
    assert!(s.workload("wpns-wp-pod").unwrap().waypoint.is_none());
    assert!(s.workload("client").unwrap().captured());
    assert!(!s.workload("legacy").unwrap().captured());
    assert!(s.namespace("mesh").is_some());
    assert_eq!(s.node("node-b").unwrap().ztunnel.to_string(), "10.0.0.2");
}

/// The topology with the `wpns` namespace waypoint labelled `istio.io/waypoint-for: for`.
fn snap_waypoint_for(traffic: &str) -> Snapshot {
    let text = include_str!("topology.yaml").replace(
        "  - name: wpns-wp\n    namespace: wpns\n    address: 10.1.0.100:15008\n",
        &format!("  - name: wpns-wp\n    namespace: wpns\n    address: 10.1.0.100:15008\n    labels: {{istio.io/waypoint-for: {traffic}}}\n"),
    );
    assert!(text.contains("waypoint-for"));
    config::load_str(Path::new("tests/topology.yaml"), &text, 1).unwrap()
}

/// Istio's `istio.io/waypoint-for`: which of service-addressed (R7) and pod-addressed (R6)
/// traffic the waypoint takes, and whether ztunnel hairpins a pod's direct callers to it
/// (R11, R12) — only when it takes pod traffic. No label: `all`, the spec's waypoint.
#[test]
fn waypoint_for_label_chooses_the_traffic_through_the_waypoint() {
    let client = id("mesh", "client");
    let wp = Some(id("wpns", "wpns-wp"));
    // (label, service VIP via waypoint, pod IP via waypoint, direct caller hairpinned)
    let table = [
        (None, true, true, true),
        (Some("all"), true, true, true),
        (Some("service"), true, false, false),
        (Some("workload"), false, true, true),
        (Some("none"), false, false, false),
    ];
    for (label, via_service, via_pod, hairpin) in table {
        let s = match label {
            None => snap(),
            Some(l) => snap_waypoint_for(l),
        };
        let traffic = s
            .workload("wpapp")
            .unwrap()
            .waypoint
            .as_ref()
            .unwrap()
            .traffic;
        assert_eq!(traffic.as_str(), label.unwrap_or("all"));
        assert_eq!(
            mesh_model::model::WaypointFor::parse(traffic.as_str()),
            Ok(traffic)
        );
        let go = |dst: &str| outbound(&s, from(&s, "client"), sa(dst), &mut SeededChooser::new(1));
        let to_service = go("10.96.0.6:80");
        assert_eq!(
            matches!(&to_service, Outbound::Waypoint { identity, authority, .. } if *identity == wp && *authority == sa("10.96.0.6:80")),
            via_service,
            "{label:?}: {to_service:?}"
        );
        if !via_service {
            // The service's endpoint, over HBONE to its node.
            assert!(
                matches!(&to_service, Outbound::Hbone { authority, workload, .. } if *authority == sa("10.1.0.6:8080") && workload == "wpapp"),
                "{label:?}: {to_service:?}"
            );
        }
        let to_pod = go("10.1.0.6:8080");
        assert_eq!(
            matches!(&to_pod, Outbound::Waypoint { identity, .. } if *identity == wp),
            via_pod,
            "{label:?}: {to_pod:?}"
        );
        if !via_pod {
            assert!(
                matches!(&to_pod, Outbound::Hbone { authority, .. } if *authority == sa("10.1.0.6:8080")),
                "{label:?}: {to_pod:?}"
            );
        }
        let direct = inbound(
            &s,
            &req(Some(&client), "10.1.0.1", "10.1.0.6:8080"),
            "node-b",
        );
        assert_eq!(
            matches!(direct, Inbound::Hairpin { .. }),
            hairpin,
            "{label:?}: {direct:?}"
        );
        if !hairpin {
            // Then its own policy decides (it admits only its waypoint).
            assert!(
                matches!(direct, Inbound::Deny { .. }),
                "{label:?}: {direct:?}"
            );
        }
        // The waypoint itself is admitted whatever it takes.
        let from_wp = inbound(
            &s,
            &req(wp.as_ref(), "10.1.0.100", "10.1.0.6:8080"),
            "node-b",
        );
        assert!(
            matches!(from_wp, Inbound::Allow { .. }),
            "{label:?}: {from_wp:?}"
        );
    }
}

#[test]
fn waypoint_for_label_values_are_checked() {
    let text = include_str!("topology.yaml").replace(
        "    address: 10.1.0.100:15008\n",
        "    address: 10.1.0.100:15008\n    labels: {istio.io/waypoint-for: services}\n",
    );
    let e = config::load_str(Path::new("tests/topology.yaml"), &text, 1).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("waypoints[1].labels.istio.io/waypoint-for"),
        "{e}"
    );
    assert!(e.contains("service, workload, all or none"), "{e}");
}
