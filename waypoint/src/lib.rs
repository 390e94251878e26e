//! waypoint: the L7 proxy of ambient mode (issue 5, rules R13–R17 of
//! `shared/spec/ambient-routing.md`).
//!
//! The modules (the pure ones table-tested, the I/O ones end to end):
//! * [`config`] — the one configuration file: multi-document Kubernetes YAML (`HTTPRoute`,
//!   `GRPCRoute`, `AuthorizationPolicy`, `RequestAuthentication`, `DestinationRule`), mesh-model's workload/service document and
//!   the `waypoint:` settings document (every field documented there); located errors.
//! * [`route`] — Gateway API routing for service-addressed requests (R17), none for
//!   pod-addressed ones (R16).
//! * [`authz`] — Istio AuthorizationPolicy evaluation (R15).
//! * [`jwt`] — Istio RequestAuthentication: JWTs found, verified (ring) and taken off the
//!   request before policy, `401` for a bad one, a per-worker cache of verified tokens.
//! * [`ext_authz`] — AuthorizationPolicy CUSTOM: the `envoyExtAuthzHttp` authorizer asked
//!   over HBONE before DENY/ALLOW, its verdict applied.
//! * [`jwks`] — key sets of `jwksUri` or OpenID discovery, fetched by the control thread
//!   (at start, on reload, every `jwks_refresh`).
//! * [`lb`] — least request, round robin, random, consistent hash, outlier detection.
//! * [`http1`] — HTTP/1.1 inside a tunnel: request head (400/431), strict framing and
//!   hop-by-hop removal, policy first, routing, streamed exchanges with the upstream
//!   behind a trait, allow-listed upgrades, keep-alive.
//! * [`target`] — the R14 target check over the mesh model.
//! * [`path`] — request path normalization (Istio's default `BASE`) before policy, routing
//!   and the upstream request.
//! * [`source`] — the tunnel's client: whose `forwarded: for=` is believed, the client's
//!   workload and namespace from the verified identity and the model.
//! * [`upstream`] — a service's endpoints from the mesh model and per-worker balancers.
//!
//! * [`service`] — the HBONE listener (R13) on the runtime's workers: the target check
//!   per CONNECT stream, then [`http1`] with upstream HBONE streams through a per-worker
//!   pool; the `waypoint` binary ([`cli`]) runs it.
//! * [`reload`] — hot reload: valid edits publish a new snapshot, broken ones are logged
//!   and the old snapshot keeps serving; a tunnel keeps the snapshot it started with.
//! * [`telemetry`] — `istio_requests_total`, `istio_request_duration_milliseconds`,
//!   `istio_request_bytes`, `istio_response_bytes` (`reporter="waypoint"`, Istio's labels,
//!   the original client from the tunnel), one access-log line per request (tracing target
//!   `access`), `traceparent` kept when valid, else generated, and sent upstream.
//! * [`admin`] — `/stats/prometheus` and `/healthz/ready` on `waypoint.stats`.
//! * [`spec_example`] — the spec's R17 `echo` → `echo-v1` HTTPRoute, verbatim, which the
//!   bench mesh deploys and the tests route by.
//!
//! * [`inner`] — per-tunnel protocol detection (HTTP/2 prior knowledge, HTTP/1.1, opaque
//!   TCP), the CONNECT stream as a byte stream for `h2`, the opaque TCP splice (L4 policy
//!   only, Istio's rules for HTTP-only fields: [`authz::evaluate_tcp`]).
//! * [`h2srv`] — HTTP/2 inside the tunnel: many concurrent streams, the same policy and
//!   routing as HTTP/1.1; upstream HTTP/1.1 over HBONE, or HTTP/2 multiplexed per worker
//!   with DestinationRule `useClientProtocol`; protocol errors → GOAWAY.
//!
//! * [`body`] — HTTP/1.1 bodies streamed as they pass (Content-Length and chunked both
//!   ways, an end-of-connection body re-framed chunked), with bounded memory per request.
//!
//! HTTP/1.1 requests and responses are streamed; `Expect: 100-continue` is answered by the
//! waypoint once policy and routing allow the request; upgrades (`101`) become raw byte
//! splices. HTTP/2 requests are handled natively (no HTTP/1.1 round trip inside): to an
//! HTTP/1.1 upstream on the same streaming core, to an HTTP/2 upstream frame by frame.
//! Only mirrored copies are buffered (and only bodies within the replay buffer are
//! mirrored).

pub mod admin;
pub mod authz;
pub mod body;
pub mod breaker;
pub mod cel;
pub mod cli;
pub mod config;
pub mod ext_authz;
pub mod h2srv;
pub mod http1;
pub mod inner;
pub mod jwks;
pub mod jwt;
pub mod lb;
pub mod logfmt;
pub mod path;
pub mod plain;
pub mod reload;
pub mod route;
pub mod service;
pub mod source;
pub mod spans;
pub mod spec_example;
pub mod target;
pub mod telemetry;
pub mod upstream;
