//! Certificate sources behind one trait: a built-in CA (the embedded default), Istio's
//! plug-in CA files, and static per-identity files. Private keys are never logged: the
//! types that hold them print as `<redacted>`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::Identity;

/// Default workload certificate lifetime (Istio's).
pub const WORKLOAD_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("no certificate for identity {0}")]
    UnknownIdentity(Identity),
}

fn file_err(path: &Path, message: impl fmt::Display) -> CaError {
    CaError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// A private key in PKCS#8 DER. Debug/Display never show it.
#[derive(Clone)]
pub struct SecretKey(Arc<Vec<u8>>);

impl SecretKey {
    pub fn from_pkcs8_der(der: Vec<u8>) -> Self {
        SecretKey(Arc::new(der))
    }
    /// The same key (the same shared bytes, or equal bytes).
    pub fn same_as(&self, other: &SecretKey) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
    pub fn to_rustls(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.as_ref().clone()))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A workload's certificate chain (leaf first), key, and the trust roots to verify peers.
#[derive(Clone, Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: SecretKey,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    /// When to renew: at half of the lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
    pub fn needs_refresh(&self, now: SystemTime) -> bool {
        now >= self.refresh_at()
    }
}

/// Anything that can hand out a certificate for an identity.
pub trait CertSource: Send + Sync + 'static {
    /// A certificate for `id` valid at `now`.
    fn issue(&self, id: &Identity, now: SystemTime) -> Result<WorkloadCert, CaError>;
    /// The trust roots peers are verified against.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
}

/// Signs workload certificates with a CA key held in memory.
pub struct SigningCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate and any chain above it up to (excluding) the root.
    chain_above_leaf: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    ttl: Duration,
}

impl fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningCa")
            .field("roots", &self.roots.len())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The certificates of a PEM file (at least one; an error names the file).
pub fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect();
    let certs = certs.map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate found"));
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| file_err(path, e))
}

impl SigningCa {
    /// A self-signed root, generated now (ECDSA P-256, 10 years).
    pub fn generate_root(trust_domain: &str) -> Result<(Self, String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let root = cert.der().clone();
        let issuer = Issuer::new(params, key);
        Ok((
            SigningCa {
                issuer,
                chain_above_leaf: vec![],
                roots: vec![root],
                ttl: WORKLOAD_CERT_TTL,
            },
            cert_pem,
            key_pem,
        ))
    }

    /// The embedded default: load `ca-cert.pem`/`ca-key.pem` from `dir`, or create a root
    /// there on first start (key file mode 0600).
    pub fn builtin(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        if cert_path.exists() && key_path.exists() {
            let roots = pem_certs(&cert_path)?;
            let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| file_err(&key_path, e))?;
            let issuer = Issuer::from_ca_cert_pem(&read(&cert_path)?, key)
                .map_err(|e| file_err(&cert_path, e))?;
            return Ok(SigningCa {
                issuer,
                chain_above_leaf: vec![],
                roots,
                ttl: WORKLOAD_CERT_TTL,
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let (ca, cert_pem, key_pem) = Self::generate_root(trust_domain)?;
        write_private(&key_path, &key_pem)?;
        std::fs::write(&cert_path, cert_pem).map_err(|e| file_err(&cert_path, e))?;
        tracing::info!(dir = %dir.display(), "created a new mesh root CA");
        Ok(ca)
    }

    /// Istio's plug-in CA files in `dir`: `ca-cert.pem` (the signing CA), `ca-key.pem`,
    /// `root-cert.pem` (trust root), `cert-chain.pem` (the CA's chain up to the root).
    pub fn plugin(dir: &Path) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        let (root_path, chain_path) = (dir.join("root-cert.pem"), dir.join("cert-chain.pem"));
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| file_err(&key_path, e))?;
        let issuer = Issuer::from_ca_cert_pem(&read(&cert_path)?, key)
            .map_err(|e| file_err(&cert_path, e))?;
        let roots = pem_certs(&root_path)?;
        // cert-chain.pem holds the signing CA and the intermediates; the root is not sent.
        let chain: Vec<_> = pem_certs(&chain_path)?
            .into_iter()
            .filter(|c| !roots.contains(c))
            .collect();
        Ok(SigningCa {
            issuer,
            chain_above_leaf: chain,
            roots,
            ttl: WORKLOAD_CERT_TTL,
        })
    }

    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Mint a certificate valid from `not_before` for `ttl` (tests use this for expiry).
    pub fn mint(
        &self,
        id: &Identity,
        not_before: SystemTime,
        ttl: Duration,
    ) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_uri().try_into()?)];
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_before + ttl);
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain_above_leaf.iter().cloned());
        Ok(WorkloadCert {
            identity: id.clone(),
            chain,
            key: SecretKey::from_pkcs8_der(key.serialize_der()),
            roots: self.roots.clone(),
            not_before,
            not_after: not_before + ttl,
        })
    }
}

