//! Inventories: a resource's content as sorted keys and content hashes, served to
//! `concord compare` ([`Inventories::stream`]), with the LSNs that say as of when.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use adapters::Resource;
use journal::{Journal, Lsn};
use proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Items per inventory message.
pub const ITEMS_PER_CHUNK: usize = 4096;
/// Bytes per entry message.
pub const ENTRY_CHUNK_BYTES: usize = 1 << 20;

/// Reads until `buf` is full or the content ends.
fn read_full(content: &mut adapters::BlobContent, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match content.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads a node's durable LSN.
pub type DurableLsn = Arc<dyn Fn() -> Lsn + Send + Sync>;

/// A node's resources and its durable LSN, for inventories.
#[derive(Clone)]
pub struct Inventories {
    resources: BTreeMap<String, Arc<dyn Resource>>,
    durable: DurableLsn,
}

impl Inventories {
    /// Inventories of `resources`, with the durable LSN `durable` reads.
    pub fn new(resources: Vec<Arc<dyn Resource>>, durable: DurableLsn) -> Self {
        Inventories {
            resources: resources
                .into_iter()
                .map(|r| (r.name().to_string(), r))
                .collect(),
            durable,
        }
    }

    /// Inventories of `resources` with `journal`'s durable LSN.
    pub fn of_journal(resources: Vec<Arc<dyn Resource>>, journal: Arc<Journal>) -> Self {
        Inventories::new(resources, Arc::new(move || journal.durable_lsn()))
    }

    fn resource(&self, name: &str) -> Result<&Arc<dyn Resource>, Status> {
        self.resources.get(name).ok_or_else(|| {
            Status::not_found(format!(
                "no resource {name:?}; configured: {}",
                self.resources
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// The content under inventory key `key` of resource `name`, in chunks of
    /// [`ENTRY_CHUNK_BYTES`] read on the blocking pool (one chunk with `absent` when the key is
    /// absent).
    pub async fn entry(
        &self,
        name: &str,
        key: &str,
    ) -> Result<ReceiverStream<Result<v1::EntryChunk, Status>>, Status> {
        let resource = self.resource(name)?;
        let content = resource
            .read_entry(key)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let (tx, rx) = mpsc::channel(2);
        let Some(mut content) = content else {
            let absent = v1::EntryChunk {
                data: Vec::new(),
                absent: true,
            };
            let _ = tx.send(Ok(absent)).await;
            return Ok(ReceiverStream::new(rx));
        };
        tokio::task::spawn_blocking(move || {
            loop {
                let mut buf = vec![0; ENTRY_CHUNK_BYTES];
                let chunk = match read_full(&mut content, &mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(v1::EntryChunk {
                            data: buf,
                            absent: false,
                        })
                    }
                    Err(e) => Err(Status::unavailable(format!("read the entry: {e}"))),
                };
                let failed = chunk.is_err();
                if tx.blocking_send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// The inventory of `name` as a stream of chunks (sorted by key).
    pub async fn stream(
        &self,
        name: &str,
    ) -> Result<ReceiverStream<Result<v1::InventoryChunk, Status>>, Status> {
        let resource = self.resource(name)?;
        let durable = (self.durable)();
        let applied = resource.applied_lsn().await.unwrap_or(Lsn(0));
        let entries = resource
            .inventory()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut chunks = entries.chunks(ITEMS_PER_CHUNK).peekable();
            if chunks.peek().is_none() {
                let _ = tx.send(Ok(chunk(&[], applied, durable))).await;
            }
            for part in chunks {
                if tx.send(Ok(chunk(part, applied, durable))).await.is_err() {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

fn chunk(items: &[adapters::InventoryEntry], applied: Lsn, durable: Lsn) -> v1::InventoryChunk {
    v1::InventoryChunk {
        items: items
            .iter()
            .map(|e| v1::InventoryItem {
                key: e.key.clone(),
                digest: e.digest.to_vec(),
            })
            .collect(),
        applied_lsn: applied.0,
        durable_lsn: durable.0,
    }
}
