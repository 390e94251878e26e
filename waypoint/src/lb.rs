//! Load balancing per service, configured the way Istio's `DestinationRule` does
//! (`trafficPolicy.loadBalancer`, `trafficPolicy.outlierDetection`).
//!
//! Pure and deterministic: randomness comes from an injected [`Rng`], time from the `now`
//! the caller passes. A [`Balancer`] belongs to one worker (thread-per-core), so it needs no
//! locks; its request counts are that worker's view, as with Envoy's per-thread balancers.

use mesh_model::model::{Scope, Workload};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A source of random numbers (injected, so tests are reproducible).
pub trait Rng {
    fn next_u64(&mut self) -> u64;

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (no modulo bias worth measuring).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// SplitMix64: small, fast, good enough for balancing; seeded explicitly.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl Rng for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// What a consistent hash is computed from (`consistentHash` in a DestinationRule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// `httpHeaderName`: the value of this request header (name lower-cased).
    Header(String),
    /// `httpCookie`: the value of this cookie.
    Cookie(CookieKey),
    /// `useSourceIp: true`.
    SourceIp,
    /// `httpQueryParameterName`: the value of this query parameter (its first, as sent).
    Query(String),
}

/// `consistentHash.httpCookie`: the cookie hashed on and, with a `ttl`, the one the
/// waypoint gives a client that sent none (Envoy's generated cookie: `Set-Cookie:
/// name="value"; Max-Age=ttl; Path=path; HttpOnly`, no `Max-Age` for a `ttl` of 0, a
/// session cookie).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieKey {
    pub name: String,
    pub ttl: Option<Duration>,
    pub path: Option<String>,
    /// `attributes`: `name` or `name=value`, appended as given.
    pub attributes: Vec<(String, Option<String>)>,
}

impl CookieKey {
    /// The `Set-Cookie` value that gives the client cookie `value`.
    pub fn set_cookie(&self, value: &str) -> String {
        let mut out = format!("{}=\"{value}\"", self.name);
        if let Some(ttl) = self.ttl.filter(|t| !t.is_zero()) {
            out.push_str(&format!("; Max-Age={}", ttl.as_secs()));
        }
        if let Some(p) = self.path.as_deref().filter(|p| !p.is_empty()) {
            out.push_str(&format!("; Path={p}"));
        }
        out.push_str("; HttpOnly");
        for (n, v) in &self.attributes {
            match v {
                Some(v) => out.push_str(&format!("; {n}={v}")),
                None => out.push_str(&format!("; {n}")),
            }
        }
        out
    }

    /// The value of this cookie in the request fields `headers`, surrounding double
    /// quotes removed (as Envoy reads it).
    pub fn value_in<'a>(
        &self,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<&'a str> {
        headers
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(n, _)| *n == self.name)
            .map(|(_, v)| {
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v)
            })
    }
}

/// `loadBalancer.simple` or `loadBalancer.consistentHash`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// Power of two choices: two random endpoints, the one with fewer active requests.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    ConsistentHash(HashKey),
}

/// `outlierDetection`: consecutive 5xx (or, when set, consecutive gateway errors: 502, 503,
/// 504 and connection failures) → ejected for `base_ejection_time` × the endpoint's
/// ejection multiplier, at most [`MAX_EJECTION_TIME`] (or `base_ejection_time` when that is
/// longer), never more than `max_ejection_percent` of the endpoints (at least one may
/// always be). The multiplier grows by one per ejection while the time is below that cap,
/// and shrinks by one per `interval` the endpoint spends not ejected (Envoy's ejection
/// backoff). Unlike Envoy, whose sweeps every `interval` also return ejected endpoints, an
/// ejection here ends at its exact time (Envoy's ends up to one `interval` later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// `interval`: the time an endpoint back in service takes to lose one step of its
    /// ejection multiplier.
    pub interval: Duration,
    /// `consecutiveGatewayErrors` (0: off, Istio's default): 502, 503, 504 or a connection
    /// failure this many times in a row ejects too; any other answer resets the count.
    pub consecutive_gateway: u32,
}

/// Envoy's `max_ejection_time` default (Istio does not expose it): the longest ejection,
/// unless `base_ejection_time` is longer.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Istio's default outlier-detection `interval`: how often an endpoint that is not ejected
/// loses one step of its ejection multiplier (Envoy does it at each sweep).
pub const EJECTION_DECAY_INTERVAL: Duration = Duration::from_secs(10);

impl OutlierDetection {
    /// The longest ejection: [`MAX_EJECTION_TIME`], or the base time when longer.
    pub fn ejection_cap(&self) -> Duration {
        MAX_EJECTION_TIME.max(self.base_ejection_time)
    }
}

impl Default for OutlierDetection {
    /// Istio's defaults.
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            interval: EJECTION_DECAY_INTERVAL,
            consecutive_gateway: 0,
        }
    }
}

/// The per-request inputs of a consistent hash.
#[derive(Debug, Clone, Copy, Default)]
pub struct HashInput<'a> {
    pub headers: &'a [(&'a str, &'a str)],
    pub source_ip: Option<IpAddr>,
    /// The request's query string (without `?`).
    pub query: Option<&'a str>,
}

impl HashInput<'_> {
    fn key(&self, k: &HashKey) -> Option<u64> {
        match k {
            HashKey::Header(name) => self
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| fnv(v.as_bytes())),
            HashKey::Cookie(c) => c
                .value_in(self.headers.iter().copied())
                .map(|v| fnv(v.as_bytes())),
            HashKey::SourceIp => self.source_ip.map(|ip| fnv(ip.to_string().as_bytes())),
            HashKey::Query(name) => self
                .query?
                .split('&')
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .find(|(n, _)| n == name)
                .map(|(_, v)| fnv(v.as_bytes())),
        }
    }
}

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}

/// The endpoints a pick chooses among: all `n`, or the listed ones.
enum Cands<'a> {
    All(usize),
    Listed(&'a [usize]),
}

impl Cands<'_> {
    fn len(&self) -> usize {
        match self {
            Cands::All(n) => *n,
            Cands::Listed(l) => l.len(),
        }
    }

    /// The `k`-th candidate's endpoint index.
    fn get(&self, k: usize) -> usize {
        match self {
            Cands::All(_) => k,
            Cands::Listed(l) => l[k],
        }
    }
}

