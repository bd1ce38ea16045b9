//! The NATS side: one publisher task that owns the delivery state and the client handle.
//!
//! Core NATS has no acknowledgements, and a publish written just before the server dies is lost. So after a
//! batch that holds lifecycle messages the publisher sends a marker with a fresh random nonce to a private
//! random subject it subscribes to itself: the server handles one connection's messages in order, so when
//! the marker comes back on the connection the batch went out on, everything published before it was
//! processed. A marker that comes back after a reconnect proves nothing about what the old connection was
//! still writing when it died, so the client's connect count must be the same as when the batch began.
//! No other client can hold it up (a
//! subscriber on `>` merely sees the marker too) or fake it (it cannot know the next nonce). A batch that
//! is not confirmed goes back to the front of the outbox (a subscriber may then see a duplicate, with the
//! same `seq`).
//!
//! A client whose connection task is gone (its channel closed) is rebuilt. Requests arrive on a second
//! connection of their own ([`wire`], not async-nats), so nothing a requester sends can make the event
//! stream reconnect, and a subject that is not UTF-8 costs no other request.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{client::PublishErrorKind, ConnectOptions, Event, HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument as _};

use super::delivery::{Confirmation, Delivery, Limits};
use super::{topics, Bus, Common, Inquiry, InquiryKind, Outbound, Reply, Route};
use crate::commands::inbox::Inbox;
use crate::config::NatsSettings;
use crate::health::{Health, Part};
use crate::telemetry;

mod wire;

/// Most messages published between two confirmations.
const BATCH: usize = 256;

