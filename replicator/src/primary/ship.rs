//! One standby's stream on the primary: the `Hello` check, then blobs and records in journal
//! order (see the module docs of [`super`]).

use std::collections::HashSet;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use adapters::{BlobId, Resource};
use coordinator::record::{self, CoordRecord};
use journal::{JournalReader, Lsn, Record};
use proto::v1;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::{PROGRESS_MS, Shipper};
use crate::error::ReplicationError;
use crate::standby::now_ms;
use crate::wire;

/// How long a standby has to send its `Hello` (milliseconds).
pub const HELLO_TIMEOUT_MS: u64 = 10_000;
/// Messages queued towards a standby: the reader waits while the queue is full, so a slow
/// standby holds back reading, not memory.
pub const SEND_QUEUE: usize = 8;
/// Most records in one batch.
pub const BATCH_RECORDS_MAX: usize = 512;
/// Most payload bytes in one batch (a larger single record goes alone).
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// The size of a blob chunk.
pub const BLOB_CHUNK_BYTES: usize = 1 << 20;
/// In async mode, how long a caught-up stream lets new records gather before it reads them
/// (milliseconds): fewer, larger batches cost the standby fewer syncs; the lag grows by at most
/// this. Sync mode never waits (a commit waits for the acknowledgement).
pub const ASYNC_GATHER_MS: u64 = 2;
/// Blob ids remembered as sent in one stream (a blob named twice is sent once).
const SENT_BLOBS_MAX: usize = 4096;

/// A blob and the resource whose store holds it.
type NamedBlob = (Arc<dyn Resource>, BlobId);

/// The messages of one stream.
pub type Outbound = mpsc::Sender<Result<v1::PrimaryMessage, Status>>;

/// The standby's `Hello`, read and checked: where to start, and the blob to resume.
pub struct Start {
    /// The standby's name.
    pub name: String,
    /// The first LSN to send.
    pub from: Lsn,
    /// An interrupted blob to resume.
    pub resume: Option<v1::BlobResume>,
    /// The stream's number: a later stream of the same standby supersedes it.
    pub stream: u64,
}

