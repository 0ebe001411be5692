//! The directory reader against a real Active Directory: a Samba AD DC the test provisions in a
//! lab namespace, read by this test binary re-run inside the lab's agent namespace (see
//! `testing.rs`), over LDAPS and StartTLS to the DC's 198.18.0.0/15 address.
//!
//! One test does every directory assertion, so the DC is provisioned once per test process (and
//! torn down with its lab at the end of the test, also when it fails). Some reads go through the
//! run loop's own cycle (`run::cycle`), to check the batches a real read becomes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, ensure};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::convert::guid_to_string;
use super::{DirectorySettings, USER_FILTER, read};
use crate::testing::{
    self, Lab,
    lab::{SAM_USER_OBJECT, SiteSpec},
};

/// One read the child makes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Case {
    name: String,
    url: String,
    starttls: bool,
    bind_dn: String,
    password_file: PathBuf,
    ca_file: Option<PathBuf>,
    insecure_skip_verify: bool,
    base_dn: Option<String>,
    page_size: u32,
    timeout_ms: u64,
    max_users: usize,
    /// Read through `run::cycle` (the run loop's path) and report the batches it queued.
    #[serde(default)]
    via_cycle: bool,
}

/// The first sequence a cycle case's state hands out.
const FIRST_SEQUENCE: u64 = 10;

/// The directory a cycle case's failed read is named after.
const KNOWN_DIRECTORY: &str = "lab.census.test";

/// One batch a cycle queued, for the trip from the child to the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Batch {
    sequence: u64,
    agent_id: String,
    observations: usize,
    /// sAMAccountNames of its users.
    users: Vec<String>,
    directory: String,
    read_id: String,
    part: u32,
    parts: u32,
    error: String,
    encoded_len: usize,
}

/// A `DirectoryUser`, for the trip from the child to the parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    guid: String,
    sid: String,
    sam: String,
    upn: String,
    display: String,
    dn: String,
    sam_type: u32,
    uac: u32,
    expires: Option<i64>,
    last_logon: Option<i64>,
    critical: bool,
    spn: bool,
    member_of: Vec<String>,
    computer: bool,
}

/// What one read gave.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Outcome {
    name: String,
    elapsed_ms: u64,
    result: Result<Read, String>,
    /// What `run::cycle` queued (cycle cases only).
    #[serde(default)]
    batches: Vec<Batch>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Read {
    directory: String,
    base_dn: String,
    pages: u32,
    skipped: u32,
    users: Vec<User>,
}

/// Not a test on its own: the lab test re-runs this test binary inside the agent's namespace
/// with this test selected, and it reads the directory from there.
#[test]
fn child() {
    let Some(cases) = testing::child_input::<Vec<Case>>() else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter("census_agent=debug")
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    for case in cases {
        let settings = DirectorySettings {
            enabled: true,
            url: Some(case.url.clone()),
            starttls: case.starttls,
            allow_plaintext: false,
            bind_dn: Some(case.bind_dn.clone()),
            password_file: Some(case.password_file.clone()),
            base_dn: case.base_dn.clone(),
            ca_file: case.ca_file.clone(),
            insecure_skip_verify: case.insecure_skip_verify,
            page_size: case.page_size,
            timeout_ms: case.timeout_ms,
            max_users: case.max_users,
            interval: Duration::from_secs(3600),
        };
        let started = Instant::now();
        if case.via_cycle {
            let outcome = rt.block_on(read_via_cycle(settings));
            testing::child_output(&Outcome {
                name: case.name,
                elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                ..outcome
            });
            continue;
        }
        let result = rt.block_on(read(&settings, &CancellationToken::new()));
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        testing::child_output(&Outcome {
            name: case.name,
            elapsed_ms,
            result: result
                .map(|r| Read {
                    directory: r.directory,
                    base_dn: r.base_dn,
                    pages: r.pages,
                    skipped: r.skipped,
                    users: r
                        .users
                        .into_iter()
                        .map(|u| User {
                            guid: <[u8; 16]>::try_from(u.object_guid.as_slice())
                                .map(|g| guid_to_string(&g))
                                .unwrap_or_default(),
                            sid: u.object_sid,
                            sam: u.sam_account_name,
                            upn: u.user_principal_name,
                            display: u.display_name,
                            dn: u.distinguished_name,
                            sam_type: u.sam_account_type,
                            uac: u.user_account_control,
                            expires: u.account_expires.map(|t| t.seconds),
                            last_logon: u.last_logon.map(|t| t.seconds),
                            critical: u.critical_system_object,
                            spn: u.has_service_principal_name,
                            member_of: u.member_of,
                            computer: u.is_computer,
                        })
                        .collect(),
                })
                .map_err(|e| e.to_string()),
            batches: Vec::new(),
        });
    }
}

