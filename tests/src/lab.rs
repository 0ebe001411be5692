//! The lab: simulated client sites built from Linux network namespaces, veth pairs and bridges,
//! with real responders (the kernel's own ARP and ICMP, net-snmp `snmpd`, a python3-zeroconf
//! mDNS responder), for the end-to-end tests, the demo and the benchmarks.
//!
//! One lab; every namespace is named `cz<pid>x<n>-<role><k>`, so parallel tests (threads of one
//! process, or several processes) never clash and leftovers of dead processes can be found:
//!
//! ```text
//!                 core: bridge br0 198.19.255.1/24 (the collector runs here)
//!                 /                         \
//!   agent: up0 198.19.255.N        agent: up0 198.19.255.M
//!          eth0 on the site LAN           eth0 on the site LAN
//!                |                               |
//!   site switch: bridge br0          site switch: bridge br0   (the same subnet is fine:
//!      |       |        \               |                        separate bridges)
//!    host    host     router eth0     host
//!                     router eth1 -- routed switch: bridge br0 -- host (default via router)
//! ```
//!
//! Layout:
//! - `lab.rs` (this file): [`Lab`], sites, agents, hosts and routers, address checks, `exec` and
//!   `spawn` in one of the lab's own namespaces, teardown on drop.
//! - `lab/identity.rs`: what identity resolution is tested against: multi-homed hosts, hosts
//!   that change address or MAC, randomized MACs, VRRP virtual addresses and proxy ARP.
//! - `lab/responders.rs`: `snmpd` and the mDNS responder (`lab/mdns_responder.py`).
//! - `lab/cmd.rs`: running `ip` and friends under a deadline, in batches, a few at a time.
//! - `lab/cleanup.rs`: removing namespaces and the processes inside them.
//!
//! Network safety (the brief's hard rule): every IPv4 address and route the lab configures is
//! checked to lie in 198.18.0.0/15 and anything else is an error; nothing is created in the
//! machine's own namespace (a veth is created inside one lab namespace with its peer placed
//! directly into another); IPv6 address generation is off on every lab interface, so the only
//! addresses on the lab's wires are the ones the lab assigned; and [`Lab::exec`], [`Lab::spawn`],
//! [`Lab::command`] and [`Lab::spawn_command`] refuse any namespace but the lab's own.

mod cleanup;
mod cmd;
mod identity;
mod responders;
mod samba;

use std::ffi::OsStr;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

pub use cleanup::namespaces_with_prefix;
pub use identity::{HostInterface, is_locally_administered, vrrp_mac};
pub use ipnet::Ipv4Net;
pub use responders::{MdnsService, MdnsSpec, SnmpAuth, SnmpPriv, SnmpV3User, SnmpdSpec};
pub use samba::{LdifEntry, SAM_USER_OBJECT, SAMBA_ADMIN_PASSWORD, SambaDc, parse_ldif};

use cmd::{IP_TIMEOUT, ip_batch_command, netns_exec, run_bounded, run_many, run_ok};

/// The only range the lab may use: 198.18.0.0/15, which RFC 2544 reserves for benchmarking.
pub const LAB_RANGE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(198, 18, 0, 0), 15);

/// The core network joining the collector and every agent's uplink; no site may overlap it.
pub const CORE_NET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(198, 19, 255, 0), 24);

/// Where the collector listens, on the core bridge.
pub const COLLECTOR_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);

/// The error for a test run without the privileges a lab needs: one line, with the way out.
pub const NEEDS_ROOT: &str = "the lab needs root (CAP_NET_ADMIN) to create network namespaces: \
     run the tests as root, or set CENSUS_SKIP_LAB=1 to skip lab tests";

/// How many per-namespace `ip` processes run at once while building many hosts.
const PARALLEL_IP: usize = 8;

/// Default timeout for [`Lab::exec`].
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// The start of the program path of a command [`Lab::command`] refused: no such directory
/// exists, so the command cannot start; the rest of the path is the reason.
const REFUSED: &str = "/nonexistent/census-lab-refused/";

/// Distinguishes the labs of one process in their names.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// True when `CENSUS_SKIP_LAB=1`: lab tests then return early instead of failing on a machine
/// where namespaces cannot be created. Says so on stderr, for the test's output.
pub fn lab_skipped() -> bool {
    let skipped = std::env::var("CENSUS_SKIP_LAB").is_ok_and(|v| v == "1");
    if skipped {
        eprintln!("skipped: CENSUS_SKIP_LAB=1");
    }
    skipped
}

/// `aa:bb:cc:dd:ee:ff`, the way `ip neigh` prints a MAC.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// === Specs ===

/// A client site: a LAN (one bridge) with one agent on it to begin with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpec {
    /// A label for messages; names need not be unique.
    pub name: String,
    /// The site LAN; two sites of one lab may use the same subnet (overlapping clients).
    pub subnet: Ipv4Net,
    /// The first agent's address on the LAN.
    pub agent_ip: Ipv4Addr,
    /// The first agent's LAN MAC; `None` picks a lab-unique one.
    pub agent_mac: Option<[u8; 6]>,
}

impl SiteSpec {
    pub fn new(name: impl Into<String>, subnet: Ipv4Net, agent_ip: Ipv4Addr) -> Self {
        Self {
            name: name.into(),
            subnet,
            agent_ip,
            agent_mac: None,
        }
    }
}

/// One device on a LAN: a namespace with `eth0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSpec {
    pub ip: Ipv4Addr,
    /// `None` picks a lab-unique globally administered MAC, 00:16:3e:xx:xx:xx.
    pub mac: Option<[u8; 6]>,
    /// False sets `net.ipv4.icmp_echo_ignore_all=1` in the host: it still answers ARP.
    pub answers_icmp: bool,
}

impl HostSpec {
    /// A host that answers ping, with a lab-chosen MAC.
    pub fn new(ip: Ipv4Addr) -> Self {
        Self {
            ip,
            mac: None,
            answers_icmp: true,
        }
    }

    pub fn with_mac(self, mac: [u8; 6]) -> Self {
        Self {
            mac: Some(mac),
            ..self
        }
    }

