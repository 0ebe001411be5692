//! Windows: `census-agent install` / `uninstall` register and remove the `census-agent` service
//! with the service control manager, and `census-agent service` (what the registered service
//! runs) is the service entry.
//!
//! The entry runs the body `main.rs` hands it (the same `run(config, options, shutdown)` as
//! `census-agent run`) with a fresh root shutdown token; Stop and Shutdown cancel that token
//! (see `control.rs`, the same decision tested on Linux), the service reports StopPending
//! while the agent drains and Stopped, with the agent's exit code, once `run` has returned.
//!
//! Layout on disk: the binary in `%ProgramFiles%\Census`, config, token and state in
//! `%ProgramData%\Census` (readable by SYSTEM and Administrators only). The service runs as
//! LocalSystem: resolving neighbours through the IP Helper API may need an administrator.

use std::{
    ffi::{OsStr, OsString},
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::error;
use windows_service::{
    define_windows_service,
    service::{
        ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
        ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
        ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
    },
    service_control_handler::{self, ServiceControlHandlerResult, ServiceStatusHandle},
    service_dispatcher,
    service_manager::{ServiceManager, ServiceManagerAccess},
};

use super::{
    SERVICE_NAME, ServiceError, check_config,
    control::{self, Control, Reply, State, Status},
    remove_file, windows_config,
};

const DISPLAY_NAME: &str = "Census site agent";
const DESCRIPTION: &str = "Discovers the devices at this site (ARP, ICMP, SNMP, mDNS) and reports them to the Census collector.";
const TOKEN_FILE_NAME: &str = "agent.token";
/// How long `uninstall` waits for a running service to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

const ERROR_ACCESS_DENIED: i32 = 5;
const ERROR_SERVICE_DOES_NOT_EXIST: i32 = 1060;
const ERROR_SERVICE_EXISTS: i32 = 1073;
const ERROR_SERVICE_MARKED_FOR_DELETE: i32 = 1072;

/// Where `install` puts things and `uninstall` removes them from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub bin_dir: PathBuf,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        let data = known_dir("ProgramData", r"C:\ProgramData").join("Census");
        Paths {
            bin_dir: known_dir("ProgramFiles", r"C:\Program Files").join("Census"),
            config_path: data.join("agent.toml"),
            state_dir: data.join("state"),
        }
    }
}

impl Paths {
    fn binary_path(&self) -> PathBuf {
        self.bin_dir.join(format!("{SERVICE_NAME}.exe"))
    }

    fn data_dir(&self) -> PathBuf {
        self.config_path
            .parent()
            .map_or_else(|| PathBuf::from(r"C:\"), Path::to_owned)
    }

    fn token_path(&self) -> PathBuf {
        self.data_dir().join(TOKEN_FILE_NAME)
    }

    /// The collector's CA certificate, beside the config.
    fn ca_path(&self) -> PathBuf {
        self.data_dir().join(super::CA_FILE_NAME)
    }
}

fn known_dir(var: &str, fallback: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(fallback), PathBuf::from)
}

#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub paths: Paths,
    /// The binary to place (the running one).
    pub binary: PathBuf,
    /// The collector's CA certificate to place beside the config.
    pub ca_file: Option<PathBuf>,
    /// Also start the service, once its config validates.
    pub now: bool,
}

#[derive(Debug, Clone)]
pub struct UninstallOptions {
    pub paths: Paths,
    /// Also remove the config, the token and the state.
    pub purge: bool,
}

// === install, uninstall ===

