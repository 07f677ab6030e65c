//! The standby's receiver: it follows a primary's journal and keeps its own copy of it.
//!
//! [`Receiver::run`] connects to the primary's `Replication.Ship` stream and says where its own
//! journal is (`Hello`: cluster id, epoch, durable LSN and the chain value after it, journal
//! format, and the blob it holds in part, if any). The primary checks that and answers
//! `Welcome`, then sends, in journal order, the blobs each decision record names and the
//! records themselves. For each record the receiver checks the frame's crc, then appends it
//! *verbatim* to its own journal ([`journal::Journal::append_verbatim`]: same LSN, epoch, kind,
//! payload and chain value; the journal refuses a gap, an epoch going back, or a chain value
//! that is not the one it computes — the two histories diverged). Once a batch is durable it
//! acknowledges its durable LSN (and its replayed LSN, for the primary's status); a primary in
//! sync mode answers a commit only then.
//!
//! **Blobs.** A blob is written to `data_dir/replication/partial/<resource>.<id>` as its chunks
//! arrive, then put into the resource's store ([`adapters::Resource::put_blob`], which checks
//! it against its id: bytes that do not match are refused and dropped) and the partial file is
//! removed. A transfer broken midway is resumed: the next `Hello` names the partial blob and
//! how much of it is here, and the primary goes on from there.
//!
//! **Breaks.** Any break (the connection, a damaged frame, the primary restarting) ends the
//! session; the receiver connects again with exponential backoff (from
//! [`RECONNECT_BACKOFF_MS`]`.0` to `.1`) and resumes from its durable LSN. A refusal only a
//! person can end (another cluster, an older epoch, another journal format, a diverged
//! history, a primary that no longer holds what the standby needs) is logged at ERROR and
//! shown in the status, and retried every [`REFUSED_RETRY_MS`] without changing anything, so
//! the standby resumes by itself once the cause is gone. A failed journal append or sync stops
//! the process (the journal is poisoned; a restart recovers).
//!
//! # Implementation caveats
//!
//! * One primary per standby; a standby does not forward to another standby.
//! * A blob already in the standby's store is sent again after a reconnect (it is not asked
//!   for by id first); putting it is harmless.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use adapters::{BlobId, Resource};
use journal::{ChainHash, Epoch, Journal, JournalError, Lsn};
use proto::client::Credentials;
use proto::v1;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use crate::error::ReplicationError;
use crate::replay::SharedView;
use crate::{cluster, wire};

/// First and last delay before connecting again after a break (milliseconds).
pub const RECONNECT_BACKOFF_MS: (u64, u64) = (100, 1_000);
/// Delay before asking again after a refusal only a person can end (milliseconds).
pub const REFUSED_RETRY_MS: u64 = 5_000;
/// How long the primary may stay silent before the link counts as broken (milliseconds): it
/// sends `Progress` every second when it has nothing else.
pub const SILENCE_MS_MAX: u64 = 10_000;
/// Messages queued towards the primary (acknowledgements): a full queue drops the oldest
/// acknowledgement's chance, never blocks receiving; the next one supersedes it.
const ACK_QUEUE: usize = 64;

/// What the receiver reports for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct ReceiveView {
    /// Whether the stream from the primary is up.
    pub connected: bool,
    /// The primary's address.
    pub primary: String,
    /// The cluster followed.
    pub cluster_id: Option<String>,
    /// The primary's durable LSN as last heard.
    pub primary_durable_lsn: Lsn,
    /// The primary's epoch as last heard.
    pub primary_epoch: Epoch,
    /// When the primary was last heard (milliseconds since the Unix epoch).
    pub last_heard_ms: u64,
    /// This standby's journal's durable LSN.
    pub durable_lsn: Lsn,
    /// Bytes of records received since start (for the status's byte lag).
    pub received_bytes: u64,
    /// Bytes of blob chunks received since start (a resumed blob counts from where it resumed).
    pub blob_bytes_received: u64,
    /// Why the last session ended, if it failed.
    pub last_error: Option<String>,
    /// The refusal code, when the primary refused this standby.
    pub refused: Option<&'static str>,
}

/// Shared with status readers.
pub type SharedReceiveView = Arc<Mutex<ReceiveView>>;

/// Blobs put into a resource's store for records not yet durable in the standby's journal,
/// as `(resource, id)`: blob collection must keep them ([`crate::replay::Replay::keep_pending`]).
pub type PendingBlobs = Arc<Mutex<std::collections::HashSet<(String, BlobId)>>>;

