//! Bad input gets a clear error and nothing is lost: a primary's refusals through the wire
//! (another cluster, a newer epoch, another journal format, a diverged history, records no
//! longer held), a standby of another cluster that keeps refusing until its cluster id is
//! right, damaged frames from a fake primary (a bad crc, a blob whose bytes do not match its
//! id, a gap in LSNs) that leave the standby's journal and stores as they were while it keeps
//! retrying, and a full disk under the standby's journal (needs root, for a small tmpfs).

#![allow(clippy::unwrap_used)]

mod common;

use adapters::testing::{Tmpfs, fill_up};
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters::config::ReplicationConfig;
use adapters::{BlobId, Lsn};
use common::{
    Primary, STEP_DEADLINE, Server, Standby, commit_work, inventories, wait_equal, wait_until,
    within,
};
use coordinator::record::{CHECKPOINT, CoordRecord};
use journal::{ChainHash, Epoch, Record};
use proto::client::Credentials;
use proto::v1;
use replicator::error::CODE_METADATA;
use replicator::standby::REFUSED_RETRY_MS;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Another cluster's id.
const OTHER_CLUSTER: &str = "0123456789abcdef0123456789abcdef";

/// A `Hello` from a standby at `durable_lsn` with chain value `chain` in `cluster_id`.
fn hello(cluster_id: &str, durable_lsn: Lsn, chain: ChainHash) -> v1::Hello {
    v1::Hello {
        header: Some(v1::RequestHeader {
            schema_version: proto::SCHEMA_VERSION,
            client_name: "probe".into(),
        }),
        cluster_id: cluster_id.into(),
        name: "probe".into(),
        epoch: 1,
        durable_lsn: durable_lsn.0,
        chain: chain.0.to_vec(),
        journal_format: journal::segment::FORMAT_VERSION,
        resume: None,
    }
}

/// Sends `hello` on a raw `Ship` stream: the `Welcome`, or the refusal.
async fn ship(url: &str, hello: v1::Hello) -> Result<v1::Welcome, Status> {
    let mut client = within(
        "connect",
        proto::client::connect_replication(url, &Credentials::none()),
    )
    .await
    .unwrap();
    let (tx, rx) = mpsc::channel(1);
    let body = v1::standby_message::Body::Hello(hello);
    tx.send(v1::StandbyMessage { body: Some(body) })
        .await
        .unwrap();
    let mut inbound = within("ship", client.ship(ReceiverStream::new(rx)))
        .await?
        .into_inner();
    let first = within("the first answer", inbound.message()).await?;
    drop(tx);
    match first.and_then(|m| m.body) {
        Some(v1::primary_message::Body::Welcome(welcome)) => Ok(welcome),
        other => panic!("expected Welcome or a refusal, got {other:?}"),
    }
}

