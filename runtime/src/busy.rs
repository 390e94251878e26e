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
//!   [`tracked`], which bumps a per-thread counter and wakes a sleeping spinner. Tasks a
//!   handler spawns are not covered by that: spawn them with [`spawn_tracked`] (or
//!   [`WorkerCtx::spawn`]) so their polls count too. The spinner's own polls are not
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
//!   second spinner; [`lost_cpu`]), and it stops spinning for [`BACKOFF_MIN`], doubling up to
//!   [`BACKOFF_MAX`] while that keeps happening (counter `busy_poll_backoffs`). Busy polling
//!   pays on cores the proxy has (mostly) to itself.
//! - io_uring only: under the epoll driver `busy_poll` is ignored (logged once per worker).
//!
//! [`WorkerCtx::serve`]: crate::worker::WorkerCtx::serve
//! [`WorkerCtx::spawn`]: crate::worker::WorkerCtx::spawn

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io::Write;
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
    /// This thread's worker (id, counters), set once when a worker thread starts: where a
    /// [`spawn_tracked`] task that panics is counted.
    static WORKER: std::cell::OnceCell<(usize, Arc<WorkerStats>)> = const { std::cell::OnceCell::new() };
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
pub fn tracked<F: Future>(f: F) -> crate::pinned::Tracked<F> {
    crate::pinned::Tracked::new(f)
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

/// Spawn `f` on the current worker as a task whose every poll counts as busy-poll activity
/// ([`tracked`]). Use it for the tasks a connection handler spawns (an HTTP/2 connection
/// driver, per-request/per-stream tasks, pooled upstream connection drivers, mirrors): the
/// accept loop tracks only the handler future itself, so a worker whose traffic runs in
/// such tasks would otherwise look idle to its spinner and park while traffic flows.
/// Like `monoio::spawn`, the task runs detached if the handle is dropped, and it is not cut
/// at the drain deadline (race it with [`WorkerCtx::aborted`] for that). Outside a worker
/// with busy polling it is plain `monoio::spawn`. Also available as [`WorkerCtx::spawn`].
///
///
/// A panic in `f` ends that task only (as for [`WorkerCtx::spawn`]): caught, logged once
/// with its message, counted in this worker's `worker_task_panics`, and the handle yields
/// `None`; the worker serves on. Nothing on the path that does not panic (the report is a
/// plain `fn`, no capture).
///
/// [`WorkerCtx::aborted`]: crate::worker::WorkerCtx::aborted
/// [`WorkerCtx::spawn`]: crate::worker::WorkerCtx::spawn
pub fn spawn_tracked<F>(f: F) -> monoio::task::JoinHandle<Option<F::Output>>
where
    F: Future + 'static,
    F::Output: 'static,
{
    monoio::spawn(crate::pinned::CatchPanic::new(tracked(f), task_panicked))
}

/// Register this thread as worker `id` with counters `stats` (done once by each worker
/// thread as it starts; a second call is ignored).
pub(crate) fn set_worker(id: usize, stats: Arc<WorkerStats>) {
    WORKER.with(|w| {
        let _ = w.set((id, stats));
    })
}

/// A [`spawn_tracked`] task panicked (caught): [`report_panic`].
fn task_panicked(payload: Box<dyn std::any::Any + Send>) {
    report_panic("spawned task", &*payload)
}

/// A task of this thread's worker panicked (caught; `what` names it): count it on the worker
/// (if this thread is one) and log it, once, with its message. The one report of spawned
/// tasks and connection handlers.
pub(crate) fn report_panic(what: &str, payload: &(dyn std::any::Any + Send)) {
    let id = WORKER.with(|w| {
        w.get().map(|(id, st)| {
            WorkerStats::inc(&st.worker_task_panics);
            *id
        })
    });
    tracing::error!(
        worker = ?id,
        panic = crate::pinned::panic_message(payload),
        "{what} panicked: it ended, the worker serves on"
    );
}

/// Where the spinner reads its thread's CPU time: [`ThreadCpuClock`] in production, a fake
/// in tests (so the backoff decision can be driven without a contended CPU).
pub trait CpuClock {
    /// CPU time the spinning thread has used so far.
    fn thread_cpu(&mut self) -> Duration;
}

/// The real clock: `CLOCK_THREAD_CPUTIME_ID`.
pub struct ThreadCpuClock;

impl CpuClock for ThreadCpuClock {
    fn thread_cpu(&mut self) -> Duration {
        sys::thread_cpu_time().unwrap_or_default()
    }
}

/// Whether a thread that used `cpu` of CPU time over `wall` of spinning lost its CPU to other
/// threads: less than 3/4 of it.
pub fn lost_cpu(cpu: Duration, wall: Duration) -> bool {
    cpu.saturating_mul(4) < wall.saturating_mul(3)
}

/// The spinner's pause after it lost its CPU: [`BACKOFF_MIN`], doubling up to [`BACKOFF_MAX`]
/// while spins keep losing it; a spin that did not lose it halves the pause (to zero below
/// [`BACKOFF_MIN`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pause: Duration,
    resume_at: Option<Instant>,
}

