"""Judging runs after the fact: drift between two runs, explanation quality, the HTML report."""