/// Places the binary and (unless one exists) the example config, and registers the service
/// (or updates its registration) to start automatically and restart after a failure.
pub fn install(opts: &InstallOptions) -> Result<Vec<String>, ServiceError> {
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .map_err(|e| scm_error("install", "opening the service control manager", e))?;
    let paths = &opts.paths;
    let ca = opts.ca_file.as_deref().map(super::read_ca).transpose()?;
    let mut done = Vec::new();

    let data_dir = paths.data_dir();
    for dir in [&data_dir, &paths.state_dir, &paths.bin_dir] {
        fs::create_dir_all(dir).map_err(|e| ServiceError::io("creating", dir, e))?;
    }
    restrict_to_admins(&data_dir)?;

    let binary = paths.binary_path();
    if same_file(&opts.binary, &binary) {
        done.push(format!("{} is already in place", binary.display()));
    } else {
        fs::copy(&opts.binary, &binary).map_err(|e| ServiceError::io("writing", &binary, e))?;
        done.push(format!("placed {}", binary.display()));
    }

    if write_config_if_missing(&paths.config_path, &data_dir)? {
        done.push(format!(
            "wrote an example config to {}: edit it before starting the service",
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
        fs::write(&ca_path, ca).map_err(|e| ServiceError::io("writing", &ca_path, e))?;
        done.push(format!(
            "placed the collector's CA certificate in {}",
            ca_path.display()
        ));
    }
    let mut launch_arguments: Vec<OsString> = vec![
        "service".into(),
        "--config".into(),
        paths.config_path.clone().into_os_string(),
    ];
    // The service's first start enrolls trusting this CA.
    if ca_path.is_file() {
        launch_arguments.push("--ca-file".into());
        launch_arguments.push(ca_path.clone().into_os_string());
    }
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: binary.clone(),
        launch_arguments,
        dependencies: Vec::new(),
        // LocalSystem.
        account_name: None,
        account_password: None,
    };
    let access = ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::QUERY_STATUS;
    let service = match manager.create_service(&info, access) {
        Ok(s) => {
            done.push(format!("registered the service {SERVICE_NAME}"));
            s
        }
        Err(e) if os_code(&e) == Some(ERROR_SERVICE_EXISTS) => {
            let s = manager
                .open_service(SERVICE_NAME, access)
                .map_err(|e| scm_error("install", "opening the service", e))?;
            s.change_config(&info)
                .map_err(|e| scm_error("install", "updating the service", e))?;
            done.push(format!("updated the service {SERVICE_NAME}"));
            s
        }
        Err(e) => return Err(scm_error("install", "registering the service", e)),
    };
    service
        .set_description(DESCRIPTION)
        .map_err(|e| scm_error("install", "describing the service", e))?;
    // Like the systemd unit's Restart=on-failure, RestartSec=10s: an exit with an error code
    // counts as a failure too, not only a crash.
    service
        .update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
            reboot_msg: None,
            command: None,
            actions: Some(
                (0..3)
                    .map(|_| ServiceAction {
                        action_type: ServiceActionType::Restart,
                        delay: Duration::from_secs(10),
                    })
                    .collect(),
            ),
        })
        .and_then(|()| service.set_failure_actions_on_non_crash_failures(true))
        .map_err(|e| scm_error("install", "setting the restart policy", e))?;

    if opts.now {
        check_config(
            &paths.config_path,
            &paths.token_path(),
            ca_path.is_file().then_some(ca_path.as_path()),
            false,
            std::slice::from_ref(&paths.state_dir),
        )
        .map_err(|e| {
            ServiceError::NotStarted(format!(
                "installed the service {SERVICE_NAME}, but did not start it: {e}; fix {} (the \
                 enrollment token goes in {}), then run: sc.exe start {SERVICE_NAME}",
                paths.config_path.display(),
                paths.token_path().display()
            ))
        })?;
        service
            .start(&[] as &[&OsStr])
            .map_err(|e| scm_error("install", "starting the service", e))?;
        done.push(format!("started the service {SERVICE_NAME}"));
    }
    Ok(done)
}

