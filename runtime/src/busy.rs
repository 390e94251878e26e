//! Busy polling (`runtime.busy_poll`): a worker that was just active keeps reaping the ring
//! for a while instead of sleeping in `io_uring_enter`, so the next completion is picked up
//! without the cost of waking a parked thread on a halted CPU (the HAProxy `busy-polling`
//! idea, bounded by a budget).
//!
//! How it fits monoio 0.2.4: its `block_on` loop runs queued tasks, and only when the task
//! queue is empty does it *park* (submit and wait for at least one completion). While the
//! queue is not empty it calls the driver's `submit()` instead, which enters the kernel
//! without waiting and reaps whatever completions are there. The [spinner] is one task per
//! worker that stays queued while the worker was active within the last `busy_poll`: the
//! queue never empties, so the worker never sleeps, and every loop turn is a non-blocking
//! `io_uring_enter` + completion reap. (It is requeued by a helper task rather than by waking
//! itself: monoio puts a task that wakes itself during its poll back at the *front* of the
//! queue, where it would starve the connection tasks.)
//! - **Activity** is a poll of a connection task: [`WorkerCtx::serve`] wraps every handler in
//!   [`tracked`], which bumps a per-thread counter and wakes a sleeping spinner. Services that
//!   spawn long-lived tasks of their own may wrap them too. The spinner's own polls are not
//!   activity, so an idle worker stops spinning after `busy_poll` and parks as usual.
//! - **Timers** fire only when monoio parks. While spinning, the spinner lets the runtime
//!   park once every [`TIMER_PASS`]: it waits for a poll of a socket that is always readable,
//!   which completes at once, so that park returns immediately after processing due timers.
//! - **Sharing a CPU**: a spinning thread is always runnable, so it loses the wake-up
//!   preference the scheduler gives a sleeping one. Each spin turn therefore calls
//!   `sched_yield(2)`: a thread woken on the same CPU (the next proxy on the path, pinned to
//!   the same core) runs at once instead of after the spinner's time slice, and alone on
//!   the CPU the call returns at once. Every [`TIMER_PASS`] the spinner compares its thread
//!   CPU time with the wall time: below 3/4, other threads want this CPU (a compiler, a
//!   second spinner), and it stops spinning for [`BACKOFF_MIN`], doubling up to
//!   [`BACKOFF_MAX`] while that keeps happening (counter `busy_poll_backoffs`). Busy polling
//!   pays on cores the proxy has (mostly) to itself.
//! - io_uring only: under the epoll driver `busy_poll` is ignored (logged once per worker).
//!
//! [`WorkerCtx::serve`]: crate::worker::WorkerCtx::serve

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io::Write;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::stats::WorkerStats;
use crate::sys;

/// While spinning, let the runtime park (non-blocking) this often so due timers fire, and
/// check whether the thread lost its CPU.
pub const TIMER_PASS: Duration = Duration::from_millis(1);
/// First pause of busy polling after the thread got less than 3/4 of its CPU while spinning.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause (it doubles while preemption keeps happening).
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

struct State {
    /// A spinner runs on this thread.
    enabled: Cell<bool>,
    /// Bumped by every tracked poll.
    activity: Cell<u64>,
    /// The spinner's waker while it sleeps (no activity within the budget).
    sleeper: Cell<Option<Waker>>,
    /// The spinner is spinning now.
    spinning: Cell<bool>,
}

thread_local! {
    static STATE: State = const {
        State {
            enabled: Cell::new(false),
            activity: Cell::new(0),
            sleeper: Cell::new(None),
            spinning: Cell::new(false),
        }
    };
}

/// Record activity on this worker: keeps (or starts) its spinner. A no-op without one.
#[inline]
pub fn note_activity() {
    STATE.with(|s| {
        if s.enabled.get() {
            s.activity.set(s.activity.get().wrapping_add(1));
            if let Some(w) = s.sleeper.take() {
                w.wake();
            }
        }
    })
}

/// `f`, with every poll of it counted as activity for busy polling.
pub async fn tracked<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    poll_fn(|cx| {
        note_activity();
        f.as_mut().poll(cx)
    })
    .await
}

/// Whether this thread's spinner is spinning now (false without one).
pub fn is_spinning() -> bool {
    STATE.with(|s| s.spinning.get())
}

fn set_spinning(on: bool) {
    STATE.with(|s| s.spinning.set(on))
}

fn activity() -> u64 {
    STATE.with(|s| s.activity.get())
}

