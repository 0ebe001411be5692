//! The agent's main loop: plan the sweep, sweep each interface on its own OS thread, read the
//! site's Active Directory when `[directory]` is enabled, turn the answers into batches, queue
//! them (`queue.rs`), and deliver them until acknowledged (`delivery.rs`). `--once` does one
//! sweep (and one read) and returns when every queued batch, earlier runs' included, is
//! acknowledged; otherwise it sweeps every interval (with jitter) and reads the directory every
//! `directory.interval`, as [`Schedule`] says, until the shutdown token is cancelled, while a
//! delivery task sends what is queued. A read spans as many batches as it has parts (at most
//! [`DEFAULT_USERS_PER_BATCH`] users and [`MAX_BATCH_USER_BYTES`] of them each, no
//! observations); a failed read is one batch whose part carries the error.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use census_proto::{transport::Credentials, v1};
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::discovery::SweepSummary;
use crate::{
    config::{Config, ConfigError},
    delivery::{self, Deliverer, Mode},
    directory::{
        self, DEFAULT_USERS_PER_BATCH, DirectoryError, DirectoryReadResult, MAX_BATCH_USER_BYTES,
    },
    discovery::{self, Progress},
    enroll::{self, EnrollError, Start},
    iface,
    metrics::{self, Metrics},
    queue::{Queue, QueueError},
    report::{self, DeliveryError},
    scope::{self, ScopeError, SweepPlan},
};

/// How many attempts `--once` makes to deliver (backing off between them) before giving up.
const ONCE_DELIVERY_ATTEMPTS: u32 = 5;

/// Why the agent stopped. Each kind maps to its own exit code in the binary.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error("cannot list network interfaces: {0}")]
    Interfaces(String),
    #[error("cannot use the state directory: {0}")]
    State(std::io::Error),
    #[error(transparent)]
    Queue(QueueError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error("cannot use the agent's certificate: {0} (enroll again: census-agent enroll --force)")]
    Identity(String),
    #[error("{0}")]
    Sweep(String),
    #[error("sweep needs raw socket access: {0}")]
    Permission(String),
    #[error(
        "stopped before every batch was acknowledged ({pending} batches undelivered{}",
        if *kept { "; they stay queued in the state directory and the next run delivers them first)" } else { ": run again to sweep and deliver anew)" }
    )]
    Interrupted { pending: usize, kept: bool },
    #[error("{0}")]
    Internal(String),
}

/// How the agent runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Sweep once, deliver, and return.
    pub once: bool,
    /// Print progress lines on stderr (a person is watching a terminal).
    pub progress: bool,
}

/// Plans the sweep from the configuration and this host's interfaces and routes, and logs what
/// it is about to sweep.
pub fn plan(config: &Config) -> Result<SweepPlan, AgentError> {
    let interfaces = iface::list().map_err(|e| AgentError::Interfaces(e.to_string()))?;
    let routes = iface::routes();
    let mut scopes = config.scopes.clone();
    let from_interfaces = scope::interface_scopes(&config.scope_interfaces, &interfaces)?;
    config.check_scope_sizes(&from_interfaces)?;
    scopes.extend(from_interfaces);
    let plan = scope::plan(
        &scopes,
        &config.exclude,
        config.interface.as_deref(),
        &interfaces,
        &routes,
    )?;
    for p in &plan.on_link {
        info!(
            interface = %p.interface.name,
            scopes = %p.scopes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            targets = p.targets.len(),
            rate_pps = config.arp.rate,
            start_rate_pps = config.arp.start_rate(),
            method = if config.arp.enabled { "arp" } else { "none (arp disabled)" },
            "will sweep on-link"
        );
    }
    for r in &plan.routed {
        info!(
            scope = %r.scope,
            via = %r.route.gateway.map_or_else(|| r.route.interface.clone(), |g| format!("{g} on {}", r.route.interface)),
            targets = r.targets.len(),
            rate_pps = config.icmp.rate,
            method = if config.icmp.enabled { "icmp" } else { "none (icmp disabled)" },
            "will sweep routed"
        );
    }
    Ok(plan)
}

