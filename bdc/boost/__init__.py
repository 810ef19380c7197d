"""Boost (paper part B): MC-Tree-of-Agents exploration.

``tree_of_agents`` is the whole search in one file; ``agents`` are the LLM agents that take
part in it (one interface, two prompt styles; their backends are ``bdc.llm``'s).
``exploration`` searches many problems at once, resumably (``records``: what is kept of each,
under which fingerprint; ``dask_shards``: on a Dask cluster); ``training_data`` makes the P2T
and T2S records and preference pairs from the trees; ``compare`` measures the tree against
each agent alone and best-of-N at the same budget.
"""
