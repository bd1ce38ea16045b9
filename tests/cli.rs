//! The built binary as a newcomer meets it: `check` refuses what `run` would refuse and names the variable or
//! key, `run` warns about a missing templates directory, and `simulate` works from any directory.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn bridge(cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfy-bridge"));
    cmd.current_dir(cwd).env("RUST_BACKTRACE", "0").env("NO_COLOR", "1");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("COMFY_BRIDGE") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// `check` with the configuration file `toml` and extra environment.
fn check(dir: &Path, toml: &str, env: &[(&str, &str)]) -> Output {
    std::fs::write(dir.join("c.toml"), toml).expect("write config");
    bridge(dir).args(["check", "--config", "c.toml"]).envs(env.iter().copied()).output().expect("check runs")
}

#[test]
fn check_refuses_what_run_would_refuse_and_names_the_key_or_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let templates = dir.path().join("templates");
    std::fs::create_dir(&templates).expect("mkdir");
    let good = format!("[commands]\ntemplates_dir = {:?}\n", templates.display().to_string());
    let ok = check(dir.path(), &good, &[]);
    assert!(ok.status.success(), "{}", text(&ok));

    for (toml, env, says) in [
        ("[mqtt]\nurl = \"http://broker:1883\"\n", ("", ""), "invalid value for `mqtt.url`"),
        ("[nats]\nurl = \"127.0.0.1:4222x\"\n", ("", ""), "invalid value for `nats.url`"),
        ("allow = [\"sttus\"]\n", ("", ""), "no command named `sttus`"),
        ("", ("COMFY_BRIDGE__MQTT__URLL", "mqtt://x"), "COMFY_BRIDGE__MQTT__URLL: no setting `mqtt.urll`"),
        ("", ("COMFY_BRIDGE__NATS__URL", "127.0.0.1:4222x"), "COMFY_BRIDGE__NATS__URL: invalid value for `nats.url`"),
    ] {
        let env: &[(&str, &str)] = if env.0.is_empty() { &[] } else { &[env] };
        let out = check(dir.path(), &format!("{good}{toml}"), env);
        assert!(!out.status.success() && text(&out).contains(says), "{toml} {env:?}:\n{}", text(&out));
    }

    // The default templates directory is relative to where the bridge runs: missing here is an error.
    let out = check(dir.path(), "", &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("commands.templates_dir `examples/templates`"), "{}", text(&out));
}

#[test]
fn run_warns_when_the_templates_dir_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = bridge(dir.path())
        .arg("run")
        .env("COMFY_BRIDGE__COMFYUI__URL", "http://127.0.0.1:9")
        .env("COMFY_BRIDGE__MQTT__ENABLED", "false")
        .env("COMFY_BRIDGE__NATS__ENABLED", "false")
        .env("COMFY_BRIDGE__HTTP__LISTEN", "")
        .env("COMFY_BRIDGE__STATE__DIR", dir.path().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bridge starts");
    let stderr = child.stderr.take().expect("stderr");
    let first = BufReader::new(stderr).lines().map_while(Result::ok).next().unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.contains("WARN") && first.contains("`examples/templates`"), "{first}");
    assert!(first.contains("does not exist: no template can be queued"), "{first}");
}

#[test]
fn simulate_serves_its_built_in_sessions_from_any_directory_and_names_a_taken_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = bridge(dir.path()).args(["simulate", "--listen", &addr]).output().expect("simulate runs");
    assert!(!out.status.success());
    assert!(text(&out).contains(&format!("cannot listen on {addr} (choose another address with --listen)")));
    drop(taken);

    let mut child = bridge(dir.path())
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("simulator starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let listening = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening.contains("ComfyUI simulator listening"), "{listening}");
    assert!(listening.contains("a_success") && listening.contains("f_three_prompts"), "{listening}");
}

#[test]
fn tap_install_writes_the_extension_into_custom_nodes_and_refuses_a_directory_that_is_not_comfyuis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bridge(dir.path()).args(["tap", "install", "."]).output().expect("tap install runs");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("has no custom_nodes/ directory"), "{}", text(&out));
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0, "nothing written");

    let comfyui = dir.path().join("ComfyUI");
    std::fs::create_dir_all(comfyui.join("custom_nodes")).expect("mkdir");
    let out = bridge(dir.path()).args(["tap", "install"]).arg(&comfyui).output().expect("tap install runs");
    assert!(out.status.success(), "{}", text(&out));
    let installed = comfyui.join("custom_nodes").join("comfy_bridge_tap");
    // Every file of the extension in this repository, byte for byte, and nothing else.
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("extension").join("comfy_bridge_tap");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&source).expect("extension dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "py") {
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            let written = std::fs::read(installed.join(&name)).unwrap_or_else(|e| panic!("{name} not written: {e}"));
            assert_eq!(written, std::fs::read(&path).expect("source"), "{name}");
            assert!(text(&out).contains(&format!("wrote {}", installed.join(&name).display())), "{}", text(&out));
            names.push(name);
        }
    }
    assert!(names.contains(&"__init__.py".to_string()), "{names:?}");
    assert_eq!(std::fs::read_dir(&installed).expect("installed").count(), names.len(), "no stray files");
    assert!(text(&out).contains("restart ComfyUI"), "{}", text(&out));

    // Installing again (an upgrade) overwrites in place.
    std::fs::write(installed.join("version.py"), "stale").expect("write");
    let again = bridge(dir.path()).args(["tap", "install"]).arg(&comfyui).output().expect("tap install runs");
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(
        std::fs::read(installed.join("version.py")).expect("read"),
        std::fs::read(source.join("version.py")).expect("read")
    );
}
