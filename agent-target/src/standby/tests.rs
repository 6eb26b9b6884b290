//! The policy after a verified flag — commit, bring up, health, roll back — against a fake
//! [`StackControl`] that records what it was asked to do and fails what a test tells it to,
//! with a real store in a temp dir and real commits (`tests/support/cycle.rs`). No Docker: the
//! end-to-end tests run the same policy against the real engine.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use stackclone_common::control::{ControlFuture, StackControl};
use stackclone_common::docker::{
    ContainerRef, Creation, DockerError, HealthReport, StartFailure, StartReport, StopReport,
};
use stackclone_proto::msg::Phase;
use stackclone_proto::session::Commit;

use super::commit_with;
// `cycle.rs` reaches the store as `super::store`.
use crate::store::{self, StackStore, StoreConfig};

#[path = "../../tests/support/cycle.rs"]
mod cycle;
use cycle::{STACK, cycle, push, scan_tree};

/// One method of [`StackControl`], as the fake records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Stop,
    Start,
    WaitHealthy,
    CreateIfMissing,
    BringUp,
    Recover,
}
use Call::{BringUp, Stop, WaitHealthy};

/// A [`StackControl`] that records every call in order and fails the ones it was told to.
#[derive(Debug, Default)]
struct FakeControl {
    calls: Mutex<Vec<Call>>,
    /// `(call, n)`: the `n`th call (from 1) of that method fails.
    failing: Vec<(Call, usize)>,
}

impl FakeControl {
    fn failing(failing: &[(Call, usize)]) -> Arc<Self> {
        Arc::new(Self {
            failing: failing.to_vec(),
            ..Self::default()
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .expect("no test panicked holding it")
            .clone()
    }

    fn answer<T: Send + 'static>(&self, call: Call, ok: T) -> ControlFuture<'_, T> {
        let mut calls = self.calls.lock().expect("no test panicked holding it");
        calls.push(call);
        let n = calls.iter().filter(|&&c| c == call).count();
        let result = if self.failing.contains(&(call, n)) {
            Err(failure(call))
        } else {
            Ok(ok)
        };
        Box::pin(async move { result })
    }
}

fn db() -> Box<ContainerRef> {
    Box::new(ContainerRef {
        service: "db".into(),
        name: "web-db-1".into(),
        id: "0123abcd".into(),
    })
}

/// What the engine might say when `call` fails.
fn failure(call: Call) -> DockerError {
    let project = STACK.to_owned();
    match call {
        Call::Stop => DockerError::RestartRecord {
            project,
            action: "writing".into(),
            path: PathBuf::from("/var/lib/stackclone/restart"),
            reason: "No space left on device".into(),
        },
        Call::Start | Call::BringUp => DockerError::StartFailed {
            project,
            failures: vec![StartFailure {
                container: *db(),
                error: "port 5432 is already allocated".into(),
            }],
        },
        Call::WaitHealthy => DockerError::Unhealthy {
            project,
            container: db(),
            health_log: vec!["pg_isready: no response".into()],
        },
        Call::CreateIfMissing | Call::Recover => DockerError::NoContainers { project },
    }
}

impl StackControl for FakeControl {
    fn stop(&self) -> ControlFuture<'_, StopReport> {
        self.answer(Call::Stop, StopReport::default())
    }
    fn start(&self) -> ControlFuture<'_, StartReport> {
        self.answer(Call::Start, StartReport::default())
    }
    fn wait_healthy(&self) -> ControlFuture<'_, HealthReport> {
        self.answer(Call::WaitHealthy, HealthReport::default())
    }
    fn create_if_missing(&self) -> ControlFuture<'_, Creation> {
        self.answer(Call::CreateIfMissing, Creation::Existed)
    }
    fn bring_up(&self) -> ControlFuture<'_, StartReport> {
        self.answer(Call::BringUp, StartReport::default())
    }
    fn recover(&self) -> ControlFuture<'_, Option<StartReport>> {
        self.answer(Call::Recover, None)
    }
}

// ------------------------------------------------------------------------------------------------
// A standby at generation 1

const BYTES: u64 = 4321;

/// Source tree `g` under `root`: one file whose content names the generation, one file only it
/// has.
fn tree(root: &Path, g: u64) -> PathBuf {
    let dir = root.join(format!("src{g}"));
    fs::create_dir_all(dir.join("db")).unwrap();
    fs::write(dir.join("db/rows"), format!("rows of generation {g}\n")).unwrap();
    fs::write(dir.join(format!("only-in-{g}")), b"x").unwrap();
    dir
}

