//! The membership rules: capture (R2) and waypoint binding (R3), as pure functions over
//! labels, annotations and the known waypoints. The local config applies them when it builds
//! the wire types, in the place istiod applies them before it sends workloads over xDS.

use crate::model::{Labels, Protocol, Waypoint};

/// Namespace (or workload) label that puts pods in the mesh: `ambient`, or `none` to opt out.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Today's Istio form of a waypoint binding, on a namespace, service or workload: the name of
/// a waypoint (or `none` to opt out).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The namespace of the waypoint named by [`USE_WAYPOINT_LABEL`]; default: the object's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Gateway label choosing the traffic a waypoint takes: `service`, `workload`, `all` (our
/// default, the spec's) or `none` ([`crate::model::WaypointFor`]).
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// Gateway annotation restricting a waypoint to one service account (R3).
pub const FOR_SERVICE_ACCOUNT_ANNOTATION: &str = "istio.io/for-service-account";

/// R2: is a workload captured? An explicit protocol wins; then the workload's own
/// `istio.io/dataplane-mode` label (`ambient` / `none`); then its namespace's label.
pub fn captured(
    explicit: Option<Protocol>,
    workload_labels: &Labels,
    namespace_labels: Option<&Labels>,
) -> bool {
    if let Some(p) = explicit {
        return p == Protocol::Hbone;
    }
    match workload_labels
        .get(DATAPLANE_MODE_LABEL)
        .map(String::as_str)
    {
        Some(DATAPLANE_MODE_AMBIENT) => return true,
        Some(DATAPLANE_MODE_NONE) => return false,
        _ => {}
    }
    namespace_labels
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .is_some_and(|v| v == DATAPLANE_MODE_AMBIENT)
}

/// Why a waypoint applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingSource {
    /// `istio.io/use-waypoint` on the workload itself.
    WorkloadLabel,
    /// `istio.io/use-waypoint` on the service.
    ServiceLabel,
    /// A waypoint annotated `istio.io/for-service-account` with the workload's account.
    ServiceAccount,
    /// `istio.io/use-waypoint` on the namespace.
    NamespaceLabel,
    /// A waypoint in the namespace without a service-account annotation.
    Namespace,
}

/// A binding names a waypoint that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingWaypoint {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for MissingWaypoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{USE_WAYPOINT_LABEL} names waypoint {}/{}, which is not defined under `waypoints`",
            self.namespace, self.name
        )
    }
}

/// Outcome of a label lookup: no label, opted out, or a named waypoint.
enum LabelBinding<'a> {
    Absent,
    OptOut,
    Bound(&'a Waypoint),
}

fn by_label<'a>(
    labels: &Labels,
    own_namespace: &str,
    waypoints: &'a [Waypoint],
) -> Result<LabelBinding<'a>, MissingWaypoint> {
    let Some(name) = labels.get(USE_WAYPOINT_LABEL) else {
        return Ok(LabelBinding::Absent);
    };
    if name == "none" || name.is_empty() {
        return Ok(LabelBinding::OptOut);
    }
    let ns = labels
        .get(USE_WAYPOINT_NAMESPACE_LABEL)
        .map(String::as_str)
        .unwrap_or(own_namespace);
    waypoints
        .iter()
        .find(|w| w.name == *name && w.namespace == ns)
        .map(LabelBinding::Bound)
        .ok_or_else(|| MissingWaypoint {
            namespace: ns.to_string(),
            name: name.clone(),
        })
}