    /// A host that ignores ICMP echo (a firewalled device).
    pub fn silent(self) -> Self {
        Self {
            answers_icmp: false,
            ..self
        }
    }

    /// `count` hosts at consecutive addresses from `first`, for benchmarks.
    pub fn range(first: Ipv4Addr, count: u32) -> Vec<Self> {
        let base = u32::from(first);
        (0..count)
            .map(|i| Self::new(Ipv4Addr::from(base.wrapping_add(i))))
            .collect()
    }
}

/// A router on a site LAN leading to one more subnet of the same site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterSpec {
    /// The router's address on the site LAN (the agents' next hop to `routed_subnet`).
    pub lan_ip: Ipv4Addr,
    /// The subnet behind the router: its own bridge in its own switch namespace. Strictly
    /// inside the site LAN, it is carved out of the LAN (see [`Site::add_router`]).
    pub routed_subnet: Ipv4Net,
    /// The router's address on `routed_subnet`, the default gateway of hosts there.
    pub routed_ip: Ipv4Addr,
    /// The MAC of the router's LAN leg; `None` picks a lab-unique one.
    pub lan_mac: Option<[u8; 6]>,
}

// === impl Lab ===

/// A set of simulated client sites. Everything it created (namespaces, the veths in them, the
/// processes it started, its temp dir) is removed when it is dropped, also during a panic.
pub struct Lab {
    prefix: String,
    ip: PathBuf,
    dir: TempDir,
    core_ns: String,
    state: Mutex<State>,
    /// Serialises adding agents and routers, so an agent never misses a router's route.
    topology: Mutex<()>,
    /// Set once `/usr/bin/python3` has been seen to import zeroconf.
    zeroconf_ok: OnceLock<()>,
}

#[derive(Debug, Default)]
struct State {
    /// Every namespace, registered before it is created so a failed step still cleans it up.
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    segments: Vec<Segment>,
    sites: Vec<SiteState>,
    next_ns: u32,
    next_mac: u32,
    /// Last octet of the next agent uplink address on the core network.
    next_uplink: u8,
    next_file: u32,
    /// Counter behind [`Lab::randomized_mac`].
    next_local_mac: u32,
}

/// One bridge (a LAN) in its switch namespace.
#[derive(Debug)]
struct Segment {
    switch_ns: String,
    subnet: Ipv4Net,
    /// Default route for hosts on this segment (behind a router).
    gateway: Option<Ipv4Addr>,
    next_port: u32,
}

#[derive(Debug)]
struct SiteState {
    lan: usize,
    agents: Vec<String>,
    /// The agents' LAN addresses, which a carved routed subnet must not contain.
    agent_ips: Vec<Ipv4Addr>,
    /// (routed subnet, router's LAN address) for every router of the site.
    routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// Routed subnets carved out of the LAN (see [`Site::add_router`]): agents get no route.
    carved: Vec<Ipv4Net>,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Creates an empty lab: its core namespace with the collector's bridge. Removes what labs of
    /// dead processes left behind first. Fails with one clear line without root, or without
    /// `ip` (iproute2).
    pub fn new() -> Result<Lab> {
        check_privileges()?;
        let ip = cmd::find_tool("ip", "iproute2")?;
        cleanup::remove_stale(&ip);
        let prefix = format!(
            "cz{}x{}-",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .context("creating the lab's temp dir")?;
        let core_ns = format!("{prefix}core");
        let lab = Lab {
            prefix,
            ip,
            dir,
            core_ns: core_ns.clone(),
            state: Mutex::new(State {
                next_uplink: 2,
                ..State::default()
            }),
            topology: Mutex::new(()),
            zeroconf_ok: OnceLock::new(),
        };
        lab.state().namespaces.push(core_ns.clone());
        lab.create_namespaces(std::slice::from_ref(&core_ns))?;
        let mut lines = bridge_lines();
        lines.insert(3, addr_line(COLLECTOR_IP, CORE_NET.prefix_len(), "br0")?);
        lab.ip_batch(Some(&core_ns), &lines)?;
        Ok(lab)
    }

    /// `cz<pid>x<n>-`: the start of every namespace and temp file name of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace of the core bridge, where the collector runs.
    pub fn core_ns(&self) -> &str {
        &self.core_ns
    }

    /// The collector's address in [`Lab::core_ns`].
    pub fn collector_ip(&self) -> Ipv4Addr {
        COLLECTOR_IP
    }

    /// A temp dir the lab owns (removed on drop), for configs and data of what tests run.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every namespace of this lab, in creation order.
    pub fn namespaces(&self) -> Vec<String> {
        self.state().namespaces.clone()
    }

    /// Adds a site: a switch namespace for its LAN and one agent namespace.
    pub fn add_site(&self, spec: SiteSpec) -> Result<Site<'_>> {
        let subnet = check_subnet(spec.subnet, "site subnet")?;
        check_host_addr(spec.agent_ip, subnet, "agent address")?;
        if let Some(mac) = spec.agent_mac {
            check_mac(mac)?;
        }
        let (lan, switch_ns) = self.add_segment(subnet, None, "sw")?;
        let index = {
            let mut st = self.state();
            st.sites.push(SiteState {
                lan,
                agents: Vec::new(),
                agent_ips: Vec::new(),
                routes: Vec::new(),
                carved: Vec::new(),
            });
            st.sites.len() - 1
        };
        let agent = self
            .add_agent_to(index, spec.agent_ip, spec.agent_mac)
            .with_context(|| format!("adding the agent of site {:?}", spec.name))?;
        Ok(Site {
            lab: self,
            index,
            name: spec.name,
            subnet,
            switch_ns,
            agent,
        })
    }

    /// `ip netns exec NS program`, for the caller to add arguments, environment and stdio, then
    /// to start with [`Lab::spawn_command`] (or run itself: then it is not tracked).
    ///
    /// `ns` must be one of this lab's namespaces. For any other the command is refused, and
    /// since callers expect a `Command` rather than a `Result`, the refusal is built into it:
    /// its program is a path that cannot exist and names the namespace, so it fails to start,
    /// and [`Lab::spawn_command`] rejects it with the reason.
    pub fn command(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        match self.check_own_ns(ns) {
            Ok(()) => netns_exec(&self.ip, ns, program),
            Err(e) => Command::new(format!("{REFUSED}{e}")),
        }
    }

