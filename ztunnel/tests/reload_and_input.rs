//! Hot reload, bad SOCKS5 input, config errors and the binary.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;

fn version(stats: &str) -> u64 {
    metric(stats, "ztunnel_config_version", &[])
}

/// Long connections held through the reloads (issue 4: 1,000 through 50 reloads).
const LONG_CONNS: usize = 1_000;
const RELOADS: u64 = 50;

#[test]
fn hot_reload_keeps_connections_rechecks_policy_and_a_broken_file_keeps_the_old_config() {
    let t = Topo::new(120, "[]");
    let _server = Pod::start(t.net.server(), "server");
    let socks = t.a().addrs.socks5;
    let started = std::time::Instant::now();
    let mut conns: Vec<_> = (0..LONG_CONNS)
        .map(|_| {
            let (code, mut s) = socks_connect(t.net.client(), socks, Dest::Addr(t.net.server()));
            assert_eq!(code, 0);
            assert_eq!(hello(&mut s), "server");
            s
        })
        .collect();
    let opened = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
    ];
    eventually("all long connections open on B", || {
        metric(&t.stats_b(), "istio_tcp_connections_opened_total", &opened) == LONG_CONNS as u64
    });
    eprintln!("{LONG_CONNS} connections open in {:?}", started.elapsed());
    // Fifty reloads that change nothing for these connections; a few of them talk between
    // reloads…
    let started = std::time::Instant::now();
    let base = version(&t.stats_b());
    for i in 0..RELOADS {
        t.rewrite_b(&format!(
            "{}\n# reload {i}\n",
            t.net.node_config("node-b", &t.ca_dir, "[]")
        ));
        eventually("reload published", || version(&t.stats_b()) > base + i);
        let c = &mut conns[(i as usize * 37) % LONG_CONNS];
        assert_eq!(
            roundtrip(c, format!("r{i}").as_bytes()),
            format!("r{i}").as_bytes()
        );
    }
    assert_eq!(version(&t.stats_b()), base + RELOADS);
    eprintln!("{RELOADS} reloads in {:?}", started.elapsed());
    // …and afterwards every one of them is still alive: each exchanges its own bytes, and
    // none was closed on either node.
    for (i, c) in conns.iter_mut().enumerate() {
        let msg = format!("alive {i}");
        assert_eq!(
            roundtrip(c, msg.as_bytes()),
            msg.as_bytes(),
            "connection {i}"
        );
    }
    let (a, b) = (t.stats_a(), t.stats_b());
    assert_eq!(metric(&a, "istio_tcp_connections_closed_total", &[]), 0);
    assert_eq!(metric(&b, "istio_tcp_connections_closed_total", &[]), 0);
    assert_eq!(
        metric(&b, "istio_tcp_connections_opened_total", &opened),
        LONG_CONNS as u64
    );
    assert_eq!(metric(&b, "ztunnel_config_reload_errors_total", &[]), 0);
    // …then a policy that denies the client: new connections are refused, and the live ones
    // are re-checked against the new snapshot and closed.
    let before = version(&t.stats_b());
    t.rewrite_b(&t.net.node_config("node-b", &t.ca_dir, DENY_CLIENT));
    eventually("deny policy loaded", || version(&t.stats_b()) > before);
    let (code, _) = socks_connect(t.net.client(), socks, Dest::Addr(t.net.server()));
    assert_eq!(code, 2);
    for c in &mut conns {
        let mut buf = [0u8; 8];
        let r = c.read(&mut buf);
        // Closed is EOF or a reset; a timeout (or EINTR) would mean it is still open.
        let closed = read_closed(&r);
        assert!(closed, "revoked connection still open: {r:?}");
    }
    eventually("revocations counted", || {
        denied_total(&t.stats_b(), "hbone_live", "ns-b/deny-client") == LONG_CONNS as u64
    });
    // A broken file: rejected, counted, the deny policy keeps applying.
    let v = version(&t.stats_b());
    let broken = t
        .net
        .node_config("node-b", &t.ca_dir, DENY_CLIENT)
        .replace("serviceAccount: server,", "serviceAcount: server,");
    t.rewrite_b(&broken);
    eventually("reload error counted", || {
        metric(&t.stats_b(), "ztunnel_config_reload_errors_total", &[]) == 1
    });
    assert_eq!(version(&t.stats_b()), v);
    let (code, _) = socks_connect(t.net.client(), socks, Dest::Addr(t.net.server()));
    assert_eq!(code, 2, "old config (with the deny policy) still serving");
    let dump = http_get(t.b().addrs.admin, "/config_dump").1;
    assert!(dump.contains("deny-client"), "{dump}");
    assert!(dump.contains(&format!("\"version\":{v}")), "{dump}");
    // The waypoint-enabled pods' binding, with the traffic it takes (no label: all).
    assert!(dump.contains("\"for\":\"all\""), "{dump}");
    // Fixed again: allowed.
    t.rewrite_b(&t.net.node_config("node-b", &t.ca_dir, "[]"));
    eventually("fixed config loaded", || version(&t.stats_b()) > v);
    let (who, _s) = socks_call(t.net.client(), socks, Dest::Addr(t.net.server()), b"end");
    assert_eq!(who, "server");
}

