//! Responders that run inside lab namespaces: Debian's net-snmp `snmpd` (v2c communities and a
//! v3 authPriv user) and an mDNS/DNS-SD responder on python3-zeroconf. Each is a [`Proc`] the
//! lab tracks, and each is started only once it answers, so tests never race its start-up.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cmd::{find_tool, run_bounded};
use super::{Lab, Proc};

/// How long `snmpd` may take to answer its first request.
const SNMPD_READY: Duration = Duration::from_secs(15);

/// How long the mDNS responder may take to start Python and probe its names (about 1 s alone,
/// more on a busy 2-core machine running tests in parallel).
const MDNS_READY: Duration = Duration::from_secs(30);

/// sysName.0: the object the readiness poll asks for.
const SYS_NAME_OID: &str = "1.3.6.1.2.1.1.5.0";

/// What an `snmpd` answers. The system group is all the lab sets; the IF-MIB, IP-MIB and ARP
/// cache tables are the namespace's real ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnmpdSpec {
    /// v2c (and v1) read-only communities; may be empty when `v3_user` is set.
    pub communities: Vec<String>,
    pub sys_name: String,
    /// Empty leaves snmpd's default (the machine's `uname`).
    pub sys_descr: String,
    pub sys_location: String,
    pub sys_contact: String,
    /// sysObjectID, numeric (`.1.3.6.1.4.1.9.1.1`); `None` keeps net-snmp's.
    pub sys_object_id: Option<String>,
    /// snmpEngineID bytes (5 to 32); `None` lets snmpd derive one. A fixed one lets tests check
    /// that the collector uses the engine ID as a strong identifier.
    pub engine_id: Option<Vec<u8>>,
    pub v3_user: Option<SnmpV3User>,
    /// A device serial number. Not served yet (it would need an ENTITY-MIB agent).
    pub serial: Option<String>,
}

impl SnmpdSpec {
    /// A v2c agent with one community and a plausible system group.
    pub fn v2c(community: &str, sys_name: &str) -> Self {
        Self {
            communities: vec![community.to_string()],
            sys_name: sys_name.to_string(),
            sys_descr: format!("Census lab device {sys_name}"),
            sys_location: "census lab".to_string(),
            sys_contact: "lab@census.invalid".to_string(),
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if self.communities.is_empty() && self.v3_user.is_none() {
            bail!("an snmpd needs a community or a v3 user");
        }
        for community in &self.communities {
            check_word(community, "community")?;
        }
        for (what, value) in [
            ("sys_name", &self.sys_name),
            ("sys_descr", &self.sys_descr),
            ("sys_location", &self.sys_location),
            ("sys_contact", &self.sys_contact),
        ] {
            // One config directive per line: a newline would inject another directive.
            if value.contains(['\n', '\r']) {
                bail!("snmpd {what} must be a single line");
            }
        }
        if let Some(oid) = &self.sys_object_id {
            let digits = oid.trim_start_matches('.');
            if digits.is_empty() || !digits.split('.').all(|arc| arc.parse::<u32>().is_ok()) {
                bail!("sys_object_id {oid:?} is not a numeric OID");
            }
        }
        if let Some(id) = &self.engine_id
            && !(5..=32).contains(&id.len())
        {
            bail!("an SNMP engine ID has 5 to 32 bytes, not {}", id.len());
        }
        if let Some(user) = &self.v3_user {
            check_word(&user.name, "v3 user name")?;
            for (what, pass) in [("auth", &user.auth_pass), ("priv", &user.priv_pass)] {
                check_word(pass, "v3 pass phrase")?;
                if pass.len() < 8 || pass.contains('"') {
                    bail!("the v3 {what} pass phrase needs 8 or more characters and no quotes");
                }
            }
        }
        Ok(())
    }

    fn config(&self) -> String {
        let mut conf = String::from("# written by the Census lab\n");
        let mut line = |directive: &str, value: &str| {
            if !value.is_empty() {
                conf.push_str(&format!("{directive} {value}\n"));
            }
        };
        for community in &self.communities {
            line("rocommunity", &format!("{community} default"));
        }
        line("sysName", &self.sys_name);
        line("sysDescr", &self.sys_descr);
        line("sysLocation", &self.sys_location);
        line("sysContact", &self.sys_contact);
        if let Some(oid) = &self.sys_object_id {
            line("sysObjectID", oid);
        }
        if let Some(id) = &self.engine_id {
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            line("exactEngineID", &format!("0x{hex}"));
        }
        if let Some(user) = &self.v3_user {
            line(
                "createUser",
                &format!(
                    "{} SHA \"{}\" AES \"{}\"",
                    user.name, user.auth_pass, user.priv_pass
                ),
            );
            line("rouser", &format!("{} priv", user.name));
        }
        line("dontLogTCPWrappersConnects", "yes");
        conf
    }

    /// `snmpget` arguments that authenticate as this spec allows (the readiness poll).
    fn probe_args(&self) -> Vec<String> {
        match (&self.communities.first(), &self.v3_user) {
            (Some(community), _) => vec!["-v2c".into(), "-c".into(), community.to_string()],
            (None, Some(user)) => user.snmpget_args(),
            (None, None) => Vec::new(),
        }
    }
}

/// An SNMPv3 user at security level authPriv with SHA(-1) and AES(-128), the pairing every
/// net-snmp build supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnmpV3User {
    pub name: String,
    pub auth_pass: String,
    pub priv_pass: String,
}

