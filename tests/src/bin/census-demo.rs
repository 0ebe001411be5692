//! `census-demo`: the tour of Census an MSP would want, on two simulated client sites.
//!
//! Two clients whose LANs use the same 198.18.0.0/24 (as two real clients with overlapping
//! private ranges would), each with an agent, real devices in network namespaces and real
//! responders: a switch and a printer answering SNMP (net-snmp `snmpd` with a vendor's sysDescr
//! and sysObjectID), a dual-NIC Linux server answering SNMP on both NICs, an Apple TV
//! advertising over mDNS (python3-zeroconf), a phone with a randomized MAC, plain hosts, and at
//! acme a Samba AD DC holding a user of every kind. Then the operator's view, through the real
//! `census` binary, each command line shown before its output: the counts with categories and
//! users, one device's evidence, the users and why each counts, a billing snapshot and its CSV.
//!
//! Every number is then checked against what was built (devices per client and per category,
//! each user's decision, the snapshot's rows); any difference is named and the demo exits 1.
//! The agents' and the collector's logs are files in the lab's directory, printed only on
//! failure. Everything built (namespaces, processes, the lab's directory) is removed when the
//! demo ends, even on failure; a demo killed outright leaves leftovers the next lab removes.
//! Needs root (network namespaces): run it through `deploy/demo.sh`, which installs what it
//! needs and builds first.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use census_tests::{
    lab::{
        Host, HostSpec, Ipv4Net, Lab, MdnsService, MdnsSpec, SambaDc, Site, SiteSpec, SnmpdSpec,
        mac_string,
    },
    support::{self, Collector, Device},
};
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Both clients' LAN: the same subnet at each, on purpose.
const SUBNET: &str = "198.18.0.0/24";
/// Each site's agent on its LAN.
const AGENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The SNMP v2c read community the devices and the agents share.
const COMMUNITY: &str = "census-demo";
/// acme's Active Directory domain.
const REALM: &str = "acme.census.test";
/// The exclusion group acme's user policy names.
const EXCLUDED_GROUP: &str = "Billing Exclusions";
/// How many lines of each log a failure prints.
const LOG_TAIL: usize = 25;

/// A clone of one VM image runs at both clients, with the same MAC: still two devices.
const CLONED_VM_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x0c, 0x10, 0x4e];

// === What the demo builds ===

/// What a device of the demo is, and so how it is built and what it must be counted as.
#[derive(Debug, Clone)]
enum Kind {
    /// An SNMP agent with this system group, on one NIC.
    Snmp(SnmpdSpec),
    /// A Linux server with two NICs on the LAN (the second at `ip + 1`), answering SNMP on
    /// both; one device.
    DualNicServer(SnmpdSpec),
    /// A device announcing itself over mDNS.
    Mdns(MdnsSpec),
    /// A phone with a locally administered (randomized) MAC, announcing itself over mDNS.
    Phone(MdnsSpec),
    /// The site's Samba AD domain controller (built by the lab, read by the agent).
    DomainController,
    /// A host that answers ARP and ping and nothing else; `Some` MAC for the cloned VM.
    Plain(Option<[u8; 6]>),
    /// A host that drops ping (it answers ARP all the same).
    Firewalled,
}

/// One device of the demo.
#[derive(Debug, Clone)]
struct Planned {
    label: &'static str,
    ip: Ipv4Addr,
    kind: Kind,
    /// The category Census must give it.
    category: &'static str,
}

/// One client with one site.
#[derive(Debug, Clone)]
struct ClientPlan {
    client: &'static str,
    site: &'static str,
    devices: Vec<Planned>,
}

impl ClientPlan {
    fn has_dc(&self) -> bool {
        self.devices
            .iter()
            .any(|d| matches!(d.kind, Kind::DomainController))
    }

    /// (category, how many) for every category built, sorted.
    fn categories(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for d in &self.devices {
            match out.iter_mut().find(|(c, _)| *c == d.category) {
                Some((_, n)) => *n += 1,
                None => out.push((d.category, 1)),
            }
        }
        out.sort();
        out
    }
}

