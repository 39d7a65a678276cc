//! The demo's synthetic dataset: pictures of 1–3 coloured shapes in one corner of the canvas,
//! generated deterministically from a seed, in the formats of the real data:
//!
//! * `captions.json`: stage-1 caption pairs (LCS-558K layout: `<image>` then the caption);
//! * `lm_text.json`: text-only records (the scene in words, then its caption) for the demo LLM's
//!   brief text pretraining;
//! * `instruct.json`: stage-2 data, multi-turn conversations about the pictures plus the training
//!   split of the multiple-choice questions (LLaVA-1.5 ScienceQA layout with the single-prediction
//!   instruction);
//! * `scienceqa/problems.json` + `scienceqa/pid_splits.json`: the multiple-choice questions as
//!   ScienceQA problems (`train`, `val`, `test`; the test pictures are never trained on), and
//!   `scienceqa/llava_test_CQM-A.json`, the evaluation question file;
//! * `images/`: 112×112 PNGs (caption pictures under `caption/`, question pictures as
//!   `{pid}/image.png`, ScienceQA's layout).
//!
//! Every property a question asks about (colour, shape, count, corner) is visible in the picture
//! and drawn aligned to a 4×4 grid, so a 56-pixel CLIP with 14-pixel patches sees each shape in
//! its own patch.

use std::collections::BTreeMap;
use std::path::Path;

use ::image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use llava_eval::scienceqa::{Problem, SINGLE_PRED_PROMPT, llava15_sample};

