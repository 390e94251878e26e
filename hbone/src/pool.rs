//! Per-worker HBONE connection pools, keyed by (source identity, destination identities,
//! destination address). No lock and nothing shared across cores: each worker owns its pool.
//!
//! A connection carries at most `max_streams_per_connection` streams; the next stream opens
//! another connection. Concurrent first requests share the connection being set up (its slot
//! is reserved before the handshake), so N simultaneous streams make ⌈N/max⌉ connections.
//! The stream sent with a new connection's setup belongs to the opener that reserved it; if
//! that opener is cancelled first, the stream is dropped (reset), not parked on the
//! connection.
//! A connection that ended (GOAWAY with its streams done, error, keepalive timeout) takes no
//! new streams; one unused for `pool_idle_timeout` is closed.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Instant;

use runtime::event::LocalEvent;
use runtime::listener::ListenOptions;

use crate::ca::WorkloadCert;
use crate::client::{answered_with, default_socket_options, Client, Early, FirstRequest};
use crate::error::HboneError;
use crate::identity::Identity;
use crate::settings::H2Settings;
use crate::stream::{H2Stream, StreamGuard};
use crate::tls::{self, TlsCounters};
use crate::wire::ConnectRequest;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity the tunnel acts for (our certificate).
    pub src: Identity,
    /// Identities the server may prove (any one).
    pub dst: Vec<Identity>,
    /// The HBONE server (`ip:15008`).
    pub addr: SocketAddr,
}

/// One key's connections and the leaf certificate they authenticate with.
#[derive(Default)]
struct Entry {
    /// The leaf certificate (DER) of the last stream opened for this key: every slot not
    /// retired was made with it. A stream with another one (a rotation) retires them all,
    /// so new streams go to a connection made with the new certificate. One compare per
    /// stream, not one per slot.
    leaf: Vec<u8>,
    slots: Vec<Rc<Slot>>,
}

struct Slot {
    client: RefCell<Option<Client>>,
    /// The stream of the request that made the connection, sent with its setup (one
    /// packet carries TLS Finished, h2 preface, SETTINGS and the CONNECT), for the opener
    /// that reserved the slot.
    first: RefCell<Option<FirstRequest>>,
    /// The opener that reserved the slot went away (its future was dropped, e.g. a
    /// cancelled caller) before taking [`Slot::first`]: the setup task drops the first
    /// stream instead of parking it, so h2 resets it and the peer closes its upstream.
    owner_gone: Cell<bool>,
    failed: RefCell<Option<String>>,
    ready: LocalEvent,
    active: Cell<usize>,
    retired: Cell<bool>,
    /// A stream has been opened on it: a later failure is the connection going away
    /// (GOAWAY, reset), worth a retry elsewhere; a first failure is a refusal, not retried.
    proven: Cell<bool>,
    last_used: Cell<Instant>,
}

impl Slot {
    /// The owner is done with the slot: a first stream it did not take is dropped now (h2
    /// sends RST_STREAM(CANCEL)), and one still being set up is dropped when it arrives.
    fn release_owner(&self) {
        self.owner_gone.set(true);
        let first = self.first.borrow_mut().take();
        drop(first);
    }

    /// Waits until the connection's setup has ended; its error, if it failed.
    async fn settled(&self, addr: SocketAddr) -> Result<(), HboneError> {
        if self.client.borrow().is_none() && self.failed.borrow().is_none() {
            self.ready.wait().await;
        }
        match self.failed.borrow().as_ref() {
            Some(msg) => Err(HboneError::Protocol(format!(
                "connection to {addr} failed: {msg}"
            ))),
            None => Ok(()),
        }
    }

    fn dead(&self) -> bool {
        self.retired.get()
            || self.failed.borrow().is_some()
            || self.client.borrow().as_ref().is_some_and(|c| c.is_closed())
    }
}

