//! Dead letters: poison events published durably to the DLQ stream with the reason.

mod template;

pub use template::{DlqTemplate, DlqTemplateError};
