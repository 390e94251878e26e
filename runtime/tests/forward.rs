//! Byte forwarding through the in-process forwarder: bulk integrity both ways, half-close and
//! reset propagation, under both io drivers and both forwarding modes.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown as NetShutdown;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use runtime::{DriverChoice, ForwardMode};
use socket2::SockRef;

const CHUNK: usize = 256 * 1024;

/// 1 GiB client → backend and, at the same time, 1 GiB backend → client; both checksums and
/// both of the forwarder's byte counters must match.
fn gib_each_way(driver: DriverChoice, mode: ForwardMode) {
    const TOTAL: u64 = GIB;
    const UP_SEED: u64 = 11;
    const DOWN_SEED: u64 = 22;
    let (tx, rx) = mpsc::channel();
    let backend = Backend::start(move |s, _| {
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || recv_stream(&mut r));
        let mut w = s;
        let sent = send_stream(&mut w, DOWN_SEED, TOTAL, CHUNK, None);
        let _ = w.shutdown(NetShutdown::Write);
        let got = reader.join().unwrap();
        let _ = tx.send((sent, got));
    });
    let fwd = Fwd::start(config(driver, mode, 1, &[backend.addr]));

    let client = connect(fwd.addr());
    let mut r = client.try_clone().unwrap();
    let reader = std::thread::spawn(move || recv_stream(&mut r));
    let mut w = client;
    let sent_up = send_stream(&mut w, UP_SEED, TOTAL, CHUNK, None).expect("client sends");
    w.shutdown(NetShutdown::Write).unwrap();
    let got_down = join_bounded(reader, "client reader", TIMEOUT * 4).expect("client receives");
    let (sent_down, got_up) = rx
        .recv_timeout(TIMEOUT * 4)
        .expect("backend finishes its side");
    let sent_down = sent_down.expect("backend sends");
    let got_up = got_up.expect("backend receives");

    assert_eq!(sent_up.0, TOTAL);
    assert_eq!(sent_down.0, TOTAL);
    assert_eq!(
        got_up, sent_up,
        "client → backend: (length, checksum) differ"
    );
    assert_eq!(
        got_down, sent_down,
        "backend → client: (length, checksum) differ"
    );
    assert_eq!(sent_up, expected_sum(UP_SEED, TOTAL));

    fwd.wait_idle();
    assert_eq!(fwd.sum(|s| &s.bytes_client_to_upstream), TOTAL);
    assert_eq!(fwd.sum(|s| &s.bytes_upstream_to_client), TOTAL);
    assert_eq!(fwd.sum(|s| &s.accepted), 1);
    assert_eq!(fwd.sum(|s| &s.resets), 0);
    assert_eq!(fwd.sum(|s| &s.upstream_connect_errors), 0);
    fwd.stop_within(TIMEOUT);
}

#[test]
fn gib_each_way_uring_copy() {
    gib_each_way(DriverChoice::Uring, ForwardMode::Copy);
}

#[test]
fn gib_each_way_uring_splice() {
    gib_each_way(DriverChoice::Uring, ForwardMode::Splice);
}

#[test]
fn gib_each_way_epoll_copy() {
    gib_each_way(DriverChoice::Epoll, ForwardMode::Copy);
}

#[test]
fn gib_each_way_epoll_splice() {
    gib_each_way(DriverChoice::Epoll, ForwardMode::Splice);
}

/// The client sends its request and shuts down its write side; the backend answers only after
/// it has seen that EOF, and the client still receives the whole answer.
#[test]
fn client_half_close_still_receives_reply() {
    const REQ: u64 = 3 * MIB + 5;
    const REPLY: u64 = 8 * MIB + 3;
    for_each_driver_and_mode(|driver, mode| {
        let (tx, rx) = mpsc::channel();
        let backend = Backend::start(move |mut s, _| {
            // Reads to EOF first: the reply is only sent once the FIN came through.
            let got = recv_stream(&mut s);
            let sent = send_stream(&mut s, 2, REPLY, CHUNK, None);
            let _ = s.shutdown(NetShutdown::Write);
            let _ = tx.send((got, sent));
        });
        let fwd = Fwd::start(config(driver, mode, 1, &[backend.addr]));
        let mut c = connect(fwd.addr());
        let sent = send_stream(&mut c, 1, REQ, 100_000, None).unwrap();
        c.shutdown(NetShutdown::Write).unwrap();
        let got = recv_stream(&mut c).expect("reply after half-close");
        let (b_got, b_sent) = rx.recv_timeout(TIMEOUT).expect("backend done");
        assert_eq!(b_got.expect("backend reads request"), sent);
        assert_eq!(got, b_sent.expect("backend sends reply"));
        assert_eq!(got, expected_sum(2, REPLY));
        fwd.wait_idle();
        assert_eq!(fwd.sum(|s| &s.bytes_client_to_upstream), REQ);
        assert_eq!(fwd.sum(|s| &s.bytes_upstream_to_client), REPLY);
        assert_eq!(fwd.sum(|s| &s.resets), 0);
    });
}

