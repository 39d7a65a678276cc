//! ScienceQA: reading `problems.json` / `pid_splits.json` and building prompts as the reference
//! converter (`scripts/convert_sqa_to_llava.py` + `convert_sqa_to_llava_base_prompt.py`,
//! `build_prompt_chatbot` with `use_caption=False`), plus the LLaVA-1.5 evaluation layout of
//! `llava_test_CQM-A.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const OPTIONS: [&str; 5] = ["A", "B", "C", "D", "E"];
/// Appended to a question by `model_vqa_science --single-pred-prompt` (LLaVA-1.5's evaluation).
pub const SINGLE_PRED_PROMPT: &str = "Answer with the option's letter from the given choices directly.";

/// Input formats of the reference converter.
pub const INPUT_FORMATS: &[&str] = &["CQM", "QCM", "QCML", "QCME", "QCMLE", "QCLM", "QCEM", "QCLEM"];
/// Output formats of the reference converter.
pub const OUTPUT_FORMATS: &[&str] = &["A", "AL", "AE", "ALE", "AEL", "LA", "EA", "LEA", "ELA", "LEPA"];

#[derive(Debug, thiserror::Error)]
pub enum SqaError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(
        "unknown ScienceQA format `{0}` (INPUT-OUTPUT with INPUT in {INPUT_FORMATS:?} and OUTPUT in {OUTPUT_FORMATS:?}, or `llava15`)"
    )]
    Format(String),
    #[error("split `{split}` not in {path} (it has: {available})")]
    Split { split: String, path: PathBuf, available: String },
    #[error("problem `{0}` listed in the split is missing from problems.json")]
    MissingProblem(String),
    #[error("problem `{pid}`: answer index {answer} is out of range for {choices} choices")]
    BadAnswer { pid: String, answer: usize, choices: usize },
}

/// One problem of `problems.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
    #[serde(default)]
    pub hint: String,
    pub image: Option<String>,
    #[serde(default)]
    pub task: String,
    #[serde(default)]
    pub grade: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub topic: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub skill: String,
    #[serde(default)]
    pub lecture: String,
    #[serde(default)]
    pub solution: String,
    #[serde(default)]
    pub split: String,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, SqaError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SqaError::File { path: path.to_path_buf(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| SqaError::File { path: path.to_path_buf(), reason: e.to_string() })
}

pub fn load_problems(path: &Path) -> Result<HashMap<String, Problem>, SqaError> {
    read_json(path)
}

/// The pids of `split` in `pid_splits.json`, in file order.
pub fn load_split(path: &Path, split: &str) -> Result<Vec<String>, SqaError> {
    let splits: HashMap<String, Vec<serde_json::Value>> = read_json(path)?;
    let ids = splits.get(split).ok_or_else(|| {
        let mut available: Vec<&str> = splits.keys().map(String::as_str).collect();
        available.sort();
        SqaError::Split { split: split.to_string(), path: path.to_path_buf(), available: available.join(", ") }
    })?;
    // pids are strings in the official file; accept numbers too.
    Ok(ids.iter().map(|v| v.as_str().map(String::from).unwrap_or_else(|| v.to_string())).collect())
}

