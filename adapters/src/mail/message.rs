//! RFC 5322 messages: the streaming check every enqueued message passes, and the builder.
//!
//! A message reaches the queue as bytes (possibly a stream of many megabytes) or from
//! [`MessageBuilder`]. Either way it goes through one [`Checker`], a state machine fed chunk by
//! chunk that checks the message and writes it out with CRLF line endings, holding nothing but a
//! few counters and the start of the current field name — so a message of any size is checked
//! in the memory of one chunk.
//!
//! # What is refused
//!
//! * **Line endings.** The first line decides: when it ends in CRLF, every line must end in CRLF;
//!   when it ends in a bare LF, every line must end in a bare LF, and each is stored as CRLF (an
//!   all-LF message, as Unix tools write it, is accepted and normalised). A CR that is not
//!   followed by LF (a *bare CR*) is refused anywhere; a message that mixes the two endings is
//!   refused at the first line that differs ([`MessageError::MixedLineEndings`]). RFC 5322 §2.3
//!   allows CR and LF only together; guessing what a mixed message meant would change its bytes
//!   in ways nobody asked for.
//! * **NUL** anywhere (RFC 5322 `text` excludes it).
//! * **The header section**: every line is a field (`name:value`), whose name is one or more
//!   printable ASCII characters other than `:` followed at once by the colon (§2.2, §3.6.8; a
//!   space before the colon is obsolete syntax, which §4 forbids generating), or a continuation
//!   line (starting with a space or tab) of the field before it. A line is at most 998 bytes
//!   without its line ending (§2.1.1). The section ends with an empty line; a message without
//!   one (no header/body separator) is refused.
//! * **The required fields** (§3.6): exactly one `Date` and one `From`; at most one of
//!   `Sender`, `Reply-To`, `To`, `Cc`, `Bcc`, `Message-ID`, `In-Reply-To`, `References`,
//!   `Subject`. Field bodies are not parsed further (a malformed address is the submission
//!   server's to judge).
//! * **The size**: more than `max_message_bytes` bytes as stored (after CRLF normalisation).
//!
//! The body is otherwise free: 8-bit bytes and lines over 998 bytes are let through (many real
//! generators produce them; re-encoding for transport is the sending MTA's job).
//!
//! # The builder
//!
//! [`MessageBuilder`] makes a plain-text message: `Date` (RFC 5322 format, UTC, from the clock
//! unless set), `From`, `To` (one or more), `Subject`, `Message-ID` (unique: the clock, the
//! process id, a per-process counter and a per-process random value, at the host's name, unless
//! set), `MIME-Version`, `Content-Type: text/plain; charset=utf-8`,
//! `Content-Transfer-Encoding: 8bit`, then the body with CRLF line endings. A CR or LF in a field
//! value (header injection) is refused, as is any other control character; a non-ASCII subject
//! is written as RFC 2047 encoded words; long fields are folded at spaces to lines of at most 78
//! characters where a space allows it.
//!
//! # Implementation caveats
//!
//! * Addresses are checked only for an `@` and for control characters; a non-ASCII address or
//!   display name is written as is (RFC 6532, which needs an SMTPUTF8 transport).
//! * The builder writes `8bit` bodies, so it refuses body lines over 998 bytes (RFC 2045) instead
//!   of switching to quoted-printable; raw messages are not held to that.
//! * UTF-8 in header values of raw messages is not validated.
//! * The builder's `Date` is written by the `time` crate's RFC 2822 format (the same syntax
//!   RFC 5322 keeps), in UTC; a date after the year 9999 is written as its last second.
//!   Encoded words use the `base64` crate's standard alphabet with padding.

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

/// Longest line of the header section, without its line ending (RFC 5322 §2.1.1).
pub const HEADER_LINE_BYTES_MAX: usize = 998;
/// Lines the builder folds to where a space allows (RFC 5322 §2.1.1 "SHOULD").
const FOLD_AT_BYTES: usize = 78;
/// Longest field name the checker remembers (the longest it counts, `in-reply-to`, has 11).
const NAME_KEPT_BYTES: usize = 16;
/// Input bytes per RFC 2047 encoded word: 39 bytes are 52 base64 characters, 64 with the frame,
/// so that a word fits a line of [`FOLD_AT_BYTES`] after `Subject: `.
const ENCODED_WORD_BYTES: usize = 39;

