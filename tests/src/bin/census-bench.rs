//! `census-bench`: the discovery benchmark, census-agent against `arp-scan` and `nmap -sn`.
//!
//! In one run, on simulated client sites built by the lab (network namespaces, addresses only
//! in 198.18.0.0/15, all removed when it ends, even on failure):
//! - site A, 198.18.0.0/24 with 100 live hosts, and site B, 198.18.16.0/20 with 500 live hosts
//!   spread across the whole /20: each tool sweeps each site at its defaults and again at one
//!   equal packet rate; wall time, requests sent, recall (found / present) and the ratio to
//!   census are printed as a Markdown table, with the goal check (census at defaults at least
//!   4x faster than the faster peer, 100% recall);
//! - site C, 198.18.0.0/16 with 20 live hosts: census sweeps the /16 under GNU time, for its
//!   peak RSS against the goal (under 30 MiB).
//!
//! Census runs as the issue names it, `census-agent run --once`, delivering to a real collector
//! in the lab's core namespace: each census run enrols as a client of its own, and its recall
//! is what that client's devices at the collector say (so a device counts only if it was
//! swept, delivered and stored). Its wall time therefore includes delivery. The requests a
//! tool sent are the agent namespace's `eth0` transmit counter before and after the run (only
//! the tool sends there; census's delivery leaves through its other interface).
//!
//! Every tool runs inside the site's agent namespace, never in the machine's own. Speed is
//! reported, not asserted (machines are noisy); the exit status is non-zero only if census
//! missed a host or a run failed. Needs root, `arp-scan`, `nmap` and GNU `time`, and the
//! release binaries: run it through `deploy/bench.sh`, which installs and builds all of that.
//!
//! Flags: `--rate PPS` (the equal packet rate, default 500), `--runs N` (sweeps per tool and
//! setting, default 1; the table shows the median time and the lowest recall), `--verbose`
//! (census-agent's own log after each of its sweeps).

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{ExitCode, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use census_tests::{
    lab::{HostSpec, Ipv4Net, Lab, SiteSpec},
    support::{self, Collector},
};

/// The equal packet rate when `--rate` is not given: close to arp-scan's default (256 kbit/s,
/// about 380-480 ARP requests per second depending on how it counts frame overhead).
const DEFAULT_RATE: u32 = 500;
/// The limit for one sweep by any tool; generous, so only a hung tool reaches it.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(600);
/// Most sweeps per tool and setting (`--runs`), so a typo cannot run for hours.
const MAX_RUNS: u32 = 9;
/// Where GNU time is (Debian package `time`); the shell builtin cannot report peak RSS.
const GNU_TIME: &str = "/usr/bin/time";
/// The speed goal of the discovery issue: census at defaults against the faster peer.
const SPEED_GOAL: f64 = 4.0;
/// The memory goal: peak RSS of the agent during a /16 sweep, in MiB.
const RSS_GOAL_MIB: f64 = 30.0;
/// The /16 sweep: a highest rate raised from the default 6000 pps so it takes seconds, not
/// minutes (its 20 hosts answer too few requests for the sweep to speed up quickly from
/// 1200); retries and the reply window stay at their defaults.
const WIDE_RATE: u32 = 20_000;
/// Census's discovery methods that stay off: the lab's hosts only answer ARP and ping, so
/// SNMP and mDNS would only add their listening windows. ICMP stays on (it only probes
/// routed addresses, and these sites have none).
const CENSUS_DISABLE: &str = "snmp,mdns";

fn main() -> ExitCode {
    match bench() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("census-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// === Command line ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    rate: u32,
    runs: u32,
    /// Print census-agent's own log (its sweep summary with timings) after each of its runs.
    verbose: bool,
    /// Site B on a plain bridge that floods every broadcast to its 500 hosts, instead of the
    /// directed switch: what a software bridge on this machine can carry.
    flood: bool,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options> {
    let mut opts = Options {
        rate: DEFAULT_RATE,
        runs: 1,
        verbose: false,
        flood: false,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<u32> {
            let v = match inline.clone() {
                Some(v) => v,
                None => args
                    .next()
                    .with_context(|| format!("{name} needs a value"))?,
            };
            v.parse()
                .with_context(|| format!("{name} takes a whole number, got {v:?}"))
        };
        match flag.as_str() {
            "--rate" => opts.rate = value("--rate")?,
            "--runs" => opts.runs = value("--runs")?,
            "-v" | "--verbose" => opts.verbose = true,
            "--flood" => opts.flood = true,
            "-h" | "--help" => {
                println!(
                    "usage: census-bench [--rate PPS] [--runs N] [--verbose] [--flood]\n  --rate PPS  \
                     the equal packet rate for every tool (default {DEFAULT_RATE})\n  --runs N    \
                     sweeps per tool and setting; the median time is shown (default 1)\n  \
                     --verbose   print census-agent's own log after each of its sweeps\n  \
                     --flood     site B on a bridge that floods every ARP request to its 500 \
                     hosts (the lab then carries about 1,400 requests/s on 2 CPUs)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if !(10..=100_000).contains(&opts.rate) {
        bail!(
            "--rate must be between 10 and 100000 pps, got {}",
            opts.rate
        );
    }
    if !(1..=MAX_RUNS).contains(&opts.runs) {
        bail!("--runs must be between 1 and {MAX_RUNS}, got {}", opts.runs);
    }
    Ok(opts)
}

// === The benchmark ===

/// One simulated site of the benchmark.
struct SiteDef {
    label: &'static str,
    /// For the names of the collector's clients and sites: `a`, `b`, `c`.
    key: &'static str,
    subnet: Ipv4Net,
    agent: Ipv4Addr,
    hosts: u32,
    /// The site's switch delivers each ARP request only to the host that owns the address
    /// asked for ([`census_tests::lab::Site::direct_arp_requests`]): a bridge that copies
    /// every broadcast to 500 host namespaces in software limits the site to about 1,400
    /// requests a second on 2 CPUs, whatever the tool.
    directed: bool,
}

fn bench() -> Result<bool> {
    let opts = parse_args(std::env::args().skip(1))?;
    // The agent reads CENSUS_AGENT_* (and a config file named by one); inherited, they would
    // silently change what "defaults" means.
    let inherited: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("CENSUS_AGENT_"))
        .collect();
    if !inherited.is_empty() {
        bail!(
            "{} set: the benchmark measures census-agent's defaults; unset it first",
            inherited.join(", ")
        );
    }
    let tools = Tools::find()?;
    let agent_bin = support::bin("census-agent")?;
    if cfg!(debug_assertions) {
        eprintln!(
            "census-bench: warning: this is a debug build; figures are not representative \
             (use deploy/bench.sh, which builds with --release)"
        );
    }

    let sites = [
        SiteDef {
            label: "A /24",
            key: "a",
            subnet: "198.18.0.0/24".parse()?,
            agent: "198.18.0.2".parse()?,
            hosts: 100,
            directed: false,
        },
        SiteDef {
            label: "B /20",
            key: "b",
            subnet: "198.18.16.0/20".parse()?,
            agent: "198.18.16.2".parse()?,
            hosts: 500,
            directed: !opts.flood,
        },
    ];
    let wide = SiteDef {
        label: "C /16",
        key: "c",
        subnet: "198.18.0.0/16".parse()?,
        agent: "198.18.0.2".parse()?,
        hosts: 20,
        directed: false,
    };

    println!("census-bench: discovery, census-agent against arp-scan and nmap -sn");
    println!("{}", machine_line());
    let lab = Lab::new()?;
    let started = Instant::now();
    let mut built = Vec::new();
    for def in sites.iter().chain(std::iter::once(&wide)) {
        let ips = spread(def.subnet, def.hosts)?;
        if ips.contains(&def.agent) {
            bail!("site {}: a host would take the agent's address", def.label);
        }
        let site = lab.add_site(SiteSpec::new(def.label, def.subnet, def.agent))?;
        let hosts = site
            .add_hosts(ips.iter().map(|&ip| HostSpec::new(ip)))
            .with_context(|| format!("adding the hosts of site {}", def.label))?;
        if def.directed {
            site.direct_arp_requests(&hosts)?;
        }
        println!(
            "  site {}: {} on its own bridge{}, agent {}, {} hosts from {} to {} (one in about \
             every {})",
            def.label,
            def.subnet,
            if def.directed {
                " (ARP requests delivered to their address's host only)"
            } else {
                ""
            },
            def.agent,
            ips.len(),
            ips.first().map_or_else(String::new, ToString::to_string),
            ips.last().map_or_else(String::new, ToString::to_string),
            stride(def.subnet, def.hosts),
        );
        built.push((site, ips.into_iter().collect::<BTreeSet<_>>()));
    }
    println!("  (lab built in {:.1} s)", started.elapsed().as_secs_f64());
    println!(
        "  versions: {}",
        tools.versions(&lab, built[0].0.agent().ns())
    );
    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    println!(
        "  collector {} in the lab's core namespace",
        collector.url()
    );
    let mut enrolled = 0u32;

    let rate = opts.rate;
    let settings = [Setting::Defaults, Setting::Rate(rate)];
    let mut rows = Vec::new();
    for ((site, present), def) in built.iter().zip(&sites) {
        for setting in settings {
            for tool in [Tool::Census, Tool::ArpScan, Tool::Nmap] {
                eprint!("  {} {} {}:", def.label, tool.name(), setting.label());
                let mut runs = Vec::new();
                let mut worst: Option<Found> = None;
                for _ in 0..opts.runs {
                    let delivery = match tool {
                        Tool::Census => {
                            enrolled += 1;
                            Some(Delivery::enrol(&collector, def.key, enrolled)?)
                        }
                        _ => None,
                    };
                    let argv =
                        tool.argv(&agent_bin, &tools, setting, def.subnet, delivery.as_ref());
                    let ns = site.agent().ns();
                    let before = tx_packets(&lab, ns)?;
                    let t0 = Instant::now();
                    let out = lab.exec_timeout(ns, &argv, SWEEP_TIMEOUT)?;
                    let wall = t0.elapsed();
                    let requests = tx_packets(&lab, ns)?.saturating_sub(before);
                    check_exit(&out, &argv)?;
                    let found = tool.parse(&out, delivery.as_ref(), present, def.agent)?;
                    if opts.verbose && tool == Tool::Census {
                        eprint!("\n{}", strip_ansi(&String::from_utf8_lossy(&out.stderr)));
                        eprint!("{}", String::from_utf8_lossy(&out.stdout));
                    }
                    eprint!(
                        " {:.2} s {}/{} ({requests} requests)",
                        wall.as_secs_f64(),
                        found.hits,
                        present.len()
                    );
                    runs.push((wall, requests));
                    if worst.as_ref().is_none_or(|w| found.hits < w.hits) {
                        worst = Some(found);
                    }
                }
                eprintln!();
                let (wall, requests) = median(&mut runs);
                rows.push(Row {
                    site: def.label,
                    tool,
                    setting,
                    wall,
                    requests,
                    found: worst.context("no run")?,
                    present: present.len(),
                });
            }
        }
    }

    println!(
        "\n### Commands (run in the site's agent namespace; CIDR is the site's subnet, URL the \
         lab's collector, F a file with a fresh enrolment token)\n"
    );
    let placeholder = Delivery::placeholder();
    for tool in [Tool::Census, Tool::ArpScan, Tool::Nmap] {
        for setting in settings {
            let argv = tool.argv(
                &agent_bin,
                &tools,
                setting,
                sites[0].subnet,
                Some(&placeholder),
            );
            println!(
                "- {} {}: `{}`",
                tool.name(),
                setting.label(),
                shown(&argv).replace(&sites[0].subnet.to_string(), "CIDR")
            );
        }
    }

    println!(
        "\n### Results ({} run{} each{})\n",
        opts.runs,
        if opts.runs == 1 { "" } else { "s" },
        if opts.runs == 1 {
            ""
        } else {
            "; median time, lowest recall"
        }
    );
    print!("{}", table(&rows));

    let mut ok = true;
    println!();
    for def in &sites {
        for setting in settings {
            let summary = goal_line(&rows, def.label, setting);
            println!("- {summary}");
        }
        let census_recall = rows
            .iter()
            .filter(|r| r.site == def.label && r.tool == Tool::Census)
            .all(|r| r.found.hits == r.present);
        if !census_recall {
            ok = false;
        }
    }
    let all_census: Vec<&Row> = rows.iter().filter(|r| r.tool == Tool::Census).collect();
    if all_census.iter().all(|r| r.found.hits == r.present) {
        println!("- census recall 100% on every site and setting (goal 100%): met");
    } else {
        println!("- census recall below 100% (goal 100%): NOT MET");
    }

    // The /16 sweep under GNU time, for peak RSS: `run --once` like the others, so the
    // figure includes delivering the sweep to the collector.
    let (site, present) = built.last().context("no /16 site")?;
    let rss_file = lab.dir().join("census-rss.txt");
    enrolled += 1;
    let delivery = Delivery::enrol(&collector, wide.key, enrolled)?;
    let mut argv = Tool::Census.argv(
        &agent_bin,
        &tools,
        Setting::Rate(WIDE_RATE),
        wide.subnet,
        Some(&delivery),
    );
    let census_cmd = shown(&Tool::Census.argv(
        &agent_bin,
        &tools,
        Setting::Rate(WIDE_RATE),
        wide.subnet,
        Some(&placeholder),
    ));
    let mut timed: Vec<OsString> = vec![
        GNU_TIME.into(),
        "-f".into(),
        "%M".into(),
        "-o".into(),
        rss_file.clone().into_os_string(),
    ];
    timed.append(&mut argv);
    let before = tx_packets(&lab, site.agent().ns())?;
    let t0 = Instant::now();
    let out = lab.exec_timeout(site.agent().ns(), &timed, SWEEP_TIMEOUT)?;
    let wall = t0.elapsed();
    let requests = tx_packets(&lab, site.agent().ns())?.saturating_sub(before);
    check_exit(&out, &timed)?;
    let found = Tool::Census.parse(&out, Some(&delivery), present, wide.agent)?;
    let rss_kib = read_rss_kib(&rss_file)?;
    let rss_mib = rss_kib as f64 / 1024.0;
    println!("\n### Peak RSS during a /16 sweep\n");
    println!("`/usr/bin/time -f %M {census_cmd}`\n");
    println!(
        "- site {}: {} addresses, {requests} requests, {}/{} hosts found ({}), {:.2} s, peak \
         RSS {:.1} MiB ({rss_kib} KiB): goal < {RSS_GOAL_MIB:.0} MiB {}",
        wide.label,
        usable_addresses(wide.subnet),
        found.hits,
        present.len(),
        percent(found.hits, present.len()),
        wall.as_secs_f64(),
        rss_mib,
        if rss_mib < RSS_GOAL_MIB {
            "met"
        } else {
            "NOT MET"
        }
    );
    if found.hits != present.len() {
        println!("- census missed hosts of the /16 site: recall goal NOT MET");
        ok = false;
    }

    if !ok {
        eprintln!("census-bench: census's recall is below 100% (see above)");
    }
    println!("\nCleaning up.");
    Ok(ok)
}

// === Tools ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Census,
    ArpScan,
    Nmap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Defaults,
    /// Packets per second, the same for every tool.
    Rate(u32),
}

impl Setting {
    fn label(self) -> String {
        match self {
            Setting::Defaults => "defaults".to_owned(),
            Setting::Rate(r) => format!("{r} pps"),
        }
    }
}

/// The peers' executables, found up front so a missing one fails before the lab is built.
struct Tools {
    arp_scan: PathBuf,
    nmap: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools> {
        let find = |name: &str| {
            [
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
                "/usr/local/sbin",
                "/usr/local/bin",
            ]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "{name} is not installed: apt-get install arp-scan nmap time (or run \
                         deploy/bench.sh, which does)"
                )
            })
        };
        if !Path::new(GNU_TIME).is_file() {
            bail!("{GNU_TIME} (GNU time) is not installed: apt-get install time");
        }
        Ok(Tools {
            arp_scan: find("arp-scan")?,
            nmap: find("nmap")?,
        })
    }

    /// `arp-scan X, nmap Y`, asked inside a lab namespace like everything else.
    fn versions(&self, lab: &Lab, ns: &str) -> String {
        let first_line = |argv: Vec<OsString>, needle: &str| {
            lab.exec(ns, argv)
                .ok()
                .and_then(|o| {
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    text.lines()
                        .find(|l| l.to_lowercase().contains(needle))
                        .map(|l| l.trim().to_owned())
                })
                .unwrap_or_else(|| "unknown version".to_owned())
        };
        format!(
            "{}; {}",
            first_line(
                vec![self.arp_scan.clone().into(), "--version".into()],
                "arp-scan"
            ),
            first_line(vec![self.nmap.clone().into(), "--version".into()], "nmap")
        )
    }
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Census => "census-agent",
            Tool::ArpScan => "arp-scan",
            Tool::Nmap => "nmap -sn",
        }
    }

    /// The exact command line for one sweep of `subnet`; census also needs where to deliver.
    fn argv(
        self,
        agent: &Path,
        tools: &Tools,
        setting: Setting,
        subnet: Ipv4Net,
        delivery: Option<&Delivery>,
    ) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        match self {
            Tool::Census => {
                // Defaults: 1200 pps, 1 retry, waits of 4x the highest reply latency measured
                // (at least 50 ms, at most 200 ms before a retry and 1 s after the last request).
                v.extend([
                    agent.as_os_str().to_owned(),
                    "run".into(),
                    "--once".into(),
                    "--scope".into(),
                    subnet.to_string().into(),
                    "--disable".into(),
                    CENSUS_DISABLE.into(),
                ]);
                if let Some(d) = delivery {
                    v.extend([
                        "--collector".into(),
                        d.url.clone().into(),
                        "--state-dir".into(),
                        d.state_dir.clone().into_os_string(),
                    ]);
                }
                if let Setting::Rate(r) = setting {
                    v.extend(["--arp-rate".into(), r.to_string().into()]);
                }
            }
            Tool::ArpScan => {
                // Defaults: 256 kbit/s, 2 attempts per host, 500 ms timeout, backoff 1.5.
                v.extend([
                    tools.arp_scan.clone().into_os_string(),
                    "--interface".into(),
                    "eth0".into(),
                ]);
                if let Setting::Rate(r) = setting {
                    // The minimum gap between packets, in microseconds: exactly R pps.
                    v.push(format!("--interval={}u", 1_000_000 / r).into());
                }
                v.push(subnet.to_string().into());
            }
            Tool::Nmap => {
                // As root on a local Ethernet, -sn discovers hosts with ARP requests.
                v.extend([
                    tools.nmap.clone().into_os_string(),
                    "-sn".into(),
                    "-n".into(),
                    "-oG".into(),
                    "-".into(),
                ]);
                if let Setting::Rate(r) = setting {
                    v.extend([
                        "--min-rate".into(),
                        r.to_string().into(),
                        "--max-rate".into(),
                        r.to_string().into(),
                    ]);
                }
                v.push(subnet.to_string().into());
            }
        }
        v
    }

    /// What one sweep found: from the collector for census (the devices of the run's own
    /// client), from standard output for the peers.
    fn parse(
        self,
        out: &Output,
        delivery: Option<&Delivery>,
        present: &BTreeSet<Ipv4Addr>,
        agent: Ipv4Addr,
    ) -> Result<Found> {
        let text = String::from_utf8_lossy(&out.stdout);
        let seen = match self {
            Tool::Census => {
                let d = delivery.context("a census run without a collector")?;
                let seen = d.delivered()?;
                // The agent's own summary must agree with what the collector stored.
                if let Some(n) = delivered_count(&text)
                    && n != seen.devices
                {
                    bail!(
                        "census-agent says it delivered {n} devices, the collector has {} for \
                         client {}",
                        seen.devices,
                        d.client
                    );
                }
                seen.addresses
            }
            Tool::ArpScan => arp_scan_addresses(&text),
            Tool::Nmap => nmap_addresses(&text),
        };
        Ok(Found::of(&seen, present, agent))
    }
}

