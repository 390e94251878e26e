//! HBONE-only socket options (`h2.socket_notsent_lowat`, `h2.socket_recv_buffer`,
//! `h2.tcp_congestion`): read back
//! with getsockopt from the real client and server sockets of an HBONE connection, and
//! refused with a message naming the field when out of range.

mod common;

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hbone::ca::WorkloadCert;
use hbone::tls::TlsCounters;
use hbone::wire::ConnectRequest;
use hbone::H2Settings;
use runtime::driver::DriverKind;

/// The TCP sockets of this process whose (local, peer) address pair satisfies `pick`, each
/// with its `TCP_NOTSENT_LOWAT`, `SO_RCVBUF` and `TCP_CONGESTION` read back with getsockopt.
fn sockets_where(pick: impl Fn(SocketAddr, SocketAddr) -> bool) -> Vec<Opts> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // Not a socket (or closed meanwhile, like the directory's own descriptor): not one
        // of the connection's, left out.
        let found = runtime::sys::with_sockref(fd, |s| {
            let (l, p) = (s.local_addr()?, s.peer_addr()?);
            let (Some(l), Some(p)) = (l.as_socket(), p.as_socket()) else {
                return Ok(None);
            };
            if !pick(l, p) {
                return Ok(None);
            }
            // A TCP option: fails for any other kind of socket.
            let lowat = runtime::sys::tcp_notsent_lowat(fd)?;
            let ca = runtime::listener::TcpCa::of_socket(&fd)?;
            Ok(Some((
                lowat,
                s.recv_buffer_size()?,
                String::from_utf8_lossy(&ca).into_owned(),
            )))
        });
        if let Ok(Some(o)) = found {
            out.push(o);
        }
    }
    out
}

/// A socket's (`TCP_NOTSENT_LOWAT`, `SO_RCVBUF`, congestion control).
type Opts = (u32, usize, String);

/// The host's default congestion control (what a fresh socket gets).
fn host_default_ca() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    String::from_utf8(runtime::listener::TcpCa::of_socket(&l).unwrap()).unwrap()
}

/// One other than the host default (reno and cubic are built into every kernel).
fn other_ca() -> String {
    if host_default_ca() == "reno" {
        "cubic"
    } else {
        "reno"
    }
    .to_string()
}

/// (client side, server side) options of the HBONE connection to `srv`, once both exist.
fn hbone_sockets(srv: SocketAddr) -> (Vec<Opts>, Vec<Opts>) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let client = sockets_where(|_, p| p == srv);
        let server = sockets_where(|l, _| l == srv);
        if (!client.is_empty() && !server.is_empty()) || Instant::now() > until {
            return (client, server);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Open one HBONE connection (and a stream on it) from `client_cert` to `addr` with
/// `settings`, and read back its (client side, server side) socket options.
fn options_of_a_connection(
    addr: SocketAddr,
    client_cert: WorkloadCert,
    settings: H2Settings,
) -> (Vec<Opts>, Vec<Opts>) {
    block_on(DriverKind::Uring, async move {
        let tls = hbone::tls::client_config_to(&client_cert, &[id("server")], addr, true).unwrap();
        let counters = Arc::new(TlsCounters::default());
        let c = hbone::client::Client::connect(addr, tls, &settings, &counters)
            .await
            .unwrap();
        let req = ConnectRequest::new("10.1.2.3:8080".parse().unwrap());
        let _stream = c.open(&req).await.unwrap();
        // The server's socket exists once it answered the CONNECT.
        hbone_sockets(addr)
    })
}

#[test]
fn notsent_lowat_recv_buffer_and_congestion_are_set_on_both_hbone_sockets() {
    let ca = ca();
    let algo = other_ca();
    let settings = H2Settings {
        socket_notsent_lowat: Some(16384),
        socket_recv_buffer: Some(131072),
        tcp_congestion: Some(algo.clone()),
        ..H2Settings::default()
    };
    settings.validate().unwrap();
    let srv = server(
        &cert(&ca, "server"),
        settings.clone(),
        Handler::Echo,
        DriverKind::Uring,
    );
    let addr = srv.addr;
    let (client, server_side) = options_of_a_connection(addr, cert(&ca, "client"), settings);
    assert_eq!(client.len(), 1, "client sockets to {addr}: {client:?}");
    assert_eq!(
        server_side.len(),
        1,
        "server sockets at {addr}: {server_side:?}"
    );
    // The kernel reports twice the SO_RCVBUF asked for.
    assert_eq!(client[0], (16384, 2 * 131072, algo.clone()), "client side");
    assert_eq!(server_side[0], (16384, 2 * 131072, algo), "server side");
}

#[test]
fn without_the_knobs_hbone_sockets_keep_the_system_defaults() {
    let ca = ca();
    let srv = echo_server(&cert(&ca, "server"));
    let (client, server_side) =
        options_of_a_connection(srv.addr, cert(&ca, "client"), H2Settings::default());
    assert_eq!(client.len(), 1, "{client:?}");
    assert_eq!(server_side.len(), 1, "{server_side:?}");
    // 0: never set on the socket (the system's net.ipv4.tcp_notsent_lowat applies).
    assert_eq!(client[0].0, 0);
    assert_eq!(server_side[0].0, 0);
    assert_eq!(client[0].2, host_default_ca());
    assert_eq!(server_side[0].2, host_default_ca());
}

#[test]
fn out_of_range_socket_knobs_are_refused_naming_the_field() {
    for (s, field) in [
        (
            H2Settings {
                socket_notsent_lowat: Some(0),
                ..H2Settings::default()
            },
            "h2.socket_notsent_lowat",
        ),
        (
            H2Settings {
                socket_notsent_lowat: Some(u32::MAX),
                ..H2Settings::default()
            },
            "h2.socket_notsent_lowat",
        ),
        (
            H2Settings {
                socket_recv_buffer: Some(100),
                ..H2Settings::default()
            },
            "h2.socket_recv_buffer",
        ),
    ] {
        let e = s.validate().expect_err(field);
        assert_eq!(e.field, field);
        assert!(e.message.contains("between"), "{}", e.message);
    }
    let e = H2Settings {
        tcp_congestion: Some("nosuchcc".into()),
        ..H2Settings::default()
    }
    .validate()
    .expect_err("unknown congestion control");
    assert_eq!(e.field, "h2.tcp_congestion");
    assert!(
        e.message.contains("cannot be set on this host"),
        "{}",
        e.message
    );
    let ok = H2Settings {
        tcp_congestion: Some(other_ca()),
        socket_notsent_lowat: Some(16384),
        socket_recv_buffer: Some(262144),
        ..H2Settings::default()
    };
    ok.validate().unwrap();
}
