//! Active Directory's binary and numeric encodings, as plain functions (no I/O): objectSid to
//! its `S-1-5-21-...` text, objectGUID to its registry-style text, FILETIME to a protobuf
//! timestamp, AD's signed 32-bit integers, and capping of text a hostile directory might make
//! huge or unprintable.

use prost_types::Timestamp;

/// The most bytes kept of any one string from the directory (names, DNs).
pub const MAX_TEXT_BYTES: usize = 255;

/// 100 ns intervals between 1601-01-01 (the FILETIME epoch) and 1970-01-01.
const FILETIME_UNIX_OFFSET_SECS: i64 = 11_644_473_600;
const FILETIME_TICKS_PER_SEC: i64 = 10_000_000;
/// 9999-12-31T23:59:59Z, the last second a protobuf `Timestamp` may hold.
const MAX_TIMESTAMP_SECS: i64 = 253_402_300_799;

/// objectSid (binary, as [MS-DTYP] 2.4.2.2 lays it out) as text: `S-1-5-21-x-y-z-rid`.
/// `None` unless the length matches the sub-authority count exactly.
pub fn sid_to_string(sid: &[u8]) -> Option<String> {
    let (&revision, rest) = sid.split_first()?;
    let (&count, rest) = rest.split_first()?;
    let count = usize::from(count);
    // At most 15 sub-authorities ([MS-DTYP] 2.4.2); the length must match exactly.
    if revision != 1 || count > 15 || rest.len() != 6 + 4 * count {
        return None;
    }
    let (authority, subs) = rest.split_at(6);
    let authority = authority
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    // SDDL prints an identifier authority of 2^32 or more in hex ([MS-DTYP] 2.4.2.1).
    let mut text = if authority >> 32 == 0 {
        format!("S-{revision}-{authority}")
    } else {
        format!("S-{revision}-0x{authority:012X}")
    };
    for sub in subs.chunks_exact(4) {
        let value = u32::from_le_bytes([sub[0], sub[1], sub[2], sub[3]]);
        text.push('-');
        text.push_str(&value.to_string());
    }
    Some(text)
}

/// objectGUID's 16 bytes, or `None` for any other length.
pub fn guid_bytes(value: &[u8]) -> Option<[u8; 16]> {
    value.try_into().ok()
}