/// Where one census run delivers: the lab's collector, as a client of its own (so every run's
/// recall is its own, not the union of all runs so far).
struct Delivery<'a> {
    collector: Option<&'a Collector<'a>>,
    client: String,
    url: String,
    /// The enrolled agent's state directory.
    state_dir: PathBuf,
}

/// What the collector holds for one census run's client.
struct Delivered {
    devices: usize,
    /// Addresses that answered a probe, over all its devices.
    addresses: BTreeSet<Ipv4Addr>,
}

impl<'a> Delivery<'a> {
    /// Enrols an agent into client `bench-<site>-<n>` (site `<site>`).
    fn enrol(collector: &'a Collector<'a>, site: &str, n: u32) -> Result<Self> {
        let client = format!("bench-{site}-{n}");
        Ok(Delivery {
            collector: Some(collector),
            url: collector.url(),
            state_dir: collector.enroll(&client, site)?,
            client,
        })
    }

    /// For the commands shown in the report.
    fn placeholder() -> Self {
        Delivery {
            collector: None,
            client: String::new(),
            url: "URL".to_owned(),
            state_dir: PathBuf::from("D"),
        }
    }

    fn delivered(&self) -> Result<Delivered> {
        let collector = self.collector.context("a placeholder has no collector")?;
        let devices = collector.devices(&self.client)?;
        let addresses = devices
            .iter()
            .flat_map(|d| d.addresses.iter())
            .filter(|a| a.answered)
            .filter_map(|a| a.address.parse().ok())
            .collect();
        Ok(Delivered {
            devices: devices.len(),
            addresses,
        })
    }
}