impl Shipper {
    /// Reads the first message of a stream, which must be a `Hello`, and checks it.
    pub async fn accept(
        &self,
        inbound: &mut Streaming<v1::StandbyMessage>,
    ) -> Result<Start, Status> {
        let first =
            tokio::time::timeout(Duration::from_millis(HELLO_TIMEOUT_MS), inbound.message())
                .await
                .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??;
        let hello = match first.and_then(|m| m.body) {
            Some(v1::standby_message::Body::Hello(hello)) => hello,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        proto::convert::check_header("Hello.header", hello.header.as_ref())?;
        let name: String = if hello.name.is_empty() {
            "standby".into()
        } else {
            hello.name.chars().take(128).collect()
        };
        // Counted for the retention floor before the oldest retained LSN is checked, so that
        // no checkpoint removes, in between, the records it is about to be sent.
        let stream = self.connected(&name, Lsn(hello.durable_lsn).next());
        let from = self.check(&hello).map_err(|e| {
            self.disconnected(&name, stream);
            tracing::warn!(standby = %hello.name, error = %e, "refused a standby");
            e.to_status()
        })?;
        Ok(Start {
            name,
            from,
            resume: hello.resume,
            stream,
        })
    }

    /// Checks a standby's position against this journal; returns the first LSN to send.
    fn check(&self, hello: &v1::Hello) -> Result<Lsn, ReplicationError> {
        if !hello.cluster_id.is_empty() && hello.cluster_id != self.cluster_id {
            return Err(ReplicationError::ClusterMismatch {
                standby: hello.cluster_id.clone(),
                primary: self.cluster_id.clone(),
            });
        }
        if hello.journal_format != journal::segment::FORMAT_VERSION {
            return Err(ReplicationError::FormatMismatch {
                standby: hello.journal_format,
                primary: journal::segment::FORMAT_VERSION,
            });
        }
        let epoch = self.coordinator().epoch();
        if hello.epoch > epoch.0 {
            return Err(ReplicationError::EpochRegressed {
                standby: hello.epoch,
                primary: epoch.0,
            });
        }
        let journal = self.coordinator().journal();
        let standby = Lsn(hello.durable_lsn);
        let durable = journal.durable_lsn();
        if standby > durable {
            return Err(ReplicationError::Diverged {
                lsn: durable.next(),
                detail: format!(
                    "the standby holds records up to lsn {standby}, this primary only up to {durable}"
                ),
            });
        }
        let from = standby.next();
        let oldest = journal.oldest_lsn();
        if from < oldest {
            return Err(ReplicationError::ReseedRequired {
                wanted: from,
                oldest,
            });
        }
        if let Some(chain) = wire::chain_from(&hello.chain)
            && standby >= oldest
            && standby > Lsn(0)
        {
            let ours = journal.read_from(standby)?.next().transpose()?;
            match ours {
                Some(record) if record.chain != chain => {
                    return Err(ReplicationError::Diverged {
                        lsn: standby,
                        detail: format!(
                            "its chain value after lsn {standby} is {chain}, the primary's is {}",
                            record.chain
                        ),
                    });
                }
                _ => {}
            }
        }
        Ok(from)
    }

    /// Runs a standby's stream until it ends: sends from `start.from` on while reading its
    /// acknowledgements.
    pub async fn serve(
        self: Arc<Self>,
        start: Start,
        mut inbound: Streaming<v1::StandbyMessage>,
        outbound: Outbound,
    ) {
        let name = start.name.clone();
        tracing::info!(standby = %name, from = start.from.0, "standby {name} connected; shipping from lsn {}", start.from);
        let stream = start.stream;
        let mut stop = self.stopping();
        let sender = Arc::clone(&self).send_loop(start, outbound.clone());
        tokio::pin!(sender);
        let ended = loop {
            tokio::select! {
                result = &mut sender => break result.err().map(|e| e.to_string()),
                message = inbound.message() => match message {
                    Ok(Some(v1::StandbyMessage { body: Some(v1::standby_message::Body::Ack(ack)) })) => {
                        self.acknowledged(&name, Lsn(ack.durable_lsn), Lsn(ack.replayed_lsn));
                    }
                    Ok(Some(_)) => break Some("a message other than Ack after Hello".into()),
                    Ok(None) => break None,
                    Err(status) => break Some(status.message().to_string()),
                },
                _ = stop.changed() => break None,
            }
        };
        self.disconnected(&name, stream);
        self.hold_floor();
        match ended {
            Some(why) => {
                tracing::warn!(standby = %name, "standby {name}'s stream ended: {why}");
                let _ = outbound.try_send(Err(Status::aborted(why)));
            }
            None => tracing::info!(standby = %name, "standby {name} disconnected"),
        }
    }

    /// Reads the journal from `start.from` and sends blobs and records; ends when the standby
    /// goes away or the journal closes.
    async fn send_loop(
        self: Arc<Self>,
        start: Start,
        tx: Outbound,
    ) -> Result<(), ReplicationError> {
        let journal = self.coordinator().journal();
        let mut next = start.from;
        let mut resume = start.resume;
        let mut sent_blobs = HashSet::new();
        // One reader follows the journal: a new one would read its segment again from the
        // start to check the chain.
        let mut reader = journal.read_from(next)?;
        loop {
            if next > journal.durable_lsn() {
                let waited = tokio::time::timeout(
                    Duration::from_millis(PROGRESS_MS),
                    journal.wait_durable(next),
                )
                .await;
                match waited {
                    Ok(Ok(_)) if self.gathers() => {
                        // Async: let the next records gather a moment, so that the standby
                        // syncs (and acknowledges) a batch of them rather than each few.
                        tokio::time::sleep(Duration::from_millis(ASYNC_GATHER_MS)).await;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        let progress = v1::Progress {
                            primary_durable_lsn: journal.durable_lsn().0,
                            sent_at_ms: now_ms(),
                        };
                        send(&tx, v1::primary_message::Body::Progress(progress)).await?;
                        self.hold_floor();
                        self.publish_metrics();
                    }
                }
                continue;
            }
            journal.follow(&mut reader);
            let (records, back) = read_batch(reader).await?;
            reader = back;
            let mut batch = Vec::new();
            let mut bytes = 0;
            for record in records {
                for (resource, id) in self.blobs_of(&record)? {
                    if !sent_blobs.insert((resource.name().to_string(), id)) {
                        continue;
                    }
                    if sent_blobs.len() > SENT_BLOBS_MAX {
                        sent_blobs.clear();
                    }
                    self.flush(&start.name, &tx, &mut batch, &mut bytes).await?;
                    let offset = take_resume(&mut resume, resource.name(), &id);
                    send_blob(&tx, resource, id, offset, record.lsn).await?;
                }
                next = record.lsn.next();
                bytes += record.payload.len();
                batch.push(wire::to_shipped(&record));
            }
            self.flush(&start.name, &tx, &mut batch, &mut bytes).await?;
        }
    }

    /// Whether a caught-up stream waits [`ASYNC_GATHER_MS`] for records to gather: not while
    /// sync commits wait for acknowledgements.
    fn gathers(&self) -> bool {
        self.sync_state() == "async" || self.sync_state() == "fallback-async"
    }

    async fn flush(
        &self,
        name: &str,
        tx: &Outbound,
        batch: &mut Vec<v1::ShippedRecord>,
        bytes: &mut usize,
    ) -> Result<(), ReplicationError> {
        let Some(last) = batch.last().map(|r| Lsn(r.lsn)) else {
            return Ok(());
        };
        let records = v1::RecordBatch {
            records: std::mem::take(batch),
            primary_durable_lsn: self.coordinator().journal().durable_lsn().0,
            sent_at_ms: now_ms(),
        };
        send(tx, v1::primary_message::Body::Records(records)).await?;
        self.shipped(name, last, *bytes as u64);
        *bytes = 0;
        Ok(())
    }

    /// The blobs a decision record's redo names, with their resources.
    fn blobs_of(&self, record: &Record) -> Result<Vec<NamedBlob>, ReplicationError> {
        if record.kind != record::COMMIT && record.kind != record::ONE_PHASE {
            return Ok(Vec::new());
        }
        let decoded = CoordRecord::decode(record.kind, &record.payload).map_err(|e| {
            ReplicationError::Malformed {
                lsn: record.lsn,
                what: e.to_string(),
            }
        })?;
        let branches = match decoded {
            CoordRecord::Commit { branches, .. } => branches,
            CoordRecord::OnePhase { resource, redo, .. } => vec![(resource, redo)],
            _ => Vec::new(),
        };
        let mut blobs = Vec::new();
        for (name, redo) in branches {
            let Ok(resource) = self.coordinator().resource(&name) else {
                continue;
            };
            for id in resource.redo_blobs(&redo)? {
                blobs.push((Arc::clone(resource), id));
            }
        }
        Ok(blobs)
    }
}

/// The offset to resume `id` of `resource` at, once (0 when it is not the blob held in part).
fn take_resume(resume: &mut Option<v1::BlobResume>, resource: &str, id: &BlobId) -> u64 {
    match resume {
        Some(r) if r.resource == resource && r.id == id.0 => resume.take().map_or(0, |r| r.offset),
        _ => 0,
    }
}

/// Reads the next records of `reader` (bounded in count and bytes), on the blocking pool, and
/// hands the reader back.
async fn read_batch(
    mut reader: JournalReader,
) -> Result<(Vec<Record>, JournalReader), ReplicationError> {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut bytes = 0;
        for record in reader.by_ref() {
            let record = record?;
            bytes += record.payload.len();
            out.push(record);
            if out.len() >= BATCH_RECORDS_MAX || bytes >= BATCH_BYTES_MAX {
                break;
            }
        }
        Ok::<_, ReplicationError>((out, reader))
    })
    .await
    .map_err(|e| ReplicationError::Protocol(format!("the journal reader failed: {e}")))?
}

