//! Reading the site's Active Directory for users: the agent binds to a domain controller over
//! LDAPS (or LDAP with StartTLS), runs one paged search for user objects and one for groups,
//! and hands back each account as a `census.v1.DirectoryUser` with what the collector's
//! billable-user policy needs (objectGUID and objectSid as join keys to Entra ID,
//! sAMAccountType, userAccountControl, accountExpires, lastLogonTimestamp, whenCreated,
//! isCriticalSystemObject, servicePrincipalName, and `member_of`: every group the user is in,
//! nested groups included, so that a member of an exclusion group through a nested group is
//! excluded too).
//! Whether an account counts is the collector's call, not the agent's: the agent reports, with
//! evidence, and judges nothing.
//!
//! Layout:
//! - `directory.rs` (this file): [`read`], its result and errors, and [`to_batches_parts`],
//!   which splits a read into the parts of `census.v1.DirectoryRead` by count and by bytes.
//! - `directory/client.rs`: the LDAP conversation (TLS, bind, rootDSE, paged search), every
//!   step under a timeout.
//! - `directory/entry.rs`: BER entries and paged-results cookies to users, without I/O.
//! - `directory/groups.rs`: the group → parent groups map and each user's groups, nested
//!   included (cycles, caps), without I/O.
//! - `directory/convert.rs`: SIDs, GUIDs, FILETIMEs, AD integers and capped text, without I/O.
//! - `directory/show.rs`: a read as `census-agent users` prints it (table or JSON).
//!
//! When reads happen and how they become batches is the run loop's business (`run.rs`).
//!
//! Safety and secrets: TLS is required unless `allow_plaintext` says otherwise, certificates are
//! verified against `ca_file` (or the platform's store) unless `insecure_skip_verify` says
//! otherwise (logged loudly on every read), the password is read from `password_file` or
//! `CENSUS_AGENT_DIRECTORY_PASSWORD` at each read (so a rotated password needs no restart) and is
//! never logged, and an empty password is refused (LDAP would take it for an anonymous bind).

mod client;
pub mod convert;
pub mod entry;
pub mod groups;
pub mod show;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use census_proto::v1;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::config::{DIRECTORY_PASSWORD_ENV, DirectorySettings};

/// The filter for user objects: people (so not computers, whose objectCategory is computer,
/// and not contacts, whose objectClass is not user) that are users.
pub const USER_FILTER: &str = "(&(objectCategory=person)(objectClass=user))";

/// The most users per batch when a read is sent (fewer when they are large, see
/// [`MAX_BATCH_USER_BYTES`]).
pub const DEFAULT_USERS_PER_BATCH: usize = 100;

/// The most encoded bytes of users per batch: a quarter of gRPC's 4 MiB message limit, so the
/// batch's other fields (the `DirectoryRead`, the agent id; a few hundred bytes) never matter.
/// A user at every cap (1024 memberOf DNs of 255 bytes) is about 265 KiB, so a batch always
/// holds at least one user and stays far below the limit.
pub const MAX_BATCH_USER_BYTES: usize = 1024 * 1024;

/// The most bytes read from `password_file` or `ca_file`.
const MAX_SECRET_FILE_BYTES: u64 = 1024 * 1024;

/// One complete read of the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryReadResult {
    /// The DNS domain the base DN names, e.g. `corp.example`: `DirectoryRead.directory`.
    pub directory: String,
    /// The base DN searched (configured, or the directory's defaultNamingContext).
    pub base_dn: String,
    /// When the read started.
    pub read_at: SystemTime,
    /// Every user, in the directory's order, each once (by objectGUID), with every group they
    /// are in, nested included.
    pub users: Vec<v1::DirectoryUser>,
    /// Pages the paged search took.
    pub pages: u32,
    /// Entries left out: no usable objectGUID, or a GUID already seen.
    pub skipped: u32,
}

impl DirectoryReadResult {
    /// The `DirectoryRead` every part of this read shares (`part` and `parts` are filled in by
    /// [`to_batches_parts`]).
    pub fn header(&self, read_id: &str) -> v1::DirectoryRead {
        v1::DirectoryRead {
            directory: self.directory.clone(),
            read_id: read_id.to_owned(),
            part: 0,
            parts: 0,
            read_at: Some(census_proto::convert::timestamp(self.read_at)),
            error: String::new(),
        }
    }

