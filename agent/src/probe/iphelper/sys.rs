//! The IP Helper calls themselves (Windows only): the agent's only `unsafe` code. Each
//! function copies what the API returned into plain Rust values (`RawAdapter`, `RawRoute`,
//! raw codes and bytes) before returning, and frees what the API allocated; `iphelper.rs`
//! interprets them. Compile-checked on Linux (`--target x86_64-pc-windows-gnu`); the logic
//! around it is unit-tested there.
#![allow(unsafe_code)]

use std::{io, net::Ipv4Addr, ptr};

use windows_sys::Win32::{
    Foundation::{ERROR_BUFFER_OVERFLOW, GetLastError, INVALID_HANDLE_VALUE, NO_ERROR},
    NetworkManagement::{
        IpHelper::{
            FreeMibTable, GAA_FLAG_SKIP_ANYCAST, GAA_FLAG_SKIP_DNS_SERVER, GAA_FLAG_SKIP_MULTICAST,
            GetAdaptersAddresses, GetIpForwardTable2, ICMP_ECHO_REPLY, IP_ADAPTER_ADDRESSES_LH,
            IcmpCloseHandle, IcmpCreateFile, IcmpSendEcho2, MIB_IPFORWARD_TABLE2, MIB_IPNET_ROW2,
            ResolveIpNetEntry2,
        },
        Ndis::IfOperStatusUp,
    },
    Networking::WinSock::{AF_INET, IN_ADDR, IN_ADDR_0, SOCKADDR_IN, SOCKADDR_INET},
};

use super::{RawAdapter, RawRoute};

fn sockaddr_inet(ip: Ipv4Addr) -> SOCKADDR_INET {
    SOCKADDR_INET {
        Ipv4: SOCKADDR_IN {
            sin_family: AF_INET,
            sin_port: 0,
            sin_addr: IN_ADDR {
                S_un: IN_ADDR_0 {
                    // In network order in memory, as the octets are.
                    S_addr: u32::from_ne_bytes(ip.octets()),
                },
            },
            sin_zero: [0; 8],
        },
    }
}

/// The IPv4 address in a `SOCKADDR_INET`, if it holds one.
fn ipv4_of(sa: &SOCKADDR_INET) -> Option<Ipv4Addr> {
    // SAFETY: every variant starts with the address family; the IPv4 variant is read only
    // when the family says it is IPv4.
    unsafe {
        if sa.si_family != AF_INET {
            return None;
        }
        Some(Ipv4Addr::from(sa.Ipv4.sin_addr.S_un.S_addr.to_ne_bytes()))
    }
}

/// Reads a NUL-terminated UTF-16 string.
///
/// SAFETY: `p` is null or points to a NUL-terminated UTF-16 string that outlives the call.
unsafe fn wide(p: *const u16) -> String {
    if p.is_null() {
        return String::new();
    }
    let mut len = 0;
    // SAFETY: per the contract, every unit up to and including the NUL is readable.
    unsafe {
        while *p.add(len) != 0 {
            len += 1;
        }
        String::from_utf16_lossy(std::slice::from_raw_parts(p, len))
    }
}

/// Every adapter with its IPv4 unicast addresses (`GetAdaptersAddresses`, `AF_INET`).
pub(crate) fn adapters() -> io::Result<Vec<RawAdapter>> {
    let flags = GAA_FLAG_SKIP_ANYCAST | GAA_FLAG_SKIP_MULTICAST | GAA_FLAG_SKIP_DNS_SERVER;
    // Microsoft recommends starting at 15 KB; u64s keep the buffer aligned for the structs.
    let mut size: u32 = 15 * 1024;
    let mut buf: Vec<u64> = Vec::new();
    for _ in 0..4 {
        buf.resize((size as usize).div_ceil(8), 0);
        // SAFETY: `buf` holds at least `size` writable bytes, aligned for the structs.
        let rc = unsafe {
            GetAdaptersAddresses(
                u32::from(AF_INET),
                flags,
                ptr::null(),
                buf.as_mut_ptr().cast::<IP_ADAPTER_ADDRESSES_LH>(),
                &mut size,
            )
        };
        match rc {
            NO_ERROR => return Ok(walk_adapters(&buf)),
            ERROR_BUFFER_OVERFLOW => continue,
            // No adapter at all.
            232 | 1228 => return Ok(Vec::new()),
            e => return Err(io::Error::from_raw_os_error(e as i32)),
        }
    }
    Err(io::Error::other(
        "GetAdaptersAddresses kept asking for a larger buffer",
    ))
}

fn walk_adapters(buf: &[u64]) -> Vec<RawAdapter> {
    let mut out = Vec::new();
    let mut p = buf.as_ptr().cast::<IP_ADAPTER_ADDRESSES_LH>();
    // SAFETY: the API filled `buf` with a linked list of adapters (and their address lists)
    // that lives inside `buf`; every pointer followed is from that list or null.
    unsafe {
        while !p.is_null() {
            let a = &*p;
            let len = (a.PhysicalAddressLength as usize).min(a.PhysicalAddress.len());
            let mut ipv4 = Vec::new();
            let mut u = a.FirstUnicastAddress;
            while !u.is_null() {
                let addr = &*u;
                let sa = addr.Address.lpSockaddr;
                if !sa.is_null() && (*sa).sa_family == AF_INET {
                    let sin = &*sa.cast::<SOCKADDR_IN>();
                    ipv4.push((
                        Ipv4Addr::from(sin.sin_addr.S_un.S_addr.to_ne_bytes()),
                        addr.OnLinkPrefixLength,
                    ));
                }
                u = addr.Next;
            }
            out.push(RawAdapter {
                friendly_name: wide(a.FriendlyName),
                if_index: a.Anonymous1.Anonymous.IfIndex,
                physical: a.PhysicalAddress[..len].to_vec(),
                oper_up: a.OperStatus == IfOperStatusUp,
                if_type: a.IfType,
                ipv4,
            });
            p = a.Next;
        }
    }
    out
}

