//! The NATS side: one publisher task that owns the outbox and the client handle.
//!
//! Core NATS has no acknowledgements, and a publish written just before the server dies is lost. So after a
//! batch that holds lifecycle messages the publisher makes one request to a subject nobody serves: the
//! server's "no responders" answer proves it processed everything published before it on this connection.
//! A batch that is not confirmed goes back to the front of the outbox (a subscriber may then see a
//! duplicate, with the same `seq`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{client::RequestErrorKind, ConnectOptions, Event, HeaderMap};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument as _};

use super::{topics, Bus, Class, Inquiry, InquiryKind, Outbound, Outbox, Reply, Route, HIGH_WATER};
use crate::commands::inbox::Inbox;
use crate::config::Settings;
use crate::health::{Health, Part};
use crate::telemetry;

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
    settings: &Settings,
    outbound_rx: mpsc::Receiver<Arc<Outbound>>,
    requests: Option<Inbox>,
    health: Arc<Health>,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), NatsError> {
    let cfg = &settings.nats;
    let (event_tx, event_rx) = mpsc::channel(16);
    let mut options = ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .name(format!("comfy-bridge-{}", settings.bridge.instance))
        .event_callback(move |event| {
            let event_tx = event_tx.clone();
            async move {
                let _ = event_tx.try_send(event);
            }
        });
    if !cfg.credentials_file.is_empty() {
        options = options
            .credentials_file(&cfg.credentials_file)
            .await
            .map_err(|source| NatsError::Credentials { path: cfg.credentials_file.clone(), source })?;
    }
    if let Some(token) = &cfg.token {
        options = options.token(token.expose().to_string());
    }
    if let Some(seed) = &cfg.nkey_seed {
        options = options.nkey(seed.expose().to_string());
    }
    if !cfg.ca_file.is_empty() {
        options = options.add_root_certificates(cfg.ca_file.clone().into());
    }
    if !cfg.client_cert_file.is_empty() || !cfg.client_key_file.is_empty() {
        options =
            options.add_client_certificate(cfg.client_cert_file.clone().into(), cfg.client_key_file.clone().into());
    }
    if cfg.url.split(',').any(|u| u.trim().starts_with("tls://")) {
        options = options.require_tls(true);
    }
    if !cfg.user.is_empty() {
        options = options.user_and_password(
            cfg.user.clone(),
            cfg.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default(),
        );
    }
    let client = options.connect(cfg.url.as_str()).await?;
    let span = tracing::info_span!("nats", url = %cfg.url);
    if let Some(tx) = requests {
        let subject = Route::fixed(&settings.bridge.instance, &[topics::REQUEST]).nats_subject(&cfg.subject_prefix);
        tasks.spawn(intake(client.clone(), subject, tx, shutdown).instrument(span.clone()));
    }
    let publisher = Publisher {
        client,
        prefix: cfg.subject_prefix.clone(),
        outbox: Outbox::new(Bus::Nats, settings.bridge.outbox_capacity),
        timeout: Duration::from_millis(cfg.publish_timeout_ms.max(10)),
        availability: Route::fixed(&settings.bridge.instance, &[topics::BRIDGE, topics::AVAILABILITY]),
        retained: HashMap::new(),
        grace: Duration::from_millis(settings.bridge.shutdown_grace_ms),
        health,
    };
    tasks.spawn(publisher.run(event_rx, outbound_rx).instrument(span));
    Ok(())
}

/// Hands every message on the request subjects to `tx` until `shutdown`.
async fn intake(client: async_nats::Client, base: String, tx: Inbox, shutdown: CancellationToken) {
    let mut subscriber = match client.subscribe(format!("{base}.>")).await {
        Ok(subscriber) => subscriber,
        Err(e) => {
            warn!(error = %e, "cannot subscribe to the request subjects");
            return;
        }
    };
    let prefix = format!("{base}.");
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = subscriber.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let Some(path) = msg.subject.strip_prefix(&prefix) else { continue };
        let reply = msg.reply.map(|to| Reply { to: to.to_string(), correlation: None });
        let path = path.replace('.', "/");
        let inquiry = Inquiry { kind: InquiryKind::Request, bus: Bus::Nats, path, payload: msg.payload, reply };
        // Never waits: what does not fit is answered `busy` or counted.
        tx.offer(inquiry);
    }
    let _ = subscriber.unsubscribe().await;
    debug!("nats request intake stopped");
}

struct Publisher {
    client: async_nats::Client,
    prefix: String,
    outbox: Outbox,
    timeout: Duration,
    availability: Route,
    /// Latest "retained" message per route, republished after every reconnect so a late or restarted
    /// subscriber that asks can catch up (NATS core keeps nothing).
    retained: HashMap<Route, Arc<Outbound>>,
    grace: Duration,
    health: Arc<Health>,
}

