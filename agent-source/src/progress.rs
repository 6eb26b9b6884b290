//! What a cycle is doing right now, and how `push` shows it.
//!
//! The cycle driver updates a [`CycleProgress`] (atomics, no locks on the data path); a viewer
//! reads it on a timer. `push` on a terminal draws one bar per stack on stderr (phase, files,
//! bytes, rate) and prints a summary table on stdout at the end; without a terminal it prints
//! one plain line per phase change instead of bars; with `--json` it prints only the JSON
//! document.
//!
//! Nothing the viewer writes can hold up a cycle: plain lines go to stdout from a thread of their
//! own through a small queue (a line that does not fit is dropped), and a stdout that is gone
//! (`push … | head -3`) ends that thread quietly. The primary's stack may be stopped while a
//! line is printed; it must not stay stopped because nobody reads the pipe.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The phases of a cycle as the source sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Connect = 0,
    /// Scanning while the stack runs (pre-copy).
    Scan,
    /// Sending while the stack runs.
    Transfer,
    /// Stopping the stack (hooks, then containers).
    Stop,
    /// Scanning again with the stack stopped.
    FinalScan,
    /// Sending what changed since the pre-copy.
    FinalTransfer,
    /// Starting the stack again.
    Start,
    /// Waiting for the target to commit (and its stack to become healthy).
    Commit,
    Done,
}

impl Stage {
    const ALL: [Stage; 9] = [
        Stage::Connect,
        Stage::Scan,
        Stage::Transfer,
        Stage::Stop,
        Stage::FinalScan,
        Stage::FinalTransfer,
        Stage::Start,
        Stage::Commit,
        Stage::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Scan => "scan",
            Stage::Transfer => "transfer",
            Stage::Stop => "stop",
            Stage::FinalScan => "final scan",
            Stage::FinalTransfer => "final transfer",
            Stage::Start => "start",
            Stage::Commit => "commit",
            Stage::Done => "done",
        }
    }
}

/// Live counters of one cycle.
#[derive(Debug, Default)]
pub struct CycleProgress {
    stage: AtomicU8,
    files_queued: AtomicU64,
    files_done: AtomicU64,
    /// Sizes of the files queued / finished (file bytes, before delta).
    bytes_queued: AtomicU64,
    bytes_done: AtomicU64,
    /// Bytes put on the wire so far.
    wire: AtomicU64,
}

/// A snapshot of [`CycleProgress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub stage: Stage,
    pub files_queued: u64,
    pub files_done: u64,
    pub bytes_queued: u64,
    pub bytes_done: u64,
    pub wire: u64,
}

impl CycleProgress {
    pub fn new() -> Arc<CycleProgress> {
        Arc::new(CycleProgress::default())
    }

    pub fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Relaxed);
    }

    pub fn file_queued(&self, size: u64) {
        self.files_queued.fetch_add(1, Ordering::Relaxed);
        self.bytes_queued.fetch_add(size, Ordering::Relaxed);
    }

    pub fn file_done(&self, size: u64) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
        self.bytes_done.fetch_add(size, Ordering::Relaxed);
    }

    pub fn wire_bytes(&self, n: u64) {
        self.wire.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let stage = Stage::ALL
            .get(usize::from(self.stage.load(Ordering::Relaxed)))
            .copied()
            .unwrap_or(Stage::Done);
        Snapshot {
            stage,
            files_queued: self.files_queued.load(Ordering::Relaxed),
            files_done: self.files_done.load(Ordering::Relaxed),
            bytes_queued: self.bytes_queued.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            wire: self.wire.load(Ordering::Relaxed),
        }
    }
}

/// How `push` shows progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Bars on stderr (a terminal).
    Bars,
    /// One line per phase change on stdout.
    Lines,
    /// Nothing (`--json`).
    Quiet,
}

impl Style {
    /// Bars when stderr is a terminal, plain lines otherwise, nothing with `--json`.
    pub fn detect(json: bool) -> Style {
        if json {
            Style::Quiet
        } else if std::io::stderr().is_terminal() {
            Style::Bars
        } else {
            Style::Lines
        }
    }
}

/// Draws the progress of the cycles of one `push`.
#[derive(Debug)]
pub struct Viewer {
    style: Style,
    bars: MultiProgress,
    lines: Option<LineOut>,
}

/// Plain lines to stdout, written by a thread of their own.
#[derive(Debug)]
struct LineOut {
    queue: std::sync::mpsc::SyncSender<String>,
    writer: std::thread::JoinHandle<()>,
}

impl LineOut {
    /// Lines queued at most; more are dropped until the writer catches up.
    const QUEUE: usize = 64;

    fn start() -> LineOut {
        let (queue, lines) = std::sync::mpsc::sync_channel::<String>(Self::QUEUE);
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            for line in lines {
                let mut out = std::io::stdout().lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    // stdout is gone (a closed pipe, a hung-up terminal): stop writing, and let
                    // the queue fill and drop lines.
                    return;
                }
            }
        });
        LineOut { queue, writer }
    }

    /// Waits until the queued lines are written (or the writer gave up).
    fn finish(self) {
        drop(self.queue);
        let _ = self.writer.join();
    }
}

