//! Circuit breakers per service: Istio's DestinationRule `trafficPolicy.connectionPool`,
//! enforced as Envoy enforces a cluster's circuit breakers (Istio's defaults: no limit).
//!
//! | field | here |
//! |---|---|
//! | `tcp.maxConnections` | upstream HTTP/1.1 connections carrying a request, and opaque TCP tunnels, to the service, all endpoints and workers ([`Limits::max_connections`]); a tunnel past it is reset at once |
//! | `http.http1MaxPendingRequests` | requests waiting for one of those ([`Limits::max_pending`]); past it `503` |
//! | `http.http2MaxRequests` | requests in flight to the service, any protocol ([`Limits::max_requests`]); past it `503` |
//! | `http.maxRetries` | retries in flight to the service ([`Limits::max_retries`]); past it the try's own answer is returned |
//! | `http.maxRequestsPerConnection` | requests one upstream HTTP/1.1 connection carries before it is closed |
//! | `tcp.connectTimeout` | bound on opening a new upstream connection (`503`, flag `UF`) |
//!
//! A request refused by a breaker gets Envoy's answer: `503` with `x-envoy-overloaded:
//! true`, body [`OVERFLOW_BODY`], response flag `UO` (in `istio_requests_total` and the
//! access log), and is counted in `waypoint_upstream_overflows_total{limit}`; it is not
//! retried and not held against an endpoint by outlier detection.
//!
//! The counters are shared by the workers (atomics, no lock). A request that finds the
//! connections at their limit waits, if pending requests are below theirs, for one of its
//! own worker's connections to that service to finish its request: that connection then
//! carries it (the slot is handed over, never released and re-taken). As in Envoy, whose
//! per-worker pools always allow a pool with no connection one (else its pending requests
//! could wait for a release that never comes on their worker), a worker with no connection
//! of the service in use takes one even at the limit: with `maxConnections: 1` and `n`
//! workers, up to `n` connections. The counters of a service live as long as its limits
//! stay the same across reloads ([`crate::config::WaypointConfig::adopt_breakers`]).
//! HTTP/2 upstreams (`useClientProtocol`) multiplex a worker's requests to an endpoint on
//! one connection: only `http2MaxRequests` and `maxRetries` bound them. An upgraded (`101`)
//! connection keeps its connection slot while it lives. A mirrored request counts against
//! its service's `http2MaxRequests` (not sent past it, as Envoy drops such a shadow), not
//! against its connections.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

