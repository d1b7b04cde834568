//! How much of an event's data decoding builds: the whole of it, only the fields the
//! projection reads (its templates' `{data.PATH}`s), or nothing but the data's JSON text for a
//! reducer that stores the data as it is (`latest`), its fields read from the text.
//!
//! Invariant: for every path of the [`PathTree`], looking it up in the partial value gives what
//! it gives in the whole value (the same value, or missing); fields on no path are checked for
//! syntax and skipped without allocating. Likewise [`at`] on the text.

use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The data fields a projection reads, as a tree of object keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathTree {
    /// The whole value at this node is read (a path ends here).
    whole: bool,
    /// The keys read below this node, each once (a short list: a key is looked up by length
    /// first, then bytes).
    children: Vec<(String, PathTree)>,
}

impl PathTree {
    /// The tree of these data paths (`["a", "b"]` for `{data.a.b}`; `[]` for `{data}`).
    pub fn of<'a>(paths: impl IntoIterator<Item = &'a [String]>) -> PathTree {
        let mut root = PathTree::default();
        for path in paths {
            let node = path.iter().fold(&mut root, |node, segment| {
                let at = match node.children.iter().position(|(k, _)| k == segment) {
                    Some(at) => at,
                    None => {
                        node.children.push((segment.clone(), PathTree::default()));
                        node.children.len() - 1
                    }
                };
                &mut node.children[at].1
            });
            node.whole = true;
        }
        root
    }

    /// Whether the whole data is read (`{data}`), so a partial parse would save nothing.
    pub fn is_whole(&self) -> bool {
        self.whole
    }

    fn child(&self, key: &str) -> Option<&PathTree> {
        self.children
            .iter()
            .find(|(k, _)| super::same_name(k, key))
            .map(|(_, child)| child)
    }
}

/// How a decoder parses an event's data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DataParse {
    /// The whole data into [`super::Event::data`] (merge and custom reducers read all of it).
    #[default]
    Full,
    /// Only the fields on these paths into [`super::Event::data`].
    Paths(PathTree),
    /// The data's text into [`super::Event::raw_data`] when it is compact (no whitespace
    /// between tokens), parsed for nothing: the templates read their fields from the text
    /// ([`at`]). Other data is parsed whole instead, so a state made of it stays compact.
    Text,
}

/// A JSON value's text, checked by the parser: what the `latest` reducer stores as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawJson(Box<str>);

impl RawJson {
    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The JSON text as bytes, without a copy.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0.into_boxed_bytes().into_vec()
    }

    pub(super) fn of(raw: &str) -> RawJson {
        RawJson(raw.into())
    }
}

/// Whether `text` has no whitespace between its tokens (whitespace inside strings is data).
pub(super) fn is_compact(text: &str) -> bool {
    let bytes = text.as_bytes();
    // Most data has no whitespace byte at all. JSON text has no raw byte below a space (control
    // characters are escaped in strings), so a byte at or below it is a whitespace byte; the
    // check runs a chunk at a time, which the compiler vectorizes.
    let blank = |b: &u8| *b <= b' ';
    let mut chunks = bytes.chunks_exact(32);
    let any_blank = chunks.any(|c| c.iter().fold(false, |seen, b| seen | blank(b)))
        || chunks.remainder().iter().any(blank);
    if !any_blank {
        return true;
    }
    let mut strings = super::Strings::default();
    !bytes
        .iter()
        .any(|&b| strings.outside(b) && matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
}

/// Parses one JSON value, building only what a [`PathTree`] reads.
pub(super) struct Partial<'a>(pub &'a PathTree);

