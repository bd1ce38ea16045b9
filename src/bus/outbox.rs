//! A FIFO of messages waiting for a broker, bounded by count and by bytes, with a drop rule that protects
//! lifecycle events: progress and previews go first, then the oldest lifecycle event.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Bus, Class, Outbound};
use crate::telemetry;

/// What a message is charged in the byte bound besides its payload (the `Outbound` itself, its route).
const OVERHEAD: usize = 128;

/// The bytes a message is charged in an outbox: payload, route, reply topic, headers and a fixed overhead.
pub fn weight(msg: &Outbound) -> usize {
    let headers: usize = msg.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    let reply = msg.reply.as_ref().map_or(0, |r| r.to.len() + r.correlation.as_ref().map_or(0, |c| c.len()));
    OVERHEAD + msg.payload.len() + msg.route.as_str().len() + reply + headers
}

/// Messages not yet confirmed by a broker, oldest first. Owned by one publisher task.
#[derive(Debug)]
pub struct Outbox {
    bus: Bus,
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
    /// How many [`Class::Droppable`] messages wait, so a queue of lifecycle events is never scanned for one.
    droppable: usize,
    queue: VecDeque<Arc<Outbound>>,
}

impl Outbox {
    /// An empty outbox holding at most `capacity` messages and `max_bytes` bytes (see [`weight`]).
    pub fn new(bus: Bus, capacity: usize, max_bytes: usize) -> Self {
        Self { bus, capacity: capacity.max(1), max_bytes, bytes: 0, droppable: 0, queue: VecDeque::new() }
    }

    /// Appends a message. When that breaks a bound, the oldest droppable message goes first, else the
    /// oldest of all (a new droppable message is the one lost when only lifecycle events wait); every
    /// drop is counted and logged. A message larger than the whole byte bound is dropped at once.
    pub fn push(&mut self, msg: Arc<Outbound>) {
        let w = weight(&msg);
        if w > self.max_bytes {
            telemetry::dropped(self.bus, "outbox_full", &msg.route);
            return;
        }
        while self.over(1, w) {
            if msg.class == Class::Droppable && self.droppable == 0 {
                telemetry::dropped(self.bus, "outbox_full", &msg.route);
                return;
            }
            self.evict(0);
        }
        self.add_back(msg, w);
        telemetry::outbox_depth(self.bus, self.queue.len());
    }

    /// Puts messages back at the front, in their order: ones that were handed to a broker but not confirmed,
    /// or `online` and the retained state on connect. Then applies the bounds: droppable messages go first,
    /// then the oldest lifecycle event behind the requeued ones, so what was just put back (`online` first of
    /// all) is lost only when nothing else is left.
    pub fn requeue_front(&mut self, msgs: impl DoubleEndedIterator<Item = Arc<Outbound>>) {
        let mut requeued = 0;
        for msg in msgs.rev() {
            let w = weight(&msg);
            self.bytes += w;
            self.droppable += usize::from(msg.class == Class::Droppable);
            self.queue.push_front(msg);
            requeued += 1;
        }
        while self.over(0, 0) {
            if self.evict(requeued) < requeued {
                requeued -= 1;
            }
        }
        telemetry::outbox_depth(self.bus, self.queue.len());
    }

    /// Takes the oldest message.
    pub fn pop(&mut self) -> Option<Arc<Outbound>> {
        let msg = self.queue.pop_front()?;
        self.forget(&msg);
        telemetry::outbox_depth(self.bus, self.queue.len());
        Some(msg)
    }

