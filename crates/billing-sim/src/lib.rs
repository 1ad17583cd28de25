//! An in-process imitation of the Scaleway Billing API v2beta1.
//!
//! The `demo` command, the benchmarks and the examples point the gateway at it as their upstream,
//! so they run without a Scaleway account. It serves one sample organization ("Acme SAS": three
//! projects, about 40 consumption lines a month, twelve monthly invoices and a purchase invoice
//! with real PDF bytes, two discounts, FinOps charges) with the paths, shapes, error bodies and
//! pagination rules of the real API (`shared/reference/scaleway-billing-api.md`), closely enough
//! for the official SDKs.
//!
//! Figures come from a hash of (period, project, sku), so a given month always has the same
//! figures; only the choice of the "current" month follows the UTC clock. Nothing is stateful:
//! redeeming a coupon answers a Discount but does not add it to later listings, so benchmarks
//! can repeat any call. Unknown query parameters are ignored, as the real API does.
//!
//! Anything the gateway itself does (policy, caching, limits) does not belong here. It is a crate
//! of its own so that the gateway's library does not ship it: only the `billing-gateway` binary
//! uses it, for its `demo` and `simulate` commands.
//!
//! Inside: `data` builds the sample organization, `query` reads and validates query strings and
//! shapes the error answers, `routes` holds one function per Billing operation, `pdf` draws the
//! invoices' files; [`Simulator::router`] wires the operations to their paths.

mod data;
mod pdf;
mod query;
mod routes;

use std::sync::Arc;

use axum::{
    Router,
    routing::{MethodFilter, on},
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::data::Data;
use crate::routes::{
    Endpoint, authenticate, charges, consumptions, discounts, download, export, get_invoice,
    handle, handle_id, list_invoices, redeem_coupon, taxes, unknown_path,
};

/// The simulated organization: the only one the simulator answers for, so the gateway's own
/// organization must be configured to it in demos and tests.
pub const ORGANIZATION_ID: &str = "11111111-2222-3333-4444-555555555555";

/// The in-process Billing API. `secret_key` is the only X-Auth-Token it accepts.
#[derive(Clone)]
pub struct Simulator {
    data: Arc<Data>,
}

impl Simulator {
    /// Builds the sample organization; `secret_key` plays the Scaleway secret key the gateway
    /// holds.
    pub fn new(secret_key: &str) -> Self {
        let data = Arc::new(Data::build(secret_key, OffsetDateTime::now_utc()));
        Simulator { data }
    }

    /// The axum router serving /billing/v2beta1/..., to mount in-process or to [`serve`].
    pub fn router(&self) -> Router {
        let routes: [(&str, Endpoint); 9] = [
            ("GET consumptions", consumptions),
            ("GET taxes", taxes),
            ("GET invoices", list_invoices),
            ("GET invoices/{invoice_id}", get_invoice),
            ("GET invoices/{invoice_id}/download", download),
            ("GET export-invoices", export),
            ("GET discounts", discounts),
            ("POST redeem-coupon", redeem_coupon),
            ("GET charges", charges),
        ];
        let add = |router: Router, (route, f): (&str, Endpoint)| {
            let (method, path) = route.split_once(' ').unwrap_or(("GET", route));
            let method = if method == "POST" {
                MethodFilter::POST
            } else {
                MethodFilter::GET
            };
            let handler = if path.contains('{') {
                on(method, handle_id)
            } else {
                on(method, handle)
            };
            router.route(
                &format!("/billing/v2beta1/{path}"),
                handler.with_state((self.data.clone(), f)),
            )
        };
        let auth = axum::middleware::from_fn_with_state(self.data.clone(), authenticate);
        let router = routes.into_iter().fold(Router::new(), add);
        router
            .fallback(unknown_path)
            .method_not_allowed_fallback(unknown_path)
            .layer(auth)
    }

    /// Invoice ids the simulator knows, newest first (for demo output and tests).
    pub fn invoice_ids(&self) -> Vec<Uuid> {
        self.data.invoices.iter().map(|i| i.id).collect()
    }
}

/// Serves the simulator on `listener` until the future is dropped, so the gateway can reach it
/// over real HTTP like the real upstream.
pub async fn serve(listener: tokio::net::TcpListener, sim: Simulator) -> std::io::Result<()> {
    axum::serve(listener, sim.router()).await
}
