//! End-to-end tests of the simulator over real sockets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::frames::parse_type4;
use super::transcript;
use super::{SimOptions, Simulator};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/transcripts")
}

async fn start(speed: f64) -> Simulator {
    let opts = SimOptions { transcripts: vec![fixtures()], speed, autoplay: false };
    Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("start")
}

async fn recv(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        if msg.is_text() || msg.is_binary() {
            return msg;
        }
    }
}

async fn recv_json(ws: &mut Ws) -> Value {
    match recv(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).expect("json"),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Connect, negotiate feature flags, check the two hello frames.
async fn connect(sim: &Simulator, id: &str) -> Ws {
    let url = format!("ws://{}/ws?clientId={id}", sim.addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    let hello = recv_json(&mut ws).await;
    assert_eq!(hello["type"], "status");
    assert_eq!(hello["data"]["sid"], id);
    let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}});
    ws.send(Message::text(flags.to_string())).await.expect("send");
    let answer = recv_json(&mut ws).await;
    assert_eq!(answer["type"], "feature_flags");
    assert_eq!(answer["data"]["supports_preview_metadata"], true);
    assert_eq!(answer["data"]["max_upload_size"], 104_857_600);
    ws
}

/// Minimal HTTP/1.1 client: returns (status, body as JSON or Null).
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.expect("tcp");
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text[9..12].parse().expect("status");
    let (_, body) = text.split_once("\r\n\r\n").expect("head");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Collect frames until `executing` with `node: null` for `id`.
async fn until_done(ws: &mut Ws, id: &str) -> Vec<Message> {
    let mut out = Vec::new();
    loop {
        let msg = recv(ws).await;
        let done = match &msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == id
            }
            _ => false,
        };
        out.push(msg);
        if done {
            return out;
        }
    }
}

fn frame_types(frames: &[Message]) -> Vec<String> {
    frames
        .iter()
        .map(|m| match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                v["type"].as_str().unwrap_or("").to_string()
            }
            Message::Binary(b) => format!("binary{}", b.get(3).copied().unwrap_or(0)),
            _ => String::new(),
        })
        .collect()
}

#[tokio::test]
async fn loads_fixture_scenarios() {
    let sim = start(0.0).await;
    let names = sim.scenarios();
    assert!(names.contains(&"a_success".to_string()));
    assert!(names.contains(&"o_foreign_prompt".to_string()));
}

#[tokio::test]
async fn play_substitutes_prompt_ids_in_text_and_binary() {
    let sim = start(0.0).await;
    let mut ws = connect(&sim, "abc").await;
    assert_eq!(sim.connected_clients(), vec!["abc".to_string()]);
    let text = std::fs::read_to_string(fixtures().join("a_success.jsonl")).expect("fixture");
    let sc = transcript::parse_scenario("a_success", &text);
    let old = sc.prompt_ids[0].clone();
    let new_id = sim.play("a_success").await.expect("play");
    assert_ne!(new_id, old);
    let frames = until_done(&mut ws, &new_id).await;
    assert_eq!(frames.len(), sc.frames.len());
    let types = frame_types(&frames);
    assert_eq!(&types[..3], &["status", "status", "execution_start"]);
    assert!(types.contains(&"binary4".to_string()));
    for m in &frames {
        match m {
            Message::Text(t) => assert!(!t.as_str().contains(&old)),
            Message::Binary(b) => {
                let (meta, _) = parse_type4(b).expect("type 4 preview");
                assert_eq!(meta["prompt_id"], new_id.as_str());
            }
            _ => {}
        }
    }
    assert!(sim.play("nope").await.is_err());
}

