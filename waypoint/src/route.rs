//! Service routing (R16, R17): Gateway API `HTTPRoute`s whose `parentRefs` name a Service
//! (group `""`, kind `Service`), with the spec's matching, precedence and filters; and
//! `TCPRoute`s ([`TcpRoute`]), whose ports are opaque TCP split over weighted backends.
//!
//! Pure: [`RouteTable::route`] takes a request and returns a [`Decision`]; it never does I/O.
//!
//! GAMMA producer and consumer routes: a route whose parent Service is in the route's own
//! namespace applies to every client; one naming a Service of another namespace applies only
//! to clients of the route's namespace (from their verified identity), and for those clients
//! replaces the producer routes ([`RouteTable::route_from`]).
//! The compiled types here are built by [`crate::config`] from the YAML users write.

use std::borrow::Cow;
use std::time::Duration;

use regex::Regex;

use crate::lb::Rng;

/// `namespace/name` of a Kubernetes object. As a routing destination, a Service may be
/// narrowed to one of its DestinationRule `subsets` (a VirtualService's
/// `destination.subset`): its own balancer, endpoints and traffic policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
    pub subset: Option<String>,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
            subset: None,
        }
    }

    /// This service narrowed to its subset `subset`.
    pub fn with_subset(mut self, subset: Option<String>) -> Self {
        self.subset = subset;
        self
    }

    /// The whole service (without a subset): a borrow when there is none.
    pub fn whole(&self) -> Cow<'_, ObjectRef> {
        match self.subset {
            None => Cow::Borrowed(self),
            Some(_) => Cow::Owned(ObjectRef::new(&*self.namespace, &*self.name)),
        }
    }
}

/// A route's path match.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// By path segment: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    Prefix(String),
    /// Anchored (the whole path must match).
    Regex(Regex),
    /// By character (a VirtualService's `uri.prefix`): `/foo` matches `/foobar` too;
    /// ASCII case ignored when the flag is set (`ignoreUriCase`).
    StartsWith(String, bool),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => prefix_matches(p, path),
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::StartsWith(p, false) => path.starts_with(p.as_str()),
            PathMatch::StartsWith(p, true) => path
                .as_bytes()
                .get(..p.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(p.as_bytes())),
        }
    }
}

/// Segment-wise prefix: a trailing `/` in the prefix is ignored.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    match path.strip_prefix(p) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// A header or query value match.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    /// Anchored.
    Regex(Regex),
    /// A VirtualService's `prefix`.
    Prefix(String),
    /// Any value: the field is present (a VirtualService header match with no value).
    Present,
}

/// Matches are equal when they match alike (a regex by its text).
impl PartialEq for ValueMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ValueMatch::Exact(a), ValueMatch::Exact(b))
            | (ValueMatch::Prefix(a), ValueMatch::Prefix(b)) => a == b,
            (ValueMatch::Regex(a), ValueMatch::Regex(b)) => a.as_str() == b.as_str(),
            (ValueMatch::Present, ValueMatch::Present) => true,
            _ => false,
        }
    }
}

impl Eq for ValueMatch {}

impl ValueMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => v == e,
            ValueMatch::Regex(r) => r.is_match(v),
            ValueMatch::Prefix(p) => v.starts_with(p.as_str()),
            ValueMatch::Present => true,
        }
    }
}

/// The conditions of a VirtualService `match` entry that an HTTPRoute match has not.
#[derive(Debug, Clone, Default)]
pub struct MoreConditions {
    /// `method` other than an exact one (an exact one is [`RouteMatch::method`]).
    pub method: Option<ValueMatch>,
    /// `authority`: the `Host`/`:authority`, as written (port included).
    pub authority: Option<ValueMatch>,
    pub scheme: Option<ValueMatch>,
    /// `port`: the service port the request was addressed to.
    pub port: Option<u16>,
    /// `sourceNamespace`: the verified client's namespace.
    pub source_namespace: Option<String>,
    /// `withoutHeaders`: each must be absent or not match (names lower-cased).
    pub without_headers: Vec<(String, ValueMatch)>,
}

impl MoreConditions {
    fn hold(&self, r: &Request<'_>, port: u16, client_namespace: Option<&str>) -> bool {
        self.method.as_ref().is_none_or(|m| m.matches(r.method))
            && self.authority.as_ref().is_none_or(|m| m.matches(r.host()))
            && self.scheme.as_ref().is_none_or(|m| m.matches(r.scheme))
            && self.port.is_none_or(|p| p == port)
            && self
                .source_namespace
                .as_deref()
                .is_none_or(|ns| client_namespace == Some(ns))
            && self
                .without_headers
                .iter()
                .all(|(n, m)| r.header(n).is_none_or(|v| !m.matches(v)))
    }
}

/// One `matches[]` entry; all of its conditions must hold.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Header names lower-cased.
    pub headers: Vec<(String, ValueMatch)>,
    /// Query parameter names are case-sensitive.
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<String>,
    /// A VirtualService's other conditions (boxed: most matches have none).
    pub more: Option<Box<MoreConditions>>,
}

impl Default for RouteMatch {
    /// The spec's default: `PathPrefix /`.
    fn default() -> Self {
        RouteMatch {
            path: PathMatch::Prefix("/".into()),
            headers: vec![],
            query: vec![],
            method: None,
            more: None,
        }
    }
}

impl RouteMatch {
    /// Whether `r`, addressed to service port `port` by a client of `client_namespace`,
    /// matches.
    fn matches_at(&self, r: &Request<'_>, port: u16, client_namespace: Option<&str>) -> bool {
        self.matches(r)
            && self
                .more
                .as_ref()
                .is_none_or(|c| c.hold(r, port, client_namespace))
    }

