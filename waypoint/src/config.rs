//! The waypoint's configuration file (`waypoint --config FILE`): multi-document Kubernetes
//! YAML (`---` separated), the objects users write plus the mesh model and the waypoint's
//! own settings, all in one file.
//!
//! | document | `apiVersion` | compiled to |
//! |----------|--------------|-------------|
//! | `HTTPRoute` | `gateway.networking.k8s.io/v1`, `/v1beta1` | [`crate::route::HttpRoute`] |
//! | `GRPCRoute` | `gateway.networking.k8s.io/v1`, `/v1alpha2` | [`crate::route::HttpRoute`] (method matches as path matches, see `grpc_as_http`) |
//! | `TCPRoute` | `gateway.networking.k8s.io/v1alpha2` | [`crate::route::TcpRoute`]: `parentRefs` (Services), one rule of weighted `backendRefs`; its ports are opaque TCP (no protocol detection) and no HTTPRoute, GRPCRoute or VirtualService may take them for the same clients |
//! | `ReferenceGrant` | `gateway.networking.k8s.io/v1beta1`, `/v1alpha2` | lets routes (`from`: group, kind, namespace) name Services (`to`, optionally by name) of its namespace: a route's `backendRef` or `RequestMirror` to a Service of another namespace without one is refused — the backend keeps its weight and answers `500` (a TCPRoute's: the connection is refused), the mirror is dropped — with a warning naming the route and service; VirtualServices (Istio's API) need none |
//! | `PeerAuthentication` | `security.istio.io/v1`, `/v1beta1` | checked (as mesh-model's `peerAuthentications[]`), then set aside as `waypoint_policies_ignored{reason="ztunnel_enforces"}`: the destination's ztunnel enforces it, a waypoint takes mutual-TLS HBONE only |
//! | `AuthorizationPolicy` | `security.istio.io/v1`, `/v1beta1` | [`crate::authz::Policy`] (`CUSTOM` with `provider.name`: an extension provider of the MeshConfig document) |
//! | `RequestAuthentication` | `security.istio.io/v1`, `/v1beta1` | [`crate::jwt::RequestAuthn`]: `jwtRules[]` with `issuer`, `audiences`, `jwks` (inline JSON), or `jwksUri` (fetched, with `timeout`; neither: OpenID discovery from the issuer; see [`crate::jwks`]), `fromHeaders` (`name`, `prefix`), `fromParams`, `fromCookies`, `forwardOriginalToken`, `outputPayloadToHeader`, `outputClaimToHeaders` (`header`, `claim`) |
//! | `VirtualService` | `networking.istio.io/v1`, `/v1beta1`, `/v1alpha3` | [`crate::route::HttpRoute`] with its rules in order (see `config/virtual_service.rs` for the fields) |
//! | `Telemetry` | `telemetry.istio.io/v1`, `/v1alpha1` | [`TelemetryRule`]: `accessLogging` (`providers`: `envoy` or MeshConfig `envoyFileAccessLog` and `envoyOtelAls` ones, `disabled`, `match.mode` `CLIENT_AND_SERVER`/`SERVER`, `filter.expression` in CEL over Envoy's attributes, see [`crate::cel`]; merged per provider across the hierarchy as Istio's `mergeLogs`, [`WaypointConfig::telemetry_for`]) and `metrics` (`providers` `prometheus`, `overrides` with `match.metric` (`ALL_METRICS`, `REQUEST_COUNT`, `REQUEST_DURATION`, `REQUEST_SIZE`, `RESPONSE_SIZE`, `TCP_OPENED_CONNECTIONS`, `TCP_CLOSED_CONNECTIONS`, `TCP_SENT_BYTES`, `TCP_RECEIVED_BYTES`; gRPC message metrics: none here, nothing to change), `disabled` and `tagOverrides` (`UPSERT` with a CEL `value`, [`crate::cel::Expr::text`], or `REMOVE`; merged label by label as Istio's `mergeMetrics`)) and `tracing` (`providers` (one), `randomSamplingPercentage`, `disableSpanReporting`, `customTags` `literal`/`environment`/`header`, `match.mode`; see [`crate::spans`]) by `targetRefs` (the waypoint's Gateway, Services), namespace or root namespace; `reportingInterval`, `customMetric` refused; a `selector` one set aside as AuthorizationPolicies' are |
//! | `DestinationRule` | `networking.istio.io/v1`, `/v1beta1`, `/v1alpha3` | [`Subset`]s (`subsets[]`: `name`, `labels`, `trafficPolicy` whose fields replace the rule's); [`ServiceLb`]: `trafficPolicy.loadBalancer` (`simple`, or `consistentHash` with `httpHeaderName`, `httpQueryParameterName`, `useSourceIp` or `httpCookie` `name`/`path`/`ttl`/`attributes`), `.outlierDetection` (`consecutive5xxErrors`, `consecutiveGatewayErrors`, `interval`, `baseEjectionTime`, `maxEjectionPercent`), `.loadBalancer.localityLbSetting` (with outlier detection, as Istio: locality failover priorities from the waypoint's own workload — `enabled`, `failover` from/to regions, `failoverPriority` label keys; or, with or without outlier detection, `distribute` locality weights — `from`/`to` patterns `region/zone/subzone` with a last `*`, weights summing to 100; see [`crate::lb::LocalityLb`], [`crate::lb::distribute`]), `.loadBalancer.warmupDurationSecs` (Envoy's slow start for round robin, least request and random: a new endpoint's share grows from 10 % to all of it over the window; refused with consistentHash), `.connectionPool.http.useClientProtocol`, `.connectionPool.http.idleTimeout`, `.tls.mode: ISTIO_MUTUAL` (what HBONE is), `SIMPLE`/`MUTUAL` (`sni`, `caCertificates`, `clientCertificate`, `privateKey`, `subjectAltNames`, `insecureSkipVerify`: TLS originated to endpoints outside the mesh, [`crate::plain::TlsOrigin`]; `DISABLE`, `credentialName` refused), `.portLevelSettings` (all of these per service port, each entry replacing the service's for its port); [`crate::breaker`]: `.connectionPool.tcp.maxConnections`, `.tcp.connectTimeout`, `.http.http1MaxPendingRequests`, `.http.http2MaxRequests`, `.http.maxRequestsPerConnection`, `.http.maxRetries` |
//! | no `apiVersion`/`kind`, a `waypoint:` key | — | [`SettingsDoc`], exactly one for the binary |
//! | no `apiVersion`/`kind`, a `meshConfig:` key | — | Istio MeshConfig's `extensionProviders` of kinds `envoyExtAuthzHttp` (`service`: a model service's hostname, or `namespace/hostname`; `port`, `pathPrefix`, `timeout`, `failOpen`, `statusOnError`, `includeRequestHeadersInCheck`, `includeAdditionalHeadersInCheck`, `headersToUpstreamOnAllow`, `headersToDownstreamOnDeny`, `headersToDownstreamOnAllow`) and `envoyExtAuthzGrpc` (`service`, `port`, `timeout`, `failOpen`, `statusOnError`) (see [`crate::ext_authz`]), and the tracing providers `opentelemetry` (`service`, `port`, `maxTagLength`, `http` with `path`, `timeout`, `headers`: OTLP over HTTP, else over gRPC) and `zipkin` (`service`, `port`, `maxTagLength`, `enable64bitTraceId`, `path`, `timeout`, `headers`), with `defaultProviders.tracing` (see [`crate::spans`]); the access log providers `envoyFileAccessLog` (`path`, default `/dev/stdout`; `logFormat` `text` or `labels` (JSON), default Istio's text format; `omitEmptyValues`; Envoy's command operators, see [`crate::logfmt`]) and `envoyOtelAls` (`service`, `port`, `logName`, `logFormat` `text` (the record's body, default Istio's text format) and `labels` (its attributes); OTLP logs over gRPC, exported as spans are) with `defaultProviders.accessLogging`, and `accessLogFile`, `accessLogFormat`, `accessLogEncoding` (`TEXT`/`JSON`), which make the built-in `envoy` provider write Istio's format (without them it writes the waypoint's own `access` line to stderr); one MeshConfig document, reloaded with the file |
//! | no `apiVersion`/`kind`, no `waypoint:` key | — | mesh-model's local config (`namespaces`, `workloads`, `services`, `policies`, `waypoints`, `nodes`; see the `mesh_model` crate docs), at most one |
//!
//! `targetRefs` name the waypoint's `Gateway`, `Service`s (group `""` or `core`) or
//! `ServiceEntry`s (group `networking.istio.io`) of the policy's namespace, or, from the
//! root namespace only, the `GatewayClass` `istio-waypoint`: every waypoint (a policy
//! elsewhere naming a class is a load error).
//!
//! A ServiceEntry (mesh-model's `serviceEntries[]`) is the service it converts to, of the
//! same name: routes' `parentRefs` and `backendRefs` name it with group
//! `networking.istio.io`, kind `ServiceEntry` (or, backends, kind `Hostname` with its
//! host). A DestinationRule's `host` and a
//! VirtualService's hosts and destinations name any service of the mesh model by its
//! hostname (`httpbin.org`, `reviews.prod.svc.cluster.local`; the one of the rule's
//! namespace first, else the only one), or by Kubernetes' short forms (`name`,
//! `name.namespace`). The mesh-model document is read first, wherever it stands.
//!
//! An `AuthorizationPolicy` or `RequestAuthentication` without `targetRefs` (a workload
//! `selector`, or none: the whole namespace, or the mesh from the root namespace) is loaded
//! and checked but not enforced, as in Istio, whose waypoints enforce only `targetRefs`
//! policies (the destination's ztunnel enforces such AuthorizationPolicies at L4, with the
//! waypoint's identity as the source): each is logged as a warning naming the file, line
//! and document, and shown as `waypoint_policies_ignored` on the stats page.
//!
//! An `HTTPRoute` whose `parentRefs` name a Service in its own namespace is a GAMMA
//! *producer* route (for every client); one naming a Service of another namespace is a
//! *consumer* route, for clients of the route's namespace only (see [`crate::route`]).
//!
//! `metadata` takes `name` (required), `namespace` (default `default`), `creationTimestamp`,
//! `labels` and `annotations`. Every other key anywhere is an error; so are features the
//! waypoint does not implement (HTTPRoute `hostnames`, non-Service parents, extension
//! providers other than `envoyExtAuthzHttp` and `envoyExtAuthzGrpc`, …). Errors name
//! the file, the line in the file, the document (counted from 1, blank documents not
//! counted) and the field: `w.yaml:7:3: document 2: field `waypoint`: unknown field `listn``.
//!
//! ## The settings document
//!
//! ```yaml
//! waypoint:
//!   listen: 0.0.0.0:15008        # HBONE listener (default 0.0.0.0:15008); port 0 = any
//!   address: 10.1.0.100:15008    # the address the model's bindings use for this waypoint
//!                                # (the `waypoints[].address` of the model; default: listen)
//!   gateway: app/waypoint        # required: which waypoint of the model this is
//!                                # (namespace/name of `waypoints[]`, the Gateway)
//!   identity: spiffe://cluster.local/ns/app/sa/waypoint   # required: own SPIFFE identity
//!   ca: { builtin: /var/lib/mesh/ca }   # required: { builtin: DIR } (root created on
//!                                # first start, or loaded) | { plugin: DIR } (Istio plug-in
//!                                # CA files) | { static: DIR } (pre-issued certificates)
//!   trust_domain: cluster.local  # default; used by the builtin CA
//!   root_namespace: istio-system # default; AuthorizationPolicies here apply mesh-wide
//!   stats: 127.0.0.1:15020       # optional: GET /stats/prometheus and /healthz/ready
//!   num_trusted_proxies: 0       # default; Istio's numTrustedProxies: with N > 0,
//!                                # remoteIpBlocks read the Nth X-Forwarded-For entry
//!                                # from the right
//!   ztunnel_identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel   # default (in
//!                                # the trust domain of `identity`): its `forwarded: for=`
//!                                # is believed
//!   stream_idle_timeout: 5m      # default (Envoy's stream_idle_timeout); 0s = none. A
//!                                # request with no byte moving either way this long ends:
//!                                # `408` while its body is still read, `504` while the
//!                                # upstream has not answered; an HTTP/2 upstream's response
//!                                # that stalls this long is reset (an HTTP/1.1 upstream's
//!                                # streamed response body is bounded by route timeouts only)
//!   request_headers_timeout: 10s # default; 0s = none. A request head not complete this
//!                                # long after its first byte: `408` and the tunnel closes
//!   idle_timeout: 1h             # default (Envoy's HCM idle_timeout); 0s = none. A tunnel
//!                                # with no request in flight this long is closed
//!   protocol_detection_timeout: 0s   # default (Istio's protocolDetectionTimeout): 0s =
//!                                # wait for the client's first bytes (up to idle_timeout,
//!                                # then close); > 0: silence this long means opaque TCP
//!                                # (a server-first protocol)
//!   jwks_refresh: 20m            # default (istiod's): how often key sets named by URI
//!                                # (RequestAuthentication jwksUri, OpenID discovery) are
//!                                # fetched again; see `crate::jwks`
//!   jwks_ca: /etc/idp/ca.pem     # optional: PEM roots for https key sets instead of the
//!                                # system's (SSL_CERT_FILE, else the usual bundle files)
//!   dns_refresh: 60s             # default (Istio's dnsRefreshRate): how often the host
//!                                # names of DNS ServiceEntries are looked up again (a
//!                                # changed answer reloads the file); 0s: at load only
//!   access_log: true             # default; the access log of requests no Telemetry
//!                                # `accessLogging` applies to, to the default providers
//!                                # (false: Istio's default, logs only where a Telemetry
//!                                # turns them on)
//! runtime: { workers: 2 }        # optional: replaces the --profile's runtime knobs
//! h2: { max_streams_per_connection: 100 }   # optional: replaces the --profile's h2 knobs
//! ```
//!
//! `runtime` and `h2` take the fields of `runtime::config::RuntimeConfig` and
//! `hbone::H2Settings` (the tuning profiles' sections); without them the `--profile`
//! (`default` unless given; a built-in name or a profile file) supplies both.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_model::authz::Cidr;
use mesh_model::snapshot::Snapshot;
use regex::Regex;
use runtime::config::{locate_field, ConfigError, Invalid};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::authz::{self, Attachment, Condition, Key, OneOf, PathPattern, StrMatch};
use crate::lb::{HashKey, LbPolicy, OutlierDetection};
use crate::route::{
    Backend, Cors, Filter, HeaderModifier, HttpRoute, Mirror, ObjectRef, PathMatch, PathModifier,
    Redirect, Retry, Rewrite, RouteMatch, RouteTable, Rule, TcpRoute, Timeouts, ValueMatch,
};
use crate::{ext_authz, jwks, jwt, spans};

mod virtual_service;

/// A configuration error: file, document, line, field, message.
#[derive(Debug, thiserror::Error)]
pub struct LoadError {
    pub file: PathBuf,
    /// Counted from 1.
    pub document: usize,
    /// Line in the whole file (1-based), when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": document {}", self.document)?;
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A DestinationRule's traffic policy: the whole service's, or one port's.
#[derive(Debug, Clone, Default)]
pub struct TrafficPolicy {
    pub lb: ServiceLb,
    /// `connectionPool.http.idleTimeout`: how long an idle upstream HTTP/1.1 stream to an
    /// endpoint is kept for reuse, and a worker's HTTP/2 connection to one
    /// (`useClientProtocol`) with no request in flight ([`WaypointConfig::idle_expiry`]).
    pub idle: Option<Duration>,
    /// `connectionPool` limits, when any is set: see [`crate::breaker`].
    pub breaker: Option<Arc<crate::breaker::Breaker>>,
    /// `tls.mode: SIMPLE` or `MUTUAL`: TLS the waypoint originates to endpoints outside
    /// the mesh ([`crate::plain`]).
    pub tls: Option<Arc<crate::plain::TlsOrigin>>,
}

impl TrafficPolicy {
    /// Keep `old`'s breaker (what is in use against its limits) if the limits are the same.
    fn adopt_breaker(&mut self, old: &TrafficPolicy) {
        if let (Some(b), Some(o)) = (self.breaker.as_mut(), old.breaker.as_ref()) {
            if o.limits == b.limits {
                *b = o.clone();
            }
        }
    }
}

/// A service's DestinationRule.
#[derive(Debug, Clone, Default)]
pub struct DestinationPolicy {
    /// `trafficPolicy`.
    pub whole: TrafficPolicy,
    /// `portLevelSettings`: by service port, each in place of `whole` for its port (unset
    /// fields at their defaults, as Istio applies them).
    pub ports: Vec<(u16, TrafficPolicy)>,
}

impl DestinationPolicy {
    /// The policy at `port` (when known).
    fn at(&self, port: Option<u16>) -> &TrafficPolicy {
        port.and_then(|p| self.ports.iter().find(|(q, _)| *q == p))
            .map_or(&self.whole, |(_, t)| t)
    }
}

/// A DestinationRule subset: the endpoints with all of `labels`, balanced and limited by
/// `policy` (the rule's, with the subset's own `trafficPolicy` fields in place of its).
#[derive(Debug, Clone, Default)]
pub struct Subset {
    pub labels: mesh_model::config::LocalSelector,
    pub policy: DestinationPolicy,
}

/// Load balancing of one service (from a DestinationRule).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceLb {
    pub policy: LbPolicy,
    pub outlier: Option<OutlierDetection>,
    /// `connectionPool.http.useClientProtocol`: speak HTTP/2 to the backend when the client
    /// spoke HTTP/2 (Istio's default, `false`, is HTTP/1.1 upstream).
    pub use_client_protocol: bool,
    /// Locality failover (`loadBalancer.localityLbSetting`, on by default as in Istio's
    /// mesh config), in force only with `outlierDetection`, as Istio applies it.
    pub locality: Option<crate::lb::LocalityLb>,
    /// `loadBalancer.warmupDurationSecs`: slow start of new endpoints
    /// ([`crate::lb::Balancer::with_warmup`]).
    pub warmup: Option<Duration>,
}

/// An AuthorizationPolicy the waypoint does not enforce, as Istio's waypoints do not: one
/// with a workload `selector`, or a namespace-wide one (neither `selector` nor
/// `targetRefs`); the destination's ztunnel enforces those at L4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredPolicy {
    /// `AuthorizationPolicy`, `RequestAuthentication`, `Telemetry` or
    /// `PeerAuthentication`.
    pub kind: &'static str,
    pub id: ObjectRef,
    /// Counted from 1, as in errors.
    pub document: usize,
    /// Line of `spec.selector` (else of `spec`) in the whole file.
    pub line: usize,
    /// `selector`, `no_target_refs`, or `ztunnel_enforces` (a PeerAuthentication).
    pub reason: &'static str,
}

impl IgnoredPolicy {
    /// Istio: a waypoint applies only `targetRefs` policies (its Gateway, its Services);
    /// `selector` and namespace-wide AuthorizationPolicies are enforced by the
    /// destination's ztunnel at L4 (such RequestAuthentications are sidecars'). Logged as a
    /// warning naming the file, line and document, never taken as enforced.
    fn warn(
        file: &Path,
        kind: &'static str,
        id: ObjectRef,
        document: usize,
        line: usize,
        reason: &'static str,
    ) -> Self {
        let advice = match kind {
            "AuthorizationPolicy" => {
                "selector and namespace-wide AuthorizationPolicies are enforced by the \
                 destination's ztunnel at L4: give them to the ztunnel as `policies[]` (with \
                 `selector`), or attach this one to the waypoint or a Service with targetRefs"
            }
            "PeerAuthentication" => {
                "the destination's ztunnel enforces it (a waypoint takes mutual-TLS HBONE \
                 only): give it to the ztunnels as `peerAuthentications[]`"
            }
            _ => "attach it to the waypoint (Gateway) or a Service with targetRefs",
        };
        let why = if kind == "PeerAuthentication" {
            "not a waypoint's to enforce"
        } else {
            "without targetRefs ignored by the waypoint (Istio: waypoints enforce only \
             `targetRefs` policies)"
        };
        tracing::warn!(
            file = %file.display(),
            line,
            document,
            kind,
            policy = %format!("{}/{}", id.namespace, id.name),
            reason,
            "{kind} {why}; {advice}"
        );
        IgnoredPolicy {
            kind,
            id,
            document,
            line,
            reason,
        }
    }
}

/// The record of a policy (`kind` `id` of document `index`, text `doc` from file line
/// `start`) the waypoint does not enforce, warned about; `None` for one it does (a
/// `targetRefs` attachment).
fn set_aside(
    file: &Path,
    doc: &str,
    start: usize,
    index: usize,
    kind: &'static str,
    id: &ObjectRef,
    a: &Attachment,
) -> Option<IgnoredPolicy> {
    let (reason, field) = match a {
        Attachment::Targets { .. } => return None,
        Attachment::Selector(_) => ("selector", "spec.selector"),
        Attachment::Namespace => ("no_target_refs", "spec"),
    };
    let line = locate(doc, field).unwrap_or(1) + start - 1;
    Some(IgnoredPolicy::warn(
        file,
        kind,
        id.clone(),
        index,
        line,
        reason,
    ))
}

