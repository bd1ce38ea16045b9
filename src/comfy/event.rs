//! ComfyUI's WebSocket frames as values.
//!
//! A text frame is `{"type", "data"}`. The bridge republishes `data` exactly as ComfyUI sent it, so it is kept as
//! a [`RawValue`] and only the few fields routing needs (prompt id, node ids) are read out of it. Binary frames
//! are decoded per docs/PROTOCOL.md §5: big-endian u32 type, then a type-specific layout.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

mod scan;

/// A message type ComfyUI's core sends; anything else (custom `send_sync` events) is [`Kind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `status`: queue size changed (also the first message on connect).
    Status,
    /// `feature_flags`: the server's answer to the bridge's flags.
    FeatureFlags,
    /// `execution_start`.
    ExecutionStart,
    /// `execution_cached`.
    ExecutionCached,
    /// `executing`: a node started, or (node null) the prompt finished.
    Executing,
    /// `progress`.
    Progress,
    /// `progress_state`.
    ProgressState,
    /// `executed`.
    Executed,
    /// `execution_success`.
    ExecutionSuccess,
    /// `execution_error`.
    ExecutionError,
    /// `execution_interrupted`.
    ExecutionInterrupted,
    /// `logs`.
    Logs,
    /// Any other type, kept verbatim in [`TextEvent::kind_name`].
    Other,
}

impl Kind {
    /// The `type` strings of the known kinds, in declaration order: [`Kind::index`] points into it.
    pub const NAMES: [&'static str; 12] = [
        "status",
        "feature_flags",
        "execution_start",
        "execution_cached",
        "executing",
        "progress",
        "progress_state",
        "executed",
        "execution_success",
        "execution_error",
        "execution_interrupted",
        "logs",
    ];

    /// Where a known kind's name is in [`Kind::NAMES`]; `None` for [`Kind::Other`].
    pub fn index(self) -> Option<usize> {
        (self != Self::Other).then_some(self as usize)
    }

    fn from_name(name: &str) -> Self {
        match name {
            "status" => Self::Status,
            "feature_flags" => Self::FeatureFlags,
            "execution_start" => Self::ExecutionStart,
            "execution_cached" => Self::ExecutionCached,
            "executing" => Self::Executing,
            "progress" => Self::Progress,
            "progress_state" => Self::ProgressState,
            "executed" => Self::Executed,
            "execution_success" => Self::ExecutionSuccess,
            "execution_error" => Self::ExecutionError,
            "execution_interrupted" => Self::ExecutionInterrupted,
            "logs" => Self::Logs,
            _ => Self::Other,
        }
    }
}

/// A text frame: its type, the untouched `data`, and the ids routing needs. It keeps the frame as received
/// (shared, not copied); `data` and the ids are places in it.
#[derive(Debug)]
pub struct TextEvent {
    /// The known type, or [`Kind::Other`].
    pub kind: Kind,
    /// The `type` string exactly as sent.
    pub kind_name: Cow<'static, str>,
    frame: Utf8Bytes,
    /// Where `data` is in the frame.
    data: Range<usize>,
    prompt_id: Option<Id>,
    node_id: Option<Id>,
    /// For `progress`: where `data.value` and `data.max` are in `data`, unparsed until asked for.
    tick: Option<(Range<usize>, Range<usize>)>,
}

/// An id: a plain JSON string's contents in the frame, or (escaped strings, numbers) its own text.
#[derive(Debug)]
enum Id {
    At(Range<usize>),
    Owned(Box<str>),
}

/// Where `part`, a slice of `whole`, starts in it.
fn offset(whole: &str, part: &str) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