impl<'de> DeserializeSeed<'de> for Partial<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
        if self.0.whole {
            Value::deserialize(de)
        } else {
            de.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Partial<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    // Array elements are looked up by index: the whole array is kept.
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        // Later duplicates win, as in a parsed `Value`.
        while let Some(key) = access.next_key_seed(Key)? {
            match self.0.child(key.as_ref()) {
                Some(child) => {
                    let value = access.next_value_seed(Partial(child))?;
                    map.insert(key.into_owned(), value);
                }
                None => {
                    access.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(map))
    }
}

/// What [`at`] finds at a path.
#[derive(Debug, Clone, PartialEq)]
pub enum Found<'t> {
    /// Nothing at the path.
    Missing,
    /// A string without escapes, borrowed from the text.
    Str(&'t str),
    /// An integer of at most 18 digits, borrowed from the text: exactly what the parsed
    /// number prints as (no `-0`, which parses to `-0.0`).
    Integer(&'t str),
    /// Any other value (a JSON `null` included), parsed.
    Value(Value),
}

/// Why [`at`] could not read a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unread {
    /// An object key on the way has escapes: the caller parses the text instead.
    EscapedKey,
    /// The value on the path does not parse (a number out of range, or text that was not
    /// checked JSON), with the parser's reason.
    Invalid(String),
}

/// The value at `path` in compact JSON text the parser has already checked (a `RawValue`), as
/// the parsed value gives it (later duplicates win; arrays are indexed by number), in one scan
/// that steps over everything off the path by its delimiters and parses only what the path
/// ends on.
///
/// Invariant: on checked compact text, a value found is the parsed value's, and a key with
/// escapes on the way is [`Unread::EscapedKey`] (property tested); on any other text it
/// returns without panicking.
pub fn at<'t>(text: &'t str, path: &[String]) -> Result<Found<'t>, Unread> {
    let mut scan = Scan { text, at: 0 };
    for (depth, segment) in path.iter().enumerate() {
        if scan.peek().ok_or_else(malformed)? != b'{' {
            // Not an object: an array (or a scalar) is parsed, and the rest looked up in it.
            let start = scan.at;
            scan.skip().ok_or_else(malformed)?;
            let value = parse(text.get(start..scan.at).ok_or_else(malformed)?)?;
            return Ok(take_at(value, &path[depth..]).map_or(Found::Missing, Found::Value));
        }
        match scan.member(segment)? {
            Some(value_at) => scan.at = value_at,
            None => return Ok(Found::Missing),
        }
    }
    let start = scan.at;
    if scan.peek() == Some(b'"') {
        let bytes = text.as_bytes();
        let end = quote_or_backslash(bytes, start + 1).ok_or_else(malformed)?;
        if bytes[end] == b'"' {
            return text
                .get(start + 1..end)
                .map(Found::Str)
                .ok_or_else(malformed);
        }
    }
    scan.skip().ok_or_else(malformed)?;
    let token = text.get(start..scan.at).ok_or_else(malformed)?;
    if is_short_integer(token) {
        return Ok(Found::Integer(token));
    }
    parse(token).map(Found::Value)
}

/// Whether `token` (a JSON value's text) is an integer that prints back as itself once parsed:
/// digits only after an optional minus, at most 18 of them (within `i64` either way), no `-0`.
fn is_short_integer(token: &str) -> bool {
    let digits = token.strip_prefix('-').unwrap_or(token);
    let bytes = digits.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 18
        && bytes.iter().all(u8::is_ascii_digit)
        // JSON allows a leading zero only alone; `-0` is the one to refuse.
        && (bytes[0] != b'0' || (bytes.len() == 1 && digits.len() == token.len()))
}

/// The value at `path` in `value`, taken out of it: objects by key, arrays by index.
pub fn take_at(value: Value, path: &[String]) -> Option<Value> {
    path.iter().try_fold(value, |value, segment| match value {
        Value::Object(mut map) => map.remove(segment),
        Value::Array(mut items) => segment
            .parse::<usize>()
            .ok()
            .filter(|&i| i < items.len())
            .map(|i| items.swap_remove(i)),
        _ => None,
    })
}

/// Text the scan cannot follow (not checked JSON).
fn malformed() -> Unread {
    Unread::Invalid("malformed JSON text".into())
}

fn parse(text: &str) -> Result<Value, Unread> {
    serde_json::from_str(text).map_err(|e| Unread::Invalid(e.to_string()))
}

