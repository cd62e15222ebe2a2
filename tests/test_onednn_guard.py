"""The private oneDNN operators of the fast path are checked before use (issue 18 item 6): schema and a tiny run."""

from __future__ import annotations

import torch

import dino.inference.fast as fast_module
from dino.inference import onednn


def test_checks_agree_with_the_installed_torch():
    assert fast_module._HAS_MKLDNN_LINEAR == onednn.LINEAR_OK and fast_module._HAS_ONEDNN_INT8 == onednn.INT8_OK
    if onednn.LINEAR_OK:  # every schema was compared: on, only when they are the ones the wrappers call
        for key, expected in onednn.EXPECTED_SCHEMAS.items():
            if key[0] == "mkldnn" or onednn.INT8_OK:
                assert str(onednn._overload(*key)._schema) == expected
    else:
        assert onednn.reason()


def test_a_changed_or_missing_operator_turns_the_path_off(monkeypatch):
    key = ("mkldnn", "_linear_pointwise", "binary")
    monkeypatch.setitem(
        onednn.EXPECTED_SCHEMAS, key, onednn.EXPECTED_SCHEMAS[key].replace("str attr", "str attr, int n")
    )
    monkeypatch.setattr(onednn, "_reasons", [])
    assert not onednn._schemas_match([key]) and "changed" in onednn.reason()
    missing = ("mkldnn", "_no_such_operator", "default")
    monkeypatch.setitem(onednn.EXPECTED_SCHEMAS, missing, "")
    assert not onednn._schemas_match([missing]) and "missing" in onednn.reason()


def test_the_wrappers_compute_f_linear():
    if not onednn.LINEAR_OK:
        return
    x, w, b, r = torch.randn(7, 16), torch.randn(12, 16), torch.randn(12), torch.randn(7, 12)
    packed = onednn.reorder_linear_weight(w, 7)
    torch.testing.assert_close(onednn.linear(x, packed, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        onednn.linear(x, packed, b, gelu=True),
        torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)),
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(
        onednn.linear_add(x, r, packed, b), r + torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5
    )