/// Why a message is refused. Each names the line (counted from 1 in the input) where it can.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The input ended inside the header section.
    #[error(
        "no header/body separator: the header section must end with an empty line, even when the body is empty"
    )]
    NoSeparator,
    /// A line of the header section is neither a field nor a continuation line.
    #[error("line {line}: malformed header field: {reason}")]
    MalformedHeader {
        /// The line.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A header line is longer than [`HEADER_LINE_BYTES_MAX`].
    #[error(
        "line {line}: header line over {HEADER_LINE_BYTES_MAX} bytes (RFC 5322 §2.1.1); fold it onto continuation lines"
    )]
    HeaderLineTooLong {
        /// The line.
        line: u64,
    },
    /// A CR not followed by LF.
    #[error(
        "line {line}: a CR not followed by LF (a bare CR); lines must end in CRLF, or all in LF"
    )]
    BareCr {
        /// The line.
        line: u64,
    },
    /// A line ending differs from the first line's.
    #[error(
        "line {line}: mixed line endings: the first line ends in {first}, this one in {here}; use one kind throughout"
    )]
    MixedLineEndings {
        /// The line.
        line: u64,
        /// The first line's ending (`CRLF` or `LF`).
        first: &'static str,
        /// This line's ending.
        here: &'static str,
    },
    /// A NUL byte.
    #[error("line {line}: a NUL byte, which RFC 5322 does not allow anywhere in a message")]
    Nul {
        /// The line.
        line: u64,
    },
    /// A required field is missing.
    #[error("no {field} field: RFC 5322 requires exactly one")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A field allowed once appears more than once.
    #[error("more than one {field} field: RFC 5322 allows at most one")]
    RepeatedField {
        /// The field.
        field: &'static str,
    },
    /// The message, with CRLF line endings, is over `max_message_bytes`.
    #[error(
        "the message is over max_message_bytes = {max} bytes (counted with CRLF line endings); send a smaller one or raise the limit"
    )]
    TooLarge {
        /// The limit.
        max: u64,
    },
    /// A builder field holds a CR or LF, which would start a header line of its own.
    #[error("{field}: a CR or LF in the value would inject header lines; refused")]
    HeaderInjection {
        /// The field.
        field: &'static str,
    },
    /// A builder field holds a control character other than CR or LF.
    #[error("{field}: control character {code:#04x} in the value; refused")]
    ControlCharacter {
        /// The field.
        field: &'static str,
        /// The character.
        code: u32,
    },
    /// A builder address has no `@`.
    #[error("{field}: {value:?} is not an address (no @)")]
    BadAddress {
        /// The field.
        field: &'static str,
        /// The address given.
        value: String,
    },
    /// The builder was given no `To`.
    #[error("no recipient: add at least one To")]
    NoRecipients,
    /// A Message-ID given to the builder is not `<left@right>`.
    #[error(
        "Message-ID {value:?} is not of the form <left@right> (no spaces, no angle brackets or @ inside)"
    )]
    BadMessageId {
        /// The id given.
        value: String,
    },
    /// A builder field has a word too long to fold into a line of 998 bytes.
    #[error("{field}: a word longer than {HEADER_LINE_BYTES_MAX} bytes cannot be folded")]
    UnfoldableField {
        /// The field.
        field: &'static str,
    },
    /// A builder body line is over 998 bytes.
    #[error(
        "body line {line} is over {HEADER_LINE_BYTES_MAX} bytes, which an 8bit body must not be (RFC 2045); wrap it"
    )]
    BodyLineTooLong {
        /// The line.
        line: u64,
    },
    /// The builder's date is before 1970.
    #[error("the Date is before 1970-01-01; set a real date or none (the clock is used)")]
    BadDate,
    /// Reading the message failed.
    #[error("reading the message failed: {0}")]
    Read(String),
}

/// A line ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Crlf,
    Lf,
}

impl Ending {
    fn name(self) -> &'static str {
        match self {
            Ending::Crlf => "CRLF",
            Ending::Lf => "LF",
        }
    }
}

/// Where the checker is in a header line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeaderAt {
    /// At the start of a line.
    LineStart,
    /// In a field name.
    Name,
    /// In a field value (after the colon, or on a continuation line).
    Value,
}

/// Fields RFC 5322 §3.6 limits: name (lowercase), as written, least and most occurrences.
const LIMITED_FIELDS: [(&str, &str, u8, u8); 11] = [
    ("date", "Date", 1, 1),
    ("from", "From", 1, 1),
    ("sender", "Sender", 0, 1),
    ("reply-to", "Reply-To", 0, 1),
    ("to", "To", 0, 1),
    ("cc", "Cc", 0, 1),
    ("bcc", "Bcc", 0, 1),
    ("message-id", "Message-ID", 0, 1),
    ("in-reply-to", "In-Reply-To", 0, 1),
    ("references", "References", 0, 1),
    ("subject", "Subject", 0, 1),
];

