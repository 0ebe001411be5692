//! `census-agent install` / `uninstall` on Linux: the systemd unit (carried in the binary, from
//! `deploy/systemd/census-agent.service`), the binary in `/usr/local/bin`, an example config in
//! `/etc/census/agent.toml` when there is none, then `systemctl daemon-reload` and `enable`.
//!
//! Every path is a parameter and `systemctl` can be left out, so tests place the files in a
//! temp dir and never touch the machine's systemd. An operator's config is never overwritten
//! (it is created with `O_EXCL`), and `uninstall` keeps config and state unless `--purge`.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use super::{DEFAULT_CONFIG, SERVICE_NAME, ServiceError, remove_file};

/// The unit as shipped: it names the default paths below, which [`render_unit`] replaces.
pub const AGENT_UNIT: &str = include_str!("../../../deploy/systemd/census-agent.service");

/// Defaults: where the shipped unit expects things.
pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";
pub const DEFAULT_BIN_DIR: &str = "/usr/local/bin";
pub const DEFAULT_CONFIG_PATH: &str = "/etc/census/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/census-agent";
/// Where systemd really keeps a `DynamicUser=` service's `StateDirectory=` (the default state
/// dir is a symlink to it).
const PRIVATE_STATE_DIR: &str = "/var/lib/private/census-agent";
/// The name of the token file beside the config, which the unit hands to the service with
/// `LoadCredential=`.
pub const TOKEN_FILE_NAME: &str = "agent.token";

const SHIPPED_BIN: &str = "/usr/local/bin/census-agent";
const SHIPPED_CONFIG: &str = "/etc/census/agent.toml";
const SHIPPED_TOKEN: &str = "/etc/census/agent.token";
const SHIPPED_CA: &str = "/etc/census/agent-ca.pem";
/// The unit's line naming the CA, kept only when one is installed.
const CA_LINE_PREFIX: &str = "Environment=CENSUS_AGENT_CA_FILE=";

/// Where `install` puts things and `uninstall` removes them from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The unit's directory (`/etc/systemd/system`).
    pub unit_dir: PathBuf,
    /// Where the binary goes (`/usr/local/bin`).
    pub bin_dir: PathBuf,
    /// The config file (`/etc/census/agent.toml`); the token file is beside it.
    pub config_path: PathBuf,
    /// The state directory, removed only by `uninstall --purge` (`/var/lib/census-agent`).
    pub state_dir: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            unit_dir: DEFAULT_UNIT_DIR.into(),
            bin_dir: DEFAULT_BIN_DIR.into(),
            config_path: DEFAULT_CONFIG_PATH.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
        }
    }
}

impl Paths {
    pub fn unit_path(&self) -> PathBuf {
        self.unit_dir.join(format!("{SERVICE_NAME}.service"))
    }

    pub fn binary_path(&self) -> PathBuf {
        self.bin_dir.join(SERVICE_NAME)
    }

    pub fn token_path(&self) -> PathBuf {
        self.config_path
            .parent()
            .unwrap_or_else(|| Path::new("/"))
            .join(TOKEN_FILE_NAME)
    }

    /// The collector's CA certificate, beside the config.
    pub fn ca_path(&self) -> PathBuf {
        self.config_path
            .parent()
            .unwrap_or_else(|| Path::new("/"))
            .join(super::CA_FILE_NAME)
    }
}

/// What `install` does.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub paths: Paths,
    /// The binary to place (the running one).
    pub binary: PathBuf,
    /// The collector's CA certificate to place beside the config.
    pub ca_file: Option<PathBuf>,
    /// Run `systemctl` (off: only place the files).
    pub systemctl: bool,
    /// Also start the service (`enable --now`), once the config validates.
    pub now: bool,
}

/// What `uninstall` does.
#[derive(Debug, Clone)]
pub struct UninstallOptions {
    pub paths: Paths,
    pub systemctl: bool,
    /// Also remove the config, the token and the state directory.
    pub purge: bool,
}

