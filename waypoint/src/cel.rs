//! The part of CEL (Common Expression Language) that Istio's Telemetry access-log
//! `filter.expression` is written in, over Envoy's request attributes: a filter such as
//! `response.code >= 400 || request.headers['x-debug'] == 'on'` is parsed and checked at
//! load (an error names the field), then evaluated for each request the log would take.
//! Metrics `tagOverrides` values (`request.host`, `request.headers['x-tenant']`) are such
//! expressions too, taken as text ([`Expr::text`]).
//!
//! * **Values**: integers (`400`, `400u`), strings (`'…'` or `"…"`, with `\\`, `\'`, `\"`,
//!   `\n`, `\t` escapes), `true`/`false`, durations (`duration('1.5s')`).
//! * **Attributes** (Envoy's names): `request.method`, `request.path` (with the query),
//!   `request.url_path` (without), `request.host`, `request.scheme` (`http`),
//!   `request.protocol`, `request.id` (`x-request-id`), `request.useragent`,
//!   `request.size` (its `content-length`, as Envoy takes it when there is one; else its
//!   bytes as the request metrics count them), `request.total_size` (those bytes),
//!   `request.duration`, `request.headers['name']` (any case), `response.code`,
//!   `response.size` and `response.total_size` (the response's bytes as the metrics count
//!   them), `response.flags` (Envoy's short string, e.g. `UF`; `-` for none),
//!   `source.address`, `destination.address`, `destination.port`.
//! * **Operators**: `==`, `!=`, `<`, `<=`, `>`, `>=` (integers, durations; strings and
//!   booleans for `==`/`!=`), `&&`, `||`, `!`, parentheses; string methods `startsWith`,
//!   `endsWith`, `contains`, `matches` (a regular expression, compiled at load).
//!
//! As in Envoy, an expression that fails for a request (a missing header, a comparison of
//! different types) does not match it; `&&` and `||` tolerate an error on the side that
//! does not decide (CEL's commutative logic).

use std::net::IpAddr;
use std::time::Duration;

use regex::Regex;

/// A parsed filter expression.
#[derive(Debug, Clone)]
pub struct Expr(Node);

/// The facts of one request an expression reads.
pub struct Input<'a> {
    pub record: &'a crate::http1::Record<'a>,
    pub source: IpAddr,
    /// The tunnel's destination (the CONNECT target).
    pub destination: Option<std::net::SocketAddr>,
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attr {
    Method,
    Path,
    UrlPath,
    Host,
    Scheme,
    Protocol,
    Id,
    UserAgent,
    RequestSize,
    RequestTotalSize,
    Duration,
    Code,
    ResponseSize,
    ResponseTotalSize,
    Flags,
    SourceAddress,
    DestinationAddress,
    DestinationPort,
}

const ATTRS: [(&str, Attr); 18] = [
    ("request.method", Attr::Method),
    ("request.path", Attr::Path),
    ("request.url_path", Attr::UrlPath),
    ("request.host", Attr::Host),
    ("request.scheme", Attr::Scheme),
    ("request.protocol", Attr::Protocol),
    ("request.id", Attr::Id),
    ("request.useragent", Attr::UserAgent),
    ("request.size", Attr::RequestSize),
    ("request.total_size", Attr::RequestTotalSize),
    ("request.duration", Attr::Duration),
    ("response.code", Attr::Code),
    ("response.size", Attr::ResponseSize),
    ("response.total_size", Attr::ResponseTotalSize),
    ("response.flags", Attr::Flags),
    ("source.address", Attr::SourceAddress),
    ("destination.address", Attr::DestinationAddress),
    ("destination.port", Attr::DestinationPort),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Debug, Clone)]
enum Node {
    Int(i64),
    Str(String),
    Bool(bool),
    Duration(Duration),
    Attr(Attr),
    /// `request.headers['name']` (lower-cased).
    Header(String),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    Call(Method, Box<Node>, Box<Node>),
    Matches(Box<Node>, Regex),
}

/// A value an expression yields.
#[derive(Debug, Clone, PartialEq)]
enum Value<'a> {
    Int(i64),
    Str(std::borrow::Cow<'a, str>),
    Bool(bool),
    Duration(Duration),
}

