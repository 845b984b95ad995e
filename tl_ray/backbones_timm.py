"""Any timm architecture by name, as a ``tl_ray.backbones.Family`` derived from the model itself.

torchvision's eight archs are entered by hand in ``tl_ray.backbones``; timm's ~1,300 know what that table
writes: ``feature_info`` (each stage's module and its reduction), ``get_classifier``/``reset_classifier`` (the
head), ``no_weight_decay`` (embeddings), ``forward_features``/``forward_head`` (the pooled features) and
``pretrained_cfg`` (mean, std, interpolation, crop). So a timm family is computed from a built network
(``family_for``), and ``TransferModel`` is the same generic code around it.

The five freeze stages: for a CNN (or a hierarchical transformer) the stem, then the stages ending at reductions
4, 8, 16 and 32 (what comes after the last, a ConvNeXt's pre-head norm, an EfficientNet's ``conv_head``, belongs to
the last stage, as in torchvision's entries); for a plain transformer (``blocks`` at one reduction) the patch
embedding with its tokens, then the blocks in four equal groups, as vit_b_16's. A model with neither cannot be
split: it trains at depths 0 and 5 only (``splittable``).

A name is timm's when torchvision's table does not hold it, or when written ``timm/NAME``. timm is imported only
here, and only when a timm arch is used: ``tl-ray --help`` and torchvision runs never load it.
"""

from __future__ import annotations

import difflib
import functools
from typing import TYPE_CHECKING, Any

from tl_ray.errors import TlRayError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tl_ray.backbones import Family

PREFIX = "timm/"
STAGE_REDUCTIONS = (4, 8, 16, 32)  # where stages 1..4 end (ResNet's layer1..layer4)


def model_name(arch: str) -> str:
    """timm's name for ``arch`` (``timm/NAME`` -> ``NAME``)."""
    return arch.removeprefix(PREFIX)


@functools.cache
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def is_known(arch: str) -> bool:
    return model_name(arch) in _timm_names()


