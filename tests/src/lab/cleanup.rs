//! Tearing labs down: a lab's own namespaces and processes on drop, and at startup whatever
//! labs of earlier, dead processes left behind (a test binary killed by SIGKILL runs no `Drop`).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::cmd::{IP_TIMEOUT, kill_pids, run_ok};

/// Where `ip netns add` pins named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Named network namespaces whose name starts with `prefix`, sorted.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// The pid in a lab name `cz<pid>x<n>-...`, or `None` for a name that is not one of ours.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("cz")?;
    let (pid, rest) = rest.split_once('x')?;
    let (lab, _) = rest.split_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(lab) {
        return None;
    }
    pid.parse().ok()
}

/// A zombie counts as dead: a test process killed by SIGKILL stays one until its parent reaps it.
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain anything.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| pid != std::process::id() && !pid_alive(pid))
}

/// Removes namespaces and temp dirs of labs whose process is gone. Best effort: a failure here
/// must not stop a new lab, and another process may be removing the same leftovers.
pub(crate) fn remove_stale(ip: &Path) {
    let stale: Vec<String> = namespaces_with_prefix("cz")
        .into_iter()
        .filter(|name| is_stale(name))
        .collect();
    if !stale.is_empty()
        && let Err(e) = remove_namespaces(ip, &stale)
    {
        eprintln!("lab: removing stale namespaces of dead test processes: {e:#}");
    }
    let tmp = std::env::temp_dir();
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if is_stale(&name) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Kills every process still inside `names`, then deletes the namespaces (which destroys the
/// veths in them). Namespaces already gone are skipped.
pub(crate) fn remove_namespaces(ip: &Path, names: &[String]) -> Result<()> {
    let present: Vec<&String> = names
        .iter()
        .filter(|name| Path::new(NETNS_DIR).join(name).exists())
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    kill_processes_in(&present);
    // Delete in reverse creation order; `-force` carries on past a line that fails.
    let input: String = present
        .iter()
        .rev()
        .map(|name| format!("netns del {name}\n"))
        .collect();
    let mut cmd = Command::new(ip);
    cmd.args(["-force", "-batch", "-"]);
    run_ok(cmd, Some(input), IP_TIMEOUT).map(drop)
}

/// Kills processes whose network namespace is one of `names` (what `ip netns pids` does, for
/// all namespaces in one pass over /proc). Catches grandchildren and leftovers of dead labs,
/// which no `Child` handle reaches.
fn kill_processes_in(names: &[&String]) {
    let wanted: HashSet<(u64, u64)> = names
        .iter()
        .filter_map(|name| std::fs::metadata(Path::new(NETNS_DIR).join(name)).ok())
        .map(|meta| (meta.dev(), meta.ino()))
        .collect();
    if wanted.is_empty() {
        return;
    }
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|meta| wanted.contains(&(meta.dev(), meta.ino())))
        })
        .collect();
    kill_pids(&pids);
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_reads_only_our_names() {
        assert_eq!(owner_pid("cz123x4-core"), Some(123));
        assert_eq!(owner_pid("cz123x4-h17"), Some(123));
        assert_eq!(owner_pid("cz123x-core"), None);
        assert_eq!(owner_pid("czx4-core"), None);
        assert_eq!(owner_pid("cz12a3x4-core"), None);
        assert_eq!(owner_pid("docker-ns"), None);
    }
}
