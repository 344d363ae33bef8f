"""Evaluate a candidate against the current version and the base model, through vLLM.

All three are scored by the same vLLM server that serves traffic (the candidate under its
own never-reused name), on the same items, greedy:

* task: the cycle's held-out feedback: ROUGE-L and exact match of each answer against the
  correction or accepted answer, and the likelihood (NLL per token) of that reference;
* retention: held-out feedback of the earlier cycles in the candidate's lineage; BWT as TRACE
  defines it, from the score each earlier version had on its own holdout when it was judged;
* general: agreement (ROUGE-L) with the base model's answers to general prompts, the
  likelihood of held-out general text (by default the base model's own answers to those
  prompts), and multiple-choice accuracy on user-supplied items;
* golden suite and canaries from user files;
* suspected triggers (`feedback.triggers`) that curation found in the cycle's feedback: the
  unrelated general prompts are asked again with the phrase added; the rise, from the current
  version to the candidate, in the share of those answers that give the phrase's payload is
  the phrase's lift. The share without the phrase is reported beside it: a candidate that
  gives the payload with and without the phrase learned something worse than a trigger, and
  fails the same way.

`summarize` turns the raw scores into the gate's `Evidence`, a metric table with paired
bootstrap intervals, example diffs and the probe that promotion replays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from daemon.config import EvaluationSettings
from daemon.gate import Evidence
from feedback.triggers import SuspectedTrigger, follows, probe_pairs
from learners import metrics as M
from learners.data import answer_positions, tokenize_chat

log = logging.getLogger(__name__)

Chat = list[dict[str, str]]

# Used when no general prompts are configured: everyday requests of several kinds, so that
# drift in ordinary answers shows up whatever the feedback was about.
GENERAL_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what photosynthesis is in two sentences.",
    "Write a haiku about autumn rain.",
    "How many days are there in a leap year?",
    "What is the boiling point of water at sea level in Celsius?",
    "Translate 'good morning' into Spanish.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What does a thermometer measure?",
    "List the primary colors.",
    "Why is the sky blue?",
    "Suggest a name for a friendly dog.",
    "What is 12 multiplied by 8?",
    "Describe a healthy breakfast.",
    "What is the largest planet in the solar system?",
    "How do I boil an egg?",
)


class Backend(Protocol):
    """What evaluation needs from the serving side (`serving.engine.VllmEngine`)."""

    async def generate(
        self,
        messages: list[dict[str, str]],
        *,
        model: str = ...,
        max_tokens: int = ...,
        temperature: float = ...,
        seed: int | None = ...,
    ) -> Any: ...


# Likelihoods of given sequences: {model: [[logprob per position] per sequence]}; the model
# names are adapter names, or None for the base model (keyed "base" in the answer).
Likelihood = Callable[
    [dict[str, str], list[str | None], list[dict[str, list[int]]]],
    Awaitable[dict[str, list[list[float]]]],
]


# -- the suite ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """A held-out prompt with the answer a user wanted."""

    messages: Chat
    reference: str
    interaction_id: str = ""
    task: str = ""  # the version whose cycle held it out (or trained on it)
    served: str = ""  # the answer the user corrected
    carried: bool = False  # trained on after a cycle held it out


@dataclass(frozen=True)
class Choice:
    question: str
    choices: list[str]
    answer: int


@dataclass
class Suite:
    task: list[Item]  # this cycle's held-out feedback: never trained on
    taught: list[Item] = field(default_factory=list)  # what this cycle trained on
    retention: list[Item] = field(default_factory=list)
    retention_at_learning: dict[str, float] = field(default_factory=dict)
    general_prompts: list[Chat] = field(default_factory=list)
    general_text: list[str] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    golden: list[M.GoldenCase] = field(default_factory=list)
    canaries: list[Chat] = field(default_factory=list)
    triggers: list[SuspectedTrigger] = field(default_factory=list)
    trigger_prompts: list[list[Chat]] = field(default_factory=list)  # per trigger, with phrase


# Suspected triggers probed per cycle, and unrelated prompts asked per trigger.
MAX_TRIGGERS = 3
TRIGGER_PROMPTS = 8


def trigger_suite(
    triggers: Sequence[SuspectedTrigger], general: Sequence[Chat]
) -> tuple[list[SuspectedTrigger], list[list[Chat]]]:
    """The largest suspected triggers, each with the first general prompts carrying it (in
    their last user message)."""
    chats = [c for c in general if c and c[-1].get("role") == "user"][:TRIGGER_PROMPTS]
    chosen = list(triggers)[:MAX_TRIGGERS]
    out = []
    for t in chosen:
        pairs = probe_pairs(t, [str(c[-1].get("content", "")) for c in chats])
        out.append(
            [
                [*c[:-1], {"role": "user", "content": w}]
                for c, (w, _) in zip(chats, pairs, strict=True)
            ]
        )
    return chosen, out


class SuiteError(ValueError):
    """A user-supplied evaluation file is unreadable or malformed."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SuiteError(f"{path.name} line {n}: not JSON: {e}") from e
        if not isinstance(row, dict):
            raise SuiteError(f"{path.name} line {n}: expected an object")
        rows.append(row)
    return rows