    fn matches(&self, r: &Request<'_>) -> bool {
        self.path.matches(r.path)
            && self.method.as_deref().is_none_or(|m| m == r.method)
            && self.headers.iter().all(|(n, m)| {
                // Repeated headers: the first occurrence is matched (Gateway API).
                r.header(n).is_some_and(|v| m.matches(v))
            })
            && self
                .query
                .iter()
                .all(|(n, m)| r.query_param(n).is_some_and(|v| m.matches(&v)))
    }

    /// Precedence key, higher wins: path class (Exact 3, RegularExpression 2, PathPrefix 1 —
    /// regex precedence is implementation-specific; this is Istio's order), path length,
    /// method, header count, query count.
    fn rank(&self) -> MatchRank {
        let (class, len) = match &self.path {
            PathMatch::Exact(p) => (3, p.len()),
            PathMatch::Regex(r) => (2, r.as_str().len()),
            PathMatch::Prefix(p) => (1, p.trim_end_matches('/').len()),
            PathMatch::StartsWith(p, _) => (1, p.len()),
        };
        (
            class,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`. Names compare case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderModifier {
    /// Apply to a header list: `set` replaces every value of the name, `add` appends,
    /// `remove` deletes.
    pub fn apply(&self, headers: &mut Vec<(String, String)>) {
        for (n, v) in &self.set {
            headers.retain(|(h, _)| !h.eq_ignore_ascii_case(n));
            headers.push((n.clone(), v.clone()));
        }
        for (n, v) in &self.add {
            headers.push((n.clone(), v.clone()));
        }
        for n in &self.remove {
            headers.retain(|(h, _)| !h.eq_ignore_ascii_case(n));
        }
    }
}

/// `path` of a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Only with a `PathPrefix` match (checked at load).
    ReplacePrefixMatch(String),
    /// A VirtualService's `rewrite.uri` (Envoy's `prefix_rewrite`): the matched prefix, or
    /// the whole path for an exact match, is replaced (never with a regex match: checked
    /// at load).
    ReplaceMatched(String),
    /// A VirtualService's `rewrite.uriRegexRewrite`: every match of the pattern in the
    /// path replaced (`$1`… for groups).
    RegexRewrite(Pattern, String),
}

/// A regular expression compared by its text.
#[derive(Debug, Clone)]
pub struct Pattern(pub Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Pattern {}

/// A share of requests, `numerator / denominator` (all when `numerator >= denominator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub numerator: u32,
    pub denominator: u32,
}

impl Share {
    /// Istio's `Percent` (a percentage with decimals), in millionths as Istio gives it to
    /// Envoy.
    pub fn percent(p: f64) -> Share {
        Share {
            numerator: (p.clamp(0.0, 100.0) * 10_000.0) as u32,
            denominator: 1_000_000,
        }
    }

    /// Whether this request is one of the share.
    pub fn sampled(&self, rng: &mut dyn Rng) -> bool {
        self.numerator >= self.denominator
            || rng.below(u64::from(self.denominator)) < u64::from(self.numerator)
    }
}

/// A VirtualService's `fault`: Envoy's fault filter on the route, each fault drawn on its
/// own share of requests (a delay first, then an abort).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<(Duration, Share)>,
    pub abort: Option<(Abort, Share)>,
}

/// What an injected abort answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// `httpStatus`.
    Http(u16),
    /// `grpcStatus`, as its code: HTTP 200 with `grpc-status`.
    Grpc(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301, 302 (default), 303, 307 or 308.
    pub status_code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// `RequestMirror`: a copy of the request to this service port, responses discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub service: ObjectRef,
    pub port: u16,
    /// The share of requests mirrored, `numerator / denominator`: `percent: p` is p/100,
    /// `fraction` as given; every request when neither is.
    pub numerator: u32,
    pub denominator: u32,
}

impl Mirror {
    /// Whether this request is one of the mirrored share.
    pub fn sampled(&self, rng: &mut dyn Rng) -> bool {
        let share = Share {
            numerator: self.numerator,
            denominator: self.denominator,
        };
        share.sampled(rng)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    RequestHeader(HeaderModifier),
    ResponseHeader(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
    /// A VirtualService's `fault`.
    Fault(Fault),
    /// A VirtualService's `directResponse`: answered by the waypoint.
    Direct {
        status: u16,
        body: String,
    },
    /// A VirtualService's `corsPolicy`, or an HTTPRoute's `CORS` filter.
    Cors(std::sync::Arc<Cors>),
}

/// A CORS policy, applied as Envoy's CORS filter applies the one istiod writes: a request
/// with an `Origin` is a CORS request; a preflight (`OPTIONS` with
/// `Access-Control-Request-Method`) is answered `200` by the waypoint (its origin echoed
/// when allowed; one not allowed is forwarded instead unless `forward_unmatched` is off);
/// an allowed origin gets `Access-Control-Allow-Origin` (and `-Credentials`,
/// `-Expose-Headers`) on its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// Allowed origins (any when one of them matches `*`).
    pub origins: Vec<ValueMatch>,
    /// Comma-separated, as sent; `*`: the requested method or headers echoed.
    pub methods: String,
    pub headers: String,
    pub expose: String,
    /// Seconds, as sent; empty: none.
    pub max_age: String,
    pub credentials: bool,
    pub forward_unmatched: bool,
}

/// What a CORS policy does with one request.
enum CorsStep {
    /// Not a CORS request, or one whose origin is not allowed: as usual.
    Pass,
    /// Answer this preflight with these fields.
    Answer(HeaderModifier),
    /// Forward, these fields going onto the response.
    Respond(HeaderModifier),
}

impl Cors {
    fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|o| o.matches("*") || o.matches(origin))
    }

