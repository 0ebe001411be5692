//! `census-agent install` / `uninstall` run as the real binary against a temp dir with
//! `--no-systemctl` (never the machine's systemd, /etc or /usr/local), and the shipped systemd
//! units checked: what they grant, and `systemd-analyze verify` where that tool is installed.
//! Nothing here sends a packet.

#![cfg(target_os = "linux")]

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const AGENT: &str = env!("CARGO_BIN_EXE_census-agent");
const AGENT_UNIT: &str = include_str!("../../deploy/systemd/census-agent.service");
const COLLECTOR_UNIT: &str = include_str!("../../deploy/systemd/census-collector.service");
const EXAMPLE_CONFIG: &str = include_str!("../../deploy/config/agent.toml");

struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        Site {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `census-agent <command> --no-systemctl` with every path inside the temp dir, or
    /// (`--config-path` in `extra`) the config where `extra` says.
    fn run(&self, command: &str, extra: &[&str]) -> Output {
        let mut cmd = Command::new(AGENT);
        cmd.arg(command)
            .arg("--no-systemctl")
            .arg("--unit-dir")
            .arg(self.path("units"))
            .arg("--bin-dir")
            .arg(self.path("bin"))
            .arg("--state-dir")
            .arg(self.path("state"));
        if !extra.contains(&"--config-path") {
            cmd.arg("--config-path")
                .arg(self.path("etc/census/agent.toml"));
        }
        let out = cmd
            .args(extra)
            .env_remove("CENSUS_AGENT_CONFIG")
            .output()
            .expect("census-agent runs");
        eprintln!(
            "census-agent {command}: {}\nstdout:\n{}stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn install_places_binary_unit_and_config_and_uninstall_removes_them() {
    let site = Site::new();
    let out = site.run("install", &[]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wrote an example config"), "{stdout}");

    let binary = site.path("bin/census-agent");
    assert_eq!(
        fs::read(&binary).expect("binary placed"),
        fs::read(AGENT).expect("built binary"),
        "the placed binary is the running one"
    );
    assert_eq!(mode(&binary), 0o755);
    let config = site.path("etc/census/agent.toml");
    assert_eq!(fs::read_to_string(&config).expect("config"), EXAMPLE_CONFIG);
    assert_eq!(mode(&config), 0o600);

    let unit = fs::read_to_string(site.path("units/census-agent.service")).expect("unit");
    let bin = binary.display().to_string();
    assert!(unit.contains(&format!("ExecStartPre={bin} validate --config %d/config")));
    assert!(unit.contains(&format!("ExecStart={bin} run --config %d/config")));
    assert!(unit.contains(&format!("LoadCredential=config:{}", config.display())));
    assert!(unit.contains(&format!(
        "LoadCredential=token:{}",
        site.path("etc/census/agent.token").display()
    )));

    // The operator's config survives a second install.
    fs::write(&config, "collector = \"http://198.18.0.1:7400\"\n").expect("edit");
    let out = site.run("install", &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept the existing config"));
    assert_eq!(
        fs::read_to_string(&config).expect("config"),
        "collector = \"http://198.18.0.1:7400\"\n"
    );

    fs::create_dir_all(site.path("state")).expect("state dir");
    fs::write(site.path("state/agent.json"), "{}").expect("state");
    let out = site.run("uninstall", &[]);
    assert!(out.status.success());
    assert!(!site.path("units/census-agent.service").exists());
    assert!(!binary.exists());
    assert!(config.exists(), "uninstall keeps the config");
    assert!(site.path("state/agent.json").exists(), "and the state");

    let out = site.run("uninstall", &["--purge"]);
    assert!(out.status.success());
    assert!(!config.exists());
    assert!(!site.path("state").exists());
}

#[test]
fn a_path_a_unit_cannot_name_is_one_line_and_exit_64() {
    let site = Site::new();
    let out = site.run("install", &["--config-path", "/opt/my census/agent.toml"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("census-agent: error: /opt/my census/agent.toml: "),
        "{stderr}"
    );
    assert!(
        !site.path("units").exists(),
        "nothing is placed when a path is refused"
    );
}

/// Every value `key` is set to in `unit`, in order.
fn directive<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_units_grant_what_the_deployment_says() {
    for (unit, validate) in [
        (AGENT_UNIT, "census-agent validate"),
        (COLLECTOR_UNIT, "census-collector validate"),
    ] {
        let pre = directive(unit, "ExecStartPre");
        assert!(pre.iter().any(|c| c.contains(validate)), "{pre:?}");
        assert_eq!(directive(unit, "NoNewPrivileges"), ["yes"]);
        assert_eq!(directive(unit, "ProtectSystem"), ["strict"]);
        assert_eq!(directive(unit, "DynamicUser"), ["yes"]);
        assert_eq!(directive(unit, "StateDirectory").len(), 1);
    }
    // The agent: raw sockets and nothing else.
    assert_eq!(
        directive(AGENT_UNIT, "CapabilityBoundingSet"),
        ["CAP_NET_RAW CAP_NET_ADMIN"]
    );
    assert_eq!(
        directive(AGENT_UNIT, "AmbientCapabilities"),
        ["CAP_NET_RAW CAP_NET_ADMIN"]
    );
    // The collector: no capability at all.
    assert_eq!(directive(COLLECTOR_UNIT, "CapabilityBoundingSet"), [""]);
    assert!(directive(COLLECTOR_UNIT, "AmbientCapabilities").is_empty());
}

/// `systemd-analyze verify` on both units. It checks that every `Exec*=` binary exists and is
/// executable, and the shipped units name `/usr/local/bin`, where nothing is installed here
/// (and a test must not install anything there). So it verifies copies: the agent's unit as
/// `census-agent install` writes it into a temp dir (its binary placed there too), the
/// collector's with its `ExecStart*=` pointed at the built `census-collector`. Every other line
/// is the shipped one. An unknown or misspelt directive is only a warning to the tool (exit 0),
/// so its output must be empty too.
#[test]
fn the_units_pass_systemd_analyze_verify() {
    let Ok(tool) = which("systemd-analyze") else {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (Debian package `systemd`; deploy/test.sh \
             installs it): the units were not verified"
        );
        return;
    };
    let site = Site::new();
    assert!(site.run("install", &[]).status.success());
    let collector_bin = collector_binary();
    let collector_unit = COLLECTOR_UNIT.replace(
        "/usr/local/bin/census-collector",
        &collector_bin.display().to_string(),
    );
    assert_ne!(
        collector_unit, COLLECTOR_UNIT,
        "the collector unit names its binary"
    );
    fs::write(site.path("units/census-collector.service"), collector_unit).expect("write");

    for name in ["census-agent.service", "census-collector.service"] {
        let out = Command::new(&tool)
            .arg("verify")
            .arg(format!("./{name}"))
            .current_dir(site.path("units"))
            // Verification only reads (the unit, and the targets it names); it starts and
            // changes nothing. Plain messages, for the assertion below.
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .expect("systemd-analyze runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stderr.trim().is_empty() && stdout.trim().is_empty(),
            "systemd-analyze verify {name}: {}\n{stdout}{stderr}",
            out.status
        );
    }
}

fn which(tool: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The built `census-collector` beside the agent's binary (`cargo build --workspace --bins`, as
/// deploy/test.sh does before the tests).
fn collector_binary() -> PathBuf {
    let path = Path::new(AGENT)
        .parent()
        .expect("the agent binary has a directory")
        .join("census-collector");
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}
