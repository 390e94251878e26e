//! TLS 1.3 session resumption between HBONE peers, over real sockets and real TLS: a second
//! connection resumes and the server still sees the exact client identity; tickets are kept
//! per (source identity, expected destination identities); another server's ticket is
//! refused (full handshake, full verification); a rotated server certificate keeps new
//! connections working; with the knob off no ticket is sent.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hbone::ca::WorkloadCert;
use hbone::client::Client;
use hbone::tls::{client_config_to, server_config_with, TlsCounters};
use hbone::wire::ConnectRequest;
use hbone::{H2Settings, HboneError, Identity};
use runtime::driver::DriverKind;
use rustls::server::ProducesTickets;

/// One connection: connect, one echoed stream, close. The echo is read after the server's
/// ticket (sent right after the handshake), so the client has stored it by then.
async fn one_connection(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    counters: &TlsCounters,
) -> Result<(), HboneError> {
    let c = Client::connect(addr, tls, &H2Settings::default(), counters).await?;
    let s = c
        .open(&ConnectRequest::new("10.1.2.3:80".parse().unwrap()))
        .await?;
    let (mut w, mut r) = s.split();
    w.write_all(Bytes::from_static(b"resume?"), true).await?;
    let mut got = Vec::new();
    while let Some(chunk) = r.read().await {
        got.extend_from_slice(&chunk?);
    }
    assert_eq!(got, b"resume?");
    Ok(())
}

fn counts(c: &TlsCounters) -> (u64, u64) {
    (
        c.full_handshakes.load(Relaxed),
        c.resumed_handshakes.load(Relaxed),
    )
}

/// Wait (bounded) until the server's counters read `want` (it counts after its side of the
/// handshake, which may trail the client's).
fn server_counts(srv: &Server, want: (u64, u64)) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counts(&srv.counters.tls) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "server handshakes (full, resumed): {:?}, want {want:?}",
            counts(&srv.counters.tls)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The identities the server saw on the next `n` streams.
fn seen(srv: &Server, n: usize) -> Vec<(Option<Identity>, Option<Vec<u8>>)> {
    (0..n)
        .map(|_| {
            let s = srv.seen.recv_timeout(Duration::from_secs(30)).unwrap();
            (s.peer, s.leaf)
        })
        .collect()
}

/// A server ticketer that counts what it is asked, around ours.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn ProducesTickets>,
    issued: AtomicUsize,
    offered: AtomicUsize,
    accepted: AtomicUsize,
}

impl ProducesTickets for Counting {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }
    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.issued.fetch_add(1, Relaxed);
        self.inner.encrypt(plain)
    }
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.offered.fetch_add(1, Relaxed);
        let r = self.inner.decrypt(cipher);
        if r.is_some() {
            self.accepted.fetch_add(1, Relaxed);
        }
        r
    }
}

/// Our server config for `cert` (resumption on), its ticketer wrapped in [`Counting`].
fn counting_server(cert: &WorkloadCert) -> (Arc<rustls::ServerConfig>, Arc<Counting>) {
    let mut cfg = (*server_config_with(cert, true).unwrap()).clone();
    let counting = Arc::new(Counting {
        inner: cfg.ticketer.clone(),
        issued: AtomicUsize::new(0),
        offered: AtomicUsize::new(0),
        accepted: AtomicUsize::new(0),
    });
    cfg.ticketer = counting.clone();
    (Arc::new(cfg), counting)
}

fn start(tls: Arc<rustls::ServerConfig>) -> Server {
    server_with_tls(tls, H2Settings::default(), Handler::Echo, DriverKind::Uring)
}

/// A client session store that counts the tickets it is given (and keeps none).
#[derive(Debug, Default)]
struct TicketsReceived(AtomicUsize);

