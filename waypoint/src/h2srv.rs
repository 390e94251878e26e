//! HTTP/2 (prior knowledge) inside a tunnel: the stock `h2` server over the CONNECT stream
//! ([`crate::inner::StreamIo`]), each request stream handled concurrently with the same
//! policy-first decision as HTTP/1.1 ([`crate::http1::decide`]: R15, then R16/R17 routing,
//! filters, load balancing).
//!
//! **Upstream protocol** (as Istio chooses it): HTTP/1.1 by default — over HBONE, on the
//! same streaming core as HTTP/1.1 requests, keep-alive
//! streams shared by the tunnel; the upstream response head becomes the HTTP/2 head
//! directly (hop-by-hop headers dropped) and its body is streamed (chunked decoded as it
//! passes). HTTP/2 when the client spoke HTTP/2 and the service's DestinationRule sets
//! `trafficPolicy.connectionPool.http.useClientProtocol: true`: requests are multiplexed
//! on one HTTP/2 connection per worker and endpoint (one HBONE stream), built from the
//! client's HTTP/2 head and relayed frame by frame (trailers included).
//!
//! Bodies follow the same rule as HTTP/1.1 ([`crate::http1::REPLAY_BUFFER`]): read whole
//! up to 64 KiB (retryable, mirrorable), streamed beyond (one try, no mirror); a streamed
//! body of unknown length goes to an HTTP/1.1 upstream chunked.
//!
//! Protocol errors (invalid frames, bad preface after detection, …) make the `h2` server
//! send GOAWAY and end the tunnel; the worker keeps serving others. A request whose headers
//! cannot be represented in HTTP/1.1 is answered `400`.

use std::io;
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use hbone::H2Settings;

use crate::body::{ChunkScan, Framing};
use crate::config::WaypointConfig;
use crate::http1::{
    self, Attempt, Decided, ReqBody, RequestHead, Text, Tunnel, TunnelCtx, Upstream,
};
use crate::inner::{send_all, StreamIo};
use crate::lb::SplitMix64;
use crate::route::{Forward, HeaderModifier};
use runtime::worker::{race, Either};

/// The largest response body the waypoint buffers whole (a mirrored or HTTP/2-upstream
/// exchange made through [`crate::service`]); request bodies are not bounded by it (read
/// whole up to [`http1::REPLAY_BUFFER`], streamed beyond).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// The retry policy of a route that sets none (built once, not per request).
static DEFAULT_RETRY: std::sync::LazyLock<crate::route::Retry> =
    std::sync::LazyLock::new(http1::default_retry);

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Hop-by-hop headers that HTTP/2 forbids (RFC 9113 §8.2.2).
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "http2-settings",
];

/// How an HTTP/2 tunnel ended.
#[derive(Debug)]
pub enum H2End {
    /// The client closed the connection.
    Closed,
    /// A protocol error: GOAWAY was sent.
    Error(h2::Error),
}

/// Serve HTTP/2 on one tunnel until the client closes it or a protocol error.
/// `new_upstream` makes the upstream of one request stream; `on_bad` counts requests
/// answered `400` here. `revoked` completes when a reload no longer serves the tunnel's
/// target (R14): the connection is then sent a graceful GOAWAY at once, idle or not (as
/// when one of its streams finds the target gone first), and `on_retire` is called (once
/// per connection, whichever way it was retired).
#[allow(clippy::too_many_arguments)]
pub async fn serve<U, F, R>(
    io: StreamIo,
    settings: &H2Settings,
    cfg: Arc<WaypointConfig>,
    ctx: Rc<TunnelCtx>,
    mut new_upstream: F,
    on_bad: Rc<dyn Fn()>,
    revoked: R,
    on_retire: impl FnOnce(),
) -> H2End
where
    U: Upstream + 'static,
    F: FnMut() -> (U, SplitMix64),
    R: std::future::Future<Output = ()>,
{
    let mut conn = match settings.server_builder().handshake::<_, Bytes>(io).await {
        Ok(c) => c,
        Err(e) => return H2End::Error(e),
    };
    // The `x-forwarded-for` of the tunnel's requests that bring none, made once: each
    // request then shares its bytes.
    let xff = http::HeaderValue::try_from(ctx.source_ip.to_string()).ok();
    let runners = Rc::new(Runners::default());
    // Idle runners end with the tunnel, however `serve` ends (its future dropped included).
    let _close = CloseRunners(&runners);
    let shared = Rc::new(StreamShared {
        cfg,
        ctx,
        xff,
        on_bad,
        active: Active::default(),
    });
    // `idle_timeout`: a connection with no stream in flight that long is closed (GOAWAY).
    let idle = shared.cfg.tunnel_timeouts().idle;
    let active = &shared.active;
    let mut clock = http1::Clock::default();
    // The reload watch, until the connection is retired (then dropped: it no longer
    // keeps the worker's version watcher running).
    let mut revoked = std::pin::pin!(Some(revoked));
    let mut on_retire = Some(on_retire);
    loop {
        let next = next_stream(
            &mut conn,
            active,
            &mut clock,
            idle,
            revoked.as_mut(),
            || runners.trim(),
        )
        .await;
        let next = match next {
            Next::Stream(s) => s,
            // Idle: GOAWAY, then the connection is driven until it is closed (a stream
            // the client opened meanwhile is refused).
            Next::Idle => {
                conn.graceful_shutdown();
                while let Some(r) = conn.accept().await {
                    if let Ok((_, mut respond)) = r {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                }
                return H2End::Closed;
            }
            // A reload stopped serving the tunnel's target (R14), seen by the tunnel's
            // reload watch (an idle connection is told at once) or by a stream: graceful
            // GOAWAY, as Envoy drains a connection whose listener or route went away. The streams
            // in flight finish; the connection is served until the client closes it
            // (streams it opened before the GOAWAY reached it get their `503`), and the
            // client opens a new connection for its next requests.
            Next::Retire => {
                conn.graceful_shutdown();
                revoked.set(None);
                if let Some(f) = on_retire.take() {
                    f();
                }
                continue;
            }
        };
        match next {
            None => return H2End::Closed,
            Some(Err(e)) => return H2End::Error(e),
            Some(Ok((req, respond))) => {
                let (up, rng) = new_upstream();
                active.count.set(active.count.get() + 1);
                let job = Job {
                    up,
                    rng,
                    req,
                    respond,
                };
                // An idle runner of the tunnel takes the stream, else a new one.
                if let Some(job) = runners.hand(job) {
                    runtime::busy::spawn_tracked(run(runners.clone(), shared.clone(), job));
                }
            }
        }
    }
}

/// An HTTP/2 tunnel's streams in flight, and its connection's task to wake when the last
/// one ends (its idle time starts then) or a stream asks for the connection's retirement.
#[derive(Default)]
struct Active {
    count: std::cell::Cell<usize>,
    waker: std::cell::Cell<Option<std::task::Waker>>,
    /// A stream found the tunnel's target no longer served (R14): GOAWAY.
    retire: std::cell::Cell<bool>,
}

impl Active {
    /// Ask the connection to send GOAWAY (graceful) and take no new streams.
    fn retire(&self) {
        self.retire.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn ended(&self) {
        self.count.set(self.count.get() - 1);
        if self.count.get() == 0 {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }
}

/// A stream in flight: dropped (its task ended, or unwound by a panic), it is ended in
/// the tunnel's [`Active`].
struct InFlight<'a>(&'a Active);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.ended();
    }
}

type Accepted = Option<Result<(http::Request<RecvStream>, SendResponse<Bytes>), h2::Error>>;

/// What the connection's wait for its next stream came to ([`next_stream`]). Moved out
/// at once (never kept), so the size of its stream variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Next {
    Stream(Accepted),
    /// No stream in flight for `idle_timeout`.
    Idle,
    /// A reload no longer serves the tunnel's target (R14): its reload watch completed,
    /// or a stream found it ([`Active::retire`]).
    Retire,
}

