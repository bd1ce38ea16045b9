//! The one retry delay: exponential from 250 ms, capped, with jitter so many bridges do not retry in step. Every
//! reconnect (ComfyUI, MQTT, the NATS request intake) and every retried ComfyUI read waits by it.

use std::time::Duration;

const FIRST_DELAY_MS: u64 = 250;

/// The delay before reconnect attempt `attempt` (0-based): `min(cap, 250ms · 2^attempt)`, scaled by a random
/// factor in `[0.5, 1.0]`.
pub fn delay(attempt: u32, cap_ms: u64) -> Duration {
    let base = FIRST_DELAY_MS.saturating_mul(1u64 << attempt.min(20)).min(cap_ms.max(1));
    let jittered = base / 2 + fastrand::u64(0..=base / 2);
    Duration::from_millis(jittered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_stay_under_the_cap_with_jitter() {
        for attempt in 0..40 {
            let ms = delay(attempt, 30_000).as_millis() as u64;
            let base = (250u64 << attempt.min(20)).min(30_000);
            assert!(ms >= base / 2 && ms <= base, "attempt {attempt}: {ms} vs {base}");
        }
        assert!(delay(0, 30_000) <= Duration::from_millis(250));
        assert!(delay(30, 1_000) <= Duration::from_millis(1_000));
    }
}
