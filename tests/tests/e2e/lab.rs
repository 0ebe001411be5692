//! Self-tests of the lab: overlapping sites stay apart, ICMP-silent hosts still answer ARP,
//! snmpd answers v2c and v3 (and not a wrong community), serves a chassis serial and model, and
//! authenticates v3 users of every protocol net-snmp has, routers route, mDNS is browsable,
//! only 198.18.0.0/15 is accepted, commands run only in the lab's own namespaces, and nothing
//! is left behind after a drop or a panic. The identity features: a multi-homed host answers
//! each address with its own MAC and one snmpd lists both, hosts change address and MAC,
//! randomized MACs are locally administered, a VRRP virtual address is answered with the VRRP
//! MAC only, and a proxy-ARP router answers for the subnet carved out of the LAN.

use std::net::Ipv4Addr;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use census_tests::lab::{
    HostSpec, Ipv4Net, Lab, MdnsService, MdnsSpec, RouterSpec, SiteSpec, SnmpAuth, SnmpPriv,
    SnmpV3User, SnmpdSpec, is_locally_administered, mac_string, namespaces_with_prefix, vrrp_mac,
};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("test subnet")
}

/// One ping from `ns`; true when answered.
fn ping(lab: &Lab, ns: &str, to: Ipv4Addr) -> Result<bool> {
    let out = lab.exec(ns, ["ping", "-n", "-c", "1", "-W", "2", &to.to_string()])?;
    Ok(out.status.success())
}

/// `ip neigh show <ip>` in `ns`.
fn neighbour(lab: &Lab, ns: &str, of: Ipv4Addr) -> Result<String> {
    lab.exec_ok(ns, ["ip", "neigh", "show", &of.to_string()])
}

/// sysName.0 of `target` as seen from `ns`, or `None` when there is no answer.
fn sys_name(lab: &Lab, ns: &str, auth: &[String], target: Ipv4Addr) -> Result<Option<String>> {
    snmp(lab, ns, "snmpget", auth, target, "1.3.6.1.2.1.1.5.0")
}

/// `tool` (`snmpget`, `snmpbulkwalk`, ...) of `oid` at `target` from `ns`, values only, one
/// per line and unquoted; `None` when there is no answer.
fn snmp(
    lab: &Lab,
    ns: &str,
    tool: &str,
    auth: &[String],
    target: Ipv4Addr,
    oid: &str,
) -> Result<Option<String>> {
    let mut args: Vec<String> = vec![tool.into(), "-Oqv".into()];
    args.extend(auth.iter().cloned());
    args.extend(["-r", "0", "-t", "1", &target.to_string(), oid].map(String::from));
    let out = lab.exec(ns, &args)?;
    Ok(out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().trim_matches('"'))
            .collect::<Vec<_>>()
            .join("\n")
    }))
}

fn v2c(community: &str) -> Vec<String> {
    vec!["-v2c".into(), "-c".into(), community.into()]
}

#[test]
fn overlapping_sites_are_isolated() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let lan = net("198.18.0.0/24");
    let a = lab.add_site(SiteSpec::new("client-a", lan, ip("198.18.0.2")))?;
    let b = lab.add_site(SiteSpec::new("client-b", lan, ip("198.18.0.2")))?;
    let mac_a = [0x00, 0x16, 0x3e, 0xaa, 0x00, 0x0a];
    let mac_b = [0x00, 0x16, 0x3e, 0xbb, 0x00, 0x0a];
    let host = ip("198.18.0.10");
    a.add_host(HostSpec::new(host).with_mac(mac_a))?;
    b.add_host(HostSpec::new(host).with_mac(mac_b))?;

    for (site, mine, theirs) in [(&a, mac_a, mac_b), (&b, mac_b, mac_a)] {
        let agent = site.agent().ns();
        ensure!(
            ping(&lab, agent, host)?,
            "{} cannot ping its host",
            site.name()
        );
        let neigh = neighbour(&lab, agent, host)?;
        ensure!(
            neigh.contains(&mac_string(mine)) && !neigh.contains(&mac_string(theirs)),
            "{} sees the wrong MAC for {host}: {neigh}",
            site.name()
        );
        ensure!(
            ping(&lab, agent, lab.collector_ip())?,
            "{} cannot reach the core",
            site.name()
        );
    }
    ensure!(
        a.agent().uplink_ip() != b.agent().uplink_ip(),
        "uplinks must differ"
    );
    Ok(())
}

