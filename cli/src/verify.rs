//! `concord journal verify DIR`: is this journal sound?
//!
//! The check is the one opening a journal runs — every segment header continues the previous
//! segment, every record passes its length limit, crc, LSN and chain checks — done by
//! [`journal::scan::scan_dir`] without a lock and without changing anything. The verdicts:
//!
//! * **ok** — every byte is accounted for by valid records. Exit 0.
//! * **torn tail** — the last segment ends in an unfinished write, which the next open truncates;
//!   nothing acknowledged is lost. Exit 0, and the output names segment file, byte offset and the
//!   number of bytes.
//! * **corrupt** — damage in history that was durable; the journal refuses to open. Exit 3, the
//!   `error:` line names segment file and byte offset, and the summary counts the valid records
//!   before the damage.
//!
//! Anything that stops the check itself (a missing directory, a data directory given instead of
//! its `journal/`, a directory without segments that holds other things, a foreign file, a
//! newer format, an I/O error) is an `error:` line and exit 1; for a data directory the line
//! names the journal directory inside it.
//!
//! # Implementation caveats
//!
//! * Blobs are not checked here; they live in their own store and are checked when read.
//! * Run beside a live coordinator, the check may see a batch that is being written as a torn
//!   tail.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use journal::scan::{self, ScanReport};
use journal::{JournalConfig, JournalError};
use serde::Serialize;

use crate::output::{self, Tally, TornTailJson};

/// The verdicts and the JSON shape, shown at the end of `concord journal verify --help`.
pub const AFTER_HELP: &str = "\
Verdicts:
  ok         every record is valid                                   exit 0
  torn tail  the last segment ends in an unfinished write that the   exit 0
             next open truncates (segment file, byte offset, bytes)
  corrupt    damage in durable history; the error names segment      exit 3
             file and byte offset, and the journal will not open
  Errors that stop the check (missing directory, a data directory instead of its journal/
  (the error names the journal directory), foreign file, newer format, I/O) exit 1.

--json:
  One object on stdout: {\"status\":\"ok\"|\"torn_tail\"|\"corrupt\", \"dir\", \"segments\",
  \"records\", \"first_lsn\", \"last_lsn\", \"last_epoch\", \"last_chain\", \"torn_tail\",
  \"leftovers\", \"error\", \"corrupt_at\"}. torn_tail is null or {\"segment\",\"offset\",\"bytes\",
  \"reason\"}. In a corrupt journal the counts are those of the valid records before the damage,
  corrupt_at is {\"segment\",\"offset\",\"reason\"}, and the error line is on stderr too.
  An error that stops the check prints no object, only the error line on stderr.";

/// Options of `concord journal verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The journal directory.
    pub dir: PathBuf,
    /// One JSON object on standard output instead of the human summary (see below).
    #[arg(long)]
    pub json: bool,
    /// The journal's record size limit; a longer record reads as damage.
    #[arg(long, value_name = "BYTES", default_value_t = JournalConfig::default().record_bytes_max)]
    pub record_bytes_max: u64,
}

/// The verdict as one JSON object.
#[derive(Debug, Serialize)]
struct VerdictJson {
    status: &'static str,
    dir: String,
    segments: usize,
    records: u64,
    first_lsn: Option<u64>,
    last_lsn: Option<u64>,
    last_epoch: u64,
    last_chain: String,
    torn_tail: Option<TornTailJson>,
    leftovers: Vec<String>,
    error: Option<String>,
    corrupt_at: Option<CorruptAt>,
}

/// Where the damage is.
#[derive(Debug, Serialize)]
struct CorruptAt {
    segment: String,
    offset: u64,
    reason: String,
}

/// Runs `concord journal verify`.
pub fn run(args: &VerifyArgs) -> anyhow::Result<()> {
    output::check_dir(&args.dir)?;
    let mut tally = Tally::default();
    let spinner = output::spinner(!args.json);
    let scanned = scan::scan_dir(&args.dir, args.record_bytes_max, |rec| {
        spinner.inc(1);
        tally.see(rec);
    });
    spinner.finish_and_clear();
    match scanned {
        Ok(report) => output::stdout_result(print_sound(args, &report, &tally)),
        Err(e) if e.class() == journal::ErrorClass::Corrupt => {
            // A corrupt journal's exit code 3 matters more than a reader that stopped reading.
            match output::stdout_result(print_corrupt(args, &e, &tally)) {
                Err(w) if w.downcast_ref::<output::ClosedStdout>().is_none() => Err(w),
                _ => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn print_sound(args: &VerifyArgs, report: &ScanReport, tally: &Tally) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if args.json {
        let status = match report.torn_tail {
            Some(_) => "torn_tail",
            None => "ok",
        };
        let verdict = VerdictJson {
            torn_tail: report.torn_tail.as_ref().map(TornTailJson::from),
            leftovers: report
                .leftovers
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            ..verdict_json(status, &args.dir, report.segments.len(), tally)
        };
        return write_json(&mut out, &verdict);
    }
    let status = match report.torn_tail {
        Some(_) => "torn tail (sound; the next open truncates the unfinished write)",
        None => "ok",
    };
    writeln!(out, "status:      {status}")?;
    writeln!(out, "journal:     {}", args.dir.display())?;
    output::write_summary(&mut out, report, tally)?;
    out.flush()
}

fn print_corrupt(args: &VerifyArgs, e: &JournalError, tally: &Tally) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if args.json {
        let segments = journal::segment::list_dir(&args.dir).map_or(0, |l| l.segments.len());
        let verdict = VerdictJson {
            error: Some(e.to_string()),
            corrupt_at: corrupt_at(e),
            ..verdict_json("corrupt", &args.dir, segments, tally)
        };
        return write_json(&mut out, &verdict);
    }
    writeln!(out, "status:      corrupt (the journal will not open)")?;
    writeln!(out, "journal:     {}", args.dir.display())?;
    writeln!(out, "damage:      {e}")?;
    let records = tally.records_line(" valid before the damage");
    writeln!(out, "records:     {records}")?;
    if tally.records > 0 {
        writeln!(
            out,
            "last chain:  {} (of the last valid record)",
            tally.last_chain
        )?;
    }
    out.flush()
}

fn verdict_json(status: &'static str, dir: &Path, segments: usize, tally: &Tally) -> VerdictJson {
    VerdictJson {
        status,
        dir: dir.display().to_string(),
        segments,
        records: tally.records,
        first_lsn: tally.first_lsn.map(|l| l.0),
        last_lsn: tally.last_lsn.map(|l| l.0),
        last_epoch: tally.last_epoch.0,
        last_chain: tally.last_chain.to_hex(),
        torn_tail: None,
        leftovers: Vec::new(),
        error: None,
        corrupt_at: None,
    }
}

fn corrupt_at(e: &JournalError) -> Option<CorruptAt> {
    match e {
        JournalError::Corrupt {
            segment,
            offset,
            reason,
        } => Some(CorruptAt {
            segment: segment.display().to_string(),
            offset: *offset,
            reason: reason.clone(),
        }),
        _ => None,
    }
}

fn write_json(out: &mut impl Write, verdict: &VerdictJson) -> io::Result<()> {
    serde_json::to_writer(&mut *out, verdict)?;
    writeln!(out)?;
    out.flush()
}
