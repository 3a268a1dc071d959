"""Dagster jobs, schedules and sensors over the corpusforge assets."""