impl SnmpV3User {
    /// `snmpget`/`snmpwalk` arguments that authenticate as this user.
    pub fn snmpget_args(&self) -> Vec<String> {
        [
            "-v3",
            "-l",
            "authPriv",
            "-u",
            &self.name,
            "-a",
            "SHA",
            "-A",
            &self.auth_pass,
            "-x",
            "AES",
            "-X",
            &self.priv_pass,
        ]
        .map(String::from)
        .to_vec()
    }
}

/// What an mDNS responder announces for one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MdnsSpec {
    /// The host's name, `printer-1` for `printer-1.local.`.
    pub host_name: String,
    pub services: Vec<MdnsService>,
}

/// One DNS-SD service instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MdnsService {
    /// `Printer 1` in `Printer 1._ipp._tcp.local.`.
    pub instance: String,
    /// `_ipp._tcp` (with or without `.local.`).
    pub service_type: String,
    pub port: u16,
    pub txt: Vec<(String, String)>,
}

// === impl Lab ===

impl Lab {
    pub(super) fn start_snmpd(&self, ns: &str, ip: Ipv4Addr, spec: &SnmpdSpec) -> Result<Proc> {
        spec.validate()?;
        let snmpd = find_tool("/usr/sbin/snmpd", "snmpd")?;
        let snmpget = find_tool("snmpget", "snmp")?;
        let dir = self.new_file(&format!("snmpd-{ip}"))?;
        let persist = dir.join("persist");
        std::fs::create_dir_all(&persist)
            .with_context(|| format!("creating {}", persist.display()))?;
        let conf = dir.join("snmpd.conf");
        std::fs::write(&conf, spec.config())
            .with_context(|| format!("writing {}", conf.display()))?;
        let log = dir.join("snmpd.log");
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log file handle")?;
        let mut cmd = self.command(ns, &snmpd);
        // -C: read no system config; -I -smux: no SMUX listener on tcp/199; the address on the
        // command line is the only one it listens on.
        cmd.args(["-f", "-Lo", "-C", "-I", "-smux", "-c"])
            .arg(&conf)
            .arg("-p")
            .arg(dir.join("snmpd.pid"))
            .arg(format!("udp:{ip}:161"))
            .env("SNMP_PERSISTENT_DIR", &persist)
            // The MIB files Debian ships without the non-free ones only produce warnings.
            .env("MIBS", "")
            .env("MIBDIRS", dir.join("no-mibs"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let proc = self.track(cmd, Some(log))?;

        let deadline = Instant::now() + SNMPD_READY;
        loop {
            if !proc.is_running() {
                bail!("snmpd in {ns} exited at start-up:\n{}", proc.log());
            }
            let mut probe = self.command(ns, &snmpget);
            probe
                .args(spec.probe_args())
                .args(["-r", "0", "-t", "0.5"])
                .arg(ip.to_string())
                .arg(SYS_NAME_OID)
                .env("SNMP_PERSISTENT_DIR", dir.join("client"));
            let answered =
                run_bounded(probe, None, Duration::from_secs(5)).is_ok_and(|o| o.status.success());
            if answered {
                return Ok(proc);
            }
            if Instant::now() >= deadline {
                let _ = proc.kill();
                bail!(
                    "snmpd in {ns} did not answer within {SNMPD_READY:?}:\n{}",
                    proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(super) fn start_mdns(&self, ns: &str, ip: Ipv4Addr, spec: &MdnsSpec) -> Result<Proc> {
        if spec.host_name.is_empty() || spec.host_name.contains(['.', ' ']) {
            bail!(
                "mDNS host name {:?} must be one non-empty label",
                spec.host_name
            );
        }
        let python = self.zeroconf_python()?;
        let dir = self.new_file(&format!("mdns-{ip}"))?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A copy per responder: no reader ever sees another thread's half-written script.
        let script = dir.join("mdns_responder.py");
        std::fs::write(&script, include_str!("mdns_responder.py"))
            .with_context(|| format!("writing {}", script.display()))?;
        let services: Vec<serde_json::Value> = spec
            .services
            .iter()
            .map(|s| {
                let txt: serde_json::Map<String, serde_json::Value> = s
                    .txt
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into()))
                    .collect();
                serde_json::json!({
                    "instance": s.instance,
                    "type": s.service_type,
                    "port": s.port,
                    "txt": txt,
                })
            })
            .collect();
        let json = serde_json::json!({
            "ip": ip.to_string(),
            "host_name": spec.host_name,
            "services": services,
        });
        let spec_path = dir.join("spec.json");
        std::fs::write(&spec_path, json.to_string())
            .with_context(|| format!("writing {}", spec_path.display()))?;
        let ready = dir.join("ready");
        let log = dir.join("mdns.log");
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log file handle")?;
        let mut cmd = self.command(ns, python);
        // -I: ignore PYTHON* variables and user site-packages (a pyenv shell sets some).
        cmd.arg("-I")
            .arg(&script)
            .arg(&spec_path)
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let proc = self.track(cmd, Some(log))?;

        let deadline = Instant::now() + MDNS_READY;
        loop {
            if ready.exists() {
                return Ok(proc);
            }
            if !proc.is_running() {
                bail!(
                    "the mDNS responder in {ns} exited at start-up:\n{}",
                    proc.log()
                );
            }
            if Instant::now() >= deadline {
                let _ = proc.kill();
                bail!("the mDNS responder in {ns} was not ready within {MDNS_READY:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Debian's Python (not a pyenv one first on PATH), checked once to import zeroconf.
    fn zeroconf_python(&self) -> Result<&'static Path> {
        let python = Path::new("/usr/bin/python3");
        if self.zeroconf_ok.get().is_some() {
            return Ok(python);
        }
        let missing = || {
            anyhow::anyhow!(
                "the lab's mDNS responder needs python3-zeroconf for /usr/bin/python3: \
                 apt-get install -y python3-zeroconf (or set CENSUS_SKIP_LAB=1 to skip lab tests)"
            )
        };
        if !python.is_file() {
            return Err(missing());
        }
        let mut check = Command::new(python);
        check.args(["-I", "-c", "import zeroconf"]);
        let output = run_bounded(check, None, Duration::from_secs(30))?;
        if !output.status.success() {
            return Err(missing());
        }
        let _ = self.zeroconf_ok.set(());
        Ok(python)
    }
}

fn check_word(value: &str, what: &str) -> Result<()> {
    if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("snmpd {what} {value:?} must be one non-empty word");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_one_directive_per_line() {
        let mut spec = SnmpdSpec::v2c("public", "sw-1");
        spec.engine_id = Some(vec![0x80, 0, 0x1f, 0x88, 4, 1]);
        spec.v3_user = Some(SnmpV3User {
            name: "census".into(),
            auth_pass: "authpass1".into(),
            priv_pass: "privpass1".into(),
        });
        assert!(spec.validate().is_ok());
        let conf = spec.config();
        assert!(conf.contains("rocommunity public default\n"));
        assert!(conf.contains("sysName sw-1\n"));
        assert!(conf.contains("exactEngineID 0x80001f880401\n"));
        assert!(conf.contains("createUser census SHA \"authpass1\" AES \"privpass1\"\n"));
        assert!(conf.contains("rouser census priv\n"));
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut spec = SnmpdSpec::v2c("public", "sw-1");
        spec.sys_name = "a\nrwcommunity private".into();
        assert!(spec.validate().is_err());
        assert!(SnmpdSpec::v2c("two words", "x").validate().is_err());
        assert!(SnmpdSpec::default().validate().is_err());
        let short = SnmpdSpec {
            v3_user: Some(SnmpV3User {
                name: "u".into(),
                auth_pass: "short".into(),
                priv_pass: "privpass1".into(),
            }),
            ..SnmpdSpec::default()
        };
        assert!(short.validate().is_err());
    }
}
