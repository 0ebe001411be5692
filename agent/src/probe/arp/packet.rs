//! ARP over Ethernet on the wire: building who-has requests and parsing received frames.
//!
//! No I/O and no clock, so it is deterministic to test and to fuzz. Parsing is by hand on
//! byte slices with checked accesses only: it returns `None` for anything that is not an
//! Ethernet/IPv4 ARP packet and never panics, whatever the input.

use std::net::Ipv4Addr;

/// Length of an Ethernet header without a VLAN tag.
const ETH_HEADER_LEN: usize = 14;
/// Length of an ARP body for Ethernet hardware and IPv4 protocol addresses.
const ARP_BODY_LEN: usize = 28;
/// Length of an untagged Ethernet+ARP frame as we send it (drivers pad it to 60 on the wire).
pub const FRAME_LEN: usize = ETH_HEADER_LEN + ARP_BODY_LEN;

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
/// 802.1Q customer tag and 802.1ad service tag: skipped (at most two) to reach the payload.
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const HTYPE_ETHERNET: u16 = 1;

/// The Ethernet broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// The ARP operation code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArpOp {
    /// 1: who-has.
    Request,
    /// 2: is-at.
    Reply,
    /// Anything else (RARP, InARP, ...): parsed, never recorded.
    Other(u16),
}

impl From<u16> for ArpOp {
    fn from(v: u16) -> Self {
        match v {
            1 => ArpOp::Request,
            2 => ArpOp::Reply,
            other => ArpOp::Other(other),
        }
    }
}

impl From<ArpOp> for u16 {
    fn from(op: ArpOp) -> u16 {
        match op {
            ArpOp::Request => 1,
            ArpOp::Reply => 2,
            ArpOp::Other(v) => v,
        }
    }
}

/// An Ethernet/IPv4 ARP packet, with the Ethernet source it arrived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ArpPacket {
    /// The Ethernet source address. Normally equal to `sender_mac`; a difference is a sign
    /// of a proxy or a bridge rewriting frames.
    pub eth_src: [u8; 6],
    pub op: ArpOp,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

/// Builds a broadcast who-has `target_ip` request from `src_mac`/`src_ip`.
pub fn build_request(src_mac: [u8; 6], src_ip: Ipv4Addr, target_ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    build(
        BROADCAST,
        &ArpPacket {
            eth_src: src_mac,
            op: ArpOp::Request,
            sender_mac: src_mac,
            sender_ip: src_ip,
            target_mac: [0; 6],
            target_ip,
        },
    )
}

/// Encodes `packet` as an untagged Ethernet frame to `eth_dst`.
pub fn build(eth_dst: [u8; 6], packet: &ArpPacket) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&eth_dst);
    f[6..12].copy_from_slice(&packet.eth_src);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
    f[16..18].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&u16::from(packet.op).to_be_bytes());
    f[22..28].copy_from_slice(&packet.sender_mac);
    f[28..32].copy_from_slice(&packet.sender_ip.octets());
    f[32..38].copy_from_slice(&packet.target_mac);
    f[38..42].copy_from_slice(&packet.target_ip.octets());
    f
}

/// Parses a received Ethernet frame. `None` unless it is an ARP packet for Ethernet
/// hardware and IPv4 protocol addresses (with up to two VLAN tags); trailing bytes
/// (padding to 60 bytes, FCS) are ignored.
pub fn parse(frame: &[u8]) -> Option<ArpPacket> {
    let eth_src: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    let mut ethertype = be16(frame, 12)?;
    let mut offset = ETH_HEADER_LEN;
    for _ in 0..2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        // A tag is 2 bytes of TCI then the inner ethertype.
        ethertype = be16(frame, offset + 2)?;
        offset += 4;
    }
    if ethertype != ETHERTYPE_ARP {
        return None;
    }
    let arp = frame.get(offset..offset + ARP_BODY_LEN)?;
    if be16(arp, 0)? != HTYPE_ETHERNET
        || be16(arp, 2)? != ETHERTYPE_IPV4
        || arp.get(4) != Some(&6)
        || arp.get(5) != Some(&4)
    {
        return None;
    }
    Some(ArpPacket {
        eth_src,
        op: ArpOp::from(be16(arp, 6)?),
        sender_mac: arp.get(8..14)?.try_into().ok()?,
        sender_ip: ipv4(arp, 14)?,
        target_mac: arp.get(18..24)?.try_into().ok()?,
        target_ip: ipv4(arp, 24)?,
    })
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    let b: [u8; 2] = bytes.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_be_bytes(b))
}

