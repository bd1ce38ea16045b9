//! The memory of request ids: a request repeated with the same `id` and command within [`REMEMBER`] gets the
//! first response again and does nothing twice, and repeats that arrive while the first is being worked on wait
//! for its answer.
//!
//! Pure: the time is passed in, and the waiters (`T`, whoever gets the answer) are opaque.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long a request id is remembered: a repeat within this gets the first response again.
pub const REMEMBER: Duration = Duration::from_secs(600);
/// Most request ids remembered; the oldest are forgotten first beyond this.
pub const REMEMBER_MAX: usize = 10_000;
/// Most repeats of one request id waiting for its first answer; more are turned away.
pub const MAX_REPEATS_WAITING: usize = 16;

/// What a request id has led to so far.
enum Answer<T> {
    /// Being worked on; repeats wait for the same response.
    Pending(Vec<T>),
    /// Answered at this time with this response.
    Done(Bytes, Instant),
}

/// What the ledger says about a request with an id.
#[derive(Debug, PartialEq)]
pub enum Seen<T> {
    /// Not seen (or forgotten): it is now pending, and the request is to be carried out.
    New(T),
    /// Answered before: send this response again, and do nothing else.
    Answered(Bytes, T),
    /// The first request with this id is being worked on: this one waits for its answer.
    Waiting,
    /// Too many repeats already wait for the answer: turn this one away.
    Full(T),
}

/// What an answer does to the record of its request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Carried out: repeats of the id get this answer again.
    Remember,
    /// Turned away after it was recorded as pending (busy, waited too long): the repeats waiting for it get the
    /// same answer, and the id is forgotten, so a retry is carried out.
    Release,
    /// Rejected before it was recorded (unparsable, refused reply, not allowed, no room): the record of the id,
    /// if another request with it is pending, is not this request's.
    Untouched,
}

/// Request ids by `(command, id)`, with their answers.
pub struct Ledger<T> {
    answers: HashMap<(String, String), Answer<T>>,
}

impl<T> Default for Ledger<T> {
    fn default() -> Self {
        Self { answers: HashMap::new() }
    }
}

impl<T> Ledger<T> {
    /// Looks a request up, and records it as pending when it is new. `waiter` is who gets its answer.
    pub fn check(&mut self, command: &str, id: &str, waiter: T, now: Instant) -> Seen<T> {
        let key = (command.to_string(), id.to_string());
        match self.answers.get_mut(&key) {
            Some(Answer::Done(response, at)) if now.saturating_duration_since(*at) < REMEMBER => {
                Seen::Answered(response.clone(), waiter)
            }
            Some(Answer::Pending(waiting)) if waiting.len() < MAX_REPEATS_WAITING => {
                waiting.push(waiter);
                Seen::Waiting
            }
            Some(Answer::Pending(_)) => Seen::Full(waiter),
            _ => {
                self.answers.insert(key, Answer::Pending(Vec::new()));
                Seen::New(waiter)
            }
        }
    }

    /// The request with this id was answered with `response`: returns the repeats that waited for it (they get
    /// the same response). What is kept follows `record`.
    pub fn answered(&mut self, command: &str, id: &str, response: &Bytes, record: Record, now: Instant) -> Vec<T> {
        if record == Record::Untouched {
            return Vec::new();
        }
        self.forget_old(now);
        let key = (command.to_string(), id.to_string());
        // Only a request that got as far as being carried out is remembered: a rejected one did nothing.
        match self.answers.remove(&key) {
            Some(Answer::Pending(waiting)) => {
                if record == Record::Remember {
                    self.answers.insert(key, Answer::Done(response.clone(), now));
                }
                waiting
            }
            _ => Vec::new(),
        }
    }

