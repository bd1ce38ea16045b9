//! `comfy-bridge check` with the fleet enabled: it fails clearly without NATS, and without JetStream on a
//! real server that has none; it passes against a server with `-js`.

mod common;

use std::process::{Command, Output};

use common::{NatsServer, PlainNatsServer};

fn check(dir: &std::path::Path, nats: &str) -> Output {
    let templates = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/templates");
    let toml = format!(
        "[nats]\nurl = \"{nats}\"\n[mqtt]\nenabled = false\n[commands]\ntemplates_dir = \"{templates}\"\n[fleet]\nenabled = true\n"
    );
    std::fs::write(dir.join("c.toml"), toml).expect("write config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfy-bridge"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("COMFY_BRIDGE") {
            cmd.env_remove(name);
        }
    }
    cmd.current_dir(dir).env("NO_COLOR", "1").args(["check", "-c", "c.toml"]).output().expect("check runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn check_fails_without_jetstream_and_passes_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = PlainNatsServer::start();
    let without = check(dir.path(), &plain.url());
    assert!(!without.status.success(), "{}", text(&without));
    assert!(text(&without).contains("ERROR  fleet.enabled needs JetStream"), "{}", text(&without));

    let js = NatsServer::start();
    let with = check(dir.path(), &js.url());
    assert!(with.status.success(), "{}", text(&with));
    assert!(text(&with).contains("ok     JetStream answers"), "{}", text(&with));
    assert!(text(&with).contains("submit on comfyui.fleet.default.queue"), "{}", text(&with));

    std::fs::write(dir.path().join("c.toml"), "[nats]\nenabled = false\n[fleet]\nenabled = true\n").expect("write");
    let no_nats = Command::new(env!("CARGO_BIN_EXE_comfy-bridge"))
        .current_dir(dir.path())
        .args(["check", "-c", "c.toml"])
        .output()
        .expect("check runs");
    assert!(!no_nats.status.success());
    assert!(
        text(&no_nats).contains("invalid value for `fleet.enabled`: the fleet runs on NATS JetStream"),
        "{}",
        text(&no_nats)
    );
}
