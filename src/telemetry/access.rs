//! The access log: one line per request, rendered straight into one buffer (JSON or pretty) and
//! written by a thread of its own, so neither formatting machinery nor a slow sink (a full pipe,
//! a stalled disk) holds a request up.
//!
//! The line goes through a bounded queue: a line that finds it full is dropped and counted
//! (`billing_gateway_log_lines_dropped_total`) instead of growing memory without bound or making
//! the request wait. The writer thread writes whole lines in writes of at most `PIPE_BUF`
//! bytes, so lines stay whole beside the other log events the process writes to the same
//! stream. The log filter decides whether lines are written, as for any event (`RUST_LOG`,
//! target [`ACCESS_TARGET`], level INFO): asked once, when the log is started, since the filter
//! does not change while the process runs.

use std::fmt::Write as _;
use std::io::{self, BufWriter, Write};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use crate::config::LogFormat;

/// The target the access log's lines are filtered by (`RUST_LOG=billing_gateway::access=warn`
/// turns them off).
pub const ACCESS_TARGET: &str = "billing_gateway::access";

/// Lines the queue holds while the sink is slow: about 1.5 MiB of JSON lines at most.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Writes up to this size are atomic on a pipe (POSIX): a batch never splits a line.
const PIPE_BUF: usize = 4096;

/// How long shutting down waits for the lines still queued to be written.
const FLUSH_PATIENCE: Duration = Duration::from_secs(5);

/// How long the writer lets lines gather once one arrives. Woken for every line, the thread
/// cost each request two context switches and a write of its own, which halved a cache hit's
/// throughput on a core shared with the requests (bench/RESULTS.md); gathered, one wake-up and
/// a few writes carry hundreds. At most this late, and the queue holds far more than comes in
/// that long.
const GATHER: Duration = Duration::from_millis(10);

/// What one access log line says.
#[derive(Debug)]
pub struct AccessEntry<'a> {
    /// The request id, as echoed.
    pub request_id: &'a str,
    /// The trace id, 32 hex digits.
    pub trace_id: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The path, as [`super::loggable_path`] shortens it.
    pub path: &'a str,
    /// The Billing operation, `gateway` or `unknown`.
    pub operation: &'a str,
    /// The authenticated subject, or `-`.
    pub subject: &'a str,
    /// The answer's status.
    pub status: u16,
    /// Why the gateway refused it, or `-`.
    pub rejection: &'a str,
    /// How the cache answered, or `-`.
    pub cache: &'a str,
    /// Time to the upstream's response headers, when it was called.
    pub upstream_ms: Option<f64>,
    /// Time to the answer's headers.
    pub duration: Duration,
}

/// The access log of one app: its format and its writer thread.
#[derive(Clone)]
pub struct AccessLog {
    /// Whether the log filter lets access lines through.
    enabled: bool,
    format: LogFormat,
    sink: SyncSender<Message>,
    dropped: Counter,
}

enum Message {
    Line(String),
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl AccessLog {
    /// Starts the thread writing to `writer`, with room for `capacity` lines; lines dropped
    /// because the queue was full are counted in `dropped`.
    pub fn spawn(
        format: LogFormat,
        writer: impl Write + Send + 'static,
        capacity: usize,
        dropped: Counter,
    ) -> io::Result<AccessLog> {
        let (sink, queue) = sync_channel(capacity);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&queue, writer))?;
        Ok(AccessLog {
            enabled: filter_allows(),
            format,
            sink,
            dropped,
        })
    }

    /// Queues the line for `entry`, when the log filter lets access lines through.
    pub fn log(&self, entry: &AccessEntry<'_>) {
        if !self.enabled {
            return;
        }
        let line = render(self.format, entry, time::OffsetDateTime::now_utc());
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.sink.try_send(Message::Line(line))
        {
            self.dropped.inc();
        }
    }

    /// Waits (bounded) until every line queued so far is written.
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        let mut message = Message::Flush(done);
        let deadline = tokio::time::Instant::now() + FLUSH_PATIENCE;
        loop {
            match self.sink.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if tokio::time::Instant::now() < deadline => {
                    message = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => return,
            }
        }
        let _ = tokio::time::timeout_at(deadline, written).await;
    }
}