impl TextEvent {
    /// The event of `frame`, whose `type` is `kind_name` and whose `data` (a slice of the frame) is valid JSON.
    fn new(frame: &Utf8Bytes, kind_name: &str, data: &str, found: Option<Found<'_>>) -> Self {
        // `data` need not be an object (custom events may send anything); then it names no ids.
        let ids = match found {
            Some(found) => found.ids(data),
            None if data.starts_with('{') => Ids::of(data),
            None => Ids::default(),
        };
        let kind = Kind::from_name(kind_name);
        let id = |raw: Option<&str>| -> Option<Id> {
            let raw = raw?;
            match raw.as_bytes().first()? {
                b'"' if !raw.contains('\\') => {
                    let start = offset(frame, raw) + 1;
                    Some(Id::At(start..start + raw.len() - 2))
                }
                _ => as_id(Some(raw)).map(|id| Id::Owned(id.into())),
            }
        };
        let node_id = match kind {
            // Errors and interrupts name the failing node as `node_id` (docs/PROTOCOL.md §4.10, §4.11).
            Kind::ExecutionError | Kind::ExecutionInterrupted => id(ids.node_id),
            _ => id(ids.display_node).or_else(|| id(ids.node)),
        };
        let start = offset(frame, data);
        Self {
            kind,
            kind_name: match kind.index() {
                Some(i) => Cow::Borrowed(Kind::NAMES[i]),
                None => Cow::Owned(kind_name.to_string()),
            },
            prompt_id: id(ids.prompt_id),
            node_id,
            tick: ids.tick.filter(|_| kind == Kind::Progress),
            data: start..start + data.len(),
            frame: frame.clone(),
        }
    }

    /// A `status` message's `status.exec_info.queue_remaining`.
    pub fn queue_remaining(&self) -> Option<u64> {
        let data: serde_json::Value = serde_json::from_str(self.data()).ok()?;
        data.pointer("/status/exec_info/queue_remaining")?.as_u64()
    }

    /// An `execution_error` that only says a node blocked execution, which is not the end of the prompt
    /// (docs/PROTOCOL.md §4.10).
    pub fn is_blocked(&self) -> bool {
        #[derive(Deserialize)]
        struct Error<'a> {
            #[serde(borrow)]
            exception_type: Option<Cow<'a, str>>,
        }
        self.kind == Kind::ExecutionError
            && serde_json::from_str::<Error>(self.data())
                .is_ok_and(|e| e.exception_type.as_deref() == Some("ExecutionBlocked"))
    }

    /// `data` exactly as sent.
    pub fn data(&self) -> &str {
        self.frame.get(self.data.clone()).unwrap_or("null")
    }

    /// `data.prompt_id` when it is a string (or a number, in its JSON form).
    pub fn prompt_id(&self) -> Option<&str> {
        self.id(self.prompt_id.as_ref())
    }

    /// `data.display_node` when present, else `data.node` (else `data.node_id` for errors); `None` when null.
    pub fn node_id(&self) -> Option<&str> {
        self.id(self.node_id.as_ref())
    }

    fn id<'a>(&'a self, id: Option<&'a Id>) -> Option<&'a str> {
        match id? {
            Id::At(range) => self.frame.get(range.clone()),
            Id::Owned(id) => Some(id),
        }
    }

    /// For `progress`: `data.value` and `data.max` when both are numbers, read as serde reads
    /// `{value: Option<f64>, max: Option<f64>}` (so what the tracker reads of a tick, without parsing `data`).
    pub fn progress(&self) -> Option<(f64, f64)> {
        let (value, max) = self.tick.as_ref()?;
        let data = self.data();
        Some((number(data.get(value.clone())?)?, number(data.get(max.clone())?)?))
    }
}

/// A raw JSON number as `f64`, as serde_json converts it: integers exactly when below 2^53 (the common case,
/// parsed here directly), anything else through serde_json.
fn number(raw: &str) -> Option<f64> {
    if raw.len() <= 15 && !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        return raw.parse::<u64>().ok().map(|n| n as f64);
    }
    serde_json::from_str(raw).ok()
}

/// Decoding failures; each is counted and the frame skipped.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A text frame that is not `{"type": string, "data": any}`.
    #[error("invalid JSON text frame: {0}")]
    InvalidJson(String),
    /// A binary frame shorter than its layout says.
    #[error("truncated binary frame of type {kind} ({len} bytes)")]
    Truncated {
        /// The binary event type.
        kind: u32,
        /// The frame's length.
        len: usize,
    },
    /// A binary type this bridge does not know.
    #[error("unknown binary frame type {0}")]
    UnknownBinaryType(u32),
    /// Type-3 node id or type-4 metadata that is not valid UTF-8 / JSON.
    #[error("invalid binary frame header: {0}")]
    InvalidHeader(String),
}

impl FrameError {
    /// A short, stable label for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::Truncated { .. } => "truncated_binary",
            Self::UnknownBinaryType(_) => "unknown_binary_type",
            Self::InvalidHeader(_) => "invalid_binary_header",
        }
    }
}

