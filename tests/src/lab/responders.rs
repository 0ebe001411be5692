//! Responders that run inside lab namespaces: Debian's net-snmp `snmpd` (v2c communities, a v3
//! user with a choice of authentication and privacy protocols, an ENTITY-MIB chassis entry with
//! a serial number and model) and an mDNS/DNS-SD responder on python3-zeroconf. Each is a
//! [`Proc`] the lab tracks, and each is started only once it answers, so tests never race its
//! start-up.

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

/// ENTITY-MIB entPhysicalClass, entPhysicalSerialNum and entPhysicalModelName of entry 1, the
/// chassis the lab describes.
const ENT_PHYSICAL_CLASS_1: &str = "1.3.6.1.2.1.47.1.1.1.1.5.1";
const ENT_PHYSICAL_SERIAL_1: &str = "1.3.6.1.2.1.47.1.1.1.1.11.1";
const ENT_PHYSICAL_MODEL_1: &str = "1.3.6.1.2.1.47.1.1.1.1.13.1";
/// entPhysicalClass chassis(3).
const CHASSIS: u32 = 3;
/// entPhysicalSerialNum is an SnmpAdminString (SIZE (0..32)), entPhysicalModelName one of up
/// to 255 bytes.
const MAX_SERIAL_LEN: usize = 32;
const MAX_MODEL_LEN: usize = 255;

/// What an `snmpd` answers. The lab sets the system group and, with `serial` or `model`, one
/// ENTITY-MIB entry; the IF-MIB, IP-MIB and ARP cache tables are the namespace's real ones.
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
    /// The chassis serial number: entPhysicalSerialNum.1, with entPhysicalClass.1 chassis(3).
    /// Printable ASCII without `"` or `\`, 1 to 32 characters.
    pub serial: Option<String>,
    /// The chassis model: entPhysicalModelName.1, with entPhysicalClass.1 chassis(3). Printable
    /// ASCII without `"` or `\`, 1 to 255 characters.
    pub model: Option<String>,
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
            let mut passes = vec![("auth", &user.auth_pass)];
            if user.privacy != SnmpPriv::None {
                passes.push(("priv", &user.priv_pass));
            }
            for (what, pass) in passes {
                check_word(pass, "v3 pass phrase")?;
                if pass.len() < 8 || pass.contains('"') {
                    bail!("the v3 {what} pass phrase needs 8 or more characters and no quotes");
                }
            }
        }
        for (what, value, max) in [
            ("serial", &self.serial, MAX_SERIAL_LEN),
            ("model", &self.model, MAX_MODEL_LEN),
        ] {
            if let Some(value) = value {
                check_admin_string(value, what, max)?;
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
            let auth = user.auth.net_snmp_name();
            match user.privacy.net_snmp_name() {
                Some(privacy) => {
                    line(
                        "createUser",
                        &format!(
                            "{} {auth} \"{}\" {privacy} \"{}\"",
                            user.name, user.auth_pass, user.priv_pass
                        ),
                    );
                    line("rouser", &format!("{} priv", user.name));
                }
                None => {
                    line(
                        "createUser",
                        &format!("{} {auth} \"{}\"", user.name, user.auth_pass),
                    );
                    line("rouser", &format!("{} auth", user.name));
                }
            }
        }
        // `override` serves a fixed value at an OID no MIB module of Debian's snmpd implements,
        // GET, GETNEXT and GETBULK alike (tried on net-snmp 5.9.3), with no helper process.
        if self.serial.is_some() || self.model.is_some() {
            line(
                "override",
                &format!("{ENT_PHYSICAL_CLASS_1} integer {CHASSIS}"),
            );
        }
        if let Some(serial) = &self.serial {
            line(
                "override",
                &format!("{ENT_PHYSICAL_SERIAL_1} octet_str \"{serial}\""),
            );
        }
        if let Some(model) = &self.model {
            line(
                "override",
                &format!("{ENT_PHYSICAL_MODEL_1} octet_str \"{model}\""),
            );
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

/// An SNMPv3 user: authPriv with SHA(-1) and AES(-128) unless `auth` and `privacy` say
/// otherwise. Debian 12's net-snmp (5.9.3, OpenSSL) serves every combination of [`SnmpAuth`]
/// and [`SnmpPriv`], MD5 and DES included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnmpV3User {
    pub name: String,
    pub auth_pass: String,
    /// Unused with [`SnmpPriv::None`].
    pub priv_pass: String,
    pub auth: SnmpAuth,
    pub privacy: SnmpPriv,
}

impl SnmpV3User {
    /// A SHA/AES authPriv user.
    pub fn new(
        name: impl Into<String>,
        auth_pass: impl Into<String>,
        priv_pass: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            auth_pass: auth_pass.into(),
            priv_pass: priv_pass.into(),
            auth: SnmpAuth::default(),
            privacy: SnmpPriv::default(),
        }
    }

    /// The same user with other protocols; [`SnmpPriv::None`] makes it authNoPriv.
    pub fn with_protocols(self, auth: SnmpAuth, privacy: SnmpPriv) -> Self {
        Self {
            auth,
            privacy,
            ..self
        }
    }

    /// `snmpget`/`snmpwalk` arguments that authenticate as this user.
    pub fn snmpget_args(&self) -> Vec<String> {
        let mut args = vec![
            "-v3",
            "-l",
            "authNoPriv",
            "-u",
            &self.name,
            "-a",
            self.auth.net_snmp_name(),
            "-A",
            &self.auth_pass,
        ];
        if let Some(privacy) = self.privacy.net_snmp_name() {
            args[2] = "authPriv";
            args.extend(["-x", privacy, "-X", &self.priv_pass]);
        }
        args.into_iter().map(String::from).collect()
    }
}

