//! Rules R1–R12 end to end on loopback: two ztunnels, pods as echo servers on their own
//! IPs, a SOCKS5 client bound to the client pod's IP. Every test checks the bytes and the
//! path (from the stats endpoints of both nodes or the test waypoint).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use hbone::ca::SigningCa;

#[test]
fn r1_uncaptured_destination_is_passthrough() {
    let t = Topo::new(101, "[]");
    let legacy = Pod::start(t.net.legacy(), "legacy");
    let outside = Pod::start(t.net.outside(), "outside");
    let socks = t.a().addrs.socks5;
    // A workload that is not captured (namespace without the ambient label).
    let (who, s) = socks_call(
        t.net.client(),
        socks,
        Dest::Addr(legacy.addr),
        b"plain bytes",
    );
    assert_eq!(who, "legacy");
    drop(s);
    // An address that is no workload of the mesh.
    let (who, s) = socks_call(t.net.client(), socks, Dest::Addr(outside.addr), b"xyz");
    assert_eq!(who, "outside");
    drop(s);
    // Path: node A passed both through as plain TCP; node B never saw them.
    eventually("passthrough counted", || {
        let a = t.stats_a();
        metric(
            &a,
            "ztunnel_connection_paths_total",
            &[
                ("route", "passthrough"),
                ("target", &legacy.addr.to_string()),
            ],
        ) == 1
            && metric(
                &a,
                "ztunnel_connection_paths_total",
                // Outside the mesh: no address in the label (bounded label values).
                &[("route", "passthrough"), ("target", "unknown")],
            ) == 1
            && metric(
                &a,
                "istio_tcp_connections_closed_total",
                &[
                    ("reporter", "source"),
                    ("connection_security_policy", "none"),
                    ("destination_workload", "legacy"),
                ],
            ) == 1
    });
    let a = t.stats_a();
    assert_eq!(
        metric(
            &a,
            "istio_tcp_sent_bytes_total",
            &[("destination_workload", "legacy")]
        ),
        11
    );
    assert_eq!(
        metric(
            &a,
            "istio_tcp_received_bytes_total",
            &[("destination_workload", "legacy")]
        ),
        "legacy\n".len() as u64 + 11
    );
    let b = t.stats_b();
    assert_eq!(metric(&b, "istio_tcp_connections_opened_total", &[]), 0);
}

#[test]
fn r4_service_vip_and_hostname_go_to_one_endpoint() {
    let t = Topo::new(104, "[]");
    let _s1 = Pod::start(t.net.server(), "server");
    let _s2 = Pod::start(t.net.server2(), "server2");
    let socks = t.a().addrs.socks5;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..12 {
        let dst = if i % 2 == 0 {
            Dest::Addr(SocketAddr::new(t.net.echo_vip(), 80))
        } else {
            Dest::Name("echo.ns-b.svc.cluster.local", 80)
        };
        let (code, mut s) = socks_connect(t.net.client(), socks, dst);
        assert_eq!(code, 0);
        let who = hello(&mut s);
        assert!(who == "server" || who == "server2", "{who}");
        assert_eq!(roundtrip(&mut s, b"vip"), b"vip");
        seen.insert(who);
    }
    assert_eq!(seen.len(), 2, "both endpoints are used: {seen:?}");
    // Each connection went to exactly one endpoint over HBONE with podIP:targetPort.
    eventually("12 hbone routes", || {
        let a = t.stats_a();
        let to = |pod: SocketAddr| {
            metric(
                &a,
                "ztunnel_connection_paths_total",
                &[
                    ("direction", "outbound"),
                    ("route", "hbone"),
                    ("target", &format!("{}:15008", t.net.zt_b())),
                    ("authority", &pod.to_string()),
                ],
            )
        };
        to(t.net.server()) + to(t.net.server2()) == 12
            && metric(
                &a,
                "istio_tcp_connections_closed_total",
                &[("destination_service", "echo.ns-b.svc.cluster.local")],
            ) == 12
    });
    // Unknown names get "host unreachable", not a crash.
    let (code, _) = socks_connect(t.net.client(), socks, Dest::Name("nope.example", 80));
    assert_eq!(code, 4);
}

