"""Builds a ScienceQA `problems.json` for the test split from what LLaVA ships and a public CSV.

The official problems.json (>4 MiB) is not bundled. Scoring needs, per test problem, the number of
choices, the answer, whether it has a hint (TXT) and an image (IMG), its grade and its subject.
`llava_test_CQM-A.json` (LLaVA-1.5's evaluation file) carries the first four: human =
"<image>\n" (iff image) + "Context: {hint}\n" (iff hint) + "{question}\n" + "A. c0\nB. c1...",
gpt = the gold letter; `id_grade_subject.csv` carries grade and subject. A hint that spans several
lines cannot be told apart from the question, so it keeps its first line only (scoring needs only
whether there is one).

Usage: python scripts/sqa/build_test_problems.py LLAVA_TEST_CQM_A.json ID_GRADE_SUBJECT.csv \
           PID_SPLITS.json OUT_DIR [--results GPT3_RESULT.json] [--compact]
Writes OUT_DIR/problems.json, OUT_DIR/pid_splits.json (the test list only) and, with --results,
OUT_DIR/<name> holding only acc/correct/count/results of that result file. --compact leaves the
question texts out (the test fixture's size).
"""
import csv
import json
import os
import sys

LETTERS = ["A", "B", "C", "D", "E"]


def parse(human):
    has_image = human.startswith("<image>\n")
    if has_image:
        human = human[len("<image>\n"):]
    hint = ""
    if human.startswith("Context: "):
        hint, human = human[len("Context: "):].split("\n", 1)
    # The options block starts at the last "\nA. "; each next letter's "\n{L}. " ends a choice
    # (choices may themselves contain newlines).
    start = human.rfind("\nA. ")
    if start >= 0:
        question, rest = human[:start], human[start + 4:]
        choices = []
        for letter in LETTERS[1:]:
            cut = rest.find(f"\n{letter}. ")
            if cut < 0:
                break
            choices.append(rest[:cut])
            rest = rest[cut + 4:]
        choices.append(rest)
        return question, choices, hint, has_image
    raise ValueError(f"no options in {human!r}")


def main():
    test_file, csv_file, splits_file, out_dir = sys.argv[1:5]
    results_file = sys.argv[sys.argv.index("--results") + 1] if "--results" in sys.argv else None
    meta = {}
    with open(csv_file, newline="") as f:
        for row in csv.DictReader(f):
            meta[row["question_id"]] = (f"grade{int(row['grade'])}", row["subject"])
    problems = {}
    for item in json.load(open(test_file)):
        pid = str(item["id"])
        question, choices, hint, has_image = parse(item["conversations"][0]["value"])
        answer = LETTERS.index(item["conversations"][1]["value"].strip())
        grade, subject = meta[pid]
        if "--compact" in sys.argv:
            question = ""
        problems[pid] = {
            "question": question, "choices": choices, "answer": answer, "hint": hint,
            "image": "image.png" if has_image else None, "grade": grade, "subject": subject, "split": "test",
        }
    test = [pid for pid in json.load(open(splits_file))["test"]]
    missing = [pid for pid in test if pid not in problems]
    assert not missing, f"{len(missing)} test pids missing from {test_file}"
    os.makedirs(out_dir, exist_ok=True)
    json.dump(problems, open(os.path.join(out_dir, "problems.json"), "w"), separators=(",", ":"))
    json.dump({"test": test}, open(os.path.join(out_dir, "pid_splits.json"), "w"))
    if results_file:
        r = json.load(open(results_file))
        slim = {k: r[k] for k in ["acc", "correct", "count", "results"]}
        json.dump(slim, open(os.path.join(out_dir, os.path.basename(results_file)), "w"))
    print(f"{len(problems)} problems, {len(test)} test pids -> {out_dir}")


if __name__ == "__main__":
    main()