    /// Runs `args` in namespace `ns` (one of this lab's, or an error) to completion (killed
    /// after 60 s) and returns its output, whatever the exit status.
    pub fn exec<I, S>(&self, ns: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.exec_timeout(ns, args, EXEC_TIMEOUT)
    }

    /// [`Lab::exec`] with a chosen deadline.
    pub fn exec_timeout<I, S>(&self, ns: &str, args: I, timeout: Duration) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_bounded(self.ns_command(ns, args)?, None, timeout)
    }

    /// Runs `args` in `ns` and returns its stdout; a non-zero exit is an error quoting stderr.
    pub fn exec_ok<I, S>(&self, ns: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let output = run_ok(self.ns_command(ns, args)?, None, EXEC_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts `args` in `ns` (one of this lab's, or an error) in the background, stdout and
    /// stderr to a log file in the lab's dir ([`Proc::log`]). It is killed when the lab is
    /// dropped, or earlier by [`Proc::kill`].
    pub fn spawn<I, S>(&self, ns: &str, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.ns_command(ns, args)?;
        let program = cmd
            .get_args()
            .nth(3)
            .and_then(|p| Path::new(p).file_name())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let log = self.new_file(&format!("{program}.log"))?;
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating log file {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log file handle")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        self.track(cmd, Some(log))
    }

    /// Starts `cmd`, which must come from [`Lab::command`] for one of this lab's namespaces (so
    /// nothing runs in the machine's own namespace or another lab's), and tracks it for
    /// teardown.
    pub fn spawn_command(&self, cmd: Command) -> Result<Proc> {
        let args: Vec<&OsStr> = cmd.get_args().take(3).collect();
        let ns = match args.as_slice() {
            [netns, exec, ns]
                if cmd.get_program() == self.ip && *netns == "netns" && *exec == "exec" =>
            {
                ns.to_str()
            }
            _ => None,
        };
        let Some(ns) = ns else {
            let refused = cmd
                .get_program()
                .to_str()
                .and_then(|p| p.strip_prefix(REFUSED));
            match refused {
                Some(reason) => bail!("{reason}"),
                None => bail!(
                    "lab {}: spawn_command takes a command from Lab::command, not `{}`",
                    self.prefix,
                    cmd::describe(&cmd)
                ),
            }
        };
        self.check_own_ns(ns)?;
        self.track(cmd, None)
    }

    // --- internals ---

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses a namespace this lab did not create: a typo, another lab's, or the name of one
    /// that is not a lab's at all must never get commands run in it.
    fn check_own_ns(&self, ns: &str) -> Result<()> {
        if !self.state().namespaces.iter().any(|own| own == ns) {
            bail!(
                "refusing to run in namespace {ns:?}: it is not one of lab {}'s namespaces",
                self.prefix
            );
        }
        Ok(())
    }

    fn ns_command<I, S>(&self, ns: &str, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.check_own_ns(ns)?;
        let mut args = args.into_iter();
        let Some(program) = args.next() else {
            bail!("nothing to run in namespace {ns}")
        };
        let mut cmd = netns_exec(&self.ip, ns, program);
        cmd.args(args);
        Ok(cmd)
    }

    fn track(&self, mut cmd: Command, log: Option<PathBuf>) -> Result<Proc> {
        let what = cmd::describe(&cmd);
        let child = cmd.spawn().with_context(|| format!("starting `{what}`"))?;
        let proc = Proc {
            inner: Arc::new(ProcInner {
                pid: child.id(),
                what,
                log,
                child: Mutex::new(Some(child)),
            }),
        };
        self.state().procs.push(proc.clone());
        Ok(proc)
    }

    /// A fresh path in the lab's dir: `<n>-<name>`.
    fn new_file(&self, name: &str) -> Result<PathBuf> {
        let n = {
            let mut st = self.state();
            st.next_file += 1;
            st.next_file
        };
        Ok(self.dir.path().join(format!("{n:04}-{name}")))
    }

    /// Registers (for teardown) and returns a new namespace name `<prefix><role><k>`.
    fn alloc_ns(st: &mut State, prefix: &str, role: &str) -> String {
        let name = format!("{prefix}{role}{}", st.next_ns);
        st.next_ns += 1;
        st.namespaces.push(name.clone());
        name
    }

    /// A lab-unique globally administered MAC in the 00:16:3e OUI.
    fn alloc_mac(st: &mut State) -> Result<[u8; 6]> {
        st.next_mac += 1;
        let [top, a, b, c] = st.next_mac.to_be_bytes();
        if top != 0 {
            bail!("the lab ran out of default MAC addresses");
        }
        Ok([0x00, 0x16, 0x3e, a, b, c])
    }

    fn create_namespaces(&self, names: &[String]) -> Result<()> {
        let lines: Vec<String> = names.iter().map(|n| format!("netns add {n}")).collect();
        self.ip_batch(None, &lines)
            .context("creating network namespaces")
    }

    fn ip_batch(&self, ns: Option<&str>, lines: &[String]) -> Result<()> {
        Self::run_batch(ip_batch_command(&self.ip, ns), lines)
    }

    /// `tool -batch -` (`tc`, `bridge`: iproute2's batch mode) inside `ns`, one of this lab's
    /// namespaces, with `lines` on its standard input.
    fn tool_batch(&self, ns: &str, tool: &str, lines: &[String]) -> Result<()> {
        let mut cmd = self.ns_command(ns, [tool])?;
        cmd.args(["-batch", "-"]);
        Self::run_batch(cmd, lines)
    }

    fn run_batch(cmd: Command, lines: &[String]) -> Result<()> {
        let mut input = lines.join("\n");
        input.push('\n');
        run_ok(cmd, Some(input), IP_TIMEOUT).map(drop)
    }

    /// `sysctl -w key=value` inside `ns` (sysctls under /proc/sys/net are per namespace).
    fn sysctl_command(&self, ns: &str, key: &str, value: &str) -> Command {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let mut cmd = netns_exec(&self.ip, ns, "/bin/sh");
        cmd.arg("-c").arg(format!("echo {value} > {path}"));
        cmd
    }

    /// A switch namespace with bridge `br0` for a new LAN.
    fn add_segment(
        &self,
        subnet: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        role: &str,
    ) -> Result<(usize, String)> {
        let ns = Self::alloc_ns(&mut self.state(), &self.prefix, role);
        self.create_namespaces(std::slice::from_ref(&ns))?;
        self.ip_batch(Some(&ns), &bridge_lines())?;
        let mut st = self.state();
        st.segments.push(Segment {
            switch_ns: ns.clone(),
            subnet,
            gateway,
            next_port: 0,
        });
        Ok((st.segments.len() - 1, ns))
    }

    fn add_agent_to(&self, site: usize, ip: Ipv4Addr, mac: Option<[u8; 6]>) -> Result<Agent> {
        let _topology = self.topology.lock().unwrap_or_else(PoisonError::into_inner);
        let (ns, switch_ns, port, lan_mac, up_mac, uplink, subnet, routes) = {
            let mut st = self.state();
            let site_state = st.sites.get(site).context("no such site")?;
            if let Some(net) = site_state.carved.iter().find(|n| n.contains(&ip)) {
                bail!("agent address {ip} is inside {net}, which a router holds behind proxy ARP");
            }
            let (lan, routes) = (site_state.lan, site_state.routes.clone());
            let octet = st.next_uplink;
            if octet == 255 {
                bail!("a lab has room for 253 agents on its core network");
            }
            st.next_uplink += 1;
            let lan_mac = match mac {
                Some(mac) => mac,
                None => Self::alloc_mac(&mut st)?,
            };
            let up_mac = Self::alloc_mac(&mut st)?;
            let ns = Self::alloc_ns(&mut st, &self.prefix, "ag");
            let seg = st.segments.get_mut(lan).context("no such segment")?;
            seg.next_port += 1;
            let port = format!("p{}", seg.next_port);
            let (switch_ns, subnet) = (seg.switch_ns.clone(), seg.subnet);
            let uplink = Ipv4Addr::new(198, 19, 255, octet);
            (ns, switch_ns, port, lan_mac, up_mac, uplink, subnet, routes)
        };
        check_host_addr(ip, subnet, "agent address")?;
        check_mac(lan_mac)?;
        self.create_namespaces(std::slice::from_ref(&ns))?;
        self.ip_batch(Some(&switch_ns), &plug_lines(&port, &ns, "eth0", lan_mac))?;
        let core_port = format!("u{}", uplink.octets()[3]);
        self.ip_batch(
            Some(&self.core_ns),
            &plug_lines(&core_port, &ns, "up0", up_mac),
        )?;
        let mut lines = leaf_lines(ip, subnet.prefix_len(), None)?;
        lines.extend([
            "link set up0 addrgenmode none".to_string(),
            addr_line(uplink, CORE_NET.prefix_len(), "up0")?,
            "link set up0 up".to_string(),
        ]);
        for (net, via) in routes {
            lines.push(route_line(net, via)?);
        }
        self.ip_batch(Some(&ns), &lines)?;
        if let Some(site_state) = self.state().sites.get_mut(site) {
            site_state.agents.push(ns.clone());
            site_state.agent_ips.push(ip);
        }
        Ok(Agent {
            ns,
            port,
            ip,
            prefix_len: subnet.prefix_len(),
            mac: lan_mac,
            uplink_ip: uplink,
        })
    }

    /// Adds hosts to one LAN: all namespaces in one `ip` call, all veths in one call in the
    /// switch namespace, then one `ip -batch` per host, a few at a time.
    fn add_hosts_on(&self, segment: usize, specs: Vec<HostSpec>) -> Result<Vec<Host<'_>>> {
        let (subnet, gateway, switch_ns) = {
            let st = self.state();
            let seg = st.segments.get(segment).context("no such segment")?;
            (seg.subnet, seg.gateway, seg.switch_ns.clone())
        };
        for spec in &specs {
            check_host_addr(spec.ip, subnet, "host address")?;
            if let Some(mac) = spec.mac {
                check_mac(mac)?;
            }
        }
        let mut planned = Vec::with_capacity(specs.len());
        {
            let mut st = self.state();
            for spec in &specs {
                let mac = match spec.mac {
                    Some(mac) => mac,
                    None => Self::alloc_mac(&mut st)?,
                };
                let ns = Self::alloc_ns(&mut st, &self.prefix, "h");
                let seg = st.segments.get_mut(segment).context("no such segment")?;
                seg.next_port += 1;
                planned.push((ns, format!("p{}", seg.next_port), mac, *spec));
            }
        }
        let names: Vec<String> = planned.iter().map(|(ns, ..)| ns.clone()).collect();
        self.create_namespaces(&names)?;
        let plugs: Vec<String> = planned
            .iter()
            .flat_map(|(ns, port, mac, _)| plug_lines(port, ns, "eth0", *mac))
            .collect();
        self.ip_batch(Some(&switch_ns), &plugs)?;
        let mut jobs = Vec::with_capacity(planned.len());
        for (ns, _, _, spec) in &planned {
            let mut input = leaf_lines(spec.ip, subnet.prefix_len(), gateway)?.join("\n");
            input.push('\n');
            jobs.push((ip_batch_command(&self.ip, Some(ns)), Some(input)));
            if !spec.answers_icmp {
                jobs.push((
                    self.sysctl_command(ns, "net.ipv4.icmp_echo_ignore_all", "1"),
                    None,
                ));
            }
        }
        run_many(jobs, PARALLEL_IP)?;
        Ok(planned
            .into_iter()
            .map(|(ns, port, mac, spec)| Host {
                lab: self,
                ns,
                segment,
                port,
                eth0: HostInterface {
                    name: "eth0".into(),
                    ip: spec.ip,
                    prefix_len: subnet.prefix_len(),
                    mac,
                },
                eth1: None,
            })
            .collect())
    }

    fn add_router_to(&self, site: usize, spec: RouterSpec) -> Result<Router<'_>> {
        let routed = check_subnet(spec.routed_subnet, "routed subnet")?;
        check_host_addr(
            spec.routed_ip,
            routed,
            "router address on the routed subnet",
        )?;
        if let Some(mac) = spec.lan_mac {
            check_mac(mac)?;
        }
        let _topology = self.topology.lock().unwrap_or_else(PoisonError::into_inner);
        let (lan, lan_subnet, agents, carved) = {
            let st = self.state();
            let site_state = st.sites.get(site).context("no such site")?;
            let lan = st.segments.get(site_state.lan).context("no such segment")?;
            check_host_addr(spec.lan_ip, lan.subnet, "router address on the site LAN")?;
            // A routed subnet strictly inside the LAN is carved out of it: the agents keep
            // taking its addresses for on-link ones (so no route is added), and reach them only
            // if the router answers ARP for them (Router::enable_proxy_arp).
            let carved =
                lan.subnet.contains(&routed) && routed.prefix_len() > lan.subnet.prefix_len();
            if carved {
                if routed.contains(&spec.lan_ip) {
                    bail!(
                        "the router's LAN address {} is inside {routed}",
                        spec.lan_ip
                    );
                }
                if let Some(ip) = site_state.agent_ips.iter().find(|ip| routed.contains(*ip)) {
                    bail!("routed subnet {routed} holds agent address {ip}");
                }
            }
            let lan_net = (!carved).then_some(lan.subnet);
            let taken = lan_net
                .into_iter()
                .chain(site_state.routes.iter().map(|r| r.0))
                .chain(site_state.carved.iter().copied());
            for net in taken {
                if overlaps(net, routed) {
                    bail!("routed subnet {routed} overlaps {net}, already part of this site");
                }
            }
            (
                site_state.lan,
                lan.subnet,
                site_state.agents.clone(),
                carved,
            )
        };
        let (segment, routed_switch) = self.add_segment(routed, Some(spec.routed_ip), "rs")?;
        let (ns, lan_switch, lan_port, lan_mac, routed_port, routed_mac, lan_prefix) = {
            let mut st = self.state();
            let lan_mac = match spec.lan_mac {
                Some(mac) => mac,
                None => Self::alloc_mac(&mut st)?,
            };
            let routed_mac = Self::alloc_mac(&mut st)?;
            let ns = Self::alloc_ns(&mut st, &self.prefix, "rt");
            let seg = st.segments.get_mut(lan).context("no such segment")?;
            seg.next_port += 1;
            let (lan_switch, lan_port) = (seg.switch_ns.clone(), format!("p{}", seg.next_port));
            let lan_prefix = seg.subnet.prefix_len();
            let seg = st.segments.get_mut(segment).context("no such segment")?;
            seg.next_port += 1;
            let routed_port = format!("p{}", seg.next_port);
            (
                ns,
                lan_switch,
                lan_port,
                lan_mac,
                routed_port,
                routed_mac,
                lan_prefix,
            )
        };
        self.create_namespaces(std::slice::from_ref(&ns))?;
        self.ip_batch(
            Some(&lan_switch),
            &plug_lines(&lan_port, &ns, "eth0", lan_mac),
        )?;
        self.ip_batch(
            Some(&routed_switch),
            &plug_lines(&routed_port, &ns, "eth1", routed_mac),
        )?;
        let mut lines = leaf_lines(spec.lan_ip, lan_prefix, None)?;
        lines.extend([
            "link set eth1 addrgenmode none".to_string(),
            addr_line(spec.routed_ip, routed.prefix_len(), "eth1")?,
            "link set eth1 up".to_string(),
        ]);
        self.ip_batch(Some(&ns), &lines)?;
        run_ok(
            self.sysctl_command(&ns, "net.ipv4.ip_forward", "1"),
            None,
            IP_TIMEOUT,
        )?;
        if carved {
            if let Some(site_state) = self.state().sites.get_mut(site) {
                site_state.carved.push(routed);
            }
        } else {
            let route = route_line(routed, spec.lan_ip)?;
            for agent in &agents {
                self.ip_batch(Some(agent), std::slice::from_ref(&route))?;
            }
            if let Some(site_state) = self.state().sites.get_mut(site) {
                site_state.routes.push((routed, spec.lan_ip));
            }
        }
        Ok(Router {
            lab: self,
            ns,
            segment,
            switch_ns: routed_switch,
            lan_ip: spec.lan_ip,
            lan_subnet,
            lan_mac,
            routed_subnet: routed,
            routed_ip: spec.routed_ip,
        })
    }

    fn agents_of(&self, site: usize) -> Vec<String> {
        self.state()
            .sites
            .get(site)
            .map(|s| s.agents.clone())
            .unwrap_or_default()
    }
}

impl Lab {
    /// Kills what the lab started and deletes its namespaces now, as dropping it does, from
    /// any thread: for a program whose lab must go on a signal (Ctrl-C), while the thread that
    /// owns the lab is blocked in a command and no `Drop` would run before the program exits.
    /// Best effort, never panics, and may run again (the drop does); the lab is of no use
    /// afterwards. The temp dir stays until the lab drops, or goes with [`Lab::remove_dir`].
    pub fn teardown(&self) {
        let (procs, namespaces) = {
            let st = self.state();
            (st.procs.clone(), st.namespaces.clone())
        };
        for proc in procs.iter().rev() {
            if let Err(e) = proc.kill() {
                eprintln!("lab {}: {e:#}", self.prefix);
            }
        }
        if let Err(e) = cleanup::remove_namespaces(&self.ip, &namespaces) {
            eprintln!("lab {}: teardown: {e:#}", self.prefix);
        }
    }

    /// Removes the lab's temp dir now, for a program about to exit without dropping the lab
    /// (after [`Lab::teardown`]).
    pub fn remove_dir(&self) {
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

impl Drop for Lab {
    /// Best effort and never panics (it also runs while a failed test unwinds): kills what the
    /// lab started, then deletes its namespaces; the temp dir goes when `dir` drops.
    fn drop(&mut self) {
        self.teardown();
    }
}

// === impl Site ===

/// A client site in a [`Lab`]: a LAN bridge with agents, hosts and routers on it.
#[derive(Clone)]
pub struct Site<'lab> {
    lab: &'lab Lab,
    index: usize,
    name: String,
    subnet: Ipv4Net,
    switch_ns: String,
    agent: Agent,
}

impl fmt::Debug for Site<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Site")
            .field("name", &self.name)
            .field("subnet", &self.subnet)
            .field("switch_ns", &self.switch_ns)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl<'lab> Site<'lab> {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The namespace holding the LAN bridge `br0` (ports `p1`, `p2`, ...).
    pub fn switch_ns(&self) -> &str {
        &self.switch_ns
    }

    /// The agent created with the site.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// Namespaces of every agent of the site, the first one first.
    pub fn agent_namespaces(&self) -> Vec<String> {
        self.lab.agents_of(self.index)
    }

    /// Another agent on the same LAN, with its own uplink to the core.
    pub fn add_agent(&self, ip: Ipv4Addr) -> Result<Agent> {
        self.lab.add_agent_to(self.index, ip, None)
    }

    pub fn add_host(&self, spec: HostSpec) -> Result<Host<'lab>> {
        let mut hosts = self.lab.add_hosts_on(self.lan(), vec![spec])?;
        hosts.pop().context("no host was created")
    }

    /// Many hosts at once (see [`HostSpec::range`]); much faster than one at a time.
    pub fn add_hosts(&self, specs: impl IntoIterator<Item = HostSpec>) -> Result<Vec<Host<'lab>>> {
        self.lab
            .add_hosts_on(self.lan(), specs.into_iter().collect())
    }

    /// Makes the site's switch deliver each ARP request of its first agent only to the host
    /// that owns the address asked for (by `hosts`' addresses when this is called), and no
    /// broadcast to any host: the requests for other addresses go nowhere. For benchmarks of
    /// large sites: a bridge copies every broadcast to every port in software, in the
    /// sender's system call, so on a 2-CPU machine a LAN of 500 host namespaces carries about
    /// 1,400 requests a second however fast they are sent, a limit of the lab (a real switch
    /// copies in hardware, and every host takes its copy on its own CPU), not of the sender.
    /// Hosts still answer with their own kernels; every tool swept from the agent's namespace
    /// meets the same switch. Uses a tc `u32` filter per host on the agent's port (redirected
    /// with `mirred`), and turns broadcast and unknown-unicast flooding off on the hosts'
    /// ports (the agent's MAC is a static entry, since its redirected requests teach the
    /// bridge nothing).
    pub fn direct_arp_requests(&self, hosts: &[Host<'lab>]) -> Result<()> {
        let agent = &self.agent;
        let mut tc = vec![format!("qdisc add dev {} clsact", agent.port)];
        let mut bridge = vec![format!(
            "fdb add {} dev {} master static",
            mac_string(agent.mac),
            agent.port
        )];
        for h in hosts {
            if h.segment != self.lan() {
                bail!("host {} is not on site {:?}'s LAN", h.eth0.ip, self.name);
            }
            // ARP's operation (1, request) is at offset 6, its target address at 24.
            tc.push(format!(
                "filter add dev {} ingress protocol arp prio 1 u32 match u16 0x0001 0xffff at 6 \
                 match u32 0x{:08x} 0xffffffff at 24 action mirred egress redirect dev {}",
                agent.port,
                u32::from(h.eth0.ip),
                h.port
            ));
            bridge.push(format!("link set dev {} bcast_flood off flood off", h.port));
        }
        for (tool, lines) in [("tc", tc), ("bridge", bridge)] {
            self.lab
                .tool_batch(&self.switch_ns, tool, &lines)
                .with_context(|| {
                    format!("directing ARP requests on site {:?} ({tool})", self.name)
                })?;
        }
        Ok(())
    }

    /// A router on this LAN to a new subnet; every agent of the site routes that subnet via it.
    ///
    /// A routed subnet strictly inside the site LAN is *carved out* of it instead: the agents'
    /// own prefix already covers it, so they take its addresses for on-link ones and ARP for
    /// them, and no route is added. They then reach hosts behind the router only once the
    /// router answers ARP for them: [`Router::enable_proxy_arp`].
    pub fn add_router(&self, spec: RouterSpec) -> Result<Router<'lab>> {
        self.lab.add_router_to(self.index, spec)
    }

    fn lan(&self) -> usize {
        self.lab
            .state()
            .sites
            .get(self.index)
            .map_or(usize::MAX, |s| s.lan)
    }
}

