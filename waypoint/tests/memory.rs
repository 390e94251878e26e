//! Bodies are streamed, not buffered: the real `waypoint` process (its own address space,
//! so its peak RSS is its own) carries a 256 MiB request body and a 256 MiB response body
//! between an HBONE client and a backend (behind a stand-in node ztunnel), byte exact, and
//! its peak resident memory grows by far less than one body.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::SystemTime;

use bytes::Bytes;
use common::{
    block_on, blocks_fnv, connect, echo_model, fnv_add, get, id, next_request, ok_response,
    payload, read_until, response_head, settings, stand_in_ztunnel, take_response, test_dir,
    write_blocks, ReadChunk, BLOCK, FNV0,
};
use hbone::ca::{CertSource, SigningCa};
use hbone::stream::H2Stream;
use hbone::wire::ConnectRequest;

const BODY: usize = 256 << 20;

/// A backend: `POST` → `len=N fnv=X` of the body (Content-Length, read as it comes);
/// `GET /gen` → [`BODY`] bytes (the block repeated).
fn backend(ip: Ipv4Addr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            std::thread::spawn(move || serve_backend(c));
        }
    });
    addr
}

fn serve_backend(mut c: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    while let Some(req) = next_request(&mut c, &mut buf) {
        let len = req.content_length();
        let (mut h, mut left) = (FNV0, len);
        let k = left.min(buf.len());
        h = fnv_add(h, &buf[..k]);
        buf.drain(..k);
        left -= k;
        while left > 0 {
            let Ok(k) = c.read(&mut chunk[..left.min(256 * 1024)]) else {
                return;
            };
            if k == 0 {
                return;
            }
            h = fnv_add(h, &chunk[..k]);
            left -= k;
        }
        let ok = if req.method == "GET" {
            c.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n").as_bytes())
                .and_then(|()| write_blocks(&mut c, BODY))
                .is_ok()
        } else {
            c.write_all(ok_response(&format!("len={len} fnv={h:x}")).as_bytes())
                .is_ok()
        };
        if !ok {
            return;
        }
    }
}

/// `VmHWM` (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Read one response head from the tunnel: (status, Content-Length); the bytes after it
/// stay in `buf`.
async fn read_head(s: &mut H2Stream, buf: &mut Vec<u8>) -> (u16, usize) {
    read_until(s, buf, |buf| {
        let h = response_head(buf)?;
        buf.drain(..h.size);
        Some((h.status, h.content_length.unwrap_or(0)))
    })
    .await
}

/// Read `len` body bytes (some may be in `buf` already): their checksum, nothing kept.
async fn read_body(s: &mut H2Stream, buf: &mut Vec<u8>, len: usize) -> u64 {
    let k = len.min(buf.len());
    let mut h = fnv_add(FNV0, &buf[..k]);
    buf.drain(..k);
    let mut left = len - k;
    while left > 0 {
        match s.read_chunk().await {
            Some(Ok(b)) => {
                let k = left.min(b.len());
                h = fnv_add(h, &b[..k]);
                buf.extend_from_slice(&b[k..]);
                left -= k;
            }
            other => panic!("stream ended in a body: {other:?}"),
        }
    }
    h
}

#[test]
fn a_256_mib_body_each_way_does_not_need_memory_of_its_size() {
    let net = (20 + std::process::id() % 200) as u8;
    let zt_ip = Ipv4Addr::new(127, net, 0, 1);
    let Ok(zl) = TcpListener::bind((zt_ip, 15008)) else {
        panic!("127.{net}.0.1:15008 is taken");
    };
    let pod = backend(Ipv4Addr::new(127, net, 0, 2));
    let d = test_dir("memory");
    let ca = SigningCa::builtin(&d.join("ca"), "cluster.local").unwrap();
    let now = SystemTime::now();
    let _zt = stand_in_ztunnel(zl, &ca.issue(&id("app", "echo"), now).unwrap());
    let cfg = format!(
        "{}---\n{}",
        echo_model(zt_ip, pod),
        settings(&d.join("ca"), false)
    );
    std::fs::write(d.join("waypoint.yaml"), cfg).unwrap();
    let child = common::Proc::start(&d.join("waypoint.yaml"), &[], Stdio::inherit());
    let (pid, addr) = (child.pid(), child.addr("hbone"));
    let me = ca.issue(&id("app", "client"), now).unwrap();
    // Warm up (one small exchange) before the baseline.
    let before = std::cell::Cell::new(0);
    let (sum, got_len, got_fnv) = block_on(async {
        let c = connect(addr, &me, id("app", "waypoint")).await.unwrap();
        let mut s = c
            .open(&ConnectRequest::new("10.96.0.1:80".parse().unwrap()))
            .await
            .unwrap();
        let mut buf = Vec::new();
        let host = "echo.app.svc.cluster.local";
        let post = |path: &str, len: usize| {
            format!("POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len}\r\n\r\n")
        };
        s.write_all(Bytes::from(post("/warm", 2) + "hi"), false)
            .await
            .unwrap();
        let (code, len) = read_head(&mut s, &mut buf).await;
        assert_eq!(code, 200);
        read_body(&mut s, &mut buf, len).await;
        before.set(peak_rss_kib(pid));
        // 256 MiB up.
        s.write_all(Bytes::from(post("/sum", BODY)), false)
            .await
            .unwrap();
        let b = Bytes::from(payload(BLOCK));
        for _ in 0..BODY / BLOCK {
            s.write_all(b.clone(), false).await.unwrap();
        }
        let sum = read_until(&mut s, &mut buf, take_response).await;
        assert_eq!(sum.status, 200);
        // 256 MiB down.
        s.write_all(Bytes::from(get("/gen", host)), false)
            .await
            .unwrap();
        let (code, len) = read_head(&mut s, &mut buf).await;
        assert_eq!(code, 200);
        let h = read_body(&mut s, &mut buf, len).await;
        (sum.text(), len, h)
    });
    let want = blocks_fnv(BODY);
    assert_eq!(sum, format!("len={BODY} fnv={want:x}"));
    assert_eq!((got_len, got_fnv), (BODY, want));
    let grew_kib = peak_rss_kib(pid).saturating_sub(before.get());
    // A buffered body would add 256 MiB; streamed, the growth is a few flow-control
    // windows.
    assert!(
        grew_kib < 48 * 1024,
        "peak RSS grew by {grew_kib} KiB for a {BODY}-byte body each way"
    );
    eprintln!(
        "waypoint peak RSS {} KiB before, grew by {grew_kib} KiB",
        before.get()
    );
    drop(child);
    let _ = std::fs::remove_dir_all(&d);
}
