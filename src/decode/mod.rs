//! Envelope decoding: message payload bytes → [`Event`], or a [`Poison`] verdict.
//!
//! Two envelope formats: CloudEvents 1.0 structured JSON (the default) and a field map for
//! other envelopes (`eventId`, `eventType`, `payload`, ...). Decoding is pure: it never touches
//! the network or the store, and every failure is a bounded [`ErrorCode`].

mod code;
mod data;
mod fast;

pub use code::{ErrorCode, Poison};
pub use data::{
    DataParse, Found, PathTree, RawJson, Unread, at as data_at, take_at as data_take_at,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The envelope id (`id` in CloudEvents).
    pub id: String,
    /// The event type (`type` in CloudEvents); `delete_on` matches it.
    pub event_type: String,
    /// The event (schema) version, when the envelope has one, as text.
    pub version: Option<String>,
    /// The event time as written in the envelope, when present.
    pub time: Option<String>,
    /// The idempotency key, when the envelope carries one apart from its id.
    pub idempotency_key: Option<String>,
    /// The correlation id from the envelope, when present.
    pub correlation_id: Option<String>,
    /// The event's data (`data` in CloudEvents); `null` when absent. With
    /// [`DataParse::Paths`], only the fields the projection reads; `null` while `raw_data`
    /// holds the data.
    pub data: Value,
    /// The data's JSON text as published, when the decoder keeps it ([`DataParse::Text`])
    /// and it is compact: then the data is only there (templates read it with [`data_at`]).
    pub raw_data: Option<RawJson>,
    /// The other top-level fields of the envelope, for `{FIELD}` templates and custom reducers
    /// (with [`Keep::Only`], only the fields it names).
    pub envelope: Map<String, Value>,
}

impl Event {
    /// The id that dedupe compares: the idempotency key when present, else the envelope id.
    pub fn dedupe_id(&self) -> &str {
        self.idempotency_key.as_deref().unwrap_or(&self.id)
    }

    /// A CloudEvents-like event for tests and examples.
    pub fn for_tests(id: &str, event_type: &str, data: Value) -> Event {
        let mut envelope = Map::new();
        envelope.insert("id".into(), Value::String(id.into()));
        envelope.insert("type".into(), Value::String(event_type.into()));
        envelope.insert("source".into(), Value::String("tests".into()));
        envelope.insert("specversion".into(), Value::String("1.0".into()));
        Event {
            id: id.into(),
            event_type: event_type.into(),
            version: None,
            time: None,
            idempotency_key: None,
            correlation_id: None,
            data,
            raw_data: None,
            envelope,
        }
    }
}

/// Where the fields of a non-CloudEvents envelope live (top-level field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FieldMap {
    /// The event id field (required in every event).
    pub id: String,
    /// The event type field (required in every event).
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event version field (integer or string), optional.
    pub version: Option<String>,
    /// The event time field, optional.
    pub time: Option<String>,
    /// The idempotency key field, optional; when present in an event it is what dedupe uses.
    pub idempotency_key: Option<String>,
    /// The data (payload) field; an event without it has `null` data.
    pub data: String,
    /// The correlation id field, optional.
    pub correlation_id: Option<String>,
}

impl Default for FieldMap {
    fn default() -> Self {
        FieldMap {
            id: "eventId".into(),
            event_type: "eventType".into(),
            version: Some("eventVersion".into()),
            time: Some("timestamp".into()),
            idempotency_key: Some("idempotencyKey".into()),
            data: "payload".into(),
            correlation_id: Some("correlationId".into()),
        }
    }
}

/// The envelope format of a projection's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// CloudEvents 1.0 structured mode (`id`, `type`, `source`, `specversion`, `data`...).
    CloudEvents,
    /// Any JSON object envelope described by a field map.
    Fields(FieldMap),
}

/// Decodes payloads of one projection.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The envelope format.
    pub format: Format,
    /// Payloads above this many bytes are `too_large`.
    pub max_bytes: usize,
    /// Payloads nesting deeper than this are `too_deep`.
    pub max_depth: usize,
    /// Which top-level fields [`Event::envelope`] keeps.
    pub keep: Keep,
    /// How much of the data is parsed.
    pub data: DataParse,
}