impl CertSource for SigningCa {
    fn issue(&self, id: &Identity, now: SystemTime) -> Result<WorkloadCert, CaError> {
        // Back-date a little for clock skew between nodes, as istiod does.
        self.mint(
            id,
            now - Duration::from_secs(60),
            self.ttl + Duration::from_secs(60),
        )
    }
    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| file_err(path, e))
}

/// Static per-identity files: `<dir>/<namespace>/<service-account>/{cert-chain.pem,key.pem}`
/// and `<dir>/root-cert.pem`.
#[derive(Debug)]
pub struct StaticCerts {
    dir: PathBuf,
    roots: Vec<CertificateDer<'static>>,
}

impl StaticCerts {
    pub fn new(dir: &Path) -> Result<Self, CaError> {
        let roots = pem_certs(&dir.join("root-cert.pem"))?;
        Ok(StaticCerts {
            dir: dir.to_owned(),
            roots,
        })
    }
}

impl CertSource for StaticCerts {
    fn issue(&self, id: &Identity, _now: SystemTime) -> Result<WorkloadCert, CaError> {
        use rustls_pki_types::pem::PemObject;
        let base = self.dir.join(&id.namespace).join(&id.service_account);
        let (chain_path, key_path) = (base.join("cert-chain.pem"), base.join("key.pem"));
        if !chain_path.exists() {
            return Err(CaError::UnknownIdentity(id.clone()));
        }
        let chain = pem_certs(&chain_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
        let key = match key {
            PrivateKeyDer::Pkcs8(k) => SecretKey::from_pkcs8_der(k.secret_pkcs8_der().to_vec()),
            _ => {
                return Err(file_err(
                    &key_path,
                    "key must be PKCS#8 (BEGIN PRIVATE KEY)",
                ))
            }
        };
        let info = crate::tls::leaf_info(&chain[0]).map_err(|e| file_err(&chain_path, e))?;
        if !info.identities.contains(id) {
            return Err(file_err(
                &chain_path,
                format!("certificate is not for {id}"),
            ));
        }
        Ok(WorkloadCert {
            identity: id.clone(),
            chain,
            key,
            roots: self.roots.clone(),
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }
    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

/// Certificates currently held for local identities, refreshed at half life. Control-side
/// object: workers take `Arc<WorkloadCert>` snapshots from it.
pub struct CertStore {
    source: Arc<dyn CertSource>,
    certs: HashMap<Identity, Arc<WorkloadCert>>,
}

impl CertStore {
    pub fn new(source: Arc<dyn CertSource>) -> Self {
        CertStore {
            source,
            certs: HashMap::new(),
        }
    }
    /// The current certificate for `id`, minting or renewing it when due.
    pub fn get(&mut self, id: &Identity, now: SystemTime) -> Result<Arc<WorkloadCert>, CaError> {
        if let Some(c) = self.certs.get(id) {
            if !c.needs_refresh(now) {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(self.source.issue(id, now)?);
        self.certs.insert(id.clone(), c.clone());
        Ok(c)
    }
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.source.roots()
    }
}
