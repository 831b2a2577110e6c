"""XLA's optimized (SPMD-partitioned, per-device) HLO module, read for what the planner counts.

    m = hlo.Module.of(compiled)   # a jax.stages.Compiled; hlo.Module(text) for HLO text
    m.mult          # {computation: executions per run of the entry computation}
    m.flops()       # dot and convolution FLOPs, loops counted per iteration
    m.collectives()
    m.kernel_calls(mark)

The module is read from its ``HloModuleProto`` (``mm_jax.plan.hlo_proto``: XLA's serialization,
whose field numbers do not change between versions), not by parsing its text, whose syntax does.
Nothing more structured gives what is counted here: jaxlib 0.10.2's Python ``HloInstruction`` has
a name, an opcode and operands but no shape, called computations or dimension numbers, and
``cost_analysis()`` counts a loop body once (below).

XLA's own ``cost_analysis()`` visits a while loop's body once, whatever its trip count, so a model
whose layers run under ``lax.scan`` reads low by about its layer count. Here every computation
carries how often it runs: a while body runs its trip count (XLA:GPU writes it in the loop's
``known_trip_count``; XLA:TPU does not, and it is derived from the loop itself: the condition
compares an induction variable of the loop tuple with a constant, the initial tuple sets it to a
constant, the body adds a constant), fused and called computations run as often as the
instruction calling them, nested loops multiply. A loop whose trip count cannot be derived counts
once and is listed in ``Module.unknown_loops``. A ``conditional`` runs one of its branches: the
one a constant predicate or index selects, else the one with the most FLOPs (the first of equals;
an upper bound), listed in ``Module.conditionals``; its other branches count zero times.
"""
from __future__ import annotations

import math
import re

from mm_jax.plan.hlo_proto import Instr, nbytes, read

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
KERNEL_TARGETS = re.compile(r"^(tpu_custom_call|__cudnn\$fmha.*)$")  # splash (Mosaic) and cuDNN attention
_PASS = ("copy", "bitcast", "convert", "reshape")  # ops that carry a scalar's value unchanged