#[derive(Debug, Clone, Default)]
struct EndpointState {
    active: u32,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

/// One service's balancer over `n` endpoints (indices into the caller's endpoint list).
#[derive(Debug, Clone)]
pub struct Balancer {
    policy: LbPolicy,
    outlier: Option<OutlierDetection>,
    eps: Vec<EndpointState>,
    next_rr: usize,
    /// Each endpoint's locality priority (0: closest); empty: one priority.
    tiers: Vec<u8>,
    /// Slow start (`warmupDurationSecs`): the window, when each endpoint was first seen,
    /// and when the youngest is warm; `None`: none.
    warmup: Option<(Duration, Vec<Instant>, Instant)>,
    /// Locality weights (`localityLbSetting.distribute`): each endpoint's locality group,
    /// and each group's weight; empty: none.
    groups: Vec<u32>,
    group_weights: Vec<u32>,
}

/// One `localityLbSetting.distribute` entry: for a waypoint in a locality `from` matches,
/// the share (of 100) of the traffic each locality `to` names gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distribute {
    pub from: String,
    pub to: Vec<(String, u32)>,
}

/// Whether `l` is in the locality `pattern` names: `region[/zone[/subzone]]`, a `*`
/// segment matching anything from there on (Istio's `LocalityMatch`).
pub fn locality_match(l: &mesh_model::model::Locality, pattern: &str) -> bool {
    for (part, have) in pattern.split('/').zip([&l.region, &l.zone, &l.subzone]) {
        if part == "*" {
            return true;
        }
        if part != have {
            return false;
        }
    }
    true
}

/// The locality groups and weights of `eps` for the waypoint `me` under `rules`, as istiod
/// gives Envoy locality weights: the first rule whose `from` matches the waypoint's
/// locality applies; each of its `to` localities (in order) takes the endpoints' groups
/// (same region, zone and subzone) it matches that no earlier one took, its weight split
/// among them by their sizes (rounded up); a group no `to` takes gets no traffic (`None`).
/// `None` as a whole: no rule applies (or no workload of the waypoint's own).
pub fn distribute(
    rules: &[Distribute],
    me: Option<&Workload>,
    eps: &[&Workload],
) -> Option<Shares> {
    let me = me?;
    let rule = rules
        .iter()
        .find(|r| locality_match(&me.locality, &r.from))?;
    // Groups by locality, in the order first seen, and their sizes.
    let mut localities: Vec<&mesh_model::model::Locality> = vec![];
    let mut sizes: Vec<u64> = vec![];
    let of: Vec<usize> = eps
        .iter()
        .map(
            |w| match localities.iter().position(|l| **l == w.locality) {
                Some(g) => {
                    sizes[g] += 1;
                    g
                }
                None => {
                    localities.push(&w.locality);
                    sizes.push(1);
                    localities.len() - 1
                }
            },
        )
        .collect();
    let mut weight: Vec<Option<u32>> = vec![None; localities.len()];
    for (pattern, share) in &rule.to {
        let took: Vec<usize> = (0..localities.len())
            .filter(|&g| weight[g].is_none() && locality_match(localities[g], pattern))
            .collect();
        let total: u64 = took.iter().map(|&g| sizes[g]).sum();
        for g in took {
            let w = (sizes[g] * u64::from(*share)).div_ceil(total.max(1));
            weight[g] = Some(u32::try_from(w).unwrap_or(u32::MAX));
        }
    }
    // Groups numbered among those with traffic only.
    let mut number = vec![None; localities.len()];
    let mut weights = vec![];
    for (g, w) in weight.iter().enumerate() {
        if let Some(w) = w.filter(|w| *w > 0) {
            number[g] = Some(weights.len() as u32);
            weights.push(w);
        }
    }
    Some(Shares {
        groups: of.iter().map(|&g| number[g]).collect(),
        weights,
    })
}

/// One of `weights`, drawn in proportion to them; `None` when they are all 0.
pub fn draw(weights: impl Iterator<Item = u64> + Clone, rng: &mut dyn Rng) -> Option<usize> {
    let total: u64 = weights.clone().sum();
    if total == 0 {
        return None;
    }
    let mut pick = rng.below(total);
    weights
        .enumerate()
        .find(|(_, w)| {
            if pick < *w {
                true
            } else {
                pick -= w;
                false
            }
        })
        .map(|(i, _)| i)
}

/// What [`distribute`] gives each endpoint: its locality group (`None`: no traffic), and
/// each group's weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shares {
    pub groups: Vec<Option<u32>>,
    pub weights: Vec<u32>,
}

/// Envoy's slow start: an endpoint younger than the window gets this share of its weight
/// at least (`min_weight_percent`, 10 %), growing linearly (aggression 1) to all of it.
const WARMUP_MIN_WEIGHT: f64 = 0.1;

/// A DestinationRule's locality balancing in force (`loadBalancer.localityLbSetting`):
/// failover, which Istio applies with outlier detection — endpoints are put in priorities
/// by how close they are to the waypoint, and the traffic fails over from one priority to
/// the next as Envoy's does (see [`Balancer::with_tiers`]) —, or `distribute` weights (see
/// [`Balancer::with_localities`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalityLb {
    /// `failover[]`: (from region, to region): after the waypoint's own region, `to` comes
    /// before the other regions.
    pub failover: Vec<(String, String)>,
    /// `failoverPriority[]`: label keys; an endpoint matching the waypoint's values for the
    /// first N of them is in priority `len - N`.
    pub failover_priority: Vec<String>,
    /// `distribute[]`: locality weights instead of failover (in force without outlier
    /// detection too, as Istio applies them; see [`distribute`]).
    pub distribute: Vec<Distribute>,
}

impl LocalityLb {
    /// The priority of endpoint `w` for the waypoint `me` (0 without a workload of its own
    /// in the model): by `failoverPriority` when given, else Istio's default — the same
    /// region, zone and subzone 0, the same zone 1, the same region 2, other regions 3
    /// (with `failover`: its `to` region 3 and the others 4).
    pub fn tier(&self, me: Option<&Workload>, w: &Workload) -> u8 {
        let Some(me) = me.filter(|_| self.distribute.is_empty()) else {
            return 0;
        };
        if !self.failover_priority.is_empty() {
            let n = self
                .failover_priority
                .iter()
                .take_while(|k| same_label(k, me, w))
                .count();
            return u8::try_from(self.failover_priority.len() - n).unwrap_or(u8::MAX);
        }
        // Istio's default: the same region, zone and subzone 0, … another region 3.
        let close = [Scope::Region, Scope::Zone, Scope::Subzone]
            .iter()
            .take_while(|s| s.shared(me, w))
            .count();
        if close > 0 {
            return 3 - close as u8;
        }
        let (from, to) = (&me.locality.region, &w.locality.region);
        let to_failover = self.failover.iter().any(|(f, t)| f == from && t == to);
        if self.failover.is_empty() || to_failover {
            3
        } else {
            4
        }
    }
}

