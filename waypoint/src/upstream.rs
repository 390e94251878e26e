//! Choosing the upstream endpoint of a routed request (R17): a service's endpoints from the
//! mesh model, balanced per service as its DestinationRule says.
//!
//! [`Balancers`] belongs to one worker; on a new snapshot version it rebuilds a service's
//! balancer only if that service's endpoint list or DestinationRule changed, keeping the
//! others' state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_model::model::HBONE_PORT;
use mesh_model::snapshot::Snapshot;

use crate::config::{ServiceLb, WaypointConfig};
use crate::lb::{Balancer, HashInput, Rng};
use crate::route::ObjectRef;

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub workload_uid: String,
    /// `podIP:targetPort`: the HBONE CONNECT `:authority`.
    pub authority: SocketAddr,
    /// Where the tunnel goes: the pod's node's ztunnel on 15008 (or the pod itself).
    pub hbone: SocketAddr,
    /// Outside the mesh (not captured): reached by a connection of its own to
    /// `authority`, not through `hbone` ([`crate::plain`]).
    pub plain: bool,
    /// Its locality priority for this waypoint (0: the closest; see
    /// [`crate::lb::Balancer::with_tiers`]).
    pub tier: u8,
    /// `localityLbSetting.distribute`: its locality group and the group's weight (see
    /// [`crate::lb::Balancer::with_localities`]).
    pub share: Option<(u32, u32)>,
}

/// The healthy endpoints of `service` that serve `port`, in the model's (uid) order; of a
/// subset, those whose workload has all of `labels`; each in its locality priority for the
/// waypoint's own workload `near`: by the service's preference (`trafficDistribution`:
/// fewer scopes shared, a later priority; `internalTrafficPolicy: Local`: only those on its
/// node), else by the DestinationRule's `locality` failover, else all in one. With the
/// DestinationRule's `distribute` weights for the waypoint's locality, each in its
/// locality group with the group's weight, and only those of the localities it names.
pub fn endpoints(
    snap: &Snapshot,
    service: &ObjectRef,
    port: u16,
    labels: Option<&mesh_model::config::LocalSelector>,
    near: Option<&mesh_model::model::Workload>,
    locality: Option<&crate::lb::LocalityLb>,
) -> Vec<Endpoint> {
    let Some(svc) = snap
        .services()
        .find(|s| s.namespace == service.namespace && s.name == service.name)
    else {
        return vec![];
    };
    let listed: Vec<(&mesh_model::model::Workload, Endpoint)> = svc
        .endpoints
        .iter()
        .filter_map(|ep| {
            let w = snap.workload(&ep.workload_uid)?;
            if !w.healthy {
                return None;
            }
            if labels.is_some_and(|l| !l.selects(&w.labels)) {
                return None;
            }
            let tier = match &svc.preference {
                Some(p) => p.tier(near, w)?,
                None => locality.map_or(0, |l| l.tier(near, w)),
            };
            let target = svc.target_port(ep, port)?;
            let ip = *w.ips.first()?;
            let hbone_ip = snap.node(&w.node).map_or(ip, |n| n.ztunnel);
            let ep = Endpoint {
                workload_uid: w.uid.clone(),
                authority: SocketAddr::new(ip, target),
                hbone: SocketAddr::new(hbone_ip, HBONE_PORT),
                plain: !w.captured(),
                tier,
                share: None,
            };
            Some((w, ep))
        })
        .collect();
    let rules = locality.map_or(&[][..], |l| &l.distribute[..]);
    let ws: Vec<&mesh_model::model::Workload> = listed.iter().map(|(w, _)| *w).collect();
    match crate::lb::distribute(rules, near, &ws) {
        None => listed.into_iter().map(|(_, e)| e).collect(),
        Some(crate::lb::Shares { groups, weights }) => listed
            .into_iter()
            .zip(groups)
            .filter_map(|((_, e), g)| {
                let g = g?;
                Some(Endpoint {
                    share: Some((g, weights[g as usize])),
                    ..e
                })
            })
            .collect(),
    }
}

struct Entry {
    /// The snapshot version the endpoints were read from.
    version: u64,
    endpoints: Vec<Endpoint>,
    /// When each endpoint was first seen by this worker's balancer of the service port.
    since: Vec<Instant>,
    /// The DestinationRule it was built with.
    lb: ServiceLb,
    balancer: Balancer,
}

