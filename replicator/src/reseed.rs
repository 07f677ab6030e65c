//! Re-seeding a standby: copying a consistent state of the primary — its resources' content
//! and a position in its journal — when shipping cannot resume (the primary no longer holds the
//! records the standby needs, or the standby is new to a primary with a long history, or it
//! followed another cluster).
//!
//! The idea: the copy need not be a snapshot. The primary answers `ReseedStart` with a position
//! `P` before the lowest LSN it still needs — so every transaction decided at or before `P` has
//! finished phase 2, and its effects are in the primary's resources — and from then on holds its
//! retention floor at `P` for this standby. The standby then copies each resource key by key
//! (the inventories say which keys differ; `ReadEntry` streams a key's content; the resource's
//! `write_entry` / `remove_entry` set it) while the primary goes on committing, so the copy is
//! fuzzy: a key may hold a value from after `P`. It sets each resource's applied LSN to `P` and
//! starts a new journal that continues the primary's history after `P`
//! ([`journal::JournalConfig::start_after`]). Shipping then resumes at `P + 1` and replay applies
//! every later transaction again, in order; each redo sets final values by key, so once replay
//! has passed the primary's LSN at the end of the copy, every key holds the primary's value.
//!
//! **Crash safety.** [`reseed`] first writes `data_dir/replication/reseeding`; `concord standby`
//! refuses to start while it is there, because the resources may be half copied. The new journal
//! is built in `journal.reseed` and swapped in by renames (old one aside, new one in place, the
//! directory synced, the old one removed); the marker goes last. An interrupted re-seed is run
//! again from the start: each step is idempotent.
//!
//! # Implementation caveats
//!
//! * Every differing key is fetched whole before it is written (through a temp file, so memory
//!   stays bounded); a resource with millions of small keys takes one round trip per key.
//! * The standby must be stopped: the journal's `LOCK` is taken for the duration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapters::Resource;
use journal::{Epoch, Journal, JournalConfig, Lsn, StartPosition};
use proto::client::ReplicationClient;
use proto::v1;
use tokio::io::AsyncWriteExt;

use crate::error::ReplicationError;
use crate::standby::Upstream;
use crate::{cluster, replay};

/// The marker of a re-seed in progress, under `data_dir/replication/`.
pub const MARKER_FILE: &str = "reseeding";

/// What a re-seed did.
#[derive(Clone, Debug, Default)]
pub struct ReseedReport {
    /// The cluster followed from now on.
    pub cluster_id: String,
    /// The position the new journal continues from.
    pub lsn: Lsn,
    /// Per resource.
    pub resources: Vec<ResourceReseed>,
}

/// One resource's copy.
#[derive(Clone, Debug, Default)]
pub struct ResourceReseed {
    /// The resource.
    pub name: String,
    /// Keys on the primary.
    pub keys: u64,
    /// Keys written (they differed or were missing).
    pub copied: u64,
    /// Keys removed (not on the primary).
    pub removed: u64,
    /// Bytes copied.
    pub bytes: u64,
}

/// Whether a re-seed was interrupted in `data_dir` (the standby must not start).
pub fn interrupted(data_dir: &Path) -> bool {
    marker(data_dir).exists()
}

/// Writes the marker and makes it durable (file and directory) before anything is copied: a
/// power loss must not keep copied keys and lose the marker.
fn write_marker(data_dir: &Path) -> Result<(), ReplicationError> {
    use std::io::Write;
    let path = marker(data_dir);
    let mut file =
        std::fs::File::create(&path).map_err(state("create the re-seed marker", &path))?;
    file.write_all(b"a re-seed is in progress\n")
        .and_then(|()| file.sync_all())
        .map_err(state("write the re-seed marker", &path))?;
    let dir = data_dir.join("replication");
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(state("sync the directory of", &dir))
}

fn marker(data_dir: &Path) -> PathBuf {
    data_dir.join("replication").join(MARKER_FILE)
}

