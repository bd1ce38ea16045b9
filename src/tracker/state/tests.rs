use super::*;
use crate::comfy::event::parse_text;
use crate::comfy::event::tests::recorded_frames;

const BASE: &str = "http://gpu.local:8188";

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn parse(update: &Update) -> Value {
    serde_json::from_slice(&update.payload).expect("json")
}

/// Feeds every text frame of a recorded session, 50 ms apart; returns every update.
fn replay(tracker: &mut Tracker, scenario: &str, start: Instant) -> Vec<Update> {
    let mut updates = Vec::new();
    for (i, frame) in recorded_frames(scenario).into_iter().filter_map(Result::ok).enumerate() {
        let event = parse_text(&frame).expect("recorded frames parse");
        let now = start + Duration::from_millis(50 * i as u64);
        updates.extend(tracker.on_event(&event, 1_795_000_000_000 + i as u64, now).updates);
    }
    updates
}

fn states(updates: &[Update]) -> Vec<Value> {
    updates.iter().filter(|u| u.topic == Topic::State).map(parse).collect()
}

fn results(updates: &[Update]) -> Vec<Value> {
    updates.iter().filter(|u| u.topic == Topic::Result).map(parse).collect()
}

#[test]
fn a_prompt_the_bridge_queued_goes_queued_running_success_with_one_result() {
    let mut tracker = Tracker::new(BASE);
    let pid = "b5ce2ae5-3b1f-4ded-aabc-98cde2f52de0";
    let workflow = fixture("workflows/a_success__prompt.json");
    let start = Instant::now();
    tracker.expect(pid, Some("req-7".into()), &workflow, start);
    assert_eq!(tracker.request_id(pid), Some("req-7"), "known before ComfyUI answers");
    let mut updates = tracker.accepted(pid, 1_794_999_999_000, start).updates;
    updates.extend(replay(&mut tracker, "a_success", start));

    let states = states(&updates);
    let phases: Vec<&str> = states.iter().map(|s| s["state"].as_str().expect("state")).collect();
    assert_eq!(phases.first(), Some(&"queued"));
    assert_eq!(phases.last(), Some(&"success"));
    let running = phases.iter().position(|p| *p == "running").expect("a running state");
    assert!(phases[running..phases.len() - 1].iter().all(|p| *p == "running"), "{phases:?}");
    let fractions: Vec<f64> = states.iter().filter_map(|s| s["fraction"].as_f64()).collect();
    assert!(fractions.windows(2).all(|w| w[1] >= w[0]), "fraction never goes back: {fractions:?}");
    assert_eq!(fractions.last(), Some(&1.0));
    assert!(states.iter().any(|s| s["progress"]["max"].as_f64() > Some(1.0)), "step progress is reported");
    assert!(states.iter().all(|s| s["request_id"] == "req-7"));

    let results = results(&updates);
    assert_eq!(results.len(), 1, "exactly one result");
    let result = &results[0];
    assert_eq!(result["status"], "success");
    assert_eq!(result["request_id"], "req-7");
    assert!(result["duration_ms"].as_u64().is_some());
    let image = &result["outputs"]["4"]["images"][0];
    assert_eq!(
        image["url"],
        format!(
            "{BASE}/view?filename={}&subfolder=bridge_probe&type=output",
            image["filename"].as_str().expect("filename")
        )
    );
    assert!(tracker.is_finished(pid) && tracker.live() == 0);
    assert_eq!(tracker.request_id(pid), Some("req-7"), "late events still carry the request id");
}

#[test]
fn all_cached_prompt_counts_cached_nodes_as_done() {
    let mut tracker = Tracker::new(BASE);
    let workflow = fixture("workflows/b_cached__prompt.json");
    let frames = recorded_frames("b_cached");
    let pid = frames
        .iter()
        .filter_map(|f| f.as_ref().ok())
        .filter_map(|f| parse_text(f).ok())
        .find_map(|e| e.prompt_id().map(str::to_string))
        .expect("a prompt id");
    let start = Instant::now();
    tracker.expect(&pid, None, &workflow, start);
    let updates = replay(&mut tracker, "b_cached", start);
    let states = states(&updates);
    let cached = states.iter().find(|s| s["nodes_done"].as_u64() > Some(0)).expect("cached nodes counted");
    assert_eq!(cached["nodes_done"], cached["nodes_total"]);
    assert_eq!(results(&updates)[0]["status"], "success");
}