/// The other way round: the backend says everything and shuts down its write side; the
/// client sees EOF and can still send, and the backend receives it all.
#[test]
fn backend_half_close_client_keeps_sending() {
    const GREETING: u64 = MIB + 1;
    const UPLOAD: u64 = 5 * MIB + 7;
    for_each_driver_and_mode(|driver, mode| {
        let (tx, rx) = mpsc::channel();
        let backend = Backend::start(move |mut s, _| {
            let sent = send_stream(&mut s, 3, GREETING, CHUNK, None);
            let _ = s.shutdown(NetShutdown::Write);
            let got = recv_stream(&mut s);
            let _ = tx.send((sent, got));
        });
        let fwd = Fwd::start(config(driver, mode, 1, &[backend.addr]));
        let mut c = connect(fwd.addr());
        let greeting = recv_stream(&mut c).expect("greeting then EOF");
        assert_eq!(greeting, expected_sum(3, GREETING));
        let sent = send_stream(&mut c, 4, UPLOAD, 100_000, None).unwrap();
        c.shutdown(NetShutdown::Write).unwrap();
        let (b_sent, b_got) = rx.recv_timeout(TIMEOUT).expect("backend done");
        assert_eq!(b_sent.unwrap(), greeting);
        assert_eq!(b_got.expect("backend reads upload"), sent);
        // The forwarder closes the client side once both directions are done.
        let (rest, end) = read_to_end_or_error(&mut c);
        assert!(rest.is_empty() && end.is_ok(), "{rest:?} {end:?}");
        fwd.wait_idle();
        assert_eq!(fwd.sum(|s| &s.resets), 0);
    });
}

/// Read until the stream ends; it must end with a reset, not with EOF or a timeout.
fn expect_reset(s: &mut std::net::TcpStream, who: &str) {
    let (data, end) = read_to_end_or_error(s);
    match end {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(()) => panic!(
            "{who}: clean EOF (after {} bytes) instead of a reset",
            data.len()
        ),
        Err(e) => panic!("{who}: {e} ({:?}) instead of a reset", e.kind()),
    }
}

/// The backend resets its connection (SO_LINGER 0, close): the client sees ECONNRESET.
#[test]
fn backend_reset_reaches_client() {
    for_each_driver_and_mode(|driver, mode| {
        let (tx, rx) = mpsc::channel();
        let backend = Backend::start(move |mut s, _| {
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).unwrap();
            assert_eq!(&hello, b"hello");
            // Some bytes the other way first, so the connection is in full use.
            s.write_all(b"world").unwrap();
            SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
            let _ = tx.send(());
        });
        let fwd = Fwd::start(config(driver, mode, 1, &[backend.addr]));
        let mut c = connect(fwd.addr());
        c.write_all(b"hello").unwrap();
        let mut world = [0u8; 5];
        c.read_exact(&mut world).unwrap();
        assert_eq!(&world, b"world");
        rx.recv_timeout(TIMEOUT).expect("backend reset its side");
        expect_reset(&mut c, "client");
        fwd.wait_idle();
        assert_eq!(fwd.sum(|s| &s.resets), 1);
    });
}

/// The client resets its connection: the backend sees ECONNRESET.
#[test]
fn client_reset_reaches_backend() {
    for_each_driver_and_mode(|driver, mode| {
        let (tx, rx) = mpsc::channel();
        let (got_tx, got_rx) = mpsc::channel();
        let backend = Backend::start(move |mut s, _| {
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).unwrap();
            s.write_all(b"world").unwrap();
            let _ = got_tx.send(());
            let (data, end) = read_to_end_or_error(&mut s);
            let _ = tx.send((data.len(), end));
        });
        let fwd = Fwd::start(config(driver, mode, 1, &[backend.addr]));
        let mut c = connect(fwd.addr());
        c.write_all(b"hello").unwrap();
        got_rx.recv_timeout(TIMEOUT).expect("backend got hello");
        let mut world = [0u8; 5];
        c.read_exact(&mut world).unwrap();
        SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
        let (n, end) = rx.recv_timeout(TIMEOUT).expect("backend saw the end");
        match end {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(()) => panic!("backend: clean EOF (after {n} bytes) instead of a reset"),
            Err(e) => panic!("backend: {e} ({:?}) instead of a reset", e.kind()),
        }
        fwd.wait_idle();
        assert_eq!(fwd.sum(|s| &s.resets), 1);
    });
}

/// An upstream that refuses: the client is reset (not left hanging, not a clean EOF), the
/// counter says why, and the worker goes on serving.
#[test]
fn unreachable_upstream_resets_client() {
    for_each_driver(|driver| {
        // A port nobody listens on: bind, note, close.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let fwd = Fwd::start(config(driver, ForwardMode::Copy, 1, &[dead]));
        for _ in 0..3 {
            // The reset can come before connect(2) has even reported success.
            match std::net::TcpStream::connect_timeout(&fwd.addr(), TIMEOUT) {
                Ok(c) => expect_reset(&mut with_timeouts(c), "client of a dead upstream"),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                Err(e) => panic!("connect: {e}"),
            }
        }
        fwd.wait_idle();
        assert_eq!(fwd.sum(|s| &s.upstream_connect_errors), 3);
    });
}

/// Nothing moving either way for `idle_timeout`: the forwarder closes both sides and counts it.
#[test]
fn idle_connection_is_closed_after_idle_timeout() {
    for_each_driver_and_mode(|driver, mode| {
        let (tx, rx) = mpsc::channel();
        let backend = Backend::start(move |mut s, _| {
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
            // Then silence; report how the forwarder ended it.
            let (rest, end) = read_to_end_or_error(&mut s);
            let _ = tx.send((rest.len(), end.map_err(|e| e.kind())));
        });
        let mut cfg = config(driver, mode, 1, &[backend.addr]);
        cfg.runtime.forward.idle_timeout = Duration::from_millis(200);
        let fwd = Fwd::start(cfg);
        let mut c = connect(fwd.addr());
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        // The forwarder, not our 60 s read timeout, must end this.
        let (rest, end) = read_to_end_or_error(&mut c);
        assert!(rest.is_empty(), "{rest:?}");
        assert!(end.is_ok(), "client: {end:?}");
        let (n, end) = rx.recv_timeout(TIMEOUT).expect("backend side ended");
        assert_eq!((n, end), (0, Ok(())));
        fwd.wait_idle();
        assert_eq!(fwd.sum(|s| &s.idle_timeouts), 1);
    });
}
