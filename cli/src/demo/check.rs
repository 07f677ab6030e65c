//! The demo's independent check: it reads every store directly — the files resources' trees,
//! the Maildir's `new/` and `cur/`, the sled directory's trees and the PostgreSQL table — and
//! never asks concord what happened. What a transaction must have left is a function of its run
//! and number (`content`, `message_id`, `key_value` and the others in the parent module), so
//! the check needs no record of what was written beyond the run records and the
//! acknowledgements.
//!
//! For every transaction of every run found in the data directory, each of its parts (the three
//! files, the mail, the key, the order row — those its run had) is present with its exact
//! content, or all are absent; an acknowledged transaction is present; a deliberately failed one
//! is absent; no mail is delivered twice, and nothing in the Maildir is foreign or damaged; every
//! part a durable `Commit` record names is present; nothing is left staged (files staging,
//! Maildir `tmp/`) or prepared (branch logs, sled's prepared tree, `pg_prepared_xacts`).
//!
//! The sled directory is read with sled itself, after the demo's concord is closed: sled 0.34
//! has no read-only mode, so the check opens it (waiting, bounded, for the lock the closed
//! instance's background thread may still hold for a moment) and only reads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use coordinator::ledger::Ledger;

use super::{
    FILES, INDEX, MAIL, PG_RESOURCE, content, key, key_prefix, key_value, mail_body, mail_subject,
    message_id,
};

/// How long the check waits for the sled directory's lock after the demo's concord closed.
const SLED_OPEN_WAIT: Duration = Duration::from_secs(10);
/// A file in the Maildir larger than this is not one of the demo's messages.
const MAIL_BYTES_MAX: u64 = 64 << 10;

/// One run, as recorded in `runs/<run>`: `<transactions> <fail-every> [mail] [kv] [postgres]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub(super) transactions: u64,
    pub(super) fail_every: u64,
    pub(super) mail: bool,
    pub(super) kv: bool,
    pub(super) postgres: bool,
}

impl Run {
    /// The run record's text.
    pub(super) fn record(&self) -> String {
        let mut text = format!("{} {}", self.transactions, self.fail_every);
        for (flag, set) in [
            ("mail", self.mail),
            ("kv", self.kv),
            ("postgres", self.postgres),
        ] {
            if set {
                text.push(' ');
                text.push_str(flag);
            }
        }
        text.push('\n');
        text
    }

    fn parse(text: &str) -> Option<Run> {
        let mut fields = text.split_whitespace();
        let transactions = fields.next()?.parse().ok()?;
        let fail_every = fields.next()?.parse().ok()?;
        let mut run = Run {
            transactions,
            fail_every,
            mail: false,
            kv: false,
            postgres: false,
        };
        for flag in fields {
            match flag {
                "mail" => run.mail = true,
                "kv" => run.kv = true,
                "postgres" => run.postgres = true,
                _ => return None,
            }
        }
        Some(run)
    }

    fn failed(&self, i: u64) -> bool {
        self.fail_every > 0 && i % self.fail_every == self.fail_every - 1
    }
}

/// What the check knows of the PostgreSQL branch: the order rows present, and the demo's
/// branches still prepared there.
pub(super) struct Orders {
    pub(super) rows: HashSet<(String, u64)>,
    pub(super) prepared: usize,
}

/// What the check read from the mail queue and the kv store.
struct Stores {
    /// Deliveries of each demo transaction's mail (in `new/` or `cur/`), with correct content.
    mails: HashMap<(String, u64), u32>,
    /// The Maildir names of every delivered message (the part of a `cur/` name before `:`).
    mail_names: HashSet<String>,
    /// The kv data tree.
    keys: HashMap<Vec<u8>, Vec<u8>>,
}

/// The outcome: the transactions that ran, per run, and every problem found.
pub(super) struct Report {
    /// For each run, the transactions that ran (see [`ran`]).
    pub(super) ran: BTreeMap<String, u64>,
    pub(super) problems: Vec<String>,
}

