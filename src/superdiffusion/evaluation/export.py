"""Deployment export: a run's predictor as one TorchScript file that segments raw images with plain PyTorch.

The artefact (`torch.jit.load(path)`) maps a raw image tensor (C, *spatial) to an int64 label map of the
same spatial shape, doing everything `superdiffusion predict` does, inside the module, so that the masks
are the same voxel for voxel:

* intensity normalisation per channel: `percentile` reproduces numpy's linear-interpolated percentiles and
  its float64 arithmetic exactly (kthvalue instead of a full sort); `zscore` agrees up to float rounding;
* resampling by data.scale and back (F.interpolate, bilinear/trilinear, align_corners False);
* a 2D network on a 3D volume runs slice-wise along data.slice_axis, slices chunked as in inference.py;
* MONAI 1.6's sliding_window_inference(mode="gaussian", sigma_scale 0.125, constant zero padding)
  re-implemented in TorchScript: same window positions, batching, blending order and crop. Windows are
  computed per call (any input size works); the Gaussian importance map depends only on the window size
  (train.patch) and is precomputed with MONAI at export time;
* softmax, resampling back to the input grid, argmax (first maximum on ties, as numpy).

What is scripted: plain segmentation U-Nets (Supervised, CPS net1/net2, Mean Teacher student/teacher, the
CoTrain/SuperDiffusion student), the CPS ensemble, and the diffusion teacher's fixed-t single pass (also
the "twin" student). Their stochastic part, the inference noise, is deterministic in this package (a
generator seeded with diffusion.noise_seed per call of the predictor, so it depends only on the number of
windows in a call); it is generated at export time for every possible window batch size (1..sw_batch_size)
and baked in as a buffer. DDIM and ensemble teacher inference are not exported. The U-Net's forward is
re-stated here in scriptable form over the same submodules (nets/unet.py uses Python-only constructs);
the export test guards the equivalence. No superdiffusion import is needed to load or run the artefact.
`probabilities(image)` is exported too (class probabilities at the input resolution).

Restrictions: the artefact is saved on the CPU (`.to(device)` moves it, baked noise included); the window size
is fixed (train.patch) but images of any size, and 3D volumes for a 2D net, work; TorchScript is deprecated from
torch 2.9 on but still loads and runs (torch 2.13 here). No `from __future__ import annotations` in this file:
TorchScript reads the annotations of the scripted code.
"""

import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from torch import Tensor, nn

from ..checkpoint import first_sentence
from ..errors import InputError
from ..methods.base import Method
from ..methods.baselines import CPS
from ..methods.superdiffusion import CoTrain, DiffusionTeacher
from ..nets.unet import NETS, SegNet, UNet
from ..outputs import check_output_file
from .predict import load_run, use_threads

ARTEFACT_FORMAT = "superdiffusion-torchscript-v1"


