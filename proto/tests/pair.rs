//! A whole sync cycle between a `SourceSession` and a `TargetSession`, in memory.
//!
//! `Pair` is a deterministic harness in the manner of quinn-proto's test `Pair`: two in-memory
//! trees, two sessions, two in-memory drivers that do what the sessions ask (scan, stop and start
//! the "stack", stream files with the real delta engine, stage, commit), and one link that carries
//! real wire frames and can cut, duplicate or corrupt any single message.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use stackclone_proto::delta::{
    Basis, Chunk, FileReceiver, FileSender, SenderConfig, SignatureBuilder, Sink,
};
use stackclone_proto::flag::{SignedStatus, Status};
use stackclone_proto::lineage::{Claim, Held, HistoryId, LINEAGE_FILE, Lineage, Role};
use stackclone_proto::manifest::{Entry, EntryKind, Hash, Manifest, Meta, Xattr};
use stackclone_proto::msg::{Mode, Pass, Phase, Refusal, SourceMsg, TargetMsg};
use stackclone_proto::path::StackPath;
use stackclone_proto::plan::Upsert;
use stackclone_proto::session::{
    BadStream, Cause, CycleError, OnStopTimeout, STALL_TIMEOUT, SourceAction, SourceConfig,
    SourceReport, SourceSession, StackPolicy, StackState, StageOutcome, TargetAction, TargetConfig,
    TargetReport, TargetSession, Violation,
};
use stackclone_proto::wire;

const NOW: i64 = 1_800_000_000;

// ------------------------------------------------------------------------------------------------
// In-memory trees

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File {
        data: Vec<u8>,
        link_group: Option<u32>,
    },
    Dir,
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    node: Node,
    meta: Meta,
    xattrs: Vec<Xattr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tree(BTreeMap<StackPath, Item>);

fn p(s: &str) -> StackPath {
    StackPath::new(s).unwrap()
}

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 999,
        gid: 999,
        mtime_ns: 1_700_000_000_000_000_001,
    }
}

impl Tree {
    fn dir(mut self, path: &str) -> Self {
        self.0.insert(
            p(path),
            Item {
                node: Node::Dir,
                meta: meta(0o755),
                xattrs: vec![],
            },
        );
        self
    }
    fn file(mut self, path: &str, data: impl Into<Vec<u8>>) -> Self {
        let node = Node::File {
            data: data.into(),
            link_group: None,
        };
        self.0.insert(
            p(path),
            Item {
                node,
                meta: meta(0o640),
                xattrs: vec![],
            },
        );
        self
    }
    fn link(mut self, path: &str, target: &str) -> Self {
        let node = Node::Symlink(target.as_bytes().to_vec());
        self.0.insert(
            p(path),
            Item {
                node,
                meta: meta(0o777),
                xattrs: vec![],
            },
        );
        self
    }
    fn edit(mut self, path: &str, f: impl FnOnce(&mut Item)) -> Self {
        f(self.0.get_mut(&p(path)).unwrap());
        self
    }
    fn remove(mut self, path: &str) -> Self {
        let gone = p(path);
        self.0.retain(|k, _| !k.starts_with(&gone));
        self
    }
    fn data(&self, path: &StackPath) -> Option<&[u8]> {
        match &self.0.get(path)?.node {
            Node::File { data, .. } => Some(data),
            _ => None,
        }
    }

    fn manifest(&self) -> Manifest {
        let entries = self
            .0
            .iter()
            .map(|(path, item)| Entry {
                path: path.clone(),
                kind: match &item.node {
                    Node::File { data, link_group } => EntryKind::File {
                        size: data.len() as u64,
                        hash: Hash::of(data),
                        link_group: *link_group,
                    },
                    Node::Dir => EntryKind::Dir,
                    Node::Symlink(t) => EntryKind::Symlink { target: t.clone() },
                },
                meta: item.meta,
                xattrs: item.xattrs.clone(),
            })
            .collect();
        Manifest::new(entries).unwrap()
    }
}

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Generation 1: every kind of entry the manifest knows.
fn gen1() -> Tree {
    let mut t = Tree::default()
        .dir("app")
        .file("app/config.yml", "listen: 8080\n")
        .file("app/empty", "")
        .dir("db")
        .file("db/big.dat", noise(1, 300_000))
        .file("db/other.dat", noise(2, 70_000))
        .dir("empty-dir")
        .file("names-\u{e9}\n-newline", "odd name")
        .link("current", "db/big.dat")
        .link("dangling", "/nowhere/at/all")
        .file("hard-a", "linked content")
        .file("hard-b", "linked content")
        .file("setuid-bin", noise(3, 5000))
        .edit("setuid-bin", |i| i.meta.mode = 0o4755)
        .edit("db", |i| i.meta.mode = 0o1777)
        .edit("app/config.yml", |i| {
            i.xattrs = vec![Xattr {
                name: b"user.origin".to_vec(),
                value: b"primary".to_vec(),
            }]
        });
    for path in ["hard-a", "hard-b"] {
        t = t.edit(path, |i| {
            if let Node::File { link_group, .. } = &mut i.node {
                *link_group = Some(0);
            }
        });
    }
    // A name that is not UTF-8.
    t.0.insert(
        StackPath::new(b"app/\xff\xfe-latin1".to_vec()).unwrap(),
        Item {
            node: Node::File {
                data: b"bytes".to_vec(),
                link_group: None,
            },
            meta: meta(0o600),
            xattrs: vec![],
        },
    );
    t
}

/// Generation 2: edits in place, a rename, type changes, deletes, metadata changes.
fn gen2() -> Tree {
    let mut big = noise(1, 300_000);
    big[150_000..150_100].copy_from_slice(&[7u8; 100]);
    big.extend_from_slice(b"appended rows");
    gen1()
        .file("db/big.dat", big)
        .remove("db/other.dat")
        .file("db/renamed.dat", noise(2, 70_000))
        .remove("app/empty")
        .dir("app/empty")
        .remove("empty-dir")
        .file("empty-dir", "now a file")
        .link("current", "db/renamed.dat")
        .edit("app/config.yml", |i| i.meta.uid = 0)
        .file("new.txt", "hello")
}

// ------------------------------------------------------------------------------------------------
// Drivers

struct VecBasis<'a>(&'a [u8]);
impl Basis for VecBasis<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = offset as usize;
        let src = self
            .0
            .get(start..start + buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[derive(Default)]
struct VecSink(Vec<u8>);
impl Sink for VecSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }
    fn write_zeros(&mut self, len: u64) -> std::io::Result<()> {
        self.0.resize(self.0.len() + len as usize, 0);
        Ok(())
    }
}

struct SourceSide {
    tree: Tree,
    session: SourceSession,
    running: bool,
    stops: u32,
    /// Applied to the tree while the stack is being stopped (last writes before the stop).
    on_stop: Option<Tree>,
    outbox: Vec<SourceMsg>,
    done: Option<Result<SourceReport, CycleError>>,
    files_sent: Vec<StackPath>,
    /// Services the stop reports as killed at their stop timeout.
    killed: Vec<String>,
    /// Starting the stack again fails (Docker's answer).
    start_fails: Option<String>,
    /// The driver is told to shut down as soon as the flag is out.
    shutdown_on_flag: bool,
    /// The last manifest the target committed, with its generation, as the driver records it.
    recorded: Option<(u64, Arc<Manifest>)>,
}

impl SourceSide {
    fn new(tree: Tree, cfg: SourceConfig, key: SigningKey) -> Self {
        Self {
            tree,
            session: SourceSession::new(cfg, key),
            running: true,
            stops: 0,
            on_stop: None,
            outbox: vec![],
            done: None,
            files_sent: vec![],
            killed: vec![],
            start_fails: None,
            shutdown_on_flag: false,
            recorded: None,
        }
    }

    fn drive(&mut self) {
        while let Some(action) = self.session.poll_action() {
            match action {
                SourceAction::Scan { pass } => {
                    self.session.handle_scanned(pass, Ok(self.tree.manifest()))
                }
                SourceAction::StopStack => {
                    assert!(self.running, "stack stopped twice");
                    self.running = false;
                    self.stops += 1;
                    if let Some(t) = self.on_stop.take() {
                        self.tree = t;
                    }
                    self.session.handle_stack_stopped(Ok(self.killed.clone()));
                }
                SourceAction::StartStack => {
                    assert!(!self.running, "stack started while running");
                    match self.start_fails.clone() {
                        None => {
                            self.running = true;
                            self.session.handle_stack_started(Ok(()));
                        }
                        Some(e) => {
                            // Docker's answer; the harness's check that no stack is left down
                            // does not apply to this one.
                            self.running = true;
                            self.session.handle_stack_started(Err(e));
                        }
                    }
                }
                SourceAction::SendFile {
                    id, path, basis, ..
                } => {
                    let data = self.tree.data(&path).unwrap().to_vec();
                    let cfg = SenderConfig {
                        window: 64 << 10,
                        ..SenderConfig::default()
                    };
                    let mut sender = FileSender::new(basis.as_ref(), cfg).unwrap();
                    self.outbox.push(SourceMsg::FileBegin {
                        id,
                        len: data.len() as u64,
                    });
                    for window in data.chunks(cfg.window) {
                        for chunk in sender.send_window(window).unwrap() {
                            self.outbox.push(SourceMsg::FileData { id, chunk });
                        }
                    }
                    let sent = sender.finish();
                    self.outbox.push(SourceMsg::FileEnd {
                        id,
                        hash: sent.hash,
                        len: sent.len,
                    });
                    self.files_sent.push(path);
                    self.session.handle_file_sent(id, Ok(()));
                }
                SourceAction::Done(result) => {
                    // As the driver does: the committed manifest is the next cycle's base.
                    if let (Ok(r), Some(m)) = (&result, self.session.signed_manifest()) {
                        self.recorded = Some((r.generation, m.clone()));
                    }
                    self.done = Some(result);
                }
            }
        }
        while let Some(m) = self.session.poll_message() {
            let flag = matches!(m, SourceMsg::Flag(_));
            self.outbox.push(m);
            if flag && self.shutdown_on_flag {
                // SIGTERM right after the flag went out.
                self.session.handle_shutdown();
            }
        }
    }
}

