"""XLA's optimized (SPMD-partitioned, per-device) HLO text, read for what the planner counts.

    m = hlo.Module(compiled.as_text())
    m.mult          # {computation: executions per run of the entry computation}
    m.flops()       # dot and convolution FLOPs, loops counted per iteration
    m.collectives()
    m.kernel_calls()

XLA's own ``cost_analysis()`` visits a while loop's body once, whatever its trip count, so a model
whose layers run under ``lax.scan`` reads low by about its layer count. Here every computation
carries how often it runs: a while body runs its trip count (XLA:GPU writes it in the loop's
``known_trip_count``; XLA:TPU does not, and it is derived from the loop itself: the condition
compares an induction variable of the loop tuple with a constant, the initial tuple sets it to a
constant, the body adds a constant), fused and called computations run as often as the
instruction calling them, nested loops multiply. A loop whose trip count cannot be derived counts
once and is listed in ``Module.unknown_loops``.
"""
from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
KERNEL_TARGETS = re.compile(r"^(tpu_custom_call|__cudnn\$fmha.*)$")  # splash (Mosaic) and cuDNN attention

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_CALLS = re.compile(r"\b(body|condition|to_apply|calls|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")
_PASS = ("copy", "bitcast", "convert", "reshape")  # ops that carry a scalar's value unchanged


def shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of the arrays in an HLO type (one, or a tuple's elements in order)."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in SHAPE.findall(type_text)]


def shape_bytes(type_text: str) -> int:
    return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in shapes(type_text))


def _balanced(text: str, i: int) -> int:
    """Index just past the parenthesis group opening at text[i] == "("."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


@dataclasses.dataclass
class Instr:
    name: str
    type: str          # "f32[8,256]{1,0}" or a tuple "(s32[], f32[8,256]{1,0})"
    op: str
    args: str          # the text between the op's parentheses
    attrs: str         # the rest: attributes, metadata, backend_config
    root: bool

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.args)

    def attr(self, key: str) -> str | None:
        m = re.search(r"\b" + re.escape(key) + r"=(\{[^}]*\}|[^\s,]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def dims(self) -> tuple[int, ...]:
        """The (first) result array's dimensions."""
        s = shapes(self.type)
        return s[0][1] if s else ()


def _parse_instr(text: str) -> Instr | None:
    m = _INSTR.match(text)
    if not m:
        return None
    i = m.end()
    if text[i:i + 1] == "(":
        j = _balanced(text, i)
    else:
        j = i + len(re.match(r"\S*", text[i:]).group(0))
    typ = text[i:j]
    op = re.match(r"\s*([\w\-]+)\(", text[j:])
    if not op:
        return None
    k = j + op.end() - 1
    end = _balanced(text, k)
    return Instr(m.group(2), typ, op.group(1), text[k + 1:end - 1], text[end:], bool(m.group(1)))


