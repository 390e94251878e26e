//! Per-worker connection limit: at `max_connections_per_worker` the accept loop pauses (the
//! rest wait in the backlog), and resumes as connections close.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use runtime::ForwardMode;

const MAX: usize = 5;
const CONNS: usize = 10;

fn ping(s: &mut TcpStream, i: usize) {
    s.write_all(&[i as u8]).unwrap();
}

fn pong(s: &mut TcpStream, i: usize) {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("connection {i} not served: {e}"));
    assert_eq!(b[0], i as u8);
}

#[test]
fn max_connections_per_worker_pauses_and_resumes() {
    for_each_driver(|driver| {
        for mode in MODES {
            eprintln!("mode {}", mode_arg(mode));
            limit(driver, mode);
        }
    });
}

fn limit(driver: runtime::DriverChoice, mode: ForwardMode) {
    let backend = Backend::echo();
    let mut cfg = config(driver, mode, 1, &[backend.addr]);
    cfg.runtime.max_connections_per_worker = MAX;
    let fwd = Fwd::start(cfg);

    // Ten connections, in order; the kernel completes every handshake (backlog) and each
    // sends its byte.
    let mut conns: Vec<Option<TcpStream>> = (0..CONNS)
        .map(|i| {
            let mut s = connect(fwd.addr());
            ping(&mut s, i);
            Some(s)
        })
        .collect();
    // The first five are served.
    for (i, c) in conns.iter_mut().enumerate().take(MAX) {
        pong(c.as_mut().unwrap(), i);
    }
    // The worker is paused at the limit; while paused it accepts nothing more.
    wait_until(
        "accept to pause at the limit",
        TIMEOUT,
        || fwd.sum(|s| &s.accept_paused),
        |p| *p >= 1,
    );
    assert_eq!(fwd.sum(|s| &s.accepted), MAX as u64);
    assert_eq!(fwd.sum(|s| &s.active), MAX as u64);
    assert_eq!(backend.accepted(), MAX as u64);

    // Close two: the next two in the backlog are served.
    conns[0] = None;
    conns[1] = None;
    for (i, c) in conns.iter_mut().enumerate().skip(MAX).take(2) {
        pong(c.as_mut().unwrap(), i);
    }
    wait_until(
        "accept to pause at the limit again",
        TIMEOUT,
        || fwd.sum(|s| &s.accept_paused),
        |p| *p >= 2,
    );
    assert_eq!(fwd.sum(|s| &s.accepted), MAX as u64 + 2);
    assert_eq!(fwd.sum(|s| &s.active), MAX as u64);

    // Close the other three first ones: everyone is served.
    for c in conns.iter_mut().take(MAX).skip(2) {
        *c = None;
    }
    for (i, c) in conns.iter_mut().enumerate().skip(MAX + 2) {
        pong(c.as_mut().unwrap(), i);
    }
    assert_eq!(fwd.sum(|s| &s.accepted), CONNS as u64);

    // Close all; the forwarder is back to empty and still serves.
    conns.clear();
    fwd.wait_idle();
    assert_eq!(fwd.sum(|s| &s.accepted), CONNS as u64);
    assert_eq!(fwd.sum(|s| &s.closed), CONNS as u64);
    assert_eq!(fwd.sum(|s| &s.resets), 0);
    let mut s = connect(fwd.addr());
    ping(&mut s, 42);
    pong(&mut s, 42);
    drop(s);
    fwd.wait_idle();
    fwd.stop_within(TIMEOUT);
}
