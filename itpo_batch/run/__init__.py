"""Stage 6, run: ``iterate`` and everything around it: its config, the shared context, one arm's state
and step, rounds, evaluation, the comparison report and plots, and the quickstart. Imports every stage
below it; nothing below imports it.
"""
