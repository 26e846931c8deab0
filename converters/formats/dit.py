"""LoRA layouts of other DiT families (filled in by the formats that need them)."""