    fn step(&self, req: &Request<'_>) -> CorsStep {
        let Some(origin) = req.header("origin").filter(|o| !o.is_empty()) else {
            return CorsStep::Pass;
        };
        let allowed = self.allows(origin);
        let requested = req
            .header("access-control-request-method")
            .filter(|m| !m.is_empty());
        let mut set = vec![];
        let mut field = |n: &str, v: &str| set.push((n.to_string(), v.to_string()));
        if req.method == "OPTIONS" && requested.is_some() {
            if !allowed && self.forward_unmatched {
                return CorsStep::Pass;
            }
            if allowed {
                field("access-control-allow-origin", origin);
            }
            if self.credentials {
                field("access-control-allow-credentials", "true");
            }
            match self.methods.as_str() {
                "" => {}
                "*" => field("access-control-allow-methods", requested.unwrap_or("")),
                m => field("access-control-allow-methods", m),
            }
            match self.headers.as_str() {
                "" => {}
                "*" => field(
                    "access-control-allow-headers",
                    req.header("access-control-request-headers").unwrap_or(""),
                ),
                h => field("access-control-allow-headers", h),
            }
            if !self.max_age.is_empty() {
                field("access-control-max-age", &self.max_age);
            }
            return CorsStep::Answer(HeaderModifier {
                set,
                ..HeaderModifier::default()
            });
        }
        if !allowed {
            return CorsStep::Pass;
        }
        field("access-control-allow-origin", origin);
        if self.credentials {
            field("access-control-allow-credentials", "true");
        }
        if !self.expose.is_empty() {
            field("access-control-expose-headers", &self.expose);
        }
        CorsStep::Respond(HeaderModifier {
            set,
            ..HeaderModifier::default()
        })
    }
}

/// A weighted `backendRefs[]` entry (a Service and port), with its own filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub service: ObjectRef,
    /// 0 for a VirtualService destination without a port whose service has several (or
    /// is unknown): the port the request was addressed to (see
    /// [`RouteTable::prebuild_with_model`]).
    pub port: u16,
    pub weight: u32,
    pub filters: Vec<Filter>,
    /// `false`: a Service of another namespace that no `ReferenceGrant` there lets the
    /// route name (Gateway API): the requests its weight gives it get `500`, the TCP
    /// connections are refused.
    pub permitted: bool,
}

/// `timeouts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    /// The whole request, retries included.
    pub request: Option<Duration>,
    /// Each try to a backend.
    pub backend_request: Option<Duration>,
}

/// `retry`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Retry {
    /// Status codes that are retried (empty: connection failures only).
    pub codes: Vec<u16>,
    /// gRPC statuses that are retried, found as Envoy looks for them: a `grpc-status` in
    /// the response head (a trailers-only response).
    pub grpc: Vec<u32>,
    pub attempts: u32,
    pub backoff: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Never empty (an absent list is the default match).
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
}

/// A compiled `HTTPRoute`.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    pub id: ObjectRef,
    /// `metadata.creationTimestamp` (RFC 3339, compared as UTC text); absent sorts last.
    pub created: Option<String>,
    /// A VirtualService: its rules are tried in order and the first that matches decides
    /// (no Gateway API precedence), for clients of every namespace.
    pub in_order: bool,
    /// Service parents: namespace/name and an optional port.
    pub parents: Vec<(ObjectRef, Option<u16>)>,
    pub rules: Vec<Rule>,
}

/// A Gateway API `TCPRoute` with Service parents (GAMMA): a connection to a parent's port
/// is opaque TCP (no protocol detection) and goes to one of `backends` by weight. It has
/// one rule (more are refused at load) and no filters.
#[derive(Debug, Clone)]
pub struct TcpRoute {
    pub id: ObjectRef,
    /// As [`HttpRoute::created`]: the oldest of two on one port wins.
    pub created: Option<String>,
    pub parents: Vec<(ObjectRef, Option<u16>)>,
    /// Without filters.
    pub backends: Vec<Backend>,
}

impl TcpRoute {
    /// A backend by weight; `None` when every weight is 0 (or there is none): the
    /// connection is refused, as the Gateway API says of a rule with no valid backend.
    pub fn pick(&self, rng: &mut dyn Rng) -> Option<&Backend> {
        pick_weighted(&self.backends, rng).map(|i| &self.backends[i])
    }
}

/// Index of one of `backends` chosen by weight (`None` when the weights sum to 0).
fn pick_weighted(backends: &[Backend], rng: &mut dyn Rng) -> Option<usize> {
    crate::lb::draw(backends.iter().map(|b| b.weight as u64), rng)
}

/// The request as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// After `?`, without it.
    pub query: Option<&'a str>,
    pub headers: &'a [(&'a str, &'a str)],
    /// `http` inside the mesh.
    pub scheme: &'a str,
}

impl<'a> Request<'a> {
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// First value of a query parameter, name and value percent-decoded (`+` is kept:
    /// Gateway API matches the decoded value, as Envoy does).
    pub fn query_param(&self, name: &str) -> Option<std::borrow::Cow<'a, str>> {
        self.query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }

    fn host(&self) -> &'a str {
        self.header(":authority")
            .or_else(|| self.header("host"))
            .unwrap_or("")
    }
}

/// Where a request was addressed (the HBONE CONNECT target, resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// A pod: forwarded as is after policy (R16).
    Workload,
    /// A service and its port (R17).
    Service { service: &'a ObjectRef, port: u16 },
}

/// The forward of a pod-addressed request (R16): no routing, nothing changed on the way;
/// one for all (not built per request).
static NO_ROUTING: std::sync::LazyLock<Forward> = std::sync::LazyLock::new(Forward::default);

