//! SOCKS5 (RFC 1928): CONNECT without authentication, IPv4, IPv6 and domain names.
//!
//! The parsers are pure functions over bytes (incomplete input → `Ok(None)`); [`handshake`]
//! drives them on a socket with a deadline. Bad input gets the RFC's reply code, never a
//! panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use runtime::worker::{race, Either};

pub const VERSION: u8 = 5;
pub const NO_AUTH: u8 = 0;
pub const NO_ACCEPTABLE_METHOD: u8 = 0xff;
pub const CMD_CONNECT: u8 = 1;

/// Reply codes (RFC 1928 §6).
pub mod reply {
    pub const SUCCEEDED: u8 = 0;
    pub const GENERAL_FAILURE: u8 = 1;
    pub const NOT_ALLOWED: u8 = 2;
    pub const NETWORK_UNREACHABLE: u8 = 3;
    pub const HOST_UNREACHABLE: u8 = 4;
    pub const CONNECTION_REFUSED: u8 = 5;
    pub const TTL_EXPIRED: u8 = 6;
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;
}

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    Domain(String, u16),
}

/// A greeting that is not SOCKS5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotSocks5;

/// The greeting: `VER NMETHODS METHODS…`. `Ok(Some((no_auth_offered, len)))`.
pub fn parse_greeting(b: &[u8]) -> Result<Option<(bool, usize)>, NotSocks5> {
    let Some(&ver) = b.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(NotSocks5);
    }
    let Some(&n) = b.get(1) else { return Ok(None) };
    let len = 2 + n as usize;
    if b.len() < len {
        return Ok(None);
    }
    Ok(Some((b[2..len].contains(&NO_AUTH), len)))
}

/// The request: `VER CMD RSV ATYP DST.ADDR DST.PORT`. The error is the reply code.
pub fn parse_request(b: &[u8]) -> Result<Option<(Target, usize)>, u8> {
    if b.len() < 4 {
        if !b.is_empty() && b[0] != VERSION {
            return Err(reply::GENERAL_FAILURE);
        }
        return Ok(None);
    }
    if b[0] != VERSION {
        return Err(reply::GENERAL_FAILURE);
    }
    let port_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let (target, len) = match b[3] {
        1 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            (
                Target::Addr(SocketAddr::new(IpAddr::V4(ip), port_at(8))),
                10,
            )
        }
        4 => {
            if b.len() < 22 {
                return Ok(None);
            }
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[4..20]);
            (
                Target::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port_at(20))),
                22,
            )
        }
        3 => {
            let Some(&n) = b.get(4) else { return Ok(None) };
            let len = 5 + n as usize + 2;
            if b.len() < len {
                return Ok(None);
            }
            if n == 0 {
                return Err(reply::HOST_UNREACHABLE);
            }
            let name = std::str::from_utf8(&b[5..5 + n as usize])
                .map_err(|_| reply::HOST_UNREACHABLE)?
                .to_ascii_lowercase();
            (Target::Domain(name, port_at(5 + n as usize)), len)
        }
        _ => return Err(reply::ADDRESS_TYPE_NOT_SUPPORTED),
    };
    // Only CONNECT; the address was still read so the reply is well-formed.
    if b[1] != CMD_CONNECT {
        return Err(reply::COMMAND_NOT_SUPPORTED);
    }
    Ok(Some((target, len)))
}

