"""Registries: register/get/build/names, one-line errors, and user components selected by name."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid

import pytest
import torch

from microgpt.config import GPTConfig
from microgpt.errors import ConfigError
from microgpt.model import GPT
from microgpt.registry import ATTENTION, MLP, NORM, POSITION, Registry, UnknownComponentError


def test_register_get_build_names():
    reg = Registry("widget")

    @reg.register("b")
    def make_b(x, scale=1):
        return ("b", x * scale)

    returned = reg.register("a")(dict)
    assert returned is dict  # the decorator hands back the object unchanged
    assert reg.get("b") is make_b
    assert reg.build("b", 3, scale=2) == ("b", 6)
    assert reg.build("a", k=1) == {"k": 1}
    assert reg.names() == ["a", "b"]  # sorted
    assert "a" in reg and "c" not in reg


def test_builtin_components_are_registered():
    import microgpt.components  # noqa: F401

    assert {"mha", "gqa", "mqa", "sliding"} <= set(ATTENTION.names())
    assert {"learned", "rope"} <= set(POSITION.names())
    assert {"layernorm", "rmsnorm"} <= set(NORM.names())
    assert {"gelu", "gelu_tanh", "swiglu"} <= set(MLP.names())


def test_unknown_name_is_one_line_listing_choices():
    reg = Registry("widget")
    reg.register("alpha")(int)
    reg.register("beta")(float)
    with pytest.raises(UnknownComponentError) as ei:
        reg.get("gamma")
    msg = str(ei.value)
    assert "\n" not in msg
    assert "'gamma'" in msg and "widget" in msg
    assert "alpha" in msg and "beta" in msg
    assert not msg.startswith('"')  # not KeyError's quoted repr
    assert isinstance(ei.value, KeyError)
    with pytest.raises(UnknownComponentError):
        reg.build("gamma")


def test_unknown_attention_through_model_lists_builtins():
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, attention="no_such_attention")
    with pytest.raises(UnknownComponentError) as ei:
        GPT(cfg)
    msg = str(ei.value)
    assert "\n" not in msg and "no_such_attention" in msg
    for name in ("gqa", "mha", "mqa", "sliding"):
        assert name in msg


def test_unknown_name_is_a_config_error_for_the_cli():
    reg = Registry("widget")
    with pytest.raises(UnknownComponentError) as ei:
        reg.get("nope")
    assert isinstance(ei.value, ConfigError)


def test_duplicate_registration():
    reg = Registry("widget")

    def f():
        return 1

    def g():
        return 2

    reg.register("x")(f)
    reg.register("x")(f)  # re-registering the same object (e.g. a module imported twice) is fine
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(g)
    assert reg.get("x") is f


def test_user_attention_from_temporary_module(tmp_path, monkeypatch):
    name = f"test_attn_{uuid.uuid4().hex[:8]}"
    modname = f"user_attn_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{modname}.py").write_text(
        textwrap.dedent(
            f"""
            import torch.nn as nn
            from microgpt.registry import ATTENTION

            @ATTENTION.register({name!r})
            class ScaledIdentityAttention(nn.Module):
                # no mixing across positions: y = proj(x)
                def __init__(self, cfg):
                    super().__init__()
                    self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
                    self.calls = 0

                def forward(self, x, rot=None, cache=None):
                    self.calls += 1
                    return self.proj(x)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        mod = importlib.import_module(modname)
        assert name in ATTENTION.names()
        cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, attention=name)
        model = GPT(cfg).eval()
        for blk in model.blocks:
            assert type(blk.attn) is mod.ScaledIdentityAttention
        idx = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(0))
        logits = model(idx)
        assert logits.shape == (2, 6, 13)
        assert [b.attn.calls for b in model.blocks] == [1, 1]  # the user module ran in the forward
        # it does not mix positions: changing the first token changes the first position's logits only
        idx2 = idx.clone()
        idx2[:, 0] = (idx2[:, 0] + 1) % 13
        changed = (model(idx2) - logits).abs().amax(dim=(0, 2))
        assert changed[0] > 0 and torch.all(changed[1:] == 0)
    finally:
        ATTENTION._entries.pop(name, None)
        sys.modules.pop(modname, None)
