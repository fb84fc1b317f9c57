//! The `Date` a server adds to a response that has none (RFC 9110 6.6.1), as Envoy and
//! hyper do: formatted once a second per thread, not per response.
use std::{
    cell::RefCell,
    time::{SystemTime, UNIX_EPOCH},
};

use http::HeaderValue;

thread_local! {
    static CACHED: RefCell<(u64, HeaderValue)> =
        const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
}

/// Runs `f` on the current `Date` value.
fn with_now<R>(f: impl FnOnce(&HeaderValue) -> R) -> R {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, value)| {
        if *at != secs
            && let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now))
        {
            *value = v;
            *at = secs;
        }
        f(value)
    })
}

/// `date: <IMF-fixdate>\r\n`, for an HTTP/1.1 head.
pub fn write_field(out: &mut Vec<u8>) {
    with_now(|v| {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// The value, for a header map (a reference-counted copy).
pub fn value() -> HeaderValue {
    with_now(HeaderValue::clone)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_date_reads_back_as_now() {
        let v = super::value();
        let when = httpdate::parse_http_date(v.to_str().expect("ascii")).expect("IMF-fixdate");
        let off = std::time::SystemTime::now()
            .duration_since(when)
            .expect("not in the future");
        assert!(off.as_secs() <= 1, "{v:?}");
        let mut out = Vec::new();
        super::write_field(&mut out);
        assert!(out.starts_with(b"date: ") && out.ends_with(b" GMT\r\n"));
    }
}
