//! L4 authorization: Istio's AuthorizationPolicy reduced to what a node proxy sees
//! (identities, addresses, ports), built from the wire `Authorization`.
//!
//! A policy has rules; a rule matches when **all** its clauses match; a clause matches when
//! **some** of its matches match; a match matches when **every** field it sets matches, a
//! field matching when **some** value matches (and, for `not_` fields, **none** does).
//! Evaluation for one connection over the policies that apply to its destination: any
//! matching DENY denies; with no ALLOW policy the connection is allowed; otherwise some ALLOW
//! must match. Dry-run policies are evaluated and reported but never decide.

use std::net::{IpAddr, SocketAddr};

use crate::model::{ip_from_bytes, Identity, Workload};
use crate::wire::security as w;

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every workload in the mesh.
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// The workloads listing the policy in their `authorization_policies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// A string condition. Principals are matched without `spiffe://` (Istio's form).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value: "some identity" for principals and namespaces.
    Presence,
}

impl StringMatch {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(e) => s == e,
            StringMatch::Prefix(p) => s.starts_with(p.as_str()),
            StringMatch::Suffix(x) => s.ends_with(x.as_str()),
            StringMatch::Presence => !s.is_empty(),
        }
    }
}

/// An IP prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!(
                "prefix length {len} is longer than {max} for {addr}"
            ));
        }
        Ok(Cidr { addr, len })
    }

    /// An IPv4 prefix never contains an IPv6 address and the other way round.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    /// `10.0.0.0/8`, `fd00::/64`, or a bare address (a host prefix).
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("invalid IP address {ip:?} in CIDR {s:?}"))?;
        let len = match len {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .map_err(|_| format!("invalid prefix length in CIDR {s:?}"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, len)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A `(namespace, service account)` pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// One match: fields AND, values OR. An empty match matches nothing (as in ztunnel).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// A connection as authorization sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection<'a> {
    /// The peer's verified identity; `None` for plaintext (R10).
    pub peer: Option<&'a Identity>,
    pub src: IpAddr,
    pub dst: SocketAddr,
}

fn field<T>(pos: &[T], neg: &[T], mut pred: impl FnMut(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&mut pred)) && !neg.iter().any(pred)
}

impl Match {
    fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    pub fn matches(&self, c: &Connection<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let principal = c.peer.map(Identity::principal).unwrap_or_default();
        let ns = c.peer.map(|p| p.namespace.as_str()).unwrap_or_default();
        field(&self.namespaces, &self.not_namespaces, |m| m.matches(ns))
            && field(&self.principals, &self.not_principals, |m| {
                m.matches(&principal)
            })
            && field(&self.service_accounts, &self.not_service_accounts, |m| {
                c.peer.is_some_and(|p| {
                    p.namespace == m.namespace && p.service_account == m.service_account
                })
            })
            && field(&self.source_ips, &self.not_source_ips, |n| {
                n.contains(c.src)
            })
            && field(&self.destination_ips, &self.not_destination_ips, |n| {
                n.contains(c.dst.ip())
            })
            && field(&self.destination_ports, &self.not_destination_ports, |p| {
                *p == c.dst.port()
            })
    }
}

/// istiod's name for the policy it sends for workloads whose PeerAuthentication mode is
/// `STRICT` on every port (in the root namespace): a `DENY` of connections without a peer
/// identity. No Kubernetes object can take it (`_`).
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";

/// istiod's prefix for a PeerAuthentication with port-level modes, converted to a policy in
/// its namespace.
pub const CONVERTED_PEER_AUTHENTICATION_PREFIX: &str = "converted_peer_authentication_";

/// One policy: rules → clauses → matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// `rules[rule][clause][match]`.
    pub rules: Vec<Vec<Vec<Match>>>,
    pub dry_run: bool,
}

impl Policy {
    /// `namespace/name`, as workloads reference it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether it stands for a PeerAuthentication (by istiod's names for them).
    pub fn from_peer_authentication(&self) -> bool {
        self.name == STATIC_STRICT_POLICY
            || self.name.starts_with(CONVERTED_PEER_AUTHENTICATION_PREFIX)
    }

