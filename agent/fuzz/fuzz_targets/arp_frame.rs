//! A received Ethernet frame through the ARP parser; what parses must re-encode and re-parse to
//! the same packet (`census_agent::fuzzing::arp_frame`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    census_agent::fuzzing::arp_frame(frame);
});