impl WaypointConfig {
    /// What is in use against each service's circuit breakers and their limits, Prometheus
    /// text (gauges: `waypoint_circuit_breaker_in_use{service,resource}` and
    /// `waypoint_circuit_breaker_limit{service,resource}`, Envoy's `circuit_breakers.*`
    /// stats; resources `connections`, `pending_requests`, `requests`, `retries`).
    pub fn breakers_prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP waypoint_circuit_breaker_in_use What is in use against a service's circuit breakers (DestinationRule connectionPool), by resource.\n# TYPE waypoint_circuit_breaker_in_use gauge\n# HELP waypoint_circuit_breaker_limit A service's circuit breaker limits (DestinationRule connectionPool; 4294967295: none).\n# TYPE waypoint_circuit_breaker_limit gauge\n",
        );
        let subsets = self.subsets.iter().map(|(k, v)| (k, &v.policy));
        let all = self
            .destination_rules
            .iter()
            .chain(subsets)
            .flat_map(|(svc, d)| {
                let name = format!("{}/{}", svc.namespace, svc.name);
                // A subset's breakers (a cluster of its own in Envoy) carry its name.
                let subset = svc
                    .subset
                    .as_ref()
                    .map_or(String::new(), |s| format!(",subset=\"{s}\""));
                let ports = d.ports.iter().map(move |(port, t)| (Some(*port), t));
                std::iter::once((None, &d.whole))
                    .chain(ports)
                    .filter_map(move |(port, t)| {
                        let b = t.breaker.as_ref()?;
                        let svc = port.map_or(name.clone(), |p| format!("{name}:{p}"));
                        Some((svc, subset.clone(), b))
                    })
            });
        for (svc, subset, b) in all {
            let (c, p, r, t) = b.in_use();
            let l = b.limits;
            for (res, used, max) in [
                ("connections", c, l.max_connections),
                ("pending_requests", p, l.max_pending),
                ("requests", r, l.max_requests),
                ("retries", t, l.max_retries),
            ] {
                let labels = format!("service=\"{svc}\"{subset},resource=\"{res}\"");
                out.push_str(&format!(
                    "waypoint_circuit_breaker_in_use{{{labels}}} {used}\nwaypoint_circuit_breaker_limit{{{labels}}} {max}\n"
                ));
            }
        }
        out
    }

    /// `waypoint_policies_ignored{kind,policy,document,line,reason} 1` per ignored policy, Prometheus
    /// text (a gauge: the current configuration's).
    pub fn ignored_policies_prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP waypoint_policies_ignored AuthorizationPolicies, RequestAuthentications and Telemetries of the current configuration not applied by the waypoint (selector ones; namespace-wide policies).\n# TYPE waypoint_policies_ignored gauge\n",
        );
        for p in &self.ignored_policies {
            out.push_str(&format!(
                "waypoint_policies_ignored{{kind=\"{}\",policy=\"{}/{}\",document=\"{}\",line=\"{}\",reason=\"{}\"}} 1\n",
                p.kind, p.id.namespace, p.id.name, p.document, p.line, p.reason
            ));
        }
        out
    }
}

/// Everything the waypoint's L7 core reads.
#[derive(Debug, Clone, Default)]
pub struct WaypointConfig {
    /// The workload/service model, when the file has a mesh-model document.
    pub mesh: Option<Snapshot>,
    pub routes: RouteTable,
    pub policies: Vec<authz::Policy>,
    /// RequestAuthentications (JWT), in file order.
    pub request_authns: Vec<jwt::RequestAuthn>,
    /// MeshConfig `extensionProviders` of kinds `envoyExtAuthzHttp` and
    /// `envoyExtAuthzGrpc`, by name (the authorizers of CUSTOM policies).
    pub ext_authz: BTreeMap<String, Arc<ext_authz::Provider>>,
    /// MeshConfig `extensionProviders` of kinds `opentelemetry` and `zipkin`, by name (the
    /// providers of Telemetry `tracing`, [`crate::spans`]).
    pub tracing_providers: BTreeMap<String, Arc<spans::Provider>>,
    /// MeshConfig `defaultProviders.tracing`: the provider of a destination no Telemetry
    /// names one for.
    pub default_tracing: Option<String>,
    /// AuthorizationPolicies and RequestAuthentications loaded but not enforced here (warned about at load, shown as
    /// `waypoint_policies_ignored` on the stats page).
    pub ignored_policies: Vec<IgnoredPolicy>,
    /// DestinationRules, by service.
    pub destination_rules: BTreeMap<ObjectRef, DestinationPolicy>,
    /// DestinationRule `subsets`, by service with the subset's name.
    pub subsets: BTreeMap<ObjectRef, Subset>,
    /// The waypoint's own settings document, when the file has one.
    pub settings: Option<SettingsDoc>,
    /// The ztunnel identity whose CONNECT `forwarded: for=` is believed for any client
    /// (`waypoint.ztunnel_identity` of the settings document, parsed when the snapshot is
    /// loaded; see [`crate::source`]).
    pub ztunnel_identity: ZtunnelIdentity,
    /// Some DestinationRule balances by a cookie it gives clients (`httpCookie.ttl`): only
    /// then does a request look for its service's cookie ([`crate::http1`]).
    pub generates_cookies: bool,
    /// Istio `Telemetry` objects with `accessLogging` or `metrics`, in file order.
    pub telemetry: Vec<TelemetryRule>,
    /// Access log providers by name: the built-in `envoy` (always, once loaded) and
    /// MeshConfig `envoyFileAccessLog` and `envoyOtelAls` ones.
    pub log_providers: BTreeMap<String, Arc<LogProvider>>,
    /// MeshConfig `defaultProviders.accessLogging` (empty: `envoy`).
    pub default_logging: Vec<String>,
}

/// An access log provider (Istio's built-in `envoy`, MeshConfig `envoyFileAccessLog` and
/// `envoyOtelAls` extension providers): where a request's line goes and what it says.
#[derive(Debug)]
pub enum LogProvider {
    /// The waypoint's own `access` line (`key=value` fields on stderr,
    /// [`crate::telemetry::access_log`]): the built-in `envoy` provider while MeshConfig sets
    /// none of `accessLogFile`, `accessLogFormat` and `accessLogEncoding`.
    Builtin,
    /// Envoy's format (Istio's default text or JSON, or the provider's own) appended to a
    /// file or to standard output.
    File(FileLog),
    /// OpenTelemetry log records exported to a collector (an `envoyOtelAls` provider).
    Otel(OtelLog),
}

/// An `envoyOtelAls` provider: each request's record has the `body` format's text and an
/// attribute per `labels` entry; exported as spans are ([`crate::spans`]).
#[derive(Debug)]
pub struct OtelLog {
    pub provider: Arc<spans::Provider>,
    pub body: crate::logfmt::Format,
    pub attributes: Vec<(String, crate::logfmt::Format)>,
}

/// An Envoy-formatted access log ([`crate::logfmt`]) and its file.
#[derive(Debug)]
pub struct FileLog {
    pub format: crate::logfmt::Format,
    /// `omitEmptyValues`: a missing value is left out (JSON) or empty (text), not `null`
    /// or `-`.
    pub omit_empty: bool,
    pub out: Arc<runtime::logbuf::LogFile>,
}

/// One access log a request is written to: its provider, and the filter choosing the
/// requests it takes (none: all).
#[derive(Debug, Clone)]
pub struct LogSink {
    /// The provider's name.
    pub name: String,
    pub provider: Arc<LogProvider>,
    pub filter: Option<Arc<crate::cel::Expr>>,
}

/// A Telemetry metrics override's `tagOverrides` entry.
#[derive(Debug, Clone)]
pub enum TagOverride {
    /// The label is left out.
    Remove,
    /// The label (a standard one, or a new one) takes the expression's value for each
    /// request ([`crate::cel::Expr::text`]; `unknown` when it has none).
    Upsert(Arc<crate::cel::Expr>),
}

/// Tag overrides by metric ([`crate::telemetry::METRICS`]), each metric's by label name.
#[derive(Debug, Clone, Default)]
pub struct MetricTags(pub [Vec<(String, TagOverride)>; 8]);

impl MetricTags {
    /// `name` of metric `m` set to `t` (replacing an earlier override of it).
    fn set(&mut self, m: usize, name: &str, t: TagOverride) {
        let list = &mut self.0[m];
        match list.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = t,
            None => list.push((name.to_string(), t)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Vec::is_empty)
    }

    /// Whether any override of `metrics` (indices of [`crate::telemetry::METRICS`]) takes
    /// a value from the request.
    pub fn upserts(&self, metrics: std::ops::Range<usize>) -> bool {
        self.0[metrics]
            .iter()
            .flatten()
            .any(|(_, t)| matches!(t, TagOverride::Upsert(_)))
    }
}

/// A Telemetry `accessLogging` entry.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Its `providers` (empty: the previous entry's, the first one's the default ones).
    pub providers: Vec<String>,
    pub disabled: bool,
    pub filter: Option<Arc<crate::cel::Expr>>,
}

/// An Istio `Telemetry`: whether the requests it applies to are logged (`accessLogging`)
/// and which of Istio's request metrics report them (`metrics` overrides).
#[derive(Debug, Clone)]
pub struct TelemetryRule {
    pub id: ObjectRef,
    /// `targetRefs` (this waypoint's Gateway, Services), or the namespace (the mesh from the
    /// root namespace); a `selector` one is set aside at load.
    pub attachment: Attachment,
    /// Its `accessLogging` entries (none: it has no `accessLogging`), merged with the
    /// other Telemetries' as [`WaypointConfig::telemetry_for`] says.
    pub access_log: Vec<LogEntry>,
    /// By [`crate::telemetry::METRICS`]: reported or not, as its overrides say; `None`:
    /// not overridden here.
    pub metrics: [Option<bool>; 8],
    /// Its overrides' `tagOverrides`, by metric.
    pub tags: MetricTags,
    /// Its `tracing`, when it has one.
    pub tracing: Option<TracingRule>,
}

impl TelemetryRule {
    /// How specific it is for a request to `s` (`targetRefs` 2, its namespace 1, the root
    /// namespace 0); `None`: it does not apply.
    fn rank(&self, s: &authz::Subject<'_>) -> Option<u8> {
        if !self.attachment.applies(&self.id.namespace, s) {
            return None;
        }
        Some(match self.attachment {
            Attachment::Targets { .. } => 2,
            _ if self.id.namespace == s.root_namespace => 0,
            _ => 1,
        })
    }
}

/// A Telemetry's `tracing` (its entries in order, a later one's fields over an earlier
/// one's); each field `None` where it does not set it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TracingRule {
    /// `providers[0].name`.
    pub provider: Option<String>,
    /// `randomSamplingPercentage`.
    pub sampling: Option<f64>,
    /// `!disableSpanReporting`.
    pub report: Option<bool>,
    /// `customTags` (an `environment` one read at load), by name.
    pub custom_tags: BTreeMap<String, Option<spans::CustomTag>>,
}

/// What Telemetry says of one request's destination: the access logs it is written to
/// (each with its filter), and the metrics reported.
#[derive(Debug, Clone)]
pub struct TelemetryChoice {
    pub logs: Vec<LogSink>,
    pub metrics: crate::telemetry::Shown,
    /// The metrics' tag overrides (`None`: none).
    pub tags: Option<Arc<MetricTags>>,
}

impl WaypointConfig {
    /// Telemetry for the request to `s`.
    ///
    /// Metrics: each from the most specific Telemetry that sets it and applies (its
    /// `targetRefs`, then its namespace's, then the root namespace's; the first in the file
    /// among equals); without one, reported.
    ///
    /// Access logs, as Istio's `mergeLogs`: with no `accessLogging` applying, the default
    /// providers (MeshConfig `defaultProviders.accessLogging`, else `envoy`) when the
    /// settings' `access_log` is on (the default). Else the applying Telemetries' entries
    /// from the root namespace's to the `targetRefs` ones (file order among equals), each
    /// for its `providers` (none named: the previous entry's, the first one's the default
    /// ones), set the providers they name on (with the entry's filter) or off
    /// (`disabled`), a later entry over an earlier one. Only the providers named by the
    /// most specific Telemetry naming any (else the default ones) are in scope.
    pub fn telemetry_for(&self, s: &authz::Subject<'_>) -> TelemetryChoice {
        let mut metrics: [Option<(u8, bool)>; 8] = [None; 8];
        let better = |best: &Option<(u8, bool)>, rank: u8| best.is_none_or(|(r, _)| rank > r);
        let mut logging: Vec<(u8, &TelemetryRule)> = vec![];
        let mut tagged: Vec<(u8, &TelemetryRule)> = vec![];
        for t in &self.telemetry {
            let Some(rank) = t.rank(s) else {
                continue;
            };
            if !t.access_log.is_empty() {
                logging.push((rank, t));
            }
            if !t.tags.is_empty() {
                tagged.push((rank, t));
            }
            for (m, set) in metrics.iter_mut().zip(t.metrics) {
                if let Some(on) = set.filter(|_| better(m, rank)) {
                    *m = Some((rank, on));
                }
            }
        }
        let shown = metrics
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_none_or(|(_, on)| on))
            .fold(0, |acc, (i, _)| acc | 1 << i);
        // Tags as Istio's `mergeMetrics`: from the root namespace's Telemetry to the
        // `targetRefs` ones (file order among equals), a later override of a label over
        // an earlier one.
        tagged.sort_by_key(|(rank, _)| *rank);
        let mut tags = MetricTags::default();
        for (_, t) in tagged {
            for (m, list) in t.tags.0.iter().enumerate() {
                for (name, o) in list {
                    tags.set(m, name, o.clone());
                }
            }
        }
        TelemetryChoice {
            logs: self.merge_logs(logging),
            metrics: shown,
            tags: (!tags.is_empty()).then(|| Arc::new(tags)),
        }
    }

    /// The access logs of a request the Telemetries `applying` (with their rank) log, as
    /// [`Self::telemetry_for`] says.
    fn merge_logs(&self, mut applying: Vec<(u8, &TelemetryRule)>) -> Vec<LogSink> {
        let defaults: Vec<&str> = match self.default_logging.as_slice() {
            [] => vec!["envoy"],
            names => names.iter().map(String::as_str).collect(),
        };
        if applying.is_empty() {
            if self
                .settings
                .as_ref()
                .is_some_and(|d| !d.waypoint.access_log)
            {
                return vec![];
            }
            // By name, as the merged ones.
            let names: BTreeSet<&str> = defaults.into_iter().collect();
            return names
                .into_iter()
                .map(|name| self.log_sink(name, None))
                .collect();
        }
        // Stable: file order among equals.
        applying.sort_by_key(|(rank, _)| *rank);
        let mut in_scope = defaults.clone();
        for (_, t) in &applying {
            let named: Vec<&str> = t
                .access_log
                .iter()
                .flat_map(|e| e.providers.iter().map(String::as_str))
                .collect();
            if !named.is_empty() {
                in_scope = named;
            }
        }
        let mut state: BTreeMap<&str, Option<&Option<Arc<crate::cel::Expr>>>> = BTreeMap::new();
        let mut parent = defaults;
        for (_, t) in &applying {
            for e in &t.access_log {
                if !e.providers.is_empty() {
                    parent = e.providers.iter().map(String::as_str).collect();
                }
                for name in parent.iter().filter(|n| in_scope.contains(n)) {
                    state.insert(name, (!e.disabled).then_some(&e.filter));
                }
            }
        }
        state
            .into_iter()
            .filter_map(|(name, on)| on.map(|filter| self.log_sink(name, filter.clone())))
            .collect()
    }

    /// The provider `name` (checked at load; `envoy` is the built-in one when no file
    /// configures it), with `filter`.
    fn log_sink(&self, name: &str, filter: Option<Arc<crate::cel::Expr>>) -> LogSink {
        let provider = self
            .log_providers
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::new(LogProvider::Builtin));
        LogSink {
            name: name.to_string(),
            provider,
            filter,
        }
    }

    /// Tracing for the requests to `s` ([`crate::spans`]), each field from the most
    /// specific Telemetry `tracing` that sets it and applies (as [`Self::telemetry_for`]:
    /// `targetRefs`, namespace, root namespace; the first in the file among equals), custom
    /// tags by name; the provider, without one, MeshConfig `defaultProviders.tracing`.
    /// `None`: no provider, tracing off.
    pub fn tracing_for(&self, s: &authz::Subject<'_>) -> Option<spans::Tracing> {
        if self.default_tracing.is_none() && self.telemetry.iter().all(|t| t.tracing.is_none()) {
            return None;
        }
        let mut provider: Option<(u8, &str)> = None;
        let mut sampling: Option<(u8, f64)> = None;
        let mut report: Option<(u8, bool)> = None;
        let mut tags: BTreeMap<&str, (u8, &Option<spans::CustomTag>)> = BTreeMap::new();
        fn set<T: Copy>(best: &mut Option<(u8, T)>, rank: u8, v: Option<T>) {
            if let Some(v) = v.filter(|_| best.is_none_or(|(r, _)| rank > r)) {
                *best = Some((rank, v));
            }
        }
        for t in &self.telemetry {
            let (Some(tr), Some(rank)) = (t.tracing.as_ref(), t.rank(s)) else {
                continue;
            };
            set(&mut provider, rank, tr.provider.as_deref());
            set(&mut sampling, rank, tr.sampling);
            set(&mut report, rank, tr.report);
            for (name, tag) in &tr.custom_tags {
                if tags.get(name.as_str()).is_none_or(|(r, _)| rank > *r) {
                    tags.insert(name, (rank, tag));
                }
            }
        }
        let name = provider
            .map(|(_, p)| p)
            .or(self.default_tracing.as_deref())?;
        Some(spans::Tracing {
            provider: self.tracing_providers.get(name)?.clone(),
            sampling: spans::Sampling::percent(
                sampling.map_or(spans::DEFAULT_SAMPLING, |(_, v)| v),
            ),
            report: report.is_none_or(|(_, on)| on),
            custom_tags: tags
                .into_iter()
                .filter_map(|(n, (_, t))| Some((n.to_string(), t.clone()?)))
                .collect(),
        })
    }
}

/// The identity a ztunnel hairpinning a connection to the waypoint (R12) presents:
/// `waypoint.ztunnel_identity`, else `spiffe://<trust domain of waypoint.identity>/ns/
/// istio-system/sa/ztunnel` (Istio's ztunnel service account), else (a file without a
/// settings document) that account in Istio's default trust domain `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelIdentity(pub hbone::Identity);

impl ZtunnelIdentity {
    /// Istio's ztunnel service account in `trust_domain`.
    pub fn istio_default(trust_domain: &str) -> Self {
        ZtunnelIdentity(hbone::Identity::new(
            trust_domain,
            "istio-system",
            "ztunnel",
        ))
    }
}

impl Default for ZtunnelIdentity {
    fn default() -> Self {
        ZtunnelIdentity::istio_default(&default_trust_domain())
    }
}

impl std::ops::Deref for ZtunnelIdentity {
    type Target = hbone::Identity;
    fn deref(&self) -> &hbone::Identity {
        &self.0
    }
}

impl WaypointConfig {
    /// Whether the mesh model knows a service of this namespace and name.
    pub fn service_exists(&self, s: &ObjectRef) -> bool {
        self.mesh.as_ref().is_some_and(|m| {
            m.services()
                .any(|x| x.namespace == s.namespace && x.name == s.name)
        })
    }

    /// How long an idle upstream stream kept after a request to `service` (`None`: a
    /// pod-addressed request), or an HTTP/2 upstream connection after its last request to
    /// it, may wait for the next: its DestinationRule's `idleTimeout`, else
    /// [`crate::upstream::IDLE_STREAM_EXPIRY`]. `0s` is Istio's "no idle timeout":
    /// [`Duration::MAX`], the stream is kept until the pool's bounds or its upstream end it.
    pub fn idle_expiry(&self, service: Option<&ObjectRef>, port: Option<u16>) -> Duration {
        match service.and_then(|s| self.traffic(s, port)?.idle.as_ref()) {
            None => crate::upstream::IDLE_STREAM_EXPIRY,
            Some(d) if d.is_zero() => Duration::MAX,
            Some(d) => *d,
        }
    }

    /// The settings document's bounds on a tunnel's waits (the defaults without one).
    pub fn tunnel_timeouts(&self) -> TunnelTimeouts {
        let Some(s) = &self.settings else {
            return TunnelTimeouts::default();
        };
        let on = |d: Duration| Some(d).filter(|d| !d.is_zero());
        let w = &s.waypoint;
        TunnelTimeouts {
            stream_idle: on(w.stream_idle_timeout),
            request_headers: on(w.request_headers_timeout),
            idle: on(w.idle_timeout),
            protocol_detection: on(w.protocol_detection_timeout),
        }
    }

    /// The service's balancing (least request by default).
    /// Keep `prev`'s breaker (what is in use against its limits) for every service whose
    /// limits did not change: a reload does not reset what is in flight.
    pub fn adopt_breakers(&mut self, prev: &WaypointConfig) {
        let subsets = self.subsets.iter_mut().map(|(k, v)| (k, &mut v.policy));
        for (svc, d) in self.destination_rules.iter_mut().chain(subsets) {
            let old = match svc.subset {
                None => prev.destination_rules.get(svc),
                Some(_) => prev.subsets.get(svc).map(|x| &x.policy),
            };
            let Some(old) = old else {
                continue;
            };
            d.whole.adopt_breaker(&old.whole);
            for (port, t) in d.ports.iter_mut() {
                if let Some((_, o)) = old.ports.iter().find(|(q, _)| q == port) {
                    t.adopt_breaker(o);
                }
            }
        }
    }

    /// The circuit breakers of service `s` (at `port`, when known), when its DestinationRule
    /// sets limits there.
    pub fn breaker(
        &self,
        s: &ObjectRef,
        port: Option<u16>,
    ) -> Option<&Arc<crate::breaker::Breaker>> {
        self.traffic(s, port)?.breaker.as_ref()
    }

    /// Service `s`'s balancing (at `port`, when known).
    pub fn lb(&self, s: &ObjectRef, port: Option<u16>) -> ServiceLb {
        self.lb_ref(s, port).cloned().unwrap_or_default()
    }

    /// Service `s`'s DestinationRule balancing (at `port`, when known), if it has one.
    pub fn lb_ref(&self, s: &ObjectRef, port: Option<u16>) -> Option<&ServiceLb> {
        Some(&self.traffic(s, port)?.lb)
    }

