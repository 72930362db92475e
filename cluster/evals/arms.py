"""The arms, asked through the served OpenAI API with the official SDK, one timed stream each.

An arm is a model (the base model or an adapter) with or without ``rag``. Every request streams,
so the time to the first content token and to the end come from the same request as the answer;
``sources`` (the chunks the model saw, numbered as in its prompt) ride on the first chunk.
Requests run ``concurrency`` at a time and the arm's wall time gives its measured throughput.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import openai
from tqdm.auto import tqdm

from cluster.evals.inputs import Question

__all__ = ["ARM_NAMES", "Answer", "Arm", "ArmRun", "Asker", "Judge"]

logger = logging.getLogger(__name__)
ARM_NAMES = ("base", "rag", "ft", "ft+rag")


@dataclass(frozen=True)
class Arm:
    name: str
    model: str
    rag: bool


@dataclass
class Answer:
    arm: str
    question_id: str
    reply: str = ""
    sources: list[dict] = field(default_factory=list)
    rag: dict | None = None  # the server's {chunks_retrieved, chunks_used, chunks_dropped}
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    phase: str = "qa"  # "qa" or "fresh" (asked after the updates were applied)
    judge: float | None = None  # the optional LLM judge's verdict (1 correct, 0 not, None ungraded)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ArmRun:
    arm: Arm
    answers: list[Answer]
    wall_s: float


class Asker:
    """Asks one arm's questions through ``client`` (an ``openai.AsyncOpenAI``)."""

    def __init__(self, client: openai.AsyncOpenAI, *, collection: str, top_k: int = 4, mode: str = "hybrid",
                 max_tokens: int = 96, concurrency: int = 4, system: str | None = None,
                 progress: bool = True):
        self.client, self.collection, self.top_k, self.mode = client, collection, top_k, mode
        self.max_tokens, self.concurrency, self.system, self.progress = max_tokens, concurrency, system, progress

    def _messages(self, question: Question) -> list[dict]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return [*messages, {"role": "user", "content": question.question}]

    async def ask(self, arm: Arm, question: Question, phase: str = "qa") -> Answer:
        answer = Answer(arm.name, question.id, phase=phase)
        extra = {"rag": {"collection": self.collection, "top_k": self.top_k, "mode": self.mode}} if arm.rag else None
        parts: list[str] = []
        start = time.perf_counter()
        try:
            stream = await self.client.chat.completions.create(
                model=arm.model, messages=self._messages(question), stream=True, temperature=0,
                max_tokens=self.max_tokens, stream_options={"include_usage": True}, extra_body=extra)
            async for chunk in stream:
                extra_fields = chunk.model_extra or {}
                if "sources" in extra_fields:
                    answer.sources = list(extra_fields["sources"] or [])
                if extra_fields.get("rag"):
                    answer.rag = dict(extra_fields["rag"])
                if chunk.usage is not None:
                    answer.prompt_tokens = chunk.usage.prompt_tokens
                    answer.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        if answer.ttft_ms is None:
                            answer.ttft_ms = (time.perf_counter() - start) * 1000
                        parts.append(choice.delta.content)
            answer.e2e_ms = (time.perf_counter() - start) * 1000
        except openai.APIError as exc:
            status = getattr(exc, "status_code", None)
            answer.error = f"{status or type(exc).__name__}: {getattr(exc, 'message', exc)}"
            logger.warning("arm %s question %s failed: %s", arm.name, question.id, answer.error)
        answer.reply = "".join(parts)
        return answer

    async def run(self, arm: Arm, questions: Sequence[Question], phase: str = "qa") -> ArmRun:
        """All ``questions`` on ``arm``, ``concurrency`` at a time, in input order."""
        gate = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(questions), desc=f"{arm.name} ({phase})", unit="q", disable=not self.progress)

        async def one(question: Question) -> Answer:
            async with gate:
                result = await self.ask(arm, question, phase)
            bar.update(1)
            return result

        start = time.perf_counter()
        try:
            answers = await asyncio.gather(*(one(q) for q in questions))
        finally:
            bar.close()
        return ArmRun(arm, list(answers), time.perf_counter() - start)


_JUDGE_PROMPT = """You grade answers. Question: {question}
Accepted answers: {answers}
Reply to grade: {reply}
Does the reply state one of the accepted answers? Answer with one word: yes or no."""


class Judge:
    """An optional LLM judge on any OpenAI-compatible endpoint: a column next to the deterministic
    scores, never instead of them. Its verdict is 1.0 (yes), 0.0 (no) or None (neither word)."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, concurrency: int = 4):
        self.client, self.model, self.gate = client, model, asyncio.Semaphore(concurrency)

    async def grade(self, question: Question, reply: str) -> float | None:
        prompt = _JUDGE_PROMPT.format(question=question.question, answers="; ".join(question.answers), reply=reply)
        async with self.gate:
            try:
                out = await self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=3)
            except openai.APIError as exc:
                logger.warning("judge failed on question %s: %s", question.id, exc)
                return None
        words = (out.choices[0].message.content or "").strip().lower().split()
        first = words[0].strip(".,!:;\"'") if words else ""
        return 1.0 if first == "yes" else 0.0 if first == "no" else None

    async def grade_all(self, answers: Sequence[Answer], questions) -> dict[tuple[str, str, str], float | None]:
        """Verdicts keyed by (arm, question id, phase) for answers with accepted answers."""
        todo = [a for a in answers if a.error is None and questions[a.question_id].answers]
        verdicts = await asyncio.gather(*(self.grade(questions[a.question_id], a.reply) for a in todo))
        return {(a.arm, a.question_id, a.phase): v for a, v in zip(todo, verdicts, strict=True)}
