//! The few BER encodings the probe writes itself (no I/O): the SNMPv3 engine-discovery
//! message (see `usm.rs`) and the v1/v2c GET that asks a device which community it accepts
//! (see `credential.rs`). Both go out over plain sockets with small buffers instead of snmp2
//! sessions (two 64 KiB buffers each), so asking every community at once stays cheap.
//! Replies are parsed by snmp2.

pub(crate) const INTEGER: u8 = 0x02;
pub(crate) const OCTET_STRING: u8 = 0x04;
const NULL: u8 = 0x05;
const OBJECT_IDENTIFIER: u8 = 0x06;
pub(crate) const SEQUENCE: u8 = 0x30;
const GET_REQUEST: u8 = 0xa0;

/// A BER TLV with a definite length.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(u8::try_from(len).unwrap_or(0x7f));
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | u8::try_from(bytes.len() - skip).unwrap_or(0));
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A BER INTEGER, minimal two's complement.
pub(crate) fn integer(n: i64) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let mut start = 0;
    while start < 7 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    tlv(INTEGER, &bytes[start..])
}

/// An OBJECT IDENTIFIER. The probe only encodes its own OIDs (`1.3...` and `1.0...`), which
/// always have at least two arcs and a first arc of 0 to 2; anything else encodes as `0.0`
/// rather than panicking.
pub(crate) fn oid(arcs: &[u32]) -> Vec<u8> {
    let mut content = Vec::with_capacity(arcs.len() + 4);
    match arcs {
        [first @ 0..=2, second, rest @ ..] => {
            push_base128(&mut content, u64::from(*first) * 40 + u64::from(*second));
            for arc in rest {
                push_base128(&mut content, u64::from(*arc));
            }
        }
        _ => content.push(0),
    }
    tlv(OBJECT_IDENTIFIER, &content)
}

fn push_base128(out: &mut Vec<u8>, mut value: u64) {
    let mut groups = [0u8; 10];
    let mut n = 0;
    loop {
        groups[n] = u8::try_from(value & 0x7f).unwrap_or(0);
        n += 1;
        value >>= 7;
        if value == 0 {
            break;
        }
    }
    for i in (0..n).rev() {
        out.push(if i == 0 { groups[i] } else { groups[i] | 0x80 });
    }
}

/// An SNMPv1 (`version` 0) or v2c (`version` 1) GetRequest for `oids`.
pub(crate) fn get_request(version: i64, community: &[u8], req_id: i32, oids: &[&[u32]]) -> Vec<u8> {
    let varbinds: Vec<u8> = oids
        .iter()
        .flat_map(|o| tlv(SEQUENCE, &[oid(o), tlv(NULL, &[])].concat()))
        .collect();
    let pdu = tlv(
        GET_REQUEST,
        &[
            integer(i64::from(req_id)),
            integer(0), // error-status
            integer(0), // error-index
            tlv(SEQUENCE, &varbinds),
        ]
        .concat(),
    );
    tlv(
        SEQUENCE,
        &[integer(version), tlv(OCTET_STRING, community), pdu].concat(),
    )
}

#[cfg(test)]
mod tests {
    use snmp2::{MessageType, Pdu, Value, Version};

    use super::*;
    use crate::probe::snmp::tables;

    #[test]
    fn integers_and_lengths_are_minimal() {
        assert_eq!(integer(0), [2, 1, 0]);
        assert_eq!(integer(127), [2, 1, 127]);
        assert_eq!(integer(128), [2, 2, 0, 128]);
        assert_eq!(integer(-1), [2, 1, 0xff]);
        assert_eq!(integer(-129), [2, 2, 0xff, 0x7f]);
        assert_eq!(integer(65_507), [2, 3, 0, 0xff, 0xe3]);
        assert_eq!(integer(i64::from(i32::MIN)), [2, 4, 0x80, 0, 0, 0]);
        let long = tlv(4, &[0; 300]);
        assert_eq!(&long[..4], &[4, 0x82, 1, 44]);
        assert_eq!(long.len(), 304);
    }

    #[test]
    fn oids_round_trip_through_the_decoder() {
        for arcs in [
            &[1, 3, 6, 1, 2, 1, 1, 5, 0][..],
            &[1, 0, 8802, 1, 1, 2, 1, 4, 1, 1, 4],
            &[1, 3, 6, 1, 4, 1, u32::MAX, 127, 128, 16_383, 16_384],
            &[2, 999, 1],
        ] {
            let encoded = oid(arcs);
            assert_eq!(encoded[0], OBJECT_IDENTIFIER);
            assert_eq!(tables::decode_oid(&encoded[2..]).as_deref(), Some(arcs));
        }
        assert_eq!(oid(&[1]), [OBJECT_IDENTIFIER, 1, 0]);
        assert_eq!(oid(&[7, 1]), [OBJECT_IDENTIFIER, 1, 0]);
    }

    #[test]
    fn get_requests_parse_with_snmp2() {
        for (version, expected) in [(0, Version::V1), (1, Version::V2C)] {
            let msg = get_request(version, b"public", -5, &tables::SYSTEM_SCALARS);
            let pdu = Pdu::from_bytes(&msg).expect("a valid SNMP message");
            assert_eq!(pdu.version(), Ok(expected));
            assert_eq!(pdu.community, b"public");
            assert_eq!(pdu.message_type, MessageType::GetRequest);
            assert_eq!(pdu.req_id, -5);
            let names: Vec<Vec<u32>> = pdu
                .varbinds
                .map(|(name, value)| {
                    assert!(matches!(value, Value::Null));
                    tables::decode_oid(name.as_bytes()).expect("an OID")
                })
                .collect();
            let expected: Vec<Vec<u32>> =
                tables::SYSTEM_SCALARS.iter().map(|o| o.to_vec()).collect();
            assert_eq!(names, expected);
        }
    }
}
