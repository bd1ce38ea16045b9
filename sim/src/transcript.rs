//! Loading recorded ComfyUI transcripts (JSON Lines) into replayable scenarios.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::Value;

/// One frame the server sent to the primary client, with its recorded time.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    /// Seconds since the scenario started.
    pub t: f64,
    /// The frame payload.
    pub body: FrameBody,
}

/// Payload of a recorded frame.
#[derive(Debug, Clone)]
pub(crate) enum FrameBody {
    /// A JSON text frame.
    Text(Value),
    /// An exact binary frame.
    Binary(Vec<u8>),
}

/// A successful `POST /prompt` seen in a transcript.
#[derive(Debug, Clone)]
pub(crate) struct RecordedPost {
    /// The prompt id the server answered with.
    pub prompt_id: String,
    /// The `prompt` graph of the request.
    pub prompt: Value,
}

/// A `POST /prompt` that ComfyUI rejected with HTTP 400 in a transcript.
#[derive(Debug, Clone)]
pub(crate) struct RecordedRejection {
    /// The `prompt` graph of the request.
    pub prompt: Value,
    /// The recorded 400 body (`{"error", "node_errors"}`).
    pub response: Value,
}

/// A loaded transcript.
#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    /// File stem.
    pub name: String,
    /// Frames received by the primary client, on-connect frames removed.
    pub frames: Vec<Frame>,
    /// Successful prompt submissions, in order.
    pub posts: Vec<RecordedPost>,
    /// Rejected prompt submissions, answered again with the recorded 400.
    pub rejections: Vec<RecordedRejection>,
    /// Every recorded prompt id, in order of first appearance.
    pub prompt_ids: Vec<String>,
}

/// Sessions carried in the binary, played when no transcript is given: one of each outcome a user meets
/// (success, all cached, node error, validation errors, interrupt, three queued prompts), 128 KB.
/// The other recordings under `tests/fixtures/transcripts` serve the tests; `--transcript` plays any of them.
macro_rules! built_in {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../tests/fixtures/transcripts/", $name, ".jsonl")))),*]
    };
}
const BUILT_IN: &[(&str, &str)] =
    built_in!["a_success", "b_cached", "c_execution_error", "d_validation_errors", "e_interrupt", "f_three_prompts"];

/// The sessions carried in the binary.
pub(crate) fn built_in() -> Vec<Scenario> {
    BUILT_IN.iter().map(|(name, text)| parse_scenario(name, text)).collect()
}

/// Expand files and directories into a sorted list of `.jsonl` files.
fn collect_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            match std::fs::read_dir(p) {
                Ok(rd) => {
                    let mut files: Vec<PathBuf> = rd
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|f| f.extension().is_some_and(|x| x == "jsonl"))
                        .collect();
                    files.sort();
                    out.extend(files);
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot read transcript dir")
                }
            }
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// Load every transcript found under `paths`; unreadable files are skipped with a warning.
pub(crate) fn load_all(paths: &[PathBuf]) -> Vec<Scenario> {
    collect_files(paths)
        .iter()
        .filter_map(|f| match std::fs::read_to_string(f) {
            Ok(text) => Some(parse_scenario(&stem(f), &text)),
            Err(e) => {
                tracing::warn!(path = %f.display(), error = %e, "cannot read transcript");
                None
            }
        })
        .collect()
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Parse the text of one transcript.
pub(crate) fn parse_scenario(name: &str, text: &str) -> Scenario {
    let lines: Vec<Value> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .filter_map(|(i, l)| match serde_json::from_str::<Value>(l) {
            Ok(v) if v.is_object() => Some(v),
            _ => {
                tracing::warn!(scenario = name, line = i + 1, "skipping malformed transcript line");
                None
            }
        })
        .collect();
    let posts = recorded_posts(&lines);
    let rejections = recorded_rejections(&lines);
    let primary = primary_label(&lines);
    let frames = primary_frames(name, &lines, primary.as_deref());
    let prompt_ids = collect_prompt_ids(&posts, &frames);
    Scenario { name: name.to_string(), frames, posts, rejections, prompt_ids }
}

fn kind(v: &Value) -> &str {
    v.get("kind").and_then(Value::as_str).unwrap_or("")
}

fn recorded_posts(lines: &[Value]) -> Vec<RecordedPost> {
    lines
        .iter()
        .filter(|l| kind(l) == "http" && l["method"] == "POST" && l["path"] == "/prompt")
        .filter(|l| l["status"] == 200)
        .filter_map(|l| {
            Some(RecordedPost {
                prompt_id: l["response"]["prompt_id"].as_str()?.to_string(),
                prompt: l["request"].get("prompt").cloned().unwrap_or(Value::Null),
            })
        })
        .collect()
}

fn recorded_rejections(lines: &[Value]) -> Vec<RecordedRejection> {
    lines
        .iter()
        .filter(|l| kind(l) == "http" && l["method"] == "POST" && l["path"] == "/prompt" && l["status"] == 400)
        .filter_map(|l| {
            let prompt = l["request"].get("prompt").filter(|p| p.is_object())?;
            Some(RecordedRejection { prompt: prompt.clone(), response: l["response"].clone() })
        })
        .collect()
}

/// The label of the client that submitted the first prompt, else the first client in meta.
fn primary_label(lines: &[Value]) -> Option<String> {
    let meta = lines.iter().find(|l| kind(l) == "meta")?;
    let clients = meta.get("clients")?.as_object()?;
    let submitter = lines
        .iter()
        .find(|l| kind(l) == "http" && l["path"] == "/prompt" && l["status"] == 200)
        .and_then(|l| l["request"]["client_id"].as_str());
    let by_submitter =
        submitter.and_then(|id| clients.iter().find(|(_, v)| v.as_str() == Some(id)).map(|(k, _)| k.clone()));
    by_submitter.or_else(|| clients.keys().next().cloned())
}

fn primary_frames(name: &str, lines: &[Value], primary: Option<&str>) -> Vec<Frame> {
    let mut frames = Vec::new();
    for l in lines {
        if l["dir"] != "in" || l["client"].as_str() != primary {
            continue;
        }
        let t = l["t"].as_f64().unwrap_or(0.0);
        match kind(l) {
            "text" if is_connect_frame(&l["data"]) => {}
            "text" => frames.push(Frame { t, body: FrameBody::Text(l["data"].clone()) }),
            "binary" => match decode_b64(l) {
                Some(bytes) => frames.push(Frame { t, body: FrameBody::Binary(bytes) }),
                None => tracing::warn!(scenario = name, t, "skipping undecodable binary frame"),
            },
            _ => {}
        }
    }
    frames
}

fn decode_b64(line: &Value) -> Option<Vec<u8>> {
    let b64 = line.get("b64")?.as_str()?;
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// The on-connect `status` (with `sid`) and `feature_flags` answers are not replayed.
fn is_connect_frame(data: &Value) -> bool {
    match data["type"].as_str() {
        Some("feature_flags") => true,
        Some("status") => data["data"].get("sid").is_some(),
        _ => false,
    }
}

fn collect_prompt_ids(posts: &[RecordedPost], frames: &[Frame]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let mut add = |id: &str| {
        if !id.is_empty() && !ids.iter().any(|x| x == id) {
            ids.push(id.to_string());
        }
    };
    for p in posts {
        add(&p.prompt_id);
    }
    for f in frames {
        if let Some(id) = super::frames::frame_prompt_id(&f.body) {
            add(&id);
        }
    }
    ids
}
