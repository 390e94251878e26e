//! The spec's R17 example (`shared/spec/ambient-routing.md`), verbatim, for the places that
//! deploy it: the bench mesh's waypoint config and the waypoint's tests.

/// The R17 example route: every request for Service `echo` goes to Service `echo-v1` port
/// 80. It names no namespace; [`echo_route_in`] places it in one.
pub const ECHO_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata:
  name: echo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
  rules:
  - backendRefs:
    - name: echo-v1
      port: 80
"#;

/// [`ECHO_ROUTE`] placed in namespace `ns`.
pub fn echo_route_in(ns: &str) -> String {
    let named = "\n  name: echo\n";
    assert!(ECHO_ROUTE.contains(named));
    ECHO_ROUTE.replacen(named, &format!("{named}  namespace: {ns}\n"), 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r17_example_placed_in_a_namespace_is_the_example_plus_that_namespace() {
        let text = echo_route_in("bench");
        assert!(
            text.contains("\n  name: echo\n  namespace: bench\n"),
            "{text}"
        );
        assert_eq!(text.replace("  namespace: bench\n", ""), ECHO_ROUTE);
    }
}
