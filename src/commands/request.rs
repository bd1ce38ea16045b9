//! Requests from the buses as values (docs/INTERFACE.md §3): the bytes of a `request/<command>` message in, a
//! [`Request`] or a [`Rejected`] out.
//!
//! Pure: no I/O. Checks happen in a fixed order, so the same payload always fails the same way: size, JSON syntax,
//! shape (an object), `id`, then the command's own fields. Every field is typed and unknown fields are refused, so
//! a typo is an error rather than a silently ignored option. A field set to `null` counts as absent.

mod fields;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use self::fields::{invalid, Body, FieldValue, Ordered};
use super::response::{Code, Failure};
use crate::bus::topics;
use crate::workflow::Edits;

/// Every command name, as the topic/subject level after `request`.
pub const COMMANDS: &[&str] =
    &["queue", "patch", "templates", "interrupt", "cancel", "clear", "status", "upload", "free"];

/// The longest accepted request `id`, in characters.
pub const MAX_ID_CHARS: usize = 256;

/// The longest accepted file or folder name, in bytes (the usual file system limit).
pub const MAX_FILENAME_BYTES: usize = 255;

/// Standard base64 that takes padding or its absence.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The request's `id`, echoed in the response and used to answer repeats.
    pub id: Option<String>,
    /// What to do.
    pub command: Command,
}

/// A command and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Queue a workflow or a template, edited.
    Queue(QueuePrompt),
    /// Change a stored template.
    Patch {
        /// The template's name.
        template: String,
        /// `set` and/or `merge`; never empty.
        edits: Edits,
    },
    /// List the templates.
    Templates,
    /// Interrupt the running prompt.
    Interrupt {
        /// Interrupt only if this prompt is the one running.
        prompt_id: Option<String>,
    },
    /// Delete a pending prompt or interrupt a running one.
    Cancel {
        /// The prompt.
        prompt_id: String,
    },
    /// Delete every pending prompt.
    Clear,
    /// Report queue, reachability and versions.
    Status,
    /// Upload a file to ComfyUI's input folder.
    Upload(Upload),
    /// Ask ComfyUI to free memory.
    Free {
        /// Unload models.
        unload_models: bool,
        /// Free cached memory.
        free_memory: bool,
    },
}

impl Command {
    /// The command's name, one of [`COMMANDS`].
    pub fn name(&self) -> &'static str {
        match self {
            Command::Queue(_) => "queue",
            Command::Patch { .. } => "patch",
            Command::Templates => "templates",
            Command::Interrupt { .. } => "interrupt",
            Command::Cancel { .. } => "cancel",
            Command::Clear => "clear",
            Command::Status => "status",
            Command::Upload(_) => "upload",
            Command::Free { .. } => "free",
        }
    }
}

/// The arguments of `queue`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuePrompt {
    /// The workflow to start from.
    pub source: Source,
    /// Edits to make before queueing.
    pub edits: Edits,
    /// Queue at the front.
    pub front: bool,
    /// ComfyUI's queue `number` (priority), passed through.
    pub number: Option<f64>,
    /// ComfyUI's `partial_execution_targets` (output node ids), passed through.
    pub partial_execution_targets: Option<Vec<String>>,
    /// ComfyUI's `extra_data`, passed through.
    pub extra_data: Option<Map<String, Value>>,
}

/// Where a queued workflow comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// An API-format workflow in the request (non-empty; not validated further here).
    Workflow(Map<String, Value>),
    /// A stored template, by name.
    Template(String),
}

/// The arguments of `upload`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// The file name; passes [`check_filename`].
    pub filename: String,
    /// The file's bytes.
    pub data: Bytes,
    /// `""`, or `/`-separated names that each pass [`check_filename`].
    pub subfolder: String,
    /// Replace an existing file of the same name.
    pub overwrite: bool,
}

/// A request that cannot be carried out: the id when one could be read (so the error response echoes it), and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{failure}")]
pub struct Rejected {
    /// The request's `id`, when it could be read and was valid.
    pub id: Option<String>,
    /// Why.
    pub failure: Failure,
}

