//! One pass over a text frame of the shape ComfyUI nearly always sends: a JSON object with a plain `type`
//! string and a `data` value. It validates the whole frame as strict JSON and says where `type` and `data` are,
//! at a fraction of what deserializing costs.
//!
//! It is only a fast path. Whatever it is not sure of (`\u` escapes, escaped top-level keys, a repeated or
//! missing `type`/`data`, deep nesting, a frame that is not an object, anything invalid) makes it give up, and
//! the frame goes through serde_json, which decides. So it never accepts a frame serde_json would refuse, and
//! what it finds is what serde_json finds (a property test holds it to that).

use super::Found;
use crate::json::ESCAPED;

/// Where the envelope's parts are in a frame that is valid JSON.
pub(super) struct Frame<'a> {
    /// The `type` string's contents (it has no escapes).
    pub kind: &'a str,
    /// `data`'s raw JSON.
    pub data: &'a str,
    /// The routing fields among `data`'s members, when it is an object whose keys have no escapes.
    pub found: Option<Found<'a>>,
}

/// Deeper nesting than this is left to serde_json (whose own limit is 128).
const MAX_DEPTH: usize = 64;

/// The frame's `type` and `data`, when it is an object of the common shape and valid; `None` when serde_json
/// must decide.
pub(super) fn frame(text: &str) -> Option<Frame<'_>> {
    let mut s = Scanner { text, bytes: text.as_bytes(), at: 0 };
    let (mut kind, mut data, mut found) = (None, None, None);
    s.whitespace();
    if s.peek()? != b'{' {
        return None;
    }
    s.members(|s, key| {
        if key.escaped {
            return None;
        }
        let start = s.at;
        match &text[key.inner()] {
            "type" => {
                let value = s.string()?;
                if kind.is_some() || value.escaped {
                    return None;
                }
                kind = Some(value.inner());
            }
            "data" => {
                match s.peek()? {
                    b'{' => found = Some(s.fields()?),
                    _ => s.value(0)?,
                }
                if data.is_some() {
                    return None;
                }
                data = Some(start..s.at);
            }
            _ => s.value(0)?,
        }
        Some(())
    })?;
    s.whitespace();
    if s.at != s.bytes.len() {
        return None;
    }
    Some(Frame { kind: text.get(kind?)?, data: text.get(data?)?, found: found.flatten() })
}

/// A string just scanned: where its quotes are, and whether it holds escapes.
struct Str {
    start: usize,
    end: usize,
    escaped: bool,
}

impl Str {
    /// Between the quotes.
    fn inner(&self) -> std::ops::Range<usize> {
        self.start + 1..self.end - 1
    }
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    /// `data`'s object, noting the routing fields among its members: `Some(None)` when a key has escapes (the
    /// caller then reads the fields the slow way); `None` when it is not valid.
    fn fields(&mut self) -> Option<Option<Found<'a>>> {
        let mut found = Some(Found::default());
        self.members(|s, key| {
            let start = s.at;
            s.value(1)?;
            match (&mut found, key.escaped) {
                (Some(found), false) => found.member(s.text.get(key.inner())?, s.text.get(start..s.at)?),
                _ => found = None,
            }
            Some(())
        })?;
        Some(found)
    }

    /// An object from its `{`: for each member, its key, and `value` reads the value.
    fn members(&mut self, mut value: impl FnMut(&mut Self, Str) -> Option<()>) -> Option<()> {
        self.sequence(b'}', |s| {
            let key = s.string()?;
            s.whitespace();
            s.expect(b':')?;
            s.whitespace();
            value(s, key)
        })
    }

    /// From an opening bracket: `item`s separated by commas, up to `close`.
    fn sequence(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.at += 1;
        self.whitespace();
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            item(self)?;
            self.whitespace();
            match self.peek()? {
                b',' => {
                    self.at += 1;
                    self.whitespace();
                }
                b if b == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    /// A string starting at its `"`. `\u` escapes (surrogates) are left to serde_json.
    fn string(&mut self) -> Option<Str> {
        let bytes = self.bytes;
        let start = self.at;
        if bytes.get(start) != Some(&b'"') {
            return None;
        }
        let mut at = start + 1;
        let mut escaped = false;
        loop {
            at += bytes.get(at..)?.iter().position(|&b| ESCAPED[usize::from(b)])?;
            match bytes[at] {
                b'"' => {
                    self.at = at + 1;
                    return Some(Str { start, end: at + 1, escaped });
                }
                b'\\' => {
                    match bytes.get(at + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at += 2,
                        _ => return None,
                    }
                    escaped = true;
                }
                _ => return None,
            }
        }
    }

    /// Any JSON value.
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.bytes.get(self.at..)?.starts_with(word).then(|| self.at += word.len())
    }

    /// `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.members(|s, _| s.value(depth))
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.sequence(b']', |s| s.value(depth))
    }
}
