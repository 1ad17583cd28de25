//! Spans exported over OTLP/HTTP (protobuf) to an in-process collector. A test binary of its
//! own: exporting installs the process's one global subscriber.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use billing_gateway::config::{Config, LogFormat};
use billing_gateway::telemetry::trace::parse_traceparent;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use prost::Message;
use secrecy::SecretString;
use serde_json::json;
use wiremock::Mock;
use wiremock::matchers::method;

/// The W3C specification's own example.
const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_PARENT: &str = "b7ad6b7169203331";

type Received = Arc<Mutex<Vec<(Option<String>, ExportTraceServiceRequest)>>>;

/// A collector on 127.0.0.1:0 that accepts `POST /v1/traces` and keeps each decoded export
/// with its content type.
async fn collector() -> (String, Received) {
    let received = Received::default();
    let keep = received.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let keep = keep.clone();
            async move {
                let export = ExportTraceServiceRequest::decode(body).expect("an OTLP export");
                let content_type = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                keep.lock().expect("lock").push((content_type, export));
                // An empty ExportTraceServiceResponse: everything accepted.
                (
                    [(header::CONTENT_TYPE, "application/x-protobuf")],
                    Vec::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), received)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key) {
        Some(any_value::Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_the_callers_trace_operation_and_status() {
    let (endpoint, received) = collector().await;
    // The exporter is configured like every other setting: through `Config` (from
    // OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME when loaded from the environment).
    let mut tracing = Config::new("http://unused", uuid::Uuid::nil(), SecretString::from(""))
        .tracing
        .clone();
    tracing.otlp_endpoint = Some(endpoint);
    tracing.service_name = "billing-gateway-under-test".to_owned();
    let telemetry = billing_gateway::telemetry::init(Some(LogFormat::Json), &tracing)
        .expect("the exporter starts");
    assert!(telemetry.exporting());

    let app = TestApp::spawn().await;
    Mock::given(method("GET"))
        .respond_with(ok_json(json!({"consumptions": []})))
        .mount(&app.upstream)
        .await;
    let response = app
        .client
        .get(format!("{}/billing/v2beta1/consumptions", app.base))
        .bearer_auth(app.reader())
        .header(
            "traceparent",
            format!("00-{CALLER_TRACE}-{CALLER_PARENT}-01"),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    // Bodies read to the end: a connection left mid-answer would hold the shutdown up.
    response.bytes().await.expect("body");
    let unknown = app.get("/billing/v2beta1/nowhere", &app.reader()).await;
    assert_eq!(unknown.status(), 404);
    unknown.bytes().await.expect("body");
    let upstream_traceparent = app.upstream_requests().await[0]
        .headers
        .get("traceparent")
        .expect("a traceparent upstream")
        .to_str()
        .expect("ascii")
        .to_owned();
    app.stop().await;

    // Spans leave in batches: flush, then look at what the collector decoded.
    telemetry.flush().await;
    let exports = received.lock().expect("lock").clone();
    assert!(!exports.is_empty(), "nothing reached the collector");
    let mut spans: Vec<Span> = Vec::new();
    for (content_type, export) in &exports {
        assert_eq!(content_type.as_deref(), Some("application/x-protobuf"));
        for resource_spans in &export.resource_spans {
            let resource = resource_spans.resource.as_ref().expect("resource");
            assert_eq!(
                text(&resource.attributes, "service.name").as_deref(),
                Some("billing-gateway-under-test")
            );
            for scope in &resource_spans.scope_spans {
                spans.extend(scope.spans.iter().cloned());
            }
        }
    }

    // The caller's request: continued from its trace, with its operation and status.
    let request = spans
        .iter()
        .find(|s| s.name == "request" && hex(&s.trace_id) == CALLER_TRACE)
        .unwrap_or_else(|| panic!("no request span in the caller's trace: {spans:#?}"));
    assert_eq!(hex(&request.parent_span_id), CALLER_PARENT);
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(
        text(&request.attributes, "operation").as_deref(),
        Some("consumptions")
    );
    assert_eq!(
        int(&request.attributes, "http.response.status_code"),
        Some(200)
    );
    assert!(text(&request.attributes, "request_id").is_some());

    // Its upstream call: a child span, whose id is the parent id the upstream received.
    let upstream = spans
        .iter()
        .find(|s| s.name == "upstream" && s.parent_span_id == request.span_id)
        .unwrap_or_else(|| panic!("no upstream span under the request: {spans:#?}"));
    assert_eq!(upstream.trace_id, request.trace_id);
    assert_eq!(upstream.kind, SpanKind::Client as i32);
    assert_eq!(
        int(&upstream.attributes, "http.response.status_code"),
        Some(200)
    );
    let (trace, parent, flags) =
        parse_traceparent(upstream_traceparent.as_bytes()).expect("valid traceparent");
    assert_eq!(hex(&trace), CALLER_TRACE);
    assert_eq!(parent.as_slice(), upstream.span_id.as_slice());
    assert_eq!(flags, 1);

    // A request without a traceparent starts its own trace; its status is recorded too.
    let refused = spans
        .iter()
        .find(|s| {
            s.name == "request" && int(&s.attributes, "http.response.status_code") == Some(404)
        })
        .unwrap_or_else(|| panic!("no span for the 404: {spans:#?}"));
    assert_ne!(hex(&refused.trace_id), CALLER_TRACE);
    assert!(refused.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        text(&refused.attributes, "operation").as_deref(),
        Some("unknown")
    );
    // A 4xx is the caller's error, not the server span's (OpenTelemetry HTTP conventions).
    assert_ne!(
        refused.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );

    telemetry.shutdown().await;
}
