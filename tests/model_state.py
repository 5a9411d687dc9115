"""Everything about a model that a removed (or refused) operator must leave as it found it.

:func:`snapshot` takes the state dict, the ``requires_grad`` flags, the module classes and every
module and parameter hook dict; :func:`assert_restored` compares a model with a snapshot, bitwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """State dict, flags, module classes and every hook dict of ``model``."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "hooks": [(n, a, list(getattr(m, a, {}))) for n, m in model.named_modules() for a in HOOK_DICTS],
        "param_hooks": [
            (n, list(p._backward_hooks or {}), list(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
            for n, p in model.named_parameters()
        ],
    }


def assert_restored(model: nn.Module, before: dict[str, Any]) -> None:
    now = snapshot(model)
    assert now["params"] == before["params"], "requires_grad flags or parameter names changed"
    assert now["classes"] == before["classes"], "module classes changed"
    assert now["hooks"] == before["hooks"], "a hook dict changed"
    assert now["param_hooks"] == before["param_hooks"], "a parameter hook changed"
    assert list(now["state"]) == list(before["state"]), "state-dict keys changed"
    for k, v in before["state"].items():
        assert torch.equal(now["state"][k], v), f"{k} changed"
