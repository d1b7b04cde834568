//! The dead-letter subject template (`dlq.{subject}`).

use crate::config::validate_subject;

/// A parsed `dlq_subject`: literal tokens plus `{projection}`, `{stream}` and, as the last
/// token(s), `{subject}` (the original subject).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqTemplate {
    source: String,
}

/// Why a `dlq_subject` is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DlqTemplateError(String);

impl DlqTemplate {
    /// Parses and checks a template.
    pub fn parse(source: &str) -> Result<DlqTemplate, DlqTemplateError> {
        let err = |m: &str| Err(DlqTemplateError(m.to_owned()));
        let count = source.matches("{subject}").count();
        if count > 1 {
            return err("{subject} may appear once");
        }
        if count == 1 && !(source == "{subject}" || source.ends_with(".{subject}")) {
            return err("{subject} must be the last token(s), as in dlq.{subject}");
        }
        if count == 0 {
            return err("must contain {subject}, so dead letters keep their original subject");
        }
        let probe = source
            .replace("{subject}", "x")
            .replace("{projection}", "p")
            .replace("{stream}", "s");
        if probe.contains(['{', '}']) {
            return err("only {subject}, {projection} and {stream} are placeholders");
        }
        if source == "{subject}" {
            return err(
                "needs a prefix (dlq.{subject}), or dead letters would land on the original subjects",
            );
        }
        validate_subject(&probe, false).map_err(DlqTemplateError)?;
        Ok(DlqTemplate {
            source: source.to_owned(),
        })
    }

    /// The dead-letter subject of a message.
    pub fn render(&self, projection: &str, stream: &str, subject: &str) -> String {
        self.source
            .replace("{projection}", projection)
            .replace("{stream}", stream)
            .replace("{subject}", subject)
    }

    /// The wildcard subject the DLQ stream must capture for this projection.
    pub fn capture(&self, projection: &str, stream: &str) -> String {
        self.render(projection, stream, ">")
    }

    /// Recovers the original subject from a dead-letter subject, when it matches.
    pub fn original<'a>(
        &self,
        projection: &str,
        stream: &str,
        dlq_subject: &'a str,
    ) -> Option<&'a str> {
        let prefix = self.render(projection, stream, "");
        dlq_subject
            .strip_prefix(prefix.as_str())
            .filter(|s| !s.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_captures() {
        let t = DlqTemplate::parse("dlq.{projection}.{subject}").unwrap();
        assert_eq!(
            t.render("orders", "ORDERS", "orders.event.x"),
            "dlq.orders.orders.event.x"
        );
        assert_eq!(t.capture("orders", "ORDERS"), "dlq.orders.>");
        assert_eq!(
            t.original("orders", "ORDERS", "dlq.orders.a.b"),
            Some("a.b")
        );
        assert_eq!(t.original("orders", "ORDERS", "other.a"), None);
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in [
            "{subject}",
            "{subject}.dlq",
            "dlq",
            "dlq.{x}.{subject}",
            "dlq..{subject}",
            "dlq.{subject}.{subject}",
            "dlq.*.{subject}",
        ] {
            assert!(DlqTemplate::parse(bad).is_err(), "{bad}");
        }
    }
}
