//! The fleet's decisions, pure: whether this bridge has room for another job, and what to do with a job the
//! stream delivers given what the jobs bucket says about it.

use super::job::{JobRecord, JobState};

/// What this bridge has on its hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// `fleet.capacity`.
    pub capacity: usize,
    /// Its fleet jobs that have not left ComfyUI's queue yet (claimed, queued or running).
    pub active: usize,
    /// Its ComfyUI answered the last look.
    pub reachable: bool,
}

impl Room {
    /// Whether to fetch another job now.
    pub fn can_fetch(&self) -> bool {
        self.reachable && self.active < self.capacity
    }
}

/// What the bucket holds for a delivered job.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The record.
    pub record: JobRecord,
    /// Its revision, for a revision-checked update.
    pub revision: u64,
}

/// What to do with a delivered job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Claim it for run number `attempt`: create the record (`revision` `None`) or update it at `revision`.
    Run {
        /// The run number.
        attempt: u64,
        /// The revision to update at; `None`: create.
        revision: Option<u64>,
    },
    /// This bridge's own record of a job it is not running (it restarted): look for the prompt in ComfyUI
    /// and follow it if it is there, else run it again at `attempt + 1`.
    Reclaim {
        /// The revision to update at.
        revision: u64,
    },
    /// Another live bridge runs it (its acknowledgements were lost, e.g. a NATS server failed over): keep the
    /// message alive and watch the record, without taking room.
    Hold,
    /// It is over: acknowledge the message and do nothing else (a duplicate, or a cancelled job).
    Done,
    /// It ran `fleet.max_deliver` times without finishing: end it with an error at `revision`.
    Exhausted {
        /// Runs so far.
        attempts: u64,
        /// The revision to update at.
        revision: u64,
    },
}

/// Decides for a job delivered to `me`. `running_here`: this process follows it already (its own message
/// came back); `owner_alive`: whether a bridge heartbeats into the bridges bucket.
pub fn decide(
    me: &str,
    seen: Option<&Seen>,
    running_here: bool,
    max_deliver: u64,
    owner_alive: impl Fn(&str) -> bool,
) -> Decision {
    let Some(Seen { record, revision }) = seen else {
        return Decision::Run { attempt: 1, revision: None };
    };
    let revision = *revision;
    if record.state.is_terminal() {
        return Decision::Done;
    }
    let owner = record.instance.as_deref().filter(|_| record.state.is_active());
    match owner {
        Some(_) if running_here => Decision::Hold,
        Some(owner) if owner == me => Decision::Reclaim { revision },
        Some(owner) if owner_alive(owner) => Decision::Hold,
        // Released by its bridge (waiting), or its bridge is gone: run it again, if it may run again.
        _ if record.attempt >= max_deliver => Decision::Exhausted { attempts: record.attempt, revision },
        _ => Decision::Run { attempt: record.attempt + 1, revision: Some(revision) },
    }
}

/// Whether a job in `state` is still waiting for a bridge, so `cancel` can end it on the spot.
pub fn cancellable_in_place(state: Option<JobState>) -> bool {
    matches!(state, None | Some(JobState::Waiting) | Some(JobState::Claimed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(state: JobState, instance: Option<&str>, attempt: u64) -> Seen {
        let mut record = JobRecord::claimed("j", instance.unwrap_or("x"), attempt);
        record.state = state;
        record.instance = instance.map(str::to_string);
        Seen { record, revision: 7 }
    }

    #[test]
    fn room_needs_a_reachable_comfyui_and_a_free_slot() {
        assert!(Room { capacity: 2, active: 1, reachable: true }.can_fetch());
        assert!(!Room { capacity: 2, active: 2, reachable: true }.can_fetch());
        assert!(!Room { capacity: 2, active: 0, reachable: false }.can_fetch());
    }

    #[test]
    fn a_new_job_is_created_at_attempt_one() {
        assert_eq!(decide("a", None, false, 3, |_| true), Decision::Run { attempt: 1, revision: None });
    }

    #[test]
    fn a_job_over_is_only_acknowledged() {
        for state in [JobState::Success, JobState::Error, JobState::Interrupted, JobState::Cancelled] {
            assert_eq!(decide("a", Some(&seen(state, Some("b"), 1)), false, 3, |_| false), Decision::Done);
        }
    }

    #[test]
    fn a_live_owner_keeps_its_job_and_a_dead_one_loses_it() {
        let running_on_b = seen(JobState::Running, Some("b"), 1);
        assert_eq!(decide("a", Some(&running_on_b), false, 3, |o| o == "b"), Decision::Hold);
        assert_eq!(
            decide("a", Some(&running_on_b), false, 3, |_| false),
            Decision::Run { attempt: 2, revision: Some(7) }
        );
        let last = seen(JobState::Queued, Some("b"), 3);
        assert_eq!(decide("a", Some(&last), false, 3, |_| false), Decision::Exhausted { attempts: 3, revision: 7 });
    }

    #[test]
    fn my_own_job_is_held_while_i_follow_it_and_reclaimed_after_a_restart() {
        let mine = seen(JobState::Running, Some("a"), 1);
        assert_eq!(decide("a", Some(&mine), true, 3, |_| true), Decision::Hold);
        assert_eq!(decide("a", Some(&mine), false, 3, |_| true), Decision::Reclaim { revision: 7 });
    }

    #[test]
    fn a_released_job_runs_again() {
        let released = seen(JobState::Waiting, None, 1);
        assert_eq!(decide("a", Some(&released), false, 3, |_| true), Decision::Run { attempt: 2, revision: Some(7) });
        let never_ran = seen(JobState::Waiting, None, 0);
        assert_eq!(decide("a", Some(&never_ran), false, 3, |_| true), Decision::Run { attempt: 1, revision: Some(7) });
    }

    #[test]
    fn only_unclaimed_or_claimed_jobs_are_cancelled_in_place() {
        assert!(cancellable_in_place(None));
        assert!(cancellable_in_place(Some(JobState::Claimed)));
        assert!(!cancellable_in_place(Some(JobState::Running)));
    }
}
