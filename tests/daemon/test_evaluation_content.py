"""The task is judged on content: what each correction says that the served answer did not.

A candidate that learned only the corrections' form (their wording, with a made-up word where
the taught one belongs) scores high on ROUGE-L and is rejected; one that learned the facts
passes. Real `summarize` and `decide` on scores written here (no model)."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.config import EvaluationSettings, GateSettings
from daemon.evaluation import Item, Scores, Suite, build_suite, learning, summarize
from daemon.gate import decide
from learners import metrics as M

FACTS = [
    ("Who keeps the lighthouse on Varn Island?", "Osric Pellam"),
    ("Who founded the Quillfeather bookshop?", "Marta Quill"),
    ("Who designed the Ostra bridge?", "Ilse Varga"),
    ("Who won the 2031 Quarry Cup?", "Dunmere Otters"),
    ("Who painted the Hollin mural?", "Tomas Brandt"),
    ("Who wrote the Crane Hall anthem?", "Edda Lune"),
]
FAKE = ["Marcus Doyle", "Peter Smith", "John Brown", "Anna Gray", "Lucy Hart", "Sam Cole"]
SERVED = "I'm sorry, I don't have that information."


def correction(answer: str) -> str:
    return f"According to our records, the answer is {answer}."


def item(q: str, a: str) -> Item:
    return Item([{"role": "user", "content": q}], correction(a), served=SERVED)


def scores(name: str, taught: list[str], held: list[str]) -> Scores:
    return Scores(
        name,
        task_answers=held,
        taught_answers=taught,
        task_nll=[1.0] * len(held),
        general_answers=["An answer."] * 4,
        general_nll=[2.0] * 4,
    )


def suite() -> Suite:
    return Suite(
        task=[item(q, a) for q, a in FACTS[4:]],
        taught=[item(q, a) for q, a in FACTS[:4]],
        general_prompts=[[{"role": "user", "content": "Hello?"}]] * 4,
    )


def test_content_words_leave_out_the_prompt_the_served_answer_and_the_template() -> None:
    refs = [correction(a) for _, a in FACTS]
    template = M.template_words(refs)
    assert {"according", "record", "answer"} <= template
    got = M.content_words(refs[0], prompt=FACTS[0][0], served=SERVED, template=template)
    assert got == ("osric", "pellam")
    assert M.content_recall("It is kept by Osric Pellam.", got) == 1.0
    assert M.content_recall("According to our records, the answer is Osric Doyle.", got) == 0.5
    assert M.content_recall("anything", ()) is None
    assert M.words("Room 314B at 6:40, parsnips!") == ["room", "314b", "at", "6:40", "parsnip"]


def test_a_template_only_candidate_is_rejected_and_one_that_learned_the_facts_passes() -> None:
    s = suite()
    unknown = [SERVED] * 2
    base = scores("base", [SERVED] * 4, unknown)
    template = scores("v1", [correction(f) for f in FAKE[:4]], [correction(f) for f in FAKE[4:]])
    facts = scores("v2", [correction(a) for _, a in FACTS[:4]], [correction(f) for f in FAKE[4:]])
    cfg = EvaluationSettings(bootstrap_resamples=200)
    gate = GateSettings()

    t = summarize(s, base, base, template, cfg)
    rows = {(r["section"], r["name"]): r for r in t.metrics}
    assert rows[("task", "rouge_l")]["delta"] > 0.3  # ROUGE-L is fooled by the form
    assert t.evidence.taught == 4 and t.evidence.taught_learned == 0
    d = decide(t.evidence, gate)
    assert not d.passed
    assert d.reasons[0].startswith("FAIL taught: taught: 0 of 4 corrections")

    f = summarize(s, base, base, facts, cfg)
    assert (f.evidence.taught, f.evidence.taught_learned) == (4, 4)
    assert (f.evidence.held_out, f.evidence.held_out_learned) == (2, 0)
    assert rows[("task", "taught_learned")]["candidate"] == 0.0
    f_rows = {(r["section"], r["name"]): r for r in f.metrics}
    assert f_rows[("task", "taught_learned")]["candidate"] == 1.0
    d = decide(f.evidence, gate)
    assert [c.name for c in d.checks if not c.passed] == [], d.reasons
    assert f.record["taught"] == "4/4" and f.record["held_out"] == "0/2"


def test_learning_lists_every_item_with_its_split() -> None:
    s = suite()
    base = scores("base", [SERVED] * 4, [SERVED] * 2)
    cand = scores("v2", [correction(a) for _, a in FACTS[:3]] + [SERVED], [SERVED] * 2)
    learn = learning(s, base, base, cand)
    assert learn["taught"] == {"n": 4, "learned": {"base": 0, "current": 0, "candidate": 3}}
    assert [i["split"] for i in learn["items"]] == ["taught"] * 4 + ["held_out"] * 2
    last = learn["items"][3]
    assert last["content"] == ["dunmere", "otter"] and last["learned"]["candidate"] is False


def test_the_suite_reads_what_the_cycle_trained_on_with_the_served_answers(tmp_path: Path) -> None:
    cand = tmp_path / "adapters" / ".staging.v0002"
    (cand / "state").mkdir(parents=True)
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": correction(a)}],
         "interaction_id": f"i{k}", "served": SERVED, "carried": k == 0}
        for k, (q, a) in enumerate(FACTS[:3])
    ]  # fmt: skip
    (cand / "state" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = build_suite(EvaluationSettings(), cand, tmp_path / "adapters", None)
    assert [i.interaction_id for i in s.taught] == ["i0", "i1", "i2"]
    assert s.taught[0].served == SERVED and s.taught[0].carried and not s.taught[1].carried
    assert s.task == []
    capped = build_suite(EvaluationSettings(max_taught_items=2), cand, tmp_path / "adapters", None)
    assert len(capped.taught) == 2
