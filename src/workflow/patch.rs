//! Edits to an API-format workflow: `merge` (RFC 7396), `set` by `"<node>.<input>"`, `randomize` seeds.
//!
//! Pure functions. [`apply`] is all-or-nothing: it works on a copy and only replaces the workflow when every
//! edit succeeded and the result is still a valid API-format workflow.

use serde_json::{json, Map, Value};

use super::Edits;

/// An API-format workflow: node id to `{"class_type", "inputs", "_meta"?}`.
pub type Workflow = Map<String, Value>;

/// Why edits could not be applied. Every variant names what the user can pick from instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatchError {
    /// A key that is not `"<node>.<input>"`.
    #[error("`{key}` is not \"<node>.<input>\"")]
    BadKey {
        /// The key as given.
        key: String,
    },
    /// No node has that id, title or class.
    #[error("no node `{target}` (by id, title or class); nodes: {}", candidates.join(", "))]
    NoSuchNode {
        /// The node part of the key.
        target: String,
        /// Every node, as `id (title, class)`.
        candidates: Vec<String>,
    },
    /// Several nodes share that title or class.
    #[error("`{target}` is ambiguous: nodes {} match; use a node id", candidates.join(", "))]
    Ambiguous {
        /// The node part of the key.
        target: String,
        /// The matching node ids.
        candidates: Vec<String>,
    },
    /// The node has no such input.
    #[error("node `{node}` has no input `{input}`; inputs: {}", candidates.join(", "))]
    NoSuchInput {
        /// The node id.
        node: String,
        /// The input asked for.
        input: String,
        /// The node's inputs.
        candidates: Vec<String>,
    },
    /// The edits leave something that is not an API-format workflow.
    #[error("the edited workflow is invalid: {0}")]
    Invalid(String),
}

impl PatchError {
    /// The `details` of a `patch_failed` response.
    pub fn details(&self) -> Value {
        match self {
            Self::BadKey { key } => json!({ "key": key }),
            Self::NoSuchNode { target, candidates } | Self::Ambiguous { target, candidates } => {
                json!({ "target": target, "candidates": candidates })
            }
            Self::NoSuchInput { node, input, candidates } => {
                json!({ "target": format!("{node}.{input}"), "node": node, "candidates": candidates })
            }
            Self::Invalid(reason) => json!({ "reason": reason }),
        }
    }
}

/// Checks the API format: a non-empty object of nodes, each with a string `class_type` and an object `inputs`.
pub fn validate(workflow: &Value) -> Result<&Workflow, String> {
    let map = workflow.as_object().ok_or("a workflow must be a JSON object of nodes")?;
    if map.is_empty() {
        return Err("the workflow has no nodes".into());
    }
    for (id, node) in map {
        let node = node.as_object().ok_or_else(|| format!("node `{id}` is not an object"))?;
        if !node.get("class_type").is_some_and(Value::is_string) {
            return Err(format!("node `{id}` has no string `class_type`"));
        }
        if !node.get("inputs").is_some_and(Value::is_object) {
            return Err(format!("node `{id}` has no `inputs` object"));
        }
    }
    Ok(map)
}

/// RFC 7396: objects merge member by member, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in members {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn title(node: &Value) -> Option<&str> {
    node.pointer("/_meta/title")?.as_str()
}

fn class(node: &Value) -> Option<&str> {
    node.get("class_type")?.as_str()
}

/// The id of the node `target` names: a node id, else a unique `_meta.title`, else a unique `class_type`.
pub fn resolve<'a>(workflow: &'a Workflow, target: &str) -> Result<&'a str, PatchError> {
    if let Some((id, _)) = workflow.get_key_value(target) {
        return Ok(id);
    }
    for pick in [title, class] {
        let matches: Vec<&str> =
            workflow.iter().filter(|(_, node)| pick(node) == Some(target)).map(|(id, _)| id.as_str()).collect();
        match matches.as_slice() {
            [] => continue,
            [one] => return Ok(one),
            many => {
                return Err(PatchError::Ambiguous {
                    target: target.into(),
                    candidates: many.iter().map(|s| s.to_string()).collect(),
                })
            }
        }
    }
    let candidates = workflow
        .iter()
        .map(|(id, node)| match title(node) {
            Some(t) => format!("{id} ({t}, {})", class(node).unwrap_or("?")),
            None => format!("{id} ({})", class(node).unwrap_or("?")),
        })
        .collect();
    Err(PatchError::NoSuchNode { target: target.into(), candidates })
}