#[test]
fn r5_captured_destination_gets_hbone_with_client_identity() {
    let t = Topo::new(105, "[]");
    let server = Pod::start(t.net.server(), "server");
    let (code, mut s) = socks_connect(t.net.client(), t.a().addrs.socks5, Dest::Addr(server.addr));
    assert_eq!(code, 0);
    assert_eq!(hello(&mut s), "server");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; big.len()];
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        r.read_exact(&mut back).unwrap();
        back
    });
    s.write_all(&big).unwrap();
    assert_eq!(reader.join().unwrap(), big);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // The pod saw a connection from node B's ztunnel, not from the client directly.
    let from = server.peers.recv_timeout(Duration::from_secs(1)).unwrap();
    assert_ne!(from.ip(), t.net.client());
    eventually("both sides counted", || {
        let b = t.stats_b();
        let a = t.stats_a();
        metric(
            &b,
            "ztunnel_connection_paths_total",
            &[
                ("direction", "inbound"),
                ("route", "hbone_allow"),
                ("authority", &server.addr.to_string()),
                ("peer", CLIENT_ID),
            ],
        ) == 1
            && metric(
                &b,
                "istio_tcp_connections_closed_total",
                &[
                    ("reporter", "destination"),
                    ("source_principal", CLIENT_ID),
                    ("source_workload", "client"),
                    ("destination_workload", "server"),
                    ("destination_principal", SERVER_ID),
                    ("connection_security_policy", "mutual_tls"),
                ],
            ) == 1
            && metric(
                &a,
                "istio_tcp_connections_closed_total",
                &[
                    ("reporter", "source"),
                    ("source_principal", CLIENT_ID),
                    ("destination_principal", SERVER_ID),
                    ("connection_security_policy", "mutual_tls"),
                ],
            ) == 1
    });
    let b = t.stats_b();
    assert_eq!(
        metric(
            &b,
            "istio_tcp_sent_bytes_total",
            &[("reporter", "destination")]
        ),
        big.len() as u64
    );
    assert_eq!(
        metric(
            &b,
            "istio_tcp_received_bytes_total",
            &[("reporter", "destination")]
        ),
        big.len() as u64 + "server\n".len() as u64
    );
    assert_eq!(
        metric(&t.stats_a(), "istio_tcp_sent_bytes_total", &[]),
        big.len() as u64
    );
}

#[test]
fn r9_deny_policy_refuses_and_counts_with_policy_name() {
    let t = Topo::new(109, DENY_CLIENT);
    let server = Pod::start(t.net.server(), "server");
    let (code, _s) = socks_connect(t.net.client(), t.a().addrs.socks5, Dest::Addr(server.addr));
    assert_eq!(code, 2, "connection not allowed by ruleset");
    eventually("denied on B, refused on A", || {
        denied_total(&t.stats_b(), "hbone", "ns-b/deny-client") == 1
            && metric(
                &t.stats_a(),
                "ztunnel_socks5_errors_total",
                &[("reply", "2")],
            ) == 1
    });
    assert!(
        server.peers.try_recv().is_err(),
        "the pod was never reached"
    );
    assert_eq!(
        metric(&t.stats_b(), "istio_tcp_connections_opened_total", &[]),
        0
    );
}

#[test]
fn r10_identity_policy_rejects_plaintext_but_allows_hbone() {
    let t = Topo::new(110, REQUIRE_MTLS);
    let server = Pod::start(t.net.server(), "server");
    // Plaintext to the pod (through B's :15006 stand-in): reset, counted with the policy.
    // The reset may come before connect() returns.
    if let Ok(mut p) = try_connect_from(t.net.ip(9, 9), t.net.plaintext_b()) {
        let _ = p.write_all(b"hello?");
        let mut buf = [0u8; 16];
        let r = p.read(&mut buf);
        // Closed is EOF or a reset; a timeout (or EINTR) would mean it is still open.
        let closed = read_closed(&r);
        assert!(closed, "plaintext must be refused: {r:?}");
    }
    eventually("plaintext denied", || {
        denied_total(&t.stats_b(), "plaintext", "ns-b/require-mtls") == 1
    });
    // The same pod over HBONE with the client's identity: allowed.
    let (who, _s) = socks_call(
        t.net.client(),
        t.a().addrs.socks5,
        Dest::Addr(server.addr),
        b"mtls",
    );
    assert_eq!(who, "server");
}

