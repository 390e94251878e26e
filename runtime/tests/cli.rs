//! The `l4fwd` binary's start-up failures: an address another process serves (exit 1, says
//! so), configuration errors (exit 2, naming file, line and field).

mod common;

use std::net::TcpListener;

use common::*;

#[test]
fn address_already_served_is_refused() {
    for_each_driver(|driver| {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let dir = temp_dir(&format!("inuse-{}", driver_arg(driver)));
        let cfg = write_config(
            &dir,
            "fw.yaml",
            &format!("listeners:\n  - listen: {addr}\n    upstream: 127.0.0.1:9\n"),
        );
        let (status, stderr) = run_l4fwd_to_exit(&cfg, Some(driver));
        assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
        assert!(stderr.contains("already being served"), "stderr:\n{stderr}");
        assert!(stderr.contains(&addr.to_string()), "stderr:\n{stderr}");
        // The other process keeps its port.
        let c = std::net::TcpStream::connect(addr).expect("original listener still serves");
        drop(c);
        let _ = taken.accept().unwrap();
    });
}

/// Also refused when the other owner set SO_REUSEPORT itself (which would otherwise let us
/// join its group silently), e.g. another l4fwd.
#[test]
fn address_served_by_another_l4fwd_is_refused() {
    let backend = Backend::echo();
    let dir = temp_dir("inuse-l4fwd");
    let first = write_config(
        &dir,
        "first.yaml",
        &format!(
            "listeners:\n  - listen: 127.0.0.1:0\n    upstream: {}\n",
            backend.addr
        ),
    );
    let mut p = Proc::start(&first, runtime::DriverChoice::Uring, None);
    let addr = p.listen[0];
    let second = write_config(
        &dir,
        "second.yaml",
        &format!(
            "listeners:\n  - listen: {addr}\n    upstream: {}\n",
            backend.addr
        ),
    );
    let (status, stderr) = run_l4fwd_to_exit(&second, Some(runtime::DriverChoice::Epoll));
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("already being served"), "stderr:\n{stderr}");
    p.sigterm();
    assert_eq!(p.wait(TIMEOUT).code(), Some(0));
}

/// Run l4fwd on `yaml`; it must exit 2 naming the file, `line` and `field`.
fn config_error(name: &str, yaml: &str, line: usize, field: &str) -> String {
    let dir = temp_dir(&format!("cfg-{name}"));
    let cfg = write_config(&dir, "broken.yaml", yaml);
    let (status, stderr) = run_l4fwd_to_exit(&cfg, None);
    assert_eq!(status.code(), Some(2), "{name}: stderr:\n{stderr}");
    let at = format!("{}:{line}", cfg.display());
    assert!(
        stderr.contains(&at),
        "{name}: want {at:?} in stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(field),
        "{name}: want field {field:?} in stderr:\n{stderr}"
    );
    stderr
}

#[test]
fn unknown_field_names_file_line_and_field() {
    config_error(
        "unknown-top",
        "listeners:\n  - listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\nadmn: 127.0.0.1:0\n",
        4,
        "admn",
    );
    config_error(
        "unknown-listener",
        "listeners:\n  - listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\n    upstreem: 127.0.0.1:10\n",
        4,
        "upstreem",
    );
    let e = config_error(
        "unknown-runtime",
        "runtime:\n  workers: 1\n  forward:\n    mode: copy\n    bufer_size: 10\nlisteners:\n  - listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\n",
        5,
        "bufer_size",
    );
    assert!(e.contains("runtime.forward"), "{e}");
}

#[test]
fn bad_value_names_file_line_and_field() {
    // Wrong type / unknown variant: caught by the parser.
    config_error(
        "bad-mode",
        "runtime:\n  forward:\n    mode: teleport\nlisteners:\n  - listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\n",
        3,
        "runtime.forward.mode",
    );
    config_error(
        "bad-number",
        "runtime:\n  workers: 1\n  max_connections_per_worker: lots\nlisteners:\n  - listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\n",
        3,
        "max_connections_per_worker",
    );
    config_error(
        "bad-addr",
        "listeners:\n  - listen: 127.0.0.1:0\n    upstream: not-an-address\n",
        3,
        "upstream",
    );
    // Out of range: caught by validation, located in the text.
    config_error(
        "bad-range",
        "runtime:\n  workers: 1\n  ring_entries: 1000\nlisteners:\n  - listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\n",
        3,
        "runtime.ring_entries",
    );
    config_error(
        "bad-upstream-port",
        "listeners:\n  - listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\n  - listen: 127.0.0.1:0\n    upstream: 127.0.0.1:0\n",
        5,
        "listeners[1].upstream",
    );
}
