//! The operator calls: an operator's resolution request, and the report of what it did
//! (`concord txn resolve --json`), both ways.

use super::*;

impl From<bool> for Decision {
    fn from(commit: bool) -> Decision {
        if commit {
            Decision::Commit
        } else {
            Decision::Rollback
        }
    }
}

/// Whether `decision` (in `field`) commits.
fn commits(field: &'static str, decision: i32) -> Result<bool, WireError> {
    Ok(parse_enum::<Decision>(field, decision)? == Decision::Commit)
}

impl From<&DomainResolution> for v1::Resolution {
    fn from(r: &DomainResolution) -> v1::Resolution {
        v1::Resolution {
            decision: Decision::from(r.commit) as i32,
            operator: r.operator.clone(),
            at_ms: r.at_ms,
        }
    }
}

impl TryFrom<v1::Resolution> for DomainResolution {
    type Error = WireError;

    fn try_from(r: v1::Resolution) -> Result<DomainResolution, WireError> {
        Ok(DomainResolution {
            commit: commits("Resolution.decision", r.decision)?,
            operator: required("Resolution.operator", r.operator)?,
            at_ms: r.at_ms,
        })
    }
}

impl From<(&str, &BranchOutcome)> for BranchReport {
    fn from((resource, outcome): (&str, &BranchOutcome)) -> BranchReport {
        let (state, detail) = match outcome {
            BranchOutcome::Finished => (BranchState::Finished, String::new()),
            BranchOutcome::NotPrepared => (BranchState::NotPrepared, String::new()),
            BranchOutcome::Hazard(why) => (BranchState::Hazard, why.clone()),
            BranchOutcome::Unreached(why) => (BranchState::Unreached, why.clone()),
            BranchOutcome::Forgotten => (BranchState::Forgotten, String::new()),
        };
        BranchReport {
            resource: resource.to_string(),
            state: state as i32,
            detail,
        }
    }
}

impl TryFrom<BranchReport> for (String, BranchOutcome) {
    type Error = WireError;

    fn try_from(b: BranchReport) -> Result<(String, BranchOutcome), WireError> {
        let resource = required("BranchReport.resource", b.resource)?;
        let outcome = match parse_enum("BranchReport.state", b.state)? {
            BranchState::Unspecified => unreachable_unspecified("BranchReport.state")?,
            BranchState::Finished => BranchOutcome::Finished,
            BranchState::NotPrepared => BranchOutcome::NotPrepared,
            BranchState::Hazard => BranchOutcome::Hazard(b.detail),
            BranchState::Unreached => BranchOutcome::Unreached(b.detail),
            BranchState::Forgotten => BranchOutcome::Forgotten,
        };
        Ok((resource, outcome))
    }
}

/// `parse_enum` refuses the zero already; this keeps the match total without a panic.
fn unreachable_unspecified<T>(field: &'static str) -> Result<T, WireError> {
    Err(WireError::BadEnum { field, value: 0 })
}

impl From<&ResolveReport> for v1::ResolveResponse {
    fn from(r: &ResolveReport) -> v1::ResolveResponse {
        v1::ResolveResponse {
            xid: xid_text(r.xid),
            decision: Decision::from(r.commit) as i32,
            recorded: r.appended,
            resolution: r.resolution.as_ref().map(Into::into),
            finished: r.finished,
            branches: r
                .branches
                .iter()
                .map(|(resource, outcome)| BranchReport::from((resource.as_str(), outcome)))
                .collect(),
            decision_lsn: r.decision_lsn.map(|l| l.0),
        }
    }
}

impl TryFrom<v1::ResolveResponse> for ResolveReport {
    type Error = WireError;

    fn try_from(r: v1::ResolveResponse) -> Result<ResolveReport, WireError> {
        Ok(ResolveReport {
            xid: parse_xid("ResolveResponse.xid", &r.xid)?,
            commit: commits("ResolveResponse.decision", r.decision)?,
            branches: r
                .branches
                .into_iter()
                .map(<(String, BranchOutcome)>::try_from)
                .collect::<Result<_, _>>()?,
            finished: r.finished,
            decision_lsn: r
                .decision_lsn
                .map(|l| parse_lsn("ResolveResponse.decision_lsn", l))
                .transpose()?,
            resolution: r.resolution.map(DomainResolution::try_from).transpose()?,
            appended: r.recorded,
        })
    }
}

impl From<&DomainResolveRequest> for v1::ResolveRequest {
    fn from(r: &DomainResolveRequest) -> v1::ResolveRequest {
        v1::ResolveRequest {
            header: Some(RequestHeader::current("")),
            xid: xid_text(r.xid),
            decision: Decision::from(r.commit) as i32,
            operator: r.operator.clone(),
            forget: r.forget.clone(),
            reason: r.reason.clone(),
        }
    }
}

impl TryFrom<v1::ResolveRequest> for DomainResolveRequest {
    type Error = WireError;

    /// The coordinator's request; `unopened` is left empty (the daemon fills it in).
    fn try_from(r: v1::ResolveRequest) -> Result<DomainResolveRequest, WireError> {
        check_header("ResolveRequest.header", r.header.as_ref())?;
        Ok(DomainResolveRequest {
            xid: parse_xid("ResolveRequest.xid", &r.xid)?,
            commit: commits("ResolveRequest.decision", r.decision)?,
            operator: required("ResolveRequest.operator", r.operator)?,
            forget: r.forget,
            reason: r.reason,
            unopened: Vec::new(),
        })
    }
}
