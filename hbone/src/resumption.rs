//! TLS 1.3 session resumption between HBONE peers, with no lock on the handshake path.
//!
//! **Server**: stateless tickets ([`Ticketer`]). Each server config gets its own AES-256-GCM
//! key, made when the config is built and never changed: rotating a certificate builds a new
//! config, so the key rotates with it, and tickets of the old config (or of another
//! server, another root) do not decrypt and fall back to a full handshake. A ticket carries
//! its expiry (authenticated, checked on decryption — rustls does not check a ticket's age
//! on the server), at most [`TICKET_LIFETIME`] after issue and never past the server
//! certificate chain's expiry. The client's certificate chain rides in the ticket (rustls
//! hands it back as `peer_certificates()`); [`check_resumed_peer`] refuses a resumed session
//! whose client certificate has expired since.
//!
//! **Client**: a session store per worker thread ([`ThreadSessions`]): a config is built and
//! cached per (our chain and key, roots, expected peer identities, key share) on one thread
//! (`tls::client_config_with`), and its store's tickets live in that thread's table under
//! the config's id, so a ticket is only offered again for the same source identity and the
//! same expected destination identities. Bounded: [`SESSION_SERVERS`] (config, server)
//! entries per thread, [`TICKETS_PER_SERVER`] tickets each; each ticket is used once.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::server::ProducesTickets;
use rustls::NamedGroup;
use rustls_pki_types::{CertificateDer, ServerName};

/// The longest a ticket is accepted after it was issued (and what its NewSessionTicket
/// says). Workload certificates live 24 h and are renewed at half life; an hour keeps a
/// ticket well inside one certificate's life and bounds how long a leaked ticket key
/// matters.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(3600);

/// (client config, server) pairs remembered per worker thread.
pub const SESSION_SERVERS: usize = 128;

/// Tickets kept per (client config, server): concurrent new connections to one server
/// each take one (a ticket is used once), and each connection brings one back.
pub const TICKETS_PER_SERVER: usize = 8;

const KEY_ID_LEN: usize = 8;
const HEADER_LEN: usize = KEY_ID_LEN + 8;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Stateless ticket encryption for one server config. Immutable but for a nonce counter
/// (an atomic, no lock): `key_id ‖ expiry ‖ nonce ‖ AES-256-GCM(session) ‖ tag`, with the
/// key id and expiry as associated data.
pub struct Ticketer {
    key: LessSafeKey,
    key_id: [u8; KEY_ID_LEN],
    /// The first four nonce bytes (random per key); the counter makes the other eight, so a
    /// nonce never repeats under this key.
    nonce_prefix: [u8; 4],
    counter: AtomicU64,
    /// Unix seconds: no ticket is valid past the server chain's expiry.
    not_after: u64,
    max_lifetime: u64,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticketer")
            .field("not_after", &self.not_after)
            .field("max_lifetime", &self.max_lifetime)
            .finish_non_exhaustive()
    }
}

impl Ticketer {
    /// A ticketer with a fresh random key whose tickets expire at most `max_lifetime` after
    /// issue and never after `not_after` (the server chain's expiry).
    pub fn new(not_after: SystemTime, max_lifetime: Duration) -> Result<Ticketer, rustls::Error> {
        let rng = SystemRandom::new();
        let fail = |_| rustls::Error::FailedToGetRandomBytes;
        let mut key = [0u8; 32];
        rng.fill(&mut key).map_err(fail)?;
        let mut key_id = [0u8; KEY_ID_LEN];
        rng.fill(&mut key_id).map_err(fail)?;
        let mut nonce_prefix = [0u8; 4];
        rng.fill(&mut nonce_prefix).map_err(fail)?;
        let key = UnboundKey::new(&AES_256_GCM, &key)
            .map_err(|_| rustls::Error::General("ticket key".into()))?;
        Ok(Ticketer {
            key: LessSafeKey::new(key),
            key_id,
            nonce_prefix,
            counter: AtomicU64::new(0),
            not_after: unix(not_after),
            max_lifetime: max_lifetime.as_secs(),
        })
    }

    /// Unix seconds at which a ticket issued at `now` expires; `None`: issue none.
    fn expiry(&self, now: u64) -> Option<u64> {
        let until = now.saturating_add(self.max_lifetime).min(self.not_after);
        (until > now).then_some(until)
    }

