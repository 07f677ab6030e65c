//! Enqueue and prepare: how a message enters a branch, and how prepare makes it durable.
//!
//! [`MailBranch::enqueue`] gives the message its position and Maildir name (fixed at enqueue,
//! so a replay never delivers twice), then streams it through the [`Checker`]: a message that
//! fits the inline limits stays in memory, a larger one streams into its own file in `tmp/`,
//! hashed as it goes. A refused message leaves nothing behind, and its refusal names the
//! resource, the branch and the message's position.
//!
//! Prepare (`Inner::prepare_branch`) writes every message still in memory to its file in
//! `tmp/`, syncs each file and `tmp/` itself, adopts the messages over the inline limits into
//! the blob store by hard link, and appends the `PREPARED` record (small messages inline,
//! large ones by blob id). A staged message changed or removed by hand refuses the prepare.
//!
//! # Implementation caveats
//!
//! * A message written by a prepare that failed is written again by the next one (the file is
//!   truncated: `overwrite_synced`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::Path;
use std::sync::Arc;

use journal::{BlobId, Lsn};
use tokio::io::AsyncRead;

use super::{
    At, BRANCH_MESSAGES_MAX, CHUNK_BYTES, Checker, Content, Enqueued, FEWER, HEAD_CHUNK_BYTES,
    INLINE_BRANCH_BYTES_MAX, INLINE_MESSAGE_BYTES_MAX, Inner, MailBranch, MessageBuilder,
    MessageError, Prepared, RedoEntry, Staged, TASK, encode_redo, name,
};
use crate::internal::branch_log;
use crate::internal::instance::Instance;
use crate::internal::io::{blob_error, blocking, fill, remove_file_if_exists, sync_file};
use crate::{ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

impl MailBranch {
    /// The xid of the branch.
    pub fn xid(&self) -> &Xid {
        &self.xid
    }

    /// Streams an RFC 5322 message into the branch; it is delivered when the branch commits.
    /// Refused ([`ResourceError::Rejected`], naming the resource, the branch, the message's
    /// position and the [`MessageError`]) when it is not a valid message, is over
    /// `max_message_bytes`, or the branch is not active; nothing of a refused message stays.
    pub async fn enqueue(&self, mut message: impl AsyncRead + Unpin) -> Result<Enqueued> {
        let inner = &self.inner;
        let (at, name, keep) = inner.reserve(&self.xid)?;
        let staged = inner.stage(at, name, keep, &mut message).await?;
        inner.record(at, staged).await
    }

    /// Builds the message of `builder` and enqueues it; refused like [`MailBranch::enqueue`],
    /// and when the builder's fields cannot make a message (a CR or LF in a field, no
    /// recipient, …).
    pub async fn enqueue_built(&self, builder: &MessageBuilder) -> Result<Enqueued> {
        let message = builder.build().map_err(|e| {
            self.inner
                .rejected(format!("message for branch {} refused: {e}", self.xid))
        })?;
        self.enqueue(&message[..]).await
    }
}

impl Inner {
    /// Gives the next message of `xid` its position and name, and says how many bytes of it may
    /// stay in memory.
    pub(super) fn reserve(&self, xid: &Xid) -> Result<(At, String, u64)> {
        let mut st = self.state();
        self.usable(&st)?;
        self.not_fenced(&st, xid)?;
        let branch = st.branches.active(self, xid, "messages")?;
        if branch.next_pos as usize >= BRANCH_MESSAGES_MAX {
            return Err(self.rejected(format!(
                "branch {xid} already has BRANCH_MESSAGES_MAX = {BRANCH_MESSAGES_MAX} messages; send the rest in another transaction"
            )));
        }
        let pos = branch.next_pos;
        branch.next_pos += 1;
        let name = name::message_name(branch.time, xid, pos, &self.host);
        let room = INLINE_BRANCH_BYTES_MAX.saturating_sub(branch.memory_bytes);
        Ok((
            At { xid: *xid, pos },
            name,
            room.min(INLINE_MESSAGE_BYTES_MAX),
        ))
    }

    /// Reads, checks and stages one message: in memory while it fits in `keep` bytes, else in
    /// its file `tmp/<name>`, streamed. Nothing stays behind on failure.
    pub(super) async fn stage(
        &self,
        at: At,
        name: String,
        keep: u64,
        message: &mut (impl AsyncRead + Unpin),
    ) -> Result<Staged> {
        let mut checker = Checker::new(self.config.max_message_bytes);
        let mut input = vec![0u8; HEAD_CHUNK_BYTES];
        let mut head = Vec::new();
        loop {
            let n = fill(message, &mut input)
                .await
                .map_err(|e| self.refused(at, &MessageError::Read(e.to_string())))?;
            if n == 0 {
                checker.finish().map_err(|e| self.refused(at, &e))?;
                let content = Content::Memory(Arc::from(head));
                return Ok(Staged { name, content });
            }
            checker
                .push(&input[..n], &mut head)
                .map_err(|e| self.refused(at, &e))?;
            if head.len() as u64 > keep {
                break;
            }
        }
        drop(input);
        let file = self.area.tmp.join(&name);
        let streamed = self.stream_to(at, &file, checker, head, message).await;
        match streamed {
            Ok((id, bytes)) => Ok(Staged {
                name,
                content: Content::File { id, bytes },
            }),
            Err(e) => Err(self.discard(&file, e).await),
        }
    }

    /// Streams the rest of a message into the new file `file`, starting with `head` (already
    /// checked): one chunk at a time, each checked, hashed and written on the blocking pool.
    /// Returns the content's blob id and size.
    pub(super) async fn stream_to(
        &self,
        at: At,
        file: &Path,
        mut checker: Checker,
        head: Vec<u8>,
        message: &mut (impl AsyncRead + Unpin),
    ) -> Result<(BlobId, u64)> {
        let (name, target) = (self.name.clone(), file.to_path_buf());
        let (mut out, mut hasher) = blocking(&self.name, TASK, move || {
            let mut out = create_new(&name, "message file", &target)?;
            let mut hasher = blake3::Hasher::new();
            hasher.update(&head);
            out.write_all(&head)
                .map_err(|e| ResourceError::io(&name, "write message to", &target, &e))?;
            Ok((out, hasher))
        })
        .await?;
        let mut input = vec![0u8; CHUNK_BYTES];
        let mut normalised = Vec::new();
        loop {
            let n = fill(message, &mut input)
                .await
                .map_err(|e| self.refused(at, &MessageError::Read(e.to_string())))?;
            if n == 0 {
                break;
            }
            let (name, target) = (self.name.clone(), file.to_path_buf());
            (checker, hasher, out, input, normalised) = blocking(&self.name, TASK, move || {
                normalised.clear();
                checker
                    .push(&input[..n], &mut normalised)
                    .map_err(|e| refused(&name, at, &e))?;
                hasher.update(&normalised);
                out.write_all(&normalised)
                    .map_err(|e| ResourceError::io(&name, "write message to", &target, &e))?;
                Ok((checker, hasher, out, input, normalised))
            })
            .await?;
        }
        let bytes = checker.finish().map_err(|e| self.refused(at, &e))?;
        Ok((BlobId(*hasher.finalize().as_bytes()), bytes))
    }

    /// Adds a staged message to its branch; a message that lost a race with prepare or rollback
    /// is discarded.
    pub(super) async fn record(&self, at: At, staged: Staged) -> Result<Enqueued> {
        let bytes = match &staged.content {
            Content::Memory(content) => content.len() as u64,
            Content::File { bytes, .. } => *bytes,
        };
        let enqueued = Enqueued {
            name: staged.name.clone(),
            bytes,
        };
        let refused = {
            let mut st = self.state();
            match st.branches.active(self, &at.xid, "messages") {
                Ok(branch) => {
                    if let Content::Memory(_) = staged.content {
                        branch.memory_bytes += bytes;
                    }
                    branch.messages.insert(at.pos, staged);
                    None
                }
                Err(e) => Some((e, staged)),
            }
        };
        match refused {
            None => Ok(enqueued),
            Some((e, staged)) => {
                if let Content::File { .. } = staged.content {
                    let file = self.area.tmp.join(&staged.name);
                    return Err(self.discard(&file, e).await);
                }
                Err(e)
            }
        }
    }

    /// Removes the file of a message whose enqueue failed, and returns the failure.
    pub(super) async fn discard(&self, file: &Path, e: ResourceError) -> ResourceError {
        let (name, file) = (self.name.clone(), file.to_path_buf());
        let _ = blocking(&self.name, TASK, move || {
            remove_file_if_exists(&name, &file)
        })
        .await;
        e
    }

    pub(super) fn refused(&self, at: At, e: &MessageError) -> ResourceError {
        refused(&self.name, at, e)
    }

    /// Prepares a branch: its messages written and synced in `tmp/` on the blocking pool, then
    /// its record appended to the log and waited for.
    pub(super) async fn prepare_branch(
        self: &Arc<Self>,
        xid: &Xid,
        messages: Vec<Staged>,
    ) -> Result<(Arc<Prepared>, Lsn)> {
        let (worker, id) = (self.clone(), *xid);
        let entries = blocking(&self.name, TASK, move || {
            worker.write_prepared(&id, &messages)
        })
        .await?;
        let redo = encode_redo(&entries);
        let names = entries.iter().map(|e| e.name().to_string()).collect();
        let set_floor = |floor| self.set_log_floor(xid, floor);
        let (name, log, dir) = (&self.name, &self.log, &self.area.log);
        let lsn = branch_log::append_prepared(name, FEWER, log, dir, xid, &redo, set_floor).await?;
        Ok((Arc::new(Prepared { names, redo }), lsn))
    }

    /// The entries of a branch's prepare record, once it takes no more messages: each message is
    /// in its file in `tmp/` and synced (a message in memory is written there first), `tmp/` is
    /// synced; a message over the inline limits is adopted into the blob store.
    pub(super) fn write_prepared(&self, xid: &Xid, messages: &[Staged]) -> Result<Vec<RedoEntry>> {
        let mut inline_left = INLINE_BRANCH_BYTES_MAX;
        let mut entries = Vec::with_capacity(messages.len());
        for staged in messages {
            let name = staged.name.clone();
            let file = self.area.tmp.join(&name);
            let entry = match &staged.content {
                Content::Memory(content) => {
                    // A prepare that failed earlier may have written the file: written again.
                    overwrite_synced(&self.name, "message", &file, content)?;
                    let bytes = content.len() as u64;
                    if bytes <= inline_left && bytes <= INLINE_MESSAGE_BYTES_MAX {
                        inline_left -= bytes;
                        let content = content.to_vec();
                        RedoEntry::Inline { name, content }
                    } else {
                        // Over the branch's inline budget after all (concurrent enqueues).
                        let id = BlobId::of(content);
                        self.adopt(&file, &id)?;
                        RedoEntry::Blob { name, id, bytes }
                    }
                }
                Content::File { id, bytes } => {
                    self.sync_staged(xid, &file, *bytes)?;
                    self.adopt(&file, id)?;
                    let (id, bytes) = (*id, *bytes);
                    RedoEntry::Blob { name, id, bytes }
                }
            };
            entries.push(entry);
        }
        self.dirs.sync(&self.area.tmp)?;
        Ok(entries)
    }

    pub(super) fn adopt(&self, file: &Path, id: &BlobId) -> Result<()> {
        self.blobs
            .adopt(file, id)
            .map_err(|e| blob_error(&self.name, e))?;
        self.adoptions.note(id);
        Ok(())
    }

    /// Syncs a message streamed into `tmp/` at enqueue, after checking it is still the size it
    /// was written with.
    pub(super) fn sync_staged(&self, xid: &Xid, file: &Path, bytes: u64) -> Result<()> {
        let opened = File::open(file).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => self.rejected(format!(
                "the staged message {} of branch {xid} is missing: tmp/ was changed by hand; roll the transaction back",
                file.display()
            )),
            _ => ResourceError::io(&self.name, "open staged message", file, &e),
        })?;
        let len = opened
            .metadata()
            .map_err(|e| ResourceError::io(&self.name, "inspect staged message", file, &e))?
            .len();
        if len != bytes {
            return Err(self.rejected(format!(
                "the staged message {} of branch {xid} is {len} bytes, {bytes} were written: it was changed by hand; roll the transaction back",
                file.display()
            )));
        }
        sync_file(&self.name, &opened, file)
    }
}

