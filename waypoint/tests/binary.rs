//! The `waypoint` binary: `READY … hbone=ADDR` once listening, the R14 check on a real
//! HBONE connection with its own (built-in CA) identity, SIGTERM drain, config errors.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{block_on, connect, goaway, id, settings, test_dir as dir, Proc};
use hbone::ca::{CertSource, SigningCa};
use hbone::wire::ConnectRequest;
use hbone::HboneError;

const L7: &str = r#"namespaces:
  - name: app
    labels: {istio.io/dataplane-mode: ambient}
waypoints:
  - {name: wp, namespace: app, address: 10.1.0.100}
workloads:
  - {uid: wp, name: wp, namespace: app, serviceAccount: waypoint, workloadIps: ["10.1.0.100"]}
  - {uid: a1, name: a1, namespace: app, workloadIps: ["10.1.0.1"], services: {"app/echo.app.svc.cluster.local": {80: 8080}}}
services:
  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {80: 8080}}
"#;

/// Read until the waypoint closes the connection, which it must do without an HTTP
/// answer: EOF or a reset count as closed; hitting the (generous) read bound is a hang and
/// fails.
fn closed_without_answer(c: &mut std::net::TcpStream) {
    use std::io::Read;
    let mut got = Vec::new();
    match c.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the waypoint did not close the connection: {e}"),
    }
    assert!(
        !got.starts_with(b"HTTP/"),
        "got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// The metrics once they contain every line of `want` (waited for, generously: a refusal
/// may be counted after the connection is closed); fails naming the first missing line.
fn metrics_with(stats: SocketAddr, want: &[String]) -> String {
    let t = std::time::Instant::now();
    loop {
        let m = http_get(stats, "/stats/prometheus");
        match want.iter().find(|w| !m.contains(w.as_str())) {
            None => return m,
            Some(w) if t.elapsed() > Duration::from_secs(30) => panic!("no {w:?} in\n{m}"),
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The binary on the model [`L7`] (stats on, built-in CA in the test's folder `name`) with
/// `args`; the folder and the process, once READY.
fn start(name: &str, args: &[&str], stderr: Stdio) -> (std::path::PathBuf, Proc) {
    let d = dir(name);
    let cfg = format!("{L7}---\n{}", settings(&d.join("ca"), true));
    std::fs::write(d.join("waypoint.yaml"), cfg).unwrap();
    let child = Proc::start(&d.join("waypoint.yaml"), args, stderr);
    (d, child)
}

/// A client certificate (`app/client`) from the built-in CA in folder `d`.
fn client_cert(d: &std::path::Path) -> hbone::ca::WorkloadCert {
    let ca = SigningCa::builtin(&d.join("ca"), "cluster.local").unwrap();
    ca.issue(&id("app", "client"), SystemTime::now()).unwrap()
}

#[test]
fn binary_serves_hbone_and_drains_on_sigterm() {
    let (d, mut child) = start("bin", &["--profile", "latency"], Stdio::inherit());
    let stats = child.addr("stats");
    assert!(http_get(stats, "/healthz/ready").starts_with("HTTP/1.1 200"));
    assert!(http_get(stats, "/nope").starts_with("HTTP/1.1 404"));
    let addr = child.addr("hbone");

    // R13: plaintext HTTP to the HBONE port gets no HTTP answer, and is counted.
    {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        // A generous bound: a hang fails instead of blocking the suite.
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        closed_without_answer(&mut c);
    }
    // A client certificate from the same built-in CA.
    let me = client_cert(&d);
    // The client's runtime ends (its connection closed) before the drain.
    block_on(async move {
        let c = connect(addr, &me, id("app", "waypoint")).await.unwrap();
        // Not bound to this waypoint: refused.
        let r = c
            .open(&ConnectRequest::new("10.9.9.9:80".parse().unwrap()))
            .await;
        assert!(matches!(r, Err(HboneError::Status(s)) if s.as_u16() == 400));
        // Bound: accepted.
        assert!(c
            .open(&ConnectRequest::new("10.96.0.1:80".parse().unwrap()))
            .await
            .is_ok());
        // Let the client connection close cleanly.
        drop(c);
        monoio::time::sleep(Duration::from_millis(50)).await;
    });
    metrics_with(
        stats,
        &[
            "waypoint_refused_targets_total 1\n".into(),
            "waypoint_tunnels_total 1\n".into(),
            "waypoint_refused_connections_total{reason=\"tls_other\"} 1\n".into(),
        ],
    );

    let ok = Command::new("kill")
        .args(["-TERM", &child.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&d);
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    // A generous bound: a hang fails instead of blocking the suite.
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

fn run_err(d: &std::path::Path, text: &str) -> String {
    std::fs::write(d.join("waypoint.yaml"), text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .args(["--config", d.join("waypoint.yaml").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{text}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn binary_reports_config_errors() {
    let d = dir("bad");
    let file = d.join("waypoint.yaml").display().to_string();
    let settings = "waypoint:\n  identity: spiffe://cluster.local/ns/app/sa/waypoint\n  gateway: app/wp\n  ca: {builtin: /nonexistent}\n";
    // A bad identity: file, line (of the whole file), document, field.
    let err = run_err(
        &d,
        &format!(
            "{L7}---\n{}",
            settings.replace("spiffe://cluster.local/ns/app/sa/waypoint", "not-spiffe")
        ),
    );
    let line = L7.lines().count() + 3;
    assert!(
        err.contains(&format!("{file}:{line}"))
            && err.contains("document 2")
            && err.contains("waypoint.identity"),
        "{err}"
    );
    // An unknown field in the settings document.
    let err = run_err(&d, &format!("{L7}---\n{settings}  listn: 1.2.3.4:1\n"));
    assert!(
        err.contains(&format!("{file}:{}", L7.lines().count() + 6))
            && err.contains("document 2")
            && err.contains("listn"),
        "{err}"
    );
    // The old separate-file layout is refused, naming the field.
    let err = run_err(&d, &format!("{L7}---\n{settings}  l7: l7.yaml\n"));
    assert!(err.contains("`l7`") || err.contains("l7"), "{err}");
    // No settings document.
    let err = run_err(&d, L7);
    assert!(err.contains("no settings document"), "{err}");
    // Two settings documents.
    let err = run_err(&d, &format!("{L7}---\n{settings}---\n{settings}"));
    assert!(
        err.contains("document 3") && err.contains("second settings"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&d);
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The descriptor count once two readings in a row agree and it is at most `want` (waited
/// for, generously; the last steady count if it never gets there).
fn stable_fds(pid: u32, want: usize) -> usize {
    let t = std::time::Instant::now();
    let mut last = fds(pid);
    let mut steady = None;
    while t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
        let now = fds(pid);
        if now == last {
            steady = Some(now);
            if now <= want {
                break;
            }
        }
        last = now;
    }
    steady.expect("the descriptor count never held still")
}

/// Bad input of every kind, many times: the process answers each correctly and ends with
/// the descriptors it started with.
#[test]
fn bad_input_is_refused_and_leaks_no_descriptor() {
    let (d, child) = start("fds", &[], Stdio::null());
    let (addr, stats) = (child.addr("hbone"), child.addr("stats"));
    let me = client_cert(&d);
    let round = |n: usize| {
        for _ in 0..n {
            use std::io::Write;
            // Plaintext, and TLS garbage: each closed, without an HTTP answer.
            for bytes in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"\x16\x03\x01\x00\x05hello"] {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                // A generous bound: a hang fails instead of blocking the suite.
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                c.write_all(bytes).unwrap();
                closed_without_answer(&mut c);
            }
        }
        block_on(async {
            let c = connect(addr, &me, id("app", "waypoint")).await.unwrap();
            for _ in 0..n {
                // R14 refusal.
                let r = c
                    .open(&ConnectRequest::new("10.9.9.9:80".parse().unwrap()))
                    .await;
                assert!(matches!(r, Err(HboneError::Status(s)) if s.as_u16() == 400));
                // Invalid HTTP/2 inside a bound tunnel: GOAWAY.
                let mut s = c
                    .open(&ConnectRequest::new("10.96.0.1:80".parse().unwrap()))
                    .await
                    .unwrap();
                let mut bad = waypoint::inner::H2_PREFACE.to_vec();
                bad.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0, 0, b'x']);
                s.write_all(bytes::Bytes::from(bad), false).await.unwrap();
                let mut got = Vec::new();
                while let Some(Ok(b)) = s.read().await {
                    got.extend_from_slice(&b);
                }
                // The server's frames end with a GOAWAY (type 7) with PROTOCOL_ERROR (1).
                assert_eq!(goaway(&got), Some(1), "{got:?}");
                // A malformed HTTP/1 request line: 400.
                let mut s = c
                    .open(&ConnectRequest::new("10.96.0.1:80".parse().unwrap()))
                    .await
                    .unwrap();
                s.write_all(bytes::Bytes::from_static(b"GET nope\r\n\r\n"), false)
                    .await
                    .unwrap();
                let mut got = Vec::new();
                while let Some(Ok(b)) = s.read().await {
                    got.extend_from_slice(&b);
                }
                assert!(got.starts_with(b"HTTP/1.1 400 "), "{got:?}");
            }
            drop(c);
            monoio::time::sleep(Duration::from_millis(20)).await;
        });
    };
    // Warm up (lazily made descriptors), then count once the warm-up's descriptors are
    // closed (the count holds still).
    let pid = child.pid();
    round(2);
    let before = stable_fds(pid, usize::MAX);
    round(30);
    let after = stable_fds(pid, before);
    assert!(
        after <= before,
        "descriptors: {before} before, {after} after"
    );
    // Every plaintext and TLS-garbage connection (2 per round, 32 rounds) counted as a
    // refusal, by the TLS reason; nothing under another reason.
    let mut want: Vec<String> = [
        "waypoint_refused_targets_total 32",
        "waypoint_h2_protocol_errors_total 32",
        "waypoint_bad_requests_total 32",
        "waypoint_refused_connections_total{reason=\"tls_other\"} 64",
    ]
    .iter()
    .map(|l| format!("{l}\n"))
    .collect();
    for r in [
        "no_client_cert",
        "untrusted",
        "expired",
        "identity_mismatch",
        "not_connect",
        "bad_authority",
    ] {
        want.push(format!(
            "waypoint_refused_connections_total{{reason=\"{r}\"}} 0\n"
        ));
    }
    metrics_with(stats, &want);
    drop(child);
    let _ = std::fs::remove_dir_all(&d);
}
