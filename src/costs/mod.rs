//! A caller's costs (contract §12), computed from the organization's consumption pages: the
//! pages read ([`Page`]), filtered to the caller's projects, summed exactly ([`Money`]),
//! projected to the end of the current period, set against the policy's budgets, and written
//! as JSON ([`Costs`]) or Prometheus text ([`Costs::prometheus`]).
//!
//! Pure: no I/O, no HTTP. Fetching the pages through the cache and the upstream budget is the
//! proxy's (`proxy/costs.rs`).

mod money;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime, Time};
use uuid::Uuid;

use money::div_round;
pub use money::{Money, NANOS, decimal};

/// Consumption lines asked for per page: the most the upstream gives.
pub const PAGE_SIZE: u32 = 100;

/// A billing period: a calendar month in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    year: i32,
    month: Month,
}

impl Period {
    /// `YYYY-MM`, as the consumption API writes it.
    pub fn parse(text: &str) -> Option<Period> {
        let (year, month) = text.split_once('-')?;
        if year.len() != 4
            || month.len() != 2
            || !(year.bytes().chain(month.bytes())).all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let month = Month::try_from(month.parse::<u8>().ok()?).ok()?;
        Some(Period {
            year: year.parse().ok()?,
            month,
        })
    }

    /// The period `at` falls in.
    pub fn of(at: OffsetDateTime) -> Period {
        let at = at.to_offset(time::UtcOffset::UTC);
        Period {
            year: at.year(),
            month: at.month(),
        }
    }

    /// Its first instant.
    pub fn start(self) -> OffsetDateTime {
        Date::from_calendar_date(self.year, self.month, 1)
            .unwrap_or(Date::MIN)
            .with_time(Time::MIDNIGHT)
            .assume_utc()
    }

    /// The first instant of the next period.
    pub fn end(self) -> OffsetDateTime {
        let (year, month) = match self.month {
            Month::December => (self.year + 1, Month::January),
            m => (self.year, m.next()),
        };
        Period { year, month }.start()
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, u8::from(self.month))
    }
}

/// One page of `ListConsumptions`, with only what costs need.
#[derive(Debug, Deserialize)]
pub struct Page {
    /// The page's lines.
    #[serde(default)]
    pub consumptions: Vec<Line>,
    /// Lines in every page together.
    #[serde(default)]
    pub total_count: u64,
    /// When the upstream last refreshed its figures.
    pub updated_at: Option<String>,
}

/// One consumption line.
#[derive(Debug, Deserialize)]
pub struct Line {
    /// Its untaxed value.
    pub value: Money,
    /// The project it belongs to.
    pub project_id: String,
    /// The project's name, when the upstream gives it.
    #[serde(default)]
    pub project_name: Option<String>,
    /// The category, as on the invoice.
    #[serde(default)]
    pub category_name: String,
}

/// Why pages cannot be summed: the upstream's fault (`502`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SumError {
    /// An organization bills in one currency.
    #[error("consumption lines in two currencies: {0} and {1}")]
    TwoCurrencies(String, String),
    /// More than a `Money` holds.
    #[error("a total does not fit a Money")]
    Overflow,
}

/// What a caller may see and hold against its figures.
pub struct View<'a> {
    /// `None`: every project; `Some`: only these.
    pub scope: Option<&'a [Uuid]>,
    /// Monthly budgets by project (every one the policy sets: only those in scope are shown).
    pub budgets: &'a BTreeMap<Uuid, Money>,
    /// Now, to tell the current period from a closed one.
    pub now: OffsetDateTime,
}

/// A caller's costs for one period, as `GET /gateway/v1/costs` answers them.
#[derive(Debug, Serialize)]
pub struct Costs {
    /// `YYYY-MM`.
    pub billing_period: String,
    /// The upstream's `updated_at` (the oldest of the pages'), RFC 3339.
    pub updated_at: Option<String>,
    /// Every shown project together.
    pub total: Money,
    /// The month-end projection, for the current period only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Money>,
    /// Largest total first.
    pub projects: Vec<ProjectCosts>,
}

/// One project's costs.
#[derive(Debug, Serialize)]
pub struct ProjectCosts {
    /// The project.
    pub project_id: String,
    /// Its name, when the upstream gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_name: Option<String>,
    /// Month to date.
    pub total: Money,
    /// Month-end projection, for the current period only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Money>,
    /// Its budget, when the policy sets one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Largest total first.
    pub categories: Vec<CategoryCosts>,
}

/// A project's budget and how much of it is used.
#[derive(Debug, Serialize)]
pub struct Budget {
    /// As the policy sets it.
    pub monthly: Money,
    /// Month to date over budget; absent when the budget is in another currency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_ratio: Option<f64>,
    /// Forecast over budget, for the current period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast_ratio: Option<f64>,
}

