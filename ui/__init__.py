"""Helpers for the web app: settings, the served engine, REST bodies, charts and scenarios.

``app.py`` builds the page and the routes from these; nothing here builds UI components, and
nothing here imports ``app.py``. Model work is the engine's (``engine/``).
"""
