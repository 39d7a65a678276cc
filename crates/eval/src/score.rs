//! ScienceQA scoring as the reference does it (`llava/eval/eval_science_qa.py`) and the table of
//! the paper (categories as the official `tools/evaluate_acc.py` defines them).
//!
//! Answer parsing: a text that is exactly one option letter; else `"X. …"`; else the regex
//! `The answer is ([A-Z]).` with exactly one match; else `FAILED`. A letter maps to an index only
//! within the problem's choices. What an unparsable or out-of-range answer counts as is the
//! [`Fallback`]: `Wrong` (index −1, the reference at HEAD) or `Random` (a uniformly random choice,
//! the paper-era code; Python's RNG cannot be reproduced, so the draw is from a seeded `StdRng`).

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::scienceqa::{OPTIONS, Problem};

/// What an unparsable or out-of-range answer counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Index −1: always wrong (reference HEAD).
    #[default]
    Wrong,
    /// A uniformly random choice (paper-era reference).
    Random,
}

impl std::str::FromStr for Fallback {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wrong" => Ok(Self::Wrong),
            "random" => Ok(Self::Random),
            other => Err(format!("unknown fallback `{other}` (wrong | random)")),
        }
    }
}

/// The letter an answer text states, or `None` (`FAILED`).
pub fn parse_letter(text: &str) -> Option<char> {
    if OPTIONS.contains(&text) {
        return text.chars().next();
    }
    let chars: Vec<char> = text.chars().collect();
    if chars.len() >= 3 && OPTIONS.iter().any(|o| o.starts_with(chars[0])) && chars[1] == '.' && chars[2] == ' ' {
        return Some(chars[0]);
    }
    // re.findall(r'The answer is ([A-Z]).', text): non-overlapping, `.` = any char but '\n'.
    let pattern: Vec<char> = "The answer is ".chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i + pattern.len() + 2 <= chars.len() {
        let letter = chars[i + pattern.len()];
        let after = chars[i + pattern.len() + 1];
        if chars[i..i + pattern.len()] == pattern[..] && letter.is_ascii_uppercase() && after != '\n' {
            found.push(letter);
            i += pattern.len() + 2;
        } else {
            i += 1;
        }
    }
    if found.len() == 1 { Some(found[0]) } else { None }
}

/// The chosen index: the letter's position if it is among the first `choices` options, else the
/// fallback (−1 or a random index).
pub fn pred_index(letter: Option<char>, choices: usize, fallback: Fallback, rng: &mut StdRng) -> i64 {
    let index = letter.and_then(|l| OPTIONS[..choices.min(OPTIONS.len())].iter().position(|o| o.starts_with(l)));
    match (index, fallback) {
        (Some(i), _) => i as i64,
        (None, Fallback::Wrong) => -1,
        (None, Fallback::Random) => rng.random_range(0..choices.max(1)) as i64,
    }
}

/// The paper's ScienceQA columns, in order.
pub const CATEGORIES: [&str; 9] = ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"];

fn grade_number(grade: &str) -> Option<u32> {
    grade.strip_prefix("grade").and_then(|g| g.parse().ok())
}

/// Whether `problem` belongs to a category column (`Avg` holds every problem).
pub fn in_category(problem: &Problem, category: &str) -> bool {
    let has_text = !problem.hint.is_empty();
    let has_image = problem.image.as_deref().is_some_and(|i| !i.is_empty());
    match category {
        "NAT" => problem.subject == "natural science",
        "SOC" => problem.subject == "social science",
        "LAN" => problem.subject == "language science",
        "TXT" => has_text,
        "IMG" => has_image,
        "NO" => !has_text && !has_image,
        "G1-6" => grade_number(&problem.grade).is_some_and(|g| (1..=6).contains(&g)),
        "G7-12" => grade_number(&problem.grade).is_some_and(|g| (7..=12).contains(&g)),
        _ => true,
    }
}

/// The reference's result file (`acc`, `correct`, `count`, `results`, `outputs`) with the paper's
/// table under `categories` (percentages rounded to 2 decimals; a column with no problem is absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SqaResult {
    pub acc: f64,
    pub correct: usize,
    pub count: usize,
    /// pid → chosen index (−1 = none).
    pub results: BTreeMap<String, i64>,
    /// pid → the model's text.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    #[serde(default)]
    pub categories: BTreeMap<String, f64>,
    /// Accuracy on the problems whose prompt had an image (the reference's `IMG-Accuracy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub img_acc: Option<f64>,
}

fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().expect("a number")
}

/// Accuracy per category over `pids` for chosen indices `results`.
pub fn category_table(
    problems: &HashMap<String, Problem>, pids: &[String], results: &BTreeMap<String, i64>,
) -> BTreeMap<String, f64> {
    let mut table = BTreeMap::new();
    for category in CATEGORIES {
        let (mut n, mut ok) = (0usize, 0usize);
        for pid in pids {
            let Some(problem) = problems.get(pid) else { continue };
            if in_category(problem, category) {
                n += 1;
                ok += usize::from(results.get(pid).is_some_and(|&r| r == problem.answer as i64));
            }
        }
        if n > 0 {
            table.insert(category.to_string(), round2(ok as f64 / n as f64 * 100.0));
        }
    }
    table
}

/// One line of an answers file (`model_vqa_science` output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerLine {
    pub question_id: String,
    #[serde(default)]
    pub prompt: String,
    pub text: String,
}

