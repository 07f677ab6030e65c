//! The quorum store on etcd, over its v3 gRPC API (the `KV` and `Lease` services of the
//! vendored schema in `proto::etcd`, compiled with `protox`: no `protoc`, no `etcd-client`).
//!
//! The idea: three keys under `/concord/<cluster>/` and one optimistic compare-and-swap.
//!
//! * `epoch` — the epoch in decimal; absent = 0.
//! * `owner` — the holder of that epoch, as JSON (`{"node":…,"address":…}`); it stays after the
//!   lease ends.
//! * `lease` — the holder's node name, attached to an etcd lease: the key exists exactly while
//!   the lease is live, and etcd deletes it when the lease runs out or is revoked.
//!
//! Every change reads the three keys (one `Range` over the prefix, one revision), decides as
//! the trait says, grants a fresh etcd lease, and writes in one `Txn` whose compares require
//! each key's `mod_revision` to be what was read (0: still absent). A concurrent change makes
//! the `Txn` fail; the call then revokes the lease it granted and starts over from a new read
//! (at most [`CAS_ATTEMPTS_MAX`] times, within the call's deadline), so among concurrent
//! claims exactly one wins and the others see the winner's epoch. After a successful claim or
//! renew the previous etcd lease is revoked (it holds no key any more).
//!
//! # Implementation caveats
//!
//! * etcd leases are whole seconds: a ttl is rounded up, and etcd raises it to its minimum
//!   (1.5 × its election timeout, rounded up: 2 s by default). The [`Grant`] carries the ttl etcd
//!   granted. The remaining time etcd reports is whole seconds too; it is reported rounded up.
//! * etcd deletes an expired lease's keys from its leader's expiry loop, a little after the
//!   lease ran out: a claim made right at expiry may still see `LeaseHeld`.
//! * A configured token is sent as etcd's `token` metadata (an etcd auth token from its
//!   `Authenticate`); such tokens expire and are not refreshed here.
//! * No watch: a standby polls the state.

use proto::etcd::etcdserverpb as pb;
use proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use proto::etcd::etcdserverpb::request_op::Request as Op;

use super::{ClusterState, Grant, Holder, QuorumConfig, QuorumError, QuorumStore};

/// How many times a compare-and-swap starts over after losing a race, within one call.
pub const CAS_ATTEMPTS_MAX: u32 = 16;
/// The largest value read from one of the keys, in bytes.
const VALUE_BYTES_MAX: usize = 64 * 1024;

/// The [`QuorumStore`] on an etcd cluster. Connects lazily (create it inside a tokio runtime).
#[derive(Debug, Clone)]
pub struct EtcdStore {
    describe: String,
    prefix: String,
    timeout_ms: u64,
    token: Option<tonic::metadata::AsciiMetadataValue>,
    channel: tonic::transport::Channel,
}

/// One key as read, with its modification revision.
#[derive(Debug, Clone)]
struct Read<T> {
    value: T,
    mod_revision: i64,
}

/// The three keys at one revision.
#[derive(Debug, Default)]
struct Snapshot {
    epoch: Option<Read<u64>>,
    owner: Option<Read<Holder>>,
    /// The lease key: the node holding it and the etcd lease id.
    lease: Option<Read<(String, i64)>>,
}

impl Snapshot {
    fn epoch(&self) -> u64 {
        self.epoch.as_ref().map_or(0, |r| r.value)
    }

    fn owner(&self) -> Option<Holder> {
        self.owner.as_ref().map(|r| r.value.clone())
    }
}

impl EtcdStore {
    /// A store on the etcd cluster `cfg` names.
    pub fn new(cfg: &QuorumConfig) -> Result<Self, QuorumError> {
        let describe = format!("etcd {} cluster {}", cfg.endpoints.join(","), cfg.cluster);
        let token = match &cfg.token {
            None => None,
            Some(token) => Some(token.parse().map_err(|_| QuorumError::Protocol {
                store: describe.clone(),
                detail: "the token is not printable ASCII: check the configured token".to_owned(),
            })?),
        };
        let channel = super::lazy_channel(&describe, &cfg.endpoints, cfg.call_timeout_ms)?;
        Ok(Self {
            prefix: format!("/concord/{}/", cfg.cluster),
            describe,
            timeout_ms: cfg.call_timeout_ms,
            token,
            channel,
        })
    }

