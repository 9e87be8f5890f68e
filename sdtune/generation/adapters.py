"""LoRA adapters on a shared base pipeline, switched per generation through diffusers' adapter API."""


def activate_adapter(pipeline, adapter_name: str | None, scale: float) -> None:
    """Make `adapter_name` at `scale` the only active adapter of a shared base pipeline, or with None none of them."""
    if not any(pipeline.get_list_adapters().values()):
        return  # no adapter was ever loaded on this base
    if adapter_name is None:
        pipeline.disable_lora()
        return
    pipeline.enable_lora()
    pipeline.set_adapters([adapter_name], [scale])
