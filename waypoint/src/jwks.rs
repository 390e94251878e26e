//! Key sets a RequestAuthentication rule names by `jwksUri` — or, with neither `jwks` nor
//! `jwksUri`, by its issuer's OpenID discovery document (`<issuer>/.well-known/
//! openid-configuration`, its `jwks_uri`) — fetched as istiod fetches them for Envoy: by
//! the waypoint's control thread, never on a worker.
//!
//! * **When**: at start (before the first snapshot is served, so tokens verify from the
//!   first request), for new URIs when the file is reloaded, and again every
//!   `waypoint.jwks_refresh` (default 20 min, istiod's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`)
//!   — a failed fetch is tried again after [`RETRY`]. A changed set is published as a new
//!   snapshot whose rules hold it (new rules: the verified-token cache does not answer for
//!   them, [`crate::jwt`]).
//! * **Failing**: a rule whose set was never fetched has no keys, so a token of its issuer
//!   is refused (`401 Jwks doesn't have key to match kid or alg from Jwt`, as istiod's
//!   fallback key set makes Envoy answer) and a request without a token still passes; a
//!   failed refresh keeps the last good set. Each fetch and failure is logged and counted
//!   (`waypoint_jwks_fetches`, `waypoint_jwks_fetch_errors`).
//! * **How**: HTTP/1.1 `GET` over `http://` or `https://` (TLS 1.3; the roots of
//!   `waypoint.jwks_ca` when set, else the system's: `SSL_CERT_FILE`, else the usual bundle
//!   files), the rule's `timeout` (default 5 s) for connect and each read, `200` only (no
//!   redirect followed), a body of at most [`MAX_BODY`], Content-Length, chunked or to the
//!   end of the connection; the body must be a key set the waypoint accepts
//!   ([`crate::jwt::parse_jwks`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::WaypointConfig;
use crate::jwt::{parse_jwks, JwtRule};
use crate::service::Counters;

/// istiod's default refresh interval.
pub const REFRESH: Duration = Duration::from_secs(20 * 60);
/// A failed fetch is tried again after this long.
pub const RETRY: Duration = Duration::from_secs(30);
/// The default of a rule's `timeout`.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set or discovery document read.
pub const MAX_BODY: usize = 1 << 20;

/// Where a rule's key set comes from, when it is not inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `jwksUri`.
    Uri(String),
    /// The issuer's OpenID discovery document.
    Discovery,
}

/// A rule's fetched key set: where from, how long a fetch may take, and which fetch its
/// keys came from (0: none yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub source: Source,
    pub timeout: Duration,
    pub generation: u64,
}

impl Remote {
    /// The cache key: the URI, or the issuer's discovery.
    fn key(&self, issuer: &str) -> String {
        match &self.source {
            Source::Uri(u) => u.clone(),
            Source::Discovery => format!("discovery:{issuer}"),
        }
    }
}

struct Entry {
    /// The last key set fetched and accepted (JSON).
    text: Option<Arc<str>>,
    /// Counts changes of `text`.
    generation: u64,
    /// When to fetch again.
    due: Instant,
}

/// The control thread's fetched key sets, by URI.
pub struct Fetcher {
    refresh: Duration,
    ca: Option<PathBuf>,
    sets: HashMap<String, Entry>,
    counters: Option<Arc<Counters>>,
    /// Counts made before `counters` was given (the fetches at start).
    early: (u64, u64),
}

impl Fetcher {
    /// Refresh every `refresh`; `ca`: PEM roots for `https://` instead of the system's.
    pub fn new(refresh: Duration, ca: Option<PathBuf>) -> Fetcher {
        Fetcher {
            refresh,
            ca,
            sets: HashMap::new(),
            counters: None,
            early: (0, 0),
        }
    }

    /// [`Fetcher::new`] with the settings document's `jwks_refresh` and `jwks_ca` (the
    /// defaults without one).
    pub fn for_config(cfg: &WaypointConfig) -> Fetcher {
        match &cfg.settings {
            Some(s) => Fetcher::new(s.waypoint.jwks_refresh, s.waypoint.jwks_ca.clone()),
            None => Fetcher::new(REFRESH, None),
        }
    }

    /// Count in `c` from now on (with what was counted before).
    pub fn count_in(&mut self, c: Arc<Counters>) {
        c.jwks_fetches.fetch_add(self.early.0, Relaxed);
        c.jwks_fetch_errors.fetch_add(self.early.1, Relaxed);
        self.counters = Some(c);
    }

    fn count(&mut self, ok: bool) {
        match &self.counters {
            Some(c) => {
                c.jwks_fetches.fetch_add(1, Relaxed);
                if !ok {
                    c.jwks_fetch_errors.fetch_add(1, Relaxed);
                }
            }
            None => {
                self.early.0 += 1;
                self.early.1 += u64::from(!ok);
            }
        }
    }

    /// Whether some key set is due for a fetch.
    pub fn due(&self, now: Instant) -> bool {
        self.sets.values().any(|e| e.due <= now)
    }