/// A refused message: names the resource, the branch and the message's position.
pub(super) fn refused(resource: &str, at: At, e: &MessageError) -> ResourceError {
    let At { xid, pos } = at;
    ResourceError::rejected(
        resource,
        format!("message {pos} of branch {xid} refused: {e}"),
    )
}

pub(super) fn create_new(name: &str, what: &str, path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ResourceError::io(name, &format!("create {what}"), path, &e))
}

/// Writes `content` to `path`, created or truncated (a file an earlier attempt left there is
/// written again), without syncing it: the caller syncs it (with others) before it counts.
pub(super) fn overwrite_unsynced(
    name: &str,
    what: &str,
    path: &Path,
    content: &[u8],
) -> Result<File> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| ResourceError::io(name, &format!("create {what} file"), path, &e))?;
    file.write_all(content)
        .map_err(|e| ResourceError::io(name, &format!("write {what} to"), path, &e))?;
    Ok(file)
}

/// Writes `content` to `path`, created or truncated (a file an earlier attempt left there is
/// written again), and syncs it. The files resource's `create_synced` differs: it refuses an
/// existing file.
pub(super) fn overwrite_synced(name: &str, what: &str, path: &Path, content: &[u8]) -> Result<()> {
    let file = overwrite_unsynced(name, what, path, content)?;
    sync_file(name, &file, path)
}
