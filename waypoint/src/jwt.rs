//! JWT request authentication: Istio's `RequestAuthentication` (`security.istio.io/v1`,
//! `/v1beta1`) as an Istio waypoint enforces it — Envoy's `jwt_authn` filter under the
//! configuration istiod generates (each `jwtRules[]` entry a provider; any provider, or no
//! token at all, satisfies the requirement):
//!
//! * A request without a token passes, unauthenticated: an AuthorizationPolicy decides
//!   what it may do (`requestPrincipals`, `request.auth.*`, [`crate::authz`]).
//! * A request with a token that does not verify is answered `401` before any policy or
//!   routing, with Envoy's body ([`Failure`]: `Jwt is expired`, `Jwt verification fails`,
//!   `Jwt issuer is not configured`, …) and `www-authenticate: Bearer
//!   realm="http://<host><path>", error="invalid_token"`. Every token the request carries
//!   must verify.
//! * A verified token gives the request its principal `<iss>/<sub>`, audiences, presenter
//!   (`azp`) and claims ([`Authenticated`]).
//!
//! Tokens are looked for where the applicable rules say (`fromHeaders` with their
//! `prefix`, `fromParams`, `fromCookies`), by default in `Authorization: Bearer <token>`
//! and the `access_token` query parameter. A token is verified by a rule that names its
//! issuer and looks where it was found; a token no such rule takes is
//! [`Failure::UnknownIssuer`].
//!
//! Checked in Envoy's order: the form (three base64url parts, a JSON header with a
//! supported `alg`, a JSON payload), the issuer, `exp` and `nbf` (60 s of clock skew,
//! Envoy's default), the audiences (when the rule lists some; `http://`, `https://` and a
//! trailing `/` are not compared), then the signature, by a key of the rule's key set whose
//! `kid` is the token's (any key when the token names none) and whose type and `alg` fit:
//! RS256/384/512, PS256/384/512, ES256, ES384, EdDSA (Ed25519), HS256/384/512 — all
//! verified by `ring`, the TLS stack's crypto.
//!
//! After success, as Envoy does: the header that carried a token is removed unless the
//! rule has `forwardOriginalToken` (a token in the query string stays in the target, as in
//! Envoy); `outputPayloadToHeader` gets the token's base64url payload and
//! `outputClaimToHeaders` each named claim (a string, number or boolean; `a.b` names a
//! nested claim), replacing any value the client sent.
//!
//! Verified tokens are remembered per worker (up to [`CACHE_ENTRIES`], never past their
//! `exp`), keyed by the rule and the whole token: the same token again costs a hash look-up
//! and the time checks, not a signature verification (Envoy's `jwt_cache_config`). A
//! reloaded rule is a new rule, so a key set change is never answered from the cache.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::{hmac, signature as sig};
use serde_json::{Map, Value};

use crate::authz::{Attachment, Subject};
use crate::http1::{RequestHead, Text};
use crate::route::ObjectRef;

/// Envoy's default clock skew for `exp` and `nbf`, seconds.
pub const CLOCK_SKEW: u64 = 60;

/// Verified tokens remembered per worker.
pub const CACHE_ENTRIES: usize = 512;

/// One `RequestAuthentication`.
#[derive(Debug, Clone)]
pub struct RequestAuthn {
    pub id: ObjectRef,
    /// Enforced here for [`Attachment::Targets`] only, as AuthorizationPolicies are.
    pub attachment: Attachment,
    pub rules: Vec<Arc<JwtRule>>,
}

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A request header (name lower-cased); the value after `prefix` (compared without
    /// regard to case) is the token.
    Header { name: String, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl Location {
    /// Istio's default: `Authorization: Bearer <token>`, then `?access_token=<token>`.
    pub fn defaults() -> Vec<Location> {
        vec![
            Location::Header {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            },
            Location::Param("access_token".into()),
        ]
    }
}

/// One `jwtRules[]` entry, compiled.
#[derive(Debug)]
pub struct JwtRule {
    /// Unique in the process: the verified-token cache's key (a reload makes new rules).
    serial: u64,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: Vec<Jwk>,
    pub from: Vec<Location>,
    pub forward_original_token: bool,
    /// Header name, lower-cased.
    pub output_payload_to_header: Option<String>,
    /// (header name lower-cased, claim path split at `.`).
    pub output_claim_to_headers: Vec<(String, Vec<String>)>,
    /// Where `keys` are fetched from, when they are not inline ([`crate::jwks`]).
    pub remote: Option<crate::jwks::Remote>,
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

impl JwtRule {
    /// A rule verifying `issuer`'s tokens by `keys`, looking `from` (empty: the defaults).
    pub fn new(issuer: String, keys: Vec<Jwk>, from: Vec<Location>) -> Self {
        JwtRule {
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
            issuer,
            audiences: vec![],
            keys,
            from: if from.is_empty() {
                Location::defaults()
            } else {
                from
            },
            forward_original_token: false,
            output_payload_to_header: None,
            output_claim_to_headers: vec![],
            remote: None,
        }
    }
}

/// A signature algorithm of the JWT header's `alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
    HS256,
    HS384,
    HS512,
}

impl Alg {
    pub fn parse(s: &str) -> Option<Alg> {
        Some(match s {
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "EdDSA" => Alg::EdDSA,
            "HS256" => Alg::HS256,
            "HS384" => Alg::HS384,
            "HS512" => Alg::HS512,
            _ => return None,
        })
    }

    fn rsa(self) -> Option<&'static sig::RsaParameters> {
        Some(match self {
            Alg::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
            Alg::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
            Alg::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
            Alg::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
            Alg::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
            Alg::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
            _ => return None,
        })
    }

    fn hmac(self) -> Option<hmac::Algorithm> {
        Some(match self {
            Alg::HS256 => hmac::HMAC_SHA256,
            Alg::HS384 => hmac::HMAC_SHA384,
            Alg::HS512 => hmac::HMAC_SHA512,
            _ => return None,
        })
    }
}

/// A key of a JWKS.
#[derive(Clone)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The key's own `alg`, when it names one: only tokens of that algorithm use it.
    pub alg: Option<Alg>,
    material: Material,
}