def _find(tree, key: str):
    """The first value of ``key`` anywhere in a JSON tree, or None."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for v in tree:
            found = _find(v, key)
            if found is not None:
                return found
    return None


class Module:
    """The computations of one HLO module: ``Module(serialized HloModuleProto bytes or HLO text)``."""

    def __init__(self, source: bytes | str):
        self.comps, self.entry = read(source)
        self.instrs = {i.name: i for c in self.comps.values() for i in c}
        self.unknown_loops: list[str] = []
        self.conditionals: list[str] = []
        self._trips: dict[str, int | None] = {}
        self._branches: dict[str, str] = {}
        self._comp_flops: dict[str, float] = {}
        self.mult = self._multiplicities()

    @classmethod
    def of(cls, compiled) -> "Module":
        """The module of a ``jax.stages.Compiled`` (one program: SPMD partitioning gives every
        device the same one)."""
        modules = compiled.runtime_executable().hlo_modules()
        if len(modules) != 1:
            raise ValueError(f"the compiled program has {len(modules)} HLO modules; the planner reads exactly one")
        return cls(modules[0].as_serialized_hlo_module_proto())

    # -- how often each computation runs -------------------------------------------------------

    def _callees(self, ins: Instr) -> list[tuple[str, int]]:
        """(computation, runs per execution of ``ins``) of what ``ins`` calls."""
        if ins.op == "while":
            trip = self.trip_count(ins)
            body, cond = ins.called
            return [(cond, 1), (body, 1 if trip is None else trip)]
        if ins.op == "conditional":
            return [(self.branch(ins), 1)]
        return [(c, 1) for c in ins.called]

    def _multiplicities(self) -> dict[str, int]:
        mult: dict[str, int] = {}

        def visit(name, m, depth=0):
            if name not in self.comps or depth > 64:
                return
            mult[name] = mult.get(name, 0) + m
            for ins in self.comps[name]:
                for callee, k in self._callees(ins):
                    visit(callee, m * k, depth + 1)

        if self.entry:
            visit(self.entry, 1)
        return mult

    def trip_count(self, w: Instr) -> int | None:
        """Iterations of a while loop: XLA's ``known_trip_count``, else derived from the loop."""
        if w.name in self._trips:
            return self._trips[w.name]
        known = (w.backend_config.get("known_trip_count") or {}).get("n")
        n = int(known) if known is not None else self._derive_trip_count(w)
        if n is None:
            self.unknown_loops.append(f"{w.name} ({w.op_name})")
        self._trips[w.name] = n
        return n

    def branch(self, cond: Instr) -> str:
        """The computation a ``conditional`` runs: the branch its constant predicate (true: the
        first, false: the second) or index (out of range: the last) selects, else the branch with
        the most FLOPs, the first of equals."""
        if cond.name not in self._branches:
            branches = cond.called
            v = self._value(cond.operands[0]) if cond.operands else None
            if v is not None and v[0] == "const":
                if cond.operands[0].dtype == "pred":
                    pick, why = branches[0 if v[1] else 1], "constant predicate"
                else:
                    pick, why = branches[v[1] if 0 <= v[1] < len(branches) else -1], "constant index"
            else:
                costs = [self.computation_flops(b) for b in branches]
                pick, why = branches[costs.index(max(costs))], f"the most FLOPs of {len(branches)} branches"
            self._branches[cond.name] = pick
            self.conditionals.append(f"{cond.name} ({cond.op_name}): runs {pick}, {why}")
        return self._branches[cond.name]

    def computation_flops(self, name: str, depth: int = 0) -> float:
        """FLOPs of one run of a computation, with what it calls (loops per iteration)."""
        if name not in self._comp_flops:
            if depth > 64:
                return 0.0
            self._comp_flops[name] = sum(self.instr_flops(ins) + sum(
                k * self.computation_flops(c, depth + 1) for c, k in self._callees(ins))
                for ins in self.comps.get(name, []))
        return self._comp_flops[name]

    def _root(self, comp: str) -> Instr | None:
        return next((i for i in self.comps.get(comp, []) if i.root), None)

    def _value(self, ins: Instr | None, params=None, depth: int = 0):
        """A scalar as ("const", c) or ("iv", tuple_index, offset): a constant, or an element of the
        loop tuple (parameter 0 of the loop's computations) plus a constant; None if neither.
        ``params(index, depth)``: the values of a fused computation's parameters."""
        if ins is None or depth > 32:
            return None
        if ins.op == "constant":
            c = ins.constant()
            return None if c is None else ("const", c)
        if ins.op == "parameter":
            # a fused computation's parameter: the fusion's operand
            return params(ins.proto.parameter_number, depth) if params is not None else None
        if ins.op in _PASS:
            return self._value(ins.operands[0], params, depth + 1)
        if ins.op == "get-tuple-element":
            idx, src = ins.proto.tuple_index, ins.operands[0]
            if src.op == "parameter" and params is None:
                return ("iv", idx, 0)
            if src.op == "tuple":
                return self._value(src.operands[idx], params, depth + 1)
            return None
        if ins.op in ("add", "subtract"):
            a, b = (self._value(o, params, depth + 1) for o in ins.operands[:2])
            if a is None or b is None:
                return None
            sign = 1 if ins.op == "add" else -1
            if a[0] == "const" and b[0] == "const":
                return ("const", a[1] + sign * b[1])
            if a[0] == "iv" and b[0] == "const":
                return ("iv", a[1], a[2] + sign * b[1])
            if a[0] == "const" and b[0] == "iv" and sign == 1:
                return ("iv", b[1], b[2] + a[1])
            return None
        if ins.op == "fusion":
            inside = self._inside(ins, params)
            return self._value(*inside, depth + 1) if inside else None
        return None

    def _inside(self, fusion: Instr, params):
        """(root, params) of a fusion's computation: its parameters read the fusion's operands."""
        root = self._root(fusion.called[0]) if fusion.called else None
        ops = fusion.operands
        return (root, lambda i, d: self._value(ops[i], params, d + 1)) if root else None

    def _compare(self, ins: Instr | None, params=None, depth: int = 0):
        """(tuple_index, direction, bound) of ``iv <direction> bound`` from a compare, possibly fused."""
        if ins is None or depth > 8:
            return None
        if ins.op == "fusion":
            inside = self._inside(ins, params)
            return self._compare(*inside, depth + 1) if inside else None
        if ins.op != "compare":
            return None
        a, b = (self._value(o, params) for o in ins.operands[:2])
        d = ins.proto.comparison_direction
        if a and b and a[0] == "const" and b[0] == "iv":
            a, b, d = b, a, {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(d, d)
        if not (a and b and a[0] == "iv" and b[0] == "const"):
            return None
        return a[1], d, b[1] - a[2]

    def _derive_trip_count(self, w: Instr) -> int | None:
        body, cond = (self._root(c) for c in w.called)
        if cond is None or body is None or body.op != "tuple" or not w.operands:
            return None
        test = self._compare(cond)
        if test is None:
            return None
        k, direction, bound = test
        src = w.operands[0]
        while src.op in _PASS:
            src = src.operands[0]
        init = self._value(src.operands[k]) if src.op == "tuple" else None
        step = self._value(body.operands[k]) if k < len(body.operands) else None
        if not (init and init[0] == "const" and step and step[0] == "iv" and step[1] == k and step[2] != 0):
            return None
        i0, s = init[1], step[2]
        if direction in ("LT", "LE") and s > 0:
            span = bound - i0 + (1 if direction == "LE" else 0)
        elif direction in ("GT", "GE") and s < 0:
            span, s = i0 - bound + (1 if direction == "GE" else 0), -s
        elif direction == "NE" and (bound - i0) % s == 0 and (bound - i0) // s >= 0:
            return (bound - i0) // s
        else:
            return None
        return max(0, -(-span // s))

    def executed(self):
        """(instruction, executions per run) of every instruction in a computation that runs."""
        for name, comp in self.comps.items():
            m = self.mult.get(name, 0)
            if m:
                for ins in comp:
                    yield ins, m

    # -- what the planner counts ---------------------------------------------------------------

    @staticmethod
    def _matmul_flops(ins: Instr, contracting) -> float:
        lhs = ins.operands[0].dims if ins.operands else ()
        contract = [int(d) for d in contracting]
        if any(d >= len(lhs) for d in contract):
            return 0.0
        return 2.0 * math.prod(ins.dims) * math.prod(lhs[d] for d in contract)

    @staticmethod
    def operand_type(ins: Instr) -> str:
        """The element type of an instruction's first operand ("bf16", "s8", "f8e4m3fn", ...; "" unknown)."""
        return ins.operands[0].dtype if ins.operands else ""

    def flops_by_type(self) -> dict[str, float]:
        """``flops()`` split by the element type of each matmul's left operand (8-bit types are
        the quantized matmuls: "s8", "f8e4m3fn", ...)."""
        out: dict[str, float] = {}
        for ins, m in self.executed():
            f = self.instr_flops(ins)
            if f:
                t = self.operand_type(ins)
                out[t] = out.get(t, 0.0) + f * m
        return out

    def instr_flops(self, ins: Instr) -> float:
        """FLOPs (2 per multiply-add) of one execution of a dot, a convolution, or a cuBLAS/cuDNN
        custom call standing for one; 0 for anything else."""
        if ins.op == "dot":
            return self._matmul_flops(ins, ins.proto.dot_dimension_numbers.lhs_contracting_dimensions)
        dims = [o.dims for o in ins.operands[:2]]
        if ins.op == "convolution":
            return self._conv_flops(ins, *dims, ins.dims) if len(dims) == 2 else 0.0
        if ins.op == "custom-call":
            target = ins.proto.custom_call_target
            if target.startswith("__cublas$"):
                return self._matmul_flops(ins, _find(ins.backend_config, "lhs_contracting_dimensions") or [])
            if target.startswith("__cudnn$conv") and len(dims) == 2:
                if "BackwardInput" in target:      # (d_out, filter) -> d_in
                    return self._conv_flops(ins, ins.dims, dims[1], dims[0])
                if "BackwardFilter" in target:     # (in, d_out) -> d_filter
                    return self._conv_flops(ins, dims[0], ins.dims, dims[1])
                return self._conv_flops(ins, dims[0], dims[1], ins.dims)
        return 0.0

    @staticmethod
    def _conv_flops(ins: Instr, lhs, rhs, out) -> float:
        """XLA's count (HloCostAnalysis::HandleConvolution): per output feature and batch, the
        input features of a group times the window positions that land on input (not on padding
        or between dilated inputs)."""
        dn = ins.proto.convolution_dimension_numbers
        if not lhs or not rhs or not out:
            return 0.0
        window = ins.proto.window.dimensions
        valid = 1
        for d in range(len(dn.input_spatial_dimensions)):
            k_lim = rhs[dn.kernel_spatial_dimensions[d]]
            o_lim, i_lim = out[dn.output_spatial_dimensions[d]], lhs[dn.input_spatial_dimensions[d]]
            w = window[d] if d < len(window) else None
            st, lo = (w.stride or 1, w.padding_low) if w else (1, 0)
            rd, ld = (w.window_dilation or 1, w.base_dilation or 1) if w else (1, 1)
            count = 0
            for k in range(k_lim):
                if ld == 1:  # outputs o with 0 <= o*st - lo + k*rd < i_lim, in closed form
                    first = max(0, -(-(lo - k * rd) // st))
                    last = min(o_lim - 1, (i_lim - 1 + lo - k * rd) // st)
                    count += max(0, last - first + 1)
                    continue
                for o in range(o_lim):
                    u = o * st - lo + k * rd
                    if u % ld == 0 and 0 <= u // ld < i_lim:
                        count += 1
            valid *= count
        fgc = ins.proto.feature_group_count or 1
        bgc = ins.proto.batch_group_count or 1
        fma = (lhs[dn.input_feature_dimension] // fgc) * out[dn.output_feature_dimension] * (
            lhs[dn.input_batch_dimension] // bgc) * valid
        return 2.0 * fma

    def flops(self) -> float:
        """Dot and convolution FLOPs per run (per device), every loop iteration counted."""
        return sum(m * self.instr_flops(ins) for ins, m in self.executed())

    def collectives(self) -> dict[str, dict[str, int]]:
        """{kind: {"count": executions, "bytes": result bytes summed over executions}}: every
        all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute (``-start`` forms
        included, ``-done`` not)."""
        out: dict[str, dict[str, int]] = {}
        for ins, m in self.executed():
            kind = ins.op[:-len("-start")] if ins.op.endswith("-start") else ins.op
            if kind not in COLLECTIVES:
                continue
            parts = ins.leaves
            if ins.op.endswith("-start") and ins.is_tuple and kind in ("all-gather", "collective-permute",
                                                                       "all-to-all"):
                # async form: (operands..., results..., [context]) -> the results are the second half
                # once the context is dropped: XLA:TPU's collective-permute-start ends in two u32[]
                # scalars, which halving would otherwise take for the results (8 bytes a transfer)
                while len(parts) > 2 and parts[-1][1] == () and parts[-1][0] in ("u32", "s32"):
                    parts = parts[:-1]
                parts = parts[len(parts) // 2:] if len(parts) >= 2 else parts
            d = out.setdefault(kind, {"count": 0, "bytes": 0})
            d["count"] += m
            d["bytes"] += m * nbytes(parts)
        return out

    def kernel_targets(self) -> dict[str, int]:
        """{custom-call target: executions} of the attention kernels (``KERNEL_TARGETS``), e.g.
        ``__cudnn$fmhaSoftmax`` (bf16 cuDNN), ``__cudnn$fmhaSoftmaxF8`` (fp8 cuDNN)."""
        out: dict[str, int] = {}
        for ins, m in self.executed():
            if ins.op == "custom-call" and KERNEL_TARGETS.match(ins.proto.custom_call_target):
                out[ins.proto.custom_call_target] = out.get(ins.proto.custom_call_target, 0) + m
        return out

    def kernel_calls(self, mark: str) -> dict[tuple[str, str], int]:
        """{(marked name, "forward" | "backward"): executions} of the attention kernels' custom
        calls (splash's Mosaic ``tpu_custom_call``s, cuDNN's ``__cudnn$fmha*``), named by the
        ``jit`` wrapper whose name starts with ``mark`` in their ``op_name`` metadata. Splash runs a
        call's backward as two kernels, ``splash_mha_dq`` and ``splash_mha_dkv`` (or one fused
        ``dkv``): one backward per ``dkv`` kernel. A kernel with no mark counts under
        ("unmarked <kernel>", direction)."""
        out: dict[tuple[str, str], int] = {}
        for ins, m in self.executed():
            if ins.op != "custom-call":
                continue
            target = ins.proto.custom_call_target
            if not KERNEL_TARGETS.match(target):
                continue
            op_name = ins.op_name
            found = re.search(re.escape(mark) + r"\w+", op_name)
            inner = f"{ins.name} {op_name.split(mark)[-1]}"  # the kernel's name, inside the marked call
            if re.search(r"_dq\b|_dq_", inner):
                continue  # splash: the other half of a backward, counted by its dkv kernel
            backward = bool(re.search(r"dkv|bwd|Backward|backward", target + " " + inner))
            key = (found.group(0) if found else f"unmarked {target} {ins.name}", "backward" if backward else "forward")
            out[key] = out.get(key, 0) + m
        return out