/// Why the NATS side could not start.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The credentials file could not be read.
    #[error("cannot read nats.credentials_file `{path}`: {source}")]
    Credentials {
        /// The configured path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The client refused the options (bad URL).
    #[error("cannot connect to nats: {0}")]
    Connect(#[from] async_nats::ConnectError),
}

/// Connects (retrying in the background until the server is there) and spawns the publisher on `tasks`.
/// With `requests`, it also subscribes to `<prefix>.<inst>.request.>` until `shutdown`.
pub async fn spawn(
    cfg: &NatsSettings,
    common: &Common,
    outbound_rx: mpsc::Receiver<Arc<Outbound>>,
    requests: Option<Inbox>,
    health: Arc<Health>,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), NatsError> {
    let (event_tx, event_rx) = mpsc::channel(16);
    let client = connect(cfg, &common.instance, event_tx).await?;
    let span = tracing::info_span!("nats", url = %cfg.url);
    if let Some(tx) = requests {
        // Requests come in on a connection of their own, which reads subjects as bytes: nothing a requester
        // sends can make the event stream reconnect.
        let subjects = Subjects {
            requests: Route::fixed(&common.instance, &[topics::REQUEST]).nats_subject(&cfg.subject_prefix),
            answers: Route::fixed(&common.instance, &[topics::ANSWER]).nats_subject(&cfg.subject_prefix),
        };
        let intake = intake_connection(cfg.clone(), common.clone(), subjects, tx, shutdown);
        tasks.spawn(intake.instrument(span.clone()));
    }
    let limits =
        Limits { count: common.outbox_capacity, bytes: common.outbox_max_bytes, window: BATCH, stall_ticks: u32::MAX };
    let publisher = Publisher {
        client,
        nats: cfg.clone(),
        instance: common.instance.clone(),
        marker: None,
        delivery: Delivery::new(Bus::Nats, Confirmation::Batch, limits, &common.instance),
        subjects: topics::Renderer::new(&cfg.subject_prefix, cfg.max_subject_bytes),
        max_subject_bytes: cfg.max_subject_bytes,
        timeout: Duration::from_millis(cfg.publish_timeout_ms.max(10)),
        grace: common.grace,
        health,
        dead: false,
        publishing: None,
    };
    tasks.spawn(publisher.run(event_rx, outbound_rx).instrument(span));
    Ok(())
}

/// A client for the NATS server(s) of `cfg`, named after `instance`, whose connection events go to
/// `event_tx`; it connects in the background. The client's connection task holds the only sender: the channel
/// closes when that task is gone.
pub(crate) async fn connect(
    cfg: &NatsSettings,
    instance: &str,
    event_tx: mpsc::Sender<Event>,
) -> Result<async_nats::Client, NatsError> {
    let mut options = ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        // Every subject the bridge publishes to passed `topics::check_nats_subject` (no whitespace or control
        // bytes, which is all the client checks), once per route: no second scan per message.
        .skip_subject_validation(true)
        .name(format!("comfy-bridge-{instance}"))
        .event_callback(move |event| {
            let event_tx = event_tx.clone();
            async move {
                let _ = event_tx.try_send(event);
            }
        });
    if let Some(file) = &cfg.credentials_file {
        options = options
            .credentials_file(file)
            .await
            .map_err(|source| NatsError::Credentials { path: file.clone(), source })?;
    }
    if let Some(token) = &cfg.token {
        options = options.token(token.expose().to_string());
    }
    if let Some(seed) = &cfg.nkey_seed {
        options = options.nkey(seed.expose().to_string());
    }
    if let Some(ca_file) = &cfg.ca_file {
        options = options.add_root_certificates(ca_file.into());
    }
    if cfg.client_cert_file.is_some() || cfg.client_key_file.is_some() {
        let (cert, key) = (cfg.client_cert_file.clone().unwrap_or_default(), cfg.client_key_file.clone());
        options = options.add_client_certificate(cert.into(), key.unwrap_or_default().into());
    }
    if cfg.url.split(',').any(|u| u.trim().starts_with("tls://")) {
        options = options.require_tls(true);
    }
    if let Some(user) = &cfg.user {
        options = options
            .user_and_password(user.clone(), cfg.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default());
    }
    // `nats.url` is a comma-separated list; the client parses a single string as one server.
    let servers: Vec<&str> = cfg.url.split(',').map(str::trim).collect();
    Ok(options.connect(servers).await?)
}

/// What the request intake subscribes to: `<base>.request.>` and `<base>.answer.*` (without the wildcards).
#[derive(Debug, Clone)]
struct Subjects {
    requests: String,
    answers: String,
}

/// The request intake's own connection ([`wire`]): hands every message on the request and answer subjects to
/// `tx` until `shutdown`, reconnecting (to the next server of `nats.url`) whenever the connection ends.
async fn intake_connection(
    cfg: NatsSettings,
    common: Common,
    subjects: Subjects,
    tx: Inbox,
    shutdown: CancellationToken,
) {
    let options = match wire::Options::new(&cfg, format!("comfy-bridge-{}", common.instance)) {
        Ok(options) => options,
        Err(e) => return warn!(error = %e, "the nats request intake cannot start"),
    };
    let filters = [format!("{}.>", subjects.requests), format!("{}.*", subjects.answers)];
    let (request_prefix, answer_prefix) = (format!("{}.", subjects.requests), format!("{}.", subjects.answers));
    let mut attempt: u32 = 0;
    // One wait for shutdown for the task's whole life, not one per message.
    let stopped = shutdown.cancelled();
    tokio::pin!(stopped);
    loop {
        let server = attempt as usize % options.servers();
        let session = async {
            let mut subscriber = wire::Subscriber::connect(&options, server, &filters).await.map_err(|e| (false, e))?;
            info!("nats request intake subscribed");
            loop {
                let msg = subscriber.next().await.map_err(|e| (true, e))?;
                take(msg, &request_prefix, &answer_prefix, &tx);
            }
        };
        let (subscribed, error): (bool, String) = tokio::select! {
            _ = &mut stopped => break,
            ended = session => match ended {
                Ok(never) => never,
                Err(ended) => ended,
            },
        };
        if subscribed {
            attempt = 0;
        }
        telemetry::reconnecting("nats_intake", attempt, &error);
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(crate::backoff::delay(attempt, common.reconnect_max_ms)) => {}
        }
        attempt = attempt.saturating_add(1);
    }
    debug!("nats request intake stopped");
}