    /// Does some rule match? (No rules: matches nothing.)
    pub fn matches(&self, c: &Connection<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.iter()
                .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(c)))
        })
    }

    /// Does it apply to connections to `dst`?
    pub fn applies_to(&self, dst: &Workload) -> bool {
        match self.scope {
            Scope::Global => true,
            Scope::Namespace => self.namespace == dst.namespace,
            Scope::WorkloadSelector => dst.authorization_policies.contains(&self.key()),
        }
    }
}

/// Why a connection was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// This DENY policy matched.
    DenyPolicy(String),
    /// This ALLOW policy matched.
    AllowPolicy(String),
    /// No (enforced) ALLOW policy applies: allowed.
    NoAllowPolicies,
    /// ALLOW policies apply (listed) but none matched: denied.
    NoAllowMatched(Vec<String>),
}

/// What a dry-run policy would have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    pub policy: String,
    pub action: Action,
    pub matched: bool,
}

/// The outcome of authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub reason: Reason,
    pub dry_run: Vec<DryRun>,
}

impl Verdict {
    /// The policy that decided, if one did (`None`: allowed for lack of ALLOW policies, or
    /// denied because no ALLOW policy matched).
    pub fn policy(&self) -> Option<&str> {
        match &self.reason {
            Reason::DenyPolicy(p) | Reason::AllowPolicy(p) => Some(p),
            _ => None,
        }
    }
}

/// Evaluate `policies` (already narrowed to those that apply) for one connection.
pub fn evaluate<'p>(policies: impl IntoIterator<Item = &'p Policy>, c: &Connection<'_>) -> Verdict {
    let mut dry_run = Vec::new();
    let mut deny = None;
    let mut allows = Vec::new();
    let mut allowed_by = None;
    for p in policies {
        let matched = p.matches(c);
        if p.dry_run {
            dry_run.push(DryRun {
                policy: p.key(),
                action: p.action,
                matched,
            });
            continue;
        }
        match p.action {
            Action::Deny if matched && deny.is_none() => deny = Some(p.key()),
            Action::Deny => {}
            Action::Allow => {
                if matched && allowed_by.is_none() {
                    allowed_by = Some(p.key());
                }
                allows.push(p.key());
            }
        }
    }
    let (allowed, reason) = if let Some(d) = deny {
        (false, Reason::DenyPolicy(d))
    } else if allows.is_empty() {
        (true, Reason::NoAllowPolicies)
    } else if let Some(a) = allowed_by {
        (true, Reason::AllowPolicy(a))
    } else {
        (false, Reason::NoAllowMatched(allows))
    };
    Verdict {
        allowed,
        reason,
        dry_run,
    }
}

/// An invalid wire policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy}: {message}")]
pub struct PolicyError {
    pub policy: String,
    pub message: String,
}

fn string_match(m: &w::StringMatch) -> Option<StringMatch> {
    use w::string_match::MatchType;
    Some(match m.match_type.as_ref()? {
        MatchType::Exact(s) => StringMatch::Exact(s.clone()),
        MatchType::Prefix(s) => StringMatch::Prefix(s.clone()),
        MatchType::Suffix(s) => StringMatch::Suffix(s.clone()),
        MatchType::Presence(()) => StringMatch::Presence,
    })
}

impl TryFrom<&w::Authorization> for Policy {
    type Error = PolicyError;