    /// Request ids remembered or pending.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether nothing is remembered or pending.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Forgets answers older than [`REMEMBER`], then the oldest answers beyond [`REMEMBER_MAX`] ids.
    fn forget_old(&mut self, now: Instant) {
        self.answers.retain(|_, a| !matches!(a, Answer::Done(_, at) if now.saturating_duration_since(*at) >= REMEMBER));
        if self.answers.len() > REMEMBER_MAX {
            let mut done: Vec<_> = self
                .answers
                .iter()
                .filter_map(|(k, a)| match a {
                    Answer::Done(_, at) => Some((*at, k.clone())),
                    Answer::Pending(_) => None,
                })
                .collect();
            done.sort();
            for (_, key) in done.into_iter().take(self.answers.len() - REMEMBER_MAX) {
                self.answers.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Bytes {
        Bytes::from_static(b"{\"status\":\"ok\"}")
    }

    #[test]
    fn a_repeat_gets_the_first_answer_for_ten_minutes_then_runs_again() {
        let (mut ledger, t0) = (Ledger::default(), Instant::now());
        assert_eq!(ledger.check("queue", "1", "a", t0), Seen::New("a"));
        assert_eq!(ledger.answered("queue", "1", &ok(), Record::Remember, t0), Vec::<&str>::new());
        let later = t0 + REMEMBER - Duration::from_millis(1);
        assert_eq!(ledger.check("queue", "1", "b", later), Seen::Answered(ok(), "b"));
        assert_eq!(ledger.check("queue", "1", "c", t0 + REMEMBER), Seen::New("c"), "forgotten after REMEMBER");
    }

    #[test]
    fn ids_are_per_command() {
        let (mut ledger, now) = (Ledger::default(), Instant::now());
        assert_eq!(ledger.check("queue", "1", (), now), Seen::New(()));
        assert_eq!(ledger.check("status", "1", (), now), Seen::New(()), "`status` id 1 is another request");
    }

    #[test]
    fn repeats_of_a_pending_request_wait_for_its_answer_up_to_a_bound() {
        let (mut ledger, now) = (Ledger::default(), Instant::now());
        assert_eq!(ledger.check("queue", "1", 0, now), Seen::New(0));
        for waiter in 1..=MAX_REPEATS_WAITING {
            assert_eq!(ledger.check("queue", "1", waiter, now), Seen::Waiting);
        }
        assert_eq!(ledger.check("queue", "1", 99, now), Seen::Full(99));
        let waited = ledger.answered("queue", "1", &ok(), Record::Remember, now);
        assert_eq!(waited, (1..=MAX_REPEATS_WAITING).collect::<Vec<_>>(), "each repeat gets the answer, in order");
    }

    #[test]
    fn a_released_request_answers_its_waiters_and_is_forgotten() {
        let (mut ledger, now) = (Ledger::default(), Instant::now());
        ledger.check("queue", "1", "first", now);
        ledger.check("queue", "1", "repeat", now);
        assert_eq!(ledger.answered("queue", "1", &ok(), Record::Release, now), vec!["repeat"]);
        assert_eq!(ledger.check("queue", "1", "retry", now), Seen::New("retry"), "a retry is carried out");
    }

    #[test]
    fn an_untouched_answer_leaves_another_requests_record_alone() {
        let (mut ledger, now) = (Ledger::default(), Instant::now());
        ledger.check("queue", "1", "first", now);
        assert_eq!(ledger.answered("queue", "1", &ok(), Record::Untouched, now), Vec::<&str>::new());
        assert_eq!(ledger.check("queue", "1", "repeat", now), Seen::Waiting, "still pending for the first");
    }

    #[test]
    fn the_oldest_answers_are_forgotten_beyond_the_bound() {
        let (mut ledger, t0) = (Ledger::default(), Instant::now());
        for i in 0..=REMEMBER_MAX {
            let at = t0 + Duration::from_millis(i as u64);
            ledger.check("status", &i.to_string(), (), at);
            ledger.answered("status", &i.to_string(), &ok(), Record::Remember, at);
        }
        let now = t0 + Duration::from_secs(1);
        ledger.check("status", "new", (), now);
        ledger.answered("status", "new", &ok(), Record::Remember, now);
        assert_eq!(ledger.len(), REMEMBER_MAX);
        // Each answer beyond the bound made room by forgetting the oldest one: `0`, then `1`.
        assert_eq!(ledger.check("status", "0", (), now), Seen::New(()), "the oldest went first");
        assert_eq!(ledger.check("status", "1", (), now), Seen::New(()));
        assert!(matches!(ledger.check("status", "2", (), now), Seen::Answered(..)));
    }
}
