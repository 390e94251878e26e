//! Thread-per-core workers: one pinned OS thread per selected core, each with its own monoio
//! runtime, buffer pool and counters, and the accept loop every service uses.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use monoio::net::TcpStream;

use crate::bufpool::BufPool;
use crate::config::RuntimeConfig;
use crate::driver::{self, DriverDecision, DriverKind};
use crate::event::LocalEvent;
use crate::listener::{inherit_to_accepted, tune_stream, ListenOptions};
use crate::shutdown::{DrainWatcher, Shutdown};
use crate::stats::WorkerStats;

struct CtxInner {
    id: usize,
    core: Option<usize>,
    driver: DriverKind,
    cfg: RuntimeConfig,
    listen_opts: ListenOptions,
    stats: Arc<WorkerStats>,
    pool: BufPool,
    drain: DrainWatcher,
    /// Set once the drain has begun. Every accept loop of this worker waits on this event:
    /// the [`DrainWatcher`] holds a single waker slot, so only one task (the relay spawned in
    /// [`spawn_workers`]) may wait on it, or all but the last registered loop would sleep on.
    draining: LocalEvent,
    /// Set at the drain deadline: every connection task stops.
    abort: LocalEvent,
    /// Notified whenever a connection ends.
    conn_closed: LocalEvent,
    live: Cell<usize>,
}

/// What a service sees of its worker. Cheap to clone; never leaves the worker thread.
#[derive(Clone)]
pub struct WorkerCtx(Rc<CtxInner>);

