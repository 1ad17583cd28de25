//! The endpoints, one function per Billing operation, and the axum handlers that run them
//! behind the X-Auth-Token check.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    extract::{Path, RawQuery, Request, State, rejection::PathRejection},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::{Engine as _, engine::general_purpose};
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::ORGANIZATION_ID;
use crate::data::{
    Data, INVOICE_ORDERS, Invoice, Line, ORGANIZATION_NAME, Period, VAT_PERCENT, eur, lines, money,
    sort_invoices, stable_uuid, totals, ts, voucher,
};
use crate::query::{
    ApiError, Query, decode_token, encode_token, invalid, json_response, not_found,
};

/// One Billing operation: it answers from the sample data, the query and the path's invoice id
/// (empty for paths without one).
pub(crate) type Endpoint = fn(&Data, &Query, &str) -> Result<Response, ApiError>;

const CONSUMPTION_ORDERS: [&str; 4] = [
    "updated_at_desc",
    "updated_at_asc",
    "category_name_desc",
    "category_name_asc",
];
#[rustfmt::skip]
const DISCOUNT_ORDERS: [&str; 6] = ["creation_date_desc", "creation_date_asc", "start_date_desc",
    "start_date_asc", "stop_date_desc", "stop_date_asc"];
const INVOICE_TYPES: [&str; 4] = ["unknown_type", "periodic", "purchase", "credit_note"];

/// Lookups on the sample data by what a request asks.
impl Data {
    fn period(&self, q: &Query) -> Result<Period, ApiError> {
        let Some(s) = q.get("billing_period") else {
            return Ok(self.current);
        };
        Period::parse(s).ok_or_else(|| invalid("billing_period", "format", "expected YYYY-MM"))
    }

    fn invoice(&self, id: &str) -> Result<&Invoice, ApiError> {
        let bad = |_| invalid("invoice_id", "format", "value must be a valid UUID");
        let uuid = Uuid::parse_str(id).map_err(bad)?;
        self.invoices
            .iter()
            .find(|i| i.id == uuid)
            .ok_or_else(|| not_found("invoice", id))
    }

    /// The invoice filters shared by the list and the export. The start-date window is
    /// half-open: `start_after <= start_date < start_before`.
    fn filtered_invoices(&self, q: &Query) -> Result<Vec<Invoice>, ApiError> {
        q.org()?;
        let after = q.time("billing_period_start_after")?;
        let before = q.time("billing_period_start_before")?;
        let kind = q.choice("invoice_type", &INVOICE_TYPES)?;
        let order = q.choice("order_by", &INVOICE_ORDERS)?;
        let mut v: Vec<Invoice> = (self.invoices.iter().copied())
            .filter(|i| after.is_none_or(|a| i.start >= a) && before.is_none_or(|b| i.start < b))
            .filter(|i| kind == "unknown_type" || i.kind == kind)
            .collect();
        sort_invoices(&mut v, order);
        Ok(v)
    }
}

fn ok(body: Value) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::OK, &body))
}

/// `dl=1` asks for the raw file (JS SDK); otherwise the `{name, content_type, content}` envelope.
fn file(q: &Query, name: &str, content_type: &str, bytes: Vec<u8>) -> Response {
    if matches!(q.get("dl"), Some("1" | "true" | "True")) {
        let disposition = format!("attachment; filename=\"{name}\"");
        let headers = [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ];
        return (headers, bytes).into_response();
    }
    let content = general_purpose::STANDARD.encode(&bytes);
    ok(json!({"name": name, "content_type": content_type, "content": content}))
        .unwrap_or_else(IntoResponse::into_response)
}

pub(crate) fn consumptions(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
    let order = q.choice("order_by", &CONSUMPTION_ORDERS)?;
    let project = q.uuid("project_id")?;
    if project.is_some() && q.get("organization_id").is_some() {
        let help = "set at most one of organization_id and project_id";
        return Err(invalid("organization_id", "constraint", help));
    }
    q.org()?;
    let period = d.period(q)?;
    let category = q.get("category_name");
    let all = d.lines(period);
    let mut v: Vec<Line> = (all.iter().copied())
        .filter(|l| project.is_none_or(|p| l.project.id == p))
        .filter(|l| category.is_none_or(|c| l.item.category == c))
        .collect();
    // Every line has the same `updated_at`, so that order is the catalogue's.
    if order.starts_with("category") {
        v.sort_by_key(|l| (l.item.category, l.item.sku, l.project.name));
    }
    if matches!(order, "updated_at_asc" | "category_name_desc") {
        v.reverse();
    }
    let filtered = project.is_some() || category.is_some();
    let discount = if filtered { 0 } else { -totals(&all).discount };
    let (page, total) = q.page(v)?;
    ok(json!({
        "consumptions": page.iter().map(|l| l.to_json(period)).collect::<Vec<_>>(),
        "total_count": total, "total_discount_untaxed_value": discount as f64 / 100.0,
        "updated_at": d.updated_at(period),
    }))
}

