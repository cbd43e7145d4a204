"""The CAM engine: one model forward, every requested method, layer and target at once.

The engine owns what the methods share — hooks, autocast, the (short) backward, batching of
extra forwards, upsampling, normalisation and layer fusion — and calls the small per-method
functions in :mod:`workers.cam.methods`, :mod:`workers.cam.head` and :mod:`workers.cam.perturb`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from workers.cam.capture import Capture, capture_layers
from workers.cam.device_errors import is_device_failure
from workers.cam.errors import CamConfigError
from workers.cam.folding import FoldedModel
from workers.cam.guard import evaluation_mode
from workers.cam.head import find_gap_linear_head, head_maps
from workers.cam.layers import default_layer, resolve_layer
from workers.cam.layout import Layout, Reshape, layout_for
from workers.cam.maps import fuse, min_max, upsample
from workers.cam.memory_format import ChannelsLast
from workers.cam.methods import Kind, Method, parse_methods
from workers.cam.perturb import AblationRunner, MaskedForward, ablation_weights, scorecam_weights
from workers.cam.precision import AmpSetting, autocast, resolve_amp, validate_amp
from workers.cam.targets import ResolvedTargets, TargetRequest, TargetSpec, parse_targets, resolve_targets


@dataclass(frozen=True)
class CamResult:
    """Maps for one batch. ``K`` is the number of targets per image.

    ``maps[method]`` and ``layer_maps[method][layer]`` are float32 ``[B, K, H, W]`` in [0, 1] at
    input size; ``raw[method][layer]`` is float32 ``[B, K, h, w]``, the un-normalised
    ReLU(weighted sum) at feature resolution, and ``unrectified[method][layer]`` the same sum
    before that ReLU (for ``cam`` its spatial mean is the logit minus the head bias). For
    multi-view input ``[B, V, C, H, W]`` each of them gains a view axis after the batch:
    ``[B, V, K, ...]`` (``views`` is V, else None). ``valid`` bool ``[B, K]`` is False where an
    image had fewer targets than the widest row and the column only pads it.
    """

    maps: dict[str, torch.Tensor]
    layer_maps: dict[str, dict[str, torch.Tensor]]
    raw: dict[str, dict[str, torch.Tensor]]
    unrectified: dict[str, dict[str, torch.Tensor]]
    targets: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    logits: torch.Tensor | None
    layers: list[str]
    views: int | None = None

    def select_images(self, keep: Sequence[int], *, views_of: Sequence[int] | None = None) -> CamResult:
        """The result of only the images ``keep`` (batch indices, repeats allowed), in that order.

        ``views_of`` (a multi-view result only) names, per kept row, the view whose maps it
        takes: the maps lose their view axis, every other output is the kept image's own, and
        the result is single-view, one row per view.
        """
        index = torch.tensor(list(keep), dtype=torch.long, device=self.targets.device)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index.to(t.device))

        pick_map = pick
        if views_of is not None:
            if self.views is None:
                raise ValueError("views_of picks one view of a multi-view result; this result has no views")
            views = self.views
            slots = [k * views + v for k, v in zip(keep, views_of, strict=True)]
            flat = torch.tensor(slots, dtype=torch.long, device=self.targets.device)

            def pick_map(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]).index_select(0, flat.to(t.device))

        def per_layer(maps: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
            return {m: {name: pick_map(t) for name, t in per.items()} for m, per in maps.items()}

        return replace(
            self,
            maps={m: pick_map(t) for m, t in self.maps.items()},
            layer_maps=per_layer(self.layer_maps),
            raw=per_layer(self.raw),
            unrectified=per_layer(self.unrectified),
            valid=pick(self.valid),
            targets=pick(self.targets),
            scores=pick(self.scores),
            logits=None if self.logits is None else pick(self.logits),
            views=None if views_of is not None else self.views,
        )


@dataclass(frozen=True)
class _Batch:
    images: torch.Tensor
    size: int
    views: int | None

    @property
    def rows(self) -> int:
        """Rows of a layer's feature map: views are folded into the batch."""
        return self.size * (self.views or 1)


