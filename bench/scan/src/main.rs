//! Times [`scan_with_threads`] over a real tree, by thread count: a cold-cache scan (every file
//! hashed) once, then warm scans (every hash from the cache: one `lstat` and one `llistxattr`
//! per path, the fixed cost of every cycle) repeated, reporting the median. The manifest must
//! be the same for every thread count, or the run fails.
//!
//! ```text
//! stackclone-bench-scan DIR [--threads 1,2,4] [--reps 7]
//! ```
//!
//! The hash cache goes into a temporary directory outside DIR. See bench/README.md, "Scanner".

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use stackclone_common::ScanConfig;
use stackclone_common::scan::scan_with_threads;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut threads = vec![1, 2];
    let mut reps = 7usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => {
                threads = args
                    .next()
                    .context("--threads needs a list")?
                    .split(',')
                    .map(|t| t.parse().context("--threads: a number"))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--reps" => reps = args.next().context("--reps needs a number")?.parse()?,
            _ if dir.is_none() && !a.starts_with('-') => dir = Some(PathBuf::from(a)),
            _ => bail!("usage: stackclone-bench-scan DIR [--threads 1,2,4] [--reps 7]"),
        }
    }
    let dir = dir.context("usage: stackclone-bench-scan DIR [--threads 1,2,4] [--reps 7]")?;
    let state = std::env::temp_dir().join(format!("stackclone-bench-scan-{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    println!("| threads | entries | cold s (hashes all) | warm s, median of {reps} (min-max) |");
    println!("|---:|---:|---:|---:|");
    let mut first_root = None;
    for &t in &threads {
        let mut cfg = ScanConfig::new(&dir);
        cfg.cache = Some(state.join(format!("cache-{t}")));
        let _ = std::fs::remove_file(cfg.cache.as_ref().unwrap());
        let t0 = Instant::now();
        let cold = scan_with_threads(&cfg, t)?;
        let cold_s = t0.elapsed().as_secs_f64();
        let root = cold.manifest.root();
        if *first_root.get_or_insert(root) != root {
            bail!(
                "{t} threads found another tree than the first run (did {} change?)",
                dir.display()
            );
        }
        // The cache vouches only for files older than its scan's start.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut warm = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            let s = scan_with_threads(&cfg, t)?;
            warm.push(t0.elapsed().as_secs_f64());
            if s.stats.files_hashed != 0 && s.manifest.root() == root {
                // A file touched in the scan's own second is hashed again; fine, but say so.
                eprintln!("note: {t} threads re-hashed {} files", s.stats.files_hashed);
            }
        }
        warm.sort_by(f64::total_cmp);
        println!(
            "| {t} | {} | {cold_s:.3} | {:.3} ({:.3}-{:.3}) |",
            cold.manifest.len(),
            warm[warm.len() / 2],
            warm[0],
            warm[warm.len() - 1]
        );
    }
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
