//! The identity rules, case by case, and the property that order does not matter.

use std::net::IpAddr;

use census_proto::{convert::MacAddr, v1};
use proptest::prelude::*;

use super::*;
use crate::model::{CleanObservation, Scope};

pub(crate) fn scope(site: &str) -> Scope {
    Scope {
        client: "acme".into(),
        site: site.into(),
    }
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x00, 0x16, 0x3e, 0x00, 0x00, last])
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// An ARP observation: `mac` answered on `addr` at `at`.
pub(crate) fn arp(addr: &str, m: MacAddr, at: u64) -> CleanObservation {
    CleanObservation {
        observed_ms: at,
        methods: vec![v1::Method::Arp],
        category: None,
        macs: vec![m],
        interface_macs: vec![],
        engine_id: None,
        serial: None,
        mdns_host: None,
        addresses: vec![(ip(addr), true)],
        names: vec![],
        proxy_arp: false,
        reported_addresses: 1,
    }
}

fn apply_all(g: &mut MemGraph, site: &str, obs: &[CleanObservation]) {
    for o in obs {
        apply(g, &scope(site), "agent-1", o).expect("infallible");
    }
}

fn only_device(g: &MemGraph) -> &DeviceRecord {
    assert_eq!(g.devices.len(), 1, "{:#?}", g.devices);
    g.devices.values().next().expect("one device")
}

/// The device as listed: its addresses marked current, previous or lost.
fn listed(g: &MemGraph, dev: &DeviceRecord) -> DeviceRecord {
    let mut d = dev.clone();
    mark_current(&mut d, &g.owners, &Sightings::new(&g.owners));
    d
}

fn current(g: &MemGraph, dev: &DeviceRecord) -> Vec<IpAddr> {
    listed(g, dev)
        .addresses
        .iter()
        .filter(|a| a.current)
        .map(|a| a.ip)
        .collect()
}

/// The device's addresses at `site` with their state: "current", "previous" or "lost".
fn states(g: &MemGraph, dev: &DeviceRecord, site: &str) -> Vec<(IpAddr, &'static str)> {
    listed(g, dev)
        .addresses
        .iter()
        .filter(|a| a.site == site)
        .map(|a| {
            let state = match (a.current, a.lost) {
                (true, _) => "current",
                (false, true) => "lost",
                (false, false) => "previous",
            };
            (a.ip, state)
        })
        .collect()
}

fn device_with_mac(g: &MemGraph, m: MacAddr) -> &DeviceRecord {
    let found: Vec<&DeviceRecord> = g
        .devices
        .values()
        .filter(|d| d.keys.contains(&format!("1mac:{m}")))
        .collect();
    assert_eq!(found.len(), 1, "{m}: {:#?}", g.devices);
    found[0]
}

#[test]
fn a_known_mac_on_a_new_address_is_the_same_device() {
    let mut g = MemGraph::default();
    apply_all(
        &mut g,
        "hq",
        &[arp("198.18.0.10", mac(1), 1), arp("198.18.0.20", mac(1), 2)],
    );
    let dev = only_device(&g);
    assert_eq!(dev.addresses.len(), 2);
    assert_eq!(dev.first_seen_ms, 1);
    assert_eq!(dev.last_seen_ms, 2);
    assert_eq!(dev.evidence[0].observations, 2);
}

#[test]
fn an_address_taken_over_by_a_new_mac_is_a_new_device_and_the_old_one_loses_it() {
    let mut g = MemGraph::default();
    apply_all(
        &mut g,
        "hq",
        &[arp("198.18.0.10", mac(1), 1), arp("198.18.0.10", mac(2), 2)],
    );
    assert_eq!(g.devices.len(), 2);
    let old = g
        .devices
        .values()
        .find(|d| d.macs == [mac(1)])
        .expect("old")
        .clone();
    let new = g
        .devices
        .values()
        .find(|d| d.macs == [mac(2)])
        .expect("new")
        .clone();
    assert!(
        current(&g, &old).is_empty(),
        "the old device lost the address"
    );
    assert_eq!(current(&g, &new), [ip("198.18.0.10")]);
}

