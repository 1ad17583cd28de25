//! The shapes of the answers: the Billing API's objects and envelopes (reference §2, §4, §7),
//! the gateway's own answers (`whoami`, contract §12's `costs`) and the Scaleway-shaped error of
//! every status, as JSON Schema 2020-12 (what OpenAPI 3.1 uses). Billing objects stay open
//! (Scaleway adds fields, e.g. `consumer_id` in 2025), so a new field never breaks a client.

use serde_json::{Value, json};

/// Which component schema a Billing operation's JSON answer is, by operation name. A test holds
/// it to the operation table: every operation has exactly one.
pub(super) const ANSWERS: [(&str, &str); 9] = [
    ("consumptions", "ListConsumptionsResponse"),
    ("taxes", "ListTaxesResponse"),
    ("invoices", "ListInvoicesResponse"),
    ("export-invoices", "File"),
    ("get-invoice", "Invoice"),
    ("download-invoice", "File"),
    ("discounts", "ListDiscountsResponse"),
    ("redeem-coupon", "Discount"),
    ("charges", "ListChargesResponse"),
];

/// Every error status the gateway answers, with the `type` its body carries, the component
/// name of its answer and when it is given. 4xx types and shapes are the gateway's own
/// (`crate::error::Error::body`) or the upstream's relayed as they are.
pub(super) const ERRORS: [(u16, &str, &[&str], &str); 13] = [
    (
        400,
        "InvalidArguments",
        &["invalid_arguments", "invalid_request_error"],
        "a parameter failed validation (`details` names each), or the body could not be read; nothing was sent upstream",
    ),
    (
        401,
        "Unauthenticated",
        &["denied_authentication"],
        "no credential, or one that was refused",
    ),
    (
        403,
        "PermissionsDenied",
        &["permissions_denied"],
        "the caller's grants do not cover the request",
    ),
    (
        404,
        "NotFound",
        &["not_found"],
        "no such path, or (from the upstream) no such resource",
    ),
    (
        405,
        "MethodNotAllowed",
        &["method_not_allowed"],
        "the path exists, not with this method",
    ),
    (
        408,
        "RequestTimeout",
        &["request_timeout"],
        "the request body did not arrive in time",
    ),
    (
        413,
        "PayloadTooLarge",
        &["payload_too_large"],
        "a request body larger than any call needs",
    ),
    (
        414,
        "UriTooLong",
        &["uri_too_long"],
        "a request target (path and query) longer than any call needs",
    ),
    (
        429,
        "TooManyRequests",
        &["too_many_requests"],
        "the caller's rate, its share of the upstream budget, or the upstream's own limit: retry after `Retry-After` seconds",
    ),
    (
        431,
        "HeadersTooLarge",
        &["request_header_fields_too_large"],
        "request headers too large or too many",
    ),
    (
        502,
        "BadGateway",
        &["bad_gateway"],
        "the Billing API could not be reached, or answered what the gateway will not relay",
    ),
    (
        503,
        "ServiceUnavailable",
        &["service_unavailable"],
        "no signing keys, shutting down, or full: retry after `Retry-After` seconds",
    ),
    (
        504,
        "GatewayTimeout",
        &["gateway_timeout"],
        "the Billing API did not answer in time",
    ),
];

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn nullable(schema: Value) -> Value {
    json!({"anyOf": [schema, {"type": "null"}]})
}

fn uuid() -> Value {
    json!({"type": "string", "format": "uuid"})
}

fn timestamp() -> Value {
    json!({"type": "string", "format": "date-time"})
}

fn period() -> Value {
    json!({"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$", "examples": ["2026-07"]})
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "required": required, "properties": properties})
}

fn list(items: &str, name: &str) -> Value {
    object(
        &[items, "total_count"],
        json!({
            items: {"type": "array", "items": r(name)},
            "total_count": {"type": "integer", "minimum": 0, "description": "matching items on every page, not this page's"},
        }),
    )
}

