//! hclog-compatible JSON logging on stderr.
//!
//! go-plugin (inside the Nomad agent) reads the plugin's stderr line by line
//! and re-logs every line that parses as an hclog JSON object through the
//! agent's logger, at that object's `@level`. A line that is not such an object
//! is logged raw at DEBUG, so every `tracing` event is written here as exactly
//! one JSON object on one line:
//!
//! ```text
//! {"@level":"info","@message":"VM started","@timestamp":"2026-11-22T04:17:00.123456Z","@module":"microvm.runner","task_id":"…","pid":4242}
//! ```
//!
//! The agent's side is unforgiving (go-plugin `client.go:logStderr`,
//! `log_entry.go:parseJSON`):
//!
//! * `@level`, `@message` and `@timestamp` are type-asserted to Go strings
//!   without a check. Any other JSON type there panics a goroutine and takes
//!   the whole agent down. Those three keys are only ever written here as
//!   strings, and event or span fields with those names are renamed (`_@level`).
//! * `@timestamp` is parsed with the layout `2006-01-02T15:04:05.000000Z07:00`,
//!   which needs exactly six fractional digits (see [`timestamp`]).
//! * The reader's buffer is 64 KiB. A longer line is split and logged raw, so
//!   lines are capped at [`MAX_LINE_BYTES`] by truncating large fields and the
//!   message. A truncated line carries `"@truncated": true`.
//!
//! When the agent dies, stderr becomes a broken pipe. Rust ignores SIGPIPE, so
//! writes fail with `EPIPE`, and `eprintln!` would panic. [`StderrWriter`]
//! swallows every write error instead.

use std::backtrace::{Backtrace, BacktraceStatus};
use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
use std::panic::Location;
use std::sync::Once;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The environment variable that overrides the log filter (`EnvFilter`
/// syntax, e.g. `debug` or `info,microvm_driver::net=trace`).
pub const LOG_ENV: &str = "NOMAD_MICROVM_LOG";

/// The root of every `@module` value.
pub const DEFAULT_MODULE: &str = "microvm";

/// The longest line written, including its `\n`. go-plugin reads stderr with
/// a 64 KiB buffer; this leaves some headroom below it.
pub const MAX_LINE_BYTES: usize = 60 * 1024;

/// Targets starting with one of these crate names get the crate name replaced
/// by the module root (`microvm_driver::net::tap` → `microvm.net.tap`).
const LOCAL_CRATES: &[&str] = &[env!("CARGO_CRATE_NAME"), "nomad_driver_microvm"];

/// Keys that only this module writes. Fields with these names get a `_` prefix.
const RESERVED_KEYS: &[&str] = &["@level", "@message", "@timestamp", "@module", "@truncated", "@dropped_fields"];

/// On an oversized line, string fields longer than this (in escaped JSON
/// bytes) are cut to this length first.
const FIELD_CAP: usize = 1024;

/// Noisy dependencies that are never logged more verbosely than `info` under
/// the default filter (the environment variable can still turn them up).
const NOISY_CRATES: &[&str] = &["h2", "hyper", "hyper_util", "tower"];

/// hclog's name for a `tracing` level.
pub fn level_str(level: Level) -> &'static str {
    match level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// Formats `t` as UTC in go-plugin's layout `2006-01-02T15:04:05.000000Z07:00`:
/// `YYYY-MM-DDThh:mm:ss.ffffffZ`, always six fractional digits (truncated, not
/// rounded). Times outside the years 0000–9999 are clamped into them so the
/// layout still parses.
pub fn timestamp(t: SystemTime) -> String {
    // 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
    const MIN_SECS: i64 = -62_167_219_200;
    const MAX_SECS: i64 = 253_402_300_799;

    let (secs, micros) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_micros()),
        Err(e) => {
            // `t` is before the epoch: floor to whole seconds, keep the
            // fraction positive.
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (-whole, 0),
                nanos => (-whole - 1, (1_000_000_000 - nanos) / 1000),
            }
        }
    };
    let (secs, micros) = if secs < MIN_SECS {
        (MIN_SECS, 0)
    } else if secs > MAX_SECS {
        (MAX_SECS, 999_999)
    } else {
        (secs, micros)
    };

    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z", sod / 3600, sod % 3600 / 60, sod % 60,)
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats one log line (including its trailing `\n`) with `@module` set to
/// [`DEFAULT_MODULE`]. This is what the event formatter produces for an event
/// with this level, message and fields; fields named like an `@` key are
/// renamed, and the line is capped at [`MAX_LINE_BYTES`].
pub fn format_line(level: Level, message: &str, fields: &[(&str, Value)], now: SystemTime) -> String {
    let mut line = Line::new(level, DEFAULT_MODULE.to_owned());
    line.message = message.to_owned();
    for (key, value) in fields {
        line.push_field(key, value.clone());
    }
    line.render(now)
}