#[test]
fn broken_config_names_file_line_and_field() {
    let net = Net { n: 121 };
    let dir = tmpdir("cfg");
    let file = dir.join("z.yaml");
    let good = net.node_config("node-b", &dir.join("ca"), "[]");
    let profile = tuning::Profile::default();
    assert!(ztunnel::config::load_str(&file, &good, &profile, 1).is_ok());
    // Unknown field in a workload.
    let bad = good.replace("serviceAccount: server,", "serviceAcount: server,");
    let e = ztunnel::config::load_str(&file, &bad, &profile, 1).unwrap_err();
    let line = good
        .lines()
        .position(|l| l.contains("serviceAccount: server,"))
        .unwrap()
        + 1;
    assert_eq!(e.line, Some(line), "{e}");
    assert!(e.to_string().contains("serviceAcount"), "{e}");
    // Unknown key in the ztunnel section.
    let bad = good.replace("  node: node-b", "  node: node-b\n  sock5: 127.0.0.1:1");
    let e = ztunnel::config::load_str(&file, &bad, &profile, 1).unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.to_string().contains("sock5"), "{e}");
    // Duplicate IP.
    let bad = good.replace("127.121.2.3]", "127.121.2.2]");
    let e = ztunnel::config::load_str(&file, &bad, &profile, 1).unwrap_err();
    assert!(e.to_string().contains("127.121.2.2"), "{e}");
    // Dangling endpoint.
    let bad = good.replace("workloadUid: ns-b/server2", "workloadUid: ns-b/nobody");
    let e = ztunnel::config::load_str(&file, &bad, &profile, 1).unwrap_err();
    assert!(e.to_string().contains("nobody"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn raw(src: std::net::IpAddr, socks: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = connect_from(src, socks);
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn socks5_garbage_gets_reply_codes_not_a_crash() {
    let t = Topo::new(122, "[]");
    let _server = Pod::start(t.net.server(), "server");
    let socks = t.a().addrs.socks5;
    let c = t.net.client();
    // Not SOCKS5 at all / no acceptable method: 05 FF.
    assert_eq!(raw(c, socks, b"GET / HTTP/1.1\r\n\r\n"), [5, 0xff]);
    assert_eq!(raw(c, socks, &[5, 1, 2]), [5, 0xff]);
    // BIND: command not supported (7). Unknown address type: 8. Bad version: 1.
    let r = raw(c, socks, &[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80]);
    assert_eq!(&r[..4], &[5, 0, 5, 7]);
    let r = raw(c, socks, &[5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80]);
    assert_eq!(&r[..4], &[5, 0, 5, 8]);
    let r = raw(c, socks, &[5, 1, 0, 4, 1, 0, 1, 1, 2, 3, 4, 0, 80]);
    assert_eq!(&r[..4], &[5, 0, 5, 1]);
    // Truncated request then EOF: closed without a reply, no crash.
    assert_eq!(raw(c, socks, &[5, 1, 0, 5, 1, 0, 1, 127]), [5, 0]);
    // Unknown domain: host unreachable (4).
    let (code, _) = socks_connect(c, socks, Dest::Name("no.such.host", 80));
    assert_eq!(code, 4);
    // A source that is not a workload of this node: not allowed (2).
    let (code, _) = socks_connect(t.net.ip(9, 9), socks, Dest::Addr(t.net.server()));
    assert_eq!(code, 2);
    // Nothing listening behind a passthrough: connection refused (5).
    let (code, _) = socks_connect(c, socks, Dest::Addr(t.net.addr(4, 4, 9)));
    assert_eq!(code, 5);
    // Random garbage, many times.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for _ in 0..200 {
        let mut b = Vec::new();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for i in 0..(x % 64) {
            b.push((x >> (i % 56)) as u8);
        }
        let _ = raw(c, socks, &b);
    }
    // Still serving, and the errors were counted.
    let (code, mut s) = socks_connect(c, socks, Dest::Addr(t.net.server()));
    assert_eq!(code, 0);
    assert_eq!(hello(&mut s), "server");
    let a = t.stats_a();
    for reply in ["1", "2", "4", "5", "7", "8", "255"] {
        assert!(
            metric(&a, "ztunnel_socks5_errors_total", &[("reply", reply)]) >= 1,
            "reply {reply}: {a}"
        );
    }
}

#[test]
fn socks5_ipv6_destination_passes_through() {
    let t = Topo::new(123, "[]");
    let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
        // Under CI a test that cannot run fails; elsewhere it says why it did not run.
        assert!(
            std::env::var_os("CI").is_none(),
            "no IPv6 loopback and CI is set: failing"
        );
        eprintln!("no IPv6 loopback here; not run");
        return;
    };
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.write_all(b"v6\n");
        }
    });
    let (code, mut s) = socks_connect(t.net.client(), t.a().addrs.socks5, Dest::Addr(addr));
    assert_eq!(code, 0);
    assert_eq!(hello(&mut s), "v6");
    eventually("v6 passthrough counted", || {
        metric(
            &t.stats_a(),
            "ztunnel_connection_paths_total",
            // Not a mesh address: counted without it.
            &[("route", "passthrough"), ("target", "unknown")],
        ) == 1
    });
}

