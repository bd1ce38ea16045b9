//! The jobs API of ComfyUI versions after 0.3.64 (docs/PROTOCOL.md §11): `GET /api/jobs`, `GET /api/jobs/{id}`
//! and `POST /api/jobs/{id}/cancel`, over the same queue and history as `/queue` and `/history`.
//!
//! A job is a queue item or a history entry in one shape: `{"id", "status", "priority", "create_time",
//! "outputs_count", …}`, status `pending`, `in_progress`, `completed`, `failed` or `cancelled` (an interrupted
//! prompt: its history says `error`, its messages `execution_interrupted`). Cancelling happens under the state
//! lock, so it cannot land on a prompt that started in the meantime.

use serde_json::{json, Map, Value};

use super::http::Response;
use super::server::Request;
use super::Shared;

/// Every job status, in ComfyUI's order.
const STATUSES: [&str; 5] = ["pending", "in_progress", "completed", "failed", "cancelled"];

/// `GET /api/jobs`: `status` (comma list), `sort_order` (`asc`|`desc`, by creation time), `limit`, `offset`.
pub(crate) fn list(shared: &Shared, req: &Request) -> Response {
    let wanted: Vec<String> = match req.query_param("status") {
        Some(s) => s.split(',').map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty()).collect(),
        None => STATUSES.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(bad) = wanted.iter().find(|s| !STATUSES.contains(&s.as_str())) {
        return error(400, &format!("Invalid status value(s): {bad}"));
    }
    let descending = match req.query_param("sort_order").unwrap_or("desc") {
        "desc" => true,
        "asc" => false,
        _ => return error(400, "sort_order must be 'asc' or 'desc'"),
    };
    let limit = match req.query_param("limit").map(str::parse::<usize>) {
        None => None,
        Some(Ok(n)) if n > 0 => Some(n),
        Some(_) => return error(400, "limit must be a positive integer"),
    };
    let offset = req.query_param("offset").and_then(|o| o.parse::<usize>().ok()).unwrap_or(0);
    let mut jobs: Vec<Value> = all(shared).into_iter().filter(|j| wanted.iter().any(|w| j["status"] == **w)).collect();
    jobs.sort_by_key(|j| j["create_time"].as_u64().unwrap_or(0));
    if descending {
        jobs.reverse();
    }
    let total = jobs.len();
    let page: Vec<Value> = jobs.into_iter().skip(offset).take(limit.unwrap_or(usize::MAX)).collect();
    let has_more = offset + page.len() < total;
    let pagination = json!({"offset": offset, "limit": limit, "total": total, "has_more": has_more});
    Response::json(200, &json!({"jobs": page, "pagination": pagination}))
}

/// `GET /api/jobs/{id}`: one job with its workflow (and, once finished, its outputs and execution status); 404
/// when the server knows no such prompt.
pub(crate) fn one(shared: &Shared, id: &str) -> Response {
    let st = shared.lock();
    if let Some((_, entry)) = st.history.iter().find(|(k, _)| k == id) {
        return Response::json(200, &from_history(id, entry, true));
    }
    let (running, pending) = super::http::queue_items(&st);
    let queued = running.iter().map(|i| (i, "in_progress")).chain(pending.iter().map(|i| (i, "pending")));
    match queued.into_iter().find(|(item, _)| item[1] == id) {
        Some((item, status)) => Response::json(200, &from_queue(item, status, true)),
        None => error(404, "Job not found"),
    }
}

/// `POST /api/jobs/{id}/cancel`: interrupts the prompt if it is the one running, else removes it if it is
/// pending; `{"cancelled": false}` for a prompt that finished or never existed.
pub(crate) fn cancel(shared: &Shared, id: &str) -> Response {
    let dequeued = {
        let mut st = shared.lock();
        if let Some(job) = st.running.as_ref().filter(|j| j.id == id) {
            job.cancel.cancel();
            return Response::json(200, &json!({"cancelled": true}));
        }
        match st.pending.iter().position(|j| j.id == id) {
            Some(i) => {
                st.pending.remove(i);
                true
            }
            None => false,
        }
    };
    if dequeued {
        shared.broadcast_status();
    }
    Response::json(200, &json!({"cancelled": dequeued}))
}

