"""More Flux LoRA layouts (filled in by the formats that need them)."""