/// Sweeps once and returns the observations without delivering them (`census-agent scan`).
pub async fn scan(
    config: &Config,
    progress: bool,
    shutdown: &CancellationToken,
) -> Result<(Vec<v1::Observation>, SweepSummary), AgentError> {
    config.validate_sweep()?;
    let plan = plan(config)?;
    discovery::sweep(&plan, config, Progress { enabled: progress }, shutdown).await
}

/// What a run did, for `--once`'s summary: the last sweep and the last directory read.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub sweep: SweepSummary,
    /// `None` when the directory is not enabled (or no read finished).
    pub directory: Option<DirectorySummary>,
}

/// One directory read as it was queued for delivery.
#[derive(Debug)]
pub struct DirectorySummary {
    /// `DirectoryRead.directory`: the DNS domain (empty when a failed read never learnt it).
    pub directory: String,
    pub read_id: String,
    pub users: usize,
    pub pages: u32,
    pub skipped: u32,
    /// Batches the read was queued as (one for a failed read, none for a failed read that
    /// could not be named).
    pub batches: usize,
    /// Why the read failed; its failed-read part was queued all the same (unless `batches` is
    /// 0: the read could not be named).
    pub error: Option<DirectoryError>,
}

/// What is due in one turn of the loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Due {
    pub sweep: bool,
    pub directory: bool,
}

impl Due {
    pub fn any(self) -> bool {
        self.sweep || self.directory
    }
}

/// When the sweep and the directory read are next due: both at start, then the sweep every
/// (jittered) sweep interval after the previous one was delivered (or found the collector away:
/// its batches then wait in the queue, and the sweeps go on), and the directory read every
/// `directory.interval` after the previous read started. I/O-free, so the loop's timing is
/// tested without waiting.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// `None`: nothing is swept (a directory-only agent).
    next_sweep: Option<Instant>,
    /// `None`: the directory is not read.
    next_read: Option<Instant>,
    directory_interval: Duration,
}

impl Schedule {
    /// Everything due at `now`: the sweep when `sweeps` (a discovery method is enabled), the
    /// directory read when `directory_interval` is given (the directory is enabled).
    pub fn new(now: Instant, sweeps: bool, directory_interval: Option<Duration>) -> Schedule {
        Schedule {
            next_sweep: sweeps.then_some(now),
            next_read: directory_interval.map(|_| now),
            directory_interval: directory_interval.unwrap_or_default(),
        }
    }

    /// What is due at `now`.
    pub fn due(&self, now: Instant) -> Due {
        Due {
            sweep: self.next_sweep.is_some_and(|t| now >= t),
            directory: self.next_read.is_some_and(|t| now >= t),
        }
    }

    /// The sweep is done at `now`; the next one `wait` later.
    pub fn swept(&mut self, now: Instant, wait: Duration) {
        if self.next_sweep.is_some() {
            self.next_sweep = Some(now + wait);
        }
    }

    /// A read started at `started` (whatever came of it): the next one is an interval later.
    /// A failed read waits as long: retrying a refused bind sooner could lock the bind account
    /// out under the domain's lockout policy.
    pub fn read_started(&mut self, started: Instant) {
        if self.next_read.is_some() {
            self.next_read = Some(started + self.directory_interval);
        }
    }

    /// When the next thing is due (`None`: nothing ever is; validation refuses such a
    /// config, so the loop only waits for shutdown then).
    pub fn next_due(&self) -> Option<Instant> {
        match (self.next_sweep, self.next_read) {
            (Some(s), Some(r)) => Some(s.min(r)),
            (s, r) => s.or(r),
        }
    }
}

/// What one turn of the loop produced: the sequences of the batches it queued, and what was
/// swept and read.
#[derive(Debug, Default)]
pub struct Cycle {
    pub queued: Vec<u64>,
    pub sweep: Option<SweepSummary>,
    pub directory: Option<DirectorySummary>,
}

