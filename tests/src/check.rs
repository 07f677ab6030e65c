//! The checker: are both sites equal, resource by resource and key by key?
//!
//! [`wait_caught_up`] first waits (with a deadline) until the standby's `concord status --json`
//! shows `replication.replayed_lsn` at or above the primary's `replication.durable_lsn`. Then,
//! after both processes are stopped, [`Snapshot::take`] reads each site's stores offline, the
//! way the contract's `Resource::inventory` keys them, and [`Snapshot::differences`] lists
//! every difference as `resource key: what`:
//! * `uploads` — every file under the root but concord's private area (`.concord`), by its
//!   `/`-separated relative path, digest blake3 of the bytes;
//! * `mail` — every message file of `new/` and `cur/`, by its file name, blake3 of the bytes
//!   (a message delivered twice under two names shows as a count difference too);
//! * `index` — every key of the sled directory's data tree (`adapters::kv::DATA_TREE`), in
//!   lower-case hex, blake3 of the value;
//! * `orders` — every row of `public.orders`, keyed `public.orders/<id>`, blake3 of the row as
//!   PostgreSQL's `row_to_json` text.
//!
//! [`inventory_differences`] compares the same stopped sites through the contract instead:
//! each site's resources opened from its `concord.toml` (`adapters::config::Config::load` and
//! `open_all`) and their `Resource::inventory()` compared key by key.
//!
//! [`compare_online`] runs `concord compare` on both running nodes, and [`compare_offline`] on
//! both stopped sites' configurations: the product's own check, beside the test's.
//!
//! Implementation caveats: the snapshot reads the stores directly rather than through
//! `Resource::inventory`, so that it does not trust the code under test to list its own data;
//! a half-written file shows as a digest difference.

use std::collections::BTreeMap;
use std::path::Path;

use crate::process::{self, POLL_MS};
use crate::site::Site;
use crate::workload::Acked;

/// How long a standby may take to replay what the primary has durable.
pub const CATCH_UP_MS_MAX: u64 = 60_000;

/// How long a `concord compare` run may take.
pub const COMPARE_MS_MAX: u64 = 120_000;

/// Every key of every resource of one site, with its digest.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Resource name → key → digest.
    pub resources: BTreeMap<String, BTreeMap<String, [u8; 32]>>,
}

impl Snapshot {
    /// Reads the stopped `site`'s stores.
    pub fn take(site: &Site) -> Snapshot {
        let data = site.data_dir();
        let mut resources = BTreeMap::new();
        resources.insert("uploads".to_string(), files(&data.join("uploads")));
        resources.insert("mail".to_string(), mail(&data.join("mail")));
        resources.insert("index".to_string(), kv(&data.join("index")));
        if site.pg().is_some() {
            let rows = site
                .orders_rows()
                .into_iter()
                .map(|(id, row)| (format!("public.orders/{id}"), digest(row.as_bytes())))
                .collect();
            resources.insert("orders".to_string(), rows);
        }
        Snapshot { resources }
    }

    /// Every file under `dir` by relative path, as one resource named after the directory
    /// (a journal's segments, to see that a refusal changed nothing).
    pub fn take_dir(dir: &Path) -> Snapshot {
        let name = dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut resources = BTreeMap::new();
        resources.insert(name, files(dir));
        Snapshot { resources }
    }

    /// Every difference between this (the primary) and `standby`, by resource and key.
    pub fn differences(&self, standby: &Snapshot) -> Vec<String> {
        let mut found = Vec::new();
        let empty = BTreeMap::new();
        for (name, primary) in &self.resources {
            let other = standby.resources.get(name).unwrap_or(&empty);
            for (key, d) in primary {
                match other.get(key) {
                    None => found.push(format!("{name} {key}: only on the primary")),
                    Some(o) if o != d => found.push(format!("{name} {key}: contents differ")),
                    Some(_) => {}
                }
            }
            for key in other.keys().filter(|k| !primary.contains_key(*k)) {
                found.push(format!("{name} {key}: only on the standby"));
            }
        }
        found
    }

    /// The number of keys of `resource`.
    pub fn count(&self, resource: &str) -> usize {
        self.resources.get(resource).map_or(0, BTreeMap::len)
    }