fn snmp(sys_name: &str, descr: &str, object_id: &str, location: &str) -> SnmpdSpec {
    SnmpdSpec {
        sys_descr: descr.into(),
        sys_object_id: Some(object_id.into()),
        sys_location: location.into(),
        ..SnmpdSpec::v2c(COMMUNITY, sys_name)
    }
}

fn mdns(host: &str, instance: &str, service_type: &str, port: u16, txt: &[(&str, &str)]) -> Kind {
    Kind::Mdns(MdnsSpec {
        host_name: host.into(),
        services: vec![MdnsService {
            instance: instance.into(),
            service_type: service_type.into(),
            port,
            txt: txt
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }],
    })
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, last)
}

fn plan() -> Vec<ClientPlan> {
    let planned = |label, last, kind, category| Planned {
        label,
        ip: ip(last),
        kind,
        category,
    };
    let apple_tv = mdns(
        "Meeting-Room-TV",
        "Meeting Room",
        "_airplay._tcp",
        7000,
        &[("model", "AppleTV14,1")],
    );
    let phone = Kind::Phone(MdnsSpec {
        host_name: "Sams-iPhone".into(),
        services: vec![MdnsService {
            instance: "Sam's iPhone".into(),
            service_type: "_apple-mobdev2._tcp".into(),
            port: 32498,
            txt: Vec::new(),
        }],
    });
    vec![
        ClientPlan {
            client: "acme",
            site: "hq",
            devices: vec![
                planned(
                    "switch",
                    5,
                    Kind::Snmp(snmp(
                        "acme-sw-core",
                        "Cisco IOS Software, C2960X Software (C2960X-UNIVERSALK9-M), Version \
                         15.2(7)E8, RELEASE SOFTWARE (fc3)",
                        ".1.3.6.1.4.1.9.1.1208",
                        "HQ comms room",
                    )),
                    "network",
                ),
                planned(
                    "printer",
                    6,
                    Kind::Snmp(snmp(
                        "acme-print-2f",
                        "HP ETHERNET MULTI-ENVIRONMENT,ROM none,JETDIRECT,JD153,EEPROM \
                         JSI24090012,CIDATE 02/13/2024",
                        ".1.3.6.1.4.1.11.2.3.9.1",
                        "HQ 2nd floor",
                    )),
                    "printer",
                ),
                planned(
                    "file server, two NICs (.10 and .11)",
                    10,
                    Kind::DualNicServer(snmp(
                        "acme-files01",
                        "Linux acme-files01 6.1.0-28-amd64 #1 SMP PREEMPT_DYNAMIC Debian \
                         6.1.119-1 (2024-11-22) x86_64",
                        ".1.3.6.1.4.1.8072.3.2.10",
                        "HQ comms room",
                    )),
                    "server",
                ),
                planned("Apple TV (mDNS)", 20, apple_tv, "media-iot"),
                planned("iPhone, randomized MAC (mDNS)", 30, phone, "phone-tablet"),
                planned(
                    "Samba AD domain controller",
                    40,
                    Kind::DomainController,
                    "unknown",
                ),
                planned(
                    "desktop (cloned VM image)",
                    50,
                    Kind::Plain(Some(CLONED_VM_MAC)),
                    "unknown",
                ),
                planned("desktop", 51, Kind::Plain(None), "unknown"),
                planned("firewalled desktop", 52, Kind::Firewalled, "unknown"),
            ],
        },
        ClientPlan {
            client: "globex",
            site: "office",
            devices: vec![
                planned(
                    "switch",
                    5,
                    Kind::Snmp(snmp(
                        "globex-sw1",
                        "ArubaOS (MODEL: JL256A), Version WC.16.11.0015",
                        ".1.3.6.1.4.1.11.2.3.7.11.181.16",
                        "Office rack",
                    )),
                    "network",
                ),
                planned(
                    "printer",
                    6,
                    Kind::Snmp(snmp(
                        "globex-mfp",
                        "Brother NC-8300h, Firmware Ver.1.11 (21.05.20),MID 8CE-K13,FID 2",
                        ".1.3.6.1.4.1.2435.2.3.9.1",
                        "Office",
                    )),
                    "printer",
                ),
                planned(
                    "desktop (cloned VM image)",
                    50,
                    Kind::Plain(Some(CLONED_VM_MAC)),
                    "unknown",
                ),
                planned("desktop", 51, Kind::Plain(None), "unknown"),
                planned("firewalled desktop", 52, Kind::Firewalled, "unknown"),
            ],
        },
    ]
}

