//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. The
//! type lives in `mesh-model` (it is part of the routing model); re-exported here so the
//! tunnel layer and the model share one definition.

pub use mesh_model::identity::{Identity, IdentityError};
