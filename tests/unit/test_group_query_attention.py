"""The ONNX backend's fused attention: the torch model of GroupQueryAttention that the eager paths
run is what ONNX Runtime's op computes (the op itself, built into a one-node graph), with and
without a window, soft-cap and rotary embedding, for a prompt and a decode step; and a family's
rotary is handed to the op only where it is the halves-rotated kind the op computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepack.exporters.onnx.group_query_attention import _attend
from edgepack.exporters.rotary import rotate, rotates_halves

HEADS, KV_HEADS, DIM = 6, 2, 16


def _session(window: int, softcap: float, rotary: bool):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = ["q", "k", "v", "past_k", "past_v", "seqlens", "total"] + (["cos", "sin", "positions"] if rotary else [])
    node = helper.make_node("GroupQueryAttention", inputs, ["out", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=HEADS, kv_num_heads=KV_HEADS, scale=DIM ** -0.5, softcap=softcap,
                            local_window_size=window, do_rotary=int(rotary), rotary_interleaved=0)
    f = TensorProto.FLOAT
    info = [helper.make_tensor_value_info("q", f, [1, "t", HEADS * DIM]),
            helper.make_tensor_value_info("k", f, [1, "t", KV_HEADS * DIM]),
            helper.make_tensor_value_info("v", f, [1, "t", KV_HEADS * DIM]),
            helper.make_tensor_value_info("past_k", f, [1, KV_HEADS, "p", DIM]),
            helper.make_tensor_value_info("past_v", f, [1, KV_HEADS, "p", DIM]),
            helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    if rotary:
        info += [helper.make_tensor_value_info("cos", f, ["r", DIM // 2]), helper.make_tensor_value_info("sin", f, ["r", DIM // 2]),
                 helper.make_tensor_value_info("positions", TensorProto.INT64, [1, "t"])]
    graph = helper.make_graph([node], "gqa", info, [helper.make_tensor_value_info(n, f, None) for n in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("past, new", [(0, 5), (9, 1), (9, 3)])
@pytest.mark.parametrize("window, softcap, rotary", [(-1, 0.0, False), (4, 0.0, False), (-1, 20.0, False), (4, 0.0, True)])
def test_the_torch_model_computes_what_onnxruntimes_op_does(past, new, window, softcap, rotary):
    generator = torch.Generator().manual_seed(past * 10 + new)
    q, k, v = (torch.randn(1, n, new, DIM, generator=generator) for n in (HEADS, KV_HEADS, KV_HEADS))
    past_k, past_v = (torch.randn(1, KV_HEADS, past, DIM, generator=generator) for _ in range(2))
    angles = (torch.arange(past, past + new).float()[:, None] / 10 ** torch.linspace(0, 3, DIM // 2)).repeat(1, 2)[None]
    cos_sin = (angles.cos(), angles.sin()) if rotary else None
    out, present_k, present_v = _attend(q, k, v, past_k, past_v, DIM ** -0.5, softcap, window, cos_sin)

    def rows(x):
        return x.transpose(1, 2).reshape(1, new, -1).numpy()

    feeds = {"q": rows(q), "k": rows(k), "v": rows(v), "past_k": past_k.numpy(), "past_v": past_v.numpy(),
             "seqlens": np.array([past + new - 1], np.int32), "total": np.array(past + new, np.int32)}
    if rotary:  # this call's rows padded to the total, read at 0 .. new - 1 (as the export feeds them)
        pad = np.zeros((past, DIM // 2), np.float32)
        feeds |= {"cos": np.concatenate([cos_sin[0][0, :, :DIM // 2].numpy(), pad]),
                  "sin": np.concatenate([cos_sin[1][0, :, :DIM // 2].numpy(), pad]),
                  "positions": np.arange(new)[None]}
    ort_out, ort_k, ort_v = _session(window, softcap, rotary).run(None, feeds)
    np.testing.assert_allclose(ort_out, out.numpy(), atol=2e-6)
    np.testing.assert_allclose(ort_k, present_k.numpy(), atol=2e-6)
    np.testing.assert_array_equal(ort_v, present_v.numpy())
    if window > 0 and past + new > window:  # the window hides keys: without it the answer differs
        unwindowed, _, _ = _attend(q, k, v, past_k, past_v, DIM ** -0.5, softcap, -1, cos_sin)
        assert not torch.allclose(unwindowed, out, atol=1e-3)


def test_only_halves_rotated_rotary_is_handed_to_the_op():
    from transformers.models.llama import modeling_llama

    assert rotates_halves(modeling_llama.apply_rotary_pos_emb)
    assert not rotates_halves(None)

    def interleaved(q, k, cos, sin):  # GPT-J's pairs (0, 1), (2, 3) ...: not what the op computes here
        def turn(x):
            return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
        return q * cos.unsqueeze(1) + turn(q) * sin.unsqueeze(1), k * cos.unsqueeze(1) + turn(k) * sin.unsqueeze(1)

    assert not rotates_halves(interleaved)
    x, angles = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 4).repeat(1, 1, 2)
    assert torch.allclose(rotate(x, angles.cos(), angles.sin()),
                          modeling_llama.apply_rotary_pos_emb(x, x, angles.cos(), angles.sin())[0])


def test_partial_rotary_turns_only_its_features():
    from transformers.models.llama import modeling_llama

    x, angles = torch.randn(1, 2, 3, 16), torch.randn(1, 3, 4).repeat(1, 1, 2)
    turned = rotate(x, angles.cos(), angles.sin())
    expected = modeling_llama.apply_rotary_pos_emb(x[..., :8], x[..., :8], angles.cos(), angles.sin())[0]
    assert torch.allclose(turned[..., :8], expected) and torch.equal(turned[..., 8:], x[..., 8:])
