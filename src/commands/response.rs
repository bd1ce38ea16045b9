//! What every request gets back (docs/INTERFACE.md §3): `{"id", "status": "ok", "data"}` or
//! `{"id", "status": "error", "error": {"code", "message", "details"}}`.
//!
//! Pure: rendering a response is a function of the request id and the outcome, and what an error of ComfyUI's
//! API or of a template means for the requester is a function of that error.

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};

use crate::comfy::http::HttpError;
use crate::workflow::template::{TemplateError, Templates};

/// A stable error code that users program against (docs/INTERFACE.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// The payload is not JSON (or not UTF-8, or nested too deeply).
    InvalidJson,
    /// The payload is JSON, but not a request this command accepts.
    InvalidRequest,
    /// No command has this name.
    UnknownCommand,
    /// The command exists but `commands.allow` does not list it.
    NotAllowed,
    /// The payload is larger than `commands.max_payload_bytes`.
    PayloadTooLarge,
    /// No template has this name.
    UnknownTemplate,
    /// An edit could not be applied to the workflow.
    PatchFailed,
    /// The named prompt (or other object) does not exist.
    NotFound,
    /// ComfyUI answered with an error; details carry its `error` and `node_errors`.
    ComfyuiRejected,
    /// ComfyUI could not be reached, or the request waited longer than `comfyui.request_timeout_ms` to start.
    ComfyuiUnavailable,
    /// Too many requests are waiting (`commands.max_waiting_requests` or `commands.max_waiting_bytes`): try
    /// again later. Answered at once, nothing was done.
    Busy,
}

impl Code {
    /// Every code, in the order docs/INTERFACE.md lists them.
    pub const ALL: [Code; 11] = [
        Code::InvalidJson,
        Code::InvalidRequest,
        Code::UnknownCommand,
        Code::NotAllowed,
        Code::PayloadTooLarge,
        Code::UnknownTemplate,
        Code::PatchFailed,
        Code::NotFound,
        Code::ComfyuiRejected,
        Code::ComfyuiUnavailable,
        Code::Busy,
    ];

