//! Named workflow templates: every API-format `*.json` in `commands.templates_dir`, named by file stem.
//!
//! A `patch` request edits a template and writes the result to `<state.dir>/templates/<name>.json` (write to a
//! temporary file, sync, rename), so it survives restarts. That patched copy shadows the source file from
//! then on; delete it to go back to the source. Files that cannot be used are reported, never fatal.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::patch::{self, PatchError, Workflow};
use super::Edits;

/// Why a template could not be used or changed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// No template has that name.
    #[error("no template named `{0}`")]
    Unknown(String),
    /// The edits do not apply.
    #[error(transparent)]
    Patch(#[from] PatchError),
    /// The patched template could not be saved; nothing changed.
    #[error("cannot save template `{name}`: {source}")]
    Io {
        /// The template.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
struct Template {
    workflow: Workflow,
    patched: bool,
}

/// The templates, owned by the command plane.
#[derive(Debug)]
pub struct Templates {
    source_dir: PathBuf,
    /// `source_dir` does not exist.
    missing: bool,
    patched_dir: PathBuf,
    templates: BTreeMap<String, Template>,
    errors: BTreeMap<String, String>,
}

fn read_workflow(path: &Path) -> Result<Workflow, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?;
    patch::validate(&value).cloned().map_err(|e| format!("not an API-format workflow: {e}"))
}

impl Templates {
    /// Loads every template of `source_dir`, with the patched copies under `state_dir`.
    pub fn load(source_dir: &Path, state_dir: &Path) -> Self {
        let mut this = Self {
            source_dir: source_dir.to_path_buf(),
            missing: false,
            patched_dir: state_dir.join("templates"),
            templates: BTreeMap::new(),
            errors: BTreeMap::new(),
        };
        let entries = match std::fs::read_dir(source_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                this.missing = true;
                return this;
            }
            Err(e) => {
                this.errors.insert(source_dir.display().to_string(), e.to_string());
                return this;
            }
        };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let (Some(name), Some(file)) = (path.file_stem().and_then(|s| s.to_str()), path.file_name()) else {
                continue;
            };
            let file = file.to_string_lossy().to_string();
            let source = match read_workflow(&path) {
                Ok(workflow) => workflow,
                Err(e) => {
                    this.errors.insert(file, e);
                    continue;
                }
            };
            let patched_path = this.patched_dir.join(format!("{name}.json"));
            let template = match read_workflow(&patched_path) {
                Ok(workflow) => Template { workflow, patched: true },
                Err(e) => {
                    if patched_path.exists() {
                        this.errors.insert(patched_path.display().to_string(), e);
                    }
                    Template { workflow: source, patched: false }
                }
            };
            this.templates.insert(name.to_string(), template);
        }
        this
    }

    /// The current version of a template.
    pub fn get(&self, name: &str) -> Option<&Workflow> {
        self.templates.get(name).map(|t| &t.workflow)
    }

    /// Whether `commands.templates_dir` does not exist.
    pub fn dir_missing(&self) -> bool {
        self.missing
    }

    /// What to answer for a template that does not exist: where the bridge looked, and what it found there.
    pub fn unknown(&self, name: &str) -> String {
        let dir = self.source_dir.display();
        let names: Vec<&str> = self.names().collect();
        if self.missing {
            format!(
                "no template named `{name}`: the templates directory `{dir}` (commands.templates_dir) does not exist"
            )
        } else if names.is_empty() {
            format!("no template named `{name}`: `{dir}` (commands.templates_dir) holds no usable *.json template")
        } else {
            format!("no template named `{name}` in `{dir}`; templates there: {}", names.join(", "))
        }
    }

    /// The template names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.templates.keys().map(String::as_str)
    }

    /// Files that could not be used, and why.
    pub fn errors(&self) -> &BTreeMap<String, String> {
        &self.errors
    }

    /// The `templates` response: each template's nodes and their current inputs, and the unusable files.
    pub fn describe(&self) -> Value {
        let templates: Vec<Value> = self
            .templates
            .iter()
            .map(|(name, t)| {
                let mut ids: Vec<&String> = t.workflow.keys().collect();
                ids.sort_by(|a, b| natural(a).cmp(&natural(b)));
                let nodes: Vec<Value> = ids
                    .into_iter()
                    .map(|id| {
                        let node = &t.workflow[id];
                        let mut out = json!({ "id": id, "class": node["class_type"], "inputs": node["inputs"] });
                        if let Some(title) = node.pointer("/_meta/title") {
                            out["title"] = title.clone();
                        }
                        out
                    })
                    .collect();
                json!({ "name": name, "patched": t.patched, "nodes": nodes })
            })
            .collect();
        let errors: Vec<Value> =
            self.errors.iter().map(|(file, error)| json!({ "file": file, "error": error })).collect();
        json!({ "templates": templates, "errors": errors })
    }

    /// Edits a template and saves it; on any failure neither the file nor the template changes.
    pub fn patch(&mut self, name: &str, edits: &Edits, rng: &mut fastrand::Rng) -> Result<Vec<String>, TemplateError> {
        let template = self.templates.get(name).ok_or_else(|| TemplateError::Unknown(name.to_string()))?;
        let mut workflow = template.workflow.clone();
        let changed = patch::apply(&mut workflow, edits, rng)?;
        let path = self.patched_dir.join(format!("{name}.json"));
        write_atomically(&path, &Value::Object(workflow.clone()))
            .map_err(|source| TemplateError::Io { name: name.to_string(), source })?;
        self.templates.insert(name.to_string(), Template { workflow, patched: true });
        Ok(changed)
    }
}