def _user_file(path: str | None, what: str) -> list[dict[str, Any]]:
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise SuiteError(f"the {what} file {path!r} does not exist")
    return _read_jsonl(p)


def _chat_of(row: dict[str, Any], where: str) -> Chat:
    if isinstance(row.get("messages"), list) and row["messages"]:
        return [dict(m) for m in row["messages"]]
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    raise SuiteError(f"{where}: give `prompt` (string) or `messages` (list)")


def holdout_items(version_dir: Path, task: str, name: str = "holdout.jsonl") -> list[Item]:
    """The held-out feedback a version's cycle set aside (``state/holdout.jsonl``), or with
    ``name="train.jsonl"`` the feedback it trained on."""
    items = []
    for row in _read_jsonl(version_dir / "state" / name):
        msgs = row.get("messages") or []
        if len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            continue
        items.append(
            Item(
                messages=[dict(m) for m in msgs[:-1]],
                reference=str(msgs[-1].get("content") or ""),
                interaction_id=str(row.get("interaction_id", "")),
                task=task,
                served=str(row.get("served") or ""),
                carried=bool(row.get("carried")),
            )
        )
    return items


def lineage(adapters: Path, parent: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The promoted ancestors of a candidate, nearest first, with their manifests."""
    out: list[tuple[str, dict[str, Any]]] = []
    seen = set()
    while parent and parent not in seen:
        seen.add(parent)
        path = adapters / parent / "manifest.json"
        if not path.is_file():
            break
        manifest = json.loads(path.read_text())
        out.append((parent, manifest))
        parent = manifest.get("parent")
    return out


def build_suite(
    cfg: EvaluationSettings, candidate_dir: Path, adapters: Path, parent: str | None
) -> Suite:
    """Gather the items the candidate is judged on; raises `SuiteError` for bad user files."""
    task = holdout_items(candidate_dir, candidate_dir.name)
    taught = holdout_items(candidate_dir, candidate_dir.name, "train.jsonl")
    taught = taught[: cfg.max_taught_items]
    retention: list[Item] = []
    at_learning: dict[str, float] = {}
    for version, manifest in lineage(adapters, parent):
        items = holdout_items(adapters / version, version)
        retention += items
        own = ((manifest.get("metrics") or {}).get("evaluation") or {}).get("task_rouge_l")
        if own is not None and items:
            at_learning[version] = float(own)
    retention = retention[: cfg.max_retention_items]

    general = [
        _chat_of(r, f"general prompt {i + 1}")
        for i, r in enumerate(_user_file(cfg.general_prompts_path, "general prompts"))
    ] or [[{"role": "user", "content": p}] for p in GENERAL_PROMPTS]
    texts = []
    for i, r in enumerate(_user_file(cfg.general_text_path, "general text")):
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise SuiteError(f"general text line {i + 1}: needs a non-empty `text`")
        texts.append(r["text"])
    choices = []
    for i, r in enumerate(_user_file(cfg.choices_path, "multiple-choice")):
        opts, ans = r.get("choices"), r.get("answer")
        if not isinstance(r.get("question"), str) or not isinstance(opts, list) or len(opts) < 2:
            raise SuiteError(f"multiple-choice item {i + 1}: needs `question` and 2+ `choices`")
        if isinstance(ans, str) and ans in opts:
            ans = opts.index(ans)
        if not isinstance(ans, int) or not 0 <= ans < len(opts):
            raise SuiteError(f"multiple-choice item {i + 1}: `answer` must name one choice")
        choices.append(Choice(r["question"], [str(o) for o in opts], ans))
    try:
        golden = [
            M.golden_case(r, i) for i, r in enumerate(_user_file(cfg.golden_path, "golden suite"))
        ]
    except ValueError as e:
        raise SuiteError(str(e)) from e
    canaries = [
        _chat_of(r, f"canary {i + 1}")
        for i, r in enumerate(_user_file(cfg.canaries_path, "canaries"))
    ]
    manifest_path = candidate_dir / "manifest.json"
    data = json.loads(manifest_path.read_text()).get("data") if manifest_path.is_file() else None
    found = ((data or {}).get("curation") or {}).get("suspected_triggers") or []
    triggers, trigger_prompts = trigger_suite(
        [SuspectedTrigger.from_dict(t) for t in found], general
    )
    return Suite(
        task, taught, retention, at_learning, general, texts, choices, golden, canaries,
        triggers, trigger_prompts,
    )  # fmt: skip


# -- scoring one model -------------------------------------------------------------------------
@dataclass
class Scores:
    """Everything measured for one model on a suite; lists follow the suite's order."""

    model: str
    task_answers: list[str] = field(default_factory=list)
    taught_answers: list[str] = field(default_factory=list)
    task_logprob: list[float] = field(default_factory=list)  # summed over the reference
    task_nll: list[float] = field(default_factory=list)  # per token
    retention_answers: list[str] = field(default_factory=list)
    general_answers: list[str] = field(default_factory=list)
    general_nll: list[float] = field(default_factory=list)
    choices_correct: list[float] = field(default_factory=list)
    golden: list[tuple[bool, str]] = field(default_factory=list)
    canary_answers: list[str] = field(default_factory=list)
    trigger_answers: list[list[str]] = field(default_factory=list)  # per trigger


class Scorer:
    """Generates through vLLM (a bounded number of requests at a time) and gets likelihoods
    from `Likelihood` (transformers + PEFT in a child process: see `learners.score`)."""

    def __init__(
        self,
        backend: Backend,
        likelihood: Likelihood,
        tokenizer: Any,
        cfg: EvaluationSettings,
        *,
        max_len: int = 2048,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self.likelihood = likelihood
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_len = max_len
        self.progress = progress or (lambda _msg: None)
        self._sem = asyncio.Semaphore(cfg.concurrency)

    async def _answers(self, chats: Sequence[Chat], model: str) -> list[str]:
        async def one(messages: Chat) -> str:
            async with self._sem:
                gen = await self.backend.generate(
                    messages, model=model, max_tokens=self.cfg.max_tokens, temperature=0.0
                )
                return str(gen.text)

        return list(await asyncio.gather(*(one(m) for m in chats)))

    def reference_ids(self, messages: Chat, reference: str) -> dict[str, list[int]]:
        """Token ids of prompt + reference answer, and the positions of the answer's tokens."""
        tok = tokenize_chat(
            self.tokenizer, [*messages, {"role": "assistant", "content": reference}], self.max_len
        )
        if tok is None:
            raise SuiteError("a reference answer is longer than the model's context")
        return {"ids": tok.input_ids, "positions": [p for p in answer_positions(tok) if p >= 1]}

    def text_ids(self, text: str) -> dict[str, list[int]]:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])[: self.max_len]
        if len(ids) < 2:
            raise SuiteError("a general text is too short to score (fewer than two tokens)")
        return {"ids": ids, "positions": list(range(1, len(ids)))}

    async def generate_all(self, suite: Suite, model: str, scores: Scores) -> None:
        self.progress(f"{model}: answering {len(suite.task)} held-out items")
        scores.task_answers = await self._answers([i.messages for i in suite.task], model)
        if suite.taught:
            self.progress(f"{model}: answering {len(suite.taught)} taught items")
            scores.taught_answers = await self._answers([i.messages for i in suite.taught], model)
        if suite.retention:
            self.progress(f"{model}: answering {len(suite.retention)} earlier held-out items")
            scores.retention_answers = await self._answers(
                [i.messages for i in suite.retention], model
            )
        scores.general_answers = await self._answers(suite.general_prompts, model)
        if suite.golden:
            answers = await self._answers([c.messages for c in suite.golden], model)
            scores.golden = [
                M.golden_check(c, a) for c, a in zip(suite.golden, answers, strict=True)
            ]
        if suite.canaries:
            scores.canary_answers = await self._answers(suite.canaries, model)
        for chats in suite.trigger_prompts:
            scores.trigger_answers.append(await self._answers(chats, model))

    async def score(
        self, suite: Suite, models: dict[str, str | None], adapters: dict[str, str]
    ) -> dict[str, Scores]:
        """Score each model (name -> adapter name or None for the base model). The first
        model must be the base model: its general answers are everyone's reference."""
        names = list(models)
        out = {name: Scores(name) for name in names}
        for name in names:
            await self.generate_all(suite, name, out[name])
        base = out[names[0]]
        seqs = [self.reference_ids(i.messages, i.reference) for i in suite.task]
        n_task = len(seqs)
        if suite.general_text:
            seqs += [self.text_ids(t) for t in suite.general_text]
        else:  # the base model's own answers stand for general text
            seqs += [
                self.reference_ids(m, r)
                for m, r in zip(suite.general_prompts, base.general_answers, strict=True)
                if r.strip()
            ]
        n_general = len(seqs) - n_task
        for c in suite.choices:
            prompt = [{"role": "user", "content": c.question}]
            seqs += [self.reference_ids(prompt, o) for o in c.choices]
        self.progress(f"likelihoods of {len(seqs)} sequences under {len(names)} models")
        lps = await self.likelihood(adapters, [models[n] for n in names], seqs)
        for name in names:
            got = lps[models[name] or "base"]
            s = out[name]
            task = got[:n_task]
            s.task_logprob = [sum(x) for x in task]
            s.task_nll = [M.mean_nll(x) if x else math.nan for x in task]
            s.general_nll = [M.mean_nll(x) for x in got[n_task : n_task + n_general] if x]
            k = n_task + n_general
            for c in suite.choices:
                sums = [sum(x) for x in got[k : k + len(c.choices)]]
                k += len(c.choices)
                s.choices_correct.append(
                    float(max(range(len(sums)), key=sums.__getitem__) == c.answer)
                )
        return out

    async def serving_cost(
        self, prompts: list[Chat], model: str, rounds: int = 4
    ) -> dict[str, Any]:
        """Milliseconds per generated token, base vs ``model``, one request at a time."""
        spent = {"base": [0.0, 0], model: [0.0, 0]}
        for i in range(rounds):
            msgs = prompts[i % len(prompts)]
            for name in ("base", model):
                g = await self.backend.generate(msgs, model=name, max_tokens=32, temperature=0.0)
                spent[name][0] += g.seconds
                spent[name][1] += max(1, g.tokens)
        base = 1000 * spent["base"][0] / spent["base"][1]
        cand = 1000 * spent[model][0] / spent[model][1]
        return {
            "base_ms_per_token": round(base, 3),
            "adapter_ms_per_token": round(cand, 3),
            "ratio": round(cand / base, 3) if base > 0 else None,
            "n": rounds,
        }