#[derive(Clone)]
enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point (`04 ‖ x ‖ y`).
    EcP256(Vec<u8>),
    EcP384(Vec<u8>),
    Ed25519(Vec<u8>),
    /// A shared secret (`oct`): never printed.
    Hmac(Vec<u8>),
}

impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kty = match self.material {
            Material::Rsa { .. } => "RSA",
            Material::EcP256(_) => "EC P-256",
            Material::EcP384(_) => "EC P-384",
            Material::Ed25519(_) => "OKP Ed25519",
            Material::Hmac(_) => "oct",
        };
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kty", &kty)
            .finish()
    }
}

impl Jwk {
    /// Whether a token signed with `alg` may be checked by this key.
    fn fits(&self, alg: Alg) -> bool {
        let family = match &self.material {
            Material::Rsa { .. } => alg.rsa().is_some(),
            Material::EcP256(_) => alg == Alg::ES256,
            Material::EcP384(_) => alg == Alg::ES384,
            Material::Ed25519(_) => alg == Alg::EdDSA,
            Material::Hmac(_) => alg.hmac().is_some(),
        };
        family && self.alg.is_none_or(|a| a == alg)
    }

    fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Rsa { n, e } => alg.rsa().is_some_and(|p| {
                sig::RsaPublicKeyComponents { n, e }
                    .verify(p, message, signature)
                    .is_ok()
            }),
            Material::EcP256(point) => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            Material::EcP384(point) => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            Material::Ed25519(x) => sig::UnparsedPublicKey::new(&sig::ED25519, x)
                .verify(message, signature)
                .is_ok(),
            Material::Hmac(k) => alg
                .hmac()
                .is_some_and(|a| hmac::verify(&hmac::Key::new(a, k), message, signature).is_ok()),
        }
    }
}

/// Parse a JWKS document (`{"keys": [...]}`, RFC 7517). Keys whose `use` is not `sig` are
/// encryption keys and are not used; an unsupported key type, curve or `alg`, a malformed
/// member, or an RSA modulus under 2048 bits is an error naming the key.
pub fn parse_jwks(text: &str) -> Result<Vec<Jwk>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<Raw>,
    }
    // Providers add members of their own (`x5c`, `x5t`, `key_ops`, …): not refused.
    #[derive(serde::Deserialize)]
    struct Raw {
        kty: String,
        kid: Option<String>,
        alg: Option<String>,
        #[serde(rename = "use")]
        use_: Option<String>,
        n: Option<String>,
        e: Option<String>,
        crv: Option<String>,
        x: Option<String>,
        y: Option<String>,
        k: Option<String>,
    }
    let set: Set = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = vec![];
    for (i, k) in set.keys.iter().enumerate() {
        if k.use_.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let member = |name: &str, v: &Option<String>| -> Result<Vec<u8>, String> {
            let v = v
                .as_deref()
                .ok_or_else(|| format!("keys[{i}]: {} key without {name:?}", k.kty))?;
            URL_SAFE_NO_PAD
                .decode(v.trim_end_matches('='))
                .map_err(|e| format!("keys[{i}].{name}: not base64url: {e}"))
        };
        let curve = |want: &[&str]| -> Result<String, String> {
            match k.crv.as_deref() {
                Some(c) if want.contains(&c) => Ok(c.to_string()),
                c => Err(format!(
                    "keys[{i}].crv: {c:?} is not supported for {} keys ({})",
                    k.kty,
                    want.join(", ")
                )),
            }
        };
        let material = match k.kty.as_str() {
            "RSA" => {
                let n = member("n", &k.n)?;
                let e = member("e", &k.e)?;
                let bits = n
                    .iter()
                    .position(|b| *b != 0)
                    .map_or(0, |z| (n.len() - z) * 8 - n[z].leading_zeros() as usize);
                if bits < 2048 {
                    return Err(format!(
                        "keys[{i}].n: a {bits}-bit RSA modulus (2048 bits at least)"
                    ));
                }
                Material::Rsa { n, e }
            }
            "EC" => {
                let (len, p384) = match curve(&["P-256", "P-384"])?.as_str() {
                    "P-256" => (32, false),
                    _ => (48, true),
                };
                let (x, y) = (member("x", &k.x)?, member("y", &k.y)?);
                if x.len() != len || y.len() != len {
                    return Err(format!(
                        "keys[{i}]: x and y must be {len} bytes for {}",
                        k.crv.as_deref().unwrap_or("")
                    ));
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                if p384 {
                    Material::EcP384(point)
                } else {
                    Material::EcP256(point)
                }
            }
            "OKP" => {
                curve(&["Ed25519"])?;
                let x = member("x", &k.x)?;
                if x.len() != 32 {
                    return Err(format!("keys[{i}].x: must be 32 bytes for Ed25519"));
                }
                Material::Ed25519(x)
            }
            "oct" => Material::Hmac(member("k", &k.k)?),
            t => {
                return Err(format!(
                    "keys[{i}].kty: {t:?} is not supported (RSA, EC, OKP, oct)"
                ))
            }
        };
        let alg = match k.alg.as_deref() {
            None => None,
            Some(a) => Some(
                Alg::parse(a).ok_or_else(|| format!("keys[{i}].alg: {a:?} is not supported"))?,
            ),
        };
        let key = Jwk {
            kid: k.kid.clone(),
            alg,
            material,
        };
        if let Some(a) = alg {
            if !key.fits(a) {
                return Err(format!("keys[{i}].alg: {a:?} does not fit a {} key", k.kty));
            }
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err("the key set has no signing key".into());
    }
    Ok(keys)
}

/// A verified token's identity, for [`crate::authz`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// `<iss>/<sub>`: `request.auth.principal`, matched by `requestPrincipals`.
    pub principal: String,
    /// `aud` (a string or a list).
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// The whole payload.
    pub claims: Map<String, Value>,
}

