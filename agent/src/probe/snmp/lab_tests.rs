//! Lab tests of the SNMP probe against Debian's net-snmp `snmpd` in network namespaces: each
//! parent test builds a site, then re-runs [`child`] of this test binary inside the site's
//! agent namespace, where the sweep runs for real and prints what it found.

use std::{
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{SnmpConfig, SnmpCredentials, sweep};
use crate::{
    config::SnmpV3User,
    testing::{
        self, Lab,
        lab::{
            HostSpec, RouterSpec, SiteSpec, SnmpAuth, SnmpPriv, SnmpV3User as LabUser, SnmpdSpec,
            mac_string,
        },
    },
};

/// What the parent asks the child to sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Input {
    targets: Vec<Ipv4Addr>,
    communities: Vec<String>,
    users: Vec<UserInput>,
    timeout_ms: u64,
    retries: u32,
    /// Cancel the sweep this long after it starts.
    cancel_after_ms: Option<u64>,
}

/// A v3 user as the probe's configuration names it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserInput {
    name: String,
    auth: String,
    auth_pass: String,
    /// `None` for authNoPriv.
    privacy: Option<String>,
    priv_pass: Option<String>,
}

/// What the child saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Output {
    probed: usize,
    silent: usize,
    elapsed_ms: u64,
    devices: Vec<Device>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Device {
    ip: Ipv4Addr,
    sys_name: String,
    sys_descr: String,
    sys_object_id: String,
    uptime: u64,
    serial: String,
    model: String,
    version: String,
    credential: String,
    engine_id: Vec<u8>,
    /// Interface MACs as `aa:bb:...`.
    macs: Vec<String>,
    interfaces: Vec<String>,
    /// ARP cache as (address, MAC).
    arp: Vec<(String, String)>,
    errors: Vec<String>,
}

impl Output {
    fn device(&self, ip: Ipv4Addr) -> &Device {
        self.devices
            .iter()
            .find(|d| d.ip == ip)
            .unwrap_or_else(|| panic!("{ip} not found in {self:#?}"))
    }
}

/// Not a test on its own: the lab tests re-run this test binary inside the agent's namespace
/// with this test selected, and it sweeps from there.
#[test]
fn child() {
    let Some(input) = testing::child_input::<Input>() else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter("census_agent=debug")
        .with_writer(std::io::stderr)
        .try_init();
    let credentials = SnmpCredentials {
        communities: input.communities.clone(),
        v3_users: input
            .users
            .iter()
            .map(|u| SnmpV3User {
                name: u.name.clone(),
                auth_protocol: Some(u.auth.clone()),
                auth_password: Some(u.auth_pass.clone()),
                priv_protocol: u.privacy.clone(),
                priv_password: u.priv_pass.clone(),
            })
            .collect(),
    };
    let cfg = SnmpConfig {
        timeout: Duration::from_millis(input.timeout_ms),
        retries: input.retries,
        ..SnmpConfig::default()
    };
    // The agent's own runtime shape (2 workers, default 2 MiB stacks): the sweep must not
    // depend on bigger worker stacks.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let cancel = CancellationToken::new();
    if let Some(ms) = input.cancel_after_ms {
        let cancel = cancel.clone();
        rt.spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            cancel.cancel();
        });
    }
    let started = Instant::now();
    let r = rt.block_on(sweep(&input.targets, &credentials, &cfg, &cancel));
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    testing::child_output(&Output {
        probed: r.probed,
        silent: r.silent,
        elapsed_ms,
        devices: r
            .devices
            .iter()
            .map(|d| Device {
                ip: d.ip,
                sys_name: d.identity.sys_name.clone(),
                sys_descr: d.identity.sys_descr.clone(),
                sys_object_id: d.identity.sys_object_id.clone(),
                uptime: d.identity.sys_uptime_centis,
                serial: d.identity.serial_number.clone(),
                model: d.identity.model.clone(),
                version: d.identity.version.clone(),
                credential: d.identity.credential.clone(),
                engine_id: d.identity.engine_id.clone(),
                macs: d
                    .identity
                    .interfaces
                    .iter()
                    .filter(|i| !i.mac.is_empty())
                    .map(|i| hex(&i.mac))
                    .collect(),
                interfaces: d
                    .identity
                    .interfaces
                    .iter()
                    .map(|i| i.name.clone())
                    .collect(),
                arp: d
                    .identity
                    .arp_cache
                    .iter()
                    .map(|e| (e.address.clone(), hex(&e.mac)))
                    .collect(),
                errors: d.errors.clone(),
            })
            .collect(),
    });
}

