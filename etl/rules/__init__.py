"""SPEC section 4 as typed, pure DataFrame functions: one module per rule family.

Nothing here reads the clock or does I/O: the run's ``end`` is "now", passed in by the caller.
"""
