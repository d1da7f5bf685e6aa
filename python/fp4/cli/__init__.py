"""The commands behind `python -m fp4`."""