/// `{"type", "data"}`, borrowed from the frame: `data` is copied once, into [`TextEvent::data`].
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// The fields routing (and the tracker, for progress) read from `data`, as raw JSON borrowed from it.
#[derive(Default)]
struct Ids<'a> {
    prompt_id: Option<&'a str>,
    node: Option<&'a str>,
    display_node: Option<&'a str>,
    node_id: Option<&'a str>,
    /// Where `value` and `max` are, when both are present, not `null` and not repeated.
    tick: Option<(Range<usize>, Range<usize>)>,
}

impl<'a> Ids<'a> {
    /// The fields of `data`, an object already known to be valid JSON, found by walking its top-level members
    /// without parsing the values (most of a frame). Read as serde reads a struct of `Option`s: `null` is no
    /// value, and a field given twice (even as `null`) makes the whole struct fail, so names nothing at all.
    /// The ids and the progress numbers are two such structs.
    fn of(data: &'a str) -> Self {
        let mut found = Found::default();
        let mut members = Members { text: data, at: 1 };
        while let Some((key, value)) = members.next() {
            found.member(&key, value);
        }
        found.ids(data)
    }
}

/// The routing fields among an object's top-level members, as they are met.
#[derive(Default)]
pub(super) struct Found<'a> {
    /// Per field (`prompt_id`, `node`, `display_node`, `node_id`, `value`, `max`): not met, met as `null`, or met with a raw value.
    slots: [Option<Option<&'a str>>; 6],
    /// An id field, or a progress number, was met twice.
    ids_failed: bool,
    tick_failed: bool,
}

impl<'a> Found<'a> {
    /// The member `key` (unescaped) with the raw JSON `value`.
    pub(super) fn member(&mut self, key: &str, value: &'a str) {
        let i = match key {
            "prompt_id" => 0,
            "node" => 1,
            "display_node" => 2,
            "node_id" => 3,
            "value" => 4,
            "max" => 5,
            _ => return,
        };
        if self.slots[i].is_some() {
            *if i < 4 { &mut self.ids_failed } else { &mut self.tick_failed } = true;
        }
        self.slots[i] = Some(Some(value).filter(|v| *v != "null"));
    }

    /// What was found in `data`, whose members the values are slices of.
    fn ids(self, data: &'a str) -> Ids<'a> {
        let get = |i: usize| self.slots[i].flatten();
        // `value` is a slice of `data`: its offset is where it starts in `data`.
        let range = |v: &str| {
            let start = v.as_ptr() as usize - data.as_ptr() as usize;
            start..start + v.len()
        };
        let tick = match (self.tick_failed, get(4), get(5)) {
            (false, Some(value), Some(max)) => Some((range(value), range(max))),
            _ => None,
        };
        match self.ids_failed {
            true => Ids { tick, ..Ids::default() },
            false => Ids { prompt_id: get(0), node: get(1), display_node: get(2), node_id: get(3), tick },
        }
    }
}

/// The top-level members of a valid JSON object, from just after its `{`: (key, raw value) pairs. Only for text
/// serde_json has validated: it checks nothing and stops at anything unexpected.
struct Members<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Members<'a> {
    fn next(&mut self) -> Option<(Cow<'a, str>, &'a str)> {
        let bytes = self.text.as_bytes();
        self.skip_whitespace_and(b',');
        let key_start = self.at;
        if bytes.get(key_start) != Some(&b'"') {
            return None; // `}`: the end
        }
        self.at = string_end(bytes, key_start)?;
        let raw_key = self.text.get(key_start..self.at)?;
        let key = match raw_key.contains('\\') {
            false => Cow::Borrowed(raw_key.get(1..raw_key.len() - 1)?),
            true => Cow::Owned(serde_json::from_str(raw_key).ok()?),
        };
        self.skip_whitespace_and(b':');
        let value_start = self.at;
        self.at = value_end(bytes, value_start)?;
        Some((key, self.text.get(value_start..self.at)?))
    }

    /// Skips whitespace, one `separator`, and whitespace again.
    fn skip_whitespace_and(&mut self, separator: u8) {
        let bytes = self.text.as_bytes();
        while bytes.get(self.at).is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
        if bytes.get(self.at) == Some(&separator) {
            self.at += 1;
            while bytes.get(self.at).is_some_and(|b| b.is_ascii_whitespace()) {
                self.at += 1;
            }
        }
    }
}

