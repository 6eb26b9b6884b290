//! Benchmark of the windowed delta engine in `stackclone_proto::delta`.
//!
//! It generates a big file and a copy with a share of its 4 KiB blocks rewritten, then measures,
//! with real `pread`s in windows as the agents do: signature of the basis, diff of the new file
//! (including BLAKE3, zstd and wire framing), apply into a new file, and a literal send. Each
//! phase runs in its own child process (this binary with `--phase`), so the peak RSS (`VmHWM`)
//! reported for a phase is that phase's alone. In the same run it measures `fast_rsync`'s own
//! single-buffer speed on a smaller in-memory file (whole buffers of the big size would need
//! twice its size in RAM), and our API on that same in-memory file, and prints the ratios.
//!
//! It does not measure the network, fsync, or a cold page cache: the generated files are
//! usually still cached, so reads cost a memory copy, not a disk read.
//!
//! ```text
//! cargo run --release -p stackclone-bench-delta -- [--size 4GiB] [--change 0.01]
//!     [--mem-size 256MiB] [--dir DIR] [--clean]
//! ```

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use stackclone_proto::delta::{
    Basis, CheckedSignature, Chunk, FileReceiver, FileSender, SenderConfig, SignatureBuilder, Sink,
    WINDOW, block_size_for,
};
use stackclone_proto::manifest::Hash;
use stackclone_proto::wire;

const MIB: f64 = (1u64 << 20) as f64;
/// Granularity of the simulated changes: page-sized writes, as a database makes.
const CHANGE_BLOCK: usize = 4096;
const SEED: u64 = 0x5eed_cafe_f00d_d00d;
/// Read size for the signature pass. Unlike diff, the signature needs no window; 256 KiB to
/// 16 MiB measured the same here (within noise), so take the small buffer. A multiple of every
/// block size the engine picks.
const SIG_READ: usize = 1 << 20;

#[derive(Debug)]
struct Args {
    size: u64,
    change: f64,
    mem_size: u64,
    dir: PathBuf,
    clean: bool,
    phase: Option<String>,
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => bail!("unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB)"),
    };
    n.checked_mul(1 << shift).context("size overflows u64")
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        size: 4 << 30,
        change: 0.01,
        mem_size: 256 << 20,
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../work/delta"),
        clean: false,
        phase: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => args.size = parse_size(&value()?)?,
            "--change" => args.change = value()?.parse().context("--change")?,
            "--mem-size" => args.mem_size = parse_size(&value()?)?,
            "--dir" => args.dir = PathBuf::from(value()?),
            "--phase" => args.phase = Some(value()?),
            "--clean" => args.clean = true,
            "-h" | "--help" => {
                println!(
                    "usage: stackclone-bench-delta [--size 4GiB] [--change 0.01] \
                     [--mem-size 256MiB] [--dir DIR] [--clean]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(
        (0.0..=1.0).contains(&args.change),
        "--change must be within 0..=1"
    );
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    match args.phase.as_deref() {
        None => orchestrate(&args),
        Some(phase) => {
            let results = run_phase(phase, &args)?;
            let hwm = vm_hwm_kib()?;
            for r in results {
                println!(
                    "RESULT\t{}\t{}\t{}\t{}\t{}",
                    r.name, r.bytes, r.secs, hwm, r.note
                );
            }
            Ok(())
        }
    }
}

/// One measured row, as printed by a child and parsed by the parent.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    bytes: u64,
    secs: f64,
    hwm_kib: u64,
    note: String,
}

impl Row {
    fn new(name: &str, bytes: u64, secs: f64, note: String) -> Self {
        Self {
            name: name.to_string(),
            bytes,
            secs,
            hwm_kib: 0,
            note,
        }
    }

    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.secs
    }
}

fn vm_hwm_kib() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM line")?;
    Ok(kib.parse()?)
}

