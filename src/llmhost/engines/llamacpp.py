"""GGUF models through llama.cpp (llama-cpp-python's C bindings), memory-mapped, with
continuous batching of concurrent requests (see `llamacpp_batch`)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp as C

from llmhost.engines.batching import BatchedEngine, engine_settings
from llmhost.engines.grammar import GrammarCompiler, llamacpp_tokenizer
from llmhost.engines.llamacpp_batch import BatchScheduler, Sequence
from llmhost.engines.llamacpp_threads import ThreadPool
from llmhost.engines.loading import at_low_priority
from llmhost.errors import (
    ConfigError,
    EngineNotReady,
    ModelLoadError,
)
from llmhost.store import crypto, in_memory
from llmhost.types import ModelInfo

if TYPE_CHECKING:
    from llmhost.config import Settings

log = logging.getLogger("llmhost.engines.llamacpp")
_native_log = logging.getLogger("llmhost.llama_cpp")
DEFAULT_CTX_CAP = 4096
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml: 1 debug, 2 info, 5 continuation


def _log_native(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp prints a great deal at load; keep it out of the server log unless debugging.
    lvl = _LEVELS.get(level, logging.DEBUG)
    if _native_log.isEnabledFor(lvl):
        _native_log.log(lvl, "%s", text.decode("utf-8", "replace").rstrip())


# Kept at module level: llama.cpp holds the pointer for as long as the process runs.
_route_native_log = C.llama_log_callback(_log_native)


def resolve_gguf(path: Path) -> Path:
    """The GGUF file to load: `path` itself, or the single .gguf inside a folder."""
    if path.is_dir():
        found = sorted([*path.glob("*.gguf"), *path.glob("*.gguf.enc")])
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise ModelLoadError(f"{path} must hold exactly one .gguf file (found: {names})")
        path = found[0]
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    return path


class LlamaCppEngine(BatchedEngine[Sequence]):
    name = "llamacpp"
    sequence_type = Sequence
    supports_tools = True
    supports_schema = True

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
        mmap: bool = True,
        key_loader: Callable[[], bytes] | None = None,
        decrypt_dir: Path | str = "/dev/shm",
        decrypt_allow_disk: bool = False,
        prompt_cache: bool = True,
        prompt_cache_bytes: int = 1 << 30,
    ):
        self.path = Path(model_path)
        self._explicit_id = model_id
        self._model_id = model_id or self.path.stem
        self.threads = threads
        self.ctx_size = ctx_size
        self.parallel = parallel
        self.batch_size = batch_size
        self.max_queue = max_queue
        self.mmap = mmap
        self.key_loader = key_loader
        self.decrypt_dir = Path(decrypt_dir)
        self.decrypt_allow_disk = decrypt_allow_disk
        self.prompt_cache = prompt_cache
        self.prompt_cache_bytes = prompt_cache_bytes
        self._model = None
        self._ctx = None
        self._vocab = None
        self._scheduler: BatchScheduler | None = None
        self._threadpool: ThreadPool | None = None
        self._pieces: dict[int, bytes] = {}  # token -> bytes, at most the vocabulary
        self.model_info = ModelInfo(id=self._model_id, context_length=0)

    @classmethod
    def from_settings(cls, settings: Settings) -> LlamaCppEngine:
        if not settings.model:
            raise ConfigError("no model given: pass a GGUF path, set LLMHOST_MODEL, or use --demo")
        return cls(settings.model, mmap=settings.mmap, **engine_settings(settings))

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.path = resolve_gguf(self.path)
        stem = self.path.name.removesuffix(".enc").removesuffix(".gguf")
        self._model_id = self._explicit_id or stem
        if crypto.is_encrypted(self.path):
            if self.key_loader is None:
                raise ModelLoadError(f"{self.path} is encrypted and no key source is configured")
            key = self.key_loader()
            await asyncio.to_thread(self._load_encrypted, key)
            return
        with self.path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{self.path} is not a GGUF file")
        await asyncio.to_thread(self._load, self.path)

    def _load_encrypted(self, key: bytes) -> None:
        # The plaintext exists only in tmpfs and only while llama.cpp maps it in: once loaded
        # its name is removed and the mapping alone holds the pages, so no plaintext file
        # outlives the load, whatever happens to the process later.
        with in_memory.decrypted_in_memory(
            self.path, key, self.decrypt_dir, allow_disk=self.decrypt_allow_disk
        ) as plain:
            self._load(plain)

    def _load_model(self, path: Path) -> Any:
        C.llama_log_set(_route_native_log, ctypes.c_void_p(0))
        C.llama_backend_init()
        mparams = C.llama_model_default_params()
        mparams.load_mode = 1 if self.mmap else 0  # LLAMA_LOAD_MODE_MMAP / _NONE
        model = at_low_priority(lambda: C.llama_model_load_from_file(str(path).encode(), mparams))
        if not model:
            raise ModelLoadError(
                f"llama.cpp could not load {self.path} (run with --log-level debug)"
            )
        self._model = model
        self._vocab = C.llama_model_get_vocab(model)
        return model

    def _load(self, path: Path) -> None:
        model = self._load_model(path)
        n_train = C.llama_model_n_ctx_train(model)
        per_seq = self.ctx_size or min(n_train, DEFAULT_CTX_CAP)
        cparams = C.llama_context_default_params()
        cparams.n_ctx = per_seq * self.parallel
        cparams.n_seq_max = self.parallel
        cparams.n_batch = self.batch_size
        cparams.n_ubatch = min(self.batch_size, 512)
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.kv_unified = False  # one KV stream per sequence: no cross-talk, no fragmentation
        cparams.no_perf = True
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {cparams.n_ctx} tokens "
                f"({self.parallel} x {per_seq}); lower --ctx-size or --parallel"
            )
        self._ctx = ctx
        self._threadpool = ThreadPool(ctx, self.threads)
        n_vocab = C.llama_vocab_n_tokens(self._vocab)
        eog = [t for t in range(n_vocab) if C.llama_vocab_is_eog(self._vocab, t)]
        self.model_info = ModelInfo(id=self._model_id, context_length=C.llama_n_ctx_seq(ctx))
        template = C.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8", "replace") if template else None
        self.bos_token = self._special_text(C.llama_vocab_bos(self._vocab))
        self.eos_token = self._special_text(C.llama_vocab_eos(self._vocab))
        self._n_vocab = n_vocab
        vocab = self._vocab
        self._grammars = GrammarCompiler(lambda: llamacpp_tokenizer(vocab, n_vocab, eog), n_vocab)
        self._scheduler = BatchScheduler(
            ctx,
            self._vocab,
            n_vocab,
            eog,
            n_slots=self.parallel,
            batch_size=self.batch_size,
            max_queue=self.max_queue,
            prompt_cache=self.prompt_cache,
            prompt_cache_bytes=self.prompt_cache_bytes,
            on_idle=self._threadpool.pause,
        )
        log.info(
            "loaded %s: %d vocab, context %d per sequence x %d sequences, %d threads",
            self.path.name,
            n_vocab,
            self.model_info.context_length,
            self.parallel,
            self.threads,
        )

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(128)
        n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    async def close(self) -> None:
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close)
            self._scheduler = None
        self._grammars = None
        if self._ctx:
            C.llama_free(self._ctx)
            self._ctx = None
        if self._threadpool is not None:
            self._threadpool.close()
            self._threadpool = None
        if self._model:
            C.llama_model_free(self._model)
            self._model = None

    # --- requests -----------------------------------------------------------------------------

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            if self._vocab is None:
                raise EngineNotReady("the model is not loaded")
            buf = ctypes.create_string_buffer(256)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            piece = self._pieces[token] = buf.raw[: max(n, 0)]
        return piece

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        if self._vocab is None:
            raise EngineNotReady("the model is not loaded")
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, True)
        if n < 0:  # more tokens than bytes can only happen with many specials; retry exact
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, True)
        return list(buf[:n])
