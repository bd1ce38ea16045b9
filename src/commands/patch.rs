//! `patch`: change a stored template (`set` and/or `merge`), kept across restarts.

use serde_json::json;

use super::fields::{self, Body};
use super::response::{template_failure, Code, Failure};
use super::{Applied, Context, Spec};
use crate::workflow::Edits;

/// The arguments of `patch`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchTemplate {
    /// The template's name.
    pub template: String,
    /// `set` and/or `merge`; never empty.
    pub edits: Edits,
}

impl Spec for PatchTemplate {
    const NAME: &'static str = "patch";
    const FIELDS: &'static [&'static str] = &["template", "set", "merge"];

    fn parse(body: &mut Body, _: usize) -> Result<Self, Failure> {
        let template = body.required_string("template")?;
        let edits = fields::edits(body)?;
        if edits.is_empty() {
            return Err(Failure::new(Code::InvalidRequest, "`patch` needs a non-empty `set` or a `merge`")
                .with_details(json!({ "fields": ["set", "merge"] })));
        }
        Ok(PatchTemplate { template, edits })
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        Applied::Done(match cx.templates.patch(&self.template, &self.edits, cx.rng) {
            Ok(changed) => Ok(json!({ "template": self.template, "changed": changed })),
            Err(e) => Err(template_failure(e, cx.templates)),
        })
    }
}