/// Checks a message fed in chunks and writes it out with CRLF line endings; see the module
/// docs for the rules. Feed it with [`Checker::push`], end with [`Checker::finish`].
#[derive(Debug)]
pub struct Checker {
    max_bytes: u64,
    /// Bytes written out so far.
    written: u64,
    /// The current line, from 1.
    line: u64,
    /// Bytes of the current header line so far.
    line_bytes: usize,
    /// The ending of the first line, once seen.
    ending: Option<Ending>,
    /// The last byte fed was a CR (its LF may come in the next chunk).
    pending_cr: bool,
    /// `None` once in the body.
    header: Option<HeaderAt>,
    /// Whether a field started in the header section.
    any_field: bool,
    /// The current field name, lowercase, its first [`NAME_KEPT_BYTES`] bytes.
    name: [u8; NAME_KEPT_BYTES],
    name_len: usize,
    /// Occurrences of each [`LIMITED_FIELDS`] entry (saturating at 2).
    counts: [u8; LIMITED_FIELDS.len()],
}

impl Checker {
    /// A checker refusing messages over `max_bytes` (as written out).
    pub fn new(max_bytes: u64) -> Checker {
        Checker {
            max_bytes,
            written: 0,
            line: 1,
            line_bytes: 0,
            ending: None,
            pending_cr: false,
            header: Some(HeaderAt::LineStart),
            any_field: false,
            name: [0; NAME_KEPT_BYTES],
            name_len: 0,
            counts: [0; LIMITED_FIELDS.len()],
        }
    }

