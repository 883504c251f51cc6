"""Serving: OpenAI-compatible HTTP server over one base model with hot-swapped LoRA adapters, canary routing and
rollout analysis. Imports registry/ and monitoring/, never pipelines/."""
