//! A route's CORS policy, as Envoy's CORS filter applies it: a preflight from an allowed
//! origin is answered here and never reaches the service; other requests from an allowed
//! origin get `Access-Control-Allow-Origin` (and friends) added to whatever answers them.
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use crate::routing::Cors;

/// What the CORS policy decided for one request.
pub enum Decision<B> {
    /// Not a CORS request, or one from an origin the policy does not allow: leave it be.
    Pass,
    /// A CORS request from an allowed origin: add these to the response.
    Annotate(HeaderValue),
    /// A preflight the proxy answers itself.
    Answer(Response<B>),
}

impl Cors {
    fn allows(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }

    /// `empty` builds the body of a preflight answer.
    pub fn decide<B>(
        &self,
        method: &Method,
        headers: &HeaderMap,
        empty: impl FnOnce() -> B,
    ) -> Decision<B> {
        let Some(origin) = headers.get(header::ORIGIN).filter(|o| !o.is_empty()) else {
            return Decision::Pass;
        };
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        let requested_method = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .filter(|m| !m.is_empty());
        let preflight = method == Method::OPTIONS && requested_method.is_some();
        if !preflight || (!allowed && self.forward_unmatched_preflights) {
            return if allowed {
                Decision::Annotate(origin.clone())
            } else {
                Decision::Pass
            };
        }
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::OK;
        let h = r.headers_mut();
        if allowed {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        }
        if self.allow_credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        // "*" echoes what the browser asked for, as Envoy does.
        let echo_or = |configured: &str, asked: Option<&HeaderValue>| -> Option<HeaderValue> {
            match configured {
                "" => None,
                "*" => asked.cloned(),
                list => HeaderValue::from_str(list).ok(),
            }
        };
        if let Some(v) = echo_or(&self.allow_methods, requested_method) {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        let asked_headers = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS);
        if let Some(v) = echo_or(&self.allow_headers, asked_headers) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(v) = self
            .max_age
            .as_deref()
            .and_then(|a| HeaderValue::from_str(a).ok())
        {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, v);
        }
        Decision::Answer(r)
    }

    /// The headers a response to an allowed CORS request carries.
    pub fn annotate(&self, response: &mut HeaderMap, origin: HeaderValue) {
        response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.allow_credentials {
            response.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Ok(v) = HeaderValue::from_str(&self.expose_headers)
            && !self.expose_headers.is_empty()
        {
            response.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Matcher;

    fn policy(forward: bool) -> Cors {
        Cors {
            allow_origins: vec![Matcher::Exact("https://app.example.com".into())],
            allow_methods: "GET,POST".into(),
            allow_headers: "*".into(),
            expose_headers: "x-trace".into(),
            max_age: Some("86400".into()),
            allow_credentials: true,
            forward_unmatched_preflights: forward,
        }
    }

    fn request(origin: &str, preflight: bool) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_str(origin).expect("origin"),
        );
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_REQUEST_METHOD,
                HeaderValue::from_static("POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                HeaderValue::from_static("content-type,x-token"),
            );
        }
        h
    }

    #[test]
    fn an_allowed_preflight_is_answered_with_the_policy() {
        let d = policy(true).decide(
            &Method::OPTIONS,
            &request("https://app.example.com", true),
            || (),
        );
        let Decision::Answer(r) = d else {
            panic!("not answered")
        };
        let h = r.headers();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "GET,POST");
        // "*" echoes the requested headers.
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "content-type,x-token"
        );
        assert_eq!(h[header::ACCESS_CONTROL_MAX_AGE], "86400");
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
    }

    #[test]
    fn an_unmatched_preflight_is_forwarded_or_answered_bare() {
        let other = request("https://evil.example.org", true);
        assert!(matches!(
            policy(true).decide(&Method::OPTIONS, &other, || ()),
            Decision::Pass
        ));
        let Decision::Answer(r) = policy(false).decide(&Method::OPTIONS, &other, || ()) else {
            panic!("IGNORE must answer")
        };
        assert!(
            r.headers()
                .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                .is_none()
        );
    }

    #[test]
    fn simple_requests_are_annotated_only_from_allowed_origins() {
        let p = policy(true);
        let Decision::Annotate(origin) = p.decide(
            &Method::GET,
            &request("https://app.example.com", false),
            || (),
        ) else {
            panic!("allowed origin not annotated")
        };
        let mut h = HeaderMap::new();
        p.annotate(&mut h, origin);
        assert_eq!(h[header::ACCESS_CONTROL_EXPOSE_HEADERS], "x-trace");
        assert!(matches!(
            p.decide(
                &Method::GET,
                &request("https://evil.example.org", false),
                || ()
            ),
            Decision::Pass
        ));
        assert!(matches!(
            p.decide(&Method::GET, &HeaderMap::new(), || ()),
            Decision::Pass
        ));
    }
}
