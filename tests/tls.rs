//! TLS to both brokers with a private CA and client certificates: the bridge connects, publishes and answers,
//! and a broker that requires a client certificate refuses a bridge without one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use comfy_bridge::config::Settings;
use common::daemon::{settings, simulator, Daemon, SUCCESS};
use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// A private CA, a server certificate for 127.0.0.1 and a client certificate, made with `openssl`.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(&[
            &["req", "-x509"],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca"],
        ]
        .concat());
        std::fs::write(dir.path().join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("ext");
        std::fs::write(dir.path().join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
        for (name, cn) in [("server", "localhost"), ("client", "comfy-bridge")] {
            let subj = format!("/CN={cn}");
            run(&[
                &["req"],
                &ec[..],
                &["-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"), "-subj", &subj],
            ]
            .concat());
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// A mosquitto whose only listener is TLS with the test CA, and requires a client certificate.
fn mosquitto_requiring_client_certificates(pki: &Pki) -> Mosquitto {
    let options = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true",
        pki.file("ca.pem"),
        pki.file("server.pem"),
        pki.file("server.key")
    );
    Mosquitto::start_with(&options)
}

fn tls_settings(settings: &mut Settings, pki: &Pki, client_cert: bool) {
    settings.mqtt.ca_file = Some(pki.file("ca.pem"));
    settings.nats.ca_file = Some(pki.file("ca.pem"));
    if client_cert {
        settings.mqtt.client_cert_file = Some(pki.file("client.pem"));
        settings.mqtt.client_key_file = Some(pki.file("client.key"));
        settings.nats.client_cert_file = Some(pki.file("client.pem"));
        settings.nats.client_key_file = Some(pki.file("client.key"));
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Both brokers require TLS with a client certificate signed by the private CA: events flow on both.
#[tokio::test]
async fn events_flow_over_mutual_tls_to_mosquitto_and_nats() {
    let pki = Pki::new();
    let broker = mosquitto_requiring_client_certificates(&pki);
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("server.pem"), pki.path("server.key"));
    let nats = NatsServer::start_with(&[
        "--tlsverify",
        "--tlscert",
        path_str(&cert),
        "--tlskey",
        path_str(&key),
        "--tlscacert",
        path_str(&ca),
    ]);
    let sim = simulator(SUCCESS, 0.0).await;
    let (mut s, state) = settings(&sim, Some(&broker), Some(&nats));
    s.mqtt.url = format!("mqtts://127.0.0.1:{}", broker.port);
    s.nats.url = format!("tls://127.0.0.1:{}", nats.port);
    tls_settings(&mut s, &pki, true);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    s.http.listen = Some(format!("127.0.0.1:{port}"));
    let daemon = Daemon::start(s, state);

    // Subscribers with TLS of their own would need more plumbing; readiness says both connections are up,
    // and the broker logs show TLS clients. Then a prompt's events must be published and confirmed.
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = reqwest::get(&ready).await.ok();
        if answer.as_ref().is_some_and(|a| a.status() == 200) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not ready over TLS: {:?}", answer.map(|a| a.status()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before =
        comfy_bridge::telemetry::COUNTERS.published.each_ref().map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
    sim.play("a_success").await.expect("plays");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = comfy_bridge::telemetry::COUNTERS
            .published
            .each_ref()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
        if now[0] > before[0] + 10 && now[1] > before[1] + 10 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "published over TLS: before {before:?}, now {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Requests come in on a TLS connection of the request intake's own, with the client certificate.
    let client = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.clone())
        .add_client_certificate(pki.path("client.pem"), pki.path("client.key"))
        .connect(format!("tls://127.0.0.1:{}", nats.port))
        .await
        .expect("test client over TLS");
    let answer = requester::nats_request_until_subscribed(&client, "comfyui.local.request.status", "{}").await;
    assert_eq!(answer["status"], "ok", "{answer}");
    daemon.stop().await;
}

/// Without a client certificate, a broker that requires one never accepts the bridge; it keeps retrying and
/// says so on `/readyz`, and it still shuts down cleanly.
#[tokio::test]
async fn a_broker_requiring_a_client_certificate_refuses_a_bridge_without_one() {
    let pki = Pki::new();
    let broker = mosquitto_requiring_client_certificates(&pki);
    let sim = simulator(SUCCESS, 0.0).await;
    let (mut s, state) = settings(&sim, Some(&broker), None);
    s.mqtt.url = format!("mqtts://127.0.0.1:{}", broker.port);
    tls_settings(&mut s, &pki, false);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    s.http.listen = Some(format!("127.0.0.1:{port}"));
    let daemon = Daemon::start(s, state);
    sim.wait_for_client(WAIT).await.expect("comfyui side still connects");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let body =
        reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.expect("readyz").text().await.expect("body");
    assert!(body.contains(r#""mqtt":"disconnected""#), "{body}");
    daemon.stop().await;
}
