//! Key templates: how an event names the key of the read model it changes.
//!
//! A template is literal text with placeholders:
//!
//! | placeholder      | value                                                        |
//! |------------------|--------------------------------------------------------------|
//! | `{subject}`      | the whole NATS subject (its dots kept as KV key separators)  |
//! | `{subject.N}`    | token N (0-based) of the NATS subject                        |
//! | `{data.PATH}`    | a field of the envelope's data (`a.b.0` walks objects/arrays) |
//! | `{header.NAME}`  | a NATS message header                                        |
//! | `{FIELD}`        | a top-level field of the envelope (`{id}`, `{source}`, ...)  |
//!
//! Substituted values are escaped so that any string becomes a valid KV key and the original
//! can be recovered: bytes outside `[A-Za-z0-9_/-]` become `=XX` (two uppercase hex digits of
//! each UTF-8 byte). Dots inside substituted values are therefore escaped too (`a.b` → `a=2Eb`),
//! so a value can never add or remove a key token; only the template's literal dots (and the
//! dots of `{subject}`) separate tokens, which keeps KV watches like `tenant.acme.>` exact.
//! Literal text may use `[-/_.A-Za-z0-9]` but not `=`, so [`unescape`] is unambiguous.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

use crate::decode::{ErrorCode, Event, Found, Poison, Unread};

/// The longest key a template may render, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as is.
    Literal(String),
    /// `{subject}`: the whole subject.
    Subject,
    /// `{subject.N}`: one subject token.
    SubjectToken(usize),
    /// `{data}` or `{data.PATH}`: a value inside the envelope's data.
    Data(Vec<String>),
    /// `{header.NAME}`: a message header.
    Header(String),
    /// `{FIELD}`: a top-level envelope field.
    Field(String),
}

/// A parsed key (or field) template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Why a template string is not a valid template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

/// What an event offers a template.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The NATS subject of the message.
    pub subject: &'a str,
    /// The message headers, when it has any.
    pub headers: Option<&'a async_nats::HeaderMap>,
    /// The decoded envelope.
    pub event: &'a Event,
}

