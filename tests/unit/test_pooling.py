"""Sentence pooling computes what sentence-transformers computes."""

from __future__ import annotations

import torch
from transformers import AutoModel

from edgepack.exporters.decoder import EncoderOutput


def test_pooling_computes_the_sentence_transformers_embedding(bert_dir):
    model = AutoModel.from_pretrained(bert_dir).eval()
    ids = torch.tensor([[2, 40, 41, 42, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = EncoderOutput(model, "mean")(ids, mask)
        cls = EncoderOutput(model, "cls")(ids, mask)
        tokens = EncoderOutput(model, "none")(ids, mask)
    assert torch.allclose(mean, hidden[:, :5].mean(1), atol=1e-6)  # padding does not count
    assert torch.equal(cls, hidden[:, 0]) and torch.equal(tokens, hidden)

