"""Customize (paper part C): an input-aware hypernetwork weights the LoRA experts rank-wise,
giving every problem its own solver. In PEFT's shape: ``config`` (the settings), ``router``
(the hypernetwork: z(x) -> one weight per expert and rank component, per adapted module),
``layer`` (a linear layer with the experts' frozen A and B stacked into one rank-K*r LoRA,
its rank components gated per input), ``model`` (the base with those layers, the router,
training and generation), and ``fold`` (one standard PEFT adapter per input, for serving
engines that take one adapter per request). Around them: ``training`` (the hypernetwork
alone, reused when nothing that made it changed), ``solver`` (problem text in, program out),
``diagnostics`` (which expert it weights where), ``registry`` (the solver in MLflow).
"""
