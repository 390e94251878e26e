//! Busy polling (`runtime.busy_poll`) and the socket buffer knobs on the real forwarder: bytes
//! still arrive intact, the workers really spin, and the sockets get the sizes asked for.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use runtime::{DriverChoice, ForwardMode};

/// Many small round trips and a bulk stream through a busy-polling forwarder (io_uring, both
/// modes): every byte checked, and the worker's spin counter moved.
#[test]
fn forwarding_with_busy_polling() {
    for mode in [ForwardMode::Copy, ForwardMode::Splice] {
        let backend = Backend::echo();
        let mut cfg = config(DriverChoice::Uring, mode, 1, &[backend.addr]);
        cfg.runtime.busy_poll = Duration::from_micros(200);
        let fwd = Fwd::start(cfg);
        let mut c = connect(fwd.addr());
        let mut buf = [0u8; 100];
        for i in 0..2000u32 {
            let msg: Vec<u8> = (0..100u32)
                .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                .collect();
            c.write_all(&msg).unwrap();
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf[..], &msg[..], "round trip {i}");
        }
        // A bulk stream each way at once (the echo backend returns what it reads).
        let total = 8 * MIB;
        let mut w = c.try_clone().unwrap();
        let sender = std::thread::spawn(move || send_stream(&mut w, 7, total, 64 * 1024, None));
        let mut got = 0u64;
        let mut sum = Sum64::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while got < total {
            let n = c.read(&mut chunk).unwrap();
            assert!(n > 0, "EOF after {got} bytes");
            sum.update(&chunk[..n]);
            got += n as u64;
        }
        assert_eq!(sender.join().unwrap().unwrap(), expected_sum(7, total));
        assert_eq!(sum.finish(), expected_sum(7, total));
        drop(c);
        fwd.wait_idle();
        assert!(
            fwd.sum(|s| &s.busy_poll_spins) >= 1,
            "{mode:?}: the worker never spun"
        );
        assert_eq!(fwd.sum(|s| &s.bytes_client_to_upstream), 200_000 + total);
    }
}

/// Busy polling is off by default: the counters stay at zero.
#[test]
fn no_spinning_by_default() {
    let backend = Backend::echo();
    let fwd = Fwd::start(config(
        DriverChoice::Uring,
        ForwardMode::Copy,
        1,
        &[backend.addr],
    ));
    let mut c = connect(fwd.addr());
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    drop(c);
    fwd.wait_idle();
    assert_eq!(fwd.sum(|s| &s.busy_poll_spins), 0);
}
