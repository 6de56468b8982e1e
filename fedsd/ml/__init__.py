"""The model side: Tiny-SD with LoRA, local training, image generation, data shards and prompts."""