/// Held by a connection's setup task for its whole life: however the task ends (a panic
/// caught by `spawn_tracked`, the task dropped) the slot is settled. A setup that ended
/// with neither a client nor an error marks it failed, so its waiters get an error and the
/// next open makes a new connection instead of joining a slot that never becomes ready.
struct Setup(Rc<Slot>);

impl Drop for Setup {
    fn drop(&mut self) {
        let s = &self.0;
        if s.client.borrow().is_none() && s.failed.borrow().is_none() {
            *s.failed.borrow_mut() = Some("connection setup ended unexpectedly".into());
        }
        s.ready.set();
    }
}

/// Held by the opener that reserved a new connection's slot; see [`Slot::release_owner`].
struct Owner(Rc<Slot>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.release_owner();
    }
}

struct Inner {
    conns: RefCell<HashMap<PoolKey, Entry>>,
    settings: H2Settings,
    counters: Arc<TlsCounters>,
    /// For the sockets of new connections.
    socket: ListenOptions,
    connects: Cell<u64>,
    sweeper: Cell<bool>,
}

/// One worker's pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool(Rc<Inner>);

impl Pool {
    /// A pool whose connections use [`crate::client::default_socket_options`]; a worker's
    /// pool should be made with [`Pool::with_socket_options`].
    pub fn new(settings: H2Settings, counters: Arc<TlsCounters>) -> Self {
        Self::with_socket_options(settings, counters, default_socket_options())
    }

