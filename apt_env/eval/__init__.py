"""Evaluation: rows keyed by (role, rule, budget), accuracy with intervals, side-by-side timing and replay files
(``evaluate``); tables and pictures (``report``)."""
