"""A TF-IDF + logistic regression sentiment classifier (scikit-learn)."""

from __future__ import annotations

import os

import numpy as np

from infergate_worker import InvalidInput, Model, TensorSpec

#: Training data: not a model (the class path `textclf.model:TRAIN` is a
#: mistake the start-up check must catch).
TRAIN = [
    ("what a wonderful, lovely day", 1),
    ("great service and a great meal", 1),
    ("i love this, it works perfectly", 1),
    ("terrible, it broke after one day", 0),
    ("awful food and rude staff", 0),
    ("i hate waiting, worst visit ever", 0),
]


class Sentiment(Model):
    name = "sentiment-tfidf"
    kind = "infer"
    max_batch_size = 32
    inputs = (TensorSpec("text", "BYTES", (-1,)),)
    outputs = (TensorSpec("positive", "FP32", (-1,)),)

    def load(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        texts, labels = zip(*TRAIN, strict=True)
        self.vectorizer = TfidfVectorizer().fit(texts)
        self.clf = LogisticRegression().fit(self.vectorizer.transform(texts), labels)

    def infer(self, items: list) -> list:
        # One vectorizer pass over the whole batch; an empty text fails it as
        # a whole, as many real pipelines do (the SDK then runs the batch's
        # items one by one, so only that caller gets the 400).
        texts = [[_text(t) for t in item.inputs["text"].data] for item in items]
        flat = [t for ts in texts for t in ts]
        if not all(t.strip() for t in flat):
            raise InvalidInput("text must not be empty")
        p = self.clf.predict_proba(self.vectorizer.transform(flat))[:, 1].astype(np.float32)
        out, start = [], 0
        for ts in texts:
            out.append({"positive": p[start : start + len(ts)]})
            start += len(ts)
        return out


def _text(t: object) -> str:
    return t.decode() if isinstance(t, bytes) else str(t)


class MissingWeights(Sentiment):
    """Loads its weights from a file that is not there."""

    name = "sentiment-missing"

    def load(self) -> None:
        path = os.environ.get("TEXTCLF_WEIGHTS", "/nonexistent/textclf/weights.joblib")
        with open(path, "rb") as f:
            f.read()