#[test]
fn r10_plaintext_without_policy_is_allowed() {
    let t = Topo::new(111, "[]");
    let _server = Pod::start(t.net.server(), "server");
    let mut p = connect_from(t.net.ip(9, 9), t.net.plaintext_b());
    assert_eq!(hello(&mut p), "server");
    assert_eq!(roundtrip(&mut p, b"plain"), b"plain");
    drop(p);
    eventually("plaintext allowed", || {
        metric(
            &t.stats_b(),
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none"),
                ("destination_workload", "server"),
            ],
        ) == 1
    });
}

#[test]
fn r6_direct_pod_with_waypoint_goes_to_waypoint() {
    let t = Topo::new(106, "[]");
    let wp = waypoint(&t.ca(), t.net.waypoint());
    let (who, _s) = socks_call(
        t.net.client(),
        t.a().addrs.socks5,
        Dest::Addr(t.net.wpod()),
        b"via wp",
    );
    assert_eq!(who, "waypoint");
    let seen = wp.seen.recv_timeout(Duration::from_secs(2)).unwrap();
    assert_eq!(seen.authority, t.net.wpod(), "pod IP:port as authority");
    assert_eq!(seen.peer.unwrap().to_string(), CLIENT_ID);
    eventually("waypoint route", || {
        metric(
            &t.stats_a(),
            "ztunnel_connection_paths_total",
            &[
                ("route", "waypoint"),
                ("target", &t.net.waypoint().to_string()),
            ],
        ) == 1
    });
}

#[test]
fn r7_service_behind_waypoint_gets_vip_as_authority() {
    let t = Topo::new(107, "[]");
    let wp = waypoint(&t.ca(), t.net.waypoint());
    let vip = SocketAddr::new(t.net.wsvc_vip(), 80);
    let (who, _s) = socks_call(t.net.client(), t.a().addrs.socks5, Dest::Addr(vip), b"svc");
    assert_eq!(who, "waypoint");
    let seen = wp.seen.recv_timeout(Duration::from_secs(2)).unwrap();
    assert_eq!(
        seen.authority, vip,
        "R7: the service VIP:port, not the endpoint"
    );
    assert_eq!(seen.peer.unwrap().to_string(), CLIENT_ID);
    eventually("waypoint route with VIP authority", || {
        metric(
            &t.stats_a(),
            "ztunnel_connection_paths_total",
            &[("route", "waypoint"), ("authority", &vip.to_string())],
        ) == 1
    });
    // Nothing reached node B directly.
    assert_eq!(
        metric(&t.stats_b(), "ztunnel_connection_paths_total", &[]),
        0
    );
}

#[test]
fn r12_direct_plaintext_call_is_hairpinned_to_waypoint() {
    let t = Topo::new(112, "[]");
    let wp = waypoint(&t.ca(), t.net.waypoint());
    // A client outside the mesh calls the waypoint-enabled pod directly (B's plaintext).
    let mut p = connect_from(t.net.ip(9, 9), t.net.plaintext_wp());
    assert_eq!(hello(&mut p), "waypoint");
    assert_eq!(roundtrip(&mut p, b"hairpin"), b"hairpin");
    let seen = wp.seen.recv_timeout(Duration::from_secs(2)).unwrap();
    assert_eq!(seen.authority, t.net.wpod());
    assert_eq!(seen.peer.unwrap().to_string(), ZTUNNEL_ID);
    eventually("hairpin counted", || {
        metric(
            &t.stats_b(),
            "ztunnel_connection_paths_total",
            &[
                ("route", "plaintext_hairpin"),
                ("target", &t.net.waypoint().to_string()),
                ("authority", &t.net.wpod().to_string()),
            ],
        ) == 1
    });
}

