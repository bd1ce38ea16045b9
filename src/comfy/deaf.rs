//! Telling a deaf WebSocket from a quiet one (ComfyUI issue 16010, docs/PROTOCOL.md §2.1 and §11).
//!
//! Reconnecting with the same client id can leave the new socket registered nowhere: it stays open, answers
//! pings and may still get broadcasts, but nothing ComfyUI sends to the bridge's client id, so the bridge's own
//! prompts go silent. [`DeafWatch`] is the pure part of noticing it: it sorts frames into *addressed* (what
//! only this socket gets: its hello, the feature-flag answer, a prompt's execution events and previews) and
//! *broadcast* (everything else), and says when to suspect deafness: ComfyUI is busy (the last `status`
//! counted prompts), broadcasts came after the last addressed frame, and that frame is older than
//! `comfyui.deaf_after_ms`. The WebSocket task then asks `GET /queue` whether the running prompt is the
//! bridge's; only then is the socket deaf.
//!
//! Execution events of prompts queued without a client id are broadcast too (`progress`, previews), but only
//! one prompt runs at a time, so when the bridge's own prompt runs they are its own.

use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Message;

/// How far into a frame its type is looked for: ComfyUI writes `{"type": "<type>", "data": …}`, type first.
const HEAD: usize = 64;

/// What one frame says about the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Sent to this socket's client id (or an execution event, which only the running prompt's client gets).
    Addressed,
    /// Sent to every socket; `busy` is what a `status` says of the queue (`Some(true)`: prompts remain).
    Broadcast {
        /// Whether prompts are running or pending, when the frame is a `status`.
        busy: Option<bool>,
    },
}

/// Sorts a frame; `None` for control frames (pings, pongs, close), which say nothing of what the socket hears.
pub fn heard(msg: &Message) -> Option<Heard> {
    match msg {
        Message::Text(text) => Some(heard_text(text.as_str())),
        // Previews (types 1 and 4) are execution output; a TEXT frame (3) is broadcast.
        Message::Binary(bytes) => Some(match bytes.get(..4) {
            Some([0, 0, 0, 1 | 4]) => Heard::Addressed,
            _ => Heard::Broadcast { busy: None },
        }),
        _ => None,
    }
}

/// Sorts a text frame by its type (read from its head), and a `status` by whether it carries the `sid` of the
/// connect-time hello.
pub fn heard_text(text: &str) -> Heard {
    let kind = type_of(text).unwrap_or_default();
    match kind {
        "status" => {
            let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
            let data = &v["data"];
            if data.get("sid").is_some_and(|sid| !sid.is_null()) {
                return Heard::Addressed;
            }
            let remaining = data.pointer("/status/exec_info/queue_remaining").and_then(serde_json::Value::as_u64);
            Heard::Broadcast { busy: remaining.map(|n| n > 0) }
        }
        "execution_start"
        | "execution_cached"
        | "executing"
        | "executed"
        | "execution_success"
        | "execution_error"
        | "execution_interrupted"
        | "progress"
        | "progress_state"
        | "feature_flags" => Heard::Addressed,
        k if k.starts_with("comfy_bridge.") => Heard::Addressed,
        _ => Heard::Broadcast { busy: None },
    }
}

/// The value of the first `"type": "<value>"` in the frame's head, else its tail (a writer that sorts keys puts
/// `type` after `data`); unescaped values only.
fn type_of(text: &str) -> Option<&str> {
    let head = &text[..floor_char_boundary(text, HEAD)];
    let tail = &text[ceil_char_boundary(text, text.len().saturating_sub(HEAD))..];
    type_in(head).or_else(|| type_in(tail))
}

fn type_in(part: &str) -> Option<&str> {
    let after = &part[part.find("\"type\"")? + 6..];
    let after = after.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let value = &after[..after.find('"')?];
    (!value.contains('\\')).then_some(value)
}

fn floor_char_boundary(text: &str, at: usize) -> usize {
    (0..=at.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0)
}

fn ceil_char_boundary(text: &str, at: usize) -> usize {
    (at.min(text.len())..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len())
}

/// What one connection has heard, and when a deaf socket is to be suspected. No I/O.
#[derive(Debug, Clone)]
pub struct DeafWatch {
    /// `comfyui.deaf_after_ms`; zero turns the watch off.
    after: Duration,
    /// When the last addressed frame came (or the watch last started over).
    last_addressed: Instant,
    /// Broadcasts came since then: the connection itself works.
    broadcast_since: bool,
    /// The last `status` counted prompts running or pending.
    busy: bool,
}

