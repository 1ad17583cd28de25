//! The sample organization, "Acme SAS": its projects, its catalogue, and the consumption lines,
//! invoices and discounts derived from them, and the API's money and timestamp formats.
//!
//! Nothing here knows about HTTP: `routes` turns requests into lookups on [`Data`].

use serde_json::{Value, json};
use time::{Date, Duration, OffsetDateTime};
use uuid::{Uuid, uuid};

use crate::ORGANIZATION_ID;
use crate::pdf::build_pdf;

pub(crate) const ORGANIZATION_NAME: &str = "Acme SAS";
pub(crate) const VAT_PERCENT: i64 = 20;
/// The standing rate discount (see `Data::build`), applied to the Compute category.
const COMPUTE_DISCOUNT_PERCENT: i64 = 5;
/// How many monthly invoices exist, the current month's draft included.
const MONTHS: usize = 12;

pub(crate) struct Project {
    pub(crate) name: &'static str,
    pub(crate) id: Uuid,
    /// Percentage of the production price, so the projects' figures differ in size.
    scale: i64,
    key: char,
}

#[rustfmt::skip]
pub(crate) const PROJECTS: [Project; 3] = [
    Project { name: "production", id: uuid!("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"), scale: 100, key: 'p' },
    Project { name: "staging", id: uuid!("99999999-8888-7777-6666-555555555555"), scale: 35, key: 's' },
    Project { name: "data", id: uuid!("dddddddd-eeee-ffff-0000-111111111111"), scale: 60, key: 'd' },
];