# ---- the networks, in scriptable form ------------------------------------------------------------
class _Block(nn.Module):
    """nets.unet.ConvBlock's forward; an Identity stands in for a missing time projection."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.use_time = block.time is not None
        self.time = block.time if self.use_time else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x = self.conv1(x)
        if self.use_time:
            x = x + self.time(temb).view([temb.shape[0], -1] + [1] * (x.dim() - 2))
        return self.conv2(x)


class _Level(nn.Module):
    def __init__(self, first: nn.Module, block: _Block):
        super().__init__()
        self.first, self.block = first, block

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.block(self.first(x), temb)


class ScriptUNet(nn.Module):
    """nets.unet.UNet.forward over the same submodules (same weights, same ops, same order)."""

    def __init__(self, net: UNet):
        super().__init__()
        self.timed = net.time_mlp is not None
        self.time_mlp = net.time_mlp if self.timed else nn.Identity()
        self.emb_dim = int(net.stem.conv1[0].out_channels)
        self.stem = _Block(net.stem)
        self.downs = nn.ModuleList(_Level(d, _Block(e)) for d, e in zip(net.down, net.encoders))
        self.ups = nn.ModuleList(_Level(u, _Block(d)) for u, d in zip(reversed(net.up), reversed(net.decoders)))
        self.head = net.head

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = x.new_zeros(0)
        if self.timed:
            half = self.emb_dim // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
            args = t.float()[:, None] * freqs[None]
            temb = self.time_mlp(torch.cat([args.sin(), args.cos()], dim=1))
        h = self.stem(x, temb)
        skips: list[Tensor] = []
        for level in self.downs:
            skips.append(h)
            h = level(h, temb)
        for level in self.ups:
            h = level.block(torch.cat([level.first(h), skips.pop()], dim=1), temb)
        return self.head(h)


def scriptable(net: SegNet) -> nn.Module:
    """A network TorchScript can compile: MonaiUNet as it is, the double-conv UNet through ScriptUNet."""
    return ScriptUNet(net) if isinstance(net, UNet) else net


class PlainLogits(nn.Module):
    """A segmentation U-Net: image batch -> logits."""

    def __init__(self, net: SegNet):
        super().__init__()
        self.net = scriptable(net)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, x.new_zeros(0, dtype=torch.long))


class EnsembleLogits(nn.Module):
    """CPS.ensemble: log of the mean of both networks' probabilities."""

    def __init__(self, net1: SegNet, net2: SegNet):
        super().__init__()
        self.net1, self.net2 = PlainLogits(net1), PlainLogits(net2)

    def forward(self, x: Tensor) -> Tensor:
        p = (torch.softmax(self.net1(x), 1) + torch.softmax(self.net2(x), 1)) / 2
        return torch.log(p.clamp_min(1e-6))


class FixedNoiseLogits(nn.Module):
    """DiffusionTeacher.predict_fixed (and CoTrain._twin_fixed): one x0 pass from the noised null mask at
    t_infer, with the noise a generator seeded with noise_seed draws for a call of n windows baked in."""

    def __init__(self, net: SegNet, teacher: DiffusionTeacher, *, t: int, noise_seed: int, roi: list[int],
                 max_batch: int):
        super().__init__()
        self.net, self.t, self.num_classes = scriptable(net), int(t), int(teacher.num_classes)
        self.register_buffer("sqrt_abar", teacher.diffusion.sqrt_alphas_cumprod.detach().clone())
        self.register_buffer("sqrt_one_minus_abar", teacher.diffusion.sqrt_one_minus_alphas_cumprod.detach().clone())
        noise, offsets = fixed_noise(noise_seed, (self.num_classes, *roi), max_batch)
        self.register_buffer("noise", noise)
        self.offsets: list[int] = offsets

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if n >= len(self.offsets):
            raise RuntimeError("more windows in one call than the sw_batch_size the noise was exported for")
        noise = self.noise[self.offsets[n]:self.offsets[n] + n].to(x)
        tt = torch.full([n], self.t, dtype=torch.long, device=x.device)
        null = torch.full([n, self.num_classes] + x.shape[2:], -1.0, device=x.device, dtype=x.dtype)
        null[:, 0] = 1.0
        bcast = [n] + [1] * (x.dim() - 1)
        m_t = self.sqrt_abar[tt].reshape(bcast).to(x) * null + self.sqrt_one_minus_abar[tt].reshape(bcast).to(x) * noise
        return self.net(torch.cat([m_t, x], dim=1), tt)