/// One turn of the loop: the sweep and the directory read, whichever is `due`, at the same
/// time, then their batches (the sweep's first) queued in `queue`, numbered with sequences it
/// reserves. `directory_name` names the directory in a failed read's part when the read itself
/// did not get as far as learning it.
///
/// The read runs concurrently with the sweep rather than before or after it: it waits on the
/// domain controller, not on this host (the LDAP client is async and its CPU work, decoding
/// entries, is small), while the sweep's timing-sensitive part (ARP) sends and times replies
/// on its own OS threads, so neither delays the other, and a cycle takes as long as the longer
/// of the two instead of their sum. If the sweep fails, the read is dropped with it (the agent
/// is stopping). Cancelling `shutdown` ends both at once, and then nothing is queued.
pub async fn cycle(
    plan: &SweepPlan,
    config: &Config,
    due: Due,
    progress: Progress,
    queue: &Queue,
    directory_name: Option<&str>,
    shutdown: &CancellationToken,
) -> Result<Cycle, AgentError> {
    let sweep = async {
        if due.sweep {
            discovery::sweep(plan, config, progress, shutdown)
                .await
                .map(Some)
        } else {
            Ok(None)
        }
    };
    let read = async {
        if !due.directory {
            return Ok::<_, AgentError>(None);
        }
        let read_at = SystemTime::now();
        let result = directory::read(&config.directory, shutdown).await;
        Ok(Some((read_at, result)))
    };
    let (swept, read) = tokio::try_join!(sweep, read)?;
    if shutdown.is_cancelled() {
        return Ok(Cycle::default());
    }

    let (observations, sweep) = match swept {
        Some((observations, summary)) => (observations, Some(summary)),
        None => (Vec::new(), None),
    };
    let (parts, directory) = match read {
        Some((read_at, result)) => {
            let (parts, summary) = directory_parts(result, read_at, directory_name);
            (parts, Some(summary))
        }
        None => (Vec::new(), None),
    };
    let observation_batches = report::batch_count(observations.len());
    let total = observation_batches + parts.len() as u64;
    let observation_count = observations.len();
    let queued = queue
        .push(total, |agent_id, first| {
            let mut batches = report::into_batches(agent_id, first, observations);
            batches.extend(report::directory_batches(
                agent_id,
                first + observation_batches,
                parts,
            ));
            batches
        })
        .map_err(AgentError::Queue)?;
    if let (Some(first), Some(last)) = (queued.first(), queued.last()) {
        info!(
            batches = queued.len(),
            observations = observation_count,
            first,
            last,
            queued = queue.len(),
            "batches queued"
        );
    }
    Ok(Cycle {
        queued,
        sweep,
        directory,
    })
}

/// A read's outcome as the parts to send: every user in parts of at most
/// [`DEFAULT_USERS_PER_BATCH`] users and [`MAX_BATCH_USER_BYTES`], or, for a failed read, one part with the error (logged here,
/// one warn line) so the collector keeps the previous users and marks them stale. The failed
/// part is named `directory_name`; without a name (no base DN configured and no complete read
/// yet) it is not sent, since the collector keeps users by directory name and refuses a part
/// without one.
pub fn directory_parts(
    result: Result<DirectoryReadResult, DirectoryError>,
    read_at: SystemTime,
    directory_name: Option<&str>,
) -> (
    Vec<(v1::DirectoryRead, Vec<v1::DirectoryUser>)>,
    DirectorySummary,
) {
    let read_id = uuid::Uuid::new_v4().to_string();
    match result {
        Ok(read) => {
            let mut summary = DirectorySummary {
                directory: read.directory.clone(),
                read_id: read_id.clone(),
                users: read.users.len(),
                pages: read.pages,
                skipped: read.skipped,
                batches: 0,
                error: None,
            };
            let parts = read.into_parts(&read_id, DEFAULT_USERS_PER_BATCH, MAX_BATCH_USER_BYTES);
            summary.batches = parts.len();
            info!(
                directory = %summary.directory,
                read_id = %summary.read_id,
                users = summary.users,
                batches = summary.batches,
                "directory read queued"
            );
            (parts, summary)
        }
        Err(error) => {
            let name = directory_name
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned);
            let Some(name) = name else {
                // The collector keeps users by directory name: a failed read it cannot place
                // would be refused (and no earlier users of ours can be under a name we never
                // learnt).
                warn!(
                    %read_id,
                    error = %error,
                    "directory read failed, and no read has named the directory yet: not \
                     reported to the collector (set directory.base_dn to name it)"
                );
                return (
                    Vec::new(),
                    DirectorySummary {
                        directory: String::new(),
                        read_id,
                        users: 0,
                        pages: 0,
                        skipped: 0,
                        batches: 0,
                        error: Some(error),
                    },
                );
            };
            // The error names the URL, the bind account and what to fix; never the password.
            warn!(
                directory = %name,
                %read_id,
                error = %error,
                "directory read failed: reporting it so the collector marks the previous users stale"
            );
            let part = directory::failed_read(&name, &read_id, read_at, &error);
            let summary = DirectorySummary {
                directory: name,
                read_id,
                users: 0,
                pages: 0,
                skipped: 0,
                batches: 1,
                error: Some(error),
            };
            (vec![(part, Vec::new())], summary)
        }
    }
}