/// How long an HTTP/2 tunnel stays without a stream in flight before it ends its spare
/// runners ([`Runners::trim`]). Trimmed at each idle moment instead, a busy tunnel (its
/// streams all ending before the client's next ones arrive, as a burst of requests does)
/// made its runners again, a few KiB each, past glibc's caches.
const TRIM_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The connection's next stream, [`Next::Idle`] once it had no stream in flight for `idle`
/// (`None`: never), or [`Next::Retire`] when its reload watch `revoked` completes or a
/// stream asked for it (unless retiring already: `revoked` is `None` then). The timer
/// (made once per tunnel) is armed when the connection becomes idle: `on_idle` is called
/// once it has been for [`TRIM_AFTER`] (or `idle`, if shorter).
async fn next_stream<R: std::future::Future<Output = ()>>(
    conn: &mut h2::server::Connection<StreamIo, Bytes>,
    active: &Active,
    clock: &mut http1::Clock,
    idle: Option<std::time::Duration>,
    mut revoked: std::pin::Pin<&mut Option<R>>,
    mut on_idle: impl FnMut(),
) -> Next {
    use std::task::Poll;
    /// Where the connection's idle time is: the clock is armed for the trim, or (after
    /// it) for the rest of `idle`; `Trimmed` with no `idle`: nothing more to wait for.
    #[derive(PartialEq)]
    enum Idle {
        Busy,
        ToTrim,
        Trimmed,
    }
    let mut state = Idle::Busy;
    std::future::poll_fn(|cx| {
        if let Some(watch) = revoked.as_mut().as_pin_mut() {
            if active.retire.get() || watch.poll(cx).is_ready() {
                return Poll::Ready(Next::Retire);
            }
        }
        if let Poll::Ready(r) = conn.poll_accept(cx) {
            return Poll::Ready(Next::Stream(r));
        }
        if active.count.get() > 0 {
            state = Idle::Busy;
            active.waker.set(Some(cx.waker().clone()));
            return Poll::Pending;
        }
        if state == Idle::Busy {
            state = Idle::ToTrim;
            clock.arm(idle.map_or(TRIM_AFTER, |i| i.min(TRIM_AFTER)));
        }
        loop {
            if state == Idle::Trimmed && idle.is_none() {
                return Poll::Pending;
            }
            std::task::ready!(clock.poll_expired(cx));
            if state == Idle::Trimmed {
                return Poll::Ready(Next::Idle);
            }
            on_idle();
            state = Idle::Trimmed;
            match idle {
                Some(i) if i > TRIM_AFTER => clock.arm(i - TRIM_AFTER),
                Some(_) => return Poll::Ready(Next::Idle),
                None => {}
            }
        }
    })
    .await
}

/// What a tunnel's streams share, held by each of its runners for its whole life (the
/// streams borrow it: no reference count moves per stream).
struct StreamShared {
    cfg: Arc<WaypointConfig>,
    ctx: Rc<TunnelCtx>,
    /// The `x-forwarded-for` of the tunnel's requests that bring none.
    xff: Option<http::HeaderValue>,
    on_bad: Rc<dyn Fn()>,
    active: Active,
}

/// A request stream handed to a runner.
struct Job<U> {
    up: U,
    rng: SplitMix64,
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
}

/// An HTTP/2 tunnel's runners: tasks that each serve one request stream at a time, and
/// wait for the tunnel's next stream when done (kept: at most [`RUNNERS_KEPT`] idle, and
/// [`RUNNERS_IDLE`] once the tunnel had no stream for [`TRIM_AFTER`]).
///
/// A stream's future is a few KiB: a new task (or box) for each took malloc's slow path.
/// A runner holds it inline: a task is made per runner, not per stream.
/// A runner also keeps its stream's idle timer ([`http1::Clock`], `stream_idle_timeout`)
/// for the next stream: a new one per stream was an aligned allocation (a monoio timer
/// entry is 512 bytes, 128-byte aligned) and a timer-wheel insertion and removal per
/// request; a kept one, re-armed, only moves its due time. The timer stays with its task:
/// a monoio timer wakes the task that first polled it until it fires, so it could not be
/// handed to another task's stream.
struct Runners<J> {
    idle: std::cell::RefCell<Vec<Rc<Mailbox<J>>>>,
    /// The tunnel ended: runners end once their stream is done.
    closed: std::cell::Cell<bool>,
}

/// Idle runners a tunnel keeps (its usual concurrent streams; more end when done).
const RUNNERS_KEPT: usize = 16;

/// Idle runners a tunnel with no stream in flight for [`TRIM_AFTER`] keeps: one (about
/// 7 kB with its timer) serves the next stream without a spawn; two held an idle tunnel at
/// about 15 kB, more than the two spare stream boxes (9.6 kB) that runners replaced.
const RUNNERS_IDLE: usize = 1;

impl<J> Default for Runners<J> {
    fn default() -> Self {
        Runners {
            idle: std::cell::RefCell::new(Vec::new()),
            closed: std::cell::Cell::new(false),
        }
    }
}

impl<J> Runners<J> {
    /// Hand `job` to an idle runner; `Some(job)` back when there is none.
    fn hand(&self, job: J) -> Option<J> {
        let Some(runner) = self.idle.borrow_mut().pop() else {
            return Some(job);
        };
        runner.job.set(Some(job));
        runner.wake();
        None
    }

    /// A runner is done with its stream: kept idle (`true`) unless the tunnel ended or
    /// enough are.
    fn rest(&self, runner: &Rc<Mailbox<J>>) -> bool {
        let mut idle = self.idle.borrow_mut();
        if self.closed.get() || idle.len() >= RUNNERS_KEPT {
            return false;
        }
        idle.push(runner.clone());
        true
    }

    /// End the idle runners past [`RUNNERS_IDLE`] (the tunnel has no stream in flight).
    fn trim(&self) {
        let ending = {
            let mut idle = self.idle.borrow_mut();
            let keep = idle.len().min(RUNNERS_IDLE);
            idle.split_off(keep)
        };
        for runner in ending {
            runner.close();
        }
    }

    /// The tunnel ended: its idle runners end now, the others once their stream is done.
    fn close(&self) {
        self.closed.set(true);
        let ending = std::mem::take(&mut *self.idle.borrow_mut());
        for runner in ending {
            runner.close();
        }
    }
}

/// Ends a tunnel's runners when dropped ([`Runners::close`]).
struct CloseRunners<'a, J>(&'a Runners<J>);

impl<J> Drop for CloseRunners<'_, J> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// An idle runner's next stream, as the tunnel hands it over.
struct Mailbox<J> {
    job: std::cell::Cell<Option<J>>,
    waker: std::cell::Cell<Option<std::task::Waker>>,
    closed: std::cell::Cell<bool>,
}

impl<J> Default for Mailbox<J> {
    fn default() -> Self {
        Mailbox {
            job: std::cell::Cell::new(None),
            waker: std::cell::Cell::new(None),
            closed: std::cell::Cell::new(false),
        }
    }
}

impl<J> Mailbox<J> {
    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn close(&self) {
        self.closed.set(true);
        self.wake();
    }

    /// The next stream, or `None` once the runner is to end.
    async fn next(&self) -> Option<J> {
        std::future::poll_fn(|cx| {
            if let Some(job) = self.job.take() {
                return std::task::Poll::Ready(Some(job));
            }
            if self.closed.get() {
                return std::task::Poll::Ready(None);
            }
            self.waker.set(Some(cx.waker().clone()));
            std::task::Poll::Pending
        })
        .await
    }
}