/// A placeholder's value before it is rendered.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved<'a> {
    /// A JSON value from the envelope or its data (parsed from the data's text when only the
    /// text was kept).
    Json(Cow<'a, Value>),
    /// A string from the subject, a header, or (without escapes) the data's text.
    Text(Cow<'a, str>),
    /// The placeholder names something the event does not have (or a JSON null).
    Missing,
    /// The data's text does not parse where the placeholder reads it, with why.
    Invalid(String),
}

impl Template {
    /// Parses `source`; the error says what is wrong and where.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = source;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(TemplateError(format!(
                        "unmatched `}}` at byte {}",
                        source.len() - rest.len() + i
                    )));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(literal(&rest[..i])?);
                    }
                    let after = &rest[i + 1..];
                    let end = after.find('}').ok_or_else(|| {
                        TemplateError(format!(
                            "unclosed `{{` at byte {}",
                            source.len() - rest.len() + i
                        ))
                    })?;
                    parts.push(placeholder(&after[..end])?);
                    rest = &after[end + 1..];
                }
                None => {
                    parts.push(literal(rest)?);
                    rest = "";
                }
            }
        }
        if parts.is_empty() {
            return Err(TemplateError("template is empty".into()));
        }
        if !parts.iter().any(|p| !matches!(p, Part::Literal(_))) {
            return Err(TemplateError(
                "template has no placeholder: every event would share one key".into(),
            ));
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The parsed parts.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The single placeholder of a field reference such as `{data.epoch}`, or `None` when the
    /// template also has literal text or several placeholders.
    pub fn single_placeholder(&self) -> Option<&Part> {
        match self.parts.as_slice() {
            [part] if !matches!(part, Part::Literal(_)) => Some(part),
            _ => None,
        }
    }

    /// Renders the KV key of the event; the error is the poison verdict (`missing_key` or
    /// `bad_key`).
    pub fn render_key(&self, ctx: &Context<'_>) -> Result<String, Poison> {
        let mut key = String::with_capacity(32);
        for part in &self.parts {
            match part {
                Part::Literal(text) => key.push_str(text),
                Part::Subject => escape_subject_into(ctx.subject, &mut key),
                other => match resolve(other, ctx) {
                    Resolved::Missing => {
                        return Err(Poison::new(
                            ErrorCode::MissingKey,
                            format!(
                                "key template {}: {} is missing",
                                self.source,
                                describe(other)
                            ),
                        ));
                    }
                    Resolved::Invalid(why) => return Err(invalid_data(other, &why)),
                    Resolved::Text(text) => push_value(&text, other, &self.source, &mut key)?,
                    Resolved::Json(value) => {
                        let text = scalar_text(&value).ok_or_else(|| {
                            Poison::new(
                                ErrorCode::BadKey,
                                format!(
                                    "key template {}: {} is an object or array",
                                    self.source,
                                    describe(other)
                                ),
                            )
                        })?;
                        push_value(&text, other, &self.source, &mut key)?;
                    }
                },
            }
        }
        if let Err(why) = check_key(&key) {
            return Err(Poison::new(
                ErrorCode::BadKey,
                format!(
                    "key template {} rendered an invalid key: {why}",
                    self.source
                ),
            ));
        }
        Ok(key)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn push_value(text: &str, part: &Part, source: &str, key: &mut String) -> Result<(), Poison> {
    if text.is_empty() {
        return Err(Poison::new(
            ErrorCode::BadKey,
            format!("key template {source}: {} is empty", describe(part)),
        ));
    }
    escape_into(text, key);
    Ok(())
}

/// Resolves one placeholder against an event.
pub fn resolve<'a>(part: &Part, ctx: &Context<'a>) -> Resolved<'a> {
    match part {
        Part::Literal(text) => Resolved::Text(Cow::Owned(text.clone())),
        Part::Subject => Resolved::Text(Cow::Borrowed(ctx.subject)),
        Part::SubjectToken(n) => match ctx.subject.split('.').nth(*n) {
            Some(token) if !token.is_empty() => Resolved::Text(Cow::Borrowed(token)),
            _ => Resolved::Missing,
        },
        Part::Data(path) => match &ctx.event.raw_data {
            // Only the data's text was kept (`DataParse::Text`): it is read along the path.
            Some(text) => data_in_text(text.as_str(), path),
            None => json_at(&ctx.event.data, path),
        },
        Part::Field(name) => match ctx.event.envelope.get(name) {
            Some(value) => json_or_missing(value),
            None => Resolved::Missing,
        },
        Part::Header(name) => match ctx.headers.and_then(|h| h.get(name.as_str())) {
            Some(value) => Resolved::Text(Cow::Borrowed(value.as_str())),
            None => Resolved::Missing,
        },
    }
}

fn json_at<'a>(root: &'a Value, path: &[String]) -> Resolved<'a> {
    let mut current = root;
    for segment in path {
        let next = match current {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(value) => current = value,
            None => return Resolved::Missing,
        }
    }
    json_or_missing(current)
}

fn json_or_missing(value: &Value) -> Resolved<'_> {
    if value.is_null() {
        Resolved::Missing
    } else {
        Resolved::Json(Cow::Borrowed(value))
    }
}

/// What `path` gives in the data's compact JSON text, as [`json_at`] gives it in the parsed
/// data.
fn data_in_text<'a>(text: &'a str, path: &[String]) -> Resolved<'a> {
    let owned = |value: Option<Value>| match value {
        Some(value) if !value.is_null() => Resolved::Json(Cow::Owned(value)),
        _ => Resolved::Missing,
    };
    match crate::decode::data_at(text, path) {
        Ok(Found::Missing) => Resolved::Missing,
        Ok(Found::Str(s)) => Resolved::Text(Cow::Borrowed(s)),
        // Printed as the parsed number would be; an epoch parses it the same way.
        Ok(Found::Integer(n)) => Resolved::Text(Cow::Borrowed(n)),
        Ok(Found::Value(value)) => owned(Some(value)),
        // A key with escapes on the way (rare): the text is parsed.
        Err(Unread::EscapedKey) => match serde_json::from_str::<Value>(text) {
            Ok(root) => owned(crate::decode::data_take_at(root, path)),
            Err(e) => Resolved::Invalid(e.to_string()),
        },
        Err(Unread::Invalid(why)) => Resolved::Invalid(why),
    }
}

/// The key text of a scalar JSON value; `None` for objects and arrays.
fn scalar_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s.as_str())),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Null | Value::Object(_) | Value::Array(_) => None,
    }
}