    fn header(&self, expires: u64) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..KEY_ID_LEN].copy_from_slice(&self.key_id);
        h[KEY_ID_LEN..].copy_from_slice(&expires.to_be_bytes());
        h
    }
}

impl ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        let now = unix_now();
        self.expiry(now)
            .map_or(0, |t| u32::try_from(t - now).unwrap_or(u32::MAX))
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let expires = self.expiry(unix_now())?;
        let n = self.counter.fetch_add(1, Relaxed);
        if n == u64::MAX {
            return None;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&self.nonce_prefix);
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let header = self.header(expires);
        let tag_len = AES_256_GCM.tag_len();
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plain.len() + tag_len);
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut out[HEADER_LEN + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, unix_now())
    }
}

impl Ticketer {
    /// [`ProducesTickets::decrypt`] at `now` (unix seconds).
    fn decrypt_at(&self, cipher: &[u8], now: u64) -> Option<Vec<u8>> {
        if cipher.len() < HEADER_LEN + NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (header, rest) = cipher.split_at(HEADER_LEN);
        if header[..KEY_ID_LEN] != self.key_id {
            return None;
        }
        let expires = u64::from_be_bytes(header[KEY_ID_LEN..].try_into().ok()?);
        if now >= expires {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain_len = self
            .key
            .open_in_place(nonce, Aad::from(header), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain_len);
        Some(buf)
    }
}

/// After a resumed server handshake: the client's leaf (from the ticket) must still be
/// within its validity. A full handshake checked it; a ticket may outlive it.
pub fn check_resumed_peer(chain: Option<&[CertificateDer<'static>]>) -> Result<(), rustls::Error> {
    let leaf = chain
        .and_then(|c| c.first())
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let info = crate::tls::leaf_info(leaf).map_err(rustls::Error::General)?;
    let now = SystemTime::now();
    if now < info.not_before {
        return Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidYet,
        ));
    }
    if now > info.not_after {
        return Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired,
        ));
    }
    Ok(())
}

struct Sessions {
    store: u64,
    server: ServerName<'static>,
    tickets: VecDeque<Tls13ClientSessionValue>,
}

struct Table {
    entries: Vec<Sessions>,
    next: usize,
}

thread_local! {
    static TABLE: RefCell<Table> = const {
        RefCell::new(Table {
            entries: Vec::new(),
            next: 0,
        })
    };
}

/// A client config's session store: its tickets live in the table of the thread that
/// stored them, under this store's id (see the module documentation). A config used on
/// another thread finds none there and makes full handshakes.
#[derive(Debug)]
pub struct ThreadSessions {
    id: u64,
}

impl ThreadSessions {
    pub fn new() -> ThreadSessions {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ThreadSessions {
            id: NEXT.fetch_add(1, Relaxed),
        }
    }

    /// Tickets held on this thread for `server` (tests and diagnostics).
    pub fn tickets_for(&self, server: &ServerName<'_>) -> usize {
        TABLE.with_borrow(|t| {
            t.entries
                .iter()
                .find(|e| e.store == self.id && e.server == *server)
                .map_or(0, |e| e.tickets.len())
        })
    }
}

impl Default for ThreadSessions {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ThreadSessions {
    fn drop(&mut self) {
        // Free this config's tickets on this thread (not during thread teardown).
        let id = self.id;
        let _ = TABLE.try_with(|t| {
            if let Ok(mut t) = t.try_borrow_mut() {
                t.entries.retain(|e| e.store != id);
                t.next = 0;
            }
        });
    }
}

impl ClientSessionStore for ThreadSessions {
    // Key shares are chosen by `tls::key_share_for` (per destination, after a
    // HelloRetryRequest), not by rustls's hint.
    fn set_kx_hint(&self, _: ServerName<'static>, _: NamedGroup) {}

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        None
    }

    // TLS 1.3 only.
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, server: ServerName<'static>, value: Tls13ClientSessionValue) {
        TABLE.with_borrow_mut(|t| {
            if let Some(e) = t
                .entries
                .iter_mut()
                .find(|e| e.store == self.id && e.server == server)
            {
                if e.tickets.len() == TICKETS_PER_SERVER {
                    e.tickets.pop_front();
                }
                e.tickets.push_back(value);
                return;
            }
            let e = Sessions {
                store: self.id,
                server,
                tickets: VecDeque::from([value]),
            };
            if t.entries.len() < SESSION_SERVERS {
                t.entries.push(e);
            } else {
                let i = t.next;
                t.entries[i] = e;
                t.next = (i + 1) % SESSION_SERVERS;
            }
        })
    }

