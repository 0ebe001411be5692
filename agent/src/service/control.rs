//! What a Windows service control does to the agent, and what the service reports back to the
//! service control manager: I/O-free and platform-free, so it is tested on Linux too;
//! `service/windows.rs` maps the `windows-service` types to and from these.
//!
//! Stop and Shutdown both cancel the one root shutdown token, the token SIGINT and SIGTERM
//! cancel on Unix (`signal.rs`): the agent drains exactly as it does under systemd. While it
//! drains the service reports StopPending, and Stopped with the agent's exit code once `run`
//! has returned.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

/// How long the service control manager should wait for each step of stopping before it
/// thinks the service hung: the agent's longest wait while draining is an acknowledgement
/// (30 s in `run.rs`), plus time to close the stream.
pub const STOP_WAIT_HINT: Duration = Duration::from_secs(40);

/// A control the service control manager sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Stop,
    /// The machine shuts down.
    Shutdown,
    /// "Report your status."
    Interrogate,
    /// Anything else (pause, parameter changes, power events): not accepted.
    Other,
}

/// The answer to a control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    NoError,
    NotImplemented,
}

/// The service's state, as reported to the service control manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    StopPending,
    Stopped,
}

/// One status report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// Whether Stop and Shutdown are accepted (only while running).
    pub accepts_stop: bool,
    /// The agent's exit code (0: none); reported as a service-specific code.
    pub exit_code: u8,
    /// Progress of a pending stop; 0 otherwise.
    pub checkpoint: u32,
    pub wait_hint: Duration,
}

impl Status {
    pub fn running() -> Self {
        Status {
            state: State::Running,
            accepts_stop: true,
            exit_code: 0,
            checkpoint: 0,
            wait_hint: Duration::ZERO,
        }
    }

    pub fn stop_pending(checkpoint: u32) -> Self {
        Status {
            state: State::StopPending,
            accepts_stop: false,
            exit_code: 0,
            checkpoint,
            wait_hint: STOP_WAIT_HINT,
        }
    }

    pub fn stopped(exit_code: u8) -> Self {
        Status {
            state: State::Stopped,
            accepts_stop: false,
            exit_code,
            checkpoint: 0,
            wait_hint: Duration::ZERO,
        }
    }
}

/// Handles one control: Stop and Shutdown cancel `shutdown` and ask for StopPending to be
/// reported; Interrogate is answered (the manager then re-reads the last status); anything
/// else is not implemented.
pub fn handle(control: Control, shutdown: &CancellationToken) -> (Reply, Option<Status>) {
    match control {
        Control::Stop | Control::Shutdown => {
            if !shutdown.is_cancelled() {
                info!(
                    ?control,
                    "shutdown requested by the service control manager"
                );
            }
            shutdown.cancel();
            (Reply::NoError, Some(Status::stop_pending(1)))
        }
        Control::Interrogate => (Reply::NoError, None),
        Control::Other => (Reply::NotImplemented, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_and_shutdown_cancel_the_one_token() {
        for control in [Control::Stop, Control::Shutdown] {
            let token = CancellationToken::new();
            let child = token.child_token();
            let (reply, status) = handle(control, &token);
            assert_eq!(reply, Reply::NoError);
            assert!(token.is_cancelled() && child.is_cancelled(), "{control:?}");
            let status = status.expect("a status to report");
            assert_eq!(status.state, State::StopPending);
            assert!(!status.accepts_stop);
            assert!(status.checkpoint > 0 && status.wait_hint > Duration::ZERO);
        }
    }

    #[test]
    fn a_second_stop_is_harmless() {
        let token = CancellationToken::new();
        handle(Control::Stop, &token);
        let (reply, _) = handle(Control::Shutdown, &token);
        assert_eq!(reply, Reply::NoError);
        assert!(token.is_cancelled());
    }

    #[test]
    fn other_controls_do_not_stop_the_agent() {
        let token = CancellationToken::new();
        assert_eq!(handle(Control::Interrogate, &token), (Reply::NoError, None));
        assert_eq!(
            handle(Control::Other, &token),
            (Reply::NotImplemented, None)
        );
        assert!(!token.is_cancelled());
    }

    #[test]
    fn statuses() {
        assert!(Status::running().accepts_stop);
        let stopped = Status::stopped(69);
        assert_eq!((stopped.state, stopped.exit_code), (State::Stopped, 69));
        assert_eq!(stopped.checkpoint, 0);
    }
}
