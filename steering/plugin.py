"""vLLM general plugin: registers the composite model in every engine process."""


def register() -> None:
    from vllm import ModelRegistry

    from steering.spec import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"steering.composite:{ARCHITECTURE}")
