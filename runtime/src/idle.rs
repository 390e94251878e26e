//! Idle timeouts of forwarded connections: one sweeper task per worker thread (and timeout
//! value) instead of a timer per connection.
//!
//! A monoio timer is a 512-byte entry, aligned to 128 bytes, inside the future that awaits
//! it, and it pads the futures around it to that alignment: [`drive`](crate::forward::drive)
//! held one per connection, about 0.9 kB of every idle connection. Here a connection holds a
//! slot in its thread's table (its waker and three small fields) and an [`IdleWatch`] in its
//! future (a handle, a key and the byte total it saw last).
//!
//! - The owner calls [`IdleWatch::poll`] on every poll of its future with the bytes moved so
//!   far, both ways added. The first call takes a slot; a total that changed since the last
//!   call marks the slot *active*.
//! - The sweeper of that timeout wakes every `idle / TICKS`. A sweep clears each active mark,
//!   or counts one more quiet sweep; the [`TICKS`]th quiet sweep in a row marks the slot
//!   *idle* and wakes its task, whose next [`IdleWatch::poll`] returns `Ready` — unless that
//!   poll saw bytes move: then the slot is active again and the count starts over.
//! - **Precision**: bytes that moved between two sweeps are seen by the next one, and
//!   [`TICKS`] quiet sweeps follow it: the timeout fires between `idle` and
//!   `idle + idle / TICKS` (`idle + idle/4`) after the last byte moved, plus the worker's
//!   delay in running its timers (monoio timers have millisecond granularity). The timer per
//!   connection this replaces looked at the counters once every `idle`, so it fired between
//!   `idle` and `2 × idle`. Envoy and HAProxy likewise check idle timeouts at a coarse tick.
//! - Dropping the watch frees the slot: no wake reaches a connection after that. A sweep
//!   that finds the table empty ends the sweeper; the next registration starts a new one.
//! - Thread-local, without locks: a worker's connections and its sweepers share its thread.
//! - monoio leaks the tasks still pending when a runtime is dropped, a sweeper among them. A
//!   thread that later runs another runtime (tests may; workers run one for their life)
//!   would find a sweeper that never runs again: a registration that finds its sweeper more
//!   than a tick overdue starts a new one, and an epoch tells a sweeper that was only late to
//!   stop. Slots taken in between wait for that next registration. A slot of a leaked task is
//!   never polled again, so never freed; its wake, when swept, is dropped by monoio (the task
//!   belongs to a runtime that is gone).

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

/// Sweeps per idle timeout: the sweep period is `idle / TICKS`, and a connection is idle at
/// the `TICKS`th sweep in a row that finds it quiet.
pub const TICKS: u8 = 4;

/// Shortest sweep period (monoio timers have millisecond granularity).
const MIN_TICK: Duration = Duration::from_millis(1);

/// One connection's entry in its thread's table.
struct Slot {
    /// Woken when the slot is marked idle (taken then; stored again by the next poll).
    waker: Option<Waker>,
    /// Bytes moved since the last sweep (or the slot is new).
    active: bool,
    /// Sweeps in a row that found it quiet.
    quiet: u8,
    /// Marked idle by a sweep.
    idle: bool,
}

/// The slots of one timeout value on one thread, and the rule that sweeps them (no clock,
/// no timer: tested by calling [`Table::sweep`]).
#[derive(Default)]
struct Table {
    slots: Slab<Slot>,
}

impl Table {
    fn insert(&mut self, waker: Waker) -> usize {
        self.slots.insert(Slot {
            waker: Some(waker),
            active: true,
            quiet: 0,
            idle: false,
        })
    }

    /// The owner's poll: `moved` whether bytes moved since its last one. Returns whether the
    /// slot is idle, and a waker it replaced (for the caller to drop outside the borrow).
    fn poll(&mut self, key: usize, moved: bool, waker: &Waker) -> (bool, Option<Waker>) {
        let s = &mut self.slots[key];
        if moved {
            s.active = true;
            s.idle = false;
        } else if s.idle {
            return (true, None);
        }
        match &s.waker {
            Some(w) if w.will_wake(waker) => (false, None),
            _ => (false, s.waker.replace(waker.clone())),
        }
    }

    /// One sweep: the wakers of the slots it marks idle go to `woken`.
    fn sweep(&mut self, woken: &mut Vec<Waker>) {
        for (_, s) in self.slots.iter_mut() {
            if s.idle {
                continue;
            }
            if s.active {
                s.active = false;
                s.quiet = 0;
                continue;
            }
            s.quiet += 1;
            if s.quiet >= TICKS {
                s.idle = true;
                woken.extend(s.waker.take());
            }
        }
    }
}