pub(crate) fn taxes(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
    q.choice("order_by", &CONSUMPTION_ORDERS)?;
    q.org()?;
    let period = d.period(q)?;
    let lines = d.lines(period);
    let (rate, tax) = (
        VAT_PERCENT as f64 / 100.0,
        totals(&lines).tax as f64 / 100.0,
    );
    let vat =
        json!({"description": "VAT", "currency": "EUR", "rate": rate, "total_tax_value": tax});
    let (page, total) = q.page(if lines.is_empty() { vec![] } else { vec![vat] })?;
    ok(json!({"taxes": page, "total_count": total, "updated_at": d.updated_at(period)}))
}

pub(crate) fn list_invoices(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
    let (page, total) = q.page(d.filtered_invoices(q)?)?;
    let invoices: Vec<Value> = page.iter().map(Invoice::json).collect();
    ok(json!({"invoices": invoices, "total_count": total}))
}

pub(crate) fn get_invoice(d: &Data, _: &Query, id: &str) -> Result<Response, ApiError> {
    ok(d.invoice(id)?.json())
}

pub(crate) fn download(d: &Data, q: &Query, id: &str) -> Result<Response, ApiError> {
    q.choice("file_type", &["pdf"])?;
    let inv = d.invoice(id)?;
    Ok(file(q, &inv.file_name(), "application/pdf", inv.pdf()))
}

/// The CSV layout is undocumented upstream; this one has a row per invoice and plain decimals.
pub(crate) fn export(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
    q.choice("file_type", &["csv"])?;
    let (page, _) = q.page(d.filtered_invoices(q)?)?;
    let mut csv = String::from(
        "id,number,type,state,organization_name,billing_period,start_date,stop_date,issued_date,\
         due_date,currency,total_undiscount,total_discount,total_untaxed,total_tax,total_taxed\n",
    );
    let opt = |t: Option<OffsetDateTime>| t.map(ts).unwrap_or_default();
    for i in page {
        let t = i.totals;
        let _ = writeln!(
            csv,
            "{},{},{},{},{ORGANIZATION_NAME},{},{},{},{},{},EUR,{},{},{},{},{}",
            i.id,
            i.number,
            i.kind,
            i.state(),
            i.period.label(),
            ts(i.start),
            ts(i.stop),
            opt(i.issued),
            opt(i.due()),
            eur(t.undiscount),
            eur(t.discount),
            eur(t.untaxed),
            eur(t.tax),
            eur(t.taxed)
        );
    }
    let name = format!("invoices-{}-export.csv", d.current.label());
    Ok(file(q, &name, "text/csv", csv.into_bytes()))
}

pub(crate) fn discounts(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
    q.org()?;
    let order = q.choice("order_by", &DISCOUNT_ORDERS)?;
    let (field, dir) = order.rsplit_once('_').unwrap_or((order, "desc"));
    let mut v: Vec<&Value> = d.discounts.iter().collect();
    // Timestamps here all have the same shape, so they sort as strings; null sorts first.
    v.sort_by_key(|x| x[field].as_str().map(str::to_owned));
    if dir == "desc" {
        v.reverse();
    }
    let (page, total) = q.page(v)?;
    ok(json!({"discounts": page, "total_count": total}))
}

pub(crate) fn redeem_coupon(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
    let code = q
        .get("code")
        .ok_or_else(|| invalid("code", "required", "a code is required"))?;
    q.org()?;
    if code.eq_ignore_ascii_case("WELCOME100") || code.starts_with("DEMO") {
        return ok(voucher(code, 0.0, d.now));
    }
    Err(not_found("coupon", code))
}

