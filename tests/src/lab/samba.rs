//! A real Active Directory in the lab: a Samba AD DC provisioned into the lab's temp dir and run
//! in a host namespace on a site LAN, with LDAPS on 636, plus helpers to create the accounts the
//! billable-user rules are about (disabled, expired, computer, contact, service, exclusion group,
//! stale logon) and thousands of users at once.
//!
//! The recipe (Debian 12, Samba 4.17):
//! - `samba-tool domain provision --targetdir <lab dir>/...` writes everything (smb.conf,
//!   sam.ldb, private/, state/) under the target dir; nothing goes to /etc/samba or
//!   /var/lib/samba. The generated smb.conf is then edited: no `dns forwarder` (provisioning
//!   copies the machine's resolver into it), only the `ldap` service (no DNS, KDC, NetBIOS or
//!   SMB: the lab needs LDAP alone, and fewer services start faster), bound to the DC's lab
//!   address only, with pid, socket and log directories inside the target dir.
//! - The LDAPS certificate: Samba can generate a self-signed one (`tls enabled = yes`), but it
//!   has no subjectAltName, and rustls (like browsers) matches names only against
//!   subjectAltName, so the agent could never verify it. The lab makes its own small CA with
//!   `openssl` and a server certificate naming the DC's FQDN and its IP address, and puts them
//!   where Samba looks for its own (`private/tls/{ca,cert,key}.pem`). [`SambaDc::ca_file`] is the
//!   CA a client trusts.
//! - `samba -i -M single -s <smb.conf>`: one foreground process. In `-i` mode Samba exits when
//!   its stdin reaches end of file, so the lab gives it a pipe it holds: if the test process dies
//!   (even by SIGKILL), Samba goes with it instead of running on in a namespace nobody owns.
//! - Accounts: `samba-tool ... -s <smb.conf>` works on the target dir's sam.ldb (it honours
//!   `-s`, checked by the lab's tests); bulk users go in as one LDIF through `ldbadd` on sam.ldb
//!   (1,200 users in about 3 s, against about 0.4 s per `samba-tool user add`), and Samba's own
//!   modules still give each one its objectSid, objectGUID and sAMAccountType 805306368.
//!   lastLogonTimestamp, which only logons set over the network, and whenCreated (to backdate an
//!   account) are written with `ldbmodify` on sam.ldb (which the LDAP server then serves as it
//!   is).
//!
//! Everything runs inside the DC's namespace (the lab's `exec`), the DC listens only on its
//! 198.18.0.0/15 address, and it all goes when the lab is dropped (the process is the lab's,
//! the files are in the lab's dir). A test process killed before its lab drops leaves no Samba
//! running (end of file on its stdin), and its namespaces and temp dir are removed by the next
//! [`Lab::new`] of any process, as for every lab.
//!
//! Once per test run: a DC takes about 7 s to provision and start (more on a loaded machine), so
//! each test binary that needs one provisions it once, in one test that makes every directory
//! assertion (the agent's reader in `agent/src/directory/tests.rs`, the lab's own check in
//! `tests/tests/e2e/directory.rs`), rather than keeping a process-wide DC that no `Drop` would
//! ever stop.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::cmd::{find_tool, run_bounded};
use super::{HostSpec, Lab, Proc, Site, check_addr};

/// The domain Administrator's password in every lab DC.
pub const SAMBA_ADMIN_PASSWORD: &str = "Census-Lab-Adm1n!";

/// How long provisioning may take (about 4 s alone; much more on a busy 2-core machine).
const PROVISION_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the DC may take from start to answering LDAPS.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// `ldbadd` of many users (1,200 take about 3 s).
const LDB_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the AD schema lives; without it provisioning fails half-way.
const SCHEMA_DIR: &str = "/usr/share/samba/setup/ad-schema";

/// sAMAccountType of a normal user account.
pub const SAM_USER_OBJECT: u32 = 805_306_368;

