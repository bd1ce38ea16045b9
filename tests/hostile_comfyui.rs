//! A hostile stand-in for ComfyUI: its HTTP API answers `/queue` and `/history` with bodies that never end,
//! while its WebSocket behaves. The bridge stops reading at `comfyui.max_body_bytes`, answers requests at
//! once, and keeps publishing events.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use comfy_bridge::config::Settings;
use common::daemon::Daemon;
use common::requester::{nats_client, nats_request};
use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);
const CAP: u64 = 1024 * 1024;

/// The stand-in: where it listens, the frames to push to every WebSocket client, the bytes its endless
/// bodies wrote so far, and a signal per WebSocket connection.
struct Hostile {
    url: String,
    frames: broadcast::Sender<String>,
    written: Arc<AtomicUsize>,
    connected: mpsc::Receiver<()>,
}

async fn hostile_comfyui() -> Hostile {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (frames, _) = broadcast::channel(64);
    let written = Arc::new(AtomicUsize::new(0));
    let (connected_tx, connected) = mpsc::channel(8);
    let (frames_tx, counter) = (frames.clone(), written.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (frames, counter, connected) = (frames_tx.subscribe(), counter.clone(), connected_tx.clone());
            tokio::spawn(serve(stream, frames, counter, connected));
        }
    });
    Hostile { url, frames, written, connected }
}

/// One connection: a WebSocket for `/ws`, else one HTTP answer.
async fn serve(
    mut stream: TcpStream,
    mut frames: broadcast::Receiver<String>,
    written: Arc<AtomicUsize>,
    connected: mpsc::Sender<()>,
) {
    let mut head = [0u8; 4096];
    let Ok(n) = stream.peek(&mut head).await else { return };
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    let path = head.split(' ').nth(1).unwrap_or_default().to_string();
    if path.starts_with("/ws") {
        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
        let _ = connected.send(()).await;
        loop {
            tokio::select! {
                frame = frames.recv() => match frame {
                    Ok(text) => if ws.send(Message::text(text)).await.is_err() { return },
                    Err(_) => return,
                },
                incoming = ws.next() => if !matches!(incoming, Some(Ok(_))) { return },
            }
        }
    }
    let mut request = [0u8; 4096];
    let _ = stream.read(&mut request).await;
    if path.starts_with("/queue") || path.starts_with("/history") {
        let start = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
        let mut out = stream.write_all(start.as_bytes()).await;
        while out.is_ok() {
            out = stream.write_all(chunk.as_bytes()).await;
            written.fetch_add(chunk.len(), Relaxed);
        }
    } else {
        let body = r#"{"system": {"comfyui_version": "hostile"}}"#;
        let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        let _ = stream.write_all(answer.as_bytes()).await;
    }
}

fn settings(url: &str, nats: &NatsServer) -> (Settings, tempfile::TempDir) {
    let state = tempfile::tempdir().expect("state dir");
    let mut s = Settings::default();
    s.comfyui.url = url.to_string();
    s.comfyui.reconnect_max_ms = 500;
    s.comfyui.max_body_bytes = CAP;
    s.state.dir = state.path().to_path_buf();
    s.http.listen = Some("127.0.0.1:0".into());
    s.mqtt.enabled = false;
    s.nats.enabled = true;
    s.nats.url = nats.url();
    (s, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_queue_and_history_bodies_stop_at_the_cap_and_the_bridge_keeps_working() {
    let nats = NatsServer::start();
    let mut comfy = hostile_comfyui().await;
    let mut events = nats_subscribe(&nats, "comfyui.local.>").await;
    let (s, state) = settings(&comfy.url, &nats);
    let daemon = Daemon::start(s, state);
    tokio::time::timeout(WAIT, comfy.connected.recv()).await.expect("the bridge connects").expect("signal");

    // `status` reads the queue: the endless body is cut at the cap and the answer comes at once.
    let client = nats_client(&nats).await;
    // The NATS subscription is made right after connecting; wait until it answers.
    for _ in 0..50 {
        let probe = client.request("comfyui.local.request.status".to_string(), "".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), probe).await {
            break;
        }
    }
    for _ in 0..3 {
        let status = nats_request(&client, "comfyui.local.request.status", "").await;
        assert_eq!(status["data"]["comfyui"]["reachable"], false, "{status}");
        let error = status["data"]["comfyui"]["error"].as_str().unwrap_or_default();
        assert!(error.contains("max_body_bytes"), "{status}");
    }

    // Events still flow: the WebSocket was never held up by the HTTP reads.
    let start = r#"{"type":"execution_start","data":{"prompt_id":"hostile-1","timestamp":1}}"#;
    comfy.frames.send(start.to_string()).expect("a websocket client");
    events
        .expect(
            |m| m.subject.contains("hostile-1") && String::from_utf8_lossy(&m.payload).contains("execution_start"),
            WAIT,
        )
        .await;

    // Each endless body was read up to the cap, not for as long as the server kept writing.
    let written = comfy.written.load(Relaxed);
    assert!(written < 64 * CAP as usize, "{written} bytes written to the bridge");
    daemon.stop().await;
}
