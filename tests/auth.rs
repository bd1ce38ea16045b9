//! Broker authentication: MQTT user/password, NATS token and nkey. A wrong secret keeps the bus down (and says
//! so on `/readyz`); the right one brings it up.

mod common;

use std::process::Command;
use std::time::Duration;

use comfy_bridge::config::{Secret, Settings};
use common::daemon::{settings, simulator, Daemon, SUCCESS};
use common::*;

const WAIT: Duration = Duration::from_secs(10);

fn secret(value: &str) -> Option<Secret> {
    serde_json::from_value(serde_json::Value::from(value)).ok()
}

/// Starts a bridge with `settings` and returns what `/readyz` says of `part` once it is `want` (or after
/// `WAIT`).
async fn readiness(s: Settings, state: tempfile::TempDir, part: &str, want: &str) -> String {
    let (body, daemon) = start(s, state, part, want).await;
    daemon.stop().await;
    body
}

/// [`readiness`], leaving the bridge running.
async fn start(mut s: Settings, state: tempfile::TempDir, part: &str, want: &str) -> (String, Daemon) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    s.http.listen = Some(format!("127.0.0.1:{port}"));
    let daemon = Daemon::start(s, state);
    if want == "disconnected" {
        // Down at first anyway: it must still be down once a good connection would long be up.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut body = String::new();
    while tokio::time::Instant::now() < deadline {
        if let Ok(answer) = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
            body = answer.text().await.unwrap_or_default();
            if body.contains(&format!(r#""{part}":"{want}""#)) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (body, daemon)
}

#[tokio::test]
async fn mqtt_user_and_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let passwords = dir.path().join("passwords");
    let status = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwords)
        .args(["bridge", "s3cret"])
        .status()
        .expect("mosquitto_passwd runs");
    assert!(status.success());
    let broker = Mosquitto::start_with(&format!("password_file {}\nallow_anonymous false", passwords.display()));
    let sim = simulator(SUCCESS, 0.0).await;
    for (password, want) in [("wrong", "disconnected"), ("s3cret", "connected")] {
        let (mut s, state) = settings(&sim, Some(&broker), None);
        s.mqtt.username = Some("bridge".into());
        s.mqtt.password = secret(password);
        let body = readiness(s, state, "mqtt", want).await;
        assert!(body.contains(&format!(r#""mqtt":"{want}""#)), "password {password}: {body}");
    }
}

#[tokio::test]
async fn nats_token_and_nkey() {
    let sim = simulator(SUCCESS, 0.0).await;
    let token_server = NatsServer::start_with(&["--auth", "t0ken"]);
    for (token, want) in [("wrong", "disconnected"), ("t0ken", "connected")] {
        let (mut s, state) = settings(&sim, None, Some(&token_server));
        s.nats.token = secret(token);
        let (body, daemon) = start(s, state, "nats", want).await;
        assert!(body.contains(&format!(r#""nats":"{want}""#)), "token {token}: {body}");
        if want == "connected" {
            // The request intake's connection logs in the same way.
            status_answered(&token_server, async_nats::ConnectOptions::with_token("t0ken".into())).await;
        }
        daemon.stop().await;
    }

    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("nkey.conf");
    std::fs::write(&conf, format!("authorization {{ users = [ {{ nkey: {} }} ] }}\n", user.public_key()))
        .expect("conf");
    let nkey_server = NatsServer::start_with(&["-c", conf.to_str().expect("utf-8")]);
    let (mut s, state) = settings(&sim, None, Some(&nkey_server));
    let seed = user.seed().expect("seed");
    s.nats.nkey_seed = secret(&seed);
    let (body, daemon) = start(s, state, "nats", "connected").await;
    assert!(body.contains(r#""nats":"connected""#), "nkey: {body}");
    status_answered(&nkey_server, async_nats::ConnectOptions::with_nkey(seed)).await;
    daemon.stop().await;
}

/// A `status` request sent over NATS by a client connected with `options` is answered.
async fn status_answered(server: &NatsServer, options: async_nats::ConnectOptions) {
    let client = options.connect(server.url()).await.expect("nats connect");
    let answer = requester::nats_request_until_subscribed(&client, "comfyui.local.request.status", "{}").await;
    assert_eq!(answer["status"], "ok", "{answer}");
}
