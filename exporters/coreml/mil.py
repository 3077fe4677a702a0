"""Run a saved .mlpackage on Linux, where there is no CoreML runtime: rebuild its MIL program from
the package's own files (coremltools' milproto front end reads model.mlmodel and weights/), then
evaluate it op by op in numpy (semantics in coreml_ops.py), with CoreML states carried across
calls. On macOS the host runtime is CoreML itself, through coremltools prediction.

The evaluator rounds every op's result to the dtype the program declares (fp16 in an fp16
program), so it shows what fp16 storage of activations, weights and the KV cache does to the
answers; the arithmetic inside each op is float32. Everything that depends on constants only
(the decompressed weights above all) is computed once, when the function is loaded, and kept
as float32 (fp16 values widened exactly): a call runs only the ops that read its inputs or states.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

import numpy as np

from edgepack.cases import MethodCall
from edgepack.errors import RuntimeUnavailableError
from edgepack.exporters.coreml.mil_ops import OPS, StateSlot, UnsupportedMilOp


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


def _as_computed(value, var):
    """The form the evaluator keeps a value in: rounded to its declared dtype, fp16 then widened
    to float32 (exactly; arithmetic is float32) so that every consumer need not widen it again."""
    return _upcast(_as_declared(value, var))


def _rounding(var):
    """_as_computed for one op output, with its declared dtype looked up once."""
    nptype = _nptype(var)
    if nptype is None:
        return None
    if nptype == np.float16:
        def to_fp16(value):
            if isinstance(value, str):
                return value
            array = np.asarray(value)
            return (array if array.dtype == np.float16 else array.astype(np.float16)).astype(np.float32)
        return to_fp16

    def to_declared(value):
        if isinstance(value, str):
            return value
        array = np.asarray(value)
        return array if array.dtype == nptype else array.astype(nptype)
    return to_declared


# Ops whose fp16 result holds only values of their fp16 operands (moved, selected, stored): rounding
# it to fp16 changes no value, so only the layout the round trip leaves is reproduced (_moved_fp16),
# which spares two passes over every KV-cache tensor. A state only ever holds fp16 values.
_EXACT = frozenset({"reshape", "expand_dims", "squeeze", "transpose", "tile", "concat", "split", "stack",
                    "slice_by_index", "slice_update", "gather", "gather_nd", "gather_along_axis", "select",
                    "read_state", "coreml_update_state"})
# Ops with effects on states: never evaluated ahead of a call.
_STATEFUL = frozenset({"read_state", "coreml_update_state"})


def _moved_fp16(value):
    """The rounding of an _EXACT op's fp16 result: its values are fp16 already, so only the layout
    the round trip through fp16 would leave (astype keeps order 'K', as empty_like does) is made,
    by a copy only where that layout differs from the result's (e.g. a strided slice)."""
    array = np.asarray(value)
    if array.dtype != np.float32:
        return array.astype(np.float16).astype(np.float32)
    like = np.empty_like(np.empty_like(array, dtype=np.float16), dtype=np.float32)  # not filled: no cost
    if like.strides == array.strides:
        return array
    np.copyto(like, array)
    return like


def _exact(op) -> bool:
    """An _EXACT op whose float operands and results are all declared fp16."""
    if op.op_type not in _EXACT:
        return False
    def float_types(vars):
        return {t for t in map(_nptype, vars) if t is not None and np.issubdtype(t, np.floating)}
    operands = [v for value in op.inputs.values() for v in (value if isinstance(value, (list, tuple)) else (value,))]
    results = float_types(op.outputs)
    return results == {np.float16} and float_types(operands) <= {np.float16}


