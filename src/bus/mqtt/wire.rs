//! The bridge's own MQTT connection: rumqttc's packet codec (`mqttbytes`) over a socket this loop owns,
//! writing every request that waits with one call.
//!
//! rumqttc's eventloop writes and flushes one packet per poll, a system call per message: in a profile of
//! the shared benchmark that eventloop was 40% of the bridge's CPU. This loop does for the bridge what that
//! eventloop did, and no more: connect (TCP, or TLS with the bridge's rustls configuration), `CONNECT` with
//! the last will, then requests from the [`Client`]'s channel (up to [`WRITE_CHUNK`] bytes of them per
//! write), numbering QoS-1 publishes in order and reporting each number (`Sent`), `PubAck`s, incoming
//! publishes (acknowledged at once), a keep-alive ping every interval whatever else goes on (a second one
//! unanswered is a dead broker), and `Failed` on any error, after which the polling task backs off and the
//! next [`Wire::next`] reconnects. Publishes are encoded here ([`encode_publish`]); every other packet with
//! rumqttc's types.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::LoopEvent;
use crate::bus::Reply;

/// A write is sent once this many bytes of packets are waiting (or nothing more waits).
pub(super) const WRITE_CHUNK: usize = 64 * 1024;
/// Room kept free in the read buffer before each read.
const READ_ROOM: usize = 16 * 1024;
/// Connecting (TCP, TLS and `CONNACK`) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the publisher asks of the connection.
pub(super) enum Request {
    Publish { topic: String, payload: Bytes, extras: Extras },
    Subscribe(String),
    Disconnect,
}

/// What a publish carries besides topic and payload.
pub(super) struct Extras {
    pub(super) qos: u8,
    pub(super) retain: bool,
    /// MQTT v5 correlation data.
    pub(super) correlation: Option<Bytes>,
    /// MQTT v5 message expiry, in seconds.
    pub(super) expiry: Option<u32>,
    /// MQTT v5 response topic.
    pub(super) response_topic: Option<String>,
}

/// The publisher's handle: requests go into a bounded channel and never wait.
#[derive(Clone)]
pub(super) struct Client {
    tx: mpsc::Sender<Request>,
}

impl Client {
    /// Hands a publish over; `false` when the channel is full (retry shortly).
    pub(super) fn try_publish(&self, topic: String, payload: Bytes, extras: Extras) -> bool {
        self.tx.try_send(Request::Publish { topic, payload, extras }).is_ok()
    }

    /// Subscribes to a filter with QoS 1 (again on every connection: each starts clean).
    pub(super) fn subscribe(&self, filter: &str) {
        if self.tx.try_send(Request::Subscribe(filter.to_string())).is_err() {
            tracing::warn!(filter, "cannot subscribe to the request topics: the connection's queue is full");
        }
    }

    /// Asks for a clean `DISCONNECT` without waiting (a full channel means the broker is gone anyway).
    pub(super) fn disconnect(&self) {
        let _ = self.tx.try_send(Request::Disconnect);
    }
}

/// How to connect.
pub(super) struct Options {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT v5 (else v3.1.1).
    pub(super) v5: bool,
    pub(super) client_id: String,
    pub(super) keep_alive: Duration,
    /// User name and password.
    pub(super) login: Option<(String, String)>,
    /// Where the last will (`offline`, retained, QoS 1) goes.
    pub(super) will_topic: String,
    /// The largest packet taken from the broker (and announced to it, on v5).
    pub(super) max_packet_bytes: usize,
}

