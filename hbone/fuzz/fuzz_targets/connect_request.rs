//! Fuzz the HBONE server's request parsing: method, `:authority` and the `forwarded`,
//! `baggage` and `traceparent` headers, as they arrive from any peer.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xff: method, authority, then header name/value pairs.
    let mut parts = data.split(|b| *b == 0xff);
    let method = parts.next().and_then(|m| Method::from_bytes(m).ok()).unwrap_or(Method::CONNECT);
    let authority = parts.next().map(String::from_utf8_lossy);
    let mut headers = HeaderMap::new();
    while let (Some(n), Some(v)) = (parts.next(), parts.next()) {
        let name = match n.first().map(|b| b % 4) {
            Some(0) => HeaderName::from_static("forwarded"),
            Some(1) => HeaderName::from_static("baggage"),
            Some(2) => HeaderName::from_static("traceparent"),
            _ => match HeaderName::from_bytes(n) {
                Ok(h) => h,
                Err(_) => continue,
            },
        };
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(name, v);
        }
    }
    if let Ok(p) = hbone::wire::parse_connect(&method, authority.as_deref(), &headers) {
        // Whatever parses must round-trip through our own request builder.
        let mut r = hbone::wire::ConnectRequest::new(p.target);
        r.forwarded_for = p.forwarded_for;
        r.baggage = p.baggage.clone();
        r.traceparent = p.traceparent.clone();
        let req = r.try_to_http(|b| b.fill(1)).expect("a parsed request builds");
        let again = hbone::wire::parse_connect(req.method(), req.uri().authority().map(|a| a.as_str()), req.headers())
            .expect("our own request parses");
        assert_eq!(again.target, p.target);
        assert_eq!(again.forwarded_for, p.forwarded_for);
    }
});