/// An expression that does not apply to a request (a missing header, mismatched types).
struct NoValue;

impl Expr {
    /// Parse and check `text`.
    pub fn parse(text: &str) -> Result<Expr, String> {
        let tokens = lex(text)?;
        let mut p = Parser { tokens, at: 0 };
        let ast = p.or()?;
        if let Some(t) = p.tokens.get(p.at) {
            return Err(format!("unexpected {t:?} after a whole expression"));
        }
        let node = resolve(ast)?;
        Ok(Expr(node))
    }

    /// Whether the request matches (an expression yielding `true`; an error does not).
    pub fn matches(&self, input: &Input<'_>) -> bool {
        matches!(eval(&self.0, input), Ok(Value::Bool(true)))
    }

    /// The expression's value for the request as text (a metric label's value, Telemetry
    /// `tagOverrides`): a string as it is, an integer in decimal, `true`/`false`, a
    /// duration in seconds (`1.5s`); `None` when it has none (a missing header, say).
    pub fn text(&self, input: &Input<'_>) -> Option<String> {
        Some(match eval(&self.0, input).ok()? {
            Value::Str(s) => s.into_owned(),
            Value::Int(v) => v.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Duration(d) => format!("{}s", d.as_secs_f64()),
        })
    }
}

// Lexing -----------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Int(i64),
    Str(String),
    Op(&'static str),
}

fn lex(text: &str) -> Result<Vec<Tok>, String> {
    const OPS: [&str; 16] = [
        "==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "(", ")", "[", "]", ".", ",", "-",
    ];
    let b = text.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(text[start..i].to_string()));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let n = text[start..i]
                .parse()
                .map_err(|_| format!("{:?} is too large", &text[start..i]))?;
            // An unsigned literal (`400u`) compares as the integer it is.
            if i < b.len() && (b[i] == b'u' || b[i] == b'U') {
                i += 1;
            }
            out.push(Tok::Int(n));
        } else if c == b'\'' || c == b'"' {
            let mut s = String::new();
            i += 1;
            loop {
                let Some(&d) = b.get(i) else {
                    return Err("a string without its closing quote".into());
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == b'\\' {
                    let e = *b.get(i).ok_or("a string without its closing quote")?;
                    i += 1;
                    s.push(match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'\\' | b'\'' | b'"' => e as char,
                        _ => return Err(format!("unknown escape \\{}", e as char)),
                    });
                } else {
                    // Whole characters: back up to the byte and take the char there.
                    let ch = text[i - 1..].chars().next().unwrap_or('\u{fffd}');
                    s.push(ch);
                    i += ch.len_utf8() - 1;
                }
            }
            out.push(Tok::Str(s));
        } else {
            let op = OPS
                .iter()
                .find(|op| text[i..].starts_with(**op))
                .ok_or_else(|| {
                    format!("unexpected {:?}", &text[i..].chars().next().unwrap_or(' '))
                })?;
            i += op.len();
            out.push(Tok::Op(op));
        }
    }
    Ok(out)
}

// Parsing ----------------------------------------------------------------