/// A read due alone, through the run loop's cycle, with sequences from [`FIRST_SEQUENCE`].
async fn read_via_cycle(settings: DirectorySettings) -> Outcome {
    use prost::Message as _;
    let config = crate::config::Config {
        directory: settings,
        ..crate::config::Config::default()
    };
    let queue = crate::queue::Queue::open(
        None,
        1 << 30,
        Box::leak(Box::new(crate::metrics::Metrics::new())),
    )
    .expect("an in-memory queue");
    // Sequences from FIRST_SEQUENCE: reserve the ones before with empty batches, delivered.
    queue
        .push(FIRST_SEQUENCE - 1, |id, first| {
            (first..FIRST_SEQUENCE)
                .map(|sequence| census_proto::v1::ObservationBatch {
                    agent_id: id.to_owned(),
                    sequence,
                    ..Default::default()
                })
                .collect()
        })
        .expect("in memory");
    let earlier: Vec<u64> = queue
        .peek(usize::MAX, u64::MAX)
        .expect("peek")
        .iter()
        .map(|q| q.key)
        .collect();
    queue.remove(&earlier).expect("remove");
    let done = crate::run::cycle(
        &crate::scope::SweepPlan::default(),
        &config,
        crate::run::Due {
            sweep: false,
            directory: true,
        },
        crate::discovery::Progress { enabled: false },
        &queue,
        Some(KNOWN_DIRECTORY),
        &CancellationToken::new(),
    )
    .await;
    let (result, batches) = match done {
        Err(e) => (Err(format!("the cycle failed: {e}")), Vec::new()),
        Ok(done) => {
            let result = match done.directory {
                None => Err("no read happened".to_owned()),
                Some(d) => match d.error {
                    Some(e) => Err(e.to_string()),
                    None => Ok(Read {
                        directory: d.directory,
                        base_dn: String::new(),
                        pages: d.pages,
                        skipped: d.skipped,
                        users: Vec::new(),
                    }),
                },
            };
            let queued = queue.peek(usize::MAX, u64::MAX).unwrap_or_default();
            let batches = queued
                .iter()
                .map(|q| &q.batch)
                .map(|b| {
                    let read = b.directory_read.clone().unwrap_or_default();
                    Batch {
                        sequence: b.sequence,
                        agent_id: b.agent_id.clone(),
                        observations: b.observations.len(),
                        users: b.users.iter().map(|u| u.sam_account_name.clone()).collect(),
                        directory: read.directory,
                        read_id: read.read_id,
                        part: read.part,
                        parts: read.parts,
                        error: read.error,
                        encoded_len: b.encoded_len(),
                    }
                })
                .collect();
            (result, batches)
        }
    };
    Outcome {
        name: String::new(),
        elapsed_ms: 0,
        result,
        batches,
    }
}

/// Seconds since the epoch of a FILETIME.
fn unix_secs(filetime: i64) -> i64 {
    filetime / 10_000_000 - 11_644_473_600
}

fn now_secs() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
    .unwrap_or(0)
}

