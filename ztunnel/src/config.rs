//! The ztunnel configuration file: mesh-model's local YAML (`workloads`, `services`,
//! `policies`, `namespaces`, `waypoints`, `nodes`, see the `mesh_model` crate docs for every
//! field) plus three sections of this proxy:
//!
//! ```yaml
//! ztunnel:
//!   node: node-a                      # required: which workloads are "on this node"
//!   address: 127.0.1.10               # default IP of every listener below (default 127.0.0.1)
//!   address6: "::"                    # optional, dual stack: the outbound, hbone and plaintext
//!                                     # listeners are bound again on this IPv6 address, same
//!                                     # ports (IPv6-only sockets; IPv6 capture lands there)
//!   socks5: 127.0.0.1:15080           # outbound SOCKS5 (default <address>:15080)
//!   outbound: 0.0.0.0:15001           # transparent outbound capture (optional; off if unset)
//!   hbone: 127.0.1.10:15008           # inbound HBONE (default <address>:15008)
//!   plaintext:                        # inbound plaintext (optional; see below)
//!     - listen: 127.0.1.10:15006
//!       target: 127.0.1.2:8080        # optional: the pod when not redirected (see below)
//!   admin: 127.0.0.1:15000            # /config_dump (default <address>:15000)
//!   stats: 127.0.1.10:15020           # /stats/prometheus (default <address>:15020)
//!   readiness: 127.0.1.10:15021       # /healthz/ready (default <address>:15021)
//!   trust_domain: cluster.local
//!   identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel   # this ztunnel's own
//!   peer_identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel  # other nodes' ztunnels
//!   cluster_id: Kubernetes            # `k8s.cluster.name` in outbound `baggage` (default)
//!   ca: { builtin: /var/lib/mesh/ca }  # or { plugin: DIR } or { static: DIR }
//!   capture: { table: ztunnel_capture } # optional: this process owns the node's nftables
//!                                     # capture rules and keeps them in step with reloads
//!                                     # (needs root; see `crate::capture`)
//!   dns:                              # optional: the DNS proxy (see `crate::dns`); with
//!     listen: 0.0.0.0:15053           # `capture`, captured pods' DNS (UDP, TCP) goes to its port
//!     upstream: [10.96.0.10:53]       # default: the nameservers of /etc/resolv.conf
//!   dns_refresh: 60s                  # default (Istio's dnsRefreshRate): how often DNS
//!                                     # ServiceEntries' host names are looked up again (an
//!                                     # answer that changed reloads the file); 0s: at load
//! runtime: { workers: 2 }             # runtime knobs (optional; replaces the profile's)
//! h2: { max_streams_per_connection: 100 }  # HTTP/2 knobs (optional; replaces the profile's)
//! workloads: []
//! services: []
//! ```
//!
//! **Transparent capture** (see [`crate::capture`]): node-level `tproxy` rules hand a
//! captured pod's outbound TCP to `outbound` (Istio's `:15001`), HBONE addressed to a
//! captured pod to `hbone` and any other TCP addressed to a captured pod to a `plaintext`
//! listener (Istio's `:15006`); the socket's local address is the original destination.
//! These listeners are transparent (`IP_TRANSPARENT`, needs `CAP_NET_ADMIN`) and bound on
//! `0.0.0.0`; `REDIRECT` (this node's own HBONE to a pod of the node, or rules of an older
//! install) is read back with `SO_ORIGINAL_DST`.
//!
//! **Plaintext inbound**: the destination is the connection's original destination (its
//! local address, or `SO_ORIGINAL_DST` after a `REDIRECT`). A connection that was not redirected (made to the listener itself,
//! as on loopback without root) has none; it is then treated as captured plaintext to the
//! listener's `target` (the one local pod address it stands for), and refused (reset) when
//! no `target` is set. Either way R9–R12 apply as for any captured plaintext.
//!
//! **Identities on HBONE**: every tunnel uses the identity of the workload it acts for.
//! Outbound, the client certificate is the source workload's. Inbound, the `hbone` listener
//! picks its certificate per connection from the address the connection was made to (its
//! local address when that is a pod's, as after capture's `tproxy` of `podIP:15008`, else
//! its `SO_ORIGINAL_DST`, else its local address): a captured workload of this node there → that workload's certificate (and the
//! connection's CONNECT streams may only target it, else 400); anything else, i.e. the
//! node's own address → this ztunnel's certificate (`identity`). So an outbound tunnel to a
//! pod (no `nodes[].ztunnel` for its node: Istio's `podIP:15008`) requires exactly the
//! destination's identity; one addressed to another node's ztunnel (`nodes[].ztunnel`)
//! accepts the destination's identity or `peer_identity`. A waypoint must present its own
//! identity. The R12 hairpin to a waypoint is made as this ztunnel's identity.
//!
//! Only the mesh part (workloads … nodes) is hot-reloaded; a change to the `ztunnel`,
//! `runtime` or `h2` sections is logged and needs a restart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use hbone::proxy::CaConfig;
use hbone::H2Settings;
use mesh_model::config::{
    LocalConfig, LocalNamespace, LocalNode, LocalPeerAuthentication, LocalPolicy, LocalService,
    LocalServiceEntry, LocalWaypoint, LocalWorkload,
};
use mesh_model::snapshot::Snapshot;
use runtime::config::{ConfigError, Invalid, RuntimeConfig};
use serde::Deserialize;