impl WorkerCtx {
    pub fn id(&self) -> usize {
        self.0.id
    }
    pub fn core(&self) -> Option<usize> {
        self.0.core
    }
    pub fn driver(&self) -> DriverKind {
        self.0.driver
    }
    pub fn config(&self) -> &RuntimeConfig {
        &self.0.cfg
    }
    pub fn listen_options(&self) -> &ListenOptions {
        &self.0.listen_opts
    }
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.0.stats
    }
    pub fn pool(&self) -> &BufPool {
        &self.0.pool
    }
    pub fn shutdown(&self) -> &Shutdown {
        self.0.drain.shutdown()
    }
    /// Connections this worker holds now.
    pub fn live_connections(&self) -> usize {
        self.0.live.get()
    }

    /// Completes once the drain has begun (at once if it has): protocols with a graceful
    /// goodbye (HTTP/2 GOAWAY) send it then, and let open streams finish.
    pub fn draining(&self) -> impl Future<Output = ()> + 'static {
        self.0.draining.wait()
    }

    /// Completes when the connections of this worker must stop (drain deadline).
    pub fn aborted(&self) -> impl Future<Output = ()> + 'static {
        self.0.abort.wait()
    }

    /// Spawn a task on this worker that counts as busy-poll activity: see
    /// [`crate::busy::spawn_tracked`]. Handlers should spawn their helper tasks (connection
    /// drivers, per-request tasks) this way rather than with `monoio::spawn`, or a worker
    /// whose traffic runs in them parks while it flows. A panic in `f` ends that task only:
    /// caught, logged, counted in `worker_task_panics`, and the handle yields `None`.
    pub fn spawn<F>(&self, f: F) -> monoio::task::JoinHandle<Option<F::Output>>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        // This worker's thread (a WorkerCtx never leaves it) is registered as the worker
        // whose counters a caught panic goes to.
        crate::busy::spawn_tracked(f)
    }

    /// Accept on `listener` until the drain begins, running `handler` for each connection in
    /// its own task. Pauses at `max_connections_per_worker` (counted in `accept_paused`).
    pub async fn serve<H, Fut>(&self, listener: std::net::TcpListener, handler: H) -> io::Result<()>
    where
        H: Fn(TcpStream, SocketAddr) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        // Accepted sockets inherit the per-connection options from the listener: set them
        // there once (if missing), none per connection. A listener that lacked them may
        // hold connections cloned before: then tune each accepted socket as well.
        let tune_each = inherit_to_accepted(&listener, &self.0.listen_opts)?;
        let listener = monoio::net::TcpListener::from_std(listener)?;
        let inner = &self.0;
        loop {
            // Back-pressure: wait for a free slot.
            if inner.live.get() >= inner.cfg.max_connections_per_worker {
                WorkerStats::inc(&inner.stats.accept_paused);
                while inner.live.get() >= inner.cfg.max_connections_per_worker {
                    if race(inner.conn_closed.wait(), inner.draining.wait())
                        .await
                        .is_right()
                    {
                        return Ok(());
                    }
                }
            }
            let accepted = match race(listener.accept(), inner.draining.wait()).await {
                Either::Left(r) => r,
                Either::Right(()) => return Ok(()),
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    WorkerStats::inc(&inner.stats.accept_errors);
                    tracing::warn!(worker = inner.id, error = %e, "accept failed");
                    // Out of descriptors: back off instead of spinning.
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE)
                            | Some(libc::ENFILE)
                            | Some(libc::ENOBUFS)
                            | Some(libc::ENOMEM)
                    ) {
                        monoio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    continue;
                }
            };
            if tune_each {
                let _ = tune_stream(&stream, &inner.listen_opts);
            }
            inner.live.set(inner.live.get() + 1);
            WorkerStats::inc(&inner.stats.accepted);
            WorkerStats::inc(&inner.stats.active);
            let guard = ConnGuard(self.clone());
            // A panic in the handler (its call here or a poll of its future in the task) ends
            // that connection only, counted in `worker_task_panics`; the worker serves on.
            let conn = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(stream, peer))) {
                Ok(conn) => conn,
                Err(payload) => {
                    guard.panicked(&*payload);
                    continue;
                }
            };
            // Every poll of a connection counts as activity for busy polling. The guard is
            // dropped with the task however it ends.
            let task = race(crate::busy::tracked(conn), inner.abort.wait());
            monoio::spawn(crate::pinned::CatchPanic::new(
                task,
                move |payload: Box<dyn std::any::Any + Send>| guard.panicked(&*payload),
            ));
        }
    }

    /// After the accept loops returned (drain begun): let open connections finish until the
    /// deadline, then cut the rest and wait for their tasks to end.
    pub async fn finish_drain(&self) {
        let inner = &self.0;
        let deadline = self.shutdown().deadline().unwrap_or_else(Instant::now);
        while inner.live.get() > 0 && Instant::now() < deadline {
            let sleep = monoio::time::sleep_until(deadline.into());
            let _ = race(inner.conn_closed.wait(), sleep).await;
        }
        if inner.live.get() > 0 {
            let n = inner.live.get();
            tracing::info!(
                worker = inner.id,
                connections = n,
                "drain deadline passed: closing open connections"
            );
            crate::stats::WorkerStats::add(&inner.stats.drain_aborted, n as u64);
            inner.abort.set();
            while inner.live.get() > 0 {
                inner.conn_closed.wait().await;
            }
        }
    }
}

/// Counts a connection; on drop (however the task ends) frees its slot.
struct ConnGuard(WorkerCtx);

impl ConnGuard {
    /// The connection's handler panicked: count and log it (once, with its message).
    fn panicked(&self, payload: &(dyn std::any::Any + Send)) {
        crate::busy::report_panic("connection handler (its connection is closed)", payload);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let inner = &self.0 .0;
        inner.live.set(inner.live.get() - 1);
        inner
            .stats
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        WorkerStats::inc(&inner.stats.closed);
        inner.conn_closed.notify();
    }
}

/// Which of two futures finished first.
pub enum Either<A, B> {
    Left(A),
    Right(B),
}

impl<A, B> Either<A, B> {
    pub fn is_right(&self) -> bool {
        matches!(self, Either::Right(_))
    }
}

/// Poll both; return the first to finish (the left one wins a tie). The other is dropped.
pub fn race<A: Future, B: Future>(a: A, b: B) -> crate::pinned::Race<A, B> {
    crate::pinned::Race::new(a, b)
}

