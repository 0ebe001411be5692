//! A UDP datagram from an SNMP agent, read every way the SNMP probe reads replies (v1/v2c, v3
//! discovery, v3 noAuthNoPriv and authPriv), copied out, walked and decoded into every table
//! (`census_agent::fuzzing::snmp_response`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|datagram: &[u8]| {
    census_agent::fuzzing::snmp_response(datagram);
});
