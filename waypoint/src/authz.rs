//! L7 authorization (R15): Istio `AuthorizationPolicy` as users write it, evaluated in
//! Istio's order — any matching DENY denies; with no ALLOW policy the request is allowed;
//! otherwise some ALLOW policy must match. AUDIT policies never change the outcome.
//!
//! Compiled from YAML by [`crate::config`]. CUSTOM policies name an external authorizer
//! ([`crate::ext_authz`]) asked before DENY and ALLOW ([`custom`]). A denial is answered
//! `403` with body [`DENIED_BODY`], before any upstream connection is made.
//! `requestPrincipals` and the `request.auth.*` conditions read the request's verified JWT
//! ([`crate::jwt`], from `RequestAuthentication`); a request without one has no request
//! principal.

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_model::authz::Cidr;
use regex::Regex;

use crate::jwt::Authenticated;
use crate::route::ObjectRef;

/// The body of a `403` denial, as Envoy's RBAC filter writes it.
pub const DENIED_BODY: &str = "RBAC: access denied";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    /// Ask the policy's extension provider ([`crate::ext_authz`]); evaluated first.
    Custom,
}

/// Istio's string forms: `"*"`, `"prefix*"`, `"*suffix"`, exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StrMatch {
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StrMatch::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StrMatch::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            StrMatch::Suffix(p.to_string())
        } else {
            StrMatch::Exact(s.to_string())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Any => true,
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        let v = v.to_ascii_lowercase();
        match self {
            StrMatch::Any => true,
            StrMatch::Exact(e) => v == e.to_ascii_lowercase(),
            StrMatch::Prefix(p) => v.starts_with(&p.to_ascii_lowercase()),
            StrMatch::Suffix(s) => v.ends_with(&s.to_ascii_lowercase()),
        }
    }
}

/// A `paths` entry: an Istio string form, or a template with `{*}` (one segment) and
/// `{**}` (the rest, any number of segments; last operator only — checked at load).
#[derive(Debug, Clone)]
pub enum PathPattern {
    Str(StrMatch),
    Template(Regex),
}

impl PathPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.contains('{') {
            return Ok(PathPattern::Str(StrMatch::parse(s)));
        }
        let mut re = String::from("^");
        let segments: Vec<&str> = s.split('/').collect();
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                re.push('/');
            }
            match *seg {
                "{*}" => re.push_str("[^/]+"),
                "{**}" => {
                    if i + 1 != segments.len() {
                        return Err(format!("path {s:?}: `{{**}}` must be the last segment"));
                    }
                    re.push_str(".*");
                }
                seg if seg.contains(['{', '}', '*']) => {
                    return Err(format!(
                        "path {s:?}: `{{*}}` and `{{**}}` must be whole path segments"
                    ))
                }
                seg => re.push_str(&regex::escape(seg)),
            }
        }
        re.push('$');
        Regex::new(&re)
            .map(PathPattern::Template)
            .map_err(|e| e.to_string())
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Str(m) => m.matches(path),
            PathPattern::Template(r) => r.is_match(path),
        }
    }
}

/// A list and its `not*` form: the list (if given) must contain a match, the `not` list
/// none.
#[derive(Debug, Clone)]
pub struct OneOf<T> {
    pub values: Option<Vec<T>>,
    pub not: Vec<T>,
}

impl<T> Default for OneOf<T> {
    fn default() -> Self {
        OneOf {
            values: None,
            not: vec![],
        }
    }
}

impl<T> OneOf<T> {
    fn check(&self, f: impl Fn(&T) -> bool) -> bool {
        self.values.as_ref().is_none_or(|v| v.iter().any(&f)) && !self.not.iter().any(f)
    }
}

/// `from[].source`.
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub principals: OneOf<StrMatch>,
    /// `requestPrincipals`: `<iss>/<sub>` of the request's verified JWT.
    pub request_principals: OneOf<StrMatch>,
    pub namespaces: OneOf<StrMatch>,
    pub ip_blocks: OneOf<Cidr>,
    pub remote_ip_blocks: OneOf<Cidr>,
}

/// `to[].operation`.
#[derive(Debug, Clone, Default)]
pub struct Operation {
    pub hosts: OneOf<StrMatch>,
    pub ports: OneOf<u16>,
    pub methods: OneOf<StrMatch>,
    pub paths: OneOf<PathPattern>,
}

