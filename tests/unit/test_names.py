import os

import pytest

from llmhost.errors import InvalidRequest
from llmhost.store.names import ModelRef, parse_ref, safe_join, safe_relpath


@pytest.mark.parametrize(
    "text, ref",
    [
        ("llama3", ModelRef("llama3", "latest")),
        ("llama3:8b-q4", ModelRef("llama3", "8b-q4")),
        ("TinyLlama/TinyLlama-1.1B:v1.0", ModelRef("TinyLlama/TinyLlama-1.1B", "v1.0")),
    ],
)
def test_good_refs(text, ref):
    assert parse_ref(text) == ref
    assert str(ref) == (text if ":" in text else f"{text}:latest")


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":tag",
        "../etc",
        "a/../b",
        "/abs",
        "a/b/c",
        ".hidden",
        "-x",
        "a\x00b",
        "a\nb",
        "name:",
        "name:../x",
        "name:a/b",
        "a b",
        "a\\b",
        "x" * 200,
        "name:" + "t" * 80,
    ],
)
def test_bad_refs(text):
    with pytest.raises(InvalidRequest):
        parse_ref(text)


@pytest.mark.parametrize("text", ["model.safetensors", "sub/dir/file.bin", "a..b.json"])
def test_good_relpaths(text):
    assert str(safe_relpath(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a//b",
        "./a",
        "a/.",
        "a\\b",
        "a\x00",
        "a\x1bb",
        "C:\\x",
    ],
)
def test_bad_relpaths(text):
    with pytest.raises(InvalidRequest):
        safe_relpath(text)


def test_safe_join_blocks_symlink_escape(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    assert safe_join(root, "a", "b.gguf") == root.resolve() / "a" / "b.gguf"
    os.symlink(tmp_path, root / "link")
    with pytest.raises(InvalidRequest, match="outside"):
        safe_join(root, "link/secret")
    with pytest.raises(InvalidRequest):
        safe_join(root, "../x")