/// R3: the waypoint of a workload (pod) in `namespace` running as `service_account`.
///
/// Precedence, most specific first: the workload's own `istio.io/use-waypoint` label; a
/// waypoint of its namespace annotated `istio.io/for-service-account=<its account>` (the
/// service-account waypoint **wins** over any namespace-wide one); the namespace's
/// `istio.io/use-waypoint` label; a waypoint of the namespace without that annotation (a
/// namespace waypoint applies to every pod of its namespace). `none` as a label value opts
/// out at that level. A waypoint never applies to itself (`self_addresses` are the
/// workload's IPs; a waypoint whose address is one of them is skipped).
pub fn workload_waypoint<'a>(
    namespace: &str,
    service_account: &str,
    self_addresses: &[std::net::IpAddr],
    workload_labels: &Labels,
    namespace_labels: Option<&Labels>,
    waypoints: &'a [Waypoint],
) -> Result<Option<(&'a Waypoint, BindingSource)>, MissingWaypoint> {
    let not_self = |w: &&Waypoint| !self_addresses.contains(&w.address.ip());
    match by_label(workload_labels, namespace, waypoints)? {
        LabelBinding::OptOut => return Ok(None),
        LabelBinding::Bound(w) => {
            return Ok(Some(w)
                .filter(not_self)
                .map(|w| (w, BindingSource::WorkloadLabel)))
        }
        LabelBinding::Absent => {}
    }
    let in_ns = || waypoints.iter().filter(|w| w.namespace == namespace);
    if let Some(w) = in_ns()
        .filter(|w| w.for_service_account.as_deref() == Some(service_account))
        .find(not_self)
    {
        return Ok(Some((w, BindingSource::ServiceAccount)));
    }
    if let Some(labels) = namespace_labels {
        match by_label(labels, namespace, waypoints)? {
            LabelBinding::OptOut => return Ok(None),
            LabelBinding::Bound(w) => {
                return Ok(Some(w)
                    .filter(not_self)
                    .map(|w| (w, BindingSource::NamespaceLabel)))
            }
            LabelBinding::Absent => {}
        }
    }
    Ok(in_ns()
        .filter(|w| w.for_service_account.is_none())
        .find(not_self)
        .map(|w| (w, BindingSource::Namespace)))
}

