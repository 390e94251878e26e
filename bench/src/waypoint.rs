//! The mesh's waypoint: this binary re-executed as `__waypoint --config FILE --profile P`
//! (`waypoint::cli::main_with_args`) in the `waypoint` pod's network namespace. Its config
//! is one multi-document YAML file (the waypoint crate's format): the settings document,
//! the mesh model shared with both ztunnels, and the `echo` → `echo-v1` HTTPRoute (R17).

use std::path::Path;

use anyhow::{Context, Result};

use crate::mesh::{self, Mesh, MeshSpec};
use crate::proxy::{Proxy, WAYPOINT_ARG};

pub const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/bench/sa/waypoint";

/// The HTTPRoute of the default mesh: the spec's R17 example (every request to `echo` goes
/// to `echo-v1`) in namespace `bench`.
pub fn route() -> String {
    waypoint::spec_example::echo_route_in("bench")
}

/// `echo-h2` is spoken to in the client's protocol (HTTP/2 for `http2-rps`).
pub const H2_RULE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-h2, namespace: bench}
spec:
  host: echo-h2
  trafficPolicy:
    connectionPool:
      http: {useClientProtocol: true}
";

/// The whole config file (`extra`: more documents, appended).
pub fn config_yaml(
    layout: mesh::Layout,
    ca_dir: &Path,
    tuning: &str,
    extra: Option<&str>,
) -> String {
    let addr = layout.waypoint_addr();
    let listen = if layout.is_loopback() {
        addr.to_string()
    } else {
        "0.0.0.0:15008".into()
    };
    format!(
        "# written by bench\nwaypoint:\n  listen: {listen}\n  address: {addr}\n  gateway: bench/waypoint\n  identity: {WAYPOINT_ID}\n  ca: {{builtin: {}}}\n{tuning}---\n{}---\n{}---\n{H2_RULE}",
        ca_dir.display(),
        mesh::mesh_yaml_nodes(layout, false),
        route()
    ) + &extra.map_or(String::new(), |e| format!("---\n{e}"))
}

/// Write the config and start the waypoint in its pod; wait for READY.
pub fn start(m: &Mesh, spec: &MeshSpec, ca_dir: &Path, tuning: &str) -> Result<Proxy> {
    let file = m.dir.join("waypoint.yaml");
    std::fs::write(
        &file,
        config_yaml(m.layout, ca_dir, tuning, spec.waypoint_docs.as_deref()),
    )
    .with_context(|| format!("writing {}", file.display()))?;
    Proxy::spawn_in_ns(
        &m.ns("waypoint"),
        WAYPOINT_ARG,
        &file,
        &spec.profile_name,
        "waypoint",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_loads_in_the_waypoint() {
        let text = config_yaml(
            mesh::Layout::Netns,
            Path::new("/tmp/ca"),
            &mesh::tuning_yaml(&tuning::Profile::default(), &[1], 1, "auto").unwrap(),
            None,
        );
        let cfg = waypoint::config::load_str(Path::new("w.yaml"), &text, 1)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(cfg.settings.is_some());
        assert!(cfg.mesh.is_some());
    }

    /// `--waypoint-docs` documents go in after the mesh's own, checked by the waypoint.
    #[test]
    fn extra_documents_load_in_the_waypoint() {
        let extra = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: bench}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  jwtRules:\n  - issuer: bench\n    jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}'\n";
        let text = config_yaml(
            mesh::Layout::Netns,
            Path::new("/tmp/ca"),
            &mesh::tuning_yaml(&tuning::Profile::default(), &[1], 1, "auto").unwrap(),
            Some(extra),
        );
        let cfg = waypoint::config::load_str(Path::new("w.yaml"), &text, 1)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(cfg.request_authns.len(), 1);
        assert_eq!(cfg.routes.routes().len(), 1, "the mesh's own route is kept");
    }
}