/// Scores answers against the problems of a split, as `eval_science_qa.py`: a missing answer is
/// `FAILED`; each answer is parsed and mapped to an index with `fallback`.
pub fn score_answers(
    problems: &HashMap<String, Problem>, pids: &[String], answers: &HashMap<String, AnswerLine>, fallback: Fallback,
    seed: u64,
) -> SqaResult {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut results = BTreeMap::new();
    let mut outputs = BTreeMap::new();
    let (mut correct, mut img_n, mut img_ok) = (0usize, 0usize, 0usize);
    for pid in pids {
        let Some(problem) = problems.get(pid) else { continue };
        let (text, prompt) = answers.get(pid).map_or(("FAILED", "Unknown"), |a| (a.text.as_str(), a.prompt.as_str()));
        let index = pred_index(parse_letter(text), problem.choices.len(), fallback, &mut rng);
        let ok = index == problem.answer as i64;
        correct += usize::from(ok);
        if prompt.contains("<image>") {
            img_n += 1;
            img_ok += usize::from(ok);
        }
        results.insert(pid.clone(), index);
        outputs.insert(pid.clone(), text.to_string());
    }
    let count = results.len();
    let categories = category_table(problems, pids, &results);
    SqaResult {
        acc: if count == 0 { 0.0 } else { correct as f64 / count as f64 * 100.0 },
        correct,
        count,
        results,
        outputs,
        categories,
        img_acc: (img_n > 0).then(|| img_ok as f64 / img_n as f64 * 100.0),
    }
}

/// Re-scores an existing result file (`results`: pid → chosen index) over `pids`.
pub fn score_results(
    problems: &HashMap<String, Problem>, pids: &[String], results: &BTreeMap<String, i64>,
) -> SqaResult {
    let kept: BTreeMap<String, i64> = pids.iter().filter_map(|p| results.get(p).map(|&r| (p.clone(), r))).collect();
    let correct = pids
        .iter()
        .filter(|p| problems.get(*p).zip(kept.get(*p)).is_some_and(|(prob, &r)| r == prob.answer as i64))
        .count();
    let count = pids.iter().filter(|p| problems.contains_key(*p)).count();
    SqaResult {
        acc: if count == 0 { 0.0 } else { correct as f64 / count as f64 * 100.0 },
        correct,
        count,
        categories: category_table(problems, pids, &kept),
        results: kept,
        outputs: BTreeMap::new(),
        img_acc: None,
    }
}

/// The table as the paper prints it: a header row and a value row.
pub fn format_table(result: &SqaResult) -> String {
    let header: Vec<String> = CATEGORIES.iter().map(|c| format!("{c:>6}")).collect();
    let values: Vec<String> = CATEGORIES
        .iter()
        .map(|c| result.categories.get(*c).map_or(format!("{:>6}", "-"), |v| format!("{v:>6.2}")))
        .collect();
    format!("{}\n{}\ncorrect {}/{}", header.join(" "), values.join(" "), result.correct, result.count)
}

/// The answer lines of an answers file (JSON lines, as `sqa-predict` and the reference write
/// them), by question id; blank lines are skipped, a line that does not parse is an error naming it.
pub fn read_answers(path: &std::path::Path) -> Result<HashMap<String, AnswerLine>, crate::EvalError> {
    let text = std::fs::read_to_string(path).map_err(crate::EvalError::io(path))?;
    let mut answers = HashMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let a: AnswerLine =
            serde_json::from_str(line).map_err(|e| crate::EvalError::format(path, format!("line {}: {e}", i + 1)))?;
        answers.insert(a.question_id.clone(), a);
    }
    Ok(answers)
}

/// The `results` field (pid → chosen option index) of a result file, as the reference (and the
/// ScienceQA repository's baselines) write them.
pub fn read_results(path: &std::path::Path) -> Result<BTreeMap<String, i64>, crate::EvalError> {
    let text = std::fs::read_to_string(path).map_err(crate::EvalError::io(path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| crate::EvalError::format(path, format!("not JSON: {e}")))?;
    let results = value.get("results").cloned().ok_or_else(|| crate::EvalError::format(path, "no `results` field"))?;
    serde_json::from_value(results)
        .map_err(|e| crate::EvalError::format(path, format!("`results` must map pid to an index: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_follows_the_reference_rules() {
        assert_eq!(parse_letter("B"), Some('B'));
        assert_eq!(parse_letter("C. the moon"), Some('C'));
        assert_eq!(parse_letter("The answer is D."), Some('D'));
        // The regex's `.` is any character, but the match needs one after the letter.
        assert_eq!(parse_letter("The answer is Ax"), Some('A'));
        assert_eq!(parse_letter("The answer is A"), None);
        // Exactly one match, else FAILED.
        assert_eq!(parse_letter("The answer is A. The answer is B."), None);
        assert_eq!(parse_letter("F"), None);
        assert_eq!(parse_letter("b"), None);
        assert_eq!(parse_letter("The answer is G."), Some('G'));
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(pred_index(Some('G'), 3, Fallback::Wrong, &mut rng), -1);
        assert_eq!(pred_index(Some('C'), 2, Fallback::Wrong, &mut rng), -1, "out of range for two choices");
        assert_eq!(pred_index(Some('B'), 2, Fallback::Wrong, &mut rng), 1);
        for _ in 0..20 {
            assert!((0..3).contains(&pred_index(None, 3, Fallback::Random, &mut rng)));
        }
    }
}
