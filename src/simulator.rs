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
//! Anything the gateway itself does (policy, caching, limits) does not belong here.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    Router,
    extract::{Path, RawQuery, Request, State, rejection::PathRejection},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{MethodFilter, on},
};
use base64::{Engine as _, engine::general_purpose};
use serde_json::{Value, json};
use time::{Date, Duration, OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::{Uuid, uuid};

/// The simulated organization: the only one the simulator answers for, so the gateway's own
/// organization must be configured to it in demos and tests.
pub const ORGANIZATION_ID: &str = "11111111-2222-3333-4444-555555555555";
const ORGANIZATION_NAME: &str = "Acme SAS";
const VAT_PERCENT: i64 = 20;
/// The standing rate discount (see `Data::build`), applied to the Compute category.
const COMPUTE_DISCOUNT_PERCENT: i64 = 5;
/// How many monthly invoices exist, the current month's draft included.
const MONTHS: usize = 12;

struct Project {
    name: &'static str,
    id: Uuid,
    /// Percentage of the production price, so the projects' figures differ in size.
    scale: i64,
    key: char,
}

#[rustfmt::skip]
const PROJECTS: [Project; 3] = [
    Project { name: "production", id: uuid!("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"), scale: 100, key: 'p' },
    Project { name: "staging", id: uuid!("99999999-8888-7777-6666-555555555555"), scale: 35, key: 's' },
    Project { name: "data", id: uuid!("dddddddd-eeee-ffff-0000-111111111111"), scale: 60, key: 'd' },
];

struct Item {
    category: &'static str,
    product: &'static str,
    resource: &'static str,
    sku: &'static str,
    unit: &'static str,
    /// Typical monthly price in production, in euro cents.
    cents: i64,
    /// Keys of the projects using it.
    projects: &'static str,
}

#[rustfmt::skip]
const fn item(category: &'static str, product: &'static str, resource: &'static str,
              sku: &'static str, unit: &'static str, cents: i64, projects: &'static str) -> Item {
    Item { category, product, resource, sku, unit, cents, projects }
}

#[rustfmt::skip]
const CATALOGUE: [Item; 15] = [
    item("Compute", "PRO2-S", "PRO2-S - FR-PAR-1", "/compute/pro2_s/run_fr-par-1", "minute", 4127, "psd"),
    item("Compute", "PRO2-XXS", "PRO2-XXS - FR-PAR-2", "/compute/pro2_xxs/run_fr-par-2", "minute", 1530, "psd"),
    item("Compute", "DEV1-S", "DEV1-S - NL-AMS-1", "/compute/dev1_s/run_nl-ams-1", "minute", 640, "ps"),
    item("Storage", "Block Storage Volume", "Block Storage Low Latency 5k IOPS - PAR1", "/storage/block/volume-low-latency-5k/fr-par-1", "gigabyte_hour", 312, "psd"),
    item("Storage", "Block Snapshot", "Block Snapshot - FR-PAR-1", "/storage/block/snapshot/fr-par-1", "gigabyte_hour", 95, "pd"),
    item("Network", "VPC Public Gateway S", "VPC Public Gateway S - FR-PAR-1", "/network/public_gateway/vpc-gw-s/fr-par-1", "minute", 750, "psd"),
    item("Network", "Flexible IPv4", "Flexible IPv4 - FR-PAR-1", "/network/flexible_ip/ipv4/fr-par-1", "ip_minute", 290, "psd"),
    item("Network", "Load Balancer LB-S", "LB-S - FR-PAR-1", "/network/lb/lb-s/fr-par-1", "minute", 999, "ps"),
    item("Managed Databases", "DB-PRO2-XXS", "PostgreSQL DB-PRO2-XXS - FR-PAR", "/rdb/db-pro2-xxs/fr-par", "node_minute", 5840, "psd"),
    item("Object Storage", "Object Storage Standard", "Multi-AZ Standard - FR-PAR", "/object_storage/standard/storage/fr-par", "gigabyte_minute", 420, "psd"),
    item("Object Storage", "Object Storage Egress", "Outgoing transfer - FR-PAR", "/object_storage/egress/fr-par", "gigabyte", 110, "pd"),
    item("Containers", "Kapsule Control Plane", "Kapsule Dedicated 4 - FR-PAR", "/k8s/control_plane/dedicated-4/fr-par", "hour", 4905, "psd"),
    item("Observability", "Cockpit Custom Metrics", "Cockpit Metrics - FR-PAR", "/observability/cockpit/metrics/fr-par", "request", 180, "psd"),
    item("Security and Identity", "Secret Manager", "Secret Manager - Access - FR-PAR", "/paas/secret_manager/access/fr-par", "request", 12, "psd"),
    item("Serverless", "Serverless Functions", "Functions - Invocations - FR-PAR", "/serverless/functions/invocations/fr-par", "request", 55, "pd"),
];

#[rustfmt::skip]
const INVOICE_ORDERS: [&str; 14] = [
    "invoice_number_desc", "invoice_number_asc", "start_date_desc", "start_date_asc",
    "issued_date_desc", "issued_date_asc", "due_date_desc", "due_date_asc",
    "total_untaxed_desc", "total_untaxed_asc", "total_taxed_desc", "total_taxed_asc",
    "invoice_type_desc", "invoice_type_asc",
];
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

/// FNV-1a with a final mix, so that figures and ids are stable across runs and platforms.
fn hash(seed: u64, parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in parts.iter().flat_map(|p| p.bytes().chain([0xff])) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

fn stable_uuid(parts: &[&str]) -> Uuid {
    let bits = u128::from(hash(1, parts)) << 64 | u128::from(hash(2, parts));
    uuid::Builder::from_random_bytes(bits.to_be_bytes()).into_uuid()
}

/// A billing period: a UTC calendar month, held as its first day.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Period(Date);

impl Period {
    fn of(d: Date) -> Self {
        Period(d.saturating_sub(Duration::days(i64::from(d.day()) - 1)))
    }
    fn parse(s: &str) -> Option<Self> {
        let (y, m) = s.split_once('-')?;
        let digits = |t: &str, n| t.len() == n && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(y, 4) || !digits(m, 2) {
            return None;
        }
        let month = time::Month::try_from(m.parse::<u8>().ok()?).ok()?;
        Date::from_calendar_date(y.parse().ok()?, month, 1)
            .ok()
            .map(Period)
    }
    fn days(self) -> i64 {
        i64::from(self.0.month().length(self.0.year()))
    }
    fn next(self) -> Self {
        Period(self.0.saturating_add(Duration::days(self.days())))
    }
    fn prev(self) -> Self {
        Self::of(self.0.saturating_sub(Duration::days(1)))
    }
    fn start(self) -> OffsetDateTime {
        self.0.midnight().assume_utc()
    }
    fn end(self) -> OffsetDateTime {
        self.next().start() - Duration::MICROSECOND
    }
    fn label(self) -> String {
        format!("{:04}-{:02}", self.0.year(), u8::from(self.0.month()))
    }
}

/// RFC 3339 the way Scaleway writes it: UTC, microseconds only when there are some.
fn ts(t: OffsetDateTime) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    let base = t.format(fmt).unwrap_or_default();
    match t.microsecond() {
        0 => format!("{base}Z"),
        us => format!("{base}.{us:06}Z"),
    }
}

/// Accepts what the SDKs send: RFC 3339 (Go, JS) and Python's `2024-01-01 00:00:00+00:00`.
fn parse_ts(raw: &str) -> Option<OffsetDateTime> {
    let s = match raw.split_once(' ') {
        Some((d, t)) if d.len() == 10 => format!("{d}T{t}"),
        _ => raw.to_owned(),
    };
    // An offset's `+` sent unencoded arrives decoded as a space.
    let s = s.replace(' ', "+");
    [s.clone(), format!("{s}Z")]
        .iter()
        .find_map(|c| OffsetDateTime::parse(c, &Rfc3339).ok())
}

fn money(cents: i64) -> Value {
    json!({"currency_code": "EUR", "units": cents / 100, "nanos": cents % 100 * 10_000_000})
}

fn eur(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

/// One consumption line of a month: an item used by a project.
#[derive(Clone, Copy)]
struct Line {
    project: &'static Project,
    item: &'static Item,
    cents: i64,
}

fn lines(p: Period) -> Vec<Line> {
    let label = p.label();
    let mut out = Vec::new();
    for item in &CATALOGUE {
        for project in PROJECTS.iter().filter(|pr| item.projects.contains(pr.key)) {
            let h = hash(0, &[&label, project.name, item.sku]);
            let cents = item.cents * project.scale / 100 * (70 + (h % 61) as i64) / 100;
            out.push(Line {
                project,
                item,
                cents: cents.max(1),
            });
        }
    }
    out
}

impl Line {
    fn to_json(self, p: Period) -> Value {
        let quantity = match self.item.unit {
            "minute" | "node_minute" | "ip_minute" => p.days() * 1440,
            "hour" => p.days() * 24,
            _ => self.cents * 37 / 10,
        };
        json!({
            "value": money(self.cents), "product_name": self.item.product,
            "resource_name": self.item.resource, "sku": self.item.sku,
            "project_id": self.project.id.to_string(), "category_name": self.item.category,
            "unit": self.item.unit, "billed_quantity": quantity.to_string(),
            "consumer_id": ORGANIZATION_ID, "project_name": self.project.name,
            "organization_name": ORGANIZATION_NAME,
        })
    }
}

#[derive(Clone, Copy)]
struct Totals {
    undiscount: i64,
    /// Negative, as the API reports it.
    discount: i64,
    untaxed: i64,
    tax: i64,
    taxed: i64,
}

/// A month's totals: the rate discount on Compute, then VAT.
fn totals(lines: &[Line]) -> Totals {
    let compute = lines
        .iter()
        .filter(|l| l.item.category == "Compute")
        .map(|l| l.cents);
    let discount = -(compute.sum::<i64>() * COMPUTE_DISCOUNT_PERCENT + 50) / 100;
    priced(lines.iter().map(|l| l.cents).sum(), discount)
}

fn priced(undiscount: i64, discount: i64) -> Totals {
    let untaxed = undiscount + discount;
    let tax = (untaxed * VAT_PERCENT + 50) / 100;
    Totals {
        undiscount,
        discount,
        untaxed,
        tax,
        taxed: untaxed + tax,
    }
}

#[derive(Clone, Copy)]
struct Invoice {
    id: Uuid,
    kind: &'static str,
    period: Period,
    start: OffsetDateTime,
    stop: OffsetDateTime,
    issued: Option<OffsetDateTime>,
    number: i64,
    totals: Totals,
}

impl Invoice {
    /// Seen on real invoices: due ten days after issue, at the end of that day.
    fn due(&self) -> Option<OffsetDateTime> {
        let after = |t: OffsetDateTime| t.date().saturating_add(Duration::days(11));
        self.issued
            .map(|t| after(t).midnight().assume_utc() - Duration::MICROSECOND)
    }
    fn state(&self) -> &'static str {
        if self.issued.is_some() {
            "issued"
        } else {
            "draft"
        }
    }
    /// With `invoice_number_desc` the real API lists unnumbered invoices first.
    fn number_key(&self) -> i64 {
        if self.number == 0 {
            i64::MAX
        } else {
            self.number
        }
    }
    /// Lowercase, and the CLI reads the 2nd and 3rd `-` tokens as YYYY and MM.
    fn file_name(&self) -> String {
        match self.number {
            0 => format!("invoice-{}-draft.pdf", self.period.label()),
            n => format!("invoice-{}-{n}.pdf", self.period.label()),
        }
    }
    fn json(&self) -> Value {
        let t = self.totals;
        json!({
            "id": self.id.to_string(), "organization_id": ORGANIZATION_ID,
            "organization_name": ORGANIZATION_NAME, "start_date": ts(self.start),
            "stop_date": ts(self.stop), "billing_period": ts(self.period.start()),
            "issued_date": self.issued.map(ts), "due_date": self.due().map(ts),
            "total_untaxed": money(t.untaxed), "total_taxed": money(t.taxed),
            "total_tax": money(t.tax), "total_discount": money(t.discount),
            "total_undiscount": money(t.undiscount), "type": self.kind, "state": self.state(),
            "number": self.number, "seller_name": "Scaleway SAS",
        })
    }
    fn pdf(&self) -> Vec<u8> {
        let (t, period) = (self.totals, self.period.label());
        let number = if self.number == 0 {
            "draft".to_owned()
        } else {
            self.number.to_string()
        };
        build_pdf(&[
            format!("Invoice {number} \u{2014} {ORGANIZATION_NAME} \u{2014} {period}"),
            format!(
                "Seller: Scaleway SAS    Type: {}    Id: {}",
                self.kind, self.id
            ),
            format!("Period: {} to {}", ts(self.start), ts(self.stop)),
            format!("Total before discount: {} EUR", eur(t.undiscount)),
            format!("Discount: {} EUR", eur(t.discount)),
            format!("Total untaxed: {} EUR", eur(t.untaxed)),
            format!("VAT {VAT_PERCENT}%: {} EUR", eur(t.tax)),
            format!("Total taxed: {} EUR", eur(t.taxed)),
        ])
    }
}

/// Sorts by one of `INVOICE_ORDERS`; ties are broken by start date.
fn sort_invoices(v: &mut [Invoice], order: &str) {
    let (field, dir) = order.rsplit_once('_').unwrap_or((order, "desc"));
    v.sort_by(|a, b| {
        let o = match field {
            "invoice_number" => a.number_key().cmp(&b.number_key()),
            "start_date" => a.start.cmp(&b.start),
            "issued_date" => a.issued.cmp(&b.issued),
            "due_date" => a.due().cmp(&b.due()),
            "total_untaxed" => a.totals.untaxed.cmp(&b.totals.untaxed),
            "total_taxed" => a.totals.taxed.cmp(&b.totals.taxed),
            _ => a.kind.cmp(b.kind),
        };
        o.then(a.start.cmp(&b.start))
    });
    if dir == "desc" {
        v.reverse();
    }
}

/// A fixed-amount voucher, as redeeming a welcome coupon creates one.
fn voucher(code: &str, used: f64, created: OffsetDateTime) -> Value {
    json!({
        "id": stable_uuid(&["coupon", code]).to_string(), "organization_id": ORGANIZATION_ID,
        "creation_date": ts(created), "description": format!("Voucher {code}"),
        "value": 100.0, "value_used": used, "value_remaining": 100.0 - used,
        "mode": "discount_mode_value", "start_date": ts(created),
        "stop_date": ts(created + Duration::days(365)),
        "coupon": {"description": format!("Coupon {code}")}, "filters": [],
    })
}

struct Data {
    secret: String,
    now: OffsetDateTime,
    current: Period,
    /// The last hour boundary: when consumption data was last "refreshed".
    refreshed: OffsetDateTime,
    /// In the default order, `invoice_number_desc`.
    invoices: Vec<Invoice>,
    discounts: Vec<Value>,
}

impl Data {
    fn build(secret: &str, now: OffsetDateTime) -> Data {
        let current = Period::of(now.date());
        let (mut invoices, mut p) = (Vec::new(), current);
        for age in 0..MONTHS {
            let label = p.label();
            let months = (i64::from(p.0.year()) - 2020) * 12 + i64::from(u8::from(p.0.month()));
            let h = hash(0, &["issued", &label]) as i64;
            let issued = p.next().start()
                + Duration::seconds(6 * 3600 + h.rem_euclid(7200))
                + Duration::microseconds(h.rem_euclid(1_000_000));
            let periodic = Invoice {
                id: stable_uuid(&["invoice", "periodic", &label]),
                kind: "periodic",
                period: p,
                start: p.start(),
                stop: p.end(),
                issued: (age > 0).then_some(issued),
                number: if age > 0 {
                    3_000_000 + months * 1013
                } else {
                    0
                },
                totals: totals(&lines(p)),
            };
            invoices.push(periodic);
            if age == 3 {
                let at = p.start() + Duration::seconds(13 * 86400 + 37351);
                invoices.push(Invoice {
                    id: stable_uuid(&["invoice", "purchase", &label]),
                    kind: "purchase",
                    start: at,
                    stop: at,
                    issued: Some(at),
                    number: periodic.number - 500,
                    totals: priced(25_000, 0),
                    ..periodic
                });
            }
            p = p.prev();
        }
        sort_invoices(&mut invoices, INVOICE_ORDERS[0]);
        let oldest = p.next().start();
        let rate = json!({
            "id": stable_uuid(&["discount", "compute"]).to_string(),
            "organization_id": ORGANIZATION_ID, "creation_date": ts(oldest - Duration::days(3)),
            "description": format!("Committed use: {COMPUTE_DISCOUNT_PERCENT}% off Compute"),
            "value": COMPUTE_DISCOUNT_PERCENT as f64, "value_used": 0.0,
            "value_remaining": COMPUTE_DISCOUNT_PERCENT as f64, "mode": "discount_mode_rate",
            "start_date": ts(oldest), "stop_date": null, "coupon": null,
            "filters": [{"type": "category_name", "value": "Compute", "exclude": false}],
        });
        let welcome_at =
            current.prev().prev().prev().start() + Duration::seconds(9 * 86400 + 50602);
        let discounts = vec![rate, voucher("WELCOME-ACME", 37.5, welcome_at)];
        let refreshed = now
            .date()
            .with_hms(now.hour(), 0, 0)
            .map_or(now, |t| t.assume_utc());
        let secret = secret.to_owned();
        Data {
            secret,
            now,
            current,
            refreshed,
            invoices,
            discounts,
        }
    }

    fn period(&self, q: &Query) -> Result<Period, ApiError> {
        let Some(s) = q.get("billing_period") else {
            return Ok(self.current);
        };
        Period::parse(s).ok_or_else(|| invalid("billing_period", "format", "expected YYYY-MM"))
    }

    /// No consumption exists yet for months after the current one.
    fn lines(&self, p: Period) -> Vec<Line> {
        if p > self.current {
            Vec::new()
        } else {
            lines(p)
        }
    }

    fn updated_at(&self, p: Period) -> String {
        let closed = p.next().start() + Duration::seconds(9667) + Duration::microseconds(118_204);
        ts(closed.min(self.refreshed))
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

/// The error answers, Scaleway-shaped (`message`, `type`, ...), always JSON.
struct ApiError(StatusCode, Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.0, &self.1)
    }
}

fn invalid(argument: &str, reason: &str, help: &str) -> ApiError {
    let detail = json!({"argument_name": argument, "reason": reason, "help_message": help});
    let body =
        json!({"details": [detail], "message": "invalid argument(s)", "type": "invalid_arguments"});
    ApiError(StatusCode::BAD_REQUEST, body)
}

fn not_found(resource: &str, id: &str) -> ApiError {
    let body = json!({
        "message": "resource is not found", "resource": resource, "resource_id": id,
        "type": "not_found",
    });
    ApiError(StatusCode::NOT_FOUND, body)
}

/// The JS SDK only parses a body whose content type is exactly `application/json`.
fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
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

/// Splits a raw query string into decoded pairs (`+` is a space), keeping repeated keys.
fn parse_query(raw: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let (b, mut out, mut i) = (s.as_bytes(), Vec::with_capacity(s.len()), 0);
        while i < b.len() {
            let hex = b
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
            let hex = hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
            match (b[i], hex) {
                (b'%', Some(v)) => (out.push(v), i += 3),
                (b'+', _) => (out.push(b' '), i += 1),
                (c, _) => (out.push(c), i += 1),
            };
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let pairs = raw.split('&').filter(|p| !p.is_empty());
    pairs
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// Query parameters, with camelCase names folded to snake_case (the API accepts both) and empty
/// values treated as absent (Go sends `organization_id=` when it has no default).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Self {
        let snake = |k: &str| {
            let under = |c: char| {
                if c.is_ascii_uppercase() {
                    Some('_')
                } else {
                    None
                }
            };
            k.chars()
                .flat_map(|c| under(c).into_iter().chain([c.to_ascii_lowercase()]))
                .collect()
        };
        Query(
            parse_query(raw.unwrap_or(""))
                .into_iter()
                .map(|(k, v)| (snake(&k), v))
                .collect(),
        )
    }
    fn all<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a str> {
        let wanted = move |(k, v): &&'a (String, String)| k == key && !v.is_empty();
        self.0.iter().filter(wanted).map(|(_, v)| v.as_str())
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.all(key).next()
    }
    fn uuids(&self, key: &str) -> Result<Vec<Uuid>, ApiError> {
        let bad = |_| invalid(key, "format", "value must be a valid UUID");
        self.all(key)
            .map(|v| Uuid::parse_str(v).map_err(bad))
            .collect()
    }
    fn uuid(&self, key: &str) -> Result<Option<Uuid>, ApiError> {
        Ok(self.uuids(key)?.first().copied())
    }
    fn time(&self, key: &str) -> Result<Option<OffsetDateTime>, ApiError> {
        let bad = || invalid(key, "format", "value must be an RFC 3339 timestamp");
        self.get(key)
            .map(|v| parse_ts(v).ok_or_else(bad))
            .transpose()
    }
    fn int(&self, key: &str, min: usize, max: usize) -> Result<Option<usize>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n: usize = v
            .parse()
            .map_err(|_| invalid(key, "format", "value must be an integer"))?;
        let help = format!("value must be between {min} and {max}");
        if (min..=max).contains(&n) {
            Ok(Some(n))
        } else {
            Err(invalid(key, "constraint", &help))
        }
    }
    /// An enum parameter; the first allowed value is the default.
    fn choice<'a>(&self, key: &str, allowed: &[&'a str]) -> Result<&'a str, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(allowed[0]);
        };
        let help = format!("value must be one of {}", allowed.join(", "));
        allowed
            .iter()
            .find(|a| **a == v)
            .copied()
            .ok_or_else(|| invalid(key, "constraint", &help))
    }
    /// Only the simulated organization exists; naming another one is a permission error.
    fn org(&self) -> Result<(), ApiError> {
        match self.uuid("organization_id")? {
            Some(id) if id.to_string() != ORGANIZATION_ID => {
                let details = json!([{"action": "read", "resource": "billing"}]);
                let message = "insufficient permissions";
                let body =
                    json!({"details": details, "message": message, "type": "permissions_denied"});
                Err(ApiError(StatusCode::FORBIDDEN, body))
            }
            _ => Ok(()),
        }
    }
    /// `page` is 1-based; without `page_size` everything comes in one page, as the real API does.
    fn page<T>(&self, items: Vec<T>) -> Result<(Vec<T>, usize), ApiError> {
        let page = self.int("page", 1, i32::MAX as usize)?.unwrap_or(1);
        let total = items.len();
        let size = self.int("page_size", 1, 100)?.unwrap_or(total.max(1));
        let skip = (page - 1).saturating_mul(size);
        Ok((items.into_iter().skip(skip).take(size).collect(), total))
    }
}

