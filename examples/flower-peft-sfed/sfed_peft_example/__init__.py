"""sfed-peft-example: federated LoRA with peft and Flower, scaled by SFed's rule."""