/// A runner of a tunnel: serves `job`, then each stream the tunnel hands it, until it is
/// ended ([`Runners`]).
async fn run<U: Upstream>(runners: Rc<Runners<Job<U>>>, shared: Rc<StreamShared>, job: Job<U>) {
    let mailbox = Rc::new(Mailbox::default());
    let mut clock = http1::Clock::default();
    let mut next = Some(job);
    while let Some(Job {
        mut up,
        rng,
        req,
        respond,
    }) = next.take()
    {
        {
            // Ends the stream's count however it ends (a panic included), so the tunnel's
            // idle time still starts.
            let _in_flight = InFlight(&shared.active);
            if let Some(c) = up.clock() {
                std::mem::swap(c, &mut clock);
            }
            let mut up = request(&shared, up, rng, req, respond).await;
            if let Some(c) = up.clock() {
                std::mem::swap(c, &mut clock);
            }
        }
        if !runners.rest(&mailbox) {
            return;
        }
        next = mailbox.next().await;
    }
}

/// The request head as HTTP/1.1 sees it (`:authority` as `host`; no body framing
/// headers, those are added once the body's length is known; the path normalized), or
/// `None` (`400`) when a header value is not text, the path cannot be normalized, or there
/// is neither `:authority` nor `host`.
fn head_of(parts: &http::request::Parts) -> Option<RequestHead> {
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if !target.starts_with('/') {
        return None;
    }
    let host = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => parts.headers.get("host")?.to_str().ok()?,
    };
    // All the head's text is copied into one shared string, and every field is a slice
    // of it. The text and the field spans are gathered on the stack for a usual head (one
    // allocation, the shared string, instead of three).
    let size = parts.method.as_str().len()
        + target.len()
        + "host".len()
        + host.len()
        + parts
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 2)
            .sum::<usize>();
    let mut stack_text = [0u8; STACK_TEXT];
    let mut heap_text = Vec::new();
    let buf: &mut [u8] = if size <= STACK_TEXT {
        &mut stack_text[..size]
    } else {
        heap_text.resize(size, 0);
        &mut heap_text
    };
    let mut len = 0;
    // `size` counts every piece put (a cookie's `"; "` within its field's 2).
    let mut put = |s: &str| {
        let start = len;
        len += s.len();
        buf[start..len].copy_from_slice(s.as_bytes());
        (start, len)
    };
    let method = put(parts.method.as_str());
    let target = put(target);
    let fields = parts.headers.len() + 1;
    let mut stack_spans = [((0, 0), (0, 0)); STACK_SPANS];
    let mut heap_spans = Vec::new();
    let spans: &mut [Field] = if fields <= STACK_SPANS {
        &mut stack_spans[..fields]
    } else {
        heap_spans.resize(fields, ((0, 0), (0, 0)));
        &mut heap_spans
    };
    let mut n_spans = 0;
    spans[0] = (put("host"), put(host));
    n_spans += 1;
    // Several `cookie` fields (HTTP/2 sends one per cookie) are one in HTTP/1.1, joined
    // with "; " (RFC 9113 §8.2.3), where the first one was.
    let mut cookie: Option<usize> = None;
    for (n, v) in &parts.headers {
        let n = n.as_str();
        if n == "host" || n == "content-length" || HOP_BY_HOP.contains(&n) {
            continue;
        }
        let v = v.to_str().ok()?;
        if n == "cookie" {
            if cookie.is_none() {
                cookie = Some(n_spans);
                spans[n_spans] = (put(n), (0, 0));
                n_spans += 1;
            }
            continue;
        }
        spans[n_spans] = (put(n), put(v));
        n_spans += 1;
    }
    if let Some(i) = cookie {
        let mut joined = (0, 0);
        for (k, v) in parts.headers.get_all("cookie").iter().enumerate() {
            if k > 0 {
                put("; ");
            }
            let (start, end) = put(v.to_str().ok()?);
            joined = (if k == 0 { start } else { joined.0 }, end);
        }
        spans[i].1 = joined;
    }
    let text = std::str::from_utf8(&buf[..len]).ok()?;
    let src: Rc<str> = Rc::from(text);
    let at = |(a, b): (usize, usize)| Text::slice_of(&src, &src[a..b]);
    let target_text = &src[target.0..target.1];
    let (path, query) = match target_text.split_once('?') {
        Some((p, q)) => (p, Some(Text::slice_of(&src, q))),
        None => (target_text, None),
    };
    // Normalized as HTTP/1.1's (Istio's `BASE`, [`crate::path`]); `None` (400) when it
    // cannot be.
    let path = match crate::path::normalize(path).ok()? {
        std::borrow::Cow::Borrowed(p) => Text::slice_of(&src, p),
        std::borrow::Cow::Owned(p) => Text::from(p),
    };
    // Room for the `traceparent` and `x-request-id` that [`http1::trace`] and
    // [`http1::request_id`] add when the client sent none.
    let mut headers = Vec::with_capacity(n_spans + 2);
    headers.extend(spans[..n_spans].iter().map(|&(n, v)| (at(n), at(v))));
    Some(RequestHead {
        method: at(method),
        path,
        query,
        version: 1,
        headers,
    })
}

/// Bytes of head text [`head_of`] gathers on the stack (a larger head: on the heap).
const STACK_TEXT: usize = 1024;

/// Fields of a head [`head_of`] gathers on the stack (more: on the heap).
const STACK_SPANS: usize = 32;

/// A field as (name, value) byte ranges of the head text.
type Field = ((usize, usize), (usize, usize));

/// Whether an HTTP/1.1 request of `method` with an empty body still says
/// `content-length: 0`.
fn says_length(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS")
}

/// An HTTP/2 request body as the byte source of [`http1::attempt`].
struct H2Body(RecvStream);

impl Tunnel for H2Body {
    async fn read(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            return match self.0.data().await {
                Some(Ok(b)) if b.is_empty() => continue,
                Some(Ok(b)) => {
                    let _ = self.0.flow_control().release_capacity(b.len());
                    Some(Ok(b))
                }
                Some(Err(e)) => Some(Err(io::Error::other(e))),
                None => None,
            };
        }
    }

    async fn write(&mut self, _data: Bytes) -> io::Result<()> {
        Err(io::Error::other("a request body is read only"))
    }

    async fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Insert a header line before the blank line ending an HTTP/1.1 head.
