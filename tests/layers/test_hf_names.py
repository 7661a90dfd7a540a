"""Rules registered for transformers classes by name cover classes that compute what the rule
assumes: each listed scaled word embedding's forward and __init__ are Gemma's or BART's, each
listed T5-style layer norm's are T5's (statement for statement: docstrings and comments aside)."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest

from dpclip.layers import hf_rmsnorm, hf_scaled_embedding

pytest.importorskip("transformers")


def _class(qualified: str) -> type | None:
    module, name = qualified.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # not in this transformers version
        return None


def _source(fn: object) -> str:
    """The function's body as syntax: its docstring and comments dropped."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return "\n".join(ast.dump(statement) for statement in body)


@pytest.mark.parametrize(
    "names, reference",
    [
        (hf_scaled_embedding.GEMMA_NAMES, hf_scaled_embedding.GEMMA_NAMES[0]),
        (hf_scaled_embedding.BART_NAMES, hf_scaled_embedding.BART_NAMES[0]),
        (hf_rmsnorm.T5_NAMES, hf_rmsnorm.T5_NAMES[0]),
    ],
    ids=["gemma", "bart", "t5-layer-norm"],
)
def test_each_class_registered_by_name_computes_what_its_reference_does(names, reference):
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
