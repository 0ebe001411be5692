//! Counting policies and billing snapshots over real gRPC on loopback (no namespaces needed:
//! nothing is swept): a policy changes the counts and says why per device; a snapshot never
//! changes once created, is refused a second time, diffs against the previous period and
//! exports as CSV and JSON, also through the `census` binary.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use census_proto::{
    convert,
    v1::{self, ingest_service_client::IngestServiceClient},
};
use census_tests::support;
use tonic::Code;

use crate::in_process::{Running, start};
use census_proto::transport::Credentials;

impl Running {
    /// Sends one batch and waits for its ack.
    async fn send(&self, token: &Credentials, batch: v1::ObservationBatch) -> Result<()> {
        let mut ingest = IngestServiceClient::new(self.agent_channel(token).await?);
        let mut acks = ingest
            .report(self.as_agent(token, tokio_stream::iter(vec![batch])))
            .await?
            .into_inner();
        let ack = tokio::time::timeout(Duration::from_secs(10), acks.message())
            .await
            .context("ack timeout")??
            .context("stream ended without an ack")?;
        ensure!(
            ack.status == v1::AckStatus::Stored as i32,
            "batch not stored: {ack:?}"
        );
        Ok(())
    }

    async fn counts(&self, client: &str) -> Result<v1::ClientCounts> {
        let r = self
            .query()
            .await?
            .get_counts(self.op(v1::GetCountsRequest {
                client: client.into(),
            }))
            .await?;
        r.into_inner()
            .counts
            .into_iter()
            .next()
            .context("no counts")
    }

