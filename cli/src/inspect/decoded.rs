//! What a journal record means, for `journal inspect`: a coordinator record decoded into its
//! kind, xid, decision, branches (resource and redo size) and the operator's words, with the
//! redo bytes themselves — the content of files, mails and kv values — left out unless asked.
//!
//! A record that does not decode (a kind this concord does not know, a newer payload version,
//! a malformed payload) is shown as undecodable with the decoder's error; it never stops the
//! listing, since the scan has already checked its frame, crc and chain.
//!
//! # Implementation caveats
//!
//! * Only coordinator records ([`coordinator::record`]) are decoded; the redo inside a branch
//!   is shown by size, not decoded per resource kind.

use coordinator::record::{CoordRecord, RecordError};
use journal::RecordKind;
use serde::Serialize;

/// One branch of a decision: its resource and the size of its redo.
#[derive(Debug, Serialize)]
pub struct Branch {
    /// The resource's name in the configuration.
    pub resource: String,
    /// Bytes of the branch's redo.
    pub redo_bytes: usize,
    /// The redo as lower-case hex, only with `--payload`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redo_hex: Option<String>,
}

/// A decoded coordinator record as `--json` shows it under `"record"`; fields that a kind does
/// not have are left out.
#[derive(Debug, Serialize, Default)]
pub struct Decoded {
    /// `commit`, `end`, `resolve`, `one_phase`, `abort`, `forget` or `checkpoint`.
    pub name: &'static str,
    /// The transaction (every kind but `checkpoint`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xid: Option<String>,
    /// `commit` or `rollback` (`commit`, `resolve`, `one_phase`: a one-phase record announces
    /// a commit whose outcome its `end` or `abort` tells).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'static str>,
    /// When, in milliseconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
    /// The writing branches (`commit`, `one_phase`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branches: Option<Vec<Branch>>,
    /// The branch's resource (`forget`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Who decided (`resolve`, `forget`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Why (`abort`, `forget`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Decodes a record's payload; `with_redo` keeps the redo bytes (as hex) of each branch.
pub fn decode(kind: RecordKind, payload: &[u8], with_redo: bool) -> Result<Decoded, RecordError> {
    let branch = |resource: String, redo: &[u8]| Branch {
        resource,
        redo_bytes: redo.len(),
        redo_hex: with_redo.then(|| hex::encode(redo)),
    };
    Ok(match CoordRecord::decode(kind, payload)? {
        CoordRecord::Commit {
            xid,
            at_ms,
            branches,
        } => Decoded {
            xid: Some(xid.to_string()),
            decision: Some("commit"),
            at_ms: Some(at_ms),
            branches: Some(
                branches
                    .into_iter()
                    .map(|(r, redo)| branch(r, &redo))
                    .collect(),
            ),
            ..named("commit")
        },
        CoordRecord::End { xid } => Decoded {
            xid: Some(xid.to_string()),
            ..named("end")
        },
        CoordRecord::Resolve {
            xid,
            commit,
            operator,
            at_ms,
        } => Decoded {
            xid: Some(xid.to_string()),
            decision: Some(if commit { "commit" } else { "rollback" }),
            at_ms: Some(at_ms),
            operator: Some(operator),
            ..named("resolve")
        },
        CoordRecord::OnePhase {
            xid,
            at_ms,
            resource,
            redo,
        } => Decoded {
            xid: Some(xid.to_string()),
            decision: Some("commit"),
            at_ms: Some(at_ms),
            branches: Some(vec![branch(resource, &redo)]),
            ..named("one_phase")
        },
        CoordRecord::Abort { xid, reason } => Decoded {
            xid: Some(xid.to_string()),
            reason: Some(reason),
            ..named("abort")
        },
        CoordRecord::Forget {
            xid,
            resource,
            operator,
            reason,
            at_ms,
        } => Decoded {
            xid: Some(xid.to_string()),
            at_ms: Some(at_ms),
            resource: Some(resource),
            operator: Some(operator),
            reason: Some(reason),
            ..named("forget")
        },
        CoordRecord::Checkpoint { at_ms } => Decoded {
            at_ms: Some(at_ms),
            ..named("checkpoint")
        },
        CoordRecord::Role {
            at_ms,
            op,
            step,
            epoch,
            detail,
        } => Decoded {
            at_ms: Some(at_ms),
            operator: Some(op),
            reason: Some(format!("{step} at epoch {epoch}: {detail}")),
            ..named("role")
        },
    })
}

fn named(name: &'static str) -> Decoded {
    Decoded {
        name,
        ..Decoded::default()
    }
}

impl Decoded {
    /// The human description: the name, then each field the kind has as `key=value`, the
    /// branches as `redo_bytes=resource:N,…`.
    pub fn describe(&self) -> String {
        let mut out = self.name.to_string();
        let mut field = |key: &str, value: &str| {
            out.push(' ');
            out.push_str(key);
            out.push('=');
            out.push_str(value);
        };
        if let Some(xid) = &self.xid {
            field("xid", xid);
        }
        if let Some(decision) = self.decision {
            field("decision", decision);
        }
        if let Some(at_ms) = self.at_ms {
            field("at_ms", &at_ms.to_string());
        }
        if let Some(branches) = &self.branches {
            let list: Vec<String> = branches
                .iter()
                .map(|b| format!("{}:{}", b.resource, b.redo_bytes))
                .collect();
            field("redo_bytes", &list.join(","));
        }
        if let Some(resource) = &self.resource {
            field("resource", resource);
        }
        if let Some(operator) = &self.operator {
            field("operator", &format!("{operator:?}"));
        }
        if let Some(reason) = &self.reason {
            field("reason", &format!("{reason:?}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters::Xid;
    use journal::Epoch;

    fn xid() -> Xid {
        Xid {
            node: 1,
            epoch: Epoch(2),
            seq: 3,
        }
    }

    #[test]
    fn a_commit_shows_its_branches_by_size_and_its_redo_only_when_asked() {
        let record = CoordRecord::Commit {
            xid: xid(),
            at_ms: 9,
            branches: vec![
                ("uploads".into(), b"secret".to_vec()),
                ("mail".into(), vec![]),
            ],
        };
        let decoded = decode(record.kind(), &record.encode(), false).unwrap();
        assert_eq!(
            decoded.describe(),
            "commit xid=n1e2s3 decision=commit at_ms=9 redo_bytes=uploads:6,mail:0"
        );
        let json = serde_json::to_string(&decoded).unwrap();
        assert!(!json.contains("redo_hex"), "{json}");
        let decoded = decode(record.kind(), &record.encode(), true).unwrap();
        let json = serde_json::to_string(&decoded).unwrap();
        assert!(json.contains(&hex::encode(b"secret")), "{json}");
    }

    #[test]
    fn a_resolve_says_who_decided_what() {
        let record = CoordRecord::Resolve {
            xid: xid(),
            commit: false,
            operator: "ops".into(),
            at_ms: 4,
        };
        let decoded = decode(record.kind(), &record.encode(), false).unwrap();
        assert_eq!(
            decoded.describe(),
            "resolve xid=n1e2s3 decision=rollback at_ms=4 operator=\"ops\""
        );
    }

    #[test]
    fn a_malformed_payload_is_an_error_not_a_panic() {
        let kind = coordinator::record::COMMIT;
        for payload in [&b""[..], b"\xff\xff\xff", &[0u8; 64]] {
            assert!(decode(kind, payload, false).is_err());
        }
        assert!(decode(RecordKind::new(99, 1), b"x", false).is_err());
    }
}
