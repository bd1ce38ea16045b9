//! The request intake's own NATS connection: a subscriber that speaks just enough of the protocol (`INFO`,
//! `CONNECT`, `SUB`, `PING`/`PONG`, `MSG`/`HMSG`) and reads subjects as bytes.
//!
//! async-nats takes a subject that is not UTF-8 for a broken connection: it reconnects, and every request
//! behind it in the read buffer, or sent while it subscribes again, is lost. Here such a message is one
//! message like any other; [`super::intake`] decides what it is worth.

use std::sync::Arc;
use std::time::Duration;

use async_nats::ServerAddr;
use base64::Engine as _;
use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::time::Instant;

use crate::config::NatsSettings;

/// Longest control line taken from a server (nats-server's own `max_control_line` is 4,096 by default).
const MAX_LINE: usize = 64 * 1024;
/// Largest payload taken when the server announces no `max_payload` (nats-server's own cap is 64 MiB).
const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// How often the client asks the server whether it is still there; two unanswered pings end the connection.
const PING_EVERY: Duration = Duration::from_secs(30);
/// Longest a connection may take from TCP connect to the server's answer to `CONNECT`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A message on one of the subscriptions; the subjects are the server's bytes, UTF-8 or not.
#[derive(Debug, PartialEq)]
pub(super) struct Msg {
    pub(super) subject: Bytes,
    pub(super) reply: Option<Bytes>,
    pub(super) payload: Bytes,
}

/// How to reach and log in to the servers of `nats.url`.
pub(super) struct Options {
    servers: Vec<ServerAddr>,
    name: String,
    auth: Auth,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// `nats.ca_file`, `nats.client_cert_file`, `nats.client_key_file`.
    files: [Option<String>; 3],
    /// `tls://` in `nats.url`: TLS even where the server does not ask for it.
    require_tls: bool,
}

/// The login the `CONNECT` carries (besides a user in the server URL).
#[derive(Default)]
struct Auth {
    user: Option<(String, String)>,
    token: Option<String>,
    /// An nkey (from `nats.nkey_seed`, or a credentials file's seed) that signs the server's nonce.
    key: Option<nkeys::KeyPair>,
    /// A credentials file's user JWT.
    jwt: Option<String>,
}