// === impl Agent, Host, Router ===

/// An agent's namespace: `eth0` on the site LAN, `up0` on the core network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    ns: String,
    /// Its port on the site's bridge.
    port: String,
    ip: Ipv4Addr,
    prefix_len: u8,
    mac: [u8; 6],
    uplink_ip: Ipv4Addr,
}

impl Agent {
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The agent's address on the site LAN (`eth0`).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The MAC of `eth0`.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The agent's address on the core network (`up0`), from which it reaches the collector.
    pub fn uplink_ip(&self) -> Ipv4Addr {
        self.uplink_ip
    }
}

/// A device on a LAN: its own namespace with `eth0` (and `eth1` when multi-homed, see
/// [`Site::add_multihomed_host`]).
#[derive(Clone)]
pub struct Host<'lab> {
    lab: &'lab Lab,
    ns: String,
    /// The LAN it is plugged into, whose subnet [`Host::set_ip`] keeps to.
    segment: usize,
    /// Its `eth0`'s port on that LAN's bridge.
    port: String,
    eth0: HostInterface,
    eth1: Option<HostInterface>,
}

impl fmt::Debug for Host<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("ns", &self.ns)
            .field("eth0", &self.eth0)
            .field("eth1", &self.eth1)
            .finish_non_exhaustive()
    }
}

