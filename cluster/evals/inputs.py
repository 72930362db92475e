"""The eval's input files, validated before anything runs.

``QA.jsonl``: ``{"id", "question", "answers": [...], "documents": [gold ids], "kind"?}`` — gold ids
are document ids as ``ragtune ingest`` names them (a file's path relative to ``--docs``); an empty
list means the question cannot be answered from the documents (the right reply is a refusal).
``UPDATES.jsonl``: ``{"document", "text", "questions": [{"question", "answers"}]}`` — knowledge that
changes after training, applied to the store only.

Every problem is collected (file:line and reason) and raised together, so one run shows them all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import InvalidRequestError

__all__ = ["EvalInputError", "Question", "Update", "check_gold", "load_qa", "load_updates"]


class EvalInputError(InvalidRequestError):
    """One or more input lines are unusable; ``problems`` lists each as ``file:line: reason``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        super().__init__(f"{len(problems)} problem(s) in the eval inputs:\n  {shown}")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]
    documents: tuple[str, ...] = ()
    kind: str | None = None
    update: str | None = None  # the updated document this question is about (freshness items)
    where: str = ""

    @property
    def answerable(self) -> bool:
        return bool(self.documents)


@dataclass(frozen=True)
class Update:
    document: str
    text: str
    questions: tuple[Question, ...] = field(default_factory=tuple)
    where: str = ""


def _lines(path: Path, problems: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror or exc}")
        return
    for lineno, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(f"{where}: not UTF-8")
            continue
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        yield where, obj


def _string(obj: dict, key: str, where: str, problems: list[str], *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: {key!r} must be a non-empty string")
        return None
    return value


def _strings(obj: dict, key: str, where: str, problems: list[str], *, allow_empty: bool) -> tuple[str, ...] | None:
    value = obj.get(key, [] if allow_empty else None)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        problems.append(f"{where}: {key!r} must be a list of non-empty strings")
        return None
    if not value and not allow_empty:
        problems.append(f"{where}: {key!r} needs at least one accepted answer")
        return None
    return tuple(value)


_QA_KEYS = {"id", "question", "answers", "documents", "kind"}


def load_qa(path: str | Path) -> list[Question]:
    """Questions from ``QA.jsonl``; raises EvalInputError listing every bad line."""
    path, problems, out, seen = Path(path), [], [], {}
    for where, obj in _lines(path, problems):
        unknown = sorted(set(obj) - _QA_KEYS)
        if unknown:
            problems.append(f"{where}: unknown key(s) {unknown} (expected {sorted(_QA_KEYS)})")
            continue
        qid = obj.get("id")
        qid = str(qid) if isinstance(qid, (str, int)) and str(qid).strip() else None
        if qid is None:
            problems.append(f"{where}: 'id' must be a non-empty string or integer")
        elif qid in seen:
            problems.append(f"{where}: duplicate id {qid!r} (first at {seen[qid]})")
            qid = None
        question = _string(obj, "question", where, problems)
        kind = obj.get("kind")
        if kind is not None and not isinstance(kind, str):
            problems.append(f"{where}: 'kind' must be a string")
        documents = _strings(obj, "documents", where, problems, allow_empty=True)
        # Unanswerable questions (no gold document) may omit answers: the right reply is a refusal.
        answers = _strings(obj, "answers", where, problems, allow_empty=not documents)
        if None in (qid, question, answers, documents) or (kind is not None and not isinstance(kind, str)):
            continue
        seen[qid] = where
        out.append(Question(qid, question, answers, documents, kind, where=where))
    if not out and not problems:
        problems.append(f"{path}: no questions")
    if problems:
        raise EvalInputError(problems)
    return out


def load_updates(path: str | Path) -> list[Update]:
    """Updates from ``UPDATES.jsonl``; raises EvalInputError listing every bad line."""
    path, problems, out = Path(path), [], []
    for where, obj in _lines(path, problems):
        document = _string(obj, "document", where, problems)
        text = _string(obj, "text", where, problems)
        items = obj.get("questions")
        if not isinstance(items, list) or not items:
            problems.append(f"{where}: 'questions' must be a non-empty list of {{question, answers}}")
            continue
        questions = []
        for i, item in enumerate(items):
            at = f"{where}: questions[{i}]"
            if not isinstance(item, dict):
                problems.append(f"{at}: expected an object")
                continue
            question = _string(item, "question", at, problems)
            answers = _strings(item, "answers", at, problems, allow_empty=False)
            if question and answers and document:
                questions.append(Question(f"update:{document}:{i}", question, answers, (document,), "update",
                                          update=document, where=at))
        if document and text and len(questions) == len(items):
            out.append(Update(document, text, tuple(questions), where))
    if problems:
        raise EvalInputError(problems)
    return out


def check_gold(questions: list[Question], updates: list[Update], doc_ids: set[str]) -> None:
    """Every gold or updated document id must be one of the ingested documents."""
    problems = [f"{q.where}: gold document {d!r} is not in --docs" for q in questions for d in q.documents
                if d not in doc_ids]
    problems += [f"{u.where}: document {u.document!r} is not in --docs" for u in updates if u.document not in doc_ids]
    if problems:
        raise EvalInputError(problems + [f"(documents in --docs: {', '.join(sorted(doc_ids)[:10])}"
                                         + (", …)" if len(doc_ids) > 10 else ")")])