/// A `when` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `request.headers[name]`, name lower-cased.
    Header(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    /// `request.auth.principal`: `<iss>/<sub>` of the verified JWT.
    RequestPrincipal,
    /// `request.auth.audiences`: any of its `aud`.
    RequestAudiences,
    /// `request.auth.presenter`: its `azp`.
    RequestPresenter,
    /// `request.auth.claims[a][b]…`: a string claim, or any string of a list claim.
    RequestClaim(Vec<String>),
}

impl Key {
    /// Whether it reads the HTTP request (headers, the JWT).
    fn http_only(&self) -> bool {
        matches!(
            self,
            Key::Header(_)
                | Key::RequestPrincipal
                | Key::RequestAudiences
                | Key::RequestPresenter
                | Key::RequestClaim(_)
        )
    }
}

/// One `when` condition.
#[derive(Debug, Clone)]
pub enum Condition {
    Str { key: Key, values: OneOf<StrMatch> },
    Ip { key: Key, values: OneOf<Cidr> },
    Port(OneOf<u16>),
}

#[derive(Debug, Clone, Default)]
pub struct Rule {
    /// Any may match; empty: any source.
    pub from: Vec<Source>,
    /// Any may match; empty: any operation.
    pub to: Vec<Operation>,
    /// All must hold.
    pub when: Vec<Condition>,
}

/// What a policy is attached to.
///
/// The running waypoint enforces only [`Attachment::Targets`], as Istio's waypoints do:
/// [`crate::config`] sets the others aside (`ignored_policies`, warned about at load) for
/// the destination's ztunnel; their evaluation here serves tools and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// `targetRefs`: Gateways (this waypoint) and Services, in the policy's namespace; from
    /// the root namespace, the GatewayClass `istio-waypoint` (every waypoint).
    Targets {
        gateways: Vec<String>,
        services: Vec<String>,
        every_waypoint: bool,
        /// Some target is a GatewayClass (which only the root namespace may name).
        class: bool,
    },
    /// `selector.matchLabels`: workloads in the policy's namespace (all namespaces from the
    /// root namespace).
    Selector(BTreeMap<String, String>),
    /// Neither: the whole namespace (the whole mesh from the root namespace).
    Namespace,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub id: ObjectRef,
    pub action: Action,
    /// The extension provider of a CUSTOM policy.
    pub provider: Option<String>,
    pub attachment: Attachment,
    pub rules: Vec<Rule>,
}

/// Who the waypoint is and what the request is addressed to.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// This waypoint's Gateway.
    pub waypoint: &'a ObjectRef,
    /// Istio's root namespace (`istio-system`).
    pub root_namespace: &'a str,
    /// The destination service, for a service-addressed request.
    pub service: Option<&'a ObjectRef>,
    /// The destination workload's namespace and labels, for a pod-addressed request.
    pub workload: Option<(&'a str, &'a BTreeMap<String, String>)>,
}

impl Subject<'_> {
    fn namespace(&self) -> Option<&str> {
        self.service
            .map(|s| s.namespace.as_str())
            .or(self.workload.map(|w| w.0))
    }
}

/// The request attributes policies read.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The peer (the downstream ztunnel's client, from the tunnel).
    pub source_ip: IpAddr,
    /// The original client (from `x-forwarded-for`); equal to `source_ip` when absent.
    pub remote_ip: IpAddr,
    /// `td/ns/N/sa/S` of the authenticated client; `None` without one.
    pub principal: Option<&'a str>,
    /// The request's verified JWT ([`crate::jwt`]); `None` without one.
    pub auth: Option<&'a Authenticated>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// `Host`/`:authority`.
    pub host: &'a str,
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
}

impl<'a> Request<'a> {
    /// The namespace of the authenticated client (from its principal).
    pub fn source_namespace(&self) -> Option<&'a str> {
        let p = self.principal?;
        let mut it = p.split('/');
        while let Some(x) = it.next() {
            if x == "ns" {
                return it.next();
            }
        }
        None
    }

    fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

impl Source {
    fn matches(&self, r: &Request<'_>) -> bool {
        // Fields that need an identity do not match a request without one, even in `not*`
        // form (Istio: the principal "is" absent, so `notPrincipals` holds only if no
        // `principals` list is required).
        self.request_principal_ok(r) && self.peer_matches(r)
    }

    fn request_principal_ok(&self, r: &Request<'_>) -> bool {
        match r.auth {
            Some(a) => self.request_principals.check(|m| m.matches(&a.principal)),
            None => self.request_principals.values.is_none(),
        }
    }

