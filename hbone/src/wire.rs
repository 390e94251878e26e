//! The HBONE wire contract (Istio-compatible): `CONNECT` with `:authority` = `ip:port`, and
//! the request headers `forwarded`, `baggage`, `traceparent`. Pure functions, no I/O, so the
//! server's parsing is table-tested and fuzzed.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};

/// Response codes of an HBONE server.
pub mod status {
    use http::StatusCode;
    pub const OK: StatusCode = StatusCode::OK;
    /// Authorization policy denied the connection.
    pub const DENIED: StatusCode = StatusCode::UNAUTHORIZED;
    /// The upstream connect failed.
    pub const UPSTREAM_FAILED: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
    /// Malformed or unserved authority.
    pub const BAD_AUTHORITY: StatusCode = StatusCode::BAD_REQUEST;
    /// Anything but CONNECT.
    pub const NOT_CONNECT: StatusCode = StatusCode::METHOD_NOT_ALLOWED;
}

/// Workload metadata carried in `baggage` (W3C baggage, Istio's keys). Istio's ztunnel
/// sends `k8s.cluster.name=<cluster>,k8s.namespace.name=<ns>,k8s.<kind>.name=<workload>,
/// service.name=<canonical name>,service.version=<canonical revision>` (newer versions add
/// `cloud.region` and `cloud.availability_zone`, ignored here). Client-supplied: telemetry
/// only, never identity or policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    pub workload_name: Option<String>,
    /// `deployment`, `pod`, … — sent as `k8s.<kind>.name=<workload_name>`.
    pub workload_kind: Option<String>,
    pub service_name: Option<String>,
    pub service_version: Option<String>,
}

impl Baggage {
    pub fn to_header(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(c) = &self.cluster {
            parts.push(format!("k8s.cluster.name={c}"));
        }
        if let Some(ns) = &self.namespace {
            parts.push(format!("k8s.namespace.name={ns}"));
        }
        if let Some(name) = &self.workload_name {
            let kind = self.workload_kind.as_deref().unwrap_or("pod");
            parts.push(format!("k8s.{kind}.name={name}"));
        }
        if let Some(s) = &self.service_name {
            parts.push(format!("service.name={s}"));
        }
        if let Some(v) = &self.service_version {
            parts.push(format!("service.version={v}"));
        }
        (!parts.is_empty()).then(|| parts.join(","))
    }

    /// [`Baggage::to_header`] as a header value whose bytes are shared: render it once per
    /// source workload and configuration and give every request a clone (a reference count,
    /// no copy). `None` when empty or not a valid header value (a control character).
    pub fn to_header_value(&self) -> Option<HeaderValue> {
        HeaderValue::from_maybe_shared(bytes::Bytes::from(self.to_header()?)).ok()
    }

    pub fn parse(h: &str) -> Baggage {
        let mut b = Baggage::default();
        for kv in h.split(',') {
            let Some((k, v)) = kv.trim().split_once('=') else {
                continue;
            };
            let v = v.trim().to_string();
            // The fixed `k8s.cluster.name` / `k8s.namespace.name` keys before the
            // generic `k8s.<kind>.name` (a workload of kind `deployment`, `pod`, …).
            match k.trim() {
                "k8s.cluster.name" => b.cluster = Some(v),
                "k8s.namespace.name" => b.namespace = Some(v),
                "service.name" => b.service_name = Some(v),
                "service.version" => b.service_version = Some(v),
                k if k.starts_with("k8s.") && k.ends_with(".name") && k.len() > 9 => {
                    let kind = &k[4..k.len() - 5];
                    if !kind.contains('.') {
                        b.workload_kind = Some(kind.to_string());
                        b.workload_name = Some(v);
                    }
                }
                _ => {}
            }
        }
        b
    }
}

/// What a client asks an HBONE server for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub target: SocketAddr,
    /// Original client address (`forwarded: for=`).
    pub forwarded_for: Option<IpAddr>,
    /// Service hostname when the target is a service (`forwarded: host=`).
    pub host: Option<String>,
    pub baggage: Baggage,
    /// The `baggage` header already rendered ([`Baggage::to_header_value`]); sent instead
    /// of `baggage` when set, so a caller that sends the same baggage on every request
    /// renders it once.
    pub baggage_header: Option<HeaderValue>,
    /// Kept if the caller has one; generated otherwise.
    pub traceparent: Option<String>,
}