/// The upstream chosen for a forwarded request, and what to do on the way.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Forward {
    /// The service and port to balance over; `None` for a pod-addressed request.
    pub service: Option<(ObjectRef, u16)>,
    /// New `:path` (with the query), if rewritten.
    pub path: Option<String>,
    /// New `Host`/`:authority`, if rewritten.
    pub host: Option<String>,
    /// Route-level then backend-level, in order.
    pub request_headers: Vec<HeaderModifier>,
    pub response_headers: Vec<HeaderModifier>,
    pub mirrors: Vec<Mirror>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
    /// A VirtualService's fault injection.
    pub fault: Option<Fault>,
    /// `namespace/name` and rule index of the route that decided, if any.
    pub route: Option<(ObjectRef, usize)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward(Box<Forward>),
    /// Answer directly with a redirect (`Location` header).
    Redirect {
        status: u16,
        location: String,
        response_headers: Vec<HeaderModifier>,
    },
    /// Answer directly: 404 (routes attached, none matched), 500 (no usable backend).
    Respond {
        status: u16,
        reason: &'static str,
    },
    /// Answer directly with this status, body and fields: a VirtualService's
    /// `directResponse`, or a CORS preflight.
    Direct {
        status: u16,
        body: String,
        response_headers: Vec<HeaderModifier>,
    },
}

/// All routes, sorted by the cross-route tie-break (oldest, then namespace/name).
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<HttpRoute>,
    /// By route, rule and backend: the [`Forward`] of a rule and backend whose filters do
    /// not depend on the request (no redirect, no path rewrite), built once here so that a
    /// request borrows it instead of building its own. Its mirrors are all the configured
    /// ones (a request checks they exist).
    prebuilt: Vec<Vec<Vec<Option<Forward>>>>,
    /// By service and port of the mesh snapshot ([`RouteTable::prebuild_with_model`]):
    /// the [`Forward`] of a service without routes (R17, the service routes to itself),
    /// borrowed by its requests instead of built for each.
    self_routed: crate::upstream::FnvMap<ObjectRef, Vec<(u16, Forward)>>,
    /// By parent service: the indices (ascending, so in tie-break order) of the routes
    /// naming it on some port, so that a request looks only at its service's routes.
    by_service: crate::upstream::FnvMap<ObjectRef, Vec<usize>>,
    /// TCPRoutes, oldest first ([`RouteTable::with_tcp`]).
    tcp: Vec<TcpRoute>,
}

/// Oldest first (no `creationTimestamp`: last), then by namespace/name: the Gateway API's
/// order among conflicting routes.
fn by_age(
    a: (&Option<String>, &ObjectRef),
    b: (&Option<String>, &ObjectRef),
) -> std::cmp::Ordering {
    let ta = (a.0.is_none(), a.0.as_deref());
    let tb = (b.0.is_none(), b.0.as_deref());
    ta.cmp(&tb).then_with(|| a.1.cmp(b.1))
}