/// Just past the string that starts (with its `"`) at `start`.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match bytes.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Just past the value that starts at `start`.
fn value_end(bytes: &[u8], start: usize) -> Option<usize> {
    match bytes.get(start)? {
        b'"' => string_end(bytes, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match bytes.get(i)? {
                    b'"' => {
                        i = string_end(bytes, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        // A number, `true`, `false` or `null`.
        _ => {
            let len = bytes[start..].iter().position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace());
            Some(start + len.unwrap_or(bytes.len() - start))
        }
    }
}

/// An id from a raw JSON value: a string as is, a number in its JSON form, anything else `None`.
fn as_id(value: Option<&str>) -> Option<String> {
    let raw = value?;
    match raw.as_bytes().first()? {
        // A valid JSON string without a backslash holds its text verbatim between the quotes.
        b'"' if !raw.contains('\\') => raw.get(1..raw.len() - 1).map(str::to_string),
        b'"' => serde_json::from_str(raw).ok(),
        b'-' | b'0'..=b'9' => serde_json::from_str::<serde_json::Number>(raw).ok().map(|n| n.to_string()),
        _ => None,
    }
}

/// Parses one text frame: the common shape in one pass ([`scan`]), anything else through serde_json.
pub fn parse_frame(frame: Utf8Bytes) -> Result<TextEvent, FrameError> {
    let text: &str = &frame;
    if let Some(found) = scan::frame(text) {
        return Ok(TextEvent::new(&frame, found.kind, found.data, found.found));
    }
    let envelope: Envelope = serde_json::from_str(text).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    Ok(TextEvent::new(&frame, &envelope.kind, envelope.data.get(), None))
}

/// [`parse_frame`] of a copy of `text`.
pub fn parse_text(text: &str) -> Result<TextEvent, FrameError> {
    parse_frame(Utf8Bytes::from(text.to_string()))
}

/// The image encoding of a preview.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// `image/jpeg`.
    Jpeg,
    /// `image/png`.
    Png,
    /// Another type named in type-4 metadata, or an unknown type-1 format code.
    Other,
}

impl ImageFormat {
    /// The MIME type for headers.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Other => "application/octet-stream",
        }
    }
}

/// A binary frame.
#[derive(Debug)]
pub enum BinaryEvent {
    /// Type 1 (no metadata) or type 4 (with metadata) preview image.
    Preview {
        /// Encoding of `image`.
        format: ImageFormat,
        /// `(prompt_id, node_id)` from type-4 metadata (`display_node_id`, else `node_id`); `None` for type 1.
        ids: Option<(Option<String>, Option<String>)>,
        /// The encoded image.
        image: Bytes,
    },
    /// Type 3: progress text for a node (no prompt id on the wire).
    Text {
        /// The node the text belongs to.
        node_id: String,
        /// The text.
        text: String,
    },
}

const PREVIEW_IMAGE: u32 = 1;
const TEXT: u32 = 3;
const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

