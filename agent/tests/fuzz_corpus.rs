//! Replays the cargo-fuzz regression corpus (`agent/fuzz/corpus/<target>/`) through the same
//! `census_agent::fuzzing` entry points the fuzz targets call, so every seed and every input that
//! once found a bug is checked again by a plain `cargo test`: no nightly, no libFuzzer. Each
//! input must not panic and must finish quickly; the hand-made seeds must still reach the paths
//! they were written for (a real reply is still read as one).

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    time::{Duration, Instant},
};

use arbitrary::{Arbitrary, Unstructured};
use census_agent::fuzzing;

#[path = "../fuzz/src/mdns_input.rs"]
mod mdns_input;

/// The most one input may take, in an unoptimized build on a busy machine. The fuzz targets
/// run each input in microseconds to milliseconds; this only catches a hang or a blow-up.
const PER_INPUT: Duration = Duration::from_secs(5);

/// Every file of one target's corpus, by name, sorted.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading the corpus {}: {e}", dir.display()));
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (name, bytes)
        })
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    files
}

/// Runs `check` on every input of `target`, and fails naming each input that panicked or took
/// longer than [`PER_INPUT`].
fn replay(target: &str, mut check: impl FnMut(&str, &[u8])) {
    let mut failures = Vec::new();
    for (name, bytes) in corpus(target) {
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&name, &bytes)));
        let elapsed = started.elapsed();
        if outcome.is_err() {
            failures.push(format!("{target}/{name}: panicked"));
        } else if elapsed > PER_INPUT {
            failures.push(format!("{target}/{name}: took {elapsed:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "corpus failures:\n{}",
        failures.join("\n")
    );
}

#[cfg(unix)]
#[test]
fn arp_frame_corpus() {
    replay("arp_frame", |name, frame| {
        let parsed = fuzzing::arp_frame(frame);
        let expected = match name {
            "reply-padded-60"
            | "reply-vlan"
            | "reply-qinq"
            | "request-broadcast"
            | "gratuitous"
            | "proxy-eth-src-differs"
            | "rarp-op3" => Some(true),
            "truncated-30" | "reply-three-tags" | "ipv4-not-arp" => Some(false),
            _ => None, // found by the fuzzer: no panic is the whole check
        };
        if let Some(expected) = expected {
            assert_eq!(parsed, expected, "seed {name}");
        }
    });
}

#[test]
fn snmp_response_corpus() {
    // Localize the v3 users' keys before the clock starts.
    fuzzing::snmp_response(&[]);
    replay("snmp_response", |name, datagram| {
        let read = fuzzing::snmp_response(datagram);
        // Seeds named after a version are well-formed replies; `bad-` seeds and fuzzer finds
        // may be anything.
        if ["v1-", "v2c-", "v3-"].iter().any(|p| name.starts_with(p)) {
            assert!(read > 0, "seed {name} is no longer read as a reply");
        }
    });
}

#[test]
fn snmp_oid_corpus() {
    replay("snmp_oid", |name, content| {
        let arcs = fuzzing::snmp_oid(content);
        match name {
            "sysname" => assert_eq!(arcs, Some(vec![1, 3, 6, 1, 2, 1, 1, 5, 0])),
            "2.999.3" => assert_eq!(arcs, Some(vec![2, 999, 3])),
            "arc-u32-max" => assert_eq!(arcs, Some(vec![1, 3, u32::MAX])),
            "first-2.u32max" => assert_eq!(arcs, Some(vec![2, u32::MAX])),
            "128-arcs" => assert_eq!(arcs.map(|a| a.len()), Some(128)),
            "arc-over-u32" | "non-minimal" | "truncated" | "endless" | "129-arcs" => {
                assert_eq!(arcs, None, "seed {name}");
            }
            _ => {}
        }
    });
}

#[test]
fn mdns_records_corpus() {
    let mut with_hosts = 0;
    replay("mdns_records", |_, bytes| {
        // As libfuzzer-sys builds a typed input; bytes that make no input are skipped there too.
        let input = mdns_input::MdnsInput::arbitrary_take_rest(Unstructured::new(bytes));
        if input.is_ok_and(|input| !input.run().hosts.is_empty()) {
            with_hosts += 1;
        }
    });
    // The corpus means what it meant when it was found (the input type and `arbitrary` have not
    // drifted apart from it): some inputs still get hosts past every check.
    assert!(with_hosts > 0, "no corpus input reaches a host any more");
}

/// The mDNS caps are reached (and hold) with the largest flood one input may ask for, within
/// the time bound: the corpus alone may not contain such an input.
#[test]
fn mdns_flood_reaches_the_caps() {
    let template = fuzzing::MdnsAnswer {
        fullname: "p._ipp._tcp.local.".into(),
        service_type: "_ipp._tcp.local.".into(),
        host: "printer.local.".into(),
        port: 631,
        addresses: vec!["10.0.0.5".parse().expect("an address")],
        txt: vec![("ty".into(), Some(vec![b'x'; 2000]))],
    };
    let flood = |new_hosts| fuzzing::MdnsEvent::Flood {
        template: template.clone(),
        count: u16::MAX,
        new_hosts,
    };
    let scopes = vec!["10.0.0.0/8".parse().expect("a scope")];
    let started = Instant::now();
    let result = fuzzing::mdns_records(scopes.clone(), vec![flood(true)]);
    assert_eq!(result.hosts.len(), 4096, "MAX_HOSTS");
    let result = fuzzing::mdns_records(scopes, vec![flood(false)]);
    assert_eq!(result.hosts.len(), 1);
    assert_eq!(result.hosts[0].identity.services.len(), 32, "per host");
    assert!(started.elapsed() < 2 * PER_INPUT);
}