/// Watches one cycle until [`Watch::finish`].
#[derive(Debug)]
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Viewer {
    pub fn new(style: Style) -> Viewer {
        let bars = MultiProgress::with_draw_target(if style == Style::Bars {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        });
        let lines = (style == Style::Lines).then(LineOut::start);
        Viewer { style, bars, lines }
    }

    /// Waits until every progress line is out, so that what `push` prints next comes after.
    pub fn finish(self) {
        if let Some(lines) = self.lines {
            lines.finish();
        }
    }

    /// Starts showing `progress` of `stack`. Must be called inside a tokio runtime.
    pub fn watch(&self, stack: &str, progress: Arc<CycleProgress>) -> Watch {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let stack = stack.to_owned();
        let style = self.style;
        let lines = self.lines.as_ref().map(|l| l.queue.clone());
        let bar = (style == Style::Bars).then(|| {
            let bar = self.bars.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:.bold} {msg:<16} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(stack.clone());
            bar
        });
        let task = tokio::spawn(async move {
            let mut last_stage = None;
            loop {
                let s = progress.snapshot();
                match (&bar, style) {
                    (Some(bar), _) => {
                        bar.set_length(s.bytes_queued.max(1));
                        bar.set_position(s.bytes_done);
                        bar.set_message(format!(
                            "{} {}/{} files",
                            s.stage.as_str(),
                            s.files_done,
                            s.files_queued
                        ));
                    }
                    (None, Style::Lines) if last_stage != Some(s.stage) => {
                        if let Some(lines) = &lines {
                            let _ = lines.try_send(line(&stack, &s));
                        }
                    }
                    _ => {}
                }
                last_stage = Some(s.stage);
                if *stopped.borrow() {
                    if let Some(bar) = &bar {
                        bar.finish_and_clear();
                    }
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.changed() => {}
                }
            }
        });
        Watch { task, stop }
    }
}

impl Watch {
    /// Stops watching (after one last update) and removes the bar.
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A plain progress line: `web: transfer (12/40 files, 3.1 MiB of 9.0 MiB, 1.2 MiB sent)`.
pub fn line(stack: &str, s: &Snapshot) -> String {
    match s.stage {
        Stage::Transfer | Stage::FinalTransfer | Stage::Commit | Stage::Done
            if s.files_queued > 0 =>
        {
            format!(
                "{stack}: {} ({}/{} files, {} of {}, {} sent)",
                s.stage.as_str(),
                s.files_done,
                s.files_queued,
                HumanBytes(s.bytes_done),
                HumanBytes(s.bytes_queued),
                HumanBytes(s.wire)
            )
        }
        stage => format!("{stack}: {}", stage.as_str()),
    }
}

/// One row of the summary table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub stack: String,
    /// `committed`, `dry run`, `FAILED`.
    pub result: String,
    pub generation: Option<u64>,
    pub files_sent: u64,
    pub bytes_sent: u64,
    pub source_down: Option<Duration>,
    pub target_down: Option<Duration>,
    pub took: Duration,
    pub error: Option<String>,
}

/// The summary table `push` prints at the end, with each failure's message below it.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<20} {:<10} {:>6} {:>10} {:>11} {:>9} {:>9} {:>9}\n",
        "STACK", "RESULT", "GEN", "FILES-SENT", "SENT", "SRC-DOWN", "TGT-DOWN", "TOOK"
    );
    let secs = |d: Option<Duration>| {
        d.map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()))
    };
    for r in rows {
        out.push_str(&format!(
            "{:<20} {:<10} {:>6} {:>10} {:>11} {:>9} {:>9} {:>9}\n",
            r.stack,
            r.result,
            r.generation
                .map_or_else(|| "-".to_owned(), |g| g.to_string()),
            r.files_sent,
            HumanBytes(r.bytes_sent).to_string(),
            secs(r.source_down),
            secs(r.target_down),
            secs(Some(r.took)),
        ));
    }
    for r in rows {
        if let Some(e) = &r.error {
            out.push_str(&format!("{}: {e}\n", r.stack));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_follow_the_counters() {
        let p = CycleProgress::new();
        assert_eq!(p.snapshot().stage, Stage::Connect);
        p.set_stage(Stage::FinalTransfer);
        p.file_queued(100);
        p.file_queued(50);
        p.file_done(100);
        p.wire_bytes(7);
        assert_eq!(
            p.snapshot(),
            Snapshot {
                stage: Stage::FinalTransfer,
                files_queued: 2,
                files_done: 1,
                bytes_queued: 150,
                bytes_done: 100,
                wire: 7
            }
        );
        assert_eq!(
            line("web", &p.snapshot()),
            "web: final transfer (1/2 files, 100 B of 150 B, 7 B sent)"
        );
        p.set_stage(Stage::Stop);
        assert_eq!(line("web", &p.snapshot()), "web: stop");
    }

    #[test]
    fn the_table_has_a_row_per_stack_and_the_errors_below() {
        let rows = [
            Row {
                stack: "web".into(),
                result: "committed".into(),
                generation: Some(7),
                files_sent: 3,
                bytes_sent: 2048,
                source_down: Some(Duration::from_millis(1500)),
                target_down: Some(Duration::from_millis(200)),
                took: Duration::from_secs(4),
                error: None,
            },
            Row {
                stack: "db".into(),
                result: "FAILED".into(),
                generation: None,
                files_sent: 0,
                bytes_sent: 0,
                source_down: None,
                target_down: None,
                took: Duration::from_secs(1),
                error: Some("cannot reach target".into()),
            },
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("STACK"), "{t}");
        assert!(
            lines[1].starts_with("web") && lines[1].contains("committed"),
            "{t}"
        );
        assert!(
            lines[1].contains("2.00 KiB") && lines[1].contains("1.5s"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("db") && lines[2].contains("FAILED"),
            "{t}"
        );
        assert_eq!(lines[3], "db: cannot reach target");
    }
}
