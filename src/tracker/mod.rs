//! The prompt tracker: the one owner of per-prompt state ([`state::Tracker`], held by the router task), and
//! the resync worker that reads `GET /queue` and `GET /history` for it ([`resync`]).

pub mod resync;
pub mod state;

use std::time::Instant;

use serde_json::Value;

use crate::comfy::queue::QueueSnapshot;
pub use state::{Effects, Topic, Tracker, Update};

/// What the command plane and the resync worker tell the tracker (through the router task).
#[derive(Debug)]
pub enum Control {
    /// The bridge is about to post this prompt (sent before the HTTP request, so no event can overtake it).
    Expect {
        /// The id the bridge chose.
        prompt_id: String,
        /// The bus request's `id`.
        request_id: Option<String>,
        /// The workflow as posted.
        workflow: Value,
    },
    /// ComfyUI queued it.
    Accepted {
        /// The prompt.
        prompt_id: String,
    },
    /// ComfyUI refused it, or could not be reached.
    Rejected {
        /// The prompt.
        prompt_id: String,
    },
    /// A `GET /queue` answer, and the recent history read right after it.
    Queue {
        /// The queue.
        snapshot: QueueSnapshot,
        /// `GET /history?max_items=…`: prompts that may have come and gone between two looks.
        recent: Vec<(String, Value)>,
        /// When the request was sent: prompts the tracker learnt of later cannot be missing from it.
        requested: Instant,
    },
    /// A `GET /history/<id>` answer.
    History {
        /// The prompt.
        prompt_id: String,
        /// Its entry, `None` when ComfyUI does not know it.
        entry: Option<Value>,
    },
}

/// What the resync worker should fetch.
#[derive(Debug, Default, PartialEq)]
pub struct Work {
    /// Read `GET /queue` (the queue changed, or the WebSocket reconnected).
    pub resync: bool,
    /// Read `GET /history/<id>` for these.
    pub lookups: Vec<String>,
}

impl Work {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        !self.resync && self.lookups.is_empty()
    }

    /// Adds `other` to this, each lookup once, in time linear in both.
    pub fn merge(&mut self, other: Work) {
        self.resync |= other.resync;
        if other.lookups.is_empty() {
            return;
        }
        let mut seen: std::collections::HashSet<String> = self.lookups.iter().cloned().collect();
        for id in other.lookups {
            if seen.insert(id.clone()) {
                self.lookups.push(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_work_keeps_each_lookup_once_and_in_order() {
        let ids = |range: std::ops::Range<u32>| range.map(|i| format!("p{i}")).collect::<Vec<_>>();
        let mut work = Work { resync: false, lookups: ids(0..3) };
        work.merge(Work { resync: true, lookups: ids(2..5) });
        assert_eq!(work, Work { resync: true, lookups: ids(0..5) });
        // 100,000 at once: linear, so this finishes at once (it took 17 s when quadratic).
        let mut big = Work::default();
        big.merge(Work { resync: false, lookups: ids(0..100_000).into_iter().chain(ids(0..100_000)).collect() });
        assert_eq!(big.lookups.len(), 100_000);
    }
}
