//! One device, start to end: find a credential it answers, then read its system group and
//! tables into an [`SnmpDevice`]. Failures of single tables are recorded in `errors` and the
//! rest is still read; a device that stops answering has its remaining tables skipped.
//!
//! Credential order (documented for operators, see [`query`]):
//! 1. The communities, in the configured order of preference, v2c preferred to v1 for each
//!    (GETBULK walks are much faster); v1 is only used by a device that ignores v2c. All are
//!    asked at once (see `credential.rs`), so an address that answers none costs one timeout
//!    budget however many communities the site has.
//! 2. Then each v3 user in order, with the device's engine already known: engine discovery
//!    needs no credential and runs alongside step 1 (so v1/v2c devices that speak v3 report
//!    their engine ID too).
//!
//! An address that refuses the port (ICMP port unreachable) is given up at once.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use census_proto::v1;
use snmp2::Version;
use tokio::time::Instant;
use tracing::{debug, instrument};

use super::{
    SnmpConfig, SnmpDevice, credential,
    session::{Client, Credential, QueryError, Response, Timing, discover_engine},
    tables::{self, Row},
    usm::{self, Engine, UserLevel},
};
use crate::config::SnmpV3User;

/// Longest one table walk may take (a 10 000-row table at 25 rows per request over a 50 ms
/// link takes 20 s).
const WALK_BUDGET: Duration = Duration::from_secs(30);
/// Longest the table reads of one device may take together, on top of the credential search.
const DEVICE_BUDGET: Duration = Duration::from_secs(120);

/// The site's credentials, checked once per sweep.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    pub communities: Vec<Vec<u8>>,
    /// Users that passed validation, with their parsed levels.
    pub users: Vec<(SnmpV3User, UserLevel)>,
}

/// A client that answered, and how to label it.
struct Found {
    client: Client,
    first: Response,
    version: &'static str,
    credential: String,
}

/// Queries one device. `None` when no credential got an answer.
#[instrument(level = "debug", skip_all, fields(ip = %ip))]
pub(crate) async fn query(
    ip: Ipv4Addr,
    credentials: Arc<Prepared>,
    cfg: Arc<SnmpConfig>,
) -> Option<SnmpDevice> {
    let timing = Timing {
        timeout: cfg.timeout,
        retries: cfg.retries,
    };
    let addr = SocketAddrV4::new(ip, cfg.port);
    let (by_community, engine) = tokio::join!(
        async {
            let found = find_community(addr, &credentials.communities, timing).await?;
            Some(read_device(ip, found, &cfg).await)
        },
        discover_engine(ip, cfg.port, timing),
    );
    let engine = engine
        .inspect_err(|e| debug!(error = %e, "no SNMPv3 engine discovered"))
        .ok();
    if let Some(mut device) = by_community {
        if let Some(engine) = engine {
            // The discovered engine ID is the authoritative one; snmpEngineID.0 over v2c is the
            // same value where a device exposes it.
            device.identity.engine_id = engine.id;
        }
        return Some(device);
    }
    let engine = engine?;
    let found = find_user(addr.into(), &credentials.users, &engine, timing).await?;
    let mut device = read_device(ip, found, &cfg).await;
    device.identity.engine_id = engine.id;
    Some(device)
}

/// The community the device answers (see `credential.rs`), and a client for its tables.
async fn find_community(
    addr: SocketAddrV4,
    communities: &[Vec<u8>],
    timing: Timing,
) -> Option<Found> {
    let answer = credential::find_community(*addr.ip(), addr.port(), communities, timing).await;
    let answer = match answer {
        Ok(Some(a)) => a,
        Ok(None) => {
            debug!("no community answered");
            return None;
        }
        Err(e) => {
            debug!(error = %e, "no community answered");
            return None;
        }
    };
    let community = communities.get(answer.index)?.clone();
    Some(Found {
        client: Client::new(
            addr.into(),
            Credential::Community {
                version: answer.version,
                community,
            },
            timing,
        ),
        first: answer.response,
        version: if answer.version == Version::V1 {
            "1"
        } else {
            "2c"
        },
        credential: format!("community #{}", answer.index + 1),
    })
}

/// The first v3 user (and key-extension method) the device accepts.
async fn find_user(
    addr: SocketAddr,
    users: &[(SnmpV3User, UserLevel)],
    engine: &Engine,
    timing: Timing,
) -> Option<Found> {
    for (user, level) in users {
        for extension in usm::key_extensions(level) {
            // Key localization hashes about 1 MiB per key: keep it off the async threads.
            let (u, l, e) = (user.clone(), level.clone(), engine.clone());
            let security =
                tokio::task::spawn_blocking(move || usm::security(&u, &l, extension, &e)).await;
            let security = match security {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(user = %user.name, error = %e, "SNMPv3 user not usable");
                    continue;
                }
                Err(e) => {
                    debug!(error = %e, "key localization did not finish");
                    continue;
                }
            };
            let client = Client::new(addr, Credential::V3(Box::new(security)), timing);
            match probe(client).await {
                (client, Ok(first)) => {
                    return Some(Found {
                        client,
                        first,
                        version: "3",
                        credential: tables::text(user.name.as_bytes()),
                    });
                }
                (_, Err(QueryError::Unreachable)) => return None,
                (_, Err(e)) => debug!(user = %user.name, error = %e, "SNMPv3 user not accepted"),
            }
        }
    }
    None
}