/// One charge per consumption line per day, so the month's charges add up to its consumption.
/// Only charges lying entirely inside the window are returned; `clamp_to_time_range` is ignored
/// since no simulated charge spans more than a day.
pub(crate) fn charges(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
    let order = q.choice("order_by", &["start_date_asc", "start_date_desc"])?;
    let size = q.int("page_size", 1, 1000)?.unwrap_or(1000);
    let bad_token = || invalid("page_token", "format", "unknown page token");
    let offset = q
        .get("page_token")
        .map(|t| decode_token(t).ok_or_else(bad_token));
    let offset = offset.transpose()?.unwrap_or(0);
    q.org()?;
    let (projects, invoices) = (q.uuids("project_ids")?, q.uuids("invoice_ids")?);
    let lists: Vec<Vec<&str>> = ["skus", "resource_ids", "resource_names"]
        .map(|k| q.all(k).collect())
        .into();
    let after = q.time("start_date_after")?.unwrap_or(d.current.start());
    let before = q.time("end_date_before")?.unwrap_or(d.current.end());
    let mut out = Vec::new();
    for inv in d.invoices.iter().filter(|i| i.kind == "periodic") {
        let (p, days) = (inv.period, inv.period.days());
        if p.end() < after
            || p.start() > before
            || !(invoices.is_empty() || invoices.contains(&inv.id))
        {
            continue;
        }
        for l in lines(p) {
            let (id, name) = resource(&l);
            let values = [l.item.sku, id.as_str(), name.as_str()];
            let mut pairs = values.iter().zip(&lists);
            let unwanted = pairs.any(|(v, list)| !list.is_empty() && !list.contains(v));
            if unwanted || !projects.is_empty() && !projects.contains(&l.project.id) {
                continue;
            }
            for day in 0..days {
                let start = p.start() + Duration::days(day);
                if start >= after && start + Duration::DAY - Duration::MICROSECOND <= before {
                    let cents = l.cents / days + i64::from(day < l.cents % days);
                    out.push((start, l, inv.id, cents));
                }
            }
        }
    }
    out.sort_by_key(|(start, l, _, _)| (*start, l.project.name, l.item.sku));
    if order == "start_date_desc" {
        out.reverse();
    }
    let next = (offset + size < out.len()).then(|| encode_token(offset + size));
    let page = out.into_iter().skip(offset).take(size);
    let page: Vec<Value> = page
        .map(|(start, l, inv, cents)| charge(start, l, inv, cents))
        .collect();
    ok(json!({"charges": page, "next_page_token": next}))
}

fn charge(start: OffsetDateTime, l: Line, invoice: Uuid, cents: i64) -> Value {
    let (end, (id, name)) = (start + Duration::DAY - Duration::MICROSECOND, resource(&l));
    json!({
        "organization_id": ORGANIZATION_ID, "organization_name": ORGANIZATION_NAME,
        "project_id": l.project.id.to_string(), "project_name": l.project.name,
        "sku": l.item.sku, "invoice_id": invoice.to_string(), "resource_id": id,
        "resource_name": name, "price": money(cents), "start_date": ts(start),
        "end_date": ts(end), "updated_at": ts(start + Duration::minutes(27 * 60 + 10)),
    })
}

/// The FinOps resource behind a consumption line: (resource_id, resource_name).
fn resource(l: &Line) -> (String, String) {
    let id = stable_uuid(&["resource", l.project.name, l.item.sku]).to_string();
    let product = l.item.product.to_lowercase().replace(' ', "-");
    (id, format!("{}-{product}", l.project.name))
}

pub(crate) async fn handle(
    State((d, f)): State<(Arc<Data>, Endpoint)>,
    RawQuery(q): RawQuery,
) -> Response {
    f(&d, &Query::parse(q.as_deref()), "").unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn handle_id(
    State((d, f)): State<(Arc<Data>, Endpoint)>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Response {
    let Ok(Path(id)) = id else {
        return invalid("invoice_id", "format", "value must be a valid UUID").into_response();
    };
    f(&d, &Query::parse(q.as_deref()), &id).unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn unknown_path() -> Response {
    let body = json!({"message": "resource is not found", "type": "not_found"});
    json_response(StatusCode::NOT_FOUND, &body)
}

/// Checked before routing so that unknown paths also need the key, as on the real API.
pub(crate) async fn authenticate(State(d): State<Arc<Data>>, req: Request, next: Next) -> Response {
    let token = req.headers().get("x-auth-token");
    if token.is_some_and(|t| t.as_bytes() == d.secret.as_bytes()) {
        return next.run(req).await;
    }
    let body = json!({
        "message": "authentication is denied", "method": "api_key", "reason": "not_found",
        "type": "denied_authentication",
    });
    json_response(StatusCode::UNAUTHORIZED, &body)
}
