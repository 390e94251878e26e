//! rustls configuration for HBONE: TLS 1.3 only, AES-GCM suites, ALPN `h2`, ECDSA P-256
//! workload keys, and SPIFFE verifiers — the client checks that the server's certificate
//! carries one of the identities expected for the destination (never DNS names); the server
//! requires a client certificate chained to the trust root and reports the peer identity.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, WebPkiServerVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
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
    /// Client handshakes the server answered with a HelloRetryRequest (not a refusal).
    pub hello_retries: AtomicU64,
    /// Completed handshakes with certificates (no session resumed).
    pub full_handshakes: AtomicU64,
    /// Completed handshakes that resumed a session (a ticket; no certificates or
    /// signatures exchanged).
    pub resumed_handshakes: AtomicU64,
    /// Client side: new connections that did not finish TCP connect, TLS and the HTTP/2
    /// handshake within `h2.handshake_timeout` (every worker's pool adds here).
    pub handshake_timeouts: AtomicU64,
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

    /// Count a completed handshake as full or resumed.
    pub fn count_completed(&self, kind: Option<rustls::HandshakeKind>) {
        let c = if kind == Some(rustls::HandshakeKind::Resumed) {
            &self.resumed_handshakes
        } else {
            &self.full_handshakes
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

/// The key-exchange group a client sends its (single) key share for; the other groups are
/// still offered in `supported_groups`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyShare {
    /// P-256 first: the cheapest group in ring. Measured here (ring 0.17.14 through rustls's
    /// `SupportedKxGroup`, user instructions per operation): P-256 key generation 123k (a
    /// precomputed base-point table) against X25519's 234k, the ECDH 530k against 480k;
    /// per handshake and side 652k against 716k. The ECDHE is still about 70 % of a resumed
    /// handshake's user instructions and cannot be avoided (rustls resumes with psk_dhe_ke
    /// only). Our servers (and Istio's ztunnel: rustls picks the client's first supported
    /// group) take it as is; as a server we answer an Istio client's X25519 share in X25519
    /// (its first supported group; asking for P-256 would cost a HelloRetryRequest).
    P256,
    /// X25519 first: what a server that picks by its own preference with X25519 first —
    /// Envoy (BoringSSL with `SSL_OP_CIPHER_SERVER_PREFERENCE`, set unless
    /// `prefer_client_ciphers`, and curves `X25519:P-256`) — would otherwise ask for in a
    /// HelloRetryRequest, a round trip more per handshake.
    X25519,
}

impl KeyShare {
    fn of(group: rustls::NamedGroup) -> Option<KeyShare> {
        match group {
            rustls::NamedGroup::secp256r1 => Some(KeyShare::P256),
            rustls::NamedGroup::X25519 => Some(KeyShare::X25519),
            _ => None,
        }
    }
}

/// The crypto provider: ring, TLS 1.3 AES-128-GCM and AES-256-GCM only, key share P-256
/// first (see [`KeyShare`]); X25519 and P-384 stay supported. Built once.
pub fn provider() -> Arc<CryptoProvider> {
    provider_for(KeyShare::P256)
}

/// The provider whose client sends its key share for `first`.
pub fn provider_for(first: KeyShare) -> Arc<CryptoProvider> {
    static PROVIDERS: [OnceLock<Arc<CryptoProvider>>; 2] = [OnceLock::new(), OnceLock::new()];
    PROVIDERS[first as usize]
        .get_or_init(|| {
            use rustls::crypto::ring as r;
            let (a, b) = match first {
                KeyShare::P256 => (r::kx_group::SECP256R1, r::kx_group::X25519),
                KeyShare::X25519 => (r::kx_group::X25519, r::kx_group::SECP256R1),
            };
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    r::cipher_suite::TLS13_AES_128_GCM_SHA256,
                    r::cipher_suite::TLS13_AES_256_GCM_SHA384,
                ],
                kx_groups: vec![a, b, r::kx_group::SECP384R1],
                ..r::default_provider()
            })
        })
        .clone()
}