/// Let the worker run its other ready tasks before this one continues: for loops that would
/// otherwise keep the worker to themselves (a splice direction that never blocks).
///
/// Not the usual "wake yourself and return `Pending`": monoio 0.2.4 puts a task that wakes
/// itself during its own poll at the *front* of the run queue, so it runs again at once and
/// keeps every other ready task waiting (its loop limit only returns to the ring; the task is
/// still first in the next round). Here a one-shot task spawned behind the ready tasks wakes
/// this one, and a task woken from outside its own poll goes to the back of the queue.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        let w = cx.waker().clone();
        drop(monoio::spawn(async move { w.wake() }));
        Poll::Pending
    })
    .await
}

/// Running workers.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    stats: Vec<Arc<WorkerStats>>,
    decision: DriverDecision,
    drivers: Vec<DriverKind>,
    cores: Vec<Option<usize>>,
}

impl Workers {
    pub fn stats(&self) -> &[Arc<WorkerStats>] {
        &self.stats
    }
    pub fn decision(&self) -> &DriverDecision {
        &self.decision
    }
    /// The driver each worker actually runs.
    pub fn drivers(&self) -> &[DriverKind] {
        &self.drivers
    }
    pub fn cores(&self) -> &[Option<usize>] {
        &self.cores
    }
    pub fn len(&self) -> usize {
        self.threads.len()
    }
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
    /// Wait for every worker to return; a panicked worker is reported as an error.
    pub fn join(self) -> io::Result<()> {
        let mut failed = 0;
        for t in self.threads {
            if t.join().is_err() {
                failed += 1;
            }
        }
        if failed > 0 {
            return Err(io::Error::other(format!("{failed} worker(s) panicked")));
        }
        Ok(())
    }
}

/// How many workers `cfg` asks for (one per selected core by default).
pub fn worker_count(cfg: &RuntimeConfig) -> usize {
    cfg.worker_cores().len()
}

