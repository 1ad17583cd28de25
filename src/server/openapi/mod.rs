//! The OpenAPI 3.1 description of everything the gateway serves, generated from the Billing
//! operation table and the gateway's own route table so it cannot drift from what is served:
//! paths, methods, parameters and their constraints come from [`OPERATIONS`] and the routes;
//! the shapes of the answers, errors included, from `schemas.rs`.

mod schemas;

use serde_json::{Map, Value, json};

use super::ServerLimits;
use super::routes::{ROUTES, Route, Serve};
use crate::billing::{Kind, Method, OPERATIONS, Operation, Param};

/// The errors any authenticated request can meet before it is served: its credential, its
/// grants, its head and body, its rate, the gateway's capacity.
const ANY_REQUEST: [u16; 9] = [401, 403, 405, 408, 413, 414, 429, 431, 503];

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
        let (responses, errors) = route_answer(route);
        let authenticated = matches!(route.serve, Serve::Authenticated(_));
        let mut operation = json!({
            "summary": route.summary,
            "tags": ["gateway"],
            "responses": responses,
            "security": if authenticated { security() } else { json!([]) },
        });
        if route.path == "/gateway/v1/costs" {
            operation["parameters"] = json!([{"name": "billing_period", "in": "query", "required": false,
                "description": "YYYY-MM; default: the current period",
                "schema": {"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$"}}]);
        }
        if authenticated {
            add_errors(&mut operation, &ANY_REQUEST);
        }
        add_errors(&mut operation, errors);
        paths.entry(route.path).or_insert_with(|| json!({}))[method.as_str()] = operation;
    }
    let mut responses = Map::new();
    for (status, name, _, description) in schemas::ERRORS {
        let mut response = json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}},
        });
        if matches!(status, 429 | 503) {
            response["headers"] = json!({"Retry-After": {"description": "seconds", "schema": {"type": "integer", "minimum": 1}}});
        }
        if status == 401 {
            response["headers"] = json!({"WWW-Authenticate": {"schema": {"type": "string"}}});
        }
        responses.insert(name.to_owned(), response);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "billing-gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The Scaleway Billing API v2beta1 at its own paths, behind the company's identity: \
                            the gateway holds the Scaleway key, checks the caller's policy, and fills in the organization. \
                            A query parameter given empty (`name=`, as the Go SDK sends unset strings) counts as not given.",
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
            "schemas": schemas::components(),
            "responses": responses,
        },
    })
}

