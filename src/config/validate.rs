//! Semantic checks of a parsed configuration; every problem names its TOML path.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use super::{Config, ProjectionConfig, ReducerKind};
use crate::dlq::DlqTemplate;
use crate::key::{Part, Template};

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The TOML path (`projection[0].batch`); empty for the whole file.
    pub path: String,
    /// What is wrong and what would be right.
    pub message: String,
}

impl Problem {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }

    /// One line per problem.
    pub fn list(problems: &[Problem]) -> String {
        problems
            .iter()
            .map(Problem::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

pub(super) fn validate(config: &Config, base: &Path) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut add = |path: String, message: String| problems.push(Problem::new(path, message));

    if let Some(url) = &config.nats.url {
        if url.split(',').any(|u| u.trim().is_empty()) {
            add("nats.url".into(), "empty URL in the list".into());
        }
    }
    if config.nats.user.is_some() != config.nats.password.is_some() {
        add("nats.user".into(), "user and password go together".into());
    }
    let files = [
        ("nats.creds_file", config.nats.creds_file.as_ref()),
        ("nats.nkey_seed_file", config.nats.nkey_seed_file.as_ref()),
        (
            "nats.tls.ca_file",
            config.nats.tls.as_ref().and_then(|t| t.ca_file.as_ref()),
        ),
        (
            "nats.tls.cert_file",
            config.nats.tls.as_ref().and_then(|t| t.cert_file.as_ref()),
        ),
        (
            "nats.tls.key_file",
            config.nats.tls.as_ref().and_then(|t| t.key_file.as_ref()),
        ),
    ];
    for (path, file) in files {
        if let Some(file) = file {
            let full = base.join(file);
            if !full.is_file() && !file.is_file() {
                add(
                    path.into(),
                    format!("file {} does not exist", file.display()),
                );
            }
        }
    }
    if let Some(tls) = &config.nats.tls {
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            add(
                "nats.tls.cert_file".into(),
                "cert_file and key_file go together".into(),
            );
        }
    }
    if config.store.path.as_os_str().is_empty() {
        add("store.path".into(), "must name the database file".into());
    }
    if config.store.cache_mib == 0 {
        add("store.cache_mib".into(), "must be at least 1".into());
    }
    if !config.http.listen.is_empty() && config.http.listen.parse::<SocketAddr>().is_err() {
        add(
            "http.listen".into(),
            format!(
                "{:?} is not an address like \"127.0.0.1:9464\"",
                config.http.listen
            ),
        );
    }
    if config.snapshots.keep == 0 {
        add("snapshots.keep".into(), "must be at least 1".into());
    }
    if !config.snapshots.interval.is_zero()
        && config.snapshots.interval < std::time::Duration::from_secs(1)
    {
        add(
            "snapshots.interval".into(),
            "must be \"0s\" (off) or at least 1s".into(),
        );
    }
    if let Some(bucket) = &config.snapshots.object_store {
        if bucket.is_empty()
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            add(
                "snapshots.object_store".into(),
                format!("{bucket:?} must match [a-zA-Z0-9_-]+"),
            );
        }
    }
    if config.projection.is_empty() {
        add(
            "projection".into(),
            "at least one [[projection]] is required".into(),
        );
    }

    let mut names = HashSet::new();
    let mut durables = HashSet::new();
    for (i, p) in config.projection.iter().enumerate() {
        let at = |field: &str| format!("projection[{i}].{field}");
        if !names.insert(p.name.as_str()) {
            add(
                at("name"),
                format!("{:?} is used by another projection", p.name),
            );
        }
        if !durables.insert((p.stream.clone(), p.durable_name())) {
            add(
                at("durable"),
                format!("{:?} is used by another projection", p.durable_name()),
            );
        }
        for (path, message) in check_projection(p) {
            add(at(&path), message);
        }
    }
    problems
}

