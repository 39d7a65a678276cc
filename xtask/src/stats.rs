//! Summary statistics of the benchmarks' repeated measurements.

/// The median (the upper one of an even count); `NaN` for no values.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The nearest-rank percentile `p` (0–100): the smallest value with at least `p` % of the values
/// at or below it; `NaN` for no values.
pub fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values.get(rank.clamp(1, values.len().max(1)) - 1).copied().unwrap_or(f64::NAN)
}