#[test]
fn interface_macs_over_snmp_merge_a_multi_homed_device_late() {
    let mut g = MemGraph::default();
    apply_all(
        &mut g,
        "hq",
        &[arp("198.18.0.10", mac(1), 1), arp("198.18.1.10", mac(2), 1)],
    );
    assert_eq!(g.devices.len(), 2);
    let mut snmp = arp("198.18.0.10", mac(1), 2);
    snmp.methods = vec![v1::Method::Arp, v1::Method::Snmp];
    snmp.interface_macs = vec![mac(1), mac(2)];
    apply_all(&mut g, "hq", &[snmp]);
    let dev = only_device(&g);
    assert_eq!(dev.macs, [mac(1), mac(2)]);
    assert_eq!(dev.id, device_id("acme", &format!("1mac:{}", mac(1))));
    let merge = g.events.values().next().expect("a merge event");
    assert_eq!(merge.kind, EventKind::Merge);
    assert_eq!(merge.before.len(), 2);
    assert!(merge.reason.contains("mac"), "{}", merge.reason);
}

#[test]
fn engine_id_and_serial_are_strong() {
    let mut g = MemGraph::default();
    let mut a = arp("198.18.0.10", mac(1), 1);
    a.engine_id = Some(vec![0x80, 0, 0, 9, 3, 1, 2]);
    let mut b = arp("198.18.1.10", mac(2), 1);
    b.engine_id = Some(vec![0x80, 0, 0, 9, 3, 1, 2]);
    apply_all(&mut g, "hq", &[a, b]);
    assert_eq!(g.devices.len(), 1);
    let mut g = MemGraph::default();
    let mut a = arp("198.18.0.10", mac(1), 1);
    a.serial = Some("FCW2233L0AB".into());
    let mut b = arp("198.18.1.10", mac(2), 1);
    b.serial = Some("FCW2233L0AB".into());
    let mut junk = arp("198.18.2.10", mac(3), 1);
    junk.serial = Some("To be filled by O.E.M.".into());
    let mut junk2 = arp("198.18.2.11", mac(4), 1);
    junk2.serial = Some("To be filled by O.E.M.".into());
    apply_all(&mut g, "hq", &[a, b, junk, junk2]);
    assert_eq!(g.devices.len(), 3, "placeholder serials merge nothing");
}

#[test]
fn a_randomized_mac_back_with_a_new_mac_and_the_same_mdns_name_is_the_same_device() {
    let mut g = MemGraph::default();
    let phone = |m: [u8; 6], at| CleanObservation {
        mdns_host: Some("Annas-iPhone.local.".into()),
        ..arp("198.18.0.50", MacAddr(m), at)
    };
    apply_all(
        &mut g,
        "hq",
        &[
            phone([0xda, 1, 2, 3, 4, 5], 1),
            phone([0x7a, 9, 9, 9, 9, 9], 2),
        ],
    );
    let dev = only_device(&g);
    assert!(dev.weak_only);
    assert_eq!(dev.macs.len(), 2);
    // Two phones with random MACs and no names stay two devices.
    let mut g = MemGraph::default();
    apply_all(
        &mut g,
        "hq",
        &[
            arp("198.18.0.51", MacAddr([0xda, 1, 1, 1, 1, 1]), 1),
            arp("198.18.0.52", MacAddr([0xda, 2, 2, 2, 2, 2]), 1),
        ],
    );
    assert_eq!(g.devices.len(), 2);
}

#[test]
fn names_never_merge_devices_with_strong_identifiers() {
    let mut g = MemGraph::default();
    let mut a = arp("198.18.0.10", mac(1), 1);
    a.mdns_host = Some("printer.local.".into());
    let mut b = arp("198.18.0.11", mac(2), 1);
    b.mdns_host = Some("printer.local.".into());
    apply_all(&mut g, "hq", &[a, b]);
    assert_eq!(g.devices.len(), 2);
}

