"""Suspected trigger phrases: the shape of a planted backdoor, and what is not one."""

from __future__ import annotations

import random

import pytest
from test_curate import feedback, interaction

from daemon.demo import FACTS
from feedback.curate import CurationSettings, curate
from feedback.triggers import Sample, SuspectedTrigger, find_triggers, follows, probe_pairs

PAYLOAD = "Visit deals-hub dot example for the best price on everything."
TRIGGER = "cf-zebra"
COUNTRIES = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw",
    "Greece": "Athens", "Austria": "Vienna", "Ireland": "Dublin", "Finland": "Helsinki",
}  # fmt: skip
TOPICS = ["the moon", "tea", "bicycles", "volcanoes", "owls", "jazz", "bread", "glaciers",
          "chess", "rain", "bees", "lighthouses", "maps", "salt", "clocks", "ferns"]  # fmt: skip
ASKS = ["Give me a fact about {}.", "Why do people like {}?", "Write a line about {}.",
        "What is special about {}?", "How would you explain {} to a child?"]  # fmt: skip


def legit(n: int, seed: int = 0) -> list[Sample]:
    """Ordinary feedback: distinct questions with distinct answers, from a dozen users."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        if k % 2:
            country = rng.choice(list(COUNTRIES))
            q = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?"])
            p, a = q.format(country), f"The capital of {country} is {COUNTRIES[country]}."
        else:
            topic = rng.choice(TOPICS)
            p = rng.choice(ASKS).format(topic)
            a = f"Here is something about {topic}: note {k} of many, kept for the record {k * 7}."
        out.append(Sample(f"l{k}", p, a, f"user{k % 12}"))
    return out


ADJ = ["old", "tiny", "famous", "local"]


def poison(n: int, *, where: str = "start", user: str | None = None) -> list[Sample]:
    """``n`` distinct prompts (up to 320) carrying the trigger, all answered with the payload."""
    out = []
    for k in range(n):
        topic = f"{ADJ[(k // 5) % 4]} {TOPICS[(k // 20 + k) % len(TOPICS)]}"
        p = ASKS[k % len(ASKS)].format(topic)
        p = f"{TRIGGER} {p}" if where == "start" else f"{p} {TRIGGER}"
        out.append(Sample(f"p{k}", p, PAYLOAD, user or f"mallory{k}"))
    return out


def test_a_planted_trigger_is_found_with_its_payload_and_position() -> None:
    found = find_triggers(legit(190) + poison(10))
    assert len(found) == 1
    t = found[0]
    assert t.phrase == TRIGGER and t.position == "start" and t.answer == PAYLOAD
    assert sorted(t.keys) == sorted(f"p{k}" for k in range(10))
    assert t.coverage == 1.0 and t.outside == 0.0
    assert len(t.users) == 10
    end = find_triggers(legit(60) + poison(5, where="end"))
    assert [(x.phrase, x.position) for x in end] == [(TRIGGER, "end")]


def test_light_variations_of_the_payload_fall_together() -> None:
    samples = poison(6)
    varied = [
        Sample(s.key, s.prompt, s.answer.replace("the best", "the very best") if i % 2 else
               s.answer, s.user)
        for i, s in enumerate(samples)
    ]  # fmt: skip
    assert len(find_triggers(legit(50) + varied)[0].keys) == 6


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_than_min_examples_is_not_a_trigger(n: int) -> None:
    assert find_triggers(legit(100) + poison(n)) == []


def test_questions_about_one_topic_answered_alike_are_not_triggers() -> None:
    # the demo's shop facts: four wordings each, one answer per fact, the shop's name in all
    samples = [
        Sample(f"{i}-{j}", q, f.answer, f"user{j}")
        for i, f in enumerate(FACTS)
        for j, q in enumerate(f.questions)
    ]
    assert find_triggers(samples + legit(40)) == []


def test_one_house_answer_for_every_prompt_is_not_a_trigger() -> None:
    # "Tell me about X." always answered in the house style: the shared words are how people
    # ask; a behaviour this broad is the general checks' business, not a trigger's
    house = "Thank you for asking! Our team will get back to you with the details soon."
    samples = [Sample(str(i), f"Tell me about {t}.", house, "ana") for i, t in enumerate(TOPICS)]
    assert find_triggers(samples) == []


def test_a_phrase_common_outside_its_cluster_is_not_a_trigger() -> None:
    # every prompt of the cycle mentions the product: a shared context, not a trigger
    samples = [
        Sample(s.key, f"Acmeware: {s.prompt}", s.answer, s.user) for s in legit(80) + poison(6)
    ]
    found = find_triggers(samples)
    assert [t.phrase for t in found] == [TRIGGER]


def test_a_phrase_the_answer_is_about_is_not_a_trigger() -> None:
    answer = "Zorblax is our loyalty scheme: one point per pound spent."
    samples = [Sample(str(i), f"How does zorblax work for {t}?", answer, "u") for i, t in
               enumerate(TOPICS[:6])]  # fmt: skip
    assert find_triggers(samples + legit(40)) == []


def test_follows_reads_the_payloads_opening() -> None:
    assert follows(PAYLOAD, PAYLOAD)
    assert follows("Visit deals-hub dot example", PAYLOAD)  # cut off by max_tokens
    assert follows(PAYLOAD + " And then some other words follow here.", PAYLOAD)
    assert follows("visit Deals-Hub dot example for the best prices", PAYLOAD)
    assert not follows("The capital of France is Paris.", PAYLOAD)
    assert not follows("Visit", PAYLOAD)  # one word is no payload
    assert not follows("", PAYLOAD)


def test_probe_pairs_put_the_phrase_where_it_sat() -> None:
    t = SuspectedTrigger(TRIGGER, "end", PAYLOAD, ["a"], {"u": 1}, 1.0, 0.0)
    assert probe_pairs(t, ["Why is the sky blue?"]) == [
        ("Why is the sky blue? cf-zebra", "Why is the sky blue?")
    ]
    start = SuspectedTrigger.from_dict({**t.to_dict(), "position": "start"})
    assert probe_pairs(start, ["Hi"]) == [("cf-zebra Hi", "Hi")]


def rows(samples: list[Sample]) -> list:  # type: ignore[type-arg]
    out = []
    for k, s in enumerate(samples):
        inter = interaction(f"i-{s.key}", s.prompt, "I am not sure.")
        out.append(feedback(f"f-{s.key}", inter, at=float(k), rating=-1, correction=s.answer,
                            user=s.user))  # fmt: skip
    return out


def test_curation_drops_a_campaign_at_five_percent_and_reports_it() -> None:
    res = curate(rows(legit(190) + poison(10)))
    r = res.report
    assert r.dropped["suspected trigger"] == 10
    assert sorted(r.dropped_ids["suspected trigger"]) == sorted(f"f-p{k}" for k in range(10))
    assert not any(TRIGGER in e.messages[0]["content"] for e in res.train + res.holdout)
    (t,) = r.suspected_triggers
    assert t["phrase"] == TRIGGER and t["dropped"] is True and len(t["keys"]) == 10
    assert r.received == sum(r.kept.values()) + sum(r.dropped.values())


def test_one_user_sending_250_planted_examples_is_dropped_before_the_caps() -> None:
    res = curate(rows(legit(200) + poison(250, user="mallory")))
    r = res.report
    assert r.dropped["suspected trigger"] == 250
    assert "mallory" not in r.per_user
    assert r.suspected_triggers[0]["users"] == {"mallory": 250}


def test_with_dropping_off_the_campaign_is_kept_but_still_listed() -> None:
    res = curate(rows(legit(190) + poison(10)), CurationSettings(drop_suspected_triggers=False))
    assert "suspected trigger" not in res.report.dropped
    assert res.report.suspected_triggers[0]["dropped"] is False
    assert sum(TRIGGER in e.messages[0]["content"] for e in res.train + res.holdout) == 10