/// A DC with every kind of account the billable-user rules tell apart, and 1,200 bulk users;
/// reads of it from the agent's namespace with a page size of 100 (paging), over StartTLS,
/// without a CA file, with a wrong password, at an address with no host, at a port with no
/// listener, with a user cap, and under a base DN that does not exist.
#[test]
fn lab_reads_a_real_active_directory() -> Result<()> {
    if testing::skip_lab() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let prefix = lab.prefix().to_owned();
    let dc_ip = Ipv4Addr::new(198, 18, 41, 10);
    let site = lab.add_site(SiteSpec::new(
        "directory",
        "198.18.41.0/24".parse()?,
        Ipv4Addr::new(198, 18, 41, 2),
    ))?;
    let agent_ns = site.agent().ns().to_owned();
    let t = Instant::now();
    let dc = lab.samba_dc(&site, dc_ip, "lab.census.test")?;
    let domain = dc.dns_domain();
    let base = dc.base_dn().to_owned();

    // The accounts.
    let pw = "Lab-User-Passw0rd!";
    for name in [
        "census-reader",
        "alice",
        "bob",
        "carol",
        "svc-backup",
        "dave",
        "frank",
        "gina",
        "hank",
        "ivan",
    ] {
        dc.add_user(name, pw)?;
    }
    dc.disable_user("bob")?;
    let before_expiry = now_secs() - 5;
    dc.set_expiry_days("carol", 0)?;
    let after_expiry = now_secs() + 5;
    dc.add_spn("http/backup.lab.census.test", "svc-backup")?;
    dc.add_group("Billing Exclusions")?;
    dc.add_group_members("Billing Exclusions", &["dave"])?;
    // Nesting: hank is in Contractors EU, in Contractors, in Billing Exclusions.
    dc.add_group("Contractors")?;
    dc.add_group("Contractors EU")?;
    dc.add_group_members("Billing Exclusions", &["Contractors"])?;
    dc.add_group_members("Contractors", &["Contractors EU"])?;
    dc.add_group_members("Contractors EU", &["hank"])?;
    // A cycle: ivan is in Cycle A, which is in Cycle B, which is in Cycle A.
    dc.add_group("Cycle A")?;
    dc.add_group("Cycle B")?;
    dc.add_group_members("Cycle B", &["Cycle A"])?;
    dc.add_group_members("Cycle A", &["Cycle B", "ivan"])?;
    dc.add_computer("ws01")?;
    dc.add_contact("Erin External")?;
    let stale = 131_000_000_000_000_000i64; // 2016-02-16T09:46:40Z
    dc.set_last_logon("frank", stale)?;
    dc.set_attribute(&dc.user_dn("alice"), "displayName", &["Alice Ünicode 日本"])?;
    // In more groups than the agent keeps.
    dc.add_bulk_groups("grp", 70, &dc.user_dn("gina"))?;
    let bulk = dc.add_bulk_users("bulk", 1200)?;
    eprintln!(
        "directory lab: DC and accounts ready in {} ms",
        t.elapsed().as_millis()
    );

    // What the directory holds, read by Samba's own tools: the oracle.
    let oracle: BTreeMap<String, (String, String)> = dc
        .ldbsearch(USER_FILTER, &["sAMAccountName", "objectGUID", "objectSid"])?
        .into_iter()
        .filter_map(|e| {
            Some((
                e.get("sAMAccountName")?.to_owned(),
                (
                    e.get("objectGUID")?.to_owned(),
                    e.get("objectSid")?.to_owned(),
                ),
            ))
        })
        .collect();
    ensure!(
        oracle.len() >= 1200 + 11,
        "{} users in sam.ldb",
        oracle.len()
    );

    let dir = lab.dir().to_owned();
    let good = dir.join("directory-password");
    std::fs::write(&good, format!("{pw}\n"))?;
    let wrong = dir.join("directory-wrong-password");
    std::fs::write(&wrong, "not-the-password\n")?;
    let upn = format!("census-reader@{domain}");
    let case = |name: &str| Case {
        name: name.into(),
        url: dc.url(),
        starttls: false,
        bind_dn: upn.clone(),
        password_file: good.clone(),
        ca_file: Some(dc.ca_file()),
        insecure_skip_verify: false,
        base_dn: None,
        page_size: 100,
        timeout_ms: 10_000,
        max_users: 200_000,
        via_cycle: false,
    };
    let cases = vec![
        Case {
            via_cycle: true,
            page_size: 50,
            ..case("cycle")
        },
        Case {
            via_cycle: true,
            password_file: wrong.clone(),
            ..case("cycle-wrong-password")
        },
        case("paged"),
        Case {
            url: dc.ldap_url(),
            starttls: true,
            page_size: 1000,
            // A DN works as well as a UPN.
            bind_dn: format!("CN=census-reader,CN=Users,{base}"),
            base_dn: Some(base.clone()),
            ..case("starttls")
        },
        Case {
            ca_file: None,
            ..case("untrusted")
        },
        Case {
            ca_file: None,
            insecure_skip_verify: true,
            ..case("insecure")
        },
        Case {
            password_file: wrong.clone(),
            ..case("wrong-password")
        },
        Case {
            url: "ldaps://198.18.41.99:636".into(),
            timeout_ms: 2000,
            ..case("no-host")
        },
        Case {
            url: format!("ldaps://{dc_ip}:6360"),
            timeout_ms: 2000,
            ..case("no-listener")
        },
        Case {
            max_users: 500,
            ..case("too-many")
        },
        Case {
            base_dn: Some(format!("OU=Nowhere,{base}")),
            ..case("no-base")
        },
    ];
    let t = Instant::now();
    let outcomes: Vec<Outcome> = testing::run_child(
        &lab,
        &agent_ns,
        "directory::tests::child",
        &cases,
        Duration::from_secs(180),
    )?;
    eprintln!(
        "directory lab: {} reads in {} ms",
        outcomes.len(),
        t.elapsed().as_millis()
    );
    let by_name: BTreeMap<&str, &Outcome> = outcomes.iter().map(|o| (o.name.as_str(), o)).collect();
    ensure!(by_name.len() == cases.len(), "{outcomes:?}");
    let ok = |name: &str| -> Result<&Read> {
        let outcome = by_name.get(name).context("no such case")?;
        match &outcome.result {
            Ok(read) => Ok(read),
            Err(e) => anyhow::bail!("read {name} failed: {e}"),
        }
    };
    let err = |name: &str| -> Result<(&str, u64)> {
        let outcome = by_name.get(name).context("no such case")?;
        match &outcome.result {
            Err(e) => Ok((e.as_str(), outcome.elapsed_ms)),
            Ok(r) => anyhow::bail!("read {name} should have failed: {} users", r.users.len()),
        }
    };

    // --- the paged read ---
    let paged = ok("paged")?;
    eprintln!(
        "directory lab: paged read of {} users in {} pages ({} ms)",
        paged.users.len(),
        paged.pages,
        by_name["paged"].elapsed_ms
    );
    ensure!(paged.directory == domain, "{}", paged.directory);
    ensure!(paged.base_dn == base, "from the rootDSE: {}", paged.base_dn);
    ensure!(paged.skipped == 0);
    let users: BTreeMap<&str, &User> = paged.users.iter().map(|u| (u.sam.as_str(), u)).collect();
    ensure!(users.len() == paged.users.len(), "each user once");
    let read_names: BTreeSet<&str> = users.keys().copied().collect();
    let oracle_names: BTreeSet<&str> = oracle.keys().map(String::as_str).collect();
    ensure!(
        read_names == oracle_names,
        "read and sam.ldb differ: only read {:?}, only in sam.ldb {:?}",
        read_names.difference(&oracle_names).collect::<Vec<_>>(),
        oracle_names.difference(&read_names).collect::<Vec<_>>()
    );
    // Paging: more than 1,200 users at 100 a page take at least 13 pages.
    ensure!(paged.users.len() > 1200);
    ensure!(
        paged.pages as usize >= paged.users.len().div_ceil(100),
        "{} pages for {} users",
        paged.pages,
        paged.users.len()
    );
    // objectGUID and objectSid decode as Samba's own tools print them.
    for u in &paged.users {
        let (guid, sid) = &oracle[&u.sam];
        ensure!(
            &u.guid == guid && &u.sid == sid,
            "{}: {} {} vs {guid} {sid}",
            u.sam,
            u.guid,
            u.sid
        );
    }
    let user = |sam: &str| -> Result<&User> {
        users
            .get(sam)
            .copied()
            .with_context(|| format!("{sam} not read"))
    };
    let domain_sid = user("Administrator")?
        .sid
        .strip_suffix("-500")
        .context("Administrator is RID 500")?
        .to_owned();
    ensure!(domain_sid.starts_with("S-1-5-21-"), "{domain_sid}");

    // Enabled: a normal, enabled, never-expiring user that never logged on.
    let alice = user("alice")?;
    let expected = User {
        guid: alice.guid.clone(),
        sid: alice.sid.clone(),
        sam: "alice".into(),
        upn: format!("alice@{domain}"),
        display: "Alice Ünicode 日本".into(),
        dn: format!("CN=alice,CN=Users,{base}"),
        sam_type: SAM_USER_OBJECT,
        uac: 0x200,
        expires: None,
        last_logon: None,
        critical: false,
        spn: false,
        member_of: vec![],
        computer: false,
    };
    ensure!(*alice == expected, "{alice:?}");
    ensure!(
        alice.sid.starts_with(&format!("{domain_sid}-")),
        "{}",
        alice.sid
    );
    // Disabled: ACCOUNTDISABLE (0x2).
    let bob = user("bob")?;
    ensure!(
        bob.uac == 0x202 && bob.sam_type == SAM_USER_OBJECT,
        "{bob:?}"
    );
    // Expired: accountExpires set to the moment of `setexpiry --days=0`.
    let carol = user("carol")?;
    let expires = carol.expires.context("carol expires")?;
    ensure!(
        (before_expiry..=after_expiry).contains(&expires) && carol.uac == 0x200,
        "{carol:?}"
    );
    // Service account: a servicePrincipalName.
    let svc = user("svc-backup")?;
    ensure!(svc.spn && svc.uac == 0x200 && !svc.critical, "{svc:?}");
    // Exclusion group member.
    let dave = user("dave")?;
    ensure!(
        dave.member_of == [format!("CN=Billing Exclusions,CN=Users,{base}")],
        "{dave:?}"
    );
    // Stale logon.
    let frank = user("frank")?;
    ensure!(frank.last_logon == Some(unix_secs(stale)), "{frank:?}");
    ensure!(frank.last_logon == Some(1_455_526_400));
    // Critical system objects: Administrator (RID 500, a member of Domain Admins), krbtgt
    // (disabled, with an SPN), Guest.
    let admin = user("Administrator")?;
    ensure!(admin.critical && admin.uac & 0x2 == 0, "{admin:?}");
    ensure!(
        admin
            .member_of
            .contains(&format!("CN=Domain Admins,CN=Users,{base}")),
        "{admin:?}"
    );
    let krbtgt = user("krbtgt")?;
    ensure!(
        krbtgt.critical && krbtgt.uac & 0x2 != 0 && krbtgt.spn,
        "{krbtgt:?}"
    );
    ensure!(user("Guest")?.critical);
    // Nested groups: hank, two levels inside Billing Exclusions, is a member of it.
    let hank = user("hank")?;
    let group = |cn: &str| format!("CN={cn},CN=Users,{base}");
    ensure!(
        hank.member_of
            == [
                group("Billing Exclusions"),
                // Sorted as bytes: "Contractors EU," before "Contractors,".
                group("Contractors EU"),
                group("Contractors"),
            ],
        "{hank:?}"
    );
    // A cycle: each group once, and the read ends.
    let ivan = user("ivan")?;
    ensure!(
        ivan.member_of == [group("Cycle A"), group("Cycle B")],
        "{ivan:?}"
    );
    // gina's 70 groups are all kept (the old cap of 64 dropped six), sorted.
    let gina = user("gina")?;
    ensure!(gina.member_of.len() == 70, "{}", gina.member_of.len());
    ensure!(gina.member_of.windows(2).all(|w| w[0] < w[1]));
    // Computers and contacts are not users: the filter leaves them out.
    ensure!(!users.contains_key("ws01$"));
    ensure!(
        !paged
            .users
            .iter()
            .any(|u| u.computer || u.dn.contains("Erin"))
    );
    // The bulk users: proper user objects, distinct keys.
    let guids: BTreeSet<&str> = paged.users.iter().map(|u| u.guid.as_str()).collect();
    let sids: BTreeSet<&str> = paged.users.iter().map(|u| u.sid.as_str()).collect();
    ensure!(guids.len() == paged.users.len() && sids.len() == paged.users.len());
    for name in &bulk {
        let u = user(name)?;
        ensure!(
            u.sam_type == SAM_USER_OBJECT && u.uac == 0x200 && u.upn == format!("{name}@{domain}"),
            "{u:?}"
        );
    }

    // --- the same directory over StartTLS, bound by DN, 1000 a page ---
    let starttls = ok("starttls")?;
    ensure!(
        starttls.users == paged.users,
        "StartTLS reads the same users"
    );
    ensure!(
        starttls.pages >= 2,
        "{} users need 2 pages of 1000",
        starttls.users.len()
    );
    // Certificate checks off: still reads (a lab option, logged loudly).
    ensure!(ok("insecure")?.users.len() == paged.users.len());

    // --- through the run loop's cycle: batches of at most 100 users, numbered in a row ---
    let cycle = ok("cycle")?;
    let batches = &by_name["cycle"].batches;
    let n = oracle.len();
    eprintln!(
        "directory lab: the cycle queued {n} users in {} batches ({} pages of 50)",
        batches.len(),
        cycle.pages
    );
    ensure!(cycle.directory == domain && cycle.skipped == 0, "{cycle:?}");
    ensure!(
        cycle.pages as usize >= n.div_ceil(50),
        "{} pages of 50 for {n} users",
        cycle.pages
    );
    let k = n.div_ceil(crate::directory::DEFAULT_USERS_PER_BATCH);
    ensure!(
        batches.len() == k,
        "{} batches for {n} users",
        batches.len()
    );
    let read_id = &batches[0].read_id;
    ensure!(!read_id.is_empty());
    let mut sent = BTreeSet::new();
    for (i, b) in batches.iter().enumerate() {
        ensure!(
            b.sequence == FIRST_SEQUENCE + i as u64
                && b.part as usize == i + 1
                && b.parts as usize == k,
            "batch {i}: sequence {} part {}/{}",
            b.sequence,
            b.part,
            b.parts
        );
        ensure!(b.agent_id == batches[0].agent_id && &b.read_id == read_id);
        ensure!(b.directory == domain && b.error.is_empty() && b.observations == 0);
        ensure!(
            !b.users.is_empty() && b.users.len() <= crate::directory::DEFAULT_USERS_PER_BATCH,
            "batch {i}: {} users",
            b.users.len()
        );
        ensure!(b.encoded_len < 4 * 1024 * 1024, "{} bytes", b.encoded_len);
        for u in &b.users {
            ensure!(sent.insert(u.as_str()), "{u} sent twice");
        }
    }
    ensure!(sent == oracle_names, "the batches hold every user once");
    // A failed read through the cycle: one batch with the error, named by the caller.
    let (e, _) = err("cycle-wrong-password")?;
    ensure!(e.contains("refused the bind"), "{e}");
    let failed = &by_name["cycle-wrong-password"].batches;
    ensure!(failed.len() == 1, "{failed:?}");
    let f = &failed[0];
    ensure!(
        f.sequence == FIRST_SEQUENCE
            && (f.part, f.parts) == (1, 1)
            && f.users.is_empty()
            && f.directory == KNOWN_DIRECTORY
            && f.error == e
            && !f.read_id.is_empty(),
        "{f:?}"
    );

    // --- failures, each one clear line ---
    let (e, _) = err("untrusted")?;
    ensure!(
        e.contains("certificate not trusted") && e.contains("set directory.ca_file"),
        "{e}"
    );
    let (e, _) = err("wrong-password")?;
    ensure!(
        e.starts_with(&format!(
            "the directory refused the bind for {upn}: check password_file"
        )),
        "{e}"
    );
    let (e, ms) = err("no-host")?;
    ensure!(
        e.starts_with("cannot reach ldaps://198.18.41.99:636: "),
        "{e}"
    );
    ensure!(ms < 4_000, "no host: {ms} ms for a 2 s timeout");
    let (e, ms) = err("no-listener")?;
    ensure!(
        e.starts_with(&format!("cannot reach ldaps://{dc_ip}:6360: ")) && e.contains("refused"),
        "{e}"
    );
    ensure!(ms < 2_000, "a refused connection fails at once: {ms} ms");
    let (e, _) = err("too-many")?;
    ensure!(e.contains("more than 500 users"), "{e}");
    let (e, _) = err("no-base")?;
    ensure!(
        e.contains("noSuchObject") && e.contains("OU=Nowhere"),
        "{e}"
    );
    for o in &outcomes {
        if let Err(e) = &o.result {
            ensure!(!e.contains('\n'), "one line: {e}");
            ensure!(!e.contains(pw), "no password in errors: {e}");
            eprintln!("directory lab: {}: {e} ({} ms)", o.name, o.elapsed_ms);
        }
    }

    drop(dc);
    drop(site);
    drop(lab);
    let left = census_tests::lab::namespaces_with_prefix(&prefix);
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}
