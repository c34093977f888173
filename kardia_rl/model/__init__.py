"""Model construction helpers (tiny local Qwen2-architecture models, loading policies)."""