/// An AD account of the demo and whether it must be billed.
struct PlannedUser {
    name: &'static str,
    what: &'static str,
    billed: bool,
}

/// acme's users: one of every kind the billable-user policy decides.
const USERS: &[PlannedUser] = &[
    PlannedUser {
        name: "alice",
        what: "logged on 2 days ago",
        billed: true,
    },
    PlannedUser {
        name: "bruno",
        what: "logged on 5 days ago",
        billed: true,
    },
    PlannedUser {
        name: "nina",
        what: "new hire, created today, never logged on",
        billed: true,
    },
    PlannedUser {
        name: "carl",
        what: "left: disabled",
        billed: false,
    },
    PlannedUser {
        name: "svc-backup",
        what: "service account (has an SPN)",
        billed: false,
    },
    PlannedUser {
        name: "dana",
        what: "contractor, in \"Billing Exclusions\"",
        billed: false,
    },
    PlannedUser {
        name: "frank",
        what: "stale: last logon 400 days ago",
        billed: false,
    },
];

/// A FILETIME (100 ns ticks since 1601) `days` ago, as AD keeps lastLogonTimestamp.
fn filetime_days_ago(days: u64) -> i64 {
    let t = SystemTime::now() - Duration::from_secs(days * 24 * 3600);
    let unix = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (i64::try_from(unix.as_secs()).unwrap_or(0) + 11_644_473_600) * 10_000_000
}

/// Provisions acme's DC and makes its accounts.
fn build_directory<'lab>(lab: &'lab Lab, site: &Site<'lab>, at: Ipv4Addr) -> Result<SambaDc<'lab>> {
    let dc = lab.samba_dc(site, at, REALM)?;
    let password = "Demo-User-Passw0rd!";
    for u in USERS {
        dc.add_user(u.name, password)?;
    }
    dc.disable_user("carl")?;
    dc.add_spn(&format!("http/backup.{REALM}"), "svc-backup")?;
    dc.add_group(EXCLUDED_GROUP)?;
    dc.add_group_members(EXCLUDED_GROUP, &["dana"])?;
    for (name, days) in [
        ("alice", 2),
        ("bruno", 5),
        ("carl", 40),
        ("svc-backup", 1),
        ("dana", 1),
        ("frank", 400),
    ] {
        dc.set_last_logon(name, filetime_days_ago(days))?;
    }
    Ok(dc)
}

/// Builds one client's devices on `site` (all but the DC) and starts their responders.
fn build_devices<'lab>(
    lab: &'lab Lab,
    site: &Site<'lab>,
    plan: &ClientPlan,
) -> Result<Vec<(Planned, Host<'lab>)>> {
    let mut built = Vec::new();
    for d in &plan.devices {
        let host = match &d.kind {
            Kind::DomainController => continue,
            Kind::DualNicServer(spec) => {
                let second = Ipv4Addr::from(u32::from(d.ip) + 1);
                let h = site.add_multihomed_host(HostSpec::new(d.ip), HostSpec::new(second))?;
                h.run_snmpd(spec)?;
                h
            }
            Kind::Snmp(spec) => {
                let h = site.add_host(HostSpec::new(d.ip))?;
                h.run_snmpd(spec)?;
                h
            }
            Kind::Mdns(spec) => {
                let h = site.add_host(HostSpec::new(d.ip))?;
                h.run_mdns(spec)?;
                h
            }
            Kind::Phone(spec) => {
                let h = site.add_host(HostSpec::new(d.ip).with_mac(lab.randomized_mac()?))?;
                h.run_mdns(spec)?;
                h
            }
            Kind::Plain(mac) => {
                let spec = HostSpec::new(d.ip);
                site.add_host(match mac {
                    Some(mac) => spec.with_mac(*mac),
                    None => spec,
                })?
            }
            Kind::Firewalled => site.add_host(HostSpec::new(d.ip).silent())?,
        };
        built.push((d.clone(), host));
    }
    Ok(built)
}