/// Hands one message over as a request or an answer. A subject that is not UTF-8 is read with replacement
/// characters (the command is then unknown, and answered so); a reply subject that is not UTF-8 cannot be
/// answered, and the message is counted instead.
fn take(msg: wire::Msg, request_prefix: &str, answer_prefix: &str, tx: &Inbox) {
    let subject = String::from_utf8_lossy(&msg.subject);
    let (kind, path) = if let Some(path) = subject.strip_prefix(request_prefix) {
        (InquiryKind::Request, path.replace('.', "/"))
    } else if let Some(ask_id) = subject.strip_prefix(answer_prefix) {
        (InquiryKind::Answer, ask_id.to_string())
    } else {
        return;
    };
    let reply = match msg.reply.map(|to| String::from_utf8(to.to_vec())) {
        None => None,
        Some(Ok(to)) => Some(Reply { to, correlation: None }),
        Some(Err(_)) => return telemetry::request_ignored(Bus::Nats, "reply_not_utf8", &subject),
    };
    let inquiry = Inquiry { kind, bus: Bus::Nats, path, payload: msg.payload, reply };
    // Never waits: what does not fit is answered `busy` or counted.
    tx.offer(inquiry);
}

/// The private subject confirmation markers go to, and the subscription they come back on.
struct Marker {
    subject: String,
    subscriber: async_nats::Subscriber,
}

/// Why a batch was not published.
enum Failure {
    /// Timed out or not confirmed: retry the batch.
    Retry,
    /// The client's connection task is gone: rebuild the client.
    Dead,
}

/// Owns the client handle and the delivery state; does what the client reports and what [`Delivery`] says.
struct Publisher {
    client: async_nats::Client,
    /// `[nats]`, to rebuild the client with.
    nats: NatsSettings,
    /// `bridge.instance`, the client's name.
    instance: String,
    marker: Option<Marker>,
    delivery: Delivery,
    /// Routes under the subject prefix, checked against `max_subject_bytes`.
    subjects: topics::Renderer,
    max_subject_bytes: usize,
    timeout: Duration,
    grace: Duration,
    health: Arc<Health>,
    /// The client is dead: rebuild it before publishing again.
    dead: bool,
    /// The message whose publish is being awaited: taken from the outbox but not yet handed over, so a
    /// batch cut short by its timer puts it back instead of losing it.
    publishing: Option<Arc<Outbound>>,
}

impl Publisher {
    async fn run(mut self, mut event_rx: mpsc::Receiver<Event>, mut outbound_rx: mpsc::Receiver<Arc<Outbound>>) {
        let mut incoming = Vec::with_capacity(super::INTAKE);
        let mut retry = tokio::time::interval(Duration::from_millis(250));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if self.client_connected() {
            self.on_connected();
        }
        loop {
            tokio::select! {
                biased;
                event = event_rx.recv(), if !self.dead => match event {
                    Some(event) => self.on_event(event),
                    None => {
                        // The connection task is gone (it panicked, or closed for good).
                        self.dead = true;
                        self.on_lost();
                    }
                },
                // Everything waiting (up to the room there is) in one call, not one receive per message.
                n = outbound_rx.recv_many(&mut incoming, self.delivery.room().min(super::INTAKE)),
                    if self.delivery.accepting() => match n {
                    0 => break,
                    _ => incoming.drain(..).for_each(|msg| self.delivery.push(msg)),
                },
                _ = retry.tick(), if self.dead || !self.delivery.is_idle() => {}
            }
            // Take whatever else is already waiting, so batches form under load.
            while self.delivery.accepting() {
                let Ok(msg) = outbound_rx.try_recv() else { break };
                self.delivery.push(msg);
            }
            if self.dead {
                if let Some(rx) = self.rebuild().await {
                    event_rx = rx;
                }
            }
            // The client may have connected or dropped without an event (a full event channel).
            if self.client_connected() != self.delivery.is_connected() {
                match self.client_connected() {
                    true => self.on_connected(),
                    false => self.on_lost(),
                }
            }
            self.flush_outbox().await;
        }
        self.shut_down().await;
    }

    /// Input closed: what waits, then `comfyui` and `bridge` `offline`, within the grace period; no wait at
    /// all for a server that is not connected.
    async fn shut_down(&mut self) {
        self.delivery.goodbye();
        let deadline = tokio::time::Instant::now() + self.grace;
        while !self.delivery.is_idle() && self.delivery.is_connected() && tokio::time::Instant::now() < deadline {
            if tokio::time::timeout_at(deadline, self.flush_outbox()).await.is_err() {
                break;
            }
            if !self.delivery.is_idle() {
                let pause = deadline.min(tokio::time::Instant::now() + Duration::from_millis(100));
                tokio::time::sleep_until(pause).await;
            }
        }
        if !self.delivery.is_idle() {
            warn!(left = self.delivery.waiting() + self.delivery.unconfirmed(), "nats drain incomplete");
        }
        info!("nats publisher stopped");
    }

