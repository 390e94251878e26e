//! `ztunnel capture install|remove` on a real network namespace (needs root): the nftables
//! table and the policy routing of `tproxy` capture (`ip rule fwmark 0x111 lookup 133`,
//! `local default dev lo table 133`, both families) are installed once however often
//! `install` runs, and `remove` takes all of it away.

use std::process::Command;

fn out(args: &[&str]) -> String {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(o.status.success(), "{args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn capture(action: &str, ns: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args([
            "capture", action, "--netns", ns, "--iface", "p-x", "--pod", "10.9.0.2",
        ])
        .args(["--pod", "fd00:9::2/128"])
        .output()
        .unwrap();
    assert!(o.status.success(), "capture {action}: {o:?}");
}

/// The `fwmark 0x111 lookup 133` rules of family `fam` in `ns`.
fn rules(ns: &str, fam: &str) -> usize {
    out(&["ip", "-n", ns, fam, "rule", "show"])
        .lines()
        .filter(|l| l.contains("fwmark 0x111") && l.contains("lookup 133"))
        .count()
}

#[test]
fn install_is_idempotent_and_remove_takes_table_and_routing_away() {
    if !netlab::require_root("install_is_idempotent_and_remove_takes_table_and_routing_away") {
        return;
    }
    let mut lab = netlab::Lab::for_test("capcli", "cli").unwrap();
    let ns = lab.add_ns("node").unwrap();
    let v6 = netlab::ipv6_available();
    for _ in 0..2 {
        capture("install", &ns);
    }
    let table = out(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "nft",
        "list",
        "table",
        "inet",
        "ztunnel_capture",
    ]);
    assert!(table.contains("tproxy to :15001"), "{table}");
    assert!(table.contains("tproxy ip to :15006"), "{table}");
    assert_eq!(rules(&ns, "-4"), 1, "one IPv4 rule after two installs");
    let routes = out(&["ip", "-n", &ns, "-4", "route", "show", "table", "133"]);
    assert!(routes.contains("local default dev lo"), "{routes}");
    if v6 {
        assert!(table.contains("tproxy ip6 to :15006"), "{table}");
        assert_eq!(rules(&ns, "-6"), 1, "one IPv6 rule after two installs");
        let routes = out(&["ip", "-n", &ns, "-6", "route", "show", "table", "133"]);
        assert!(routes.contains("local default dev lo"), "{routes}");
    }
    capture("remove", &ns);
    let tables = out(&["ip", "netns", "exec", &ns, "nft", "list", "tables"]);
    assert!(!tables.contains("ztunnel_capture"), "{tables}");
    assert_eq!(rules(&ns, "-4"), 0);
    assert!(
        out(&["ip", "-n", &ns, "-4", "route", "show", "table", "133"])
            .trim()
            .is_empty()
    );
    if v6 {
        assert_eq!(rules(&ns, "-6"), 0);
    }
    lab.teardown();
}