fn orchestrate(args: &Args) -> Result<()> {
    fs::create_dir_all(&args.dir)?;
    let exe = std::env::current_exe()?;
    let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut rows = Vec::new();
    for phase in [
        "gen",
        "sig",
        "diff",
        "apply",
        "apply-null",
        "literal",
        "mem",
    ] {
        eprintln!("running phase {phase} …");
        let out = Command::new(&exe)
            .args(["--phase", phase])
            .args(["--size", &args.size.to_string()])
            .args(["--change", &args.change.to_string()])
            .args(["--mem-size", &args.mem_size.to_string()])
            .arg("--dir")
            .arg(&args.dir)
            .output()?;
        io::stderr().write_all(&out.stderr)?;
        ensure!(out.status.success(), "phase {phase} failed: {}", out.status);
        for line in String::from_utf8(out.stdout)?.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() == 6 && f[0] == "RESULT" {
                rows.push(Row {
                    name: f[1].to_string(),
                    bytes: f[2].parse()?,
                    secs: f[3].parse()?,
                    hwm_kib: f[4].parse()?,
                    note: f[5].to_string(),
                });
            }
        }
    }
    print_report(args, &rows);
    let load_after = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average before: {}  after: {}  ({} CPUs)",
        load_before.trim(),
        load_after.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if args.clean {
        fs::remove_dir_all(&args.dir)?;
    }
    Ok(())
}

fn print_report(args: &Args, rows: &[Row]) {
    println!(
        "\nstackclone delta engine: {} MiB file, {:.2}% of 4 KiB blocks rewritten, window {} MiB, \
         {} MiB in-memory comparison\n",
        args.size >> 20,
        args.change * 100.0,
        WINDOW >> 20,
        args.mem_size >> 20
    );
    println!(
        "{:<22} {:>10} {:>9} {:>10} {:>11}  notes",
        "phase", "MiB", "seconds", "MiB/s", "peak RSS"
    );
    for r in rows {
        println!(
            "{:<22} {:>10.0} {:>9.2} {:>10.0} {:>7} MiB  {}",
            r.name,
            r.bytes as f64 / MIB,
            r.secs,
            r.mib_s(),
            r.hwm_kib >> 10,
            r.note
        );
    }
    let get = |n: &str| rows.iter().find(|r| r.name == n);
    println!("\nratios (ours / fast_rsync single buffer; ≥ 0.50 meets the 2× target):");
    for (ours, mem_ours, theirs) in [
        ("signature", "mem: ours signature", "mem: fast_rsync sig"),
        ("diff", "mem: ours diff", "mem: fast_rsync diff"),
        ("apply", "mem: ours apply", "mem: fast_rsync apply"),
    ] {
        if let (Some(o), Some(m), Some(t)) = (get(ours), get(mem_ours), get(theirs)) {
            let big = o.mib_s() / t.mib_s();
            let same = m.mib_s() / t.mib_s();
            println!(
                "  {ours:<10} {} MiB files: {big:.2}   same {} MiB in memory: {same:.2}   {}",
                args.size >> 20,
                args.mem_size >> 20,
                if big >= 0.5 { "ok" } else { "MISSED" }
            );
        }
    }
    let peak = [
        "signature",
        "diff",
        "apply",
        "apply, output dropped",
        "literal send",
    ]
    .iter()
    .filter_map(|n| get(n))
    .map(|r| r.hwm_kib >> 10)
    .max()
    .unwrap_or(0);
    println!(
        "peak RSS of the file phases: {peak} MiB (target < 256 MiB: {})",
        if peak < 256 { "ok" } else { "MISSED" }
    );
}

fn run_phase(phase: &str, args: &Args) -> Result<Vec<Row>> {
    let basis = args.dir.join("basis.bin");
    let new = args.dir.join("new.bin");
    let sig = args.dir.join("basis.sig");
    let frames = args.dir.join("delta.frames");
    let sent = args.dir.join("sent.txt");
    Ok(match phase {
        "gen" => vec![generate(args, &basis, &new)?],
        "sig" => vec![signature(&basis, &sig)?],
        "diff" => vec![diff(&sig, &new, &frames, &sent)?],
        "apply" => {
            let out = args.dir.join("rebuilt.bin");
            vec![apply(&basis, &frames, &sent, Some(&out))?]
        }
        "apply-null" => vec![apply(&basis, &frames, &sent, None)?],
        "literal" => vec![literal(&new)?],
        "mem" => in_memory(args)?,
        other => bail!("unknown phase {other:?}"),
    })
}

// ---------------------------------------------------------------------------------------------
// Data