/// Runs the agent until `shutdown` is cancelled (or, with `once`, until one sweep, and one
/// directory read when `[directory]` is enabled, are delivered, with whatever earlier runs left
/// in the queue). A failed directory read is no error here: its failed-read part is delivered
/// like any batch, and the summary carries the error for `--once` to report.
///
/// Every batch goes through the queue (`queue.rs`). Without `once`, a delivery task of its own
/// ([`delivery::deliver`]) sends what is queued while the loop sweeps and reads on its schedule,
/// so a collector that is away for hours only makes the queue longer.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, AgentError> {
    config.validate()?;
    let url = config.collector.clone().ok_or(ConfigError::NoCollector)?;
    if let Some(w) = config.collector_warning() {
        warn!("{w}");
    }
    let (creds, identity_dir) = identity(&config).await?;
    // An agent with every discovery method disabled only reads the directory (validate
    // allows that only with [directory] enabled): no scope, no plan, no sweep.
    let plan = if config.sweeps() {
        plan(&config)?
    } else {
        if !config.scopes.is_empty() || !config.scope_interfaces.is_empty() {
            warn!(
                "every discovery method is disabled: the scopes are not swept, only the directory is read"
            );
        }
        info!("every discovery method is disabled: this agent only reads the directory");
        SweepPlan::default()
    };
    let metrics = metrics::global();
    let queue = Arc::new(
        Queue::open(
            config.state_dir.as_deref(),
            config.queue.max_bytes(),
            metrics,
        )
        .map_err(AgentError::Queue)?,
    );
    // Batches carry the id the certificate names (delivery checks again after a new
    // certificate is read); adopted here already so the log says the id the collector knows.
    if let Some(id) = enroll::certificate_agent_id(&creds) {
        queue.adopt(&id).map_err(AgentError::Queue)?;
    }
    info!(agent_id = %queue.agent_id(), epoch = queue.epoch(), collector = %url, queued = queue.len(), "agent starting");
    if !queue.is_empty() {
        info!(
            batches = queue.len(),
            bytes = queue.bytes(),
            "batches queued by an earlier run: delivering them first"
        );
    }
    if !queue.is_durable() && !options.once {
        warn!(
            "no state directory: this run is a new agent, and batches wait for the collector in \
             memory only (lost if the agent stops); set --state-dir to keep them on disk"
        );
    }
    if config.directory.enabled {
        info!(
            url = config.directory.url.as_deref().unwrap_or_default(),
            interval = %humantime::format_duration(config.directory.interval),
            "will read the directory at start and every interval"
        );
    }

    // With --once a collector that is not there is an error now, before any packet is sent.
    let channel = match report::connect(&url, &creds, delivery::CONNECT_TIMEOUT).await {
        Ok(c) => Some(c),
        Err(e) if options.once => return Err(e.into()),
        Err(e) => {
            warn!(error = %e, "collector unreachable; sweeping anyway and delivering when it is back");
            None
        }
    };
    let deliverer = Deliverer::new(
        url,
        creds,
        Some(identity_dir),
        queue.clone(),
        channel,
        metrics,
    );
    // What a failed read's part names, so the collector marks the right directory's users
    // stale: the configured base DN's domain (what a complete read names too), else what the
    // last complete read named (kept in the state), else nothing (the read never worked).
    let configured_directory = config
        .directory
        .base_dn
        .as_deref()
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(directory::convert::domain_of);
    let mut turns = Turns {
        plan: &plan,
        config: &config,
        queue: &queue,
        configured_directory,
        progress: Progress {
            enabled: options.progress,
        },
        summary: RunSummary::default(),
        metrics,
    };
    if options.once {
        run_once(turns, deliverer, &shutdown).await
    } else {
        let outcome = run_forever(&mut turns, deliverer, &shutdown).await;
        if !queue.is_empty() {
            if queue.is_durable() {
                warn!(
                    batches = queue.len(),
                    "stopping with batches queued: they stay in the state directory, and the \
                     next start delivers them"
                );
            } else {
                warn!(
                    batches = queue.len(),
                    "stopping with batches undelivered, and lost: no state directory"
                );
            }
        }
        outcome.map(|()| turns.summary)
    }
}

