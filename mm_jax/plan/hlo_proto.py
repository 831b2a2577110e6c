"""The ``HloModuleProto`` of a compiled program, decoded: computations of instructions with their
result shapes, operands, called computations and the attributes ``mm_jax.plan.hlo`` counts with.

    comps, entry = hlo_proto.read(compiled.runtime_executable().hlo_modules()[0]
                                  .as_serialized_hlo_module_proto())   # or HLO text

The proto is XLA's serialization of a module, whose field numbers do not change between
versions (its text printer's syntax does). jaxlib ships no ``hlo_pb2`` and its Python
``HloInstruction`` has no shapes, called computations or dimension numbers, so the fields read
are declared in ``_SCHEMA`` with their numbers from openxla/xla ``xla/service/hlo.proto`` and
``xla/xla_data.proto`` and decoded by protobuf (a dependency of orbax-checkpoint); every other
field is skipped. HLO text goes through XLA's own parser (``hlo_module_from_text``) first.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

# bytes per element as the planner counts them (a sub-byte type counts a byte)
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
               "f8e4m3": 1, "f8e3m4": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e8m0fnu": 1,
               "s2": 1, "u2": 1, "s1": 1, "u1": 1, "f4e2m1fn": 1}

# xla_data.proto PrimitiveType -> the element type's name in HLO text
PRIMITIVE_TYPES = {1: "pred", 2: "s8", 3: "s16", 4: "s32", 5: "s64", 6: "u8", 7: "u16", 8: "u32", 9: "u64",
                   10: "f16", 11: "f32", 12: "f64", 13: "tuple", 14: "opaque", 15: "c64", 16: "bf16", 17: "token",
                   18: "c128", 19: "f8e5m2", 20: "f8e4m3fn", 21: "s4", 22: "u4", 23: "f8e4m3b11fnuz",
                   24: "f8e5m2fnuz", 25: "f8e4m3fnuz", 26: "s2", 27: "u2", 28: "f8e4m3", 29: "f8e3m4", 30: "s1",
                   31: "u1", 32: "f4e2m1fn", 33: "f8e8m0fnu"}
_TUPLE = 13

# The fields read, (name, number, type[, repeated]) as in xla/service/hlo.proto and xla/xla_data.proto;
# a type named here is a message.
_SCHEMA = {
    "ShapeProto": [("element_type", 2, "int32"), ("dimensions", 3, "int64", True),
                   ("tuple_shapes", 4, "ShapeProto", True)],
    "OpMetadata": [("op_name", 2, "string")],
    "LiteralProto": [("preds", 2, "bool", True), ("s32s", 4, "int32", True), ("s64s", 5, "int64", True),
                     ("u32s", 6, "uint32", True), ("u64s", 7, "uint64", True)],
    "WindowDimension": [("size", 1, "int64"), ("stride", 2, "int64"), ("padding_low", 3, "int64"),
                        ("padding_high", 4, "int64"), ("window_dilation", 5, "int64"), ("base_dilation", 6, "int64")],
    "Window": [("dimensions", 1, "WindowDimension", True)],
    "ConvolutionDimensionNumbers": [
        ("input_batch_dimension", 7, "int64"), ("input_feature_dimension", 8, "int64"),
        ("input_spatial_dimensions", 11, "int64", True), ("kernel_input_feature_dimension", 3, "int64"),
        ("kernel_output_feature_dimension", 4, "int64"), ("kernel_spatial_dimensions", 6, "int64", True),
        ("output_batch_dimension", 9, "int64"), ("output_feature_dimension", 10, "int64"),
        ("output_spatial_dimensions", 12, "int64", True)],
    "DotDimensionNumbers": [("lhs_contracting_dimensions", 1, "int64", True)],
    "HloInstructionProto": [
        ("name", 1, "string"), ("opcode", 2, "string"), ("shape", 3, "ShapeProto"), ("metadata", 7, "OpMetadata"),
        ("literal", 8, "LiteralProto"), ("parameter_number", 9, "int64"), ("tuple_index", 13, "int64"),
        ("window", 15, "Window"), ("convolution_dimension_numbers", 16, "ConvolutionDimensionNumbers"),
        ("custom_call_target", 28, "string"), ("dot_dimension_numbers", 30, "DotDimensionNumbers"),
        ("id", 35, "int64"), ("operand_ids", 36, "int64", True), ("called_computation_ids", 38, "int64", True),
        ("backend_config", 43, "bytes"), ("feature_group_count", 50, "int64"), ("batch_group_count", 58, "int64"),
        ("comparison_direction", 63, "string")],
    "HloComputationProto": [("name", 1, "string"), ("instructions", 2, "HloInstructionProto", True),
                            ("id", 5, "int64"), ("root_id", 6, "int64")],
    "HloModuleProto": [("name", 1, "string"), ("entry_computation_name", 2, "string"),
                       ("computations", 3, "HloComputationProto", True), ("entry_computation_id", 6, "int64")],
}


@functools.cache
def _module_proto_class():
    """The message class of ``HloModuleProto`` restricted to ``_SCHEMA``'s fields."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="mm_jax_plan_hlo.proto", package="mm_jax_plan_hlo", syntax="proto3")
    for message, fields in _SCHEMA.items():
        m = file.message_type.add(name=message)
        for name, number, typ, *repeated in fields:
            f = m.field.add(name=name, number=number, label=fdp.LABEL_REPEATED if repeated else fdp.LABEL_OPTIONAL)
            if typ in _SCHEMA:
                f.type, f.type_name = fdp.TYPE_MESSAGE, f".mm_jax_plan_hlo.{typ}"
            else:
                f.type = getattr(fdp, "TYPE_" + typ.upper())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mm_jax_plan_hlo.HloModuleProto"))


