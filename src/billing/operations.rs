//! The Billing API surface as data: every operation the gateway serves, with its method, path
//! template, permission, parameters and their validation, and what policy, cache, audit and the
//! OpenAPI document need to know of it: its project scoping ([`Scope`]), the billing-period
//! parameter that drives cache freshness, what its audit events name ([`Audit`]) and whether it
//! serves a file ([`Download`]).
//!
//! Nothing else in the crate knows a Billing path or parameter name: the rest reads these
//! fields. A request becomes a [`Call`] here, or an error; the upstream URL and the cache key
//! are both built from a `Call` alone, so nothing the caller sent reaches the upstream unless it
//! was validated and re-encoded here first.
//!
//! [`Call`]: super::Call

use std::fmt;

/// A capability a role can hold; each operation needs exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Consumption, taxes and FinOps charges.
    ConsumptionRead,
    /// Invoice lists and single invoices.
    InvoicesRead,
    /// Invoice PDFs and the invoice export.
    InvoicesDownload,
    /// Discounts and vouchers.
    DiscountsRead,
    /// Redeeming a coupon: the one write of the API.
    CouponsRedeem,
    /// Emptying the gateway's cache.
    CachePurge,
}

impl Permission {
    /// Every permission, in the order policy files and `whoami` list them.
    pub const ALL: [Permission; 6] = [
        Permission::ConsumptionRead,
        Permission::InvoicesRead,
        Permission::InvoicesDownload,
        Permission::DiscountsRead,
        Permission::CouponsRedeem,
        Permission::CachePurge,
    ];

    /// The name used in policy files.
    pub fn name(self) -> &'static str {
        match self {
            Permission::ConsumptionRead => "consumption:read",
            Permission::InvoicesRead => "invoices:read",
            Permission::InvoicesDownload => "invoices:download",
            Permission::DiscountsRead => "discounts:read",
            Permission::CouponsRedeem => "coupons:redeem",
            Permission::CachePurge => "cache:purge",
        }
    }

    /// Parses a policy-file name.
    pub fn parse(name: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.name() == name)
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of permissions, cheap to copy and to test.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    /// Adds one permission.
    pub fn insert(&mut self, p: Permission) {
        self.0 |= p.bit();
    }
    /// Whether the set holds `p`.
    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }
    /// The union of two sets.
    pub fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }
    /// The permissions held, in [`Permission::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |p| self.contains(*p))
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        let mut set = Permissions::default();
        iter.into_iter().for_each(|p| set.insert(p));
        set
    }
}

/// The HTTP methods the Billing v2beta1 API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Every read.
    Get,
    /// `redeem-coupon` only.
    Post,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// How a parameter's value is checked and normalised.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A hyphenated UUID, forwarded lowercase.
    Uuid,
    /// One of a fixed list.
    Enum(&'static [&'static str]),
    /// A 1-based page number.
    Page,
    /// A page size from 1 to the bound.
    PageSize(u32),
    /// A point in time in any form the SDKs send; forwarded as RFC 3339 UTC.
    Timestamp,
    /// A billing period, `YYYY-MM`.
    Period,
    /// `true`/`false` in any case the SDKs send; forwarded lowercase.
    Bool,
    /// `dl`: switches file endpoints to raw bytes; forwarded as `1`.
    Flag,
    /// Free text (names, codes, tokens): printable, no `;`, at most 256 characters.
    Text,
}

/// One query parameter an operation takes.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// Its snake_case name (camelCase spellings are accepted and normalised).
    pub name: &'static str,
    /// How its value is validated.
    pub kind: Kind,
    /// Whether it may repeat (`skus=a&skus=b`).
    pub list: bool,
    /// Whether the operation refuses to run without it.
    pub required: bool,
}

const fn p(name: &'static str, kind: Kind) -> Param {
    Param {
        name,
        kind,
        list: false,
        required: false,
    }
}

const fn list(name: &'static str, kind: Kind) -> Param {
    Param {
        list: true,
        ..p(name, kind)
    }
}

const fn required(name: &'static str, kind: Kind) -> Param {
    Param {
        required: true,
        ..p(name, kind)
    }
}

/// How the gateway's organization applies to an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrgRule {
    /// The operation takes no `organization_id`.
    None,
    /// Filled in when absent; another organization is refused.
    Fill,
    /// As `Fill`, except that the project of a [`Scope::One`] replaces it (the two are
    /// exclusive).
    FillUnlessProject,
}

