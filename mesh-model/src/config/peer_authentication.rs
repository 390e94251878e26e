//! Istio's `PeerAuthentication` (`security.istio.io`), as the local file's
//! `peerAuthentications[]`, converted the way istiod converts it for ambient workloads
//! (Istio's `architecture/ambient/peer-authentication.md`): ztunnel never sees the object,
//! only L4 `DENY` policies attached to the workloads it applies to.
//!
//! A workload's mode is its own policy's (a `selector` in its namespace), else its
//! namespace's (no selector), else the mesh's (no selector, root namespace); `UNSET`
//! inherits, and the default is `PERMISSIVE`. Ambient inbound always takes HBONE, so
//! `DISABLE` accepts plaintext exactly as `PERMISSIVE` does. `portLevelMtls` (workload
//! policies only) sets a mode per target port. What is enforced:
//!
//! * strict on every port: the shared [`STATIC_STRICT_POLICY`] in the root namespace, a
//!   `DENY` of connections with no peer identity;
//! * strict with plaintext ports: `converted_peer_authentication_<name>` in the policy's
//!   namespace, a `DENY` of connections with no identity to any other port;
//! * plaintext with strict ports: the same name, a `DENY` of connections with no identity to
//!   those ports.
//!
//! istiod picks the oldest of two policies at one level; a file has no creation times, so
//! two that would compete (two mesh-wide, two in one namespace, two selecting one workload)
//! are a load error naming both.

use std::collections::{BTreeMap, BTreeSet};

use runtime::config::Invalid;
use serde::Deserialize;

use super::{
    LocalAction, LocalMatch, LocalPolicy, LocalScope, LocalSelector, LocalStringMatch,
    LocalWorkload,
};
use crate::authz::{CONVERTED_PEER_AUTHENTICATION_PREFIX, STATIC_STRICT_POLICY};
use crate::model::ROOT_NAMESPACE;
use crate::wire::security as ws;

/// `peerAuthentications[]`: a PeerAuthentication's `metadata.name`/`namespace` and its
/// `spec` fields.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalPeerAuthentication {
    pub name: String,
    pub namespace: String,
    /// Absent (or no labels): the namespace's policy, or the mesh's in the root namespace.
    #[serde(default)]
    pub selector: Option<LocalSelector>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Target port → mode; workload policies only.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u16, Mtls>,
}

/// `{mode: …}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the level above (the mesh's default: `PERMISSIVE`).
    #[default]
    Unset,
    Permissive,
    Strict,
    /// Ambient inbound accepts plaintext and HBONE: the same as `PERMISSIVE`.
    Disable,
}

impl MtlsMode {
    /// Whether plaintext is refused; `None` for `UNSET`.
    fn strict(self) -> Option<bool> {
        match self {
            MtlsMode::Unset => None,
            MtlsMode::Strict => Some(true),
            MtlsMode::Permissive | MtlsMode::Disable => Some(false),
        }
    }
}

impl LocalPeerAuthentication {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn mode(&self) -> MtlsMode {
        self.mtls.unwrap_or_default().mode
    }

    /// A selector with labels (Istio: an empty one is the namespace's policy).
    fn workload_selector(&self) -> Option<&LocalSelector> {
        self.selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty())
    }
}

/// What the conversion adds to the file's policies: the generated `DENY` policies, and for
/// each workload (in the file's order) the key of the one that applies to it.
pub(super) struct Converted {
    pub policies: Vec<LocalPolicy>,
    pub per_workload: Vec<Option<String>>,
}

/// A `DENY` rule of `clauses`, each one match (clauses must all match, a match's fields
/// too).
fn deny(name: String, namespace: &str, clauses: Vec<LocalMatch>) -> LocalPolicy {
    LocalPolicy {
        name,
        namespace: namespace.to_string(),
        scope: Some(LocalScope::WorkloadSelector),
        selector: None,
        action: LocalAction::Deny,
        rules: vec![clauses.into_iter().map(|m| vec![m]).collect()],
        dry_run: false,
    }
}

/// Any peer identity (`notPrincipals` of it: a connection without one).
fn some_identity() -> Vec<LocalStringMatch> {
    vec![LocalStringMatch(ws::StringMatch {
        match_type: Some(ws::string_match::MatchType::Presence(())),
    })]
}