fn check_projection(p: &ProjectionConfig) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut add = |path: &str, message: String| out.push((path.to_owned(), message));

    if p.name.is_empty()
        || !p
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        add("name", format!("{:?} must match [a-z0-9_-]+", p.name));
    }
    if p.version == 0 {
        add("version", "must be 1 or more".into());
    }
    if let Err(why) = check_jetstream_name(&p.stream) {
        add("stream", why);
    }
    if let Err(why) = check_jetstream_name(&p.durable_name()) {
        add("durable", why);
    }
    for (j, subject) in p.filter_subjects.iter().enumerate() {
        if let Err(why) = check_subject(subject, true) {
            add(&format!("filter_subjects[{j}]"), why);
        }
    }
    if let Err(err) = Template::parse(&p.key) {
        add("key", format!("{:?}: {err}", p.key));
    }
    match (&p.sum, p.reducer) {
        (Some(sum), ReducerKind::Counter) => match Template::parse(sum) {
            Ok(t) if matches!(t.single_placeholder(), Some(Part::Data(path)) if !path.is_empty()) =>
                {}
            _ => add(
                "sum",
                format!("{sum:?} must be one {{data.PATH}} placeholder"),
            ),
        },
        (Some(_), _) => add("sum", "only the counter reducer sums".into()),
        (None, _) => {}
    }
    if let Some(epoch) = &p.epoch {
        match Template::parse(epoch) {
            Ok(t) if t.single_placeholder().is_some() => {}
            _ => add(
                "epoch",
                format!("{epoch:?} must be one placeholder such as {{data.epoch}}"),
            ),
        }
    }
    for (j, event_type) in p.delete_on.iter().enumerate() {
        if event_type.is_empty() {
            add(&format!("delete_on[{j}]"), "empty event type".into());
        }
    }
    if let Some(bucket) = &p.kv_bucket {
        if bucket.is_empty()
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            add("kv_bucket", format!("{bucket:?} must match [a-zA-Z0-9_-]+"));
        }
    }
    if !(1..=5).contains(&p.kv_replicas) {
        add("kv_replicas", "must be between 1 and 5".into());
    }
    if !(1..=64).contains(&p.kv_history) {
        add("kv_history", "must be between 1 and 64".into());
    }
    if !(1..=100_000).contains(&p.batch) {
        add("batch", "must be between 1 and 100000".into());
    }
    if p.batch_bytes < 1024 {
        add("batch_bytes", "must be at least 1024".into());
    }
    if p.max_ack_pending < p.batch as i64 {
        add(
            "max_ack_pending",
            format!("must be at least batch ({}), or fetches stall", p.batch),
        );
    }
    if p.ack_wait < std::time::Duration::from_secs(1) {
        add("ack_wait", "must be at least 1s".into());
    }
    if p.max_deliver == 0 || p.max_deliver < -1 {
        add(
            "max_deliver",
            "must be 1 or more (or -1 for unlimited)".into(),
        );
    }
    if let Some(j) = p.backoff.iter().position(|d| d.is_zero()) {
        add(&format!("backoff[{j}]"), "must be more than 0s".into());
    }
    if let Err(err) = DlqTemplate::parse(&p.dlq_subject) {
        add("dlq_subject", format!("{:?}: {err}", p.dlq_subject));
    }
    if let Err(why) = check_jetstream_name(&p.dlq_stream) {
        add("dlq_stream", why);
    }
    if p.dlq_stream == p.stream {
        add(
            "dlq_stream",
            "must not be the projection's own stream".into(),
        );
    }
    if p.max_event_bytes == 0 {
        add("max_event_bytes", "must be at least 1".into());
    }
    if p.lag_sample_interval < std::time::Duration::from_millis(100) {
        add("lag_sample_interval", "must be at least 100ms".into());
    }
    if !(1..=128).contains(&p.max_depth) {
        add("max_depth", "must be between 1 and 128".into());
    }
    out
}

/// Stream and consumer names: printable, no spaces, dots, wildcards or path separators.
pub(crate) fn check_jetstream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 255 {
        return Err("must be at most 255 characters".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(format!(
            "{name:?} has {bad:?}; names may not use spaces, . * > / \\"
        ));
    }
    Ok(())
}

/// A NATS subject (wildcards only when `wildcards`).
pub(crate) fn check_subject(subject: &str, wildcards: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("empty subject".into());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!("{subject:?} has an empty token"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{subject:?} has whitespace"));
        }
        let wild = *token == "*" || *token == ">";
        if wild && !wildcards {
            return Err(format!("{subject:?} may not use wildcards"));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(format!("{subject:?}: > must be the last token"));
        }
        if !wild && (token.contains('*') || token.contains('>')) {
            return Err(format!("{subject:?}: wildcards must be whole tokens"));
        }
    }
    Ok(())
}