/// SplitMix64: fast, deterministic, good enough to defeat compression and chance matches.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut s = splitmix(seed);
    for word in buf.chunks_mut(8) {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let v = splitmix(s).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

/// Fills `basis` and `new` for the piece of the file at `offset`: `new` is `basis` with each
/// 4 KiB block rewritten with probability `change`.
fn make_piece(offset: u64, basis: &mut [u8], new: &mut [u8], change: f64) -> u64 {
    fill(basis, SEED ^ offset);
    new.copy_from_slice(basis);
    let threshold = (change * u64::MAX as f64) as u64;
    let mut changed = 0;
    for (i, block) in new.chunks_mut(CHANGE_BLOCK).enumerate() {
        let index = offset / CHANGE_BLOCK as u64 + i as u64;
        if splitmix(index ^ SEED.rotate_left(17)) < threshold {
            fill(block, !SEED ^ index);
            changed += 1;
        }
    }
    changed
}

fn generate(args: &Args, basis: &Path, new: &Path) -> Result<Row> {
    let stamp_path = args.dir.join("stamp.txt");
    let stamp = format!("size={} change={} seed={SEED:x}\n", args.size, args.change);
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(Row::new("gen (cached)", 0, 1.0, String::new()));
    }
    let start = Instant::now();
    let mut fb = BufWriter::with_capacity(1 << 20, File::create(basis)?);
    let mut fnew = BufWriter::with_capacity(1 << 20, File::create(new)?);
    let mut b = vec![0u8; WINDOW];
    let mut n = vec![0u8; WINDOW];
    let mut offset = 0u64;
    let mut changed = 0;
    while offset < args.size {
        let len = (args.size - offset).min(WINDOW as u64) as usize;
        changed += make_piece(offset, &mut b[..len], &mut n[..len], args.change);
        fb.write_all(&b[..len])?;
        fnew.write_all(&n[..len])?;
        offset += len as u64;
    }
    fb.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fnew.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fs::write(&stamp_path, stamp)?;
    Ok(Row::new(
        "gen (2 files)",
        2 * args.size,
        start.elapsed().as_secs_f64(),
        format!("{changed} blocks of 4 KiB rewritten"),
    ))
}

// ---------------------------------------------------------------------------------------------
// File phases, as the agents would run them

/// Reads `path` once, untimed, so the timed pass measures the engine rather than this VM's disk
/// (whose cache is reclaimed proactively). Returns the read speed, reported as "inputs pre-read
/// at …", which is what a cold run would be bounded by.
fn warm(path: &Path) -> Result<f64> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; SIG_READ];
    let start = Instant::now();
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(SIG_READ as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset)?;
        offset += n as u64;
    }
    Ok(len as f64 / MIB / start.elapsed().as_secs_f64())
}

fn signature(basis: &Path, out: &Path) -> Result<Row> {
    let cold = warm(basis)?;
    let f = File::open(basis)?;
    let len = f.metadata()?.len();
    let start = Instant::now();
    let mut builder = SignatureBuilder::new(len);
    let mut buf = vec![0u8; SIG_READ];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(SIG_READ as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset)?;
        builder.update(&buf[..n]);
        offset += n as u64;
    }
    let block = builder.block_size();
    let sig = builder.finish();
    let secs = start.elapsed().as_secs_f64();
    fs::write(out, &sig)?;
    Ok(Row::new(
        "signature",
        len,
        secs,
        format!(
            "block {block} B, signature {:.1} MiB; inputs pre-read at {cold:.0} MiB/s",
            sig.len() as f64 / MIB
        ),
    ))
}

fn diff(sig: &Path, new: &Path, frames: &Path, sent_path: &Path) -> Result<Row> {
    let cold = warm(new)?;
    let f = File::open(new)?;
    let len = f.metadata()?.len();
    let sig_bytes = fs::read(sig)?;
    let start = Instant::now();
    let checked = CheckedSignature::parse(sig_bytes)?;
    let mut sender = FileSender::new(Some(&checked), SenderConfig::default())?;
    let index_secs = start.elapsed().as_secs_f64();
    let mut out = BufWriter::with_capacity(1 << 20, File::create(frames)?);
    let mut buf = vec![0u8; WINDOW];
    let mut offset = 0;
    let mut wire_bytes = 0u64;
    while offset < len {
        let n = (len - offset).min(WINDOW as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset)?;
        for chunk in sender.send_window(&buf[..n])? {
            wire_bytes += chunk.wire_len() as u64;
            out.write_all(&wire::encode_frame(&chunk)?)?;
        }
        offset += n as u64;
    }
    out.flush()?;
    let sent = sender.finish();
    let secs = start.elapsed().as_secs_f64();
    fs::write(sent_path, format!("{} {}\n", sent.hash.to_hex(), sent.len))?;
    Ok(Row::new(
        "diff",
        len,
        secs,
        format!(
            "index {index_secs:.2} s, wire {:.1} MiB, literal {:.2}%, mode {:?}; \
             inputs pre-read at {cold:.0} MiB/s",
            wire_bytes as f64 / MIB,
            sent.stats.literal as f64 * 100.0 / len.max(1) as f64,
            sent.mode
        ),
    ))
}

