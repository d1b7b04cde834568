//! How much of an event's data decoding builds: the whole of it, or only the fields the
//! projection reads (its templates' `{data.PATH}`s), plus the data's JSON text for a reducer
//! that stores the data as it is (`latest`).
//!
//! Invariant: for every path of the [`PathTree`], looking it up in the partial value gives what
//! it gives in the whole value (the same value, or missing); fields on no path are checked for
//! syntax and skipped without allocating.

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
    /// The fields on these paths, and the data's text into [`super::Event::raw_data`] when it
    /// is compact (no whitespace between tokens); other data is parsed whole instead, so a
    /// state made of it stays compact.
    PathsAndText(PathTree),
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

    pub(super) fn of(raw: &serde_json::value::RawValue) -> RawJson {
        RawJson(raw.get().into())
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

/// Picks the fields on `tree`'s paths out of compact JSON text the parser has already checked
/// (a `RawValue`): what [`Partial`] builds from it, in one scan that parses only the values on
/// the paths and steps over the rest by their delimiters. `None` where the scan does not apply
/// (an object key with escapes, anything unexpected): the caller then parses with [`Partial`].
///
/// Invariant: on checked compact text, `Some` is exactly what [`Partial`] gives (property
/// tested); on any other text it returns without panicking.
pub(super) fn pick(text: &str, tree: &PathTree) -> Option<Value> {
    let mut scan = Scan { text, at: 0 };
    let value = scan.value(tree)?;
    (scan.at == text.len()).then_some(value)
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

    /// The value at the cursor, along `tree` (as [`Partial`] builds it).
    fn value(&mut self, tree: &PathTree) -> Option<Value> {
        if tree.whole || self.peek()? != b'{' {
            let start = self.at;
            self.skip()?;
            return serde_json::from_str(self.text.get(start..self.at)?).ok();
        }
        self.at += 1;
        let mut map = Map::new();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(Value::Object(map));
        }
        loop {
            let key = self.key()?;
            if self.peek()? != b':' {
                return None;
            }
            self.at += 1;
            // Later duplicates win, as in a parsed `Value`.
            match tree.child(key) {
                Some(child) => {
                    let value = self.value(child)?;
                    map.insert(key.to_owned(), value);
                }
                None => self.skip()?,
            }
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(Value::Object(map));
                }
                _ => return None,
            }
        }
    }

    /// An object key without escapes (its text is its name).
    fn key(&mut self) -> Option<&'a str> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.at + 1;
        let end = quote_or_backslash(self.text.as_bytes(), start)?;
        if self.text.as_bytes()[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        self.text.get(start..end)
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

    fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
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

    #[test]
    fn the_scan_agrees_with_the_parser_on_tricky_text() {
        let tree = paths(&[&["k"], &["a", "b"], &["w"]]);
        for text in [
            r#"{"k":1,"pad":"x","k":{"z":2}}"#,
            r#"{"a":{"b":1},"a":{"c":2}}"#,
            r#"{"s":"}]\"{[","k":"a\"b\\","a":{"b":[{"x":"]"},2]}}"#,
            r#"{"w":{"x":[1,{"y":null}]},"k":-1.5e3,"t":true,"f":false}"#,
            r#"{"a":[1,2],"k":null}"#,
            r#"{}"#,
            r#"[1,{"k":2}]"#,
            r#""text""#,
            r#"12"#,
        ] {
            assert_eq!(pick(text, &tree), Some(partial(&tree, text)), "{text}");
        }
        // A key with escapes is left to the parser.
        assert_eq!(pick(r#"{"\u006b":1}"#, &tree), None);
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

    proptest! {
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

        /// On compact text the scan gives what the parser gives, or leaves it to the parser
        /// (keys with escapes only).
        #[test]
        fn the_scan_picks_what_the_parser_picks(
            value in json_value_with_keys("[a-c0-2\"\\\\]"),
            wanted in prop::collection::vec(prop::collection::vec("[a-c0-2\"\\\\]", 0..3), 0..4),
        ) {
            let tree = PathTree::of(wanted.iter().map(Vec::as_slice));
            let text = serde_json::to_string(&value).unwrap();
            match pick(&text, &tree) {
                Some(picked) => prop_assert_eq!(picked, partial(&tree, &text)),
                None => prop_assert!(text.contains('\\'), "no escape in {}", text),
            }
        }

        /// Whatever the text, the scan returns.
        #[test]
        fn the_scan_never_panics(text in "[{}\\[\\]\":,a-c0-9\\\\ ]{0,40}") {
            let tree = paths(&[&["a"], &["b", "c"]]);
            let _ = pick(&text, &tree);
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
                prop_assert_eq!(at(&got, &path), at(&value, &path));
            }
        }
    }
}