    /// Service `s`'s DestinationRule traffic policy at `port` (when known), if it has one
    /// (its subset's, for a subset).
    fn traffic(&self, s: &ObjectRef, port: Option<u16>) -> Option<&TrafficPolicy> {
        match s.subset {
            None => Some(self.destination_rules.get(s)?.at(port)),
            Some(_) => Some(self.subsets.get(s)?.policy.at(port)),
        }
    }

    /// The TLS service `s` (at `port`) originates to endpoints outside the mesh.
    pub fn tls_origin(
        &self,
        s: &ObjectRef,
        port: Option<u16>,
    ) -> Option<&Arc<crate::plain::TlsOrigin>> {
        self.traffic(s, port)?.tls.as_ref()
    }

    /// The labels an endpoint of `s` needs: its subset's (`None` for a whole service).
    pub fn subset_labels(&self, s: &ObjectRef) -> Option<&mesh_model::config::LocalSelector> {
        s.subset.as_ref()?;
        self.subsets.get(s).map(|x| &x.labels)
    }
}

/// Read and [`load_str`] a file.
pub fn load_file(file: &Path, version: u64) -> Result<WaypointConfig, LoadError> {
    let text = std::fs::read_to_string(file).map_err(|e| LoadError {
        file: file.to_owned(),
        document: 0,
        line: None,
        column: None,
        field: None,
        message: format!("cannot read: {e}"),
    })?;
    load_str(file, &text, version)
}

/// Split at `---` lines: (first line of the document, 1-based; its text).
/// Whether a document holds nothing but blank lines and comments.
fn is_blank(doc: &str) -> bool {
    doc.lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
}

fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![];
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    docs.push((start, cur));
    docs
}

/// A provider named by a document (a CUSTOM policy, a Telemetry), checked once the
/// MeshConfig is read: its name, document, line and field.
struct ProviderRef {
    name: String,
    document: usize,
    line: usize,
    field: String,
}

/// An error naming the first of `refs` that `known` does not know: "no `what` (`kinds`)".
fn check_provider_refs(
    file: &Path,
    refs: Vec<ProviderRef>,
    known: impl Fn(&str) -> bool,
    what: &str,
    kinds: &str,
) -> Result<(), LoadError> {
    match refs.into_iter().find(|r| !known(&r.name)) {
        None => Ok(()),
        Some(r) => Err(LoadError {
            file: file.to_owned(),
            document: r.document,
            line: Some(r.line),
            column: None,
            field: Some(r.field),
            message: format!("no {what} {:?} ({kinds})", r.name),
        }),
    }
}

/// Parse every document of `text`.
pub fn load_str(file: &Path, text: &str, version: u64) -> Result<WaypointConfig, LoadError> {
    load_str_with(file, text, version, &mesh_model::config::system_resolver)
}

/// [`load_str`], the mesh model's `DNS` ServiceEntries resolved by `resolve`.
pub fn load_str_with(
    file: &Path,
    text: &str,
    version: u64,
    resolve: mesh_model::config::Resolver<'_>,
) -> Result<WaypointConfig, LoadError> {
    let mut cfg = WaypointConfig::default();
    let mut routes = vec![];
    // The MeshConfig document (index, first line, text), compiled once the model is read.
    let mut mesh_config: Option<(usize, usize, String, MeshConfigDoc)> = None;
    // CUSTOM policies' providers, checked against it.
    let mut customs: Vec<ProviderRef> = vec![];
    // Telemetry tracing providers, checked against it too.
    let mut traced: Vec<ProviderRef> = vec![];
    // Telemetry access log providers, checked against it too.
    let mut logged: Vec<ProviderRef> = vec![];
    let mut seen = BTreeSet::new();
    // VirtualServices, checked against the HTTPRoutes and DestinationRules once all are read.
    let mut virtuals: Vec<VsDoc> = vec![];
    // TCPRoutes with their document (index, first line, text), checked against the
    // HTTP routes once all are read.
    let mut tcp_routes: Vec<(TcpRoute, usize, usize, String)> = vec![];
    // The kind of each of `routes`, and the ReferenceGrants (namespace, spec): which
    // routes may name Services of other namespaces.
    let mut route_kinds: Vec<&'static str> = vec![];
    let mut grants: Vec<(String, GrantSpec)> = vec![];
    // Policies naming a GatewayClass (document, first line, text, namespace): only the
    // root namespace may, which is known once the settings document is read.
    let mut classes: Vec<(usize, usize, String, String)> = vec![];
    // Each non-blank document (numbered from 1 in errors) with its first line and its
    // head, read once.
    let docs: Vec<(usize, String, Result<Head, ConfigError>)> = documents(text)
        .into_iter()
        .filter(|(_, doc)| !is_blank(doc))
        .map(|(start, doc)| {
            let head = runtime::config::from_yaml_str::<Head>(file, &doc);
            (start, doc, head)
        })
        .collect();
    // A parse error of document `index` (first line `start`), placed in the file.
    let located = |index: usize, start: usize, e: ConfigError| LoadError {
        file: file.to_owned(),
        document: index,
        line: e.line.map(|l| l + start - 1),
        column: e.column,
        field: e.field,
        message: e.message,
    };
    // The mesh model first (the first document with no apiVersion/kind that is neither
    // the settings nor the MeshConfig): rules and routes may name its services by
    // hostname ([`Hosts`]), whatever the order of the documents.
    let model_doc = docs.iter().position(|(_, _, head)| {
        head.as_ref().is_ok_and(|h| {
            h.api_version.is_none()
                && h.kind.is_none()
                && h.waypoint.is_none()
                && h.mesh_config.is_none()
        })
    });
    if let Some(i) = model_doc {
        let (start, doc, _) = &docs[i];
        let snap = mesh_model::config::load_str_with(file, doc, version, resolve)
            .map_err(|e| located(i + 1, *start, e))?;
        cfg.mesh = Some(snap);
    }
    let model_doc = model_doc.map(|i| i + 1);
    let hosts = Hosts::of(cfg.mesh.as_ref());
    for (i, (start, doc, head)) in docs.into_iter().enumerate() {
        let index = i + 1;
        let at = |e: ConfigError| located(index, start, e);
        let invalid = |e: Invalid| {
            // Not written out at all: the document's first line.
            let line = Some(locate(&doc, &e.field).unwrap_or(1) + start - 1);
            LoadError {
                file: file.to_owned(),
                document: index,
                line,
                column: None,
                field: Some(e.field),
                message: e.message,
            }
        };
        let head = head.map_err(at)?;
        if head.waypoint.is_some() {
            if head.api_version.is_some() || head.kind.is_some() {
                return Err(invalid(Invalid::new(
                    "waypoint",
                    "the settings document has no apiVersion/kind",
                )));
            }
            if cfg.settings.is_some() {
                return Err(invalid(Invalid::new(
                    "waypoint",
                    "a second settings document (only one is allowed)",
                )));
            }
            let d: SettingsDoc = parse(file, &doc).map_err(at)?;
            cfg.ztunnel_identity = d.validate().map_err(invalid)?;
            cfg.settings = Some(d);
            continue;
        }
        if head.mesh_config.is_some() {
            if head.api_version.is_some() || head.kind.is_some() {
                return Err(invalid(Invalid::new(
                    "meshConfig",
                    "the MeshConfig document has no apiVersion/kind",
                )));
            }
            if mesh_config.is_some() {
                return Err(invalid(Invalid::new(
                    "meshConfig",
                    "a second MeshConfig document (only one is allowed)",
                )));
            }
            let d: MeshConfigDoc = parse(file, &doc).map_err(at)?;
            mesh_config = Some((index, start, doc.clone(), d));
            continue;
        }
        let (Some(api), Some(kind)) = (&head.api_version, &head.kind) else {
            if head.api_version.is_some() || head.kind.is_some() {
                let f = if head.kind.is_some() {
                    "apiVersion"
                } else {
                    "kind"
                };
                return Err(invalid(Invalid::new(f, "required with apiVersion/kind")));
            }
            if model_doc != Some(index) {
                return Err(invalid(Invalid::new(
                    "workloads",
                    "a second mesh-model document (only one is allowed)",
                )));
            }
            // Loaded before the other documents.
            continue;
        };
        // Each object once per kind, namespace and name.
        let mut first = |m: &Metadata| {
            if seen.insert((kind.clone(), m.namespace().to_string(), m.name.clone())) {
                Ok(())
            } else {
                Err(invalid(Invalid::new(
                    "metadata.name",
                    format!("duplicate {kind}"),
                )))
            }
        };
        match (api.as_str(), kind.as_str()) {
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                let d: Doc<RouteSpec> = parse(file, &doc).map_err(at)?;
                first(&d.metadata)?;
                routes.push(compile_route(&d, &hosts).map_err(invalid)?);
                route_kinds.push("HTTPRoute");
            }
            (
                "gateway.networking.k8s.io/v1beta1" | "gateway.networking.k8s.io/v1alpha2",
                "ReferenceGrant",
            ) => {
                let d: Doc<GrantSpec> = parse(file, &doc).map_err(at)?;
                first(&d.metadata)?;
                if d.spec.from.is_empty() || d.spec.to.is_empty() {
                    let f = if d.spec.from.is_empty() {
                        "spec.from"
                    } else {
                        "spec.to"
                    };
                    return Err(invalid(Invalid::new(f, "at least one entry is required")));
                }
                grants.push((d.metadata.namespace().to_string(), d.spec));
            }
            ("gateway.networking.k8s.io/v1alpha2", "TCPRoute") => {
                let d: Doc<TcpRouteSpec> = parse(file, &doc).map_err(at)?;
                first(&d.metadata)?;
                tcp_routes.push((
                    compile_tcp_route(&d, &hosts).map_err(invalid)?,
                    index,
                    start,
                    doc.clone(),
                ));
            }
            (
                "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1alpha2",
                "GRPCRoute",
            ) => {
                let d: Doc<GrpcRouteSpec> = parse(file, &doc).map_err(at)?;
                first(&d.metadata)?;
                let d = grpc_as_http(d).map_err(invalid)?;
                routes.push(compile_route(&d, &hosts).map_err(invalid)?);
                route_kinds.push("GRPCRoute");
            }
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
                let d: Doc<PolicySpec> = parse(file, &doc).map_err(at)?;
                first(&d.metadata)?;
                let policy = compile_policy(&d).map_err(invalid)?;
                if policy.attachment.names_a_class() {
                    classes.push((index, start, doc.clone(), policy.id.namespace.clone()));
                }
                if let Some(name) = &policy.provider {
                    let line = locate(&doc, "spec.provider.name").unwrap_or(1) + start - 1;
                    customs.push(ProviderRef {
                        name: name.clone(),
                        document: index,
                        line,
                        field: "spec.provider.name".into(),
                    });
                }
                let kind = "AuthorizationPolicy";
                match set_aside(
                    file,
                    &doc,
                    start,
                    index,
                    kind,
                    &policy.id,
                    &policy.attachment,
                ) {
                    Some(i) => cfg.ignored_policies.push(i),
                    None => cfg.policies.push(policy),
                }
            }
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "RequestAuthentication") => {
                let d: Doc<RequestAuthnSpec> = parse(file, &doc).map_err(at)?;
                first(&d.metadata)?;
                let authn = compile_request_authn(&d).map_err(invalid)?;
                if authn.attachment.names_a_class() {
                    classes.push((index, start, doc.clone(), authn.id.namespace.clone()));
                }
                let kind = "RequestAuthentication";
                match set_aside(file, &doc, start, index, kind, &authn.id, &authn.attachment) {
                    Some(i) => cfg.ignored_policies.push(i),
                    None => cfg.request_authns.push(authn),
                }
            }
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
                // Checked as the ztunnel's `peerAuthentications[]` are written, then set
                // aside: the destination's ztunnel enforces it.
                let d: Doc<PeerAuthnSpec> = parse(file, &doc).map_err(at)?;
                first(&d.metadata)?;
                let line = locate(&doc, "spec").unwrap_or(1) + start - 1;
                cfg.ignored_policies.push(IgnoredPolicy::warn(
                    file,
                    "PeerAuthentication",
                    d.metadata.id(),
                    index,
                    line,
                    "ztunnel_enforces",
                ));
            }
            ("telemetry.istio.io/v1" | "telemetry.istio.io/v1alpha1", "Telemetry") => {
                let d: Doc<TelemetrySpec> = parse(file, &doc).map_err(at)?;
                first(&d.metadata)?;
                if let Some(rule) = compile_telemetry(&d).map_err(invalid)? {
                    if let Some(name) = rule.tracing.as_ref().and_then(|t| t.provider.clone()) {
                        let line = locate(&doc, "spec.tracing").unwrap_or(1) + start - 1;
                        traced.push(ProviderRef {
                            name,
                            document: index,
                            line,
                            field: "spec.tracing.providers.name".into(),
                        });
                    }
                    for (i, e) in rule.access_log.iter().enumerate() {
                        let f = format!("spec.accessLogging[{i}]");
                        let line = locate(&doc, &f).unwrap_or(1) + start - 1;
                        for (j, name) in e.providers.iter().enumerate() {
                            logged.push(ProviderRef {
                                name: name.clone(),
                                document: index,
                                line,
                                field: format!("{f}.providers[{j}].name"),
                            });
                        }
                    }
                    if rule.attachment.names_a_class() {
                        return Err(invalid(Invalid::new(
                            "spec.targetRefs",
                            "a GatewayClass target is for AuthorizationPolicy and RequestAuthentication",
                        )));
                    }
                    let kind = "Telemetry";
                    let set_aside_now = matches!(rule.attachment, Attachment::Selector(_));
                    match set_aside_now
                        .then(|| {
                            set_aside(file, &doc, start, index, kind, &rule.id, &rule.attachment)
                        })
                        .flatten()
                    {
                        Some(i) => cfg.ignored_policies.push(i),
                        None => cfg.telemetry.push(rule),
                    }
                }
            }
            (
                "networking.istio.io/v1"
                | "networking.istio.io/v1beta1"
                | "networking.istio.io/v1alpha3",
                "VirtualService",
            ) => {
                let d: Doc<virtual_service::VsSpec> = parse(file, &doc).map_err(at)?;
                first(&d.metadata)?;
                let c = virtual_service::compile(&d, &hosts).map_err(invalid)?;
                virtuals.push(VsDoc {
                    route: routes.len(),
                    document: index,
                    start,
                    text: doc.clone(),
                    subsets: c.subsets,
                });
                routes.push(c.route);
                route_kinds.push("VirtualService");
            }
            (
                "networking.istio.io/v1"
                | "networking.istio.io/v1beta1"
                | "networking.istio.io/v1alpha3",
                "DestinationRule",
            ) => {
                let d: Doc<DrSpec> = parse(file, &doc).map_err(at)?;
                let CompiledDr {
                    service: svc,
                    whole: policy,
                    subsets,
                } = compile_dr(&d, &hosts).map_err(invalid)?;
                cfg.subsets.extend(subsets);
                if cfg.destination_rules.insert(svc.clone(), policy).is_some() {
                    return Err(invalid(Invalid::new(
                        "spec.host",
                        format!(
                            "a second DestinationRule for service {}/{}",
                            svc.namespace, svc.name
                        ),
                    )));
                }
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", _)
            | ("telemetry.istio.io/v1" | "telemetry.istio.io/v1alpha1", _)
            | ("security.istio.io/v1" | "security.istio.io/v1beta1", _)
            | ("networking.istio.io/v1" | "networking.istio.io/v1beta1", _)
            | ("networking.istio.io/v1alpha3", _) => {
                return Err(invalid(Invalid::new(
                    "kind",
                    format!("unsupported kind {kind:?} (HTTPRoute, GRPCRoute, TCPRoute, ReferenceGrant, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, VirtualService, DestinationRule, Telemetry)"),
                )));
            }
            _ => {
                return Err(invalid(Invalid::new(
                    "apiVersion",
                    format!("unsupported apiVersion {api:?} for kind {kind:?}"),
                )));
            }
        }
    }
    if let Some((index, start, doc, d)) = mesh_config {
        let p = compile_mesh_config(&d, cfg.mesh.as_ref()).map_err(|e| LoadError {
            file: file.to_owned(),
            document: index,
            line: Some(locate(&doc, &e.field).unwrap_or(1) + start - 1),
            column: None,
            field: Some(e.field),
            message: e.message,
        })?;
        cfg.ext_authz = p.ext_authz;
        cfg.tracing_providers = p.tracing;
        cfg.default_tracing = p.default_tracing;
        cfg.log_providers = p.logs;
        cfg.default_logging = p.default_logging;
    }
    cfg.log_providers
        .entry("envoy".to_string())
        .or_insert_with(|| Arc::new(LogProvider::Builtin));
    check_provider_refs(
        file,
        logged,
        |n| cfg.log_providers.contains_key(n),
        "access log provider",
        "envoy, or MeshConfig extensionProviders of kind envoyFileAccessLog or envoyOtelAls",
    )?;
    check_provider_refs(
        file,
        traced,
        |n| cfg.tracing_providers.contains_key(n),
        "tracing provider",
        "MeshConfig extensionProviders of kind opentelemetry or zipkin",
    )?;
    check_provider_refs(
        file,
        customs,
        |n| cfg.ext_authz.contains_key(n),
        "extension provider",
        "MeshConfig extensionProviders of kind envoyExtAuthzHttp or envoyExtAuthzGrpc",
    )?;
    check_virtual_services(file, &routes, &virtuals, &cfg.subsets)?;
    check_tcp_routes(file, &routes, &tcp_routes)?;
    apply_reference_grants(file, &mut routes, &route_kinds, &mut tcp_routes, &grants);
    check_gateway_classes(file, cfg.settings.as_ref(), &classes)?;
    cfg.generates_cookies = {
        let subsets = cfg.subsets.values().map(|s| &s.policy);
        cfg.destination_rules
            .values()
            .chain(subsets)
            .flat_map(|d| std::iter::once(&d.whole).chain(d.ports.iter().map(|(_, t)| t)))
            .any(|t| {
                matches!(&t.lb.policy, LbPolicy::ConsistentHash(HashKey::Cookie(c)) if c.ttl.is_some())
            })
    };
    cfg.routes = RouteTable::new(routes).with_tcp(tcp_routes.into_iter().map(|t| t.0).collect());
    if let Some(snap) = &cfg.mesh {
        cfg.routes.prebuild_with_model(snap);
    }
    Ok(cfg)
}

/// A VirtualService of the file being loaded, for [`check_virtual_services`].
struct VsDoc {
    /// Its index among the routes.
    route: usize,
    /// Its document (counted from 1) and first line in the file.
    document: usize,
    start: usize,
    text: String,
    /// The subsets it names: (field, service with the subset).
    subsets: Vec<(String, ObjectRef)>,
}