/// The name of the file in `acks/<run>/` that marks a run whose every transaction returned.
pub(super) const FINISHED: &str = "finished";

/// Runs the whole check on the data directory `data` (the demo's concord must be closed).
pub(super) fn check(data: &Path, orders: Option<&Orders>) -> anyhow::Result<Report> {
    let mut problems = Vec::new();
    let stores = read_stores(data, &mut problems)?;
    let runs = read_runs(data, &mut problems)?;
    let mut report = Report {
        ran: BTreeMap::new(),
        problems: Vec::new(),
    };
    for (run_id, run) in &runs {
        if run.postgres && orders.is_none() {
            problems.push(format!(
                "run {run_id} had a PostgreSQL branch: check it with --postgres URL"
            ));
        }
        let finished = data.join("acks").join(run_id).join(FINISHED).exists();
        let started = match finished {
            true => run.transactions,
            false => started_at_most(data, run_id, &stores, orders).min(run.transactions),
        };
        let mut committed_below = 0;
        for i in 0..started {
            if check_transaction(data, run_id, run, i, &stores, orders, &mut problems) {
                committed_below = i + 1;
            }
        }
        report
            .ran
            .insert(run_id.clone(), ran(finished, run, committed_below));
    }
    check_leftovers(data, orders, &mut problems)?;
    check_decisions(data, &stores, orders, &mut problems)?;
    report.problems = problems;
    Ok(report)
}

/// The transactions of a run that ran (committed or rolled back): every one of a run that
/// finished; of a run killed midway, every one up to its highest committed one
/// (`committed_below` is that number plus one). Clients take transaction numbers in order, so
/// each of those started, and each committed or was rolled back; what a killed run started
/// after its highest committed transaction left nothing in the data and is not counted.
fn ran(finished: bool, run: &Run, committed_below: u64) -> u64 {
    match finished {
        true => run.transactions,
        false => committed_below,
    }
}

/// One more than the highest transaction number of `run_id` with any part in the stores: no
/// transaction of a killed run above it left anything to check.
fn started_at_most(data: &Path, run_id: &str, stores: &Stores, orders: Option<&Orders>) -> u64 {
    let files = FILES.iter().flat_map(|(resource, _)| {
        let dir = data.join(resource).join("tx").join(run_id);
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
    });
    let mails = stores
        .mails
        .keys()
        .filter(|(run, _)| run == run_id)
        .map(|(_, i)| *i);
    let prefix = key_prefix(run_id);
    let keys = stores.keys.keys().filter_map(|k| {
        let i = k.strip_prefix(prefix.as_bytes())?;
        std::str::from_utf8(i).ok()?.parse().ok()
    });
    let rows = orders
        .into_iter()
        .flat_map(|o| o.rows.iter())
        .filter(|(run, _)| run == run_id)
        .map(|(_, i)| *i);
    files
        .chain(mails)
        .chain(keys)
        .chain(rows)
        .max()
        .map_or(0, |i| i.saturating_add(1))
}

fn read_runs(data: &Path, problems: &mut Vec<String>) -> anyhow::Result<BTreeMap<String, Run>> {
    let dir = data.join("runs");
    let mut runs = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry?;
        let text = std::fs::read_to_string(entry.path())?;
        match Run::parse(&text) {
            Some(run) => {
                runs.insert(entry.file_name().to_string_lossy().to_string(), run);
            }
            None => problems.push(format!("{}: not a run record", entry.path().display())),
        }
    }
    Ok(runs)
}

