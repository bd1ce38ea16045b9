use super::*;
use crate::comfy::event::tests::recorded_frames;
use crate::config::Settings;

fn replay(scenario: &str, settings: &Settings) -> Vec<Arc<Outbound>> {
    let mut router = Router::new(&Config::from(settings));
    let start = Instant::now();
    let mut out = router.route(Inbound::Connected, start);
    for (i, frame) in recorded_frames(scenario).into_iter().enumerate() {
        // Frames 100 ms apart, as if ComfyUI were running normally.
        let now = start + Duration::from_millis(100 * i as u64);
        let inbound = match frame {
            Ok(text) => Inbound::Text(text.into(), 1_795_000_000_000 + i as u64),
            Err(bytes) => Inbound::Binary(Bytes::from(bytes), 1_795_000_000_000 + i as u64),
        };
        out.extend(router.route(inbound, now));
    }
    out
}

fn topic(msg: &Outbound) -> String {
    msg.route.mqtt_topic("comfyui")
}

fn json(msg: &Outbound) -> serde_json::Value {
    serde_json::from_slice(&msg.payload).expect("envelope is JSON")
}

#[test]
fn success_run_routes_every_frame_with_untouched_data_and_gapless_seq() {
    let settings = Settings::default();
    let out = replay("a_success", &settings);
    let pid = "b5ce2ae5-3b1f-4ded-aabc-98cde2f52de0";
    assert_eq!(topic(&out[0]), "comfyui/local/comfyui/availability");
    let derived = |m: &Outbound| matches!(m.route.last(), "state" | "result");
    let envelopes: Vec<_> = out.iter().filter(|m| m.payload.starts_with(b"{") && !derived(m)).collect();
    let results: Vec<_> = out.iter().filter(|m| m.route.last() == "result").collect();
    assert_eq!(results.len(), 1, "one result per prompt");
    assert_eq!(topic(results[0]), format!("comfyui/local/prompt/{pid}/result"));
    let texts: Vec<_> = recorded_frames("a_success").into_iter().filter_map(Result::ok).collect();
    let seqs: Vec<u64> = envelopes.iter().map(|m| json(m)["seq"].as_u64().expect("seq")).collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "seq increases: {seqs:?}");
    assert_eq!(envelopes.len(), texts.len(), "one envelope per text frame");
    for (msg, original) in envelopes.iter().zip(&texts) {
        let original: serde_json::Value = serde_json::from_str(original).expect("json");
        let env = json(msg);
        assert_eq!(env["data"], original["data"]);
        assert_eq!(env["type"], original["type"]);
        assert_eq!(env["instance"], "local");
    }
    let topics: Vec<String> = out.iter().map(|m| topic(m)).collect();
    for expected in [
        format!("comfyui/local/prompt/{pid}/execution_start"),
        format!("comfyui/local/prompt/{pid}/node/2/progress"),
        format!("comfyui/local/prompt/{pid}/node/2/preview"),
        format!("comfyui/local/prompt/{pid}/node/4/executed"),
        format!("comfyui/local/prompt/{pid}/execution_success"),
        format!("comfyui/local/prompt/{pid}/executing"),
        "comfyui/local/status".to_string(),
        "comfyui/local/preview".to_string(),
    ] {
        assert!(topics.contains(&expected), "missing {expected} in {topics:#?}");
    }
}

#[test]
fn qos_retain_and_classes_follow_the_interface_table() {
    let out = replay("a_success", &Settings::default());
    for msg in &out {
        let t = topic(msg);
        let (qos, retain) = match t.rsplit('/').next() {
            Some("progress" | "preview") => (0, false),
            Some("status") => (1, true),
            Some("availability") => (1, true),
            _ => (1, false),
        };
        let retain = retain && t != "comfyui/local/preview";
        assert_eq!((msg.qos, msg.retain), (qos, retain), "{t}");
    }
}