    fn key(&self, name: &str) -> Vec<u8> {
        format!("{}{name}", self.prefix).into_bytes()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("token", token.clone());
        }
        request
    }

    fn kv(&self) -> pb::kv_client::KvClient<tonic::transport::Channel> {
        pb::kv_client::KvClient::new(self.channel.clone())
    }

    fn leases(&self) -> pb::lease_client::LeaseClient<tonic::transport::Channel> {
        pb::lease_client::LeaseClient::new(self.channel.clone())
    }

    fn status(&self, status: &tonic::Status) -> QuorumError {
        super::status_error(&self.describe, status)
    }

    fn malformed(&self, detail: String) -> QuorumError {
        QuorumError::Protocol {
            store: self.describe.clone(),
            detail: format!("malformed data under {}: {detail}", self.prefix),
        }
    }

    /// The three keys, read at one revision.
    async fn read(&self) -> Result<Snapshot, QuorumError> {
        let mut range_end = self.prefix.clone().into_bytes();
        if let Some(last) = range_end.last_mut() {
            *last += 1; // "/" + 1 = "0": every key with the prefix.
        }
        let request = pb::RangeRequest {
            key: self.prefix.clone().into_bytes(),
            range_end,
            ..Default::default()
        };
        let answer = self.kv().range(self.request(request)).await;
        let answer = answer.map_err(|s| self.status(&s))?.into_inner();
        let mut snapshot = Snapshot::default();
        for kv in answer.kvs {
            self.read_key(&mut snapshot, kv)?;
        }
        Ok(snapshot)
    }

    fn read_key(
        &self,
        snapshot: &mut Snapshot,
        kv: proto::etcd::mvccpb::KeyValue,
    ) -> Result<(), QuorumError> {
        if kv.value.len() > VALUE_BYTES_MAX {
            return Err(self.malformed(format!("a value of {} bytes", kv.value.len())));
        }
        let text = String::from_utf8(kv.value)
            .map_err(|_| self.malformed("a value that is not UTF-8".to_owned()))?;
        let mod_revision = kv.mod_revision;
        let name = kv.key.get(self.prefix.len()..).unwrap_or_default();
        match name {
            b"epoch" => {
                let value = text
                    .parse()
                    .map_err(|_| self.malformed(format!("epoch {text:?} is not a number")))?;
                snapshot.epoch = Some(Read {
                    value,
                    mod_revision,
                });
            }
            b"owner" => {
                let value: Holder = serde_json::from_str(&text)
                    .map_err(|e| self.malformed(format!("owner {text:?}: {e}")))?;
                snapshot.owner = Some(Read {
                    value,
                    mod_revision,
                });
            }
            b"lease" => {
                snapshot.lease = Some(Read {
                    value: (text, kv.lease),
                    mod_revision,
                });
            }
            _ => {} // Another tool's key under the prefix: not ours to judge.
        }
        Ok(())
    }

    /// What etcd says is left of lease `id`, rounded up to whole seconds, in milliseconds;
    /// `None` when it ran out.
    async fn remaining_ms(&self, id: i64) -> Result<Option<u64>, QuorumError> {
        if id == 0 {
            return Ok(None);
        }
        let request = pb::LeaseTimeToLiveRequest { id, keys: false };
        let answer = match self
            .leases()
            .lease_time_to_live(self.request(request))
            .await
        {
            Ok(answer) => answer.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(self.status(&s)),
        };
        let Ok(ttl_s) = u64::try_from(answer.ttl) else {
            return Ok(None); // -1: expired.
        };
        let granted_s = u64::try_from(answer.granted_ttl).unwrap_or(0).max(1);
        Ok(Some(
            ttl_s.saturating_add(1).min(granted_s).saturating_mul(1000),
        ))
    }

    /// A fresh etcd lease of at least `ttl_ms`, rounded up to whole seconds: its id and the
    /// ttl etcd granted, in milliseconds.
    async fn grant(&self, ttl_ms: u64) -> Result<(i64, u64), QuorumError> {
        let ttl_s = i64::try_from(ttl_ms.div_ceil(1000)).unwrap_or(i64::MAX);
        let request = pb::LeaseGrantRequest { ttl: ttl_s, id: 0 };
        let answer = self.leases().lease_grant(self.request(request)).await;
        let answer = answer.map_err(|s| self.status(&s))?.into_inner();
        if !answer.error.is_empty() {
            return Err(QuorumError::Protocol {
                store: self.describe.clone(),
                detail: format!("etcd refused a lease of {ttl_s} s: {}", answer.error),
            });
        }
        let granted_s = u64::try_from(answer.ttl).unwrap_or(0);
        if answer.id == 0 || granted_s == 0 {
            return Err(self.malformed(format!("lease grant {} of {} s", answer.id, answer.ttl)));
        }
        Ok((answer.id, granted_s.saturating_mul(1000)))
    }

    /// Revokes lease `id`, best effort: a lease that is gone already is fine, and a failure
    /// only leaves a lease that holds no key to run out by itself.
    async fn revoke(&self, id: i64) {
        if id == 0 {
            return;
        }
        let request = pb::LeaseRevokeRequest { id };
        if let Err(s) = self.leases().lease_revoke(self.request(request)).await
            && s.code() != tonic::Code::NotFound
        {
            tracing::debug!(store = %self.describe, lease = id, "revoke etcd lease: {s}");
        }
    }

    /// The compares that hold while the three keys are as `snapshot` read them.
    fn unchanged(&self, snapshot: &Snapshot) -> Vec<pb::Compare> {
        let revision = |r: Option<i64>| r.unwrap_or(0);
        [
            (
                "epoch",
                revision(snapshot.epoch.as_ref().map(|r| r.mod_revision)),
            ),
            (
                "owner",
                revision(snapshot.owner.as_ref().map(|r| r.mod_revision)),
            ),
            (
                "lease",
                revision(snapshot.lease.as_ref().map(|r| r.mod_revision)),
            ),
        ]
        .into_iter()
        .map(|(name, mod_revision)| pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: self.key(name),
            target_union: Some(TargetUnion::ModRevision(mod_revision)),
            range_end: Vec::new(),
        })
        .collect()
    }

    fn put(&self, name: &str, value: String, lease: i64) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Op::RequestPut(pb::PutRequest {
                key: self.key(name),
                value: value.into_bytes(),
                lease,
                ..Default::default()
            })),
        }
    }

    /// Writes `ops` if the keys are still as `snapshot` read them; whether it did.
    async fn swap(
        &self,
        snapshot: &Snapshot,
        ops: Vec<pb::RequestOp>,
    ) -> Result<bool, QuorumError> {
        let request = pb::TxnRequest {
            compare: self.unchanged(snapshot),
            success: ops,
            failure: Vec::new(),
        };
        let answer = self.kv().txn(self.request(request)).await;
        Ok(answer.map_err(|s| self.status(&s))?.into_inner().succeeded)
    }

    /// Grants a lease, writes the holder's keys with it if nothing changed since `snapshot`,
    /// and revokes the lease that is replaced (or the new one when the swap lost a race).
    async fn take(
        &self,
        snapshot: &Snapshot,
        me: &Holder,
        epoch: u64,
        ttl_ms: u64,
    ) -> Result<Option<Grant>, QuorumError> {
        let (lease, granted_ms) = self.grant(ttl_ms).await?;
        let owner = serde_json::to_string(me).map_err(|e| self.malformed(e.to_string()))?;
        let mut ops = vec![self.put("lease", me.node.clone(), lease)];
        if snapshot.epoch() != epoch {
            ops.push(self.put("epoch", epoch.to_string(), 0));
        }
        if snapshot.owner().as_ref() != Some(me) {
            ops.push(self.put("owner", owner, 0));
        }
        if !self.swap(snapshot, ops).await? {
            self.revoke(lease).await;
            return Ok(None);
        }
        if let Some(old) = &snapshot.lease {
            self.revoke(old.value.1).await;
        }
        Ok(Some(Grant {
            epoch,
            ttl_ms: granted_ms,
        }))
    }

    /// The refusal of a claim by `me` at `expected_epoch`, or `None` when it may go ahead.
    async fn claim_refused(
        &self,
        snapshot: &Snapshot,
        me: &Holder,
        expected_epoch: u64,
        override_live_lease: bool,
    ) -> Result<Option<QuorumError>, QuorumError> {
        if snapshot.epoch() != expected_epoch {
            return Ok(Some(QuorumError::EpochMoved {
                epoch: snapshot.epoch(),
                holder: snapshot.owner(),
            }));
        }
        let Some(lease) = &snapshot.lease else {
            return Ok(None);
        };
        if lease.value.0 == me.node || override_live_lease {
            return Ok(None);
        }
        let Some(remaining_ms) = self.remaining_ms(lease.value.1).await? else {
            return Ok(None); // Ran out just now; the swap's compares catch a change.
        };
        let holder = snapshot.owner().unwrap_or_else(|| Holder {
            node: lease.value.0.clone(),
            address: String::new(),
        });
        Ok(Some(QuorumError::LeaseHeld {
            epoch: snapshot.epoch(),
            holder,
            remaining_ms,
        }))
    }

    fn renew_refused(snapshot: &Snapshot, me: &Holder, epoch: u64) -> Option<QuorumError> {
        let holder = snapshot.owner();
        if snapshot.epoch() != epoch {
            return Some(QuorumError::EpochMoved {
                epoch: snapshot.epoch(),
                holder,
            });
        }
        if holder.as_ref().is_none_or(|h| h.node != me.node) {
            return Some(QuorumError::NotHolder {
                epoch: snapshot.epoch(),
                holder,
            });
        }
        None
    }

    fn contended(&self) -> QuorumError {
        QuorumError::Unreachable {
            store: self.describe.clone(),
            detail: format!("the keys kept changing during {CAS_ATTEMPTS_MAX} attempts"),
        }
    }

    async fn claim_now(
        &self,
        me: &Holder,
        expected_epoch: u64,
        new_epoch: u64,
        ttl_ms: u64,
        override_live_lease: bool,
    ) -> Result<Grant, QuorumError> {
        for _ in 0..CAS_ATTEMPTS_MAX {
            let snapshot = self.read().await?;
            let refusal = self.claim_refused(&snapshot, me, expected_epoch, override_live_lease);
            if let Some(refusal) = refusal.await? {
                return Err(refusal);
            }
            if let Some(grant) = self.take(&snapshot, me, new_epoch, ttl_ms).await? {
                return Ok(grant);
            }
        }
        Err(self.contended())
    }

    async fn renew_now(&self, me: &Holder, epoch: u64, ttl_ms: u64) -> Result<Grant, QuorumError> {
        for _ in 0..CAS_ATTEMPTS_MAX {
            let snapshot = self.read().await?;
            if let Some(refusal) = Self::renew_refused(&snapshot, me, epoch) {
                return Err(refusal);
            }
            if let Some(grant) = self.take(&snapshot, me, epoch, ttl_ms).await? {
                return Ok(grant);
            }
        }
        Err(self.contended())
    }

    async fn release_now(&self, me: &Holder, epoch: u64) -> Result<(), QuorumError> {
        let snapshot = self.read().await?;
        let mine = snapshot.epoch() == epoch && snapshot.owner().is_some_and(|h| h.node == me.node);
        match &snapshot.lease {
            // Revoking by id ends only this lease: a newer holder's lease is another id.
            Some(lease) if mine && lease.value.0 == me.node => self.revoke(lease.value.1).await,
            _ => {}
        }
        Ok(())
    }

    async fn state_now(&self) -> Result<ClusterState, QuorumError> {
        let snapshot = self.read().await?;
        let lease_remaining_ms = match &snapshot.lease {
            Some(lease) => self.remaining_ms(lease.value.1).await?,
            None => None,
        };
        Ok(ClusterState {
            epoch: snapshot.epoch(),
            holder: snapshot.owner(),
            lease_remaining_ms,
        })
    }
}