#[test]
fn inbound_hbone_for_pod_not_on_this_node_is_refused() {
    let t = Topo::new(113, "[]");
    // The client pod lives on node A; asking node B for it directly gets 400 → reply 4.
    let zt_b = SocketAddr::new(t.net.zt_b(), 15008);
    let target: SocketAddr = SocketAddr::new(t.net.client(), 8080);
    let (status, _) = hbone_call(&t.ca(), CLIENT_ID, zt_b, target);
    assert_eq!(status, 400);
    let b = t.stats_b();
    assert_eq!(
        metric(
            &b,
            "ztunnel_connection_paths_total",
            &[("route", "hbone_not_served")]
        ),
        1
    );
    // The inbound HBONE server's own counters are exported, summed over the workers.
    for kind in ["connections", "streams"] {
        assert_eq!(
            metric(&b, "ztunnel_hbone_inbound_total", &[("kind", kind)]),
            1,
            "{kind}"
        );
    }
}

#[test]
fn hbone_client_certificate_from_another_root_is_refused_and_counted() {
    let t = Topo::new(115, "[]");
    let zt_b = SocketAddr::new(t.net.zt_b(), 15008);
    // Same trust domain, another root: B must refuse the client certificate.
    let (foreign, _, _) = SigningCa::generate_root("cluster.local").unwrap();
    let r = try_hbone_call(&foreign, &t.ca(), CLIENT_ID, ZTUNNEL_ID, zt_b, t.net.wpod());
    assert!(
        r.is_err(),
        "a certificate from another root was accepted: {r:?}"
    );
    eventually("server-side refusal counted", || {
        metric(
            &t.stats_b(),
            "ztunnel_hbone_tls_failures_total",
            &[("side", "server"), ("reason", "untrusted")],
        ) == 1
    });
    let b = t.stats_b();
    assert_eq!(
        metric(&b, "ztunnel_hbone_inbound_total", &[("kind", "streams")]),
        0
    );
    // Our own client's view of the same refusal is on the caller's side, not ztunnel B's.
    assert_eq!(
        metric(
            &b,
            "ztunnel_hbone_tls_failures_total",
            &[("side", "client"), ("reason", "untrusted")]
        ),
        0
    );
}

#[test]
fn r2_uncaptured_source_is_passthrough_even_to_captured_pod() {
    let t = Topo::new(102, "[]");
    let server = Pod::start(t.net.server(), "server");
    // legacy-client is in a namespace without istio.io/dataplane-mode=ambient.
    let (who, _s) = socks_call(
        t.net.legacy_client(),
        t.a().addrs.socks5,
        Dest::Addr(server.addr),
        b"r2",
    );
    assert_eq!(who, "server");
    eventually("plain passthrough", || {
        metric(
            &t.stats_a(),
            "ztunnel_connection_paths_total",
            &[
                ("route", "passthrough"),
                ("target", &server.addr.to_string()),
            ],
        ) == 1
    });
    assert_eq!(
        metric(&t.stats_b(), "ztunnel_connection_paths_total", &[]),
        0,
        "node B's ztunnel never saw it"
    );
}

