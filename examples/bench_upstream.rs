//! The bench suite's helper server (`bench/suite.sh`), plain hyper with no middleware:
//!
//! - any path: the body of `--body FILE` as `application/json` (the ceiling of HTTP on this
//!   machine: what a server that does nothing but answer costs);
//! - `/jwks`: the public half of `tests/keys/rsa-1`, as an identity provider publishes it, so a
//!   gateway can verify the RS256 token this prints;
//! - `/billing/v2beta1/invoices/{id}/download`: `--download-mib` MiB of bytes, streamed, as an
//!   upstream for measuring the gateway's memory while it relays a large download.
//!
//! Prints `URL=http://ADDR` and `RS256=<token>` (a read-only caller, valid for two hours) once
//! it listens. Bench-only: the key signing the token is a committed test key.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The body every other path answers with.
    #[arg(long)]
    body: PathBuf,
    /// Size of the download answer, in MiB.
    #[arg(long, default_value_t = 100)]
    download_mib: usize,
}

const CHUNK: usize = 64 * 1024;

struct Answers {
    body: Bytes,
    jwks: Bytes,
    chunk: Bytes,
    chunks: usize,
}

type Body = BoxBody<Bytes, Infallible>;

fn answer(answers: &Answers, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let (content_type, body) = if path == "/jwks" {
        ("application/json", Full::new(answers.jwks.clone()).boxed())
    } else if path.starts_with("/billing/v2beta1/invoices/") && path.ends_with("/download") {
        let chunk = answers.chunk.clone();
        let frames = (0..answers.chunks).map(move |_| Ok(Frame::data(chunk.clone())));
        (
            "application/pdf",
            StreamBody::new(futures_util::stream::iter(frames)).boxed(),
        )
    } else {
        ("application/json", Full::new(answers.body.clone()).boxed())
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn rs256_token() -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({
        "sub": "bench-rs256",
        "roles": ["billing-read-only"],
        "iat": now,
        "exp": now + 2 * 3600,
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let key = EncodingKey::from_rsa_pem(include_bytes!("../tests/keys/rsa-1.pem"))?;
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let body = std::fs::read(&args.body)
        .with_context(|| format!("cannot read {}", args.body.display()))?;
    let jwk: serde_json::Value =
        serde_json::from_str(include_str!("../tests/keys/rsa-1.jwk.json"))?;
    let answers: &'static Answers = Box::leak(Box::new(Answers {
        body: body.into(),
        jwks: json!({ "keys": [jwk] }).to_string().into(),
        chunk: Bytes::from(vec![b'%'; CHUNK]),
        chunks: args.download_mib * 1024 * 1024 / CHUNK,
    }));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("URL=http://{}", listener.local_addr()?);
    println!("RS256={}", rs256_token()?);
    let http = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = listener.accept().await?;
        let http = http.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                Ok::<_, Infallible>(answer(answers, &req))
            });
            // A client going away mid-answer is routine here.
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