    fn take_tls13_ticket(&self, server: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        TABLE.with_borrow_mut(|t| {
            t.entries
                .iter_mut()
                .find(|e| e.store == self.id && e.server == *server)
                // The newest ticket: the likeliest to be under the server's current key.
                .and_then(|e| e.tickets.pop_back())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticketer(life: Duration) -> Ticketer {
        Ticketer::new(SystemTime::now() + Duration::from_secs(7200), life).unwrap()
    }

    #[test]
    fn tickets_round_trip_only_under_their_own_key() {
        let (a, b) = (ticketer(TICKET_LIFETIME), ticketer(TICKET_LIFETIME));
        let t1 = a.encrypt(b"session one").unwrap();
        let t2 = a.encrypt(b"session one").unwrap();
        assert_ne!(t1, t2, "a fresh nonce per ticket");
        assert_eq!(a.decrypt(&t1).as_deref(), Some(&b"session one"[..]));
        assert_eq!(a.decrypt(&t2).as_deref(), Some(&b"session one"[..]));
        assert_eq!(b.decrypt(&t1), None, "another server's key");
        // Same key id, forged expiry or flipped bits: the tag fails.
        let mut later = t1.clone();
        later[KEY_ID_LEN] ^= 0x01;
        assert_eq!(a.decrypt(&later), None);
        let mut flipped = t1.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x80;
        assert_eq!(a.decrypt(&flipped), None);
        assert_eq!(a.decrypt(&t1[..20]), None, "truncated");
        assert_eq!(a.decrypt(&[]), None);
    }

    /// A resumed session whose client certificate has expired since (or is not valid yet)
    /// is refused with the certificate error a full handshake would give.
    #[test]
    fn resumed_peer_must_still_be_within_its_validity() {
        use crate::ca::SigningCa;
        let ca = SigningCa::generate_root("cluster.local").unwrap().0;
        let id = crate::Identity::new("cluster.local", "default", "client");
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        let valid = ca.mint(&id, now, day).unwrap();
        let expired = ca.mint(&id, now - 2 * day, day).unwrap();
        let future = ca.mint(&id, now + day, day).unwrap();
        check_resumed_peer(Some(&valid.chain)).expect("valid");
        assert!(matches!(
            check_resumed_peer(Some(&expired.chain)),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
            ))
        ));
        assert!(matches!(
            check_resumed_peer(Some(&future.chain)),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidYet
            ))
        ));
        assert!(matches!(
            check_resumed_peer(None),
            Err(rustls::Error::NoCertificatesPresented)
        ));
    }

    #[test]
    fn lifetime_is_bounded_by_the_server_chain() {
        let now = SystemTime::now();
        let t = Ticketer::new(now + Duration::from_secs(600), TICKET_LIFETIME).unwrap();
        assert!((590..=600).contains(&t.lifetime()), "{}", t.lifetime());
        let t = Ticketer::new(now + Duration::from_secs(86400), TICKET_LIFETIME).unwrap();
        assert_eq!(t.lifetime() as u64, TICKET_LIFETIME.as_secs());
        // An expired chain: no tickets at all.
        let t = Ticketer::new(now - Duration::from_secs(1), TICKET_LIFETIME).unwrap();
        assert_eq!(t.lifetime(), 0);
        assert_eq!(t.encrypt(b"x"), None);
        let t = ticketer(Duration::ZERO);
        assert_eq!(t.encrypt(b"x"), None, "zero lifetime issues nothing");
        // A ticket is refused from its expiry on, although its key is right.
        let t = ticketer(Duration::from_secs(60));
        let issued = unix_now();
        let tk = t.encrypt(b"x").unwrap();
        let expires = u64::from_be_bytes(tk[KEY_ID_LEN..HEADER_LEN].try_into().unwrap());
        assert!((issued + 60..=issued + 61).contains(&expires), "{expires}");
        assert_eq!(t.decrypt_at(&tk, expires - 1).as_deref(), Some(&b"x"[..]));
        assert_eq!(t.decrypt_at(&tk, expires), None);
    }
}