/// The poison verdict for a placeholder whose place in the data's text does not parse
/// ([`Resolved::Invalid`]), wherever the placeholder is used.
pub fn invalid_data(part: &Part, why: &str) -> Poison {
    Poison::new(
        ErrorCode::InvalidJson,
        format!("data is not JSON at {}: {why}", describe(part)),
    )
}

/// How a placeholder is named in error messages.
pub fn describe(part: &Part) -> String {
    match part {
        Part::Literal(text) => format!("literal {text:?}"),
        Part::Subject => "{subject}".into(),
        Part::SubjectToken(n) => format!("{{subject.{n}}}"),
        Part::Data(path) if path.is_empty() => "{data}".into(),
        Part::Data(path) => format!("{{data.{}}}", path.join(".")),
        Part::Header(name) => format!("{{header.{name}}}"),
        Part::Field(name) => format!("{{{name}}}"),
    }
}

fn literal(text: &str) -> Result<Part, TemplateError> {
    if let Some(bad) = text.chars().find(|c| !is_literal_char(*c)) {
        return Err(TemplateError(format!(
            "literal text {text:?} has {bad:?}; literal text may use only [-/_.A-Za-z0-9]"
        )));
    }
    Ok(Part::Literal(text.to_owned()))
}

fn placeholder(inner: &str) -> Result<Part, TemplateError> {
    let bad = || TemplateError(format!("placeholder {{{inner}}} is not valid"));
    if inner.is_empty() || inner.contains('{') || inner.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    let (head, tail) = match inner.split_once('.') {
        Some((head, tail)) => (head, Some(tail)),
        None => (inner, None),
    };
    match (head, tail) {
        ("subject", None) => Ok(Part::Subject),
        ("subject", Some(n)) => n.parse::<usize>().map(Part::SubjectToken).map_err(|_| {
            TemplateError(format!(
                "{{subject.{n}}}: N must be a token index (0, 1, ...)"
            ))
        }),
        ("data", None) => Ok(Part::Data(Vec::new())),
        ("data", Some(path)) => {
            let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
            if segments.iter().any(String::is_empty) {
                return Err(TemplateError(format!(
                    "{{data.{path}}}: empty path segment"
                )));
            }
            Ok(Part::Data(segments))
        }
        ("header", Some(name)) if !name.is_empty() && !name.contains(':') => {
            Ok(Part::Header(name.to_owned()))
        }
        ("header", _) => Err(TemplateError("{header.NAME} needs a header name".into())),
        (field, None) => Ok(Part::Field(field.to_owned())),
        (_, Some(_)) => Err(TemplateError(format!(
            "placeholder {{{inner}}}: only subject., data. and header. take a path"
        ))),
    }
}

fn is_literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '.')
}

fn is_plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends `value` to `out`, escaping every byte outside `[A-Za-z0-9_/-]` as `=XX`.
pub fn escape_into(value: &str, out: &mut String) {
    for &b in value.as_bytes() {
        if is_plain_byte(b) {
            out.push(b as char);
        } else {
            out.push('=');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xF) as usize] as char);
        }
    }
}

/// Escapes a whole value (see [`escape_into`]).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    escape_into(value, &mut out);
    out
}

/// Appends a subject keeping its dots as token separators and escaping each token.
fn escape_subject_into(subject: &str, out: &mut String) {
    for (i, token) in subject.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        escape_into(token, out);
    }
}

