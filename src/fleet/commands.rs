//! The fleet's own requests on `<prefix>.fleet.<fleet>.request.<command>`, answered by one bridge of the
//! fleet (a queue group): `status` (every live bridge, from the bridges bucket) and `cancel` (a job, wherever
//! it is).

use std::sync::Arc;

use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::dispatch::{cancellable_in_place, Seen};
use super::job::{JobRecord, JobState};
use super::task::{now_ms, Shared};

/// The fleet's commands.
pub const COMMANDS: &[&str] = &["status", "cancel"];

/// A fleet command's answer: `{"id", "status": "ok", "data"}` or `{"id", "status": "error", "error"}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Done.
    Ok(Value),
    /// Not done: the code and why.
    Error(&'static str, String),
}

impl Answer {
    /// The response object, with the request's `id`.
    pub fn to_json(&self, id: Option<&str>) -> Value {
        match self {
            Answer::Ok(data) => json!({"id": id, "status": "ok", "data": data}),
            Answer::Error(code, message) => {
                json!({"id": id, "status": "error", "error": {"code": code, "message": message}})
            }
        }
    }
}

/// A parsed fleet request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `status`: no fields.
    Status,
    /// `cancel`: `job_id`.
    Cancel(String),
}

/// Parses `payload` for `command`: the request's `id` (if any) and the request, or the error answer.
pub fn parse(command: &str, payload: &[u8]) -> (Option<String>, Result<Request, Answer>) {
    let body: Value = if payload.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(payload) {
            Ok(Value::Object(o)) => Value::Object(o),
            _ => return (None, Err(Answer::Error("invalid_json", "the request must be a JSON object".into()))),
        }
    };
    let id = body["id"].as_str().map(str::to_string);
    let unknown = |allowed: &[&str]| {
        body.as_object().into_iter().flatten().map(|(k, _)| k.as_str()).find(|k| *k != "id" && !allowed.contains(k))
    };
    let request = match command {
        "status" => match unknown(&[]) {
            Some(field) => Err(Answer::Error("invalid_request", format!("`status` has no field `{field}`"))),
            None => Ok(Request::Status),
        },
        "cancel" => match (unknown(&["job_id"]), body["job_id"].as_str()) {
            (Some(field), _) => Err(Answer::Error("invalid_request", format!("`cancel` has no field `{field}`"))),
            (None, Some(job)) => Ok(Request::Cancel(job.to_string())),
            (None, None) => Err(Answer::Error("invalid_request", "`cancel` needs `job_id` (a string)".into())),
        },
        other => Err(Answer::Error(
            "unknown_command",
            format!("unknown fleet command `{other}`; the commands are status, cancel"),
        )),
    };
    (id, request)
}

/// Answers fleet requests until shutdown.
pub(crate) async fn serve(shared: Arc<Shared>, tasks: TaskTracker) {
    let subject = format!("{}.request.*", shared.names.fleet_subject);
    let group = format!("fleet-{}", shared.names.stream);
    let Ok(mut requests) = shared.client.queue_subscribe(subject, group).await else {
        warn!("fleet: cannot subscribe to the fleet's request subjects");
        return;
    };
    loop {
        let message = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            m = requests.next() => match m { Some(m) => m, None => return },
        };
        let shared = shared.clone();
        tasks.spawn(async move {
            let command = message.subject.rsplit('.').next().unwrap_or_default().to_string();
            let (id, request) = parse(&command, &message.payload);
            let answer = match request {
                Ok(Request::Status) => status(&shared).await,
                Ok(Request::Cancel(job)) => cancel(&shared, &job).await,
                Err(answer) => answer,
            };
            let body = answer.to_json(id.as_deref()).to_string();
            let to = match &message.reply {
                Some(reply) => reply.to_string(),
                None => format!("{}.response.{}", shared.names.fleet_subject, crate::bus::topics::escape(&command)),
            };
            let _ = shared.client.publish(to, body.into()).await;
            let _ = shared.client.flush().await;
        });
    }
}