/// One log line before serialisation.
struct Line {
    level: Level,
    message: String,
    module: String,
    /// Span fields (root first) then event fields; a later field with the same
    /// key replaces the earlier value in place.
    fields: Vec<(String, Value)>,
    truncated: bool,
    dropped_fields: usize,
}

impl Line {
    fn new(level: Level, module: String) -> Self {
        Line { level, message: String::new(), module, fields: Vec::new(), truncated: false, dropped_fields: 0 }
    }

    fn push_field(&mut self, key: &str, value: Value) {
        if RESERVED_KEYS.contains(&key) {
            upsert(&mut self.fields, format!("_{key}"), value);
        } else {
            upsert(&mut self.fields, key.to_owned(), value);
        }
    }

    /// The JSON object, `\n`-terminated, at most [`MAX_LINE_BYTES`] long.
    fn render(mut self, now: SystemTime) -> String {
        let ts = timestamp(now);
        let mut out = self.serialize(&ts);
        if out.len() + 1 > MAX_LINE_BYTES {
            self.shrink(&ts);
            out = self.serialize(&ts);
        }
        if out.len() + 1 > MAX_LINE_BYTES {
            // Only reachable with absurd keys or module names: keep the bare
            // minimum, which is always small enough.
            self.fields.clear();
            self.module = truncate_marked(&self.module, 256);
            self.message = truncate_marked(&self.message, MAX_LINE_BYTES / 2);
            out = self.serialize(&ts);
        }
        out.push('\n');
        out
    }

    fn serialize(&self, ts: &str) -> String {
        let mut buf = Vec::with_capacity(256 + self.message.len());
        buf.push(b'{');
        write_pair(&mut buf, "@level", level_str(self.level));
        buf.push(b',');
        write_pair(&mut buf, "@message", self.message.as_str());
        buf.push(b',');
        write_pair(&mut buf, "@timestamp", ts);
        buf.push(b',');
        write_pair(&mut buf, "@module", self.module.as_str());
        if self.truncated {
            buf.push(b',');
            write_pair(&mut buf, "@truncated", &true);
        }
        if self.dropped_fields > 0 {
            buf.push(b',');
            write_pair(&mut buf, "@dropped_fields", &self.dropped_fields);
        }
        for (key, value) in &self.fields {
            buf.push(b',');
            write_pair(&mut buf, key.as_str(), value);
        }
        buf.push(b'}');
        // serde_json only writes valid UTF-8; the fallback is unreachable.
        String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Makes the line fit: caps large string fields, drops the largest fields
    /// while the rest would take more than half of the line, then cuts the
    /// message to what is left.
    fn shrink(&mut self, ts: &str) {
        self.truncated = true;
        self.module = truncate_marked(&self.module, 256);
        for (_, value) in &mut self.fields {
            if let Value::String(s) = value
                && escaped_len(s) > FIELD_CAP
            {
                *s = truncate_marked(s, FIELD_CAP);
            }
        }

        let message = std::mem::take(&mut self.message);
        let limit = MAX_LINE_BYTES - 1; // the '\n'
        // Everything but the message, plus room for the `@dropped_fields`
        // entry and the marker a cut adds.
        let mut rest = self.serialize(ts).len() + 64;
        if rest > limit / 2 {
            // `,"key":value` per field, largest first.
            let mut sizes: Vec<(usize, usize)> =
                self.fields.iter().enumerate().map(|(i, (k, v))| (escaped_len(k) + json_len(v) + 2, i)).collect();
            sizes.sort_unstable_by(|a, b| b.cmp(a));
            let mut drop = vec![false; self.fields.len()];
            for (size, i) in sizes {
                if rest <= limit / 2 {
                    break;
                }
                drop[i] = true;
                rest -= size;
                self.dropped_fields += 1;
            }
            let mut index = 0;
            self.fields.retain(|_| {
                index += 1;
                !drop[index - 1]
            });
        }
        let budget = limit.saturating_sub(rest);
        self.message = if escaped_len(&message) > budget { truncate_marked(&message, budget) } else { message };
    }
}

/// Replaces the value of `key` in place, or appends it.
fn upsert(fields: &mut Vec<(String, Value)>, key: String, value: Value) {
    match fields.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => fields.push((key, value)),
    }
}