/// Reverses the escaping: `=XX` back to its byte. Returns `None` for text that no template
/// could have produced (a dangling `=`, bad hex, invalid UTF-8).
pub fn unescape(key: &str) -> Option<String> {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hi = (hex[0] as char).to_digit(16)?;
            let lo = (hex[1] as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Checks the KV key rules: `[-/_=.A-Za-z0-9]+`, no leading, trailing or doubled dot, at most
/// [`MAX_KEY_LEN`] bytes.
pub fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty key");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("longer than 1024 bytes");
    }
    if key.starts_with('.') || key.ends_with('.') || key.contains("..") {
        return Err("empty token (leading, trailing or doubled dot)");
    }
    if !key
        .bytes()
        .all(|b| is_plain_byte(b) || b == b'.' || b == b'=')
    {
        return Err("character outside [-/_=.A-Za-z0-9]");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn event(data: Value) -> Event {
        Event::for_tests("evt-1", "order.updated", data)
    }

    fn render(template: &str, subject: &str, data: Value) -> Result<String, Poison> {
        let t = Template::parse(template).expect("template parses");
        let event = event(data);
        t.render_key(&Context {
            subject,
            headers: None,
            event: &event,
        })
    }

    #[test]
    fn parses_every_placeholder_kind() {
        let t = Template::parse("t.{subject.1}.{data.a.0}.{header.X-Id}.{id}.{subject}").unwrap();
        assert_eq!(
            t.parts(),
            &[
                Part::Literal("t.".into()),
                Part::SubjectToken(1),
                Part::Literal(".".into()),
                Part::Data(vec!["a".into(), "0".into()]),
                Part::Literal(".".into()),
                Part::Header("X-Id".into()),
                Part::Literal(".".into()),
                Part::Field("id".into()),
                Part::Literal(".".into()),
                Part::Subject,
            ]
        );
    }

    #[test]
    fn rejects_malformed_templates() {
        for bad in [
            "",
            "{",
            "}",
            "a}",
            "{data.}",
            "{data..x}",
            "{subject.x}",
            "{header.}",
            "{ id }",
            "lit",
            "a=b{id}",
            "a b{id}",
            "{id.x}",
            "{}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn renders_data_subject_and_envelope_fields() {
        let data = json!({"order_id": "ord-1", "n": 42, "items": [{"sku": "a.b"}], "ok": true});
        assert_eq!(
            render("{data.order_id}", "x", data.clone()).unwrap(),
            "ord-1"
        );
        assert_eq!(
            render("o.{data.n}.{data.ok}", "x", data.clone()).unwrap(),
            "o.42.true"
        );
        assert_eq!(
            render("{data.items.0.sku}", "x", data.clone()).unwrap(),
            "a=2Eb"
        );
        assert_eq!(
            render("{subject.2}", "orders.event.created", data.clone()).unwrap(),
            "created"
        );
        assert_eq!(render("k.{subject}", "a.b", data.clone()).unwrap(), "k.a.b");
        assert_eq!(
            render("{id}-{type}", "x", data).unwrap(),
            "evt-1-order=2Eupdated"
        );
    }

    #[test]
    fn missing_and_bad_values_are_poison() {
        let data = json!({"a": null, "o": {}, "e": ""});
        let code = |t: &str| render(t, "s", data.clone()).unwrap_err().code;
        assert_eq!(code("{data.nope}"), ErrorCode::MissingKey);
        assert_eq!(code("{data.a}"), ErrorCode::MissingKey);
        assert_eq!(code("{subject.5}"), ErrorCode::MissingKey);
        assert_eq!(code("{header.X}"), ErrorCode::MissingKey);
        assert_eq!(code("{data.o}"), ErrorCode::BadKey);
        assert_eq!(code("{data.e}"), ErrorCode::BadKey);
        let long = json!({"k": "x".repeat(MAX_KEY_LEN + 1)});
        assert_eq!(
            render("{data.k}", "s", long).unwrap_err().code,
            ErrorCode::BadKey
        );
    }

    #[test]
    fn headers_are_read() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("X-Tenant", "acme corp");
        let event = event(json!({}));
        let t = Template::parse("{header.X-Tenant}.x").unwrap();
        let key = t
            .render_key(&Context {
                subject: "s",
                headers: Some(&headers),
                event: &event,
            })
            .unwrap();
        assert_eq!(key, "acme=20corp.x");
        assert_eq!(unescape(&key).unwrap(), "acme corp.x");
    }

    #[test]
    fn single_placeholder_detects_field_references() {
        assert!(
            Template::parse("{data.epoch}")
                .unwrap()
                .single_placeholder()
                .is_some()
        );
        assert!(
            Template::parse("e{data.epoch}")
                .unwrap()
                .single_placeholder()
                .is_none()
        );
    }

    proptest! {
        #[test]
        fn escaping_is_reversible_and_always_valid(value in "\\PC{1,40}") {
            let escaped = escape(&value);
            prop_assert!(check_key(&escaped).is_ok());
            prop_assert!(!escaped.contains('.'));
            prop_assert_eq!(unescape(&escaped).unwrap(), value);
        }

        #[test]
        fn rendered_keys_are_valid_or_poison(value in "\\PC{0,20}", n in any::<i64>()) {
            let data = json!({"s": value, "n": n});
            match render("p.{data.s}.{data.n}", "a.b", data) {
                Ok(key) => prop_assert!(check_key(&key).is_ok()),
                Err(poison) => prop_assert_eq!(poison.code, ErrorCode::BadKey),
            }
        }
    }
}
