//! `concord journal inspect DIR`: the records of a journal, as an operator reads them or as JSON
//! lines for a script.
//!
//! The records come from [`journal::scan::scan_dir`], the same checked scan that opening a journal
//! runs, but read-only: it takes no lock and truncates nothing. Each record is written as the scan
//! hands it over, so memory stays bounded by one record whatever the size of the journal.
//!
//! Each record is decoded as a coordinator record ([`decoded`]): its kind by name, xid,
//! decision, time, operator and reason, and for a decision its branches with the size of each
//! redo. The redo itself — the content of the files, mails and kv values a transaction wrote —
//! is never printed unless `--payload` is given: a journal listing goes into tickets and chats.
//! A record that does not decode is shown as undecodable with the decoder's error.
//!
//! * Human form: one line per record — lsn, epoch, kind as `code/vversion`, payload bytes, the
//!   chain value abbreviated, the decoded record (or `undecodable: ERROR`) — then the summary
//!   that `journal verify` prints too (segments, records, first/last lsn, the torn tail if any).
//!   With `--payload`, each redo (or an undecodable record's payload) follows on its own
//!   indented line, escaped as ASCII.
//! * `--json`: one object per line. Records are `{"type":"record", lsn, epoch, kind, version,
//!   payload_bytes, chain, record, decode_error}` (`record` null when it does not decode), and
//!   with `--payload` also `payload_hex` and each branch's `redo_hex`; a torn tail is one final
//!   object `{"type":"torn_tail", segment, offset, bytes, reason}`. Nothing else is printed.
//!
//! Corruption stops the listing after the last valid record, with the error line naming segment
//! and byte offset and exit code 3.
//!
//! # Implementation caveats
//!
//! * `--from` filters the output only: the scan still reads and checks every record before it,
//!   because a chain value cannot be verified otherwise.
//! * When standard output is closed early (`| head`), the command stops writing and exits 0, but
//!   the scan still runs to the end of the journal.

use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::PathBuf;

use journal::scan::{self, ScanReport};
use journal::{JournalConfig, Lsn, Record};
use serde::Serialize;

use crate::output::{self, Tally, TornTailJson};

mod decoded;

use decoded::Decoded;