/// Python's `str.strip()`.
fn strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// `create_one_example_chatbot(format, …, test_example=False)` → (input, output).
pub fn build_example(problem: &Problem, format: &str) -> Result<(String, String), SqaError> {
    let (input_format, output_format) = format.split_once('-').ok_or_else(|| SqaError::Format(format.into()))?;
    let question = &problem.question;
    let context = match strip(&problem.hint) {
        "" => "N/A",
        c => c,
    };
    let choice = problem
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| format!("({}) {c}", OPTIONS.get(i).copied().unwrap_or("?")))
        .collect::<Vec<_>>()
        .join(" ");
    let answer = OPTIONS.get(problem.answer).copied().unwrap_or("?");
    // get_lecture_text escapes newlines and build_prompt_chatbot unescapes them again, which also
    // turns a literal backslash-n in the data into a newline.
    let lecture = problem.lecture.replace('\n', "\\n").replace("\\n", "\n");
    let solution = problem.solution.replace('\n', "\\n").replace("\\n", "\n");
    let input = match input_format {
        "CQM" => format!("Context: {context}\nQuestion: {question}\nOptions: {choice}\n"),
        "QCM" => format!("Question: {question}\nContext: {context}\nOptions: {choice}\n"),
        "QCML" => format!("Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture}\n"),
        "QCME" => format!("Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {solution}\n"),
        "QCMLE" => {
            format!("Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture} {solution}\n")
        }
        "QCLM" => format!("Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choice}\n"),
        "QCEM" => format!("Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choice}\n"),
        "QCLEM" => {
            format!("Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\nOptions: {choice}\n")
        }
        _ => return Err(SqaError::Format(format.into())),
    };
    let output = match output_format {
        "A" => format!("Answer: The answer is {answer}."),
        "AL" => format!("Answer: The answer is {answer}. BECAUSE: {solution}"),
        "AE" => format!("Answer: The answer is {answer}. BECAUSE: {lecture}"),
        "ALE" => format!("Answer: The answer is {answer}. BECAUSE: {lecture} {solution}"),
        "AEL" => format!("Answer: The answer is {answer}. BECAUSE: {solution} {lecture}"),
        "LA" => format!("Answer: {lecture} The answer is {answer}."),
        "EA" => format!("Answer: {solution} The answer is {answer}."),
        "LEA" => format!("Answer: {lecture} {solution} The answer is {answer}."),
        "ELA" => format!("Answer: {solution} {lecture} The answer is {answer}."),
        "LEPA" => {
            let mut out = String::new();
            if !strip(&lecture).is_empty() {
                out += &format!("LECTURE: {lecture}\n");
            }
            if !strip(&solution).is_empty() {
                out += &format!("SOLUTION: {solution}\n");
            }
            out + &format!("###\nANSWER: {answer}.")
        }
        _ => return Err(SqaError::Format(format.into())),
    };
    let post = |s: String| {
        let s = strip(&s.replace("  ", " ")).to_string();
        if s.ends_with("BECAUSE:") { strip(&s.replace("BECAUSE:", "")).to_string() } else { s }
    };
    Ok((post(input), post(output)))
}

/// One converted sample (`convert_to_llava`): `Question: ` / `Answer: ` prefixes removed
/// (every occurrence, as the reference's `str.replace`), `\n<image>` after the input when the
/// problem has an image.
pub fn convert_sample(pid: &str, problem: &Problem, format: &str) -> Result<serde_json::Value, SqaError> {
    let (mut input, mut output) = build_example(problem, format)?;
    if input.starts_with("Question: ") {
        input = input.replace("Question: ", "");
    }
    if output.starts_with("Answer: ") {
        output = output.replace("Answer: ", "");
    }
    Ok(match &problem.image {
        None => serde_json::json!({
            "id": pid,
            "conversations": [{"from": "human", "value": input}, {"from": "gpt", "value": output}],
        }),
        Some(image) => serde_json::json!({
            "id": pid,
            "image": format!("{pid}/{image}"),
            "conversations": [{"from": "human", "value": format!("{input}\n<image>")}, {"from": "gpt", "value": output}],
        }),
    })
}

/// The LLaVA-1.5 evaluation layout (`llava_test_CQM-A.json`): `[<image>\n][Context: hint\n]question\nA. c0\nB. c1…`,
/// answered by the letter alone.
pub fn llava15_sample(pid: &str, problem: &Problem) -> Result<serde_json::Value, SqaError> {
    let letter = OPTIONS
        .get(problem.answer)
        .filter(|_| problem.answer < problem.choices.len())
        .ok_or(SqaError::BadAnswer { pid: pid.to_string(), answer: problem.answer, choices: problem.choices.len() })?;
    let mut human = String::new();
    if problem.image.is_some() {
        human += "<image>\n";
    }
    if !problem.hint.is_empty() {
        human += &format!("Context: {}\n", problem.hint);
    }
    human += &format!("{}\n", problem.question);
    human += &problem
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{}. {c}", OPTIONS.get(i).copied().unwrap_or("?")))
        .collect::<Vec<_>>()
        .join("\n");
    let conversations = serde_json::json!([{"from": "human", "value": human}, {"from": "gpt", "value": letter}]);
    Ok(match &problem.image {
        None => serde_json::json!({"id": pid, "conversations": conversations}),
        Some(image) => {
            serde_json::json!({"id": pid, "image": format!("{pid}/{image}"), "conversations": conversations})
        }
    })
}

/// Converts a split: `format` is a reference format (`QCM-LEA`, `CQM-A`, …) or `llava15`.
pub fn convert_split(
    problems: &HashMap<String, Problem>, pids: &[String], format: &str,
) -> Result<Vec<serde_json::Value>, SqaError> {
    pids.iter()
        .map(|pid| {
            let p = problems.get(pid).ok_or_else(|| SqaError::MissingProblem(pid.clone()))?;
            if format == "llava15" { llava15_sample(pid, p) } else { convert_sample(pid, p, format) }
        })
        .collect()
}