def check_arch(arch: str, torchvision_archs: tuple[str, ...], option: str = "--arch") -> None:
    """An unknown name: one line with the three nearest known names."""
    if not is_known(arch):
        base, dot, tag = model_name(arch).partition(".")
        if dot and is_known(base):  # timm's NAME.TAG: the tag names weights, which --weights chooses
            raise UsageError(f"{option}: {arch!r} names weights: pass {option} {base} --weights {tag}")
        known = list(dict.fromkeys([*torchvision_archs, *_timm_names()]))
        query = model_name(arch)
        # A name's start (vit_tiny: vit_tiny_patch16_224) says more than difflib's likeness, which comes next.
        near = sorted((name for name in known if query and name.startswith(query)), key=len)[:3]
        near = near or difflib.get_close_matches(query, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise UsageError(
            f"{option}: no torchvision or timm architecture is named {arch!r}{hint} (tl-ray archs lists them)"
        )


def listing(pattern: str = "") -> list[tuple[str, bool]]:
    """timm's names matching ``pattern`` (fnmatch, ``*`` added around a bare word), each with whether timm has
    pretrained weights for it."""
    import timm

    if pattern and "*" not in pattern:
        pattern = f"*{pattern}*"
    pretrained = {name.partition(".")[0] for name in timm.list_models(pattern or "", pretrained=True)}
    return [(name, name in pretrained) for name in timm.list_models(pattern or "")]


def pretrained_tags(arch: str) -> list[str]:
    import timm

    return [name.partition(".")[2] for name in timm.list_pretrained(f"{model_name(arch)}.*")]


def pretrained_cfg(arch: str, tag: str = "") -> Any:
    """timm's preprocessing and head for ``arch`` (with ``tag``: that weights' own; else the default's)."""
    from timm.models import get_pretrained_cfg

    name = model_name(arch)
    return get_pretrained_cfg(f"{name}.{tag}" if tag else name) or get_pretrained_cfg(name)


def patch_size(arch: str) -> int:
    """> 0 for a transformer built for one image size (the size must be a multiple of it)."""
    if not pretrained_cfg(arch).fixed_input_size:
        return 0
    net = _meta_model(arch)
    embed = getattr(net, "patch_embed", None)
    size = getattr(embed, "patch_size", 0) if embed is not None else 0
    return int(size[0] if isinstance(size, tuple | list) else size)


def check_image_size(arch: str, image_size: int, option: str) -> None:
    """An image size the model cannot take (a window or grid that does not divide it): found by running the
    model on the meta device (shapes only, no memory, no arithmetic)."""
    problem = _size_problem(arch, image_size)
    if problem:
        raise UsageError(f"{option}: {arch} cannot take {image_size} px images ({problem}); try another size")


@functools.cache
def _size_problem(arch: str, image_size: int) -> str:
    import torch

    extra = {"img_size": image_size} if pretrained_cfg(arch).fixed_input_size else {}
    try:
        with torch.device("meta"):
            import timm

            net = timm.create_model(model_name(arch), pretrained=False, num_classes=2, **extra).eval()
            net(torch.empty(2, 3, image_size, image_size))
    except NotImplementedError:  # an operator without a meta kernel: nothing learned, the run will tell
        return ""
    except Exception as error:
        return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return ""


def create(arch: str, num_classes: int, image_size: int, pretrained: str | None = None) -> nn.Module:
    """The timm model with a ``num_classes`` head: random, or with timm's ``pretrained`` tag ('' = its default)
    loaded through timm's own hub cache, the head then reset for these classes."""
    import timm

    name = model_name(arch)
    extra = {"img_size": image_size} if pretrained_cfg(arch).fixed_input_size else {}
    if pretrained is None:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **extra)
    full = f"{name}.{pretrained}" if pretrained else name
    try:
        net = timm.create_model(full, pretrained=True, **extra)
    except Exception as error:  # no hub, no cache: huggingface_hub's and urllib's errors alike
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise TlRayError(
            f"--weights: cannot load timm's pretrained {full} ({first}). Without internet, put the weights in the"
            " Hugging Face cache (HF_HOME) or pass --weights /path/to/model.safetensors"
        ) from error
    net.reset_classifier(num_classes)
    return net