impl RouteTable {
    pub fn new(mut routes: Vec<HttpRoute>) -> Self {
        routes.sort_by(|a, b| by_age((&a.created, &a.id), (&b.created, &b.id)));
        let prebuilt = routes
            .iter()
            .map(|route| {
                (0..route.rules.len())
                    .map(|ri| prebuild(route, ri))
                    .collect()
            })
            .collect();
        let mut by_service = crate::upstream::FnvMap::<ObjectRef, Vec<usize>>::default();
        for (i, route) in routes.iter().enumerate() {
            for (parent, _) in &route.parents {
                let list = by_service.entry(parent.clone()).or_default();
                // A route naming the service on several ports is listed once.
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        RouteTable {
            routes,
            prebuilt,
            self_routed: Default::default(),
            by_service,
            tcp: Vec::new(),
        }
    }

    /// This table with the file's TCPRoutes.
    pub fn with_tcp(mut self, mut tcp: Vec<TcpRoute>) -> Self {
        tcp.sort_by(|a, b| by_age((&a.created, &a.id), (&b.created, &b.id)));
        self.tcp = tcp;
        self
    }

    pub fn tcp_routes(&self) -> &[TcpRoute] {
        &self.tcp
    }

    /// The TCPRoute that takes connections to `service:port` from a client of
    /// `client_namespace`, if one does: the oldest attached, a consumer route (in the
    /// client's namespace, naming a service of another) before the producer routes, as for
    /// HTTP ([`RouteTable::route_from`]).
    pub fn tcp_route(
        &self,
        client_namespace: Option<&str>,
        service: &ObjectRef,
        port: u16,
    ) -> Option<&TcpRoute> {
        let consumer = client_namespace.filter(|ns| *ns != service.namespace);
        let attached_in = |ns: &str| {
            self.tcp
                .iter()
                .find(|r| r.id.namespace == ns && attached(&r.parents, service, port))
        };
        consumer
            .and_then(attached_in)
            .or_else(|| attached_in(&service.namespace))
    }

    /// What needs the mesh model `snap` (the snapshot this table is used with):
    ///
    /// - A VirtualService destination or mirror without a port takes its service's port
    ///   when the service has only one, as istiod resolves it (else the port the request
    ///   was addressed to, per request); the rules so resolved are prebuilt again.
    /// - The self-routing (R17) [`Forward`] of every port of every service is prebuilt. A
    ///   request still checks that its service exists and has no route attached; a port
    ///   the snapshot does not list gets its own.
    pub fn prebuild_with_model(&mut self, snap: &mesh_model::snapshot::Snapshot) {
        let single_port = |s: &ObjectRef| {
            let svc = snap
                .services()
                .find(|x| x.namespace == s.namespace && x.name == s.name)?;
            let mut ports = svc.ports.keys();
            match (ports.next(), ports.next()) {
                (Some(&p), None) => Some(p),
                _ => None,
            }
        };
        // Only a VirtualService has destinations without a port.
        for (i, route) in self.routes.iter_mut().enumerate() {
            if !route.in_order {
                continue;
            }
            for ri in 0..route.rules.len() {
                let mut changed = false;
                let mut resolve = |svc: &ObjectRef, port: &mut u16| {
                    if *port == 0 {
                        if let Some(p) = single_port(svc) {
                            *port = p;
                            changed = true;
                        }
                    }
                };
                let rule = &mut route.rules[ri];
                for f in rule.filters.iter_mut() {
                    if let Filter::Mirror(m) = f {
                        resolve(&m.service, &mut m.port);
                    }
                }
                for b in rule.backends.iter_mut() {
                    resolve(&b.service, &mut b.port);
                }
                if changed {
                    self.prebuilt[i][ri] = prebuild(route, ri);
                }
            }
        }
        self.self_routed.clear();
        for svc in snap.services() {
            let service = ObjectRef::new(svc.namespace.clone(), svc.name.clone());
            let ports = svc
                .ports
                .keys()
                .map(|&port| {
                    let fwd = Forward {
                        service: Some((service.clone(), port)),
                        ..Forward::default()
                    };
                    (port, fwd)
                })
                .collect();
            self.self_routed.insert(service, ports);
        }
    }

    pub fn routes(&self) -> &[HttpRoute] {
        &self.routes
    }

    /// Route one request from a client of unknown namespace (producer routes only; see
    /// [`RouteTable::route_from`]).
    pub fn route(
        &self,
        target: Target<'_>,
        req: &Request<'_>,
        service_exists: &dyn Fn(&ObjectRef) -> bool,
        rng: &mut dyn Rng,
    ) -> Decision {
        self.route_from(None, target, req, service_exists, rng)
    }

    /// Route one request of a client in `client_namespace` (from its verified identity).
    /// `service_exists` says whether a backend service is known; `rng` splits traffic
    /// across weighted backends.
    pub fn route_from(
        &self,
        client_namespace: Option<&str>,
        target: Target<'_>,
        req: &Request<'_>,
        service_exists: &dyn Fn(&ObjectRef) -> bool,
        rng: &mut dyn Rng,
    ) -> Decision {
        match self.route_shared_from(client_namespace, target, req, service_exists, rng) {
            Ok(fwd) => Decision::Forward(Box::new(fwd.into_owned())),
            Err(d) => d,
        }
    }

    /// [`RouteTable::route_shared_from`] for a client of unknown namespace.
    pub fn route_shared(
        &self,
        target: Target<'_>,
        req: &Request<'_>,
        service_exists: &dyn Fn(&ObjectRef) -> bool,
        rng: &mut dyn Rng,
    ) -> Result<Cow<'_, Forward>, Decision> {
        self.route_shared_from(None, target, req, service_exists, rng)
    }

    /// [`RouteTable::route_from`] without copying a rule's prebuilt [`Forward`]: `Ok` with
    /// the forward (borrowed from the table when the rule and backend allow it), `Err` with
    /// any other decision (never [`Decision::Forward`]).
    pub fn route_shared_from(
        &self,
        client_namespace: Option<&str>,
        target: Target<'_>,
        req: &Request<'_>,
        service_exists: &dyn Fn(&ObjectRef) -> bool,
        rng: &mut dyn Rng,
    ) -> Result<Cow<'_, Forward>, Decision> {
        let (service, port) = match target {
            Target::Workload => return Ok(Cow::Borrowed(&NO_ROUTING)),
            Target::Service { service, port } => (service, port),
        };
        // GAMMA's namespace rule (Gateway API GEP-1294, "Namespace boundaries"): a route in
        // the service's namespace is a *producer* route, for every client; a route in
        // another namespace is a *consumer* route, for clients of that namespace only, and
        // for them the consumer routes (merged) replace the producer routes. `None` (no
        // verified client namespace) gets the producer routes. One pass over the service's
        // routes ranks both groups; the consumer group wins when it has a route attached.
        let consumer = client_namespace.filter(|ns| *ns != service.namespace);
        let mut producer = Group::default();
        let mut consumers = Group::default();
        let attached_here = self.by_service.get(service).map_or(&[][..], |v| &v[..]);
        for &i in attached_here {
            let route = &self.routes[i];
            if route.in_order {
                // A VirtualService is alone on its service (checked at load).
                if attached(&route.parents, service, port) {
                    return self.first_match(i, client_namespace, req, port, service_exists, rng);
                }
                continue;
            }
            let group = if route.id.namespace == service.namespace {
                &mut producer
            } else if consumer == Some(route.id.namespace.as_str()) {
                &mut consumers
            } else {
                continue;
            };
            if !attached(&route.parents, service, port) {
                continue;
            }
            group.any = true;
            for (ri, rule) in route.rules.iter().enumerate() {
                for m in &rule.matches {
                    if !m.matches(req) {
                        continue;
                    }
                    let rank = m.rank();
                    // Strictly greater: ties go to the older route, then the earlier rule.
                    if group.best.as_ref().is_none_or(|b| rank > b.0) {
                        group.best = Some((rank, i, ri, m));
                    }
                }
            }
        }
        let Group { any, best } = if consumers.any { consumers } else { producer };
        if !any {
            // R17: no route attached, the service routes to itself.
            if !service_exists(service) {
                return Err(Decision::Respond {
                    status: 500,
                    reason: "unknown service",
                });
            }
            let prebuilt = self
                .self_routed
                .get(service)
                .and_then(|ps| ps.iter().find(|(p, _)| *p == port));
            return Ok(match prebuilt {
                Some((_, fwd)) => Cow::Borrowed(fwd),
                None => Cow::Owned(Forward {
                    service: Some((service.clone(), port)),
                    ..Forward::default()
                }),
            });
        }
        let Some((_, i, ri, m)) = best else {
            return Err(Decision::Respond {
                status: 404,
                reason: "no matching route",
            });
        };
        let prebuilt = &self.prebuilt[i][ri];
        apply_rule(
            &self.routes[i],
            ri,
            prebuilt,
            m,
            req,
            port,
            service_exists,
            rng,
        )
    }
}

impl RouteTable {
    /// A VirtualService's routing: its first rule with a matching entry decides; 404 when
    /// none matches (Envoy's `NR`).
    fn first_match(
        &self,
        i: usize,
        client_namespace: Option<&str>,
        req: &Request<'_>,
        port: u16,
        service_exists: &dyn Fn(&ObjectRef) -> bool,
        rng: &mut dyn Rng,
    ) -> Result<Cow<'_, Forward>, Decision> {
        let route = &self.routes[i];
        for (ri, rule) in route.rules.iter().enumerate() {
            if let Some(m) = rule
                .matches
                .iter()
                .find(|m| m.matches_at(req, port, client_namespace))
            {
                let prebuilt = &self.prebuilt[i][ri];
                return apply_rule(route, ri, prebuilt, m, req, port, service_exists, rng);
            }
        }
        Err(Decision::Respond {
            status: 404,
            reason: "no matching route",
        })
    }
}

