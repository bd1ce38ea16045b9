//! The job record: what the fleet knows about one job, kept in the jobs bucket and published on
//! `<base>.fleet.<fleet>.job.<id>.state` (and, once, `.result`). Pure: no I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// In the stream, nobody runs it (not claimed yet, or released by a bridge that could not run it).
    Waiting,
    /// A bridge claimed it and is queueing it on its ComfyUI.
    Claimed,
    /// In that ComfyUI's queue.
    Queued,
    /// ComfyUI runs it.
    Running,
    /// Ended well.
    Success,
    /// Ended with an error: a ComfyUI error, an invalid job, or too many runs.
    Error,
    /// Interrupted while running.
    Interrupted,
    /// Cancelled before it ran.
    Cancelled,
}

impl JobState {
    /// The job is over; nothing changes it any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Success | Self::Error | Self::Interrupted | Self::Cancelled)
    }

    /// A bridge holds it: claimed, queued or running.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Claimed | Self::Queued | Self::Running)
    }

    /// The state of a prompt's `state` object or a result's `status`, as a job state.
    pub fn from_prompt(state: &str) -> Option<Self> {
        Some(match state {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "success" => Self::Success,
            "error" => Self::Error,
            "interrupted" => Self::Interrupted,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Claimed => "claimed",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Success => "success",
            Self::Error => "error",
            Self::Interrupted => "interrupted",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The job record (README "Fleet").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job id (the `queue` request's `id`).
    pub id: String,
    /// Where it is.
    pub state: JobState,
    /// The bridge (`bridge.instance`) that runs or ran it; `null` while waiting.
    pub instance: Option<String>,
    /// Its ComfyUI prompt id, once queued.
    pub prompt_id: Option<String>,
    /// Which run this is: 1, then 2 after a redelivery, and so on.
    pub attempt: u64,
    /// The bridge's `result` object for the prompt, or `{"status": "error", "error": {...}}` for a job that
    /// never ran; only in a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

impl JobRecord {
    /// A job `instance` takes for its run number `attempt`.
    pub fn claimed(id: &str, instance: &str, attempt: u64) -> Self {
        Self {
            id: id.into(),
            state: JobState::Claimed,
            instance: Some(instance.into()),
            prompt_id: None,
            attempt,
            result: None,
        }
    }

    /// The record as stored and published.
    pub fn to_json(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }

    /// A stored record; `None` when it is not one (never trusted blindly: the bucket is writable by clients).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// Moves to `state` as the bridge's prompt `state` stream reports it; `false` when that is no change or
    /// would go backwards (a late `queued` after `running`), or the job is over.
    pub fn advance(&mut self, state: JobState) -> bool {
        let rank = |s: JobState| match s {
            JobState::Waiting => 0,
            JobState::Claimed => 1,
            JobState::Queued => 2,
            JobState::Running => 3,
            _ => 4,
        };
        if self.state.is_terminal() || rank(state) <= rank(self.state) {
            return false;
        }
        self.state = state;
        true
    }

    /// Ends the job with `result` (its `status` names the end state; anything else counts as an error).
    pub fn finish(&mut self, result: Value) {
        let status = result["status"].as_str().and_then(JobState::from_prompt);
        self.state = status.filter(|s| s.is_terminal()).unwrap_or(JobState::Error);
        self.result = Some(result);
    }

    /// Ends the job with an error that is the fleet's own (never ran, ran too often), with `code` and `message`.
    pub fn fail(&mut self, code: &str, message: String, details: Value) {
        let error = serde_json::json!({"code": code, "message": message, "details": details});
        self.finish(serde_json::json!({"status": "error", "error": error}));
    }
}

/// The bucket key of a job id. Bucket keys allow `A-Z a-z 0-9 - _ = / .`; the id is escaped like any topic
/// level (so `:` and `~` may remain), `:` then becomes `=3A` (escaping never leaves a raw `=3A`, it writes
/// `=` as `=3D`) and a hashed level's `~` becomes `h.` (escaping never produces `.`), so keys are one to one.
pub fn kv_key(id: &str) -> String {
    let level = crate::bus::topics::escape(id);
    match level.strip_prefix('~') {
        Some(hash) => format!("h.{hash}"),
        None => level.replace(':', "=3A"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_record_has_the_documented_shape() {
        let mut r = JobRecord::claimed("job-1", "gpu1", 1);
        assert_eq!(
            serde_json::from_slice::<Value>(&r.to_json()).expect("json"),
            json!({"id": "job-1", "state": "claimed", "instance": "gpu1", "prompt_id": null, "attempt": 1})
        );
        r.prompt_id = Some("p1".into());
        assert!(r.advance(JobState::Queued));
        assert!(r.advance(JobState::Running));
        assert!(!r.advance(JobState::Queued), "never backwards");
        assert!(!r.advance(JobState::Running), "no change");
        r.finish(json!({"prompt_id": "p1", "status": "success", "outputs": {}}));
        assert_eq!(r.state, JobState::Success);
        assert!(!r.advance(JobState::Running), "over is over");
        let back = JobRecord::parse(&r.to_json()).expect("parses");
        assert_eq!(back, r);
        assert_eq!(JobRecord::parse(b"{\"id\": 1}"), None);
    }

    #[test]
    fn failures_are_error_results() {
        let mut r = JobRecord::claimed("j", "a", 3);
        r.fail("max_deliver", "ran 3 times".into(), json!({"attempts": 3}));
        assert_eq!(r.state, JobState::Error);
        assert_eq!(r.result.as_ref().expect("result")["error"]["code"], "max_deliver");
        let mut odd = JobRecord::claimed("j", "a", 1);
        odd.finish(json!({"status": "weird"}));
        assert_eq!(odd.state, JobState::Error, "an unknown status is not success");
    }

    #[test]
    fn keys_are_valid_and_one_to_one() {
        let valid = |k: &str| {
            !k.starts_with('.')
                && !k.ends_with('.')
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=/.".contains(&b))
        };
        let long = "x.".repeat(100);
        let ids = ["job-1", "a:b", "a=3Ab", "a.b", "~0123456789abcdef", "", &long];
        let keys: Vec<String> = ids.iter().map(|id| kv_key(id)).collect();
        for (id, key) in ids.iter().zip(&keys) {
            assert!(valid(key), "{id:?} -> {key:?}");
        }
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
        assert_eq!(kv_key("job-1"), "job-1");
    }
}