/// Asserts that `answer` is a FAILED_PRECONDITION refusal with `code`; returns its message.
fn refused(answer: Result<v1::Welcome, Status>, code: &str) -> String {
    let status = match answer {
        Err(status) => status,
        Ok(welcome) => panic!("expected a refusal {code}, got {welcome:?}"),
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let got = status
        .metadata()
        .get(CODE_METADATA)
        .and_then(|v| v.to_str().ok());
    assert_eq!(got, Some(code), "{status:?}");
    status.message().to_string()
}

/// The chain value after `lsn` in `journal`.
fn chain_at(journal: &journal::Journal, lsn: Lsn) -> ChainHash {
    journal
        .read_from(lsn)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .chain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_refuses_a_standby_it_cannot_serve() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Primary::start(&dir.path().join("primary"), ReplicationConfig::default()).await;
    commit_work(&primary.concord, 0, 5).await;
    primary.settle().await;
    let url = primary.url();
    let cluster = primary.shipper.cluster_id().to_string();
    let durable = primary.durable();
    let journal = primary.concord.coordinator().journal();

    let welcome = ship(&url, hello(&cluster, Lsn(0), ChainHash::GENESIS)).await;
    let welcome = welcome.unwrap();
    assert_eq!(welcome.cluster_id, cluster);
    let at_end = hello(&cluster, durable, chain_at(journal, durable));
    assert!(
        ship(&url, at_end.clone()).await.is_ok(),
        "a standby at the end"
    );

    let message = refused(
        ship(&url, hello(OTHER_CLUSTER, Lsn(0), ChainHash::GENESIS)).await,
        "cluster_mismatch",
    );
    assert!(message.contains(OTHER_CLUSTER), "{message}");

    let newer = v1::Hello {
        epoch: 2,
        ..at_end.clone()
    };
    let message = refused(ship(&url, newer).await, "epoch_regressed");
    assert!(message.contains("epoch 1"), "{message}");

    let format = v1::Hello {
        journal_format: journal::segment::FORMAT_VERSION + 1,
        ..at_end.clone()
    };
    let message = refused(ship(&url, format).await, "format_newer");
    assert!(message.contains("format"), "{message}");

    let diverged = hello(&cluster, durable, ChainHash([7; 32]));
    let message = refused(ship(&url, diverged).await, "diverged");
    assert!(message.contains(&format!("lsn {durable}")), "{message}");
    let ahead = hello(&cluster, durable.next(), ChainHash([7; 32]));
    refused(ship(&url, ahead).await, "diverged");

    // The primary lets go of its first segment: a new segment starts at the next record, and
    // everything below the durable LSN is removed.
    journal.request_roll(1);
    commit_work(&primary.concord, 5, 2).await;
    primary.settle().await;
    let removed = {
        let coordinator = primary.concord.coordinator().clone();
        let upto = primary.durable();
        tokio::task::spawn_blocking(move || coordinator.journal().remove_segments_below(upto))
            .await
            .unwrap()
            .unwrap()
    };
    assert!(removed >= 1, "a segment was removed");
    let oldest = journal.oldest_lsn();
    assert!(oldest > Lsn(1), "oldest retained lsn {oldest}");
    let message = refused(
        ship(&url, hello(&cluster, Lsn(0), ChainHash::GENESIS)).await,
        "reseed_required",
    );
    assert!(
        message.contains(&format!("its oldest is {oldest}")),
        "{message}"
    );
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_of_another_cluster_keeps_refusing_until_its_cluster_id_is_right() {
    let dir = tempfile::tempdir().unwrap();
    let standby_dir = dir.path().join("standby");
    let primary = Primary::start(&dir.path().join("primary"), ReplicationConfig::default()).await;
    commit_work(&primary.concord, 0, 5).await;
    primary.settle().await;
    replicator::cluster::adopt(&standby_dir, OTHER_CLUSTER).unwrap();

    let standby = Standby::start(&standby_dir, &primary.url(), true).await;
    wait_until(
        "the standby is refused",
        STEP_DEADLINE,
        || standby.received().refused == Some("cluster_mismatch"),
        || standby.describe(),
    )
    .await;
    let error = standby.received().last_error.unwrap_or_default();
    assert!(error.contains(OTHER_CLUSTER), "{error}");
    // Bounded: it stays refused (it asks again only every REFUSED_RETRY_MS).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        standby.journal.durable_lsn(),
        Lsn(0),
        "its journal is unchanged"
    );
    assert_eq!(standby.received().refused, Some("cluster_mismatch"));
    let held = inventories(standby.resources.values().cloned()).await;
    assert!(
        held.values().all(Vec::is_empty),
        "its resources are unchanged: {held:?}"
    );

    // The operator fixes the cause; the standby resumes by itself at its next attempt.
    replicator::cluster::adopt(&standby_dir, primary.shipper.cluster_id()).unwrap();
    assert!(REFUSED_RETRY_MS < STEP_DEADLINE.as_millis() as u64);
    wait_equal(&primary, &standby).await;
    assert_eq!(standby.received().refused, None);
    standby.stop().await;
    primary.stop().await;
}

/// What the fake primary sends after its `Welcome`.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// A record whose crc does not match.
    Crc,
    /// A blob whose bytes do not hash to its id.
    Blob,
    /// Record 1 (on a standby that does not hold it), then record 3.
    Gap,
}

/// A primary that answers every `Hello` with a `Welcome` and then damaged input.
struct FakePrimary {
    damage: Damage,
    records: Vec<Record>,
    hellos: Arc<Mutex<Vec<v1::Hello>>>,
}

/// The id of the blob the fake primary claims to send.
fn claimed_blob() -> BlobId {
    BlobId::of(b"the content the id names")
}

impl FakePrimary {
    fn messages(&self, hello: &v1::Hello) -> Vec<v1::primary_message::Body> {
        use v1::primary_message::Body;
        let welcome = v1::Welcome {
            cluster_id: OTHER_CLUSTER.into(),
            epoch: 1,
            durable_lsn: 3,
            journal_format: journal::segment::FORMAT_VERSION,
            oldest_lsn: 1,
            mode: "async".into(),
        };
        let batch = |records: Vec<v1::ShippedRecord>| {
            Body::Records(v1::RecordBatch {
                records,
                primary_durable_lsn: 3,
                sent_at_ms: 0,
            })
        };
        let shipped = |i: usize| replicator::wire::to_shipped(&self.records[i]);
        let mut out = vec![Body::Welcome(welcome)];
        match self.damage {
            Damage::Crc => {
                let mut record = shipped(0);
                record.crc ^= 1;
                out.push(batch(vec![record]));
            }
            Damage::Blob => out.push(Body::Blob(v1::BlobChunk {
                resource: "uploads".into(),
                id: claimed_blob().0.to_vec(),
                offset: 0,
                data: b"other bytes than the id names".to_vec(),
                last: true,
            })),
            Damage::Gap => {
                if hello.durable_lsn == 0 {
                    out.push(batch(vec![shipped(0)]));
                }
                out.push(batch(vec![shipped(2)]));
            }
        }
        out
    }
}