/// Check the policies and convert them for `workloads`.
pub(super) fn convert(
    pas: &[LocalPeerAuthentication],
    workloads: &[LocalWorkload],
) -> Result<Converted, Invalid> {
    let field = |i: usize, f: &str| format!("peerAuthentications[{i}].{f}");
    let mut keys = BTreeSet::new();
    // Policies without a selector by namespace (the root namespace's is the mesh's), and
    // the workload policies.
    let mut levels: BTreeMap<&str, usize> = BTreeMap::new();
    let mut selecting: Vec<(usize, &LocalSelector)> = Vec::new();
    for (i, pa) in pas.iter().enumerate() {
        if !keys.insert(pa.key()) {
            return Err(Invalid::new(
                field(i, "name"),
                format!("PeerAuthentication {} is defined twice", pa.key()),
            ));
        }
        if pa.port_level_mtls.contains_key(&0) {
            return Err(Invalid::new(
                field(i, "portLevelMtls"),
                "port 0 is not a port (1-65535)",
            ));
        }
        match pa.workload_selector() {
            Some(_) if pa.namespace == ROOT_NAMESPACE => {
                return Err(Invalid::new(
                    field(i, "selector"),
                    format!(
                        "a PeerAuthentication with a selector in the root namespace \
                         {ROOT_NAMESPACE} applies to no ambient workload (istiod ignores it); \
                         drop the selector for a mesh-wide policy, or move it to the \
                         workloads' namespace"
                    ),
                ));
            }
            Some(sel) => selecting.push((i, sel)),
            None if !pa.port_level_mtls.is_empty() => {
                return Err(Invalid::new(
                    field(i, "portLevelMtls"),
                    "portLevelMtls needs a selector: it is for workload policies only, as in \
                     Istio",
                ));
            }
            None => {
                if let Some(&first) = levels.get(pa.namespace.as_str()) {
                    let whose = if pa.namespace == ROOT_NAMESPACE {
                        "mesh-wide".to_string()
                    } else {
                        format!("namespace-wide in {}", pa.namespace)
                    };
                    return Err(Invalid::new(
                        field(i, "name"),
                        format!(
                            "{} and {} are both {whose} PeerAuthentications; Istio applies the \
                             older, which a file cannot tell: keep one",
                            pas[first].key(),
                            pa.key()
                        ),
                    ));
                }
                levels.insert(&pa.namespace, i);
            }
        }
    }
    let mode_of = |ns: &str| levels.get(ns).and_then(|&i| pas[i].mode().strict());
    let mut policies: BTreeMap<String, LocalPolicy> = BTreeMap::new();
    let mut per_workload = Vec::with_capacity(workloads.len());
    for w in workloads {
        let mut own = selecting
            .iter()
            .filter(|(i, sel)| pas[*i].namespace == w.namespace && sel.selects(&w.labels))
            .map(|(i, _)| *i);
        let own = match (own.next(), own.next()) {
            (Some(first), Some(second)) => {
                return Err(Invalid::new(
                    field(second, "selector"),
                    format!(
                        "{} and {} both select workload {}; Istio applies the older, which a \
                         file cannot tell: keep one",
                        pas[first].key(),
                        pas[second].key(),
                        w.uid()
                    ),
                ));
            }
            (first, _) => first.map(|i| &pas[i]),
        };
        // Mesh, then namespace, then the workload's own: the last that is set decides.
        let strict = [
            mode_of(ROOT_NAMESPACE),
            mode_of(&w.namespace),
            own.and_then(|pa| pa.mode().strict()),
        ]
        .into_iter()
        .flatten()
        .last()
        .unwrap_or(false);
        // Ports whose own mode differs from the workload's.
        let exceptions: Vec<u16> = own
            .map(|pa| {
                pa.port_level_mtls
                    .iter()
                    .filter(|(_, m)| m.mode.strict() == Some(!strict))
                    .map(|(p, _)| *p)
                    .collect()
            })
            .unwrap_or_default();
        let policy = match (strict, own.filter(|_| !exceptions.is_empty())) {
            (true, None) => Some(deny(
                STATIC_STRICT_POLICY.to_string(),
                ROOT_NAMESPACE,
                vec![LocalMatch {
                    not_principals: some_identity(),
                    ..Default::default()
                }],
            )),
            (false, None) => None,
            // Strict but for the exceptions: no identity AND not one of them.
            (true, Some(pa)) => Some(deny(
                format!("{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}", pa.name),
                &pa.namespace,
                vec![
                    LocalMatch {
                        not_principals: some_identity(),
                        ..Default::default()
                    },
                    LocalMatch {
                        not_destination_ports: exceptions,
                        ..Default::default()
                    },
                ],
            )),
            // Plaintext but on the exceptions: no identity AND one of them.
            (false, Some(pa)) => Some(deny(
                format!("{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}", pa.name),
                &pa.namespace,
                vec![LocalMatch {
                    not_principals: some_identity(),
                    destination_ports: exceptions,
                    ..Default::default()
                }],
            )),
        };
        per_workload.push(policy.map(|p| {
            let key = p.key();
            policies.entry(key.clone()).or_insert(p);
            key
        }));
    }
    Ok(Converted {
        policies: policies.into_values().collect(),
        per_workload,
    })
}
