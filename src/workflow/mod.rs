//! API-format workflows: named templates on disk and the edits a request may make to a workflow.
//!
//! Pure except for [`template::Templates`]'s loading and atomic persistence.

pub mod patch;
pub mod template;

use serde_json::Value;

/// The edits a `queue` or `patch` request asks for (docs/INTERFACE.md §3), applied in this order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edits {
    /// RFC 7396 JSON merge patch on the whole workflow.
    pub merge: Option<Value>,
    /// `"<node>.<input>"` to value, in request order.
    pub set: Vec<(String, Value)>,
    /// `"<node>.<input>"` seeds to set to a random integer in `0..2^53`.
    pub randomize: Vec<String>,
}

impl Edits {
    /// No edit at all.
    pub fn is_empty(&self) -> bool {
        self.merge.is_none() && self.set.is_empty() && self.randomize.is_empty()
    }
}
