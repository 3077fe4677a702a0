"""The .gguf on llama.cpp (through llama-cpp-python, which builds the llama.cpp it vendors), behind
the golden cases' calling convention, and the check that the tokenizer written into the file is
the model's.

forward(tokens [1, T], input_pos [1]) -> logits [1, vocab]: llama.cpp keeps the KV cache itself;
a call at an earlier position rewinds it there (as an app's chat loop does on a new turn)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from edgepack.cases import MethodCall
from edgepack.errors import RuntimeUnavailableError, SmokeFailure

if TYPE_CHECKING:  # stages imports torch, which the emulated arm64 Python that runs this module lacks
    from edgepack.stages import TokenizerFacts


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise RuntimeUnavailableError("llama.cpp's Python binding (llama-cpp-python) is not installed",
                                      hint="make install builds it (pinned in pyproject.toml, a few minutes)") from e
    return llama_cpp


def runtime_version() -> str:
    return version("llama-cpp-python")


def load(path: Path, n_ctx: int, *, vocab_only: bool = False):
    """llama.cpp on one thread: its OpenMP threads spin against the other work of a 2-core machine
    (docs/limits.md). verbose=False keeps its load log off the terminal, as every stage's output is."""
    return _llama_cpp().Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, vocab_only=vocab_only,
                              logits_all=False, verbose=False, n_threads=1)


def llama_cpp_host(path: Path, artifact: dict) -> MethodCall:
    [method] = artifact["methods"]
    n_ctx = method["dynamic_dims"]["seq_len"]["max"] + 1
    llm = load(path, n_ctx)
    llama_cpp, vocab = _llama_cpp(), llm.n_vocab()

    def call(_: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        tokens, input_pos = inputs
        start = int(np.asarray(input_pos).reshape(-1)[0])
        if start > llm.n_tokens:
            raise SmokeFailure(f"forward at position {start} but llama.cpp's cache holds {llm.n_tokens} positions")
        llm.n_tokens = start  # eval drops the cache from n_tokens on
        llm.eval([int(t) for t in np.asarray(tokens).reshape(-1)])
        last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the batch's last position
        return [np.ctypeslib.as_array(last, shape=(vocab,)).astype(np.float32).reshape(1, -1)]

    return call


def check_embedded_tokenizer(path: Path, tok: TokenizerFacts) -> dict:
    """llama.cpp's tokenizer, read from the .gguf, against the model's (Hugging Face tokenizers) on
    the runner-check texts, special tokens in text included; and llama.cpp's end-of-generation set
    against every eos id the model names."""
    from tokenizers import Tokenizer

    from edgepack.exporters.tokenizer import ids_mismatch, runner_check_texts

    llama_cpp = _llama_cpp()
    reference = Tokenizer.from_file(str(Path(tok.directory) / "tokenizer.json"))
    llm = load(path, 64, vocab_only=True)
    texts = runner_check_texts(reference, (tok.bos_id, *tok.eos_ids, tok.pad_id))
    mismatches = []
    for text in texts:
        want = reference.encode(text, add_special_tokens=False).ids
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if got != want:
            mismatches.append(ids_mismatch(text, got, want))
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    not_stopping = [i for i in tok.eos_ids if not llama_cpp.llama_vocab_is_eog(vocab, i)]
    if not_stopping:
        mismatches.append({"text": "", "what": "eos", "runner": [], "reference": not_stopping,
                           "error": f"llama.cpp does not stop on eos id(s) {not_stopping}"})
    return {"runner": f"llama.cpp (llama-cpp-python {runtime_version()})", "texts": len(texts),
            "eos_ids_stop": not not_stopping, "passed": not mismatches, "mismatches": mismatches}


def quantize(source: Path, out: Path, mix: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize, as its llama-quantize tool) from `source`
    (F32) to `out` as the llama_ftype `mix`, on every core (nthread 0). A failure is the step's
    error (run_steps names it)."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{mix}")
    failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if failed or not out.exists():
        raise RuntimeError(f"llama.cpp's quantizer returned {failed} making {mix} from {source.name}")