struct Incoming {
    receiver: FileReceiver,
    sink: VecSink,
}

struct TargetSide {
    live: Tree,
    staged: HashMap<Hash, Vec<u8>>,
    last_generation: u64,
    allow: Vec<String>,
    session: TargetSession,
    wanted: HashMap<u32, Option<StackPath>>,
    incoming: HashMap<u32, Incoming>,
    outbox: Vec<TargetMsg>,
    done: Option<Result<TargetReport, CycleError>>,
    commits: u32,
    /// Of those, commits the session said need no stop of the stack.
    commits_without_stop: u32,
    /// Paths the session asked to receive in place.
    in_place: Vec<StackPath>,
    /// Times the session asked to lock and scan the stack.
    loads: u32,
    /// Answer `LoadStack` the way the real driver does: "opened" at once, the scanned state only
    /// after this many more source messages arrived (or when nothing else can move).
    scan_late: Option<usize>,
    /// The scanned state not handed over yet, and the messages still to wait for.
    scanning: Option<(StackState, usize)>,
    /// The standby's stack runs.
    running: bool,
    /// Times the session stopped and started the standby (a commit's start is not counted).
    stops: u32,
    starts: u32,
    /// What the standby's own services leave in the live tree by the time their stop returns:
    /// their writes since the cycle's first scan and their shutdown writes (a database's
    /// shutdown checkpoint).
    on_stop: Option<Tree>,
    /// Services the standby's stop reports as killed at their stop timeout.
    killed: Vec<String>,
    /// The stack's role and committed history.
    held: Held,
    /// `keep_generations` > 0.
    keeps_generations: bool,
    /// The commit fails with this reason (a full disk, say); the live tree stays.
    commit_fails: Option<String>,
    /// The manifest of the last commit (what the store hands a session as its base).
    committed: Arc<Manifest>,
    /// A data-only stack: its stop stops nothing, and the driver says so.
    data_only: bool,
    /// Rescans of the stopped standby asked for.
    rescans: u32,
}

impl TargetSide {
    fn new(live: Tree, flag_key: &SigningKey) -> Self {
        Self {
            live,
            staged: HashMap::new(),
            last_generation: 0,
            allow: vec!["primary".into()],
            session: TargetSession::new(target_cfg(flag_key), Instant::now()),
            wanted: HashMap::new(),
            incoming: HashMap::new(),
            outbox: vec![],
            done: None,
            commits: 0,
            commits_without_stop: 0,
            in_place: vec![],
            loads: 0,
            scan_late: None,
            scanning: None,
            running: true,
            stops: 0,
            starts: 0,
            on_stop: None,
            killed: vec![],
            held: Held::default(),
            keeps_generations: true,
            commit_fails: None,
            committed: Arc::default(),
            data_only: false,
            rescans: 0,
        }
    }

    fn state(&self) -> StackState {
        StackState {
            last_generation: self.last_generation,
            held: self.held.clone(),
            live: self.live.manifest(),
            staged: self.staged.keys().copied().collect(),
            staged_in_place: HashMap::new(),
            outside_links: Default::default(),
            committed: self.committed.clone(),
        }
    }

    /// The late scan is done: hand its state to the session.
    fn finish_scan(&mut self) {
        if let Some((state, _)) = self.scanning.take() {
            self.session.handle_stack(Ok(state));
        }
    }

    /// A new cycle on the same host: staging and generations survive, the session is new.
    fn next_cycle(&mut self, flag_key: &SigningKey) {
        self.session = TargetSession::new(target_cfg(flag_key), Instant::now());
        self.wanted.clear();
        self.incoming.clear();
        self.outbox.clear();
        self.done = None;
    }

    fn receive(&mut self, msg: SourceMsg) {
        if let Some((_, left)) = &mut self.scanning {
            if *left == 0 {
                self.finish_scan();
            } else {
                *left -= 1;
            }
        }
        match msg {
            SourceMsg::FileBegin { id, len } => {
                let basis_len = match self.wanted.get(&id) {
                    Some(b) => b
                        .as_ref()
                        .and_then(|b| self.live.data(b))
                        .map(|d| d.len() as u64),
                    None => return self.session.handle_bad_stream(BadStream::NotWanted { id }),
                };
                let receiver = FileReceiver::new(basis_len, len);
                self.incoming.insert(
                    id,
                    Incoming {
                        receiver,
                        sink: VecSink::default(),
                    },
                );
            }
            SourceMsg::FileData { id, chunk } => {
                let basis = self.wanted.get(&id).cloned().flatten();
                let Some(inc) = self.incoming.get_mut(&id) else {
                    return;
                };
                let data = basis
                    .as_ref()
                    .and_then(|b| self.live.data(b))
                    .unwrap_or(&[]);
                if inc
                    .receiver
                    .handle_chunk(chunk, &mut VecBasis(data), &mut inc.sink)
                    .is_err()
                {
                    self.incoming.remove(&id);
                    self.wanted.remove(&id);
                    self.session.handle_staged(id, StageOutcome::Mismatch);
                }
            }
            SourceMsg::FileEnd { id, hash, .. } => {
                let Some(mut inc) = self.incoming.remove(&id) else {
                    return;
                };
                self.wanted.remove(&id);
                match inc.receiver.finish(&mut inc.sink, hash) {
                    Ok(v) => {
                        self.staged.insert(v.hash(), inc.sink.0);
                        self.session.handle_staged(id, StageOutcome::Staged(v));
                    }
                    Err(_) => self.session.handle_staged(id, StageOutcome::Mismatch),
                }
            }
            SourceMsg::FileAbort { id, reason } => {
                self.incoming.remove(&id);
                self.wanted.remove(&id);
                self.session
                    .handle_staged(id, StageOutcome::SourceAborted(reason));
            }
            other => self.session.handle_message(other, NOW + 5),
        }
    }

    fn drive(&mut self) {
        while let Some(action) = self.session.poll_action() {
            match action {
                TargetAction::LookupStack { stack } if stack != "web" => {
                    self.session
                        .handle_policy(Err(Refusal::UnknownStack { stack }));
                }
                TargetAction::LookupStack { .. } => {
                    self.session.handle_policy(Ok(StackPolicy {
                        allow: self.allow.clone(),
                        held: self.held.clone(),
                        keeps_generations: self.keeps_generations,
                    }));
                }
                TargetAction::LoadStack { .. } => {
                    self.loads += 1;
                    let state = self.state();
                    match self.scan_late {
                        None => self.session.handle_stack(Ok(state)),
                        Some(after) => {
                            self.session
                                .handle_opened(self.last_generation, self.committed.clone());
                            self.scanning = Some((state, after));
                        }
                    }
                }
                TargetAction::Signature { id, basis } => {
                    let data = self.live.data(&basis).unwrap();
                    let mut b = SignatureBuilder::new(data.len() as u64);
                    b.update(data);
                    self.session.handle_signature(id, Ok(b.finish()));
                }
                TargetAction::StageLocal { id, from, hash } => {
                    let data = self.live.data(&from).unwrap().to_vec();
                    let outcome = match verify_copy(&data, hash) {
                        Some(v) => {
                            self.staged.insert(hash, data);
                            StageOutcome::Staged(v)
                        }
                        None => StageOutcome::Mismatch,
                    };
                    self.session.handle_staged(id, outcome);
                }
                TargetAction::Receive {
                    id,
                    basis,
                    in_place,
                    path,
                } => {
                    if in_place {
                        self.in_place.push(path);
                    }
                    self.wanted.insert(id, basis);
                }
                TargetAction::StopStack => {
                    assert!(self.running, "standby stopped twice");
                    self.stops += 1;
                    if let Some(t) = self.on_stop.take() {
                        self.live = t;
                    }
                    if self.data_only {
                        // Nothing to stop: what "runs" (nothing) keeps running.
                        self.session.handle_nothing_to_stop();
                    } else {
                        self.running = false;
                        self.session.handle_stack_stopped(Ok(self.killed.clone()));
                    }
                }
                TargetAction::ScanStopped => {
                    assert!(!self.running, "rescan of a running standby");
                    self.rescans += 1;
                    self.session.handle_stopped_scan(Ok(self.state()));
                }
                TargetAction::StartStack => {
                    assert!(
                        !self.running || self.data_only,
                        "standby started while running"
                    );
                    self.running = true;
                    self.starts += 1;
                    self.session.handle_stack_started(Ok(()));
                }
                TargetAction::Commit(_) if self.commit_fails.is_some() => {
                    let reason = self.commit_fails.clone().unwrap_or_default();
                    self.running = true;
                    self.session.handle_committed(Err((Phase::Commit, reason)));
                }
                TargetAction::Commit(commit) => {
                    self.committed = Arc::new(commit.manifest().clone());
                    if commit.without_stop() {
                        assert!(
                            self.running,
                            "a commit without stop found the standby stopped"
                        );
                        assert!(
                            commit.changes().is_empty(),
                            "changes into a running standby"
                        );
                    } else {
                        assert!(
                            !self.running || self.data_only,
                            "a commit with changes found the standby running"
                        );
                        // The real store's safety net: the tree is still the one planned against.
                        assert_eq!(
                            &self.live.manifest(),
                            commit.live(),
                            "planned on a stale scan"
                        );
                    }
                    let mut next = self.live.clone();
                    for path in &commit.changes().deletes {
                        next.0.remove(path);
                    }
                    for upsert in &commit.changes().upserts {
                        let e = upsert.entry();
                        let node = match &e.kind {
                            EntryKind::Dir => Node::Dir,
                            EntryKind::Symlink { target } => Node::Symlink(target.clone()),
                            EntryKind::File {
                                hash, link_group, ..
                            } => {
                                let data = match upsert {
                                    Upsert::Meta(_) => self.live.data(&e.path).unwrap().to_vec(),
                                    _ => self
                                        .staged
                                        .get(hash)
                                        .cloned()
                                        .or_else(|| self.live.data(&e.path).map(<[u8]>::to_vec))
                                        .expect("commit without staged content"),
                                };
                                Node::File {
                                    data,
                                    link_group: *link_group,
                                }
                            }
                        };
                        next.0.insert(
                            e.path.clone(),
                            Item {
                                node,
                                meta: e.meta,
                                xattrs: e.xattrs.clone(),
                            },
                        );
                    }
                    assert_eq!(
                        &next.manifest(),
                        commit.manifest(),
                        "plan did not produce the manifest"
                    );
                    self.live = next;
                    // A commit moves staged contents into the live tree; what is left is stale.
                    self.staged.clear();
                    self.last_generation = commit.generation();
                    // The store records the history the flag signed.
                    let history = commit.status().status().history;
                    if self.held.history.map(|l| l.history) != Some(history) {
                        self.held.history = Some(Lineage::new(history));
                    }
                    if commit.hand_over() {
                        self.held.role = Role::Promoted { at: NOW };
                    }
                    self.commits += 1;
                    self.commits_without_stop += u32::from(commit.without_stop());
                    // The commit brings the stack up, whatever it comes to.
                    self.running = true;
                    self.session.handle_committed(Ok(42));
                }
                TargetAction::Done(result) => self.done = Some(result),
            }
        }
        while let Some(m) = self.session.poll_message() {
            self.outbox.push(m);
        }
    }
}