    /// This read as the parts to send: see [`to_batches_parts`].
    pub fn into_parts(
        self,
        read_id: &str,
        max_per_batch: usize,
        max_bytes: usize,
    ) -> Vec<(v1::DirectoryRead, Vec<v1::DirectoryUser>)> {
        let header = self.header(read_id);
        to_batches_parts(&header, self.users, max_per_batch, max_bytes)
    }

    /// How many batches [`DirectoryReadResult::into_parts`] makes with the defaults.
    pub fn batch_count(&self) -> usize {
        batch_sizes(&self.users, DEFAULT_USERS_PER_BATCH, MAX_BATCH_USER_BYTES).len()
    }
}

/// Splits a read's users into batches of at most `max_per_batch` users (at least 1) and at most
/// `max_bytes` of encoded users (as they are encoded in `ObservationBatch.users`; a single user
/// larger than that is a batch of its own), each with its `DirectoryRead`: `header` with `part`
/// counting from 1 and `parts` the total. A read of no users is still one part, so the
/// collector learns that the directory was read and is empty.
pub fn to_batches_parts(
    header: &v1::DirectoryRead,
    users: Vec<v1::DirectoryUser>,
    max_per_batch: usize,
    max_bytes: usize,
) -> Vec<(v1::DirectoryRead, Vec<v1::DirectoryUser>)> {
    let sizes = batch_sizes(&users, max_per_batch, max_bytes);
    let parts = u32::try_from(sizes.len()).unwrap_or(u32::MAX);
    let mut users = users.into_iter();
    sizes
        .into_iter()
        .zip(1u32..)
        .map(|(size, part)| {
            let read = v1::DirectoryRead {
                part,
                parts,
                ..header.clone()
            };
            (read, users.by_ref().take(size).collect())
        })
        .collect()
}

/// How many users each batch of [`to_batches_parts`] takes, in order (one empty batch for no
/// users).
pub fn batch_sizes(
    users: &[v1::DirectoryUser],
    max_per_batch: usize,
    max_bytes: usize,
) -> Vec<usize> {
    use prost::Message as _;
    let most = max_per_batch.max(1);
    let mut sizes = Vec::new();
    let (mut count, mut bytes) = (0usize, 0usize);
    for user in users {
        // `users` is field 7 of ObservationBatch: a one-byte key, then the length and the user.
        let body = user.encoded_len();
        let len = 1 + prost::length_delimiter_len(body) + body;
        if count > 0 && (count == most || bytes.saturating_add(len) > max_bytes) {
            sizes.push(count);
            (count, bytes) = (0, 0);
        }
        count += 1;
        bytes = bytes.saturating_add(len);
    }
    if count > 0 || sizes.is_empty() {
        sizes.push(count);
    }
    sizes
}

/// The one part that reports a failed read: the collector keeps the users it had and marks
/// them stale.
pub fn failed_read(
    directory: &str,
    read_id: &str,
    read_at: SystemTime,
    error: &DirectoryError,
) -> v1::DirectoryRead {
    v1::DirectoryRead {
        directory: directory.to_owned(),
        read_id: read_id.to_owned(),
        part: 1,
        parts: 1,
        read_at: Some(census_proto::convert::timestamp(read_at)),
        error: convert::cap_text(error.to_string().as_bytes()),
    }
}

