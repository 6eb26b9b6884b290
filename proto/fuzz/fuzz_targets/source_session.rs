//! A hostile target: arbitrary frames into a source session. Never a panic, and the source stack
//! is always started again once it was stopped.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use stackclone_proto::manifest::{Entry, EntryKind, Hash, Manifest, Meta};
use stackclone_proto::msg::{Mode, TargetMsg};
use stackclone_proto::path::StackPath;
use stackclone_proto::lineage::{Claim, HistoryId};
use stackclone_proto::session::{OnStopTimeout, SourceAction, SourceConfig, SourceSession};
use stackclone_proto::wire::{self, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let mut s = SourceSession::new(
        SourceConfig {
            stack: "web".into(),
            source_id: "primary".into(),
            target_id: "standby".into(),
            mode: Mode::Sync,
            precopy: data.first().is_some_and(|b| b & 1 == 1),
            stop_stack: true,
            allow_empty: false,
            max_delete: 0.5,
            on_stop_timeout: OnStopTimeout::Warn,
            claim: Claim {
                history: HistoryId([1; 16]),
                replace_diverged: false,
                hand_over: data.first().is_some_and(|b| b & 2 == 2),
            },
            base: None,
        },
        SigningKey::from_bytes(&[7; 32]),
    );
    let tree = Manifest::new(vec![Entry {
        path: StackPath::new("f").expect("valid path"),
        kind: EntryKind::File { size: 3, hash: Hash::of(b"abc"), link_group: None },
        meta: Meta { mode: 0o644, uid: 0, gid: 0, mtime_ns: 0 },
        xattrs: vec![],
    }])
    .expect("valid manifest");
    let mut stopped = false;
    let mut done = false;
    let mut dec = FrameDecoder::default();
    if dec.push(data.get(1..).unwrap_or_default()).is_err() {
        return;
    }
    let drive = |s: &mut SourceSession, stopped: &mut bool, done: &mut bool| {
        while let Some(action) = s.poll_action() {
            match action {
                SourceAction::Scan { pass } => s.handle_scanned(pass, Ok(tree.clone())),
                SourceAction::StopStack => {
                    *stopped = true;
                    s.handle_stack_stopped(Ok(vec![]));
                }
                SourceAction::StartStack => {
                    *stopped = false;
                    s.handle_stack_started(Ok(()));
                }
                SourceAction::SendFile { id, .. } => s.handle_file_sent(id, Ok(())),
                SourceAction::Done(_) => *done = true,
            }
        }
        while s.poll_message().is_some() {}
    };
    drive(&mut s, &mut stopped, &mut done);
    while let Ok(Some(frame)) = dec.next_frame() {
        let Ok(msg) = wire::decode::<TargetMsg>(&frame) else { break };
        s.handle_message(msg, 1_800_000_000);
        drive(&mut s, &mut stopped, &mut done);
    }
    s.handle_connection_lost("end of input");
    drive(&mut s, &mut stopped, &mut done);
    assert!(!stopped, "source stack left stopped");
    assert!(done, "source session never finished");
});
