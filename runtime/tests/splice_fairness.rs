//! Splice and copy mode under load: a connection whose direction keeps moving its budget
//! without waiting (and so yields in a loop) must not hold the worker back from its other
//! connections.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use runtime::{DriverChoice, ForwardMode};

#[test]
fn small_connections_progress_while_a_bulk_splice_connection_yields() {
    small_connections_progress_while_bulk_yields(
        ForwardMode::Splice,
        runtime::forward::splice_yields,
    );
}

/// Copy mode moves bytes with non-blocking recv/send and waits on the ring only when a socket
/// runs dry or fills: without its budget the bulk direction never gave the worker back.
#[test]
fn small_connections_progress_while_a_bulk_copy_connection_yields() {
    small_connections_progress_while_bulk_yields(ForwardMode::Copy, runtime::forward::copy_yields);
}

fn small_connections_progress_while_bulk_yields(mode: ForwardMode, yields: fn() -> u64) {
    if !runtime::driver::decide(DriverChoice::Uring, 64)
        .is_ok_and(|d| d.kind == runtime::DriverKind::Uring)
    {
        netlab::cannot_run("no io_uring here");
        return;
    }
    // First byte `B`: stream bytes to the client as fast as it takes them; else echo.
    let backend = Backend::start(|mut s, _| {
        let mut first = [0u8; 1];
        if s.read_exact(&mut first).is_err() {
            return;
        }
        if first[0] == b'B' {
            let chunk = vec![0x5au8; 1 << 20];
            while s.write_all(&chunk).is_ok() {}
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        if s.write_all(&first).is_err() {
            return;
        }
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut cfg = config(DriverChoice::Uring, mode, 1, &[backend.addr]);
    // Deep socket buffers: the bulk direction rarely finds its source empty or its
    // destination full, so it keeps using up its budget.
    cfg.runtime.socket_recv_buffer = Some(8 << 20);
    cfg.runtime.socket_send_buffer = Some(8 << 20);
    cfg.runtime.forward.pipe_size = 1 << 20;
    let fwd = Fwd::start(cfg);

    // The bulk connection: read as fast as possible until told to stop.
    let mut bulk = connect(fwd.addr());
    bulk.write_all(b"B").unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (received, stop) = (received.clone(), stop.clone());
        let mut bulk = bulk.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while !stop.load(Ordering::Relaxed) {
                match bulk.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    // Wait until the bulk direction is in its yield loop.
    let y0 = yields();
    wait_until(
        "the bulk connection to use up its budget",
        Duration::from_secs(60),
        yields,
        |&y| y > y0 + 4,
    );
    let (bytes_before, yields_before) = (received.load(Ordering::Relaxed), yields());
    // Many small connections, each many verified round trips, all while the bulk flows.
    let small: Vec<_> = (0..32u32)
        .map(|i| {
            let addr = fwd.addr();
            std::thread::spawn(move || {
                let mut c = connect(addr);
                let mut tag = [0u8; 1];
                c.write_all(&[i as u8]).unwrap();
                c.read_exact(&mut tag).unwrap();
                assert_eq!(tag[0], i as u8);
                let mut buf = [0u8; 100];
                for r in 0..50u32 {
                    let msg: Vec<u8> = (0..100u32).map(|j| (i ^ r ^ j) as u8).collect();
                    c.write_all(&msg).unwrap();
                    c.read_exact(&mut buf).unwrap();
                    assert_eq!(&buf[..], &msg[..], "connection {i} round trip {r}");
                }
            })
        })
        .collect();
    for (i, h) in small.into_iter().enumerate() {
        join_bounded(
            h,
            &format!("small connection {i}"),
            Duration::from_secs(120),
        );
    }
    let (bytes_after, yields_after) = (received.load(Ordering::Relaxed), yields());
    eprintln!(
        "during the small connections: bulk moved {} MiB, yielded {} times",
        (bytes_after - bytes_before) >> 20,
        yields_after - yields_before
    );
    assert!(bytes_after > bytes_before, "the bulk connection stalled");
    stop.store(true, Ordering::Relaxed);
    let _ = bulk.shutdown(std::net::Shutdown::Both);
    join_bounded(reader, "bulk reader", Duration::from_secs(60));
}