type Endpoint = fn(&Data, &Query, &str) -> Result<Response, ApiError>;

fn consumptions(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
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

fn taxes(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
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

fn list_invoices(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
    let (page, total) = q.page(d.filtered_invoices(q)?)?;
    let invoices: Vec<Value> = page.iter().map(Invoice::json).collect();
    ok(json!({"invoices": invoices, "total_count": total}))
}

fn get_invoice(d: &Data, _: &Query, id: &str) -> Result<Response, ApiError> {
    ok(d.invoice(id)?.json())
}

fn download(d: &Data, q: &Query, id: &str) -> Result<Response, ApiError> {
    q.choice("file_type", &["pdf"])?;
    let inv = d.invoice(id)?;
    Ok(file(q, &inv.file_name(), "application/pdf", inv.pdf()))
}

/// The CSV layout is undocumented upstream; this one has a row per invoice and plain decimals.
fn export(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
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

fn discounts(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
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

fn redeem_coupon(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
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
fn charges(d: &Data, q: &Query, _: &str) -> Result<Response, ApiError> {
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

fn encode_token(offset: usize) -> String {
    general_purpose::URL_SAFE_NO_PAD.encode(format!("sim:{offset}"))
}

fn decode_token(token: &str) -> Option<usize> {
    let text = String::from_utf8(general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    text.strip_prefix("sim:")?.parse().ok()
}

/// A minimal one-page PDF 1.4 (Helvetica, WinAnsi) whose xref offsets are computed, so that
/// strict readers open it without repairing it.
fn build_pdf(lines: &[String]) -> Vec<u8> {
    let text = |s: &str| -> Vec<u8> {
        let byte = |c: char| match c {
            '(' | ')' | '\\' => vec![b'\\', c as u8],
            '\u{2014}' => vec![0x97], // the em dash in WinAnsiEncoding
            ' '..='~' => vec![c as u8],
            _ => vec![b'?'],
        };
        s.chars().flat_map(byte).collect()
    };
    let mut content = b"BT /F1 16 Tf 22 TL 56 780 Td".to_vec();
    for (n, line) in lines.iter().enumerate() {
        content.extend_from_slice(if n == 1 { b" /F1 11 Tf T* (" } else { b" T* (" });
        content.extend(text(line));
        content.extend_from_slice(b") Tj");
    }
    content.extend_from_slice(b" ET");
    let mut stream = format!("<< /Length {} >>\nstream\n", content.len()).into_bytes();
    stream.extend(content);
    stream.extend_from_slice(b"\nendstream");
    #[rustfmt::skip]
    let objects: [&[u8]; 5] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        &stream,
    ];
    // The binary comment line tells transfer tools the file is binary.
    let mut pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::new();
    for (n, body) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend(format!("{} 0 obj\n", n + 1).bytes());
        pdf.extend_from_slice(body);
        pdf.extend_from_slice(b"\nendobj\n");
    }
    let (xref, size) = (pdf.len(), objects.len() + 1);
    pdf.extend(format!("xref\n0 {size}\n0000000000 65535 f \n").bytes());
    for o in offsets {
        pdf.extend(format!("{o:010} 00000 n \n").bytes());
    }
    let trailer = format!("trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n");
    pdf.extend(trailer.bytes());
    pdf
}

async fn handle(State((d, f)): State<(Arc<Data>, Endpoint)>, RawQuery(q): RawQuery) -> Response {
    f(&d, &Query::parse(q.as_deref()), "").unwrap_or_else(IntoResponse::into_response)
}

async fn handle_id(
    State((d, f)): State<(Arc<Data>, Endpoint)>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Response {
    let Ok(Path(id)) = id else {
        return invalid("invoice_id", "format", "value must be a valid UUID").into_response();
    };
    f(&d, &Query::parse(q.as_deref()), &id).unwrap_or_else(IntoResponse::into_response)
}

async fn unknown_path() -> Response {
    let body = json!({"message": "resource is not found", "type": "not_found"});
    json_response(StatusCode::NOT_FOUND, &body)
}

/// Checked before routing so that unknown paths also need the key, as on the real API.
async fn authenticate(State(d): State<Arc<Data>>, req: Request, next: Next) -> Response {
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

    /// Project ids of the sample organization: production, staging, data.
    pub fn project_ids(&self) -> Vec<Uuid> {
        PROJECTS.iter().map(|p| p.id).collect()
    }
}

/// Serves the simulator on `listener` until the future is dropped, so the gateway can reach it
/// over real HTTP like the real upstream.
pub async fn serve(listener: tokio::net::TcpListener, sim: Simulator) -> std::io::Result<()> {
    axum::serve(listener, sim.router()).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn pdf_xref_offsets_point_at_their_objects() {
        let pdf = build_pdf(&["Invoice 1 \u{2014} (Acme)".to_owned()]);
        let find = |needle: &[u8]| pdf.windows(needle.len()).position(|w| w == needle).unwrap();
        let text = String::from_utf8_lossy(&pdf).into_owned();
        assert!(pdf.starts_with(b"%PDF-1.4\n") && text.ends_with("%%EOF\n"));
        let startxref = text
            .rsplit("startxref\n")
            .next()
            .unwrap()
            .trim_end_matches("\n%%EOF\n");
        let startxref: usize = startxref.parse().unwrap();
        assert_eq!(startxref, find(b"xref\n0 6\n"));
        for n in 1..6 {
            let entry = &pdf[startxref + 9 + n * 20..][..20];
            let entry = std::str::from_utf8(entry).unwrap();
            assert!(entry.ends_with(" 00000 n \n"), "{entry:?}");
            let offset: usize = entry[..10].parse().unwrap();
            assert!(pdf[offset..].starts_with(format!("{n} 0 obj\n").as_bytes()));
        }
        let length = text
            .split("/Length ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let body = find(b"\nendstream") - (find(b"stream\n") + 7);
        assert_eq!(length.parse::<usize>().unwrap(), body);
        assert!(pdf.windows(2).any(|w| w == b" \x97"), "em dash in WinAnsi");
        assert!(text.contains("\\(Acme\\)"));
    }

    #[test]
    fn query_strings_decode_like_form_urlencoding() {
        let q = parse_query("category_name=Managed+Databases&x=%2Fa%2fb&k=a&k=b&flag&bad=%zz%4");
        let s = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let want = [
            ("category_name", "Managed Databases"),
            ("x", "/a/b"),
            ("k", "a"),
        ];
        let want2 = [("k", "b"), ("flag", ""), ("bad", "%zz%4")];
        assert_eq!(
            q,
            want.iter()
                .chain(&want2)
                .map(|(k, v)| s(k, v))
                .collect::<Vec<_>>()
        );
        let q = Query::parse(Some("startDateAfter=2024-01-01T00:00:00Z&organization_id="));
        assert_eq!(q.get("start_date_after"), Some("2024-01-01T00:00:00Z"));
        assert_eq!(q.get("organization_id"), None);
    }

    #[test]
    fn timestamps_in_every_sdk_form() {
        let want = OffsetDateTime::from_unix_timestamp(1_704_067_200).unwrap();
        let forms = [
            "2024-01-01T00:00:00Z",
            "2024-01-01T00:00:00.000Z",
            "2024-01-01 00:00:00",
        ];
        for raw in forms
            .iter()
            .chain(&["2024-01-01 00:00:00+00:00", "2024-01-01T01:00:00 01:00"])
        {
            assert_eq!(parse_ts(raw), Some(want), "{raw}");
        }
        assert_eq!(parse_ts("2024-13-01"), None);
        assert_eq!(
            ts(want + Duration::microseconds(5)),
            "2024-01-01T00:00:00.000005Z"
        );
    }

    #[test]
    fn money_and_periods() {
        let want = json!({"currency_code": "EUR", "units": -1, "nanos": -750_000_000});
        assert_eq!((money(-175), eur(-5)), (want, "-0.05".to_owned()));
        let p = Period::parse("2024-02").unwrap();
        assert_eq!(
            (p.days(), p.prev().label(), p.next().label()),
            (29, "2024-01".into(), "2024-03".into())
        );
        assert_eq!(ts(p.end()), "2024-02-29T23:59:59.999999Z");
        assert!(Period::parse("2024-2").is_none() && Period::parse("2024-13").is_none());
    }

    #[test]
    fn figures_are_deterministic_and_consistent() {
        let now = OffsetDateTime::from_unix_timestamp(1_785_000_000).unwrap();
        let (a, b) = (Data::build("k", now), Data::build("k", now));
        let ids = |d: &Data| d.invoices.iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        assert_eq!((a.invoices.len(), a.invoices[0].number), (MONTHS + 1, 0));
        for t in a.invoices.iter().map(|i| i.totals) {
            assert_eq!(
                (t.untaxed + t.tax, t.undiscount + t.discount),
                (t.taxed, t.untaxed)
            );
        }
        assert!((35..=45).contains(&lines(a.current).len()));
    }
}
