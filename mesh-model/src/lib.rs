//! # mesh-model
//!
//! The routing model shared by ztunnel and the waypoint (rules R1–R12 of
//! `shared/spec/ambient-routing.md`). Pure logic: no sockets, no threads.
//!
//! * [`wire`] — prost types generated from `proto/`, written for this project with the
//!   message names, field names and numbers of Istio's workload-discovery API (`Address`,
//!   `Workload`, `Service`, `GatewayAddress`, `Authorization`, …), so an xDS client can
//!   decode istiod's resources straight into them.
//! * [`model`] — the internal types (`Workload`, `Service`, `Namespace`, `Waypoint`, …).
//! * [`snapshot`] — [`snapshot::Snapshot`]: immutable, versioned, indexed by workload IP,
//!   service VIP and identity; built by [`snapshot::Snapshot::from_wire`].
//! * [`binding`] — capture (R2) and waypoint binding (R3) as pure functions.
//! * [`authz`] — L4 authorization (Istio's L4 subset) and its evaluation.
//! * [`route`] — [`route::outbound`] (R1, R4–R8) and [`route::inbound`] (R9–R12), with an
//!   injected [`route::Chooser`] for random and round-robin choices.
//! * [`config`] — the local YAML file → wire types → snapshot.
//! * [`names`] — Kubernetes' name, label and hostname syntax the local file is checked
//!   against (a workload name with a control character would make a bad header).
//!
//! ## Local configuration file
//!
//! The shape of istio/ztunnel's local config (`workloads`, `services`, `policies`, camelCase
//! keys), extended with `namespaces`, `waypoints` and `nodes`. Every key not listed here is
//! an error naming file:line:column and the field; so are duplicate IPs and references to
//! things that are not defined. The file plays istiod's part: it applies R2 and R3 when it
//! fills the wire fields `tunnel_protocol` and `waypoint`.
//!
//! ### `workloads[]` → `istio.workload.Workload`
//! | key | wire field | notes |
//! |-----|-----------|-------|
//! | `uid` | `uid` | default `namespace/name`; must be unique |
//! | `name`, `namespace` | `name`, `namespace` | required |
//! | `serviceAccount` | `service_account` | default `default` |
//! | `trustDomain` | `trust_domain` | default `cluster.local` |
//! | `workloadIps` | `addresses` | IPv4/IPv6; unique across workloads and service VIPs |
//! | `hostname` | `hostname` | kept, not resolved |
//! | `protocol` | `tunnel_protocol` | `HBONE` (captured) / `TCP`; absent: R2 from labels |
//! | `node` | `node` | names a `nodes[]` entry for the HBONE target (else the pod IP) |
//! | `network`, `clusterId` | `network`, `cluster_id` | |
//! | `canonicalName`, `canonicalRevision`, `workloadName` | same, snake_case | telemetry |
//! | `services` | `services` | `"namespace/hostname": {servicePort: targetPort}`; the service must exist |
//! | `authorizationPolicies` | `authorization_policies` | `namespace/name` of `WorkloadSelector` policies; must exist |
//! | `status` | `status` | `Healthy` (default) / `Unhealthy` (never chosen) |
//! | `capacity` | `capacity` | weight for weighted random, default 1 |
//! | `nativeTunnel` | `native_tunnel` | kept |
//! | `waypoint` | `waypoint` | explicit, ztunnel's form `{destination: {Address: "net/ip"}, hboneMtlsPort: 15008}`; absent: R3 |
//! | `locality` | `locality` | `{region, zone, subzone}` (its node's topology labels), for services that prefer close endpoints |
//! | `labels` | — | extension: the pod's labels, as in Kubernetes (`app: echo`, `version: v1`): kept in the model ([`model::Workload::labels`]) for `selector` policies and telemetry; `istio.io/dataplane-mode` (`ambient`/`none`) and `istio.io/use-waypoint`(`-namespace`) also drive R2/R3 |
//!
//! ### `services[]` → `istio.workload.Service`
//! | key | wire field | notes |
//! |-----|-----------|-------|
//! | `name`, `namespace`, `hostname` | same | required; `namespace/hostname` is the key |
//! | `vips` | `addresses` | `network/ip` (`/10.0.0.1`) or `ip`; unique |
//! | `ports` | `ports` | `{servicePort: targetPort}` |
//! | `subjectAltNames` | `subject_alt_names` | kept |
//! | `endpoints` | workloads' `services` | extension: `[{workloadUid, ports?}]`, `ports` overrides the target ports for that endpoint; the workload must exist |
//! | `loadBalancing` | `extensions` | extension: `WeightedRandom` (default) / `RoundRobin` (an `Extension` named [`snapshot::ROUND_ROBIN_EXTENSION`]) |
//! | `waypoint` | `waypoint` | explicit, as for workloads |
//! | `labels` | `waypoint` | extension: `istio.io/use-waypoint` binds the service's waypoint |
//! | `trafficDistribution` | `load_balancing` | Kubernetes': `PreferClose` (and `PreferSameZone`) → scopes network, region, zone, subzone, mode failover, as istiod sends it; `PreferSameNode` adds the node. A client's endpoints are those sharing the longest run of scopes with it, the next tier when none is healthy ([`model::Preference`]); ztunnel measures from the client workload, the waypoint from its own |
//! | `internalTrafficPolicy` | `load_balancing` | Kubernetes': `Local` → the client's node only, strictly (none there: refused); `Cluster` (default) |
//!
//! ### `policies[]` → `istio.security.Authorization`
//! `name`, `namespace`, `scope` (`Global` default, `Namespace`, `WorkloadSelector`; the
//! upper-case proto names too), `selector: {matchLabels: {…}}` (extension, Istio's workload
//! selector: scope `WorkloadSelector` implied; resolved as istiod does into the
//! `authorization_policies` of every workload whose `labels` match, in the policy's
//! namespace, or in every namespace when the policy is in the root namespace
//! `istio-system`), `action` (`Allow` default, `Deny`), `dryRun` → `dry_run`,
//! `rules: [[[match]]]` → `rules[].clauses[].matches[]`. A match has `namespaces`,
//! `principals` (string matches: ztunnel's `{Exact|Prefix|Suffix: s}` / `{Presence: {}}`,
//! or Istio's `"*"`, `"abc*"`, `"*abc"`, `"abc"`), `serviceAccounts`
//! (`[{namespace, serviceAccount}]`), `sourceIps`, `destinationIps` (CIDRs or bare IPs),
//! `destinationPorts`, each also as `notNamespaces`, `notPrincipals`, … Principals are
//! written without `spiffe://` (`cluster.local/ns/a/sa/b`).
//!
//! ### `peerAuthentications[]` → `istio.security.Authorization` (as istiod converts them)
//! Istio's `PeerAuthentication`: `name`, `namespace`, `selector: {matchLabels: {…}}`,
//! `mtls: {mode}` and `portLevelMtls: {targetPort: {mode}}`, modes `UNSET` (inherit, the
//! default), `PERMISSIVE`, `STRICT`, `DISABLE` (plaintext accepted, as `PERMISSIVE`: ambient
//! inbound always takes HBONE). A workload's mode is its own policy's, else its namespace's
//! (no selector), else the mesh's (no selector, in `istio-system`). As istiod does for
//! ztunnel, strict workloads get the `DENY` of unauthenticated connections
//! `istio-system/istio_converted_static_strict`, and a workload policy with port modes
//! that differ becomes `<namespace>/converted_peer_authentication_<name>` (unauthenticated
//! denied except on its plaintext ports, or only on its strict ones). ztunnel enforces
//! them before an R12 hairpin too: a STRICT pod's plaintext never reaches its waypoint.
//! Load errors: `portLevelMtls` without a selector; a selector in the root namespace (it
//! would select nothing); two mesh-wide policies, two in one namespace, or two selecting
//! one workload (istiod keeps the oldest; a file cannot tell); port 0.
//! See [`config::LocalPeerAuthentication`].
//!
//! ### `serviceEntries[]` → a service and workloads outside the mesh (as istiod converts them)
//! Istio's `ServiceEntry`, its `metadata` beside its `spec` as for PeerAuthentications:
//! `name`, `namespace`, `labels` (`istio.io/use-waypoint: <name>` binds it to a waypoint:
//! its traffic goes there, R7 — egress through a waypoint), `hosts` (one, no wildcard: the
//! service's hostname), `addresses` (its VIPs), `ports` (`number`, `name`, `protocol` —
//! checked, UDP refused —, `targetPort`), `location`, `resolution` (`STATIC`: the
//! endpoints' IPs; `DNS`: the endpoints' host names, or the host itself when there are
//! none, resolved when the file is loaded, and looked up again by ztunnel and the waypoint
//! every `dns_refresh`: a changed answer loads the file again), `endpoints` (`address`,
//! `ports` by port name, `labels`, `network`, `locality` as `region/zone/subzone`,
//! `weight`, `serviceAccount`) and `subjectAltNames`. Each endpoint address becomes a
//! workload outside the mesh (R1: reached in plain TCP by ztunnel, by a waypoint in plain
//! TCP or the TLS its DestinationRule originates), one per address even when several
//! entries list it. The service is named after the entry, so the waypoint's routes,
//! policies and DestinationRules name it as they name a Service (or by its host). Load
//! errors name the field: `resolution: NONE`/`DNS_ROUND_ROBIN`, wildcard or several
//! hosts, `workloadSelector`, `exportTo` other than `*`, an address that does not resolve,
//! an endpoint at a pod's address or a VIP, a VIP already used. An entry without
//! `addresses` is given one VIP from 240.240.0.0/16, as Istio allocates them
//! ([`config::allocate_vip`]), which ztunnel's DNS proxy answers its host with. See
//! [`config::LocalServiceEntry`].
//!
//! ### Extensions
//! * `namespaces[]`: `{name, labels}` — `istio.io/dataplane-mode: ambient` captures the
//!   namespace's pods (R2); `istio.io/use-waypoint: <name>` binds its pods (R3).
//! * `waypoints[]`: a Gateway — `{name, namespace, address: "ip" | "ip:port" (port 15008
//!   by default), serviceAccount (default: name), trustDomain, network, annotations,
//!   labels}`; `annotations: {istio.io/for-service-account: <sa>}` restricts it to that
//!   account; `labels: {istio.io/waypoint-for: service|workload|all|none}` chooses the
//!   traffic it takes (default `all`, the spec's; Istio 1.22+ labels its waypoints
//!   `service`): see [`model::WaypointFor`] and [`route`].
//! * `nodes[]`: `{name, ztunnel: ip}` — where HBONE for that node's pods goes (port 15008).
//!
//! R3 precedence for a pod: its own `use-waypoint` label, then a service-account waypoint
//! (which beats any namespace-wide binding), then the namespace's `use-waypoint` label, then
//! a namespace waypoint (no annotation). `none` opts out. A waypoint never binds itself.

pub mod authz;
pub mod binding;
pub mod config;
pub mod identity;
pub mod model;
pub mod names;
pub mod route;
pub mod snapshot;

/// Generated by prost from `proto/` (Istio's workload-discovery API field names and numbers).
pub mod wire {
    /// `istio.workload`: `Address`, `Workload`, `Service`, `GatewayAddress`, …
    #[allow(clippy::all, missing_docs, rust_2018_idioms)]
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    }
    /// `istio.security`: `Authorization` and its rules, clauses and matches.
    #[allow(clippy::all, missing_docs, rust_2018_idioms)]
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
}
