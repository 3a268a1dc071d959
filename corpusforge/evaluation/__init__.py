"""Offline evaluation: IR metrics, the evaluate stage's runs over query sets, plots."""
