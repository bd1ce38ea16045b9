//! A request body as an ordered list of fields, and typed access to them with errors that name the field.
//!
//! serde_json's `Map` sorts its keys (the `preserve_order` feature is off), but `set` must apply in request order
//! and duplicate fields must be caught, so the outer two levels are read into [`Ordered`] instead.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Value};

use crate::commands::response::{Code, Failure};
use crate::workflow::Edits;

/// A JSON value whose outermost object, if it is one, keeps its keys in document order, duplicates included.
/// Everything below is read with serde_json's own deserializer, so its recursion limit still applies.
#[derive(Debug)]
pub(super) enum Ordered<V> {
    Object(Vec<(String, V)>),
    Other(Value),
}

/// A field's value: an object keeps its key order one level down.
pub(super) type FieldValue = Ordered<Value>;

impl<V> Ordered<V> {
    /// The JSON type, with an article, for messages ("must be a boolean, not a string").
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Ordered::Object(_) => "an object",
            Ordered::Other(Value::Array(_)) => "an array",
            Ordered::Other(Value::String(_)) => "a string",
            Ordered::Other(Value::Number(_)) => "a number",
            Ordered::Other(Value::Bool(_)) => "a boolean",
            Ordered::Other(Value::Null) => "null",
            Ordered::Other(Value::Object(_)) => "an object",
        }
    }
}

impl FieldValue {
    /// The plain value; among duplicate keys the last wins, as with serde_json.
    pub(super) fn into_value(self) -> Value {
        match self {
            Ordered::Object(pairs) => Value::Object(pairs.into_iter().collect()),
            Ordered::Other(value) => value,
        }
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OrderedVisitor(PhantomData))
    }
}

struct OrderedVisitor<V>(PhantomData<V>);

impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
    type Value = Ordered<V>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Ordered::Other(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Ordered::Other(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Ordered::Other(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Ordered::Other(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Ordered::Other(Value::from(v)))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Ordered::Other(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Ordered::Other(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Ordered::Other(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut pairs = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, V>()? {
            pairs.push((key, value));
        }
        Ok(Ordered::Object(pairs))
    }
}

/// An `invalid_request` failure naming `field` in its details.
pub(super) fn invalid(field: &str, message: String) -> Failure {
    Failure::new(Code::InvalidRequest, message).with_details(json!({ "field": field }))
}

/// The fields of one request besides `id`, consumed as the command reads them.
pub struct Body {
    command: &'static str,
    fields: Vec<(String, FieldValue)>,
}

impl Body {
    /// The body of a `command` request; fails on a duplicate field.
    pub(super) fn new(command: &'static str, fields: Vec<(String, FieldValue)>) -> Result<Self, Failure> {
        let mut seen = HashSet::new();
        if let Some((dup, _)) = fields.iter().find(|(key, _)| !seen.insert(key.as_str())) {
            return Err(invalid(dup, format!("duplicate field `{dup}`")));
        }
        Ok(Self { command, fields })
    }

    /// Fails on the first field (in request order) that is not `id` and not in `allowed`.
    pub(super) fn only(&self, allowed: &[&str]) -> Result<(), Failure> {
        let Some((unknown, _)) = self.fields.iter().find(|(k, _)| k != "id" && !allowed.contains(&k.as_str())) else {
            return Ok(());
        };
        let takes = if allowed.is_empty() {
            "no fields besides `id`".to_owned()
        } else {
            let names: Vec<_> = allowed.iter().map(|a| format!("`{a}`")).collect();
            format!("only `id`, {}", names.join(", "))
        };
        Err(Failure::new(Code::InvalidRequest, format!("unknown field `{unknown}`: `{}` takes {takes}", self.command))
            .with_details(json!({ "field": unknown, "allowed": allowed })))
    }

    /// Removes a field; `null` counts as absent, as serde does for `Option` fields.
    fn take(&mut self, name: &str) -> Option<FieldValue> {
        let at = self.fields.iter().position(|(key, _)| key == name)?;
        match self.fields.swap_remove(at).1 {
            Ordered::Other(Value::Null) => None,
            value => Some(value),
        }
    }

    /// An optional field converted by `convert`, or a failure saying it must be `expected`.
    fn typed<T>(
        &mut self,
        name: &str,
        expected: &str,
        convert: impl FnOnce(FieldValue) -> Option<T>,
    ) -> Result<Option<T>, Failure> {
        let Some(value) = self.take(name) else { return Ok(None) };
        let kind = value.kind();
        match convert(value) {
            Some(converted) => Ok(Some(converted)),
            None => Err(invalid(name, format!("`{name}` must be {expected}, not {kind}"))),
        }
    }

    /// An optional field of any JSON type.
    pub(super) fn take_value(&mut self, name: &str) -> Option<Value> {
        self.take(name).map(Ordered::into_value)
    }

    /// An optional boolean.
    pub(super) fn bool(&mut self, name: &str) -> Result<Option<bool>, Failure> {
        self.typed(name, "a boolean", |v| match v {
            Ordered::Other(Value::Bool(b)) => Some(b),
            _ => None,
        })
    }

    /// An optional string, possibly empty.
    pub(super) fn string(&mut self, name: &str) -> Result<Option<String>, Failure> {
        self.typed(name, "a string", |v| match v {
            Ordered::Other(Value::String(s)) => Some(s),
            _ => None,
        })
    }

    /// An optional non-empty string.
    pub(super) fn non_empty_string(&mut self, name: &str) -> Result<Option<String>, Failure> {
        match self.string(name)? {
            Some(s) if s.is_empty() => Err(invalid(name, format!("`{name}` must not be empty"))),
            other => Ok(other),
        }
    }

    /// A required non-empty string.
    pub(super) fn required_string(&mut self, name: &str) -> Result<String, Failure> {
        self.non_empty_string(name)?.ok_or_else(|| self.missing(name))
    }

    /// An optional finite number.
    pub(super) fn number(&mut self, name: &str) -> Result<Option<f64>, Failure> {
        self.typed(name, "a finite number", |v| match v {
            Ordered::Other(Value::Number(n)) => n.as_f64().filter(|f| f.is_finite()),
            _ => None,
        })
    }

    /// An optional object.
    pub(super) fn object(&mut self, name: &str) -> Result<Option<Map<String, Value>>, Failure> {
        self.typed(name, "an object", |v| match v.into_value() {
            Value::Object(map) => Some(map),
            _ => None,
        })
    }

    /// An optional object as its entries in request order, duplicates included.
    pub(super) fn ordered_object(&mut self, name: &str) -> Result<Option<Vec<(String, Value)>>, Failure> {
        self.typed(name, "an object", |v| match v {
            Ordered::Object(pairs) => Some(pairs),
            Ordered::Other(_) => None,
        })
    }

    /// An optional array of strings.
    pub(super) fn strings(&mut self, name: &str) -> Result<Option<Vec<String>>, Failure> {
        self.typed(name, "an array of strings", |v| match v {
            Ordered::Other(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
            _ => None,
        })
    }

    /// The failure for a required field that is absent (or `null`).
    pub(super) fn missing(&self, name: &str) -> Failure {
        invalid(name, format!("`{}` needs `{name}`", self.command))
    }
}

/// `merge`, `set` and `randomize`, whichever the command allowed (`queue` and `patch`).
pub(super) fn edits(body: &mut Body) -> Result<Edits, Failure> {
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
