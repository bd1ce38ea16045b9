//! Requests from the buses: one file per command, and the task that answers them.
//!
//! * Each command is a type in a file of its own ([`queue`], [`patch`], [`templates`], [`interrupt`],
//!   [`cancel`], [`clear`], [`status`], [`upload`], [`free`], [`answer`]): its name, the fields it takes, how it is parsed
//!   from a request body and how it is carried out ([`Spec`]). The one list of commands is the `commands!`
//!   invocation below; it makes the [`Command`] enum, [`COMMANDS`], [`Command::FIELDS`] and the dispatch.
//!   **Adding a command** is one new file implementing [`Spec`] plus one line there.
//! * [`parse`] reads what every request shares (size, JSON object, `id`) and hands the rest to the command;
//!   [`fields`] gives typed access to the fields with errors that name them. Pure: no I/O. Checks happen in a
//!   fixed order, so the same payload always fails the same way: size, JSON syntax, shape (an object), `id`,
//!   unknown fields, then the command's own fields. A field set to `null` counts as absent.
//! * [`task`] is the loop: the inbox in, one answer per request out. [`ledger`] remembers answered request ids
//!   (pure), [`policy`] says who may act, [`reply`] which reply topics are refused, [`response`] renders answers;
//!   [`inbox`] bounds what waits.

pub mod fields;
pub mod inbox;
pub mod ledger;
pub mod policy;
pub mod reply;
pub mod response;
pub mod task;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use self::fields::{invalid, Body, FieldValue, Ordered};
use self::response::{Code, Failure, Outcome};
use crate::bus::topics;
use crate::comfy::http::ComfyHttp;
use crate::tracker::Control;
use crate::workflow::template::Templates;

/// The longest accepted request `id`, in characters.
pub const MAX_ID_CHARS: usize = 256;

/// What a command is: its name, the fields it takes, how it is read from a request and how it is carried out.
pub trait Spec: Sized {
    /// The topic/subject level after `request`.
    const NAME: &'static str;
    /// The fields the command takes besides `id`; any other field is refused before [`Spec::parse`] runs.
    const FIELDS: &'static [&'static str];
    /// Reads the command from a body that has only [`Spec::FIELDS`]. `max_payload_bytes` bounds decoded data.
    fn parse(body: &mut Body, max_payload_bytes: usize) -> Result<Self, Failure>;
    /// Carries the command out: at once, or as [`Applied::Call`] when it needs ComfyUI.
    fn apply(self, cx: &mut Context<'_>) -> Applied;
}

/// What a command may use when it is carried out: the command task's own state and handles for ComfyUI.
pub struct Context<'a> {
    /// The templates (the command task owns them; `patch` changes them).
    pub templates: &'a mut Templates,
    /// Randomness for seeds and prompt ids.
    pub rng: &'a mut fastrand::Rng,
    /// ComfyUI's HTTP API (a cheap clone per call).
    pub http: &'a ComfyHttp,
    /// To the tracker (through the router task): prompts announced before and after `POST /prompt`.
    pub control: &'a mpsc::Sender<Control>,
    /// The bridge's WebSocket client id, so ComfyUI sends a queued prompt's events to the bridge.
    pub client_id: &'a str,
    /// `commands.deny_node_classes`.
    pub deny_node_classes: &'a [String],
    /// The request's `id`, if it had one.
    pub request_id: Option<&'a str>,
}

/// A running call to ComfyUI.
pub type Call = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Work that talks to ComfyUI. It becomes its [`Call`] only when the command task starts it in a free slot, so a
/// job waiting for one holds just its arguments.
pub type Work = Box<dyn FnOnce() -> Call + Send + Sync>;

/// What carrying a command out led to.
pub enum Applied {
    /// Answered at once.
    Done(Outcome),
    /// Needs ComfyUI: runs as a job, at most [`task::CONCURRENCY`] at a time.
    Call {
        /// The job.
        work: Work,
        /// The prompt it queues, known before it runs (for the request's span).
        prompt_id: Option<String>,
    },
}