/// Copying content that is already on the target goes through the same verifier as a transfer.
fn verify_copy(data: &[u8], hash: Hash) -> Option<stackclone_proto::delta::Verified> {
    let mut r = FileReceiver::new(None, data.len() as u64);
    let mut sink = VecSink::default();
    for piece in data.chunks(1 << 20) {
        let chunk = Chunk::Literal {
            zstd: false,
            out_len: piece.len() as u32,
            bytes: piece.to_vec(),
        };
        r.handle_chunk(chunk, &mut VecBasis(&[]), &mut sink).ok()?;
    }
    r.finish(&mut sink, hash).ok()
}

fn flag_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn target_cfg(key: &SigningKey) -> TargetConfig {
    TargetConfig {
        target_id: "standby".into(),
        peer: "primary".into(),
        peer_flag_key: Some(key.verifying_key()),
        max_skew_secs: 600,
    }
}

fn source_cfg(mode: Mode, precopy: bool) -> SourceConfig {
    SourceConfig {
        stack: "web".into(),
        source_id: "primary".into(),
        target_id: "standby".into(),
        mode,
        precopy,
        stop_stack: true,
        allow_empty: false,
        max_delete: 0.5,
        on_stop_timeout: OnStopTimeout::Warn,
        claim: Claim {
            history: HISTORY,
            replace_diverged: false,
            hand_over: false,
        },
        base: None,
    }
}

/// The source's claim after `Hello`: the tests' history, no fail-back.
fn claim() -> SourceMsg {
    SourceMsg::Claim(Claim {
        history: HISTORY,
        replace_diverged: false,
        hand_over: false,
    })
}

/// The history of the source's data in these tests.
const HISTORY: HistoryId = HistoryId([1; 16]);

// ------------------------------------------------------------------------------------------------
// The link

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Deliver the first `n` messages, then the connection is gone.
    CutAfter(usize),
    /// Deliver message `n` twice.
    Duplicate(usize),
    /// Flip a byte in the payload of message `n` if it is file data.
    CorruptData(usize),
    /// XOR the byte at (`at` modulo the payload length) of message `n` with `mask`; a frame
    /// that no longer decodes ends the connection, as the driver's decoder would.
    Corrupt {
        n: usize,
        at: usize,
        mask: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToTarget,
    ToSource,
}

struct Pair {
    source: SourceSide,
    target: TargetSide,
    fault: Fault,
    /// Every message that crossed, in order.
    log: Vec<(Dir, String)>,
    /// A corrupted frame did not decode: the connection ends.
    undecodable: bool,
    /// The encoded frames, as sent (before any fault), for fuzz seeds.
    frames: Vec<(Dir, Vec<u8>)>,
    /// Times the idle watchdog had to end a stalled cycle.
    idle_timeouts: u32,
}

impl Pair {
    fn new(source_tree: Tree, target_tree: Tree) -> Self {
        Self::with(source_tree, target_tree, source_cfg(Mode::Sync, false))
    }

    fn with(source_tree: Tree, target_tree: Tree, cfg: SourceConfig) -> Self {
        let key = flag_key();
        Self {
            target: TargetSide::new(target_tree, &key),
            source: SourceSide::new(source_tree, cfg, key),
            fault: Fault::None,
            log: vec![],
            undecodable: false,
            frames: vec![],
            idle_timeouts: 0,
        }
    }

    /// A new cycle: new sessions, the same hosts.
    /// The next cycle, on the same target; the source starts from what its driver recorded of
    /// the last commit (its base), unless `cfg` names one.
    fn next_cycle(&mut self, source_tree: Tree, mut cfg: SourceConfig) {
        let key = flag_key();
        self.target.next_cycle(&key);
        let recorded = self.source.recorded.take();
        if cfg.base.is_none() {
            cfg.base = recorded.clone();
        }
        self.source = SourceSide::new(source_tree, cfg, key);
        self.source.recorded = recorded;
        self.fault = Fault::None;
        self.log.clear();
        self.undecodable = false;
        self.frames.clear();
    }

    /// Runs until both sides are done or the link is cut and nothing moves.
    fn run(&mut self) {
        let mut cut = false;
        for _ in 0..1_000_000 {
            self.source.drive();
            self.target.drive();
            let to_target: Vec<_> = self.source.outbox.drain(..).collect();
            let to_source: Vec<_> = self.target.outbox.drain(..).collect();
            if to_target.is_empty() && to_source.is_empty() && self.target.scanning.is_some() {
                // Nothing else can move: the target's scan is what everyone waits for.
                self.target.finish_scan();
                continue;
            }
            if to_target.is_empty() && to_source.is_empty() {
                let waiting = self.source.done.is_none() || self.target.done.is_none();
                if !waiting || cut {
                    // However the cycle ended, neither side's stack is left down.
                    if let Some(done) = &self.source.done {
                        let handed_over = matches!(done, Ok(r) if r.handed_over);
                        assert!(self.source.running || handed_over, "source stack left down");
                    }
                    if self.target.done.is_some() {
                        assert!(self.target.running, "standby left down");
                    }
                    return;
                }
                // Nothing in flight but a side is still waiting. Without a fault that is a bug.
                // With one (a corrupted id, say), the drivers' idle watchdog ends the cycle:
                // model it as a lost connection, and the checks below still apply.
                assert!(self.fault != Fault::None, "deadlock; log: {:#?}", self.log);
                cut = true;
                self.idle_timeouts += 1;
                if self.target.done.is_none() {
                    // The target's own stall rule, on a virtual clock: whatever the fault, a
                    // target that waits has a deadline.
                    let at = self.target.session.poll_timeout().unwrap_or_else(|| {
                        panic!("the target waits with no deadline; log: {:#?}", self.log)
                    });
                    self.target.session.handle_timeout(at);
                }
                if self.source.done.is_none() {
                    self.source.session.handle_connection_lost("idle timeout");
                }
                continue;
            }
            for msg in to_target {
                if cut {
                    continue;
                }
                for frame in self.transmit(Dir::ToTarget, &msg) {
                    self.target
                        .receive(wire::decode::<SourceMsg>(&frame).unwrap());
                }
                cut = self.check_cut();
            }
            for msg in to_source {
                if cut {
                    continue;
                }
                for frame in self.transmit(Dir::ToSource, &msg) {
                    self.source
                        .session
                        .handle_message(wire::decode(&frame).unwrap(), NOW);
                }
                cut = self.check_cut();
            }
            if cut && self.source.done.is_none() {
                self.source
                    .session
                    .handle_connection_lost("cut by the test");
            }
            if cut && self.target.done.is_none() {
                self.target
                    .session
                    .handle_connection_lost("cut by the test");
            }
        }
        panic!("cycle did not finish");
    }

    fn check_cut(&self) -> bool {
        self.undecodable || matches!(self.fault, Fault::CutAfter(n) if self.log.len() >= n)
    }

    /// Encodes `msg` as a real frame and applies the fault; returns the payloads delivered.
    fn transmit<T: serde::Serialize + std::fmt::Debug>(
        &mut self,
        dir: Dir,
        msg: &T,
    ) -> Vec<Vec<u8>> {
        let index = self.log.len();
        let name = format!("{msg:?}").chars().take(60).collect::<String>();
        self.log.push((dir, name));
        let frame = wire::encode_frame(msg).unwrap();
        self.frames.push((dir, frame.clone()));
        let mut payload = frame[wire::HEADER_LEN..].to_vec();
        match self.fault {
            Fault::Duplicate(n) if n == index => vec![payload.clone(), payload],
            Fault::CorruptData(n) if n == index && self.log[index].1.starts_with("FileData") => {
                let at = payload.len() - 1 - (payload.len() / 3);
                payload[at] ^= 0x5a;
                // A corrupted frame may no longer decode at all; that is caught by the decoder
                // and would end the connection. Only deliver frames that still decode.
                if wire::decode::<SourceMsg>(&payload).is_ok() {
                    vec![payload]
                } else {
                    vec![]
                }
            }
            Fault::Corrupt { n, at, mask } if n == index => {
                let at = at % payload.len();
                payload[at] ^= mask;
                let decodes = match dir {
                    Dir::ToTarget => wire::decode::<SourceMsg>(&payload).is_ok(),
                    Dir::ToSource => wire::decode::<TargetMsg>(&payload).is_ok(),
                };
                if decodes {
                    vec![payload]
                } else {
                    self.undecodable = true;
                    vec![]
                }
            }
            _ => vec![payload],
        }
    }

    fn flag_index(&self) -> Option<usize> {
        self.log.iter().position(|(_, m)| m.starts_with("Flag"))
    }
}

fn err_cause<T: std::fmt::Debug>(r: &Option<Result<T, CycleError>>) -> &Cause {
    &r.as_ref()
        .expect("side did not finish")
        .as_ref()
        .unwrap_err()
        .cause
}