/// Which projects a call is about: what a grant limited to projects can cover (contract §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Not about projects: only an organization-wide grant covers it.
    None,
    /// About at most one project, named by this (UUID) parameter. A scoped grant covers a call
    /// whose project is in its list; with none asked and exactly one project in the list, the
    /// gateway fills it in. A call naming `organization_id` instead is about the whole
    /// organization, which no scoped grant covers.
    One(&'static str),
    /// About any number of projects, named by this (repeatable UUID) parameter. A scoped grant
    /// covers a call whose projects are all in its list; with none asked, the gateway asks for
    /// the whole list.
    Many(&'static str),
}

impl Scope {
    /// The parameter naming the project(s), when the operation takes one.
    pub fn param(self) -> Option<&'static str> {
        match self {
            Scope::None => None,
            Scope::One(name) | Scope::Many(name) => Some(name),
        }
    }
}

/// What the audit event of an operation's call names, beyond the subject, the operation and
/// the invoice of the path (contract §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    /// Calls are not audit events.
    None,
    /// Every call is an audit event.
    Event,
    /// Every call is an audit event naming the first `chars` characters of `param`: enough to
    /// tell calls apart, not enough to make one again (a coupon code).
    Prefix {
        /// The parameter whose value is cut.
        param: &'static str,
        /// How many characters of it the event keeps.
        chars: usize,
    },
}

/// A file endpoint: the JSON envelope `{name, content_type, content}` by default, the raw bytes
/// when the caller sets `raw_flag` (contract §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Download {
    /// The [`Kind::Flag`] parameter asking for the raw bytes.
    pub raw_flag: &'static str,
    /// The content type of the raw bytes.
    pub content_type: &'static str,
}

const RAW_PDF: Download = Download {
    raw_flag: "dl",
    content_type: "application/pdf",
};
const RAW_CSV: Download = Download {
    raw_flag: "dl",
    content_type: "text/csv",
};

/// One Billing API operation: everything the gateway needs to know to serve it.
#[derive(Debug, Clone)]
pub struct Operation {
    /// Short name for logs, metrics, policy messages and cache keys.
    pub name: &'static str,
    /// The method the upstream expects.
    pub method: Method,
    /// Path template; `{invoice_id}` marks the one path parameter (a UUID).
    pub path: &'static str,
    /// What a grant must hold to call it.
    pub permission: Permission,
    /// `(action, resource)` for a 403's `details`.
    pub denied_as: (&'static str, &'static str),
    /// The query parameters it takes; anything else is refused.
    pub params: &'static [Param],
    /// How `organization_id` is handled.
    pub org: OrgRule,
    /// Which projects a call is about, for grants limited to projects.
    pub scope: Scope,
    /// Whether 200 answers may be served from the cache.
    pub cacheable: bool,
    /// The [`Kind::Period`] parameter naming the billing period asked about: a closed period's
    /// answers stay fresh longer in the cache. `None`: every answer is about the current one.
    pub period: Option<&'static str>,
    /// What calls write to the audit log (files, coupons).
    pub audit: Audit,
    /// Whether it serves a file, and how the raw bytes are asked for.
    pub download: Option<Download>,
}

const ORDER_CONSUMPTION: Kind = Kind::Enum(&[
    "updated_at_desc",
    "updated_at_asc",
    "category_name_desc",
    "category_name_asc",
]);
const ORDER_INVOICES: Kind = Kind::Enum(&[
    "invoice_number_desc",
    "invoice_number_asc",
    "start_date_desc",
    "start_date_asc",
    "issued_date_desc",
    "issued_date_asc",
    "due_date_desc",
    "due_date_asc",
    "total_untaxed_desc",
    "total_untaxed_asc",
    "total_taxed_desc",
    "total_taxed_asc",
    "invoice_type_desc",
    "invoice_type_asc",
]);
const INVOICE_TYPE: Kind = Kind::Enum(&["unknown_type", "periodic", "purchase", "credit_note"]);
const ORG: Param = p("organization_id", Kind::Uuid);
const PAGE: Param = p("page", Kind::Page);
const PAGE_SIZE: Param = p("page_size", Kind::PageSize(100));

const INVOICE_FILTERS: [Param; 7] = [
    ORG,
    p("billing_period_start_after", Kind::Timestamp),
    p("billing_period_start_before", Kind::Timestamp),
    p("invoice_type", INVOICE_TYPE),
    PAGE,
    PAGE_SIZE,
    p("order_by", ORDER_INVOICES),
];