/// A running Samba AD DC in its own host namespace of a lab site.
pub struct SambaDc<'lab> {
    lab: &'lab Lab,
    ns: String,
    ip: Ipv4Addr,
    /// `--targetdir`: everything of this DC lives under it.
    dir: PathBuf,
    /// The Kerberos realm, upper case: `LAB.CENSUS.TEST`.
    realm: String,
    /// The NetBIOS domain: `LAB`.
    domain: String,
    /// `DC=lab,DC=census,DC=test`.
    base_dn: String,
    proc: Proc,
}

impl fmt::Debug for SambaDc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SambaDc")
            .field("ns", &self.ns)
            .field("ip", &self.ip)
            .field("realm", &self.realm)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// One entry of `ldapsearch` output: the DN and each value, attribute names lowercased, binary
/// values (`attr:: ...`) left in base64.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LdifEntry {
    pub dn: String,
    pub attrs: Vec<(String, String)>,
}

impl LdifEntry {
    /// Every value of `name` (any case).
    pub fn values(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.attrs
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values(name).into_iter().next()
    }
}

impl Lab {
    /// Provisions a Samba AD DC for `realm` (e.g. `lab.census.test`; the NetBIOS domain is its
    /// first label) in a new host at `ip` on `site`'s LAN, starts it, and returns once LDAPS
    /// answers with the lab CA's certificate (bounded: 120 s after provisioning).
    pub fn samba_dc<'lab>(
        &'lab self,
        site: &Site<'lab>,
        ip: Ipv4Addr,
        realm: &str,
    ) -> Result<SambaDc<'lab>> {
        ensure!(
            std::ptr::eq(site.lab, self),
            "the site belongs to another lab"
        );
        check_addr(ip, "DC address")?;
        let (realm, domain, base_dn) = realm_names(realm)?;
        let samba_tool = find_tool("samba-tool", "samba-ad-dc")?;
        let samba = find_tool("samba", "samba")?;
        find_tool("ldbmodify", "ldb-tools")?;
        find_tool("ldapsearch", "ldap-utils")?;
        find_tool("openssl", "openssl")?;
        if !Path::new(SCHEMA_DIR).is_dir() {
            bail!(
                "the lab's Samba DC needs the AD schema in {SCHEMA_DIR}: apt-get install -y \
                 samba-ad-provision (or set CENSUS_SKIP_LAB=1 to skip lab tests)"
            );
        }
        let host = site.add_host(HostSpec::new(ip))?;
        let ns = host.ns().to_owned();
        let dir = self.new_file("samba-dc")?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the DC's dir {}", dir.display()))?;

        let started = Instant::now();
        let dir_arg = dir.display().to_string();
        let provision = [
            samba_tool.display().to_string(),
            "domain".into(),
            "provision".into(),
            "--use-rfc2307".into(),
            format!("--realm={realm}"),
            format!("--domain={domain}"),
            "--server-role=dc".into(),
            "--dns-backend=SAMBA_INTERNAL".into(),
            format!("--adminpass={SAMBA_ADMIN_PASSWORD}"),
            format!("--targetdir={dir_arg}"),
            "--host-name=dc1".into(),
            format!("--host-ip={ip}"),
        ];
        let out = self.exec_timeout(&ns, &provision, PROVISION_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "samba-tool domain provision failed ({}): {}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 15)
            );
        }
        let provisioned = started.elapsed();

        let conf = dir.join("etc/smb.conf");
        let generated = std::fs::read_to_string(&conf)
            .with_context(|| format!("reading the generated {}", conf.display()))?;
        std::fs::write(&conf, lab_smb_conf(&generated, &dir, ip))
            .with_context(|| format!("writing {}", conf.display()))?;
        for sub in ["run", "log"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let fqdn = format!("dc1.{}", realm.to_ascii_lowercase());
        self.make_certificates(&ns, &dir.join("private/tls"), &fqdn, ip)?;

        let log = self.new_file("samba.log")?;
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = self.command(&ns, &samba);
        cmd.args(["-i", "-M", "single", "-s"])
            .arg(&conf)
            // Samba -i exits at end of file on stdin: the pipe ends with this process.
            .stdin(Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out);
        let proc = self.spawn_command(cmd)?;
        let dc = SambaDc {
            lab: self,
            ns,
            ip,
            dir,
            realm,
            domain,
            base_dn,
            proc,
        };
        dc.wait_ready(&log)?;
        eprintln!(
            "lab: Samba AD DC {} at {ip} provisioned in {} ms, answering LDAPS after {} ms",
            dc.realm,
            provisioned.as_millis(),
            started.elapsed().as_millis()
        );
        Ok(dc)
    }

    /// A CA and a server certificate for `fqdn` and `ip`, where Samba reads its own.
    fn make_certificates(&self, ns: &str, tls: &Path, fqdn: &str, ip: Ipv4Addr) -> Result<()> {
        std::fs::create_dir_all(tls)?;
        let p = |name: &str| tls.join(name).display().to_string();
        let ext = tls.join("server.ext");
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{fqdn},IP:{ip}\n"
            ),
        )?;
        let steps: [Vec<String>; 3] = [
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/O=Census lab/CN=Census lab CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
            ]
            .map(String::from)
            .into_iter()
            .chain([p("ca.key"), "-out".into(), p("ca.pem")])
            .collect(),
            ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj"]
                .map(String::from)
                .into_iter()
                .chain([
                    format!("/O=Census lab/CN={fqdn}"),
                    "-keyout".into(),
                    p("key.pem"),
                    "-out".into(),
                    p("server.csr"),
                ])
                .collect(),
            [
                "openssl",
                "x509",
                "-req",
                "-days",
                "30",
                "-CAcreateserial",
                "-in",
            ]
            .map(String::from)
            .into_iter()
            .chain([
                p("server.csr"),
                "-CA".into(),
                p("ca.pem"),
                "-CAkey".into(),
                p("ca.key"),
                "-extfile".into(),
                ext.display().to_string(),
                "-out".into(),
                p("cert.pem"),
            ])
            .collect(),
        ];
        for step in steps {
            self.exec_ok(ns, &step)
                .context("making the lab DC's certificates")?;
        }
        // Samba refuses a private key others can read.
        std::fs::set_permissions(
            tls.join("key.pem"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        Ok(())
    }
}