fn write_cfg(dir: &Path, text: &str) -> std::path::PathBuf {
    let f = dir.join("bin.yaml");
    std::fs::write(&f, text).unwrap();
    f
}

#[test]
fn binary_serves_readiness_and_config_dump_then_drains_on_sigterm() {
    let net = Net { n: 124 };
    let dir = tmpdir("bin");
    let f = write_cfg(&dir, &net.node_config("node-a", &dir.join("ca"), "[]"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["--config", f.to_str().unwrap(), "--profile", "low-memory"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("READY "), "{line}");
    assert!(
        line.contains(&format!("socks5={}:15080", net.zt_a())),
        "{line}"
    );
    let ready = http_get(SocketAddr::new(net.zt_a(), 15021), "/healthz/ready");
    assert!(ready.0.contains("200"), "{ready:?}");
    let dump = http_get(SocketAddr::new(net.zt_a(), 15000), "/config_dump").1;
    assert!(dump.contains("\"workloads\""), "{dump}");
    assert!(dump.contains("echo.ns-b.svc.cluster.local"), "{dump}");
    assert!(dump.contains("istio-system/sa/ztunnel"), "{dump}");
    // SIGTERM → drain → exit 0.
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    // A broken file: exit 2 with file:line.
    let bad = write_cfg(
        &dir,
        "ztunnel:\n  node: x\n  nod: y\n  ca: {builtin: /tmp}\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bin.yaml:3"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An edit saved between the config load and the start of the watcher is applied: the
/// watcher starts from the text the running snapshot was loaded from, not from a fresh
/// read of the file (which would take the edit as already in force and never load it).
#[test]
fn an_edit_saved_between_load_and_start_is_applied() {
    let net = Net { n: 126 };
    let dir = tmpdir("edit-before-start");
    let file = dir.join("z.yaml");
    let text = net.node_config("node-b", &dir.join("ca"), "[]");
    std::fs::write(&file, &text).unwrap();
    let profile = tuning::Profile::default();
    let loaded = ztunnel::config::load_file(&file, &profile, 1).unwrap();
    assert_eq!(loaded.text.as_deref(), Some(text.as_str()));
    // The edit lands before the watcher exists.
    std::fs::write(&file, format!("{text}# edited\n")).unwrap();
    let h = start_watching(loaded, &file);
    assert_eq!(h.state.version(), 1);
    eventually_within("the edited file loaded", Duration::from_secs(30), || {
        h.state.version() > 1
    });
    h.stop(Duration::from_secs(5)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The IPv4 address (its bits) the test resolver answers for `moving.example.com`.
static MOVING: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn moving_resolver(host: &str) -> Result<Vec<std::net::IpAddr>, String> {
    match host {
        "moving.example.com" => Ok(vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            MOVING.load(std::sync::atomic::Ordering::SeqCst),
        ))]),
        _ => Err("unknown host".into()),
    }
}

/// A DNS ServiceEntry's host name is looked up again every `dns_refresh`: an answer with
/// other addresses loads the file in force again, and the entry's endpoint follows it.
#[test]
fn a_dns_service_entry_follows_its_host_name_to_new_addresses() {
    use std::sync::atomic::Ordering::SeqCst;
    let net = Net { n: 127 };
    let dir = tmpdir("dns-refresh");
    let file = dir.join("z.yaml");
    let text = format!(
        "{}serviceEntries:\n  - {{name: moving, namespace: ns-b, hosts: [moving.example.com], addresses: [240.240.0.70], ports: [{{number: 80, name: http}}], resolution: DNS}}\n",
        net.node_config("node-b", &dir.join("ca"), "[]")
    );
    std::fs::write(&file, &text).unwrap();
    let (first, second) = (
        std::net::Ipv4Addr::new(203, 0, 113, 1),
        std::net::Ipv4Addr::new(203, 0, 113, 2),
    );
    MOVING.store(first.into(), SeqCst);
    let profile = tuning::Profile::default();
    let resolve = mesh_model::config::ResolverFn(moving_resolver);
    let mut loaded = ztunnel::config::load_str_with(&file, &text, &profile, 1, &resolve.0).unwrap();
    loaded.text = Some(text.clone());
    loaded.settings.dns_refresh = Duration::from_millis(100);
    loaded.settings.dns_resolver = resolve;
    let h = start_watching(loaded, &file);
    let endpoint = |h: &ztunnel::Handle| {
        let st = h.state.load();
        let svc = st
            .model
            .service_by_vip("240.240.0.70".parse().unwrap())
            .unwrap();
        st.model
            .workload(&svc.endpoints[0].workload_uid)
            .unwrap()
            .ips[0]
    };
    assert_eq!(endpoint(&h), first);
    MOVING.store(second.into(), SeqCst);
    eventually_within("the new answer loaded", Duration::from_secs(30), || {
        endpoint(&h) == second
    });
    let stats = http_get(h.addrs.stats, "/stats/prometheus").1;
    assert_eq!(metric(&stats, "ztunnel_dns_reloads_total", &[]), 1);
    h.stop(Duration::from_secs(5)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