/// Why a read failed, each in one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("directory settings: {0}")]
    Settings(String),
    #[error(
        "cannot read the directory bind password: {0} (set directory.password_file, or {DIRECTORY_PASSWORD_ENV})"
    )]
    Password(String),
    #[error("cannot use directory.ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error(
        "{url}: certificate not trusted ({message}): set directory.ca_file to the PEM of the CA that issued it"
    )]
    Untrusted { url: String, message: String },
    #[error(
        "{url}: the directory's certificate does not name {host} ({message}): put a name the certificate holds in directory.url"
    )]
    WrongName {
        url: String,
        host: String,
        message: String,
    },
    #[error(
        "{url}: the directory's certificate has no subjectAltName (SAN), so TLS clients accept it for no name (the subject's CN is not used): reissue the domain controller's certificate with a SAN naming {host}"
    )]
    NoSubjectAltName { url: String, host: String },
    #[error("{url}: TLS failed: {message}")]
    Tls { url: String, message: String },
    #[error(
        "the directory refused the bind for {bind_dn}: check password_file (or {DIRECTORY_PASSWORD_ENV}){hint}"
    )]
    BindRefused { bind_dn: String, hint: String },
    #[error("{url}: the bind for {bind_dn} failed: {message}")]
    Bind {
        url: String,
        bind_dn: String,
        message: String,
    },
    #[error("{url}: no answer to {step} within {timeout:?}")]
    Timeout {
        url: String,
        step: String,
        timeout: Duration,
    },
    #[error("{url}: the search of {base_dn} failed: {message}")]
    Search {
        url: String,
        base_dn: String,
        message: String,
    },
    #[error(
        "the directory holds more than {max} users under {base_dn}: raise directory.max_users or narrow directory.base_dn"
    )]
    TooManyUsers { max: usize, base_dn: String },
    #[error(
        "the directory holds more than {what} under {base_dn}: narrow directory.base_dn (group nesting cannot be resolved from part of the directory)"
    )]
    TooManyGroups { what: String, base_dn: String },
    #[error("the directory read was cancelled")]
    Cancelled,
    #[error("the directory read failed: {0}")]
    Internal(String),
}

/// Reads every user under the base DN. `settings.enabled` is the caller's business: this reads
/// whenever called. Every network step has `timeout_ms`; `cancel` ends the read at once.
#[instrument(name = "directory_read", skip_all, fields(url = settings.url.as_deref().unwrap_or("")))]
pub async fn read(
    settings: &DirectorySettings,
    cancel: &CancellationToken,
) -> Result<DirectoryReadResult, DirectoryError> {
    let plan = client::Plan::new(settings)?;
    if settings.insecure_skip_verify {
        warn!(
            "directory TLS certificate verification is OFF (insecure_skip_verify): anyone on the \
             path can pose as the directory and collect the bind password"
        );
    }
    let started = std::time::Instant::now();
    // Its own task: a panic in the LDAP stack on a hostile answer is an error, not a crash.
    let mut task = tokio::spawn(client::run(plan));
    let result = tokio::select! {
        joined = &mut task => match joined {
            Ok(result) => result,
            Err(e) => Err(DirectoryError::Internal(e.to_string())),
        },
        () = cancel.cancelled() => {
            task.abort();
            Err(DirectoryError::Cancelled)
        }
    };
    if let Ok(r) = &result {
        info!(
            directory = %r.directory,
            users = r.users.len(),
            pages = r.pages,
            skipped = r.skipped,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "directory read"
        );
    }
    result
}

/// The bind password: `password_file` (its first line; surrounding spaces are kept, they may be
/// part of it) or the environment. Empty is refused: LDAP treats a simple bind with an empty
/// password as an anonymous bind, which "succeeds" and then sees nothing.
fn password(settings: &DirectorySettings) -> Result<String, DirectoryError> {
    let raw = match &settings.password_file {
        Some(path) => read_small_file(path).map_err(|e| {
            DirectoryError::Password(format!("password_file {}: {e}", path.display()))
        })?,
        None => std::env::var(DIRECTORY_PASSWORD_ENV)
            .map_err(|_| DirectoryError::Password(format!("{DIRECTORY_PASSWORD_ENV} is not set")))?
            .into_bytes(),
    };
    let text = String::from_utf8(raw)
        .map_err(|_| DirectoryError::Password("the password is not UTF-8".into()))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(DirectoryError::Password("the password is empty".into()));
    }
    Ok(line.to_owned())
}

/// A file of at most [`MAX_SECRET_FILE_BYTES`].
fn read_small_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_SECRET_FILE_BYTES} bytes"
        )));
    }
    Ok(buf)
}