#[test]
fn silent_host_answers_arp_but_not_ping() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "quiet",
        net("198.18.4.0/24"),
        ip("198.18.4.2"),
    ))?;
    let host = site.add_host(HostSpec::new(ip("198.18.4.20")).silent())?;
    let agent = site.agent().ns();
    ensure!(
        !ping(&lab, agent, host.ip())?,
        "a silent host answered ping"
    );
    let neigh = neighbour(&lab, agent, host.ip())?;
    ensure!(
        neigh.contains(&mac_string(host.mac())) && !neigh.contains("FAILED"),
        "the silent host did not answer ARP: {neigh:?}"
    );
    Ok(())
}

#[test]
fn snmpd_answers_v2c_and_v3() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "snmp",
        net("198.18.8.0/24"),
        ip("198.18.8.2"),
    ))?;
    let host = site.add_host(HostSpec::new(ip("198.18.8.30")))?;
    let user = SnmpV3User::new("census", "auth-secret-1", "priv-secret-1");
    let spec = SnmpdSpec {
        engine_id: Some(vec![0x80, 0x00, 0x1f, 0x88, 0x04, 0x63, 0x65, 0x6e]),
        v3_user: Some(user.clone()),
        ..SnmpdSpec::v2c("lab-public", "switch-30")
    };
    let snmpd = host.run_snmpd(&spec)?;
    let agent = site.agent().ns();

    let name = sys_name(&lab, agent, &v2c("lab-public"), host.ip())?;
    ensure!(
        name.as_deref() == Some("switch-30"),
        "v2c sysName: {name:?}\n{}",
        snmpd.log()
    );
    let wrong = sys_name(&lab, agent, &v2c("private"), host.ip())?;
    ensure!(wrong.is_none(), "a wrong community was answered: {wrong:?}");
    let name = sys_name(&lab, agent, &user.snmpget_args(), host.ip())?;
    ensure!(
        name.as_deref() == Some("switch-30"),
        "v3 sysName: {name:?}\n{}",
        snmpd.log()
    );
    let engine = lab.exec_ok(
        agent,
        [
            "snmpget",
            "-Oqv",
            "-v2c",
            "-c",
            "lab-public",
            &host.ip().to_string(),
        ]
        .into_iter()
        .chain(["1.3.6.1.6.3.10.2.1.1.0"]),
    )?;
    ensure!(
        engine.to_lowercase().contains("80 00 1f 88 04 63 65 6e"),
        "engine ID: {engine}"
    );

    // A responder can be stopped early, e.g. to test a device that goes away.
    snmpd.kill()?;
    ensure!(!snmpd.is_running(), "snmpd still running after kill");
    let gone = sys_name(&lab, agent, &v2c("lab-public"), host.ip())?;
    ensure!(gone.is_none(), "a killed snmpd answered: {gone:?}");
    Ok(())
}

/// The chassis entry of ENTITY-MIB (class, serial, model at index 1) over v2c and v1, by GET and
/// by a GETBULK walk of the table, as the probe walks it; and none without a serial or model.
#[test]
fn snmpd_serves_serial_and_model() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "entity",
        net("198.18.36.0/24"),
        ip("198.18.36.2"),
    ))?;
    let host = site.add_host(HostSpec::new(ip("198.18.36.10")))?;
    let plain = site.add_host(HostSpec::new(ip("198.18.36.11")))?;
    let snmpd = host.run_snmpd(&SnmpdSpec {
        serial: Some("FOC1234X0AB".into()),
        model: Some("Lab Switch 24".into()),
        ..SnmpdSpec::v2c("lab-public", "switch-10")
    })?;
    plain.run_snmpd(&SnmpdSpec::v2c("lab-public", "plain-11"))?;
    let agent = site.agent().ns();
    let v1 = vec!["-v1".to_string(), "-c".into(), "lab-public".into()];
    for auth in [v2c("lab-public"), v1] {
        let serial = snmp(
            &lab,
            agent,
            "snmpget",
            &auth,
            host.ip(),
            "1.3.6.1.2.1.47.1.1.1.1.11.1",
        )?;
        ensure!(
            serial.as_deref() == Some("FOC1234X0AB"),
            "serial over {auth:?}: {serial:?}\n{}",
            snmpd.log()
        );
        let model = snmp(
            &lab,
            agent,
            "snmpget",
            &auth,
            host.ip(),
            "1.3.6.1.2.1.47.1.1.1.1.13.1",
        )?;
        ensure!(
            model.as_deref() == Some("Lab Switch 24"),
            "model over {auth:?}: {model:?}"
        );
    }
    // GETBULK walk of entPhysicalEntry: class chassis(3), serial, model, in column order.
    let entry = snmp(
        &lab,
        agent,
        "snmpbulkwalk",
        &v2c("lab-public"),
        host.ip(),
        "1.3.6.1.2.1.47.1.1.1.1",
    )?;
    ensure!(
        entry.as_deref() == Some("3\nFOC1234X0AB\nLab Switch 24"),
        "entPhysicalEntry: {entry:?}"
    );
    // GETNEXT walk of one column, the way a v1 device is walked.
    let column = snmp(
        &lab,
        agent,
        "snmpwalk",
        &["-v1".to_string(), "-c".into(), "lab-public".into()],
        host.ip(),
        "1.3.6.1.2.1.47.1.1.1.1.11",
    )?;
    ensure!(
        column.as_deref() == Some("FOC1234X0AB"),
        "entPhysicalSerialNum: {column:?}"
    );
    let none = snmp(
        &lab,
        agent,
        "snmpbulkwalk",
        &v2c("lab-public"),
        plain.ip(),
        "1.3.6.1.2.1.47",
    )?;
    ensure!(
        none.as_deref().is_some_and(|v| !v.contains("FOC")),
        "an snmpd without a serial: {none:?}"
    );
    Ok(())
}

