//! Process-wide drain: SIGTERM/SIGINT start it, workers observe it without locks.
//!
//! First signal: every worker stops accepting; open connections may finish until the drain
//! deadline, then are cut; the process exits 0. Second signal: exit at once (status 130).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use atomic_waker::AtomicWaker;

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;

struct Inner {
    phase: AtomicU8,
    deadline: OnceLock<Instant>,
    /// One waker slot per waiting worker; replaced wholesale (rcu) when a worker registers.
    wakers: ArcSwap<Vec<Arc<AtomicWaker>>>,
}

/// Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Shutdown(Arc<Inner>);

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown(Arc::new(Inner {
            phase: AtomicU8::new(RUNNING),
            deadline: OnceLock::new(),
            wakers: ArcSwap::from_pointee(Vec::new()),
        }))
    }

    /// Begin draining with `timeout` for open connections. Idempotent: returns false if a
    /// drain had already begun.
    pub fn drain(&self, timeout: Duration) -> bool {
        let _ = self.0.deadline.set(Instant::now() + timeout);
        let first = self.0.phase.swap(DRAINING, Ordering::AcqRel) == RUNNING;
        for w in self.0.wakers.load().iter() {
            w.wake();
        }
        first
    }

    pub fn is_draining(&self) -> bool {
        self.0.phase.load(Ordering::Acquire) != RUNNING
    }

    /// When open connections must be closed, once draining.
    pub fn deadline(&self) -> Option<Instant> {
        self.0.deadline.get().copied()
    }

    /// A handle for one worker to await the start of the drain.
    pub fn watcher(&self) -> DrainWatcher {
        let slot = Arc::new(AtomicWaker::new());
        self.0.wakers.rcu(|v| {
            let mut v = Vec::clone(v);
            v.push(slot.clone());
            v
        });
        DrainWatcher {
            shutdown: self.clone(),
            slot,
        }
    }

    /// Install SIGTERM/SIGINT handlers on a background thread: the first signal drains with
    /// `timeout`, a second one exits the process at once with status 130.
    pub fn install_signal_handlers(&self, timeout: Duration) -> std::io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if me.drain(timeout) {
                        tracing::info!(
                            signal = sig,
                            ?timeout,
                            "draining: no new connections; open ones may finish"
                        );
                    } else {
                        tracing::warn!(signal = sig, "second signal: exiting now");
                        std::process::exit(130);
                    }
                }
            })?;
        Ok(())
    }
}

/// Awaits the start of a drain; owned by one worker.
pub struct DrainWatcher {
    shutdown: Shutdown,
    slot: Arc<AtomicWaker>,
}

impl DrainWatcher {
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Completes once draining has begun. The watcher has one waker slot: only one task may
    /// wait on it at a time (a second waiting task would take the slot and the first would
    /// never be woken). Several waiters need a watcher each, or a relay like the worker's.
    pub fn started(&self) -> DrainStarted<'_> {
        DrainStarted(self)
    }
}

pub struct DrainStarted<'a>(&'a DrainWatcher);

impl Future for DrainStarted<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.shutdown.is_draining() {
            return Poll::Ready(());
        }
        self.0.slot.register(cx.waker());
        if self.0.shutdown.is_draining() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
