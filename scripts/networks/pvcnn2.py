"""PVCNN2 denoiser of PVD (Zhou et al., ICCV 2021) for conditional point-cloud completion.

The architecture of PVD's ``PVCNN2Base`` as used by the paper (pcdiff-implant:
``embed_dim=64, use_att=True, dropout=0.1, extra_feature_channels=0``): four set-abstraction
(SA) levels with point-voxel convolutions (PVConv), a global attention over the coarsest
centres, four feature-propagation (FP) levels and a per-point head predicting the noise.
The ``paper`` preset has 27,648,963 parameters (the paper's "27.65 M").

Tensors are channels-first: ``x (B, 3, N)`` with the condition points first along ``N``.

Not in the reference: ``coordinate_skip`` (on in the ``small`` preset, off in ``paper``) blends the head's
output with the input coordinates by a learned gate of the time step, so that an x0 predictor can keep
the points it is given at low noise (the reference predicts the noise and never needs to). The gate
starts closed, so a new network with it is the network without it.

The sinusoidal time embedding is the same for every point, so the reference's grouping
(gather + max) and 3-NN interpolation (weights summing to 1) leave it unchanged; it is carried
as ``(B, E, 1)`` and broadcast wherever the reference concatenates it (equal up to rounding).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.networks.pvcnn_ops import (
    avg_voxelize,
    ball_query,
    furthest_point_sample,
    group,
    three_nn_interpolate,
    trilinear_devoxelize,
)

__all__ = ["PRESETS", "PVCNN2Denoiser", "build_denoiser", "weighted_group_norm", "unique_slots"]

# Architecture of PVD's PVCNN2 (before width / resolution multipliers).
# SA level: PVConv blocks (out channels, count, voxel resolution) or None, then the MLP of the
# grouping module. PVD's configs list 3 PVConv blocks at levels 1 and 2, but its constructor
# only instantiates the first block of every level after level 0; the counts here are what
# the reference network actually contains.
_SA_CONVS = ((32, 2, 32), (64, 1, 16), (128, 1, 8), None)
_SA_MLPS = ((32, 64), (64, 128), (128, 256), (256, 256, 512))
# FP level: MLP after interpolation, then PVConv blocks (out channels, count, voxel resolution).
_FP_MLPS = ((256, 256), (256, 256), (256, 128), (128, 128, 64))
_FP_CONVS = ((256, 3, 8), (256, 3, 8), (128, 2, 16), (64, 2, 32))
_GROUPS = 8  # GroupNorm groups everywhere (and attention / SE divisibility)
_SKIP_GAIN = 10.0  # coordinate_skip: gate = gain x Linear(time embedding)


def _scaled_centers(num_points: int) -> tuple[int, ...]:
    """Centre counts per SA level in the paper's proportion (10,240 / 2,560 / 640 / 160 of 30,720)."""
    return tuple(max(1, round(num_points * c / 30720)) for c in (10240, 2560, 640, 160))


PRESETS: dict[str, dict] = {
    # The published configuration (pcdiff-implant): 27,648 condition + 3,072 generated points,
    # 128 neighbours at every level (PVD's ShapeNet models use 32).
    "paper": dict(num_points=30720, num_condition=27648, width_multiplier=1.0, voxel_resolution_multiplier=1.0,
                  centers=(10240, 2560, 640, 160), radii=(0.1, 0.2, 0.4, 0.8), neighbors=(128, 128, 128, 128),
                  embed_dim=64, dropout=0.1, head_dropout=0.5, use_attention=True, coordinate_skip=False, num_mirror=0),
    # Trains on 2 CPU cores (~0.4-0.6 s forward + backward for batch 4): 10x fewer points (radii
    # x sqrt(10) keep ~10 hits per ball), quarter width (1.76 M parameters), voxel grids
    # 16/8/4, 32 neighbours, and the coordinate skip. The shipped weights (models/model.pt) are this preset.
    "small": dict(num_points=3072, num_condition=2688, width_multiplier=0.25, voxel_resolution_multiplier=0.5,
                  centers=_scaled_centers(3072), radii=(0.3, 0.6, 1.2, 2.4), neighbors=(32, 32, 32, 32),
                  embed_dim=32, dropout=0.1, head_dropout=0.5, use_attention=True, coordinate_skip=True, num_mirror=0),
    # Unit tests only.
    "tiny": dict(num_points=512, num_condition=448, width_multiplier=0.25, voxel_resolution_multiplier=0.25,
                 centers=_scaled_centers(512), radii=(0.8, 1.6, 3.2, 6.4), neighbors=(16, 16, 16, 16),
                 embed_dim=16, dropout=0.1, head_dropout=0.5, use_attention=True, coordinate_skip=False, num_mirror=0),
}
# ``small`` conditioned on the skull's mirror image: the last 384 of its 2,688 condition points are mirrored
# surface points over the opening (scripts/data/points.py, MirrorPointsd), flagged by a fourth input channel;
# same cost per step as ``small``
PRESETS["small_mirror"] = {**PRESETS["small"], "num_mirror": 384}