    async fn set_policy(
        &self,
        client: &str,
        policy: v1::CountingPolicy,
    ) -> Result<v1::CountingPolicy, tonic::Status> {
        let mut admin = self
            .admin()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        admin
            .set_policy(self.op(v1::SetPolicyRequest {
                client: client.into(),
                policy: Some(policy),
            }))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn create_snapshot(
        &self,
        client: &str,
        period: &str,
    ) -> Result<v1::SnapshotSummary, tonic::Status> {
        let mut admin = self
            .admin()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        admin
            .create_snapshot(self.op(v1::CreateSnapshotRequest {
                client: client.into(),
                period: period.into(),
            }))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn snapshot(&self, client: &str, period: &str) -> Result<v1::Snapshot> {
        let r = self
            .query()
            .await?
            .get_snapshot(self.op(v1::GetSnapshotRequest {
                client: client.into(),
                period: period.into(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    async fn export(&self, client: &str, period: &str, format: v1::ExportFormat) -> Result<String> {
        let mut stream = self
            .query()
            .await?
            .export_snapshot(self.op(v1::ExportSnapshotRequest {
                client: client.into(),
                period: period.into(),
                format: format as i32,
            }))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            out.extend(chunk.data);
        }
        Ok(String::from_utf8(out)?)
    }
}

/// One device as an agent reports it.
struct Host {
    ip: &'static str,
    mac: [u8; 6],
    category: v1::Category,
    mdns: Option<&'static str>,
    /// How long ago it was seen.
    age: Duration,
}

fn host(ip: &'static str, mac: [u8; 6], category: v1::Category) -> Host {
    Host {
        ip,
        mac,
        category,
        mdns: None,
        age: Duration::ZERO,
    }
}

fn batch(agent: &str, sequence: u64, hosts: &[Host]) -> v1::ObservationBatch {
    let now = std::time::SystemTime::now();
    v1::ObservationBatch {
        agent_id: agent.into(),
        sequence,
        observations: hosts
            .iter()
            .map(|h| v1::Observation {
                observed_at: Some(convert::timestamp(now - h.age)),
                method: v1::Method::Arp as i32,
                addresses: vec![v1::IpAddress {
                    address: h.ip.into(),
                    answered: true,
                    ..Default::default()
                }],
                macs: vec![h.mac.to_vec()],
                category: h.category as i32,
                category_reason: "test".into(),
                mdns: h.mdns.map(|name| v1::MdnsIdentity {
                    host_name: name.into(),
                    services: Vec::new(),
                }),
                ..Default::default()
            })
            .collect(),
        agent_version: "test".into(),
        sent_at: Some(convert::timestamp(now)),
        ..Default::default()
    }
}

const PRINTER: [u8; 6] = [0, 0x16, 0x3e, 0, 0, 1];
const PC: [u8; 6] = [0, 0x16, 0x3e, 0, 0, 2];
const SWITCH: [u8; 6] = [0, 0x16, 0x3e, 0, 0, 3];
const OLD_PC: [u8; 6] = [0, 0x16, 0x3e, 0, 0, 4];
/// Locally administered (randomized) MACs.
const PHONE_NAMED: [u8; 6] = [0x02, 0x11, 0x22, 0, 0, 5];
const PHONE_BARE: [u8; 6] = [0x02, 0x11, 0x22, 0, 0, 6];

fn mac_id(devices: &[v1::Device], mac: [u8; 6]) -> Result<&v1::Device> {
    devices
        .iter()
        .find(|d| d.macs.iter().any(|m| *m == mac))
        .with_context(|| format!("no device with MAC {mac:02x?}"))
}

fn count(c: &v1::ClientCounts, category: &str) -> u64 {
    c.devices_by_category
        .iter()
        .find(|k| k.category == category)
        .map_or(0, |k| k.count)
}

fn policy(
    window_days: u32,
    categories: &[&str],
    randomized: v1::RandomizedRule,
) -> v1::CountingPolicy {
    v1::CountingPolicy {
        window_days,
        categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        randomized: randomized as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_policy_changes_the_counts_and_says_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let token = c.agent_named("acme", "hq", "agent-1").await?;
    c.send(
        &token,
        batch(
            "agent-1",
            1,
            &[
                host("198.18.0.10", PRINTER, v1::Category::Printer),
                host("198.18.0.11", PC, v1::Category::Computer),
                Host {
                    mdns: Some("pixel-7.local."),
                    ..host("198.18.0.12", PHONE_NAMED, v1::Category::PhoneTablet)
                },
                host("198.18.0.13", PHONE_BARE, v1::Category::Unspecified),
                Host {
                    age: Duration::from_secs(40 * 24 * 3600),
                    ..host("198.18.0.14", OLD_PC, v1::Category::Computer)
                },
            ],
        ),
    )
    .await?;

    // The default: everything seen within 30 days.
    let counts = c.counts("acme").await?;
    assert_eq!(counts.policy_version, "device-v1");
    assert_eq!(counts.devices, 4, "{counts:?}");
    assert!(counts.as_of.is_some());
    let mut query = c.query().await?;
    let current = query
        .get_policy(c.op(v1::GetPolicyRequest {
            client: "acme".into(),
            version: String::new(),
        }))
        .await?
        .into_inner();
    assert!(current.is_default && current.version == "device-v1" && current.window_days == 30);
    let devices = c.devices("acme").await?;
    assert_eq!(devices.len(), 5, "stale devices stay listed");
    let old = mac_id(&devices, OLD_PC)?;
    assert!(!old.counted);
    assert_eq!(
        old.reason,
        "seen 40 days ago, outside the 30-day window of policy device-v1"
    );
    assert_eq!(
        mac_id(&devices, PC)?.reason,
        "seen today, within 30 days (policy device-v1)"
    );

    // Printers no longer count, and randomized MACs only with a name.
    let saved = c
        .set_policy(
            "acme",
            policy(
                30,
                &["computer", "phone-tablet", "unknown"],
                v1::RandomizedRule::CountIfNamed,
            ),
        )
        .await?;
    assert_eq!(saved.version, "acme-1");
    assert!(!saved.is_default && saved.saved_at.is_some());
    let counts = c.counts("acme").await?;
    assert_eq!(counts.policy_version, "acme-1");
    assert_eq!(counts.devices, 2, "{counts:?}");
    assert_eq!(count(&counts, "computer"), 1);
    assert_eq!(count(&counts, "phone-tablet"), 1);
    assert_eq!(count(&counts, "printer"), 0);
    let devices = c.devices("acme").await?;
    let reason = |mac| mac_id(&devices, mac).map(|d| (d.counted, d.reason.clone()));
    assert_eq!(
        reason(PRINTER)?,
        (
            false,
            "category printer is not counted under policy acme-1".into()
        )
    );
    assert_eq!(
        reason(PHONE_BARE)?,
        (
            false,
            "randomized MAC without a name: excluded by policy acme-1".into()
        )
    );
    let named = reason(PHONE_NAMED)?;
    assert!(
        named.0 && named.1.contains("named pixel-7.local"),
        "{named:?}"
    );
    // GetDevice agrees with ListDevices.
    let one = query
        .get_device(c.op(v1::GetDeviceRequest {
            client: "acme".into(),
            id: mac_id(&devices, PRINTER)?.id.clone(),
        }))
        .await?
        .into_inner();
    assert_eq!(
        (one.counted, one.reason.as_str()),
        (false, reason(PRINTER)?.1.as_str())
    );

    // A wider window brings the old PC back; the old version stays readable.
    let saved = c
        .set_policy("acme", policy(60, &[], v1::RandomizedRule::Exclude))
        .await?;
    assert_eq!(saved.version, "acme-2");
    let counts = c.counts("acme").await?;
    assert_eq!(
        (counts.devices, counts.policy_version.as_str()),
        (3, "acme-2")
    );
    let v1_again = query
        .get_policy(c.op(v1::GetPolicyRequest {
            client: "acme".into(),
            version: "acme-1".into(),
        }))
        .await?
        .into_inner();
    assert_eq!(v1_again.categories, ["computer", "phone-tablet", "unknown"]);

    // Bad policies are refused and change nothing.
    for bad in [
        policy(0, &[], v1::RandomizedRule::Count),
        policy(30, &["toaster"], v1::RandomizedRule::Count),
        policy(30, &[], v1::RandomizedRule::Unspecified),
    ] {
        let e = c.set_policy("acme", bad).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let e = c
        .set_policy("nobody", policy(30, &[], v1::RandomizedRule::Count))
        .await
        .expect_err("no such client");
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(c.counts("acme").await?.policy_version, "acme-2");
    // Another client still counts under the default.
    c.agent("globex", "hq").await?;
    assert_eq!(c.counts("globex").await?.policy_version, "device-v1");
    Ok(())
}

#[tokio::test]
async fn snapshots_are_frozen_diffed_and_exported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let token = c.agent_named("acme", "hq", "agent-1").await?;
    c.send(
        &token,
        batch(
            "agent-1",
            1,
            &[
                host("198.18.0.10", PRINTER, v1::Category::Printer),
                host("198.18.0.11", PC, v1::Category::Computer),
                host("198.18.0.12", SWITCH, v1::Category::Unspecified),
            ],
        ),
    )
    .await?;

    let jan = c.create_snapshot("acme", "2020-01").await?;
    assert_eq!((jan.devices, jan.users), (3, 0));
    assert_eq!(jan.policy_version, "device-v1");
    let frozen = c.snapshot("acme", "2020-01").await?;
    assert_eq!(frozen.devices.len(), 3);
    assert!(
        frozen.devices.iter().all(|d| d.counted_by
            == "seen today, within 30 days (policy device-v1)"
            && !d.evidence.is_empty()
            && !d.identifiers.is_empty()),
        "{frozen:?}"
    );

    // Things change: a new device, the switch is now known as network gear, printers stop
    // counting.
    const NEW: [u8; 6] = [0, 0x16, 0x3e, 0, 0, 9];
    c.send(
        &token,
        batch(
            "agent-1",
            2,
            &[
                host("198.18.0.12", SWITCH, v1::Category::Network),
                host("198.18.0.20", NEW, v1::Category::Computer),
            ],
        ),
    )
    .await?;
    c.set_policy(
        "acme",
        policy(30, &["computer", "network"], v1::RandomizedRule::Count),
    )
    .await?;

    // The January snapshot did not change, and cannot be made again.
    assert_eq!(c.snapshot("acme", "2020-01").await?, frozen);
    let e = c
        .create_snapshot("acme", "2020-01")
        .await
        .expect_err("immutable");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "snapshot acme 2020-01 exists; snapshots are immutable"
    );
    assert_eq!(c.snapshot("acme", "2020-01").await?, frozen);

    // Bad and future periods are refused with one clear line.
    for bad in ["2020-13", "2020-1", "Jan 2020", ""] {
        let e = c
            .create_snapshot("acme", bad)
            .await
            .expect_err("bad period");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e:?}");
        assert!(e.message().contains("expected YYYY-MM") && !e.message().contains('\n'));
    }
    let e = c
        .create_snapshot("acme", "9999-01")
        .await
        .expect_err("future");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("has not started"), "{e:?}");
    let e = c
        .create_snapshot("nobody", "2020-01")
        .await
        .expect_err("no client");
    assert_eq!(e.code(), Code::NotFound);

    let feb = c.create_snapshot("acme", "2020-02").await?;
    assert_eq!(feb.policy_version, "acme-1");
    assert_eq!(feb.devices, 3, "{feb:?}");
    let mut query = c.query().await?;
    let list = query
        .list_snapshots(c.op(v1::ListSnapshotsRequest {
            client: "acme".into(),
        }))
        .await?
        .into_inner()
        .snapshots;
    assert_eq!(
        list.iter().map(|s| s.period.as_str()).collect::<Vec<_>>(),
        ["2020-01", "2020-02"]
    );

    // February against January: the new PC added, the printer removed, the switch
    // recategorized.
    let devices = c.devices("acme").await?;
    let id = |mac| mac_id(&devices, mac).map(|d| d.id.clone());
    let diff = query
        .diff_snapshot(c.op(v1::DiffSnapshotRequest {
            client: "acme".into(),
            period: "2020-02".into(),
            against: String::new(),
        }))
        .await?
        .into_inner();
    assert_eq!(diff.previous_period, "2020-01");
    assert_eq!(
        diff.added.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        [id(NEW)?]
    );
    assert_eq!(
        diff.removed
            .iter()
            .map(|d| d.id.clone())
            .collect::<Vec<_>>(),
        [id(PRINTER)?]
    );
    assert_eq!(diff.category_changed.len(), 1, "{diff:?}");
    let changed = &diff.category_changed[0];
    assert_eq!(
        (
            changed.id.clone(),
            changed.from.as_str(),
            changed.to.as_str()
        ),
        (id(SWITCH)?, "unknown", "network")
    );
    let total = diff.devices.clone().context("total")?;
    assert_eq!((total.before, total.after, total.delta), (3, 3, 0));
    let delta = |cat: &str| {
        diff.devices_by_category
            .iter()
            .find(|c| c.category == cat)
            .map(|c| c.delta)
    };
    assert_eq!(delta("printer"), Some(-1));
    assert_eq!(delta("computer"), Some(1));
    assert_eq!(delta("network"), Some(1));
    assert_eq!(delta("unknown"), Some(-1));
    // The first period has nothing before it: everything is added.
    let first = query
        .diff_snapshot(c.op(v1::DiffSnapshotRequest {
            client: "acme".into(),
            period: "2020-01".into(),
            against: String::new(),
        }))
        .await?
        .into_inner();
    assert!(first.previous_period.is_empty() && first.added.len() == 3 && first.removed.is_empty());

    // CSV: a header and one row per counted device.
    let csv = c.export("acme", "2020-02", v1::ExportFormat::Csv).await?;
    let rows = parse_csv(&csv)?;
    assert_eq!(
        rows[0],
        [
            "client",
            "period",
            "device_id",
            "category",
            "identifiers",
            "sites",
            "first_seen",
            "last_seen",
            "counted_by"
        ]
    );
    assert_eq!(rows.len(), 1 + 3, "{csv}");
    let mut ids: Vec<&str> = rows[1..].iter().map(|r| r[2].as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![id(PC)?, id(SWITCH)?, id(NEW)?];
    want.sort();
    assert_eq!(ids, want);
    for r in &rows[1..] {
        assert_eq!(
            (r[0].as_str(), r[1].as_str(), r[5].as_str()),
            ("acme", "2020-02", "hq")
        );
        assert!(r[4].starts_with("mac=00:16:3e:00:00:0"), "{r:?}");
        assert!(r[6].ends_with('Z') && r[7].ends_with('Z'), "{r:?}");
        assert!(r[8].ends_with("(policy acme-1)"), "{r:?}");
    }
    // JSON: the whole snapshot.
    let json: serde_json::Value =
        serde_json::from_str(&c.export("acme", "2020-02", v1::ExportFormat::Json).await?)?;
    assert_eq!(json["period"], "2020-02");
    assert_eq!(json["policy_version"], "acme-1");
    assert_eq!(
        json["policy"]["categories"],
        serde_json::json!(["computer", "network"])
    );
    assert_eq!(json["devices"], 3);
    assert_eq!(json["users"]["count"], 0);
    assert_eq!(json["counted_devices"].as_array().map(Vec::len), Some(3));

    let e = query
        .get_snapshot(c.op(v1::GetSnapshotRequest {
            client: "acme".into(),
            period: "2020-03".into(),
        }))
        .await
        .expect_err("no such snapshot");
    assert_eq!(e.code(), Code::NotFound);

    // The same through the `census` binary.
    let stdout = census_ok(
        &c,
        &[
            "snapshot", "export", "--client", "acme", "--period", "2020-02", "--format", "csv",
        ],
    )
    .await?;
    assert_eq!(stdout, csv);
    let file = dir.path().join("feb.json");
    let stdout = census_ok(
        &c,
        &[
            "snapshot",
            "export",
            "--client",
            "acme",
            "--period",
            "2020-02",
            "--format",
            "json",
            "--output",
            file.to_str().context("utf-8 path")?,
        ],
    )
    .await?;
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    assert_eq!(written, json);
    assert!(stdout.is_empty(), "{stdout}");
    let text = census_ok(
        &c,
        &[
            "snapshot", "diff", "--client", "acme", "--period", "2020-02",
        ],
    )
    .await?;
    assert!(
        text.contains("against 2020-01") && text.contains(&format!("added     {}", id(NEW)?)),
        "{text}"
    );
    // A second create is refused in one line; so is a bad period (a usage error, 64).
    let out = census(
        &c,
        &[
            "snapshot", "create", "--client", "acme", "--period", "2020-02",
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stderr)?.trim(),
        "census: error: snapshot acme 2020-02 exists; snapshots are immutable"
    );
    let out = census(
        &c,
        &[
            "snapshot", "create", "--client", "acme", "--period", "2020-13",
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr)?;
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("expected YYYY-MM"), "{err}");
    Ok(())
}

/// Runs `census ARGS` and returns its stdout; a failure is an error quoting stderr.
async fn census_ok(c: &Running, args: &[&str]) -> Result<String> {
    let out = census(c, args).await?;
    ensure!(
        out.status.success(),
        "census {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs the `census` binary against the in-process collector (without blocking the runtime
/// that serves it).
async fn census(c: &Running, args: &[&str]) -> Result<std::process::Output> {
    Ok(tokio::process::Command::new(support::bin("census")?)
        .args(["--collector", &c.url()])
        .arg("--credentials")
        .arg(c.dir.join("operator"))
        .args(args)
        .env_remove("CENSUS_CREDENTIALS")
        .output()
        .await?)
}

/// A small RFC 4180 reader: quoted fields, doubled quotes, CRLF rows.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        match (quoted, ch) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, _) => field.push(ch),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, _) => field.push(ch),
        }
    }
    if quoted {
        bail!("unterminated quoted field");
    }
    if !field.is_empty() || !row.is_empty() {
        bail!("the last row does not end with CRLF");
    }
    ensure!(
        rows.iter().all(|r| r.len() == rows[0].len()),
        "rows of different widths: {rows:?}"
    );
    Ok(rows)
}

#[tokio::test]
async fn census_output_into_a_closed_pipe_ends_quietly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let agent = c.agent_named("acme", "hq", "agent-1").await?;
    c.send(
        &agent,
        batch(
            "agent-1",
            1,
            &[host("198.18.0.10", PC, v1::Category::Computer)],
        ),
    )
    .await?;
    // The reader is gone before census writes a byte (it first makes a TLS connection), as
    // with `census counts | head -0`.
    let mut child = tokio::process::Command::new(support::bin("census")?)
        .args(["--collector", &c.url()])
        .arg("--credentials")
        .arg(c.dir.join("operator"))
        .args(["devices", "--client", "acme"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let out = child.wait_with_output().await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{:?}: {stderr}", out.status);
    ensure!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}