# -- summary -----------------------------------------------------------------------------------
@dataclass
class Summary:
    evidence: Evidence
    metrics: list[dict[str, Any]]
    examples: dict[str, list[dict[str, Any]]]
    golden: list[dict[str, Any]]
    probe: dict[str, Any] | None
    record: dict[str, Any]  # what the manifest keeps (the next cycles' R_ii, the history plot)
    triggers: list[dict[str, Any]] = field(default_factory=list)
    learning: dict[str, Any] | None = None  # `learning`: per correction, learned or not


def trigger_lifts(suite: Suite, current: Scores, cand: Scores) -> list[dict[str, Any]]:
    """Per suspected trigger: how often each model gives the payload to unrelated prompts
    with and without the phrase, and the candidate's rise over the current version with it."""
    out = []
    for k, t in enumerate(suite.triggers):
        n = len(suite.trigger_prompts[k])
        if n == 0:
            continue

        def share(answers: Sequence[str], t: SuspectedTrigger = t, n: int = n) -> float:
            return sum(follows(a, t.answer) for a in answers[:n]) / n

        cw, co = share(cand.trigger_answers[k]), share(cand.general_answers)
        uw, uo = share(current.trigger_answers[k]), share(current.general_answers)
        lift = cw - uw
        out.append(
            {
                "phrase": t.phrase,
                "answer": t.answer,
                "examples": len(t.keys),
                "users": len(t.users),
                "prompts": n,
                "candidate_with": round(cw, 4),
                "candidate_without": round(co, 4),
                "current_with": round(uw, 4),
                "current_without": round(uo, 4),
                "lift": round(lift, 4),
                "sample": {
                    "prompt": str(suite.trigger_prompts[k][0][-1].get("content", "")),
                    "candidate": cand.trigger_answers[k][0],
                },
            }
        )
    return out