// === The tour ===

/// Where the logs of what the demo ran are, for a failure.
#[derive(Default)]
struct Logs(Vec<(String, PathBuf)>);

impl Logs {
    fn add(&mut self, what: impl Into<String>, path: impl Into<PathBuf>) {
        self.0.push((what.into(), path.into()));
    }

    /// The last lines of every log, for stderr.
    fn tails(&self) -> String {
        let mut out = String::new();
        for (what, path) in &self.0 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL);
            let _ = writeln!(
                out,
                "--- {what} ({}, last {} lines) ---",
                path.display(),
                lines.len() - from
            );
            for l in &lines[from..] {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }
}

fn heading(step: &mut u32, title: &str) {
    *step += 1;
    println!("\n== {step}. {title} ==");
}

/// Runs `census ARGS` as an operator would type it, showing the command line and its output.
fn census(collector: &Collector<'_>, args: &[&str]) -> Result<String> {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                (*a).to_owned()
            }
        })
        .collect();
    println!("\n$ census {}", shown.join(" "));
    let out = collector.census_ok(args)?;
    print!("{out}");
    Ok(out)
}

/// The agent's config file for a site, as an MSP would write it on the site's machine.
fn agent_config(
    dir: &Path,
    collector: &Collector<'_>,
    token_file: &Path,
    dc: Option<&SambaDc<'_>>,
) -> Result<PathBuf> {
    let mut toml = format!(
        "collector = \"{}\"\nca_file = {:?}\ntoken_file = {:?}\nstate_dir = {:?}\nscopes = \
         [\"{SUBNET}\"]\n\n[snmp]\ncommunities = [\"{COMMUNITY}\"]\n",
        collector.url(),
        collector.ca_file(),
        token_file,
        dir.join("state"),
    );
    if let Some(dc) = dc {
        let password = dir.join("bind.password");
        std::fs::write(&password, format!("{}\n", dc.admin_password()))
            .context("writing the bind password file")?;
        write!(
            toml,
            "\n[directory]\nenabled = true\nurl = \"{}\"\nbind_dn = \"{}\"\npassword_file = \
             {:?}\nca_file = {:?}\n",
            dc.url(),
            dc.admin_upn(),
            password,
            dc.ca_file()
        )?;
    }
    let state = dir.join("state");
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let path = dir.join("agent.toml");
    std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The person one of whose accounts is `sam` (`sam` or `sam@...`) in `census users --json`.
fn person<'a>(listing: &'a Value, sam: &str) -> Option<&'a Value> {
    let prefix = format!("{sam}@");
    listing["users"].as_array()?.iter().find(|u| {
        u["accounts"].as_array().is_some_and(|accounts| {
            accounts.iter().any(|a| {
                a["name"].as_str().is_some_and(|n| {
                    n.eq_ignore_ascii_case(sam) || n.to_ascii_lowercase().starts_with(&prefix)
                })
            })
        })
    })
}

/// The current billing period, `YYYY-MM`.
fn this_month() -> String {
    let now = census_proto::convert::unix_millis(SystemTime::now());
    census_collector::snapshot::rfc3339(now)[..7].to_owned()
}

/// What was built against what Census says, one line each.
#[derive(Default)]
struct Checks {
    failed: usize,
    passed: usize,
}

impl Checks {
    fn check(&mut self, what: &str, expected: impl ToString, census: impl ToString) {
        let (expected, census) = (expected.to_string(), census.to_string());
        if expected == census {
            self.passed += 1;
            println!("  ok    {what}: {census}");
        } else {
            self.failed += 1;
            println!("  FAIL  {what}: expected {expected}, Census says {census}");
        }
    }
}