/// Places the binary, the config (unless one exists) and the unit, then reloads systemd and
/// enables the unit. Returns one line per thing done, for the operator.
pub fn install(opts: &InstallOptions) -> Result<Vec<String>, ServiceError> {
    preflight(opts.systemctl, "install")?;
    let paths = &opts.paths;
    let ca = opts.ca_file.as_deref().map(super::read_ca).transpose()?;
    // Checked before anything is written: render_unit refuses paths a unit cannot name.
    render_unit(AGENT_UNIT, paths, true)?;
    let mut done = Vec::new();

    let binary = paths.binary_path();
    if same_file(&opts.binary, &binary) {
        done.push(format!("{} is already in place", binary.display()));
    } else {
        create_dir(&paths.bin_dir, 0o755)?;
        write_atomically(&binary, 0o755, |f| {
            let mut src = fs::File::open(&opts.binary)?;
            io::copy(&mut src, f).map(|_| ())
        })?;
        done.push(format!("placed {}", binary.display()));
    }

    if write_config_if_missing(&paths.config_path)? {
        done.push(format!(
            "wrote an example config to {} (mode 0600): edit it before starting the service",
            paths.config_path.display()
        ));
    } else {
        done.push(format!(
            "kept the existing config {}",
            paths.config_path.display()
        ));
    }

    let ca_path = paths.ca_path();
    if let Some(ca) = ca {
        if let Some(dir) = ca_path.parent() {
            create_dir(dir, 0o755)?;
        }
        // Public, and read in place by the service's dynamic user.
        write_atomically(&ca_path, 0o644, |f| f.write_all(ca.as_bytes()))?;
        done.push(format!(
            "placed the collector's CA certificate in {}",
            ca_path.display()
        ));
    }
    let unit = render_unit(AGENT_UNIT, paths, ca_path.is_file())?;

    create_dir(&paths.unit_dir, 0o755)?;
    let unit_path = paths.unit_path();
    write_atomically(&unit_path, 0o644, |f| f.write_all(unit.as_bytes()))?;
    done.push(format!("placed {}", unit_path.display()));

    if !opts.systemctl {
        done.push("not running systemctl (--no-systemctl)".into());
        return Ok(done);
    }
    systemctl(&["daemon-reload"])?;
    let unit_name = format!("{SERVICE_NAME}.service");
    // Start only what would pass the unit's own ExecStartPre: a config that does not validate
    // (the example one, a missing token) would just fail and restart every 10 s.
    let not_startable = if opts.now {
        check_config(paths).err()
    } else {
        None
    };
    match (&not_startable, opts.now) {
        (None, true) => {
            systemctl(&["enable", "--now", &unit_name])?;
            done.push(format!("enabled and started {unit_name}"));
        }
        _ => {
            systemctl(&["enable", &unit_name])?;
            done.push(format!("enabled {unit_name}"));
        }
    }
    if let Some(e) = not_startable {
        return Err(ServiceError::NotStarted(format!(
            "installed and enabled {unit_name}, but did not start it: {e}; fix {} (the \
             enrollment token goes in {}), then run: systemctl start {unit_name}",
            paths.config_path.display(),
            paths.token_path().display()
        )));
    }
    Ok(done)
}

/// Stops and disables the unit, removes it and the binary; with `purge`, also the config, the
/// token and the state. Returns one line per thing done.
pub fn uninstall(opts: &UninstallOptions) -> Result<Vec<String>, ServiceError> {
    preflight(opts.systemctl, "uninstall")?;
    let paths = &opts.paths;
    let unit_name = format!("{SERVICE_NAME}.service");
    let unit_path = paths.unit_path();
    let mut done = Vec::new();
    let installed = unit_path.exists();
    if opts.systemctl && installed {
        systemctl(&["disable", "--now", &unit_name])?;
        done.push(format!("stopped and disabled {unit_name}"));
    }
    if remove_file(&unit_path)? {
        done.push(format!("removed {}", unit_path.display()));
    } else {
        done.push(format!("{} was not there", unit_path.display()));
    }
    if opts.systemctl && installed {
        systemctl(&["daemon-reload"])?;
    }
    let binary = paths.binary_path();
    if remove_file(&binary)? {
        done.push(format!("removed {}", binary.display()));
    }
    if !opts.purge {
        done.push(super::kept(&paths.config_path, &paths.state_dir));
        return Ok(done);
    }
    super::remove_files(
        &[
            paths.config_path.clone(),
            paths.token_path(),
            paths.ca_path(),
        ],
        &mut done,
    )?;
    if let Some(dir) = paths.config_path.parent() {
        // Only if empty: the directory may hold other Census files (the collector's config).
        if fs::remove_dir(dir).is_ok() {
            done.push(format!("removed {}", dir.display()));
        }
    }
    let mut state_dirs = vec![paths.state_dir.clone()];
    if paths.state_dir == Path::new(DEFAULT_STATE_DIR) {
        state_dirs.push(PRIVATE_STATE_DIR.into());
    }
    for dir in state_dirs {
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(&dir).map_err(|e| ServiceError::io("removing", &dir, e))?;
                done.push(format!("removed {}", dir.display()));
            }
            Ok(_) => {
                remove_file(&dir)?;
            }
            Err(_) => {}
        }
    }
    Ok(done)
}

