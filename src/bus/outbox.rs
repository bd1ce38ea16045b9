//! A bounded FIFO of messages waiting for a broker, with a drop rule that protects lifecycle events.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Bus, Class, Outbound};
use crate::telemetry;

/// Messages not yet confirmed by a broker, oldest first. Owned by one publisher task.
#[derive(Debug)]
pub struct Outbox {
    bus: Bus,
    capacity: usize,
    queue: VecDeque<Arc<Outbound>>,
}

impl Outbox {
    /// An empty outbox holding at most `capacity` messages.
    pub fn new(bus: Bus, capacity: usize) -> Self {
        Self { bus, capacity: capacity.max(1), queue: VecDeque::new() }
    }

    /// Appends a message. When full, the oldest droppable message goes first, else the oldest of all;
    /// either way the drop is counted and logged.
    pub fn push(&mut self, msg: Arc<Outbound>) {
        if self.queue.len() >= self.capacity {
            let victim = self.queue.iter().position(|m| m.class == Class::Droppable).unwrap_or(0);
            if msg.class == Class::Droppable && victim == 0 && self.queue[0].class == Class::Lifecycle {
                // Full of lifecycle events: the new droppable message is the one to lose.
                telemetry::dropped(self.bus, "outbox_full", &msg.route);
                return;
            }
            if let Some(old) = self.queue.remove(victim) {
                telemetry::dropped(self.bus, "outbox_full", &old.route);
            }
        }
        self.queue.push_back(msg);
        telemetry::outbox_depth(self.bus, self.queue.len());
    }

    /// Puts messages that were handed to a broker but not confirmed back at the front, in their order.
    pub fn requeue_front(&mut self, msgs: impl DoubleEndedIterator<Item = Arc<Outbound>>) {
        for msg in msgs.rev() {
            self.queue.push_front(msg);
        }
        while self.queue.len() > self.capacity {
            if let Some(old) = self.queue.pop_back() {
                telemetry::dropped(self.bus, "outbox_full", &old.route);
            }
        }
        telemetry::outbox_depth(self.bus, self.queue.len());
    }

    /// Takes the oldest message.
    pub fn pop(&mut self) -> Option<Arc<Outbound>> {
        let msg = self.queue.pop_front();
        telemetry::outbox_depth(self.bus, self.queue.len());
        msg
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Route;

    fn msg(name: &str, class: Class) -> Arc<Outbound> {
        Arc::new(Outbound {
            route: Route::fixed("t", &[name]),
            payload: bytes::Bytes::new(),
            qos: 1,
            retain: false,
            class,
            headers: Vec::new(),
            reply: None,
        })
    }

    fn names(outbox: &mut Outbox) -> Vec<String> {
        std::iter::from_fn(|| outbox.pop()).map(|m| m.route.levels()[1].to_string()).collect()
    }

    #[test]
    fn full_outbox_drops_progress_before_lifecycle() {
        let mut outbox = Outbox::new(Bus::Mqtt, 3);
        outbox.push(msg("start", Class::Lifecycle));
        outbox.push(msg("tick1", Class::Droppable));
        outbox.push(msg("tick2", Class::Droppable));
        outbox.push(msg("done", Class::Lifecycle));
        outbox.push(msg("end", Class::Lifecycle));
        assert_eq!(names(&mut outbox), ["start", "done", "end"]);
    }

    #[test]
    fn outbox_full_of_lifecycle_refuses_new_progress_and_drops_oldest_lifecycle() {
        let mut outbox = Outbox::new(Bus::Nats, 2);
        outbox.push(msg("a", Class::Lifecycle));
        outbox.push(msg("b", Class::Lifecycle));
        outbox.push(msg("tick", Class::Droppable));
        outbox.push(msg("c", Class::Lifecycle));
        assert_eq!(names(&mut outbox), ["b", "c"]);
    }

    #[test]
    fn requeued_messages_keep_their_order_ahead_of_newer_ones() {
        let mut outbox = Outbox::new(Bus::Mqtt, 10);
        outbox.push(msg("new", Class::Lifecycle));
        outbox.requeue_front(vec![msg("old1", Class::Lifecycle), msg("old2", Class::Lifecycle)].into_iter());
        assert_eq!(names(&mut outbox), ["old1", "old2", "new"]);
    }
}