/// `N` from the agent's summary line, `swept ... ; N devices delivered`.
fn delivered_count(text: &str) -> Option<usize> {
    text.lines()
        .filter_map(|l| l.strip_suffix(" devices delivered"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next_back()
}

/// The transmit packet counter of `eth0` (the site LAN) in namespace `ns`.
fn tx_packets(lab: &Lab, ns: &str) -> Result<u64> {
    let text = lab.exec_ok(ns, ["cat", "/sys/class/net/eth0/statistics/tx_packets"])?;
    text.trim()
        .parse()
        .with_context(|| format!("eth0's tx_packets in {ns} is not a number: {text:?}"))
}

/// Addresses from arp-scan's default output: `IP<TAB>MAC<TAB>vendor` per reply (duplicates
/// are marked `(DUP: n)` and counted once).
fn arp_scan_addresses(text: &str) -> BTreeSet<Ipv4Addr> {
    text.lines()
        .filter_map(|l| l.split('\t').next()?.trim().parse().ok())
        .collect()
}

/// Addresses nmap's grepable output (`-oG -`) reports as up: `Host: IP ()\tStatus: Up`.
fn nmap_addresses(text: &str) -> BTreeSet<Ipv4Addr> {
    text.lines()
        .filter(|l| l.contains("Status: Up"))
        .filter_map(|l| {
            l.strip_prefix("Host: ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// One sweep's result against the hosts that were built.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    /// Present hosts that were reported.
    hits: usize,
    /// Reported addresses that are neither a built host nor the scanning agent itself.
    extra: usize,
}

impl Found {
    fn of(seen: &BTreeSet<Ipv4Addr>, present: &BTreeSet<Ipv4Addr>, agent: Ipv4Addr) -> Found {
        Found {
            hits: seen.intersection(present).count(),
            extra: seen
                .iter()
                .filter(|ip| **ip != agent && !present.contains(ip))
                .count(),
        }
    }
}

fn check_exit(out: &Output, argv: &[OsString]) -> Result<()> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            shown(argv),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A command line for people: program names without their directories.
fn shown(argv: &[OsString]) -> String {
    argv.iter()
        .enumerate()
        .map(|(i, a)| {
            let a = Path::new(a);
            match (i, a.file_name()) {
                (0, Some(name)) => name.to_string_lossy().into_owned(),
                _ => a.to_string_lossy().into_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// === Results ===

struct Row {
    site: &'static str,
    tool: Tool,
    setting: Setting,
    wall: Duration,
    /// Packets the tool sent on the site LAN in the run of median time.
    requests: u64,
    found: Found,
    present: usize,
}

fn census_time(rows: &[Row], site: &str, setting: Setting) -> Option<Duration> {
    rows.iter()
        .find(|r| r.site == site && r.setting == setting && r.tool == Tool::Census)
        .map(|r| r.wall)
}

/// The results as a Markdown table, ready for the README.
fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "| site | tool | setting | wall (s) | requests | requests/s | found/present | recall | \
         extra | time vs census |\n",
    );
    s.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let ratio = census_time(rows, r.site, r.setting)
            .map(|c| format!("{:.2}x", r.wall.as_secs_f64() / c.as_secs_f64().max(1e-9)))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {} | {:.0} | {}/{} | {} | {} | {} |",
            r.site,
            r.tool.name(),
            r.setting.label(),
            r.wall.as_secs_f64(),
            r.requests,
            r.requests as f64 / r.wall.as_secs_f64().max(1e-9),
            r.found.hits,
            r.present,
            percent(r.found.hits, r.present),
            r.found.extra,
            ratio
        );
    }
    s
}

/// "site A /24 at defaults: census 0.5 s, faster peer arp-scan 2.0 s: census is 4.0x faster
/// (goal >= 4x: met)"; at an equal rate the goal does not apply.
fn goal_line(rows: &[Row], site: &str, setting: Setting) -> String {
    let Some(census) = census_time(rows, site, setting) else {
        return format!("site {site}: no census run");
    };
    let peer = rows
        .iter()
        .filter(|r| r.site == site && r.setting == setting && r.tool != Tool::Census)
        .min_by_key(|r| r.wall);
    let Some(peer) = peer else {
        return format!("site {site}: no peer run");
    };
    let ratio = peer.wall.as_secs_f64() / census.as_secs_f64().max(1e-9);
    let verdict = match setting {
        Setting::Defaults if ratio >= SPEED_GOAL => format!(" (goal >= {SPEED_GOAL:.0}x: met)"),
        Setting::Defaults => format!(" (goal >= {SPEED_GOAL:.0}x: NOT MET)"),
        Setting::Rate(_) => " (no goal at an equal rate; for comparison)".to_owned(),
    };
    let speed = if ratio >= 1.0 {
        format!("census is {ratio:.2}x faster than the faster peer")
    } else {
        format!(
            "census is {:.2}x SLOWER than the faster peer",
            1.0 / ratio.max(1e-9)
        )
    };
    format!(
        "site {site} at {}: census {:.2} s, faster peer {} {:.2} s: {speed}{verdict}",
        setting.label(),
        census.as_secs_f64(),
        peer.tool.name(),
        peer.wall.as_secs_f64(),
    )
}

/// The run of median wall time (time, requests).
fn median(runs: &mut [(Duration, u64)]) -> (Duration, u64) {
    runs.sort();
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

fn percent(hits: usize, present: usize) -> String {
    if present == 0 {
        return "n/a".to_owned();
    }
    format!("{:.1}%", hits as f64 * 100.0 / present as f64)
}

/// `text` without ANSI colour sequences (`ESC [ ... m`), which the agent's log has even in a pipe.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            // Bounded by the text: skips up to and including the final letter, or to the end.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// GNU time's `%M`: peak resident set size in KiB, on the last line of its output file.
fn read_rss_kib(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading GNU time's output {}", path.display()))?;
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("GNU time wrote nothing to {}", path.display()))?;
    last.trim()
        .parse()
        .with_context(|| format!("GNU time's peak RSS is not a number: {last:?}"))
}

// === Sites ===

fn usable_addresses(subnet: Ipv4Net) -> u64 {
    (1u64 << (32 - u32::from(subnet.prefix_len()))).saturating_sub(2)
}

/// The gap between two hosts of `spread`.
fn stride(subnet: Ipv4Net, count: u32) -> u64 {
    (1u64 << (32 - u32::from(subnet.prefix_len()))) / u64::from(count.max(1))
}

/// `count` host addresses spread over the whole of `subnet`: one in every `stride` addresses,
/// shifted by a small irregular offset inside each stride, starting at the network address +
/// 3 (the agent is at + 2). Deterministic, so every run sweeps the same site.
fn spread(subnet: Ipv4Net, count: u32) -> Result<Vec<Ipv4Addr>> {
    let size = 1u64 << (32 - u32::from(subnet.prefix_len()));
    let step = stride(subnet, count);
    if step < 1 || u64::from(count) + 3 > size {
        bail!("{subnet} has no room for {count} hosts");
    }
    let base = u64::from(u32::from(subnet.network()));
    (0..u64::from(count))
        .map(|i| {
            let offset = 3 + i * step + (i * i) % step;
            if offset >= size - 1 {
                bail!("host {i} of {count} would fall outside {subnet}");
            }
            let ip = u32::try_from(base + offset).context("address overflow")?;
            Ok(Ipv4Addr::from(ip))
        })
        .collect()
}

/// `machine: 2 CPUs, AMD EPYC, Linux 6.1.0; 2025-01-31 12:00 UTC`, for the README.
fn machine_line() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let now = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let build = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    format!("  machine: {cpus} CPUs, {model}, Linux {kernel}; {now}; {build}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test subnet")
    }

    #[test]
    fn spread_fills_the_subnet_without_the_agent_or_the_edges() {
        for (subnet, count) in [
            ("198.18.0.0/24", 100),
            ("198.18.16.0/20", 500),
            ("198.18.0.0/16", 20),
        ] {
            let subnet = net(subnet);
            let ips = spread(subnet, count).expect("spread");
            assert_eq!(ips.len(), count as usize);
            let unique: BTreeSet<_> = ips.iter().collect();
            assert_eq!(unique.len(), ips.len(), "no duplicates");
            for ip in &ips {
                assert!(subnet.contains(ip));
                assert_ne!(*ip, subnet.network());
                assert_ne!(*ip, subnet.broadcast());
                assert_ne!(u32::from(*ip) - u32::from(subnet.network()), 2, "agent");
            }
            let last = u64::from(u32::from(*ips.last().expect("hosts")));
            let span = last - u64::from(u32::from(subnet.network()));
            assert!(
                span > usable_addresses(subnet) * 3 / 4,
                "{subnet}: the hosts reach the last quarter"
            );
        }
    }

    #[test]
    fn peers_outputs_are_parsed() {
        let arp = "Interface: eth0, type: EN10MB, MAC: 00:16:3e:00:00:02, IPv4: 198.18.0.2\n\
                   Starting arp-scan 1.10.0 with 256 hosts\n\
                   198.18.0.3\t00:16:3e:00:00:05\tXensource, Inc.\n\
                   198.18.0.5\t00:16:3e:00:00:06\t(Unknown)\n\
                   198.18.0.5\t00:16:3e:00:00:06\t(Unknown) (DUP: 2)\n\n\
                   3 packets received by filter, 0 packets dropped by kernel\n";
        let got: Vec<String> = arp_scan_addresses(arp)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["198.18.0.3", "198.18.0.5"]);

        let nmap = "# Nmap 7.93 scan initiated as: nmap -sn -n -oG - 198.18.0.0/24\n\
                    Host: 198.18.0.2 ()\tStatus: Up\n\
                    Host: 198.18.0.3 ()\tStatus: Up\n\
                    # Nmap done -- 256 IP addresses (2 hosts up) scanned in 2.04 seconds\n";
        let seen = nmap_addresses(nmap);
        let present: BTreeSet<Ipv4Addr> = ["198.18.0.3", "198.18.0.4"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let f = Found::of(&seen, &present, "198.18.0.2".parse().expect("ip"));
        assert_eq!(
            f,
            Found { hits: 1, extra: 0 },
            "the scanner itself is not extra"
        );

        let summary = "swept 253 addresses in 0.4s: 100 answered ARP, 0 answered ICMP, 0 \
                       answered SNMP, 0 advertised over mDNS; 100 devices delivered\n";
        assert_eq!(delivered_count(summary), Some(100));
        assert_eq!(delivered_count("nothing to see\n"), None);
    }

    #[test]
    fn flags() {
        let o = parse_args(["--rate=250".to_owned(), "--runs".to_owned(), "3".to_owned()])
            .expect("flags");
        assert_eq!(
            o,
            Options {
                rate: 250,
                runs: 3,
                verbose: false,
                flood: false,
            }
        );
        assert!(parse_args(["--flood".to_owned()]).expect("flags").flood);
        assert!(parse_args(["--runs=0".to_owned()]).is_err());
        assert!(parse_args(["--bogus".to_owned()]).is_err());
    }

    #[test]
    fn colours_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2mt\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x=1\u{1b}["),
            "t  INFO x=1"
        );
    }

    #[test]
    fn equal_rate_flags_are_exact() {
        let tools = Tools {
            arp_scan: "/usr/sbin/arp-scan".into(),
            nmap: "/usr/bin/nmap".into(),
        };
        let subnet = net("198.18.0.0/24");
        let placeholder = Delivery::placeholder();
        let line = |t: Tool| {
            shown(&t.argv(
                Path::new("/x/census-agent"),
                &tools,
                Setting::Rate(500),
                subnet,
                Some(&placeholder),
            ))
        };
        assert_eq!(
            line(Tool::Census),
            "census-agent run --once --scope 198.18.0.0/24 --disable snmp,mdns --collector URL \
             --state-dir D --arp-rate 500"
        );
        assert_eq!(
            line(Tool::ArpScan),
            "arp-scan --interface eth0 --interval=2000u 198.18.0.0/24"
        );
        assert_eq!(
            line(Tool::Nmap),
            "nmap -sn -n -oG - --min-rate 500 --max-rate 500 198.18.0.0/24"
        );
    }
}