/// Sorts `10` after `9` and keeps other ids in text order.
fn natural(id: &str) -> (u64, &str) {
    (id.parse().unwrap_or(u64::MAX), id)
}

fn write_atomically(path: &Path, value: &Value) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", fastrand::u64(..)));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().expect("tempdir");
        let (source, state) = (root.path().join("templates"), root.path().join("state"));
        std::fs::create_dir_all(&source).expect("mkdir");
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/workflows/a_success__prompt.json");
        std::fs::copy(fixture, source.join("probe.json")).expect("copy");
        std::fs::write(source.join("broken.json"), "{ nope").expect("write");
        std::fs::write(source.join("ui.json"), r#"{"nodes": [], "links": []}"#).expect("write");
        std::fs::write(source.join("notes.txt"), "not a template").expect("write");
        (root, source, state)
    }

    #[test]
    fn good_files_load_and_bad_ones_are_reported() {
        let (_root, source, state) = setup();
        let templates = Templates::load(&source, &state);
        assert!(templates.get("probe").is_some());
        assert_eq!(templates.errors().keys().collect::<Vec<_>>(), ["broken.json", "ui.json"]);
        let described = templates.describe();
        assert_eq!(described["templates"][0]["name"], "probe");
        assert_eq!(described["templates"][0]["nodes"][1]["title"], "Sleep with Progress");
        assert_eq!(described["templates"][0]["nodes"][1]["inputs"]["steps"], 4);
        assert_eq!(described["errors"].as_array().map(Vec::len), Some(2));
        assert!(Templates::load(&source.join("missing"), &state).errors().is_empty(), "no dir, no templates");
    }

    #[test]
    fn a_patch_persists_across_reload_and_a_failed_one_changes_nothing() {
        let (_root, source, state) = setup();
        let mut templates = Templates::load(&source, &state);
        let mut rng = fastrand::Rng::with_seed(3);
        let edits = Edits { set: vec![("Sleep with Progress.steps".into(), json!(12))], ..Edits::default() };
        assert_eq!(templates.patch("probe", &edits, &mut rng).expect("patched"), ["2.steps"]);
        let reloaded = Templates::load(&source, &state);
        assert_eq!(reloaded.get("probe").expect("probe")["2"]["inputs"]["steps"], 12);
        assert_eq!(reloaded.describe()["templates"][0]["patched"], true);

        let saved = std::fs::read(state.join("templates/probe.json")).expect("saved");
        let bad = Edits { set: vec![("2.steps".into(), json!(1)), ("9.x".into(), json!(1))], ..Edits::default() };
        assert!(matches!(templates.patch("probe", &bad, &mut rng), Err(TemplateError::Patch(_))));
        assert_eq!(std::fs::read(state.join("templates/probe.json")).expect("still there"), saved);
        assert_eq!(templates.get("probe").expect("probe")["2"]["inputs"]["steps"], 12);
        assert!(matches!(templates.patch("nope", &edits, &mut rng), Err(TemplateError::Unknown(_))));
        let leftovers = std::fs::read_dir(state.join("templates")).expect("dir").count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
    }
}