fn add_header(mut head: Vec<u8>, line: &str) -> Vec<u8> {
    head.truncate(head.len() - 2);
    head.extend_from_slice(line.as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// One request stream, answered here or forwarded; the upstream is handed back at the end
/// (the tunnel keeps its idle timer for the next stream).
async fn request<U: Upstream>(
    shared: &StreamShared,
    mut up: U,
    mut rng: SplitMix64,
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> U {
    let (cfg, ctx): (&WaypointConfig, &TunnelCtx) = (&shared.cfg, &shared.ctx);
    let (client_xff, on_bad, active) = (shared.xff.as_ref(), &shared.on_bad, &shared.active);
    let (parts, recv) = req.into_parts();
    let head_request = parts.method == http::Method::HEAD;
    let started = std::time::Instant::now();
    let Some(mut head) = head_of(&parts) else {
        on_bad();
        send(&mut respond, status_only(400), head_request).await;
        return up;
    };
    let propagation = up.propagation();
    let spans = propagation.map(|p| p.sampling);
    let mut traceparent = http1::trace(&mut head, ctx.traceparent.as_deref(), &mut rng, spans);
    if let Some(trace_id_64) = propagation.and_then(|p| p.b3) {
        crate::spans::b3(&mut head, &mut traceparent, trace_id_64);
    }
    http1::request_id(&mut head, &mut rng);
    // The snapshot current now serves this stream to its end (a reload since the tunnel
    // began applies from here on); the tunnel's `x-forwarded-for` is its client's under it.
    let fresh = up.begin();
    let (cfg, ctx, client_xff) = match &fresh {
        http1::Begin::New(c, x) => {
            let xff = client_xff.filter(|_| x.source_ip == ctx.source_ip);
            (&**c, &**x, xff)
        }
        _ => (cfg, ctx, client_xff),
    };
    let head_len: usize = head
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum::<usize>()
        + head.method.len()
        + head.path.len()
        + 12;
    let mut body = H2Body(recv);
    let mut denied = None;
    let grpc = head
        .header("content-type")
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        up.note(http1::Note::Grpc);
    }
    // A tunnel whose target is no longer served (R14) gets `503` for each request, and
    // its connection a GOAWAY.
    let action = if matches!(fresh, http1::Begin::Refused) {
        active.retire();
        let resp = http1::simple_response(503, &[], http1::NOT_SERVED_BODY, false);
        Decided::Respond(resp, None)
    } else {
        http1::decide_with(cfg, ctx, &mut head, &mut rng, &mut up, true).await
    };
    let (status, flags, body_len, response_bytes) = match action {
        Decided::Respond(bytes, refusal) => {
            let status = resp_status(&bytes);
            denied = refusal;
            let n = bytes.len() as u64;
            send(&mut respond, bytes, head_request).await;
            (status, http1::Refusal::flags(refusal, status), 0, n)
        }
        Decided::Forward { forward, auth } => {
            let deadline = http1::request_deadline(&forward);
            let h2_upstream = forward.service.as_ref().is_some_and(|(svc, port)| {
                cfg.lb_ref(svc, Some(*port))
                    .is_some_and(|lb| lb.use_client_protocol)
            });
            // The stream task is boxed whole at spawn, the HTTP/2 forwarding inside it
            // (one allocation per request); the HTTP/1.1-upstream path, several times
            // larger, is boxed apart so it does not size every stream's task.
            if h2_upstream {
                forward_h2(
                    &mut up,
                    &mut body,
                    &parts,
                    &head,
                    auth.is_some(),
                    &forward,
                    ctx.source_ip,
                    client_xff,
                    &mut respond,
                    head_request,
                    grpc,
                    &mut rng,
                    deadline,
                )
                .await
            } else {
                let request = http1::upstream_head(&head, &forward, ctx.source_ip);
                let r = Box::pin(forward_streamed(
                    &mut up,
                    &mut body,
                    &parts,
                    &head,
                    &forward,
                    request,
                    &mut respond,
                    head_request,
                    &mut rng,
                    deadline,
                ))
                .await;
                if r.0 == 400 && r.1 == "DPE" {
                    on_bad();
                }
                r
            }
        }
    };
    up.record(&http1::Record {
        protocol: "HTTP/2",
        method: &head.method,
        host: head.header("host").unwrap_or(""),
        path: &head.path,
        query: head.query.as_deref(),
        status,
        flags,
        request_bytes: head_len as u64 + body_len,
        response_bytes,
        started,
        traceparent: &traceparent.value,
        span: traceparent.span,
        head: Some(&head),
        request_id: head.header("x-request-id").unwrap_or(""),
        denied,
    });
    up
}

/// An HTTP/2 request to an HTTP/1.1 upstream, natively: the body (read whole up to
/// [`http1::REPLAY_BUFFER`], else streamed, chunked when its length is unknown) goes
/// upstream behind the routed head, and the upstream response head becomes the HTTP/2
/// response head directly, its body streamed (a chunked one decoded as it passes).
/// Returns (status, flags, request body bytes, response bytes).
#[allow(clippy::too_many_arguments)]
async fn forward_streamed<U: Upstream>(
    up: &mut U,
    body: &mut H2Body,
    parts: &http::request::Parts,
    head: &RequestHead,
    forward: &Forward,
    request: Vec<u8>,
    respond: &mut SendResponse<Bytes>,
    head_request: bool,
    rng: &mut SplitMix64,
    deadline: Option<std::time::Instant>,
) -> (u16, &'static str, u64, u64) {
    let declared: Option<u64> = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let mut buf = BytesMut::new();
    let read = buffer_body(body, &mut buf, up);
    let Some(buffered) = http1::within(deadline, read).await else {
        return request_body_timeout(up, respond, head_request, buf.len() as u64).await;
    };
    if let Err(e) = &buffered {
        if e.kind() == io::ErrorKind::TimedOut {
            return request_body_idle(up, respond, head_request, buf.len() as u64).await;
        }
    }
    let Ok(ended) = buffered else {
        send(respond, status_only(400), head_request).await;
        return (400, "DPE", buf.len() as u64, 0);
    };
    let (reqbody, request) = if ended {
        let b = buf.split().freeze();
        let request = if !b.is_empty() || says_length(&head.method) {
            add_header(request, &format!("content-length: {}", b.len()))
        } else {
            request
        };
        (ReqBody::Buffered(b), request)
    } else {
        up.note(http1::Note::StreamedBody);
        match declared {
            Some(n) => (
                ReqBody::Streamed(Framing::Length(n)),
                add_header(request, &format!("content-length: {n}")),
            ),
            None => (
                ReqBody::Streamed(Framing::Eof),
                add_header(request, "transfer-encoding: chunked"),
            ),
        }
    };
    let has_body = !matches!(&reqbody, ReqBody::Buffered(b) if b.is_empty());
    let a = http1::attempt(
        body,
        &mut buf,
        up,
        forward,
        head,
        Bytes::from(request),
        &reqbody,
        has_body,
        rng,
        deadline,
    );
    // Raced against the client's reset (or its connection's end): then the tries are
    // dropped (their upstream stream reset) and the request ends here.
    let a = match race(a, client_gone(respond)).await {
        Either::Left(a) => a,
        Either::Right(flags) => {
            up.cancelled();
            let sent = match &reqbody {
                ReqBody::Buffered(b) => b.len() as u64,
                ReqBody::Streamed(_) => 0,
            };
            return (0, flags, sent, 0);
        }
    };
    match a {
        Attempt::Answer {
            mut conn,
            head: h,
            mut ubuf,
            sent,
            deadline,
        } => {
            let w = write_response(
                respond,
                &mut conn,
                &h,
                &mut ubuf,
                &forward.response_headers,
                head_request,
                up.stream_idle(),
            );
            let Some(r) = http1::within(deadline, w).await else {
                // The route's time ran out after the response head went out: the stream
                // is reset, never ended as if complete.
                respond.send_reset(h2::Reason::CANCEL);
                up.done(None, h.status, false, Some(io::ErrorKind::TimedOut));
                return (h.status, "UT", sent, 0);
            };
            match r {
                Ok(n) => {
                    let reusable =
                        !h.close && !h.early && h.framing != Framing::Eof && ubuf.is_empty();
                    up.done(Some(conn), h.status, reusable, None);
                    (h.status, "-", sent, n)
                }
                // No byte either way for `stream_idle_timeout` mid-body (Envoy's `SI`):
                // the stream is reset, counted with the upstream timeouts.
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    respond.send_reset(h2::Reason::CANCEL);
                    up.done(None, h.status, false, Some(io::ErrorKind::TimedOut));
                    (h.status, "SI", sent, 0)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/2 response cut");
                    respond.send_reset(h2::Reason::INTERNAL_ERROR);
                    up.done(None, h.status, false, Some(io::ErrorKind::UnexpectedEof));
                    (h.status, "UPE", sent, 0)
                }
            }
        }
        Attempt::Local {
            resp, flags, sent, ..
        } => {
            let status = resp_status(&resp);
            let n = resp.len() as u64;
            send(respond, resp, head_request).await;
            (status, flags, sent, n)
        }
        Attempt::BodyFailed { sent, .. } => {
            respond.send_reset(h2::Reason::CANCEL);
            (400, "DPE", sent, 0)
        }
        // Not reached: `H2Body` keeps `Tunnel::cancelled`'s default (never ready), as the
        // client's leaving is watched by the `client_gone` race above; the match needs it.
        Attempt::Cancelled { sent } => (0, "DC", sent, 0),
    }
}

/// Completes when the client abandoned the request stream `respond` answers (before its
/// response head): its RST_STREAM (Envoy's flag `DR`), or the end of the tunnel's HTTP/2
/// connection (`DC`: the tunnel failed or was closed; `h2` then fails every stream).
async fn client_gone(respond: &mut SendResponse<Bytes>) -> &'static str {
    match std::future::poll_fn(|cx| respond.poll_reset(cx)).await {
        Ok(_) => "DR",
        Err(_) => "DC",
    }
}

