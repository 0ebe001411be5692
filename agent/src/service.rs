//! Running the agent as an operating-system service: `census-agent install` / `uninstall`, and
//! what a service control event does to the agent's shutdown token.
//!
//! Layout:
//! - `service.rs` (this file): what both platforms share: the default config and the files
//!   the binary carries, the error type.
//! - `service/systemd.rs`: Linux: places the unit, the binary and a default config, then
//!   `systemctl daemon-reload` and `enable`; and the reverse. Paths are parameters, so tests
//!   run it against a temp dir with `--no-systemctl`.
//! - `service/control.rs`: what each Windows service control does (stop, shutdown,
//!   interrogate) and which state the service reports: I/O-free, so tested on Linux.
//! - `service/windows.rs` (Windows only): registration with the service control manager and
//!   the service entry, which runs the same `run(config, options, shutdown)` as `census-agent
//!   run`, with Stop and Shutdown cancelling the shutdown token that a signal cancels on Unix.

pub mod control;
#[cfg(target_os = "linux")]
pub mod systemd;
#[cfg(windows)]
pub mod windows;

use std::path::{Path, PathBuf};

use census_proto::transport::Credentials;

use crate::config::Config;

/// The service's name, for systemd (`census-agent.service`) and for the Windows service
/// control manager alike.
pub const SERVICE_NAME: &str = "census-agent";

/// The example configuration (`deploy/config/agent.toml`), written by `install` when there is
/// no config yet. It does not validate as it is (its collector is an example): the operator
/// edits it, and `install` says so.
pub const DEFAULT_CONFIG: &str = include_str!("../../deploy/config/agent.toml");

/// The collector's CA certificate beside the config, placed by `install --ca-file` for the
/// service's first start to enroll with (it is public: mode 0644 on Linux).
pub const CA_FILE_NAME: &str = "agent-ca.pem";

/// Why `install` or `uninstall` failed. Each is one line saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    NotRoot(String),
    #[error(
        "systemd is not running on this machine (no /run/systemd/system): install the unit \
         by hand, or run with --no-systemctl to only place the files"
    )]
    NoSystemd,
    #[error("{path}: {message}")]
    Path { path: PathBuf, message: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    /// Installed, but the config does not validate, so the service was not started.
    #[error("{0}")]
    NotStarted(String),
    #[error("{0}")]
    Platform(String),
}

/// Removes the file at `path`; whether it was there.
#[cfg(any(target_os = "linux", windows))]
fn remove_file(path: &Path) -> Result<bool, ServiceError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ServiceError::io("removing", path, e)),
    }
}

/// `uninstall` without `--purge`: the line saying what it kept.
#[cfg(any(target_os = "linux", windows))]
fn kept(config: &Path, state_dir: &Path) -> String {
    format!(
        "kept the config {} and the state in {} (--purge removes them)",
        config.display(),
        state_dir.display()
    )
}

/// `uninstall --purge`: removes `files` (the config, the token and the CA beside it), a line
/// in `done` for each that was there.
#[cfg(any(target_os = "linux", windows))]
fn remove_files(files: &[PathBuf], done: &mut Vec<String>) -> Result<(), ServiceError> {
    for file in files {
        if remove_file(file)? {
            done.push(format!("removed {}", file.display()));
        }
    }
    Ok(())
}

impl ServiceError {
    /// An I/O error while doing `action` on `path`, with a hint when it is a permission error.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            return ServiceError::NotRoot(format!(
                "{action} {}: permission denied: run as root (sudo census-agent ...), or choose \
                 writable paths with --unit-dir, --bin-dir and --config-path",
                path.display()
            ));
        }
        ServiceError::Io {
            action,
            path,
            source,
        }
    }
}

/// What the operator asked `install` or `uninstall` for; `None` paths take the platform's
/// defaults.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Linux only: the systemd unit directory.
    pub unit_dir: Option<PathBuf>,
    pub bin_dir: Option<PathBuf>,
    pub config_path: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// Linux only: run `systemctl` (off: only place or remove the files).
    pub systemctl: bool,
    /// `install`: the collector's CA certificate, copied beside the config as
    /// [`CA_FILE_NAME`].
    pub ca_file: Option<PathBuf>,
    /// `install`: also start the service, once its config validates.
    pub now: bool,
    /// `uninstall`: also remove the config, the token and the state.
    pub purge: bool,
}