/// Whether `me` and `w` have the same value for label `key`: Kubernetes' and Istio's
/// topology keys compare the model's locality, network, cluster and node
/// ([`Scope::shared`]); any other key the workloads' labels (both must have it).
fn same_label(key: &str, me: &Workload, w: &Workload) -> bool {
    let scope = match key {
        "topology.kubernetes.io/region" => Scope::Region,
        "topology.kubernetes.io/zone" => Scope::Zone,
        "topology.istio.io/subzone" => Scope::Subzone,
        "topology.istio.io/network" => Scope::Network,
        "topology.istio.io/cluster" => Scope::Cluster,
        "kubernetes.io/hostname" => Scope::Node,
        _ => {
            return me
                .labels
                .get(key)
                .is_some_and(|v| w.labels.get(key) == Some(v))
        }
    };
    scope.shared(me, w)
}

/// Envoy's overprovisioning factor: a priority with at least 1/1.4 (≈71 %) of its endpoints
/// healthy takes all the traffic it is offered.
const OVERPROVISION_PERCENT: u64 = 140;

impl Balancer {
    pub fn new(endpoints: usize, policy: LbPolicy, outlier: Option<OutlierDetection>) -> Self {
        Balancer {
            policy,
            outlier,
            eps: vec![EndpointState::default(); endpoints],
            next_rr: 0,
            tiers: Vec::new(),
            warmup: None,
            groups: Vec::new(),
            group_weights: Vec::new(),
        }
    }

    /// Endpoint `i` in locality group `shares[i].0` of weight `shares[i].1`
    /// (`localityLbSetting.distribute`, [`distribute`]): a request goes to a group drawn by
    /// the groups' weights, each scaled by how much of it is healthy as Envoy's locality
    /// weighted balancing does (a group with at least 1/1.4 of its endpoints healthy keeps
    /// its whole weight; with none healthy anywhere, by the weights as given), then to an
    /// endpoint of the group by the policy.
    pub fn with_localities(mut self, shares: &[(u32, u32)]) -> Self {
        debug_assert_eq!(shares.len(), self.eps.len());
        self.groups = shares.iter().map(|s| s.0).collect();
        let n = shares.iter().map(|s| s.0 as usize + 1).max().unwrap_or(0);
        self.group_weights = vec![0; n];
        for &(g, w) in shares {
            self.group_weights[g as usize] = w;
        }
        self
    }

    /// The locality group this request goes to; `None` without groups.
    fn group(&self, now: Instant, rng: &mut dyn Rng) -> Option<u32> {
        if self.group_weights.is_empty() {
            return None;
        }
        let n = self.group_weights.len();
        let (_, health) = self.health(&self.groups, n, now);
        let effective: Vec<u64> = health
            .iter()
            .zip(&self.group_weights)
            .map(|(h, w)| u64::from(*w) * h)
            .collect();
        let g = if effective.iter().all(|w| *w == 0) {
            draw(self.group_weights.iter().map(|w| u64::from(*w)), rng)
        } else {
            draw(effective.iter().copied(), rng)
        };
        Some(g.unwrap_or(n - 1) as u32)
    }

    /// Of the endpoints by class `classes[i]` (below `n`): how many each class has, and how
    /// healthy each is in percent, ×1.4 and at most 100 (Envoy's overprovisioned health).
    fn health<C: Copy + Into<u64>>(
        &self,
        classes: &[C],
        n: usize,
        now: Instant,
    ) -> (Vec<u64>, Vec<u64>) {
        let (mut total, mut healthy) = (vec![0u64; n], vec![0u64; n]);
        for (i, c) in classes.iter().enumerate() {
            let c = (*c).into() as usize;
            total[c] += 1;
            if !self.is_ejected(i, now) {
                healthy[c] += 1;
            }
        }
        let health = total
            .iter()
            .zip(&healthy)
            .map(|(&n, &h)| {
                (h * OVERPROVISION_PERCENT)
                    .checked_div(n)
                    .map_or(0, |p| p.min(100))
            })
            .collect();
        (total, health)
    }

    /// Slow start over `window` (DestinationRule `warmupDurationSecs`; round robin, least
    /// request and random): endpoint `i`, first seen at `since[i]`, takes a share of the
    /// traffic that grows with its age, as Envoy's slow start mode weights it (at least
    /// 10 %, linearly to 100 % at the window's end). Endpoints of the same age share alike,
    /// so the ones seen together at start are not held back against each other.
    pub fn with_warmup(mut self, window: Duration, since: Vec<Instant>) -> Self {
        debug_assert_eq!(since.len(), self.eps.len());
        if let Some(youngest) = since.iter().max().filter(|_| !window.is_zero()) {
            let warm = *youngest + window;
            self.warmup = Some((window, since, warm));
        }
        self
    }

    /// Endpoint `i`'s slow-start weight at `now` (1 when warm).
    fn warm_weight(&self, i: usize, now: Instant) -> f64 {
        match &self.warmup {
            Some((window, since, _)) => {
                let age = now.saturating_duration_since(since[i]);
                if age >= *window {
                    1.0
                } else {
                    (age.as_secs_f64() / window.as_secs_f64()).max(WARMUP_MIN_WEIGHT)
                }
            }
            None => 1.0,
        }
    }

    /// Whether some endpoint is still warming up at `now`.
    fn warming(&self, now: Instant) -> bool {
        self.warmup.as_ref().is_some_and(|(.., warm)| now < *warm)
    }

    /// A candidate by `weight` (random, in proportion).
    fn weighted(cands: &Cands<'_>, weight: impl Fn(usize) -> f64, rng: &mut dyn Rng) -> usize {
        let n = cands.len();
        let ws: Vec<f64> = (0..n).map(|k| weight(cands.get(k))).collect();
        let total: f64 = ws.iter().sum();
        // 2^53 steps: as fine as an f64 of the total resolves.
        let mut x = rng.below(1 << 53) as f64 / (1u64 << 53) as f64 * total;
        for (k, w) in ws.iter().enumerate() {
            if x < *w {
                return cands.get(k);
            }
            x -= w;
        }
        cands.get(n - 1)
    }