#[cfg(all(test, unix))]
mod tests;

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn user(n: u8) -> v1::DirectoryUser {
        v1::DirectoryUser {
            object_guid: vec![n; 16],
            sam_account_name: format!("u{n}"),
            ..Default::default()
        }
    }

    fn header() -> v1::DirectoryRead {
        v1::DirectoryRead {
            directory: "lab.census.test".into(),
            read_id: "r1".into(),
            read_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn users_split_into_numbered_parts() {
        let users: Vec<_> = (0..7).map(user).collect();
        let parts = to_batches_parts(&header(), users.clone(), 3, MAX_BATCH_USER_BYTES);
        assert_eq!(parts.len(), 3);
        let sizes: Vec<usize> = parts.iter().map(|(_, u)| u.len()).collect();
        assert_eq!(sizes, [3, 3, 1]);
        for (i, (read, _)) in parts.iter().enumerate() {
            assert_eq!(read.part, u32::try_from(i).expect("small") + 1);
            assert_eq!(read.parts, 3);
            assert_eq!(read.read_id, "r1");
            assert_eq!(read.directory, "lab.census.test");
            assert_eq!(read.read_at, header().read_at);
            assert!(read.error.is_empty());
        }
        let back: Vec<_> = parts.into_iter().flat_map(|(_, u)| u).collect();
        assert_eq!(back, users, "every user once, in order");
    }

    #[test]
    fn exact_multiples_empty_reads_and_a_zero_batch_size() {
        let parts = to_batches_parts(
            &header(),
            (0..6).map(user).collect(),
            3,
            MAX_BATCH_USER_BYTES,
        );
        assert_eq!(
            parts.iter().map(|(_, u)| u.len()).collect::<Vec<_>>(),
            [3, 3]
        );
        assert_eq!(parts[1].0.parts, 2);
        let empty = to_batches_parts(&header(), Vec::new(), 100, MAX_BATCH_USER_BYTES);
        assert_eq!(empty.len(), 1, "an empty directory is still one part");
        assert_eq!((empty[0].0.part, empty[0].0.parts), (1, 1));
        assert!(empty[0].1.is_empty());
        let ones = to_batches_parts(
            &header(),
            (0..2).map(user).collect(),
            0,
            MAX_BATCH_USER_BYTES,
        );
        assert_eq!(ones.len(), 2, "a batch size of 0 is taken as 1");
    }

    /// A user at every cap of the reader: 255-byte strings, [`entry::MAX_MEMBER_OF`] DNs.
    fn largest_user(n: u8) -> v1::DirectoryUser {
        let text = "x".repeat(convert::MAX_TEXT_BYTES);
        v1::DirectoryUser {
            object_guid: vec![n; 16],
            object_sid: format!("S-1-5-21-{}", "4294967295-".repeat(14)),
            sam_account_name: text.clone(),
            user_principal_name: text.clone(),
            display_name: text.clone(),
            distinguished_name: text.clone(),
            member_of: vec![text; entry::MAX_MEMBER_OF],
            ..Default::default()
        }
    }

    #[test]
    fn batches_are_split_by_bytes_as_well_as_by_count() {
        use prost::Message as _;
        // Ten of the largest users: a few per batch, every batch under the byte budget.
        let users: Vec<_> = (0..10).map(largest_user).collect();
        let body = users[0].encoded_len();
        let one = 1 + prost::length_delimiter_len(body) + body;
        assert!(one > 250 * 1024 && one < MAX_BATCH_USER_BYTES, "{one}");
        let parts = to_batches_parts(&header(), users.clone(), 100, MAX_BATCH_USER_BYTES);
        let per = MAX_BATCH_USER_BYTES / one;
        assert_eq!(parts.len(), 10usize.div_ceil(per));
        let total = u32::try_from(parts.len()).expect("small");
        for (i, (read, chunk)) in parts.iter().enumerate() {
            assert_eq!(read.part, u32::try_from(i).expect("small") + 1);
            assert_eq!(read.parts, total);
            assert!(!chunk.is_empty());
            let batch = v1::ObservationBatch {
                agent_id: "a".repeat(128),
                users: chunk.clone(),
                directory_read: Some(read.clone()),
                ..Default::default()
            };
            let len = batch.encoded_len();
            assert!(len <= MAX_BATCH_USER_BYTES + 1024, "{len} bytes");
            assert!(len < 4 * 1024 * 1024);
        }
        let back: Vec<_> = parts.into_iter().flat_map(|(_, u)| u).collect();
        assert_eq!(back, users, "every user once, in order");

        // Small users are still split by count alone.
        let small = to_batches_parts(&header(), (0..250).map(user).collect(), 100, 1024 * 1024);
        assert_eq!(
            small.iter().map(|(_, u)| u.len()).collect::<Vec<_>>(),
            [100, 100, 50]
        );

        // A single user larger than the budget is a batch of its own, between smaller ones.
        let huge = largest_user(9);
        let users = vec![user(1), huge.clone(), user(2), user(3)];
        let parts = to_batches_parts(&header(), users, 100, 10 * 1024);
        assert_eq!(
            parts.iter().map(|(_, u)| u.len()).collect::<Vec<_>>(),
            [1, 1, 2]
        );
        assert_eq!(parts[1].1, [huge]);
        assert_eq!(
            parts
                .iter()
                .map(|(r, _)| (r.part, r.parts))
                .collect::<Vec<_>>(),
            [(1, 3), (2, 3), (3, 3)]
        );
        assert_eq!(
            batch_sizes(&[], 100, 10),
            [0],
            "an empty read is one empty part"
        );
    }

    #[test]
    fn a_result_becomes_parts_and_a_failure_one_part() {
        let result = DirectoryReadResult {
            directory: "lab.census.test".into(),
            base_dn: "DC=lab,DC=census,DC=test".into(),
            read_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            users: (0..5).map(user).collect(),
            pages: 1,
            skipped: 0,
        };
        let parts = result.into_parts("r1", 2, MAX_BATCH_USER_BYTES);
        assert_eq!(parts.len(), 3);
        assert_eq!(
            parts[0].0,
            v1::DirectoryRead {
                part: 1,
                parts: 3,
                ..header()
            }
        );
        let err = DirectoryError::BindRefused {
            bind_dn: "census@lab".into(),
            hint: String::new(),
        };
        let failed = failed_read("lab.census.test", "r2", SystemTime::UNIX_EPOCH, &err);
        assert_eq!((failed.part, failed.parts), (1, 1));
        assert!(
            failed.error.contains("refused the bind"),
            "{}",
            failed.error
        );
    }

    #[test]
    fn passwords_come_from_the_file_first_line_and_never_empty() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("pw");
        let settings = DirectorySettings {
            password_file: Some(path.clone()),
            ..DirectorySettings::default()
        };
        std::fs::write(&path, " s3cret pass \r\nsecond line\n").expect("write");
        assert_eq!(password(&settings).expect("read"), " s3cret pass ");
        std::fs::write(&path, "\n").expect("write");
        let err = password(&settings).expect_err("empty").to_string();
        assert!(err.contains("empty"), "{err}");
        std::fs::write(&path, vec![b'x'; 2 * 1024 * 1024]).expect("write");
        assert!(password(&settings).is_err(), "a huge file is refused");
        let missing = DirectorySettings {
            password_file: Some(tmp.path().join("missing")),
            ..DirectorySettings::default()
        };
        let err = password(&missing).expect_err("missing").to_string();
        assert!(err.contains("password_file"), "{err}");
    }

    /// A server on loopback that accepts connections and never says a word (a firewall that
    /// swallows packets after the handshake, or a hung DC).
    async fn silent_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        (addr, task)
    }

    fn loopback_settings(url: String, dir: &std::path::Path) -> DirectorySettings {
        let password = dir.join("pw");
        std::fs::write(&password, "pw\n").expect("write");
        DirectorySettings {
            enabled: true,
            url: Some(url),
            bind_dn: Some("census@lab".into()),
            password_file: Some(password),
            insecure_skip_verify: true,
            timeout_ms: 300,
            ..DirectorySettings::default()
        }
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_cancel_ends_a_read_at_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (addr, server) = silent_server().await;
        let settings = loopback_settings(format!("ldaps://{addr}"), tmp.path());
        let started = std::time::Instant::now();
        let err = read(&settings, &CancellationToken::new())
            .await
            .expect_err("no TLS answer")
            .to_string();
        assert!(
            err.starts_with(&format!(
                "cannot reach ldaps://{addr}: no answer within 300ms"
            )),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));

        let slow = DirectorySettings {
            timeout_ms: 60_000,
            ..settings
        };
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            trigger.cancel();
        });
        let started = std::time::Instant::now();
        let err = read(&slow, &cancel).await.expect_err("cancelled");
        assert!(matches!(err, DirectoryError::Cancelled), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        server.abort();
    }

    #[tokio::test]
    async fn a_server_speaking_garbage_is_an_error_not_a_panic() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tmp = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let server = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = conn.read(&mut buf).await;
                // A BER SEQUENCE claiming a huge length, then noise.
                let _ = conn
                    .write_all(&[0x30, 0x84, 0x7f, 0xff, 0xff, 0xff, 1, 2, 3])
                    .await;
                let _ = conn.write_all(&[0xff; 64]).await;
            }
        });
        let settings = DirectorySettings {
            allow_plaintext: true,
            insecure_skip_verify: false,
            ..loopback_settings(format!("ldap://{addr}"), tmp.path())
        };
        let err = read(&settings, &CancellationToken::new())
            .await
            .expect_err("garbage is no directory")
            .to_string();
        assert!(!err.contains('\n'), "{err}");
        let tls = DirectorySettings {
            url: Some(format!("ldaps://{addr}")),
            ..loopback_settings(String::new(), tmp.path())
        };
        let err = read(&tls, &CancellationToken::new())
            .await
            .expect_err("garbage is no TLS")
            .to_string();
        assert!(err.contains("TLS") || err.contains("cannot reach"), "{err}");
        server.abort();
    }

    // === a scripted LDAP server ===

    use ldap3::asn1::{PL, StructureTag, TagClass, parse_tag};

    fn prim(class: TagClass, id: u64, bytes: &[u8]) -> StructureTag {
        StructureTag {
            class,
            id,
            payload: PL::P(bytes.to_vec()),
        }
    }

    fn cons(class: TagClass, id: u64, inner: Vec<StructureTag>) -> StructureTag {
        StructureTag {
            class,
            id,
            payload: PL::C(inner),
        }
    }

    fn octets(bytes: &[u8]) -> StructureTag {
        prim(TagClass::Universal, 4, bytes)
    }

    /// BER, definite lengths, tag numbers below 31 (all LDAP needs here).
    fn ber(tag: &StructureTag) -> Vec<u8> {
        let class = match tag.class {
            TagClass::Universal => 0x00,
            TagClass::Application => 0x40,
            TagClass::Context => 0x80,
            TagClass::Private => 0xc0,
        };
        let (constructed, content) = match &tag.payload {
            PL::P(bytes) => (0x00, bytes.clone()),
            PL::C(inner) => (0x20, inner.iter().flat_map(ber).collect()),
        };
        let mut out = vec![class | constructed | u8::try_from(tag.id).expect("small tag")];
        let len = content.len();
        if len < 0x80 {
            out.push(u8::try_from(len).expect("short"));
        } else {
            let bytes = u32::try_from(len).expect("fits").to_be_bytes();
            out.push(0x84);
            out.extend_from_slice(&bytes);
        }
        out.extend_from_slice(&content);
        out
    }

    /// An LDAPMessage: `id`, then `op`.
    fn message(id: &[u8], op: StructureTag) -> Vec<u8> {
        ber(&cons(
            TagClass::Universal,
            16,
            vec![prim(TagClass::Universal, 2, id), op],
        ))
    }

    /// An LDAPResult-shaped operation: `[APPLICATION app] { resultCode, matchedDN, text }`.
    fn result(app: u64, rc: u8, text: &str) -> StructureTag {
        cons(
            TagClass::Application,
            app,
            vec![
                prim(TagClass::Universal, 10, &[rc]),
                octets(b""),
                octets(text.as_bytes()),
            ],
        )
    }

    /// A SearchResultEntry.
    fn entry(dn: &str, attrs: &[(&str, Vec<Vec<u8>>)]) -> StructureTag {
        let attributes = attrs
            .iter()
            .map(|(name, values)| {
                cons(
                    TagClass::Universal,
                    16,
                    vec![
                        octets(name.as_bytes()),
                        cons(
                            TagClass::Universal,
                            17,
                            values.iter().map(|v| octets(v)).collect(),
                        ),
                    ],
                )
            })
            .collect();
        cons(
            TagClass::Application,
            4,
            vec![
                octets(dn.as_bytes()),
                cons(TagClass::Universal, 16, attributes),
            ],
        )
    }

    /// A plaintext LDAP server that accepts any bind, answers the first search (users) with
    /// `users` and the second (groups) with `groups`, or with insufficientAccessRights when
    /// `groups` is `None`. Never pages.
    async fn scripted_server(
        users: Vec<StructureTag>,
        groups: Option<Vec<StructureTag>>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let task = tokio::spawn(async move {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf: Vec<u8> = Vec::new();
            let mut searches = 0;
            loop {
                let mut chunk = [0u8; 4096];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                while let Ok((rest, tag)) = parse_tag(&buf) {
                    let used = buf.len() - rest.len();
                    let PL::C(parts) = &tag.payload else { return };
                    let id = match parts.first().map(|t| &t.payload) {
                        Some(PL::P(id)) => id.clone(),
                        _ => return,
                    };
                    let op = parts.get(1).map_or(0, |t| t.id);
                    let mut reply = Vec::new();
                    match op {
                        0 => reply.extend(message(&id, result(1, 0, ""))),
                        3 => {
                            searches += 1;
                            let (entries, rc) = match (searches, &groups) {
                                (1, _) => (users.clone(), 0),
                                (_, Some(g)) => (g.clone(), 0),
                                (_, None) => (Vec::new(), 50),
                            };
                            for e in entries {
                                reply.extend(message(&id, e));
                            }
                            reply.extend(message(&id, result(5, rc, "no groups for you")));
                        }
                        _ => return,
                    }
                    let _ = conn.write_all(&reply).await;
                    buf.drain(..used);
                }
            }
        });
        (addr, task)
    }

    fn plaintext_settings(addr: std::net::SocketAddr, dir: &std::path::Path) -> DirectorySettings {
        DirectorySettings {
            allow_plaintext: true,
            insecure_skip_verify: false,
            base_dn: Some("DC=lab".into()),
            timeout_ms: 5_000,
            ..loopback_settings(format!("ldap://{addr}"), dir)
        }
    }

    fn hank() -> StructureTag {
        entry(
            "CN=hank,CN=Users,DC=lab",
            &[
                ("objectGUID", vec![vec![7; 16]]),
                ("sAMAccountName", vec![b"hank".to_vec()]),
                ("memberOf", vec![b"CN=Contractors EU,DC=lab".to_vec()]),
            ],
        )
    }

    #[tokio::test]
    async fn a_read_resolves_nesting_from_the_group_search() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let groups = vec![
            entry(
                "CN=Contractors EU,DC=lab",
                &[("memberOf", vec![b"CN=Contractors,DC=lab".to_vec()])],
            ),
            entry(
                "CN=Contractors,DC=lab",
                &[("memberOf", vec![b"CN=Billing Exclusions,DC=lab".to_vec()])],
            ),
            entry("CN=Billing Exclusions,DC=lab", &[]),
        ];
        let (addr, server) = scripted_server(vec![hank()], Some(groups)).await;
        let read = read(
            &plaintext_settings(addr, tmp.path()),
            &CancellationToken::new(),
        )
        .await
        .expect("a read");
        assert_eq!(read.users.len(), 1);
        assert_eq!(
            read.users[0].member_of,
            [
                "CN=Billing Exclusions,DC=lab",
                "CN=Contractors EU,DC=lab",
                "CN=Contractors,DC=lab"
            ]
        );
        server.abort();
    }

    /// A failed group search fails the read, as a failed user search does: never a read with
    /// direct groups only, which could miss an exclusion group.
    #[tokio::test]
    async fn a_failed_group_search_fails_the_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (addr, server) = scripted_server(vec![hank()], None).await;
        let err = read(
            &plaintext_settings(addr, tmp.path()),
            &CancellationToken::new(),
        )
        .await
        .expect_err("the group search failed");
        assert!(matches!(err, DirectoryError::Search { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("group search: insufficientAccessRights (50) no groups for you"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
        server.abort();
    }

    #[test]
    fn errors_are_one_line() {
        let errors = [
            DirectoryError::Unreachable {
                url: "ldaps://198.18.0.99:636".into(),
                message: "no answer within 2s".into(),
            },
            DirectoryError::Untrusted {
                url: "ldaps://198.18.0.10".into(),
                message: "invalid peer certificate: UnknownIssuer".into(),
            },
            DirectoryError::BindRefused {
                bind_dn: "census@lab".into(),
                hint: ": invalid credentials".into(),
            },
            DirectoryError::TooManyUsers {
                max: 10,
                base_dn: "DC=lab".into(),
            },
        ];
        for e in errors {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
        }
    }
}