/// The table and sweeper task of one timeout value on one thread.
struct Sweeper {
    idle: Duration,
    tick: Duration,
    table: RefCell<Table>,
    /// Which sweeper task is the current one (a task of an older epoch stops when it wakes).
    epoch: Cell<u64>,
    /// A sweeper task was started and not stopped.
    running: Cell<bool>,
    /// When the current sweeper task is expected next (`None`: beyond what `Instant` holds).
    due: Cell<Option<Instant>>,
    /// The current sweeper task, woken to stop.
    task: RefCell<Option<Waker>>,
    /// Sweeps done (all epochs).
    sweeps: Cell<u64>,
}

thread_local! {
    /// This thread's sweepers, one per timeout value in use.
    static SWEEPERS: RefCell<Vec<Rc<Sweeper>>> = const { RefCell::new(Vec::new()) };
}

impl Sweeper {
    /// This thread's sweeper for `idle` (created if there is none; stopped ones of other
    /// timeouts are let go then).
    fn of(idle: Duration) -> Rc<Sweeper> {
        SWEEPERS.with(|all| {
            let mut all = all.borrow_mut();
            if let Some(s) = all.iter().find(|s| s.idle == idle) {
                return s.clone();
            }
            all.retain(|s| s.running.get());
            let s = Rc::new(Sweeper {
                idle,
                tick: (idle / u32::from(TICKS)).max(MIN_TICK),
                table: RefCell::default(),
                epoch: Cell::new(0),
                running: Cell::new(false),
                due: Cell::new(None),
                task: RefCell::new(None),
                sweeps: Cell::new(0),
            });
            all.push(s.clone());
            s
        })
    }

    /// Start a sweeper task unless one runs and is at most a tick overdue.
    fn ensure_running(self: &Rc<Self>) {
        let now = Instant::now();
        if self.running.get() {
            match self.due.get().and_then(|d| d.checked_add(self.tick)) {
                Some(late) if now > late => {}
                _ => return,
            }
        }
        self.stop();
        self.running.set(true);
        self.due.set(now.checked_add(self.tick));
        drop(monoio::spawn(self.clone().run(self.epoch.get())));
    }

    /// Stop the current sweeper task (it ends when it next runs).
    fn stop(&self) {
        self.running.set(false);
        self.epoch.set(self.epoch.get() + 1);
        let task = self.task.borrow_mut().take();
        if let Some(w) = task {
            w.wake();
        }
    }

    async fn run(self: Rc<Self>, epoch: u64) {
        let mut woken = Vec::new();
        loop {
            let mut sleep = pin!(monoio::time::sleep(self.tick));
            let stopped = poll_fn(|cx| {
                if self.epoch.get() != epoch {
                    return Poll::Ready(true);
                }
                let mut task = self.task.borrow_mut();
                if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *task = Some(cx.waker().clone());
                }
                drop(task);
                sleep.as_mut().poll(cx).map(|()| false)
            })
            .await;
            if stopped {
                return;
            }
            self.sweeps.set(self.sweeps.get() + 1);
            self.table.borrow_mut().sweep(&mut woken);
            self.due.set(Instant::now().checked_add(self.tick));
            for w in woken.drain(..) {
                w.wake();
            }
        }
    }
}

/// A connection's slot, freed on drop; the last one stops the sweeper.
struct Registration {
    sweeper: Rc<Sweeper>,
    key: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut table = self.sweeper.table.borrow_mut();
        let slot = table.slots.remove(self.key);
        let empty = table.slots.is_empty();
        drop(table);
        // Stopped at once rather than at its next sweep: a runtime that ends now (its
        // pending tasks are leaked) leaves no sweeper that seems to run to the next one.
        if empty {
            self.sweeper.stop();
        }
        // Its waker is dropped outside the borrow.
        drop(slot);
    }
}

/// The idle timeout of one connection: call [`IdleWatch::poll`] on every poll of the future
/// that owns it. See the module documentation for how and when it fires.
pub struct IdleWatch {
    idle: Duration,
    /// The byte total of the last poll.
    last: u64,
    reg: Option<Registration>,
}

impl IdleWatch {
    /// A watch that fires once nothing moved for `idle` (takes its slot at the first poll).
    pub fn new(idle: Duration) -> Self {
        IdleWatch {
            idle,
            last: 0,
            reg: None,
        }
    }

    /// Give up the slot now (a later `poll` takes a new one).
    pub fn release(&mut self) {
        self.reg = None;
    }