impl Authenticated {
    /// The claim at `path` (`["a", "b"]`: claim `a`'s member `b`).
    pub fn claim(&self, path: &[String]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        let mut v = self.claims.get(first)?;
        for p in rest {
            v = v.as_object()?.get(p)?;
        }
        Some(v)
    }
}

/// Why a token was refused; [`Failure::message`] is the `401` body, as Envoy words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    BadFormat,
    HeaderBadBase64,
    HeaderBadJson,
    HeaderBadAlg,
    AlgNotImplemented,
    PayloadBadBase64,
    PayloadBadJson,
    /// A registered claim of the wrong type (`exp`, `nbf`, `iss`, `sub`, `aud`, `azp`).
    PayloadBadClaim(&'static str),
    SignatureBadBase64,
    UnknownIssuer,
    Expired,
    NotYetValid,
    AudienceNotAllowed,
    KidAlgMismatch,
    VerificationFails,
}

impl Failure {
    pub fn message(self) -> &'static str {
        match self {
            Failure::BadFormat => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            Failure::HeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
            Failure::HeaderBadJson => "Jwt header is an invalid JSON",
            Failure::HeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            Failure::AlgNotImplemented => "Jwt header [alg] is not supported",
            Failure::PayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
            Failure::PayloadBadJson => "Jwt payload is an invalid JSON",
            Failure::PayloadBadClaim("exp") => "Jwt payload [exp] field must be an integer",
            Failure::PayloadBadClaim("nbf") => "Jwt payload [nbf] field must be an integer",
            Failure::PayloadBadClaim("aud") => {
                "Jwt payload [aud] field must be a string or string list"
            }
            Failure::PayloadBadClaim(_) => "Jwt payload has a claim of the wrong type",
            Failure::SignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
            Failure::UnknownIssuer => "Jwt issuer is not configured",
            Failure::Expired => "Jwt is expired",
            Failure::NotYetValid => "Jwt not yet valid",
            Failure::AudienceNotAllowed => "Audiences in Jwt are not allowed",
            Failure::KidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            Failure::VerificationFails => "Jwt verification fails",
        }
    }

    /// A short label for counters and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::BadFormat
            | Failure::HeaderBadBase64
            | Failure::HeaderBadJson
            | Failure::HeaderBadAlg
            | Failure::PayloadBadBase64
            | Failure::PayloadBadJson
            | Failure::PayloadBadClaim(_)
            | Failure::SignatureBadBase64 => "malformed",
            Failure::AlgNotImplemented => "unsupported_alg",
            Failure::UnknownIssuer => "unknown_issuer",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::AudienceNotAllowed => "audience",
            Failure::KidAlgMismatch => "no_key",
            Failure::VerificationFails => "signature",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// The rules of the `RequestAuthentication`s that apply to `s` (targetRefs attachments:
/// this waypoint's Gateway or the destination Service), in configuration order.
pub fn applicable<'a>(
    authns: &'a [RequestAuthn],
    s: &'a Subject<'a>,
) -> impl Iterator<Item = &'a Arc<JwtRule>> + 'a {
    authns
        .iter()
        .filter(move |a| {
            matches!(a.attachment, Attachment::Targets { .. })
                && a.attachment.applies(&a.id.namespace, s)
        })
        .flat_map(|a| a.rules.iter())
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    Header(String),
    Param,
    Cookie,
}

/// A token of the request and the rules that look where it was found.
struct Candidate<'r> {
    token: String,
    at: Found,
    rules: Vec<&'r JwtRule>,
}