/// `census-agent install`: returns one line per thing done.
pub fn install(req: &Request) -> Result<Vec<String>, ServiceError> {
    let binary = std::env::current_exe()
        .map_err(|e| ServiceError::Platform(format!("cannot locate the running binary: {e}")))?;
    #[cfg(target_os = "linux")]
    {
        systemd::install(&systemd::InstallOptions {
            paths: systemd_paths(req),
            binary,
            ca_file: req.ca_file.clone(),
            systemctl: req.systemctl,
            now: req.now,
        })
    }
    #[cfg(windows)]
    {
        refuse_linux_flags(req)?;
        windows::install(&windows::InstallOptions {
            paths: windows_paths(req),
            binary,
            ca_file: req.ca_file.clone(),
            now: req.now,
        })
    }
    #[cfg(not(any(target_os = "linux", windows)))]
    {
        let _ = (req, binary);
        Err(unsupported())
    }
}

/// `census-agent uninstall`: returns one line per thing done.
pub fn uninstall(req: &Request) -> Result<Vec<String>, ServiceError> {
    #[cfg(target_os = "linux")]
    {
        systemd::uninstall(&systemd::UninstallOptions {
            paths: systemd_paths(req),
            systemctl: req.systemctl,
            purge: req.purge,
        })
    }
    #[cfg(windows)]
    {
        refuse_linux_flags(req)?;
        windows::uninstall(&windows::UninstallOptions {
            paths: windows_paths(req),
            purge: req.purge,
        })
    }
    #[cfg(not(any(target_os = "linux", windows)))]
    {
        let _ = req;
        Err(unsupported())
    }
}

#[cfg(target_os = "linux")]
fn systemd_paths(req: &Request) -> systemd::Paths {
    let d = systemd::Paths::default();
    systemd::Paths {
        unit_dir: req.unit_dir.clone().unwrap_or(d.unit_dir),
        bin_dir: req.bin_dir.clone().unwrap_or(d.bin_dir),
        config_path: req.config_path.clone().unwrap_or(d.config_path),
        state_dir: req.state_dir.clone().unwrap_or(d.state_dir),
    }
}

#[cfg(windows)]
fn windows_paths(req: &Request) -> windows::Paths {
    let d = windows::Paths::default();
    windows::Paths {
        bin_dir: req.bin_dir.clone().unwrap_or(d.bin_dir),
        config_path: req.config_path.clone().unwrap_or(d.config_path),
        state_dir: req.state_dir.clone().unwrap_or(d.state_dir),
    }
}

