"""Front end, part 1: load a model from a local Hugging Face directory, a saved .pt2
ExportedProgram, or a Python factory (`file.py:factory` or `module:factory`)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
from pathlib import Path

import torch

from edgepack.errors import InputError
from edgepack.stages import LoadedModel
from edgepack.exporters.architectures import family_for, linearize, model_facts
from edgepack.exporters.tokenizer import read_tokenizer


def load_source(source: str, *, name: str | None = None, no_tokenizer: bool = False) -> LoadedModel:
    path = Path(source)
    if path.is_dir():
        return load_hf_dir(path, source, name=name, no_tokenizer=no_tokenizer)
    if path.suffix == ".pt2":
        if not path.is_file():
            raise InputError(f"{source}: no such file", hint="pass the path of a file written by torch.export.save")
        return load_pt2(path, source, name=name)
    if ":" in source and not path.exists():
        return load_factory(source, name=name)
    raise InputError(
        f"{source}: no such model directory or file",
        hint="pass a local Hugging Face model directory, a .pt2 file, or file.py:factory / module:factory",
    )


def _bundle_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


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
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    auto = getattr(transformers, family.auto_class)
    try:
        model = auto.from_pretrained(str(path), config=config, local_files_only=True, trust_remote_code=False,
                                     use_safetensors=True, dtype=torch.float32)
    except Exception as e:
        raise InputError(f"{path}: transformers could not load the model: {e}") from e
    linearize(model).eval().requires_grad_(False)  # inference only: no autograd state in any export
    facts = model_facts(family, config)
    tokenizer = None if no_tokenizer else read_tokenizer(path, config, check_runner=family.task == "causal-lm")
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
        spec.loader.exec_module(module)
        weight_files = ((file.name, _sha256(file)),)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise InputError(f"{source}: cannot import module {target!r} ({e})") from e
        weight_files = ()
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"{source}: {attr!r} is not a function in {target}")
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