/// Istio's ports.
pub const SOCKS5_PORT: u16 = 15080;
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
pub const HBONE_PORT: u16 = 15008;
pub const PLAINTEXT_PORT: u16 = 15006;
pub const ADMIN_PORT: u16 = 15000;
pub const STATS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;

/// Istio's default `CLUSTER_ID`.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

pub const DEFAULT_ZTUNNEL_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaintextListener {
    pub listen: SocketAddr,
    /// The local pod address a connection is for when it has no original destination
    /// (it was not redirected).
    #[serde(default)]
    pub target: Option<SocketAddr>,
}

/// `ztunnel.capture`: the process installs and updates the node's capture rules.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSettings {
    /// nftables table (family `inet`) the rules live in.
    #[serde(default = "default_capture_table")]
    pub table: String,
}

fn default_capture_table() -> String {
    crate::capture::DEFAULT_TABLE.to_string()
}

/// The `ztunnel:` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZtunnelSection {
    pub node: String,
    #[serde(default)]
    pub address: Option<IpAddr>,
    #[serde(default)]
    pub address6: Option<std::net::Ipv6Addr>,
    #[serde(default)]
    pub socks5: Option<SocketAddr>,
    #[serde(default)]
    pub outbound: Option<SocketAddr>,
    #[serde(default)]
    pub hbone: Option<SocketAddr>,
    #[serde(default)]
    pub plaintext: Vec<PlaintextListener>,
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    #[serde(default)]
    pub stats: Option<SocketAddr>,
    #[serde(default)]
    pub readiness: Option<SocketAddr>,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub peer_identity: Option<String>,
    /// The cluster this node belongs to: `k8s.cluster.name` in the `baggage` of outbound
    /// CONNECTs (Istio's `CLUSTER_ID`, default `Kubernetes`).
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(with = "serde_norway::with::singleton_map")]
    pub ca: CaConfig,
    #[serde(default)]
    pub capture: Option<CaptureSettings>,
    /// How often the host names of `DNS` ServiceEntries are looked up again (default 60 s,
    /// Istio's `dnsRefreshRate`; `0s`: only when the file is loaded).
    #[serde(default = "default_dns_refresh", with = "runtime::config::duration")]
    pub dns_refresh: std::time::Duration,
    /// The DNS proxy ([`crate::dns`]), when set.
    #[serde(default)]
    pub dns: Option<DnsSection>,
}

/// `ztunnel.dns`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// UDP and TCP address (default `<address>:15053`; with capture, `0.0.0.0:15053`: captured
    /// queries arrive on the pod veth's node address).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Where other queries go (default: the nameservers of `/etc/resolv.conf`).
    #[serde(default)]
    pub upstream: Vec<SocketAddr>,
}