fn write_pair<T: serde::Serialize + ?Sized>(buf: &mut Vec<u8>, key: &str, value: &T) {
    // Writing strings, numbers, bools and `Value`s into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, key);
    buf.push(b':');
    if serde_json::to_writer(&mut *buf, value).is_err() {
        buf.extend_from_slice(b"null");
    }
}

fn json_len(value: &Value) -> usize {
    match value {
        Value::String(s) => escaped_len(s),
        other => other.to_string().len(),
    }
}

/// Length of `c` inside a JSON string as serde_json writes it.
fn escaped_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if u32::from(c) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Length of `s` as a JSON string, quotes included.
fn escaped_len(s: &str) -> usize {
    s.chars().map(escaped_char_len).sum::<usize>() + 2
}

/// Cuts `s` (at a char boundary) so that it, plus a marker saying how long it
/// was, is at most `max` bytes as a JSON string.
fn truncate_marked(s: &str, max: usize) -> String {
    if escaped_len(s) <= max {
        return s.to_owned();
    }
    let marker = format!("...[truncated, {} bytes]", s.len());
    let budget = max.saturating_sub(marker.len() + 2);
    let mut used = 0;
    let mut end = 0;
    for (i, c) in s.char_indices() {
        let len = escaped_char_len(c);
        if used + len > budget {
            break;
        }
        used += len;
        end = i + c.len_utf8();
    }
    format!("{}{marker}", &s[..end])
}

/// The event formatter: one hclog JSON object per event.
///
/// `@module` is `<root>.<target>` with `::` turned into `.` and this crate's
/// name dropped (`microvm_driver::net::tap` → `microvm.net.tap`,
/// `h2::codec` → `microvm.h2.codec`). Span fields (outermost first) and event
/// fields become top-level keys; numbers and bools keep their JSON types,
/// everything else is a string. Pair it with [`HclogFields`], which stores span
/// fields in a form this formatter can read back.
#[derive(Debug, Clone)]
pub struct HclogFormat {
    module_root: String,
}

impl Default for HclogFormat {
    fn default() -> Self {
        HclogFormat::new(DEFAULT_MODULE)
    }
}

impl HclogFormat {
    /// A formatter whose `@module` values start with `module_root`.
    pub fn new(module_root: impl Into<String>) -> Self {
        HclogFormat { module_root: module_root.into() }
    }

    /// The `@module` value for a `tracing` target.
    pub fn module_for(&self, target: &str) -> String {
        let tail = LOCAL_CRATES
            .iter()
            .find_map(|krate| {
                let rest = target.strip_prefix(krate)?;
                if rest.is_empty() { Some("") } else { rest.strip_prefix("::") }
            })
            .unwrap_or(target);
        if tail.is_empty() {
            self.module_root.clone()
        } else {
            format!("{}.{}", self.module_root, tail.replace("::", "."))
        }
    }
}

impl<S> FormatEvent<S, HclogFields> for HclogFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, HclogFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Line::new(*meta.level(), self.module_for(meta.target()));

        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(stored) = extensions.get::<FormattedFields<HclogFields>>() {
                    for (key, value) in decode_span_fields(&stored.fields) {
                        line.push_field(&key, value);
                    }
                }
            }
        }

        // Events bridged from the `log` crate carry their real target in a
        // `log.target` field (the metadata target is just "log").
        let from_log = meta.target() == "log" && meta.fields().field("log.target").is_some();
        let mut collector = Collector::new(true, from_log);
        event.record(&mut collector);
        if let Some(target) = &collector.log_target {
            line.module = self.module_for(target);
        }
        line.message = collector.message.unwrap_or_default();
        for (key, value) in collector.fields {
            line.push_field(&key, value);
        }

        writer.write_str(&line.render(SystemTime::now()))
    }
}

