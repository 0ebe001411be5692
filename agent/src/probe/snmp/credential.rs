//! Which community (and v1 or v2c) a device answers: every community, in both versions, is
//! asked at once for the system scalars, over one plain socket (not an snmp2 session: those
//! hold 128 KiB each). The configured order is the order of preference, and v2c is preferred
//! to v1 for the same community (GETBULK walks are much faster).
//!
//! Asking at once rather than in turn makes an address that answers no community cost one
//! timeout budget (`timeout` x (1 + `retries`)) instead of one per community per version. The
//! preference still decides, deterministically: once the best answer so far is in, better
//! candidates still pending get a grace of twice that answer's round trip (at least 20 ms) to
//! arrive (a device that accepts two communities answers both about as fast) before it is
//! taken. Devices drop requests with a wrong community, so in practice only one answers.
//!
//! Requests are matched to candidates by request id, so a late reply to an earlier attempt is
//! as good as a reply to the latest one.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use snmp2::{MessageType, Pdu, Version};
use tokio::{net::UdpSocket, time::Instant};

use super::{
    ber,
    session::{QueryError, Response, Timing, owned_response, start_id},
    tables,
};

/// The shortest wait for a better candidate once a worse one answered.
const MIN_GRACE: Duration = Duration::from_millis(20);
/// Receive buffer: the largest UDP payload, allocated zeroed (untouched pages cost nothing).
const RECV_BUF: usize = 65_535;

/// The credential a device answered, with its answer to the system scalars.
#[derive(Debug)]
pub(crate) struct Answer {
    /// Position in the configured community list.
    pub index: usize,
    pub version: Version,
    pub response: Response,
}

/// An answer's timing, relative to the first request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Arrival {
    received: Duration,
    rtt: Duration,
}

/// What to do next, given who answered so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    /// Take this candidate.
    Accept(usize),
    /// Keep listening, until this time at most (`None`: until the attempt ends).
    Wait(Option<Duration>),
}

/// The decision, pure: `arrivals` in order of preference; `finished` once no more answers are
/// expected (the last attempt ended).
fn choose(arrivals: &[Option<Arrival>], now: Duration, finished: bool) -> Choice {
    let Some(best) = arrivals.iter().position(Option::is_some) else {
        return Choice::Wait(None);
    };
    if best == 0 || finished {
        return Choice::Accept(best);
    }
    let Some(arrival) = arrivals[best] else {
        return Choice::Wait(None);
    };
    let until = arrival.received + (arrival.rtt * 2).max(MIN_GRACE);
    if now >= until {
        Choice::Accept(best)
    } else {
        Choice::Wait(Some(until))
    }
}

/// Candidates in order of preference: each community, v2c before v1.
fn candidates(communities: usize) -> Vec<(usize, Version)> {
    (0..communities)
        .flat_map(|i| [(i, Version::V2C), (i, Version::V1)])
        .collect()
}

/// Asks `ip` with every community at once; see the module docs. `Ok(None)` when nothing
/// answered within the retries; `Err(Unreachable)` when the port is closed.
pub(crate) async fn find_community(
    ip: Ipv4Addr,
    port: u16,
    communities: &[Vec<u8>],
    timing: Timing,
) -> Result<Option<Answer>, QueryError> {
    if communities.is_empty() {
        return Ok(None);
    }
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(|e| QueryError::Socket(e.to_string()))?;
    socket
        .connect(SocketAddr::from((ip, port)))
        .await
        .map_err(|e| QueryError::Socket(e.to_string()))?;
    let candidates = candidates(communities.len());
    let mut arrivals: Vec<Option<Arrival>> = vec![None; candidates.len()];
    let mut responses: Vec<Option<Response>> = vec![None; candidates.len()];
    let mut sent_at = vec![Instant::now(); candidates.len()];
    let mut ids: HashMap<i32, usize> = HashMap::new();
    let mut buf = vec![0u8; RECV_BUF];
    let mut next_id = start_id();
    let t0 = Instant::now();

    for _attempt in 0..=timing.retries {
        for (c, &(index, version)) in candidates.iter().enumerate() {
            if arrivals[c].is_some() {
                continue;
            }
            next_id = next_id.wrapping_add(1) & 0x3fff_ffff;
            ids.insert(next_id, c);
            let version_number = if version == Version::V1 { 0 } else { 1 };
            let request = ber::get_request(
                version_number,
                &communities[index],
                next_id,
                &tables::SYSTEM_SCALARS,
            );
            sent_at[c] = Instant::now();
            if socket.send(&request).await.is_err() {
                return Err(QueryError::Unreachable);
            }
        }
        let deadline = Instant::now() + timing.timeout;
        loop {
            let wake = match choose(&arrivals, t0.elapsed(), false) {
                Choice::Accept(c) => return Ok(take(c, &candidates, &mut responses)),
                Choice::Wait(until) => until.map_or(deadline, |u| (t0 + u).min(deadline)),
            };
            match tokio::time::timeout_at(wake, socket.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let reply = buf
                        .get(..n)
                        .and_then(|b| read_reply(b, &ids, &candidates, communities));
                    if let Some((c, response)) = reply
                        && arrivals[c].is_none()
                    {
                        arrivals[c] = Some(Arrival {
                            received: t0.elapsed(),
                            rtt: sent_at[c].elapsed(),
                        });
                        responses[c] = Some(response);
                    }
                }
                Ok(Err(_)) => return Err(QueryError::Unreachable),
                Err(_) if Instant::now() >= deadline => break,
                Err(_) => {} // a grace period ended: decide again
            }
        }
        if let Choice::Accept(c) = choose(&arrivals, t0.elapsed(), true) {
            return Ok(take(c, &candidates, &mut responses));
        }
    }
    Ok(None)
}