    /// Checks the next chunk of the message and appends it, normalised, to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), MessageError> {
        let mut rest = input;
        while let Some((&byte, tail)) = rest.split_first() {
            if self.pending_cr {
                self.pending_cr = false;
                if byte != b'\n' {
                    return Err(MessageError::BareCr { line: self.line });
                }
                self.end_line(Ending::Crlf, out)?;
                rest = tail;
                continue;
            }
            if self.header.is_none() {
                // The body: copy runs of ordinary bytes at once.
                let run = rest
                    .iter()
                    .position(|&b| matches!(b, b'\r' | b'\n' | 0))
                    .unwrap_or(rest.len());
                if run > 0 {
                    self.emit(&rest[..run], out)?;
                    rest = &rest[run..];
                    continue;
                }
            }
            match byte {
                // Its LF (or the lack of one) decides: CRLF, or a bare CR.
                b'\r' => self.pending_cr = true,
                b'\n' => self.end_line(Ending::Lf, out)?,
                0 => return Err(MessageError::Nul { line: self.line }),
                _ => {
                    self.header_byte(byte)?;
                    self.emit(&[byte], out)?;
                }
            }
            rest = tail;
        }
        Ok(())
    }

    /// Ends the message: refuses one that stops inside the header section or on a bare CR.
    /// Returns the size written out.
    pub fn finish(&self) -> Result<u64, MessageError> {
        if self.pending_cr {
            return Err(MessageError::BareCr { line: self.line });
        }
        if self.header.is_some() {
            return Err(MessageError::NoSeparator);
        }
        Ok(self.written)
    }

    /// Bytes written out so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), MessageError> {
        self.written += bytes.len() as u64;
        if self.written > self.max_bytes {
            return Err(MessageError::TooLarge {
                max: self.max_bytes,
            });
        }
        out.extend_from_slice(bytes);
        Ok(())
    }

    fn mixed(&self, here: Ending) -> MessageError {
        let first = self.ending.map_or("", Ending::name);
        MessageError::MixedLineEndings {
            line: self.line,
            first,
            here: here.name(),
        }
    }

    fn end_line(&mut self, ending: Ending, out: &mut Vec<u8>) -> Result<(), MessageError> {
        match self.ending {
            None => self.ending = Some(ending),
            Some(first) if first != ending => return Err(self.mixed(ending)),
            Some(_) => {}
        }
        if let Some(at) = self.header {
            self.end_header_line(at)?;
        }
        self.emit(b"\r\n", out)?;
        self.line += 1;
        self.line_bytes = 0;
        Ok(())
    }

    fn end_header_line(&mut self, at: HeaderAt) -> Result<(), MessageError> {
        match at {
            HeaderAt::LineStart => {
                self.check_counts()?;
                self.header = None;
            }
            HeaderAt::Name => {
                return Err(self.malformed("no colon after the field name".to_string()));
            }
            HeaderAt::Value => self.header = Some(HeaderAt::LineStart),
        }
        Ok(())
    }

    /// One byte of a header line other than CR, LF or NUL; nothing in the body.
    fn header_byte(&mut self, byte: u8) -> Result<(), MessageError> {
        let Some(at) = self.header else {
            return Ok(());
        };
        self.line_bytes += 1;
        if self.line_bytes > HEADER_LINE_BYTES_MAX {
            return Err(MessageError::HeaderLineTooLong { line: self.line });
        }
        let next = match at {
            HeaderAt::LineStart if byte == b' ' || byte == b'\t' => {
                if !self.any_field {
                    let reason =
                        "a continuation line (starting with a space or tab) before the first field"
                            .to_string();
                    return Err(self.malformed(reason));
                }
                HeaderAt::Value
            }
            HeaderAt::LineStart if byte == b':' => {
                return Err(self.malformed("empty field name before the colon".to_string()));
            }
            HeaderAt::LineStart if is_ftext(byte) => {
                self.any_field = true;
                self.name_len = 0;
                self.keep_name_byte(byte);
                HeaderAt::Name
            }
            HeaderAt::LineStart => {
                let reason = format!("byte {byte:#04x} cannot start a field name");
                return Err(self.malformed(reason));
            }
            HeaderAt::Name if byte == b':' => {
                self.count_field();
                HeaderAt::Value
            }
            HeaderAt::Name if is_ftext(byte) => {
                self.keep_name_byte(byte);
                HeaderAt::Name
            }
            HeaderAt::Name if byte == b' ' || byte == b'\t' => {
                let reason = "white space in the field name or before its colon".to_string();
                return Err(self.malformed(reason));
            }
            HeaderAt::Name => {
                let reason = format!("byte {byte:#04x} in the field name");
                return Err(self.malformed(reason));
            }
            HeaderAt::Value => HeaderAt::Value,
        };
        self.header = Some(next);
        Ok(())
    }

    fn malformed(&self, reason: String) -> MessageError {
        MessageError::MalformedHeader {
            line: self.line,
            reason,
        }
    }

    fn keep_name_byte(&mut self, byte: u8) {
        if self.name_len < NAME_KEPT_BYTES {
            self.name[self.name_len] = byte.to_ascii_lowercase();
        }
        self.name_len += 1;
    }

    fn count_field(&mut self) {
        let name = &self.name[..self.name_len.min(NAME_KEPT_BYTES)];
        if self.name_len > NAME_KEPT_BYTES {
            return;
        }
        if let Some(i) = LIMITED_FIELDS
            .iter()
            .position(|(lower, ..)| lower.as_bytes() == name)
        {
            self.counts[i] = self.counts[i].saturating_add(1).min(2);
        }
    }

    fn check_counts(&self) -> Result<(), MessageError> {
        for (i, (_, field, least, most)) in LIMITED_FIELDS.iter().enumerate() {
            if self.counts[i] < *least {
                return Err(MessageError::MissingField { field });
            }
            if self.counts[i] > *most {
                return Err(MessageError::RepeatedField { field });
            }
        }
        Ok(())
    }
}

/// RFC 5322 `ftext`: printable ASCII but the colon.
fn is_ftext(byte: u8) -> bool {
    (33..=126).contains(&byte) && byte != b':'
}

/// Checks a whole message held in memory and returns it with CRLF line endings.
pub fn check_message(message: &[u8], max_bytes: u64) -> Result<Vec<u8>, MessageError> {
    let mut checker = Checker::new(max_bytes);
    let mut out = Vec::with_capacity(message.len());
    checker.push(message, &mut out)?;
    checker.finish()?;
    Ok(out)
}

/// Builds a plain-text RFC 5322 message; see the module docs.
///
/// ```
/// use adapters::mail::MessageBuilder;
/// let bytes = MessageBuilder::new()
///     .from("Shop <shop@example.org>")
///     .to("alice@example.org")
///     .to("bob@example.org")
///     .subject("Your order")
///     .body("Thank you.\n")
///     .build()
///     .unwrap();
/// assert!(bytes.ends_with(b"\r\n\r\nThank you.\r\n"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct MessageBuilder {
    from: Option<String>,
    to: Vec<String>,
    subject: Option<String>,
    message_id: Option<String>,
    date: Option<SystemTime>,
    body: String,
}

impl MessageBuilder {
    /// An empty builder.
    pub fn new() -> MessageBuilder {
        MessageBuilder::default()
    }

    /// The author (`From`): an address, with or without a display name (`Name <a@b>`).
    pub fn from(mut self, mailbox: impl Into<String>) -> MessageBuilder {
        self.from = Some(mailbox.into());
        self
    }

