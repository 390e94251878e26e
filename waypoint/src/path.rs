//! Request path normalization, as Istio's default `pathNormalization: BASE` does it before
//! authorization, routing and the upstream request (Envoy's `normalize_path`):
//!
//! 1. each percent-encoded **unreserved** character (RFC 3986 §2.3: `A-Z a-z 0-9 - . _ ~`,
//!    hex digits of either case) is decoded, once (`%252e` stays `%252e`); every other
//!    escape is kept as it is — notably `%2F` and `%5C`, which Envoy's default
//!    (`path_with_escaped_slashes_action` unset: keep unchanged) neither decodes nor
//!    rejects; `%00` makes the request invalid;
//! 2. a backslash is a slash;
//! 3. dot segments are removed (RFC 3986 §5.2.4 `remove_dot_segments`: `/a/./b` → `/a/b`,
//!    `/a/../b` → `/b`, `/..` above the root stays at the root; a trailing `.` or `..`
//!    leaves the trailing slash).
//!
//! Consecutive slashes are **not** merged (that is `MERGE_SLASHES`, not the default). The
//! path must start with `/` (origin form); the query is not part of it and is untouched.

use std::borrow::Cow;

/// Why a path cannot be normalized: the request is answered `400`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// Not origin form (does not start with `/`).
    NotAbsolute,
    /// `%00`.
    EncodedNul,
}

/// `path` (without its query) normalized as Istio's `BASE`; borrowed when it is already
/// normal (the usual case: no `%`, `\` nor dot segment), so most requests copy nothing.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(BadPath::NotAbsolute);
    }
    if !needs_work(b) {
        return Ok(Cow::Borrowed(path));
    }
    // 1 and 2: decode unreserved escapes, backslash to slash.
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    let c = h << 4 | l;
                    if c == 0 {
                        return Err(BadPath::EncodedNul);
                    }
                    if is_unreserved(c) {
                        decoded.push(c);
                    } else {
                        decoded.extend_from_slice(&b[i..i + 3]);
                    }
                    i += 3;
                }
                _ => {
                    decoded.push(b'%');
                    i += 1;
                }
            },
            b'\\' => {
                decoded.push(b'/');
                i += 1;
            }
            c => {
                decoded.push(c);
                i += 1;
            }
        }
    }
    // 3: dot segments, over whole segments (the input starts with `/`).
    let out = remove_dot_segments(&decoded);
    // Only ASCII bytes were replaced by ASCII bytes and whole segments moved: still UTF-8.
    let s = String::from_utf8(out).expect("normalization keeps UTF-8");
    if s == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(s))
    }
}

/// Whether `b` may change: an escape, a backslash, or a segment starting with a dot.
fn needs_work(b: &[u8]) -> bool {
    b.iter()
        .enumerate()
        .any(|(i, &c)| c == b'%' || c == b'\\' || (c == b'.' && b[i - 1] == b'/'))
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §5.2.4 for an absolute path (starting with `/`), segment by segment: each
/// segment is the text after a `/` up to the next one.
fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    // Segments after the leading slash; a `.` or `..` as the last segment leaves the
    // output ending in a slash (the directory), as the RFC's rules B and C do.
    let segs: Vec<&[u8]> = path[1..].split(|&c| c == b'/').collect();
    let last = segs.len() - 1;
    for (k, seg) in segs.iter().enumerate() {
        match *seg {
            b"." => {
                if k == last {
                    out.push(b'/');
                }
            }
            b".." => {
                // Drop the last output segment (and its slash), if any.
                let cut = out.iter().rposition(|&c| c == b'/').unwrap_or(0);
                out.truncate(cut);
                if k == last {
                    out.push(b'/');
                }
            }
            s => {
                out.push(b'/');
                out.extend_from_slice(s);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_path_borrows() {
        for p in ["/", "/a/b", "/a.b/c.", "/a//b", "/a/b/"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }
}