async fn send(tx: &Outbound, body: v1::primary_message::Body) -> Result<(), ReplicationError> {
    tx.send(Ok(v1::PrimaryMessage { body: Some(body) }))
        .await
        .map_err(|_| ReplicationError::Transport("the standby went away".into()))
}

/// Sends blob `id` of `resource` from `offset` on, in chunks read on the blocking pool through
/// a queue of two, so that at most a few chunks are in memory.
async fn send_blob(
    tx: &Outbound,
    resource: Arc<dyn Resource>,
    id: BlobId,
    offset: u64,
    lsn: Lsn,
) -> Result<(), ReplicationError> {
    let name = resource.name().to_string();
    let mut reader = resource
        .open_blob(&id)
        .await
        .map_err(|e| ReplicationError::Malformed {
            lsn,
            what: format!("blob {id} of {name}, named by this record, cannot be read here: {e}"),
        })?;
    let (chunks_tx, mut chunks) = mpsc::channel::<std::io::Result<Vec<u8>>>(2);
    let reading = tokio::task::spawn_blocking(move || {
        if offset > 0 {
            let skipped = std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink());
            if let Err(e) = skipped {
                let _ = chunks_tx.blocking_send(Err(e));
                return;
            }
        }
        loop {
            let mut buf = vec![0; BLOB_CHUNK_BYTES];
            let mut filled = 0;
            while filled < buf.len() {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = chunks_tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            buf.truncate(filled);
            let end = filled == 0;
            if chunks_tx.blocking_send(Ok(buf)).is_err() || end {
                return;
            }
        }
    });
    let mut at = offset;
    let mut held: Option<Vec<u8>> = None;
    while let Some(chunk) = chunks.recv().await {
        let chunk = chunk.map_err(|e| ReplicationError::Malformed {
            lsn,
            what: format!("blob {id} of {name} cannot be read here: {e}"),
        })?;
        let last = chunk.is_empty();
        if let Some(data) = held.take() {
            let len = data.len() as u64;
            let piece = v1::BlobChunk {
                resource: name.clone(),
                id: id.0.to_vec(),
                offset: at,
                data,
                last,
            };
            send(tx, v1::primary_message::Body::Blob(piece)).await?;
            at += len;
        } else if last {
            // An empty blob, or one resumed at its end: one empty last chunk.
            let piece = v1::BlobChunk {
                resource: name.clone(),
                id: id.0.to_vec(),
                offset: at,
                data: Vec::new(),
                last: true,
            };
            send(tx, v1::primary_message::Body::Blob(piece)).await?;
        }
        if last {
            break;
        }
        held = Some(chunk);
    }
    let _ = reading.await;
    Ok(())
}
