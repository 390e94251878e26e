//! The stats/readiness endpoint (`waypoint.stats`): `GET /stats/prometheus` answers
//! Prometheus text, `GET /healthz/ready` answers `200` once the HBONE listener is serving,
//! anything else 404. The server itself is the runtime's [`runtime::admin`].

pub use runtime::admin::{not_found, serve, Answer, Endpoint};