/// The shipped unit with its paths replaced by `paths`: the binary, the config, the token and
/// the CA; the line naming the CA only when `with_ca` (one is installed: a missing file would
/// fail the unit's `validate`). systemd splits `ExecStart=` on whitespace and expands `%`, so
/// such paths are refused.
pub fn render_unit(template: &str, paths: &Paths, with_ca: bool) -> Result<String, ServiceError> {
    let bin = unit_path_text(&paths.binary_path())?;
    let config = unit_path_text(&paths.config_path)?;
    let token = unit_path_text(&paths.token_path())?;
    let ca = unit_path_text(&paths.ca_path())?;
    let template: String = if with_ca {
        template.to_owned()
    } else {
        template
            .split_inclusive('\n')
            .filter(|line| !line.starts_with(CA_LINE_PREFIX))
            .collect()
    };
    // The CA and the token sit beside the config: the longer names first.
    Ok(template
        .replace(SHIPPED_BIN, &bin)
        .replace(SHIPPED_CA, &ca)
        .replace(SHIPPED_TOKEN, &token)
        .replace(SHIPPED_CONFIG, &config))
}

fn unit_path_text(path: &Path) -> Result<String, ServiceError> {
    let bad = |message: &str| ServiceError::Path {
        path: path.to_owned(),
        message: message.to_owned(),
    };
    let text = path
        .to_str()
        .ok_or_else(|| bad("not valid UTF-8, which a unit file cannot name"))?;
    if !path.is_absolute() {
        return Err(bad(
            "must be an absolute path (a unit names absolute paths)",
        ));
    }
    if text
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '%' | '"' | '\'' | '\\'))
    {
        return Err(bad(
            "a unit file cannot name it as is (spaces, quotes, backslashes and % have a \
             meaning there): choose another path",
        ));
    }
    Ok(text.to_owned())
}

/// Loads and validates the config as the unit's `ExecStartPre` will, with the token the unit
/// hands over; systemd creates the `StateDirectory=` only at start. An agent enrolled before
/// (a reinstall) needs no token: its state is where the unit keeps it, under `DynamicUser=`
/// in `/var/lib/private/`.
fn check_config(paths: &Paths) -> Result<(), String> {
    let ca = paths.ca_path();
    let mut state_dirs = vec![paths.state_dir.clone()];
    if let (Some(parent), Some(name)) = (paths.state_dir.parent(), paths.state_dir.file_name()) {
        state_dirs.push(parent.join("private").join(name));
    }
    super::check_config(
        &paths.config_path,
        &paths.token_path(),
        ca.is_file().then_some(ca.as_path()),
        true,
        &state_dirs,
    )
}

/// Refuses to touch the machine's systemd without root, or where systemd is not running.
/// Without `systemctl` nothing is checked: the paths decide what is written.
fn preflight(systemctl: bool, what: &str) -> Result<(), ServiceError> {
    if !systemctl {
        return Ok(());
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    check_preflight(
        effective_uid(&status),
        Path::new("/run/systemd/system").is_dir(),
        what,
    )
}

/// The decision of [`preflight`], I/O-free.
fn check_preflight(
    euid: Option<u32>,
    systemd_running: bool,
    what: &str,
) -> Result<(), ServiceError> {
    if euid != Some(0) {
        return Err(ServiceError::NotRoot(format!(
            "census-agent {what} must run as root: it writes {DEFAULT_UNIT_DIR} and runs \
             systemctl (sudo census-agent {what})"
        )));
    }
    if !systemd_running {
        return Err(ServiceError::NoSystemd);
    }
    Ok(())
}

/// The effective uid from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn systemctl(args: &[&str]) -> Result<(), ServiceError> {
    let command = format!("systemctl {}", args.join(" "));
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| ServiceError::Command {
            command: command.clone(),
            message: if e.kind() == io::ErrorKind::NotFound {
                "systemctl is not installed".into()
            } else {
                e.to_string()
            },
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(ServiceError::Command {
        command,
        message: stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .map_or_else(|| out.status.to_string(), |l| l.trim().to_owned()),
    })
}

// === files ===

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn create_dir(dir: &Path, mode: u32) -> Result<(), ServiceError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| ServiceError::io("creating", dir, e))
}