/// The span field formatter to pair with [`HclogFormat`]. It stores a span's
/// fields as a JSON array of `[key, value]` pairs, so the event formatter can
/// put them back with their types.
#[derive(Debug, Clone, Copy, Default)]
pub struct HclogFields;

impl<'writer> FormatFields<'writer> for HclogFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut collector = Collector::new(false, false);
        fields.record(&mut collector);
        writer.write_str(&encode_span_fields(&collector.fields))
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut merged = decode_span_fields(&current.fields);
        let mut collector = Collector::new(false, false);
        fields.record(&mut collector);
        for (key, value) in collector.fields {
            upsert(&mut merged, key, value);
        }
        current.fields = encode_span_fields(&merged);
        Ok(())
    }
}

fn encode_span_fields(fields: &[(String, Value)]) -> String {
    serde_json::to_string(fields).unwrap_or_default()
}

fn decode_span_fields(stored: &str) -> Vec<(String, Value)> {
    if stored.is_empty() {
        return Vec::new();
    }
    serde_json::from_str(stored).unwrap_or_default()
}

/// Collects `tracing` field values as JSON values.
struct Collector {
    /// Events: the `message` field becomes `@message`. Spans: it is a field.
    is_event: bool,
    /// Bridged `log` record: drop the `log.*` metadata fields.
    from_log: bool,
    message: Option<String>,
    log_target: Option<String>,
    fields: Vec<(String, Value)>,
}

impl Collector {
    fn new(is_event: bool, from_log: bool) -> Self {
        Collector { is_event, from_log, message: None, log_target: None, fields: Vec::new() }
    }

    fn record(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if self.is_event && name == "message" {
            self.message = Some(match value {
                Value::String(s) => s,
                other => other.to_string(),
            });
            return;
        }
        if self.from_log {
            match name {
                "log.target" => {
                    if let Value::String(s) = value {
                        self.log_target = Some(s);
                    }
                    return;
                }
                "log.module_path" | "log.file" | "log.line" => return,
                _ => {}
            }
        }
        upsert(&mut self.fields, name.to_owned(), value);
    }
}

impl Visit for Collector {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let value = serde_json::Number::from_f64(value).map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.record(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(field, Value::from(value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        let value = i64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.record(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        let value = u64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.record(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, Value::String(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(err) = source {
            let _ = write!(text, ": {err}");
            source = err.source();
        }
        self.record(field, Value::String(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, Value::String(format!("{value:?}")));
    }
}

/// A `MakeWriter` for stderr that never fails and never panics: each line is
/// written with one `write_all` on the locked, unbuffered stderr (one
/// `write(2)` unless the kernel takes it partially), and every error
/// (`EPIPE` once the agent is gone, `EAGAIN`, …) is swallowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrWriter;

impl io::Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let _ = io::stderr().lock().write_all(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for StderrWriter {
    type Writer = StderrWriter;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// The `fmt` layer writing hclog JSON to stderr, for callers composing their
/// own subscriber. [`init`] installs it with a filter.
pub fn layer<S>() -> tracing_subscriber::fmt::Layer<S, HclogFields, HclogFormat, StderrWriter>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(HclogFields)
        .event_format(HclogFormat::default())
        .with_writer(StderrWriter)
        .log_internal_errors(false)
}

/// Builds the filter: `spec` (the value of [`LOG_ENV`]) if set, non-empty and
/// valid; otherwise `default_level`, with [`NOISY_CRATES`] held at `info` at
/// most. The error is returned when `spec` was given but invalid.
fn build_filter(default_level: Level, spec: Option<&str>) -> (EnvFilter, Option<String>) {
    let mut error = None;
    if let Some(spec) = spec.map(str::trim).filter(|s| !s.is_empty()) {
        match EnvFilter::try_new(spec) {
            Ok(filter) => return (filter, None),
            Err(e) => error = Some(e.to_string()),
        }
    }
    let mut filter = EnvFilter::default().add_directive(LevelFilter::from_level(default_level).into());
    let noisy = if default_level > Level::INFO { Level::INFO } else { default_level };
    for krate in NOISY_CRATES {
        if let Ok(directive) = format!("{krate}={}", level_str(noisy)).parse() {
            filter = filter.add_directive(directive);
        }
    }
    (filter, error)
}

/// Installs the global subscriber (hclog JSON on stderr, filtered by
/// `default_level` or by [`LOG_ENV`] when set) and the panic hook. Calling it
/// again is harmless: the first subscriber and hook stay.
pub fn init(default_level: Level) {
    let spec = std::env::var(LOG_ENV).ok();
    let (filter, error) = build_filter(default_level, spec.as_deref());
    let _ = tracing_subscriber::registry().with(filter).with(layer()).try_init();
    install_panic_hook();
    if let Some(error) = error {
        tracing::warn!(
            env = LOG_ENV,
            value = spec.as_deref().unwrap_or_default(),
            error = %error,
            "invalid log filter, using the default level"
        );
    }
}

/// Installs (once per process) a panic hook that writes the panic as an
/// `error` line in the hclog format, then runs the previous hook. It writes
/// directly to stderr, so no filter can hide a panic and a panic inside the
/// subscriber cannot recurse.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = payload_str(info.payload());
            let thread = std::thread::current();
            let backtrace = Backtrace::capture();
            let backtrace = (backtrace.status() == BacktraceStatus::Captured).then(|| backtrace.to_string());
            let line = panic_line(message, info.location(), thread.name(), backtrace.as_deref(), SystemTime::now());
            let _ = StderrWriter.write_all(line.as_bytes());
            previous(info);
        }));
    });
}

fn payload_str(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "Box<dyn Any>"
    }
}