impl Publisher {
    async fn run(mut self, mut event_rx: mpsc::Receiver<Event>, mut outbound_rx: mpsc::Receiver<Arc<Outbound>>) {
        let mut retry = tokio::time::interval(Duration::from_millis(250));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if self.connected() {
            self.on_connected();
        }
        loop {
            tokio::select! {
                biased;
                Some(event) = event_rx.recv() => self.on_event(event),
                msg = outbound_rx.recv(), if self.accepting() => match msg {
                    Some(msg) => self.outbox.push(msg),
                    None => break,
                },
                _ = retry.tick(), if !self.outbox.is_empty() => {}
            }
            // Take whatever else is already waiting, so batches form under load.
            while self.accepting() {
                let Ok(msg) = outbound_rx.try_recv() else { break };
                self.outbox.push(msg);
            }
            self.flush_outbox().await;
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        while !self.outbox.is_empty() && tokio::time::Instant::now() < deadline {
            self.flush_outbox().await;
            if !self.outbox.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if !self.outbox.is_empty() {
            warn!(left = self.outbox.len(), "nats drain timed out");
        }
        self.outbox.push(Outbound::lifecycle(self.availability.clone(), "offline", true));
        self.flush_outbox().await;
        info!("nats publisher stopped");
    }

    /// See [`HIGH_WATER`].
    fn accepting(&self) -> bool {
        !self.connected() || self.outbox.len() < HIGH_WATER
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected => {
                info!("connected to nats");
                self.on_connected();
            }
            Event::Disconnected => {
                warn!("nats connection lost");
                self.health.set(Part::Nats, false);
            }
            other => debug!(event = %other, "nats event"),
        }
    }

    fn on_connected(&mut self) {
        self.health.set(Part::Nats, true);
        let retained: Vec<_> = self.retained.values().cloned().collect();
        self.outbox.requeue_front(retained.into_iter());
        let online = Outbound::lifecycle(self.availability.clone(), "online", true);
        self.outbox.requeue_front(std::iter::once(online));
    }

    /// Publishes batches while connected; an unconfirmed batch goes back to the front of the outbox.
    async fn flush_outbox(&mut self) {
        while self.connected() && !self.outbox.is_empty() {
            let batch: Vec<_> = std::iter::from_fn(|| self.outbox.pop()).take(BATCH).collect();
            let needs_confirmation = batch.iter().any(|m| m.class == Class::Lifecycle);
            let max_payload = self.client.server_info().max_payload;
            let publish_all = async {
                for msg in &batch {
                    if !self.publish(msg, max_payload).await {
                        return false;
                    }
                }
                true
            };
            // One timer for the whole batch: a timer per message costs more than the publish itself.
            let mut ok = tokio::time::timeout(self.timeout, publish_all).await.unwrap_or(false);
            if ok && needs_confirmation {
                ok = self.confirm().await;
            }
            if !ok {
                self.outbox.requeue_front(batch.into_iter());
                return;
            }
            telemetry::published(Bus::Nats, batch.len() as u64);
            for msg in batch.into_iter().filter(|m| m.retain) {
                self.retained.insert(msg.route.clone(), msg);
            }
        }
    }

    /// `false` when the message must be retried; a message the server can never take is dropped instead.
    async fn publish(&self, msg: &Outbound, max_payload: usize) -> bool {
        if max_payload > 0 && msg.payload.len() > max_payload {
            telemetry::dropped(Bus::Nats, "too_large", &msg.route);
            return true;
        }
        let subject = match &msg.reply {
            Some(reply) => reply.to.clone(),
            None => msg.route.nats_subject(&self.prefix),
        };
        let publish = async {
            if msg.headers.is_empty() {
                self.client.publish(subject, msg.payload.clone()).await
            } else {
                let mut headers = HeaderMap::new();
                for (name, value) in &msg.headers {
                    headers.insert(*name, value.as_str());
                }
                self.client.publish_with_headers(subject, headers, msg.payload.clone()).await
            }
        };
        publish.await.is_ok()
    }

    /// One round trip to the server: "no responders" means everything before it was processed.
    async fn confirm(&self) -> bool {
        let subject = format!("_COMFY_BRIDGE.confirm.{}", fastrand::u64(..));
        match tokio::time::timeout(self.timeout, self.client.request(subject, bytes::Bytes::new())).await {
            Ok(Err(e)) => e.kind() == RequestErrorKind::NoResponders,
            Ok(Ok(_)) => true,
            Err(_) => false,
        }
    }
}
