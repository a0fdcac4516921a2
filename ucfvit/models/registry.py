"""Model families: one :class:`FamilySpec` per family, declared next to its model, and
``build_model(family, size=..., **overrides)``.

A family's spec holds everything the rest of ucfvit needs to know about it: its class, its size
presets, how a batch becomes model input, its task loss, any extra object the loss needs (e.g.
a DDPM scheduler) and its recipe defaults. The registry, the CLI's ``--model`` choices, the
trainer, the FLOP count, the quickstart and the test matrix all derive from this list, so adding
a family is one file that ends with ``register_family(FamilySpec(...))``.

Size presets follow their papers: ``tiny``/``small`` (DeiT), ``base``/``large``/``huge`` (ViT),
``giant`` (ViT-g/14 of "Scaling Vision Transformers"); decoders follow MAE (512 wide, 8 blocks,
16 heads). ``debug`` is a fast CPU model whose head counts divide by 2, 4 and 8, so every small
test mesh can shard it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .patch_sequence import model_input
from .tasks import Task

__all__ = [
    "FAMILIES",
    "SIZES",
    "FamilySpec",
    "build_model",
    "get_family",
    "image_input",
    "list_models",
    "list_sizes",
    "model_arguments",
    "register_family",
    "resolved_model_kwargs",
]

_MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_DEBUG_DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=8)

SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=8, feature_size=8, **_DEBUG_DECODER),
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, **_MAE_DECODER),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, **_MAE_DECODER),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_MAE_DECODER),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_MAE_DECODER),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_MAE_DECODER),
    "giant": dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408, **_MAE_DECODER),
}

Batch = Mapping[str, torch.Tensor]


def image_input(model: nn.Module, batch: Batch) -> tuple:
    """The default way a batch becomes model input: the image alone (for a model built with
    ``adaptive_patching=True``, the batch's PatchSequence, see ``patch_sequence.batch_sequence``)."""
    return (model_input(model, batch),)


@dataclass(frozen=True)
class FamilySpec:
    """Everything ucfvit needs to know about one model family.

    Attributes:
        name: the ``--model`` name.
        model: the ``nn.Module`` class; it must have ``init_weights()`` and take keyword arguments.
        loss: ``loss(model, batch, rng, extra) -> scalar``, a mean over samples (so splitting a batch
            over ranks or micro-batches changes nothing). ``batch`` holds ``image`` (B, C, *S) and,
            from labelled data, ``label`` (B,) and ``seg`` (B, *S); ``variables`` (names of the
            image's channels, passed on to the model) when a single-channel model trains on one.
        inputs: ``inputs(model, batch) -> tuple`` of positional forward arguments for a clean batch
            (what evaluation and tests feed the model).
        extra: ``extra(model) -> object`` built once per run and passed to ``loss`` (None: nothing).
        sizes: size presets, name -> constructor arguments (keys the family does not take are dropped).
        recipe: this family's recipe defaults, dotted ``Config`` paths (e.g. ``"arch.num_classes"``)
            -> value, applied over the device preset of ``ucfvit.train.presets``.
        pooled_head: the model's ``head`` sees one pooled token per sample (classifiers); otherwise
            heads map every patch token (used by the FLOP count).
        needs: batch entries ``loss`` reads besides ``image`` (``label``, ``seg``), so that a run on
            data without them is refused before it starts.
        evaluation: what the family measures on held-out data and shows in pictures (a
            :class:`~ucfvit.models.tasks.Task`); None: the family is not evaluated.
    """

    name: str
    model: type[nn.Module]
    loss: Callable
    inputs: Callable = image_input
    extra: Callable | None = None
    sizes: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: SIZES)
    recipe: Mapping[str, Any] = field(default_factory=dict)
    pooled_head: bool = False
    needs: tuple[str, ...] = ()
    evaluation: Task | None = None

    def build_extra(self, model: nn.Module) -> Any:
        """The extra object of ``loss`` for ``model`` (None if the family needs none)."""
        return None if self.extra is None else self.extra(model)


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` to the registry (a name may be registered once) and return it."""
    if spec.name in FAMILIES and FAMILIES[spec.name] != spec:
        raise ValueError(f"model family {spec.name!r} is already registered (by {FAMILIES[spec.name].model.__name__})")
    if not hasattr(spec.model, "init_weights"):
        raise ValueError(f"{spec.model.__name__} needs an init_weights() method to be a ucfvit family")
    FAMILIES[spec.name] = spec
    return spec


def get_family(name: str) -> FamilySpec:
    """The spec of family ``name``; a clear error lists the registered names."""
    if name not in FAMILIES:
        raise ValueError(f"model={name!r} is unknown; choose one of {list_models()}")
    return FAMILIES[name]


def model_arguments(family: type[nn.Module]) -> set[str]:
    """Keyword arguments a model class accepts (its own and those of its base classes)."""
    names: set[str] = set()
    for cls in family.__mro__:
        if cls is nn.Module or "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    return names - {"out_chans"}


def list_models() -> list[str]:
    return list(FAMILIES)


def list_sizes(name: str | None = None) -> list[str]:
    """Size presets of family ``name`` (default: the shared presets)."""
    return list(get_family(name).sizes if name else SIZES)


def build_model(name: str, size: str = "base", **overrides: Any) -> nn.Module:
    """Build family ``name`` (see :func:`list_models`) at preset ``size`` with overrides.

    Preset keys that a family does not use (e.g. decoder sizes for ViT) are dropped; an override
    the family does not accept is an error. Build under ``torch.device("meta")`` to get a model
    without memory, then ``to_empty`` + ``init_weights()``.
    """
    model = get_family(name).model(**resolved_model_kwargs(name, size, overrides))
    model.init_weights()
    return model


def resolved_model_kwargs(name: str, size: str = "base", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every keyword argument :func:`build_model` passes for ``(name, size, **overrides)``: the
    constructor's defaults, then the size preset (keys the family takes), then ``overrides``.

    Two models built from equal resolutions are the same model, however their options were
    spelled (a preset value repeated as an override, a default left out). Sequences become tuples
    so that resolutions of a JSON file and of a command line compare equal. Raises ``ValueError``
    for an unknown family or size and for an override the family does not take.
    """
    spec = get_family(name)
    if size not in spec.sizes:
        raise ValueError(f"size={size!r} is unknown; choose one of {list_sizes(name)}")
    accepted = model_arguments(spec.model)
    unknown = sorted(set(overrides or {}) - accepted)
    if unknown:
        raise ValueError(f"{name} does not take {unknown}; allowed arguments: {sorted(accepted)}")
    kwargs: dict[str, Any] = {}
    for cls in spec.model.__mro__:  # a subclass's default wins over its base's
        if cls is nn.Module or "__init__" not in vars(cls):
            continue
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.name in accepted and param.kind is param.KEYWORD_ONLY and param.default is not param.empty:
                kwargs.setdefault(param.name, param.default)
    kwargs.update((k, v) for k, v in spec.sizes[size].items() if k in accepted)
    kwargs.update(overrides or {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
