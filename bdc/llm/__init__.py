"""The LLM layer below the method: backends, prompts, loading, training tiny models, serving,
the System-1 solver."""