/// A cursor over checked compact JSON text.
struct Scan<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// Steps over the object at the cursor; where its last member named `name` starts.
    fn member(&mut self, name: &str) -> Result<Option<usize>, Unread> {
        self.at += 1;
        if self.peek().ok_or_else(malformed)? == b'}' {
            self.at += 1;
            return Ok(None);
        }
        let mut found = None;
        loop {
            let key = self.key()?;
            if self.peek().ok_or_else(malformed)? != b':' {
                return Err(malformed());
            }
            self.at += 1;
            // Later duplicates win, as in a parsed `Value`.
            if super::same_name(key, name) {
                found = Some(self.at);
            }
            self.skip().ok_or_else(malformed)?;
            match self.peek().ok_or_else(malformed)? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Ok(found);
                }
                _ => return Err(malformed()),
            }
        }
    }

    /// An object key without escapes (its text is its name).
    fn key(&mut self) -> Result<&'a str, Unread> {
        if self.peek() != Some(b'"') {
            return Err(malformed());
        }
        let start = self.at + 1;
        let end = quote_or_backslash(self.text.as_bytes(), start).ok_or_else(malformed)?;
        if self.text.as_bytes()[end] != b'"' {
            return Err(Unread::EscapedKey);
        }
        self.at = end + 1;
        self.text.get(start..end).ok_or_else(malformed)
    }

    /// Steps over one value.
    fn skip(&mut self) -> Option<()> {
        let bytes = self.text.as_bytes();
        match *bytes.get(self.at)? {
            b'"' => self.at = string_end(bytes, self.at)?,
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match *bytes.get(self.at)? {
                        b'"' => {
                            self.at = string_end(bytes, self.at)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            // A number or a literal: up to the next delimiter.
            _ => {
                let rest = bytes.get(self.at..)?;
                self.at += rest
                    .iter()
                    .position(|b| matches!(b, b',' | b'}' | b']'))
                    .unwrap_or(rest.len());
            }
        }
        Some(())
    }
}

/// The index just past the string whose opening quote is at `open`.
fn string_end(bytes: &[u8], open: usize) -> Option<usize> {
    let mut at = open + 1;
    loop {
        at = quote_or_backslash(bytes, at)?;
        match bytes[at] {
            b'"' => return Some(at + 1),
            _ => at += 2,
        }
    }
}

/// The index of the first quote or backslash at or after `from`, sixteen bytes at a time (a
/// check the compiler vectorizes) up to the chunk that has one.
fn quote_or_backslash(bytes: &[u8], from: usize) -> Option<usize> {
    let hit = |b: &u8| *b == b'"' || *b == b'\\';
    let rest = bytes.get(from..)?;
    let mut chunks = rest.chunks_exact(16);
    let mut base = from;
    for chunk in chunks.by_ref() {
        if chunk.iter().fold(false, |seen, b| seen | hit(b)) {
            return chunk.iter().position(hit).map(|at| base + at);
        }
        base += 16;
    }
    chunks.remainder().iter().position(hit).map(|at| base + at)
}

/// An object key, borrowed from the payload when it has no escapes (serde's own
/// `Cow<str>` always allocates): envelopes and data are scanned key by key, and most keys are
/// only compared, never kept.
pub(crate) struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn paths(list: &[&[&str]]) -> PathTree {
        let owned: Vec<Vec<String>> = list
            .iter()
            .map(|p| p.iter().map(|s| s.to_string()).collect())
            .collect();
        PathTree::of(owned.iter().map(Vec::as_slice))
    }

    fn partial(tree: &PathTree, text: &str) -> Value {
        let mut de = serde_json::Deserializer::from_str(text);
        let value = Partial(tree).deserialize(&mut de).expect("valid JSON");
        de.end().expect("one value");
        value
    }

    fn lookup<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
        path.iter().try_fold(value, |v, s| match v {
            Value::Object(m) => m.get(*s),
            Value::Array(a) => s.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        })
    }

    #[test]
    fn keeps_only_the_fields_on_the_paths() {
        let tree = paths(&[&["k"], &["a", "b"]]);
        let got = partial(
            &tree,
            r#"{"k":7,"pad":"xxxx","a":{"b":[1,2],"c":{"d":1}},"z":{"k":1}}"#,
        );
        assert_eq!(got, json!({"k": 7, "a": {"b": [1, 2]}}));
    }

    #[test]
    fn later_duplicates_win_and_arrays_are_kept_whole() {
        let tree = paths(&[&["k"], &["l", "1"]]);
        let got = partial(&tree, r#"{"k":1,"l":[5,{"x":1}],"k":"two"}"#);
        assert_eq!(got, json!({"k": "two", "l": [5, {"x": 1}]}));
    }

    /// What [`at`] finds, as the parsed value would give it (`None`: an escaped key).
    fn scanned(text: &str, path: &[&str]) -> Option<Option<Value>> {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        match at(text, &path) {
            Ok(Found::Missing) => Some(None),
            Ok(Found::Str(s)) => Some(Some(Value::String(s.to_owned()))),
            Ok(Found::Integer(n)) => Some(Some(serde_json::from_str(n).unwrap())),
            Ok(Found::Value(v)) => Some(Some(v)),
            Err(Unread::EscapedKey) => None,
            Err(Unread::Invalid(why)) => panic!("{text}: {why}"),
        }
    }

    #[test]
    fn the_scan_agrees_with_the_parser_on_tricky_text() {
        let paths: [&[&str]; 8] = [
            &["k"],
            &["a", "b"],
            &["w"],
            &["l", "1"],
            &["l", "1", "x"],
            &["a", "1"],
            &["a"],
            &[],
        ];
        for text in [
            r#"{"k":1,"pad":"x","k":{"z":2}}"#,
            r#"{"a":{"b":1},"a":{"c":2}}"#,
            r#"{"s":"}]\"{[","k":"a\"b\\","a":{"b":[{"x":"]"},2]}}"#,
            r#"{"w":{"x":[1,{"y":null}]},"k":-1.5e3,"t":true,"f":false}"#,
            r#"{"a":[1,2],"k":null,"l":[5,{"x":1}]}"#,
            r#"{"k":"plain","l":"not an array"}"#,
            r#"{}"#,
            r#"[1,{"k":2}]"#,
            r#""text""#,
            r#"12"#,
        ] {
            let whole: Value = serde_json::from_str(text).unwrap();
            for path in paths {
                let got = scanned(text, path).expect("no escaped keys");
                assert_eq!(got.as_ref(), lookup(&whole, path), "{text} at {path:?}");
            }
        }
        // A key with escapes on the way is left to the parser; one off the path is not.
        assert_eq!(scanned(r#"{"\u006b":1}"#, &["k"]), None);
        assert_eq!(
            scanned(r#"{"k":{"\n":1},"j":2}"#, &["j"]),
            Some(Some(json!(2)))
        );
        // A string without escapes is borrowed.
        let k = vec!["k".to_owned()];
        assert_eq!(at(r#"{"k":"v"}"#, &k), Ok(Found::Str("v")));
        // A number the parser refuses is reported, not missing.
        assert!(matches!(at(r#"{"k":1e400}"#, &k), Err(Unread::Invalid(_))));
    }

    #[test]
    fn compact_text_is_told_from_text_with_whitespace_between_tokens() {
        assert!(is_compact(r#"{"a":"x y\n","b":[1,2]}"#));
        assert!(is_compact(r#"{"a":"say \" hi"}"#));
        assert!(!is_compact(r#"{"a": 1}"#));
        assert!(!is_compact("[1,\n2]"));
        assert!(!is_compact(r#"{"a":"\\" ,"b":1}"#));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_value_with_keys("[a-c0-2]")
    }

    fn json_value_with_keys(keys: &'static str) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-c \"\\\\]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(keys, inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn short_integers_are_those_that_print_back_as_written() {
        for yes in ["0", "7", "-7", "123456789012345678", "-123456789012345678"] {
            assert!(is_short_integer(yes), "{yes}");
        }
        for no in [
            "",
            "-",
            "-0",
            "01",
            "1.0",
            "1e2",
            "1234567890123456789",
            "+1",
            "\"1\"",
        ] {
            assert!(!is_short_integer(no), "{no}");
        }
    }

    proptest! {
        /// A short integer prints back, once parsed, exactly as written (what lets a key
        /// template borrow it from the text).
        #[test]
        fn short_integers_print_back(n in any::<i64>(), digits in "-?[0-9]{1,20}") {
            for token in [n.to_string(), digits] {
                if is_short_integer(&token) {
                    let parsed: Value = serde_json::from_str(&token).unwrap();
                    prop_assert_eq!(parsed.to_string(), token);
                }
            }
        }

        /// Compact serializations are compact; a pretty one is exactly when it is the same
        /// text (no container with members to indent), spaces inside strings included.
        #[test]
        fn compact_text_is_told_apart_at_any_length(value in json_value(), pad in 0usize..80) {
            let value = json!({"pad": " ".repeat(pad), "v": value});
            let compact = serde_json::to_string(&value).unwrap();
            prop_assert!(is_compact(&compact));
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            prop_assert_eq!(is_compact(&pretty), pretty == compact);
        }

        /// On compact text the scan finds what the parsed value holds, or leaves it to the
        /// parser (keys with escapes only).
        #[test]
        fn the_scan_finds_what_the_parser_finds(
            value in json_value_with_keys("[a-c0-2\"\\\\]"),
            path in prop::collection::vec("[a-c0-2\"\\\\]", 0..3),
        ) {
            let text = serde_json::to_string(&value).unwrap();
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            match scanned(&text, &path) {
                Some(found) => prop_assert_eq!(found.as_ref(), lookup(&value, &path)),
                None => prop_assert!(text.contains('\\'), "no escape in {}", text),
            }
        }

        /// Whatever the text, the scan returns.
        #[test]
        fn the_scan_never_panics(text in "[{}\\[\\]\":,a-c0-9\\\\ ]{0,40}") {
            for path in [&["a"][..], &["b", "c"], &[]] {
                let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
                let _ = at(&text, &path);
            }
        }

        #[test]
        fn every_path_reads_what_the_whole_value_gives(
            value in json_value(),
            wanted in prop::collection::vec(prop::collection::vec("[a-c0-2]", 0..3), 0..4),
        ) {
            let tree = PathTree::of(wanted.iter().map(Vec::as_slice));
            let text = serde_json::to_string(&value).unwrap();
            let got = partial(&tree, &text);
            for path in &wanted {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                prop_assert_eq!(lookup(&got, &path), lookup(&value, &path));
            }
        }
    }
}
