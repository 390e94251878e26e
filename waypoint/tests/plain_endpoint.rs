//! Endpoints outside the mesh (R1, R5): a Service bound to the waypoint whose endpoints
//! are not captured (`protocol: TCP`, no ztunnel in front of them) is reached by the
//! waypoint over a connection of its own to `podIP:targetPort`, as Envoy-based waypoints
//! reach endpoints without Istio's mTLS — never in an HBONE tunnel their node's ztunnel
//! would refuse: HTTP/1.1 (kept alive between requests), HTTP/2 (`useClientProtocol`),
//! opaque TCP and upgrades, byte-exact with the half-close; in TLS the waypoint
//! originates when a DestinationRule says so (`SIMPLE`, `MUTUAL`); and Istio's egress
//! through a waypoint, a ServiceEntry bound to it.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;

use bytes::Bytes;
use common::{
    app_model, bind_node_ztunnel, block_on, counter_in, fnv, h2_in_tunnel, h2_response, ip,
    next_request, ok_response, open_tunnel, payload, prometheus_page, read_response, read_to_end,
    serve_h2, serve_threads, test_ca, Ended, Waypoint,
};

/// What the plain backend saw: connections accepted, and each request's method, path and
/// `x-forwarded-for`.
struct Seen {
    connections: Arc<AtomicU64>,
    heads: Receiver<String>,
}

/// A keep-alive HTTP/1.1 backend outside the mesh: `200 plain` to every request, each
/// request's method, path and `x-forwarded-for` recorded.
fn plain_http(ip: Ipv4Addr) -> (SocketAddr, Arc<AtomicU64>, Receiver<String>) {
    let connections = Arc::new(AtomicU64::new(0));
    let (tx, heads) = channel();
    let n = connections.clone();
    let addr = serve_threads(ip, move |mut c| {
        n.fetch_add(1, SeqCst);
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let _ = tx.send(format!(
                "{} {} xff={}",
                req.method,
                req.path,
                req.header("x-forwarded-for").unwrap_or("-")
            ));
            if c.write_all(ok_response("plain").as_bytes()).is_err() {
                return;
            }
        }
    });
    (addr, connections, heads)
}

/// A TCP echo outside the mesh: every byte back until the client's half-close.
fn plain_echo(ip: Ipv4Addr) -> SocketAddr {
    serve_threads(ip, common::echo_to_end)
}

/// A backend outside the mesh that switches protocols: `101` to the first request, then
/// every byte back until the client's half-close.
fn plain_upgrade(ip: Ipv4Addr) -> SocketAddr {
    serve_threads(ip, |mut c| {
        let mut buf = Vec::new();
        if next_request(&mut c, &mut buf).is_none() {
            return;
        }
        let resp =
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
        if c.write_all(resp.as_bytes()).is_err() || c.write_all(&buf).is_err() {
            return;
        }
        common::echo_to_end(c);
    })
}

/// HTTP/2 for `ext-h2` endpoints (`useClientProtocol`).
const USE_CLIENT_PROTOCOL: &str = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ext-h2, namespace: app}\nspec:\n  host: ext-h2\n  trafficPolicy:\n    connectionPool:\n      http: {useClientProtocol: true}\n";

struct Mesh {
    wp: Waypoint,
    http: Seen,
    /// The stand-in ztunnel's node: nothing of these tests may reach it.
    _zt: common::Ztunnel,
}