    /// A pool whose connections' sockets get `socket` (the worker's
    /// `WorkerCtx::listen_options`: nodelay, keepalive, `SO_RCVBUF`/`SO_SNDBUF`).
    pub fn with_socket_options(
        settings: H2Settings,
        counters: Arc<TlsCounters>,
        socket: ListenOptions,
    ) -> Self {
        Pool(Rc::new(Inner {
            conns: RefCell::new(HashMap::new()),
            settings,
            counters,
            socket,
            connects: Cell::new(0),
            sweeper: Cell::new(false),
        }))
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u64 {
        self.0.connects.get()
    }

    /// Live (not ended) connections for `key`.
    pub fn connections(&self, key: &PoolKey) -> usize {
        self.0
            .conns
            .borrow()
            .get(key)
            .map(|e| e.slots.iter().filter(|s| !s.dead()).count())
            .unwrap_or(0)
    }

    /// Open a CONNECT stream to `key.addr` acting as `cert` (whose identity must be
    /// `key.src`). A failure on a pooled connection that a new one could avoid (GOAWAY,
    /// connection gone) retires it and is retried on another, ending on a fresh one.
    pub async fn open(
        &self,
        key: &PoolKey,
        cert: &WorkloadCert,
        req: &ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        self.open_early(key, cert, req, None).await
    }

    /// [`Pool::open`], sending the client's first bytes ahead of the reply ([`Early`]);
    /// a retry sends them again on the stream it opens.
    pub async fn open_early(
        &self,
        key: &PoolKey,
        cert: &WorkloadCert,
        req: &ConnectRequest,
        mut early: Option<&mut Early<'_>>,
    ) -> Result<H2Stream, HboneError> {
        loop {
            let (slot, owner) = self.reserve(key, cert, req)?;
            // Runs however this iteration ends, cancellation included: the first stream
            // must not outlive the opener that asked for it.
            let _owner = owner.then(|| Owner(slot.clone()));
            let s2 = slot.clone();
            let guard = StreamGuard::new(move || {
                s2.active.set(s2.active.get() - 1);
                s2.last_used.set(Instant::now());
            });
            slot.settled(key.addr).await?;
            let first = if owner {
                slot.first.borrow_mut().take()
            } else {
                None
            };
            if let Some((resp, send)) = first {
                // A fresh connection's first stream: like any first failure on an
                // unproven connection, not retried.
                let mut s = answered_with(resp, send, early.as_deref_mut()).await?;
                slot.proven.set(true);
                s._guard = Some(guard);
                return Ok(s);
            }
            let client = slot
                .client
                .borrow()
                .clone()
                .expect("ready slot has a client");
            let proven = slot.proven.get();
            let opened = match client.send_connect(req).await {
                Ok((reply, send)) => answered_with(reply, send, early.as_deref_mut()).await,
                Err(e) => Err(e),
            };
            match opened {
                Ok(mut s) => {
                    slot.proven.set(true);
                    s._guard = Some(guard);
                    return Ok(s);
                }
                // Each retry retires the connection that failed, and only proven ones are
                // retried: after a GOAWAY on every pooled connection (a draining server),
                // the loop walks them once and ends on a fresh connection.
                Err(e) if proven && e.is_retryable() => {
                    slot.retired.set(true);
                    tracing::debug!(error = %e, addr = %key.addr, "pooled connection unusable; retrying on a new one");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A slot with room for one more stream; `true` when it is a new connection whose
    /// setup carries `req` (see [`Slot::first`]). A `req` whose header values cannot be
    /// sent is refused before any connection is made or shared (a protocol error).
    fn reserve(
        &self,
        key: &PoolKey,
        cert: &WorkloadCert,
        req: &ConnectRequest,
    ) -> Result<(Rc<Slot>, bool), HboneError> {
        self.start_sweeper();
        let leaf = cert.chain[0].as_ref();
        if let Some(s) = self.shared_slot(key, leaf) {
            return Ok((s, false));
        }
        // A new connection, its first request sent with its setup: built (and refused if
        // bad) before the slot exists, so no other opener shares a connection it fails.
        let first = crate::client::connect_request(req)?;
        let slot = self.new_slot(key, leaf);
        self.0.connects.set(self.0.connects.get() + 1);
        let tls = tls::client_config_to(cert, &key.dst, key.addr, self.0.settings.tls_resumption);
        let (addr, settings, counters, opts) = (
            key.addr,
            self.0.settings.clone(),
            self.0.counters.clone(),
            self.0.socket.clone(),
        );
        let setup = async move {
            match tls {
                Ok(tls) => {
                    Client::establish(addr, tls, &settings, &counters, &opts, Some(first)).await
                }
                Err(e) => Err(HboneError::Config(e)),
            }
        };
        spawn_setup(slot.clone(), self.0.counters.clone(), setup);
        Ok((slot, true))
    }

    /// A live connection for `key` with room for one more stream (counted in it); a stream
    /// with a new leaf certificate `leaf` (a rotation) first retires the key's connections.
    fn shared_slot(&self, key: &PoolKey, leaf: &[u8]) -> Option<Rc<Slot>> {
        let max = self.0.settings.max_streams_per_connection.max(1);
        let mut conns = self.0.conns.borrow_mut();
        // Looked up by reference: the key is cloned only for a new entry.
        let e = conns.get_mut(key)?;
        if e.leaf != leaf {
            for s in &e.slots {
                s.retired.set(true);
            }
            e.leaf.clear();
            e.leaf.extend_from_slice(leaf);
        }
        e.slots.retain(|s| !(s.dead() && s.active.get() == 0));
        let s = e.slots.iter().find(|s| !s.dead() && s.active.get() < max)?;
        s.active.set(s.active.get() + 1);
        Some(s.clone())
    }

    /// A slot for a new connection to `key` (its stream counted), shared by later streams
    /// from now on; its setup is to be spawned with [`spawn_setup`].
    fn new_slot(&self, key: &PoolKey, leaf: &[u8]) -> Rc<Slot> {
        let slot = Rc::new(Slot {
            client: RefCell::new(None),
            first: RefCell::new(None),
            owner_gone: Cell::new(false),
            failed: RefCell::new(None),
            ready: LocalEvent::new(),
            active: Cell::new(1),
            retired: Cell::new(false),
            proven: Cell::new(false),
            last_used: Cell::new(Instant::now()),
        });
        let mut conns = self.0.conns.borrow_mut();
        match conns.get_mut(key) {
            Some(e) => e.slots.push(slot.clone()),
            None => {
                conns.insert(
                    key.clone(),
                    Entry {
                        leaf: leaf.to_vec(),
                        slots: vec![slot.clone()],
                    },
                );
            }
        }
        slot
    }

    /// Close connections unused for the idle timeout (dropping the last handle of an h2
    /// connection sends GOAWAY and closes it).
    pub fn sweep(&self) {
        let idle = self.0.settings.pool_idle_timeout;
        let mut conns = self.0.conns.borrow_mut();
        for e in conns.values_mut() {
            e.slots.retain(|s| {
                s.active.get() > 0 || (!s.dead() && s.last_used.get().elapsed() < idle)
            });
        }
        conns.retain(|_, e| !e.slots.is_empty());
    }

    fn start_sweeper(&self) {
        if self.0.sweeper.replace(true) {
            return;
        }
        let weak: Weak<Inner> = Rc::downgrade(&self.0);
        let period =
            (self.0.settings.pool_idle_timeout / 4).max(std::time::Duration::from_millis(50));
        monoio::spawn(async move {
            loop {
                monoio::time::sleep(period).await;
                match weak.upgrade() {
                    Some(inner) => Pool(inner).sweep(),
                    None => return,
                }
            }
        });
    }
}

/// Runs a new connection's `setup` and settles its slot with the outcome: the client (and
/// the first stream, for an opener still there) or the error, which every opener waiting on
/// the slot gets. A [`Setup`] guard settles it however the task ends.
fn spawn_setup(
    slot: Rc<Slot>,
    counters: Arc<TlsCounters>,
    setup: impl std::future::Future<Output = Result<(Client, Option<FirstRequest>), HboneError>>
        + 'static,
) {
    runtime::busy::spawn_tracked(async move {
        let guard = Setup(slot);
        let s = &guard.0;
        match setup.await {
            Ok((c, first)) => {
                *s.client.borrow_mut() = Some(c);
                if !s.owner_gone.get() {
                    *s.first.borrow_mut() = first;
                }
            }
            Err(e) => {
                if matches!(e, HboneError::HandshakeTimeout { .. }) {
                    counters
                        .handshake_timeouts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // Every opener waiting on this slot gets the error; the slot is dead
                // (`failed`), so the next open makes a new connection.
                *s.failed.borrow_mut() = Some(e.to_string());
            }
        }
        // `guard` drops here: `ready` is set.
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connection setup that panics (caught by `spawn_tracked`) settles its slot as
    /// failed: every opener waiting on it gets an error instead of waiting forever, and the
    /// slot is no longer shared, so the next open makes a new connection.
    #[test]
    fn panicking_setup_fails_its_waiters_and_is_not_shared() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let counters = Arc::new(TlsCounters::default());
            let pool = Pool::new(H2Settings::default(), counters.clone());
            let key = PoolKey {
                src: Identity::new("cluster.local", "default", "client"),
                dst: vec![Identity::new("cluster.local", "default", "server")],
                addr: "127.0.0.1:15008".parse().expect("addr"),
            };
            let leaf = b"leaf".as_slice();
            let slot = pool.new_slot(&key, leaf);
            // A second opener joins the connection being set up.
            let joined = pool.shared_slot(&key, leaf).expect("joins the slot");
            assert!(Rc::ptr_eq(&slot, &joined));
            let addr = key.addr;
            let waiters: Vec<_> = [slot.clone(), joined]
                .into_iter()
                .map(|s| monoio::spawn(async move { s.settled(addr).await }))
                .collect();
            spawn_setup(slot.clone(), counters, async {
                panic!("connection setup panics (test)")
            });
            for w in waiters {
                let r = monoio::time::timeout(Duration::from_secs(30), w)
                    .await
                    .expect("a waiter is woken when the setup panics");
                let e = r.expect_err("the waiter gets an error");
                assert!(
                    e.to_string()
                        .contains("connection setup ended unexpectedly"),
                    "{e}"
                );
            }
            assert!(slot.dead());
            assert_eq!(pool.connections(&key), 0);
            assert!(
                pool.shared_slot(&key, leaf).is_none(),
                "the next open makes a new connection"
            );
        });
    }
}
