"""ShareGPT and tool-call conversations, format detection errors, and sequence packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.models import TINY_LLAMA, build_model
from tests.unit.test_train_data import _targets, _write  # the same file writer and label decoder
from train.data import (
    IGNORE_INDEX,
    DatasetError,
    Example,
    collate,
    collate_packed,
    load_examples,
    pack_examples,
    to_messages,
    to_tools,
    tokenize_messages,
)

REPO = Path(__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
                     {"role": "assistant", "content": "4"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2 plus 2?"},
                              {"from": "gpt", "value": "4"}]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18C and sunny"},
    {"role": "assistant", "content": "It is 18C and sunny in Paris."}]}
# A Hermes/Qwen-style template (simplified) that renders tools and tool calls: the packaged tiny
# model's template does not, which is what the error test below relies on.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for c in m.tool_calls %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def model_path():
    return build_model(TINY_LLAMA, REPO / "data" / "models")


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def tool_tokenizer(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.chat_template = TOOL_TEMPLATE
    return tok


# ---- ShareGPT ------------------------------------------------------------------------------
def test_sharegpt_tokenizes_exactly_like_the_chat_form(tokenizer):
    kind, messages = to_messages(SHAREGPT)
    assert kind == "sharegpt"
    assert tokenize_messages(tokenizer, messages) == tokenize_messages(tokenizer, to_messages(CHAT)[1])


def test_sharegpt_top_level_system_and_turn_weights(tokenizer):
    record = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "first", "weight": 0},
        {"from": "human", "value": "again"}, {"from": "gpt", "value": "second"}]}
    _, messages = to_messages(record)
    assert messages[0] == {"role": "system", "content": "Be brief.", "weight": 0}
    assert _targets(tokenizer, tokenize_messages(tokenizer, messages)) == ["second<|im_end|>\n"]


@pytest.mark.parametrize(("line", "reason"), [
    ({"conversations": [{"from": "robot", "value": "x"}]}, "from='robot' is not one of"),
    ({"conversations": [{"speaker": "human", "text": "x"}]}, "needs 'from' and 'value' (got ['speaker', 'text'])"),
    ({"conversations": []}, "'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant message"),
    ({"question": "q", "answer": "a", "id": 3}, "cannot tell the format from keys ['answer', 'id', 'question']"),
])
def test_bad_or_unknown_records_name_file_line_and_what_was_seen(tokenizer, tmp_path, line, reason):
    path = _write(tmp_path / "bad.jsonl", SHAREGPT, line)
    with pytest.raises(DatasetError) as err:
        load_examples([path], tokenizer)
    assert err.value.message.startswith(f"{path}:2: ") and reason in err.value.message


def test_explicit_sharegpt_format_names_the_keys_it_saw(tokenizer, tmp_path):
    path = _write(tmp_path / "c.jsonl", CHAT)
    with pytest.raises(DatasetError, match=r"c.jsonl:1: format sharegpt needs a 'conversations' list "
                                           r"\(keys seen: \['messages'\]\)"):
        load_examples([path], tokenizer, fmt="sharegpt")


def test_auto_detection_counts_sharegpt(tokenizer, tmp_path):
    _, stats = load_examples([_write(tmp_path / "m.jsonl", CHAT, SHAREGPT, SHAREGPT)], tokenizer)
    assert stats.formats == {"chat": 1, "sharegpt": 2}


# ---- tool calls ----------------------------------------------------------------------------
def test_tool_call_conversation_trains_the_call_and_the_answer_not_the_result(tool_tokenizer):
    _, messages = to_messages(TOOL_CHAT)
    example = tokenize_messages(tool_tokenizer, messages, to_tools(TOOL_CHAT))
    targets = _targets(tool_tokenizer, example)
    assert len(targets) == 2
    assert '"name": "get_weather"' in targets[0] and '"city": "Paris"' in targets[0]
    assert targets[0].endswith("</tool_call><|im_end|>")  # (this template trims the newline after it)
    assert targets[1] == "It is 18C and sunny in Paris.<|im_end|>"
    text = tool_tokenizer.decode(example.input_ids)
    assert "18C and sunny\n</tool_response>" in text and '"description": "Weather in a city"' in text
    # The tool result is context, never a target.
    assert not any("tool_response" in t for t in targets)
    rendered = tool_tokenizer.apply_chat_template(
        [{k: v for k, v in m.items() if k != "weight"} for m in messages], tools=[WEATHER], tokenize=False)
    assert example.input_ids == tool_tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_sharegpt_function_call_and_observation_equal_the_openai_form(tool_tokenizer):
    record = {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18C and sunny"},
        {"from": "gpt", "value": "It is 18C and sunny in Paris."}]}
    ours = tokenize_messages(tool_tokenizer, to_messages(record)[1], to_tools(record))
    openai = tokenize_messages(tool_tokenizer, to_messages(TOOL_CHAT)[1], to_tools(TOOL_CHAT))
    assert ours == openai


def test_a_template_without_tool_support_is_an_error_not_silent_data_loss(tokenizer, tmp_path):
    path = _write(tmp_path / "tools.jsonl", TOOL_CHAT)
    with pytest.raises(DatasetError, match=r"tools.jsonl:1: .*does not render tool calls \('get_weather'"):
        load_examples([path], tokenizer)


@pytest.mark.parametrize(("calls", "reason"), [
    ([{"function": {"arguments": "{}"}}], "needs function.name"),
    ([{"function": {"name": "f", "arguments": "{oops"}}], "arguments is not JSON"),
    ([{"function": {"name": "f", "arguments": [1]}}], "arguments must be an object"),
    ([], "tool_calls must be a non-empty list"),
])
def test_bad_tool_calls_say_what_is_wrong(calls, reason):
    record = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": calls}]}
    with pytest.raises(ValueError, match=reason):
        to_messages(record)


# ---- packing -------------------------------------------------------------------------------
def _examples(lengths: list[int]) -> list[Example]:
    return [Example(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1))) for n in lengths]


def test_packs_fill_rows_without_splitting_or_losing_examples():
    examples = _examples([70, 50, 40, 30, 30, 20, 10, 90])
    packs = pack_examples(examples, 100, seed=0)
    assert all(sum(len(e.input_ids) for e in p) <= 100 for p in packs)
    assert sorted(len(e.input_ids) for p in packs for e in p) == sorted(len(e.input_ids) for e in examples)
    assert len(packs) == 4  # 340 tokens: ceil(3.4) rows
    assert pack_examples(examples, 100, seed=0) == packs  # deterministic


def test_an_example_longer_than_a_pack_names_the_field():
    with pytest.raises(DatasetError, match="data.pack_length: 1 examples are longer than 64 tokens") as err:
        pack_examples(_examples([10, 80]), 64, seed=0)
    assert err.value.param == "data.pack_length"


def test_packed_rows_restart_positions_and_mask_the_first_label_of_each_example():
    a, b, c = _examples([4, 3, 2])
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert "attention_mask" not in batch  # boundaries come from position ids
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 1, 2, 3], [1, 2, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, 4, -100, 2, 3], [-100, 2] + [-100] * 5]


def test_packed_rows_compute_what_separate_examples_compute(model_path, tokenizer):
    """No token attends across examples: logits and loss equal the unpacked batch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model.config.use_cache = False  # as the recipe does: a KV cache disables the packed-mask path
    examples = [tokenize_messages(tokenizer, to_messages(r)[1]) for r in (CHAT, {"prompt": "Name a colour.",
                                                                                  "completion": "Blue."})]
    packed = collate_packed([examples], pad_id=0)
    with torch.no_grad():
        out = model(**packed)
        separate = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
        padded_loss = model(**collate(examples, pad_id=0)).loss
    n = len(examples[0].input_ids)
    torch.testing.assert_close(out.logits[0, :n], separate[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits[0, n:], separate[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, padded_loss, atol=1e-5, rtol=1e-5)