/// One transaction: all of its parts or none, acknowledged ones present, failed ones absent, its
/// mail at most once. True when all of its parts are present (it committed).
fn check_transaction(
    data: &Path,
    run_id: &str,
    run: &Run,
    i: u64,
    stores: &Stores,
    orders: Option<&Orders>,
    problems: &mut Vec<String>,
) -> bool {
    let mut present: Vec<(&str, bool)> = FILES
        .iter()
        .map(|(resource, name)| {
            let path = data.join(resource).join(format!("tx/{run_id}/{i}/{name}"));
            let found = std::fs::read(&path)
                .map(|c| c == content(run_id, i, name))
                .unwrap_or(false);
            (*resource, found)
        })
        .collect();
    if run.mail {
        let delivered = stores
            .mails
            .get(&(run_id.to_string(), i))
            .copied()
            .unwrap_or(0);
        if delivered > 1 {
            problems.push(format!(
                "run {run_id} transaction {i}: its mail was delivered {delivered} times"
            ));
        }
        present.push((MAIL, delivered > 0));
    }
    if run.kv {
        let value = stores.keys.get(key(run_id, i).as_bytes());
        present.push((INDEX, value.is_some_and(|v| *v == key_value(run_id, i))));
    }
    if let (true, Some(orders)) = (run.postgres, orders) {
        present.push((PG_RESOURCE, orders.rows.contains(&(run_id.to_string(), i))));
    }
    let all = present.iter().all(|(_, p)| *p);
    let none = present.iter().all(|(_, p)| !*p);
    if !all && !none {
        problems.push(format!(
            "run {run_id} transaction {i}: partly present {present:?}"
        ));
    }
    let acked = data.join("acks").join(run_id).join(i.to_string()).exists();
    if acked && !all {
        problems.push(format!(
            "run {run_id} transaction {i}: acknowledged but not present {present:?}"
        ));
    }
    if run.failed(i) && !none {
        problems.push(format!(
            "run {run_id} transaction {i}: failed on purpose but present {present:?}"
        ));
    }
    all
}

/// Reads the Maildir and the sled data tree (a store that does not exist reads as empty).
fn read_stores(data: &Path, problems: &mut Vec<String>) -> anyhow::Result<Stores> {
    let mut stores = Stores {
        mails: HashMap::new(),
        mail_names: HashSet::new(),
        keys: HashMap::new(),
    };
    read_maildir(&data.join(MAIL), &mut stores, problems)?;
    let index = data.join(INDEX);
    if index.join("db").is_file() {
        let db = open_sled(&index)?;
        if let Some(tree) = sled_tree(&db, adapters::kv::DATA_TREE)? {
            for item in tree.iter() {
                let (k, v) = item.with_context(|| format!("read sled {}", index.display()))?;
                stores.keys.insert(k.to_vec(), v.to_vec());
            }
        }
        if let Some(tree) = sled_tree(&db, adapters::kv::PREPARED_TREE)?
            && !tree.is_empty()
        {
            problems.push(format!(
                "{}: {} branches left prepared in sled's prepared tree",
                index.display(),
                tree.len()
            ));
        }
    }
    Ok(stores)
}

/// Every message in `new/` and `cur/`: each must be one of the demo's, intact.
fn read_maildir(
    maildir: &Path,
    stores: &mut Stores,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    for sub in ["new", "cur"] {
        let dir = maildir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("list {}", dir.display()))?;
            let file_name = entry.file_name().to_string_lossy().to_string();
            if file_name.starts_with('.') {
                continue;
            }
            let base = file_name.split(':').next().unwrap_or_default().to_string();
            if !stores.mail_names.insert(base) {
                problems.push(format!(
                    "{}: the same message name is in new/ and cur/",
                    entry.path().display()
                ));
            }
            let mut message = Vec::new();
            std::fs::File::open(entry.path())
                .and_then(|f| f.take(MAIL_BYTES_MAX + 1).read_to_end(&mut message))
                .with_context(|| format!("read {}", entry.path().display()))?;
            match demo_mail(&message) {
                Some(id) => *stores.mails.entry(id).or_insert(0) += 1,
                None => problems.push(format!(
                    "{}: not one of the demo's messages, or damaged",
                    entry.path().display()
                )),
            }
        }
    }
    Ok(())
}

