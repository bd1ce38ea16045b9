//! The resync worker: reads ComfyUI's queue and history when the router asks, and hands the answers back.
//!
//! It holds no prompt state of its own; the [`Tracker`](super::Tracker) decides what to fetch. Requests that
//! pile up while one is running are merged, so a burst of `status` messages costs one `GET /queue`. A failed
//! read is retried a few times with backoff; the next `status` or reconnect starts over anyway.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Control, Work};
use crate::comfy::http::ComfyHttp;

/// Attempts per failed read before waiting for the next request.
const ATTEMPTS: u32 = 4;
/// How many recent history entries each resync reads: enough for the prompts that can start and finish
/// between two `status`-triggered looks (all-cached prompts take milliseconds).
pub const RECENT: usize = 32;

/// Runs until the router drops its end of `work_rx`.
pub async fn run(http: ComfyHttp, mut work_rx: mpsc::UnboundedReceiver<Work>, control: mpsc::Sender<Control>) {
    while let Some(mut work) = work_rx.recv().await {
        while let Ok(more) = work_rx.try_recv() {
            work.merge(more);
        }
        if work.resync && !resync(&http, &control).await {
            return;
        }
        for prompt_id in work.lookups {
            if !lookup(&http, &control, prompt_id).await {
                return;
            }
        }
    }
    debug!("resync worker stopped");
}

/// `false` once the router is gone.
async fn resync(http: &ComfyHttp, control: &mpsc::Sender<Control>) -> bool {
    for attempt in 0..ATTEMPTS {
        let requested = Instant::now();
        // Queue first, then history: a prompt that leaves the queue in between is in the second read.
        let read =
            async { Ok::<_, crate::comfy::http::HttpError>((http.queue().await?, http.history_recent(RECENT).await?)) };
        match read.await {
            Ok((snapshot, recent)) => {
                return control.send(Control::Queue { snapshot, recent, requested }).await.is_ok();
            }
            Err(e) => {
                if crate::telemetry::warn_allowed("resync", "queue") {
                    warn!(attempt, error = %e, "cannot read the queue");
                }
                tokio::time::sleep(retry_delay(attempt)).await;
            }
        }
    }
    true
}

async fn lookup(http: &ComfyHttp, control: &mpsc::Sender<Control>, prompt_id: String) -> bool {
    for attempt in 0..ATTEMPTS {
        match http.history(&prompt_id).await {
            Ok(entry) => return control.send(Control::History { prompt_id, entry }).await.is_ok(),
            Err(e) => {
                if crate::telemetry::warn_allowed("resync", "history") {
                    warn!(prompt_id, attempt, error = %e, "cannot read history");
                }
                tokio::time::sleep(retry_delay(attempt)).await;
            }
        }
    }
    true
}

fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(250 << attempt.min(4))
}