/// A time as LDAP's GeneralizedTime, the way AD writes whenCreated: `20240102030405.0Z`.
pub fn generalized_time(unix_secs: u64) -> String {
    // 2024-01-02T03:04:05Z -> 20240102030405
    let rfc3339 = census_collector::snapshot::rfc3339(unix_secs.saturating_mul(1000));
    let digits: String = rfc3339.chars().filter(char::is_ascii_digit).collect();
    format!("{digits}.0Z")
}

/// `lab.census.test` as (`LAB.CENSUS.TEST`, `LAB`, `DC=lab,DC=census,DC=test`).
fn realm_names(realm: &str) -> Result<(String, String, String)> {
    let labels: Vec<&str> = realm.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        bail!("realm {realm:?} is not a DNS name of two or more labels");
    }
    let domain = labels[0].to_ascii_uppercase();
    if domain.len() > 15 {
        bail!("realm {realm:?}: its first label is the NetBIOS name, at most 15 characters");
    }
    let base_dn = labels
        .iter()
        .map(|l| format!("DC={}", l.to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    Ok((realm.to_ascii_uppercase(), domain, base_dn))
}

/// The provisioned smb.conf made a lab's: overridden lines dropped, the lab's added to
/// `[global]`.
fn lab_smb_conf(generated: &str, dir: &Path, ip: Ipv4Addr) -> String {
    let d = dir.display();
    let ours = [
        "server services = ldap".to_string(),
        format!("interfaces = {ip}"),
        "bind interfaces only = yes".into(),
        "tls enabled = yes".into(),
        format!("log file = {d}/log/samba.log"),
        format!("pid directory = {d}/run"),
        format!("ncalrpc dir = {d}/run/ncalrpc"),
        format!("winbindd socket directory = {d}/run/winbindd"),
        format!("ntp signd socket directory = {d}/run/ntp_signd"),
    ];
    let overridden = |line: &str| {
        let key = line.split('=').next().unwrap_or_default().trim();
        key == "dns forwarder"
            || ours
                .iter()
                .any(|o| o.split('=').next().unwrap_or_default().trim() == key)
    };
    let mut out = String::from("# provisioned by samba-tool, edited by the Census lab\n");
    for line in generated.lines() {
        if overridden(line) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.trim() == "[global]" {
            for o in &ours {
                out.push('\t');
                out.push_str(o);
                out.push('\n');
            }
        }
    }
    out
}

impl<'lab> SambaDc<'lab> {
    pub fn ns(&self) -> &str {
        &self.ns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ldaps://<ip>:636`.
    pub fn url(&self) -> String {
        format!("ldaps://{}:636", self.ip)
    }

    /// `ldap://<ip>:389`, for StartTLS.
    pub fn ldap_url(&self) -> String {
        format!("ldap://{}:389", self.ip)
    }

    /// `LAB.CENSUS.TEST`.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// `lab.census.test`.
    pub fn dns_domain(&self) -> String {
        self.realm.to_ascii_lowercase()
    }

    /// The NetBIOS domain, `LAB`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// `DC=lab,DC=census,DC=test`.
    pub fn base_dn(&self) -> &str {
        &self.base_dn
    }

    /// The DC's host name, `dc1.lab.census.test`, which its certificate names (with its IP).
    pub fn fqdn(&self) -> String {
        format!("dc1.{}", self.dns_domain())
    }

    /// The provisioning target dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn smb_conf(&self) -> PathBuf {
        self.dir.join("etc/smb.conf")
    }

    pub fn sam_ldb(&self) -> PathBuf {
        self.dir.join("private/sam.ldb")
    }

    /// The PEM of the CA that issued the DC's LDAPS certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("private/tls/ca.pem")
    }

    /// `Administrator@lab.census.test`, a bind name Active Directory accepts.
    pub fn admin_upn(&self) -> String {
        format!("Administrator@{}", self.dns_domain())
    }

    pub fn admin_password(&self) -> &str {
        SAMBA_ADMIN_PASSWORD
    }

    /// The `samba` process.
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Stops the DC (the lab would on drop).
    pub fn stop(&self) -> Result<()> {
        self.proc.kill()
    }

    /// The DN `samba-tool user add NAME` gives a user created without given name or surname.
    pub fn user_dn(&self, name: &str) -> String {
        format!("CN={name},CN=Users,{}", self.base_dn)
    }

    /// `samba-tool ARGS -s <smb.conf>` in the DC's namespace; its stdout, or an error quoting
    /// stderr.
    pub fn samba_tool<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let mut argv: Vec<String> = vec!["samba-tool".into()];
        argv.extend(args.iter().map(|a| a.as_ref().to_owned()));
        argv.push("-s".into());
        argv.push(self.smb_conf().display().to_string());
        self.lab.exec_ok(&self.ns, &argv)
    }

    /// `samba-tool user add NAME PASSWORD`: an enabled user, CN=NAME in CN=Users.
    pub fn add_user(&self, name: &str, password: &str) -> Result<()> {
        self.samba_tool(&["user", "add", name, password]).map(drop)
    }

    /// `samba-tool user disable`: userAccountControl gains ACCOUNTDISABLE (0x2).
    pub fn disable_user(&self, name: &str) -> Result<()> {
        self.samba_tool(&["user", "disable", name]).map(drop)
    }

    /// `samba-tool user setexpiry --days=N`: accountExpires N days from now (0: now, expired).
    pub fn set_expiry_days(&self, name: &str, days: u32) -> Result<()> {
        self.samba_tool(&["user", "setexpiry", name, &format!("--days={days}")])
            .map(drop)
    }

    pub fn add_group(&self, name: &str) -> Result<()> {
        self.samba_tool(&["group", "add", name]).map(drop)
    }

    pub fn add_group_members(&self, group: &str, members: &[&str]) -> Result<()> {
        self.samba_tool(&["group", "addmembers", group, &members.join(",")])
            .map(drop)
    }

    /// `samba-tool computer add NAME`: sAMAccountName `NAME$`, objectClass computer.
    pub fn add_computer(&self, name: &str) -> Result<()> {
        self.samba_tool(&["computer", "add", name]).map(drop)
    }

    /// `samba-tool contact add NAME`: a person that is no user (objectClass contact).
    pub fn add_contact(&self, name: &str) -> Result<()> {
        self.samba_tool(&["contact", "add", name]).map(drop)
    }

    /// `samba-tool spn add SPN USER`: a servicePrincipalName, the mark of a service account.
    pub fn add_spn(&self, spn: &str, user: &str) -> Result<()> {
        self.samba_tool(&["spn", "add", spn, user]).map(drop)
    }

    /// Replaces attribute `attr` of `dn` with `values` directly in sam.ldb (`ldbmodify`), for
    /// what samba-tool cannot set (lastLogonTimestamp, displayName).
    pub fn set_attribute(&self, dn: &str, attr: &str, values: &[&str]) -> Result<()> {
        check_ldif_word(attr)?;
        let mut ldif = format!(
            "dn:: {}\nchangetype: modify\nreplace: {attr}\n",
            base64(dn.as_bytes())
        );
        for v in values {
            ldif.push_str(&format!("{attr}:: {}\n", base64(v.as_bytes())));
        }
        ldif.push_str("-\n");
        self.ldb("ldbmodify", ldif)
    }

    /// lastLogonTimestamp of user `name` (a FILETIME: 100 ns ticks since 1601), as if the
    /// account last logged on then.
    pub fn set_last_logon(&self, name: &str, filetime: i64) -> Result<()> {
        self.set_attribute(
            &self.user_dn(name),
            "lastLogonTimestamp",
            &[&filetime.to_string()],
        )
    }

    /// whenCreated of user `name`, as if the account had been made at `unix_secs` (samba-tool
    /// always makes it now). Written in sam.ldb as lastLogonTimestamp is; the LDAP server then
    /// serves it as AD would.
    pub fn set_when_created(&self, name: &str, unix_secs: u64) -> Result<()> {
        self.set_attribute(
            &self.user_dn(name),
            "whenCreated",
            &[&generalized_time(unix_secs)],
        )
    }

    /// `count` enabled users `<prefix>00000`, `<prefix>00001`, ... in one `ldbadd`; returns
    /// their names.
    pub fn add_bulk_users(&self, prefix: &str, count: usize) -> Result<Vec<String>> {
        check_ldif_word(prefix)?;
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i:05}")).collect();
        let mut ldif = String::with_capacity(count * 200);
        for name in &names {
            ldif.push_str(&format!(
                "dn: {}\nobjectClass: user\nsAMAccountName: {name}\nuserPrincipalName: \
                 {name}@{}\ndisplayName: Bulk user {name}\nuserAccountControl: 512\n\n",
                self.user_dn(name),
                self.dns_domain()
            ));
        }
        self.ldb("ldbadd", ldif)?;
        Ok(names)
    }

    /// `count` groups `<prefix>00000`, ... each with `member` in it, in one `ldbadd`.
    pub fn add_bulk_groups(&self, prefix: &str, count: usize, member: &str) -> Result<()> {
        check_ldif_word(prefix)?;
        let mut ldif = String::new();
        for i in 0..count {
            let name = format!("{prefix}{i:05}");
            ldif.push_str(&format!(
                "dn: CN={name},CN=Users,{}\nobjectClass: group\nsAMAccountName: {name}\n\
                 member:: {}\n\n",
                self.base_dn,
                base64(member.as_bytes())
            ));
        }
        self.ldb("ldbadd", ldif)
    }

    /// `ldapsearch` over LDAPS from namespace `from` (one of the lab's), bound as
    /// Administrator, verifying the DC's certificate against [`SambaDc::ca_file`].
    pub fn search_from(&self, from: &str, filter: &str, attrs: &[&str]) -> Result<Vec<LdifEntry>> {
        let out = self.search_as(from, &self.admin_upn(), SAMBA_ADMIN_PASSWORD, filter, attrs)?;
        if !out.status.success() {
            bail!(
                "ldapsearch {filter} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(parse_ldif(&String::from_utf8_lossy(&out.stdout)))
    }

    /// `ldapsearch` over LDAPS from `from`, bound as `bind_dn` with `password`, whatever its
    /// exit status (49 is invalidCredentials), under a deadline.
    pub fn search_as(
        &self,
        from: &str,
        bind_dn: &str,
        password: &str,
        filter: &str,
        attrs: &[&str],
    ) -> Result<std::process::Output> {
        let mut cmd = self.ldapsearch_command(from, &self.url());
        cmd.args(["-D", bind_dn, "-w", password, "-b", &self.base_dn])
            .arg(filter)
            .args(attrs);
        run_bounded(cmd, None, Duration::from_secs(60))
    }

    /// `ldbsearch` on sam.ldb in the DC's namespace: the database itself, not LDAP, and with
    /// objectGUID and objectSid in their text forms (`640e3632-c4c8-...`, `S-1-5-21-...`), an
    /// independent reading to compare a client's decoding with.
    pub fn ldbsearch(&self, filter: &str, attrs: &[&str]) -> Result<Vec<LdifEntry>> {
        let mut cmd = self.lab.command(&self.ns, "ldbsearch");
        cmd.arg("-H").arg(self.sam_ldb()).arg(filter).args(attrs);
        let out = run_bounded(cmd, None, LDB_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "ldbsearch {filter} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(parse_ldif(&String::from_utf8_lossy(&out.stdout)))
    }

    /// [`SambaDc::search_from`] the DC's own namespace.
    pub fn search(&self, filter: &str, attrs: &[&str]) -> Result<Vec<LdifEntry>> {
        self.search_from(&self.ns, filter, attrs)
    }

    // --- internals ---

    /// `ldapsearch -LLL -H URL` in `ns` trusting only the lab CA, no config files of the machine.
    fn ldapsearch_command(&self, ns: &str, url: &str) -> std::process::Command {
        let mut cmd = self.lab.command(ns, "ldapsearch");
        cmd.env("LDAPCONF", "/dev/null")
            .env("LDAPRC", "/dev/null")
            .env("HOME", &self.dir)
            .env("LDAPTLS_CACERT", self.ca_file())
            .env("LDAPTLS_REQCERT", "demand")
            .args([
                "-LLL",
                "-o",
                "nettimeout=5",
                "-o",
                "ldif-wrap=no",
                "-H",
                url,
            ]);
        cmd
    }

    /// Runs `tool` (`ldbadd`, `ldbmodify`) on sam.ldb with `ldif` on stdin.
    fn ldb(&self, tool: &str, ldif: String) -> Result<()> {
        let mut cmd = self.lab.command(&self.ns, tool);
        cmd.arg("-H").arg(self.sam_ldb());
        let out = run_bounded(cmd, Some(ldif), LDB_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "{tool} on {} failed ({}): {} {}",
                self.sam_ldb().display(),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Polls an anonymous rootDSE read over LDAPS, verified against the lab CA, until it
    /// answers; fails early, with Samba's log, if Samba exits.
    fn wait_ready(&self, log: &Path) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if !self.proc.is_running() {
                bail!(
                    "samba exited before answering LDAPS:\n{}",
                    tail(&std::fs::read_to_string(log).unwrap_or_default(), 30)
                );
            }
            let mut cmd = self.ldapsearch_command(&self.ns, &self.url());
            cmd.args(["-x", "-b", "", "-s", "base", "defaultNamingContext"]);
            let out = run_bounded(cmd, None, Duration::from_secs(10))?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&self.base_dn)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the lab DC did not answer LDAPS on {} within {READY_TIMEOUT:?}: {}\n{}",
                    self.url(),
                    String::from_utf8_lossy(&out.stderr).trim(),
                    tail(&std::fs::read_to_string(log).unwrap_or_default(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Names the lab writes into LDIF unencoded: letters, digits, `-` and `_`.
fn check_ldif_word(word: &str) -> Result<()> {
    if word.is_empty()
        || !word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("{word:?} must be letters, digits, - and _ only");
    }
    Ok(())
}

/// `ldapsearch -LLL -o ldif-wrap=no` output as entries (continuation lines are unfolded too,
/// for output that wraps anyway; comments and referrals are skipped).
pub fn parse_ldif(text: &str) -> Vec<LdifEntry> {
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        match (line.strip_prefix(' '), lines.last_mut()) {
            (Some(rest), Some(last)) => last.push_str(rest),
            _ => lines.push(line.to_owned()),
        }
    }
    let mut entries = Vec::new();
    let mut current: Option<LdifEntry> = None;
    for line in lines {
        if line.is_empty() {
            entries.extend(current.take());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some((attr, value)) = line.split_once(':') else {
            continue;
        };
        let value = value
            .strip_prefix(':')
            .unwrap_or(value)
            .trim_start()
            .to_owned();
        let attr = attr.to_ascii_lowercase();
        if attr == "dn" {
            entries.extend(current.take());
            current = Some(LdifEntry {
                dn: value,
                attrs: Vec::new(),
            });
        } else if let Some(entry) = current.as_mut() {
            entry.attrs.push((attr, value));
        }
    }
    entries.extend(current);
    entries
}

/// Standard base64 with padding (LDIF's `attr:: value`).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realms_give_netbios_names_and_base_dns() {
        let (realm, domain, base) = realm_names("lab.census.test").expect("valid");
        assert_eq!(realm, "LAB.CENSUS.TEST");
        assert_eq!(domain, "LAB");
        assert_eq!(base, "DC=lab,DC=census,DC=test");
        assert!(realm_names("single").is_err());
        assert!(realm_names("a..b").is_err());
        assert!(realm_names("bad,dn.test").is_err());
        assert!(realm_names("sixteencharacter.test").is_err());
    }

    #[test]
    fn the_smb_conf_is_made_the_labs() {
        let generated = "# Global parameters\n[global]\n\tdns forwarder = 10.255.255.53\n\
                         \tlog file = /var/log/samba/log.%m\n\trealm = LAB.CENSUS.TEST\n\
                         \n[sysvol]\n\tpath = /x/state/sysvol\n";
        let conf = lab_smb_conf(
            generated,
            Path::new("/tmp/dc"),
            Ipv4Addr::new(198, 18, 0, 10),
        );
        assert!(!conf.contains("dns forwarder"), "{conf}");
        assert!(!conf.contains("/var/log"), "{conf}");
        assert!(conf.contains("\tinterfaces = 198.18.0.10\n"), "{conf}");
        assert!(conf.contains("\tserver services = ldap\n"), "{conf}");
        assert!(conf.contains("\tpid directory = /tmp/dc/run\n"), "{conf}");
        assert!(conf.contains("\trealm = LAB.CENSUS.TEST\n"), "{conf}");
        assert!(conf.contains("[sysvol]"), "{conf}");
    }

    #[test]
    fn ldif_parses_folded_and_binary_values() {
        let text = "dn: CN=a,DC=lab\nobjectClass: top\nobjectClass: user\nobjectGUID:: MjYO\n\
                    memberOf: CN=Billing Exclusions,CN=Users,DC=lab,DC=ce\n nsus\n\n\
                    # refldaps://lab/CN=Configuration\n\ndn: CN=b,DC=lab\ncn: b\n";
        let entries = parse_ldif(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].dn, "CN=a,DC=lab");
        assert_eq!(entries[0].values("objectclass"), ["top", "user"]);
        assert_eq!(entries[0].get("objectGUID"), Some("MjYO"));
        assert_eq!(
            entries[0].get("memberOf"),
            Some("CN=Billing Exclusions,CN=Users,DC=lab,DC=census")
        );
        assert_eq!(entries[1].get("cn"), Some("b"));
    }

    #[test]
    fn generalized_time_is_what_ad_writes() {
        assert_eq!(generalized_time(1_704_164_645), "20240102030405.0Z");
        assert_eq!(generalized_time(0), "19700101000000.0Z");
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64("Zoë".as_bytes()), "Wm/Dqw==");
        assert!(check_ldif_word("bulk_user-1").is_ok());
        assert!(check_ldif_word("x\ndn: evil").is_err());
    }
}