#[async_trait::async_trait]
impl QuorumStore for EtcdStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn state(&self) -> Result<ClusterState, QuorumError> {
        super::with_deadline(&self.describe, self.timeout_ms, self.state_now()).await
    }

    async fn claim(
        &self,
        me: &Holder,
        expected_epoch: u64,
        new_epoch: u64,
        ttl_ms: u64,
        override_live_lease: bool,
    ) -> Result<Grant, QuorumError> {
        super::check_claim(&self.describe, expected_epoch, new_epoch, ttl_ms)?;
        let claim = self.claim_now(me, expected_epoch, new_epoch, ttl_ms, override_live_lease);
        super::with_deadline(&self.describe, self.timeout_ms, claim).await
    }

    async fn renew(&self, me: &Holder, epoch: u64, ttl_ms: u64) -> Result<Grant, QuorumError> {
        super::check_ttl(&self.describe, ttl_ms)?;
        let renew = self.renew_now(me, epoch, ttl_ms);
        super::with_deadline(&self.describe, self.timeout_ms, renew).await
    }

    async fn release(&self, me: &Holder, epoch: u64) -> Result<(), QuorumError> {
        let release = self.release_now(me, epoch);
        super::with_deadline(&self.describe, self.timeout_ms, release).await
    }
}