impl Host<'_> {
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The address of `eth0`.
    pub fn ip(&self) -> Ipv4Addr {
        self.eth0.ip
    }

    pub fn prefix_len(&self) -> u8 {
        self.eth0.prefix_len
    }

    /// The MAC of `eth0`.
    pub fn mac(&self) -> [u8; 6] {
        self.eth0.mac
    }

    /// Every interface on the LAN, `eth0` first.
    pub fn interfaces(&self) -> Vec<HostInterface> {
        std::iter::once(&self.eth0)
            .chain(&self.eth1)
            .cloned()
            .collect()
    }

    /// Runs net-snmp `snmpd` on every address of the host (one process, so its IF-MIB lists
    /// every interface); returns once it answers.
    pub fn run_snmpd(&self, spec: &SnmpdSpec) -> Result<Proc> {
        let ips: Vec<Ipv4Addr> = self.interfaces().iter().map(|i| i.ip).collect();
        self.lab.start_snmpd(&self.ns, &ips, spec)
    }

    /// Runs an mDNS responder for the host's services on `eth0`'s address; returns once they
    /// are registered.
    pub fn run_mdns(&self, spec: &MdnsSpec) -> Result<Proc> {
        self.lab.start_mdns(&self.ns, self.ip(), spec)
    }
}

