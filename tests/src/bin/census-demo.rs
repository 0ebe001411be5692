//! `census-demo`: Census's main job, end to end, on simulated client sites.
//!
//! Builds two client sites whose LANs use the same 198.18.0.0/24 (as two real clients with
//! overlapping private ranges would), starts the collector and one agent per site in network
//! namespaces, sweeps once, and prints the per-client counts and devices. Everything it built
//! is removed when it ends, even on failure. Needs root (it creates network namespaces); run it
//! through `deploy/demo.sh`, which builds and installs what it needs first.

use std::{net::Ipv4Addr, process::ExitCode};

use anyhow::{Context, Result, bail};
use census_tests::{
    lab::{HostSpec, Lab, SiteSpec},
    support::{self, Collector},
};

/// (client, site, live hosts) for each simulated site.
const SITES: &[(&str, &str, u32)] = &[("acme", "hq", 12), ("globex", "office", 7)];

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("census-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<()> {
    let lab = Lab::new()?;
    let subnet = "198.18.0.0/24".parse()?;
    let agent_ip: Ipv4Addr = "198.18.0.2".parse()?;
    println!(
        "Building {} simulated client sites, all on {subnet}:",
        SITES.len()
    );
    let mut sites = Vec::new();
    for &(client, site_name, hosts) in SITES {
        let site = lab.add_site(SiteSpec::new(
            format!("{client}-{site_name}"),
            subnet,
            agent_ip,
        ))?;
        // Hosts from .10; every fourth one drops ICMP (ARP finds it all the same).
        let specs = HostSpec::range("198.18.0.10".parse()?, hosts)
            .into_iter()
            .enumerate()
            .map(|(i, h)| if i % 4 == 3 { h.silent() } else { h });
        site.add_hosts(specs)?;
        println!(
            "  client {client:<8} site {site_name:<8} {hosts:>3} hosts on {subnet}, agent at {agent_ip}"
        );
        sites.push((client, site_name, hosts, site));
    }

    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    println!("Collector listening on {}", collector.url());

    for (client, site_name, _, site) in &sites {
        // A single-use token, traded by `census-agent enroll` for the agent's certificate.
        let state = collector.enroll(client, site_name)?;
        println!("Agent for {client}/{site_name}: sweeping {subnet} with ARP...");
        let out = support::agent_once(
            &lab,
            site.agent().ns(),
            [
                "--collector",
                &collector.url(),
                "--state-dir",
                state.to_str().context("state path is not UTF-8")?,
                "--scope",
                &subnet.to_string(),
            ],
        )?;
        if !out.status.success() {
            bail!(
                "the agent for {client} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        print!("  {}", String::from_utf8_lossy(&out.stdout));
    }

    println!("\n$ census agents");
    print!("{}", collector.census_ok(["agents"])?);
    println!("\n$ census counts");
    print!("{}", collector.census_ok(["counts"])?);
    for (client, _, _, _) in &sites {
        println!("\n$ census devices --client {client}");
        print!("{}", collector.census_ok(["devices", "--client", client])?);
    }

    let mut wrong = Vec::new();
    for (client, _, hosts, _) in &sites {
        let got = collector.devices_of(client)?;
        if got != u64::from(*hosts) {
            wrong.push(format!("{client}: counted {got}, built {hosts}"));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "counts differ from the simulated sites: {}",
            wrong.join("; ")
        );
    }
    println!("\nEvery client's count equals the hosts built at its site. Cleaning up.");
    Ok(())
}
