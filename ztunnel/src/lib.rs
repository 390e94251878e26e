//! ztunnel: the per-node L4 proxy of ambient mode.
//!
//! Not built yet (issue 4). This crate will hold transparent capture, outbound routing by
//! rules R4–R8, inbound authorization and waypoint hairpinning by rules R9–R12 of
//! `shared/spec/ambient-routing.md`, the hot-reloaded workload model, metrics and admin.