/// The node id and input a `"<node>.<input>"` key names (split at the last `.`, so ids like `5.0.0.3` work).
fn locate(workflow: &Workflow, key: &str) -> Result<(String, String), PatchError> {
    let bad = || PatchError::BadKey { key: key.into() };
    let (node, input) = key.rsplit_once('.').ok_or_else(bad)?;
    if node.is_empty() || input.is_empty() {
        return Err(bad());
    }
    let id = resolve(workflow, node)?;
    let inputs = workflow[id].get("inputs").and_then(Value::as_object);
    if !inputs.is_some_and(|i| i.contains_key(input)) {
        let candidates = inputs.map(|i| i.keys().cloned().collect()).unwrap_or_default();
        return Err(PatchError::NoSuchInput { node: id.into(), input: input.into(), candidates });
    }
    Ok((id.to_string(), input.to_string()))
}

fn set_input(workflow: &mut Workflow, id: &str, input: &str, value: Value) {
    if let Some(inputs) = workflow.get_mut(id).and_then(|n| n.get_mut("inputs")).and_then(Value::as_object_mut) {
        inputs.insert(input.to_string(), value);
    }
}

/// Applies `edits` (merge, then set, then randomize) or nothing at all. Returns what changed, sorted: a
/// `"<node>.<input>"` per changed input and a `"<node>"` per node added, removed or otherwise changed.
pub fn apply(workflow: &mut Workflow, edits: &Edits, rng: &mut fastrand::Rng) -> Result<Vec<String>, PatchError> {
    let mut edited = Value::Object(workflow.clone());
    if let Some(patch) = &edits.merge {
        merge_patch(&mut edited, patch);
    }
    validate(&edited).map_err(PatchError::Invalid)?;
    let Value::Object(mut edited) = edited else { return Err(PatchError::Invalid("not an object".into())) };
    for (key, value) in &edits.set {
        let (id, input) = locate(&edited, key)?;
        set_input(&mut edited, &id, &input, value.clone());
    }
    for key in &edits.randomize {
        let (id, input) = locate(&edited, key)?;
        set_input(&mut edited, &id, &input, json!(rng.u64(..1 << 53)));
    }
    let changed = diff(workflow, &edited);
    *workflow = edited;
    Ok(changed)
}