fn tour(lab: &Lab, logs: &mut Logs) -> Result<()> {
    let plans = plan();
    let subnet: Ipv4Net = SUBNET.parse()?;
    let mut step = 0;

    heading(
        &mut step,
        &format!("Two clients, one subnet: building both sites on {subnet}"),
    );
    let mut sites = Vec::new();
    for p in &plans {
        let site = lab.add_site(SiteSpec::new(
            format!("{}-{}", p.client, p.site),
            subnet,
            AGENT_IP,
        ))?;
        sites.push(site);
    }
    let acme_index = plans
        .iter()
        .position(ClientPlan::has_dc)
        .context("no client has the DC")?;
    let dc_ip = plans[acme_index]
        .devices
        .iter()
        .find(|d| matches!(d.kind, Kind::DomainController))
        .map(|d| d.ip)
        .context("no DC planned")?;

    // The DC takes the longest to provision: it is built while everything else is.
    let (dc, built) = std::thread::scope(|s| -> Result<_> {
        let dc_site = &sites[acme_index];
        let dc = s.spawn(move || build_directory(lab, dc_site, dc_ip));
        let mut built = Vec::new();
        for (p, site) in plans.iter().zip(&sites) {
            built.push(build_devices(lab, site, p)?);
        }
        let dc = dc
            .join()
            .map_err(|_| anyhow::anyhow!("building the DC panicked"))??;
        Ok((dc, built))
    })?;
    for (p, devices) in plans.iter().zip(&built) {
        println!(
            "  client {:<7} site {:<7} agent at {AGENT_IP}, {} devices:",
            p.client,
            p.site,
            p.devices.len()
        );
        for d in &p.devices {
            let mac = match devices.iter().find(|(b, _)| b.ip == d.ip) {
                Some((_, h)) => mac_string(h.mac()),
                // The lab made the DC's host itself.
                None => lab
                    .exec_ok(dc.ns(), ["cat", "/sys/class/net/eth0/address"])?
                    .trim()
                    .to_owned(),
            };
            println!("    {:<14} {:<19} {}", d.ip, mac, d.label);
        }
    }
    println!(
        "  {}'s Active Directory {REALM}, read by its agent over LDAPS:",
        plans[acme_index].client
    );
    for u in USERS {
        println!("    {:<34} {}", format!("{}@{REALM}", u.name), u.what);
    }

    heading(
        &mut step,
        "The collector, an enrollment token per site, acme's user policy",
    );
    let collector = Collector::start(lab, &lab.dir().join("collector"))?;
    if let Some(log) = collector.proc().log_path() {
        logs.add("collector", log);
    }
    println!("  collector listening on {}", collector.url());
    println!(
        "  census is pointed at it with --collector URL --credentials DIR (or CENSUS_COLLECTOR_URL\n  \
         and CENSUS_CREDENTIALS); the command lines below leave them out. DIR here:\n  {}",
        collector.credentials().display()
    );
    let mut configs = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        let dir = support::lab_dir(lab, &format!("{}-{}-", p.client, p.site))?;
        println!(
            "\n$ census token create --client {} --site {} > {}/token",
            p.client,
            p.site,
            dir.display()
        );
        let token = collector.token(p.client, p.site)?;
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{token}\n")).context("writing the token file")?;
        let config = agent_config(
            &dir,
            &collector,
            &token_file,
            (i == acme_index).then_some(&dc),
        )?;
        configs.push(config);
    }
    census(
        &collector,
        &[
            "users",
            "policy",
            "set",
            "--client",
            plans[acme_index].client,
            "--exclusion-groups",
            EXCLUDED_GROUP,
        ],
    )?;

    heading(
        &mut step,
        "One agent per site: enroll with the token, sweep, read the directory",
    );
    let acme_config = &configs[acme_index];
    println!("  {}:", acme_config.display());
    for line in std::fs::read_to_string(acme_config)?.lines() {
        println!("    {line}");
    }
    // Both sites sweep at once, as they would at two clients.
    let outputs = std::thread::scope(|s| {
        let runs: Vec<_> = sites
            .iter()
            .zip(&configs)
            .map(|(site, config)| {
                let ns = site.agent().ns().to_owned();
                s.spawn(move || {
                    support::agent_once(
                        lab,
                        &ns,
                        [std::ffi::OsStr::new("--config"), config.as_os_str()],
                    )
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| {
                r.join()
                    .map_err(|_| anyhow::anyhow!("an agent run panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    for ((p, config), out) in plans.iter().zip(&configs).zip(&outputs) {
        let log = config.with_file_name("agent.log");
        std::fs::write(&log, &out.stderr).context("writing an agent's log")?;
        logs.add(format!("agent of {}/{}", p.client, p.site), &log);
        println!(
            "\n[{}/{} agent] $ census-agent run --once --config {}",
            p.client,
            p.site,
            config.display()
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
        ensure!(
            out.status.success(),
            "the agent of {}/{} failed ({}); its log is printed above",
            p.client,
            p.site,
            out.status
        );
    }

    heading(&mut step, "What each client is billed for");
    census(&collector, &["counts"])?;
    let acme = plans[acme_index].client;

    heading(
        &mut step,
        "One device's evidence: the dual-NIC server is one device",
    );
    let devices = collector.devices(acme)?;
    let server_mac = built[acme_index]
        .iter()
        .find(|(d, _)| matches!(d.kind, Kind::DualNicServer(_)))
        .map(|(_, h)| mac_string(h.mac()))
        .context("no server built")?;
    let server = devices
        .iter()
        .find(|d| d.macs.contains(&server_mac))
        .with_context(|| format!("no device of {acme} has the server's MAC {server_mac}"))?;
    census(&collector, &["device", "--client", acme, &server.id])?;

    heading(&mut step, "Users: who is billed, and why");
    census(&collector, &["users", "--client", acme])?;

    heading(
        &mut step,
        "The month's billing snapshot, exported for the PSA",
    );
    let period = this_month();
    census(
        &collector,
        &["snapshot", "create", "--client", acme, "--period", &period],
    )?;
    let csv = census(
        &collector,
        &[
            "snapshot", "export", "--client", acme, "--period", &period, "--format", "csv",
        ],
    )?;
    let users_csv = census(
        &collector,
        &[
            "snapshot",
            "export",
            "--client",
            acme,
            "--period",
            &period,
            "--format",
            "users-csv",
        ],
    )?;

    heading(&mut step, "Every number against what was built");
    let mut checks = Checks::default();
    let counts = collector.counts()?;
    let expected_users = USERS.iter().filter(|u| u.billed).count();
    // The ids of the devices holding the cloned VM's MAC, over both clients.
    let mut clones = Vec::new();
    for p in &plans {
        let c = counts.iter().find(|c| c.client == p.client);
        checks.check(
            &format!("{} devices", p.client),
            p.devices.len(),
            c.map_or(0, |c| c.devices),
        );
        let json = collector.census_ok(["counts", "--client", p.client, "--json"])?;
        let rows: Value = serde_json::from_str(&json).context("parsing census counts --json")?;
        let by = &rows[0]["devices_by_category"];
        let mut categories: Vec<String> = by
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        for (category, n) in p.categories() {
            checks.check(
                &format!("{} {category}", p.client),
                n,
                by[category].as_u64().unwrap_or(0),
            );
            categories.retain(|c| c != category);
        }
        for other in categories {
            checks.check(
                &format!("{} {other}", p.client),
                0,
                by[&other].as_u64().unwrap_or(0),
            );
        }
        let users = if p.has_dc() { expected_users } else { 0 };
        checks.check(
            &format!("{} users", p.client),
            users,
            c.map_or(0, |c| c.users),
        );
        let listed: Vec<Device> = collector.devices(p.client)?;
        let no_reason: Vec<String> = listed
            .iter()
            .filter(|d| d.category_reason.trim().is_empty())
            .map(|d| d.address_list().join("+"))
            .collect();
        checks.check(
            &format!("{} devices without a reason for their category", p.client),
            "none",
            if no_reason.is_empty() {
                "none".to_owned()
            } else {
                no_reason.join(", ")
            },
        );
        let clone = mac_string(CLONED_VM_MAC);
        clones.extend(
            listed
                .iter()
                .filter(|d| d.macs.contains(&clone))
                .map(|d| d.id.clone()),
        );
    }
    clones.sort();
    clones.dedup();
    checks.check(
        "the cloned VM (one MAC at both clients): one device per client",
        plans
            .iter()
            .filter(|p| {
                p.devices
                    .iter()
                    .any(|d| matches!(d.kind, Kind::Plain(Some(mac)) if mac == CLONED_VM_MAC))
            })
            .count(),
        clones.len(),
    );
    checks.check(
        &format!("{acme} server: one device with both NICs"),
        "2 MACs, 2 addresses",
        format!(
            "{} MACs, {} addresses",
            server.macs.len(),
            server.addresses.len()
        ),
    );
    let phone = built[acme_index]
        .iter()
        .find(|(d, _)| matches!(d.kind, Kind::Phone(_)))
        .map(|(_, h)| mac_string(h.mac()))
        .context("no phone built")?;
    checks.check(
        &format!("{acme} phone: counted through its randomized MAC and mDNS name"),
        "counted",
        devices
            .iter()
            .find(|d| d.macs.contains(&phone))
            .map_or("missing", |d| {
                if d.counted && d.weak_only {
                    "counted"
                } else {
                    "not counted"
                }
            }),
    );
    let listing = collector.users(acme)?;
    for u in USERS {
        let counted = person(&listing, u.name).map(|p| p["counted"] == true);
        checks.check(
            &format!("{acme} user {} ({})", u.name, u.what),
            if u.billed { "billed" } else { "not billed" },
            match counted {
                Some(true) => "billed",
                Some(false) => "not billed",
                None => "missing",
            },
        );
    }
    let acme_devices = plans[acme_index].devices.len();
    checks.check(
        &format!("{acme} snapshot CSV device rows"),
        acme_devices,
        csv.lines().count().saturating_sub(1),
    );
    checks.check(
        &format!("{acme} snapshot CSV user rows"),
        expected_users,
        users_csv.lines().count().saturating_sub(1),
    );

    if checks.failed > 0 {
        bail!(
            "{} of {} checks differ from what was built (the FAIL lines above)",
            checks.failed,
            checks.failed + checks.passed
        );
    }
    println!("\nAll {} checks match what was built.", checks.passed);
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM until `done`: on one, removes everything the lab built and
/// exits 130, since the thread running the tour may be blocked in a command for a while.
fn remove_lab_on_signal(lab: &Lab, done: &CancellationToken) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!(
                "census-demo: warning: no signal handling ({e}): Ctrl-C leaves the lab to the next run to remove"
            );
            return;
        }
    };
    let signalled = runtime.block_on(async {
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            done.cancelled().await;
            return false;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => true,
            _ = term.recv() => true,
            () = done.cancelled() => false,
        }
    });
    if signalled {
        eprintln!("\ncensus-demo: interrupted: removing everything the demo built");
        lab.teardown();
        lab.remove_dir();
        std::process::exit(130);
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let lab = match Lab::new() {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("census-demo: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut logs = Logs::default();
    let done = CancellationToken::new();
    let result = std::thread::scope(|s| {
        let watcher = done.clone();
        let lab = &lab;
        s.spawn(move || remove_lab_on_signal(lab, &watcher));
        let result = tour(lab, &mut logs);
        done.cancel();
        result
    });
    if let Err(e) = &result {
        eprint!("\n{}", logs.tails());
        eprintln!("census-demo: error: {e:#}");
    }
    let namespaces = lab.namespaces().len();
    drop(lab);
    println!(
        "\nRemoved everything the demo built ({namespaces} network namespaces, their processes, \
         the lab's directory). {} s in all.",
        started.elapsed().as_secs()
    );
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
