//! Who may do what: policy files become a [`PolicySet`]; an authenticated identity becomes a
//! [`Principal`] holding [`Grant`]s; [`decide()`] allows or denies one
//! [`Call`](crate::billing::Call).
//!
//! What the rest of the gateway reasons with, the principal and its grants, is `principal.rs`.
//! The stages that produce and consume them each have a file of their own, so one can be read
//! without the others:
//!
//! - `load.rs`: reading the policy folder, the TOML definitions, `file:line` errors
//!   ([`PolicyError`]), merging several files into one [`PolicySet`];
//! - `claims.rs`: a token's claims matched against `[[bindings]]` (claim paths, arrays, scope
//!   words);
//! - `keys.rs`: gateway keys (a UUID sent as `X-Auth-Token`), each a principal of its own,
//!   declared in a `[[keys]]` entry that holds only the SHA-256 of the key ([`key_sha256`]);
//! - `decide.rs`: the decision itself ([`decide()`], [`require`]), for one call, and what a
//!   project-scoped grant fills in;
//! - [`cases`] runs the policy test cases `billing-gateway check` reads from
//!   `<policy dir>/tests/`; [`reload`] keeps the live set in step with the folder.
//!
//! Pure: no I/O but reading the policy folder. Anything no grant allows is denied.

pub mod cases;
mod claims;
mod decide;
#[cfg(test)]
mod fixtures;
mod keys;
mod load;
mod principal;
pub mod reload;

pub use decide::{decide, projects, require};
pub use keys::{KeyEntry, is_key_name, key_sha256};
pub use load::{PolicyError, PolicySet};
pub use principal::{DEFAULT_SHARE, Grant, MAX_SHARE, Principal};