/// The line the panic hook writes.
fn panic_line(
    message: &str,
    location: Option<&Location<'_>>,
    thread: Option<&str>,
    backtrace: Option<&str>,
    now: SystemTime,
) -> String {
    let mut line = Line::new(Level::ERROR, format!("{DEFAULT_MODULE}.panic"));
    line.message = format!("panic: {message}");
    if let Some(loc) = location {
        line.push_field("location", Value::String(format!("{}:{}:{}", loc.file(), loc.line(), loc.column())));
    }
    line.push_field("thread", Value::String(thread.unwrap_or("<unnamed>").to_owned()));
    if let Some(backtrace) = backtrace {
        line.push_field("backtrace", Value::String(backtrace.to_owned()));
    }
    line.render(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serde_json::{Map, json};
    use tracing::subscriber::with_default;

    /// Hand-written check of Go's layout `2006-01-02T15:04:05.000000Z07:00`
    /// as we emit it: `^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$`.
    fn matches_go_layout(s: &str) -> bool {
        let b = s.as_bytes();
        let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
        b.len() == 27
            && digits(0..4)
            && b[4] == b'-'
            && digits(5..7)
            && b[7] == b'-'
            && digits(8..10)
            && b[10] == b'T'
            && digits(11..13)
            && b[13] == b':'
            && digits(14..16)
            && b[16] == b':'
            && digits(17..19)
            && b[19] == b'.'
            && digits(20..26)
            && b[26] == b'Z'
    }

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn go_layout_checker_rejects_near_misses() {
        assert!(matches_go_layout("2026-11-22T04:17:00.123456Z"));
        for bad in [
            "2026-11-22T04:17:00.12345Z",
            "2026-11-22T04:17:00.1234567Z",
            "2026-11-22T04:17:00Z",
            "2026-11-22 04:17:00.123456Z",
            "2026-11-22T04:17:00.123456+00:00",
            "2026-11-22T04:17:00.123456z",
        ] {
            assert!(!matches_go_layout(bad), "{bad}");
        }
    }

    #[test]
    fn timestamp_known_values() {
        let cases = [
            (at(0, 0), "1970-01-01T00:00:00.000000Z"),
            (at(951_782_400, 500_000_000), "2000-02-29T00:00:00.500000Z"),
            (at(1_795_321_020, 123_456_000), "2026-11-22T04:17:00.123456Z"),
            // Sub-microsecond parts are truncated, never rounded up.
            (at(1_795_321_020, 999), "2026-11-22T04:17:00.000000Z"),
            (at(1_795_321_020, 999_999_999), "2026-11-22T04:17:00.999999Z"),
            // Leap years: 2024-02-29, 1972-02-29, end of a leap year.
            (at(1_709_164_800, 0), "2024-02-29T00:00:00.000000Z"),
            (at(68_169_600, 1_000), "1972-02-29T00:00:00.000001Z"),
            (at(1_735_689_599, 0), "2024-12-31T23:59:59.000000Z"),
            // 2100 is not a leap year.
            (at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z"),
            (UNIX_EPOCH - Duration::from_secs(1), "1969-12-31T23:59:59.000000Z"),
            (UNIX_EPOCH - Duration::from_millis(500), "1969-12-31T23:59:59.500000Z"),
        ];
        for (t, want) in cases {
            let got = timestamp(t);
            assert_eq!(got, want);
            assert!(matches_go_layout(&got), "{got}");
        }
    }

    #[test]
    fn timestamp_always_matches_layout() {
        assert!(matches_go_layout(&timestamp(SystemTime::now())));
        assert!(matches_go_layout(&timestamp(at(u64::MAX / 2, 0))));
        assert!(matches_go_layout(&timestamp(at(253_402_300_799, 999_999_999))));
        // Every day of a leap year and the following year, at varied microseconds.
        for day in 0..731u64 {
            let t = at(1_704_067_200 + day * 86_400 + day * 7, (day as u32) * 1_000);
            let s = timestamp(t);
            assert!(matches_go_layout(&s), "{s}");
        }
    }

    #[test]
    fn levels_map_to_hclog_names() {
        for (level, name) in [
            (Level::TRACE, "trace"),
            (Level::DEBUG, "debug"),
            (Level::INFO, "info"),
            (Level::WARN, "warn"),
            (Level::ERROR, "error"),
        ] {
            assert_eq!(level_str(level), name);
            let v = parse(&format_line(level, "m", &[], at(0, 0)));
            assert_eq!(v["@level"], json!(name));
        }
    }

    fn parse(line: &str) -> Map<String, Value> {
        assert!(line.ends_with('\n'), "{line:?}");
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(line.len() <= MAX_LINE_BYTES, "{}", line.len());
        let v: Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object().unwrap().clone();
        for key in ["@level", "@message", "@timestamp", "@module"] {
            assert!(obj[key].is_string(), "{key} in {line}");
        }
        assert!(matches_go_layout(obj["@timestamp"].as_str().unwrap()));
        obj
    }

    #[test]
    fn format_line_basic() {
        let line = format_line(
            Level::WARN,
            "disk \"full\"\nsecond line",
            &[("pid", json!(42)), ("ok", json!(true)), ("ratio", json!(0.5)), ("name", json!("vm"))],
            at(1_795_321_020, 123_456_789),
        );
        let v = parse(&line);
        assert_eq!(v["@level"], "warn");
        assert_eq!(v["@message"], "disk \"full\"\nsecond line");
        assert_eq!(v["@timestamp"], "2026-11-22T04:17:00.123456Z");
        assert_eq!(v["@module"], DEFAULT_MODULE);
        assert_eq!(v["pid"], json!(42));
        assert_eq!(v["ok"], json!(true));
        assert_eq!(v["ratio"], json!(0.5));
        assert_eq!(v["name"], json!("vm"));
        assert!(!v.contains_key("@truncated"));
        assert!(line.starts_with(r#"{"@level":"warn","@message":"#));
    }

    #[test]
    fn format_line_reserved_keys_are_prefixed() {
        let v = parse(&format_line(
            Level::INFO,
            "m",
            &[
                ("@level", json!(7)),
                ("@message", json!({"a": 1})),
                ("@timestamp", json!(null)),
                ("@module", json!("x")),
                ("level", json!("error")),
            ],
            at(0, 0),
        ));
        assert_eq!(v["@level"], "info");
        assert_eq!(v["@message"], "m");
        assert_eq!(v["@timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(v["@module"], DEFAULT_MODULE);
        assert_eq!(v["_@level"], json!(7));
        assert_eq!(v["_@message"], json!({"a": 1}));
        assert_eq!(v["_@timestamp"], json!(null));
        assert_eq!(v["_@module"], json!("x"));
        assert_eq!(v["level"], json!("error"));
    }

    #[test]
    fn oversized_lines_are_truncated() {
        // Huge message.
        let msg = "x".repeat(200 * 1024);
        let v = parse(&format_line(Level::INFO, &msg, &[("k", json!(1))], at(0, 0)));
        let m = v["@message"].as_str().unwrap();
        assert!(m.starts_with("xxxx") && m.ends_with("...[truncated, 204800 bytes]"), "{}", &m[m.len() - 40..]);
        assert!(m.len() > 50 * 1024, "message kept mostly: {}", m.len());
        assert_eq!(v["@truncated"], json!(true));
        assert_eq!(v["k"], json!(1));

        // Characters that expand sixfold when escaped.
        let msg = "\u{1}".repeat(200 * 1024);
        let v = parse(&format_line(Level::INFO, &msg, &[], at(0, 0)));
        assert_eq!(v["@truncated"], json!(true));

        // Multi-byte characters are cut at a char boundary.
        let msg = "é€𝄞".repeat(30 * 1024);
        let v = parse(&format_line(Level::INFO, &msg, &[], at(0, 0)));
        assert!(v["@message"].as_str().unwrap().contains("...[truncated"));

        // Many large fields plus a large message.
        let big = json!("y".repeat(10 * 1024));
        let names: Vec<String> = (0..200).map(|i| format!("f{i}")).collect();
        let fields: Vec<(&str, Value)> = names.iter().map(|n| (n.as_str(), big.clone())).collect();
        let v = parse(&format_line(Level::ERROR, &"z".repeat(100 * 1024), &fields, at(0, 0)));
        assert_eq!(v["@truncated"], json!(true));
        assert!(v["@dropped_fields"].as_u64().unwrap() > 0);
        assert!(v["@message"].as_str().unwrap().len() > 20 * 1024);
        assert!(v["f0"].as_str().unwrap().ends_with("...[truncated, 10240 bytes]"));
    }

    #[test]
    fn module_names() {
        let f = HclogFormat::default();
        assert_eq!(f.module_for(env!("CARGO_CRATE_NAME")), "microvm");
        assert_eq!(f.module_for(&format!("{}::net::tap", env!("CARGO_CRATE_NAME"))), "microvm.net.tap");
        assert_eq!(f.module_for("nomad_driver_microvm"), "microvm");
        assert_eq!(f.module_for("h2::codec"), "microvm.h2.codec");
        assert_eq!(f.module_for("console"), "microvm.console");
        assert_eq!(HclogFormat::new("x").module_for("microvm_driverx::a"), "x.microvm_driverx.a");
    }

    #[test]
    fn panic_line_format() {
        let loc = Location::caller();
        let v = parse(&panic_line("boom\nline 2", Some(loc), Some("main"), Some("0: frame\n1: frame"), at(0, 0)));
        assert_eq!(v["@level"], "error");
        assert_eq!(v["@message"], "panic: boom\nline 2");
        assert_eq!(v["@module"], "microvm.panic");
        assert_eq!(v["location"], json!(format!("{}:{}:{}", loc.file(), loc.line(), loc.column())));
        assert_eq!(v["thread"], "main");
        assert_eq!(v["backtrace"], "0: frame\n1: frame");
        assert_eq!(payload_str(&"static"), "static");
        assert_eq!(payload_str(&String::from("owned")), "owned");
        assert_eq!(payload_str(&5u8), "Box<dyn Any>");
    }

    #[test]
    fn filter_from_env_spec() {
        let (_, err) = build_filter(Level::INFO, None);
        assert!(err.is_none());
        let (_, err) = build_filter(Level::INFO, Some("  "));
        assert!(err.is_none());
        let (f, err) = build_filter(Level::INFO, Some("debug,h2=warn"));
        assert!(err.is_none());
        assert_eq!(f.max_level_hint(), Some(LevelFilter::DEBUG));
        let (f, err) = build_filter(Level::WARN, Some("foo=notalevel"));
        assert!(err.is_some());
        // Falls back to the default: warn, and the noisy crates no more verbose.
        assert_eq!(f.max_level_hint(), Some(LevelFilter::WARN));
        let (f, _) = build_filter(Level::TRACE, None);
        assert_eq!(f.max_level_hint(), Some(LevelFilter::TRACE));
    }

    /// Records every `write` call separately.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    /// Runs `f` under a subscriber using the formatter; returns the lines,
    /// checking one write call per line.
    fn capture(f: impl FnOnce()) -> Vec<Map<String, Value>> {
        let cap = Capture::default();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(HclogFields)
            .event_format(HclogFormat::default())
            .with_writer(cap.clone())
            .log_internal_errors(false);
        let subscriber = tracing_subscriber::registry().with(layer);
        with_default(subscriber, f);
        let writes = cap.0.lock().unwrap().clone();
        writes.iter().map(|w| parse(std::str::from_utf8(w).unwrap())).collect()
    }

    #[derive(Debug)]
    struct Outer;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&Inner)
        }
    }
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner")
        }
    }
    impl std::error::Error for Inner {}

    #[test]
    fn events_through_a_subscriber() {
        let lines = capture(|| {
            let outer = tracing::info_span!("task", task_id = "t-1", attempt = 2u32, shadow = "span");
            let _o = outer.enter();
            let inner = tracing::debug_span!("vm", cpus = 4, late = tracing::field::Empty);
            inner.record("late", true);
            let _i = inner.enter();
            tracing::info!(
                pid = 4242,
                neg = -3i64,
                ratio = 1.5,
                nan = f64::NAN,
                big = u128::MAX,
                ok = false,
                path = %"/tmp/x",
                dbg = ?vec![1, 2],
                err = &Outer as &(dyn std::error::Error + 'static),
                shadow = "event",
                "VM \"started\"\nnext line"
            );
            tracing::error!("@level" = 5, level = "debug", "@message" = "m2", "@timestamp" = 1, "collide");
            tracing::trace!("t");
            tracing::debug!("d");
            tracing::warn!("w");
        });
        assert_eq!(lines.len(), 5, "{lines:#?}");

        let v = &lines[0];
        assert_eq!(v["@level"], "info");
        assert_eq!(v["@message"], "VM \"started\"\nnext line");
        assert!(v["@module"].as_str().unwrap().starts_with("microvm.plugin.hclog"), "{}", v["@module"]);
        assert_eq!(v["task_id"], json!("t-1"));
        assert_eq!(v["attempt"], json!(2));
        assert_eq!(v["cpus"], json!(4));
        assert_eq!(v["late"], json!(true));
        assert_eq!(v["pid"], json!(4242));
        assert_eq!(v["neg"], json!(-3));
        assert_eq!(v["ratio"], json!(1.5));
        assert_eq!(v["nan"], json!("NaN"));
        assert_eq!(v["big"], json!(u128::MAX.to_string()));
        assert_eq!(v["ok"], json!(false));
        assert_eq!(v["path"], json!("/tmp/x"));
        assert_eq!(v["dbg"], json!("[1, 2]"));
        assert_eq!(v["err"], json!("outer: inner"));
        assert_eq!(v["shadow"], json!("event"), "event fields win over span fields");
        assert!(!v.contains_key("message"));

        let v = &lines[1];
        assert_eq!(v["@level"], "error");
        assert_eq!(v["@message"], "collide");
        assert_eq!(v["_@level"], json!(5));
        assert_eq!(v["_@message"], json!("m2"));
        assert_eq!(v["_@timestamp"], json!(1));
        assert_eq!(v["level"], json!("debug"));

        let levels: Vec<&str> = lines[2..].iter().map(|v| v["@level"].as_str().unwrap()).collect();
        assert_eq!(levels, ["trace", "debug", "warn"]);
    }

    #[test]
    fn huge_event_is_truncated() {
        let msg = "a".repeat(200 * 1024);
        let field = "b".repeat(100 * 1024);
        let lines = capture(|| {
            let span = tracing::info_span!("s", blob = %field);
            let _e = span.enter();
            tracing::info!(other = %field, "{msg}");
        });
        assert_eq!(lines.len(), 1);
        let v = &lines[0];
        assert_eq!(v["@truncated"], json!(true));
        assert!(v["@message"].as_str().unwrap().ends_with("...[truncated, 204800 bytes]"));
        assert!(v["blob"].as_str().unwrap().len() <= FIELD_CAP);
        assert!(v["other"].as_str().unwrap().len() <= FIELD_CAP);
    }

    #[test]
    fn stderr_writer_never_fails() {
        let mut w = StderrWriter;
        assert_eq!(io::Write::write(&mut w, b"").unwrap(), 0);
        assert!(io::Write::flush(&mut w).is_ok());
    }
}