/// A v3 user of each pairing that matters (SHA-2 with AES-256 and AES-128, the legacy MD5 with
/// DES, SHA-1 with AES-192 and its key extension, authNoPriv), each on an snmpd of its own, is
/// answered with its own protocols and pass phrases and refused with another protocol.
#[test]
fn snmpd_answers_v3_users_of_every_protocol() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "snmpv3",
        net("198.18.38.0/24"),
        ip("198.18.38.2"),
    ))?;
    let pairs = [
        (SnmpAuth::Sha256, SnmpPriv::Aes256),
        (SnmpAuth::Sha512, SnmpPriv::Aes),
        (SnmpAuth::Md5, SnmpPriv::Des),
        (SnmpAuth::Sha, SnmpPriv::Aes192),
        (SnmpAuth::Sha384, SnmpPriv::None),
        (SnmpAuth::Sha224, SnmpPriv::Aes),
    ];
    let hosts = site.add_hosts(
        (0u8..)
            .zip(pairs)
            .map(|(i, _)| HostSpec::new(Ipv4Addr::new(198, 18, 38, 10 + i))),
    )?;
    let agent = site.agent().ns();
    for (host, (auth, privacy)) in hosts.iter().zip(pairs) {
        let user = SnmpV3User::new("census", "auth-secret-1", "priv-secret-1")
            .with_protocols(auth, privacy);
        let sys = format!("v3-{}", host.ip().octets()[3]);
        let snmpd = host.run_snmpd(&SnmpdSpec {
            communities: Vec::new(),
            v3_user: Some(user.clone()),
            ..SnmpdSpec::v2c("unused", &sys)
        })?;
        let name = sys_name(&lab, agent, &user.snmpget_args(), host.ip())?;
        ensure!(
            name.as_deref() == Some(sys.as_str()),
            "{auth:?}/{privacy:?}: sysName {name:?}\n{}",
            snmpd.log()
        );
        let other_auth = if auth == SnmpAuth::Md5 {
            SnmpAuth::Sha
        } else {
            SnmpAuth::Md5
        };
        let wrong = user.clone().with_protocols(other_auth, privacy);
        let refused = sys_name(&lab, agent, &wrong.snmpget_args(), host.ip())?;
        ensure!(
            refused.is_none(),
            "{auth:?}/{privacy:?} answered {other_auth:?}: {refused:?}"
        );
        let bad_pass = SnmpV3User {
            auth_pass: "wrong-secret-1".into(),
            ..user.clone()
        };
        let refused = sys_name(&lab, agent, &bad_pass.snmpget_args(), host.ip())?;
        ensure!(
            refused.is_none(),
            "{auth:?}/{privacy:?} answered a wrong pass phrase: {refused:?}"
        );
        let v2 = sys_name(&lab, agent, &v2c("unused"), host.ip())?;
        ensure!(v2.is_none(), "a v3-only snmpd answered v2c: {v2:?}");
    }
    Ok(())
}

