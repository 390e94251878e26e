//! RequestAuthentication (JWT) with AuthorizationPolicy, through the waypoint service on real
//! sockets: tokens signed here (ES256 keys made per run, their JWKS inline in the
//! configuration), HTTP/1.1 and HTTP/2 inside HBONE tunnels, an HTTP/1.1 backend and an
//! HTTP/2 one (`useClientProtocol`) that report what reached them.
//!
//! What an Istio user sees: no token passes unauthenticated; a bad token is `401` with
//! Envoy's body and `www-authenticate`, never reaching the backend; a good one is taken off
//! the request and its claims handed on; `requestPrincipals` and `request.auth.claims`
//! policies decide by it (R15).

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use common::{
    app_model, bind_node_ztunnel, block_on, id, ip, next_request, read_response, serve_threads,
    stand_in_ztunnel, Ztunnel,
};
use hbone::ca::{CertSource, SigningCa};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

const ISSUER: &str = "https://idp.example";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);

/// An ES256 signing key and its JWK (`kid`).
struct Key {
    pair: EcdsaKeyPair,
    kid: &'static str,
}

impl Key {
    fn new(kid: &'static str) -> Key {
        let rng = SystemRandom::new();
        let pk8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk8.as_ref(), &rng).unwrap();
        Key { pair, kid }
    }

    fn jwk(&self) -> Value {
        let p = self.pair.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "alg": "ES256",
               "x": b64(&p[1..33]), "y": b64(&p[33..65])})
    }

    fn sign(&self, claims: Value) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let s = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", b64(s.as_ref()))
    }
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token of `ISSUER` for `sub` in `groups`, valid for an hour.
fn token(key: &Key, sub: &str, groups: &[&str]) -> String {
    key.sign(
        json!({"iss": ISSUER, "sub": sub, "aud": "echo", "groups": groups,
                    "iat": now(), "exp": now() + 3600}),
    )
}

/// What a backend reports of a request: `<target> auth=<authorization> sub=<x-jwt-sub>
/// groups=<x-jwt-groups>` (`-` for an absent field).
fn report(target: &str, field: &dyn Fn(&str) -> Option<String>) -> String {
    let f = |n: &str| field(n).unwrap_or_else(|| "-".into());
    format!(
        "{target} auth={} sub={} groups={}",
        f("authorization"),
        f("x-jwt-sub"),
        f("x-jwt-groups")
    )
}

/// A keep-alive HTTP/1.1 backend answering [`report`]; `seen` gets each report.
fn backend(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let addr = serve_threads(ip, move |mut c| {
        let mut buf = Vec::new();
        while let Some(req) = next_request(&mut c, &mut buf) {
            let body = report(&req.path, &|n| req.header(n).map(str::to_string));
            let _ = tx.send(body.clone());
            if c.write_all(common::ok_response(&body).as_bytes()).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// An HTTP/2 (prior knowledge) backend answering `h2 ` + [`report`].
fn h2_backend(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let addr = common::serve_h2(ip, move |req, mut respond| {
        let tx = tx.clone();
        async move {
            let target = req.uri().path_and_query().unwrap().to_string();
            let h = req.headers();
            let body = report(&target, &|n| {
                h.get(n).map(|v| v.to_str().unwrap().to_string())
            });
            let _ = tx.send(body.clone());
            let resp = http::Response::builder().status(200).body(()).unwrap();
            let mut out = respond.send_response(resp, false).unwrap();
            let _ = out.send_data(Bytes::from(format!("h2 {body}")), true);
        }
    });
    (addr, rx)
}

struct Mesh {
    wp: common::Waypoint,
    seen: mpsc::Receiver<String>,
    h2seen: mpsc::Receiver<String>,
    _zt: Ztunnel,
}

/// The policies of these tests, on the `app/wp` waypoint: the JWT rule (the key set of
/// `keys`, audience `echo`, `sub` and `groups` handed on as headers), `/private` only
/// with a request principal, `/admin` only for group `admin`.
fn policies(keys: &[&Key]) -> String {
    let jwks = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string();
    format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: app}}
spec:
  targetRefs:
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}
  jwtRules:
  - issuer: {ISSUER}
    audiences: [echo]
    jwks: '{jwks}'
    outputClaimToHeaders:
    - {{header: x-jwt-sub, claim: sub}}
    - {{header: x-jwt-groups, claim: groups}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: private-needs-jwt, namespace: app}}
spec:
  targetRefs:
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}
  action: DENY
  rules:
  - from: [{{source: {{notRequestPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: [/private]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: admin-group, namespace: app}}
spec:
  targetRefs:
  - {{kind: Service, name: echo}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: [/admin]}}}}]
    when: [{{key: "request.auth.claims[groups]", notValues: [admin]}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: grpcish, namespace: app}}
