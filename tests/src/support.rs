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
use census_proto::{
    transport::Credentials,
    v1::{self, enrollment_service_client::EnrollmentServiceClient},
};
use serde::Deserialize;

use crate::lab::{Lab, Proc};

/// A fixed port for [`Collector::start_at`]. Every lab has its own core namespace, so labs
/// running in parallel never compete for it; it lies outside Linux's ephemeral port range, so
/// no outgoing connection in the core namespace can hold it while a collector restarts.
pub const COLLECTOR_PORT: u16 = 7400;

/// How long a restarted collector may keep failing to bind its old address.
const REBIND: Duration = Duration::from_secs(10);

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
    #[serde(default)]
    pub users_policy_version: String,
    /// A user source's latest read failed: `users` comes from earlier reads.
    #[serde(default)]
    pub users_stale: bool,
}

/// One row of `census devices --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Device {
    pub id: String,
    pub client: String,
    pub site: String,
    /// Every site the device was seen at.
    pub sites: Vec<String>,
    pub macs: Vec<String>,
    pub addresses: Vec<DeviceAddress>,
    pub identifiers: Vec<Identifier>,
    pub names: Vec<String>,
    pub category: String,
    pub category_reason: String,
    pub first_seen: String,
    pub last_seen: String,
    pub counted: bool,
    /// No strong identifier: it is one device through randomized MACs or names only.
    pub weak_only: bool,
    pub anomalies: Vec<String>,
    pub evidence: Vec<Evidence>,
}

impl Device {
    /// Its addresses, sorted, as text.
    pub fn address_list(&self) -> Vec<String> {
        let mut out: Vec<String> = self.addresses.iter().map(|a| a.address.clone()).collect();
        out.sort();
        out
    }

    /// The address record of `ip`, if the device has one.
    pub fn address(&self, ip: &str) -> Option<&DeviceAddress> {
        self.addresses.iter().find(|a| a.address == ip)
    }

    /// The values of its identifiers of `kind` (`mac`, `randomized-mac`, `mdns-name`, ...),
    /// sorted.
    pub fn identifiers_of(&self, kind: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .identifiers
            .iter()
            .filter(|i| i.kind == kind)
            .map(|i| i.value.clone())
            .collect();
        out.sort();
        out
    }