fn ipv4(bytes: &[u8], at: usize) -> Option<Ipv4Addr> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    const MAC_A: [u8; 6] = [0x02, 0xc3, 0, 0, 0, 0x01];
    const MAC_B: [u8; 6] = [0x02, 0xc3, 0, 0, 0, 0x0b];
    const IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
    const IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 11);

    fn reply() -> ArpPacket {
        ArpPacket {
            eth_src: MAC_B,
            op: ArpOp::Reply,
            sender_mac: MAC_B,
            sender_ip: IP_B,
            target_mac: MAC_A,
            target_ip: IP_A,
        }
    }

    #[test]
    fn request_has_the_wire_layout() {
        let f = build_request(MAC_A, IP_A, IP_B);
        #[rustfmt::skip]
        let expected: [u8; FRAME_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // eth dst
            0x02, 0xc3, 0, 0, 0, 0x01,          // eth src
            0x08, 0x06,                         // ethertype ARP
            0, 1, 0x08, 0x00, 6, 4, 0, 1,       // htype, ptype, hlen, plen, op=request
            0x02, 0xc3, 0, 0, 0, 0x01,          // sha
            198, 18, 7, 1,                      // spa
            0, 0, 0, 0, 0, 0,                   // tha
            198, 18, 7, 11,                     // tpa
        ];
        assert_eq!(f, expected);
        let p = parse(&f).expect("our own request parses");
        assert_eq!(p.op, ArpOp::Request);
        assert_eq!(
            (p.sender_mac, p.sender_ip, p.target_ip),
            (MAC_A, IP_A, IP_B)
        );
    }

    #[test]
    fn reply_round_trips_with_padding() {
        let mut f = build(MAC_A, &reply()).to_vec();
        f.resize(60, 0); // minimum Ethernet frame, as received from a real NIC
        assert_eq!(parse(&f), Some(reply()));
    }

    #[test]
    fn vlan_tags_are_skipped() {
        let plain = build(MAC_A, &reply());
        for tags in [
            &[0x81, 0x00, 0x00, 0x07][..],
            &[0x88, 0xa8, 0, 5, 0x81, 0x00, 0, 7],
        ] {
            let mut f = plain[..12].to_vec();
            f.extend_from_slice(tags);
            f.extend_from_slice(&plain[12..]);
            assert_eq!(parse(&f), Some(reply()), "tags {tags:02x?}");
        }
        // Three tags is more than we look through.
        let mut f = plain[..12].to_vec();
        f.extend_from_slice(&[0x81, 0, 0, 1, 0x81, 0, 0, 2, 0x81, 0, 0, 3]);
        f.extend_from_slice(&plain[12..]);
        assert_eq!(parse(&f), None);
    }

    #[test]
    fn rejects_what_is_not_ethernet_ipv4_arp() {
        let good = build(MAC_A, &reply());
        let mutate = |at: usize, v: u8| {
            let mut f = good;
            f[at] = v;
            f
        };
        assert_eq!(parse(&mutate(13, 0x00)), None, "ethertype 0x0800");
        assert_eq!(parse(&mutate(15, 6)), None, "htype 6 (IEEE 802)");
        assert_eq!(parse(&mutate(16, 0x86)), None, "ptype not IPv4");
        assert_eq!(parse(&mutate(18, 8)), None, "hlen 8");
        assert_eq!(parse(&mutate(19, 16)), None, "plen 16");
        assert_eq!(parse(&mutate(21, 3)).map(|p| p.op), Some(ArpOp::Other(3)));
        for len in 0..FRAME_LEN {
            assert_eq!(parse(&good[..len]), None, "truncated to {len}");
        }
    }

    /// Random and mutated frames never panic the parser, and whatever parses re-encodes to
    /// the same ARP packet. Bounded (~100k frames) so it runs in every `cargo test`.
    #[test]
    fn fuzz_parse_never_panics() {
        let mut rng = StdRng::seed_from_u64(0xc3_5e_a5);
        let good = build(MAC_A, &reply());
        let mut buf = [0u8; 128];
        let mut parsed = 0usize;
        for i in 0..100_000u32 {
            let len = rng.random_range(0..buf.len());
            let frame = &mut buf[..len];
            if i % 2 == 0 {
                rng.fill(&mut frame[..]);
            } else {
                // Start from a valid frame (sometimes VLAN-tagged) and flip a few bytes, so
                // the deeper branches are exercised too.
                let n = good.len().min(len);
                frame[..n].copy_from_slice(&good[..n]);
                if i % 4 == 1 && len > 16 {
                    frame.copy_within(12..len - 4, 16);
                    frame[12..16].copy_from_slice(&[0x81, 0x00, 0, 1]);
                }
                for _ in 0..rng.random_range(0..3) {
                    if len > 0 {
                        let at = rng.random_range(0..len);
                        frame[at] = rng.random();
                    }
                }
            }
            if let Some(p) = parse(frame) {
                parsed += 1;
                let again = parse(&build(BROADCAST, &p)).expect("re-encoded packet parses");
                assert_eq!(again, p);
            }
        }
        assert!(
            parsed > 1_000,
            "the mutations reach the success path ({parsed})"
        );
    }
}