#[tokio::test]
async fn posted_prompt_goes_to_submitter_only() {
    let sim = start(0.0).await;
    let mut a = connect(&sim, "client-a").await;
    let mut b = connect(&sim, "client-b").await;
    let body = json!({"prompt": {"1": {"class_type": "X", "inputs": {}}}, "client_id": "client-a"});
    let (status, resp) = http(sim.addr(), "POST", "/api/prompt", Some(&body.to_string())).await;
    assert_eq!(status, 200);
    let id = resp["prompt_id"].as_str().expect("prompt_id").to_string();
    let frames = until_done(&mut a, &id).await;
    let types = frame_types(&frames);
    assert!(types.contains(&"execution_start".to_string()));
    assert!(types.contains(&"executed".to_string()));
    assert!(types.contains(&"execution_success".to_string()));
    // B sees only status broadcasts.
    let mut b_types = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(300), b.next()).await {
        b_types.extend(frame_types(&[m]));
    }
    assert!(!b_types.is_empty());
    assert!(b_types.iter().all(|t| t == "status"), "{b_types:?}");

    let (_, queue) = http(sim.addr(), "GET", "/queue", None).await;
    assert_eq!(queue, json!({"queue_running": [], "queue_pending": []}));
    let (_, hist) = http(sim.addr(), "GET", &format!("/history/{id}"), None).await;
    let entry = &hist[&id];
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    assert_eq!(entry["prompt"][1], id.as_str());
    assert!(entry["outputs"]["4"]["images"].is_array());
    let reqs = sim.requests();
    assert_eq!(reqs[0].0, "POST");
    assert_eq!(reqs[0].1, "/prompt");
}

#[tokio::test]
async fn http_errors_and_misc_routes() {
    let sim = start(0.0).await;
    let addr = sim.addr();
    let (status, body) = http(addr, "POST", "/prompt", Some(r#"{"client_id":"x"}"#)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "no_prompt");
    assert_eq!(http(addr, "POST", "/prompt", Some("{not json")).await.0, 500);
    let (status, stats) = http(addr, "GET", "/system_stats", None).await;
    assert_eq!(status, 200);
    assert_eq!(stats["system"]["comfyui_version"], "0.3.64-sim");
    assert_eq!(http(addr, "GET", "/history/unknown", None).await.1, json!({}));
    assert_eq!(http(addr, "GET", "/nope", None).await.0, 404);
    let (_, p) = http(addr, "GET", "/prompt", None).await;
    assert_eq!(p["exec_info"]["queue_remaining"], 0);
}

#[tokio::test]
async fn interrupt_stops_running_prompt() {
    let sim = start(1.0).await;
    let mut a = connect(&sim, "int").await;
    let body = json!({"prompt": {}, "client_id": "int", "prompt_id": "my-id"});
    let (status, resp) = http(sim.addr(), "POST", "/prompt", Some(&body.to_string())).await;
    assert_eq!((status, resp["prompt_id"].as_str()), (200, Some("my-id")));
    while !frame_types(&[recv(&mut a).await]).contains(&"progress".to_string()) {}
    http(sim.addr(), "POST", "/interrupt", Some(r#"{"prompt_id":"my-id"}"#)).await;
    let types = frame_types(&until_done(&mut a, "my-id").await);
    assert!(types.ends_with(&["execution_interrupted".into(), "status".into(), "executing".into()]), "{types:?}");
    let (_, hist) = http(sim.addr(), "GET", "/history/my-id", None).await;
    assert_eq!(hist["my-id"]["status"]["status_str"], "error");
}

#[tokio::test]
async fn disconnect_and_raw_frames() {
    let sim = start(0.0).await;
    let mut ws = connect(&sim, "raw").await;
    sim.send_raw_text("{broken");
    sim.send_raw_binary(vec![0, 0, 0, 9]);
    assert!(matches!(recv(&mut ws).await, Message::Text(t) if t.as_str() == "{broken"));
    assert!(matches!(recv(&mut ws).await, Message::Binary(b) if b.as_ref() == [0, 0, 0, 9]));
    sim.disconnect_all();
    assert!(sim.connected_clients().is_empty());
    let end = tokio::time::timeout(Duration::from_secs(2), ws.next()).await.expect("closed");
    assert!(matches!(end, None | Some(Ok(Message::Close(_))) | Some(Err(_))));
    let _ws2 = connect(&sim, "raw").await;
    assert_eq!(sim.wait_for_client(Duration::from_secs(1)).await.as_deref(), Some("raw"));
}

#[tokio::test]
async fn autoplay_streams_to_connected_socket() {
    let opts = SimOptions { transcripts: vec![fixtures().join("a_success.jsonl")], speed: 0.0, autoplay: true };
    let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("start");
    let url = format!("ws://{}/ws?clientId=auto", sim.addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    let mut ids = std::collections::HashSet::new();
    while ids.len() < 2 {
        if let Message::Text(t) = recv(&mut ws).await {
            let v: Value = serde_json::from_str(t.as_str()).expect("json");
            if v["type"] == "execution_start" {
                ids.insert(v["data"]["prompt_id"].as_str().unwrap_or("").to_string());
            }
        }
    }
}
