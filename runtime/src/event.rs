//! Worker-local events: many tasks on one thread wait; one call wakes them all.
//! No atomics, no locks: these never leave the worker thread (`!Send`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use slab::Slab;

#[derive(Default)]
struct Inner {
    generation: Cell<u64>,
    set: Cell<bool>,
    waiters: RefCell<Slab<Waker>>,
}

/// An event that can be *notified* (wakes current waiters) or *set* (wakes everyone, now
/// and later). Cheap to clone.
#[derive(Clone, Default)]
pub struct LocalEvent(Rc<Inner>);

impl LocalEvent {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wake every task waiting now.
    pub fn notify(&self) {
        self.0
            .generation
            .set(self.0.generation.get().wrapping_add(1));
        self.wake_all();
    }

    /// Set for good: current and future waits complete at once.
    pub fn set(&self) {
        self.0.set.set(true);
        self.notify();
    }

    pub fn is_set(&self) -> bool {
        self.0.set.get()
    }

    fn wake_all(&self) {
        let wakers: Vec<Waker> = self.0.waiters.borrow_mut().drain().collect();
        for w in wakers {
            w.wake();
        }
    }

    /// A future that completes at the next `notify`/`set` after this call (or at once if set).
    pub fn wait(&self) -> Wait {
        Wait {
            ev: self.clone(),
            generation: self.0.generation.get(),
            key: None,
        }
    }
}

/// Future returned by [`LocalEvent::wait`].
pub struct Wait {
    ev: LocalEvent,
    generation: u64,
    key: Option<usize>,
}

impl Future for Wait {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &self.ev.0;
        if inner.set.get() || inner.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut waiters = inner.waiters.borrow_mut();
        match self.key {
            Some(k) if waiters.contains(k) => {
                if !waiters[k].will_wake(cx.waker()) {
                    waiters[k] = cx.waker().clone();
                }
            }
            _ => {
                let k = waiters.insert(cx.waker().clone());
                drop(waiters);
                self.key = Some(k);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        // After a notify the slab was drained and our key may belong to someone else now.
        let untouched = !self.ev.0.set.get() && self.ev.0.generation.get() == self.generation;
        if let (Some(k), true) = (self.key, untouched) {
            let mut w = self.ev.0.waiters.borrow_mut();
            if w.contains(k) {
                w.remove(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_and_set() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let ev = LocalEvent::new();
            let e2 = ev.clone();
            let h = monoio::spawn(async move {
                e2.wait().await;
                1
            });
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            ev.notify();
            assert_eq!(h.await, 1);
            ev.set();
            ev.wait().await; // set: completes at once
            assert!(ev.0.waiters.borrow().is_empty());
        });
    }
}
