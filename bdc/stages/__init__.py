"""One module per pipeline stage (as DVC's example-get-started has one per stage).

A stage module reads its inputs, calls the method code (``bdc.llm`` for the mini models,
``bdc.boost``, ``bdc.validation``, ``bdc.disentangle``, ``bdc.customize``, ``bdc.evaluate``),
writes its outputs atomically and logs its MLflow run. No stage imports another; the ML
itself lives in the method packages and the foundations, not here.
"""
