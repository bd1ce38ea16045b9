//! TCP accept loop, hand-written HTTP/1.1 request parsing and the WebSocket endpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{frames, http, spawn_guarded, Client, Out, Shared};

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 * 1024 * 1024;

/// A parsed HTTP request.
#[derive(Debug)]
pub(crate) struct Request {
    pub method: String,
    /// Path without query and without the `/api` prefix.
    pub path: String,
    /// Whether the path had the `/api` prefix (routes of newer versions exist only there).
    pub api: bool,
    /// Raw query string (without `?`).
    pub query: String,
    /// Lower-case header names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// A header value by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A query parameter (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// Accept connections forever.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_guarded(&shared, handle_conn(shared.clone(), stream)),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_conn(shared: Arc<Shared>, mut stream: TcpStream) {
    let req = match read_request(&mut stream).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(msg) => {
            let _ = write_response(&mut stream, &http::Response::text(400, msg)).await;
            return;
        }
    };
    if req.method == "GET" && req.path == "/ws" {
        if shared.refuse_websockets.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = write_response(&mut stream, &http::Response::text(503, "503: Service Unavailable")).await;
            return;
        }
        websocket(shared, stream, req).await;
        return;
    }
    let resp = http::handle(&shared, req).await;
    let _ = write_response(&mut stream, &resp).await;
}

/// Read one request; `Ok(None)` if the peer closed before sending anything.
async fn read_request(stream: &mut TcpStream) -> Result<Option<Request>, &'static str> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too large");
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => return Err("truncated request"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut req = parse_head(&buf[..head_end])?;
    let body_start = head_end + 4;
    let len: usize = match req.header("content-length") {
        Some(v) => v.trim().parse().map_err(|_| "bad content-length")?,
        None => 0,
    };
    if len > MAX_BODY {
        return Err("body too large");
    }
    let mut body = buf.split_off(body_start.min(buf.len()));
    if body.len() < len {
        let mut rest = vec![0u8; len - body.len()];
        stream.read_exact(&mut rest).await.map_err(|_| "truncated body")?;
        body.extend_from_slice(&rest);
    }
    body.truncate(len);
    req.body = body;
    Ok(Some(req))
}

fn parse_head(head: &[u8]) -> Result<Request, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = match (first.next(), first.next()) {
        (Some(m), Some(t)) => (m.to_string(), t),
        _ => return Err("bad request line"),
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, api) = match path.strip_prefix("/api") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => (rest.to_string(), true),
        _ => (path.to_string(), false),
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Request { method, path, api, query: query.to_string(), headers, body: Vec::new() })
}

async fn write_response(stream: &mut TcpStream, resp: &http::Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&resp.body).await?;
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Upgrade to WebSocket by hand and serve the socket.
async fn websocket(shared: Arc<Shared>, mut stream: TcpStream, req: Request) {
    let Some(key) = req.header("sec-websocket-key") else {
        let _ = write_response(&mut stream, &http::Response::text(400, "expected websocket")).await;
        return;
    };
    let accept = derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let client_id =
        req.query_param("clientId").filter(|s| !s.is_empty()).map(str::to_string).unwrap_or_else(frames::new_hex_id);
    let ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
    serve_socket(shared, ws, client_id).await;
}

/// Register the socket (replacing any socket with the same id) and queue the `status` hello.
fn register(shared: &Shared, id: &str) -> (u64, mpsc::UnboundedReceiver<Out>) {
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut st = shared.lock();
    let hello = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": st.queue_remaining()}}, "sid": id}});
    let _ = tx.send(Out::Msg(Message::text(hello.to_string())));
    // Bounded: a simulator run by hand for days sees many anonymous sockets.
    if st.seen_clients.len() >= 10_000 {
        st.seen_clients.clear();
    }
    let reconnect = !st.seen_clients.insert(id.to_string());
    let deaf = reconnect && shared.deafen_next.swap(false, Ordering::Relaxed);
    if deaf {
        tracing::debug!(client_id = %id, "this socket is deaf: it gets broadcasts only");
    }
    let client = Client { conn, tx, preview_metadata: false, tap: false, deaf };
    st.clients.insert(id.to_string(), client);
    (conn, rx)
}

async fn serve_socket(shared: Arc<Shared>, ws: WebSocketStream<TcpStream>, id: String) {
    let (conn, mut rx) = register(&shared, &id);
    tracing::debug!(client_id = %id, "websocket connected");
    let (mut sink, mut source) = ws.split();
    let mut negotiated = false;
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Msg(m)) => if sink.send(m).await.is_err() { break },
                Some(Out::Close) | None => { let _ = sink.send(Message::Close(None)).await; break }
            },
            incoming = source.next() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    let mut failed = false;
                    for answer in client_text(&shared, &id, conn, t.as_str(), &mut negotiated) {
                        failed = failed || sink.send(answer).await.is_err();
                    }
                    if failed { break }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let mut st = shared.lock();
    if st.clients.get(&id).is_some_and(|c| c.conn == conn) {
        st.clients.remove(&id);
    }
    tracing::debug!(client_id = %id, "websocket closed");
}

/// Handle a client text frame; only the first JSON message may negotiate feature flags. With the tap on, a
/// first message asking for `comfy_bridge_tap` makes the socket a tap: after the flags it gets the extension's
/// hello and the asks waiting now.
fn client_text(shared: &Shared, id: &str, conn: u64, text: &str, done: &mut bool) -> Vec<Message> {
    if *done {
        return Vec::new();
    }
    let Ok(v) = serde_json::from_str::<Value>(text) else { return Vec::new() };
    *done = true;
    if v["type"] != "feature_flags" {
        return Vec::new();
    }
    let metadata = v["data"]["supports_preview_metadata"] == Value::Bool(true);
    let tap = shared.tap && v["data"][super::tap::FLAG] == Value::Bool(true);
    let waiting = {
        let mut st = shared.lock();
        if let Some(c) = st.clients.get_mut(id).filter(|c| c.conn == conn) {
            c.preview_metadata = metadata;
            c.tap = tap;
        }
        st.asks.waiting()
    };
    let answer = json!({"type": "feature_flags", "data": http::server_features(shared)});
    let mut out = vec![Message::text(answer.to_string())];
    if tap {
        let hello =
            json!({"type": "comfy_bridge.hello", "data": {"version": super::tap::VERSION, "secret": shared.secret}});
        out.push(Message::text(hello.to_string()));
        out.extend(
            waiting.into_iter().map(|a| Message::text(json!({"type": "comfy_bridge.ask", "data": a}).to_string())),
        );
    }
    out
}