/// Authenticate `head` by `rules` at `now` (seconds since the Unix epoch): `Ok(None)`
/// without a token (or without rules), `Ok(Some(_))` when every token found verifies (the
/// first one's identity; the head rewritten as the rules say), the first failure otherwise.
pub fn authenticate(
    rules: &[&JwtRule],
    head: &mut RequestHead,
    now: u64,
) -> Result<Option<Arc<Authenticated>>, Failure> {
    let candidates = extract(rules, head);
    if candidates.is_empty() {
        return Ok(None);
    }
    let mut verified = Vec::with_capacity(candidates.len());
    for c in &candidates {
        verified.push(verify_cached(&c.token, &c.rules, now)?);
    }
    for (c, (rule, auth)) in candidates.iter().zip(&verified) {
        if !rule.forward_original_token {
            if let Found::Header(name) = &c.at {
                head.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            }
        }
        if let Some(h) = &rule.output_payload_to_header {
            let payload = c.token.split('.').nth(1).unwrap_or("");
            set_header(head, h, payload.to_string());
        }
        for (h, path) in &rule.output_claim_to_headers {
            let v = match auth.claim(path) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
                _ => None,
            };
            // A value that cannot be a header value is not written (as Envoy).
            if let Some(v) =
                v.filter(|v| v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
            {
                set_header(head, h, v);
            }
        }
    }
    Ok(verified.into_iter().next().map(|(_, a)| a))
}

fn set_header(head: &mut RequestHead, name: &str, value: String) {
    head.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    head.headers
        .push((Text::from(name.to_string()), Text::from(value)));
}

/// The tokens of `head` where `rules` look, each once.
fn extract<'r>(rules: &[&'r JwtRule], head: &RequestHead) -> Vec<Candidate<'r>> {
    let mut out: Vec<Candidate<'r>> = vec![];
    let mut add = |token: &str, at: Found, rule: &'r JwtRule| {
        if token.is_empty() {
            return;
        }
        match out.iter_mut().find(|c| c.token == token) {
            Some(c) => {
                if !c.rules.iter().any(|r| std::ptr::eq(*r, rule)) {
                    c.rules.push(rule);
                }
            }
            None => out.push(Candidate {
                token: token.to_string(),
                at,
                rules: vec![rule],
            }),
        }
    };
    for rule in rules {
        for loc in &rule.from {
            match loc {
                Location::Header { name, prefix } => {
                    for (n, v) in &head.headers {
                        if !n.eq_ignore_ascii_case(name) {
                            continue;
                        }
                        if let Some(t) = after_prefix(v.trim(), prefix) {
                            add(token_part(t), Found::Header(name.clone()), rule);
                        }
                    }
                }
                Location::Param(p) => {
                    let query = head.query.as_deref().unwrap_or("");
                    for pair in query.split('&') {
                        if let Some((k, v)) = pair.split_once('=') {
                            if k == p {
                                add(v, Found::Param, rule);
                            }
                        }
                    }
                }
                Location::Cookie(c) => {
                    let cookies = head
                        .headers
                        .iter()
                        .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
                        .flat_map(|(_, v)| v.split(';'));
                    for pair in cookies {
                        if let Some((k, v)) = pair.trim().split_once('=') {
                            if k == c {
                                add(v.trim_matches('"'), Found::Cookie, rule);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn after_prefix<'a>(v: &'a str, prefix: &str) -> Option<&'a str> {
    let head = v.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| v[prefix.len()..].trim_start())
}

/// The token at the start of `v`: up to the first character a JWT cannot hold (a value
/// like `Bearer <token>, <other credentials>` gives the token alone).
fn token_part(v: &str) -> &str {
    let end = v
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=')))
        .unwrap_or(v.len());
    &v[..end]
}

struct Cached {
    serial: u64,
    auth: Arc<Authenticated>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

thread_local! {
    static VERIFIED: RefCell<HashMap<Box<str>, Vec<Cached>>> = RefCell::new(HashMap::new());
}

fn times_ok(exp: Option<u64>, nbf: Option<u64>, now: u64) -> Result<(), Failure> {
    if exp.is_some_and(|e| now > e.saturating_add(CLOCK_SKEW)) {
        return Err(Failure::Expired);
    }
    if nbf.is_some_and(|n| now.saturating_add(CLOCK_SKEW) < n) {
        return Err(Failure::NotYetValid);
    }
    Ok(())
}

/// [`verify`], answered from this worker's cache of verified tokens when it can be.
fn verify_cached<'r>(
    token: &str,
    rules: &[&'r JwtRule],
    now: u64,
) -> Result<(&'r JwtRule, Arc<Authenticated>), Failure> {
    let hit = VERIFIED.with_borrow(|cache| {
        let entries = cache.get(token)?;
        rules.iter().find_map(|r| {
            let c = entries.iter().find(|c| c.serial == r.serial)?;
            Some((*r, c.auth.clone(), c.exp, c.nbf))
        })
    });
    if let Some((rule, auth, exp, nbf)) = hit {
        times_ok(exp, nbf, now)?;
        return Ok((rule, auth));
    }
    let (rule, auth, exp, nbf) = verify(token, rules, now)?;
    VERIFIED.with_borrow_mut(|cache| {
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, v| {
                v.retain(|c| times_ok(c.exp, None, now).is_ok());
                !v.is_empty()
            });
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.entry(token.into()).or_default().push(Cached {
            serial: rule.serial,
            auth: auth.clone(),
            exp,
            nbf,
        });
    });
    Ok((rule, auth))
}

type Verified<'r> = (&'r JwtRule, Arc<Authenticated>, Option<u64>, Option<u64>);

/// Verify `token` by the first of `rules` that takes it (see the module docs for the
/// order of checks): the rule, the identity, `exp` and `nbf`.
pub fn verify<'r>(token: &str, rules: &[&'r JwtRule], now: u64) -> Result<Verified<'r>, Failure> {
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Failure::BadFormat);
    };
    let decode = |s: &str, f: Failure| {
        URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|_| f)
    };
    let header: Map<String, Value> =
        serde_json::from_slice(&decode(h64, Failure::HeaderBadBase64)?)
            .map_err(|_| Failure::HeaderBadJson)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(Failure::HeaderBadAlg)?;
    let alg = Alg::parse(alg).ok_or(Failure::AlgNotImplemented)?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.as_str()),
        Some(_) => return Err(Failure::HeaderBadJson),
    };
    let claims: Map<String, Value> =
        serde_json::from_slice(&decode(p64, Failure::PayloadBadBase64)?)
            .map_err(|_| Failure::PayloadBadJson)?;
    let signature = decode(s64, Failure::SignatureBadBase64)?;
    let string = |name: &'static str| match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Failure::PayloadBadClaim(name)),
    };
    let time = |name: &'static str| match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(Failure::PayloadBadClaim(name)),
    };
    let iss = string("iss")?;
    let sub = string("sub")?;
    let presenter = string("azp")?;
    let audiences = match claims.get("aud") {
        None => vec![],
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|a| a.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or(Failure::PayloadBadClaim("aud"))?,
        Some(_) => return Err(Failure::PayloadBadClaim("aud")),
    };
    let (exp, nbf) = (time("exp")?, time("nbf")?);
    let iss = iss.ok_or(Failure::UnknownIssuer)?;
    let mut takers = rules.iter().filter(|r| r.issuer == iss).peekable();
    if takers.peek().is_none() {
        return Err(Failure::UnknownIssuer);
    }
    times_ok(exp, nbf, now)?;
    let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
    let mut failure = Failure::VerificationFails;
    for rule in takers {
        if !rule.audiences.is_empty()
            && !audiences
                .iter()
                .any(|a| rule.audiences.iter().any(|w| same_audience(a, w)))
        {
            failure = Failure::AudienceNotAllowed;
            continue;
        }
        let mut keys = rule
            .keys
            .iter()
            .filter(|k| {
                k.fits(alg) && (kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
            })
            .peekable();
        if keys.peek().is_none() {
            failure = Failure::KidAlgMismatch;
            continue;
        }
        if keys.any(|k| k.verify(alg, signed, &signature)) {
            let auth = Authenticated {
                principal: format!("{iss}/{}", sub.as_deref().unwrap_or("")),
                audiences,
                presenter,
                claims,
            };
            return Ok((rule, Arc::new(auth), exp, nbf));
        }
        failure = Failure::VerificationFails;
    }
    Err(failure)
}