/// Which top-level envelope fields a decoded [`Event`] keeps in [`Event::envelope`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Keep {
    /// Every field but the data (custom reducers may read any).
    #[default]
    All,
    /// These (the fields the projection's templates name); the fields decoding reads go to
    /// the event's own fields, and the others are skipped while parsing, never allocated.
    Only(Vec<String>),
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            format: Format::CloudEvents,
            max_bytes: 1024 * 1024,
            max_depth: 64,
            keep: Keep::All,
            data: DataParse::Full,
        }
    }
}

impl Decoder {
    /// Decodes one payload.
    pub fn decode(&self, payload: &[u8]) -> Result<Event, Poison> {
        self.decode_with(payload, true)
    }

    /// Decodes one payload, the common shape by one scan first when `fast` (the same event
    /// or poison either way: [`fast`]'s invariant).
    fn decode_with(&self, payload: &[u8], fast: bool) -> Result<Event, Poison> {
        if payload.len() > self.max_bytes {
            return Err(Poison::new(
                ErrorCode::TooLarge,
                format!(
                    "payload is {} bytes, the limit is {}",
                    payload.len(),
                    self.max_bytes
                ),
            ));
        }
        // The depth is checked before parsing so hostile nesting never reaches the parser's
        // (or the reducer's) recursion.
        // Cheap bound first: no payload nests deeper than it has opening brackets (those in
        // strings counted too), and counting them vectorizes where the exact scan cannot.
        let depth = if openings(payload) > self.max_depth {
            nesting_depth(payload)
        } else {
            0
        };
        if depth > self.max_depth {
            return Err(Poison::new(
                ErrorCode::TooDeep,
                format!(
                    "payload nests {depth} levels deep, the limit is {}",
                    self.max_depth
                ),
            ));
        }
        let data_field = match &self.format {
            Format::CloudEvents => "data",
            Format::Fields(map) => &map.data,
        };
        let (mut read, mut envelope, mut data) =
            (Read::default(), Map::new(), Data::Parsed(Value::Null));
        // Filled in place (what the scan leaves when it declines is replaced whole).
        let scanned = fast
            && fast::envelope(
                self,
                data_field,
                payload,
                &mut read,
                &mut envelope,
                &mut data,
            )
            .is_some();
        if !scanned {
            (read, envelope, data) = self.parse_envelope(data_field, payload)?;
        }
        let (data, raw_data) = match data {
            Data::Parsed(value) => (value, None),
            Data::Text(raw) => {
                // The text is kept only when compact; other data is parsed whole, and a state
                // made of it is written compact.
                if data::is_compact(raw) {
                    (Value::Null, Some(RawJson::of(raw)))
                } else {
                    let value = serde_json::from_str(raw).map_err(|e| {
                        Poison::new(ErrorCode::InvalidJson, format!("data is not JSON: {e}"))
                    })?;
                    (value, None)
                }
            }
        };
        let mut event = match &self.format {
            Format::CloudEvents => cloudevent(read, envelope, data),
            Format::Fields(map) => mapped(read, envelope, data, map),
        }?;
        event.raw_data = raw_data;
        Ok(event)
    }

    /// The envelope by the parser's pass: the one pass that checks anything (see
    /// [`fast`] for the scan that takes the common shape first).
    fn parse_envelope<'de>(
        &self,
        data_field: &str,
        payload: &'de [u8],
    ) -> Result<(Read<'de>, Map<String, Value>, Data<'de>), Poison> {
        let seed = EnvelopeSeed {
            decoder: self,
            data_field,
        };
        let mut de = serde_json::Deserializer::from_slice(payload);
        match serde::de::DeserializeSeed::deserialize(seed, &mut de)
            .and_then(|parsed| de.end().map(|()| parsed))
        {
            Ok(parsed) => Ok(parsed),
            // The one-pass parse stops at the first surprise: a full syntax check tells valid
            // JSON of another type than an object from a syntax error anywhere (which wins).
            Err(err) => {
                let err = match serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
                    Ok(_) if err.is_data() => {
                        return Err(Poison::new(
                            ErrorCode::InvalidEnvelope,
                            "payload is not a JSON object",
                        ));
                    }
                    Ok(_) => err,
                    Err(syntax) => syntax,
                };
                Err(Poison::new(
                    ErrorCode::InvalidJson,
                    format!(
                        "payload is not JSON (line {}, column {})",
                        err.line(),
                        err.column()
                    ),
                ))
            }
        }
    }

    /// Whether the top-level field `name` is kept in [`Event::envelope`] ([`Decoder::keep`]).
    fn keeps(&self, name: &str) -> bool {
        match &self.keep {
            Keep::All => true,
            Keep::Only(fields) => fields.iter().any(|f| same_name(f, name)),
        }
    }

    /// The names of the envelope fields decoding reads, by slot (see [`Read`]).
    fn read_names(&self) -> [Option<&str>; READ_SLOTS] {
        match &self.format {
            Format::CloudEvents => CLOUDEVENT_FIELDS,
            Format::Fields(map) => [
                Some(map.id.as_str()),
                Some(map.event_type.as_str()),
                map.version.as_deref(),
                map.time.as_deref(),
                map.idempotency_key.as_deref(),
                map.correlation_id.as_deref(),
                None,
                None,
            ],
        }
    }
}

