//! Drain: SIGTERM to the `l4fwd` process stops accepting, lets open connections finish (or
//! cuts them at the drain deadline) and exits 0; a second signal exits 130. In-process, a
//! worker with several listeners drains all of them.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown as NetShutdown;
use std::sync::mpsc;

use common::*;
use runtime::ForwardMode;

fn fwd_yaml(upstream: std::net::SocketAddr, drain_timeout: &str) -> String {
    format!(
        "runtime:\n  workers: 2\n  drain_timeout: {drain_timeout}\nlisteners:\n  - name: t\n    listen: 127.0.0.1:0\n    upstream: {upstream}\n"
    )
}

/// SIGTERM in the middle of a transfer: the transfer completes intact, new connections are
/// refused, the process exits 0.
#[test]
fn sigterm_mid_transfer_completes_and_exits_zero() {
    const TOTAL: u64 = 256 * MIB;
    const HALF: u64 = 128 * MIB + 12_345;
    for mode in MODES {
        for_each_driver(|driver| {
            let backend = Backend::echo();
            let dir = temp_dir(&format!("drain-{}-{}", driver_arg(driver), mode_arg(mode)));
            let cfg = write_config(&dir, "fw.yaml", &fwd_yaml(backend.addr, "60s"));
            let mut p = Proc::start(&cfg, driver, Some(mode));
            let addr = p.listen[0];

            let client = connect(addr);
            let mut r = client.try_clone().unwrap();
            let reader = std::thread::spawn(move || recv_stream(&mut r));
            let (reached_tx, reached_rx) = mpsc::channel();
            let (go_tx, go_rx) = mpsc::channel();
            let writer = std::thread::spawn(move || {
                let mut w = GatedWriter {
                    inner: client,
                    written: 0,
                    at: HALF,
                    reached: Some(reached_tx),
                    go: go_rx,
                };
                let sum = send_stream(&mut w, 9, TOTAL, 200_000, None);
                let _ = w.inner.shutdown(NetShutdown::Write);
                sum
            });
            reached_rx
                .recv_timeout(TIMEOUT)
                .expect("first half of the transfer written");

            p.sigterm();
            // The listeners close: new connections are refused (connections that still got
            // in before that are forwarded and closed by the probe).
            wait_until(
                "the listen address to refuse connections",
                TIMEOUT,
                || refused(addr),
                |r| *r,
            );
            // The open connection still works: send the second half.
            go_tx.send(()).unwrap();
            let sent = join_bounded(writer, "client writer", TIMEOUT * 2).expect("client sends");
            let got = join_bounded(reader, "client reader", TIMEOUT * 2).expect("client reads");
            assert_eq!(sent.0, TOTAL);
            assert_eq!(got, sent, "echoed stream differs from what was sent");
            assert!(
                refused(addr),
                "a new connection was accepted during the drain"
            );

            let status = p.wait(TIMEOUT);
            assert_eq!(status.code(), Some(0), "stderr:\n{}", p.stderr());
            assert!(p.stderr().contains("draining"), "stderr:\n{}", p.stderr());
        });
    }
}

/// A connection that stays open past the drain deadline is closed by the forwarder and the
/// process still exits 0.
#[test]
fn drain_deadline_cuts_open_connections_and_exits_zero() {
    for_each_driver(|driver| {
        let backend = Backend::echo();
        let dir = temp_dir(&format!("deadline-{}", driver_arg(driver)));
        let cfg = write_config(&dir, "fw.yaml", &fwd_yaml(backend.addr, "1s"));
        let mut p = Proc::start(&cfg, driver, None);
        let addr = p.listen[0];

        let mut idle = connect(addr);
        idle.write_all(b"ping").unwrap();
        let mut pong = [0u8; 4];
        idle.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"ping");

        p.sigterm();
        // Never closed from our side: the forwarder must end it (EOF or reset), well before
        // our read timeout.
        let (rest, end) = read_to_end_or_error(&mut idle);
        match &end {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connection not closed by the drain deadline: {e}"),
        }
        assert!(rest.is_empty(), "{rest:?}");
        let status = p.wait(TIMEOUT);
        assert_eq!(status.code(), Some(0), "stderr:\n{}", p.stderr());
        assert!(
            p.stderr().contains("drain deadline passed"),
            "stderr:\n{}",
            p.stderr()
        );
    });
}