/// Parses a JSON request. `command` is the topic/subject level after `request` (already unescaped by the caller);
/// `payload` the raw body, where an empty (or all-whitespace) body means `{}`.
pub fn parse(command: &str, payload: &[u8], max_payload_bytes: usize) -> Result<Request, Rejected> {
    check_size(payload.len(), max_payload_bytes).map_err(|failure| Rejected { id: None, failure })?;
    let fields = parse_object(payload);
    let Some(&name) = COMMANDS.iter().find(|&&known| known == command) else {
        // Still echo the id when the body is a valid request, so the caller can match the answer.
        let id = fields.ok().and_then(|fields| read_id(&fields).ok().flatten());
        let failure = Failure::new(Code::UnknownCommand, format!("unknown command `{command}`"))
            .with_details(json!({ "command": command, "known": COMMANDS }));
        return Err(Rejected { id, failure });
    };
    let fields = fields.map_err(|failure| Rejected { id: None, failure })?;
    let id = read_id(&fields).map_err(|failure| Rejected { id: None, failure })?;
    let command = Body::new(name, fields)
        .and_then(|body| parse_command(name, body, max_payload_bytes))
        .map_err(|failure| Rejected { id: id.clone(), failure })?;
    Ok(Request { id, command })
}

/// The command named by what follows `request/` (still escaped): its first level, unescaped.
pub fn command_of(path: &str) -> String {
    let level = path.split('/').next().unwrap_or_default();
    topics::unescape(level).unwrap_or_else(|| level.to_string())
}

/// Parses what arrived on `request/<path>` (`path` still escaped, levels joined by `/`): a JSON request on
/// `request/<command>`, or raw bytes on `request/upload/<filename>`. `size` is the payload's size as it arrived
/// (the payload itself may have been dropped for being over `max_payload_bytes`).
pub fn parse_path(path: &str, payload: Bytes, size: usize, max_payload_bytes: usize) -> Result<Request, Rejected> {
    check_size(size, max_payload_bytes).map_err(|failure| Rejected { id: None, failure })?;
    let command = command_of(path);
    match (command.as_str(), path.split_once('/')) {
        ("upload", Some((_, filename))) => parse_raw_upload(filename, payload, max_payload_bytes),
        (_, Some(_)) => parse(path, b"", max_payload_bytes),
        (_, None) => parse(&command, &payload, max_payload_bytes),
    }
}

/// The `id` of a JSON request payload, when it has a valid one: for answers that do not parse the rest.
pub fn id_of(payload: &[u8]) -> Option<String> {
    parse_object(payload).ok().and_then(|fields| read_id(&fields).ok().flatten())
}

/// Parses a raw-bytes upload on `request/upload/<filename>`. `filename_level` is the level as received, escaped
/// per docs/INTERFACE.md §1; the file goes to the top of the input folder and never overwrites.
pub fn parse_raw_upload(filename_level: &str, payload: Bytes, max_payload_bytes: usize) -> Result<Request, Rejected> {
    let reject = |failure| Rejected { id: None, failure };
    check_size(payload.len(), max_payload_bytes).map_err(reject)?;
    let filename = topics::unescape(filename_level).ok_or_else(|| {
        reject(invalid(
            "filename",
            format!("the file name level `{filename_level}` is not a valid escape (`=XX`) of a UTF-8 name"),
        ))
    })?;
    check_filename(&filename).map_err(|why| {
        // `request.upload.cat.png` on NATS arrives as the levels `cat` and `png`.
        let hint = match filename.contains('/') {
            true => " (escape a `.` in the file name as `=2E` on NATS, `request.upload.cat=2Epng`, and a `/` as `=2F`)",
            false => "",
        };
        reject(invalid("filename", format!("the file name {why}{hint}")))
    })?;
    let upload = Upload { filename, data: payload, subfolder: String::new(), overwrite: false };
    Ok(Request { id: None, command: Command::Upload(upload) })
}

