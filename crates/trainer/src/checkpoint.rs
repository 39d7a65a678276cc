//! Resumable checkpoints: the trainable weights (with their parameter ids, which the optimizer
//! state is keyed by), the AdamW state, the step counter and the caller's own state (data
//! position, RNG).
//!
//! A checkpoint is complete or absent: it is written in a hidden temporary folder, given a
//! manifest of every file's size and SHA-256 (written last), and renamed to `checkpoint-N/`
//! ([`llava_io::AtomicDir`]). [`latest_intact`] verifies the manifest before a resume and falls
//! back to the newest checkpoint that verifies, naming what was wrong with the newer ones. Only
//! the last `keep` checkpoints are kept.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use llava_io::{AtomicDir, Manifest};

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
#[serde(deny_unknown_fields)]
struct State {
    stage: Stage,
    step: usize,
    /// Whatever the training loop needs to continue (data position, RNG state, …).
    extra: serde_json::Value,
}

fn recorder() -> BinFileRecorder<FullPrecisionSettings> {
    BinFileRecorder::<FullPrecisionSettings>::new()
}

/// Writes `dir/checkpoint-{step}/` (complete or absent, with its manifest) and removes all but
/// the newest `keep` checkpoints.
pub fn save<B: AutodiffBackend>(
    trainer: &Trainer<B>, dir: &Path, keep: usize, extra: serde_json::Value,
) -> Result<PathBuf, CheckpointError> {
    let final_dir = dir.join(format!("checkpoint-{}", trainer.step));
    let out = AtomicDir::create(&final_dir).map_err(io(&final_dir))?;
    let tmp = out.path().to_path_buf();
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: burn::record::RecorderError| CheckpointError::Io { path, reason: e.to_string() }
    };
    let rec = recorder();
    rec.record(trainer.model.projector.clone().into_record(), tmp.join("projector")).map_err(err(&tmp))?;
    if trainer.lora() {
        // Only the adapters train; the frozen base is the run's input, not saved again.
        let llm = &trainer.model.llm;
        rec.record(llm.lora_adapters().into_record(), tmp.join("lora")).map_err(err(&tmp))?;
        if llm.saves("embed_tokens") {
            rec.record(llm.embed_tokens.clone().into_record(), tmp.join("embed_tokens")).map_err(err(&tmp))?;
        }
        if llm.saves("lm_head") {
            rec.record(llm.lm_head.clone().into_record(), tmp.join("lm_head")).map_err(err(&tmp))?;
        }
    } else if trainer.stage == Stage::Two {
        rec.record(trainer.model.llm.clone().into_record(), tmp.join("llm")).map_err(err(&tmp))?;
    }
    rec.record(trainer.optim.to_record(), tmp.join("optimizer")).map_err(err(&tmp))?;
    let state = State { stage: trainer.stage, step: trainer.step, extra };
    let text = serde_json::to_string_pretty(&state).map_err(|e| io(&tmp)(std::io::Error::other(e)))?;
    std::fs::write(tmp.join("state.json"), text).map_err(io(&tmp))?;
    out.commit().map_err(io(&final_dir))?;
    for old in list(dir)?.into_iter().rev().skip(keep.max(1)) {
        std::fs::remove_dir_all(&old.1).map_err(io(&old.1))?;
    }
    Ok(final_dir)
}

/// Checkpoints in `dir` under their final names, oldest first, as `(step, path)` (a folder a
/// kill left half-written has a hidden temporary name and is not listed).
pub fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>, CheckpointError> {
    let mut names = list_names(dir)?;
    // A checkpoint a kill left moved aside between the two renames of a commit is put back.
    let moved_aside: Vec<&str> =
        names.iter().filter_map(|n| n.strip_prefix(".checkpoint-")?.strip_suffix(".old")).collect();
    if !moved_aside.is_empty() {
        for step in moved_aside {
            let target = dir.join(format!("checkpoint-{step}"));
            AtomicDir::recover(&target).map_err(io(&target))?;
        }
        names = list_names(dir)?;
    }
    let mut found: Vec<(usize, PathBuf)> = names
        .into_iter()
        .filter_map(|name| Some((name.strip_prefix("checkpoint-")?.parse().ok()?, dir.join(&name))))
        .collect();
    found.sort();
    Ok(found)
}

