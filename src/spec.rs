//! A `[[projection]]` compiled for the hot path: templates parsed once, reducer chosen, and the
//! pure step that turns one message into a keyed event ([`Spec::prepare`]).

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{EnvelopeFormat, ProjectionConfig, ReducerKind};
use crate::decode::{DataParse, Decoder, ErrorCode, Event, Format, Keep, PathTree, Poison};
use crate::dlq::DlqTemplate;
use crate::key::{self, Context, Part, Resolved, Template};
use crate::reduce::{Counter, Latest, Merge, Projection};

/// A message as the pure steps see it, whatever transport delivered it.
#[derive(Debug, Clone, Copy)]
pub struct MessageView<'a> {
    /// Stream sequence.
    pub seq: u64,
    /// NATS subject.
    pub subject: &'a str,
    /// Headers, when present.
    pub headers: Option<&'a async_nats::HeaderMap>,
    /// Payload bytes.
    pub payload: &'a [u8],
    /// Publish time in the stream, Unix milliseconds.
    pub publish_ms: u64,
}

/// A decoded event with its key, ready for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Stream sequence.
    pub seq: u64,
    /// Publish time in the stream, Unix milliseconds (the dedupe window's clock).
    pub publish_ms: u64,
    /// The (escaped) KV key.
    pub key: String,
    /// The fencing epoch, when the projection names one.
    pub epoch: Option<u64>,
    /// Whether the event type is in `delete_on`.
    pub delete: bool,
    /// The decoded envelope.
    pub event: Event,
}

