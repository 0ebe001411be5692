//! `census-collector-bench`: the collector benchmark, in one run on this machine.
//!
//! The collector runs as its own process, the release `census-collector serve` beside this
//! binary, on 127.0.0.1:0 with a temporary data directory. The load comes from this process
//! over loopback gRPC, as agents and operators send it. Nothing is swept: no packet leaves
//! loopback. In one run:
//!
//! 1. **Ingest.** `--streams` agent streams at once (default 32), each enrolled as a client of
//!    its own with `--devices` devices (default 4,000), sweep their site over and over in
//!    batches of 500 observations shaped like the agent's: 80% ARP (one MAC, one address, a
//!    vendor category), 10% network gear identified over SNMP (three interface MACs, an engine
//!    ID, a serial, a sysName) and 10% phones with a randomized MAC and an mDNS host name. Each
//!    stream keeps up to 4 batches unacknowledged. The first sweep creates every device and is
//!    reported on its own; after it and one more second, acknowledged observations are counted
//!    for `--seconds` (default 60: long enough to hold the collector's checkpoints, its writes
//!    of buffered records to sled behind the log, so they are paid for in the figure), with the
//!    collector's CPU time over the same window, reported per observation.
//!    Then the collector is killed with SIGKILL while the streams are still sending, started
//!    again on the same directory, and every client must hold exactly its devices, and their
//!    evidence at least every acknowledged observation and at most every sent one.
//! 2. **Memory.** A fresh collector's RSS (`VmRSS` in /proc/PID/status) with 1,000 clients
//!    enrolled and no devices, then after 1,000 devices of each were delivered (1,000,000
//!    devices, the same ingest path) once it stops shrinking, and after the queries below; the
//!    difference per device (the peak, `VmHWM`, is shown beside it).
//! 3. **GetCounts.** On those 1,000,000 devices: one pass over every client to warm up, then
//!    `--calls` (default 10,000) `GetCounts{client}` one after another on one connection, then
//!    the same number split over 4 callers with a connection each; p50, p99 and max. Every
//!    answer must say 1,000 devices.
//!
//! Speed and memory are reported against the collector issue's goals, never asserted (machines
//! are noisy). The exit status is non-zero only if acknowledged data is missing, a count is
//! wrong, or a step fails. Run it through `deploy/bench.sh` (which builds in release mode) or as
//! `./target/release/census-collector-bench` after `cargo build --release --workspace --bins`.
//! The collector reads its usual `CENSUS_COLLECTOR_*` environment (except the data directory
//! and listen address, which this sets), so settings such as `CENSUS_COLLECTOR_CACHE_MB` can be
//! varied; the ones set are printed.
//!
//! Flags: `--streams N`, `--devices N` (per stream, a multiple of 500), `--seconds S`,
//! `--clients N`, `--client-devices N` (a multiple of 500), `--calls N`, `--skip-ingest`,
//! `--skip-counts`, `--keep` (keep the data directories and the collector's logs).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use census_proto::{
    convert,
    transport::{Authenticate, Credentials},
    v1::{
        self, admin_service_client::AdminServiceClient, ingest_service_client::IngestServiceClient,
        query_service_client::QueryServiceClient,
    },
};
use census_tests::support;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, transport::Channel};