/// The DNS proxy's resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    pub listen: SocketAddr,
    pub upstream: Vec<SocketAddr>,
}

/// Istio's ztunnel DNS port.
pub const DNS_PORT: u16 = 15053;

fn default_dns_refresh() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

/// The whole file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZtunnelFile {
    pub ztunnel: ZtunnelSection,
    #[serde(default)]
    pub runtime: Option<RuntimeConfig>,
    #[serde(default)]
    pub h2: Option<H2Settings>,
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    #[serde(default)]
    pub services: Vec<LocalService>,
    #[serde(default)]
    pub policies: Vec<LocalPolicy>,
    #[serde(default)]
    pub namespaces: Vec<LocalNamespace>,
    #[serde(default)]
    pub waypoints: Vec<LocalWaypoint>,
    #[serde(default)]
    pub nodes: Vec<LocalNode>,
    #[serde(default, rename = "peerAuthentications")]
    pub peer_authentications: Vec<LocalPeerAuthentication>,
    /// Istio's ServiceEntries ([`mesh_model::config::LocalServiceEntry`]).
    #[serde(default, rename = "serviceEntries")]
    pub service_entries: Vec<LocalServiceEntry>,
}

/// Resolved listener addresses and identities.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub node: String,
    pub socks5: SocketAddr,
    /// The transparent outbound capture listener (`:15001`), when configured.
    pub outbound: Option<SocketAddr>,
    pub hbone: SocketAddr,
    pub plaintext: Vec<PlaintextListener>,
    /// Dual stack: the outbound, hbone and plaintext listeners again on this IPv6 address.
    pub address6: Option<std::net::Ipv6Addr>,
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    pub readiness: SocketAddr,
    pub trust_domain: String,
    pub identity: hbone::Identity,
    pub peer_identity: hbone::Identity,
    /// `ztunnel.cluster_id`, default [`DEFAULT_CLUSTER_ID`].
    pub cluster_id: String,
    /// `ztunnel.dns_refresh`, and the resolver it looks up with (the system's; a test may
    /// put its own).
    pub dns_refresh: std::time::Duration,
    pub dns_resolver: mesh_model::config::ResolverFn,
    /// `ztunnel.dns`: the DNS proxy, when on.
    pub dns: Option<DnsSettings>,
    pub ca: CaConfig,
    /// Set: this process owns the node's capture rules (see [`crate::capture`]).
    pub capture: Option<CaptureSettings>,
    pub runtime: RuntimeConfig,
    pub h2: H2Settings,
}

/// A loaded file: the proxy's settings and the first snapshot of the mesh.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub snapshot: Snapshot,
    /// The text these were read from ([`load_file`]): the watcher's text in force, so an
    /// edit saved after this load is applied (and a failed read later is no reason to
    /// reload). `None` from [`load_str`], whose caller holds the text: a watcher started
    /// with it takes the file's text as new.
    pub text: Option<String>,
}

fn read(file: &Path) -> Result<String, ConfigError> {
    runtime::config::read_file(file)
}

fn parse_id(field: &str, s: &str) -> Result<hbone::Identity, Invalid> {
    s.parse::<hbone::Identity>()
        .map_err(|e| Invalid::new(field, e.to_string()))
}

impl ZtunnelFile {
    fn mesh(&self) -> LocalConfig {
        LocalConfig {
            workloads: self.workloads.clone(),
            services: self.services.clone(),
            policies: self.policies.clone(),
            namespaces: self.namespaces.clone(),
            waypoints: self.waypoints.clone(),
            nodes: self.nodes.clone(),
            peer_authentications: self.peer_authentications.clone(),
            service_entries: self.service_entries.clone(),
        }
    }