    /// Give every remote rule of `cfg` its key set, fetching those not fetched yet or due;
    /// whether any rule's keys changed. Sets no rule names any more are forgotten.
    pub fn resolve(&mut self, cfg: &mut WaypointConfig, now: Instant) -> bool {
        let mut changed = false;
        let mut used = vec![];
        for authn in cfg.request_authns.iter_mut() {
            for rule in authn.rules.iter_mut() {
                let Some(remote) = &rule.remote else { continue };
                let key = remote.key(&rule.issuer);
                if self.sets.get(&key).is_none_or(|e| e.due <= now) {
                    self.fetch_into(&key, remote, &rule.issuer, now);
                }
                let Some(e) = self.sets.get(&key) else {
                    continue;
                };
                if e.generation != remote.generation {
                    let keys = e
                        .text
                        .as_deref()
                        .map_or_else(Vec::new, |t| parse_jwks(t).unwrap_or_default());
                    *rule = Arc::new(rule.with_keys(keys, e.generation));
                    changed = true;
                }
                used.push(key);
            }
        }
        self.sets.retain(|k, _| used.contains(k));
        changed
    }

    fn fetch_into(&mut self, key: &str, remote: &Remote, issuer: &str, now: Instant) {
        let got = self.fetch_set(&remote.source, issuer, remote.timeout);
        self.count(got.is_ok());
        let entry = self.sets.entry(key.to_string()).or_insert(Entry {
            text: None,
            generation: 0,
            due: now,
        });
        match got {
            Ok((uri, text)) => {
                let n = parse_jwks(&text).map_or(0, |k| k.len());
                tracing::info!(uri = %uri, issuer, keys = n, "JWKS fetched");
                if entry.text.as_deref() != Some(text.as_str()) {
                    entry.text = Some(text.into());
                    entry.generation += 1;
                }
                entry.due = now + self.refresh;
            }
            Err(e) => {
                tracing::warn!(issuer, source = ?remote.source, error = %e, kept = entry.text.is_some(), "JWKS fetch failed: tokens of this issuer are refused until a key set is fetched (a set fetched before is kept)");
                entry.due = now + RETRY.min(self.refresh);
            }
        }
    }

    /// The key set of `source` (its URI, its text), checked to be one the waypoint takes.
    fn fetch_set(
        &self,
        source: &Source,
        issuer: &str,
        timeout: Duration,
    ) -> Result<(String, String), String> {
        let uri = match source {
            Source::Uri(u) => u.clone(),
            Source::Discovery => {
                let doc = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let text = get(&doc, timeout, self.ca.as_deref())?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("{doc}: not JSON: {e}"))?;
                v.get("jwks_uri")
                    .and_then(|u| u.as_str())
                    .ok_or_else(|| format!("{doc}: no \"jwks_uri\""))?
                    .to_string()
            }
        };
        let text = get(&uri, timeout, self.ca.as_deref())?;
        parse_jwks(&text).map_err(|e| format!("{uri}: {e}"))?;
        Ok((uri, text))
    }
}

/// `uri` checked as one the waypoint can fetch (`http://` or `https://`, with a host).
pub fn check_uri(uri: &str) -> Result<(), String> {
    parse_uri(uri).map(|_| ())
}

struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// `Host` field value.
    authority: String,
    path: String,
}

fn parse_uri(uri: &str) -> Result<Target, String> {
    let u: http::Uri = uri.parse().map_err(|e| format!("{uri:?}: {e}"))?;
    let tls = match u.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{uri:?}: http:// or https:// only")),
    };
    let a = u.authority().ok_or_else(|| format!("{uri:?}: no host"))?;
    let host = a.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || a.as_str().contains('@') {
        return Err(format!("{uri:?}: no host (or user information)"));
    }
    Ok(Target {
        tls,
        host: host.to_string(),
        port: a.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        authority: a.as_str().to_string(),
        path: u.path_and_query().map_or("/", |p| p.as_str()).to_string(),
    })
}

/// The roots for `https://`: `ca`, else `SSL_CERT_FILE`, else the first usual bundle file
/// (none: an error ending with `hint`, how to name one).
pub(crate) fn roots(ca: Option<&Path>, hint: &str) -> Result<rustls::RootCertStore, String> {
    let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let file = match (ca, env) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(e)) => e,
        (None, None) => [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/ca-bundle.pem",
            "/etc/ssl/cert.pem",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| format!("no trusted roots: {hint}"))?,
    };
    let mut store = rustls::RootCertStore::empty();
    for c in hbone::ca::pem_certs(&file).map_err(|e| e.to_string())? {
        // A bundle may hold a certificate webpki cannot use as a root: not fatal.
        let _ = store.add(c);
    }
    if store.is_empty() {
        return Err(format!("{}: no usable root certificate", file.display()));
    }
    Ok(store)
}

