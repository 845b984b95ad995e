"""``--weights`` for a timm architecture, resolved (as ``tl_ray.model.initial_weights`` does torchvision's) into a
state dict with a head for the run's classes, and the preprocessing those weights were trained with.

``imagenet`` is timm's default pretrained tag and a bare word one of its tags (``in22k_ft_in1k``: the weights
``NAME.in22k_ft_in1k``), both loaded through timm's own loading and Hugging Face cache (the driver's one download;
workers load the resolved state dict). A ``.safetensors`` or ``.pth`` file is a state dict in timm's layout: a file
of another architecture is refused naming its first key that does not fit. A tl-ray checkpoint is read as for
torchvision. Preprocessing (mean, std, interpolation, crop) is the weights' ``pretrained_cfg``
(``timm.data.resolve_data_config``); for ``none`` or a file, the architecture's default weights'.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tl_ray import backbones, backbones_timm, checkpoint, model
from tl_ray.errors import TlRayError

FILE_SUFFIXES = (".safetensors", ".pth", ".pt")


def _tag(arch: str, weights: str) -> str:
    """timm's tag for ``weights`` ('' for its default); a word that is not one of the arch's tags lists them."""
    tags = backbones_timm.pretrained_tags(arch)
    if weights == "imagenet" and not tags:
        raise TlRayError(
            f"--weights imagenet: timm has no pretrained weights for {arch}; pass --weights none or a file"
        )
    if weights == "imagenet":
        return ""
    if weights not in tags:
        choices = ", ".join(tags) or "none (timm has no pretrained weights for it)"
        raise TlRayError(
            f"--weights: {weights!r} is not a file, a folder, 'imagenet' or 'none'; {arch}'s timm tags are: {choices}"
        )
    return weights


def preprocessing(arch: str, tag: str = "") -> dict[str, Any]:
    """mean, std, interpolation and crop_pct of the weights ``tag`` (timm's resolve_data_config of its cfg)."""
    from timm.data import resolve_data_config

    cfg = backbones_timm.pretrained_cfg(arch, tag)
    return resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {}, use_test_size=False)


def _is_file_source(weights: str) -> bool:
    return os.sep in weights or weights.endswith(FILE_SUFFIXES) or Path(weights).expanduser().is_file()


def eval_preprocessing(arch: str, weights: str) -> tuple[float, str]:
    """The validation crop / resize and the resize's interpolation the weights expect, without reading them
    (``model.eval_preprocessing``)."""
    tag = "" if weights == "none" or _is_file_source(weights) else _tag(arch, weights)
    config = preprocessing(arch, tag)
    return float(config["crop_pct"]), str(config["interpolation"])


def _initial(state: dict, head_reset: bool, source: str, config: dict[str, Any], **extra: Any) -> model.InitialWeights:
    return model.InitialWeights(
        state,
        tuple(float(v) for v in config["mean"]),
        tuple(float(v) for v in config["std"]),
        source,
        head_reset,
        float(config["crop_pct"]),
        str(config["interpolation"]),
        **extra,
    )


def initial_weights(arch: str, weights: str, class_names: Sequence[str], image_size: int) -> model.InitialWeights:
    """``model.initial_weights`` for a timm ``arch`` (the seed already set by it)."""
    class_names = list(class_names)
    net = backbones.create(arch, len(class_names), image_size)
    if weights == "none":
        return _initial(net.state_dict(), True, "none", preprocessing(arch))
    if location_or_dir(weights):
        path, named = model._local_weights(weights)
        meta = checkpoint.read_meta(path)
        if meta["arch"] != arch:
            raise TlRayError(f"--weights: checkpoint {named} is a {meta['arch']}; pass --arch {meta['arch']}")
        same_classes = meta["class_names"] == class_names
        state, head_reset = model._fit_to_model(net, checkpoint.read_model_state(path), named, same_classes)
        config = {
            "mean": meta["mean"],
            "std": meta["std"],
            "crop_pct": model._meta_crop_fraction(meta),
            "interpolation": meta.get("interpolation") or "bilinear",
        }
        return _initial(state, head_reset, f"checkpoint:{named}", config)
    if _is_file_source(weights) or weights.partition("?")[0].endswith(FILE_SUFFIXES):
        path, named = model._local_weights(weights)
        if not path.is_file():
            raise TlRayError(f"--weights: {weights} does not exist")
        state, head_reset = model._fit_to_model(net, model._read_state_dict(path), named, keep_head=False)
        return _initial(state, head_reset, named, preprocessing(arch))
    tag = _tag(arch, weights)
    pretrained = backbones_timm.create(arch, len(class_names), image_size, pretrained=tag)
    source = f"timm:{backbones_timm.model_name(arch)}.{tag or backbones_timm.pretrained_cfg(arch).tag}"
    return _initial(pretrained.state_dict(), True, source, preprocessing(arch, tag))


def location_or_dir(weights: str) -> bool:
    """A tl-ray checkpoint: a local folder, or a URI that does not name a weights file."""
    return model._names_checkpoint(weights)
