//! The bounded way in: requests from the buses reach the command plane through an [`Inbox`] (bounded by count
//! and by bytes, never blocking the bus that offers), and wait for a free slot in a [`WaitQueue`] (bounded by
//! count, with a deadline). What does not fit is answered `busy` where it can be, and counted.
//!
//! The byte budget is shared by everything received and not yet answered: a request holds its share (its
//! payload's size) from the moment a bus hands it over until its answer is sent.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::bus::{Bus, Inquiry, InquiryKind, Reply};
use crate::telemetry;

/// Most overflow notices (requests that found the inbox full) waiting to be answered `busy`; beyond this they
/// are only counted.
const OVERFLOW_CAPACITY: usize = 1024;
/// Longest command name kept in an overflow notice.
const MAX_COMMAND_BYTES: usize = 64;
/// Largest payload kept in an overflow notice (so that its `busy` answer can echo the request's id).
const MAX_NOTICE_PAYLOAD: usize = 4096;

/// A request's share of the byte budget, released when it is dropped.
#[derive(Debug)]
pub struct Held {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Held {
    /// A share of nothing: work that holds no payload of its own, or a payload the inbox already dropped.
    pub fn none() -> Self {
        Self { _permit: None }
    }
}

/// A request taken in, with the time it arrived and its bytes.
#[derive(Debug)]
pub struct Entry {
    /// What arrived.
    pub inquiry: Inquiry,
    /// When the bus handed it over.
    pub received: Instant,
    /// The payload's size as it arrived: a payload over `commands.max_payload_bytes` is not kept (the
    /// inquiry's payload is then empty), only its size, for the `payload_too_large` answer.
    pub size: usize,
    /// Its share of the byte budget.
    pub held: Held,
}

/// A request the inbox had no room for, reduced to what a `busy` answer needs.
#[derive(Debug)]
pub struct Overflow {
    /// The bus it came on.
    pub bus: Bus,
    /// Its command level (still escaped, cut to a bounded length).
    pub command: String,
    /// Where its requester wanted the answer.
    pub reply: Option<Reply>,
    /// Its payload when small, to read the id from; else empty.
    pub payload: bytes::Bytes,
    /// When it arrived.
    pub received: Instant,
}

/// The buses' end: cheap to clone, never waits.
#[derive(Debug, Clone)]
pub struct Inbox {
    entries: mpsc::Sender<Entry>,
    overflow: mpsc::Sender<Overflow>,
    bytes: Arc<Semaphore>,
    max_payload: usize,
}

/// The command plane's end.
#[derive(Debug)]
pub struct Outlet {
    /// Requests taken in, oldest first.
    pub entries: mpsc::Receiver<Entry>,
    /// Requests to answer `busy` at once.
    pub overflow: mpsc::Receiver<Overflow>,
}

impl Outlet {
    /// Stops taking anything new; what is already in stays readable.
    pub fn close(&mut self) {
        self.entries.close();
        self.overflow.close();
    }
}

/// An inbox holding at most `count` requests and `bytes` bytes of payload between the buses and the plane;
/// payloads over `max_payload` bytes are dropped on arrival (their request only needs an error answer).
pub fn inbox(count: usize, bytes: usize, max_payload: usize) -> (Inbox, Outlet) {
    let (entries_tx, entries) = mpsc::channel(count.max(1));
    let (overflow_tx, overflow) = mpsc::channel(OVERFLOW_CAPACITY);
    let bytes = Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS)));
    (Inbox { entries: entries_tx, overflow: overflow_tx, bytes, max_payload }, Outlet { entries, overflow })
}