    /// The distinct agents in its evidence, sorted.
    pub fn agents(&self) -> Vec<String> {
        let mut out: Vec<String> = self.evidence.iter().map(|e| e.agent_id.clone()).collect();
        out.sort();
        out.dedup();
        out
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAddress {
    pub address: String,
    pub site: String,
    pub answered: bool,
    /// Answered on (or claimed) in the device's latest sighting at its site, and not taken by
    /// another device since.
    pub current: bool,
    /// Another device answered on it since.
    pub lost: bool,
    pub last_seen: String,
}

/// One identifier of a device.
#[derive(Debug, Clone, Deserialize)]
pub struct Identifier {
    pub kind: String,
    pub value: String,
    pub strong: bool,
    pub key: String,
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
    config: Option<PathBuf>,
    /// Flags given after the usual ones, kept for restarts.
    extra: Vec<std::ffi::OsString>,
    /// Where it serves `/metrics`, when started with `--metrics-listen`.
    metrics: Option<SocketAddr>,
}

impl<'lab> Collector<'lab> {
    /// Starts a collector on `data_dir` (created if missing), on an ephemeral port of the core
    /// bridge, and waits until it listens.
    pub fn start(lab: &'lab Lab, data_dir: &Path) -> Result<Self> {
        Self::launch(
            lab,
            data_dir,
            SocketAddr::from((lab.collector_ip(), 0)),
            None,
            None,
            &[],
        )
    }

    /// Starts a collector as [`Collector::start`] does, with `extra` flags after the usual
    /// ones (e.g. `--metrics-listen 198.19.0.1:0`).
    pub fn start_with_args<S: AsRef<OsStr>>(
        lab: &'lab Lab,
        data_dir: &Path,
        extra: &[S],
    ) -> Result<Self> {
        let extra: Vec<std::ffi::OsString> = extra.iter().map(|a| a.as_ref().to_owned()).collect();
        Self::launch(
            lab,
            data_dir,
            SocketAddr::from((lab.collector_ip(), 0)),
            None,
            None,
            &extra,
        )
    }

    /// Starts a collector as [`Collector::start`] does, with a config file (`--config`).
    pub fn start_with_config(lab: &'lab Lab, data_dir: &Path, config: &Path) -> Result<Self> {
        Self::launch(
            lab,
            data_dir,
            SocketAddr::from((lab.collector_ip(), 0)),
            None,
            Some(config),
            &[],
        )
    }

    /// Starts a collector on `data_dir` at a fixed `port` of the core bridge (e.g.
    /// [`COLLECTOR_PORT`]), as a deployment does: agents keep one URL across restarts.
    pub fn start_at(lab: &'lab Lab, data_dir: &Path, port: u16) -> Result<Self> {
        Self::launch(
            lab,
            data_dir,
            SocketAddr::from((lab.collector_ip(), port)),
            None,
            None,
            &[],
        )
    }

    /// Starts the collector binary listening on `listen` and waits until it says where it
    /// listens; a failure to bind is retried until `rebind_until`, if given.
    fn launch(
        lab: &'lab Lab,
        data_dir: &Path,
        listen: SocketAddr,
        rebind_until: Option<Instant>,
        config: Option<&Path>,
        extra: &[std::ffi::OsString],
    ) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let listen_arg = listen.to_string();
        let bin = bin("census-collector")?;
        loop {
            let mut args = vec![
                bin.as_os_str(),
                OsStr::new("serve"),
                OsStr::new("--data-dir"),
                data_dir.as_os_str(),
                OsStr::new("--listen"),
                OsStr::new(&listen_arg),
            ];
            if let Some(c) = config {
                args.extend([OsStr::new("--config"), c.as_os_str()]);
            }
            args.extend(extra.iter().map(std::ffi::OsString::as_os_str));
            let proc = lab.spawn(lab.core_ns(), args)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            let addr = loop {
                let log = proc.log();
                if let Some(addr) = log.lines().find_map(|l| l.strip_prefix("listening on ")) {
                    break Some(
                        addr.trim()
                            .parse()
                            .context("parsing the collector's address")?,
                    );
                }
                if !proc.is_running() {
                    let retry = rebind_until.is_some_and(|t| Instant::now() < t)
                        && log.contains("cannot listen on");
                    if retry {
                        break None;
                    }
                    bail!("the collector did not start listening; its log:\n{log}");
                }
                if Instant::now() > deadline {
                    let _ = proc.kill();
                    bail!("the collector did not start listening; its log:\n{log}");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            match addr {
                Some(addr) => {
                    // Printed before "listening on" when metrics are served.
                    let metrics = proc
                        .log()
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("metrics on http://")?
                                .strip_suffix("/metrics")
                        })
                        .map(|a| a.trim().parse())
                        .transpose()
                        .context("parsing the collector's metrics address")?;
                    return Ok(Collector {
                        lab,
                        proc,
                        data_dir: data_dir.to_owned(),
                        addr,
                        config: config.map(Path::to_owned),
                        extra: extra.to_vec(),
                        metrics,
                    });
                }
                None => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// `https://ADDR`, as agents and the CLI use it.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The collector's CA certificate (`<data dir>/tls/ca.pem`), which agents enroll with.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("tls").join("ca.pem")
    }

    /// The operator's credentials directory the collector made.
    pub fn credentials(&self) -> PathBuf {
        self.data_dir.join("operator")
    }

    /// Enrolls an agent into (client, site) with a fresh token, as `census-agent enroll` does
    /// on a site's machine, into a new state directory (in the lab's directory); returns it,
    /// for `--state-dir`.
    pub fn enroll(&self, client: &str, site: &str) -> Result<PathBuf> {
        let dir = lab_dir(self.lab, "agent-state")?;
        self.enroll_into(client, site, &dir)?;
        Ok(dir)
    }

    /// Enrolls an agent into (client, site) with a fresh token, keeping its identity in `dir`.
    pub fn enroll_into(&self, client: &str, site: &str, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let token = token_file(self.lab, &self.token(client, site)?)?;
        let out = self.run_enroll(self.lab.core_ns(), &token, dir, false)?;
        if !out.status.success() {
            bail!(
                "census-agent enroll failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `http://ADDR/metrics`, when started with `--metrics-listen`.
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics.map(|a| format!("http://{a}/metrics"))
    }

    /// The collector's metrics page, fetched from the core namespace.
    pub fn metrics(&self) -> Result<HttpResponse> {
        let url = self
            .metrics_url()
            .context("the collector was started without --metrics-listen")?;
        http_get(self.lab, self.lab.core_ns(), &url)
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Kills the collector with SIGKILL.
    pub fn kill(&self) -> Result<()> {
        self.proc.kill()
    }

    /// Kills the collector (if it still runs) and starts a new one on the same data directory
    /// and the same address, as a restarted service comes back where its agents look for it.
    pub fn restart(self) -> Result<Collector<'lab>> {
        self.kill()?;
        Collector::launch(
            self.lab,
            &self.data_dir,
            self.addr,
            Some(Instant::now() + REBIND),
            self.config.as_deref(),
            &self.extra,
        )
    }

    /// Runs `census-agent enroll` in namespace `ns` against this collector (trusting its CA)
    /// with the token in `token`, into state directory `dir` (`--force` with `force`); returns
    /// its output whatever the exit status.
    pub fn run_enroll(&self, ns: &str, token: &Path, dir: &Path, force: bool) -> Result<Output> {
        let bin = bin("census-agent")?;
        let (url, ca) = (self.url(), self.ca_file());
        let mut args: Vec<&OsStr> = vec![
            bin.as_os_str(),
            OsStr::new("enroll"),
            OsStr::new("--collector"),
            OsStr::new(&url),
            OsStr::new("--token-file"),
            token.as_os_str(),
            OsStr::new("--ca-file"),
            ca.as_os_str(),
            OsStr::new("--state-dir"),
            dir.as_os_str(),
        ];
        if force {
            args.push(OsStr::new("--force"));
        }
        self.lab.exec_timeout(ns, args, Duration::from_secs(60))
    }

    /// Runs `census ARGS` against this collector with the operator's credentials; returns its
    /// output whatever the exit status.
    pub fn census<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full: Vec<std::ffi::OsString> = vec![
            bin("census")?.into_os_string(),
            "--collector".into(),
            self.url().into(),
            "--credentials".into(),
            self.credentials().into_os_string(),
        ];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.lab.exec(self.lab.core_ns(), full)
    }

    /// Runs `census --collector URL --credentials DIR ARGS` from the core namespace (another
    /// URL or credentials than this collector's own); returns its output whatever the exit.
    pub fn census_as<I, S>(&self, url: &str, credentials: &Path, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full: Vec<std::ffi::OsString> = vec![
            bin("census")?.into_os_string(),
            "--collector".into(),
            url.into(),
            "--credentials".into(),
            credentials.as_os_str().to_owned(),
        ];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.lab.exec(self.lab.core_ns(), full)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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

    /// Makes a single-use enrollment token for (client, site).
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

    /// The counts of one client.
    pub fn counts_of(&self, client: &str) -> Result<Counts> {
        self.counts()?
            .into_iter()
            .find(|c| c.client == client)
            .with_context(|| format!("no counts for client {client}"))
    }

    /// `census users --client C --json`: `users` (people with their accounts), `sources`,
    /// `policy`.
    pub fn users(&self, client: &str) -> Result<serde_json::Value> {
        let out = self.census_ok(["users", "--client", client, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing census users --json: {out}"))
    }

    /// `census devices --client C --json`.
    pub fn devices(&self, client: &str) -> Result<Vec<Device>> {
        let out = self.census_ok(["devices", "--client", client, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing census devices --json: {out}"))
    }
}

/// An HTTP response read by [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case, values trimmed.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of the Prometheus sample `name` (with its labels as rendered, e.g.
    /// `m_total{reason="x"}`) in a text-format page, if present.
    pub fn sample(&self, name: &str) -> Option<f64> {
        self.body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

/// GETs `url` (`http://HOST:PORT/PATH`) from inside namespace `ns` with `census-http-get`;
/// any status is returned, a failure to connect is an error.
pub fn http_get(lab: &Lab, ns: &str, url: &str) -> Result<HttpResponse> {
    let out = lab.exec_timeout(
        ns,
        [bin("census-http-get")?.as_os_str(), OsStr::new(url)],
        Duration::from_secs(20),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!(
            "GET {url} failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            text
        );
    };
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {url}: no status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// A fresh directory in the lab's directory (removed with the lab).
pub fn lab_dir(lab: &Lab, prefix: &str) -> Result<PathBuf> {
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(lab.dir())
        .context("making a directory in the lab")?
        .keep())
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

/// Starts `census-agent run ARGS` (without `--once`: it sweeps every `--interval` until
/// killed) in namespace `ns`, logging JSON lines to its [`Proc::log`] for [`deliveries`].
pub fn spawn_agent<I, S>(lab: &Lab, ns: &str, args: I) -> Result<Proc>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut full: Vec<std::ffi::OsString> = vec![
        bin("census-agent")?.into_os_string(),
        "--log-format".into(),
        "json".into(),
        "run".into(),
    ];
    full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    lab.spawn(ns, full)
}

/// One `delivered` line of an agent's JSON log: batches the collector acknowledged in one go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Delivery {
    pub batches: u64,
    /// Batches stored now; `duplicates` were stored before (a resend after a lost ack).
    pub stored: u64,
    pub duplicates: u64,
    /// Observations in the acknowledged batches (stored now or before).
    pub observations: u64,
    pub rejected: u64,
}

/// One line of an agent's JSON log, as far as the tests read it.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentLogLine {
    #[serde(default)]
    pub level: String,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl AgentLogLine {
    pub fn message(&self) -> &str {
        self.fields
            .get("message")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
    }

    /// A numeric field, if present.
    pub fn number(&self, name: &str) -> Option<u64> {
        self.fields.get(name).and_then(serde_json::Value::as_u64)
    }
}

/// The JSON lines of an agent's log (others, such as a panic message, are skipped).
pub fn agent_log(log: &str) -> Vec<AgentLogLine> {
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every acknowledgement an agent logged, in order.
pub fn deliveries(log: &str) -> Vec<Delivery> {
    agent_log(log)
        .into_iter()
        .filter(|l| l.message() == "delivered")
        .filter_map(|l| serde_json::from_value(serde_json::Value::Object(l.fields)).ok())
        .collect()
}

/// The agent id in `<state dir>/agent.json`, which agents run with `--state-dir` keep.
pub fn agent_id(state_dir: &Path) -> Result<String> {
    let path = state_dir.join("agent.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    v["agent_id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no agent_id in {}", path.display()))
}

/// The agent id the collector bound an enrolled agent's certificate to, as `census-agent
/// enroll` noted it in `<state dir>/identity/enrollment.json`.
pub fn enrolled_agent_id(state_dir: &Path) -> Result<String> {
    let path = state_dir.join("identity").join("enrollment.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    v["agent_id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no agent_id in {}", path.display()))
}

/// The lab's stand-in for Entra ID and Microsoft Graph (`census-graph-lab`), listening on the
/// loopback of the lab's core namespace, where the collector runs (the collector speaks plain
/// http only to loopback). It serves the fixture file, which tests may rewrite at any time.
pub struct GraphLab {
    proc: Proc,
    fixture: PathBuf,
    addr: SocketAddr,
}

impl std::fmt::Debug for GraphLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphLab")
            .field("addr", &self.addr)
            .field("fixture", &self.fixture)
            .finish_non_exhaustive()
    }
}

impl GraphLab {
    /// Starts the server on `fixture` (written to the lab's directory).
    pub fn start(lab: &Lab, fixture: &serde_json::Value) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("graph")
            .tempdir_in(lab.dir())
            .context("making the Graph fixture directory")?
            .keep();
        let path = dir.join("fixture.json");
        std::fs::write(&path, fixture.to_string()).context("writing the Graph fixture")?;
        let bin = bin("census-graph-lab")?;
        let proc = lab.spawn(
            lab.core_ns(),
            [bin.as_os_str(), OsStr::new("--fixture"), path.as_os_str()],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = proc.log();
            if let Some(addr) = log.lines().find_map(|l| l.strip_prefix("listening on ")) {
                let addr = addr
                    .trim()
                    .parse()
                    .context("parsing the Graph lab's address")?;
                return Ok(GraphLab {
                    proc,
                    fixture: path,
                    addr,
                });
            }
            if !proc.is_running() || Instant::now() > deadline {
                let _ = proc.kill();
                bail!("census-graph-lab did not start; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`: both the login and the Graph base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces what the server serves.
    pub fn set(&self, fixture: &serde_json::Value) -> Result<()> {
        let tmp = self.fixture.with_extension("new");
        std::fs::write(&tmp, fixture.to_string()).context("writing the Graph fixture")?;
        std::fs::rename(&tmp, &self.fixture).context("replacing the Graph fixture")
    }

    /// What the server answered, one line per request.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

// === Enrolling over gRPC, for tests and benchmarks that speak to a collector directly ===

/// A fresh key pair and a CSR for it (`CN=<agent_id>`), as `census-agent enroll` makes them.
pub fn key_and_csr(agent_id: &str) -> Result<(rcgen::KeyPair, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, agent_id);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// Calls `Enroll` on `channel` with `token` and a fresh key, as agent `agent_id` of
/// `agent_version` on host `hostname`: its credentials and the collector's answer, or the
/// status it refused with.
pub async fn enroll_over(
    channel: tonic::transport::Channel,
    token: &str,
    agent_id: &str,
    hostname: &str,
    agent_version: &str,
) -> Result<std::result::Result<(Credentials, v1::EnrollResponse), tonic::Status>> {
    let (key, csr_der) = key_and_csr(agent_id)?;
    let r = match EnrollmentServiceClient::new(channel)
        .enroll(v1::EnrollRequest {
            token: token.into(),
            csr_der,
            agent_id: agent_id.into(),
            hostname: hostname.into(),
            agent_version: agent_version.into(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    let creds = Credentials {
        ca_pem: r.ca_pem.clone(),
        cert_pem: r.certificate_pem.clone(),
        key_pem: key.serialize_pem(),
    };
    Ok(Ok((creds, r)))
}
