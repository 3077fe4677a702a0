"""Rewrites of the quantized graph into the shapes onnxruntime runs in fewer kernels: at a decode
step of a small model each node costs a kernel launch, so the node count, not the arithmetic,
sets much of the speed (onnxruntime-genai's own builder writes these ops directly).

- a residual Add followed by RMSNorm written as plain ops (Pow, ReduceMean, Add, Sqrt,
  Reciprocal, Mul, Mul) becomes one SkipSimplifiedLayerNormalization (com.microsoft), which
  returns both the sum and its norm: onnxscript's own fusion rules, kept to norms that read an
  Add, since a lone SimplifiedLayerNormalization is an onnxruntime op in the ONNX domain that
  onnx.checker rejects;
- Reshape(Reshape(x)) becomes one Reshape (onnxscript's rule), and a Reshape to the shape its
  input already has (attention's q, k, v split into heads and joined again) goes;
- a GroupQueryAttention whose query, key and value are the three parts of one Split (the fused
  q/k/v projection) reads the packed projection itself, as the op allows and the builder does.

Every rewrite is exact but for float rounding inside the fused norm."""

from __future__ import annotations


def _residual_rms_rules():
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions.rms_normalization import RmsNormFusion
    from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

    class ResidualRmsNorm(RmsNormFusion):
        """onnxscript's RMSNorm fusion, only where the norm reads an Add of two values of known
        shape (what the Skip fusion takes)."""

        def check(self, op, x, *args, **kwargs):
            producer = x.producer()
            if (producer is None or producer.op_type != "Add" or producer.domain not in ("", "ai.onnx")
                    or any(value is None or value.shape is None for value in producer.inputs)):
                return pattern.MatchResult().fail("the norm does not read an Add of known shapes", x)
            return super().check(op, x, *args, **kwargs)

    rms = pattern.RewriteRuleSet([ResidualRmsNorm.rule(f"ResidualRmsNorm{i}", _mul_order=order)
                                  for i, order in enumerate((False, True))])
    return rms, skip_rms_normalization_ruleset


def _drop_identity_reshapes(model) -> int:
    """Reshapes whose constant target is the shape their input already has (by the exporter's
    recorded shapes: equal where static, -1 at the one symbolic dimension)."""
    dropped = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        data, shape = node.inputs[0], node.inputs[1]
        if shape is None or shape.const_value is None or data.shape is None or node.outputs[0].is_graph_output():
            continue
        target = shape.const_value.numpy().tolist()
        dims = list(data.shape)
        symbolic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if len(target) != len(dims) or len(symbolic) > 1 or 0 in target:
            continue
        if all(t == d if isinstance(d, int) else t == -1 for t, d in zip(target, dims)):  # -1 only at the symbolic one
            node.outputs[0].replace_all_uses_with(data)
            dropped += 1
    return dropped


def _pack_attention_inputs(model) -> int:
    """GroupQueryAttention(q, k, v, ...) where q, k, v = Split(x) along the features with widths
    heads·D, kv_heads·D, kv_heads·D and read by nothing else -> GroupQueryAttention(x, "", "", ...)."""
    packed = 0
    for node in list(model.graph):
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        split = node.inputs[0].producer() if node.inputs[0] is not None else None
        if split is None or split.op_type != "Split" or list(node.inputs[:3]) != list(split.outputs):
            continue
        widths = split.inputs[1].const_value if len(split.inputs) > 1 and split.inputs[1] is not None else None
        axis, shape = split.attributes.get_int("axis", 0), split.inputs[0].shape
        last = axis == -1 or (shape is not None and axis == shape.rank() - 1)
        if widths is None or not last or any(len(v.uses()) != 1 for v in split.outputs):
            continue
        heads, kv_heads = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
        width = widths.numpy().tolist()
        if width[0] * kv_heads != width[1] * heads or width[1] != width[2]:
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        packed += 1
    return packed


def _rewrite(model, fuse_norms: bool):
    """(the ir model rewritten, how many of each rewrite, how many norms the RMS rule matched)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.rules.common import reshape_reshape_rule

    graph = ir.serde.deserialize_model(model)
    counts = {"reshape_pairs_folded": pattern.RewriteRuleSet([reshape_reshape_rule]).apply_to_model(graph)}
    counts["identity_reshapes_dropped"] = _drop_identity_reshapes(graph)
    common_passes.RemoveUnusedNodesPass()(graph)  # the dropped Reshapes still read the q, k, v parts
    counts["attention_inputs_packed"] = _pack_attention_inputs(graph)
    norms = fused = 0
    if fuse_norms:
        rms, skip = _residual_rms_rules()
        norms = rms.apply_to_model(graph)
        fused = skip.apply_to_model(graph) if norms else 0
    common_passes.RemoveUnusedNodesPass()(graph)
    return graph, {**counts, "skip_rms_norms_fused": fused}, norms


def fuse_for_onnxruntime(model) -> tuple[object, dict[str, int]]:
    """(the rewritten onnx.ModelProto, how many of each rewrite). A norm left unfused by the Skip
    rule would be an op onnx.checker rejects: then the rewrite is made again without the norms
    (`model` itself is never changed)."""
    import onnx_ir as ir

    graph, counts, norms = _rewrite(model, fuse_norms=True)
    if counts["skip_rms_norms_fused"] != norms:
        graph, counts, _ = _rewrite(model, fuse_norms=False)
    return ir.serde.serialize_model(graph), counts