/// The run and transaction of a demo message, when its Message-ID, Subject and body are exactly
/// what that transaction enqueued.
fn demo_mail(message: &[u8]) -> Option<(String, u64)> {
    if message.len() as u64 > MAIL_BYTES_MAX {
        return None;
    }
    let text = std::str::from_utf8(message).ok()?;
    let (header, body) = text.split_once("\r\n\r\n")?;
    let field = |name: &str| {
        header
            .split("\r\n")
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect::<Vec<_>>()
    };
    let [id] = field("Message-ID")[..] else {
        return None;
    };
    let (run_id, i) = parse_message_id(id)?;
    let [subject] = field("Subject")[..] else {
        return None;
    };
    let body_expected = mail_body(&run_id, i).replace('\n', "\r\n");
    let intact = subject == mail_subject(&run_id, i) && body == body_expected;
    intact.then_some((run_id, i))
}

/// The run and transaction of a demo Message-ID (`<run.i@…>`, see [`message_id`]).
fn parse_message_id(id: &str) -> Option<(String, u64)> {
    let inner = id.strip_prefix('<')?.strip_suffix('>')?;
    let (left, _) = inner.split_once('@')?;
    let (run_id, i) = left.split_once('.')?;
    let i: u64 = i.parse().ok()?;
    (message_id(run_id, i) == id).then(|| (run_id.to_string(), i))
}

/// Nothing staged or prepared anywhere.
fn check_leftovers(
    data: &Path,
    orders: Option<&Orders>,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    for (resource, _) in FILES {
        let staging = data.join(resource).join(".concord").join("staging");
        if let Ok(entries) = std::fs::read_dir(&staging)
            && entries.count() > 0
        {
            problems.push(format!("{}: staging is not empty", staging.display()));
        }
        let root = data.join(resource);
        let prepared = adapters::files::prepared_on_disk(&root)?;
        if !prepared.is_empty() {
            problems.push(format!(
                "{}: {} branches left prepared",
                root.display(),
                prepared.len()
            ));
        }
    }
    let maildir = data.join(MAIL);
    let tmp = maildir.join("tmp");
    if let Ok(entries) = std::fs::read_dir(&tmp)
        && entries.count() > 0
    {
        problems.push(format!("{}: messages left staged in tmp/", tmp.display()));
    }
    let prepared = adapters::mail::prepared_on_disk(&maildir)?;
    if !prepared.is_empty() {
        problems.push(format!(
            "{}: {} branches left prepared",
            maildir.display(),
            prepared.len()
        ));
    }
    if let Some(orders) = orders
        && orders.prepared > 0
    {
        problems.push(format!(
            "{} branches of the {PG_RESOURCE} resource left prepared in PostgreSQL",
            orders.prepared
        ));
    }
    Ok(())
}

/// Every part a committed transaction names (a `Commit` record, or a `OnePhase` record with its
/// `End`, as the ledger reports them) — decided transactions, acknowledged to their
/// client or not — must be present: recovery may never roll back a decision.
fn check_decisions(
    data: &Path,
    stores: &Stores,
    orders: Option<&Orders>,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let journal_dir = data.join("journal");
    let record_bytes_max = journal::JournalConfig::default().record_bytes_max;
    let mut ledger = Ledger::new();
    let mut unreadable = None;
    journal::scan::scan_dir(&journal_dir, record_bytes_max, |rec| {
        let committed = match ledger.apply_raw(rec.lsn, rec.kind, &rec.payload) {
            Ok(Some(committed)) => committed,
            Ok(None) => return,
            Err(e) => {
                unreadable.get_or_insert(e);
                return;
            }
        };
        let xid = committed.xid;
        for (resource, redo) in committed.writers {
            let missing = match resource.as_str() {
                PG_RESOURCE => missing_orders(&redo, orders),
                MAIL => missing_mails(&redo, stores),
                INDEX => missing_keys(&redo, stores),
                r if FILES.iter().any(|(f, _)| *f == r) => missing_files(data, r, &redo),
                _ => continue,
            };
            problems.extend(
                missing
                    .into_iter()
                    .map(|m| format!("{xid}: decided, but {m}")),
            );
        }
    })?;
    if let Some(e) = unreadable {
        problems.push(format!(
            "the journal holds a record the check cannot read: {e}"
        ));
    }
    Ok(())
}

