//! The Billing API surface as data: every operation the gateway serves, with its method, path
//! template, permission, parameters and their validation.
//!
//! Nothing else in the crate knows a Billing path or parameter name. A request becomes a
//! [`Call`] here, or an error; the upstream URL and the cache key are both built from a `Call`
//! alone, so nothing the caller sent reaches the upstream unless it was validated and
//! re-encoded here first.

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
    /// As `Fill`, except that a `project_id` replaces it (the two are exclusive).
    FillUnlessProject,
}

/// One Billing API operation: everything the gateway needs to know to serve it.
#[derive(Debug)]
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
    /// Whether 200 answers may be served from the cache.
    pub cacheable: bool,
    /// Whether calls are written to the audit log (files, coupons).
    pub audited: bool,
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
        cacheable: true,
        audited: false,
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
        cacheable: true,
        audited: false,
    },
    Operation {
        name: "invoices",
        method: Method::Get,
        path: "/billing/v2beta1/invoices",
        permission: Permission::InvoicesRead,
        denied_as: ("read", "invoices"),
        params: &INVOICE_FILTERS,
        org: OrgRule::Fill,
        cacheable: false,
        audited: false,
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
        cacheable: false,
        audited: true,
    },
    Operation {
        name: "get-invoice",
        method: Method::Get,
        path: "/billing/v2beta1/invoices/{invoice_id}",
        permission: Permission::InvoicesRead,
        denied_as: ("read", "invoices"),
        params: &[],
        org: OrgRule::None,
        cacheable: false,
        audited: false,
    },
    Operation {
        name: "download-invoice",
        method: Method::Get,
        path: "/billing/v2beta1/invoices/{invoice_id}/download",
        permission: Permission::InvoicesDownload,
        denied_as: ("read", "invoices"),
        params: &[p("file_type", Kind::Enum(&["pdf"])), p("dl", Kind::Flag)],
        org: OrgRule::None,
        cacheable: false,
        audited: true,
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
        cacheable: false,
        audited: false,
    },
    Operation {
        name: "redeem-coupon",
        method: Method::Post,
        path: "/billing/v2beta1/redeem-coupon",
        permission: Permission::CouponsRedeem,
        denied_as: ("write", "coupons"),
        params: &[required("code", Kind::Text), ORG],
        org: OrgRule::Fill,
        cacheable: false,
        audited: true,
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
        cacheable: false,
        audited: false,
    },
];

/// Looks an operation up by its short name (policy tests, benches).
pub fn by_name(name: &str) -> Option<&'static Operation> {
    OPERATIONS.iter().find(|op| op.name == name)
}