#[test]
fn node_error_ends_in_error_with_the_exception() {
    let mut tracker = Tracker::new(BASE);
    let updates = replay(&mut tracker, "c_execution_error", Instant::now());
    let results = results(&updates);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "error");
    assert!(results[0]["error"]["exception_message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(results[0]["error"]["node_type"].as_str().is_some());
    assert_eq!(states(&updates).last().expect("a state")["state"], "error");
}

#[test]
fn interrupt_ends_the_running_prompt_interrupted_and_the_next_one_runs() {
    let mut tracker = Tracker::new(BASE);
    let updates = replay(&mut tracker, "e_interrupt", Instant::now());
    let statuses: Vec<Value> = results(&updates).iter().map(|r| r["status"].clone()).collect();
    assert_eq!(statuses, ["interrupted", "success"]);
}

#[test]
fn progress_only_states_are_rate_limited_but_lifecycle_changes_are_not() {
    let mut tracker = Tracker::new(BASE);
    let start = Instant::now();
    let event = |text: &str| parse_text(text).expect("frame");
    let begin = event(r#"{"type":"execution_start","data":{"prompt_id":"p","timestamp":1}}"#);
    assert_eq!(tracker.on_event(&begin, 1, start).updates.len(), 1);
    let node = event(r#"{"type":"executing","data":{"node":"3","display_node":"3","prompt_id":"p"}}"#);
    assert_eq!(tracker.on_event(&node, 2, start).updates.len(), 1, "a node change is always published");
    let mut published = 0;
    for i in 0..100u64 {
        let tick =
            event(&format!(r#"{{"type":"progress","data":{{"value":{i},"max":100,"prompt_id":"p","node":"3"}}}}"#));
        let now = start + Duration::from_millis(10 * i);
        published += tracker.on_event(&tick, 3 + i, now).updates.len();
    }
    // 1 s of ticks at 100/s: one state per 200 ms.
    assert!((4..=6).contains(&published), "{published} progress states");
}

#[test]
fn foreign_prompt_is_found_in_the_queue_and_finished_from_history() {
    let mut tracker = Tracker::new(BASE);
    let pid = "dfc88918-4580-4d64-8b7b-e5b28ce91ef7";
    let workflow = fixture("workflows/o_foreign_prompt__prompt.json");
    let start = Instant::now();
    let item = |number| json!([number, pid, workflow, {"client_id": "someone-else"}, ["4"]]);
    let pending = QueueSnapshot::parse(&json!({"queue_running": [], "queue_pending": [item(32)]})).expect("queue");
    let updates = tracker.on_queue(&pending, start, 1000, start).updates;
    assert_eq!(states(&updates)[0]["state"], "queued");
    assert_eq!(states(&updates)[0]["queue_position"], 1);
    assert_eq!(states(&updates)[0]["nodes_total"], workflow.as_object().expect("object").len());

    let running = QueueSnapshot::parse(&json!({"queue_running": [item(32)], "queue_pending": []})).expect("queue");
    let later = start + Duration::from_millis(10);
    assert_eq!(states(&tracker.on_queue(&running, later, 1010, later).updates)[0]["state"], "running");
    assert!(tracker.on_queue(&running, later, 1011, later).updates.is_empty(), "nothing new, nothing published");

    let empty = QueueSnapshot::default();
    let effects = tracker.on_queue(&empty, later + Duration::from_millis(1), 1020, later);
    assert_eq!(effects.lookups, [pid]);
    let history = fixture("history.success.json");
    let entry = history.as_object().and_then(|h| h.values().next()).expect("entry");
    let updates = tracker.on_history(pid, Some(entry), 1030).updates;
    let result = &results(&updates)[0];
    assert_eq!(result["status"], "success");
    assert!(result["outputs"].as_object().is_some_and(|o| !o.is_empty()));
    assert!(result["outputs"].to_string().contains(&format!("{BASE}/view?filename=")));
    assert!(tracker.on_history(pid, Some(entry), 1040).updates.is_empty(), "a result is published once");
}

#[test]
fn history_tells_interrupted_from_error() {
    for (file, status) in [("history.interrupted.json", "interrupted"), ("history.error.json", "error")] {
        let history = fixture(file);
        let (pid, entry) = history.as_object().and_then(|h| h.iter().next()).expect("entry");
        let mut tracker = Tracker::new(BASE);
        let start = Instant::now();
        let running = json!({"queue_running": [entry["prompt"]], "queue_pending": []});
        tracker.on_queue(&QueueSnapshot::parse(&running).expect("queue"), start, 1, start);
        let updates = tracker.on_history(pid, Some(entry), 2).updates;
        let result = &results(&updates)[0];
        assert_eq!(result["status"], status, "{file}");
        assert!(result["duration_ms"].as_u64().is_some(), "{file}: timestamps come from the history messages");
    }
}

#[test]
fn a_deleted_prompt_is_cancelled_but_a_fresh_one_is_not_mistaken_for_deleted() {
    let mut tracker = Tracker::new(BASE);
    let t0 = Instant::now();
    let queued = json!({"queue_running": [], "queue_pending": [[5, "gone", {}, {}, []]]});
    tracker.on_queue(&QueueSnapshot::parse(&queued).expect("queue"), t0, 1, t0);

    // Our own prompt, accepted after this snapshot was requested: not in it, but not gone either.
    let t1 = t0 + Duration::from_millis(5);
    tracker.expect("mine", None, &json!({"1": {"class_type": "X", "inputs": {}}}), t1);
    tracker.accepted("mine", 2, t1);
    let effects = tracker.on_queue(&QueueSnapshot::default(), t0 + Duration::from_millis(1), 3, t1);
    assert_eq!(effects.lookups, ["gone"]);

    let updates = tracker.on_history("gone", None, 4).updates;
    assert_eq!(results(&updates)[0]["status"], "cancelled");
    assert!(!tracker.is_finished("mine"));
}

#[test]
fn a_prompt_absent_from_queue_and_history_is_not_cancelled_while_its_events_come() {
    let mut tracker = Tracker::new(BASE);
    let now = Instant::now();
    tracker.on_event(&event("execution_start", "p", r#","timestamp":1"#), 1_000, now);
    let later = now + Duration::from_millis(16);
    assert_eq!(tracker.on_queue(&QueueSnapshot::default(), later, 1_016, later).lookups, ["p"]);
    assert!(results(&tracker.on_history("p", None, 1_017).updates).is_empty(), "executing now: running");
    let done = tracker.on_event(&event("execution_success", "p", r#","timestamp":2000"#), 2_000, later).updates;
    assert_eq!(results(&done)[0]["status"], "success");

    // Once its events have stopped for long (or it said `executing: null`), absent means deleted.
    tracker.on_event(&event("execution_start", "q", ""), 3_000, later);
    let updates = tracker.on_history("q", None, 3_000 + EXECUTING_MS).updates;
    assert_eq!(results(&updates)[0]["status"], "cancelled");
}

#[test]
fn a_rejected_submission_is_forgotten_without_a_word() {
    let mut tracker = Tracker::new(BASE);
    let now = Instant::now();
    tracker.expect("p", Some("r".into()), &json!({}), now);
    tracker.rejected("p");
    assert_eq!((tracker.live(), tracker.request_id("p")), (0, None));
}

#[test]
fn execution_blocked_is_not_the_end() {
    let mut tracker = Tracker::new(BASE);
    let now = Instant::now();
    let blocked = parse_text(
        r#"{"type":"execution_error","data":{"prompt_id":"p","node_id":"3","exception_type":"ExecutionBlocked",
        "exception_message":"Execution Blocked: x","traceback":[],"current_inputs":[],"current_outputs":[]}}"#,
    )
    .expect("frame");
    assert!(results(&tracker.on_event(&blocked, 1, now).updates).is_empty());
    assert!(!tracker.is_finished("p"));
}

#[test]
fn executing_null_without_a_terminal_event_asks_history() {
    let mut tracker = Tracker::new(BASE);
    let now = Instant::now();
    let start = parse_text(r#"{"type":"execution_start","data":{"prompt_id":"p","timestamp":1}}"#).expect("frame");
    tracker.on_event(&start, 1, now);
    let end = parse_text(r#"{"type":"executing","data":{"node":null,"prompt_id":"p"}}"#).expect("frame");
    assert_eq!(tracker.on_event(&end, 2, now).lookups, ["p"]);
}

#[test]
fn recent_history_reports_prompts_that_came_and_went_unseen_but_not_old_ones() {
    let history = fixture("history.success.json");
    let (pid, entry) = history.as_object().and_then(|h| h.iter().next()).expect("entry");
    let recent = vec![(pid.clone(), entry.clone())];
    let now = Instant::now();
    let mut tracker = Tracker::new(BASE);
    assert!(tracker.on_recent_history(&recent, 1, now).updates.is_empty(), "before the bridge looked: not news");

    let mut tracker = Tracker::new(BASE);
    tracker.on_recent_history(&[], 1, now);
    let updates = tracker.on_recent_history(&recent, 2, now).updates;
    assert_eq!(results(&updates)[0]["status"], "success");
    assert_eq!(states(&updates)[0]["state"], "success");
    assert!(tracker.on_recent_history(&recent, 3, now).updates.is_empty(), "reported once");
}

fn event(kind: &str, pid: &str, extra: &str) -> TextEvent {
    parse_text(&format!(r#"{{"type":"{kind}","data":{{"prompt_id":"{pid}"{extra}}}}}"#)).expect("frame")
}

#[test]
fn a_hundred_thousand_prompt_ids_stay_within_the_bounds_and_ask_history_a_bounded_number_of_times() {
    let mut tracker = Tracker::new(BASE);
    let start = Instant::now();
    tracker.expect("mine", Some("req-1".into()), &json!({"1": {"class_type": "X", "inputs": {}}}), start);
    tracker.accepted("mine", 1, start);
    let mut lookups = 0;
    for i in 0..100_000u64 {
        let pid = format!("flood-{i}");
        let now = start + Duration::from_micros(i);
        let begun = tracker.on_event(&event("execution_start", &pid, r#","timestamp":1"#), 2 + i, now);
        assert!(begun.lookups.is_empty());
        // Each ends without a terminal event: only history can say how.
        let ended = tracker.on_event(&event("executing", &pid, r#","node":null"#), 2 + i, now);
        lookups += ended.lookups.len();
        assert!(tracker.live() <= MAX_LIVE);
    }
    assert_eq!(tracker.live(), MAX_LIVE);
    assert_eq!(tracker.forgotten(), 100_000 + 1 - MAX_LIVE as u64);
    assert_eq!(lookups, MAX_PENDING_LOOKUPS, "no answers yet: only the first slots were asked");
    assert_eq!(tracker.lookups_requested(), MAX_PENDING_LOOKUPS as u64);
    assert_eq!(tracker.request_id("mine"), Some("req-1"), "the bridge's own prompt is forgotten last");

    // Answers come: each frees a slot for one waiting prompt still tracked, never a forgotten one.
    let mut asked: Vec<String> = Vec::new();
    let mut answered = 0;
    let mut next = (0..MAX_PENDING_LOOKUPS).map(|i| format!("flood-{i}")).collect::<VecDeque<_>>();
    while let Some(pid) = next.pop_front() {
        let effects = tracker.on_history(&pid, None, 200_000);
        answered += 1;
        for id in effects.lookups {
            assert!(!asked.contains(&id), "{id} asked twice");
            asked.push(id.clone());
            next.push_back(id);
        }
    }
    assert!(answered <= MAX_LIVE + MAX_PENDING_LOOKUPS, "{answered} lookups in all");
    assert_eq!(tracker.live(), 1, "every flood prompt ended (cancelled: unknown to history)");
    assert_eq!(tracker.lookups_pending(), 0);
}

#[test]
fn a_lookup_is_asked_once_and_waiting_ones_get_the_free_slots() {
    let mut tracker = Tracker::new(BASE);
    let t0 = Instant::now();
    let ids: Vec<String> = (0..MAX_PENDING_LOOKUPS + 3).map(|i| format!("p{i:02}")).collect();
    let pending = json!({"queue_running": [], "queue_pending": ids.iter().map(|id| json!([1, id, {}, {}, []])).collect::<Vec<_>>()});
    tracker.on_queue(&QueueSnapshot::parse(&pending).expect("queue"), t0, 1, t0);
    let t1 = t0 + Duration::from_millis(5);
    let first = tracker.on_queue(&QueueSnapshot::default(), t1, 2, t1).lookups;
    assert_eq!(first, ids[..MAX_PENDING_LOOKUPS]);
    assert!(tracker.on_queue(&QueueSnapshot::default(), t1, 3, t1).lookups.is_empty(), "asked already");
    let end = event("executing", &ids[0], r#","node":null"#);
    assert!(tracker.on_event(&end, 4, t1).lookups.is_empty(), "asked already");

    let history = fixture("history.success.json");
    let entry = history.as_object().and_then(|h| h.values().next()).expect("entry");
    let effects = tracker.on_history(&ids[0], Some(entry), 5);
    assert_eq!(results(&effects.updates)[0]["status"], "success");
    assert_eq!(effects.lookups, [ids[MAX_PENDING_LOOKUPS].clone()], "a freed slot goes to the next waiting one");
}

#[test]
fn an_unanswered_lookup_is_asked_again_later() {
    let mut tracker = Tracker::new(BASE);
    let now = Instant::now();
    tracker.on_event(&event("execution_start", "p", r#","timestamp":1"#), 1, now);
    assert_eq!(tracker.on_event(&event("executing", "p", r#","node":null"#), 2, now).lookups, ["p"]);
    assert!(tracker.on_event(&event("progress", "q", r#","value":1,"max":2"#), 60_000, now).lookups.is_empty());
    // The resync worker gave up; three minutes on, the next input asks again.
    let later = tracker.on_event(&event("progress", "q", r#","value":2,"max":2"#), 200_000, now);
    assert_eq!(later.lookups, ["p"]);
    assert_eq!(tracker.lookups_pending(), 1);
}

#[test]
fn a_queue_of_a_hundred_thousand_tracks_its_head_only() {
    let mut tracker = Tracker::new(BASE);
    let now = Instant::now();
    let items: Vec<Value> = (0..100_000).map(|i| json!([i, format!("q{i:06}"), {}, {}, []])).collect();
    let queue = QueueSnapshot::parse(&json!({"queue_running": [], "queue_pending": items})).expect("queue");
    let effects = tracker.on_queue(&queue, now, 1, now);
    assert!(tracker.live() < MAX_LIVE);
    assert!(effects.updates.len() < MAX_LIVE);
    assert_eq!(tracker.forgotten(), 0, "nothing was forgotten: the rest is not tracked yet");
    assert!(tracker.on_queue(&queue, now, 2, now).updates.is_empty(), "nothing new, nothing published");
}

#[test]
fn foreign_ids_too_long_are_not_tracked_and_outputs_held_are_bounded() {
    let mut tracker = Tracker::new(BASE);
    let now = Instant::now();
    let long = "x".repeat(MAX_ID_BYTES + 1);
    assert!(tracker.on_event(&event("execution_start", &long, r#","timestamp":1"#), 1, now).updates.is_empty());
    assert_eq!(tracker.live(), 0);

    // 20 events of 1 MiB of outputs each: more than the tracker holds.
    let image = format!(r#"{{"filename":"{}.png","subfolder":"","type":"output"}}"#, "i".repeat(16_000));
    let images = vec![image.as_str(); 64].join(",");
    let executed = event("executed", "p", &format!(r#","node":"9","output":{{"images":[{images}]}}"#));
    for i in 0..20 {
        tracker.on_event(&executed, 2 + i, now);
    }
    let done = tracker.on_event(&event("execution_success", "p", r#","timestamp":3"#), 200, now);
    let result = results(&done.updates).remove(0);
    let kept = result["outputs"]["9"]["images"].as_array().map_or(0, Vec::len);
    assert!(kept > 0 && kept * 16_000 <= MAX_OUTPUT_BYTES, "{kept} images kept");
}

#[test]
fn a_waiting_ask_shows_in_the_state_until_it_ends_or_the_next_node_runs() {
    let mut tracker = Tracker::new(BASE);
    let now = Instant::now();
    let event = |text: &str| parse_text(text).expect("frame");
    tracker.on_event(&event(r#"{"type":"execution_start","data":{"prompt_id":"p"}}"#), 1, now);
    let started = tracker.ask_started("p", "k1", "approve", now);
    let state = parse(&started.updates[0]);
    assert_eq!(
        (state["state"].as_str(), &state["ask"]),
        (Some("waiting"), &json!({"ask_id": "k1", "subject": "approve"}))
    );
    assert!(started.updates[0].lifecycle);
    assert!(tracker.ask_started("p", "k1", "approve", now).updates.is_empty(), "the same ask again says nothing");
    assert!(tracker.ask_ended("p", "other", now).updates.is_empty(), "another ask's end changes nothing");
    let ended = parse(&tracker.ask_ended("p", "k1", now).updates[0]);
    assert_eq!(ended["state"], "running");
    assert!(ended.get("ask").is_none());

    // An ask whose end was never heard stops at the next node.
    tracker.ask_started("p", "k2", "approve", now);
    let next = tracker.on_event(&event(r#"{"type":"executing","data":{"node":"9","prompt_id":"p"}}"#), 2, now);
    assert_eq!(states(&next.updates).last().expect("state")["state"], "running");
    assert!(tracker.ask_started("done-already", "k", "s", now).updates.len() == 1, "an ask names its prompt");
}

#[test]
fn a_history_entry_without_its_outputs_yet_is_read_once_more() {
    let history = fixture("history.success.json");
    let (pid, full) = history.as_object().and_then(|h| h.iter().next()).expect("entry");
    assert!(full["prompt"][4].as_array().is_some_and(|o| !o.is_empty()), "the fixture names its output nodes");
    let mut early = full.clone();
    early["outputs"] = json!({});
    let now = Instant::now();
    let mut tracker = Tracker::new(BASE);
    tracker.on_recent_history(&[], 1, now);

    // Seen in recent history right after execution_success: no result yet, a lookup instead.
    let effects = tracker.on_recent_history(&[(pid.clone(), early.clone())], 2, now);
    assert!(effects.updates.is_empty(), "{:?}", effects.updates);
    assert_eq!(effects.lookups, [pid.as_str()]);
    let updates = tracker.on_history(pid, Some(full), 3).updates;
    let result = &results(&updates)[0];
    assert_eq!(result["status"], "success");
    assert!(result["outputs"].as_object().is_some_and(|o| !o.is_empty()), "{result}");

    // Only once: an entry still without outputs then ends the prompt as it is.
    let mut tracker = Tracker::new(BASE);
    tracker.on_recent_history(&[], 1, now);
    assert_eq!(tracker.on_recent_history(&[(pid.clone(), early.clone())], 2, now).lookups, [pid.as_str()]);
    let updates = tracker.on_history(pid, Some(&early), 3).updates;
    assert_eq!(results(&updates).len(), 1);
    assert_eq!(results(&updates)[0]["outputs"], json!({}));
}
