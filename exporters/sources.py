"""Front end, part 1: load a model from a local Hugging Face directory, a GGUF file, a saved .pt2
ExportedProgram, or a Python factory (`file.py:factory` or `module:factory`), and refuse what
would export wrongly: missing or unexpected tensors, non-finite weights, a tokenizer beyond the
vocabulary, a config of the wrong shape."""

from __future__ import annotations

import atexit
import hashlib
import importlib
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from edgepack.errors import InputError
from edgepack.exporters.architectures import family_for, linearize, model_facts
from edgepack.exporters.tokenizer import read_tokenizer
from edgepack.stages import LoadedModel


def load_source(source: str, *, name: str | None = None, no_tokenizer: bool = False) -> LoadedModel:
    path = Path(source)
    if path.is_dir():
        loaded = load_hf_dir(path, source, name=name, no_tokenizer=no_tokenizer)
    elif path.suffix == ".gguf":
        loaded = load_gguf(path, source, name=name, no_tokenizer=no_tokenizer)
    elif path.suffix == ".pt2":
        if not path.is_file():
            raise InputError(f"{source}: no such file", hint="pass the path of a file written by torch.export.save")
        loaded = load_pt2(path, source, name=name)
    elif ":" in source and not path.exists():
        loaded = load_factory(source, name=name)
    elif HUB_ID.fullmatch(source) and not path.exists():
        loaded = load_hub(source, name=name, no_tokenizer=no_tokenizer)
    elif path.is_file() and (path.parent / "config.json").is_file():
        raise InputError(f"{source}: is a file inside a model folder; edgepack reads the whole folder",
                         hint=f"pass the folder: edgepack export {path.parent}")
    elif path.exists():
        raise InputError(f"{source}: not a model edgepack can read",
                         hint="pass a local Hugging Face model directory, a .pt2 file, or file.py:factory / module:factory")
    else:
        raise InputError(
            f"{source}: no such model directory or file",
            hint="pass a local Hugging Face model directory, a hub id in the local cache (ORG/NAME[@REVISION]), "
                 "a .gguf or .pt2 file, or file.py:factory / module:factory",
        )
    check_finite(loaded.module, source)
    return loaded


def _bundle_name(text: str) -> str:
    """A bundle name from a file or folder name: runs of anything but letters (any script),
    digits, '.', '_' and '-' become '-'."""
    return re.sub(r"[^\w.-]+", "-", text).strip("-.") or "model"


