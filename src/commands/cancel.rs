//! `cancel`: delete a pending prompt, or interrupt it if it runs.

use serde_json::json;

use super::fields::Body;
use super::response::{http_failure, Code, Failure, Outcome};
use super::{Applied, Context, Spec};
use crate::comfy::http::{ComfyHttp, HttpError};

/// The arguments of `cancel`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cancel {
    /// The prompt.
    pub prompt_id: String,
}

impl Spec for Cancel {
    const NAME: &'static str = "cancel";
    const FIELDS: &'static [&'static str] = &["prompt_id"];

    fn parse(body: &mut Body, _: usize) -> Result<Self, Failure> {
        Ok(Cancel { prompt_id: body.required_string("prompt_id")? })
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        let http = cx.http.clone();
        Applied::call(move || async move { cancel(&http, &self.prompt_id).await.unwrap_or_else(|e| Err(http_failure(e))) })
    }
}

async fn cancel(http: &ComfyHttp, prompt_id: &str) -> Result<Outcome, HttpError> {
    let queue = http.queue().await?;
    if queue.running.iter().any(|i| i.prompt_id == prompt_id) {
        http.interrupt(Some(prompt_id)).await?;
        return Ok(Ok(json!({ "cancelled": true, "was": "running", "prompt_id": prompt_id })));
    }
    if queue.pending.iter().any(|i| i.prompt_id == prompt_id) {
        http.delete_pending(&[prompt_id.to_string()]).await?;
        return Ok(Ok(json!({ "cancelled": true, "was": "pending", "prompt_id": prompt_id })));
    }
    let message = format!("prompt `{prompt_id}` is neither running nor pending");
    Ok(Err(Failure::new(Code::NotFound, message).with_details(json!({ "prompt_id": prompt_id }))))
}