/// objectGUID as Windows prints it (`{...}` without braces): the first three fields are stored
/// little-endian, the last two as they are. For logs and tests; the wire carries the bytes.
pub fn guid_to_string(g: &[u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// A FILETIME (100 ns ticks since 1601-01-01 UTC, as AD's accountExpires and
/// lastLogonTimestamp hold it, in decimal text) as a timestamp. `None` for 0 and
/// 0x7FFFFFFFFFFFFFFF, which AD uses for "never", and for text that is no number.
///
/// Times before 1970 clamp to 1970-01-01 (the collector reads timestamps as `SystemTime`s,
/// which start there, and an account that expired in 1601 has expired all the same), and times
/// past 9999 clamp to 9999-12-31T23:59:59Z, the end of what a timestamp may hold.
pub fn filetime(text: &str) -> Option<Timestamp> {
    let ticks: i64 = text.trim().parse().ok()?;
    if ticks == 0 || ticks == i64::MAX {
        return None;
    }
    let secs = ticks.div_euclid(FILETIME_TICKS_PER_SEC) - FILETIME_UNIX_OFFSET_SECS;
    let nanos = ticks.rem_euclid(FILETIME_TICKS_PER_SEC) * 100;
    Some(if secs < 0 {
        Timestamp {
            seconds: 0,
            nanos: 0,
        }
    } else if secs > MAX_TIMESTAMP_SECS {
        Timestamp {
            seconds: MAX_TIMESTAMP_SECS,
            nanos: 0,
        }
    } else {
        Timestamp {
            seconds: secs,
            // Below 10^9 by construction.
            nanos: i32::try_from(nanos).unwrap_or(0),
        }
    })
}

/// An LDAP GeneralizedTime in UTC (RFC 4517 3.3.13, as AD's whenCreated holds it:
/// `20240102030405.0Z`) as a timestamp. Only the UTC form (`Z`) is read, which is all AD sends;
/// a local time or an offset, or anything that is no valid date, gives `None` (unknown rather
/// than guessed). Times before 1970 clamp to 1970-01-01, as [`filetime`]'s do.
pub fn generalized_time(text: &str) -> Option<Timestamp> {
    let body = text.trim().strip_suffix(['Z', 'z'])?;
    let (whole, fraction) = match body.split_once(['.', ',']) {
        Some((w, f)) => (w, Some(f)),
        None => (body, None),
    };
    if whole.len() != 14 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| whole.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(8..10)?, num(10..12)?, num(12..14)?);
    let nanos = match fraction {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            let digits: i64 = f.parse().ok()?;
            digits * 10i64.pow(9 - u32::try_from(f.len()).ok()?)
        }
        Some(_) => return None,
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let days_in_month = *month_days.get(usize::try_from(month - 1).ok()?)?;
    // 60 seconds: a leap second, as GeneralizedTime allows.
    if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(if secs < 0 {
        Timestamp {
            seconds: 0,
            nanos: 0,
        }
    } else {
        Timestamp {
            seconds: secs.min(MAX_TIMESTAMP_SECS),
            nanos: i32::try_from(nanos).unwrap_or(0),
        }
    })
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A timestamp as a FILETIME, the inverse of [`filetime`] (for tests and the lab).
pub fn to_filetime(ts: &Timestamp) -> i64 {
    (ts.seconds + FILETIME_UNIX_OFFSET_SECS) * FILETIME_TICKS_PER_SEC + i64::from(ts.nanos) / 100
}

/// An AD INTEGER attribute (userAccountControl, sAMAccountType) as the 32 bits it holds. AD
/// stores them as signed 32-bit syntax, so a value with bit 31 set may come as a negative
/// number; both spellings give the same bits. `None` for anything else.
pub fn int32_bits(text: &str) -> Option<u32> {
    let value: i64 = text.trim().parse().ok()?;
    if let Ok(v) = i32::try_from(value) {
        return Some(v as u32);
    }
    u32::try_from(value).ok()
}

/// An LDAP Boolean (`TRUE` / `FALSE`, RFC 4517 3.3.3); anything else is false.
pub fn boolean(text: &str) -> bool {
    text.trim().eq_ignore_ascii_case("TRUE")
}

/// Text from the directory made safe to store and show: invalid UTF-8 replaced, control
/// characters (which could rewrite a terminal or a CSV line) replaced by U+FFFD, and cut to at
/// most [`MAX_TEXT_BYTES`] bytes on a character boundary.
pub fn cap_text(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut out = String::with_capacity(text.len().min(MAX_TEXT_BYTES));
    for c in text.chars() {
        let c = if c.is_control() { '\u{FFFD}' } else { c };
        if out.len() + c.len_utf8() > MAX_TEXT_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// The DNS domain a base DN names: its `DC=` components joined with dots, lowercased
/// (`OU=Staff,DC=Corp,DC=Example` is `corp.example`). The base DN itself, capped, when it has
/// none.
pub fn domain_of(base_dn: &str) -> String {
    let labels: Vec<String> = base_dn
        .split(',')
        .filter_map(|rdn| {
            let (attr, value) = rdn.split_once('=')?;
            attr.trim()
                .eq_ignore_ascii_case("dc")
                .then(|| value.trim().to_lowercase())
        })
        .filter(|label| !label.is_empty())
        .collect();
    if labels.is_empty() {
        cap_text(base_dn.trim().as_bytes())
    } else {
        cap_text(labels.join(".").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// objectSid of LAB\Administrator in the lab domain, as ldapsearch prints it in base64
    /// (`AQUAAAAAAAUVAAAA9arBPX1nPmBynT/59AEAAA==`).
    const ADMIN_SID: [u8; 28] = [
        1, 5, 0, 0, 0, 0, 0, 5, 21, 0, 0, 0, 0xf5, 0xaa, 0xc1, 0x3d, 0x7d, 0x67, 0x3e, 0x60, 0x72,
        0x9d, 0x3f, 0xf9, 0xf4, 0x01, 0, 0,
    ];

    #[test]
    fn generalized_times_read_as_ad_writes_whencreated() {
        let at = |t: &str| generalized_time(t).map(|ts| (ts.seconds, ts.nanos));
        // 2024-01-02T03:04:05Z, as AD and Samba write whenCreated.
        assert_eq!(at("20240102030405.0Z"), Some((1_704_164_645, 0)));
        assert_eq!(at("20240102030405Z"), Some((1_704_164_645, 0)));
        assert_eq!(at("20240229235959.5Z"), Some((1_709_251_199, 500_000_000)));
        assert_eq!(at("19700101000000.0Z"), Some((0, 0)));
        assert_eq!(at("16010101000000.0Z"), Some((0, 0)), "clamped to 1970");
        for bad in [
            "",
            "20240102030405.0",     // local time: not read
            "20240102030405+0100",  // an offset: not read
            "20230229000000.0Z",    // no 29 February in 2023
            "20241301000000.0Z",    // month 13
            "2024010203040.0Z",     // too short
            "2024-01-02T03:04:05Z", // RFC 3339 is not GeneralizedTime
            "20240102030405.Z",     // an empty fraction
        ] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sids_read_as_windows_prints_them() {
        assert_eq!(
            sid_to_string(&ADMIN_SID).as_deref(),
            Some("S-1-5-21-1036102389-1614702461-4181695858-500")
        );
        // Well-known SIDs: Everyone (S-1-1-0), BUILTIN\Administrators (S-1-5-32-544).
        assert_eq!(
            sid_to_string(&[1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]).as_deref(),
            Some("S-1-1-0")
        );
        assert_eq!(
            sid_to_string(&[1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x20, 2, 0, 0]).as_deref(),
            Some("S-1-5-32-544")
        );
        // No sub-authorities at all (S-1-0 is not a SID anyone holds, but it is well formed).
        assert_eq!(
            sid_to_string(&[1, 0, 0, 0, 0, 0, 0, 0]).as_deref(),
            Some("S-1-0")
        );
        // The highest sub-authority value.
        assert_eq!(
            sid_to_string(&[1, 1, 0, 0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff]).as_deref(),
            Some("S-1-5-4294967295")
        );
        // An identifier authority of 2^32 or more prints in hex.
        assert_eq!(
            sid_to_string(&[1, 1, 0, 1, 0, 0, 0, 0, 7, 0, 0, 0]).as_deref(),
            Some("S-1-0x000100000000-7")
        );
    }

    #[test]
    fn malformed_sids_are_refused() {
        assert_eq!(sid_to_string(&[]), None);
        assert_eq!(sid_to_string(&[1]), None);
        assert_eq!(sid_to_string(&ADMIN_SID[..27]), None, "truncated");
        let mut long = ADMIN_SID.to_vec();
        long.push(0);
        assert_eq!(sid_to_string(&long), None, "trailing bytes");
        let mut revision = ADMIN_SID;
        revision[0] = 2;
        assert_eq!(sid_to_string(&revision), None, "unknown revision");
        let mut many = vec![1u8, 16, 0, 0, 0, 0, 0, 5];
        many.extend([0u8; 64]);
        assert_eq!(sid_to_string(&many), None, "more than 15 sub-authorities");
        let mut count = ADMIN_SID;
        count[1] = 255;
        assert_eq!(sid_to_string(&count), None, "a count the bytes do not hold");
    }

    #[test]
    fn guids_are_16_bytes_and_print_mixed_endian() {
        // objectGUID of a lab account, base64 `MjYOZMjE6kKDGHOZId8jRQ==`.
        let raw = [
            0x32, 0x36, 0x0e, 0x64, 0xc8, 0xc4, 0xea, 0x42, 0x83, 0x18, 0x73, 0x99, 0x21, 0xdf,
            0x23, 0x45,
        ];
        let g = guid_bytes(&raw).expect("16 bytes");
        assert_eq!(guid_to_string(&g), "640e3632-c4c8-42ea-8318-739921df2345");
        assert_eq!(guid_bytes(&raw[..15]), None);
        assert_eq!(guid_bytes(&[0; 17]), None);
        assert_eq!(guid_bytes(&[]), None);
    }

    #[test]
    fn filetimes_become_timestamps() {
        // 2020-01-01T00:00:00Z.
        let ts = filetime("132223104000000000").expect("a time");
        assert_eq!((ts.seconds, ts.nanos), (1_577_836_800, 0));
        assert_eq!(to_filetime(&ts), 132_223_104_000_000_000);
        // Sub-second ticks keep their 100 ns resolution.
        let ts = filetime("132223104000000001").expect("a time");
        assert_eq!((ts.seconds, ts.nanos), (1_577_836_800, 100));
        // The Unix epoch itself.
        let ts = filetime("116444736000000000").expect("a time");
        assert_eq!((ts.seconds, ts.nanos), (0, 0));
        // "Never": 0 and 0x7FFFFFFFFFFFFFFF.
        assert_eq!(filetime("0"), None);
        assert_eq!(filetime("9223372036854775807"), None);
        // Before 1970 clamps to the epoch (still in the past, so still expired).
        let ts = filetime("1").expect("a time");
        assert_eq!((ts.seconds, ts.nanos), (0, 0));
        let ts = filetime("-5").expect("a time");
        assert_eq!(ts.seconds, 0);
        // Past 9999 clamps to the end of what a timestamp holds.
        let ts = filetime("9223372036854775806").expect("a time");
        assert_eq!(ts.seconds, MAX_TIMESTAMP_SECS);
        // Not a number, or too large for 64 bits.
        assert_eq!(filetime(""), None);
        assert_eq!(filetime("soon"), None);
        assert_eq!(filetime("99999999999999999999"), None);
        assert!(filetime(" 132223104000000000 ").is_some(), "whitespace");
    }

    #[test]
    fn ad_integers_keep_their_bits() {
        assert_eq!(int32_bits("512"), Some(512));
        assert_eq!(int32_bits("805306368"), Some(805_306_368));
        assert_eq!(int32_bits("-2147483136"), Some(0x8000_0200));
        assert_eq!(int32_bits("2147484160"), Some(0x8000_0200));
        assert_eq!(int32_bits("4294967296"), None);
        assert_eq!(int32_bits("-2147483649"), None);
        assert_eq!(int32_bits("0x200"), None);
        assert_eq!(int32_bits(""), None);
    }

    #[test]
    fn booleans() {
        assert!(boolean("TRUE"));
        assert!(boolean("true"));
        assert!(!boolean("FALSE"));
        assert!(!boolean("1"));
        assert!(!boolean(""));
    }

    #[test]
    fn hostile_text_is_capped_and_printable() {
        assert_eq!(cap_text(b"alice"), "alice");
        let long = "x".repeat(1000);
        assert_eq!(cap_text(long.as_bytes()).len(), MAX_TEXT_BYTES);
        // A multi-byte character straddling the limit is dropped whole, never split.
        let mut edge = "y".repeat(MAX_TEXT_BYTES - 1);
        edge.push('é');
        let capped = cap_text(edge.as_bytes());
        assert_eq!(capped.len(), MAX_TEXT_BYTES - 1);
        assert!(capped.chars().all(|c| c == 'y'));
        assert_eq!(cap_text("Zoë 日本".as_bytes()), "Zoë 日本");
        assert_eq!(
            cap_text(b"a\nb\x1b[2Jc\0"),
            "a\u{FFFD}b\u{FFFD}[2Jc\u{FFFD}"
        );
        assert_eq!(cap_text(&[0x61, 0xff, 0x62]), "a\u{FFFD}b");
    }

    #[test]
    fn domains_come_from_dc_components() {
        assert_eq!(domain_of("DC=lab,DC=census,DC=test"), "lab.census.test");
        assert_eq!(domain_of("OU=Staff, dc=Corp ,DC=Example"), "corp.example");
        assert_eq!(domain_of("O=Legacy"), "O=Legacy");
        assert_eq!(domain_of(""), "");
    }
}