/// Checks a file name (or one folder name of a subfolder) so that it can only name an entry inside its folder:
/// non-empty, at most [`MAX_FILENAME_BYTES`], not `.` or `..`, no `/`, `\`, `:` (a drive or stream on Windows) or
/// control character, and no leading or trailing whitespace. The error says what is wrong ("contains `/`").
pub fn check_filename(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if name.len() > MAX_FILENAME_BYTES {
        return Err(format!("is longer than {MAX_FILENAME_BYTES} bytes"));
    }
    if name == "." || name == ".." {
        return Err("is `.` or `..`".to_owned());
    }
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | '\\' | ':')) {
        return Err(format!("contains `{c}`"));
    }
    if name.chars().any(char::is_control) {
        return Err("contains a control character".to_owned());
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Err("starts or ends with whitespace".to_owned());
    }
    Ok(())
}

/// `payload_too_large` when `len` is over `max`.
pub fn check_size(len: usize, max: usize) -> Result<(), Failure> {
    if len <= max {
        return Ok(());
    }
    Err(Failure::new(Code::PayloadTooLarge, format!("the payload is {len} bytes, more than the {max} allowed"))
        .with_details(json!({ "bytes": len, "max_bytes": max })))
}

/// The top-level fields in request order, or why the payload is not a JSON object.
fn parse_object(payload: &[u8]) -> Result<Vec<(String, FieldValue)>, Failure> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    match serde_json::from_slice::<Ordered<FieldValue>>(payload) {
        Ok(Ordered::Object(fields)) => Ok(fields),
        Ok(other) => {
            Err(Failure::new(Code::InvalidRequest, format!("a request must be a JSON object, not {}", other.kind())))
        }
        Err(err) => Err(Failure::new(Code::InvalidJson, format!("invalid JSON: {err}"))),
    }
}

fn read_id(fields: &[(String, FieldValue)]) -> Result<Option<String>, Failure> {
    let mut ids = fields.iter().filter(|(key, _)| key == "id").map(|(_, value)| value);
    let (first, second) = (ids.next(), ids.next());
    if second.is_some() {
        return Err(invalid("id", "duplicate field `id`".to_owned()));
    }
    match first {
        None | Some(Ordered::Other(Value::Null)) => Ok(None),
        Some(Ordered::Other(Value::String(id))) if id.is_empty() => Err(invalid("id", "`id` must not be empty".into())),
        Some(Ordered::Other(Value::String(id))) if id.chars().count() > MAX_ID_CHARS => {
            Err(invalid("id", format!("`id` is longer than {MAX_ID_CHARS} characters")))
        }
        Some(Ordered::Other(Value::String(id))) => Ok(Some(id.clone())),
        Some(other) => Err(invalid("id", format!("`id` must be a string, not {}", other.kind()))),
    }
}

fn parse_command(name: &str, mut body: Body, max_payload_bytes: usize) -> Result<Command, Failure> {
    match name {
        "queue" => parse_queue(body).map(Command::Queue),
        "patch" => parse_patch(body),
        "upload" => parse_upload(body, max_payload_bytes).map(Command::Upload),
        "interrupt" => {
            body.only(&["prompt_id"])?;
            Ok(Command::Interrupt { prompt_id: body.non_empty_string("prompt_id")? })
        }
        "cancel" => {
            body.only(&["prompt_id"])?;
            Ok(Command::Cancel { prompt_id: body.required_string("prompt_id")? })
        }
        "free" => {
            body.only(&["unload_models", "free_memory"])?;
            let unload_models = body.bool("unload_models")?.unwrap_or(false);
            Ok(Command::Free { unload_models, free_memory: body.bool("free_memory")?.unwrap_or(false) })
        }
        "templates" | "clear" | "status" => {
            body.only(&[])?;
            Ok(match name {
                "templates" => Command::Templates,
                "clear" => Command::Clear,
                _ => Command::Status,
            })
        }
        // `parse` only passes names from COMMANDS, and each has an arm above.
        _ => Err(Failure::new(Code::UnknownCommand, format!("unknown command `{name}`"))),
    }
}

