//! `comfy-bridge check`: the effective configuration and the topic map, for a human to read.

use std::fmt::Write as _;

use crate::bus::topics::{self, Route};
use crate::config::Settings;

/// The report `check` prints: configuration (secrets redacted), then every topic and subject pattern.
pub fn report(settings: &Settings) -> String {
    let mut out = String::from("# effective configuration\n");
    out.push_str(&settings.to_redacted_toml());
    out.push_str("\n# topic map (MQTT topic | NATS subject)\n");
    let inst = &settings.bridge.instance;
    let rows: [(&str, Route); 10] = [
        ("bridge availability (retained)", Route::fixed(inst, &[topics::BRIDGE, topics::AVAILABILITY])),
        ("comfyui availability (retained)", Route::fixed(inst, &[topics::COMFYUI, topics::AVAILABILITY])),
        ("queue status (retained)", Route::fixed(inst, &[topics::STATUS])),
        ("node event", Route::fixed(inst, &[topics::PROMPT, "<pid>", topics::NODE, "<nid>", "<type>"])),
        ("prompt event", Route::fixed(inst, &[topics::PROMPT, "<pid>", "<type>"])),
        ("other event", Route::fixed(inst, &[topics::EVENT, "<type>"])),
        ("preview image", Route::fixed(inst, &[topics::PROMPT, "<pid>", topics::NODE, "<nid>", topics::PREVIEW])),
        ("progress text", Route::fixed(inst, &[topics::PROMPT, "<pid>", topics::NODE, "<nid>", topics::TEXT])),
        ("latest preview", Route::fixed(inst, &[topics::PREVIEW])),
        ("requests", Route::fixed(inst, &["request", "<command>"])),
    ];
    for (what, route) in rows {
        let mqtt = if settings.mqtt.enabled { route.mqtt_topic(&settings.mqtt.base_topic) } else { "-".into() };
        let nats = if settings.nats.enabled { route.nats_subject(&settings.nats.subject_prefix) } else { "-".into() };
        let _ = writeln!(out, "{what:<32} {mqtt} | {nats}");
    }
    out
}