impl ConnectRequest {
    pub fn new(target: SocketAddr) -> Self {
        ConnectRequest {
            target,
            forwarded_for: None,
            host: None,
            baggage: Baggage::default(),
            baggage_header: None,
            traceparent: None,
        }
    }

    /// The HTTP/2 request. `random` fills a fresh trace id when none is given. A `forwarded`
    /// host or a baggage field that is not valid in a header value (a control character) is
    /// an error naming the header, for the caller to refuse the connection with; it never
    /// panics.
    pub fn try_to_http(&self, random: impl FnOnce(&mut [u8])) -> Result<Request<()>, BadHeader> {
        use std::fmt::Write as _;
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        // An `ip:port` always parses as an authority-form URI.
        let mut text = String::with_capacity(64);
        let _ = write!(text, "{}", self.target);
        *req.uri_mut() = http::Uri::from_maybe_shared(bytes::Bytes::from(text))
            .expect("ip:port is a valid authority");
        let headers = req.headers_mut();
        let mut fwd = String::new();
        if let Some(ip) = self.forwarded_for {
            let _ = match ip {
                IpAddr::V4(v4) => write!(fwd, "for={v4}"),
                IpAddr::V6(v6) => write!(fwd, "for=\"[{v6}]\""),
            };
        }
        if let Some(h) = &self.host {
            if !fwd.is_empty() {
                fwd.push(';');
            }
            fwd.push_str("host=");
            fwd.push_str(h);
        }
        if !fwd.is_empty() {
            match HeaderValue::from_maybe_shared(bytes::Bytes::from(fwd)) {
                Ok(v) => drop(headers.insert(http::header::FORWARDED, v)),
                Err(_) => return Err(BadHeader("forwarded")),
            }
        }
        let baggage = match &self.baggage_header {
            Some(v) => Some(v.clone()),
            None => {
                let v = self.baggage.to_header_value();
                if v.is_none() && self.baggage.to_header().is_some() {
                    return Err(BadHeader("baggage"));
                }
                v
            }
        };
        if let Some(v) = baggage {
            headers.insert(BAGGAGE, v);
        }
        let tp = match &self.traceparent {
            Some(t) if valid_traceparent(t) => HeaderValue::from_str(t).ok(),
            _ => {
                let mut id = [0u8; 24];
                random(&mut id);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let mut t = Vec::with_capacity(55);
                t.extend_from_slice(b"00-");
                for (i, x) in id.iter().enumerate() {
                    if i == 16 {
                        t.push(b'-');
                    }
                    t.push(HEX[usize::from(x >> 4)]);
                    t.push(HEX[usize::from(x & 15)]);
                }
                t.extend_from_slice(b"-01");
                HeaderValue::from_maybe_shared(bytes::Bytes::from(t)).ok()
            }
        };
        if let Some(tp) = tp {
            headers.insert(TRACEPARENT, tp);
        }
        Ok(req)
    }
}

/// A CONNECT request header whose value would not be a valid header value (a control
/// character in a host name or a baggage field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {0} header of the CONNECT request would hold a byte not allowed in a header value")]
pub struct BadHeader(pub &'static str);

const BAGGAGE: http::HeaderName = http::HeaderName::from_static("baggage");
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
pub fn valid_traceparent(t: &str) -> bool {
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    };
    let mut p = t.split('-');
    let (Some(version), Some(trace), Some(span), Some(flags), None) =
        (p.next(), p.next(), p.next(), p.next(), p.next())
    else {
        return false;
    };
    hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|c| c != b'0')
        && hex(span, 16)
        && span.bytes().any(|c| c != b'0')
        && hex(flags, 2)
}

/// What the server reads from a request before deciding anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedConnect {
    pub target: SocketAddr,
    pub forwarded_for: Option<IpAddr>,
    pub host: Option<String>,
    pub baggage: Baggage,
    pub traceparent: Option<String>,
}

/// Validate a request as an HBONE CONNECT; the error is the status to answer with.
pub fn parse_connect(
    method: &Method,
    authority: Option<&str>,
    headers: &HeaderMap,
) -> Result<ParsedConnect, StatusCode> {
    if method != Method::CONNECT {
        return Err(status::NOT_CONNECT);
    }
    let target = parse_authority(authority.ok_or(status::BAD_AUTHORITY)?)?;
    let text = |name: &http::HeaderName| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let (mut forwarded_for, mut host) = (None, None);
    if let Some(f) = text(&http::header::FORWARDED) {
        // Only the first element (closest to the original client) matters here.
        for pair in f.split(',').next().unwrap_or("").split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            let k = k.trim();
            if k.eq_ignore_ascii_case("for") {
                forwarded_for = v
                    .trim_start_matches('[')
                    .split(']')
                    .next()
                    .and_then(|s| s.parse().ok())
            } else if k.eq_ignore_ascii_case("host") {
                host = Some(v.to_string())
            }
        }
    }
    Ok(ParsedConnect {
        target,
        forwarded_for,
        host,
        baggage: text(&BAGGAGE).map(Baggage::parse).unwrap_or_default(),
        traceparent: text(&TRACEPARENT)
            .filter(|t| valid_traceparent(t))
            .map(str::to_string),
    })
}