fn read_u32(frame: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = frame.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// Parses one binary frame.
pub fn parse_binary(frame: Bytes) -> Result<BinaryEvent, FrameError> {
    let len = frame.len();
    let kind = read_u32(&frame, 0).ok_or(FrameError::Truncated { kind: 0, len })?;
    let truncated = FrameError::Truncated { kind, len };
    let word = read_u32(&frame, 4).ok_or(truncated.clone())? as usize;
    match kind {
        PREVIEW_IMAGE => {
            let format = match word {
                1 => ImageFormat::Jpeg,
                2 => ImageFormat::Png,
                _ => ImageFormat::Other,
            };
            let image = frame.slice(8..);
            Ok(BinaryEvent::Preview { format, ids: None, image })
        }
        TEXT => {
            let end = 8usize.checked_add(word).filter(|&end| end <= len).ok_or(truncated)?;
            let utf8 = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|e| FrameError::InvalidHeader(e.to_string()));
            Ok(BinaryEvent::Text {
                node_id: utf8(&frame[8..end])?,
                text: String::from_utf8_lossy(&frame[end..]).into_owned(),
            })
        }
        PREVIEW_IMAGE_WITH_METADATA => {
            let end = 8usize.checked_add(word).filter(|&end| end <= len).ok_or(truncated)?;
            let meta: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&frame[8..end]).map_err(|e| FrameError::InvalidHeader(e.to_string()))?;
            let field = |k: &str| match meta.get(k) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            let format = match meta.get("image_type").and_then(|v| v.as_str()) {
                Some("image/jpeg") => ImageFormat::Jpeg,
                Some("image/png") => ImageFormat::Png,
                _ => ImageFormat::Other,
            };
            let node = field("display_node_id").or_else(|| field("node_id"));
            Ok(BinaryEvent::Preview { format, ids: Some((field("prompt_id"), node)), image: frame.slice(end..) })
        }
        other => Err(FrameError::UnknownBinaryType(other)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::Engine as _;

    /// Every frame ComfyUI sent in a recorded session, text as `Ok(text)` and binary as `Err(bytes)`.
    pub(crate) fn recorded_frames(scenario: &str) -> Vec<Result<String, Vec<u8>>> {
        let path = format!("{}/tests/fixtures/transcripts/{scenario}.jsonl", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(path).expect("fixture exists");
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|l| l["dir"] == "in")
            .filter_map(|l| match l["kind"].as_str() {
                Some("text") => Some(Ok(l["data"].to_string())),
                Some("binary") => l["b64"]
                    .as_str()
                    .map(|b| Err(base64::engine::general_purpose::STANDARD.decode(b).expect("valid base64"))),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_recorded_text_frame_parses_and_keeps_its_data() {
        for entry in
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/transcripts")).expect("fixtures")
        {
            let path = entry.expect("entry").path();
            let scenario = path.file_stem().and_then(|s| s.to_str()).expect("name").to_string();
            for frame in recorded_frames(&scenario).into_iter().filter_map(Result::ok) {
                let event = parse_text(&frame).unwrap_or_else(|e| panic!("{scenario}: {e}"));
                let original: serde_json::Value = serde_json::from_str(&frame).expect("json");
                let data: serde_json::Value = serde_json::from_str(event.data()).expect("json");
                assert_eq!(data, original["data"], "{scenario}");
                assert_eq!(original["type"], &*event.kind_name, "{scenario}");
            }
        }
    }

    #[test]
    fn recorded_frames_take_the_fast_path_and_it_reads_them_as_serde_does() {
        let mut frames = 0;
        for entry in
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/transcripts")).expect("fixtures")
        {
            let path = entry.expect("entry").path();
            let scenario = path.file_stem().and_then(|s| s.to_str()).expect("name").to_string();
            for frame in recorded_frames(&scenario).into_iter().filter_map(Result::ok) {
                let fast = scan::frame(&frame).unwrap_or_else(|| panic!("{scenario}: slow path for {frame}"));
                let envelope: Envelope = serde_json::from_str(&frame).expect("valid");
                assert_eq!((fast.kind, fast.data), (&*envelope.kind, envelope.data.get()), "{scenario}");
                frames += 1;
            }
        }
        assert!(frames > 100, "the transcripts hold text frames");
    }

    #[test]
    fn routing_ids_come_from_display_node_then_node() {
        let e = parse_text(r#"{"type":"executing","data":{"node":"20.0.0.1","display_node":"20","prompt_id":"p"}}"#)
            .expect("parses");
        assert_eq!((e.kind, e.prompt_id(), e.node_id()), (Kind::Executing, Some("p"), Some("20")));
        let e = parse_text(r#"{"type":"executing","data":{"node":null,"prompt_id":"p"}}"#).expect("parses");
        assert_eq!(e.node_id(), None);
        let e = parse_text(r#"{"type":"progress","data":{"value":1,"max":2,"prompt_id":"p","node":"12:5"}}"#)
            .expect("parses");
        assert_eq!(e.node_id(), Some("12:5"));
        let e = parse_text(r#"{"type":"bridge_probe.custom","data":[1,2]}"#).expect("parses");
        assert_eq!((e.kind, e.prompt_id()), (Kind::Other, None));
    }

    #[test]
    fn ids_may_be_numbers_or_escaped_strings_and_other_values_name_nothing() {
        let e = parse_text(r#"{"type":"progress","data":{"prompt_id":"a\"b\u00e9","node":12,"display_node":null}}"#)
            .expect("parses");
        assert_eq!((e.prompt_id(), e.node_id()), (Some("a\"bé"), Some("12")));
        let e =
            parse_text(r#"{"type":"executed","data":{"prompt_id":1.5,"display_node":-3,"node":"x"}}"#).expect("parses");
        assert_eq!((e.prompt_id(), e.node_id()), (Some("1.5"), Some("-3")));
        let e = parse_text(r#"{"type":"executing","data":{"prompt_id":true,"node":{"id":"3"},"display_node":["3"]}}"#)
            .expect("parses");
        assert_eq!((e.prompt_id(), e.node_id()), (None, None));
        let e = parse_text(r#"{"type":"execution_error","data":{"prompt_id":"p","node_id":"7","node":"8"}}"#)
            .expect("parses");
        assert_eq!(e.node_id(), Some("7"));
    }

    #[test]
    fn a_blocked_node_is_told_apart_and_status_gives_the_queue() {
        let blocked = r#"{"type":"execution_error","data":{"prompt_id":"p","exception_type":"ExecutionBlocked"}}"#;
        assert!(parse_text(blocked).expect("parses").is_blocked());
        let failed = r#"{"type":"execution_error","data":{"prompt_id":"p","exception_type":"RuntimeError",
            "exception_message":"not \"ExecutionBlocked\""}}"#;
        assert!(!parse_text(failed).expect("parses").is_blocked(), "a message that only mentions it");
        let status = r#"{"type":"status","data":{"status":{"exec_info":{"queue_remaining":3}},"sid":"x"}}"#;
        assert_eq!(parse_text(status).expect("parses").queue_remaining(), Some(3));
    }

    #[test]
    fn known_names_index_their_kinds() {
        for (i, name) in Kind::NAMES.iter().enumerate() {
            assert_eq!(Kind::from_name(name).index(), Some(i), "{name}");
        }
        assert_eq!(Kind::from_name("custom").index(), None);
    }

    #[test]
    fn progress_numbers_are_read_as_serde_reads_them() {
        let tick = |data: &str| parse_text(&format!(r#"{{"type":"progress","data":{data}}}"#)).expect("parses");
        assert_eq!(tick(r#"{"value":5,"max":20,"prompt_id":"p"}"#).progress(), Some((5.0, 20.0)));
        assert_eq!(tick(r#"{"max":1e3,"value":-0.5}"#).progress(), Some((-0.5, 1000.0)));
        assert_eq!(tick(r#"{"value":123456789012345678,"max":2}"#).progress(), Some((123456789012345678.0, 2.0)));
        for data in [
            r#"{"value":"5","max":20}"#,
            r#"{"value":5}"#,
            r#"{"value":5,"max":null}"#,
            r#"{"value":1,"max":2,"max":3}"#,
        ] {
            assert_eq!(tick(data).progress(), None, "{data}");
        }
        let other = parse_text(r#"{"type":"executing","data":{"value":5,"max":20}}"#).expect("parses");
        assert_eq!(other.progress(), None, "only progress ticks");
    }

    #[test]
    fn a_repeated_id_field_names_nothing_even_after_null() {
        for data in [r#"{"node":null,"node":"3"}"#, r#"{"node":"3","node":null}"#, r#"{"node":"3","node":"4"}"#] {
            let e = parse_text(&format!(r#"{{"type":"progress","data":{data}}}"#)).expect("parses");
            assert_eq!(e.node_id(), None, "{data}");
        }
    }

    #[test]
    fn malformed_text_frames_are_errors_not_panics() {
        for bad in ["", "{", "[]", r#"{"type":1,"data":{}}"#, r#"{"data":{}}"#, "null"] {
            assert!(matches!(parse_text(bad), Err(FrameError::InvalidJson(_))), "{bad:?}");
        }
    }

    #[test]
    fn recorded_type4_preview_carries_prompt_node_and_jpeg() {
        let frame = recorded_frames("a_success").into_iter().find_map(Result::err).expect("a binary frame");
        match parse_binary(Bytes::from(frame)).expect("decodes") {
            BinaryEvent::Preview { format, ids: Some((Some(pid), Some(node))), image } => {
                assert_eq!(format, ImageFormat::Jpeg);
                assert_eq!(node, "2");
                assert_eq!(pid, "b5ce2ae5-3b1f-4ded-aabc-98cde2f52de0");
                assert_eq!(&image[..2], &[0xFF, 0xD8], "JPEG magic");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn recorded_type1_and_type3_frames_decode() {
        let frames = recorded_frames("a_success_legacy_previews");
        let preview = frames.iter().find_map(|f| f.clone().err()).expect("binary");
        assert!(matches!(
            parse_binary(Bytes::from(preview)),
            Ok(BinaryEvent::Preview { format: ImageFormat::Png, ids: None, ref image }) if image.starts_with(b"\x89PNG")
        ));
        let texts: Vec<_> = recorded_frames("g_custom_events")
            .into_iter()
            .filter_map(Result::err)
            .filter_map(|f| match parse_binary(Bytes::from(f)) {
                Ok(BinaryEvent::Text { node_id, text }) => Some((node_id, text)),
                _ => None,
            })
            .collect();
        assert!(!texts.is_empty(), "g_custom_events has TEXT frames");
    }

    #[test]
    fn malformed_binary_frames_are_errors_not_panics() {
        let cases: [(&[u8], &str); 6] = [
            (&[], "truncated_binary"),
            (&[0, 0, 0, 1], "truncated_binary"),
            (&[0, 0, 0, 4, 0, 0, 1, 0, b'{'], "truncated_binary"),
            (&[0, 0, 0, 4, 0, 0, 0, 1, b'{'], "invalid_binary_header"),
            (&[0, 0, 0, 3, 255, 255, 255, 255], "truncated_binary"),
            (&[0, 0, 0, 9, 0, 0, 0, 0], "unknown_binary_type"),
        ];
        for (bytes, reason) in cases {
            let err = parse_binary(Bytes::copy_from_slice(bytes)).expect_err("must fail");
            assert_eq!(err.reason(), reason, "{bytes:?}");
        }
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        /// A binary frame that starts like a real one (type 1, 3 or 4, plausible header lengths) and then
        /// goes anywhere, so the decoder's length arithmetic is exercised, not just its first check.
        fn binary_frame() -> impl Strategy<Value = Vec<u8>> {
            let kind = prop_oneof![Just(1u32), Just(3u32), Just(4u32), any::<u32>()];
            let len = prop_oneof![0u32..64, any::<u32>()];
            (kind, len, prop::collection::vec(any::<u8>(), 0..128)).prop_map(|(kind, len, rest)| {
                let mut frame = kind.to_be_bytes().to_vec();
                frame.extend_from_slice(&len.to_be_bytes());
                frame.extend(rest);
                frame
            })
        }

        /// The reference for [`Ids::of`]: the same fields read by serde.
        #[derive(serde::Deserialize, Default)]
        struct SerdeIds<'a> {
            #[serde(default, borrow)]
            prompt_id: Option<&'a RawValue>,
            #[serde(default, borrow)]
            node: Option<&'a RawValue>,
            #[serde(default, borrow)]
            display_node: Option<&'a RawValue>,
            #[serde(default, borrow)]
            node_id: Option<&'a RawValue>,
        }

        /// The reference for [`TextEvent::progress`]: what the tracker used to parse of each tick.
        #[derive(serde::Deserialize, Default)]
        struct SerdeTick {
            #[serde(default)]
            value: Option<f64>,
            #[serde(default)]
            max: Option<f64>,
        }

        /// A JSON value of any kind, with escapes, nesting and odd spacing.
        fn value() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                Just("null".to_string()),
                Just("null".to_string()),
                Just("true".to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:e}")),
                "[a-z0-9:. ]{0,8}".prop_map(|s| format!("\"{s}\"")),
                Just(r#""a\"b\\c\u00e9\n}]""#.to_string()),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[ {} ]", v.join(" ,"))),
                    prop::collection::vec((key(), inner), 0..4).prop_map(|m| object(&m)),
                ]
            })
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => Just("prompt_id"), 4 => Just("node"), 2 => Just("display_node"), 2 => Just("node_id"),
                3 => Just("value"), 3 => Just("max"), 1 => Just("prompt\\u005fid"), 1 => Just("no\\u0064e"),
                1 => Just("x\\\"y"), 1 => Just("")
            ]
            .prop_map(str::to_string)
        }

        fn object(members: &[(String, String)]) -> String {
            let members: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\" :\t{v}")).collect();
            format!("{{ {} }}", members.join(",\n"))
        }

        /// The envelope as serde_json alone reads it: the reference for [`scan::frame`].
        fn by_serde(text: &str) -> Option<(String, String)> {
            let envelope: Envelope = serde_json::from_str(text).ok()?;
            Some((envelope.kind.into_owned(), envelope.data.get().to_string()))
        }

        /// The whole event as the serde path alone makes it.
        fn by_serde_event(text: &str) -> Option<TextEvent> {
            let frame = Utf8Bytes::from(text.to_string());
            let envelope: Envelope = serde_json::from_str(&frame).ok()?;
            Some(TextEvent::new(&frame, &envelope.kind, envelope.data.get(), None))
        }

        /// A text frame: mostly the common shape, sometimes with escaped, repeated, missing or odd members.
        fn envelope() -> impl Strategy<Value = String> {
            let kind = prop_oneof![
                6 => "[a-z_.]{0,12}".prop_map(|k| format!("\"{k}\"")),
                1 => Just(r#""pro\u0067ress""#.to_string()),
                1 => Just(r#""a\"b""#.to_string()),
                1 => value(),
            ];
            let member = prop_oneof![
                4 => kind.prop_map(|v| ("type".to_string(), v)),
                2 => value().prop_map(|v| ("data".to_string(), v)),
                4 => prop::collection::vec((key(), value()), 0..6).prop_map(|m| ("data".to_string(), object(&m))),
                1 => (key(), value()),
                1 => value().prop_map(|v| ("typ\\u0065".to_string(), v)),
                1 => value().prop_map(|v| ("dat\\u0061".to_string(), v)),
            ];
            (prop::collection::vec(member, 0..4), "[ \t\n]{0,2}").prop_map(|(members, pad)| {
                let members: Vec<String> = members.iter().map(|(k, v)| format!("{pad}\"{k}\"{pad}:{v}")).collect();
                format!("{pad}{{{}}}{pad}", members.join(","))
            })
        }

        /// What an edit puts into a frame: JSON's own characters most of the time.
        fn edit_byte() -> impl Strategy<Value = char> {
            prop_oneof![
                prop::sample::select(vec![
                    '"', '\\', '{', '}', '[', ']', ',', ':', '-', '0', '1', '.', 'e', 'u', ' ', '\u{1}'
                ]),
                any::<char>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4096))]

            #[test]
            fn ids_are_what_serde_reads(members in prop::collection::vec((key(), value()), 0..6)) {
                let data = object(&members);
                prop_assume!(serde_json::from_str::<serde_json::Value>(&data).is_ok());
                let want = serde_json::from_str::<SerdeIds>(&data).unwrap_or_default();
                let got = Ids::of(&data);
                let event = parse_text(&format!(r#"{{"type":"progress","data":{data}}}"#)).expect("valid");
                let raw = |v: Option<&RawValue>| as_id(v.map(RawValue::get));
                prop_assert_eq!(as_id(got.prompt_id), raw(want.prompt_id), "{}", data);
                prop_assert_eq!(as_id(got.node), raw(want.node), "{}", data);
                prop_assert_eq!(as_id(got.display_node), raw(want.display_node), "{}", data);
                prop_assert_eq!(as_id(got.node_id), raw(want.node_id), "{}", data);
                let tick = serde_json::from_str::<SerdeTick>(&data).unwrap_or_default();
                prop_assert_eq!(event.progress(), tick.value.zip(tick.max), "{}", data);
            }

            #[test]
            fn the_fast_path_accepts_only_what_serde_accepts_and_finds_the_same(
                text in envelope(), edit in any::<prop::sample::Index>(), how in 0u8..4, byte in edit_byte(),
            ) {
                let mut text = text;
                let at = edit.index(text.len() + 1);
                if text.is_char_boundary(at) {
                    match how {
                        0 => {}
                        1 => text.truncate(at),
                        2 => text.insert(at, byte),
                        _ => { if at < text.len() && text.is_char_boundary(at + 1) { text.remove(at); } }
                    }
                }
                if let Some(frame) = scan::frame(&text) {
                    prop_assert_eq!(by_serde(&text), Some((frame.kind.to_string(), frame.data.to_string())), "{}", text);
                    let (fast, slow) = (parse_text(&text).expect("valid"), by_serde_event(&text).expect("valid"));
                    prop_assert_eq!(&fast.kind_name, &slow.kind_name);
                    prop_assert_eq!((fast.prompt_id(), fast.node_id()), (slow.prompt_id(), slow.node_id()), "{}", text);
                    prop_assert_eq!(fast.progress(), slow.progress(), "{}", text);
                }
            }

            #[test]
            fn binary_frames_never_panic(frame in prop_oneof![binary_frame(), prop::collection::vec(any::<u8>(), 0..16)]) {
                let _ = parse_binary(Bytes::from(frame));
            }

            #[test]
            fn text_frames_never_panic(text in ".{0,64}", kind in "[a-z_.]{0,12}", data in ".{0,32}") {
                let _ = parse_text(&text);
                let _ = parse_text(&format!(r#"{{"type":"{kind}","data":{data}}}"#));
                let _ = parse_text(&format!(r#"{{"type":"{kind}","data":{{"prompt_id":{data},"node":{data}}}}}"#));
            }
        }
    }
}