fn state(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ReplicationError {
    let path = path.to_path_buf();
    move |source| ReplicationError::State { what, path, source }
}

/// Re-seeds the standby in `data_dir` with `resources` from the primary of `upstream`; see
/// the module docs. The standby must be stopped.
pub async fn reseed(
    upstream: &Upstream,
    resources: &[Arc<dyn Resource>],
    data_dir: &Path,
) -> Result<ReseedReport, ReplicationError> {
    let journal_dir = data_dir.join("journal");
    // Holds the journal's LOCK for the duration: no standby runs on it meanwhile.
    let held = open_journal(&journal_dir, None).await?;
    let dir = data_dir.join("replication");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(state("create", &dir))?;
    write_marker(data_dir)?;
    let mut client = proto::client::connect_replication(&upstream.url, &upstream.credentials)
        .await
        .map_err(|e| ReplicationError::Transport(e.to_string()))?;
    let start = client
        .reseed_start(v1::ReseedRequest {
            header: Some(v1::RequestHeader::current("concord standby --reseed")),
            name: upstream.name.clone(),
        })
        .await
        .map_err(|s| ReplicationError::from_status(&s))?
        .into_inner();
    if start.journal_format != journal::segment::FORMAT_VERSION {
        return Err(ReplicationError::FormatMismatch {
            standby: journal::segment::FORMAT_VERSION,
            primary: start.journal_format,
        });
    }
    let chain = crate::wire::chain_from(&start.chain).ok_or_else(|| {
        ReplicationError::Protocol("a re-seed position without a chain value".into())
    })?;
    let lsn = Lsn(start.lsn);
    tracing::info!(primary = %upstream.url, lsn = lsn.0, "re-seeding from the primary's lsn {lsn}");
    let mut report = ReseedReport {
        cluster_id: start.cluster_id.clone(),
        lsn,
        resources: Vec::new(),
    };
    let scratch = dir.join("reseed.entry");
    for resource in resources {
        let copied = copy_resource(&mut client, resource.as_ref(), &scratch).await?;
        resource.set_applied_lsn(lsn).await?;
        report.resources.push(copied);
    }
    let _ = tokio::fs::remove_file(&scratch).await;
    drop(held);
    let position = StartPosition {
        lsn,
        chain,
        epoch: Epoch(start.epoch),
    };
    swap_journal(data_dir, position).await?;
    let partial = dir.join("partial");
    let _ = tokio::fs::remove_dir_all(&partial).await;
    replay::write_floor(&dir, lsn)?;
    cluster::adopt(data_dir, &start.cluster_id)?;
    tokio::fs::remove_file(marker(data_dir))
        .await
        .map_err(state("remove the re-seed marker", &marker(data_dir)))?;
    tracing::info!(
        lsn = lsn.0,
        "re-seeded: the standby continues the primary's journal after lsn {lsn}"
    );
    Ok(report)
}

async fn open_journal(
    dir: &Path,
    start: Option<StartPosition>,
) -> Result<Journal, ReplicationError> {
    let dir = dir.to_path_buf();
    let config = JournalConfig {
        start_after: start,
        ..coordinator::runtime::journal_config()
    };
    tokio::task::spawn_blocking(move || Journal::open(&dir, config))
        .await
        .map_err(|e| ReplicationError::Protocol(format!("opening the journal failed: {e}")))?
        .map_err(ReplicationError::Journal)
}

/// Builds the new journal beside the old one and swaps it in.
async fn swap_journal(data_dir: &Path, position: StartPosition) -> Result<(), ReplicationError> {
    let current = data_dir.join("journal");
    let fresh = data_dir.join("journal.reseed");
    let old = data_dir.join("journal.old");
    let _ = tokio::fs::remove_dir_all(&fresh).await;
    let journal = open_journal(&fresh, Some(position)).await?;
    journal.close()?;
    drop(journal);
    let _ = tokio::fs::remove_dir_all(&old).await;
    if tokio::fs::metadata(&current).await.is_ok() {
        tokio::fs::rename(&current, &old)
            .await
            .map_err(state("move the old journal aside", &current))?;
    }
    tokio::fs::rename(&fresh, &current)
        .await
        .map_err(state("move the new journal into place", &current))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(state("sync the data directory", data_dir))?;
    let _ = tokio::fs::remove_dir_all(&old).await;
    Ok(())
}

/// Copies one resource key by key: the keys whose digests differ are fetched and written, the
/// keys the primary lacks are removed.
async fn copy_resource(
    client: &mut ReplicationClient,
    resource: &dyn Resource,
    scratch: &Path,
) -> Result<ResourceReseed, ReplicationError> {
    let name = resource.name().to_string();
    let primary = primary_inventory(client, &name).await?;
    let local: BTreeMap<String, [u8; 32]> = resource
        .inventory()
        .await?
        .into_iter()
        .map(|e| (e.key, e.digest))
        .collect();
    let mut report = ResourceReseed {
        name: name.clone(),
        keys: primary.len() as u64,
        ..ResourceReseed::default()
    };
    for (key, digest) in &primary {
        if local.get(key) == Some(digest) {
            continue;
        }
        match fetch(client, &name, key, scratch).await? {
            Some(bytes) => {
                let file = std::fs::File::open(scratch).map_err(state("open", scratch))?;
                resource.write_entry(key, Box::new(file)).await?;
                report.copied += 1;
                report.bytes += bytes;
            }
            // Removed on the primary since its inventory: replay removes it again if need be.
            None => resource.remove_entry(key).await?,
        }
    }
    for key in local.keys().filter(|k| !primary.contains_key(*k)) {
        resource.remove_entry(key).await?;
        report.removed += 1;
    }
    tracing::info!(resource = %name, copied = report.copied, removed = report.removed, "re-seeded resource {name}");
    Ok(report)
}

async fn primary_inventory(
    client: &mut ReplicationClient,
    name: &str,
) -> Result<BTreeMap<String, [u8; 32]>, ReplicationError> {
    let request = v1::InventoryRequest {
        header: Some(v1::RequestHeader::current("concord standby --reseed")),
        resource: name.to_string(),
    };
    let mut stream = client
        .inventory(request)
        .await
        .map_err(|s| ReplicationError::Transport(format!("inventory of {name}: {}", s.message())))?
        .into_inner();
    let mut out = BTreeMap::new();
    loop {
        let chunk = stream.message().await.map_err(|s| {
            ReplicationError::Transport(format!("inventory of {name}: {}", s.message()))
        })?;
        let Some(chunk) = chunk else {
            return Ok(out);
        };
        for item in chunk.items {
            let digest: [u8; 32] = item.digest.as_slice().try_into().map_err(|_| {
                ReplicationError::Protocol(format!("a digest of {} bytes", item.digest.len()))
            })?;
            out.insert(item.key, digest);
        }
    }
}

/// Streams one key's content into `scratch`; `None` when the primary no longer has it.
async fn fetch(
    client: &mut ReplicationClient,
    resource: &str,
    key: &str,
    scratch: &Path,
) -> Result<Option<u64>, ReplicationError> {
    let request = v1::ReadEntryRequest {
        header: Some(v1::RequestHeader::current("concord standby --reseed")),
        resource: resource.to_string(),
        key: key.to_string(),
    };
    let transport = |s: tonic::Status| {
        ReplicationError::Transport(format!("read {key} of {resource}: {}", s.message()))
    };
    let mut stream = client
        .read_entry(request)
        .await
        .map_err(transport)?
        .into_inner();
    let mut file = tokio::fs::File::create(scratch)
        .await
        .map_err(state("create", scratch))?;
    let mut bytes = 0;
    while let Some(chunk) = stream.message().await.map_err(transport)? {
        if chunk.absent {
            return Ok(None);
        }
        file.write_all(&chunk.data)
            .await
            .map_err(state("write", scratch))?;
        bytes += chunk.data.len() as u64;
    }
    file.flush().await.map_err(state("write", scratch))?;
    Ok(Some(bytes))
}
