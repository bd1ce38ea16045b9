//! `answer`: hands an answer to a waiting `Bus Ask` node (the tap extension's answer route). Arrives as a
//! request (`request/answer` with `ask_id` and `answer`) or raw on `answer/<ask_id>` (the body is the answer),
//! which a NATS reply to the question also lands on. The first answer wins; the extension says which.

use bytes::Bytes;
use serde_json::{json, Value};

use super::fields::{invalid, Body};
use super::response::{http_failure, Code, Failure, Outcome};
use super::{check_size, Applied, Context, Rejected, Request, Spec};
use crate::bus::topics;
use crate::comfy::http::{ComfyHttp, HttpError};

/// Longest ask id taken (the extension's are 22 characters).
pub const MAX_ASK_ID: usize = 128;

/// The arguments of `answer`.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The ask, as its question named it.
    pub ask_id: String,
    /// The text the node returns.
    pub answer: String,
}

impl Spec for Answer {
    const NAME: &'static str = "answer";
    const FIELDS: &'static [&'static str] = &["ask_id", "answer"];

    fn parse(body: &mut Body, _: usize) -> Result<Self, Failure> {
        let ask_id = body.required_string("ask_id")?;
        check_ask_id(&ask_id).map_err(|why| invalid("ask_id", format!("`ask_id` {why}")))?;
        let answer = match body.take_value("answer") {
            None => return Err(body.missing("answer")),
            Some(Value::String(text)) => text,
            // An object or a number is sent as its JSON text; the node's `answer_json` parses it back.
            Some(other) => other.to_string(),
        };
        Ok(Answer { ask_id, answer })
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        let http = cx.http.clone();
        Applied::call(move || async move {
            let outcome = answer(&http, &self.ask_id, &self.answer).await;
            crate::flow::answer_counted(match &outcome {
                Ok(v) if v["accepted"] == true => "accepted",
                Ok(_) => "late",
                Err(f) if f.code == Code::NotFound => "unknown",
                Err(_) => "failed",
            });
            outcome
        })
    }
}

/// Parses a raw answer on `answer/<ask_id>`: `level` is the level as received (escaped), the body the answer's
/// text (UTF-8), `size` the body's size as it arrived (the inbox drops the bytes of one that is too large).
pub fn parse_raw(level: &str, payload: Bytes, size: usize, max_payload_bytes: usize) -> Result<Request, Rejected> {
    let reject = |failure| Rejected { id: None, failure };
    check_size(size.max(payload.len()), max_payload_bytes).map_err(reject)?;
    let ask_id = topics::unescape(level).unwrap_or_else(|| level.to_string());
    check_ask_id(&ask_id).map_err(|why| reject(invalid("ask_id", format!("the ask id level {why}"))))?;
    let answer = String::from_utf8(payload.to_vec())
        .map_err(|_| reject(Failure::new(Code::InvalidRequest, "an answer must be UTF-8 text")))?;
    Ok(Request { id: None, command: super::Command::Answer(Answer { ask_id, answer }) })
}

/// The extension's ask ids are `secrets.token_urlsafe`: letters, digits, `-` and `_`.
fn check_ask_id(ask_id: &str) -> Result<(), String> {
    if ask_id.is_empty() || ask_id.len() > MAX_ASK_ID {
        return Err(format!("must be 1 to {MAX_ASK_ID} characters"));
    }
    if !ask_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err("may hold only letters, digits, `-` and `_`".into());
    }
    Ok(())
}

async fn answer(http: &ComfyHttp, ask_id: &str, text: &str) -> Outcome {
    let Some(secret) = http.tap().secret() else {
        return Err(Failure::new(
            Code::ComfyuiUnavailable,
            "the tap extension is not connected (no `comfy_bridge.hello` on this connection): no ask can be answered",
        ));
    };
    match http.answer(secret.expose(), ask_id, text).await {
        Ok(()) => Ok(json!({"ask_id": ask_id, "accepted": true})),
        Err(HttpError::Status { status: 409, json: Some(body), .. }) if body["reason"] == "unknown" => {
            Err(Failure::new(Code::NotFound, format!("no ask `{ask_id}` is waiting")))
        }
        Err(HttpError::Status { status: 409, json, .. }) => {
            // Answered already, or ended (timeout, interrupt): the first answer won.
            let reason = json.as_ref().and_then(|b| b["reason"].as_str()).unwrap_or("late").to_string();
            Ok(json!({"ask_id": ask_id, "accepted": false, "reason": reason}))
        }
        Err(HttpError::Status { status: 413, .. }) => {
            Err(Failure::new(Code::PayloadTooLarge, "the extension takes answers of at most 1 MiB"))
        }
        Err(e @ HttpError::Status { status: 403, .. }) => {
            Err(Failure::new(Code::ComfyuiRejected, format!("the extension refused the bridge's secret: {e}")))
        }
        Err(e) => Err(http_failure(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{parse, Command};

    #[test]
    fn a_request_names_the_ask_and_any_json_answer_becomes_text() {
        let request = parse("answer", br#"{"ask_id":"Ab-_9","answer":"yes"}"#, 1024).expect("valid");
        assert_eq!(request.command, Command::Answer(Answer { ask_id: "Ab-_9".into(), answer: "yes".into() }));
        let request = parse("answer", br#"{"ask_id":"a","answer":{"n":1}}"#, 1024).expect("valid");
        assert_eq!(request.command, Command::Answer(Answer { ask_id: "a".into(), answer: r#"{"n":1}"#.into() }));
    }

    #[test]
    fn bad_answers_say_what_is_wrong() {
        let failure = |payload: &[u8]| parse("answer", payload, 1024).expect_err("invalid").failure;
        assert!(failure(br#"{"answer":"x"}"#).message.contains("`answer` needs `ask_id`"));
        assert!(failure(br#"{"ask_id":"a"}"#).message.contains("`answer` needs `answer`"));
        assert!(failure(br#"{"ask_id":"a/b","answer":"x"}"#).message.contains("only letters"));
        let raw = |level: &str, body: &'static [u8]| parse_raw(level, Bytes::from_static(body), body.len(), 8).map(|r| r.command);
        assert_eq!(raw("k1", b"no").expect("valid"), Command::Answer(Answer { ask_id: "k1".into(), answer: "no".into() }));
        assert!(raw("k1", b"\xff").expect_err("not UTF-8").failure.message.contains("UTF-8"));
        assert_eq!(raw("k1", b"123456789").expect_err("too big").failure.code, Code::PayloadTooLarge);
        assert!(raw("k=2E1", b"x").expect_err("a dot").failure.message.contains("only letters"));
        assert!(raw(&"k".repeat(MAX_ASK_ID + 1), b"x").is_err());
    }
}