/// Every job: running, pending, then history.
fn all(shared: &Shared) -> Vec<Value> {
    let st = shared.lock();
    let (running, pending) = super::http::queue_items(&st);
    let queued = running.iter().map(|i| from_queue(i, "in_progress", false));
    let waiting = pending.iter().map(|i| from_queue(i, "pending", false));
    let finished = st.history.iter().map(|(id, entry)| from_history(id, entry, false));
    queued.chain(waiting).chain(finished).collect()
}

/// A job from a queue item `[number, id, prompt, extra_data, outputs_to_execute]`.
fn from_queue(item: &Value, status: &str, full: bool) -> Value {
    let mut job = json!({"id": item[1], "status": status, "priority": item[0], "outputs_count": 0});
    if let Some(t) = item[3].get("create_time") {
        job["create_time"] = t.clone();
    }
    if full {
        job["workflow"] = json!({"prompt": item[2], "extra_data": item[3]});
    }
    job
}

/// A job from a history entry; `full` adds outputs, execution status and workflow.
fn from_history(id: &str, entry: &Value, full: bool) -> Value {
    let item = &entry["prompt"];
    let status = &entry["status"];
    let messages = status["messages"].as_array().cloned().unwrap_or_default();
    let message = |kind: &str| messages.iter().find(|m| m[0] == kind).map(|m| m[1].clone());
    let interrupted = message("execution_interrupted").is_some();
    let state = match (status["status_str"].as_str(), interrupted) {
        (Some("error"), true) => "cancelled",
        (Some("error"), false) => "failed",
        _ => "completed",
    };
    let outputs = entry["outputs"].as_object().cloned().unwrap_or_default();
    let count: usize = outputs
        .values()
        .filter_map(Value::as_object)
        .flat_map(Map::values)
        .filter_map(Value::as_array)
        .map(Vec::len)
        .sum();
    let mut job = json!({"id": id, "status": state, "priority": item[0], "outputs_count": count});
    if let Some(t) = item[3].get("create_time") {
        job["create_time"] = t.clone();
    }
    let time = |kind: &str| message(kind).and_then(|d| d.get("timestamp").cloned());
    if let Some(t) = time("execution_start") {
        job["execution_start_time"] = t;
    }
    let end = ["execution_success", "execution_error", "execution_interrupted"].into_iter().find_map(time);
    if let Some(t) = end {
        job["execution_end_time"] = t;
    }
    if let Some(e) = message("execution_error") {
        job["execution_error"] = e;
    }
    if full {
        job["outputs"] = Value::Object(outputs);
        job["execution_status"] = status.clone();
        job["workflow"] = json!({"prompt": item[2], "extra_data": item[3]});
    }
    job
}

fn error(status: u16, message: &str) -> Response {
    Response::json(status, &json!({"error": message}))
}

/// Whether `id` is a UUID in canonical lowercase hyphenated form, the only prompt ids newer servers take.
pub(crate) fn is_canonical_uuid(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_lowercase_uuids_pass() {
        assert!(is_canonical_uuid("2c0f5f3e-8d1a-4b7e-9c3d-0123456789ab"));
        for bad in [
            "2C0F5F3E-8D1A-4B7E-9C3D-0123456789AB",
            "2c0f5f3e8d1a4b7e9c3d0123456789ab",
            "{2c0f5f3e-8d1a-4b7e-9c3d-0123456789ab}",
            "bridge-1",
            "",
        ] {
            assert!(!is_canonical_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn an_interrupted_prompt_is_a_cancelled_job_and_an_error_a_failed_one() {
        let entry = |status_str: &str, last: &str| {
            json!({"prompt": [3, "p", {}, {"create_time": 7}, ["9"]], "outputs": {"9": {"images": [{}, {}]}},
                   "status": {"status_str": status_str, "messages": [
                       ["execution_start", {"timestamp": 1}], [last, {"timestamp": 2}]]}})
        };
        let job = from_history("p", &entry("error", "execution_interrupted"), false);
        assert_eq!((job["status"].as_str(), job["execution_end_time"].as_u64()), (Some("cancelled"), Some(2)));
        assert_eq!(from_history("p", &entry("error", "execution_error"), false)["status"], "failed");
        let done = from_history("p", &entry("success", "execution_success"), true);
        assert_eq!((done["status"].as_str(), done["outputs_count"].as_u64()), (Some("completed"), Some(2)));
        assert_eq!(
            (done["create_time"].as_u64(), done["workflow"]["extra_data"]["create_time"].as_u64()),
            (Some(7), Some(7))
        );
    }
}