/// One category's total within a project.
#[derive(Debug, Serialize)]
pub struct CategoryCosts {
    /// As on the invoice.
    pub category_name: String,
    /// Month to date.
    pub total: Money,
}

#[derive(Default)]
struct Sum {
    name: Option<String>,
    total: i128,
    categories: HashMap<String, i128>,
}

/// Sums `pages` of `period` for `view`.
pub fn summarize(period: Period, pages: &[Page], view: &View<'_>) -> Result<Costs, SumError> {
    let mut currency: Option<&str> = None;
    let mut projects: BTreeMap<&str, Sum> = BTreeMap::new();
    for line in pages.iter().flat_map(|p| &p.consumptions) {
        // Checked on every line, seen or not: a second currency anywhere is the upstream's error.
        let code = line.value.currency_code.as_str();
        match currency {
            None => currency = Some(code),
            Some(c) if c != code => return Err(SumError::TwoCurrencies(c.into(), code.into())),
            Some(_) => {}
        }
        let in_scope = view.scope.is_none_or(|scope| {
            Uuid::try_parse(&line.project_id).is_ok_and(|id| scope.contains(&id))
        });
        if !in_scope {
            continue;
        }
        let sum = projects.entry(&line.project_id).or_default();
        let value = line.value.total_nanos();
        sum.total += value;
        *sum.categories
            .entry(line.category_name.clone())
            .or_default() += value;
        if sum.name.is_none() {
            sum.name.clone_from(&line.project_name);
        }
    }
    let budgets: Vec<(String, &Money)> = view
        .budgets
        .iter()
        .filter(|(id, _)| view.scope.is_none_or(|s| s.contains(id)))
        .map(|(id, m)| (id.to_string(), m))
        .collect();
    // A budgeted project with no line yet is shown at zero.
    let mut owned: Vec<(String, Sum)> = projects
        .into_iter()
        .map(|(id, sum)| (id.to_owned(), sum))
        .collect();
    for (id, _) in &budgets {
        if !owned.iter().any(|(p, _)| p == id) {
            owned.push((id.clone(), Sum::default()));
        }
    }
    let currency = currency
        .map(str::to_owned)
        .or_else(|| budgets.first().map(|(_, m)| m.currency_code.clone()))
        .unwrap_or_default();
    let money = |nanos: i128| Money::from_nanos(&currency, nanos).ok_or(SumError::Overflow);
    let updated = pages
        .iter()
        .filter_map(|p| p.updated_at.as_deref())
        .filter_map(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .min();
    let projection = (Period::of(view.now) == period).then(|| {
        let as_of = updated
            .unwrap_or(view.now)
            .clamp(period.start(), period.end());
        (
            i128::from((as_of - period.start()).whole_seconds()),
            i128::from((period.end() - period.start()).whole_seconds()),
        )
    });
    // Linear to the end of the period, to the cent; with no time elapsed, the total as it is.
    let forecast = |total: i128| {
        projection.map(|(elapsed, length)| {
            if elapsed <= 0 {
                total
            } else {
                div_round(total * length, elapsed * (NANOS / 100)) * (NANOS / 100)
            }
        })
    };
    let mut out = Vec::with_capacity(owned.len());
    let (mut total, mut forecast_total) = (0i128, 0i128);
    for (id, sum) in owned {
        let projected = forecast(sum.total);
        total += sum.total;
        forecast_total += projected.unwrap_or(0);
        let budget = budgets.iter().find(|(b, _)| *b == id).map(|(_, monthly)| {
            let ratio = |nanos: i128| {
                (monthly.currency_code == currency && monthly.total_nanos() > 0)
                    .then(|| nanos as f64 / monthly.total_nanos() as f64)
            };
            Budget {
                monthly: (*monthly).clone(),
                used_ratio: ratio(sum.total),
                forecast_ratio: projected.and_then(ratio),
            }
        });
        let mut categories = sum
            .categories
            .into_iter()
            .map(|(name, nanos)| Ok((name, money(nanos)?, nanos)))
            .collect::<Result<Vec<_>, SumError>>()?;
        categories.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        out.push((
            sum.total,
            ProjectCosts {
                project_id: id,
                project_name: sum.name,
                total: money(sum.total)?,
                forecast: projected.map(money).transpose()?,
                budget,
                categories: categories
                    .into_iter()
                    .map(|(category_name, total, _)| CategoryCosts {
                        category_name,
                        total,
                    })
                    .collect(),
            },
        ));
    }
    out.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| a.1.project_id.cmp(&b.1.project_id))
    });
    Ok(Costs {
        billing_period: period.to_string(),
        updated_at: updated.and_then(|t| t.format(&Rfc3339).ok()),
        total: money(total)?,
        forecast: projection.map(|_| money(forecast_total)).transpose()?,
        projects: out.into_iter().map(|(_, p)| p).collect(),
    })
}

