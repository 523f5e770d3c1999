"""The Cellpose-SAM network: SAM ViT encoder (8×8 patches, global attention), neck, pixel-shuffle readout.

One code path builds every variant. ``large`` has exactly cellpose's ``CPSAM`` shapes (and parameter
names, so a cpsam state dict loads into it); ``small`` and ``tiny`` are narrower/shallower copies for
CPU users and for training on small machines.

Input: (B, 3, 256, 256) float32 normalised images. Output: (B, 3, 256, 256) = (dY, dX, cellprob logits),
with flows at the network's scale (≈ 5 × unit flows, as in cellpose); a network with ``classes`` = K > 0
appends K + 1 class logit maps (background, class 1..K; :mod:`phenoscope.segment.semantic`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from phenoscope.core.fastops import linear

# cpsam keeps SAM ViT-L's relative-position tables: 127 rows in the four global blocks of SAM
# (input 64×64), 27 rows in the others (window 14); all are resized to 63 rows at run time.
_SAM_VITL_GLOBAL = (5, 11, 17, 23)


def _sam_vitl_rel_rows() -> tuple[int, ...]:
    return tuple(127 if i in _SAM_VITL_GLOBAL else 27 for i in range(24))


@dataclass(frozen=True)
class NetConfig:
    """Hyper-parameters of a Cellpose-SAM network (all sizes in pixels / channels)."""

    depth: int = 24
    dim: int = 1024
    heads: int = 16
    mlp_ratio: float = 4.0
    patch: int = 8
    tile: int = 256
    in_chans: int = 3
    neck_dim: int = 256
    nout: int = 3
    # rows of each block's relative-position tables; () means 2·(tile/patch) − 1 (no resize needed)
    rel_pos_rows: tuple[int, ...] = field(default_factory=_sam_vitl_rel_rows)
    diam_mean: float = 30.0
    # feed a gray image stored as identical RGB planes as one channel (others zero), as phenoscope
    # trains its own models; cellpose (and so an imported cpsam) feeds the three copies
    merge_identical_channels: bool = False
    # channels of the full-resolution refinement path (:class:`FullResRefine`); 0 = none (cpsam's layout)
    skip: int = 0
    # a linear read-out of the cell diameter from the pooled neck features (:mod:`phenoscope.segment.size`)
    size_head: bool = False
    # semantic classes K (:mod:`phenoscope.segment.semantic`): K > 0 appends K + 1 class logit maps
    # (background, class 1..K) after the nout maps, read out from the neck by their own 1×1 conv; 0 = none
    classes: int = 0

    @property
    def maps(self) -> int:
        """Channels of the network's output: the ``nout`` maps (dY, dX, cellprob), then K + 1 class maps if any."""
        return self.nout + (self.classes + 1 if self.classes else 0)

    @property
    def grid(self) -> int:
        """Tokens per side (32 for 256² tiles and 8×8 patches)."""
        return self.tile // self.patch

    def rows(self, block: int) -> int:
        return self.rel_pos_rows[block] if self.rel_pos_rows else 2 * self.grid - 1


VARIANTS: dict[str, NetConfig] = {
    "large": NetConfig(),
    "small": NetConfig(depth=12, dim=384, heads=6, rel_pos_rows=(), merge_identical_channels=True),
    "tiny": NetConfig(depth=12, dim=192, heads=3, neck_dim=128, rel_pos_rows=(), merge_identical_channels=True),
    # the shipped default: 128² tiles (16×16 tokens) train 4× more steps per CPU-hour than 256²,
    # and a 1024² image still segments in a few seconds on a 2-core CPU
    "nano": NetConfig(depth=6, dim=192, heads=3, neck_dim=128, tile=128, rel_pos_rows=(), merge_identical_channels=True),
}


def is_backbone(name: str) -> bool:
    """Whether a :class:`CellposeSAMNet` parameter name belongs to the backbone: the ViT of the encoder,
    not its neck (``encoder.neck.*``) nor the read-out (``out``, ``refine``, ``size``, ``classify``)."""
    return name.startswith("encoder.") and not name.startswith("encoder.neck.")


def variant(name: str, **overrides) -> NetConfig:
    """The named configuration (``large``, ``small``, ``tiny``, ``nano``), optionally with fields overridden."""
    if name not in VARIANTS:
        raise ValueError(f"unknown network variant {name!r}; choose from {sorted(VARIANTS)}")
    return replace(VARIANTS[name], **overrides)


def resize_rel_pos(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Linearly resize a (L, C) relative-position table to (rows, C), exactly as SAM's ``get_rel_pos``."""
    if table.shape[0] == rows:
        return table
    out = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=rows, mode="linear")
    return out.reshape(-1, rows).permute(1, 0)