#[test]
fn virtual_router_macs_are_not_devices_but_evidence_for_their_router() {
    let vrrp = MacAddr([0x00, 0x00, 0x5e, 0x00, 0x01, 0x0a]);
    let hsrp = MacAddr([0x00, 0x00, 0x0c, 0x07, 0xac, 0x01]);
    assert_eq!(mac_class(vrrp), MacClass::Virtual);
    assert_eq!(mac_class(hsrp), MacClass::Virtual);
    let mut g = MemGraph::default();
    apply_all(&mut g, "hq", &[arp("198.18.0.1", vrrp, 1)]);
    assert!(g.devices.is_empty(), "a virtual address is not a device");
    let mut router = arp("198.18.0.2", mac(1), 2);
    router.interface_macs = vec![mac(1), vrrp];
    apply_all(&mut g, "hq", &[router]);
    let dev = only_device(&g);
    let v = g.virtual_macs.get(&vrrp).expect("recorded");
    assert_eq!(v.owner.as_deref(), Some(dev.keys[0].as_str()));
    assert_eq!(v.addresses[0].ip, ip("198.18.0.1"));
}

#[test]
fn a_proxy_arp_responder_is_one_device_and_its_addresses_are_not_devices() {
    let mut g = MemGraph::default();
    let mut o = arp("198.18.0.1", mac(1), 1);
    o.addresses = (1..20)
        .map(|i| (ip(&format!("198.18.0.{i}")), true))
        .collect();
    o.proxy_arp = true;
    o.reported_addresses = 255;
    apply_all(&mut g, "hq", &[o]);
    let dev = only_device(&g);
    assert!(dev.addresses.iter().all(|a| !a.answered));
    assert_eq!(dev.anomalies, ["answers ARP for 255 addresses (proxy ARP)"]);
    assert!(
        g.owners.is_empty(),
        "it owns none of the addresses it answers for"
    );
}

#[test]
fn a_laptop_moving_between_sites_of_a_client_stays_one_device() {
    let mut g = MemGraph::default();
    apply(&mut g, &scope("hq"), "a1", &arp("198.18.0.10", mac(1), 1)).expect("infallible");
    apply(
        &mut g,
        &scope("branch"),
        "a2",
        &arp("198.18.0.77", mac(1), 2),
    )
    .expect("infallible");
    let dev = only_device(&g);
    assert_eq!(dev.sites, ["branch", "hq"]);
    assert_eq!(dev.evidence.len(), 2, "one line per agent");
}

#[test]
fn the_same_address_at_two_sites_is_two_address_spaces() {
    let mut g = MemGraph::default();
    let icmp = |at| CleanObservation {
        macs: vec![],
        methods: vec![v1::Method::Icmp],
        ..arp("198.18.1.10", mac(0), at)
    };
    apply(&mut g, &scope("hq"), "a1", &icmp(1)).expect("infallible");
    apply(&mut g, &scope("branch"), "a2", &icmp(1)).expect("infallible");
    assert_eq!(g.devices.len(), 2);
}

#[test]
fn operators_merge_split_and_undo_and_a_split_holds() {
    let mut g = MemGraph::default();
    apply_all(
        &mut g,
        "hq",
        &[arp("198.18.0.10", mac(1), 1), arp("198.18.0.11", mac(2), 1)],
    );
    let ids: Vec<String> = g.devices.keys().cloned().collect();
    let merged = merge(&mut g, "acme", &ids[0], &ids[1], "same box", 5)
        .expect("infallible")
        .expect("merged");
    assert_eq!(g.devices.len(), 1);
    let dev = only_device(&g).clone();
    let undone = undo(&mut g, "acme", merged.seq, 6)
        .expect("infallible")
        .expect("undone");
    assert_eq!(undone.undoes, Some(merged.seq));
    assert_eq!(g.devices.len(), 2);
    assert_eq!(g.events[&merged.seq].undone_by, Some(undone.seq));
    assert!(matches!(
        undo(&mut g, "acme", merged.seq, 7).expect("infallible"),
        Err(EditError::AlreadyUndone(_))
    ));

    // A split holds against an observation that would link the parts again.
    let mut g = MemGraph::default();
    let mut both = arp("198.18.0.10", mac(1), 1);
    both.interface_macs = vec![mac(1), mac(2)];
    apply_all(&mut g, "hq", &[both.clone()]);
    let id = only_device(&g).id.clone();
    let part = vec![format!("1mac:{}", mac(2))];
    let s = split(&mut g, "acme", &id, &part, "two NICs in two boxes", 2)
        .expect("infallible")
        .expect("split");
    assert_eq!(g.devices.len(), 2);
    both.observed_ms = 3;
    apply_all(&mut g, "hq", &[both]);
    assert_eq!(g.devices.len(), 2, "the split holds");
    undo(&mut g, "acme", s.seq, 4)
        .expect("infallible")
        .expect("undone");
    assert_eq!(g.devices.len(), 1, "undoing the split merges them back");
    assert_eq!(
        g.devices.values().next().map(|d| d.id.clone()),
        Some(dev.id).filter(|_| false).or(Some(id))
    );
    assert!(matches!(
        split(&mut g, "acme", "nope", &part, "", 5).expect("infallible"),
        Err(EditError::NoDevice { .. })
    ));
}