impl Inbox {
    /// Hands `inquiry` to the plane without waiting. When there is no room (by count or bytes), the plane is
    /// told to answer it `busy`; when there is not even room for that, or the plane is gone, it is counted as
    /// ignored.
    pub fn offer(&self, mut inquiry: Inquiry) {
        let received = Instant::now();
        let size = inquiry.payload.len();
        let held = if size > self.max_payload {
            inquiry.payload = bytes::Bytes::new();
            Held::none()
        } else {
            match self.bytes.clone().try_acquire_many_owned(u32::try_from(size).unwrap_or(u32::MAX)) {
                Ok(permit) => Held { _permit: Some(permit) },
                Err(_) => return self.overflow(inquiry, received),
            }
        };
        match self.entries.try_send(Entry { inquiry, received, size, held }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(entry)) => self.overflow(entry.inquiry, received),
            Err(mpsc::error::TrySendError::Closed(entry)) => {
                telemetry::request_ignored(entry.inquiry.bus, "shutting_down", &entry.inquiry.path);
            }
        }
    }

    fn overflow(&self, inquiry: Inquiry, received: Instant) {
        if inquiry.kind != InquiryKind::Request {
            // Home Assistant's messages get no answer: only counted.
            return telemetry::request_ignored(inquiry.bus, "inbox_full", &inquiry.path);
        }
        let Inquiry { bus, path, reply, mut payload, .. } = inquiry;
        let command = path.split('/').next().unwrap_or_default();
        let command = cut(command, MAX_COMMAND_BYTES).to_string();
        if payload.len() > MAX_NOTICE_PAYLOAD {
            payload = bytes::Bytes::new();
        }
        let notice = Overflow { bus, command, reply, payload, received };
        if self.overflow.try_send(notice).is_err() {
            telemetry::request_ignored(bus, "inbox_full", &path);
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What [`WaitQueue::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<T> {
    /// May start now.
    Start(T),
    /// Waited longer than the deadline: answer it without starting it.
    Expired(T, Duration),
}

/// Work waiting for a free slot, oldest first: at most `max` items, each waiting at most `deadline`.
#[derive(Debug)]
pub struct WaitQueue<T> {
    items: VecDeque<(Instant, T)>,
    max: usize,
    deadline: Duration,
}

impl<T> WaitQueue<T> {
    /// An empty queue.
    pub fn new(max: usize, deadline: Duration) -> Self {
        Self { items: VecDeque::new(), max, deadline }
    }

    /// Adds `item` that arrived at `since`; gives it back when the queue is full.
    pub fn push(&mut self, since: Instant, item: T) -> Result<(), T> {
        if self.items.len() >= self.max {
            return Err(item);
        }
        self.items.push_back((since, item));
        Ok(())
    }

    /// The oldest item, and whether it may still start at `now`.
    pub fn next(&mut self, now: Instant) -> Option<Next<T>> {
        let (since, item) = self.items.pop_front()?;
        let waited = now.saturating_duration_since(since);
        Some(if waited > self.deadline { Next::Expired(item, waited) } else { Next::Start(item) })
    }

    /// The oldest item, if it has waited longer than the deadline at `now`.
    pub fn expired(&mut self, now: Instant) -> Option<(T, Duration)> {
        let waited = now.saturating_duration_since(self.items.front()?.0);
        if waited <= self.deadline {
            return None;
        }
        self.items.pop_front().map(|(_, item)| (item, waited))
    }

    /// When the oldest item's deadline passes.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.items.front().map(|(since, _)| *since + self.deadline)
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn inquiry(path: &str, bytes: usize) -> Inquiry {
        let payload = Bytes::from(vec![b' '; bytes]);
        Inquiry { kind: InquiryKind::Request, bus: Bus::Nats, path: path.into(), payload, reply: None }
    }

    #[test]
    fn the_inbox_is_bounded_by_count_and_the_rest_is_answered_busy() {
        let (inbox, mut outlet) = inbox(2, 1 << 20, 1 << 20);
        for i in 0..5 {
            inbox.offer(inquiry(&format!("status{i}"), 10));
        }
        assert_eq!(outlet.entries.try_recv().map(|e| e.inquiry.path).ok().as_deref(), Some("status0"));
        assert_eq!(outlet.entries.try_recv().map(|e| e.inquiry.path).ok().as_deref(), Some("status1"));
        assert!(outlet.entries.try_recv().is_err());
        let busy: Vec<String> = std::iter::from_fn(|| outlet.overflow.try_recv().ok()).map(|o| o.command).collect();
        assert_eq!(busy, ["status2", "status3", "status4"]);
    }

    #[test]
    fn the_inbox_is_bounded_by_bytes_until_answers_release_them() {
        let (inbox, mut outlet) = inbox(100, 1000, 1000);
        inbox.offer(inquiry("upload/a", 600));
        inbox.offer(inquiry("upload/b", 600));
        let first = outlet.entries.try_recv().expect("the first fits");
        assert!(outlet.entries.try_recv().is_err(), "the second does not");
        let busy = outlet.overflow.try_recv().expect("answered busy");
        assert_eq!(busy.command, "upload", "only the command level is kept");
        drop(first);
        inbox.offer(inquiry("upload/c", 600));
        assert_eq!(outlet.entries.try_recv().map(|e| e.inquiry.path).ok().as_deref(), Some("upload/c"));
    }

    #[test]
    fn payloads_over_the_request_limit_are_dropped_on_arrival_keeping_their_size() {
        let (inbox, mut outlet) = inbox(100, 1000, 100);
        inbox.offer(inquiry("queue", 5000));
        let entry = outlet.entries.try_recv().expect("taken, to be answered payload_too_large");
        assert_eq!((entry.size, entry.inquiry.payload.len()), (5000, 0));
    }

    #[test]
    fn home_assistant_messages_without_room_are_only_counted() {
        let (inbox, mut outlet) = inbox(1, 1000, 1000);
        inbox.offer(inquiry("status", 0));
        let mut set = inquiry("prompt", 0);
        set.kind = InquiryKind::HomeAssistantSet;
        inbox.offer(set);
        assert!(outlet.overflow.try_recv().is_err(), "no busy answer for Home Assistant");
    }

    #[test]
    fn overflow_notices_are_bounded_and_keep_short_command_names() {
        let (inbox, mut outlet) = inbox(1, 1000, 1000);
        inbox.offer(inquiry("x", 0));
        for _ in 0..OVERFLOW_CAPACITY + 10 {
            inbox.offer(inquiry(&"é".repeat(100), 0));
        }
        let notices: Vec<Overflow> = std::iter::from_fn(|| outlet.overflow.try_recv().ok()).collect();
        assert_eq!(notices.len(), OVERFLOW_CAPACITY);
        assert!(notices.iter().all(|n| n.command.len() <= MAX_COMMAND_BYTES && n.command.starts_with('é')));
    }

    #[test]
    fn the_wait_queue_is_bounded_and_expires_what_waited_too_long() {
        let t0 = Instant::now();
        let mut q = WaitQueue::new(2, Duration::from_secs(5));
        assert_eq!(q.push(t0, "a"), Ok(()));
        assert_eq!(q.push(t0 + Duration::from_secs(3), "b"), Ok(()));
        assert_eq!(q.push(t0, "c"), Err("c"));
        assert_eq!(q.next_expiry(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(q.expired(t0 + Duration::from_secs(5)), None);
        assert_eq!(q.expired(t0 + Duration::from_secs(6)), Some(("a", Duration::from_secs(6))));
        assert_eq!(q.len(), 1);
        assert_eq!(q.next(t0 + Duration::from_secs(7)), Some(Next::Start("b")));
        assert_eq!(q.push(t0, "d"), Ok(()));
        assert_eq!(q.next(t0 + Duration::from_secs(9)), Some(Next::Expired("d", Duration::from_secs(9))));
        assert!(q.is_empty());
        assert_eq!(q.next(t0), None);
    }
}