/// The routes of one namespace attached to a request's service: whether there is one, and
/// the best match so far (rank, route index, rule index, the match).
#[derive(Default)]
struct Group<'r> {
    any: bool,
    best: Option<(MatchRank, usize, usize, &'r RouteMatch)>,
}

/// A match's precedence ([`RouteMatch::rank`]): greater wins.
type MatchRank = (u8, usize, bool, usize, usize);

/// Whether `route` names `service` (on `port`, or on every port) as a parent.
fn attached(parents: &[(ObjectRef, Option<u16>)], service: &ObjectRef, port: u16) -> bool {
    parents
        .iter()
        .any(|(p, pp)| p == service && pp.is_none_or(|pp| pp == port))
}

/// The prebuilt [`Forward`]s of rule `ri` of `route`, by backend: `None` for a backend
/// (or a rule) whose filters depend on the request (a redirect, a path rewrite).
fn prebuild(route: &HttpRoute, ri: usize) -> Vec<Option<Forward>> {
    let rule = &route.rules[ri];
    let per_request = |fs: &[Filter]| {
        fs.iter().any(|f| match f {
            Filter::Redirect(_) | Filter::Direct { .. } => true,
            Filter::Rewrite(Rewrite { path, .. }) => path.is_some(),
            // Its port is the request's.
            Filter::Mirror(m) => m.port == 0,
            _ => false,
        })
    };
    if per_request(&rule.filters) {
        return vec![None; rule.backends.len()];
    }
    // Filters without a path rewrite do not read the request or the match.
    let m = RouteMatch::default();
    let req = Request {
        method: "",
        path: "",
        query: None,
        headers: &[],
        scheme: "http",
    };
    rule.backends
        .iter()
        .map(|backend| {
            if per_request(&backend.filters) || backend.port == 0 {
                return None;
            }
            let mut fwd = Forward {
                timeouts: rule.timeouts,
                retry: rule.retry.clone(),
                route: Some((route.id.clone(), ri)),
                ..Forward::default()
            };
            let mut answer = None;
            collect_filters(&rule.filters, &m, &req, 0, &mut fwd, &mut answer);
            collect_filters(&backend.filters, &m, &req, 0, &mut fwd, &mut answer);
            fwd.service = Some((backend.service.clone(), backend.port));
            Some(fwd)
        })
        .collect()
}

/// Rule `ri` of `route` for a request it matched (`m`): a CORS preflight answered, else
/// [`forward_by_rule`] with any CORS fields added to the response.
#[allow(clippy::too_many_arguments)]
fn apply_rule<'t>(
    route: &HttpRoute,
    ri: usize,
    prebuilt: &'t [Option<Forward>],
    m: &RouteMatch,
    req: &Request<'_>,
    port: u16,
    service_exists: &dyn Fn(&ObjectRef) -> bool,
    rng: &mut dyn Rng,
) -> Result<Cow<'t, Forward>, Decision> {
    let cors = route.rules[ri].filters.iter().find_map(|f| match f {
        Filter::Cors(c) => Some(c.step(req)),
        _ => None,
    });
    let fields = match cors {
        None | Some(CorsStep::Pass) => {
            return forward_by_rule(route, ri, prebuilt, m, req, port, service_exists, rng)
        }
        Some(CorsStep::Answer(fields)) => {
            return Err(Decision::Direct {
                status: 200,
                body: String::new(),
                response_headers: vec![fields],
            })
        }
        Some(CorsStep::Respond(fields)) => fields,
    };
    match forward_by_rule(route, ri, prebuilt, m, req, port, service_exists, rng) {
        Ok(fwd) => {
            let mut fwd = fwd.into_owned();
            fwd.response_headers.push(fields);
            Ok(Cow::Owned(fwd))
        }
        Err(mut d) => {
            if let Decision::Redirect {
                response_headers, ..
            }
            | Decision::Direct {
                response_headers, ..
            } = &mut d
            {
                response_headers.push(fields);
            }
            Err(d)
        }
    }
}