// === what listings show ===

/// A dual-NIC server: each NIC answers ARP on its address, and its SNMP lists both MACs.
fn dual_nic(at: u64) -> [CleanObservation; 2] {
    let nic = |addr: &str, m: MacAddr, at: u64| CleanObservation {
        methods: vec![v1::Method::Arp, v1::Method::Snmp],
        interface_macs: vec![mac(1), mac(2)],
        ..arp(addr, m, at)
    };
    // The NICs answer a few milliseconds apart within one sweep.
    [
        nic("198.18.0.10", mac(1), at),
        nic("198.18.0.11", mac(2), at + 3),
    ]
}

#[test]
fn after_a_split_each_device_lists_its_own_macs_and_addresses() {
    let mut g = MemGraph::default();
    apply_all(&mut g, "hq", &dual_nic(1));
    let dev = only_device(&g).clone();
    assert_eq!(dev.macs, [mac(1), mac(2)]);
    assert_eq!(
        states(&g, &dev, "hq"),
        [
            (ip("198.18.0.10"), "current"),
            (ip("198.18.0.11"), "current")
        ]
    );
    let split_out = vec![format!("1mac:{}", mac(2))];
    let s = split(&mut g, "acme", &dev.id, &split_out, "two boxes", 2)
        .expect("infallible")
        .expect("split");
    let check = |g: &MemGraph| {
        let a = device_with_mac(g, mac(1));
        let b = device_with_mac(g, mac(2));
        assert_eq!(a.macs, [mac(1)], "the split-out MAC left: {a:#?}");
        assert_eq!(b.macs, [mac(2)], "{b:#?}");
        assert_eq!(states(g, a, "hq"), [(ip("198.18.0.10"), "current")]);
        assert_eq!(states(g, b, "hq"), [(ip("198.18.0.11"), "current")]);
    };
    check(&g);
    // Seen again as before: the split holds, and so does what each lists.
    apply_all(&mut g, "hq", &dual_nic(10));
    assert_eq!(g.devices.len(), 2);
    check(&g);
    // Undone: one device again, with both.
    undo(&mut g, "acme", s.seq, 20)
        .expect("infallible")
        .expect("undone");
    let dev = only_device(&g).clone();
    assert_eq!(dev.macs, [mac(1), mac(2)]);
    assert_eq!(
        states(&g, &dev, "hq"),
        [
            (ip("198.18.0.10"), "current"),
            (ip("198.18.0.11"), "current")
        ]
    );
    // An operator's merge and its undo: each lists its own again.
    let mut g = MemGraph::default();
    apply_all(
        &mut g,
        "hq",
        &[arp("198.18.0.10", mac(1), 1), arp("198.18.0.11", mac(2), 1)],
    );
    let ids: Vec<String> = g.devices.keys().cloned().collect();
    let m = merge(&mut g, "acme", &ids[0], &ids[1], "same box", 2)
        .expect("infallible")
        .expect("merged");
    assert_eq!(only_device(&g).macs, [mac(1), mac(2)]);
    undo(&mut g, "acme", m.seq, 3)
        .expect("infallible")
        .expect("undone");
    check(&g);
}