/// Start the workers. `setup(i)` runs on the calling thread and returns the closure that
/// worker `i` runs on its own thread to make its (non-`Send`) main future. Returns once every
/// worker has built its runtime, or the first error.
pub fn spawn_workers<S, F, Fut>(
    cfg: &RuntimeConfig,
    shutdown: &Shutdown,
    mut setup: S,
) -> io::Result<Workers>
where
    S: FnMut(usize) -> F,
    F: FnOnce(WorkerCtx) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    if let Some(limit) = cfg.cpu_latency_limit {
        // Once per process: held until it exits (a later call only lowers it). Not holding
        // it is a warning, not an error: the service works, idle CPUs just halt as usual.
        crate::pmqos::hold_for_process(limit);
    }
    // Once per process, before the first worker thread exists (mallopt is process-wide and
    // must not change the allocator under threads that use it; see `sys::apply_allocator`).
    crate::sys::apply_allocator(&cfg.allocator);
    let decision = driver::decide(cfg.io_driver, cfg.ring_entries)?;
    let cores = cfg.worker_cores();
    tracing::info!(driver = %decision.kind, reason = %decision.reason, workers = cores.len(), ?cores, "starting workers");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, io::Result<DriverKind>)>();
    let mut threads = Vec::with_capacity(cores.len());
    let mut stats = Vec::with_capacity(cores.len());
    for (id, core) in cores.iter().copied().enumerate() {
        let st = Arc::new(WorkerStats::default());
        stats.push(st.clone());
        let f = setup(id);
        let ready = ready_tx.clone();
        let decision = decision.clone();
        let cfg = cfg.clone();
        let drain = shutdown.watcher();
        let t = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || {
                if let Some(c) = core {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
                        tracing::warn!(worker = id, core = c, "could not pin worker to its core");
                    }
                }
                if let Some(prio) = cfg.sched_fifo_priority {
                    // Not an error: the worker serves as a normal thread, only without
                    // preempting its core's other threads.
                    if let Err(e) = crate::rtsched::set_current_fifo(prio) {
                        tracing::warn!(
                            worker = id,
                            priority = prio,
                            error = %e,
                            "runtime.sched_fifo_priority: could not switch the worker to SCHED_FIFO (needs CAP_SYS_NICE or RLIMIT_RTPRIO); it runs with normal scheduling"
                        );
                    }
                }
                let (mut rt, kind) = match driver::build_runtime(&decision, cfg.ring_entries) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready.send((id, Err(e)));
                        return;
                    }
                };
                let _ = ready.send((id, Ok(kind)));
                drop(ready);
                let pool = BufPool::new(
                    cfg.forward.buffer_size,
                    cfg.forward.max_buffer_size,
                    cfg.forward.pool_buffers,
                );
                let ctx = WorkerCtx(Rc::new(CtxInner {
                    id,
                    core,
                    driver: kind,
                    listen_opts: ListenOptions::from_config(&cfg),
                    cfg,
                    stats: st,
                    pool,
                    drain,
                    draining: LocalEvent::new(),
                    abort: LocalEvent::new(),
                    conn_closed: LocalEvent::new(),
                    live: Cell::new(0),
                }));
                crate::busy::set_worker(id, ctx.0.stats.clone());
                // This worker's access lines go out in batches (written when it ends).
                let _logs = crate::logbuf::buffer_this_thread();
                rt.block_on(async move {
                    monoio::spawn(crate::logbuf::flusher());
                    if !ctx.0.cfg.busy_poll.is_zero() {
                        if ctx.0.driver == DriverKind::Uring {
                            let budget = ctx.0.cfg.busy_poll;
                            let st = ctx.0.stats.clone();
                            monoio::spawn(crate::busy::spinner(budget, st));
                        } else {
                            tracing::warn!(
                                worker = id,
                                "runtime.busy_poll is ignored under the epoll driver"
                            );
                        }
                    }
                    // The one task that waits on the drain watcher; it wakes every accept loop.
                    let relay = ctx.clone();
                    monoio::spawn(async move {
                        relay.0.drain.started().await;
                        relay.0.draining.set();
                    });
                    f(ctx).await
                });
            })?;
        threads.push(t);
    }
    drop(ready_tx);
    let mut drivers = vec![decision.kind; cores.len()];
    for _ in 0..cores.len() {
        match ready_rx.recv() {
            Ok((id, Ok(kind))) => drivers[id] = kind,
            Ok((id, Err(e))) => {
                shutdown.drain(std::time::Duration::ZERO);
                return Err(io::Error::new(
                    e.kind(),
                    format!("worker {id}: cannot build its runtime: {e}"),
                ));
            }
            Err(_) => return Err(io::Error::other("a worker exited during start-up")),
        }
    }
    Ok(Workers {
        threads,
        stats,
        decision,
        drivers,
        cores,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    /// One worker (unpinned, `cfg` otherwise) serving a fresh loopback listener with the
    /// handler `make` builds on that worker from its context, then draining: the test
    /// fixture of the handler tests here and in `busy`. Drain with `shutdown.drain` and
    /// `workers.join()`.
    pub(crate) fn one_worker_serving<M, H, Fut>(
        cfg: RuntimeConfig,
        make: M,
    ) -> (SocketAddr, Shutdown, Workers)
    where
        M: FnOnce(WorkerCtx) -> H + Send + 'static,
        H: Fn(TcpStream, SocketAddr) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let cfg = RuntimeConfig {
            workers: Some(1),
            pin: false,
            ..cfg
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let mut parts = Some((listener, make));
        let workers = spawn_workers(&cfg, &shutdown, |_| {
            let (l, make) = parts.take().unwrap();
            move |ctx: WorkerCtx| async move {
                let handler = make(ctx.clone());
                ctx.serve(l, handler).await.unwrap();
                ctx.finish_drain().await;
            }
        })
        .unwrap();
        (addr, shutdown, workers)
    }

    /// Connect to `addr` and read until the server closes (`nth` names the connection in
    /// a failure): what a handler test's connection was answered.
    pub(crate) fn read_all(addr: SocketAddr, nth: u32) -> String {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got)
            .unwrap_or_else(|e| panic!("connection {nth}: {e}"));
        got
    }

    /// The self-waking yield monoio offers (wake during the poll, return `Pending`).
    async fn yield_to_front() {
        let mut yielded = false;
        poll_fn(|cx| {
            if yielded {
                return Poll::Ready(());
            }
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    /// A task yields 1,000 times in a loop; a task spawned behind it records how many yields
    /// had happened when it first ran.
    fn yields_before_the_other_task_runs<Y: Future<Output = ()> + 'static>(y: fn() -> Y) -> u32 {
        let d = driver::decide(crate::DriverChoice::Auto, 64).unwrap();
        let (mut rt, _) = driver::build_runtime(&d, 64).unwrap();
        rt.block_on(async move {
            let count = Rc::new(Cell::new(0u32));
            let c = count.clone();
            let looping = monoio::spawn(async move {
                for _ in 0..1000 {
                    c.set(c.get() + 1);
                    y().await;
                }
            });
            let other = monoio::spawn(async move { count.get() });
            let seen = other.await;
            looping.await;
            seen
        })
    }

    #[test]
    fn yield_now_lets_the_other_ready_tasks_run() {
        // The starvation this fixes, on this monoio: a self-waking yield runs its loop to the
        // end before a task queued behind it runs at all.
        assert_eq!(yields_before_the_other_task_runs(yield_to_front), 1000);
        // Ours goes to the back: the other task runs after the first yield.
        assert_eq!(yields_before_the_other_task_runs(yield_now), 1);
    }

    /// A connection handler that panics ends its own connection only: the panic is caught
    /// (in the handler's future and in its call), counted in `worker_task_panics`, and the
    /// same worker serves the next connection; so does a task spawned with
    /// [`WorkerCtx::spawn`] (its handle yields `None`).
    #[test]
    fn a_panicking_handler_ends_its_connection_only() {
        use monoio::io::AsyncWriteRentExt;
        let (tx, spawned) = std::sync::mpsc::channel();
        let (addr, shutdown, workers) =
            one_worker_serving(RuntimeConfig::default(), move |ctx: WorkerCtx| {
                let n = Rc::new(Cell::new(0u32));
                move |mut s, _| {
                    n.set(n.get() + 1);
                    let nth = n.get();
                    if nth == 2 {
                        panic!("handler call panicked on connection 2");
                    }
                    let (ctx, tx) = (ctx.clone(), tx.clone());
                    async move {
                        if nth == 1 {
                            panic!("handler future panicked on connection 1");
                        }
                        let (r, _) = s.write_all(format!("served {nth}").into_bytes()).await;
                        r.unwrap();
                        let task = ctx.spawn(async move {
                            if nth == 3 {
                                panic!("a spawned task panicked");
                            }
                            nth
                        });
                        tx.send(task.await).unwrap();
                    }
                }
            });
        let read_all = |nth| read_all(addr, nth);
        // The panicking ones are closed unanswered; the next is served by the same worker.
        assert_eq!(read_all(1), "");
        assert_eq!(read_all(2), "");
        assert_eq!(read_all(3), "served 3");
        // A task spawned with `WorkerCtx::spawn` that panics: `None`, counted.
        assert_eq!(
            spawned.recv_timeout(std::time::Duration::from_secs(30)),
            Ok(None)
        );
        let st = &workers.stats()[0];
        assert_eq!(
            st.worker_task_panics
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        assert_eq!(st.accepted.load(std::sync::atomic::Ordering::Relaxed), 3);
        shutdown.drain(std::time::Duration::ZERO);
        workers.join().unwrap();
    }

    /// `serve` on a listener made elsewhere (kernel defaults): the accepted sockets carry
    /// the configured options, even one that was queued before `serve` prepared the listener.
    #[test]
    fn serve_hands_out_sockets_with_the_configured_options() {
        let cfg = RuntimeConfig {
            nodelay: true,
            tcp_keepalive: Some(std::time::Duration::from_secs(91)),
            socket_recv_buffer: Some(65536),
            ..RuntimeConfig::default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (addr, shutdown, workers) = one_worker_serving(cfg, move |_| {
            move |s: TcpStream, _| {
                let got = crate::sys::with_sockref(s.as_raw_fd(), |r| {
                    Ok((
                        r.nodelay()?,
                        r.keepalive()?,
                        r.keepalive_time()?,
                        r.recv_buffer_size()?,
                    ))
                });
                tx.send(got.unwrap()).unwrap();
                async move { drop(s) }
            }
        });
        for _ in 0..3 {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("the handler never ran");
            assert_eq!(
                got,
                (true, true, std::time::Duration::from_secs(91), 2 * 65536)
            );
            // The handler closed it.
            let _ = c.read(&mut [0u8; 1]);
        }
        shutdown.drain(std::time::Duration::ZERO);
        workers.join().unwrap();
    }

    /// `runtime.sched_fifo_priority` takes effect on the real worker threads: each reads its
    /// own policy back as `SCHED_FIFO` at the configured priority, while the thread that
    /// started them stays normal. Needs `CAP_SYS_NICE` (root); under CI its absence fails.
    #[test]
    fn sched_fifo_priority_makes_the_workers_sched_fifo() {
        // Probe the privilege on a throwaway thread (the policy must not leak to this one).
        let probe = std::thread::spawn(|| crate::rtsched::set_current_fifo(1))
            .join()
            .unwrap();
        if let Err(e) = probe {
            let why = format!("SCHED_FIFO cannot be set here (needs root/CAP_SYS_NICE): {e}");
            netlab::cannot_run(&why);
            return;
        }
        let cfg = RuntimeConfig {
            workers: Some(2),
            pin: false,
            sched_fifo_priority: Some(7),
            ..RuntimeConfig::default()
        };
        let got = seen_by_workers(cfg, 2, |ctx| (ctx.id(), crate::rtsched::current().unwrap()));
        let fifo7 = (crate::rtsched::Policy::Fifo, 7);
        assert_eq!(got, vec![(0, fifo7), (1, fifo7)]);
        assert_eq!(
            crate::rtsched::current().unwrap(),
            (crate::rtsched::Policy::Other, 0)
        );
    }

    /// What `look` returns on each of the `n` workers `cfg` starts (in worker order), once
    /// they all ran; the workers are drained and joined before it returns.
    fn seen_by_workers<T: Send + 'static>(
        cfg: RuntimeConfig,
        n: usize,
        look: fn(&WorkerCtx) -> T,
    ) -> Vec<T> {
        cfg.validate("runtime").unwrap();
        let shutdown = Shutdown::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let workers = spawn_workers(&cfg, &shutdown, |_| {
            let tx = tx.clone();
            move |ctx: WorkerCtx| async move {
                tx.send((ctx.id(), look(&ctx))).unwrap();
            }
        })
        .unwrap();
        let mut got: Vec<_> = (0..n)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(30))
                    .expect("a worker never ran")
            })
            .collect();
        got.sort_by_key(|(id, _)| *id);
        shutdown.drain(std::time::Duration::ZERO);
        workers.join().unwrap();
        got.into_iter().map(|(_, t)| t).collect()
    }

    /// A worker pinned to a core outside the affinity its process inherited runs there.
    #[test]
    fn a_worker_runs_on_its_explicit_core_outside_the_inherited_affinity() {
        let Some((first, other)) = crate::config::two_online_cpus() else {
            return;
        };
        std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(core_affinity::CoreId {
                id: first
            }));
            let cfg = RuntimeConfig {
                cores: Some(vec![other]),
                ..RuntimeConfig::default()
            };
            let got = seen_by_workers(cfg, 1, |ctx| {
                let allowed: Vec<usize> = core_affinity::get_core_ids()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| c.id)
                    .collect();
                (ctx.core(), allowed, crate::sys::current_cpu())
            });
            assert_eq!(got, vec![(Some(other), vec![other], Some(other))]);
        })
        .join()
        .unwrap();
    }
}
