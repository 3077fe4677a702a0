"""`edgepack inspect` shows a method's tensors; a KV cache's two tensors a layer are one entry each."""

from edgepack.report import describe_tensors


def kv(prefix: str, layers: int, shape: list) -> list[dict]:
    return [{"name": f"{prefix}.{i}.{kind}", "dtype": "float32", "shape": shape} for i in range(layers) for kind in ("key", "value")]


def test_a_cache_of_thirty_layers_is_two_entries_in_order():
    past = [1, 3, "past_sequence_length", 64]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": [1, "sequence_length"]}, *kv("past_key_values", 30, past)]
    assert describe_tensors(inputs) == (
        "input_ids: int64[1, 'sequence_length'], past_key_values.{0..29}.key: float32[1, 3, 'past_sequence_length', 64], "
        "past_key_values.{0..29}.value: float32[1, 3, 'past_sequence_length', 64]")


def test_numbered_tensors_stay_apart_where_they_differ_or_are_few():
    two_layers = kv("present", 2, [1, 2, 8])
    assert describe_tensors(two_layers) == ", ".join(f"{t['name']}: float32[1, 2, 8]" for t in two_layers)
    odd = kv("past", 3, [1, 2, 8])
    odd[2]["shape"] = [1, 4, 8]  # layer 1's key differs: that run is not 0..n-1 any more
    assert describe_tensors(odd) == (
        "past.0.key: float32[1, 2, 8], past.{0..2}.value: float32[1, 2, 8], past.1.key: float32[1, 4, 8], past.2.key: float32[1, 2, 8]")
    assert describe_tensors([{"name": "fp32_logits", "dtype": "float32", "shape": [1, 5]}]) == "fp32_logits: float32[1, 5]"
