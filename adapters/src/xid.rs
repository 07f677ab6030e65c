//! Global transaction ids.

use std::fmt;
use std::str::FromStr;

use journal::Epoch;

use crate::error::ResourceError;

/// A global transaction id: which coordinator node made it, in which epoch, and a sequence number
/// unique within that node across restarts.
///
/// Printed as `n<node>e<epoch>s<seq>` (for example `n1e3s1730000000000042`): no `:`, `/` or
/// spaces, so it can be part of a PostgreSQL gid, a file name or a Maildir name; [`FromStr`]
/// parses exactly that form back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Xid {
    /// The coordinator node.
    pub node: u32,
    /// The epoch the node was serving in.
    pub epoch: Epoch,
    /// Unique per node: seeded above every sequence number in the journal and above the clock in
    /// microseconds at start, then counted up.
    pub seq: u64,
}

impl fmt::Display for Xid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}e{}s{}", self.node, self.epoch.0, self.seq)
    }
}

impl FromStr for Xid {
    type Err = ResourceError;

    fn from_str(s: &str) -> Result<Xid, ResourceError> {
        let bad = || {
            ResourceError::rejected(
                "xid",
                format!("{s:?} is not an xid (n<node>e<epoch>s<seq>)"),
            )
        };
        let rest = s.strip_prefix('n').ok_or_else(bad)?;
        let (node, rest) = rest.split_once('e').ok_or_else(bad)?;
        let (epoch, seq) = rest.split_once('s').ok_or_else(bad)?;
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        if !digits(node) || !digits(epoch) || !digits(seq) {
            return Err(bad());
        }
        Ok(Xid {
            node: node.parse().map_err(|_| bad())?,
            epoch: Epoch(epoch.parse().map_err(|_| bad())?),
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xids_print_and_parse_back() {
        let xid = Xid {
            node: 7,
            epoch: Epoch(3),
            seq: 1_730_000_000_000_042,
        };
        let text = xid.to_string();
        assert_eq!(text, "n7e3s1730000000000042");
        assert_eq!(text.parse::<Xid>().unwrap(), xid);
    }

    #[test]
    fn malformed_xids_are_refused() {
        for bad in [
            "",
            "n1e2",
            "n1e2s",
            "x1e2s3",
            "n1e2s3x",
            "n+1e2s3",
            "n1e2s99999999999999999999",
            "n1:e2s3",
        ] {
            assert!(bad.parse::<Xid>().is_err(), "{bad}");
        }
    }
}
