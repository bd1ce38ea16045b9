//! The recorded fixtures under `tests/fixtures/`: ComfyUI sessions (transcripts), the workflows they ran, and
//! the small readers every test file uses on them. The one place that knows where they are.

use std::path::PathBuf;

use serde_json::Value;

/// `tests/fixtures`.
pub fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

/// The directory of every recorded session (`<scenario>.jsonl`).
pub fn transcripts() -> PathBuf {
    root().join("transcripts")
}

/// The transcript of `scenario`, a file stem such as `a_success`.
pub fn transcript(scenario: &str) -> PathBuf {
    transcripts().join(format!("{scenario}.jsonl"))
}

/// The file of the API-format workflow `name`, a file stem under `tests/fixtures/workflows` such as
/// `a_success__prompt`.
pub fn workflow_path(name: &str) -> PathBuf {
    root().join("workflows").join(format!("{name}.json"))
}

/// The API-format workflow `name`, parsed.
pub fn workflow(name: &str) -> Value {
    let path = workflow_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A payload as JSON; `Null` when it is not JSON, so an assertion on one of its fields fails and shows it.
pub fn json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or(Value::Null)
}

/// The text frames ComfyUI sent to the recorded client in `scenario`, as `{"type", "data"}`, in order.
pub fn recorded_frames(scenario: &str) -> Vec<Value> {
    let path = transcript(scenario);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["kind"] == "text" && l["dir"] == "in")
        .map(|l| l["data"].clone())
        .collect()
}
