//! `cancel`: delete a pending prompt, or interrupt it if it runs.
//!
//! Where ComfyUI has the jobs API (docs/PROTOCOL.md §11) one `POST /api/jobs/{id}/cancel` does either under the
//! queue lock, so it cannot hit another prompt; a pending prompt it removes leaves no history, so the bridge
//! tells the tracker itself that the prompt ended `cancelled`. Older servers get `GET /queue`, then
//! `POST /interrupt` or `POST /queue {"delete"}`.

use serde_json::json;
use tokio::sync::mpsc;

use super::fields::Body;
use super::response::{http_failure, Code, Failure, Outcome};
use super::{Applied, Context, Spec};
use crate::comfy::http::{ComfyHttp, HttpError};
use crate::comfy::jobs::{self, JobStatus};
use crate::tracker::Control;

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
        let (http, control) = (cx.http.clone(), cx.control.clone());
        Applied::call(move || async move {
            cancel(&http, &control, &self.prompt_id).await.unwrap_or_else(|e| Err(http_failure(e)))
        })
    }
}

async fn cancel(http: &ComfyHttp, control: &mpsc::Sender<Control>, prompt_id: &str) -> Result<Outcome, HttpError> {
    if http.jobs_api().await? {
        return cancel_job(http, control, prompt_id).await;
    }
    let queue = http.queue().await?;
    if queue.running.iter().any(|i| i.prompt_id == prompt_id) {
        http.interrupt(Some(prompt_id)).await?;
        return Ok(Ok(json!({ "cancelled": true, "was": "running", "prompt_id": prompt_id })));
    }
    if queue.pending.iter().any(|i| i.prompt_id == prompt_id) {
        http.delete_pending(&[prompt_id.to_string()]).await?;
        return Ok(Ok(json!({ "cancelled": true, "was": "pending", "prompt_id": prompt_id })));
    }
    Ok(Err(not_found(prompt_id, None)))
}

/// With the jobs API: look the prompt up, cancel it by id, and record a pending one's end (it gets no history).
async fn cancel_job(http: &ComfyHttp, control: &mpsc::Sender<Control>, prompt_id: &str) -> Result<Outcome, HttpError> {
    let mut was = match http.job(prompt_id).await? {
        Some(job) if job.status == JobStatus::Pending => "pending",
        Some(job) if job.status == JobStatus::InProgress => "running",
        Some(job) => return Ok(Err(not_found(prompt_id, job.outcome))),
        None => return Ok(Err(not_found(prompt_id, None))),
    };
    let cancelled = http.cancel_job(prompt_id).await?;
    if cancelled && was == "pending" {
        // ComfyUI interrupts a prompt that started between the look and the cancel instead of removing it.
        match http.job(prompt_id).await? {
            None => {
                let gone = Control::History { prompt_id: prompt_id.to_string(), entry: None };
                if control.send(gone).await.is_err() {
                    tracing::debug!(prompt_id, "tracker gone: the cancelled prompt's end is not recorded");
                }
            }
            Some(_) => was = "running",
        }
    }
    Ok(Ok(json!({ "cancelled": cancelled, "was": was, "prompt_id": prompt_id })))
}

/// `not_found`, with how the prompt ended when ComfyUI still knows it.
fn not_found(prompt_id: &str, ended: Option<jobs::Outcome>) -> Failure {
    let message = format!("prompt `{prompt_id}` is neither running nor pending");
    let mut details = json!({ "prompt_id": prompt_id });
    if let Some(ended) = ended {
        details["status"] = json!(ended.as_str());
    }
    Failure::new(Code::NotFound, message).with_details(details)
}
