//! Running the lab's helper programs (`ip`, `snmpget`, `python3`, ...): finding them, running
//! them under a deadline, and running many of them a few at a time.

use std::ffi::OsStr;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// How long one `ip` invocation may take; a batch of hundreds of lines takes well under a second.
pub(crate) const IP_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds `program` (a bare name searched on `PATH` and the sbin directories, which a non-login
/// root shell may lack, or an absolute path) or says which Debian package provides it.
pub(crate) fn find_tool(program: &str, package: &str) -> Result<PathBuf> {
    let missing = || {
        anyhow!(
            "the lab needs `{program}`, which is not installed: apt-get install -y {package} \
             (or set CENSUS_SKIP_LAB=1 to skip lab tests)"
        )
    };
    let candidate = Path::new(program);
    if candidate.is_absolute() {
        return if candidate.is_file() {
            Ok(candidate.to_path_buf())
        } else {
            Err(missing())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let full = dir.join(program);
        if full.is_file() {
            return Ok(full);
        }
    }
    Err(missing())
}

/// A one-line rendering of a command for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut shown = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    shown
}

/// Runs `cmd` to completion, feeding it `stdin`, and returns its output whatever its exit status.
/// A command still running after `timeout` is killed and reported as an error, so no lab step
/// can hang a test.
pub(crate) fn run_bounded(
    mut cmd: Command,
    stdin: Option<String>,
    timeout: Duration,
) -> Result<Output> {
    let shown = describe(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_error(&shown, &e))?;
    let pid = child.id();
    // Feed stdin from its own thread: a large batch must not deadlock against full output pipes.
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => Some(std::thread::spawn(move || {
            // A write error means the program exited early; its status and stderr say why.
            let _ = pipe.write_all(text.as_bytes());
        })),
        _ => None,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let result = rx.recv_timeout(timeout);
    if let Some(writer) = writer
        && result.is_ok()
    {
        let _ = writer.join();
    }
    match result {
        Ok(output) => output.with_context(|| format!("waiting for `{shown}`")),
        Err(_) => {
            // The waiting thread has not reaped the child, so the pid is still its own.
            kill_pids(&[pid]);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("`{shown}` did not finish within {timeout:?} and was killed")
        }
    }
}

/// Like [`run_bounded`], but a non-zero exit is an error that quotes the command's stderr.
pub(crate) fn run_ok(cmd: Command, stdin: Option<String>, timeout: Duration) -> Result<Output> {
    let shown = describe(&cmd);
    let output = run_bounded(cmd, stdin.clone(), timeout)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let mut msg = format!("`{shown}` failed ({}): {}", output.status, stderr.trim());
        if let Some(input) = stdin {
            // ip reports a failing batch line by number ("Command failed -:3"); show the input.
            msg.push_str("\ninput was:\n");
            msg.push_str(&first_lines(&input, 20));
        }
        bail!(msg);
    }
    Ok(output)
}

/// Runs every job with at most `width` running at once and returns the first error, if any.
/// Per-namespace `ip` calls are independent, so a site of hundreds of hosts builds in parallel.
pub(crate) fn run_many(jobs: Vec<(Command, Option<String>)>, width: usize) -> Result<()> {
    let queue = Mutex::new(jobs.into_iter());
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..width.max(1) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some((cmd, stdin)) = next else { break };
                    if let Err(e) = run_ok(cmd, stdin, IP_TIMEOUT) {
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Sends SIGKILL to `pids` with the `kill` command (the crate forbids `unsafe`, so no libc).
/// Best effort: a pid that is already gone is not an error worth reporting.
pub(crate) fn kill_pids(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn spawn_error(shown: &str, e: &std::io::Error) -> anyhow::Error {
    if e.kind() == ErrorKind::NotFound {
        anyhow!("cannot run `{shown}`: program not found")
    } else {
        anyhow!("cannot run `{shown}`: {e}")
    }
}

fn first_lines(text: &str, n: usize) -> String {
    let mut out: String = text.lines().take(n).collect::<Vec<_>>().join("\n");
    let total = text.lines().count();
    if total > n {
        out.push_str(&format!("\n... ({} more lines)", total - n));
    }
    out
}

/// `ip [-n NS] -batch -`, the way the lab sends many `ip` commands in one process.
pub(crate) fn ip_batch_command(ip: &Path, ns: Option<&str>) -> Command {
    let mut cmd = Command::new(ip);
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    cmd
}

/// `ip netns exec NS program`: `ip` execs the program, so the child's pid is the program's.
pub(crate) fn netns_exec(ip: &Path, ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(ip);
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_package() {
        let err = find_tool("census-no-such-tool", "some-package")
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("apt-get install -y some-package"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(find_tool("/nonexistent/ip", "iproute2").is_err());
    }

    #[test]
    fn a_hung_command_is_killed() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let started = std::time::Instant::now();
        assert!(run_bounded(cmd, None, Duration::from_millis(200)).is_err());
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn batch_input_reaches_stdin_and_failures_quote_stderr() {
        let out = run_ok(Command::new("cat"), Some("a\nb\n".into()), IP_TIMEOUT);
        assert_eq!(out.map(|o| o.stdout).ok(), Some(b"a\nb\n".to_vec()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo broken >&2; exit 3"]);
        let err = run_ok(cmd, None, IP_TIMEOUT)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("broken"), "{err}");
    }
}
