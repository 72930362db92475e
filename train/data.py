"""Training data: JSONL records → chat messages → token ids with loss only on the answers.

Formats (``data.format``; ``auto`` picks per line from the keys):

* ``chat`` — OpenAI fine-tuning style ``{"messages": [{"role", "content", "weight"?}, ...]}``;
  every assistant message is trained unless it carries ``"weight": 0``. Tool-call conversations
  are chat records too: assistant messages with ``tool_calls`` (``{"function": {"name",
  "arguments"}}``), ``role: "tool"`` results (never trained) and an optional top-level ``tools``
  list, all handed to the chat template (``apply_chat_template(..., tools=...)``).
* ``sharegpt`` — ``{"conversations": [{"from", "value"}, ...], "system"?, "tools"?}`` with
  ``from`` in human/gpt/system (and LLaMA-Factory's function_call/observation for tool turns).
* ``prompt_completion`` — ``{"prompt": str, "completion": str}`` → one user + one assistant turn.
* ``alpaca`` — ``{"instruction", "input"?, "output"}`` → user = instruction (+ blank line + input).

Every record is rendered with the base model's chat template, so training sees exactly the
prompt layout serving will use. Labels are ``-100`` except on assistant content and its
end-of-turn token (the model must learn to stop). A bad line raises :class:`DatasetError` with
``file:line`` and the reason, or is skipped and counted with ``skip_bad_lines``.

Packing (:func:`pack_examples`, :func:`collate_packed`) concatenates examples into rows with
transformers' ``DataCollatorWithFlattening``: position ids restart at 0 for every example and
no attention mask is passed, so the model builds a block-diagonal causal mask from the position
ids (``masking_utils.find_packed_sequence_indices``) and no token attends across examples.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import InvalidRequestError

__all__ = [
    "IGNORE_INDEX",
    "DataStats",
    "DatasetError",
    "Example",
    "collate",
    "collate_packed",
    "dataset_hash",
    "load_examples",
    "pack_examples",
    "split_eval",
    "to_messages",
    "to_tools",
    "tokenize_messages",
]

IGNORE_INDEX = -100  # torch cross-entropy's ignore_index: no loss on these positions
_ROLES = {"system", "user", "assistant", "tool"}
# ShareGPT speaker names (FastChat, axolotl, LLaMA-Factory) → chat roles.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "system": "system", "function_call": "assistant",
                   "observation": "tool", "tool": "tool", "function": "tool"}


class DatasetError(InvalidRequestError):
    """A dataset problem: the message starts with ``file:line`` when one line is at fault."""


@dataclass
class Example:
    """One tokenised example; ``labels`` is ``input_ids`` with non-target positions at -100."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    """What loading did; logged and written into the adapter manifest."""

    files: list[str] = field(default_factory=list)
    lines: int = 0
    examples: int = 0
    skipped_bad_lines: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return asdict(self)


# ---- records → messages --------------------------------------------------------------------
def _detect(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise ValueError(f"cannot tell the format from keys {sorted(record)[:8]}; expected messages, "
                     "conversations, prompt+completion or instruction+output")


def _text(record: dict, key: str, *, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string (got {type(value).__name__})")
    if not allow_empty and not value.strip():
        raise ValueError(f"{key!r} is empty")
    return value


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """OpenAI ``tool_calls`` → the shape chat templates read (``arguments`` as a dict)."""
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{where}: tool_calls must be a non-empty list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}: tool_calls[{j}] needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise ValueError(f"{where}: tool_calls[{j}].function.arguments is not JSON") from None
        if not isinstance(args, dict):
            raise ValueError(f"{where}: tool_calls[{j}].function.arguments must be an object")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _chat_message(i: int, msg: Any) -> dict:
    if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
        raise ValueError(f"messages[{i}]: role must be one of {sorted(_ROLES)}")
    weight = msg.get("weight", 1)
    if weight not in (0, 1):
        raise ValueError(f"messages[{i}]: weight must be 0 or 1")
    if msg["role"] == "assistant" and msg.get("tool_calls") is not None:
        content = _text(msg, "content", allow_empty=True) if msg.get("content") is not None else ""
        return {"role": "assistant", "content": content, "weight": weight,
                "tool_calls": _tool_calls(msg["tool_calls"], f"messages[{i}]")}
    out = {"role": msg["role"], "content": _text(msg, "content"), "weight": weight if msg["role"] == "assistant" else 0}
    for key in ("tool_call_id", "name"):
        if msg["role"] == "tool" and isinstance(msg.get(key), str):
            out[key] = msg[key]
    return out


def _check_conversation(out: list[dict]) -> list[dict]:
    first = next((m["role"] for m in out if m["role"] != "system"), None)
    if first != "user":
        raise ValueError("the first non-system message must be from the user")
    if not any(m["role"] == "assistant" and m["weight"] for m in out):
        raise ValueError("no assistant message to train on")
    return out


def _chat_messages(record: dict) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    return _check_conversation([_chat_message(i, msg) for i, msg in enumerate(messages)])


def _sharegpt_turn(i: int, turn: Any) -> dict:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        keys = sorted(turn)[:8] if isinstance(turn, dict) else type(turn).__name__
        raise ValueError(f"conversations[{i}]: a turn needs 'from' and 'value' (got {keys})")
    role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise ValueError(f"conversations[{i}]: from={turn['from']!r} is not one of {sorted(_SHAREGPT_ROLES)}")
    msg: dict[str, Any] = {"role": role, "weight": turn.get("weight", 1)}
    if str(turn["from"]).lower() == "function_call":  # LLaMA-Factory: value is the JSON call(s)
        try:
            calls = json.loads(_text(turn, "value"))
        except json.JSONDecodeError:
            raise ValueError(f"conversations[{i}]: a function_call value must be JSON") from None
        msg["tool_calls"] = calls if isinstance(calls, list) else [calls]
    else:
        msg["content"] = turn["value"]
    return _chat_message(i, msg)


def _sharegpt_messages(record: dict) -> list[dict]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    out = [_sharegpt_turn(i, turn) for i, turn in enumerate(turns)]
    if isinstance(record.get("system"), str) and record["system"].strip() and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": record["system"], "weight": 0})
    return _check_conversation(out)


def to_tools(record: Any) -> list[dict] | None:
    """The record's ``tools`` (OpenAI function schemas; a JSON string is parsed), or ``None``."""
    tools = record.get("tools") if isinstance(record, dict) else None
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise ValueError("'tools' is a string but not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("'tools' must be a list of function schemas")
    return tools or None


def to_messages(record: Any, fmt: str = "auto") -> tuple[str, list[dict]]:
    """Convert one JSON record to ``(format, messages)``; raises ``ValueError(reason)``."""
    if not isinstance(record, dict):
        raise ValueError(f"a line must be a JSON object (got {type(record).__name__})")
    kind = _detect(record) if fmt == "auto" else fmt
    if kind == "chat":
        if "messages" not in record:
            raise ValueError(f"format chat needs a 'messages' list (keys seen: {sorted(record)[:8]})")
        return kind, _chat_messages(record)
    if kind == "sharegpt":
        if "conversations" not in record:
            raise ValueError(f"format sharegpt needs a 'conversations' list (keys seen: {sorted(record)[:8]})")
        return kind, _sharegpt_messages(record)
    if kind == "prompt_completion":
        user, answer = _text(record, "prompt"), _text(record, "completion")
    elif kind == "alpaca":
        user = _text(record, "instruction")
        extra = _text(record, "input", allow_empty=True) if "input" in record else ""
        user = f"{user}\n\n{extra}" if extra.strip() else user
        answer = _text(record, "output")
    else:
        raise ValueError(f"unknown format {kind!r}")
    return kind, [{"role": "user", "content": user, "weight": 0},
                  {"role": "assistant", "content": answer, "weight": 1}]


# ---- messages → tokens ---------------------------------------------------------------------
def _render(tokenizer, messages: list[dict], generation_prompt: bool = False, tools: list | None = None) -> str:
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    return tokenizer.apply_chat_template(plain, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def _check_tool_calls_rendered(msg: dict, text: str) -> None:
    """A template without tool-call support drops ``tool_calls`` silently: training would learn silence."""
    missing = [c["function"]["name"] for c in msg.get("tool_calls", ()) if c["function"]["name"] not in text]
    if missing:
        raise ValueError(f"the base model's chat template does not render tool calls ({missing[0]!r} is missing "
                         "from the rendered turn); use a base model whose template supports tools")


def _segments(tokenizer, messages: list[dict], tools: list | None = None) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, trained)`` pieces whose concatenation is the rendered conversation.

    Rendering prefixes of the conversation isolates each message's text exactly as the template
    lays it out; an assistant turn splits into its header (not trained) and the rest (trained).
    """
    done = ""
    for i, msg in enumerate(messages):
        full = _render(tokenizer, messages[: i + 1], tools=tools)
        if msg["role"] == "assistant" and i > 0:
            header = _render(tokenizer, messages[:i], generation_prompt=True, tools=tools)
            if not (header.startswith(done) and full.startswith(header)):
                raise ValueError("the chat template is not prefix-stable, so answers cannot be masked")
            _check_tool_calls_rendered(msg, full[len(header):])
            yield header[len(done):], False
            yield full[len(header):], bool(msg["weight"])
        else:
            if not full.startswith(done):
                raise ValueError("the chat template is not prefix-stable, so answers cannot be masked")
            yield full[len(done):], False
        done = full


def tokenize_messages(tokenizer, messages: list[dict], tools: list | None = None) -> Example:
    """Tokenise a conversation; labels are -100 except on trained assistant turns."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in _segments(tokenizer, messages, tools):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    return Example(ids, labels)


def _cap(example: Example, max_len: int, stats: DataStats) -> Example | None:
    if len(example.input_ids) > max_len:
        stats.truncated += 1
        example = Example(example.input_ids[:max_len], example.labels[:max_len])
    if all(label == IGNORE_INDEX for label in example.labels):
        stats.dropped_no_target += 1  # the prompt alone filled the cap: nothing left to learn
        return None
    return example


# ---- files ---------------------------------------------------------------------------------
def _records(path: Path, stats: DataStats) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            stats.lines += 1
            if not line.strip():
                continue  # blank lines are layout, not data
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, exc


def _bad(where: str, reason: str, skip: bool, stats: DataStats) -> None:
    if not skip:
        raise DatasetError(f"{where}: {reason}", param="data.paths")
    stats.skipped_bad_lines += 1
    if len(stats.first_errors) < 5:
        stats.first_errors.append(f"{where}: {reason}")


def load_examples(paths: Sequence[str | Path], tokenizer, *, fmt: str = "auto", max_seq_len: int = 512,
                  skip_bad_lines: bool = False) -> tuple[list[Example], DataStats]:
    """Read, validate and tokenise JSONL files.

    Raises:
        DatasetError: a file is missing, a line is bad (``file:line: reason``, unless
            ``skip_bad_lines``), or no usable example remains.
    """
    stats = DataStats(files=[str(p) for p in paths])
    examples: list[Example] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DatasetError(f"{path}: dataset file does not exist", param="data.paths")
        for lineno, record in _records(path, stats):
            where = f"{path}:{lineno}"
            if isinstance(record, json.JSONDecodeError):
                _bad(where, f"invalid JSON ({record.msg} at column {record.colno})", skip_bad_lines, stats)
                continue
            try:
                kind, messages = to_messages(record, fmt)
                example = tokenize_messages(tokenizer, messages, to_tools(record))
            except ValueError as exc:
                _bad(where, str(exc), skip_bad_lines, stats)
                continue
            stats.formats[kind] = stats.formats.get(kind, 0) + 1
            example = _cap(example, max_seq_len, stats)
            if example is not None:
                examples.append(example)
                stats.tokens += len(example.input_ids)
                stats.target_tokens += sum(label != IGNORE_INDEX for label in example.labels)
    stats.examples = len(examples)
    if not examples:
        raise DatasetError(f"{', '.join(stats.files)}: no usable examples ({stats.skipped_bad_lines} bad lines "
                           f"skipped, {stats.dropped_no_target} left nothing to train after truncation)",
                           param="data.paths")
    return examples, stats


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (at least one, and never all) for eval."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    if n_eval < 1:
        raise DatasetError("data.eval_fraction: one example cannot be split into train and eval",
                           param="data.eval_fraction")
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def dataset_hash(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the files' bytes (in order): identifies the data in the adapter manifest."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def collate(batch: Sequence[Example], pad_id: int):
    """Right-pad a batch to its longest example → ``input_ids``, ``attention_mask``, ``labels``."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- packing -------------------------------------------------------------------------------
def pack_examples(examples: Sequence[Example], pack_length: int, seed: int) -> list[list[Example]]:
    """Group examples into packs of at most ``pack_length`` tokens (first-fit decreasing).

    Hand-written because the library packers (TRL's ``pack_dataset``) need TRL + ``datasets``
    for ~15 lines of bin packing; the per-row layout itself comes from transformers' collator.
    The order within the packs list is shuffled with ``seed`` so lengths do not sort the epoch.
    """
    too_long = [len(e.input_ids) for e in examples if len(e.input_ids) > pack_length]
    if too_long:
        raise DatasetError(f"data.pack_length: {len(too_long)} examples are longer than {pack_length} tokens "
                           f"(longest {max(too_long)}); raise data.pack_length", param="data.pack_length")
    packs: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            packs.append([example])
            room.append(pack_length - n)
        else:
            packs[slot].append(example)
            room[slot] -= n
    random.Random(seed).shuffle(packs)
    return packs


def collate_packed(packs: Sequence[Sequence[Example]], pad_id: int):
    """One row per pack → ``input_ids``, ``position_ids``, ``labels`` (no attention mask).

    Each row comes from ``DataCollatorWithFlattening`` (position ids 0..n-1 per example, the
    first label of every example set to -100 so no example predicts the next one's first token);
    rows are right-padded with ``pad_id``, label -100 and position ids 0.. (a padding "example").
    """
    import torch
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    rows = [flatten([{"input_ids": e.input_ids, "labels": e.labels} for e in pack], return_tensors="pt")
            for pack in packs]
    width = max(row["input_ids"].shape[1] for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for i, row in enumerate(rows):
        n = row["input_ids"].shape[1]
        ids[i, :n], labels[i, :n], positions[i, :n] = row["input_ids"][0], row["labels"][0], row["position_ids"][0]
        positions[i, n:] -= n
    return {"input_ids": ids, "position_ids": positions, "labels": labels}