/// The CloudEvents attributes decoding reads (the data aside), in their slots' order.
const CLOUDEVENT_FIELDS: [Option<&str>; READ_SLOTS] = [
    Some("specversion"),
    Some("source"),
    Some("id"),
    Some("type"),
    Some("data_base64"),
    Some("time"),
    Some("correlationid"),
    Some("dataversion"),
];

const READ_SLOTS: usize = 8;

/// The envelope fields decoding reads, parsed apart from [`Event::envelope`] (no map entry, and
/// moved into the event instead of copied), by slot of [`Decoder::read_names`].
type Read<'de> = [Option<Field<'de>>; READ_SLOTS];

/// An envelope field decoding reads: a string borrowed from the payload where it has no
/// escapes (a field only checked, such as `specversion` or `source`, allocates nothing), or any
/// other JSON value.
#[derive(Debug, Clone)]
enum Field<'de> {
    /// A string.
    Text(std::borrow::Cow<'de, str>),
    /// Any other value.
    Other(Value),
}

impl Field<'_> {
    fn into_value(self) -> Value {
        match self {
            Field::Text(text) => Value::String(text.into_owned()),
            Field::Other(value) => value,
        }
    }
}

/// Parses a [`Field`].
struct FieldSeed;

impl<'de> serde::de::DeserializeSeed<'de> for FieldSeed {
    type Value = Field<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FieldSeed {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Text(std::borrow::Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::Text(std::borrow::Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Field::Text(std::borrow::Cow::Owned(v)))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Field::Other(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Field::Other(Value::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Field::Other(Value::Number(v.into())))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Field::Other(
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Other(Value::Null))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(Field::Other)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Value::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Field::Other)
    }
}

/// Parses an envelope object in one pass: its data field apart, the fields decoding reads into
/// their slots, those [`Decoder::keeps`] into a map, the rest checked for syntax and skipped
/// without allocating.
struct EnvelopeSeed<'a> {
    decoder: &'a Decoder,
    data_field: &'a str,
}

/// An envelope's data as the first pass leaves it.
enum Data<'de> {
    /// Parsed (whole or along the paths).
    Parsed(Value),
    /// Its text, to keep (as the parser checked it).
    Text(&'de str),
}