def weighted_group_norm(x: torch.Tensor, weight: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(x)`` with statistics over positions weighted by ``weight`` (a position of weight w
    counts as w copies). ``x (B, C, *S)``, ``weight (B, *S)``. torch has no weighted GroupNorm,
    hence this small function; with all weights 1 it equals ``norm(x)``. Weighted sums are
    batched matrix-vector products; mean and variance are computed in two passes (stable).
    """
    b, c = x.shape[:2]
    g = norm.num_groups
    xf = x.reshape(b, c, -1)
    w = weight.reshape(b, -1, 1).to(x.dtype)
    count = w.sum(dim=1, keepdim=True) * (c // g)  # (B, 1, 1) weighted positions per group

    def group_mean(v: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> weighted group mean per channel (B, C, 1)
        per_group = torch.bmm(v, w).view(b, g, c // g).sum(dim=2, keepdim=True) / count
        return per_group.expand(b, g, c // g).reshape(b, c, 1)

    centred = xf - group_mean(xf)
    scale = torch.rsqrt(group_mean(centred * centred) + norm.eps) * norm.weight.view(1, c, 1)
    return torch.addcmul(norm.bias.view(1, c, 1), centred, scale).view_as(x)


class SharedMLP(nn.Module):
    """Per-point MLP: (1x1 conv, GroupNorm(8), Swish) per layer on ``(B, C, N)`` or ``(B, C, M, K)``.

    ``forward(x, weight=None)``: optional position weights ``(B, *S)`` for the GroupNorm
    statistics (see ``weighted_group_norm``).
    """

    def __init__(self, in_channels: int, out_channels: tuple[int, ...], dim: int = 1):
        super().__init__()
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        for oc in out_channels:
            self.convs.append(conv(in_channels, oc, 1))
            self.norms.append(nn.GroupNorm(_GROUPS, oc))
            in_channels = oc

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            x = F.silu(norm(x) if weight is None else weighted_group_norm(x, weight, norm))
        return x


class SE3d(nn.Module):
    """Squeeze-and-excitation on ``(B, C, R, R, R)`` grids (reduction 8, ReLU; PVD ``with_se_relu``)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(),
                                nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3, 4)))[:, :, None, None, None]


class Attention(nn.Module):
    """PVD self-attention over all positions of ``(B, C, ...)``: single head, *unscaled* logits,
    residual, then GroupNorm + Swish. Used on 16^3 voxel grids and on the coarsest centres."""

    def __init__(self, channels: int):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Conv1d(channels, channels, 1) for _ in range(4))
        self.norm = nn.GroupNorm(_GROUPS, channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2)  # (B, C, L)
        # (B, 1, L, C); contiguous so that CPU SDPA takes its flash kernel (~3x faster than the math path)
        q, k, v = (f(h).transpose(1, 2).contiguous().unsqueeze(1) for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1).transpose(1, 2)
        return self.act(self.norm(self.out(h).view_as(x) + x))


