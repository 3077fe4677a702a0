"""Quality on text: how much a decoder LM's artifact loses against the fp32 model, measured as
perplexity on an evaluation text run through the artifact's own runtime the way an app decodes.

Each document of the text is cut into windows of at most WINDOW tokens (and the KV cache); each
window is a new sequence from position 0: its first PREFILL tokens go in one call (the prompt,
through the artifact's prefill path), then one token per call through the KV cache, each call's
logits scoring the next token (teacher forcing). fp32 is Hugging Face's own forward of the
loaded model on the same windows, scored on the same tokens. The built-in text
(edgepack/eval_text.txt) mixes prose in several languages, code and dialogue, and is kept apart
from every calibration text."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import edgepack
from edgepack.cases import MethodCall
from edgepack.errors import InputError

BUILT_IN = Path(edgepack.__file__).parent / "eval_text.txt"
DOCUMENT_SEPARATOR = "\n---\n"  # a line holding only '---' separates documents
WINDOW = 512
PREFILL = 32
MIN_SCORED = 64  # fewer scored tokens than this measure nothing

# The default gates, from measurements on the real SmolLM2-135M-Instruct (docs/quantization.md):
# its int4 artifacts land 23-38 % above fp32 perplexity with the default precision plan, while
# broken artifacts (a wrong cache, a lost norm, a collapsed quantization grid) multiply it
# several times.
DEFAULT_MAX_INCREASE_PCT = 50.0
WARN_INCREASE_PCT = 15.0
# The bits a quantized weight may average when the decoder precision plan keeps layers int8
# (exporters/decoder_precision.py): int4 g32 with fp16 scales is 4.5; 5.0 (about 11 % more
# bytes) kept 76 of SmolLM2-135M's 211 layers int8 (measured: docs/quantization.md).
DEFAULT_BITS_PER_WEIGHT = 5.0


@dataclass(frozen=True)
class EvalText:
    """The evaluation text, tokenized, with fp32's per-token answers."""

    source: str
    sha256: str
    prefill: int
    windows: tuple[np.ndarray, ...]  # int64 token ids, each a sequence from position 0
    fp32_nll: tuple[np.ndarray, ...]  # per window: -log p(token) for tokens[prefill:]
    fp32_top1: tuple[np.ndarray, ...]  # per window: fp32's greedy choice at each scored position

    @property
    def scored_tokens(self) -> int:
        return sum(n.size for n in self.fp32_nll)

    def record(self) -> dict:
        """Every field as JSON (the stage cache's form; floats round-trip exactly)."""
        return {"source": self.source, "sha256": self.sha256, "prefill": self.prefill,
                **{name: [a.tolist() for a in getattr(self, name)] for name in ("windows", "fp32_nll", "fp32_top1")}}

    @classmethod
    def from_record(cls, r: dict) -> "EvalText":
        def arrays(name: str, dtype) -> tuple[np.ndarray, ...]:
            return tuple(np.array(a, dtype=dtype) for a in r[name])

        return cls(r["source"], r["sha256"], r["prefill"], arrays("windows", np.int64), arrays("fp32_nll", np.float64),
                   arrays("fp32_top1", np.int64))


def read_eval_text(path: Path | None) -> tuple[str, str]:
    """The text and where it came from; a bad file fails before any slow step."""
    source = "built-in (edgepack/eval_text.txt)" if path is None else str(path)
    file = BUILT_IN if path is None else path
    if not file.is_file():
        raise InputError(f"--eval-text {path}: no such file", hint="give a UTF-8 text file (documents separated by a line '---')")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--eval-text {path}: not UTF-8 text ({e})") from e
    if len(text.split()) < 50:
        raise InputError(f"--eval-text {path}: {len(text.split())} words; at least 50 are needed to measure anything",
                         hint="give a few thousand tokens of text like the app's")
    return text, source


def windows_of(ids: list[list[int]], limit: int, prefill: int) -> list[np.ndarray]:
    """Each document's ids cut into consecutive windows of at most `limit` tokens; a tail too short
    to score anything after the prefill is dropped."""
    out = []
    for doc in ids:
        for start in range(0, len(doc), limit):
            window = doc[start:start + limit]
            if len(window) > prefill + 1:
                out.append(np.array(window, dtype=np.int64))
    return out


