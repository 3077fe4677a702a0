"""Run a saved .mlpackage on Linux, where there is no CoreML runtime: rebuild its MIL program from
the package's own files (coremltools' milproto front end reads model.mlmodel and weights/), then
evaluate it op by op in numpy (semantics in coreml_ops.py), with CoreML states carried across
calls. On macOS the host runtime is CoreML itself, through coremltools prediction.

The evaluator rounds every op's result to the dtype the program declares (fp16 in an fp16
program), so it shows what fp16 storage of activations, weights and the KV cache does to the
answers; the arithmetic inside each op is float32.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

import numpy as np

from edgepack.cases import MethodCall
from edgepack.errors import RuntimeUnavailableError
from edgepack.packaging.coreml_ops import OPS, StateSlot, UnsupportedMilOp


def load_program(path: Path):
    """The MIL program as stored in the package (not the converter's in-memory copy)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)


def _nptype(var):
    from coremltools.converters.mil.mil import types

    dtype = var.dtype
    return None if dtype is None or types.is_state(var.sym_type) else types.nptype_from_builtin(dtype)


def _as_declared(value, var):
    """Round an op's result to the dtype the program gives it (fp16 stays fp16)."""
    nptype = _nptype(var)
    if isinstance(value, str) or nptype is None:  # e.g. cast's dtype name
        return value
    array = np.asarray(value)
    return array.astype(nptype, copy=False) if nptype is not None and array.dtype != nptype else array


def _upcast(value):
    """Arithmetic in float32: fp16 operands are widened, results rounded back by _as_declared."""
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, np.floating) and value.dtype == np.float16:
        return np.float32(value)
    return value


class MilFunction:
    """One function of a MIL program, evaluated in numpy. States persist between calls."""

    def __init__(self, function):
        self.function = function
        unknown = sorted({op.op_type for op in function.operations if op.op_type != "const" and op.op_type not in OPS})
        if unknown:
            raise UnsupportedMilOp(f"the MIL evaluator has no numpy semantics for op type(s): {', '.join(unknown)}",
                                   hint="add them to packaging/coreml_ops.py OPS (with a test against torch)")
        if any(op.blocks for op in function.operations):
            raise UnsupportedMilOp("ops with nested blocks (cond, while_loop) are not supported by the MIL evaluator")
        from coremltools.converters.mil.mil import types

        self.input_names = [n for n, v in function.inputs.items() if not types.is_state(v.sym_type)]
        self.input_dtypes = {n: types.nptype_from_builtin(function.inputs[n].dtype) for n in self.input_names}
        self.states = {n: StateSlot(np.zeros(v.shape, dtype=types.nptype_from_builtin(v.sym_type.wrapped_type().get_primitive())))
                       for n, v in function.inputs.items() if types.is_state(v.sym_type)}
        self.output_names = [v.name for v in function.outputs]
        self.constants: dict[str, object] = {}
        self.ops = []
        for op in function.operations:
            if op.op_type == "const":
                self.constants[op.outputs[0].name] = _as_declared(op.outputs[0].val, op.outputs[0])
            elif op.op_type.startswith("constexpr_"):  # decompressed once: weights do not change
                self.constants.update(self._run(op, self.constants))
            else:
                self.ops.append(op)

    def _resolve(self, var, env):
        if var.name in env:
            return _upcast(env[var.name])
        if var.val is not None:
            return _upcast(var.val)
        raise KeyError(f"MIL evaluator: no value for {var.name}")

    def _run(self, op, env) -> dict:
        kwargs = {}
        for key, value in op.inputs.items():
            kwargs[key] = (tuple(self._resolve(v, env) for v in value) if isinstance(value, (list, tuple))
                           else self._resolve(value, env))
        try:
            result = OPS[op.op_type](**kwargs)
        except UnsupportedMilOp:
            raise
        except Exception as e:
            raise RuntimeError(f"MIL evaluator: {op.op_type} {op.name!r} failed: {type(e).__name__}: {e}") from e
        results = result if isinstance(result, tuple) else (result,)
        return {var.name: _as_declared(r, var) for var, r in zip(op.outputs, results)}

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        env = dict(self.constants)
        env.update(self.states)
        for name in self.input_names:
            env[name] = np.asarray(inputs[name]).astype(self.input_dtypes[name])
        for op in self.ops:
            env.update(self._run(op, env))
        return [np.asarray(env[n]) for n in self.output_names]

    def reset_states(self) -> None:
        for slot in self.states.values():
            slot.value = np.zeros_like(slot.value)


def mil_evaluator_host(path: Path, artifact: dict) -> MethodCall:
    program = load_program(path)
    functions = {method: MilFunction(program.functions[name]) for method, name in artifact["runtime"]["functions"].items()}

    def call(method: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        function = functions[method]
        return function(dict(zip(function.input_names, inputs)))

    return call


def coremltools_host(path: Path, artifact: dict) -> MethodCall:
    """macOS: the real CoreML runtime. (Not exercised on the Linux CI machines.)"""
    import coremltools as ct

    functions = artifact["runtime"]["functions"]
    models, states = {}, {}

    def call(method: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if method not in models:
            models[method] = ct.models.MLModel(str(path), function_name=functions[method])
            states[method] = models[method].make_state() if artifact["runtime"].get("states") else None
        model = models[method]
        spec = model.get_spec().description
        names = [i.name for i in spec.input]
        feeds = {n: np.asarray(x).astype(np.int32 if np.issubdtype(np.asarray(x).dtype, np.integer) else np.float32)
                 for n, x in zip(names, inputs)}
        out = model.predict(feeds, state=states[method]) if states[method] is not None else model.predict(feeds)
        return [np.asarray(out[o.name]) for o in spec.output]

    return call


def coreml_host(path: Path, artifact: dict) -> MethodCall:
    try:
        import coremltools  # noqa: F401
    except ImportError as e:
        raise RuntimeUnavailableError("coremltools is not installed", hint="pip install 'edgepack[coreml]'") from e
    return coremltools_host(path, artifact) if platform.system() == "Darwin" else mil_evaluator_host(path, artifact)