    /// The request itself is at fault: sending it again cannot succeed (every code but `comfyui_unavailable`
    /// and `busy`, which say "not now").
    pub fn is_final(self) -> bool {
        !matches!(self, Code::ComfyuiUnavailable | Code::Busy)
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidJson => "invalid_json",
            Code::InvalidRequest => "invalid_request",
            Code::UnknownCommand => "unknown_command",
            Code::NotAllowed => "not_allowed",
            Code::PayloadTooLarge => "payload_too_large",
            Code::UnknownTemplate => "unknown_template",
            Code::PatchFailed => "patch_failed",
            Code::NotFound => "not_found",
            Code::ComfyuiRejected => "comfyui_rejected",
            Code::ComfyuiUnavailable => "comfyui_unavailable",
            Code::Busy => "busy",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request failed: a stable code, a message for humans, and optional machine-readable details.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Failure {
    /// The stable code.
    pub code: Code,
    /// What went wrong, naming the field or value at fault.
    pub message: String,
    /// Extra data for programs (e.g. ComfyUI's `node_errors`); absent from the response when `None`.
    pub details: Option<Value>,
}

impl Failure {
    /// A failure without details.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), details: None }
    }

    /// The same failure carrying `details`.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// The result of carrying out a request: the response's `data`, or why it failed.
pub type Outcome = Result<Value, Failure>;

/// What a failed HTTP call to ComfyUI means for the requester.
pub fn http_failure(error: HttpError) -> Failure {
    match error {
        HttpError::Unavailable { .. } | HttpError::Status { status: 502..=504, .. } => {
            Failure::new(Code::ComfyuiUnavailable, error.to_string())
        }
        HttpError::Status { json: Some(body), .. } if body.get("error").is_some() => {
            let message = body["error"]["message"].as_str().or(body["error"].as_str()).unwrap_or("rejected");
            let details =
                json!({ "error": body["error"], "node_errors": body.get("node_errors").cloned().unwrap_or(json!({})) });
            Failure::new(Code::ComfyuiRejected, format!("ComfyUI rejected the request: {message}"))
                .with_details(details)
        }
        other => Failure::new(Code::ComfyuiRejected, other.to_string()),
    }
}

/// What a template that cannot be used or changed means for the requester.
pub fn template_failure(error: TemplateError, templates: &Templates) -> Failure {
    match error {
        TemplateError::Unknown(name) => Failure::new(Code::UnknownTemplate, templates.unknown(&name)),
        TemplateError::Patch(e) => Failure::new(Code::PatchFailed, e.to_string()).with_details(e.details()),
        other => Failure::new(Code::PatchFailed, other.to_string()),
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody<'a>>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a Value>,
}

/// The response payload for a request with `id` (omitted when `None`).
pub fn render(id: Option<&str>, outcome: &Outcome) -> Bytes {
    let envelope = match outcome {
        Ok(data) => Envelope { id, status: "ok", data: Some(data), error: None },
        Err(failure) => Envelope {
            id,
            status: "error",
            data: None,
            error: Some(ErrorBody {
                code: failure.code.as_str(),
                message: &failure.message,
                details: failure.details.as_ref(),
            }),
        },
    };
    // Only string keys and `Value`s (which hold no NaN or infinity) are serialized.
    Bytes::from(serde_json::to_vec(&envelope).expect("a response envelope always serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn only_busy_and_unavailable_say_try_again() {
        let again: Vec<_> = Code::ALL.iter().filter(|c| !c.is_final()).map(|c| c.as_str()).collect();
        assert_eq!(again, ["comfyui_unavailable", "busy"]);
    }

    #[test]
    fn codes_are_the_interface_names() {
        let names: Vec<_> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "invalid_json",
                "invalid_request",
                "unknown_command",
                "not_allowed",
                "payload_too_large",
                "unknown_template",
                "patch_failed",
                "not_found",
                "comfyui_rejected",
                "comfyui_unavailable",
                "busy",
            ]
        );
        assert_eq!(Code::PatchFailed.to_string(), "patch_failed");
    }

    #[test]
    fn ok_and_error_responses_have_the_interface_shape() {
        let ok = render(Some("req-7"), &Ok(json!({"prompt_id": "p1", "number": 3})));
        assert_eq!(
            serde_json::from_slice::<Value>(&ok).expect("json"),
            json!({"id": "req-7", "status": "ok", "data": {"prompt_id": "p1", "number": 3}})
        );
        assert!(ok.starts_with(br#"{"id":"req-7","status":"ok""#), "id and status lead");

        let failure = Failure::new(Code::ComfyuiRejected, "prompt rejected").with_details(json!({"node_errors": {}}));
        let err = render(None, &Err(failure));
        assert_eq!(
            serde_json::from_slice::<Value>(&err).expect("json"),
            json!({"status": "error", "error": {"code": "comfyui_rejected", "message": "prompt rejected",
                   "details": {"node_errors": {}}}})
        );

        let bare = render(Some("x"), &Err(Failure::new(Code::NotFound, "no prompt `p`")));
        let bare: Value = serde_json::from_slice(&bare).expect("json");
        assert_eq!(bare["error"], json!({"code": "not_found", "message": "no prompt `p`"}));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // Quarters only: serde_json's default float parser may be off by one ulp on arbitrary f64s.
            (-1_000_000i32..1_000_000).prop_map(|q| Value::from(f64::from(q) / 4.0)),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn render_always_gives_json_echoing_the_id(
            id in proptest::option::of(".{0,20}"),
            data in arb_json(),
            ok in any::<bool>(),
            code in prop::sample::select(Code::ALL.to_vec()),
            message in ".{0,40}",
        ) {
            let outcome = if ok {
                Ok(data.clone())
            } else {
                Err(Failure::new(code, message.clone()).with_details(data.clone()))
            };
            let parsed: Value = serde_json::from_slice(&render(id.as_deref(), &outcome)).expect("valid json");
            prop_assert_eq!(parsed.get("id").and_then(Value::as_str), id.as_deref());
            if ok {
                prop_assert_eq!(&parsed["status"], "ok");
                prop_assert_eq!(&parsed["data"], &data);
            } else {
                prop_assert_eq!(&parsed["status"], "error");
                prop_assert_eq!(&parsed["error"]["code"], code.as_str());
                prop_assert_eq!(&parsed["error"]["message"], &Value::String(message));
                prop_assert_eq!(&parsed["error"]["details"], &data);
            }
        }
    }
}
