//! ScienceQA conversion equals the reference converter's output (scripts/fixtures/gen_scienceqa.py)
//! for every format generated, and the `llava15` layout equals the official llava_test_CQM-A.json
//! entries of the same problems.

use std::path::{Path, PathBuf};

use llava_eval::scienceqa::{convert_split, load_problems, load_split};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/scienceqa")
}

#[test]
fn converted_files_equal_the_reference() {
    let problems = load_problems(&dir().join("problems.json")).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(dir().join("expected")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let rest = name.strip_prefix("llava_").unwrap();
        let (split, format) = rest.split_once('_').unwrap();
        let pids = load_split(&dir().join("pid_splits.json"), split).unwrap();
        let ours = serde_json::Value::Array(convert_split(&problems, &pids, format).unwrap());
        let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if ours != expected {
            for (a, b) in ours.as_array().unwrap().iter().zip(expected.as_array().unwrap()) {
                assert_eq!(a, b, "{name}");
            }
        }
        assert_eq!(ours, expected, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 14);
}

#[test]
fn bad_format_and_split_are_clear_errors() {
    let problems = load_problems(&dir().join("problems.json")).unwrap();
    let pids = load_split(&dir().join("pid_splits.json"), "test").unwrap();
    let err = convert_split(&problems, &pids, "XYZ-A").unwrap_err().to_string();
    assert!(err.contains("XYZ-A"), "{err}");
    let err = load_split(&dir().join("pid_splits.json"), "minitest").unwrap_err().to_string();
    assert!(err.contains("minitest") && err.contains("test"), "{err}");
}