/// Every live bridge of the fleet.
async fn status(shared: &Shared) -> Answer {
    let mut bridges = Vec::new();
    let Ok(mut keys) = shared.bridges.keys().await else {
        return Answer::Error("unavailable", "cannot read the bridges bucket".into());
    };
    let now = now_ms();
    while let Some(Ok(key)) = keys.next().await {
        let Ok(Some(entry)) = shared.bridges.entry(&key).await else { continue };
        let Ok(beat) = serde_json::from_slice::<Value>(&entry.value) else { continue };
        let (Some(seen), Some(every)) = (beat["last_seen"].as_u64(), beat["interval_ms"].as_u64()) else { continue };
        if now.saturating_sub(seen) < every.saturating_mul(3) {
            bridges.push(json!({
                "instance": beat["instance"],
                "capacity": beat["capacity"],
                "running": beat["running"],
                "queue": beat["queue"],
                "reachable": beat["reachable"],
                "last_seen": seen,
            }));
        }
    }
    Answer::Ok(json!({"fleet": shared.names.stream, "bridges": bridges, "answered_by": shared.me}))
}

/// Cancels `job` wherever it is: not claimed yet or being claimed, on the spot (a tombstone record, so the
/// bridge that gets it drops it); queued or running, through its bridge's own `cancel`.
async fn cancel(shared: &Shared, job: &str) -> Answer {
    for _ in 0..3 {
        let seen = shared.read(job).await;
        let state = seen.as_ref().map(|s| s.record.state);
        if let Some(Seen { record, .. }) = seen.as_ref().filter(|s| s.record.state.is_terminal()) {
            return Answer::Ok(json!({"job_id": job, "cancelled": false, "was": record.state.as_str()}));
        }
        if cancellable_in_place(state) {
            let (mut record, revision) = match seen {
                Some(Seen { record, revision }) => (record, Some(revision)),
                None => (JobRecord::claimed(job, "", 0), None),
            };
            let was = state.unwrap_or(JobState::Waiting);
            if was == JobState::Waiting {
                record.instance = None;
            }
            record.finish(json!({"status": "cancelled", "prompt_id": null}));
            if shared.write(&record, revision).await.is_none() {
                continue;
            }
            shared.publish(&record).await;
            return Answer::Ok(json!({"job_id": job, "cancelled": true, "was": was.as_str()}));
        }
        let Some(Seen { record, .. }) = seen else { continue };
        let (Some(owner), Some(pid)) = (record.instance.as_deref(), record.prompt_id.as_deref()) else { continue };
        let body = json!({"prompt_id": pid}).to_string();
        return match shared.ask(owner, "cancel", body.into()).await {
            Ok(a) if a["status"] == "ok" => Answer::Ok(json!({
                "job_id": job,
                "cancelled": a["data"]["cancelled"],
                "was": record.state.as_str(),
                "instance": owner,
                "prompt_id": pid,
            })),
            Ok(a) => Answer::Error("cancel_failed", format!("bridge `{owner}` answered: {}", a["error"])),
            Err(e) => Answer::Error("cancel_failed", format!("bridge `{owner}` did not answer: {e}")),
        };
    }
    Answer::Error("busy", "the job's record kept changing; try again".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_errors_name_the_problem() {
        assert_eq!(parse("status", b""), (None, Ok(Request::Status)));
        assert_eq!(
            parse("cancel", br#"{"id": "r1", "job_id": "j"}"#),
            (Some("r1".into()), Ok(Request::Cancel("j".into())))
        );
        let (_, missing) = parse("cancel", br#"{"id": "r1"}"#);
        assert!(matches!(missing, Err(Answer::Error("invalid_request", m)) if m.contains("job_id")));
        let (_, typo) = parse("status", br#"{"verbose": true}"#);
        assert!(matches!(typo, Err(Answer::Error("invalid_request", m)) if m.contains("verbose")));
        assert!(matches!(parse("queue", b"{}").1, Err(Answer::Error("unknown_command", _))));
        assert!(matches!(parse("status", b"[1]").1, Err(Answer::Error("invalid_json", _))));
        let answer = Answer::Error("busy", "x".into()).to_json(Some("r"));
        assert_eq!(answer, json!({"id": "r", "status": "error", "error": {"code": "busy", "message": "x"}}));
    }
}