#[tonic::async_trait]
impl v1::replication_server::Replication for FakePrimary {
    type ShipStream = ReceiverStream<Result<v1::PrimaryMessage, Status>>;
    type InventoryStream = ReceiverStream<Result<v1::InventoryChunk, Status>>;
    type ReadEntryStream = ReceiverStream<Result<v1::EntryChunk, Status>>;

    async fn ship(
        &self,
        request: Request<Streaming<v1::StandbyMessage>>,
    ) -> Result<Response<Self::ShipStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(v1::StandbyMessage {
                body: Some(v1::standby_message::Body::Hello(hello)),
            }) => hello,
            _ => return Err(Status::invalid_argument("Hello first")),
        };
        let messages = self.messages(&hello);
        self.hellos.lock().unwrap().push(hello);
        let (tx, rx) = mpsc::channel(messages.len() + 1);
        for body in messages {
            let _ = tx.try_send(Ok(v1::PrimaryMessage { body: Some(body) }));
        }
        // The stream stays open until the standby leaves it.
        tokio::spawn(async move {
            while let Ok(Some(_)) = inbound.message().await {}
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn inventory(
        &self,
        _: Request<v1::InventoryRequest>,
    ) -> Result<Response<Self::InventoryStream>, Status> {
        Err(Status::unimplemented("a fake primary"))
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        Err(Status::unimplemented("a fake primary"))
    }

    async fn reseed_start(
        &self,
        _: Request<v1::ReseedRequest>,
    ) -> Result<Response<v1::ReseedPosition>, Status> {
        Err(Status::unimplemented("a fake primary"))
    }

    async fn read_entry(
        &self,
        _: Request<v1::ReadEntryRequest>,
    ) -> Result<Response<Self::ReadEntryStream>, Status> {
        Err(Status::unimplemented("a fake primary"))
    }
}

/// Three real records (LSN 1 to 3, with their chain values), from a scratch journal.
async fn three_records(dir: &Path) -> Vec<Record> {
    let journal = common::open_journal(dir).await.unwrap();
    for at_ms in 0..3u64 {
        let payload = CoordRecord::Checkpoint { at_ms }.encode();
        journal
            .append(Epoch(1), CHECKPOINT, &payload)
            .unwrap()
            .wait()
            .unwrap();
    }
    let records: Vec<Record> = journal
        .read_from(Lsn(1))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    journal.close().unwrap();
    assert_eq!(records.len(), 3);
    records
}

/// Runs a standby against a fake primary sending `damage`; checks that the session fails with
/// `expected` in its error, that the standby's journal stays at `durable` with no blob stored,
/// and that it keeps retrying.
async fn damaged(damage: Damage, expected: &str, durable: Lsn) {
    let dir = tempfile::tempdir().unwrap();
    let standby_dir = dir.path().join("standby");
    let hellos = Arc::new(Mutex::new(Vec::new()));
    let fake = FakePrimary {
        damage,
        records: three_records(&dir.path().join("scratch")).await,
        hellos: Arc::clone(&hellos),
    };
    let server = Server::start(fake).await;
    let standby = Standby::start(&standby_dir, &server.url, false).await;
    // Each new session clears `last_error` once welcomed, until its damaged frame: poll for
    // a moment between the two, after a few sessions.
    wait_until(
        "the standby fails the damaged session and connects again",
        STEP_DEADLINE,
        || {
            let error = standby.received().last_error.unwrap_or_default();
            hellos.lock().unwrap().len() >= 3 && error.contains(expected)
        },
        || format!("{damage:?}: expected {expected:?}; {}", standby.describe()),
    )
    .await;
    let view = standby.received();
    let error = view.last_error.clone().unwrap_or_default();
    assert_eq!(view.refused, None, "retried, not refused: {error}");
    assert_eq!(
        standby.journal.durable_lsn(),
        durable,
        "{damage:?}: {error}"
    );
    let asked: Vec<u64> = hellos
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.durable_lsn)
        .collect();
    assert!(
        asked[1..].iter().all(|lsn| *lsn == durable.0),
        "each new session starts from the durable lsn {durable}: {asked:?}"
    );
    let blob = claimed_blob().to_string();
    let stored = standby_dir.join(format!("uploads/.concord/blobs/{}/{blob}", &blob[..2]));
    assert!(!stored.exists(), "no blob of the damaged session is kept");
    assert!(
        common::names_in(&standby_dir.join("replication/partial")).is_empty(),
        "no partial blob is kept"
    );
    let ended = standby.stop().await;
    assert!(
        matches!(ended.receiver, Some(Ok(()))),
        "it did not stop by itself"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_a_bad_crc_is_refused_and_nothing_is_kept() {
    damaged(Damage::Crc, "crc32", Lsn(0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_whose_bytes_do_not_match_its_id_is_refused_and_nothing_is_kept() {
    damaged(Damage::Blob, &claimed_blob().to_string(), Lsn(0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_lsns_is_refused_and_nothing_of_it_is_kept() {
    damaged(Damage::Gap, "lsn 3", Lsn(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_standby_and_it_resumes_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let standby_dir = dir.path().join("standby");
    let journal_dir = standby_dir.join("journal");
    let tmpfs = Tmpfs::mount(&journal_dir, "2m");
    let primary = Primary::start(&dir.path().join("primary"), ReplicationConfig::default()).await;
    commit_work(&primary.concord, 0, 5).await;
    let mut standby = Standby::start(&standby_dir, &primary.url(), true).await;
    wait_equal(&primary, &standby).await;

    let filler = journal_dir.join("filler");
    fill_up(&filler);
    commit_work(&primary.concord, 5, 5).await;
    let ended = standby.receiver_ended().await;
    let error = match ended {
        Err(e) => e,
        Ok(()) => panic!("the receiver ended without an error"),
    };
    assert!(error.is_fatal(), "{error}");
    assert!(error.to_string().contains("standby journal"), "{error}");
    let durable = standby.journal.durable_lsn();
    standby.stop().await;

    fs::remove_file(&filler).unwrap();
    let standby = Standby::start(&standby_dir, &primary.url(), true).await;
    assert!(
        standby.journal.durable_lsn() >= durable,
        "the journal kept what was durable"
    );
    commit_work(&primary.concord, 10, 5).await;
    wait_equal(&primary, &standby).await;
    standby.stop().await;
    primary.stop().await;
    drop(tmpfs);
}

/// A standby that acknowledges an LSN it was never sent (a bug, or a hostile peer) confirms
/// nothing beyond what was shipped to it: the primary's view and the retention floor stay
/// within what it sent, and no sync commit is confirmed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_beyond_what_was_shipped_counts_only_up_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Primary::start(dir.path(), ReplicationConfig::default()).await;
    commit_work(&primary.concord, 0, 3).await;
    primary.settle().await;
    let durable = primary.durable();
    let mut client = within(
        "connect",
        proto::client::connect_replication(&primary.url(), &Credentials::none()),
    )
    .await
    .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let hello = hello("", Lsn(0), ChainHash::GENESIS);
    let body = v1::standby_message::Body::Hello(hello);
    tx.send(v1::StandbyMessage { body: Some(body) })
        .await
        .unwrap();
    let mut inbound = within("ship", client.ship(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    let first = within("the welcome", inbound.message()).await.unwrap();
    assert!(matches!(
        first.and_then(|m| m.body),
        Some(v1::primary_message::Body::Welcome(_))
    ));
    let ack = v1::Ack {
        durable_lsn: u64::MAX,
        replayed_lsn: u64::MAX,
    };
    let body = v1::standby_message::Body::Ack(ack);
    tx.send(v1::StandbyMessage { body: Some(body) })
        .await
        .unwrap();
    let states = || format!("{:?}", primary.shipper.standby_states());
    wait_until(
        "the probe to be sent every record",
        Duration::from_secs(10),
        || {
            primary
                .shipper
                .standby_states()
                .get("probe")
                .is_some_and(|s| s.shipped >= durable)
        },
        states,
    )
    .await;
    let ack = v1::Ack {
        durable_lsn: u64::MAX,
        replayed_lsn: u64::MAX,
    };
    let body = v1::standby_message::Body::Ack(ack);
    tx.send(v1::StandbyMessage { body: Some(body) })
        .await
        .unwrap();
    wait_until(
        "the acknowledgement to count",
        Duration::from_secs(10),
        || {
            primary
                .shipper
                .standby_states()
                .get("probe")
                .is_some_and(|s| s.acknowledged > Lsn(0))
        },
        states,
    )
    .await;
    let state = primary.shipper.standby_states()["probe"].clone();
    assert!(state.acknowledged <= state.shipped, "{state:?}");
    assert!(state.replayed <= state.acknowledged, "{state:?}");
    let floor = primary.concord.coordinator().retention().floor();
    assert!(
        floor.is_some_and(|f| f.0 <= state.shipped.0 + 1),
        "floor {floor:?}, {state:?}"
    );
    drop(tx);
    primary.stop().await;
}