def check_finite(module: torch.nn.Module, source: str) -> None:
    """Refuse a model with NaN or infinite weights before any work: every artifact made from it
    would be wrong, and the golden answers recorded from it too."""
    bad = [(name, int((~torch.isfinite(t)).sum())) for name, t in module.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        listed = ", ".join(f"{name} ({count} values)" for name, count in bad[:5])
        raise InputError(f"{source}: {len(bad)} weight tensor(s) hold NaN or infinite values: {listed}"
                         + (" ..." if len(bad) > 5 else ""),
                         hint="re-copy the weights from the original model; a checkpoint saved after a diverged "
                              "training step cannot be exported")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_safetensors(files: list[Path]) -> None:
    """Read every weight file's header before transformers does, so a corrupt or truncated file
    is named in the error instead of surfacing as a stack trace from deep inside loading."""
    for file in files:
        size = file.stat().st_size
        try:
            with file.open("rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if not 0 < header_len <= size - 8:
                    raise ValueError(f"header length {header_len} does not fit in {size} bytes")
                header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{file}: corrupt safetensors file ({e})",
                             hint="re-copy the weights from the original model") from e
        if 8 + header_len + end != size:
            raise InputError(f"{file}: truncated safetensors file ({size} bytes, its header says {8 + header_len + end})",
                             hint="re-copy the weights from the original model")


def load_hf_dir(path: Path, source: str, *, name: str | None, no_tokenizer: bool) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path}: no config.json", hint="pass a Hugging Face model directory (config.json, *.safetensors, tokenizer files)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise InputError(f"{config_file}: holds a JSON {type(raw).__name__}, not an object",
                         hint="restore the model's own config.json")
    family = family_for(raw.get("model_type"), str(config_file))
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise InputError(
            f"{path}: no *.safetensors weights" + (f" (found {', '.join(found)})" if found else ""),
            hint="edgepack never unpickles weights; convert them with `save_pretrained(..., safe_serialization=True)`",
        )
    _check_safetensors(weights)

    import transformers

    transformers.utils.logging.disable_progress_bar()  # edgepack shows its own progress
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        facts = model_facts(family, config)
    except Exception as e:  # transformers' own validation: wrong types, missing or contradictory fields
        raise InputError(f"{config_file}: not a valid {family.name} config: {_first_line(e)}",
                         hint="restore the model's own config.json") from e
    auto = getattr(transformers, family.auto_class)
    try:
        model, info = auto.from_pretrained(str(path), config=config, local_files_only=True, trust_remote_code=False,
                                           use_safetensors=True, dtype=torch.float32, output_loading_info=True)
    except Exception as e:
        raise InputError(f"{path}: transformers could not load the model: {_first_line(e)}") from e
    check_loading(info, path, family.auto_class)
    linearize(model).eval().requires_grad_(False)  # inference only: no autograd state in any export
    tokenizer = None if no_tokenizer else read_tokenizer(path, config, check_runner=family.task == "causal-lm",
                                                         model_rows=model.get_input_embeddings().num_embeddings)
    return LoadedModel(
        name=name or _bundle_name(path.resolve().name),
        source=source,
        source_kind="hf-dir",
        task=family.task,
        module=model,
        parameter_count=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        weight_files=tuple((w.name, _sha256(w)) for w in weights),
        facts=facts,
        tokenizer=tokenizer,
    )


# ORG/NAME[@REVISION], as the Hub names models (a path that exists is read as a path first)
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


def load_hub(source: str, *, name: str | None, no_tokenizer: bool) -> LoadedModel:
    """A hub id, from the local Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub) only, resolved
    by huggingface_hub as transformers resolves it: a branch or tag through the cache's refs, a
    commit by its snapshot. edgepack never downloads: a model not in the cache is an input error."""
    from dataclasses import replace

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    match = HUB_ID.fullmatch(source)
    repo, revision = match["repo"], match["revision"] or "main"
    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as e:
        raise InputError(f"{source}: no such model directory, and {repo} at {revision!r} is not in the Hugging Face "
                         f"cache {constants.HF_HUB_CACHE}",
                         hint=f"edgepack never downloads: fetch it first (`hf download {repo}"
                              f"{'' if revision == 'main' else f' --revision {revision}'}`), or point HF_HUB_CACHE "
                              f"(or HF_HOME) at the cache that has it") from e
    loaded = load_hf_dir(folder, source, name=name or _bundle_name(repo.split("/")[1]), no_tokenizer=no_tokenizer)
    return replace(loaded, source_kind="hub", hub={"repo_id": repo, "revision": revision, "commit": folder.name})