impl DeafWatch {
    /// A watch for a connection opened at `now`.
    pub fn new(after: Duration, now: Instant) -> Self {
        Self { after, last_addressed: now, broadcast_since: false, busy: false }
    }

    /// A frame arrived at `now`.
    pub fn heard(&mut self, heard: Heard, now: Instant) {
        match heard {
            Heard::Addressed => {
                self.last_addressed = now;
                self.broadcast_since = false;
            }
            Heard::Broadcast { busy } => {
                self.broadcast_since = true;
                if let Some(busy) = busy {
                    self.busy = busy;
                }
            }
        }
    }

    /// Whether the socket may be deaf now: worth asking ComfyUI whether the running prompt is the bridge's.
    pub fn suspect(&self, now: Instant) -> bool {
        !self.after.is_zero() && self.busy && self.broadcast_since && self.silent(now) >= self.after
    }

    /// How long nothing addressed has come.
    pub fn silent(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_addressed)
    }

    /// The check found the socket not deaf (no prompt of the bridge runs, or ComfyUI did not answer): wait a
    /// whole window again before the next one.
    pub fn cleared(&mut self, now: Instant) {
        self.last_addressed = now;
        self.broadcast_since = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS_BUSY: &str = r#"{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}"#;
    const STATUS_IDLE: &str = r#"{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}"#;

    #[test]
    fn frames_are_sorted_into_addressed_and_broadcast() {
        let broadcast = |busy| Heard::Broadcast { busy };
        let hello = r#"{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "me"}}"#;
        assert_eq!(heard_text(hello), Heard::Addressed, "the connect-time hello is for this socket only");
        assert_eq!(heard_text(STATUS_BUSY), broadcast(Some(true)));
        assert_eq!(heard_text(STATUS_IDLE), broadcast(Some(false)));
        for addressed in ["execution_start", "executing", "progress", "executed", "feature_flags", "comfy_bridge.hello"]
        {
            let frame = format!(r#"{{"type": "{addressed}", "data": {{"prompt_id": "p"}}}}"#);
            assert_eq!(heard_text(&frame), Heard::Addressed, "{addressed}");
        }
        assert_eq!(heard_text(r#"{"type": "assets.seed.started", "data": {}}"#), broadcast(None));
        assert_eq!(heard_text(r#"{"type":"logs","data":{}}"#), broadcast(None));
        let sorted = r#"{"data":{"status":{"exec_info":{"queue_remaining":1}}},"type":"status"}"#;
        assert_eq!(heard_text(sorted), broadcast(Some(true)), "a writer that sorts keys");
        assert_eq!(heard_text("not json at all"), broadcast(None));
        assert_eq!(heard_text(&format!("{{\"type\": \"{}ü\"", "x".repeat(60))), broadcast(None), "cut mid-char");
        let binary = |t: u8| heard(&Message::binary(vec![0, 0, 0, t, 0, 0, 0, 1]));
        assert_eq!(
            (binary(4), binary(1), binary(3)),
            (Some(Heard::Addressed), Some(Heard::Addressed), Some(broadcast(None)))
        );
        assert_eq!(heard(&Message::Ping(Default::default())), None);
    }

    #[test]
    fn deaf_is_suspected_only_when_busy_broadcasts_come_and_nothing_addressed_has_for_the_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut watch = DeafWatch::new(Duration::from_millis(1_000), t0);
        assert!(!watch.suspect(at(5_000)), "idle and silent: nothing to hear");
        watch.heard(heard_text(STATUS_BUSY), at(10));
        assert!(!watch.suspect(at(999)), "not silent long enough");
        assert!(watch.suspect(at(1_000)));
        watch.heard(Heard::Addressed, at(1_100));
        assert!(
            !watch.suspect(at(5_000)),
            "addressed frames came; silence since then with no broadcast is a quiet node"
        );
        watch.heard(Heard::Broadcast { busy: None }, at(5_100));
        assert!(watch.suspect(at(5_100)));
        watch.cleared(at(5_200));
        assert!(!watch.suspect(at(6_100)), "a check cleared it: a whole window again");
        watch.heard(Heard::Broadcast { busy: None }, at(6_300));
        assert!(watch.suspect(at(6_300)));
        watch.heard(heard_text(STATUS_IDLE), at(6_400));
        assert!(!watch.suspect(at(9_000)), "ComfyUI is idle: no prompt of the bridge can be running");

        let mut off = DeafWatch::new(Duration::ZERO, t0);
        off.heard(heard_text(STATUS_BUSY), at(1));
        assert!(!off.suspect(at(1_000_000)), "0 turns the watch off");
    }
}