fn hex(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn run_child(lab: &Lab, ns: &str, input: &Input) -> Result<Output> {
    let mut out: Vec<Output> = testing::run_child(
        lab,
        ns,
        "probe::snmp::lab_tests::child",
        input,
        Duration::from_secs(120),
    )?;
    ensure!(out.len() == 1, "expected one result, got {out:?}");
    out.pop().context("one result")
}

fn a(s: &str) -> Ipv4Addr {
    s.parse().expect("literal address")
}

/// A SHA/AES authPriv user of the lab.
fn lab_user(name: &str) -> LabUser {
    LabUser::new(name, "census-auth-1", "census-priv-1")
}

/// The lab's user as the probe is configured with it.
fn user_input(user: &LabUser) -> UserInput {
    let auth = match user.auth {
        SnmpAuth::Md5 => "md5",
        SnmpAuth::Sha => "sha",
        SnmpAuth::Sha224 => "sha224",
        SnmpAuth::Sha256 => "sha256",
        SnmpAuth::Sha384 => "sha384",
        SnmpAuth::Sha512 => "sha512",
    };
    let privacy = match user.privacy {
        SnmpPriv::None => None,
        SnmpPriv::Des => Some("des"),
        SnmpPriv::Aes => Some("aes"),
        SnmpPriv::Aes192 => Some("aes192"),
        SnmpPriv::Aes256 => Some("aes256"),
    };
    UserInput {
        name: user.name.clone(),
        auth: auth.into(),
        auth_pass: user.auth_pass.clone(),
        privacy: privacy.map(Into::into),
        priv_pass: privacy.map(|_| user.priv_pass.clone()),
    }
}

/// A site where every kind of SNMP device is present: two hosts on different v2c communities
/// (the credential list has the wrong one first for the second), a host that only speaks v3
/// authPriv (a user with wrong pass phrases is tried first), a router with snmpd whose ARP cache
/// knows the hosts behind it, a host that answers SNMPv1 only (its community last), and an
/// address with no agent at all.
#[test]
fn lab_sweep_reads_every_kind_of_device() -> Result<()> {
    if testing::skip_lab() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let prefix = lab.prefix().to_owned();
    let site = lab.add_site(SiteSpec::new(
        "snmp",
        "198.18.40.0/24".parse()?,
        a("198.18.40.2"),
    ))?;
    let alpha = site.add_host(HostSpec::new(a("198.18.40.10")))?;
    let beta = site.add_host(HostSpec::new(a("198.18.40.11")))?;
    let gamma = site.add_host(HostSpec::new(a("198.18.40.12")))?;
    let silent = site.add_host(HostSpec::new(a("198.18.40.13")))?;
    let delta = site.add_host(HostSpec::new(a("198.18.40.14")))?;
    let router = site.add_router(RouterSpec {
        lan_ip: a("198.18.40.1"),
        routed_subnet: "198.18.41.0/24".parse()?,
        routed_ip: a("198.18.41.1"),
        lan_mac: None,
    })?;
    let routed = router.add_hosts([
        HostSpec::new(a("198.18.41.10")),
        HostSpec::new(a("198.18.41.11")),
    ])?;

    alpha.run_snmpd(&SnmpdSpec::v2c("alpha-ro", "host-alpha"))?;
    beta.run_snmpd(&SnmpdSpec::v2c("beta-ro", "host-beta"))?;
    let engine_id = b"\x80\x00\x1f\x88\x04census-gamma".to_vec();
    let user = lab_user("census");
    gamma.run_snmpd(&SnmpdSpec {
        communities: Vec::new(),
        v3_user: Some(user.clone()),
        engine_id: Some(engine_id.clone()),
        ..SnmpdSpec::v2c("unused", "host-gamma")
    })?;
    router.run_snmpd(&SnmpdSpec::v2c("alpha-ro", "router-1"))?;
    let delta_snmpd = run_v1_only_snmpd(&lab, delta.ns(), delta.ip())?;
    // The router learns the routed hosts' MACs by talking to them.
    for host in &routed {
        lab.exec_ok(router.ns(), ["ping", "-c1", "-W1", &host.ip().to_string()])?;
    }

    let wrong_user = LabUser {
        auth_pass: "wrong-auth-1".into(),
        priv_pass: "wrong-priv-1".into(),
        ..user.clone()
    };
    let input = Input {
        targets: vec![
            router.lan_ip(),
            alpha.ip(),
            beta.ip(),
            gamma.ip(),
            silent.ip(),
            delta.ip(),
        ],
        communities: vec!["alpha-ro".into(), "beta-ro".into(), "legacy-ro".into()],
        users: vec![user_input(&wrong_user), user_input(&user)],
        timeout_ms: 500,
        retries: 1,
        cancel_after_ms: None,
    };
    let t = Instant::now();
    let out = run_child(&lab, site.agent().ns(), &input)?;
    eprintln!(
        "SNMP lab sweep: {} ms in the child, {} ms with start-up\n{out:#?}",
        out.elapsed_ms,
        t.elapsed().as_millis()
    );

    assert_eq!(out.probed, 6);
    assert_eq!(out.silent, 1, "only the address without snmpd is silent");
    assert_eq!(out.devices.len(), 5);

    let d = out.device(alpha.ip());
    assert_eq!(
        (
            d.sys_name.as_str(),
            d.version.as_str(),
            d.credential.as_str()
        ),
        ("host-alpha", "2c", "community #1")
    );
    assert_eq!(d.sys_descr, "Census lab device host-alpha");
    assert!(d.sys_object_id.starts_with("1.3.6.1.4.1."), "{d:?}");
    assert!(d.uptime > 0, "{d:?}");
    assert!(d.macs.contains(&mac_string(alpha.mac())), "{d:?}");
    assert!(d.interfaces.iter().any(|n| n == "eth0"), "{d:?}");
    // net-snmp also answers v3 discovery: the engine ID comes with it.
    assert!(!d.engine_id.is_empty(), "{d:?}");

    let d = out.device(beta.ip());
    assert_eq!(
        (
            d.sys_name.as_str(),
            d.version.as_str(),
            d.credential.as_str()
        ),
        ("host-beta", "2c", "community #2")
    );
    assert!(d.macs.contains(&mac_string(beta.mac())), "{d:?}");

    let d = out.device(gamma.ip());
    assert_eq!(
        (
            d.sys_name.as_str(),
            d.version.as_str(),
            d.credential.as_str()
        ),
        ("host-gamma", "3", "census")
    );
    assert_eq!(d.engine_id, engine_id);
    assert!(d.macs.contains(&mac_string(gamma.mac())), "{d:?}");

    // SNMPv1 only: found with v1, walked with GETNEXT to the end (noSuchName).
    let d = out.device(delta.ip());
    assert_eq!(
        (
            d.sys_name.as_str(),
            d.version.as_str(),
            d.credential.as_str()
        ),
        ("host-delta", "1", "community #3")
    );
    assert!(d.macs.contains(&mac_string(delta.mac())), "{d:?}");
    assert!(d.interfaces.iter().any(|n| n == "eth0"), "{d:?}");

    let d = out.device(router.lan_ip());
    assert_eq!(d.sys_name, "router-1");
    assert!(d.macs.contains(&mac_string(router.lan_mac())), "{d:?}");
    for host in &routed {
        let entry = (host.ip().to_string(), mac_string(host.mac()));
        assert!(d.arp.contains(&entry), "{entry:?} not in {:?}", d.arp);
    }
    for d in &out.devices {
        assert!(d.errors.is_empty(), "{d:?}");
    }

    delta_snmpd.kill()?;
    drop((alpha, beta, gamma, silent, delta, routed, router, site));
    drop(lab);
    let left = census_tests::lab::namespaces_with_prefix(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

/// ENTITY-MIB and SNMPv3 protocols against real snmpd: the chassis serial and model of a v2c
/// device and of a v3 one; v3 users of SHA-256/AES-256, of the legacy MD5/DES (after a user of
/// the same name with the wrong protocols), of SHA-1 with AES-256 (net-snmp's key extension),
/// and of SHA-384 authNoPriv, each on a device of its own, each found with its own user.
#[test]
fn lab_sweep_reads_serial_model_and_every_v3_protocol() -> Result<()> {
    if testing::skip_lab() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let prefix = lab.prefix().to_owned();
    let site = lab.add_site(SiteSpec::new(
        "snmp-entity",
        "198.18.44.0/24".parse()?,
        a("198.18.44.2"),
    ))?;
    let chassis = site.add_host(HostSpec::new(a("198.18.44.10")))?;
    chassis.run_snmpd(&SnmpdSpec {
        serial: Some("FOC1234X0AB".into()),
        model: Some("Lab Switch 24".into()),
        ..SnmpdSpec::v2c("entity-ro", "chassis")
    })?;
    let user = |name: &str, auth, privacy| lab_user(name).with_protocols(auth, privacy);
    let modern = user("modern", SnmpAuth::Sha256, SnmpPriv::Aes256);
    let legacy = user("legacy", SnmpAuth::Md5, SnmpPriv::Des);
    let extended = user("extended", SnmpAuth::Sha, SnmpPriv::Aes256);
    let signed = user("signed", SnmpAuth::Sha384, SnmpPriv::None);
    let mut v3 = Vec::new();
    for (last, user) in (11..).zip([&modern, &legacy, &extended, &signed]) {
        let host = site.add_host(HostSpec::new(Ipv4Addr::new(198, 18, 44, last)))?;
        host.run_snmpd(&SnmpdSpec {
            communities: Vec::new(),
            v3_user: Some(user.clone()),
            // A serial without a model: the model is then empty.
            serial: (user == &modern).then(|| "SN-MODERN-1".into()),
            ..SnmpdSpec::v2c("unused", &format!("v3-{}", user.name))
        })?;
        v3.push((host, user));
    }

    let legacy_as_sha = legacy.clone().with_protocols(SnmpAuth::Sha, SnmpPriv::Aes);
    let mut targets = vec![chassis.ip()];
    targets.extend(v3.iter().map(|(h, _)| h.ip()));
    let input = Input {
        targets,
        communities: vec!["entity-ro".into()],
        users: [&legacy_as_sha, &modern, &legacy, &extended, &signed]
            .map(user_input)
            .to_vec(),
        timeout_ms: 500,
        retries: 1,
        cancel_after_ms: None,
    };
    let out = run_child(&lab, site.agent().ns(), &input)?;
    eprintln!("SNMP lab sweep of ENTITY-MIB and v3 protocols: {out:#?}");
    assert_eq!(out.probed, 5);
    assert_eq!(out.silent, 0, "{out:#?}");

    let d = out.device(chassis.ip());
    assert_eq!(
        (
            d.sys_name.as_str(),
            d.version.as_str(),
            d.serial.as_str(),
            d.model.as_str()
        ),
        ("chassis", "2c", "FOC1234X0AB", "Lab Switch 24"),
        "{d:?}"
    );
    for (host, user) in &v3 {
        let d = out.device(host.ip());
        assert_eq!(
            (
                d.sys_name.as_str(),
                d.version.as_str(),
                d.credential.as_str()
            ),
            (
                format!("v3-{}", user.name).as_str(),
                "3",
                user.name.as_str()
            ),
            "{:?}/{:?}: {d:?}",
            user.auth,
            user.privacy
        );
        assert!(!d.engine_id.is_empty(), "{d:?}");
        assert!(d.macs.contains(&mac_string(host.mac())), "{d:?}");
    }
    let d = out.device(v3[0].0.ip());
    assert_eq!((d.serial.as_str(), d.model.as_str()), ("SN-MODERN-1", ""));
    for d in &out.devices {
        assert!(d.errors.is_empty(), "{d:?}");
    }

    drop((chassis, v3, site));
    drop(lab);
    let left = census_tests::lab::namespaces_with_prefix(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

/// A device that stops answering in the middle of a walk, one whose agent hangs from the
/// start, and a responder that sends garbage, cost only themselves: the healthy device is read completely, the cut one is reported
/// with what it said before (its interfaces) and the failure in `errors`, and the sweep ends
/// within its timeout budget. A sweep cancelled while waiting on the hung agent ends at once.
///
/// The cut device is a real net-snmp `snmpd` whose entPhysicalSerialNum column is served by a
/// `pass` script: it answers 30 rows, then sleeps, and snmpd (single-threaded) answers nothing
/// while it does, so the walk stops after the first GETBULK page, whose rows are kept. The hung agent is an `snmpd`
/// stopped with SIGSTOP: requests are queued and never answered.
#[test]
fn lab_devices_that_stop_answering_cost_only_themselves() -> Result<()> {
    if testing::skip_lab() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let prefix = lab.prefix().to_owned();
    let site = lab.add_site(SiteSpec::new(
        "snmp-cut",
        "198.18.42.0/24".parse()?,
        a("198.18.42.2"),
    ))?;
    let healthy = site.add_host(HostSpec::new(a("198.18.42.10")))?;
    let cut = site.add_host(HostSpec::new(a("198.18.42.11")))?;
    let hung = site.add_host(HostSpec::new(a("198.18.42.12")))?;
    let garbage = site.add_host(HostSpec::new(a("198.18.42.13")))?;
    healthy.run_snmpd(&SnmpdSpec::v2c("public-ro", "healthy"))?;
    let hung_snmpd = hung.run_snmpd(&SnmpdSpec::v2c("public-ro", "hung"))?;
    let cut_snmpd = run_stalling_snmpd(&lab, cut.ns(), cut.ip())?;
    let garbage_responder = run_garbage_responder(&lab, garbage.ns(), garbage.ip())?;
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &hung_snmpd.pid().to_string()])
        .status()?;
    ensure!(stop.success(), "SIGSTOP of the hung snmpd failed");

    let input = Input {
        targets: vec![healthy.ip(), cut.ip(), hung.ip(), garbage.ip()],
        communities: vec!["public-ro".into()],
        users: Vec::new(),
        timeout_ms: 300,
        retries: 1,
        cancel_after_ms: None,
    };
    let out = run_child(&lab, site.agent().ns(), &input)?;
    eprintln!("SNMP lab sweep with failing devices: {out:#?}");
    assert_eq!(out.probed, 4);
    assert_eq!(out.silent, 1, "the hung agent never answered");
    let d = out.device(healthy.ip());
    assert_eq!(d.sys_name, "healthy");
    assert!(d.errors.is_empty(), "{d:?}");
    assert!(d.macs.contains(&mac_string(healthy.mac())), "{d:?}");
    let d = out.device(cut.ip());
    assert_eq!(d.sys_name, "cut");
    assert!(d.macs.contains(&mac_string(cut.mac())), "{d:?}");
    assert_eq!(
        d.serial, "SER-1",
        "rows read before the cut are kept: {d:?}"
    );
    assert!(
        d.errors
            .iter()
            .any(|e| e.starts_with("entPhysicalSerialNum: no response")),
        "the cut walk is reported: {d:?}"
    );
    assert!(
        d.errors.iter().any(|e| e.contains("later tables: skipped")),
        "the tables after it are skipped: {d:?}"
    );
    // The garbage responder echoes requests as responses (so its "community" is accepted),
    // after garbage that snmp2 sessions cannot read: an empty identity and errors, no more.
    let d = out.device(garbage.ip());
    assert_eq!(
        (d.sys_name.as_str(), d.version.as_str()),
        ("", "2c"),
        "{d:?}"
    );
    assert!(d.macs.is_empty() && d.arp.is_empty(), "{d:?}");
    assert!(
        d.errors.iter().any(|e| e.contains("unreadable replies")),
        "{d:?}"
    );
    // The hung agent: 2 attempts of 300 ms for the credential. The cut one: one timed-out
    // request (2 attempts), the rest skipped. Well under 5 s, where waiting out every table
    // would take 10 s.
    assert!(out.elapsed_ms < 5_000, "{out:?}");

    // Cancelled while the hung agent is being waited for (5 s per attempt): ends at once.
    let input = Input {
        targets: vec![hung.ip()],
        timeout_ms: 5_000,
        retries: 3,
        cancel_after_ms: Some(300),
        ..input
    };
    let out = run_child(&lab, site.agent().ns(), &input)?;
    eprintln!("SNMP lab sweep cancelled: {out:?}");
    assert!(out.elapsed_ms < 1_500, "{out:?}");
    assert_eq!(out.probed, 0);
    assert!(out.devices.is_empty());

    hung_snmpd.kill()?;
    cut_snmpd.kill()?;
    garbage_responder.kill()?;
    drop((healthy, cut, hung, garbage, site));
    drop(lab);
    let left = census_tests::lab::namespaces_with_prefix(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

/// Starts net-snmp `snmpd` on `ip` in `ns` (community `public-ro`, sysName `cut`) with
/// entPhysicalSerialNum served by a script that answers 30 rows (`SER-1`...) and then hangs for
/// 10 s, and returns once it answers.
fn run_stalling_snmpd(lab: &Lab, ns: &str, ip: Ipv4Addr) -> Result<testing::lab::Proc> {
    const COLUMN: &str = ".1.3.6.1.2.1.47.1.1.1.1.11";
    let dir = own_snmpd_dir(lab, ip)?;
    let script = dir.join("entity.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             # net-snmp pass: $1 is -g (get) or -n (getnext), $2 the OID.\n\
             base={COLUMN}\n\
             [ \"$1\" = \"-n\" ] || exit 0\n\
             i=${{2#$base}}; i=${{i#.}}; i=${{i%%.*}}; i=${{i:-0}}\n\
             n=$((i + 1))\n\
             if [ \"$n\" -le 30 ]; then echo \"$base.$n\"; echo string; echo \"SER-$n\"; exit 0; fi\n\
             sleep 10\n"
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let conf = format!(
        "rocommunity public-ro default\nsysName cut\npass {COLUMN} {}\n",
        script.display()
    );
    run_own_snmpd(lab, ns, ip, &dir, &conf, &["-v2c", "-c", "public-ro"])
}

/// Starts net-snmp `snmpd` on `ip` in `ns` that answers community `legacy-ro` over SNMPv1 only
/// (v2c requests get no answer), with sysName `host-delta`.
fn run_v1_only_snmpd(lab: &Lab, ns: &str, ip: Ipv4Addr) -> Result<testing::lab::Proc> {
    let dir = own_snmpd_dir(lab, ip)?;
    let conf = "com2sec legacy default legacy-ro\n\
                group legacy v1 legacy\n\
                view all included .1\n\
                access legacy \"\" v1 noauth exact all none none\n\
                sysName host-delta\n";
    run_own_snmpd(lab, ns, ip, &dir, conf, &["-v1", "-c", "legacy-ro"])
}

fn own_snmpd_dir(lab: &Lab, ip: Ipv4Addr) -> Result<std::path::PathBuf> {
    let dir = lab.dir().join(format!("own-snmpd-{ip}"));
    std::fs::create_dir_all(dir.join("persist"))?;
    Ok(dir)
}

/// Runs `snmpd` with `conf` the way the lab runs its own (no system config, no SMUX, only
/// `ip`), and returns once `snmpget` with `auth` gets sysName.0.
fn run_own_snmpd(
    lab: &Lab,
    ns: &str,
    ip: Ipv4Addr,
    dir: &std::path::Path,
    conf: &str,
    auth: &[&str],
) -> Result<testing::lab::Proc> {
    let conf_path = dir.join("snmpd.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = lab.command(ns, "/usr/sbin/snmpd");
    cmd.args(["-f", "-Lo", "-C", "-I", "-smux", "-c"])
        .arg(&conf_path)
        .arg("-p")
        .arg(dir.join("snmpd.pid"))
        .arg(format!("udp:{ip}:161"))
        .env("SNMP_PERSISTENT_DIR", dir.join("persist"))
        .env("MIBS", "")
        .env("MIBDIRS", dir.join("no-mibs"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let proc = lab.spawn_command(cmd)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let target = ip.to_string();
    loop {
        let mut args = vec!["snmpget"];
        args.extend_from_slice(auth);
        args.extend(["-r", "0", "-t", "0.5", &target, "1.3.6.1.2.1.1.5.0"]);
        if lab.exec(ns, &args)?.status.success() {
            return Ok(proc);
        }
        ensure!(
            proc.is_running() && Instant::now() < deadline,
            "the snmpd in {ns} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a hostile responder on `ip`:161 in `ns`: to every datagram it sends back random
/// bytes, then a BER header claiming 64 KiB it does not have, then the request itself re-tagged
/// as a Response (same id, community and varbinds: NULL values, the requested OIDs).
fn run_garbage_responder(lab: &Lab, ns: &str, ip: Ipv4Addr) -> Result<testing::lab::Proc> {
    let dir = lab.dir().join(format!("garbage-{ip}"));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("garbage.py");
    let ready = dir.join("ready");
    std::fs::write(
        &script,
        "import os, socket, sys\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind((sys.argv[1], 161))\n\
         open(sys.argv[2], 'w').close()\n\
         while True:\n\
         \x20   data, peer = s.recvfrom(65535)\n\
         \x20   s.sendto(os.urandom(48), peer)\n\
         \x20   s.sendto(b'\\x30\\x83\\x01\\x00\\x00' + data[:16], peer)\n\
         \x20   tags = [i for i in (data.find(b'\\xa0'), data.find(b'\\xa1'), data.find(b'\\xa5')) if i >= 0]\n\
         \x20   if tags:\n\
         \x20       echo = bytearray(data)\n\
         \x20       echo[min(tags)] = 0xa2\n\
         \x20       s.sendto(bytes(echo), peer)\n",
    )?;
    let proc = lab.spawn(
        ns,
        [
            std::ffi::OsStr::new("/usr/bin/python3"),
            std::ffi::OsStr::new("-I"),
            script.as_os_str(),
            std::ffi::OsStr::new(&ip.to_string()),
            ready.as_os_str(),
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready.exists() {
        ensure!(
            proc.is_running() && Instant::now() < deadline,
            "the garbage responder in {ns} did not start: {}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proc)
}
