//! Resumable checkpoints: the trainable weights (with their parameter ids, which the optimizer
//! state is keyed by), the AdamW state, the step counter and the caller's own state (data
//! position, RNG), written atomically: everything goes into `checkpoint-N.partial/`, which is
//! renamed to `checkpoint-N/` only when complete, so a crash never leaves a broken checkpoint
//! under a final name. Only the last `keep` checkpoints are kept.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;

use crate::{Stage, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: checkpoint of stage {found:?}, but this run is stage {expected:?}")]
    Stage { path: PathBuf, found: Stage, expected: Stage },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct State {
    stage: Stage,
    step: usize,
    /// Whatever the training loop needs to continue (data position, RNG state, …).
    extra: serde_json::Value,
}

fn recorder() -> BinFileRecorder<FullPrecisionSettings> {
    BinFileRecorder::<FullPrecisionSettings>::new()
}

/// Writes `dir/checkpoint-{step}/` and removes all but the newest `keep` checkpoints.
pub fn save<B: AutodiffBackend>(
    trainer: &Trainer<B>, dir: &Path, keep: usize, extra: serde_json::Value,
) -> Result<PathBuf, CheckpointError> {
    let final_dir = dir.join(format!("checkpoint-{}", trainer.step));
    let tmp = dir.join(format!("checkpoint-{}.partial", trainer.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: burn::record::RecorderError| CheckpointError::Io { path, reason: e.to_string() }
    };
    let rec = recorder();
    rec.record(trainer.model.projector.clone().into_record(), tmp.join("projector")).map_err(err(&tmp))?;
    if trainer.stage == Stage::Two {
        rec.record(trainer.model.llm.clone().into_record(), tmp.join("llm")).map_err(err(&tmp))?;
    }
    rec.record(trainer.optim.to_record(), tmp.join("optimizer")).map_err(err(&tmp))?;
    let state = State { stage: trainer.stage, step: trainer.step, extra };
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(&state).expect("json")).map_err(io(&tmp))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    for old in list(dir)?.into_iter().rev().skip(keep.max(1)) {
        std::fs::remove_dir_all(&old.1).map_err(io(&old.1))?;
    }
    Ok(final_dir)
}

/// Complete checkpoints in `dir`, oldest first, as `(step, path)`.
pub fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>, CheckpointError> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Restores a checkpoint into `trainer` (built from the same base weights and config): trainable
/// weights and their ids, optimizer state, step. Returns the caller's `extra` state.
pub fn load<B: AutodiffBackend>(
    trainer: &mut Trainer<B>, checkpoint: &Path,
) -> Result<serde_json::Value, CheckpointError> {
    let text = std::fs::read_to_string(checkpoint.join("state.json")).map_err(io(checkpoint))?;
    let state: State = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::Io { path: checkpoint.join("state.json"), reason: e.to_string() })?;
    if state.stage != trainer.stage {
        return Err(CheckpointError::Stage { path: checkpoint.into(), found: state.stage, expected: trainer.stage });
    }
    let err = |e: burn::record::RecorderError| CheckpointError::Io { path: checkpoint.into(), reason: e.to_string() };
    let device = trainer.model.llm.embed_tokens.weight.device();
    let rec = recorder();
    let model = &mut trainer.model;
    model.projector =
        model.projector.clone().load_record(rec.load(checkpoint.join("projector"), &device).map_err(err)?);
    if state.stage == Stage::Two {
        model.llm = model.llm.clone().load_record(rec.load(checkpoint.join("llm"), &device).map_err(err)?);
    }
    let optim_record = rec.load(checkpoint.join("optimizer"), &device).map_err(err)?;
    trainer.optim = trainer.optim.clone().load_record(optim_record);
    trainer.step = state.step;
    Ok(state.extra)
}