    /// Adds a recipient (`To`); call it once per recipient.
    pub fn to(mut self, mailbox: impl Into<String>) -> MessageBuilder {
        self.to.push(mailbox.into());
        self
    }

    /// The subject (any UTF-8; non-ASCII is written as RFC 2047 encoded words).
    pub fn subject(mut self, subject: impl Into<String>) -> MessageBuilder {
        self.subject = Some(subject.into());
        self
    }

    /// The Message-ID (`<left@right>`); by default a unique one is made.
    pub fn message_id(mut self, id: impl Into<String>) -> MessageBuilder {
        self.message_id = Some(id.into());
        self
    }

    /// The date; by default the clock at [`MessageBuilder::build`].
    pub fn date(mut self, date: SystemTime) -> MessageBuilder {
        self.date = Some(date);
        self
    }

    /// The text body; its line endings (LF or CRLF) are written as CRLF.
    pub fn body(mut self, text: impl Into<String>) -> MessageBuilder {
        self.body = text.into();
        self
    }

    /// The message's bytes, or why the fields cannot make one.
    pub fn build(&self) -> Result<Vec<u8>, MessageError> {
        let from = self
            .from
            .as_deref()
            .ok_or(MessageError::MissingField { field: "From" })?;
        check_address("From", from)?;
        if self.to.is_empty() {
            return Err(MessageError::NoRecipients);
        }
        for to in &self.to {
            check_address("To", to)?;
        }
        let date = self.date.unwrap_or_else(SystemTime::now);
        let secs = date
            .duration_since(UNIX_EPOCH)
            .map_err(|_| MessageError::BadDate)?
            .as_secs();
        let message_id = match &self.message_id {
            Some(id) => {
                check_value("Message-ID", id)?;
                check_message_id(id)?;
                id.clone()
            }
            None => new_message_id(&host_name()),
        };
        let mut out = String::new();
        push_field(&mut out, "Date", &rfc5322_date(secs))?;
        push_field(&mut out, "From", from)?;
        push_field(&mut out, "To", &self.to.join(", "))?;
        if let Some(subject) = &self.subject {
            check_value("Subject", subject)?;
            push_field(&mut out, "Subject", &encode_unstructured(subject))?;
        }
        push_field(&mut out, "Message-ID", &message_id)?;
        out.push_str("MIME-Version: 1.0\r\n");
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
        out.push_str("Content-Transfer-Encoding: 8bit\r\n\r\n");
        push_body(&mut out, &self.body)?;
        Ok(out.into_bytes())
    }
}

/// Refuses CR, LF (header injection) and other control characters in a field value.
fn check_value(field: &'static str, value: &str) -> Result<(), MessageError> {
    for c in value.chars() {
        if c == '\r' || c == '\n' {
            return Err(MessageError::HeaderInjection { field });
        }
        if c.is_control() && c != '\t' {
            return Err(MessageError::ControlCharacter {
                field,
                code: u32::from(c),
            });
        }
    }
    Ok(())
}

fn check_address(field: &'static str, value: &str) -> Result<(), MessageError> {
    check_value(field, value)?;
    if !value.contains('@') {
        return Err(MessageError::BadAddress {
            field,
            value: value.to_string(),
        });
    }
    Ok(())
}

fn check_message_id(id: &str) -> Result<(), MessageError> {
    let bad = || MessageError::BadMessageId {
        value: id.to_string(),
    };
    let inner = id
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .ok_or_else(bad)?;
    let (left, right) = inner.split_once('@').ok_or_else(bad)?;
    let fine = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'@'))
    };
    if fine(left) && fine(right) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Appends `Name: value`, folded at spaces into lines of at most [`FOLD_AT_BYTES`] where a
/// space allows it; refuses a line over [`HEADER_LINE_BYTES_MAX`].
fn push_field(out: &mut String, name: &'static str, value: &str) -> Result<(), MessageError> {
    let mut line = name.len() + 1;
    out.push_str(name);
    out.push(':');
    for word in value.split(' ') {
        // A fold goes before a space, never onto a line of white space only.
        if !word.is_empty() && line + 1 + word.len() > FOLD_AT_BYTES && line > name.len() + 1 {
            out.push_str("\r\n");
            line = 0;
        }
        out.push(' ');
        out.push_str(word);
        line += 1 + word.len();
        if line > HEADER_LINE_BYTES_MAX {
            return Err(MessageError::UnfoldableField { field: name });
        }
    }
    out.push_str("\r\n");
    Ok(())
}

