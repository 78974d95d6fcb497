"""The small sentiment set embedded in fastprompt: `fastprompt train`'s default data.

Written for this project (no third-party data): short movie-review sentences built from
hand-written phrase lists, with train and eval drawn from disjoint subjects and phrasings so that
eval accuracy measures generalisation, not recall.
"""

from __future__ import annotations

import random

_POSITIVE = [
    "was a joy from start to finish", "made me laugh out loud", "is warm, clever and moving", "deserves every award it gets",
    "kept me on the edge of my seat", "is beautifully shot and well acted", "left me smiling for days", "is a delight",
    "works wonderfully", "is sharp, funny and full of heart", "feels fresh and alive", "is the best thing I have seen this year",
    "surprised me in the best way", "is a small masterpiece", "never loses its charm", "has a lovely, generous spirit",
    "is gripping and smart", "is tender and honest", "earns its happy ending", "is great fun for the whole family",
]
_NEGATIVE = [
    "was a chore to sit through", "made me check my watch", "is dull, lazy and forgettable", "wastes a talented cast",
    "put me to sleep", "is badly written and worse acted", "left me cold", "is a mess",
    "falls flat", "is loud, empty and tiresome", "feels stale and lifeless", "is the worst thing I have seen this year",
    "disappointed me at every turn", "is a tedious failure", "never finds its footing", "has a mean, cynical streak",
    "is confusing and dumb", "is clumsy and dishonest", "ruins its own ending", "is no fun for anyone",
]
_TRAIN_SUBJECTS = ["The movie", "This film", "The sequel", "The comedy", "The documentary", "The thriller", "The script", "The new drama"]
_EVAL_SUBJECTS = ["The remake", "This picture", "The animated feature", "The director's latest"]


def embedded_sentiment(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train, eval, label names): 224 train and 48 eval sentences; labels 0 = negative, 1 = positive.

    Eval sentences use subjects and phrases that never occur in training.
    """
    def build(subjects, phrases_by_label):
        return [(f"{s} {p}.", lab) for lab, phrases in enumerate(phrases_by_label) for s in subjects for p in phrases]

    train = build(_TRAIN_SUBJECTS, [_NEGATIVE[:14], _POSITIVE[:14]])
    evalset = build(_EVAL_SUBJECTS, [_NEGATIVE[14:], _POSITIVE[14:]])
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(evalset)
    return train, evalset, ["negative", "positive"]