def rel_pos_lookup(table: torch.Tensor, size: int) -> torch.Tensor:
    """(L, C) table → (size, size, C) embeddings R[q, k] = table'[q − k + size − 1], table' resized to 2·size−1."""
    resized = resize_rel_pos(table, 2 * size - 1)
    coords = torch.arange(size, device=table.device)
    return resized[coords[:, None] - coords[None, :] + size - 1]


class Attention(nn.Module):
    """Global multi-head attention with SAM's decomposed relative-position bias, fused via SDPA."""

    def __init__(self, dim: int, heads: int, rel_rows: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(rel_rows, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(rel_rows, head_dim))
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def rel_tables(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, h, head_dim) and (w, w, head_dim) rel-pos embeddings; cached while weights are unchanged.

        Under autograd (training) they are recomputed so gradients reach the tables.
        """
        if torch.is_grad_enabled() and self.rel_pos_h.requires_grad:
            return rel_pos_lookup(self.rel_pos_h, h), rel_pos_lookup(self.rel_pos_w, w)
        key = (h, w, self.rel_pos_h._version, self.rel_pos_w._version, self.rel_pos_h.data_ptr(),
               self.rel_pos_w.data_ptr(), self.rel_pos_h.device, self.rel_pos_h.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, rel_pos_lookup(self.rel_pos_h, h), rel_pos_lookup(self.rel_pos_w, w))
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor, bias_out: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, W, C) tokens → (B, H, W, C).

        ``bias_out`` (≥ B·heads·(HW)² elements, x's dtype), if given, receives the (B, heads, HW, HW)
        rel-pos bias instead of a fresh allocation (inference: the buffer is reused by every block,
        so its pages are faulted in once per forward, not once per block).
        """
        b, h, w, c = x.shape
        qkv = linear(x, self.qkv).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        rh, rw = self.rel_tables(h, w)
        rq = q.reshape(b, self.heads, h, w, -1)
        # contiguous terms make the broadcast sum come out contiguous, so the (N, N) view is free
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh).contiguous()
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw).contiguous()
        if bias_out is None:
            bias = rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
        else:
            bias = torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=bias_out[: b * self.heads * (h * w) ** 2].view(b, self.heads, h, w, h, w))
        bias = bias.view(b, self.heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return linear(out.transpose(1, 2).reshape(b, h, w, c), self.proj)


    def forward_subset(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Attention among a subset of the tokens of an h × w grid (MAE encoder).

        x: (B, K, C) tokens at grid rows ``rows`` and columns ``cols`` (long (B, K)) → (B, K, C); the
        rel-pos bias of each pair is the one it has in the full grid.
        """
        b, k, c = x.shape
        qkv = linear(x, self.qkv).reshape(b, k, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, key, v = qkv.unbind(0)  # (B, heads, K, head_dim)
        rh, rw = self.rel_tables(h, w)
        # q_i · R_h[row_i, r] for every grid row r, then picked at the key's row (same for columns)
        qh = torch.einsum("bnic,birc->bnir", q, rh[rows])
        qw = torch.einsum("bnic,birc->bnir", q, rw[cols])
        bias = qh.gather(-1, rows[:, None, None, :].expand(-1, self.heads, k, -1)) + qw.gather(
            -1, cols[:, None, None, :].expand(-1, self.heads, k, -1))
        out = F.scaled_dot_product_attention(q, key, v, attn_mask=bias)
        return linear(out.transpose(1, 2).reshape(b, k, c), self.proj)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.lin1, gelu=True), self.lin2)


class Block(nn.Module):
    """Pre-norm transformer block (SAM parameter names)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, rel_rows: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, rel_rows)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, bias_out: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias_out)
        return x + self.mlp(self.norm2(x))

    def forward_subset(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The block on a subset (B, K, C) of an h × w token grid (see :meth:`Attention.forward_subset`)."""
        x = x + self.attn.forward_subset(self.norm1(x), rows, cols, h, w)
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W) maps (SAM's neck norm)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)


class Encoder(nn.Module):
    """SAM ViT image encoder with global attention in every block, followed by SAM's neck.

    It is a :class:`phenoscope.nn.Backbone`, so every SSL method can pretrain it: ``forward_tokens``
    gives the neck features as patch tokens (width ``embed_dim`` = ``neck_dim``) and their mean as
    ``cls``. The neck's features are what the segmentation readout reads, and they are layer-normed per
    token like a ViT's final norm, so pretraining through them trains every weight the readout sees.
    ``mask_token=True`` adds the learnable (1, dim) mask token; the segmentation network is built
    without it, so its state dict keeps cpsam's keys.
    """

    def __init__(self, cfg: NetConfig, mask_token: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.dim, cfg.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.dim))
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.rows(i)) for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.dim, cfg.neck_dim, kernel_size=1, bias=False),
            LayerNorm2d(cfg.neck_dim),
            nn.Conv2d(cfg.neck_dim, cfg.neck_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.neck_dim),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim)) if mask_token else None

    @property
    def embed_dim(self) -> int:
        """Width of the output tokens (the neck's channels)."""
        return self.cfg.neck_dim

    @property
    def patch_size(self) -> int:
        return self.cfg.patch

    @property
    def in_chans(self) -> int:
        return self.cfg.in_chans

    @property
    def depth(self) -> int:
        return self.cfg.depth

    def input_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_chans, H, W) images → (B, H/patch, W/patch, dim) tokens entering the first block.

        ``masks`` (bool (B, N), N = tokens in row-major order) replace patch embeddings by ``mask_token``
        before the position embedding. The position grid is resized bicubically for inputs other than
        ``tile`` × ``tile`` (local crops); at the tile size it is used as stored.
        """
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected input (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        t = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this encoder was built without a mask token (Encoder(cfg, mask_token=True))")
            if masks.shape != (t.shape[0], t.shape[1] * t.shape[2]):
                raise ValueError(f"masks must have shape {(t.shape[0], t.shape[1] * t.shape[2])}, got {tuple(masks.shape)}")
            t = torch.where(masks.reshape(t.shape[:3]).unsqueeze(-1), self.mask_token.to(t.dtype), t)
        pos = self.pos_embed
        if pos.shape[1:3] != t.shape[1:3]:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=t.shape[1:3], mode="bicubic").permute(0, 2, 3, 1)
        return t + pos

    def forward(self, x: torch.Tensor, layer_drop: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, in_chans, T, T) images → (B, neck_dim, T/patch, T/patch) features.

        ``layer_drop`` (training): block i is skipped for each sample with probability
        ``layer_drop · i / (depth − 1)`` (cellpose's linear ramp); skipped samples are not computed.
        """
        return self.features(self.input_tokens(x), layer_drop, generator)

    def features(self, x: torch.Tensor, layer_drop: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Input tokens (B, h, w, dim) → neck features (B, neck_dim, h, w); ``layer_drop`` as in :meth:`forward`."""
        if layer_drop > 0 and self.training:
            p = torch.linspace(0, layer_drop, len(self.blocks))
            keep = torch.rand(len(self.blocks), x.shape[0], generator=generator) >= p[:, None]
            for blk, k in zip(self.blocks, keep):
                if k.all():
                    x = blk(x)
                elif k.any():
                    idx = k.nonzero()[:, 0].to(x.device)
                    x = x.index_copy(0, idx, blk(x.index_select(0, idx)))
            return self.neck(x.permute(0, 3, 1, 2))
        bias_out = None
        if x.device.type == "cpu" and not torch.is_grad_enabled():  # one rel-pos bias buffer for all blocks
            n = x.shape[1] * x.shape[2]
            bias_out = x.new_empty(x.shape[0] * self.blocks[0].attn.heads * n * n)
        for blk in self.blocks:
            x = blk(x, bias_out)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """:class:`phenoscope.nn.Backbone` view: images (B, C, H, W) → ``patches`` (B, N, neck_dim), the neck
        features in row-major order, and ``cls`` (B, neck_dim), their mean.

        ``keep`` (long (B, K), MAE): the blocks see only these patches, each with its place in the grid; the
        neck then runs on the grid with zeros at the other places, and ``patches`` (B, K, neck_dim) are its
        features at the kept places.
        """
        t = self.input_tokens(x, masks)
        if keep is None:
            patches = self.features(t).flatten(2).transpose(1, 2)
            return {"cls": patches.mean(dim=1), "patches": patches}
        b, h, w, dim = t.shape
        index = keep.unsqueeze(-1).expand(-1, -1, dim)
        sub = t.reshape(b, h * w, dim).gather(1, index)
        rows, cols = keep // w, keep % w
        for blk in self.blocks:
            sub = blk.forward_subset(sub, rows, cols, h, w)
        grid = sub.new_zeros(b, h * w, dim).scatter(1, index, sub).reshape(b, h, w, dim)
        feats = self.neck(grid.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        patches = feats.gather(1, keep.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        return {"cls": patches.mean(dim=1), "patches": patches}


class FullResRefine(nn.Module):
    """A residual correction of the pixel-shuffled output from full-resolution convolutions.

    The ViT sees the image only through 8×8 patches, so fine boundaries reach the output through one
    linear read-out per patch. This path adds two 3×3 convolutions on the input pixels, fuses them with
    the neck features upsampled to full resolution and the coarse output, and adds the result to the
    coarse output. Its last layer starts at zero, so a network gains the path without changing its
    outputs (:func:`with_refine`). Cost per pixel: ≈ 3.2 k multiply-adds for ``skip = 8``, ≈ 10 k for 16
    (+20 % and +47 % per nano tile on a 2-core CPU).
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        c = cfg.skip
        self.patch = cfg.patch
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_chans, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU())
        self.up = nn.Conv2d(cfg.neck_dim, c * cfg.patch**2, kernel_size=1)
        self.fuse = nn.Sequential(nn.Conv2d(2 * c + cfg.nout, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, cfg.nout, 1))
        nn.init.zeros_(self.fuse[-1].weight)
        nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, x: torch.Tensor, feats: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """x (B, in_chans, T, T) input, feats (B, neck_dim, T/p, T/p), coarse (B, nout, T, T) → (B, nout, T, T)."""
        up = F.pixel_shuffle(self.up(feats), self.patch)
        return coarse + self.fuse(torch.cat([self.stem(x), up, coarse], dim=1))


class CellposeSAMNet(nn.Module):
    """Encoder → 1×1 conv to nout·patch² channels → pixel-shuffle(patch): (dY, dX, cellprob); with
    ``cfg.skip`` a :class:`FullResRefine` path then corrects that output at full resolution. With
    ``cfg.classes`` = K, a second 1×1 conv + pixel-shuffle (``classify``, not refined) appends K + 1 class
    logit maps (background, class 1..K); :func:`phenoscope.segment.semantic.with_classes` initialises it."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.out = nn.Conv2d(cfg.neck_dim, cfg.nout * cfg.patch**2, kernel_size=1)
        self.refine = FullResRefine(cfg) if cfg.skip else None
        self.size = nn.Linear(cfg.neck_dim, 1) if cfg.size_head else None
        self.classify = nn.Conv2d(cfg.neck_dim, (cfg.classes + 1) * cfg.patch**2, kernel_size=1) if cfg.classes else None

    def forward(self, x: torch.Tensor, layer_drop: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, in_chans, tile, tile) → (B, maps, tile, tile); ``layer_drop`` as in :meth:`Encoder.forward`."""
        return self.forward_features(x, layer_drop, generator)[0]

    def forward_features(
        self, x: torch.Tensor, layer_drop: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs (B, maps, tile, tile), neck features (B, neck_dim, tile/patch, tile/patch)) of a batch."""
        if x.shape[1:] != (self.cfg.in_chans, self.cfg.tile, self.cfg.tile):
            raise ValueError(
                f"expected input (B, {self.cfg.in_chans}, {self.cfg.tile}, {self.cfg.tile}), got {tuple(x.shape)}"
            )
        feats = self.encoder(x, layer_drop, generator)
        y = F.pixel_shuffle(self.out(feats), self.cfg.patch)
        if self.refine is not None:
            y = self.refine(x, feats, y)
        if self.classify is not None:
            y = torch.cat([y, F.pixel_shuffle(self.classify(feats), self.cfg.patch)], dim=1)
        return y, feats


def build_net(cfg: NetConfig | str = "large") -> CellposeSAMNet:
    """A randomly initialised network for a config or a variant name."""
    return CellposeSAMNet(variant(cfg) if isinstance(cfg, str) else cfg)


def grown(net: CellposeSAMNet, **changes) -> CellposeSAMNet:
    """A copy of ``net`` whose config has ``changes`` that only add parts (``skip``, ``size_head``, ``classes``): every
    weight of ``net`` is carried over (strictly), the new parts keep their initialisation."""
    out = CellposeSAMNet(replace(net.cfg, **changes))
    new, old = out.state_dict(), net.state_dict()
    lost = sorted(k for k in old if k not in new or new[k].shape != old[k].shape)
    if lost:
        raise ValueError(f"{changes} would drop or reshape weights of the network: {', '.join(lost[:5])}")
    out.load_state_dict({**new, **old})
    return out


def with_refine(net: CellposeSAMNet, channels: int) -> CellposeSAMNet:
    """A copy of ``net`` with a new :class:`FullResRefine` path of ``channels`` (its outputs are ``net``'s
    until the path trains); ``net`` must not have one yet."""
    if net.cfg.skip:
        raise ValueError(f"the network already has a full-resolution path ({net.cfg.skip} channels)")
    return grown(net, skip=channels)