/// The body with CRLF line endings; refuses a bare CR, a NUL and lines over 998 bytes.
fn push_body(out: &mut String, body: &str) -> Result<(), MessageError> {
    let mut lines = body.split('\n').peekable();
    let mut number = 0u64;
    while let Some(raw) = lines.next() {
        number += 1;
        let last = lines.peek().is_none();
        let text = raw.strip_suffix('\r').unwrap_or(raw);
        if text.contains('\r') || (last && raw.ends_with('\r')) {
            return Err(MessageError::BareCr { line: number });
        }
        if text.contains('\0') {
            return Err(MessageError::Nul { line: number });
        }
        if text.len() > HEADER_LINE_BYTES_MAX {
            return Err(MessageError::BodyLineTooLong { line: number });
        }
        out.push_str(text);
        if !last {
            out.push_str("\r\n");
        }
    }
    Ok(())
}

/// An unstructured value as is when it is ASCII, else as RFC 2047 `B` encoded words of UTF-8
/// (each at most [`ENCODED_WORD_BYTES`] input bytes, cut at character boundaries).
fn encode_unstructured(value: &str) -> String {
    if value.is_ascii() {
        return value.to_string();
    }
    let mut words = Vec::new();
    let mut start = 0;
    while start < value.len() {
        let mut end = (start + ENCODED_WORD_BYTES).min(value.len());
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        words.push(format!(
            "=?UTF-8?B?{}?=",
            STANDARD.encode(&value.as_bytes()[start..end])
        ));
        start = end;
    }
    words.join(" ")
}

/// The latest moment [`rfc5322_date`] writes: the last second of year 9999, the last a
/// four-digit year shows.
const LATEST_DATE_SECS: i64 = 253_402_300_799;
/// That moment, written.
const LATEST_DATE: &str = "Fri, 31 Dec 9999 23:59:59 +0000";

/// `secs` since the Unix epoch as an RFC 5322 date in UTC: `Thu, 13 Feb 1989 23:32:00 +0000`.
/// A moment after the year 9999 is written as its last second.
pub fn rfc5322_date(secs: u64) -> String {
    let secs = i64::try_from(secs).map_or(LATEST_DATE_SECS, |s| s.min(LATEST_DATE_SECS));
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|date| date.format(&Rfc2822).ok())
        .unwrap_or_else(|| LATEST_DATE.to_string())
}

/// Counts the Message-IDs this process made.
static MESSAGE_IDS: AtomicU64 = AtomicU64::new(0);

/// A new unique Message-ID: `<micros.pid.counter.random@host>`. The random part is drawn once
/// per process (from the standard library's per-process hash seed), so two processes with the
/// same pid (a restart) and a clock that went back still differ.
fn new_message_id(host: &str) -> String {
    static RANDOM: std::sync::LazyLock<u64> =
        std::sync::LazyLock::new(|| RandomState::new().build_hasher().finish());
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let count = MESSAGE_IDS.fetch_add(1, Ordering::Relaxed);
    let mut id = String::new();
    let _ = write!(
        id,
        "<{micros}.{}.{count}.{:016x}@{host}>",
        std::process::id(),
        *RANDOM
    );
    id
}