def prepare_eval_text(model, encode: Callable[[str], list[int]], text: str, source: str, max_seq_len: int) -> EvalText:
    """Tokenize the documents and score them with the fp32 model (`model`: the Hugging Face causal
    LM, called as model(input_ids).logits)."""
    documents = [d.strip("\n") for d in text.split(DOCUMENT_SEPARATOR) if d.strip()]
    limit = min(WINDOW, max_seq_len)
    prefill = min(PREFILL, limit // 4)  # a short cache keeps most of each window scored
    windows = windows_of([encode(d) for d in documents], limit, prefill)
    nll, top1 = score_in_eager(model, windows, prefill)
    scored = sum(n.size for n in nll)
    if scored < MIN_SCORED:
        raise InputError(f"the evaluation text ({source}) gives {scored} scored tokens at --max-seq-len {max_seq_len}; "
                         f"at least {MIN_SCORED} are needed", hint="give a longer --eval-text")
    return EvalText(source, hashlib.sha256(text.encode("utf-8")).hexdigest(), prefill, tuple(windows),
                    tuple(nll), tuple(top1))


def score_in_eager(model, windows, prefill: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per window, -log p(token) of the tokens after `prefill` and the greedy choice at each, from
    one forward pass of `model` (a Hugging Face causal LM) over the whole window."""
    import torch

    nll, top1 = [], []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=torch.from_numpy(window)[None]).logits[0, prefill - 1:-1].double()
            targets = torch.from_numpy(window[prefill:])
            nll.append((-torch.log_softmax(logits, -1)[torch.arange(targets.numel()), targets]).numpy())
            top1.append(logits.argmax(-1).numpy())
    return nll, top1


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def measure(call: MethodCall, text: EvalText, on_window: Callable[[int], None] | None = None) -> dict:
    """Perplexity of the artifact behind `call` (forward(tokens [1, T], input_pos [1]) -> logits
    [1, vocab]) on the text, against fp32 on the same tokens."""
    nll, agree, non_finite = [], 0, 0
    for i, window in enumerate(text.windows):
        if on_window:
            on_window(i)
        logits = call("forward", [window[None, :text.prefill], np.array([0], dtype=np.int64)])[0]
        for pos in range(text.prefill, window.size):
            row = np.asarray(logits, dtype=np.float32).reshape(-1)
            if not np.isfinite(row).all():
                non_finite += 1
                nll.append(math.inf)
            else:
                nll.append(-_log_softmax(row)[window[pos]])
                agree += int(row.argmax() == text.fp32_top1[i][pos - text.prefill])
            if pos + 1 < window.size:
                logits = call("forward", [window[None, pos:pos + 1], np.array([pos], dtype=np.int64)])[0]
    fp32 = float(np.concatenate(text.fp32_nll).mean())
    mean = float(np.mean(nll))
    ppl, ppl_fp32 = math.exp(min(mean, 700.0)), math.exp(fp32)
    return {
        "text": text.source,
        "text_sha256": text.sha256,
        "windows": len(text.windows),
        "prefill": text.prefill,
        "scored_tokens": len(nll),
        # Rounded to what the measurement supports: ExecuTorch's figure moves by ~2e-5 of itself
        # between thread counts (measured on the demo model), and the manifest's bytes must not.
        "perplexity": float(f"{ppl:.4g}") if math.isfinite(mean) else None,
        "perplexity_fp32": float(f"{ppl_fp32:.4g}"),
        "increase_pct": round((ppl / ppl_fp32 - 1) * 100, 1) if math.isfinite(mean) else None,
        "delta_nats_per_token": round(mean - fp32, 4) if math.isfinite(mean) else None,
        "top1_agreement": round(agree / len(nll), 4),
        "non_finite_steps": non_finite,
    }


def judge(metrics: dict, max_increase_pct: float) -> tuple[list[str], list[str]]:
    """(failures, warnings) of one artifact's text metrics under the gates."""
    if "error" in metrics:
        return [f"the evaluation text did not run: {metrics['error']}"], []
    if metrics["non_finite_steps"]:
        return [f"{metrics['non_finite_steps']} of {metrics['scored_tokens']} decode steps gave non-finite logits "
                f"(NaN or infinity) on the evaluation text"], []
    rise = metrics["increase_pct"]
    change = (f"perplexity {metrics['perplexity']} vs fp32 {metrics['perplexity_fp32']} ({rise:+.1f} %, "
              f"{metrics['delta_nats_per_token']:+.4f} nats/token, greedy agreement {metrics['top1_agreement']:.1%}) "
              f"on {metrics['scored_tokens']} tokens")
    if rise > max_increase_pct:
        return [f"{change}: more than the {max_increase_pct:g} % allowed (--max-ppl-increase)"], []
    if rise > min(WARN_INCREASE_PCT, max_increase_pct):
        return [], [f"{change}: a visible loss (warned above {WARN_INCREASE_PCT:g} %)"]
    return [], []


def measure_bundle(bundle: Path, manifest: dict, text: EvalText, on_step: Callable[[str], None] | None = None,
                   backends: list[str] | None = None) -> dict[str, dict]:
    """Every artifact of a staged bundle (or those named) on the text, each through its host
    runtime. A runtime that cannot run the text is recorded as that artifact's error."""
    from edgepack.exporters.registry import BACKENDS

    results = {}
    for artifact in manifest["artifacts"]:
        backend = artifact["backend"]
        if backends is not None and backend not in backends:
            continue
        if on_step:
            on_step(backend)
        try:
            results[backend] = measure(BACKENDS[backend].host_call(bundle / artifact["path"], artifact), text)
        except Exception as e:  # noqa: BLE001 - the artifact failing to run is its verdict, not a crash
            results[backend] = {"text": text.source, "error": f"{type(e).__name__}: {e}"}
    return results
