//! Sharded listeners: with two workers, connections spread over both (every worker accepts).

mod common;

use std::io::{Read, Write};

use common::*;
use runtime::ForwardMode;

const CONNS: usize = 1000;

/// Open `CONNS` connections one after another, each exchanging a few bytes.
fn exchange_many(addr: std::net::SocketAddr) {
    for i in 0..CONNS {
        let mut s = connect(addr);
        let msg = (i as u32).to_le_bytes();
        s.write_all(&msg).unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }
}

#[test]
fn two_workers_both_accept() {
    for_each_driver(|driver| {
        let backend = Backend::echo();
        let fwd = Fwd::start(config(driver, ForwardMode::Copy, 2, &[backend.addr]));
        exchange_many(fwd.addr());
        fwd.wait_idle();
        let accepted = fwd.per_worker(|s| &s.accepted);
        assert_eq!(accepted.len(), 2);
        assert_eq!(accepted.iter().sum::<u64>(), CONNS as u64, "{accepted:?}");
        assert!(
            accepted.iter().all(|&n| n > 0),
            "a worker accepted nothing: {accepted:?}"
        );
        assert_eq!(backend.accepted(), CONNS as u64);
    });
}

/// The same through the `l4fwd` process, read from its admin `/stats` endpoint.
#[test]
fn two_workers_both_accept_l4fwd_admin_stats() {
    for_each_driver(|driver| {
        let backend = Backend::echo();
        let dir = temp_dir(&format!("sharding-{}", driver_arg(driver)));
        let yaml = format!(
            "admin: 127.0.0.1:0\nruntime:\n  workers: 2\nlisteners:\n  - listen: 127.0.0.1:0\n    upstream: {}\n",
            backend.addr
        );
        let cfg = write_config(&dir, "fw.yaml", &yaml);
        let mut p = Proc::start(&cfg, driver, None);
        assert!(p.ready_line.contains("workers=2"), "{}", p.ready_line);
        exchange_many(p.listen[0]);
        let closed = wait_until(
            "every connection closed",
            TIMEOUT,
            || p.admin_counter("l4fwd_closed_total"),
            |c| c.iter().sum::<u64>() == CONNS as u64,
        );
        assert_eq!(closed.len(), 2);
        let accepted = p.admin_counter("l4fwd_accepted_total");
        assert_eq!(accepted.len(), 2, "{}", p.admin_stats());
        assert_eq!(accepted.iter().sum::<u64>(), CONNS as u64, "{accepted:?}");
        assert!(
            accepted.iter().all(|&n| n > 0),
            "a worker accepted nothing: {accepted:?}"
        );
        assert_eq!(p.admin_counter("l4fwd_active"), vec![0, 0]);
        p.sigterm();
        assert_eq!(p.wait(TIMEOUT).code(), Some(0), "{}", p.stderr());
    });
}