/// `exec`, `spawn`, `command` and `spawn_command` run only in this lab's own namespaces: not in
/// another lab's, not in one that does not exist, and `spawn_command` nothing not made by
/// `command`.
#[test]
fn commands_run_only_in_the_labs_own_namespaces() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let other = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "own",
        net("198.18.46.0/24"),
        ip("198.18.46.2"),
    ))?;
    let agent = site.agent().ns();
    ensure!(lab.exec_ok(agent, ["true"]).is_ok(), "its own namespace");
    let foreign = [other.core_ns(), "cz1x1-core", "", "default"];
    for ns in foreign {
        let message = lab
            .exec(ns, ["true"])
            .err()
            .map(|e| format!("{e:#}"))
            .with_context(|| format!("exec in {ns:?} was accepted"))?;
        ensure!(
            message.contains("not one of lab") && !message.contains('\n'),
            "unclear refusal: {message}"
        );
        ensure!(lab.exec_ok(ns, ["true"]).is_err(), "exec_ok in {ns:?}");
        ensure!(
            lab.exec_timeout(ns, ["true"], Duration::from_secs(5))
                .is_err(),
            "exec_timeout in {ns:?}"
        );
        ensure!(lab.spawn(ns, ["sleep", "60"]).is_err(), "spawn in {ns:?}");
        let refused = lab
            .spawn_command(lab.command(ns, "sleep"))
            .err()
            .map(|e| format!("{e:#}"))
            .with_context(|| format!("command in {ns:?} was spawned"))?;
        ensure!(refused.contains("not one of lab"), "{refused}");
        // Run directly, a refused command cannot start.
        ensure!(
            lab.command(ns, "true").status().is_err(),
            "a refused command started"
        );
    }
    let root = lab
        .spawn_command(std::process::Command::new("true"))
        .err()
        .context("a command in the machine's namespace was spawned")?;
    ensure!(
        format!("{root:#}").contains("Lab::command"),
        "unclear refusal: {root:#}"
    );
    ensure!(
        lab.spawn_command(other.command(other.core_ns(), "sleep"))
            .is_err(),
        "another lab's command was spawned"
    );
    let mut own = lab.command(agent, "sleep");
    own.arg("60");
    let proc = lab.spawn_command(own)?;
    ensure!(proc.is_running(), "its own command did not start");
    Ok(())
}

#[test]
fn router_routes_to_its_subnet() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "routed",
        net("198.18.12.0/24"),
        ip("198.18.12.2"),
    ))?;
    let router = site.add_router(RouterSpec {
        lan_ip: ip("198.18.12.1"),
        routed_subnet: net("198.18.13.0/24"),
        routed_ip: ip("198.18.13.1"),
        lan_mac: None,
    })?;
    let far = router.add_host(HostSpec::new(ip("198.18.13.40")))?;
    router.run_snmpd(&SnmpdSpec::v2c("lab-public", "edge-router"))?;
    // An agent added after the router gets the route too.
    let second = site.add_agent(ip("198.18.12.3"))?;

    for agent in [site.agent().ns(), second.ns()] {
        ensure!(
            ping(&lab, agent, far.ip())?,
            "{agent} cannot ping {} behind the router",
            far.ip()
        );
    }
    let name = sys_name(&lab, site.agent().ns(), &v2c("lab-public"), router.lan_ip())?;
    ensure!(
        name.as_deref() == Some("edge-router"),
        "router sysName: {name:?}"
    );
    // The router learnt the far host's MAC while forwarding: what an SNMP ARP-cache read shows.
    let neigh = neighbour(&lab, router.ns(), far.ip())?;
    ensure!(
        neigh.contains(&mac_string(far.mac())),
        "router ARP cache: {neigh:?}"
    );
    Ok(())
}

/// Browses DNS-SD from `ns` with Debian's python3-zeroconf; prints `name port address`.
const BROWSE: &str = r#"
import socket, sys, time
from zeroconf import IPVersion, ServiceBrowser, Zeroconf
ip, kind = sys.argv[1], sys.argv[2]
found = []
class Listener:
    def add_service(self, zc, t, name): found.append(name)
    def update_service(self, zc, t, name): pass
    def remove_service(self, zc, t, name): pass
zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
ServiceBrowser(zc, kind, Listener())
deadline = time.time() + 10
while not found and time.time() < deadline:
    time.sleep(0.1)
for name in found:
    info = zc.get_service_info(kind, name, timeout=3000)
    addrs = [socket.inet_ntoa(a) for a in info.addresses] if info else []
    print(name, info.port if info else "-", *addrs)
zc.close()
"#;