def _check_images(images: object) -> _Batch:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise CamConfigError(f"images must be a float tensor [B, C, H, W] (normalised), got {kind}")
    if images.dim() not in (4, 5) or images.shape[0] == 0:
        raise CamConfigError(
            f"images must be shaped [B, C, H, W], or [B, V, C, H, W] for multi-view models, with B >= 1; "
            f"got {tuple(images.shape)}"
        )
    if images.is_inference():  # from a loader under inference_mode: autograd may need to save it
        images = images.clone()
    return _Batch(images, images.shape[0], images.shape[1] if images.dim() == 5 else None)


def _layer_names(layers: str | Sequence[str] | None) -> list[str] | None:
    if layers is None:
        return None
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise CamConfigError("layers is empty; give at least one dotted module name, or None for the default")
    return list(dict.fromkeys(names))


class CamEngine:
    """Explains a model's outputs with CAM methods; see docs/ENGINE.md.

    ``layers``: dotted module names, or None for the last module that outputs a spatial map.
    ``methods``: names from :data:`workers.cam.METHODS`. ``amp``: None (auto), 'bf16', 'fp16',
    True or False. ``reshape``: maps a layer output to ``[N, C, h, w]`` for models the engine
    does not lay out itself. ``score_batch_size``: images per extra forward of Score-CAM and
    Ablation-CAM. ``channels_last``: feed the forwards channels-last images (faster convolutions;
    models that cannot take them fall back to contiguous input automatically).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | None = None,
        methods: str | Sequence[str] = ("gradcam",),
        amp: AmpSetting = None,
        reshape: Reshape | None = None,
        score_batch_size: int = 64,
        *,
        channels_last: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise CamConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.methods: list[Method] = parse_methods(list(methods) if not isinstance(methods, str) else methods)
        validate_amp(amp)
        self.amp = amp
        if reshape is not None and not callable(reshape):
            raise CamConfigError(
                f"reshape must be a callable tensor -> [N, C, h, w], got {type(reshape).__name__}"
            )
        self.reshape = reshape
        if (
            isinstance(score_batch_size, bool)
            or not isinstance(score_batch_size, int)
            or score_batch_size < 1
        ):
            raise CamConfigError(f"score_batch_size must be a positive int, got {score_batch_size!r}")
        self.score_batch_size = score_batch_size
        self._layers = _layer_names(layers)
        for name in self._layers or []:
            resolve_layer(model, name)
        self._heads: dict[str, nn.Linear] = {}
        self._memory = ChannelsLast(bool(channels_last))
        self._ablation_modes: dict[str, str] = {}
        self._folded = FoldedModel(model)

    def _uses(self, kind: Kind) -> list[Method]:
        return [method for method in self.methods if method.kind is kind]

    def __call__(self, images: torch.Tensor, targets: TargetSpec = None) -> CamResult:
        batch = _check_images(images)
        request = parse_targets(targets, batch.size)
        self._check_combination(request, batch)
        dtype = resolve_amp(self.amp, images.device)
        with torch.inference_mode(False), evaluation_mode(self.model):
            names = self._resolve_layers(images)
            layouts = {name: layout_for(self.model, name, self.reshape) for name in names}
            heads = (
                {name: self._head(name, layouts[name], images) for name in names}
                if self._uses(Kind.HEAD)
                else {}
            )
            track = bool(self._uses(Kind.GRADIENT))
            output, captured = self._forward(batch, names, track, dtype)
            with torch.enable_grad() if track else contextlib.nullcontext():
                resolved = resolve_targets(request, output, batch.size)
            with torch.no_grad():
                acts = {
                    name: self._grid(name, layouts[name], captured[name].values(), batch) for name in names
                }
                raw = self._raw_maps(names, layouts, captured, acts, heads, resolved, request, batch, dtype)
                return self._result(raw, names, resolved, output, batch)

    def _forward(
        self, batch: _Batch, names: list[str], track: bool, dtype: torch.dtype | None
    ) -> tuple[object, dict[str, Capture]]:
        """The one model forward, capturing the target layers; retried contiguous if needed."""
        modules = {name: self.model.get_submodule(name) for name in names}
        while True:
            try:
                with capture_layers(modules, track_grad=track) as captured:
                    mode = torch.no_grad() if track else torch.inference_mode()
                    with autocast(batch.images.device, dtype), mode:
                        output = self.model(self._memory.input(batch.images))
                return output, captured
            except RuntimeError as exc:
                if not self._memory.enabled or is_device_failure(exc):
                    raise
                self._memory.disable()

    def _check_combination(self, request: TargetRequest, batch: _Batch) -> None:
        if request.is_callable and self._uses(Kind.HEAD):
            raise CamConfigError(
                "'cam' reads the head weights of a class, so it needs class targets, not a callable"
            )
        if batch.views is not None and self._uses(Kind.PERTURBATION):
            names = ", ".join(m.name for m in self._uses(Kind.PERTURBATION))
            raise CamConfigError(
                f"{names} do not support multi-view input [B, V, C, H, W]; use a gradient method"
            )

    def _resolve_layers(self, images: torch.Tensor) -> list[str]:
        if self._layers is None:
            sample = images[:1]
            name = default_layer(self.model, sample, lambda n: layout_for(self.model, n, self.reshape))
            self._layers = [name]
        return self._layers

    def _grid(self, name: str, layout: Layout, tensor: torch.Tensor, batch: _Batch) -> torch.Tensor:
        grid = layout.to_grid(tensor)
        if batch.views is not None and grid.dim() == 5 and tuple(grid.shape[:2]) == (batch.size, batch.views):
            grid = grid.flatten(0, 1)
        if grid.dim() != 4 or grid.shape[0] != batch.rows:
            raise CamConfigError(
                f"layer {name!r} gives {tuple(grid.shape)} after its layout, not a feature map "
                f"[{batch.rows}, C, h, w]; pick a convolutional/token layer or pass reshape=..."
            )
        return grid.float()

    def _raw_maps(
        self,
        names: list[str],
        layouts: dict[str, Layout],
        captured: dict[str, Capture],
        acts: dict[str, torch.Tensor],
        heads: dict[str, nn.Linear],
        resolved: ResolvedTargets,
        request: TargetRequest,
        batch: _Batch,
        dtype: torch.dtype | None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Un-normalised maps ``[rows, K, h, w]`` (before ReLU) per method and layer."""
        raw: dict[str, dict[str, torch.Tensor]] = {method.name: {} for method in self.methods}
        targets = resolved.classes.shape[1]
        if self._uses(Kind.GRADIENT):
            self._gradient_maps(names, layouts, captured, acts, resolved.scores, batch, raw)
        for method in self._uses(Kind.ACTIVATION):
            assert method.activation is not None
            for name in names:
                single = method.activation(acts[name])[:, None]
                raw[method.name][name] = single.expand(-1, targets, -1, -1).contiguous()
        for method in self._uses(Kind.HEAD):
            for name in names:
                raw[method.name][name] = head_maps(heads[name], acts[name], resolved.classes)
        perturbations = self._uses(Kind.PERTURBATION)
        if perturbations:
            run = MaskedForward(self.model, batch.images.device, dtype, self._memory)
            for method in perturbations:
                for name in names:
                    weights = self._perturbation_weights(
                        method, name, run, batch.images, layouts, captured, acts, resolved, request
                    )
                    raw[method.name][name] = torch.einsum("nkc,nchw->nkhw", weights, acts[name])
        return raw

    def _gradient_maps(
        self,
        names: list[str],
        layouts: dict[str, Layout],
        captured: dict[str, Capture],
        acts: dict[str, torch.Tensor],
        scores: torch.Tensor,
        batch: _Batch,
        raw: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        """One short backward per target column, shared by all gradient methods and layers."""
        if not scores.requires_grad:
            raise CamConfigError(
                f"the model output does not depend on the target layers {names}; pick layers on the path "
                "to the output"
            )
        methods = self._uses(Kind.GRADIENT)
        leaves = [captured[name].output for name in names]
        columns: dict[tuple[str, str], list[torch.Tensor]] = {(m.name, n): [] for m in methods for n in names}
        targets = scores.shape[1]
        with torch.enable_grad():
            totals = [scores[:, column].sum() for column in range(targets)]
        for column, total in enumerate(totals):
            grads = torch.autograd.grad(total, leaves, retain_graph=column < targets - 1, allow_unused=True)
            for name, leaf, grad in zip(names, leaves, grads, strict=True):
                grid = self._grid(
                    name, layouts[name], torch.zeros_like(leaf) if grad is None else grad, batch
                )
                for method in methods:
                    assert method.gradient is not None
                    columns[(method.name, name)].append(method.gradient(acts[name], grid))
        for (method_name, name), maps in columns.items():
            raw[method_name][name] = torch.stack(maps, dim=1)

    def _head(self, name: str, layout: Layout, images: torch.Tensor) -> nn.Linear:
        if name not in self._heads:
            self._heads[name] = find_gap_linear_head(self.model, name, layout, images[:1])
        return self._heads[name]

    def _perturbation_weights(
        self,
        method: Method,
        name: str,
        run: MaskedForward,
        images: torch.Tensor,
        layouts: dict[str, Layout],
        captured: dict[str, Capture],
        acts: dict[str, torch.Tensor],
        resolved: ResolvedTargets,
        request: TargetRequest,
    ) -> torch.Tensor:
        """Channel weights ``[B, K, C]`` of Score-CAM or Ablation-CAM for one layer."""
        if method.name == "scorecam":
            folded = MaskedForward(self._folded.get(), run.device, run.dtype, run.memory)
            return scorecam_weights(
                folded, images, acts[name], request, resolved.classes, self.score_batch_size
            )
        autocast_on = run.dtype is not None
        if autocast_on:
            # Under autocast the drops are differences of nearly equal scores, which bf16 rounds
            # away: the ablated forwards run in float32 from the captured activations, and so does
            # the unablated score they are compared with (ablation_weights, ``base_scores=None``).
            run = MaskedForward(self.model, run.device, None, run.memory)
        runner = AblationRunner(run, self.model.get_submodule(name), self._ablation_modes.get(name, "mixed"))
        weights = ablation_weights(
            runner,
            images,
            captured[name].values(),
            layouts[name],
            None if autocast_on else resolved.scores,
            request,
            resolved.classes,
            self.score_batch_size,
        )
        self._ablation_modes[name] = runner.mode
        return weights

    def _result(
        self,
        raw: dict[str, dict[str, torch.Tensor]],
        names: list[str],
        resolved: ResolvedTargets,
        output: object,
        batch: _Batch,
    ) -> CamResult:
        size = (batch.images.shape[-2], batch.images.shape[-1])
        maps: dict[str, torch.Tensor] = {}
        layer_maps: dict[str, dict[str, torch.Tensor]] = {}
        raw_out: dict[str, dict[str, torch.Tensor]] = {}
        unrectified: dict[str, dict[str, torch.Tensor]] = {}
        for method, per_layer in raw.items():
            upsampled = [upsample(per_layer[name], size) for name in names]
            normalised = {name: min_max(up) for name, up in zip(names, upsampled, strict=True)}
            fused = normalised[names[0]] if len(names) == 1 else fuse(upsampled)
            maps[method] = self._unfold(fused, batch)
            layer_maps[method] = {name: self._unfold(m, batch) for name, m in normalised.items()}
            raw_out[method] = {name: self._unfold(per_layer[name].clamp_min(0), batch) for name in names}
            unrectified[method] = {name: self._unfold(per_layer[name], batch) for name in names}
        logits = output.detach().float().clone() if isinstance(output, torch.Tensor) else None
        return CamResult(
            maps=maps,
            layer_maps=layer_maps,
            raw=raw_out,
            unrectified=unrectified,
            targets=resolved.classes.contiguous(),
            scores=resolved.scores.detach().float(),
            valid=resolved.valid.contiguous(),
            logits=logits,
            layers=list(names),
            views=batch.views,
        )

    @staticmethod
    def _unfold(maps: torch.Tensor, batch: _Batch) -> torch.Tensor:
        if batch.views is None:
            return maps
        return maps.reshape(batch.size, batch.views, *maps.shape[1:])
