"""Everyday questions that get no feedback: the served model's own answers to them are replayed
in training (self-replay), which keeps its everyday behaviour. The demo asks the first twelve;
the learning benchmarks (`benchmarks/story.py`) all of them. Standard library only: the GPU
benchmarks import it without the daemon's dependencies."""

from __future__ import annotations

EVERYDAY: tuple[str, ...] = (
    "How do I make a good cup of tea?",
    "Give me a tip for remembering new words.",
    "Why do leaves change colour in autumn?",
    "What should I pack for a day at the beach?",
    "Explain what a rainbow is.",
    "How long should I boil pasta?",
    "What is a good name for a goldfish?",
    "How can I sleep better?",
    "What are the benefits of walking every day?",
    "Describe a good way to start the morning.",
    "How do plants make their food?",
    "What is the capital of Italy?",
    "How do I keep basil alive on a windowsill?",
    "What is the difference between weather and climate?",
    "Suggest a simple dinner with eggs and potatoes.",
    "Why is the sky blue?",
    "How can I stop my glasses from fogging up?",
    "What is a polite way to decline an invitation?",
    "How many legs does a spider have?",
    "What makes bread rise?",
)
