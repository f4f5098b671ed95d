"""``fourbit webui``: train, chat, evaluate and export from a browser (webui/app.py)."""
