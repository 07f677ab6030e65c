//! "Not the primary, the primary is X": how a node that is not the primary answers a
//! `concord.v1.Coordinator` call, and how a client reads the answer back.
//!
//! With failover there are two nodes and at any moment one is primary. The other (a standby, or
//! an old primary that was demoted) does no work: it answers every `Coordinator` call but
//! `Status` with [`not_primary`] — FAILED_PRECONDITION, an `ErrorDetail` of code
//! `ERROR_CODE_NOT_PRIMARY`, and the metadata [`PRIMARY_METADATA`] holding the primary's URL
//! when the node knows it (empty otherwise). A client reads it with [`primary_hint`] and asks
//! there, or tries the next node it knows.
//!
//! # Caveats
//!
//! * The hint is the node's own knowledge, which can be stale in the middle of a failover: a
//!   client follows it, and meets another `NOT_PRIMARY` or a refused connection when it is
//!   wrong, so a client bounds its whole search by time, not by hops.
//! * A URL that a metadata value cannot carry (non-ASCII, control characters) is left out of
//!   the metadata; the message still names it.
//! * Code 15 (`ERROR_CODE_NOT_PRIMARY_UNAVAILABLE`, never sent by a daemon) is read as
//!   not-primary without a hint.

use tonic::metadata::AsciiMetadataValue;

use crate::v1::{ErrorCode, ErrorDetail};

/// The metadata key of a not-primary answer that holds the primary's URL (empty when unknown).
pub const PRIMARY_METADATA: &str = "concord-primary";

/// What a not-primary answer says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotPrimary {
    /// The primary's URL, when the node that answered knows it.
    pub primary: Option<String>,
}

/// The answer of a node that is not the primary to every `Coordinator` call but `Status`:
/// FAILED_PRECONDITION with an `ErrorDetail` of code `NOT_PRIMARY`, and the primary's URL
/// (`primary`, when known) in the message and in the metadata [`PRIMARY_METADATA`].
pub fn not_primary(primary: Option<&str>) -> tonic::Status {
    let primary = primary.map(str::trim).filter(|p| !p.is_empty());
    let message = match primary {
        Some(url) => format!("this node is not the primary; the primary is {url}"),
        None => "this node is not the primary; the primary is not known yet".to_string(),
    };
    let detail = ErrorDetail {
        code: ErrorCode::NotPrimary as i32,
        ..ErrorDetail::default()
    };
    let mut status = crate::error_status(message, &detail);
    let value = primary
        .and_then(|url| url.parse::<AsciiMetadataValue>().ok())
        .unwrap_or_else(|| AsciiMetadataValue::from_static(""));
    status.metadata_mut().insert(PRIMARY_METADATA, value);
    status
}

/// Whether `status` is a not-primary answer, and the primary it names. `None` for any other
/// status (a refused connection, another error, a status without a concord `ErrorDetail`).
pub fn primary_hint(status: &tonic::Status) -> Option<NotPrimary> {
    let detail = crate::error_detail(status).ok().flatten()?;
    match ErrorCode::try_from(detail.code) {
        Ok(ErrorCode::NotPrimary | ErrorCode::NotPrimaryUnavailable) => Some(NotPrimary {
            primary: hinted_url(status),
        }),
        _ => None,
    }
}

/// The URL in the metadata [`PRIMARY_METADATA`], when there is a usable one.
fn hinted_url(status: &tonic::Status) -> Option<String> {
    let value = status.metadata().get(PRIMARY_METADATA)?.to_str().ok()?;
    Some(value.trim().to_string()).filter(|url| !url.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_primary_is_in_the_message_and_the_metadata() {
        let status = not_primary(Some("http://127.0.0.1:7701"));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "this node is not the primary; the primary is http://127.0.0.1:7701"
        );
        let detail = crate::error_detail(&status).unwrap().unwrap();
        assert_eq!(detail.code, ErrorCode::NotPrimary as i32);
        assert_eq!(detail.grpc_code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            primary_hint(&status),
            Some(NotPrimary {
                primary: Some("http://127.0.0.1:7701".into())
            })
        );
    }

    #[test]
    fn an_unknown_primary_is_said_and_hints_nothing() {
        for unknown in [None, Some(""), Some("  ")] {
            let status = not_primary(unknown);
            assert_eq!(
                status.message(),
                "this node is not the primary; the primary is not known yet"
            );
            assert_eq!(
                status
                    .metadata()
                    .get(PRIMARY_METADATA)
                    .map(|v| v.to_str().unwrap()),
                Some("")
            );
            assert_eq!(primary_hint(&status), Some(NotPrimary { primary: None }));
        }
    }

    #[test]
    fn a_url_metadata_cannot_carry_is_only_in_the_message() {
        let status = not_primary(Some("http://prim\u{e4}r:7701"));
        assert!(status.message().contains("prim\u{e4}r"), "{status:?}");
        assert_eq!(primary_hint(&status), Some(NotPrimary { primary: None }));
    }

    #[test]
    fn other_statuses_are_no_hint() {
        assert_eq!(primary_hint(&tonic::Status::unavailable("refused")), None);
        let draining = crate::error_status(
            "draining",
            &ErrorDetail {
                code: ErrorCode::Draining as i32,
                ..ErrorDetail::default()
            },
        );
        assert_eq!(primary_hint(&draining), None);
        let garbage =
            tonic::Status::with_details(tonic::Code::Internal, "proxy", vec![0xff, 0xff].into());
        assert_eq!(primary_hint(&garbage), None);
        let mut old = crate::error_status(
            "not the primary",
            &ErrorDetail {
                code: ErrorCode::NotPrimaryUnavailable as i32,
                ..ErrorDetail::default()
            },
        );
        old.metadata_mut().insert(
            PRIMARY_METADATA,
            AsciiMetadataValue::from_static("http://127.0.0.1:1"),
        );
        assert_eq!(
            primary_hint(&old),
            Some(NotPrimary {
                primary: Some("http://127.0.0.1:1".into())
            })
        );
    }
}