    fn client_connected(&self) -> bool {
        !self.dead && self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected => {
                info!("connected to nats");
                self.on_connected();
            }
            Event::Disconnected => {
                warn!("nats connection lost");
                self.on_lost();
            }
            other => debug!(event = %other, "nats event"),
        }
    }

    fn on_connected(&mut self) {
        if !self.delivery.is_connected() {
            self.delivery.on_connected();
        }
        self.health.set(Part::Nats, self.delivery.is_healthy());
    }

    fn on_lost(&mut self) {
        self.delivery.on_lost();
        self.health.set(Part::Nats, false);
    }

    /// Replaces a client whose connection task is gone; returns the new client's event channel.
    async fn rebuild(&mut self) -> Option<mpsc::Receiver<Event>> {
        warn!("nats client is dead: building a new one");
        let (event_tx, event_rx) = mpsc::channel(16);
        match connect(&self.nats, &self.instance, event_tx).await {
            Ok(client) => {
                self.client = client;
                self.marker = None;
                self.dead = false;
                Some(event_rx)
            }
            Err(e) => {
                warn!(error = %e, "cannot rebuild the nats client");
                None
            }
        }
    }

    /// Publishes batches while connected; an unconfirmed batch goes back to the front of the outbox.
    async fn flush_outbox(&mut self) {
        while self.delivery.is_connected() && !self.delivery.is_idle() {
            // One timer for the whole batch: a timer per message costs more than the publish itself.
            let result = match tokio::time::timeout(self.timeout, self.publish_batch()).await {
                Ok(result) => result,
                Err(_) => Err(Failure::Retry),
            };
            if let Some(msg) = self.publishing.take() {
                // Cut short while the client had it: it goes back behind the unconfirmed ones.
                self.delivery.busy(msg);
            }
            match result {
                Ok(()) => self.delivery.confirm_all(),
                Err(Failure::Retry) => self.delivery.confirm_failed(),
                Err(Failure::Dead) => {
                    self.dead = true;
                    self.on_lost();
                }
            }
            self.health.set(Part::Nats, self.delivery.is_healthy());
            if !self.delivery.is_healthy() {
                return;
            }
        }
    }

    /// Publishes up to a batch and, when it holds lifecycle events, waits for the marker after it.
    async fn publish_batch(&mut self) -> Result<(), Failure> {
        let max_payload = self.client.server_info().max_payload;
        let connects = self.connects();
        while let Some(msg) = self.delivery.next_to_send() {
            let subject = match &msg.reply {
                Some(reply) => topics::check_nats_subject(&reply.to, 0, self.max_subject_bytes)
                    .map(|()| Subject::from(reply.to.as_str())),
                // Written and checked once per route, however many messages share it.
                None => self.subjects.nats(&msg.route),
            };
            let subject = match subject {
                Ok(subject) => subject,
                Err(refusal) => {
                    self.delivery.refused(msg, refusal.reason());
                    continue;
                }
            };
            if max_payload > 0 && msg.payload.len() + header_bytes(&msg) > max_payload {
                self.delivery.refused(msg, "too_large");
                continue;
            }
            // A question asks for its answers on a subject of the bridge's own (`answer.<ask id>`).
            let reply_to = match msg.reply_to.as_ref().map(|route| self.subjects.nats(route)) {
                Some(Ok(reply_to)) => Some(reply_to),
                Some(Err(refusal)) => {
                    self.delivery.refused(msg, refusal.reason());
                    continue;
                }
                None => None,
            };
            self.publishing = Some(msg.clone());
            let payload = msg.payload.clone();
            let published = match (headers(&msg), reply_to) {
                (None, None) => self.client.publish(subject, payload).await,
                (Some(headers), None) => self.client.publish_with_headers(subject, headers, payload).await,
                (None, Some(reply)) => self.client.publish_with_reply(subject, reply, payload).await,
                (Some(headers), Some(reply)) => {
                    self.client.publish_with_reply_and_headers(subject, reply, headers, payload).await
                }
            };
            self.publishing = None;
            match published {
                Ok(()) => self.delivery.sent(msg),
                Err(e) if e.kind() == PublishErrorKind::Send => {
                    self.delivery.busy(msg);
                    return Err(Failure::Dead);
                }
                Err(e) => {
                    debug!(error = %e, "nats refused a publish");
                    self.delivery.refused(msg, "refused");
                }
            }
        }
        if !self.delivery.needs_confirmation() {
            return Ok(());
        }
        self.confirm().await?;
        // The client counts a connection before it sends anything on it: an unchanged count means the
        // marker and the whole batch went out on one connection.
        if self.connects() != connects {
            info!(messages = self.delivery.unconfirmed(), "nats reconnected under a batch: sending it again");
            return Err(Failure::Retry);
        }
        Ok(())
    }

    /// Connections the client has made so far (the first one included).
    fn connects(&self) -> u64 {
        self.client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends a marker to the private subject and waits until it comes back.
    async fn confirm(&mut self) -> Result<(), Failure> {
        if self.marker.is_none() {
            let subject = format!("_COMFY_BRIDGE.confirm.{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            match self.client.subscribe(subject.clone()).await {
                Ok(subscriber) => self.marker = Some(Marker { subject, subscriber }),
                Err(_) => return Err(Failure::Dead),
            }
        }
        let Some(marker) = self.marker.as_mut() else { return Err(Failure::Retry) };
        let nonce = Bytes::copy_from_slice(&fastrand::u64(..).to_be_bytes());
        match self.client.publish(marker.subject.clone(), nonce.clone()).await {
            Ok(()) => {}
            Err(e) if e.kind() == PublishErrorKind::Send => return Err(Failure::Dead),
            Err(_) => return Err(Failure::Retry),
        }
        // Markers of earlier batches that timed out may still arrive first.
        loop {
            match marker.subscriber.next().await {
                Some(m) if m.payload == nonce => return Ok(()),
                Some(_) => continue,
                None => return Err(Failure::Dead),
            }
        }
    }
}