/// A second signal during the drain exits at once with 130.
#[test]
fn second_signal_exits_130() {
    for_each_driver(|driver| {
        let backend = Backend::echo();
        let dir = temp_dir(&format!("second-{}", driver_arg(driver)));
        let cfg = write_config(&dir, "fw.yaml", &fwd_yaml(backend.addr, "1h"));
        let mut p = Proc::start(&cfg, driver, None);
        let addr = p.listen[0];
        let mut held = connect(addr);
        held.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        held.read_exact(&mut b).unwrap();
        p.sigterm();
        wait_until("drain to begin", TIMEOUT, || refused(addr), |r| *r);
        p.sigterm();
        let status = p.wait(TIMEOUT);
        assert_eq!(status.code(), Some(130), "stderr:\n{}", p.stderr());
    });
}

/// One worker serving two listeners: a drain must stop both accept loops and the worker must
/// return (every listener waits on the drain, not just the last one to register).
#[test]
fn drain_stops_every_listener_of_a_worker() {
    for_each_driver(|driver| {
        let a = Backend::echo();
        let b = Backend::echo();
        let c = Backend::echo();
        for workers in [1, 2] {
            let fwd = Fwd::start(config(
                driver,
                ForwardMode::Copy,
                workers,
                &[a.addr, b.addr, c.addr],
            ));
            let addrs = fwd.handle().local_addrs().to_vec();
            for &addr in &addrs {
                let mut s = connect(addr);
                s.write_all(b"hi").unwrap();
                let mut buf = [0u8; 2];
                s.read_exact(&mut buf).unwrap();
            }
            fwd.wait_idle();
            // No connection attempt may be what wakes a listener: join first, probe after.
            fwd.stop_within(TIMEOUT);
            for &addr in &addrs {
                assert!(refused(addr), "{addr} still accepts after the drain");
            }
        }
    });
}

#[test]
fn drain_in_process_lets_open_connection_finish() {
    for_each_driver(|driver| {
        let backend = Backend::echo();
        let mut cfg = config(driver, ForwardMode::Splice, 2, &[backend.addr]);
        cfg.runtime.drain_timeout = TIMEOUT;
        let fwd = Fwd::start(cfg);
        let mut s = connect(fwd.addr());
        s.write_all(b"before").unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).unwrap();
        fwd.handle().drain();
        wait_until("refusal", TIMEOUT, || refused(fwd.addr()), |r| *r);
        s.write_all(b"after!").unwrap();
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"after!");
        s.shutdown(NetShutdown::Write).unwrap();
        let (rest, end) = read_to_end_or_error(&mut s);
        assert!(rest.is_empty() && end.is_ok(), "{rest:?} {end:?}");
        fwd.stop_within(TIMEOUT);
    });
}

/// The process with several listeners (each worker runs one accept loop per listener) exits
/// 0 after SIGTERM without any connection arriving to wake a loop.
#[test]
fn sigterm_with_several_listeners_exits_zero() {
    for_each_driver(|driver| {
        let a = Backend::echo();
        let b = Backend::echo();
        let dir = temp_dir(&format!("multi-{}", driver_arg(driver)));
        let yaml = format!(
            "runtime:\n  workers: 2\n  drain_timeout: 30s\nlisteners:\n  - listen: 127.0.0.1:0\n    upstream: {}\n  - listen: 127.0.0.1:0\n    upstream: {}\n",
            a.addr, b.addr
        );
        let cfg = write_config(&dir, "fw.yaml", &yaml);
        let mut p = Proc::start(&cfg, driver, None);
        assert_eq!(p.listen.len(), 2, "{}", p.ready_line);
        for &addr in &p.listen {
            let mut s = connect(addr);
            s.write_all(b"hi").unwrap();
            let mut buf = [0u8; 2];
            s.read_exact(&mut buf).unwrap();
        }
        p.sigterm();
        let status = p.wait(TIMEOUT);
        assert_eq!(status.code(), Some(0), "stderr:\n{}", p.stderr());
        for &addr in &p.listen {
            assert!(refused(addr));
        }
    });
}