/// An SNMPv3 authentication protocol (USM, RFC 3414 and RFC 7860).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SnmpAuth {
    Md5,
    /// SHA-1.
    #[default]
    Sha,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl SnmpAuth {
    pub const ALL: [SnmpAuth; 6] = [
        SnmpAuth::Md5,
        SnmpAuth::Sha,
        SnmpAuth::Sha224,
        SnmpAuth::Sha256,
        SnmpAuth::Sha384,
        SnmpAuth::Sha512,
    ];

    /// The name net-snmp uses in `createUser` and `snmpget -a`.
    pub fn net_snmp_name(self) -> &'static str {
        match self {
            SnmpAuth::Md5 => "MD5",
            SnmpAuth::Sha => "SHA",
            SnmpAuth::Sha224 => "SHA-224",
            SnmpAuth::Sha256 => "SHA-256",
            SnmpAuth::Sha384 => "SHA-384",
            SnmpAuth::Sha512 => "SHA-512",
        }
    }
}

/// An SNMPv3 privacy protocol, or none (security level authNoPriv).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SnmpPriv {
    /// authNoPriv: authenticated, not encrypted.
    None,
    /// DES-CBC.
    Des,
    /// AES-128-CFB.
    #[default]
    Aes,
    /// AES-192 with net-snmp's key extension (Blumenthal's draft), as `AES-192` in net-snmp.
    Aes192,
    /// AES-256 with net-snmp's key extension (Blumenthal's draft), as `AES-256` in net-snmp.
    Aes256,
}

impl SnmpPriv {
    pub const ALL: [SnmpPriv; 5] = [
        SnmpPriv::None,
        SnmpPriv::Des,
        SnmpPriv::Aes,
        SnmpPriv::Aes192,
        SnmpPriv::Aes256,
    ];

    /// The name net-snmp uses in `createUser` and `snmpget -x`; `None` for no privacy.
    pub fn net_snmp_name(self) -> Option<&'static str> {
        match self {
            SnmpPriv::None => None,
            SnmpPriv::Des => Some("DES"),
            SnmpPriv::Aes => Some("AES"),
            SnmpPriv::Aes192 => Some("AES-192"),
            SnmpPriv::Aes256 => Some("AES-256"),
        }
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
    /// Starts one `snmpd` in `ns` listening on every address of `ips` (the first is polled for
    /// readiness).
    pub(super) fn start_snmpd(&self, ns: &str, ips: &[Ipv4Addr], spec: &SnmpdSpec) -> Result<Proc> {
        spec.validate()?;
        let Some(&ip) = ips.first() else {
            bail!("snmpd needs an address to listen on");
        };
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
        // -C: read no system config; -I -smux: no SMUX listener on tcp/199; the addresses on
        // the command line are the only ones it listens on.
        let listen: Vec<String> = ips.iter().map(|ip| format!("udp:{ip}:161")).collect();
        cmd.args(["-f", "-Lo", "-C", "-I", "-smux", "-c"])
            .arg(&conf)
            .arg("-p")
            .arg(dir.join("snmpd.pid"))
            .arg(listen.join(","))
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

/// What `override ... octet_str "VALUE"` carries through snmpd's config parser unchanged: one
/// line of printable ASCII, no quote or backslash (the parser's escapes).
fn check_admin_string(value: &str, what: &str, max: usize) -> Result<()> {
    if value.is_empty()
        || value.len() > max
        || !value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        bail!(
            "snmpd {what} {value:?} must be 1 to {max} printable ASCII characters without \
             quotes or backslashes"
        );
    }
    Ok(())
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
        spec.v3_user = Some(SnmpV3User::new("census", "authpass1", "privpass1"));
        assert!(spec.validate().is_ok());
        let conf = spec.config();
        assert!(conf.contains("rocommunity public default\n"));
        assert!(conf.contains("sysName sw-1\n"));
        assert!(conf.contains("exactEngineID 0x80001f880401\n"));
        assert!(conf.contains("createUser census SHA \"authpass1\" AES \"privpass1\"\n"));
        assert!(conf.contains("rouser census priv\n"));
        assert!(!conf.contains("override"), "no ENTITY-MIB entry unasked");
    }

