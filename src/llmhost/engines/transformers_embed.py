"""Embeddings from a Hugging Face model folder with transformers, by sentence-transformers'
conventions: the pooling its `modules.json` / `1_Pooling/config.json` declare (CLS, mean, max
or last token; mean when the folder declares none) and L2 normalisation when it has a
Normalize module (or declares no modules, as for a plain model). Concurrent requests are
padded into shared forward passes (see engines.embedding)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from llmhost.engines.embedding import EmbeddingEngine, EmbedLoop, RerankEngine
from llmhost.engines.transformers import DEFAULT_CTX_CAP, TransformersEngine
from llmhost.errors import ModelLoadError
from llmhost.types import ModelInfo

log = logging.getLogger("llmhost.engines.transformers")
POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


def folder_pooling(path: Path) -> tuple[str, bool]:
    """The pooling a sentence-transformers folder declares, and whether it normalises."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "mean", True
    try:
        modules = json.loads(modules_file.read_text())
        kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"{modules_file}: not a sentence-transformers module list ({exc})"
        ) from exc
    pooling = "mean"
    if "Pooling" in kinds:
        cfg_file = path / kinds["Pooling"] / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{cfg_file}: {exc}") from exc
        chosen = [name for key, name in POOLING_KEYS.items() if cfg.get(key)]
        if len(chosen) != 1:
            raise ModelLoadError(
                f"{cfg_file} declares {chosen or 'no'} pooling; one of "
                f"{', '.join(POOLING_KEYS.values())} is served"
            )
        pooling = chosen[0]
    return pooling, "Normalize" in kinds


class _TorchEmbedLoop(EmbedLoop):
    def __init__(
        self,
        model: Any,
        pooling: str,
        normalize: bool,
        pad: int,
        rows: int,
        tokens: int,
        sep: int | None = None,
    ):
        self.model, self.pooling, self.pad, self.sep = model, pooling, pad, sep
        super().__init__(rows=rows, tokens=tokens, normalize=normalize, log=log)

    def _batch(self, inputs: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in inputs)
        ids = torch.full((len(inputs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for i, row in enumerate(inputs):  # right padding: real positions stay 0..n-1
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        device = self.model.device
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if self.sep is not None:  # a pair: the second segment (after the first [SEP]) is type 1
            after = (ids == self.sep).long().cumsum(1)
            types = ((after - (ids == self.sep).long()) > 0).long() * mask
            batch["token_type_ids"] = types.to(device)
        return batch

    def vectors(self, inputs: list[list[int]]) -> list[np.ndarray]:
        batch = self._batch(inputs)
        with torch.inference_mode():
            out = self.model(**batch)
        if self.pooling == "rank":
            return list(out.logits.float().cpu().numpy())
        mask = batch["attention_mask"]
        hidden = out.last_hidden_state.float()
        m = mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            last = mask.sum(1) - 1
            pooled = hidden[torch.arange(len(inputs)), last.to(hidden.device)]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(m == 0, float("-inf")).max(1).values
        else:
            pooled = (hidden * m).sum(1) / m.sum(1)
        return list(pooled.cpu().numpy())


class TransformersEmbeddingEngine(EmbeddingEngine, TransformersEngine):
    """A Hugging Face model folder served for `/v1/embeddings`."""

    auto_class: Any = AutoModel

    def _install(
        self, model: Any, tokenizer: Any, config: Any, device: torch.device, dtype: torch.dtype
    ) -> None:
        n_ctx = getattr(config, "max_position_embeddings", None) or DEFAULT_CTX_CAP
        per_seq = min(self.ctx_size or n_ctx, n_ctx, self.batch_size)
        self.model, self.tokenizer = model, tokenizer
        self._n_vocab = int(getattr(config, "vocab_size", 0) or len(tokenizer))
        self.model_info = ModelInfo(id=self._model_id, context_length=per_seq)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._loop = self._make_loop(model, tokenizer, config, pad)
        log.info(
            "loaded %s for %s: %s pooling, %d tokens per input",
            self.path.name,
            self.kind,
            self.pooling,
            per_seq,
        )

    def _make_loop(self, model: Any, tokenizer: Any, config: Any, pad: int) -> _TorchEmbedLoop:
        self.pooling, normalize = folder_pooling(self.path)
        self.dimensions = int(getattr(config, "hidden_size", 0))
        return _TorchEmbedLoop(
            model, self.pooling, normalize, pad, rows=self.parallel, tokens=self.batch_size
        )


class TransformersRerankEngine(RerankEngine, TransformersEmbeddingEngine):
    """A Hugging Face cross-encoder (…ForSequenceClassification) served for `/v1/rerank`."""

    auto_class = AutoModelForSequenceClassification

    def _make_loop(self, model: Any, tokenizer: Any, config: Any, pad: int) -> _TorchEmbedLoop:
        self.pooling = "rank"
        typed = getattr(config, "type_vocab_size", 1) > 1  # a pair's second segment is type 1
        return _TorchEmbedLoop(
            model,
            "rank",
            False,
            pad,
            rows=self.parallel,
            tokens=self.batch_size,
            sep=tokenizer.sep_token_id if typed else None,
        )

    def pair(self, query: str, document: str) -> list[int]:
        return list(self.tokenizer(query, document)["input_ids"])
