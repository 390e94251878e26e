//! Lock-free snapshot publishing.
//!
//! The control side builds an immutable `T` and [`Publisher::publish`]es it. Each worker
//! holds a [`Subscriber`] that caches the current `Arc<T>`; [`Subscriber::current`] costs one
//! atomic load when nothing changed. A connection clones the `Arc` it started with and keeps
//! it, whatever is published later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

struct Shared<T> {
    current: ArcSwap<T>,
    version: AtomicU64,
}

/// The writing side; cheap to clone, `Send + Sync`.
pub struct Publisher<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Publisher<T> {
    fn clone(&self) -> Self {
        Publisher {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Publisher<T> {
    pub fn new(initial: T) -> Self {
        Publisher {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(initial),
                version: AtomicU64::new(1),
            }),
        }
    }

    /// Make `next` the current snapshot; returns its version.
    pub fn publish(&self, next: T) -> u64 {
        self.shared.current.store(Arc::new(next));
        // Release: a reader that sees the new version also sees the stored snapshot.
        self.shared.version.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn version(&self) -> u64 {
        self.shared.version.load(Ordering::Acquire)
    }

    /// The current snapshot (for the control side and diagnostics).
    pub fn load(&self) -> Arc<T> {
        self.shared.current.load_full()
    }

    /// A reader for one worker.
    pub fn subscribe(&self) -> Subscriber<T> {
        let version = self.version();
        Subscriber {
            shared: self.shared.clone(),
            cached: self.shared.current.load_full(),
            version,
        }
    }
}

/// A worker's cached view. Not shared between threads: each worker makes its own.
pub struct Subscriber<T> {
    shared: Arc<Shared<T>>,
    cached: Arc<T>,
    version: u64,
}

impl<T> Subscriber<T> {
    /// The newest snapshot; refreshes the cache only when the version moved.
    #[inline]
    pub fn current(&mut self) -> &Arc<T> {
        let v = self.shared.version.load(Ordering::Acquire);
        if v != self.version {
            self.cached = self.shared.current.load_full();
            self.version = v;
        }
        &self.cached
    }

    /// Version of the cached snapshot (as of the last `current()`).
    pub fn version(&self) -> u64 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A snapshot whose parts must agree: a torn or mixed read would break the checksum.
    struct Snap {
        id: u64,
        items: Vec<u64>,
        sum: u64,
    }

    fn make(id: u64) -> Snap {
        let items: Vec<u64> = (0..64)
            .map(|i| id.wrapping_mul(31).wrapping_add(i))
            .collect();
        let sum = items.iter().fold(0u64, |a, b| a.wrapping_add(*b));
        Snap { id, items, sum }
    }

    #[test]
    fn stress_readers_see_consistent_monotonic_snapshots() {
        let publisher = Publisher::new(make(0));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let mut sub = publisher.subscribe();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut last = 0u64;
                    let mut pinned: Vec<Arc<Snap>> = Vec::new();
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let s = sub.current().clone();
                        let sum = s.items.iter().fold(0u64, |a, b| a.wrapping_add(*b));
                        assert_eq!(sum, s.sum, "torn snapshot {}", s.id);
                        assert!(s.id >= last, "snapshot went back from {last} to {}", s.id);
                        last = s.id;
                        reads += 1;
                        // A "connection" keeps its snapshot while newer ones are published.
                        if reads % 1000 == 0 {
                            pinned.push(s);
                        }
                    }
                    for p in &pinned {
                        let sum = p.items.iter().fold(0u64, |a, b| a.wrapping_add(*b));
                        assert_eq!(sum, p.sum);
                    }
                    last
                })
            })
            .collect();
        for id in 1..=20_000u64 {
            publisher.publish(make(id));
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        let mut sub = publisher.subscribe();
        assert_eq!(sub.current().id, 20_000);
        assert_eq!(publisher.version(), 20_001);
    }
}