pub const COLORS: [(&str, [u8; 3]); 5] = [
    ("red", [220, 40, 40]),
    ("green", [40, 160, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [230, 200, 30]),
    ("purple", [150, 60, 190]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub const CORNERS: [&str; 4] = ["top left", "top right", "bottom left", "bottom right"];
pub const COUNT_WORDS: [&str; 3] = ["one", "two", "three"];

const SIZE: u32 = 112;
const CELL: u32 = SIZE / 4;

/// What a picture shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    pub color: usize,
    pub shape: usize,
    /// 1–3.
    pub count: usize,
    pub corner: usize,
    /// Grid cells (row, column) holding a shape, inside the corner's 2×2 block.
    pub cells: Vec<(u32, u32)>,
}

impl Scene {
    pub fn random(rng: &mut StdRng) -> Self {
        let corner = rng.random_range(0..CORNERS.len());
        let count = rng.random_range(1..=3);
        let (r0, c0) = ((corner as u32 / 2) * 2, (corner as u32 % 2) * 2);
        let mut block = vec![(r0, c0), (r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1)];
        block.shuffle(rng);
        block.truncate(count);
        block.sort();
        Self {
            color: rng.random_range(0..COLORS.len()),
            shape: rng.random_range(0..SHAPES.len()),
            count,
            corner,
            cells: block,
        }
    }

    fn noun(&self) -> String {
        let s = SHAPES[self.shape];
        if self.count == 1 { s.to_string() } else { format!("{s}s") }
    }

    /// "two red circles in the top left."
    pub fn caption(&self) -> String {
        format!(
            "{} {} {} in the {}.",
            COUNT_WORDS[self.count - 1],
            COLORS[self.color].0,
            self.noun(),
            CORNERS[self.corner]
        )
    }

    /// The scene as words, one "corner colour shape" group per shape ("top left red circle, top
    /// left red circle"): the demo LLM's text pretraining puts this before the caption, so that
    /// the LLM learns to read a caption's facts from the context, as a real LLM can; stage 1 then
    /// teaches the projector to say the same with image tokens.
    pub fn attribute_words(&self) -> String {
        let one = format!("{} {} {}", CORNERS[self.corner], COLORS[self.color].0, SHAPES[self.shape]);
        vec![one; self.count].join(", ")
    }

    /// Draws the scene: light background, each shape filling most of its grid cell.
    pub fn draw(&self, rng: &mut StdRng) -> RgbImage {
        let bg = 235 + rng.random_range(0..15u8);
        let mut img = RgbImage::from_pixel(SIZE, SIZE, Rgb([bg, bg, bg]));
        let base = COLORS[self.color].1;
        for &(row, col) in &self.cells {
            let jitter = |c: u8, rng: &mut StdRng| (c as i32 + rng.random_range(-12..=12)).clamp(0, 255) as u8;
            let color = Rgb([jitter(base[0], rng), jitter(base[1], rng), jitter(base[2], rng)]);
            let half = rng.random_range(8..=11) as f32;
            let cx = (col * CELL + CELL / 2) as f32 + rng.random_range(-2.0..=2.0f32);
            let cy = (row * CELL + CELL / 2) as f32 + rng.random_range(-2.0..=2.0f32);
            for y in row * CELL..(row + 1) * CELL {
                for x in col * CELL..(col + 1) * CELL {
                    let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                    let inside = match SHAPES[self.shape] {
                        "circle" => dx * dx + dy * dy <= half * half,
                        "square" => dx.abs() <= half * 0.85 && dy.abs() <= half * 0.85,
                        // Apex up: the width grows linearly from the top edge to the base.
                        _ => dy >= -half && dy <= half && dx.abs() <= (dy + half) / 2.0,
                    };
                    if inside {
                        img.put_pixel(x, y, color);
                    }
                }
            }
        }
        img
    }
}

/// Sizes of the generated dataset.
#[derive(Debug, Clone, Copy)]
pub struct ShapesConfig {
    pub seed: u64,
    /// Caption pictures (stage 1; stage 2's conversations reuse them).
    pub captions: usize,
    /// Multi-turn conversations in stage 2.
    pub conversations: usize,
    /// Multiple-choice questions per split.
    pub train_questions: usize,
    /// Text-only training questions whose context (`hint`) is the caption, as ScienceQA's
    /// text-context problems: they teach the answer format and option matching without a picture.
    pub train_text_questions: usize,
    pub val_questions: usize,
    pub test_questions: usize,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        Self {
            seed: 2023,
            captions: 2000,
            conversations: 1000,
            train_questions: 2000,
            train_text_questions: 0,
            val_questions: 200,
            test_questions: 200,
        }
    }
}

/// A question about one property, ScienceQA-style: every value of the property as an option, in
/// their natural order (as ScienceQA lists e.g. "past / present / future"), so chance is 1/5 to
/// 1/3. (Shuffled three-option lists were tried: the demo's 2-layer, 64-wide LLM did not learn to
/// bind option letters to option words within the time budget, even for text-only questions.)
fn question(scene: &Scene, rng: &mut StdRng) -> (String, Vec<String>, usize, &'static str) {
    let (question, names, truth, category): (&str, Vec<String>, usize, &str) = match rng.random_range(0..4) {
        0 => (
            "What color are the shapes in the image?",
            COLORS.iter().map(|c| c.0.to_string()).collect(),
            scene.color,
            "Colors",
        ),
        1 => (
            "Which shape is shown in the image?",
            SHAPES.iter().map(|s| s.to_string()).collect(),
            scene.shape,
            "Shapes",
        ),
        2 => (
            "How many shapes are in the image?",
            COUNT_WORDS.iter().map(|s| s.to_string()).collect(),
            scene.count - 1,
            "Counting",
        ),
        _ => (
            "Where are the shapes in the image?",
            CORNERS.iter().map(|s| s.to_string()).collect(),
            scene.corner,
            "Positions",
        ),
    };
    (question.to_string(), names, truth, category)
}

/// Two or three turns about the picture, in random order; the first carries `<image>`.
fn conversation(scene: &Scene, rng: &mut StdRng) -> Vec<Value> {
    let plural = scene.count > 1;
    let mut turns = vec![
        (
            "What color are the shapes?".to_string(),
            format!("{} {}.", if plural { "They are" } else { "It is" }, COLORS[scene.color].0),
        ),
        (
            "How many shapes are there?".to_string(),
            format!("There {} {} {}.", if plural { "are" } else { "is" }, COUNT_WORDS[scene.count - 1], scene.noun()),
        ),
        ("What kind of shapes are they?".to_string(), format!("{}.", capitalise(&scene.noun()))),
        ("Where are the shapes?".to_string(), format!("In the {} corner.", CORNERS[scene.corner])),
        ("Describe the image briefly.".to_string(), capitalise(&scene.caption())),
    ];
    turns.shuffle(rng);
    turns.truncate(rng.random_range(2..=3));
    let mut out = Vec::new();
    for (i, (q, a)) in turns.into_iter().enumerate() {
        let q = if i == 0 {
            if rng.random_bool(0.5) { format!("<image>\n{q}") } else { format!("{q}\n<image>") }
        } else {
            q
        };
        out.push(json!({"from": "human", "value": q}));
        out.push(json!({"from": "gpt", "value": a}));
    }
    out
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

/// Everything `generate` writes, in memory: JSON files by relative path and PNGs by relative path.
pub struct ShapesDataset {
    pub json: Vec<(String, Value)>,
    pub images: Vec<(String, RgbImage)>,
}

/// Builds the whole dataset from `config.seed` (same seed, same bytes).
pub fn build(config: &ShapesConfig) -> ShapesDataset {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut images = Vec::new();
    let mut captions = Vec::new();
    let mut lm_text = Vec::new();
    let mut scenes = Vec::new();
    for i in 0..config.captions {
        let scene = Scene::random(&mut rng);
        let file = format!("caption/{i:05}.png");
        images.push((file.clone(), scene.draw(&mut rng)));
        captions.push(json!({
            "id": format!("caption-{i:05}"),
            "image": file,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": scene.caption()}],
        }));
        lm_text.push(json!({
            "id": format!("text-{i:05}"),
            "conversations": [{"from": "human", "value": scene.attribute_words()}, {"from": "gpt", "value": scene.caption()}],
        }));
        scenes.push((file, scene));
    }
    let mut instruct = Vec::new();
    for i in 0..config.conversations {
        let (file, scene) = &scenes[rng.random_range(0..scenes.len())];
        instruct
            .push(json!({"id": format!("conv-{i:05}"), "image": file, "conversations": conversation(scene, &mut rng)}));
    }
    let mut problems = BTreeMap::new();
    let mut splits: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut pid = 1usize;
    let questions = [
        ("train", config.train_questions, true),
        ("train", config.train_text_questions, false),
        ("val", config.val_questions, true),
        ("test", config.test_questions, true),
    ];
    for (split, n, with_image) in questions {
        for _ in 0..n {
            let scene = Scene::random(&mut rng);
            let (q, choices, answer, category) = question(&scene, &mut rng);
            let hint = if with_image {
                images.push((format!("{pid}/image.png"), scene.draw(&mut rng)));
                String::new()
            } else {
                capitalise(&scene.caption())
            };
            let problem = Problem {
                question: q,
                choices,
                answer,
                hint,
                image: with_image.then(|| "image.png".into()),
                task: "closed choice".into(),
                grade: "grade1".into(),
                subject: "natural science".into(),
                topic: "shapes".into(),
                category: category.into(),
                skill: category.to_lowercase(),
                lecture: String::new(),
                solution: String::new(),
                split: split.into(),
            };
            splits.entry(split).or_default().push(pid.to_string());
            problems.insert(pid, problem);
            pid += 1;
        }
    }
    let sample = |pid: &String| {
        llava15_sample(pid, &problems[&pid.parse::<usize>().expect("numeric pid")]).expect("valid problem")
    };
    let with_instruction = |pid: &String| {
        let mut sample = sample(pid);
        let human = &mut sample["conversations"][0]["value"];
        *human = Value::String(format!("{}\n{SINGLE_PRED_PROMPT}", human.as_str().expect("text")));
        sample
    };
    instruct.extend(splits["train"].iter().map(with_instruction));
    instruct.shuffle(&mut rng);
    let test_questions: Vec<Value> = splits["test"].iter().map(sample).collect();
    let val_questions: Vec<Value> = splits["val"].iter().map(sample).collect();
    let val_instruct: Vec<Value> = splits["val"].iter().map(with_instruction).collect();
    let problems_json: serde_json::Map<String, Value> = problems
        .iter()
        .map(|(pid, p)| (pid.to_string(), serde_json::to_value(p).expect("problem serialises")))
        .collect();
    ShapesDataset {
        json: vec![
            ("captions.json".into(), Value::Array(captions)),
            ("lm_text.json".into(), Value::Array(lm_text)),
            ("instruct.json".into(), Value::Array(instruct)),
            ("instruct_val.json".into(), Value::Array(val_instruct)),
            ("scienceqa/problems.json".into(), Value::Object(problems_json)),
            ("scienceqa/pid_splits.json".into(), json!(splits)),
            ("scienceqa/llava_test_CQM-A.json".into(), Value::Array(test_questions)),
            ("scienceqa/llava_val_CQM-A.json".into(), Value::Array(val_questions)),
        ],
        images,
    }
}

/// Writes the dataset under `dir` (JSON pretty-printed, images under `dir/images`).
pub fn write(dataset: &ShapesDataset, dir: &Path) -> std::io::Result<()> {
    for (rel, value) in &dataset.json {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        std::fs::write(&path, serde_json::to_string_pretty(value).expect("json") + "\n")?;
    }
    for (rel, img) in &dataset.images {
        let path = dir.join("images").join(rel);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        img.save(&path).map_err(std::io::Error::other)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ShapesConfig {
        ShapesConfig {
            seed: 5,
            captions: 20,
            conversations: 10,
            train_questions: 12,
            train_text_questions: 6,
            val_questions: 4,
            test_questions: 4,
        }
    }

    #[test]
    fn same_seed_same_dataset_other_seed_other_dataset() {
        let (a, b) = (build(&small()), build(&small()));
        assert_eq!(a.json, b.json);
        assert!(a.images.iter().zip(&b.images).all(|(x, y)| x.0 == y.0 && x.1.as_raw() == y.1.as_raw()));
        let c = build(&ShapesConfig { seed: 6, ..small() });
        assert_ne!(a.json, c.json);
    }

    #[test]
    fn pictures_show_what_the_text_says() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let scene = Scene::random(&mut rng);
            let img = scene.draw(&mut rng);
            // Exactly the scene's cells hold coloured pixels, in the scene's colour.
            for row in 0..4 {
                for col in 0..4 {
                    let center = img.get_pixel(col * CELL + CELL / 2, row * CELL + CELL / 2 + 3);
                    let coloured = center.0.iter().max().unwrap() - center.0.iter().min().unwrap() > 60;
                    assert_eq!(coloured, scene.cells.contains(&(row, col)), "{scene:?} cell {row},{col}");
                    if coloured {
                        let base = COLORS[scene.color].1;
                        assert!(center.0.iter().zip(base).all(|(p, b)| (*p as i32 - b as i32).abs() <= 12));
                    }
                }
            }
            let corner = CORNERS[scene.corner];
            assert!(scene.caption().ends_with(&format!("in the {corner}.")));
        }
    }

    #[test]
    fn questions_have_one_right_option_and_held_out_pictures() {
        let d = build(&small());
        let find = |name: &str| &d.json.iter().find(|(n, _)| n == name).unwrap().1;
        let problems = find("scienceqa/problems.json").as_object().unwrap();
        let splits = find("scienceqa/pid_splits.json");
        assert_eq!(splits["test"].as_array().unwrap().len(), 4);
        for p in problems.values() {
            let p: Problem = serde_json::from_value(p.clone()).unwrap();
            assert!((3..=5).contains(&p.choices.len()));
            let unique: std::collections::HashSet<_> = p.choices.iter().collect();
            assert_eq!(unique.len(), p.choices.len());
            assert!(p.answer < p.choices.len());
        }
        // Training data never shows a test picture.
        let instruct = find("instruct.json").to_string();
        for pid in splits["test"].as_array().unwrap() {
            assert!(!instruct.contains(&format!("\"{}/image.png\"", pid.as_str().unwrap())));
        }
    }
}