class MilFunction:
    """One function of a MIL program, evaluated in numpy. States persist between calls.

    At load the program is compiled once: constants (and everything computed from constants only,
    such as the decompressed weights of constexpr ops) are evaluated and kept in the evaluator's
    form (fp16 values widened to float32), every other op becomes a step reading numbered slots.
    A call then only runs the steps: each op sees exactly the operands it would see one op at a
    time, and each result is rounded to its declared dtype."""

    def __init__(self, function):
        self.function = function
        unknown = sorted({op.op_type for op in function.operations if op.op_type != "const" and op.op_type not in OPS})
        if unknown:
            raise UnsupportedMilOp(f"the MIL evaluator has no numpy semantics for op type(s): {', '.join(unknown)}",
                                   hint="add them to exporters/coreml/mil_ops.py OPS (with a test against torch)")
        if any(op.blocks for op in function.operations):
            raise UnsupportedMilOp("ops with nested blocks (cond, while_loop) are not supported by the MIL evaluator")
        from coremltools.converters.mil.mil import types

        self.input_names = [n for n, v in function.inputs.items() if not types.is_state(v.sym_type)]
        self.input_dtypes = {n: types.nptype_from_builtin(function.inputs[n].dtype) for n in self.input_names}
        # States hold fp16 values, kept widened like every other fp16 value.
        self.states = {n: StateSlot(_upcast(np.zeros(v.shape, dtype=types.nptype_from_builtin(v.sym_type.wrapped_type().get_primitive()))))
                       for n, v in function.inputs.items() if types.is_state(v.sym_type)}
        self.output_names = [v.name for v in function.outputs]
        self._output_types = [_nptype(v) for v in function.outputs]
        # name -> value (computed form) of every const op and every op that reads only constants
        self.constants: dict[str, object] = {}
        ops = []
        for op in function.operations:
            if op.op_type == "const":
                self.constants[op.outputs[0].name] = _as_computed(op.outputs[0].val, op.outputs[0])
            elif op.op_type not in _STATEFUL and all(v.name in self.constants for v in self._operands(op)):
                self.constants.update(self._run(op, self.constants))  # weights, masks of constants: once
            else:
                ops.append(op)
        self.ops = ops  # what a call runs, in order
        self._compile(ops)

    @staticmethod
    def _operands(op):
        for value in op.inputs.values():
            yield from (value if isinstance(value, (list, tuple)) else (value,))

    def _resolve(self, var, env):
        if var.name in env:
            return env[var.name]
        if var.name in self.states:
            return self.states[var.name]
        if var.val is not None:
            return _as_computed(var.val, var)
        raise KeyError(f"MIL evaluator: no value for {var.name}")

    def _run(self, op, env) -> dict:
        """One op, by name lookups (load time only; calls run the compiled steps)."""
        kwargs = {}
        for key, value in op.inputs.items():
            kwargs[key] = (tuple(self._resolve(v, env) for v in value) if isinstance(value, (list, tuple))
                           else self._resolve(value, env))
        results = self._call(op, kwargs)
        return {var.name: _as_computed(r, var) for var, r in zip(op.outputs, results)}

    @staticmethod
    def _call(op, kwargs) -> tuple:
        try:
            result = OPS[op.op_type](**kwargs)
        except UnsupportedMilOp:
            raise
        except Exception as e:
            raise RuntimeError(f"MIL evaluator: {op.op_type} {op.name!r} failed: {type(e).__name__}: {e}") from e
        return result if isinstance(result, tuple) else (result,)

    def _compile(self, ops) -> None:
        """Each op as (op, function, constant kwargs, [(key, slot)], [(key, ((is_slot, slot or value), ...))],
        [(slot, rounding)], slots to free after it). Slots: the inputs first, then every op result."""
        slot: dict[str, int] = {name: i for i, name in enumerate(self.input_names)}
        for op in ops:
            for var in op.outputs:
                slot[var.name] = len(slot)
        self._slot_count, self._slots = len(slot), slot

        def source(var):
            if var.name in slot:
                return True, slot[var.name]
            return False, self._resolve(var, self.constants)

        last_use: dict[int, int] = {}
        steps = []
        for index, op in enumerate(ops):
            fixed, single, multiple = {}, [], []
            for key, value in op.inputs.items():
                if isinstance(value, (list, tuple)):
                    parts = tuple(source(v) for v in value)
                    if any(is_slot for is_slot, _ in parts):
                        multiple.append((key, parts))
                    else:
                        fixed[key] = tuple(part for _, part in parts)
                    used = [part for is_slot, part in parts if is_slot]
                else:
                    is_slot, part = source(value)
                    if is_slot:
                        single.append((key, part))
                    else:
                        fixed[key] = part
                    used = [part] if is_slot else []
                for s in used:
                    last_use[s] = index
            exact = _exact(op)
            results = [(slot[var.name], _moved_fp16 if exact else _rounding(var)) for var in op.outputs]
            steps.append([op, OPS[op.op_type], fixed, single, multiple, results, ()])
        keep = {slot[n] for n in self.output_names if n in slot}
        frees: dict[int, list[int]] = {}
        for s, index in last_use.items():
            if s not in keep:
                frees.setdefault(index, []).append(s)
        for index, step in enumerate(steps):
            step[6] = tuple(frees.get(index, ()))
        self._steps = [tuple(step) for step in steps]
        self._input_slots = [(slot[n], n, self.input_dtypes[n]) for n in self.input_names]

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        values: list = [None] * self._slot_count
        for s, name, dtype in self._input_slots:
            values[s] = _upcast(np.asarray(inputs[name]).astype(dtype))
        for op, fn, fixed, single, multiple, results, frees in self._steps:
            kwargs = dict(fixed)
            for key, s in single:
                kwargs[key] = values[s]
            for key, parts in multiple:
                kwargs[key] = tuple(values[p] if is_slot else p for is_slot, p in parts)
            try:
                result = fn(**kwargs)
            except UnsupportedMilOp:
                raise
            except Exception as e:
                raise RuntimeError(f"MIL evaluator: {op.op_type} {op.name!r} failed: {type(e).__name__}: {e}") from e
            if isinstance(result, tuple):
                for (s, rounding), r in zip(results, result):
                    values[s] = r if rounding is None else rounding(r)
            else:
                s, rounding = results[0]
                values[s] = result if rounding is None else rounding(result)
            for s in frees:
                values[s] = None
        outputs = []
        for name, nptype in zip(self.output_names, self._output_types):
            value = values[self._slots[name]] if name in self._slots else self._resolve_output(name)
            outputs.append(np.array(value, dtype=nptype, copy=True) if nptype is not None else np.asarray(value))
        return outputs

    def _resolve_output(self, name: str):
        var = next(v for v in self.function.outputs if v.name == name)
        return self._resolve(var, self.constants)

    def reset_states(self) -> None:
        for slot in self.states.values():
            slot.value = np.zeros_like(slot.value)


def mil_evaluator_host(path: Path, artifact: dict) -> MethodCall:
    program = load_program(path)
    functions = {method: MilFunction(program.functions[name]) for method, name in artifact["runtime"]["functions"].items()}

    def call(method: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        from threadpoolctl import threadpool_limits

        function = functions[method]
        with threadpool_limits(1, user_api="blas"):  # batch-1 matmuls: a BLAS pool costs more than it saves
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