/// The waypoint of a service: only its own `istio.io/use-waypoint` label binds one (today's
/// Istio form). Without it, the chosen endpoint's waypoint decides (R7, R8).
pub fn service_waypoint<'a>(
    namespace: &str,
    service_labels: &Labels,
    waypoints: &'a [Waypoint],
) -> Result<Option<(&'a Waypoint, BindingSource)>, MissingWaypoint> {
    Ok(match by_label(service_labels, namespace, waypoints)? {
        LabelBinding::Bound(w) => Some((w, BindingSource::ServiceLabel)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Identity, HBONE_PORT};
    use std::net::{IpAddr, SocketAddr};

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn wp(name: &str, ns: &str, ip: &str, for_sa: Option<&str>) -> Waypoint {
        Waypoint {
            name: name.into(),
            namespace: ns.into(),
            address: SocketAddr::new(ip.parse().unwrap(), HBONE_PORT),
            identity: Identity::new("cluster.local", ns, name),
            for_service_account: for_sa.map(Into::into),
            traffic: Default::default(),
        }
    }

    fn bound(
        ns: &str,
        sa: &str,
        wl: &Labels,
        nsl: Option<&Labels>,
        wps: &[Waypoint],
    ) -> Option<(String, BindingSource)> {
        workload_waypoint(ns, sa, &[], wl, nsl, wps)
            .unwrap()
            .map(|(w, s)| (w.name.clone(), s))
    }

    #[test]
    fn r2_capture_table() {
        let amb = labels(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        let none = labels(&[(DATAPLANE_MODE_LABEL, "none")]);
        let empty = Labels::new();
        // (explicit, workload labels, namespace labels) → captured
        let cases: [(Option<Protocol>, &Labels, Option<&Labels>, bool); 7] = [
            (None, &empty, Some(&amb), true),
            (None, &empty, Some(&empty), false),
            (None, &empty, None, false),
            (None, &none, Some(&amb), false),
            (None, &amb, Some(&empty), true),
            (Some(Protocol::Tcp), &amb, Some(&amb), false),
            (Some(Protocol::Hbone), &empty, None, true),
        ];
        for (i, (explicit, wl, ns, want)) in cases.into_iter().enumerate() {
            assert_eq!(captured(explicit, wl, ns), want, "case {i}");
        }
    }

    #[test]
    fn r3_namespace_waypoint_applies_to_every_pod() {
        let wps = [wp("ns-wp", "a", "10.0.0.9", None)];
        let e = Labels::new();
        assert_eq!(
            bound("a", "x", &e, None, &wps),
            Some(("ns-wp".into(), BindingSource::Namespace))
        );
        assert_eq!(bound("b", "x", &e, None, &wps), None, "other namespace");
    }

    #[test]
    fn r3_service_account_waypoint_beats_namespace_waypoint() {
        // Order must not matter: the SA waypoint wins whichever comes first.
        for wps in [
            vec![
                wp("ns-wp", "a", "10.0.0.9", None),
                wp("sa-wp", "a", "10.0.0.8", Some("sa1")),
            ],
            vec![
                wp("sa-wp", "a", "10.0.0.8", Some("sa1")),
                wp("ns-wp", "a", "10.0.0.9", None),
            ],
        ] {
            let e = Labels::new();
            assert_eq!(
                bound("a", "sa1", &e, None, &wps),
                Some(("sa-wp".into(), BindingSource::ServiceAccount))
            );
            // Other service accounts get the namespace waypoint only.
            assert_eq!(
                bound("a", "sa2", &e, None, &wps),
                Some(("ns-wp".into(), BindingSource::Namespace))
            );
        }
    }

    #[test]
    fn r3_service_account_waypoint_alone_applies_only_to_that_account() {
        let wps = [wp("sa-wp", "a", "10.0.0.8", Some("sa1"))];
        let e = Labels::new();
        assert!(bound("a", "sa1", &e, None, &wps).is_some());
        assert_eq!(bound("a", "sa2", &e, None, &wps), None);
    }

    #[test]
    fn r3_service_account_waypoint_beats_namespace_use_waypoint_label() {
        let wps = [
            wp("labelled", "a", "10.0.0.7", Some("nobody")),
            wp("sa-wp", "a", "10.0.0.8", Some("sa1")),
        ];
        let nsl = labels(&[(USE_WAYPOINT_LABEL, "labelled")]);
        let e = Labels::new();
        assert_eq!(
            bound("a", "sa1", &e, Some(&nsl), &wps),
            Some(("sa-wp".into(), BindingSource::ServiceAccount))
        );
        assert_eq!(
            bound("a", "sa2", &e, Some(&nsl), &wps),
            Some(("labelled".into(), BindingSource::NamespaceLabel))
        );
    }

    #[test]
    fn use_waypoint_label_on_workload_namespace_and_service() {
        let wps = [
            wp("w1", "a", "10.0.0.7", Some("nobody")),
            wp("shared", "infra", "10.0.0.6", Some("nobody")),
        ];
        let e = Labels::new();
        // Workload label, own namespace.
        let wl = labels(&[(USE_WAYPOINT_LABEL, "w1")]);
        assert_eq!(
            bound("a", "x", &wl, None, &wps),
            Some(("w1".into(), BindingSource::WorkloadLabel))
        );
        // Namespace label naming a waypoint of another namespace.
        let nsl = labels(&[
            (USE_WAYPOINT_LABEL, "shared"),
            (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
        ]);
        assert_eq!(
            bound("a", "x", &e, Some(&nsl), &wps),
            Some(("shared".into(), BindingSource::NamespaceLabel))
        );
        // Workload opts out even though the namespace has one.
        let out = labels(&[(USE_WAYPOINT_LABEL, "none")]);
        assert_eq!(bound("a", "x", &out, Some(&nsl), &wps), None);
        // Service label.
        let sl = labels(&[(USE_WAYPOINT_LABEL, "w1")]);
        let (w, s) = service_waypoint("a", &sl, &wps).unwrap().unwrap();
        assert_eq!((w.name.as_str(), s), ("w1", BindingSource::ServiceLabel));
        assert!(service_waypoint("a", &e, &wps).unwrap().is_none());
        // A label naming a missing waypoint is an error, not silently ignored.
        let bad = labels(&[(USE_WAYPOINT_LABEL, "ghost")]);
        let err = workload_waypoint("a", "x", &[], &bad, None, &wps).unwrap_err();
        assert_eq!(err.name, "ghost");
        assert!(service_waypoint("a", &bad, &wps).is_err());
    }

    #[test]
    fn waypoint_never_applies_to_itself() {
        let wps = [wp("ns-wp", "a", "10.0.0.9", None)];
        let me: [IpAddr; 1] = ["10.0.0.9".parse().unwrap()];
        let r = workload_waypoint("a", "ns-wp", &me, &Labels::new(), None, &wps).unwrap();
        assert!(r.is_none());
    }
}