#[test]
fn mdns_service_is_browsable() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "mdns",
        net("198.18.16.0/24"),
        ip("198.18.16.2"),
    ))?;
    let host = site.add_host(HostSpec::new(ip("198.18.16.50")))?;
    host.run_mdns(&MdnsSpec {
        host_name: "printer-50".into(),
        services: vec![MdnsService {
            instance: "Lab Printer".into(),
            service_type: "_ipp._tcp".into(),
            port: 631,
            txt: vec![("ty".into(), "Lab Laser".into())],
        }],
    })?;
    let agent = site.agent();
    let found = lab.exec_ok(
        agent.ns(),
        [
            "/usr/bin/python3",
            "-I",
            "-c",
            BROWSE,
            &agent.ip().to_string(),
            "_ipp._tcp.local.",
        ],
    )?;
    ensure!(
        found.contains("Lab Printer._ipp._tcp.local. 631 198.18.16.50"),
        "browse found: {found:?}"
    );
    Ok(())
}

#[test]
fn only_the_benchmarking_range_is_accepted() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let outside = lab.add_site(SiteSpec::new("bad", net("10.0.0.0/24"), ip("10.0.0.2")));
    ensure!(outside.is_err(), "a site in 10.0.0.0/24 was accepted");
    let core = lab.add_site(SiteSpec::new(
        "bad",
        net("198.19.255.0/24"),
        ip("198.19.255.9"),
    ));
    ensure!(core.is_err(), "a site overlapping the core was accepted");
    let site = lab.add_site(SiteSpec::new(
        "ok",
        net("198.18.20.0/24"),
        ip("198.18.20.2"),
    ))?;
    ensure!(
        site.add_host(HostSpec::new(ip("192.168.1.5"))).is_err(),
        "192.168.1.5 accepted"
    );
    ensure!(
        site.add_host(HostSpec::new(ip("198.18.21.5"))).is_err(),
        "off-subnet host accepted"
    );
    let router = site.add_router(RouterSpec {
        lan_ip: ip("198.18.20.1"),
        routed_subnet: net("172.16.0.0/24"),
        routed_ip: ip("172.16.0.1"),
        lan_mac: None,
    });
    ensure!(router.is_err(), "a router to 172.16.0.0/24 was accepted");
    let message = format!("{:#}", outside.err().context("no error")?);
    ensure!(
        message.contains("198.18.0.0/15"),
        "unclear error: {message}"
    );
    Ok(())
}

#[test]
fn hundred_hosts_build_in_seconds() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let started = Instant::now();
    let site = lab.add_site(SiteSpec::new(
        "bulk",
        net("198.18.24.0/24"),
        ip("198.18.24.2"),
    ))?;
    let hosts = site.add_hosts(HostSpec::range(ip("198.18.24.10"), 100))?;
    let built = started.elapsed();
    eprintln!("a site with {} hosts built in {built:?}", hosts.len());
    ensure!(hosts.len() == 100, "got {} hosts", hosts.len());
    let last = hosts.last().context("no hosts")?;
    ensure!(
        ping(&lab, site.agent().ns(), last.ip())?,
        "the last host does not answer"
    );
    // Generous: the point is "seconds, not minutes", even with other tests running in parallel.
    ensure!(
        built < Duration::from_secs(60),
        "building 100 hosts took {built:?}"
    );
    Ok(())
}

#[test]
fn drop_removes_namespaces_and_processes() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "gone",
        net("198.18.28.0/24"),
        ip("198.18.28.2"),
    ))?;
    let host = site.add_host(HostSpec::new(ip("198.18.28.10")))?;
    let sleeper = lab.spawn(host.ns(), ["sleep", "600"])?;
    let early = lab.spawn(site.agent().ns(), ["sleep", "600"])?;
    early.kill()?;
    ensure!(!early.is_running(), "a killed process is still running");
    let prefix = lab.prefix().to_string();
    ensure!(
        namespaces_with_prefix(&prefix).len() == lab.namespaces().len(),
        "namespaces missing"
    );
    let pid = sleeper.pid();
    drop(lab);
    ensure!(
        namespaces_with_prefix(&prefix).is_empty(),
        "left behind: {prefix}*"
    );
    ensure!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} survived"
    );
    Ok(())
}

