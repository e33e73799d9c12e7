"""Capacity plans against figures worked out by hand from Llama-2's published configs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmhost.cli.main import app
from llmhost.errors import ConfigError
from llmhost.ops.plan import (
    GIB,
    _file_type,
    make_plan,
    parse_params,
    shape_for_params,
    shape_from_gguf,
    shape_from_hf_config,
)

LLAMA2 = {
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "13b": dict(
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}
# Parameter counts Meta publishes for these checkpoints.
PARAMS = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
# 2 (K, V) x layers x KV heads x head dim 128 x 2 bytes
KV_PER_TOKEN = {
    "7b": 2 * 32 * 32 * 128 * 2,
    "13b": 2 * 40 * 40 * 128 * 2,
    "70b": 2 * 80 * 8 * 128 * 2,
}


def runtime(cfg) -> float:
    return (
        0.5 * GIB
        + 512 * (4 * cfg["hidden_size"] + 2 * cfg["intermediate_size"]) * 2
        + (512 * 32000 * 4)
    )


@pytest.mark.parametrize("size", ["7b", "13b", "70b"])
def test_weights_kv_and_total_by_hand(size):
    cfg = LLAMA2[size]
    shape = shape_from_hf_config(cfg, f"llama-2-{size}")
    assert shape.params == PARAMS[size]
    p = make_plan(shape, quant="fp16", ctx=4096, concurrency=1)
    weights = PARAMS[size] * 2
    kv = KV_PER_TOKEN[size] * 4096
    assert p.weights_gib == round(weights / GIB, 2)
    assert p.kv_per_token_kib == KV_PER_TOKEN[size] / 1024
    assert p.kv_cache_gib == round(kv / GIB, 2)
    assert p.total_gib == round((weights + kv + runtime(cfg)) / GIB, 2)


def test_the_guides_figures():
    seven = make_plan(shape_from_hf_config(LLAMA2["7b"], "7b"), ctx=4096)
    thirteen = make_plan(shape_from_hf_config(LLAMA2["13b"], "13b"), ctx=4096)
    assert 14.5 <= seven.total_gib <= 15.5  # "about 15 GB"
    fits = {f.gpu: f.gpus_needed for f in thirteen.gpus}
    assert fits["RTX 4090"] == 2 and fits["V100 32GB"] == 1  # "at least 32 GB"
    assert 24 < thirteen.total_gib / 0.9 <= 32  # more than a 24 GB card, within a 32 GB one


def test_tensor_parallel_degree_and_concurrency():
    shape = shape_from_hf_config(LLAMA2["70b"], "70b")
    p = make_plan(shape, quant="fp16", ctx=4096, concurrency=1)
    fits = {f.gpu: f for f in p.gpus}
    # 128.5 GiB of weights: 2 x 80 GB (72 GiB usable each), 4 x 40 GB, 8 x 24 GB
    assert fits["A100 80GB"].gpus_needed == 2 and fits["A100 80GB"].interconnect == "NVLink"
    assert fits["A100 40GB"].gpus_needed == 4
    assert fits["RTX 4090"].gpus_needed == 8 and "PCIe" in fits["RTX 4090"].interconnect
    weights, run = PARAMS["70b"] * 2, runtime(LLAMA2["70b"])
    per_seq = KV_PER_TOKEN["70b"] * 4096 / 2  # 8 KV heads split over 2 GPUs
    assert fits["A100 80GB"].max_concurrency == int((72 * GIB - weights / 2 - run) // per_seq)
    int8 = {f.gpu: f.gpus_needed for f in make_plan(shape, quant="int8", ctx=4096).gpus}
    assert int8["A100 80GB"] == 1
    q4 = make_plan(shape, quant="q4_0", ctx=4096)
    assert q4.weights_gib == round(PARAMS["70b"] * 4.5 / 8 / GIB, 2)
    huge = make_plan(shape, quant="fp32", ctx=4096, concurrency=64)
    assert {f.gpu: f.gpus_needed for f in huge.gpus}["RTX 4090"] is None


def test_7b_concurrency_on_one_a100():
    p = make_plan(shape_from_hf_config(LLAMA2["7b"], "7b"), ctx=4096, concurrency=8)
    a100 = next(f for f in p.gpus if f.gpu == "A100 80GB")
    room = 80 * GIB * 0.9 - PARAMS["7b"] * 2 - runtime(LLAMA2["7b"])
    assert a100.gpus_needed == 1 and a100.max_concurrency == int(
        room // (KV_PER_TOKEN["7b"] * 4096)
    )
    assert p.host_ram_gib == round((PARAMS["7b"] * 2 + 2 * GIB) / 0.8 / GIB, 1)


def test_params_presets_and_bad_input():
    assert parse_params("13B") == 13e9 and parse_params("500m") == 5e8
    shape, how = shape_for_params(13e9)
    assert shape.name == "Llama-2-13B" and "Llama-2-13B" in how
    shape, how = shape_for_params(20e9)
    assert shape.params == 20e9 and "estimated" in how
    for bad in ("", "lots", "-7B", "7X", "0.0001B", "99999T"):
        with pytest.raises(ConfigError):
            parse_params(bad)
    s = shape_from_hf_config(LLAMA2["7b"], "x")
    with pytest.raises(ConfigError):
        make_plan(s, quant="q1")
    with pytest.raises(ConfigError):
        make_plan(s, concurrency=0)
    with pytest.raises(ConfigError):
        shape_from_hf_config({"hidden_size": 8}, "broken")


def test_gguf_file_types():
    """general.file_type names a format through gguf's LlamaFileType; formats the bits table
    lacks, and numbers gguf does not know, give none."""
    known = {0: "fp32", 1: "fp16", 2: "q4_0", 7: "q8_0", 8: "q5_0", 10: "q2_k", 12: "q3_k_m"}
    known |= {15: "q4_k_m", 17: "q5_k_m", 18: "q6_k", 32: "bf16"}
    for value, name in known.items():
        assert _file_type(value) == name
    for value in (3, 11, 14, 30, 999, None):  # q4_1, q3_k_s, q4_k_s, iq4_xs, unknown, absent
        assert _file_type(value) is None


def test_gguf_model_and_cli(tiny_model, tmp_path):
    shape, quant = shape_from_gguf(tiny_model.gguf)
    assert shape.layers == 2 and shape.hidden == 64 and quant == "fp32"
    r = CliRunner().invoke(app, ["plan", "--model", str(tiny_model.gguf), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["quant"] == "fp32" and out["gpus"][0]["gpus_needed"] == 1
    r = CliRunner().invoke(app, ["plan", "--model", str(tiny_model.hf_dir), "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["plan", "--params", "13B", "--gpu", "4090", "--gpu", "A100"])
    assert r.exit_code == 0 and "RTX 4090" in r.output and "L40S" not in r.output
    assert "KV cache" in r.output
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    for args in (
        ["--model", str(bad)],
        [],
        ["--params", "7B", "--model", "x"],
        ["--params", "7B", "--gpu", "nonesuch"],
        ["--model", "nope:1"],
    ):
        r = CliRunner().invoke(app, ["plan", *args])
        assert r.exit_code != 0
