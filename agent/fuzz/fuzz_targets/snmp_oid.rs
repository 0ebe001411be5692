//! The content octets of a BER OBJECT IDENTIFIER through the probe's OID decoder; what decodes
//! must re-encode to the same octets (`census_agent::fuzzing::snmp_oid`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|content: &[u8]| {
    census_agent::fuzzing::snmp_oid(content);
});