/// A gateway route's answers by status, and the errors it meets beyond any authenticated
/// request's. Routes are known by path: a test holds every route to having its answer here.
fn route_answer(route: &Route) -> (Value, &'static [u16]) {
    let json_of = |schema: &str| json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}});
    let status = json!({"application/json": {"schema": {"type": "object", "required": ["status"],
                        "properties": {"status": {"type": "string"}}}}});
    let text = |content_type: &str| json!({content_type: {"schema": {"type": "string"}}});
    match route.path {
        "/healthz" => (
            json!({"200": {"description": "serving", "content": status}}),
            &[],
        ),
        "/readyz" => (
            json!({"200": {"description": "ready", "content": status}}),
            &[503],
        ),
        "/metrics" => (
            json!({"200": {"description": "the gateway's metrics", "content": text("application/openmetrics-text")}}),
            &[],
        ),
        "/gateway/v1/openapi.json" => (
            json!({"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}),
            &[],
        ),
        "/gateway/v1/whoami" => (
            json!({"200": {"description": "the caller as the gateway sees it", "content": json_of("WhoAmI")}}),
            &[],
        ),
        "/gateway/v1/cache" => (
            json!({"204": {"description": "emptied (every replica's, with Redis)"}}),
            &[],
        ),
        "/gateway/v1/costs" => (
            json!({"200": {"description": "the caller's costs by project and category, scoped by its grants", "content": json_of("Costs")}}),
            &[400, 502, 504],
        ),
        "/gateway/v1/costs/metrics" => (
            json!({"200": {"description": "the caller's costs for the current period, for Prometheus", "content": text("text/plain")}}),
            &[502, 504],
        ),
        _ => (json!({"200": {"description": "OK"}}), &[]),
    }
}

fn security() -> Value {
    json!([{"bearer": []}, {"xAuthToken": []}])
}

fn billing_operation(op: &Operation) -> Value {
    let mut parameters: Vec<Value> = op.params.iter().map(|p| parameter(op, p)).collect();
    if op.path.contains("{invoice_id}") {
        parameters.insert(
            0,
            json!({"name": "invoice_id", "in": "path", "required": true,
                   "schema": {"type": "string", "format": "uuid", "examples": ["7b1e9d40-3c55-4d2e-8f61-0a9b8c7d6e5f"]}}),
        );
    }
    let answer = schemas::ANSWERS
        .iter()
        .find(|(name, _)| *name == op.name)
        .map_or("Error", |(_, schema)| schema);
    let json_answer = json!({"schema": {"$ref": format!("#/components/schemas/{answer}")}});
    let ok = if let Some(download) = op.download {
        let flag = download.raw_flag;
        json!({
            "description": format!("without `{flag}`: the file as a JSON envelope; with `{flag}=1`: the raw bytes, streamed"),
            "content": {
                "application/json": json_answer,
                download.content_type: {"schema": {"type": "string", "format": "binary"}},
            },
        })
    } else {
        json!({"description": "the Billing API's answer", "content": {"application/json": json_answer}})
    };
    let mut operation = json!({
        "operationId": op.name,
        "tags": ["billing"],
        "summary": format!("{} (permission {})", op.name, op.permission),
        "parameters": parameters,
        "responses": {"200": ok},
        "x-cached": op.cacheable,
    });
    add_errors(&mut operation, &[400, 404, 502, 504]);
    add_errors(&mut operation, &ANY_REQUEST);
    operation
}

/// Each status's answer, from `components.responses`.
fn add_errors(operation: &mut Value, statuses: &[u16]) {
    for status in statuses {
        if let Some((_, name, _, _)) = schemas::ERRORS.iter().find(|(s, ..)| s == status) {
            operation["responses"][status.to_string()] =
                json!({"$ref": format!("#/components/responses/{name}")});
        }
    }
}

/// A query parameter's schema, from its [`Kind`] as `query.rs` enforces it: what is refused
/// there is outside the schema here.
fn parameter(op: &Operation, param: &Param) -> Value {
    let (mut schema, example) = match param.kind {
        Kind::Uuid => (
            json!({"type": "string", "format": "uuid"}),
            json!("11111111-2222-3333-4444-555555555555"),
        ),
        Kind::Enum(values) => (json!({"type": "string", "enum": values}), json!(values[0])),
        Kind::Page => (
            json!({"type": "integer", "minimum": 1, "maximum": i32::MAX}),
            json!(1),
        ),
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
            json!({"type": "string", "maxLength": 256, "pattern": r"^[^;\u0000-\u001F\u007F-\u009F]*$",
                   "description": "printable text without `;`"}),
            json!("Compute"),
        ),
    };
    // An empty value is the same as none (the Go SDK sends unset strings as `name=`): a
    // required parameter given empty is missing.
    if param.required && schema["type"] == "string" {
        schema["minLength"] = json!(1);
    }
    schema["examples"] = json!([example]);
    if param.list {
        schema = json!({"type": "array", "items": schema, "maxItems": max_items(op, param)});
    }
    let mut out = json!({
        "name": param.name,
        "in": "query",
        "required": param.required,
        "explode": param.list,
        "schema": schema,
    });
    if !param.required {
        out["allowEmptyValue"] = json!(true);
        out["description"] = json!("empty: not given");
    }
    out
}

/// The most values of a repeated parameter a request target within the default
/// `max_uri_bytes` can carry (more is a 414): each is `?name=` or `&name=` and at least its
/// shortest value.
fn max_items(op: &Operation, param: &Param) -> usize {
    let shortest = match param.kind {
        Kind::Uuid => 36,
        _ => 1,
    };
    let room = ServerLimits::default()
        .max_uri_bytes
        .saturating_sub(op.path.len());
    room / (param.name.len() + 2 + shortest)
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

    /// Every operation's answer is one schema of the document, and no answer names another
    /// operation.
    #[test]
    fn every_operation_has_its_answer_schema() {
        let names: Vec<&str> = OPERATIONS.iter().map(|op| op.name).collect();
        let answered: Vec<&str> = schemas::ANSWERS.iter().map(|(name, _)| *name).collect();
        assert_eq!(answered, names);
        let doc = document();
        for (_, schema) in schemas::ANSWERS {
            assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
        }
    }

    /// Every route of the table has its answers described.
    #[test]
    fn every_route_has_its_answer() {
        for route in ROUTES {
            let (responses, _) = route_answer(route);
            assert_ne!(responses["200"]["description"], "OK", "{}", route.path);
        }
    }

    /// A repeated parameter's `maxItems` values fit in the default request-target bound, one
    /// more does not.
    #[test]
    fn max_items_is_what_the_target_bound_holds() {
        let op = OPERATIONS
            .iter()
            .find(|op| op.name == "charges")
            .expect("charges");
        let param = op
            .params
            .iter()
            .find(|p| p.name == "project_ids")
            .expect("project_ids");
        let n = max_items(op, param);
        let target = |n: usize| op.path.len() + n * ("&project_ids=".len() + 36);
        let bound = ServerLimits::default().max_uri_bytes;
        assert!(target(n) <= bound && target(n + 1) > bound, "{n}");
    }
}