fn missing_files(data: &Path, resource: &str, redo: &[u8]) -> Vec<String> {
    let Ok(entries) = adapters::files::decode_redo(redo) else {
        return vec![format!("the redo of {resource} does not decode")];
    };
    entries
        .into_iter()
        .filter_map(|entry| match entry {
            adapters::files::RedoEntry::Put { path, .. }
            | adapters::files::RedoEntry::PutInline { path, .. } => Some(path),
            _ => None,
        })
        .filter(|path| !data.join(resource).join(path).is_file())
        .map(|path| format!("{resource}/{path} is missing"))
        .collect()
}

fn missing_mails(redo: &[u8], stores: &Stores) -> Vec<String> {
    let Ok(entries) = adapters::mail::decode_redo(redo) else {
        return vec![format!("the redo of {MAIL} does not decode")];
    };
    entries
        .iter()
        .map(|entry| entry.name())
        .filter(|name| !stores.mail_names.contains(*name))
        .map(|name| format!("message {name} is in neither {MAIL}/new nor {MAIL}/cur"))
        .collect()
}

fn missing_keys(redo: &[u8], stores: &Stores) -> Vec<String> {
    let Ok(writes) = adapters::kv::decode_batch(redo) else {
        return vec![format!("the redo of {INDEX} does not decode")];
    };
    writes
        .into_iter()
        .filter_map(|write| match write {
            adapters::kv::KvWrite::Insert { key, value } => {
                (stores.keys.get(&key) != Some(&value)).then_some(key)
            }
            adapters::kv::KvWrite::Remove { .. } => None,
        })
        .map(|key| {
            format!(
                "key {:?} of {INDEX} is missing",
                key.escape_ascii().to_string()
            )
        })
        .collect()
}

/// Every order row a decided transaction's PostgreSQL redo names must be present.
fn missing_orders(redo: &[u8], orders: Option<&Orders>) -> Vec<String> {
    let Some(orders) = orders else {
        return vec![format!(
            "it has a PostgreSQL branch: check it with --postgres URL"
        )];
    };
    let rows = match adapters::postgres::decode_redo(redo) {
        Ok(rows) => rows,
        Err(e) => return vec![format!("the redo of {PG_RESOURCE} does not decode: {e}")],
    };
    rows.into_iter()
        .filter(|(_, op, _, _)| op == "U")
        .map(|(_, _, pk, row)| {
            // The key, or the row image that holds it (schema version 2 leaves it there).
            let key = if pk.is_object() { pk } else { row };
            let run = key
                .get("run")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            let i = key.get("i").and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
            (run, i)
        })
        .filter(|row| !orders.rows.contains(row))
        .map(|(run, i)| format!("order ({run}, {i}) is missing"))
        .collect()
}

/// Opens the sled directory `dir` with sled itself, waiting (at most [`SLED_OPEN_WAIT`]) for
/// the lock the demo's closed instance may still hold for a moment.
fn open_sled(dir: &Path) -> anyhow::Result<sled::Db> {
    let started = Instant::now();
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < SLED_OPEN_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!("open the sled directory {}: {e}", dir.display()),
        }
    }
}

/// The tree `name`, when the database has it (opening a missing tree would create it).
fn sled_tree(db: &sled::Db, name: &str) -> anyhow::Result<Option<sled::Tree>> {
    if !db
        .tree_names()
        .iter()
        .any(|t| t.as_ref() == name.as_bytes())
    {
        return Ok(None);
    }
    Ok(Some(db.open_tree(name)?))
}