def leaves(shape) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of the arrays in a ShapeProto (one, or a tuple's elements in order, nested
    tuples flattened); tokens and opaque values have none."""
    if shape.element_type == _TUPLE:
        return [leaf for s in shape.tuple_shapes for leaf in leaves(s)]
    dt = PRIMITIVE_TYPES.get(shape.element_type, "")
    return [(dt, tuple(shape.dimensions))] if dt in DTYPE_BYTES else []


def nbytes(leaves) -> int:
    return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in leaves)


@dataclasses.dataclass(eq=False)
class Instr:
    name: str
    op: str
    leaves: list            # [(dtype, dims)] of the result's arrays
    is_tuple: bool
    root: bool
    called: list            # names of the computations it calls, in XLA's order (while: body, condition)
    proto: Any = dataclasses.field(repr=False)
    operands: list = dataclasses.field(default_factory=list, repr=False)   # Instr

    @property
    def dims(self) -> tuple[int, ...]:
        """The (first) result array's dimensions."""
        return self.leaves[0][1] if self.leaves else ()

    @property
    def dtype(self) -> str:
        return self.leaves[0][0] if self.leaves else ""

    @property
    def op_name(self) -> str:
        return self.proto.metadata.op_name

    @property
    def backend_config(self) -> dict:
        """The backend config as JSON (XLA writes it so: ``known_trip_count``, cuBLAS's
        ``gemm_backend_config``); {} when empty or not JSON."""
        try:
            cfg = json.loads(self.proto.backend_config or b"{}")
        except ValueError:
            return {}
        return cfg if isinstance(cfg, dict) else {}

    def constant(self) -> int | None:
        """A scalar integer or predicate constant's value (None for anything else)."""
        if self.op != "constant" or self.dims != ():
            return None
        lit = self.proto.literal
        values = list(lit.preds) or list(lit.s32s) or list(lit.s64s) or list(lit.u32s) or list(lit.u64s)
        return int(values[0]) if len(values) == 1 else None


def read(source: bytes | str) -> tuple[dict[str, list[Instr]], str]:
    """({computation: its instructions in order}, the entry computation's name) of a serialized
    ``HloModuleProto`` or of HLO text."""
    if isinstance(source, str):
        from jaxlib import xla_client

        source = xla_client.hlo.hlo_module_from_text(source).as_serialized_hlo_module_proto()
    proto = _module_proto_class().FromString(source)
    names = {c.id: c.name for c in proto.computations}
    comps: dict[str, list[Instr]] = {}
    for c in proto.computations:
        by_id = {}
        for p in c.instructions:
            by_id[p.id] = Instr(p.name, p.opcode, leaves(p.shape), p.shape.element_type == _TUPLE,
                                p.id == c.root_id, [names[i] for i in p.called_computation_ids], p)
        for ins in by_id.values():
            ins.operands = [by_id[i] for i in ins.proto.operand_ids]
        comps[c.name] = list(by_id.values())
    return comps, names.get(proto.entry_computation_id, proto.entry_computation_name)
