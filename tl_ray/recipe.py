"""The training recipe's defaults: what tl-ray does when the user leaves an option out.

Chosen from ``bench/learning.py`` (tl-ray against a plain-PyTorch reference recipe on
the sample tasks and on scikit-learn's handwritten digits; numbers in BENCHMARKS.md),
not guessed. They depend on where training starts: a random network needs one learning
rate everywhere, while a pretrained backbone must move much more slowly than its new
head, or the first steps of a random head's gradients wreck the features worth
transferring.
"""

from __future__ import annotations

# Peak learning rate of the head (and of the whole network from random weights), per optimizer.
LR = {"adamw": 3e-3, "sgd": 0.05}
# Feature extraction (freeze depth 5) trains a linear head alone: it takes (and needs, on a short
# run with few steps) a larger step.
HEAD_ONLY_LR = {"adamw": 1e-2, "sgd": 0.1}
# Weight decay, never applied to BatchNorm weights or biases: decoupled (AdamW) or L2 (SGD).
WEIGHT_DECAY = {"adamw": 0.05, "sgd": 5e-5}
# The backbone's share of the head's learning rate when starting from pretrained weights.
PRETRAINED_BACKBONE_LR_MULT = 0.1
# Linear warm-up: this share of the run's optimizer steps, never more than one epoch, so a short
# run is not mostly warm-up (and ASHA does not judge trials in the middle of it).
WARMUP_SHARE = 0.05
# Below this crop size, random crops take at least LIGHT_CROP_SCALE of the image: the cached image is
# only ceil(size / 0.875) pixels on its short side, and a small crop of it is an enlargement that can
# miss the object altogether.
SMALL_IMAGE = 128
STANDARD_CROP_SCALE = (0.25, 1.0)
LIGHT_CROP_SCALE = (0.6, 1.0)
# Validation centre crop's share of the resized short side (256 for a 224 crop), unless the weights were trained
# with their own (torchvision's IMAGENET1K_V2: 232 for 224); a checkpoint keeps its source's.
EVAL_CROP_FRACTION = 0.875


# The batch a run takes when --batch-size is left out, by the training set's size: the largest of BATCH_SIZES that
# still gives at least MIN_STEPS_PER_EPOCH optimizer steps an epoch. A batch of 32 leaves 50 images 1-2 steps an
# epoch; a few images need more, smaller steps to learn in a short run.
BATCH_SIZES = (8, 16, 32)
MIN_STEPS_PER_EPOCH = 4


def batch_size(num_train: int, workers: int = 1) -> int:
    """The global batch for ``num_train`` training images (``--batch-size`` left out): see BATCH_SIZES. At least
    two images a worker (BatchNorm cannot train on one)."""
    fitting = [size for size in BATCH_SIZES if num_train // size >= MIN_STEPS_PER_EPOCH]
    return max(max(fitting, default=BATCH_SIZES[0]), 2 * workers)


STRATEGIES = ("auto", "plain", "discriminative", "probe")


def strategy_options(strategy: str, weights: str, epochs: int) -> tuple[str, float, int]:
    """(resolved name, backbone LR multiplier, head-alone epochs) of a named fine-tuning strategy.

    - plain: one learning rate for head and backbone.
    - discriminative: the backbone learns at a tenth of the head's rate.
    - probe: linear probe, then fine-tune (fastai's ``fine_tune``, LP-FT): the head alone for a
      fifth of the run (at least one epoch), then the backbone unfrozen to the freeze depth at a
      tenth of the head's rate. A new head's first, large gradients then never reach the backbone.
    - auto: plain from random weights, discriminative from pretrained ones.
    """
    if strategy == "auto":
        strategy = "plain" if weights == "none" else "discriminative"
    if strategy == "plain":
        return strategy, 1.0, 0
    if strategy == "discriminative":
        return strategy, PRETRAINED_BACKBONE_LR_MULT, 0
    return strategy, PRETRAINED_BACKBONE_LR_MULT, max(1, min(epochs - 1, round(epochs / 5)))


def crop_scale(image_size: int) -> tuple[float, float]:
    return LIGHT_CROP_SCALE if image_size < SMALL_IMAGE else STANDARD_CROP_SCALE