impl Costs {
    /// The figures as Prometheus text (contract §12's series), amounts in currency units,
    /// written exactly.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let series = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        };
        series(
            &mut out,
            "billing_gateway_cost",
            "Month-to-date cost by project and category, in currency units.",
        );
        for p in &self.projects {
            for c in &p.categories {
                let _ = writeln!(
                    out,
                    "billing_gateway_cost{{project_id=\"{}\",category_name=\"{}\",currency_code=\"{}\"}} {}",
                    label(&p.project_id),
                    label(&c.category_name),
                    label(&c.total.currency_code),
                    c.total.decimal()
                );
            }
        }
        series(
            &mut out,
            "billing_gateway_cost_forecast",
            "Linear month-end forecast by project, in currency units.",
        );
        for p in &self.projects {
            if let Some(f) = &p.forecast {
                let _ = writeln!(
                    out,
                    "billing_gateway_cost_forecast{{project_id=\"{}\",currency_code=\"{}\"}} {}",
                    label(&p.project_id),
                    label(&f.currency_code),
                    f.decimal()
                );
            }
        }
        series(
            &mut out,
            "billing_gateway_budget",
            "Monthly budget by project, as the policy sets it.",
        );
        for p in &self.projects {
            if let Some(b) = &p.budget {
                let _ = writeln!(
                    out,
                    "billing_gateway_budget{{project_id=\"{}\",currency_code=\"{}\"}} {}",
                    label(&p.project_id),
                    label(&b.monthly.currency_code),
                    b.monthly.decimal()
                );
            }
        }
        if let Some(at) = self
            .updated_at
            .as_deref()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        {
            series(
                &mut out,
                "billing_gateway_cost_updated_timestamp_seconds",
                "When the upstream last refreshed these figures.",
            );
            let _ = writeln!(
                out,
                "billing_gateway_cost_updated_timestamp_seconds {}",
                at.unix_timestamp()
            );
        }
        out
    }
}

/// A label value escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const P1: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const P2: &str = "aaaaaaaa-0000-4000-8000-000000000002";

    fn line(project: &str, category: &str, units: i64, nanos: i32) -> Line {
        Line {
            value: Money {
                currency_code: "EUR".into(),
                units,
                nanos,
            },
            project_id: project.into(),
            project_name: Some(format!("name-{project}")),
            category_name: category.into(),
        }
    }

    fn page(lines: Vec<Line>, updated_at: &str) -> Page {
        Page {
            total_count: lines.len() as u64,
            consumptions: lines,
            updated_at: Some(updated_at.into()),
        }
    }

    #[test]
    fn the_forecast_is_linear_to_month_end_and_absent_when_closed() {
        let period = Period::parse("2026-12").expect("period");
        // 10 days of 31 elapsed: 31/10 of the total.
        let pages = [page(
            vec![line(P1, "Compute", 100, 0)],
            "2026-12-11T00:00:00Z",
        )];
        let budgets = BTreeMap::from([(
            P1.parse().expect("uuid"),
            Money::parse_amount("620 EUR").expect("amount"),
        )]);
        let view = View {
            scope: None,
            budgets: &budgets,
            now: datetime!(2026-12-11 01:00 UTC),
        };
        let costs = summarize(period, &pages, &view).expect("sums");
        let forecast = costs.forecast.expect("current period");
        assert_eq!((forecast.units, forecast.nanos), (310, 0));
        let budget = costs.projects[0].budget.as_ref().expect("budget");
        assert_eq!(budget.forecast_ratio, Some(0.5));
        let closed = View {
            now: datetime!(2027-01-02 00:00 UTC),
            ..view
        };
        assert!(
            summarize(period, &pages, &closed)
                .expect("sums")
                .forecast
                .is_none()
        );
    }

    #[test]
    fn a_second_currency_is_refused_even_out_of_scope() {
        let mut other = line(P2, "Compute", 1, 0);
        other.value.currency_code = "USD".into();
        let pages = [page(
            vec![line(P1, "Compute", 1, 0), other],
            "2026-12-01T00:00:00Z",
        )];
        let scope = [P1.parse().expect("uuid")];
        let view = View {
            scope: Some(&scope),
            budgets: &BTreeMap::new(),
            now: datetime!(2026-12-02 00:00 UTC),
        };
        assert_eq!(
            summarize(Period::parse("2026-12").expect("p"), &pages, &view).err(),
            Some(SumError::TwoCurrencies("EUR".into(), "USD".into()))
        );
    }

    #[test]
    fn periods_parse_strictly() {
        assert_eq!(
            Period::parse("2026-02").map(|p| p.to_string()).as_deref(),
            Some("2026-02")
        );
        for bad in [
            "2026-13", "2026-2", "26-02", "2026-00", "2026/02", "+026-02",
        ] {
            assert!(Period::parse(bad).is_none(), "{bad}");
        }
        let dec = Period::parse("2026-12").expect("p");
        assert_eq!(dec.end(), datetime!(2027-01-01 00:00 UTC));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
