//! Probe: lethe's inference `dense` (which takes the decode kernels of `models/skinny.rs` for a
//! few rows) against candle's matmul, on Pythia-70m and TinyMem layer shapes, best of several
//! runs each, 2 threads. Run by hand, on an idle machine; `docs/benchmarks.md` ("Decode
//! kernels") quotes it.
//!
//! ```text
//! cargo run --release --example dense_probe            # rows 1, 8, 32, 64, 128
//! cargo run --release --example dense_probe -- 1,32    # chosen row counts
//! ```

use candle_core::{Device, Tensor};
use std::time::Instant;
fn best(f: &mut dyn FnMut(), n: usize) -> f64 {
    let mut b = f64::MAX;
    for _ in 0..n {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}
fn main() -> anyhow::Result<()> {
    // SAFETY: single-threaded here, before any pool or tensor exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", "2") };
    let dev = Device::Cpu;
    let args: Vec<String> = std::env::args().collect();
    let ms: Vec<usize> = args
        .get(1)
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or(vec![1, 8, 32, 64, 128]);
    for &(k, n, tr) in &[
        (512usize, 50304usize, true),
        (512, 1536, true),
        (512, 2048, true),
        (2048, 512, true),
        (128, 384, false),
        (128, 512, false),
        (512, 128, false),
        (128, 14, true),
    ] {
        for &m in &ms {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = if tr {
                Tensor::randn(0f32, 1.0, (n, k), &dev)?
            } else {
                Tensor::randn(0f32, 1.0, (k, n), &dev)?
            };
            let reps = if n * k * m > 100_000_000 { 5 } else { 50 };
            let t_sk = best(
                &mut || {
                    let _ = lethe::models::ops::dense(&x, &w, None, tr).unwrap();
                },
                reps,
            );
            let t_c = best(
                &mut || {
                    let _ = if tr {
                        x.matmul(&w.t().unwrap()).unwrap()
                    } else {
                        x.matmul(&w).unwrap()
                    };
                },
                reps,
            );
            let fl = 2.0 * (m * k * n) as f64;
            println!("m {m:4} k {k:5} n {n:6} {}: lethe {:7.1} GFLOP/s {:8.3} ms | candle {:7.1} GFLOP/s {:8.3} ms | {:.2}x", if tr {"[n,k]"} else {"[k,n]"}, fl / t_sk / 1e9, t_sk * 1e3, fl / t_c / 1e9, t_c * 1e3, t_c / t_sk);
        }
    }
    Ok(())
}