/// The whole v2beta1 surface (reference §2.0).
pub static OPERATIONS: &[Operation] = &[
    Operation {
        name: "consumptions",
        method: Method::Get,
        path: "/billing/v2beta1/consumptions",
        permission: Permission::ConsumptionRead,
        denied_as: ("read", "consumption"),
        params: &[
            p("order_by", ORDER_CONSUMPTION),
            PAGE,
            PAGE_SIZE,
            ORG,
            p("project_id", Kind::Uuid),
            p("category_name", Kind::Text),
            p("billing_period", Kind::Period),
        ],
        org: OrgRule::FillUnlessProject,
        scope: Scope::One("project_id"),
        cacheable: true,
        period: Some("billing_period"),
        audit: Audit::None,
        download: None,
    },
    Operation {
        name: "taxes",
        method: Method::Get,
        path: "/billing/v2beta1/taxes",
        permission: Permission::ConsumptionRead,
        denied_as: ("read", "consumption"),
        params: &[
            p("order_by", ORDER_CONSUMPTION),
            PAGE,
            PAGE_SIZE,
            ORG,
            p("billing_period", Kind::Period),
        ],
        org: OrgRule::Fill,
        scope: Scope::None,
        cacheable: true,
        period: Some("billing_period"),
        audit: Audit::None,
        download: None,
    },
    Operation {
        name: "invoices",
        method: Method::Get,
        path: "/billing/v2beta1/invoices",
        permission: Permission::InvoicesRead,
        denied_as: ("read", "invoices"),
        params: &INVOICE_FILTERS,
        org: OrgRule::Fill,
        scope: Scope::None,
        cacheable: false,
        period: None,
        audit: Audit::None,
        download: None,
    },
    Operation {
        name: "export-invoices",
        method: Method::Get,
        path: "/billing/v2beta1/export-invoices",
        permission: Permission::InvoicesDownload,
        denied_as: ("read", "invoices"),
        params: &[
            INVOICE_FILTERS[0],
            INVOICE_FILTERS[1],
            INVOICE_FILTERS[2],
            INVOICE_FILTERS[3],
            INVOICE_FILTERS[4],
            INVOICE_FILTERS[5],
            INVOICE_FILTERS[6],
            p("file_type", Kind::Enum(&["csv"])),
            p("dl", Kind::Flag),
        ],
        org: OrgRule::Fill,
        scope: Scope::None,
        cacheable: false,
        period: None,
        audit: Audit::Event,
        download: Some(RAW_CSV),
    },
    Operation {
        name: "get-invoice",
        method: Method::Get,
        path: "/billing/v2beta1/invoices/{invoice_id}",
        permission: Permission::InvoicesRead,
        denied_as: ("read", "invoices"),
        params: &[],
        org: OrgRule::None,
        scope: Scope::None,
        cacheable: false,
        period: None,
        audit: Audit::None,
        download: None,
    },
    Operation {
        name: "download-invoice",
        method: Method::Get,
        path: "/billing/v2beta1/invoices/{invoice_id}/download",
        permission: Permission::InvoicesDownload,
        denied_as: ("read", "invoices"),
        params: &[p("file_type", Kind::Enum(&["pdf"])), p("dl", Kind::Flag)],
        org: OrgRule::None,
        scope: Scope::None,
        cacheable: false,
        period: None,
        audit: Audit::Event,
        download: Some(RAW_PDF),
    },
    Operation {
        name: "discounts",
        method: Method::Get,
        path: "/billing/v2beta1/discounts",
        permission: Permission::DiscountsRead,
        denied_as: ("read", "discounts"),
        params: &[
            p(
                "order_by",
                Kind::Enum(&[
                    "creation_date_desc",
                    "creation_date_asc",
                    "start_date_desc",
                    "start_date_asc",
                    "stop_date_desc",
                    "stop_date_asc",
                ]),
            ),
            PAGE,
            PAGE_SIZE,
            ORG,
        ],
        org: OrgRule::Fill,
        scope: Scope::None,
        cacheable: false,
        period: None,
        audit: Audit::None,
        download: None,
    },
    Operation {
        name: "redeem-coupon",
        method: Method::Post,
        path: "/billing/v2beta1/redeem-coupon",
        permission: Permission::CouponsRedeem,
        denied_as: ("write", "coupons"),
        params: &[required("code", Kind::Text), ORG],
        org: OrgRule::Fill,
        scope: Scope::None,
        cacheable: false,
        period: None,
        audit: Audit::Prefix {
            param: "code",
            chars: 4,
        },
        download: None,
    },
    Operation {
        name: "charges",
        method: Method::Get,
        path: "/billing/v2beta1/charges",
        permission: Permission::ConsumptionRead,
        denied_as: ("read", "consumption"),
        params: &[
            p(
                "order_by",
                Kind::Enum(&["start_date_asc", "start_date_desc"]),
            ),
            p("page_token", Kind::Text),
            p("page_size", Kind::PageSize(1000)),
            p("start_date_after", Kind::Timestamp),
            p("end_date_before", Kind::Timestamp),
            list("invoice_ids", Kind::Uuid),
            ORG,
            list("project_ids", Kind::Uuid),
            list("resource_ids", Kind::Text),
            list("resource_names", Kind::Text),
            list("skus", Kind::Text),
            p("clamp_to_time_range", Kind::Bool),
        ],
        org: OrgRule::Fill,
        scope: Scope::Many("project_ids"),
        cacheable: false,
        period: None,
        audit: Audit::None,
        download: None,
    },
];

