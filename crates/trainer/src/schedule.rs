//! Hugging Face's `get_cosine_schedule_with_warmup` as the reference trains with it
//! (`lr_scheduler_type cosine`, `warmup_ratio 0.03`).

/// `ceil(warmup_ratio × total_steps)`, as `TrainingArguments.get_warmup_steps`.
pub fn warmup_steps(total_steps: usize, warmup_ratio: f64) -> usize {
    (warmup_ratio * total_steps as f64).ceil() as usize
}

/// The multiplier of the base learning rate at optimizer step `step` (0-based; HF applies
/// `lr_lambda(step)` to the step it is about to take, so the very first step uses `lambda(0)`,
/// which is 0 when there is warmup): linear warmup `step / warmup`, then half a cosine to 0.
pub fn cosine_with_warmup(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
}