def load_gguf(path: Path, source: str, *, name: str | None, no_tokenizer: bool) -> LoadedModel:
    """A .gguf file, through a Hugging Face directory written for this process (gguf_source)."""
    from dataclasses import replace

    from edgepack.exporters.gguf_source import convert_gguf, stored_types

    work = Path(tempfile.mkdtemp(prefix="edgepack-gguf-"))
    atexit.register(shutil.rmtree, work, True)  # the tokenizer files are read again when packaging
    loaded = load_hf_dir(convert_gguf(path, work / "model"), source, name=name or _bundle_name(path.stem),
                         no_tokenizer=no_tokenizer)
    return replace(loaded, source_kind="gguf", weight_files=((path.name, _sha256(path)),),
                   source_quantization=stored_types(path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def check_loading(info: dict, path: Path, auto_class: str) -> None:
    """Every parameter must come from the checkpoint: a missing tensor would be randomly
    initialised and exported as if it were the model, and an unexpected one means the weights
    belong to another architecture than config.json says."""
    problems = {kind: sorted(info.get(key) or ()) for kind, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("of the wrong shape", "mismatched_keys"))}
    problems = {kind: names for kind, names in problems.items() if names}
    if not problems:
        return
    listed = "; ".join(f"{len(names)} {kind}: {', '.join(map(str, names[:4]))}{' ...' if len(names) > 4 else ''}"
                       for kind, names in problems.items())
    raise InputError(f"{path}: the weights do not match the model config.json describes ({auto_class}); {listed}",
                     hint="the safetensors files and config.json must come from the same model; edgepack never "
                          "exports randomly initialised weights")


def load_pt2(path: Path, source: str, *, name: str | None) -> LoadedModel:
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise InputError(f"{path}: not a readable torch.export program ({e})") from e
    example = program.example_inputs
    if example is None:
        raise InputError(f"{path}: the program was saved without example inputs",
                         hint="save it from torch.export.export(...) with example args")
    args, kwargs = example
    if kwargs:
        raise InputError(f"{path}: keyword inputs are not supported", hint="export with positional inputs only")
    module = program.module()
    return LoadedModel(
        name=name or _bundle_name(path.stem),
        source=source,
        source_kind="pt2",
        task="module",
        module=module,
        parameter_count=sum(p.numel() for p in program.state_dict.values() if isinstance(p, torch.nn.Parameter)),
        weight_files=((path.name, _sha256(path)),),
        example_inputs=tuple(args),
        dynamic_shapes=None,
    )


@contextmanager
def _user_code(source: str, doing: str):
    """The user's factory code failing is the user's error (exit 2), reported at its own file and
    line, not as a bug in edgepack."""
    try:
        yield
    except Exception as e:
        raise InputError(f"{source}: {doing} the factory failed: {_where_in_user_code(e)}",
                         hint="fix the factory and run again (--verbose shows the full traceback)") from e


def _where_in_user_code(error: Exception) -> str:
    """'file:line: Type: message' at the innermost frame outside Python's and edgepack's own code."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}: SyntaxError: {error.msg}"
    import edgepack
    import edgepack.packaging

    ours = (Path(edgepack.__file__).parent, Path(__file__).parent, Path(next(iter(edgepack.packaging.__path__))))
    library = (str(Path(torch.__file__).parents[1]), sys.prefix, sys.base_prefix, *(f"{p.resolve()}/" for p in ours))
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(library) and not f.filename.startswith("<frozen")]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    return f"{where}{type(error).__name__}: {_first_line(error)}"


def load_factory(source: str, *, name: str | None) -> LoadedModel:
    """`file.py:factory` or `module:factory`; the factory returns (module, example_inputs) or
    (module, example_inputs, dynamic_shapes)."""
    target, _, attr = source.rpartition(":")
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise InputError(f"{target}: no such file", hint="file.py:factory names a Python file and a function in it")
        spec = importlib.util.spec_from_file_location(f"edgepack_factory_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        with _user_code(source, "loading"):
            spec.loader.exec_module(module)
        weight_files = ((file.name, _sha256(file)),)
    else:
        try:
            module = importlib.util.find_spec(target)
        except (ImportError, ValueError) as e:
            raise InputError(f"{source}: cannot import module {target!r} ({e})") from e
        if module is None:
            raise InputError(f"{source}: no module named {target!r}",
                             hint="use file.py:factory for a file, or make the module importable (PYTHONPATH)")
        with _user_code(source, "importing"):
            module = importlib.import_module(target)
        weight_files = ()
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"{source}: {attr!r} is not a function in {target}")
    with _user_code(source, "calling"):
        made = factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3) or not isinstance(made[0], torch.nn.Module):
        raise InputError(f"{source}: the factory must return (module, example_inputs[, dynamic_shapes])")
    model, inputs = made[0].eval(), tuple(made[1])
    return LoadedModel(
        name=name or _bundle_name(Path(target).stem if target.endswith(".py") else attr),
        source=source,
        source_kind="factory",
        task="module",
        module=model,
        parameter_count=sum(p.numel() for p in model.parameters()),
        weight_files=weight_files,
        example_inputs=inputs,
        dynamic_shapes=made[2] if len(made) == 3 else None,
    )
