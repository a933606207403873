"""The soak run: thousands of back-to-back transactions with retention, writers and
injected faults on a simulated clock, proving that nothing grows without bound and
that every kept set still restores (``python -m tests.soak``, see ``__main__``)."""
