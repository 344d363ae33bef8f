"""Self-distillation targets (`training.targets = "rewrites"`): the served version's own
rewrite replaces a correction only where it carries all of the correction's content."""

from __future__ import annotations

import asyncio

from daemon.candidate import REWRITE_PROMPT, rewrite_targets


def ex(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_a_rewrite_is_taught_only_where_it_keeps_the_content() -> None:
    examples = [
        ex("Who runs the Tollby ferry?", "The Tollby ferry is run by Ilse Varnhagen."),
        ex("When does the ferry leave?", "The ferry leaves at 6:40."),
        ex("How tall is the lighthouse?", "The lighthouse is 87 metres tall."),
        ex("Say hello.", "Hello!"),  # nothing the served answer lacked: a style, kept
    ]
    served = ["I do not know.", "It leaves in the morning.", "It is tall.", "Hello!"]
    rewrites = {
        "Who runs the Tollby ferry?": ("Ilse Varnhagen runs the Tollby ferry.", False),
        "When does the ferry leave?": ("It leaves early in the morning.", False),  # lost 6:40
        "How tall is the lighthouse?": ("The lighthouse is 87 metres", True),  # cut off
    }
    asked: list[list[dict[str, str]]] = []

    async def rewrite(chat: list[dict[str, str]]) -> tuple[str, bool]:
        asked.append(chat)
        question = chat[-1]["content"].split("\n\n")[0]
        return rewrites[question]

    out, n = asyncio.run(rewrite_targets(examples, served, rewrite))
    assert n == 1
    assert out[0] == ex("Who runs the Tollby ferry?", "Ilse Varnhagen runs the Tollby ferry.")
    assert out[1:] == examples[1:]
    assert len(asked) == 3  # the style was not asked
    assert asked[0] == [{"role": "user", "content": REWRITE_PROMPT.format(
        question="Who runs the Tollby ferry?",
        correction="The Tollby ferry is run by Ilse Varnhagen.")}]  # fmt: skip