/// A checkpoint that was passed over on resume, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub path: PathBuf,
    pub reason: String,
}

/// The newest checkpoint in `dir` whose manifest verifies (every file present, of its size and
/// SHA-256) and whose `state.json` reads, with the newer ones that did not (each logged as a
/// warning naming the file and the fault). `None` when no checkpoint verifies.
pub fn latest_intact(dir: &Path) -> Result<Intact, CheckpointError> {
    let mut rejected = Vec::new();
    for (step, path) in list(dir)?.into_iter().rev() {
        match verify(&path, step) {
            Ok(()) => return Ok(Intact { newest: Some((step, path)), rejected }),
            Err(reason) => {
                tracing::warn!("passing over checkpoint {}: {reason}", path.display());
                rejected.push(Rejected { path, reason });
            }
        }
    }
    Ok(Intact { newest: None, rejected })
}

/// What [`latest_intact`] found: the checkpoint to resume from, and the newer ones passed over.
#[derive(Debug, Clone)]
pub struct Intact {
    /// `(step, folder)` of the newest checkpoint that verifies.
    pub newest: Option<(usize, PathBuf)>,
    pub rejected: Vec<Rejected>,
}

/// Why the checkpoint `path` (named for `step`) cannot be resumed from, if it cannot.
fn verify(path: &Path, step: usize) -> Result<(), String> {
    Manifest::verify(path).map_err(|e| e.to_string())?;
    let state = read_state(path).map_err(|e| e.to_string())?;
    if state.step != step {
        return Err(format!("state.json says step {} but the folder is checkpoint-{step}", state.step));
    }
    Ok(())
}

/// The names in `dir` (none when it does not exist).
fn list_names(dir: &Path) -> Result<Vec<String>, CheckpointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    Ok(entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
}

fn read_state(checkpoint: &Path) -> Result<State, CheckpointError> {
    let path = checkpoint.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Io { path, reason: e.to_string() })
}

/// Restores a checkpoint into `trainer` (built from the same base weights and config): trainable
/// weights and their ids, optimizer state, step. Returns the caller's `extra` state. Call
/// [`latest_intact`] first to pick a checkpoint that verifies; a record that still does not
/// decode is an error naming its file.
pub fn load<B: AutodiffBackend>(
    trainer: &mut Trainer<B>, checkpoint: &Path,
) -> Result<serde_json::Value, CheckpointError> {
    let state = read_state(checkpoint)?;
    if state.stage != trainer.stage {
        return Err(CheckpointError::Stage { path: checkpoint.into(), found: state.stage, expected: trainer.stage });
    }
    let device = trainer.model.llm.embed_tokens.weight.device();
    let rec = recorder();
    // Burn's recorder names neither the file nor the fault's place; the file is named here.
    let err = |name: &str| {
        let path = checkpoint.join(format!("{name}.bin"));
        move |e: burn::record::RecorderError| CheckpointError::Io { path, reason: e.to_string() }
    };
    let lora = trainer.lora();
    let model = &mut trainer.model;
    model.projector =
        model.projector.clone().load_record(rec.load(checkpoint.join("projector"), &device).map_err(err("projector"))?);
    if lora {
        let record = rec.load(checkpoint.join("lora"), &device).map_err(err("lora"))?;
        let adapters = model.llm.lora_adapters().load_record(record);
        model.llm.set_lora_adapters(adapters);
        if model.llm.saves("embed_tokens") {
            let record = rec.load(checkpoint.join("embed_tokens"), &device).map_err(err("embed_tokens"))?;
            model.llm.embed_tokens = model.llm.embed_tokens.clone().load_record(record);
        }
        if model.llm.saves("lm_head") {
            let record = rec.load(checkpoint.join("lm_head"), &device).map_err(err("lm_head"))?;
            model.llm.lm_head = model.llm.lm_head.clone().load_record(record);
        }
    } else if state.stage == Stage::Two {
        model.llm = model.llm.clone().load_record(rec.load(checkpoint.join("llm"), &device).map_err(err("llm"))?);
    }
    let optim_record = rec.load(checkpoint.join("optimizer"), &device).map_err(err("optimizer"))?;
    trainer.optim = trainer.optim.clone().load_record(optim_record);
    trainer.step = state.step;
    Ok(state.extra)
}