spec:
  host: grpcish
  trafficPolicy:
    connectionPool:
      http: {{useClientProtocol: true}}
"#
    )
}

impl Mesh {
    fn start(keys: &[&Key]) -> Mesh {
        let (net, zl) = bind_node_ztunnel(53);
        let ca = Arc::new(SigningCa::generate_root("cluster.local").unwrap().0);
        let zt = stand_in_ztunnel(
            zl,
            &ca.issue(&id("app", "echo"), SystemTime::now()).unwrap(),
        );
        let (pod, seen) = backend(ip(net, 2));
        let (h2pod, h2seen) = h2_backend(ip(net, 3));
        let workloads = format!(
            "  - {{uid: e1, name: e1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/echo.app.svc.cluster.local\": {{80: {}}}}}}}\n  - {{uid: g1, name: g1, namespace: app, serviceAccount: echo, node: node-b, workloadIps: [\"{}\"], services: {{\"app/grpcish.app.svc.cluster.local\": {{80: {}}}}}}}\n",
            pod.ip(),
            pod.port(),
            h2pod.ip(),
            h2pod.port()
        );
        let services = "  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: [\"10.96.0.1\"], ports: {80: 8080}}\n  - {name: grpcish, namespace: app, hostname: grpcish.app.svc.cluster.local, vips: [\"10.96.0.7\"], ports: {80: 8080}}\n";
        let model = app_model(ip(net, 1), &workloads, services);
        let text = format!("{model}---\n{}", policies(keys));
        let wp = common::Waypoint::start(&ca, &text, &format!("waypoint-jwt-{net}.yaml"));
        Mesh {
            wp,
            seen,
            h2seen,
            _zt: zt,
        }
    }

    /// Each raw HTTP/1.1 request on one tunnel to the `echo` Service: (status, the
    /// response head, body).
    fn http1(&self, reqs: &[String]) -> Vec<(u16, String, String)> {
        common::http1_on_tunnel(
            self.wp.addr,
            &self.wp.client_cert,
            "10.96.0.1:80",
            CLIENT,
            reqs,
        )
        .into_iter()
        .map(|r| (r.status, r.head.clone(), r.text()))
        .collect()
    }

    /// Each (path, `authorization` value) as an HTTP/2 request on one tunnel to `target`:
    /// (status, body).
    fn http2(&self, target: &str, host: &str, reqs: &[(&str, Option<&str>)]) -> Vec<(u16, String)> {
        let reqs: Vec<(&str, Vec<(&str, &str)>)> = reqs
            .iter()
            .map(|(p, a)| (*p, a.map(|a| ("authorization", a)).into_iter().collect()))
            .collect();
        common::h2_on_tunnel(
            self.wp.addr,
            &self.wp.client_cert,
            target,
            CLIENT,
            host,
            &reqs,
        )
    }
}

fn get(path: &str, auth: Option<&str>) -> String {
    let auth = auth.map_or(String::new(), |a| format!("authorization: {a}\r\n"));
    format!("GET {path} HTTP/1.1\r\nhost: echo.app.svc.cluster.local\r\n{auth}\r\n")
}