impl Applied {
    /// A call to ComfyUI, made by `work` once it is started.
    pub fn call<F, C>(work: F) -> Self
    where
        F: FnOnce() -> C + Send + Sync + 'static,
        C: Future<Output = Outcome> + Send + 'static,
    {
        Applied::Call { work: Box::new(move || Box::pin(work())), prompt_id: None }
    }
}

/// The one list of commands: `Variant(module::Type)`, each module a file of this folder implementing [`Spec`].
macro_rules! commands {
    ($($(#[$doc:meta])* $variant:ident($module:ident::$ty:ident)),* $(,)?) => {
        $(pub mod $module;)*

        /// A command and its arguments.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Command {
            $($(#[$doc])* $variant($module::$ty),)*
        }

        /// Every command name, as the topic/subject level after `request`.
        pub const COMMANDS: &[&str] = &[$(<$module::$ty as Spec>::NAME),*];

        impl Command {
            /// Every command's name and the fields it takes besides `id`.
            pub const FIELDS: &'static [(&'static str, &'static [&'static str])] =
                &[$((<$module::$ty as Spec>::NAME, <$module::$ty as Spec>::FIELDS)),*];

            /// The command's name, one of [`COMMANDS`].
            pub fn name(&self) -> &'static str {
                match self {
                    $(Command::$variant(_) => <$module::$ty as Spec>::NAME,)*
                }
            }

            /// Carries the command out.
            pub fn apply(self, cx: &mut Context<'_>) -> Applied {
                match self {
                    $(Command::$variant(command) => command.apply(cx),)*
                }
            }

            /// The command named `name`, read from `body`; `None` when no command has that name.
            fn parse_named(name: &str, mut body: Body, max_payload_bytes: usize) -> Option<Result<Self, Failure>> {
                $(if name == <$module::$ty as Spec>::NAME {
                    let parsed = body.only(<$module::$ty as Spec>::FIELDS)
                        .and_then(|()| <$module::$ty as Spec>::parse(&mut body, max_payload_bytes));
                    return Some(parsed.map(Command::$variant));
                })*
                None
            }
        }
    };
}

commands! {
    /// Queue a workflow or a template, edited.
    Queue(queue::QueuePrompt),
    /// Change a stored template.
    Patch(patch::PatchTemplate),
    /// List the templates.
    Templates(templates::ListTemplates),
    /// Interrupt the running prompt.
    Interrupt(interrupt::Interrupt),
    /// Delete a pending prompt or interrupt a running one.
    Cancel(cancel::Cancel),
    /// Delete every pending prompt.
    Clear(clear::Clear),
    /// Report queue, reachability and versions.
    Status(status::Status),
    /// Upload a file to ComfyUI's input folder.
    Upload(upload::Upload),
    /// Ask ComfyUI to free memory.
    Free(free::Free),
    /// Answer a waiting `Bus Ask` node.
    Answer(answer::Answer),
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The request's `id`, echoed in the response and used to answer repeats.
    pub id: Option<String>,
    /// What to do.
    pub command: Command,
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
        return Err(Rejected { id, failure: unknown_command(command) });
    };
    let fields = fields.map_err(|failure| Rejected { id: None, failure })?;
    let id = read_id(&fields).map_err(|failure| Rejected { id: None, failure })?;
    let command = Body::new(name, fields)
        .and_then(|body| {
            Command::parse_named(name, body, max_payload_bytes).unwrap_or_else(|| Err(unknown_command(name)))
        })
        .map_err(|failure| Rejected { id: id.clone(), failure })?;
    Ok(Request { id, command })
}

fn unknown_command(command: &str) -> Failure {
    Failure::new(Code::UnknownCommand, format!("unknown command `{command}`"))
        .with_details(json!({ "command": command, "known": COMMANDS }))
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
        ("upload", Some((_, filename))) => upload::parse_raw(filename, payload, max_payload_bytes),
        (_, Some(_)) => parse(path, b"", max_payload_bytes),
        (_, None) => parse(&command, &payload, max_payload_bytes),
    }
}

/// The `id` of a JSON request payload, when it has a valid one: for answers that do not parse the rest.
pub fn id_of(payload: &[u8]) -> Option<String> {
    parse_object(payload).ok().and_then(|fields| read_id(&fields).ok().flatten())
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

#[cfg(test)]
mod tests;
