"""Hugging Face causal language models through transformers and torch: safetensors weights
memory-mapped, CUDA when present (else CPU with the configured threads), optional int8/int4,
the tokenizer's chat template, and continuous batching (see `transformers_batch`).

Loading: check the folder (config.json, safetensors; pickle `.bin` weights only when allowed)
-> choose device and dtype -> tokenizer -> model (never with remote code) -> quantize -> start
the batch thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmhost.engines.batching import BatchedEngine, engine_settings
from llmhost.engines.grammar import GrammarCompiler, hf_tokenizer
from llmhost.engines.torch_setup import (
    bnb_config,
    onednn_linear_works,
    own_memory,
    quantize_cpu_int8,
    resolve_device,
    resolve_dtype,
    use_onednn_linears,
)
from llmhost.engines.transformers_batch import (
    Sequence,
    TorchScheduler,
    batchable,
    new_cache,
)
from llmhost.errors import ConfigError, EngineNotReady, ModelLoadError
from llmhost.store import crypto, in_memory
from llmhost.types import ModelInfo

if TYPE_CHECKING:
    from llmhost.config import Settings

log = logging.getLogger("llmhost.engines.transformers")
DEFAULT_CTX_CAP = 4096
QUANTIZATIONS = ("int8", "int4")


def check_folder(path: Path, allow_pickle: bool) -> bool:
    """Validate a model folder; True when its weights are safetensors."""
    if not path.is_dir():
        raise ModelLoadError(
            f"{path} is not a folder; the transformers engine loads a Hugging Face model folder "
            "(config.json, tokenizer files, *.safetensors)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model folder?")
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.enc")):
        return True
    pickled = sorted(p.name for pat in ("*.bin", "*.pt", "*.bin.enc") for p in path.glob(pat))
    if not pickled:
        raise ModelLoadError(f"{path} holds no weights (*.safetensors)")
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} has only pickle weights ({', '.join(pickled[:3])}); loading pickle can run "
            "code. Convert them to safetensors, or pass --allow-pickle if you trust the source."
        )
    return False


class TransformersEngine(BatchedEngine[Sequence]):
    name = "transformers"
    sequence_type = Sequence
    supports_tools = True
    supports_schema = True
    auto_class: Any = AutoModelForCausalLM  # what the folder is loaded as

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_id: str | None = None,
        threads: int = 1,
        ctx_size: int = 0,
        parallel: int = 4,
        batch_size: int = 512,
        max_queue: int = 64,
        dtype: str = "auto",
        device: str = "auto",
        quantization: str | None = None,
        allow_pickle: bool = False,
        key_loader: Callable[[], bytes] | None = None,
        decrypt_dir: Path | str = "/dev/shm",
        decrypt_allow_disk: bool = False,
        prompt_cache: bool = True,
        prompt_cache_bytes: int = 1 << 30,
    ):
        if quantization in ("", "none"):
            quantization = None
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"the transformers engine quantizes to {' or '.join(QUANTIZATIONS)}, "
                f"not {quantization!r}"
            )
        self.path = Path(model_path)
        self._model_id = model_id or self.path.name
        self.threads = threads
        self.ctx_size = ctx_size
        self.parallel = parallel
        self.batch_size = batch_size
        self.max_queue = max_queue
        self.dtype = dtype
        self.device = device
        self.quantization = quantization
        self.allow_pickle = allow_pickle
        self.key_loader = key_loader
        self.decrypt_dir = Path(decrypt_dir)
        self.decrypt_allow_disk = decrypt_allow_disk
        self.prompt_cache = prompt_cache
        self.prompt_cache_bytes = prompt_cache_bytes
        self.model: Any = None
        self.tokenizer: Any = None
        self._pieces: dict[int, bytes] = {}  # token -> bytes, at most the vocabulary
        self._scheduler: TorchScheduler | None = None
        self._n_vocab = 0
        self.model_info = ModelInfo(id=self._model_id, context_length=0)

    @classmethod
    def from_settings(cls, settings: Settings) -> TransformersEngine:
        if not settings.model:
            raise ConfigError("no model given: pass a Hugging Face model folder")
        return cls(
            settings.model,
            dtype=settings.dtype,
            device=settings.device,
            quantization=settings.quantization,
            allow_pickle=settings.allow_pickle,
            **engine_settings(settings),
        )

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        # sealed weights keep their kind in the name (model.safetensors.enc), so one check of
        # the folder as stored holds for its decrypted copy too
        safetensors = check_folder(self.path, self.allow_pickle)
        if not any(crypto.is_encrypted(p) for p in self.path.glob("*.enc")):
            await asyncio.to_thread(self._load, self.path, safetensors)
            return
        if self.key_loader is None:
            raise ModelLoadError(f"{self.path} is encrypted and no key source is configured")
        key = self.key_loader()
        # The decrypted weights live in tmpfs only while they are loaded: the folder is removed
        # right after, and the mapped pages stay with the process alone.
        await asyncio.to_thread(self._load_encrypted, key, safetensors)

    def _load_encrypted(self, key: bytes, safetensors: bool) -> None:
        with in_memory.decrypted_folder_in_memory(
            self.path, key, self.decrypt_dir, allow_disk=self.decrypt_allow_disk
        ) as plain:
            self._load(plain, safetensors)

    def _load(self, path: Path, safetensors: bool) -> None:
        device = resolve_device(self.device)
        if self.quantization == "int4" and device.type != "cuda":
            raise ConfigError("int4 needs a CUDA device and bitsandbytes; on CPU use int8")
        if device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"transformers could not read {self.path}: {exc}") from exc
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = resolve_dtype(self.dtype, device, stored, self.quantization)
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "use_safetensors": safetensors,
            "trust_remote_code": False,
        }
        if self.quantization and device.type == "cuda":
            kwargs["quantization_config"] = bnb_config(self.quantization, dtype)
            kwargs["device_map"] = {"": device.index or 0}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            transformers.utils.logging.disable_progress_bar()
            model = self.auto_class.from_pretrained(path, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"transformers could not load {self.path}: {exc}") from exc
        if "quantization_config" not in kwargs:
            model = model.to(device)
        model.eval()
        if device.type == "cpu":
            if self.quantization == "int8":
                model = quantize_cpu_int8(model)
                own_memory(model)
            elif onednn_linear_works(dtype):
                log.debug("oneDNN linear layers: %d", use_onednn_linears(model))
        self._install(model, tokenizer, config, device, dtype)

    def _install(
        self, model: Any, tokenizer: Any, config: Any, device: torch.device, dtype: torch.dtype
    ) -> None:
        n_ctx = getattr(config, "max_position_embeddings", None) or DEFAULT_CTX_CAP
        per_seq = min(self.ctx_size, n_ctx) if self.ctx_size else min(n_ctx, DEFAULT_CTX_CAP)
        gen = getattr(model, "generation_config", None)
        eos: set[int] = set()
        for src in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(int(t) for t in src)
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        probe = new_cache(config)
        parallel = self.parallel
        prompt_cache = self.prompt_cache
        if not batchable(probe):
            log.warning(
                "%s uses a sliding-window or recurrent cache; serving one sequence at a time "
                "without a prompt cache",
                config.model_type,
            )
            parallel = 1
            prompt_cache = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:

            def decode(ids: list[int]) -> str:
                text: str = backend.decode(ids, skip_special_tokens=True)
                return text
        else:

            def decode(ids: list[int]) -> str:
                text: str = tokenizer.decode(
                    ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
                return text

        self.model, self.tokenizer = model, tokenizer
        self._n_vocab = int(getattr(config, "vocab_size", 0) or len(tokenizer))
        n_vocab, eos_ids = self._n_vocab, sorted(eos)
        self._grammars = GrammarCompiler(lambda: hf_tokenizer(tokenizer, n_vocab, eos_ids), n_vocab)
        self.model_info = ModelInfo(id=self._model_id, context_length=per_seq)
        template = getattr(tokenizer, "chat_template", None)
        self.chat_template = template if isinstance(template, str) else None
        self.bos_token = tokenizer.bos_token or ""
        self.eos_token = tokenizer.eos_token or ""
        self._scheduler = TorchScheduler(
            model,
            decode,
            eos,
            n_slots=parallel,
            batch_size=self.batch_size,
            max_queue=self.max_queue,
            cache_arg=cache_arg,
            config=config,
            prompt_cache=prompt_cache,
            prompt_cache_bytes=self.prompt_cache_bytes,
            tokenizer_backend=backend,
        )
        log.info(
            "loaded %s with transformers %s on %s (%s%s): context %d per sequence x %d, %d threads",
            self.path.name,
            transformers.__version__,
            device,
            str(dtype).removeprefix("torch."),
            f", {self.quantization}" if self.quantization else "",
            per_seq,
            parallel,
            torch.get_num_threads(),
        )

    async def close(self) -> None:
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close)
            self._scheduler = None
        self._grammars = None
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- requests -----------------------------------------------------------------------------

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            if self.tokenizer is None:
                raise EngineNotReady("the model is not loaded")
            piece = self._pieces[token] = hf_token_bytes(self.tokenizer, token)
        return piece

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise EngineNotReady("the model is not loaded")
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): printable bytes stand for themselves, the other
    bytes for the characters from U+0100 on, in order."""
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in shown}
    extra = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + extra)] = b
            extra += 1
    return table


def hf_token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes one token of a Hugging Face tokenizer stands for: byte-level BPE's characters
    mapped back to bytes, SentencePiece's byte tokens (<0x0A>) and word marks undone, special
    and added tokens as their text."""
    text = tokenizer.convert_ids_to_tokens(token)
    if not isinstance(text, str):
        return b""
    if token in tokenizer.all_special_ids or text in tokenizer.get_added_vocab():
        return text.encode("utf-8")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is not None and "ByteLevel" in type(decoder).__name__ + repr(decoder)[:4096]:
        table = _byte_level_table()
        if all(c in table for c in text):
            return bytes(table[c] for c in text)
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        with contextlib.suppress(ValueError):
            return bytes.fromhex(text[3:5])
    return text.replace("\u2581", " ").encode("utf-8")