#[test]
fn r3_service_account_waypoint_beats_namespace_waypoint() {
    let t = Topo::new(103, "[]");
    let ns_wp = waypoint(&t.ca(), t.net.waypoint());
    let sa_wp = waypoint_as(&t.ca(), t.net.waypoint2(), WAYPOINT2_ID);
    // wpod2 runs as service account wpod2: waypoint2 (annotated for it) wins.
    let (code, mut s) = socks_connect(
        t.net.client(),
        t.a().addrs.socks5,
        Dest::Addr(t.net.wpod2()),
    );
    assert_eq!(code, 0);
    assert_eq!(hello(&mut s), "waypoint");
    let seen = sa_wp.seen.recv_timeout(Duration::from_secs(2)).unwrap();
    assert_eq!(seen.authority, t.net.wpod2());
    assert!(ns_wp.seen.try_recv().is_err());
    // wpod (another service account in the namespace): the namespace waypoint.
    let (code, mut s) = socks_connect(t.net.client(), t.a().addrs.socks5, Dest::Addr(t.net.wpod()));
    assert_eq!(code, 0);
    assert_eq!(hello(&mut s), "waypoint");
    let seen = ns_wp.seen.recv_timeout(Duration::from_secs(2)).unwrap();
    assert_eq!(seen.authority, t.net.wpod());
    assert!(sa_wp.seen.try_recv().is_err());
    let a = t.stats_a();
    for (wp, pod) in [
        (t.net.waypoint2(), t.net.wpod2()),
        (t.net.waypoint(), t.net.wpod()),
    ] {
        assert_eq!(
            metric(
                &a,
                "ztunnel_connection_paths_total",
                &[
                    ("route", "waypoint"),
                    ("target", &wp.to_string()),
                    ("authority", &pod.to_string())
                ],
            ),
            1
        );
    }
}

#[test]
fn r8_mixed_service_sends_some_via_waypoint_and_some_direct() {
    let t = Topo::new(108, "[]");
    let wp = waypoint(&t.ca(), t.net.waypoint());
    let _server = Pod::start(t.net.server(), "server");
    let vip = SocketAddr::new(t.net.mixed_vip(), 80);
    let (mut via_wp, mut direct) = (0, 0);
    for _ in 0..24 {
        let (who, _s) = socks_call(t.net.client(), t.a().addrs.socks5, Dest::Addr(vip), b"m");
        match who.as_str() {
            "waypoint" => via_wp += 1,
            "server" => direct += 1,
            other => panic!("{other}"),
        }
    }
    assert!(
        via_wp > 0 && direct > 0,
        "waypoint {via_wp}, direct {direct}"
    );
    // The waypoint got the VIP as authority every time (R7); the rest went to node B.
    for _ in 0..via_wp {
        assert_eq!(
            wp.seen
                .recv_timeout(Duration::from_secs(2))
                .unwrap()
                .authority,
            vip
        );
    }
    eventually("paths counted", || {
        let a = t.stats_a();
        metric(
            &a,
            "ztunnel_connection_paths_total",
            &[("route", "waypoint"), ("authority", &vip.to_string())],
        ) == via_wp
            && metric(
                &a,
                "ztunnel_connection_paths_total",
                &[
                    ("route", "hbone"),
                    ("authority", &t.net.server().to_string()),
                ],
            ) == direct
    });
}

#[test]
fn r11_only_the_waypoint_reaches_a_waypoint_enabled_pod() {
    let t = Topo::new(114, "[]");
    let wp = waypoint(&t.ca(), t.net.waypoint());
    let _pod = Pod::start(t.net.wpod(), "wpod");
    let zt_b = SocketAddr::new(t.net.zt_b(), 15008);
    // The waypoint itself (by identity) is forwarded to the pod.
    let (status, line) = hbone_call(&t.ca(), WAYPOINT_ID, zt_b, t.net.wpod());
    assert_eq!((status, line.as_str()), (200, "wpod"));
    // Anyone else calling the pod directly over HBONE is hairpinned to the waypoint.
    let (status, line) = hbone_call(&t.ca(), CLIENT_ID, zt_b, t.net.wpod());
    assert_eq!((status, line.as_str()), (200, "waypoint"));
    let seen = wp.seen.recv_timeout(Duration::from_secs(2)).unwrap();
    assert_eq!(seen.authority, t.net.wpod());
    assert_eq!(seen.peer.unwrap().to_string(), ZTUNNEL_ID);
    let b = t.stats_b();
    assert_eq!(
        metric(
            &b,
            "ztunnel_connection_paths_total",
            &[("route", "hbone_allow"), ("peer", WAYPOINT_ID)]
        ),
        1
    );
    assert_eq!(
        metric(
            &b,
            "ztunnel_connection_paths_total",
            &[
                ("route", "hbone_hairpin"),
                ("peer", CLIENT_ID),
                ("target", &t.net.waypoint().to_string())
            ]
        ),
        1
    );
}

