"""The search's agents: one interface, whatever LLM backend (``bdc.llm``) they run on.

``base`` holds the interface and what an agent returns (thoughts with priors, programs,
feedback); ``llm`` the agent over an LLM with its two prompt styles (the mini models' native
text format, and instructions + JSON for chat models); ``scripted`` a model-free agent for
tests and overhead benchmarks.
"""
