"""LLM agents for the search: one interface, several backends (HTTP, vLLM, local HF).

``base`` holds the records and the interface, ``prompts`` the two prompt styles (the mini
models' native text format, and instructions + JSON for chat models), ``backends`` the places
an LLM can run, ``scripted`` a model-free agent for tests and overhead benchmarks.
"""
