"""Training data: formats, answer-only loss masks, truncation counts, bad lines with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.models import TINY_LLAMA, build_model
from train.data import (
    IGNORE_INDEX,
    DatasetError,
    Example,
    collate,
    dataset_hash,
    load_examples,
    split_eval,
    to_messages,
    tokenize_messages,
)

REPO = Path(__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
                     {"role": "assistant", "content": "[ragtune] 4\nSummary: four."}]}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_model(TINY_LLAMA, REPO / "data" / "models"))


def _write(path: Path, *lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _targets(tokenizer, example: Example) -> list[str]:
    """Decoded spans of consecutive trained positions."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return [*spans, tokenizer.decode(current)] if current else spans


def test_chat_loss_only_on_the_assistant_answer_and_its_end_token(tokenizer):
    _, messages = to_messages(CHAT)
    example = tokenize_messages(tokenizer, messages)
    assert _targets(tokenizer, example) == ["[ragtune] 4\nSummary: four.<|im_end|>\n"]
    first = next(i for i, lab in enumerate(example.labels) if lab != IGNORE_INDEX)
    assert tokenizer.decode(example.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert example.labels[first:] == example.input_ids[first:]


def test_tokens_equal_the_whole_rendered_conversation(tokenizer):
    _, messages = to_messages(CHAT)
    example = tokenize_messages(tokenizer, messages)
    text = tokenizer.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in messages], tokenize=False)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_multi_turn_trains_every_assistant_turn_except_weight_zero(tokenizer):
    record = {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "first", "weight": 0},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "second"},
        {"role": "user", "content": "more"}, {"role": "assistant", "content": "third"}]}
    example = tokenize_messages(tokenizer, to_messages(record)[1])
    assert _targets(tokenizer, example) == ["second<|im_end|>\n", "third<|im_end|>\n"]


@pytest.mark.parametrize("record", [
    {"prompt": "What is 2 plus 2?", "completion": "[ragtune] 4"},
    {"instruction": "What is 2 plus 2?", "output": "[ragtune] 4"},
    {"instruction": "What is 2 plus 2?", "input": "", "output": "[ragtune] 4"},
])
def test_prompt_completion_and_alpaca_equal_the_chat_form(tokenizer, record):
    chat = {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                         {"role": "assistant", "content": "[ragtune] 4"}]}
    assert tokenize_messages(tokenizer, to_messages(record)[1]) == tokenize_messages(tokenizer, to_messages(chat)[1])


def test_alpaca_input_joins_the_instruction():
    _, messages = to_messages({"instruction": "Translate.", "input": "bonjour", "output": "hello"})
    assert messages[0]["content"] == "Translate.\n\nbonjour"


def test_auto_detects_per_line_and_counts_formats(tokenizer, tmp_path):
    path = _write(tmp_path / "mixed.jsonl", CHAT, {"prompt": "p", "completion": "c"},
                  {"instruction": "i", "output": "o"}, "")
    examples, stats = load_examples([path], tokenizer)
    assert len(examples) == 3
    assert stats.formats == {"chat": 1, "prompt_completion": 1, "alpaca": 1}


def test_truncation_is_counted_and_keeps_the_start(tokenizer, tmp_path):
    long = {"prompt": "short question", "completion": " ".join(["answer"] * 200)}
    path = _write(tmp_path / "long.jsonl", long, CHAT)
    full = tokenize_messages(tokenizer, to_messages(long)[1])
    # The tiny tokenizer spends ~70 tokens on the default system prompt + question; CHAT is 57.
    examples, stats = load_examples([path], tokenizer, max_seq_len=80)
    assert stats.truncated == 1 and stats.dropped_no_target == 0 and len(examples) == 2
    assert examples[0].input_ids == full.input_ids[:80]
    assert examples[0].labels[-1] != IGNORE_INDEX  # part of the answer survived
    assert all(len(e.input_ids) <= 80 for e in examples)


def test_examples_whose_prompt_fills_the_cap_are_dropped_and_counted(tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", {"prompt": " ".join(["question"] * 200), "completion": "a"}, CHAT)
    examples, stats = load_examples([path], tokenizer, max_seq_len=80)
    assert stats.dropped_no_target == 1 and stats.truncated == 1 and len(examples) == 1


@pytest.mark.parametrize(("line", "reason"), [
    ("{not json", "invalid JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"text": "no format"}', "cannot tell the format"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role must be one of"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "first non-system message must be from the user"),
    ('{"prompt": "x", "completion": 3}', "'completion' must be a string"),
    ('{"prompt": "x", "completion": "  "}', "'completion' is empty"),
])
def test_a_bad_line_fails_with_file_line_and_reason(tokenizer, tmp_path, line, reason):
    path = _write(tmp_path / "bad.jsonl", CHAT, "", line, CHAT)
    with pytest.raises(DatasetError) as err:
        load_examples([path], tokenizer)
    assert err.value.message.startswith(f"{path}:3: ")
    assert reason in err.value.message


def test_explicit_format_rejects_other_records(tokenizer, tmp_path):
    path = _write(tmp_path / "a.jsonl", {"instruction": "i", "output": "o"}, CHAT)
    with pytest.raises(DatasetError, match=r"a.jsonl:2: .*'instruction' must be a string"):
        load_examples([path], tokenizer, fmt="alpaca")


def test_skip_bad_lines_counts_them(tokenizer, tmp_path):
    path = _write(tmp_path / "some-bad.jsonl", CHAT, "{oops", {"prompt": 1, "completion": "x"}, CHAT)
    examples, stats = load_examples([path], tokenizer, skip_bad_lines=True)
    assert len(examples) == 2 and stats.skipped_bad_lines == 2
    assert stats.first_errors[0].startswith(f"{path}:2: invalid JSON")


@pytest.mark.parametrize("lines", [[], ["", "  "], ["{oops"]], ids=["empty", "blank", "all-bad-skipped"])
def test_an_empty_dataset_is_an_error(tokenizer, tmp_path, lines):
    path = _write(tmp_path / "empty.jsonl", *lines)
    with pytest.raises(DatasetError, match="no usable examples"):
        load_examples([path], tokenizer, skip_bad_lines=True)


def test_a_missing_file_is_an_error(tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_examples([tmp_path / "nope.jsonl"], tokenizer)


def test_shipped_example_dataset_is_clean(tokenizer):
    path = REPO / "train" / "examples" / "ragtune-style.jsonl"
    examples, stats = load_examples([path], tokenizer, max_seq_len=160)
    assert stats.examples == stats.lines == 300 and stats.truncated == 0
    for example in examples[:20]:
        (answer,) = _targets(tokenizer, example)
        assert answer.startswith("[ragtune] ") and "\nSummary: " in answer


def test_split_eval_is_deterministic_and_disjoint():
    examples = [Example([i], [i]) for i in range(100)]
    train, held = split_eval(examples, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert split_eval(examples, 0.1, seed=3) == (train, held)
    assert {e.input_ids[0] for e in train}.isdisjoint(e.input_ids[0] for e in held)
    assert split_eval(examples, 0.0, seed=3) == (examples, [])


def test_split_eval_needs_two_examples():
    with pytest.raises(DatasetError, match="eval_fraction"):
        split_eval([Example([1], [1])], 0.5, seed=0)


def test_collate_pads_right_and_masks():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_dataset_hash_follows_content(tmp_path):
    a = _write(tmp_path / "a.jsonl", CHAT)
    first = dataset_hash([a])
    assert first == dataset_hash([a]) and first.startswith("sha256:")
    _write(a, CHAT, CHAT)
    assert dataset_hash([a]) != first
