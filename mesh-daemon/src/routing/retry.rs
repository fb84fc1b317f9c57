//! A route's retry policy as Istio hands it to Envoy, and Envoy's `retryOn` conditions.
use std::time::Duration;

use serde::Serialize;

use crate::config::istio::networking::HttpRetry;

/// Envoy's default base interval of the exponential back-off between retries.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// The `retryOn` conditions Envoy knows (and Istio passes through).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// Any 5xx response, and no response at all (connect failure, reset, per-try timeout).
    pub server_error: bool,
    /// 502, 503, 504, and no response at all.
    pub gateway_error: bool,
    /// No response: disconnect, reset, per-try timeout, connect failure.
    pub reset: bool,
    pub connect_failure: bool,
    /// An HTTP/2 stream the upstream refused (REFUSED_STREAM).
    pub refused_stream: bool,
    /// 409.
    pub retriable_4xx: bool,
    /// The codes listed in `RetryPolicy::status_codes`.
    pub retriable_status_codes: bool,
    // gRPC statuses in the response headers (trailers-only responses).
    pub cancelled: bool,
    pub deadline_exceeded: bool,
    pub internal: bool,
    pub resource_exhausted: bool,
    pub unavailable: bool,
}

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    ConnectFailure,
    RefusedStream,
    /// Reset or disconnect before the response headers.
    Reset,
    PerTryTimeout,
    /// A response: its status and, for gRPC, its `grpc-status`.
    Response {
        status: u16,
        grpc: Option<u8>,
    },
    /// The proxy's own connection-pool limit: never retried.
    Overflow,
    /// The destination's AuthorizationPolicy refused the connection: never retried (a
    /// sidecar's 403 is not retried either).
    Denied,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub status_codes: Vec<u16>,
    pub backoff_base: Duration,
}

impl RetryPolicy {
    /// Istio's default for routes without `retries`: two retries on connect-failure,
    /// refused-stream, unavailable and cancelled; Istio before 1.24 also retried 503.
    pub fn istio_default(retry_503: bool) -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                unavailable: true,
                cancelled: true,
                retriable_status_codes: retry_503,
                ..Default::default()
            },
            status_codes: if retry_503 { vec![503] } else { vec![] },
            backoff_base: DEFAULT_BACKOFF,
        }
    }

    /// Istio's `ConvertPolicy`: no `retries` is the default policy, `attempts: 0` turns
    /// retries off, an empty `retryOn` keeps the default conditions, numeric entries are
    /// retriable status codes.
    pub fn from_route(r: Option<&HttpRetry>, retry_503_by_default: bool) -> Option<Self> {
        let mut p = Self::istio_default(retry_503_by_default);
        let Some(r) = r else { return Some(p) };
        let attempts = u32::try_from(r.attempts.unwrap_or(0)).unwrap_or(0);
        if attempts == 0 {
            return None;
        }
        p.attempts = attempts;
        if let Some(on) = r.retry_on.as_deref().filter(|s| !s.trim().is_empty()) {
            let (conditions, codes) = parse_retry_on(on);
            p.on = conditions;
            p.status_codes = codes;
        }
        p.per_try_timeout = r.per_try_timeout.map(|d| d.0);
        p.backoff_base = r.backoff.map_or(DEFAULT_BACKOFF, |d| d.0);
        Some(p)
    }

    /// Whether Envoy would retry after `f` under this policy.
    pub fn retries(&self, f: Failure) -> bool {
        let on = &self.on;
        let no_response = on.server_error || on.gateway_error || on.reset;
        match f {
            Failure::ConnectFailure => no_response || on.connect_failure,
            Failure::RefusedStream => no_response || on.refused_stream,
            Failure::Reset | Failure::PerTryTimeout => no_response,
            Failure::Overflow | Failure::Denied => false,
            Failure::Response { status, grpc } => {
                (on.server_error && (500..600).contains(&status))
                    || (on.gateway_error && matches!(status, 502..=504))
                    || (on.retriable_4xx && status == 409)
                    || (on.retriable_status_codes && self.status_codes.contains(&status))
                    || grpc.is_some_and(|g| {
                        (on.cancelled && g == 1)
                            || (on.deadline_exceeded && g == 4)
                            || (on.resource_exhausted && g == 8)
                            || (on.internal && g == 13)
                            || (on.unavailable && g == 14)
                    })
            }
        }
    }

    /// Envoy's back-off before retry `n` (1 for the first): uniformly random up to
    /// (2^n - 1) x base, never more than ten times the base.
    pub fn backoff(&self, n: u32, unit_random: f64) -> Duration {
        let factor = (1u64 << n.min(20)) - 1;
        let ceiling = self
            .backoff_base
            .saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX))
            .min(self.backoff_base.saturating_mul(10));
        ceiling.mul_f64(unit_random.clamp(0.0, 1.0))
    }
}