/// The limits of one service (Istio's field names in the docs of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `tcp.maxConnections`.
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests`.
    pub max_pending: u32,
    /// `http.http2MaxRequests`.
    pub max_requests: u32,
    /// `http.maxRetries`.
    pub max_retries: u32,
    /// `http.maxRequestsPerConnection` (0: no limit).
    pub max_requests_per_connection: u32,
    /// `tcp.connectTimeout` (none: the HBONE pool's own bounds).
    pub connect_timeout: Option<Duration>,
}

impl Default for Limits {
    /// Istio's defaults: 2^32-1 everywhere, no per-connection limit.
    fn default() -> Self {
        Limits {
            max_connections: u32::MAX,
            max_pending: u32::MAX,
            max_requests: u32::MAX,
            max_retries: u32::MAX,
            max_requests_per_connection: 0,
            connect_timeout: None,
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Connections and pending requests both at their limits.
    Pending,
    /// `maxConnections`, for an opaque TCP tunnel (which does not wait).
    Connections,
    /// `http2MaxRequests`.
    Requests,
    /// `maxRetries` (the retry is not made).
    Retries,
}

impl Limit {
    /// Every limit, in the order of [`Limit::index`].
    pub const ALL: [Limit; 4] = [
        Limit::Pending,
        Limit::Connections,
        Limit::Requests,
        Limit::Retries,
    ];

    /// Its place in [`Limit::ALL`] (and in a counter per limit).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `limit` label of `waypoint_upstream_overflows_total`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Pending => "pending_requests",
            Limit::Connections => "connections",
            Limit::Requests => "requests",
            Limit::Retries => "retries",
        }
    }
}

/// The error a request refused by a breaker fails its try with ([`overflow_of`] finds it).
#[derive(Debug, thiserror::Error)]
#[error("circuit breaker overflow: {} limit reached", .0.label())]
pub struct Overflow(pub Limit);

impl From<Overflow> for io::Error {
    fn from(o: Overflow) -> io::Error {
        io::Error::other(o)
    }
}

/// The limit that refused the request failing with `e`, if a breaker did.
pub fn overflow_of(e: &io::Error) -> Option<Limit> {
    e.get_ref()?.downcast_ref::<Overflow>().map(|o| o.0)
}

/// The body of the `503` an overflow gets (Envoy's).
pub const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// A service's limits and what is in use against them, shared by the workers.
#[derive(Debug, Default)]
pub struct Breaker {
    pub limits: Limits,
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// One more on `n` if it is below `max`.
fn take(n: &AtomicU32, max: u32) -> bool {
    n.fetch_update(Relaxed, Relaxed, |v| (v < max).then_some(v + 1))
        .is_ok()
}

impl Breaker {
    pub fn new(limits: Limits) -> Breaker {
        Breaker {
            limits,
            ..Breaker::default()
        }
    }

    /// (connections, pending, requests, retries) in use now.
    pub fn in_use(&self) -> (u32, u32, u32, u32) {
        (
            self.connections.load(Relaxed),
            self.pending.load(Relaxed),
            self.requests.load(Relaxed),
            self.retries.load(Relaxed),
        )
    }

    /// A request in flight (`http2MaxRequests`), held until the token drops.
    pub fn request(self: &Arc<Self>) -> Result<Token, Overflow> {
        match take(&self.requests, self.limits.max_requests) {
            true => Ok(Token {
                breaker: self.clone(),
                retry: false,
            }),
            false => Err(Overflow(Limit::Requests)),
        }
    }

    /// A retry in flight (`maxRetries`), held until the token drops.
    pub fn retry(self: &Arc<Self>) -> Result<Token, Overflow> {
        match take(&self.retries, self.limits.max_retries) {
            true => Ok(Token {
                breaker: self.clone(),
                retry: true,
            }),
            false => Err(Overflow(Limit::Retries)),
        }
    }

    /// An upstream HTTP/1.1 connection for a request (`maxConnections`), waiting for one of
    /// this worker's (`local`) as a pending request (`http1MaxPendingRequests`) when all
    /// are in use. Cancel-safe: a wait dropped leaves the queue, and a slot handed to it
    /// meanwhile goes on to the next.
    pub async fn connection(self: &Arc<Self>, local: &Rc<Local>) -> Result<Slot, Overflow> {
        if let Ok(slot) = self.connection_now(local) {
            return Ok(slot);
        }
        if !take(&self.pending, self.limits.max_pending) {
            return Err(Overflow(Limit::Pending));
        }
        let waiter = Rc::new(Waiter::default());
        local.queue.borrow_mut().push_back(waiter.clone());
        let mut wait = Waiting {
            waiter,
            breaker: self,
            local,
            done: false,
        };
        std::future::poll_fn(|cx| {
            if wait.waiter.granted.get() {
                Poll::Ready(())
            } else {
                wait.waiter.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        wait.done = true;
        self.pending.fetch_sub(1, Relaxed);
        Ok(Slot {
            breaker: self.clone(),
            local: local.clone(),
        })
    }

    /// An upstream connection (`maxConnections`) at once or not at all: what an opaque TCP
    /// tunnel takes (Envoy's TCP proxy closes the connection on overflow), and a request
    /// first ([`Breaker::connection`]). A worker with none of the service's in use takes
    /// one even at the limit: nothing of its own would ever free a slot for a waiter there.
    pub fn connection_now(self: &Arc<Self>, local: &Rc<Local>) -> Result<Slot, Overflow> {
        if !take(&self.connections, self.limits.max_connections) {
            if local.in_use.get() > 0 {
                return Err(Overflow(Limit::Connections));
            }
            self.connections.fetch_add(1, Relaxed);
        }
        local.in_use.set(local.in_use.get() + 1);
        Ok(Slot {
            breaker: self.clone(),
            local: local.clone(),
        })
    }

    /// A slot given back: to the first request still waiting on this worker, else freed.
    fn release(&self, local: &Local) {
        loop {
            let next = local.queue.borrow_mut().pop_front();
            let Some(w) = next else { break };
            // Its wait was dropped: only the queue holds it.
            if Rc::strong_count(&w) == 1 {
                continue;
            }
            w.granted.set(true);
            if let Some(k) = w.waker.take() {
                k.wake();
            }
            return;
        }
        local.in_use.set(local.in_use.get().saturating_sub(1));
        self.connections.fetch_sub(1, Relaxed);
    }
}

/// A request or retry counted against its limit until dropped.
#[derive(Debug)]
pub struct Token {
    breaker: Arc<Breaker>,
    retry: bool,
}

impl Drop for Token {
    fn drop(&mut self) {
        let n = match self.retry {
            true => &self.breaker.retries,
            false => &self.breaker.requests,
        };
        n.fetch_sub(1, Relaxed);
    }
}

/// An upstream connection slot, given back (to a waiter first) when dropped.
pub struct Slot {
    breaker: Arc<Breaker>,
    local: Rc<Local>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.breaker.release(&self.local);
    }
}

/// One worker's side of one breaker: its connections in use and its pending requests.
#[derive(Default)]
pub struct Local {
    in_use: Cell<u32>,
    queue: RefCell<VecDeque<Rc<Waiter>>>,
}

#[derive(Default)]
struct Waiter {
    granted: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

/// A pending request's place in the queue while it waits.
struct Waiting<'a> {
    waiter: Rc<Waiter>,
    breaker: &'a Breaker,
    local: &'a Local,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.breaker.pending.fetch_sub(1, Relaxed);
        if self.waiter.granted.get() {
            // Handed a slot it will not use: to the next.
            self.breaker.release(self.local);
        }
    }
}

/// A breaker (kept alive while its address is the key) and this worker's side of it.
type LocalOf = (Arc<Breaker>, Rc<Local>);

/// A worker's [`Local`]s, by breaker (its address).
#[derive(Default)]
pub struct Locals(RefCell<HashMap<usize, LocalOf>>);

impl Locals {
    /// This worker's side of `b`.
    pub fn of(&self, b: &Arc<Breaker>) -> Rc<Local> {
        let key = Arc::as_ptr(b) as usize;
        let mut m = self.0.borrow_mut();
        if let Some((_, l)) = m.get(&key) {
            return l.clone();
        }
        if m.len() >= 64 {
            // Before a new entry: those of breakers of configurations gone (a reload changed
            // the limits), idle here. (Never on a look-up: a request pays no sweep.)
            m.retain(|_, (b, l)| {
                Arc::strong_count(b) > 1 || l.in_use.get() > 0 || !l.queue.borrow().is_empty()
            });
        }
        m.entry(key).or_insert((b.clone(), Rc::default())).1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Context;

    fn poll<F: Future>(f: &mut Pin<Box<F>>) -> Poll<F::Output> {
        f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    fn breaker(max_connections: u32, max_pending: u32) -> Arc<Breaker> {
        Arc::new(Breaker::new(Limits {
            max_connections,
            max_pending,
            ..Limits::default()
        }))
    }

    #[test]
    fn requests_and_retries_are_bounded_and_given_back() {
        let b = Arc::new(Breaker::new(Limits {
            max_requests: 2,
            max_retries: 1,
            ..Limits::default()
        }));
        let r1 = b.request().unwrap();
        let r2 = b.request().unwrap();
        assert_eq!(b.request().unwrap_err().0, Limit::Requests);
        drop(r1);
        let _r3 = b.request().unwrap();
        let t = b.retry().unwrap();
        assert_eq!(b.retry().unwrap_err().0, Limit::Retries);
        drop(t);
        drop(r2);
        assert_eq!(b.in_use(), (0, 0, 1, 0));
        let e: io::Error = Overflow(Limit::Requests).into();
        assert_eq!(overflow_of(&e), Some(Limit::Requests));
        assert_eq!(overflow_of(&io::Error::other("x")), None);
    }

    #[test]
    fn at_the_connection_limit_requests_wait_then_overflow() {
        let b = breaker(1, 1);
        let local = Rc::new(Local::default());
        let mut first = Box::pin(b.connection(&local));
        let Poll::Ready(Ok(s1)) = poll(&mut first) else {
            panic!("the first takes the free slot")
        };
        // The second waits (pending 1 of 1); the third overflows.
        let mut second = Box::pin(b.connection(&local));
        assert!(poll(&mut second).is_pending());
        assert_eq!(b.in_use(), (1, 1, 0, 0));
        let mut third = Box::pin(b.connection(&local));
        assert!(matches!(
            poll(&mut third),
            Poll::Ready(Err(Overflow(Limit::Pending)))
        ));
        // The first's slot goes to the second, still one connection in use.
        drop(s1);
        let Poll::Ready(Ok(s2)) = poll(&mut second) else {
            panic!("handed over")
        };
        assert_eq!(b.in_use(), (1, 0, 0, 0));
        drop(s2);
        assert_eq!(b.in_use(), (0, 0, 0, 0));
    }

    #[test]
    fn a_dropped_wait_leaves_the_queue_and_passes_a_slot_on() {
        let b = breaker(1, 10);
        let local = Rc::new(Local::default());
        let mut f = Box::pin(b.connection(&local));
        let Poll::Ready(Ok(s1)) = poll(&mut f) else {
            panic!()
        };
        let mut gone = Box::pin(b.connection(&local));
        assert!(poll(&mut gone).is_pending());
        let mut granted_then_dropped = Box::pin(b.connection(&local));
        assert!(poll(&mut granted_then_dropped).is_pending());
        let mut last = Box::pin(b.connection(&local));
        assert!(poll(&mut last).is_pending());
        assert_eq!(b.in_use(), (1, 3, 0, 0));
        // Cancelled while queued: passed over.
        drop(gone);
        assert_eq!(b.in_use(), (1, 2, 0, 0));
        drop(s1);
        // Handed the slot, then cancelled before it ran: the slot goes to `last`.
        drop(granted_then_dropped);
        let Poll::Ready(Ok(s)) = poll(&mut last) else {
            panic!("passed on")
        };
        assert_eq!(b.in_use(), (1, 0, 0, 0));
        drop(s);
        assert_eq!(b.in_use(), (0, 0, 0, 0));
    }

    #[test]
    fn an_opaque_tunnel_takes_a_connection_now_or_overflows() {
        let b = breaker(1, 10);
        let local = Rc::new(Local::default());
        let s = b.connection_now(&local).unwrap();
        assert!(matches!(
            b.connection_now(&local),
            Err(Overflow(Limit::Connections))
        ));
        // A request waits for it meanwhile, and gets it when the tunnel ends.
        let mut waiting = Box::pin(b.connection(&local));
        assert!(poll(&mut waiting).is_pending());
        drop(s);
        let Poll::Ready(Ok(s)) = poll(&mut waiting) else {
            panic!("handed over")
        };
        drop(s);
        assert_eq!(b.in_use(), (0, 0, 0, 0));
    }

    #[test]
    fn a_worker_with_no_connection_in_use_gets_one_at_the_limit() {
        let b = breaker(1, 0);
        let (a, other) = (Rc::new(Local::default()), Rc::new(Local::default()));
        let mut f = Box::pin(b.connection(&a));
        let Poll::Ready(Ok(_s1)) = poll(&mut f) else {
            panic!()
        };
        // Another worker: none of its own in use, so one even though the limit is reached.
        let mut g = Box::pin(b.connection(&other));
        let Poll::Ready(Ok(_s2)) = poll(&mut g) else {
            panic!()
        };
        assert_eq!(b.in_use().0, 2);
        // Back on the first worker, no pending allowed: overflow.
        let mut h = Box::pin(b.connection(&a));
        assert!(matches!(
            poll(&mut h),
            Poll::Ready(Err(Overflow(Limit::Pending)))
        ));
    }
}