#[test]
fn r15_request_authentication_over_http1_tokens_checked_taken_off_and_used_by_policy() {
    let (key, other) = (Key::new("k1"), Key::new("k2"));
    let m = Mesh::start(&[&key]);
    let alice = token(&key, "alice", &["dev"]);
    let root = token(&key, "root", &["admin", "dev"]);
    let expired =
        key.sign(json!({"iss": ISSUER, "sub": "alice", "aud": "echo", "exp": now() - 3600}));
    let forged = Key {
        pair: other.pair,
        kid: "k1",
    }
    .sign(json!({"iss": ISSUER, "sub": "alice", "aud": "echo"}));
    let stranger = key.sign(json!({"iss": "https://elsewhere.example", "sub": "x"}));
    let wrong_aud = key.sign(json!({"iss": ISSUER, "sub": "alice", "aud": "billing"}));
    let bearer = |t: &str| format!("Bearer {t}");
    let reqs = vec![
        // No token: unauthenticated, allowed where policy allows it.
        get("/open", None),
        get("/private", None),
        get("/admin", None),
        // A good token: taken off, its claims handed on, policies decide by it.
        get("/open", Some(&bearer(&alice))),
        get("/private", Some(&bearer(&alice))),
        get("/admin", Some(&bearer(&alice))),
        get("/admin", Some(&bearer(&root))),
        get(&format!("/open?access_token={alice}"), None),
        // Another scheme is no token.
        get("/open", Some("Basic dXNlcjpwYXNz")),
        // Bad tokens: 401 before policy (even where policy would allow).
        get("/open", Some(&bearer(&expired))),
        get("/open", Some(&bearer(&forged))),
        get("/open", Some(&bearer(&stranger))),
        get("/open", Some(&bearer(&wrong_aud))),
        get("/open", Some("Bearer not.a-token")),
    ];
    let got = m.http1(&reqs);
    let body = |i: usize| (got[i].0, got[i].2.as_str());
    assert_eq!(body(0), (200, "/open auth=- sub=- groups=-"));
    assert_eq!(body(1), (403, "RBAC: access denied"));
    assert_eq!(body(2), (403, "RBAC: access denied"));
    assert_eq!(body(3), (200, "/open auth=- sub=alice groups=-"));
    assert_eq!(body(4), (200, "/private auth=- sub=alice groups=-"));
    assert_eq!(body(5), (403, "RBAC: access denied"));
    assert_eq!(body(6), (200, "/admin auth=- sub=root groups=-"));
    assert_eq!(
        body(7),
        (
            200,
            format!("/open?access_token={alice} auth=- sub=alice groups=-").as_str()
        )
    );
    assert_eq!(
        body(8),
        (200, "/open auth=Basic dXNlcjpwYXNz sub=- groups=-")
    );
    let refusals = [
        (9, "Jwt is expired"),
        (10, "Jwt verification fails"),
        (11, "Jwt issuer is not configured"),
        (12, "Audiences in Jwt are not allowed"),
        (
            13,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
    ];
    for (i, why) in refusals {
        assert_eq!(body(i), (401, why), "request {i}");
        let head = got[i].1.to_ascii_lowercase();
        assert!(
            head.contains("www-authenticate: bearer realm=\"http://echo.app.svc.cluster.local/open\", error=\"invalid_token\""),
            "request {i}: {head}"
        );
    }
    // Only the allowed requests reached the backend; the tunnel served all in turn.
    let seen: Vec<String> = m.seen.try_iter().collect();
    assert_eq!(seen.len(), 6, "{seen:?}");
    // Counted apart: refused tokens, and policy denials.
    let c = &m.wp.handle().counters;
    assert_eq!(c.jwt_rejected.load(std::sync::atomic::Ordering::Relaxed), 5);
    assert_eq!(c.denied.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[test]
fn r15_request_authentication_over_http2_to_http1_and_http2_upstreams() {
    let key = Key::new("k1");
    let m = Mesh::start(&[&key]);
    let root = format!("Bearer {}", token(&key, "root", &["admin"]));
    let alice = format!("Bearer {}", token(&key, "alice", &[]));
    let expired = format!(
        "Bearer {}",
        key.sign(json!({"iss": ISSUER, "sub": "a", "aud": "echo", "exp": 1}))
    );
    // To the HTTP/1.1 backend of `echo`.
    let got = m.http2(
        "10.96.0.1:80",
        "echo.app.svc.cluster.local",
        &[
            ("/private", None),
            ("/private", Some(&alice)),
            ("/admin", Some(&root)),
            ("/open", Some(&expired)),
        ],
    );
    assert_eq!(got[0], (403, "RBAC: access denied".into()));
    assert_eq!(got[1], (200, "/private auth=- sub=alice groups=-".into()));
    assert_eq!(got[2], (200, "/admin auth=- sub=root groups=-".into()));
    assert_eq!(got[3], (401, "Jwt is expired".into()));
    // To the HTTP/2 backend of `grpcish` (`useClientProtocol`): the head is built from the
    // client's HTTP/2 fields, and still without the token, with the claims.
    let got = m.http2(
        "10.96.0.7:80",
        "grpcish.app.svc.cluster.local",
        &[
            ("/private", Some(&alice)),
            ("/open", None),
            ("/x", Some(&expired)),
        ],
    );
    assert_eq!(
        got[0],
        (200, "h2 /private auth=- sub=alice groups=-".into())
    );
    assert_eq!(got[1], (200, "h2 /open auth=- sub=- groups=-".into()));
    assert_eq!(got[2].0, 401);
    assert_eq!(m.seen.try_iter().count(), 2);
    assert_eq!(m.h2seen.try_iter().count(), 2);
}

/// A test identity provider over HTTPS on `127.0.0.1` (its certificate from its own root,
/// whose PEM it writes to `ca_file`): `/.well-known/openid-configuration` names its
/// `/jwks`, which serves `keys` (JSON), or `500` while `up` is false. Counts key set
/// fetches.
#[derive(Default)]
struct Idp {
    keys: arc_swap::ArcSwap<String>,
    up: std::sync::atomic::AtomicBool,
    fetches: std::sync::atomic::AtomicUsize,
}

fn start_idp(ca_file: &std::path::Path) -> (SocketAddr, Arc<Idp>) {
    use std::io::Read;
    use std::sync::atomic::Ordering::SeqCst;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(ca_file, ca.pem()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let config = Arc::new(config);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let idp = Arc::new(Idp::default());
    idp.up.store(true, SeqCst);
    let state = idp.clone();
    std::thread::spawn(move || {
        for tcp in l.incoming() {
            let Ok(tcp) = tcp else { continue };
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let (status, body) = if path == "/.well-known/openid-configuration" {
                (200, json!({"issuer": format!("https://{addr}"), "jwks_uri": format!("https://{addr}/jwks")}).to_string())
            } else if path == "/jwks" {
                state.fetches.fetch_add(1, SeqCst);
                if state.up.load(SeqCst) {
                    (200, state.keys.load().to_string())
                } else {
                    (500, "down".into())
                }
            } else {
                (404, String::new())
            };
            // The key set goes chunked, the rest with a length.
            let resp = if path == "/jwks" && status == 200 {
                format!(
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                    body.len()
                )
            } else {
                format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            let _ = s.write_all(resp.as_bytes());
            let _ = s.flush();
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    });
    (addr, idp)
}

/// Wait (up to `common::EVENT_BOUND`) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let until = std::time::Instant::now() + common::EVENT_BOUND;
    while !f() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request on its own tunnel through the waypoint binary with `token` (if any):
/// (status, body).
fn ask(wp: &common::EchoBinary, token: Option<&str>) -> (u16, String) {
    block_on(async {
        let (_c, mut s) = wp.tunnel().await;
        let auth = token.map(|t| format!("Bearer {t}"));
        s.write_all(Bytes::from(get("/open", auth.as_deref())), false)
            .await
            .unwrap();
        let r = read_response(&mut s, &mut Vec::new()).await;
        (r.status, r.text())
    })
}

/// Keys by URI, in the `waypoint` binary: fetched over HTTPS (the provider's own root as
/// `jwks_ca`) by OpenID discovery before READY, so the first request verifies; a key
/// rotation at the provider is picked up by the refresh, and the old key's tokens are
/// refused from then on (the verified-token cache does not outlive its key set); a
/// provider that fails keeps the last good set; a key set never fetched refuses its
/// issuer's tokens (401), while requests without a token pass.
#[test]
fn r15_jwks_fetched_by_discovery_refreshed_and_failing_closed() {
    use std::sync::atomic::Ordering::SeqCst;
    let (a, b) = (Key::new("a"), Key::new("b"));
    let dir = common::test_dir("jwks-idp");
    let ca_file = dir.join("idp-ca.pem");
    let (idp_addr, idp) = start_idp(&ca_file);
    idp.keys
        .store(Arc::new(json!({"keys": [a.jwk()]}).to_string()));
    let issuer = format!("https://{idp_addr}");
    let dead = Key::new("d");
    let wp = common::EchoBinary::start(
        59,
        "jwks-binary",
        |ip| backend(ip).0,
        |model, settings| {
            let settings = settings.replace(
                "waypoint:\n",
                &format!(
                    "waypoint:\n  jwks_refresh: 1s\n  jwks_ca: {}\n",
                    ca_file.display()
                ),
            );
            format!(
                r#"{model}---
{settings}---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: discovered, namespace: app}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]
  jwtRules:
  - issuer: {issuer}
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: unreachable, namespace: app}}
spec:
  targetRefs: [{{kind: Service, name: echo}}]
  jwtRules:
  - issuer: https://dead.example
    jwksUri: http://127.0.0.1:1/jwks
    timeout: 2s
"#
            )
        },
    );
    let sign = |k: &Key, iss: &str, sub: &str| {
        k.sign(json!({"iss": iss, "sub": sub, "exp": now() + 3600}))
    };
    let (ta, tb) = (sign(&a, &issuer, "alice"), sign(&b, &issuer, "bob"));
    // Fetched before READY: the first request verifies.
    assert_eq!(
        ask(&wp, Some(&ta)),
        (200, "/open auth=- sub=alice groups=-".into())
    );
    assert_eq!(ask(&wp, Some(&tb)).0, 401);
    assert_eq!(ask(&wp, None).0, 200);
    // The unreachable provider's issuer: tokens refused, for want of keys.
    assert_eq!(
        ask(&wp, Some(&sign(&dead, "https://dead.example", "x"))),
        (
            401,
            "Jwks doesn't have key to match kid or alg from Jwt".into()
        )
    );
    // Rotation: the provider now serves b only.
    idp.keys
        .store(Arc::new(json!({"keys": [b.jwk()]}).to_string()));
    eventually("the new key set is in force", || {
        ask(&wp, Some(&tb)).0 == 200
    });
    assert_eq!(
        ask(&wp, Some(&ta)),
        (
            401,
            "Jwks doesn't have key to match kid or alg from Jwt".into()
        )
    );
    // The provider fails: fetches fail, counted, and the last good set keeps serving.
    idp.up.store(false, SeqCst);
    let failing = idp.fetches.load(SeqCst);
    eventually("a failed fetch", || {
        wp.metric("waypoint_jwks_fetch_errors_total") > 0 && idp.fetches.load(SeqCst) > failing
    });
    assert_eq!(
        ask(&wp, Some(&tb)),
        (200, "/open auth=- sub=bob groups=-".into())
    );
    assert!(wp.metric("waypoint_jwks_fetches_total") >= 4);
    let _ = std::fs::remove_dir_all(&dir);
}
