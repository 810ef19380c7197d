"""The System-1 evaluation: scoring programs on hidden tests, running solvers, the claims."""
