//! How long to wait before retrying a throttled or failed request. I/O-free and clock-free: the
//! jitter comes in as a number, so the arithmetic is tested exactly.

use std::time::Duration;

/// The `Retry-After` header in seconds, as Graph sends it. (The HTTP-date form is not used by
/// Graph; it falls back to backoff.)
pub fn retry_after(header: Option<&str>) -> Option<Duration> {
    header?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Exponential backoff with jitter: `base · 2^attempt`, capped at `cap`, of which the first
/// half is always waited and the second half scaled by `jitter` (in `[0, 1]`), so that many
/// collectors throttled together do not come back together.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let factor = 1u32 << attempt.min(20);
    let full = base.saturating_mul(factor).min(cap);
    let half = full / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// The wait before retry number `attempt + 1`: what the server asked for, or backoff when it
/// did not say, never longer than `max_wait`.
pub fn wait_before_retry(
    asked: Option<Duration>,
    attempt: u32,
    base: Duration,
    cap: Duration,
    max_wait: Duration,
    jitter: f64,
) -> Duration {
    asked
        .unwrap_or_else(|| backoff(attempt, base, cap, jitter))
        .min(max_wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(retry_after(Some("1")), Some(S));
        assert_eq!(retry_after(Some(" 120 ")), Some(120 * S));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(retry_after(Some("-3")), None);
        assert_eq!(retry_after(None), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        assert_eq!(backoff(0, S, 60 * S, 0.0), S / 2);
        assert_eq!(backoff(0, S, 60 * S, 1.0), S);
        assert_eq!(backoff(3, S, 60 * S, 0.0), 4 * S);
        assert_eq!(backoff(3, S, 60 * S, 0.5), 6 * S);
        assert_eq!(backoff(10, S, 60 * S, 1.0), 60 * S);
        assert_eq!(
            backoff(u32::MAX, S, 60 * S, 2.0),
            60 * S,
            "no overflow, jitter clamped"
        );
    }

    #[test]
    fn the_server_is_obeyed_within_the_bound() {
        let wait = |asked| wait_before_retry(asked, 0, S, 60 * S, 120 * S, 0.0);
        assert_eq!(wait(Some(S)), S);
        assert_eq!(wait(Some(Duration::ZERO)), Duration::ZERO);
        assert_eq!(wait(Some(3600 * S)), 120 * S);
        assert_eq!(wait(None), S / 2);
    }
}
