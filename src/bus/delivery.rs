//! The delivery core: what both publishers do with a message between the router and the broker, as one
//! sans-IO state machine (rumqttc's `state.rs` is the model). The publishers in [`super::mqtt`] and
//! [`super::nats`] are thin loops that feed it what their client reports and do what it says.
//!
//! The rules:
//! * Messages wait in a bounded [`Outbox`] (count and bytes; progress and previews are dropped first).
//! * While connected, [`Delivery::next_to_send`] hands out the oldest message, at most `window` unconfirmed at a time
//!   (MQTT: QoS-1 messages waiting for their `PubAck`; NATS: the batch waiting for its confirmation).
//! * A message the broker can never take (a refused topic, too large) is that message's failure:
//!   [`Delivery::refused`] drops and counts it. Only a full client channel ([`Delivery::busy`]) is retried.
//! * On a connection `online` goes first, then the last retained message of every topic (a restarted broker
//!   may have kept nothing), then whatever waited. On a loss everything unconfirmed goes back to the front.
//! * While connected and `HIGH_WATER` messages wait, [`Delivery::accepting`] says no: back-pressure.
//! * On shutdown, [`Delivery::goodbye`] queues `comfyui/availability` and `bridge/availability` `offline`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::{topics, Bus, Class, Outbound, Outbox, Route, HIGH_WATER};
use crate::telemetry;

/// Most retained topics remembered for replay on reconnect. The bridge's own retained topics are a fixed
/// handful plus Home Assistant's discovery configs; beyond this a new topic is published but not replayed.
pub const MAX_RETAINED: usize = 256;

/// How a broker confirms what it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// MQTT: each QoS-1 message by its `PubAck`, matched by packet id; QoS-0 messages are done once handed.
    PerMessage,
    /// NATS: every message handed over waits until [`Delivery::confirm_all`] (a round trip after the batch).
    Batch,
}

/// Bounds of one publisher's delivery state.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most messages in the outbox.
    pub count: usize,
    /// Most bytes in the outbox (see [`super::outbox::weight`]).
    pub bytes: usize,
    /// Most messages handed over and not yet confirmed.
    pub window: usize,
    /// After this many [`Delivery::tick`]s with something unconfirmed (or a full client channel) and no
    /// confirmation, the connection reads as stalled.
    pub stall_ticks: u32,
}

/// A message handed to the client and not yet confirmed.
#[derive(Debug)]
struct InFlight {
    msg: Arc<Outbound>,
    /// The MQTT packet id once the client numbered it; 0 before (and always, for NATS).
    pkid: u16,
}

/// One publisher's delivery state. See the module documentation for the rules.
#[derive(Debug)]
pub struct Delivery {
    bus: Bus,
    mode: Confirmation,
    window: usize,
    outbox: Outbox,
    in_flight: VecDeque<InFlight>,
    /// The last confirmed retained message per topic (its reply topic, or its route), replayed in topic order.
    retained: BTreeMap<String, Arc<Outbound>>,
    connected: bool,
    /// The client's channel was full: retry shortly.
    blocked: bool,
    /// A confirmation failed, or none came for `stall_ticks`, while connected: the broker is not taking
    /// messages.
    stalled: bool,
    stall_ticks: u32,
    /// Ticks since the last confirmation while something waited for one.
    quiet_ticks: u32,
    instance: String,
    bridge_availability: Route,
}

impl Delivery {
    /// Disconnected, with an empty outbox, for `instance`'s availability topics.
    pub fn new(bus: Bus, mode: Confirmation, limits: Limits, instance: &str) -> Self {
        Self {
            bus,
            mode,
            window: limits.window.max(1),
            outbox: Outbox::new(bus, limits.count, limits.bytes),
            in_flight: VecDeque::new(),
            retained: BTreeMap::new(),
            connected: false,
            blocked: false,
            stalled: false,
            stall_ticks: limits.stall_ticks.max(1),
            quiet_ticks: 0,
            instance: instance.to_string(),
            bridge_availability: Route::fixed(instance, &[topics::BRIDGE, topics::AVAILABILITY]),
        }
    }

    /// A message from the router.
    pub fn push(&mut self, msg: Arc<Outbound>) {
        self.outbox.push(msg);
    }

    /// Whether to take more messages from the router (see [`HIGH_WATER`]).
    pub fn accepting(&self) -> bool {
        !self.connected || self.outbox.len() < HIGH_WATER
    }

    /// How many more messages to take from the router now: up to [`HIGH_WATER`] waiting while connected,
    /// any number while not (the outbox's own bounds apply). Nonzero exactly when [`Delivery::accepting`].
    pub fn room(&self) -> usize {
        match self.connected {
            true => HIGH_WATER.saturating_sub(self.outbox.len()),
            false => usize::MAX,
        }
    }