/// How to reach the primary.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Its address (`http://` or `https://`).
    pub url: String,
    /// Token and TLS.
    pub credentials: Credentials,
    /// This standby's name, for the primary.
    pub name: String,
}

/// The receiver of a standby; see the module docs.
pub struct Receiver {
    journal: Arc<Journal>,
    resources: BTreeMap<String, Arc<dyn Resource>>,
    upstream: Upstream,
    data_dir: PathBuf,
    record_bytes_max: u64,
    view: SharedReceiveView,
    replay: SharedView,
    /// The partial blob the current session's `Hello` named for resumption.
    resuming: Mutex<Option<PathBuf>>,
    /// Blobs put whose records are not durable yet.
    pending: PendingBlobs,
}

/// A blob being received.
struct Partial {
    resource: String,
    id: BlobId,
    path: PathBuf,
    file: tokio::fs::File,
    offset: u64,
}

impl Receiver {
    /// A receiver appending to `journal`, putting blobs into `resources`, keeping its state
    /// under `data_dir` (the cluster id, partial blobs); `replay` is read for the replayed LSN
    /// it acknowledges.
    pub fn new(
        journal: Arc<Journal>,
        resources: Vec<Arc<dyn Resource>>,
        upstream: Upstream,
        data_dir: &Path,
        replay: SharedView,
    ) -> Receiver {
        let view = ReceiveView {
            primary: upstream.url.clone(),
            durable_lsn: journal.durable_lsn(),
            ..ReceiveView::default()
        };
        Receiver {
            record_bytes_max: journal::JournalConfig::default().record_bytes_max,
            journal,
            resources: resources
                .into_iter()
                .map(|r| (r.name().to_string(), r))
                .collect(),
            upstream,
            data_dir: data_dir.to_path_buf(),
            view: Arc::new(Mutex::new(view)),
            replay,
            resuming: Mutex::new(None),
            pending: PendingBlobs::default(),
        }
    }

    /// The status readers' view.
    pub fn view(&self) -> SharedReceiveView {
        Arc::clone(&self.view)
    }

    /// The blobs put for records not yet durable (for blob collection).
    pub fn pending_blobs(&self) -> PendingBlobs {
        Arc::clone(&self.pending)
    }