@functools.cache
def _meta_model(arch: str) -> nn.Module:
    """The architecture without memory (on the meta device): what its family is derived from, quickly."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(model_name(arch), pretrained=False)


def family(arch: str) -> Family:
    return family_for(_meta_model(arch), arch)


def is_timm_net(net: nn.Module) -> bool:
    return type(net).__module__.startswith("timm.")


def _stage_starts(net: nn.Module, order: list[str]) -> list[int] | None:
    """The index in ``order`` (parameter names, forward order) where each of stages 1..4 begins; None when the
    model has no reductions 4, 8, 16, 32 nor a ``blocks`` sequence to split."""

    def span(module: str) -> list[int]:
        return [i for i, name in enumerate(order) if name.startswith(module + ".")]

    info = list(getattr(net, "feature_info", None) or [])
    reductions = [entry.get("reduction") for entry in info]
    if all(r in reductions for r in STAGE_REDUCTIONS):
        first = span(next(e["module"] for e in info if e["reduction"] == STAGE_REDUCTIONS[0]))
        ends = [span([e["module"] for e in info if e["reduction"] == r][-1]) for r in STAGE_REDUCTIONS[:-1]]
        if first and all(ends):
            return [first[0], *(end[-1] + 1 for end in ends)]
        return None
    blocks = getattr(net, "blocks", None)
    count = len(blocks) if blocks is not None and hasattr(blocks, "__len__") else 0
    if count >= 4:
        size = count // 4
        starts = [span(f"blocks.{i * size}") for i in range(4)]
        return [start[0] for start in starts] if all(starts) else None
    return None


def split(net: nn.Module) -> tuple[tuple[tuple[str, ...], ...], bool]:
    """The NUM_STAGES freeze groups of a timm net as module (or bare parameter) names, and whether it could be split
    (if not, everything outside the head is the last stage: depths 0 and 5 mean what they say, no other does).

    Each parameter outside the head gets the stage its place in the forward order gives; the names are then the
    largest modules whose parameters all share one stage, so a frozen stage's modules can be put in eval mode.
    """
    head = head_name(net)
    order = [name for name, _ in net.named_parameters() if not name.startswith(head + ".")]
    starts = _stage_starts(net, order)
    splittable = starts is not None
    starts = starts if splittable else [0] * len(STAGE_REDUCTIONS)  # all in the last
    stage = {name: sum(index >= start for start in starts) for index, name in enumerate(order)}
    groups: list[list[str]] = [[] for _ in range(len(starts) + 1)]

    last = [0]  # the stage of the module placed last: where a module without parameters (a pooling, a dropout,
    # a BatchNorm without affine) that follows it goes, so a frozen stage's dropouts and statistics are off too

    def place(module: nn.Module, prefix: str) -> None:
        owned = {stage.get(prefix + name, -1) for name, _ in module.named_parameters()}
        if prefix and len(owned) == 1 and -1 not in owned:
            last[0] = owned.pop()
            groups[last[0]].append(prefix.rstrip("."))
            return
        for name, _ in module.named_parameters(recurse=False):
            if prefix + name in stage:
                last[0] = stage[prefix + name]
                groups[last[0]].append(prefix + name)
        for name, child in module.named_children():
            if f"{prefix}{name}" == head:
                continue
            if any(True for _ in child.parameters()):
                place(child, f"{prefix}{name}.")
            elif splittable and any(True for _ in child.modules() if type(_).__name__ != "Identity"):
                groups[last[0]].append(f"{prefix}{name}")

    place(net, "")
    return tuple(tuple(group) for group in groups), splittable


def head_name(net: nn.Module) -> str:
    """The module ``reset_classifier`` replaces: the head, as a name in ``net``."""
    classifier = net.get_classifier()
    for name, module in net.named_modules():
        if module is classifier and name:
            return name
    raise TlRayError(
        f"{type(net).__name__}: its classifier is not one module tl-ray can swap (a distilled model's two heads);"
        " pick another --arch"
    )


def _whole_forward(net: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """timm's own forward_features, as stage 0 (see ``TransferModel.features``: ``run_whole``)."""
    return net.forward_features(x) if index == 0 else x


def _pool(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_head(x, pre_logits=True).flatten(1)


def family_for(net: nn.Module, arch: str = "") -> Family:
    """The ``Family`` of a built timm network: its stages (``split``, all in the last stage when unsplittable),
    head, norms and embeddings."""
    from torch import nn

    from tl_ray.backbones import Arch, Family

    head = head_name(net)
    stages, splittable = split(net)
    names = {name for name, _ in net.named_parameters()}
    no_decay = tuple(sorted(name for name in getattr(net, "no_weight_decay", set)() if name in names))
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    return Family(
        name=f"timm:{type(net).__name__}",
        model_class=type(net).__name__,
        archs={
            arch or net.pretrained_cfg.get("architecture", ""): Arch(
                getattr(net, "head_hidden_size", None) or net.num_features
            )
        },
        stages=lambda _net, fixed=stages: fixed,
        run_stage=_whole_forward,
        pool=_pool,
        head=head,
        linear=head,
        batch_norm=batch_norm,
        no_decay=no_decay,
        splittable=splittable,
        run_whole=True,
    )


def fit_state(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViT's position embeddings resampled to this net's patch grid (weights for another image size)."""
    key = "pos_embed"
    own = getattr(net, key, None)
    if own is None or key not in state or state[key].shape == own.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    grid = net.patch_embed.grid_size
    prefix = 0 if getattr(net, "no_embed_class", False) else getattr(net, "num_prefix_tokens", 1)
    return {**state, key: resample_abs_pos_embed(state[key], list(grid), num_prefix_tokens=prefix)}


def read_safetensors(path: Any) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # a truncated or foreign file
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise TlRayError(f"--weights: {path} is not a loadable safetensors file: {first}") from error