/// Writes `path` through a temp file in the same directory and a rename, so a reader (systemd,
/// a running service's next exec) never sees half a file; the rename also replaces a running
/// binary safely.
fn write_atomically(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> Result<(), ServiceError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.census-install-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        fill(&mut f)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ServiceError::io("writing", path, e)
    })
}

/// Writes the example config unless a file (or anything) is already there. `create_new` makes
/// the check and the creation one step: an operator's config is never overwritten. Mode 0600:
/// the config may hold SNMP communities; the unit hands it to the service with
/// `LoadCredential=`.
fn write_config_if_missing(path: &Path) -> Result<bool, ServiceError> {
    if fs::symlink_metadata(path).is_ok() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        create_dir(dir, 0o755)?;
    }
    let mut f = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(ServiceError::io("writing", path, e)),
    };
    f.write_all(DEFAULT_CONFIG.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| ServiceError::io("writing", path, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(root: &Path) -> Paths {
        Paths {
            unit_dir: root.join("units"),
            bin_dir: root.join("bin"),
            config_path: root.join("etc/agent.toml"),
            state_dir: root.join("state"),
        }
    }

    #[test]
    fn the_shipped_unit_names_the_defaults() {
        // render_unit replaces these strings: if the unit stops naming them, the replacement
        // silently does nothing.
        for s in [SHIPPED_BIN, SHIPPED_CONFIG, SHIPPED_TOKEN, SHIPPED_CA] {
            assert!(AGENT_UNIT.contains(s), "the unit no longer names {s}");
        }
        assert!(AGENT_UNIT.contains(&format!("\n{CA_LINE_PREFIX}{SHIPPED_CA}\n")));
        let same = render_unit(AGENT_UNIT, &Paths::default(), true).expect("defaults render");
        assert_eq!(same, AGENT_UNIT);
        let without = render_unit(AGENT_UNIT, &Paths::default(), false).expect("renders");
        assert!(!without.contains(CA_LINE_PREFIX), "{without}");
        assert_eq!(
            without.lines().count() + 1,
            AGENT_UNIT.lines().count(),
            "only the CA line goes"
        );
    }

    #[test]
    fn a_rendered_unit_names_the_given_paths() {
        let p = paths(Path::new("/opt/census"));
        let unit = render_unit(AGENT_UNIT, &p, true).expect("renders");
        assert!(!unit.contains("/usr/local/bin"), "{unit}");
        assert!(!unit.contains("/etc/census"), "{unit}");
        assert!(unit.contains("ExecStart=/opt/census/bin/census-agent run"));
        assert!(unit.contains("ExecStartPre=/opt/census/bin/census-agent validate"));
        assert!(unit.contains("LoadCredential=config:/opt/census/etc/agent.toml"));
        assert!(unit.contains("LoadCredential=token:/opt/census/etc/agent.token"));
        assert!(unit.contains("Environment=CENSUS_AGENT_CA_FILE=/opt/census/etc/agent-ca.pem"));
    }

    #[test]
    fn paths_a_unit_cannot_name_are_refused() {
        for bad in ["/opt/my census", "/opt/100%", "relative/dir", "/opt/a\"b"] {
            let p = Paths {
                bin_dir: bad.into(),
                ..Paths::default()
            };
            let e = render_unit(AGENT_UNIT, &p, false).expect_err(bad);
            assert!(e.to_string().starts_with(bad), "{e}");
        }
    }

    #[test]
    fn preflight_says_what_is_missing() {
        let e = check_preflight(Some(1000), true, "install").expect_err("not root");
        assert!(e.to_string().contains("must run as root"), "{e}");
        assert!(e.to_string().contains("sudo census-agent install"), "{e}");
        let e = check_preflight(Some(0), false, "uninstall").expect_err("no systemd");
        assert!(e.to_string().contains("systemd is not running"), "{e}");
        assert!(check_preflight(None, true, "install").is_err());
        assert!(check_preflight(Some(0), true, "install").is_ok());
        assert!(
            preflight(false, "install").is_ok(),
            "--no-systemctl checks nothing"
        );
    }

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tcensus-agent\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name: x\n"), None);
    }

    #[test]
    fn install_then_uninstall_in_a_temp_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        let binary = dir.path().join("built-agent");
        fs::write(&binary, b"#!/bin/true\n").expect("fake binary");
        let mut opts = InstallOptions {
            paths: p.clone(),
            binary,
            ca_file: None,
            systemctl: false,
            now: false,
        };
        let done = install(&opts).expect("install");
        assert!(done.iter().any(|l| l.contains("wrote an example config")));
        let unit = || fs::read_to_string(p.unit_path()).expect("unit");
        assert!(!unit().contains(CA_LINE_PREFIX), "no CA, no CA line");
        assert!(!p.ca_path().exists());
        let mode = |f: &Path| fs::metadata(f).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(&p.binary_path()), 0o755);
        assert_eq!(mode(&p.config_path), 0o600);
        assert_eq!(mode(&p.unit_path()), 0o644);
        assert_eq!(
            fs::read_to_string(&p.config_path).expect("config"),
            DEFAULT_CONFIG
        );

        // A second install keeps the operator's edits.
        fs::write(&p.config_path, "collector = \"http://mine\"\n").expect("edit");
        let done = install(&opts).expect("install again");
        assert!(done.iter().any(|l| l.contains("kept the existing config")));
        assert_eq!(
            fs::read_to_string(&p.config_path).expect("config"),
            "collector = \"http://mine\"\n"
        );

        // With the collector's CA: placed beside the config, readable, and named by the unit.
        let not_a_ca = dir.path().join("not-a-ca.pem");
        fs::write(&not_a_ca, "junk").expect("write");
        opts.ca_file = Some(not_a_ca);
        let err = install(&opts)
            .expect_err("no certificate in it")
            .to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let ca = rcgen::CertificateParams::new(vec!["collector".to_owned()])
            .and_then(|params| params.self_signed(&rcgen::KeyPair::generate()?))
            .expect("a CA")
            .pem();
        let ca_file = dir.path().join("ca.pem");
        fs::write(&ca_file, &ca).expect("write");
        opts.ca_file = Some(ca_file);
        let done = install(&opts).expect("install with a CA");
        assert!(
            done.iter().any(|l| l.contains("CA certificate")),
            "{done:?}"
        );
        assert_eq!(fs::read_to_string(p.ca_path()).expect("ca"), ca);
        assert_eq!(mode(&p.ca_path()), 0o644);
        assert!(unit().contains(&format!("{CA_LINE_PREFIX}{}\n", p.ca_path().display())));
        // A later install without --ca-file keeps using it.
        opts.ca_file = None;
        install(&opts).expect("install again");
        assert!(unit().contains(CA_LINE_PREFIX));

        fs::create_dir_all(&p.state_dir).expect("state");
        fs::write(p.state_dir.join("agent.json"), "{}").expect("state file");
        let done = uninstall(&UninstallOptions {
            paths: p.clone(),
            systemctl: false,
            purge: false,
        })
        .expect("uninstall");
        assert!(done.iter().any(|l| l.contains("kept the config")));
        assert!(!p.unit_path().exists());
        assert!(!p.binary_path().exists());
        assert!(p.config_path.exists());
        assert!(p.state_dir.join("agent.json").exists());

        uninstall(&UninstallOptions {
            paths: p.clone(),
            systemctl: false,
            purge: true,
        })
        .expect("purge");
        assert!(!p.config_path.exists());
        assert!(!p.ca_path().exists());
        assert!(!p.state_dir.exists());
        assert!(
            !dir.path().join("etc").exists(),
            "the emptied config dir goes"
        );
    }
}