/// Splits `retryOn` into conditions and status codes; a code implies
/// `retriable-status-codes`, as Istio adds it.
pub fn parse_retry_on(s: &str) -> (RetryOn, Vec<u16>) {
    let mut on = RetryOn::default();
    let mut codes = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if let Ok(code) = item.parse::<u16>() {
            codes.push(code);
            on.retriable_status_codes = true;
            continue;
        }
        match item {
            "5xx" => on.server_error = true,
            "gateway-error" => on.gateway_error = true,
            "reset" | "reset-before-request" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "refused-stream" => on.refused_stream = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "retriable-status-codes" => on.retriable_status_codes = true,
            "cancelled" => on.cancelled = true,
            "deadline-exceeded" => on.deadline_exceeded = true,
            "internal" => on.internal = true,
            "resource-exhausted" => on.resource_exhausted = true,
            "unavailable" => on.unavailable = true,
            // Envoy conditions Sidelane has nothing to apply to (retriable-headers,
            // envoy-ratelimited, http3-post-connect-failure) are ignored.
            _ => {}
        }
    }
    (on, codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16) -> Failure {
        Failure::Response { status, grpc: None }
    }

    #[test]
    fn the_tutorial_policy_retries_refusals_but_not_503() {
        let r = HttpRetry {
            attempts: Some(3),
            retry_on: Some(
                "connect-failure,refused-stream,unavailable,cancelled,retriable-4xx".into(),
            ),
            ..Default::default()
        };
        let p = RetryPolicy::from_route(Some(&r), false).expect("retries on");
        assert_eq!(p.attempts, 3);
        assert!(p.retries(Failure::ConnectFailure));
        assert!(p.retries(Failure::RefusedStream));
        assert!(p.retries(resp(409)));
        assert!(!p.retries(resp(503)));
        assert!(!p.retries(Failure::Reset));
        assert!(p.retries(Failure::Response {
            status: 200,
            grpc: Some(14)
        }));
    }

    #[test]
    fn istio_defaults_changed_in_1_24() {
        let now = RetryPolicy::from_route(None, false).expect("default");
        assert_eq!(now.attempts, 2);
        assert!(now.retries(Failure::ConnectFailure));
        assert!(!now.retries(resp(503)));
        let before = RetryPolicy::from_route(None, true).expect("default");
        assert!(before.retries(resp(503)));
        assert!(!before.retries(resp(500)));
        // attempts: 0 turns retries off.
        let off = HttpRetry {
            attempts: Some(0),
            ..Default::default()
        };
        assert_eq!(RetryPolicy::from_route(Some(&off), false), None);
    }

    #[test]
    fn conditions_follow_envoy() {
        let (on, codes) = parse_retry_on("5xx");
        let p = RetryPolicy {
            on,
            status_codes: codes,
            ..RetryPolicy::istio_default(false)
        };
        assert!(p.retries(resp(500)) && p.retries(resp(503)));
        assert!(p.retries(Failure::Reset) && p.retries(Failure::PerTryTimeout));
        assert!(!p.retries(resp(404)));
        let (on, codes) = parse_retry_on("gateway-error, 418");
        let p = RetryPolicy {
            on,
            status_codes: codes,
            ..RetryPolicy::istio_default(false)
        };
        assert!(p.retries(resp(502)) && !p.retries(resp(500)));
        assert!(
            p.retries(resp(418)),
            "numeric codes are retriable-status-codes"
        );
        assert!(p.retries(Failure::ConnectFailure));
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let p = RetryPolicy::istio_default(false);
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(25));
        assert_eq!(p.backoff(2, 1.0), Duration::from_millis(75));
        assert_eq!(p.backoff(3, 0.5), Duration::from_micros(87_500));
        assert_eq!(p.backoff(9, 1.0), Duration::from_millis(250));
        assert_eq!(p.backoff(4, 0.0), Duration::ZERO);
    }
}