impl rustls::client::ClientSessionStore for TicketsReceived {
    fn set_kx_hint(&self, _: rustls_pki_types::ServerName<'static>, _: rustls::NamedGroup) {}
    fn kx_hint(&self, _: &rustls_pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        None
    }
    fn set_tls12_session(
        &self,
        _: rustls_pki_types::ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }
    fn tls12_session(
        &self,
        _: &rustls_pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &rustls_pki_types::ServerName<'static>) {}
    fn insert_tls13_ticket(
        &self,
        _: rustls_pki_types::ServerName<'static>,
        _: rustls::client::Tls13ClientSessionValue,
    ) {
        self.0.fetch_add(1, Relaxed);
    }
    fn take_tls13_ticket(
        &self,
        _: &rustls_pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}

/// Our client config (resumption on), its store replaced by one counting tickets received.
fn ticket_counting_client(
    cert: &WorkloadCert,
    expect: &[Identity],
    addr: SocketAddr,
) -> (Arc<rustls::ClientConfig>, Arc<TicketsReceived>) {
    let mut cfg = (*client_config_to(cert, expect, addr, true).unwrap()).clone();
    let store = Arc::new(TicketsReceived::default());
    cfg.resumption = rustls::client::Resumption::store(store.clone());
    (Arc::new(cfg), store)
}

#[test]
fn second_connection_resumes_and_server_sees_exact_client_identity() {
    let ca = ca();
    let client = cert(&ca, "client");
    let (tls, ticketer) = counting_server(&cert(&ca, "server"));
    let srv = start(tls);
    let addr = srv.addr;
    let counters = TlsCounters::default();
    block_on(DriverKind::Uring, async {
        let tls = || client_config_to(&client, &[id("server")], addr, true).unwrap();
        one_connection(addr, tls(), &counters).await.unwrap();
        assert_eq!(counts(&counters), (1, 0), "the first handshake is full");
        assert_eq!(ticketer.issued.load(Relaxed), 1, "one ticket, not two");
        for n in 1..=3 {
            one_connection(addr, tls(), &counters).await.unwrap();
            assert_eq!(counts(&counters), (1, n), "connection {} resumes", n + 1);
        }
    });
    server_counts(&srv, (1, 3));
    assert_eq!(ticketer.accepted.load(Relaxed), 3);
    // A resumed session still hands the server the client's chain (from the ticket).
    for (peer, leaf) in seen(&srv, 4) {
        assert_eq!(peer, Some(id("client")));
        assert_eq!(leaf.as_deref(), Some(client.chain[0].as_ref()));
    }
}

#[test]
fn other_source_or_expected_identities_do_not_resume() {
    let ca = ca();
    let (client, other_client) = (cert(&ca, "client"), cert(&ca, "other-client"));
    let (tls, ticketer) = counting_server(&cert(&ca, "server"));
    let srv = start(tls);
    let addr = srv.addr;
    let counters = TlsCounters::default();
    block_on(DriverKind::Uring, async {
        let ours = client_config_to(&client, &[id("server")], addr, true).unwrap();
        one_connection(addr, ours.clone(), &counters).await.unwrap();
        assert_eq!(counts(&counters), (1, 0));
        // Another source identity, to the same server: its own full handshake.
        let tls = client_config_to(&other_client, &[id("server")], addr, true).unwrap();
        one_connection(addr, tls, &counters).await.unwrap();
        assert_eq!(counts(&counters), (2, 0), "another source identity");
        // Our identity, another set of expected destination identities: full too.
        let wider = [id("server"), id("backup")];
        let tls = client_config_to(&client, &wider, addr, true).unwrap();
        one_connection(addr, tls, &counters).await.unwrap();
        assert_eq!(counts(&counters), (3, 0), "other expected identities");
        // None of them took (offered) the first config's ticket: it still resumes.
        assert_eq!(ticketer.offered.load(Relaxed), 0);
        one_connection(addr, ours, &counters).await.unwrap();
        assert_eq!(counts(&counters), (3, 1));
    });
    server_counts(&srv, (3, 1));
    let peers: Vec<_> = seen(&srv, 4).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        peers,
        [id("client"), id("other-client"), id("client"), id("client")].map(Some)
    );
}

/// Tickets are kept per destination address (the TLS server name is the IP): another
/// server there — another config of the same certificate, or another mesh's root — gets
/// our ticket, cannot open it, and a full handshake with full verification follows.
#[test]
fn ticket_from_another_server_config_or_root_is_refused_and_full_handshake_follows() {
    let (ca, other_ca) = (ca(), ca());
    let client = cert(&ca, "client");
    let server_cert = cert(&ca, "server");
    let (tls_a, a) = counting_server(&server_cert);
    let (tls_b, b) = counting_server(&server_cert);
    let (tls_c, c) = counting_server(&cert(&other_ca, "server"));
    let (srv_a, srv_b, srv_c) = (start(tls_a), start(tls_b), start(tls_c));
    let counters = TlsCounters::default();
    block_on(DriverKind::Uring, async {
        let tls = |addr| client_config_to(&client, &[id("server")], addr, true).unwrap();
        one_connection(srv_a.addr, tls(srv_a.addr), &counters)
            .await
            .unwrap();
        assert_eq!(counts(&counters), (1, 0));
        assert_eq!(a.issued.load(Relaxed), 1);
        // Another mesh's server at the same IP: our ticket is offered and not opened; its
        // certificate is then checked and refused (untrusted).
        let e = one_connection(srv_c.addr, tls(srv_c.addr), &counters)
            .await
            .expect_err("another root must be refused despite a ticket");
        assert!(matches!(e, HboneError::Tls(_)), "{e}");
        assert_eq!((c.offered.load(Relaxed), c.accepted.load(Relaxed)), (1, 0));
        assert_eq!(counters.untrusted.load(Relaxed), 1);
        assert_eq!(counts(&counters), (1, 0));
        // A's ticket was used up there: a full handshake with A again, then a resumption.
        for _ in 0..2 {
            one_connection(srv_a.addr, tls(srv_a.addr), &counters)
                .await
                .unwrap();
        }
        assert_eq!(counts(&counters), (2, 1));
        assert_eq!(a.accepted.load(Relaxed), 1);
        // Another config of the same certificate (another key): A's ticket is refused,
        // a full handshake follows and succeeds.
        one_connection(srv_b.addr, tls(srv_b.addr), &counters)
            .await
            .unwrap();
        assert_eq!((b.offered.load(Relaxed), b.accepted.load(Relaxed)), (1, 0));
        assert_eq!(counts(&counters), (3, 1));
    });
    server_counts(&srv_a, (2, 1));
    server_counts(&srv_b, (1, 0));
    assert_eq!(counts(&srv_c.counters.tls), (0, 0));
    let (peer, _) = seen(&srv_b, 1).remove(0);
    assert_eq!(peer, Some(id("client")));
}

/// A rotated server certificate is a new server config (a new ticket key): tickets of the
/// old one fall back to a full handshake that verifies the new certificate, and sessions
/// then resume under the new config.
#[test]
fn server_certificate_rotation_keeps_new_connections_working() {
    let ca = ca();
    let client = cert(&ca, "client");
    let (old, new) = (cert(&ca, "server"), cert(&ca, "server"));
    assert_ne!(old.chain[0], new.chain[0]);
    let (tls_old, t_old) = counting_server(&old);
    let current = runtime::snapshot::Publisher::new(tls_old);
    let srv = server_with_tls_from(
        current.clone(),
        H2Settings::default(),
        Handler::Echo,
        DriverKind::Uring,
    );
    let addr = srv.addr;
    let counters = TlsCounters::default();
    block_on(DriverKind::Uring, async {
        let tls = || client_config_to(&client, &[id("server")], addr, true).unwrap();
        for _ in 0..2 {
            one_connection(addr, tls(), &counters).await.unwrap();
        }
        assert_eq!(counts(&counters), (1, 1));
        let (tls_new, t_new) = counting_server(&new);
        current.publish(tls_new);
        for _ in 0..2 {
            one_connection(addr, tls(), &counters).await.unwrap();
        }
        assert_eq!(
            counts(&counters),
            (2, 2),
            "a full handshake, then resumption"
        );
        assert_eq!(
            (t_new.offered.load(Relaxed), t_new.accepted.load(Relaxed)),
            (2, 1),
            "the old config's ticket was offered and refused"
        );
        assert_eq!(t_old.accepted.load(Relaxed), 1);
    });
    server_counts(&srv, (2, 2));
    for (peer, leaf) in seen(&srv, 4) {
        assert_eq!(peer, Some(id("client")));
        assert_eq!(leaf.as_deref(), Some(client.chain[0].as_ref()));
    }
}

/// `h2.tls_resumption: false`: a server sends no ticket, a client offers none and asks for
/// none (RFC 9149 ticket_request: a server with resumption on mints none for it); every
/// handshake is full. On both sides: exactly one ticket per handshake.
#[test]
fn with_resumption_off_no_tickets_are_sent() {
    let ca = ca();
    let (client, server_cert) = (cert(&ca, "client"), cert(&ca, "server"));
    let (tls_on, ticketer) = counting_server(&server_cert);
    let (srv_on, srv_off) = (
        start(tls_on),
        start(server_config_with(&server_cert, false).unwrap()),
    );
    let counters = TlsCounters::default();
    block_on(DriverKind::Uring, async {
        // Our client off, the server on: rustls offers PSK modes all the same, but the client
        // asks for no tickets, so none is minted for it; it never offers one.
        for _ in 0..2 {
            let tls = client_config_to(&client, &[id("server")], srv_on.addr, false).unwrap();
            one_connection(srv_on.addr, tls, &counters).await.unwrap();
        }
        assert_eq!(ticketer.offered.load(Relaxed), 0);
        assert_eq!(ticketer.issued.load(Relaxed), 0, "no ticket minted for it");
        assert_eq!(counts(&counters), (2, 0));
        // The same request from a client whose store would count what it gets: nothing is
        // sent to it.
        let (tls, received) = ticket_counting_client(&client, &[id("server")], srv_on.addr);
        let mut off = (*tls).clone();
        off.send_ticket_request = client_config_to(&client, &[id("server")], srv_on.addr, false)
            .unwrap()
            .send_ticket_request;
        one_connection(srv_on.addr, Arc::new(off), &counters)
            .await
            .unwrap();
        assert_eq!(received.0.load(Relaxed), 0, "no ticket sent to it");
        assert_eq!(counts(&counters), (3, 0));
        // The server off: a client that would keep tickets receives none.
        let (tls, received) = ticket_counting_client(&client, &[id("server")], srv_off.addr);
        for _ in 0..2 {
            one_connection(srv_off.addr, tls.clone(), &counters)
                .await
                .unwrap();
        }
        assert_eq!(received.0.load(Relaxed), 0);
        // Our client resuming against it: full handshakes only.
        for _ in 0..2 {
            let tls = client_config_to(&client, &[id("server")], srv_off.addr, true).unwrap();
            one_connection(srv_off.addr, tls, &counters).await.unwrap();
        }
        assert_eq!(counts(&counters), (7, 0));
        // Both on: one ticket per handshake.
        let (tls, received) = ticket_counting_client(&client, &[id("server")], srv_on.addr);
        one_connection(srv_on.addr, tls, &counters).await.unwrap();
        assert_eq!(received.0.load(Relaxed), 1);
        assert_eq!(ticketer.issued.load(Relaxed), 1);
    });
    server_counts(&srv_off, (4, 0));
    server_counts(&srv_on, (4, 0));
}

/// The knob is read from a profile's `h2` section.
#[test]
fn tls_resumption_knob_parses() {
    let s: H2Settings = serde_norway::from_str("tls_resumption: false").unwrap();
    assert!(!s.tls_resumption);
    assert_eq!(
        H2Settings::default().tls_resumption,
        hbone::tls::DEFAULT_RESUMPTION
    );
}

/// The cold path (`Client::connect_and_open`: the first CONNECT rides with the client's
/// Finished, the client dropped once the stream is done) resumes too.
#[test]
fn connect_and_open_resumes() {
    let ca = ca();
    let client = cert(&ca, "client");
    let srv = echo_server(&cert(&ca, "server"));
    let addr = srv.addr;
    let counters = TlsCounters::default();
    block_on(DriverKind::Uring, async {
        for _ in 0..3 {
            let tls = client_config_to(&client, &[id("server")], addr, true).unwrap();
            let opts = hbone::client::default_socket_options();
            let req = ConnectRequest::new("10.1.2.3:80".parse().unwrap());
            let (_client, s) = Client::connect_and_open(
                addr,
                tls,
                &H2Settings::default(),
                &counters,
                &opts,
                &req,
                None,
            )
            .await
            .unwrap();
            let (mut w, mut r) = s.split();
            w.write_all(Bytes::from_static(b"cold"), true)
                .await
                .unwrap();
            let mut got = Vec::new();
            while let Some(chunk) = r.read().await {
                got.extend_from_slice(&chunk.unwrap());
            }
            assert_eq!(got, b"cold");
        }
    });
    assert_eq!(counts(&counters), (1, 2));
    server_counts(&srv, (1, 2));
}

/// A ticket outlives nothing: once the client's certificate has expired, a session resumed
/// with it is refused by the server (counted as expired) although the ticket itself is
/// still valid — the full handshake's certificate check is not skipped by resuming.
#[test]
fn resumed_session_with_an_expired_client_certificate_is_refused() {
    let ca = ca();
    let now = std::time::SystemTime::now();
    let short = ca.mint(&id("client"), now, Duration::from_secs(5)).unwrap();
    let srv = echo_server(&cert(&ca, "server"));
    let addr = srv.addr;
    let counters = TlsCounters::default();
    block_on(DriverKind::Uring, async {
        let tls = || client_config_to(&short, &[id("server")], addr, true).unwrap();
        one_connection(addr, tls(), &counters)
            .await
            .expect("valid while fresh");
        assert_eq!(counts(&counters), (1, 0));
        // Wait until the certificate has expired (validity is in whole seconds).
        while std::time::SystemTime::now() <= short.not_after + Duration::from_secs(1) {
            monoio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = one_connection(addr, tls(), &counters).await;
        assert!(r.is_err(), "the server must not serve an expired client");
        // The client did resume (it has no view of its own expiry); the server refused.
        assert_eq!(counts(&counters), (1, 1));
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while srv.counters.tls.expired.load(Relaxed) != 1 {
        assert!(std::time::Instant::now() < deadline, "refusal not counted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(counts(&srv.counters.tls), (1, 0));
    assert_eq!(seen(&srv, 1)[0].0, Some(id("client")));
    assert!(
        srv.seen.try_recv().is_err(),
        "no stream of the refused session reached the handler"
    );
}
