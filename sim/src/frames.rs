//! Frame rewriting (fresh prompt ids, timestamps), binary preview codecs and routing rules.

use std::collections::HashMap;

use serde_json::Value;

use super::transcript::FrameBody;

/// Binary event type of a preview with JSON metadata.
const PREVIEW_WITH_METADATA: u32 = 4;
/// Binary event type of a plain preview image.
const PREVIEW_IMAGE: u32 = 1;

/// A frame ready to be sent, after rewriting.
#[derive(Debug, Clone)]
pub(crate) enum Payload {
    /// Serialized JSON text frame.
    Text(String),
    /// Binary frame sent verbatim.
    Binary(Vec<u8>),
    /// Type-4 preview; clients that did not negotiate metadata get `type1` instead.
    Preview {
        /// The type-4 frame.
        type4: Vec<u8>,
        /// The equivalent type-1 frame.
        type1: Vec<u8>,
    },
}

/// Who receives a frame.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Target {
    /// Every registered socket.
    All,
    /// Only the socket registered under this id.
    Only(String),
    /// Nobody.
    Nobody,
}

/// A fresh uuid-v4-like string.
pub(crate) fn new_uuid() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        8 + (b >> 62),
        (b >> 48) & 0xfff,
        b & 0xffff_ffff_ffff
    )
}

/// A uuid4().hex-like id (32 hex chars), as ComfyUI makes for anonymous sockets.
pub(crate) fn new_hex_id() -> String {
    new_uuid().replace('-', "")
}

/// Current Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Replace every string equal to a mapped prompt id, recursively.
pub(crate) fn substitute(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(new) = map.get(s.as_str()) {
                *s = new.clone();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| substitute(i, map)),
        Value::Object(obj) => obj.values_mut().for_each(|i| substitute(i, map)),
        _ => {}
    }
}

/// Rewrite a recorded text frame: new prompt ids and a current `timestamp`.
pub(crate) fn rewrite_text(data: &Value, map: &HashMap<String, String>) -> Value {
    let mut v = data.clone();
    substitute(&mut v, map);
    if let Some(ts) = v.get_mut("data").and_then(|d| d.get_mut("timestamp")) {
        if ts.is_number() {
            *ts = Value::from(now_ms());
        }
    }
    v
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Split a type-4 frame into (metadata JSON, image bytes).
pub(crate) fn parse_type4(bytes: &[u8]) -> Option<(Value, &[u8])> {
    if be_u32(bytes, 0)? != PREVIEW_WITH_METADATA {
        return None;
    }
    let len = be_u32(bytes, 4)? as usize;
    let meta = bytes.get(8..8usize.checked_add(len)?)?;
    let meta: Value = serde_json::from_slice(meta).ok()?;
    Some((meta, &bytes[8 + len..]))
}

/// Encode a type-4 frame.
pub(crate) fn encode_type4(meta: &Value, image: &[u8]) -> Vec<u8> {
    let meta = meta.to_string().into_bytes();
    let mut out = Vec::with_capacity(8 + meta.len() + image.len());
    out.extend_from_slice(&PREVIEW_WITH_METADATA.to_be_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(image);
    out
}

/// Encode a type-1 frame (format 1 = JPEG, 2 = PNG).
fn encode_type1(image_type: &str, image: &[u8]) -> Vec<u8> {
    let format: u32 = if image_type == "image/png" { 2 } else { 1 };
    let mut out = Vec::with_capacity(8 + image.len());
    out.extend_from_slice(&PREVIEW_IMAGE.to_be_bytes());
    out.extend_from_slice(&format.to_be_bytes());
    out.extend_from_slice(image);
    out
}

/// Rewrite a recorded binary frame; type-4 metadata gets the new prompt ids.
pub(crate) fn rewrite_binary(bytes: &[u8], map: &HashMap<String, String>) -> Payload {
    match parse_type4(bytes) {
        Some((mut meta, image)) => {
            substitute(&mut meta, map);
            let image_type = meta["image_type"].as_str().unwrap_or("image/jpeg");
            Payload::Preview { type1: encode_type1(image_type, image), type4: encode_type4(&meta, image) }
        }
        None => Payload::Binary(bytes.to_vec()),
    }
}

/// The prompt id a recorded frame belongs to, if it names one.
pub(crate) fn frame_prompt_id(body: &FrameBody) -> Option<String> {
    let id = match body {
        FrameBody::Text(v) => v["data"]["prompt_id"].as_str().map(str::to_string),
        FrameBody::Binary(b) => parse_type4(b).and_then(|(m, _)| m["prompt_id"].as_str().map(str::to_string)),
    };
    id.filter(|s| !s.is_empty())
}

/// Routing for a prompt queued with or without `client_id` (docs/PROTOCOL.md §3).
pub(crate) fn route(body: &FrameBody, client_id: Option<&str>) -> Target {
    let kind = match body {
        FrameBody::Text(v) => v["type"].as_str().unwrap_or(""),
        FrameBody::Binary(b) => match be_u32(b, 0) {
            Some(1) | Some(4) => "preview",
            _ => "",
        },
    };
    let only = |fallback: Target| match client_id {
        Some(id) => Target::Only(id.to_string()),
        None => fallback,
    };
    match kind {
        "execution_start" | "execution_cached" | "execution_success" | "execution_error" | "executing" | "executed" => {
            only(Target::Nobody)
        }
        "execution_interrupted" | "progress" | "progress_state" | "preview" => only(Target::All),
        _ => Target::All,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type4_roundtrip_substitutes() {
        let meta = serde_json::json!({"node_id": "2", "prompt_id": "old", "image_type": "image/png"});
        let frame = encode_type4(&meta, b"IMG");
        let map = HashMap::from([("old".to_string(), "new".to_string())]);
        let Payload::Preview { type4, type1 } = rewrite_binary(&frame, &map) else {
            panic!("not a preview");
        };
        let (m, img) = parse_type4(&type4).expect("type 4");
        assert_eq!(m["prompt_id"], "new");
        assert_eq!(img, b"IMG");
        assert_eq!(&type1[..8], &[0, 0, 0, 1, 0, 0, 0, 2]);
    }

    #[test]
    fn truncated_binary_is_passed_through() {
        let map = HashMap::new();
        assert!(matches!(rewrite_binary(&[0, 0, 0, 4, 0, 0, 9, 9], &map), Payload::Binary(_)));
        assert!(parse_type4(&[0, 0]).is_none());
    }

    #[test]
    fn uuid_shape() {
        let id = new_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }
}