/// A VirtualService is alone on each of its services (no HTTPRoute, no second
/// VirtualService: Istio does not define their mix), and the subsets it names exist.
fn check_virtual_services(
    file: &Path,
    routes: &[HttpRoute],
    virtuals: &[VsDoc],
    subsets: &BTreeMap<ObjectRef, Subset>,
) -> Result<(), LoadError> {
    for v in virtuals {
        let (ri, document, start, doc, named) =
            (&v.route, &v.document, &v.start, &v.text, &v.subsets);
        let fail = |field: String, message: String| LoadError {
            file: file.to_owned(),
            document: *document,
            line: Some(locate(doc, &field).unwrap_or(1) + start - 1),
            column: None,
            field: Some(field),
            message,
        };
        let vs = &routes[*ri];
        for (hi, (svc, _)) in vs.parents.iter().enumerate() {
            let other = routes
                .iter()
                .enumerate()
                .find(|(i, r)| i != ri && r.parents.iter().any(|(p, _)| p == svc));
            if let Some((_, r)) = other {
                let what = if r.in_order {
                    "VirtualService"
                } else {
                    "HTTPRoute or GRPCRoute"
                };
                return Err(fail(
                    format!("spec.hosts[{hi}]"),
                    format!(
                        "service {}/{} also has {what} {}/{} (a service takes one VirtualService, or HTTPRoutes, not both)",
                        svc.namespace, svc.name, r.id.namespace, r.id.name
                    ),
                ));
            }
        }
        for (field, svc) in named {
            if !subsets.contains_key(svc) {
                return Err(fail(
                    field.clone(),
                    format!(
                        "no subset {:?} in a DestinationRule for {}/{}",
                        svc.subset.as_deref().unwrap_or(""),
                        svc.namespace,
                        svc.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Gateway API: a route's backendRef to a Service of another namespace needs a
/// ReferenceGrant there (`grants`: namespace, spec) naming the route's kind and namespace;
/// without one the backend stays in the route (its weight still counts) and is refused,
/// and a RequestMirror to it is dropped, each with a warning. VirtualServices (Istio's
/// API) are not checked.
fn apply_reference_grants(
    file: &Path,
    routes: &mut [HttpRoute],
    kinds: &[&'static str],
    tcp_routes: &mut [(TcpRoute, usize, usize, String)],
    grants: &[(String, GrantSpec)],
) {
    let permitted = |kind: &str, route: &ObjectRef, svc: &ObjectRef| {
        svc.namespace == route.namespace
            || grants.iter().any(|(ns, g)| {
                *ns == svc.namespace
                    && g.from.iter().any(|f| {
                        f.group == "gateway.networking.k8s.io"
                            && f.kind == kind
                            && f.namespace == route.namespace
                    })
                    && g.to.iter().any(|t| {
                        matches!(t.group.as_str(), "" | "core")
                            && t.kind == "Service"
                            && t.name.as_ref().is_none_or(|n| *n == svc.name)
                    })
            })
    };
    let refuse = |kind: &str, route: &ObjectRef, svc: &ObjectRef, what: &str| {
        tracing::warn!(
            file = %file.display(),
            route = %format!("{kind} {}/{}", route.namespace, route.name),
            service = %format!("{}/{}", svc.namespace, svc.name),
            "{what} names a Service of another namespace without a ReferenceGrant there: refused (Gateway API)"
        );
    };
    let check = |kind: &str, route: &ObjectRef, b: &mut Backend| {
        b.permitted = permitted(kind, route, &b.service);
        if !b.permitted {
            refuse(kind, route, &b.service, "a backendRef");
        }
    };
    for (route, kind) in routes.iter_mut().zip(kinds) {
        if *kind == "VirtualService" {
            continue;
        }
        let id = &route.id;
        let keep = |f: &Filter| match f {
            Filter::Mirror(m) if !permitted(kind, id, &m.service) => {
                refuse(kind, id, &m.service, "a RequestMirror");
                false
            }
            _ => true,
        };
        for rule in &mut route.rules {
            rule.filters.retain(keep);
            for b in &mut rule.backends {
                check(kind, id, b);
                b.filters.retain(keep);
            }
        }
    }
    for (t, ..) in tcp_routes {
        for b in &mut t.backends {
            check("TCPRoute", &t.id, b);
        }
    }
}

/// A policy naming a GatewayClass (`classes`: document, first line, text, namespace) must
/// be in the root namespace (the settings document's, else the default).
fn check_gateway_classes(
    file: &Path,
    settings: Option<&SettingsDoc>,
    classes: &[(usize, usize, String, String)],
) -> Result<(), LoadError> {
    let root = settings.map_or_else(default_root_namespace, |s| {
        s.waypoint.root_namespace.clone()
    });
    let Some((document, start, doc, ns)) = classes.iter().find(|c| c.3 != root) else {
        return Ok(());
    };
    let field = "spec.targetRefs".to_string();
    Err(LoadError {
        file: file.to_owned(),
        document: *document,
        line: Some(locate(doc, &field).unwrap_or(1) + start - 1),
        column: None,
        field: Some(field),
        message: format!(
            "a GatewayClass target is for policies of the root namespace {root:?} only (this one is in {ns:?})"
        ),
    })
}

/// The GatewayClass of every waypoint (Istio's `istio-waypoint`).
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// A TCPRoute's port is opaque TCP: no HTTP route may take it for the same clients (one
/// of the same namespace, or a VirtualService, naming the service on that port or on
/// every port).
fn check_tcp_routes(
    file: &Path,
    routes: &[HttpRoute],
    tcp: &[(TcpRoute, usize, usize, String)],
) -> Result<(), LoadError> {
    let overlap = |a: Option<u16>, b: Option<u16>| a.is_none() || b.is_none() || a == b;
    for (t, document, start, doc) in tcp {
        for (pi, (svc, port)) in t.parents.iter().enumerate() {
            let other = routes.iter().find(|r| {
                (r.in_order || r.id.namespace == t.id.namespace)
                    && r.parents
                        .iter()
                        .any(|(p, pp)| p == svc && overlap(*port, *pp))
            });
            if let Some(r) = other {
                let what = if r.in_order {
                    "VirtualService"
                } else {
                    "HTTPRoute or GRPCRoute"
                };
                let field = format!("spec.parentRefs[{pi}]");
                let on = port.map_or("every port".to_string(), |p| format!("port {p}"));
                return Err(LoadError {
                    file: file.to_owned(),
                    document: *document,
                    line: Some(locate(doc, &field).unwrap_or(1) + start - 1),
                    column: None,
                    field: Some(field),
                    message: format!(
                        "service {}/{} on {on} also has {what} {}/{}: a port is TCP (TCPRoute) or HTTP, not both; name the ports in the parentRefs",
                        svc.namespace, svc.name, r.id.namespace, r.id.name
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The line of `field`, or of its nearest enclosing field that is written out (a missing
/// or flow-style field is reported at its parent).
fn locate(doc: &str, field: &str) -> Option<usize> {
    let mut f = field;
    loop {
        if let Some(l) = locate_field(doc, f) {
            return Some(l);
        }
        let cut = f.rfind(['.', '['])?;
        f = &f[..cut];
        if f.is_empty() {
            return None;
        }
    }
}

fn parse<T: DeserializeOwned>(file: &Path, doc: &str) -> Result<T, ConfigError> {
    runtime::config::from_yaml_str(file, doc)
}

// ---------------------------------------------------------------- settings document

/// The settings document: the waypoint's own section plus optional runtime/h2 knobs that
/// replace the tuning profile's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsDoc {
    pub waypoint: WaypointSection,
    #[serde(default)]
    pub runtime: Option<runtime::config::RuntimeConfig>,
    #[serde(default)]
    pub h2: Option<hbone::H2Settings>,
}

/// `waypoint:` — see the crate docs for each field.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaypointSection {
    /// The HBONE listener (default `0.0.0.0:15008`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The address the model's bindings use for this waypoint (default: `listen`).
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// `namespace/name` of the waypoint (Gateway) in the model.
    pub gateway: String,
    /// This waypoint's SPIFFE identity.
    pub identity: String,
    #[serde(with = "serde_norway::with::singleton_map")]
    pub ca: hbone::proxy::CaConfig,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// `/stats/prometheus` and `/healthz/ready` (off when unset).
    #[serde(default)]
    pub stats: Option<SocketAddr>,
    /// HTTP proxies in front of the mesh that append to `X-Forwarded-For` (Istio's
    /// `numTrustedProxies`, default 0): with N > 0, `remote.ip` / `remoteIpBlocks` read the
    /// Nth address from the right of `X-Forwarded-For` (the peer when there are fewer);
    /// with 0 the header is never read for policy.
    #[serde(default)]
    pub num_trusted_proxies: u32,
    /// The ztunnel identity whose CONNECT `forwarded: for=` is believed for any client (a
    /// hairpin, R12; default `spiffe://<trust domain of identity>/ns/istio-system/sa/
    /// ztunnel`). Parsed once, into [`WaypointConfig::ztunnel_identity`]. See
    /// `crate::source`.
    #[serde(default)]
    pub ztunnel_identity: Option<String>,
    /// A request with no byte moving either way for this long ends (Envoy's
    /// `stream_idle_timeout`, default 5 min; `0s`: none). See [`TunnelTimeouts`].
    #[serde(default = "default_stream_idle", with = "runtime::config::duration")]
    pub stream_idle_timeout: Duration,
    /// A request head must be complete this long after its first byte (default 10 s,
    /// `0s`: none): else `408` and the tunnel is closed.
    #[serde(
        default = "default_request_headers",
        with = "runtime::config::duration"
    )]
    pub request_headers_timeout: Duration,
    /// A tunnel with no request in flight is closed after this long (Envoy's HCM
    /// `idle_timeout`, default 1 h; `0s`: none).
    #[serde(default = "default_idle", with = "runtime::config::duration")]
    pub idle_timeout: Duration,
    /// How long a silent client is waited for before its tunnel is taken for opaque TCP
    /// (a server-first protocol). Default `0s`, as Istio's `protocolDetectionTimeout`:
    /// the first bytes decide, however late (a tunnel silent for `idle_timeout` is
    /// closed).
    #[serde(default, with = "runtime::config::duration")]
    pub protocol_detection_timeout: Duration,
    /// How often key sets fetched for RequestAuthentication (`jwksUri`, OpenID
    /// discovery) are fetched again (default 20 min, istiod's
    /// `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`). See [`crate::jwks`].
    #[serde(default = "default_jwks_refresh", with = "runtime::config::duration")]
    pub jwks_refresh: Duration,
    /// PEM roots trusted for `https://` key sets instead of the system's (a private
    /// identity provider).
    #[serde(default)]
    pub jwks_ca: Option<PathBuf>,
    /// How often the host names `DNS` ServiceEntries were built from are looked up again;
    /// an answer that changed reloads the file (default 60 s, Istio's `dnsRefreshRate`;
    /// `0s`: only when the file is loaded).
    #[serde(default = "default_dns_refresh", with = "runtime::config::duration")]
    pub dns_refresh: Duration,
    /// Whether requests no Telemetry `accessLogging` applies to are logged.
    #[serde(default = "yes")]
    pub access_log: bool,
}

fn yes() -> bool {
    true
}

fn default_jwks_refresh() -> Duration {
    jwks::REFRESH
}

/// Istio's `dnsRefreshRate` default.
pub const DNS_REFRESH: Duration = Duration::from_secs(60);

fn default_dns_refresh() -> Duration {
    DNS_REFRESH
}

/// The waypoint's own bounds on a tunnel's waits (the settings document's
/// `stream_idle_timeout`, `request_headers_timeout`, `idle_timeout` and
/// `protocol_detection_timeout`; `None` where `0s` turned one off). Route `timeouts`
/// bound a request further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelTimeouts {
    pub stream_idle: Option<Duration>,
    pub request_headers: Option<Duration>,
    pub idle: Option<Duration>,
    pub protocol_detection: Option<Duration>,
}

impl Default for TunnelTimeouts {
    fn default() -> Self {
        let on = |d: Duration| Some(d).filter(|d| !d.is_zero());
        TunnelTimeouts {
            stream_idle: on(default_stream_idle()),
            request_headers: on(default_request_headers()),
            idle: on(default_idle()),
            protocol_detection: None,
        }
    }
}

fn default_stream_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_request_headers() -> Duration {
    Duration::from_secs(10)
}
fn default_idle() -> Duration {
    Duration::from_secs(3600)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], mesh_model::model::HBONE_PORT))
}
fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_root_namespace() -> String {
    "istio-system".into()
}

impl SettingsDoc {
    /// Check the document; the ztunnel identity it trusts, parsed once here.
    fn validate(&self) -> Result<ZtunnelIdentity, Invalid> {
        self.identity()?;
        self.gateway()?;
        let ztunnel = self.ztunnel()?;
        if let Some(r) = &self.runtime {
            r.validate("runtime")?;
        }
        if let Some(h) = &self.h2 {
            h.validate()?;
        }
        Ok(ztunnel)
    }

    pub fn identity(&self) -> Result<hbone::Identity, Invalid> {
        self.waypoint
            .identity
            .parse()
            .map_err(|e: mesh_model::identity::IdentityError| {
                Invalid::new("waypoint.identity", e.to_string())
            })
    }

    /// `waypoint.ztunnel_identity`, when set.
    pub fn ztunnel_identity(&self) -> Result<Option<hbone::Identity>, Invalid> {
        self.waypoint
            .ztunnel_identity
            .as_deref()
            .map(|s| {
                s.parse().map_err(|e: mesh_model::identity::IdentityError| {
                    Invalid::new("waypoint.ztunnel_identity", e.to_string())
                })
            })
            .transpose()
    }

    /// The ztunnel identity this document trusts ([`ZtunnelIdentity`]): its
    /// `ztunnel_identity`, else Istio's ztunnel in the trust domain of its `identity`.
    pub fn ztunnel(&self) -> Result<ZtunnelIdentity, Invalid> {
        Ok(match self.ztunnel_identity()? {
            Some(z) => ZtunnelIdentity(z),
            None => ZtunnelIdentity::istio_default(&self.identity()?.trust_domain),
        })
    }

    pub fn gateway(&self) -> Result<ObjectRef, Invalid> {
        let (ns, name) = self
            .waypoint
            .gateway
            .split_once('/')
            .filter(|(n, m)| !n.is_empty() && !m.is_empty() && !m.contains('/'))
            .ok_or_else(|| Invalid::new("waypoint.gateway", "expected namespace/name"))?;
        Ok(ObjectRef::new(ns, name))
    }
}

// ---------------------------------------------------------------- raw documents

/// Just enough to dispatch a document.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    /// Present only in the settings document.
    #[serde(default)]
    waypoint: Option<serde::de::IgnoredAny>,
    /// Present only in the MeshConfig document.
    #[serde(default)]
    mesh_config: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Doc<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: S,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: BTreeMap<String, String>,
}

impl Metadata {
    fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    fn id(&self) -> ObjectRef {
        ObjectRef::new(self.namespace(), &self.name)
    }
}

// GRPCRoute ---------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcRouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<GrpcRuleRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcRuleRaw {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<GrpcMatchRaw>,
    #[serde(default)]
    filters: Vec<FilterRaw>,
    #[serde(default)]
    backend_refs: Vec<BackendRefRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcMatchRaw {
    #[serde(default)]
    method: Option<GrpcMethodRaw>,
    #[serde(default)]
    headers: Vec<ValueMatchRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcMethodRaw {
    #[serde(default, rename = "type")]
    kind: ValueType,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    method: Option<String>,
}

/// A GRPCRoute as the HTTPRoute it means (Gateway API `grpcroute_types.go`): a gRPC call
/// is `POST /<service>/<method>`, so a method match is a path match: service and method
/// `Exact` → that path; service alone → the path prefix `/<service>`; method alone →
/// `/<any service>/<method>`; `RegularExpression` → `/<service re>/<method re>` (either
/// defaulting to one segment); no method match → every path. Header matches, backendRefs
/// and the filters a GRPCRoute allows (RequestHeaderModifier, ResponseHeaderModifier,
/// RequestMirror) carry over as they are, and the precedence is HTTPRoute's (an exact
/// method beats a service alone, then the most header matches).
fn grpc_as_http(d: Doc<GrpcRouteSpec>) -> Result<Doc<RouteSpec>, Invalid> {
    // A protobuf identifier; a service is a dotted run of them (an optional leading dot).
    let method_ok = |m: &str| {
        m.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    let service_ok = |s: &str| s.strip_prefix('.').unwrap_or(s).split('.').all(method_ok);
    let mut rules = Vec::with_capacity(d.spec.rules.len());
    for (ri, r) in d.spec.rules.into_iter().enumerate() {
        for (fi, f) in r.filters.iter().enumerate() {
            if matches!(
                f.kind,
                FilterType::RequestRedirect | FilterType::UrlRewrite | FilterType::Cors
            ) {
                return Err(Invalid::new(
                    format!("spec.rules[{ri}].filters[{fi}].type"),
                    "not a GRPCRoute filter (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror)",
                ));
            }
        }
        let mut matches = Vec::with_capacity(r.matches.len());
        for (mi, m) in r.matches.into_iter().enumerate() {
            let mf = format!("spec.rules[{ri}].matches[{mi}].method");
            let path = match m.method {
                None => None,
                Some(GrpcMethodRaw {
                    service: None,
                    method: None,
                    ..
                }) => return Err(Invalid::new(mf, "one of service and method is required")),
                Some(x) => {
                    Some(match x.kind {
                        ValueType::Exact => {
                            if let Some(s) = x.service.as_deref().filter(|s| !service_ok(s)) {
                                return Err(Invalid::new(
                                format!("{mf}.service"),
                                format!("{s:?} is not a gRPC service name (e.g. helloworld.Greeter)"),
                            ));
                            }
                            if let Some(m) = x.method.as_deref().filter(|m| !method_ok(m)) {
                                return Err(Invalid::new(
                                    format!("{mf}.method"),
                                    format!("{m:?} is not a gRPC method name (e.g. SayHello)"),
                                ));
                            }
                            match (x.service, x.method) {
                                (Some(s), Some(m)) => PathRaw {
                                    kind: PathType::Exact,
                                    value: Some(format!("/{s}/{m}")),
                                },
                                (Some(s), None) => PathRaw {
                                    kind: PathType::PathPrefix,
                                    value: Some(format!("/{s}")),
                                },
                                (None, m) => PathRaw {
                                    kind: PathType::RegularExpression,
                                    value: Some(format!(
                                        "/[^/]+/{}",
                                        regex::escape(m.as_deref().unwrap_or_default())
                                    )),
                                },
                            }
                        }
                        ValueType::RegularExpression => {
                            // Each checked on its own, so that an error names its field.
                            for (f, re) in [("service", &x.service), ("method", &x.method)] {
                                if let Some(re) = re {
                                    anchored(&format!("{mf}.{f}"), re)?;
                                }
                            }
                            PathRaw {
                                kind: PathType::RegularExpression,
                                value: Some(format!(
                                    "/(?:{})/(?:{})",
                                    x.service.as_deref().unwrap_or("[^/]+"),
                                    x.method.as_deref().unwrap_or("[^/]+")
                                )),
                            }
                        }
                    })
                }
            };
            matches.push(MatchRaw {
                path,
                headers: m.headers,
                query_params: vec![],
                method: None,
            });
        }
        rules.push(RuleRaw {
            name: r.name,
            matches,
            filters: r.filters,
            backend_refs: r.backend_refs,
            timeouts: None,
            retry: None,
        });
    }
    Ok(Doc {
        api_version: d.api_version,
        kind: d.kind,
        metadata: d.metadata,
        spec: RouteSpec {
            parent_refs: d.spec.parent_refs,
            hostnames: d.spec.hostnames,
            rules,
        },
    })
}

// HTTPRoute ---------------------------------------------------------------

/// `ReferenceGrant.spec` (Gateway API): who (`from`: group, kind, namespace) may name what
/// (`to`: group, kind, optionally name) in the grant's namespace.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSpec {
    #[serde(default)]
    from: Vec<GrantFrom>,
    #[serde(default)]
    to: Vec<GrantTo>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFrom {
    group: String,
    kind: String,
    namespace: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantTo {
    group: String,
    kind: String,
    #[serde(default)]
    name: Option<String>,
}

/// `PeerAuthentication.spec` (as mesh-model reads it for ztunnel).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PeerAuthnSpec {
    #[serde(default)]
    #[allow(dead_code)]
    selector: Option<SelectorRaw>,
    #[serde(default)]
    #[allow(dead_code)]
    mtls: Option<mesh_model::config::Mtls>,
    #[serde(default)]
    #[allow(dead_code)]
    port_level_mtls: BTreeMap<u16, mesh_model::config::Mtls>,
}

/// `TCPRoute.spec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpRouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    rules: Vec<TcpRuleRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpRuleRaw {
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    /// `filters` are refused: a TCPRoute's `BackendRef` has none.
    #[serde(default)]
    backend_refs: Vec<BackendRefRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<RuleRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ParentRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleRaw {
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<MatchRaw>,
    #[serde(default)]
    filters: Vec<FilterRaw>,
    #[serde(default)]
    backend_refs: Vec<BackendRefRaw>,
    #[serde(default)]
    timeouts: Option<TimeoutsRaw>,
    #[serde(default)]
    retry: Option<RetryRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MatchRaw {
    #[serde(default)]
    path: Option<PathRaw>,
    #[serde(default)]
    headers: Vec<ValueMatchRaw>,
    #[serde(default)]
    query_params: Vec<ValueMatchRaw>,
    #[serde(default)]
    method: Option<Method>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
enum PathType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathRaw {
    #[serde(default, rename = "type")]
    kind: PathType,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
enum ValueType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ValueMatchRaw {
    #[serde(default, rename = "type")]
    kind: ValueType,
    name: String,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
    #[serde(rename = "CORS")]
    Cors,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilterRaw {
    #[serde(rename = "type")]
    kind: FilterType,
    #[serde(default)]
    request_header_modifier: Option<HeaderModRaw>,
    #[serde(default)]
    response_header_modifier: Option<HeaderModRaw>,
    #[serde(default)]
    request_redirect: Option<RedirectRaw>,
    #[serde(default, rename = "urlRewrite")]
    url_rewrite: Option<RewriteRaw>,
    #[serde(default)]
    request_mirror: Option<MirrorRaw>,
    #[serde(default)]
    cors: Option<CorsFilterRaw>,
}

/// Gateway API `HTTPCORSFilter`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CorsFilterRaw {
    #[serde(default)]
    allow_origins: Vec<String>,
    #[serde(default)]
    allow_credentials: Option<bool>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    /// Seconds; the spec's default is 5.
    #[serde(default)]
    max_age: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderModRaw {
    #[serde(default)]
    set: Vec<NameValue>,
    #[serde(default)]
    add: Vec<NameValue>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum PathModType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathModRaw {
    #[serde(rename = "type")]
    kind: PathModType,
    #[serde(default)]
    replace_full_path: Option<String>,
    #[serde(default)]
    replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RedirectRaw {
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<PathModRaw>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    status_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RewriteRaw {
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<PathModRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BackendObjRaw {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MirrorRaw {
    backend_ref: BackendObjRaw,
    #[serde(default)]
    percent: Option<u32>,
    #[serde(default)]
    fraction: Option<FractionRaw>,
}

/// Gateway API `Fraction` (`denominator` defaults to 100).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FractionRaw {
    numerator: u32,
    #[serde(default)]
    denominator: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BackendRefRaw {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    filters: Vec<FilterRaw>,
}

/// The object a `backendRef` (or a mirror's) names, as [`service_ref`] reads it.
struct RefFields<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    name: &'a str,
    namespace: Option<&'a str>,
    port: Option<u16>,
}

impl BackendRefRaw {
    fn fields(&self) -> RefFields<'_> {
        RefFields {
            group: self.group.as_deref(),
            kind: self.kind.as_deref(),
            name: &self.name,
            namespace: self.namespace.as_deref(),
            port: self.port,
        }
    }
}

impl BackendObjRaw {
    fn fields(&self) -> RefFields<'_> {
        RefFields {
            group: self.group.as_deref(),
            kind: self.kind.as_deref(),
            name: &self.name,
            namespace: self.namespace.as_deref(),
            port: self.port,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TimeoutsRaw {
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetryRaw {
    #[serde(default)]
    codes: Vec<u16>,
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    backoff: Option<String>,
}

/// Gateway API durations: `1h`, `30m`, `10s`, `500ms`, combined (`1m30s`); `0s` disables.
pub fn gateway_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (Gateway API form: 1h, 30m, 10s, 500ms, 1m30s)");
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if n_end == 0 || n_end > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..n_end].parse().map_err(|_| bad())?;
        rest = &rest[n_end..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * n as u32;
    }
    Ok(total)
}

fn anchored(field: &str, re: &str) -> Result<Regex, Invalid> {
    Regex::new(&format!("^(?:{re})$"))
        .map_err(|e| Invalid::new(field, format!("invalid regular expression: {e}")))
}

fn service_ref(
    field: &str,
    r: RefFields<'_>,
    default_ns: &str,
    hosts: &Hosts,
) -> Result<(ObjectRef, u16), Invalid> {
    let RefFields {
        group,
        kind,
        name,
        namespace,
        port,
    } = r;
    // A ServiceEntry is the service it converts to, of the same name (as Istio takes
    // `kind: ServiceEntry` backends); a `Hostname` (Istio's egress routes) is the service
    // of the mesh model with that hostname.
    let hostname = match (group.unwrap_or(""), kind.unwrap_or("Service")) {
        ("", "Service") | ("networking.istio.io", "ServiceEntry") => false,
        ("networking.istio.io", "Hostname") => true,
        _ => {
            return Err(Invalid::new(
                field,
                "only Services (group \"\", kind Service), ServiceEntries and Hostnames (group networking.istio.io) can be backends",
            ))
        }
    };
    let port =
        port.ok_or_else(|| Invalid::new(format!("{field}.port"), "required for a Service"))?;
    let ns = namespace.unwrap_or(default_ns);
    if hostname {
        let svc = hosts.find(name, ns).ok_or_else(|| {
            Invalid::new(
                format!("{field}.name"),
                format!("{name:?}: no service of the mesh model has this hostname (a ServiceEntry's host)"),
            )
        })?;
        return Ok((svc, port));
    }
    Ok((ObjectRef::new(ns, name), port))
}

/// An HTTPRoute `CORS` filter at field `f`: origins as `scheme://host[:port]`, a `*` in the
/// host standing for any run of characters other than `/`, a lone `*` for any origin.
fn gateway_cors(f: &str, c: &CorsFilterRaw) -> Result<Filter, Invalid> {
    let mut origins = vec![];
    for (i, o) in c.allow_origins.iter().enumerate() {
        origins.push(if o == "*" || !o.contains('*') {
            ValueMatch::Exact(o.clone())
        } else {
            let parts: Vec<String> = o.split('*').map(regex::escape).collect();
            let re = Regex::new(&format!("^(?:{})$", parts.join("[^/]+")))
                .map_err(|e| Invalid::new(format!("{f}.allowOrigins[{i}]"), e.to_string()))?;
            ValueMatch::Regex(re)
        });
    }
    Ok(Filter::Cors(Arc::new(Cors {
        origins,
        methods: c.allow_methods.join(","),
        headers: c.allow_headers.join(","),
        expose: c.expose_headers.join(","),
        max_age: c.max_age.unwrap_or(5).to_string(),
        credentials: c.allow_credentials == Some(true),
        forward_unmatched: true,
    })))
}

fn header_mod(h: &HeaderModRaw) -> HeaderModifier {
    let pairs = |v: &[NameValue]| {
        v.iter()
            .map(|nv| (nv.name.clone(), nv.value.clone()))
            .collect()
    };
    HeaderModifier {
        set: pairs(&h.set),
        add: pairs(&h.add),
        remove: h.remove.clone(),
    }
}

fn path_mod(field: &str, p: &PathModRaw) -> Result<PathModifier, Invalid> {
    match (p.kind, &p.replace_full_path, &p.replace_prefix_match) {
        (PathModType::ReplaceFullPath, Some(f), None) => {
            Ok(PathModifier::ReplaceFullPath(f.clone()))
        }
        (PathModType::ReplacePrefixMatch, None, Some(f)) => {
            Ok(PathModifier::ReplacePrefixMatch(f.clone()))
        }
        (PathModType::ReplaceFullPath, ..) => Err(Invalid::new(
            format!("{field}.replaceFullPath"),
            "required (and only it) with type ReplaceFullPath",
        )),
        (PathModType::ReplacePrefixMatch, ..) => Err(Invalid::new(
            format!("{field}.replacePrefixMatch"),
            "required (and only it) with type ReplacePrefixMatch",
        )),
    }
}

fn compile_filters(
    field: &str,
    raw: &[FilterRaw],
    backend_level: bool,
    ns: &str,
    hosts: &Hosts,
) -> Result<Vec<Filter>, Invalid> {
    let mut out = vec![];
    for (i, f) in raw.iter().enumerate() {
        let fld = format!("{field}[{i}]");
        let present = [
            (
                FilterType::RequestHeaderModifier,
                f.request_header_modifier.is_some(),
            ),
            (
                FilterType::ResponseHeaderModifier,
                f.response_header_modifier.is_some(),
            ),
            (FilterType::RequestRedirect, f.request_redirect.is_some()),
            (FilterType::UrlRewrite, f.url_rewrite.is_some()),
            (FilterType::RequestMirror, f.request_mirror.is_some()),
            (FilterType::Cors, f.cors.is_some()),
        ];
        if present.iter().any(|(t, p)| *p != (*t == f.kind)) {
            return Err(Invalid::new(
                &fld,
                format!(
                    "type {:?} needs its own field and no other filter's",
                    f.kind
                ),
            ));
        }
        let filter = match f.kind {
            FilterType::RequestHeaderModifier => Filter::RequestHeader(header_mod(
                f.request_header_modifier.as_ref().expect("checked"),
            )),
            FilterType::ResponseHeaderModifier => Filter::ResponseHeader(header_mod(
                f.response_header_modifier.as_ref().expect("checked"),
            )),
            FilterType::RequestRedirect => {
                if backend_level {
                    return Err(Invalid::new(
                        &fld,
                        "RequestRedirect is not supported in backendRefs filters",
                    ));
                }
                let r = f.request_redirect.as_ref().expect("checked");
                let status_code = r.status_code.unwrap_or(302);
                if !matches!(status_code, 301 | 302 | 303 | 307 | 308) {
                    return Err(Invalid::new(
                        format!("{fld}.requestRedirect.statusCode"),
                        "must be 301, 302, 303, 307 or 308",
                    ));
                }
                if let Some(s) = &r.scheme {
                    if s != "http" && s != "https" {
                        return Err(Invalid::new(
                            format!("{fld}.requestRedirect.scheme"),
                            "must be http or https",
                        ));
                    }
                }
                Filter::Redirect(Redirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_mod(&format!("{fld}.requestRedirect.path"), p))
                        .transpose()?,
                    port: r.port,
                    status_code,
                })
            }
            FilterType::UrlRewrite => {
                let r = f.url_rewrite.as_ref().expect("checked");
                Filter::Rewrite(Rewrite {
                    hostname: r.hostname.clone(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_mod(&format!("{fld}.urlRewrite.path"), p))
                        .transpose()?,
                })
            }
            FilterType::Cors => {
                if backend_level {
                    return Err(Invalid::new(
                        format!("{fld}.type"),
                        "CORS is a rule filter, not a backend one",
                    ));
                }
                gateway_cors(&format!("{fld}.cors"), f.cors.as_ref().expect("checked"))?
            }
            FilterType::RequestMirror => {
                let m = f.request_mirror.as_ref().expect("checked");
                let b = &m.backend_ref;
                let (service, port) = service_ref(
                    &format!("{fld}.requestMirror.backendRef"),
                    b.fields(),
                    ns,
                    hosts,
                )?;
                let mf = format!("{fld}.requestMirror");
                let (numerator, denominator) = match (m.percent, &m.fraction) {
                    (Some(_), Some(_)) => {
                        return Err(Invalid::new(
                            mf,
                            "percent and fraction are exclusive (give one)",
                        ))
                    }
                    (Some(p), None) if p > 100 => {
                        return Err(Invalid::new(format!("{mf}.percent"), "must be 0–100"))
                    }
                    (Some(p), None) => (p, 100),
                    (None, Some(f)) => {
                        let d = f.denominator.unwrap_or(100);
                        if d == 0 {
                            return Err(Invalid::new(
                                format!("{mf}.fraction.denominator"),
                                "must be more than 0",
                            ));
                        }
                        if f.numerator > d {
                            return Err(Invalid::new(
                                format!("{mf}.fraction.numerator"),
                                "must not exceed the denominator",
                            ));
                        }
                        (f.numerator, d)
                    }
                    (None, None) => (1, 1),
                };
                Filter::Mirror(Mirror {
                    service,
                    port,
                    numerator,
                    denominator,
                })
            }
        };
        out.push(filter);
    }
    Ok(out)
}

/// `metadata.creationTimestamp`, checked (RFC 3339 UTC, compared as text).
fn creation_timestamp(m: &Metadata) -> Result<Option<String>, Invalid> {
    if let Some(ts) = &m.creation_timestamp {
        let ok = ts.len() == 20
            && ts.ends_with('Z')
            && ts.as_bytes()[10] == b'T'
            && ts.chars().filter(|c| c.is_ascii_digit()).count() == 14;
        if !ok {
            return Err(Invalid::new(
                "metadata.creationTimestamp",
                "expected RFC 3339 UTC, e.g. 2024-05-01T12:00:00Z",
            ));
        }
    }
    Ok(m.creation_timestamp.clone())
}

/// A route's `parentRefs`, which must all be Services (GAMMA), in the route's namespace
/// `ns` unless they name another.
fn service_parents(refs: &[ParentRef], ns: &str) -> Result<Vec<(ObjectRef, Option<u16>)>, Invalid> {
    let mut parents = vec![];
    for (i, p) in refs.iter().enumerate() {
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        // A ServiceEntry is the service it converts to, of the same name (Istio's egress
        // routes attach to one).
        if !matches!(
            (group, kind),
            ("", "Service") | ("networking.istio.io", "ServiceEntry")
        ) {
            return Err(Invalid::new(
                format!("spec.parentRefs[{i}]"),
                format!(
                    "the waypoint routes only for Services (group \"\", kind Service) and ServiceEntries (group networking.istio.io), not group {group:?} kind {kind:?}"
                ),
            ));
        }
        let pns = p.namespace.as_deref().unwrap_or(ns);
        parents.push((ObjectRef::new(pns, &p.name), p.port));
    }
    Ok(parents)
}

/// A `TCPRoute` (Gateway API `tcproute_types.go`): one rule of weighted Service backends.
fn compile_tcp_route(d: &Doc<TcpRouteSpec>, hosts: &Hosts) -> Result<TcpRoute, Invalid> {
    let ns = d.metadata.namespace();
    let created = creation_timestamp(&d.metadata)?;
    let parents = service_parents(&d.spec.parent_refs, ns)?;
    let rule = match &d.spec.rules[..] {
        [rule] => rule,
        [] => return Err(Invalid::new("spec.rules", "one rule is required")),
        [_, ..] => {
            return Err(Invalid::new(
                "spec.rules[1]",
                "a TCPRoute with more than one rule is not supported (a TCP connection has \
                 nothing to match a rule by): put every backend in one rule",
            ))
        }
    };
    let mut backends = vec![];
    for (bi, b) in rule.backend_refs.iter().enumerate() {
        let bf = format!("spec.rules[0].backendRefs[{bi}]");
        if !b.filters.is_empty() {
            return Err(Invalid::new(
                format!("{bf}.filters"),
                "a TCPRoute backendRef has no filters",
            ));
        }
        let (service, port) = service_ref(&bf, b.fields(), ns, hosts)?;
        backends.push(Backend {
            service,
            port,
            weight: b.weight.unwrap_or(1),
            filters: vec![],
            // Checked against the ReferenceGrants once all are read.
            permitted: true,
        });
    }
    Ok(TcpRoute {
        id: d.metadata.id(),
        created,
        parents,
        backends,
    })
}

fn compile_route(d: &Doc<RouteSpec>, hosts: &Hosts) -> Result<HttpRoute, Invalid> {
    let ns = d.metadata.namespace();
    if !d.spec.hostnames.is_empty() {
        return Err(Invalid::new(
            "spec.hostnames",
            "not supported for Service parents (GAMMA routes match every host)",
        ));
    }
    let created = creation_timestamp(&d.metadata)?;
    let parents = service_parents(&d.spec.parent_refs, ns)?;
    let mut rules = vec![];
    for (ri, r) in d.spec.rules.iter().enumerate() {
        let rf = format!("spec.rules[{ri}]");
        let mut matches = vec![];
        for (mi, m) in r.matches.iter().enumerate() {
            let mf = format!("{rf}.matches[{mi}]");
            let path = match &m.path {
                None => PathMatch::Prefix("/".into()),
                Some(p) => {
                    let v = p.value.clone().unwrap_or_else(|| "/".into());
                    match p.kind {
                        PathType::Exact | PathType::PathPrefix if !v.starts_with('/') => {
                            return Err(Invalid::new(
                                format!("{mf}.path.value"),
                                "must start with /",
                            ))
                        }
                        PathType::Exact => PathMatch::Exact(v),
                        PathType::PathPrefix => PathMatch::Prefix(v),
                        PathType::RegularExpression => {
                            PathMatch::Regex(anchored(&format!("{mf}.path.value"), &v)?)
                        }
                    }
                }
            };
            let values = |list: &[ValueMatchRaw], what: &str, lower: bool| {
                let mut out: Vec<(String, ValueMatch)> = vec![];
                for (i, h) in list.iter().enumerate() {
                    let name = if lower {
                        h.name.to_ascii_lowercase()
                    } else {
                        h.name.clone()
                    };
                    if out.iter().any(|(n, _)| *n == name) {
                        return Err(Invalid::new(
                            format!("{mf}.{what}[{i}].name"),
                            "duplicate name in one match",
                        ));
                    }
                    let vm = match h.kind {
                        ValueType::Exact => ValueMatch::Exact(h.value.clone()),
                        ValueType::RegularExpression => ValueMatch::Regex(anchored(
                            &format!("{mf}.{what}[{i}].value"),
                            &h.value,
                        )?),
                    };
                    out.push((name, vm));
                }
                Ok(out)
            };
            matches.push(RouteMatch {
                path,
                headers: values(&m.headers, "headers", true)?,
                query: values(&m.query_params, "queryParams", false)?,
                method: m.method.map(|x| format!("{x:?}").to_ascii_uppercase()),
                more: None,
            });
        }
        if matches.is_empty() {
            matches.push(RouteMatch::default());
        }
        let filters = compile_filters(&format!("{rf}.filters"), &r.filters, false, ns, hosts)?;
        let has = |f: fn(&Filter) -> bool| filters.iter().any(f);
        if has(|f| matches!(f, Filter::Redirect(_))) && has(|f| matches!(f, Filter::Rewrite(_))) {
            return Err(Invalid::new(
                format!("{rf}.filters"),
                "RequestRedirect and URLRewrite cannot be combined",
            ));
        }
        let mut backends = vec![];
        for (bi, b) in r.backend_refs.iter().enumerate() {
            let bf = format!("{rf}.backendRefs[{bi}]");
            let (service, port) = service_ref(&bf, b.fields(), ns, hosts)?;
            let bfilters = compile_filters(&format!("{bf}.filters"), &b.filters, true, ns, hosts)?;
            backends.push(Backend {
                service,
                port,
                weight: b.weight.unwrap_or(1),
                filters: bfilters,
                // Checked against the ReferenceGrants once all are read.
                permitted: true,
            });
        }
        let prefix_mod = filters
            .iter()
            .chain(backends.iter().flat_map(|b| &b.filters))
            .any(|f| {
                matches!(
                    f,
                    Filter::Redirect(Redirect {
                        path: Some(PathModifier::ReplacePrefixMatch(_)),
                        ..
                    }) | Filter::Rewrite(Rewrite {
                        path: Some(PathModifier::ReplacePrefixMatch(_)),
                        ..
                    })
                )
            });
        if prefix_mod
            && matches
                .iter()
                .any(|m| !matches!(m.path, PathMatch::Prefix(_)))
        {
            return Err(Invalid::new(
                format!("{rf}.filters"),
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
            ));
        }
        let mut timeouts = Timeouts::default();
        if let Some(t) = &r.timeouts {
            let dur = |v: &Option<String>, f: &str| {
                v.as_deref()
                    .map(gateway_duration)
                    .transpose()
                    .map(|d| d.filter(|d| !d.is_zero()))
                    .map_err(|e| Invalid::new(format!("{rf}.timeouts.{f}"), e))
            };
            timeouts.request = dur(&t.request, "request")?;
            timeouts.backend_request = dur(&t.backend_request, "backendRequest")?;
            if let (Some(r), Some(b)) = (timeouts.request, timeouts.backend_request) {
                if b > r {
                    return Err(Invalid::new(
                        format!("{rf}.timeouts.backendRequest"),
                        "must not exceed timeouts.request",
                    ));
                }
            }
        }
        let retry = r
            .retry
            .as_ref()
            .map(|x| -> Result<Retry, Invalid> {
                for (i, c) in x.codes.iter().enumerate() {
                    if !(400..600).contains(c) {
                        return Err(Invalid::new(
                            format!("{rf}.retry.codes[{i}]"),
                            "must be a 4xx or 5xx status",
                        ));
                    }
                }
                Ok(Retry {
                    codes: x.codes.clone(),
                    grpc: vec![],
                    attempts: x.attempts.unwrap_or(1),
                    backoff: x
                        .backoff
                        .as_deref()
                        .map(gateway_duration)
                        .transpose()
                        .map_err(|e| Invalid::new(format!("{rf}.retry.backoff"), e))?,
                })
            })
            .transpose()?;
        rules.push(Rule {
            matches,
            filters,
            backends,
            timeouts,
            retry,
        });
    }
    Ok(HttpRoute {
        id: d.metadata.id(),
        created,
        in_order: false,
        parents,
        rules,
    })
}

// AuthorizationPolicy -----------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PolicySpec {
    #[serde(default)]
    selector: Option<SelectorRaw>,
    #[serde(default)]
    target_ref: Option<TargetRefRaw>,
    #[serde(default)]
    target_refs: Vec<TargetRefRaw>,
    #[serde(default)]
    action: ActionRaw,
    #[serde(default)]
    provider: Option<ProviderRefRaw>,
    #[serde(default)]
    rules: Vec<PolicyRuleRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderRefRaw {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SelectorRaw {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TargetRefRaw {
    #[serde(default)]
    group: Option<String>,
    kind: String,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum ActionRaw {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PolicyRuleRaw {
    #[serde(default)]
    from: Vec<FromRaw>,
    #[serde(default)]
    to: Vec<ToRaw>,
    #[serde(default)]
    when: Vec<ConditionRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FromRaw {
    source: SourceRaw,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToRaw {
    operation: OperationRaw,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SourceRaw {
    principals: Option<Vec<String>>,
    not_principals: Option<Vec<String>>,
    request_principals: Option<Vec<String>>,
    not_request_principals: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    not_namespaces: Option<Vec<String>>,
    ip_blocks: Option<Vec<Cidr>>,
    not_ip_blocks: Option<Vec<Cidr>>,
    remote_ip_blocks: Option<Vec<Cidr>>,
    not_remote_ip_blocks: Option<Vec<Cidr>>,
}

/// Ports as users write them: `"8080"` (Istio's form) or `8080`.
#[derive(Debug, Clone, Copy)]
struct PortRaw(u16);

impl<'de> Deserialize<'de> for PortRaw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(PortRaw(n)),
            Raw::S(s) => s
                .parse()
                .map(PortRaw)
                .map_err(|_| serde::de::Error::custom(format!("invalid port {s:?}"))),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OperationRaw {
    hosts: Option<Vec<String>>,
    not_hosts: Option<Vec<String>>,
    ports: Option<Vec<PortRaw>>,
    not_ports: Option<Vec<PortRaw>>,
    methods: Option<Vec<String>>,
    not_methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    not_paths: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConditionRaw {
    key: String,
    #[serde(default)]
    values: Option<Vec<String>>,
    #[serde(default)]
    not_values: Option<Vec<String>>,
}

fn one_of<R, T>(
    values: &Option<Vec<R>>,
    not: &Option<Vec<R>>,
    f: impl Fn(&R) -> Result<T, String>,
    field: &str,
    not_field: &str,
) -> Result<OneOf<T>, Invalid> {
    let conv = |v: &Option<Vec<R>>, fld: &str| -> Result<Option<Vec<T>>, Invalid> {
        match v {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => v
                .iter()
                .enumerate()
                .map(|(i, x)| f(x).map_err(|e| Invalid::new(format!("{fld}[{i}]"), e)))
                .collect::<Result<Vec<T>, Invalid>>()
                .map(Some),
        }
    };
    Ok(OneOf {
        values: conv(values, field)?,
        not: conv(not, not_field)?.unwrap_or_default(),
    })
}

fn strs(
    v: &Option<Vec<String>>,
    n: &Option<Vec<String>>,
    f: &str,
    nf: &str,
) -> Result<OneOf<StrMatch>, Invalid> {
    one_of(v, n, |s| Ok(StrMatch::parse(s)), f, nf)
}

/// What a policy's `targetRef`/`targetRefs`/`selector` attach it to (AuthorizationPolicy
/// and RequestAuthentication alike).
fn attachment(
    ns: &str,
    selector: &Option<SelectorRaw>,
    target_ref: &Option<TargetRefRaw>,
    target_refs: &[TargetRefRaw],
) -> Result<Attachment, Invalid> {
    let mut targets: Vec<&TargetRefRaw> = target_refs.iter().collect();
    let target_field = if target_ref.is_some() {
        "spec.targetRef"
    } else {
        "spec.targetRefs"
    };
    if let Some(t) = target_ref {
        if !targets.is_empty() {
            return Err(Invalid::new(
                "spec.targetRef",
                "use targetRef or targetRefs, not both",
            ));
        }
        targets.push(t);
    }
    Ok(if !targets.is_empty() {
        if selector.is_some() {
            return Err(Invalid::new(
                "spec.selector",
                "cannot be combined with targetRefs",
            ));
        }
        let mut gateways = vec![];
        let mut services = vec![];
        let mut every_waypoint = false;
        let mut any_class = false;
        for (i, t) in targets.iter().enumerate() {
            let f = if target_ref.is_some() {
                target_field.to_string()
            } else {
                format!("{target_field}[{i}]")
            };
            if t.namespace.as_deref().is_some_and(|n| n != ns) {
                return Err(Invalid::new(
                    format!("{f}.namespace"),
                    "must be the policy's own namespace",
                ));
            }
            match (t.group.as_deref().unwrap_or(""), t.kind.as_str()) {
                ("gateway.networking.k8s.io", "Gateway") => gateways.push(t.name.clone()),
                // A ServiceEntry: the service it converts to, of the same name.
                ("" | "core", "Service") | ("networking.istio.io", "ServiceEntry") => {
                    services.push(t.name.clone())
                }
                // Istio: the class of every waypoint, from the root namespace only (a
                // class of other gateways applies to none here).
                // (checked once the root namespace is known: `check_gateway_classes`).
                ("gateway.networking.k8s.io", "GatewayClass") => {
                    every_waypoint |= t.name == WAYPOINT_CLASS;
                    any_class = true;
                }
                (g, k) => {
                    return Err(Invalid::new(
                        format!("{f}.kind"),
                        format!(
                            "unsupported target group {g:?} kind {k:?} (Gateway, Service, ServiceEntry, or GatewayClass {WAYPOINT_CLASS})"
                        ),
                    ))
                }
            }
        }
        Attachment::Targets {
            gateways,
            services,
            every_waypoint,
            class: any_class,
        }
    } else if let Some(sel) = &selector {
        Attachment::Selector(sel.match_labels.clone())
    } else {
        Attachment::Namespace
    })
}

/// `request.auth.claims[a][b]` → `["a", "b"]`; `None` when not written so (or a name is
/// empty).
fn claim_path(key: &str) -> Option<Vec<String>> {
    let mut rest = key.strip_prefix("request.auth.claims")?;
    let mut path = vec![];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        if end == 0 {
            return None;
        }
        path.push(inner[..end].to_string());
        rest = &inner[end + 1..];
    }
    (!path.is_empty()).then_some(path)
}

fn compile_policy(d: &Doc<PolicySpec>) -> Result<authz::Policy, Invalid> {
    let ns = d.metadata.namespace();
    let s = &d.spec;
    let action = match s.action {
        ActionRaw::Allow => authz::Action::Allow,
        ActionRaw::Deny => authz::Action::Deny,
        ActionRaw::Audit => authz::Action::Audit,
        ActionRaw::Custom => authz::Action::Custom,
    };
    let provider = match (action, &s.provider) {
        (authz::Action::Custom, Some(p)) if !p.name.is_empty() => Some(p.name.clone()),
        (authz::Action::Custom, _) => {
            return Err(Invalid::new(
                "spec.provider.name",
                "required for CUSTOM (an extension provider of the MeshConfig document)",
            ))
        }
        (_, Some(_)) => {
            return Err(Invalid::new("spec.provider", "only for action CUSTOM"));
        }
        (_, None) => None,
    };
    let attachment = attachment(ns, &s.selector, &s.target_ref, &s.target_refs)?;
    let mut rules = vec![];
    for (ri, r) in s.rules.iter().enumerate() {
        let rf = format!("spec.rules[{ri}]");
        let mut from = vec![];
        for (i, fr) in r.from.iter().enumerate() {
            let f = format!("{rf}.from[{i}].source");
            let src = &fr.source;
            let cidrs = |v: &Option<Vec<Cidr>>, n: &Option<Vec<Cidr>>, a: &str, b: &str| {
                one_of(v, n, |c| Ok(*c), &format!("{f}.{a}"), &format!("{f}.{b}"))
            };
            from.push(authz::Source {
                principals: strs(
                    &src.principals,
                    &src.not_principals,
                    &format!("{f}.principals"),
                    &format!("{f}.notPrincipals"),
                )?,
                request_principals: strs(
                    &src.request_principals,
                    &src.not_request_principals,
                    &format!("{f}.requestPrincipals"),
                    &format!("{f}.notRequestPrincipals"),
                )?,
                namespaces: strs(
                    &src.namespaces,
                    &src.not_namespaces,
                    &format!("{f}.namespaces"),
                    &format!("{f}.notNamespaces"),
                )?,
                ip_blocks: cidrs(
                    &src.ip_blocks,
                    &src.not_ip_blocks,
                    "ipBlocks",
                    "notIpBlocks",
                )?,
                remote_ip_blocks: cidrs(
                    &src.remote_ip_blocks,
                    &src.not_remote_ip_blocks,
                    "remoteIpBlocks",
                    "notRemoteIpBlocks",
                )?,
            });
        }
        let mut to = vec![];
        for (i, tr) in r.to.iter().enumerate() {
            let f = format!("{rf}.to[{i}].operation");
            let op = &tr.operation;
            let ports = |v: &Option<Vec<PortRaw>>, n: &Option<Vec<PortRaw>>| {
                one_of(
                    v,
                    n,
                    |p| Ok(p.0),
                    &format!("{f}.ports"),
                    &format!("{f}.notPorts"),
                )
            };
            let paths = |v: &Option<Vec<String>>, n: &Option<Vec<String>>| {
                one_of(
                    v,
                    n,
                    |p| PathPattern::parse(p),
                    &format!("{f}.paths"),
                    &format!("{f}.notPaths"),
                )
            };
            to.push(authz::Operation {
                hosts: strs(
                    &op.hosts,
                    &op.not_hosts,
                    &format!("{f}.hosts"),
                    &format!("{f}.notHosts"),
                )?,
                ports: ports(&op.ports, &op.not_ports)?,
                methods: strs(
                    &op.methods,
                    &op.not_methods,
                    &format!("{f}.methods"),
                    &format!("{f}.notMethods"),
                )?,
                paths: paths(&op.paths, &op.not_paths)?,
            });
        }
        let mut when = vec![];
        for (i, c) in r.when.iter().enumerate() {
            let f = format!("{rf}.when[{i}]");
            if c.values.as_ref().is_none_or(|v| v.is_empty())
                && c.not_values.as_ref().is_none_or(|v| v.is_empty())
            {
                return Err(Invalid::new(
                    format!("{f}.values"),
                    "values or notValues is required",
                ));
            }
            let vf = format!("{f}.values");
            let nf = format!("{f}.notValues");
            let key = c.key.as_str();
            let cond = if let Some(h) = key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
            {
                if h.is_empty() {
                    return Err(Invalid::new(format!("{f}.key"), "empty header name"));
                }
                Condition::Str {
                    key: Key::Header(h.to_ascii_lowercase()),
                    values: strs(&c.values, &c.not_values, &vf, &nf)?,
                }
            } else {
                match key {
                    "source.ip" | "remote.ip" | "destination.ip" => Condition::Ip {
                        key: match key {
                            "source.ip" => Key::SourceIp,
                            "remote.ip" => Key::RemoteIp,
                            _ => Key::DestinationIp,
                        },
                        values: one_of(&c.values, &c.not_values, |s| s.parse::<Cidr>(), &vf, &nf)?,
                    },
                    "source.namespace" | "source.principal" => Condition::Str {
                        key: if key == "source.namespace" { Key::SourceNamespace } else { Key::SourcePrincipal },
                        values: strs(&c.values, &c.not_values, &vf, &nf)?,
                    },
                    "destination.port" => Condition::Port(one_of(
                        &c.values,
                        &c.not_values,
                        |s| s.parse::<u16>().map_err(|_| format!("invalid port {s:?}")),
                        &vf,
                        &nf,
                    )?),
                    "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" => Condition::Str {
                        key: match key {
                            "request.auth.principal" => Key::RequestPrincipal,
                            "request.auth.audiences" => Key::RequestAudiences,
                            _ => Key::RequestPresenter,
                        },
                        values: strs(&c.values, &c.not_values, &vf, &nf)?,
                    },
                    k if k.starts_with("request.auth.claims") => Condition::Str {
                        key: Key::RequestClaim(claim_path(k).ok_or_else(|| {
                            Invalid::new(
                                format!("{f}.key"),
                                format!("{k:?}: a claim is written request.auth.claims[name], a nested one request.auth.claims[name][member]"),
                            )
                        })?),
                        values: strs(&c.values, &c.not_values, &vf, &nf)?,
                    },
                    k => {
                        return Err(Invalid::new(
                            format!("{f}.key"),
                            format!("unsupported condition key {k:?} (request.headers[...], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[...])"),
                        ))
                    }
                }
            };
            when.push(cond);
        }
        rules.push(authz::Rule { from, to, when });
    }
    Ok(authz::Policy {
        id: d.metadata.id(),
        action,
        provider,
        attachment,
        rules,
    })
}

// MeshConfig --------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshConfigDoc {
    mesh_config: MeshConfigRaw,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshConfigRaw {
    #[serde(default)]
    extension_providers: Vec<ExtProviderRaw>,
    #[serde(default)]
    default_providers: Option<DefaultProvidersRaw>,
    /// The built-in `envoy` provider's file (`/dev/stdout` when empty).
    #[serde(default)]
    access_log_file: Option<String>,
    /// Its format: a format string (TEXT) or a JSON object's text (JSON).
    #[serde(default)]
    access_log_format: Option<String>,
    /// `TEXT` (default) or `JSON`.
    #[serde(default)]
    access_log_encoding: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DefaultProvidersRaw {
    #[serde(default)]
    tracing: Vec<String>,
    #[serde(default)]
    access_logging: Vec<String>,
}

/// An `envoyFileAccessLog` provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileLogRaw {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    log_format: Option<LogFormatRaw>,
    #[serde(default)]
    omit_empty_values: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogFormatRaw {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    labels: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OtelRaw {
    service: String,
    port: PortRaw,
    #[serde(default)]
    max_tag_length: Option<u32>,
    #[serde(default)]
    http: Option<OtelHttpRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OtelHttpRaw {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    headers: Vec<ProviderHeaderRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ZipkinRaw {
    service: String,
    port: PortRaw,
    #[serde(default)]
    max_tag_length: Option<u32>,
    #[serde(default, rename = "enable64bitTraceId")]
    enable_64bit_trace_id: bool,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    headers: Vec<ProviderHeaderRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderHeaderRaw {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExtProviderRaw {
    name: String,
    #[serde(default)]
    envoy_ext_authz_http: Option<ExtAuthzHttpRaw>,
    #[serde(default)]
    envoy_ext_authz_grpc: Option<ExtAuthzGrpcRaw>,
    #[serde(default)]
    opentelemetry: Option<OtelRaw>,
    #[serde(default)]
    zipkin: Option<ZipkinRaw>,
    #[serde(default)]
    envoy_file_access_log: Option<FileLogRaw>,
    #[serde(default)]
    envoy_otel_als: Option<OtelAlsRaw>,
}

/// An `envoyOtelAls` provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OtelAlsRaw {
    service: String,
    port: PortRaw,
    #[serde(default)]
    log_name: Option<String>,
    #[serde(default)]
    log_format: Option<LogFormatRaw>,
}

/// The tracing provider `p` (an `opentelemetry` or `zipkin` one) at field `f`.
fn compile_tracing_provider(
    f: &str,
    p: &ExtProviderRaw,
    mesh: Option<&Snapshot>,
) -> Result<spans::Provider, Invalid> {
    let none = Vec::new();
    let (kf, service, port, max_tag, path, timeout, headers, protocol) =
        match (&p.opentelemetry, &p.zipkin) {
            (Some(o), _) => {
                let h = o.http.as_ref();
                let protocol = match h {
                    None => spans::Protocol::OtlpGrpc,
                    Some(h) => spans::Protocol::OtlpHttp {
                        path: h.path.clone().unwrap_or_else(|| "/v1/traces".into()),
                    },
                };
                (
                    format!("{f}.opentelemetry"),
                    &o.service,
                    o.port,
                    o.max_tag_length,
                    h.and_then(|h| h.path.as_ref()),
                    h.and_then(|h| h.timeout.as_ref()),
                    h.map_or(&none, |h| &h.headers),
                    protocol,
                )
            }
            (None, Some(z)) => (
                format!("{f}.zipkin"),
                &z.service,
                z.port,
                z.max_tag_length,
                z.path.as_ref(),
                z.timeout.as_ref(),
                &z.headers,
                spans::Protocol::Zipkin {
                    path: z.path.clone().unwrap_or_else(|| "/api/v2/spans".into()),
                    trace_id_64: z.enable_64bit_trace_id,
                },
            ),
            (None, None) => unreachable!("a tracing provider"),
        };
    let service_ref =
        provider_service(mesh, service).map_err(|e| Invalid::new(format!("{kf}.service"), e))?;
    let host = service.rsplit('/').next().unwrap_or(service).to_string();
    // The export's own fields: OpenTelemetry's under `http`.
    let at = |name: &str| {
        let sub = if p.opentelemetry.is_some() {
            "http."
        } else {
            ""
        };
        format!("{kf}.{sub}{name}")
    };
    if let Some(path) = path.filter(|p| !p.starts_with('/')) {
        return Err(Invalid::new(
            at("path"),
            format!("{path:?} must start with /"),
        ));
    }
    let timeout = match timeout {
        None => spans::EXPORT_TIMEOUT,
        Some(t) => {
            runtime::config::duration::parse(t).map_err(|e| Invalid::new(at("timeout"), e))?
        }
    };
    let mut out_headers = vec![];
    for (j, h) in headers.iter().enumerate() {
        let hf = at(&format!("headers[{j}]"));
        let n = header_name(&h.name).map_err(|e| Invalid::new(format!("{hf}.name"), e))?;
        if h.value.contains(['\r', '\n']) {
            return Err(Invalid::new(
                format!("{hf}.value"),
                "a header value cannot hold a line break",
            ));
        }
        out_headers.push((n, h.value.clone()));
    }
    Ok(spans::Provider {
        name: p.name.clone(),
        protocol,
        service: service_ref,
        port: port.0,
        host,
        timeout,
        max_tag_length: max_tag.map_or(spans::MAX_TAG_LENGTH, |m| m as usize),
        headers: out_headers,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExtAuthzGrpcRaw {
    service: String,
    port: PortRaw,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    status_on_error: Option<PortRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExtAuthzHttpRaw {
    service: String,
    port: PortRaw,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    status_on_error: Option<PortRaw>,
    #[serde(default)]
    include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    include_additional_headers_in_check: BTreeMap<String, String>,
    #[serde(default)]
    headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_allow: Vec<String>,
}

/// The service a provider's `service` names: `hostname` or `namespace/hostname` of a
/// service of the mesh model.
fn provider_service(mesh: Option<&Snapshot>, name: &str) -> Result<ObjectRef, String> {
    let (ns, host) = match name.split_once('/') {
        Some((ns, h)) => (Some(ns), h),
        None => (None, name),
    };
    let mesh = mesh.ok_or("no mesh model in the file to find the service in")?;
    mesh.services()
        .find(|s| s.hostname == host && ns.is_none_or(|n| n == s.namespace))
        .map(|s| ObjectRef::new(&s.namespace, &s.name))
        .ok_or_else(|| format!("{name:?} is not a service of the mesh model (by hostname)"))
}

/// A MeshConfig document's extension providers: the external authorizers, the tracing
/// providers, and `defaultProviders.tracing`.
struct MeshProviders {
    ext_authz: BTreeMap<String, Arc<ext_authz::Provider>>,
    tracing: BTreeMap<String, Arc<spans::Provider>>,
    default_tracing: Option<String>,
    logs: BTreeMap<String, Arc<LogProvider>>,
    default_logging: Vec<String>,
}

/// An `envoyOtelAls` provider `name` at field `f` (Istio's `openTelemetryLog`): the body
/// its `logFormat.text` (Istio's text format without one), an attribute per
/// `logFormat.labels` entry (a format string each).
fn compile_otel_log(
    f: &str,
    name: &str,
    p: &OtelAlsRaw,
    mesh: Option<&Snapshot>,
) -> Result<LogProvider, Invalid> {
    let service =
        provider_service(mesh, &p.service).map_err(|e| Invalid::new(format!("{f}.service"), e))?;
    let text = p.log_format.as_ref().and_then(|l| l.text.as_deref());
    let body = crate::logfmt::Format::value(text_or_istio(text))
        .map_err(|e| Invalid::new(format!("{f}.logFormat.text"), e))?;
    let mut attributes = vec![];
    for (k, v) in p
        .log_format
        .as_ref()
        .and_then(|l| l.labels.as_ref())
        .into_iter()
        .flatten()
    {
        let lf = format!("{f}.logFormat.labels.{k}");
        let serde_json::Value::String(v) = v else {
            return Err(Invalid::new(lf, "a format string"));
        };
        attributes.push((
            k.clone(),
            crate::logfmt::Format::value(v).map_err(|e| Invalid::new(lf, e))?,
        ));
    }
    attributes.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(LogProvider::Otel(OtelLog {
        provider: Arc::new(spans::Provider {
            name: name.to_string(),
            protocol: spans::Protocol::OtlpLogs {
                log_name: p
                    .log_name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| spans::OTEL_LOG_NAME.to_string()),
            },
            service,
            port: p.port.0,
            host: p
                .service
                .rsplit('/')
                .next()
                .unwrap_or(&p.service)
                .to_string(),
            timeout: spans::EXPORT_TIMEOUT,
            max_tag_length: usize::MAX,
            headers: vec![],
        }),
        body,
        attributes,
    }))
}

/// The file of an access log at `path` (field `f`), opened for appending.
fn open_log(f: &str, path: Option<&str>) -> Result<Arc<runtime::logbuf::LogFile>, Invalid> {
    let path = match path {
        None | Some("") => "/dev/stdout",
        Some(p) => p,
    };
    runtime::logbuf::LogFile::open(Path::new(path))
        .map_err(|e| Invalid::new(f, format!("cannot open {path:?} for appending: {e}")))
}

/// The built-in `envoy` provider as MeshConfig `accessLogFile`, `accessLogFormat` and
/// `accessLogEncoding` say (Istio's `FileAccessLogFromMeshConfig`): `None` when it sets
/// none of them (the waypoint's own line).
fn mesh_access_log(m: &MeshConfigRaw) -> Result<Option<LogProvider>, Invalid> {
    // Empty is unset (Istio's `accessLogFile: ""` is no file, the default).
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.is_empty());
    if !set(&m.access_log_file) && !set(&m.access_log_format) && !set(&m.access_log_encoding) {
        return Ok(None);
    }
    let text = m.access_log_format.as_deref();
    let format = match m
        .access_log_encoding
        .as_deref()
        .filter(|e| !e.is_empty())
        .unwrap_or("TEXT")
    {
        "TEXT" => crate::logfmt::Format::text(text_or_istio(text)),
        "JSON" => match text.filter(|t| !t.is_empty()) {
            None => Ok(crate::logfmt::Format::istio_json()),
            Some(t) => match serde_json::from_str::<serde_json::Value>(t) {
                Ok(serde_json::Value::Object(map)) => crate::logfmt::Format::json(&map),
                Ok(_) => Err("with accessLogEncoding JSON, a JSON object of fields".to_string()),
                Err(e) => Err(format!("with accessLogEncoding JSON, a JSON object: {e}")),
            },
        },
        other => {
            return Err(Invalid::new(
                "meshConfig.accessLogEncoding",
                format!("{other:?}: TEXT or JSON"),
            ))
        }
    }
    .map_err(|e| Invalid::new("meshConfig.accessLogFormat", e))?;
    Ok(Some(LogProvider::File(FileLog {
        format,
        omit_empty: false,
        out: open_log("meshConfig.accessLogFile", m.access_log_file.as_deref())?,
    })))
}

/// A provider's format text: Istio's text format when it has none or an empty one (as
/// Istio's `fileAccessLogFormat` and `openTelemetryLog` take it).
fn text_or_istio(text: Option<&str>) -> &str {
    text.filter(|t| !t.is_empty())
        .unwrap_or(crate::logfmt::ISTIO_TEXT)
}

/// An `envoyFileAccessLog` provider at field `f` (Istio's `fileAccessLogFromTelemetry`):
/// without a `logFormat`, Istio's text format; `labels` without any, Istio's JSON one.
fn compile_file_log(f: &str, p: &FileLogRaw) -> Result<LogProvider, Invalid> {
    let format = match &p.log_format {
        None => crate::logfmt::Format::text(text_or_istio(None)),
        Some(LogFormatRaw {
            text: Some(_),
            labels: Some(_),
        }) => {
            return Err(Invalid::new(
                format!("{f}.logFormat"),
                "text or labels, not both",
            ))
        }
        Some(LogFormatRaw { text: Some(t), .. }) => {
            crate::logfmt::Format::text(text_or_istio(Some(t)))
        }
        Some(LogFormatRaw {
            labels: Some(l), ..
        }) if !l.is_empty() => crate::logfmt::Format::json(l),
        Some(_) => Ok(crate::logfmt::Format::istio_json()),
    }
    .map_err(|e| {
        let which = match &p.log_format {
            Some(LogFormatRaw {
                labels: Some(_), ..
            }) => "labels",
            _ => "text",
        };
        Invalid::new(format!("{f}.logFormat.{which}"), e)
    })?;
    Ok(LogProvider::File(FileLog {
        format,
        omit_empty: p.omit_empty_values,
        out: open_log(&format!("{f}.path"), p.path.as_deref())?,
    }))
}

fn compile_mesh_config(
    d: &MeshConfigDoc,
    mesh: Option<&Snapshot>,
) -> Result<MeshProviders, Invalid> {
    let mut out = BTreeMap::new();
    let mut tracing = BTreeMap::new();
    let mut logs = BTreeMap::new();
    if let Some(builtin) = mesh_access_log(&d.mesh_config)? {
        logs.insert("envoy".to_string(), Arc::new(builtin));
    }
    let mut names = BTreeSet::new();
    for (i, p) in d.mesh_config.extension_providers.iter().enumerate() {
        let f = format!("meshConfig.extensionProviders[{i}]");
        let kinds = [
            p.envoy_ext_authz_http.is_some(),
            p.envoy_ext_authz_grpc.is_some(),
            p.opentelemetry.is_some(),
            p.zipkin.is_some(),
            p.envoy_file_access_log.is_some(),
            p.envoy_otel_als.is_some(),
        ];
        match kinds.iter().filter(|k| **k).count() {
            0 => {
                return Err(Invalid::new(
                    f,
                    "a provider kind is required (envoyExtAuthzHttp, envoyExtAuthzGrpc, opentelemetry, zipkin, envoyFileAccessLog or envoyOtelAls)",
                ))
            }
            1 => {}
            _ => return Err(Invalid::new(f, "one provider kind per provider")),
        }
        if !names.insert(p.name.as_str()) {
            return Err(Invalid::new(
                format!("{f}.name"),
                format!("a second provider {:?}", p.name),
            ));
        }
        if let Some(file) = &p.envoy_file_access_log {
            // A provider named `envoy` replaces the built-in one (as in Istio).
            let provider = compile_file_log(&format!("{f}.envoyFileAccessLog"), file)?;
            logs.insert(p.name.clone(), Arc::new(provider));
            continue;
        }
        if let Some(otel) = &p.envoy_otel_als {
            let provider = compile_otel_log(&format!("{f}.envoyOtelAls"), &p.name, otel, mesh)?;
            logs.insert(p.name.clone(), Arc::new(provider));
            continue;
        }
        if p.opentelemetry.is_some() || p.zipkin.is_some() {
            let t = compile_tracing_provider(&f, p, mesh)?;
            tracing.insert(p.name.clone(), Arc::new(t));
            continue;
        }
        // What both kinds have: (field prefix, service, port, timeout, failOpen,
        // statusOnError).
        let (hf, service, port, timeout, fail_open, status_on_error) =
            match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
                (Some(h), None) => (
                    format!("{f}.envoyExtAuthzHttp"),
                    &h.service,
                    h.port,
                    &h.timeout,
                    h.fail_open,
                    h.status_on_error,
                ),
                (None, Some(g)) => (
                    format!("{f}.envoyExtAuthzGrpc"),
                    &g.service,
                    g.port,
                    &g.timeout,
                    g.fail_open,
                    g.status_on_error,
                ),
                _ => unreachable!("one ext_authz kind (checked above)"),
            };
        let service = provider_service(mesh, service)
            .map_err(|e| Invalid::new(format!("{hf}.service"), e))?;
        let timeout = match timeout {
            None => ext_authz::TIMEOUT,
            Some(t) => runtime::config::duration::parse(t)
                .map_err(|e| Invalid::new(format!("{hf}.timeout"), e))?,
        };
        let status_on_error = match status_on_error {
            None => 403,
            Some(PortRaw(s)) if (200..600).contains(&s) => s,
            Some(PortRaw(s)) => {
                return Err(Invalid::new(
                    format!("{hf}.statusOnError"),
                    format!("{s} is not an HTTP status"),
                ))
            }
        };
        let mut provider = ext_authz::Provider {
            name: p.name.clone(),
            grpc: p.envoy_ext_authz_grpc.is_some(),
            service,
            port: port.0,
            path_prefix: String::new(),
            timeout,
            fail_open,
            status_on_error,
            include_headers: vec![],
            additional_headers: vec![],
            to_upstream_on_allow: vec![],
            to_downstream_on_deny: vec![],
            to_downstream_on_allow: vec![],
        };
        if let Some(h) = &p.envoy_ext_authz_http {
            let names = |v: &[String], field: &str| -> Result<Vec<StrMatch>, Invalid> {
                v.iter()
                    .enumerate()
                    .map(|(j, n)| {
                        if n.trim_matches('*').is_empty() && n != "*" {
                            return Err(Invalid::new(
                                format!("{hf}.{field}[{j}]"),
                                "empty header name",
                            ));
                        }
                        Ok(StrMatch::parse(&n.to_ascii_lowercase()))
                    })
                    .collect()
            };
            for (n, v) in &h.include_additional_headers_in_check {
                let n = header_name(n).map_err(|e| {
                    Invalid::new(format!("{hf}.includeAdditionalHeadersInCheck"), e)
                })?;
                if v.contains(['\r', '\n']) {
                    return Err(Invalid::new(
                        format!("{hf}.includeAdditionalHeadersInCheck.{n}"),
                        "a header value cannot hold a line break",
                    ));
                }
                provider.additional_headers.push((n, v.clone()));
            }
            provider.path_prefix = h.path_prefix.clone().unwrap_or_default();
            if !provider.path_prefix.is_empty() && !provider.path_prefix.starts_with('/') {
                return Err(Invalid::new(
                    format!("{hf}.pathPrefix"),
                    "must start with /",
                ));
            }
            provider.include_headers = names(
                &h.include_request_headers_in_check,
                "includeRequestHeadersInCheck",
            )?;
            provider.to_upstream_on_allow =
                names(&h.headers_to_upstream_on_allow, "headersToUpstreamOnAllow")?;
            provider.to_downstream_on_deny = names(
                &h.headers_to_downstream_on_deny,
                "headersToDownstreamOnDeny",
            )?;
            provider.to_downstream_on_allow = names(
                &h.headers_to_downstream_on_allow,
                "headersToDownstreamOnAllow",
            )?;
        }
        out.insert(p.name.clone(), Arc::new(provider));
    }
    let default_tracing = match d.mesh_config.default_providers.as_ref() {
        None => None,
        Some(dp) => match dp.tracing.as_slice() {
            [] => None,
            [name] if tracing.contains_key(name) => Some(name.clone()),
            [name] => {
                return Err(Invalid::new(
                    "meshConfig.defaultProviders.tracing[0]",
                    format!("no tracing provider {name:?} (extensionProviders of kind opentelemetry or zipkin)"),
                ))
            }
            _ => {
                return Err(Invalid::new(
                    "meshConfig.defaultProviders.tracing",
                    "one tracing provider (Istio uses only one)",
                ))
            }
        },
    };
    let default_logging = d
        .mesh_config
        .default_providers
        .as_ref()
        .map_or(&[][..], |dp| dp.access_logging.as_slice());
    for (i, name) in default_logging.iter().enumerate() {
        if name != "envoy" && !logs.contains_key(name) {
            return Err(Invalid::new(
                format!("meshConfig.defaultProviders.accessLogging[{i}]"),
                format!("no access log provider {name:?} (envoy, or extensionProviders of kind envoyFileAccessLog or envoyOtelAls)"),
            ));
        }
    }
    Ok(MeshProviders {
        ext_authz: out,
        tracing,
        default_tracing,
        logs,
        default_logging: default_logging.to_vec(),
    })
}

// RequestAuthentication ---------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RequestAuthnSpec {
    #[serde(default)]
    selector: Option<SelectorRaw>,
    #[serde(default)]
    target_ref: Option<TargetRefRaw>,
    #[serde(default)]
    target_refs: Vec<TargetRefRaw>,
    #[serde(default)]
    jwt_rules: Vec<JwtRuleRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JwtRuleRaw {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default)]
    from_headers: Vec<JwtHeaderRaw>,
    #[serde(default)]
    from_params: Vec<String>,
    #[serde(default)]
    from_cookies: Vec<String>,
    #[serde(default)]
    output_payload_to_header: Option<String>,
    #[serde(default)]
    forward_original_token: bool,
    #[serde(default)]
    output_claim_to_headers: Vec<ClaimToHeaderRaw>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtHeaderRaw {
    name: String,
    #[serde(default)]
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimToHeaderRaw {
    header: String,
    claim: String,
}

/// An HTTP field name the waypoint may write (a token, lower-cased), or why not.
fn header_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !ok {
        return Err(format!("{name:?} is not a valid header name"));
    }
    let lower = name.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "host"
            | "connection"
            | "content-length"
            | "transfer-encoding"
            | "te"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
            | "x-forwarded-for"
            | "traceparent"
    ) {
        return Err(format!("{name:?} is a header the waypoint sets itself"));
    }
    Ok(lower)
}

fn compile_request_authn(d: &Doc<RequestAuthnSpec>) -> Result<jwt::RequestAuthn, Invalid> {
    let ns = d.metadata.namespace();
    let s = &d.spec;
    let attachment = attachment(ns, &s.selector, &s.target_ref, &s.target_refs)?;
    let mut rules = vec![];
    for (i, r) in s.jwt_rules.iter().enumerate() {
        let f = format!("spec.jwtRules[{i}]");
        if r.issuer.is_empty() {
            return Err(Invalid::new(format!("{f}.issuer"), "must not be empty"));
        }
        let timeout = match &r.timeout {
            None => jwks::TIMEOUT,
            Some(t) => runtime::config::duration::parse(t)
                .map_err(|e| Invalid::new(format!("{f}.timeout"), e))?,
        };
        let (keys, remote) = match (&r.jwks, &r.jwks_uri) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new(
                    format!("{f}.jwksUri"),
                    "only one of jwks and jwksUri may be set",
                ))
            }
            (Some(text), None) => (
                jwt::parse_jwks(text).map_err(|e| Invalid::new(format!("{f}.jwks"), e))?,
                None,
            ),
            (None, Some(uri)) => {
                jwks::check_uri(uri).map_err(|e| Invalid::new(format!("{f}.jwksUri"), e))?;
                (vec![], Some(jwks::Source::Uri(uri.clone())))
            }
            // Neither: OpenID discovery from the issuer, as istiod does.
            (None, None) => {
                jwks::check_uri(&r.issuer).map_err(|e| {
                    Invalid::new(
                        format!("{f}.jwks"),
                        format!("jwks or jwksUri is required when the issuer is not a URL to discover keys from ({e})"),
                    )
                })?;
                (vec![], Some(jwks::Source::Discovery))
            }
        };
        let mut from = vec![];
        for (j, h) in r.from_headers.iter().enumerate() {
            let name = header_name(&h.name)
                .map_err(|e| Invalid::new(format!("{f}.fromHeaders[{j}].name"), e))?;
            from.push(jwt::Location::Header {
                name,
                prefix: h.prefix.clone().unwrap_or_default(),
            });
        }
        for (j, p) in r.from_params.iter().enumerate() {
            if p.is_empty() {
                return Err(Invalid::new(
                    format!("{f}.fromParams[{j}]"),
                    "must not be empty",
                ));
            }
            from.push(jwt::Location::Param(p.clone()));
        }
        for (j, c) in r.from_cookies.iter().enumerate() {
            if c.is_empty() || c.contains([';', '=', ' ']) {
                return Err(Invalid::new(
                    format!("{f}.fromCookies[{j}]"),
                    format!("{c:?} is not a cookie name"),
                ));
            }
            from.push(jwt::Location::Cookie(c.clone()));
        }
        let mut rule = jwt::JwtRule::new(r.issuer.clone(), keys, from);
        rule.remote = remote.map(|source| jwks::Remote {
            source,
            timeout,
            generation: 0,
        });
        rule.audiences = r.audiences.clone();
        rule.forward_original_token = r.forward_original_token;
        rule.output_payload_to_header = match &r.output_payload_to_header {
            None => None,
            Some(h) => Some(
                header_name(h)
                    .map_err(|e| Invalid::new(format!("{f}.outputPayloadToHeader"), e))?,
            ),
        };
        for (j, c) in r.output_claim_to_headers.iter().enumerate() {
            let cf = format!("{f}.outputClaimToHeaders[{j}]");
            let header =
                header_name(&c.header).map_err(|e| Invalid::new(format!("{cf}.header"), e))?;
            let path: Vec<String> = c.claim.split('.').map(str::to_string).collect();
            if path.iter().any(String::is_empty) {
                return Err(Invalid::new(
                    format!("{cf}.claim"),
                    format!(
                        "{:?} is not a claim name (`a.b` names member b of claim a)",
                        c.claim
                    ),
                ));
            }
            rule.output_claim_to_headers.push((header, path));
        }
        rules.push(Arc::new(rule));
    }
    Ok(jwt::RequestAuthn {
        id: d.metadata.id(),
        attachment,
        rules,
    })
}

// Telemetry ---------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TelemetrySpec {
    #[serde(default)]
    selector: Option<SelectorRaw>,
    #[serde(default)]
    target_ref: Option<TargetRefRaw>,
    #[serde(default)]
    target_refs: Vec<TargetRefRaw>,
    #[serde(default)]
    access_logging: Vec<AccessLoggingRaw>,
    #[serde(default)]
    metrics: Vec<MetricsRaw>,
    #[serde(default)]
    tracing: Vec<TracingRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TracingRaw {
    #[serde(default, rename = "match")]
    matching: Option<LogMatchRaw>,
    #[serde(default)]
    providers: Vec<ProviderRefRaw>,
    #[serde(default)]
    random_sampling_percentage: Option<f64>,
    #[serde(default)]
    disable_span_reporting: Option<bool>,
    #[serde(default)]
    custom_tags: BTreeMap<String, CustomTagRaw>,
    // Accepted: the decision is a random draw with or without it (the request id the
    // waypoint gives is random too).
    #[serde(default, rename = "useRequestIdForTraceSampling")]
    _use_request_id_for_trace_sampling: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CustomTagRaw {
    #[serde(default)]
    literal: Option<LiteralTagRaw>,
    #[serde(default)]
    environment: Option<NamedTagRaw>,
    #[serde(default)]
    header: Option<NamedTagRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LiteralTagRaw {
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamedTagRaw {
    name: String,
    #[serde(default)]
    default_value: Option<String>,
}

/// A Telemetry's `tracing` entries, in order (a later entry's fields over an earlier's).
fn compile_tracing(list: &[TracingRaw]) -> Result<Option<TracingRule>, Invalid> {
    if list.is_empty() {
        return Ok(None);
    }
    let mut out = TracingRule::default();
    for (i, t) in list.iter().enumerate() {
        let f = format!("spec.tracing[{i}]");
        server_mode(
            &format!("{f}.match.mode"),
            t.matching.as_ref().map(|m| m.mode.as_str()),
        )?;
        match t.providers.as_slice() {
            [] => {}
            [p] => out.provider = Some(p.name.clone()),
            _ => {
                return Err(Invalid::new(
                    format!("{f}.providers"),
                    "one tracing provider per workload (Istio uses only one)",
                ))
            }
        }
        if let Some(p) = t.random_sampling_percentage {
            if !(0.0..=100.0).contains(&p) {
                return Err(Invalid::new(
                    format!("{f}.randomSamplingPercentage"),
                    format!("{p} is not a percentage (0 to 100)"),
                ));
            }
            out.sampling = Some(p);
        }
        if let Some(d) = t.disable_span_reporting {
            out.report = Some(!d);
        }
        for (name, tag) in &t.custom_tags {
            let tf = format!("{f}.customTags.{name}");
            let given = [
                tag.literal.is_some(),
                tag.environment.is_some(),
                tag.header.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(Invalid::new(
                    tf,
                    "exactly one of literal, environment and header",
                ));
            }
            let value = if let Some(l) = &tag.literal {
                Some(spans::CustomTag::Literal(l.value.clone()))
            } else if let Some(e) = &tag.environment {
                // The waypoint's own environment, read now (as Envoy reads it at start).
                std::env::var(&e.name)
                    .ok()
                    .or_else(|| e.default_value.clone())
                    .map(spans::CustomTag::Literal)
            } else {
                let h = tag.header.as_ref().expect("one of the three");
                // Any field may be read (`host` among them): a token.
                let token = !h.name.is_empty()
                    && h.name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !token {
                    return Err(Invalid::new(
                        format!("{tf}.header.name"),
                        format!("{:?} is not a valid header name", h.name),
                    ));
                }
                Some(spans::CustomTag::Header {
                    name: h.name.to_ascii_lowercase(),
                    default: h.default_value.clone(),
                })
            };
            out.custom_tags.insert(name.clone(), value);
        }
    }
    Ok(Some(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MetricsRaw {
    #[serde(default)]
    providers: Vec<ProviderRefRaw>,
    #[serde(default)]
    overrides: Vec<MetricOverrideRaw>,
    #[serde(default)]
    reporting_interval: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MetricOverrideRaw {
    #[serde(default, rename = "match")]
    matching: Option<MetricMatchRaw>,
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(default)]
    tag_overrides: BTreeMap<String, TagOverrideRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagOverrideRaw {
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MetricMatchRaw {
    #[serde(default)]
    metric: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    custom_metric: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessLoggingRaw {
    #[serde(default)]
    providers: Vec<ProviderRefRaw>,
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(default, rename = "match")]
    matching: Option<LogMatchRaw>,
    #[serde(default)]
    filter: Option<LogFilterRaw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogFilterRaw {
    expression: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogMatchRaw {
    mode: String,
}

/// The `match.mode` of a Telemetry entry at field `f`: the waypoint's telemetry is its
/// server side, so `CLIENT` is refused.
fn server_mode(f: &str, mode: Option<&str>) -> Result<(), Invalid> {
    match mode {
        None | Some("CLIENT_AND_SERVER" | "SERVER") => Ok(()),
        Some("CLIENT") => Err(Invalid::new(
            f,
            "CLIENT: the waypoint's telemetry is its server side (CLIENT_AND_SERVER or SERVER)",
        )),
        Some(m) => Err(Invalid::new(
            f,
            format!("unknown mode {m:?} (CLIENT_AND_SERVER, SERVER, CLIENT)"),
        )),
    }
}

/// The `providers` of the Telemetry entry at field `f` name only `name` (`what`: why).
fn only_provider(
    f: &str,
    providers: &[ProviderRefRaw],
    name: &str,
    what: &str,
) -> Result<(), Invalid> {
    match providers.iter().position(|p| p.name != name) {
        Some(j) => Err(Invalid::new(
            format!("{f}.providers[{j}].name"),
            format!("{:?}: {what}, provider {name:?}", providers[j].name),
        )),
        None => Ok(()),
    }
}

/// A Telemetry's `metrics` overrides: by [`crate::telemetry::METRICS`], reported or not.
/// and `tagOverrides`; the gRPC message metrics are accepted and have nothing to change
/// (the waypoint reports none).
fn compile_metrics(list: &[MetricsRaw]) -> Result<([Option<bool>; 8], MetricTags), Invalid> {
    let mut out = [None; 8];
    let mut tags = MetricTags::default();
    for (i, m) in list.iter().enumerate() {
        let f = format!("spec.metrics[{i}]");
        only_provider(
            &f,
            &m.providers,
            "prometheus",
            "the waypoint's metrics are Prometheus ones",
        )?;
        if m.reporting_interval.is_some() {
            return Err(Invalid::new(
                format!("{f}.reportingInterval"),
                "not supported (request metrics are counted as each request ends)",
            ));
        }
        for (k, o) in m.overrides.iter().enumerate() {
            let of = format!("{f}.overrides[{k}]");
            let mut these = vec![];
            for (name, t) in &o.tag_overrides {
                let tf = format!("{of}.tagOverrides.{name}");
                if !crate::telemetry::label_name(name) {
                    return Err(Invalid::new(tf, "not a Prometheus label name"));
                }
                let t = match (t.operation.as_deref().unwrap_or("UPSERT"), &t.value) {
                    ("REMOVE", _) => TagOverride::Remove,
                    ("UPSERT", Some(v)) => TagOverride::Upsert(Arc::new(
                        crate::cel::Expr::parse(v)
                            .map_err(|e| Invalid::new(format!("{tf}.value"), e))?,
                    )),
                    ("UPSERT", None) => {
                        return Err(Invalid::new(
                            format!("{tf}.value"),
                            "an UPSERT needs a value (a CEL expression)",
                        ))
                    }
                    (other, _) => {
                        return Err(Invalid::new(
                            format!("{tf}.operation"),
                            format!("{other:?}: UPSERT or REMOVE"),
                        ))
                    }
                };
                these.push((name.clone(), t));
            }
            let mm = o.matching.as_ref();
            server_mode(
                &format!("{of}.match.mode"),
                mm.and_then(|x| x.mode.as_deref()),
            )?;
            if mm.is_some_and(|x| x.custom_metric.is_some()) {
                return Err(Invalid::new(
                    format!("{of}.match.customMetric"),
                    "not supported (Istio's standard metrics only)",
                ));
            }
            // An override without `disabled` leaves it as it was (only its tags count).
            let on = o.disabled.map(|d| !d);
            let mut apply = |x: usize| {
                if on.is_some() {
                    out[x] = on;
                }
                for (name, t) in &these {
                    tags.set(x, name, t.clone());
                }
            };
            match mm
                .and_then(|x| x.metric.as_deref())
                .unwrap_or("ALL_METRICS")
            {
                "ALL_METRICS" => (0..crate::telemetry::METRICS.len()).for_each(&mut apply),
                // The waypoint reports no gRPC message metrics: nothing to change.
                "GRPC_REQUEST_MESSAGES" | "GRPC_RESPONSE_MESSAGES" => {}
                name => match crate::telemetry::METRICS.iter().position(|n| *n == name) {
                    Some(x) => apply(x),
                    None => {
                        return Err(Invalid::new(
                            format!("{of}.match.metric"),
                            format!("unknown metric {name:?}"),
                        ))
                    }
                },
            }
        }
    }
    Ok((out, tags))
}

/// A Telemetry's `accessLogging`, `metrics` and `tracing` (`None`: it has none).
fn compile_telemetry(d: &Doc<TelemetrySpec>) -> Result<Option<TelemetryRule>, Invalid> {
    let s = &d.spec;
    let (metrics, tags) = compile_metrics(&s.metrics)?;
    let tracing = compile_tracing(&s.tracing)?;
    let mut access_log = vec![];
    for (i, a) in s.access_logging.iter().enumerate() {
        let f = format!("spec.accessLogging[{i}]");
        let filter = match &a.filter {
            None => None,
            Some(x) => Some(Arc::new(
                crate::cel::Expr::parse(&x.expression)
                    .map_err(|e| Invalid::new(format!("{f}.filter.expression"), e))?,
            )),
        };
        server_mode(
            &format!("{f}.match.mode"),
            a.matching.as_ref().map(|m| m.mode.as_str()),
        )?;
        // The names are checked against the MeshConfig's providers once it is read.
        access_log.push(LogEntry {
            providers: a.providers.iter().map(|p| p.name.clone()).collect(),
            disabled: a.disabled == Some(true),
            filter,
        });
    }
    if access_log.is_empty()
        && metrics.iter().all(Option::is_none)
        && tags.is_empty()
        && tracing.is_none()
    {
        return Ok(None);
    }
    let ns = d.metadata.namespace();
    Ok(Some(TelemetryRule {
        id: d.metadata.id(),
        attachment: attachment(ns, &s.selector, &s.target_ref, &s.target_refs)?,
        access_log,
        metrics,
        tags,
        tracing,
    }))
}

// DestinationRule ---------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DrSpec {
    host: String,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicyRaw>,
    #[serde(default)]
    subsets: Vec<SubsetRaw>,
    /// Accepted: the waypoint serves every client of the services it fronts.
    #[serde(default, rename = "exportTo")]
    _export_to: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubsetRaw {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicyRaw>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TrafficPolicyRaw {
    /// In a `portLevelSettings` entry only: the service port it is for.
    #[serde(default)]
    port: Option<PortSelectorRaw>,
    #[serde(default)]
    port_level_settings: Vec<TrafficPolicyRaw>,
    #[serde(default)]
    load_balancer: Option<LbRaw>,
    #[serde(default)]
    outlier_detection: Option<OutlierRaw>,
    #[serde(default)]
    connection_pool: Option<ConnPoolRaw>,
    #[serde(default)]
    tls: Option<ClientTlsRaw>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSelectorRaw {
    number: u16,
}

/// `trafficPolicy.tls` (Istio's ClientTLSSettings). To an endpoint in the mesh the
/// connection is always HBONE, mutual TLS with Istio identities: `ISTIO_MUTUAL` says just
/// that and is accepted (with its `sni`, which HBONE has no use for). To an endpoint
/// outside the mesh (a ServiceEntry's, say: egress), `SIMPLE` and `MUTUAL` originate TLS
/// from the waypoint ([`crate::plain::TlsOrigin`]); endpoints of the same service in the
/// mesh still get HBONE alone. `DISABLE` (HBONE would still be used) and Kubernetes
/// secrets (`credentialName`) are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClientTlsRaw {
    mode: TlsModeRaw,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    ca_certificates: Option<String>,
    #[serde(default)]
    client_certificate: Option<String>,
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    insecure_skip_verify: Option<bool>,
    #[serde(default)]
    credential_name: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum TlsModeRaw {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConnPoolRaw {
    #[serde(default)]
    tcp: Option<TcpPoolRaw>,
    #[serde(default)]
    http: Option<HttpPoolRaw>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpPoolRaw {
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    connect_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpPoolRaw {
    #[serde(default)]
    use_client_protocol: Option<bool>,
    #[serde(default)]
    idle_timeout: Option<String>,
    #[serde(default, rename = "http1MaxPendingRequests")]
    http1_max_pending_requests: Option<u32>,
    #[serde(default, rename = "http2MaxRequests")]
    http2_max_requests: Option<u32>,
    #[serde(default)]
    max_requests_per_connection: Option<u32>,
    #[serde(default)]
    max_retries: Option<u32>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum SimpleLb {
    Unspecified,
    LeastRequest,
    /// Istio's deprecated name for LEAST_REQUEST.
    LeastConn,
    RoundRobin,
    Random,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LbRaw {
    #[serde(default)]
    simple: Option<SimpleLb>,
    #[serde(default)]
    consistent_hash: Option<ConsistentHashRaw>,
    #[serde(default)]
    locality_lb_setting: Option<LocalityLbRaw>,
    /// A duration (`60s`).
    #[serde(default)]
    warmup_duration_secs: Option<String>,
}

/// A `localityLbSetting.distribute` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DistributeRaw {
    from: String,
    to: BTreeMap<String, u32>,
}

/// A locality pattern's fault (`region[/zone[/subzone]]`, a `*` segment only last), if any.
fn bad_locality_pattern(p: &str) -> Option<String> {
    let parts: Vec<&str> = p.split('/').collect();
    if parts.len() > 3 || parts.iter().any(|s| s.is_empty()) {
        return Some(format!("{p:?} is not region[/zone[/subzone]]"));
    }
    if parts[..parts.len() - 1].contains(&"*") || parts.iter().any(|s| *s != "*" && s.contains('*'))
    {
        return Some(format!(
            "{p:?}: a `*` stands for a whole segment, the last one"
        ));
    }
    None
}

/// Istio's `LocalityLoadBalancerSetting`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalityLbRaw {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    distribute: Vec<DistributeRaw>,
    #[serde(default)]
    failover: Vec<FailoverRaw>,
    #[serde(default)]
    failover_priority: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverRaw {
    from: String,
    to: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConsistentHashRaw {
    #[serde(default)]
    http_header_name: Option<String>,
    #[serde(default)]
    http_cookie: Option<CookieRaw>,
    #[serde(default)]
    use_source_ip: Option<bool>,
    #[serde(default)]
    http_query_parameter_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CookieRaw {
    name: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    attributes: Vec<CookieAttrRaw>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CookieAttrRaw {
    name: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutlierRaw {
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    consecutive_gateway_errors: Option<u32>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<u32>,
    #[serde(default)]
    interval: Option<String>,
}

/// `name`, `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local` → the service.
/// The Service a host names (`name`, `name.ns`, `name.ns.svc…`; `name` in namespace `ns`),
/// at field `field`.
/// The services of the mesh model by hostname: how a DestinationRule's `host` or a
/// VirtualService's hosts name a service that has no Kubernetes name (a ServiceEntry's
/// `httpbin.org`), or name any by its full hostname.
#[derive(Default)]
pub(crate) struct Hosts(std::collections::HashMap<String, Vec<ObjectRef>>);

impl Hosts {
    fn of(mesh: Option<&Snapshot>) -> Hosts {
        let mut by = std::collections::HashMap::<String, Vec<ObjectRef>>::new();
        for s in mesh.iter().flat_map(|m| m.services()) {
            by.entry(mesh_model::names::host_key(&s.hostname))
                .or_default()
                .push(ObjectRef::new(&s.namespace, &s.name));
        }
        Hosts(by)
    }

    /// The service with hostname `host` (any case, trailing dot or not): the one of
    /// namespace `ns` if there is one, else the only one (a hostname in several other
    /// namespaces names none of them).
    fn find(&self, host: &str, ns: &str) -> Option<ObjectRef> {
        let all = self.0.get(&mesh_model::names::host_key(host))?;
        match all.iter().find(|r| r.namespace == ns) {
            Some(r) => Some(r.clone()),
            None if all.len() == 1 => Some(all[0].clone()),
            None => None,
        }
    }
}

fn dr_host(field: &str, host: &str, ns: &str, hosts: &Hosts) -> Result<ObjectRef, Invalid> {
    if let Some(r) = hosts.find(host, ns) {
        return Ok(r);
    }
    let parts: Vec<&str> = host.split('.').collect();
    let bad = || {
        Invalid::new(
            field,
            format!("{host:?}: expected a service name (name, name.ns, name.ns.svc.cluster.local) or the hostname of a service of the mesh model"),
        )
    };
    if parts.iter().any(|p| p.is_empty() || p.contains('*')) {
        return Err(bad());
    }
    match parts.as_slice() {
        [n] => Ok(ObjectRef::new(ns, *n)),
        [n, s] => Ok(ObjectRef::new(*s, *n)),
        [n, s, "svc", ..] => Ok(ObjectRef::new(*s, *n)),
        _ => Err(bad()),
    }
}

/// The service, and its traffic policies: the whole service's, and per service port
/// (`portLevelSettings`).
/// A DestinationRule: its service, the service's traffic policy, and its subsets (the
/// service narrowed to each, with its labels and policy).
fn compile_dr(d: &Doc<DrSpec>, hosts: &Hosts) -> Result<CompiledDr, Invalid> {
    let svc = dr_host("spec.host", &d.spec.host, d.metadata.namespace(), hosts)?;
    let empty = TrafficPolicyRaw::default();
    let whole_raw = d.spec.traffic_policy.as_ref().unwrap_or(&empty);
    let whole = compile_policy_at(whole_raw, "spec.trafficPolicy")?;
    let mut subsets = vec![];
    for (i, sub) in d.spec.subsets.iter().enumerate() {
        let f = format!("spec.subsets[{i}]");
        if sub.name.is_empty()
            || subsets
                .iter()
                .any(|(s, _): &(ObjectRef, Subset)| s.subset.as_deref() == Some(&*sub.name))
        {
            return Err(Invalid::new(
                format!("{f}.name"),
                "a subset needs a name of its own",
            ));
        }
        // Istio: the subset's policy fields replace the rule's, field by field.
        let policy = match &sub.traffic_policy {
            None => compile_policy_at(whole_raw, "spec.trafficPolicy")?,
            Some(own) => {
                let merged = TrafficPolicyRaw {
                    port: own.port.clone(),
                    port_level_settings: if own.port_level_settings.is_empty() {
                        whole_raw.port_level_settings.clone()
                    } else {
                        own.port_level_settings.clone()
                    },
                    load_balancer: own
                        .load_balancer
                        .clone()
                        .or(whole_raw.load_balancer.clone()),
                    outlier_detection: own
                        .outlier_detection
                        .clone()
                        .or(whole_raw.outlier_detection.clone()),
                    connection_pool: own
                        .connection_pool
                        .clone()
                        .or(whole_raw.connection_pool.clone()),
                    tls: own.tls.clone().or(whole_raw.tls.clone()),
                };
                compile_policy_at(&merged, &format!("{f}.trafficPolicy"))?
            }
        };
        let key = svc.clone().with_subset(Some(sub.name.clone()));
        subsets.push((
            key,
            Subset {
                labels: mesh_model::config::LocalSelector {
                    match_labels: sub.labels.clone(),
                },
                policy,
            },
        ));
    }
    Ok(CompiledDr {
        service: svc,
        whole,
        subsets,
    })
}

struct CompiledDr {
    service: ObjectRef,
    whole: DestinationPolicy,
    subsets: Vec<(ObjectRef, Subset)>,
}

/// A `trafficPolicy` at field `f`, with its `portLevelSettings`.
fn compile_policy_at(tp: &TrafficPolicyRaw, f: &str) -> Result<DestinationPolicy, Invalid> {
    if tp.port.is_some() {
        return Err(Invalid::new(
            format!("{f}.port"),
            "only in portLevelSettings entries",
        ));
    }
    let whole = compile_tp(tp, f)?;
    let mut ports: Vec<(u16, TrafficPolicy)> = vec![];
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let pf = format!("{f}.portLevelSettings[{i}]");
        let Some(port) = p.port.as_ref().map(|x| x.number) else {
            return Err(Invalid::new(format!("{pf}.port"), "required"));
        };
        if !p.port_level_settings.is_empty() {
            return Err(Invalid::new(
                format!("{pf}.portLevelSettings"),
                "not inside portLevelSettings",
            ));
        }
        if ports.iter().any(|(q, _)| *q == port) {
            return Err(Invalid::new(
                format!("{pf}.port.number"),
                format!("a second entry for port {port}"),
            ));
        }
        ports.push((port, compile_tp(p, &pf)?));
    }
    Ok(DestinationPolicy { whole, ports })
}

/// One `trafficPolicy` (or `portLevelSettings` entry) at field `f`.
fn compile_tp(tp: &TrafficPolicyRaw, f: &str) -> Result<TrafficPolicy, Invalid> {
    let mut lb = ServiceLb::default();
    let mut idle = None;
    let mut breaker = None;
    if let Some(l) = &tp.load_balancer {
        lb.policy = match (&l.simple, &l.consistent_hash) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new(
                    format!("{f}.loadBalancer"),
                    "simple and consistentHash are exclusive",
                ))
            }
            (Some(SimpleLb::RoundRobin), None) => LbPolicy::RoundRobin,
            (Some(SimpleLb::Random), None) => LbPolicy::Random,
            (Some(_), None) | (None, None) => LbPolicy::LeastRequest,
            (None, Some(ch)) => {
                let f = &format!("{f}.loadBalancer.consistentHash");
                let ip = ch.use_source_ip == Some(true);
                let q = &ch.http_query_parameter_name;
                let key = match (&ch.http_header_name, &ch.http_cookie, ip, q) {
                    (Some(h), None, false, None) => HashKey::Header(h.to_ascii_lowercase()),
                    (None, Some(c), false, None) => {
                        let ttl = c
                            .ttl
                            .as_deref()
                            .map(runtime::config::duration::parse)
                            .transpose()
                            .map_err(|e| Invalid::new(format!("{f}.httpCookie.ttl"), e))?;
                        HashKey::Cookie(crate::lb::CookieKey {
                            name: c.name.clone(),
                            ttl,
                            path: c.path.clone(),
                            attributes: c
                                .attributes
                                .iter()
                                .map(|a| (a.name.clone(), a.value.clone()))
                                .collect(),
                        })
                    }
                    (None, None, true, None) => HashKey::SourceIp,
                    (None, None, false, Some(q)) if !q.is_empty() => HashKey::Query(q.clone()),
                    _ => {
                        return Err(Invalid::new(
                            f,
                            "exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
                        ))
                    }
                };
                LbPolicy::ConsistentHash(key)
            }
        };
    }
    let mut tls = None;
    if let Some(t) = &tp.tls {
        let f = &format!("{f}.tls");
        if t.credential_name.is_some() {
            return Err(Invalid::new(
                format!("{f}.credentialName"),
                "Kubernetes secrets are not read: give caCertificates, clientCertificate and privateKey as files",
            ));
        }
        match t.mode {
            TlsModeRaw::IstioMutual => {
                let set = [
                    ("caCertificates", t.ca_certificates.is_some()),
                    ("clientCertificate", t.client_certificate.is_some()),
                    ("privateKey", t.private_key.is_some()),
                    ("subjectAltNames", !t.subject_alt_names.is_empty()),
                    ("insecureSkipVerify", t.insecure_skip_verify.is_some()),
                ];
                if let Some((field, _)) = set.iter().find(|(_, on)| *on) {
                    return Err(Invalid::new(
                        format!("{f}.{field}"),
                        "not with ISTIO_MUTUAL: HBONE uses the mesh's certificates (this is for SIMPLE or MUTUAL)",
                    ));
                }
            }
            TlsModeRaw::Disable => {
                return Err(Invalid::new(
                    format!("{f}.mode"),
                    "DISABLE: the waypoint reaches endpoints in the mesh over HBONE (mutual TLS) only, and those outside it in plain TCP without a tls field",
                ))
            }
            TlsModeRaw::Simple | TlsModeRaw::Mutual => {
                let mutual = matches!(t.mode, TlsModeRaw::Mutual);
                let client = match (&t.client_certificate, &t.private_key) {
                    (Some(c), Some(k)) if mutual => Some((Path::new(c), Path::new(k))),
                    (None, _) if mutual => {
                        return Err(Invalid::new(
                            format!("{f}.clientCertificate"),
                            "MUTUAL needs clientCertificate and privateKey",
                        ))
                    }
                    (_, None) if mutual => {
                        return Err(Invalid::new(
                            format!("{f}.privateKey"),
                            "MUTUAL needs clientCertificate and privateKey",
                        ))
                    }
                    (None, None) => None,
                    _ => {
                        return Err(Invalid::new(
                            format!("{f}.clientCertificate"),
                            "a client certificate is for mode MUTUAL",
                        ))
                    }
                };
                let spec = crate::plain::TlsSpec {
                    ca: t.ca_certificates.as_deref().map(Path::new),
                    client,
                    sans: &t.subject_alt_names,
                    skip_verify: t.insecure_skip_verify.unwrap_or(false),
                    sni: t.sni.as_deref(),
                };
                let origin = crate::plain::TlsOrigin::new(&spec)
                    .map_err(|(field, e)| Invalid::new(format!("{f}.{field}"), e))?;
                tls = Some(Arc::new(origin));
            }
        }
    }
    if let Some(o) = &tp.outlier_detection {
        let mut od = OutlierDetection::default();
        if let Some(n) = o.consecutive_5xx_errors {
            od.consecutive_5xx = n;
        }
        if let Some(n) = o.consecutive_gateway_errors {
            od.consecutive_gateway = n;
        }
        if let Some(t) = &o.base_ejection_time {
            od.base_ejection_time = runtime::config::duration::parse(t)
                .map_err(|e| Invalid::new(format!("{f}.outlierDetection.baseEjectionTime"), e))?;
        }
        if let Some(t) = &o.interval {
            let f = &format!("{f}.outlierDetection.interval");
            od.interval = runtime::config::duration::parse(t).map_err(|e| Invalid::new(f, e))?;
            if od.interval.is_zero() {
                return Err(Invalid::new(f, "must be more than 0"));
            }
        }
        if let Some(p) = o.max_ejection_percent {
            if p > 100 {
                return Err(Invalid::new(
                    format!("{f}.outlierDetection.maxEjectionPercent"),
                    "must be 0–100",
                ));
            }
            od.max_ejection_percent = p;
        }
        lb.outlier = Some(od);
    }
    if let Some(w) = tp
        .load_balancer
        .as_ref()
        .and_then(|l| l.warmup_duration_secs.as_deref())
    {
        let f = &format!("{f}.loadBalancer.warmupDurationSecs");
        let d = runtime::config::duration::parse(w).map_err(|e| Invalid::new(f, e))?;
        if matches!(lb.policy, LbPolicy::ConsistentHash(_)) {
            return Err(Invalid::new(
                f,
                "slow start is for simple ROUND_ROBIN, LEAST_REQUEST or RANDOM balancing, not consistentHash",
            ));
        }
        lb.warmup = Some(d).filter(|d| !d.is_zero());
    }
    let setting = tp
        .load_balancer
        .as_ref()
        .and_then(|l| l.locality_lb_setting.as_ref());
    if let Some(l) = setting {
        let f = &format!("{f}.loadBalancer.localityLbSetting");
        let failover = !l.failover.is_empty() || !l.failover_priority.is_empty();
        if !l.distribute.is_empty() && failover {
            return Err(Invalid::new(
                format!("{f}.distribute"),
                "give distribute or failover/failoverPriority, not both",
            ));
        }
        for (i, d) in l.distribute.iter().enumerate() {
            let df = format!("{f}.distribute[{i}]");
            if let Some(e) = bad_locality_pattern(&d.from) {
                return Err(Invalid::new(format!("{df}.from"), e));
            }
            if let Some(e) = d.to.keys().find_map(|k| bad_locality_pattern(k)) {
                return Err(Invalid::new(format!("{df}.to"), e));
            }
            let total: u64 = d.to.values().map(|w| u64::from(*w)).sum();
            if total != 100 {
                return Err(Invalid::new(
                    format!("{df}.to"),
                    format!("the weights sum to {total}, not 100"),
                ));
            }
        }
        if !l.failover.is_empty() && !l.failover_priority.is_empty() {
            return Err(Invalid::new(
                format!("{f}.failoverPriority"),
                "give failover or failoverPriority, not both",
            ));
        }
        if let Some((i, _)) = l
            .failover_priority
            .iter()
            .enumerate()
            .find(|(_, k)| k.contains('=') || k.is_empty())
        {
            return Err(Invalid::new(
                format!("{f}.failoverPriority[{i}]"),
                "a label key (the `key=value` form is not supported)",
            ));
        }
    }
    let enabled = setting.and_then(|l| l.enabled) != Some(false);
    let distribute: Vec<crate::lb::Distribute> = setting
        .map(|l| {
            l.distribute
                .iter()
                .map(|d| crate::lb::Distribute {
                    from: d.from.clone(),
                    to: d.to.iter().map(|(k, w)| (k.clone(), *w)).collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    if enabled && !distribute.is_empty() {
        // Istio applies locality weights with or without outlier detection.
        lb.locality = Some(crate::lb::LocalityLb {
            distribute,
            ..Default::default()
        });
    } else if lb.outlier.is_some() && enabled {
        // Istio: locality failover (on unless `enabled: false`) needs outlier detection.
        lb.locality = Some(crate::lb::LocalityLb {
            failover: setting
                .map(|l| {
                    l.failover
                        .iter()
                        .map(|x| (x.from.clone(), x.to.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            failover_priority: setting
                .map(|l| l.failover_priority.clone())
                .unwrap_or_default(),
            distribute: vec![],
        });
    }
    // Istio's int32 fields: 0 (unset in its protobuf) is its default, no limit.
    let limit = |v: Option<u32>| v.filter(|n| *n > 0).unwrap_or(u32::MAX);
    let mut limits = crate::breaker::Limits::default();
    if let Some(tcp) = tp.connection_pool.as_ref().and_then(|c| c.tcp.as_ref()) {
        limits.max_connections = limit(tcp.max_connections);
        if let Some(t) = &tcp.connect_timeout {
            let f = &format!("{f}.connectionPool.tcp.connectTimeout");
            let d = runtime::config::duration::parse(t).map_err(|e| Invalid::new(f, e))?;
            limits.connect_timeout = Some(d).filter(|d| !d.is_zero());
        }
    }
    if let Some(http) = tp.connection_pool.as_ref().and_then(|c| c.http.as_ref()) {
        lb.use_client_protocol = http.use_client_protocol.unwrap_or(false);
        if let Some(t) = &http.idle_timeout {
            let f = &format!("{f}.connectionPool.http.idleTimeout");
            idle = Some(runtime::config::duration::parse(t).map_err(|e| Invalid::new(f, e))?);
        }
        limits.max_pending = limit(http.http1_max_pending_requests);
        limits.max_requests = limit(http.http2_max_requests);
        limits.max_retries = limit(http.max_retries);
        limits.max_requests_per_connection = http.max_requests_per_connection.unwrap_or(0);
    }
    if limits != crate::breaker::Limits::default() {
        breaker = Some(Arc::new(crate::breaker::Breaker::new(limits)));
    }
    Ok(TrafficPolicy {
        lb,
        idle,
        breaker,
        tls,
    })
}