/// Whether the log subscriber of the calling thread lets access lines through.
///
/// Asked on a thread of its own, with the caller's subscriber: asking a subscriber with
/// per-layer filters whether something is enabled, and then not emitting it, leaves that
/// answer behind on the asking thread for its next span (which then skipped the OpenTelemetry
/// layer).
fn filter_allows() -> bool {
    let subscriber = tracing::dispatcher::get_default(Clone::clone);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tracing::dispatcher::with_default(
                    &subscriber,
                    || tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO),
                )
            })
            .join()
            .unwrap_or(true)
    })
}

/// The writer thread: whole lines, gathered for [`GATHER`] after the first, flushed when the
/// queue is empty.
fn write_lines(queue: &Receiver<Message>, writer: impl Write) {
    let mut out = BufWriter::with_capacity(PIPE_BUF, writer);
    while let Ok(first) = queue.recv() {
        std::thread::sleep(GATHER);
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                // A line that does not fit what is buffered sends the buffer first: writes end
                // at line ends.
                Message::Line(line) => {
                    let _ = out.write_all(line.as_bytes());
                }
                Message::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            next = queue.try_recv().ok();
        }
        let _ = out.flush();
    }
}

/// The line for `entry` at `now`, newline included.
pub fn render(format: LogFormat, entry: &AccessEntry<'_>, now: time::OffsetDateTime) -> String {
    let mut line = String::with_capacity(384 + entry.path.len() + entry.subject.len());
    match format {
        LogFormat::Json => json(&mut line, entry, now),
        LogFormat::Pretty => pretty(&mut line, entry, now),
    }
    line.push('\n');
    line
}

/// `{"timestamp":…,"level":"INFO","message":"request",<fields>,"target":…}`: the fields and
/// their order of the JSON formatter this replaces.
fn json(line: &mut String, e: &AccessEntry<'_>, now: time::OffsetDateTime) {
    line.push_str("{\"timestamp\":\"");
    timestamp(line, now);
    line.push_str("\",\"level\":\"INFO\",\"message\":\"request\"");
    fields(line, e, json_key, json_string);
    json_key(line, "target");
    json_string(line, ACCESS_TARGET);
    line.push('}');
}

/// `<timestamp>  INFO billing_gateway::access: request name=value …`: values a caller chose
/// (subject, path) quoted and escaped, so a line is always one line.
fn pretty(line: &mut String, e: &AccessEntry<'_>, now: time::OffsetDateTime) {
    timestamp(line, now);
    line.push_str("  INFO ");
    line.push_str(ACCESS_TARGET);
    line.push_str(": request");
    fields(line, e, pretty_key, pretty_string);
}

/// The entry's fields, in the line's order, each name written by `key` and each text by
/// `text` (numbers are written alike in both formats): one list of fields, two renderings.
fn fields(
    line: &mut String,
    e: &AccessEntry<'_>,
    key: fn(&mut String, &str),
    text: fn(&mut String, &str),
) {
    for (name, value) in [
        ("request_id", e.request_id),
        ("trace_id", e.trace_id),
        ("method", e.method),
        ("path", e.path),
        ("operation", e.operation),
        ("subject", e.subject),
    ] {
        key(line, name);
        text(line, value);
    }
    key(line, "status");
    push_u64(line, u64::from(e.status));
    key(line, "rejection");
    text(line, e.rejection);
    key(line, "cache");
    text(line, e.cache);
    if let Some(ms) = e.upstream_ms {
        key(line, "upstream_ms");
        millis(line, ms_to_micros(ms));
    }
    key(line, "duration_ms");
    millis(line, duration_micros(e.duration));
}

fn json_key(line: &mut String, name: &str) {
    line.push_str(",\"");
    line.push_str(name);
    line.push_str("\":");
}