impl Options {
    /// The options of `cfg` for a client named `name`; reads the credentials file and the TLS files.
    pub(super) fn new(cfg: &NatsSettings, name: String) -> Result<Self, String> {
        let servers = cfg
            .url
            .split(',')
            .map(|s| s.trim().parse::<ServerAddr>().map_err(|e| format!("`{}`: {e}", s.trim())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut auth = Auth {
            user: cfg
                .user
                .clone()
                .map(|u| (u, cfg.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default())),
            token: cfg.token.as_ref().map(|t| t.expose().to_string()),
            ..Auth::default()
        };
        if let Some(seed) = &cfg.nkey_seed {
            auth.key = Some(nkeys::KeyPair::from_seed(seed.expose()).map_err(|e| format!("nats.nkey_seed: {e}"))?);
        }
        if let Some(file) = &cfg.credentials_file {
            let contents = std::fs::read_to_string(file).map_err(|e| format!("cannot read `{file}`: {e}"))?;
            let (jwt, seed) = credentials(&contents).ok_or_else(|| format!("`{file}` holds no user JWT and seed"))?;
            auth.key = Some(nkeys::KeyPair::from_seed(seed).map_err(|e| format!("`{file}`: {e}"))?);
            auth.jwt = Some(jwt.to_string());
        }
        let require_tls = servers.iter().any(ServerAddr::tls_required);
        let files = [&cfg.ca_file, &cfg.client_cert_file, &cfg.client_key_file].map(|f| f.clone());
        let mut options = Options { servers, name, auth, tls: None, files, require_tls };
        // Built now only where TLS is certain to be used (the Mozilla roots cost memory); else when a
        // server first asks for it.
        if require_tls || options.files.iter().any(Option::is_some) {
            options.tls = Some(options.tls_config()?);
        }
        Ok(options)
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let [ca, cert, key] = self.files.each_ref().map(Option::as_deref);
        crate::tls::client_config(ca, cert, key).map_err(|e| e.to_string())
    }

    /// How many servers there are to try in turn.
    pub(super) fn servers(&self) -> usize {
        self.servers.len()
    }
}

/// The user JWT and the seed of a `.creds` file: the first lines after its first two `-----BEGIN …` lines.
fn credentials(contents: &str) -> Option<(&str, &str)> {
    let mut lines = contents.lines().map(str::trim);
    let mut next_block = || {
        lines.by_ref().find(|l| l.starts_with("---") && l.contains("BEGIN"))?;
        lines.by_ref().find(|l| !l.is_empty())
    };
    Some((next_block()?, next_block()?))
}

/// One live connection with its subscriptions.
pub(super) struct Subscriber {
    io: Box<dyn Io>,
    read: BytesMut,
    write: Vec<u8>,
    max_payload: usize,
    ping_due: Instant,
    pings_unanswered: u8,
}

impl Subscriber {
    /// Connects to server number `server` (modulo their count), logs in and subscribes to each of `subjects`
    /// (they may end in a wildcard).
    pub(super) async fn connect(options: &Options, server: usize, subjects: &[String]) -> Result<Self, String> {
        let addr = &options.servers[server % options.servers.len()];
        let connecting = tokio::time::timeout(CONNECT_TIMEOUT, Self::handshake(options, addr, subjects));
        let timed_out = || format!("{}:{}: no answer within {CONNECT_TIMEOUT:?}", addr.host(), addr.port());
        connecting.await.map_err(|_| timed_out())?
    }

    async fn handshake(options: &Options, addr: &ServerAddr, subjects: &[String]) -> Result<Self, String> {
        let mut tcp = tokio::net::TcpStream::connect((addr.host(), addr.port())).await.map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut read = BytesMut::with_capacity(4096);
        let info = match read_op(&mut tcp, &mut read, MAX_PAYLOAD).await? {
            Op::Info(info) => info,
            other => return Err(format!("the server began with {other:?}, not INFO")),
        };
        if !read.is_empty() {
            return Err("the server sent more than INFO before CONNECT".into());
        }
        let tls = options.require_tls || info.tls_required;
        let io: Box<dyn Io> = match tls {
            true => {
                let config = match &options.tls {
                    Some(config) => config.clone(),
                    None => options.tls_config()?,
                };
                let name =
                    rustls::pki_types::ServerName::try_from(addr.host().to_string()).map_err(|e| e.to_string())?;
                let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await;
                Box::new(stream.map_err(|e| format!("tls: {e}"))?)
            }
            false => Box::new(tcp),
        };
        let max_payload = if info.max_payload > 0 { info.max_payload } else { MAX_PAYLOAD };
        let mut subscriber = Subscriber {
            io,
            read,
            write: connect_line(options, addr, &info, tls)?.into_bytes(),
            max_payload,
            ping_due: Instant::now() + PING_EVERY,
            pings_unanswered: 0,
        };
        subscriber.write.extend_from_slice(b"PING\r\n");
        subscriber.flush().await?;
        // `verbose` is off: the answer to a good CONNECT is the PONG; to a bad one, `-ERR` and a close.
        loop {
            match subscriber.read_op().await? {
                Op::Pong => break,
                Op::Err(e) => return Err(format!("the server refused the login: {e}")),
                Op::Ping => subscriber.write.extend_from_slice(b"PONG\r\n"),
                _ => {}
            }
        }
        for (sid, subject) in subjects.iter().enumerate() {
            subscriber.write.extend_from_slice(format!("SUB {subject} {}\r\n", sid + 1).as_bytes());
        }
        subscriber.flush().await?;
        Ok(subscriber)
    }

    /// The next message; answers the server's pings and pings it in turn, so a server that is gone ends the
    /// connection (`Err`) within three ping intervals.
    pub(super) async fn next(&mut self) -> Result<Msg, String> {
        loop {
            let op = tokio::select! {
                op = read_op(&mut self.io, &mut self.read, self.max_payload) => op?,
                _ = tokio::time::sleep_until(self.ping_due) => {
                    if self.pings_unanswered >= 2 {
                        return Err("the server answered no ping".into());
                    }
                    self.pings_unanswered += 1;
                    self.ping_due = Instant::now() + PING_EVERY;
                    self.write.extend_from_slice(b"PING\r\n");
                    self.flush().await?;
                    continue;
                }
            };
            match op {
                Op::Msg(msg) => return Ok(msg),
                Op::Ping => {
                    self.write.extend_from_slice(b"PONG\r\n");
                    self.flush().await?;
                }
                Op::Pong => self.pings_unanswered = 0,
                Op::Err(e) => tracing::warn!(error = %e, "the nats server reported an error"),
                Op::Info(info) if info.max_payload > 0 => self.max_payload = info.max_payload,
                Op::Info(_) | Op::Ok => {}
            }
        }
    }

    async fn read_op(&mut self) -> Result<Op, String> {
        read_op(&mut self.io, &mut self.read, self.max_payload).await
    }

    async fn flush(&mut self) -> Result<(), String> {
        let written = tokio::time::timeout(PING_EVERY, async {
            self.io.write_all(&self.write).await?;
            self.io.flush().await
        });
        let written = written.await.map_err(|_| "the server took nothing for a ping interval".to_string())?;
        written.map_err(|e| e.to_string())?;
        self.write.clear();
        Ok(())
    }
}

/// Reads from `io` into `buf` until one whole operation is there. Cancel-safe: what was read stays in `buf`.
async fn read_op(io: &mut (impl AsyncRead + Unpin), buf: &mut BytesMut, max_payload: usize) -> Result<Op, String> {
    loop {
        if let Some(op) = parse(buf, max_payload)? {
            return Ok(op);
        }
        buf.reserve(4096);
        match io.read_buf(buf).await {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The `CONNECT` line for `addr`: the client's name, headers on, and the login (a user in the URL first).
fn connect_line(options: &Options, addr: &ServerAddr, info: &Info, tls: bool) -> Result<String, String> {
    let mut connect = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "name": options.name,
        "headers": true,
        "no_responders": true,
        "tls_required": tls,
    });
    let auth = &options.auth;
    let user = match (addr.username(), addr.password()) {
        (Some(user), Some(pass)) => Some((user.to_string(), pass.to_string())),
        (Some(token), None) => {
            connect["auth_token"] = token.into();
            None
        }
        _ => auth.user.clone(),
    };
    if let Some((user, pass)) = user {
        connect["user"] = user.into();
        connect["pass"] = pass.into();
    }
    if let Some(token) = &auth.token {
        connect["auth_token"] = token.clone().into();
    }
    if let Some(key) = &auth.key {
        let nonce = info.nonce.as_deref().unwrap_or_default();
        let signed = key.sign(nonce.as_bytes()).map_err(|e| format!("cannot sign the server's nonce: {e}"))?;
        connect["sig"] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signed).into();
        match &auth.jwt {
            Some(jwt) => connect["jwt"] = jwt.clone().into(),
            None => connect["nkey"] = key.public_key().into(),
        }
    }
    Ok(format!("CONNECT {connect}\r\n"))
}

/// What the server sends, as far as a subscriber cares.
#[derive(Debug, PartialEq)]
enum Op {
    Info(Info),
    Msg(Msg),
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// The part of the server's `INFO` a subscriber uses.
#[derive(Debug, Default, PartialEq, serde::Deserialize)]
struct Info {
    #[serde(default)]
    tls_required: bool,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    max_payload: usize,
}

/// Takes one operation off the front of `buf`; `None` while it is not all there. A message bigger than
/// `max_payload`, a line longer than [`MAX_LINE`] or one that is no operation is an error: the stream can
/// no longer be trusted.
fn parse(buf: &mut BytesMut, max_payload: usize) -> Result<Option<Op>, String> {
    let Some(end) = buf.iter().take(MAX_LINE).position(|&b| b == b'\n') else {
        return match buf.len() >= MAX_LINE {
            true => Err(format!("a control line longer than {MAX_LINE} bytes")),
            false => Ok(None),
        };
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let (verb, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let op = match verb.to_ascii_uppercase().as_slice() {
        b"MSG" | b"HMSG" => {
            let headers = verb.len() == 4;
            let (subject, reply, header_len, total) = message_line(args, headers)?;
            if total > max_payload || header_len > total {
                return Err(format!(
                    "a message of {total} bytes (headers {header_len}) over max_payload {max_payload}"
                ));
            }
            let whole = end + 1 + total + 2;
            if buf.len() < whole {
                buf.reserve(whole - buf.len());
                return Ok(None);
            }
            let (subject, reply) = (Bytes::copy_from_slice(subject), reply.map(Bytes::copy_from_slice));
            buf.advance(end + 1);
            let mut body = buf.split_to(total);
            buf.advance(2);
            let payload = body.split_off(header_len).freeze();
            return Ok(Some(Op::Msg(Msg { subject, reply, payload })));
        }
        b"PING" => Op::Ping,
        b"PONG" => Op::Pong,
        b"+OK" => Op::Ok,
        b"-ERR" => Op::Err(String::from_utf8_lossy(args).trim().trim_matches('\'').to_string()),
        b"INFO" => Op::Info(serde_json::from_slice(args).map_err(|e| format!("INFO: {e}"))?),
        _ => return Err(format!("unknown operation `{}`", String::from_utf8_lossy(&verb[..verb.len().min(16)]))),
    };
    buf.advance(end + 1);
    Ok(Some(op))
}

/// A `MSG` or `HMSG` line: the subject, the reply subject, the header bytes and the total bytes.
type MessageLine<'a> = (&'a [u8], Option<&'a [u8]>, usize, usize);

/// `<subject> <sid> [reply] <#bytes>` (`MSG`) or `<subject> <sid> [reply] <#header bytes> <#total bytes>`
/// (`HMSG`).
fn message_line(args: &[u8], headers: bool) -> Result<MessageLine<'_>, String> {
    let fields: Vec<&[u8]> = args.split(|&b| b == b' ' || b == b'\t').filter(|f| !f.is_empty()).collect();
    let number = |f: &[u8]| std::str::from_utf8(f).ok().and_then(|s| s.parse::<usize>().ok());
    let bad = || format!("a malformed message line `{}`", String::from_utf8_lossy(&args[..args.len().min(64)]));
    let sizes = if headers { 2 } else { 1 };
    if fields.len() != 2 + sizes && fields.len() != 3 + sizes {
        return Err(bad());
    }
    let reply = (fields.len() == 3 + sizes).then(|| fields[2]);
    let total = number(fields[fields.len() - 1]).ok_or_else(bad)?;
    let header_len = match headers {
        true => number(fields[fields.len() - 2]).ok_or_else(bad)?,
        false => 0,
    };
    Ok((fields[0], reply, header_len, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(mut bytes: &[u8]) -> Vec<Op> {
        // Fed a byte at a time: an operation split anywhere must wait, not fail.
        let mut buf = BytesMut::new();
        let mut ops = Vec::new();
        while !bytes.is_empty() {
            buf.extend_from_slice(&bytes[..1]);
            bytes = &bytes[1..];
            while let Some(op) = parse(&mut buf, 1024).expect("parses") {
                ops.push(op);
            }
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        ops
    }

    fn msg(subject: &[u8], reply: Option<&[u8]>, payload: &[u8]) -> Op {
        let (subject, reply) = (Bytes::copy_from_slice(subject), reply.map(Bytes::copy_from_slice));
        Op::Msg(Msg { subject, reply, payload: Bytes::copy_from_slice(payload) })
    }

    #[test]
    fn subjects_that_are_not_utf8_are_messages_like_any_other() {
        let stream = b"INFO {\"max_payload\":1024,\"nonce\":\"n\"}\r\nPING\r\n\
            MSG a.\xff\xfe 1 2\r\n{}\r\nMSG a.status 1 _INBOX.\xc3\x28 2\r\n{}\r\n\
            MSG a.status 1 _INBOX.ok 3\r\nx\r\n\r\nHMSG a.b 2 r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n+OK\r\n-ERR 'Stale'\r\n";
        let info = Info { nonce: Some("n".into()), max_payload: 1024, ..Info::default() };
        assert_eq!(
            parse_all(stream),
            vec![
                Op::Info(info),
                Op::Ping,
                msg(b"a.\xff\xfe", None, b"{}"),
                msg(b"a.status", Some(b"_INBOX.\xc3\x28"), b"{}"),
                msg(b"a.status", Some(b"_INBOX.ok"), b"x\r\n"),
                msg(b"a.b", Some(b"r"), b"hi"),
                Op::Ok,
                Op::Err("Stale".into()),
            ]
        );
    }

    #[test]
    fn what_cannot_be_a_message_ends_the_connection() {
        for bad in [
            &b"MSG a 1\r\n"[..],
            b"MSG a 1 x\r\n",
            b"MSG a 1 b c 2\r\n",
            b"HMSG a 1 5 4\r\n",
            b"MSG a 1 5000\r\n",
            b"WHAT\r\n",
            b"INFO {\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(parse(&mut buf, 1024).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut endless = BytesMut::from(&[b'M'; MAX_LINE][..]);
        assert!(parse(&mut endless, 1024).is_err());
        let mut short = BytesMut::from(&b"MSG a 1 1000\r\n"[..]);
        assert!(parse(&mut short, 1024).expect("waits").is_none(), "a message within max_payload waits for its bytes");
    }

    #[test]
    fn credentials_files_give_the_jwt_and_the_seed() {
        let creds = "-----BEGIN NATS USER JWT-----\neyJ0.abc.def\n------END NATS USER JWT------\n\n\
            ************************* IMPORTANT *************************\n\
            NKEY Seed printed below can be used to sign and prove identity.\n\n\
            -----BEGIN USER NKEY SEED-----\nSUAIO3FH\n------END USER NKEY SEED------\n";
        assert_eq!(credentials(creds), Some(("eyJ0.abc.def", "SUAIO3FH")));
        assert_eq!(credentials("nothing here"), None);
    }

    #[test]
    fn the_login_signs_the_nonce_and_prefers_the_url_user() {
        let key = nkeys::KeyPair::new_user();
        let public = key.public_key();
        let options = Options {
            servers: vec![],
            name: "comfy-bridge-local".into(),
            auth: Auth { user: Some(("u".into(), "p".into())), key: Some(key), ..Auth::default() },
            tls: None,
            files: [None, None, None],
            require_tls: false,
        };
        let info = Info { nonce: Some("n0nce".into()), ..Info::default() };
        let line = |url: &str| {
            let line = connect_line(&options, &url.parse().expect("url"), &info, false).expect("connect");
            let json = line.strip_prefix("CONNECT ").and_then(|l| l.strip_suffix("\r\n")).expect("framed");
            serde_json::from_str::<serde_json::Value>(json).expect("json")
        };
        let plain = line("nats://127.0.0.1:4222");
        assert_eq!((plain["user"].as_str(), plain["pass"].as_str()), (Some("u"), Some("p")));
        assert_eq!(plain["nkey"], public.as_str());
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(plain["sig"].as_str().expect("sig"));
        let verifier = nkeys::KeyPair::from_public_key(&public).expect("public key");
        assert!(verifier.verify(b"n0nce", &sig.expect("base64")).is_ok(), "the signature is the nonce's");
        let in_url = line("nats://alice:secret@127.0.0.1:4222");
        assert_eq!((in_url["user"].as_str(), in_url["pass"].as_str()), (Some("alice"), Some("secret")));
        assert_eq!(line("nats://t0ken@127.0.0.1:4222")["auth_token"], "t0ken");
    }
}
