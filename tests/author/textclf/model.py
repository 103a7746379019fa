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
    max_batch_size = 16
    inputs = [TensorSpec("text", "BYTES", (-1,))]
    outputs = [TensorSpec("positive", "FP32", (-1,))]

    def load(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        texts, labels = zip(*TRAIN, strict=True)
        self.vectorizer = TfidfVectorizer().fit(texts)
        self.clf = LogisticRegression().fit(self.vectorizer.transform(texts), labels)

    def infer(self, items: list) -> list:
        out = []
        for item in items:
            texts = [t.decode() if isinstance(t, bytes) else str(t) for t in item.inputs["text"].data]
            if not texts:
                out.append(InvalidInput("text must hold at least one string"))
                continue
            p = self.clf.predict_proba(self.vectorizer.transform(texts))[:, 1]
            out.append({"positive": p.astype(np.float32)})
        return out


class MissingWeights(Sentiment):
    """Loads its weights from a file that is not there."""

    name = "sentiment-missing"

    def load(self) -> None:
        path = os.environ.get("TEXTCLF_WEIGHTS", "/nonexistent/textclf/weights.joblib")
        with open(path, "rb") as f:
            f.read()