/// Looks an operation up by its short name (unit tests).
#[cfg(test)]
pub(crate) fn by_name(name: &str) -> Option<&'static Operation> {
    OPERATIONS.iter().find(|op| op.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(op: &Operation, name: &str) -> Param {
        *op.params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{} takes no `{name}`", op.name))
    }

    /// Every parameter a field names is one the operation takes, of the kind the field needs.
    #[test]
    fn the_fields_name_parameters_the_operation_takes() {
        for op in OPERATIONS {
            match op.scope {
                Scope::None => {}
                Scope::One(name) => {
                    let p = param(op, name);
                    assert!(matches!(p.kind, Kind::Uuid) && !p.list, "{}", op.name);
                }
                Scope::Many(name) => {
                    let p = param(op, name);
                    assert!(matches!(p.kind, Kind::Uuid) && p.list, "{}", op.name);
                }
            }
            if let Some(name) = op.period {
                assert!(matches!(param(op, name).kind, Kind::Period), "{}", op.name);
                assert!(
                    op.cacheable,
                    "{}: a period only matters to the cache",
                    op.name
                );
            }
            if let Audit::Prefix { param: name, chars } = op.audit {
                assert!(matches!(param(op, name).kind, Kind::Text), "{}", op.name);
                assert!(chars > 0, "{}", op.name);
            }
            if let Some(download) = op.download {
                assert!(
                    matches!(param(op, download.raw_flag).kind, Kind::Flag),
                    "{}",
                    op.name
                );
                assert_ne!(op.audit, Audit::None, "{}: files are audited", op.name);
            }
            if op.org == OrgRule::FillUnlessProject {
                assert!(
                    matches!(op.scope, Scope::One(_)),
                    "{}: only a single project replaces the organization",
                    op.name
                );
            }
        }
    }

    /// The table says what the contract says (§5 scope, §7 files and cache, §9 audit).
    #[test]
    fn the_table_holds_the_contract() {
        let ops = |f: &dyn Fn(&Operation) -> bool| {
            OPERATIONS
                .iter()
                .filter(|op| f(op))
                .map(|op| op.name)
                .collect::<Vec<_>>()
        };
        let scoped: Vec<_> = OPERATIONS
            .iter()
            .filter(|op| op.scope != Scope::None)
            .map(|op| (op.name, op.scope))
            .collect();
        assert_eq!(
            scoped,
            [
                ("consumptions", Scope::One("project_id")),
                ("charges", Scope::Many("project_ids")),
            ]
        );
        assert_eq!(ops(&|op| op.cacheable), ["consumptions", "taxes"]);
        assert_eq!(ops(&|op| op.period.is_some()), ["consumptions", "taxes"]);
        assert_eq!(
            ops(&|op| op.audit != Audit::None),
            ["export-invoices", "download-invoice", "redeem-coupon"]
        );
        assert_eq!(
            by_name("redeem-coupon").map(|op| op.audit),
            Some(Audit::Prefix {
                param: "code",
                chars: 4
            })
        );
        let files: Vec<_> = OPERATIONS
            .iter()
            .filter_map(|op| op.download.map(|d| (op.name, d.raw_flag, d.content_type)))
            .collect();
        assert_eq!(
            files,
            [
                ("export-invoices", "dl", "text/csv"),
                ("download-invoice", "dl", "application/pdf"),
            ]
        );
    }
}