/// The schemas of `components.schemas`.
pub(super) fn components() -> Value {
    let mut consumptions = list("consumptions", "Consumption");
    consumptions["properties"]["total_discount_untaxed_value"] = json!({"type": "number", "description": "sum of discounts; only filled when no category or project filter is given"});
    consumptions["properties"]["updated_at"] = nullable(timestamp());
    let mut taxes = list("taxes", "Tax");
    taxes["properties"]["updated_at"] = nullable(timestamp());
    let mut errors = serde_json::Map::new();
    for (_, name, types, _) in ERRORS {
        errors.insert(name.into(), error(types));
    }
    let mut schemas = json!({
        "Money": object(&["currency_code", "units", "nanos"], json!({
            "currency_code": {"type": "string", "description": "ISO 4217", "examples": ["EUR"]},
            "units": {"type": "integer", "description": "whole units, signed"},
            "nanos": {"type": "integer", "minimum": -999_999_999, "maximum": 999_999_999, "description": "billionths of a unit, with the sign of `units`"},
        })),
        "Consumption": object(
            &["value", "product_name", "resource_name", "sku", "project_id", "category_name", "unit", "billed_quantity"],
            json!({
                "value": r("Money"),
                "product_name": {"type": "string"},
                "resource_name": {"type": "string"},
                "sku": {"type": "string", "examples": ["/compute/pro2_xxs/run_fr-par-2"]},
                "project_id": uuid(),
                "category_name": {"type": "string", "examples": ["Compute"]},
                "unit": {"type": "string", "examples": ["minute", "gigabyte_hour"]},
                "billed_quantity": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$", "description": "a decimal, as a string"},
                "consumer_id": uuid(),
                "project_name": {"type": "string"},
                "organization_name": {"type": "string"},
            }),
        ),
        "ListConsumptionsResponse": consumptions,
        "Tax": object(&["description", "currency"], json!({
            "description": {"type": "string", "examples": ["VAT"]},
            "currency": {"type": "string"},
            "rate": nullable(json!({"type": "number", "description": "0.2 is 20 %"})),
            "total_tax_value": nullable(json!({"type": "number"})),
        })),
        "ListTaxesResponse": taxes,
        "Invoice": object(
            &["id", "organization_id", "start_date", "stop_date", "billing_period", "issued_date", "due_date",
              "total_untaxed", "total_taxed", "total_tax", "total_discount", "total_undiscount", "type", "state", "number"],
            json!({
                "id": uuid(),
                "organization_id": uuid(),
                "organization_name": {"type": "string"},
                "start_date": timestamp(),
                "stop_date": timestamp(),
                "billing_period": {"type": "string", "format": "date-time", "description": "the period's first instant (a timestamp, not YYYY-MM)"},
                "issued_date": nullable(timestamp()),
                "due_date": nullable(timestamp()),
                "total_untaxed": r("Money"),
                "total_taxed": r("Money"),
                "total_tax": r("Money"),
                "total_discount": r("Money"),
                "total_undiscount": r("Money"),
                "type": {"type": "string", "enum": ["unknown_type", "periodic", "purchase", "credit_note"]},
                "state": {"type": "string", "examples": ["draft", "stopped", "issued"], "description": "free-form upstream"},
                "number": {"type": "integer", "minimum": 0, "description": "0 until issued"},
                "seller_name": {"type": "string"},
            }),
        ),
        "ListInvoicesResponse": list("invoices", "Invoice"),
        "Discount": object(
            &["id", "organization_id", "description", "value", "value_used", "value_remaining", "mode"],
            json!({
                "id": uuid(),
                "creation_date": nullable(timestamp()),
                "organization_id": uuid(),
                "description": {"type": "string"},
                "value": {"type": "number", "description": "an amount or a percentage, as `mode` says"},
                "value_used": {"type": "number"},
                "value_remaining": {"type": "number"},
                "mode": {"type": "string", "enum": ["unknown_discount_mode", "discount_mode_rate", "discount_mode_value", "discount_mode_splittable"]},
                "start_date": nullable(timestamp()),
                "stop_date": nullable(timestamp()),
                "coupon": nullable(json!({"type": "object", "properties": {"description": nullable(json!({"type": "string"}))}})),
                "filters": {"type": "array", "items": object(&["type", "value"], json!({
                    "type": {"type": "string", "enum": ["unknown_type", "category_name", "product_name", "product_range", "resource_name", "region", "zone"]},
                    "value": {"type": "string"},
                    "exclude": {"type": "boolean"},
                }))},
            }),
        ),
        "ListDiscountsResponse": list("discounts", "Discount"),
        "Charge": object(
            &["organization_id", "project_id", "sku", "price", "start_date", "end_date"],
            json!({
                "organization_id": uuid(),
                "organization_name": {"type": "string"},
                "project_id": uuid(),
                "project_name": {"type": "string"},
                "sku": {"type": "string"},
                "invoice_id": uuid(),
                "resource_id": {"type": "string"},
                "resource_name": nullable(json!({"type": "string"})),
                "price": r("Money"),
                "start_date": timestamp(),
                "end_date": {"type": "string", "format": "date-time", "description": "inclusive"},
                "updated_at": timestamp(),
            }),
        ),
        "ListChargesResponse": object(&["charges"], json!({
            "charges": {"type": "array", "items": r("Charge")},
            "next_page_token": nullable(json!({"type": "string", "description": "the next call's `page_token`; null on the last page"})),
        })),
        "File": object(&["name", "content_type", "content"], json!({
            "name": {"type": "string"},
            "content_type": {"type": "string", "examples": ["application/pdf", "text/csv"]},
            "content": {"type": "string", "contentEncoding": "base64", "pattern": "^[A-Za-z0-9+/]*={0,2}$"},
        })),
        "Grant": object(&["roles", "permissions", "projects"], json!({
            "roles": {"type": "array", "items": {"type": "string"}},
            "permissions": {"type": "array", "items": r("Permission")},
            "projects": nullable(json!({"type": "array", "items": uuid(), "description": "the projects a scoped grant covers; null: organization-wide"})),
        })),
        "WhoAmI": object(&["subject", "organization_id", "grants", "permissions", "share", "class"], json!({
            "subject": {"type": "string", "description": "the token's `sub`, or `key:<name>` for a gateway key"},
            "organization_id": uuid(),
            "grants": {"type": "array", "items": r("Grant")},
            "permissions": {"type": "array", "items": r("Permission")},
            "share": {"type": "integer", "minimum": 1, "description": "weight in the fair queue for upstream turns"},
            "class": {"type": "string", "description": "the class metrics count its upstream calls under"},
        })),
        "Costs": object(&["billing_period", "updated_at", "total", "projects"], json!({
            "billing_period": period(),
            "updated_at": nullable(timestamp()),
            "total": r("Money"),
            "forecast": {"$ref": "#/components/schemas/Money", "description": "month-end projection; absent for closed periods"},
            "projects": {"type": "array", "items": r("ProjectCost"), "description": "largest total first"},
        })),
        "ProjectCost": object(&["project_id", "total", "categories"], json!({
            "project_id": uuid(),
            "project_name": {"type": "string"},
            "total": r("Money"),
            "forecast": r("Money"),
            "budget": object(&["monthly", "used_ratio"], json!({
                "monthly": r("Money"),
                "used_ratio": {"type": "number"},
                "forecast_ratio": {"type": "number"},
            })),
            "categories": {"type": "array", "description": "largest total first", "items": object(&["category_name", "total"], json!({
                "category_name": {"type": "string"},
                "total": r("Money"),
            }))},
        })),
        "ErrorDetail": {"anyOf": [
            object(&["argument_name", "reason"], json!({
                "argument_name": {"type": "string"},
                "reason": {"type": "string", "enum": ["required", "format", "constraint", "unknown"]},
                "help_message": {"type": "string"},
            })),
            object(&["action", "resource"], json!({
                "action": {"type": "string", "examples": ["read", "write"]},
                "resource": {"type": "string"},
            })),
        ]},
        "Error": object(&["message", "type"], json!({
            "message": {"type": "string"},
            "type": {"type": "string"},
            "details": {"type": "array", "items": r("ErrorDetail")},
            "help_message": {"type": "string"},
            "method": {"type": "string", "enum": ["jwt", "api_key", "unknown_method"]},
            "reason": {"type": "string", "enum": ["invalid_argument", "expired", "not_found", "unknown_reason"]},
            "resource": {"type": "string"},
            "resource_id": {"type": "string"},
            "reset_seconds": {"type": "integer", "minimum": 0},
        })),
    });
    let permissions: Vec<&str> = crate::billing::Permission::ALL
        .iter()
        .map(|p| p.name())
        .collect();
    schemas["Permission"] = json!({"type": "string", "enum": permissions});
    if let Some(map) = schemas.as_object_mut() {
        map.extend(errors);
    }
    schemas
}

/// An error of one status: the general shape with its `type`s, and what that status requires.
fn error(types: &[&str]) -> Value {
    let extra: &[&str] = match types[0] {
        "denied_authentication" => &["method", "reason"],
        "permissions_denied" => &["details"],
        "too_many_requests" => &["reset_seconds"],
        _ => &[],
    };
    let required: Vec<&str> = ["message", "type"].iter().chain(extra).copied().collect();
    json!({"allOf": [r("Error"), object(&required, json!({"type": {"type": "string", "enum": types}}))]})
}
