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

pub(super) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub(super) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/transcripts")
}

async fn start(speed: f64) -> Simulator {
    let opts = SimOptions { transcripts: vec![fixtures()], speed, ..SimOptions::default() };
    Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("start")
}

pub(super) async fn recv(ws: &mut Ws) -> Message {
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

pub(super) async fn recv_json(ws: &mut Ws) -> Value {
    match recv(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).expect("json"),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Connect, negotiate feature flags, check the two hello frames.
pub(super) async fn connect(sim: &Simulator, id: &str) -> Ws {
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
pub(super) async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
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
pub(super) async fn until_done(ws: &mut Ws, id: &str) -> Vec<Message> {
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

pub(super) fn frame_types(frames: &[Message]) -> Vec<String> {
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
    let opts = SimOptions {
        transcripts: vec![fixtures().join("a_success.jsonl")],
        speed: 0.0,
        autoplay: true,
        tap: false,
        ..SimOptions::default()
    };
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

async fn start_tap() -> Simulator {
    let opts = SimOptions { transcripts: vec![fixtures()], speed: 0.0, tap: true, ..SimOptions::default() };
    Simulator::start("127.0.0.1:0".parse().expect("addr"), opts).await.expect("start")
}

/// Connects asking to be a tap; returns the socket, the server's flags and (with the tap on) the hello.
async fn connect_tap(sim: &Simulator, id: &str) -> (Ws, Value, Option<Value>) {
    let url = format!("ws://{}/ws?clientId={id}", sim.addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    assert_eq!(recv_json(&mut ws).await["type"], "status");
    let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "comfy_bridge_tap": true}});
    ws.send(Message::text(flags.to_string())).await.expect("send");
    let answer = recv_json(&mut ws).await;
    assert_eq!(answer["type"], "feature_flags");
    let hello = match answer["data"]["comfy_bridge_tap"].is_string() {
        true => Some(recv_json(&mut ws).await),
        false => None,
    };
    (ws, answer["data"].clone(), hello)
}

fn txt2img() -> Value {
    serde_json::from_str(include_str!("../../examples/templates/txt2img.json")).expect("template")
}

/// `POST /comfy_bridge/answer` with `secret`: (status, body).
async fn answer(addr: SocketAddr, secret: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.expect("tcp");
    let req = format!(
        "POST /api/comfy_bridge/answer HTTP/1.1\r\nHost: x\r\nX-Comfy-Bridge-Secret: {secret}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (_, json) = text.split_once("\r\n\r\n").expect("head");
    (text[9..12].parse().expect("status"), serde_json::from_str(json).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_tap_gets_what_another_client_gets_and_the_events_of_prompts_without_a_client_id() {
    let sim = start_tap().await;
    let (mut tap, flags, hello) = connect_tap(&sim, "bridge").await;
    assert_eq!(flags["comfy_bridge_tap"], super::TAP_VERSION);
    let hello = hello.expect("hello");
    assert_eq!(
        (hello["type"].as_str(), hello["data"]["secret"].as_str().map(str::len)),
        (Some("comfy_bridge.hello"), Some(43))
    );
    let mut browser = connect(&sim, "browser").await;
    assert_eq!(http(sim.addr(), "GET", "/features", None).await.1["comfy_bridge_tap"], super::TAP_VERSION);

    let id = sim.queue_as(&txt2img(), Some("browser")).expect("queued");
    let seen_by_browser = frame_types(&until_done(&mut browser, &id).await);
    let seen_by_tap = frame_types(&until_done(&mut tap, &id).await);
    assert_eq!(seen_by_tap, seen_by_browser, "the same frames, previews included");
    assert!(seen_by_tap.contains(&"binary4".to_string()) && seen_by_tap.contains(&"executed".to_string()));

    let id = sim.queue_as(&txt2img(), None).expect("queued");
    let seen = frame_types(&until_done(&mut tap, &id).await);
    for kind in ["execution_start", "executing", "progress", "executed", "execution_success", "binary1"] {
        assert!(seen.contains(&kind.to_string()), "{kind}: {seen:?}");
    }
}

#[tokio::test]
async fn without_the_tap_nothing_is_mirrored_and_no_hello_is_sent() {
    let sim = start(0.0).await;
    let (mut tap, flags, hello) = connect_tap(&sim, "bridge").await;
    assert!(flags.get("comfy_bridge_tap").is_none() && hello.is_none());
    let mut browser = connect(&sim, "browser").await;
    let id = sim.queue_as(&txt2img(), Some("browser")).expect("queued");
    until_done(&mut browser, &id).await;
    // Only broadcasts reached the would-be tap: the next frame it sees is a status, never an execution event.
    let types = frame_types(&[recv(&mut tap).await, recv(&mut tap).await]);
    assert!(types.iter().all(|t| t == "status" || t == "progress" || t == "binary1"), "{types:?}");
    assert_eq!(http(sim.addr(), "POST", "/comfy_bridge/answer", Some("{}")).await.0, 404);
}

/// A workflow that asks, then publishes.
fn ask_workflow(timeout: f64, on_timeout: &str) -> Value {
    json!({
        "1": {"class_type": "Bus Ask", "inputs": {"subject": "prompt/llm", "payload": "{\"q\": 1}", "timeout_seconds": timeout,
              "on_timeout": on_timeout, "default": "fallback"}},
        "2": {"class_type": "Bus Publish", "inputs": {"subject": "done", "payload": ["1", 0]}},
    })
}

/// The next `comfy_bridge.*` message on `ws`.
async fn next_extension(ws: &mut Ws) -> Value {
    loop {
        if let Message::Text(t) = recv(ws).await {
            let v: Value = serde_json::from_str(t.as_str()).expect("json");
            if v["type"].as_str().is_some_and(|k| k.starts_with("comfy_bridge.")) {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn bus_ask_waits_for_the_first_answer_on_the_route_and_bus_publish_goes_to_the_taps() {
    let sim = start_tap().await;
    let (mut tap, _, hello) = connect_tap(&sim, "bridge").await;
    let secret = hello.expect("hello")["data"]["secret"].as_str().expect("secret").to_string();
    let id = sim.queue_as(&ask_workflow(30.0, "error"), Some("browser")).expect("queued");
    let ask = next_extension(&mut tap).await;
    assert_eq!(ask["type"], "comfy_bridge.ask");
    let data = &ask["data"];
    assert_eq!((data["prompt_id"].as_str(), data["node_id"].as_str()), (Some(id.as_str()), Some("1")));
    assert_eq!((data["subject"].as_str(), &data["payload"]), (Some("prompt/llm"), &json!({"q": 1})));
    let ask_id = data["ask_id"].as_str().expect("ask id").to_string();
    assert_eq!(sim.waiting_asks().len(), 1);

    // A tap that connects while the ask waits is told about it after its hello.
    let (mut late, _, _) = connect_tap(&sim, "late").await;
    assert_eq!(recv_json(&mut late).await["data"]["ask_id"], ask_id);

    let body = |a: &str| json!({"ask_id": a, "answer": "a cat"}).to_string();
    assert_eq!(answer(sim.addr(), "wrong", &body(&ask_id)).await.0, 403);
    assert_eq!(
        answer(sim.addr(), &secret, "nope").await,
        (400, json!({"accepted": false, "reason": "bad_request", "error": "body is not JSON"}))
    );
    assert_eq!(answer(sim.addr(), &secret, &body("other")).await.1["reason"], "unknown");
    assert_eq!(answer(sim.addr(), &secret, &body(&ask_id)).await, (200, json!({"accepted": true})));
    assert_eq!(answer(sim.addr(), &secret, &body(&ask_id)).await, (409, json!({"accepted": false, "reason": "late"})));
    let done = next_extension(&mut tap).await;
    assert_eq!(
        (done["type"].as_str(), done["data"]["outcome"].as_str()),
        (Some("comfy_bridge.ask_done"), Some("answered"))
    );
    let published = next_extension(&mut tap).await;
    assert_eq!(
        (published["type"].as_str(), published["data"]["subject"].as_str()),
        (Some("comfy_bridge.publish"), Some("done"))
    );
    assert!(frame_types(&until_done(&mut tap, &id).await).contains(&"execution_success".to_string()));
    assert_eq!(sim.accepted_answers(), vec![(ask_id, "a cat".to_string())]);
}

#[tokio::test]
async fn bus_ask_times_out_into_an_error_or_its_default_and_an_interrupt_ends_the_wait() {
    let sim = start_tap().await;
    let (mut tap, _, _) = connect_tap(&sim, "bridge").await;
    let id = sim.queue_as(&ask_workflow(0.2, "error"), Some("browser")).expect("queued");
    let types = frame_types(&until_done(&mut tap, &id).await);
    assert!(
        types.contains(&"comfy_bridge.ask_done".to_string()) && types.contains(&"execution_error".to_string()),
        "{types:?}"
    );
    let id = sim.queue_as(&ask_workflow(0.2, "default"), Some("browser")).expect("queued");
    let types = frame_types(&until_done(&mut tap, &id).await);
    assert!(
        types.contains(&"execution_success".to_string()) && types.contains(&"comfy_bridge.publish".to_string()),
        "{types:?}"
    );

    let id = sim.queue_as(&ask_workflow(30.0, "error"), Some("browser")).expect("queued");
    assert_eq!(next_extension(&mut tap).await["type"], "comfy_bridge.ask");
    http(sim.addr(), "POST", "/interrupt", Some("{}")).await;
    let done = next_extension(&mut tap).await;
    assert_eq!(done["data"]["outcome"], "interrupted");
    assert!(frame_types(&until_done(&mut tap, &id).await).contains(&"execution_interrupted".to_string()));
    assert!(sim.waiting_asks().is_empty());
}
