"""`ragtune eval` inputs: every bad line named by file:line, gold ids checked before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.evals.inputs import EvalInputError, check_gold, load_qa, load_updates

EXAMPLE = Path(__file__).resolve().parents[2] / "cluster" / "evals" / "example"


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_good_qa(tmp_path):
    qa = load_qa(_write(tmp_path / "qa.jsonl", [
        {"id": 1, "question": "Q?", "answers": ["a"], "documents": ["d.md"]},
        {"id": "u", "question": "Unanswerable?", "answers": [], "documents": [], "kind": "none"},
    ]))
    assert [q.id for q in qa] == ["1", "u"]
    assert qa[0].answerable and not qa[1].answerable and qa[1].kind == "none"


def test_every_bad_line_is_reported_with_file_and_line(tmp_path):
    path = _write(tmp_path / "qa.jsonl", [
        {"id": "a", "question": "Q?", "answers": ["x"], "documents": ["d.md"]},
        "{not json",
        {"id": "a", "question": "dup?", "answers": ["x"], "documents": ["d.md"]},
        {"id": "b", "question": "", "answers": ["x"], "documents": ["d.md"]},
        {"id": "c", "question": "no answers but a gold doc", "answers": [], "documents": ["d.md"]},
        {"id": "d", "question": "Q?", "answers": ["x"], "documents": ["d.md"], "gold": "typo"},
        [1, 2],
    ])
    with pytest.raises(EvalInputError) as info:
        load_qa(path)
    problems = info.value.problems
    assert f"{path}:2: invalid JSON" in problems[0]
    assert any(p.startswith(f"{path}:3: duplicate id 'a' (first at {path}:1)") for p in problems)
    assert any(p.startswith(f"{path}:4: 'question'") for p in problems)
    assert any(p.startswith(f"{path}:5: 'answers' needs at least one") for p in problems)
    assert any(p.startswith(f"{path}:6: unknown key(s) ['gold']") for p in problems)
    assert any(p.startswith(f"{path}:7: expected a JSON object") for p in problems)
    assert len(problems) == 6


def test_updates_and_their_errors(tmp_path):
    ok = load_updates(_write(tmp_path / "u.jsonl", [
        {"document": "d.md", "text": "new", "questions": [{"question": "Q?", "answers": ["new"]}]}]))
    assert ok[0].questions[0].update == "d.md" and ok[0].questions[0].documents == ("d.md",)
    path = _write(tmp_path / "bad.jsonl", [
        {"document": "d.md", "text": "new", "questions": []},
        {"document": "d.md", "text": "new", "questions": [{"question": "Q?"}]},
    ])
    with pytest.raises(EvalInputError) as info:
        load_updates(path)
    assert f"{path}:1: 'questions' must be a non-empty list" in info.value.problems[0]
    assert info.value.problems[1].startswith(f"{path}:2: questions[0]: 'answers'")


def test_gold_documents_must_exist(tmp_path):
    qa = load_qa(_write(tmp_path / "qa.jsonl", [
        {"id": "a", "question": "Q?", "answers": ["x"], "documents": ["missing.md"]}]))
    with pytest.raises(EvalInputError, match=r"qa.jsonl:1: gold document 'missing.md' is not in --docs"):
        check_gold(qa, [], {"present.md"})
    check_gold(qa, [], {"missing.md"})  # no error


def test_shipped_example_is_consistent():
    docs = {p.name for p in (EXAMPLE / "docs").iterdir()}
    qa, updates = load_qa(EXAMPLE / "qa.jsonl"), load_updates(EXAMPLE / "updates.jsonl")
    check_gold(qa, updates, docs)
    assert sum(not q.answerable for q in qa) >= 5 and sum(q.answerable for q in qa) >= 20
    for q in qa:  # every accepted answer of an answerable question is in its gold document
        if q.answerable:
            text = " ".join(" ".join((EXAMPLE / "docs" / d).read_text().split()) for d in q.documents)
            assert any(a.lower() in text.lower() for a in q.answers), q.id
    for u in updates:  # the updated text carries the new fact and the old text does not
        old = " ".join((EXAMPLE / "docs" / u.document).read_text().split())
        new = " ".join(u.text.split())
        for q in u.questions:
            assert any(a in new for a in q.answers) and not any(a in old for a in q.answers), q.question


def test_the_command_reports_bad_inputs_before_starting_anything(tmp_path, capsys):
    """Missing gold documents and bad arms fail fast with exit 2 — no stack, no training."""
    from cluster.cli import main

    qa = _write(tmp_path / "qa.jsonl", [{"id": "a", "question": "Q?", "answers": ["x"], "documents": ["nope.md"]}])
    out = tmp_path / "out"
    assert main(["eval", "--docs", str(EXAMPLE / "docs"), "--qa", str(qa), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{qa}:1: gold document 'nope.md' is not in --docs" in err and "fares.md" in err
    assert main(["eval", "--docs", str(EXAMPLE / "docs"), "--qa", str(qa), "--arms", "base,raft",
                 "--out", str(out)]) == 2
    assert "--arms: unknown arm(s) ['raft']" in capsys.readouterr().err
    assert main(["eval", "--docs", str(EXAMPLE / "docs"), "--qa", str(qa), "--style-regex", "([",
                 "--out", str(out)]) == 2
    assert "--style-regex: not a valid regular expression" in capsys.readouterr().err
    assert not (out / "work").exists()
