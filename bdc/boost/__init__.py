"""Boost (paper part B): MC-Tree-of-Agents exploration.

``tree_of_agents`` is the whole search in one file; ``agents`` are the LLMs that take part in
it (one interface, several backends and prompt styles).
"""
