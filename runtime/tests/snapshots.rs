//! Routing snapshots: publishing new upstreams while long connections transfer drops none of
//! them, and every connection opened after a publish reaches the newly published backend.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown as NetShutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use runtime::forwarder::Routes;
use runtime::ForwardMode;

const SWAPS: usize = 200;
const LONG_CONNS: usize = 4;
const ROUND: usize = 64 * 1024;

/// One long connection: echo rounds until `stop`, then half-close and check everything came
/// back. Returns (bytes sent, bytes echoed, checksum sent, checksum echoed).
fn long_conn(
    addr: std::net::SocketAddr,
    seed: u64,
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> ((u64, u64), (u64, u64)) {
    let mut s = connect(addr);
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).unwrap();
    assert_eq!(
        tag[0], b'A',
        "long connection opened before any swap reached {tag:?}"
    );
    let pat = pattern(seed);
    let period = pat.len() / 2;
    let (mut sent, mut echoed) = (Sum64::new(), Sum64::new());
    let mut off = 0usize;
    let mut buf = vec![0u8; ROUND];
    while !stop.load(Ordering::SeqCst) {
        let chunk = &pat[off..off + ROUND];
        s.write_all(chunk).expect("long connection write");
        sent.update(chunk);
        off = (off + ROUND) % period;
        s.read_exact(&mut buf).expect("long connection read");
        echoed.update(&buf);
        rounds.fetch_add(1, Ordering::SeqCst);
    }
    s.shutdown(NetShutdown::Write).unwrap();
    let (rest, end) = read_to_end_or_error(&mut s);
    end.expect("long connection ends with EOF");
    echoed.update(&rest);
    (sent.finish(), echoed.finish())
}

#[test]
fn publish_swaps_keep_long_connections_and_route_new_ones() {
    for_each_driver(|driver| {
        for mode in MODES {
            eprintln!("mode {}", mode_arg(mode));
            swaps(driver, mode);
        }
    });
}

fn swaps(driver: runtime::DriverChoice, mode: ForwardMode) {
    let a = Backend::tagged_echo(b'A');
    let b = Backend::tagged_echo(b'B');
    let fwd = Fwd::start(config(driver, mode, 2, &[a.addr]));
    let addr = fwd.addr();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds: Vec<Arc<AtomicU64>> = (0..LONG_CONNS)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let longs: Vec<_> = (0..LONG_CONNS)
        .map(|i| {
            let (r, st) = (rounds[i].clone(), stop.clone());
            std::thread::spawn(move || long_conn(addr, 100 + i as u64, r, st))
        })
        .collect();
    // Every long connection is up and moving before the first swap.
    let wait_progress = |what: &str| {
        let base: Vec<u64> = rounds.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        wait_until(
            what,
            TIMEOUT,
            || {
                rounds
                    .iter()
                    .zip(&base)
                    .filter(|(r, b)| r.load(Ordering::SeqCst) < **b + 2)
                    .count()
            },
            |stalled| *stalled == 0,
        );
    };
    wait_progress("long connections to start transferring");

    let first_version = fwd.handle().routes().version();
    for i in 0..SWAPS {
        let (target, tag) = if i % 2 == 0 {
            (b.addr, b'B')
        } else {
            (a.addr, b'A')
        };
        let v = fwd.handle().publish(Routes {
            upstreams: vec![target],
        });
        assert_eq!(v, first_version + 1 + i as u64);
        // A new connection after the swap reaches the backend just published.
        let mut s = connect(addr);
        let mut got = [0u8; 1];
        s.read_exact(&mut got).unwrap();
        assert_eq!(
            got[0], tag,
            "swap {i}: new connection reached the old backend"
        );
        s.write_all(&(i as u32).to_le_bytes()).unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, (i as u32).to_le_bytes());
        drop(s);
        if i % 25 == 24 {
            // The long connections keep moving across the swaps.
            wait_progress(&format!(
                "long connections to keep transferring after swap {i}"
            ));
        }
    }
    stop.store(true, Ordering::SeqCst);
    for (i, h) in longs.into_iter().enumerate() {
        let (sent, echoed) = join_bounded(h, "long connection", TIMEOUT);
        assert!(sent.0 > 0);
        assert_eq!(echoed, sent, "long connection {i}: echo differs");
    }
    fwd.wait_idle();
    assert_eq!(fwd.sum(|s| &s.resets), 0);
    assert_eq!(fwd.sum(|s| &s.upstream_connect_errors), 0);
    assert_eq!(fwd.sum(|s| &s.accepted), (LONG_CONNS + SWAPS) as u64);
    // SWAPS/2 new connections each, plus the long ones on A.
    assert_eq!(b.accepted(), (SWAPS / 2) as u64);
    assert_eq!(a.accepted(), (LONG_CONNS + SWAPS / 2) as u64);
    fwd.stop_within(TIMEOUT);
}

/// Editing the config file on disk publishes the new upstream (open connections keep the old
/// one); a broken edit is rejected and the running config keeps serving.
#[test]
fn config_file_reload_swaps_upstream() {
    for_each_driver(|driver| {
        let a = Backend::tagged_echo(b'A');
        let b = Backend::tagged_echo(b'B');
        let dir = temp_dir(&format!("reload-{}", driver_arg(driver)));
        let yaml = |up: std::net::SocketAddr| {
            format!(
                "runtime:\n  workers: 2\nlisteners:\n  - listen: 127.0.0.1:0\n    upstream: {up}\n"
            )
        };
        let cfg = write_config(&dir, "fw.yaml", &yaml(a.addr));
        let mut p = Proc::start(&cfg, driver, None);
        let addr = p.listen[0];
        let tag_of_new_conn = || {
            let mut s = connect(addr);
            let mut t = [0u8; 1];
            s.read_exact(&mut t).unwrap();
            t[0]
        };
        assert_eq!(tag_of_new_conn(), b'A');
        let mut held = connect(addr);
        let mut t = [0u8; 1];
        held.read_exact(&mut t).unwrap();
        assert_eq!(t[0], b'A');

        // Swap to B.
        std::fs::write(&cfg, yaml(b.addr)).unwrap();
        wait_until(
            "new connections to reach the reloaded upstream",
            TIMEOUT,
            tag_of_new_conn,
            |t| *t == b'B',
        );
        // A broken edit: logged, B keeps serving.
        std::fs::write(&cfg, "listeners: [oops\n").unwrap();
        wait_until(
            "the broken edit to be rejected",
            TIMEOUT,
            || p.stderr(),
            |e| e.contains("config reload rejected"),
        );
        assert_eq!(tag_of_new_conn(), b'B');
        // The connection opened before the reload still reaches A.
        held.write_all(b"still A").unwrap();
        let mut back = [0u8; 7];
        held.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"still A");
        drop(held);
        p.sigterm();
        assert_eq!(p.wait(TIMEOUT).code(), Some(0), "{}", p.stderr());
    });
}