    /// Connected to the broker.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Connected and delivering: what `/readyz` reports.
    pub fn is_healthy(&self) -> bool {
        self.connected && !self.stalled
    }

    /// The client's channel was full at the last [`Delivery::busy`]: call [`Delivery::next_to_send`] again shortly.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Nothing waits and nothing is unconfirmed.
    pub fn is_idle(&self) -> bool {
        self.outbox.is_empty() && self.in_flight.is_empty()
    }

    /// Messages waiting in the outbox.
    pub fn waiting(&self) -> usize {
        self.outbox.len()
    }

    /// Bytes waiting in the outbox.
    pub fn waiting_bytes(&self) -> usize {
        self.outbox.bytes()
    }

    /// Messages handed over and not yet confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.in_flight.len()
    }

    /// The broker accepted the connection: `online` first, then the retained state, then what waited.
    pub fn on_connected(&mut self) {
        self.connected = true;
        self.stalled = false;
        self.quiet_ticks = 0;
        self.blocked = false;
        // Anything still in flight belongs to the old connection.
        self.requeue_in_flight();
        let retained: Vec<_> = self.retained.values().cloned().collect();
        self.outbox.requeue_front(retained.into_iter());
        let online = Outbound::lifecycle(self.availability(topics::BRIDGE), "online", true);
        self.outbox.requeue_front(std::iter::once(online));
    }

    /// Queues a fresh `bridge/availability` `online` while connected (MQTT v5 refreshes an expiring one).
    pub fn refresh_online(&mut self) {
        if self.connected {
            self.outbox.push(Outbound::lifecycle(self.availability(topics::BRIDGE), "online", true));
        }
    }

    /// The connection is gone: everything unconfirmed goes back to the front, in order. Returns how many.
    pub fn on_lost(&mut self) -> usize {
        self.connected = false;
        self.blocked = false;
        self.stalled = false;
        self.quiet_ticks = 0;
        self.requeue_in_flight()
    }

    /// The next message to hand to the client, while connected and the window has room.
    pub fn next_to_send(&mut self) -> Option<Arc<Outbound>> {
        let front = self.outbox.front()?;
        let counts = self.mode == Confirmation::Batch || front.qos > 0;
        if !self.connected || (counts && self.in_flight.len() >= self.window) {
            return None;
        }
        self.blocked = false;
        self.outbox.pop()
    }

    /// The client took `msg` (from [`Delivery::next_to_send`]).
    pub fn sent(&mut self, msg: Arc<Outbound>) {
        if self.mode == Confirmation::PerMessage && msg.qos == 0 {
            self.delivered(msg);
        } else {
            self.in_flight.push_back(InFlight { msg, pkid: 0 });
        }
    }

    /// The broker can never take `msg`: it is dropped and counted under `reason`.
    pub fn refused(&mut self, msg: Arc<Outbound>, reason: &'static str) {
        telemetry::dropped(self.bus, reason, &msg.route);
    }

    /// The client's channel is full: `msg` goes back to the front and [`Delivery::is_blocked`] says so.
    pub fn busy(&mut self, msg: Arc<Outbound>) {
        self.outbox.requeue_front(std::iter::once(msg));
        self.blocked = true;
    }

    /// MQTT: the client numbered the oldest un-numbered QoS-1 message `pkid` (it sends them in order).
    pub fn numbered(&mut self, pkid: u16) {
        if let Some(f) = self.in_flight.iter_mut().find(|f| f.pkid == 0) {
            f.pkid = pkid;
        }
    }

    /// MQTT: the broker acknowledged `pkid`.
    pub fn acked(&mut self, pkid: u16) {
        if pkid == 0 {
            return;
        }
        if let Some(i) = self.in_flight.iter().position(|f| f.pkid == pkid) {
            if let Some(f) = self.in_flight.remove(i) {
                self.delivered(f.msg);
            }
        }
    }

    /// MQTT: the broker answered `pkid` with a refusal (a v5 reason code such as `not_authorized`): that
    /// message's failure, dropped and counted under `reason` like one refused before it went out, and never
    /// replayed. The broker answering is still progress.
    pub fn rejected(&mut self, pkid: u16, reason: &'static str) {
        if pkid == 0 {
            return;
        }
        if let Some(i) = self.in_flight.iter().position(|f| f.pkid == pkid) {
            if let Some(f) = self.in_flight.remove(i) {
                self.quiet_ticks = 0;
                self.stalled = false;
                telemetry::dropped(self.bus, reason, &f.msg.route);
            }
        }
    }

    /// NATS: whether the messages in flight need a round trip (any lifecycle event among them); a batch
    /// of progress only is confirmed at once.
    pub fn needs_confirmation(&self) -> bool {
        self.in_flight.iter().any(|f| f.msg.class == Class::Lifecycle)
    }

    /// NATS: the server processed everything handed over so far.
    pub fn confirm_all(&mut self) {
        self.stalled = false;
        // One count for the batch: the counter is shared by every task.
        telemetry::published(self.bus, self.in_flight.len() as u64);
        while let Some(f) = self.in_flight.pop_front() {
            self.remember(f.msg);
        }
    }

    /// NATS: the round trip after a batch did not come back in time. The batch goes back to the front (a
    /// subscriber may see a duplicate) and the bus reads as not ready until a confirmation succeeds.
    pub fn confirm_failed(&mut self) {
        self.stalled = true;
        self.requeue_in_flight();
    }

    /// A periodic call (the publisher's one watchdog timer): a connection that had something unconfirmed,
    /// or a full client channel, and no confirmation for `stall_ticks` ticks reads as stalled (not ready)
    /// until the next confirmation.
    pub fn tick(&mut self) {
        if self.connected && (self.blocked || !self.in_flight.is_empty()) {
            self.quiet_ticks = self.quiet_ticks.saturating_add(1);
            if self.quiet_ticks >= self.stall_ticks {
                self.stalled = true;
            }
        } else {
            self.quiet_ticks = 0;
        }
    }

    /// Shutdown: `comfyui/availability` and `bridge/availability` `offline`, retained, after what waits.
    pub fn goodbye(&mut self) {
        for part in [topics::COMFYUI, topics::BRIDGE] {
            self.outbox.push(Outbound::lifecycle(self.availability(part), "offline", true));
        }
    }

    fn availability(&self, part: &str) -> Route {
        Route::fixed(&self.instance, &[part, topics::AVAILABILITY])
    }

    fn requeue_in_flight(&mut self) -> usize {
        let n = self.in_flight.len();
        self.outbox.requeue_front(self.in_flight.drain(..).map(|f| f.msg).collect::<Vec<_>>().into_iter());
        n
    }

    fn delivered(&mut self, msg: Arc<Outbound>) {
        telemetry::published(self.bus, 1);
        self.remember(msg);
    }

    /// A confirmed message: progress, and the latest of its topic when retained.
    fn remember(&mut self, msg: Arc<Outbound>) {
        self.quiet_ticks = 0;
        self.stalled = false;
        // `online` is queued afresh on every connection; `offline` only ever goes out last.
        if !msg.retain || (msg.reply.is_none() && msg.route == self.bridge_availability) {
            return;
        }
        let key = msg.reply.as_ref().map_or(msg.route.as_str(), |r| r.to.as_str());
        if let Some(old) = self.retained.get_mut(key) {
            *old = msg;
        } else if self.retained.len() < MAX_RETAINED {
            self.retained.insert(key.to_string(), msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Reply;
    use bytes::Bytes;

    fn limits(window: usize) -> Limits {
        Limits { count: 100, bytes: 1 << 20, window, stall_ticks: 3 }
    }

    fn msg(name: &str, qos: u8, retain: bool, class: Class) -> Arc<Outbound> {
        Arc::new(Outbound {
            route: Route::fixed("local", &[name]),
            payload: Bytes::from_static(b"{}"),
            qos,
            retain,
            class,
            headers: Vec::new(),
            reply: None,
            reply_to: None,
        })
    }

    fn event(name: &str) -> Arc<Outbound> {
        msg(name, 1, false, Class::Lifecycle)
    }

    fn tick(name: &str) -> Arc<Outbound> {
        msg(name, 0, false, Class::Droppable)
    }

    fn name(m: &Outbound) -> String {
        let levels = m.route.levels();
        match (levels.get(1), levels.get(2), m.payload.as_ref()) {
            (Some(part), Some(&"availability"), p) => format!("{part}:{}", String::from_utf8_lossy(p)),
            _ => m.route.last().to_string(),
        }
    }

    /// Hands over everything the window allows, as a client with room would; returns the names.
    fn send_all(d: &mut Delivery) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(m) = d.next_to_send() {
            out.push(name(&m));
            d.sent(m);
        }
        out
    }

    #[test]
    fn nothing_goes_out_before_connect_and_online_goes_first() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits(10), "local");
        d.push(event("a"));
        assert!(d.next_to_send().is_none());
        d.on_connected();
        assert_eq!(send_all(&mut d), ["bridge:online", "a"]);
    }

    #[test]
    fn qos1_waits_for_its_ack_by_packet_id_and_the_window_holds_back_the_rest() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits(2), "local");
        d.on_connected();
        for n in ["a", "b", "c"] {
            d.push(event(n));
        }
        assert_eq!(send_all(&mut d), ["bridge:online", "a"]);
        d.numbered(7);
        d.numbered(8);
        d.acked(8);
        assert_eq!(send_all(&mut d), ["b"], "one slot freed");
        d.acked(99);
        assert_eq!(d.unconfirmed(), 2, "an unknown ack changes nothing");
        d.numbered(9);
        d.acked(7);
        d.acked(9);
        assert_eq!(send_all(&mut d), ["c"]);
    }

    #[test]
    fn qos0_is_done_once_handed_over() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits(1), "local");
        d.on_connected();
        d.push(tick("t1"));
        d.push(tick("t2"));
        assert_eq!(send_all(&mut d), ["bridge:online", "t1", "t2"], "QoS 0 takes no room in the window");
        assert_eq!(d.unconfirmed(), 1);
        d.numbered(1);
        d.acked(1);
        assert!(d.is_idle());
    }

    #[test]
    fn a_refused_message_is_dropped_and_the_next_one_goes() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits(10), "local");
        d.on_connected();
        let _ = send_all(&mut d);
        d.push(event("bad-reply"));
        d.push(event("good"));
        let bad = d.next_to_send().expect("bad");
        d.refused(bad, "invalid_topic");
        assert!(!d.is_blocked());
        assert_eq!(send_all(&mut d), ["good"]);
        assert_eq!(d.waiting(), 0);
    }

    #[test]
    fn a_message_the_broker_refuses_after_sending_is_dropped_and_never_replayed() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits(10), "local");
        d.on_connected();
        let _ = send_all(&mut d);
        d.numbered(1);
        d.acked(1);
        d.push(msg("denied", 1, true, Class::Lifecycle));
        d.push(msg("kept", 1, true, Class::Lifecycle));
        assert_eq!(send_all(&mut d), ["denied", "kept"]);
        d.numbered(2);
        d.numbered(3);
        d.rejected(2, "not_authorized");
        d.acked(3);
        assert!(d.is_idle(), "nothing waits for the refused one");
        d.on_lost();
        d.on_connected();
        assert_eq!(send_all(&mut d), ["bridge:online", "kept"], "only what the broker took is replayed");
    }

    #[test]
    fn a_full_client_channel_is_the_only_retry() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits(10), "local");
        d.on_connected();
        let _ = send_all(&mut d);
        d.push(event("a"));
        let a = d.next_to_send().expect("a");
        d.busy(a);
        assert!(d.is_blocked());
        assert_eq!(send_all(&mut d), ["a"]);
        assert!(!d.is_blocked());
    }

    #[test]
    fn loss_requeues_unconfirmed_in_order_and_reconnect_replays_online_retained_then_them() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits(10), "local");
        d.on_connected();
        d.push(msg("status", 1, true, Class::Lifecycle));
        assert_eq!(send_all(&mut d), ["bridge:online", "status"]);
        for pkid in 1..=2 {
            d.numbered(pkid);
            d.acked(pkid);
        }
        d.push(event("a"));
        d.push(event("b"));
        assert_eq!(send_all(&mut d), ["a", "b"]);
        d.numbered(3);
        assert_eq!(d.on_lost(), 2);
        assert!(!d.is_healthy());
        d.push(event("c"));
        assert!(d.next_to_send().is_none(), "nothing goes out while disconnected");
        d.on_connected();
        assert_eq!(send_all(&mut d), ["bridge:online", "status", "a", "b", "c"]);
        // The old connection's packet ids mean nothing now.
        d.acked(3);
        assert_eq!(d.unconfirmed(), 5);
    }

    #[test]
    fn retained_replay_keeps_the_latest_confirmed_per_topic_and_is_bounded() {
        let mut d = Delivery::new(Bus::Nats, Confirmation::Batch, Limits { count: 1000, ..limits(1000) }, "local");
        d.on_connected();
        let status = |v: &'static str| Outbound::lifecycle(Route::fixed("local", &["status"]), v, true);
        d.push(status("v1"));
        d.push(status("v2"));
        let _ = send_all(&mut d);
        d.confirm_all();
        for i in 0..MAX_RETAINED + 10 {
            let mut m = msg("cfg", 1, true, Class::Lifecycle);
            if let Some(m) = Arc::get_mut(&mut m) {
                m.reply = Some(Reply { to: format!("homeassistant/x{i}/config"), correlation: None });
            }
            d.push(m);
        }
        let _ = send_all(&mut d);
        d.confirm_all();
        d.on_lost();
        d.on_connected();
        let replay: Vec<_> = std::iter::from_fn(|| d.next_to_send()).collect();
        assert_eq!(replay.len(), 1 + MAX_RETAINED, "online plus the bounded retained set");
        let statuses: Vec<_> = replay.iter().filter(|m| m.route.last() == "status").collect();
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0].payload.as_ref(), b"v2");
    }

    #[test]
    fn nats_batches_wait_for_one_confirmation_and_failures_requeue_and_read_as_not_ready() {
        let mut d = Delivery::new(Bus::Nats, Confirmation::Batch, limits(3), "local");
        d.on_connected();
        for n in ["a", "b", "c", "d"] {
            d.push(event(n));
        }
        assert_eq!(send_all(&mut d), ["bridge:online", "a", "b"], "a batch is at most the window");
        assert!(d.needs_confirmation());
        d.confirm_failed();
        assert!(d.is_connected() && !d.is_healthy());
        assert_eq!(send_all(&mut d), ["bridge:online", "a", "b"]);
        d.confirm_all();
        assert!(d.is_healthy());
        assert_eq!(send_all(&mut d), ["c", "d"]);
        d.confirm_all();
        assert!(d.is_idle());
        d.push(tick("t"));
        let _ = send_all(&mut d);
        assert!(!d.needs_confirmation(), "progress alone needs no round trip");
    }

    #[test]
    fn high_water_applies_only_while_connected() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, Limits { count: 5000, ..limits(1) }, "l");
        for i in 0..HIGH_WATER {
            d.push(event(&i.to_string()));
        }
        assert!(d.accepting(), "while the broker is away the outbox takes everything");
        assert!(d.room() > HIGH_WATER);
        d.on_connected();
        assert!(!d.accepting());
        assert_eq!(d.room(), 0, "nothing more taken at the high-water mark");
        let _ = d.next_to_send();
        let _ = d.next_to_send();
        assert!(d.accepting());
        assert_eq!(d.room(), 1, "the room is what is left below the mark ({} wait)", d.waiting());
    }

    #[test]
    fn outbox_bytes_stay_bounded_with_the_broker_away() {
        const MB: usize = 1 << 20;
        let mut d = Delivery::new(
            Bus::Mqtt,
            Confirmation::PerMessage,
            Limits { count: 10_000, bytes: 64 * MB, window: 100, stall_ticks: 3 },
            "l",
        );
        for i in 0..40 {
            let mut m = event(&i.to_string());
            if let Some(m) = Arc::get_mut(&mut m) {
                m.payload = Bytes::from(vec![b'x'; 15 * MB]);
            }
            d.push(m);
            assert!(d.waiting_bytes() <= 64 * MB);
        }
        assert_eq!(d.waiting(), 4);
    }

    #[test]
    fn no_ack_for_stall_ticks_reads_as_not_ready_until_one_comes() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits(10), "local");
        d.on_connected();
        let _ = send_all(&mut d);
        d.numbered(1);
        for _ in 0..2 {
            d.tick();
        }
        assert!(d.is_healthy(), "two quiet ticks are not a stall");
        d.tick();
        assert!(!d.is_healthy(), "three are");
        d.acked(1);
        assert!(d.is_healthy());
        for _ in 0..10 {
            d.tick();
        }
        assert!(d.is_healthy(), "nothing waiting is no stall");
        d.push(event("a"));
        let a = d.next_to_send().expect("a");
        d.busy(a);
        for _ in 0..3 {
            d.tick();
        }
        assert!(!d.is_healthy(), "a client channel full for three ticks is a stall");
        d.on_lost();
        d.on_connected();
        assert!(d.is_healthy());
    }

    #[test]
    fn online_is_refreshed_only_while_connected() {
        let mut d = Delivery::new(Bus::Mqtt, Confirmation::PerMessage, limits(10), "local");
        d.refresh_online();
        assert_eq!(d.waiting(), 0);
        d.on_connected();
        d.push(event("a"));
        d.refresh_online();
        assert_eq!(send_all(&mut d), ["bridge:online", "a", "bridge:online"]);
    }

    #[test]
    fn goodbye_marks_comfyui_and_the_bridge_offline_after_what_waits() {
        let mut d = Delivery::new(Bus::Nats, Confirmation::Batch, limits(10), "local");
        d.on_connected();
        d.push(event("last"));
        d.goodbye();
        assert_eq!(send_all(&mut d), ["bridge:online", "last", "comfyui:offline", "bridge:offline"]);
    }
}
