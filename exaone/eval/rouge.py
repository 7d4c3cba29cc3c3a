"""ROUGE as summarize.py reports it: `evaluate.load("rouge").compute()` with its defaults.

evaluate's metric fetches its script from the hub at run time, so we call what it wraps, Google's
`rouge_score`, with the same settings: rouge1/rouge2/rougeL/rougeLsum, no stemmer, the default
tokenizer, a BootstrapAggregator whose `mid` F-measure is the score, and numpy seeded with 0 for the
bootstrap (summarize.py sets `metric.seed = 0`). rougeLsum treats "\n" as the sentence separator,
which is how CNN/DailyMail highlights are joined. Scores are reported x100, as summarize.py prints.
"""

from __future__ import annotations

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SEED = 0


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """{rouge1, rouge2, rougeL, rougeLsum} as percentages (empty input: empty dict)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    aggregator = scoring.BootstrapAggregator()
    for ref, pred in zip(references, predictions, strict=True):
        aggregator.add_scores(scorer.score(ref, pred))
    state = np.random.get_state()  # evaluate's temp_seed: seed, compute, restore
    np.random.seed(SEED)
    try:
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    return {k: float(result[k].mid.fmeasure) * 100 for k in ROUGE_TYPES}
