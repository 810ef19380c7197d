"""One module per pipeline stage (as DVC's example-get-started has one per stage).

A stage module reads its inputs, calls the method code (``bdc.boost``, ``bdc.disentangle``,
``bdc.customize``), writes its outputs atomically and logs its MLflow run. The ML itself lives
in the method packages and the foundations, not here.
"""