    /// The fields an opaque TCP tunnel has too (all but `requestPrincipals`).
    fn peer_matches(&self, r: &Request<'_>) -> bool {
        let principal_ok = match r.principal {
            Some(p) => self.principals.check(|m| m.matches(p)),
            None => self.principals.values.is_none(),
        };
        let ns_ok = match r.source_namespace() {
            Some(ns) => self.namespaces.check(|m| m.matches(ns)),
            None => self.namespaces.values.is_none(),
        };
        principal_ok
            && ns_ok
            && self.ip_blocks.check(|c| c.contains(r.source_ip))
            && self.remote_ip_blocks.check(|c| c.contains(r.remote_ip))
    }

    /// On opaque TCP, `requestPrincipals` is an HTTP-only field (Istio): a source naming it
    /// never matches in an ALLOW rule, and matches as if it were absent in a DENY rule.
    fn matches_tcp(&self, r: &Request<'_>, deny: bool) -> bool {
        (deny || !self.request_principals.given()) && self.peer_matches(r)
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

impl Operation {
    fn matches(&self, r: &Request<'_>) -> bool {
        let host_ok = |m: &StrMatch| {
            m.matches_ignore_case(r.host) || m.matches_ignore_case(strip_port(r.host))
        };
        self.hosts.check(host_ok)
            && self.ports.check(|p| *p == r.destination_port)
            && self.methods.check(|m| m.matches(r.method))
            && self.paths.check(|p| p.matches(r.path))
    }
}

impl<T> OneOf<T> {
    fn given(&self) -> bool {
        self.values.is_some() || !self.not.is_empty()
    }
}

impl Operation {
    /// Whether it names HTTP-only fields (hosts, methods, paths).
    fn http_only(&self) -> bool {
        self.hosts.given() || self.methods.given() || self.paths.given()
    }

    /// On opaque TCP (Istio): an operation with HTTP-only fields never matches in an ALLOW
    /// rule; in a DENY rule those fields are ignored (so it denies more, never less).
    fn matches_tcp(&self, r: &Request<'_>, deny: bool) -> bool {
        (deny || !self.http_only()) && self.ports.check(|p| *p == r.destination_port)
    }
}

impl Condition {
    fn http_only(&self) -> bool {
        matches!(self, Condition::Str { key, .. } if key.http_only())
    }

    fn matches(&self, r: &Request<'_>) -> bool {
        match self {
            Condition::Str { key, values } => {
                // The key's values (a list claim or `aud` has several): `values` needs one of
                // them to match, `notValues` none; a key without any value matches only
                // without `values` (as Istio's metadata matchers, absent metadata).
                let mut found = Vec::<&str>::new();
                match key {
                    Key::Header(h) => found.extend(r.header(h)),
                    Key::SourceNamespace => found.extend(r.source_namespace()),
                    Key::SourcePrincipal => found.extend(r.principal),
                    Key::RequestPrincipal => found.extend(r.auth.map(|a| a.principal.as_str())),
                    Key::RequestAudiences => found.extend(
                        r.auth
                            .iter()
                            .flat_map(|a| a.audiences.iter().map(String::as_str)),
                    ),
                    Key::RequestPresenter => {
                        found.extend(r.auth.and_then(|a| a.presenter.as_deref()))
                    }
                    Key::RequestClaim(path) => match r.auth.and_then(|a| a.claim(path)) {
                        Some(serde_json::Value::String(s)) => found.push(s),
                        Some(serde_json::Value::Array(list)) => {
                            found.extend(list.iter().filter_map(serde_json::Value::as_str))
                        }
                        _ => {}
                    },
                    _ => {}
                }
                if found.is_empty() {
                    return values.values.is_none();
                }
                values
                    .values
                    .as_ref()
                    .is_none_or(|v| v.iter().any(|m| found.iter().any(|f| m.matches(f))))
                    && !values
                        .not
                        .iter()
                        .any(|m| found.iter().any(|f| m.matches(f)))
            }
            Condition::Ip { key, values } => {
                let ip = match key {
                    Key::SourceIp => r.source_ip,
                    Key::RemoteIp => r.remote_ip,
                    _ => r.destination_ip,
                };
                values.check(|c| c.contains(ip))
            }
            Condition::Port(ports) => ports.check(|p| *p == r.destination_port),
        }
    }
}

impl Rule {
    fn matches(&self, r: &Request<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(r)))
            && self.when.iter().all(|c| c.matches(r))
    }
}

impl Rule {
    fn matches_tcp(&self, r: &Request<'_>, deny: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches_tcp(r, deny)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches_tcp(r, deny)))
            && self
                .when
                .iter()
                .all(|c| if c.http_only() { deny } else { c.matches(r) })
    }
}