/// Stops the service if it runs, removes its registration and the binary; with `purge`, also
/// the config, the token and the state.
pub fn uninstall(opts: &UninstallOptions) -> Result<Vec<String>, ServiceError> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .map_err(|e| scm_error("uninstall", "opening the service control manager", e))?;
    let paths = &opts.paths;
    let mut done = Vec::new();
    let access = ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE;
    match manager.open_service(SERVICE_NAME, access) {
        Ok(service) => {
            let status = service
                .query_status()
                .map_err(|e| scm_error("uninstall", "querying the service", e))?;
            if status.current_state != ServiceState::Stopped {
                if status.current_state != ServiceState::StopPending {
                    service
                        .stop()
                        .map_err(|e| scm_error("uninstall", "stopping the service", e))?;
                }
                let deadline = Instant::now() + STOP_TIMEOUT;
                loop {
                    let state = service
                        .query_status()
                        .map_err(|e| scm_error("uninstall", "querying the service", e))?
                        .current_state;
                    if state == ServiceState::Stopped {
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(ServiceError::Platform(format!(
                            "the service {SERVICE_NAME} did not stop within {} s; stop it \
                             (sc.exe stop {SERVICE_NAME}) and run uninstall again",
                            STOP_TIMEOUT.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                done.push(format!("stopped the service {SERVICE_NAME}"));
            }
            match service.delete() {
                Ok(()) => {}
                Err(e) if os_code(&e) == Some(ERROR_SERVICE_MARKED_FOR_DELETE) => {}
                Err(e) => return Err(scm_error("uninstall", "removing the service", e)),
            }
            done.push(format!("removed the service {SERVICE_NAME}"));
        }
        Err(e) if os_code(&e) == Some(ERROR_SERVICE_DOES_NOT_EXIST) => {
            done.push(format!("the service {SERVICE_NAME} was not registered"));
        }
        Err(e) => return Err(scm_error("uninstall", "opening the service", e)),
    }

    let binary = paths.binary_path();
    let running = std::env::current_exe()
        .map(|exe| same_file(&exe, &binary))
        .unwrap_or(false);
    if running {
        // Windows does not delete a running executable.
        done.push(format!(
            "kept {} (it is the running census-agent): delete it by hand",
            binary.display()
        ));
    } else if remove_file(&binary)? {
        done.push(format!("removed {}", binary.display()));
        let _ = fs::remove_dir(&paths.bin_dir);
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
    if paths.state_dir.is_dir() {
        fs::remove_dir_all(&paths.state_dir)
            .map_err(|e| ServiceError::io("removing", &paths.state_dir, e))?;
        done.push(format!("removed {}", paths.state_dir.display()));
    }
    let data_dir = paths.data_dir();
    if fs::remove_dir(&data_dir).is_ok() {
        done.push(format!("removed {}", data_dir.display()));
    }
    Ok(done)
}

fn os_code(e: &windows_service::Error) -> Option<i32> {
    match e {
        windows_service::Error::Winapi(io) => io.raw_os_error(),
        _ => None,
    }
}

fn scm_error(what: &str, step: &str, e: windows_service::Error) -> ServiceError {
    if os_code(&e) == Some(ERROR_ACCESS_DENIED) {
        return ServiceError::NotRoot(format!(
            "census-agent {what} must run as Administrator: {step} was refused (open the \
             console with \"Run as administrator\")"
        ));
    }
    ServiceError::Platform(format!("{step}: {e}"))
}

/// Config and token live here: SYSTEM and Administrators only (a `ProgramData` folder inherits
/// read access for every user).
fn restrict_to_admins(dir: &Path) -> Result<(), ServiceError> {
    let out = Command::new("icacls")
        .arg(dir)
        .args([
            "/inheritance:r",
            "/grant:r",
            "*S-1-5-18:(OI)(CI)F",
            "/grant:r",
            "*S-1-5-32-544:(OI)(CI)F",
        ])
        .output()
        .map_err(|e| ServiceError::io("restricting access to", dir, e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ServiceError::Command {
        command: format!("icacls {}", dir.display()),
        message: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Writes the example config (with Windows paths) unless something is there already.
fn write_config_if_missing(path: &Path, data_dir: &Path) -> Result<bool, ServiceError> {
    let mut f = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(ServiceError::io("writing", path, e)),
    };
    f.write_all(windows_config(&data_dir.to_string_lossy()).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| ServiceError::io("writing", path, e))?;
    Ok(true)
}

// === the service entry ===

/// What the service runs: given the root shutdown token, runs the agent to its end and returns
/// its exit code.
type Body = Box<dyn FnOnce(CancellationToken) -> u8 + Send>;

/// The dispatcher calls a plain `fn`: the body waits here for it.
static BODY: Mutex<Option<Body>> = Mutex::new(None);

define_windows_service!(ffi_service_main, service_main);

/// Connects to the service control manager and runs `body` as the service; returns once the
/// service has stopped. Fails at once when the process was not started by the service
/// control manager (run from a console, say).
pub fn run_as_service(
    body: impl FnOnce(CancellationToken) -> u8 + Send + 'static,
) -> Result<(), ServiceError> {
    *BODY.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(body));
    service_dispatcher::start(SERVICE_NAME, ffi_service_main).map_err(|e| {
        ServiceError::Platform(format!(
            "cannot run as a service ({e}): `census-agent service` is started by the service \
             control manager; in a console use `census-agent run`"
        ))
    })
}

fn service_main(_arguments: Vec<OsString>) {
    let Some(body) = BODY.lock().unwrap_or_else(PoisonError::into_inner).take() else {
        return;
    };
    let shutdown = CancellationToken::new();
    let handle: Arc<OnceLock<ServiceStatusHandle>> = Arc::new(OnceLock::new());
    let (token, for_handler) = (shutdown.clone(), Arc::clone(&handle));
    let registered = service_control_handler::register(SERVICE_NAME, move |event| {
        let (reply, status) = control::handle(to_control(&event), &token);
        if let (Some(status), Some(h)) = (status, for_handler.get()) {
            report(*h, status);
        }
        match reply {
            Reply::NoError => ServiceControlHandlerResult::NoError,
            Reply::NotImplemented => ServiceControlHandlerResult::NotImplemented,
        }
    });
    let status_handle = match registered {
        Ok(h) => h,
        Err(e) => {
            error!(error = %e, "cannot register the service control handler");
            return;
        }
    };
    let _ = handle.set(status_handle);
    report(status_handle, Status::running());
    let code = body(shutdown);
    report(status_handle, Status::stopped(code));
}

fn to_control(event: &ServiceControl) -> Control {
    match event {
        ServiceControl::Stop => Control::Stop,
        ServiceControl::Shutdown | ServiceControl::Preshutdown => Control::Shutdown,
        ServiceControl::Interrogate => Control::Interrogate,
        _ => Control::Other,
    }
}

fn report(handle: ServiceStatusHandle, status: Status) {
    let status = ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: match status.state {
            State::Running => ServiceState::Running,
            State::StopPending => ServiceState::StopPending,
            State::Stopped => ServiceState::Stopped,
        },
        controls_accepted: if status.accepts_stop {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: match status.exit_code {
            0 => ServiceExitCode::Win32(0),
            code => ServiceExitCode::ServiceSpecific(u32::from(code)),
        },
        checkpoint: status.checkpoint,
        wait_hint: status.wait_hint,
        process_id: None,
    };
    if let Err(e) = handle.set_service_status(status) {
        error!(error = %e, "cannot report the service's status");
    }
}