/// The forward (or redirect, or direct response) of rule `ri` of `route` for a request it
/// matched (`m`).
#[allow(clippy::too_many_arguments)]
fn forward_by_rule<'t>(
    route: &HttpRoute,
    ri: usize,
    prebuilt: &'t [Option<Forward>],
    m: &RouteMatch,
    req: &Request<'_>,
    port: u16,
    service_exists: &dyn Fn(&ObjectRef) -> bool,
    rng: &mut dyn Rng,
) -> Result<Cow<'t, Forward>, Decision> {
    let rule = &route.rules[ri];
    let build = |answer: &mut Option<Answer>| {
        let mut fwd = Forward {
            timeouts: rule.timeouts,
            retry: rule.retry.clone(),
            route: Some((route.id.clone(), ri)),
            ..Forward::default()
        };
        collect_filters(&rule.filters, m, req, port, &mut fwd, answer);
        fwd
    };
    // A rule with a prebuilt forward has no redirect (see `prebuild`); else the rule's
    // filters are applied first, a redirect (or a direct response) answering before any
    // backend is chosen.
    let mut built = None;
    if prebuilt.iter().all(Option::is_none) {
        let mut answer = None;
        let fwd = build(&mut answer);
        match answer {
            Some(Answer::Redirect(r)) => {
                return Err(Decision::Redirect {
                    status: r.status_code,
                    location: redirect_location(&r, m, req, port),
                    response_headers: fwd.response_headers,
                })
            }
            Some(Answer::Direct(status, body)) => {
                return Err(Decision::Direct {
                    status,
                    body,
                    response_headers: fwd.response_headers,
                })
            }
            None => built = Some(fwd),
        }
    }
    let Some(bi) = pick_weighted(&rule.backends, rng) else {
        return Err(Decision::Respond {
            status: 500,
            reason: "no backend",
        });
    };
    let backend = &rule.backends[bi];
    if !backend.permitted {
        return Err(Decision::Respond {
            status: 500,
            reason: "backend reference not permitted (no ReferenceGrant)",
        });
    }
    if !service_exists(&backend.service) {
        return Err(Decision::Respond {
            status: 500,
            reason: "backend service not found",
        });
    }
    if let Some(Some(t)) = prebuilt.get(bi) {
        if t.mirrors.iter().all(|mi| service_exists(&mi.service)) {
            return Ok(Cow::Borrowed(t));
        }
        let mut fwd = t.clone();
        fwd.mirrors.retain(|mi| service_exists(&mi.service));
        return Ok(Cow::Owned(fwd));
    }
    let mut answer = None;
    let mut fwd = built.unwrap_or_else(|| build(&mut answer));
    collect_filters(&backend.filters, m, req, port, &mut fwd, &mut answer);
    let backend_port = if backend.port == 0 {
        port
    } else {
        backend.port
    };
    fwd.service = Some((backend.service.clone(), backend_port));
    fwd.mirrors.retain(|mi| service_exists(&mi.service));
    Ok(Cow::Owned(fwd))
}

/// What a rule answers itself instead of forwarding.
enum Answer {
    Redirect(Redirect),
    /// Status and body.
    Direct(u16, String),
}

/// Apply `filters` to `fwd` for a request matched by `m` on service port `port` (0 when
/// prebuilding: no filter then needs it); a redirect or direct response goes to `answer`.
fn collect_filters(
    filters: &[Filter],
    m: &RouteMatch,
    req: &Request<'_>,
    port: u16,
    fwd: &mut Forward,
    answer: &mut Option<Answer>,
) {
    for f in filters {
        match f {
            Filter::RequestHeader(h) => fwd.request_headers.push(h.clone()),
            Filter::ResponseHeader(h) => fwd.response_headers.push(h.clone()),
            Filter::Redirect(r) => *answer = Some(Answer::Redirect(r.clone())),
            Filter::Direct { status, body } => {
                *answer = Some(Answer::Direct(*status, body.clone()))
            }
            Filter::Fault(x) => fwd.fault = Some(x.clone()),
            // Applied by `apply_rule`, which sees the request.
            Filter::Cors(_) => {}
            Filter::Rewrite(rw) => {
                if let Some(h) = &rw.hostname {
                    fwd.host = Some(h.clone());
                }
                if let Some(p) = &rw.path {
                    let mut path = modify_path(p, m, req.path);
                    if let Some(q) = req.query {
                        path.push('?');
                        path.push_str(q);
                    }
                    fwd.path = Some(path);
                }
            }
            Filter::Mirror(mi) => {
                let mut mi = mi.clone();
                if mi.port == 0 {
                    mi.port = port;
                }
                fwd.mirrors.push(mi)
            }
        }
    }
}

