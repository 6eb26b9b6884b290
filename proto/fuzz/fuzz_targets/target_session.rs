//! A hostile source: arbitrary frames into a target session that welcomed it. The session must
//! refuse bad input with an error, never panic, never ask for a commit unless a flag signed by
//! the real key verified against the manifest it staged, and never end with the standby it
//! stopped left down.
#![no_main]

use std::collections::HashSet;

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use stackclone_proto::manifest::Manifest;
use stackclone_proto::msg::SourceMsg;
use stackclone_proto::session::{StackPolicy, StackState, StageOutcome, TargetAction, TargetConfig, TargetSession};
use stackclone_proto::wire::{self, FrameDecoder};

fn empty() -> StackState {
    StackState {
        held: Default::default(),
        last_generation: 0,
        live: Manifest::default(),
        staged: HashSet::new(),
        staged_in_place: Default::default(),
        outside_links: Default::default(),
        committed: Default::default(),
    }
}

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[7; 32]);
    let t0 = std::time::Instant::now();
    let mut s = TargetSession::new(
        TargetConfig {
            target_id: "standby".into(),
            peer: "primary".into(),
            peer_flag_key: Some(key.verifying_key()),
            max_skew_secs: 600,
        },
        t0,
    );
    let mut stopped = false;
    let mut dec = FrameDecoder::default();
    if dec.push(data).is_err() {
        return;
    }
    while let Ok(Some(frame)) = dec.next_frame() {
        let Ok(msg) = wire::decode::<SourceMsg>(&frame) else { return };
        s.handle_message(msg, 1_800_000_000);
        while let Some(action) = s.poll_action() {
            match action {
                TargetAction::LookupStack { .. } => s.handle_policy(Ok(StackPolicy {
                    allow: vec!["primary".into()],
                    held: Default::default(),
                    keeps_generations: true,
                })),
                TargetAction::LoadStack { .. } => s.handle_stack(Ok(empty())),
                TargetAction::StopStack => {
                    stopped = true;
                    s.handle_stack_stopped(Ok(vec![]));
                }
                TargetAction::ScanStopped => s.handle_stopped_scan(Ok(empty())),
                TargetAction::StartStack => {
                    stopped = false;
                    s.handle_stack_started(Ok(()));
                }
                TargetAction::Signature { id, .. } => s.handle_signature(id, Err("none".into())),
                TargetAction::StageLocal { id, .. } | TargetAction::Receive { id, .. } => {
                    s.handle_staged(id, StageOutcome::SourceAborted("fuzz".into()))
                }
                // Random bytes cannot carry a valid signature by this key.
                TargetAction::Commit(_) => panic!("commit without a genuine flag"),
                TargetAction::Done(_) => assert!(!stopped, "the cycle ended with the standby down"),
            }
        }
        while s.poll_message().is_some() {}
        // Whatever the bytes did, a cycle still waiting has a deadline or waits on a commit.
        if !s.is_finished() && !s.is_committing() {
            let at = s.poll_timeout().expect("a waiting cycle without a stall deadline");
            assert!(at >= t0);
        }
    }
});