/// What differs between two workflows, as [`apply`] reports it.
pub fn diff(before: &Workflow, after: &Workflow) -> Vec<String> {
    let mut changed = Vec::new();
    for (id, node) in after {
        let Some(old) = before.get(id) else {
            changed.push(id.clone());
            continue;
        };
        if old == node {
            continue;
        }
        let inputs = |n: &Value| n.get("inputs").and_then(Value::as_object).cloned().unwrap_or_default();
        let (old_inputs, new_inputs) = (inputs(old), inputs(node));
        let mut rest_old = old.clone();
        let mut rest_new = node.clone();
        for rest in [&mut rest_old, &mut rest_new] {
            if let Some(obj) = rest.as_object_mut() {
                obj.remove("inputs");
            }
        }
        if rest_old != rest_new {
            changed.push(id.clone());
        }
        let names: std::collections::BTreeSet<&String> = old_inputs.keys().chain(new_inputs.keys()).collect();
        changed.extend(
            names.into_iter().filter(|k| old_inputs.get(*k) != new_inputs.get(*k)).map(|k| format!("{id}.{k}")),
        );
    }
    changed.extend(before.keys().filter(|id| !after.contains_key(*id)).cloned());
    changed.sort();
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// ComfyUI's default text-to-image workflow, API format, with titled prompts.
    fn txt2img() -> Workflow {
        let v = json!({
            "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 8, "model": ["4", 0],
                  "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"}, "inputs": {"text": "a fox", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "_meta": {"title": "Negative"}, "inputs": {"text": "blurry", "clip": ["4", 1]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
            "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
        });
        v.as_object().cloned().expect("object")
    }

    fn set(pairs: &[(&str, Value)]) -> Edits {
        Edits { set: pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), ..Edits::default() }
    }

    fn rng() -> fastrand::Rng {
        fastrand::Rng::with_seed(1)
    }

    #[test]
    fn prompt_text_by_title_or_id_and_image_by_class() {
        let mut wf = txt2img();
        let edits = set(&[
            ("Positive.text", json!("a lighthouse")),
            ("7.text", json!("")),
            ("LoadImage.image", json!("up.png")),
        ]);
        let changed = apply(&mut wf, &edits, &mut rng()).expect("applies");
        assert_eq!(changed, ["10.image", "6.text", "7.text"]);
        assert_eq!(wf["6"]["inputs"]["text"], "a lighthouse");
        assert_eq!(wf["10"]["inputs"]["image"], "up.png");
    }

    #[test]
    fn an_ambiguous_class_fails_naming_both_nodes_and_changes_nothing() {
        let mut wf = txt2img();
        let edits = set(&[("Positive.text", json!("x")), ("CLIPTextEncode.text", json!("y"))]);
        let err = apply(&mut wf, &edits, &mut rng()).expect_err("ambiguous");
        assert_eq!(
            err,
            PatchError::Ambiguous { target: "CLIPTextEncode".into(), candidates: vec!["6".into(), "7".into()] }
        );
        assert!(err.to_string().contains("6, 7"), "{err}");
        assert_eq!(wf, txt2img(), "all or nothing");
    }

    #[test]
    fn missing_nodes_and_inputs_name_the_candidates() {
        let mut wf = txt2img();
        let err = apply(&mut wf, &set(&[("KSampler.sead", json!(1))]), &mut rng()).expect_err("no input");
        assert!(
            matches!(&err, PatchError::NoSuchInput { node, candidates, .. } if node == "3" && candidates.contains(&"seed".to_string()))
        );
        let err = apply(&mut wf, &set(&[("Upscaler.scale", json!(2))]), &mut rng()).expect_err("no node");
        assert!(err.to_string().contains("6 (Positive, CLIPTextEncode)"), "{err}");
        for key in ["nodot", ".x", "x.", ""] {
            assert_eq!(
                apply(&mut wf, &set(&[(key, json!(1))]), &mut rng()),
                Err(PatchError::BadKey { key: key.into() })
            );
        }
    }

    #[test]
    fn node_ids_with_dots_split_at_the_last_dot() {
        let mut wf: Workflow =
            json!({"5.0.0.3": {"class_type": "X", "inputs": {"seed": 1}}}).as_object().cloned().expect("o");
        assert_eq!(
            apply(&mut wf, &set(&[("5.0.0.3.seed", json!(2))]), &mut rng()),
            Ok(vec!["5.0.0.3.seed".to_string()])
        );
    }

    #[test]
    fn merge_then_set_then_randomize() {
        let mut wf = txt2img();
        let edits = Edits {
            merge: Some(json!({"11": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}, "10": null})),
            set: vec![("11.images".into(), json!(["3", 0]))],
            randomize: vec!["KSampler.seed".into()],
        };
        let changed = apply(&mut wf, &edits, &mut rng()).expect("applies");
        assert_eq!(changed, ["10", "11", "3.seed"]);
        assert_eq!(wf["11"]["inputs"]["images"], json!(["3", 0]));
        assert!(wf["3"]["inputs"]["seed"].as_u64().is_some_and(|s| s < 1 << 53));
        let broken = Edits { merge: Some(json!({"3": {"class_type": null}})), ..Edits::default() };
        assert!(matches!(apply(&mut wf, &broken, &mut rng()), Err(PatchError::Invalid(_))));
    }

    #[test]
    fn recorded_workflows_are_valid_and_broken_ones_say_where() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/workflows");
        for entry in std::fs::read_dir(dir).expect("fixtures") {
            let path = entry.expect("entry").path();
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            match validate(&v) {
                Ok(_) => assert!(!name.contains("missing_class_type"), "{name}"),
                Err(e) => assert!(name.contains("missing_class_type") && e.contains("node `"), "{name}: {e}"),
            }
        }
    }

    #[test]
    fn the_node_red_example_edits_resolve_in_the_example_template() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/templates/txt2img.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
        let mut wf = validate(&v).expect("valid").clone();
        let edits = Edits {
            set: vec![("Positive.text".into(), json!("a cat"))],
            randomize: vec!["KSampler.seed".into()],
            ..Edits::default()
        };
        let changed = apply(&mut wf, &edits, &mut rng()).expect("applies");
        assert_eq!(changed, ["3.seed", "6.text"]);
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z]{0,4}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn merge_patch_is_idempotent_and_null_removes(target in json_value(), patch in json_value()) {
            let mut once = target.clone();
            merge_patch(&mut once, &patch);
            let mut twice = once.clone();
            merge_patch(&mut twice, &patch);
            prop_assert_eq!(&once, &twice);
            if let (Value::Object(p), Value::Object(t)) = (&patch, &once) {
                for (k, v) in p {
                    prop_assert_eq!(v.is_null(), !t.contains_key(k));
                }
            }
        }

        #[test]
        fn set_reports_exactly_what_changed_and_failures_change_nothing(
            node in prop::sample::select(vec!["3", "5", "6", "9", "12", "Positive", "CLIPTextEncode", "KSampler"]),
            input in prop::sample::select(vec!["seed", "text", "width", "images", "nope"]),
            value in json_value(),
        ) {
            let mut wf = txt2img();
            let key = format!("{node}.{input}");
            match apply(&mut wf, &set(&[(&key, value.clone())]), &mut rng()) {
                Ok(changed) => {
                    let id = resolve(&txt2img(), node).expect("resolved").to_string();
                    let was = txt2img()[&id]["inputs"][input].clone();
                    let expected = if was == value { vec![] } else { vec![format!("{id}.{input}")] };
                    prop_assert_eq!(changed, expected);
                    prop_assert_eq!(&wf[&id]["inputs"][input], &value);
                }
                Err(_) => prop_assert_eq!(wf, txt2img()),
            }
        }
    }
}