    /// Follows the primary until `stop` turns true; an error only when the process must stop
    /// (the journal failed).
    pub async fn run(&self, mut stop: watch::Receiver<bool>) -> Result<(), ReplicationError> {
        let mut delay = RECONNECT_BACKOFF_MS.0;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let session = tokio::select! {
                result = self.session() => result,
                _ = stop.changed() => return Ok(()),
            };
            self.update(|v| v.connected = false);
            let wait = match session {
                Ok(()) => {
                    delay = RECONNECT_BACKOFF_MS.0;
                    delay
                }
                Err(e) if e.is_fatal() => {
                    tracing::error!(error = %e, "the standby's journal failed: stopping (a restart recovers)");
                    return Err(e);
                }
                Err(e) if e.needs_an_operator() => {
                    tracing::error!(error = %e, code = e.code(), "the primary's stream is refused; asking again in {REFUSED_RETRY_MS} ms");
                    self.failed(&e);
                    REFUSED_RETRY_MS
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the stream from the primary broke; connecting again in {delay} ms");
                    self.failed(&e);
                    let wait = delay;
                    delay = (delay * 2).min(RECONNECT_BACKOFF_MS.1);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
    }

    fn failed(&self, e: &ReplicationError) {
        let refused = match e {
            ReplicationError::Refused { code, .. } => Some(*code),
            e if e.needs_an_operator() => Some(e.code()),
            _ => None,
        };
        self.update(|v| {
            v.last_error = Some(e.to_string());
            v.refused = refused;
        });
    }

    fn update(&self, f: impl FnOnce(&mut ReceiveView)) {
        f(&mut self.view.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// One connection: hello, welcome, then blobs and records until a break.
    async fn session(&self) -> Result<(), ReplicationError> {
        let mut client =
            proto::client::connect_replication(&self.upstream.url, &self.upstream.credentials)
                .await
                .map_err(|e| ReplicationError::Transport(e.to_string()))?;
        let (acks, outbound) = mpsc::channel::<v1::StandbyMessage>(ACK_QUEUE);
        let hello = self.hello().await?;
        let from = Lsn(hello.durable_lsn).next();
        acks.send(message(v1::standby_message::Body::Hello(hello)))
            .await
            .map_err(|_| ReplicationError::Protocol("the outbound stream closed".into()))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(outbound);
        let mut inbound = client
            .ship(stream)
            .await
            .map_err(|s| ReplicationError::from_status(&s))?
            .into_inner();
        let welcome = match next(&mut inbound).await? {
            Some(v1::primary_message::Body::Welcome(w)) => w,
            Some(_) => {
                return Err(ReplicationError::Protocol(
                    "the first message is not Welcome".into(),
                ));
            }
            None => {
                return Err(ReplicationError::Transport(
                    "the primary closed the stream".into(),
                ));
            }
        };
        self.welcome(&welcome)?;
        tracing::info!(primary = %self.upstream.url, from = from.0, "following the primary from lsn {from}");
        self.update(|v| {
            v.connected = true;
            v.last_error = None;
            v.refused = None;
            v.primary_epoch = Epoch(welcome.epoch);
            v.primary_durable_lsn = Lsn(welcome.durable_lsn);
            v.last_heard_ms = now_ms();
        });
        let mut partial: Option<Partial> = None;
        loop {
            let silence = Duration::from_millis(SILENCE_MS_MAX);
            let body = match tokio::time::timeout(silence, next(&mut inbound)).await {
                Ok(body) => body?,
                Err(_) => {
                    return Err(ReplicationError::Transport(format!(
                        "the primary sent nothing for {SILENCE_MS_MAX} ms"
                    )));
                }
            };
            self.update(|v| v.last_heard_ms = now_ms());
            match body {
                None => {
                    return Err(ReplicationError::Transport(
                        "the primary closed the stream".into(),
                    ));
                }
                Some(v1::primary_message::Body::Blob(chunk)) => {
                    self.blob_chunk(&mut partial, chunk).await?;
                }
                Some(v1::primary_message::Body::Records(batch)) => {
                    self.records(batch).await?;
                    self.acknowledge(&acks);
                }
                Some(v1::primary_message::Body::Progress(p)) => {
                    self.update(|v| {
                        v.primary_durable_lsn =
                            v.primary_durable_lsn.max(Lsn(p.primary_durable_lsn))
                    });
                    self.acknowledge(&acks);
                }
                Some(v1::primary_message::Body::Welcome(_)) => {
                    return Err(ReplicationError::Protocol("a second Welcome".into()));
                }
            }
        }
    }

    /// Where this standby is.
    async fn hello(&self) -> Result<v1::Hello, ReplicationError> {
        let journal = Arc::clone(&self.journal);
        let (epoch, durable, chain) = tokio::task::spawn_blocking(move || last_position(&journal))
            .await
            .map_err(|e| {
                ReplicationError::Protocol(format!("reading the journal's end failed: {e}"))
            })??;
        let resume = self.partial_blob().await?;
        *self.resuming.lock().unwrap_or_else(PoisonError::into_inner) = resume.as_ref().map(|r| {
            partial_dir(&self.data_dir).join(format!("{}.{}", r.resource, hex::encode(&r.id)))
        });
        Ok(v1::Hello {
            header: Some(v1::RequestHeader {
                schema_version: proto::SCHEMA_VERSION,
                client_name: self.upstream.name.clone(),
            }),
            cluster_id: cluster::read(&self.data_dir)?.unwrap_or_default(),
            name: self.upstream.name.clone(),
            epoch: epoch.0,
            durable_lsn: durable.0,
            chain: chain.map(|c| c.0.to_vec()).unwrap_or_default(),
            journal_format: journal::segment::FORMAT_VERSION,
            resume,
        })
    }

    /// Checks the primary's `Welcome` against this standby's journal; adopts its cluster id
    /// the first time.
    fn welcome(&self, welcome: &v1::Welcome) -> Result<(), ReplicationError> {
        if welcome.journal_format != journal::segment::FORMAT_VERSION {
            return Err(ReplicationError::FormatMismatch {
                standby: journal::segment::FORMAT_VERSION,
                primary: welcome.journal_format,
            });
        }
        match cluster::read(&self.data_dir)? {
            Some(ours) if ours != welcome.cluster_id => {
                return Err(ReplicationError::ClusterMismatch {
                    standby: ours,
                    primary: welcome.cluster_id.clone(),
                });
            }
            Some(_) => {}
            None => {
                if welcome.cluster_id.len() != 32 {
                    return Err(ReplicationError::Protocol(format!(
                        "the primary's cluster id {:?} is not 32 hex digits",
                        welcome.cluster_id
                    )));
                }
                cluster::adopt(&self.data_dir, &welcome.cluster_id)?;
                tracing::info!(cluster = %welcome.cluster_id, "following cluster {}", welcome.cluster_id);
            }
        }
        self.update(|v| v.cluster_id = Some(welcome.cluster_id.clone()));
        Ok(())
    }

    /// Appends a batch of records verbatim and waits until it is durable.
    async fn records(&self, batch: v1::RecordBatch) -> Result<(), ReplicationError> {
        let mut last = None;
        let mut bytes = 0u64;
        for shipped in batch.records {
            let record = wire::from_shipped(shipped, self.record_bytes_max)?;
            bytes += record.payload.len() as u64;
            let lsn = record.lsn;
            let appending = self.journal.append_verbatim(&record).map_err(|e| match e {
                JournalError::ChainMismatch { lsn, expected, got } => ReplicationError::Diverged {
                    lsn,
                    detail: format!("this standby's chain value after it would be {expected}, the primary's is {got}"),
                },
                JournalError::EpochRegressed { offered, current } => ReplicationError::EpochRegressed {
                    standby: current.0,
                    primary: offered.0,
                },
                JournalError::LsnGap { expected, got } => ReplicationError::Protocol(format!(
                    "the primary sent lsn {got}, this standby's journal expects {expected}"
                )),
                other => ReplicationError::Journal(other),
            })?;
            last = Some((lsn, appending));
        }
        if let Some((_, appending)) = last {
            let durable = appending.await?;
            // The blobs come before the records that name them: every blob put so far is
            // named by a durable record now.
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            self.update(|v| {
                v.durable_lsn = durable;
                v.received_bytes += bytes;
                v.primary_durable_lsn = v.primary_durable_lsn.max(Lsn(batch.primary_durable_lsn));
            });
        }
        Ok(())
    }

    /// Sends the standby's position; a full queue skips it (the next one supersedes it).
    fn acknowledge(&self, acks: &mpsc::Sender<v1::StandbyMessage>) {
        let replayed = self
            .replay
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replayed_lsn;
        let ack = v1::Ack {
            durable_lsn: self.journal.durable_lsn().0,
            replayed_lsn: replayed.0,
        };
        let _ = acks.try_send(message(v1::standby_message::Body::Ack(ack)));
    }

    /// Writes a blob chunk; the last one puts the blob into its resource's store.
    async fn blob_chunk(
        &self,
        partial: &mut Option<Partial>,
        chunk: v1::BlobChunk,
    ) -> Result<(), ReplicationError> {
        let id = blob_id(&chunk.id)?;
        let same = partial
            .as_ref()
            .is_some_and(|p| p.id == id && p.resource == chunk.resource);
        if !same {
            *partial = Some(self.open_partial(&chunk.resource, id, chunk.offset).await?);
        }
        let Some(p) = partial.as_mut() else {
            return Err(ReplicationError::Protocol("no blob being received".into()));
        };
        if chunk.offset != p.offset {
            return Err(ReplicationError::Protocol(format!(
                "blob {id} of {}: a chunk at offset {} while {} bytes are here",
                p.resource, chunk.offset, p.offset
            )));
        }
        p.file
            .write_all(&chunk.data)
            .await
            .map_err(|source| ReplicationError::State {
                what: "write a partial blob",
                path: p.path.clone(),
                source,
            })?;
        p.offset += chunk.data.len() as u64;
        let received = chunk.data.len() as u64;
        self.update(|v| v.blob_bytes_received += received);
        if chunk.last {
            let done = partial.take();
            if let Some(p) = done {
                self.put_blob(p).await?;
            }
        }
        Ok(())
    }

    /// The partial file for a blob: created (from offset 0), or the one kept from an
    /// interrupted transfer (when the primary resumes at its length).
    async fn open_partial(
        &self,
        resource: &str,
        id: BlobId,
        offset: u64,
    ) -> Result<Partial, ReplicationError> {
        if !self.resources.contains_key(resource) {
            return Err(ReplicationError::Protocol(format!(
                "a blob for resource {resource:?}, which is not configured on this standby"
            )));
        }
        let dir = partial_dir(&self.data_dir);
        let path = dir.join(format!("{resource}.{id}"));
        let state = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ReplicationError::State { what, path, source }
        };
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(state("create the partial blob directory", &dir))?;
        if offset == 0 {
            // A new transfer: partial blobs of earlier transfers go, except the one this
            // session's Hello asked the primary to resume (it may come after this blob).
            let keep = self
                .resuming
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            clear_partials(&dir, keep.as_deref()).await;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(state("open a partial blob", &path))?;
        let held = file
            .metadata()
            .await
            .map_err(state("read the size of a partial blob", &path))?
            .len();
        if held != offset {
            file.set_len(0)
                .await
                .map_err(state("truncate a partial blob", &path))?;
            if offset != 0 {
                return Err(ReplicationError::Protocol(format!(
                    "blob {id} resumed at offset {offset}, but {held} bytes of it are here"
                )));
            }
        }
        if offset > 0 {
            tracing::info!(resource, blob = %id, offset, "resuming an interrupted blob at byte {offset}");
        }
        file.flush()
            .await
            .map_err(state("flush a partial blob", &path))?;
        Ok(Partial {
            resource: resource.to_string(),
            id,
            path,
            file,
            offset,
        })
    }

    /// Puts a complete blob into its resource's store (checked against its id) and removes
    /// the partial file.
    async fn put_blob(&self, mut p: Partial) -> Result<(), ReplicationError> {
        let state = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ReplicationError::State { what, path, source }
        };
        p.file
            .flush()
            .await
            .map_err(state("flush a partial blob", &p.path))?;
        drop(p.file);
        let Some(resource) = self.resources.get(&p.resource) else {
            return Err(ReplicationError::Protocol(format!(
                "unknown resource {}",
                p.resource
            )));
        };
        let content =
            std::fs::File::open(&p.path).map_err(state("open a partial blob", &p.path))?;
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((p.resource.clone(), p.id));
        let put = resource.put_blob(&p.id, Box::new(content)).await;
        let _ = tokio::fs::remove_file(&p.path).await;
        put.map_err(|e| match e {
            adapters::ResourceError::BlobMismatch { .. } => ReplicationError::Malformed {
                lsn: self.journal.durable_lsn().next(),
                what: format!("blob {} of {}: {e}", p.id, p.resource),
            },
            other => ReplicationError::Resource(other),
        })
    }

    /// The blob held in part, if any: the next `Hello` asks the primary to resume it.
    async fn partial_blob(&self) -> Result<Option<v1::BlobResume>, ReplicationError> {
        let dir = partial_dir(&self.data_dir);
        let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
            return Ok(None);
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((resource, id)) = name.rsplit_once('.') else {
                continue;
            };
            let (Ok(bytes), Ok(len)) = (hex::decode(id), entry.metadata().await.map(|m| m.len()))
            else {
                continue;
            };
            if bytes.len() == 32 && len > 0 && self.resources.contains_key(resource) {
                return Ok(Some(v1::BlobResume {
                    resource: resource.to_string(),
                    id: bytes,
                    offset: len,
                }));
            }
        }
        Ok(None)
    }
}

/// The highest epoch, durable LSN and chain value after it of `journal` (the chain is `None`
/// when the record at the durable LSN is not retained).
fn last_position(journal: &Journal) -> Result<(Epoch, Lsn, Option<ChainHash>), ReplicationError> {
    let durable = journal.durable_lsn();
    if durable == Lsn(0) {
        return Ok((Epoch(0), durable, Some(ChainHash::GENESIS)));
    }
    if durable < journal.oldest_lsn() {
        // A re-seeded journal with no record yet: it continues the primary's history after
        // `durable`, and its first record's chain value is checked as it is appended.
        return Ok((Epoch(0), durable, None));
    }
    match journal.read_from(durable)?.next() {
        Some(record) => {
            let record = record?;
            Ok((record.epoch, durable, Some(record.chain)))
        }
        None => Ok((Epoch(0), durable, None)),
    }
}

fn partial_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("replication").join("partial")
}

/// Removes every partial blob but `keep`.
async fn clear_partials(dir: &Path, keep: Option<&Path>) {
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            if Some(entry.path().as_path()) != keep {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
    }
}

fn blob_id(bytes: &[u8]) -> Result<BlobId, ReplicationError> {
    bytes
        .try_into()
        .map(BlobId)
        .map_err(|_| ReplicationError::Protocol(format!("a blob id of {} bytes", bytes.len())))
}

fn message(body: v1::standby_message::Body) -> v1::StandbyMessage {
    v1::StandbyMessage { body: Some(body) }
}

async fn next(
    inbound: &mut tonic::Streaming<v1::PrimaryMessage>,
) -> Result<Option<v1::primary_message::Body>, ReplicationError> {
    match inbound.message().await {
        Ok(Some(m)) => match m.body {
            Some(body) => Ok(Some(body)),
            None => Err(ReplicationError::Protocol(
                "a message without a body".into(),
            )),
        },
        Ok(None) => Ok(None),
        Err(status) => Err(ReplicationError::from_status(&status)),
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