#[test]
fn legacy_previews_are_attributed_to_the_executing_prompt_and_node() {
    let out = replay("a_success_legacy_previews", &Settings::default());
    let previews: Vec<_> = out.iter().filter(|m| m.route.last() == "preview" && m.route.levels().len() > 2).collect();
    assert!(!previews.is_empty(), "type-1 previews routed to a node");
    for p in previews {
        assert!(p.payload.starts_with(b"\x89PNG"));
        assert_eq!(p.route.levels()[4], "2", "the SleepProgress node");
        assert!(p.headers.iter().any(|(k, v)| *k == "Content-Type" && v == "image/png"));
    }
}

#[test]
fn previews_are_rate_limited_per_node() {
    let mut settings = Settings::default();
    settings.previews.max_per_second = 0.5;
    let out = replay("a_success", &settings);
    let per_node = out.iter().filter(|m| m.route.levels().len() > 2 && m.route.last() == "preview").count();
    assert_eq!(per_node, 1, "frames 100 ms apart, one allowed per 2 s");
    settings.previews.enabled = false;
    let out = replay("a_success", &settings);
    assert!(!out.iter().any(|m| !m.headers.is_empty()), "previews disabled");
}

#[test]
fn the_preview_rate_limit_remembers_a_bounded_number_of_nodes() {
    let mut router = Router::new(&Config::from(&Settings::default()));
    let now = Instant::now();
    let preview = |i: usize| {
        let meta = format!(r#"{{"prompt_id":"p{i}","node_id":"{i}","image_type":"image/png"}}"#);
        let mut frame = 4u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        frame.extend_from_slice(meta.as_bytes());
        frame.extend_from_slice(b"png");
        Inbound::Binary(Bytes::from(frame), 1)
    };
    for i in 0..100_000 {
        assert!(!router.route(preview(i), now).is_empty(), "each node's first preview passes");
    }
    assert!(router.last_preview.len() <= MAX_PREVIEW_KEYS, "{} keys kept", router.last_preview.len());
    assert!(router.route(preview(99_999), now).is_empty(), "a recent node is still throttled");
}

#[test]
fn subgraph_and_expanded_node_ids_are_escaped_and_in_the_payload() {
    let out = replay("j_node_ids", &Settings::default());
    let topics: Vec<String> = out.iter().map(|m| topic(m)).collect();
    assert!(topics.iter().any(|t| t.contains("/node/7:9:3/")), "{topics:#?}");
    let expanded = out
        .iter()
        .find(|m| topic(m).contains("=2E") && m.payload.starts_with(b"{"))
        .expect("an expanded node id routed");
    let level = expanded.route.levels()[4];
    let original = crate::bus::topics::unescape(level).expect("reversible");
    assert_eq!(json(expanded)["node_id"], original.as_str());
}

#[test]
fn custom_events_and_text_frames_route_without_a_prompt() {
    let out = replay("g_custom_events", &Settings::default());
    let topics: Vec<String> = out.iter().map(|m| topic(m)).collect();
    assert!(topics.contains(&"comfyui/local/event/bridge_probe=2Ecustom".to_string()), "{topics:#?}");
    assert!(topics.iter().any(|t| t.ends_with("/text")), "progress text routed: {topics:#?}");
}

#[test]
fn malformed_frames_are_skipped_but_use_a_seq() {
    let mut router = Router::new(&Config::from(&Settings::default()));
    let now = Instant::now();
    assert!(router.route(Inbound::Text("{not json".into(), 1), now).is_empty());
    assert!(router.route(Inbound::Binary(Bytes::from_static(&[0, 0, 0, 7]), 2), now).is_empty());
    let out = router.route(Inbound::Text(r#"{"type":"x","data":{}}"#.into(), 3), now);
    assert_eq!(json(&out[0])["seq"], 3, "a subscriber can see the gap");
}

/// The envelope as serde_json serialises it: the reference the hand-written envelope must match byte for byte.
#[derive(serde::Serialize)]
struct SerdeEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    data: &'a RawValue,
    instance: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<&'a str>,
    seq: u64,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[test]
fn envelopes_are_byte_for_byte_what_serde_json_writes() {
    let awkward = ["", "local", "a\"b", "back\\slash", "tab\tnew\nline\u{1}", "ünï=2E", "\u{7f}", "12:5"];
    for instance in awkward {
        let mut settings = Settings::default();
        settings.bridge.instance = instance.to_string();
        let mut router = Router::new(&Config::from(&settings));
        let workflow = serde_json::json!({"3": {}});
        router.tracker.expect("p\"1", Some("req\n7".into()), &workflow, Instant::now());
        for (i, text) in awkward.iter().enumerate() {
            router.seq = [0, 1, 9, 10, 99, 1_000_000, u64::MAX - 1, u64::MAX][i];
            let data = RawValue::from_string(r#"{ "value": 1, "x": "é\"" }"#.into()).expect("json");
            let ts = [0, 7, u64::MAX][i % 3];
            for (pid, nid) in [(None, None), (Some(*text), None), (Some("p\"1"), Some(*text)), (None, Some("3"))] {
                let got = router.envelope(text, data.get(), pid, nid, ts);
                let request_id = pid.and_then(|p| router.tracker.request_id(p));
                let envelope = SerdeEnvelope {
                    kind: text,
                    data: &data,
                    instance,
                    prompt_id: pid,
                    node_id: nid,
                    seq: router.seq,
                    ts,
                    request_id,
                };
                let want = serde_json::to_vec(&envelope).expect("serialises");
                assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
                // The same through the route cache: made on the first event of a key, reused on the next.
                for _ in 0..2 {
                    let (route, cached) = router.event_message(text, data.get(), pid, nid, ts);
                    assert_eq!(String::from_utf8_lossy(&cached), String::from_utf8_lossy(&want));
                    assert_eq!(route, Route::for_event(instance, text, pid, nid));
                }
            }
        }
    }
}

#[test]
fn numbers_are_written_as_serde_json_writes_them() {
    let edges = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1_000, 65_535, 1_795_000_000_000, u64::MAX - 1, u64::MAX];
    let powers = (0..20).flat_map(|e| [10u64.pow(e) - 1, 10u64.pow(e), 10u64.pow(e) + 1]);
    for n in edges.into_iter().chain(powers) {
        let mut out = Vec::new();
        json_u64(&mut out, n);
        assert_eq!(out, serde_json::to_vec(&n).expect("a number serializes"), "{n}");
    }
}

#[test]
fn cached_routes_are_the_routes_of_their_own_key() {
    let mut cache = RouteCache::new();
    let long = "p".repeat(ROUTE_KEY_MAX + 1);
    let mut keys: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    for p in 0..40 {
        for kind in ["progress", "executing", "status", "x.y"] {
            keys.push((kind.into(), Some(format!("prompt-{p}")), Some(format!("{}", p % 7))));
            keys.push((kind.into(), Some(format!("prompt-{p}")), None));
            keys.push((kind.into(), None, None));
        }
    }
    keys.push(("progress".into(), Some(long.clone()), Some("1".into())));
    keys.push(("progress".into(), Some(String::new()), Some(String::new())));
    // Twice over, so the second round is served from the cache where it can be.
    for _ in 0..2 {
        for (kind, pid, nid) in &keys {
            let (pid, nid) = (pid.as_deref(), nid.as_deref());
            let cached = cache.for_event("local", kind, pid, nid);
            assert_eq!(cached, Route::for_event("local", kind, pid, nid), "{kind} {pid:?} {nid:?}");
        }
    }
    let first = cache.for_event("local", "progress", Some("prompt-1"), Some("1"));
    let again = cache.for_event("local", "progress", Some("prompt-1"), Some("1"));
    assert!(std::ptr::eq(first.as_str(), again.as_str()), "one route shared by the events of one node");
}