/// Destinations (per worker thread) that answered our P-256 key share with a
/// HelloRetryRequest, and the group they asked for: later handshakes to them send that
/// group's share first. A peer not known to want another group gets P-256 (ours and Istio's
/// ztunnel take it); an Envoy peer costs one HelloRetryRequest per worker and address (until
/// evicted from the [`HRR_MEMO`] most recent), not one per connection.
const HRR_MEMO: usize = 256;

/// The key share to send first to `dst`.
pub fn key_share_for(dst: std::net::SocketAddr) -> KeyShare {
    WANTS
        .with_borrow(|m| m.find(|(a, _)| *a == dst).map(|(_, k)| *k))
        .unwrap_or(KeyShare::P256)
}

/// Note how a handshake with `dst` went: count it as full or resumed; after a
/// HelloRetryRequest, remember the group the server asked for (and count it). Returns
/// whether there was a HelloRetryRequest.
pub fn note_handshake(
    dst: std::net::SocketAddr,
    conn: &rustls::ClientConnection,
    counters: &TlsCounters,
) -> bool {
    counters.count_completed(conn.handshake_kind());
    if conn.handshake_kind() != Some(rustls::HandshakeKind::FullWithHelloRetryRequest) {
        return false;
    }
    counters.hello_retries.fetch_add(1, Relaxed);
    let wanted = conn
        .negotiated_key_exchange_group()
        .and_then(|g| KeyShare::of(g.name()));
    if let Some(k) = wanted {
        WANTS.with_borrow_mut(|m| {
            if let Some(e) = m.items.iter_mut().find(|(a, _)| *a == dst) {
                e.1 = k;
            } else {
                m.push((dst, k));
            }
        });
    }
    true
}

/// What a leaf certificate says about itself.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub identities: Vec<Identity>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Recently seen certificates of this thread (worker), most useful ones first checked: a
/// handshake costs two ECDSA chain verifications and two certificate parses per side
/// otherwise, and peers present the same certificate connection after connection.
const MEMO: usize = 32;

struct Memo<T, const N: usize = MEMO> {
    items: Vec<T>,
    next: usize,
}

impl<T, const N: usize> Memo<T, N> {
    const fn new() -> Self {
        Memo {
            items: Vec::new(),
            next: 0,
        }
    }
    fn find(&self, f: impl Fn(&T) -> bool) -> Option<&T> {
        self.items.iter().find(|t| f(t))
    }
    fn push(&mut self, t: T) {
        if self.items.len() < N {
            self.items.push(t);
        } else {
            self.items[self.next] = t;
            self.next = (self.next + 1) % N;
        }
    }
}

/// A chain that passed full WebPKI verification against `anchors`, and the time window in
/// which that verdict holds (the intersection of the leaf's and intermediates' validity;
/// WebPKI checks no time on the trust anchor). The verdict depends only on these bytes, the
/// anchors and the time — no revocation is configured — so an identical chain inside the
/// window is accepted without repeating the signature checks. The peer must still prove its
/// key (CertificateVerify), which is never cached.
struct VerifiedChain {
    anchors: Arc<[u8]>,
    leaf: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    valid_from: u64,
    valid_until: u64,
}

thread_local! {
    static LEAF_INFO: RefCell<Memo<(Vec<u8>, LeafInfo)>> = const { RefCell::new(Memo::new()) };
    static VERIFIED: RefCell<Memo<VerifiedChain>> = const { RefCell::new(Memo::new()) };
    static CLIENT_CONFIGS: RefCell<Memo<CachedClientConfig>> = const { RefCell::new(Memo::new()) };
    static WANTS: RefCell<Memo<(std::net::SocketAddr, KeyShare), HRR_MEMO>> =
        const { RefCell::new(Memo::new()) };
}