impl Backoff {
    /// Record a spin that ended at `end`; `contended`: it lost its CPU ([`lost_cpu`]).
    pub fn after_spin(&mut self, contended: bool, end: Instant) {
        if contended {
            self.pause = (self.pause * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
            self.resume_at = Some(end + self.pause);
        } else {
            self.pause /= 2;
            if self.pause < BACKOFF_MIN {
                self.pause = Duration::ZERO;
            }
        }
    }

    /// Whether spinning is paused at `now` (a pause that has passed is cleared).
    pub fn paused(&mut self, now: Instant) -> bool {
        match self.resume_at {
            Some(t) if now < t => true,
            _ => {
                self.resume_at = None;
                false
            }
        }
    }

    /// The current pause length (zero when not backing off).
    pub fn pause(&self) -> Duration {
        self.pause
    }
}

/// The per-worker busy-poll task (spawned by [`crate::spawn_workers`] when
/// `runtime.busy_poll` is set): spins while the worker was active within `budget`, then
/// sleeps until the next activity. Never returns.
pub async fn spinner(budget: Duration, stats: Arc<WorkerStats>) {
    spin(budget, stats, true, Some(ThreadCpuClock)).await
}

/// The spinner. `sched_yield`: call `sched_yield(2)` every turn; `cpu`: the clock of the
/// back-off check (none: never back off). Tests turn both off where a loaded test machine
/// would make the outcome depend on the scheduler, and inject a fake clock to test backoff.
async fn spin<C: CpuClock>(
    budget: Duration,
    stats: Arc<WorkerStats>,
    sched_yield: bool,
    mut cpu: Option<C>,
) {
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
    let mut backoff = Backoff::default();
    loop {
        activity_after(seen).await;
        seen = activity();
        let start = Instant::now();
        if backoff.paused(start) {
            // Backing off after losing the CPU: behave as without busy polling.
            continue;
        }
        WorkerStats::inc(&stats.busy_poll_spins);
        set_spinning(true);
        let mut deadline = start + budget;
        let mut window_start = start;
        let mut window_cpu = cpu.as_mut().map(|c| c.thread_cpu()).unwrap_or_default();
        let mut next_check = start + TIMER_PASS;
        let contended = loop {
            relay.yield_turn().await;
            if sched_yield {
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
                if let Some(c) = cpu.as_mut() {
                    let used = c.thread_cpu();
                    // Less than 3/4 of the CPU while spinning: other threads want it.
                    if lost_cpu(
                        used.saturating_sub(window_cpu),
                        now.duration_since(window_start),
                    ) {
                        break true;
                    }
                    window_cpu = used;
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
        }
        backoff.after_spin(contended, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{self, DriverChoice, DriverKind};
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    use netlab::cannot_run;
    use std::sync::atomic::Ordering::Relaxed;

    /// A real io_uring worker runtime; `None` (SKIP) where io_uring is unavailable, and a
    /// failure there under `CI`.
    fn uring_runtime() -> Option<driver::MeshRuntime> {
        let d = driver::decide(DriverChoice::Auto, 64).unwrap();
        if d.kind != DriverKind::Uring {
            cannot_run(&format!("no io_uring here ({})", d.reason));
            return None;
        }
        let (rt, kind) = driver::build_runtime(&d, 64).unwrap();
        if kind != DriverKind::Uring {
            cannot_run("the io_uring runtime fell back to epoll");
            return None;
        }
        Some(rt)
    }

    /// Wait (on the ring: timers) until `cond` holds; fail after a generous bound.
    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let give_up = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < give_up, "gave up waiting for: {what}");
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Whether the spinner is asleep waiting for activity.
    fn asleep() -> bool {
        STATE.with(|s| {
            let w = s.sleeper.take();
            let some = w.is_some();
            s.sleeper.set(w);
            some
        })
    }

    /// A tracked ring-driven ping-pong over a socket pair (two ring writes and two ring
    /// reads a round) until `done()` after at least `min_rounds`, or a bound of rounds far
    /// beyond what any condition here needs. Returns (rounds, spun during it).
    async fn pingpong(min_rounds: u64, done: impl Fn() -> bool + 'static) -> (u64, bool) {
        let (a, b) = monoio::net::UnixStream::pair().unwrap();
        spawn_tracked(async move {
            let (mut a, mut b) = (a, b);
            let mut buf = vec![0u8; 8];
            let mut rounds = 0u64;
            let mut spun_during = false;
            while (rounds < min_rounds || !done()) && rounds < 20_000_000 {
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
            (rounds, spun_during)
        })
        .await
        .expect("the ping-pong task panicked")
    }

    #[test]
    fn timers_fire_while_spinning_and_the_spinner_sleeps_when_idle() {
        let Some(mut rt) = uring_runtime() else {
            return;
        };
        let stats = Arc::new(WorkerStats::default());
        let st = stats.clone();
        rt.block_on(async move {
            monoio::spawn(spin::<ThreadCpuClock>(
                Duration::from_millis(2),
                st.clone(),
                false,
                None,
            ));
            // The event under test: a timer armed while the worker spins must fire during
            // the continuous ring activity (timers fire only when monoio parks).
            let fired = Rc::new(Cell::new(false));
            let f2 = fired.clone();
            monoio::spawn(async move {
                monoio::time::sleep(Duration::from_millis(1)).await;
                f2.set(true);
            });
            let f3 = fired.clone();
            let (rounds, spun_during) = pingpong(1000, move || f3.get()).await;
            assert!(
                fired.get(),
                "the timer never fired in {rounds} rounds of spinning"
            );
            assert!(
                spun_during,
                "the worker never spun during the ping-pong ({rounds} rounds, {} spins)",
                st.busy_poll_spins.load(Relaxed)
            );
            // Idle now: the spinner stops after its budget and sleeps.
            wait_for("the spinner to stop and sleep", || {
                !is_spinning() && asleep()
            })
            .await;
            let spins = st.busy_poll_spins.load(Relaxed);
            assert!(spins >= 1);
            assert!(st.busy_poll_us.load(Relaxed) > 0);
            // Timers alone are not activity: 50 parks later it is still asleep, no new spin.
            for _ in 0..50 {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(asleep() && !is_spinning());
            assert_eq!(st.busy_poll_spins.load(Relaxed), spins);
            // New activity wakes it again.
            let (mut c, mut d) = monoio::net::UnixStream::pair().unwrap();
            let (r, _) = tracked(c.write_all(vec![2u8; 4])).await;
            r.unwrap();
            let (r, _) = tracked(d.read(vec![0u8; 4])).await;
            assert_eq!(r.unwrap(), 4);
            wait_for("a new spin after new activity", || {
                st.busy_poll_spins.load(Relaxed) > spins
            })
            .await;
        });
    }

    /// A fake CPU clock: `share` (in percent) of the wall time since it was made, and the
    /// number of times the spinner read it.
    struct FakeCpu {
        origin: Instant,
        share: u32,
        reads: Rc<Cell<u64>>,
    }

    impl CpuClock for FakeCpu {
        fn thread_cpu(&mut self) -> Duration {
            self.reads.set(self.reads.get() + 1);
            self.origin.elapsed() * self.share / 100
        }
    }

    /// Spin under a fake clock reporting `share`% CPU while a ping-pong runs until `done`.
    fn spin_with_cpu_share(share: u32, done: fn(&WorkerStats, u64) -> bool) -> Arc<WorkerStats> {
        let Some(mut rt) = uring_runtime() else {
            return Arc::new(WorkerStats::default());
        };
        let stats = Arc::new(WorkerStats::default());
        let st = stats.clone();
        rt.block_on(async move {
            let reads = Rc::new(Cell::new(0u64));
            let clock = FakeCpu {
                origin: Instant::now(),
                share,
                reads: reads.clone(),
            };
            monoio::spawn(spin(
                Duration::from_millis(2),
                st.clone(),
                false,
                Some(clock),
            ));
            let st2 = st.clone();
            pingpong(1, move || done(&st2, reads.get())).await;
        });
        stats
    }

    #[test]
    fn a_spinner_that_gets_less_than_three_quarters_of_its_cpu_backs_off() {
        // 50% of the wall time: the first check (after TIMER_PASS of spinning) backs off.
        let st = spin_with_cpu_share(50, |st, _| st.busy_poll_backoffs.load(Relaxed) >= 1);
        if st.busy_poll_spins.load(Relaxed) == 0 {
            return; // skipped (no io_uring)
        }
        assert!(st.busy_poll_backoffs.load(Relaxed) >= 1);
    }

    #[test]
    fn a_spinner_with_its_cpu_to_itself_keeps_spinning() {
        // 100% of the wall time: 20 checks pass without a backoff.
        let st = spin_with_cpu_share(100, |_, reads| reads >= 21);
        if st.busy_poll_spins.load(Relaxed) == 0 {
            return; // skipped (no io_uring)
        }
        assert_eq!(st.busy_poll_backoffs.load(Relaxed), 0);
    }

    #[test]
    fn the_backoff_decision() {
        let ms = Duration::from_millis;
        assert!(lost_cpu(ms(74), ms(100)));
        assert!(lost_cpu(Duration::ZERO, ms(1)));
        assert!(!lost_cpu(ms(75), ms(100)));
        assert!(!lost_cpu(ms(100), ms(100)));
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(!b.paused(t0));
        // Losing the CPU: a pause from BACKOFF_MIN, doubling up to BACKOFF_MAX.
        b.after_spin(true, t0);
        assert_eq!(b.pause(), BACKOFF_MIN);
        assert!(b.paused(t0 + BACKOFF_MIN - ms(1)));
        assert!(!b.paused(t0 + BACKOFF_MIN));
        assert!(!b.paused(t0), "a passed pause is cleared");
        let mut expect = BACKOFF_MIN;
        for _ in 0..10 {
            b.after_spin(true, t0);
            expect = (expect * 2).min(BACKOFF_MAX);
            assert_eq!(b.pause(), expect);
            assert!(b.paused(t0 + expect - ms(1)));
        }
        assert_eq!(b.pause(), BACKOFF_MAX);
        // Spins that keep their CPU: the pause halves, then is gone, and nothing is paused.
        b.after_spin(false, t0);
        assert_eq!(b.pause(), BACKOFF_MAX / 2);
        while b.pause() > Duration::ZERO {
            let before = b.pause();
            b.after_spin(false, t0);
            assert!(b.pause() == before / 2 || b.pause().is_zero());
            assert!(b.pause().is_zero() || b.pause() >= BACKOFF_MIN);
        }
        assert!(!b.paused(t0 + BACKOFF_MAX));
    }

    #[test]
    fn tasks_spawned_tracked_count_as_activity_and_untracked_ones_do_not() {
        let Some(mut rt) = uring_runtime() else {
            return;
        };
        let stats = Arc::new(WorkerStats::default());
        rt.block_on(async move {
            monoio::spawn(spin::<ThreadCpuClock>(
                Duration::from_millis(2),
                stats,
                false,
                None,
            ));
            wait_for("the spinner to start", || {
                STATE.with(|s| s.enabled.get()) && asleep()
            })
            .await;
            let io = || async {
                let (mut c, mut d) = monoio::net::UnixStream::pair().unwrap();
                let (r, _) = c.write_all(vec![2u8; 4]).await;
                r.unwrap();
                let (r, _) = d.read(vec![0u8; 4]).await;
                assert_eq!(r.unwrap(), 4);
            };
            let before = activity();
            monoio::spawn(io()).await;
            assert_eq!(activity(), before, "an untracked task is not activity");
            assert_eq!(spawn_tracked(io()).await, Some(()));
            assert!(activity() > before, "a tracked task's polls are activity");
        });
    }

    /// A task a connection handler spawned with [`spawn_tracked`] that panics ends that task
    /// only: its handle yields `None`, the panic is counted in the worker's
    /// `worker_task_panics`, and the same worker serves the next connection.
    #[test]
    fn a_panicking_spawn_tracked_task_ends_that_task_only() {
        use crate::config::RuntimeConfig;
        use crate::worker::tests::{one_worker_serving, read_all};
        let (tx, spawned) = std::sync::mpsc::channel();
        let (addr, shutdown, workers) = one_worker_serving(RuntimeConfig::default(), move |_| {
            let n = Rc::new(Cell::new(0u32));
            move |mut s: monoio::net::TcpStream, _| {
                n.set(n.get() + 1);
                let (nth, tx) = (n.get(), tx.clone());
                async move {
                    // The task runs (and panics on connection 1) before the answer.
                    let task = spawn_tracked(async move {
                        if nth == 1 {
                            panic!("a spawn_tracked task panicked on connection 1");
                        }
                        nth
                    });
                    let out = task.await;
                    tx.send(out).unwrap();
                    let (r, _) = s.write_all(format!("served {nth}").into_bytes()).await;
                    r.unwrap();
                }
            }
        });
        let read_all = |nth| read_all(addr, nth);
        let bound = Duration::from_secs(30);
        assert_eq!(read_all(1), "served 1");
        assert_eq!(spawned.recv_timeout(bound), Ok(None));
        assert_eq!(read_all(2), "served 2");
        assert_eq!(spawned.recv_timeout(bound), Ok(Some(2)));
        let st = &workers.stats()[0];
        assert_eq!(st.worker_task_panics.load(Relaxed), 1);
        assert_eq!(st.accepted.load(Relaxed), 2);
        shutdown.drain(Duration::ZERO);
        workers.join().unwrap();
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
