//! ztunnel's DNS proxy (Istio's ztunnel DNS capture): captured pods' DNS queries (UDP port
//! 53, redirected here by [`crate::capture`]) are answered from the mesh model when they
//! ask for a service's hostname — its VIPs, so that a ServiceEntry (whose VIP may have
//! been allocated, [`mesh_model::config::allocate_vip`]) or a Service is reached through
//! the mesh, and through its waypoint — and passed on to the upstream resolvers
//! otherwise, the answer relayed as it came.
//!
//! * `A`/`AAAA` for a hostname of the model ([`mesh_model::names::host_key`]: any case,
//!   trailing dot or not): its VIPs of that family, TTL 30 s, authoritative; none of that
//!   family: an empty answer (`NOERROR`), not a forward.
//! * Anything else (another name or type, several questions): forwarded to the first
//!   upstream, then the next after a 2 s silence; none answered: `SERVFAIL`. At most
//!   [`MAX_FORWARDS`] forwards at once; past that, `SERVFAIL` at once.
//! * A query that does not parse (or a response sent to the proxy) is dropped, counted.
//!
//! The wire format is read by hand (RFC 1035 §4: the 12-byte header, one question's
//! labels, type and class) — the little this needs — and the answers point back at the
//! question's name (`0xC00C`).
//!
//! UDP and TCP, on the same port (the capture redirects both). Over TCP (RFC 7766: each
//! message after its two-byte length; a connection may carry several queries, answered in
//! turn) a query is forwarded over TCP, so a client that retried with TCP after a
//! truncated answer gets the whole one. At most [`MAX_TCP_CONNECTIONS`] connections at
//! once (one more is closed, counted failed); one silent for [`TCP_IDLE`], or sending what
//! is not a query, is closed.
//!
//! Counters: `ztunnel_dns_requests_total{result="answered|forwarded|failed|malformed"}`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mesh_model::snapshot::Snapshot;

/// TTL of the answers from the model (Istio's ztunnel answers with 30 s).
pub const TTL: u32 = 30;

/// Forwards in flight at most.
pub const MAX_FORWARDS: usize = 64;

/// How long an upstream resolver is waited for.
pub const UPSTREAM_WAIT: Duration = Duration::from_secs(2);

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// One question, as read from a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired (echoed in the answer).
    pub rd: bool,
    /// Lower case, without the trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question ends in the query (header and question are copied into the
    /// answer).
    pub end: usize,
}

/// The query in `buf`, when it is a standard query with exactly one question; `None` for
/// anything else (forwarded as it is when it is a query at all: see [`is_query`]).
pub fn parse_query(buf: &[u8]) -> Option<Query> {
    if !is_query(buf) {
        return None;
    }
    let flags = u16::from_be_bytes([buf[2], buf[3]]);
    let opcode = (flags >> 11) & 0xf;
    let count = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
    if opcode != 0 || count(4) != 1 || count(6) != 0 || count(8) != 0 {
        return None;
    }
    let mut i = 12;
    let mut name = String::new();
    loop {
        let len = *buf.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        // No compression pointer in a question of one name; labels of 1..=63 bytes.
        if len > 63 {
            return None;
        }
        let label = buf.get(i..i + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            // Host names only: what a service hostname can be.
            if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return None;
            }
            name.push(b.to_ascii_lowercase() as char);
        }
        i += len;
        if name.len() > 253 {
            return None;
        }
    }
    let qtype = u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]);
    let qclass = u16::from_be_bytes([*buf.get(i + 2)?, *buf.get(i + 3)?]);
    Some(Query {
        id: u16::from_be_bytes([buf[0], buf[1]]),
        rd: flags & 0x0100 != 0,
        name,
        qtype,
        qclass,
        end: i + 4,
    })
}

/// Whether `buf` is a DNS query at all (a header, QR clear): what may be forwarded.
pub fn is_query(buf: &[u8]) -> bool {
    buf.len() >= 12 && buf[2] & 0x80 == 0
}