    #[test]
    fn v3_protocols_reach_the_config_and_the_client_arguments() {
        let user = SnmpV3User::new("census", "authpass1", "privpass1")
            .with_protocols(SnmpAuth::Sha256, SnmpPriv::Aes256);
        let spec = SnmpdSpec {
            communities: Vec::new(),
            v3_user: Some(user.clone()),
            ..SnmpdSpec::v2c("unused", "sw-1")
        };
        assert!(spec.validate().is_ok());
        let conf = spec.config();
        assert!(
            conf.contains("createUser census SHA-256 \"authpass1\" AES-256 \"privpass1\"\n"),
            "{conf}"
        );
        assert!(!conf.contains("rocommunity"), "{conf}");
        assert_eq!(
            user.snmpget_args().join(" "),
            "-v3 -l authPriv -u census -a SHA-256 -A authpass1 -x AES-256 -X privpass1"
        );
        assert_eq!(spec.probe_args(), user.snmpget_args());

        // authNoPriv: no privacy in the user, `auth` in its access, no priv pass needed.
        let user =
            SnmpV3User::new("old", "authpass1", "").with_protocols(SnmpAuth::Md5, SnmpPriv::None);
        let spec = SnmpdSpec {
            v3_user: Some(user.clone()),
            ..SnmpdSpec::v2c("public", "sw-1")
        };
        assert!(spec.validate().is_ok());
        let conf = spec.config();
        assert!(
            conf.contains("createUser old MD5 \"authpass1\"\n"),
            "{conf}"
        );
        assert!(conf.contains("rouser old auth\n"), "{conf}");
        assert_eq!(
            user.snmpget_args().join(" "),
            "-v3 -l authNoPriv -u old -a MD5 -A authpass1"
        );
        assert_eq!(
            SnmpAuth::ALL.map(SnmpAuth::net_snmp_name),
            ["MD5", "SHA", "SHA-224", "SHA-256", "SHA-384", "SHA-512"]
        );
        assert_eq!(
            SnmpPriv::ALL.map(SnmpPriv::net_snmp_name),
            [
                None,
                Some("DES"),
                Some("AES"),
                Some("AES-192"),
                Some("AES-256")
            ]
        );
    }

    #[test]
    fn serial_and_model_make_a_chassis_entry() {
        let spec = SnmpdSpec {
            serial: Some("FOC1234X0AB".into()),
            model: Some("WS-C2960X-24TS-L".into()),
            ..SnmpdSpec::v2c("public", "sw-1")
        };
        assert!(spec.validate().is_ok());
        let conf = spec.config();
        for line in [
            "override 1.3.6.1.2.1.47.1.1.1.1.5.1 integer 3\n",
            "override 1.3.6.1.2.1.47.1.1.1.1.11.1 octet_str \"FOC1234X0AB\"\n",
            "override 1.3.6.1.2.1.47.1.1.1.1.13.1 octet_str \"WS-C2960X-24TS-L\"\n",
        ] {
            assert!(conf.contains(line), "{line} not in {conf}");
        }
        let model_only = SnmpdSpec {
            model: Some("Lab Model 1".into()),
            ..SnmpdSpec::v2c("public", "sw-1")
        };
        let conf = model_only.config();
        assert!(
            conf.contains(".5.1 integer 3\n") && !conf.contains(".11.1"),
            "{conf}"
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut spec = SnmpdSpec::v2c("public", "sw-1");
        spec.sys_name = "a\nrwcommunity private".into();
        assert!(spec.validate().is_err());
        assert!(SnmpdSpec::v2c("two words", "x").validate().is_err());
        assert!(SnmpdSpec::default().validate().is_err());
        let short = SnmpdSpec {
            v3_user: Some(SnmpV3User::new("u", "short", "privpass1")),
            ..SnmpdSpec::default()
        };
        assert!(short.validate().is_err());
        let no_priv_pass = SnmpdSpec {
            v3_user: Some(SnmpV3User::new("u", "authpass1", "")),
            ..SnmpdSpec::default()
        };
        assert!(
            no_priv_pass.validate().is_err(),
            "authPriv needs a priv pass"
        );
        for serial in [
            "",
            "a\"b",
            "a\\b",
            "line\nbreak",
            "é",
            "0123456789012345678901234567890123",
        ] {
            let spec = SnmpdSpec {
                serial: Some(serial.into()),
                ..SnmpdSpec::v2c("public", "sw-1")
            };
            assert!(spec.validate().is_err(), "serial {serial:?} accepted");
        }
        let spec = SnmpdSpec {
            model: Some("x".repeat(256)),
            ..SnmpdSpec::v2c("public", "sw-1")
        };
        assert!(spec.validate().is_err(), "a 256-byte model accepted");
    }
}