def fixed_noise(seed: int, shape: tuple[int, ...], max_batch: int) -> tuple[Tensor, list[int]]:
    """The noise `torch.randn((n, *shape), generator=seeded)` gives for each n in 1..max_batch, stored once when
    smaller draws are prefixes of the largest (true when prod(shape) is a multiple of 16), else one after another;
    offsets[n] is where n's block starts."""
    def draw(n: int) -> Tensor:
        return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))

    full = draw(max_batch)
    if all(torch.equal(draw(n), full[:n]) for n in range(1, max_batch)):
        return full, [0] * (max_batch + 1)
    blocks = [draw(n) for n in range(1, max_batch + 1)]
    return torch.cat(blocks), [0] + [n * (n - 1) // 2 for n in range(1, max_batch + 1)]


# ---- the whole pipeline --------------------------------------------------------------------------
def _python_round(v: float) -> int:
    """Python's round() (half to even), which data.pipeline.scaled_shape uses."""
    r = math.floor(v)
    d = v - r
    if d > 0.5 or (d == 0.5 and r % 2 == 1):
        r += 1
    return int(r)


def _resize(x: Tensor, shape: list[int]) -> Tensor:
    """data.pipeline.resize (linear) of a channels-first tensor."""
    if x.shape[1:] == shape:
        return x
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(x[None].float(), size=shape, mode=mode, align_corners=False)[0]


def _window_starts(size: list[int], roi: list[int], overlap: float) -> list[list[int]]:
    """MONAI's _get_scan_interval + dense_patch_slices: window corners, first axis slowest."""
    empty: list[int] = []
    corners: list[list[int]] = [empty]
    for d in range(len(size)):
        interval = roi[d] if roi[d] == size[d] else max(int(roi[d] * (1 - overlap)), 1)
        num = int(math.ceil(float(size[d]) / interval))
        scan = 1
        for i in range(num):
            if i * interval + roi[d] >= size[d]:
                scan = i + 1
                break
        starts = [i * interval - max(i * interval + roi[d] - size[d], 0) for i in range(scan)]
        grown: list[list[int]] = []
        for c in corners:
            for s in starts:
                grown.append(c + [s])
        corners = grown
    return corners


def _window(x: Tensor, b: int, corner: list[int], roi: list[int]) -> Tensor:
    out = x.narrow(0, b, 1)
    for d in range(len(roi)):
        out = out.narrow(2 + d, corner[d], roi[d])
    return out


class Segmenter(nn.Module):
    """Raw image (C, *spatial) -> int64 label map; `probabilities` -> (K, *spatial) float32."""

    scale: list[float]
    size: list[int]
    roi: list[int]

    def __init__(self, logits: nn.Module, *, net_dims: int, intensity: str, scale: list[float] | None,
                 slice_axis: int, patch: list[int], overlap: float, sw_batch_size: int,
                 size: list[int | None] | None = None):
        super().__init__()
        if intensity not in ("percentile", "zscore"):
            raise InputError(f"data.intensity: unknown mode {intensity!r} (percentile, zscore)")
        self.logits = logits
        self.net_dims, self.intensity, self.slice_axis = int(net_dims), intensity, int(slice_axis)
        self.scale: list[float] = [float(s) for s in scale] if scale is not None else []
        self.size: list[int] = [int(s or 0) for s in size] if size is not None else []  # 0 keeps an axis
        self.roi: list[int] = [int(p) for p in patch]
        self.overlap, self.sw_batch_size = float(overlap), int(sw_batch_size)
        importance = compute_importance_map(tuple(self.roi), mode="gaussian", sigma_scale=0.125, device="cpu",
                                            dtype=torch.float32)
        self.register_buffer("importance", importance[None, None])

    def forward(self, image: Tensor) -> Tensor:
        return self.probabilities(image).argmax(0)

    @torch.jit.export
    def probabilities(self, image: Tensor) -> Tensor:
        with torch.no_grad():
            if image.dim() != self.net_dims + 1 and not (self.net_dims == 2 and image.dim() == 4):
                raise RuntimeError("expected an image (C, *spatial) with 2 or 3 spatial axes matching the network")
            x = image if image.dtype == torch.float32 else image.float()
            spatial = x.shape[1:]
            x = _resize(self.normalize(x), self.scaled(spatial))
            fill = float(x.min())  # data.pipeline.pad_value
            if self.net_dims == 2 and x.dim() == 4:  # slices of a volume become the batch
                axis = 1 + self.slice_axis
                slices = x.movedim(axis, 0)
                probs = torch.cat([self.sliding(chunk, fill) for chunk in slices.split(max(self.sw_batch_size, 16))])
                probs = probs.movedim(0, axis)
            else:
                probs = self.sliding(x[None], fill)[0]
            return _resize(probs, spatial)

    def scaled(self, shape: list[int]) -> list[int]:
        """data.pipeline.target_shape."""
        if len(self.size) > 0:
            if len(self.size) != len(shape):
                raise RuntimeError("data.size has a different number of sizes than the image has axes")
            return [n if s == 0 else s for s, n in zip(self.size, shape)]
        if len(self.scale) == 0:
            return shape
        if len(self.scale) != len(shape):
            raise RuntimeError("data.scale has a different number of factors than the image has axes")
        return [max(1, _python_round(s * f)) for s, f in zip(shape, self.scale)]

    def normalize(self, x: Tensor) -> Tensor:
        """data.pipeline.normalize: numpy's float64 percentile arithmetic, stored as float32."""
        out = torch.empty_like(x)
        for c in range(x.shape[0]):
            ch = x[c]
            if self.intensity == "percentile":
                lo, hi = _percentile(ch, 0.5), _percentile(ch, 99.5)
                out[c] = (((ch.double() - lo) / max(hi - lo, 1e-6)).clamp(0, 1) * 2 - 1).float()
            else:
                mean = ch.double().mean().float()
                std = float(ch.double().std(unbiased=False).float())
                out[c] = (ch - mean) / max(std, 1e-6)
        return out

    def sliding(self, inputs: Tensor, fill: float) -> Tensor:
        """monai.inferers.sliding_window_inference(mode="gaussian", cval=fill) then softmax over classes; whole
        images of the network's size in one pass (evaluation.inference)."""
        nsd, roi = inputs.dim() - 2, self.roi
        if inputs.shape[2:] == roi:
            return torch.softmax(self.logits(inputs), dim=1)
        original = inputs.shape[2:]
        pad: list[int] = []
        for k in range(inputs.dim() - 1, 1, -1):
            diff = max(roi[k - 2] - inputs.shape[k], 0)
            pad += [diff // 2, diff - diff // 2]
        padded = sum(pad) > 0
        if padded:
            inputs = F.pad(inputs, pad, mode="constant", value=fill)
        size = inputs.shape[2:]
        corners = _window_starts(size, roi, self.overlap)
        num_win, batch = len(corners), inputs.shape[0]
        total = num_win * batch
        w = self.importance.to(inputs)
        output = torch.zeros(0)
        count = torch.zeros([1, 1] + size, dtype=inputs.dtype, device=inputs.device)
        for c in corners:
            cv = _window(count, 0, c, roi)
            cv += w
        for g in range(0, total, self.sw_batch_size):
            idx = list(range(g, min(g + self.sw_batch_size, total)))
            data = torch.cat([_window(inputs, i // num_win, corners[i % num_win], roi) for i in idx])
            out = self.logits(data)
            out *= w
            if output.numel() == 0:
                output = torch.zeros([batch, out.shape[1]] + size, dtype=inputs.dtype, device=inputs.device)
            for j, i in enumerate(idx):
                view = _window(output, i // num_win, corners[i % num_win], roi)
                view += out[j]
        output /= count
        if padded:
            for si in range(nsd):
                output = output.narrow(2 + si, pad[2 * (nsd - 1 - si)], original[si])
        return torch.softmax(output, dim=1)


def _percentile(ch: Tensor, q: float) -> float:
    """np.percentile(ch, q) (method linear): float64 index and weight, float32 difference of neighbours."""
    flat = ch.reshape(-1)
    n = flat.numel()
    virtual = (n - 1) * (q / 100)
    below = math.floor(virtual)
    if virtual >= n - 1:
        return float(flat.max())
    gamma = virtual - below
    a = flat.kthvalue(below + 1).values
    b = flat.kthvalue(below + 2).values if below + 1 < n else a
    diff = float(b - a)  # float32 subtraction, as numpy's lerp
    if gamma >= 0.5:
        return float(b) - diff * (1 - gamma)
    return float(a) + diff * gamma


# ---- building and saving -------------------------------------------------------------------------
def logits_module(method: Method, name: str, cfg: dict) -> nn.Module:
    """The scriptable twin of `method.predictors()[name]`; InputError for what cannot be exported exactly."""
    fn = method.predictors()[name]
    dc, roi, sw = cfg["diffusion"], [int(p) for p in cfg["train"]["patch"]], int(cfg["eval"]["sw_batch_size"])
    if isinstance(fn, NETS) and fn.time_mlp is None:
        return PlainLogits(fn)
    if isinstance(method, CPS) and getattr(fn, "__func__", None) is CPS.ensemble:
        return EnsembleLogits(method.net1, method.net2)
    teacher = getattr(method, "teacher", None)
    fixed = dict(t=dc["t_infer"], noise_seed=dc["noise_seed"], roi=roi, max_batch=sw)
    if name == "teacher" and isinstance(teacher, DiffusionTeacher):
        if dc["inference"] != "fixed":
            raise InputError(f"--predictor teacher: only the fixed-t single pass exports (the run uses "
                             f"diffusion.inference={dc['inference']}); export --predictor student instead")
        return FixedNoiseLogits(teacher.mask_net, teacher, **fixed)
    if name == "student" and isinstance(method, CoTrain):  # the twin student, fixed like the teacher
        return FixedNoiseLogits(method.student, method.teacher, **fixed)
    raise InputError(f"--predictor {name}: {cfg['method']}'s {name} predictor cannot be exported")


def build_segmenter(method: Method, name: str, cfg: dict) -> Segmenter:
    d, ec = cfg["data"], cfg["eval"]
    if d["orientation"] or d["spacing"]:
        raise InputError("export: the exported model takes a bare tensor, without the geometry that "
                         "data.orientation and data.spacing need; predict with `superdiffusion predict` instead")
    method.eval()
    seg = Segmenter(logits_module(method, name, cfg), net_dims=d["dims"], intensity=d["intensity"], scale=d["scale"],
                    size=d["size"], slice_axis=d["slice_axis"], patch=cfg["train"]["patch"], overlap=ec["overlap"],
                    sw_batch_size=ec["sw_batch_size"])
    return seg.eval()


def script_segmenter(method: Method, name: str, cfg: dict) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch 2.9+ flags TorchScript as deprecated; loading it stays supported
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(build_segmenter(method, name, cfg))


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint: str | None = None,
               predictor: str | None = None, threads: int | None = None) -> dict:
    """Script the run's chosen (or the named) predictor and save it to `out`, which must not exist yet, in a
    folder that can be written (checked first). threads: torch's CPU threads (default: the run's train.threads)."""
    out = check_output_file(out)
    run = load_run(run_dir, checkpoint=checkpoint, predictor=predictor)
    use_threads(run.cfg, threads)
    run.method.to("cpu")
    cfg = run.cfg
    scripted = script_segmenter(run.method, run.predictor, cfg)
    meta = {"format": ARTEFACT_FORMAT, "method": cfg["method"], "predictor": run.predictor,
            "checkpoint": str(run.checkpoint), "net_dims": cfg["data"]["dims"],
            "num_classes": cfg["data"]["num_classes"], "in_channels": run.method.in_channels,
            "input": "raw image tensor (C, *spatial), any real dtype (cast to float32)",
            "output": "int64 label map (*spatial); .probabilities(image) gives (K, *spatial)",
            "intensity": cfg["data"]["intensity"], "scale": cfg["data"]["scale"],
            "size": cfg["data"]["size"],
            "slice_axis": cfg["data"]["slice_axis"], "patch": cfg["train"]["patch"],
            "overlap": cfg["eval"]["overlap"], "sw_batch_size": cfg["eval"]["sw_batch_size"],
            "torch": torch.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                torch.jit.save(scripted, str(tmp), _extra_files={"meta.json": json.dumps(meta, indent=1),
                                                                "config.json": json.dumps(cfg)})
            except (OSError, RuntimeError) as err:  # e.g. the disk filled up meanwhile
                raise InputError(f"{out}: could not write the export ({first_sentence(err)})") from err
        try:
            os.link(tmp, out)  # fails if `out` appeared meanwhile: never overwrite
        except FileExistsError as err:
            raise InputError(f"{out}: exists already; choose another --out (exports never overwrite)") from err
    finally:
        tmp.unlink(missing_ok=True)
    return {"out": str(out), **meta}