/// The request body of an HTTP/2 request: read whole up to [`http1::REPLAY_BUFFER`]
/// (`true`: complete), else the part read so far. A read that waits `stream_idle_timeout`
/// ([`Upstream::stream_idle`]) fails `TimedOut` (answered `408`).
async fn buffer_body<U: Upstream>(
    body: &mut H2Body,
    buf: &mut BytesMut,
    up: &mut U,
) -> io::Result<bool> {
    let mut ended = body.0.is_end_stream();
    while !ended && buf.len() <= http1::REPLAY_BUFFER {
        let read = http1::bounded(up, None, body.read()).await;
        match read {
            Some(Some(Ok(b))) => buf.extend_from_slice(&b),
            Some(Some(Err(e))) => return Err(e),
            Some(None) => ended = true,
            None => return Err(io::ErrorKind::TimedOut.into()),
        }
    }
    Ok(ended)
}

/// An HTTP/2 request to an HTTP/2 upstream (DestinationRule `useClientProtocol`),
/// natively: the routed request is built from the HTTP/2 head (no HTTP/1.1 text), the
/// body is sent as it comes (read whole first when it fits the replay buffer, so it can be
/// retried), and the upstream response — head, body and trailers — is relayed frame by
/// frame. Returns (status, flags, request body bytes, response bytes).
#[allow(clippy::too_many_arguments)]
async fn forward_h2<U: Upstream>(
    up: &mut U,
    body: &mut H2Body,
    parts: &http::request::Parts,
    head: &RequestHead,
    rewritten: bool,
    fwd: &Forward,
    client: std::net::IpAddr,
    client_xff: Option<&http::HeaderValue>,
    respond: &mut SendResponse<Bytes>,
    head_request: bool,
    grpc: bool,
    rng: &mut SplitMix64,
    deadline: Option<std::time::Instant>,
) -> (u16, &'static str, u64, u64) {
    let Some(service) = fwd.service.as_ref() else {
        send(respond, status_only(500), head_request).await;
        return (500, "-", 0, 0);
    };
    let mut buf = BytesMut::new();
    let read = buffer_body(body, &mut buf, up);
    let Some(buffered) = http1::within(deadline, read).await else {
        return request_body_timeout(up, respond, head_request, buf.len() as u64).await;
    };
    let complete = match buffered {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            return request_body_idle(up, respond, head_request, buf.len() as u64).await;
        }
        Err(_) => {
            respond.send_reset(h2::Reason::CANCEL);
            return (400, "DPE", buf.len() as u64, 0);
        }
    };
    let buffered = if complete {
        Some(buf.split().freeze())
    } else {
        up.note(http1::Note::StreamedBody);
        None
    };
    let has_body = buffered.as_ref().is_none_or(|b| !b.is_empty());
    // The routed request, as an HTTP/2 head. Built once (cloned per try: its parts are
    // shared bytes); `None` when the authority or target is not a valid URI part, which
    // fails each try like a refused connect. Unrewritten (no host or path from the
    // route), the client's own parsed authority and target are reused as they are
    // (unless normalization changed the path).
    let normal = parts.uri.path() == head.path.as_str();
    let uri = match (&fwd.host, &fwd.path, parts.uri.authority()) {
        (None, None, Some(authority)) if normal => {
            let mut u = http::uri::Parts::default();
            u.scheme = Some(http::uri::Scheme::HTTP);
            u.authority = Some(authority.clone());
            u.path_and_query = Some(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            http::Uri::from_parts(u).ok()
        }
        _ => {
            let authority = fwd
                .host
                .clone()
                .or_else(|| head.header("host").map(str::to_string))
                .unwrap_or_default();
            http::Uri::builder()
                .scheme(http::uri::Scheme::HTTP)
                .authority(authority)
                .path_and_query(http1::routed_target(head, fwd))
                .build()
                .ok()
        }
    };
    // The client's fields as h2 parsed them go up as they are, unless the route modifies
    // them or authentication rewrote the head (a JWT header removed, claims added).
    let headers = if fwd.request_headers.is_empty() && fwd.host.is_none() && !rewritten {
        None
    } else {
        Some(http1::routed_headers(head, fwd, client))
    };
    let xff = {
        let prior = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        match (prior, client_xff) {
            (None, Some(own)) => Ok(own.clone()),
            (Some(p), _) => http::HeaderValue::try_from(format!("{p}, {client}")),
            (None, None) => http::HeaderValue::try_from(client.to_string()),
        }
        .map_err(io::Error::other)
    };
    // The request is assembled field by field (no `http::request::Builder`, which
    // re-validates every header it is given): the client's fields are already valid.
    let build = || -> io::Result<http::Request<()>> {
        let mut req = http::Request::new(());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri
            .clone()
            .ok_or_else(|| io::Error::other("invalid upstream URI"))?;
        let hs = req.headers_mut();
        match &headers {
            None => {
                hs.reserve(parts.headers.len() + 2);
                for (n, v) in &parts.headers {
                    if matches!(
                        n.as_str(),
                        "host" | "x-forwarded-for" | "traceparent" | "content-length"
                    ) {
                        continue;
                    }
                    hs.append(n.clone(), v.clone());
                }
                let trace = head.header("traceparent").unwrap_or("");
                let mut trace = http::HeaderValue::from_str(trace).map_err(io::Error::other)?;
                // New for every request: HPACK "never indexed", so it does not churn the
                // connection's dynamic table (evicting the fields that do repeat).
                trace.set_sensitive(true);
                hs.append(TRACEPARENT, trace);
                let xff = xff.as_ref().map_err(|e| io::Error::other(e.to_string()))?;
                hs.append(X_FORWARDED_FOR, xff.clone());
                // The one [`http1::request_id`] gave a request without its own (new for
                // every request: never indexed, as the `traceparent`).
                if !parts.headers.contains_key(X_REQUEST_ID) {
                    if let Some(id) = head.header("x-request-id") {
                        let mut id = http::HeaderValue::from_str(id).map_err(io::Error::other)?;
                        id.set_sensitive(true);
                        hs.append(X_REQUEST_ID, id);
                    }
                }
            }
            Some(routed) => {
                hs.reserve(routed.len());
                for (n, v) in routed {
                    if n.eq_ignore_ascii_case("host") || HOP_BY_HOP.contains(&n.as_str()) {
                        continue;
                    }
                    let mut value = http::HeaderValue::from_str(v).map_err(io::Error::other)?;
                    value.set_sensitive(
                        n.eq_ignore_ascii_case("traceparent")
                            || n.eq_ignore_ascii_case("x-request-id"),
                    );
                    hs.append(
                        http::HeaderName::from_bytes(n.as_bytes()).map_err(io::Error::other)?,
                        value,
                    );
                }
            }
        }
        match &buffered {
            Some(d) if !d.is_empty() => {
                hs.append(http::header::CONTENT_LENGTH, d.len().into());
            }
            Some(_) => {}
            None => {
                if let Some(cl) = parts.headers.get(http::header::CONTENT_LENGTH) {
                    hs.append(http::header::CONTENT_LENGTH, cl.clone());
                }
            }
        }
        Ok(req)
    };
    for m in &fwd.mirrors {
        if m.sampled(rng) {
            match &buffered {
                Some(d) => {
                    let mut h1 = BytesMut::from(&http1::upstream_head(head, fwd, client)[..]);
                    if !d.is_empty() || says_length(&head.method) {
                        h1 = BytesMut::from(
                            &add_header(h1.to_vec(), &format!("content-length: {}", d.len()))[..],
                        );
                    }
                    h1.extend_from_slice(d);
                    up.mirror(&(m.service.clone(), m.port), http1::shadow(&h1));
                }
                None => up.note(http1::Note::MirrorSkipped),
            }
        }
    }
    let policy = fwd.retry.as_ref().unwrap_or(&DEFAULT_RETRY);
    let replayable = buffered.is_some() && (!has_body || http1::idempotent(&head.method));
    let nonzero = |d: &std::time::Duration| !d.is_zero();
    let remaining = || deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
    let mut retries = 0u32;
    let mut sent = 0u64;
    let mut try_deadline = None;
    let local = |e: &io::Error| (http1::upstream_failure(e), http1::failure_flags(e));
    // Set when the client left while the tries went on.
    let mut gone = None;
    // `stream_idle_timeout` (Envoy's): without a route timeout, the bound on the wait for
    // the response head and on each wait in its relay. The stream's own timer, taken out
    // of `up` while the tries borrow it (put back at the end).
    let mut idle = up.stream_idle().map(|(c, d)| (std::mem::take(c), d));
    let answer = loop {
        let left = remaining();
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "upstream request timeout");
        if left.is_some_and(|d| d.is_zero()) {
            break Err(local(&timed_out()));
        }
        let per_try = match (fwd.timeouts.backend_request.filter(nonzero), left) {
            (Some(b), Some(l)) => Some(b.min(l)),
            (b, l) => b.or(l),
        };
        try_deadline = per_try.map(|t| std::time::Instant::now() + t);
        // Set when the client's body failed under the upload (its reset, its
        // connection's end): the client left, not the endpoint's failure.
        let mut body_failed = false;
        let head_idle = idle.as_mut().filter(|_| per_try.is_none());
        let attempt = async {
            let req = build()?;
            let (resp, mut tx) = up.h2_request(service, req, !has_body).await?;
            match &buffered {
                Some(d) if !d.is_empty() => {
                    send_all(&mut tx, d.clone(), true)
                        .await
                        .map_err(io::Error::other)?;
                    sent = d.len() as u64;
                }
                Some(_) => {}
                None => {
                    let first = buf.split().freeze();
                    sent = first.len() as u64;
                    send_all(&mut tx, first, false)
                        .await
                        .map_err(io::Error::other)?;
                    while let Some(chunk) = body.read().await {
                        let chunk = chunk.inspect_err(|_| body_failed = true)?;
                        sent += chunk.len() as u64;
                        send_all(&mut tx, chunk, false)
                            .await
                            .map_err(io::Error::other)?;
                    }
                    tx.send_data(Bytes::new(), true).map_err(io::Error::other)?;
                }
            }
            match head_idle {
                Some((clock, d)) => match clock.within(Some(*d), resp).await {
                    Some(r) => r.map_err(io::Error::other),
                    None => Err(timed_out()),
                },
                None => resp.await.map_err(io::Error::other),
            }
        };
        let tried = async {
            match per_try {
                Some(t) => match race(attempt, http1::timer(t)).await {
                    Either::Left(r) => r,
                    Either::Right(()) => Err(timed_out()),
                },
                None => attempt.await,
            }
        };
        // As for an HTTP/1.1 upstream: the client's leaving drops the try (its upstream
        // request stream is reset).
        let r = match race(tried, client_gone(respond)).await {
            Either::Left(_) if body_failed => {
                gone = Some("DR");
                break Err((Vec::new(), "DR"));
            }
            Either::Left(r) => r,
            Either::Right(flags) => {
                gone = Some(flags);
                break Err((Vec::new(), flags));
            }
        };
        let again = retries < policy.attempts && replayable;
        match r {
            Ok(resp)
                if again
                    && http1::retried_answer(policy, resp.status().as_u16(), || {
                        grpc_status(resp.headers())
                    })
                    && up.retry_allowed() =>
            {
                up.done(None, resp.status().as_u16(), false, None);
            }
            Ok(resp) => break Ok(resp),
            // Refused by a circuit breaker before any endpoint was picked: not retried.
            Err(e) if crate::breaker::overflow_of(&e).is_some() => break Err(local(&e)),
            Err(e) => {
                up.done(None, 0, false, Some(e.kind()));
                if !again || e.kind() == io::ErrorKind::TimedOut || !up.retry_allowed() {
                    break Err(local(&e));
                }
            }
        }
        retries += 1;
        up.retried();
        let base = policy.backoff.unwrap_or(http1::RETRY_BACKOFF);
        let mut wait = (base * (1 << (retries - 1).min(8))).min(base * 10);
        if let Some(l) = remaining() {
            wait = wait.min(l);
        }
        if let Either::Right(flags) = race(http1::timer(wait), client_gone(respond)).await {
            gone = Some(flags);
            break Err((Vec::new(), flags));
        }
    };
    if let (Some((clock, _)), Some((c, _))) = (idle, up.stream_idle()) {
        *c = clock;
    }
    if let Some(flags) = gone {
        up.cancelled();
        return (0, flags, sent, 0);
    }
    let resp = match answer {
        Ok(r) => r,
        Err((resp, flags)) => {
            let status = resp_status(&resp);
            let n = resp.len() as u64;
            send(respond, resp, head_request).await;
            return (status, flags, sent, n);
        }
    };
    let (mut rparts, mut rx) = resp.into_parts();
    let status = rparts.status.as_u16();
    // A trailers-only gRPC response carries its status in the head (looked for only in
    // the responses to gRPC requests: telemetry ignores it for the others).
    if let Some(g) = grpc.then(|| grpc_status(&rparts.headers)).flatten() {
        up.note(http1::Note::GrpcStatus(g));
    }
    let mut trailer_status = None;
    if !fwd.response_headers.is_empty() {
        let mut hs: Vec<(String, String)> = rparts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        for m in &fwd.response_headers {
            m.apply(&mut hs);
        }
        rparts.headers.clear();
        for (n, v) in hs {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(n.as_bytes()),
                http::HeaderValue::from_str(&v),
            ) {
                rparts.headers.append(n, v);
            }
        }
    }
    let end = rx.is_end_stream() || head_request;
    let out = http::Response::from_parts(rparts, ());
    let Ok(mut tx) = respond.send_response(out, end) else {
        up.done(None, status, false, None);
        return (status, "-", sent, 0);
    };
    let mut n = 0u64;
    let mut ok = true;
    let mut timed_out = false;
    // The body and trailers within the try's time (the route's `backendRequest` and
    // `request` timeouts cover the whole response); past it the stream is reset.
    // Each wait for the upstream's next piece is bounded by `stream_idle_timeout` too.
    let mut idle_out = false;
    let relay = async {
        if end {
            return;
        }
        loop {
            let next = http1::bounded(up, None, rx.data()).await;
            let Some(next) = next else {
                idle_out = true;
                ok = false;
                break;
            };
            let Some(chunk) = next else { break };
            let Ok(chunk) = chunk else {
                ok = false;
                break;
            };
            let _ = rx.flow_control().release_capacity(chunk.len());
            n += chunk.len() as u64;
            // The last piece (END_STREAM received, no trailers queued) carries our
            // END_STREAM too: one DATA frame fewer per response.
            let last = rx.is_end_stream();
            let r = if last && chunk.is_empty() {
                tx.send_data(Bytes::new(), true)
            } else {
                send_all(&mut tx, chunk, last).await
            };
            if r.is_err() {
                ok = false;
                break;
            }
            if last {
                return;
            }
        }
        if ok {
            let trailers = http1::bounded(up, None, rx.trailers()).await;
            let Some(trailers) = trailers else {
                idle_out = true;
                ok = false;
                return;
            };
            match trailers {
                Ok(Some(t)) => {
                    trailer_status = grpc.then(|| grpc_status(&t)).flatten();
                    ok = tx.send_trailers(t).is_ok();
                }
                Ok(None) => ok = tx.send_data(Bytes::new(), true).is_ok(),
                Err(_) => ok = false,
            }
        }
    };
    if http1::within(try_deadline, relay).await.is_none() || idle_out {
        ok = false;
        timed_out = true;
    }
    if let Some(g) = trailer_status {
        up.note(http1::Note::GrpcStatus(g));
    }
    if !ok && !end {
        tx.send_reset(if timed_out {
            h2::Reason::CANCEL
        } else {
            h2::Reason::INTERNAL_ERROR
        });
    }
    let error = match (ok, timed_out) {
        (true, _) => None,
        (false, true) => Some(io::ErrorKind::TimedOut),
        (false, false) => Some(io::ErrorKind::UnexpectedEof),
    };
    up.done(None, status, false, error);
    let flags = match error {
        None => "-",
        Some(io::ErrorKind::TimedOut) => "UT",
        Some(_) => "UPE",
    };
    (status, flags, sent, n)
}

