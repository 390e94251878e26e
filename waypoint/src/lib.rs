//! waypoint: the L7 proxy of ambient mode.
//!
//! Not built yet (issue 5). This crate will hold the HBONE-only listener (R13), the target
//! check (R14), AuthorizationPolicy enforcement (R15), pod-addressed forwarding (R16) and
//! Gateway API `HTTPRoute` routing with load balancing for service-addressed requests (R17).