fn parse_queue(mut body: Body) -> Result<QueuePrompt, Failure> {
    body.only(&[
        "workflow",
        "template",
        "set",
        "merge",
        "randomize",
        "front",
        "number",
        "partial_execution_targets",
        "extra_data",
    ])?;
    let source = match (body.object("workflow")?, body.non_empty_string("template")?) {
        (Some(workflow), None) if workflow.is_empty() => {
            return Err(invalid("workflow", "`workflow` must not be empty".to_owned()))
        }
        (Some(workflow), None) => Source::Workflow(workflow),
        (None, Some(template)) => Source::Template(template),
        (Some(_), Some(_)) => {
            return Err(Failure::new(Code::InvalidRequest, "give either `workflow` or `template`, not both")
                .with_details(json!({ "fields": ["workflow", "template"] })))
        }
        (None, None) => {
            return Err(Failure::new(Code::InvalidRequest, "`queue` needs `workflow` or `template`")
                .with_details(json!({ "fields": ["workflow", "template"] })))
        }
    };
    Ok(QueuePrompt {
        source,
        edits: parse_edits(&mut body)?,
        front: body.bool("front")?.unwrap_or(false),
        number: body.number("number")?,
        partial_execution_targets: body.strings("partial_execution_targets")?,
        extra_data: body.object("extra_data")?,
    })
}

fn parse_patch(mut body: Body) -> Result<Command, Failure> {
    body.only(&["template", "set", "merge"])?;
    let template = body.required_string("template")?;
    let edits = parse_edits(&mut body)?;
    if edits.is_empty() {
        return Err(Failure::new(Code::InvalidRequest, "`patch` needs a non-empty `set` or a `merge`")
            .with_details(json!({ "fields": ["set", "merge"] })));
    }
    Ok(Command::Patch { template, edits })
}

/// `merge`, `set` and `randomize`, whichever the command allowed.
fn parse_edits(body: &mut Body) -> Result<Edits, Failure> {
    let merge = body.object("merge")?.map(Value::Object);
    let set = body.ordered_object("set")?.unwrap_or_default();
    for (i, (key, _)) in set.iter().enumerate() {
        check_target("set", key)?;
        if set[..i].iter().any(|(earlier, _)| earlier == key) {
            return Err(invalid("set", format!("`set` has the key `{key}` twice")));
        }
    }
    let randomize = body.strings("randomize")?.unwrap_or_default();
    for key in &randomize {
        check_target("randomize", key)?;
    }
    Ok(Edits { merge, set, randomize })
}

/// A `"<node>.<input>"` key: split at the last `.`, neither side empty.
fn check_target(field: &str, key: &str) -> Result<(), Failure> {
    match key.rsplit_once('.') {
        Some((node, input)) if !node.is_empty() && !input.is_empty() => Ok(()),
        _ => Err(invalid(field, format!("`{field}` key `{key}` must be `<node>.<input>`"))),
    }
}

fn parse_upload(mut body: Body, max_payload_bytes: usize) -> Result<Upload, Failure> {
    body.only(&["filename", "data_base64", "subfolder", "overwrite"])?;
    let filename = body.required_string("filename")?;
    check_filename(&filename).map_err(|why| invalid("filename", format!("`filename` {why}")))?;
    let encoded = body.string("data_base64")?.ok_or_else(|| body.missing("data_base64"))?;
    let data = BASE64
        .decode(encoded.as_bytes())
        .map_err(|err| invalid("data_base64", format!("`data_base64` is not standard base64: {err}")))?;
    // Decoded data is never longer than its encoding, but the limit is on the file, so say so.
    check_size(data.len(), max_payload_bytes)?;
    let subfolder = body.string("subfolder")?.unwrap_or_default();
    if !subfolder.is_empty() {
        for segment in subfolder.split('/') {
            check_filename(segment)
                .map_err(|why| invalid("subfolder", format!("`subfolder` has a folder name that {why}")))?;
        }
    }
    let overwrite = body.bool("overwrite")?.unwrap_or(false);
    Ok(Upload { filename, data: Bytes::from(data), subfolder, overwrite })
}

#[cfg(test)]
mod tests;