/// What a program does on Ctrl-C: another thread tears the lab down while the thread owning it
/// is blocked in a command inside it; the command ends, and nothing of the lab is left but
/// its directory, which `remove_dir` takes.
#[test]
fn teardown_from_another_thread_ends_a_blocked_command() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "torn",
        net("198.18.29.0/24"),
        ip("198.18.29.2"),
    ))?;
    let host = site.add_host(HostSpec::new(ip("198.18.29.10")))?;
    let sleeper = lab.spawn(host.ns(), ["sleep", "600"])?;
    let prefix = lab.prefix().to_string();
    let started = std::time::Instant::now();
    let marker = lab.dir().join("started");
    let script = format!("touch {}; exec sleep 50", marker.display());
    let blocked = std::thread::scope(|s| {
        let owner = s.spawn(|| lab.exec(site.agent().ns(), ["sh", "-c", &script]));
        // Tear down only once the owner's command runs in its namespace.
        while !marker.exists() && started.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        lab.teardown();
        owner.join()
    });
    let blocked = blocked.map_err(|_| anyhow::anyhow!("the owner thread panicked"))??;
    ensure!(
        !blocked.status.success(),
        "the blocked command was not ended: {blocked:?}"
    );
    ensure!(
        namespaces_with_prefix(&prefix).is_empty(),
        "left behind after teardown: {prefix}*"
    );
    ensure!(!sleeper.is_running(), "pid {} survived", sleeper.pid());
    ensure!(lab.dir().exists(), "the directory stays until remove_dir");
    lab.remove_dir();
    ensure!(
        !lab.dir().exists(),
        "{} outlived remove_dir",
        lab.dir().display()
    );
    // The drop after a teardown is harmless.
    drop(lab);
    Ok(())
}

#[test]
fn panic_still_tears_down() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let seen: Mutex<Option<(String, u32)>> = Mutex::new(None);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new().expect("lab");
        let site = lab
            .add_site(SiteSpec::new(
                "boom",
                net("198.18.32.0/24"),
                ip("198.18.32.2"),
            ))
            .expect("site");
        let host = site
            .add_host(HostSpec::new(ip("198.18.32.10")))
            .expect("host");
        let sleeper = lab.spawn(host.ns(), ["sleep", "600"]).expect("spawn");
        *seen.lock().expect("lock") = Some((lab.prefix().to_string(), sleeper.pid()));
        panic!("a test failing inside a lab");
    }));
    ensure!(outcome.is_err(), "the closure was meant to panic");
    let (prefix, pid) = seen
        .lock()
        .expect("lock")
        .clone()
        .context("the lab was not built")?;
    ensure!(
        namespaces_with_prefix(&prefix).is_empty(),
        "left behind after a panic: {prefix}*"
    );
    ensure!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} survived"
    );
    Ok(())
}

// === identity features ===

/// Sends one ARP request for `target` out of `iface` (from `src`) and prints every MAC that
/// answered within a second, one per line: unlike `ip neigh`, which keeps one, it shows whether
/// two interfaces answer for one address.
const WHO_HAS: &str = r#"
import socket, struct, sys, time
iface, src, target = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((iface, 0))
mac = s.getsockname()[4]
req = (b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
       + mac + socket.inet_aton(src) + b"\x00" * 6 + socket.inet_aton(target))
s.send(req)
s.settimeout(0.1)
seen = set()
deadline = time.time() + 1.0
while time.time() < deadline:
    try:
        data = s.recv(2048)
    except socket.timeout:
        continue
    if len(data) >= 42 and data[20:22] == b"\x00\x02" and data[28:32] == socket.inet_aton(target):
        seen.add(data[22:28].hex(":"))
for m in sorted(seen):
    print(m)
"#;

