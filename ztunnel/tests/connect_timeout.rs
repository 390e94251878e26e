//! Connect deadlines after the HBONE handshake (review #8): a destination that drops SYNs
//! (an nftables drop rule in a fresh network namespace, both ztunnels inside it on its
//! loopback) fails each connection after `h2.handshake_timeout` with the protocol's answer
//! and a counter, instead of holding it for the kernel's ~127 s of SYN retries. Generous
//! bounds on every wait; no timing assertions. Needs root (fails under `CI` without it).

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use hbone::ca::SigningCa;

/// Start `node` of `net` with `h2.handshake_timeout: deadline`, its files under `dir`.
fn node(net: Net, dir: &std::path::Path, node: &str, deadline: &str) -> ztunnel::Handle {
    let file = dir.join(format!("{node}.yaml"));
    let text = format!(
        "{}h2: {{handshake_timeout: {deadline}}}\n",
        net.node_config(node, &dir.join("ca"), "[]")
    );
    std::fs::write(&file, text).unwrap();
    start_node(&file)
}

fn timeouts(h: &ztunnel::Handle, what: &str) -> u64 {
    let text = http_get(h.addrs.stats, "/stats/prometheus").1;
    metric(&text, "ztunnel_connect_timeouts_total", &[("what", what)])
}

/// R5/R9/R10 with a blackholed destination: inbound HBONE answers the CONNECT 503,
/// inbound plaintext resets the client, outbound passthrough answers SOCKS5 "host
/// unreachable", and an outbound CONNECT whose reply does not come within the client
/// node's deadline is given up (SOCKS5 "host unreachable") while the peer node gives up
/// its own connect later; each counted by what was waited for.
#[test]
fn r5_r9_r10_blackholed_destinations_fail_after_the_connect_deadline() {
    if !netlab::require_root("r5_r9_r10_blackholed_destinations_fail_after_the_connect_deadline") {
        return;
    }
    let mut lab = netlab::Lab::for_test("ztct", "bh").unwrap();
    let ns = lab.add_ns("n").unwrap();
    let net = Net { n: 162 };
    let (server, outside) = (net.server(), net.outside());
    // Nothing listens there, and no SYN gets a RST: every one is dropped.
    netlab::nft(
        &ns,
        &format!(
            "table inet blackhole {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {{ {}, {} }} tcp dport {{ {}, {} }} drop\n  }}\n}}\n",
            server.ip(),
            outside.ip(),
            server.port(),
            outside.port()
        ),
    )
    .unwrap();
    netlab::in_ns(&ns, move || {
        runtime::init_logging();
        let dir = tmpdir("ct162");
        SigningCa::builtin(&dir.join("ca"), "cluster.local").unwrap();
        // The client node gives up first, so its own CONNECT deadline is what fails the
        // outbound tunnel; node B's is longer than that and shorter than every read bound.
        let a = node(net, &dir, "node-a", "1s");
        let b = node(net, &dir, "node-b", "3s");
        let ca = SigningCa::builtin(&dir.join("ca"), "cluster.local").unwrap();

        // Inbound HBONE to the blackholed pod: 503 once node B's deadline passed.
        let zt_b = SocketAddr::new(net.zt_b(), 15008);
        let (status, _) = hbone_call(&ca, CLIENT_ID, zt_b, server);
        assert_eq!(status, 503);
        assert_eq!(timeouts(&b, "hbone_pod"), 1);

        // Inbound plaintext (node B's :15006-style listener targets the same pod): reset.
        let mut s = connect_from(net.legacy_client(), net.plaintext_b());
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let r = s.read(&mut [0u8; 16]);
        assert!(read_closed(&r), "plaintext client not closed: {r:?}");
        assert_eq!(timeouts(&b, "plaintext_pod"), 1);

        // Outbound passthrough to an address outside the mesh: host unreachable.
        let (code, _s) = socks_connect(net.client(), a.addrs.socks5, Dest::Addr(outside));
        assert_eq!(code, 4, "SOCKS5 host unreachable");
        assert_eq!(timeouts(&a, "passthrough"), 1);

        // Outbound HBONE to the pod: node A's CONNECT is not answered within its 1 s
        // (node B is still connecting): host unreachable, counted on A; B gives up later.
        let (code, _s) = socks_connect(net.client(), a.addrs.socks5, Dest::Addr(server));
        assert_eq!(code, 4, "SOCKS5 host unreachable");
        assert_eq!(timeouts(&a, "hbone_reply"), 1);
        eventually_within(
            "node B's own connect deadline",
            Duration::from_secs(30),
            || timeouts(&b, "hbone_pod") == 2,
        );
        let text = http_get(a.addrs.stats, "/stats/prometheus").1;
        assert_eq!(
            metric(&text, "ztunnel_socks5_errors_total", &[("reply", "4")]),
            2
        );
        // The pooled connection to B survived the reset stream: nothing else timed out.
        assert_eq!(
            metric(
                &text,
                "ztunnel_hbone_outbound_handshake_timeouts_total",
                &[]
            ),
            0
        );
        for h in [a, b] {
            let _ = h.stop(Duration::from_millis(200));
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
    lab.teardown();
}
