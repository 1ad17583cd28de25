//! A request becomes a validated [`Call`] here, or an error: the route is matched against the
//! operation table's templates, and the query (validated and normalised in `query.rs`) joins
//! it. The upstream URL and the cache key are both built from a `Call` alone, so what a `Call`
//! holds and answers lives here too.

use uuid::Uuid;

use super::operations::{Audit, Method, OPERATIONS, Operation, OrgRule, Scope};
use super::query::{parse_uuid, validate_query};
use crate::error::{ArgError, Error};

/// A validated request for one operation: the only input the upstream URL and cache key are
/// built from.
#[derive(Debug, Clone)]
pub struct Call {
    /// The operation.
    pub op: &'static Operation,
    /// The path parameter, for `{invoice_id}` templates.
    pub id: Option<Uuid>,
    /// Normalised query pairs, sorted by name (list values keep their order).
    pub query: Vec<(&'static str, String)>,
}

impl Call {
    /// The first value of a parameter.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a (list) parameter.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.query
            .iter()
            .filter(move |(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets a parameter's values (replacing any), keeping the query sorted.
    pub fn set(&mut self, name: &'static str, values: impl IntoIterator<Item = String>) {
        self.query.retain(|(n, _)| *n != name);
        self.query.extend(values.into_iter().map(|v| (name, v)));
        self.query.sort_by_key(|(n, _)| *n);
    }

    /// The upstream path, from the template and the validated id only.
    pub fn path(&self) -> String {
        match (self.id, self.op.path.split_once("{invoice_id}")) {
            (Some(id), Some((head, tail))) => format!("{head}{id}{tail}"),
            _ => self.op.path.to_owned(),
        }
    }

    /// The canonical, percent-encoded query string (empty when there are no parameters).
    pub fn query_string(&self) -> String {
        let mut out = String::new();
        self.write_query(&mut out);
        out
    }

    /// Appends the canonical query string to `out`: what `form_urlencoded::Serializer` writes,
    /// without its intermediate `String` (the cache key is built on every cacheable request).
    pub fn write_query(&self, out: &mut String) {
        for (i, (name, value)) in self.query.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.extend(form_urlencoded::byte_serialize(name.as_bytes()));
            out.push('=');
            out.extend(form_urlencoded::byte_serialize(value.as_bytes()));
        }
    }

    /// Whether the caller asked a file endpoint for the raw bytes (`dl=1`) rather than the JSON
    /// envelope.
    pub fn wants_raw_file(&self) -> bool {
        self.op
            .download
            .is_some_and(|d| self.get(d.raw_flag).is_some())
    }

    /// The value of the operation's audited parameter, cut as its [`Audit::Prefix`] says:
    /// `(parameter, prefix)`, or `None` when the operation's audit events name no parameter (or
    /// the call does not give it).
    pub fn audit_prefix(&self) -> Option<(&'static str, String)> {
        match self.op.audit {
            Audit::Prefix { param, chars } => self
                .get(param)
                .map(|value| (param, value.chars().take(chars).collect())),
            Audit::None | Audit::Event => None,
        }
    }

    /// Fills in or checks `organization_id` as the operation's [`OrgRule`] says.
    pub fn apply_organization(&mut self, org: Uuid) -> Result<(), Error> {
        let rule = self.op.org;
        if rule == OrgRule::None {
            return Ok(());
        }
        if let Some(asked) = self.get("organization_id") {
            // Validated values are canonical UUIDs; compared parsed, with no string built.
            return if Uuid::try_parse(asked).is_ok_and(|asked| asked == org) {
                Ok(())
            } else {
                Err(Error::PermissionDenied {
                    message: "this gateway serves one organization; organization_id names another"
                        .into(),
                    action: "read",
                    resource: "organization",
                })
            };
        }
        if rule == OrgRule::FillUnlessProject && self.names_project() {
            return Ok(());
        }
        self.set("organization_id", [org.to_string()]);
        Ok(())
    }

    /// Whether the call names an organization (given by the caller or filled in).
    pub fn names_organization(&self) -> bool {
        self.get("organization_id").is_some()
    }

    /// Whether the call names the project of a [`Scope::One`] operation.
    fn names_project(&self) -> bool {
        match self.op.scope {
            Scope::One(param) => self.get(param).is_some(),
            Scope::None | Scope::Many(_) => false,
        }
    }
}

/// Finds the operation for a method and raw (still percent-encoded) path, and validates the
/// raw query string against it.
///
/// ```
/// use billing_gateway::billing::parse;
/// use billing_gateway::Error;
///
/// // However the SDK spells and orders the parameters, one canonical query, sorted by name.
/// let call = parse("GET", "/billing/v2beta1/consumptions", Some("pageSize=10&billing_period=2026-07"))
///     .expect("valid");
/// assert_eq!(call.op.name, "consumptions");
/// assert_eq!(call.query_string(), "billing_period=2026-07&page_size=10");
///
/// // The one path parameter is a UUID, and the upstream path is rebuilt from it.
/// let id = "7b1e9d40-3c55-4d2e-8f61-0a9b8c7d6e5f";
/// let call = parse("GET", &format!("/billing/v2beta1/invoices/{id}"), None).expect("valid");
/// assert_eq!(call.path(), format!("/billing/v2beta1/invoices/{id}"));
///
/// // Anything else never becomes a call, so never reaches the upstream.
/// assert!(parse("GET", "/billing/v2beta1/invoices/..%2Fsecret", None).is_err());
/// assert!(matches!(parse("GET", "/billing/v2beta1/anything", None), Err(Error::NotFound)));
/// let refused = parse("DELETE", "/billing/v2beta1/invoices", None);
/// assert!(matches!(refused, Err(Error::MethodNotAllowed { allow }) if allow == "GET, HEAD"));
/// // HEAD is the GET it stands for.
/// assert_eq!(parse("HEAD", "/billing/v2beta1/invoices", None).expect("valid").op.name, "invoices");
/// for query in ["page=0", "page_size=101", "colour=blue", "project_id=not-a-uuid"] {
///     let refused = parse("GET", "/billing/v2beta1/consumptions", Some(query));
///     assert!(matches!(refused, Err(Error::InvalidArguments(_))), "{query}");
/// }
/// ```
pub fn parse(method: &str, path: &str, raw_query: Option<&str>) -> Result<Call, Error> {
    let (op, id) = route(method, path)?;
    let query = validate_query(op, raw_query.unwrap_or(""))?;
    let has = |name: &str| query.iter().any(|(n, _)| *n == name);
    if let (OrgRule::FillUnlessProject, Scope::One(project)) = (op.org, op.scope)
        && has("organization_id")
        && has(project)
    {
        return Err(Error::InvalidArguments(vec![ArgError::new(
            project,
            "constraint",
            format!("organization_id and {project} are exclusive: give at most one"),
        )]));
    }
    Ok(Call { op, id, query })
}

/// `HEAD` is served wherever `GET` is, as the `GET` it stands for: the upstream is sent that
/// `GET` (the Billing API promises nothing about `HEAD`, and a cached answer serves both), and
/// the server drops the body of the answer.
fn route(method: &str, path: &str) -> Result<(&'static Operation, Option<Uuid>), Error> {
    let asked = if method == "HEAD" { "GET" } else { method };
    let mut allowed: Vec<&'static str> = Vec::new();
    for op in OPERATIONS {
        let Some(id) = match_template(op.path, path)? else {
            continue;
        };
        if op.method.as_str() == asked {
            return Ok((op, id));
        }
        allowed.push(op.method.as_str());
        if op.method == Method::Get {
            allowed.push("HEAD");
        }
    }
    if allowed.is_empty() {
        return Err(Error::NotFound);
    }
    Err(Error::MethodNotAllowed {
        allow: allowed.join(", "),
    })
}

/// `Ok(None)`: another path. `Ok(Some(id))`: this template (id for `{invoice_id}`).
/// A path of the template's shape whose id is not a UUID (`..`, `%2F`, `;x`) is refused.
fn match_template(template: &str, path: &str) -> Result<Option<Option<Uuid>>, Error> {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    let mut raw_id = None;
    loop {
        match (t.next(), p.next()) {
            (None, None) => break,
            (Some("{invoice_id}"), Some(segment)) if !segment.is_empty() => raw_id = Some(segment),
            (Some(a), Some(b)) if a == b => {}
            _ => return Ok(None),
        }
    }
    raw_id
        .map(|raw| {
            parse_uuid(raw).ok_or_else(|| {
                Error::InvalidArguments(vec![ArgError::new(
                    "invoice_id",
                    "format",
                    "value must be a valid UUID",
                )])
            })
        })
        .transpose()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{Kind, by_name};

    fn call(method: &str, path: &str, query: &str) -> Result<Call, Error> {
        parse(method, path, Some(query))
    }

    #[test]
    fn nine_operations_one_permission_each() {
        assert_eq!(OPERATIONS.len(), 9);
        for op in OPERATIONS {
            assert!(op.path.starts_with("/billing/v2beta1/"));
            assert_eq!(by_name(op.name).map(|o| o.path), Some(op.path));
        }
    }

    #[test]
    fn paths_match_templates_exactly() {
        let id = "7b1e9d40-3c55-4d2e-8f61-0a9b8c7d6e5f";
        let c = call(
            "GET",
            &format!("/billing/v2beta1/invoices/{id}/download"),
            "dl=1",
        )
        .expect("valid");
        assert_eq!(c.op.name, "download-invoice");
        assert_eq!(c.path(), format!("/billing/v2beta1/invoices/{id}/download"));
        assert!(c.wants_raw_file());

        for (path, want) in [
            ("/billing/v2beta1/invoices/..", 400),
            ("/billing/v2beta1/invoices/%2e%2e", 400),
            (&format!("/billing/v2beta1/invoices/{id}%2Fdownload"), 400),
            (&format!("/billing/v2beta1/invoices/{id};x=1"), 400),
            (&format!("/billing/v2beta1/invoices/{{{id}}}"), 400),
            ("/billing/v2beta1//invoices", 404),
            ("/billing/v2beta1/invoices/", 404),
            ("/billing/v2beta1/consumptions/", 404),
            ("/billing/v2beta1/budgets", 404),
            ("/billing/v2beta1/invoices/../consumptions", 404),
            ("/Billing/v2beta1/invoices", 404),
        ] {
            let status = call("GET", path, "").err().map(|e| e.status().as_u16());
            assert_eq!(status, Some(want), "{path}");
        }
        assert_eq!(
            call("DELETE", "/billing/v2beta1/invoices", "")
                .err()
                .map(|e| e.status().as_u16()),
            Some(405)
        );
    }

    #[test]
    fn audit_events_name_a_prefix_of_the_parameter_the_table_says() {
        let c = call("POST", "/billing/v2beta1/redeem-coupon", "code=WELCOME2026").expect("valid");
        assert_eq!(c.audit_prefix(), Some(("code", "WELC".to_owned())));
        let c = call("GET", "/billing/v2beta1/export-invoices", "dl=1").expect("valid");
        assert_eq!(c.op.audit, Audit::Event);
        assert_eq!(c.audit_prefix(), None);

        let mut op = c.op.clone();
        op.audit = Audit::Prefix {
            param: "file_type",
            chars: 2,
        };
        let op: &'static Operation = Box::leak(Box::new(op));
        let c = Call {
            op,
            ..call("GET", "/billing/v2beta1/export-invoices", "file_type=csv").expect("valid")
        };
        assert_eq!(c.audit_prefix(), Some(("file_type", "cs".to_owned())));
    }

    #[test]
    fn only_file_endpoints_take_the_raw_flag() {
        for op in OPERATIONS {
            let has_flag = op.params.iter().any(|p| matches!(p.kind, Kind::Flag));
            assert_eq!(has_flag, op.download.is_some(), "{}", op.name);
        }
        let id = "7b1e9d40-3c55-4d2e-8f61-0a9b8c7d6e5f";
        let path = format!("/billing/v2beta1/invoices/{id}/download");
        assert!(!call("GET", &path, "").expect("valid").wants_raw_file());
        // Without the table's `download`, `dl` is no longer a raw-file request.
        let c = call("GET", &path, "dl=1").expect("valid");
        let op: &'static Operation = Box::leak(Box::new(Operation {
            download: None,
            ..c.op.clone()
        }));
        assert!(!Call { op, ..c }.wants_raw_file());
    }

    #[test]
    fn organization_is_filled_checked_and_exclusive_with_project() {
        let org = Uuid::from_u128(0x1111);
        let mut c = call("GET", "/billing/v2beta1/taxes", "").expect("valid");
        c.apply_organization(org).expect("filled");
        assert_eq!(c.get("organization_id"), Some(org.to_string().as_str()));

        let project = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
        let mut c = call(
            "GET",
            "/billing/v2beta1/consumptions",
            &format!("project_id={project}"),
        )
        .expect("valid");
        c.apply_organization(org).expect("ok");
        assert_eq!(c.get("organization_id"), None);

        let mut c = call(
            "GET",
            "/billing/v2beta1/invoices",
            &format!("organization_id={project}"),
        )
        .expect("valid");
        assert_eq!(
            c.apply_organization(org).map_err(|e| e.status().as_u16()),
            Err(403)
        );

        let both = format!("project_id={project}&organization_id={org}");
        assert!(call("GET", "/billing/v2beta1/consumptions", &both).is_err());
    }
}
