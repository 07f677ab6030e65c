//! `concord bench commit --resource files,mail,kv`: transactions of three branches — a file, a
//! mail and a key — against the same three writes made without coordination.
//!
//! Each transaction writes one [`FILE_BYTES`] file in the files resource `files`, enqueues one
//! message of about [`FILE_BYTES`] in the mail queue `mail` (a Maildir) and inserts one key with
//! a [`FILE_BYTES`] value in the kv resource `index` (a sled directory). Every client writes
//! names and keys of its own, so no two transactions conflict.
//!
//! The baseline is what an application that does not need atomicity does with the same stores:
//! the same three writes, one after the other, each as durable as its store makes it by itself,
//! and nothing more:
//!
//! 1. the file: created in place, written, `fsync`ed;
//! 2. the mail: delivered as a plain MTA delivers to a Maildir — written to `tmp/<unique>`,
//!    `fsync`ed, renamed to `new/<unique>` (qmail's and Postfix's protocol; neither `fsync`s
//!    `new/`);
//! 3. the key: inserted into a sled database (one for the whole run, opened once), then sled's
//!    own `flush` (which on Linux ends in `sync_file_range`, not `fdatasync`).
//!
//! As in the files benchmark, baseline and concord take turns for [`ROUNDS`] rounds, and each
//! concord window is followed by a wait until its phase 2 is done, which counts as concord's time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use participant::{Concord, Config, MessageBuilder, ResourceConfig};

use crate::bench_load::{FILE_BYTES, Measured, ROUNDS, load};

/// The benchmark's files resource, mail queue and kv resource.
const FILES: &str = "files";
const MAIL: &str = "mail";
const INDEX: &str = "index";

/// The benchmark at `clients`: [`ROUNDS`] rounds of a baseline window then a concord window.
pub(crate) async fn rounds(
    dir: &Path,
    clients: usize,
    window: Duration,
) -> anyhow::Result<(Measured, Measured)> {
    let window = window / ROUNDS;
    let message: Arc<[u8]> = Arc::from(message()?);
    let baseline_stores = Arc::new(Baseline::create(&dir.join("baseline")).await?);
    let concord = open_concord(&dir.join("concord")).await?;
    let mut baseline = Measured::default();
    let mut measured = Measured::default();
    for round in 0..ROUNDS {
        let stores = Arc::clone(&baseline_stores);
        baseline.add(baseline_window(stores, &message, round, clients, window).await?);
        let started = Instant::now();
        let mut run = concord_window(&concord, &message, round, clients, window).await?;
        if !concord.wait_idle(Duration::from_secs(60)).await {
            bail!("phase 2 of the benchmark's transactions did not finish within 60 s");
        }
        run.elapsed = started.elapsed();
        measured.add(run);
    }
    concord.close(Duration::from_secs(30)).await;
    Ok((baseline, measured))
}

/// A message of about [`FILE_BYTES`] bytes, CRLF line endings.
pub(crate) fn message() -> anyhow::Result<Vec<u8>> {
    let line = "The quick brown fox jumps over the lazy dog, again and again.\n";
    let body = line.repeat(FILE_BYTES / 2 / line.len());
    let built = MessageBuilder::new()
        .from("Shop <shop@example.org>")
        .to("customer@example.org")
        .subject("Your order")
        .message_id("<bench@concord.invalid>")
        .body(body)
        .build()?;
    let mut message = built;
    // Pad the body to the size (the builder's header is about 250 bytes).
    while message.len() + line.len() + 1 < FILE_BYTES {
        message.extend_from_slice(line.trim_end().as_bytes());
        message.extend_from_slice(b"\r\n");
    }
    Ok(message)
}

/// The baseline's stores: a directory of files, a Maildir and a sled database.
struct Baseline {
    files: PathBuf,
    maildir: PathBuf,
    sled: sled::Db,
}