/// This host's name, reduced to what a Message-ID's right side and a Maildir name may hold
/// (`A-Z a-z 0-9 . -`); `localhost` when there is none.
pub(super) fn host_name() -> String {
    let uname = rustix::system::uname();
    let raw = uname.nodename().to_string_lossy();
    let clean: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .take(64)
        .collect();
    let clean = clean.trim_matches('.').to_string();
    if clean.is_empty() {
        "localhost".to_string()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 20;

    fn check(message: &[u8]) -> Result<Vec<u8>, MessageError> {
        check_message(message, MAX)
    }

    /// Feeds `message` one byte at a time, so every state crosses a chunk boundary.
    fn check_bytewise(message: &[u8]) -> Result<Vec<u8>, MessageError> {
        let mut checker = Checker::new(MAX);
        let mut out = Vec::new();
        for byte in message {
            checker.push(std::slice::from_ref(byte), &mut out)?;
        }
        checker.finish()?;
        Ok(out)
    }

    const GOOD: &[u8] =
        b"Date: Thu, 01 Jan 1970 00:00:00 +0000\r\nFrom: a@b\r\nSubject: hi\r\n  folded\r\n\r\nbody\r\n";

    #[test]
    fn a_crlf_message_passes_unchanged() {
        assert_eq!(check(GOOD).unwrap(), GOOD);
        assert_eq!(check_bytewise(GOOD).unwrap(), GOOD);
    }

    #[test]
    fn an_lf_message_is_normalised_to_crlf() {
        let lf: Vec<u8> = String::from_utf8(GOOD.to_vec())
            .unwrap()
            .replace("\r\n", "\n")
            .into_bytes();
        assert_eq!(check(&lf).unwrap(), GOOD);
        assert_eq!(check_bytewise(&lf).unwrap(), GOOD);
    }

    #[test]
    fn line_ending_rules() {
        let bare_cr = b"Date: x\r\nFrom: a@b\r\n\r\nbo\rdy\r\n";
        assert_eq!(check(bare_cr), Err(MessageError::BareCr { line: 4 }));
        let trailing_cr = b"Date: x\r\nFrom: a@b\r\n\r\nbody\r";
        assert_eq!(check(trailing_cr), Err(MessageError::BareCr { line: 4 }));
        let bare_cr_in_lf = b"Date: x\nFrom: a@b\n\nbo\rdy\n";
        assert_eq!(check(bare_cr_in_lf), Err(MessageError::BareCr { line: 4 }));
        let lf_then_crlf = b"Date: x\nFrom: a@b\r\n\nbody\n";
        assert!(matches!(
            check(lf_then_crlf),
            Err(MessageError::MixedLineEndings {
                line: 2,
                first: "LF",
                here: "CRLF"
            })
        ));
        let crlf_then_lf = b"Date: x\r\nFrom: a@b\r\n\r\nbody\nmore\r\n";
        assert!(matches!(
            check(crlf_then_lf),
            Err(MessageError::MixedLineEndings {
                line: 4,
                first: "CRLF",
                here: "LF"
            })
        ));
        assert_eq!(
            check(b"Date: x\r\nFrom: a@b\r\n\r\n\0"),
            Err(MessageError::Nul { line: 4 })
        );
    }

    #[test]
    fn header_rules() {
        let malformed = |m: &[u8]| match check(m) {
            Err(MessageError::MalformedHeader { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(malformed(b"Date\r\n\r\n").contains("no colon"));
        assert!(malformed(b"Date : x\r\n\r\n").contains("white space"));
        assert!(malformed(b": x\r\n\r\n").contains("empty field name"));
        assert!(malformed(b" Date: x\r\n\r\n").contains("continuation"));
        assert!(malformed(b"Da\x80te: x\r\n\r\n").contains("0x80"));
        assert_eq!(
            check(b"Date: x\r\nFrom: a@b\r\n"),
            Err(MessageError::NoSeparator)
        );
        assert_eq!(check(b""), Err(MessageError::NoSeparator));
        let long = format!(
            "Date: x\r\nFrom: a@b\r\nSubject: {}\r\n\r\n",
            "x".repeat(990)
        );
        assert_eq!(
            check(long.as_bytes()),
            Err(MessageError::HeaderLineTooLong { line: 3 })
        );
        assert_eq!(
            check(b"From: a@b\r\n\r\n"),
            Err(MessageError::MissingField { field: "Date" })
        );
        assert_eq!(
            check(b"Date: x\r\nFrom: a@b\r\nsubject: 1\r\nSUBJECT: 2\r\n\r\n"),
            Err(MessageError::RepeatedField { field: "Subject" })
        );
        // Fields that may repeat, and long names, are fine.
        let fine = b"Date: x\r\nFrom: a@b\r\nReceived: 1\r\nReceived: 2\r\nX-A-Very-Long-Field-Name: 1\r\n\r\n";
        assert_eq!(check(fine).unwrap(), fine);
    }

    #[test]
    fn the_limit_counts_the_normalised_size() {
        let lf = b"Date: x\nFrom: a@b\n\n";
        let crlf_len = lf.len() as u64 + 3;
        assert!(check_message(lf, crlf_len).is_ok());
        assert_eq!(
            check_message(lf, crlf_len - 1),
            Err(MessageError::TooLarge { max: crlf_len - 1 })
        );
    }

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
        assert_eq!(
            rfc5322_date(4_107_542_399),
            "Sun, 28 Feb 2100 23:59:59 +0000"
        );
        assert_eq!(
            rfc5322_date(4_107_542_400),
            "Mon, 01 Mar 2100 00:00:00 +0000"
        );
        assert_eq!(
            rfc5322_date(1_709_164_800),
            "Thu, 29 Feb 2024 00:00:00 +0000"
        );
    }

    #[test]
    fn dates_after_the_year_9999_are_its_last_second() {
        assert_eq!(rfc5322_date(253_402_300_799), LATEST_DATE);
        assert_eq!(rfc5322_date(253_402_300_800), LATEST_DATE);
        assert_eq!(rfc5322_date(u64::MAX), LATEST_DATE);
    }

    #[test]
    fn unstructured_values_are_ascii_or_base64_encoded_words() {
        assert_eq!(encode_unstructured("plain"), "plain");
        assert_eq!(encode_unstructured("é"), "=?UTF-8?B?w6k=?=");
        assert_eq!(encode_unstructured("Köln"), "=?UTF-8?B?S8O2bG4=?=");
    }

    fn builder() -> MessageBuilder {
        MessageBuilder::new()
            .from("Shop <shop@example.org>")
            .to("alice@example.org")
            .date(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000))
            .message_id("<1@example.org>")
    }

    #[test]
    fn the_builder_writes_a_message_the_checker_accepts() {
        let bytes = builder()
            .to("bob@example.org")
            .subject("Grüße aus Köln, eine lange Betreffzeile mit Umlauten: äöü")
            .body("one\ntwo\r\n")
            .build()
            .unwrap();
        assert_eq!(check(&bytes).unwrap(), bytes);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
        assert!(text.contains("To: alice@example.org, bob@example.org\r\n"));
        assert!(text.contains("Subject: =?UTF-8?B?"));
        assert!(text.contains("Message-ID: <1@example.org>\r\n"));
        assert!(text.ends_with("\r\n\r\none\r\ntwo\r\n"));
        assert!(text.split("\r\n").all(|l| l.len() <= FOLD_AT_BYTES));
    }

    #[test]
    fn long_fields_are_folded() {
        let many: Vec<String> = (0..20).map(|i| format!("user{i}@example.org")).collect();
        let mut b = builder();
        for to in &many {
            b = b.to(to.clone());
        }
        let text = String::from_utf8(b.build().unwrap()).unwrap();
        assert!(text.split("\r\n").all(|l| l.len() <= FOLD_AT_BYTES));
        let unfolded = text.replace("\r\n ", " ");
        let all = format!("alice@example.org, {}", many.join(", "));
        assert!(unfolded.contains(&format!("To: {all}\r\n")), "{text}");
        let word = "x".repeat(HEADER_LINE_BYTES_MAX);
        assert_eq!(
            builder().subject(word).build(),
            Err(MessageError::UnfoldableField { field: "Subject" })
        );
    }

    #[test]
    fn the_builder_refuses_injection_and_bad_fields() {
        assert_eq!(
            builder().subject("hi\r\nBcc: x@y").build(),
            Err(MessageError::HeaderInjection { field: "Subject" })
        );
        assert_eq!(
            builder().to("a@b\nBcc: x@y").build(),
            Err(MessageError::HeaderInjection { field: "To" })
        );
        assert_eq!(
            builder().subject("a\u{7}b").build(),
            Err(MessageError::ControlCharacter {
                field: "Subject",
                code: 7
            })
        );
        assert_eq!(
            MessageBuilder::new().to("a@b").build(),
            Err(MessageError::MissingField { field: "From" })
        );
        assert_eq!(
            MessageBuilder::new().from("a@b").build(),
            Err(MessageError::NoRecipients)
        );
        assert!(matches!(
            builder().to("nobody").build(),
            Err(MessageError::BadAddress { field: "To", .. })
        ));
        for id in ["1@x", "<1x>", "<1@>", "<a b@x>", "<a@b@c>"] {
            assert!(
                matches!(
                    builder().message_id(id).build(),
                    Err(MessageError::BadMessageId { .. })
                ),
                "{id}"
            );
        }
        assert_eq!(
            builder().body("a\rb").build(),
            Err(MessageError::BareCr { line: 1 })
        );
        assert_eq!(
            builder().body("x".repeat(999)).build(),
            Err(MessageError::BodyLineTooLong { line: 1 })
        );
        assert_eq!(
            builder()
                .date(UNIX_EPOCH - std::time::Duration::from_secs(1))
                .build(),
            Err(MessageError::BadDate)
        );
    }

    #[test]
    fn message_ids_are_unique_and_well_formed() {
        let a = MessageBuilder::new().from("a@b").to("c@d").build().unwrap();
        let b = MessageBuilder::new().from("a@b").to("c@d").build().unwrap();
        let id = |m: &[u8]| {
            let text = String::from_utf8(m.to_vec()).unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with("Message-ID: "))
                .unwrap()
                .to_string();
            line.trim_start_matches("Message-ID: ").to_string()
        };
        assert_ne!(id(&a), id(&b));
        check_message_id(&id(&a)).unwrap();
    }
}