    /// Whether `resource` has `key` with `digest`.
    pub fn has(&self, resource: &str, key: &str, digest: Option<[u8; 32]>) -> bool {
        let found = self.resources.get(resource).and_then(|keys| keys.get(key));
        match (found, digest) {
            (Some(found), Some(digest)) => *found == digest,
            (found, None) => found.is_some(),
            (None, Some(_)) => false,
        }
    }

    /// What of `acked` is missing here (after a sync-mode failover, the standby must hold all).
    pub fn missing(&self, acked: &Acked) -> Vec<String> {
        let mut missing = Vec::new();
        let key = hex(&acked.key);
        let checks = [
            ("uploads", acked.file.clone(), Some(acked.file_digest)),
            ("mail", acked.mail.clone(), None),
            ("index", key, Some(digest(&acked.value))),
        ];
        for (resource, key, digest) in checks {
            if !self.has(resource, &key, digest) {
                missing.push(format!("{} ({}): {resource} {key}", acked.xid, acked.i));
            }
        }
        if let Some(id) = acked.order_id
            && !self.has("orders", &format!("public.orders/{id}"), None)
        {
            missing.push(format!("{} ({}): orders row {id}", acked.xid, acked.i));
        }
        missing
    }
}

/// Panics with every difference unless the stopped sites are equal, read directly
/// ([`Snapshot`]) and through `Resource::inventory` ([`inventory_differences`]); returns the
/// direct snapshots.
pub fn assert_sites_equal(primary: &Site, standby: &Site) -> (Snapshot, Snapshot) {
    let (p, s) = (Snapshot::take(primary), Snapshot::take(standby));
    let mut found = p.differences(&s);
    found.extend(
        inventory_differences(primary, standby)
            .into_iter()
            .map(|d| format!("inventory: {d}")),
    );
    let shown: Vec<&String> = found.iter().take(40).collect();
    assert!(
        found.is_empty(),
        "the sites differ in {} keys (first 40): {shown:#?}",
        found.len()
    );
    (p, s)
}

/// The inventories of every resource of a stopped site, by resource name.
pub fn inventories(site: &Site) -> BTreeMap<String, BTreeMap<String, [u8; 32]>> {
    let config = adapters::config::Config::load(&site.config_path())
        .unwrap_or_else(|e| panic!("load {}'s configuration: {e}", site.name));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a runtime");
    runtime.block_on(async {
        let resources = adapters::config::open_all(&config)
            .await
            .unwrap_or_else(|e| panic!("open {}'s resources: {e}", site.name));
        let mut all = BTreeMap::new();
        for resource in resources {
            let entries = resource
                .inventory()
                .await
                .unwrap_or_else(|e| panic!("{}: inventory of {}: {e}", site.name, resource.name()));
            let keys = entries.into_iter().map(|e| (e.key, e.digest)).collect();
            all.insert(resource.name().to_string(), keys);
        }
        all
    })
}

/// Every difference between the stopped sites' inventories, by resource and key.
pub fn inventory_differences(primary: &Site, standby: &Site) -> Vec<String> {
    let p = Snapshot {
        resources: inventories(primary),
    };
    let s = Snapshot {
        resources: inventories(standby),
    };
    p.differences(&s)
}

/// blake3 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under `root` but `.concord`, by `/`-separated relative path, with its digest.
pub fn files(root: &Path) -> BTreeMap<String, [u8; 32]> {
    let mut found = BTreeMap::new();
    walk(root, "", &mut found);
    found
}

fn walk(dir: &Path, prefix: &str, found: &mut BTreeMap<String, [u8; 32]>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("list {}: {e}", dir.display()));
        let name = entry.file_name().to_string_lossy().into_owned();
        if prefix.is_empty() && name == ".concord" {
            continue;
        }
        let key = format!("{prefix}{name}");
        let path = entry.path();
        if path.is_dir() {
            walk(&path, &format!("{key}/"), found);
        } else {
            found.insert(key, file_digest(&path));
        }
    }
}

fn file_digest(path: &Path) -> [u8; 32] {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    digest(&bytes)
}