/// A standby's store with generation 1 committed, its source trees beside it.
struct Standby {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    store: StackStore,
}

fn at_generation_1() -> Standby {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut store = StackStore::open(StoreConfig::new(STACK, root.join("live"))).unwrap();
    push(&mut store, &tree(&root, 1), 1);
    Standby {
        _tmp: tmp,
        root,
        store,
    }
}

impl Standby {
    /// The `Commit` of generation 2 from a changed tree; the session stopped the standby for it.
    fn changed_generation_2(&mut self) -> Commit {
        let c = cycle(&mut self.store, &tree(&self.root, 2), 2).unwrap();
        assert!(
            !c.without_stop(),
            "a changing commit comes with the stack stopped"
        );
        c
    }

    /// The `Commit` of generation 2 from the tree generation 1 already is: no stop.
    fn unchanged_generation_2(&mut self) -> Commit {
        let c = cycle(&mut self.store, &self.root.join("src1"), 2).unwrap();
        assert!(c.without_stop(), "nothing changes, so nothing was stopped");
        c
    }
}

/// How the standby's stack stood when the commit began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    /// Stopped by `fake` for the final pass.
    Stopped,
    /// Still running: the cycle did not stop it.
    Running,
}

/// Runs the policy, with `auto_rollback`, and `fake` as the stack's control: as the control
/// that stopped the stack, or as the one a commit without a stop connects to.
async fn commit(
    store: StackStore,
    c: Commit,
    fake: &Arc<FakeControl>,
    stack: Stack,
) -> (Result<u64, (Phase, String)>, StackStore) {
    let control: Arc<dyn StackControl> = fake.clone();
    let stopped = (stack == Stack::Stopped).then(|| (control.clone(), Instant::now()));
    commit_with(store, c, true, stopped, BYTES, move || async move {
        Ok(control)
    })
    .await
}

/// The live dir is exactly source tree `g`: content, modes, owners, mtimes.
#[track_caller]
fn assert_live_is(store: &StackStore, root: &Path, g: u64) {
    assert_eq!(
        scan_tree(store.live_path()),
        scan_tree(&root.join(format!("src{g}"))),
        "the live dir is not generation {g}"
    );
}

#[track_caller]
fn assert_failed(result: &Result<u64, (Phase, String)>, phase: Phase, says: &[&str]) {
    let Err((got, why)) = result else {
        panic!("the cycle succeeded: {result:?}");
    };
    assert_eq!(*got, phase, "{why}");
    for s in says {
        assert!(why.contains(s), "{why:?} does not say {s:?}");
    }
}