    /// The oldest message, left in place.
    pub fn front(&self) -> Option<&Arc<Outbound>> {
        self.queue.front()
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Bytes waiting (see [`weight`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn over(&self, extra: usize, extra_bytes: usize) -> bool {
        !self.queue.is_empty()
            && (self.queue.len() + extra > self.capacity || self.bytes + extra_bytes > self.max_bytes)
    }

    fn add_back(&mut self, msg: Arc<Outbound>, w: usize) {
        self.bytes += w;
        self.droppable += usize::from(msg.class == Class::Droppable);
        self.queue.push_back(msg);
    }

    fn forget(&mut self, msg: &Outbound) {
        self.bytes -= weight(msg);
        self.droppable -= usize::from(msg.class == Class::Droppable);
    }

    /// Drops the oldest droppable message, else the oldest one from position `from` on (the last one when
    /// `from` is past the end); returns the position it had.
    fn evict(&mut self, from: usize) -> usize {
        let oldest = from.min(self.queue.len().saturating_sub(1));
        let victim = match self.droppable {
            0 => oldest,
            _ => self.queue.iter().position(|m| m.class == Class::Droppable).unwrap_or(oldest),
        };
        if let Some(old) = self.queue.remove(victim) {
            self.forget(&old);
            telemetry::dropped(self.bus, "outbox_full", &old.route);
        }
        victim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Route;

    fn sized(name: &str, class: Class, len: usize) -> Arc<Outbound> {
        Arc::new(Outbound {
            route: Route::fixed("t", &[name]),
            payload: bytes::Bytes::from(vec![0; len]),
            qos: 1,
            retain: false,
            class,
            headers: Vec::new(),
            reply: None,
            reply_to: None,
        })
    }

    fn msg(name: &str, class: Class) -> Arc<Outbound> {
        sized(name, class, 0)
    }

    fn names(outbox: &mut Outbox) -> Vec<String> {
        std::iter::from_fn(|| outbox.pop()).map(|m| m.route.levels()[1].to_string()).collect()
    }

    #[test]
    fn full_outbox_drops_progress_before_lifecycle() {
        let mut outbox = Outbox::new(Bus::Mqtt, 3, usize::MAX);
        outbox.push(msg("start", Class::Lifecycle));
        outbox.push(msg("tick1", Class::Droppable));
        outbox.push(msg("tick2", Class::Droppable));
        outbox.push(msg("done", Class::Lifecycle));
        outbox.push(msg("end", Class::Lifecycle));
        assert_eq!(names(&mut outbox), ["start", "done", "end"]);
    }

    #[test]
    fn outbox_full_of_lifecycle_refuses_new_progress_and_drops_oldest_lifecycle() {
        let mut outbox = Outbox::new(Bus::Nats, 2, usize::MAX);
        outbox.push(msg("a", Class::Lifecycle));
        outbox.push(msg("b", Class::Lifecycle));
        outbox.push(msg("tick", Class::Droppable));
        outbox.push(msg("c", Class::Lifecycle));
        assert_eq!(names(&mut outbox), ["b", "c"]);
    }

    #[test]
    fn a_full_outbox_keeps_what_was_put_back_at_the_front() {
        let mut outbox = Outbox::new(Bus::Mqtt, 3, usize::MAX);
        for name in ["a", "b", "c"] {
            outbox.push(msg(name, Class::Lifecycle));
        }
        outbox.requeue_front(std::iter::once(msg("online", Class::Lifecycle)));
        assert_eq!(names(&mut outbox), ["online", "b", "c"], "the oldest behind the requeued one goes");
        for name in ["a", "b"] {
            outbox.push(msg(name, Class::Lifecycle));
        }
        outbox.requeue_front(
            vec![msg("x", Class::Lifecycle), msg("y", Class::Lifecycle), msg("z", Class::Lifecycle)].into_iter(),
        );
        assert_eq!(names(&mut outbox), ["x", "y", "z"], "only requeued ones left: the newest of them goes last");
    }

    #[test]
    fn requeued_messages_keep_their_order_ahead_of_newer_ones() {
        let mut outbox = Outbox::new(Bus::Mqtt, 10, usize::MAX);
        outbox.push(msg("new", Class::Lifecycle));
        outbox.requeue_front(vec![msg("old1", Class::Lifecycle), msg("old2", Class::Lifecycle)].into_iter());
        assert_eq!(names(&mut outbox), ["old1", "old2", "new"]);
    }

    #[test]
    fn byte_bound_drops_previews_first_then_oldest_lifecycle_and_never_exceeds() {
        const MB: usize = 1 << 20;
        let mut outbox = Outbox::new(Bus::Mqtt, 10_000, 64 * MB);
        for i in 0..40 {
            outbox.push(sized(&format!("big{i}"), Class::Lifecycle, 15 * MB));
            assert!(outbox.bytes() <= 64 * MB, "{} bytes after {i}", outbox.bytes());
        }
        assert_eq!(outbox.len(), 4);
        outbox.push(sized("preview", Class::Droppable, 10 * MB));
        assert_eq!(outbox.len(), 4, "a preview does not push out a lifecycle event");
        let mut outbox = Outbox::new(Bus::Mqtt, 10_000, 64 * MB);
        outbox.push(sized("start", Class::Lifecycle, MB));
        for i in 0..5 {
            outbox.push(sized(&format!("preview{i}"), Class::Droppable, 15 * MB));
        }
        outbox.push(sized("done", Class::Lifecycle, 15 * MB));
        assert!(outbox.bytes() <= 64 * MB);
        assert_eq!(names(&mut outbox), ["start", "preview2", "preview3", "preview4", "done"]);
        assert_eq!(outbox.bytes(), 0);
    }

    #[test]
    fn a_message_larger_than_the_byte_bound_is_dropped_alone() {
        let mut outbox = Outbox::new(Bus::Nats, 10, 1000);
        outbox.push(msg("small", Class::Lifecycle));
        outbox.push(sized("huge", Class::Lifecycle, 5000));
        assert_eq!(names(&mut outbox), ["small"]);
    }
}