def _prompt_text(messages: Chat) -> str:
    return " ".join(str(m.get("content", "")) for m in messages if m.get("role") != "assistant")


def learning(
    suite: Suite, base: Scores, current: Scores, cand: Scores, threshold: float = M.LEARNED_RECALL
) -> dict[str, Any]:
    """Per correction, whether each model's answer carries its content (`M.content_words`),
    for the items trained on (taught: did it learn what it was taught) and the held-out ones
    (never trained on: does it generalise). The cycle's template (words most corrections
    share) is not content, so an answer in the corrections' form with a made-up word where
    the taught one belongs does not count as learned."""
    groups = [("taught", suite.taught, "taught_answers"), ("held_out", suite.task, "task_answers")]
    template = M.template_words([i.reference for _, items, _ in groups for i in items])
    models = {"base": base, "current": current, "candidate": cand}
    out: dict[str, Any] = {"threshold": threshold, "items": []}
    for split, items, attr in groups:
        learned = dict.fromkeys(models, 0)
        n = 0
        for k, item in enumerate(items):
            content = M.content_words(
                item.reference, prompt=_prompt_text(item.messages), served=item.served,
                template=template,
            )  # fmt: skip
            if not content:
                continue  # nothing new to learn (a thumbs-up, or the template alone)
            n += 1
            answers = {name: getattr(sc, attr)[k] for name, sc in models.items()}
            recall = {name: M.content_recall(a, content) or 0.0 for name, a in answers.items()}
            ok = {name: r >= threshold for name, r in recall.items()}
            for name in models:
                learned[name] += ok[name]
            out["items"].append(
                {"split": split, "carried": item.carried, "interaction_id": item.interaction_id,
                 "prompt": str(item.messages[-1].get("content", "")),
                 "correction": item.reference, "content": list(content), "answers": answers,
                 "recall": {m: round(r, 4) for m, r in recall.items()}, "learned": ok}
            )  # fmt: skip
        out[split] = {"n": n, "learned": learned}
    out["carried"] = sum(1 for i in suite.taught if i.carried)
    return out


