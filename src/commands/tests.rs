//! Parsing every command from request bodies: the fixed order of checks, every malformed case's code and field,
//! and properties over arbitrary input (the field names come from [`Command::FIELDS`], the one list in code).

use base64::Engine as _;
use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Map;

use super::answer::Answer;
use super::cancel::Cancel;
use super::clear::Clear;
use super::free::Free;
use super::interrupt::Interrupt;
use super::patch::PatchTemplate;
use super::queue::{QueuePrompt, Source};
use super::status::Status;
use super::templates::ListTemplates;
use super::upload::{check_filename, parse_raw as parse_raw_upload, Upload, MAX_FILENAME_BYTES};
use super::*;
use crate::workflow::Edits;
use proptest::{option, sample};

const MAX: usize = 1 << 20;

fn ok(command: &str, payload: &str) -> Request {
    match parse(command, payload.as_bytes(), MAX) {
        Ok(request) => request,
        Err(rejected) => panic!("{command} {payload}: {rejected}"),
    }
}

fn rejected(command: &str, payload: &[u8]) -> Rejected {
    parse(command, payload, MAX).expect_err("must be rejected")
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn every_command_parses_and_names_itself() {
    let cases: [(&str, &str, Command); 12] = [
        ("templates", "", Command::Templates(ListTemplates)),
        ("clear", " \r\n\t", Command::Clear(Clear)),
        ("status", r#"{"id": null}"#, Command::Status(Status)),
        ("interrupt", "{}", Command::Interrupt(Interrupt { prompt_id: None })),
        ("interrupt", r#"{"prompt_id": "p1"}"#, Command::Interrupt(Interrupt { prompt_id: Some("p1".into()) })),
        ("cancel", r#"{"prompt_id": "p1"}"#, Command::Cancel(Cancel { prompt_id: "p1".into() })),
        ("free", "", Command::Free(Free { unload_models: false, free_memory: false })),
        (
            "free",
            r#"{"unload_models": true, "free_memory": null}"#,
            Command::Free(Free { unload_models: true, free_memory: false }),
        ),
        (
            "queue",
            r#"{"template": "txt2img", "front": null}"#,
            Command::Queue(QueuePrompt {
                source: Source::Template("txt2img".into()),
                edits: Edits::default(),
                front: false,
                number: None,
                partial_execution_targets: None,
                extra_data: None,
            }),
        ),
        (
            "patch",
            r#"{"template": "t", "merge": {"3": null}}"#,
            Command::Patch(PatchTemplate {
                template: "t".into(),
                edits: Edits { merge: Some(json!({"3": null})), set: vec![], randomize: vec![] },
            }),
        ),
        (
            "upload",
            r#"{"filename": "cat.png", "data_base64": "aGk="}"#,
            Command::Upload(Upload {
                filename: "cat.png".into(),
                data: Bytes::from_static(b"hi"),
                subfolder: String::new(),
                overwrite: false,
            }),
        ),
        (
            "upload",
            r#"{"filename": "cat.png", "data_base64": "aGk", "subfolder": "in/pets", "overwrite": true}"#,
            Command::Upload(Upload {
                filename: "cat.png".into(),
                data: Bytes::from_static(b"hi"),
                subfolder: "in/pets".into(),
                overwrite: true,
            }),
        ),
    ];
    for (name, payload, command) in cases {
        assert_eq!(command.name(), name);
        assert_eq!(ok(name, payload), Request { id: None, command }, "{name} {payload}");
    }
    let names: Vec<_> = COMMANDS.iter().map(|&name| ok_minimal(name).command.name()).collect();
    assert_eq!(names, COMMANDS);
}

fn ok_minimal(name: &str) -> Request {
    let payload = match name {
        "queue" | "patch" => r#"{"template": "t", "merge": {}}"#,
        "cancel" => r#"{"prompt_id": "p"}"#,
        "answer" => r#"{"ask_id": "a", "answer": ""}"#,
        "upload" => r#"{"filename": "f", "data_base64": ""}"#,
        _ => "",
    };
    ok(name, payload)
}

#[test]
fn queue_reads_every_field_and_keeps_set_in_request_order() {
    let request = ok(
        "queue",
        r#"{"id": "r1", "workflow": {"3": {"class_type": "KSampler", "inputs": {}}},
            "set": {"z.text": "a cat", "3.steps": 20, "Save.x.prefix": "out"}, "merge": {"3": {"inputs": {"cfg": 7}}},
            "randomize": ["3.seed"], "front": true, "number": 1.5, "partial_execution_targets": ["9"],
            "extra_data": {"k": [1]}}"#,
    );
    let expected = QueuePrompt {
        source: Source::Workflow(object(json!({"3": {"class_type": "KSampler", "inputs": {}}}))),
        edits: Edits {
            merge: Some(json!({"3": {"inputs": {"cfg": 7}}})),
            set: vec![
                ("z.text".into(), json!("a cat")),
                ("3.steps".into(), json!(20)),
                ("Save.x.prefix".into(), json!("out")),
            ],
            randomize: vec!["3.seed".into()],
        },
        front: true,
        number: Some(1.5),
        partial_execution_targets: Some(vec!["9".into()]),
        extra_data: Some(object(json!({"k": [1]}))),
    };
    assert_eq!(request, Request { id: Some("r1".into()), command: Command::Queue(expected) });
}

/// (command, payload, code, text the message must contain, whether the id `r` is echoed)
type Case = (&'static str, &'static str, Code, &'static str, bool);

#[test]
fn malformed_requests_name_their_code_and_field() {
    use Code::{InvalidJson as Json, InvalidRequest as Req, UnknownCommand as Unknown};
    let long_id = format!(r#"{{"id": "{}"}}"#, "x".repeat(MAX_ID_CHARS + 1));
    let long_name = format!(r#"{{"id": "r", "filename": "{}", "data_base64": ""}}"#, "x".repeat(256));
    let owned =
        [("status", long_id.as_str(), Req, "`id`", false), ("upload", long_name.as_str(), Req, "`filename`", true)];
    let cases: &[Case] = &[
        ("status", "{", Json, "invalid JSON", false),
        ("status", r#"{"id": "r""#, Json, "invalid JSON", false),
        ("status", "{'id': 1}", Json, "invalid JSON", false),
        ("status", "{} {}", Json, "invalid JSON", false),
        ("status", "[]", Req, "JSON object, not an array", false),
        ("status", "null", Req, "JSON object, not null", false),
        ("status", r#""status""#, Req, "JSON object, not a string", false),
        ("status", r#"{"id": 7}"#, Req, "`id` must be a string", false),
        ("status", r#"{"id": ""}"#, Req, "`id`", false),
        ("status", r#"{"id": "r", "id": "s"}"#, Req, "`id`", false),
        ("qeue", r#"{"id": "r"}"#, Unknown, "`qeue`", true),
        ("", r#"{"id": "r"}"#, Unknown, "unknown command", true),
        ("status", r#"{"id": "r", "verbose": true}"#, Req, "`verbose`", true),
        ("templates", r#"{"id": "r", "name": "t"}"#, Req, "`name`", true),
        ("clear", r#"{"id": "r", "all": true}"#, Req, "`all`", true),
        ("queue", r#"{"id": "r", "templte": "t"}"#, Req, "`templte`", true),
        ("queue", r#"{"id": "r", "template": "t", "template": "u"}"#, Req, "duplicate field `template`", true),
        ("queue", r#"{"id": "r"}"#, Req, "`workflow` or `template`", true),
        ("queue", r#"{"id": "r", "template": null}"#, Req, "`workflow` or `template`", true),
        ("queue", r#"{"id": "r", "template": "t", "workflow": {"1": {}}}"#, Req, "not both", true),
        ("queue", r#"{"id": "r", "workflow": {}}"#, Req, "`workflow` must not be empty", true),
        ("queue", r#"{"id": "r", "workflow": "{}"}"#, Req, "`workflow` must be an object, not a string", true),
        ("queue", r#"{"id": "r", "template": ""}"#, Req, "`template` must not be empty", true),
        ("queue", r#"{"id": "r", "template": 3}"#, Req, "`template` must be a string, not a number", true),
        ("queue", r#"{"id": "r", "template": "t", "front": "yes"}"#, Req, "`front` must be a boolean", true),
        ("queue", r#"{"id": "r", "template": "t", "number": "1"}"#, Req, "`number` must be a finite number", true),
        ("queue", r#"{"id": "r", "template": "t", "set": []}"#, Req, "`set` must be an object", true),
        ("queue", r#"{"id": "r", "template": "t", "set": {"seed": 1}}"#, Req, "`set` key `seed`", true),
        ("queue", r#"{"id": "r", "template": "t", "set": {".seed": 1}}"#, Req, "`set` key `.seed`", true),
        ("queue", r#"{"id": "r", "template": "t", "set": {"3.": 1}}"#, Req, "`set` key `3.`", true),
        ("queue", r#"{"id": "r", "template": "t", "set": {"3.a": 1, "3.a": 2}}"#, Req, "`3.a` twice", true),
        ("queue", r#"{"id": "r", "template": "t", "merge": [1]}"#, Req, "`merge` must be an object", true),
        ("queue", r#"{"id": "r", "template": "t", "randomize": "3.seed"}"#, Req, "`randomize` must be an array", true),
        ("queue", r#"{"id": "r", "template": "t", "randomize": [3]}"#, Req, "`randomize` must be an array", true),
        ("queue", r#"{"id": "r", "template": "t", "randomize": ["seed"]}"#, Req, "`randomize` key `seed`", true),
        (
            "queue",
            r#"{"id": "r", "template": "t", "partial_execution_targets": [9]}"#,
            Req,
            "`partial_execution_targets`",
            true,
        ),
        ("queue", r#"{"id": "r", "template": "t", "extra_data": true}"#, Req, "`extra_data` must be an object", true),
        ("patch", r#"{"id": "r", "set": {"3.seed": 1}}"#, Req, "`patch` needs `template`", true),
        ("patch", r#"{"id": "r", "template": "t"}"#, Req, "`set` or a `merge`", true),
        ("patch", r#"{"id": "r", "template": "t", "set": {}}"#, Req, "`set` or a `merge`", true),
        ("patch", r#"{"id": "r", "template": "t", "set": {"3.seed": 1}, "front": true}"#, Req, "`front`", true),
        ("patch", r#"{"id": "r", "template": "t", "randomize": ["3.seed"]}"#, Req, "`randomize`", true),
        ("interrupt", r#"{"id": "r", "prompt_id": 5}"#, Req, "`prompt_id` must be a string", true),
        ("interrupt", r#"{"id": "r", "prompt_id": ""}"#, Req, "`prompt_id` must not be empty", true),
        ("cancel", r#"{"id": "r"}"#, Req, "`cancel` needs `prompt_id`", true),
        ("cancel", r#"{"id": "r", "prompt_id": null}"#, Req, "`cancel` needs `prompt_id`", true),
        ("cancel", r#"{"id": "r", "prompt_id": ""}"#, Req, "`prompt_id` must not be empty", true),
        ("free", r#"{"id": "r", "unload_models": 1}"#, Req, "`unload_models` must be a boolean", true),
        ("free", r#"{"id": "r", "free_memory": "true"}"#, Req, "`free_memory` must be a boolean", true),
        ("free", r#"{"id": "r", "free_mem": true}"#, Req, "`free_mem`", true),
        ("upload", r#"{"id": "r", "data_base64": ""}"#, Req, "`upload` needs `filename`", true),
        ("upload", r#"{"id": "r", "filename": "a.png"}"#, Req, "`upload` needs `data_base64`", true),
        ("upload", r#"{"id": "r", "filename": "a.png", "data_base64": "a!=="}"#, Req, "`data_base64`", true),
        ("upload", r#"{"id": "r", "filename": "a.png", "data_base64": "aGk=x"}"#, Req, "`data_base64`", true),
        (
            "upload",
            r#"{"id": "r", "filename": "a.png", "data_base64": 5}"#,
            Req,
            "`data_base64` must be a string",
            true,
        ),
        ("upload", r#"{"id": "r", "filename": "../a.png", "data_base64": ""}"#, Req, "`filename` contains `/`", true),
        ("upload", r#"{"id": "r", "filename": "..", "data_base64": ""}"#, Req, "`filename` is `.` or `..`", true),
        ("upload", r#"{"id": "r", "filename": "a\\b", "data_base64": ""}"#, Req, "`filename` contains `\\`", true),
        ("upload", r#"{"id": "r", "filename": "C:x", "data_base64": ""}"#, Req, "`filename` contains `:`", true),
        (
            "upload",
            r#"{"id": "r", "filename": "a\u0000", "data_base64": ""}"#,
            Req,
            "`filename` contains a control",
            true,
        ),
        ("upload", r#"{"id": "r", "filename": " a", "data_base64": ""}"#, Req, "`filename` starts or ends", true),
        ("upload", r#"{"id": "r", "filename": "", "data_base64": ""}"#, Req, "`filename` must not be empty", true),
        (
            "upload",
            r#"{"id": "r", "filename": "a", "data_base64": "", "subfolder": "in/../x"}"#,
            Req,
            "`subfolder`",
            true,
        ),
        ("upload", r#"{"id": "r", "filename": "a", "data_base64": "", "subfolder": "/etc"}"#, Req, "`subfolder`", true),
        ("upload", r#"{"id": "r", "filename": "a", "data_base64": "", "subfolder": "a//b"}"#, Req, "`subfolder`", true),
        (
            "upload",
            r#"{"id": "r", "filename": "a", "data_base64": "", "subfolder": 1}"#,
            Req,
            "`subfolder` must be",
            true,
        ),
        (
            "upload",
            r#"{"id": "r", "filename": "a", "data_base64": "", "overwrite": "no"}"#,
            Req,
            "`overwrite` must be",
            true,
        ),
    ];
    for &(command, payload, code, needle, echoed) in cases.iter().chain(owned.iter()) {
        let Rejected { id, failure } = rejected(command, payload.as_bytes());
        assert_eq!(failure.code, code, "{command} {payload}: {failure}");
        assert!(failure.message.contains(needle), "{command} {payload}: {:?} lacks {needle:?}", failure.message);
        assert_eq!(id.as_deref(), echoed.then_some("r"), "{command} {payload}");
    }
}

#[test]
fn size_is_checked_before_anything_else() {
    let payload = br#"{"id": "r", "bad": "#;
    for command in ["status", "nope"] {
        let Rejected { id, failure } = parse(command, payload, payload.len() - 1).expect_err("too large");
        assert_eq!((id, failure.code), (None, Code::PayloadTooLarge));
        assert!(failure.message.contains(&payload.len().to_string()), "{}", failure.message);
    }
    assert_eq!(parse("status", br#"{"id": "r"}"#, 11).map(|r| r.id), Ok(Some("r".into())));
    let raw = parse_raw_upload("a.png", Bytes::from_static(b"12345"), 4).expect_err("too large");
    assert_eq!(raw.failure.code, Code::PayloadTooLarge);
}

#[test]
fn unknown_commands_list_the_known_ones() {
    let Rejected { id, failure } = rejected("queue2", br#"{"id": "r", "anything": 1}"#);
    assert_eq!((id.as_deref(), failure.code), (Some("r"), Code::UnknownCommand));
    assert_eq!(failure.details, Some(json!({"command": "queue2", "known": COMMANDS})));
    assert_eq!(rejected("nope", b"{").id, None);
    assert_eq!(rejected("nope", br#"{"id": 3}"#).id, None);
}

#[test]
fn invalid_utf8_is_invalid_json() {
    for payload in [&b"\xff"[..], b"{\"id\": \"\xff\"}", b"{\"\xc3\": 1}"] {
        assert_eq!(rejected("status", payload).failure.code, Code::InvalidJson, "{payload:?}");
    }
}

#[test]
fn deep_nesting_is_invalid_json_without_overflowing_the_stack() {
    let open = "[".repeat(10_000);
    let closed = format!("{open}{}", "]".repeat(10_000));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let payloads = [
        open.clone(),
        closed.clone(),
        objects.clone(),
        format!(r#"{{"id": "r", "workflow": {closed}}}"#),
        format!(r#"{{"id": "r", "set": {{"3.a": {objects}}}}}"#),
        format!(r#"{{"id": "r", "unknown": {closed}}}"#),
    ];
    for command in COMMANDS {
        for payload in &payloads {
            let failure = rejected(command, payload.as_bytes()).failure;
            assert_eq!(failure.code, Code::InvalidJson, "{command}: {failure}");
        }
    }
}

#[test]
fn filenames_cannot_leave_their_folder() {
    for good in ["cat.png", "a", "...", ".hidden", "é x.png", "a-b_c=2.webp"] {
        assert_eq!(check_filename(good), Ok(()), "{good}");
    }
    let long = "x".repeat(MAX_FILENAME_BYTES + 1);
    let bad = ["", ".", "..", "a/b", "/", "a\\b", "..\\x", "C:x", "a\0", "a\nb", "a\u{7f}", " a", "a ", "\ta", &long];
    for name in bad {
        assert!(check_filename(name).is_err(), "{name:?}");
    }
    assert_eq!(check_filename(&"é".repeat(MAX_FILENAME_BYTES / 2)), Ok(()));
    assert!(check_filename(&"é".repeat(MAX_FILENAME_BYTES / 2 + 1)).is_err());
}

#[test]
fn raw_uploads_take_the_unescaped_level_as_file_name() {
    for level in ["cat.png", "cat=2Epng"] {
        let request = parse_raw_upload(level, Bytes::from_static(b"\x89PNG"), MAX).expect("valid");
        let expected = Upload {
            filename: "cat.png".into(),
            data: Bytes::from_static(b"\x89PNG"),
            subfolder: String::new(),
            overwrite: false,
        };
        assert_eq!(request, Request { id: None, command: Command::Upload(expected) });
    }
    for level in ["..", "=2E=2E", "a=2Fb", "=ZZ", "=2", "=", "a=5Cb", "=FF", "=C3", "x=00"] {
        let Rejected { id, failure } = parse_raw_upload(level, Bytes::new(), MAX).expect_err(level);
        assert_eq!((id, failure.code), (None, Code::InvalidRequest), "{level}");
        assert!(failure.message.contains("file name"), "{level}: {}", failure.message);
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    // Quarters only: serde_json's default float parser may be off by one ulp on arbitrary f64s.
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1_000_000i32..1_000_000).prop_map(|q| Value::from(f64::from(q) / 4.0)),
        ".{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(".{0,6}", arb_json(), 0..4).prop_map(|m| m.into_iter().collect())
}

fn arb_target() -> impl Strategy<Value = String> {
    ".{1,6}\\.[^.]{1,6}"
}

fn arb_set() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec((arb_target(), arb_json()), 0..4).prop_map(|mut pairs| {
        let mut seen = std::collections::HashSet::new();
        pairs.retain(|(key, _)| seen.insert(key.clone()));
        pairs
    })
}

fn arb_file_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_]([A-Za-z0-9_. =-]{0,12}[A-Za-z0-9_])?"
}

fn arb_queue() -> impl Strategy<Value = QueuePrompt> {
    let source = prop_oneof![
        prop::collection::btree_map("[0-9]{1,3}", arb_json(), 1..4)
            .prop_map(|m| Source::Workflow(m.into_iter().collect())),
        ".{1,12}".prop_map(Source::Template),
    ];
    let edits =
        (option::of(arb_object().prop_map(Value::Object)), arb_set(), prop::collection::vec(arb_target(), 0..3))
            .prop_map(|(merge, set, randomize)| Edits { merge, set, randomize });
    let number = option::of((-1000i32..1000).prop_map(|q| f64::from(q) / 4.0));
    let targets = option::of(prop::collection::vec("[0-9]{1,3}", 0..3));
    (source, edits, any::<bool>(), number, targets, option::of(arb_object())).prop_map(
        |(source, edits, front, number, partial_execution_targets, extra_data)| QueuePrompt {
            source,
            edits,
            front,
            number,
            partial_execution_targets,
            extra_data,
        },
    )
}

fn arb_command() -> impl Strategy<Value = Command> {
    let patch = (".{1,12}", arb_set(), option::of(arb_object().prop_map(Value::Object))).prop_filter_map(
        "a patch needs an edit",
        |(template, set, merge)| {
            let edits = Edits { merge, set, randomize: Vec::new() };
            (!edits.is_empty()).then_some(Command::Patch(PatchTemplate { template, edits }))
        },
    );
    let upload =
        (arb_file_name(), prop::collection::vec(any::<u8>(), 0..48), prop::collection::vec(arb_file_name(), 0..3))
            .prop_flat_map(|(filename, data, folders)| {
                any::<bool>().prop_map(move |overwrite| {
                    Command::Upload(Upload {
                        filename: filename.clone(),
                        data: Bytes::from(data.clone()),
                        subfolder: folders.join("/"),
                        overwrite,
                    })
                })
            });
    prop_oneof![
        arb_queue().prop_map(Command::Queue),
        patch,
        Just(Command::Templates(ListTemplates)),
        option::of(".{1,12}").prop_map(|prompt_id| Command::Interrupt(Interrupt { prompt_id })),
        ".{1,12}".prop_map(|prompt_id| Command::Cancel(Cancel { prompt_id })),
        Just(Command::Clear(Clear)),
        Just(Command::Status(Status)),
        upload,
        (any::<bool>(), any::<bool>())
            .prop_map(|(unload_models, free_memory)| Command::Free(Free { unload_models, free_memory })),
        ("[A-Za-z0-9_-]{1,22}", ".{0,12}").prop_map(|(ask_id, answer)| Command::Answer(Answer { ask_id, answer })),
    ]
}

/// A JSON object with its keys in the given order (serde_json's `Map` would sort them).
fn object_text(fields: &[(String, Value)]) -> String {
    let entries: Vec<_> = fields.iter().map(|(key, value)| format!("{}:{value}", Value::from(key.as_str()))).collect();
    format!("{{{}}}", entries.join(","))
}

fn edits_fields(edits: &Edits, fields: &mut Vec<(String, Value)>) {
    if let Some(merge) = &edits.merge {
        fields.push(("merge".into(), merge.clone()));
    }
    // `set` keeps its order only as text; it is spliced in as a raw JSON object below.
    fields.push(("set".into(), Value::String(object_text(&edits.set))));
    if !edits.randomize.is_empty() {
        fields.push(("randomize".into(), json!(edits.randomize)));
    }
}

fn encode(request: &Request) -> String {
    let mut fields: Vec<(String, Value)> = Vec::new();
    if let Some(id) = &request.id {
        fields.push(("id".into(), json!(id)));
    }
    match &request.command {
        Command::Queue(q) => {
            match &q.source {
                Source::Workflow(workflow) => fields.push(("workflow".into(), Value::Object(workflow.clone()))),
                Source::Template(template) => fields.push(("template".into(), json!(template))),
            }
            edits_fields(&q.edits, &mut fields);
            fields.push(("front".into(), json!(q.front)));
            fields.extend(q.number.map(|n| ("number".into(), json!(n))));
            fields.extend(q.partial_execution_targets.as_ref().map(|t| ("partial_execution_targets".into(), json!(t))));
            fields.extend(q.extra_data.as_ref().map(|e| ("extra_data".into(), Value::Object(e.clone()))));
        }
        Command::Patch(PatchTemplate { template, edits }) => {
            fields.push(("template".into(), json!(template)));
            edits_fields(edits, &mut fields);
        }
        Command::Interrupt(Interrupt { prompt_id }) => {
            fields.extend(prompt_id.as_ref().map(|p| ("prompt_id".into(), json!(p))))
        }
        Command::Cancel(Cancel { prompt_id }) => fields.push(("prompt_id".into(), json!(prompt_id))),
        Command::Upload(u) => {
            fields.push(("filename".into(), json!(u.filename)));
            fields.push(("data_base64".into(), json!(general_purpose_standard(&u.data))));
            fields.push(("subfolder".into(), json!(u.subfolder)));
            fields.push(("overwrite".into(), json!(u.overwrite)));
        }
        Command::Free(Free { unload_models, free_memory }) => {
            fields.push(("unload_models".into(), json!(unload_models)));
            fields.push(("free_memory".into(), json!(free_memory)));
        }
        Command::Answer(Answer { ask_id, answer }) => {
            fields.push(("ask_id".into(), json!(ask_id)));
            fields.push(("answer".into(), json!(answer)));
        }
        Command::Templates(_) | Command::Clear(_) | Command::Status(_) => {}
    }
    let entries: Vec<_> = fields
        .iter()
        .map(|(key, value)| match (key.as_str(), value) {
            ("set", Value::String(raw)) => format!("\"set\":{raw}"),
            _ => format!("{}:{value}", Value::from(key.as_str())),
        })
        .collect();
    format!("{{{}}}", entries.join(","))
}

fn general_purpose_standard(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// `id` and every field any command takes, from [`Command::FIELDS`]: a field added to a command is fuzzed too.
fn known_fields() -> Vec<&'static str> {
    let mut known = vec!["id"];
    for field in Command::FIELDS.iter().flat_map(|(_, fields)| fields.iter()) {
        if !known.contains(field) {
            known.push(field);
        }
    }
    known
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![3 => sample::select(known_fields()).prop_map(String::from), 1 => ".{0,8}"]
}

fn command_name() -> impl Strategy<Value = String> {
    prop_oneof![3 => sample::select(COMMANDS).prop_map(String::from), 1 => ".{0,10}"]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_and_fail_with_a_parse_code(
        command in command_name(),
        payload in prop::collection::vec(any::<u8>(), 0..200),
        max in 0usize..256,
    ) {
        if let Err(Rejected { failure, .. }) = parse(&command, &payload, max) {
            let allowed = [Code::InvalidJson, Code::InvalidRequest, Code::UnknownCommand, Code::PayloadTooLarge];
            prop_assert!(allowed.contains(&failure.code), "{}", failure);
        }
    }

    #[test]
    fn valid_json_is_never_invalid_json(
        command in sample::select(COMMANDS),
        fields in prop::collection::vec((field_name(), arb_json()), 0..6),
        top in arb_json(),
        as_object in any::<bool>(),
    ) {
        let payload = if as_object { object_text(&fields) } else { top.to_string() };
        if let Err(Rejected { failure, .. }) = parse(command, payload.as_bytes(), MAX) {
            prop_assert_eq!(failure.code, Code::InvalidRequest, "{}", failure);
        }
    }

    #[test]
    fn valid_requests_round_trip(id in option::of(".{1,20}"), command in arb_command()) {
        let request = Request { id, command };
        let payload = encode(&request);
        prop_assert_eq!(parse(request.command.name(), payload.as_bytes(), MAX), Ok(request), "{}", payload);
    }

    #[test]
    fn raw_upload_levels_never_panic_and_accepted_names_are_safe(level in ".{0,12}") {
        if let Ok(Request { command: Command::Upload(upload), .. }) = parse_raw_upload(&level, Bytes::new(), MAX) {
            prop_assert_eq!(check_filename(&upload.filename), Ok(()));
            prop_assert!(!upload.filename.contains(['/', '\\']) && upload.filename != "..");
        }
    }
}

#[test]
fn paths_name_their_command_and_oversized_payloads_are_refused_by_their_size() {
    assert_eq!(command_of("status"), "status");
    assert_eq!(command_of("upload/cat=2Epng"), "upload");
    assert_eq!(command_of("st=61tus/x"), "status");
    let raw = parse_path("upload/cat=2Epng", Bytes::from_static(b"png"), 3, MAX).expect("raw upload");
    assert!(matches!(raw.command, Command::Upload(Upload { ref filename, .. }) if filename == "cat.png"));
    let status = parse_path("status", Bytes::from_static(br#"{"id":"s"}"#), 10, MAX).expect("status");
    assert_eq!((status.id.as_deref(), status.command), (Some("s"), Command::Status(Status)));
    let dropped = parse_path("status", Bytes::new(), MAX + 1, MAX).expect_err("too large");
    assert_eq!(dropped.failure.code, Code::PayloadTooLarge);
    assert_eq!(dropped.failure.details.as_ref().map(|d| d["bytes"].clone()), Some(json!(MAX + 1)));
}