impl<'de, 'a> serde::de::DeserializeSeed<'de> for EnvelopeSeed<'a> {
    type Value = (Read<'de>, Map<String, Value>, Data<'de>);

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de, 'a> serde::de::Visitor<'de> for EnvelopeSeed<'a> {
    type Value = (Read<'de>, Map<String, Value>, Data<'de>);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut access: A,
    ) -> Result<Self::Value, A::Error> {
        let (mut envelope, mut data) = (Map::new(), Data::Parsed(Value::Null));
        let mut read = Read::default();
        let names = self.decoder.read_names();
        // Later duplicates win, as in a parsed `Value`.
        while let Some(name) = access.next_key_seed(data::Key)? {
            if same_name(&name, self.data_field) {
                data = match &self.decoder.data {
                    DataParse::Full => Data::Parsed(access.next_value()?),
                    DataParse::Paths(tree) => {
                        Data::Parsed(access.next_value_seed(data::Partial(tree))?)
                    }
                    DataParse::Text => {
                        Data::Text(access.next_value::<&serde_json::value::RawValue>()?.get())
                    }
                };
                continue;
            }
            let kept = self.decoder.keeps(&name);
            match names
                .iter()
                .position(|n| n.is_some_and(|n| same_name(n, &name)))
            {
                Some(slot) => {
                    let value = access.next_value_seed(FieldSeed)?;
                    let kept = kept.then_some(&mut envelope);
                    fill_slots(&names, slot, &mut read, kept, name, value);
                }
                None if kept => {
                    envelope.insert(name.into_owned(), access.next_value()?);
                }
                None => {
                    access.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok((read, envelope, data))
    }
}

/// Puts the value of the read field `name` in its `slot`, in the later slots that name it too
/// (a field map may name one field for two roles), and in `kept` (the envelope map) if given.
fn fill_slots<'de>(
    names: &[Option<&str>; READ_SLOTS],
    slot: usize,
    read: &mut Read<'de>,
    kept: Option<&mut Map<String, Value>>,
    name: std::borrow::Cow<'_, str>,
    value: Field<'de>,
) {
    for (other, n) in names.iter().enumerate().skip(slot + 1) {
        if n.is_some_and(|n| same_name(n, &name)) {
            read[other] = Some(value.clone());
        }
    }
    if let Some(envelope) = kept {
        envelope.insert(name.into_owned(), value.clone().into_value());
    }
    read[slot] = Some(value);
}

/// Field-name equality compared in line: names are short, and `==` on strings of equal length
/// calls the C library's `memcmp`, which cost more than the comparison (a sixth of decoding
/// the bench's events, in profiles).
#[inline]
pub(crate) fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

fn cloudevent(read: Read<'_>, envelope: Map<String, Value>, data: Value) -> Result<Event, Poison> {
    let [
        specversion,
        source,
        id,
        event_type,
        data_base64,
        time,
        correlation_id,
        version,
    ] = read;
    let specversion = required_text(specversion, "specversion")?;
    if specversion != "1.0" {
        return Err(Poison::new(
            ErrorCode::InvalidEnvelope,
            format!("specversion is {specversion:?}, expected \"1.0\""),
        ));
    }
    required_text(source, "source")?;
    let id = required_string(id, "id")?;
    let event_type = required_string(event_type, "type")?;
    if data_base64.is_some() {
        return Err(Poison::new(
            ErrorCode::InvalidEnvelope,
            "data_base64 (binary data) cannot be projected into JSON state",
        ));
    }
    let time = optional_string(time, "time")?;
    let correlation_id = optional_string(correlation_id, "correlationid")?;
    let version = optional_text(version, "dataversion")?;
    Ok(Event {
        id,
        event_type,
        version,
        time,
        idempotency_key: None,
        correlation_id,
        data,
        raw_data: None,
        envelope,
    })
}

fn mapped(
    read: Read<'_>,
    envelope: Map<String, Value>,
    data: Value,
    map: &FieldMap,
) -> Result<Event, Poison> {
    let [
        id,
        event_type,
        version,
        time,
        idempotency_key,
        correlation_id,
        ..,
    ] = read;
    let id = required_string(id, &map.id)?;
    let event_type = required_string(event_type, &map.event_type)?;
    // A slot of a field the map does not name stays empty.
    let optional = |value: Option<Field<'_>>, field: &Option<String>| {
        optional_text(value, field.as_deref().unwrap_or_default())
    };
    let version = optional(version, &map.version)?;
    let time = optional(time, &map.time)?;
    let idempotency_key = optional(idempotency_key, &map.idempotency_key)?;
    let correlation_id = optional(correlation_id, &map.correlation_id)?;
    Ok(Event {
        id,
        event_type,
        version,
        time,
        idempotency_key,
        correlation_id,
        data,
        raw_data: None,
        envelope,
    })
}

fn required_string(value: Option<Field<'_>>, field: &str) -> Result<String, Poison> {
    required_text(value, field).map(std::borrow::Cow::into_owned)
}

/// A required string field, borrowed where the payload allows.
fn required_text<'de>(
    value: Option<Field<'de>>,
    field: &str,
) -> Result<std::borrow::Cow<'de, str>, Poison> {
    match value {
        Some(Field::Text(s)) if !s.is_empty() => Ok(s),
        Some(Field::Text(_)) => Err(Poison::new(
            ErrorCode::InvalidEnvelope,
            format!("envelope field {field:?} is empty"),
        )),
        Some(Field::Other(_)) => Err(Poison::new(
            ErrorCode::InvalidEnvelope,
            format!("envelope field {field:?} is not a string"),
        )),
        None => Err(Poison::new(
            ErrorCode::InvalidEnvelope,
            format!("envelope field {field:?} is missing"),
        )),
    }
}

