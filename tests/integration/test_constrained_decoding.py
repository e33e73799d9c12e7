"""Constrained decoding on the tiny real models, in both in-process engines: JSON schema and JSON
object outputs that parse and validate whatever the sampling, bad schemas refused before any
generation, unconstrained neighbours in the batch untouched, and the grammar cache."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.conftest import require

require("llguidance")
jsonschema = require("jsonschema")

from llmhost.engines.grammar import MAX_SOURCE_CHARS, GrammarCompiler  # noqa: E402
from llmhost.errors import InvalidRequest  # noqa: E402
from llmhost.types import Constraint, GenerationRequest, SamplingParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 6},
            "minItems": 1,
            "maxItems": 3,
        },
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 999},
                "active": {"type": "boolean"},
            },
            "required": ["id", "active"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
SCHEMA_C = Constraint("json_schema", json.dumps(SCHEMA))
PROMPTS = ["The quick brown fox", "User: describe a pet as JSON.\nAssistant:", "A"]


def _engine_factory(kind: str, tiny_model):
    if kind == "llamacpp":
        require("llama_cpp")
        from llmhost.engines.llamacpp import LlamaCppEngine

        return lambda **kw: LlamaCppEngine(tiny_model.gguf, **kw)
    require("torch")
    require("transformers")
    from llmhost.engines.transformers import TransformersEngine

    return lambda **kw: TransformersEngine(tiny_model.hf_dir, **kw)


@pytest.fixture(params=["llamacpp", "transformers"])
async def engine(request, tiny_model):
    e = _engine_factory(request.param, tiny_model)(threads=2, parallel=4)
    await e.start()
    yield e
    await e.close()


async def run(engine, prompt, constraint=None, **sampling):
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_tokens", 200)
    ids, text, last = [], [], None
    sp = SamplingParams(constraint=constraint, **sampling)
    async for d in engine.stream(GenerationRequest(prompt=prompt, sampling=sp)):
        ids.extend(d.token_ids)
        text.append(d.text)
        last = d
    return "".join(text), ids, last.finish_reason


def test_engines_declare_schema_and_tools(tiny_model):
    for kind in ("llamacpp", "transformers"):
        cls = _engine_factory(kind, tiny_model)(threads=1).__class__
        assert cls.supports_schema and cls.supports_tools


async def test_json_schema_outputs_validate(engine):
    """Random weights at temperature 1.0 over several seeds, and greedy: every streamed output,
    joined, is complete JSON that the schema accepts, and ends by itself."""
    runs = [dict(temperature=1.0, seed=seed) for seed in range(6)] + [dict(temperature=0.0)]
    for i, sampling in enumerate(runs):
        text, ids, finish = await run(engine, PROMPTS[i % len(PROMPTS)], SCHEMA_C, **sampling)
        assert finish == "stop", (sampling, text)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert len(ids) < 200


async def test_sampling_settings_still_apply(engine):
    """Penalties, top-k/top-p/min-p and temperature sit after the mask: still valid output."""
    for seed in range(3):
        text, _, finish = await run(
            engine,
            "A",
            SCHEMA_C,
            temperature=0.8,
            top_k=40,
            top_p=0.9,
            min_p=0.02,
            repeat_penalty=1.3,
            frequency_penalty=0.5,
            presence_penalty=0.5,
            seed=seed,
        )
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


async def test_same_seed_same_constrained_output(engine):
    a = await run(engine, "A", SCHEMA_C, temperature=1.0, seed=7)
    b = await run(engine, "A", SCHEMA_C, temperature=1.0, seed=7)
    assert a == b


async def test_json_object(engine):
    """Any JSON object: whatever ends by itself parses as an object (random weights may write
    one long string until max_tokens, as any model could)."""
    text, _, finish = await run(engine, "A", Constraint("json_object"))
    assert finish == "stop" and isinstance(json.loads(text), dict)
    finished = 0
    for seed in range(6):
        text, _, finish = await run(
            engine, "A", Constraint("json_object"), temperature=1.0, seed=seed, max_tokens=400
        )
        assert text.startswith("{")
        if finish == "stop":
            finished += 1
            assert isinstance(json.loads(text), dict)
    assert finished >= 1


async def test_lark_grammar(engine):
    c = Constraint("lark", 'start: "yes" | "no" | "maybe"')
    for seed in range(4):
        text, _, finish = await run(engine, "A", c, temperature=1.0, seed=seed)
        assert finish == "stop" and text in ("yes", "no", "maybe")


async def test_length_and_stop_strings_still_end_constrained_output(engine):
    text, ids, finish = await run(engine, "A", SCHEMA_C, max_tokens=3)
    assert finish == "length" and len(ids) == 3 and text.startswith("{")
    full, _, _ = await run(engine, "A", SCHEMA_C)
    text, _, finish = await run(engine, "A", SCHEMA_C, stop=('"kind"',))
    assert finish == "stop" and text == full[: full.index('"kind"')]


BAD = [
    ('{"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}', "/$defs/nope"),
    ('{"type": "integer", "minimum": 5, "maximum": 1}', "nsatisfiable"),
    ('{"type": "strnig"}', "strnig"),
    ('{"not": {"type": "string"}}', "not"),
    ('{"type": "string", "pattern": "(("}', "regex"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be an object"),
]


@pytest.mark.parametrize(("source", "needle"), BAD)
async def test_invalid_schema_is_refused_before_generation(engine, source, needle):
    steps = engine.health().stats["steps"]
    for _ in range(2):  # the second answer comes from the cache, the same
        with pytest.raises(InvalidRequest) as err:
            await run(engine, "A", Constraint("json_schema", source))
        assert err.value.param == "response_format"
        assert needle in err.value.message
    assert engine.health().stats["steps"] == steps


async def test_oversized_or_broken_constraints_are_refused(engine):
    huge = json.dumps({"type": "string", "description": "x" * MAX_SOURCE_CHARS})
    with pytest.raises(InvalidRequest, match="at most"):
        await run(engine, "A", Constraint("json_schema", huge))
    with pytest.raises(InvalidRequest, match="grammar"):
        await run(engine, "A", Constraint("lark", "start: ("))


async def test_unconstrained_neighbours_are_unchanged(engine):
    """Greedy unconstrained sequences get the same tokens alone and beside constrained ones."""
    alone = [await run(engine, p, max_tokens=16, ignore_eos=True) for p in PROMPTS[:2]]
    together = await asyncio.gather(
        run(engine, PROMPTS[0], max_tokens=16, ignore_eos=True),
        run(engine, PROMPTS[2], SCHEMA_C, temperature=1.0, seed=1),
        run(engine, PROMPTS[1], max_tokens=16, ignore_eos=True),
        run(engine, PROMPTS[2], Constraint("json_object")),
    )
    assert [together[0], together[2]] == alone
    jsonschema.validate(json.loads(together[1][0]), SCHEMA)


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


async def test_compiled_grammars_are_cached(engine):
    compiler: GrammarCompiler = engine._grammars
    source = dict(SCHEMA, title="cache probe")
    c = Constraint("json_schema", json.dumps(source))
    assert compiler.cached(c) is None
    t = time.perf_counter()
    first = await asyncio.to_thread(compiler.compile, c)
    first_s = time.perf_counter() - t
    again = compiler.compile(c)
    assert again is first and compiler.cached(c) is first
    cached_s = min(_timed(compiler.compile, c) for _ in range(5))  # best of 5: no preemption
    assert cached_s < 0.001 and cached_s < first_s
    compiler.check(c)


def test_cache_is_bounded(tiny_model):
    require("transformers")
    import transformers

    from llmhost.engines.grammar import hf_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    compiler = GrammarCompiler(lambda: hf_tokenizer(tok, len(tok), [tok.eos_token_id]), len(tok))
    compiler.cache_size = 3
    cs = [
        Constraint("json_schema", json.dumps({"type": "integer", "maximum": i})) for i in range(5)
    ]
    for c in cs:
        compiler.compile(c)
    assert [compiler.cached(c) is not None for c in cs] == [False, False, True, True, True]


def test_mask_on_a_strided_torch_row(tiny_model):
    """The torch path (used for GPU rows) masks the same tokens as the numpy one."""
    torch = require("torch")
    require("transformers")
    import numpy as np
    import transformers

    from llmhost.engines.grammar import hf_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    n = len(tok)
    compiler = GrammarCompiler(lambda: hf_tokenizer(tok, n, [tok.eos_token_id]), n)
    grammar = compiler.compile(SCHEMA_C)
    logits = torch.randn(n + 7, 2)  # a padded vocabulary row, read through a stride
    row = logits[:, 0]
    assert not row.is_contiguous()
    grammar.matcher().mask_row(row)
    flat = np.random.default_rng(0).standard_normal(n + 7).astype(np.float32)
    grammar.matcher().mask_logits(flat)
    assert torch.equal(torch.isinf(row), torch.from_numpy(np.isinf(flat)))
    assert torch.isinf(row[n:]).all() and int((~torch.isinf(row)).sum()) >= 1
