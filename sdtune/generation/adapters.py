"""LoRA adapters on a shared base pipeline, switched per generation through diffusers' adapter API, and checked
before they are loaded."""

import torch
from diffusers.utils import convert_unet_state_dict_to_peft

from sdtune.errors import SdtuneError

COMPONENTS = ("unet", "text_encoder")  # the parts of an SD v1 pipeline a LoRA file may adapt, as its key prefixes
# a LoRA layer's tensors in peft's names (after diffusers' conversion), and the text encoder's diffusers names
PAIRED = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_linear_layer.down.weight": "down",
          ".lora_linear_layer.up.weight": "up"}
UNPAIRED = (".lora_B.bias", ".lora_magnitude_vector", ".alpha")  # a LoRA's bias, DoRA's magnitudes, kohya's alpha


def activate_adapters(pipeline, adapter_names: list[str], weights: list[float]) -> None:
    """Make `adapter_names` at `weights` the only active adapters of a shared base pipeline (a LoRA model, or a stack
    of them), or with none of them none."""
    if not any(pipeline.get_list_adapters().values()):
        return  # no adapter was ever loaded on this base
    if not adapter_names:
        pipeline.disable_lora()
        return
    pipeline.enable_lora()
    pipeline.set_adapters(list(adapter_names), list(weights))


def check_adapter(state_dict: dict[str, torch.Tensor], pipeline) -> None:
    """Refuse an adapter (its state dict as diffusers' `lora_state_dict` reads it) with non-finite weights, a down
    projection without its up projection (or the reverse), or keys for no layer of `pipeline`. diffusers loads such
    an adapter with at most a warning in the log, and it draws black images at every scale, 0 included."""
    problems = []
    non_finite = sorted(key for key, value in state_dict.items()
                        if value.is_floating_point() and not torch.isfinite(value).all())
    if non_finite:
        problems.append(f"{len(non_finite)} tensors hold NaN or infinite values (e.g. {non_finite[0]})")
    unexpected, unpaired = [], []
    for prefix, keys in _by_component(state_dict).items():
        modules = dict(getattr(pipeline, prefix).named_modules()) if prefix else {}
        roles: dict[str, set[str]] = {}
        for key in keys:
            layer, role = _layer_and_role(key)
            if layer is None or layer not in modules:
                unexpected.append(f"{prefix}.{key}" if prefix else key)
            elif role:
                roles.setdefault(layer, set()).add(role)
        unpaired += [f"{prefix}.{layer}" for layer, found in roles.items() if found != {"down", "up"}]
    if unpaired:
        problems.append(f"{len(unpaired)} layers miss their down or up projection (e.g. {sorted(unpaired)[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} keys match no layer of the base model (e.g. {sorted(unexpected)[0]})")
    if problems:
        raise SdtuneError(f"the LoRA adapter is damaged or made for another model: {'; '.join(problems)}. Use the "
                          "adapter file as training saved it, on the base model it was trained on.")


def _by_component(state_dict) -> dict[str, dict]:
    """The keys per component, without its prefix, in peft's names; keys of no component under ''."""
    parts: dict[str, dict] = {}
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix not in COMPONENTS:
            prefix, rest = "", key
        parts.setdefault(prefix, {})[rest] = value
    return {prefix: convert_unet_state_dict_to_peft(keys) if prefix else keys for prefix, keys in parts.items()}


def _layer_and_role(key: str) -> tuple[str | None, str | None]:
    """The adapted layer's module name and "down", "up" or None (a tensor that needs no partner); (None, None) for a
    key that is no LoRA tensor."""
    for suffix, role in PAIRED.items():
        if key.endswith(suffix):
            return key.removesuffix(suffix), role
    for suffix in UNPAIRED:
        if key.endswith(suffix):
            return key.removesuffix(suffix), None
    return None, None
