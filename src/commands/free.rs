//! `free`: ask ComfyUI to unload models and/or free cached memory once it is between prompts.

use serde_json::json;

use super::fields::Body;
use super::response::{http_failure, Failure};
use super::{Applied, Context, Spec};

/// The arguments of `free`.
#[derive(Debug, Clone, PartialEq)]
pub struct Free {
    /// Unload models.
    pub unload_models: bool,
    /// Free cached memory.
    pub free_memory: bool,
}

impl Spec for Free {
    const NAME: &'static str = "free";
    const FIELDS: &'static [&'static str] = &["unload_models", "free_memory"];

    fn parse(body: &mut Body, _: usize) -> Result<Self, Failure> {
        let unload_models = body.bool("unload_models")?.unwrap_or(false);
        Ok(Free { unload_models, free_memory: body.bool("free_memory")?.unwrap_or(false) })
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        let http = cx.http.clone();
        Applied::call(move || async move {
            http.free(self.unload_models, self.free_memory).await.map_err(http_failure)?;
            Ok(json!({}))
        })
    }
}