/// `ReplaceFullPath` / `ReplacePrefixMatch` per the Gateway API table: the matched prefix
/// (segment-wise) is replaced and the separating `/` kept.
pub fn modify_path(p: &PathModifier, m: &RouteMatch, path: &str) -> String {
    match p {
        PathModifier::ReplaceFullPath(f) => f.clone(),
        PathModifier::ReplaceMatched(repl) => {
            let matched = match &m.path {
                PathMatch::StartsWith(pre, _) => pre.len(),
                PathMatch::Prefix(pre) => pre.trim_end_matches('/').len(),
                PathMatch::Exact(_) | PathMatch::Regex(_) => path.len(),
            };
            let mut out = repl.clone();
            out.push_str(path.get(matched..).unwrap_or(""));
            out
        }
        PathModifier::RegexRewrite(pattern, with) => {
            pattern.0.replace_all(path, with.as_str()).into_owned()
        }
        PathModifier::ReplacePrefixMatch(repl) => {
            let prefix = match &m.path {
                PathMatch::Prefix(pre) => pre.trim_end_matches('/'),
                _ => "",
            };
            let rest = path.get(prefix.len()..).unwrap_or("");
            let mut out = repl.trim_end_matches('/').to_string();
            out.push_str(rest);
            if out.is_empty() {
                out.push('/');
            } else if !out.starts_with('/') {
                out.insert(0, '/');
            }
            out
        }
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// `Location` of a `RequestRedirect`. Port: the configured one; else, when a scheme is
/// configured, its well-known port; else the "listener" port, which for a waypoint is the
/// service port the request was addressed to. A well-known port for the scheme is left out.
fn redirect_location(r: &Redirect, m: &RouteMatch, req: &Request<'_>, listener: u16) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(req.scheme);
    let (req_host, _) = split_host_port(req.host());
    let host = r.hostname.as_deref().unwrap_or(req_host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => default_port(scheme),
        (None, None) => Some(listener),
    };
    let mut loc = format!("{scheme}://{host}");
    if let Some(p) = port {
        if default_port(scheme) != Some(p) {
            loc.push_str(&format!(":{p}"));
        }
    }
    match &r.path {
        Some(p) => loc.push_str(&modify_path(p, m, req.path)),
        None => loc.push_str(req.path),
    }
    if let Some(q) = req.query {
        loc.push('?');
        loc.push_str(q);
    }
    loc
}

/// `host[:port]`, IPv6 in brackets.
fn split_host_port(a: &str) -> (&str, Option<u16>) {
    if let Some(rest) = a.strip_prefix('[') {
        if let Some((h, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (&a[..h.len() + 2], port);
        }
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(p) => (h, Some(p)),
            Err(_) => (a, None),
        },
        _ => (a, None),
    }
}

/// Decode `%XX` escapes; a malformed escape or a result that is not UTF-8 is kept as
/// written.
pub fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') {
        return std::borrow::Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    match String::from_utf8(out) {
        Ok(d) => std::borrow::Cow::Owned(d),
        Err(_) => std::borrow::Cow::Borrowed(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_samples_its_fraction_of_requests() {
        let mirror = |numerator, denominator| Mirror {
            service: ObjectRef::new("default", "m"),
            port: 80,
            numerator,
            denominator,
        };
        let mut rng = crate::lb::SplitMix64(7);
        let quarter = mirror(1, 4);
        let n = (0..40_000).filter(|_| quarter.sampled(&mut rng)).count();
        assert!((9_500..=10_500).contains(&n), "{n} of 40,000 for 1/4");
        assert!((0..1000).all(|_| mirror(1, 1).sampled(&mut rng)));
        assert!((0..1000).all(|_| !mirror(0, 100).sampled(&mut rng)));
    }
    use crate::lb::SplitMix64;

    fn backend(name: &str, weight: u32, filters: Vec<Filter>) -> Backend {
        Backend {
            service: ObjectRef::new("default", name),
            port: 80,
            weight,
            filters,
            permitted: true,
        }
    }

    /// A rule and backend without request-dependent filters are routed to a forward built
    /// once (borrowed); a path rewrite is built per request; both decide as `route` does.
    #[test]
    fn r17_prebuilt_forwards_are_borrowed_and_decide_as_built_ones() {
        let add = HeaderModifier {
            add: vec![("x-a".into(), "1".into())],
            ..Default::default()
        };
        let rewrite = Filter::Rewrite(Rewrite {
            hostname: None,
            path: Some(PathModifier::ReplaceFullPath("/r".into())),
        });
        let mirror = Filter::Mirror(Mirror {
            service: ObjectRef::new("default", "ghost"),
            port: 80,
            numerator: 1,
            denominator: 1,
        });
        let route = HttpRoute {
            id: ObjectRef::new("default", "echo"),
            created: None,
            in_order: false,
            parents: vec![(ObjectRef::new("default", "echo"), None)],
            rules: vec![Rule {
                matches: vec![RouteMatch::default()],
                filters: vec![Filter::RequestHeader(add)],
                backends: vec![
                    backend("v1", 1, vec![]),
                    backend("v2", 1, vec![rewrite]),
                    backend("v3", 1, vec![mirror]),
                ],
                timeouts: Timeouts::default(),
                retry: None,
            }],
        };
        let table = RouteTable::new(vec![route]);
        let svc = ObjectRef::new("default", "echo");
        let target = Target::Service {
            service: &svc,
            port: 80,
        };
        let req = Request {
            method: "GET",
            path: "/p",
            query: None,
            headers: &[],
            scheme: "http",
        };
        let exists = |s: &ObjectRef| s.name != "ghost";
        let mut seen = std::collections::BTreeMap::new();
        for seed in 0..60 {
            let shared = table.route_shared(target, &req, &exists, &mut SplitMix64(seed));
            let built = table.route(target, &req, &exists, &mut SplitMix64(seed));
            let fwd = shared.expect("forwarded");
            assert_eq!(Decision::Forward(Box::new(fwd.clone().into_owned())), built);
            let name = fwd.service.as_ref().unwrap().0.name.clone();
            // v1: prebuilt; v2: its path rewrite is per request; v3: prebuilt, but its
            // mirror's service is missing, so a copy without it.
            let borrowed = matches!(fwd, Cow::Borrowed(_));
            assert_eq!(borrowed, name == "v1", "{name}");
            assert_eq!(fwd.request_headers.len(), 1);
            assert!(fwd.mirrors.is_empty());
            assert_eq!(fwd.path.as_deref(), (name == "v2").then_some("/r"));
            *seen.entry(name).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    /// R17: a service without routes routes to itself through a forward built once per
    /// snapshot (borrowed), equal to the one built for a port the snapshot does not list;
    /// an unknown service is still 500, a routed one still goes by its route.
    #[test]
    fn r17_self_routed_forward_is_prebuilt_per_snapshot() {
        let text = r#"
services:
  - {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["10.96.0.10"], ports: {80: 8080, 81: 8081}}
  - {name: other, namespace: default, hostname: other.default.svc.cluster.local, vips: ["10.96.0.11"], ports: {80: 8080}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: other}]
  rules:
    - backendRefs: [{name: echo, port: 80}]
"#;
        let cfg = crate::config::load_str(std::path::Path::new("t.yaml"), text, 1).unwrap();
        let exists = |s: &ObjectRef| cfg.service_exists(s);
        let req = Request {
            method: "GET",
            path: "/",
            query: None,
            headers: &[],
            scheme: "http",
        };
        let echo = ObjectRef::new("default", "echo");
        let route = |service: &ObjectRef, port| {
            let target = Target::Service { service, port };
            cfg.routes
                .route_shared(target, &req, &exists, &mut SplitMix64(1))
        };
        for port in [80, 81, 82] {
            let fwd = route(&echo, port).expect("forwarded");
            // Ports 80 and 81 are the snapshot's: prebuilt; 82 is built for the request.
            assert_eq!(matches!(fwd, Cow::Borrowed(_)), port != 82, "{port}");
            let want = Forward {
                service: Some((echo.clone(), port)),
                ..Forward::default()
            };
            assert_eq!(*fwd, want, "{port}");
        }
        let ghost = ObjectRef::new("default", "ghost");
        assert_eq!(
            route(&ghost, 80).unwrap_err(),
            Decision::Respond {
                status: 500,
                reason: "unknown service"
            }
        );
        let routed = route(&ObjectRef::new("default", "other"), 80).expect("forwarded");
        assert_eq!(routed.service, Some((echo.clone(), 80)));
        assert!(routed.route.is_some());
    }
}
