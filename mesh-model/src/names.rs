//! The syntax of the names and texts the model carries into headers, baggage, certificates
//! and telemetry: Kubernetes' rules for object names (DNS-1123 label and subdomain) and label
//! keys and values, and SPIFFE's for a trust domain. The local configuration is checked
//! against them at load, so that a control character or a `,` in a workload's name is an
//! error naming the field, not a bad header on every connection of that workload.
//!
//! Each check returns why a text does not conform.

/// A DNS-1123 label (namespace and service names): 1–63 of `a-z`, `0-9`, `-`, starting and
/// ending alphanumeric.
pub fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("{s:?} is longer than 63 characters"));
    }
    label_chars(s, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'
    })
    .map_err(|why| format!("{s:?} is not a DNS-1123 label (a-z, 0-9, '-'): {why}"))
}

/// A DNS-1123 subdomain (pod, workload, service account, node names; hostnames): at most
/// 253 characters, DNS-1123 labels joined by `.`.
pub fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    for part in s.split('.') {
        label_chars(part, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'
        })
        .map_err(|why| format!("{s:?} is not a DNS-1123 subdomain (a-z, 0-9, '-', '.'): {why}"))?;
    }
    Ok(())
}

/// A service hostname, by Istio's rule for hosts (`ValidateWildcardDomain`): at most 255
/// characters; the first label `*`, or a DNS label of `A-Z a-z 0-9 -` (starting and ending
/// alphanumeric) optionally behind `*` or `*-`; every further label such a DNS label, the
/// last one not all digits, and a trailing `.` allowed (`istio.io.`). Labels are at most 63
/// characters. Case is kept as written (labels, headers); services are told apart and found
/// by [`host_key`], whatever the case and trailing dot.
pub fn hostname(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 255 {
        return Err(format!("{s:?} is longer than 255 characters"));
    }
    let bad = |why: String| format!("{s:?} is not a valid hostname: {why}");
    let (first, rest) = match s.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (s, None),
    };
    if first != "*" {
        let name = first
            .strip_prefix("*-")
            .or_else(|| first.strip_prefix('*'))
            .unwrap_or(first);
        host_label(first.len(), name).map_err(|why| bad(format!("label {first:?}: {why}")))?;
    }
    let Some(rest) = rest else { return Ok(()) };
    let rest = rest.strip_suffix('.').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(());
    }
    let mut labels = rest.split('.').peekable();
    while let Some(label) = labels.next() {
        host_label(label.len(), label).map_err(|why| bad(format!("label {label:?}: {why}")))?;
        if labels.peek().is_none() && label.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad(format!("the top-level label {label:?} is all digits")));
        }
    }
    Ok(())
}

/// A hostname as services are found by it (a SOCKS5 name) and told apart: ASCII lower case,
/// without trailing `.`s, so `Echo.Shop.` and `echo.shop` name the same host.
pub fn host_key(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

/// One DNS label of a hostname (`len` counts a wildcard prefix too).
fn host_label(len: usize, name: &str) -> Result<(), String> {
    if len > 63 {
        return Err("longer than 63 characters".into());
    }
    label_chars(name, |c| c.is_ascii_alphanumeric() || c == b'-')
}

/// A Kubernetes label value: empty, or at most 63 of `A-Z a-z 0-9 - _ .`, starting and
/// ending alphanumeric.
pub fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    if s.len() > 63 {
        return Err(format!("{s:?} is longer than 63 characters"));
    }
    label_chars(s, label_value_char).map_err(|why| {
        format!("{s:?} is not a valid label value (A-Z, a-z, 0-9, '-', '_', '.'): {why}")
    })
}

/// A Kubernetes label (or annotation) key: `[prefix/]name`, the prefix a DNS-1123 subdomain,
/// the name as a non-empty label value.
pub fn label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        dns_subdomain(p).map_err(|why| format!("key {s:?}: prefix: {why}"))?;
    }
    if name.is_empty() {
        return Err(format!("key {s:?}: the name must not be empty"));
    }
    label_value(name).map_err(|why| format!("key {s:?}: {why}"))
}