/// A router: `eth0` on the site LAN, `eth1` on its routed subnet, forwarding between them.
#[derive(Clone)]
pub struct Router<'lab> {
    lab: &'lab Lab,
    ns: String,
    segment: usize,
    switch_ns: String,
    lan_ip: Ipv4Addr,
    /// The site LAN, for the prefix length of virtual addresses.
    lan_subnet: Ipv4Net,
    lan_mac: [u8; 6],
    routed_subnet: Ipv4Net,
    routed_ip: Ipv4Addr,
}

impl fmt::Debug for Router<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("ns", &self.ns)
            .field("lan_ip", &self.lan_ip)
            .field("routed_subnet", &self.routed_subnet)
            .field("routed_ip", &self.routed_ip)
            .finish_non_exhaustive()
    }
}

impl<'lab> Router<'lab> {
    pub fn ns(&self) -> &str {
        &self.ns
    }

    pub fn lan_ip(&self) -> Ipv4Addr {
        self.lan_ip
    }

    /// The MAC of the LAN leg (`eth0`): what the agent's ARP sees for every routed address.
    pub fn lan_mac(&self) -> [u8; 6] {
        self.lan_mac
    }

    pub fn routed_subnet(&self) -> Ipv4Net {
        self.routed_subnet
    }

    pub fn routed_ip(&self) -> Ipv4Addr {
        self.routed_ip
    }