/// The certificate `run` delivers with, and the directory it is in: the one in the state
/// directory, or, when there is none yet but a token is configured, a new one from enrolling
/// first (so an installed service enrolls on its first start). See [`enroll::plan`].
pub async fn identity(config: &Config) -> Result<(Credentials, PathBuf), AgentError> {
    let state_dir = config.state_dir.as_deref().ok_or(ConfigError::NoStateDir)?;
    let dir = match enroll::plan(config)? {
        Start::Enrolled { identity_dir } => identity_dir,
        Start::Enroll { token } => {
            let url = config
                .collector
                .as_deref()
                .ok_or(ConfigError::NoCollector)?;
            info!(collector = %url, "not enrolled yet: enrolling with the configured token");
            let ca = enroll::config_ca(config)?;
            let enrolled = enroll::enroll(url, &token, ca.as_deref(), state_dir).await?;
            info!(
                agent_id = %enrolled.agent_id,
                client = %enrolled.client,
                site = %enrolled.site,
                not_after = %humantime::format_rfc3339_seconds(enrolled.not_after),
                "{}",
                enrolled.line()
            );
            enroll::identity_dir(state_dir)
        }
    };
    let creds = Credentials::load(&dir).map_err(|e| AgentError::Identity(e.to_string()))?;
    if let Some(e) = enroll::load_enrollment(state_dir) {
        info!(agent_id = %e.agent_id, client = %e.client, site = %e.site, certificate_not_after = %e.not_after, "delivering with this agent's certificate");
    }
    Ok((creds, dir))
}

/// How long a stopping agent waits for the delivery task to finish the window it is sending.
const DELIVERY_DRAIN: Duration = Duration::from_secs(5);

/// `run --once`: one sweep (and read) queued, then everything queued delivered.
async fn run_once(
    mut turns: Turns<'_>,
    mut deliverer: Deliverer,
    shutdown: &CancellationToken,
) -> Result<RunSummary, AgentError> {
    let due = Due {
        sweep: turns.config.sweeps(),
        directory: turns.config.directory.enabled,
    };
    let queue = turns.queue.clone();
    let interrupted = |queue: &Queue| AgentError::Interrupted {
        pending: queue.len(),
        kept: queue.is_durable(),
    };
    if !turns.turn(due, shutdown).await? {
        return Err(interrupted(&queue));
    }
    let delivered = delivery::deliver(
        &mut deliverer,
        Mode::Once {
            attempts: ONCE_DELIVERY_ATTEMPTS,
        },
        turns.config.queue.retry_max,
        shutdown,
    )
    .await;
    if let Err(e) = delivered {
        if queue.is_durable() && !queue.is_empty() {
            warn!(
                batches = queue.len(),
                "batches stay queued in the state directory: the next run delivers them first"
            );
        }
        return Err(e);
    }
    if shutdown.is_cancelled() || !queue.is_empty() {
        return Err(interrupted(&queue));
    }
    Ok(turns.summary)
}