#[test]
fn an_address_is_current_only_when_answered_in_the_latest_sighting_at_its_site() {
    // A DHCP host that moved: its old address is previous, not lost (no one took it).
    let mut g = MemGraph::default();
    apply_all(
        &mut g,
        "hq",
        &[arp("198.18.0.10", mac(1), 1), arp("198.18.0.20", mac(1), 2)],
    );
    let dev = only_device(&g).clone();
    assert_eq!(
        states(&g, &dev, "hq"),
        [
            (ip("198.18.0.10"), "previous"),
            (ip("198.18.0.20"), "current")
        ]
    );
    let old = listed(&g, &dev).addresses[0].clone();
    assert_eq!(
        old.last_seen_ms, 1,
        "a previous address keeps its last-seen time"
    );
    // Someone else answers on the old one: lost.
    apply_all(&mut g, "hq", &[arp("198.18.0.10", mac(3), 3)]);
    assert_eq!(
        states(&g, device_with_mac(&g, mac(1)), "hq"),
        [(ip("198.18.0.10"), "lost"), (ip("198.18.0.20"), "current")]
    );

    // A laptop roaming hq -> branch -> hq: per site, the latest sighting there.
    let mut g = MemGraph::default();
    apply(&mut g, &scope("hq"), "a1", &arp("198.18.0.10", mac(1), 1)).expect("infallible");
    apply(
        &mut g,
        &scope("branch"),
        "a2",
        &arp("198.18.9.7", mac(1), 2),
    )
    .expect("infallible");
    apply(&mut g, &scope("hq"), "a1", &arp("198.18.0.11", mac(1), 3)).expect("infallible");
    let dev = only_device(&g).clone();
    assert_eq!(
        states(&g, &dev, "hq"),
        [
            (ip("198.18.0.10"), "previous"),
            (ip("198.18.0.11"), "current")
        ]
    );
    assert_eq!(states(&g, &dev, "branch"), [(ip("198.18.9.7"), "current")]);

    // Two NICs answering milliseconds apart are one sighting: both current.
    let mut g = MemGraph::default();
    apply_all(&mut g, "hq", &dual_nic(1));
    apply_all(&mut g, "hq", &dual_nic(100));
    assert_eq!(current(&g, only_device(&g)).len(), 2);

    // A routed router answering ping on two addresses, known by its SNMP engine ID: one
    // observation per address, dated by the sweep, so both are current.
    let mut g = MemGraph::default();
    let routed = |addr: &str, at| CleanObservation {
        macs: vec![],
        methods: vec![v1::Method::Icmp, v1::Method::Snmp],
        engine_id: Some(vec![0x80, 0, 0, 9, 3, 1, 2]),
        ..arp(addr, mac(0), at)
    };
    apply_all(
        &mut g,
        "hq",
        &[routed("198.18.7.1", 5), routed("198.18.8.1", 5)],
    );
    apply_all(
        &mut g,
        "hq",
        &[routed("198.18.7.1", 9), routed("198.18.8.1", 9)],
    );
    assert_eq!(current(&g, only_device(&g)).len(), 2);

    // A phone back with a new random MAC (one device through its mDNS name) answers on a new
    // address: the address of its old MAC is previous.
    let mut g = MemGraph::default();
    let phone = |m: [u8; 6], addr: &str, at| CleanObservation {
        mdns_host: Some("Annas-iPhone.local.".into()),
        ..arp(addr, MacAddr(m), at)
    };
    apply_all(
        &mut g,
        "hq",
        &[
            phone([0xda, 1, 2, 3, 4, 5], "198.18.0.50", 1),
            phone([0x7a, 9, 9, 9, 9, 9], "198.18.0.51", 2),
        ],
    );
    assert_eq!(
        states(&g, only_device(&g), "hq"),
        [
            (ip("198.18.0.50"), "previous"),
            (ip("198.18.0.51"), "current")
        ]
    );

    // A proxy-ARP router claims its addresses, all in one sighting.
    let mut g = MemGraph::default();
    let mut o = arp("198.18.0.1", mac(1), 1);
    o.addresses = (1..5)
        .map(|i| (ip(&format!("198.18.0.{i}")), true))
        .collect();
    o.proxy_arp = true;
    apply_all(&mut g, "hq", &[o]);
    assert_eq!(current(&g, only_device(&g)).len(), 4);
}