/// Pod-addressed HBONE without any redirect: node B's HBONE listener is bound on the
/// server pod's own address (no `nodes:` entry for node B, so node A tunnels to
/// `podIP:15008`); the accepted socket's local address names the pod, whose certificate is
/// presented. Node A's own address still presents the ztunnel identity.
#[test]
fn r5_pod_addressed_hbone_presents_the_pods_identity_on_loopback() {
    runtime::init_logging();
    let net = Net { n: 115 };
    let dir = tmpdir("n115");
    let ca_dir = dir.join("ca");
    SigningCa::builtin(&ca_dir, "cluster.local").unwrap();
    let unnode_b = |text: String| {
        let b = format!("  - {{name: node-b, ztunnel: {}}}\n", net.zt_b());
        assert!(text.contains(&b));
        text.replace(&b, "")
    };
    let file_a = dir.join("a.yaml");
    let file_b = dir.join("b.yaml");
    std::fs::write(&file_a, unnode_b(net.node_config("node-a", &ca_dir, "[]"))).unwrap();
    let pod_hbone = SocketAddr::new(net.server().ip(), 15008);
    let b_text = unnode_b(net.node_config("node-b", &ca_dir, "[]")).replacen(
        "  ca:",
        &format!("  hbone: \"{pod_hbone}\"\n  ca:"),
        1,
    );
    std::fs::write(&file_b, b_text).unwrap();
    let a = start_node(&file_a);
    let b = start_node(&file_b);
    assert_eq!(b.addrs.hbone, pod_hbone);
    let server = Pod::start(net.server(), "server");
    let ca = SigningCa::builtin(&ca_dir, "cluster.local").unwrap();
    // What the listener presents, read from the certificate.
    assert_eq!(
        presented_identity(&ca, CLIENT_ID, SERVER_ID, pod_hbone),
        Ok(vec![SERVER_ID.to_string()])
    );
    assert!(presented_identity(&ca, CLIENT_ID, ZTUNNEL_ID, pod_hbone).is_err());
    assert_eq!(
        presented_identity(&ca, CLIENT_ID, ZTUNNEL_ID, a.addrs.hbone),
        Ok(vec![ZTUNNEL_ID.to_string()])
    );
    // Through the mesh: SOCKS5 on A → HBONE to the pod's address → B → pod.
    let (code, mut s) = socks_connect(net.client(), a.addrs.socks5, Dest::Addr(server.addr));
    assert_eq!(code, 0);
    assert_eq!(hello(&mut s), "server");
    let data: Vec<u8> = (0..32_768u32).map(|i| (i % 249) as u8).collect();
    assert_eq!(roundtrip(&mut s, &data), data);
    drop(s);
    let stats = |h: &ztunnel::Handle| http_get(h.addrs.stats, "/stats/prometheus").1;
    eventually("both sides acted as their own workloads", || {
        metric(
            &stats(&a),
            "ztunnel_connection_paths_total",
            &[
                ("direction", "outbound"),
                ("route", "hbone"),
                ("target", &pod_hbone.to_string()),
                ("peer", SERVER_ID),
                ("identity", CLIENT_ID),
            ],
        ) == 1
            && metric(
                &stats(&b),
                "ztunnel_connection_paths_total",
                &[
                    ("direction", "inbound"),
                    ("route", "hbone_allow"),
                    ("peer", CLIENT_ID),
                    ("identity", SERVER_ID),
                ],
            ) == 1
    });
    // A tunnel to the server pod may not carry a stream for another pod of the node.
    let (status, _) = hbone_call_expecting(&ca, CLIENT_ID, SERVER_ID, pod_hbone, net.wpod());
    assert_eq!(status, 400);
    let _ = a.stop(Duration::from_millis(200));
    let _ = b.stop(Duration::from_millis(200));
    let _ = std::fs::remove_dir_all(&dir);
}
