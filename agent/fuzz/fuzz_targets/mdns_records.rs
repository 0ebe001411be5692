//! A sequence of mDNS answers (service types, resolved instances, mdns-sd-built services with
//! raw TXT data, floods) through the mDNS collector; every cap must hold
//! (`census_agent::fuzzing::mdns_records`).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../src/mdns_input.rs"]
mod mdns_input;

fuzz_target!(|input: mdns_input::MdnsInput| {
    input.run();
});