// ------------------------------------------------------------------------------------------------
// Tests

#[test]
fn first_cycle_copies_every_kind_of_entry() {
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.run();
    let report = pair.source.done.clone().unwrap().expect("source failed");
    pair.target.done.clone().unwrap().expect("target failed");
    assert_eq!(
        pair.target.live,
        gen1(),
        "target tree differs from the source tree"
    );
    assert_eq!(pair.target.last_generation, 1);
    assert_eq!(report.generation, 1);
    assert_eq!(report.target_downtime_ms, Some(42));
    assert!(pair.source.running && pair.source.stops == 1);
    // hard-a and hard-b share one content: it crossed once.
    assert_eq!(
        pair.source
            .files_sent
            .iter()
            .filter(|p| p.as_bytes().starts_with(b"hard-"))
            .count(),
        1
    );
}

// ------------------------------------------------------------------------------------------------
// Lineage: promotion, split brain, fail-back

fn other_history() -> Lineage {
    Lineage::new(HistoryId([9; 16]))
}

fn refusal(pair: &Pair) -> Refusal {
    match pair.source.done.clone().unwrap() {
        Err(CycleError {
            cause: Cause::Refused(r),
            ..
        }) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn first_contact_takes_the_source_history_and_the_next_push_continues_it() {
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.run();
    let report = pair.target.done.clone().unwrap().unwrap();
    assert_eq!(pair.target.held.history, Some(Lineage::new(HISTORY)));
    assert_eq!(report.replaced, None, "an empty live dir replaced nothing");
    pair.next_cycle(gen2(), source_cfg(Mode::Sync, false));
    pair.run();
    pair.source
        .done
        .clone()
        .unwrap()
        .expect("the same history continues");
    assert_eq!(pair.target.live, gen2());
}

#[test]
fn a_promoted_standby_refuses_every_push_before_the_source_stops() {
    for replace_diverged in [false, true] {
        let mut pair = Pair::new(gen2(), gen1());
        pair.target.last_generation = 4;
        pair.target.held = Held {
            role: Role::Promoted { at: NOW - 60 },
            history: Some(Lineage::new(HISTORY).fork(HistoryId([2; 16]), 4)),
            generation: 4,
        };
        let mut cfg = source_cfg(Mode::Sync, true);
        cfg.claim.replace_diverged = replace_diverged;
        pair.next_cycle(gen2(), cfg);
        pair.run();
        let r = refusal(&pair);
        assert!(
            matches!(r, Refusal::Promoted { at, .. } if at == NOW - 60),
            "{r:?}"
        );
        let text = r.to_string();
        assert!(text.contains("no longer its primary"), "{text}");
        assert!(text.contains("demote web"), "{text}");
        assert_eq!(pair.source.stops, 0, "the source stack was stopped");
        assert!(pair.source.running);
        assert!(pair.source.files_sent.is_empty());
        assert_eq!(
            pair.target.loads, 0,
            "the store was opened for a refused push"
        );
        assert_eq!((pair.target.stops, pair.target.commits), (0, 0));
        assert_eq!(pair.target.live, gen1(), "the promoted copy changed");
    }
}

#[test]
fn another_history_is_refused_as_diverged_naming_both() {
    let mut pair = Pair::new(gen2(), gen1());
    pair.target.last_generation = 7;
    pair.target.held.history = Some(other_history());
    pair.target.held.generation = 7;
    pair.run();
    let r = refusal(&pair);
    let Refusal::Diverged { held, claimed, .. } = &r else {
        panic!("{r:?}")
    };
    assert!(held.contains(&HistoryId([9; 16]).short()), "{held}");
    assert!(held.contains("generation 7"), "{held}");
    assert_eq!(claimed, &HISTORY.short());
    assert!(r.to_string().contains("--fail-back"), "{r}");
    assert!(r.to_string().contains("--replace-diverged"), "{r}");
    assert_eq!(pair.source.stops, 0);
    assert_eq!((pair.target.stops, pair.target.commits), (0, 0));
    assert_eq!(pair.target.live, gen1());
}

#[test]
fn a_fail_back_replaces_the_diverged_copy_reports_it_and_hands_over() {
    let mut pair = Pair::new(gen2(), gen1());
    pair.target.last_generation = 3;
    pair.target.held.history = Some(other_history());
    pair.target.held.generation = 3;
    let mut cfg = source_cfg(Mode::Sync, true);
    cfg.claim.replace_diverged = true;
    cfg.claim.hand_over = true;
    pair.next_cycle(gen2(), cfg);
    pair.run();
    let report = pair.source.done.clone().unwrap().expect("fail-back failed");
    assert_eq!(pair.target.live, gen2());
    assert_eq!(pair.target.held.history, Some(Lineage::new(HISTORY)));
    let replaced = report.replaced.expect("the replaced tree is reported");
    assert_eq!(replaced.rollback_to, 3);
    assert!(replaced.paths > 0);
    assert_eq!(
        pair.target.done.clone().unwrap().unwrap().replaced,
        Some(replaced)
    );
    assert!(report.handed_over);
    assert!(
        !pair.source.running,
        "a hand-over leaves the old side stopped"
    );
    assert_eq!(pair.source.stops, 1);
    // The copy handed over to is the primary now: the host that handed it over is fenced off.
    assert!(matches!(pair.target.held.role, Role::Promoted { .. }));
    pair.next_cycle(gen2(), source_cfg(Mode::Sync, false));
    pair.source.running = true;
    pair.run();
    assert!(matches!(refusal(&pair), Refusal::Promoted { .. }));
    // Once demoted, a push of the same history continues it and replaces nothing.
    pair.target.held.role = Role::Standby;
    pair.next_cycle(gen2(), source_cfg(Mode::Sync, false));
    pair.run();
    let again = pair.source.done.clone().unwrap().expect("continues");
    assert_eq!(again.replaced, None);
    assert!(!again.handed_over);
    assert!(pair.source.running);
}

#[test]
fn replacing_a_diverged_copy_is_refused_where_nothing_would_keep_it() {
    let mut pair = Pair::new(gen2(), gen1());
    pair.target.held.history = Some(other_history());
    pair.target.keeps_generations = false;
    let mut cfg = source_cfg(Mode::Sync, true);
    cfg.claim.replace_diverged = true;
    pair.next_cycle(gen2(), cfg);
    pair.run();
    let r = refusal(&pair);
    assert!(r.to_string().contains("keep_generations"), "{r}");
    assert_eq!(pair.source.stops, 0);
    assert_eq!(pair.target.live, gen1());
}

#[test]
fn a_hand_over_whose_commit_fails_starts_the_source_again() {
    let mut pair = Pair::new(gen2(), gen1());
    let mut cfg = source_cfg(Mode::Sync, false);
    cfg.claim.replace_diverged = true;
    cfg.claim.hand_over = true;
    pair.next_cycle(gen2(), cfg);
    pair.target.commit_fails = Some("disk full".into());
    pair.run();
    assert!(pair.source.done.clone().unwrap().is_err());
    assert!(pair.source.running, "the old side was left stopped");
    assert_eq!(pair.target.live, gen1());
}

#[test]
fn a_flag_for_another_history_than_the_claim_is_refused() {
    let mut s = waiting_target(Instant::now());
    let empty = Manifest::new(vec![]).unwrap();
    s.handle_message(SourceMsg::FinalPass, NOW);
    s.handle_message(
        SourceMsg::ManifestEnd {
            pass: Pass::Final,
            entries: 0,
            root: empty.root(),
        },
        NOW,
    );
    while let Some(a) = s.poll_action() {
        match a {
            TargetAction::StopStack => s.handle_stack_stopped(Ok(vec![])),
            TargetAction::ScanStopped => s.handle_stopped_scan(Ok(empty_live_at_generation_1())),
            _ => {}
        }
    }
    let status = Status {
        stack: "web".into(),
        generation: 2,
        history: HistoryId([3; 16]),
        manifest_root: empty.root(),
        source_id: "primary".into(),
        target_id: "standby".into(),
        created_at: NOW,
    };
    s.handle_message(
        SourceMsg::Flag(SignedStatus::sign(status, &flag_key())),
        NOW,
    );
    // The standby was stopped for the final pass: it starts again before the cycle ends.
    let mut started = false;
    let err = loop {
        match s.poll_action() {
            Some(TargetAction::StartStack) => {
                started = true;
                s.handle_stack_started(Ok(()));
            }
            Some(TargetAction::Done(r)) => break r.unwrap_err(),
            Some(_) => {}
            None => panic!("the cycle did not end"),
        }
    };
    assert!(started);
    assert!(err.to_string().contains("history"), "{err}");
}

#[test]
fn second_cycle_sends_only_changes_and_uses_deltas_and_local_copies() {
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.run();
    pair.next_cycle(gen2(), source_cfg(Mode::Sync, false));
    pair.run();
    let report = pair
        .source
        .done
        .clone()
        .unwrap()
        .expect("second cycle failed");
    assert_eq!(pair.target.live, gen2());
    assert_eq!(pair.target.last_generation, 2);
    assert_eq!(
        pair.target.commits_without_stop, 0,
        "a real change stops the stack"
    );
    // Only the edited big file and the new files cross; the renamed file is copied locally.
    let mut sent: Vec<_> = pair
        .source
        .files_sent
        .iter()
        .map(|p| p.to_string())
        .collect();
    sent.sort();
    assert_eq!(sent, ["db/big.dat", "empty-dir", "new.txt"]);
    assert_eq!(report.files_delta, 1, "the edited big file goes as a delta");
    let t = pair.target.done.clone().unwrap().unwrap();
    assert_eq!(
        t.files_copied_locally, 1,
        "the renamed file is copied from the live tree"
    );
}

#[test]
fn an_unchanged_tree_sends_no_file_and_commits_the_next_generation() {
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.run();
    pair.next_cycle(gen1(), source_cfg(Mode::Sync, true));
    pair.run();
    assert!(pair.source.done.clone().unwrap().is_ok());
    assert!(pair.source.files_sent.is_empty());
    assert_eq!(pair.target.last_generation, 2);
    assert_eq!(pair.target.live, gen1());
    // The first generation stops the stack (it brings it up); the unchanged one need not: the
    // pre-copy pass showed the running standby already is the source's tree, and so is the
    // final manifest.
    assert_eq!(
        (pair.target.commits, pair.target.commits_without_stop),
        (2, 1)
    );
    assert_eq!(pair.target.stops, 1, "only the first generation stopped it");
}

/// Without a pre-copy pass the target cannot know, when the final pass begins, that nothing
/// will change: it stops the standby in parallel with the source's stop, as for any cycle, and
/// the unchanged generation is committed against the stopped scan and brought up again.
#[test]
fn without_precopy_an_unchanged_tree_still_stops_the_standby_with_the_source() {
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.run();
    pair.next_cycle(gen1(), source_cfg(Mode::Sync, false));
    pair.run();
    pair.source.done.clone().unwrap().expect("second cycle");
    assert!(pair.source.files_sent.is_empty());
    assert_eq!(pair.target.live, gen1());
    assert_eq!(pair.target.commits_without_stop, 0);
    assert_eq!(pair.target.stops, 2);
    // The standby's stop was asked for as soon as the final pass began, before the source's
    // final manifest (the source stops and scans meanwhile).
    let at = |name: &str| pair.log.iter().position(|(_, m)| m.starts_with(name));
    assert!(at("FinalPass").unwrap() < at("Manifest").unwrap());
}

/// A data-only standby has nothing to stop: the scan it was loaded with is what the final pass
/// is planned against, with no second scan, and the cycles commit exactly the source's tree.
#[test]
fn a_data_only_standby_is_not_scanned_twice() {
    for precopy in [false, true] {
        let mut pair = Pair::new(gen1(), Tree::default());
        pair.target.data_only = true;
        pair.run();
        pair.source.done.clone().unwrap().expect("first cycle");
        pair.next_cycle(gen2(), source_cfg(Mode::Sync, precopy));
        pair.target.data_only = true;
        pair.run();
        pair.source.done.clone().unwrap().expect("second cycle");
        assert_eq!(pair.target.live, gen2());
        assert_eq!(pair.target.rescans, 0, "precopy {precopy}");
        assert_eq!(pair.target.commits_without_stop, 0, "precopy {precopy}");
        // Nothing changed since: the generation is committed without a stop, which the store
        // commits without scanning the live dir again.
        pair.next_cycle(gen2(), source_cfg(Mode::Sync, precopy));
        pair.target.data_only = true;
        pair.run();
        pair.source.done.clone().unwrap().expect("third cycle");
        assert_eq!(pair.target.live, gen2());
        assert_eq!(
            (pair.target.rescans, pair.target.commits_without_stop),
            (0, 1),
            "precopy {precopy}"
        );
    }
    // The same cycles with a stack to stop do rescan.
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.run();
    assert!(pair.target.rescans > 0);
}

/// Bytes of the manifest messages one cycle sent to the target.
fn manifest_bytes(pair: &Pair) -> usize {
    pair.frames
        .iter()
        .zip(&pair.log)
        .filter(|(_, (dir, name))| *dir == Dir::ToTarget && name.starts_with("Manifest"))
        .map(|((_, frame), _)| frame.len())
        .sum()
}

/// Once the target committed a manifest, the next cycle's manifests go as changes against
/// it (and the final pass's against the pre-copy's): a cycle in which nothing changed sends
/// no entry at all, one in which a file changed sends that entry, and the target still commits
/// exactly the source's tree.
#[test]
fn manifests_after_the_first_commit_go_as_changes() {
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.run();
    pair.source.done.clone().unwrap().expect("first cycle");
    let whole = manifest_bytes(&pair);
    let names = |pair: &Pair| -> Vec<String> {
        pair.log
            .iter()
            .filter(|(d, n)| *d == Dir::ToTarget && n.starts_with("Manifest"))
            .map(|(_, n)| n.split([' ', '{', '(']).next().unwrap().to_owned())
            .collect()
    };
    // First cycle: nothing committed yet, so the manifest is whole.
    assert_eq!(names(&pair), ["ManifestPart", "ManifestEnd"]);

    pair.next_cycle(gen1(), source_cfg(Mode::Sync, true));
    pair.run();
    pair.source.done.clone().unwrap().expect("unchanged cycle");
    assert_eq!(
        names(&pair),
        [
            "ManifestChanges",
            "ManifestEnd",
            "ManifestChanges",
            "ManifestEnd"
        ]
    );
    let unchanged = manifest_bytes(&pair);
    // Two ends (count and root) and two empty changes (a base root each): nothing per entry.
    assert!(
        unchanged < 300 && unchanged * 4 < whole,
        "unchanged: {unchanged} B of manifests, first cycle {whole} B"
    );
    for (dir, name) in &pair.log {
        if *dir == Dir::ToTarget && name.starts_with("ManifestChanges") {
            assert!(name.contains("upsert: [], "), "{name}");
        }
    }

    pair.next_cycle(gen2(), source_cfg(Mode::Sync, false));
    pair.run();
    pair.source.done.clone().unwrap().expect("changed cycle");
    assert_eq!(
        pair.target.live,
        gen2(),
        "the changes rebuilt the whole tree"
    );
    assert_eq!(names(&pair), ["ManifestChanges", "ManifestEnd"]);
}

/// A target that no longer holds the manifest the source recorded (its state was reset, or
/// it was rolled back) asks for the whole manifest, and the cycle commits all the same.
#[test]
fn a_target_without_the_base_asks_for_the_whole_manifest() {
    for precopy in [true, false] {
        let mut pair = Pair::new(gen1(), Tree::default());
        pair.run();
        pair.source.done.clone().unwrap().expect("first cycle");
        // The standby's store lost its manifest, not its generation number.
        pair.target.committed = Arc::new(gen2().manifest());
        pair.next_cycle(gen2(), source_cfg(Mode::Sync, precopy));
        pair.run();
        pair.source.done.clone().unwrap().expect("second cycle");
        assert_eq!(pair.target.live, gen2());
        let resent = pair
            .log
            .iter()
            .filter(|(d, n)| *d == Dir::ToSource && n.starts_with("ResendManifest"))
            .count();
        assert_eq!(resent, 1, "asked once: {:?}", pair.log);
        // A final pass after a pre-copy goes against the pre-copy's manifest, which the target
        // does hold.
    }
}

/// Changes that do not apply to their base are the source's fault: a removal of a path the
/// base does not hold, or changes out of order, end the cycle with a violation.
#[test]
fn changes_that_do_not_apply_to_their_base_end_the_cycle() {
    let base = gen1().manifest();
    let bad = [
        (vec![], vec![StackPath::new("no/such/path").unwrap()]),
        (
            vec![
                base.get(&StackPath::new("db/other.dat").unwrap())
                    .unwrap()
                    .clone(),
                base.get(&StackPath::new("app/config.yml").unwrap())
                    .unwrap()
                    .clone(),
            ],
            vec![],
        ),
    ];
    for (upsert, remove) in bad {
        let mut s = TargetSession::new(target_cfg(&flag_key()), Instant::now());
        hello_web(&mut s);
        s.handle_policy(Ok(StackPolicy {
            allow: vec!["primary".into()],
            held: Held::default(),
            keeps_generations: true,
        }));
        s.handle_opened(1, Arc::new(base.clone()));
        while s.poll_message().is_some() {}
        s.handle_message(
            SourceMsg::ManifestChanges {
                base: base.root(),
                upsert,
                remove,
            },
            NOW,
        );
        s.handle_message(
            SourceMsg::ManifestEnd {
                pass: Pass::Final,
                entries: base.len() as u64,
                root: base.root(),
            },
            NOW,
        );
        let err = ended(&mut s).expect("ended").unwrap_err();
        assert_eq!(err.cause.kind(), "peer_misbehaved", "{err}");
        assert!(err.cause.to_string().contains("do not apply"), "{err}");
    }
}

/// The regression of issue "Real databases": the standby's own service (a database) writes
/// while it runs and again when it stops — its shutdown checkpoint rewrites files the source
/// did not change, and files the source did change. The final pass is planned against the
/// stopped standby, so the commit is exactly the source's tree: the standby's writes are undone
/// like any other difference, and nothing is "changed after the commit was prepared".
#[test]
fn a_standby_that_writes_when_it_stops_still_commits_exactly_the_source_tree() {
    for precopy in [true, false] {
        let mut pair = Pair::new(gen1(), Tree::default());
        pair.run();
        pair.target.done.clone().unwrap().expect("first cycle");
        pair.next_cycle(gen2(), source_cfg(Mode::Sync, precopy));
        // At its stop the standby appends to a file the source also changed, rewrites one the
        // source did not touch, and leaves a lock file behind.
        let mut checkpointed = noise(1, 300_000);
        checkpointed.extend_from_slice(b"shutdown checkpoint");
        pair.target.on_stop = Some(
            gen1()
                .file("db/big.dat", checkpointed)
                .file("setuid-bin", noise(9, 5000))
                .file("db/postmaster.pid", "4242"),
        );
        pair.run();
        let report = pair.source.done.clone().unwrap().expect("second cycle");
        assert_eq!(report.generation, 2);
        assert_eq!(pair.target.live, gen2(), "precopy = {precopy}");
        assert_eq!(pair.target.stops, 2);
        assert!(pair.target.running);
        let sent: HashSet<String> = pair
            .source
            .files_sent
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert!(
            sent.contains("setuid-bin"),
            "a file only the standby changed is sent again: {sent:?}"
        );
    }
}

/// A service Docker had to kill at its stop timeout left crash-consistent data: by default the
/// copy ships and both sides' kills are reported; with `on_stop_timeout = Fail` the source
/// refuses to ship it, and neither side's live data changes.
#[test]
fn services_killed_at_the_stop_timeout_are_reported_or_refuse_the_cycle() {
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.run();
    pair.next_cycle(gen2(), source_cfg(Mode::Sync, true));
    pair.source.killed = vec!["db".into()];
    pair.target.killed = vec!["cache".into()];
    pair.run();
    let report = pair
        .source
        .done
        .clone()
        .unwrap()
        .expect("warn ships the copy");
    assert_eq!(report.stop_killed, ["db"]);
    assert_eq!(report.standby_killed, ["cache"]);
    assert_eq!(pair.target.live, gen2());

    let mut pair = Pair::new(gen1(), Tree::default());
    pair.run();
    let cfg = SourceConfig {
        on_stop_timeout: OnStopTimeout::Fail,
        ..source_cfg(Mode::Sync, true)
    };
    pair.next_cycle(gen2(), cfg);
    pair.source.killed = vec!["db".into()];
    pair.run();
    assert!(
        matches!(err_cause(&pair.source.done), Cause::StopKilled { services } if services == &["db"]),
        "{:?}",
        pair.source.done
    );
    assert!(pair.target.done.clone().unwrap().is_err());
    assert_eq!(pair.target.live, gen1(), "nothing committed");
    assert_eq!(pair.target.last_generation, 1);
    assert!(pair.source.running && pair.target.running);
    assert!(
        pair.flag_index().is_none(),
        "no flag for a crash-consistent copy"
    );
}

/// Any way a cycle ends after the standby was stopped, other than a commit, starts it again
/// before the cycle is over; live data is untouched.
#[test]
fn a_cycle_that_fails_after_the_standby_stopped_starts_it_again() {
    let mut first = Pair::new(gen1(), Tree::default());
    first.run();
    let mut full = Pair::new(gen2(), gen1());
    full.target.last_generation = 1;
    full.run();
    let stop_at = full
        .log
        .iter()
        .position(|(_, m)| m.starts_with("FinalPass"))
        .expect("FinalPass sent");
    let flag_at = full.flag_index().expect("flag sent");
    for n in stop_at + 1..=flag_at {
        let mut pair = Pair::new(gen2(), gen1());
        pair.target.last_generation = 1;
        pair.fault = Fault::CutAfter(n);
        pair.run();
        assert!(pair.target.done.clone().unwrap().is_err(), "cut after {n}");
        assert_eq!(pair.target.live, gen1(), "cut after {n}");
        assert_eq!(
            (pair.target.stops, pair.target.starts),
            (1, 1),
            "cut after {n}"
        );
        assert!(pair.target.running, "cut after {n}");
    }
}

/// The real driver welcomes the source as soon as the store is open and scans the live dir
/// while the source stops and scans. Whenever that scan finishes — before the manifest, inside
/// it, after its end (which then waits) — the cycle does exactly what the plain sequence does.
#[test]
fn a_target_scan_that_finishes_late_changes_nothing_but_the_order() {
    let plain = {
        let mut pair = Pair::new(gen1(), Tree::default());
        pair.run();
        pair.next_cycle(gen2(), source_cfg(Mode::Sync, false));
        pair.run();
        pair
    };
    let plain_sent = plain.source.files_sent.clone();
    for late in [0, 1, 2, 3, 5, 8, usize::MAX] {
        let mut pair = Pair::new(gen1(), Tree::default());
        pair.target.scan_late = Some(late);
        pair.run();
        pair.target.done.clone().unwrap().expect("first cycle");
        pair.next_cycle(gen2(), source_cfg(Mode::Sync, false));
        pair.target.scan_late = Some(late);
        pair.run();
        let report = pair.source.done.clone().unwrap().expect("second cycle");
        assert_eq!(pair.target.live, gen2(), "late = {late}");
        assert_eq!(report.generation, 2);
        assert_eq!(pair.source.files_sent, plain_sent, "late = {late}");
        // Welcome went out before the source's manifest ended, even when the scan had not.
        let at = |name: &str| pair.log.iter().position(|(_, m)| m.starts_with(name));
        assert!(at("Welcome").unwrap() < at("ManifestEnd").unwrap());
        assert!(pair.target.scanning.is_none());
    }
}

/// A scan that fails after `Welcome` went out is a refusal the source hears, and nothing is
/// staged or committed.
#[test]
fn a_target_scan_that_fails_after_welcome_refuses_the_cycle() {
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.target.scan_late = Some(usize::MAX);
    pair.source.drive();
    let hello: Vec<_> = pair.source.outbox.drain(..).collect();
    for m in hello {
        pair.target.receive(m);
    }
    pair.target.drive();
    assert!(matches!(
        pair.target.outbox.first(),
        Some(TargetMsg::Welcome { .. })
    ));
    pair.target.scanning = None;
    pair.target.session.handle_stack(Err(Refusal::Unavailable {
        stack: "web".into(),
        reason: "scanning: permission denied".into(),
    }));
    pair.target.drive();
    pair.run();
    let err = pair.source.done.clone().unwrap().unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    assert!(pair.target.done.clone().unwrap().is_err());
    assert_eq!(pair.target.commits, 0);
    assert!(pair.target.live.0.is_empty());
    assert!(pair.source.running);
}

/// A source that keeps talking after its `ManifestEnd` while the target's scan is still
/// running broke the protocol, exactly as it would have once the transfer began.
#[test]
fn a_message_after_manifest_end_while_the_scan_runs_is_a_protocol_violation() {
    let mut target = TargetSide::new(Tree::default(), &flag_key());
    target.scan_late = Some(usize::MAX);
    target.receive(SourceMsg::Hello {
        version: stackclone_proto::msg::PROTOCOL_VERSION,
        stack: "web".into(),
        mode: Mode::Sync,
        max_delete: 0.5,
    });
    target.receive(claim());
    target.drive();
    let empty = Manifest::new(vec![]).unwrap();
    target.receive(SourceMsg::ManifestEnd {
        pass: Pass::Final,
        entries: 0,
        root: empty.root(),
    });
    target.receive(SourceMsg::ManifestPart { entries: vec![] });
    target.drive();
    let err = target.done.clone().unwrap().unwrap_err();
    assert!(
        err.cause
            == Cause::PeerMisbehaved(Violation::UnexpectedMessage {
                message: "ManifestPart",
                state: "Transfer(Final)"
            }),
        "{err:?}"
    );
    assert_eq!(err.phase, stackclone_proto::msg::Phase::Transfer);
}

/// A manifest whose entries hold more memory than the cap (long symlink targets, big xattrs)
/// ends the cycle as soon as a part crosses it, whatever the entry count: the whole manifest
/// is never held.
#[test]
fn a_manifest_over_the_memory_cap_ends_the_cycle_before_it_is_held() {
    let mut target = TargetSide::new(Tree::default(), &flag_key());
    target.session = TargetSession::new(target_cfg(&flag_key()), Instant::now())
        .with_max_manifest_bytes(1 << 20);
    target.receive(SourceMsg::Hello {
        version: stackclone_proto::msg::PROTOCOL_VERSION,
        stack: "web".into(),
        mode: Mode::Sync,
        max_delete: 0.5,
    });
    target.receive(claim());
    target.drive();
    let fat = |i: usize| Entry {
        path: p(&format!("f{i:05}")),
        kind: EntryKind::Symlink {
            target: vec![b'x'; 4000],
        },
        meta: meta(0o777),
        xattrs: vec![],
    };
    // 200 entries of ~4 KiB fit under 1 MiB; the next 200 do not.
    target.receive(SourceMsg::ManifestPart {
        entries: (0..200).map(fat).collect(),
    });
    target.drive();
    assert!(target.done.is_none(), "under the cap: still receiving");
    target.receive(SourceMsg::ManifestPart {
        entries: (200..400).map(fat).collect(),
    });
    target.drive();
    let err = target.done.clone().expect("ended").unwrap_err();
    assert!(
        err.cause
            == Cause::PeerMisbehaved(Violation::ManifestTooLarge {
                max_mib: 1,
                entries: 400
            }),
        "{err:?}"
    );
}

/// The cycle cut after every single message: the target commits only if the flag arrived,
/// the live tree is always one whole generation, the source stack always runs again, and a
/// rerun converges without re-sending what was staged.
#[test]
fn cut_after_every_message_never_leaves_a_mixed_generation() {
    let mut full = Pair::new(gen2(), gen1());
    full.target.last_generation = 1;
    full.run();
    let total = full.log.len();
    assert!(total > 10, "cycle too short to be meaningful: {total}");
    for n in 0..total {
        let mut pair = Pair::new(gen2(), gen1());
        pair.target.last_generation = 1;
        pair.fault = Fault::CutAfter(n);
        pair.run();
        let flag_arrived = pair.flag_index().is_some_and(|i| i < n);
        assert!(
            pair.source.running,
            "cut after {n}: source stack left stopped"
        );
        assert!(
            pair.source.done.is_some(),
            "cut after {n}: source never finished"
        );
        if flag_arrived {
            assert_eq!(
                pair.target.live,
                gen2(),
                "cut after {n}: flag arrived but no commit"
            );
            assert_eq!(pair.target.last_generation, 2);
        } else {
            assert_eq!(
                pair.target.live,
                gen1(),
                "cut after {n}: live changed without a flag"
            );
            assert_eq!(pair.target.commits, 0);
            assert!(
                pair.source.done.clone().unwrap().is_err(),
                "cut after {n}: source claims success"
            );
        }
        // Rerun: converges, and nothing already staged crosses again.
        let staged_before: HashSet<Hash> = pair.target.staged.keys().copied().collect();
        pair.next_cycle(gen2(), source_cfg(Mode::Sync, false));
        pair.run();
        assert!(
            pair.source.done.clone().unwrap().is_ok(),
            "rerun after cut {n} failed"
        );
        assert_eq!(
            pair.target.live,
            gen2(),
            "rerun after cut {n} did not converge"
        );
        for path in &pair.source.files_sent {
            let hash = Hash::of(gen2().data(path).unwrap());
            assert!(
                !staged_before.contains(&hash),
                "rerun after cut {n} re-sent staged {path}"
            );
        }
    }
}

#[test]
fn a_duplicated_message_never_commits_a_wrong_tree() {
    let mut full = Pair::new(gen2(), gen1());
    full.run();
    for n in 0..full.log.len() {
        let mut pair = Pair::new(gen2(), gen1());
        pair.fault = Fault::Duplicate(n);
        pair.run();
        assert!(
            pair.source.running,
            "duplicate {n}: source stack left stopped"
        );
        assert!(
            pair.target.live == gen1() || pair.target.live == gen2(),
            "duplicate {n}: live tree is neither generation"
        );
    }
}

#[test]
fn a_corrupted_delta_is_caught_by_blake3_and_resent_literally() {
    let mut full = Pair::new(gen2(), gen1());
    full.run();
    let data_msgs: Vec<usize> = full
        .log
        .iter()
        .enumerate()
        .filter(|(_, (_, m))| m.starts_with("FileData"))
        .map(|(i, _)| i)
        .collect();
    assert!(!data_msgs.is_empty());
    for n in data_msgs {
        let mut pair = Pair::new(gen2(), gen1());
        pair.fault = Fault::CorruptData(n);
        pair.run();
        assert!(
            pair.source.done.clone().unwrap().is_ok(),
            "corrupt {n}: cycle failed"
        );
        assert_eq!(
            pair.target.live,
            gen2(),
            "corrupt {n}: wrong content committed"
        );
    }
}

#[test]
fn a_peer_not_in_allow_is_refused_before_anything_is_staged() {
    let mut pair = Pair::new(gen1(), Tree::default());
    pair.target.allow = vec!["someone-else".into()];
    pair.run();
    assert!(matches!(err_cause(&pair.source.done), Cause::Refused(_)));
    assert_eq!(
        pair.target.loads, 0,
        "the stack was locked and scanned for a refused peer"
    );
    assert!(pair.target.staged.is_empty());
    assert_eq!(pair.target.live, Tree::default());
    assert_eq!(
        pair.source.stops, 0,
        "a refused cycle must not stop the source stack"
    );
}

#[test]
fn a_flag_signed_by_another_key_is_refused_and_nothing_commits() {
    let mut pair = Pair::new(gen2(), gen1());
    pair.source.session = SourceSession::new(
        source_cfg(Mode::Sync, false),
        SigningKey::from_bytes(&[9; 32]),
    );
    pair.run();
    assert!(
        matches!(err_cause(&pair.target.done), Cause::Flag(_)),
        "{:?}",
        pair.target.done
    );
    assert!(pair.source.done.clone().unwrap().is_err());
    assert_eq!(pair.target.live, gen1());
    assert!(pair.source.running);
}

#[test]
fn a_replayed_generation_is_refused() {
    let mut pair = Pair::new(gen2(), gen1());
    // The target already has generation 5; the source is told so and proposes 6, but here the
    // target lies to itself between Welcome and Flag to simulate a replay of an older flag.
    pair.target.last_generation = 5;
    pair.run();
    assert_eq!(pair.target.last_generation, 6);
    let mut replay = Pair::new(gen2(), gen1());
    replay.target.last_generation = 0;
    replay.run();
    // Deliver the same (old) flag again to a target that has moved on.
    let flag = SourceMsg::Flag(stackclone_proto::flag::SignedStatus::sign(
        stackclone_proto::flag::Status {
            stack: "web".into(),
            generation: 1,
            history: HISTORY,
            manifest_root: gen2().manifest().root(),
            source_id: "primary".into(),
            target_id: "standby".into(),
            created_at: NOW,
        },
        &flag_key(),
    ));
    let mut again = Pair::new(gen2(), gen2());
    again.target.last_generation = 1;
    again.source.drive();
    for m in again.source.outbox.drain(..).collect::<Vec<_>>() {
        again.target.receive(m);
    }
    again.target.drive();
    // Welcome sent; the source would now scan. Instead, inject the old flag out of order.
    again.target.receive(flag);
    again.target.drive();
    assert!(matches!(
        err_cause(&again.target.done),
        Cause::PeerMisbehaved(_)
    ));
    assert_eq!(again.target.commits, 0);
}

#[test]
fn deleting_more_than_max_delete_stops_the_cycle() {
    let source = Tree::default()
        .dir("app")
        .file("app/config.yml", "only this");
    let mut pair = Pair::new(source, gen1());
    pair.run();
    assert!(matches!(
        err_cause(&pair.target.done),
        Cause::TooManyDeletes { .. }
    ));
    assert!(matches!(
        err_cause(&pair.source.done),
        Cause::PeerAborted { .. }
    ));
    assert_eq!(pair.target.live, gen1());
    assert!(pair.source.running);
}

#[test]
fn an_empty_source_is_never_synced() {
    let mut pair = Pair::new(Tree::default(), gen1());
    pair.run();
    assert!(matches!(err_cause(&pair.source.done), Cause::EmptySource));
    // The lineage file alone is no data either.
    let lineage_only = Tree::default().file(LINEAGE_FILE, "stackclone lineage 1\n");
    let mut pair = Pair::new(lineage_only, gen1());
    pair.run();
    assert!(matches!(err_cause(&pair.source.done), Cause::EmptySource));
    assert_eq!(pair.target.live, gen1());
    assert!(
        pair.source.running,
        "stack must be started again after the refusal"
    );
    assert_eq!(pair.target.commits, 0);
}

#[test]
fn dry_run_reports_the_plan_and_changes_nothing() {
    let mut pair = Pair::with(gen2(), gen1(), source_cfg(Mode::DryRun, false));
    pair.run();
    let report = pair.source.done.clone().unwrap().expect("dry run failed");
    let plan = report.plan.expect("no plan");
    let mut sent: Vec<_> = plan.send.iter().map(|(p, _)| p.to_string()).collect();
    sent.sort();
    assert_eq!(sent, ["db/big.dat", "empty-dir", "new.txt"]);
    let deleted: Vec<_> = plan.delete.iter().map(|p| p.to_string()).collect();
    assert!(deleted.contains(&"db/other.dat".to_string()), "{deleted:?}");
    assert_eq!(pair.target.live, gen1());
    assert!(pair.target.staged.is_empty());
    assert_eq!(pair.source.stops, 0);
    assert!(pair.source.files_sent.is_empty());
}

#[test]
fn precopy_moves_the_bulk_before_the_stop_and_only_late_writes_after() {
    let mut pair = Pair::with(gen1(), Tree::default(), source_cfg(Mode::Sync, true));
    // The stack writes one more file just before it stops.
    pair.source.on_stop = Some(gen1().file("app/late.log", "written at shutdown"));
    pair.run();
    pair.source
        .done
        .clone()
        .unwrap()
        .expect("precopy cycle failed");
    assert_eq!(
        pair.target.live,
        gen1().file("app/late.log", "written at shutdown")
    );
    let stop_at = pair
        .log
        .iter()
        .position(|(_, m)| m.contains("ManifestEnd { pass: Final"))
        .unwrap();
    let final_files: Vec<_> = pair.log[stop_at..]
        .iter()
        .filter(|(_, m)| m.starts_with("FileBegin"))
        .collect();
    assert_eq!(
        final_files.len(),
        1,
        "the final pass sends only the late write"
    );
    assert!(pair.log.iter().any(|(_, m)| m.contains("pass: Precopy")));
    let _ = Pass::Final;
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Any byte of any message corrupted: the cycle fails or succeeds, but the live tree is
    /// always exactly one generation, the source stack runs, and a rerun converges.
    #[test]
    fn corrupting_any_frame_never_commits_a_wrong_tree(n in 0usize..64, at: usize, mask in 1u8..) {
        let mut pair = Pair::new(gen2(), gen1());
        pair.fault = Fault::Corrupt { n, at, mask };
        pair.run();
        proptest::prop_assert!(pair.source.running);
        proptest::prop_assert!(pair.target.live == gen1() || pair.target.live == gen2());
        pair.next_cycle(gen2(), source_cfg(Mode::Sync, false));
        pair.run();
        proptest::prop_assert_eq!(&pair.target.live, &gen2());
    }
}

/// Writes the frames of real cycles as seed inputs for the fuzz targets in `proto/fuzz`:
/// `STACKCLONE_FUZZ_SEEDS=$PWD/proto/fuzz/corpus cargo test -p stackclone-proto --test pair -- --ignored`
#[test]
#[ignore = "writes the fuzz seed corpus; run by hand"]
fn write_fuzz_seeds() {
    let Ok(dir) = std::env::var("STACKCLONE_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    let runs = [
        ("first", Pair::new(gen1(), Tree::default())),
        ("second", Pair::new(gen2(), gen1())),
        (
            "precopy",
            Pair::with(gen2(), gen1(), source_cfg(Mode::Sync, true)),
        ),
        (
            "dry-run",
            Pair::with(gen2(), gen1(), source_cfg(Mode::DryRun, false)),
        ),
    ];
    for (name, mut pair) in runs {
        pair.run();
        let join = |want: Dir| -> Vec<u8> {
            pair.frames
                .iter()
                .filter(|(d, _)| *d == want)
                .flat_map(|(_, f)| f.clone())
                .collect()
        };
        let to_target = join(Dir::ToTarget);
        let to_source = join(Dir::ToSource);
        let chunks: Vec<u8> = pair
            .frames
            .iter()
            .filter_map(
                |(_, f)| match wire::decode::<SourceMsg>(&f[wire::HEADER_LEN..]) {
                    Ok(SourceMsg::FileData { chunk, .. }) => {
                        Some(wire::encode_frame(&chunk).unwrap())
                    }
                    _ => None,
                },
            )
            .take(4)
            .flatten()
            .collect();
        for (target, bytes) in [
            ("target_session", &to_target),
            ("source_session", &[&[1u8][..], &to_source].concat()),
            ("frame_decoder", &to_target),
            ("delta_receiver", &chunks),
        ] {
            let d = dir.join(target);
            std::fs::create_dir_all(&d).unwrap();
            // Seeds stay small: libFuzzer favours short inputs, and the repo stays lean.
            let bytes = &bytes[..bytes.len().min(64 << 10)];
            std::fs::write(d.join(format!("{name}.bin")), bytes).unwrap();
        }
    }
}

#[test]
fn big_single_path_files_are_received_in_place_and_hardlinks_never_are() {
    let big1 = noise(11, 3 << 20);
    let mut big2 = big1.clone();
    big2[1 << 20..(1 << 20) + 4096].copy_from_slice(&[9u8; 4096]);
    let linked = |t: Tree, data: &[u8]| {
        let mut t = t.file("l1", data.to_vec()).file("l2", data.to_vec());
        for p in ["l1", "l2"] {
            t = t.edit(p, |i| {
                if let Node::File { link_group, .. } = &mut i.node {
                    *link_group = Some(0);
                }
            });
        }
        t
    };
    let mut other1 = noise(12, 3 << 20);
    let old = linked(
        Tree::default().file("db.dat", big1).file("small", "x"),
        &other1,
    );
    other1[100] ^= 1;
    let new = linked(
        Tree::default().file("db.dat", big2).file("small", "y"),
        &other1,
    );
    let mut pair = Pair::new(new.clone(), old);
    pair.run();
    pair.source.done.clone().unwrap().expect("cycle failed");
    assert_eq!(pair.target.live, new);
    let in_place: Vec<_> = pair.target.in_place.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        in_place,
        ["db.dat"],
        "only the big, unlinked, single-use file goes in place"
    );
}

// ------------------------------------------------------------------------------------------------
// The stall rule, on a virtual clock

/// An empty live dir at generation 1, nothing staged.
fn empty_live_at_generation_1() -> StackState {
    StackState {
        last_generation: 1,
        held: Held::default(),
        live: Manifest::new(vec![]).unwrap(),
        staged: HashSet::new(),
        staged_in_place: HashMap::new(),
        outside_links: HashSet::new(),
        committed: Arc::default(),
    }
}

/// The source's `Hello` for `web`, a sync with the default valve.
fn hello_web(s: &mut TargetSession) {
    s.handle_message(
        SourceMsg::Hello {
            version: stackclone_proto::msg::PROTOCOL_VERSION,
            stack: "web".into(),
            mode: Mode::Sync,
            max_delete: 0.5,
        },
        NOW,
    );
    s.handle_message(claim(), NOW);
}

/// A target session for `web` at `t0`, past `Hello` and its policy, with the live dir of
/// generation 1 scanned: it waits for the source's manifest. Its actions so far are drained.
fn waiting_target(t0: Instant) -> TargetSession {
    let mut s = TargetSession::new(target_cfg(&flag_key()), t0);
    hello_web(&mut s);
    s.handle_policy(Ok(StackPolicy {
        allow: vec!["primary".into()],
        held: Held::default(),
        keeps_generations: true,
    }));
    s.handle_opened(1, Arc::default());
    s.handle_stack(Ok(empty_live_at_generation_1()));
    while s.poll_action().is_some() {}
    while s.poll_message().is_some() {}
    s
}

fn ended(s: &mut TargetSession) -> Option<Result<TargetReport, CycleError>> {
    std::iter::from_fn(|| s.poll_action()).find_map(|a| match a {
        TargetAction::Done(r) => Some(r),
        _ => None,
    })
}

#[test]
fn a_silent_source_ends_the_cycle_after_the_stall_timeout() {
    let t0 = Instant::now();
    let mut s = waiting_target(t0);
    assert_eq!(s.poll_timeout(), Some(t0 + STALL_TIMEOUT));
    s.handle_timeout(t0 + STALL_TIMEOUT - Duration::from_secs(1));
    assert!(ended(&mut s).is_none(), "not yet");
    // Progress (a message, file data) moves the deadline.
    s.handle_progress(t0 + Duration::from_secs(60));
    assert_eq!(
        s.poll_timeout(),
        Some(t0 + Duration::from_secs(60) + STALL_TIMEOUT)
    );
    s.handle_timeout(t0 + STALL_TIMEOUT + Duration::from_secs(1));
    assert!(ended(&mut s).is_none(), "the progress counted");
    s.handle_timeout(t0 + Duration::from_secs(60) + STALL_TIMEOUT);
    let err = ended(&mut s).expect("ended").unwrap_err();
    assert_eq!(err.cause.kind(), "connection_lost");
    assert_eq!(err.phase, stackclone_proto::msg::Phase::Manifest);
    assert!(
        err.cause
            .to_string()
            .contains("no progress from the source for 120 s")
    );
    assert!(s.is_finished());
    assert_eq!(s.poll_timeout(), None, "an ended cycle has no deadline");
    assert!(
        s.poll_message().is_none(),
        "a stalled peer is not told: it is not listening"
    );
}

#[test]
fn no_stall_while_the_target_waits_on_its_own_work() {
    let t0 = Instant::now();
    let hour = Duration::from_secs(3600);
    // The live dir's scan still runs after `Welcome`.
    let mut s = TargetSession::new(target_cfg(&flag_key()), t0);
    hello_web(&mut s);
    assert_eq!(s.poll_timeout(), None, "looking the stack up");
    s.handle_policy(Ok(StackPolicy {
        allow: vec!["primary".into()],
        held: Held::default(),
        keeps_generations: true,
    }));
    s.handle_opened(1, Arc::default());
    assert_eq!(s.poll_timeout(), None, "scanning the live dir");
    s.handle_timeout(t0 + hour);
    assert!(ended(&mut s).is_none());

    // The standby's stop for the final pass takes its time.
    let mut s = waiting_target(t0);
    s.handle_message(SourceMsg::FinalPass, NOW);
    assert!(
        std::iter::from_fn(|| s.poll_action()).any(|a| matches!(a, TargetAction::StopStack)),
        "the standby is stopped"
    );
    assert_eq!(s.poll_timeout(), None, "stopping the standby");
    s.handle_timeout(t0 + hour);
    assert!(ended(&mut s).is_none());
    s.handle_stack_stopped(Ok(vec![]));
    assert_eq!(s.poll_timeout(), None, "scanning the stopped standby");
    s.handle_timeout(t0 + hour);
    assert!(ended(&mut s).is_none());
    // Its answer is progress: the clock starts again from there.
    s.handle_progress(t0 + 2 * hour);
    s.handle_stopped_scan(Ok(empty_live_at_generation_1()));
    assert_eq!(s.poll_timeout(), Some(t0 + 2 * hour + STALL_TIMEOUT));
    s.handle_timeout(t0 + 2 * hour + STALL_TIMEOUT);
    // The stall ends the cycle; the stopped standby is started before it says so.
    let actions: Vec<_> = std::iter::from_fn(|| s.poll_action()).collect();
    assert!(
        matches!(actions.as_slice(), [TargetAction::StartStack]),
        "{actions:?}"
    );
    s.handle_stack_started(Ok(()));
    let err = ended(&mut s).expect("ended").unwrap_err();
    assert_eq!(err.cause.kind(), "connection_lost");
}

#[test]
fn no_stall_while_a_commit_runs() {
    let t0 = Instant::now();
    let mut s = waiting_target(t0);
    let empty = Manifest::new(vec![]).unwrap();
    // The running standby already is the wanted tree: planned and staged at once.
    s.handle_message(
        SourceMsg::ManifestEnd {
            pass: Pass::Final,
            entries: 0,
            root: empty.root(),
        },
        NOW,
    );
    let status = Status {
        stack: "web".into(),
        generation: 2,
        history: HISTORY,
        manifest_root: empty.root(),
        source_id: "primary".into(),
        target_id: "standby".into(),
        created_at: NOW,
    };
    s.handle_message(
        SourceMsg::Flag(SignedStatus::sign(status, &flag_key())),
        NOW,
    );
    assert!(s.is_committing());
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(t0 + Duration::from_secs(3600));
    assert!(s.is_committing(), "the commit goes on");
    assert!(ended(&mut s).is_none());
}

/// A data stream the target did not ask for is the peer's violation, named by kind, and the
/// source is told.
#[test]
fn bad_file_streams_are_violations_the_session_names() {
    let t0 = Instant::now();
    let cases = [
        (BadStream::NoBegin("FileData".into()), "bad_file_stream"),
        (
            BadStream::Foreign {
                id: 3,
                got: "Hello",
            },
            "bad_file_stream",
        ),
        (BadStream::NotWanted { id: 9 }, "data_outside_transfer"),
    ];
    for (bad, kind) in cases {
        let mut s = waiting_target(t0);
        s.handle_bad_stream(bad.clone());
        let err = ended(&mut s).expect("ended").unwrap_err();
        assert_eq!(err.cause.kind(), "peer_misbehaved", "{bad:?}");
        assert_eq!(err.cause.detail(), Some(kind), "{bad:?}");
        assert!(
            matches!(s.poll_message(), Some(TargetMsg::Abort { .. })),
            "the source is told: {bad:?}"
        );
    }
}

/// The source's stack restarts as soon as the last byte is staged, before the target's result.
/// A restart that fails then fails the cycle, even though the target committed: the primary is
/// down, and a green push would hide it.
#[test]
fn a_shutdown_after_the_flag_waits_for_the_result_and_records_the_commit() {
    let mut pair = Pair::with(gen1(), Tree::default(), source_cfg(Mode::Sync, true));
    pair.source.shutdown_on_flag = true;
    pair.run();
    // The target committed whatever the source did; the source says so instead of a failure.
    assert!(pair.target.done.clone().unwrap().is_ok());
    let report = pair
        .source
        .done
        .clone()
        .unwrap()
        .expect("recorded as committed");
    assert_eq!(report.generation, 1);
    assert_eq!(pair.target.live, gen1());
    assert!(pair.source.running);
}

#[test]
fn a_failed_restart_fails_the_cycle_even_when_the_target_committed() {
    let mut pair = Pair::with(gen1(), Tree::default(), source_cfg(Mode::Sync, true));
    pair.source.start_fails = Some("port 5432 is already allocated".into());
    pair.run();
    assert!(
        pair.target.done.clone().unwrap().is_ok(),
        "the target committed"
    );
    assert_eq!(pair.target.live, gen1());
    let err = pair.source.done.clone().unwrap().unwrap_err();
    assert_eq!(err.cause.kind(), "local");
    assert_eq!(err.cause.detail(), Some("start_stack"));
    assert!(err.to_string().contains("port 5432"), "{err}");
}