/// The output formats, shown at the end of `concord journal inspect --help`.
pub const AFTER_HELP: &str = "\
Output:
  Human form: one line per record (lsn, epoch, kind as code/vversion, payload bytes, chain hash
  abbreviated, the decoded record: commit, end, resolve, one_phase, abort, forget or checkpoint
  with its xid, decision, at_ms, redo_bytes per branch, operator, reason; or
  `undecodable: ERROR`), then a summary with the torn tail if there is one. With --payload, each
  redo (file, mail and kv contents) follows on an indented line, escaped; never without it.
  --json: one JSON object per line. Records: {\"type\":\"record\",\"lsn\",\"epoch\",\"kind\",
  \"version\",\"payload_bytes\",\"chain\",\"record\",\"decode_error\"}; record is null or
  {\"name\",\"xid\",\"decision\",\"at_ms\",\"branches\":[{\"resource\",\"redo_bytes\"}],
  \"resource\",\"operator\",\"reason\"} with the fields its kind has. With --payload also
  \"payload_hex\" and each branch's \"redo_hex\". A torn tail is one final object
  {\"type\":\"torn_tail\",\"segment\",\"offset\",\"bytes\",\"reason\"}.
  A corrupt journal lists the records before the damage, then exits 3 with the error on stderr.";

/// Options of `concord journal inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The journal directory.
    pub dir: PathBuf,
    /// Print only the records from this LSN on (the summary still covers the whole journal).
    #[arg(long, value_name = "LSN")]
    pub from: Option<u64>,
    /// One JSON object per line instead of the human form (see below).
    #[arg(long)]
    pub json: bool,
    /// Also print the redo of each branch — the content of files, mails and kv values — and the
    /// payload of records that do not decode.
    #[arg(long)]
    pub payload: bool,
    /// The journal's record size limit; a longer record reads as damage.
    #[arg(long, value_name = "BYTES", default_value_t = JournalConfig::default().record_bytes_max)]
    pub record_bytes_max: u64,
}

/// Runs `concord journal inspect`.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    output::check_dir(&args.dir)?;
    let stdout = io::stdout();
    let show_spinner = !args.json && !stdout.is_terminal();
    let mut printer = Printer {
        out: BufWriter::new(stdout.lock()),
        json: args.json,
        payload: args.payload,
        from: Lsn(args.from.unwrap_or(1)),
        header_done: false,
        tally: Tally::default(),
        failed: None,
    };
    let spinner = output::spinner(show_spinner);
    let scanned = scan::scan_dir(&args.dir, args.record_bytes_max, |rec| {
        spinner.inc(1);
        printer.record(rec);
    });
    spinner.finish_and_clear();
    let report = match scanned {
        Ok(report) => report,
        Err(e) => {
            let _ = printer.out.flush();
            return Err(e.into());
        }
    };
    printer.finish(&report)
}

/// Writes records as they are scanned; remembers the first write error and stops writing.
struct Printer<W: Write> {
    out: W,
    json: bool,
    payload: bool,
    from: Lsn,
    header_done: bool,
    tally: Tally,
    failed: Option<io::Error>,
}

/// One record as a JSON line.
#[derive(Serialize)]
struct RecordJson {
    r#type: &'static str,
    lsn: u64,
    epoch: u64,
    kind: u8,
    version: u8,
    payload_bytes: usize,
    chain: String,
    record: Option<Decoded>,
    decode_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
}

/// The torn tail as the final JSON line.
#[derive(Serialize)]
struct TornTailLine {
    r#type: &'static str,
    #[serde(flatten)]
    tail: TornTailJson,
}

impl<W: Write> Printer<W> {
    fn record(&mut self, rec: &Record) {
        self.tally.see(rec);
        if self.failed.is_some() || rec.lsn < self.from {
            return;
        }
        let written = if self.json {
            self.write_json(rec)
        } else {
            self.write_human(rec)
        };
        if let Err(e) = written {
            self.failed = Some(e);
        }
    }

    fn write_json(&mut self, rec: &Record) -> io::Result<()> {
        let (record, decode_error) = match decoded::decode(rec.kind, &rec.payload, self.payload) {
            Ok(decoded) => (Some(decoded), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let line = RecordJson {
            r#type: "record",
            lsn: rec.lsn.0,
            epoch: rec.epoch.0,
            kind: rec.kind.code,
            version: rec.kind.version,
            payload_bytes: rec.payload.len(),
            chain: rec.chain.to_hex(),
            record,
            decode_error,
            payload_hex: self.payload.then(|| hex::encode(&rec.payload)),
        };
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }

    fn write_human(&mut self, rec: &Record) -> io::Result<()> {
        if !self.header_done {
            self.header_done = true;
            writeln!(
                self.out,
                "{:>10} {:>6} {:<7} {:>8}  {:<12}  RECORD",
                "LSN", "EPOCH", "KIND", "BYTES", "CHAIN"
            )?;
        }
        let decoded = decoded::decode(rec.kind, &rec.payload, false);
        let description = match &decoded {
            Ok(decoded) => decoded.describe(),
            Err(e) => format!("undecodable: {e}"),
        };
        writeln!(
            self.out,
            "{:>10} {:>6} {:<7} {:>8}  {:<12}  {}",
            rec.lsn.0,
            rec.epoch.0,
            rec.kind.to_string(),
            rec.payload.len(),
            output::chain_abbrev(&rec.chain),
            description
        )?;
        if self.payload {
            self.write_human_payload(rec)?;
        }
        Ok(())
    }

    /// The redo of each branch, or the whole payload of a record that does not decode, each on
    /// an indented line.
    fn write_human_payload(&mut self, rec: &Record) -> io::Result<()> {
        match coordinator::record::CoordRecord::decode(rec.kind, &rec.payload) {
            Ok(record) => {
                for (resource, redo) in output::redo_of(&record) {
                    writeln!(
                        self.out,
                        "{:>12}redo {resource}: {}",
                        "",
                        output::escaped(redo)
                    )?;
                }
                Ok(())
            }
            Err(_) => writeln!(
                self.out,
                "{:>12}payload: {}",
                "",
                output::escaped(&rec.payload)
            ),
        }
    }

    /// Writes what follows the records and flushes.
    fn finish(mut self, report: &ScanReport) -> anyhow::Result<()> {
        let result = match self.failed.take() {
            Some(e) => Err(e),
            None => self.write_end(report),
        };
        output::stdout_result(result)
    }

    fn write_end(&mut self, report: &ScanReport) -> io::Result<()> {
        if self.json {
            if let Some(tail) = &report.torn_tail {
                let line = TornTailLine {
                    r#type: "torn_tail",
                    tail: tail.into(),
                };
                serde_json::to_writer(&mut self.out, &line)?;
                self.out.write_all(b"\n")?;
            }
        } else {
            if self.header_done {
                writeln!(self.out)?;
            }
            output::write_summary(&mut self.out, report, &self.tally)?;
        }
        self.out.flush()
    }
}
