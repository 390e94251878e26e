//! rustls configuration for HBONE: TLS 1.3 only, AES-GCM suites, ALPN `h2`, ECDSA P-256
//! workload keys, and SPIFFE verifiers — the client checks that the server's certificate
//! carries one of the identities expected for the destination (never DNS names); the server
//! requires a client certificate chained to the trust root and reports the peer identity.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, WebPkiServerVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::ca::WorkloadCert;
use crate::identity::Identity;

/// Why a handshake was refused; counted per reason.
#[derive(Debug, Default)]
pub struct TlsCounters {
    pub identity_mismatch: AtomicU64,
    pub untrusted: AtomicU64,
    pub expired: AtomicU64,
    pub no_client_cert: AtomicU64,
    pub other: AtomicU64,
}

impl TlsCounters {
    /// Count a handshake failure by its rustls error.
    pub fn count(&self, e: &rustls::Error) {
        let c = match e {
            rustls::Error::InvalidCertificate(CertificateError::Expired)
            | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
            | rustls::Error::InvalidCertificate(CertificateError::NotValidYet)
            | rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
                &self.expired
            }
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            | rustls::Error::InvalidCertificate(CertificateError::BadSignature)
            | rustls::Error::InvalidCertificate(CertificateError::UnhandledCriticalExtension) => {
                &self.untrusted
            }
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            })
            | rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
                &self.identity_mismatch
            }
            rustls::Error::NoCertificatesPresented => &self.no_client_cert,
            _ => &self.other,
        };
        c.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> [(&'static str, u64); 5] {
        [
            ("identity_mismatch", self.identity_mismatch.load(Relaxed)),
            ("untrusted", self.untrusted.load(Relaxed)),
            ("expired", self.expired.load(Relaxed)),
            ("no_client_cert", self.no_client_cert.load(Relaxed)),
            ("other", self.other.load(Relaxed)),
        ]
    }
}

/// The crypto provider: ring, TLS 1.3 AES-128-GCM and AES-256-GCM only.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring as r;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            r::cipher_suite::TLS13_AES_128_GCM_SHA256,
            r::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        ..r::default_provider()
    })
}

/// What a leaf certificate says about itself.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub identities: Vec<Identity>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Parse the SPIFFE URI SANs and validity of a certificate.
pub fn leaf_info(cert: &CertificateDer<'_>) -> Result<LeafInfo, String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let mut identities = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                if let Ok(id) = u.parse::<Identity>() {
                    identities.push(id);
                }
            }
        }
    }
    let t = |ts: i64| UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
    Ok(LeafInfo {
        identities,
        not_before: t(x.validity().not_before.timestamp()),
        not_after: t(x.validity().not_after.timestamp()),
    })
}

/// The peer's identity from its presented chain (first SPIFFE URI SAN of the leaf).
pub fn peer_identity(chain: Option<&[CertificateDer<'static>]>) -> Option<Identity> {
    let leaf = chain?.first()?;
    leaf_info(leaf).ok()?.identities.into_iter().next()
}

fn roots_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, rustls::Error> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    Ok(store)
}

/// Client-side verifier: chain to our roots, then the leaf must carry an expected identity.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected: Vec<Identity>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let info = leaf_info(end_entity).map_err(rustls::Error::General)?;
        if info.identities.iter().any(|id| self.expected.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            let got: Vec<String> = info.identities.iter().map(|i| i.to_string()).collect();
            let want: Vec<String> = self.expected.iter().map(|i| i.to_string()).collect();
            tracing::debug!(?got, ?want, "server identity mismatch");
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client config acting as `me`, accepting a server that proves one of `expected`.
pub fn client_config(
    me: &WorkloadCert,
    expected: &[Identity],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots: roots_store(&me.roots)?,
        expected: expected.to_vec(),
        algs: provider.signature_verification_algorithms,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(me.chain.clone(), me.key.to_rustls())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Server config acting as `me`, requiring a client certificate chained to our roots.
pub fn server_config(me: &WorkloadCert) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = provider();
    let roots = Arc::new(roots_store(&me.roots)?);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(me.chain.clone(), me.key.to_rustls())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// An unverified-name client for tests of the verifier itself (plain webpki, DNS names).
#[doc(hidden)]
pub fn webpki_server_verifier(
    roots: &[CertificateDer<'static>],
) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots_store(roots)?), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}