    /// Endpoint `i` in locality priority `tiers[i]` (0 the closest). Requests go to the
    /// closest priority while enough of it is healthy (not ejected), and spill to the next
    /// as Envoy's priority load does: each priority takes what is left of the traffic up to
    /// its healthy share × 1.4; when the priorities' shares sum to less than all of it,
    /// each takes traffic in proportion to its share; with none healthy, the closest takes
    /// it all (panic mode).
    pub fn with_tiers(mut self, tiers: Vec<u8>) -> Self {
        debug_assert_eq!(tiers.len(), self.eps.len());
        self.tiers = if tiers.iter().all(|t| *t == 0) {
            Vec::new()
        } else {
            tiers
        };
        self
    }

    /// The priority this request goes to; `None` with one priority.
    fn tier(&self, now: Instant, rng: &mut dyn Rng) -> Option<u8> {
        let top = *self.tiers.iter().max()?;
        let (total, health) = self.health(&self.tiers, usize::from(top) + 1, now);
        let budget = health.iter().sum::<u64>().min(100);
        if budget == 0 {
            // Panic mode: the closest priority that has endpoints.
            return total.iter().position(|&n| n > 0).map(|t| t as u8);
        }
        let mut pick = rng.below(budget);
        let mut left = budget;
        for (t, &h) in health.iter().enumerate() {
            let load = h.min(left);
            if pick < load {
                return Some(t as u8);
            }
            pick -= load;
            left -= load;
        }
        unreachable!("the loads sum to the budget")
    }

    pub fn len(&self) -> usize {
        self.eps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.eps.is_empty()
    }

    /// Whether endpoint `i` is ejected at `now`.
    pub fn is_ejected(&self, i: usize, now: Instant) -> bool {
        self.eps[i].ejected_until.is_some_and(|t| now < t)
    }

    fn ejected_count(&self, now: Instant) -> usize {
        (0..self.eps.len())
            .filter(|&i| self.is_ejected(i, now))
            .count()
    }