/// The answer to `q` (read from `query`) with `ips` (those of the asked family), from the
/// mesh model: authoritative, `NOERROR`.
pub fn answer(query: &[u8], q: &Query, ips: &[IpAddr]) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.end + ips.len() * 28);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, AA, RD as asked, RA; opcode 0, rcode 0.
    let flags: u16 = 0x8000 | 0x0400 | if q.rd { 0x0100 } else { 0 } | 0x0080;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query[12..q.end]);
    for ip in ips {
        out.extend_from_slice(&[0xc0, 0x0c]);
        let (t, data): (u16, Vec<u8>) = match ip {
            IpAddr::V4(v) => (TYPE_A, v.octets().to_vec()),
            IpAddr::V6(v) => (TYPE_AAAA, v.octets().to_vec()),
        };
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// `SERVFAIL` for the query in `query` (its header and question as they came).
pub fn servfail(query: &[u8]) -> Vec<u8> {
    let mut out = query.to_vec();
    out[2] = 0x80 | (query[2] & 0x79);
    // RA, rcode 2.
    out[3] = 0x80 | 0x02;
    // No answer, authority or additional records.
    out[6..12].fill(0);
    out
}

/// What the model answers for `q`: `Some` (the VIPs of the asked family, perhaps none)
/// when its name is a hostname of the model and it asks `A` or `AAAA` in class `IN`;
/// `None` when it is to be forwarded.
pub fn lookup(snap: &Snapshot, q: &Query) -> Option<Vec<IpAddr>> {
    if q.qclass != CLASS_IN || !(q.qtype == TYPE_A || q.qtype == TYPE_AAAA) {
        return None;
    }
    let svc = snap.service_by_host(&q.name)?;
    let v4 = q.qtype == TYPE_A;
    Some(
        svc.vips
            .iter()
            .map(|(_, ip)| *ip)
            .filter(|ip| ip.is_ipv4() == v4)
            .collect(),
    )
}

/// What the proxy did with the queries it got.
#[derive(Debug, Default)]
pub struct DnsCounters {
    pub answered: AtomicU64,
    pub forwarded: AtomicU64,
    pub failed: AtomicU64,
    pub malformed: AtomicU64,
}

impl DnsCounters {
    /// Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::from("# HELP ztunnel_dns_requests_total DNS queries of captured pods, by what the proxy did: answered from the mesh model, forwarded upstream, failed (SERVFAIL), malformed (dropped).\n# TYPE ztunnel_dns_requests_total counter\n");
        for (result, c) in [
            ("answered", &self.answered),
            ("forwarded", &self.forwarded),
            ("failed", &self.failed),
            ("malformed", &self.malformed),
        ] {
            out.push_str(&format!(
                "ztunnel_dns_requests_total{{result=\"{result}\"}} {}\n",
                c.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// The nameservers of `/etc/resolv.conf` (port 53): the default upstreams.
pub fn system_upstreams() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = it.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The running proxy: stopped (and its threads joined) when dropped.
pub struct DnsProxy {
    /// Its address, UDP and TCP.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for DnsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The TCP accept loop waits in `accept`: a connection wakes it to see the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What is answered to one query (UDP datagram or TCP message).
enum Decision {
    /// Sent back as it is.
    Reply(Vec<u8>),
    /// For the upstreams.
    Forward,
    /// Not a query: nothing is answered.
    Drop,
}

/// The shared part of both transports: the lookup, the counters, the forward slots.
struct Core<L> {
    upstreams: Vec<SocketAddr>,
    lookup: L,
    counters: Arc<DnsCounters>,
    in_flight: AtomicUsize,
}

impl<L: Fn(&Query) -> Option<Vec<IpAddr>>> Core<L> {
    /// Answered from the model, refused (no upstream, or [`MAX_FORWARDS`] in flight: the
    /// slot taken otherwise is given back with [`Core::forwarded`]), or forwarded.
    fn decide(&self, query: &[u8]) -> Decision {
        if !is_query(query) {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return Decision::Drop;
        }
        if let Some(q) = parse_query(query) {
            if let Some(ips) = (self.lookup)(&q) {
                self.counters.answered.fetch_add(1, Ordering::Relaxed);
                return Decision::Reply(answer(query, &q, &ips));
            }
        }
        if self.upstreams.is_empty()
            || self.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_FORWARDS
        {
            if !self.upstreams.is_empty() {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            return Decision::Reply(servfail(query));
        }
        Decision::Forward
    }

    /// A forward decided by [`Core::decide`] ended with `answer`: what to send back (the
    /// upstream's answer, else `SERVFAIL`), its slot given back.
    fn forwarded(&self, query: &[u8], answer: Option<Vec<u8>>) -> Vec<u8> {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        match answer {
            Some(a) => {
                self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                a
            }
            None => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                servfail(query)
            }
        }
    }
}

/// Serve DNS on `listen`, over UDP and over TCP (RFC 7766: two-byte length before each
/// message, several queries per connection), answering what `lookup` answers (the mesh
/// model in force: [`lookup`]) and forwarding the rest to `upstreams` — over the
/// transport the query came on.
pub fn serve(
    listen: SocketAddr,
    upstreams: Vec<SocketAddr>,
    lookup: impl Fn(&Query) -> Option<Vec<IpAddr>> + Send + Sync + 'static,
    counters: Arc<DnsCounters>,
) -> io::Result<DnsProxy> {
    let socket = UdpSocket::bind(listen)?;
    // Woken now and then to see the stop flag.
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let addr = socket.local_addr()?;
    // TCP on the same port (the one picked for UDP when `listen` asked for any).
    let tcp = TcpListener::bind(addr)?;
    let stop = Arc::new(AtomicBool::new(false));
    let core = Arc::new(Core {
        upstreams,
        lookup,
        counters,
        in_flight: AtomicUsize::new(0),
    });
    let (s2, c2) = (stop.clone(), core.clone());
    let udp = std::thread::Builder::new()
        .name("dns-proxy".into())
        .spawn(move || serve_udp(socket, &s2, c2))?;
    let (s3, c3) = (stop.clone(), core);
    let tcp = std::thread::Builder::new()
        .name("dns-proxy-tcp".into())
        .spawn(move || serve_tcp(tcp, &s3, c3));
    let tcp = match tcp {
        Ok(t) => t,
        Err(e) => {
            stop.store(true, Ordering::SeqCst);
            let _ = udp.join();
            return Err(e);
        }
    };
    Ok(DnsProxy {
        addr,
        stop,
        threads: vec![udp, tcp],
    })
}

fn serve_udp<L>(socket: UdpSocket, stop: &AtomicBool, core: Arc<Core<L>>)
where
    L: Fn(&Query) -> Option<Vec<IpAddr>> + Send + Sync + 'static,
{
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "dns proxy: receive failed");
                continue;
            }
        };
        let query = &buf[..n];
        match core.decide(query) {
            Decision::Reply(a) => {
                let _ = socket.send_to(&a, from);
            }
            Decision::Drop => {}
            Decision::Forward => {
                let Ok(reply) = socket.try_clone() else {
                    let _ = socket.send_to(&core.forwarded(query, None), from);
                    continue;
                };
                let (query, c) = (query.to_vec(), core.clone());
                let spawned = std::thread::Builder::new()
                    .name("dns-forward".into())
                    .spawn(move || {
                        let answer = forward(&query, &c.upstreams);
                        let _ = reply.send_to(&c.forwarded(&query, answer), from);
                    });
                if spawned.is_err() {
                    let _ = socket.send_to(&core.forwarded(&buf[..n], None), from);
                }
            }
        }
    }
}

/// TCP connections served at once at most; one more is closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;

/// How long a TCP connection may sit between queries (or in the middle of one).
pub const TCP_IDLE: Duration = Duration::from_secs(10);

fn serve_tcp<L>(listener: TcpListener, stop: &AtomicBool, core: Arc<Core<L>>)
where
    L: Fn(&Query) -> Option<Vec<IpAddr>> + Send + Sync + 'static,
{
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_TCP_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            core.counters.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let (c, o) = (core.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("dns-tcp".into())
            .spawn(move || {
                tcp_connection(conn, &c);
                o.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One client's TCP connection: its queries answered in turn until it closes, sends what
/// is not a query (the stream cannot be trusted past it), or stays silent [`TCP_IDLE`].
fn tcp_connection<L: Fn(&Query) -> Option<Vec<IpAddr>>>(mut conn: TcpStream, core: &Core<L>) {
    if conn.set_read_timeout(Some(TCP_IDLE)).is_err()
        || conn.set_write_timeout(Some(TCP_IDLE)).is_err()
    {
        return;
    }
    while let Some(query) = read_message(&mut conn) {
        let out = match core.decide(&query) {
            Decision::Reply(a) => a,
            Decision::Drop => return,
            Decision::Forward => {
                let answer = forward_tcp(&query, &core.upstreams);
                core.forwarded(&query, answer)
            }
        };
        if write_message(&mut conn, &out).is_err() {
            return;
        }
    }
}

/// One length-prefixed message (RFC 1035 §4.2.2); `None` at the end of the stream, on an
/// error or timeout, or for an empty one.
fn read_message(conn: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).ok()?;
    let len = u16::from_be_bytes(len) as usize;
    if len == 0 {
        return None;
    }
    let mut msg = vec![0u8; len];
    conn.read_exact(&mut msg).ok()?;
    Some(msg)
}

fn write_message(conn: &mut impl Write, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    conn.write_all(&out)
}

/// Ask `upstreams` in turn: the first answer with the query's ID.
fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    let id = &query[..2];
    for up in upstreams {
        let local: SocketAddr = if up.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(s) = UdpSocket::bind(local) else {
            continue;
        };
        if s.connect(up).is_err()
            || s.set_read_timeout(Some(UPSTREAM_WAIT)).is_err()
            || s.send(query).is_err()
        {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        // A datagram with another ID (a stray answer) is read past, until the wait ends.
        while let Ok(n) = s.recv(&mut buf) {
            if is_answer_to(&buf[..n], id) {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

/// [`forward`] over TCP: each upstream in turn, connected, asked and read within
/// [`UPSTREAM_WAIT`] each.
fn forward_tcp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    let id = &query[..2];
    for up in upstreams {
        let Ok(mut s) = TcpStream::connect_timeout(up, UPSTREAM_WAIT) else {
            continue;
        };
        if s.set_read_timeout(Some(UPSTREAM_WAIT)).is_err()
            || s.set_write_timeout(Some(UPSTREAM_WAIT)).is_err()
            || write_message(&mut s, query).is_err()
        {
            continue;
        }
        match read_message(&mut s) {
            Some(a) if is_answer_to(&a, id) => return Some(a),
            _ => continue,
        }
    }
    None
}

/// A response carrying the query ID `id`.
fn is_answer_to(msg: &[u8], id: &[u8]) -> bool {
    msg.len() >= 12 && &msg[..2] == id && msg[2] & 0x80 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` of `qtype` with ID 0x1234, RD set.
    pub fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    #[test]
    fn parses_a_query_and_answers_with_pointers_to_its_name() {
        let raw = query("HttpBin.ORG.", TYPE_A);
        let q = parse_query(&raw).unwrap();
        assert_eq!(
            (q.id, q.rd, q.name.as_str(), q.qtype, q.qclass, q.end),
            (0x1234, true, "httpbin.org", TYPE_A, CLASS_IN, raw.len())
        );
        let ips: Vec<IpAddr> = vec!["240.240.0.1".parse().unwrap()];
        let a = answer(&raw, &q, &ips);
        // Header: same ID, QR|AA|RD|RA, 1 question, 1 answer.
        assert_eq!(&a[..12], &[0x12, 0x34, 0x85, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
        // The question as it came, then the record.
        assert_eq!(&a[12..raw.len()], &raw[12..]);
        assert_eq!(
            &a[raw.len()..],
            &[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 240, 240, 0, 1]
        );
    }

    #[test]
    fn refuses_what_is_not_one_plain_question() {
        // Too short, a response, two questions, an opcode other than QUERY, a pointer in
        // the name, a name running past the end, a label with a byte no hostname has.
        let mut response = query("a.b", TYPE_A);
        response[2] |= 0x80;
        let mut two = query("a.b", TYPE_A);
        two[5] = 2;
        let mut notify = query("a.b", TYPE_A);
        notify[2] |= 4 << 3;
        let mut pointer = query("a.b", TYPE_A);
        pointer[12] = 0xc0;
        let cut = query("abc.d", TYPE_A)[..15].to_vec();
        let odd = query("a b.c", TYPE_A);
        for (what, raw) in [
            ("short", vec![0u8; 5]),
            ("response", response),
            ("two", two),
            ("notify", notify),
            ("pointer", pointer),
            ("cut", cut),
            ("odd", odd),
        ] {
            assert_eq!(parse_query(&raw), None, "{what}");
        }
    }

    /// Mutated queries (bytes flipped, cut, extended; a fixed-seed generator): parsing
    /// never panics, and whatever parses is answered without panicking.
    #[test]
    fn mutated_queries_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let base = query("api.example.com", TYPE_A);
        let ips: Vec<IpAddr> = vec!["240.240.0.1".parse().unwrap()];
        let mut parsed = 0;
        for _ in 0..200_000 {
            let mut q = base.clone();
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % q.len();
                match next() % 3 {
                    0 => q[i] = next() as u8,
                    1 => q.truncate(i),
                    _ => q.insert(i, next() as u8),
                }
                if q.is_empty() {
                    break;
                }
            }
            if let Some(p) = parse_query(&q) {
                parsed += 1;
                let a = answer(&q, &p, &ips);
                assert_eq!(&a[..2], &q[..2]);
            }
            if is_query(&q) {
                assert_eq!(servfail(&q).len(), q.len());
            }
        }
        // The generator does reach parsable queries, not only garbage.
        assert!(parsed > 1000, "{parsed}");
    }

    #[test]
    fn servfail_keeps_the_question_and_clears_the_records() {
        let raw = query("x.y", TYPE_AAAA);
        let f = servfail(&raw);
        assert_eq!(&f[..4], &[0x12, 0x34, 0x81, 0x82]);
        assert_eq!(&f[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&f[12..], &raw[12..]);
    }
}