/// Observations per batch: the agent's batch size.
const BATCH: usize = 500;
/// Batches one stream keeps unacknowledged.
const IN_FLIGHT: usize = 4;
/// Concurrent callers in the second GetCounts run.
const CALLERS: usize = 4;
/// Streams loading the 1,000,000 devices at once.
const LOAD_STREAMS: usize = 32;
/// Largest response the bench accepts (ListDevices of a whole client).
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// The goals of the collector issue.
const GOAL_OBS_PER_S: f64 = 100_000.0;
const GOAL_P99_MS: f64 = 1.0;
const GOAL_BYTES_PER_DEVICE: f64 = 1024.0;

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("census-collector-bench: {e:#}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("census-collector-bench: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("census-collector-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// === Command line ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    streams: usize,
    devices: usize,
    seconds: u64,
    clients: usize,
    client_devices: usize,
    calls: usize,
    ingest: bool,
    counts: bool,
    /// Keep the data directories and the collector's logs.
    keep: bool,
}

const USAGE: &str = "usage: census-collector-bench [--streams N] [--devices N] [--seconds S] \
[--clients N] [--client-devices N] [--calls N] [--skip-ingest] [--skip-counts] [--keep]
  --streams N         concurrent agent streams in the ingest run (default 32)
  --devices N         devices per stream, a multiple of 500 (default 4000)
  --seconds S         length of the measured ingest window (default 60)
  --clients N         clients for the memory and GetCounts runs (default 1000)
  --client-devices N  devices per client there, a multiple of 500 (default 1000)
  --calls N           GetCounts calls per measured run (default 10000)
  --skip-ingest       skip the ingest run
  --skip-counts       skip the memory and GetCounts runs
  --keep              keep the data directories and the collector's logs (the path is printed)";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Options>> {
    let mut o = Options {
        streams: 32,
        devices: 4000,
        seconds: 60,
        clients: 1000,
        client_devices: 1000,
        calls: 10_000,
        ingest: true,
        counts: true,
        keep: false,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<usize> {
            let v = match inline.clone() {
                Some(v) => v,
                None => args
                    .next()
                    .with_context(|| format!("{name} needs a value"))?,
            };
            let n: usize = v
                .parse()
                .with_context(|| format!("{name} takes a whole number, got {v:?}"))?;
            if n == 0 {
                bail!("{name} must be at least 1");
            }
            Ok(n)
        };
        match flag.as_str() {
            "--streams" => o.streams = value("--streams")?,
            "--devices" => o.devices = value("--devices")?,
            "--seconds" => o.seconds = value("--seconds")? as u64,
            "--clients" => o.clients = value("--clients")?,
            "--client-devices" => o.client_devices = value("--client-devices")?,
            "--calls" => o.calls = value("--calls")?,
            "--skip-ingest" => o.ingest = false,
            "--skip-counts" => o.counts = false,
            "--keep" => o.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if !o.devices.is_multiple_of(BATCH) || !o.client_devices.is_multiple_of(BATCH) {
        bail!("--devices and --client-devices must be multiples of {BATCH}");
    }
    if o.streams > 1000 || o.clients > 100_000 || o.devices > 100_000 {
        bail!("--streams at most 1000, --clients at most 100000, --devices at most 100000");
    }
    Ok(Some(o))
}

// === The collector process ===

/// A `census-collector serve` of our own, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    operator: Credentials,
    dir: PathBuf,
    /// Keeps the collector's stdout open (it prints its address there).
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Server {
    /// Starts the collector on `dir` and waits until it says where it listens.
    fn start(dir: &Path) -> Result<Server> {
        let bin = support::bin("census-collector")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .context("creating the collector's log file")?;
        let mut child = Command::new(&bin)
            // Development mode (plaintext, certificates in metadata): these figures are the
            // store's and the services', as before mutual TLS; TLS adds its own per-connection
            // handshake and per-byte cost on top.
            .args([
                "serve",
                "--dev-plaintext",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir)
            .env_remove("CENSUS_COLLECTOR_DATA_DIR")
            .env_remove("CENSUS_COLLECTOR_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut stdout = BufReader::new(child.stdout.take().context("collector stdout")?);
        let mut line = String::new();
        let read = stdout.read_line(&mut line);
        let addr = match line.trim().strip_prefix("listening on ") {
            Some(a) if read.is_ok() => a.parse().context("parsing the collector's address")?,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
                bail!("the collector did not start; its log:\n{log}");
            }
        };
        let operator = Credentials::load(&dir.join(census_collector::pki::OPERATOR_DIR))
            .context("reading the operator's credentials")?;
        Ok(Server {
            child,
            addr,
            operator,
            dir: dir.to_owned(),
            _stdout: stdout,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the collector with SIGKILL and waits for it to be gone.
    fn kill(&mut self) -> Result<()> {
        self.child.kill().context("killing the collector")?;
        self.child.wait().context("waiting for the collector")?;
        Ok(())
    }

    async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?)
    }

    /// An enrolled agent for each of `clients`, site `hq`, 16 at a time: their credentials.
    async fn tokens(&self, clients: &[String]) -> Result<Vec<Credentials>> {
        let channel = self.channel().await?;
        let sem = Arc::new(Semaphore::new(16));
        let mut tasks = Vec::new();
        for c in clients {
            let permit = Arc::clone(&sem).acquire_owned().await?;
            let (channel, c, me) = (channel.clone(), c.clone(), self.operator.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let server = TokenMaker { operator: me };
                server.token(channel, &c).await
            }));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await??);
        }
        Ok(out)
    }

    fn memory(&self) -> Result<Memory> {
        Memory::of(self.pid())
    }

    /// The collector's memory once it stops shrinking (by 1% over 5 s; 60 s at most): after a
    /// burst of ingest, the store and the allocator give buffers back for a while.
    async fn settle(&self) -> Result<Memory> {
        let mut window = std::collections::VecDeque::from([self.memory()?]);
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            window.push_back(self.memory()?);
            if window.len() > 5 {
                window.pop_front();
            }
            let (first, last) = (window[0], window[window.len() - 1]);
            if window.len() == 5 && last.rss_kib + last.rss_kib / 100 >= first.rss_kib {
                return Ok(last);
            }
        }
        Ok(window[window.len() - 1])
    }

    fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Enrollment without borrowing the server into a task.
struct TokenMaker {
    operator: Credentials,
}

impl TokenMaker {
    /// A token for `client`, traded with a CSR for an agent's certificate naming agent
    /// `bench-<client>` (the id its batches must carry).
    async fn token(&self, channel: Channel, client: &str) -> Result<Credentials> {
        let mut admin = AdminServiceClient::new(channel.clone());
        let token = admin
            .create_token(authed(
                &self.operator,
                v1::CreateTokenRequest {
                    client: client.into(),
                    site: "hq".into(),
                    expires_in_seconds: 0,
                },
            ))
            .await
            .with_context(|| format!("creating a token for {client}"))?
            .into_inner()
            .token;
        let (creds, response) = support::enroll_over(
            channel,
            &token,
            &format!("bench-{client}"),
            "bench",
            env!("CARGO_PKG_VERSION"),
        )
        .await?
        .with_context(|| format!("enrolling an agent of {client}"))?;
        anyhow::ensure!(
            response.agent_id == format!("bench-{client}"),
            "enrolled as {}, not bench-{client}",
            response.agent_id
        );
        Ok(creds)
    }
}

/// `msg` from the holder of `creds`, to a development-mode (plaintext) collector.
fn authed<T>(creds: &Credentials, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    Authenticate::new("http://", Some(creds)).apply(&mut req);
    req
}

/// A process's memory from /proc/PID/status, in KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .context("reading the collector's /proc status")?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

/// User plus system CPU time of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .context("reading the collector's /proc stat")?;
    // Fields after the command name (which may hold spaces): state is the first, utime the
    // 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("unexpected /proc stat format")
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Bytes of the files under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

// === The load ===

/// What device `j` of a site is: most answer ARP only; every tenth is network gear known over
/// SNMP; every tenth (offset by five) a phone with a randomized MAC and an mDNS name.
fn observation(client: usize, j: usize) -> v1::Observation {
    let (hi, mid, lo) = ((j >> 16) as u8, (j >> 8) as u8, j as u8);
    let ip = format!("198.18.{}.{}", (j / 250) % 256, j % 250 + 2);
    let address = |ip: &str, method: v1::Method| v1::IpAddress {
        address: ip.into(),
        answered: true,
        method: method as i32,
    };
    let mac_evidence = |mac: &[u8], vendor: &str, local: bool| v1::MacEvidence {
        mac: mac.to_vec(),
        method: v1::Method::Arp as i32,
        first_hand: true,
        via: String::new(),
        vendor: vendor.into(),
        locally_administered: local,
    };
    match j % 10 {
        0 => {
            // Interface k's MAC; interface 0 answers ARP.
            let iface = |k: u8| [0x00, 0x1b, 0x54, hi | (k << 4), mid, lo];
            let mac = iface(0);
            let sys_name = format!("sw-{client}-{j}");
            v1::Observation {
                method: v1::Method::Arp as i32,
                methods: vec![v1::Method::Arp as i32, v1::Method::Snmp as i32],
                addresses: vec![address(&ip, v1::Method::Arp)],
                macs: vec![mac.to_vec()],
                mac_evidence: vec![mac_evidence(&mac, "Cisco Systems, Inc", false)],
                names: vec![v1::Name {
                    value: sys_name.clone(),
                    source: v1::NameSource::SnmpSysName as i32,
                }],
                snmp: Some(v1::SnmpIdentity {
                    sys_name,
                    sys_descr: "Cisco IOS Software, C2960 Software (C2960-LANBASEK9-M), \
                                Version 15.0(2)SE11"
                        .into(),
                    sys_object_id: "1.3.6.1.4.1.9.1.1208".into(),
                    sys_uptime_centis: 123_456_789,
                    engine_id: [&[0x80, 0x00, 0x00, 0x09, 0x03][..], &mac[..]].concat(),
                    serial_number: format!("FOC{client:04}{j:05}"),
                    model: "WS-C2960X-24TS-L".into(),
                    interfaces: (0u8..3)
                        .map(|k| v1::SnmpInterface {
                            if_index: u32::from(k) + 1,
                            name: format!("Gi1/0/{}", k + 1),
                            mac: iface(k).to_vec(),
                        })
                        .collect(),
                    version: "3".into(),
                    credential: "bench".into(),
                    ..Default::default()
                }),
                interface: "eth0".into(),
                category: v1::Category::Network as i32,
                category_reason: "SNMP sysObjectID 1.3.6.1.4.1.9.1.1208 (Cisco)".into(),
                ..Default::default()
            }
        }
        5 => {
            let mac = [0x0a, 0x5c, 0x00, hi, mid, lo];
            let host = format!("iphone-{j}.local.");
            v1::Observation {
                method: v1::Method::Arp as i32,
                methods: vec![v1::Method::Arp as i32, v1::Method::Mdns as i32],
                addresses: vec![address(&ip, v1::Method::Arp)],
                macs: vec![mac.to_vec()],
                mac_evidence: vec![mac_evidence(&mac, "", true)],
                names: vec![v1::Name {
                    value: host.clone(),
                    source: v1::NameSource::MdnsHost as i32,
                }],
                mdns: Some(v1::MdnsIdentity {
                    host_name: host,
                    services: vec![v1::MdnsService {
                        instance: format!("iPhone {j}._companion-link._tcp.local."),
                        service_type: "_companion-link._tcp.local.".into(),
                        port: 49_152,
                        txt: Vec::new(),
                    }],
                }),
                interface: "eth0".into(),
                category: v1::Category::PhoneTablet as i32,
                category_reason: "mDNS service _companion-link._tcp".into(),
                ..Default::default()
            }
        }
        _ => {
            let mac = [0x00, 0x16, 0x3e, hi, mid, lo];
            v1::Observation {
                method: v1::Method::Arp as i32,
                methods: vec![v1::Method::Arp as i32],
                addresses: vec![address(&ip, v1::Method::Arp)],
                macs: vec![mac.to_vec()],
                mac_evidence: vec![mac_evidence(&mac, "Dell Inc.", false)],
                interface: "eth0".into(),
                category: v1::Category::Computer as i32,
                category_reason: "vendor Dell Inc.".into(),
                ..Default::default()
            }
        }
    }
}

/// Batch `sequence` (from 1) of a site of `devices.len()` devices: the next 500 of them, round
/// and round.
fn batch(agent: &str, sequence: u64, devices: &[v1::Observation]) -> v1::ObservationBatch {
    let now = Some(convert::timestamp(SystemTime::now()));
    let start = ((sequence - 1) as usize * BATCH) % devices.len();
    v1::ObservationBatch {
        agent_id: agent.into(),
        sequence,
        observations: devices[start..start + BATCH]
            .iter()
            .map(|o| v1::Observation {
                observed_at: now,
                ..o.clone()
            })
            .collect(),
        agent_version: "bench".into(),
        sent_at: now,
        ..Default::default()
    }
}

/// What one stream sent and had acknowledged.
#[derive(Debug, Default)]
struct StreamState {
    sent_obs: AtomicU64,
    acked_obs: AtomicU64,
    acked_batches: AtomicU64,
    /// Set once its first full sweep (every device) is acknowledged.
    first_sweep: AtomicBool,
    /// The first refusal or failure that was not the collector going away.
    error: Mutex<Option<String>>,
}

/// Shared by the streams of one run.
#[derive(Debug, Default)]
struct Totals {
    acked_obs: AtomicU64,
    /// Ack latencies (send to ack) in microseconds, while `sampling`.
    latencies: Mutex<Vec<u64>>,
    sampling: AtomicBool,
    stop: AtomicBool,
    /// The collector is being killed: stream failures are expected from now on.
    killing: AtomicBool,
}

/// One agent stream: sends sweeps of `devices` until told to stop or the stream ends.
async fn run_stream(
    channel: Channel,
    token: Credentials,
    agent: String,
    devices: Arc<Vec<v1::Observation>>,
    me: Arc<StreamState>,
    totals: Arc<Totals>,
) {
    let (tx, rx) = mpsc::channel::<v1::ObservationBatch>(IN_FLIGHT);
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let sent_at: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let mut client = IngestServiceClient::new(channel)
        .max_encoding_message_size(MAX_MESSAGE)
        .max_decoding_message_size(MAX_MESSAGE);
    let sender = {
        let (window, sent_at, me, totals, devices) = (
            Arc::clone(&window),
            Arc::clone(&sent_at),
            Arc::clone(&me),
            Arc::clone(&totals),
            Arc::clone(&devices),
        );
        tokio::spawn(async move {
            let mut sequence = 1;
            while !totals.stop.load(Ordering::Relaxed) {
                let Ok(permit) = window.acquire().await else {
                    break;
                };
                permit.forget();
                let b = batch(&agent, sequence, &devices);
                if let Ok(mut s) = sent_at.lock() {
                    s.insert(sequence, Instant::now());
                }
                if tx.send(b).await.is_err() {
                    break;
                }
                me.sent_obs.fetch_add(BATCH as u64, Ordering::Relaxed);
                sequence += 1;
            }
        })
    };
    let sweep_batches = (devices.len() / BATCH) as u64;
    let result: Result<()> = async {
        let mut acks = client
            .report(authed(&token, ReceiverStream::new(rx)))
            .await?
            .into_inner();
        while let Some(ack) = acks.message().await? {
            if ack.status != v1::AckStatus::Stored as i32 || ack.observations != BATCH as u32 {
                bail!(
                    "batch {} acknowledged with status {} and {} observations stored",
                    ack.sequence,
                    ack.status,
                    ack.observations
                );
            }
            let took = sent_at
                .lock()
                .ok()
                .and_then(|mut s| s.remove(&ack.sequence))
                .map(|t| t.elapsed());
            me.acked_obs.fetch_add(BATCH as u64, Ordering::Relaxed);
            let batches = me.acked_batches.fetch_add(1, Ordering::Relaxed) + 1;
            if batches >= sweep_batches {
                me.first_sweep.store(true, Ordering::Relaxed);
            }
            totals.acked_obs.fetch_add(BATCH as u64, Ordering::Relaxed);
            if let (Some(took), true) = (took, totals.sampling.load(Ordering::Relaxed))
                && let Ok(mut l) = totals.latencies.lock()
            {
                l.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
            }
            window.add_permits(1);
        }
        Ok(())
    }
    .await;
    sender.abort();
    if let Err(e) = result
        && !totals.killing.load(Ordering::Relaxed)
        && let Ok(mut slot) = me.error.lock()
    {
        slot.get_or_insert(format!("{e:#}"));
    }
}

// === The runs ===

struct Row {
    measure: String,
    value: String,
    goal: String,
    verdict: String,
}

fn row(measure: &str, value: String, goal: &str, verdict: &str) -> Row {
    Row {
        measure: measure.into(),
        value,
        goal: goal.into(),
        verdict: verdict.into(),
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT MET" }
}

fn thousands(n: f64) -> String {
    let n = n.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

async fn bench(opts: Options) -> Result<bool> {
    if cfg!(debug_assertions) {
        eprintln!(
            "census-collector-bench: warning: this is a debug build; figures are not \
             representative (cargo build --release --workspace --bins)"
        );
    }
    let set: Vec<String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("CENSUS_COLLECTOR_")
                && k != "CENSUS_COLLECTOR_DATA_DIR"
                && k != "CENSUS_COLLECTOR_LISTEN"
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !set.is_empty() {
        println!("collector environment: {}", set.join(" "));
    }
    let mut scratch = tempfile::Builder::new()
        .prefix("census-collector-bench")
        .tempdir()?;
    if opts.keep {
        scratch.disable_cleanup(true);
        println!(
            "data directories and logs kept in {}",
            scratch.path().display()
        );
    }
    let mut rows = Vec::new();
    let mut ok = true;
    if opts.ingest {
        ok &= ingest(&opts, scratch.path(), &mut rows).await?;
    }
    if opts.counts {
        ok &= counts(&opts, scratch.path(), &mut rows).await?;
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ncensus-collector-bench: {cores} CPUs ({cpu}); collector and load share them\n"
    );
    let _ = writeln!(out, "| measure | value | goal | |");
    let _ = writeln!(out, "|---|---:|---|---|");
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            r.measure, r.value, r.goal, r.verdict
        );
    }
    print!("{out}");
    if !ok {
        println!("\nFAILED: acknowledged data is missing or a count is wrong (see above)");
    }
    Ok(ok)
}

/// The ingest run. Returns whether every acknowledged observation survived the SIGKILL.
async fn ingest(opts: &Options, scratch: &Path, rows: &mut Vec<Row>) -> Result<bool> {
    let dir = scratch.join("ingest");
    std::fs::create_dir_all(&dir)?;
    let mut server = Server::start(&dir)?;
    let clients: Vec<String> = (0..opts.streams)
        .map(|i| format!("ingest-{i:04}"))
        .collect();
    let tokens = server.tokens(&clients).await?;
    println!(
        "ingest: {} streams x {} devices, batches of {BATCH}, up to {IN_FLIGHT} in flight per stream",
        opts.streams, opts.devices
    );
    let totals = Arc::new(Totals::default());
    let mut states = Vec::new();
    let mut tasks = Vec::new();
    let started = Instant::now();
    for (i, token) in tokens.iter().enumerate() {
        // One connection per stream, as every agent has its own.
        let channel = server.channel().await?;
        let devices: Arc<Vec<v1::Observation>> =
            Arc::new((0..opts.devices).map(|j| observation(i, j)).collect());
        let state = Arc::new(StreamState::default());
        states.push(Arc::clone(&state));
        tasks.push(tokio::spawn(run_stream(
            channel,
            token.clone(),
            // The id the agent's certificate names (see `TokenMaker::token`).
            format!("bench-ingest-{i:04}"),
            devices,
            state,
            Arc::clone(&totals),
        )));
    }
    // The first sweep: every device is new.
    let deadline = started + Duration::from_secs(600);
    loop {
        if let Some(e) = states
            .iter()
            .find_map(|s| s.error.lock().ok().and_then(|e| e.clone()))
        {
            bail!("an ingest stream failed: {e}");
        }
        if states.iter().all(|s| s.first_sweep.load(Ordering::Relaxed)) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the first sweep did not complete within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = started.elapsed();
    let devices_total = (opts.streams * opts.devices) as f64;
    println!(
        "ingest: first sweep ({} new devices) acknowledged in {:.1} s",
        thousands(devices_total),
        first.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The measured window.
    let (a0, c0, b0, t0) = (
        totals.acked_obs.load(Ordering::Relaxed),
        server.cpu_seconds()?,
        cpu_seconds(std::process::id())?,
        Instant::now(),
    );
    totals.sampling.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
    let (a1, c1, b1, t1) = (
        totals.acked_obs.load(Ordering::Relaxed),
        server.cpu_seconds()?,
        cpu_seconds(std::process::id())?,
        Instant::now(),
    );
    totals.sampling.store(false, Ordering::Relaxed);
    // Pull the plug while the streams are still sending.
    totals.killing.store(true, Ordering::Relaxed);
    server.kill()?;
    totals.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    if let Some(e) = states
        .iter()
        .find_map(|s| s.error.lock().ok().and_then(|e| e.clone()))
    {
        bail!("an ingest stream failed during the measured window: {e}");
    }
    let secs = (t1 - t0).as_secs_f64();
    let obs_s = (a1 - a0) as f64 / secs;
    let cpu_cores = (c1 - c0) / secs;
    let load_cores = (b1 - b0) / secs;
    let mut lat = totals
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort_unstable();
    println!(
        "ingest: {} observations acknowledged in {secs:.1} s; collector used {cpu_cores:.2} CPUs",
        thousands((a1 - a0) as f64)
    );
    rows.push(row(
        &format!(
            "ingest, first sweep ({} streams, all devices new)",
            opts.streams
        ),
        format!("{} obs/s", thousands(devices_total / first.as_secs_f64())),
        "",
        "",
    ));
    rows.push(row(
        &format!(
            "ingest, sustained ({} streams, {:.0} s, durable acks)",
            opts.streams, secs
        ),
        format!(
            "{} obs/s ({:.0} batches/s)",
            thousands(obs_s),
            obs_s / BATCH as f64
        ),
        ">= 100,000 obs/s on 2 cores",
        verdict(obs_s >= GOAL_OBS_PER_S),
    ));
    rows.push(row(
        "ingest, CPU in that window: collector / this load generator",
        format!(
            "{cpu_cores:.2} / {load_cores:.2} CPUs ({:.1} µs of collector CPU per observation)",
            (c1 - c0) * 1e6 / ((a1 - a0) as f64).max(1.0)
        ),
        "",
        "",
    ));
    rows.push(row(
        "ingest, batch send-to-ack latency p50 / p99",
        format!(
            "{} / {}",
            ms(percentile(&lat, 0.50)),
            ms(percentile(&lat, 0.99))
        ),
        "",
        "",
    ));

    // Every acknowledged observation must have survived SIGKILL. The start includes reading
    // back what the collector's log holds beyond its last checkpoint.
    let restart = Instant::now();
    let server = Server::start(&dir)?;
    let restart = restart.elapsed();
    let channel = server.channel().await?;
    let mut query = QueryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut ok = true;
    let (mut acked_all, mut stored_all) = (0u64, 0u64);
    for (i, client) in clients.iter().enumerate() {
        let devices = query
            .list_devices(authed(
                &server.operator,
                v1::ListDevicesRequest {
                    client: client.clone(),
                    ..Default::default()
                },
            ))
            .await
            .with_context(|| format!("listing the devices of {client}"))?
            .into_inner()
            .devices;
        let stored: u64 = devices
            .iter()
            .flat_map(|d| &d.evidence)
            .filter(|e| e.method == v1::Method::Arp as i32)
            .map(|e| e.observations)
            .sum();
        let (acked, sent) = (
            states[i].acked_obs.load(Ordering::Relaxed),
            states[i].sent_obs.load(Ordering::Relaxed),
        );
        acked_all += acked;
        stored_all += stored;
        if devices.len() != opts.devices {
            println!(
                "ingest: {client}: {} devices after restart, {} sent",
                devices.len(),
                opts.devices
            );
            ok = false;
        }
        if stored < acked || stored > sent {
            println!(
                "ingest: {client}: {stored} observations stored after restart; {acked} were \
                 acknowledged and {sent} sent"
            );
            ok = false;
        }
    }
    let counts = QueryServiceClient::new(server.channel().await?)
        .get_counts(authed(&server.operator, v1::GetCountsRequest::default()))
        .await?
        .into_inner()
        .counts;
    let wrong = counts
        .iter()
        .filter(|c| c.devices != opts.devices as u64)
        .count();
    if counts.len() != clients.len() || wrong > 0 {
        println!(
            "ingest: GetCounts after restart: {} clients, {wrong} with a count other than {}",
            counts.len(),
            opts.devices
        );
        ok = false;
    }
    println!(
        "ingest: after SIGKILL and restart: {} observations stored, {} acknowledged: {}",
        thousands(stored_all as f64),
        thousands(acked_all as f64),
        if ok {
            "nothing acknowledged was lost"
        } else {
            "DATA LOST"
        }
    );
    rows.push(row(
        "ingest, SIGKILL mid-stream then restart",
        format!(
            "{} of {} acked obs kept (restart took {:.1} s)",
            thousands(stored_all.min(acked_all) as f64),
            thousands(acked_all as f64),
            restart.as_secs_f64()
        ),
        "every acked batch kept",
        if ok { "met" } else { "FAILED" },
    ));
    println!(
        "ingest: store on disk: {:.1} MiB",
        disk_bytes(&server.dir) as f64 / 1048576.0
    );
    Ok(ok)
}

/// The memory and GetCounts runs, on one collector holding `clients x client_devices`.
async fn counts(opts: &Options, scratch: &Path, rows: &mut Vec<Row>) -> Result<bool> {
    let dir = scratch.join("counts");
    std::fs::create_dir_all(&dir)?;
    let server = Server::start(&dir)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started_mem = server.memory()?;
    let clients: Vec<String> = (0..opts.clients)
        .map(|i| format!("client-{i:05}"))
        .collect();
    let t = Instant::now();
    let tokens = server.tokens(&clients).await?;
    println!(
        "counts: {} clients enrolled in {:.1} s",
        clients.len(),
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let empty = server.memory()?;

    // Load: every client's devices, LOAD_STREAMS agents at a time.
    let total = (opts.clients * opts.client_devices) as u64;
    let t = Instant::now();
    let load_cpu = server.cpu_seconds()?;
    let sem = Arc::new(Semaphore::new(LOAD_STREAMS));
    let mut tasks = Vec::new();
    let channels = {
        let mut v = Vec::new();
        for _ in 0..LOAD_STREAMS {
            v.push(server.channel().await?);
        }
        v
    };
    for (i, token) in tokens.iter().enumerate() {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        let channel = channels[i % LOAD_STREAMS].clone();
        let token = token.clone();
        let n = opts.client_devices;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let devices: Vec<v1::Observation> = (0..n).map(|j| observation(i, j)).collect();
            // The id the agent's certificate names (see `TokenMaker::token`).
            let agent = format!("bench-client-{i:05}");
            let batches: Vec<v1::ObservationBatch> = (1..=(n / BATCH) as u64)
                .map(|s| batch(&agent, s, &devices))
                .collect();
            let want = batches.len();
            let mut ingest = IngestServiceClient::new(channel)
                .max_encoding_message_size(MAX_MESSAGE)
                .max_decoding_message_size(MAX_MESSAGE);
            let mut acks = ingest
                .report(authed(&token, tokio_stream::iter(batches)))
                .await?
                .into_inner();
            let mut got = 0;
            while got < want {
                let Some(ack) = acks.message().await? else {
                    bail!("client {i}: the stream ended after {got} of {want} acks");
                };
                if ack.status != v1::AckStatus::Stored as i32 {
                    bail!("client {i}: batch {} not stored: {ack:?}", ack.sequence);
                }
                got += 1;
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let load_secs = t.elapsed().as_secs_f64();
    let load_cpu = server.cpu_seconds()? - load_cpu;
    println!(
        "counts: {} devices delivered in {load_secs:.1} s ({} obs/s, all new)",
        thousands(total as f64),
        thousands(total as f64 / load_secs)
    );
    let just_loaded = server.memory()?;
    let loaded = server.settle().await?;

    // GetCounts: one warm-up pass, then sequential, then concurrent callers.
    let mut ok = true;
    let channel = server.channel().await?;
    let operator = server.operator.clone();
    let expect = opts.client_devices as u64;
    let call = {
        let operator = operator.clone();
        move |mut q: QueryServiceClient<Channel>, client: String| {
            let operator = operator.clone();
            async move {
                let t = Instant::now();
                let r = q
                    .get_counts(authed(&operator, v1::GetCountsRequest { client }))
                    .await?
                    .into_inner();
                let took = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                let devices = r.counts.first().map_or(0, |c| c.devices);
                Ok::<_, anyhow::Error>((took, devices))
            }
        }
    };
    let query = QueryServiceClient::new(channel);
    let mut wrong = 0u64;
    for c in &clients {
        let (_, d) = call(query.clone(), c.clone()).await?;
        wrong += u64::from(d != expect);
    }
    let mut seq = Vec::with_capacity(opts.calls);
    let t = Instant::now();
    for i in 0..opts.calls {
        let (took, d) = call(query.clone(), clients[i % clients.len()].clone()).await?;
        wrong += u64::from(d != expect);
        seq.push(took);
    }
    let seq_rate = opts.calls as f64 / t.elapsed().as_secs_f64();
    seq.sort_unstable();
    let mut callers = Vec::new();
    let t = Instant::now();
    for k in 0..CALLERS {
        let q = QueryServiceClient::new(server.channel().await?);
        let clients = clients.clone();
        let call = call.clone();
        let n = opts.calls / CALLERS;
        callers.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(n);
            let mut wrong = 0u64;
            for i in 0..n {
                let c = clients[(i * CALLERS + k) % clients.len()].clone();
                let (took, d) = call(q.clone(), c).await?;
                wrong += u64::from(d != expect);
                out.push(took);
            }
            Ok::<_, anyhow::Error>((out, wrong))
        }));
    }
    let mut conc = Vec::new();
    for c in callers {
        let (l, w) = c.await??;
        conc.extend(l);
        wrong += w;
    }
    let conc_rate = conc.len() as f64 / t.elapsed().as_secs_f64();
    conc.sort_unstable();
    let queried = server.memory()?;
    if wrong > 0 {
        println!("counts: {wrong} GetCounts answers were not {expect} devices");
        ok = false;
    }

    let per_device =
        |m: Memory| (m.rss_kib.saturating_sub(empty.rss_kib) * 1024) as f64 / total as f64;
    let worst = per_device(loaded).max(per_device(queried));
    let disk = disk_bytes(&server.dir);
    rows.push(row(
        &format!(
            "load, {} clients x {} devices ({} streams, all new)",
            opts.clients, opts.client_devices, LOAD_STREAMS
        ),
        format!(
            "{} obs/s ({:.1} µs of collector CPU per observation)",
            thousands(total as f64 / load_secs),
            load_cpu * 1e6 / total as f64
        ),
        "",
        "",
    ));
    rows.push(row(
        &format!(
            "GetCounts{{client}} p50 / p99 / max, sequential ({} calls, 1 connection)",
            opts.calls
        ),
        format!(
            "{} / {} / {} ({} calls/s)",
            ms(percentile(&seq, 0.50)),
            ms(percentile(&seq, 0.99)),
            ms(seq.last().copied().unwrap_or(0)),
            thousands(seq_rate)
        ),
        "p99 < 1 ms",
        verdict(percentile(&seq, 0.99) as f64 / 1000.0 < GOAL_P99_MS),
    ));
    rows.push(row(
        &format!("GetCounts{{client}} p50 / p99 / max, {CALLERS} concurrent callers"),
        format!(
            "{} / {} / {} ({} calls/s)",
            ms(percentile(&conc, 0.50)),
            ms(percentile(&conc, 0.99)),
            ms(conc.last().copied().unwrap_or(0)),
            thousands(conc_rate)
        ),
        "",
        "",
    ));
    rows.push(row(
        &format!(
            "collector RSS: at start / {} clients enrolled / just loaded / loaded, settled / after queries",
            opts.clients
        ),
        format!(
            "{:.0} / {:.0} / {:.0} / {:.0} / {:.0} MiB (peak {:.0} MiB)",
            started_mem.rss_kib as f64 / 1024.0,
            empty.rss_kib as f64 / 1024.0,
            just_loaded.rss_kib as f64 / 1024.0,
            loaded.rss_kib as f64 / 1024.0,
            queried.rss_kib as f64 / 1024.0,
            queried.hwm_kib as f64 / 1024.0
        ),
        "",
        "",
    ));
    rows.push(row(
        &format!(
            "memory per device ({} devices; settled RSS minus enrolled, worse of loaded and after queries)",
            thousands(total as f64)
        ),
        format!(
            "{worst:.0} bytes (peak {:.0})",
            (queried.hwm_kib.saturating_sub(empty.rss_kib) * 1024) as f64 / total as f64
        ),
        "< 1 KiB",
        verdict(worst < GOAL_BYTES_PER_DEVICE),
    ));
    rows.push(row(
        "store on disk per device",
        format!(
            "{:.0} bytes ({:.0} MiB)",
            disk as f64 / total as f64,
            disk as f64 / 1048576.0
        ),
        "",
        "",
    ));
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_are_valid_and_distinct() {
        let now = 1_800_000_000_000;
        let mut macs = std::collections::BTreeSet::new();
        for j in 0..4000 {
            let o = observation(3, j);
            let clean = census_collector::model::clean_observation(&o, now, 0)
                .expect("a valid observation");
            assert!(macs.insert(clean.macs[0]), "device {j} repeats a MAC");
        }
        let b = batch(
            "a",
            9,
            &(0..1000).map(|j| observation(0, j)).collect::<Vec<_>>(),
        );
        assert_eq!(b.observations.len(), BATCH);
    }

    #[test]
    fn arguments() {
        let o = parse_args(["--streams=8".into(), "--devices".into(), "1000".into()])
            .expect("parses")
            .expect("options");
        assert_eq!((o.streams, o.devices), (8, 1000));
        assert!(parse_args(["--devices=700".into()]).is_err());
        assert!(parse_args(["--nope".into()]).is_err());
    }
}
