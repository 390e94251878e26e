//! Istio `VirtualService` (`networking.istio.io/v1`, `/v1beta1`, `/v1alpha3`): its `http`
//! routes, compiled to a [`HttpRoute`] whose rules are tried in order
//! ([`HttpRoute::in_order`]), as Envoy tries the routes istiod writes for it.
//!
//! `hosts` name Services (`name`, `name.ns`, `name.ns.svc…`); the VirtualService applies to
//! requests the waypoint serves for them, from clients of every namespace (a service has
//! either VirtualServices or HTTPRoutes, never both, and at most one VirtualService:
//! checked when the file is loaded). `gateways` may only name `mesh`.
//!
//! Per `http` entry: `match` (`uri`, `scheme`, `method`, `authority`, `headers` and
//! `queryParams` with `exact`/`prefix`/`regex`, a header given no value: present;
//! `withoutHeaders`, `port`, `sourceNamespace`, `ignoreUriCase`); `route` (`destination`
//! `host`/`subset`/`port`, `weight`, `headers`); `redirect` (`uri`, `authority`, `port`,
//! `scheme`, `redirectCode`, default 301); `directResponse`; `rewrite` (`uri`,
//! `uriRegexRewrite`, `authority`); `timeout`; `retries` (`attempts`, `perTryTimeout`,
//! `retryOn` by HTTP status, gRPC status and connection failure); `fault` (`delay.fixedDelay`,
//! `abort.httpStatus`/`grpcStatus`, each with `percentage`); `mirror`,
//! `mirrorPercentage`, `mirrors`; `headers` (`request`/`response` `set`/`add`/`remove`).
//! `corsPolicy` (`allowOrigins` as `StringMatch`es, `allowMethods`, `allowHeaders`,
//! `exposeHeaders`, `maxAge`, `allowCredentials`, `unmatchedPreflights`; see
//! [`crate::route::Cors`]).
//! Refused with the field named: `tcp`, `tls`, `delegate`, `sourceLabels`,
//! `exponentialDelay`, `http2Error`, a `rewrite.uri` beside a regex `uri` match.

use std::collections::BTreeMap;