    /// The namespace holding the routed subnet's bridge.
    pub fn switch_ns(&self) -> &str {
        &self.switch_ns
    }

    /// A host on the routed subnet, with its default route via the router.
    pub fn add_host(&self, spec: HostSpec) -> Result<Host<'lab>> {
        let mut hosts = self.lab.add_hosts_on(self.segment, vec![spec])?;
        hosts.pop().context("no host was created")
    }

    pub fn add_hosts(&self, specs: impl IntoIterator<Item = HostSpec>) -> Result<Vec<Host<'lab>>> {
        self.lab
            .add_hosts_on(self.segment, specs.into_iter().collect())
    }

    /// Runs `snmpd` on the router's LAN address (it sees both legs and the router's ARP cache,
    /// and any virtual address's macvlan).
    pub fn run_snmpd(&self, spec: &SnmpdSpec) -> Result<Proc> {
        self.lab.start_snmpd(&self.ns, &[self.lan_ip], spec)
    }
}

// === impl Proc ===

/// A process the lab started in a namespace. Clones share it; the lab kills it on drop.
#[derive(Clone, Debug)]
pub struct Proc {
    inner: Arc<ProcInner>,
}

#[derive(Debug)]
struct ProcInner {
    pid: u32,
    what: String,
    log: Option<PathBuf>,
    /// `None` once killed and reaped.
    child: Mutex<Option<Child>>,
}

impl Proc {
    /// The program's pid (`ip netns exec` execs it, so this is the program, not `ip`).
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The command line, for messages.
    pub fn what(&self) -> &str {
        &self.inner.what
    }

