//! What a hostile or careless client does to the bridge's buses, and how a test reads the outcome: a raw NATS
//! client that sends bytes no library would, and `/metrics` and `/readyz` on a port of the test's own.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::NatsServer;

const WAIT: Duration = Duration::from_secs(10);

/// A free loopback port for `http.listen`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Speaks the NATS protocol by hand: `CONNECT`, then `ops` verbatim, then `PING`; returns once the server
/// answered `PONG` (so it processed everything before), panicking on `-ERR`.
pub async fn nats_raw(server: &NatsServer, ops: &[u8]) {
    let stream = TcpStream::connect(("127.0.0.1", server.port)).await.expect("connect to nats");
    let mut stream = BufReader::new(stream);
    let mut line = Vec::new();
    stream.read_until(b'\n', &mut line).await.expect("INFO");
    assert!(line.starts_with(b"INFO "), "{}", String::from_utf8_lossy(&line));
    let mut out = b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n".to_vec();
    out.extend_from_slice(ops);
    out.extend_from_slice(b"PING\r\n");
    stream.get_mut().write_all(&out).await.expect("write");
    let pong = async {
        loop {
            line.clear();
            stream.read_until(b'\n', &mut line).await.expect("read");
            assert!(!line.starts_with(b"-ERR"), "{}", String::from_utf8_lossy(&line));
            if line.starts_with(b"PONG") {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, pong).await.expect("PONG in time");
}

/// `GET http://127.0.0.1:<port><path>`: status and body (0 when nothing listens yet).
pub async fn get(port: u16, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Polls `/metrics` until `pred` holds for it; panics with the last one after a while.
pub async fn metrics_until(port: u16, pred: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = get(port, "/metrics").await;
        if pred(&body) {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics never matched:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the sample whose line starts with `sample` (name and labels), 0 when absent.
pub fn metric(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(sample))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