/// `c` is the verdict on this chain against these anchors.
fn same_chain(
    c: &VerifiedChain,
    anchors: &Arc<[u8]>,
    ee: &CertificateDer<'_>,
    inter: &[CertificateDer<'_>],
) -> bool {
    (Arc::ptr_eq(&c.anchors, anchors) || c.anchors == *anchors)
        && c.leaf == ee.as_ref()
        && c.intermediates.len() == inter.len()
        && c.intermediates
            .iter()
            .zip(inter)
            .all(|(a, b)| a.as_slice() == b.as_ref())
}

fn verified_before(
    anchors: &Arc<[u8]>,
    ee: &CertificateDer<'_>,
    inter: &[CertificateDer<'_>],
    now: UnixTime,
) -> bool {
    let t = now.as_secs();
    VERIFIED.with_borrow(|m| {
        m.find(|c| same_chain(c, anchors, ee, inter))
            .is_some_and(|c| c.valid_from <= t && t <= c.valid_until)
    })
}

fn remember_verified(anchors: &Arc<[u8]>, ee: &CertificateDer<'_>, inter: &[CertificateDer<'_>]) {
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (mut from, mut until) = (0u64, u64::MAX);
    for c in std::iter::once(ee).chain(inter) {
        let Ok(info) = leaf_info(c) else { return };
        from = from.max(secs(info.not_before));
        until = until.min(secs(info.not_after));
    }
    VERIFIED.with_borrow_mut(|m| {
        // The same chain again (a window that excludes now — say an expired intermediate
        // off the path — makes every handshake miss): refresh its entry, so repeated misses
        // do not fill the memo with copies and evict other chains.
        if let Some(c) = m
            .items
            .iter_mut()
            .find(|c| same_chain(c, anchors, ee, inter))
        {
            (c.valid_from, c.valid_until) = (from, until);
            return;
        }
        m.push(VerifiedChain {
            anchors: anchors.clone(),
            leaf: ee.as_ref().to_vec(),
            intermediates: inter.iter().map(|c| c.as_ref().to_vec()).collect(),
            valid_from: from,
            valid_until: until,
        })
    });
}

/// The trust roots as one byte string (the key of verified chains), tagged with the
/// verifier kind: a chain verified for server use says nothing about client use (EKU).
fn anchors_key(kind: u8, roots: &[CertificateDer<'static>]) -> Arc<[u8]> {
    let mut v = vec![kind];
    for r in roots {
        v.extend_from_slice(&(r.len() as u32).to_be_bytes());
        v.extend_from_slice(r.as_ref());
    }
    v.into()
}

/// Parse the SPIFFE URI SANs and validity of a certificate (memoised per thread: peers
/// present the same certificate on every connection).
pub fn leaf_info(cert: &CertificateDer<'_>) -> Result<LeafInfo, String> {
    if let Some(info) = LEAF_INFO.with_borrow(|m| {
        m.find(|(der, _)| der.as_slice() == cert.as_ref())
            .map(|(_, i)| i.clone())
    }) {
        return Ok(info);
    }
    let info = parse_leaf_info(cert)?;
    LEAF_INFO.with_borrow_mut(|m| m.push((cert.as_ref().to_vec(), info.clone())));
    Ok(info)
}

fn parse_leaf_info(cert: &CertificateDer<'_>) -> Result<LeafInfo, String> {
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

/// Full WebPKI chain verifications the verifiers ran in this process (a chain not in the
/// checking thread's memo of verified chains, see [`VerifiedChain`]).
static CHAIN_CHECKS: AtomicU64 = AtomicU64::new(0);
/// Handshake signature (CertificateVerify) checks the verifiers ran in this process.
static SIGNATURE_CHECKS: AtomicU64 = AtomicU64::new(0);

/// (chain verifications, handshake signature checks) run so far in this process, each one
/// or more ECDSA verifications: a full handshake checks one CertificateVerify per side and
/// the peer's chain only the first time a worker sees it; a resumed one checks neither.
pub fn verification_counts() -> (u64, u64) {
    (CHAIN_CHECKS.load(Relaxed), SIGNATURE_CHECKS.load(Relaxed))
}

/// The handshake-signature checks (CertificateVerify) of both verifiers, against ring's
/// algorithms in `self.algs` — what WebPKI's own verifiers built with [`provider`] do.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            SIGNATURE_CHECKS.fetch_add(1, Relaxed);
            verify_tls12_signature(m, c, d, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            SIGNATURE_CHECKS.fetch_add(1, Relaxed);
            verify_tls13_signature(m, c, d, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Client-side verifier: chain to our roots, then the leaf must carry an expected identity.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    anchors: Arc<[u8]>,
    expected: Vec<Identity>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    fn new(
        roots: &[CertificateDer<'static>],
        expected: &[Identity],
    ) -> Result<Self, rustls::Error> {
        Ok(SpiffeServerVerifier {
            roots: roots_store(roots)?,
            anchors: anchors_key(b's', roots),
            expected: expected.to_vec(),
            algs: provider().signature_verification_algorithms,
        })
    }
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
        if !verified_before(&self.anchors, end_entity, intermediates, now) {
            CHAIN_CHECKS.fetch_add(1, Relaxed);
            let parsed = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &self.roots,
                intermediates,
                now,
                self.algs.all,
            )?;
            remember_verified(&self.anchors, end_entity, intermediates);
        }
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

    signature_checks!();
}

/// Whether HBONE peers resume TLS sessions unless configured otherwise (`h2.tls_resumption`).
pub const DEFAULT_RESUMPTION: bool = true;

/// A client config built before on this thread, for the same certificate chain, key, roots,
/// expected identities, key share and resumption setting. Its session store (when
/// resuming) is this thread's tickets for this config alone, so a session is resumed only
/// for the same source identity and the same expected destination identities.
struct CachedClientConfig {
    /// Our whole chain, not only the leaf: a plug-in CA's `cert-chain.pem` can rotate an
    /// intermediate under an unchanged leaf, and the config presents the chain.
    chain: Vec<CertificateDer<'static>>,
    key: crate::ca::SecretKey,
    roots: Vec<CertificateDer<'static>>,
    expected: Vec<Identity>,
    share: KeyShare,
    resumption: bool,
    config: Arc<rustls::ClientConfig>,
}

/// Client config acting as `me`, accepting a server that proves one of `expected`
/// (resuming sessions as [`DEFAULT_RESUMPTION`] says).
///
/// Memoised per thread: building one parses the private key (an ECDSA public-key
/// computation) and the roots, which a connection per stream (no pool, or a pool miss) would
/// otherwise pay every time. A rotated certificate is a different key, so a new config.
pub fn client_config(
    me: &WorkloadCert,
    expected: &[Identity],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    client_config_with(me, expected, KeyShare::P256, DEFAULT_RESUMPTION)
}

/// [`client_config`] for a connection to `dst`: its first key share is the one `dst` asked
/// for in an earlier HelloRetryRequest, if any ([`key_share_for`]); `resumption`: offer
/// tickets this thread holds for (this config, `dst`) and keep the ones it gets.
pub fn client_config_to(
    me: &WorkloadCert,
    expected: &[Identity],
    dst: std::net::SocketAddr,
    resumption: bool,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    client_config_with(me, expected, key_share_for(dst), resumption)
}

/// [`client_config`] sending its key share for `share` first, resuming sessions or not.
pub fn client_config_with(
    me: &WorkloadCert,
    expected: &[Identity],
    share: KeyShare,
    resumption: bool,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let hit = CLIENT_CONFIGS.with_borrow(|m| {
        m.find(|c| {
            c.share == share
                && c.resumption == resumption
                && c.expected == expected
                && c.chain == me.chain
                && c.key.same_as(&me.key)
                && c.roots == me.roots
        })
        .map(|c| c.config.clone())
    });
    if let Some(config) = hit {
        return Ok(config);
    }
    let config = build_client_config(me, expected, share, resumption)?;
    CLIENT_CONFIGS.with_borrow_mut(|m| {
        m.push(CachedClientConfig {
            chain: me.chain.clone(),
            key: me.key.clone(),
            roots: me.roots.clone(),
            expected: expected.to_vec(),
            share,
            resumption,
            config: config.clone(),
        })
    });
    Ok(config)
}

fn build_client_config(
    me: &WorkloadCert,
    expected: &[Identity],
    share: KeyShare,
    resumption: bool,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = provider_for(share);
    let verifier = SpiffeServerVerifier::new(&me.roots, expected)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(me.chain.clone(), me.key.to_rustls())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    if resumption {
        cfg.resumption =
            rustls::client::Resumption::store(Arc::new(crate::resumption::ThreadSessions::new()))
                .tls12_resumption(rustls::client::Tls12Resumption::Disabled);
    } else {
        cfg.resumption = rustls::client::Resumption::disabled();
        // rustls offers PSK modes all the same, so a server would still mint, encrypt and
        // send tickets that this client only decrypts and drops: ask for none (RFC 9149
        // ticket_request; our servers honour it, others ignore the extension).
        cfg.send_ticket_request = Some(rustls::client::TicketRequest {
            new_session_count: 0,
            resumption_count: 0,
        });
    }
    Ok(Arc::new(cfg))
}

/// Server config acting as `me`, requiring a client certificate chained to our roots
/// (issuing session tickets as [`DEFAULT_RESUMPTION`] says).
pub fn server_config(me: &WorkloadCert) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    server_config_with(me, DEFAULT_RESUMPTION)
}

/// [`server_config`]; `resumption`: one stateless ticket after each handshake, from a
/// ticket key of this config's own ([`crate::resumption::Ticketer`]), valid for at most
/// [`crate::resumption::TICKET_LIFETIME`] and never past our chain's expiry.
pub fn server_config_with(
    me: &WorkloadCert,
    resumption: bool,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = provider();
    let client_verifier = Arc::new(CachingClientVerifier::new(&me.roots)?);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(me.chain.clone(), me.key.to_rustls())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No server-side session state: tickets carry it (stateless), or there are none.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    if resumption {
        let not_after = chain_not_after(&me.chain).unwrap_or(me.not_after);
        cfg.ticketer = Arc::new(crate::resumption::Ticketer::new(
            not_after,
            crate::resumption::TICKET_LIFETIME,
        )?);
        cfg.send_tls13_tickets = 1;
        // Honour a client's RFC 9149 ticket_request up to that one ticket: our clients with
        // resumption off ask for none (a client without the extension still gets one).
        cfg.max_tls13_tickets = 1;
    } else {
        // rustls sends two tickets by default after every handshake: with no resumption
        // they were pure cost (random bytes, an encoded session with the client chain,
        // one more record for the client to decrypt and drop).
        cfg.send_tls13_tickets = 0;
    }
    Ok(Arc::new(cfg))
}

/// The earliest expiry in `chain` (leaf and intermediates).
fn chain_not_after(chain: &[CertificateDer<'static>]) -> Option<SystemTime> {
    chain
        .iter()
        .map(|c| leaf_info(c).ok().map(|i| i.not_after))
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .min()
}

/// After a server handshake: count it as full or resumed; a resumed one must still have a
/// client leaf within its validity (see [`crate::resumption::check_resumed_peer`]),
/// counted as a refusal otherwise.
pub fn note_server_handshake(
    conn: &rustls::ServerConnection,
    counters: &TlsCounters,
) -> Result<(), rustls::Error> {
    let kind = conn.handshake_kind();
    if kind == Some(rustls::HandshakeKind::Resumed) {
        if let Err(e) = crate::resumption::check_resumed_peer(conn.peer_certificates()) {
            counters.count(&e);
            return Err(e);
        }
    }
    counters.count_completed(kind);
    Ok(())
}

/// The server's client-certificate verifier: WebPKI's, skipping the chain check for a chain
/// already verified on this thread within its validity (see [`VerifiedChain`]).
#[derive(Debug)]
struct CachingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    anchors: Arc<[u8]>,
    algs: WebPkiSupportedAlgorithms,
}

impl CachingClientVerifier {
    fn new(roots: &[CertificateDer<'static>]) -> Result<Self, rustls::Error> {
        let inner =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots_store(roots)?), provider())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(CachingClientVerifier {
            inner,
            anchors: anchors_key(b'c', roots),
            algs: provider().signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for CachingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if verified_before(&self.anchors, end_entity, intermediates, now) {
            return Ok(ClientCertVerified::assertion());
        }
        CHAIN_CHECKS.fetch_add(1, Relaxed);
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        remember_verified(&self.anchors, end_entity, intermediates);
        Ok(ok)
    }

    signature_checks!();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertSource, SigningCa};

    fn at(t: SystemTime) -> UnixTime {
        UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap())
    }

    fn memo_len() -> usize {
        VERIFIED.with_borrow(|m| m.items.len())
    }

    /// A self-signed CA certificate named `cn`, valid in [`from`, `until`] (years).
    fn ca_cert(cn: &str, from: i32, until: i32) -> CertificateDer<'static> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let year = |y| time::Date::from_calendar_date(y, time::Month::January, 1).unwrap();
        params.not_before = year(from).midnight().assume_utc();
        params.not_after = year(until).midnight().assume_utc();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn is_expired(e: &rustls::Error) -> bool {
        matches!(
            e,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        )
    }

    /// Not chained to the roots: another mesh's root has the same name as ours, so WebPKI
    /// finds a candidate issuer whose signature does not match.
    fn is_untrusted(e: &rustls::Error) -> bool {
        matches!(
            e,
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature
            )
        )
    }

    /// Both verifiers — the client's server-certificate one and the server's
    /// `CachingClientVerifier` — remember a chain only once it passed the full check:
    /// untrusted and expired chains, before or after a valid one was remembered, leave the
    /// memo as it was and fail with their own errors; a verdict for one use (server) is not
    /// taken for the other (client) nor under other roots; a remembered chain still has to
    /// carry an expected identity.
    #[test]
    fn chain_memo_is_filled_only_by_verified_chains_on_both_sides() {
        let ca = SigningCa::generate_root("cluster.local").unwrap().0;
        let other = SigningCa::generate_root("cluster.local").unwrap().0;
        let id = Identity::new("cluster.local", "default", "server");
        let now = SystemTime::now();
        let cert = ca.mint(&id, now, Duration::from_secs(3600)).unwrap();
        // The same identity, signed by another mesh's root.
        let foreign = other.mint(&id, now, Duration::from_secs(3600)).unwrap();
        let name = ServerName::try_from("example.com").unwrap();
        let (inside, later) = (
            at(now + Duration::from_secs(60)),
            at(now + Duration::from_secs(7200)),
        );
        let server_side = SpiffeServerVerifier::new(&cert.roots, std::slice::from_ref(&id))
            .expect("client config's verifier");
        let client_side = CachingClientVerifier::new(&cert.roots).expect("server's verifier");
        let leaf = &cert.chain[0];
        let check_s = |c: &CertificateDer<'_>, t| {
            server_side
                .verify_server_cert(c, &[], &name, &[], t)
                .map(|_| ())
        };
        let check_c =
            |c: &CertificateDer<'_>, t| client_side.verify_client_cert(c, &[], t).map(|_| ());
        assert_eq!(memo_len(), 0);

        // Refused chains are not remembered.
        let e = check_s(&foreign.chain[0], inside).unwrap_err();
        assert!(is_untrusted(&e), "{e:?}");
        let e = check_c(&foreign.chain[0], inside).unwrap_err();
        assert!(is_untrusted(&e), "{e:?}");
        let e = check_s(leaf, later).unwrap_err();
        assert!(is_expired(&e), "{e:?}");
        let e = check_c(leaf, later).unwrap_err();
        assert!(is_expired(&e), "{e:?}");
        assert_eq!(memo_len(), 0, "refusals must not be remembered");

        // A valid chain: remembered once per use, then taken from the memo.
        check_s(leaf, inside).expect("valid server chain");
        assert_eq!(memo_len(), 1);
        check_s(leaf, inside).expect("remembered server chain");
        assert_eq!(memo_len(), 1, "a second verification is a memo hit");
        check_c(leaf, inside).expect("valid client chain");
        assert_eq!(
            memo_len(),
            2,
            "a server-use verdict says nothing about client use"
        );
        check_c(leaf, inside).expect("remembered client chain");
        assert_eq!(memo_len(), 2);

        // Remembered, yet past its validity: both sides run the full check and refuse.
        let e = check_s(leaf, later).unwrap_err();
        assert!(is_expired(&e), "{e:?}");
        let e = check_c(leaf, later).unwrap_err();
        assert!(is_expired(&e), "{e:?}");
        // Untrusted ones are still refused next to a remembered chain.
        let e = check_s(&foreign.chain[0], inside).unwrap_err();
        assert!(is_untrusted(&e), "{e:?}");
        let e = check_c(&foreign.chain[0], inside).unwrap_err();
        assert!(is_untrusted(&e), "{e:?}");
        // Another mesh's verifiers do not take our roots' verdicts.
        let e = SpiffeServerVerifier::new(&other.roots(), std::slice::from_ref(&id))
            .unwrap()
            .verify_server_cert(leaf, &[], &name, &[], inside)
            .unwrap_err();
        assert!(is_untrusted(&e), "{e:?}");
        let e = CachingClientVerifier::new(&other.roots())
            .unwrap()
            .verify_client_cert(leaf, &[], inside)
            .unwrap_err();
        assert!(is_untrusted(&e), "{e:?}");
        assert_eq!(memo_len(), 2, "refusals must not be remembered");

        // A remembered chain still has to carry an expected identity.
        let wrong = SpiffeServerVerifier::new(
            &cert.roots,
            &[Identity::new("cluster.local", "default", "other")],
        )
        .unwrap();
        let e = wrong
            .verify_server_cert(leaf, &[], &name, &[], inside)
            .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
            ),
            "{e:?}"
        );
        assert_eq!(memo_len(), 2);
    }

    /// An extra intermediate that is not on the path and has expired makes the remembered
    /// window empty, so every handshake re-verifies the chain: it refreshes its one entry
    /// instead of adding a copy each time and evicting the other chains.
    #[test]
    fn reverified_chain_refreshes_its_entry_instead_of_adding_copies() {
        let ca = SigningCa::generate_root("cluster.local").unwrap().0;
        let (a, b) = (
            Identity::new("cluster.local", "default", "a"),
            Identity::new("cluster.local", "default", "b"),
        );
        let now = SystemTime::now();
        let ca_a = ca.mint(&a, now, Duration::from_secs(3600)).unwrap();
        let ca_b = ca.mint(&b, now, Duration::from_secs(3600)).unwrap();
        let v = SpiffeServerVerifier::new(&ca_a.roots, &[a, b]).unwrap();
        let name = ServerName::try_from("example.com").unwrap();
        let inside = at(now + Duration::from_secs(60));
        v.verify_server_cert(&ca_b.chain[0], &[], &name, &[], inside)
            .unwrap();
        let stale = [ca_cert("retired intermediate", 2000, 2001)];
        for _ in 0..2 * MEMO {
            v.verify_server_cert(&ca_a.chain[0], &stale, &name, &[], inside)
                .expect("the path does not use the stale certificate");
        }
        assert_eq!(memo_len(), 2, "one entry per chain");
        assert!(
            verified_before(&v.anchors, &ca_b.chain[0], &[], inside),
            "the other chain stays remembered"
        );
    }

    /// The client config cache is keyed by our whole chain: a rotated intermediate under the
    /// same leaf and key (a plug-in CA's new cert-chain.pem) gets a config presenting it.
    #[test]
    fn client_config_follows_a_rotated_chain_under_the_same_leaf() {
        let ca = SigningCa::generate_root("cluster.local").unwrap().0;
        let id = Identity::new("cluster.local", "default", "client");
        let peer = [Identity::new("cluster.local", "default", "server")];
        let mut old = ca.issue(&id, SystemTime::now()).unwrap();
        old.chain.push(ca_cert("intermediate 1", 2020, 2100));
        let mut new = old.clone();
        new.chain[1] = ca_cert("intermediate 2", 2020, 2100);
        let presented = |c: &rustls::ClientConfig| {
            c.client_auth_cert_resolver
                .resolve(&[], &[SignatureScheme::ECDSA_NISTP256_SHA256])
                .expect("a client certificate")
                .cert
                .clone()
        };
        let a = client_config(&old, &peer).unwrap();
        assert!(Arc::ptr_eq(&a, &client_config(&old, &peer).unwrap()));
        let b = client_config(&new, &peer).unwrap();
        assert!(!Arc::ptr_eq(&a, &b), "a new chain needs a new config");
        assert_eq!(presented(&a), old.chain);
        assert_eq!(presented(&b), new.chain);
        assert!(Arc::ptr_eq(&b, &client_config(&new, &peer).unwrap()));
    }
}
