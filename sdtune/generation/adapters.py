"""LoRA adapters on a shared base pipeline, switched per generation through diffusers' adapter API."""


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