/// The MACs that answer ARP for `target`, asked from `ns`'s `eth0` at `src`, sorted.
fn who_has(lab: &Lab, ns: &str, src: Ipv4Addr, target: Ipv4Addr) -> Result<Vec<String>> {
    let out = lab.exec_ok(
        ns,
        [
            "/usr/bin/python3",
            "-I",
            "-c",
            WHO_HAS,
            "eth0",
            &src.to_string(),
            &target.to_string(),
        ],
    )?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// ifPhysAddress of every interface `target`'s snmpd lists, as `aa:bb:...` (empty ones left out).
fn if_macs(lab: &Lab, ns: &str, community: &str, target: Ipv4Addr) -> Result<Vec<String>> {
    let out = lab.exec_ok(
        ns,
        [
            "snmpbulkwalk",
            "-Oqv",
            "-Ox",
            "-v2c",
            "-c",
            community,
            "-r",
            "1",
            "-t",
            "1",
            &target.to_string(),
            "1.3.6.1.2.1.2.2.1.6",
        ],
    )?;
    Ok(out
        .lines()
        .map(|l| {
            l.trim_matches(|c: char| c == '"' || c.is_whitespace())
                .split_whitespace()
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
                .join(":")
        })
        .filter(|m| m.len() == 17)
        .collect())
}

#[test]
fn multihomed_host_answers_each_address_with_its_own_mac() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "multihomed",
        net("198.18.40.0/24"),
        ip("198.18.40.2"),
    ))?;
    let (mac_a, mac_b) = (
        [0x00, 0x16, 0x3e, 0x4a, 0x00, 0x0a],
        [0x00, 0x16, 0x3e, 0x4b, 0x00, 0x0b],
    );
    let host = site.add_multihomed_host(
        HostSpec::new(ip("198.18.40.10")).with_mac(mac_a),
        HostSpec::new(ip("198.18.40.11")).with_mac(mac_b),
    )?;
    let ifaces = host.interfaces();
    ensure!(
        ifaces.len() == 2 && ifaces[0].name == "eth0" && ifaces[1].name == "eth1",
        "{ifaces:?}"
    );
    ensure!(host.ip() == ip("198.18.40.10") && host.mac() == mac_a);
    let agent = site.agent();
    for (addr, mac) in [("198.18.40.10", mac_a), ("198.18.40.11", mac_b)] {
        let answered = who_has(&lab, agent.ns(), agent.ip(), ip(addr))?;
        ensure!(
            answered == [mac_string(mac)],
            "{addr} answered by {answered:?}, not only {}",
            mac_string(mac)
        );
        ensure!(
            ping(&lab, agent.ns(), ip(addr))?,
            "{addr} does not answer ping"
        );
    }
    // One snmpd answers on both addresses and lists both NICs.
    host.run_snmpd(&SnmpdSpec::v2c("lab-public", "dual-nic"))?;
    for addr in ["198.18.40.10", "198.18.40.11"] {
        let name = sys_name(&lab, agent.ns(), &v2c("lab-public"), ip(addr))?;
        ensure!(
            name.as_deref() == Some("dual-nic"),
            "sysName at {addr}: {name:?}"
        );
        let macs = if_macs(&lab, agent.ns(), "lab-public", ip(addr))?;
        for mac in [mac_a, mac_b] {
            ensure!(
                macs.contains(&mac_string(mac)),
                "IF-MIB at {addr} lacks {}: {macs:?}",
                mac_string(mac)
            );
        }
    }
    // Two NICs need two addresses and two MACs.
    ensure!(
        site.add_multihomed_host(
            HostSpec::new(ip("198.18.40.20")),
            HostSpec::new(ip("198.18.40.20"))
        )
        .is_err(),
        "one address twice was accepted"
    );
    Ok(())
}

#[test]
fn hosts_change_address_and_mac() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "churn",
        net("198.18.42.0/24"),
        ip("198.18.42.2"),
    ))?;
    let agent = site.agent().clone();
    let mut host = site.add_host(HostSpec::new(ip("198.18.42.20")))?;
    let first_mac = host.mac();
    ensure!(who_has(&lab, agent.ns(), agent.ip(), ip("198.18.42.20"))? == [mac_string(first_mac)]);

    host.set_ip(ip("198.18.42.21"))?;
    ensure!(host.ip() == ip("198.18.42.21"));
    let old = who_has(&lab, agent.ns(), agent.ip(), ip("198.18.42.20"))?;
    ensure!(old.is_empty(), "the old address still answers: {old:?}");
    let new = who_has(&lab, agent.ns(), agent.ip(), ip("198.18.42.21"))?;
    ensure!(new == [mac_string(first_mac)], "the new address: {new:?}");
    ensure!(
        ping(&lab, agent.ns(), ip("198.18.42.21"))?,
        "no ping at the new address"
    );
    // Off the LAN, or outside the lab's range, is refused.
    ensure!(
        host.set_ip(ip("198.18.43.21")).is_err(),
        "off-LAN address accepted"
    );
    ensure!(host.set_ip(ip("10.0.0.21")).is_err(), "10.0.0.21 accepted");
    ensure!(
        host.ip() == ip("198.18.42.21"),
        "a refused move changed the host"
    );

    // Randomized MACs: locally administered, unicast, never repeated within a lab.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let mac = lab.randomized_mac()?;
        ensure!(
            is_locally_administered(mac) && mac[0] & 1 == 0,
            "{}",
            mac_string(mac)
        );
        ensure!(seen.insert(mac), "{} handed out twice", mac_string(mac));
    }
    let random = lab.randomized_mac()?;
    host.set_mac(random)?;
    ensure!(host.mac() == random);
    let now = who_has(&lab, agent.ns(), agent.ip(), ip("198.18.42.21"))?;
    ensure!(now == [mac_string(random)], "after set_mac: {now:?}");
    ensure!(
        host.set_mac([0x01, 0, 0x5e, 0, 0, 1]).is_err(),
        "a multicast MAC accepted"
    );
    // The mDNS responder starts again on the host's new identity.
    host.run_mdns(&MdnsSpec {
        host_name: "phone-21".into(),
        services: vec![MdnsService {
            instance: "Phone 21".into(),
            service_type: "_companion-link._tcp".into(),
            port: 49152,
            txt: Vec::new(),
        }],
    })?;
    let found = lab.exec_ok(
        agent.ns(),
        [
            "/usr/bin/python3",
            "-I",
            "-c",
            BROWSE,
            &agent.ip().to_string(),
            "_companion-link._tcp.local.",
        ],
    )?;
    ensure!(
        found.contains("Phone 21._companion-link._tcp.local. 49152 198.18.42.21"),
        "browse found: {found:?}"
    );
    Ok(())
}

