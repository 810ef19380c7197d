"""The study of Disentangle and Customize (docs/study.md, pre-registered): the method's
System-1 claims tested with controls for step count, data amount and the router's data, on
every test problem, with paired intervals over problems.

``data``: the records per cluster, the reference top-up, the cross-fitting halves and the
size-matched subsets; ``arms``: step budgets, the arms' adapters and mixtures (the
training-free centroid router among them); ``cells``: one cell trained and scored;
``report``: the tables, the hypotheses and the plot. ``bdc study`` runs it.
"""