/// A reply with an unspecified bound address.
pub fn encode_reply(code: u8) -> Vec<u8> {
    vec![VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Why a handshake did not produce a target.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The client went away or sent nothing in time: nothing to answer.
    Silent,
    /// Bad greeting (`05 FF` was sent).
    Greeting,
    /// Answer with this reply code.
    Reply(u8),
}

const MAX_HANDSHAKE: usize = 1024;

async fn fill(tcp: &mut TcpStream, acc: &mut Vec<u8>) -> Result<(), Failure> {
    if acc.len() >= MAX_HANDSHAKE {
        return Err(Failure::Reply(reply::GENERAL_FAILURE));
    }
    let (r, buf) = tcp.read(Vec::with_capacity(512)).await;
    match r {
        Ok(0) | Err(_) => Err(Failure::Silent),
        Ok(n) => {
            acc.extend_from_slice(&buf[..n]);
            Ok(())
        }
    }
}

async fn negotiate(tcp: &mut TcpStream) -> Result<Target, Failure> {
    let mut acc = Vec::new();
    let used = loop {
        match parse_greeting(&acc) {
            Ok(Some((true, n))) => break n,
            Ok(Some((false, _))) | Err(NotSocks5) => {
                let _ = tcp.write_all(vec![VERSION, NO_ACCEPTABLE_METHOD]).await;
                return Err(Failure::Greeting);
            }
            Ok(None) => fill(tcp, &mut acc).await?,
        }
    };
    acc.drain(..used);
    let (res, _) = tcp.write_all(vec![VERSION, NO_AUTH]).await;
    if res.is_err() {
        return Err(Failure::Silent);
    }
    loop {
        match parse_request(&acc) {
            Ok(Some((t, n))) => {
                if acc.len() > n {
                    // Data before our reply: a client that does not wait. Refuse it.
                    return Err(Failure::Reply(reply::GENERAL_FAILURE));
                }
                return Ok(t);
            }
            Err(code) => return Err(Failure::Reply(code)),
            Ok(None) => fill(tcp, &mut acc).await?,
        }
    }
}

/// Run the SOCKS5 handshake up to (not including) the reply, within `deadline`.
pub async fn handshake(tcp: &mut TcpStream, deadline: Duration) -> Result<Target, Failure> {
    match race(negotiate(tcp), monoio::time::sleep(deadline)).await {
        Either::Left(r) => r,
        Either::Right(()) => Err(Failure::Reply(reply::TTL_EXPIRED)),
    }
}

/// Send a reply.
pub async fn send_reply(tcp: &mut TcpStream, code: u8) -> bool {
    let (r, _) = tcp.write_all(encode_reply(code)).await;
    r.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting() {
        assert_eq!(parse_greeting(&[]), Ok(None));
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2, 0]), Ok(Some((true, 4))));
        assert_eq!(parse_greeting(&[5, 1, 2]), Ok(Some((false, 3))));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(NotSocks5));
        assert_eq!(parse_greeting(b"GET / HTTP/1.1"), Err(NotSocks5));
    }

    #[test]
    fn requests() {
        let v4 = [5, 1, 0, 1, 10, 0, 0, 1, 0x1f, 0x90];
        assert_eq!(
            parse_request(&v4),
            Ok(Some((Target::Addr("10.0.0.1:8080".parse().unwrap()), 10)))
        );
        for i in 0..v4.len() {
            assert_eq!(parse_request(&v4[..i]), Ok(None), "prefix {i}");
        }
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(
            parse_request(&v6),
            Ok(Some((Target::Addr("[fd00::1]:80".parse().unwrap()), 22)))
        );
        let mut d = vec![5, 1, 0, 3, 4];
        d.extend_from_slice(b"ECHO");
        d.extend_from_slice(&[0, 80]);
        assert_eq!(
            parse_request(&d),
            Ok(Some((Target::Domain("echo".into(), 80), 11)))
        );
        assert_eq!(
            parse_request(&[5, 2, 0, 1, 1, 2, 3, 4, 0, 80]),
            Err(reply::COMMAND_NOT_SUPPORTED)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 1, 2, 3, 4, 0, 80]),
            Err(reply::ADDRESS_TYPE_NOT_SUPPORTED)
        );
        assert_eq!(
            parse_request(&[4, 1, 0, 1, 1, 2, 3, 4, 0, 80]),
            Err(reply::GENERAL_FAILURE)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(reply::HOST_UNREACHABLE)
        );
    }

    #[test]
    fn never_panics_on_any_short_input() {
        let mut x: u32 = 7;
        for _ in 0..20_000 {
            let mut b = Vec::new();
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let len = (x % 40) as usize;
            for i in 0..len {
                b.push((x.rotate_left(i as u32) & 0xff) as u8 % 12);
            }
            let _ = parse_greeting(&b);
            let _ = parse_request(&b);
        }
    }
}
