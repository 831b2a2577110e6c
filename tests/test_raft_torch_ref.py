"""A compact torch statement of RAFT (``raft-things`` sizes) as VBench ships it, the parity reference of
``tests/test_raft.py``; this module holds no tests.

Source: Vchitect/VBench ``vbench/third_party/RAFT/core`` (``raft.py``, ``extractor.py``'s ``BasicEncoder``
and ``ResidualBlock``, ``update.py``'s ``BasicUpdateBlock``, ``corr.py``'s ``CorrBlock``,
``utils_core/utils.py``'s ``bilinear_sampler`` and ``coords_grid``), restated here because the vbench wheel
cannot be installed with its dependencies next to ours (it pins ``transformers==4.33.2``, ``numpy<2``).
Module names equal the original's, so ``state_dict()`` has the keys of ``raft-things.pth`` (without
``module.``), the ``norm3`` twins included. Only the release path is restated: ``small=False``, no
dropout, no mixed precision, no alternate correlation, ``test_mode=True``. It was checked equal to the
vbench 0.1.5 wheel's own files (same random weights, 128x128 pair, 20 iterations: max abs difference 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind, c):
    return nn.BatchNorm2d(c) if kind == "batch" else nn.InstanceNorm2d(c)


class ResidualBlock(nn.Module):
    def __init__(self, cin, planes, norm_fn, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.relu = nn.ReLU()
        self.norm1, self.norm2 = _norm(norm_fn, planes), _norm(norm_fn, planes)
        self.downsample = None
        if stride != 1:
            self.norm3 = _norm(norm_fn, planes)
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride), self.norm3)

    def forward(self, x):
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return self.relu(x + y)


class BasicEncoder(nn.Module):
    def __init__(self, output_dim, norm_fn):
        super().__init__()
        self.norm1 = _norm(norm_fn, 64)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.relu1 = nn.ReLU()
        self.layer1 = nn.Sequential(ResidualBlock(64, 64, norm_fn), ResidualBlock(64, 64, norm_fn))
        self.layer2 = nn.Sequential(ResidualBlock(64, 96, norm_fn, 2), ResidualBlock(96, 96, norm_fn))
        self.layer3 = nn.Sequential(ResidualBlock(96, 128, norm_fn, 2), ResidualBlock(128, 128, norm_fn))
        self.conv2 = nn.Conv2d(128, output_dim, 1)

    def forward(self, x):
        is_list = isinstance(x, (list, tuple))
        if is_list:
            n = x[0].shape[0]
            x = torch.cat(x, 0)
        x = self.relu1(self.norm1(self.conv1(x)))
        x = self.conv2(self.layer3(self.layer2(self.layer1(x))))
        return torch.split(x, [n, n], 0) if is_list else x


class BasicMotionEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.convc1 = nn.Conv2d(4 * 81, 256, 1)
        self.convc2 = nn.Conv2d(256, 192, 3, padding=1)
        self.convf1 = nn.Conv2d(2, 128, 7, padding=3)
        self.convf2 = nn.Conv2d(128, 64, 3, padding=1)
        self.conv = nn.Conv2d(64 + 192, 126, 3, padding=1)

    def forward(self, flow, corr):
        cor = F.relu(self.convc2(F.relu(self.convc1(corr))))
        flo = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([cor, flo], 1))), flow], 1)


class SepConvGRU(nn.Module):
    def __init__(self, hidden_dim=128, input_dim=256):
        super().__init__()
        for g in "zrq":
            setattr(self, f"conv{g}1", nn.Conv2d(hidden_dim + input_dim, hidden_dim, (1, 5), padding=(0, 2)))
            setattr(self, f"conv{g}2", nn.Conv2d(hidden_dim + input_dim, hidden_dim, (5, 1), padding=(2, 0)))

    def forward(self, h, x):
        for a in "12":
            hx = torch.cat([h, x], 1)
            z = torch.sigmoid(getattr(self, f"convz{a}")(hx))
            r = torch.sigmoid(getattr(self, f"convr{a}")(hx))
            q = torch.tanh(getattr(self, f"convq{a}")(torch.cat([r * h, x], 1)))
            h = (1 - z) * h + z * q
        return h


class FlowHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(128, 256, 3, padding=1), nn.Conv2d(256, 2, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


class BasicUpdateBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = BasicMotionEncoder()
        self.gru = SepConvGRU()
        self.flow_head = FlowHead()
        self.mask = nn.Sequential(nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 576, 1))

    def forward(self, net, inp, corr, flow):
        net = self.gru(net, torch.cat([inp, self.encoder(flow, corr)], 1))
        return net, 0.25 * self.mask(net), self.flow_head(net)


def bilinear_sampler(img, coords):
    h, w = img.shape[-2:]
    xg, yg = coords.split([1, 1], dim=-1)
    grid = torch.cat([2 * xg / (w - 1) - 1, 2 * yg / (h - 1) - 1], -1)
    return F.grid_sample(img, grid, align_corners=True)


def coords_grid(b, h, w):
    c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(c[::-1], 0).float()[None].repeat(b, 1, 1, 1)


class CorrBlock:
    def __init__(self, f1, f2, num_levels=4, radius=4):
        self.num_levels, self.radius = num_levels, radius
        b, d, h, w = f1.shape
        corr = torch.matmul(f1.view(b, d, h * w).transpose(1, 2), f2.view(b, d, h * w))
        corr = (corr / torch.sqrt(torch.tensor(d).float())).reshape(b * h * w, 1, h, w)
        self.corr_pyramid = [corr]
        for _ in range(num_levels - 1):
            corr = F.avg_pool2d(corr, 2, stride=2)
            self.corr_pyramid.append(corr)

    def __call__(self, coords):
        r = self.radius
        coords = coords.permute(0, 2, 3, 1)
        b, h1, w1, _ = coords.shape
        d = torch.linspace(-r, r, 2 * r + 1)
        delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1).view(1, 2 * r + 1, 2 * r + 1, 2)
        out = []
        for i in range(self.num_levels):
            lvl = coords.reshape(b * h1 * w1, 1, 1, 2) / 2 ** i + delta
            out.append(bilinear_sampler(self.corr_pyramid[i], lvl).view(b, h1, w1, -1))
        return torch.cat(out, -1).permute(0, 3, 1, 2).contiguous().float()


class RAFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden_dim = self.context_dim = 128
        self.fnet = BasicEncoder(256, "instance")
        self.cnet = BasicEncoder(256, "batch")
        self.update_block = BasicUpdateBlock()

    def upsample_flow(self, flow, mask):
        n, _, h, w = flow.shape
        mask = torch.softmax(mask.view(n, 1, 9, 8, 8, h, w), dim=2)
        up = F.unfold(8 * flow, [3, 3], padding=1).view(n, 2, 9, 1, 1, h, w)
        up = torch.sum(mask * up, dim=2).permute(0, 1, 4, 2, 5, 3)
        return up.reshape(n, 2, 8 * h, 8 * w)

    def forward(self, image1, image2, iters=12):
        """``test_mode=True``: ``(coords1 - coords0, flow_up)``; also keeps ``self.last`` features."""
        image1, image2 = 2 * (image1 / 255.0) - 1.0, 2 * (image2 / 255.0) - 1.0
        fmap1, fmap2 = self.fnet([image1, image2])
        corr_fn = CorrBlock(fmap1.float(), fmap2.float(), radius=4)
        net, inp = torch.split(self.cnet(image1), [128, 128], dim=1)
        net, inp = torch.tanh(net), torch.relu(inp)
        self.last = {"fmap1": fmap1, "fmap2": fmap2, "net": net, "inp": inp}
        n, _, h, w = image1.shape
        coords0, coords1 = coords_grid(n, h // 8, w // 8), coords_grid(n, h // 8, w // 8)
        for _ in range(iters):
            corr = corr_fn(coords1)
            net, up_mask, delta = self.update_block(net, inp, corr, coords1 - coords0)
            coords1 = coords1 + delta
            flow_up = self.upsample_flow(coords1 - coords0, up_mask)
        return coords1 - coords0, flow_up
