"""Activation checkpointing of the student's blocks: same gradients, same keys, less saved for backward."""

import copy

import pytest
import torch

from dino.models.vision_transformer import VisionTransformer
from dino.train.activation_checkpointing import _HOOK_OPTION, apply_activation_checkpointing
from dino.train.throughput import saved_for_backward


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, drop_path_rate=0.3, init_values=0.1
    )


def gradients_and_saved_bytes(model, x):
    torch.manual_seed(1)  # the same drop-path draws in every variant
    with saved_for_backward() as saved:
        loss = model(x).square().sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, saved()


def test_checkpointed_blocks_give_the_same_gradients_and_save_less():
    x = torch.randn(4, 3, 32, 32)
    reference, saved_none = gradients_and_saved_bytes(tiny_vit(), x)
    saved = {}
    for mode in ("full", "selective"):
        model = tiny_vit()
        keys = list(model.state_dict())
        apply_activation_checkpointing(model.blocks, mode)
        assert list(model.state_dict()) == keys
        grads, saved[mode] = gradients_and_saved_bytes(model, x)
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")
    # full keeps one input per block; selective keeps matmul/attention outputs but not the element-wise rest
    assert saved["full"] < saved_none
    if _HOOK_OPTION:  # older PyTorch hides what selective checkpointing keeps from saved-tensor hooks
        assert saved["full"] < saved["selective"] < saved_none


def test_checkpointing_survives_copies_and_reapplication():
    model = tiny_vit()
    apply_activation_checkpointing(model.blocks, "full")
    apply_activation_checkpointing(model.blocks, "selective")
    assert type(model.blocks[0]).__mro__[2] is type(tiny_vit().blocks[0])  # not wrapped twice
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b = twin(x)
    torch.testing.assert_close(a, b)
    with torch.no_grad():  # no gradients: the plain forward
        model(x)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="selective"):
        apply_activation_checkpointing(tiny_vit().blocks, "some")
