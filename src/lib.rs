//! billing-gateway shares one Scaleway account's Billing API with every internal team without
//! handing anyone the secret key.
//!
//! # The life of one request
//!
//! `GET /billing/v2beta1/invoices?page=2` with `Authorization: Bearer <JWT>`. The stages below
//! run in this order, written once in the proxy's pipeline; the gateway's own authenticated
//! endpoints (`whoami`, the cache purge) go through the same stages, with their permission for
//! step 4 and their own answer for step 9.
//!
//! 1. The request layer gives it a request id (the caller's when sane), its
//!    [`telemetry::RequestContext`] and a span; it sheds an oversized head, and writes the
//!    request's one log line ([`telemetry::access`]) and its metrics from that context when the
//!    answer leaves.
//! 2. [`billing::parse`] finds the operation the method and raw path name and validates every
//!    query parameter against that operation's table, before any credential is looked at:
//!    unknown paths are 404, bad or unknown parameters 400, and the result is a
//!    [`billing::Call`] — the only thing the upstream request is ever built from.
//! 3. [`auth`] finds the one credential and verifies it (algorithm pinned, `exp` required) —
//!    a check that has to wait for the identity provider's keys waits within a small allowance
//!    of its own — and [`policy`] turns the identity into a [`policy::Principal`] whose grants
//!    come from the policy files.
//! 4. [`policy::decide`] allows the call or answers 403 (a project-scoped grant may fill in the
//!    projects it covers), and [`billing::Call::apply_organization`] fills in the gateway's
//!    organization (or refuses another one).
//! 5. The caller's own rate ([`config::LimitsConfig`]'s `principal_rate`, or its policy's) is
//!    counted: only a request the caller may make spends it (429 past it).
//! 6. The request takes a place in flight — its caller's own share of the global bound
//!    ([`ServerLimits`]) — held until the answer is given or a relayed body has been taken.
//! 7. A request body is read (bounded) only now, and never forwarded; an audited call writes its
//!    audit line.
//! 8. `consumptions` and `taxes` go through [`cache::Cache`]: a fresh entry answers at once (and
//!    is refreshed in the background near its end); concurrent misses share one upstream call,
//!    across replicas too with Redis; a failing upstream is covered by a stale entry when there
//!    is one. Only a miss goes on to step 9.
//! 9. [`upstream::Upstream::send`] waits for the call's turn in the upstream budget, taking turns
//!    fairly with other callers' waiting calls (or refuses while backing off after a 429),
//!    builds the request from the `Call`, injects the secret key last, follows no redirect,
//!    retries idempotent calls on connection errors, 502 and 503, and maps timeouts, refusals
//!    and 429s to [`Error`]. The answer is relayed as it comes: status, content type (JSON
//!    relabelled exactly `application/json`), body streamed; an error answer comes out of the
//!    upstream client as an [`upstream::Answer`] already read whole (bounded) and scrubbed of
//!    the secret key.
//!
//! Any stage's refusal is an [`Error`], rendered Scaleway-shaped; a 5xx is logged once, with
//! its cause, when the pipeline ends.
//!
//! Configuration is [`config`]; the assembled service is [`server::App`] (its accept loop bounds
//! header size, header time and requests in flight, and serves [`server::tls`] when configured), whose
//! policy [`policy::reload`] keeps in step with the policy folder; [`server::openapi`] describes the served
//! surface from the operation table. The in-process Billing API that `demo`, tests and
//! benchmarks use as an upstream is the workspace crate `billing-sim` (`crates/billing-sim`).

// The stages a program embedding the gateway (the binary, tests, benches) reaches into.
pub mod auth;
pub mod billing;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod limits;
pub mod policy;
pub mod server;
pub mod telemetry;
pub mod upstream;

// Wiring inside one request: reached only through `server::App`.
mod admission;
mod crypto;
mod error;
mod proxy;
mod state;

pub use config::Config;
pub use crypto::install_crypto_provider;
pub use error::Error;
pub use server::{App, ServerLimits, StartError};