fn mail(maildir: &Path) -> BTreeMap<String, [u8; 32]> {
    let mut found = BTreeMap::new();
    for sub in ["new", "cur"] {
        let dir = maildir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("list {}: {e}", dir.display()));
            let name = entry.file_name().to_string_lossy().into_owned();
            let twice = found.insert(name.clone(), file_digest(&entry.path()));
            assert!(twice.is_none(), "mail {name} is in both new/ and cur/");
        }
    }
    found
}

/// Every key of the sled directory's data tree, in lower-case hex, with its value's digest.
pub fn kv(dir: &Path) -> BTreeMap<String, [u8; 32]> {
    if !dir.exists() {
        return BTreeMap::new();
    }
    let db = sled::open(dir).unwrap_or_else(|e| panic!("open sled {}: {e}", dir.display()));
    let data = db
        .open_tree(adapters::kv::DATA_TREE)
        .unwrap_or_else(|e| panic!("open the data tree of {}: {e}", dir.display()));
    data.iter()
        .map(|item| {
            let (key, value) = item.unwrap_or_else(|e| panic!("read sled {}: {e}", dir.display()));
            (hex(&key), digest(&value))
        })
        .collect()
}

/// `replication.<field>` of a status, as a number.
pub fn replication_lsn(status: &serde_json::Value, field: &str) -> Option<u64> {
    status.get("replication")?.get(field)?.as_u64()
}

/// `replication.connected` of a status.
pub fn connected(status: &serde_json::Value) -> Option<bool> {
    status.get("replication")?.get("connected")?.as_bool()
}

/// Waits until the standby's `replayed_lsn` reaches the primary's `durable_lsn`, at most
/// [`CATCH_UP_MS_MAX`]; panics with both statuses otherwise.
pub fn wait_caught_up(primary: &Site, standby: &Site) {
    let mut last = (None, None);
    let caught_up = process::wait_until(CATCH_UP_MS_MAX, || {
        let (p, s) = (primary.status(), standby.status());
        let durable = p.as_ref().and_then(|p| replication_lsn(p, "durable_lsn"));
        let replayed = s.as_ref().and_then(|s| replication_lsn(s, "replayed_lsn"));
        last = (p, s);
        std::thread::sleep(std::time::Duration::from_millis(POLL_MS * 5));
        matches!((durable, replayed), (Some(d), Some(r)) if r >= d)
    });
    assert!(
        caught_up,
        "the standby did not replay up to the primary's durable LSN within {CATCH_UP_MS_MAX} ms: primary {:?}, standby {:?}; standby stderr: {}",
        last.0,
        last.1,
        standby.process().stderr_tail()
    );
}

/// `concord compare --primary URL --standby URL --json` while both run (online, in rounds);
/// asserts exit 0.
pub fn compare_online(primary: &Site, standby: &Site) {
    let (p, s) = (primary.url(), standby.url());
    let args = ["compare", "--primary", &p, "--standby", &s, "--json"];
    run_compare(&args);
}

/// `concord compare --primary-config A --standby-config B --json` on the stopped sites;
/// asserts exit 0.
pub fn compare_offline(primary: &Site, standby: &Site) {
    let (a, b) = (primary.config_path(), standby.config_path());
    let args = [
        "compare",
        "--primary-config",
        a.to_str().expect("utf-8 path"),
        "--standby-config",
        b.to_str().expect("utf-8 path"),
        "--json",
    ];
    run_compare(&args);
}

fn run_compare(args: &[&str]) {
    let (code, stdout, stderr) = process::run_concord(args, COMPARE_MS_MAX);
    assert_eq!(code, Some(0), "concord {args:?}: {stdout}{stderr}");
}

/// Where the standby resumed an interrupted blob last (its INFO line "resuming an interrupted
/// blob at byte N"), if it did.
pub fn resumed_blob_offset(standby: &Site) -> Option<u64> {
    const LINE: &str = "resuming an interrupted blob at byte ";
    let stderr = standby.process().stderr_text();
    let at = stderr.rfind(LINE)? + LINE.len();
    let digits: String = stderr[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Whether the standby's status says its link to the primary is down.
pub fn is_disconnected(standby: &Site) -> bool {
    standby
        .status()
        .is_some_and(|s| connected(&s) == Some(false))
}
