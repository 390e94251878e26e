//! A two-node lab end to end (needs root; SKIP without it, a failure under `CI`): pods on
//! different nodes reach each other routed (the server sees the client's own address) over
//! IPv4 and, where the host has it, IPv6; processes are started and waited for; teardown
//! leaves no namespace and kills the children.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use netlab::{Addressing, Lab, Pod, TwoNodes};

const PODS: &[Pod] = &[
    Pod::new("a", 0, [10, 241, 0, 2], true),
    Pod::new("b", 1, [10, 242, 0, 2], false),
];

fn v6(p: &Pod) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0xfd00,
        0x241 + p.node as u16,
        0,
        0,
        0,
        0,
        0,
        2,
    ))
}

fn namespaces() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One byte from pod `a` to pod `b`'s `dst`: the address `b` saw it from.
fn call(lab: &Lab, dst: SocketAddr) -> IpAddr {
    let (tx, rx) = mpsc::channel();
    let _served = netlab::serve_in(&lab.ns("b"), dst, move |mut c, peer| {
        let mut b = [0u8; 1];
        if c.read_exact(&mut b).is_ok() {
            let _ = c.write_all(&b);
        }
        let _ = tx.send(peer);
    })
    .unwrap();
    let mut s = netlab::connect_in(
        &lab.ns("a"),
        dst,
        Duration::from_secs(3),
        Duration::from_secs(3),
    )
    .unwrap();
    s.write_all(b"x").unwrap();
    let mut back = [0u8; 1];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"x");
    rx.recv_timeout(Duration::from_secs(3)).unwrap().ip()
}

#[test]
fn two_nodes_route_pods_and_teardown_removes_everything() {
    if !netlab::require_root("two_nodes_route_pods_and_teardown_removes_everything") {
        return;
    }
    let mut lab = Lab::for_test("nl", "route").unwrap();
    let prefix = format!("{}-", lab.prefix());
    let v4 = Addressing {
        node_ips: [
            "192.168.241.1".parse().unwrap(),
            "192.168.241.2".parse().unwrap(),
        ],
        link_prefix: 24,
        gateways: ["10.241.0.1".parse().unwrap(), "10.242.0.1".parse().unwrap()],
        routes: vec![(0, "10.242.0.0/24".into()), (1, "10.241.0.0/24".into())],
        pod_ip: |p| p.ip.into(),
    };
    let nodes = TwoNodes::with_pods(&mut lab, PODS, &[v4]).unwrap();
    assert_eq!(netlab::captured_devs(PODS, 0), vec!["p-a".to_string()]);
    assert!(netlab::captured_devs(PODS, 1).is_empty());
    let b = SocketAddr::new(IpAddr::V4(PODS[1].ip), 8080);
    assert_eq!(call(&lab, b), IpAddr::V4(PODS[0].ip), "routed, not NATed");
    if netlab::require_ipv6("two_nodes_route_pods_and_teardown_removes_everything (IPv6 half)") {
        let v6plan = Addressing {
            node_ips: [
                "fd00:240::1".parse().unwrap(),
                "fd00:240::2".parse().unwrap(),
            ],
            link_prefix: 64,
            gateways: [
                "fd00:241::1".parse().unwrap(),
                "fd00:242::1".parse().unwrap(),
            ],
            routes: vec![(0, "fd00:242::/64".into()), (1, "fd00:241::/64".into())],
            pod_ip: v6,
        };
        nodes.address(&lab, &v6plan, PODS).unwrap();
        let b6 = SocketAddr::new(v6(&PODS[1]), 8080);
        assert_eq!(call(&lab, b6), v6(&PODS[0]));
    }
    // A process in a namespace: its READY line is waited for; one that exits first is an
    // error that carries its log.
    let dir = lab.dir().unwrap().to_path_buf();
    let mut ready = netlab::netns_command(&nodes.nodes[0], "sh");
    ready.args(["-c", "echo starting; echo READY $$; exec sleep 600"]);
    let line = lab
        .spawn_ready(
            "sleeper",
            &mut ready,
            &dir.join("sleeper.log"),
            Duration::from_secs(5),
        )
        .unwrap();
    let pid: u32 = line.strip_prefix("READY ").unwrap().parse().unwrap();
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    assert!(proc_dir.exists());
    let mut dies = netlab::netns_command(&nodes.nodes[1], "sh");
    dies.args(["-c", "echo broken >&2; exit 1"]);
    let err = lab
        .spawn_ready(
            "dies",
            &mut dies,
            &dir.join("dies.log"),
            Duration::from_secs(5),
        )
        .unwrap_err();
    assert!(
        matches!(&err, netlab::Error::NotReady { log, .. } if log.contains("broken")),
        "{err}"
    );
    assert!(namespaces().contains(&prefix));
    drop(lab);
    let left = namespaces();
    assert!(!left.contains(&prefix), "namespaces left behind:\n{left}");
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!proc_dir.exists(), "child {pid} still running");
}

#[test]
fn sweep_removes_only_namespaces_of_dead_processes() {
    if !netlab::require_root("sweep_removes_only_namespaces_of_dead_processes") {
        return;
    }
    // A pid that is surely gone: a child that exited and was reaped.
    let dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    let stale = format!("nlsweep{dead_pid}-x");
    let live = format!("{}-x", netlab::process_prefix("nlsweep"));
    for ns in [&stale, &live] {
        netlab::run(&["ip", "netns", "add", ns]).unwrap();
    }
    netlab::sweep_stale("nlsweep");
    let left = namespaces();
    let _ = netlab::run(&["ip", "netns", "del", &live]);
    let _ = netlab::run(&["ip", "netns", "del", &stale]);
    assert!(!left.contains(&stale), "stale namespace kept:\n{left}");
    assert!(
        left.contains(&live),
        "a live run's namespace was swept:\n{left}"
    );
}
