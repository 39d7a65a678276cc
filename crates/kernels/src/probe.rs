//! Measurements of the machine the kernels run on, for benchmarks that report how close a kernel
//! comes to its limit (decode reads every weight once per token, so its limit is the memory read
//! bandwidth).

use std::time::Instant;

/// Memory read bandwidth in GB/s with the rayon pool's threads: each thread sums its own
/// contiguous part of a 1 GiB buffer (far beyond the caches) with eight independent 64-bit lanes
/// (the loop vectorises; one dependent chain would measure the adder instead); median of 5 runs
/// after a warm-up.
pub fn memory_read_bandwidth_gbs() -> f64 {
    use rayon::prelude::*;
    let words = (1usize << 30) / 8;
    let buffer: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(rayon::current_num_threads().max(1));
    let sum_part = |part: &[u64]| -> u64 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature is present.
            return unsafe { sum_avx512(part) };
        }
        let mut lanes = [0u64; 8];
        for block in part.chunks_exact(8) {
            for (l, &v) in lanes.iter_mut().zip(block) {
                *l = l.wrapping_add(v);
            }
        }
        lanes.iter().fold(0u64, |a, &l| a.wrapping_add(l))
    };
    let mut runs: Vec<f64> = (0..6)
        .map(|_| {
            let begin = Instant::now();
            let sum: u64 = buffer.par_chunks(chunk).map(sum_part).reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
            (words * 8) as f64 / begin.elapsed().as_secs_f64() / 1e9
        })
        .skip(1)
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// Four independent 512-bit accumulators: the loads, not the adds, are the limit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(part: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); 4];
    let blocks = part.len() / 32;
    let p = part.as_ptr();
    for b in 0..blocks {
        for (a, acc) in acc.iter_mut().enumerate() {
            let v = unsafe { _mm512_loadu_si512(p.add(b * 32 + a * 8) as *const __m512i) };
            *acc = _mm512_add_epi64(*acc, v);
        }
    }
    let total = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    let mut sum = _mm512_reduce_add_epi64(total) as u64;
    for &v in &part[blocks * 32..] {
        sum = sum.wrapping_add(v);
    }
    sum
}