fn take(
    c: usize,
    candidates: &[(usize, Version)],
    responses: &mut [Option<Response>],
) -> Option<Answer> {
    let (index, version) = *candidates.get(c)?;
    let response = responses.get_mut(c)?.take()?;
    Some(Answer {
        index,
        version,
        response,
    })
}

/// A reply to one of our requests: a Response whose request id, version and community match
/// what was sent with that id. Anything else (garbage, a v3 message, a stray reply) is `None`.
fn read_reply(
    bytes: &[u8],
    ids: &HashMap<i32, usize>,
    candidates: &[(usize, Version)],
    communities: &[Vec<u8>],
) -> Option<(usize, Response)> {
    let pdu = Pdu::from_bytes(bytes).ok()?;
    if pdu.message_type != MessageType::Response {
        return None;
    }
    let c = *ids.get(&pdu.req_id)?;
    let (index, version) = *candidates.get(c)?;
    if pdu.version().ok()? != version || pdu.community != communities.get(index)?.as_slice() {
        return None;
    }
    Some((c, owned_response(pdu)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(received_ms: u64, rtt_ms: u64) -> Option<Arrival> {
        Some(Arrival {
            received: Duration::from_millis(received_ms),
            rtt: Duration::from_millis(rtt_ms),
        })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_preferred_candidate_wins_at_once() {
        assert_eq!(choose(&[None, None], ms(5), false), Choice::Wait(None));
        assert_eq!(choose(&[None, None], ms(5), true), Choice::Wait(None));
        assert_eq!(choose(&[at(1, 1), None], ms(1), false), Choice::Accept(0));
        assert_eq!(
            choose(&[at(3, 3), at(1, 1)], ms(3), false),
            Choice::Accept(0)
        );
    }

    #[test]
    fn a_worse_answer_waits_a_grace_for_better_ones() {
        // v1 answered in 1 ms; v2c of the same community gets until 1 + 20 ms.
        let arrivals = [None, at(1, 1)];
        assert_eq!(choose(&arrivals, ms(2), false), Choice::Wait(Some(ms(21))));
        assert_eq!(choose(&arrivals, ms(21), false), Choice::Accept(1));
        // A slow link: twice the round trip.
        let arrivals = [None, None, at(100, 50)];
        assert_eq!(
            choose(&arrivals, ms(100), false),
            Choice::Wait(Some(ms(200)))
        );
        assert_eq!(choose(&arrivals, ms(150), true), Choice::Accept(2));
    }

    #[test]
    fn candidates_prefer_v2c_then_the_configured_order() {
        assert_eq!(
            candidates(2),
            [
                (0, Version::V2C),
                (0, Version::V1),
                (1, Version::V2C),
                (1, Version::V1)
            ]
        );
    }

    #[test]
    fn only_matching_replies_count() {
        let communities = vec![b"one".to_vec(), b"two".to_vec()];
        let cands = candidates(2);
        let ids: HashMap<i32, usize> = [(10, 0), (11, 1), (12, 2), (13, 3)].into();
        let reply = |version: i64, community: &[u8], id: i32| {
            // A GetRequest re-tagged as a Response (0xa0 -> 0xa2): same layout.
            let mut msg = ber::get_request(version, community, id, &[tables::SYS_NAME]);
            let pos = msg.iter().position(|b| *b == 0xa0).expect("a PDU tag");
            msg[pos] = 0xa2;
            msg
        };
        let ok = reply(1, b"two", 12);
        assert_eq!(
            read_reply(&ok, &ids, &cands, &communities).map(|(c, _)| c),
            Some(2)
        );
        let v1 = reply(0, b"one", 11);
        assert_eq!(
            read_reply(&v1, &ids, &cands, &communities).map(|(c, _)| c),
            Some(1)
        );
        // Wrong community for the id, wrong version for the id, unknown id, a request.
        assert!(read_reply(&reply(1, b"one", 12), &ids, &cands, &communities).is_none());
        assert!(read_reply(&reply(0, b"two", 12), &ids, &cands, &communities).is_none());
        assert!(read_reply(&reply(1, b"two", 99), &ids, &cands, &communities).is_none());
        let request = ber::get_request(1, b"two", 12, &[tables::SYS_NAME]);
        assert!(read_reply(&request, &ids, &cands, &communities).is_none());
        // Garbage and every truncation of a good reply.
        assert!(read_reply(b"\x30\x80junk", &ids, &cands, &communities).is_none());
        for cut in 0..ok.len() {
            assert!(read_reply(&ok[..cut], &ids, &cands, &communities).is_none());
        }
    }
}