pub(crate) struct Item {
    pub(crate) category: &'static str,
    pub(crate) product: &'static str,
    resource: &'static str,
    pub(crate) sku: &'static str,
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
pub(crate) const INVOICE_ORDERS: [&str; 14] = [
    "invoice_number_desc", "invoice_number_asc", "start_date_desc", "start_date_asc",
    "issued_date_desc", "issued_date_asc", "due_date_desc", "due_date_asc",
    "total_untaxed_desc", "total_untaxed_asc", "total_taxed_desc", "total_taxed_asc",
    "invoice_type_desc", "invoice_type_asc",
];

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

pub(crate) fn stable_uuid(parts: &[&str]) -> Uuid {
    let bits = u128::from(hash(1, parts)) << 64 | u128::from(hash(2, parts));
    uuid::Builder::from_random_bytes(bits.to_be_bytes()).into_uuid()
}

/// A billing period: a UTC calendar month, held as its first day.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) struct Period(Date);

impl Period {
    fn of(d: Date) -> Self {
        Period(d.saturating_sub(Duration::days(i64::from(d.day()) - 1)))
    }
    pub(crate) fn parse(s: &str) -> Option<Self> {
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
    pub(crate) fn days(self) -> i64 {
        i64::from(self.0.month().length(self.0.year()))
    }
    fn next(self) -> Self {
        Period(self.0.saturating_add(Duration::days(self.days())))
    }
    fn prev(self) -> Self {
        Self::of(self.0.saturating_sub(Duration::days(1)))
    }
    pub(crate) fn start(self) -> OffsetDateTime {
        self.0.midnight().assume_utc()
    }
    pub(crate) fn end(self) -> OffsetDateTime {
        self.next().start() - Duration::MICROSECOND
    }
    pub(crate) fn label(self) -> String {
        format!("{:04}-{:02}", self.0.year(), u8::from(self.0.month()))
    }
}

/// RFC 3339 the way Scaleway writes it: UTC, microseconds only when there are some.
pub(crate) fn ts(t: OffsetDateTime) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    let base = t.format(fmt).unwrap_or_default();
    match t.microsecond() {
        0 => format!("{base}Z"),
        us => format!("{base}.{us:06}Z"),
    }
}

pub(crate) fn money(cents: i64) -> Value {
    json!({"currency_code": "EUR", "units": cents / 100, "nanos": cents % 100 * 10_000_000})
}

pub(crate) fn eur(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

/// One consumption line of a month: an item used by a project.
#[derive(Clone, Copy)]
pub(crate) struct Line {
    pub(crate) project: &'static Project,
    pub(crate) item: &'static Item,
    pub(crate) cents: i64,
}

pub(crate) fn lines(p: Period) -> Vec<Line> {
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
    pub(crate) fn to_json(self, p: Period) -> Value {
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
pub(crate) struct Totals {
    pub(crate) undiscount: i64,
    /// Negative, as the API reports it.
    pub(crate) discount: i64,
    pub(crate) untaxed: i64,
    pub(crate) tax: i64,
    pub(crate) taxed: i64,
}

/// A month's totals: the rate discount on Compute, then VAT.
pub(crate) fn totals(lines: &[Line]) -> Totals {
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
pub(crate) struct Invoice {
    pub(crate) id: Uuid,
    pub(crate) kind: &'static str,
    pub(crate) period: Period,
    pub(crate) start: OffsetDateTime,
    pub(crate) stop: OffsetDateTime,
    pub(crate) issued: Option<OffsetDateTime>,
    pub(crate) number: i64,
    pub(crate) totals: Totals,
}

impl Invoice {
    /// Seen on real invoices: due ten days after issue, at the end of that day.
    pub(crate) fn due(&self) -> Option<OffsetDateTime> {
        let after = |t: OffsetDateTime| t.date().saturating_add(Duration::days(11));
        self.issued
            .map(|t| after(t).midnight().assume_utc() - Duration::MICROSECOND)
    }
    pub(crate) fn state(&self) -> &'static str {
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
    pub(crate) fn file_name(&self) -> String {
        match self.number {
            0 => format!("invoice-{}-draft.pdf", self.period.label()),
            n => format!("invoice-{}-{n}.pdf", self.period.label()),
        }
    }
    pub(crate) fn json(&self) -> Value {
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
    pub(crate) fn pdf(&self) -> Vec<u8> {
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
pub(crate) fn sort_invoices(v: &mut [Invoice], order: &str) {
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
pub(crate) fn voucher(code: &str, used: f64, created: OffsetDateTime) -> Value {
    json!({
        "id": stable_uuid(&["coupon", code]).to_string(), "organization_id": ORGANIZATION_ID,
        "creation_date": ts(created), "description": format!("Voucher {code}"),
        "value": 100.0, "value_used": used, "value_remaining": 100.0 - used,
        "mode": "discount_mode_value", "start_date": ts(created),
        "stop_date": ts(created + Duration::days(365)),
        "coupon": {"description": format!("Coupon {code}")}, "filters": [],
    })
}

pub(crate) struct Data {
    /// The only X-Auth-Token accepted.
    pub(crate) secret: String,
    pub(crate) now: OffsetDateTime,
    pub(crate) current: Period,
    /// The last hour boundary: when consumption data was last "refreshed".
    refreshed: OffsetDateTime,
    /// In the default order, `invoice_number_desc`.
    pub(crate) invoices: Vec<Invoice>,
    pub(crate) discounts: Vec<Value>,
}

impl Data {
    pub(crate) fn build(secret: &str, now: OffsetDateTime) -> Data {
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

    /// No consumption exists yet for months after the current one.
    pub(crate) fn lines(&self, p: Period) -> Vec<Line> {
        if p > self.current {
            Vec::new()
        } else {
            lines(p)
        }
    }

    pub(crate) fn updated_at(&self, p: Period) -> String {
        let closed = p.next().start() + Duration::seconds(9667) + Duration::microseconds(118_204);
        ts(closed.min(self.refreshed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn money_periods_and_timestamps() {
        let want = json!({"currency_code": "EUR", "units": -1, "nanos": -750_000_000});
        assert_eq!((money(-175), eur(-5)), (want, "-0.05".to_owned()));
        let p = Period::parse("2024-02").unwrap();
        assert_eq!(
            (p.days(), p.prev().label(), p.next().label()),
            (29, "2024-01".into(), "2024-03".into())
        );
        assert_eq!(ts(p.end()), "2024-02-29T23:59:59.999999Z");
        let jan = OffsetDateTime::from_unix_timestamp(1_704_067_200).unwrap();
        assert_eq!(
            ts(jan + Duration::microseconds(5)),
            "2024-01-01T00:00:00.000005Z"
        );
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
