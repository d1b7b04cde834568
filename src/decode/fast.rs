//! The envelope in one scan of its bytes, for the common shape: a JSON object whose fields
//! decoding reads or keeps are strings without escapes, and whose data is kept as text
//! ([`DataParse::Text`], the `latest` reducer). Everything else is checked for syntax as the
//! parser checks it and stepped over without being built.
//!
//! Invariant: when [`envelope`] returns `Some`, what it filled is what the parser's pass
//! (`EnvelopeSeed` over `serde_json`) returns for the same payload. Whatever this scan does not
//! follow exactly (invalid UTF-8, an escape in a top-level name or in a string it would keep, a
//! kept or read field that is not a string, another data parse, any syntax error) returns
//! `None`, and the parser decides, errors included (property tested against it).

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::{Data, DataParse, Decoder, Field, Read, fill_slots, same_name};

/// Deepest nesting the scan follows (a bit per level); deeper data goes to the parser.
const MAX_LEVELS: usize = 128;

/// Fills `read`, `envelope` and `data` (fresh ones) as the parser's pass would for `payload`;
/// `None` where it declines, having filled them in part (see the module).
pub(super) fn envelope<'de>(
    decoder: &Decoder,
    data_field: &str,
    payload: &'de [u8],
    read: &mut Read<'de>,
    envelope: &mut Map<String, Value>,
    data: &mut Data<'de>,
) -> Option<()> {
    if !matches!(decoder.data, DataParse::Text) {
        return None;
    }
    // Once for the whole payload: every slice taken below, at ASCII delimiters, is then text.
    let text = std::str::from_utf8(payload).ok()?;
    let bytes = payload;
    let names = decoder.read_names();
    let mut at = whitespace(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    at = whitespace(bytes, at + 1);
    if bytes.get(at) == Some(&b'}') {
        at += 1;
    } else {
        loop {
            let (name, next) = plain_string(text, at)?;
            at = colon(bytes, next)?;
            let start = at;
            // Later duplicates win, as in the parser's pass.
            if same_name(name, data_field) {
                at = skip_value(bytes, at)?;
                *data = Data::Text(text.get(start..at)?);
            } else {
                let kept = decoder.keeps(name);
                let slot = names
                    .iter()
                    .position(|n| n.is_some_and(|n| same_name(n, name)));
                if slot.is_none() && !kept {
                    at = skip_value(bytes, at)?;
                } else {
                    let (value, next) = plain_string(text, at)?;
                    at = next;
                    let value = Field::Text(Cow::Borrowed(value));
                    match slot {
                        Some(slot) => {
                            let kept = kept.then_some(&mut *envelope);
                            fill_slots(&names, slot, read, kept, Cow::Borrowed(name), value);
                        }
                        None => {
                            envelope.insert(name.to_owned(), value.into_value());
                        }
                    }
                }
            }
            at = whitespace(bytes, at);
            match bytes.get(at) {
                Some(b',') => at = whitespace(bytes, at + 1),
                Some(b'}') => {
                    at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (whitespace(bytes, at) == bytes.len()).then_some(())
}

/// The index of the first byte at or after `at` that is not JSON whitespace.
fn whitespace(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = bytes.get(at) {
        at += 1;
    }
    at
}

/// Past the colon after an object key that ends at `at`, and the whitespace after it.
fn colon(bytes: &[u8], at: usize) -> Option<usize> {
    let at = whitespace(bytes, at);
    (bytes.get(at) == Some(&b':')).then(|| whitespace(bytes, at + 1))
}

/// The string opening at `at` when it has no escape (its text is its value), and the index
/// just past it; `None` for anything else (escapes are the parser's).
fn plain_string(text: &str, at: usize) -> Option<(&str, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let end = string_stop(bytes, at + 1)?;
    (bytes[end] == b'"').then_some(())?;
    Some((text.get(at + 1..end)?, end + 1))
}

/// The index of the first quote, backslash or control character (which JSON strings escape)
/// at or after `from`, eight bytes at a time.
fn string_stop(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of `word` below `n`: exact for the lowest such byte (a borrow
    // may flag bytes above it, never below), so the lowest flag of several masks is exact too.
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let mut at = from;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let found = below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            | below(word, 0x20);
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let stop = |b: &u8| (*b == b'"') | (*b == b'\\') | (*b < 0x20);
    bytes.get(at..)?.iter().position(stop).map(|i| at + i)
}

/// Past the string opening at `at`, its escapes checked as the parser checks them (any four
/// hex digits after `\u`); `None` if it is not a valid string.
fn skip_string(bytes: &[u8], at: usize) -> Option<usize> {
    let mut at = at + 1;
    loop {
        at = string_stop(bytes, at)?;
        match bytes[at] {
            b'"' => return Some(at + 1),
            b'\\' => match bytes.get(at + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at += 2,
                b'u' => {
                    let hex = bytes.get(at + 2..at + 6)?;
                    hex.iter().all(u8::is_ascii_hexdigit).then_some(())?;
                    at += 6;
                }
                _ => return None,
            },
            _ => return None,
        }
    }
}

/// Past the number starting at `at`, in JSON's grammar (`-`, then `0` alone or digits without
/// a leading zero, then an optional fraction and exponent, each with a digit at least).
fn skip_number(bytes: &[u8], mut at: usize) -> Option<usize> {
    let digits = |at: usize| {
        let run = bytes.get(at..).map_or(0, |rest| {
            rest.iter().take_while(|b| b.is_ascii_digit()).count()
        });
        (run > 0).then_some(at + run)
    };
    if bytes.get(at) == Some(&b'-') {
        at += 1;
    }
    at = match bytes.get(at)? {
        b'0' => at + 1,
        b'1'..=b'9' => digits(at)?,
        _ => return None,
    };
    if bytes.get(at) == Some(&b'.') {
        at = digits(at + 1)?;
    }
    if let Some(b'e' | b'E') = bytes.get(at) {
        at += 1;
        if let Some(b'+' | b'-') = bytes.get(at) {
            at += 1;
        }
        at = digits(at)?;
    }
    Some(at)
}

/// Past the object key starting at `at` (any valid string) and the colon after it.
fn skip_key(bytes: &[u8], at: usize) -> Option<usize> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    colon(bytes, skip_string(bytes, at)?)
}

/// Past the JSON value starting at `at`, checked as the parser checks a value it ignores;
/// `None` if it is not one (or nests deeper than [`MAX_LEVELS`]).
fn skip_value(bytes: &[u8], mut at: usize) -> Option<usize> {
    // Bit `level` set: the container open at that level is an object.
    let mut objects: u128 = 0;
    let mut levels = 0usize;
    loop {
        // A value starts at `at`.
        match *bytes.get(at)? {
            b'"' => at = skip_string(bytes, at)?,
            open @ (b'{' | b'[') => {
                if levels == MAX_LEVELS {
                    return None;
                }
                let object = open == b'{';
                objects = (objects & !(1 << levels)) | (u128::from(object) << levels);
                levels += 1;
                at = whitespace(bytes, at + 1);
                let close = if object { b'}' } else { b']' };
                if bytes.get(at) == Some(&close) {
                    levels -= 1;
                    at += 1;
                } else {
                    if object {
                        at = skip_key(bytes, at)?;
                    }
                    continue;
                }
            }
            b't' => at = literal(bytes, at, b"true")?,
            b'f' => at = literal(bytes, at, b"false")?,
            b'n' => at = literal(bytes, at, b"null")?,
            b'-' | b'0'..=b'9' => at = skip_number(bytes, at)?,
            _ => return None,
        }
        // After a value: close what ends here, or step to the next value.
        loop {
            if levels == 0 {
                return Some(at);
            }
            let object = objects & (1 << (levels - 1)) != 0;
            at = whitespace(bytes, at);
            match (bytes.get(at)?, object) {
                (b',', true) => {
                    at = skip_key(bytes, whitespace(bytes, at + 1))?;
                    break;
                }
                (b',', false) => {
                    at = whitespace(bytes, at + 1);
                    break;
                }
                (b'}', true) | (b']', false) => {
                    levels -= 1;
                    at += 1;
                }
                _ => return None,
            }
        }
    }
}

/// Past the literal `word` at `at`.
fn literal(bytes: &[u8], at: usize, word: &[u8]) -> Option<usize> {
    (bytes.get(at..at + word.len())? == word).then_some(at + word.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Format, Keep};
    use proptest::prelude::*;

    fn decoders() -> Vec<Decoder> {
        let text = |keep| Decoder {
            keep,
            data: DataParse::Text,
            ..Decoder::default()
        };
        let fields = crate::decode::FieldMap {
            id: "id".into(),
            event_type: "type".into(),
            // One field for two roles.
            version: Some("id".into()),
            data: "payload".into(),
            ..crate::decode::FieldMap::default()
        };
        vec![
            text(Keep::Only(vec!["subject".into()])),
            text(Keep::All),
            Decoder {
                format: Format::Fields(fields),
                ..text(Keep::Only(vec!["x".into(), "id".into()]))
            },
            // Not the fast path's (data parsed): the parser's pass alone.
            Decoder::default(),
        ]
    }

    fn taken(decoder: &Decoder, payload: &str) -> bool {
        scanned(decoder, payload.as_bytes())
    }

    fn scanned(decoder: &Decoder, payload: &[u8]) -> bool {
        let (mut read, mut map, mut data) =
            (Read::default(), Map::new(), Data::Parsed(Value::Null));
        envelope(decoder, "data", payload, &mut read, &mut map, &mut data).is_some()
    }

    #[test]
    fn the_common_shapes_take_the_scan() {
        let latest = &decoders()[0];
        for payload in [
            r#"{"specversion":"1.0","id":"e1","source":"bench","type":"upd","data":{"k":3456,"n":1,"amount":56,"ts":1796000000000000,"pad":"xxxx"}}"#,
            " {\n \"specversion\" : \"1.0\", \"id\":\"é1\",\"source\":\"s\",\"type\":\"t\",\t\"subject\":\"x\",\"data\":[1,-2.5e3,true,null,{\"a\\n\\u00e9\":\"b\\\"\"},[]] }\r\n",
            r#"{"specversion":"1.0","id":"e1","source":"s","type":"t","ext":{"n":[1,2]},"data":"text"}"#,
            r#"{}"#,
        ] {
            assert!(taken(latest, payload), "{payload}");
            assert_eq!(
                latest.decode_with(payload.as_bytes(), true),
                latest.decode_with(payload.as_bytes(), false)
            );
        }
        let event = latest.decode(br#"{"specversion":"1.0","id":"e1","source":"s","type":"t","subject":"x","data":{"k":1}}"#).unwrap();
        assert_eq!(
            event.raw_data.map(|r| r.as_str().to_owned()).as_deref(),
            Some(r#"{"k":1}"#)
        );
        assert_eq!(
            event.envelope.get("subject"),
            Some(&Value::String("x".into()))
        );
    }

    #[test]
    fn what_the_scan_does_not_follow_goes_to_the_parser() {
        let latest = &decoders()[0];
        for payload in [
            // An escape in a read string, in a name, a kept field that is not a string.
            r#"{"specversion":"1.0","id":"e\u0031","data":{}}"#,
            r#"{"spec\u0076ersion":"1.0","data":{}}"#,
            r#"{"subject":1,"data":{}}"#,
            // Syntax errors, anywhere.
            r#"{"id":"e1","data":{"a":01}}"#,
            r#"{"id":"e1","data":{"a":1,}}"#,
            r#"{"id":"e1","data":{"a":"\x"}}"#,
            r#"{"id":"e1","data":[1 2]}"#,
            r#"{"id":"e1","data":{"a":1}} x"#,
            r#"{"id":"e1",}"#,
            "{\"id\":\"e\u{1}\",\"data\":{}}",
            r#"[]"#,
        ] {
            assert!(!taken(latest, payload), "{payload}");
        }
        assert!(!scanned(latest, b"{\"id\":\"\xff\",\"data\":{}}"));
    }

    /// Pieces of JSON text, valid and not, that the generator strings together.
    fn string_piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "a",
            "k",
            "1.0",
            " ",
            "é",
            "\\n",
            "\\\"",
            "\\\\",
            "\\/",
            "\\u00e9",
            "\\ud800",
            "\\uZZ00",
            "\\x",
            "\\",
            "\u{1}",
            "\t",
            "\u{1f}",
            "\u{7f}",
            "abcdefgh\"",
        ])
    }

    fn string() -> impl Strategy<Value = String> {
        prop::collection::vec(string_piece(), 0..4).prop_map(|p| format!("\"{}\"", p.concat()))
    }

    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            string(),
            prop::sample::select(vec![
                "0", "-0", "12", "-3.5", "1e10", "1E+2", "2.5e-3", "01", "1.", "-", "1e", "00",
                ".5", "1.e3", "-01", "true", "false", "null", "tru", "nul", "nulll",
            ])
            .prop_map(String::from),
        ]
    }

    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", "", " ", "\n\t", "\r "])
    }

    fn value() -> impl Strategy<Value = String> {
        scalar().prop_recursive(4, 24, 4, |inner| {
            let member =
                (string(), ws(), inner.clone()).prop_map(|(k, w, v)| format!("{k}{w}:{v}"));
            prop_oneof![
                (prop::collection::vec(inner, 0..4), ws())
                    .prop_map(|(items, w)| format!("[{w}{}]", items.join(","))),
                (prop::collection::vec(member, 0..4), ws())
                    .prop_map(|(members, w)| format!("{{{}{w}}}", members.join(&format!(",{w}")))),
            ]
        })
    }

    fn name() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "specversion",
            "id",
            "source",
            "type",
            "data",
            "time",
            "subject",
            "correlationid",
            "dataversion",
            "data_base64",
            "payload",
            "x",
            "spec\\u0076ersion",
            "i\\u0064",
        ])
        .prop_map(|n| format!("\"{n}\""))
    }

    fn field() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            4 => prop::sample::select(vec!["\"1.0\"", "\"e1\"", "\"t\"", "\"\""]).prop_map(String::from),
            2 => string(),
            3 => value(),
        ];
        (name(), ws(), ws(), value).prop_map(|(n, a, b, v)| format!("{n}{a}:{b}{v}"))
    }

    fn envelope_text() -> impl Strategy<Value = Vec<u8>> {
        let object = (prop::collection::vec(field(), 0..9), ws(), ws())
            .prop_map(|(f, a, b)| format!("{a}{{{}}}{b}", f.join(",")).into_bytes());
        // Some envelopes get one byte changed, inserted or removed anywhere.
        let edit = prop::option::weighted(
            0.4,
            (
                any::<prop::sample::Index>(),
                0..3u8,
                prop::sample::select(b"\"\\{}[],: a0-.e\x01\xff\xc3".to_vec()),
            ),
        );
        (object, edit).prop_map(|(mut bytes, edit)| {
            if let Some((at, how, byte)) = edit {
                let at = at.index(bytes.len() + 1);
                match how {
                    0 => bytes.insert(at, byte),
                    1 if at < bytes.len() => bytes[at] = byte,
                    _ if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => bytes.push(byte),
                }
            }
            bytes
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// The scan's invariant: whatever it returns, the parser's pass returns too, poison
        /// and all (and everything it declines, the parser decides).
        #[test]
        fn the_scan_decodes_as_the_parser_does(payload in envelope_text()) {
            for decoder in decoders() {
                prop_assert_eq!(
                    decoder.decode_with(&payload, true),
                    decoder.decode_with(&payload, false)
                );
            }
        }
    }
}
