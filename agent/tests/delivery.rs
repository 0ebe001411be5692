//! Delivery from the queue against a real collector, in process on loopback (nothing is
//! swept): batches go in order and leave the queue once acknowledged; a batch the collector
//! refuses as invalid is set aside, loudly and counted, instead of holding up the queue for
//! ever; a copy of an agent's state (a restored backup, a cloned image) whose sequence numbers
//! the collector already holds with other content continues in a new sequence epoch under the
//! same agent id, the one its certificate names.

use std::{path::Path, sync::Arc, time::Duration};

use census_agent::{
    delivery::{self, Deliverer, Mode},
    metrics::Metrics,
    queue::Queue,
    report,
};
use census_collector::{config::Config, server};
use census_proto::transport::{self, Credentials};
use census_proto::v1::{
    self, admin_service_client::AdminServiceClient, query_service_client::QueryServiceClient,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, transport::Channel};

/// More observations than this in one batch, and the collector refuses the batch (the
/// collector's lowest setting; the agent itself never sends more than 500).
const LIMIT: usize = 1000;

struct Collector {
    url: String,
    ca_pem: String,
    operator: Credentials,
    shutdown: CancellationToken,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(dir: &Path) -> Collector {
    std::fs::create_dir_all(dir).expect("mkdir");
    let config = Config {
        data_dir: Some(dir.to_owned()),
        max_batch_observations: LIMIT,
        ..Config::default()
    };
    let prepared = server::prepare(&config).expect("prepare the collector");
    let operator = Credentials::load(&dir.join("operator")).expect("operator credentials");
    let ca_pem = prepared.pki.ca_pem().to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let url = format!("https://{}", listener.local_addr().expect("address"));
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = server::run(&config, prepared, listener, stop).await {
            eprintln!("collector failed: {e}");
        }
    });
    Collector {
        url,
        ca_pem,
        operator,
        shutdown,
    }
}

impl Collector {
    /// A channel with the operator's credentials.
    async fn channel(&self) -> Channel {
        transport::endpoint(
            &self.url,
            None,
            Some(&self.operator),
            Duration::from_secs(5),
        )
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
    }

    fn op<T>(&self, msg: T) -> Request<T> {
        Request::new(msg)
    }

    async fn token(&self) -> String {
        AdminServiceClient::new(self.channel().await)
            .create_token(self.op(v1::CreateTokenRequest {
                client: "acme".into(),
                site: "hq".into(),
                ..Default::default()
            }))
            .await
            .expect("token")
            .into_inner()
            .token
    }

    /// (agent id, observations stored) over every device's evidence, sorted.
    async fn evidence(&self) -> Vec<(String, u64)> {
        let devices = QueryServiceClient::new(self.channel().await)
            .list_devices(self.op(v1::ListDevicesRequest {
                client: "acme".into(),
                ..Default::default()
            }))
            .await
            .expect("devices")
            .into_inner()
            .devices;
        let mut out: Vec<(String, u64)> = Vec::new();
        for e in devices.iter().flat_map(|d| &d.evidence) {
            match out.iter_mut().find(|(a, _)| *a == e.agent_id) {
                Some((_, n)) => *n += e.observations,
                None => out.push((e.agent_id.clone(), e.observations)),
            }
        }
        out.sort();
        out
    }
}

fn metrics() -> &'static Metrics {
    Box::leak(Box::new(Metrics::new()))
}

/// Queues one batch of `n` ARP observations of hosts from 198.18.`first / 256`.`first % 256`.
fn push(queue: &Queue, first: u32, n: u32) -> u64 {
    let observations = (first..first + n)
        .map(|i| {
            let [_, _, hi, lo] = i.to_be_bytes();
            report::arp_observation(
                std::net::Ipv4Addr::new(198, 18, hi, lo),
                [0, 0x16, 0x3e, 0, hi, lo],
                "eth0",
                std::time::SystemTime::now(),
            )
        })
        .collect::<Vec<_>>();
    let sequences = queue
        .push(1, |id, sequence| {
            vec![v1::ObservationBatch {
                agent_id: id.to_owned(),
                sequence,
                observations,
                agent_version: "test".into(),
                ..Default::default()
            }]
        })
        .expect("push");
    sequences[0]
}

