"""A second, independent PyTorch implementation of the Magic Mirror adapter, written from
tests/reference/magic_mirror_reference.md sections 3.2-3.5 (not from the Flax code), on top of
diffusers' CogVideoXTransformer3DModel. Used only by tests.

Open choices are the ones the design fixes for us (config fields): every Linear has a bias, GELU is
exact (erf) unless ``gelu == "tanh"``, LayerNorms are affine with eps ``norm_eps`` (1e-5), MLP_fuse's
hidden width is ``fuse_hidden`` or T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverLayer(nn.Module):
    def __init__(self, width, heads, head_dim, ff_mult, eps, gelu):
        super().__init__()
        self.gelu = gelu
        inner = heads * head_dim
        self.norm_f, self.norm_q = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(width, inner), nn.Linear(width, inner), nn.Linear(width, inner)
        self.to_out = nn.Linear(inner, width)
        self.norm_ff = nn.LayerNorm(width, eps=eps)
        self.ff_in, self.ff_out = nn.Linear(width, ff_mult * width), nn.Linear(ff_mult * width, width)
        self.heads = heads

    def forward(self, q, f):
        # "q <- q + Attn(LN(q), kv = concat[LN(f'), LN(q)])"
        qn = self.norm_q(q)
        kv = torch.cat([self.norm_f(f), qn], dim=1)
        b = q.shape[0]
        heads = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(heads(self.to_q(qn)), heads(self.to_k(kv)), heads(self.to_v(kv)))
        q = q + self.to_out(o.transpose(1, 2).reshape(b, q.shape[1], -1))
        # "q <- q + FF(LN(q)), FF = Linear(W, 4W), GELU, Linear(4W, W)"
        return q + self.ff_out(self.gelu(self.ff_in(self.norm_ff(q))))


class Perceiver(nn.Module):
    def __init__(self, clip_width, width, depth, heads, head_dim, ff_mult, gelu, out_dim, num_latents, eps):
        super().__init__()
        self.proj_in = nn.Linear(clip_width, width)  # f' = Linear(1024 -> W)(f)
        self.latents = nn.Parameter(torch.randn(num_latents, width)) if num_latents else None
        self.layers = nn.ModuleList([PerceiverLayer(width, heads, head_dim, ff_mult, eps, gelu) for _ in range(depth)])
        self.proj_out = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, f, queries=None):
        f = self.proj_in(f)
        q = queries if queries is not None else self.latents[None].expand(f.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, f)
        return self.norm_out(self.proj_out(q))  # "Output: LN(Linear(W -> out)(q))"


class MLP2(nn.Module):
    def __init__(self, din, dh, dout, gelu):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(din, dh), nn.Linear(dh, dout)
        self.gelu = gelu

    def forward(self, x):
        return self.linear_2(self.gelu(self.linear_1(x)))


class MagicMirrorAdapterTorch(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.c = c
        W, D, T = c["width"], c["dit_dim"], c["text_dim"]
        gelu = nn.GELU(approximate="tanh" if c.get("gelu", "erf") == "tanh" else "none")
        args = (c["clip_width"], W, c["depth"], c["heads"], c["head_dim"], c["ff_mult"], gelu)
        self.face_perceiver = Perceiver(*args, D, c["num_face_tokens"], c["norm_eps"])
        self.id_mlp = MLP2(c["id_dim"], c["id_mlp_hidden"], c["num_id_tokens"] * W, gelu)
        self.id_perceiver = Perceiver(*args, T, None, c["norm_eps"])
        self.fuse_mlp = MLP2(2 * T, c.get("fuse_hidden") or T, T, gelu)  # "Linear(2T, T), GELU, Linear(T, T)"
        self.linear_id = nn.Linear(T, c["time_embed_dim"])
        self.can = nn.ModuleList([nn.Linear(c["time_embed_dim"], 14 * D) for _ in c["adapter_layers"]])


def encode(ad, clip_hidden, e_id):
    q_id = ad.id_mlp(e_id).view(e_id.shape[0], ad.c["num_id_tokens"], ad.c["width"])
    return ad.id_perceiver(clip_hidden, q_id), ad.face_perceiver(clip_hidden)


def fuse(ad, text, x_id, w: int):
    """Token w -> N_id tokens c_w + MLP_fuse([c_w, x_id_k]); drop the last N_id - 1 positions."""
    c_w = text[:, w:w + 1]
    fused = c_w + ad.fuse_mlp(torch.cat([c_w.expand(-1, x_id.shape[1], -1), x_id], dim=-1))
    out = torch.cat([text[:, :w], fused, text[:, w + 1:]], dim=1)
    return out[:, :text.shape[1]]


def _mod(norm, x, shift, scale):
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def adapter_block(block, can_out, hs, enc, face, temb, rope):
    """One adapter layer from spec 3.4-3.5, using the diffusers block's own (frozen) modules."""
    from diffusers.models.embeddings import apply_rotary_emb

    D = hs.shape[-1]
    ch = can_out.view(can_out.shape[0], 14, D)
    f1, f2, r1, r2 = ch[:, 0:3], ch[:, 3:6], ch[:, 6:10], ch[:, 10:14]

    def norm_all(adanorm, fmod, r):
        shift, scale, gate, e_shift, e_scale, e_gate = adanorm.linear(adanorm.silu(temb)).chunk(6, dim=1)
        x_n = _mod(adanorm.norm, hs, shift + r[:, 0], scale + r[:, 1])
        c_n = _mod(adanorm.norm, enc, e_shift + r[:, 2], e_scale + r[:, 3])
        f_n = _mod(adanorm.norm, face, fmod[:, 0], fmod[:, 1])
        return x_n, c_n, f_n, gate[:, None], e_gate[:, None], fmod[:, 2][:, None]

    E, L = face.shape[1], enc.shape[1]
    x_n, c_n, f_n, g, eg, fg = norm_all(block.norm1, f1, r1)
    attn = block.attn1
    s = torch.cat([f_n, c_n, x_n], dim=1)  # [face, text, video]
    b = s.shape[0]
    heads = lambda t: t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
    q, k, v = heads(attn.to_q(s)), heads(attn.to_k(s)), heads(attn.to_v(s))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if rope is not None:  # video tokens only; face and text get none
        q = torch.cat([q[:, :, :E + L], apply_rotary_emb(q[:, :, E + L:], rope)], dim=2)
        k = torch.cat([k[:, :, :E + L], apply_rotary_emb(k[:, :, E + L:], rope)], dim=2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, D)
    o = attn.to_out[0](o)
    face, enc, hs = face + fg * o[:, :E], enc + eg * o[:, E:E + L], hs + g * o[:, E + L:]

    x_n, c_n, f_n, g, eg, fg = norm_all(block.norm2, f2, r2)
    h = block.ff(torch.cat([f_n, c_n, x_n], dim=1))
    return hs + g * h[:, E + L:], enc + eg * h[:, E:E + L], face + fg * h[:, :E]


