"""lora-gateway: an OpenAI-compatible gateway that serves LoRA fine-tunes with the template they were trained with."""

__version__ = "0.1.0"