/// The first request to a device with one credential: the system scalars. Any response proves
/// the credential (a wrong community gets none; a wrong v3 user gets a report, an error here).
async fn probe(mut client: Client) -> (Client, Result<Response, QueryError>) {
    let result = client.get(&tables::SYSTEM_SCALARS).await;
    (client, result)
}

/// Reads everything the probe wants from a device that answered.
async fn read_device(ip: Ipv4Addr, found: Found, cfg: &SnmpConfig) -> SnmpDevice {
    let Found {
        mut client,
        first,
        version,
        credential,
    } = found;
    debug!(version, credential = %credential, "device answered");
    let mut reader = Reader {
        client: &mut client,
        cfg,
        deadline: Instant::now() + DEVICE_BUDGET,
        errors: Vec::new(),
    };
    let mut identity = v1::SnmpIdentity {
        version: version.to_string(),
        credential,
        ..v1::SnmpIdentity::default()
    };
    reader.system(first, &mut identity).await;

    let max = cfg.max_rows.max(1);
    let descr = reader.column("ifDescr", tables::IF_DESCR).await;
    let phys = reader
        .column("ifPhysAddress", tables::IF_PHYS_ADDRESS)
        .await;
    let name = reader.column("ifName", tables::IF_NAME).await;
    identity.interfaces = tables::interfaces(&descr, &name, &phys, max);

    let class = reader
        .column("entPhysicalClass", tables::ENT_PHYSICAL_CLASS)
        .await;
    let serial = reader
        .column("entPhysicalSerialNum", tables::ENT_PHYSICAL_SERIAL)
        .await;
    let model = reader
        .column("entPhysicalModelName", tables::ENT_PHYSICAL_MODEL)
        .await;
    (identity.serial_number, identity.model) = tables::chassis(&class, &serial, &model);

    let media = reader
        .column("ipNetToMediaTable", tables::IP_NET_TO_MEDIA_PHYS)
        .await;
    let physical = reader
        .column("ipNetToPhysicalTable", tables::IP_NET_TO_PHYSICAL_PHYS)
        .await;
    identity.arp_cache = tables::arp_cache(&media, &physical, max);

    let dot1d = reader
        .column("dot1dTpFdbTable", tables::DOT1D_TP_FDB_PORT)
        .await;
    let dot1q = reader
        .column("dot1qTpFdbTable", tables::DOT1Q_TP_FDB_PORT)
        .await;
    let ports = if dot1d.is_empty() && dot1q.is_empty() {
        Vec::new() // not a bridge: no need for its port map
    } else {
        reader
            .column("dot1dBasePortIfIndex", tables::DOT1D_BASE_PORT_IF_INDEX)
            .await
    };
    identity.forwarding = tables::forwarding(&dot1d, &dot1q, &ports, max);

    let mut lldp = Vec::with_capacity(tables::LLDP_COLUMNS.len());
    for column in tables::LLDP_COLUMNS {
        let root = [tables::LLDP_REM_ENTRY, &[column]].concat();
        let rows = reader.column("lldpRemTable", &root).await;
        if column == tables::LLDP_REM_CHASSIS_ID_SUBTYPE && rows.is_empty() {
            break; // every neighbour has a chassis id subtype: no rows, no neighbours
        }
        lldp.push((column, rows));
    }
    identity.lldp_neighbors = tables::lldp_neighbors(&lldp, max);

    let errors = reader.errors;
    if !errors.is_empty() {
        debug!(?errors, "parts of the device could not be read");
    }
    SnmpDevice {
        ip,
        identity,
        errors,
    }
}

/// Walks a device's tables with one client, collecting what failed.
struct Reader<'a> {
    client: &'a mut Client,
    cfg: &'a SnmpConfig,
    deadline: Instant,
    errors: Vec<String>,
}

impl Reader<'_> {
    /// The system group from the first response; v1 agents fail a whole GET for one missing
    /// object (noSuchName), so then each scalar is asked for alone.
    async fn system(&mut self, first: Response, identity: &mut v1::SnmpIdentity) {
        if first.error_status == 0 {
            tables::apply_system(&first.varbinds, identity);
            return;
        }
        if self.client.version() != Version::V1 {
            self.errors.push(format!(
                "system group: error-status {} at varbind {}",
                first.error_status, first.error_index
            ));
            return;
        }
        for oid in tables::SYSTEM_SCALARS {
            match self.client.get(&[oid]).await {
                Ok(r) if r.error_status == 0 => tables::apply_system(&r.varbinds, identity),
                Ok(_) => {}
                Err(e) => {
                    self.errors.push(format!("system group: {e}"));
                    return;
                }
            }
        }
    }

    /// One column; what was read before a failure is kept, the failure noted once.
    async fn column(&mut self, name: &str, root: &[u32]) -> Vec<Row> {
        let deadline = self.deadline.min(Instant::now() + WALK_BUDGET);
        let max_rows = self.cfg.max_rows.max(1);
        let walk = self
            .client
            .walk(root, self.cfg.max_repetitions, max_rows, deadline)
            .await;
        match walk.error {
            Some(QueryError::Abandoned) => {
                let note = format!("{}", QueryError::Abandoned);
                if !self.errors.iter().any(|e| e.ends_with(&note)) {
                    self.errors.push(format!("{name} and later tables: {note}"));
                }
            }
            Some(e) => self.errors.push(format!("{name}: {e}")),
            None => {}
        }
        if walk.truncated {
            self.errors
                .push(format!("{name}: stopped at max_rows ({max_rows})"));
        }
        walk.rows
    }
}