/// A JSON string: quotes, backslashes and control characters escaped (RFC 8259 §7).
fn json_string(line: &mut String, value: &str) {
    line.push('"');
    let mut plain = 0;
    for (i, b) in value.bytes().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        line.push_str(&value[plain..i]);
        match b {
            b'"' => line.push_str("\\\""),
            b'\\' => line.push_str("\\\\"),
            b'\n' => line.push_str("\\n"),
            b'\r' => line.push_str("\\r"),
            b'\t' => line.push_str("\\t"),
            _ => {
                let _ = write!(line, "\\u{b:04x}");
            }
        }
        plain = i + 1;
    }
    line.push_str(&value[plain..]);
    line.push('"');
}

fn pretty_key(line: &mut String, name: &str) {
    line.push(' ');
    line.push_str(name);
    line.push('=');
}

/// Bare when made of plain characters only, else quoted and escaped as Rust strings are.
fn pretty_string(line: &mut String, value: &str) {
    let plain = !value.is_empty()
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'@')
        });
    if plain {
        line.push_str(value);
    } else {
        let _ = write!(line, "{value:?}");
    }
}

/// RFC 3339, UTC, microseconds: `2026-11-29T05:31:07.123456Z`.
fn timestamp(line: &mut String, now: time::OffsetDateTime) {
    let (year, month, day) = now.to_calendar_date();
    let (hour, minute, second, micro) = now.to_hms_micro();
    pad(line, u64::try_from(year).unwrap_or(0), 4);
    line.push('-');
    pad(line, u64::from(u8::from(month)), 2);
    line.push('-');
    pad(line, u64::from(day), 2);
    line.push('T');
    pad(line, u64::from(hour), 2);
    line.push(':');
    pad(line, u64::from(minute), 2);
    line.push(':');
    pad(line, u64::from(second), 2);
    line.push('.');
    pad(line, u64::from(micro), 6);
    line.push('Z');
}

fn ms_to_micros(ms: f64) -> u64 {
    // Saturating: a negative or non-finite value cannot come from a clock, and is 0 here.
    (ms * 1000.0).round() as u64
}

fn duration_micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Milliseconds with three decimals (microsecond resolution): `12.345`.
fn millis(line: &mut String, micros: u64) {
    push_u64(line, micros / 1000);
    line.push('.');
    pad(line, micros % 1000, 3);
}

fn push_u64(line: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    line.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

/// `n` in at least `width` digits, zero-padded.
fn pad(line: &mut String, n: u64, width: usize) {
    let mut digits = 1;
    let mut rest = n / 10;
    while rest > 0 {
        digits += 1;
        rest /= 10;
    }
    for _ in digits..width {
        line.push('0');
    }
    push_u64(line, n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn entry<'a>(subject: &'a str, path: &'a str) -> AccessEntry<'a> {
        AccessEntry {
            request_id: "req-1",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            method: "GET",
            path,
            operation: "list_consumptions",
            subject,
            status: 200,
            rejection: "-",
            cache: "hit",
            upstream_ms: Some(12.3456),
            duration: Duration::from_micros(1_234_567),
        }
    }

    #[test]
    fn a_json_line_is_one_object_whatever_the_subject_holds() {
        let at = datetime!(2026-01-02 03:04:05.000042 UTC);
        let subject = "al\"ice\\\n\u{1}é";
        let line = render(LogFormat::Json, &entry(subject, "/billing"), at);
        assert!(
            line.ends_with("}\n") && line.matches('\n').count() == 1,
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["timestamp"], "2026-01-02T03:04:05.000042Z");
        assert_eq!(v["subject"], subject);
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_ms"], 12.346);
        assert_eq!(v["duration_ms"], 1234.567);
        assert_eq!(v["target"], ACCESS_TARGET);
    }

    #[test]
    fn a_pretty_line_quotes_what_is_not_plain() {
        let at = datetime!(2026-01-02 03:04:05 UTC);
        let line = render(LogFormat::Pretty, &entry("bad guy\n", "/a b"), at);
        assert_eq!(
            line,
            "2026-01-02T03:04:05.000000Z  INFO billing_gateway::access: request \
             request_id=req-1 trace_id=4bf92f3577b34da6a3ce929d0e0e4736 method=GET \
             path=\"/a b\" operation=list_consumptions subject=\"bad guy\\n\" status=200 \
             rejection=- cache=hit upstream_ms=12.346 duration_ms=1234.567\n"
        );
    }
}
