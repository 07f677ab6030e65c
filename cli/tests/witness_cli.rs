//! `concord witness` as an operator runs it: the listening line, SIGTERM (exit 0), SIGKILL and
//! a restart on the same data directory (the register kept, the holder's lease honoured), the
//! token file, the loopback rule and a damaged state file.

#![allow(clippy::expect_used)]

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{Daemon, Stderr};
use replicator::quorum::{self, Holder, QuorumConfig, QuorumError, QuorumKind, QuorumStore};

/// The deadline of one call to the witness (generous: the machine is shared).
const CALL_TIMEOUT_MS: u64 = 5_000;

fn start(data: &Path, extra: &[&OsStr]) -> Daemon {
    let mut command = Command::new(env!("CARGO_BIN_EXE_concord"));
    command
        .arg("witness")
        .arg("--data")
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null());
    Daemon::spawn(&mut command, Stderr::Inherit)
}

fn store(witness: &Daemon, token: Option<&str>) -> Arc<dyn QuorumStore> {
    let cfg = QuorumConfig {
        kind: QuorumKind::Witness,
        endpoints: vec![witness.url()],
        cluster: "c1".to_owned(),
        token: token.map(str::to_owned),
        call_timeout_ms: CALL_TIMEOUT_MS,
    };
    quorum::open(&cfg).expect("open the witness store")
}

fn holder(node: &str) -> Holder {
    Holder {
        node: node.to_owned(),
        address: format!("http://127.0.0.1:1/{node}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_survives_sigkill_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let witness = start(dir.path(), &[]);
    let grant = store(&witness, None)
        .claim(&holder("a"), 0, 1, 30_000, false)
        .await
        .expect("claim");
    assert_eq!(grant.epoch, 1);
    witness.kill();

    let witness = start(dir.path(), &[]);
    let store = store(&witness, None);
    let state = store.state().await.expect("state after SIGKILL");
    assert_eq!((state.epoch, state.holder), (1, Some(holder("a"))));
    assert!(state.lease_remaining_ms.is_some(), "the restart rule");
    match store.claim(&holder("b"), 1, 2, 3_000, false).await {
        Err(QuorumError::LeaseHeld { holder: h, .. }) => assert_eq!(h, holder("a")),
        other => panic!("expected LeaseHeld after the restart, got {other:?}"),
    }
    let stopped = witness.stop();
    assert!(stopped.clean, "SIGTERM exits 0: {}", stopped.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_with_a_token_file_refuses_a_call_without_the_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("write token");
    let data = dir.path().join("data");
    let witness = start(&data, &["--token-file".as_ref(), token_file.as_os_str()]);
    store(&witness, Some("s3cret"))
        .claim(&holder("a"), 0, 1, 3_000, false)
        .await
        .expect("claim with the token");
    match store(&witness, None).state().await {
        Err(QuorumError::Protocol { detail, .. }) => {
            assert!(detail.contains("Unauthenticated"), "{detail}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(witness.terminate());
}

fn run_to_end(args: &[&OsStr]) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start concord");
    common::output_within(child, Duration::from_secs(30), "concord witness")
}

#[test]
fn witness_listens_on_loopback_only_unless_told() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run_to_end(&[
        "witness".as_ref(),
        "--data".as_ref(),
        dir.path().as_os_str(),
        "--listen".as_ref(),
        "0.0.0.0:0".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loopback only") && stderr.contains("--listen-any"),
        "{stderr}"
    );
}

#[test]
fn witness_refuses_a_damaged_state_file_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join(replicator::quorum::witness::STATE_FILE);
    std::fs::write(&state, "{ not json").expect("write");
    let out = run_to_end(&[
        "witness".as_ref(),
        "--data".as_ref(),
        dir.path().as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: witness state file"), "{stderr}");
    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