fn optional_string(value: Option<Field<'_>>, field: &str) -> Result<Option<String>, Poison> {
    match value {
        None | Some(Field::Other(Value::Null)) => Ok(None),
        Some(Field::Text(s)) => Ok(Some(s.into_owned())),
        Some(Field::Other(_)) => Err(Poison::new(
            ErrorCode::InvalidEnvelope,
            format!("envelope field {field:?} is not a string"),
        )),
    }
}

/// A string or a number (event versions are either), as text.
fn optional_text(value: Option<Field<'_>>, field: &str) -> Result<Option<String>, Poison> {
    match value {
        Some(Field::Other(Value::Number(n))) => Ok(Some(n.to_string())),
        value => optional_string(value, field),
    }
}

/// The correlation id of a message: the `X-Correlation-Id` header, else the trace id of a W3C
/// `traceparent` header, else the envelope's correlation id.
pub fn correlation_id(
    headers: Option<&async_nats::HeaderMap>,
    event: Option<&Event>,
) -> Option<String> {
    if let Some(h) = headers {
        if let Some(v) = h.get("X-Correlation-Id") {
            return Some(v.as_str().to_owned());
        }
        if let Some(trace_id) = h
            .get("traceparent")
            .and_then(|v| v.as_str().split('-').nth(1).map(str::to_owned))
        {
            return Some(trace_id);
        }
    }
    event.and_then(|e| e.correlation_id.clone())
}

/// The opening brackets (`{` and `[`) of a payload, strings included: a bound on its depth.
fn openings(bytes: &[u8]) -> usize {
    let is_opening = |b: &u8| *b == b'{' || *b == b'[';
    // Counted in bytes per chunk of 64 (no overflow): the compiler vectorizes that loop
    // 32 bytes at a time, where a word-sized count moved 2 bytes a step.
    let mut chunks = bytes.chunks_exact(64);
    let mut count = 0usize;
    for chunk in &mut chunks {
        count += usize::from(chunk.iter().fold(0u8, |n, b| n + u8::from(is_opening(b))));
    }
    count + chunks.remainder().iter().filter(|b| is_opening(b)).count()
}

/// Where a scan of JSON text is: inside a string or not (quotes and escapes followed).
#[derive(Default)]
struct Strings {
    in_string: bool,
    escaped: bool,
}

impl Strings {
    /// Steps over `b`: whether it is outside every string (a quote that opens or closes one,
    /// or any byte within one, is not).
    fn outside(&mut self, b: u8) -> bool {
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return false;
        }
        if b == b'"' {
            self.in_string = true;
            return false;
        }
        true
    }
}

