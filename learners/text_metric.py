"""ROUGE-L and exact match as a Hugging Face `evaluate` metric that loads offline.

`evaluate.load("rouge")` fetches its script from the Hub; this file is the local
script `learners.metrics` hands to `evaluate.load(path)` instead. It returns the
per-item scores as well as the means, because the evaluation needs them for paired
bootstrap intervals. Keep one import per line: `evaluate` parses them.
"""

import re
import string

import datasets
import evaluate
from rouge_score import rouge_scorer

_PUNCT = str.maketrans("", "", string.punctuation)
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: the SQuAD-style normal form."""
    return _SPACE.sub(" ", text.lower().translate(_PUNCT)).strip()


class TextMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE-L F1 (rouge-score, no stemming) and normalized exact match.",
            citation="Lin, 2004: ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, object]:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        rouge = [
            scorer.score(r, p)["rougeL"].fmeasure
            for p, r in zip(predictions, references, strict=False)
        ]
        exact = [
            float(normalize(p) == normalize(r))
            for p, r in zip(predictions, references, strict=False)
        ]
        n = max(1, len(rouge))
        return {
            "rouge_l": sum(rouge) / n,
            "exact_match": sum(exact) / n,
            "rouge_l_per_item": rouge,
            "exact_match_per_item": exact,
        }