/// Delivers in the background as `run` does, until the queue is empty (or 20 s pass).
async fn deliver_all(deliverer: Deliverer, queue: &Queue) {
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        let mut deliverer = deliverer;
        tokio::spawn(async move {
            delivery::deliver(&mut deliverer, Mode::Forever, Duration::from_secs(1), &stop).await
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !queue.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} batches still queued",
            queue.len()
        );
        assert!(!task.is_finished(), "delivery stopped: {:?}", task.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await
        .expect("the delivery task")
        .expect("delivery ends cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_set_aside_and_a_copied_or_wiped_state_continues_as_the_same_agent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let collector = start(&tmp.path().join("collector")).await;
    let token = collector.token().await;

    let original = tmp.path().join("agent");
    let copy = tmp.path().join("copy");
    std::fs::create_dir_all(&original).expect("mkdir");
    std::fs::create_dir_all(&copy).expect("mkdir");
    // The agent enrolls (mutual TLS); its copy carries the same identity, as a copied state
    // directory or a cloned image would.
    census_agent::enroll::enroll(&collector.url, &token, Some(&collector.ca_pem), &original)
        .await
        .expect("enrolled");
    let creds =
        census_proto::transport::Credentials::load(&census_agent::enroll::identity_dir(&original))
            .expect("the identity");
    let m = metrics();
    let queue = Arc::new(Queue::open(Some(&original), 1 << 30, m).expect("queue"));
    // A copy of the agent's state made now: the same id, the same next sequence.
    std::fs::copy(original.join("agent.json"), copy.join("agent.json")).expect("copy state");

    // 1: three hosts; 2: over the collector's limit; 3: two more hosts.
    let over = u32::try_from(LIMIT).expect("small") + 1;
    assert_eq!(
        (
            push(&queue, 10, 3),
            push(&queue, 1000, over),
            push(&queue, 30, 2)
        ),
        (1, 2, 3)
    );
    let id = queue.agent_id();
    deliver_all(
        Deliverer::new(
            collector.url.clone(),
            creds.clone(),
            None,
            queue.clone(),
            None,
            m,
        ),
        &queue,
    )
    .await;
    assert_eq!(collector.evidence().await, [(id.clone(), 5)]);
    let s = m.snapshot();
    assert_eq!(
        (s.batches_rejected, s.observations_rejected),
        (1, u64::from(over))
    );
    assert_eq!(s.batches_acknowledged, 2);
    assert_eq!(s.queue_batches, 0);

    // The copy queues other hosts under sequence 1, which the collector holds with other
    // content: it is refused as a conflict, and the copy continues in a new sequence epoch,
    // under the same agent id (the one its certificate names): every host is credited to it.
    let m2 = metrics();
    let clone = Arc::new(Queue::open(Some(&copy), 1 << 30, m2).expect("queue"));
    let epoch = clone.epoch();
    assert_eq!((clone.agent_id(), epoch), (id.clone(), queue.epoch()));
    assert_eq!(push(&clone, 40, 4), 1);
    deliver_all(
        Deliverer::new(
            collector.url.clone(),
            creds.clone(),
            None,
            clone.clone(),
            None,
            m2,
        ),
        &clone,
    )
    .await;
    assert_eq!(clone.agent_id(), id);
    let new_epoch = clone.epoch();
    assert_ne!(new_epoch, epoch);
    assert_eq!(collector.evidence().await, [(id.clone(), 9)]);
    drop(clone);
    let reopened = Queue::open(Some(&copy), 1 << 30, metrics()).expect("reopen");
    assert_eq!(
        (
            reopened.agent_id(),
            reopened.epoch(),
            reopened.next_sequence()
        ),
        (id.clone(), new_epoch, 2),
        "the new epoch is saved"
    );
    drop(reopened);

    // A state directory wiped and used again with the same certificate: a new agent.json,
    // whose own id the certificate does not carry. The queue takes the certificate's id, and
    // a new state's epoch is its own: nothing collides, everything is credited to the agent.
    let wiped = tmp.path().join("wiped");
    std::fs::create_dir_all(&wiped).expect("mkdir");
    let m3 = metrics();
    let fresh = Arc::new(Queue::open(Some(&wiped), 1 << 30, m3).expect("queue"));
    assert_ne!(fresh.agent_id(), id);
    assert_eq!(push(&fresh, 50, 2), 1);
    deliver_all(
        Deliverer::new(collector.url.clone(), creds, None, fresh.clone(), None, m3),
        &fresh,
    )
    .await;
    assert_eq!(fresh.agent_id(), id);
    assert_eq!(collector.evidence().await, [(id, 11)]);
    assert_eq!(m3.snapshot().batches_acknowledged, 1);
}