#[test]
fn vrrp_virtual_address_is_answered_with_the_vrrp_mac() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "vrrp",
        net("198.18.44.0/24"),
        ip("198.18.44.2"),
    ))?;
    let router = site.add_router(RouterSpec {
        lan_ip: ip("198.18.44.1"),
        routed_subnet: net("198.18.45.0/24"),
        routed_ip: ip("198.18.45.1"),
        lan_mac: None,
    })?;
    let vmac = router.add_virtual_address(ip("198.18.44.254"), 7)?;
    ensure!(vmac == vrrp_mac(7) && mac_string(vmac) == "00:00:5e:00:01:07");
    let agent = site.agent();
    let vip = who_has(&lab, agent.ns(), agent.ip(), ip("198.18.44.254"))?;
    ensure!(vip == [mac_string(vmac)], "the VIP answered by {vip:?}");
    let own = who_has(&lab, agent.ns(), agent.ip(), router.lan_ip())?;
    ensure!(
        own == [mac_string(router.lan_mac())],
        "the router's own address answered by {own:?}"
    );
    ensure!(
        ping(&lab, agent.ns(), ip("198.18.44.254"))?,
        "the VIP does not answer ping"
    );
    router.run_snmpd(&SnmpdSpec::v2c("lab-public", "vrrp-master"))?;
    let macs = if_macs(&lab, agent.ns(), "lab-public", router.lan_ip())?;
    ensure!(
        macs.contains(&mac_string(vmac)) && macs.contains(&mac_string(router.lan_mac())),
        "the router's IF-MIB: {macs:?}"
    );
    ensure!(
        router.add_virtual_address(ip("198.18.45.254"), 8).is_err(),
        "a VIP off the LAN was accepted"
    );
    ensure!(
        router.add_virtual_address(ip("198.18.44.253"), 0).is_err(),
        "VRID 0 was accepted"
    );
    Ok(())
}

#[test]
fn proxy_arp_router_answers_for_its_carved_subnet() -> Result<()> {
    if census_tests::lab::lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    // The LAN is a /23; the router routes its upper /24 out of eth1.
    let site = lab.add_site(SiteSpec::new(
        "proxy",
        net("198.18.46.0/23"),
        ip("198.18.46.2"),
    ))?;
    let router = site.add_router(RouterSpec {
        lan_ip: ip("198.18.46.1"),
        routed_subnet: net("198.18.47.0/24"),
        routed_ip: ip("198.18.47.1"),
        lan_mac: None,
    })?;
    let far = router.add_host(HostSpec::new(ip("198.18.47.10")))?;
    let agent = site.agent();
    // No route: the agent takes 198.18.47.0/24 for part of its own LAN.
    let route = lab.exec_ok(agent.ns(), ["ip", "route", "get", "198.18.47.10"])?;
    ensure!(
        !route.contains(" via "),
        "the agent routes the carved subnet: {route}"
    );
    let before = who_has(&lab, agent.ns(), agent.ip(), far.ip())?;
    ensure!(before.is_empty(), "answered before proxy ARP: {before:?}");

    router.enable_proxy_arp()?;
    let lan_mac = vec![mac_string(router.lan_mac())];
    for target in ["198.18.47.10", "198.18.47.99", "198.18.47.1"] {
        let answered = who_has(&lab, agent.ns(), agent.ip(), ip(target))?;
        ensure!(answered == lan_mac, "{target} answered by {answered:?}");
    }
    // The LAN's own addresses are not proxied.
    let lan_host = site.add_host(HostSpec::new(ip("198.18.46.10")))?;
    let answered = who_has(&lab, agent.ns(), agent.ip(), lan_host.ip())?;
    ensure!(answered == [mac_string(lan_host.mac())], "{answered:?}");
    ensure!(
        ping(&lab, agent.ns(), far.ip())?,
        "no ping to the host behind the router"
    );
    // An agent inside the carved subnet would never see its LAN: refused.
    ensure!(
        site.add_agent(ip("198.18.47.3")).is_err(),
        "an agent in the carved subnet"
    );
    Ok(())
}
