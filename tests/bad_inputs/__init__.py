"""The bad-input corpus (see cases.py) and the fixtures that make its files."""
