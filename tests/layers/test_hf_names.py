"""Rules registered for transformers classes by name cover classes that compute what the rule
assumes: each listed scaled word embedding's forward and __init__ are Gemma's or BART's."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from dpclip.layers import hf_scaled_embedding

pytest.importorskip("transformers")


def _class(qualified: str) -> type | None:
    module, name = qualified.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # not in this transformers version
        return None


def _source(fn: object) -> str:
    body = inspect.getsource(fn).split(":", 1)[1]  # past the signature's first colon
    return re.sub(r"\s+", " ", body).strip()


@pytest.mark.parametrize(
    "names, reference",
    [
        (hf_scaled_embedding.GEMMA_NAMES, hf_scaled_embedding.GEMMA_NAMES[0]),
        (hf_scaled_embedding.BART_NAMES, hf_scaled_embedding.BART_NAMES[0]),
    ],
    ids=["gemma", "bart"],
)
def test_each_scaled_embedding_registered_by_name_computes_what_its_reference_does(
    names, reference
):
    want = _class(reference)
    assert want is not None
    checked = 0
    for name in names:
        cls = _class(name)
        if cls is None:
            continue
        for method in ("forward", "__init__"):
            assert _source(getattr(cls, method)) == _source(getattr(want, method)), (name, method)
        checked += 1
    assert checked >= 2