/// `run`: sweeps and reads on their schedule until `shutdown`, with delivery as a task of its
/// own. A fatal delivery error (the token refused, a batch rejected) ends the run.
async fn run_forever(
    turns: &mut Turns<'_>,
    mut deliverer: Deliverer,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let config = turns.config;
    let queue = turns.queue.clone();
    let status = deliverer.status.clone();
    let stop = shutdown.child_token();
    let retry_max = config.queue.retry_max;
    let mut task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            delivery::deliver(&mut deliverer, Mode::Forever, retry_max, &stop).await
        })
    };
    let mut schedule = Schedule::new(
        Instant::now(),
        config.sweeps(),
        config
            .directory
            .enabled
            .then_some(config.directory.interval),
    );
    let ended = |r: Result<Result<(), AgentError>, tokio::task::JoinError>| match r {
        Ok(r) => r,
        Err(e) => Err(AgentError::Internal(format!(
            "the delivery task failed: {e}"
        ))),
    };
    let outcome: Result<(), AgentError> = 'run: loop {
        let started = Instant::now();
        let due = schedule.due(started);
        if due.any() {
            let turn = tokio::select! {
                r = &mut task => break 'run ended(r).and(Err(AgentError::Internal("the delivery task stopped".into()))),
                r = turns.turn(due, shutdown) => r,
            };
            match turn {
                Err(e) => break 'run Err(e),
                Ok(false) => break 'run Ok(()),
                Ok(true) => {}
            }
            if due.directory {
                schedule.read_started(started);
            }
            if due.sweep {
                // The sweep is done once delivered, or once the collector is known to be away
                // (delivery then carries on by itself on its back-off schedule), but at most an
                // interval after it was queued: the next one is due an interval after that.
                let deadline = tokio::time::Instant::now() + config.interval;
                loop {
                    let changed = queue.changed();
                    if queue.is_empty()
                        || status.backing_off()
                        || shutdown.is_cancelled()
                        || tokio::time::Instant::now() >= deadline
                    {
                        break;
                    }
                    tokio::select! {
                        r = &mut task => break 'run ended(r).and(Err(AgentError::Internal("the delivery task stopped".into()))),
                        () = changed => {}
                        () = tokio::time::sleep_until(deadline) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
                let jitter = rand::rng().random_range(0.9..1.1);
                let wait = config.interval.mul_f64(jitter);
                schedule.swept(Instant::now(), wait);
                info!(next_in = ?wait, pending = queue.len(), "sweep done");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break 'run Ok(()),
            r = &mut task => break 'run ended(r).and(Err(AgentError::Internal("the delivery task stopped".into()))),
            () = async {
                match schedule.next_due() {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    };
    stop.cancel();
    if !task.is_finished() {
        // Let the window on the wire be acknowledged; what is not, is resent next time.
        if tokio::time::timeout(DELIVERY_DRAIN, &mut task)
            .await
            .is_err()
        {
            warn!(
                "delivery did not finish within {DELIVERY_DRAIN:?} of stopping: unacknowledged \
                 batches are sent again next time"
            );
            task.abort();
        }
    }
    outcome
}

/// What the loop's turns share: what to sweep and read, the queue, the summary so far.
struct Turns<'a> {
    plan: &'a SweepPlan,
    config: &'a Config,
    queue: &'a Arc<Queue>,
    configured_directory: Option<String>,
    progress: Progress,
    summary: RunSummary,
    metrics: &'static Metrics,
}

impl Turns<'_> {
    /// Sweeps and reads what is `due`, queues the batches, and records what was done. Returns
    /// false when `shutdown` came first (nothing is queued then).
    async fn turn(&mut self, due: Due, shutdown: &CancellationToken) -> Result<bool, AgentError> {
        let directory_name = self
            .configured_directory
            .clone()
            .or_else(|| self.queue.directory());
        let done = cycle(
            self.plan,
            self.config,
            due,
            self.progress,
            self.queue,
            directory_name.as_deref(),
            shutdown,
        )
        .await?;
        if shutdown.is_cancelled() {
            return Ok(false);
        }
        if let Some(s) = done.sweep {
            self.metrics.sweep(&s);
            self.summary.sweep = s;
        }
        if let Some(d) = done.directory {
            self.metrics.directory_read(d.error.is_some());
            if d.error.is_none() {
                self.queue
                    .set_directory(&d.directory)
                    .map_err(AgentError::Queue)?;
            }
            self.summary.directory = Some(d);
        }
        Ok(true)
    }
}

impl std::fmt::Debug for Turns<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turns").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::DirectorySettings, report::AgentState};

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn everything_is_due_at_start_then_each_on_its_own_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, true, Some(60 * MIN));
        assert_eq!(
            s.due(t0),
            Due {
                sweep: true,
                directory: true
            }
        );
        s.read_started(t0);
        s.swept(t0 + MIN, 15 * MIN);
        assert!(!s.due(t0 + MIN).any(), "nothing due right after");
        assert_eq!(s.next_due(), Some(t0 + 16 * MIN), "the sweep comes first");
        assert_eq!(
            s.due(t0 + 16 * MIN),
            Due {
                sweep: true,
                directory: false
            }
        );
        s.swept(t0 + 17 * MIN, 15 * MIN);
        s.swept(t0 + 32 * MIN, 15 * MIN);
        s.swept(t0 + 47 * MIN, 15 * MIN);
        assert_eq!(
            s.next_due(),
            Some(t0 + 60 * MIN),
            "then the read, an interval after it started"
        );
        assert_eq!(
            s.due(t0 + 60 * MIN),
            Due {
                sweep: false,
                directory: true
            },
            "a read falls due between sweeps"
        );
        s.read_started(t0 + 60 * MIN);
        assert_eq!(s.next_due(), Some(t0 + 62 * MIN));
        assert!(!s.due(t0 + 61 * MIN).directory);
        assert!(s.due(t0 + 120 * MIN).directory);
    }

    #[test]
    fn without_a_directory_only_the_sweep_is_due() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, true, None);
        assert_eq!(
            s.due(t0),
            Due {
                sweep: true,
                directory: false
            }
        );
        s.read_started(t0);
        s.swept(t0, 15 * MIN);
        assert_eq!(s.next_due(), Some(t0 + 15 * MIN));
        assert!(!s.due(t0 + 365 * 24 * 60 * MIN).directory);
    }

    #[test]
    fn a_directory_only_agent_never_sweeps() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, false, Some(60 * MIN));
        assert_eq!(
            s.due(t0),
            Due {
                sweep: false,
                directory: true
            }
        );
        s.read_started(t0);
        s.swept(t0, 15 * MIN);
        assert_eq!(s.next_due(), Some(t0 + 60 * MIN), "only the next read");
        assert!(!s.due(t0 + 365 * 24 * 60 * MIN).sweep);
        assert_eq!(Schedule::new(t0, false, None).next_due(), None);
    }

    fn user(n: u8) -> v1::DirectoryUser {
        v1::DirectoryUser {
            object_guid: vec![n; 16],
            sam_account_name: format!("u{n}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_read_becomes_parts_and_a_failure_one_part_with_the_error() {
        let read_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let read = DirectoryReadResult {
            directory: "lab.census.test".into(),
            base_dn: "DC=lab,DC=census,DC=test".into(),
            read_at,
            users: (0..=250u8).map(user).collect(),
            pages: 6,
            skipped: 2,
        };
        let (parts, summary) = directory_parts(Ok(read), read_at, None);
        assert_eq!(
            parts.len(),
            3,
            "251 users at {DEFAULT_USERS_PER_BATCH} a batch"
        );
        assert_eq!(
            (
                summary.users,
                summary.pages,
                summary.skipped,
                summary.batches
            ),
            (251, 6, 2, 3)
        );
        assert!(summary.error.is_none());
        assert!(
            parts
                .iter()
                .all(|(r, _)| r.read_id == summary.read_id && r.directory == "lab.census.test")
        );

        let error = DirectoryError::BindRefused {
            bind_dn: "census@lab.census.test".into(),
            hint: String::new(),
        };
        let (parts, summary) = directory_parts(Err(error), read_at, Some("lab.census.test"));
        assert_eq!(parts.len(), 1);
        let (read, users) = &parts[0];
        assert!(users.is_empty());
        assert_eq!((read.part, read.parts), (1, 1));
        assert_eq!(read.directory, "lab.census.test", "named by the caller");
        assert_eq!(
            read.read_at,
            Some(census_proto::convert::timestamp(read_at))
        );
        assert!(read.error.contains("refused the bind"), "{}", read.error);
        assert_eq!(summary.batches, 1);
        assert!(summary.error.is_some());
        // Unnamed (no base DN, no complete read yet): the collector could not place it.
        for name in [None, Some(""), Some(" ")] {
            let (parts, summary) = directory_parts(Err(DirectoryError::Cancelled), read_at, name);
            assert!(parts.is_empty(), "{name:?}");
            assert_eq!(summary.batches, 0);
            assert!(summary.error.is_some());
        }
    }

    #[test]
    fn parts_become_batches_with_consecutive_sequences_after_the_sweep() {
        let header = v1::DirectoryRead {
            directory: "lab.census.test".into(),
            read_id: "r1".into(),
            ..Default::default()
        };
        let parts = directory::to_batches_parts(
            &header,
            (0..=250u8).map(user).collect(),
            100,
            MAX_BATCH_USER_BYTES,
        );
        let batches = report::directory_batches("agent-1", 42, parts);
        assert_eq!(
            batches.iter().map(|b| b.sequence).collect::<Vec<_>>(),
            [42, 43, 44]
        );
        for (i, b) in batches.iter().enumerate() {
            let read = b
                .directory_read
                .as_ref()
                .expect("every batch names its part");
            assert_eq!(read.part as usize, i + 1);
            assert_eq!(read.parts, 3);
            assert!(b.observations.is_empty());
            assert_eq!(b.agent_id, "agent-1");
            assert_eq!(b.agent_version, env!("CARGO_PKG_VERSION"));
            assert!(b.sent_at.is_some());
        }
        assert_eq!(
            batches.iter().map(|b| b.users.len()).collect::<Vec<_>>(),
            [100, 100, 51]
        );
    }

    /// A read due alone, against a port where nothing listens: the cycle reserves one
    /// sequence, queues the failed-read part, and sweeps nothing.
    #[tokio::test]
    async fn a_cycle_with_a_failed_read_queues_one_numbered_batch() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let password = tmp.path().join("pw");
        std::fs::write(&password, "pw\n").expect("write");
        // A port that was just free: the connection is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a loopback port")
            .port();
        let config = Config {
            directory: DirectorySettings {
                enabled: true,
                url: Some(format!("ldaps://127.0.0.1:{port}")),
                bind_dn: Some("census@lab.census.test".into()),
                password_file: Some(password),
                insecure_skip_verify: true,
                timeout_ms: 2000,
                ..DirectorySettings::default()
            },
            ..Config::default()
        };
        AgentState::load_or_create(Some(tmp.path()))
            .and_then(|mut s| s.reserve(6))
            .expect("six sequences used before");
        let queue = Queue::open(
            Some(tmp.path()),
            1 << 30,
            Box::leak(Box::new(Metrics::new())),
        )
        .expect("queue");
        let due = Due {
            sweep: false,
            directory: true,
        };
        let done = cycle(
            &SweepPlan::default(),
            &config,
            due,
            Progress { enabled: false },
            &queue,
            Some("lab.census.test"),
            &CancellationToken::new(),
        )
        .await
        .expect("a failed read is no cycle error");
        assert!(done.sweep.is_none());
        assert_eq!(done.queued, [7]);
        let queued = queue.peek(10, u64::MAX).expect("peek");
        assert_eq!(queued.len(), 1);
        let b = &queued[0].batch;
        assert_eq!(
            (b.sequence, b.agent_id.as_str()),
            (7, queue.agent_id().as_str())
        );
        let read = b.directory_read.as_ref().expect("the part");
        assert!(
            read.error.starts_with("cannot reach ldaps://127.0.0.1:"),
            "{}",
            read.error
        );
        assert_eq!(read.directory, "lab.census.test");
        assert!(b.users.is_empty() && b.observations.is_empty());
        let summary = done.directory.expect("a read was due");
        assert!(matches!(
            summary.error,
            Some(DirectoryError::Unreachable { .. })
        ));
        drop(queue);
        let reloaded = AgentState::load_or_create(Some(tmp.path())).expect("reload");
        assert_eq!(
            reloaded.next_sequence, 8,
            "the sequence is reserved on disk"
        );
        let queue = Queue::open(
            Some(tmp.path()),
            1 << 30,
            Box::leak(Box::new(Metrics::new())),
        )
        .expect("reopen");
        assert_eq!(queue.len(), 1, "and the batch is queued on disk");

        // Cancelled before it starts: nothing is queued and no sequence is used.
        let cancel = CancellationToken::new();
        cancel.cancel();
        let done = cycle(
            &SweepPlan::default(),
            &config,
            due,
            Progress { enabled: false },
            &queue,
            None,
            &cancel,
        )
        .await
        .expect("cancelled");
        assert!(done.queued.is_empty() && done.directory.is_none());
        assert_eq!(queue.next_sequence(), 8);
        assert_eq!(queue.len(), 1);
    }
}