/// Bytes the headers add to a message (what `max_payload` counts besides the payload).
fn header_bytes(msg: &Outbound) -> usize {
    match msg.headers.is_empty() {
        true => 0,
        false => 12 + msg.headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>(),
    }
}

/// The message's headers, each one only when its name is a token and its value has no control characters
/// (no CR/LF that could end the header block and start another header); a refused one is counted.
fn headers(msg: &Outbound) -> Option<HeaderMap> {
    if msg.headers.is_empty() {
        return None;
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &msg.headers {
        if valid_header(name, value) {
            headers.insert(*name, value.as_str());
        } else {
            telemetry::header_refused(Bus::Nats, name, &msg.route);
        }
    }
    Some(headers)
}

/// A header name is printable ASCII without `:`; a value has no control characters.
fn valid_header(name: &str, value: &str) -> bool {
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    name_ok && !value.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_with_control_characters_are_left_out() {
        assert!(valid_header("Comfy-Prompt-Id", "p1"));
        assert!(valid_header("Comfy-Node-Id", "12:5 ünï"));
        assert!(!valid_header("Comfy-Prompt-Id", "p1\r\nNats-Msg-Id: injected"));
        assert!(!valid_header("Comfy-Node-Id", "a\nb"));
        assert!(!valid_header("Comfy-Node-Id", "a\0b"));
        assert!(!valid_header("Bad:Name", "x"));
        assert!(!valid_header("Bad Name", "x"));
        let msg = Outbound {
            route: Route::fixed("local", &["preview"]),
            payload: Bytes::new(),
            qos: 0,
            retain: false,
            class: super::super::Class::Droppable,
            headers: vec![("Content-Type", "image/png".into()), ("Comfy-Prompt-Id", "p\r\nNats-Msg-Id: x".into())],
            reply: None,
            reply_to: None,
        };
        let headers = headers(&msg).expect("some headers");
        assert_eq!(headers.iter().count(), 1);
        assert!(headers.get("Nats-Msg-Id").is_none() && headers.get("Comfy-Prompt-Id").is_none());
    }
}
