//! What `journal inspect` and `journal verify` share: the directory check, the running tally of
//! valid records, the human summary of a scan, the JSON shape of a torn tail, the escaped form of
//! payload bytes, and the progress spinner.
//!
//! The human forms are aligned `key: value` lines meant for an operator; the JSON forms are
//! `serde` structs so that their field names are written down once. Paths are printed as given
//! on the command line joined with the segment name (lossily, when not UTF-8).
//!
//! # Implementation caveats
//!
//! * The spinner is drawn only when standard error is a terminal and the caller asks for it; it
//!   counts records, it does not estimate the time left.

use std::io::{self, IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, bail};
use coordinator::record::CoordRecord;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use journal::scan::{ScanReport, TornTail};
use journal::{ChainHash, Epoch, Lsn, Record};
use serde::Serialize;

/// Hex digits of a chain value shown in the human record listing.
pub const CHAIN_ABBREV_HEX_DIGITS: usize = 12;

/// Fails with a clear message unless `dir` is an existing directory that is not a data
/// directory.
///
/// The scan would fail too, but with the wording of the journal's own directory listing (a data
/// directory's `journal/` would read as a foreign file to move away); this says what an operator
/// needs to hear.
pub fn check_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            check_not_data_dir(dir)?;
            check_holds_a_journal(dir)
        }
        Ok(_) => bail!("journal path {} is not a directory", dir.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("journal directory {} does not exist", dir.display())
        }
        Err(e) => Err(e).with_context(|| format!("inspect journal directory {}", dir.display())),
    }
}

/// Fails when `dir` is a data directory, naming the journal directory inside it.
///
/// A data directory holds `journal/` beside the resources' directories; a journal directory
/// holds only segment files (and its lock and clean-close mark), never a `journal/`.
fn check_not_data_dir(dir: &Path) -> anyhow::Result<()> {
    let inner = dir.join("journal");
    if inner.is_dir() {
        bail!(
            "{} is a data directory, not a journal directory; its journal is {}: give that path",
            dir.display(),
            inner.display()
        );
    }
    Ok(())
}

/// Fails when `dir` holds no segment file but something a journal never holds (a resource's
/// directory, say), so that it is not taken for a journal with a foreign file to move away.
///
/// An empty directory, or one with only the journal's own lock, clean-close mark and temp
/// files, passes: the scan reports it as an empty journal. A directory that cannot be listed
/// passes too, and the scan says why.
fn check_holds_a_journal(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.iter().any(|n| n.ends_with(".seg")) {
        return Ok(());
    }
    names.sort();
    let journals_own =
        |n: &str| matches!(n, "LOCK" | "CLEAN" | "CLEAN.tmp") || n.ends_with(".seg.tmp");
    if let Some(other) = names.iter().find(|n| !journals_own(n)) {
        bail!(
            "{} is not a journal directory: it holds no segment file (NNNNNNNNNNNNNNNNNNNN.seg) and holds {other}, which a journal never holds; give the journal directory (`journal/` inside the data directory)",
            dir.display()
        );
    }
    Ok(())
}

/// The valid records seen so far by a scan: what is known even when the scan then fails.
#[derive(Debug, Default)]
pub struct Tally {
    /// Number of valid records.
    pub records: u64,
    /// LSN of the first one.
    pub first_lsn: Option<Lsn>,
    /// LSN of the last one.
    pub last_lsn: Option<Lsn>,
    /// The highest epoch.
    pub last_epoch: Epoch,
    /// The chain value after the last one.
    pub last_chain: ChainHash,
}

impl Tally {
    /// Counts one valid record.
    pub fn see(&mut self, rec: &Record) {
        self.records += 1;
        self.first_lsn.get_or_insert(rec.lsn);
        self.last_lsn = Some(rec.lsn);
        self.last_epoch = self.last_epoch.max(rec.epoch);
        self.last_chain = rec.chain;
    }

    /// `N[note] (lsn A..B)`, or `0[note]` for none.
    pub fn records_line(&self, note: &str) -> String {
        match (self.first_lsn, self.last_lsn) {
            (Some(first), Some(last)) => format!("{}{note} (lsn {first}..{last})", self.records),
            _ => format!("{}{note}", self.records),
        }
    }
}

/// The file name of a path, for short listings.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// Writes the human summary of a successful scan: segments, records, epoch, chain, leftovers and
/// the torn tail.
pub fn write_summary(out: &mut impl Write, report: &ScanReport, tally: &Tally) -> io::Result<()> {
    writeln!(out, "segments:    {}", segments_line(report))?;
    writeln!(out, "records:     {}", tally.records_line(""))?;
    writeln!(out, "last epoch:  {}", report.last_epoch)?;
    writeln!(out, "last chain:  {}", report.last_chain)?;
    if !report.leftovers.is_empty() {
        writeln!(
            out,
            "temp files:  {} left by an interrupted segment creation (removed at the next open)",
            report.leftovers.len()
        )?;
    }
    if let Some(tail) = &report.torn_tail {
        writeln!(out, "torn tail:   {}", torn_tail_line(tail))?;
    }
    Ok(())
}