/// Services `ext` (HTTP, `10.96.0.30:80`), `ext-tcp` (`10.96.0.31:9000`), `ext-h2`
/// (`10.96.0.32:80`), `ext-down` (`10.96.0.33:80`, nothing listening) and `ext-ws`
/// (`10.96.0.34:80`, switching protocols), each with one
/// endpoint outside the mesh and bound to the waypoint by their `istio.io/use-waypoint`
/// label (their endpoints, not captured, are bound to none).
fn start() -> Mesh {
    let (net, zl) = bind_node_ztunnel(41);
    let ca = test_ca();
    let zt = common::stand_in_ztunnel(
        zl,
        &hbone::ca::CertSource::issue(
            &*ca,
            &common::id("app", "echo"),
            std::time::SystemTime::now(),
        )
        .unwrap(),
    );
    let (http, connections, heads) = plain_http(ip(net, 5));
    let echo = plain_echo(ip(net, 6));
    let h2 = serve_h2(ip(net, 7), |req, mut respond| async move {
        let body = format!("h2 {}", req.uri().path());
        let resp = http::Response::builder().status(200).body(()).unwrap();
        let mut send = respond.send_response(resp, false).unwrap();
        send.send_data(Bytes::from(body), true).unwrap();
    });
    let ws = plain_upgrade(ip(net, 9));
    // A port nothing listens on: bound, then closed.
    let down = std::net::TcpListener::bind((ip(net, 8), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let plain = |name: &str, svc: &str, addr: SocketAddr, port: u16| {
        format!(
            "  - {{uid: {name}, name: {name}, namespace: app, protocol: TCP, workloadIps: [\"{}\"], services: {{\"app/{svc}.app.svc.cluster.local\": {{{port}: {}}}}}}}\n",
            addr.ip(),
            addr.port()
        )
    };
    let workloads = plain("ext-1", "ext", http, 80)
        + &plain("ext-tcp-1", "ext-tcp", echo, 9000)
        + &plain("ext-h2-1", "ext-h2", h2, 80)
        + &plain("ext-down-1", "ext-down", down, 80)
        + &plain("ext-ws-1", "ext-ws", ws, 80);
    let services = "  - {name: ext, namespace: app, hostname: ext.app.svc.cluster.local, vips: [\"10.96.0.30\"], ports: {80: 80}, labels: {istio.io/use-waypoint: wp}}
  - {name: ext-tcp, namespace: app, hostname: ext-tcp.app.svc.cluster.local, vips: [\"10.96.0.31\"], ports: {9000: 9000}, labels: {istio.io/use-waypoint: wp}}
  - {name: ext-h2, namespace: app, hostname: ext-h2.app.svc.cluster.local, vips: [\"10.96.0.32\"], ports: {80: 80}, labels: {istio.io/use-waypoint: wp}}
  - {name: ext-down, namespace: app, hostname: ext-down.app.svc.cluster.local, vips: [\"10.96.0.33\"], ports: {80: 80}, labels: {istio.io/use-waypoint: wp}}
  - {name: ext-ws, namespace: app, hostname: ext-ws.app.svc.cluster.local, vips: [\"10.96.0.34\"], ports: {80: 80}, labels: {istio.io/use-waypoint: wp}}
";
    let text = app_model(ip(net, 1), &workloads, services) + USE_CLIENT_PROTOCOL;
    let wp = Waypoint::with_stats(&ca, &text, &format!("waypoint-plain-{net}.yaml"));
    Mesh {
        wp,
        http: Seen { connections, heads },
        _zt: zt,
    }
}

fn stats(m: &Mesh) -> String {
    prometheus_page(m.wp.handle().stats_addr().unwrap())
}

#[test]
fn r5_an_endpoint_outside_the_mesh_gets_plain_http_kept_alive() {
    let m = start();
    let from = Ipv4Addr::new(10, 1, 0, 7);
    let statuses = block_on(async {
        let (_c, mut s) =
            common::open_tunnel_for(m.wp.addr, &m.wp.client_cert, "10.96.0.30:80", Some(from))
                .await;
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for i in 0..3 {
            let req = format!("GET /r{i} HTTP/1.1\r\nhost: ext.app.svc.cluster.local\r\n\r\n");
            s.write_all(Bytes::from(req), false).await.unwrap();
            let r = read_response(&mut s, &mut buf).await;
            out.push((r.status, r.text()));
        }
        out
    });
    assert_eq!(statuses, vec![(200, "plain".to_string()); 3]);
    // One plain connection carried the three requests (HTTP/1.1 keep-alive upstream).
    assert_eq!(m.http.connections.load(SeqCst), 1);
    let heads: Vec<String> = m.http.heads.try_iter().collect();
    assert_eq!(heads.len(), 3);
    for (i, h) in heads.iter().enumerate() {
        // The backend learns who called (issue 5, item 6), in plain HTTP.
        assert_eq!(h, &format!("GET /r{i} xff=10.1.0.7"));
    }
    let page = stats(&m);
    assert_eq!(
        counter_in(&page, "waypoint_upstream_plain_connections_total"),
        1
    );
    assert_eq!(counter_in(&page, "waypoint_upstream_streams_total"), 0);
}

#[test]
fn r5_opaque_tcp_to_an_endpoint_outside_the_mesh_carries_every_byte_and_the_half_close() {
    let m = start();
    let data = payload(8 * 1024 * 1024 + 3);
    let (back, ended) = block_on(async {
        let (_c, mut s) = open_tunnel(m.wp.addr, &m.wp.client_cert, "10.96.0.31:9000").await;
        // Not HTTP: opaque TCP from the first byte.
        s.write_all(Bytes::from(data.clone()), true).await.unwrap();
        read_to_end(&mut s).await
    });
    assert_eq!(ended, Ended::Closed);
    assert_eq!(back.len(), data.len());
    assert_eq!(fnv(&back), fnv(&data));
    let page = stats(&m);
    assert_eq!(
        counter_in(&page, "waypoint_upstream_plain_connections_total"),
        1
    );
    assert_eq!(counter_in(&page, "waypoint_upstream_streams_total"), 0);
}

#[test]
fn r5_http2_to_an_endpoint_outside_the_mesh_is_multiplexed_on_one_connection() {
    let m = start();
    let bodies = block_on(async {
        let (_c, s) = open_tunnel(m.wp.addr, &m.wp.client_cert, "10.96.0.32:80").await;
        let (send, _conn) = h2_in_tunnel(s).await;
        let mut waits = Vec::new();
        for i in 0..16 {
            let req = http::Request::builder()
                .uri(format!("http://ext-h2.app.svc.cluster.local/s{i}"))
                .body(())
                .unwrap();
            let (resp, _) = send.clone().send_request(req, true).unwrap();
            waits.push(h2_response(resp));
        }
        let mut out = Vec::new();
        for w in waits {
            out.push(w.await);
        }
        out
    });
    for (i, b) in bodies.iter().enumerate() {
        assert_eq!(b, &(200, format!("h2 /s{i}")));
    }
    let page = stats(&m);
    assert_eq!(
        counter_in(&page, "waypoint_upstream_plain_connections_total"),
        1
    );
    assert_eq!(
        counter_in(&page, "waypoint_upstream_h2_connections_total"),
        1
    );
}

#[test]
fn r5_an_upgrade_to_an_endpoint_outside_the_mesh_splices_every_byte_with_half_close() {
    let m = start();
    let data = payload(3 * 1024 * 1024 + 7);
    let (status, back, ended) = block_on(async {
        let (_c, mut s) = open_tunnel(m.wp.addr, &m.wp.client_cert, "10.96.0.34:80").await;
        let head = "GET /ws HTTP/1.1\r\nhost: ext-ws.app.svc.cluster.local\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
        s.write_all(Bytes::from_static(head.as_bytes()), false)
            .await
            .unwrap();
        let mut buf = Vec::new();
        let status = read_response(&mut s, &mut buf).await.status;
        s.write_all(Bytes::from(data.clone()), true).await.unwrap();
        let (mut back, ended) = read_to_end(&mut s).await;
        // Bytes read with the 101 come first.
        buf.append(&mut back);
        (status, buf, ended)
    });
    assert_eq!(status, 101);
    assert_eq!(ended, Ended::Closed);
    assert_eq!((back.len(), fnv(&back)), (data.len(), fnv(&data)));
    assert_eq!(
        counter_in(&stats(&m), "waypoint_upstream_plain_connections_total"),
        1
    );
}

#[test]
fn r5_an_endpoint_outside_the_mesh_that_refuses_gets_503() {
    let m = start();
    let (status, _) = block_on(common::tunnel_get(
        m.wp.addr,
        &m.wp.client_cert,
        None,
        "10.96.0.33:80",
        "ext-down.app.svc.cluster.local",
    ));
    assert_eq!(status, 503);
    // The waypoint kept serving.
    let (status, body) = block_on(common::tunnel_get(
        m.wp.addr,
        &m.wp.client_cert,
        None,
        "10.96.0.30:80",
        "ext.app.svc.cluster.local",
    ));
    assert_eq!((status, body.as_str()), (200, "plain"));
}

/// A test PKI in `dir`: a root (`ca.pem`), a server certificate for `server_names`, and a
/// client certificate (`client.pem`, `client-key.pem`) from the same root.
struct Pki {
    ca: std::path::PathBuf,
    client: std::path::PathBuf,
    client_key: std::path::PathBuf,
    server: (
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    roots: rustls::RootCertStore,
}

fn pki(dir: &std::path::Path, server_names: &[&str]) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = server_names.iter().map(|s| s.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ckey = rcgen::KeyPair::generate().unwrap();
    let ccert = rcgen::CertificateParams::new(vec!["client.example".to_string()])
        .unwrap()
        .signed_by(&ckey, &ca)
        .unwrap();
    let client = dir.join("client.pem");
    let client_key = dir.join("client-key.pem");
    std::fs::write(&client, ccert.pem()).unwrap();
    std::fs::write(&client_key, ckey.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    Pki {
        ca: ca_file,
        client,
        client_key,
        server: (
            cert.der().clone(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        ),
        roots,
    }
}

/// An HTTPS backend outside the mesh (TLS 1.2 or 1.3) with `pki`'s server certificate;
/// with `mutual`, a client certificate from `pki`'s root is required. Answers every
/// request (kept alive) with `tls <SNI> <client certificate: yes|no> <path>`, then
/// ` x-egress=<value>` when the request has that field.
fn https_backend(ip: Ipv4Addr, pki: &Pki, mutual: bool) -> SocketAddr {
    let provider = hbone::tls::provider();
    let b = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = if mutual {
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(pki.roots.clone()),
            provider,
        )
        .build()
        .unwrap();
        b.with_client_cert_verifier(v)
    } else {
        b.with_no_client_auth()
    };
    let config = Arc::new(
        b.with_single_cert(vec![pki.server.0.clone()], pki.server.1.clone_key())
            .unwrap(),
    );
    serve_threads(ip, move |tcp| {
        let conn = rustls::ServerConnection::new(config.clone()).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut s, &mut buf) {
            let sni = s.conn.server_name().unwrap_or("-").to_string();
            let client = if s.conn.peer_certificates().is_some() {
                "yes"
            } else {
                "no"
            };
            let mut body = format!("tls {sni} {client} {}", req.path);
            if let Some(v) = req.header("x-egress") {
                body.push_str(&format!(" x-egress={v}"));
            }
            if s.write_all(ok_response(&body).as_bytes()).is_err() || s.flush().is_err() {
                return;
            }
        }
    })
}

/// `name`'s DestinationRule in namespace `app` with `tls` (a flow mapping).
fn tls_rule(name: &str, tls: &str) -> String {
    format!("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  host: {name}\n  trafficPolicy:\n    tls: {tls}\n")
}

/// Services with one HTTPS endpoint outside the mesh each, bound to the waypoint:
/// `api` (hostname `api.example.com`, `10.96.0.40:80` → the backend's port; SIMPLE with
/// the test root, SNI by default: the hostname), `api-sni` (`10.96.0.41`, SIMPLE, `sni`
/// and `subjectAltNames` naming `other.example.com`), `api-untrusted` (`10.96.0.42`,
/// SIMPLE with another root: refused), `api-mtls` (`10.96.0.43`, MUTUAL), `api-skip`
/// (`10.96.0.44`, `insecureSkipVerify`: no roots at all) and `api-san`
/// (`10.96.0.45`, `subjectAltNames` the certificate lacks: refused).
fn start_tls(dir: &std::path::Path) -> Waypoint {
    let (net, zl) = bind_node_ztunnel(43);
    drop(zl);
    let ca = test_ca();
    let p = pki(
        dir,
        &[
            "api.example.com",
            "other.example.com",
            "api-mtls.example.com",
        ],
    );
    let simple = https_backend(ip(net, 5), &p, false);
    let mutual = https_backend(ip(net, 6), &p, true);
    let plain = |name: &str, svcs: &[&str], addr: SocketAddr| {
        let svcs: Vec<String> = svcs
            .iter()
            .map(|s| format!("\"app/{s}\": {{80: {}}}", addr.port()))
            .collect();
        format!(
            "  - {{uid: {name}, name: {name}, namespace: app, protocol: TCP, workloadIps: [\"{}\"], services: {{{}}}}}\n",
            addr.ip(),
            svcs.join(", ")
        )
    };
    let workloads = plain(
        "https-1",
        &[
            "api.example.com",
            "api-sni.example.com",
            "api-untrusted.example.com",
            "api-skip.example.com",
            "api-san.example.com",
        ],
        simple,
    ) + &plain("https-mtls-1", &["api-mtls.example.com"], mutual);
    let svc = |name: &str, host: &str, vip: &str| {
        format!("  - {{name: {name}, namespace: app, hostname: {host}, vips: [\"{vip}\"], ports: {{80: 443}}, labels: {{istio.io/use-waypoint: wp}}}}\n")
    };
    let services = svc("api", "api.example.com", "10.96.0.40")
        + &svc("api-sni", "api-sni.example.com", "10.96.0.41")
        + &svc("api-untrusted", "api-untrusted.example.com", "10.96.0.42")
        + &svc("api-mtls", "api-mtls.example.com", "10.96.0.43")
        + &svc("api-skip", "api-skip.example.com", "10.96.0.44")
        + &svc("api-san", "api-san.example.com", "10.96.0.45");
    // Another root, which vouches for none of the backends.
    let other = pki(&dir.join("other"), &["api.example.com"]);
    let ca_file = p.ca.display();
    let rules = tls_rule("api", &format!("{{mode: SIMPLE, caCertificates: {ca_file}}}"))
        + &tls_rule(
            "api-sni",
            &format!("{{mode: SIMPLE, caCertificates: {ca_file}, sni: other.example.com, subjectAltNames: [other.example.com]}}"),
        )
        + &tls_rule(
            "api-untrusted",
            &format!("{{mode: SIMPLE, caCertificates: {}}}", other.ca.display()),
        )
        + &tls_rule(
            "api-mtls",
            &format!(
                "{{mode: MUTUAL, caCertificates: {ca_file}, clientCertificate: {}, privateKey: {}}}",
                p.client.display(),
                p.client_key.display()
            ),
        )
        + &tls_rule("api-skip", "{mode: SIMPLE, insecureSkipVerify: true}")
        + &tls_rule(
            "api-san",
            &format!("{{mode: SIMPLE, caCertificates: {ca_file}, subjectAltNames: [nobody.example.com]}}"),
        );
    let text = app_model(ip(net, 1), &workloads, &services) + &rules;
    Waypoint::with_stats(&ca, &text, &format!("waypoint-tls-origination-{net}.yaml"))
}

fn get_through(wp: &Waypoint, target: &str, host: &str) -> (u16, String) {
    block_on(common::tunnel_get(
        wp.addr,
        &wp.client_cert,
        None,
        target,
        host,
    ))
}

#[test]
fn destination_rule_tls_originates_tls_to_an_endpoint_outside_the_mesh() {
    let dir = common::test_dir("tls-origination");
    let wp = start_tls(&dir);
    // SIMPLE: the server's certificate checked against caCertificates for the service's
    // hostname, which is also the SNI.
    assert_eq!(
        get_through(&wp, "10.96.0.40:80", "api.example.com"),
        (200, "tls api.example.com no /".to_string())
    );
    // `sni` and `subjectAltNames`.
    assert_eq!(
        get_through(&wp, "10.96.0.41:80", "api-sni.example.com"),
        (200, "tls other.example.com no /".to_string())
    );
    // MUTUAL: the waypoint presents clientCertificate.
    assert_eq!(
        get_through(&wp, "10.96.0.43:80", "api-mtls.example.com"),
        (200, "tls api-mtls.example.com yes /".to_string())
    );
    // insecureSkipVerify: a root the waypoint does not trust is accepted.
    assert_eq!(
        get_through(&wp, "10.96.0.44:80", "api-skip.example.com"),
        (200, "tls api-skip.example.com no /".to_string())
    );
}

#[test]
fn destination_rule_tls_refuses_a_server_its_roots_do_not_vouch_for() {
    let dir = common::test_dir("tls-origination-untrusted");
    let wp = start_tls(&dir);
    // Another root does not vouch for the backend: no request reaches it (503), and the
    // waypoint keeps serving.
    let (status, _) = get_through(&wp, "10.96.0.42:80", "api-untrusted.example.com");
    assert_eq!(status, 503);
    // Trusted, but not for the name `subjectAltNames` asks for.
    let (status, _) = get_through(&wp, "10.96.0.45:80", "api-san.example.com");
    assert_eq!(status, 503);
    assert_eq!(get_through(&wp, "10.96.0.40:80", "api.example.com").0, 200);
}

#[test]
fn destination_rule_tls_errors_name_the_field() {
    let cases = [
        (
            "{mode: MUTUAL, caCertificates: /nonexistent/ca.pem}",
            "tls.clientCertificate",
            "MUTUAL needs clientCertificate and privateKey",
        ),
        (
            "{mode: SIMPLE, caCertificates: /nonexistent/ca.pem}",
            "tls.caCertificates",
            "/nonexistent/ca.pem",
        ),
        (
            "{mode: SIMPLE, credentialName: api-secret}",
            "tls.credentialName",
            "Kubernetes secrets",
        ),
        (
            "{mode: SIMPLE, clientCertificate: /a.pem, privateKey: /b.pem}",
            "tls.clientCertificate",
            "for mode MUTUAL",
        ),
        ("{mode: DISABLE}", "tls.mode", "DISABLE"),
        ("{mode: SIMPLE, sni: \"bad name!\"}", "tls.sni", "bad name!"),
    ];
    for (tls, field, message) in cases {
        let text = app_model(Ipv4Addr::new(127, 0, 0, 1), "", "") + &tls_rule("api", tls);
        let e = waypoint::config::load_str(std::path::Path::new("dr.yaml"), &text, 1)
            .expect_err(tls)
            .to_string();
        assert!(e.contains(field) && e.contains(message), "{tls}: {e}");
    }
}

/// Istio's egress through a waypoint, written as its tasks write it: a ServiceEntry for
/// `httpbin.org` bound to the waypoint (`istio.io/use-waypoint`), TLS originated by a
/// DestinationRule naming the host, an HTTPRoute attached to the ServiceEntry (backends
/// by ServiceEntry and by `Hostname`), and an AuthorizationPolicy targeting it.
const EGRESS: &str = r#"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin-tls, namespace: app}
spec:
  host: httpbin.org
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: CA_FILE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: httpbin-get, namespace: app}
spec:
  parentRefs:
  - {group: networking.istio.io, kind: ServiceEntry, name: httpbin, port: 80}
  rules:
  - matches: [{path: {type: PathPrefix, value: /get}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-egress, value: waypoint}]}
    backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /headers}}]
    backendRefs: [{group: networking.istio.io, kind: Hostname, name: httpbin.org, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-deny, namespace: app}
spec:
  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin}]
  action: DENY
  rules: [{to: [{operation: {paths: [/get/secret]}}]}]
"#;

#[test]
fn r7_egress_through_the_waypoint_to_a_service_entry_with_tls_origination() {
    let dir = common::test_dir("egress");
    let (net, zl) = bind_node_ztunnel(47);
    drop(zl);
    let ca = test_ca();
    let p = pki(&dir, &["httpbin.org"]);
    let backend = https_backend(ip(net, 9), &p, false);
    // The client calls http://httpbin.org (port 80); the waypoint originates TLS to the
    // endpoint's port (the entry's targetPort).
    let entries = format!(
        "serviceEntries:\n  - name: httpbin\n    namespace: app\n    labels: {{istio.io/use-waypoint: wp}}\n    hosts: [httpbin.org]\n    addresses: [240.240.0.50]\n    ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {}}}]\n    resolution: STATIC\n    endpoints: [{{address: {}}}]\n",
        backend.port(),
        backend.ip()
    );
    let text = app_model(ip(net, 1), "", "")
        + &entries
        + &EGRESS.replace("CA_FILE", &p.ca.display().to_string());
    let wp = Waypoint::with_stats(&ca, &text, &format!("waypoint-egress-{net}.yaml"));
    let get = |path: &str| {
        block_on(async {
            let (_c, mut s) = open_tunnel(wp.addr, &wp.client_cert, "240.240.0.50:80").await;
            let req = format!("GET {path} HTTP/1.1\r\nhost: httpbin.org\r\n\r\n");
            s.write_all(Bytes::from(req), false).await.unwrap();
            let r = read_response(&mut s, &mut Vec::new()).await;
            (r.status, r.text())
        })
    };
    // Routed by the HTTPRoute (its filter applied), over TLS with SNI httpbin.org.
    assert_eq!(
        get("/get"),
        (200, "tls httpbin.org no /get x-egress=waypoint".to_string())
    );
    // A `Hostname` backend: the entry's host.
    assert_eq!(
        get("/headers"),
        (200, "tls httpbin.org no /headers".to_string())
    );
    // The AuthorizationPolicy on the ServiceEntry.
    assert_eq!(get("/get/secret").0, 403);
    // A route is attached and none matches.
    assert_eq!(get("/post").0, 404);
    let page = prometheus_page(wp.handle().stats_addr().unwrap());
    assert_eq!(
        counter_in(&page, "waypoint_upstream_plain_connections_total"),
        1
    );
}

/// The IPv4 address (its bits) the test resolver answers for `moving.example.com`.
static MOVING: AtomicU64 = AtomicU64::new(0);

/// A resolver for `moving.example.com` only: the IPv4 address whose bits are [`MOVING`].
fn moving_resolver(host: &str) -> Result<Vec<std::net::IpAddr>, String> {
    match host {
        "moving.example.com" => {
            let bits = MOVING.load(SeqCst) as u32;
            Ok(vec![std::net::IpAddr::V4(Ipv4Addr::from(bits))])
        }
        _ => Err("unknown host".into()),
    }
}

/// A keep-alive HTTP/1.1 backend answering `200 <name>` on `addr` exactly.
fn named_at(addr: SocketAddr, name: &'static str) {
    let l = std::net::TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                while next_request(&mut c, &mut buf).is_some() {
                    if c.write_all(ok_response(name).as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn a_dns_service_entry_follows_its_host_name_to_new_addresses() {
    let (net, zl) = bind_node_ztunnel(53);
    drop(zl);
    let ca = test_ca();
    // Two backends on one port, at two addresses the name will answer in turn.
    let a = common::named_backend(ip(net, 5), "a");
    let b = SocketAddr::new(std::net::IpAddr::V4(ip(net, 6)), a.port());
    named_at(b, "b");
    MOVING.store(u32::from(ip(net, 5)) as u64, SeqCst);
    let entries = format!(
        "serviceEntries:\n  - {{name: moving, namespace: app, labels: {{istio.io/use-waypoint: wp}}, hosts: [moving.example.com], addresses: [240.240.0.60], ports: [{{number: 80, name: http, targetPort: {}}}], resolution: DNS}}\n",
        a.port()
    );
    let text = app_model(ip(net, 1), "", "") + &entries;
    let dns = waypoint::reload::DnsRefresh {
        every: std::time::Duration::from_millis(100),
        resolve: moving_resolver,
    };
    let dir = format!("wp-dns-refresh-{net}");
    let wp = common::Watched::start_with_dns(&ca, &dir, "wp.yaml", text, dns);
    let client = ca_client(&ca);
    let get = || {
        block_on(common::tunnel_get(
            wp.handle().addr,
            &client,
            None,
            "240.240.0.60:80",
            "moving.example.com",
        ))
    };
    assert_eq!(get(), (200, "a".to_string()));
    // The name now answers with the other address: at the next lookup the file in force
    // is loaded again, and new requests go there.
    MOVING.store(u32::from(ip(net, 6)) as u64, SeqCst);
    let c = &wp.handle().counters;
    block_on(common::bounded(async {
        while c.dns_reloads.load(SeqCst) == 0 || c.config_reloads.load(SeqCst) == 0 {
            monoio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }));
    assert_eq!(get(), (200, "b".to_string()));
}

/// A client certificate (`app/client`) from `ca`.
fn ca_client(ca: &Arc<hbone::ca::SigningCa>) -> hbone::ca::WorkloadCert {
    hbone::ca::CertSource::issue(
        &**ca,
        &common::id("app", "client"),
        std::time::SystemTime::now(),
    )
    .unwrap()
}

#[test]
fn a_hostname_backend_no_service_has_is_a_load_error() {
    let route = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: app}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\n  rules:\n  - backendRefs: [{group: networking.istio.io, kind: Hostname, name: nowhere.example.com, port: 80}]\n";
    let text = app_model(Ipv4Addr::new(127, 0, 0, 1), "", common::ECHO_SERVICE) + route;
    let e = waypoint::config::load_str(std::path::Path::new("r.yaml"), &text, 1)
        .expect_err("loaded")
        .to_string();
    assert!(
        e.contains("spec.rules[0].backendRefs[0].name") && e.contains("nowhere.example.com"),
        "{e}"
    );
}

#[test]
fn a_tls_handshake_that_never_completes_is_bounded_by_the_connect_timeout() {
    // `connectTimeout` bounds the TCP connect and the TLS handshake (without one, Istio's
    // 10 s: `waypoint::plain::CONNECT_TIMEOUT`, each of the default retries' tries): the
    // request is answered `503`, not left to the 5-minute stream idle timeout.
    let dir = common::test_dir("tls-silent");
    let (net, zl) = bind_node_ztunnel(59);
    drop(zl);
    let ca = test_ca();
    let p = pki(&dir, &["silent.example.com"]);
    // Accepts, reads, never answers: the TLS handshake cannot finish.
    let silent = serve_threads(ip(net, 5), |mut c| {
        let mut buf = [0u8; 4096];
        while matches!(std::io::Read::read(&mut c, &mut buf), Ok(n) if n > 0) {}
    });
    let workload = format!(
        "  - {{uid: silent-1, name: silent-1, namespace: app, protocol: TCP, workloadIps: [\"{}\"], services: {{\"app/silent.example.com\": {{80: {}}}}}}}\n",
        silent.ip(),
        silent.port()
    );
    let service = "  - {name: silent, namespace: app, hostname: silent.example.com, vips: [\"10.96.0.46\"], ports: {80: 443}, labels: {istio.io/use-waypoint: wp}}\n";
    let rule = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: silent, namespace: app}}\nspec:\n  host: silent\n  trafficPolicy:\n    tls: {{mode: SIMPLE, caCertificates: {}}}\n    connectionPool: {{tcp: {{connectTimeout: 300ms}}}}\n",
        p.ca.display()
    );
    let text = app_model(ip(net, 1), &workload, service) + &rule;
    let wp = Waypoint::with_stats(&ca, &text, &format!("waypoint-tls-silent-{net}.yaml"));
    let (status, _) = get_through(&wp, "10.96.0.46:80", "silent.example.com");
    assert_eq!(status, 503);
}