/// Audiences compared as Envoy does: without `http://` or `https://` and a trailing `/`.
fn same_audience(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> &str {
        let s = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        s.strip_suffix('/').unwrap_or(s)
    }
    norm(a) == norm(b)
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `www-authenticate` value of a `401` for the request to `host` and `path`.
pub fn challenge(host: &str, path: &str) -> String {
    format!("Bearer realm=\"http://{host}{path}\", error=\"invalid_token\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
    use serde_json::json;

    /// A 2048-bit RSA test key (PKCS#1 DER: `openssl genpkey -algorithm RSA`, then `openssl
    /// pkey -outform DER`).
    const RSA_KEY: &[u8] = include_bytes!("../tests/data/jwt-rsa-2048.der");
    const NOW: u64 = 1_800_000_000;

    fn b64(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    /// A signing key and its JWK.
    enum Signer {
        Ec(EcdsaKeyPair, &'static str, &'static str),
        Ed(Ed25519KeyPair),
        Rsa(RsaKeyPair, &'static dyn sig::RsaEncoding, &'static str),
        Hs(Vec<u8>, hmac::Algorithm, &'static str),
    }

    fn ec(p384: bool) -> Signer {
        let rng = SystemRandom::new();
        let (alg, name, crv) = if p384 {
            (&sig::ECDSA_P384_SHA384_FIXED_SIGNING, "ES384", "P-384")
        } else {
            (&sig::ECDSA_P256_SHA256_FIXED_SIGNING, "ES256", "P-256")
        };
        let pk8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        Signer::Ec(
            EcdsaKeyPair::from_pkcs8(alg, pk8.as_ref(), &rng).unwrap(),
            name,
            crv,
        )
    }

    fn ed() -> Signer {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Signer::Ed(Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap())
    }

    fn rsa(pss: bool) -> Signer {
        let k = RsaKeyPair::from_der(RSA_KEY).unwrap();
        if pss {
            Signer::Rsa(k, &sig::RSA_PSS_SHA256, "PS256")
        } else {
            Signer::Rsa(k, &sig::RSA_PKCS1_SHA256, "RS256")
        }
    }

    impl Signer {
        fn alg(&self) -> &'static str {
            match self {
                Signer::Ec(_, a, _) | Signer::Rsa(_, _, a) | Signer::Hs(_, _, a) => a,
                Signer::Ed(_) => "EdDSA",
            }
        }

        fn jwk(&self, kid: &str) -> Value {
            match self {
                Signer::Ec(k, _, crv) => {
                    let p = k.public_key().as_ref();
                    let n = (p.len() - 1) / 2;
                    json!({"kty": "EC", "crv": crv, "kid": kid, "x": b64(&p[1..1 + n]), "y": b64(&p[1 + n..])})
                }
                Signer::Ed(k) => {
                    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(k.public_key().as_ref())})
                }
                Signer::Rsa(k, _, _) => {
                    let c = sig::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                    json!({"kty": "RSA", "kid": kid, "n": b64(&c.n), "e": b64(&c.e)})
                }
                Signer::Hs(key, _, _) => json!({"kty": "oct", "kid": kid, "k": b64(key)}),
            }
        }

        fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
            let mut header = json!({"alg": self.alg(), "typ": "JWT"});
            if let Some(kid) = kid {
                header["kid"] = json!(kid);
            }
            let input = format!(
                "{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let rng = SystemRandom::new();
            let s = match self {
                Signer::Ec(k, _, _) => k.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
                Signer::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
                Signer::Rsa(k, enc, _) => {
                    let mut out = vec![0; k.public().modulus_len()];
                    k.sign(*enc, &rng, input.as_bytes(), &mut out).unwrap();
                    out
                }
                Signer::Hs(key, a, _) => hmac::sign(&hmac::Key::new(*a, key), input.as_bytes())
                    .as_ref()
                    .to_vec(),
            };
            format!("{input}.{}", b64(&s))
        }
    }

    fn rule(issuer: &str, keys: &[Value]) -> JwtRule {
        let jwks = json!({ "keys": keys }).to_string();
        JwtRule::new(issuer.into(), parse_jwks(&jwks).unwrap(), vec![])
    }

    fn claims(iss: &str, sub: &str) -> Value {
        json!({"iss": iss, "sub": sub, "exp": NOW + 3600, "iat": NOW})
    }

    fn head(headers: &[(&str, &str)], query: Option<&str>) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            path: "/".into(),
            query: query.map(|q| Text::from(q.to_string())),
            version: 1,
            headers: headers
                .iter()
                .map(|(n, v)| (Text::from(n.to_string()), Text::from(v.to_string())))
                .collect(),
        }
    }

    fn check(r: &JwtRule, token: &str, now: u64) -> Result<Authenticated, Failure> {
        verify(token, &[r], now).map(|(_, a, _, _)| (*a).clone())
    }

    #[test]
    fn every_supported_algorithm_verifies_and_a_changed_byte_does_not() {
        let hs = |a, name| Signer::Hs(b"a shared secret of 32 bytes long".to_vec(), a, name);
        let signers = [
            ec(false),
            ec(true),
            ed(),
            rsa(false),
            rsa(true),
            hs(hmac::HMAC_SHA256, "HS256"),
            hs(hmac::HMAC_SHA512, "HS512"),
        ];
        for s in &signers {
            let r = rule("https://issuer.example", &[s.jwk("k1")]);
            let token = s.sign(Some("k1"), &claims("https://issuer.example", "alice"));
            let a = check(&r, &token, NOW).unwrap_or_else(|e| panic!("{}: {e}", s.alg()));
            assert_eq!(a.principal, "https://issuer.example/alice", "{}", s.alg());
            // The payload changed after signing: the signature no longer holds.
            let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
            parts[1] = b64(claims("https://issuer.example", "mallory")
                .to_string()
                .as_bytes());
            assert_eq!(
                check(&r, &parts.join("."), NOW),
                Err(Failure::VerificationFails),
                "{}",
                s.alg()
            );
        }
    }

    #[test]
    fn key_chosen_by_kid_and_algorithm() {
        let (a, b) = (ec(false), ec(false));
        let r = rule("iss", &[a.jwk("a"), b.jwk("b")]);
        let c = claims("iss", "s");
        assert!(check(&r, &b.sign(Some("b"), &c), NOW).is_ok());
        // Without a kid, every fitting key is tried.
        assert!(check(&r, &b.sign(None, &c), NOW).is_ok());
        // A kid the set does not have; a key of the wrong type for the algorithm.
        assert_eq!(
            check(&r, &b.sign(Some("zz"), &c), NOW),
            Err(Failure::KidAlgMismatch)
        );
        assert_eq!(
            check(&r, &ed().sign(None, &c), NOW),
            Err(Failure::KidAlgMismatch)
        );
        // Signed by `b` but naming `a`'s kid: `a` does not verify it.
        assert_eq!(
            check(&r, &b.sign(Some("a"), &c), NOW),
            Err(Failure::VerificationFails)
        );
        // A key pinned to another `alg` is not used.
        let mut pinned = a.jwk("a");
        pinned["alg"] = json!("ES384");
        assert!(parse_jwks(&json!({ "keys": [pinned] }).to_string())
            .unwrap_err()
            .contains("does not fit"));
    }

    #[test]
    fn issuer_time_and_audience_checks_in_envoys_order() {
        let s = ec(false);
        let mut r = rule("iss", &[s.jwk("k")]);
        let token = |c: Value| s.sign(Some("k"), &c);
        assert_eq!(
            check(&r, &token(claims("other", "s")), NOW),
            Err(Failure::UnknownIssuer)
        );
        assert_eq!(
            check(&r, &token(json!({"sub": "s"})), NOW),
            Err(Failure::UnknownIssuer)
        );
        // 60 s of clock skew either way.
        let at = |exp: u64| token(json!({"iss": "iss", "exp": exp}));
        assert!(check(&r, &at(NOW - 60), NOW).is_ok());
        assert_eq!(check(&r, &at(NOW - 61), NOW), Err(Failure::Expired));
        let nbf = |n: u64| token(json!({"iss": "iss", "nbf": n}));
        assert!(check(&r, &nbf(NOW + 60), NOW).is_ok());
        assert_eq!(check(&r, &nbf(NOW + 61), NOW), Err(Failure::NotYetValid));
        assert_eq!(
            check(&r, &token(json!({"iss": "iss", "exp": "soon"})), NOW),
            Err(Failure::PayloadBadClaim("exp"))
        );
        // No exp: never expires.
        assert!(check(&r, &token(json!({"iss": "iss"})), u64::MAX / 2).is_ok());
        // Audiences, when the rule lists some (scheme and trailing slash not compared).
        r.audiences = vec!["https://api.example/".into(), "other".into()];
        let aud = |a: Value| token(json!({"iss": "iss", "aud": a}));
        let a = check(&r, &aud(json!(["x", "api.example"])), NOW).unwrap();
        assert_eq!(a.audiences, ["x", "api.example"]);
        assert!(check(&r, &aud(json!("other")), NOW).is_ok());
        assert_eq!(
            check(&r, &aud(json!("nope")), NOW),
            Err(Failure::AudienceNotAllowed)
        );
        assert_eq!(
            check(&r, &token(json!({"iss": "iss"})), NOW),
            Err(Failure::AudienceNotAllowed)
        );
        // An expired token with a wrong audience is reported expired (time first).
        assert_eq!(
            check(
                &r,
                &token(json!({"iss": "iss", "aud": "nope", "exp": 1})),
                NOW
            ),
            Err(Failure::Expired)
        );
    }

    #[test]
    fn malformed_tokens() {
        let s = ec(false);
        let r = rule("iss", &[s.jwk("k")]);
        let good = s.sign(None, &claims("iss", "s"));
        let parts: Vec<&str> = good.split('.').collect();
        let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), parts[1]);
        let table: Vec<(String, Failure)> = vec![
            ("a.b".into(), Failure::BadFormat),
            (format!("{good}.x"), Failure::BadFormat),
            (
                format!("!!.{}.{}", parts[1], parts[2]),
                Failure::HeaderBadBase64,
            ),
            (
                format!("{}.{}.{}", b64(b"[1"), parts[1], parts[2]),
                Failure::HeaderBadJson,
            ),
            (
                format!("{}.{}.{}", b64(b"{}"), parts[1], parts[2]),
                Failure::HeaderBadAlg,
            ),
            (none, Failure::AlgNotImplemented),
            (
                format!("{}.*.{}", parts[0], parts[2]),
                Failure::PayloadBadBase64,
            ),
            (
                format!("{}.{}.{}", parts[0], b64(b"\"s\""), parts[2]),
                Failure::PayloadBadJson,
            ),
            (
                format!("{}.{}.$", parts[0], parts[1]),
                Failure::SignatureBadBase64,
            ),
            (
                format!("{}.{}.", parts[0], parts[1]),
                Failure::VerificationFails,
            ),
        ];
        for (token, want) in table {
            assert_eq!(check(&r, &token, NOW), Err(want), "{token}");
        }
    }

    #[test]
    fn key_sets_refused_with_the_key_named() {
        let s = ec(false);
        let mut short = rsa(false).jwk("r");
        short["n"] = json!(b64(&[0xc5; 128]));
        let mut bad_y = s.jwk("e");
        bad_y["y"] = json!(b64(&[1; 31]));
        let table = [
            (json!({"keys": [short]}), "1024-bit RSA modulus"),
            (json!({"keys": [s.jwk("a"), {"kty": "XYZ"}]}), "keys[1].kty"),
            (json!({"keys": [bad_y]}), "x and y must be 32 bytes"),
            (
                json!({"keys": [{"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}]}),
                "keys[0].crv",
            ),
            (
                json!({"keys": [{"kty": "RSA", "e": "AQAB"}]}),
                "without \"n\"",
            ),
            (json!({"keys": []}), "no signing key"),
            (
                json!({"keys": [{"kty": "EC", "use": "enc"}]}),
                "no signing key",
            ),
            (json!({"nokeys": 1}), "not a JWKS"),
        ];
        for (set, want) in table {
            let e = parse_jwks(&set.to_string()).unwrap_err();
            assert!(e.contains(want), "{set}: {e}");
        }
        // An encryption key beside a signing key is passed over.
        let keys = parse_jwks(
            &json!({"keys": [{"kty": "RSA", "use": "enc", "n": "AA", "e": "AQAB"}, s.jwk("a")]})
                .to_string(),
        )
        .unwrap();
        assert_eq!(keys.len(), 1);
        // Debug never prints key material.
        let hs = Signer::Hs(b"top-secret-hmac-key".to_vec(), hmac::HMAC_SHA256, "HS256");
        let keys = parse_jwks(&json!({ "keys": [hs.jwk("h")] }).to_string()).unwrap();
        let shown = format!("{keys:?}");
        assert!(!shown.contains(&b64(b"top-secret-hmac-key")) && shown.contains("oct"));
    }

    #[test]
    fn tokens_found_where_rules_look_and_the_head_rewritten() {
        let s = ec(false);
        let token = s.sign(
            None,
            &json!({"iss": "iss", "sub": "bob", "exp": NOW + 60, "grp": {"team": "blue", "n": 7}}),
        );
        let bearer = format!("Bearer {token}");
        // Default locations: the Authorization header (removed after success) …
        let r = rule("iss", &[s.jwk("k")]);
        let mut h = head(&[("authorization", &bearer), ("x-keep", "1")], None);
        let a = authenticate(&[&r], &mut h, NOW).unwrap().unwrap();
        assert_eq!(a.principal, "iss/bob");
        assert!(h.header("authorization").is_none());
        assert_eq!(h.header("x-keep"), Some("1"));
        // … with the scheme in any case; another scheme is no token at all.
        let mut h = head(&[("Authorization", &format!("bearer {token}"))], None);
        assert!(authenticate(&[&r], &mut h, NOW).unwrap().is_some());
        let mut h = head(&[("authorization", "Basic dXNlcjpwYXNz")], None);
        assert_eq!(authenticate(&[&r], &mut h, NOW), Ok(None));
        assert_eq!(h.header("authorization"), Some("Basic dXNlcjpwYXNz"));
        // … and `access_token` in the query (left there, as Envoy leaves it).
        let q = format!("a=1&access_token={token}");
        let mut h = head(&[], Some(&q));
        assert!(authenticate(&[&r], &mut h, NOW).unwrap().is_some());
        assert_eq!(h.query.as_deref(), Some(q.as_str()));
        // Custom locations replace the defaults.
        let mut r2 = JwtRule::new(
            "iss".into(),
            parse_jwks(&json!({"keys": [s.jwk("k")]}).to_string()).unwrap(),
            vec![
                Location::Header {
                    name: "x-jwt".into(),
                    prefix: String::new(),
                },
                Location::Cookie("session".into()),
            ],
        );
        r2.forward_original_token = true;
        r2.output_payload_to_header = Some("x-jwt-payload".into());
        r2.output_claim_to_headers = vec![
            ("x-sub".into(), vec!["sub".into()]),
            ("x-team".into(), vec!["grp".into(), "team".into()]),
            ("x-n".into(), vec!["grp".into(), "n".into()]),
            ("x-none".into(), vec!["grp".into()]),
        ];
        let mut h = head(&[("authorization", &bearer)], None);
        assert_eq!(authenticate(&[&r2], &mut h, NOW), Ok(None));
        let cookie = format!("a=b; session={token}; c=d");
        let mut h = head(&[("cookie", &cookie), ("x-sub", "spoofed")], None);
        assert!(authenticate(&[&r2], &mut h, NOW).unwrap().is_some());
        assert_eq!(h.header("cookie"), Some(cookie.as_str()));
        assert_eq!(h.header("x-jwt-payload"), token.split('.').nth(1));
        assert_eq!(h.header("x-sub"), Some("bob"));
        assert_eq!(h.header("x-team"), Some("blue"));
        assert_eq!(h.header("x-n"), Some("7"));
        assert_eq!(h.header("x-none"), None);
        assert_eq!(h.headers.iter().filter(|(n, _)| n == "x-sub").count(), 1);
        let mut h = head(&[("x-jwt", &token)], None);
        assert!(authenticate(&[&r2], &mut h, NOW).unwrap().is_some());
        assert_eq!(h.header("x-jwt"), Some(token.as_str()));
        // Every token must verify: a good one beside a bad one is refused.
        let other = ec(false).sign(None, &claims("iss", "eve"));
        let mut h = head(&[("authorization", &bearer), ("x-jwt", &other)], None);
        assert_eq!(
            authenticate(&[&r, &r2], &mut h, NOW),
            Err(Failure::VerificationFails)
        );
        assert!(
            h.header("authorization").is_some(),
            "a refused head is left as it was"
        );
        // A token of an issuer no rule looking there names.
        let mut h = head(
            &[(
                "authorization",
                &format!("Bearer {}", s.sign(None, &claims("x", "s"))),
            )],
            None,
        );
        assert_eq!(
            authenticate(&[&r], &mut h, NOW),
            Err(Failure::UnknownIssuer)
        );
        // No rules, or no token: nothing to do.
        assert_eq!(
            authenticate(&[], &mut head(&[("authorization", &bearer)], None), NOW),
            Ok(None)
        );
        assert_eq!(authenticate(&[&r], &mut head(&[], None), NOW), Ok(None));
    }

    #[test]
    fn verified_tokens_are_remembered_per_rule_until_they_expire() {
        let s = ec(false);
        let r = rule("iss", &[s.jwk("k")]);
        let token = s.sign(None, &json!({"iss": "iss", "sub": "c", "exp": NOW + 100}));
        let first = verify_cached(&token, &[&r], NOW).unwrap().1;
        let again = verify_cached(&token, &[&r], NOW + 1).unwrap().1;
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second check is the cached one"
        );
        // The cached entry still expires.
        assert_eq!(
            verify_cached(&token, &[&r], NOW + 100 + CLOCK_SKEW + 1).err(),
            Some(Failure::Expired)
        );
        // A rule with the same issuer but another key set (a reload) checks afresh.
        let r2 = rule("iss", &[ec(false).jwk("k")]);
        assert_eq!(
            verify_cached(&token, &[&r2], NOW).err(),
            Some(Failure::VerificationFails)
        );
    }
}