fn segments_line(report: &ScanReport) -> String {
    match (report.segments.first(), report.segments.last()) {
        (Some(first), Some(last)) if report.segments.len() > 1 => format!(
            "{} ({} .. {})",
            report.segments.len(),
            file_name(&first.path),
            file_name(&last.path)
        ),
        (Some(only), _) => format!("1 ({})", file_name(&only.path)),
        _ => "0 (empty journal)".to_string(),
    }
}

/// `SEGMENT at byte offset N, B bytes (REASON); the next open truncates them`.
pub fn torn_tail_line(tail: &TornTail) -> String {
    format!(
        "{} at byte offset {}, {} bytes ({}); the next open truncates them",
        tail.segment.display(),
        tail.offset,
        tail.bytes,
        tail.reason
    )
}

/// A torn tail as JSON.
#[derive(Debug, Serialize)]
pub struct TornTailJson {
    /// The segment file.
    pub segment: String,
    /// Where the valid records end.
    pub offset: u64,
    /// Bytes after that offset.
    pub bytes: u64,
    /// The check the first discarded bytes failed.
    pub reason: String,
}

impl From<&TornTail> for TornTailJson {
    fn from(tail: &TornTail) -> Self {
        TornTailJson {
            segment: tail.segment.display().to_string(),
            offset: tail.offset,
            bytes: tail.bytes,
            reason: tail.reason.clone(),
        }
    }
}

/// The first hex digits of a chain value.
pub fn chain_abbrev(chain: &ChainHash) -> String {
    let mut hex = chain.to_hex();
    hex.truncate(CHAIN_ABBREV_HEX_DIGITS);
    hex
}

/// Bytes quoted and escaped as ASCII, whole.
pub fn escaped(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// The redo a coordinator record carries, per branch: `(resource, redo)`.
pub fn redo_of(record: &CoordRecord) -> Vec<(&str, &[u8])> {
    match record {
        CoordRecord::Commit { branches, .. } => branches
            .iter()
            .map(|(resource, redo)| (resource.as_str(), redo.as_slice()))
            .collect(),
        CoordRecord::OnePhase { resource, redo, .. } => vec![(resource.as_str(), redo.as_slice())],
        _ => Vec::new(),
    }
}

/// A spinner on standard error counting scanned records, or a hidden one when `wanted` is false or
/// standard error is not a terminal.
pub fn spinner(wanted: bool) -> ProgressBar {
    if !wanted || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {human_pos} records scanned") {
        bar.set_style(style);
    }
    bar
}

/// Standard output was closed by its reader (`| head`): the command stops, prints nothing more
/// and exits 141, as a process killed by `SIGPIPE` reports to a shell — not 0, which would say
/// the whole output was read.
#[derive(Debug)]
pub struct ClosedStdout;

impl std::fmt::Display for ClosedStdout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed by its reader")
    }
}

impl std::error::Error for ClosedStdout {}

/// Turns a failed write to standard output into the command's result: a closed pipe (`| head`)
/// is [`ClosedStdout`] (a quiet exit 141), anything else is an error.
pub fn stdout_result(result: io::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(ClosedStdout.into()),
        other => other.context("write to standard output"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_quotes_every_byte_as_ascii() {
        assert_eq!(escaped(b"hi\n\x00\""), r#""hi\n\x00\"""#);
        assert_eq!(escaped(&[b'a'; 40]), format!("\"{}\"", "a".repeat(40)));
    }

    #[test]
    fn the_chain_abbreviation_is_its_first_hex_digits() {
        assert_eq!(chain_abbrev(&ChainHash([0xcd; 32])), "cdcdcdcdcdcd");
    }

    #[test]
    fn tally_follows_the_records() {
        let mut tally = Tally::default();
        assert_eq!(tally.records_line(""), "0");
        for lsn in 4..=6 {
            tally.see(&Record {
                lsn: Lsn(lsn),
                epoch: Epoch(2),
                kind: journal::RecordKind::new(1, 1),
                payload: Vec::new(),
                chain: ChainHash([lsn as u8; 32]),
            });
        }
        assert_eq!(tally.records_line(" valid"), "3 valid (lsn 4..6)");
        assert_eq!(tally.last_chain, ChainHash([6; 32]));
    }
}
