"""The demo builder writes one model in two formats: transformers and llama.cpp must tokenize
alike and produce the same greedy continuation from the same numbers."""

from __future__ import annotations

import pytest

from tests.conftest import require

PROMPTS = ["The quick brown fox", "Security is not an afterthought. Every request"]


@pytest.fixture(scope="module")
def hf(tiny_model):
    require("torch")
    transformers = require("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model.hf_dir, dtype="float32")
    model.eval()
    return tok, model


async def test_transformers_and_llamacpp_agree(tiny_model, hf):
    require("llama_cpp")
    import torch

    from llmhost.engines.llamacpp import LlamaCppEngine
    from llmhost.types import GenerationRequest, SamplingParams

    tok, model = hf
    engine = LlamaCppEngine(tiny_model.gguf, threads=2, parallel=1)
    await engine.start()
    try:
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            assert ids == engine.tokenize(prompt)
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=16,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=tok.pad_token_id,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            hf_new = out.sequences[0, len(ids) :].tolist()
            # llama.cpp keeps its KV cache in fp16, which moves logits by up to about 1e-3: a
            # step whose two best are closer than that may go either way, so the comparison
            # ends before one.
            gaps = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
            n = next((i for i, gap in enumerate(gaps) if gap < 2e-3), len(gaps))
            assert n >= 8, gaps
            got: list[int] = []
            req = GenerationRequest(
                prompt=prompt,
                sampling=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
            )
            async for d in engine.stream(req):
                got.extend(d.token_ids)
            assert got[:n] == hf_new[:n]
    finally:
        await engine.close()


def test_chat_template_renders_in_transformers(hf):
    tok, _ = hf
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