impl Policy {
    /// Whether this policy is enforced for `s`.
    pub fn applies(&self, s: &Subject<'_>) -> bool {
        self.attachment.applies(&self.id.namespace, s)
    }

    /// Whether some rule matches (a policy with no rules matches nothing).
    pub fn matches(&self, r: &Request<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(r))
    }
}

impl Attachment {
    /// Whether a target is a GatewayClass.
    pub fn names_a_class(&self) -> bool {
        matches!(self, Attachment::Targets { class: true, .. })
    }

    /// Whether an object of namespace `ns` attached so applies to `s`.
    pub fn applies(&self, ns: &str, s: &Subject<'_>) -> bool {
        let root = ns == s.root_namespace;
        match self {
            Attachment::Targets {
                gateways,
                services,
                every_waypoint,
                ..
            } => {
                (root && *every_waypoint)
                    || (ns == s.waypoint.namespace && gateways.contains(&s.waypoint.name))
                    || s.service
                        .is_some_and(|svc| svc.namespace == ns && services.contains(&svc.name))
            }
            Attachment::Selector(labels) => s.workload.is_some_and(|(wns, wl)| {
                (root || wns == ns) && labels.iter().all(|(k, v)| wl.get(k) == Some(v))
            }),
            Attachment::Namespace => root || s.namespace() == Some(ns),
        }
    }
}

/// The outcome, with the deciding policy and the AUDIT policies that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The DENY policy that denied, or the ALLOW policy that allowed.
    pub policy: Option<ObjectRef>,
    pub audited: Vec<ObjectRef>,
}

/// The extension provider of the first applicable CUSTOM policy whose rules match `r`
/// (Istio evaluates CUSTOM before DENY and ALLOW; [`evaluate`] leaves CUSTOM policies
/// out).
pub fn custom<'p>(policies: &'p [Policy], s: &Subject<'_>, r: &Request<'_>) -> Option<&'p str> {
    policies
        .iter()
        .find(|p| p.action == Action::Custom && p.applies(s) && p.matches(r))
        .and_then(|p| p.provider.as_deref())
}

/// [`custom`] for an opaque TCP tunnel: HTTP-only fields read as in a DENY rule (ignored),
/// so a CUSTOM policy matches as widely as it could.
pub fn custom_tcp<'p>(policies: &'p [Policy], s: &Subject<'_>, r: &Request<'_>) -> Option<&'p str> {
    policies
        .iter()
        .find(|p| {
            p.action == Action::Custom
                && p.applies(s)
                && p.rules.iter().any(|rule| rule.matches_tcp(r, true))
        })
        .and_then(|p| p.provider.as_deref())
}

/// Evaluate every applicable policy in Istio's order.
pub fn evaluate(policies: &[Policy], s: &Subject<'_>, r: &Request<'_>) -> Verdict {
    evaluate_with(policies, s, &|p: &Policy| p.matches(r))
}

/// [`evaluate`] for an opaque TCP tunnel (no HTTP attributes; `r`'s host, method, path and
/// headers are ignored), with Istio's rule for HTTP-only fields: an ALLOW rule that uses
/// them does not match, a DENY rule that uses them matches as if they were absent.
pub fn evaluate_tcp(policies: &[Policy], s: &Subject<'_>, r: &Request<'_>) -> Verdict {
    evaluate_with(policies, s, &|p: &Policy| {
        p.rules
            .iter()
            .any(|rule| rule.matches_tcp(r, p.action == Action::Deny))
    })
}

fn evaluate_with(
    policies: &[Policy],
    s: &Subject<'_>,
    matches: &dyn Fn(&Policy) -> bool,
) -> Verdict {
    let applicable: Vec<&Policy> = policies.iter().filter(|p| p.applies(s)).collect();
    let audited = applicable
        .iter()
        .filter(|p| p.action == Action::Audit && matches(p))
        .map(|p| p.id.clone())
        .collect();
    if let Some(p) = applicable
        .iter()
        .find(|p| p.action == Action::Deny && matches(p))
    {
        return Verdict {
            allowed: false,
            policy: Some(p.id.clone()),
            audited,
        };
    }
    let mut allows = applicable
        .iter()
        .filter(|p| p.action == Action::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Verdict {
            allowed: true,
            policy: None,
            audited,
        };
    }
    let hit = allows.find(|p| matches(p)).map(|p| p.id.clone());
    Verdict {
        allowed: hit.is_some(),
        policy: hit,
        audited,
    }
}