/// A compiled projection.
#[derive(Clone)]
pub struct Spec {
    /// The configuration it was compiled from.
    pub config: ProjectionConfig,
    /// Store namespace (`name@vN`).
    pub namespace: String,
    /// The durable consumer name.
    pub durable: String,
    /// The key template.
    pub key: Template,
    /// The epoch placeholder, when configured.
    pub epoch: Option<Part>,
    /// Event types that delete their key.
    pub delete_on: HashSet<String>,
    /// The reducer.
    pub reducer: Arc<dyn Projection>,
    /// The envelope decoder.
    pub decoder: Decoder,
    /// The dedupe window in milliseconds of publish time (0: dedupe off).
    pub dedupe_window_ms: u64,
    /// The dead-letter subject template.
    pub dlq: DlqTemplate,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec")
            .field("namespace", &self.namespace)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Spec {
    /// Compiles a validated projection. `custom` is the reducer for `reducer = "custom"`.
    pub fn compile(
        config: &ProjectionConfig,
        custom: Option<Arc<dyn Projection>>,
    ) -> Result<Spec, String> {
        let key = Template::parse(&config.key).map_err(|e| format!("key: {e}"))?;
        let epoch = match &config.epoch {
            Some(text) => {
                let t = Template::parse(text).map_err(|e| format!("epoch: {e}"))?;
                Some(
                    t.single_placeholder()
                        .cloned()
                        .ok_or("epoch: must be one placeholder")?,
                )
            }
            None => None,
        };
        let mut sum_path = None;
        let reducer: Arc<dyn Projection> = match config.reducer {
            ReducerKind::Latest => Arc::new(Latest),
            ReducerKind::Merge => Arc::new(Merge),
            ReducerKind::Counter => {
                let sum = match &config.sum {
                    Some(text) => match Template::parse(text)
                        .ok()
                        .and_then(|t| t.single_placeholder().cloned())
                    {
                        Some(Part::Data(path)) => Some(path),
                        _ => return Err("sum: must be one {data.PATH} placeholder".into()),
                    },
                    None => None,
                };
                sum_path.clone_from(&sum);
                Arc::new(Counter { sum })
            }
            ReducerKind::Custom => custom.ok_or_else(|| {
                format!(
                    "projection {:?} uses reducer = \"custom\" but no Rust reducer is registered \
                     for it (see examples/custom_reducer.rs)",
                    config.name
                )
            })?,
        };
        let format = match config.envelope.format {
            EnvelopeFormat::Cloudevents => Format::CloudEvents,
            EnvelopeFormat::Fields => Format::Fields(config.envelope.field_map()),
        };
        let named = || key.parts().iter().chain(epoch.iter());
        // Built-in reducers read the data only: the envelope keeps what the templates name.
        let keep = if config.reducer == ReducerKind::Custom {
            Keep::All
        } else {
            Keep::Only(
                named()
                    .filter_map(|part| match part {
                        Part::Field(name) => Some(name.clone()),
                        _ => None,
                    })
                    .collect(),
            )
        };
        // What of the data is parsed: `merge` and custom reducers read all of it; `counter` the
        // templates' data fields and its sum field; `latest` the templates' fields, and stores
        // the data's text as it is.
        let data_paths = named().filter_map(|part| match part {
            Part::Data(path) => Some(path.as_slice()),
            _ => None,
        });
        let tree = PathTree::of(data_paths.chain(sum_path.as_deref()));
        let data = match config.reducer {
            ReducerKind::Merge | ReducerKind::Custom => DataParse::Full,
            _ if tree.is_whole() => DataParse::Full,
            ReducerKind::Latest => DataParse::Text,
            ReducerKind::Counter => DataParse::Paths(tree),
        };
        let dlq =
            DlqTemplate::parse(&config.dlq_subject).map_err(|e| format!("dlq_subject: {e}"))?;
        Ok(Spec {
            namespace: config.store_namespace(),
            durable: config.durable_name(),
            key,
            epoch,
            delete_on: config.delete_on.iter().cloned().collect(),
            reducer,
            decoder: Decoder {
                format,
                max_bytes: config.max_event_bytes,
                max_depth: config.max_depth,
                keep,
                data,
            },
            dedupe_window_ms: u64::try_from(config.dedupe_window.as_millis()).unwrap_or(u64::MAX),
            dlq,
            config: config.clone(),
        })
    }

    /// The projection name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The KV bucket this version writes: `kv_bucket` for version 1, `<kv_bucket>_v<N>` for
    /// version N >= 2, so that a rebuild never writes into the bucket readers use. Readers
    /// follow the alias of `kv_bucket` (see [`crate::alias`]).
    pub fn kv_bucket(&self) -> Option<String> {
        self.config
            .kv_bucket
            .as_ref()
            .map(|b| physical_bucket(b, self.config.version))
    }

    /// Decodes a message and computes its key and epoch. Pure: the same message always gives
    /// the same result, and every failure is a [`Poison`] with a fixed code.
    pub fn prepare(&self, msg: &MessageView<'_>) -> Result<Prepared, Poison> {
        let event = self.decoder.decode(msg.payload)?;
        let ctx = Context {
            subject: msg.subject,
            headers: msg.headers,
            event: &event,
        };
        let key = self.key.render_key(&ctx)?;
        let epoch = match &self.epoch {
            Some(part) => Some(epoch_of(part, &ctx)?),
            None => None,
        };
        let delete = self.delete_on.contains(&event.event_type);
        Ok(Prepared {
            seq: msg.seq,
            publish_ms: msg.publish_ms,
            key,
            epoch,
            delete,
            event,
        })
    }
}

/// The physical KV bucket of `version` of a projection whose configured bucket is `bucket`.
pub fn physical_bucket(bucket: &str, version: u32) -> String {
    if version <= 1 {
        bucket.to_owned()
    } else {
        format!("{bucket}_v{version}")
    }
}

fn epoch_of(part: &Part, ctx: &Context<'_>) -> Result<u64, Poison> {
    let bad = |what: &str| {
        Poison::new(
            ErrorCode::BadEpoch,
            format!("epoch {} {what}", key::describe(part)),
        )
    };
    match key::resolve(part, ctx) {
        Resolved::Missing => Err(bad("is missing")),
        Resolved::Invalid(why) => Err(key::invalid_data(part, &why)),
        Resolved::Json(value) => match value.as_ref() {
            Value::Number(n) => n.as_u64().ok_or_else(|| bad("is not an unsigned integer")),
            Value::String(s) => s.parse().map_err(|_| bad("is not an unsigned integer")),
            _ => Err(bad("is not an unsigned integer")),
        },
        Resolved::Text(text) => text.parse().map_err(|_| bad("is not an unsigned integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn compile(key: &str, reducer: &str, extra: &str) -> Spec {
        let toml = format!(
            "[[projection]]\nname = \"p\"\nstream = \"S\"\nkey = \"{key}\"\n\
             reducer = \"{reducer}\"\n{extra}"
        );
        let config = crate::config::Config::parse(&toml, Path::new(".")).expect("config parses");
        Spec::compile(&config.projection[0], None).expect("spec compiles")
    }

    fn prepare(spec: &Spec, payload: &[u8]) -> Prepared {
        let view = MessageView {
            seq: 1,
            subject: "s",
            headers: None,
            payload,
            publish_ms: 0,
        };
        spec.prepare(&view).expect("event decodes")
    }

    const EVENT: &[u8] = br#"{"specversion":"1.0","id":"e1","source":"s","type":"t",
        "data":{"k":"a","amount":5,"pad":"xx"}}"#;

    #[test]
    fn latest_keeps_the_text_and_its_templates_read_their_fields_from_it() {
        let spec = compile("{data.k}", "latest", "");
        let p = prepare(&spec, EVENT);
        assert_eq!(p.key, "a");
        assert_eq!(p.event.data, serde_json::Value::Null);
        let text = p.event.raw_data.expect("the data's text");
        assert_eq!(text.as_str(), r#"{"k":"a","amount":5,"pad":"xx"}"#);
    }

    /// The same templates over the text (`latest`) and over parsed data (`merge`).
    fn both(key: &str, extra: &str, data: &str) -> [Result<(String, Option<u64>), Poison>; 2] {
        let payload =
            format!(r#"{{"specversion":"1.0","id":"e1","source":"s","type":"t","data":{data}}}"#);
        ["latest", "merge"].map(|reducer| {
            let spec = compile(key, reducer, extra);
            let view = MessageView {
                seq: 1,
                subject: "s",
                headers: None,
                payload: payload.as_bytes(),
                publish_ms: 0,
            };
            spec.prepare(&view).map(|p| (p.key, p.epoch))
        })
    }

    #[test]
    fn templates_read_the_text_as_they_read_parsed_data() {
        let epoch = "epoch = \"{data.e}\"\n";
        for data in [
            r#"{"k":"a","e":3}"#,
            r#"{"k":5,"e":"7"}"#,
            r#"{"k":-1.5e3,"e":1}"#,
            r#"{"k":"a\"b","e":1,"k":"later"}"#,
            r#"{"n":{"k":"x"},"k":{"deep":1},"e":1}"#,
            r#"{"\u006b":"escaped key","e":2}"#,
            r#"{"k":"a","e":-1}"#,
            r#"{"k":"a","e":null}"#,
            r#"{"k":0,"e":0}"#,
            r#"{"k":-0,"e":1}"#,
            r#"{"k":1,"e":-0}"#,
            r#"{"k":-42,"e":18446744073709551615}"#,
            r#"{"k":123456789012345678,"e":123456789012345678}"#,
            r#"{"k":1234567890123456789,"e":1234567890123456789}"#,
            r#"{"k":-9223372036854775809,"e":1}"#,
            r#"{"k":12.0,"e":2.0}"#,
            r#"{"k":1e2,"e":1E2}"#,
            r#"{"e":1}"#,
            r#"[1,2]"#,
        ] {
            for key in ["{data.k}-{data.n.k}", "{data.k}"] {
                let [text, parsed] = both(key, epoch, data);
                match (&text, &parsed) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "{data}"),
                    (Err(a), Err(b)) => assert_eq!(a.code, b.code, "{data}: {a:?} / {b:?}"),
                    _ => panic!("{data}: {text:?} / {parsed:?}"),
                }
            }
        }
        let [text, _] = both("{data.k}", "", r#"{"k":"a\"b","n":1}"#);
        assert_eq!(text.expect("keyed").0, "a=22b");
        // A number serde_json refuses (out of range) poisons the event where a template reads
        // it, as parsing all of it does; elsewhere it is only stored.
        for data in [r#"{"k":1e400,"e":1}"#, r#"{"k":"a","e":1e400}"#] {
            let [text, parsed] = both("{data.k}", epoch, data);
            assert_eq!(
                text.expect_err("poison").code,
                ErrorCode::InvalidJson,
                "{data}"
            );
            assert_eq!(
                parsed.expect_err("poison").code,
                ErrorCode::InvalidJson,
                "{data}"
            );
        }
        let [text, _] = both("{data.k}", epoch, r#"{"k":"a","e":1,"x":1e400}"#);
        assert_eq!(text.expect("keyed"), ("a".to_owned(), Some(1)));
    }

    #[test]
    fn counter_parses_its_sum_field_and_keeps_no_text() {
        let spec = compile("{data.k}", "counter", "sum = \"{data.amount}\"\n");
        let p = prepare(&spec, EVENT);
        assert_eq!(p.event.data, serde_json::json!({"k": "a", "amount": 5}));
        assert_eq!(p.event.raw_data, None);
    }

    #[test]
    fn merge_and_a_whole_data_key_parse_all_of_it() {
        let whole = serde_json::json!({"k": "a", "amount": 5, "pad": "xx"});
        let spec = compile("{data.k}", "merge", "");
        let p = prepare(&spec, EVENT);
        assert_eq!((p.event.data, p.event.raw_data), (whole, None));
        // A key of the whole data (a scalar) needs all of it.
        let spec = compile("{data}", "latest", "");
        assert_eq!(spec.decoder.data, DataParse::Full);
    }
}
