"""Validate: is the explored data fit to train on? Great Expectations over tables built from
the explore outputs and the problem pools.

``tables`` turns the outputs into data frames, with derived columns for the checks that need
computing (does a program parse, is a record a near duplicate, does it overlap a test
problem); ``suites`` holds the expectations over them, the one definition the project's GX
file context (``gx/``) is kept equal to; ``runner`` validates through GX's checkpoints;
``report`` is the manifest the training stages check before they read the data.
"""
