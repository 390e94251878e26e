//! Certificate sources: the built-in CA persists its root; Istio's plug-in CA files (an
//! intermediate under a separate root) issue certificates that verify in a real handshake;
//! static files are served per identity; renewal is due at half life.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use hbone::ca::{CertSource, CertStore, SigningCa, StaticCerts};
use hbone::pool::{Pool, PoolKey};
use hbone::tls::TlsCounters;
use hbone::wire::ConnectRequest;
use hbone::H2Settings;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use runtime::driver::DriverKind;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hbone-ca-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Echo one message from `client` to a server with `server_cert`; both must verify.
fn handshake_works(client: &hbone::ca::WorkloadCert, server_cert: &hbone::ca::WorkloadCert) {
    let srv = echo_server(server_cert);
    let k = PoolKey {
        src: client.identity.clone(),
        dst: vec![server_cert.identity.clone()],
        addr: srv.addr,
    };
    let (client, src) = (client.clone(), k.src.clone());
    block_on(DriverKind::Uring, async move {
        let pool = Pool::new(H2Settings::default(), Arc::new(TlsCounters::default()));
        let (mut w, mut r) = pool
            .open(
                &k,
                &client,
                &ConnectRequest::new("10.0.0.1:80".parse().unwrap()),
            )
            .await
            .unwrap()
            .split();
        w.write_all(Bytes::from_static(b"hi"), true).await.unwrap();
        assert_eq!(r.read().await.unwrap().unwrap().as_ref(), b"hi");
    });
    let seen = srv.seen.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(seen.peer.as_ref(), Some(&src));
}

#[test]
fn builtin_ca_creates_then_reloads_the_same_root() {
    let dir = tmp("builtin");
    let first = SigningCa::builtin(&dir, "cluster.local").unwrap();
    let mode = std::fs::metadata(dir.join("ca-key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let second = SigningCa::builtin(&dir, "cluster.local").unwrap();
    assert_eq!(
        first.roots(),
        second.roots(),
        "the root persists across restarts"
    );
    // Certificates from either instance verify against each other.
    handshake_works(
        &first.issue(&id("a"), SystemTime::now()).unwrap(),
        &second.issue(&id("b"), SystemTime::now()).unwrap(),
    );
    let c = first.issue(&id("a"), SystemTime::now()).unwrap();
    let life = c.not_after.duration_since(c.not_before).unwrap();
    assert!(
        life >= Duration::from_secs(24 * 3600),
        "24 h lifetime, got {life:?}"
    );
    assert!(
        !format!("{c:?}").contains("PRIVATE"),
        "keys are never printed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn istio_plugin_ca_files_issue_verifiable_certificates() {
    let dir = tmp("plugin");
    std::fs::create_dir_all(&dir).unwrap();
    // An offline root and an intermediate signing CA under it, as `istioctl`'s Makefiles make.
    let ca_params = |cn: &str| {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root_params = ca_params("root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let int = ca_params("intermediate")
        .signed_by(&int_key, &root_issuer)
        .unwrap();
    write(&dir, "root-cert.pem", &root.pem());
    write(&dir, "ca-cert.pem", &int.pem());
    write(&dir, "ca-key.pem", &int_key.serialize_pem());
    write(
        &dir,
        "cert-chain.pem",
        &format!("{}{}", int.pem(), root.pem()),
    );
    let ca = SigningCa::plugin(&dir).unwrap();
    let a = ca.issue(&id("a"), SystemTime::now()).unwrap();
    assert_eq!(
        a.chain.len(),
        2,
        "leaf + intermediate are sent; the root is not"
    );
    assert_eq!(a.roots, vec![root.der().clone()]);
    handshake_works(&a, &ca.issue(&id("b"), SystemTime::now()).unwrap());
    // A missing file names itself.
    std::fs::remove_file(dir.join("root-cert.pem")).unwrap();
    let e = SigningCa::plugin(&dir).unwrap_err().to_string();
    assert!(e.contains("root-cert.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn static_files_per_identity() {
    let dir = tmp("static");
    let ca = ca();
    let c = cert(&ca, "a");
    let base = dir.join("default").join("a");
    std::fs::create_dir_all(&base).unwrap();
    let pem = |tag: &str, der: &[u8]| {
        use std::fmt::Write;
        let b64 = base64_encode(der);
        let mut s = format!("-----BEGIN {tag}-----\n");
        for line in b64.as_bytes().chunks(64) {
            let _ = writeln!(s, "{}", std::str::from_utf8(line).unwrap());
        }
        s + &format!("-----END {tag}-----\n")
    };
    write(
        &dir,
        "root-cert.pem",
        &pem("CERTIFICATE", c.roots[0].as_ref()),
    );
    write(
        &base,
        "cert-chain.pem",
        &pem("CERTIFICATE", c.chain[0].as_ref()),
    );
    let key_der = match c.key.to_rustls() {
        rustls_pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => unreachable!(),
    };
    write(&base, "key.pem", &pem("PRIVATE KEY", &key_der));
    let src = StaticCerts::new(&dir).unwrap();
    let loaded = src.issue(&id("a"), SystemTime::now()).unwrap();
    assert_eq!(loaded.chain, c.chain);
    assert!(src.issue(&id("nobody"), SystemTime::now()).is_err());
    handshake_works(&loaded, &cert(&ca, "b"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn store_renews_at_half_life() {
    let ca: Arc<dyn CertSource> = Arc::new(ca().with_ttl(Duration::from_secs(3600)));
    let mut store = CertStore::new(ca);
    let now = SystemTime::now();
    let a = store.get(&id("a"), now).unwrap();
    assert!(
        Arc::ptr_eq(
            &a,
            &store.get(&id("a"), now + Duration::from_secs(600)).unwrap()
        ),
        "fresh: kept"
    );
    let b = store
        .get(&id("a"), now + Duration::from_secs(1900))
        .unwrap();
    assert!(!Arc::ptr_eq(&a, &b), "past half life: renewed");
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