/// `GET uri`: the body of a `200` answer.
pub fn get(uri: &str, timeout: Duration, ca: Option<&Path>) -> Result<String, String> {
    let t = parse_uri(uri)?;
    let fail = |e: &dyn std::fmt::Display| format!("{uri}: {e}");
    let deadline = Instant::now() + timeout;
    let addrs: Vec<_> = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| fail(&e))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp
        .ok_or_else(|| fail(&last.map_or("timed out connecting".to_string(), |e| e.to_string())))?;
    tcp.set_read_timeout(Some(timeout)).map_err(|e| fail(&e))?;
    tcp.set_write_timeout(Some(timeout)).map_err(|e| fail(&e))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\naccept: application/json\r\nuser-agent: waypoint\r\nconnection: close\r\n\r\n",
        t.path, t.authority
    );
    let body = if t.tls {
        let config = rustls::ClientConfig::builder_with_provider(hbone::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| fail(&e))?
            .with_root_certificates(roots(ca, "set waypoint.jwks_ca or SSL_CERT_FILE")?)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|e| fail(&e))?;
        let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| fail(&e))?;
        exchange(rustls::StreamOwned::new(conn, tcp), &request, deadline)
    } else {
        exchange(tcp, &request, deadline)
    };
    body.map_err(|e| fail(&e))
}

/// Send `request`, read the answer: the body of a `200`.
fn exchange(mut s: impl Read + Write, request: &str, deadline: Instant) -> Result<String, String> {
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    s.flush().map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(body) = complete(&buf, false)? {
            return Ok(body);
        }
        if Instant::now() > deadline {
            return Err("timed out reading the answer".into());
        }
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            // A TLS peer closing without close_notify: the end of the answer all the same.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e.to_string()),
        };
        if n == 0 {
            return complete(&buf, true)?.ok_or_else(|| "the answer ended early".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_BODY + 64 * 1024 {
            return Err(format!("answer larger than {MAX_BODY} bytes"));
        }
    }
}

/// The body of the answer in `buf` once it is all there (`ended`: the connection has
/// ended); an error for a status other than `200` or a bad answer.
fn complete(buf: &[u8], ended: bool) -> Result<Option<String>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let size = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad answer: {e}")),
    };
    if r.code != Some(200) {
        return Err(format!("status {}", r.code.unwrap_or(0)));
    }
    let field = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = &buf[size..];
    let body = if field("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        match crate::service::chunked_end(rest) {
            Some(end) => crate::h2srv::dechunk(&rest[..end]).ok_or("bad chunked body")?,
            None if ended => return Err("the chunked body ended early".into()),
            None => return Ok(None),
        }
    } else if let Some(len) = field("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        if len > MAX_BODY {
            return Err(format!("answer larger than {MAX_BODY} bytes"));
        }
        if rest.len() < len {
            return if ended {
                Err("the body ended early".into())
            } else {
                Ok(None)
            };
        }
        rest[..len].to_vec()
    } else if ended {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    String::from_utf8(body)
        .map(Some)
        .map_err(|_| "the body is not UTF-8".into())
}

impl JwtRule {
    /// This rule with `keys` from fetch `generation` (a new rule: a new cache key).
    pub fn with_keys(&self, keys: Vec<crate::jwt::Jwk>, generation: u64) -> JwtRule {
        let mut r = JwtRule::new(self.issuer.clone(), keys, self.from.clone());
        r.audiences = self.audiences.clone();
        r.forward_original_token = self.forward_original_token;
        r.output_payload_to_header = self.output_payload_to_header.clone();
        r.output_claim_to_headers = self.output_claim_to_headers.clone();
        r.remote = self.remote.clone().map(|mut m| {
            m.generation = generation;
            m
        });
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_by_their_framing() {
        let ok = |s: &str, ended| complete(s.as_bytes(), ended);
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", false),
            Ok(Some("{}".into()))
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n{}", false),
            Ok(None)
        );
        assert!(ok("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n{}", true).is_err());
        assert_eq!(
            ok(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                false
            ),
            Ok(Some("{}".into()))
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\n\r\n{\"keys\"", false), Ok(None));
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\n\r\n{\"keys\"", true),
            Ok(Some("{\"keys\"".into()))
        );
        assert_eq!(
            ok("HTTP/1.1 302 Found\r\nlocation: /x\r\n\r\n", false),
            Err("status 302".into())
        );
        assert!(ok("HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\n\r\n", false).is_err());
    }

    #[test]
    fn uris_the_waypoint_fetches() {
        assert!(check_uri("https://idp.example/.well-known/jwks.json").is_ok());
        assert!(check_uri("http://127.0.0.1:8080/keys?x=1").is_ok());
        let t = parse_uri("http://[::1]:81/k").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 81, "/k")
        );
        for bad in [
            "ftp://x/y",
            "/keys",
            "https://user@idp/",
            "idp.example/keys",
        ] {
            assert!(check_uri(bad).is_err(), "{bad}");
        }
    }
}