    pub fn is_running(&self) -> bool {
        let mut child = self
            .inner
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills (SIGKILL) and reaps the process; killing a dead one again is fine.
    pub fn kill(&self) -> Result<()> {
        let child = self
            .inner
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut child) = child {
            child
                .kill()
                .with_context(|| format!("killing pid {} ({})", self.pid(), self.what()))?;
            child
                .wait()
                .with_context(|| format!("reaping pid {}", self.pid()))?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut child = self
                    .inner
                    .child
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let Some(child) = child.as_mut() else {
                    bail!("pid {} was killed", self.pid())
                };
                if let Some(status) = child.try_wait().context("waiting for a lab process")? {
                    return Ok(Some(status));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where stdout and stderr go, for processes started with a log.
    pub fn log_path(&self) -> Option<&Path> {
        self.inner.log.as_deref()
    }

    /// The log so far (empty without one), for assertion messages.
    pub fn log(&self) -> String {
        self.log_path()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

// === Checks and `ip` lines ===

fn check_privileges() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    // `ip netns add` also mounts (CAP_SYS_ADMIN); root has both.
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if !has(CAP_NET_ADMIN) || !has(CAP_SYS_ADMIN) {
        bail!(NEEDS_ROOT);
    }
    Ok(())
}

fn check_addr(ip: Ipv4Addr, what: &str) -> Result<()> {
    if !LAB_RANGE.contains(&ip) {
        bail!(
            "{what} {ip} is outside {LAB_RANGE}: the lab uses only the RFC 2544 benchmarking \
             range, never any other address"
        );
    }
    Ok(())
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn check_subnet(net: Ipv4Net, what: &str) -> Result<Ipv4Net> {
    let net = net.trunc();
    if !LAB_RANGE.contains(&net) {
        bail!(
            "{what} {net} is outside {LAB_RANGE}: the lab uses only the RFC 2544 benchmarking \
             range, never any other address"
        );
    }
    if overlaps(net, CORE_NET) {
        bail!("{what} {net} overlaps the lab's core network {CORE_NET}");
    }
    if net.prefix_len() > 30 {
        bail!("{what} {net} is too small for a LAN (at most /30)");
    }
    Ok(net)
}

fn check_host_addr(ip: Ipv4Addr, subnet: Ipv4Net, what: &str) -> Result<()> {
    check_addr(ip, what)?;
    if !subnet.contains(&ip) {
        bail!("{what} {ip} is not in {subnet}");
    }
    if ip == subnet.network() || ip == subnet.broadcast() {
        bail!("{what} {ip} is the network or broadcast address of {subnet}");
    }
    Ok(())
}

fn check_mac(mac: [u8; 6]) -> Result<()> {
    if mac[0] & 1 != 0 || mac == [0; 6] {
        bail!(
            "{} is not a unicast MAC: an interface cannot have it",
            mac_string(mac)
        );
    }
    Ok(())
}

/// The one place an IPv4 address is put on a lab interface, so the range check cannot be missed.
fn addr_line(ip: Ipv4Addr, prefix_len: u8, dev: &str) -> Result<String> {
    check_addr(ip, "interface address")?;
    Ok(format!("addr add {ip}/{prefix_len} dev {dev}"))
}

fn route_line(net: Ipv4Net, via: Ipv4Addr) -> Result<String> {
    check_subnet(net, "route")?;
    check_addr(via, "gateway")?;
    Ok(format!("route add {net} via {via} dev eth0"))
}

/// Loopback up and an empty bridge `br0` that floods multicast (no IGMP querier in the lab, so
/// snooping would only get in mDNS's way) and has no IPv6 link-local address.
fn bridge_lines() -> Vec<String> {
    [
        "link set lo up",
        "link add br0 type bridge mcast_snooping 0",
        "link set br0 addrgenmode none",
        "link set br0 up",
    ]
    .map(String::from)
    .to_vec()
}

/// Run in a switch namespace: a veth whose switch end `port` joins `br0` and whose other end,
/// `peer_if` with `mac`, is created directly in `peer_ns` (never in the root namespace).
fn plug_lines(port: &str, peer_ns: &str, peer_if: &str, mac: [u8; 6]) -> Vec<String> {
    vec![
        format!(
            "link add {port} type veth peer name {peer_if} netns {peer_ns} address {}",
            mac_string(mac)
        ),
        format!("link set {port} addrgenmode none"),
        format!("link set {port} master br0"),
        format!("link set {port} up"),
    ]
}

/// Run in a host, agent or router namespace: loopback and `eth0` up with `ip`, then either a
/// default route via `gateway` or a multicast route out of `eth0` (so mDNS can send).
fn leaf_lines(ip: Ipv4Addr, prefix_len: u8, gateway: Option<Ipv4Addr>) -> Result<Vec<String>> {
    let mut lines = vec![
        "link set lo up".to_string(),
        "link set eth0 addrgenmode none".to_string(),
        addr_line(ip, prefix_len, "eth0")?,
        "link set eth0 up".to_string(),
    ];
    match gateway {
        Some(gw) => {
            check_addr(gw, "gateway")?;
            lines.push(format!("route add default via {gw} dev eth0"));
        }
        None => lines.push("route add 224.0.0.0/4 dev eth0".to_string()),
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test subnet")
    }

    #[test]
    fn addresses_outside_the_lab_range_are_refused() {
        assert!(addr_line(Ipv4Addr::new(10, 0, 0, 1), 24, "eth0").is_err());
        assert!(addr_line(Ipv4Addr::new(198, 20, 0, 1), 24, "eth0").is_err());
        assert!(addr_line(Ipv4Addr::new(198, 17, 255, 255), 24, "eth0").is_err());
        assert!(addr_line(Ipv4Addr::new(198, 18, 0, 1), 24, "eth0").is_ok());
        assert!(addr_line(Ipv4Addr::new(198, 19, 255, 254), 24, "eth0").is_ok());
        assert!(check_subnet(net("192.168.1.0/24"), "s").is_err());
        assert!(check_subnet(net("198.18.0.0/14"), "s").is_err());
        assert!(
            check_subnet(net("198.19.255.0/25"), "s").is_err(),
            "core overlap"
        );
        assert!(
            leaf_lines(
                Ipv4Addr::new(198, 18, 0, 9),
                24,
                Some(Ipv4Addr::new(10, 0, 0, 1))
            )
            .is_err()
        );
        assert_eq!(
            check_subnet(net("198.18.0.7/24"), "s").ok(),
            Some(net("198.18.0.0/24"))
        );
    }

    #[test]
    fn host_addresses_must_fit_the_subnet() {
        let lan = net("198.18.0.0/24");
        assert!(check_host_addr(Ipv4Addr::new(198, 18, 0, 10), lan, "h").is_ok());
        assert!(check_host_addr(Ipv4Addr::new(198, 18, 0, 0), lan, "h").is_err());
        assert!(check_host_addr(Ipv4Addr::new(198, 18, 0, 255), lan, "h").is_err());
        assert!(check_host_addr(Ipv4Addr::new(198, 18, 1, 10), lan, "h").is_err());
    }

    #[test]
    fn a_lab_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Lab>();
        send_sync::<Proc>();
        send_sync::<Site<'static>>();
    }

    #[test]
    fn macs_and_ranges() {
        assert_eq!(mac_string([0, 0x16, 0x3e, 1, 0xab, 2]), "00:16:3e:01:ab:02");
        assert!(check_mac([1, 0, 0, 0, 0, 1]).is_err());
        assert!(check_mac([0; 6]).is_err());
        assert!(
            check_mac([2, 0, 0, 0, 0, 1]).is_ok(),
            "locally administered is allowed"
        );
        let hosts = HostSpec::range(Ipv4Addr::new(198, 18, 0, 254), 3);
        let ips: Vec<_> = hosts.iter().map(|h| h.ip.to_string()).collect();
        assert_eq!(ips, ["198.18.0.254", "198.18.0.255", "198.18.1.0"]);
    }
}
