//! Maildir file names: made from the xid and the message's position, and checked when read.
//!
//! A message of the branch `xid` at position `pos` (0, 1, … in the order of its enqueues) is
//! named `<time>.C<xid>P<pos>.<host>`, for example
//! `1730000000.Cn1e3s1730000000000042P0.mail1`: the Maildir convention `time.unique.host`, where
//! `time` is when the branch began (seconds since the epoch) and `host` the name of the host
//! that enqueued it. The unique part is the xid and the position, so no two messages of any two
//! branches share a name, and a name says which branch it belongs to (which is how `open`
//! recognises the staged messages of branches that never prepared). The name is fixed when the
//! message is enqueued and carried in the prepare record and the redo, so a commit after a
//! restart and a replay on a standby use the same name — and find the message already there.
//!
//! Names never hold `/` or `:` (the Maildir info separator) and never start with a dot.

use crate::Xid;

/// Longest name accepted (a file name on common file systems).
pub const NAME_BYTES_MAX: usize = 255;

/// The name of message `pos` of branch `xid`, which began at `time`, enqueued on `host` (already
/// reduced to `A-Z a-z 0-9 . -` by `host_name`).
pub(super) fn message_name(time: u64, xid: &Xid, pos: u32, host: &str) -> String {
    format!("{time}.C{xid}P{pos}.{host}")
}

/// The branch and position of a name this resource made; `None` for any other name.
pub(super) fn parse_name(name: &str) -> Option<(Xid, u32)> {
    let (time, rest) = name.split_once('.')?;
    let (unique, _host) = rest.split_once('.')?;
    if time.is_empty() || !time.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (xid, pos) = unique.strip_prefix('C')?.rsplit_once('P')?;
    if pos.is_empty() || !pos.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((xid.parse().ok()?, pos.parse().ok()?))
}

/// Why `name` cannot be a message's file name in a Maildir directory, if it cannot.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "message name of {} bytes (1 to {NAME_BYTES_MAX} allowed)",
            name.len()
        ));
    }
    if name.starts_with('.') {
        return Err(format!("message name {name:?} starts with a dot"));
    }
    if let Some(bad) = name
        .bytes()
        .find(|&b| !b.is_ascii_graphic() || b == b'/' || b == b':')
    {
        return Err(format!(
            "message name {name:?} holds byte {bad:#04x} (only printable ASCII, without / and :)"
        ));
    }
    Ok(())
}

/// Whether the directory entry `entry` (in `cur/` or `new/`) is the message `name`: the name
/// itself, or the name with what a mail reader appends — the info after `:` (`:2,S`), or
/// Dovecot's `,S=<size>` fields.
pub(super) fn is_entry_of(entry: &str, name: &str) -> bool {
    entry
        .strip_prefix(name)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(':') || rest.starts_with(','))
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::Epoch;

    fn xid() -> Xid {
        Xid {
            node: 7,
            epoch: Epoch(3),
            seq: 1_730_000_000_000_042,
        }
    }

    #[test]
    fn names_round_trip_and_are_valid() {
        let name = message_name(1_730_000_000, &xid(), 12, "mail.example.org");
        assert_eq!(
            name,
            "1730000000.Cn7e3s1730000000000042P12.mail.example.org"
        );
        assert_eq!(parse_name(&name), Some((xid(), 12)));
        check_name(&name).unwrap();
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for foreign in [
            "1730000000.M123P456Q7.host",
            "1730000000.12345_1.host",
            "x.Cn1e1s1P0.host",
            "1730000000.Cn1e1s1P.host",
            "1730000000.Cn1e1s1P0",
            "1730000000.Cxe1s1P0.host",
            "",
        ] {
            assert_eq!(parse_name(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a:2,S",
            "a b",
            "a\0",
            &"x".repeat(256),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn entries_of_a_name_include_what_readers_append() {
        let name = "1.Cn1e1s1P0.h";
        assert!(is_entry_of(name, name));
        assert!(is_entry_of("1.Cn1e1s1P0.h:2,S", name));
        assert!(is_entry_of("1.Cn1e1s1P0.h,S=120:2,", name));
        assert!(!is_entry_of("1.Cn1e1s1P0.host", name));
        assert!(!is_entry_of("1.Cn1e1s1P01.h", name));
    }
}
