//! Running Census inside a lab: the collector in the lab's core namespace, agents in site
//! agent namespaces, and the `census` CLI beside the collector. Everything runs as the real
//! binaries, started through the lab so it is killed when the lab goes.

use std::{
    ffi::OsStr,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::lab::{Lab, Proc};

/// Where the workspace's binaries are: `CENSUS_BIN_DIR`, or the directory of the running
/// executable (`target/<profile>/deps` for tests, `target/<profile>` for the demo).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CENSUS_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("the executable has no directory")?
        .to_owned();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    Ok(dir)
}

/// The path of a workspace binary, or an error saying how to build it.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// One row of `census counts --json`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub client: String,
    pub devices: u64,
    pub users: u64,
    pub as_of: String,
    pub policy_version: String,
}

/// One row of `census devices --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Device {
    pub id: String,
    pub client: String,
    pub site: String,
    pub macs: Vec<String>,
    pub addresses: Vec<DeviceAddress>,
    pub names: Vec<String>,
    pub category: String,
    pub category_reason: String,
    pub first_seen: String,
    pub last_seen: String,
    pub counted: bool,
    pub evidence: Vec<Evidence>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAddress {
    pub address: String,
    pub answered: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Evidence {
    pub agent_id: String,
    pub method: String,
    pub observations: u64,
}

/// A collector running in the lab's core namespace.
#[derive(Debug)]
pub struct Collector<'lab> {
    lab: &'lab Lab,
    proc: Proc,
    data_dir: PathBuf,
    addr: SocketAddr,
}

impl<'lab> Collector<'lab> {
    /// Starts a collector on `data_dir` (created if missing), on an ephemeral port of the core
    /// bridge, and waits until it listens.
    pub fn start(lab: &'lab Lab, data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let listen = format!("{}:0", lab.collector_ip());
        let bin = bin("census-collector")?;
        let proc = lab.spawn(
            lab.core_ns(),
            [
                bin.as_os_str(),
                OsStr::new("serve"),
                OsStr::new("--data-dir"),
                data_dir.as_os_str(),
                OsStr::new("--listen"),
                OsStr::new(&listen),
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let log = proc.log();
            if let Some(addr) = log.lines().find_map(|l| l.strip_prefix("listening on ")) {
                break addr
                    .trim()
                    .parse()
                    .context("parsing the collector's address")?;
            }
            if !proc.is_running() || Instant::now() > deadline {
                bail!("the collector did not start listening; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Collector {
            lab,
            proc,
            data_dir: data_dir.to_owned(),
            addr,
        })
    }

    /// `http://ADDR`, as agents and the CLI use it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Kills the collector with SIGKILL.
    pub fn kill(&self) -> Result<()> {
        self.proc.kill()
    }

    /// Kills the collector and starts a new one on the same data directory.
    pub fn restart(self) -> Result<Collector<'lab>> {
        self.kill()?;
        Collector::start(self.lab, &self.data_dir)
    }

    /// Runs `census ARGS` against this collector with the operator token; returns its output
    /// whatever the exit status.
    pub fn census<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full: Vec<std::ffi::OsString> = vec![
            bin("census")?.into_os_string(),
            "--collector".into(),
            self.url().into(),
            "--operator-token-file".into(),
            self.data_dir.join("operator.token").into_os_string(),
        ];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.lab.exec(self.lab.core_ns(), full)
    }

    /// Runs `census ARGS` and returns stdout; a non-zero exit is an error quoting stderr.
    pub fn census_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.census(args)?;
        if !out.status.success() {
            bail!(
                "census failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes an enrollment token for (client, site).
    pub fn token(&self, client: &str, site: &str) -> Result<String> {
        let out = self.census_ok(["token", "create", "--client", client, "--site", site])?;
        Ok(out.trim().to_owned())
    }

    /// `census counts --json`.
    pub fn counts(&self) -> Result<Vec<Counts>> {
        let out = self.census_ok(["counts", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing census counts --json: {out}"))
    }

    /// The device count of one client.
    pub fn devices_of(&self, client: &str) -> Result<u64> {
        self.counts()?
            .into_iter()
            .find(|c| c.client == client)
            .map(|c| c.devices)
            .with_context(|| format!("no counts for client {client}"))
    }

    /// `census devices --client C --json`.
    pub fn devices(&self, client: &str) -> Result<Vec<Device>> {
        let out = self.census_ok(["devices", "--client", client, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing census devices --json: {out}"))
    }
}

/// Writes `token` to a fresh file in the lab's directory, for `--token-file`.
pub fn token_file(lab: &Lab, token: &str) -> Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("token")
        .tempdir_in(lab.dir())
        .context("making a token directory")?;
    let path = dir.keep().join("token");
    std::fs::write(&path, format!("{token}\n")).context("writing the token file")?;
    Ok(path)
}

/// Runs `census-agent run --once` in namespace `ns` with `args` after the subcommand, and
/// returns its output whatever the exit status.
pub fn agent_once<I, S>(lab: &Lab, ns: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut full: Vec<std::ffi::OsString> = vec![
        bin("census-agent")?.into_os_string(),
        "run".into(),
        "--once".into(),
    ];
    full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    lab.exec_timeout(ns, full, Duration::from_secs(120))
}

/// The lines of a process's stderr that are errors of ours (`<program>: error: ...`).
pub fn error_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| l.contains(": error: "))
        .map(str::to_owned)
        .collect()
}

/// Runs `census-agent scan --json` in namespace `ns` with `args`, and returns one JSON object
/// per device found. A non-zero exit is an error quoting stderr.
pub fn scan<I, S>(lab: &Lab, ns: &str, args: I) -> Result<Vec<serde_json::Value>>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut full: Vec<std::ffi::OsString> = vec![
        bin("census-agent")?.into_os_string(),
        "scan".into(),
        "--json".into(),
    ];
    full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    let out = lab.exec_timeout(ns, full, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!(
            "census-agent scan failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing scan output {l}")))
        .collect()
}
