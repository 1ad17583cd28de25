//! `GET /gateway/v1/costs` and `GET /gateway/v1/costs/metrics` (contract §12): every page of the
//! organization's consumption list for the period, each fetched as the Billing call
//! `consumptions` would be (cache lookup, coalesced fill, budget, upstream, stale cover: one
//! upstream call per page per freshness window, whoever asks), then summed for the caller's
//! scope by [`crate::costs`].

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use time::OffsetDateTime;

use super::cached::cached_body;
use super::{Ask, Endpoint};
use crate::billing::{Permission, parse};
use crate::costs::{self, Costs, PAGE_SIZE, Page, Period, View};
use crate::error::{ArgError, Error, json_response};
use crate::policy::{self, Principal};
use crate::state::AppState;
use crate::telemetry::RequestInfo;

/// `GET /gateway/v1/costs[?billing_period=YYYY-MM]`.
pub const COSTS: Endpoint = Endpoint {
    permission: Some(Permission::ConsumptionRead),
    scoped: true,
    query: |query| period(query).map(drop),
    answer: |ask| {
        async move {
            let costs = costs_of(ask).await?;
            let body = serde_json::to_value(&costs).map_err(|e| Error::Internal(e.to_string()))?;
            Ok(json_response(StatusCode::OK, &body))
        }
        .boxed()
    },
};

/// `GET /gateway/v1/costs/metrics`: the current period's figures as Prometheus text.
pub const COST_METRICS: Endpoint = Endpoint {
    permission: Some(Permission::ConsumptionRead),
    scoped: true,
    query: super::no_query,
    answer: |ask| {
        async move {
            let text = costs_of(ask).await?.prometheus();
            let mut response = text.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
        .boxed()
    },
};

/// Pages the gateway sums for one period at most: past this the organization's list is not
/// summed (502) rather than costing hundreds of upstream calls per freshness window.
const MAX_PAGES: u64 = 200;

/// Pages of one costs request asked of the cache and the budget at once.
const PAGES_AT_ONCE: usize = 4;

/// The asked period (default: the current one), or a Scaleway-shaped 400; any other parameter
/// is refused.
fn period(query: Option<&str>) -> Result<Option<Period>, Error> {
    let mut period = None;
    let mut errors = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*name {
            "billing_period" | "billingPeriod" if period.is_none() => match Period::parse(&value) {
                Some(p) => period = Some(p),
                None => errors.push(ArgError::new(
                    "billing_period",
                    "format",
                    "value must be a billing period such as 2024-01",
                )),
            },
            "billing_period" | "billingPeriod" => errors.push(ArgError::new(
                "billing_period",
                "constraint",
                "may be given only once",
            )),
            _ => errors.push(ArgError::new(
                name,
                "unknown",
                "costs takes no such parameter",
            )),
        }
    }
    if errors.is_empty() {
        Ok(period)
    } else {
        Err(Error::InvalidArguments(errors))
    }
}

/// Every page of the period's organization-wide consumption, summed for the caller.
async fn costs_of(ask: Ask<'_>) -> Result<Costs, Error> {
    let Ask {
        state,
        principal,
        query,
        request_id,
        info,
    } = ask;
    let now = OffsetDateTime::now_utc();
    let period = period(query)?.unwrap_or_else(|| Period::of(now));
    // The scope is the policy's, never the query's.
    let scope = policy::projects(principal, Permission::ConsumptionRead)?;
    // The first page tells how many there are; the others are asked together (a few at a time,
    // so the caller's own backlog stays short), so that a cold scrape waits about one turn of
    // the budget, not one per page.
    let fetch = |number| page(state, principal, request_id, period, number);
    let mut fetched = vec![fetch(1).await?];
    loop {
        let total = fetched
            .iter()
            .map(|(p, _)| p.total_count)
            .max()
            .unwrap_or(0);
        let needed = total.div_ceil(u64::from(PAGE_SIZE)).max(1);
        let have = fetched.len() as u64;
        // A page past the end is empty: the list shrank, or total_count was short.
        if have >= needed
            || fetched
                .last()
                .is_some_and(|(p, _)| p.consumptions.is_empty())
        {
            break;
        }
        if needed > MAX_PAGES {
            return Err(Error::BadGateway(format!(
                "the consumption list has {total} lines, more than costs sums ({} at most)",
                MAX_PAGES * u64::from(PAGE_SIZE)
            )));
        }
        let more: Vec<_> = futures_util::stream::iter(have + 1..=needed)
            .map(fetch)
            .buffered(PAGES_AT_ONCE)
            .try_collect()
            .await?;
        fetched.extend(more);
    }
    // The log line's notes: the longest upstream wait, and "hit" only if every page was one.
    info.upstream_ms = fetched
        .iter()
        .filter_map(|(_, i)| i.upstream_ms)
        .reduce(f64::max);
    info.cache = fetched
        .iter()
        .filter_map(|(_, i)| i.cache)
        .find(|result| *result != "hit")
        .or(Some("hit"));
    let pages: Vec<Page> = fetched.into_iter().map(|(page, _)| page).collect();
    let budgets = state.policy.load().budgets();
    let view = View {
        scope: scope.as_deref(),
        budgets: &budgets,
        now,
    };
    costs::summarize(period, &pages, &view).map_err(|e| Error::BadGateway(e.to_string()))
}

/// Page `number` of the period's organization-wide consumption, with its log notes.
async fn page(
    state: &AppState,
    principal: &Principal,
    request_id: &str,
    period: Period,
    number: u64,
) -> Result<(Page, RequestInfo), Error> {
    // Built exactly as a caller's `consumptions` call would be, so it shares its cache entry.
    let mut call = parse(
        "GET",
        "/billing/v2beta1/consumptions",
        Some(&format!(
            "billing_period={period}&page={number}&page_size={PAGE_SIZE}"
        )),
    )?;
    call.apply_organization(state.organization_id)?;
    let mut info = RequestInfo::default();
    let (body, _) = cached_body(state, &call, request_id, principal, &mut info).await?;
    let page = serde_json::from_slice(&body).map_err(|e| {
        Error::BadGateway(format!(
            "consumptions page {number} is not a consumption list: {e}"
        ))
    })?;
    Ok((page, info))
}