    /// `total`: the bytes moved so far (any monotonic count; only changes matter). `Ready`
    /// once the timeout fired; the owner's task is woken for it.
    pub fn poll(&mut self, cx: &mut Context<'_>, total: u64) -> Poll<()> {
        let moved = total != self.last;
        self.last = total;
        let Some(reg) = &self.reg else {
            let sweeper = Sweeper::of(self.idle);
            let key = sweeper.table.borrow_mut().insert(cx.waker().clone());
            sweeper.ensure_running();
            self.reg = Some(Registration { sweeper, key });
            return Poll::Pending;
        };
        let (idle, replaced) = reg
            .sweeper
            .table
            .borrow_mut()
            .poll(reg.key, moved, cx.waker());
        drop(replaced);
        if idle {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Connections watched on this thread with timeout `idle`.
pub fn watched(idle: Duration) -> usize {
    SWEEPERS.with(|all| {
        all.borrow()
            .iter()
            .find(|s| s.idle == idle)
            .map_or(0, |s| s.table.borrow().slots.len())
    })
}

/// Sweeps done on this thread for timeout `idle` (0 when no sweeper for it is left).
pub fn sweeps(idle: Duration) -> u64 {
    SWEEPERS.with(|all| {
        all.borrow()
            .iter()
            .find(|s| s.idle == idle)
            .map_or(0, |s| s.sweeps.get())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::{drive, DirEnd, End};
    use std::future::{pending, Future};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    /// A waker that counts its wakes.
    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn counter() -> (Arc<Counter>, Waker) {
        let c = Arc::new(Counter(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }
    fn wakes(c: &Counter) -> usize {
        c.0.load(Ordering::Relaxed)
    }

    /// Sweep `t` once and wake what it marked.
    fn sweep(t: &mut Table) {
        let mut woken = Vec::new();
        t.sweep(&mut woken);
        woken.into_iter().for_each(Waker::wake);
    }

    #[test]
    fn a_quiet_slot_is_marked_at_the_ticks_th_quiet_sweep_and_woken_once() {
        let (c, w) = counter();
        let mut t = Table::default();
        let k = t.insert(w.clone());
        // The first sweep sees the registration as activity; TICKS quiet ones follow.
        for _ in 0..TICKS {
            sweep(&mut t);
            assert!(!t.poll(k, false, &w).0);
        }
        assert_eq!(wakes(&c), 0);
        sweep(&mut t);
        assert_eq!(wakes(&c), 1);
        assert!(t.poll(k, false, &w).0);
        for _ in 0..3 * TICKS {
            sweep(&mut t);
        }
        assert_eq!(wakes(&c), 1, "woken once");
    }

    #[test]
    fn bytes_in_every_sweep_period_keep_a_slot() {
        let (c, w) = counter();
        let mut t = Table::default();
        let k = t.insert(w.clone());
        for _ in 0..100 {
            assert!(!t.poll(k, true, &w).0);
            sweep(&mut t);
        }
        assert_eq!(wakes(&c), 0);
    }

    #[test]
    fn bytes_after_the_mark_start_the_count_over() {
        let (c, w) = counter();
        let mut t = Table::default();
        let k = t.insert(w.clone());
        for _ in 0..=TICKS {
            sweep(&mut t);
        }
        assert_eq!(wakes(&c), 1);
        // The woken poll finds bytes moved: not idle, and its waker is stored again.
        assert!(!t.poll(k, true, &w).0);
        for _ in 0..TICKS {
            sweep(&mut t);
        }
        assert_eq!(wakes(&c), 1);
        sweep(&mut t);
        assert_eq!(wakes(&c), 2);
        assert!(t.poll(k, false, &w).0);
    }

    #[test]
    fn a_freed_slot_is_not_woken_and_its_key_starts_fresh() {
        let (c1, w1) = counter();
        let (c2, w2) = counter();
        let mut t = Table::default();
        let k = t.insert(w1);
        for _ in 0..TICKS {
            sweep(&mut t);
        }
        drop(t.slots.remove(k));
        let k2 = t.insert(w2.clone());
        assert_eq!(k2, k, "the key is reused");
        sweep(&mut t);
        assert_eq!((wakes(&c1), wakes(&c2)), (0, 0));
        assert!(!t.poll(k2, false, &w2).0);
    }

    #[test]
    fn a_new_waker_replaces_the_stored_one() {
        let (c1, w1) = counter();
        let (c2, w2) = counter();
        let mut t = Table::default();
        let k = t.insert(w1);
        assert!(
            t.poll(k, false, &w2).1.is_some(),
            "the old waker is handed back"
        );
        for _ in 0..=TICKS {
            sweep(&mut t);
        }
        assert_eq!((wakes(&c1), wakes(&c2)), (0, 1));
    }

    /// Bound on waits for the events below (they come within milliseconds).
    const BOUND: Duration = Duration::from_secs(60);

    /// `f` on a fresh runtime of each io driver, on this thread.
    fn each_driver<F: Future<Output = ()>>(f: impl Fn() -> F) {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f());
        if monoio::utils::detect_uring() {
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .build()
                .unwrap()
                .block_on(f());
        }
    }

    /// Until a sweep for `idle` after `seen` sweeps; returns the new count.
    async fn next_sweep(idle: Duration, seen: u64) -> u64 {
        loop {
            let n = sweeps(idle);
            if n != seen {
                return n;
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn a_connection_moving_nothing_ends_idle_and_frees_its_slot() {
        let idle = Duration::from_millis(20);
        each_driver(|| async move {
            let counts = [Cell::new(0u64), Cell::new(0u64)];
            let end =
                monoio::time::timeout(BOUND, drive(pending(), pending(), &counts, idle, pending()))
                    .await
                    .expect("the idle timeout fires");
            assert!(matches!(end, End::Idle), "{end:?}");
            assert_eq!(watched(idle), 0);
        });
    }

    #[test]
    fn a_connection_moving_a_byte_every_sweep_period_is_not_cut() {
        let idle = Duration::from_millis(40);
        each_driver(|| async move {
            let counts = [Cell::new(0u64), Cell::new(0u64)];
            // A byte after each sweep for 3 × TICKS sweeps, so no TICKS quiet sweeps in a
            // row, then EOF; the other direction is quiet but open until then.
            let mover = async {
                let mut seen = sweeps(idle);
                for _ in 0..3 * TICKS {
                    seen = next_sweep(idle, seen).await;
                    counts[0].set(counts[0].get() + 1);
                }
                DirEnd::Eof
            };
            let quiet = async {
                while counts[0].get() < u64::from(3 * TICKS) {
                    monoio::time::sleep(Duration::from_millis(1)).await;
                }
                DirEnd::Eof
            };
            let end = monoio::time::timeout(BOUND, drive(mover, quiet, &counts, idle, pending()))
                .await
                .expect("both directions end");
            assert!(matches!(end, End::Closed), "{end:?}");
            assert_eq!(counts[0].get(), u64::from(3 * TICKS));
            assert_eq!(watched(idle), 0);
        });
    }

    #[test]
    fn an_aborted_connection_frees_its_slot_and_others_keep_theirs() {
        let idle = Duration::from_secs(3600);
        each_driver(|| async move {
            let counts = [Cell::new(0u64), Cell::new(0u64)];
            let other = [Cell::new(0u64), Cell::new(0u64)];
            let (abort, stay) = (
                crate::event::LocalEvent::new(),
                crate::event::LocalEvent::new(),
            );
            let a = drive(pending(), pending(), &counts, idle, abort.wait());
            let b = drive(pending(), pending(), &other, idle, stay.wait());
            let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
            std::future::poll_fn(|cx| {
                assert!(a.as_mut().poll(cx).is_pending());
                assert!(b.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            assert_eq!(watched(idle), 2);
            abort.set();
            let end = monoio::time::timeout(BOUND, a).await.expect("aborted");
            assert!(matches!(end, End::Aborted), "{end:?}");
            assert_eq!(watched(idle), 1);
            stay.set();
            let end = monoio::time::timeout(BOUND, b).await.expect("aborted");
            assert!(matches!(end, End::Aborted), "{end:?}");
            assert_eq!(watched(idle), 0);
        });
    }

    /// A runtime that ends while a connection is watched leaks its sweeper task (monoio does
    /// not drop pending tasks); a later runtime on the same thread still gets idle timeouts.
    #[test]
    fn a_later_runtime_on_the_thread_gets_a_sweeper_of_its_own() {
        let idle = Duration::from_millis(20);
        let mut first = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        first.block_on(async move {
            monoio::spawn(async move {
                let counts = [Cell::new(0u64), Cell::new(0u64)];
                drive(pending(), pending(), &counts, idle, pending()).await
            });
            while watched(idle) == 0 {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        drop(first);
        assert_eq!(watched(idle), 1, "the leaked task's slot");
        // The leaked sweeper is now overdue by more than a tick.
        std::thread::sleep(idle * 2);
        let mut second = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        second.block_on(async move {
            let counts = [Cell::new(0u64), Cell::new(0u64)];
            let end =
                monoio::time::timeout(BOUND, drive(pending(), pending(), &counts, idle, pending()))
                    .await
                    .expect("the idle timeout fires");
            assert!(matches!(end, End::Idle), "{end:?}");
        });
    }
}
