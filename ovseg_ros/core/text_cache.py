"""Text embeddings of class names, cached in memory and optionally on disk.

Re-sending a known vocabulary must cost ~nothing, so every (model, template set, label) embedding is computed once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from .vocabulary import Vocabulary, split_synonyms


def templates_key(templates: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16]


class TextEmbeddingCache:
    """Embeds labels through a prompt-template ensemble: mean of normalised prompt embeddings, renormalised.

    A label with synonyms ("sofa;couch") averages over all synonyms x templates.
    """

    def __init__(self, encode_text, model_id: str, cache_dir: str | Path | None = None,
                 max_entries: int = 10_000) -> None:
        """max_entries bounds the memory cache (least recently used names are dropped; ~2 KB each for
        ViT-B/16), so a long-running node that sees ever new names does not grow without end."""
        self._encode_text = encode_text
        self.model_id = model_id
        self.max_entries = max_entries
        self._memory: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.computed = 0  # labels embedded by the model (not served from a cache), for tests and diagnostics

    def _disk_file(self, tkey: str) -> Path | None:
        if self._cache_dir is None:
            return None
        safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model_id)
        return self._cache_dir / f"{safe_model}-{tkey}.pt"

    def _load_disk(self, tkey: str) -> dict[str, torch.Tensor]:
        path = self._disk_file(tkey)
        if path is None or not path.is_file():
            return {}
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        except Exception:  # a corrupt cache file is only a cache miss
            return {}

    def _save_disk(self, tkey: str, entries: dict[str, torch.Tensor]) -> None:
        path = self._disk_file(tkey)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = self._load_disk(tkey)
            merged.update(entries)
            tmp = path.with_suffix(".tmp")
            torch.save(merged, tmp)
            tmp.replace(path)
        except OSError:
            pass  # the disk cache is an optimisation; never fail a vocabulary change for it

    def embed(self, labels: tuple[str, ...], templates: tuple[str, ...], persist: bool = True) -> torch.Tensor:
        """(len(labels), D) normalised float32 embeddings, in label order. `persist=False`: new ones stay in the
        (bounded) memory cache only -- for one-off texts such as find_objects queries."""
        tkey = templates_key(templates)
        with self._lock:
            missing = [lbl for lbl in dict.fromkeys(labels) if (self.model_id, tkey, lbl) not in self._memory]
            if missing:
                from_disk = self._load_disk(tkey)
                for lbl in list(missing):
                    if lbl in from_disk:
                        self._memory[(self.model_id, tkey, lbl)] = from_disk[lbl]
                        missing.remove(lbl)
            fresh = self._compute(missing, templates) if missing else {}
            for lbl, emb in fresh.items():
                self._memory[(self.model_id, tkey, lbl)] = emb
            if fresh and persist:
                self._save_disk(tkey, fresh)
            out = torch.stack([self._memory[(self.model_id, tkey, lbl)] for lbl in labels])
            for lbl in labels:  # most recently used last; the oldest beyond the bound are dropped
                self._memory.move_to_end((self.model_id, tkey, lbl))
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)
            return out

    def embed_vocabulary(self, vocabulary: Vocabulary) -> torch.Tensor:
        return self.embed(vocabulary.labels, vocabulary.templates)

    def _compute(self, labels: list[str], templates: tuple[str, ...]) -> dict[str, torch.Tensor]:
        prompts: list[str] = []
        owners: list[int] = []
        for index, label in enumerate(labels):
            for name in split_synonyms(label):
                for template in templates:
                    prompts.append(template.format(name))
                    owners.append(index)
        feats = self._encode_text(prompts)
        owner_idx = torch.tensor(owners)
        sums = torch.zeros(len(labels), feats.shape[1]).index_add_(0, owner_idx, feats)
        means = F.normalize(sums, dim=-1)
        self.computed += len(labels)
        return {label: means[i].clone() for i, label in enumerate(labels)}

    def __len__(self) -> int:
        return len(self._memory)