/// The expression as written (names not yet resolved).
#[derive(Debug)]
enum Ast {
    Int(i64),
    Str(String),
    Ident(String),
    Member(Box<Ast>, String),
    Index(Box<Ast>, Box<Ast>),
    Call(Option<Box<Ast>>, String, Vec<Ast>),
    Not(Box<Ast>),
    Neg(Box<Ast>),
    Binary(&'static str, Box<Ast>, Box<Ast>),
}

struct Parser {
    tokens: Vec<Tok>,
    at: usize,
}

impl Parser {
    fn peek_op(&self, op: &str) -> bool {
        matches!(self.tokens.get(self.at), Some(Tok::Op(o)) if *o == op)
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        if self.peek_op(op) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!(
                "expected {op:?}, found {}",
                self.tokens
                    .get(self.at)
                    .map_or("the end".to_string(), |t| format!("{t:?}"))
            ))
        }
    }

    fn or(&mut self) -> Result<Ast, String> {
        let mut left = self.and()?;
        while self.peek_op("||") {
            self.at += 1;
            left = Ast::Binary("||", Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Ast, String> {
        let mut left = self.relation()?;
        while self.peek_op("&&") {
            self.at += 1;
            left = Ast::Binary("&&", Box::new(left), Box::new(self.relation()?));
        }
        Ok(left)
    }

    fn relation(&mut self) -> Result<Ast, String> {
        let left = self.unary()?;
        for op in ["==", "!=", "<=", ">=", "<", ">"] {
            if self.peek_op(op) {
                self.at += 1;
                let right = self.unary()?;
                return Ok(Ast::Binary(op, Box::new(left), Box::new(right)));
            }
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Ast, String> {
        if self.peek_op("!") {
            self.at += 1;
            return Ok(Ast::Not(Box::new(self.unary()?)));
        }
        if self.peek_op("-") {
            self.at += 1;
            return Ok(Ast::Neg(Box::new(self.unary()?)));
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<Ast, String> {
        let mut e = self.primary()?;
        loop {
            if self.peek_op(".") {
                self.at += 1;
                let Some(Tok::Ident(name)) = self.tokens.get(self.at).cloned() else {
                    return Err("expected a name after '.'".into());
                };
                self.at += 1;
                if self.peek_op("(") {
                    let args = self.args()?;
                    e = Ast::Call(Some(Box::new(e)), name, args);
                } else {
                    e = Ast::Member(Box::new(e), name);
                }
            } else if self.peek_op("[") {
                self.at += 1;
                let key = self.or()?;
                self.expect("]")?;
                e = Ast::Index(Box::new(e), Box::new(key));
            } else {
                return Ok(e);
            }
        }
    }

    fn args(&mut self) -> Result<Vec<Ast>, String> {
        self.expect("(")?;
        let mut args = vec![];
        if !self.peek_op(")") {
            args.push(self.or()?);
            while self.peek_op(",") {
                self.at += 1;
                args.push(self.or()?);
            }
        }
        self.expect(")")?;
        Ok(args)
    }

    fn primary(&mut self) -> Result<Ast, String> {
        let t = self
            .tokens
            .get(self.at)
            .cloned()
            .ok_or("an incomplete expression")?;
        self.at += 1;
        match t {
            Tok::Int(n) => Ok(Ast::Int(n)),
            Tok::Str(s) => Ok(Ast::Str(s)),
            Tok::Ident(name) if self.peek_op("(") => Ok(Ast::Call(None, name, self.args()?)),
            Tok::Ident(name) => Ok(Ast::Ident(name)),
            Tok::Op("(") => {
                let e = self.or()?;
                self.expect(")")?;
                Ok(e)
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

/// A dotted name (`request.method`) of `a`, when it is one.
fn dotted(a: &Ast) -> Option<String> {
    match a {
        Ast::Ident(n) => Some(n.clone()),
        Ast::Member(inner, n) => Some(format!("{}.{n}", dotted(inner)?)),
        _ => None,
    }
}

fn resolve(a: Ast) -> Result<Node, String> {
    Ok(match a {
        Ast::Int(n) => Node::Int(n),
        Ast::Str(s) => Node::Str(s),
        Ast::Neg(inner) => match *inner {
            Ast::Int(n) => Node::Int(-n),
            _ => return Err("'-' applies to an integer literal only".into()),
        },
        Ast::Not(inner) => Node::Not(Box::new(resolve(*inner)?)),
        Ast::Binary(op, l, r) => {
            let (l, r) = (Box::new(resolve(*l)?), Box::new(resolve(*r)?));
            match op {
                "&&" => Node::And(l, r),
                "||" => Node::Or(l, r),
                "==" => Node::Cmp(Cmp::Eq, l, r),
                "!=" => Node::Cmp(Cmp::Ne, l, r),
                "<" => Node::Cmp(Cmp::Lt, l, r),
                "<=" => Node::Cmp(Cmp::Le, l, r),
                ">" => Node::Cmp(Cmp::Gt, l, r),
                _ => Node::Cmp(Cmp::Ge, l, r),
            }
        }
        Ast::Index(base, key) => {
            if dotted(&base).as_deref() != Some("request.headers") {
                return Err("only request.headers['name'] can be indexed".into());
            }
            match *key {
                Ast::Str(k) => Node::Header(k.to_ascii_lowercase()),
                _ => return Err("a header is named by a string literal".into()),
            }
        }
        Ast::Call(None, name, mut args) => match (name.as_str(), args.len()) {
            ("duration", 1) => match args.pop() {
                Some(Ast::Str(s)) => Node::Duration(
                    runtime::config::duration::parse(&s)
                        .map_err(|e| format!("duration({s:?}): {e}"))?,
                ),
                _ => return Err("duration() takes a string literal".into()),
            },
            _ => return Err(format!("unknown function {name}() (duration)")),
        },
        Ast::Call(Some(recv), name, mut args) => {
            if args.len() != 1 {
                return Err(format!("{name}() takes one argument"));
            }
            let recv = Box::new(resolve(*recv)?);
            let arg = args.pop().expect("one argument");
            match name.as_str() {
                "matches" => match arg {
                    Ast::Str(re) => Node::Matches(
                        recv,
                        Regex::new(&re).map_err(|e| format!("matches({re:?}): {e}"))?,
                    ),
                    _ => return Err("matches() takes a string literal".into()),
                },
                "startsWith" | "endsWith" | "contains" => {
                    let m = match name.as_str() {
                        "startsWith" => Method::StartsWith,
                        "endsWith" => Method::EndsWith,
                        _ => Method::Contains,
                    };
                    Node::Call(m, recv, Box::new(resolve(arg)?))
                }
                _ => {
                    return Err(format!(
                        "unknown method {name}() (startsWith, endsWith, contains, matches)"
                    ))
                }
            }
        }
        Ast::Ident(_) | Ast::Member(..) => {
            let name = dotted(&a).expect("a dotted name");
            match name.as_str() {
                "true" => Node::Bool(true),
                "false" => Node::Bool(false),
                _ => match ATTRS.iter().find(|(n, _)| *n == name) {
                    Some((_, attr)) => Node::Attr(*attr),
                    None => {
                        let known: Vec<&str> = ATTRS.iter().map(|(n, _)| *n).collect();
                        return Err(format!(
                            "unknown attribute {name} ({}, request.headers['name'])",
                            known.join(", ")
                        ));
                    }
                },
            }
        }
    })
}

// Evaluation -------------------------------------------------------------

fn eval<'a>(n: &'a Node, i: &Input<'a>) -> Result<Value<'a>, NoValue> {
    use std::borrow::Cow;
    let r = i.record;
    Ok(match n {
        Node::Int(v) => Value::Int(*v),
        Node::Str(s) => Value::Str(Cow::Borrowed(s)),
        Node::Bool(b) => Value::Bool(*b),
        Node::Duration(d) => Value::Duration(*d),
        Node::Header(name) => Value::Str(Cow::Borrowed(
            r.head.and_then(|h| h.header(name)).ok_or(NoValue)?,
        )),
        Node::Attr(a) => match a {
            Attr::Method => Value::Str(Cow::Borrowed(r.method)),
            Attr::Path => Value::Str(match r.query {
                None => Cow::Borrowed(r.path),
                Some(q) => Cow::Owned(format!("{}?{q}", r.path)),
            }),
            Attr::UrlPath => Value::Str(Cow::Borrowed(r.path)),
            Attr::Host => Value::Str(Cow::Borrowed(r.host)),
            Attr::Scheme => Value::Str(Cow::Borrowed("http")),
            Attr::Protocol => Value::Str(Cow::Borrowed(r.protocol)),
            Attr::Id => Value::Str(Cow::Borrowed(r.request_id)),
            Attr::UserAgent => Value::Str(Cow::Borrowed(
                r.head.and_then(|h| h.header("user-agent")).ok_or(NoValue)?,
            )),
            Attr::RequestSize => Value::Int(
                r.head
                    .and_then(|h| h.header("content-length"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(r.request_bytes as i64),
            ),
            Attr::RequestTotalSize => Value::Int(r.request_bytes as i64),
            Attr::ResponseSize | Attr::ResponseTotalSize => Value::Int(r.response_bytes as i64),
            Attr::Duration => Value::Duration(i.duration),
            Attr::Code => Value::Int(i64::from(r.status)),
            Attr::Flags => Value::Str(Cow::Borrowed(r.flags)),
            Attr::SourceAddress => Value::Str(Cow::Owned(i.source.to_string())),
            Attr::DestinationAddress => {
                Value::Str(Cow::Owned(i.destination.ok_or(NoValue)?.ip().to_string()))
            }
            Attr::DestinationPort => Value::Int(i64::from(i.destination.ok_or(NoValue)?.port())),
        },
        Node::Not(e) => match eval(e, i)? {
            Value::Bool(b) => Value::Bool(!b),
            _ => return Err(NoValue),
        },
        // CEL's commutative logic: the deciding side wins over an error on the other.
        Node::And(a, b) => match (eval(a, i), eval(b, i)) {
            (Ok(Value::Bool(false)), _) | (_, Ok(Value::Bool(false))) => Value::Bool(false),
            (Ok(Value::Bool(true)), Ok(Value::Bool(true))) => Value::Bool(true),
            _ => return Err(NoValue),
        },
        Node::Or(a, b) => match (eval(a, i), eval(b, i)) {
            (Ok(Value::Bool(true)), _) | (_, Ok(Value::Bool(true))) => Value::Bool(true),
            (Ok(Value::Bool(false)), Ok(Value::Bool(false))) => Value::Bool(false),
            _ => return Err(NoValue),
        },
        Node::Cmp(op, a, b) => {
            let (a, b) = (eval(a, i)?, eval(b, i)?);
            let ord = match (&a, &b) {
                (Value::Int(x), Value::Int(y)) => x.cmp(y),
                (Value::Duration(x), Value::Duration(y)) => x.cmp(y),
                (Value::Str(x), Value::Str(y)) if matches!(op, Cmp::Eq | Cmp::Ne) => x.cmp(y),
                (Value::Bool(x), Value::Bool(y)) if matches!(op, Cmp::Eq | Cmp::Ne) => x.cmp(y),
                _ => return Err(NoValue),
            };
            Value::Bool(match op {
                Cmp::Eq => ord.is_eq(),
                Cmp::Ne => ord.is_ne(),
                Cmp::Lt => ord.is_lt(),
                Cmp::Le => ord.is_le(),
                Cmp::Gt => ord.is_gt(),
                Cmp::Ge => ord.is_ge(),
            })
        }
        Node::Call(m, recv, arg) => match (eval(recv, i)?, eval(arg, i)?) {
            (Value::Str(s), Value::Str(x)) => Value::Bool(match m {
                Method::StartsWith => s.starts_with(x.as_ref()),
                Method::EndsWith => s.ends_with(x.as_ref()),
                Method::Contains => s.contains(x.as_ref()),
            }),
            _ => return Err(NoValue),
        },
        Node::Matches(recv, re) => match eval(recv, i)? {
            Value::Str(s) => Value::Bool(re.is_match(&s)),
            _ => return Err(NoValue),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::{parse_head, Parsed, Record};

    fn check(expr: &str, status: u16, head: &str) -> bool {
        let e = Expr::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        with_input(status, head, |input| e.matches(input))
    }

    /// `f` of a request of `head` answered `status`.
    fn with_input<T>(status: u16, head: &str, f: impl FnOnce(&Input<'_>) -> T) -> T {
        let Parsed::Head(h, _) = parse_head(head.as_bytes()) else {
            panic!("{head}")
        };
        let r = Record {
            protocol: "HTTP/1.1",
            method: &h.method,
            host: h.header("host").unwrap_or(""),
            path: &h.path,
            query: h.query.as_deref(),
            status,
            flags: if status == 503 { "UF" } else { "-" },
            request_bytes: 120,
            response_bytes: 5000,
            started: std::time::Instant::now(),
            traceparent: "",
            span: None,
            head: Some(&h),
            request_id: "id-1",
            denied: None,
        };
        let input = Input {
            record: &r,
            source: "10.1.0.7".parse().unwrap(),
            destination: Some("10.96.0.1:80".parse().unwrap()),
            duration: Duration::from_millis(250),
        };
        f(&input)
    }

    /// Tag values: each kind of value as text; `None` where the request has none.
    #[test]
    fn values_as_text_for_metric_tags() {
        let table: [(&str, Option<&str>); 8] = [
            ("request.host", Some("shop.example")),
            ("request.headers['x-debug']", Some("On")),
            ("request.headers['x-none']", None),
            ("response.code", Some("404")),
            ("response.code >= 400", Some("true")),
            ("'literal'", Some("literal")),
            ("request.duration", Some("0.25s")),
            ("request.size", Some("120")),
        ];
        for (expr, want) in table {
            let e = Expr::parse(expr).unwrap();
            let got = with_input(404, GET, |i| e.text(i));
            assert_eq!(got.as_deref(), want, "{expr}");
        }
    }

    const GET: &str = "GET /api/v1/items?page=2 HTTP/1.1\r\nhost: shop.example\r\nx-debug: On\r\nuser-agent: curl/8\r\n\r\n";

    /// Each attribute, operator and method against one request, as Envoy's CEL reads it.
    #[test]
    fn filters_read_the_request_as_envoy_names_it() {
        let table: [(&str, u16, bool); 34] = [
            ("response.code >= 400", 404, true),
            ("response.code >= 400", 200, false),
            ("response.code >= 400u", 500, true),
            ("response.code == 503 && response.flags == 'UF'", 503, true),
            ("response.code != 200", 200, false),
            ("!(response.code < 300)", 200, false),
            ("request.method == 'GET'", 200, true),
            ("request.path == '/api/v1/items?page=2'", 200, true),
            ("request.url_path == '/api/v1/items'", 200, true),
            ("request.url_path.startsWith('/api/')", 200, true),
            ("request.url_path.endsWith('/items')", 200, true),
            ("request.path.contains('page=')", 200, true),
            ("request.url_path.matches('^/api/v[0-9]+/')", 200, true),
            ("request.host == \"shop.example\"", 200, true),
            ("request.headers['X-Debug'] == 'On'", 200, true),
            ("request.headers['x-debug'] == 'on'", 200, false),
            ("request.useragent.startsWith('curl')", 200, true),
            (
                "request.scheme == 'http' && request.protocol == 'HTTP/1.1'",
                200,
                true,
            ),
            ("request.id == 'id-1'", 200, true),
            ("request.size == 120 && response.size > 4096", 200, true),
            ("request.duration > duration('200ms')", 200, true),
            ("request.duration >= duration('1s')", 200, false),
            ("source.address == '10.1.0.7'", 200, true),
            (
                "destination.address == '10.96.0.1' && destination.port == 80",
                200,
                true,
            ),
            ("true", 200, true),
            ("false || response.code == 200", 200, true),
            // A missing header does not match; with `||` the other side decides.
            ("request.headers['x-none'] == 'a'", 200, false),
            (
                "request.headers['x-none'] == 'a' || response.code == 200",
                200,
                true,
            ),
            (
                "request.headers['x-none'] == 'a' && response.code == 404",
                200,
                false,
            ),
            ("!(request.headers['x-none'] == 'a')", 200, false),
            // Mismatched types do not match.
            ("response.code == '200'", 200, false),
            ("request.method > 'A'", 200, false),
            ("-1 < response.code", 200, true),
            (
                "(response.code >= 500 || response.code == 404) && request.method == 'GET'",
                404,
                true,
            ),
        ];
        for (expr, status, want) in table {
            assert_eq!(check(expr, status, GET), want, "{expr} with {status}");
        }
        // A request's size is its content-length, as Envoy takes it.
        let post = "POST /f HTTP/1.1\r\nhost: a\r\ncontent-length: 7\r\n\r\n";
        assert!(check(
            "request.size == 7 && request.total_size == 120",
            200,
            post
        ));
    }

    #[test]
    fn bad_expressions_are_refused_at_load() {
        for (expr, why) in [
            ("response.cod >= 400", "unknown attribute response.cod"),
            ("response.code >=", "an incomplete expression"),
            ("response.code >= 400 400", "after a whole expression"),
            ("request.path.matches('(')", "matches"),
            ("request.path.size()", "takes one argument"),
            ("request.path.lower('x')", "unknown method lower()"),
            ("now() > 1", "unknown function now()"),
            ("duration('soon') < request.duration", "duration(\"soon\")"),
            ("request.method['x']", "only request.headers"),
            ("request.headers[1] == 'a'", "string literal"),
            ("'open", "closing quote"),
            ("response.code # 1", "unexpected"),
        ] {
            let err = Expr::parse(expr).expect_err(expr);
            assert!(err.contains(why), "{expr}: {err}");
        }
    }
}