    /// Choose an endpoint. Ejected endpoints are skipped unless every one is ejected (then
    /// all are candidates, like Envoy's panic mode). `None` only with no endpoints.
    pub fn pick(
        &mut self,
        input: &HashInput<'_>,
        now: Instant,
        rng: &mut dyn Rng,
    ) -> Option<usize> {
        if self.eps.is_empty() {
            return None;
        }
        // The candidates: the endpoints (of the chosen locality priority) not ejected, else
        // all of them. Without ejections and priorities (the common case) they are all
        // endpoints, and no list is built.
        let tier = self.tier(now, rng);
        let group = self.group(now, rng);
        let ejected = self
            .eps
            .iter()
            .any(|e| e.ejected_until.is_some_and(|t| now < t));
        let in_tier = |i: usize| {
            tier.is_none_or(|t| self.tiers[i] == t) && group.is_none_or(|g| self.groups[i] == g)
        };
        let mut listed: Vec<usize>;
        let cands: Cands<'_> = if ejected || tier.is_some() || group.is_some() {
            listed = (0..self.eps.len())
                .filter(|&i| in_tier(i) && !self.is_ejected(i, now))
                .collect();
            if listed.is_empty() && (tier.is_some() || group.is_some()) {
                listed = (0..self.eps.len()).filter(|&i| in_tier(i)).collect();
            }
            if listed.is_empty() {
                Cands::All(self.eps.len())
            } else {
                Cands::Listed(&listed)
            }
        } else {
            Cands::All(self.eps.len())
        };
        let n = cands.len();
        // Slow start (round robin, least request, random): in proportion to the endpoints'
        // weights — least request's divided by their requests in flight plus one, as
        // Envoy's weighted least request schedules them.
        if n > 1 && self.warming(now) {
            match self.policy {
                LbPolicy::Random | LbPolicy::RoundRobin => {
                    return Some(Self::weighted(&cands, |i| self.warm_weight(i, now), rng));
                }
                LbPolicy::LeastRequest => {
                    let w = |i: usize| self.warm_weight(i, now) / f64::from(self.eps[i].active + 1);
                    return Some(Self::weighted(&cands, w, rng));
                }
                LbPolicy::ConsistentHash(_) => {}
            }
        }
        let i = match &self.policy {
            LbPolicy::Random => cands.get(rng.below(n as u64) as usize),
            LbPolicy::RoundRobin => {
                let i = cands.get(self.next_rr % n);
                self.next_rr = self.next_rr.wrapping_add(1);
                i
            }
            LbPolicy::LeastRequest => {
                if n == 1 {
                    cands.get(0)
                } else {
                    let a = rng.below(n as u64) as usize;
                    let mut b = rng.below(n as u64 - 1) as usize;
                    if b >= a {
                        b += 1;
                    }
                    let (a, b) = (cands.get(a), cands.get(b));
                    if self.eps[b].active < self.eps[a].active {
                        b
                    } else {
                        a
                    }
                }
            }
            LbPolicy::ConsistentHash(k) => match input.key(k) {
                // Rendezvous hashing: the endpoint with the highest mix(key, index) wins, so
                // removing one endpoint moves only the keys it held.
                Some(h) => (0..n)
                    .map(|k| cands.get(k))
                    .max_by_key(|&i| mix(h ^ mix(i as u64 + 1)))
                    .expect("non-empty"),
                None => cands.get(rng.below(n as u64) as usize),
            },
        };
        Some(i)
    }

    /// A request to endpoint `i` starts (least-request bookkeeping).
    pub fn start(&mut self, i: usize) {
        self.eps[i].active += 1;
    }

    /// Requests to endpoint `i` started and not finished.
    pub fn active(&self, i: usize) -> u32 {
        self.eps.get(i).map_or(0, |e| e.active)
    }

    /// The request to endpoint `i` was abandoned by its client: no longer active, and no
    /// verdict on the endpoint (its outlier state is left as it was).
    pub fn release(&mut self, i: usize) {
        let e = &mut self.eps[i];
        e.active = e.active.saturating_sub(1);
    }

    /// The request to endpoint `i` ended with `status` (0 for a connection failure, counted
    /// as a 5xx, as Envoy's gateway errors are).
    pub fn finish(&mut self, i: usize, status: u16, now: Instant) {
        let e = &mut self.eps[i];
        e.active = e.active.saturating_sub(1);
        let failed = status == 0 || (500..600).contains(&status);
        let gateway = matches!(status, 0 | 502 | 503 | 504);
        if !failed {
            e.consecutive_5xx = 0;
            e.consecutive_gateway = 0;
            return;
        }
        e.consecutive_5xx += 1;
        e.consecutive_gateway = if gateway {
            e.consecutive_gateway + 1
        } else {
            0
        };
        let Some(od) = self.outlier else { return };
        let reached = |n: u32, limit: u32| limit > 0 && n >= limit;
        let e = &self.eps[i];
        if !reached(e.consecutive_5xx, od.consecutive_5xx)
            && !reached(e.consecutive_gateway, od.consecutive_gateway)
        {
            return;
        }
        if self.is_ejected(i, now) {
            return;
        }
        let max = (self.eps.len() * od.max_ejection_percent.min(100) as usize) / 100;
        let max = if od.max_ejection_percent > 0 {
            max.max(1)
        } else {
            0
        };
        if self.ejected_count(now) >= max {
            return;
        }
        let e = &mut self.eps[i];
        // The multiplier decays by one per interval spent back in service since the last
        // ejection ended, then grows by one while the ejection time is below the cap.
        if let Some(back) = e.ejected_until {
            let healthy = now.saturating_duration_since(back);
            let steps = healthy.as_nanos() / od.interval.as_nanos().max(1);
            e.times_ejected = e
                .times_ejected
                .saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX));
        }
        let cap = od.ejection_cap();
        if od
            .base_ejection_time
            .checked_mul(e.times_ejected)
            .is_some_and(|t| t < cap)
        {
            e.times_ejected = e.times_ejected.saturating_add(1);
        }
        e.consecutive_5xx = 0;
        e.consecutive_gateway = 0;
        let time = od
            .base_ejection_time
            .checked_mul(e.times_ejected)
            .map_or(cap, |t| t.min(cap));
        // An absurd configured time (beyond what `Instant` holds) ejects for a day at a time.
        e.ejected_until = Some(
            now.checked_add(time)
                .unwrap_or_else(|| now + Duration::from_secs(86_400)),
        );
    }

    /// Endpoint `i`'s current ejection multiplier (the decay is applied at its next
    /// ejection).
    pub fn ejection_multiplier(&self, i: usize) -> u32 {
        self.eps.get(i).map_or(0, |e| e.times_ejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outlier detection that ejects an endpoint at its first 5xx, for `base` seconds, up to
    /// `max_percent` of the endpoints.
    fn eject_on_first_5xx(base: u64, max_percent: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 1,
            base_ejection_time: Duration::from_secs(base),
            max_ejection_percent: max_percent,
            interval: EJECTION_DECAY_INTERVAL,
            consecutive_gateway: 0,
        }
    }

    /// Eject endpoint `i` of `b` at `now` (one failed request, under
    /// [`eject_on_first_5xx`]).
    fn eject_one(b: &mut Balancer, i: usize, now: Instant) {
        b.start(i);
        b.finish(i, 503, now);
        assert!(b.is_ejected(i, now));
    }

    fn counts(b: &mut Balancer, input: &HashInput<'_>, n: usize, now: Instant) -> Vec<usize> {
        let mut rng = SplitMix64(7);
        let mut c = vec![0; b.len()];
        for _ in 0..n {
            c[b.pick(input, now, &mut rng).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_cycles() {
        let now = Instant::now();
        let mut b = Balancer::new(3, LbPolicy::RoundRobin, None);
        let mut rng = SplitMix64(1);
        let picks: Vec<_> = (0..6)
            .map(|_| b.pick(&HashInput::default(), now, &mut rng).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn random_spreads_evenly() {
        let now = Instant::now();
        let mut b = Balancer::new(4, LbPolicy::Random, None);
        for c in counts(&mut b, &HashInput::default(), 10_000, now) {
            assert!((2_300..2_700).contains(&c), "{c}");
        }
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let now = Instant::now();
        let mut b = Balancer::new(3, LbPolicy::LeastRequest, None);
        // Endpoint 0 is busy: P2C picks it only when both choices are 0, which cannot happen.
        for _ in 0..10 {
            b.start(0);
        }
        let c = counts(&mut b, &HashInput::default(), 3_000, now);
        assert_eq!(c[0], 0);
        assert!(c[1] > 1_000 && c[2] > 1_000, "{c:?}");
        // A single endpoint is always chosen.
        let mut one = Balancer::new(1, LbPolicy::LeastRequest, None);
        assert_eq!(counts(&mut one, &HashInput::default(), 10, now), [10]);
    }

    #[test]
    fn empty_balancer_picks_nothing() {
        let mut b = Balancer::new(0, LbPolicy::default(), None);
        assert_eq!(
            b.pick(&HashInput::default(), Instant::now(), &mut SplitMix64(0)),
            None
        );
    }

    #[test]
    fn consistent_hash_is_sticky_per_key() {
        let now = Instant::now();
        let mut rng = SplitMix64(3);
        for key in [
            HashKey::Header("x-user".into()),
            HashKey::Cookie(CookieKey {
                name: "session".into(),
                ttl: None,
                path: None,
                attributes: vec![],
            }),
            HashKey::SourceIp,
        ] {
            let mut b = Balancer::new(5, LbPolicy::ConsistentHash(key), None);
            let mut seen = std::collections::BTreeSet::new();
            for user in 0..50 {
                let v = format!("u{user}");
                let cookie = format!("a=1; session={v}");
                let h = [("X-User", v.as_str()), ("cookie", cookie.as_str())];
                let ip: IpAddr = format!("10.0.0.{user}").parse().unwrap();
                let input = HashInput {
                    headers: &h,
                    source_ip: Some(ip),
                    query: None,
                };
                let first = b.pick(&input, now, &mut rng).unwrap();
                for _ in 0..5 {
                    assert_eq!(b.pick(&input, now, &mut rng), Some(first));
                }
                seen.insert(first);
            }
            assert!(seen.len() >= 4, "keys spread over endpoints: {seen:?}");
        }
    }

    #[test]
    fn consistent_hash_moves_only_the_ejected_endpoints_keys() {
        let now = Instant::now();
        let mut rng = SplitMix64(3);
        let od = eject_on_first_5xx(10, 100);
        let policy = LbPolicy::ConsistentHash(HashKey::SourceIp);
        let mut before = Balancer::new(4, policy.clone(), Some(od));
        let mut after = Balancer::new(4, policy, Some(od));
        after.start(3);
        after.finish(3, 503, now);
        assert!(after.is_ejected(3, now));
        let mut moved = 0;
        for user in 0..200u32 {
            let input = HashInput {
                headers: &[],
                source_ip: Some(IpAddr::from(user.to_be_bytes())),
                query: None,
            };
            let b = before.pick(&input, now, &mut rng).unwrap();
            let a = after.pick(&input, now, &mut rng).unwrap();
            assert_ne!(a, 3);
            if b == 3 {
                moved += 1;
            } else {
                assert_eq!(a, b, "a key not on the ejected endpoint stays put");
            }
        }
        assert!(moved > 20, "{moved}");
    }

    #[test]
    fn missing_hash_key_falls_back_to_random() {
        let now = Instant::now();
        let mut b = Balancer::new(
            3,
            LbPolicy::ConsistentHash(HashKey::Header("x".into())),
            None,
        );
        let c = counts(&mut b, &HashInput::default(), 3_000, now);
        assert!(c.iter().all(|&c| c > 800), "{c:?}");
    }

    #[test]
    fn outlier_detection_ejects_after_consecutive_5xx_and_returns() {
        let t0 = Instant::now();
        let od = OutlierDetection {
            consecutive_5xx: 3,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
            interval: EJECTION_DECAY_INTERVAL,
            consecutive_gateway: 0,
        };
        let mut b = Balancer::new(4, LbPolicy::RoundRobin, Some(od));
        // Two 5xx, then a success: the streak resets.
        for s in [500, 502, 200, 503, 504] {
            b.start(1);
            b.finish(1, s, t0);
        }
        assert!(!b.is_ejected(1, t0));
        b.start(1);
        b.finish(1, 0, t0); // connect failure counts
        assert!(b.is_ejected(1, t0));
        let picks = counts(&mut b, &HashInput::default(), 30, t0);
        assert_eq!(picks[1], 0);
        // Back after baseEjectionTime; a second ejection lasts twice as long.
        let t1 = t0 + Duration::from_secs(30);
        assert!(!b.is_ejected(1, t1));
        for _ in 0..3 {
            b.start(1);
            b.finish(1, 500, t1);
        }
        assert!(b.is_ejected(1, t1 + Duration::from_secs(59)));
        assert!(!b.is_ejected(1, t1 + Duration::from_secs(60)));
    }

    /// Eject endpoint 0 of `b` at `now` (`n` consecutive 5xx) and return how long for.
    fn eject(b: &mut Balancer, n: u32, now: Instant) -> Duration {
        for _ in 0..n {
            b.start(0);
            b.finish(0, 503, now);
        }
        assert!(b.is_ejected(0, now));
        b.eps[0].ejected_until.unwrap() - now
    }

    #[test]
    fn ejection_time_is_capped_at_envoys_max_ejection_time() {
        let od = eject_on_first_5xx(30, 100);
        let mut b = Balancer::new(2, LbPolicy::RoundRobin, Some(od));
        let mut now = Instant::now();
        let mut times = Vec::new();
        // Failing again the moment it is back, fifteen times: 30, 60, … then 300 s.
        for _ in 0..15 {
            let d = eject(&mut b, 1, now);
            times.push(d.as_secs());
            now += d;
        }
        assert_eq!(
            times,
            [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300, 300, 300, 300]
        );
        // A base time above the cap is the cap.
        let od = OutlierDetection {
            base_ejection_time: Duration::from_secs(600),
            ..od
        };
        let mut b = Balancer::new(2, LbPolicy::RoundRobin, Some(od));
        let t0 = Instant::now();
        assert_eq!(eject(&mut b, 1, t0), Duration::from_secs(600));
        let t1 = t0 + Duration::from_secs(600);
        assert_eq!(eject(&mut b, 1, t1), Duration::from_secs(600));
    }

    #[test]
    fn ejection_multiplier_decays_while_the_endpoint_stays_healthy() {
        // Istio's default `interval` and a DestinationRule's shorter one.
        for interval in [EJECTION_DECAY_INTERVAL, Duration::from_secs(1)] {
            decays_per_interval(interval);
        }
    }

    fn decays_per_interval(interval: Duration) {
        let od = OutlierDetection {
            consecutive_5xx: 2,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 100,
            interval,
            consecutive_gateway: 0,
        };
        let mut b = Balancer::new(2, LbPolicy::RoundRobin, Some(od));
        let t0 = Instant::now();
        assert_eq!(eject(&mut b, 2, t0).as_secs(), 30);
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(eject(&mut b, 2, t1).as_secs(), 60);
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(eject(&mut b, 2, t2).as_secs(), 90);
        assert_eq!(b.ejection_multiplier(0), 3);
        // Back at t3, healthy for two decay intervals (successes on the way), then failing:
        // the multiplier went 3 → 1, so this ejection is 2 × 30 s, not 4 × 30 s.
        let t3 = t2 + Duration::from_secs(90);
        b.start(0);
        b.finish(0, 200, t3);
        let t4 = t3 + interval * 2;
        assert_eq!(eject(&mut b, 2, t4).as_secs(), 60);
        // A long healthy spell brings it back to the base time.
        let t5 = t4 + Duration::from_secs(60) + interval * 100;
        assert_eq!(eject(&mut b, 2, t5).as_secs(), 30);
        // Healthy for less than one interval: no decay, the time grows.
        let t6 = t5 + Duration::from_secs(30) + interval / 2;
        assert_eq!(eject(&mut b, 2, t6).as_secs(), 60);
    }

    #[test]
    fn query_parameter_hash_keeps_a_value_on_one_endpoint() {
        let now = Instant::now();
        let mut rng = SplitMix64(5);
        let policy = LbPolicy::ConsistentHash(HashKey::Query("user".into()));
        let mut b = Balancer::new(8, policy, None);
        let pick = |b: &mut Balancer, q: Option<&str>, rng: &mut SplitMix64| {
            let input = HashInput {
                headers: &[],
                source_ip: None,
                query: q,
            };
            b.pick(&input, now, rng).unwrap()
        };
        let mut seen = std::collections::BTreeSet::new();
        for user in 0..64 {
            let q = format!("a=1&user={user}&b");
            let first = pick(&mut b, Some(&q), &mut rng);
            for _ in 0..5 {
                assert_eq!(pick(&mut b, Some(&q), &mut rng), first, "{q}");
            }
            // The first `user` is the key; other parameters do not move it.
            let q2 = format!("user={user}&user=other&z=9");
            assert_eq!(pick(&mut b, Some(&q2), &mut rng), first, "{q2}");
            seen.insert(first);
        }
        assert!(seen.len() > 4, "64 users over 8 endpoints: {seen:?}");
        // Without the parameter: any endpoint (a random one each time).
        let spread: std::collections::BTreeSet<usize> = (0..64)
            .map(|_| pick(&mut b, Some("x=1"), &mut rng))
            .collect();
        assert!(spread.len() > 1);
    }

    #[test]
    fn consecutive_gateway_errors_eject_and_other_5xx_reset_them() {
        let od = OutlierDetection {
            consecutive_5xx: 0,
            consecutive_gateway: 3,
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        };
        let mut b = Balancer::new(2, LbPolicy::RoundRobin, Some(od));
        let t = Instant::now();
        // 502, 503, then a 500 (a 5xx, not a gateway error): the count starts again.
        for status in [502, 503, 500, 504, 0] {
            b.start(0);
            b.finish(0, status, t);
        }
        assert!(!b.is_ejected(0, t), "two in a row since the 500");
        b.start(0);
        b.finish(0, 503, t);
        assert!(b.is_ejected(0, t), "three gateway errors in a row");
        // consecutive5xxErrors 0: any number of 500s ejects nothing.
        for _ in 0..20 {
            b.start(1);
            b.finish(1, 500, t);
        }
        assert!(!b.is_ejected(1, t));
    }

    #[test]
    fn outlier_detection_respects_max_ejection_percent() {
        let now = Instant::now();
        let od = eject_on_first_5xx(30, 50);
        let mut b = Balancer::new(4, LbPolicy::RoundRobin, Some(od));
        for i in 0..4 {
            b.start(i);
            b.finish(i, 500, now);
        }
        let ejected = (0..4).filter(|&i| b.is_ejected(i, now)).count();
        assert_eq!(ejected, 2);
        // 10 % of 4 rounds down to 0, yet one endpoint may always be ejected.
        let od = OutlierDetection {
            max_ejection_percent: 10,
            ..od
        };
        let mut b = Balancer::new(4, LbPolicy::RoundRobin, Some(od));
        for i in 0..4 {
            b.start(i);
            b.finish(i, 500, now);
        }
        assert_eq!((0..4).filter(|&i| b.is_ejected(i, now)).count(), 1);
    }

    #[test]
    fn all_ejected_falls_back_to_all() {
        let now = Instant::now();
        let od = eject_on_first_5xx(30, 100);
        let mut b = Balancer::new(2, LbPolicy::RoundRobin, Some(od));
        for i in 0..2 {
            b.start(i);
            b.finish(i, 500, now);
        }
        let c = counts(&mut b, &HashInput::default(), 10, now);
        assert_eq!(c, [5, 5]);
    }

    /// Envoy's priority load over locality priorities: the closest takes everything while
    /// at least 1/1.4 of it is healthy, spills the rest to the next below that, and panic
    /// mode sends everything to the closest when nothing is healthy.
    #[test]
    fn locality_priorities_fail_over_as_envoys_priority_load() {
        let now = Instant::now();
        let od = eject_on_first_5xx(60, 100);
        // Endpoints 0-3 in priority 0, 4-5 in priority 1, 6 in priority 3.
        let new = || {
            Balancer::new(7, LbPolicy::RoundRobin, Some(od)).with_tiers(vec![0, 0, 0, 0, 1, 1, 3])
        };
        let by_tier = |c: &[usize]| [c[..4].iter().sum::<usize>(), c[4] + c[5], c[6]];
        let mut b = new();
        assert_eq!(
            by_tier(&counts(&mut b, &HashInput::default(), 1000, now)),
            [1000, 0, 0]
        );
        // 3 of 4 healthy: 75 % × 1.4 ≥ 100 %, no spill; the ejected one gets nothing.
        let mut b = new();
        eject_one(&mut b, 0, now);
        let c = counts(&mut b, &HashInput::default(), 1000, now);
        assert_eq!((c[0], by_tier(&c)), (0, [1000, 0, 0]));
        // 2 of 4: 70 % stays, 30 % spills to priority 1 (10,000 picks, within ±2 %).
        let mut b = new();
        eject_one(&mut b, 0, now);
        eject_one(&mut b, 1, now);
        let t = by_tier(&counts(&mut b, &HashInput::default(), 10_000, now));
        assert!(
            (6_800..=7_200).contains(&t[0]) && t[0] + t[1] == 10_000,
            "{t:?}"
        );
        // Priority 0 all ejected: priority 1 takes everything (its health covers it).
        let mut b = new();
        (0..4).for_each(|i| eject_one(&mut b, i, now));
        assert_eq!(
            by_tier(&counts(&mut b, &HashInput::default(), 1000, now)),
            [0, 1000, 0]
        );
        // Priorities 0 and 1 all ejected: the last one, though far.
        (4..6).for_each(|i| eject_one(&mut b, i, now));
        assert_eq!(
            by_tier(&counts(&mut b, &HashInput::default(), 1000, now)),
            [0, 0, 1000]
        );
        // Everything ejected: panic mode in the closest priority.
        eject_one(&mut b, 6, now);
        assert_eq!(
            by_tier(&counts(&mut b, &HashInput::default(), 1000, now)),
            [1000, 0, 0]
        );
    }

    fn workload(region: &str, zone: &str, subzone: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            locality: mesh_model::model::Locality {
                region: region.into(),
                zone: zone.into(),
                subzone: subzone.into(),
            },
            ..Default::default()
        }
    }

    /// `distribute`, as istiod weights Envoy's localities: the first rule whose `from`
    /// matches the waypoint applies; each `to` takes the localities it matches that no
    /// earlier one took, its weight split by their sizes (rounded up); localities no `to`
    /// names get nothing.
    #[test]
    fn distribute_weighs_localities_as_istiod_does() {
        let me = workload("us-east", "a", "r1", &[]);
        let eps = [
            workload("us-east", "a", "r1", &[]),
            workload("us-east", "a", "r1", &[]),
            workload("us-east", "b", "", &[]),
            workload("us-west", "c", "", &[]),
            workload("us-west", "d", "", &[]),
            workload("us-west", "d", "", &[]),
            workload("eu", "x", "", &[]),
        ];
        let refs: Vec<&Workload> = eps.iter().collect();
        let rule = |from: &str, to: &[(&str, u32)]| Distribute {
            from: from.into(),
            to: to.iter().map(|(k, w)| (k.to_string(), *w)).collect(),
        };
        let rules = [
            rule("eu/*", &[("eu/*", 100)]),
            rule("us-east/a/*", &[("us-east/a/r1", 70), ("us-west/*", 30)]),
            rule("*", &[("*", 100)]),
        ];
        let Shares { groups, weights } = distribute(&rules, Some(&me), &refs).unwrap();
        // us-east/a/r1 70; us-west's 30 split 1:2 between zones c and d (10, 20); us-east/b
        // and eu: none.
        assert_eq!(
            groups,
            [Some(0), Some(0), None, Some(1), Some(2), Some(2), None]
        );
        assert_eq!(weights, [70, 10, 20]);
        // A waypoint no rule's `from` matches, or the model does not know: no weights.
        let other = workload("ap", "z", "", &[]);
        assert!(distribute(&rules[..2], Some(&other), &refs).is_none());
        assert!(distribute(&rules, None, &refs).is_none());
        // Rounded up: 100 over three localities of one endpoint each.
        let s = distribute(&rules[2..], Some(&other), &refs[2..5]).unwrap();
        assert_eq!(s.weights, [34, 34, 34]);
        // Patterns.
        let l = |r: &str, z: &str, s: &str| mesh_model::model::Locality {
            region: r.into(),
            zone: z.into(),
            subzone: s.into(),
        };
        assert!(locality_match(&l("us", "a", "1"), "us"));
        assert!(locality_match(&l("us", "a", "1"), "us/a/1"));
        assert!(locality_match(&l("us", "a", "1"), "us/*"));
        assert!(!locality_match(&l("us", "b", "1"), "us/a/*"));
        assert!(locality_match(&l("eu", "", ""), "*"));
    }

    /// Locality weights: 10,000 picks split between the groups by their weights (±2 %),
    /// endpoints of a group alike; a group with too few healthy endpoints loses weight as
    /// Envoy scales it; with everything ejected, the weights as given.
    #[test]
    fn locality_weights_split_the_traffic() {
        let now = Instant::now();
        let od = eject_on_first_5xx(60, 100);
        // Endpoints 0-1 in group 0 (weight 80), 2-3 in group 1 (20).
        let new = || {
            Balancer::new(4, LbPolicy::LeastRequest, Some(od)).with_localities(&[
                (0, 80),
                (0, 80),
                (1, 20),
                (1, 20),
            ])
        };
        let mut b = new();
        let c = counts(&mut b, &HashInput::default(), 10_000, now);
        let g0 = c[0] + c[1];
        assert!((7_800..=8_200).contains(&g0), "{c:?}");
        assert!(
            c[0].abs_diff(c[1]) < 500 && c[2].abs_diff(c[3]) < 300,
            "{c:?}"
        );
        // Half of group 0 ejected: 50 % × 1.4 = 70 % of its weight, 56 against 20.
        let mut b = new();
        eject_one(&mut b, 0, now);
        let c = counts(&mut b, &HashInput::default(), 10_000, now);
        let share = c[1] as f64 / 10_000.0;
        assert_eq!(c[0], 0);
        assert!((share - 56.0 / 76.0).abs() < 0.02, "{c:?}");
        // Everything ejected: by the weights as given.
        (1..4).for_each(|i| eject_one(&mut b, i, now));
        let c = counts(&mut b, &HashInput::default(), 10_000, now);
        assert!((7_800..=8_200).contains(&(c[0] + c[1])), "{c:?}");
    }

    #[test]
    fn locality_priorities_follow_istios_defaults_failover_and_failover_priority() {
        let me = workload("us-east", "a", "rack1", &[("version", "v1")]);
        let eps = [
            workload("us-east", "a", "rack1", &[("version", "v2")]),
            workload("us-east", "a", "rack2", &[("version", "v1")]),
            workload("us-east", "b", "", &[]),
            workload("us-west", "a", "rack1", &[("version", "v1")]),
            workload("eu", "a", "", &[]),
        ];
        let tiers = |l: &LocalityLb| eps.iter().map(|w| l.tier(Some(&me), w)).collect::<Vec<_>>();
        assert_eq!(tiers(&LocalityLb::default()), [0, 1, 2, 3, 3]);
        let failover = LocalityLb {
            failover: vec![("us-east".into(), "eu".into())],
            ..Default::default()
        };
        assert_eq!(tiers(&failover), [0, 1, 2, 4, 3]);
        let by_labels = LocalityLb {
            failover_priority: vec!["topology.kubernetes.io/region".into(), "version".into()],
            ..Default::default()
        };
        assert_eq!(tiers(&by_labels), [1, 0, 1, 2, 2]);
        // A waypoint the model does not know: one priority.
        assert_eq!(LocalityLb::default().tier(None, &eps[4]), 0);
    }

    /// Slow start: an endpoint first seen a quarter into the window takes about a quarter
    /// of a warm one's share (10 % at least), all of it once the window has passed; the
    /// endpoints seen together share alike. Round robin, least request and random alike.
    #[test]
    fn slow_start_weights_new_endpoints_by_age() {
        let start = Instant::now();
        let window = Duration::from_secs(100);
        // Endpoints 0 and 1 warm (seen 200 s ago), 2 seen 25 s ago, 3 just now.
        let at = start + Duration::from_secs(200);
        let since = vec![start, start, at - Duration::from_secs(25), at];
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
            LbPolicy::Random,
        ] {
            let mut b = Balancer::new(4, policy.clone(), None).with_warmup(window, since.clone());
            let c = counts(&mut b, &HashInput::default(), 13_500, at);
            // Weights 1, 1, 0.25, 0.1 of 2.35: 5,745, 5,745, 1,436, 574 of 13,500.
            let want = [5_745.0, 5_745.0, 1_436.0, 574.0];
            for (got, want) in c.iter().zip(want) {
                let got = *got as f64;
                assert!((got - want).abs() < want * 0.15 + 50.0, "{policy:?} {c:?}");
            }
            // Past the window everyone is warm: the policy's own spread.
            let later = at + window;
            let c = counts(&mut b, &HashInput::default(), 4_000, later);
            assert!(
                c.iter().all(|n| (800..1_200).contains(n)),
                "{policy:?} {c:?}"
            );
        }
        // All seen together (a balancer's first endpoints): no one is held back.
        let mut b = Balancer::new(3, LbPolicy::RoundRobin, None).with_warmup(window, vec![at; 3]);
        let c = counts(
            &mut b,
            &HashInput::default(),
            3_000,
            at + Duration::from_secs(1),
        );
        assert!(c.iter().all(|n| (800..1_200).contains(n)), "{c:?}");
    }
}