/// Completes once there was activity after `seen`.
async fn activity_after(seen: u64) {
    poll_fn(|cx| {
        STATE.with(|s| {
            if s.activity.get() != seen {
                Poll::Ready(())
            } else {
                s.sleeper.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    })
    .await
}

/// Requeues the spinner *behind* the other ready tasks. A monoio task that wakes itself
/// while it is being polled is put back at the *front* of the run queue (its `yield_now`), so
/// a self-waking spinner would run again and again ahead of the connection tasks it is there
/// to serve. Instead the spinner and a helper task wake each other: a task woken while it is
/// not running goes to the back of the queue.
#[derive(Default)]
struct Relay {
    spinner: Cell<Option<Waker>>,
    helper: Cell<Option<Waker>>,
}

impl Relay {
    /// The spinner's yield: one turn of the runtime loop (other tasks, then a non-blocking
    /// submit + reap) before it is polled again.
    async fn yield_turn(&self) {
        let mut yielded = false;
        poll_fn(|cx| {
            if yielded {
                return Poll::Ready(());
            }
            yielded = true;
            self.spinner.set(Some(cx.waker().clone()));
            if let Some(h) = self.helper.take() {
                h.wake();
            }
            Poll::Pending
        })
        .await
    }

    /// The helper task: wakes the spinner whenever the spinner woke it. Never returns.
    async fn helper(self: Rc<Self>) {
        poll_fn(|cx| {
            if let Some(s) = self.spinner.take() {
                s.wake();
            }
            self.helper.set(Some(cx.waker().clone()));
            Poll::<()>::Pending
        })
        .await
    }
}

/// The always-readable socket of the timer pass: a UNIX pair with one unread byte.
struct TimerPass {
    rx: monoio::net::UnixStream,
    _tx: std::os::unix::net::UnixStream,
}

impl TimerPass {
    fn new() -> std::io::Result<Self> {
        let (rx, mut tx) = std::os::unix::net::UnixStream::pair()?;
        tx.write_all(&[0])?;
        rx.set_nonblocking(true)?;
        Ok(TimerPass {
            rx: monoio::net::UnixStream::from_std(rx)?,
            _tx: tx,
        })
    }

    /// A poll op on a readable socket: completes in the submission that carries it, so the
    /// park it rides on does not sleep, and the time driver fires due timers after it.
    async fn run(&self) {
        let _ = self.rx.readable(false).await;
    }
}

/// The per-worker busy-poll task (spawned by [`crate::spawn_workers`] when
/// `runtime.busy_poll` is set): spins while the worker was active within `budget`, then
/// sleeps until the next activity. Never returns.
pub async fn spinner(budget: Duration, stats: Arc<WorkerStats>) {
    spin(budget, stats, true).await
}

/// The spinner; `yield_to_others`: `sched_yield` every turn and back off when the thread
/// gets less than 3/4 of its CPU (off only in tests, where a loaded test machine would make
/// the outcome depend on the scheduler).
async fn spin(budget: Duration, stats: Arc<WorkerStats>, yield_to_others: bool) {
    let timer_pass = match TimerPass::new() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "busy polling off: cannot create its timer-pass socket");
            return;
        }
    };
    let relay = Rc::new(Relay::default());
    monoio::spawn(relay.clone().helper());
    STATE.with(|s| s.enabled.set(true));
    let mut seen = activity();
    let mut backoff = Duration::ZERO;
    let mut resume_at: Option<Instant> = None;
    loop {
        activity_after(seen).await;
        seen = activity();
        let start = Instant::now();
        if let Some(t) = resume_at {
            if start < t {
                // Backing off after losing the CPU: behave as without busy polling.
                continue;
            }
            resume_at = None;
        }
        WorkerStats::inc(&stats.busy_poll_spins);
        set_spinning(true);
        let mut deadline = start + budget;
        let mut window_start = start;
        let mut window_cpu = sys::thread_cpu_time().unwrap_or_default();
        let mut next_check = start + TIMER_PASS;
        let contended = loop {
            relay.yield_turn().await;
            if yield_to_others {
                // A thread woken on this CPU (another proxy on the path) runs now, not after
                // our time slice; alone on the CPU this returns at once.
                std::thread::yield_now();
            }
            let now = Instant::now();
            let a = activity();
            if a != seen {
                seen = a;
                deadline = now + budget;
            } else if now >= deadline {
                break false;
            }
            if now >= next_check {
                if yield_to_others {
                    let cpu = sys::thread_cpu_time().unwrap_or_default();
                    let wall = now.duration_since(window_start);
                    // Less than 3/4 of the CPU while spinning: other threads want it.
                    if (cpu.saturating_sub(window_cpu)) * 4 < wall * 3 {
                        break true;
                    }
                    window_cpu = cpu;
                    window_start = now;
                }
                timer_pass.run().await;
                next_check = Instant::now() + TIMER_PASS;
            }
        };
        set_spinning(false);
        let end = Instant::now();
        WorkerStats::add(
            &stats.busy_poll_us,
            end.duration_since(start).as_micros() as u64,
        );
        if contended {
            // Other threads took a share of this CPU while we spun: they want it, and a
            // spinning thread loses the wake-up preference a sleeping one gets. Stop spinning
            // for a while (doubling while it keeps happening).
            WorkerStats::inc(&stats.busy_poll_backoffs);
            backoff = (backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
            resume_at = Some(end + backoff);
        } else {
            backoff /= 2;
            if backoff < BACKOFF_MIN {
                backoff = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{self, DriverChoice, DriverKind};
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

    /// A real io_uring worker runtime, or `None` where io_uring is unavailable.
    fn uring_runtime() -> Option<driver::MeshRuntime> {
        let d = driver::decide(DriverChoice::Auto, 64).unwrap();
        if d.kind != DriverKind::Uring {
            eprintln!("SKIP: no io_uring here ({})", d.reason);
            return None;
        }
        let (rt, kind) = driver::build_runtime(&d, 64).unwrap();
        (kind == DriverKind::Uring).then_some(rt)
    }

    #[test]
    fn timers_fire_while_spinning_and_the_spinner_sleeps_when_idle() {
        let Some(mut rt) = uring_runtime() else {
            return;
        };
        let stats = Arc::new(WorkerStats::default());
        let st = stats.clone();
        rt.block_on(async move {
            monoio::spawn(spin(Duration::from_millis(2), st.clone(), false));
            // Continuous ring-driven activity: a ping-pong over a socket pair, every round two
            // ring writes and two ring reads, counted as activity (as `serve` does for
            // connections). It stops when the timer below fired (after at least 1,000 rounds),
            // or after a bound of rounds far beyond what a 20 ms timer needs.
            let (a, b) = monoio::net::UnixStream::pair().unwrap();
            let fired = Rc::new(Cell::new(false));
            let fired2 = fired.clone();
            let pingpong = monoio::spawn(tracked(async move {
                let (mut a, mut b) = (a, b);
                let mut buf = vec![0u8; 8];
                let mut rounds = 0u64;
                let mut spun_during = false;
                while (rounds < 1000 || !fired2.get()) && rounds < 5_000_000 {
                    let (r, _) = a.write_all(vec![1u8; 8]).await;
                    r.unwrap();
                    let (r, b2) = b.read(buf).await;
                    assert_eq!(r.unwrap(), 8);
                    let (r, _) = b.write_all(b2.clone()).await;
                    r.unwrap();
                    let (r, b3) = a.read(b2).await;
                    assert_eq!(r.unwrap(), 8);
                    buf = b3;
                    rounds += 1;
                    spun_during |= is_spinning();
                }
                (fired2.get(), rounds, spun_during)
            }));
            monoio::time::sleep(Duration::from_millis(20)).await;
            fired.set(true);
            let (stopped_by_timer, rounds, spun_during) = pingpong.await;
            assert!(
                stopped_by_timer,
                "the timer never fired in {rounds} rounds of spinning"
            );
            assert!(
                spun_during,
                "the worker never spun during the ping-pong ({rounds} rounds, {} spins)",
                st.busy_poll_spins
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
            // Idle now: the spinner stops within its budget and sleeps.
            monoio::time::sleep(Duration::from_millis(30)).await;
            assert!(!is_spinning(), "still spinning with no activity");
            let spins = st
                .busy_poll_spins
                .load(std::sync::atomic::Ordering::Relaxed);
            assert!(spins >= 1);
            assert!(st.busy_poll_us.load(std::sync::atomic::Ordering::Relaxed) > 0);
            // Timers alone are not activity: the spinner stays asleep.
            monoio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!(
                st.busy_poll_spins
                    .load(std::sync::atomic::Ordering::Relaxed),
                spins
            );
            // New activity wakes it again.
            let (mut c, mut d) = monoio::net::UnixStream::pair().unwrap();
            let (r, _) = tracked(c.write_all(vec![2u8; 4])).await;
            r.unwrap();
            let (r, _) = tracked(d.read(vec![0u8; 4])).await;
            assert_eq!(r.unwrap(), 4);
            monoio::time::sleep(Duration::from_millis(10)).await;
            assert!(
                st.busy_poll_spins
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > spins
            );
        });
    }

    #[test]
    fn activity_without_a_spinner_is_a_no_op() {
        // A thread with no spinner: tracked polls change nothing.
        let before = activity();
        note_activity();
        assert_eq!(activity(), before);
        assert!(!is_spinning());
    }
}