// ------------------------------------------------------------------------------------------------
// A commit that changes the live dir (the stack was stopped for it)

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_healthy_generation_is_brought_up_and_recorded() {
    let mut s = at_generation_1();
    s.store
        .record_cycle(|r| r.last_error = Some("the last cycle failed".into()))
        .unwrap();
    let c = s.changed_generation_2();
    let fake = FakeControl::failing(&[]);
    let (result, store) = commit(s.store, c, &fake, Stack::Stopped).await;
    let downtime = result.unwrap();
    assert_eq!(fake.calls(), [BringUp, WaitHealthy]);
    assert_eq!(store.last_generation(), 2);
    assert_live_is(&store, &s.root, 2);
    let st = store.state();
    assert_eq!(
        (
            st.target_downtime_ms,
            st.bytes_sent,
            st.last_error.as_deref()
        ),
        (downtime, BYTES, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_unhealthy_generation_is_rolled_back_and_the_previous_one_brought_up() {
    let mut s = at_generation_1();
    let c = s.changed_generation_2();
    let fake = FakeControl::failing(&[(WaitHealthy, 1)]);
    let (result, store) = commit(s.store, c, &fake, Stack::Stopped).await;
    assert_failed(
        &result,
        Phase::Health,
        &["unhealthy", "rolled back to generation 1, which is running"],
    );
    assert_eq!(
        fake.calls(),
        [BringUp, WaitHealthy, Stop, BringUp, WaitHealthy]
    );
    assert_eq!(store.last_generation(), 1);
    assert_eq!(store.state().rolled_back_from, Some(2));
    assert_live_is(&store, &s.root, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_stack_that_does_not_start_on_the_new_generation_is_rolled_back() {
    let mut s = at_generation_1();
    let c = s.changed_generation_2();
    let fake = FakeControl::failing(&[(BringUp, 1)]);
    let (result, store) = commit(s.store, c, &fake, Stack::Stopped).await;
    assert_failed(
        &result,
        Phase::Health,
        &[
            "bringing the stack up failed",
            "port 5432 is already allocated",
            "rolled back to generation 1",
        ],
    );
    // Nothing came up, so there is no health to wait for before the rollback.
    assert_eq!(fake.calls(), [BringUp, Stop, BringUp, WaitHealthy]);
    assert_eq!(store.last_generation(), 1);
    assert_live_is(&store, &s.root, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn without_auto_rollback_an_unhealthy_generation_stays_live() {
    let mut s = at_generation_1();
    let c = s.changed_generation_2();
    let fake = FakeControl::failing(&[(WaitHealthy, 1)]);
    let control: Arc<dyn StackControl> = fake.clone();
    let stopped = Some((control, Instant::now()));
    let never = || async { unreachable!("a stopped stack's commit connects to nothing") };
    let (result, store) = commit_with(s.store, c, false, stopped, BYTES, never).await;
    assert_failed(&result, Phase::Health, &["unhealthy"]);
    assert!(!result.unwrap_err().1.contains("rolled back"));
    assert_eq!(fake.calls(), [BringUp, WaitHealthy]);
    assert_eq!(store.last_generation(), 2);
    assert_live_is(&store, &s.root, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_unhealthy_first_generation_has_nothing_to_roll_back_to() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut store = StackStore::open(StoreConfig::new(STACK, root.join("live"))).unwrap();
    let c = cycle(&mut store, &tree(root, 1), 1).unwrap();
    let fake = FakeControl::failing(&[(WaitHealthy, 1)]);
    let (result, store) = commit(store, c, &fake, Stack::Stopped).await;
    assert_failed(&result, Phase::Health, &["unhealthy"]);
    assert_eq!(fake.calls(), [BringUp, WaitHealthy]);
    assert_eq!(store.last_generation(), 1);
    assert_live_is(&store, root, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_stop_that_fails_during_the_rollback_brings_the_new_generation_up_again_untouched() {
    let mut s = at_generation_1();
    let c = s.changed_generation_2();
    let fake = FakeControl::failing(&[(WaitHealthy, 1), (Stop, 1)]);
    let (result, store) = commit(s.store, c, &fake, Stack::Stopped).await;
    assert_failed(
        &result,
        Phase::Health,
        &[
            "unhealthy",
            "rolling back failed: stopping",
            "No space left",
        ],
    );
    assert_eq!(fake.calls(), [BringUp, WaitHealthy, Stop, BringUp]);
    assert_eq!(store.last_generation(), 2);
    assert_eq!(store.state().rolled_back_from, None);
    assert_live_is(&store, &s.root, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_previous_generation_that_is_unhealthy_too_is_restored_and_reported() {
    let mut s = at_generation_1();
    let c = s.changed_generation_2();
    let fake = FakeControl::failing(&[(WaitHealthy, 1), (WaitHealthy, 2)]);
    let (result, store) = commit(s.store, c, &fake, Stack::Stopped).await;
    assert_failed(
        &result,
        Phase::Health,
        &["rolling back failed", "generation 1 not healthy either"],
    );
    assert_eq!(
        fake.calls(),
        [BringUp, WaitHealthy, Stop, BringUp, WaitHealthy]
    );
    assert_eq!(store.last_generation(), 1);
    assert_live_is(&store, &s.root, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_rollback_whose_start_fails_has_still_restored_the_data() {
    let mut s = at_generation_1();
    let c = s.changed_generation_2();
    let fake = FakeControl::failing(&[(WaitHealthy, 1), (BringUp, 2)]);
    let (result, store) = commit(s.store, c, &fake, Stack::Stopped).await;
    assert_failed(
        &result,
        Phase::Health,
        &["rolling back failed: bringing it up", "port 5432"],
    );
    assert_eq!(fake.calls(), [BringUp, WaitHealthy, Stop, BringUp]);
    assert_eq!(store.last_generation(), 1);
    assert_live_is(&store, &s.root, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_commit_refused_before_its_journal_brings_the_previous_generation_up_again() {
    for bring_up_fails in [false, true] {
        let mut s = at_generation_1();
        let c = s.changed_generation_2();
        // Something outside the stopped stack writes after the plan: the commit refuses.
        let stray = s.store.live_path().join("stray");
        fs::write(&stray, b"written by a process that was not stopped").unwrap();
        let failing: &[(Call, usize)] = if bring_up_fails { &[(BringUp, 1)] } else { &[] };
        let fake = FakeControl::failing(failing);
        let (result, store) = commit(s.store, c, &fake, Stack::Stopped).await;
        assert_failed(
            &result,
            Phase::Commit,
            &["stray", "changed after the commit was planned"],
        );
        let why = result.unwrap_err().1;
        assert_eq!(
            why.contains("bringing the stack up again failed too"),
            bring_up_fails,
            "{why}"
        );
        assert_eq!(fake.calls(), [BringUp]);
        assert_eq!(store.last_generation(), 1);
        fs::remove_file(&stray).unwrap();
        assert_live_is(&store, &s.root, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_changing_commit_without_a_stopped_stack_is_refused_and_nothing_is_touched() {
    let mut s = at_generation_1();
    let c = s.changed_generation_2();
    let fake = FakeControl::failing(&[]);
    let (result, store) = commit(s.store, c, &fake, Stack::Running).await;
    assert_failed(&result, Phase::Commit, &["was not stopped"]);
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    assert_eq!(store.last_generation(), 1);
    assert_live_is(&store, &s.root, 1);
}

// ------------------------------------------------------------------------------------------------
// A commit that changes nothing (the stack kept running)

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_unchanged_generation_commits_without_a_stop_and_brings_up_what_is_not_running() {
    let mut s = at_generation_1();
    let c = s.unchanged_generation_2();
    let fake = FakeControl::failing(&[]);
    let (result, store) = commit(s.store, c, &fake, Stack::Running).await;
    assert_eq!(result, Ok(0));
    assert_eq!(fake.calls(), [BringUp, WaitHealthy]);
    assert_eq!(store.last_generation(), 2);
    assert_eq!(
        (store.state().target_downtime_ms, store.state().bytes_sent),
        (0, BYTES)
    );
    assert_live_is(&store, &s.root, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_unchanged_generation_that_is_unhealthy_is_reported_never_rolled_back() {
    for (failing, says, asked) in [
        ((WaitHealthy, 1), "unhealthy", &[BringUp, WaitHealthy][..]),
        ((BringUp, 1), "bringing the stack up failed", &[BringUp][..]),
    ] {
        let mut s = at_generation_1();
        let c = s.unchanged_generation_2();
        let fake = FakeControl::failing(&[failing]);
        let (result, store) = commit(s.store, c, &fake, Stack::Running).await;
        assert_failed(&result, Phase::Health, &[says]);
        assert_eq!(fake.calls(), asked);
        assert_eq!(store.last_generation(), 2);
        assert_live_is(&store, &s.root, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_unchanged_generation_the_store_refuses_touches_neither_the_stack_nor_the_data() {
    let mut s = at_generation_1();
    let c = s.unchanged_generation_2();
    // The same generation again: the store refuses to prepare it.
    let p = s.store.prepare(&c).unwrap();
    s.store.commit_unchanged(p, 1).unwrap();
    let fake = FakeControl::failing(&[]);
    let (result, store) = commit(s.store, c, &fake, Stack::Running).await;
    assert_failed(
        &result,
        Phase::Commit,
        &["not above the committed generation 2"],
    );
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    assert_eq!(store.last_generation(), 2);
    assert_live_is(&store, &s.root, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_unchanged_generation_is_committed_even_when_docker_does_not_answer() {
    let mut s = at_generation_1();
    let c = s.unchanged_generation_2();
    let connected = Mutex::new(false);
    let (result, store) = commit_with(s.store, c, true, None, BYTES, || async {
        *connected.lock().unwrap() = true;
        Err("cannot reach the Docker engine".to_owned())
    })
    .await;
    assert_failed(
        &result,
        Phase::Health,
        &["docker: cannot reach the Docker engine"],
    );
    assert!(*connected.lock().unwrap());
    assert_eq!(store.last_generation(), 2);
    assert_live_is(&store, &s.root, 1);
}
