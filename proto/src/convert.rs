//! Hand-written conversions between wire types and the std types Census works with: MAC
//! addresses, IP addresses and timestamps. Everything that arrives from the wire is validated
//! here, once, so the collector never trusts an agent's bytes.

use std::{
    fmt,
    net::IpAddr,
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::v1;

// === impl MacAddr ===

/// A 48-bit IEEE 802 MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The locally administered bit: set on randomized and virtual MACs.
    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// The group bit: a multicast or broadcast address, never a device.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// Whether this address can name a device at all (not zero, not a group address).
    pub fn is_unicast(&self) -> bool {
        !self.is_zero() && !self.is_multicast()
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why bytes or text are not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("a MAC address has 6 octets, got {0}")]
    Length(usize),
    #[error("{0:?} is not a MAC address (expected six hex pairs such as 00:16:3e:00:00:01)")]
    Syntax(String),
}

impl TryFrom<&[u8]> for MacAddr {
    type Error = MacError;

    fn try_from(bytes: &[u8]) -> Result<Self, MacError> {
        <[u8; 6]>::try_from(bytes)
            .map(MacAddr)
            .map_err(|_| MacError::Length(bytes.len()))
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    /// Accepts `aa:bb:cc:dd:ee:ff` and `aa-bb-cc-dd-ee-ff`, either case.
    fn from_str(s: &str) -> Result<Self, MacError> {
        let err = || MacError::Syntax(s.chars().take(64).collect());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for slot in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

// === timestamps ===

/// A `SystemTime` as a protobuf timestamp (times before the epoch clamp to it).
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf timestamp as a `SystemTime`; `None` for negative or out-of-range values.
pub fn system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// Milliseconds since the Unix epoch, the unit the collector stores times in.
pub fn unix_millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// A protobuf timestamp from milliseconds since the Unix epoch.
pub fn timestamp_from_millis(ms: u64) -> prost_types::Timestamp {
    timestamp(UNIX_EPOCH + Duration::from_millis(ms))
}

// === methods and addresses ===

impl v1::Method {
    /// The short name used in logs, the CLI and JSON output.
    pub fn label(self) -> &'static str {
        match self {
            v1::Method::Unspecified => "unspecified",
            v1::Method::Arp => "arp",
            v1::Method::Icmp => "icmp",
            v1::Method::Snmp => "snmp",
            v1::Method::Mdns => "mdns",
        }
    }
}

impl v1::Category {
    /// The short name used in logs, the CLI and JSON output.
    pub fn label(self) -> &'static str {
        match self {
            v1::Category::Unspecified | v1::Category::Unknown => "unknown",
            v1::Category::Network => "network",
            v1::Category::Printer => "printer",
            v1::Category::Computer => "computer",
            v1::Category::PhoneTablet => "phone-tablet",
            v1::Category::MediaIot => "media-iot",
            v1::Category::Server => "server",
        }
    }
}

/// Parses a wire IP address, refusing anything that is not a plain IPv4/IPv6 literal.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    if s.len() > 45 {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_through_text() {
        let mac: MacAddr = "00:16:3E:0a:0b:0c".parse().expect("valid mac");
        assert_eq!(mac.0, [0x00, 0x16, 0x3e, 0x0a, 0x0b, 0x0c]);
        assert_eq!(mac.to_string(), "00:16:3e:0a:0b:0c");
        assert_eq!("00-16-3e-0a-0b-0c".parse::<MacAddr>(), Ok(mac));
    }

    #[test]
    fn mac_rejects_garbage() {
        for bad in [
            "",
            "00:16:3e",
            "00:16:3e:0a:0b:0c:0d",
            "zz:16:3e:0a:0b:0c",
            "0:16:3e:0a:0b:0c",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad} must not parse");
        }
        assert_eq!(
            MacAddr::try_from(&[1u8, 2, 3][..]),
            Err(MacError::Length(3))
        );
    }

    #[test]
    fn mac_bits() {
        let random: MacAddr = "da:a1:19:00:00:01".parse().expect("valid mac");
        assert!(random.is_locally_administered());
        assert!(
            !"01:00:5e:00:00:01"
                .parse::<MacAddr>()
                .expect("valid")
                .is_unicast()
        );
        assert!(!MacAddr([0; 6]).is_unicast());
    }

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        assert_eq!(system_time(&timestamp(t)), Some(t));
        assert_eq!(unix_millis(t), 1_764_000_000_123);
        assert_eq!(
            system_time(&prost_types::Timestamp {
                seconds: -1,
                nanos: 0
            }),
            None
        );
    }
}
