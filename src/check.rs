//! `comfy-bridge check`: the effective configuration, the templates and the topic map, for a human to read.

use std::fmt::Write as _;

use crate::bus::topics::{self, Route};
use crate::config::Settings;
use crate::workflow::template::Templates;

/// What `check` found: the report to print, and whether anything is wrong (a template that cannot be used).
pub struct Checked {
    /// Configuration (secrets redacted), templates, then every topic and subject pattern.
    pub report: String,
    /// Problems found; `check` exits non-zero when there is any.
    pub problems: usize,
}

/// Checks what configuration loading cannot: the templates. (Everything else `run` would refuse, bus URLs and
/// command names among it, is refused by [`Settings::load`] before this runs.)
pub fn check(settings: &Settings) -> Checked {
    let mut out = String::from("# effective configuration\n");
    out.push_str(&settings.to_redacted_toml());
    let mut problems = 0;
    if settings.commands.enabled {
        let templates = Templates::load(&settings.commands.templates_dir, &settings.state.dir);
        let _ = writeln!(out, "\n# templates in {}", settings.commands.templates_dir.display());
        if templates.dir_missing() {
            problems += 1;
            let _ = writeln!(out, "ERROR  {}", missing_templates_dir(settings));
        }
        for t in templates.describe()["templates"].as_array().into_iter().flatten() {
            let nodes = t["nodes"].as_array().map_or(0, Vec::len);
            let patched = if t["patched"] == true { " (patched copy in state.dir)" } else { "" };
            let _ = writeln!(out, "ok     {} ({nodes} nodes){patched}", t["name"].as_str().unwrap_or_default());
        }
        for (file, error) in templates.errors() {
            problems += 1;
            let _ = writeln!(out, "ERROR  {file}: {error}");
        }
    }
    if settings.commands.enabled {
        out.push_str(&limits(settings));
    }
    out.push_str(&report(settings));
    Checked { report: out, problems }
}

/// What `run` warns and `check` fails with when `commands.templates_dir` does not exist.
pub fn missing_templates_dir(settings: &Settings) -> String {
    let dir = &settings.commands.templates_dir;
    let cwd = std::env::current_dir().map(|d| format!(" (relative to {})", d.display())).unwrap_or_default();
    let relative = if dir.is_relative() { cwd } else { String::new() };
    format!("commands.templates_dir `{}`{relative} does not exist: no template can be queued", dir.display())
}

/// What size of request is answered how, on each bus.
fn limits(settings: &Settings) -> String {
    let (c, m) = (&settings.commands, &settings.mqtt);
    let mut out = String::from("\n# request limits\n");
    let _ = writeln!(
        out,
        "requests up to {} bytes are taken (commands.max_payload_bytes); larger ones are answered payload_too_large",
        c.max_payload_bytes
    );
    if m.enabled {
        let room = m.max_packet_bytes.saturating_sub(c.max_payload_bytes);
        let _ = writeln!(
            out,
            "mqtt: packets up to {} bytes (mqtt.max_packet_bytes) leave {room} bytes for topic and properties \
             (at least {} needed); a request packet above it cannot be answered: v5 brokers drop it, \
             v3.1.1 brokers deliver it and the bridge reconnects",
            m.max_packet_bytes,
            crate::config::REQUEST_OVERHEAD_BYTES
        );
    }
    if settings.nats.enabled {
        let _ = writeln!(out, "nats: a request above the server's max_payload is refused by the server");
    }
    let _ = writeln!(
        out,
        "at most {} requests and {} payload bytes wait (commands.max_waiting_requests, commands.max_waiting_bytes); \
         more are answered busy, and one that waited over {} ms (comfyui.request_timeout_ms) comfyui_unavailable",
        c.max_waiting_requests, c.max_waiting_bytes, settings.comfyui.request_timeout_ms
    );
    out
}

/// The topic map.
fn report(settings: &Settings) -> String {
    let mut out = String::new();
    out.push_str("\n# topic map (MQTT topic | NATS subject)\n");
    let inst = &settings.bridge.instance;
    let rows: [(&str, Route); 13] = [
        ("bridge availability (retained)", Route::fixed(inst, &[topics::BRIDGE, topics::AVAILABILITY])),
        ("comfyui availability (retained)", Route::fixed(inst, &[topics::COMFYUI, topics::AVAILABILITY])),
        ("queue status (retained)", Route::fixed(inst, &[topics::STATUS])),
        ("node event", Route::fixed(inst, &[topics::PROMPT, "<pid>", topics::NODE, "<nid>", "<type>"])),
        ("prompt event", Route::fixed(inst, &[topics::PROMPT, "<pid>", "<type>"])),
        ("other event", Route::fixed(inst, &[topics::EVENT, "<type>"])),
        ("preview image", Route::fixed(inst, &[topics::PROMPT, "<pid>", topics::NODE, "<nid>", topics::PREVIEW])),
        ("progress text", Route::fixed(inst, &[topics::PROMPT, "<pid>", topics::NODE, "<nid>", topics::TEXT])),
        ("latest preview", Route::fixed(inst, &[topics::PREVIEW])),
        ("prompt state", Route::fixed(inst, &[topics::PROMPT, "<pid>", topics::STATE])),
        ("prompt result", Route::fixed(inst, &[topics::PROMPT, "<pid>", topics::RESULT])),
        ("requests", Route::fixed(inst, &[topics::REQUEST, "<command>"])),
        ("responses (no reply topic)", Route::fixed(inst, &[topics::RESPONSE, "<command>"])),
    ];
    for (what, route) in rows {
        let mqtt = if settings.mqtt.enabled { route.mqtt_topic(&settings.mqtt.base_topic) } else { "-".into() };
        let nats = if settings.nats.enabled { route.nats_subject(&settings.nats.subject_prefix) } else { "-".into() };
        let _ = writeln!(out, "{what:<32} {mqtt} | {nats}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_templates_are_reported_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/templates/txt2img.json");
        std::fs::copy(example, dir.path().join("txt2img.json")).expect("copy");
        let mut settings = Settings::default();
        settings.commands.templates_dir = dir.path().to_path_buf();
        settings.state.dir = dir.path().join("state");
        let good = check(&settings);
        assert_eq!(good.problems, 0, "{}", good.report);
        assert!(good.report.contains("ok     txt2img (7 nodes)"), "{}", good.report);
        assert!(good.report.contains("comfyui/local/prompt/<pid>/result | comfyui.local.prompt.<pid>.result"));
        assert!(good.report.contains("requests up to 8388608 bytes are taken"), "{}", good.report);
        assert!(good.report.contains("packets up to 16777216 bytes (mqtt.max_packet_bytes) leave 8388608 bytes"));

        std::fs::write(dir.path().join("broken.json"), "[1, 2").expect("write");
        let bad = check(&settings);
        assert_eq!(bad.problems, 1);
        assert!(bad.report.contains("ERROR  broken.json: invalid JSON"), "{}", bad.report);
    }

    #[test]
    fn a_missing_templates_dir_is_a_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = Settings::default();
        settings.commands.templates_dir = dir.path().join("nope");
        settings.state.dir = dir.path().join("state");
        let checked = check(&settings);
        assert_eq!(checked.problems, 1, "{}", checked.report);
        assert!(checked.report.contains("nope` does not exist: no template can be queued"), "{}", checked.report);
        settings.commands.enabled = false;
        assert_eq!(check(&settings).problems, 0, "no commands, no templates needed");
    }
}
