//! `interrupt`: the running prompt, by id, never "whatever runs" (ComfyUI's global flag would hit the next prompt
//! if the first just ended).
//!
//! Where ComfyUI has the jobs API (docs/PROTOCOL.md §11), `POST /api/jobs/{id}/cancel` interrupts the prompt only
//! if it is still the one running, under the queue lock, and says whether it did; older servers get the targeted
//! `POST /interrupt`, which does not say.

use serde_json::json;

use super::fields::Body;
use super::response::{http_failure, Failure, Outcome};
use super::{Applied, Context, Spec};
use crate::comfy::http::{ComfyHttp, HttpError};

/// The arguments of `interrupt`.
#[derive(Debug, Clone, PartialEq)]
pub struct Interrupt {
    /// Interrupt only if this prompt is the one running.
    pub prompt_id: Option<String>,
}

impl Spec for Interrupt {
    const NAME: &'static str = "interrupt";
    const FIELDS: &'static [&'static str] = &["prompt_id"];

    fn parse(body: &mut Body, _: usize) -> Result<Self, Failure> {
        Ok(Interrupt { prompt_id: body.non_empty_string("prompt_id")? })
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        let http = cx.http.clone();
        Applied::call(move || async move { interrupt(&http, self.prompt_id).await.unwrap_or_else(|e| Err(http_failure(e))) })
    }
}

async fn interrupt(http: &ComfyHttp, prompt_id: Option<String>) -> Result<Outcome, HttpError> {
    let queue = http.queue().await?;
    let running = queue.running.first().map(|i| i.prompt_id.clone());
    let target = match (prompt_id, running) {
        (Some(wanted), Some(running)) if wanted == running => running,
        (None, Some(running)) => running,
        (wanted, _) => return Ok(Ok(json!({ "interrupted": false, "prompt_id": wanted }))),
    };
    // It was running at the look: the cancel can only interrupt it (or find it ended), never dequeue it.
    if http.jobs_api().await? {
        let interrupted = http.cancel_job(&target).await?;
        return Ok(Ok(json!({ "interrupted": interrupted, "prompt_id": target })));
    }
    // Targeted even when the request named no prompt, so an interrupt cannot hit the next prompt instead.
    http.interrupt(Some(&target)).await?;
    Ok(Ok(json!({ "interrupted": true, "prompt_id": target })))
}
