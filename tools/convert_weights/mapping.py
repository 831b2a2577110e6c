"""How our parameter tree maps onto a PyTorch state dict.

Our parameters are named after the checkpoint's modules, so a torch key is our path joined with
dots, with the leaf renamed (``kernel``/``scale``/``embedding`` -> ``weight``) and the few
structural differences listed per component in ``RENAMES``. The array transform follows from the
kind of parameter alone: a linear kernel is transposed, a conv kernel is moved to channels-last,
everything else is copied.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_DIT_RENAMES = [
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
    (r"\.attn1\.to_out\.", ".attn1.to_out.0."),
]

# our dotted path (regex) -> torch dotted path, applied in order, per component
RENAMES: dict[str, list[tuple[str, str]]] = {
    "transformer": _DIT_RENAMES,
    # the DiT's, after the LFE's: its layers are torch Sequentials [attention, Sequential(LN, Linear,
    # GELU, Linear)] and its mappings Sequentials whose indices our attribute names carry (fc0, ln1, ...)
    "consisid_transformer": [
        (r"\.layers\.(\d+)\.attn\.", r".layers.\1.0."),
        (r"\.layers\.(\d+)\.ff\.norm\.", r".layers.\1.1.0."),
        (r"\.layers\.(\d+)\.ff\.proj_in\.", r".layers.\1.1.1."),
        (r"\.layers\.(\d+)\.ff\.proj_out\.", r".layers.\1.1.3."),
        (r"\.(mapping_\d+|id_embedding_mapping)\.(?:fc|ln)(\d)\.", r".\1.\2."),
    ] + _DIT_RENAMES,
    # the position-bias table every block shares is stored in block 0 only
    "text_encoder": [
        (r"^\.encoder\.relative_attention_bias\.", ".encoder.block.0.layer.0.SelfAttention.relative_attention_bias."),
    ],
}

# torch key -> other names the same tensor may be stored under (tied weights)
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "text_encoder": {"shared.weight": ("encoder.embed_tokens.weight",)},
}

# source-key prefixes stripped before matching (older transformers / full CLIPModel checkpoints),
# and source keys of other towers that a component ignores
STRIP_PREFIXES: dict[str, tuple[str, ...]] = {"image_encoder": ("vision_model.",)}
IGNORE_PREFIXES: dict[str, tuple[str, ...]] = {
    "image_encoder": ("text_model.", "logit_scale", "text_projection", "visual_projection"),
}


def normalize_source_keys(component: str, keys) -> dict[str, str]:
    """``{our-side key: stored key}`` after prefix stripping, without ignored keys."""
    out = {}
    for k in keys:
        if k.startswith(IGNORE_PREFIXES.get(component, ())) or k.endswith("position_ids"):
            continue
        kk = k
        for p in STRIP_PREFIXES.get(component, ()):
            if kk.startswith(p):
                kk = kk[len(p):]
        out[kk] = k
    return out


LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}

# torch layout -> ours, by (leaf name, rank)
_KERNEL_PERMS = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}


@dataclass(frozen=True)
class Mapping:
    """One torch tensor: our flat key, the torch key, shapes on both sides and the transform.
    ``index`` is the tensor's layer in our stacked parameter (None: not in a stack), whose shape
    is ``(layers, *our_shape)``."""
    ours: str
    torch: str
    our_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    perm: tuple[int, ...] | None   # torch array -> ours via transpose(perm); None = identity
    index: int | None = None

    def to_ours(self, arr: np.ndarray) -> np.ndarray:
        return arr if self.perm is None else arr.transpose(self.perm)


def torch_key(component: str, our_key: str) -> str:
    parts = our_key.split("/")
    parts[-1] = LEAF_RENAMES.get(parts[-1], parts[-1])
    key = "." + ".".join(parts) + "."
    for pat, rep in RENAMES.get(component, []):
        key = re.sub(pat, rep, key)
    return key.strip(".")


def build_mapping(component: str, our_shapes: dict[str, tuple[tuple[int, ...], object]]) -> dict[str, Mapping]:
    """``{torch key: Mapping}`` for every tensor of our (abstract) model: a stacked parameter
    (``components.stack_of``) maps to one torch key per layer, with its index inserted after the
    stack's path (``transformer_blocks/attn1/...`` layer 3 -> ``transformer_blocks.3.attn1. ...``)."""
    from mm_jax import components

    out: dict[str, Mapping] = {}

    def add(ours: str, path: str, shape, index):
        leaf = ours.rsplit("/", 1)[-1]
        perm = _KERNEL_PERMS.get(len(shape)) if leaf == "kernel" else None
        tshape = tuple(shape) if perm is None else tuple(shape[i] for i in np.argsort(perm))
        tk = torch_key(component, path)
        if tk in out:
            raise AssertionError(f"two parameters map to torch key {tk!r}: {out[tk].ours} and {ours}")
        out[tk] = Mapping(ours, tk, tuple(shape), tshape, perm, index)

    for ours, (shape, _) in our_shapes.items():
        stack = components.stack_of(component, ours)
        if stack is None:
            add(ours, ours, shape, None)
            continue
        rest = ours[len(stack) + 1:]
        for i in range(shape[0]):
            add(ours, f"{stack}/{i}/{rest}", shape[1:], i)
    return out


def by_parameter(mapping: dict[str, Mapping]) -> dict[str, list[Mapping]]:
    """``{our key: [Mapping, ...]}``: one entry, or a stack's layers in order."""
    out: dict[str, list[Mapping]] = {}
    for m in mapping.values():
        out.setdefault(m.ours, []).append(m)
    for ms in out.values():
        ms.sort(key=lambda m: -1 if m.index is None else m.index)
    return out


def check_source(component: str, mapping: dict[str, Mapping], found: dict[str, tuple[int, ...]]) -> list[str]:
    """Problems between the expected mapping and the source's ``{key: shape}``, one line each."""
    aliases = ALIASES.get(component, {})
    problems = []
    resolved = set()
    for tk, m in mapping.items():
        names = (tk,) + aliases.get(tk, ())
        hit = next((n for n in names if n in found), None)
        if hit is None:
            problems.append(f"missing key {tk} (expected shape {list(m.torch_shape)})")
            continue
        resolved.update(n for n in names if n in found)
        if tuple(found[hit]) != m.torch_shape:
            problems.append(f"shape mismatch for {hit}: expected {list(m.torch_shape)}, found {list(found[hit])}")
    for k in sorted(set(found) - resolved):
        problems.append(f"unexpected key {k} (shape {list(found[k])}): not part of the {component} architecture")
    return problems


def resolve(component: str, tk: str, found: dict) -> str:
    names = (tk,) + ALIASES.get(component, {}).get(tk, ())
    return next(n for n in names if n in found)