class Module:
    def __init__(self, text: str):
        self.comps: dict[str, list[Instr]] = {}
        self.entry = ""
        cur, buf = None, []

        def flush():
            if cur is not None and buf:
                ins = _parse_instr("\n".join(buf))
                if ins:
                    self.comps[cur].append(ins)
            buf.clear()

        for line in text.splitlines():
            m = _COMP.match(line)
            if m and not line.startswith((" ", "}")):
                flush()
                cur = m.group(1)
                self.comps[cur] = []
                if line.startswith("ENTRY"):
                    self.entry = cur
            elif cur is None:
                continue
            elif line.strip() == "}" and line.startswith("}"):
                flush()
                cur = None
            elif _INSTR.match(line) and line.startswith(" "):
                flush()
                buf.append(line)
            elif buf:  # an instruction printed over several lines (a custom call's kernel metadata)
                buf.append(line)
        flush()
        self.instrs = {i.name: i for c in self.comps.values() for i in c}
        self.unknown_loops: list[str] = []
        self._trips: dict[str, int | None] = {}
        self.mult = self._multiplicities()

    # -- how often each computation runs -------------------------------------------------------

    def _multiplicities(self) -> dict[str, int]:
        mult: dict[str, int] = {}

        def visit(name, m, depth=0):
            if name not in self.comps or depth > 64:
                return
            mult[name] = mult.get(name, 0) + m
            for ins in self.comps[name]:
                trip = self.trip_count(ins) if ins.op == "while" else None
                for kind, target in _CALLS.findall(ins.attrs):
                    for callee in re.findall(r"%?([\w.\-]+)", target):
                        visit(callee, m * (trip if (trip is not None and kind == "body") else 1), depth + 1)

        if self.entry:
            visit(self.entry, 1)
        return mult

    def trip_count(self, w: Instr) -> int | None:
        """Iterations of a while loop: XLA's ``known_trip_count``, else derived from the loop."""
        if w.name in self._trips:
            return self._trips[w.name]
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', w.attrs)
        n = int(m.group(1)) if m else self._derive_trip_count(w)
        if n is None:
            self.unknown_loops.append(f"{w.name} ({w.op_name})")
        self._trips[w.name] = n
        return n

    def _root(self, comp: str) -> Instr | None:
        return next((i for i in self.comps.get(comp, []) if i.root), None)

    def _value(self, name: str, params=None, depth: int = 0):
        """A scalar as ("const", c) or ("iv", tuple_index, offset): a constant, or an element of the
        loop tuple (parameter 0 of the loop's computations) plus a constant; None if neither.
        ``params(index, depth)``: the values of a fused computation's parameters."""
        ins = self.instrs.get(name)
        if ins is None or depth > 32:
            return None
        if ins.op == "constant":
            try:
                return ("const", int(ins.args.strip()))
            except ValueError:
                return None
        if ins.op == "parameter":
            idx = int(ins.args.strip() or 0)
            if params is not None:  # a fused computation's parameter: the fusion's operand
                return params(idx, depth)
            return None
        if ins.op in _PASS:
            return self._value(ins.operands[0], params, depth + 1)
        if ins.op == "get-tuple-element":
            idx = int(ins.attr("index"))
            src = self.instrs.get(ins.operands[0])
            if src is not None and src.op == "parameter" and params is None:
                return ("iv", idx, 0)
            if src is not None and src.op == "tuple":
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
        root = self._root((fusion.attr("calls") or "").lstrip("%"))
        ops = fusion.operands
        return (root.name, lambda i, d: self._value(ops[i], params, d + 1)) if root else None

    def _compare(self, name: str, params=None, depth: int = 0):
        """(tuple_index, direction, bound) of ``iv <direction> bound`` from a compare, possibly fused."""
        ins = self.instrs.get(name)
        if ins is None or depth > 8:
            return None
        if ins.op == "fusion":
            inside = self._inside(ins, params)
            return self._compare(*inside, depth + 1) if inside else None
        if ins.op != "compare":
            return None
        a, b = (self._value(o, params) for o in ins.operands[:2])
        d = ins.attr("direction")
        if a and b and a[0] == "const" and b[0] == "iv":
            a, b, d = b, a, {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(d, d)
        if not (a and b and a[0] == "iv" and b[0] == "const"):
            return None
        return a[1], d, b[1] - a[2]

    def _derive_trip_count(self, w: Instr) -> int | None:
        cond = self._root((w.attr("condition") or "").lstrip("%"))
        body = self._root((w.attr("body") or "").lstrip("%"))
        if cond is None or body is None or body.op != "tuple" or not w.operands:
            return None
        test = self._compare(cond.name)
        if test is None:
            return None
        k, direction, bound = test
        src = self.instrs.get(w.operands[0])
        while src is not None and src.op in _PASS:
            src = self.instrs.get(src.operands[0])
        init = self._value(src.operands[k]) if src is not None and src.op == "tuple" else None
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

    def _dims_of(self, name: str) -> tuple[int, ...]:
        ins = self.instrs.get(name)
        return ins.dims if ins else ()

    def _matmul_flops(self, ins: Instr, contracting: str) -> float:
        lhs = self._dims_of(ins.operands[0]) if ins.operands else ()
        contract = [int(d) for d in re.findall(r"\d+", contracting)]
        if any(d >= len(lhs) for d in contract):
            return 0.0
        return 2.0 * math.prod(ins.dims) * math.prod(lhs[d] for d in contract)

    def operand_type(self, ins: Instr) -> str:
        """The element type of an instruction's first operand ("bf16", "s8", "f8e4m3fn", ...; "" unknown)."""
        src = self.instrs.get(ins.operands[0]) if ins.operands else None
        s = shapes(src.type) if src is not None else []
        return s[0][0] if s else ""

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
            return self._matmul_flops(ins, ins.attr("lhs_contracting_dims") or "")
        if ins.op == "convolution":
            return self._conv_flops(ins, self._dims_of(ins.operands[0]), self._dims_of(ins.operands[1]), ins.dims)
        if ins.op == "custom-call":
            target = ins.attr("custom_call_target") or ""
            target = target.strip('"')
            if target.startswith("__cublas$"):
                m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
                return self._matmul_flops(ins, m.group(1) if m else "")
            if target.startswith("__cudnn$conv"):
                ops = [self._dims_of(o) for o in ins.operands[:2]]
                if "BackwardInput" in target:      # (d_out, filter) -> d_in
                    return self._conv_flops(ins, ins.dims, ops[1], ops[0])
                if "BackwardFilter" in target:     # (in, d_out) -> d_filter
                    return self._conv_flops(ins, ops[0], ins.dims, ops[1])
                return self._conv_flops(ins, ops[0], ops[1], ins.dims)
        return 0.0

    @staticmethod
    def _conv_flops(ins: Instr, lhs, rhs, out) -> float:
        """XLA's count (HloCostAnalysis::HandleConvolution): per output feature and batch, the
        input features of a group times the window positions that land on input (not on padding
        or between dilated inputs)."""
        labels = ins.attr("dim_labels") or ""
        m = re.match(r"(\w+)_(\w+)->(\w+)", labels)
        if not m or not lhs or not rhs or not out:
            return 0.0
        li, ri, oi = m.groups()
        window = ins.attr("window") or "{}"
        fields = dict(re.findall(r"(\w+)=([\w\-]+)", window.strip("{}")))
        nsp = len([c for c in li if c.isdigit()])

        def per_dim(key, default, n=nsp):
            if key not in fields:
                return [default] * n
            return [tuple(int(x) for x in v.split("_")) if "_" in v else int(v) for v in fields[key].split("x")]

        stride, pad = per_dim("stride", 1), per_dim("pad", (0, 0))
        lhs_dil, rhs_dil = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
        valid = 1
        for d in range(nsp):
            k_lim, o_lim, i_lim = rhs[ri.index(str(d))], out[oi.index(str(d))], lhs[li.index(str(d))]
            st, lo, rd, ld = stride[d], pad[d][0], rhs_dil[d], lhs_dil[d]
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
        fgc = int(ins.attr("feature_group_count") or 1)
        bgc = int(ins.attr("batch_group_count") or 1)
        fma = (lhs[li.index("f")] // fgc) * out[oi.index("f")] * (lhs[li.index("b")] // bgc) * valid
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
            if ins.op.endswith("-start") and ins.type.startswith("(") and kind in (
                    "all-gather", "collective-permute", "all-to-all"):
                # async form: (operands..., results..., [context]) -> the results are the second half
                # once the context is dropped: XLA:TPU's collective-permute-start ends in two u32[]
                # scalars, which halving would otherwise take for the results (8 bytes a transfer)
                parts = shapes(ins.type)
                while len(parts) > 2 and parts[-1][1] == () and parts[-1][0] in ("u32", "s32"):
                    parts = parts[:-1]
                parts = parts[len(parts) // 2:] if len(parts) >= 2 else parts
                nbytes = sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in parts)
            else:
                nbytes = shape_bytes(ins.type)
            d = out.setdefault(kind, {"count": 0, "bytes": 0})
            d["count"] += m
            d["bytes"] += m * nbytes
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
            target = (ins.attr("custom_call_target") or "").strip('"')
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