    fn settings(&self, profile: &tuning::Profile) -> Result<Settings, Invalid> {
        let z = &self.ztunnel;
        if z.node.is_empty() {
            return Err(Invalid::new("ztunnel.node", "must name this node"));
        }
        let ip = z.address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let at = |a: Option<SocketAddr>, port| a.unwrap_or(SocketAddr::new(ip, port));
        let runtime = self.runtime.clone().unwrap_or(profile.runtime.clone());
        runtime.validate("runtime")?;
        let h2 = self.h2.clone().unwrap_or(profile.h2.clone());
        h2.validate()?;
        if h2.max_streams_per_connection == 0 {
            return Err(Invalid::new(
                "h2.max_streams_per_connection",
                "must be at least 1",
            ));
        }
        if let Some(c) = &z.capture {
            let ok = !c.table.is_empty()
                && c.table
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(Invalid::new(
                    "ztunnel.capture.table",
                    "an nftables table name: letters, digits and `_`",
                ));
            }
        }
        let identity = parse_id(
            "ztunnel.identity",
            z.identity.as_deref().unwrap_or(DEFAULT_ZTUNNEL_IDENTITY),
        )?;
        let peer_identity = match &z.peer_identity {
            Some(p) => parse_id("ztunnel.peer_identity", p)?,
            None => identity.clone(),
        };
        Ok(Settings {
            node: z.node.clone(),
            socks5: at(z.socks5, SOCKS5_PORT),
            outbound: z.outbound,
            hbone: at(z.hbone, HBONE_PORT),
            plaintext: z.plaintext.clone(),
            address6: z.address6,
            admin: at(z.admin, ADMIN_PORT),
            stats: at(z.stats, STATS_PORT),
            readiness: at(z.readiness, READINESS_PORT),
            trust_domain: z
                .trust_domain
                .clone()
                .unwrap_or_else(|| "cluster.local".into()),
            identity,
            peer_identity,
            cluster_id: z
                .cluster_id
                .clone()
                .unwrap_or_else(|| DEFAULT_CLUSTER_ID.into()),
            dns_refresh: z.dns_refresh,
            dns_resolver: mesh_model::config::ResolverFn::default(),
            dns: z.dns.as_ref().map(|d| DnsSettings {
                listen: d.listen.unwrap_or(SocketAddr::new(ip, DNS_PORT)),
                upstream: if d.upstream.is_empty() {
                    crate::dns::system_upstreams()
                } else {
                    d.upstream.clone()
                },
            }),
            ca: z.ca.clone(),
            capture: z.capture.clone(),
            runtime,
            h2,
        })
    }
}

/// Parse and validate a config text; `version` numbers the snapshot.
pub fn load_str(
    file: &Path,
    text: &str,
    profile: &tuning::Profile,
    version: u64,
) -> Result<Loaded, ConfigError> {
    load_str_with(
        file,
        text,
        profile,
        version,
        &mesh_model::config::system_resolver,
    )
}

/// [`load_str`], the `DNS` ServiceEntries' host names looked up by `resolve`.
pub fn load_str_with(
    file: &Path,
    text: &str,
    profile: &tuning::Profile,
    version: u64,
    resolve: mesh_model::config::Resolver<'_>,
) -> Result<Loaded, ConfigError> {
    let f: ZtunnelFile = runtime::config::from_yaml_str(file, text)?;
    let settings = f
        .settings(profile)
        .map_err(|e| e.in_file(file, Some(text)))?;
    let wire = f
        .mesh()
        .compile_with(resolve)
        .map_err(|e| e.in_file(file, Some(text)))?;
    let snapshot = Snapshot::from_wire(version, &wire).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: None,
        column: None,
        field: None,
        message: e.to_string(),
    })?;
    Ok(Loaded {
        settings,
        snapshot,
        text: None,
    })
}

/// Read a file and [`load_str`] it.
pub fn load_file(
    file: &Path,
    profile: &tuning::Profile,
    version: u64,
) -> Result<Loaded, ConfigError> {
    let text = read(file)?;
    let loaded = load_str(file, &text, profile, version)?;
    Ok(Loaded {
        text: Some(text),
        ..loaded
    })
}

/// Where the config came from, for reloads.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: PathBuf,
    pub profile: tuning::Profile,
}
