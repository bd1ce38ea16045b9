//! The resync worker: reads ComfyUI's queue and history when the router asks, and hands the answers back.
//!
//! It holds no prompt state of its own; the [`Tracker`](super::Tracker) decides what to fetch. Requests that
//! pile up while one is running are merged, so a burst of `status` messages costs one `GET /queue`. A failed
//! read is retried a few times with backoff; the next `status` or reconnect starts over anyway.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Control, Work};
use crate::comfy::http::{ComfyHttp, HttpError};

/// Attempts per failed read before waiting for the next request.
const ATTEMPTS: u32 = 4;
/// Longest wait between two tries of a read.
const RETRY_MAX_MS: u64 = 4_000;
/// How many recent history entries each resync reads: enough for the prompts that can start and finish
/// between two `status`-triggered looks (all-cached prompts take milliseconds).
pub const RECENT: usize = 32;
/// Most `GET /history/<id>` lookups per second.
pub const LOOKUPS_PER_SECOND: u32 = 20;
/// Most lookups waiting in the worker; the tracker asks for far fewer (and again for any dropped).
const MAX_TODO: usize = 1024;
/// How long after a history entry that still lacks its outputs it is read again (newer servers send
/// `execution_success` before they write the outputs, docs/PROTOCOL.md §11).
pub const OUTPUTS_RETRY: Duration = Duration::from_millis(500);

/// What the worker has still to do: a resync, then lookups, each id once.
#[derive(Debug, Default)]
pub struct Todo {
    resync: bool,
    lookups: VecDeque<String>,
    queued: HashSet<String>,
}

/// One read.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// `GET /queue`, then `GET /history?max_items=…`.
    Resync,
    /// `GET /history/<id>`.
    Lookup(String),
}

impl Todo {
    /// Adds `work`: a lookup already waiting is not added again, nor one beyond `MAX_TODO`.
    pub fn add(&mut self, work: Work) {
        self.resync |= work.resync;
        for id in work.lookups {
            if self.lookups.len() < MAX_TODO && self.queued.insert(id.clone()) {
                self.lookups.push_back(id);
            }
        }
    }

    /// The next read: a resync first (it may answer lookups too), then lookups in the order asked.
    pub fn take_step(&mut self) -> Option<Step> {
        if std::mem::take(&mut self.resync) {
            return Some(Step::Resync);
        }
        let id = self.lookups.pop_front()?;
        self.queued.remove(&id);
        Some(Step::Lookup(id))
    }
}

/// Runs until the router drops its end of `work_rx`. Work keeps being taken (and merged) while a read runs,
/// so the channel never piles up; lookups go at most [`LOOKUPS_PER_SECOND`].
pub async fn run(http: ComfyHttp, mut work_rx: mpsc::UnboundedReceiver<Work>, control: mpsc::Sender<Control>) {
    let mut todo = Todo::default();
    let mut pace = tokio::time::interval(Duration::from_secs(1) / LOOKUPS_PER_SECOND);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while let Ok(more) = work_rx.try_recv() {
            todo.add(more);
        }
        let Some(step) = todo.take_step() else {
            match work_rx.recv().await {
                Some(work) => {
                    todo.add(work);
                    continue;
                }
                None => break,
            }
        };
        let read = async {
            match step {
                Step::Resync => resync(&http, &control).await,
                Step::Lookup(prompt_id) => {
                    pace.tick().await;
                    lookup(&http, &control, prompt_id).await
                }
            }
        };
        tokio::pin!(read);
        let alive = loop {
            tokio::select! {
                alive = &mut read => break alive,
                work = work_rx.recv() => match work {
                    Some(work) => todo.add(work),
                    // The router is gone: nobody would take the answer (and shutdown need not wait for it).
                    None => break false,
                },
            }
        };
        if !alive {
            break;
        }
    }
    debug!("resync worker stopped");
}

/// `false` once the router is gone.
async fn resync(http: &ComfyHttp, control: &mpsc::Sender<Control>) -> bool {
    for attempt in 0..ATTEMPTS {
        let requested = Instant::now();
        // Queue first, then history: a prompt that leaves the queue in between is in the second read.
        let read = async { Ok::<_, HttpError>((http.queue().await?, http.history_recent(RECENT).await?)) };
        match read.await {
            Ok((snapshot, recent)) => {
                return control.send(Control::Queue { snapshot, recent, requested }).await.is_ok();
            }
            Err(e) => {
                if crate::telemetry::warn_allowed("resync", "queue") {
                    warn!(attempt, error = %e, "cannot read the queue");
                }
                tokio::time::sleep(crate::backoff::delay(attempt, RETRY_MAX_MS)).await;
            }
        }
    }
    true
}

async fn lookup(http: &ComfyHttp, control: &mpsc::Sender<Control>, prompt_id: String) -> bool {
    for attempt in 0..ATTEMPTS {
        match http.history(&prompt_id).await {
            Ok(entry) => {
                let entry = complete(http, &prompt_id, entry).await;
                return control.send(Control::History { prompt_id, entry }).await.is_ok();
            }
            Err(e) => {
                if crate::telemetry::warn_allowed("resync", "history") {
                    warn!(prompt_id, attempt, error = %e, "cannot read history");
                }
                // Too large or malformed will be so again at once; the tracker asks again much later.
                if matches!(e, HttpError::TooLarge { .. } | HttpError::BadResponse { .. }) {
                    return true;
                }
                tokio::time::sleep(crate::backoff::delay(attempt, RETRY_MAX_MS)).await;
            }
        }
    }
    true
}

/// `entry`, or when it still lacks its outputs, the entry read once more after [`OUTPUTS_RETRY`] (if that read
/// works).
async fn complete(http: &ComfyHttp, prompt_id: &str, entry: Option<serde_json::Value>) -> Option<serde_json::Value> {
    if !entry.as_ref().is_some_and(crate::comfy::queue::history_outputs_missing) {
        return entry;
    }
    debug!(prompt_id, "history entry without its outputs yet: reading it again");
    tokio::time::sleep(OUTPUTS_RETRY).await;
    match http.history(prompt_id).await {
        Ok(Some(later)) => Some(later),
        _ => entry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_merged_resync_first_and_each_lookup_once() {
        let mut todo = Todo::default();
        let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        todo.add(Work { resync: false, lookups: ids(&["a", "b"]) });
        todo.add(Work { resync: true, lookups: ids(&["b", "c", "a"]) });
        todo.add(Work { resync: true, lookups: Vec::new() });
        let steps: Vec<Step> = std::iter::from_fn(|| todo.take_step()).collect();
        let lookup = |id: &str| Step::Lookup(id.to_string());
        assert_eq!(steps, [Step::Resync, lookup("a"), lookup("b"), lookup("c")]);

        // Once taken, an id may be asked again; beyond the bound, lookups are not kept.
        todo.add(Work { resync: false, lookups: (0..5_000).map(|i| format!("p{i}")).chain(ids(&["a"])).collect() });
        assert_eq!(std::iter::from_fn(|| todo.take_step()).count(), MAX_TODO);
    }
}