/// A SPIFFE trust domain: 1–255 of `a-z 0-9 . - _`.
pub fn trust_domain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 255 {
        return Err(format!("{s:?} must be 1-255 characters"));
    }
    match s.bytes().find(|c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_'))
    }) {
        Some(c) => Err(format!(
            "{s:?} is not a SPIFFE trust domain (a-z, 0-9, '.', '-', '_'): {}",
            shown(c)
        )),
        None => Ok(()),
    }
}

/// Free text that ends up in a header or a metric label (a uid, a subject alt name): visible
/// ASCII, no spaces, none of `,;="\`.
pub fn token(s: &str) -> Result<(), String> {
    match s
        .bytes()
        .find(|c| !c.is_ascii_graphic() || matches!(c, b',' | b';' | b'=' | b'"' | b'\\'))
    {
        Some(c) => Err(format!(
            "{s:?} may hold only visible ASCII other than , ; = \" \\: {}",
            shown(c)
        )),
        None => Ok(()),
    }
}

fn label_value_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')
}

/// Non-empty, every byte `ok`, first and last alphanumeric.
fn label_chars(s: &str, ok: impl Fn(u8) -> bool) -> Result<(), String> {
    let b = s.as_bytes();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return Err("an empty part".into());
    };
    if let Some(&c) = b.iter().find(|&&c| !ok(c)) {
        return Err(shown(c));
    }
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

fn shown(c: u8) -> String {
    if c.is_ascii_graphic() {
        format!("{:?} is not allowed", char::from(c))
    } else {
        format!("byte 0x{c:02x} is not allowed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_name_rules() {
        for ok in ["a", "web-1", "x9", &"a".repeat(63)] {
            assert_eq!(dns_label(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "web\x07",
            "-a",
            "a-",
            "a.b",
            "a_b",
            &"a".repeat(64),
        ] {
            assert!(dns_label(bad).is_err(), "{bad:?}");
        }
        for ok in ["a", "echo.ns.svc.cluster.local", "web-1.x"] {
            assert_eq!(dns_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a b", "a,b", "é"] {
            assert!(dns_subdomain(bad).is_err(), "{bad:?}");
        }
        // Hosts Istio's ValidateWildcardDomain accepts, and ones it refuses.
        for ok in [
            "*",
            "*.example.com",
            "*foo.example.com",
            "*-foo.example.com",
            "bar.com",
            "Bar.COM",
            "istio.io.",
            "*.",
            "123",
            "x-y.svc.cluster.local",
            &format!("{}.com", "a".repeat(63)),
            &vec!["a".repeat(63); 4].join("."),
        ] {
            assert_eq!(hostname(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            ".a",
            "a.*.com",
            "*foo*.com",
            "**.com",
            "-a.com",
            "a-.com",
            "*-.com",
            "a_b.com",
            "a b.com",
            "a,b",
            "istio.io..",
            "a.123",
            &format!("{}.com", "a".repeat(64)),
            &format!("*{}.com", "a".repeat(63)),
            &"a.".repeat(128),
        ] {
            assert!(hostname(bad).is_err(), "{bad:?}");
        }
        for ok in ["", "v1", "Kubernetes", "a_b.c-d", &"A".repeat(63)] {
            assert_eq!(label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["_a", "a ", "a,b", "a=b", "a\r\nx: y", &"A".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad:?}");
        }
        for ok in ["app", "istio.io/use-waypoint", "app.kubernetes.io/name"] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        for bad in ["", "istio.io/", "/a", "Istio.io/a", "a b"] {
            assert!(label_key(bad).is_err(), "{bad:?}");
        }
        assert_eq!(trust_domain("cluster.local"), Ok(()));
        assert!(trust_domain("Cluster.local").is_err());
        assert_eq!(token("cluster1//Pod/ns/web"), Ok(()));
        assert!(token("a b").is_err());
        assert!(token("a,b").is_err());
        assert_eq!(
            dns_label("web\x07").unwrap_err(),
            "\"web\\u{7}\" is not a DNS-1123 label (a-z, 0-9, '-'): byte 0x07 is not allowed"
        );
    }
}