/// A client handle and the connection loop it feeds, with room for `capacity` requests between them.
pub(super) fn new(options: Options, capacity: usize) -> (Client, Wire) {
    let (tx, rx) = mpsc::channel(capacity);
    let wire = Wire { options, requests: rx, conn: None, events: VecDeque::new(), pkid: 0 };
    (Client { tx }, wire)
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One live connection.
struct Conn {
    io: Box<dyn Io>,
    read: BytesMut,
    write: BytesMut,
    /// When the next `PINGREQ` goes out.
    ping_due: Instant,
    /// A `PINGREQ` went out and its `PINGRESP` has not come.
    awaiting_pong: bool,
    /// QoS-1 publishes written and not yet acknowledged.
    inflight: u16,
    /// The most of them the broker takes at once (its `CONNACK`'s receive maximum on v5).
    receive_max: u16,
}

/// The connection loop: see the module documentation.
pub(super) struct Wire {
    options: Options,
    requests: mpsc::Receiver<Request>,
    conn: Option<Conn>,
    /// Reported one per [`Wire::next`].
    events: VecDeque<Polled>,
    /// The last packet id given out.
    pkid: u16,
}

/// What one call of [`Wire::next`] meant.
pub(super) enum Polled {
    /// For the publisher.
    Event(LoopEvent),
    /// A message from the broker.
    Message {
        topic: String,
        payload: Bytes,
        retain: bool,
        reply: Option<Reply>,
    },
    Ignored,
    /// The `DISCONNECT` went out, or the publisher is gone.
    Stopped,
    /// The connection failed (or could not be made): back off, [`Wire::reset`], call again.
    Failed(String),
}

/// What woke the loop.
enum Woke {
    Read(std::io::Result<usize>),
    Request(Option<Request>),
    Ping,
}

impl Wire {
    /// Runs the connection until something happens that the polling task must know about.
    pub(super) async fn next(&mut self) -> Polled {
        loop {
            if let Some(event) = self.events.pop_front() {
                return event;
            }
            let Wire { options, requests, conn, .. } = self;
            let Some(live) = conn.as_mut() else {
                return match tokio::time::timeout(CONNECT_TIMEOUT, connect(options)).await {
                    Ok(Ok(live)) => {
                        *conn = Some(live);
                        Polled::Event(LoopEvent::Connected)
                    }
                    Ok(Err(e)) => Polled::Failed(e),
                    Err(_) => Polled::Failed("connecting timed out".into()),
                };
            };
            if live.read.capacity() - live.read.len() < READ_ROOM {
                live.read.reserve(READ_ROOM);
            }
            let room = live.inflight < live.receive_max;
            let woke = tokio::select! {
                biased;
                n = live.io.read_buf(&mut live.read) => Woke::Read(n),
                request = requests.recv(), if room => Woke::Request(request),
                _ = tokio::time::sleep_until(live.ping_due) => Woke::Ping,
            };
            let step = match woke {
                Woke::Read(Ok(0)) => Err("the broker closed the connection".to_string()),
                Woke::Read(Ok(_)) => self.on_read().await,
                Woke::Read(Err(e)) => Err(e.to_string()),
                Woke::Request(None) => return Polled::Stopped,
                Woke::Request(Some(request)) => match self.on_requests(request).await {
                    Ok(true) => return Polled::Stopped,
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                },
                Woke::Ping => self.ping().await,
            };
            if let Err(e) = step {
                self.conn = None;
                return Polled::Failed(e);
            }
        }
    }

    /// After an error: forget the requests handed over for the old connection; the publisher's outbox
    /// redelivers them.
    pub(super) fn reset(&mut self) {
        while self.requests.try_recv().is_ok() {}
        self.conn = None;
        self.events.clear();
    }

    fn next_pkid(&mut self) -> u16 {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        self.pkid
    }

    /// Encodes `first` and whatever else waits (up to [`WRITE_CHUNK`] bytes), then writes them. `true`: a
    /// `DISCONNECT` went out, the connection is over.
    async fn on_requests(&mut self, first: Request) -> Result<bool, String> {
        let mut request = Some(first);
        let mut done = false;
        while let Some(r) = request.take() {
            done = self.encode(r)?;
            let (buffered, room) =
                self.conn.as_ref().map_or((0, false), |c| (c.write.len(), c.inflight < c.receive_max));
            if done || buffered >= WRITE_CHUNK || !room {
                break;
            }
            request = self.requests.try_recv().ok();
        }
        self.flush().await?;
        Ok(done)
    }

    /// Puts one request's packet into the write buffer; `true` for a `DISCONNECT`.
    fn encode(&mut self, request: Request) -> Result<bool, String> {
        let v5 = self.options.v5;
        let pkid = match &request {
            Request::Publish { extras, .. } if extras.qos > 0 => self.next_pkid(),
            Request::Subscribe(_) => self.next_pkid(),
            _ => 0,
        };
        let Some(conn) = self.conn.as_mut() else { return Ok(false) };
        match request {
            Request::Publish { topic, payload, extras } => {
                encode_publish(&mut conn.write, v5, &topic, &payload, &extras, pkid);
                if pkid != 0 {
                    conn.inflight += 1;
                    self.events.push_back(Polled::Event(LoopEvent::Sent(pkid)));
                }
                Ok(false)
            }
            Request::Subscribe(filter) => codec::subscribe(&mut conn.write, v5, pkid, filter).map(|()| false),
            Request::Disconnect => codec::disconnect(&mut conn.write, v5).map(|()| true),
        }
    }

    /// Takes every complete packet out of the read buffer; answers what needs an answer.
    async fn on_read(&mut self) -> Result<(), String> {
        let (v5, max) = (self.options.v5, self.options.max_packet_bytes);
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        while let Some(packet) = codec::decode(&mut conn.read, v5, max)? {
            match packet {
                codec::Incoming::PubAck { pkid, refused } => {
                    conn.inflight = conn.inflight.saturating_sub(1);
                    let event = match refused {
                        None => LoopEvent::Acked(pkid),
                        Some(reason) => LoopEvent::Refused(pkid, reason),
                    };
                    self.events.push_back(Polled::Event(event));
                }
                codec::Incoming::Publish { topic, payload, retain, pkid, reply } => {
                    if pkid != 0 {
                        codec::puback(&mut conn.write, v5, pkid)?;
                    }
                    match String::from_utf8(topic.to_vec()) {
                        Ok(topic) => self.events.push_back(Polled::Message { topic, payload, retain, reply }),
                        Err(_) => self.events.push_back(Polled::Ignored),
                    }
                }
                codec::Incoming::PingResp => conn.awaiting_pong = false,
                codec::Incoming::Disconnect => return Err("the broker sent DISCONNECT".into()),
                codec::Incoming::ConnAck { .. } | codec::Incoming::Other => {}
            }
        }
        // A big request (an upload) leaves a big buffer: give it back.
        if conn.read.is_empty() && conn.read.capacity() > 4 * WRITE_CHUNK {
            conn.read = BytesMut::with_capacity(READ_ROOM);
        }
        self.flush().await
    }

    /// A `PINGREQ` every keep-alive interval; one still unanswered by the next is a dead connection.
    async fn ping(&mut self) -> Result<(), String> {
        let (v5, keep_alive) = (self.options.v5, self.options.keep_alive);
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        if conn.awaiting_pong {
            return Err("no PINGRESP within the keep-alive interval".into());
        }
        codec::pingreq(&mut conn.write, v5)?;
        conn.awaiting_pong = true;
        conn.ping_due = Instant::now() + keep_alive;
        self.flush().await
    }

    /// Writes the buffer out, within a keep-alive interval (a broker that takes nothing for that long is gone).
    async fn flush(&mut self) -> Result<(), String> {
        let keep_alive = self.options.keep_alive;
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        if conn.write.is_empty() {
            return Ok(());
        }
        let written = tokio::time::timeout(keep_alive, async {
            conn.io.write_all(&conn.write).await?;
            conn.io.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the broker took nothing for a keep-alive interval".into()),
        }
        conn.write.clear();
        // A burst of big previews leaves a big buffer: give it back.
        if conn.write.capacity() > 4 * WRITE_CHUNK {
            conn.write = BytesMut::with_capacity(WRITE_CHUNK);
        }
        Ok(())
    }
}

/// TCP (no Nagle delay: events are small and latency matters), TLS when configured, `CONNECT`, `CONNACK`.
async fn connect(options: &Options) -> Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect((options.host.as_str(), options.port)).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let io: Box<dyn Io> = match &options.tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(options.host.clone()).map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await;
            Box::new(tls.map_err(|e| e.to_string())?)
        }
        None => Box::new(tcp),
    };
    let mut conn = Conn {
        io,
        read: BytesMut::with_capacity(READ_ROOM),
        write: BytesMut::with_capacity(WRITE_CHUNK),
        ping_due: Instant::now() + options.keep_alive,
        awaiting_pong: false,
        inflight: 0,
        receive_max: super::WINDOW as u16,
    };
    codec::connect(&mut conn.write, options)?;
    conn.io.write_all(&conn.write).await.map_err(|e| e.to_string())?;
    conn.io.flush().await.map_err(|e| e.to_string())?;
    conn.write.clear();
    loop {
        if let Some(packet) = codec::decode(&mut conn.read, options.v5, options.max_packet_bytes)? {
            match packet {
                codec::Incoming::ConnAck { receive_max } => {
                    conn.receive_max = receive_max.unwrap_or(u16::MAX).clamp(1, super::WINDOW as u16);
                    return Ok(conn);
                }
                codec::Incoming::Disconnect => return Err("the broker refused the connection".into()),
                _ => continue,
            }
        }
        match conn.io.read_buf(&mut conn.read).await {
            Ok(0) => return Err("the broker closed the connection before CONNACK".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Writes one `PUBLISH` (MQTT 3.1.1 or 5, with v5's message expiry, response topic and correlation data).
/// The topic was checked by the publisher; its length fits the two bytes that carry it.
pub(super) fn encode_publish(buf: &mut BytesMut, v5: bool, topic: &str, payload: &[u8], extras: &Extras, pkid: u16) {
    let props = match v5 {
        true => {
            extras.expiry.map_or(0, |_| 5)
                + extras.response_topic.as_ref().map_or(0, |t| 3 + t.len())
                + extras.correlation.as_ref().map_or(0, |c| 3 + c.len())
        }
        false => 0,
    };
    let qos = u8::from(extras.qos > 0);
    let remaining =
        2 + topic.len() + if qos > 0 { 2 } else { 0 } + if v5 { varint_len(props) + props } else { 0 } + payload.len();
    buf.reserve(1 + varint_len(remaining) + remaining);
    buf.put_u8(0x30 | (qos << 1) | u8::from(extras.retain));
    put_varint(buf, remaining);
    put_str(buf, topic.as_bytes());
    if qos > 0 {
        buf.put_u16(pkid);
    }
    if v5 {
        put_varint(buf, props);
        if let Some(expiry) = extras.expiry {
            buf.put_u8(0x02);
            buf.put_u32(expiry);
        }
        if let Some(topic) = &extras.response_topic {
            buf.put_u8(0x08);
            put_str(buf, topic.as_bytes());
        }
        if let Some(data) = &extras.correlation {
            buf.put_u8(0x09);
            put_str(buf, data);
        }
    }
    buf.put_slice(payload);
}

/// A two-byte length and the bytes (at most 65,535 of them: the publisher bounds topics, the protocol
/// bounds correlation data).
fn put_str(buf: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len().min(usize::from(u16::MAX));
    buf.put_u16(len as u16);
    buf.put_slice(&bytes[..len]);
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

/// Every packet but `PUBLISH`, with rumqttc's types, for either protocol version.
mod codec {
    use bytes::{Bytes, BytesMut};
    use rumqttc::mqttbytes::v4;
    use rumqttc::v5::mqttbytes::v5;

    use super::Options;
    use crate::bus::Reply;

    /// A packet from the broker, as far as the bridge cares.
    pub(super) enum Incoming {
        /// On v5, the most unacknowledged QoS-1 publishes the broker takes.
        ConnAck {
            receive_max: Option<u16>,
        },
        /// `refused`: the broker's reason for not taking the message (v5), if it did not.
        PubAck {
            pkid: u16,
            refused: Option<&'static str>,
        },
        /// `pkid` is 0 for QoS 0.
        Publish {
            topic: Bytes,
            payload: Bytes,
            retain: bool,
            pkid: u16,
            reply: Option<Reply>,
        },
        PingResp,
        Disconnect,
        Other,
    }

    /// The next complete packet in `buf` (taken out of it), `None` while it is incomplete. A refused
    /// `CONNACK` is an error.
    pub(super) fn decode(buf: &mut BytesMut, v5: bool, max: usize) -> Result<Option<Incoming>, String> {
        if v5 {
            let packet = match v5::Packet::read(buf, Some(u32::try_from(max).unwrap_or(u32::MAX))) {
                Ok(packet) => packet,
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            Ok(Some(match packet {
                v5::Packet::ConnAck(ack) if ack.code == v5::ConnectReturnCode::Success => {
                    Incoming::ConnAck { receive_max: ack.properties.and_then(|p| p.receive_max) }
                }
                v5::Packet::ConnAck(ack) => return Err(format!("the broker refused the connection: {:?}", ack.code)),
                v5::Packet::PubAck(ack) => Incoming::PubAck { pkid: ack.pkid, refused: refusal(ack.reason) },
                v5::Packet::Publish(p) => {
                    let properties = p.properties.unwrap_or_default();
                    let reply = properties
                        .response_topic
                        .filter(|t| !t.is_empty())
                        .map(|to| Reply { to, correlation: properties.correlation_data });
                    let pkid = if p.qos == rumqttc::v5::mqttbytes::QoS::AtMostOnce { 0 } else { p.pkid };
                    Incoming::Publish { topic: p.topic, payload: p.payload, retain: p.retain, pkid, reply }
                }
                v5::Packet::PingResp(_) => Incoming::PingResp,
                v5::Packet::Disconnect(_) => Incoming::Disconnect,
                _ => Incoming::Other,
            }))
        } else {
            let packet = match v4::Packet::read(buf, max) {
                Ok(packet) => packet,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            Ok(Some(match packet {
                v4::Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => {
                    Incoming::ConnAck { receive_max: None }
                }
                v4::Packet::ConnAck(ack) => return Err(format!("the broker refused the connection: {:?}", ack.code)),
                v4::Packet::PubAck(ack) => Incoming::PubAck { pkid: ack.pkid, refused: None },
                v4::Packet::Publish(p) => {
                    let pkid = if p.qos == rumqttc::mqttbytes::QoS::AtMostOnce { 0 } else { p.pkid };
                    let topic = Bytes::from(p.topic.into_bytes());
                    Incoming::Publish { topic, payload: p.payload, retain: p.retain, pkid, reply: None }
                }
                v4::Packet::PingResp => Incoming::PingResp,
                v4::Packet::Disconnect => Incoming::Disconnect,
                _ => Incoming::Other,
            }))
        }
    }

    /// Why a v5 broker did not take a publish (`None`: it did, or had no subscriber for it), as a metric label.
    fn refusal(reason: v5::PubAckReason) -> Option<&'static str> {
        match reason {
            v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers => None,
            v5::PubAckReason::NotAuthorized => Some("not_authorized"),
            v5::PubAckReason::QuotaExceeded => Some("quota_exceeded"),
            v5::PubAckReason::TopicNameInvalid => Some("invalid_topic"),
            v5::PubAckReason::PayloadFormatInvalid => Some("payload_format"),
            _ => Some("broker_refused"),
        }
    }

    /// `CONNECT`: a clean session, the keep-alive, the last will, the credentials; on v5 the largest packet
    /// the bridge takes.
    pub(super) fn connect(buf: &mut BytesMut, o: &Options) -> Result<(), String> {
        let keep_alive = o.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16;
        let written = if o.v5 {
            let properties = v5::ConnectProperties {
                max_packet_size: Some(u32::try_from(o.max_packet_bytes).unwrap_or(u32::MAX)),
                ..v5::ConnectProperties::new()
            };
            let connect = v5::Connect {
                keep_alive,
                client_id: o.client_id.clone(),
                clean_start: true,
                properties: Some(properties),
            };
            let will =
                v5::LastWill::new(&o.will_topic, "offline", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, true, None);
            let login = o.login.as_ref().map(|(u, p)| v5::Login::new(u, p));
            v5::Packet::Connect(connect, Some(will), login).write(buf, None).map_err(|e| e.to_string())
        } else {
            let mut connect = v4::Connect::new(o.client_id.clone());
            connect.keep_alive = keep_alive;
            connect.clean_session = true;
            connect.last_will =
                Some(v4::LastWill::new(&o.will_topic, "offline", rumqttc::mqttbytes::QoS::AtLeastOnce, true));
            connect.login = o.login.as_ref().map(|(u, p)| v4::Login::new(u, p));
            v4::Packet::Connect(connect).write(buf, usize::MAX).map_err(|e| e.to_string())
        };
        written.map(|_| ())
    }

    pub(super) fn subscribe(buf: &mut BytesMut, v5: bool, pkid: u16, filter: String) -> Result<(), String> {
        let written = if v5 {
            let mut subscribe =
                v5::Subscribe::new(v5::Filter::new(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce), None);
            subscribe.pkid = pkid;
            v5::Packet::Subscribe(subscribe).write(buf, None)
        } else {
            let mut subscribe = v4::Subscribe::new(filter, rumqttc::mqttbytes::QoS::AtLeastOnce);
            subscribe.pkid = pkid;
            return v4::Packet::Subscribe(subscribe).write(buf, usize::MAX).map(|_| ()).map_err(|e| e.to_string());
        };
        written.map(|_| ()).map_err(|e| e.to_string())
    }

    pub(super) fn puback(buf: &mut BytesMut, v5: bool, pkid: u16) -> Result<(), String> {
        let written = match v5 {
            true => v5::Packet::PubAck(v5::PubAck::new(pkid, None)).write(buf, None),
            false => {
                return v4::Packet::PubAck(v4::PubAck::new(pkid))
                    .write(buf, usize::MAX)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        written.map(|_| ()).map_err(|e| e.to_string())
    }

    pub(super) fn pingreq(buf: &mut BytesMut, v5: bool) -> Result<(), String> {
        let written = match v5 {
            true => v5::Packet::PingReq(v5::PingReq).write(buf, None),
            false => return v4::Packet::PingReq.write(buf, usize::MAX).map(|_| ()).map_err(|e| e.to_string()),
        };
        written.map(|_| ()).map_err(|e| e.to_string())
    }

    pub(super) fn disconnect(buf: &mut BytesMut, v5: bool) -> Result<(), String> {
        let written = match v5 {
            true => {
                let disconnect = v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection);
                v5::Packet::Disconnect(disconnect).write(buf, None)
            }
            false => return v4::Packet::Disconnect.write(buf, usize::MAX).map(|_| ()).map_err(|e| e.to_string()),
        };
        written.map(|_| ()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extras(qos: u8, retain: bool) -> Extras {
        Extras { qos, retain, correlation: None, expiry: None, response_topic: None }
    }

    #[test]
    fn v5_publishes_decode_as_rumqttc_reads_them() {
        use rumqttc::v5::mqttbytes::v5::Packet;
        let mut buf = BytesMut::new();
        let full = Extras {
            qos: 1,
            retain: true,
            correlation: Some(Bytes::from_static(b"\x00corr")),
            expiry: Some(600),
            response_topic: Some("reply/here".into()),
        };
        encode_publish(&mut buf, true, "comfyui/local/prompt/p1/result", b"{\"ok\":true}", &full, 7);
        encode_publish(&mut buf, true, "a/b", &vec![b'x'; 300], &extras(0, false), 0);
        let Ok(Packet::Publish(p)) = Packet::read(&mut buf, None) else { panic!("not a publish") };
        assert_eq!(
            (&p.topic[..], &p.payload[..], p.pkid, p.retain),
            (&b"comfyui/local/prompt/p1/result"[..], &b"{\"ok\":true}"[..], 7, true)
        );
        assert_eq!(p.qos, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
        let props = p.properties.expect("properties");
        assert_eq!(props.message_expiry_interval, Some(600));
        assert_eq!(props.response_topic.as_deref(), Some("reply/here"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"\x00corr"[..]));
        let Ok(Packet::Publish(p)) = Packet::read(&mut buf, None) else { panic!("not a publish") };
        assert_eq!((&p.topic[..], p.payload.len(), p.retain), (&b"a/b"[..], 300, false));
        assert_eq!(p.qos, rumqttc::v5::mqttbytes::QoS::AtMostOnce);
        assert!(p.properties.is_none());
        assert!(buf.is_empty());
    }

    #[test]
    fn v311_publishes_decode_as_rumqttc_reads_them() {
        use rumqttc::mqttbytes::v4::Packet;
        let mut buf = BytesMut::new();
        // v5 properties are not part of 3.1.1: left out.
        let with_props = Extras { expiry: Some(60), response_topic: Some("r".into()), ..extras(1, true) };
        encode_publish(&mut buf, false, "t/1", b"one", &with_props, 65_535);
        encode_publish(&mut buf, false, "t/2", &vec![0u8; 20_000], &extras(0, false), 0);
        let Ok(Packet::Publish(p)) = Packet::read(&mut buf, usize::MAX) else { panic!("not a publish") };
        assert_eq!((p.topic.as_str(), &p.payload[..], p.pkid, p.retain), ("t/1", &b"one"[..], 65_535, true));
        let Ok(Packet::Publish(p)) = Packet::read(&mut buf, usize::MAX) else { panic!("not a publish") };
        assert_eq!((p.topic.as_str(), p.payload.len(), p.retain), ("t/2", 20_000, false));
        assert_eq!(p.qos, rumqttc::mqttbytes::QoS::AtMostOnce);
        assert!(buf.is_empty());
    }

    #[test]
    fn remaining_lengths_take_one_to_four_bytes() {
        for n in [0usize, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, n);
            assert_eq!(buf.len(), varint_len(n), "{n}");
            let (mut value, mut shift) = (0usize, 0);
            for b in &buf[..] {
                value |= usize::from(b & 0x7f) << shift;
                shift += 7;
            }
            assert_eq!(value, n);
        }
    }

    #[test]
    fn an_incomplete_packet_waits_for_more_bytes() {
        let mut whole = BytesMut::new();
        encode_publish(&mut whole, true, "a/b", b"payload", &extras(1, false), 3);
        let mut part = BytesMut::from(&whole[..whole.len() - 2]);
        assert!(matches!(codec::decode(&mut part, true, 1 << 20), Ok(None)));
        part.extend_from_slice(&whole[whole.len() - 2..]);
        let Ok(Some(codec::Incoming::Publish { pkid, payload, .. })) = codec::decode(&mut part, true, 1 << 20) else {
            panic!("a whole publish")
        };
        assert_eq!((pkid, &payload[..]), (3, &b"payload"[..]));
    }
}
