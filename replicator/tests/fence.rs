//! The fence agent against Debian's real `fence_dummy` (package `fence-agents`), whose `file`
//! type keeps the machine's power state in a file the test points at a temp dir, and against
//! small scripts that fail or hang.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use replicator::fence::{FenceAgent, FenceError, PowerStatus};

const FENCE_DUMMY: &str = "/usr/sbin/fence_dummy";
/// A timeout generous enough for a python agent on a loaded machine.
const AGENT_TIMEOUT_MS: u64 = 20_000;

fn fence_dummy(status_file: &Path) -> FenceAgent {
    let program = PathBuf::from(FENCE_DUMMY);
    assert!(
        program.exists(),
        "{FENCE_DUMMY} is missing; install it: apt-get install fence-agents"
    );
    FenceAgent {
        program,
        args: BTreeMap::from([
            ("type".to_string(), "file".to_string()),
            ("status_file".to_string(), status_file.display().to_string()),
        ]),
        timeout_ms: AGENT_TIMEOUT_MS,
    }
}

/// An executable shell script in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> FenceAgent {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    FenceAgent {
        program: path,
        args: BTreeMap::new(),
        timeout_ms: AGENT_TIMEOUT_MS,
    }
}

#[tokio::test]
async fn fence_dummy_switches_a_node_off_and_reads_it_off() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("power");
    std::fs::write(&state, "on").unwrap();
    let agent = fence_dummy(&state);
    assert_eq!(agent.status("node-a").await.unwrap(), PowerStatus::On);
    agent.off("node-a").await.unwrap();
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "off");
    assert_eq!(agent.status("node-a").await.unwrap(), PowerStatus::Off);
    // Off again is done again (fencing is idempotent).
    agent.off("node-a").await.unwrap();
}

#[tokio::test]
async fn a_bad_program_path_is_a_spawn_error() {
    let dir = tempfile::tempdir().unwrap();
    let agent = FenceAgent {
        program: dir.path().join("fence_nothing"),
        args: BTreeMap::new(),
        timeout_ms: AGENT_TIMEOUT_MS,
    };
    let err = agent.off("node-a").await.unwrap_err();
    assert!(matches!(err, FenceError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("fence-agents"), "{err}");
}

#[tokio::test]
async fn a_failing_agent_is_a_typed_error_with_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let agent = script(
        dir.path(),
        "fence_broken",
        "cat >/dev/null\necho 'Failed: Unable to connect to the switch' >&2\nexit 1",
    );
    let err = agent.off("node-a").await.unwrap_err();
    match &err {
        FenceError::Failed {
            action,
            stderr_tail,
            ..
        } => {
            assert_eq!(*action, "off");
            assert!(stderr_tail.contains("Unable to connect"), "{err}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let err = agent.status("node-a").await.unwrap_err();
    assert!(matches!(err, FenceError::Failed { .. }), "{err:?}");
}

#[tokio::test]
async fn a_hanging_agent_is_killed_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = script(
        dir.path(),
        "fence_hang",
        "echo 'waiting for the switch' >&2\nsleep 60",
    );
    agent.timeout_ms = 300;
    let started = Instant::now();
    let err = agent.off("node-a").await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(300 + 2000), "took {took:?}");
    match &err {
        FenceError::TimedOut {
            timeout_ms,
            stderr_tail,
            ..
        } => {
            assert_eq!(*timeout_ms, 300);
            assert!(stderr_tail.contains("waiting for the switch"), "{err}");
        }
        other => panic!("expected TimedOut, got {other:?}"),
    }
}

#[tokio::test]
async fn the_agent_reads_the_stdin_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let mut agent = script(
        dir.path(),
        "fence_record",
        &format!("cat > {}", seen.display()),
    );
    agent.args = BTreeMap::from([
        ("ip".to_string(), "127.0.0.1".to_string()),
        ("username".to_string(), "admin".to_string()),
    ]);
    agent.off("node-b").await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        "action=off\nplug=node-b\nip=127.0.0.1\nusername=admin\n"
    );
}

#[tokio::test]
async fn a_line_break_in_an_argument_is_refused_before_the_agent_runs() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let agent = script(dir.path(), "fence_x", &format!("touch {}", ran.display()));
    let err = agent.off("node-a\naction=on").await.unwrap_err();
    assert!(matches!(err, FenceError::BadArgument { .. }), "{err:?}");
    assert!(!ran.exists(), "the agent ran");
}
