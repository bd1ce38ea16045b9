//! ComfyUI's jobs API, on versions after 0.3.64 (docs/PROTOCOL.md §11): the shapes the bridge reads.
//!
//! A job is a queue item or a history entry in one form. Its `status` says `failed` or `cancelled` for an
//! interrupted prompt, depending on the release, so [`Job::outcome`] reads how a prompt ended from its
//! execution messages, as the tracker reads history: `interrupted` stays apart from `error`.

use serde_json::Value;

/// Where a job is, as `GET /api/jobs/{id}` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Waiting in the queue.
    Pending,
    /// Running now.
    InProgress,
    /// In history, ended without error.
    Completed,
    /// In history, ended with an error (or, on some releases, interrupted).
    Failed,
    /// In history, interrupted (releases that tell it from `failed`).
    Cancelled,
    /// A status this bridge does not know.
    Other,
}

impl JobStatus {
    fn parse(status: &str) -> Self {
        match status {
            "pending" => Self::Pending,
            "in_progress" => Self::InProgress,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => Self::Other,
        }
    }

    /// Still in the queue (so a cancel can act on it).
    pub fn is_queued(self) -> bool {
        matches!(self, Self::Pending | Self::InProgress)
    }
}

/// How a finished job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Without error.
    Success,
    /// A node failed.
    Error,
    /// Interrupted while running.
    Interrupted,
}

impl Outcome {
    /// The name the bridge's `result` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Error => "error",
            Self::Interrupted => "interrupted",
        }
    }
}

/// One job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The prompt id.
    pub id: String,
    /// Where it is.
    pub status: JobStatus,
    /// How it ended, for a finished job: from `execution_status.messages`, else from `status`.
    pub outcome: Option<Outcome>,
}

impl Job {
    /// Parses one job object; `None` if it has no `id` and `status`.
    pub fn parse(job: &Value) -> Option<Self> {
        let id = job.get("id")?.as_str()?.to_string();
        let status = JobStatus::parse(job.get("status")?.as_str()?);
        let messages = job.pointer("/execution_status/messages").and_then(Value::as_array);
        let said =
            |kind: &str| messages.is_some_and(|m| m.iter().any(|m| m.get(0).and_then(Value::as_str) == Some(kind)));
        let outcome = match status {
            JobStatus::Pending | JobStatus::InProgress | JobStatus::Other => None,
            _ if said("execution_interrupted") => Some(Outcome::Interrupted),
            _ if said("execution_error") => Some(Outcome::Error),
            JobStatus::Cancelled => Some(Outcome::Interrupted),
            JobStatus::Failed => Some(Outcome::Error),
            _ => Some(Outcome::Success),
        };
        Some(Self { id, status, outcome })
    }
}

/// Whether a `GET /api/jobs` answer is the jobs API's (`{"jobs": [...], …}`), not some other route's page.
pub fn is_jobs_page(body: &Value) -> bool {
    body.get("jobs").is_some_and(Value::is_array)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(status: &str, messages: &[&str]) -> Option<Job> {
        let messages: Vec<Value> = messages.iter().map(|m| json!([m, {"timestamp": 1}])).collect();
        Job::parse(&json!({"id": "p", "status": status, "execution_status": {"messages": messages}}))
    }

    #[test]
    fn interrupted_is_read_from_the_messages_whatever_the_status_says() {
        let outcome = |status, messages: &[&str]| job(status, messages).and_then(|j| j.outcome);
        let interrupted = ["execution_start", "execution_interrupted"];
        assert_eq!(outcome("failed", &interrupted), Some(Outcome::Interrupted), "older releases");
        assert_eq!(outcome("cancelled", &interrupted), Some(Outcome::Interrupted));
        assert_eq!(outcome("cancelled", &[]), Some(Outcome::Interrupted), "a list entry carries no messages");
        assert_eq!(outcome("failed", &["execution_start", "execution_error"]), Some(Outcome::Error));
        assert_eq!(outcome("failed", &[]), Some(Outcome::Error));
        assert_eq!(outcome("completed", &["execution_success"]), Some(Outcome::Success));
        assert_eq!(outcome("in_progress", &["execution_interrupted"]), None);
        let pending = job("pending", &[]).expect("job");
        assert_eq!((pending.status, pending.status.is_queued()), (JobStatus::Pending, true));
        assert_eq!(job("archived", &[]).map(|j| (j.status, j.outcome)), Some((JobStatus::Other, None)));
        assert_eq!(Job::parse(&json!({"status": "pending"})), None);
        assert!(is_jobs_page(&json!({"jobs": [], "pagination": {}})));
        assert!(!is_jobs_page(&json!({"error": "x"})));
    }
}
