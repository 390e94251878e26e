//! What a JWT costs the waypoint per request, by algorithm: a token verified from scratch
//! (`waypoint::jwt::verify`: parse, claims, signature) and the whole authentication of a
//! request carrying a token this worker has verified before (`waypoint::jwt::authenticate`:
//! found in `Authorization`, answered from the per-worker cache, header taken off, a claim
//! header added). Run: `cargo run --release -p waypoint --example jwt_cost [ROUNDS]`.
//! Medians of 5 timed batches (the machine is noisy); no threshold, a measurement.

use std::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::json;
use waypoint::http1::{RequestHead, Text};
use waypoint::jwt::{authenticate, parse_jwks, verify, JwtRule};

const RSA_KEY: &[u8] = include_bytes!("../tests/data/jwt-rsa-2048.der");

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// ns per call of `f`, median of 5 batches of `rounds`.
fn time(rounds: u32, mut f: impl FnMut()) -> f64 {
    f();
    let batches = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..rounds {
                f();
            }
            t.elapsed().as_nanos() as f64 / rounds as f64
        })
        .collect();
    median(batches)
}

fn main() {
    let rounds: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let rng = SystemRandom::new();
    let claims = json!({"iss": "https://idp.example", "sub": "alice", "aud": "echo",
                        "groups": ["dev"], "exp": 4_000_000_000u64});
    let payload = b64(claims.to_string().as_bytes());
    let sign_input = |alg: &str| {
        format!(
            "{}.{payload}",
            b64(json!({"alg": alg, "kid": "k"}).to_string().as_bytes())
        )
    };

    let mut cases: Vec<(&str, serde_json::Value, String)> = vec![];
    {
        let pk8 =
            EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let k = EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, pk8.as_ref(), &rng)
            .unwrap();
        let p = k.public_key().as_ref();
        let input = sign_input("ES256");
        let s = k.sign(&rng, input.as_bytes()).unwrap();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "k", "x": b64(&p[1..33]), "y": b64(&p[33..])});
        cases.push(("ES256", jwk, format!("{input}.{}", b64(s.as_ref()))));
    }
    {
        let k = RsaKeyPair::from_der(RSA_KEY).unwrap();
        let c = sig::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
        let input = sign_input("RS256");
        let mut s = vec![0; k.public().modulus_len()];
        k.sign(&sig::RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut s)
            .unwrap();
        let jwk = json!({"kty": "RSA", "kid": "k", "n": b64(&c.n), "e": b64(&c.e)});
        cases.push(("RS256 (2048)", jwk, format!("{input}.{}", b64(&s))));
    }
    {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let k = Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap();
        let input = sign_input("EdDSA");
        let s = k.sign(input.as_bytes());
        let jwk =
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": b64(k.public_key().as_ref())});
        cases.push(("EdDSA", jwk, format!("{input}.{}", b64(s.as_ref()))));
    }
    {
        let key = b"a shared secret of 32 bytes long";
        let input = sign_input("HS256");
        let s = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            input.as_bytes(),
        );
        let jwk = json!({"kty": "oct", "kid": "k", "k": b64(key)});
        cases.push(("HS256", jwk, format!("{input}.{}", b64(s.as_ref()))));
    }

    println!("{:<14} {:>12} {:>16}", "alg", "verify ns", "cached req ns");
    for (name, jwk, token) in cases {
        let keys = parse_jwks(&json!({ "keys": [jwk] }).to_string()).unwrap();
        let mut rule = JwtRule::new("https://idp.example".into(), keys, vec![]);
        rule.output_claim_to_headers = vec![("x-jwt-sub".into(), vec!["sub".into()])];
        let now = 1_800_000_000;
        let full = time(rounds, || {
            verify(&token, &[&rule], now).unwrap();
        });
        let bearer = format!("Bearer {token}");
        let head = RequestHead {
            method: "GET".into(),
            path: "/".into(),
            query: None,
            version: 1,
            headers: vec![
                ("host".into(), "echo".into()),
                ("authorization".into(), Text::from(bearer)),
            ],
        };
        let cached = time(rounds * 10, || {
            let mut h = head.clone();
            authenticate(&[&rule], &mut h, now).unwrap().unwrap();
        });
        println!("{name:<14} {full:>12.0} {cached:>16.0}");
    }
}