struct FileBasis(File);

impl Basis for FileBasis {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
}

/// Positional writes; zero runs just move the position, leaving holes.
struct FileSink {
    file: File,
    pos: u64,
    holes: u64,
}

impl Sink for FileSink {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, self.pos)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    fn write_zeros(&mut self, len: u64) -> io::Result<()> {
        self.pos += len;
        self.holes += len;
        Ok(())
    }
}

/// Discards the output: isolates the engine (parse, pread of the basis, BLAKE3, hole detection)
/// from the kernel's page-cache write path and disk writeback.
struct NullSink {
    holes: u64,
}

impl Sink for NullSink {
    fn write(&mut self, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn write_zeros(&mut self, len: u64) -> io::Result<()> {
        self.holes += len;
        Ok(())
    }
}

fn apply(basis: &Path, frames: &Path, sent_path: &Path, out: Option<&Path>) -> Result<Row> {
    let sent = fs::read_to_string(sent_path)?;
    let (hash, len) = sent.trim().split_once(' ').context("malformed sent.txt")?;
    let hash = Hash::from_hex(hash).context("bad hash in sent.txt")?;
    let len: u64 = len.parse()?;
    let cold = warm(basis)?;
    warm(frames)?;
    let basis = File::open(basis)?;
    let basis_len = basis.metadata()?.len();
    let start = Instant::now();
    let mut basis = FileBasis(basis);
    let mut rx = FileReceiver::new(Some(basis_len), len);
    let mut input = BufReader::with_capacity(1 << 20, File::open(frames)?);
    let mut payload = Vec::new();
    let mut next_chunk = || -> Result<Option<Chunk>> {
        let mut header = [0u8; wire::HEADER_LEN];
        match input.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let n = wire::frame_len(header, wire::MAX_FRAME)?;
        payload.resize(n, 0);
        input.read_exact(&mut payload)?;
        Ok(Some(wire::decode(&payload)?))
    };
    let (name, holes) = match out {
        Some(out) => {
            let mut sink = FileSink {
                file: File::create(out)?,
                pos: 0,
                holes: 0,
            };
            while let Some(chunk) = next_chunk()? {
                rx.handle_chunk(chunk, &mut basis, &mut sink)?;
            }
            let verified = rx.finish(&mut sink, hash)?;
            sink.file.set_len(verified.len())?;
            ("apply", sink.holes)
        }
        None => {
            let mut sink = NullSink { holes: 0 };
            while let Some(chunk) = next_chunk()? {
                rx.handle_chunk(chunk, &mut basis, &mut sink)?;
            }
            rx.finish(&mut sink, hash)?;
            ("apply, output dropped", sink.holes)
        }
    };
    let secs = start.elapsed().as_secs_f64();
    if let Some(out) = out {
        fs::remove_file(out)?;
    }
    Ok(Row::new(
        name,
        len,
        secs,
        format!("BLAKE3 verified, {holes} B left as holes; inputs pre-read at {cold:.0} MiB/s"),
    ))
}

fn literal(new: &Path) -> Result<Row> {
    let cold = warm(new)?;
    let f = File::open(new)?;
    let len = f.metadata()?.len();
    let start = Instant::now();
    let mut sender = FileSender::new(None, SenderConfig::default())?;
    let mut buf = vec![0u8; WINDOW];
    let mut offset = 0;
    let mut wire_bytes = 0u64;
    while offset < len {
        let n = (len - offset).min(WINDOW as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset)?;
        for chunk in sender.send_window(&buf[..n])? {
            wire_bytes += chunk.wire_len() as u64;
        }
        offset += n as u64;
    }
    let sent = sender.finish();
    Ok(Row::new(
        "literal send",
        len,
        start.elapsed().as_secs_f64(),
        format!(
            "incompressible data, zstd 3 tried; wire {:.0} MiB, hash {}…; inputs pre-read at \
             {cold:.0} MiB/s",
            wire_bytes as f64 / MIB,
            &sent.hash.to_hex()[..8]
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Whole in-memory buffers: fast_rsync alone vs. our API on the same data

struct MemBasis<'a>(&'a [u8]);

impl Basis for MemBasis<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = self
            .0
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

struct VecSink(Vec<u8>);

impl Sink for VecSink {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn write_zeros(&mut self, len: u64) -> io::Result<()> {
        self.0.resize(self.0.len() + len as usize, 0);
        Ok(())
    }
}

fn in_memory(args: &Args) -> Result<Vec<Row>> {
    let size = usize::try_from(args.mem_size)?;
    let mut basis = vec![0u8; size];
    let mut new = vec![0u8; size];
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(WINDOW);
        make_piece(
            offset as u64,
            &mut basis[offset..offset + n],
            &mut new[offset..offset + n],
            args.change,
        );
        offset += n;
    }
    let len = size as u64;
    let options = fast_rsync::SignatureOptions {
        block_size: block_size_for(len),
        crypto_hash_size: 8,
    };
    let mut rows = Vec::new();
    let mut row = |name: &str, secs: f64, note: String| rows.push(Row::new(name, len, secs, note));

    // fast_rsync on whole buffers: the reference speed. Each figure is the best of REPS runs, for
    // both sides, so the comparison is fair on a noisy machine.
    let (secs, sig) = best_of(|| Ok(fast_rsync::Signature::calculate(&basis, options)))?;
    row("mem: fast_rsync sig", secs, String::new());
    let (secs, delta) = best_of(|| {
        let index = sig.index();
        let mut delta = Vec::new();
        fast_rsync::diff(&index, &new, &mut delta)?;
        Ok(delta)
    })?;
    let note = format!("index included, delta {:.1} MiB", delta.len() as f64 / MIB);
    row("mem: fast_rsync diff", secs, note);
    let (secs, out) = best_of(|| {
        let mut out = Vec::with_capacity(size);
        fast_rsync::apply(&basis, &delta, &mut out)?;
        Ok(out)
    })?;
    row("mem: fast_rsync apply", secs, String::new());
    ensure!(out == new, "fast_rsync round trip differs");
    drop((out, delta));

    // Our API on the same buffers: windows, BLAKE3, zstd and hole detection included; no file
    // I/O.
    let (secs, ours_sig) = best_of(|| {
        let mut builder = SignatureBuilder::new(len);
        for w in basis.chunks(SIG_READ) {
            builder.update(w);
        }
        Ok(builder.finish())
    })?;
    row("mem: ours signature", secs, String::new());
    ensure!(ours_sig == sig.serialized(), "chunked signature differs");
    drop(sig);
    let (secs, (chunks, sent)) = best_of(|| {
        let checked = CheckedSignature::parse(ours_sig.clone())?;
        let mut sender = FileSender::new(Some(&checked), SenderConfig::default())?;
        let mut chunks = Vec::new();
        for w in new.chunks(WINDOW) {
            chunks.extend(sender.send_window(w)?);
        }
        Ok((chunks, sender.finish()))
    })?;
    row("mem: ours diff", secs, String::new());
    let (secs, out) = best_of(|| {
        let mut rx = FileReceiver::new(Some(len), len);
        let mut sink = VecSink(Vec::with_capacity(size));
        let mut mem_basis = MemBasis(&basis);
        for c in chunks.clone() {
            rx.handle_chunk(c, &mut mem_basis, &mut sink)?;
        }
        rx.finish(&mut sink, sent.hash)?;
        Ok(sink.0)
    })?;
    row("mem: ours apply", secs, String::new());
    ensure!(out == new, "our round trip differs");
    Ok(rows)
}

const REPS: usize = 3;

/// Runs `f` REPS times; the fastest time and the last result.
fn best_of<T>(mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..REPS {
        let t = Instant::now();
        let v = f()?;
        best = best.min(t.elapsed().as_secs_f64());
        last = Some(v);
    }
    Ok((best, last.context("REPS is not zero")?))
}