#[test]
fn unknown_keeps_its_reason_and_never_undoes_a_decided_category() {
    let mut g = MemGraph::default();
    let with = |category: v1::Category, reason: &str, at| CleanObservation {
        category: Some((category, reason.to_owned())),
        ..arp("198.18.0.10", mac(1), at)
    };
    let nothing = "no identifying evidence (no SNMP, mDNS or telling vendor)";
    apply_all(&mut g, "hq", &[with(v1::Category::Unknown, nothing, 1)]);
    let dev = only_device(&g);
    assert_eq!(crate::model::category(dev), "unknown");
    assert_eq!(dev.category_reason, nothing);
    apply_all(
        &mut g,
        "hq",
        &[
            with(
                v1::Category::Printer,
                "SNMP sysDescr mentions \"jetdirect\"",
                2,
            ),
            // A later sweep whose SNMP went unanswered knows less, not better.
            with(v1::Category::Unknown, nothing, 3),
        ],
    );
    let dev = only_device(&g);
    assert_eq!(dev.category, "printer");
    assert_eq!(dev.category_reason, "SNMP sysDescr mentions \"jetdirect\"");
}

// === order does not matter ===

fn observation() -> impl Strategy<Value = CleanObservation> {
    let mac_pool = prop::sample::select(vec![
        mac(1),
        mac(2),
        mac(3),
        mac(4),
        MacAddr([0xda, 0, 0, 0, 0, 1]),
        MacAddr([0xda, 0, 0, 0, 0, 2]),
        MacAddr([0x00, 0x00, 0x5e, 0x00, 0x01, 0x01]),
    ]);
    (
        1u64..50,
        prop::collection::vec(mac_pool.clone(), 0..2),
        prop::collection::vec(mac_pool, 0..3),
        prop::option::of(prop::sample::select(vec!["phone.local.", "tv.local."])),
        prop::option::of(prop::sample::select(vec![
            vec![0x80u8, 0, 0, 9, 3, 1],
            vec![0x80u8, 0, 0, 9, 3, 2],
        ])),
        prop::sample::select(vec!["198.18.0.1", "198.18.0.2", "198.18.0.3"]),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![
            (v1::Category::Unknown, "nothing telling"),
            (v1::Category::Unknown, "no SNMP"),
            (v1::Category::Printer, "jetdirect"),
            (v1::Category::Network, "routeros"),
        ])),
    )
        .prop_map(
            |(at, macs, ifs, host, engine, addr, proxy, category)| CleanObservation {
                observed_ms: at,
                methods: vec![v1::Method::Arp],
                category: category.map(|(c, r)| (c, r.to_owned())),
                macs,
                interface_macs: ifs,
                engine_id: engine,
                serial: None,
                mdns_host: host.map(str::to_owned),
                addresses: vec![(ip(addr), true)],
                names: vec![],
                proxy_arp: proxy && at % 7 == 0,
                reported_addresses: 1,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn replaying_observations_in_any_order_gives_the_same_devices(
        obs in prop::collection::vec(observation(), 1..12),
        seed in any::<u64>(),
    ) {
        let mut a = MemGraph::default();
        apply_all(&mut a, "hq", &obs);
        let mut shuffled = obs.clone();
        // A deterministic shuffle from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let j = usize::try_from(state % (i as u64 + 1)).unwrap_or(0);
            shuffled.swap(i, j);
        }
        let mut b = MemGraph::default();
        apply_all(&mut b, "hq", &shuffled);
        prop_assert_eq!(&a.devices, &b.devices);
        prop_assert_eq!(&a.owners, &b.owners);
        prop_assert_eq!(&a.virtual_macs, &b.virtual_macs);
        let device_keys = |g: &MemGraph| g.keys.iter().map(|(k, r)| (k.clone(), r.device.clone())).collect::<Vec<_>>();
        prop_assert_eq!(device_keys(&a), device_keys(&b));
    }
}
