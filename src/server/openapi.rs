//! The OpenAPI 3.1 description of everything the gateway serves, generated from the Billing
//! operation table and the gateway's own route table so it cannot drift from what is served.

use serde_json::{Map, Value, json};

use super::routes::{ROUTES, Serve};
use crate::billing::{Kind, Method, OPERATIONS, Operation, Param};

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in OPERATIONS {
        let method = match op.method {
            Method::Get => "get",
            Method::Post => "post",
        };
        let entry = paths.entry(op.path).or_insert_with(|| json!({}));
        entry[method] = billing_operation(op);
    }
    for route in ROUTES {
        let method = route.method.as_str().to_ascii_lowercase();
        let authenticated = matches!(route.serve, Serve::Authenticated(_));
        let summary = route.summary;
        let path = route.path;
        let mut operation = json!({
            "summary": summary,
            "tags": ["gateway"],
            "responses": {"200": {"description": "OK"}},
        });
        if method == "delete" {
            operation["responses"] = json!({"204": {"description": "emptied"}});
        }
        if authenticated {
            operation["security"] = security();
            add_errors(&mut operation, &["401", "403"]);
        } else {
            operation["security"] = json!([]);
        }
        paths.entry(path).or_insert_with(|| json!({}))[method.as_str()] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "billing-gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The Scaleway Billing API v2beta1 at its own paths, behind the company's identity: \
                            the gateway holds the Scaleway key, checks the caller's policy, and fills in the organization.",
        },
        "security": security(),
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "xAuthToken": {
                    "type": "apiKey", "in": "header", "name": "X-Auth-Token",
                    "description": "A JWT or a gateway key (a UUID), as the Scaleway SDKs send their secret key",
                },
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string", "examples": ["invalid_arguments", "denied_authentication", "permissions_denied", "not_found", "too_many_requests"]},
                        "details": {"type": "array", "items": {"type": "object"}},
                        "method": {"type": "string", "enum": ["jwt", "api_key"]},
                        "reason": {"type": "string", "enum": ["invalid_argument", "expired", "not_found", "unknown_reason"]},
                    },
                },
                "File": {
                    "type": "object",
                    "required": ["name", "content_type", "content"],
                    "properties": {
                        "name": {"type": "string"},
                        "content_type": {"type": "string"},
                        "content": {"type": "string", "contentEncoding": "base64"},
                    },
                },
            },
        },
    })
}

fn security() -> Value {
    json!([{"bearer": []}, {"xAuthToken": []}])
}

fn billing_operation(op: &Operation) -> Value {
    let mut parameters: Vec<Value> = op.params.iter().map(parameter).collect();
    if op.path.contains("{invoice_id}") {
        parameters.insert(
            0,
            json!({"name": "invoice_id", "in": "path", "required": true,
                   "schema": {"type": "string", "format": "uuid", "examples": ["7b1e9d40-3c55-4d2e-8f61-0a9b8c7d6e5f"]}}),
        );
    }
    let ok = if let Some(download) = op.download {
        let flag = download.raw_flag;
        json!({
            "description": format!("without `{flag}`: the file as a JSON envelope; with `{flag}=1`: the raw bytes, streamed"),
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/File"}},
                download.content_type: {"schema": {"type": "string", "format": "binary"}},
            },
        })
    } else {
        json!({"description": "the Billing API's answer", "content": {"application/json": {"schema": {"type": "object"}}}})
    };
    let mut operation = json!({
        "operationId": op.name,
        "tags": ["billing"],
        "summary": format!("{} (permission {})", op.name, op.permission),
        "parameters": parameters,
        "responses": {"200": ok},
        "x-cached": op.cacheable,
    });
    add_errors(
        &mut operation,
        &["400", "401", "403", "404", "429", "502", "504"],
    );
    operation
}

fn add_errors(operation: &mut Value, statuses: &[&str]) {
    for status in statuses {
        operation["responses"][*status] = json!({
            "description": "Scaleway-shaped error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        });
    }
}

fn parameter(param: &Param) -> Value {
    let (schema, example) = match param.kind {
        Kind::Uuid => (
            json!({"type": "string", "format": "uuid"}),
            json!("11111111-2222-3333-4444-555555555555"),
        ),
        Kind::Enum(values) => (json!({"type": "string", "enum": values}), json!(values[0])),
        Kind::Page => (json!({"type": "integer", "minimum": 1}), json!(1)),
        Kind::PageSize(max) => (
            json!({"type": "integer", "minimum": 1, "maximum": max}),
            json!(10),
        ),
        Kind::Timestamp => (
            json!({"type": "string", "format": "date-time"}),
            json!("2026-01-01T00:00:00Z"),
        ),
        Kind::Period => (
            json!({"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$"}),
            json!("2026-01"),
        ),
        Kind::Bool => (json!({"type": "boolean"}), json!(true)),
        Kind::Flag => (json!({"type": "string", "enum": ["1"]}), json!("1")),
        Kind::Text => (
            json!({"type": "string", "maxLength": 256}),
            json!("Compute"),
        ),
    };
    let mut schema = schema;
    schema["examples"] = json!([example]);
    if param.list {
        schema = json!({"type": "array", "items": schema});
    }
    json!({
        "name": param.name,
        "in": "query",
        "required": param.required,
        "explode": param.list,
        "schema": schema,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// File endpoints, and only they, document the raw bytes, in the table's content type.
    #[test]
    fn file_responses_come_from_the_table() {
        let doc = document();
        for op in OPERATIONS {
            let method = match op.method {
                Method::Get => "get",
                Method::Post => "post",
            };
            let content = doc["paths"][op.path][method]["responses"]["200"]["content"]
                .as_object()
                .expect("content");
            let types: Vec<&str> = content.keys().map(String::as_str).collect();
            match op.download {
                Some(d) => assert_eq!(types, ["application/json", d.content_type], "{}", op.name),
                None => assert_eq!(types, ["application/json"], "{}", op.name),
            }
        }
        let export = &doc["paths"]["/billing/v2beta1/export-invoices"]["get"]["responses"]["200"];
        assert!(export["content"]["text/csv"].is_object());
        assert_eq!(
            export["description"],
            "without `dl`: the file as a JSON envelope; with `dl=1`: the raw bytes, streamed"
        );
    }
}
