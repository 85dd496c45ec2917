//! Small helpers every layer may use: an atomic file write, hex encoding, the wall clock as Unix
//! seconds, random ids, the seeded token rows the benchmarks and tests share, and
//! ([`sqlite`]) opening the stores' databases.
//!
//! Invariants:
//! - [`write_atomic`] writes a temporary file beside `path`, fsyncs it and renames it over
//!   `path`: readers and a crash at any moment see the old file or the new one, never a torn
//!   one. The directory fsync after the rename is best effort, and a failed call may leave its
//!   `.<name>.tmp-<pid>` file behind. The temporary name is per process, so two threads must
//!   not write the same `path` at once.
//! - [`hex`] is lower-case, two characters per byte.
//! - [`token_rows`] is a pure function of its arguments; `bench/infer_torch.py` rebuilds the
//!   same rows, and a test pins the values it printed.

pub mod sqlite;

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same directory is written,
/// fsync'd, renamed over `path`, and the directory is fsync'd. Readers see the old file or the
/// new one, never a torn one, even across a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    // Unique per call, so that two threads writing the same path never share a temporary
    // file (one would truncate the other's before its rename).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Seconds since the Unix epoch, with sub-second precision (0 on a clock before 1970).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `bytes` random bytes as lower-case hex (ids and temporary names).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::rng(), buf.as_mut_slice());
    hex(&buf)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` rows of pseudo-random ids below `vocab` (xorshift64, seeded; `bench/infer_torch.py`
/// rebuilds the same rows); row `r` has `len(r)` tokens.
pub fn token_rows(n: usize, len: impl Fn(usize) -> usize, seed: u64, vocab: u64) -> Vec<Vec<u32>> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|r| {
            (0..len(r))
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % vocab) as u32
                })
                .collect()
        })
        .collect()
}

/// The process's peak resident set size in bytes (`VmHWM` of `/proc/self/status`), where the
/// system reports it (Linux); `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::write_atomic;

    #[test]
    fn concurrent_atomic_writes_to_one_path_leave_one_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 200_000]).collect();
        std::thread::scope(|s| {
            for c in &contents {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..5 {
                        write_atomic(path, c).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&path).unwrap();
        assert!(contents.contains(&got), "the file mixes two writes");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "temporary files were left behind");
    }
    use super::{peak_rss_bytes, token_rows};

    #[test]
    fn the_peak_rss_covers_what_the_process_holds() {
        let big = vec![1u8; 64 << 20];
        assert!(big.iter().map(|&b| u64::from(b)).sum::<u64>() > 0);
        if let Some(peak) = peak_rss_bytes() {
            // Bytes, not KiB: at least the 64 MiB touched just now.
            assert!(peak >= 64 << 20, "{peak}");
        }
    }

    #[test]
    fn token_rows_match_the_python_peer() {
        assert_eq!(
            token_rows(2, |_| 4, 3, 50304),
            vec![
                vec![16407, 12445, 18716, 46183],
                vec![30969, 45505, 8796, 38906]
            ]
        );
        assert_eq!(token_rows(1, |_| 6, 2, 14), vec![vec![3, 9, 6, 2, 9, 2]]);
    }
}