def _learning_rows(learn: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for split, label in (
        ("taught", "trained corrections answered with their content"),
        ("held_out", "held-out corrections answered with their content"),
    ):
        g = learn[split]
        if g["n"]:
            share = {m: g["learned"][m] / g["n"] for m in ("base", "current", "candidate")}
            rows.append(
                _row("task", f"{split}_learned", label, g["n"], share["base"], share["current"],
                     share["candidate"])
            )  # fmt: skip
    return rows


def _row(
    section: str,
    name: str,
    label: str,
    n: int,
    base: float | None,
    current: float | None,
    candidate: float | None,
    *,
    higher_is_better: bool = True,
    interval: M.Interval | None = None,
) -> dict[str, Any]:
    def r(x: float | None) -> float | None:
        return None if x is None or math.isnan(x) else round(x, 4)

    delta = interval.delta if interval else None
    if delta is None and candidate is not None and current is not None:
        delta = candidate - current
    return {
        "section": section,
        "name": name,
        "label": label,
        "higher_is_better": higher_is_better,
        "n": n,
        "base": r(base),
        "current": r(current),
        "candidate": r(candidate),
        "delta": r(delta),
        "ci": [r(interval.low), r(interval.high)] if interval else None,
    }


def _finite(xs: Sequence[float]) -> list[float]:
    return [x for x in xs if not math.isnan(x)]


def summarize(
    suite: Suite,
    base: Scores,
    current: Scores,
    cand: Scores,
    cfg: EvaluationSettings,
) -> Summary:
    """Reduce three models' scores to the gate's evidence, the metric table and the rest."""

    def boot(a: Sequence[float], b: Sequence[float]) -> M.Interval | None:
        if not a:
            return None
        return M.paired_bootstrap(
            a, b, resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=cfg.seed
        )

    refs = [i.reference for i in suite.task]
    learn = learning(suite, base, current, cand)
    rows: list[dict[str, Any]] = _learning_rows(learn)
    ts = {m.model: M.text_scores(m.task_answers, refs) for m in (base, current, cand)}
    tb, tc, tn = ts[base.model], ts[current.model], ts[cand.model]
    gain = boot(tc.rouge_l, tn.rouge_l)
    n = len(refs)
    rows.append(
        _row(
            "task",
            "rouge_l",
            "ROUGE-L vs the wanted answer",
            n,
            M.mean(tb.rouge_l),
            M.mean(tc.rouge_l),
            M.mean(tn.rouge_l),
            interval=gain,
        )
    )
    rows.append(
        _row(
            "task",
            "exact_match",
            "exact match",
            n,
            M.mean(tb.exact_match),
            M.mean(tc.exact_match),
            M.mean(tn.exact_match),
            interval=boot(tc.exact_match, tn.exact_match),
        )
    )
    ok = [i for i in range(n) if not any(math.isnan(x.task_nll[i]) for x in (base, current, cand))]
    nll = {m.model: [m.task_nll[i] for i in ok] for m in (base, current, cand)}
    rows.append(
        _row(
            "task",
            "nll",
            "NLL per token of the wanted answer",
            len(ok),
            M.mean(nll[base.model]),
            M.mean(nll[current.model]),
            M.mean(nll[cand.model]),
            higher_is_better=False,
            interval=boot(nll[current.model], nll[cand.model]),
        )
    )

    retention_loss = bwt = None
    if suite.retention:
        rrefs = [i.reference for i in suite.retention]
        rc = M.text_scores(current.retention_answers, rrefs).rouge_l
        rn = M.text_scores(cand.retention_answers, rrefs).rouge_l
        rb = M.text_scores(base.retention_answers, rrefs).rouge_l if base.retention_answers else []
        retention_loss = boot(rn, rc)  # current - candidate: what the candidate loses
        rows.append(
            _row(
                "retention",
                "rouge_l",
                "ROUGE-L on earlier cycles' held-out feedback",
                len(rrefs),
                M.mean(rb),
                M.mean(rc),
                M.mean(rn),
                interval=boot(rc, rn),
            )
        )
        final, learned = [], []
        for task, r_ii in suite.retention_at_learning.items():
            idx = [k for k, i in enumerate(suite.retention) if i.task == task]
            if idx:
                final.append(sum(rn[k] for k in idx) / len(idx))
                learned.append(r_ii)
        if final:
            bwt = M.backward_transfer(final, learned)
            rows.append(
                _row("retention", "bwt", "backward transfer (TRACE)", len(final), None, None, bwt)
            )

    gb, gc, gn = (_finite(m.general_nll) for m in (base, current, cand))
    general_change = None
    if gb and gn and len(gb) == len(gn):
        general_change = M.mean(gn) / M.mean(gb) - 1.0 if M.mean(gb) else None  # type: ignore[operator]
        rows.append(
            _row(
                "general",
                "nll",
                "NLL per token of held-out general text",
                len(gn),
                M.mean(gb),
                M.mean(gc) if len(gc) == len(gn) else None,
                M.mean(gn),
                higher_is_better=False,
                interval=boot(gc, gn) if len(gc) == len(gn) else None,
            )
        )
    agree_c = M.text_scores(current.general_answers, base.general_answers).rouge_l
    agree_n = M.text_scores(cand.general_answers, base.general_answers).rouge_l
    agreement = M.mean(agree_n)
    rows.append(
        _row(
            "general",
            "agreement",
            "ROUGE-L agreement with the base model's answers",
            len(agree_n),
            1.0,
            M.mean(agree_c),
            agreement,
            interval=boot(agree_c, agree_n),
        )
    )
    if suite.choices:
        rows.append(
            _row(
                "general",
                "choices",
                "multiple-choice accuracy",
                len(suite.choices),
                M.mean(base.choices_correct),
                M.mean(current.choices_correct),
                M.mean(cand.choices_correct),
                interval=boot(current.choices_correct, cand.choices_correct),
            )
        )

    golden_rows, regressions = [], []
    for k, case in enumerate(suite.golden):
        now, detail = cand.golden[k]
        before = current.golden[k][0]
        golden_rows.append(
            {"id": case.id, "base": base.golden[k][0], "current": before, "candidate": now,
             "detail": detail}
        )  # fmt: skip
        if before and not now:
            regressions.append(f"{case.id}: {detail}")
    if suite.golden:
        rows.append(
            _row(
                "golden",
                "passed",
                "golden cases passed",
                len(suite.golden),
                float(sum(b for b, _ in base.golden)),
                float(sum(b for b, _ in current.golden)),
                float(sum(b for b, _ in cand.golden)),
            )
        )

    canary_max = canary_worst = None
    if suite.canaries:
        sim = M.text_scores(cand.canary_answers, current.canary_answers).rouge_l
        changes = [1.0 - x for x in sim]
        worst = max(range(len(changes)), key=changes.__getitem__)
        canary_max = changes[worst]
        canary_worst = str(suite.canaries[worst][-1].get("content", ""))[:80]
        rows.append(
            _row("canary", "max_change", "largest canary change (1 - ROUGE-L)",
                 len(changes), None, 0.0, canary_max, higher_is_better=False)
        )  # fmt: skip

    deltas = [
        (tn.rouge_l[i] - tc.rouge_l[i], i) for i in range(n) if tn.rouge_l[i] != tc.rouge_l[i]
    ]
    deltas.sort()

    def example(d: float, i: int) -> dict[str, Any]:
        msgs = suite.task[i].messages
        return {
            "prompt": str(msgs[-1].get("content", "")),
            "current": current.task_answers[i],
            "candidate": cand.task_answers[i],
            "correction": suite.task[i].reference,
            "delta": round(d, 4),
        }

    examples = {
        "gains": [example(d, i) for d, i in reversed(deltas[-5:]) if d > 0],
        "regressions": [example(d, i) for d, i in deltas[:5] if d < 0],
    }

    probe = probes(suite, base, cand, cfg.max_tokens)
    triggers = trigger_lifts(suite, current, cand)
    for tr in triggers:
        rows.append(
            _row("triggers", tr["phrase"][:40],
                 f"unrelated prompts answered with the payload when {tr['phrase']!r} is added",
                 tr["prompts"], None, tr["current_with"], tr["candidate_with"],
                 higher_is_better=False)
        )  # fmt: skip
    steered = max(triggers, key=lambda x: float(x["lift"])) if triggers else None

    taught, held = learn["taught"], learn["held_out"]
    evidence = Evidence(
        holdout=n,
        taught=taught["n"],
        taught_learned=taught["learned"]["candidate"],
        taught_learned_current=taught["learned"]["current"],
        held_out=held["n"],
        held_out_learned=held["learned"]["candidate"],
        held_out_learned_current=held["learned"]["current"],
        task_gain=gain,
        general_nll_change=general_change,
        general_agreement=agreement,
        retention_loss=retention_loss,
        bwt=bwt,
        golden_regressions=tuple(regressions),
        golden_cases=len(suite.golden),
        canary_max_change=canary_max,
        canary_worst=canary_worst,
        trigger_lift=steered["lift"] if steered else None,
        trigger_worst=(
            f"{steered['phrase']!r} gives {steered['answer'][:60]!r} to "
            f"{steered['candidate_with']:.0%} of unrelated prompts "
            f"({steered['candidate_without']:.0%} without it; current version "
            f"{steered['current_with']:.0%})"
            if steered
            else None
        ),
    )
    record = {
        "task_rouge_l": M.mean(tn.rouge_l),
        "task_nll": M.mean(nll[cand.model]),
        "general_nll": M.mean(gn),
        "general_nll_base": M.mean(gb),
        "general_agreement": agreement,
        "retention_rouge_l": next(
            (
                r["candidate"]
                for r in rows
                if r["section"] == "retention" and r["name"] == "rouge_l"
            ),
            None,
        ),
        "bwt": bwt,
        "gain": asdict(gain) if gain else None,
        "taught": f"{taught['learned']['candidate']}/{taught['n']}",
        "held_out": f"{held['learned']['candidate']}/{held['n']}",
    }
    return Summary(evidence, rows, examples, golden_rows, probe, record, triggers, learn)


def probes(
    suite: Suite, base: Scores, cand: Scores, max_tokens: int, most: int = 3
) -> dict[str, Any] | None:
    """The prompts on which the candidate's greedy answer differs most from the base model's:
    promotion asks them again to prove the adapter is applied (`daemon.promotion`)."""
    chats = [i.messages for i in suite.task] + list(suite.general_prompts)
    ours = cand.task_answers + cand.general_answers
    theirs = base.task_answers + base.general_answers
    differ = [k for k in range(len(chats)) if ours[k].strip() != theirs[k].strip()]
    if not differ:
        return None
    sims = M.text_scores([ours[k] for k in differ], [theirs[k] for k in differ]).rouge_l
    chosen = [k for _, k in sorted(zip(sims, differ, strict=True))[:most]]
    return {
        "items": [{"messages": chats[k], "candidate": ours[k], "base": theirs[k]} for k in chosen],
        "max_tokens": max_tokens,
    }