impl Baseline {
    async fn create(dir: &Path) -> anyhow::Result<Baseline> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let files = dir.join("files");
            let maildir = dir.join("maildir");
            for sub in [files.clone(), maildir.join("tmp"), maildir.join("new")] {
                std::fs::create_dir_all(&sub)
                    .with_context(|| format!("create {}", sub.display()))?;
            }
            std::fs::create_dir_all(maildir.join("cur"))?;
            let sled = sled::Config::new()
                .path(dir.join("sled"))
                .open()
                .context("open the baseline's sled database")?;
            Ok(Baseline {
                files,
                maildir,
                sled,
            })
        })
        .await?
    }

    /// One transaction's three writes, as an application without coordination makes them.
    fn write(&self, name: &str, message: &[u8]) -> anyhow::Result<()> {
        let mut file = std::fs::File::create(self.files.join(name))?;
        std::io::Write::write_all(&mut file, &[7u8; FILE_BYTES])?;
        file.sync_all()?;

        let tmp = self.maildir.join("tmp").join(name);
        let mut mail = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        std::io::Write::write_all(&mut mail, message)?;
        mail.sync_all()?;
        std::fs::rename(&tmp, self.maildir.join("new").join(name))?;

        self.sled.insert(name.as_bytes(), &[7u8; FILE_BYTES][..])?;
        self.sled.flush()?;
        Ok(())
    }
}

async fn baseline_window(
    stores: Arc<Baseline>,
    message: &Arc<[u8]>,
    round: u32,
    clients: usize,
    window: Duration,
) -> anyhow::Result<Measured> {
    let message = Arc::clone(message);
    load(clients, window, move |client, n| {
        let (stores, message) = (Arc::clone(&stores), Arc::clone(&message));
        async move {
            tokio::task::spawn_blocking(move || {
                // A Maildir name: time.unique.host, unique per client and transaction.
                stores.write(&format!("1.r{round}c{client}n{n}.bench"), &message)
            })
            .await?
        }
    })
    .await
}

async fn open_concord(dir: &Path) -> anyhow::Result<Concord> {
    let mut config = Config::embedded(dir);
    config.resources.clear();
    let resources = [
        (
            FILES,
            ResourceConfig::Files {
                root: dir.join(FILES),
                create: true,
                lock_wait_ms: 5_000,
            },
        ),
        (
            MAIL,
            ResourceConfig::Mail {
                maildir: dir.join(MAIL),
                create: true,
                max_message_bytes: 1 << 20,
            },
        ),
        (
            INDEX,
            ResourceConfig::Kv {
                dir: dir.join(INDEX),
                create: true,
                lock_wait_ms: 5_000,
                value_bytes_max: 1 << 20,
            },
        ),
    ];
    for (name, resource) in resources {
        config.resources.insert(name.to_string(), resource);
    }
    Ok(Concord::open(config).await?)
}

async fn concord_window(
    concord: &Concord,
    message: &Arc<[u8]>,
    round: u32,
    clients: usize,
    window: Duration,
) -> anyhow::Result<Measured> {
    let (c, message) = (concord.clone(), Arc::clone(message));
    load(clients, window, move |client, n| {
        let (concord, message) = (c.clone(), Arc::clone(&message));
        async move {
            let name = format!("r{round}-c{client}-{n}");
            files_mail_kv(&concord, [FILES, MAIL, INDEX], &name, &message).await
        }
    })
    .await
}

/// One transaction of the files,mail,kv workload: a [`FILE_BYTES`] file `name` in the files
/// resource, `message` in the mail queue and the key `name` with a [`FILE_BYTES`] value in the
/// kv resource (`stores`: their names, in that order).
pub(crate) async fn files_mail_kv(
    concord: &Concord,
    stores: [&str; 3],
    name: &str,
    message: &[u8],
) -> anyhow::Result<()> {
    let [files, mail, kv] = stores;
    let mut tx = concord.begin().await?;
    tx.files(files)
        .await?
        .put(name, &[7u8; FILE_BYTES][..])
        .await?;
    tx.mail(mail).await?.enqueue(message).await?;
    tx.kv(kv)
        .await?
        .insert(name.as_bytes(), &[7u8; FILE_BYTES])
        .await?;
    tx.commit().await?;
    Ok(())
}
