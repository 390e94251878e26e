//! Many requests on one keep-alive HTTP/1.1 tunnel, driven over memory as the bench's
//! `http1-rps` sends them (`GET /100`, a `host` field, a 100-byte answer; the spec's R17
//! route `echo` → `echo-v1`), with the upstream connection kept between requests. Checks
//! what every request sends upstream (its `traceparent`, generated, and `x-forwarded-for`)
//! and what comes back. `HTTP1_LOAD_REQUESTS` sets how many (default 200): run under
//! `valgrind --tool=callgrind` (or memcheck) at two counts, the difference divided by the
//! difference of the counts is the cost of one request in the HTTP/1.1 path.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use waypoint::config::{load_str, WaypointConfig};
use waypoint::http1::{serve, Destination, End, RequestHead, Tunnel, TunnelCtx, Upstream};
use waypoint::lb::SplitMix64;
use waypoint::route::ObjectRef;
use waypoint::spec_example::ECHO_ROUTE;

/// Every future here is ready whenever polled (memory streams): poll to completion.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future did not complete");
}

const REQUEST: &[u8] = b"GET /100 HTTP/1.1\r\nhost: echo.default.svc.cluster.local\r\n\r\n";

/// The upstream's answer: 100 body bytes.
fn response() -> Bytes {
    let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_vec();
    r.extend(std::iter::repeat_n(b'x', 100));
    Bytes::from(r)
}

/// The client's side: one request per read; the responses' status lines counted.
struct Client {
    input: VecDeque<Bytes>,
    written: usize,
    ok: usize,
}

impl Tunnel for Client {
    async fn read(&mut self) -> Option<io::Result<Bytes>> {
        self.input.pop_front().map(Ok)
    }
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.written += data.len();
        if data.starts_with(b"HTTP/1.1 200 OK\r\n") {
            self.ok += 1;
        }
        Ok(())
    }
    async fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One kept upstream connection: the head of each request is checked as it is written;
/// each request gets the same answer.
struct Conn {
    answer: Option<Bytes>,
    response: Bytes,
    heads: usize,
    /// The last checked request's `traceparent` (each request must get a new one).
    last_trace: Vec<u8>,
}

impl Tunnel for Conn {
    async fn read(&mut self) -> Option<io::Result<Bytes>> {
        self.answer.take().map(Ok)
    }
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        assert!(data.starts_with(b"GET /100 HTTP/1.1\r\n"));
        assert!(data.ends_with(b"\r\n\r\n"));
        // Every field of the first requests and of every 100th (the others cheaply: this
        // test is also a workload whose own cost should stay small beside the path's).
        if self.heads < 3 || self.heads % 100 == 0 {
            let head = std::str::from_utf8(&data).expect("a text head");
            assert!(
                head.contains("\r\nhost: echo.default.svc.cluster.local\r\n"),
                "{head}"
            );
            assert!(head.contains("\r\nx-forwarded-for: 10.1.0.1\r\n"), "{head}");
            let trace = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("traceparent: "))
                .unwrap_or_else(|| panic!("no traceparent: {head}"));
            assert!(waypoint::telemetry::valid_traceparent(trace), "{trace}");
            assert_ne!(
                trace.as_bytes(),
                &self.last_trace[..],
                "a new trace each time"
            );
            self.last_trace.clear();
            self.last_trace.extend_from_slice(trace.as_bytes());
        }
        self.heads += 1;
        self.answer = Some(self.response.clone());
        Ok(())
    }
    async fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Keeps one connection, handed out again after each reusable try.
struct Kept {
    conn: Option<Conn>,
    connects: usize,
    heads: usize,
}

impl Upstream for Kept {
    type Conn = Conn;

    async fn connect(
        &mut self,
        service: Option<&(ObjectRef, u16)>,
        _head: &RequestHead,
    ) -> io::Result<(Conn, bool)> {
        assert_eq!(service.map(|(s, _)| s.name.as_str()), Some("echo-v1"));
        match self.conn.take() {
            Some(c) => Ok((c, true)),
            None => {
                self.connects += 1;
                Ok((
                    Conn {
                        answer: None,
                        response: response(),
                        heads: 0,
                        last_trace: Vec::new(),
                    },
                    false,
                ))
            }
        }
    }

    fn done(&mut self, conn: Option<Conn>, status: u16, reusable: bool, _e: Option<io::ErrorKind>) {
        assert_eq!(status, 200);
        assert!(reusable);
        if let Some(c) = conn {
            self.heads = c.heads;
            self.conn = Some(c);
        }
    }

    async fn exchange(
        &mut self,
        _service: Option<&(ObjectRef, u16)>,
        _request: Bytes,
        _timeout: Option<std::time::Duration>,
    ) -> io::Result<Vec<u8>> {
        unreachable!("HTTP/1.1 requests use connect/done")
    }

    fn mirror(&mut self, _service: &(ObjectRef, u16), _request: Bytes) {
        unreachable!("no mirrors on this route")
    }
}

fn cfg() -> WaypointConfig {
    let text = format!(
        r#"
services:
  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["10.96.0.10"], ports: {{80: 8080}}}}
  - {{name: echo-v1, namespace: default, hostname: echo-v1.default.svc.cluster.local, vips: ["10.96.0.11"], ports: {{80: 8080}}}}
---
{ECHO_ROUTE}"#
    );
    load_str(Path::new("c.yaml"), &text, 1).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn keep_alive_requests_each_go_upstream_with_a_new_trace_on_one_kept_connection() {
    let n: usize = std::env::var("HTTP1_LOAD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let cfg = cfg();
    let ctx = TunnelCtx {
        waypoint: ObjectRef::new("default", "waypoint"),
        root_namespace: "istio-system".into(),
        destination: Destination::Service {
            service: ObjectRef::new("default", "echo"),
            port: 80,
        },
        destination_ip: "10.96.0.10".parse().unwrap(),
        destination_port: 80,
        source_ip: "10.1.0.1".parse().unwrap(),
        principal: Some("cluster.local/ns/default/sa/client".into()),
        client_namespace: Some("default".into()),
        traceparent: None,
    };
    // All the requests in one buffer, each read a slice of it (no copy per request).
    let all = Bytes::from(REQUEST.repeat(n));
    let mut client = Client {
        input: (0..n)
            .map(|i| all.slice(i * REQUEST.len()..(i + 1) * REQUEST.len()))
            .collect(),
        written: 0,
        ok: 0,
    };
    let mut up = Kept {
        conn: None,
        connects: 0,
        heads: 0,
    };
    let mut rng = SplitMix64(1);
    let end = block_on(serve(&mut client, &cfg, &ctx, &mut up, &mut rng)).unwrap();
    assert_eq!(end, End::Eof);
    assert_eq!(client.ok, n);
    assert_eq!(client.written, n * response().len());
    assert_eq!(up.heads, n);
    assert_eq!(up.connects, 1);
}