/// The HTTP/2 response head for an HTTP/1.1 one ([`http1::downstream_head`]: the fields
/// HTTP/2 forbids and `transfer-encoding` dropped, one `content-length` and none next to
/// `transfer-encoding`, `ResponseHeaderModifier`s applied).
fn h2_head(raw: &[u8], mods: &[HeaderModifier]) -> io::Result<http::Response<()>> {
    let d = http1::downstream_head(raw, mods, true)
        .ok_or_else(|| io::Error::other("malformed upstream response head"))?;
    let mut b = http::Response::builder().status(d.status);
    for (n, v) in &d.fields {
        b = b.header(n.as_ref(), v.as_ref());
    }
    b.body(()).map_err(io::Error::other)
}

/// `f` (an I/O step of a response's relay) under the stream's `stream_idle_timeout`
/// (`idle`, [`Upstream::stream_idle`]; `None`: no bound): an error of kind `TimedOut` when
/// it waited that long without finishing.
async fn idle_io<T, E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    idle: &mut Option<(&mut http1::Clock, std::time::Duration)>,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> io::Result<T> {
    match crate::body::idle_bound(idle, f).await {
        Ok(r) => r.map_err(io::Error::other),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "stream idle timeout",
        )),
    }
}

/// Send the upstream response (head at the start of `ubuf`, then the body from `conn`) as
/// an HTTP/2 response; the response bytes sent. Each wait of the body's relay (a read
/// upstream, a write downstream) is bounded by `idle` (`stream_idle_timeout`): past it
/// the relay fails `TimedOut`.
async fn write_response<C: Tunnel>(
    respond: &mut SendResponse<Bytes>,
    conn: &mut C,
    h: &http1::RespHead,
    ubuf: &mut BytesMut,
    mods: &[HeaderModifier],
    head_request: bool,
    mut idle: Option<(&mut http1::Clock, std::time::Duration)>,
) -> io::Result<u64> {
    if let Some(w) = &h.whole {
        // Kept as one chunk ([`http1::RespHead::whole`]): read from `ubuf` here.
        ubuf.extend_from_slice(w);
    }
    let raw = ubuf.split_to(h.len);
    let resp = h2_head(&raw, mods)?;
    let no_body = head_request || h.framing == Framing::Length(0);
    let mut tx = respond
        .send_response(resp, no_body)
        .map_err(io::Error::other)?;
    let mut total = raw.len() as u64;
    if no_body {
        return Ok(total);
    }
    let mut left = match h.framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut scan = ChunkScan::default();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    loop {
        let mut chunk = if !ubuf.is_empty() {
            ubuf.split().freeze()
        } else {
            match idle_io(&mut idle, async { Ok::<_, io::Error>(conn.read().await) }).await? {
                Some(Ok(b)) => b,
                Some(Err(e)) => return Err(e),
                None if h.framing == Framing::Eof => break,
                None => return Err(io::Error::other("upstream body truncated")),
            }
        };
        total += chunk.len() as u64;
        let end = match h.framing {
            Framing::Length(_) => {
                let n = (chunk.len() as u64).min(left);
                left -= n;
                if (n as usize) < chunk.len() {
                    ubuf.extend_from_slice(&chunk.split_off(n as usize));
                }
                idle_io(&mut idle, send_all(&mut tx, chunk, false)).await?;
                left == 0
            }
            Framing::Chunked => {
                spans.clear();
                let done = scan
                    .feed_with(&chunk, |a, b| spans.push((a, b)))
                    .map_err(|_| io::Error::other("upstream chunked body malformed"))?;
                for &(a, b) in &spans {
                    if b > a {
                        idle_io(&mut idle, send_all(&mut tx, chunk.slice(a..b), false)).await?;
                    }
                }
                if let Some(n) = done {
                    if n < chunk.len() {
                        ubuf.extend_from_slice(&chunk[n..]);
                    }
                }
                done.is_some()
            }
            Framing::Eof => {
                idle_io(&mut idle, send_all(&mut tx, chunk, false)).await?;
                false
            }
        };
        if end {
            break;
        }
    }
    // END_STREAM (send_all sends nothing for an empty piece).
    tx.send_data(Bytes::new(), true).map_err(io::Error::other)?;
    Ok(total)
}

