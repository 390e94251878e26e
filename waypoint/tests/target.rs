//! R14: the CONNECT target must be a pod bound to this waypoint or a service containing one.

use std::path::Path;

use waypoint::config::load_str;
use waypoint::http1::Destination;
use waypoint::route::ObjectRef;
use waypoint::target::{resolve, Me, Refused};

/// Namespace `app` is ambient with namespace waypoint `wp`; `other` is ambient without one.
const MODEL: &str = r#"
namespaces:
  - name: app
    labels: {istio.io/dataplane-mode: ambient}
  - name: other
    labels: {istio.io/dataplane-mode: ambient}
waypoints:
  - {name: wp, namespace: app, address: 10.1.0.100}
  - {name: wp2, namespace: other, address: 10.1.0.200, annotations: {istio.io/for-service-account: nobody}}
workloads:
  - {uid: wp, name: wp, namespace: app, serviceAccount: wp, workloadIps: ["10.1.0.100"]}
  - {uid: a1, name: a1, namespace: app, workloadIps: ["10.1.0.1"], services: {"app/echo.app.svc.cluster.local": {80: 8080}}}
  - {uid: o1, name: o1, namespace: other, workloadIps: ["10.1.0.2"], services: {"other/lone.other.svc.cluster.local": {80: 8080}}}
services:
  - {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["10.96.0.1"], ports: {80: 8080}}
  - {name: lone, namespace: other, hostname: lone.other.svc.cluster.local, vips: ["10.96.0.2"], ports: {80: 8080}}
"#;

#[test]
fn r14_target_check_table() {
    let cfg = load_str(Path::new("t.yaml"), MODEL, 1).unwrap_or_else(|e| panic!("{e}"));
    let snap = cfg.mesh.as_ref().unwrap();
    let me = Me {
        gateway: ObjectRef::new("app", "wp"),
        address: "10.1.0.100:15008".parse().unwrap(),
    };
    let table: Vec<(&str, Result<&str, Refused>)> = vec![
        ("10.96.0.1:80", Ok("service app/echo:80")),
        ("10.96.0.1:81", Err(Refused::NoSuchPort)),
        ("10.1.0.1:8080", Ok("pod app")),
        ("10.96.0.2:80", Err(Refused::NotBound)),
        ("10.1.0.2:8080", Err(Refused::NotBound)),
        ("10.9.9.9:80", Err(Refused::Unknown)),
    ];
    for (target, want) in table {
        let got = resolve(snap, &me, target.parse().unwrap()).map(|d| match d {
            Destination::Service { service, port } => {
                format!("service {}/{}:{port}", service.namespace, service.name)
            }
            Destination::Workload { namespace, .. } => format!("pod {namespace}"),
        });
        assert_eq!(got.as_deref().map_err(|e| *e), want, "{target}");
    }
    // Another waypoint's view: nothing here is bound to it.
    let other = Me {
        gateway: ObjectRef::new("other", "wp2"),
        address: "10.1.0.200:15008".parse().unwrap(),
    };
    assert_eq!(
        resolve(snap, &other, "10.96.0.1:80".parse().unwrap()).err(),
        Some(Refused::NotBound)
    );
}

/// R14 with Istio's `istio.io/waypoint-for` on the Gateway: a waypoint for `service`
/// refuses pod-addressed tunnels (ztunnel sends those straight to the pod), one for
/// `workload` refuses service-addressed ones, `none` both, `all` neither.
#[test]
fn r14_target_check_follows_the_waypoint_for_label() {
    let me = Me {
        gateway: ObjectRef::new("app", "wp"),
        address: "10.1.0.100:15008".parse().unwrap(),
    };
    // (label, service VIP served, pod served)
    let table = [
        ("all", true, true),
        ("service", true, false),
        ("workload", false, true),
        ("none", false, false),
    ];
    for (label, service, pod) in table {
        let model = MODEL.replace(
            "{name: wp, namespace: app, address: 10.1.0.100}",
            &format!("{{name: wp, namespace: app, address: 10.1.0.100, labels: {{istio.io/waypoint-for: {label}}}}}"),
        );
        assert_ne!(model, MODEL);
        let cfg = load_str(Path::new("t.yaml"), &model, 1).unwrap_or_else(|e| panic!("{e}"));
        let snap = cfg.mesh.as_ref().unwrap();
        let served = |t: &str| match resolve(snap, &me, t.parse().unwrap()) {
            Ok(_) => true,
            Err(Refused::NotBound) => false,
            Err(e) => panic!("{label} {t}: {e:?}"),
        };
        assert_eq!(served("10.96.0.1:80"), service, "{label}");
        assert_eq!(served("10.1.0.1:8080"), pod, "{label}");
    }
}