def magic_mirror_forward(dit, ad, latents, text, timestep, clip_hidden, e_id, class_index: int, rope):
    """latents (B, F, C, H, W) -> (B, F, C, H, W) with the identity joined (spec 3.2-3.5)."""
    x_id, x_face = encode(ad, clip_hidden, e_id)
    text = fuse(ad, text, x_id, class_index)
    b, f, c, h, w = latents.shape
    temb = dit.time_embedding(dit.time_proj(timestep).to(latents.dtype))
    seq = dit.patch_embed(text, latents)
    L = text.shape[1]
    enc, hs = seq[:, :L], seq[:, L:]
    cond = F.silu(temb + ad.linear_id(x_id.mean(dim=1)))  # CAN condition
    face = x_face
    slots = {layer: i for i, layer in enumerate(ad.c["adapter_layers"])}
    for i, block in enumerate(dit.transformer_blocks):
        if i in slots:
            hs, enc, face = adapter_block(block, ad.can[slots[i]](cond), hs, enc, face, temb, rope)
        else:
            hs, enc = block(hidden_states=hs, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
    hs = dit.norm_out(dit.norm_final(hs), temb=temb)
    hs = dit.proj_out(hs)
    p = dit.config.patch_size
    out = hs.reshape(b, f, h // p, w // p, -1, p, p)
    return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