    fn try_from(a: &w::Authorization) -> Result<Self, PolicyError> {
        let err = |message: String| PolicyError {
            policy: format!("{}/{}", a.namespace, a.name),
            message,
        };
        let cidrs = |v: &[w::Address]| -> Result<Vec<Cidr>, PolicyError> {
            v.iter()
                .map(|x| {
                    let ip = ip_from_bytes(&x.address)
                        .ok_or_else(|| err(format!("address of {} bytes", x.address.len())))?;
                    let len = u8::try_from(x.length).map_err(|_| err("bad prefix".into()))?;
                    Cidr::new(ip, len).map_err(err)
                })
                .collect()
        };
        let ports = |v: &[u32]| -> Result<Vec<u16>, PolicyError> {
            v.iter()
                .map(|p| u16::try_from(*p).map_err(|_| err(format!("port {p} out of range"))))
                .collect()
        };
        let strings = |v: &[w::StringMatch]| v.iter().filter_map(string_match).collect();
        let sas = |v: &[w::ServiceAccountMatch]| {
            v.iter()
                .map(|s| ServiceAccountMatch {
                    namespace: s.namespace.clone(),
                    service_account: s.service_account.clone(),
                })
                .collect()
        };
        let mut rules = Vec::with_capacity(a.rules.len());
        for r in &a.rules {
            let mut clauses = Vec::with_capacity(r.clauses.len());
            for c in &r.clauses {
                let mut matches = Vec::with_capacity(c.matches.len());
                for m in &c.matches {
                    matches.push(Match {
                        namespaces: strings(&m.namespaces),
                        not_namespaces: strings(&m.not_namespaces),
                        principals: strings(&m.principals),
                        not_principals: strings(&m.not_principals),
                        service_accounts: sas(&m.service_accounts),
                        not_service_accounts: sas(&m.not_service_accounts),
                        source_ips: cidrs(&m.source_ips)?,
                        not_source_ips: cidrs(&m.not_source_ips)?,
                        destination_ips: cidrs(&m.destination_ips)?,
                        not_destination_ips: cidrs(&m.not_destination_ips)?,
                        destination_ports: ports(&m.destination_ports)?,
                        not_destination_ports: ports(&m.not_destination_ports)?,
                    });
                }
                clauses.push(matches);
            }
            rules.push(clauses);
        }
        let scope = match w::Scope::try_from(a.scope) {
            Ok(w::Scope::Global) => Scope::Global,
            Ok(w::Scope::Namespace) => Scope::Namespace,
            Ok(w::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => return Err(err(format!("unknown scope {}", a.scope))),
        };
        let action = match w::Action::try_from(a.action) {
            Ok(w::Action::Allow) => Action::Allow,
            Ok(w::Action::Deny) => Action::Deny,
            Err(_) => return Err(err(format!("unknown action {}", a.action))),
        };
        Ok(Policy {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            scope,
            action,
            rules,
            dry_run: a.dry_run,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    fn conn<'a>(peer: Option<&'a Identity>, src: &str, dst: &str) -> Connection<'a> {
        Connection {
            peer,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    fn policy(name: &str, action: Action, matches: Vec<Match>) -> Policy {
        Policy {
            name: name.into(),
            namespace: "ns".into(),
            scope: Scope::Namespace,
            action,
            rules: if matches.is_empty() {
                vec![]
            } else {
                vec![vec![matches]]
            },
            dry_run: false,
        }
    }

    fn ports(p: &[u16]) -> Match {
        Match {
            destination_ports: p.to_vec(),
            ..Default::default()
        }
    }

    fn cidrs(v: &[&str]) -> Vec<Cidr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn cidr_contains_v4_and_v6() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.4", false),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("10.0.0.0/8", "::ffff:10.0.0.1", false),
            ("fd00::/64", "fd00::1234", true),
            ("fd00::/64", "fd00:0:0:1::1", false),
            ("::/0", "2001:db8::1", true),
            ("fd00::1", "fd00::1", true),
            ("fd00::/8", "10.0.0.1", false),
        ];
        for (cidr, ip, want) in cases {
            let c: Cidr = cidr.parse().unwrap();
            assert_eq!(c.contains(ip.parse().unwrap()), want, "{cidr} ∋ {ip}");
        }
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn deny_beats_allow() {
        let a = id("ns", "client");
        let c = conn(Some(&a), "10.0.0.1", "10.0.0.2:80");
        let allow = policy("allow-80", Action::Allow, vec![ports(&[80])]);
        let deny = policy("deny-80", Action::Deny, vec![ports(&[80])]);
        for order in [[&allow, &deny], [&deny, &allow]] {
            let v = evaluate(order, &c);
            assert!(!v.allowed);
            assert_eq!(v.reason, Reason::DenyPolicy("ns/deny-80".into()));
            assert_eq!(v.policy(), Some("ns/deny-80"));
        }
    }

    #[test]
    fn no_policy_allows_and_unmatched_deny_allows() {
        let c = conn(None, "10.0.0.1", "10.0.0.2:80");
        let v = evaluate([], &c);
        assert!(v.allowed);
        assert_eq!(v.reason, Reason::NoAllowPolicies);
        let deny = policy("deny-81", Action::Deny, vec![ports(&[81])]);
        assert_eq!(evaluate([&deny], &c).reason, Reason::NoAllowPolicies);
    }

    #[test]
    fn empty_allow_denies_everything() {
        // An ALLOW policy with no rules matches nothing: nothing is allowed.
        let a = id("ns", "client");
        let empty = policy("allow-nothing", Action::Allow, vec![]);
        for c in [
            conn(Some(&a), "10.0.0.1", "10.0.0.2:80"),
            conn(None, "10.0.0.1", "10.0.0.2:80"),
        ] {
            let v = evaluate([&empty], &c);
            assert!(!v.allowed);
            assert_eq!(
                v.reason,
                Reason::NoAllowMatched(vec!["ns/allow-nothing".into()])
            );
            assert_eq!(v.policy(), None);
        }
        // An empty match inside a rule matches nothing either.
        let empty_match = policy("empty-match", Action::Allow, vec![Match::default()]);
        assert!(!evaluate([&empty_match], &conn(Some(&a), "10.0.0.1", "10.0.0.2:80")).allowed);
    }

    #[test]
    fn some_allow_must_match() {
        let a = id("ns", "client");
        let c = conn(Some(&a), "10.0.0.1", "10.0.0.2:80");
        let p81 = policy("allow-81", Action::Allow, vec![ports(&[81])]);
        let p80 = policy("allow-80", Action::Allow, vec![ports(&[80])]);
        let v = evaluate([&p81, &p80], &c);
        assert!(v.allowed);
        assert_eq!(v.reason, Reason::AllowPolicy("ns/allow-80".into()));
        let v = evaluate([&p81], &c);
        assert!(!v.allowed);
    }

    #[test]
    fn requiring_an_identity_rejects_plaintext() {
        // R10: ALLOW principals ["*"] (Presence) accepts any identity, never plaintext.
        let any_id = policy(
            "require-mtls",
            Action::Allow,
            vec![Match {
                principals: vec![StringMatch::Presence],
                ..Default::default()
            }],
        );
        let a = id("other", "x");
        assert!(evaluate([&any_id], &conn(Some(&a), "10.0.0.1", "10.0.0.2:80")).allowed);
        assert!(!evaluate([&any_id], &conn(None, "10.0.0.1", "10.0.0.2:80")).allowed);
        // DENY notPrincipals ["*"]: Istio's "deny requests without identity".
        let deny_plain = policy(
            "deny-plaintext",
            Action::Deny,
            vec![Match {
                not_principals: vec![StringMatch::Presence],
                ..Default::default()
            }],
        );
        assert!(evaluate([&deny_plain], &conn(Some(&a), "10.0.0.1", "10.0.0.2:80")).allowed);
        let v = evaluate([&deny_plain], &conn(None, "10.0.0.1", "10.0.0.2:80"));
        assert_eq!(v.reason, Reason::DenyPolicy("ns/deny-plaintext".into()));
        // A specific identity also rejects plaintext.
        let specific = policy(
            "only-client",
            Action::Allow,
            vec![Match {
                principals: vec![StringMatch::Exact("cluster.local/ns/ns/sa/client".into())],
                ..Default::default()
            }],
        );
        let client = id("ns", "client");
        assert!(evaluate([&specific], &conn(Some(&client), "10.0.0.1", "10.0.0.2:80")).allowed);
        assert!(!evaluate([&specific], &conn(None, "10.0.0.1", "10.0.0.2:80")).allowed);
    }

    /// Every field and its `not_` form: (match, connection peer, src, dst, expected).
    #[test]
    fn every_field_and_not_field() {
        let client = id("frontend", "web");
        let other = id("backend", "db");
        let sm = |s: &str| StringMatch::Exact(s.into());
        let sa = |ns: &str, sa: &str| ServiceAccountMatch {
            namespace: ns.into(),
            service_account: sa.into(),
        };
        type Case = (&'static str, Match, bool, bool);
        // (name, match, matches client@10.0.0.1→10.9.0.1:80, matches other@192.168.1.1→fd00::1:443)
        let cases: Vec<Case> = vec![
            (
                "namespaces",
                Match {
                    namespaces: vec![sm("frontend")],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "not_namespaces",
                Match {
                    not_namespaces: vec![sm("frontend")],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                "namespaces prefix",
                Match {
                    namespaces: vec![StringMatch::Prefix("front".into())],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "principals",
                Match {
                    principals: vec![sm("cluster.local/ns/frontend/sa/web")],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "not_principals",
                Match {
                    not_principals: vec![sm("cluster.local/ns/frontend/sa/web")],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                "principals suffix",
                Match {
                    principals: vec![StringMatch::Suffix("/sa/db".into())],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                "service_accounts",
                Match {
                    service_accounts: vec![sa("frontend", "web")],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "not_service_accounts",
                Match {
                    not_service_accounts: vec![sa("frontend", "web")],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                "source_ips",
                Match {
                    source_ips: cidrs(&["10.0.0.0/8"]),
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "not_source_ips",
                Match {
                    not_source_ips: cidrs(&["10.0.0.0/8"]),
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                "destination_ips v4",
                Match {
                    destination_ips: cidrs(&["10.9.0.0/16"]),
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "destination_ips v6",
                Match {
                    destination_ips: cidrs(&["fd00::/64"]),
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                "not_destination_ips",
                Match {
                    not_destination_ips: cidrs(&["fd00::/64"]),
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "destination_ports",
                Match {
                    destination_ports: vec![80],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "not_destination_ports",
                Match {
                    not_destination_ports: vec![80],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                "values OR",
                Match {
                    destination_ports: vec![80, 443],
                    ..Default::default()
                },
                true,
                true,
            ),
            (
                "fields AND",
                Match {
                    destination_ports: vec![80, 443],
                    namespaces: vec![sm("backend")],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                "positive and negative",
                Match {
                    destination_ports: vec![80, 443],
                    not_source_ips: cidrs(&["192.168.0.0/16"]),
                    ..Default::default()
                },
                true,
                false,
            ),
        ];
        let c1 = conn(Some(&client), "10.0.0.1", "10.9.0.1:80");
        let c2 = conn(Some(&other), "192.168.1.1", "[fd00::1]:443");
        for (name, m, want1, want2) in cases {
            assert_eq!(m.matches(&c1), want1, "{name} on client");
            assert_eq!(m.matches(&c2), want2, "{name} on other");
        }
    }

    #[test]
    fn rules_or_clauses_and() {
        let a = id("ns", "client");
        let c = conn(Some(&a), "10.0.0.1", "10.0.0.2:80");
        let mut p = policy("p", Action::Allow, vec![]);
        // One rule, two clauses: port 80 AND namespace ns → match.
        p.rules = vec![vec![
            vec![ports(&[80])],
            vec![Match {
                namespaces: vec![StringMatch::Exact("ns".into())],
                ..Default::default()
            }],
        ]];
        assert!(p.matches(&c));
        // Second clause fails → the rule fails; a second rule that matches rescues it.
        p.rules[0][1][0].namespaces = vec![StringMatch::Exact("other".into())];
        assert!(!p.matches(&c));
        p.rules.push(vec![vec![ports(&[81]), ports(&[80])]]);
        assert!(p.matches(&c));
    }

    #[test]
    fn dry_run_is_reported_not_enforced() {
        let a = id("ns", "client");
        let c = conn(Some(&a), "10.0.0.1", "10.0.0.2:80");
        let mut deny = policy("deny-80", Action::Deny, vec![ports(&[80])]);
        deny.dry_run = true;
        let mut allow = policy("allow-81", Action::Allow, vec![ports(&[81])]);
        allow.dry_run = true;
        let v = evaluate([&deny, &allow], &c);
        assert!(v.allowed, "dry-run policies never decide");
        assert_eq!(v.reason, Reason::NoAllowPolicies);
        assert_eq!(
            v.dry_run,
            vec![
                DryRun {
                    policy: "ns/deny-80".into(),
                    action: Action::Deny,
                    matched: true
                },
                DryRun {
                    policy: "ns/allow-81".into(),
                    action: Action::Allow,
                    matched: false
                },
            ]
        );
    }

    #[test]
    fn scope_selects_workloads() {
        let mut w = Workload {
            uid: "u".into(),
            name: "n".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            trust_domain: "cluster.local".into(),
            protocol: crate::model::Protocol::Hbone,
            healthy: true,
            capacity: 1,
            ..Default::default()
        };
        let mut p = policy("p", Action::Deny, vec![ports(&[1])]);
        p.scope = Scope::Global;
        p.namespace = "istio-system".into();
        assert!(p.applies_to(&w));
        p.scope = Scope::Namespace;
        assert!(!p.applies_to(&w));
        p.namespace = "ns".into();
        assert!(p.applies_to(&w));
        p.scope = Scope::WorkloadSelector;
        assert!(!p.applies_to(&w));
        w.authorization_policies.push("ns/p".into());
        assert!(p.applies_to(&w));
    }
}