fn resp_status(resp: &[u8]) -> u16 {
    resp.get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn status_only(status: u16) -> Vec<u8> {
    http1::simple_response(status, &[], "", false)
}

/// Send a complete HTTP/1.1 response (head and body) as an HTTP/2 response.
/// The route's time ran out while the request body was being read: 504 (`UT`), counted.
/// Returns the access-log figures (status, flags, request body bytes, response bytes).
async fn request_body_timeout<U: Upstream>(
    up: &mut U,
    respond: &mut SendResponse<Bytes>,
    head_request: bool,
    body_bytes: u64,
) -> (u16, &'static str, u64, u64) {
    let resp = http1::simple_response(504, &[], "upstream request timeout", false);
    let n = resp.len() as u64;
    up.note(http1::Note::RequestBodyTimeout);
    send(respond, resp, head_request).await;
    (504, "UT", body_bytes, n)
}

/// The request body stopped coming for `stream_idle_timeout`: `408` (`SI`), counted
/// ([`http1::Note::RequestTimeout`]). Returns the access-log figures.
async fn request_body_idle<U: Upstream>(
    up: &mut U,
    respond: &mut SendResponse<Bytes>,
    head_request: bool,
    body_bytes: u64,
) -> (u16, &'static str, u64, u64) {
    up.note(http1::Note::RequestTimeout);
    send(respond, status_only(408), head_request).await;
    (408, "SI", body_bytes, 0)
}

async fn send(respond: &mut SendResponse<Bytes>, h1: Vec<u8>, head_request: bool) {
    let Some((resp, body)) = to_h2(&h1, head_request) else {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    let end = body.is_empty();
    let Ok(mut stream) = respond.send_response(resp, end) else {
        return;
    };
    if !end {
        let mut body = body;
        while !body.is_empty() {
            stream.reserve_capacity(body.len());
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let chunk = body.split_to(cap.min(body.len()));
                    if stream.send_data(chunk, body.is_empty()).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }
}

/// Parse an HTTP/1.1 response into an HTTP/2 head and a decoded body.
pub fn to_h2(h1: &[u8], head_request: bool) -> Option<(http::Response<()>, Bytes)> {
    let mut hs = [httparse::EMPTY_HEADER; 256];
    let mut r = httparse::Response::new(&mut hs);
    let httparse::Status::Complete(n) = r.parse(h1).ok()? else {
        return None;
    };
    let mut b = http::Response::builder().status(r.code?);
    let mut chunked = false;
    for h in r.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name == "transfer-encoding" {
            chunked = String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked");
            continue;
        }
        if HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        b = b.header(name, h.value);
    }
    let raw = &h1[n..];
    let body = if head_request {
        Bytes::new()
    } else if chunked {
        Bytes::from(dechunk(raw)?)
    } else {
        Bytes::copy_from_slice(raw)
    };
    Some((b.body(()).ok()?, body))
}

/// The `grpc-status` of a gRPC response head or trailers.
fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// Decode a complete chunked body (trailers dropped).
pub fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 || &b[size..size + 2] != b"\r\n" {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that is never called: only the types of the stream futures matter.
    struct NoUpstream;

    impl Upstream for NoUpstream {
        type Conn = H2Body;

        async fn connect(
            &mut self,
            _service: Option<&(crate::route::ObjectRef, u16)>,
            _head: &RequestHead,
        ) -> io::Result<(H2Body, bool)> {
            Err(io::Error::other("no upstream"))
        }

        fn done(&mut self, _: Option<H2Body>, _: u16, _: bool, _: Option<io::ErrorKind>) {}

        async fn exchange(
            &mut self,
            _service: Option<&(crate::route::ObjectRef, u16)>,
            _request: Bytes,
            _timeout: Option<std::time::Duration>,
        ) -> io::Result<Vec<u8>> {
            Err(io::Error::other("no upstream"))
        }

        fn mirror(&mut self, _service: &(crate::route::ObjectRef, u16), _request: Bytes) {}
    }

    fn layout_of_output<F: FnOnce() -> T, T>(_: &F) -> (usize, usize) {
        (std::mem::size_of::<T>(), std::mem::align_of::<T>())
    }

    /// Stands for the arguments of a future that is named, never built.
    fn never<T>() -> T {
        panic!("the closures naming the futures are never called")
    }

    /// The runner task and the boxed HTTP/2 forwarding future hold no timer inline: a
    /// monoio timer is 128-byte aligned, and an over-aligned task or box is a
    /// `posix_memalign` per runner or request ([`http1::timer`] boxes them when set). The closures
    /// are never called; they only name the futures' types.
    #[test]
    fn stream_futures_are_not_over_aligned() {
        let stream = || {
            let (runners, shared, job) = never();
            run::<NoUpstream>(runners, shared, job)
        };
        let forward = || {
            let (up, body, parts, head, fwd, respond): (
                &'static mut NoUpstream,
                &'static mut H2Body,
                &'static http::request::Parts,
                &'static RequestHead,
                &'static Forward,
                &'static mut SendResponse<Bytes>,
            ) = never();
            let rng: &'static mut SplitMix64 = never();
            let client = std::net::IpAddr::from([10, 0, 0, 1]);
            forward_h2(
                up, body, parts, head, false, fwd, client, None, respond, false, false, rng, None,
            )
        };
        for (what, (size, align)) in [
            ("runner task", layout_of_output(&stream)),
            ("HTTP/2 forwarding", layout_of_output(&forward)),
        ] {
            assert!(
                align <= 16,
                "{what} future: {size} bytes, aligned to {align}"
            );
        }
    }

    /// A tunnel hands a stream to its last idle runner (none: a new one is made), keeps
    /// at most [`RUNNERS_KEPT`] idle ones, ends those past [`RUNNERS_IDLE`] when trimmed
    /// and all idle ones when it ends (and keeps none after).
    #[test]
    fn runners_are_kept_within_bounds_and_end_with_the_tunnel() {
        use std::future::Future as _;
        let runners = Runners::<u32>::default();
        assert_eq!(runners.hand(1), Some(1), "no idle runner");
        let idle: Vec<Rc<Mailbox<u32>>> = (0..=RUNNERS_KEPT)
            .map(|_| Rc::new(Mailbox::default()))
            .collect();
        for (i, m) in idle.iter().enumerate() {
            assert_eq!(runners.rest(m), i < RUNNERS_KEPT, "runner {i}");
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let last = &idle[RUNNERS_KEPT - 1];
        let mut next = Box::pin(last.next());
        assert!(next.as_mut().poll(&mut cx).is_pending());
        assert_eq!(runners.hand(7), None);
        assert_eq!(next.as_mut().poll(&mut cx), std::task::Poll::Ready(Some(7)));
        runners.trim();
        assert_eq!(runners.idle.borrow().len(), RUNNERS_IDLE);
        assert!(!idle[RUNNERS_IDLE - 1].closed.get());
        assert!(idle[RUNNERS_IDLE..RUNNERS_KEPT - 1]
            .iter()
            .all(|m| m.closed.get()));
        let mut ended = Box::pin(idle[RUNNERS_IDLE].next());
        assert_eq!(ended.as_mut().poll(&mut cx), std::task::Poll::Ready(None));
        runners.close();
        assert!(idle[..RUNNERS_IDLE].iter().all(|m| m.closed.get()));
        assert!(!runners.rest(last), "an ended tunnel keeps no runner");
        assert_eq!(runners.hand(8), Some(8));
    }

    #[test]
    fn h2_response_heads_drop_hop_by_hop_and_overridden_lengths() {
        let r = h2_head(
            b"HTTP/1.1 200 OK\r\nconnection: x-a\r\nx-a: 1\r\nkeep-alive: t=1\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\nx-b: 2\r\n\r\n",
            &[],
        )
        .unwrap();
        let names: Vec<&str> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-b"]);
        let r = h2_head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n",
            &[],
        )
        .unwrap();
        assert_eq!(r.headers().get_all("content-length").iter().count(), 1);
    }

    /// Heads past the stack buffers of [`head_of`] (text and field count) come out the
    /// same as small ones, cookies joined included.
    #[test]
    fn large_heads_convert_whole() {
        for (fields, value_len) in [(3, 2 * STACK_TEXT), (2 * STACK_SPANS, 4), (STACK_SPANS, 40)] {
            let mut b = http::Request::builder()
                .uri("http://echo/a?q=1")
                .header("cookie", "a=1");
            for i in 0..fields {
                b = b.header(format!("x-f{i}"), "v".repeat(value_len));
            }
            let (parts, ()) = b.header("cookie", "b=2").body(()).unwrap().into_parts();
            let head = head_of(&parts).unwrap();
            assert_eq!(
                head.headers.len(),
                fields + 2,
                "host, cookie and the x-f fields"
            );
            assert_eq!(head.header("host"), Some("echo"));
            assert_eq!(head.header("cookie"), Some("a=1; b=2"));
            for i in 0..fields {
                assert_eq!(
                    head.header(&format!("x-f{i}")).map(str::len),
                    Some(value_len)
                );
            }
            assert_eq!((head.method.as_str(), head.path.as_str()), ("GET", "/a"));
            assert_eq!(head.query.as_deref(), Some("q=1"));
        }
    }

    #[test]
    fn cookies_are_joined_for_http1() {
        let req = http::Request::builder()
            .uri("http://echo/a")
            .header("cookie", "a=1")
            .header("x-other", "o")
            .header("cookie", "b=2")
            .header("cookie", "c=3")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let head = head_of(&parts).unwrap();
        let cookies: Vec<&str> = head
            .headers
            .iter()
            .filter(|(n, _)| n == "cookie")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        assert_eq!(head.header("x-other"), Some("o"));
    }
}
