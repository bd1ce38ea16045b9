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
    if settings.fleet.enabled {
        let (text, fleet_problems) = fleet(settings, jetstream_probe(settings));
        out.push_str(&text);
        problems += fleet_problems;
    }
    out.push_str(&report(settings));
    Checked { report: out, problems }
}

/// What asking the NATS server about JetStream found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JetStream {
    /// JetStream answered.
    Enabled,
    /// The server answered that this account has no JetStream.
    Disabled(String),
    /// The server could not be reached: cannot tell.
    Unknown(String),
}

/// The fleet's names, and whether JetStream is there (`run` needs it; `check` fails without it).
fn fleet(settings: &Settings, jetstream: JetStream) -> (String, usize) {
    let n = crate::fleet::Names::new(&crate::fleet::Config::from(settings));
    let mut out = format!("\n# fleet {}\n", settings.fleet.name);
    let _ = writeln!(out, "submit on {} (stream {}, consumer {})", n.queue_subject, n.stream, n.consumer);
    let _ = writeln!(out, "job records in bucket {}, heartbeats in {}", n.jobs_bucket, n.bridges_bucket);
    let _ = writeln!(
        out,
        "job state and result on {} and {}",
        n.job_subject("<id>", "state"),
        n.job_subject("<id>", "result")
    );
    let _ = writeln!(out, "fleet requests on {}.request.<command> (status, cancel)", n.fleet_subject);
    let problems = match jetstream {
        JetStream::Enabled => {
            let _ = writeln!(out, "ok     JetStream answers on {}", settings.nats.url);
            0
        }
        JetStream::Disabled(why) => {
            let _ = writeln!(
                out,
                "ERROR  fleet.enabled needs JetStream, and the NATS server at {} has none for this account: {why} \
                 (start nats-server with -js, or enable JetStream for the account)",
                settings.nats.url
            );
            1
        }
        JetStream::Unknown(why) => {
            let _ = writeln!(out, "WARN   cannot tell whether JetStream is enabled: NATS not reachable ({why})");
            0
        }
    };
    (out, problems)
}

/// Asks the NATS server for this account's JetStream info, within 3 seconds, on a thread of its own (so it
/// works whether or not the caller runs inside an async runtime).
pub fn jetstream_probe(settings: &Settings) -> JetStream {
    let settings = settings.clone();
    let probe = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let Ok(runtime) = runtime else { return JetStream::Unknown("no runtime".into()) };
        runtime.block_on(async {
            let ask = async {
                let (tx, _) = tokio::sync::mpsc::channel(1);
                let client = crate::bus::nats::connect(&settings.nats, &settings.bridge.instance, tx)
                    .await
                    .map_err(|e| JetStream::Unknown(e.to_string()))?;
                // `$JS.API.INFO` is answered by JetStream only: an error object, or no responder at all,
                // means this account has none.
                match client.request("$JS.API.INFO", bytes::Bytes::new()).await {
                    Ok(reply) => {
                        let info: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
                        match info.get("error") {
                            Some(error) => {
                                Err(JetStream::Disabled(error["description"].as_str().unwrap_or("error").into()))
                            }
                            None => Ok(JetStream::Enabled),
                        }
                    }
                    Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                        Err(JetStream::Disabled("no JetStream API answers".into()))
                    }
                    Err(e) => Err(JetStream::Unknown(e.to_string())),
                }
            };
            match tokio::time::timeout(std::time::Duration::from_secs(3), ask).await {
                Ok(Ok(found) | Err(found)) => found,
                Err(_) => JetStream::Unknown("no answer within 3 s".into()),
            }
        })
    });
    probe.join().unwrap_or_else(|_| JetStream::Unknown("the probe failed".into()))
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
    fn the_fleet_section_names_everything_and_fails_without_jetstream() {
        let mut settings = Settings::default();
        settings.fleet.enabled = true;
        let (ok, problems) = fleet(&settings, JetStream::Enabled);
        assert_eq!(problems, 0, "{ok}");
        assert!(ok.contains("submit on comfyui.fleet.default.queue (stream COMFY_FLEET_DEFAULT"), "{ok}");
        assert!(ok.contains("bucket COMFY_FLEET_DEFAULT_JOBS"), "{ok}");
        let (bad, problems) = fleet(&settings, JetStream::Disabled("jetstream not enabled".into()));
        assert_eq!(problems, 1);
        assert!(bad.contains("ERROR  fleet.enabled needs JetStream"), "{bad}");
        let (unknown, problems) = fleet(&settings, JetStream::Unknown("refused".into()));
        assert_eq!(problems, 0, "an unreachable server is not proof of anything");
        assert!(unknown.contains("WARN   cannot tell whether JetStream is enabled"), "{unknown}");
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
