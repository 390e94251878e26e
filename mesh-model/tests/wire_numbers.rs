//! The wire types carry Istio's field numbers (verified against istio/ztunnel's and
//! istio/istio's protos, see the comments at the top of `proto/*.proto`): encode messages
//! and check the tag bytes, so a renumbering in `proto/` fails here.

use mesh_model::wire::security::{Authorization, Clause, Match, Rule, ServiceAccountMatch};
use mesh_model::wire::workload::{address, Address, GatewayAddress, Workload};
use prost::Message;

/// The varint encoding of a field's tag.
fn tag(field: u32, wire_type: u32) -> Vec<u8> {
    let mut v = u64::from((field << 3) | wire_type);
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn service_account_match_is_field_11_and_12_with_namespace_1_and_service_account_2() {
    let sa = ServiceAccountMatch {
        namespace: "ns".into(),
        service_account: "sa".into(),
    };
    assert_eq!(
        sa.encode_to_vec(),
        [&tag(1, 2)[..], &[2], b"ns", &tag(2, 2), &[2], b"sa"].concat()
    );
    let m = Match {
        service_accounts: vec![sa.clone()],
        ..Default::default()
    };
    assert_eq!(m.encode_to_vec()[..1], tag(11, 2)[..]);
    let m = Match {
        not_service_accounts: vec![sa],
        ..Default::default()
    };
    assert_eq!(m.encode_to_vec()[..1], tag(12, 2)[..]);
}

#[test]
fn authorization_rules_clauses_matches_numbers_and_dry_run_extension() {
    let a = Authorization {
        name: "p".into(),
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    destination_ports: vec![80],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let bytes = a.encode_to_vec();
    // name = 1, rules = 5 → clauses = 1 → matches = 2 → destination_ports = 9 (packed).
    assert_eq!(bytes[..3], [&tag(1, 2)[..], &[1], b"p"].concat()[..]);
    let rule = Rule::decode(&bytes[5..]).unwrap();
    assert_eq!(bytes[3..4], tag(5, 2)[..]);
    assert_eq!(rule.clauses[0].matches[0].destination_ports, vec![80]);
    let clause = &a.rules[0].clauses[0];
    assert_eq!(clause.encode_to_vec()[..1], tag(2, 2)[..]);
    assert_eq!(a.rules[0].encode_to_vec()[..1], tag(1, 2)[..]);
    // dry_run is this project's extension at 1000 (Istio has no such field; 6 is free there).
    let d = Authorization {
        dry_run: true,
        ..Default::default()
    };
    assert_eq!(d.encode_to_vec(), [&tag(1000, 0)[..], &[1]].concat());
    // The old number 6 (free in Istio: a field it may add) is not dry_run: a message with
    // field 6 set decodes as enforced, its field skipped as unknown.
    let six = [&bytes[..], &tag(6, 0)[..], &[1]].concat();
    let decoded = Authorization::decode(&six[..]).unwrap();
    assert!(!decoded.dry_run);
    assert_eq!(decoded.encode_to_vec(), bytes);
}

#[test]
fn workload_numbers_match_istio() {
    let w = Workload {
        uid: "u".into(),
        service_account: "sa".into(),
        node: "n".into(),
        waypoint: Some(GatewayAddress {
            hbone_mtls_port: 15008,
            destination: None,
        }),
        ..Default::default()
    };
    // One field at a time, exact bytes: a swap of two numbers fails too.
    let one = |w: Workload| w.encode_to_vec();
    let uid = Workload {
        uid: "u".into(),
        ..Default::default()
    };
    assert_eq!(one(uid), [&tag(20, 2)[..], &[1], b"u"].concat());
    let sa = Workload {
        service_account: "sa".into(),
        ..Default::default()
    };
    assert_eq!(one(sa), [&tag(7, 2)[..], &[2], b"sa"].concat());
    let node = Workload {
        node: "n".into(),
        ..Default::default()
    };
    assert_eq!(one(node), [&tag(9, 2)[..], &[1], b"n"].concat());
    let wp = Workload {
        waypoint: w.waypoint.clone(),
        ..Default::default()
    };
    // waypoint = 8 → GatewayAddress.hbone_mtls_port = 3 (varint 15008 = 0xa0 0x75).
    assert_eq!(
        one(wp),
        [&tag(8, 2)[..], &[3], &tag(3, 0), &[0xa0, 0x75]].concat()
    );
    let b = w.encode_to_vec();
    assert!(contains(&b, &tag(20, 2)));
    let addr = Address {
        r#type: Some(address::Type::Workload(w)),
    };
    assert_eq!(addr.encode_to_vec()[..1], tag(1, 2)[..]);
}
