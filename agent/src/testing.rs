//! Test support for probes that need a real network: the parent test builds a lab (network
//! namespaces with real responders) and re-runs one test function of this same test binary
//! inside the lab's agent namespace, where the probe runs for real. Entering a namespace in
//! process would need `unsafe` (setns), which the crate forbids; `ip netns exec` does not.
//!
//! The child refuses to run in the namespace the parent runs in, so a probe never sends from
//! the machine's own namespace.

#![allow(dead_code)] // Each probe's tests use a different part.

use std::{ffi::OsStr, time::Duration};

use anyhow::{Context as _, Result, bail};
pub use census_tests::lab::{self, Lab};

/// Set in the child's environment; tests that are children read their inputs from it.
const CHILD_ENV: &str = "CENSUS_TEST_CHILD";
/// The parent's network namespace, so the child can refuse to run there.
const PARENT_NS_ENV: &str = "CENSUS_TEST_PARENT_NS";
/// Marks the child's result lines on stdout.
pub const OUT: &str = "CENSUS-OUT ";

/// True when lab tests are to be skipped (`CENSUS_SKIP_LAB=1`); says so on stderr.
pub use census_tests::lab::lab_skipped as skip_lab;

fn own_netns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// In a child: the JSON input the parent passed, or `None` when this is not a child run
/// (then the test returns at once). Panics if the child is in the parent's namespace.
pub fn child_input<T: serde::de::DeserializeOwned>() -> Option<T> {
    let input = std::env::var(CHILD_ENV).ok()?;
    let parent = std::env::var(PARENT_NS_ENV).unwrap_or_default();
    assert!(
        !parent.is_empty() && own_netns() != parent,
        "refusing to probe from the parent's network namespace"
    );
    Some(serde_json::from_str(&input).expect("the parent passes valid JSON"))
}

/// In a child: prints one result for the parent.
pub fn child_output<T: serde::Serialize>(value: &T) {
    println!(
        "{OUT}{}",
        serde_json::to_string(value).expect("serializable")
    );
}

/// In the parent: runs test `test` (its path, e.g. `probe::snmp::tests::child`) of this
/// binary in namespace `ns` with `input`, and returns what it printed with [`child_output`].
pub fn run_child<I: serde::Serialize, O: serde::de::DeserializeOwned>(
    lab: &Lab,
    ns: &str,
    test: &str,
    input: &I,
    timeout: Duration,
) -> Result<Vec<O>> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut cmd = lab.command(ns, &exe);
    cmd.args([
        OsStr::new("--exact"),
        OsStr::new(test),
        OsStr::new("--nocapture"),
        OsStr::new("--test-threads=1"),
    ])
    .env(CHILD_ENV, serde_json::to_string(input)?)
    .env(PARENT_NS_ENV, own_netns());
    let log_path = lab.dir().join(format!(
        "child-{}-{}.log",
        test.replace("::", "-"),
        std::process::id()
    ));
    let log = std::fs::File::create(&log_path).context("creating the child's log")?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = lab.spawn_command(cmd)?;
    let status = child.wait_timeout(timeout)?;
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let Some(status) = status else {
        child.kill()?;
        bail!("child test {test} did not finish within {timeout:?}:\n{output}");
    };
    if !status.success() {
        bail!("child test {test} failed ({status}):\n{output}");
    }
    let stdout = output;
    // The test harness may print "test name ... " on the same line as our output.
    stdout
        .lines()
        .filter_map(|l| l.find(OUT).map(|i| &l[i + OUT.len()..]))
        .map(|json| {
            serde_json::from_str(json).with_context(|| format!("parsing child output {json}"))
        })
        .collect()
}
