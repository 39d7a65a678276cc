//! ScienceQA with LLaVA, as the reference evaluates it: converting ScienceQA problems into LLaVA
//! question files (`scienceqa`: the reference converter's formats and LLaVA-1.5's layout),
//! batched prediction into a resumable answers file (`predict`: `model_vqa_science`), and the
//! reference's answer parsing, scoring and category table (`score`: `eval_science_qa.py`).
//!
//! Depends on the composed model (`llava`) and the data crate; nothing of the trainer, and
//! nothing depends on it but the demo and the command line.
//!
//! ```no_run
//! use llava_eval::{scienceqa, score};
//!
//! let problems = scienceqa::load_problems("problems.json".as_ref())?;
//! let pids = scienceqa::load_split("pid_splits.json".as_ref(), "test")?;
//! let answers = score::read_answers("answers.jsonl".as_ref())?;
//! let result = score::score_answers(&problems, &pids, &answers, score::Fallback::Wrong, 0);
//! println!("{}", score::format_table(&result));
//! # Ok::<(), llava_eval::EvalError>(())
//! ```

pub mod predict;
pub mod scienceqa;
pub mod score;

use std::path::{Path, PathBuf};

/// What can go wrong in an evaluation; each variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Sqa(#[from] scienceqa::SqaError),
    #[error(transparent)]
    Llava(#[from] llava::LlavaError),
    #[error("{0}")]
    Options(String),
}

impl EvalError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn format(path: &Path, reason: impl ToString) -> Self {
        Self::Format { path: path.to_path_buf(), reason: reason.to_string() }
    }
}