/// A cheap hash for the per-request lookups by keys from the configuration (service names,
/// endpoint addresses), which an outside party cannot choose: FNV-1a's xor-multiply step
/// taken a word at a time (an integer field whole, bytes eight at a time) instead of a byte
/// at a time, and the result mixed once at the end so that its low bits (the table's
/// bucket) depend on every input bit.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl Fnv {
    const BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x100_0000_01b3;

    fn word(&mut self, w: u64) {
        let h = if self.0 == 0 { Self::BASIS } else { self.0 };
        self.0 = (h ^ w).wrapping_mul(Self::PRIME);
    }
}

/// `rest` (1 to 7 bytes) as a little-endian word padded with zeros, read with at most
/// three loads (two overlapping ones from 4 bytes on) rather than a copy of a variable
/// length, which was a `memcpy` call per hashed string.
fn tail_word(rest: &[u8]) -> u64 {
    let n = rest.len();
    let le32 = |b: &[u8]| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if n >= 4 {
        // The bytes both loads cover are the same bytes at the same places.
        le32(rest) | le32(&rest[n - 4..]) << ((n - 4) * 8)
    } else {
        u64::from(rest[0])
            | u64::from(rest[n / 2]) << (n / 2 * 8)
            | u64::from(rest[n - 1]) << ((n - 1) * 8)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        // splitmix64's finalizer: every bit of the state reaches the low bits.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().expect("eight bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // The length tells `ab` from `ab\0`.
            self.word(tail_word(rest) ^ ((rest.len() as u64) << 59));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.word(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.word(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.word(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.word(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.word(i as u64);
    }
}

/// A map hashed with [`Fnv`].
pub type FnvMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// Per-worker balancers, by service, then port.
#[derive(Default)]
pub struct Balancers {
    by_service: FnvMap<ObjectRef, Vec<(u16, Entry)>>,
    /// The waypoint's own address: its workload in the model is where locality
    /// preferences are measured from ([`endpoints`]).
    me: Option<std::net::IpAddr>,
}

impl Balancers {
    /// The balancers of the waypoint at `me`.
    pub fn at(me: std::net::IpAddr) -> Self {
        Balancers {
            me: Some(me),
            ..Default::default()
        }
    }

    /// Choose an endpoint of `service:port`; `None` when it has none. Call
    /// [`Balancers::finish`] with the same key and index when the request ends.
    pub fn pick(
        &mut self,
        cfg: &WaypointConfig,
        service: &ObjectRef,
        port: u16,
        input: &HashInput<'_>,
        now: Instant,
        rng: &mut dyn Rng,
    ) -> Option<(usize, Endpoint)> {
        self.pick_ref(cfg, service, port, input, now, rng)
            .map(|(i, e)| (i, e.clone()))
    }

    /// [`Balancers::pick`] without copying the endpoint.
    pub fn pick_ref(
        &mut self,
        cfg: &WaypointConfig,
        service: &ObjectRef,
        port: u16,
        input: &HashInput<'_>,
        now: Instant,
        rng: &mut dyn Rng,
    ) -> Option<(usize, &Endpoint)> {
        let snap = cfg.mesh.as_ref()?;
        if !self.by_service.contains_key(service) {
            self.by_service.insert(service.clone(), Vec::new());
        }
        let ports = self.by_service.get_mut(service)?;
        let at = match ports.iter().position(|(p, _)| *p == port) {
            Some(at) if ports[at].1.version == snap.version => at,
            found => {
                // A new snapshot (or a first use): keep the balancer's state unless this
                // service's endpoints or its DestinationRule changed.
                let near = self.me.and_then(|ip| snap.workload_by_ip(ip));
                let lb = cfg.lb(service, Some(port));
                let labels = cfg.subset_labels(service);
                let eps = endpoints(snap, service, port, labels, near, lb.locality.as_ref());
                match found {
                    Some(at) if ports[at].1.endpoints == eps && ports[at].1.lb == lb => {
                        ports[at].1.version = snap.version;
                        at
                    }
                    _ => {
                        // When each endpoint was first seen (slow start): kept from the
                        // balancer this one replaces.
                        let seen: FnvMap<(&str, SocketAddr), Instant> = found
                            .map(|at| &ports[at].1)
                            .into_iter()
                            .flat_map(|o| o.endpoints.iter().zip(&o.since))
                            .map(|(e, t)| ((e.workload_uid.as_str(), e.authority), *t))
                            .collect();
                        let since = eps
                            .iter()
                            .map(|e| {
                                let key = (e.workload_uid.as_str(), e.authority);
                                seen.get(&key).copied().unwrap_or(now)
                            })
                            .collect::<Vec<_>>();
                        let mut balancer = Balancer::new(eps.len(), lb.policy.clone(), lb.outlier)
                            .with_tiers(eps.iter().map(|e| e.tier).collect());
                        let shares: Option<Vec<(u32, u32)>> = eps.iter().map(|e| e.share).collect();
                        if let Some(shares) = shares.filter(|s| !s.is_empty()) {
                            balancer = balancer.with_localities(&shares);
                        }
                        if let Some(w) = lb.warmup {
                            balancer = balancer.with_warmup(w, since.clone());
                        }
                        let entry = Entry {
                            version: snap.version,
                            endpoints: eps,
                            since,
                            lb,
                            balancer,
                        };
                        match found {
                            Some(at) => {
                                ports[at].1 = entry;
                                at
                            }
                            None => {
                                ports.push((port, entry));
                                ports.len() - 1
                            }
                        }
                    }
                }
            }
        };
        let entry = &mut ports[at].1;
        let i = entry.balancer.pick(input, now, rng)?;
        entry.balancer.start(i);
        Some((i, &entry.endpoints[i]))
    }

    /// The request to endpoint `i` of `service:port` was abandoned by its client
    /// ([`Balancer::release`]: no verdict on the endpoint).
    pub fn release(&mut self, service: &ObjectRef, port: u16, i: usize) {
        if let Some(b) = self.endpoint(service, port, i) {
            b.release(i);
        }
    }

    /// The balancer of `service:port` when it has an endpoint `i`.
    fn endpoint(&mut self, service: &ObjectRef, port: u16, i: usize) -> Option<&mut Balancer> {
        let (_, e) = self
            .by_service
            .get_mut(service)?
            .iter_mut()
            .find(|(p, _)| *p == port)?;
        (i < e.balancer.len()).then_some(&mut e.balancer)
    }

    /// Whether `service:port`'s DestinationRule balances by a hash of the request (the caller
    /// then passes its headers in [`HashInput`]).
    pub fn hashed(cfg: &WaypointConfig, service: &ObjectRef, port: u16) -> bool {
        cfg.lb_ref(service, Some(port))
            .is_some_and(|lb| matches!(lb.policy, crate::lb::LbPolicy::ConsistentHash(_)))
    }

    /// The request to endpoint `i` of `service:port` ended with `status` (0: no response).
    pub fn finish(&mut self, service: &ObjectRef, port: u16, i: usize, status: u16, now: Instant) {
        if let Some(b) = self.endpoint(service, port, i) {
            b.finish(i, status, now);
        }
    }
}

/// Which idle upstream streams can carry a request: (HBONE address, `podIP:targetPort`
/// authority, original client address). The client address is part of the key because the
/// CONNECT names it (`forwarded`), so a stream only ever carries one client's requests.
/// An upstream connection's key: the HBONE address it goes through (an endpoint outside
/// the mesh: its own address), the endpoint's, and the TLS origination it was made with
/// ([`crate::plain::TlsOrigin::id`], 0: none).
pub type ConnKey = (SocketAddr, SocketAddr, u64);

pub type IdleKey = (SocketAddr, SocketAddr, u64, std::net::IpAddr);

/// How long an idle upstream stream is kept for reuse unless the service's DestinationRule
/// sets `trafficPolicy.connectionPool.http.idleTimeout` (then that, per service: see
/// [`crate::config::WaypointConfig::idle_expiry`]; a backend known to keep connections
/// longer can be given more, one closing sooner less). A kept stream is not read while it
/// waits (watching each would cost a task per stream), so an upstream that closes idle
/// keep-alive connections is only noticed when the stream is taken ([`IdleStreams::take`]
/// skips streams whose receive side ended or holds unsolicited bytes) or on the first
/// try on it (then replaced by a new stream). Backends commonly close idle connections
/// after 5 s or more (Apache httpd 5 s, Node.js 5 s, nginx 75 s), so streams are kept for
/// 4 s: a close after a shorter idle time than this is still found by `take` or the
/// replacement, and none is kept much past its backend's own limit.
pub const IDLE_STREAM_EXPIRY: std::time::Duration = std::time::Duration::from_secs(4);

/// The longest idle time of a kept stream given to a request that cannot be replayed on a
/// new stream if the kept one turns out closed (a streamed body, or a method that is not
/// idempotent): such a request goes on a new stream instead. As nginx and Envoy, which
/// retry only idempotent requests on a reused connection, the risk is kept to the race
/// of an upstream closing at the very moment the request is sent.
pub const UNSAFE_REUSE_MAX_IDLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a kept stream can still carry a request: its receive side has not ended, and
/// no byte arrived on it while idle (an upstream that writes while nothing was asked, a
/// `408` before a close, would have those bytes read as the next response). Looked at
/// without waiting: one poll of the receive side, which is ready with data, its end, or
/// the error of a reset stream or a closed connection.
pub fn idle_stream_usable(s: &mut hbone::stream::H2Stream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    s.recv.poll_data(&mut cx).is_pending()
}

/// End `s`, whose exchanges completed, as a TCP connection is closed: END_STREAM now (the
/// ztunnel at the other end passes it on as a FIN: to the pod upstream, to the client on
/// a downstream tunnel), then its receive side read (and dropped) until the peer ends it
/// too (their close), for at most
/// [`crate::inner::CLOSE_WAIT`] and [`crate::inner::CLOSE_DRAIN_MAX`] bytes (a response
/// body left unread, say), then a reset. Dropping the stream with a side still open
/// would reset it (RST_STREAM CANCEL), which the ztunnel passes on as a TCP reset: that is
/// for failed exchanges only. The wait runs in a task of its own (on the worker).
pub fn close_stream(mut s: hbone::stream::H2Stream) {
    // A side already ended (or a reset stream) has nothing left to end.
    let _ = s.send.send_data(bytes::Bytes::new(), true);
    if s.recv.is_end_stream() {
        return;
    }
    runtime::busy::spawn_tracked(async move {
        // Whether the peer ended its side within the bounds.
        let drain = async {
            let mut n = 0;
            while let Some(Ok(b)) = s.read().await {
                n += b.len();
                if n > crate::inner::CLOSE_DRAIN_MAX {
                    return false;
                }
            }
            true
        };
        let limit = monoio::time::sleep(crate::inner::CLOSE_WAIT);
        if !matches!(
            runtime::worker::race(drain, limit).await,
            runtime::worker::Either::Left(true)
        ) {
            s.reset(h2::Reason::CANCEL);
        }
    });
}

/// The least time between two sweeps of a worker's [`IdleStreams`], whatever the
/// expiries (an expired stream found by `take` is closed anyway).
pub const MIN_SWEEP_PERIOD: Duration = Duration::from_millis(10);

/// Idle upstream streams kept per key, and per worker in all.
pub const MAX_IDLE_PER_KEY: usize = 256;
pub const MAX_IDLE_STREAMS: usize = 4096;

/// A worker's upstream HBONE streams (and connections outside the mesh,
/// [`crate::plain`]) whose last HTTP/1.1 response was complete (HTTP/1.1 keep-alive),
/// shared by all the worker's tunnels: an idle downstream tunnel holds no
/// upstream stream, and the next request to the same endpoint from the same client, on
/// any tunnel of the worker, reuses the most recently used one. A stream idle for its
/// expiry (the service's DestinationRule `connectionPool.http.idleTimeout`, by default
/// [`IDLE_STREAM_EXPIRY`]; given with each [`IdleStreams::put`]) is closed ([`close_stream`]; an upstream that
/// closed one meanwhile is found on reuse, and the request goes on a new stream); a
/// worker's timer sweeps them every half of the shortest expiry kept
/// ([`IdleStreams::sweep_period`]) when the traffic stops. One per worker: no lock.
pub struct IdleStreams {
    by_key: FnvMap<IdleKey, std::collections::VecDeque<Kept>>,
    total: usize,
    swept: Instant,
    /// The shortest expiry of the streams kept at the last sweep or put since.
    shortest: Duration,
}

/// A kept stream, when it was put back, how long it may stay idle, and how many requests
/// it carried (for `maxRequestsPerConnection`).
struct Kept {
    stream: crate::plain::UpStream,
    at: Instant,
    expiry: Duration,
    uses: u32,
}

impl Kept {
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.at) >= self.expiry
    }
    /// End the kept stream: its exchanges completed ([`close_stream`]).
    fn close(self) {
        self.stream.close();
    }
    /// Abort it (the worker drains).
    fn reset(mut self) {
        self.stream.reset(h2::Reason::CANCEL);
    }
}

impl Default for IdleStreams {
    fn default() -> Self {
        IdleStreams {
            by_key: FnvMap::default(),
            total: 0,
            swept: Instant::now(),
            shortest: IDLE_STREAM_EXPIRY,
        }
    }
}

impl IdleStreams {
    /// The most recently kept usable stream for `key` (and the requests it carried) that has been idle for less than
    /// `max_idle` and its own expiry. Expired streams, and those found closed or holding
    /// unsolicited bytes ([`idle_stream_usable`]), are closed ([`close_stream`]).
    pub fn take(
        &mut self,
        key: &IdleKey,
        now: Instant,
        max_idle: Duration,
    ) -> Option<(crate::plain::UpStream, u32)> {
        if self.sweep_due(now) {
            self.sweep(now);
        }
        let q = self.by_key.get_mut(key)?;
        let mut found = None;
        let mut i = q.len();
        // Newest first; an expired one (expiries may differ: one endpoint can serve
        // several services) is closed wherever it is.
        while i > 0 {
            i -= 1;
            if q[i].expired(now) {
                if let Some(k) = q.remove(i) {
                    self.total -= 1;
                    k.close();
                }
                continue;
            }
            if now.saturating_duration_since(q[i].at) >= max_idle {
                // Too old for this request (the rest are older still), not for others.
                break;
            }
            let Some(mut k) = q.remove(i) else { break };
            self.total -= 1;
            if k.stream.usable_idle() {
                found = Some((k.stream, k.uses));
                break;
            }
            k.close();
        }
        // An emptied key stays (with its queue's storage) for the stream this request
        // puts back; the sweep removes it if it stays empty.
        found
    }

    /// Keep `s` for the next request to `key`, for at most `expiry` idle; close it when
    /// the limits are reached.
    pub fn put(
        &mut self,
        key: IdleKey,
        s: crate::plain::UpStream,
        uses: u32,
        now: Instant,
        expiry: Duration,
    ) {
        // Sweep every quarter of the shortest expiry (at least
        // [`MIN_SWEEP_PERIOD`] apart), and when the keys left empty reach the streams' bound
        // (each sweep then removes at least that many: keys never outgrow twice
        // [`MAX_IDLE_STREAMS`] for long).
        if self.sweep_due(now) || self.by_key.len() >= 2 * MAX_IDLE_STREAMS {
            self.sweep(now);
        }
        if self.total >= MAX_IDLE_STREAMS || expiry.is_zero() {
            s.close();
            return;
        }
        let q = self.by_key.entry(key).or_default();
        if q.len() >= MAX_IDLE_PER_KEY {
            s.close();
            return;
        }
        q.push_back(Kept {
            stream: s,
            at: now,
            expiry,
            uses,
        });
        self.total += 1;
        self.shortest = self.shortest.min(expiry);
    }

    /// Streams kept now.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Keys held now, with streams or left empty until the next sweep.
    pub fn keys(&self) -> usize {
        self.by_key.len()
    }

    /// How often the worker's timer sweeps: half the shortest expiry of the streams kept
    /// at the last sweep (at most half [`IDLE_STREAM_EXPIRY`], at least
    /// [`MIN_SWEEP_PERIOD`]). A stream is closed at most one period (≤ 2 s) past its expiry.
    pub fn sweep_period(&self) -> Duration {
        (self.shortest.min(IDLE_STREAM_EXPIRY) / 2).max(MIN_SWEEP_PERIOD)
    }

    /// Whether `take`/`put` sweep first: a quarter of the shortest expiry, but at least
    /// [`MIN_SWEEP_PERIOD`], since the last sweep (an `idleTimeout` of a few milliseconds
    /// would otherwise have nearly every request walk the whole pool).
    fn sweep_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.swept) >= (self.shortest / 4).max(MIN_SWEEP_PERIOD)
    }

    /// Close the expired streams of every key; remove the keys left empty. Also run on
    /// `take`, `put` and by each worker's timer, so that streams do not stay open after
    /// the traffic stopped.
    pub fn sweep(&mut self, now: Instant) {
        self.swept = now;
        let total = &mut self.total;
        let mut shortest = IDLE_STREAM_EXPIRY;
        self.by_key.retain(|_, q| {
            let mut i = 0;
            while i < q.len() {
                if q[i].expired(now) {
                    if let Some(k) = q.remove(i) {
                        *total -= 1;
                        k.close();
                    }
                } else {
                    shortest = shortest.min(q[i].expiry);
                    i += 1;
                }
            }
            !q.is_empty()
        });
        self.shortest = shortest;
    }

    /// Reset every kept stream (the worker drains).
    pub fn clear(&mut self) {
        for (_, q) in self.by_key.drain() {
            for k in q {
                k.reset();
            }
        }
        self.total = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map hash spreads keys that differ only in a high byte (endpoint addresses of one
    /// subnet, one port) over the table's buckets, which take the hash's low bits: a
    /// word-at-a-time multiply alone would put all 256 in one bucket.
    #[test]
    fn fnv_spreads_addresses_over_low_bits() {
        use std::hash::BuildHasher;
        let b = std::hash::BuildHasherDefault::<Fnv>::default();
        let low: std::collections::HashSet<u64> = (0..=255u8)
            .map(|x| {
                let a = SocketAddr::from(([10, 0, x, 1], 15008));
                b.hash_one((a, a, a.ip())) & 0xff
            })
            .collect();
        assert!(low.len() >= 128, "{} distinct low bytes of 256", low.len());
    }

    /// The last 1 to 7 bytes of a hashed string are read as one zero-padded
    /// little-endian word, whatever their length and values.
    #[test]
    fn fnv_tail_word_is_the_padded_bytes() {
        let bytes: Vec<u8> = (0..7u8).map(|i| 0x81 + i * 0x13).collect();
        for n in 1..=7 {
            let mut padded = [0u8; 8];
            padded[..n].copy_from_slice(&bytes[..n]);
            assert_eq!(
                tail_word(&bytes[..n]),
                u64::from_le_bytes(padded),
                "{n} bytes"
            );
            assert_eq!(
                tail_word(&[0xff; 8][..n]),
                u64::MAX >> ((8 - n) * 8),
                "{n} × 0xff"
            );
        }
    }

    /// `take`/`put` sweep every quarter of the shortest expiry kept, but never more often
    /// than [`MIN_SWEEP_PERIOD`]: an `idleTimeout` of 1 ms does not make every request
    /// walk the whole pool.
    #[test]
    fn sweeps_on_take_and_put_are_at_least_the_floor_apart() {
        let mut p = IdleStreams::default();
        let t0 = p.swept;
        // The default expiry: a quarter of it.
        assert!(!p.sweep_due(t0 + IDLE_STREAM_EXPIRY / 4 - Duration::from_millis(1)));
        assert!(p.sweep_due(t0 + IDLE_STREAM_EXPIRY / 4));
        // A 1 ms expiry kept: the floor, not a quarter of a millisecond.
        p.shortest = Duration::from_millis(1);
        assert!(!p.sweep_due(t0 + Duration::from_millis(1)));
        assert!(!p.sweep_due(t0 + MIN_SWEEP_PERIOD - Duration::from_micros(1)));
        assert!(p.sweep_due(t0 + MIN_SWEEP_PERIOD));
        assert_eq!(p.sweep_period(), MIN_SWEEP_PERIOD);
        // `0s` ("no idle timeout") is kept as Duration::MAX: it never lowers the period.
        p.shortest = Duration::MAX;
        assert_eq!(p.sweep_period(), IDLE_STREAM_EXPIRY / 2);
        // A sweep of the empty pool restarts the count.
        p.sweep(t0 + Duration::from_secs(1));
        assert!(!p.sweep_due(t0 + Duration::from_secs(1)));
        assert_eq!(p.shortest, IDLE_STREAM_EXPIRY);
    }
}