/// The deepest nesting of JSON arrays and objects in `bytes`, ignoring brackets inside strings.
/// Runs on raw bytes, so it is safe on any input, JSON or not.
pub fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut strings = Strings::default();
    for &b in bytes {
        if !strings.outside(b) {
            continue;
        }
        match b {
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn ce(extra: Value) -> Vec<u8> {
        let mut base = json!({"specversion": "1.0", "id": "e1", "source": "s", "type": "t"});
        if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
            b.extend(e);
        }
        serde_json::to_vec(&base).unwrap()
    }

    fn code(decoder: &Decoder, payload: &[u8]) -> ErrorCode {
        decoder.decode(payload).unwrap_err().code
    }

    #[test]
    fn decodes_a_cloudevent() {
        let payload = ce(json!({"data": {"a": 1}, "time": "2026-01-01T00:00:00Z",
            "correlationid": "c1", "subject": "x"}));
        let event = Decoder::default().decode(&payload).unwrap();
        assert_eq!(event.id, "e1");
        assert_eq!(event.event_type, "t");
        assert_eq!(event.data, json!({"a": 1}));
        assert_eq!(event.time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(event.correlation_id.as_deref(), Some("c1"));
        assert_eq!(event.envelope.get("subject"), Some(&json!("x")));
        assert!(!event.envelope.contains_key("data"));
        assert_eq!(event.dedupe_id(), "e1");
    }

    #[test]
    fn escaped_envelope_strings_and_keys_decode_to_their_text() {
        let payload = br#"{"spec\u0076ersion":"1\u002e0","id":"e\"1","source":"s\\",
            "type":"t","subject":"a\nb","data":{"k\u0031":"v"}}"#;
        let event = Decoder::default().decode(payload).unwrap();
        assert_eq!(event.id, "e\"1");
        assert_eq!(event.envelope.get("subject"), Some(&json!("a\nb")));
        assert_eq!(event.envelope.get("source"), Some(&json!("s\\")));
        assert_eq!(event.data, json!({"k1": "v"}));
        let wrong = br#"{"specversion":"1\u002e1","id":"e","source":"s","type":"t"}"#;
        assert_eq!(code(&Decoder::default(), wrong), ErrorCode::InvalidEnvelope);
    }

    #[test]
    fn cloudevent_without_data_has_null_data() {
        let event = Decoder::default().decode(&ce(json!({}))).unwrap();
        assert_eq!(event.data, Value::Null);
    }

    #[test]
    fn rejects_bad_payloads_with_fixed_codes() {
        let d = Decoder::default();
        assert_eq!(code(&d, b"{not json"), ErrorCode::InvalidJson);
        assert_eq!(code(&d, b"\xff\xfe"), ErrorCode::InvalidJson);
        assert_eq!(code(&d, b""), ErrorCode::InvalidJson);
        assert_eq!(code(&d, b"[1,2]"), ErrorCode::InvalidEnvelope);
        assert_eq!(code(&d, b"{\"id\":\"x\"}"), ErrorCode::InvalidEnvelope);
        assert_eq!(
            code(&d, &ce(json!({"specversion": "0.3"}))),
            ErrorCode::InvalidEnvelope
        );
        assert_eq!(code(&d, &ce(json!({"id": 5}))), ErrorCode::InvalidEnvelope);
        assert_eq!(code(&d, &ce(json!({"id": ""}))), ErrorCode::InvalidEnvelope);
        assert_eq!(
            code(&d, &ce(json!({"data_base64": "AA=="}))),
            ErrorCode::InvalidEnvelope
        );
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(code(&d, deep.as_bytes()), ErrorCode::TooDeep);
        let small = Decoder {
            max_bytes: 10,
            ..Decoder::default()
        };
        assert_eq!(code(&small, &ce(json!({}))), ErrorCode::TooLarge);
    }

    #[test]
    fn hostile_nesting_of_a_million_levels_is_refused_without_recursion() {
        let deep = "{\"a\":".repeat(1_000_000);
        let unlimited = Decoder {
            max_bytes: usize::MAX,
            ..Decoder::default()
        };
        assert_eq!(code(&unlimited, deep.as_bytes()), ErrorCode::TooDeep);
    }

    #[test]
    fn decodes_a_mapped_envelope() {
        let decoder = Decoder {
            format: Format::Fields(FieldMap::default()),
            ..Decoder::default()
        };
        let payload = json!({"eventId": "a1", "eventType": "order.placed", "eventVersion": 2,
            "timestamp": "t", "idempotencyKey": "k1", "payload": {"x": 1}, "tenant": "acme"});
        let event = decoder
            .decode(&serde_json::to_vec(&payload).unwrap())
            .unwrap();
        assert_eq!(event.id, "a1");
        assert_eq!(event.version.as_deref(), Some("2"));
        assert_eq!(event.dedupe_id(), "k1");
        assert_eq!(event.data, json!({"x": 1}));
        assert_eq!(event.envelope.get("tenant"), Some(&json!("acme")));
        let missing = json!({"eventType": "t"});
        assert_eq!(
            code(&decoder, &serde_json::to_vec(&missing).unwrap()),
            ErrorCode::InvalidEnvelope
        );
    }

    #[test]
    fn one_field_may_fill_two_roles_and_be_kept() {
        let decoder = Decoder {
            format: Format::Fields(FieldMap {
                idempotency_key: Some("eventId".into()),
                ..FieldMap::default()
            }),
            keep: Keep::Only(vec!["eventId".into()]),
            ..Decoder::default()
        };
        let event = decoder
            .decode(br#"{"eventId":"a1","eventType":"t"}"#)
            .unwrap();
        assert_eq!((event.id.as_str(), event.dedupe_id()), ("a1", "a1"));
        assert_eq!(event.envelope.get("eventId"), Some(&json!("a1")));
        let later_wins = br#"{"eventId":"a1","eventType":"t","eventId":"a2"}"#;
        let event = decoder.decode(later_wins).unwrap();
        assert_eq!((event.id.as_str(), event.dedupe_id()), ("a2", "a2"));
        assert_eq!(event.envelope.get("eventId"), Some(&json!("a2")));
        // Fields read but not named by a template are not kept.
        assert!(!event.envelope.contains_key("eventType"));
    }

    fn paths(list: &[&str]) -> PathTree {
        let owned: Vec<Vec<String>> = list.iter().map(|p| vec![p.to_string()]).collect();
        PathTree::of(owned.iter().map(Vec::as_slice))
    }

    /// A decoder as `latest` has.
    fn text_decoder() -> Decoder {
        Decoder {
            data: DataParse::Text,
            ..Decoder::default()
        }
    }

    #[test]
    fn compact_data_keeps_its_text_and_nothing_parsed() {
        let decoder = text_decoder();
        let payload = br#"{"specversion":"1.0","id":"e1","source":"s","type":"t",
            "data":{"z":"a b","k":7,"pad":[1,2]}}"#;
        let event = decoder.decode(payload).unwrap();
        assert_eq!(event.data, Value::Null);
        let text = event.raw_data.expect("compact data keeps its text");
        assert_eq!(text.as_str(), r#"{"z":"a b","k":7,"pad":[1,2]}"#);
    }

    #[test]
    fn data_with_whitespace_is_parsed_whole_and_keeps_no_text() {
        let decoder = text_decoder();
        let payload = br#"{"specversion":"1.0","id":"e1","source":"s","type":"t",
            "data": {"z": 1, "k": 7}}"#;
        let event = decoder.decode(payload).unwrap();
        assert_eq!(event.data, json!({"z": 1, "k": 7}));
        assert_eq!(event.raw_data, None);
        let counter = Decoder {
            data: DataParse::Paths(paths(&["amount"])),
            ..Decoder::default()
        };
        let event = counter.decode(payload).unwrap();
        assert_eq!((event.data, event.raw_data), (json!({}), None));
    }

    #[test]
    fn correlation_ids_prefer_the_header_then_traceparent_then_the_envelope() {
        let mut event = Event::for_tests("e", "t", Value::Null);
        event.correlation_id = Some("from-envelope".into());
        assert_eq!(
            correlation_id(None, Some(&event)).as_deref(),
            Some("from-envelope")
        );
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        assert_eq!(
            correlation_id(Some(&h), Some(&event)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        h.insert("X-Correlation-Id", "c-1");
        assert_eq!(
            correlation_id(Some(&h), Some(&event)).as_deref(),
            Some("c-1")
        );
        assert_eq!(correlation_id(None, None), None);
    }

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(nesting_depth(br#"{"a":"[[[[{{{{\"]]"}"#), 1);
        assert_eq!(nesting_depth(br#"[[{"a":[1]}]]"#), 4);
        assert_eq!(nesting_depth(b"42"), 0);
    }

    proptest! {
        /// In-line name comparison is string equality (lengths, prefixes, non-ASCII).
        #[test]
        fn same_name_is_equality(a in "[a-dé]{0,6}", b in "[a-dé]{0,6}") {
            prop_assert_eq!(same_name(&a, &b), a == b);
            prop_assert!(same_name(&a, &a.clone()));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Decoder::default().decode(&bytes);
        }

        /// The cheap bound never lets a deep payload through: it is at least the depth.
        #[test]
        fn openings_bound_the_depth(
            bytes in proptest::collection::vec(
                prop::sample::select(b"{}[]\"\\a1,:".to_vec()), 0..300),
        ) {
            prop_assert!(openings(&bytes) >= nesting_depth(&bytes));
        }

        /// The chunked count is the plain count, chunk boundaries included.
        #[test]
        fn openings_count_every_opening_bracket(
            bytes in proptest::collection::vec(prop::sample::select(b"{[a]}".to_vec()), 0..300),
        ) {
            let plain = bytes.iter().filter(|&&b| b == b'{' || b == b'[').count();
            prop_assert_eq!(openings(&bytes), plain);
        }

        #[test]
        fn depth_matches_serde_for_valid_json(depth in 0usize..40) {
            let doc = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            prop_assert_eq!(nesting_depth(doc.as_bytes()), depth);
            let parsed: Result<Value, _> = serde_json::from_str(&doc);
            prop_assert!(parsed.is_ok());
        }
    }
}
