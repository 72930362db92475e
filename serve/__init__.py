"""The Ray Serve application: OpenAI-compatible ingress, vLLM multi-LoRA engine, adapter registry."""