#[cfg(windows)]
fn refuse_linux_flags(req: &Request) -> Result<(), ServiceError> {
    if req.unit_dir.is_some() || !req.systemctl {
        return Err(ServiceError::Platform(
            "--unit-dir and --no-systemctl are for Linux (systemd); Windows registers the \
             service with the service control manager"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", windows)))]
fn unsupported() -> ServiceError {
    ServiceError::Platform(
        "installing as a service is supported on Linux (systemd) and Windows; elsewhere run \
         `census-agent run --config FILE` under the platform's service manager"
            .into(),
    )
}

/// Reads the CA certificate `install --ca-file` was given, refusing a file that holds none
/// (so the service's first start does not find out).
pub fn read_ca(path: &Path) -> Result<String, ServiceError> {
    crate::enroll::read_ca_file(path).map_err(|e| ServiceError::Path {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Loads and validates the config the way the service will start with it: `token_file` the
/// token the service is handed, `ca_file` the CA installed beside the config (if any), and
/// (`state_dir_made_at_start`) no check of a state directory that the service manager creates
/// only when it starts the service. The service's first start enrolls with the token, unless
/// one of `state_dirs` (where the service keeps its state) already holds a certificate: then
/// no token is needed (a reinstall of an enrolled agent).
pub fn check_config(
    config_path: &Path,
    token_path: &Path,
    ca_path: Option<&Path>,
    state_dir_made_at_start: bool,
    state_dirs: &[PathBuf],
) -> Result<(), String> {
    let mut c = Config::from_file(config_path).map_err(|e| e.to_string())?;
    c.token = None;
    c.token_file = Some(token_path.to_owned());
    if let Some(ca) = ca_path {
        c.ca_file = Some(ca.to_owned());
    }
    if state_dir_made_at_start {
        c.state_dir = None;
    }
    c.validate().map_err(|e| e.to_string())?;
    let enrolled = state_dirs
        .iter()
        .any(|d| Credentials::exist(&crate::enroll::identity_dir(d)));
    if enrolled {
        return Ok(());
    }
    c.token().map(|_| ()).map_err(|e| e.to_string())
}

/// The example config for Windows: [`DEFAULT_CONFIG`] with its Linux paths (`/etc/census/...`,
/// `/var/lib/census-agent`) moved under `data_dir` (`C:\ProgramData\Census`), as TOML literal
/// strings so backslashes stay as they are.
pub fn windows_config(data_dir: &str) -> String {
    let quoted = |path: String| {
        if path.contains('\'') || path.contains('\n') {
            format!("\"{}\"", path.replace('\\', "\\\\").replace('"', "\\\""))
        } else {
            format!("'{path}'")
        }
    };
    let mut out = String::with_capacity(DEFAULT_CONFIG.len());
    let mut rest = DEFAULT_CONFIG;
    while let Some(start) = rest.find("\"/") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('"') else {
            rest = &rest[start..];
            break;
        };
        let linux = &after[..end];
        let windows = if linux == "/var/lib/census-agent" {
            Some(format!("{data_dir}\\state"))
        } else {
            linux
                .strip_prefix("/etc/census/")
                .map(|name| format!("{data_dir}\\{}", name.replace('/', "\\")))
        };
        match windows {
            Some(w) => out.push_str(&quoted(w)),
            None => out.push_str(&rest[start..start + end + 2]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enrolled_agent_needs_no_token_to_be_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            "collector = \"https://198.19.0.1:7400\"\nscopes = [\"198.18.0.0/24\"]\n",
        )
        .expect("write");
        let token = dir.path().join("agent.token");
        let state = dir.path().join("state");
        let err = check_config(&config, &token, None, true, std::slice::from_ref(&state))
            .expect_err("neither a token nor a certificate");
        assert!(err.contains("token"), "{err}");
        Credentials {
            ca_pem: "ca".into(),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
        }
        .save(&crate::enroll::identity_dir(&state))
        .expect("save");
        check_config(
            &config,
            &token,
            None,
            true,
            &[dir.path().join("nope"), state],
        )
        .expect("enrolled: the token is not needed");
    }

    #[test]
    fn the_windows_config_moves_every_path_under_program_data() {
        let text = windows_config(r"C:\ProgramData\Census");
        assert!(!text.contains("\"/etc/census"), "{text}");
        assert!(!text.contains("\"/var/lib"), "{text}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &text).expect("write");
        let c = Config::from_file(&path).expect("the Windows example config parses");
        assert_eq!(
            c.token_file.as_deref(),
            Some(Path::new(r"C:\ProgramData\Census\agent.token"))
        );
        assert_eq!(
            c.state_dir.as_deref(),
            Some(Path::new(r"C:\ProgramData\Census\state"))
        );
        assert_eq!(
            c.collector,
            Config::from_file(&write(&dir, DEFAULT_CONFIG))
                .expect("linux")
                .collector
        );
    }

    #[test]
    fn an_odd_data_dir_still_makes_valid_toml() {
        let text = windows_config(r"D:\Data's\Census");
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Config::from_file(&write(&dir, &text)).expect("parses");
        assert_eq!(
            c.token_file.as_deref(),
            Some(Path::new(r"D:\Data's\Census\agent.token"))
        );
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join(format!("{}.toml", text.len()));
        std::fs::write(&path, text).expect("write");
        path
    }
}