/// The IPv4 routing table (`GetIpForwardTable2`).
pub(crate) fn routes() -> io::Result<Vec<RawRoute>> {
    let mut table: *mut MIB_IPFORWARD_TABLE2 = ptr::null_mut();
    // SAFETY: on success the API allocates the table and hands it over; it is freed below.
    let rc = unsafe { GetIpForwardTable2(AF_INET, &mut table) };
    if rc != NO_ERROR {
        return Err(io::Error::from_raw_os_error(rc as i32));
    }
    if table.is_null() {
        return Ok(Vec::new());
    }
    // SAFETY: `table` holds `NumEntries` rows in place of its one-element array.
    let out = unsafe {
        let n = (*table).NumEntries as usize;
        let rows = std::slice::from_raw_parts((*table).Table.as_ptr(), n);
        rows.iter()
            .filter_map(|r| {
                Some(RawRoute {
                    destination: ipv4_of(&r.DestinationPrefix.Prefix)?,
                    prefix_len: r.DestinationPrefix.PrefixLength,
                    next_hop: ipv4_of(&r.NextHop).unwrap_or(Ipv4Addr::UNSPECIFIED),
                    if_index: r.InterfaceIndex,
                })
            })
            .collect()
    };
    // SAFETY: allocated by GetIpForwardTable2, freed once.
    unsafe { FreeMibTable(table.cast()) };
    Ok(out)
}

/// Resolves `target`'s MAC on interface `if_index` afresh (`ResolveIpNetEntry2` flushes the
/// neighbour entry first), asking from `source`. Blocking: up to the OS's resolution time.
/// Returns the call's result code and the row's physical address and its length.
pub(crate) fn resolve_neighbour(
    if_index: u32,
    target: Ipv4Addr,
    source: Option<Ipv4Addr>,
) -> (u32, [u8; 32], u32) {
    let mut row = MIB_IPNET_ROW2 {
        Address: sockaddr_inet(target),
        InterfaceIndex: if_index,
        ..MIB_IPNET_ROW2::default()
    };
    let source = source.map(sockaddr_inet);
    let source_ptr = source.as_ref().map_or(ptr::null(), ptr::from_ref);
    // SAFETY: `row` and `source` are valid for the call; the API writes only into `row`.
    let rc = unsafe { ResolveIpNetEntry2(&mut row, source_ptr) };
    (rc, row.PhysicalAddress, row.PhysicalAddressLength)
}

/// One ICMP echo to `target` (`IcmpSendEcho2`, synchronous: no event, no APC), waiting up to
/// `timeout_ms`. Returns what `iphelper::echo` reads: the number of replies, the last error
/// when there were none, and the first reply's status, address and round-trip time.
pub(crate) fn icmp_echo(
    target: Ipv4Addr,
    payload: &[u8],
    timeout_ms: u32,
) -> io::Result<(u32, u32, u32, [u8; 4], u32)> {
    // SAFETY: no arguments; the handle is closed below.
    let handle = unsafe { IcmpCreateFile() };
    if handle == INVALID_HANDLE_VALUE {
        return Err(io::Error::last_os_error());
    }
    // Room for one reply with our payload echoed, plus the 8 bytes of an ICMP error's own
    // data, as the API asks.
    let size = std::mem::size_of::<ICMP_ECHO_REPLY>() + payload.len() + 8 + 64;
    let mut reply: Vec<u64> = vec![0; size.div_ceil(8)];
    let payload_len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    // SAFETY: `reply` holds `size` writable bytes aligned for ICMP_ECHO_REPLY; `payload` is
    // readable for `payload_len` bytes; a null event and APC make the call synchronous.
    let (replies, last_error) = unsafe {
        let n = IcmpSendEcho2(
            handle,
            ptr::null_mut(),
            None,
            ptr::null(),
            u32::from_ne_bytes(target.octets()),
            payload.as_ptr().cast(),
            payload_len,
            ptr::null(),
            reply.as_mut_ptr().cast(),
            u32::try_from(size).unwrap_or(u32::MAX),
            timeout_ms,
        );
        (n, if n == 0 { GetLastError() } else { 0 })
    };
    // SAFETY: the buffer starts with an ICMP_ECHO_REPLY the API filled when `replies > 0`
    // (and zeroes otherwise, which we do not read as a reply).
    let (status, address, rtt) = unsafe {
        let r = &*reply.as_ptr().cast::<ICMP_ECHO_REPLY>();
        (r.Status, r.Address.to_ne_bytes(), r.RoundTripTime)
    };
    // SAFETY: opened above, closed once.
    unsafe { IcmpCloseHandle(handle) };
    Ok((replies, last_error, status, address, rtt))
}