/// `ip:port` or `[ipv6]:port`, port non-zero; nothing else (no names, no userinfo).
pub fn parse_authority(a: &str) -> Result<SocketAddr, StatusCode> {
    let addr: SocketAddr = a.parse().map_err(|_| status::BAD_AUTHORITY)?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(status::BAD_AUTHORITY);
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The baggage of Deployment `sleep` (service `sleep`, version `v1`) in `default` of
    /// cluster `Kubernetes`.
    fn sleep_baggage() -> Baggage {
        Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload_name: Some("sleep".into()),
            workload_kind: Some("deployment".into()),
            service_name: Some("sleep".into()),
            service_version: Some("v1".into()),
        }
    }

    #[test]
    fn request_roundtrip() {
        let mut r = ConnectRequest::new("10.0.0.5:8080".parse().unwrap());
        r.forwarded_for = Some("10.0.0.1".parse().unwrap());
        r.host = Some("echo.default.svc.cluster.local".into());
        r.baggage = sleep_baggage();
        let req = r.try_to_http(|b| b.fill(7)).unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "10.0.0.5:8080");
        let p = parse_connect(
            req.method(),
            req.uri().authority().map(|a| a.as_str()),
            req.headers(),
        )
        .unwrap();
        assert_eq!(p.target, r.target);
        assert_eq!(p.forwarded_for, r.forwarded_for);
        assert_eq!(p.host, r.host);
        assert_eq!(p.baggage, r.baggage);
        assert!(valid_traceparent(p.traceparent.as_deref().unwrap()));
    }

    /// A host or baggage field with a byte not allowed in a header value (a workload named
    /// `web\x07`) makes `try_to_http` an error naming the header, never a panic.
    #[test]
    fn a_bad_header_value_is_an_error_not_a_panic() {
        let mut r = ConnectRequest::new("10.0.0.5:8080".parse().unwrap());
        r.forwarded_for = Some("10.0.0.1".parse().unwrap());
        r.host = Some("echo\x07.default".into());
        r.baggage = sleep_baggage();
        assert_eq!(
            r.try_to_http(|b| b.fill(7)).unwrap_err(),
            BadHeader("forwarded")
        );
        r.host = Some("echo.default".into());
        r.baggage.workload_name = Some("web\x07".into());
        assert_eq!(
            r.try_to_http(|b| b.fill(7)).unwrap_err(),
            BadHeader("baggage")
        );
        r.baggage.workload_name = Some("web\r\nx-injected: 1".into());
        assert_eq!(
            r.try_to_http(|b| b.fill(7)).unwrap_err(),
            BadHeader("baggage")
        );
        // Valid values: a request with all three headers.
        r.baggage = sleep_baggage();
        let strict = r.try_to_http(|b| b.fill(7)).unwrap();
        assert_eq!(strict.headers().len(), 3);
    }

    /// A pre-rendered `baggage` is sent as given (the same shared bytes on every request)
    /// and in place of the `baggage` fields; without one the fields are rendered.
    #[test]
    fn prerendered_baggage_is_sent_instead_of_the_fields() {
        let mut r = ConnectRequest::new("[fd00::5]:8080".parse().unwrap());
        r.baggage = sleep_baggage();
        let fields = r.try_to_http(|b| b.fill(1)).unwrap();
        assert_eq!(
            fields.headers()["baggage"],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,\
             k8s.deployment.name=sleep,service.name=sleep,service.version=v1"
        );
        let other = Baggage {
            namespace: Some("shop".into()),
            ..Baggage::default()
        };
        let v = other.to_header_value().unwrap();
        r.baggage_header = Some(v.clone());
        for _ in 0..2 {
            let req = r.try_to_http(|b| b.fill(1)).unwrap();
            let sent = &req.headers()["baggage"];
            assert_eq!(sent, "k8s.namespace.name=shop");
            assert_eq!(
                sent.as_bytes().as_ptr(),
                v.as_bytes().as_ptr(),
                "shared, not copied"
            );
            assert_eq!(req.headers().get_all("baggage").iter().count(), 1);
            assert_eq!(req.uri().to_string(), "[fd00::5]:8080");
        }
        assert_eq!(Baggage::default().to_header_value(), None);
    }

    #[test]
    fn traceparent_kept_or_generated() {
        let mut r = ConnectRequest::new("10.0.0.5:80".parse().unwrap());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        r.traceparent = Some(tp.into());
        assert_eq!(r.try_to_http(|_| {}).unwrap().headers()["traceparent"], tp);
        r.traceparent = Some("garbage".into());
        let gen = r.try_to_http(|b| b.fill(0xab)).unwrap().headers()["traceparent"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(valid_traceparent(&gen), "{gen}");
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn bad_requests_get_the_right_status() {
        let h = HeaderMap::new();
        assert_eq!(
            parse_connect(&Method::GET, Some("10.0.0.1:80"), &h).unwrap_err(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            parse_connect(&Method::POST, None, &h).unwrap_err(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:0",
            "0.0.0.0:80",
            "echo:80",
            "user@10.0.0.1:80",
            "10.0.0.1:99999",
            "[::1]",
            "10.0.0.1:80/x",
        ] {
            assert_eq!(
                parse_connect(&Method::CONNECT, Some(bad), &h).unwrap_err(),
                StatusCode::BAD_REQUEST,
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_connect(&Method::CONNECT, None, &h).unwrap_err(),
            StatusCode::BAD_REQUEST
        );
        assert!(parse_connect(&Method::CONNECT, Some("[fd00::1]:443"), &h).is_ok());
    }

    #[test]
    fn forwarded_ipv6_and_quotes() {
        let mut h = HeaderMap::new();
        h.insert(
            "forwarded",
            HeaderValue::from_static("for=\"[fd00::7]\";host=a.b, for=10.0.0.9"),
        );
        let p = parse_connect(&Method::CONNECT, Some("10.0.0.1:80"), &h).unwrap();
        assert_eq!(p.forwarded_for, Some("fd00::7".parse().unwrap()));
        assert_eq!(p.host.as_deref(), Some("a.b"));
        // Parameter names are case-insensitive (RFC 7239).
        h.insert(
            "forwarded",
            HeaderValue::from_static("For=10.0.0.9; HOST=c.d"),
        );
        let p = parse_connect(&Method::CONNECT, Some("10.0.0.1:80"), &h).unwrap();
        assert_eq!(p.forwarded_for, Some("10.0.0.9".parse().unwrap()));
        assert_eq!(p.host.as_deref(), Some("c.d"));
    }

    /// Istio's ztunnel's baggage, as it writes it (`k8s.cluster.name` first): the cluster
    /// and namespace are not read as a workload of kind `cluster` / `namespace`.
    #[test]
    fn baggage_parses_istios_ztunnel_header() {
        let h = "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,\
                 k8s.deployment.name=sleep,service.name=sleep,service.version=v1";
        let b = Baggage::parse(h);
        assert_eq!(b, sleep_baggage());
        assert_eq!(b.to_header().as_deref(), Some(h));
        // Newer Istio adds the locality; a bare pod is `k8s.pod.name`; the workload arm
        // is order-independent (cluster and namespace after it).
        let b = Baggage::parse(
            "k8s.pod.name=web-0,k8s.namespace.name=shop,k8s.cluster.name=east,\
             service.name=web,service.version=latest,cloud.region=eu-west1,\
             cloud.availability_zone=eu-west1-b",
        );
        assert_eq!(b.cluster.as_deref(), Some("east"));
        assert_eq!(b.namespace.as_deref(), Some("shop"));
        assert_eq!(b.workload_kind.as_deref(), Some("pod"));
        assert_eq!(b.workload_name.as_deref(), Some("web-0"));
        assert_eq!(b.service_version.as_deref(), Some("latest"));
        // Keys that only look like a workload (`k8s.name`, which used to slice out of
        // bounds, `k8s..name`, `k8s.a.b.name`) are ignored.
        let b = Baggage::parse(
            "k8s.name=w,k8s..name=x,k8s.cluster.uid.name=y,k8s.cronjob.name=nightly",
        );
        assert_eq!(b.workload_kind.as_deref(), Some("cronjob"));
        assert_eq!(b.workload_name.as_deref(), Some("nightly"));
        assert_eq!(b.cluster, None);
    }
}