use base64::Engine;
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{anchored, dr_host, Doc, Hosts, Invalid, PortSelectorRaw};
use crate::route::{
    Abort, Backend, Cors, Fault, Filter, HeaderModifier, HttpRoute, Mirror, MoreConditions,
    ObjectRef, PathMatch, PathModifier, Pattern, Redirect, Retry, Rewrite, RouteMatch, Rule, Share,
    Timeouts, ValueMatch,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct VsSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<HttpRaw>,
    #[serde(default)]
    tcp: Vec<IgnoredAny>,
    #[serde(default)]
    tls: Vec<IgnoredAny>,
    /// Accepted: the waypoint serves every client of the services it fronts.
    #[serde(default, rename = "exportTo")]
    _export_to: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRaw {
    #[serde(default, rename = "name")]
    _name: Option<String>,
    #[serde(default, rename = "match")]
    matches: Vec<MatchRaw>,
    #[serde(default)]
    route: Vec<RouteRaw>,
    #[serde(default)]
    redirect: Option<RedirectRaw>,
    #[serde(default)]
    direct_response: Option<DirectRaw>,
    #[serde(default)]
    delegate: Option<IgnoredAny>,
    #[serde(default)]
    rewrite: Option<RewriteRaw>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: Option<RetriesRaw>,
    #[serde(default)]
    fault: Option<FaultRaw>,
    #[serde(default)]
    mirror: Option<DestinationRaw>,
    #[serde(default)]
    mirror_percentage: Option<PercentRaw>,
    /// Istio's deprecated integer form of `mirrorPercentage`.
    #[serde(default)]
    mirror_percent: Option<u32>,
    #[serde(default)]
    mirrors: Vec<MirrorRaw>,
    #[serde(default)]
    cors_policy: Option<CorsRaw>,
    #[serde(default)]
    headers: Option<HeadersRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MatchRaw {
    #[serde(default, rename = "name")]
    _name: Option<String>,
    #[serde(default)]
    uri: Option<StringMatchRaw>,
    #[serde(default)]
    scheme: Option<StringMatchRaw>,
    #[serde(default)]
    method: Option<StringMatchRaw>,
    #[serde(default)]
    authority: Option<StringMatchRaw>,
    #[serde(default)]
    headers: BTreeMap<String, StringMatchRaw>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    query_params: BTreeMap<String, StringMatchRaw>,
    #[serde(default)]
    ignore_uri_case: bool,
    #[serde(default)]
    without_headers: BTreeMap<String, StringMatchRaw>,
    #[serde(default)]
    source_namespace: Option<String>,
    #[serde(default, rename = "statPrefix")]
    _stat_prefix: Option<String>,
}

/// Istio's `StringMatch`: one of `exact`, `prefix`, `regex` (none: any value).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StringMatchRaw {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CorsRaw {
    #[serde(default)]
    allow_origins: Vec<StringMatchRaw>,
    /// Istio's deprecated exact-match list.
    #[serde(default)]
    allow_origin: Vec<String>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default)]
    max_age: Option<String>,
    #[serde(default)]
    allow_credentials: Option<bool>,
    #[serde(default)]
    unmatched_preflights: Option<UnmatchedPreflights>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum UnmatchedPreflights {
    Unspecified,
    Forward,
    Ignore,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteRaw {
    destination: DestinationRaw,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    headers: Option<HeadersRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationRaw {
    host: String,
    #[serde(default)]
    subset: Option<String>,
    #[serde(default)]
    port: Option<PortSelectorRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorRaw {
    destination: DestinationRaw,
    #[serde(default)]
    percentage: Option<PercentRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PercentRaw {
    value: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadersRaw {
    #[serde(default)]
    request: Option<HeaderOpsRaw>,
    #[serde(default)]
    response: Option<HeaderOpsRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderOpsRaw {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RedirectRaw {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    derive_port: Option<DerivePort>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    redirect_code: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum DerivePort {
    FromProtocolDefault,
    FromRequestPort,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectRaw {
    status: u16,
    #[serde(default)]
    body: Option<BodyRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BodyRaw {
    #[serde(default)]
    string: Option<String>,
    /// Base64.
    #[serde(default)]
    bytes: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RewriteRaw {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    uri_regex_rewrite: Option<RegexRewriteRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegexRewriteRaw {
    #[serde(rename = "match")]
    pattern: String,
    rewrite: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetriesRaw {
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    per_try_timeout: Option<String>,
    #[serde(default)]
    retry_on: Option<String>,
    /// Accepted: the waypoint's endpoints are in one locality.
    #[serde(default, rename = "retryRemoteLocalities")]
    _retry_remote_localities: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRaw {
    #[serde(default)]
    delay: Option<DelayRaw>,
    #[serde(default)]
    abort: Option<AbortRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DelayRaw {
    #[serde(default)]
    fixed_delay: Option<String>,
    #[serde(default)]
    exponential_delay: Option<IgnoredAny>,
    #[serde(default)]
    percentage: Option<PercentRaw>,
    /// Istio's deprecated integer form of `percentage`.
    #[serde(default)]
    percent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AbortRaw {
    #[serde(default)]
    http_status: Option<u16>,
    #[serde(default)]
    grpc_status: Option<String>,
    #[serde(default)]
    http2_error: Option<IgnoredAny>,
    #[serde(default)]
    percentage: Option<PercentRaw>,
}

/// A compiled VirtualService, and the subsets its destinations and mirrors name (field,
/// service with its subset), to be checked against the DestinationRules.
pub(super) struct Compiled {
    pub route: HttpRoute,
    pub subsets: Vec<(String, ObjectRef)>,
}

pub(super) fn compile(d: &Doc<VsSpec>, hosts: &Hosts) -> Result<Compiled, Invalid> {
    let ns = d.metadata.namespace();
    let spec = &d.spec;
    if !spec.tcp.is_empty() {
        return Err(Invalid::new(
            "spec.tcp",
            "not supported: the waypoint routes HTTP (opaque TCP goes to the addressed service)",
        ));
    }
    if !spec.tls.is_empty() {
        return Err(Invalid::new("spec.tls", "not supported (HTTP routes only)"));
    }
    gateways_mesh_only("spec.gateways", &spec.gateways)?;
    if spec.hosts.is_empty() {
        return Err(Invalid::new("spec.hosts", "at least one host is required"));
    }
    let mut parents = vec![];
    for (i, h) in spec.hosts.iter().enumerate() {
        let svc = dr_host(&format!("spec.hosts[{i}]"), h, ns, hosts)?;
        if !parents.iter().any(|(p, _)| *p == svc) {
            parents.push((svc, None));
        }
    }
    let mut subsets = vec![];
    let mut rules = vec![];
    for (ri, h) in spec.http.iter().enumerate() {
        let rf = format!("spec.http[{ri}]");
        rules.push(compile_http(&rf, h, ns, hosts, &mut subsets)?);
    }
    Ok(Compiled {
        route: HttpRoute {
            id: d.metadata.id(),
            created: d.metadata.creation_timestamp.clone(),
            in_order: true,
            parents,
            rules,
        },
        subsets,
    })
}

fn gateways_mesh_only(f: &str, gateways: &[String]) -> Result<(), Invalid> {
    match gateways.iter().position(|g| g != "mesh") {
        Some(i) => Err(Invalid::new(
            format!("{f}[{i}]"),
            "the waypoint applies VirtualServices for the mesh only (\"mesh\" or none)",
        )),
        None => Ok(()),
    }
}

fn compile_http(
    rf: &str,
    h: &HttpRaw,
    ns: &str,
    hosts: &Hosts,
    subsets: &mut Vec<(String, ObjectRef)>,
) -> Result<Rule, Invalid> {
    if h.delegate.is_some() {
        return Err(Invalid::new(format!("{rf}.delegate"), "not supported"));
    }
    let mut matches = vec![];
    for (mi, m) in h.matches.iter().enumerate() {
        matches.push(compile_match(&format!("{rf}.match[{mi}]"), m)?);
    }
    if matches.is_empty() {
        // Istio's translation of no `uri`: the prefix `/`.
        matches.push(RouteMatch {
            path: PathMatch::StartsWith("/".into(), false),
            ..RouteMatch::default()
        });
    }
    let answers = [
        h.redirect.is_some(),
        h.direct_response.is_some(),
        !h.route.is_empty(),
    ];
    match answers.iter().filter(|x| **x).count() {
        0 => {
            return Err(Invalid::new(
                format!("{rf}.route"),
                "one of route, redirect or directResponse is required",
            ))
        }
        1 => {}
        _ => {
            return Err(Invalid::new(
                rf,
                "route, redirect and directResponse are exclusive",
            ))
        }
    }
    let mut filters = vec![];
    if let Some(hd) = &h.headers {
        header_filters(&format!("{rf}.headers"), hd, &mut filters)?;
    }
    if let Some(r) = &h.redirect {
        filters.push(redirect(&format!("{rf}.redirect"), r)?);
    }
    if let Some(dr) = &h.direct_response {
        filters.push(direct(&format!("{rf}.directResponse"), dr)?);
    }
    if let Some(rw) = &h.rewrite {
        let f = format!("{rf}.rewrite");
        if h.redirect.is_some() {
            return Err(Invalid::new(f, "rewrite and redirect are exclusive"));
        }
        if rw.uri.is_some()
            && h.matches
                .iter()
                .any(|m| m.uri.as_ref().is_some_and(|u| u.regex.is_some()))
        {
            return Err(Invalid::new(
                format!("{f}.uri"),
                "cannot replace the matched part of a regex-matched path (use uriRegexRewrite)",
            ));
        }
        filters.push(rewrite(&f, rw)?);
    }
    if let Some(c) = &h.cors_policy {
        filters.push(cors(&format!("{rf}.corsPolicy"), c)?);
    }
    if let Some(fault) = &h.fault {
        filters.push(Filter::Fault(compile_fault(&format!("{rf}.fault"), fault)?));
    }
    let mirrors = mirrors(rf, h, ns, hosts, subsets)?;
    filters.extend(mirrors);
    let mut backends = vec![];
    let n = h.route.len();
    for (bi, r) in h.route.iter().enumerate() {
        let bf = format!("{rf}.route[{bi}]");
        let (service, port) = destination(&format!("{bf}.destination"), &r.destination, ns, hosts)?;
        if service.subset.is_some() {
            subsets.push((format!("{bf}.destination.subset"), service.clone()));
        }
        let mut bfilters = vec![];
        if let Some(hd) = &r.headers {
            header_filters(&format!("{bf}.headers"), hd, &mut bfilters)?;
        }
        backends.push(Backend {
            service,
            port,
            // A lone destination takes everything; weights are relative, as Envoy's
            // weighted clusters are.
            weight: r.weight.unwrap_or(if n == 1 { 100 } else { 0 }),
            filters: bfilters,
            // Istio's API: no ReferenceGrant (exportTo governs visibility).
            permitted: true,
        });
    }
    if n > 0 && backends.iter().all(|b| b.weight == 0) {
        return Err(Invalid::new(
            format!("{rf}.route"),
            "the destinations' weights add up to 0 (give each a weight)",
        ));
    }
    let mut timeouts = Timeouts::default();
    if let Some(t) = &h.timeout {
        timeouts.request = Some(duration(&format!("{rf}.timeout"), t)?).filter(|d| !d.is_zero());
    }
    let retry = h
        .retries
        .as_ref()
        .map(|r| retries(&format!("{rf}.retries"), r, &mut timeouts))
        .transpose()?;
    Ok(Rule {
        matches,
        filters,
        backends,
        timeouts,
        retry,
    })
}

fn duration(f: &str, v: &str) -> Result<std::time::Duration, Invalid> {
    runtime::config::duration::parse(v).map_err(|e| Invalid::new(f, e))
}

fn string_match(f: &str, m: &StringMatchRaw) -> Result<ValueMatch, Invalid> {
    match (&m.exact, &m.prefix, &m.regex) {
        (None, None, None) => Ok(ValueMatch::Present),
        (Some(e), None, None) => Ok(ValueMatch::Exact(e.clone())),
        (None, Some(p), None) => Ok(ValueMatch::Prefix(p.clone())),
        (None, None, Some(r)) => Ok(ValueMatch::Regex(anchored(&format!("{f}.regex"), r)?)),
        _ => Err(Invalid::new(f, "exact, prefix and regex are exclusive")),
    }
}

fn compile_match(mf: &str, m: &MatchRaw) -> Result<RouteMatch, Invalid> {
    if !m.source_labels.is_empty() {
        return Err(Invalid::new(
            format!("{mf}.sourceLabels"),
            "not supported (match the client by sourceNamespace, or authorize it with an AuthorizationPolicy)",
        ));
    }
    gateways_mesh_only(&format!("{mf}.gateways"), &m.gateways)?;
    let path = match &m.uri {
        None => PathMatch::StartsWith("/".into(), false),
        Some(u) => {
            let f = format!("{mf}.uri");
            match (string_match(&f, u)?, m.ignore_uri_case) {
                (ValueMatch::Present, _) => PathMatch::StartsWith("/".into(), false),
                (ValueMatch::Exact(e), false) => PathMatch::Exact(e),
                (ValueMatch::Exact(e), true) => PathMatch::Regex(
                    regex::Regex::new(&format!("(?i-u)^{}$", regex::escape(&e)))
                        .map_err(|e| Invalid::new(format!("{f}.exact"), e.to_string()))?,
                ),
                (ValueMatch::Prefix(p), nocase) => PathMatch::StartsWith(p, nocase),
                (ValueMatch::Regex(r), _) => PathMatch::Regex(r),
            }
        }
    };
    let map = |what: &str, list: &BTreeMap<String, StringMatchRaw>, lower: bool| {
        list.iter()
            .map(|(name, sm)| {
                let vm = string_match(&format!("{mf}.{what}.{name}"), sm)?;
                let name = if lower {
                    name.to_ascii_lowercase()
                } else {
                    name.clone()
                };
                Ok((name, vm))
            })
            .collect::<Result<Vec<_>, Invalid>>()
    };
    let headers = map("headers", &m.headers, true)?;
    let query = map("queryParams", &m.query_params, false)?;
    if let Some((n, _)) = query
        .iter()
        .find(|(_, v)| matches!(v, ValueMatch::Prefix(_)))
    {
        return Err(Invalid::new(
            format!("{mf}.queryParams.{n}.prefix"),
            "not supported for query parameters (exact or regex)",
        ));
    }
    let mut more = MoreConditions {
        without_headers: map("withoutHeaders", &m.without_headers, true)?,
        port: m.port,
        source_namespace: m.source_namespace.clone(),
        ..MoreConditions::default()
    };
    let mut method = None;
    if let Some(x) = &m.method {
        match string_match(&format!("{mf}.method"), x)? {
            ValueMatch::Exact(e) => method = Some(e),
            other => more.method = Some(other),
        }
    }
    if let Some(x) = &m.authority {
        more.authority = Some(string_match(&format!("{mf}.authority"), x)?);
    }
    if let Some(x) = &m.scheme {
        more.scheme = Some(string_match(&format!("{mf}.scheme"), x)?);
    }
    let plain = more.method.is_none()
        && more.authority.is_none()
        && more.scheme.is_none()
        && more.port.is_none()
        && more.source_namespace.is_none()
        && more.without_headers.is_empty();
    Ok(RouteMatch {
        path,
        headers,
        query,
        method,
        more: (!plain).then(|| Box::new(more)),
    })
}

fn header_filters(f: &str, h: &HeadersRaw, out: &mut Vec<Filter>) -> Result<(), Invalid> {
    let ops = |o: &HeaderOpsRaw| {
        let pairs = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        HeaderModifier {
            set: pairs(&o.set),
            add: pairs(&o.add),
            remove: o.remove.clone(),
        }
    };
    for (which, o) in [("request", &h.request), ("response", &h.response)] {
        let Some(o) = o else { continue };
        if let Some(n) = o
            .set
            .keys()
            .chain(o.add.keys())
            .chain(&o.remove)
            .find(|n| n.starts_with(':') || n.eq_ignore_ascii_case("host"))
        {
            return Err(Invalid::new(
                format!("{f}.{which}"),
                format!("{n:?} cannot be changed here (use rewrite.authority for the host)"),
            ));
        }
        let m = ops(o);
        out.push(if which == "request" {
            Filter::RequestHeader(m)
        } else {
            Filter::ResponseHeader(m)
        });
    }
    Ok(())
}

/// `corsPolicy`, as istiod gives it to Envoy (lists joined with `,`, `maxAge` in seconds).
fn cors(f: &str, c: &CorsRaw) -> Result<Filter, Invalid> {
    let mut origins = vec![];
    for (i, o) in c.allow_origins.iter().enumerate() {
        let of = format!("{f}.allowOrigins[{i}]");
        match string_match(&of, o)? {
            ValueMatch::Present => {
                return Err(Invalid::new(
                    of,
                    "one of exact, prefix and regex is required",
                ))
            }
            m => origins.push(m),
        }
    }
    origins.extend(c.allow_origin.iter().cloned().map(ValueMatch::Exact));
    let max_age = match &c.max_age {
        None => String::new(),
        Some(m) => duration(&format!("{f}.maxAge"), m)?.as_secs().to_string(),
    };
    Ok(Filter::Cors(std::sync::Arc::new(Cors {
        origins,
        methods: c.allow_methods.join(","),
        headers: c.allow_headers.join(","),
        expose: c.expose_headers.join(","),
        max_age,
        credentials: c.allow_credentials == Some(true),
        forward_unmatched: c.unmatched_preflights != Some(UnmatchedPreflights::Ignore),
    })))
}

fn redirect(f: &str, r: &RedirectRaw) -> Result<Filter, Invalid> {
    let status_code = r.redirect_code.unwrap_or(301);
    if ![301, 302, 303, 307, 308].contains(&status_code) {
        return Err(Invalid::new(
            format!("{f}.redirectCode"),
            "one of 301, 302, 303, 307, 308",
        ));
    }
    if r.port.is_some() && r.derive_port.is_some() {
        return Err(Invalid::new(
            format!("{f}.derivePort"),
            "port and derivePort are exclusive",
        ));
    }
    if let Some(u) = &r.uri {
        if !u.starts_with('/') {
            return Err(Invalid::new(format!("{f}.uri"), "must start with /"));
        }
    }
    let scheme = r.scheme.clone();
    // FROM_PROTOCOL_DEFAULT: the scheme's well-known port (left out of the location).
    let port = match (r.port, r.derive_port) {
        (Some(p), _) => Some(p),
        (None, Some(DerivePort::FromProtocolDefault)) => {
            Some(if scheme.as_deref() == Some("https") {
                443
            } else {
                80
            })
        }
        _ => None,
    };
    Ok(Filter::Redirect(Redirect {
        scheme,
        hostname: r.authority.clone(),
        path: r.uri.clone().map(PathModifier::ReplaceFullPath),
        port,
        status_code,
    }))
}

fn direct(f: &str, d: &DirectRaw) -> Result<Filter, Invalid> {
    if !(200..600).contains(&d.status) {
        return Err(Invalid::new(format!("{f}.status"), "must be 200–599"));
    }
    let body = match &d.body {
        None => String::new(),
        Some(BodyRaw {
            string: Some(s),
            bytes: None,
        }) => s.clone(),
        Some(BodyRaw {
            string: None,
            bytes: Some(b),
        }) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| Invalid::new(format!("{f}.body.bytes"), format!("not base64: {e}")))?;
            String::from_utf8(raw).map_err(|_| {
                Invalid::new(
                    format!("{f}.body.bytes"),
                    "not UTF-8 text (binary bodies are not supported)",
                )
            })?
        }
        Some(_) => {
            return Err(Invalid::new(
                format!("{f}.body"),
                "one of string and bytes is required",
            ))
        }
    };
    Ok(Filter::Direct {
        status: d.status,
        body,
    })
}

fn rewrite(f: &str, rw: &RewriteRaw) -> Result<Filter, Invalid> {
    let path = match (&rw.uri, &rw.uri_regex_rewrite) {
        (Some(_), Some(_)) => {
            return Err(Invalid::new(
                format!("{f}.uriRegexRewrite"),
                "uri and uriRegexRewrite are exclusive",
            ))
        }
        // An exact match ignoring case is a regex here, and replaced whole, as exact.
        (Some(u), None) => Some(PathModifier::ReplaceMatched(u.clone())),
        (None, Some(r)) => {
            let pf = format!("{f}.uriRegexRewrite.match");
            let re = regex::Regex::new(&r.pattern)
                .map_err(|e| Invalid::new(pf, format!("invalid regular expression: {e}")))?;
            Some(PathModifier::RegexRewrite(
                Pattern(re),
                envoy_substitution(&r.rewrite),
            ))
        }
        (None, None) => None,
    };
    Ok(Filter::Rewrite(Rewrite {
        hostname: rw.authority.clone(),
        path,
    }))
}

/// Envoy's regex substitution (`\1` for a group) in the `regex` crate's form (`${1}`), a
/// literal `$` escaped.
fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                let mut n = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    n.push(*d);
                    chars.next();
                }
                out.push_str(&format!("${{{n}}}"));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// `retries`; `perTryTimeout` is each try's timeout (into `timeouts`).
fn retries(f: &str, r: &RetriesRaw, timeouts: &mut Timeouts) -> Result<Retry, Invalid> {
    if let Some(t) = &r.per_try_timeout {
        timeouts.backend_request =
            Some(duration(&format!("{f}.perTryTimeout"), t)?).filter(|d| !d.is_zero());
    }
    // Istio's default conditions.
    let on = r.retry_on.as_deref().unwrap_or(
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes,503",
    );
    let mut codes = vec![];
    let mut grpc = vec![];
    for token in on.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match token {
            // gRPC statuses, by the trailers-only `grpc-status` of the response head.
            "cancelled" => grpc.push(1),
            "deadline-exceeded" => grpc.push(4),
            "resource-exhausted" => grpc.push(8),
            "internal" => grpc.push(13),
            "unavailable" => grpc.push(14),
            "5xx" => codes.extend(500..600),
            "gateway-error" => codes.extend([502, 503, 504]),
            "retriable-4xx" => codes.push(409),
            // Connection failures and resets before a response are always retried.
            "connect-failure"
            | "refused-stream"
            | "reset"
            | "reset-before-request"
            | "retriable-status-codes" => {}
            t => match t.parse::<u16>() {
                Ok(c) if (400..600).contains(&c) => codes.push(c),
                _ => {
                    return Err(Invalid::new(
                        format!("{f}.retryOn"),
                        format!("unknown retry condition {t:?}"),
                    ))
                }
            },
        }
    }
    codes.sort_unstable();
    codes.dedup();
    grpc.sort_unstable();
    grpc.dedup();
    Ok(Retry {
        codes,
        grpc,
        // Istio: attempts 0 turns retries off; unset with retries given is Istio's 2.
        attempts: r.attempts.unwrap_or(2),
        backoff: None,
    })
}

/// A share given as Istio's `Percent` (field `pf`) or its deprecated integer form (field
/// `intf`); `none` when neither is given.
fn percentage(
    (pf, p): (&str, &Option<PercentRaw>),
    (intf, int): (&str, Option<u32>),
    none: f64,
) -> Result<Share, Invalid> {
    match (p, int) {
        (Some(p), _) if !(0.0..=100.0).contains(&p.value) => {
            Err(Invalid::new(format!("{pf}.value"), "must be 0–100"))
        }
        (Some(p), _) => Ok(Share::percent(p.value)),
        (None, Some(i)) if i > 100 => Err(Invalid::new(intf, "must be 0–100")),
        (None, Some(i)) => Ok(Share::percent(f64::from(i))),
        (None, None) => Ok(Share::percent(none)),
    }
}

fn compile_fault(f: &str, x: &FaultRaw) -> Result<Fault, Invalid> {
    let delay = match &x.delay {
        None => None,
        Some(d) => {
            let df = format!("{f}.delay");
            if d.exponential_delay.is_some() {
                return Err(Invalid::new(
                    format!("{df}.exponentialDelay"),
                    "not supported (fixedDelay)",
                ));
            }
            let Some(fd) = &d.fixed_delay else {
                return Err(Invalid::new(format!("{df}.fixedDelay"), "required"));
            };
            let fixed = duration(&format!("{df}.fixedDelay"), fd)?;
            // Istio: a fault without a percentage applies to no request.
            let pf = format!("{df}.percentage");
            let intf = format!("{df}.percent");
            let share = percentage((&pf, &d.percentage), (&intf, d.percent), 0.0)?;
            Some((fixed, share))
        }
    };
    let abort = match &x.abort {
        None => None,
        Some(a) => {
            let af = format!("{f}.abort");
            if a.http2_error.is_some() {
                return Err(Invalid::new(
                    format!("{af}.http2Error"),
                    "not supported (httpStatus or grpcStatus)",
                ));
            }
            let kind = match (a.http_status, &a.grpc_status) {
                (Some(s), None) if (200..600).contains(&s) => Abort::Http(s),
                (Some(_), None) => {
                    return Err(Invalid::new(format!("{af}.httpStatus"), "must be 200–599"))
                }
                (None, Some(g)) => Abort::Grpc(grpc_code(g).ok_or_else(|| {
                    Invalid::new(
                        format!("{af}.grpcStatus"),
                        format!("{g:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                    )
                })?),
                _ => {
                    return Err(Invalid::new(
                        af,
                        "one of httpStatus and grpcStatus is required",
                    ))
                }
            };
            let pf = format!("{af}.percentage");
            Some((kind, percentage((&pf, &a.percentage), ("", None), 0.0)?))
        }
    };
    if delay.is_none() && abort.is_none() {
        return Err(Invalid::new(f, "delay or abort is required"));
    }
    Ok(Fault { delay, abort })
}

/// A gRPC status name's code.
fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

/// A destination's service (with its subset) and port (0: the request's).
fn destination(
    f: &str,
    d: &DestinationRaw,
    ns: &str,
    hosts: &Hosts,
) -> Result<(ObjectRef, u16), Invalid> {
    let svc = dr_host(&format!("{f}.host"), &d.host, ns, hosts)?;
    if d.subset.as_deref() == Some("") {
        return Err(Invalid::new(format!("{f}.subset"), "empty"));
    }
    Ok((
        svc.with_subset(d.subset.clone()),
        d.port.as_ref().map_or(0, |p| p.number),
    ))
}

fn mirrors(
    rf: &str,
    h: &HttpRaw,
    ns: &str,
    hosts: &Hosts,
    subsets: &mut Vec<(String, ObjectRef)>,
) -> Result<Vec<Filter>, Invalid> {
    let mut out = vec![];
    let mut one = |f: String, d: &DestinationRaw, share: Share| -> Result<(), Invalid> {
        let (service, port) = destination(&f, d, ns, hosts)?;
        if service.subset.is_some() {
            subsets.push((format!("{f}.subset"), service.clone()));
        }
        out.push(Filter::Mirror(Mirror {
            service,
            port,
            numerator: share.numerator,
            denominator: share.denominator,
        }));
        Ok(())
    };
    if let Some(m) = &h.mirror {
        if !h.mirrors.is_empty() {
            return Err(Invalid::new(
                format!("{rf}.mirrors"),
                "mirror and mirrors are exclusive",
            ));
        }
        // Istio: every request when no percentage is given.
        let pf = format!("{rf}.mirrorPercentage");
        let intf = format!("{rf}.mirrorPercent");
        let share = percentage(
            (&pf, &h.mirror_percentage),
            (&intf, h.mirror_percent),
            100.0,
        )?;
        one(format!("{rf}.mirror"), m, share)?;
    } else if h.mirror_percentage.is_some() || h.mirror_percent.is_some() {
        return Err(Invalid::new(
            format!("{rf}.mirrorPercentage"),
            "only with mirror",
        ));
    }
    for (i, m) in h.mirrors.iter().enumerate() {
        let f = format!("{rf}.mirrors[{i}]");
        let pf = format!("{f}.percentage");
        let share = percentage((&pf, &m.percentage), ("", None), 100.0)?;
        one(format!("{f}.destination"), &m.destination, share)?;
    }
    Ok(out)
}