class PVConv(nn.Module):
    """Point-voxel convolution: ``features (B, C_in, N)``, ``coords (B, 3, N)`` -> ``(B, C_out, N)``.

    Voxel branch (average voxelization, two 3^3 convs with GroupNorm / Swish / dropout, optional
    attention or SE, trilinear devoxelization) plus a point-wise MLP branch.
    """

    def __init__(self, in_channels: int, out_channels: int, resolution: int, attention: bool = False,
                 dropout: float = 0.1, with_se: bool = False):
        super().__init__()
        self.resolution = int(resolution)
        layers = [nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(_GROUPS, out_channels), nn.SiLU(),
                  nn.Dropout(dropout),
                  nn.Conv3d(out_channels, out_channels, 3, padding=1), nn.GroupNorm(_GROUPS, out_channels),
                  Attention(out_channels) if attention else nn.SiLU()]
        if with_se and not attention:
            layers.append(SE3d(out_channels))
        self.voxel_layers = nn.Sequential(*layers)
        self.point_features = SharedMLP(in_channels, (out_channels,))

    def forward(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        grid, norm_coords = avg_voxelize(features, coords, self.resolution)
        voxel = trilinear_devoxelize(self.voxel_layers(grid), norm_coords, self.resolution)
        return voxel + self.point_features(features)


def unique_slots(nbr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact ball-query output to its distinct slots.

    ``nbr (B, M, K)`` in ball-query layout (distinct hits, then copies of the first hit) ->
    ``(nbr[..., :K'] (B, M, K'), weight (B, M, K'))`` with ``K'`` the largest hit count; a
    slot's weight is how often its index occurs among the K slots (0 for leftover copies).
    """
    k = nbr.shape[2]
    hits = (nbr != nbr[..., :1]).sum(dim=2, keepdim=True) + 1  # (B, M, 1)
    kk = int(hits.max())
    weight = (torch.arange(kk, device=nbr.device) < hits).float()
    weight[..., 0] += (k - hits[..., 0]).float()
    return nbr[..., :kk], weight


class SetAbstraction(nn.Module):
    """PVConv blocks, then furthest point sampling + ball query + shared MLP + max pooling.

    ``features (B, C, N)``, ``coords (B, 3, N)`` -> ``(features (B, C', M), centres (B, 3, M))``.
    Grouped inputs are ``[neighbour coords - centre, neighbour features]``. The reference runs
    the MLP on all K slots, most of which repeat the first hit (about 10 hits per ball at the
    paper's density, K = 128); the MLP is point-wise and max pooling ignores repeats, so only
    distinct slots are computed, with repeat counts as GroupNorm weights: same result, ~5-10x
    less work at the SA levels.
    """

    def __init__(self, convs: list[PVConv], num_centers: int, radius: float, num_neighbors: int,
                 in_channels: int, mlp_channels: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.num_centers, self.radius, self.num_neighbors = num_centers, radius, num_neighbors
        self.mlp = SharedMLP(in_channels + 3, mlp_channels, dim=2)

    def forward(self, features: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            features = conv(features, coords)
        xyz = coords.transpose(1, 2)
        center_idx = furthest_point_sample(xyz, self.num_centers)
        centers = group(coords, center_idx.unsqueeze(2)).squeeze(3)  # (B, 3, M)
        nbr = ball_query(centers.transpose(1, 2), xyz, self.radius, self.num_neighbors)
        nbr, weight = unique_slots(nbr)
        grouped = torch.cat([group(coords, nbr) - centers.unsqueeze(3), group(features, nbr)], dim=1)
        return self.mlp(grouped, weight).amax(dim=3), centers


class FeaturePropagation(nn.Module):
    """3-NN interpolation from centres to points, skip concatenation, MLP, then PVConv blocks.

    ``coords (B, 3, n)``, ``centers (B, 3, m)``, ``center_features (B, C, m)``,
    ``skip (B, C_skip, n)`` -> ``(B, C', n)``.
    """

    def __init__(self, in_channels: int, mlp_channels: tuple[int, ...], convs: list[PVConv]):
        super().__init__()
        self.mlp = SharedMLP(in_channels, mlp_channels)
        self.convs = nn.ModuleList(convs)

    def forward(self, coords: torch.Tensor, centers: torch.Tensor, center_features: torch.Tensor,
                skip: torch.Tensor) -> torch.Tensor:
        interp = three_nn_interpolate(coords.transpose(1, 2), centers.transpose(1, 2), center_features)
        features = self.mlp(torch.cat([interp, skip], dim=1))
        for conv in self.convs:
            features = conv(features, coords)
        return features


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of integer steps ``t (B,)`` + MLP (Linear, LeakyReLU 0.1, Linear) -> ``(B, E)``."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4:
            raise ValueError(f"embed_dim must be >= 4, got {dim}")
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float64) * (-math.log(10000) / (half - 1)))  # as PVD: float64
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1), nn.Linear(dim, dim))
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.float()[:, None] * self.freqs[None]
        emb = F.pad(torch.cat([arg.sin(), arg.cos()], dim=1), (0, self.dim % 2))
        return self.mlp(emb)


def _channels(c: int, r: float, what: str) -> int:
    out = int(r * c)
    if out < _GROUPS or out % _GROUPS:
        raise ValueError(f"width_multiplier={r} gives {out} channels for {what}; need a positive multiple of {_GROUPS}")
    return out


class PVCNN2Denoiser(nn.Module):
    """PVD's conditional PVCNN2 noise predictor: ``forward(x (B, 3, N), t (B,) long) -> eps (B, 3, N)``.

    With ``num_mirror`` > 0 the condition points' last ``num_mirror`` (points ``num_condition - num_mirror``
    to ``num_condition``) are the skull's mirror image over its opening, marked by a flag feature.

    ``preset`` names an entry of ``PRESETS``; keyword overrides replace its values. The network
    itself works for any ``N`` (at least the first level's centre count); ``num_points`` and
    ``num_condition`` are recorded for the diffusion / data pipeline. ``config`` holds the
    resolved preset.
    """

    def __init__(self, preset: str = "paper", **overrides):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        unknown = sorted(set(overrides) - set(PRESETS[preset]))
        if unknown:
            raise ValueError(f"unknown PVCNN2Denoiser option(s) {unknown}; valid: {sorted(PRESETS[preset])}")
        cfg = {**PRESETS[preset], **overrides}
        for key in ("centers", "radii", "neighbors"):
            cfg[key] = tuple(cfg[key])
            if len(cfg[key]) != len(_SA_MLPS):
                raise ValueError(f"{key} needs {len(_SA_MLPS)} values (one per SA level), got {cfg[key]}")
        if not 0 <= cfg["num_condition"] < cfg["num_points"]:
            raise ValueError(f"need 0 <= num_condition < num_points, got {cfg['num_condition']}, {cfg['num_points']}")
        if not 0 <= cfg["num_mirror"] < max(cfg["num_condition"], 1):
            raise ValueError(f"need 0 <= num_mirror < num_condition, got {cfg['num_mirror']}, {cfg['num_condition']}")
        self.config = cfg
        r, vr, e, p = cfg["width_multiplier"], cfg["voxel_resolution_multiplier"], cfg["embed_dim"], cfg["dropout"]
        use_att = cfg["use_attention"]

        def res(v: int) -> int:
            out = int(vr * v)
            if out < 2:
                raise ValueError(f"voxel_resolution_multiplier={vr} gives voxel resolution {out} (< 2)")
            return out

        self.time_embed = TimeEmbedding(e)
        # level 0 sees the raw coordinates as features, and with num_mirror a flag: 1 on the mirror points
        sa, skip_channels, in_ch = [], [], 3 + (cfg["num_mirror"] > 0)
        for level, (conv_cfg, mlp) in enumerate(zip(_SA_CONVS, _SA_MLPS)):
            skip_channels.append(in_ch if level else 0)  # reference: no skip features at full resolution
            feat_ch = in_ch + (e if level else 0)  # time embedding appended from level 1 on
            convs = []
            if conv_cfg is not None:
                oc, count, vres = conv_cfg
                oc = _channels(oc, r, f"SA level {level}")
                for b in range(count):  # PVD: attention instead of SE in the first block of odd levels (16^3)
                    convs.append(PVConv(feat_ch, oc, res(vres), attention=use_att and level % 2 == 1 and b == 0,
                                        dropout=p, with_se=True))
                    feat_ch = oc
            mlp = tuple(_channels(c, r, f"SA level {level}") for c in mlp)
            sa.append(SetAbstraction(convs, cfg["centers"][level], cfg["radii"][level], cfg["neighbors"][level],
                                     feat_ch, mlp))
            in_ch = mlp[-1]
        self.sa = nn.ModuleList(sa)
        self.global_att = Attention(in_ch) if use_att else None

        fp = []
        for level, (mlp, (oc, count, vres)) in enumerate(zip(_FP_MLPS, _FP_CONVS)):
            mlp = tuple(_channels(c, r, f"FP level {level}") for c in mlp)
            fp_in = in_ch + e + skip_channels[-1 - level]
            oc = _channels(oc, r, f"FP level {level}")
            # no attention in FP blocks: PVD's condition for it there can never be true
            convs = [PVConv(mlp[-1] if b == 0 else oc, oc, res(vres), dropout=p, with_se=True) for b in range(count)]
            fp.append(FeaturePropagation(fp_in, mlp, convs))
            in_ch = oc
        self.fp = nn.ModuleList(fp)
        hidden = _channels(128, r, "head")
        self.head = nn.Sequential(SharedMLP(in_ch, (hidden,)), nn.Dropout(cfg["head_dropout"]), nn.Conv1d(hidden, 3, 1))
        # coordinate_skip: out = head + gate(t) * (x - head), a blend of the head with the input
        # coordinates, one gate per axis from the time embedding, zero at start (the network is then
        # the one without the skip). The PVCNN reaches a point's output only through interpolated
        # coarse features, so it cannot copy its input coordinates, which an x0 predictor at low noise
        # needs. As a blend the gate's gradient where the input is the better estimate is -2 err^2: it
        # opens without the head having to change first. The gain lets Adam (steps ~ lr per
        # parameter) move the gate by O(0.01) per step instead of O(lr).
        self.skip_gate = nn.Linear(e, 3) if cfg["coordinate_skip"] else None
        if self.skip_gate is not None:
            nn.init.zeros_(self.skip_gate.weight)
            nn.init.zeros_(self.skip_gate.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x (B, 3, N)`` float (condition points first), ``t (B,)`` integer steps -> ``(B, 3, N)``."""
        if x.dim() != 3 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (B, 3, N), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if x.shape[2] < self.config["centers"][0]:
            raise ValueError(f"x has {x.shape[2]} points, fewer than the {self.config['centers'][0]} SA centres")
        temb = self.time_embed(t)[:, :, None]  # (B, E, 1), constant over points

        def with_temb(f: torch.Tensor) -> torch.Tensor:
            return torch.cat([f, temb.expand(-1, -1, f.shape[2])], dim=1)

        features, coords = x, x
        if self.config["num_mirror"]:
            flag = torch.zeros_like(x[:, :1])
            flag[:, :, self.config["num_condition"] - self.config["num_mirror"] : self.config["num_condition"]] = 1.0
            features = torch.cat([x, flag], dim=1)
        coords_list, skips = [], []
        for level, sa in enumerate(self.sa):
            coords_list.append(coords)
            skips.append(features if level else x[:, :0])
            features, coords = sa(with_temb(features) if level else features, coords)
        if self.global_att is not None:
            features = self.global_att(features)
        for level, fp in enumerate(self.fp):
            target = coords_list[-1 - level]
            features = fp(target, coords, with_temb(features), skips[-1 - level])
            coords = target
        out = self.head(features)
        if self.skip_gate is not None:
            out = out + _SKIP_GAIN * self.skip_gate(temb[:, :, 0])[:, :, None] * (x - out)
        return out


def build_denoiser(preset: str = "paper", **overrides) -> PVCNN2Denoiser:
    """Config-friendly factory: ``PVCNN2Denoiser(preset, **overrides)``."""
    return PVCNN2Denoiser(preset, **overrides)
