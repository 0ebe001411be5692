//! The echoer on Windows: `IcmpSendEcho2` through the IP Helper API, which needs neither a raw
//! socket nor a capture driver. The call is blocking, so each request runs on one of tokio's
//! blocking threads; the sweep loop's concurrency (capped here at [`MAX_IN_FLIGHT`]) bounds
//! how many run at once, and the call's own timeout (the sweep's) bounds each. The API keeps
//! its own identifiers and matches replies itself, so `ident` and `seq` are unused; the loop
//! still checks that an answer is an echo reply from the target.

use std::{future::Future, io, net::Ipv4Addr, time::Duration};

use super::{Answer, Echoer, IcmpConfig, PAYLOAD};
use crate::probe::iphelper::{self, Echo, sys};

/// At most this many echo requests in flight on Windows: one blocking thread each. With the
/// default 1 s timeout and every target silent that is still 128 requests a second.
pub(super) const MAX_IN_FLIGHT: usize = 128;

/// `cfg` with its concurrency capped at [`MAX_IN_FLIGHT`].
pub(super) fn bounded(cfg: &IcmpConfig) -> IcmpConfig {
    IcmpConfig {
        concurrency: cfg.concurrency.min(MAX_IN_FLIGHT),
        ..cfg.clone()
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct IcmpApiEchoer;

impl Echoer for IcmpApiEchoer {
    fn echo(
        &self,
        target: Ipv4Addr,
        _ident: u16,
        _seq: u16,
        timeout: Duration,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        async move {
            let call =
                tokio::task::spawn_blocking(move || sys::icmp_echo(target, &PAYLOAD, timeout_ms));
            match call.await {
                Ok(Ok((replies, last_error, status, address, rtt_ms))) => {
                    match iphelper::echo(replies, last_error, status, address, rtt_ms) {
                        Echo::Packet {
                            source,
                            icmp_type,
                            rtt,
                        } => Answer::Packet {
                            source,
                            icmp_type,
                            rtt,
                        },
                        Echo::Timeout => Answer::Timeout,
                        Echo::SendFailed(e) => Answer::SendFailed(
                            io::Error::from_raw_os_error(i32::try_from(e).unwrap_or(i32::MAX))
                                .kind(),
                        ),
                    }
                }
                Ok(Err(e)) => Answer::Failed(format!("cannot open an ICMP handle: {e}")),
                Err(e) => Answer::Failed(e.to_string()),
            }
        }
    }
}
